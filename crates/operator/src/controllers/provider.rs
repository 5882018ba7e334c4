//! The VpnProvider controller: checks the credentials Secret, verifies the credentials through a
//! pod that holds one of the provider's own slots (so verification never exceeds maxSlots),
//! re-verifies on `verify.interval`, and reports phase and `activeSlots`.

use std::{sync::Arc, time::Duration};

use cloak_api::{ProviderPhase, VpnMask, VpnMaskSpec, VpnProvider, VpnProviderStatus};
use cloak_model::{credentials, names, verify};
use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    core::DeserializeGuard,
    runtime::{Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher},
};
use tokio::sync::watch;

use super::{ProviderRef, publish};
use crate::{Context, Result, labels};

const CONTROLLER: &str = "vpnprovider";
/// Seed 000's default verification timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

pub(crate) fn controller(client: &Client) -> Controller<DeserializeGuard<VpnProvider>> {
    let verification = watcher::Config::default().labels(verify::LABEL_PROVIDER);
    // A provider's reservations change with every mask it serves; debouncing folds a burst of
    // them into one reconcile (one status write) instead of one each.
    let config = kube::runtime::controller::Config::default()
        .concurrency(4)
        .debounce(Duration::from_millis(200));
    Controller::new(Api::all(client.clone()), watcher::Config::default())
        .with_config(config)
        .owns(
            Api::<DeserializeGuard<VpnMask>>::all(client.clone()),
            verification.clone(),
        )
        .owns(Api::<Pod>::all(client.clone()), verification)
}

