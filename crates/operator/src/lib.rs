#![allow(clippy::large_futures)] // reconcile futures are boxed by the controller runtime anyway

//! `cloak operator`: the VpnProvider, VpnMask and VpnGateway controllers, leader election and the admin server.
//!
//! Owns every call to the Kubernetes API the control plane makes. Decisions (which slot, which
//! phase, what a verification pod looks like) come from `cloak-model`; this crate reads what they
//! need, applies what they return and writes status.
//!
//! Slot safety: a slot is held by a `Lease` named `cloak-slot-<provider>-<i>` (i < maxSlots) in
//! the provider's namespace, created with a plain create. The API server creates a name at most
//! once, so at most maxSlots reservations can exist per provider whatever the number of racing
//! reconciles, replicas or restarts. See docs/architecture.md.

pub mod admin;
mod controllers;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod migrate;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cloak_api::{VpnMask, VpnProvider};
use futures::StreamExt as _;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Pod, Secret},
};
use kube::{
    Api, Client,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        WatchStreamExt,
        events::Reporter,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;

pub use error::{Error, Result};

/// Labels and annotations on the objects the operator creates.
pub mod labels {
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGER: &str = "cloak";
    pub const PROVIDER: &str = "cloak.dev/provider";
    pub const PROVIDER_UID: &str = "cloak.dev/provider-uid";
    pub const MASK_UID: &str = "cloak.dev/mask-uid";
    pub const SLOT: &str = "cloak.dev/slot";
    /// On slot leases: `<namespace>/<name>` of the holding mask.
    pub const MASK: &str = "cloak.dev/mask";
    /// On credential copies: `<uid>/<resourceVersion>` of the Secret they copy.
    pub const SOURCE_VERSION: &str = "cloak.dev/source-version";
}

/// The field manager of every server-side apply and the finalizer's prefix.
pub const MANAGER: &str = "cloak-operator";
pub const FINALIZER: &str = "cloak.dev/slot";

/// Settings of one operator instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// Identity in leader election and Events (the pod name in a cluster).
    pub instance: String,
    /// Where the admin server listens (`/livez`, `/readyz`, `/metrics`); None: no server.
    pub admin_addr: Option<SocketAddr>,
    /// Leader election Lease (namespace, name); None: act without electing (tests of racing).
    pub leader_lease: Option<(String, String)>,
    /// URL answering with the caller's public address, used by verification pods.
    pub verify_ip_url: String,
    /// The image of `cloak` itself: verification pods of native credentials run
    /// `cloak agent verify` from it (the chart passes the operator's own image).
    pub agent_image: String,
    /// Safety-net requeue of waiting masks (event-driven otherwise).
    pub waiting_requeue: Duration,
    /// The cluster's pod and service ranges: what a gateway's `spec.intranet` defaults to, and
    /// what its exits reach outside their tunnels (the kubelet's probes come from there).
    pub intranet: Vec<cloak_api::Cidr>,
    /// Safety-net requeue of masks holding a slot: a missed event (a provider deleted while
    /// the mask's assignment was still being recorded) is noticed within this time.
    pub holder_resync: Duration,
    /// The port of an exit agent's admin server, asked for the exit's public address
    /// (`cloak_model::exit::STATUS_PATH` on the pod's address). None: not asked.
    pub exit_admin_port: Option<u16>,
    /// The pod network's MTU between nodes: the links to the exits wrap client packets in
    /// VXLAN inside it, so `mtu: auto` leaves room for that.
    pub pod_network_mtu: u16,
    /// Fetch `serverList.url`s over plain `http://` too (tests, a mirror inside the cluster).
    /// Off: only `https://`, since whoever can answer a plain request could hand out server
    /// endpoints and keys.
    pub allow_http_server_lists: bool,
    /// A file holding the cluster's metrics reader token (a mounted Secret: read again at each
    /// gateway reconcile, so a new token reaches the exits). Exits are given its SHA-256 and
    /// let whoever sends the token read their `/metrics`. None: only the operator reads them
    /// (with each gateway's admin token).
    pub metrics_token_file: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: "cloak-operator".into(),
            admin_addr: None,
            leader_lease: None,
            verify_ip_url: "http://ifconfig.me/ip".into(),
            agent_image: "ghcr.io/cloak-dev/cloak:latest".into(),
            waiting_requeue: Duration::from_mins(1),
            intranet: Vec::new(),
            holder_resync: Duration::from_mins(5),
            exit_admin_port: Some(cloak_model::exit::ADMIN_PORT),
            pod_network_mtu: 1500,
            allow_http_server_lists: false,
            metrics_token_file: None,
        }
    }
}

