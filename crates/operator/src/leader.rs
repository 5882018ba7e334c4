//! Lease-based leader election: only the holder of one `coordination.k8s.io/v1` Lease acts.
//!
//! The timing is client-go's: a candidate tries every [`RETRY`]; the holder renews every
//! [`RETRY`] too, and gives up once it has not renewed for [`RENEW_DEADLINE`], which is shorter
//! than the [`LEASE_DURATION`] after which another candidate may take the Lease. Every request
//! is bounded by a timeout, so a holder cut off from the API server (requests that neither fail
//! nor finish) still steps down in time. Updates carry the Lease's resourceVersion, so two
//! candidates never both win the same round.
//!
//! Margins: a renewal counts from the moment its request was sent, which is no later than the
//! `renewTime` it writes, so the holder stops acting at least `LEASE_DURATION - RENEW_DEADLINE`
//! (5 s) before the Lease can expire for anyone else, less the clock skew between replicas.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, time::Instant};

use crate::{Error, Result};

/// How long a Lease is valid after its last renewal (written into the Lease).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The holder steps down once it has not renewed for this long.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Between two attempts to acquire or renew.
pub const RETRY: Duration = Duration::from_secs(2);
/// The longest one election request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Held leadership; renewal runs until this is dropped.
#[derive(Debug)]
pub struct Leadership {
    renewal: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
}

impl Leadership {
    /// Resolves, with the reason, once leadership is lost: from then on this instance must not
    /// act (the operator returns an error and the process exits, to be restarted as a
    /// candidate).
    pub async fn lost(&mut self) -> String {
        match self.lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the renewal task ended".into(),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Waits until this instance holds the Lease, then keeps renewing it in the background until
/// renewal fails for [`RENEW_DEADLINE`] or another instance holds it ([`Leadership::lost`]).
pub async fn acquire(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
    on_attempt: impl Fn(bool),
) -> Result<Leadership> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let mut renewed = loop {
        let started = Instant::now();
        match bounded(REQUEST_TIMEOUT, try_acquire(&api, name, identity)).await {
            Ok(true) => break started,
            // Another instance leads: this one stands by, and the API server answered.
            Ok(false) => on_attempt(true),
            Err(e) => {
                on_attempt(false);
                tracing::warn!(error = %e, "leader election attempt failed");
            }
        }
        tokio::time::sleep(RETRY).await;
    };
    tracing::info!(lease = name, identity, "became leader");
    let (name, identity) = (name.to_owned(), identity.to_owned());
    let (lost_tx, lost) = watch::channel(None);
    let renewal = tokio::spawn(async move {
        // Every wait and every request ends by the deadline, so leadership is given up at
        // `renewed + RENEW_DEADLINE` at the latest, not a retry period later.
        let reason = loop {
            let deadline = renewed + RENEW_DEADLINE;
            tokio::time::sleep_until(deadline.min(Instant::now() + RETRY)).await;
            let started = Instant::now();
            let left = deadline.saturating_duration_since(started);
            if left.is_zero() {
                break format!("the lease was not renewed for {RENEW_DEADLINE:?}");
            }
            match bounded(
                left.min(REQUEST_TIMEOUT),
                try_acquire(&api, &name, &identity),
            )
            .await
            {
                Ok(true) => renewed = started,
                Ok(false) => break "another instance holds the lease".to_owned(),
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            }
        };
        tracing::error!(%reason, "leadership lost");
        let _ = lost_tx.send(Some(reason));
    });
    Ok(Leadership { renewal, lost })
}

/// `request`, or a timeout error after `limit`.
async fn bounded<T>(limit: Duration, request: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| Err(Error::Timeout(format!("no answer within {limit:?}"))))
}

/// One round: take the Lease if free, expired or ours. `Ok(false)` when another holds it.
async fn try_acquire(api: &Api<Lease>, name: &str, identity: &str) -> Result<bool> {
    let now = Timestamp::now();
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15)),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(spec(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let ours = current.holder_identity.as_deref() == Some(identity);
    let expired = current.renew_time.as_ref().is_none_or(|t| {
        let duration = Duration::from_secs(
            u64::try_from(current.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
        );
        now.duration_since(t.0)
            > k8s_openapi::jiff::SignedDuration::try_from(duration).unwrap_or_default()
    });
    if !ours && !expired {
        return Ok(false);
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let acquired = if ours { current.acquire_time } else { None };
    lease.spec = Some(spec(transitions, acquired));
    // replace() sends the resourceVersion read above: a concurrent winner makes this a 409.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
