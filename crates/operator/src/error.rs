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

/// The categories reconcile errors are counted by (`cloak_reconcile_errors_total{category}`).
pub const CATEGORIES: [&str; 8] = [
    "Conflict",
    "KubeApi",
    "Finalizer",
    "Serialize",
    "InvalidSpec",
    "Waiting",
    "Timeout",
    "LeadershipLost",
];

impl Error {
    /// Stable, PascalCase: a metric label and an Event reason.
    /// One of [`CATEGORIES`].
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

    /// The error itself, seen through the finalizer's wrapper.
    pub fn root(&self) -> &Self {
        match self {
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.root(),
                _ => self,
            },
            _ => self,
        }
    }

    /// What a first failure leads to: an invalid spec waits for a change; anything else is
    /// transient and retried. The controllers back off from here on repeats (per object,
    /// doubling, capped: `controllers/retry.rs`).
    pub fn action(&self) -> Action {
        match self.root() {
            Self::Invalid(_) => Action::await_change(),
            _ => Action::requeue(Duration::from_secs(1)),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn behind_finalizer(e: Error) -> Error {
        Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(e)))
    }

    #[test]
    fn an_invalid_spec_behind_the_finalizer_waits_for_a_change() {
        let e = behind_finalizer(Error::Invalid("maxSlots must be positive".into()));
        assert_eq!(e.category(), "InvalidSpec");
        assert_eq!(e.action(), Action::await_change());
    }
}