pub(crate) async fn run(
    controller: Controller<DeserializeGuard<VpnProvider>>,
    ctx: Arc<Context>,
    triggers: impl Stream<Item = ProviderRef> + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    // A mask holding a slot changed or went away: its provider recounts and sweeps orphans.
    // Those requests come with `triggers`, from the mask controller's own watch.
    controller
        .reconcile_on(triggers)
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, super::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Whether masks may get new slots of this provider: verified and not failed since, or verified
/// before and being re-verified now (re-verification never blocks the other slots).
pub(crate) fn usable(provider: &VpnProvider) -> bool {
    let status = provider.status.as_ref();
    match status.and_then(|s| s.phase) {
        Some(ProviderPhase::Ready | ProviderPhase::Active) => true,
        Some(ProviderPhase::Verifying | ProviderPhase::Verified) => {
            status.is_some_and(|s| s.last_verified.is_some())
        }
        _ => false,
    }
}

async fn reconcile(guard: Arc<DeserializeGuard<VpnProvider>>, ctx: Arc<Context>) -> Result<Action> {
    super::reconcile_guarded(&guard, &ctx, CONTROLLER, apply, cleanup).await
}

/// The desired status, and when to look again.
struct Decision {
    phase: ProviderPhase,
    message: String,
    last_verified: Option<Time>,
    requeue: Option<Duration>,
}

async fn apply(provider: &VpnProvider, ctx: &Context) -> Result<Action> {
    let ns = provider.namespace().unwrap_or_default();
    // Status is read fresh, not from the cache: the cache can still hold the status before this
    // controller's last write, and deciding from it would, say, restart a verification that
    // just failed. Providers are few; one GET each reconcile is cheap.
    let api: Api<VpnProvider> = Api::namespaced(ctx.client.clone(), &ns);
    let previous = api
        .get_status(&provider.name_any())
        .await?
        .status
        .unwrap_or_default();
    let uid = provider.uid().unwrap_or_default();
    let held = slot_leases(ctx, &uid);
    let active = u32::try_from(held.len()).unwrap_or(u32::MAX);
    let max = provider.spec.max_slots.get();

    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&provider.spec.secret)
        .await?;
    let secret_version = secret.as_ref().and_then(ResourceExt::resource_version);
    let decision = match secret {
        None => Decision {
            phase: ProviderPhase::ErrSecretNotFound,
            message: format!("Secret {ns}/{} not found", provider.spec.secret),
            last_verified: previous.last_verified.clone(),
            requeue: None,
        },
        Some(secret) => {
            verification(provider, &secret, secret_version.as_deref(), &previous, ctx).await?
        }
    };
    let phase = match decision.phase {
        ProviderPhase::Ready | ProviderPhase::Active => {
            if active > 0 {
                ProviderPhase::Active
            } else {
                ProviderPhase::Ready
            }
        }
        other => other,
    };
    let mut message = decision.message;
    if active > max {
        message = format!(
            "{message}; maxSlots is {max} but {active} slots are held: holders keep their slots, no new slot is leased until fewer than {max} remain"
        );
    }
    let ready = matches!(phase, ProviderPhase::Ready | ProviderPhase::Active);
    let status = VpnProviderStatus {
        phase: Some(phase),
        message: Some(message.clone()),
        conditions: vec![super::condition(
            &previous.conditions,
            "Ready",
            ready,
            &format!("{phase:?}"),
            &message,
            provider.meta().generation,
        )],
        active_slots: active,
        last_verified: decision.last_verified,
        observed_generation: provider.meta().generation,
        observed_secret_version: secret_version,
    };
    if previous.phase != status.phase
        || previous.message != status.message
        || previous.active_slots != active
        || previous.last_verified != status.last_verified
        || previous.observed_secret_version != status.observed_secret_version
    {
        if previous.phase != status.phase {
            let type_ = if phase_is_error(phase) {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(ctx, provider, type_, &format!("{phase:?}"), message).await;
        }
        api.patch_status(
            &provider.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"status": status})),
        )
        .await?;
    }
    sweep_orphans(ctx, &held).await?;
    Ok(decision
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

fn phase_is_error(phase: ProviderPhase) -> bool {
    matches!(
        phase,
        ProviderPhase::ErrSecretNotFound | ProviderPhase::ErrVerifyFailed
    )
}

/// The verification state machine: skip, keep, start, wait, pass or fail.
async fn verification(
    provider: &VpnProvider,
    secret: &Secret,
    secret_version: Option<&str>,
    previous: &VpnProviderStatus,
    ctx: &Context,
) -> Result<Decision> {
    let verify_spec = provider.spec.verify.clone().unwrap_or_default();
    let ns = provider.namespace().unwrap_or_default();
    let decide = |phase, message: String, last_verified, requeue| Decision {
        phase,
        message,
        last_verified,
        requeue,
    };
    let classify = || {
        let data = secret
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        credentials::classify(&data, provider.spec.tunnel)
    };
    let now = Timestamp::now();
    let since = |t: &Time| Duration::try_from(now.duration_since(t.0)).unwrap_or_default();
    let step = verify::first_step(
        verify_spec.skip,
        classify,
        &provider.spec.secret,
        verify_spec
            .interval
            .as_ref()
            .map(cloak_api::GoDuration::get),
        verify::Previous {
            phase: previous.phase,
            message: previous.message.as_deref(),
            since_verified: previous.last_verified.as_ref().map(since),
            same_spec_and_secret: previous.observed_generation == provider.meta().generation
                && previous.observed_secret_version.as_deref() == secret_version,
        },
    );
    let format = match step {
        verify::Step::Report {
            phase,
            message,
            requeue,
        } => {
            return Ok(decide(
                phase,
                message,
                previous.last_verified.clone(),
                requeue,
            ));
        }
        verify::Step::Verify(format) => format,
    };

    let name = names::verification(&provider.name_any());
    let mask = ensure_verification_mask(provider, &name, ctx).await?;
    if mask.meta().deletion_timestamp.is_some() {
        // The previous verification is still releasing its slot.
        return Ok(decide(
            ProviderPhase::Verifying,
            "waiting for the previous verification to end".into(),
            previous.last_verified.clone(),
            Some(Duration::from_secs(1)),
        ));
    }
    let Some(held) = mask.status.as_ref().and_then(|s| s.provider.clone()) else {
        return Ok(decide(
            ProviderPhase::Verifying,
            "waiting for a free slot to verify the credentials".into(),
            previous.last_verified.clone(),
            None,
        ));
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = if let Some(pod) = pods.get_opt(&name).await? {
        pod
    } else {
        {
            let owners = vec![
                provider.controller_owner_ref(&()).unwrap_or_default(),
                OwnerReference {
                    block_owner_deletion: Some(true),
                    controller: Some(false),
                    ..mask.controller_owner_ref(&()).unwrap_or_default()
                },
            ];
            let pod = verify::pod(&verify::VerifyPod {
                name: &name,
                namespace: &ns,
                provider: &provider.name_any(),
                secret: &held.secret,
                ip_url: &ctx.config.verify_ip_url,
                owners,
                overrides: verify_spec.overrides.as_ref(),
                // The agent gets the verification's whole time but the 10 s it needs to start.
                verifier: verify::Verifier::for_format(
                    format,
                    &ctx.config.agent_image,
                    verify_spec
                        .timeout
                        .as_ref()
                        .map_or(DEFAULT_TIMEOUT, cloak_api::GoDuration::get)
                        .as_secs()
                        .saturating_sub(10)
                        .max(10),
                ),
            })?;
            publish(
                ctx,
                provider,
                EventType::Normal,
                "Verifying",
                format!("verification pod {name} created"),
            )
            .await;
            pods.create(&PostParams::default(), &pod).await?
        }
    };
    let timeout = verify_spec.timeout.map_or(DEFAULT_TIMEOUT, |t| t.get());
    let age = pod
        .creation_timestamp()
        .map_or(Duration::ZERO, |t| since(&t));
    let outcome = match verify::outcome(pod.status.as_ref()) {
        verify::Outcome::Running if age >= timeout => verify::Outcome::Failed(format!(
            "timed out after {}",
            provider
                .spec
                .verify
                .as_ref()
                .and_then(|v| v.timeout.as_ref())
                .map_or_else(|| "1m30s".into(), ToString::to_string)
        )),
        other => other,
    };
    match outcome {
        verify::Outcome::Running => Ok(decide(
            ProviderPhase::Verifying,
            format!("verification pod {name} running"),
            previous.last_verified.clone(),
            Some(timeout.saturating_sub(age)),
        )),
        verify::Outcome::Passed => {
            end_verification(ctx, &ns, &name).await?;
            Ok(decide(
                ProviderPhase::Ready,
                "credentials verified".into(),
                Some(Time(now)),
                verify_spec.interval.map(|i| i.get()),
            ))
        }
        verify::Outcome::Failed(why) => {
            end_verification(ctx, &ns, &name).await?;
            Ok(decide(
                ProviderPhase::ErrVerifyFailed,
                format!("verification failed: {why}"),
                previous.last_verified.clone(),
                None,
            ))
        }
    }
}

async fn ensure_verification_mask(
    provider: &VpnProvider,
    name: &str,
    ctx: &Context,
) -> Result<VpnMask> {
    let ns = provider.namespace().unwrap_or_default();
    let api: Api<VpnMask> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(mask) = api.get_opt(name).await? {
        return Ok(mask);
    }
    let mask = VpnMask {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.clone()),
            labels: Some([(verify::LABEL_PROVIDER.to_owned(), provider.name_any())].into()),
            owner_references: Some(vec![provider.controller_owner_ref(&()).unwrap_or_default()]),
            ..ObjectMeta::default()
        },
        spec: VpnMaskSpec::default(),
        status: None,
    };
    Ok(api.create(&PostParams::default(), &mask).await?)
}