/// A Secret's keys and bytes, as the credentials parser takes them: `data`, and `stringData`
/// (which only a Secret read from a file carries; the API server folds it into `data`).
pub(crate) fn secret_bytes(secret: &Secret) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut bytes: std::collections::BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        bytes.insert(k.clone(), v.clone().into_bytes());
    }
    bytes
}

/// Everything reconcilers share: the client, the caches, metrics.
#[derive(Clone)]
pub(crate) struct Context {
    pub client: Client,
    pub config: Config,
    pub reporter: Reporter,
    pub metrics: Arc<metrics::Metrics>,
    pub providers: Store<DeserializeGuard<VpnProvider>>,
    pub masks: Store<DeserializeGuard<VpnMask>>,
    pub leases: Store<PartialObjectMeta<Lease>>,
    pub pods: Store<PartialObjectMeta<Pod>>,
    /// Secret metadata: tells whether a mask's copy is current without reading any Secret.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// Failing objects: their backoff and when their errors were last told as Events.
    pub retries: Arc<controllers::retry::Retries>,
    /// The gateway controller's cache, once it runs (the metrics read it).
    pub gateways: Arc<std::sync::OnceLock<Store<DeserializeGuard<cloak_api::VpnGateway>>>>,
    /// The chain controller's cache, once it runs (the metrics read it).
    pub chains: Arc<std::sync::OnceLock<Store<DeserializeGuard<cloak_api::VpnChain>>>>,
    /// Held while a gateway's new exit picks its VXLAN identifier.
    pub vni_lock: Arc<tokio::sync::Mutex<()>>,
    /// Per provider uid: its server list's last fetch (which URL and section, when, and why it
    /// failed if it did).
    pub fetches: Arc<
        std::sync::Mutex<
            std::collections::HashMap<String, controllers::provider::serverlist::Fetch>,
        >,
    >,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("instance", &self.config.instance)
            .finish_non_exhaustive()
    }
}

/// Drops what the controllers never read from cached objects: managedFields and kubectl's
/// last-applied copy are often larger than the rest of the object, and every cache holds one
/// per object (10,000 masks, as many leases and credential copies).
pub(crate) fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// What the caches keep of an object the controllers only look up or count (slot Leases, Pods,
/// Secrets, masks): its identity, its owners of `owner_kind` (all when `None`), its deletion,
/// and only the labels and annotations named (all labels when `labels` is `None`). A Pod in a
/// real cluster carries kilobytes of annotations the operator never reads, and it watches every
/// Pod and Secret of the cluster.
pub(crate) fn keep_only<K: kube::Resource>(
    object: &mut K,
    labels: Option<&[&str]>,
    annotations: &[&str],
    owner_kind: Option<&str>,
) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.creation_timestamp = None;
    meta.generate_name = None;
    meta.self_link = None;
    let keep = |map: &mut Option<std::collections::BTreeMap<String, String>>, names: &[&str]| {
        if let Some(m) = map.as_mut() {
            m.retain(|k, _| names.contains(&k.as_str()));
            if m.is_empty() {
                *map = None;
            }
        }
    };
    if let Some(names) = labels {
        keep(&mut meta.labels, names);
    }
    keep(&mut meta.annotations, annotations);
    if let (Some(kind), Some(owners)) = (owner_kind, meta.owner_references.as_mut()) {
        owners.retain(|o| o.kind == kind);
    }
}

