//! Slot leasing: reserving a provider's slot for a mask, adopting a reservation made earlier,
//! releasing, and sweeping reservations no mask uses. Every change to reservations goes through
//! this module; the controllers decide *when*, this module decides *how*.
//!
//! # Why it cannot over-commit
//!
//! A mask holds slot *i* of a provider by owning a `coordination.k8s.io/v1` Lease named
//! `cloak-slot-<provider>-<i>` ([`names::slot_lease`]) in the provider's namespace, with
//! *i* < `maxSlots`. A reservation is made with a plain `create` ([`reserve`]): the API server
//! stores at most one object per name, so two reconciles, two operator replicas or a restarted
//! operator racing for slot *i* get one success and one `409 AlreadyExists`, and the loser tries
//! the next slot. With names limited to *i* < `maxSlots`, at most `maxSlots` reservations exist per
//! provider, whatever the caches say. Caches only choose the order of attempts.
//!
//! The rest keeps a mask from holding two slots and a slot from leaking:
//! - a mask first adopts any reservation labelled with its uid ([`allocate`]);
//! - a new assignment is recorded with the mask's `resourceVersion` as read (the mask controller's
//!   status write), and the reconcile that loses that race [`release`]s what it reserved, unless
//!   another reconcile adopted it meanwhile: adopting touches the reservation over its
//!   `resourceVersion` as listed ([`claim`]) and releasing deletes it only as created, so exactly
//!   one of them succeeds and a recorded reservation is never deleted under its mask;
//! - a reservation made for a mask that started deleting meanwhile is released at once;
//! - [`sweep_orphans`] deletes reservations whose mask is gone or records another reservation,
//!   deciding from the API server's copy of the mask, never from the cache alone;
//! - [`release`] deletes only the reservation that was read (uid precondition).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use cloak_api::{AssignedProvider, MaskPhase, VpnMask, VpnProvider};
use cloak_model::{
    names,
    slots::{self, MaskRequest, Plan, ProviderSlots},
    verify::LABEL_PROVIDER,
};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::reflector::ObjectRef,
};

use crate::{Context, Error, Result, labels};