/// Deletes the verification pod, then its mask (whose finalizer releases the slot once the pod
/// is gone).
async fn end_verification(ctx: &Context, ns: &str, name: &str) -> Result<()> {
    let ignore_missing = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other,
    };
    ignore_missing(
        Api::<Pod>::namespaced(ctx.client.clone(), ns)
            .delete(name, &DeleteParams::background())
            .await
            .map(|_| ()),
    )?;
    ignore_missing(
        Api::<VpnMask>::namespaced(ctx.client.clone(), ns)
            .delete(name, &DeleteParams::background())
            .await
            .map(|_| ()),
    )?;
    Ok(())
}

/// This provider's slot leases, from the cache.
fn slot_leases(
    ctx: &Context,
    provider_uid: &str,
) -> Vec<Arc<kube::core::PartialObjectMeta<Lease>>> {
    ctx.leases
        .state()
        .into_iter()
        .filter(|l| l.labels().get(labels::PROVIDER_UID).map(String::as_str) == Some(provider_uid))
        .collect()
}

/// Releases the reservations no mask will use, so a slot never leaks: those of a mask that no
/// longer exists (removed without its finalizer running), and those of a mask that records
/// another reservation (two operators allocated for it at once, or one stopped between
/// reserving and recording). Decided from the API server's copy of the mask, never from the
/// cache alone: a reservation made a moment ago is recorded a moment later. Only once the mask
/// cache is complete.
async fn sweep_orphans(
    ctx: &Context,
    held: &[Arc<kube::core::PartialObjectMeta<Lease>>],
) -> Result<()> {
    if ctx.masks.wait_until_ready().await.is_err() {
        return Ok(());
    }
    for lease in held {
        let Some(mask_uid) = lease.labels().get(labels::MASK_UID) else {
            continue;
        };
        let (ns, name) = lease
            .annotations()
            .get(labels::MASK)
            .and_then(|m| m.split_once('/'))
            .unwrap_or_default();
        let recorded = ctx
            .masks
            .get(&ObjectRef::new(name).within(ns))
            .as_deref()
            .and_then(|m| m.0.as_ref().ok())
            .is_some_and(|m| m.uid().as_ref() == Some(mask_uid) && records(m, lease));
        if recorded {
            continue;
        }
        let current = Api::<DeserializeGuard<VpnMask>>::namespaced(ctx.client.clone(), ns)
            .get_opt(name)
            .await?
            .filter(|m| m.uid().as_deref() == Some(mask_uid.as_str()));
        let unused = match current.as_ref().map(|m| &m.0) {
            None => true,
            // Recording none (yet) or this one: in use, or about to be. Unreadable: undecided.
            Some(Err(_)) => false,
            Some(Ok(mask)) => match mask.status.as_ref().and_then(|s| s.provider.as_ref()) {
                Some(other) if !names_reservation(other, lease) => {
                    reservation_exists(ctx, other, mask_uid).await?
                }
                _ => false,
            },
        };
        if unused {
            tracing::info!(lease = %lease.name_any(), mask = %format!("{ns}/{name}"), "releasing a slot no mask uses");
            super::release(ctx, lease).await?;
        }
    }
    Ok(())
}

