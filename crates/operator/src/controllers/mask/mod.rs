//! The VpnMask controller: leases one slot of a matching provider, keeps a copy of the provider's
//! credentials in the mask's namespace, reports Ready/Active, and on deletion releases the slot
//! only after every pod using the mask is gone.

use std::sync::Arc;

use cloak_api::{VpnMask, VpnMaskStatus};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams},
    core::DeserializeGuard,
    runtime::{Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher},
};

mod credentials;

use self::credentials::{delete_secret_copy, sync_secret_copy};
use super::{leasing, publish};
use crate::{Context, Error, Result};

const CONTROLLER: &str = "vpnmask";

/// The mask controller, on the one watch of masks: its events also tell the provider controller
/// when a mask holding one of a provider's slots changed or went away (the provider recounts
/// and sweeps), and when a verification's mask changed, so masks are not watched twice.
pub(crate) fn controller(
    client: &Client,
    triggers: super::Triggers,
) -> Controller<DeserializeGuard<VpnMask>> {
    let (reader, writer) = kube::runtime::reflector::store::<DeserializeGuard<VpnMask>>();
    let masks = kube::runtime::watcher(Api::all(client.clone()), watcher::Config::default())
        .default_backoff()
        // Masks keep their labels (a verification mask is labelled) and no annotations.
        .modify(|mask| crate::keep_only(mask, None, &[], None))
        .reflect(writer)
        .inspect(move |event| {
            let Ok(
                watcher::Event::Apply(touched)
                | watcher::Event::InitApply(touched)
                | watcher::Event::Delete(touched),
            ) = event
            else {
                return;
            };
            let Ok(mask) = &touched.0 else { return };
            if let Some(held) = mask.status.as_ref().and_then(|s| s.provider.as_ref()) {
                triggers.provider(&held.namespace, &held.name);
            }
            // A verification's mask changed: its provider follows the verification.
            if let (Some(ns), Some(provider)) = (
                mask.namespace(),
                mask.labels().get(cloak_model::verify::LABEL_PROVIDER),
            ) {
                triggers.provider(&ns, provider);
            }
        })
        .applied_objects();
    // Bounded concurrency: a burst of thousands of new masks must not mean thousands of
    // reconciles (each with requests and object copies in flight) at once.
    Controller::for_stream(masks, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(MAX_CONCURRENT))
}

/// Mask reconciles in flight at once.
const MAX_CONCURRENT: u16 = 16;

#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "VpnMask", object = %super::object_name(&*guard))
)]
pub(crate) async fn reconcile(
    guard: Arc<DeserializeGuard<VpnMask>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    super::reconcile_guarded(&guard, &ctx, CONTROLLER, apply, cleanup).await
}

