//! Operator errors. Each has a stable category: the `category` label of
//! `cloak_reconcile_errors_total` and the reason of the Event it produces.

use std::time::Duration;

use kube::runtime::controller::Action;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    #[error("serializing an object: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
    /// Not a failure: cleanup must wait (pods still use a mask). An error, because the finalizer
    /// helper removes the finalizer after any successful cleanup, whatever the Action.
    #[error("waiting: {0}")]
    Waiting(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// This instance no longer leads and must stop acting.
    #[error("leadership lost: {0}")]
    LeadershipLost(String),
}

impl Error {
    /// Stable, PascalCase: a metric label and an Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(status)) if status.code == 409 => "Conflict",
            Self::Kube(_) => "KubeApi",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "Finalizer",
            },
            Self::Serialize(_) => "Serialize",
            Self::Invalid(_) => "InvalidSpec",
            Self::Waiting(_) => "Waiting",
            Self::Timeout(_) => "Timeout",
            Self::LeadershipLost(_) => "LeadershipLost",
        }
    }

    /// What the controller does after this error: an invalid spec waits for a change; anything
    /// else is transient and retried (the controller adds its own backoff on repeats).
    pub fn action(&self) -> Action {
        match self {
            Self::Invalid(_) => Action::await_change(),
            Self::Waiting(_) => Action::requeue(Duration::from_secs(1)),
            _ => Action::requeue(Duration::from_secs(2)),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