/// Whether the mask's status names this reservation.
fn records(mask: &VpnMask, lease: &kube::core::PartialObjectMeta<Lease>) -> bool {
    mask.status
        .as_ref()
        .and_then(|s| s.provider.as_ref())
        .is_some_and(|held| names_reservation(held, lease))
}

/// Whether an assignment names this reservation: its slot of the provider with its uid.
fn names_reservation(
    held: &cloak_api::AssignedProvider,
    lease: &kube::core::PartialObjectMeta<Lease>,
) -> bool {
    lease.namespace().as_deref() == Some(held.namespace.as_str())
        && lease.name_any() == names::slot_lease(&held.name, held.slot)
        && lease.labels().get(labels::PROVIDER_UID) == Some(&held.uid)
}

/// Whether the reservation an assignment names exists and was made for this mask.
async fn reservation_exists(
    ctx: &Context,
    held: &cloak_api::AssignedProvider,
    mask_uid: &str,
) -> Result<bool> {
    let name = names::slot_lease(&held.name, held.slot);
    let lease = Api::<Lease>::namespaced(ctx.client.clone(), &held.namespace)
        .get_metadata_opt(&name)
        .await?;
    Ok(lease.is_some_and(|l| {
        l.labels().get(labels::MASK_UID).map(String::as_str) == Some(mask_uid)
            && names_reservation(held, &l)
    }))
}

/// Provider deleted: its reservations go (masks then lose their assignment and look elsewhere),
/// and so does any verification in progress.
async fn cleanup(provider: &VpnProvider, ctx: &Context) -> Result<Action> {
    let ns = provider.namespace().unwrap_or_default();
    end_verification(ctx, &ns, &names::verification(&provider.name_any())).await?;
    let uid = provider.uid().unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    leases
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{}={uid}", labels::PROVIDER_UID)),
        )
        .await?;
    Ok(Action::await_change())
}
