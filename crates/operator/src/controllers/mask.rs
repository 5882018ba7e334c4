//! The VpnMask controller: leases one slot of a matching provider, keeps a copy of the provider's
//! credentials in the mask's namespace, reports Ready/Active, and on deletion releases the slot
//! only after every pod using the mask is gone.

use std::{collections::BTreeMap, sync::Arc};

use cloak_api::{AssignedProvider, MaskPhase, VpnMask, VpnMaskStatus, VpnProvider};
use cloak_model::{
    names,
    slots::{self, MaskRequest, Plan, ProviderSlots},
    verify::LABEL_PROVIDER,
};
use futures::{Stream, StreamExt};
use k8s_openapi::{
    ByteString,
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::runtime::WatchStreamExt;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher},
};
use tokio::sync::watch;

use super::{MaskRef, publish, release};
use crate::{Context, Error, MANAGER, Result, labels};

const CONTROLLER: &str = "vpnmask";

/// The mask controller, on the one watch of masks: its events also tell the provider controller
/// when a mask holding one of a provider's slots changed or went away (the provider recounts
/// and sweeps), so masks are not watched twice.
pub(crate) fn controller(
    client: &Client,
    triggers: super::Triggers,
) -> Controller<DeserializeGuard<VpnMask>> {
    let (reader, writer) = kube::runtime::reflector::store::<DeserializeGuard<VpnMask>>();
    let masks = kube::runtime::watcher(Api::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(crate::slim)
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
            if let Some(held) = touched
                .0
                .as_ref()
                .ok()
                .and_then(|m| m.status.as_ref()?.provider.as_ref())
            {
                triggers.provider(&held.namespace, &held.name);
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

pub(crate) async fn run(
    controller: Controller<DeserializeGuard<VpnMask>>,
    ctx: Arc<Context>,
    triggers: impl Stream<Item = MaskRef> + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    controller
        .reconcile_on(triggers)
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, super::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile(guard: Arc<DeserializeGuard<VpnMask>>, ctx: Arc<Context>) -> Result<Action> {
    super::reconcile_guarded(&guard, &ctx, CONTROLLER, apply, cleanup).await
}

/// Whether the provider named by an assignment still exists with the same uid and still has the
/// reservation for this mask.
async fn still_held(mask: &VpnMask, held: &AssignedProvider, ctx: &Context) -> Result<bool> {
    let provider_alive = ctx.providers.state().iter().any(|p| {
        p.0.as_ref().is_ok_and(|p| {
            p.uid().as_deref() == Some(held.uid.as_str()) && p.meta().deletion_timestamp.is_none()
        })
    });
    if !provider_alive {
        return Ok(false);
    }
    let name = names::slot_lease(&held.name, held.slot);
    let cached = ctx
        .leases
        .get(&ObjectRef::new(&name).within(&held.namespace));
    let holder = match cached {
        Some(lease) => lease.labels().get(labels::MASK_UID).cloned(),
        None => Api::<Lease>::namespaced(ctx.client.clone(), &held.namespace)
            .get_metadata_opt(&name)
            .await?
            .and_then(|l| l.labels().get(labels::MASK_UID).cloned()),
    };
    Ok(holder.is_some() && holder == mask.uid())
}

async fn apply(mask: &VpnMask, ctx: &Context) -> Result<Action> {
    let ns = mask.namespace().unwrap_or_default();
    let previous = mask.status.clone().unwrap_or_default();
    let mut held = match &previous.provider {
        Some(held) if still_held(mask, held, ctx).await? => Some(held.clone()),
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
        match allocate(mask, ctx).await? {
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
        conditions: vec![super::condition(
            &previous.conditions,
            "Ready",
            ready,
            &format!("{phase:?}"),
            &message,
            mask.meta().generation,
        )],
        provider: held,
        observed_generation: mask.meta().generation,
    };
    if previous.phase != status.phase
        || previous.provider != status.provider
        || previous.message != status.message
    {
        if cloak_model::mask::announce(previous.phase, phase) {
            publish(ctx, mask, EventType::Normal, &format!("{phase:?}"), message).await;
        }
        let api: Api<VpnMask> = Api::namespaced(ctx.client.clone(), &ns);
        // `provider: null` when no slot is held, so the merge patch removes a stale assignment.
        let mut value = serde_json::to_value(&status)?;
        value["provider"] = serde_json::to_value(&status.provider)?;
        let mut patch = serde_json::json!({"status": value});
        let reassigned = previous.provider != status.provider;
        if reassigned {
            // A new assignment is recorded only over the mask as read: two operators (or a
            // reconcile on a stale cache) that allocated for the mask at once cannot both
            // record one. The one that loses releases what it reserved and reads again.
            patch["metadata"] = serde_json::json!({"resourceVersion": mask.resource_version()});
        }
        let written = api
            .patch_status(
                &mask.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
        if let Err(e) = written {
            if let Some(reservation) = &reserved {
                release(ctx, reservation).await?;
            }
            return Err(e.into());
        }
        if let Some(leased) = status.provider.as_ref().filter(|_| reassigned) {
            let note = format!(
                "leased slot {} of provider {}/{}",
                leased.slot, leased.namespace, leased.name
            );
            publish(ctx, mask, EventType::Normal, "SlotLeased", note).await;
        }
    }
    Ok(action)
}

/// A slot obtained by [`allocate`]: reserved by this reconcile (`reserved` is then the new
/// reservation) or adopted from an earlier one.
struct Obtained {
    assigned: AssignedProvider,
    reserved: Option<PartialObjectMeta<Lease>>,
}

/// Tries to reserve a slot. `Ok(Err((phase, why)))` when none can be had now.
async fn allocate(
    mask: &VpnMask,
    ctx: &Context,
) -> Result<std::result::Result<Obtained, (MaskPhase, String)>> {
    let ns = mask.namespace().unwrap_or_default();
    let uid = mask.uid().unwrap_or_default();
    let pinned = mask.labels().get(LABEL_PROVIDER).and_then(|provider| {
        // A verification mask is pinned to the provider that owns it.
        mask.owner_references()
            .iter()
            .find(|o| o.kind == VpnProvider::kind(&()) && &o.name == provider)
            .map(|o| o.uid.clone())
    });
    let providers = provider_slots(ctx, pinned.is_some());

    // A reservation made earlier whose status write was lost (crash, conflict) is adopted, so a
    // mask never holds two slots.
    for lease in reservations_of(ctx, &uid).await? {
        let provider_uid = lease
            .labels()
            .get(labels::PROVIDER_UID)
            .cloned()
            .unwrap_or_default();
        let slot = lease
            .labels()
            .get(labels::SLOT)
            .and_then(|s| s.parse().ok());
        match (providers.iter().find(|p| p.uid == provider_uid), slot) {
            (Some(p), Some(slot)) => {
                return Ok(Ok(Obtained {
                    assigned: assignment(p, slot, mask),
                    reserved: None,
                }));
            }
            _ => release(ctx, &lease).await?,
        }
    }

    let request = MaskRequest {
        namespace: &ns,
        tags: &mask.spec.providers,
        pinned_uid: pinned.as_deref(),
        uid: &uid,
    };
    let attempts = match slots::plan(&providers, &request) {
        Plan::NoProviders => {
            let why = if mask.spec.providers.is_empty() {
                format!("no Ready VpnProvider allows namespace {ns}")
            } else {
                format!(
                    "no Ready VpnProvider with tags {:?} allows namespace {ns}",
                    mask.spec.providers
                )
            };
            return Ok(Err((MaskPhase::ErrNoProviders, why)));
        }
        Plan::Waiting { matching } => {
            return Ok(Err((
                MaskPhase::Waiting,
                format!("all slots of the {matching} matching provider(s) are taken"),
            )));
        }
        Plan::Try(attempts) => attempts,
    };
    for (provider, slot) in attempts {
        if let Some(reservation) = reserve(ctx, provider, slot, mask).await? {
            // The mask may have started deleting while the reservation was made; its cleanup
            // could then have looked for reservations before this one existed, and the slot
            // would leak. Checked after the create, a deletion that starts later finds it.
            let api: Api<VpnMask> =
                Api::namespaced(ctx.client.clone(), &mask.namespace().unwrap_or_default());
            let current = api.get_metadata_opt(&mask.name_any()).await?;
            let alive = current
                .is_some_and(|m| m.uid() == mask.uid() && m.metadata.deletion_timestamp.is_none());
            if !alive {
                release(ctx, &reservation).await?;
                return Ok(Err((
                    MaskPhase::Pending,
                    "the mask is being deleted".into(),
                )));
            }
            return Ok(Ok(Obtained {
                assigned: assignment(provider, slot, mask),
                reserved: Some(reservation),
            }));
        }
    }
    Ok(Err((
        MaskPhase::Waiting,
        "every free slot was taken by another mask; retrying".into(),
    )))
}

fn assignment(provider: &ProviderSlots, slot: u32, mask: &VpnMask) -> AssignedProvider {
    AssignedProvider {
        name: provider.name.clone(),
        namespace: provider.namespace.clone(),
        uid: provider.uid.clone(),
        slot,
        secret: names::mask_secret(&mask.name_any()),
    }
}

/// The allocator's view of every provider, from the caches.
fn provider_slots(ctx: &Context, include_unusable: bool) -> Vec<ProviderSlots> {
    // One pass over the reservations, not one per provider: with 10,000 reservations and 50
    // providers the difference is most of an allocation's CPU time.
    let mut taken_by = super::reservations_by_provider(ctx);
    ctx.providers
        .state()
        .iter()
        .filter_map(|p| p.0.as_ref().ok())
        .filter(|p| p.meta().deletion_timestamp.is_none())
        .map(|p| {
            let uid = p.uid().unwrap_or_default();
            let taken = taken_by.remove(&uid).unwrap_or_default();
            ProviderSlots {
                namespace: p.namespace().unwrap_or_default(),
                name: p.name_any(),
                uid,
                max_slots: p.spec.max_slots.get(),
                tags: p.spec.tags.clone(),
                namespaces: p.spec.namespaces.clone(),
                usable: include_unusable || super::provider::usable(p),
                taken,
            }
        })
        .collect()
}

/// Creates the reservation of `slot`; `None` when another mask holds it already.
async fn reserve(
    ctx: &Context,
    provider: &ProviderSlots,
    slot: u32,
    mask: &VpnMask,
) -> Result<Option<PartialObjectMeta<Lease>>> {
    let mask_key = format!(
        "{}/{}",
        mask.namespace().unwrap_or_default(),
        mask.name_any()
    );
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(names::slot_lease(&provider.name, slot)),
            namespace: Some(provider.namespace.clone()),
            labels: Some(BTreeMap::from([
                (labels::MANAGED_BY.into(), labels::MANAGER.into()),
                (labels::PROVIDER.into(), provider.name.clone()),
                (labels::PROVIDER_UID.into(), provider.uid.clone()),
                (labels::MASK_UID.into(), mask.uid().unwrap_or_default()),
                (labels::SLOT.into(), slot.to_string()),
            ])),
            annotations: Some(BTreeMap::from([(labels::MASK.into(), mask_key.clone())])),
            // Owned by the provider (owners must share the namespace): deleting the provider
            // garbage-collects its reservations even when the operator is down.
            owner_references: Some(vec![OwnerReference {
                api_version: VpnProvider::api_version(&()).into(),
                kind: VpnProvider::kind(&()).into(),
                name: provider.name.clone(),
                uid: provider.uid.clone(),
                controller: Some(true),
                block_owner_deletion: Some(false),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(mask_key),
            ..LeaseSpec::default()
        }),
    };
    match Api::<Lease>::namespaced(ctx.client.clone(), &provider.namespace)
        .create(&PostParams::default(), &lease)
        .await
    {
        Ok(created) => Ok(Some(
            kube::core::PartialObjectMetaExt::into_response_partial(created.metadata),
        )),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Copies the provider's credentials into the mask's namespace (owned by the mask), keeping the
/// copy equal to the source: keys removed from the source are removed from the copy. The copy
/// records the source's uid and resourceVersion, so an up-to-date copy costs no request at all.
async fn sync_secret_copy(mask: &VpnMask, held: &AssignedProvider, ctx: &Context) -> Result<()> {
    let provider = ctx.providers.state().into_iter().find_map(|p| {
        p.0.as_ref()
            .ok()
            .filter(|p| p.uid().as_deref() == Some(held.uid.as_str()))
            .cloned()
    });
    let Some(provider) = provider else {
        return Ok(());
    };
    let ns = mask.namespace().unwrap_or_default();
    let cached = |ns: &str, name: &str| ctx.secrets.get(&ObjectRef::new(name).within(ns));
    let source_version = cached(&held.namespace, &provider.spec.secret).map(|s| {
        format!(
            "{}/{}",
            s.uid().unwrap_or_default(),
            s.resource_version().unwrap_or_default()
        )
    });
    let copy_version = cached(&ns, &held.secret).and_then(|c| {
        let owned = c
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == mask.uid().as_ref());
        owned
            .then(|| c.annotations().get(labels::SOURCE_VERSION).cloned())
            .flatten()
    });
    if source_version.is_some() && source_version == copy_version {
        return Ok(());
    }
    let source = Api::<Secret>::namespaced(ctx.client.clone(), &held.namespace)
        .get_opt(&provider.spec.secret)
        .await?;
    let Some(source) = source else {
        return Err(Error::Invalid(format!(
            "provider {}/{} has no Secret {}",
            held.namespace, held.name, provider.spec.secret
        )));
    };
    let version = format!(
        "{}/{}",
        source.uid().unwrap_or_default(),
        source.resource_version().unwrap_or_default()
    );
    let copy = Secret {
        metadata: ObjectMeta {
            name: Some(held.secret.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                (labels::MANAGED_BY.into(), labels::MANAGER.into()),
                (labels::PROVIDER.into(), held.name.clone()),
            ])),
            annotations: Some(BTreeMap::from([(labels::SOURCE_VERSION.into(), version)])),
            owner_references: Some(vec![mask.controller_owner_ref(&()).unwrap_or_default()]),
            ..ObjectMeta::default()
        },
        data: Some(
            source
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.0)))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &held.secret,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&copy),
        )
        .await?;
    Ok(())
}

async fn delete_secret_copy(ctx: &Context, ns: &str, name: &str) -> Result<()> {
    match Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
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
    for lease in reservations_of(ctx, &uid).await? {
        release(ctx, &lease).await?;
    }
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

/// The reservations held by the mask with this uid, read from the API server (not the cache).
async fn reservations_of(ctx: &Context, mask_uid: &str) -> Result<Vec<PartialObjectMeta<Lease>>> {
    let selector = format!("{}={mask_uid}", labels::MASK_UID);
    let list = Api::<Lease>::all(ctx.client.clone())
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    Ok(list.items)
}