/// Readiness as the admin server reports it: a leader is ready once its caches are synced; a
/// standby is ready while the API server answers its election attempts, because it could serve
/// as soon as it is elected. (A rolling update waits for every replica's readiness: a standby
/// that waited for leadership would never become Ready.) Leadership itself is reported apart,
/// by the `cloak_leader` gauge and the Lease.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// The leader's caches are synced.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Standing by, and the last election attempt reached the API server.
    pub standby: Arc<std::sync::atomic::AtomicBool>,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.ready.load(Relaxed) || self.standby.load(Relaxed)
    }
}

/// Runs the operator until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = metrics::Metrics::new();
    let health = Health::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };

    // The store the mask controller allocates from and the stream that wakes waiting masks come
    // from one watch: a mask woken by a provider change then always sees that change.
    let (providers, provider_writer) = reflector::store();
    let (leases, lease_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    let (secrets, secret_writer) = reflector::store();
    // Reconcile requests for both controllers; the mask watch feeds the provider controller too.
    let triggers = controllers::Triggers::new();
    let mask_controller = controllers::mask::controller(&client, triggers.clone());
    let ctx = Arc::new(Context {
        client: client.clone(),
        reporter: Reporter {
            controller: MANAGER.into(),
            instance: Some(config.instance.clone()),
        },
        config: config.clone(),
        metrics: metrics.clone(),
        providers,
        masks: mask_controller.store(),
        leases,
        pods,
        secrets,
        retries: Arc::default(),
        vni_lock: Arc::default(),
        fetches: Arc::default(),
        gateways: Arc::default(),
        chains: Arc::default(),
    });

    if let Some(addr) = config.admin_addr
        && let Err(e) = admin::spawn(addr, metrics.clone(), health.clone(), ctx.clone()).await
    {
        tracing::error!(error = %e, %addr, "the admin server cannot listen");
    }

    let mut leadership = match &config.leader_lease {
        Some((ns, name)) => {
            let mut stop = stop_rx.clone();
            let standby = health.standby.clone();
            let on_attempt = move |reached: bool| {
                standby.store(reached, std::sync::atomic::Ordering::Relaxed);
            };
            tokio::select! {
                lease = leader::acquire(client.clone(), ns, name, &config.instance, on_attempt) => Some(lease?),
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
        None => None,
    };
    // Until the caches are synced, the new leader is not ready.
    health
        .standby
        .store(false, std::sync::atomic::Ordering::Relaxed);
    metrics.leader.set(1);
    tracing::info!(instance = %config.instance, "acting as leader");

    // Slot leases, pods and secrets are watched once, as metadata only, and turned into
    // reconcile requests for both controllers.
    let slot_selector = format!("{}={}", labels::MANAGED_BY, labels::MANAGER);
    // Raw events, not touched objects: a deleted reservation (a freed slot) wakes waiting masks.
    let lease_stream = reflector::reflector(
        lease_writer,
        watcher(
            Api::<PartialObjectMeta<Lease>>::all(client.clone()),
            watcher::Config::default().labels(&slot_selector),
        )
        .modify(|lease| keep_only(lease, None, &[labels::MASK], None)),
    )
    .default_backoff();
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|pod| {
            let kind = <VpnMask as kube::Resource>::kind(&());
            keep_only(
                pod,
                Some(&[cloak_model::verify::LABEL_PROVIDER]),
                &[],
                Some(&kind),
            );
        }),
    )
    .default_backoff()
    .touched_objects();
    let secret_stream = reflector::reflector(
        secret_writer,
        watcher(
            Api::<PartialObjectMeta<Secret>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|secret| {
            let kind = <VpnMask as kube::Resource>::kind(&());
            keep_only(
                secret,
                Some(&[]),
                &[
                    labels::SOURCE_VERSION,
                    cloak_model::exit::ANNOTATION_METRICS_HASH,
                ],
                Some(&kind),
            );
        }),
    )
    .default_backoff()
    .touched_objects();
    // One watch of providers: its store is the mask controller's allocation cache, its events
    // wake masks (ProviderChanges) and drive the provider controller.
    let mut provider_changes = controllers::ProviderChanges::new(ctx.clone(), triggers.clone());
    let provider_stream = reflector::reflector(
        provider_writer,
        watcher(
            Api::<DeserializeGuard<VpnProvider>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(slim),
    )
    .default_backoff()
    // Raw events first: a provider's final deletion wakes the masks that held its slots.
    .inspect(move |event| {
        if let Ok(event) = event {
            provider_changes.on(event);
        }
    })
    .applied_objects();
    let provider_controller =
        controllers::provider::controller(provider_stream, ctx.providers.clone());
    let feed = controllers::feed(
        ctx.clone(),
        triggers.clone(),
        controllers::Streams {
            leases: lease_stream,
            pods: pod_stream,
            secrets: secret_stream,
        },
    );

    let readiness = {
        let (ctx, ready) = (ctx.clone(), health.ready.clone());
        async move {
            let _ = tokio::join!(
                ctx.providers.wait_until_ready(),
                ctx.masks.wait_until_ready(),
                ctx.leases.wait_until_ready(),
                ctx.pods.wait_until_ready(),
                ctx.secrets.wait_until_ready(),
            );
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("caches synced");
            futures::future::pending::<()>().await;
        }
    };
    let masks = controllers::run(
        mask_controller,
        controllers::mask::reconcile,
        ctx.clone(),
        triggers.masks(),
        stop_rx.clone(),
    );
    // Besides its own watch, a provider is reconciled when a mask holding one of its slots
    // changed or went away (it recounts and sweeps orphans), and when its verification's mask or
    // pod changed: those requests come with `triggers`.
    let providers = controllers::run(
        provider_controller,
        controllers::provider::reconcile,
        ctx.clone(),
        triggers.providers(),
        stop_rx.clone(),
    );
    let gateways = controllers::gateway::run(ctx.clone(), stop_rx.clone());
    let chains = controllers::chain::run(ctx.clone(), stop_rx.clone());
    let lost = async {
        match leadership.as_mut() {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = stopped => {},
        () = feed => {},
        () = readiness => {},
        () = async { tokio::join!(masks, providers, gateways, chains); } => {},
        reason = lost => {
            metrics.leader.set(0);
            return Err(Error::LeadershipLost(reason));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use kube::{ResourceExt as _, core::PartialObjectMeta};

    use super::*;

    #[test]
    fn caches_keep_only_the_named_labels_annotations_and_owners() {
        let owner = |kind: &str| OwnerReference {
            kind: kind.into(),
            name: "m".into(),
            uid: "u".into(),
            ..OwnerReference::default()
        };
        let mut pod = PartialObjectMeta::<Pod> {
            metadata: ObjectMeta {
                name: Some("p".into()),
                uid: Some("1".into()),
                labels: Some([("app".into(), "x".into()), ("keep".into(), "y".into())].into()),
                annotations: Some([("big".into(), "z".repeat(4096))].into()),
                owner_references: Some(vec![owner("VpnMask"), owner("ReplicaSet")]),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        };
        keep_only(&mut pod, Some(&["keep"]), &[], Some("VpnMask"));
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert_eq!(pod.metadata.uid.as_deref(), Some("1"));
        assert_eq!(pod.labels().keys().collect::<Vec<_>>(), ["keep"]);
        assert_eq!(pod.metadata.annotations, None);
        assert_eq!(pod.owner_references(), [owner("VpnMask")]);
        // `None`: every label and owner stays.
        let mut lease = PartialObjectMeta::<Lease> {
            metadata: ObjectMeta {
                labels: Some([("a".into(), "b".into())].into()),
                owner_references: Some(vec![owner("VpnProvider")]),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        };
        keep_only(&mut lease, None, &[], None);
        assert_eq!(lease.labels().len(), 1);
        assert_eq!(lease.owner_references().len(), 1);
    }
}
