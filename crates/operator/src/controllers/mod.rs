//! The controllers and what they share: reconcile requests derived from slot leases, pods and
//! Secrets, Events, and the reconcile wrapper that records metrics.

pub(crate) mod chain;
pub(crate) mod gateway;
pub(crate) mod inbound;
pub(crate) mod leasing;
pub(crate) mod mask;
pub(crate) mod provider;
pub(crate) mod retry;
pub(crate) mod status;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use cloak_api::{VpnMask, VpnProvider};
use futures::{Stream, StreamExt, channel::mpsc};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Pod, Secret},
};
use kube::{
    Resource, ResourceExt,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::ObjectRef,
        watcher,
    },
};

use crate::{Context, Error, labels, metrics::ReconcileLabels};

pub(crate) type MaskRef = ObjectRef<DeserializeGuard<VpnMask>>;
pub(crate) type ProviderRef = ObjectRef<DeserializeGuard<VpnProvider>>;

/// Reconcile requests for both controllers, fed by [`feed`].
#[derive(Clone)]
pub(crate) struct Triggers {
    masks: mpsc::UnboundedSender<MaskRef>,
    providers: mpsc::UnboundedSender<ProviderRef>,
    receivers: Arc<Mutex<Receivers>>,
}

struct Receivers {
    masks: Option<mpsc::UnboundedReceiver<MaskRef>>,
    providers: Option<mpsc::UnboundedReceiver<ProviderRef>>,
}

impl Triggers {
    pub(crate) fn new() -> Self {
        let (masks, mask_rx) = mpsc::unbounded();
        let (providers, provider_rx) = mpsc::unbounded();
        Self {
            masks,
            providers,
            receivers: Arc::new(Mutex::new(Receivers {
                masks: Some(mask_rx),
                providers: Some(provider_rx),
            })),
        }
    }

    pub(crate) fn masks(&self) -> impl Stream<Item = MaskRef> + Send + 'static {
        let rx = self
            .receivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .masks
            .take();
        futures::stream::iter(rx).flatten()
    }

    pub(crate) fn providers(&self) -> impl Stream<Item = ProviderRef> + Send + 'static {
        let rx = self
            .receivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .providers
            .take();
        futures::stream::iter(rx).flatten()
    }

    fn mask(&self, namespace: &str, name: &str) {
        let _ = self
            .masks
            .unbounded_send(ObjectRef::new(name).within(namespace));
    }

    pub(crate) fn provider(&self, namespace: &str, name: &str) {
        let _ = self
            .providers
            .unbounded_send(ObjectRef::new(name).within(namespace));
    }
}