async fn apply(mask: &VpnMask, ctx: &Context) -> Result<Action> {
    let ns = mask.namespace().unwrap_or_default();
    let previous = mask.status.clone().unwrap_or_default();
    let mut held = match &previous.provider {
        Some(held) if leasing::still_held(mask, held, ctx).await? => Some(held.clone()),
        Some(lost) => {
            let note = format!(
                "lost slot {} of provider {}/{}",
                lost.slot, lost.namespace, lost.name
            );
            publish(ctx, mask, EventType::Warning, "SlotLost", note).await;
            delete_secret_copy(ctx, &ns, &lost.secret).await?;
            None
        }
        None => None,
    };
    let mut waiting_message = None;
    let mut reserved = None;
    if held.is_none() {
        match leasing::allocate(mask, ctx).await? {
            Ok(obtained) => {
                held = Some(obtained.assigned);
                reserved = obtained.reserved;
            }
            Err((phase, message)) => waiting_message = Some((phase, message)),
        }
    }

    if let Some(held) = &held {
        sync_secret_copy(mask, held, ctx).await?;
    }
    // Only a mask holding a slot has users worth counting (a scan of the pod cache).
    let users = if held.is_some() {
        pods_using(ctx, mask).len()
    } else {
        0
    };
    let (phase, message) = cloak_model::mask::phase(held.as_ref(), users, waiting_message);
    let action = Action::requeue(if held.is_some() {
        ctx.config.holder_resync
    } else {
        ctx.config.waiting_requeue
    });
    let ready = cloak_model::mask::is_ready(phase);
    let status = VpnMaskStatus {
        phase: Some(phase),
        message: Some(message.clone()),
        conditions: vec![super::ready_condition(
            &previous.conditions,
            ready,
            phase,
            &message,
            mask.meta().generation,
        )],
        provider: held,
        observed_generation: mask.meta().generation,
    };
    let api: Api<VpnMask> = Api::namespaced(ctx.client.clone(), &ns);
    let reassigned = previous.provider != status.provider;
    // A new assignment is recorded only over the mask as read: two operators (or a reconcile on
    // a stale cache) that allocated for the mask at once cannot both record one. The one that
    // loses releases what it reserved and reads again.
    let over_version = reassigned.then(|| mask.resource_version()).flatten();
    let written = super::status::write_if_changed(
        &api,
        &mask.name_any(),
        &previous,
        &status,
        over_version.as_deref(),
    )
    .await;
    match written {
        Err(e) => {
            // Lost the race (409): the reservation is this reconcile's to release, unless
            // another one adopted it meanwhile. Any other failure may have been written all the
            // same (a timeout): the reservation stays, to be adopted by the next reconcile.
            let lost = matches!(&e, Error::Kube(kube::Error::Api(s)) if s.code == 409);
            if lost && let Some(reservation) = &reserved {
                leasing::release(ctx, reservation).await?;
            }
            return Err(e);
        }
        Ok(false) => {}
        Ok(true) => {
            if cloak_model::mask::announce(previous.phase, phase) {
                publish(ctx, mask, EventType::Normal, &format!("{phase:?}"), message).await;
            }
            if let Some(leased) = status.provider.as_ref().filter(|_| reassigned) {
                let note = format!(
                    "leased slot {} of provider {}/{}",
                    leased.slot, leased.namespace, leased.name
                );
                publish(ctx, mask, EventType::Normal, "SlotLeased", note).await;
            }
        }
    }
    Ok(action)
}

/// Pods with an ownerReference to this mask, from the cache.
fn pods_using(ctx: &Context, mask: &VpnMask) -> Vec<ObjectRef<kube::core::PartialObjectMeta<Pod>>> {
    let (ns, uid) = (mask.namespace(), mask.uid());
    ctx.pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace() == ns
                && p.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Releases the slot only once no pod uses the mask: pods still holding it are deleted first
/// (what the garbage collector does for `blockOwnerDeletion` dependents), and the slot is kept
/// until they are gone, so it is never handed to a new mask while an old pod may be connected.
async fn cleanup(mask: &VpnMask, ctx: &Context) -> Result<Action> {
    let ns = mask.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = mask.uid().unwrap_or_default();
    let users: Vec<_> = pods
        .list_metadata(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.owner_references().iter().any(|o| o.uid == uid))
        .collect();
    if !users.is_empty() {
        for pod in &users {
            if pod.meta().deletion_timestamp.is_none() {
                match pods
                    .delete(&pod.name_any(), &DeleteParams::background())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        return Err(Error::Waiting(format!(
            "{} pod(s) still use mask {}",
            users.len(),
            mask.name_any()
        )));
    }
    if let Some(held) = mask.status.as_ref().and_then(|s| s.provider.as_ref()) {
        delete_secret_copy(ctx, &ns, &held.secret).await?;
    }
    leasing::release_all(ctx, &uid).await?;
    publish(
        ctx,
        mask,
        EventType::Normal,
        "SlotReleased",
        "slot released".into(),
    )
    .await;
    Ok(Action::await_change())
}
