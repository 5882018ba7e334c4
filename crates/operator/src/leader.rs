//! Lease-based leader election: only the holder of one `coordination.k8s.io/v1` Lease acts.
//!
//! The holder renews every [`RENEW`]; another candidate takes the Lease only after it has gone
//! unrenewed for [`LEASE_DURATION`]. Updates carry the Lease's resourceVersion, so two candidates
//! never both win the same round. A holder that cannot renew within the lease duration stops
//! acting (the process exits and is restarted) before anyone else may take over.

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

use crate::Result;

pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(2);

/// Held leadership; renewal runs until this is dropped.
#[derive(Debug)]
pub struct Leadership {
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Waits until this instance holds the Lease, then keeps renewing it in the background. If
/// renewal fails for longer than the lease duration the process exits: acting without the lease
/// would let two instances act at once.
pub async fn acquire(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
    on_attempt: impl Fn(bool),
) -> Result<Leadership> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        match try_acquire(&api, name, identity).await {
            Ok(true) => break,
            // Another instance leads: this one stands by, and the API server answered.
            Ok(false) => on_attempt(true),
            Err(e) => {
                on_attempt(false);
                tracing::warn!(error = %e, "leader election attempt failed");
            }
        }
        tokio::time::sleep(RETRY).await;
    }
    tracing::info!(lease = name, identity, "became leader");
    let (name, identity) = (name.to_owned(), identity.to_owned());
    let renewal = tokio::spawn(async move {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW).await;
            match try_acquire(&api, &name, &identity).await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leadership lost to another instance; exiting");
                    std::process::exit(1);
                }
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            }
            if last_renewal.elapsed() >= LEASE_DURATION {
                tracing::error!("could not renew the leader lease in time; exiting");
                std::process::exit(1);
            }
        }
    });
    Ok(Leadership { renewal })
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