/// Masks that hold no slot (waiting for one), to wake when a slot or a provider appears.
pub(crate) fn waiting_masks(ctx: &Context) -> Vec<MaskRef> {
    ctx.masks
        .state()
        .iter()
        .filter(|m| match &m.0 {
            Ok(mask) => mask
                .status
                .as_ref()
                .and_then(|s| s.provider.as_ref())
                .is_none(),
            Err(_) => false,
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// Masks holding a slot of the provider with this uid.
pub(crate) fn masks_of_provider(ctx: &Context, provider_uid: &str) -> Vec<MaskRef> {
    ctx.masks
        .state()
        .iter()
        .filter(|m| {
            m.0.as_ref().is_ok_and(|mask| {
                mask.status
                    .as_ref()
                    .and_then(|s| s.provider.as_ref())
                    .is_some_and(|p| p.uid == provider_uid)
            })
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// Turns the provider watch's events into requests for masks. A provider appearing, changing or
/// going away concerns the masks waiting for a slot and the masks holding one of its slots. Masks
/// care about a provider's spec, usability and deletion, not its status counters: a provider's
/// activeSlots changes with every lease, and waking every waiting mask and every holder on each
/// of those writes made leasing quadratic.
pub(crate) struct ProviderChanges {
    ctx: Arc<Context>,
    triggers: Triggers,
    /// Per provider: generation, usable, deleting, and its server list's version (a new list
    /// rewrites its masks' credential copies).
    last_seen: HashMap<String, (Option<i64>, bool, bool, Option<String>)>,
}

impl ProviderChanges {
    pub(crate) fn new(ctx: Arc<Context>, triggers: Triggers) -> Self {
        Self {
            ctx,
            triggers,
            last_seen: HashMap::new(),
        }
    }

    /// One event of the provider watch (after the store has taken it in).
    pub(crate) fn on(&mut self, event: &watcher::Event<DeserializeGuard<VpnProvider>>) {
        let (provider, gone) = match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => (p, false),
            watcher::Event::Delete(p) => (p, true),
            _ => return,
        };
        let uid = provider.uid().unwrap_or_default();
        let changed = if gone {
            // Also when the deleting state was seen before: a mask that recorded a slot of
            // this provider since then was not woken by it.
            self.last_seen.remove(&uid);
            true
        } else {
            let state = match &provider.0 {
                Ok(p) => (
                    p.meta().generation,
                    provider::usable(p),
                    p.meta().deletion_timestamp.is_some(),
                    p.status
                        .as_ref()
                        .and_then(|s| s.server_list.as_ref())
                        .map(|l| l.source.clone()),
                ),
                Err(_) => (None, false, false, None),
            };
            self.last_seen.insert(uid.clone(), state.clone()) != Some(state)
        };
        if changed {
            let mut refs = waiting_masks(&self.ctx);
            refs.extend(masks_of_provider(&self.ctx, &uid));
            for mask in refs {
                let _ = self.triggers.masks.unbounded_send(mask);
            }
        }
    }
}

/// The watches [`feed`] turns into reconcile requests.
pub(crate) struct Streams<L, O, S> {
    pub leases: L,
    pub pods: O,
    pub secrets: S,
}

/// Turns lease, pod and Secret changes into reconcile requests, for as long as the watches run.
/// (Provider changes come through [`ProviderChanges`], on the provider controller's own watch.)
pub(crate) async fn feed(
    ctx: Arc<Context>,
    triggers: Triggers,
    streams: Streams<
        impl Stream<Item = Result<watcher::Event<PartialObjectMeta<Lease>>, watcher::Error>> + Send,
        impl Stream<Item = Result<PartialObjectMeta<Pod>, watcher::Error>> + Send,
        impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send,
    >,
) {
    let Streams {
        leases,
        pods,
        secrets,
    } = streams;
    let on_lease = leases.for_each(|event| {
        let (lease, freed) = match event {
            Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => (lease, false),
            Ok(watcher::Event::Delete(lease)) => (lease, true),
            _ => return futures::future::ready(()),
        };
        if let Some((ns, name)) = lease
            .annotations()
            .get(labels::MASK)
            .and_then(|m| m.split_once('/'))
        {
            triggers.mask(ns, name);
        }
        if let (Some(ns), Some(provider)) =
            (lease.namespace(), lease.labels().get(labels::PROVIDER))
        {
            triggers.provider(&ns, provider);
        }
        if freed {
            // A freed slot may be what a waiting mask needs.
            for mask in waiting_masks(&ctx) {
                let _ = triggers.masks.unbounded_send(mask);
            }
        }
        futures::future::ready(())
    });
    let on_pod = pods.for_each(|pod| {
        if let Ok(pod) = pod {
            let ns = pod.namespace().unwrap_or_default();
            for owner in pod
                .owner_references()
                .iter()
                .filter(|o| o.kind == VpnMask::kind(&()))
            {
                triggers.mask(&ns, &owner.name);
            }
            if let Some(provider) = pod.labels().get(cloak_model::verify::LABEL_PROVIDER) {
                triggers.provider(&ns, provider);
            }
        }
        futures::future::ready(())
    });
    let on_secret = secrets.for_each(|secret| {
        if let Ok(secret) = secret {
            let (ns, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
            // A credentials copy changed or was deleted: its mask puts it back.
            for owner in secret
                .owner_references()
                .iter()
                .filter(|o| o.kind == VpnMask::kind(&()))
            {
                triggers.mask(&ns, &owner.name);
            }
            for provider in ctx.providers.state() {
                let Ok(p) = &provider.0 else { continue };
                if p.namespace().as_deref() == Some(ns.as_str()) && p.spec.secret == name {
                    triggers.provider(&ns, &p.name_any());
                    for mask in masks_of_provider(&ctx, &p.uid().unwrap_or_default()) {
                        let _ = triggers.masks.unbounded_send(mask);
                    }
                }
            }
        }
        futures::future::ready(())
    });
    tokio::join!(on_lease, on_pod, on_secret);
}

/// Runs a controller (the mask's or the provider's) with its extra reconcile requests
/// (`triggers`) until `stop` turns true, failures going through [`error_policy`].
pub(crate) async fn run<K, Fut>(
    controller: kube::runtime::Controller<K>,
    reconcile: impl FnMut(Arc<K>, Arc<Context>) -> Fut,
    ctx: Arc<Context>,
    triggers: impl Stream<Item = ObjectRef<K>> + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    K: Clone
        + Resource<DynamicType = ()>
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    Fut: futures::TryFuture<Ok = kube::runtime::controller::Action, Error = Error> + Send + 'static,
{
    controller
        .reconcile_on(triggers)
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Publishes an Event about `object`. Failures are logged, never fatal: Events are advisory.
pub(crate) async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_about(ctx, &object.object_ref(&()), type_, reason, note).await;
}

/// [`publish`] for an object known only by reference (one that could not be deserialized).
async fn publish_about(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, reason, "publishing an event failed");
    }
}

/// Reports an object that cannot be read as its type (the API server accepted something the
/// Rust type refuses): an Event and `status.message` on the object, and an error that waits for
/// the object to change. The other objects keep reconciling.
pub(crate) async fn report_invalid<K>(
    ctx: &Context,
    invalid: &kube::core::error_boundary::InvalidObject,
) -> Error
where
    K: Resource<DynamicType = ()>,
{
    let meta = &invalid.metadata;
    let kind = K::kind(&());
    let message = format!("invalid {kind}: {}", invalid.error);
    tracing::warn!(name = ?meta.name, namespace = ?meta.namespace, %message);
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(kind.clone().into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        ..Default::default()
    };
    publish_about(
        ctx,
        &reference,
        EventType::Warning,
        "InvalidSpec",
        message.clone(),
    )
    .await;
    let resource = kube::api::ApiResource::erase::<K>(&());
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        ctx.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
        &resource,
    );
    let patch = serde_json::json!({"status": {"message": message}});
    if let Err(e) = api
        .patch_status(
            meta.name.as_deref().unwrap_or_default(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        tracing::warn!(error = %e, "writing the status of an invalid object failed");
    }
    Error::Invalid(message)
}

/// `namespace/name`, what a reconcile's span is named after.
pub(crate) fn object_name(object: &impl ResourceExt) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// The reconcile every controller runs: report an unreadable object, otherwise hand the object
/// to `apply` or, once it is being deleted, to `cleanup` (behind the finalizer); record metrics.
pub(crate) async fn reconcile_guarded<K>(
    guard: &DeserializeGuard<K>,
    ctx: &Context,
    controller: &'static str,
    apply: impl AsyncFn(&K, &Context) -> Result<Action, Error>,
    cleanup: impl AsyncFn(&K, &Context) -> Result<Action, Error>,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let reference = ObjectRef::from_obj(guard).erase();
    let result = measured(ctx, controller, async {
        let object = match &guard.0 {
            Ok(object) => Arc::new(object.clone()),
            Err(invalid) => return Err(report_invalid::<K>(ctx, invalid).await),
        };
        let api: kube::Api<K> =
            kube::Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
        kube::runtime::finalizer::finalizer(&api, crate::FINALIZER, object, |event| async {
            match event {
                kube::runtime::finalizer::Event::Apply(object) => apply(&object, ctx).await,
                kube::runtime::finalizer::Event::Cleanup(object) => cleanup(&object, ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await;
    if result.is_ok() {
        ctx.retries.succeeded(&reference);
    }
    result
}

/// The error policy of every controller: per-object backoff, and a rate-limited Warning Event
/// named by the error's category ([`retry`]). (The controller runtime hands the object over by
/// value.)
#[allow(clippy::needless_pass_by_value)]
pub(crate) fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    let reference = ObjectRef::from_obj(object.as_ref()).erase();
    let decision = ctx
        .retries
        .failed(reference.clone(), error, std::time::Instant::now());
    if matches!(error.root(), Error::Waiting(_)) {
        tracing::debug!(object = %reference, %error, "reconcile waits");
    } else {
        tracing::warn!(object = %reference, %error, next = ?decision.action, "reconcile failed");
    }
    if decision.event {
        let (reason, note) = (error.category(), error.to_string());
        let about = object.object_ref(&());
        tokio::spawn(async move {
            publish_about(&ctx, &about, EventType::Warning, reason, note).await;
        });
    }
    decision.action
}

/// Runs one reconcile and records its outcome and duration.
pub(crate) async fn measured<F: Future<Output = Result<Action, Error>>>(
    ctx: &Context,
    controller: &'static str,
    reconcile: F,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile.await;
    let metrics = &ctx.metrics;
    metrics
        .reconcile_duration
        .get_or_create(&crate::metrics::ControllerLabels { controller })
        .observe(started.elapsed().as_secs_f64());
    let outcome = if result.is_ok() { "success" } else { "error" };
    metrics
        .reconciles
        .get_or_create(&ReconcileLabels {
            controller,
            outcome,
        })
        .inc();
    if let Err(e) = &result {
        metrics
            .errors
            .get_or_create(&crate::metrics::ErrorLabels {
                controller,
                category: e.category(),
            })
            .inc();
    }
    result
}

/// The `Ready` condition of a mask or provider in `phase`, reason the phase's name.
pub(crate) fn ready_condition(
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ready: bool,
    phase: impl std::fmt::Debug,
    message: &str,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    condition(
        previous,
        "Ready",
        ready,
        &format!("{phase:?}"),
        message,
        generation,
    )
}

/// A standard condition, its transition time kept when its status did not change.
pub(crate) fn condition(
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(
            || Time(k8s_openapi::jiff::Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation: generation,
    }
}
