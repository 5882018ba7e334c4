//! The VpnProvider controller: checks the credentials Secret, verifies the credentials through a
//! pod that holds one of the provider's own slots (so verification never exceeds maxSlots),
//! re-verifies on `verify.interval`, and reports phase and `activeSlots`.

use std::{sync::Arc, time::Duration};

use cloak_api::{ProviderPhase, VpnProvider, VpnProviderStatus};
use cloak_model::names;
use futures::Stream;
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams},
    core::DeserializeGuard,
    runtime::{Controller, controller::Action, events::EventType, watcher},
};

pub(crate) mod serverlist;
mod verification;

use self::verification::{end_verification, verification};
use super::publish;
use crate::{Context, Result, labels};

const CONTROLLER: &str = "vpnprovider";
/// Seed 000's default verification timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a provider's server list (a ConfigMap, not watched) is read again.
const LIST_REREAD: Duration = Duration::from_mins(1);

/// The provider controller, on the operator's one watch of providers (`stream`, reflected into
/// `store`: the cache the mask controller allocates from). Its verification pods and masks are
/// not watched again here: the pod and mask watches turn their changes into requests for this
/// controller (`Triggers::provider`).
pub(crate) fn controller(
    stream: impl Stream<Item = Result<DeserializeGuard<VpnProvider>, watcher::Error>> + Send + 'static,
    store: kube::runtime::reflector::Store<DeserializeGuard<VpnProvider>>,
) -> Controller<DeserializeGuard<VpnProvider>> {
    // A provider's reservations change with every mask it serves; debouncing folds a burst of
    // them into one reconcile (one status write) instead of one each.
    let config = kube::runtime::controller::Config::default()
        .concurrency(4)
        .debounce(Duration::from_millis(200));
    Controller::for_stream(stream, store).with_config(config)
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

#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "VpnProvider", object = %super::object_name(&*guard))
)]
pub(crate) async fn reconcile(
    guard: Arc<DeserializeGuard<VpnProvider>>,
    ctx: Arc<Context>,
) -> Result<Action> {
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
    let held = super::leasing::slot_leases(ctx, &uid);
    let active = u32::try_from(held.len()).unwrap_or(u32::MAX);
    let max = provider.spec.max_slots.get();

    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&provider.spec.secret)
        .await?;
    // gluetun's server list, when given: its servers are the pool, verified by cloak's agent.
    let (server_list, list_error) = match (&provider.spec.server_list, &secret) {
        (Some(source), Some(secret)) => {
            match serverlist::read(provider, source, secret, ctx).await? {
                Ok(status) => (Some(status), None),
                Err(why) => (None, Some(why)),
            }
        }
        _ => (None, None),
    };
    // The list is part of the credentials: a new list retries a failed verification.
    let secret_version = secret
        .as_ref()
        .and_then(ResourceExt::resource_version)
        .map(|v| match &server_list {
            Some(list) => format!("{v}+{}", list.source),
            None => v,
        });
    let mut decision = match (secret, list_error) {
        (None, _) => Decision {
            phase: ProviderPhase::ErrSecretNotFound,
            message: format!("Secret {ns}/{} not found", provider.spec.secret),
            last_verified: previous.last_verified.clone(),
            requeue: None,
        },
        (Some(_), Some(why)) => Decision {
            phase: ProviderPhase::ErrVerifyFailed,
            message: format!("server list: {why}"),
            last_verified: previous.last_verified.clone(),
            requeue: None,
        },
        (Some(secret), None) => {
            verification(
                provider,
                &secret,
                secret_version.as_deref(),
                &previous,
                server_list.is_some(),
                ctx,
            )
            .await?
        }
    };
    // ConfigMaps are not watched, and a URL is due at most once a minute: a list is looked at
    // again every minute.
    if provider.spec.server_list.is_some() {
        decision.requeue = Some(decision.requeue.map_or(LIST_REREAD, |r| r.min(LIST_REREAD)));
    }
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
        conditions: vec![super::ready_condition(
            &previous.conditions,
            ready,
            phase,
            &message,
            provider.meta().generation,
        )],
        active_slots: active,
        last_verified: decision.last_verified,
        observed_generation: provider.meta().generation,
        observed_secret_version: secret_version,
        server_list,
    };
    if super::status::write_if_changed(&api, &provider.name_any(), &previous, &status, None).await?
        && previous.phase != status.phase
    {
        let type_ = if phase_is_error(phase) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, provider, type_, &format!("{phase:?}"), message).await;
    }
    super::leasing::sweep_orphans(ctx, &held).await?;
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

/// Provider deleted: its reservations go (masks then lose their assignment and look elsewhere),
/// and so does any verification in progress.
async fn cleanup(provider: &VpnProvider, ctx: &Context) -> Result<Action> {
    let ns = provider.namespace().unwrap_or_default();
    serverlist::forget(provider, ctx);
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