/// Whether the provider named by an assignment still exists with the same uid and still has the
/// reservation for this mask.
pub(crate) async fn still_held(
    mask: &VpnMask,
    held: &AssignedProvider,
    ctx: &Context,
) -> Result<bool> {
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

/// A slot obtained by [`allocate`]: reserved by this reconcile (`reserved` is then the new
/// reservation) or adopted from an earlier one.
pub(crate) struct Obtained {
    pub(crate) assigned: AssignedProvider,
    pub(crate) reserved: Option<PartialObjectMeta<Lease>>,
}

/// Tries to reserve a slot. `Ok(Err((phase, why)))` when none can be had now.
pub(crate) async fn allocate(
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
                // Claimed through the reservation itself: the reconcile that made it releases
                // it only while it is unchanged, so exactly one of the claim and the release
                // succeeds.
                if !claim(ctx, &lease).await? {
                    return Ok(Err((
                        MaskPhase::Pending,
                        "its reservation changed while being adopted; retrying".into(),
                    )));
                }
                return Ok(Ok(Obtained {
                    assigned: assignment(p, slot, mask),
                    reserved: None,
                }));
            }
            (None, Some(_)) if provider_lives(ctx, &lease).await? => {
                // Not in this instance's cache yet (just started, or the provider was just
                // made): the reservation may be recorded by another instance already.
                return Ok(Err((
                    MaskPhase::Pending,
                    "its reservation's provider is not known here yet; retrying".into(),
                )));
            }
            _ => release(ctx, &lease).await?,
        }
    }

    let request = MaskRequest {
        namespace: &ns,
        tags: &mask.spec.providers,
        pinned_uid: pinned.as_deref(),
        uid: &uid,
        avoid: &mask.spec.avoid_providers,
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

/// Per provider uid: the masks waiting for a slot that it could serve (its tags and namespaces
/// match theirs), from the caches: what `cloak_provider_masks_waiting` says.
pub(crate) fn waiting_by_provider(ctx: &Context) -> std::collections::BTreeMap<String, i64> {
    let providers = provider_slots(ctx, false);
    let mut waiting = std::collections::BTreeMap::new();
    for mask in ctx.masks.state() {
        let Ok(mask) = &mask.0 else { continue };
        let phase = mask.status.as_ref().and_then(|s| s.phase);
        if phase != Some(MaskPhase::Waiting) {
            continue;
        }
        let (namespace, uid) = (mask.namespace().unwrap_or_default(), mask.uid());
        let request = MaskRequest {
            namespace: &namespace,
            tags: &mask.spec.providers,
            pinned_uid: None,
            uid: uid.as_deref().unwrap_or_default(),
            avoid: &mask.spec.avoid_providers,
        };
        for provider in providers.iter().filter(|p| slots::matches(p, &request)) {
            *waiting.entry(provider.uid.clone()).or_default() += 1;
        }
    }
    waiting
}

/// The allocator's view of every provider, from the caches.
fn provider_slots(ctx: &Context, include_unusable: bool) -> Vec<ProviderSlots> {
    // One pass over the reservations, not one per provider: with 10,000 reservations and 50
    // providers the difference is most of an allocation's CPU time.
    let mut taken_by = reservations_by_provider(ctx);
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
pub(crate) async fn reserve(
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

/// The reservations held by the mask with this uid, read from the API server (not the cache).
pub(crate) async fn reservations_of(
    ctx: &Context,
    mask_uid: &str,
) -> Result<Vec<PartialObjectMeta<Lease>>> {
    let selector = format!("{}={mask_uid}", labels::MASK_UID);
    let list = Api::<Lease>::all(ctx.client.clone())
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    Ok(list.items)
}

/// This provider's slot leases, from the cache.
pub(crate) fn slot_leases(ctx: &Context, provider_uid: &str) -> Vec<Arc<PartialObjectMeta<Lease>>> {
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
pub(crate) async fn sweep_orphans(
    ctx: &Context,
    held: &[Arc<PartialObjectMeta<Lease>>],
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
            release(ctx, lease).await?;
        }
    }
    Ok(())
}

/// Whether the mask's status names this reservation.
fn records(mask: &VpnMask, lease: &PartialObjectMeta<Lease>) -> bool {
    mask.status
        .as_ref()
        .and_then(|s| s.provider.as_ref())
        .is_some_and(|held| names_reservation(held, lease))
}

/// Whether an assignment names this reservation: its slot of the provider with its uid.
fn names_reservation(held: &cloak_api::AssignedProvider, lease: &PartialObjectMeta<Lease>) -> bool {
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

/// Slot indices reserved per provider uid, from the cache, in one pass over the reservations.
pub(crate) fn reservations_by_provider(ctx: &Context) -> HashMap<String, BTreeSet<u32>> {
    let mut taken: HashMap<String, BTreeSet<u32>> = HashMap::new();
    for lease in ctx.leases.state() {
        let lease_labels = lease.labels();
        if let (Some(uid), Some(slot)) = (
            lease_labels.get(labels::PROVIDER_UID),
            lease_labels.get(labels::SLOT).and_then(|s| s.parse().ok()),
        ) {
            taken.entry(uid.clone()).or_default().insert(slot);
        }
    }
    taken
}

/// Whether the provider a reservation was made for exists, by the API server, not a cache.
async fn provider_lives(ctx: &Context, lease: &PartialObjectMeta<Lease>) -> Result<bool> {
    let (Some(name), Some(uid)) = (
        lease.labels().get(labels::PROVIDER),
        lease.labels().get(labels::PROVIDER_UID),
    ) else {
        return Ok(false);
    };
    let provider = Api::<PartialObjectMeta<VpnProvider>>::namespaced(
        ctx.client.clone(),
        &lease.namespace().unwrap_or_default(),
    )
    .get_opt(name)
    .await?;
    Ok(provider
        .is_some_and(|p| p.uid().as_ref() == Some(uid) && p.metadata.deletion_timestamp.is_none()))
}

/// Marks a reservation as adopted (its renew time), only while it is as read
/// (`resourceVersion` precondition). `false` when it changed or went meanwhile: then it is not
/// adopted.
async fn claim(ctx: &Context, lease: &PartialObjectMeta<Lease>) -> Result<bool> {
    let patch = serde_json::json!({
        "metadata": {"uid": lease.uid(), "resourceVersion": lease.resource_version()},
        "spec": {"renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        )},
    });
    let api: Api<Lease> =
        Api::namespaced(ctx.client.clone(), &lease.namespace().unwrap_or_default());
    let claimed = match api
        .patch_metadata(
            &lease.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => false,
        Err(e) => return Err(e.into()),
    };
    tracing::debug!(lease = %lease.name_any(), version = ?lease.resource_version(), claimed, "adopting a reservation");
    Ok(claimed)
}

/// Deletes a slot reservation, only if it is still the object that was read, unchanged (uid
/// and `resourceVersion` preconditions): a slot re-reserved in between, or a reservation another
/// reconcile adopted meanwhile ([`claim`]), is never released by mistake. Gone or changed
/// already is fine: a reservation that is kept and unused is the sweep's ([`sweep_orphans`]).
pub(crate) async fn release(ctx: &Context, lease: &PartialObjectMeta<Lease>) -> Result<(), Error> {
    delete(ctx, lease, lease.resource_version()).await
}

async fn delete(
    ctx: &Context,
    lease: &PartialObjectMeta<Lease>,
    resource_version: Option<String>,
) -> Result<(), Error> {
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: lease.uid(),
            resource_version,
        }),
        ..kube::api::DeleteParams::default()
    };
    let api: kube::Api<Lease> =
        kube::Api::namespaced(ctx.client.clone(), &lease.namespace().unwrap_or_default());
    let outcome = match api.delete(&lease.name_any(), &params).await {
        Ok(_) => "released",
        Err(kube::Error::Api(status)) if status.code == 404 => "gone already",
        Err(kube::Error::Api(status)) if status.code == 409 => "changed: kept",
        Err(e) => return Err(e.into()),
    };
    tracing::debug!(lease = %lease.name_any(), version = ?params.preconditions.and_then(|p| p.resource_version), outcome, "releasing a reservation");
    Ok(())
}

/// Releases every reservation of the mask with this uid (its finalizer, once no pod uses it),
/// whatever changed in them since: the mask is going away.
pub(crate) async fn release_all(ctx: &Context, mask_uid: &str) -> Result<()> {
    for lease in reservations_of(ctx, mask_uid).await? {
        delete(ctx, &lease, None).await?;
    }
    Ok(())
}
