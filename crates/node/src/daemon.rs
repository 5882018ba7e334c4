//! `cloak node`: the node daemon. It answers the CNI plugin (attach a client pod: a veth to the
//! node, routes and a kill switch in the pod's namespace), keeps the node's links to the exits
//! of every gateway that has clients here (`dataplane::gateway::NodePlan`), probes each exit
//! through its link and moves new flows off an exit the moment it stops answering, resetting
//! its flows so they do not hang.
//!
//! Everything it programs lives in the kernel, which keeps forwarding while the daemon is down
//! or restarting; its clients are also written to a state file, read back at start (a client
//! whose interface is gone is forgotten).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use cloak_api::{ExitHealth, VpnGateway};
use cloak_dataplane::{
    dnsforward,
    gateway::{
        CLIENT_GATEWAY, ClientPlan, ClientPort, ExitLink, ExitUse, NodePlan, link_exists,
        remove_client, reset_flows,
    },
    guard::{self, Guard},
};
use futures::{FutureExt as _, StreamExt as _};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    core::DeserializeGuard,
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        reflector, watcher,
    },
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    sync::oneshot,
};

use cloak_model::clients::{Choice, choose};

use crate::attach::{self, Step, Want};
use crate::cni::{Command, Guarded, Reply, Request};
use crate::metrics::{
    ExitLabels, ExitState, FailoverLabels, FailoverReason, GatewayLabels, Metrics, Outcome,
    OutcomeLabels, ResetLabels, ResetReason,
};
use crate::probe::Answer;
use crate::sandbox::{NamespaceId, fd_path, find_pod_netns, in_sandbox, namespace_id};

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    /// Where the CNI plugin finds the daemon.
    pub socket: PathBuf,
    /// Where the clients are remembered across restarts.
    pub state_dir: PathBuf,
    /// The cluster's pod and service ranges: a gateway's intranet unless it names its own.
    pub intranet: Vec<IpNet>,
    /// The node's own address on its links to the exits, unique among the nodes.
    pub transit: Ipv4Addr,
    /// The node's IPv4 address (the chart passes the pod's `status.hostIP`): one of the nodes'
    /// addresses no pod may send VXLAN to, also before the Node objects are listed.
    pub node_ip: Ipv4Addr,
    /// The network namespace the node's side lives in (a path); None: this process's. (Tests
    /// and labs whose node is a namespace of its own.)
    pub netns: Option<PathBuf>,
    /// Probe round length: an exit that misses `probe_misses` rounds in a row is dead.
    pub probe_interval: Duration,
    pub probe_misses: u32,
    /// Where the admin server listens (`/livez`, `/readyz` once the node's plan is applied,
    /// `/metrics`); None: no server.
    pub admin_addr: Option<std::net::SocketAddr>,
}

/// One attached client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Attached {
    pod_namespace: String,
    pod_name: String,
    gateway: String,
    iface: String,
    address: Ipv4Addr,
}

/// What the probes have seen of an exit lately: `up` is None until it answered once or missed
/// `probe_misses` in a row (until then the gateway's status decides); `draining` when its last
/// answer said it takes no new flows; `ipv6` when it said its tunnel carries IPv6.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    up: Option<bool>,
    misses: u32,
    draining: bool,
    ipv6: bool,
}

/// What survives a restart: the clients, and the numbers that established flows carry in their
/// conntrack marks (a slot renumbered at restart would move them to another exit).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    #[serde(default)]
    clients: BTreeMap<String, Attached>,
    /// `namespace/name` → node-local gateway number.
    #[serde(default)]
    gateway_ids: BTreeMap<String, u16>,
    #[serde(default)]
    slots: BTreeMap<u32, u8>,
    #[serde(default)]
    ports: BTreeMap<String, SandboxPort>,
    #[serde(default)]
    sandboxes: BTreeMap<String, Sandbox>,
    #[serde(default)]
    cut_off: BTreeMap<String, String>,
}

/// A pod sandbox the plugin told the daemon of at its ADD (client or not): what the daemon needs
/// to attach it, detach it or cut it off while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sandbox {
    namespace: String,
    name: String,
    /// The pod's UID: a pod of the same name made anew is another pod.
    uid: String,
    /// The identity of its network namespace, once known: what a handle opened again (after a
    /// restart) must match.
    #[serde(default)]
    netns: Option<NamespaceId>,
}

/// The host side of a sandbox's interface and its address, as read in the sandbox's own
/// namespace at its ADD: recorded for pods labelled as exits, and used only for an exit the
/// operator's status puts on this node at that address (a label is the tenant's; the status and
/// the sandbox's own veth are not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SandboxPort {
    port: String,
    address: Ipv4Addr,
}

#[derive(Debug, Default)]
struct State {
    /// Exits' sandbox interfaces, by container id.
    ports: BTreeMap<String, SandboxPort>,
    /// By container id.
    clients: BTreeMap<String, Attached>,
    /// Every sandbox the plugin told of, by container id (or `pod-<uid>` for a pod found
    /// running that the plugin never told of).
    sandboxes: BTreeMap<String, Sandbox>,
    /// Sandboxes whose pod is to be a client and cannot be: only the kill switch is in them.
    /// By container id, with why.
    cut_off: BTreeMap<String, String>,
    /// Node-local numbers of the gateways with clients here, `(namespace, name)`.
    gateway_ids: BTreeMap<(String, String), u16>,
    /// Node-local slots of the exits linked, by VNI.
    slots: BTreeMap<u32, u8>,
    /// Probe results by VNI.
    seen: BTreeMap<u32, Seen>,
    applied: Option<NodePlan>,
    /// The node's table as listed right after `applied` was applied: what a recheck compares.
    listed: Option<String>,
    /// Applies that failed in a row, and when the next try is due (backoff).
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
    /// Drifts repaired (a table changed or gone under the daemon).
    drifts: u64,
    /// Exits' interfaces found in the bridge's tables (for exits whose ADD the daemon did not
    /// see), by address; forgotten when the interface goes.
    found_ports: BTreeMap<Ipv4Addr, String>,
    /// The guard as last loaded whole (None: load it again).
    guarded: Option<Guard>,
    /// Whether a guard was ever loaded: no client is attached before.
    guard_loaded: bool,
}

/// The daemon's shared parts.
struct Daemon {
    options: Options,
    client: Client,
    /// Every gateway, readable or not: one that serde refuses (written before the schema
    /// checked as much) is skipped, never a reason to stop.
    gateways: reflector::Store<DeserializeGuard<VpnGateway>>,
    /// Every node: their addresses are the guard's.
    nodes: reflector::Store<Node>,
    /// The pods on this node: whether each is a client is asked again when one changes.
    pods: reflector::Store<Pod>,
    /// One sweep at a time ([`Daemon::sweep`]).
    sweeping: tokio::sync::Mutex<()>,
    /// The hostNetwork pods told they cannot be clients (by UID), so they are told once.
    told_host_network: Mutex<std::collections::BTreeSet<String>>,
    /// The sandboxes' network namespaces, held open by sandbox key: the plugin's path to one is
    /// good only during its call. Not saved: after a restart a sandbox's namespace is found
    /// again by its pod's UID ([`find_pod_netns`]). Dropped at DEL (a held namespace outlives
    /// its pod).
    netns: Mutex<BTreeMap<String, std::fs::File>>,
    /// Set whenever a sweep is asked for; the running sweep goes round again while it is set.
    sweep_asked: std::sync::atomic::AtomicBool,
    /// Events on pods (one recorder: repeated Events are counted, not duplicated).
    recorder: Recorder,
    /// The namespaces that hold a gateway, as last written for the plugin.
    guarded: std::sync::Mutex<Option<Guarded>>,
    /// Each client's cluster domains, by its address ([`cluster_domains`]).
    domains: Arc<Mutex<BTreeMap<std::net::IpAddr, Vec<String>>>>,
    state: tokio::sync::Mutex<State>,
    kernel: Kernel,
    /// The exits to probe (VNI → slot), as the last applied plan has them.
    targets: Arc<Mutex<BTreeMap<u32, u8>>>,
    metrics: Arc<Metrics>,
    /// Whether the node's plan is applied now (`/readyz`).
    plan_applied: Arc<std::sync::atomic::AtomicBool>,
}

/// Kernel work runs on one thread inside the node's namespace, in order.
#[derive(Clone)]
struct Kernel {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Kernel {
    fn start(netns: Option<PathBuf>) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("cloak-node-kernel".into())
            .spawn(move || {
                let entered = enter(netns.as_ref());
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("kernel thread ended"))??;
        Ok(Self { jobs })
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = oneshot::channel();
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = tx.send(f());
        });
        if self.jobs.send(job).is_err() {
            // The kernel thread is the daemon's life: without it nothing can be programmed.
            tracing::error!("the kernel thread is gone; stopping");
            std::process::exit(1);
        }
        let Ok(value) = rx.await else {
            tracing::error!("a kernel job panicked; stopping");
            std::process::exit(1);
        };
        value
    }
}

/// Keeps `writer`'s store a mirror of `api`'s objects, running `changed` after every event, the
/// end of a (re)list included (the store is complete only then); retries with backoff.
async fn mirror<K, F>(
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
    changed: impl Fn() -> F,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    F: Future<Output = ()>,
{
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        if event.is_ok() {
            changed().await;
        }
    }
}

/// How long a liveness check waits for the kernel thread: longer than a tool may take.
const LIVE_WITHIN: Duration = Duration::from_secs(15);

/// How often the guard is loaded again and the node's table read back ([`Daemon::recheck`]).
const RECHECK: Duration = Duration::from_secs(5);
/// The first wait before a failed apply is tried again (doubled at each failure).
const PROBE_ROUND_FLOOR: Duration = Duration::from_millis(100);
/// The longest wait before a failed apply is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Takes a client's end off the node: its veth, and the node's flows from its address (a
/// client given that address later must not find them, marks and all).
fn remove_client_end(iface: &str, address: Ipv4Addr) -> Result<(), String> {
    remove_client(iface).map_err(|e| e.to_string())?;
    cloak_dataplane::gateway::forget_client_flows(address)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Moves the calling thread into the network namespace at `path` (no-op for None).
fn enter(path: Option<&PathBuf>) -> std::io::Result<()> {
    if let Some(path) = path {
        let file = std::fs::File::open(path)?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    Ok(())
}

/// Runs the daemon until `shutdown`. Leaves everything in the kernel as it is: established
/// flows survive a restart, and nothing of a client's leaks while the daemon is away.
pub async fn run(
    client: Client,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(&options.state_dir)?;
    if let Some(dir) = options.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&options.socket);
    let listener = UnixListener::bind(&options.socket)?;
    let kernel = Kernel::start(options.netns.clone())?;

    let (gateways, writer) = reflector::store();
    let (nodes, node_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    let daemon = Arc::new(Daemon {
        nodes,
        pods,
        sweeping: tokio::sync::Mutex::new(()),
        told_host_network: Mutex::default(),
        netns: Mutex::default(),
        sweep_asked: std::sync::atomic::AtomicBool::new(false),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "cloak-node".into(),
                instance: Some(options.node_name.clone()),
            },
        ),
        state: tokio::sync::Mutex::new(load_state(&options)),
        options,
        client: client.clone(),
        gateways,
        guarded: std::sync::Mutex::new(None),
        domains: Arc::default(),
        kernel,
        targets: Arc::default(),
        metrics: Arc::new(Metrics::new()),
        plan_applied: Arc::default(),
    });
    daemon.forget_vanished().await;
    if let Some(addr) = daemon.options.admin_addr {
        let (scraped, applied) = (daemon.clone(), daemon.plan_applied.clone());
        cloak_admin::Admin::new_async(move |_| {
            let daemon = scraped.clone();
            async move {
                daemon.refresh_gauges().await;
                daemon.metrics.encode()
            }
        })
        .ready(move |_| {
            if applied.load(std::sync::atomic::Ordering::Relaxed) {
                Ok("the node's plan is applied".into())
            } else {
                Err("the node's plan is not applied yet (or its last apply failed)".into())
            }
        })
        .spawn(addr)
        .await?;
    }

    // Gateways (their exits and health) drive the plan.
    let watch = {
        let daemon = daemon.clone();
        mirror(
            writer,
            Api::<DeserializeGuard<VpnGateway>>::all(client),
            watcher::Config::default(),
            move || {
                let daemon = daemon.clone();
                async move {
                    daemon.write_guarded();
                    daemon.reconcile().await;
                    daemon.sweep().await;
                }
            },
        )
    };
    // The pods on this node: one relabelled onto a gateway or off it, or matched by a selector
    // written after it started, is attached or detached while it runs.
    let pod_watch = {
        let daemon = daemon.clone();
        let on_node = format!("spec.nodeName={}", daemon.options.node_name);
        mirror(
            pod_writer,
            Api::<Pod>::all(daemon.client.clone()),
            watcher::Config::default().fields(&on_node),
            move || {
                let daemon = daemon.clone();
                async move {
                    daemon.sweep().await;
                    // A client's pod address (an inbound port's backend) comes after its
                    // attachment.
                    daemon.reconcile().await;
                }
            },
        )
    };
    // Nodes come and go: their addresses are the guard's.
    let node_watch = {
        let daemon = daemon.clone();
        mirror(
            node_writer,
            Api::<Node>::all(daemon.client.clone()),
            watcher::Config::default(),
            move || {
                let daemon = daemon.clone();
                async move {
                    daemon.reconcile().await;
                }
            },
        )
    };
    // Every few seconds: the guard is loaded again (it holds the node's interfaces, read when it
    // is loaded, and a flushed ruleset must not leave the exits open for long), and the node's
    // table is read back; one that changed or went is applied again.
    let recheck = {
        let daemon = daemon.clone();
        async move {
            loop {
                tokio::time::sleep(RECHECK).await;
                daemon.recheck().await;
                daemon.sweep().await;
            }
        }
    };
    // Probe results drive it too.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    {
        let (targets, interval, netns, metrics) = (
            daemon.targets.clone(),
            daemon.options.probe_interval,
            daemon.options.netns.clone(),
            daemon.metrics.clone(),
        );
        std::thread::Builder::new()
            .name("cloak-node-probe".into())
            .spawn(move || {
                if let Err(e) = enter(netns.as_ref()) {
                    tracing::error!(error = %e, "probe thread: entering the node's namespace");
                    return;
                }
                let targets = move || targets.lock().map(|t| t.clone()).unwrap_or_default();
                let mut report = |round| seen_tx.send(round).is_ok();
                let rtt = |rtt: Duration| metrics.probe_rtt.observe(rtt.as_secs_f64());
                if let Err(e) = crate::probe::run(interval, &targets, &mut report, &rtt) {
                    tracing::error!(error = %e, "probing the exits stopped");
                }
            })?;
    }
    let probes = {
        let daemon = daemon.clone();
        async move {
            while let Some(round) = seen_rx.recv().await {
                // Also a plan that failed before is tried again, once its backoff is over.
                let due = {
                    let state = daemon.state.lock().await;
                    state.applied.is_none()
                        && state
                            .retry_at
                            .is_none_or(|at| tokio::time::Instant::now() >= at)
                };
                let (changed, turned) = daemon.seen(round).await;
                if changed || due {
                    daemon.reconcile().await;
                }
                // Told after the failover, never in its way: the API server may be slow.
                for (vni, up) in turned {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        let told = daemon.tell_failover(vni, up);
                        let _ = tokio::time::timeout(Duration::from_secs(10), told).await;
                    });
                }
            }
        }
    };
    let serve = {
        let daemon = daemon.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let daemon = daemon.clone();
                        tokio::spawn(async move { daemon.serve(stream).await });
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting a CNI call"),
                }
            }
        }
    };
    let dns = serve_dns(&daemon);
    tokio::select! {
        () = shutdown => {}
        () = watch => {}
        () = node_watch => {}
        () = pod_watch => {}
        () = recheck => {}
        () = probes => {}
        () = serve => {}
        () = dns => {}
    }
    Ok(())
}

/// Answers the DNS of clients whose gateway has no healthy exit (the node's plan redirects it
/// here): cluster names from the cluster DNS, SERVFAIL for every other name. The cluster DNS is
/// the first nameserver of this pod's resolv.conf (`dnsPolicy: ClusterFirstWithHostNet`); the
/// cluster domains are the asking client's own gateway's ([`cluster_domains`]); a query from
/// anyone else gets SERVFAIL. Runs for as long as the daemon, binding again a second after a
/// failure.
async fn serve_dns(daemon: &Arc<Daemon>) {
    let addr = std::net::SocketAddrV4::new(CLIENT_GATEWAY, 53);
    loop {
        serve_dns_once(daemon, addr).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// [`serve_dns`] until its sockets cannot be bound or fail.
async fn serve_dns_once(daemon: &Arc<Daemon>, addr: std::net::SocketAddrV4) {
    let Ok(sockets) = daemon
        .kernel
        .run(move || dnsforward::Sockets::bind(addr))
        .await
        .inspect_err(
            |e| tracing::error!(%addr, error = %e, "the clients' DNS while no exit is healthy"),
        )
    else {
        return;
    };
    let cluster = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|text| dnsforward::first_nameserver(&text));
    if cluster.is_none() {
        tracing::warn!(
            "no nameserver in /etc/resolv.conf: with no healthy exit, clients' cluster names do not resolve"
        );
    }
    let domains = daemon.domains.clone();
    let routing = move |client: std::net::IpAddr| {
        // A client's own gateway's domains: another tenant's must never send its names out.
        let cluster_domains = domains.lock().ok()?.get(&client)?.clone();
        Some(dnsforward::Routing {
            cluster_domains,
            cluster,
            tunnel: None,
            intranet: Vec::new(),
        })
    };
    if let Err(e) = dnsforward::serve(sockets, routing).await {
        tracing::error!(%addr, error = %e, "the clients' DNS while no exit is healthy stopped");
    }
}

fn state_file(options: &Options) -> PathBuf {
    options.state_dir.join("clients.json")
}

/// The file that says a guard was loaded since the node booted, beside the daemon's socket
/// (`crate::cni` reads it).
pub fn guard_marker(socket: &std::path::Path) -> PathBuf {
    crate::cni::guard_marker(socket)
}

/// Where the daemon keeps the plugin's [`Guarded`] list, in its state directory.
pub fn guarded_file(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("guarded.json")
}

/// The namespaces of `gateways`, unreadable ones included (a pod there may be one's client).
fn guarded<'a>(gateways: impl Iterator<Item = &'a DeserializeGuard<VpnGateway>>) -> Guarded {
    Guarded {
        namespaces: gateways
            .filter_map(|g| match &g.0 {
                Ok(gateway) => gateway.namespace(),
                Err(invalid) => invalid.metadata.namespace.clone(),
            })
            .collect(),
    }
}

fn load_state(options: &Options) -> State {
    let saved: Saved = std::fs::read(state_file(options))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    State {
        clients: saved.clients,
        gateway_ids: saved
            .gateway_ids
            .into_iter()
            .filter_map(|(key, id)| {
                let (ns, name) = key.split_once('/')?;
                Some(((ns.to_owned(), name.to_owned()), id))
            })
            .collect(),
        slots: saved.slots,
        ports: saved.ports,
        sandboxes: saved.sandboxes,
        cut_off: saved.cut_off,
        ..State::default()
    }
}

impl Daemon {
    /// Rewrites the plugin's [`Guarded`] list when the complete list of gateways changed it.
    fn write_guarded(&self) {
        if !matches!(
            self.gateways.wait_until_ready().now_or_never(),
            Some(Ok(()))
        ) {
            return;
        }
        let all = self.gateways.state();
        for invalid in all.iter().filter_map(|g| g.0.as_ref().err()) {
            tracing::warn!(
                gateway = %format!("{}/{}", invalid.metadata.namespace.as_deref().unwrap_or_default(), invalid.metadata.name.as_deref().unwrap_or_default()),
                error = %invalid.error,
                "an unreadable gateway is skipped"
            );
        }
        let now = guarded(all.iter().map(AsRef::as_ref));
        let Ok(mut last) = self.guarded.lock() else {
            return;
        };
        if last.as_ref() == Some(&now) {
            return;
        }
        match now.write(&guarded_file(&self.options.state_dir)) {
            Ok(()) => *last = Some(now),
            Err(e) => tracing::error!(error = %e, "writing the namespaces that hold a gateway"),
        }
    }

    fn save(&self, state: &State) {
        let path = state_file(&self.options);
        let tmp = path.with_extension("tmp");
        let saved = Saved {
            clients: state.clients.clone(),
            gateway_ids: state
                .gateway_ids
                .iter()
                .map(|((ns, name), id)| (format!("{ns}/{name}"), *id))
                .collect(),
            slots: state.slots.clone(),
            ports: state.ports.clone(),
            sandboxes: state.sandboxes.clone(),
            cut_off: state.cut_off.clone(),
        };
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(error = %e, path = %path.display(), "saving the clients");
        }
    }

    /// Forgets the clients and exits' recorded or found interfaces that are gone (deleted while
    /// the daemon was away, or behind its back), asking the kernel once for all of them.
    async fn forget_vanished(&self) {
        let mut state = self.state.lock().await;
        let names: std::collections::BTreeSet<String> = state
            .clients
            .values()
            .map(|c| c.iface.clone())
            .chain(state.ports.values().map(|p| p.port.clone()))
            .chain(state.found_ports.values().cloned())
            .collect();
        let gone: std::collections::BTreeSet<String> = self
            .kernel
            .run(move || names.into_iter().filter(|n| !link_exists(n)).collect())
            .await;
        if gone.is_empty() {
            return;
        }
        state.found_ports.retain(|_, port| !gone.contains(port));
        state.ports.retain(|_, p| !gone.contains(&p.port));
        let left: Vec<String> = state
            .clients
            .iter()
            .filter(|(_, c)| gone.contains(&c.iface))
            .map(|(id, _)| id.clone())
            .collect();
        for id in left {
            if let Some(c) = state.clients.remove(&id) {
                tracing::info!(pod = %format!("{}/{}", c.pod_namespace, c.pod_name), iface = %c.iface, "a client's interface is gone: forgotten");
            }
        }
        self.save(&state);
    }

    /// Takes in one probe round; true when an exit changed between up and down, began or
    /// stopped draining, or began or stopped carrying IPv6; and the exits that stopped or
    /// started answering (by VNI, whether up now), to be told in Events.
    async fn seen(&self, round: BTreeMap<u32, Answer>) -> (bool, Vec<(u32, bool)>) {
        let mut state = self.state.lock().await;
        let limit = self.options.probe_misses.max(1);
        let mut changed = false;
        // Exits this node saw stop or start answering (not their first answer or miss).
        let mut turned: Vec<(u32, bool)> = Vec::new();
        for (vni, answer) in round {
            let seen = state.seen.entry(vni).or_default();
            let was = (seen.up, seen.draining, seen.ipv6);
            match answer {
                Answer::Missed => {
                    seen.misses += 1;
                    if seen.misses >= limit {
                        seen.up = Some(false);
                    }
                }
                Answer::Draining => {
                    (seen.misses, seen.up, seen.draining) = (0, Some(true), true);
                }
                Answer::Up { ipv6 } => {
                    (seen.misses, seen.up, seen.draining) = (0, Some(true), false);
                    seen.ipv6 = ipv6;
                }
            }
            if (seen.up, seen.draining, seen.ipv6) != was {
                tracing::info!(vni, up = ?seen.up, draining = seen.draining, ipv6 = seen.ipv6, "exit health changed");
                changed = true;
                // New flows leave an exit that stopped answering, or that began draining.
                let reason = if was.0 == Some(true) && seen.up == Some(false) {
                    Some(FailoverReason::unanswered)
                } else if seen.draining && !was.1 && seen.up == Some(true) {
                    Some(FailoverReason::draining)
                } else {
                    None
                };
                if let Some(reason) = reason
                    && let Some((namespace, gateway)) = self.gateway_of(vni)
                {
                    self.metrics
                        .failovers
                        .get_or_create(&FailoverLabels {
                            namespace,
                            gateway,
                            reason,
                        })
                        .inc();
                }
                if let (Some(before), Some(now)) = (was.0, seen.up)
                    && before != now
                {
                    turned.push((vni, now));
                }
            }
        }
        (changed, turned)
    }

    /// The gateway (namespace, name) whose status lists exit `vni`.
    fn gateway_of(&self, vni: u32) -> Option<(String, String)> {
        let (guard, _) = self.exit_by_vni(vni)?;
        let gateway = guard.0.as_ref().ok()?;
        Some((gateway.namespace().unwrap_or_default(), gateway.name_any()))
    }

    /// The gateway whose status lists exit `vni`, and that exit's name.
    fn exit_by_vni(&self, vni: u32) -> Option<(Arc<DeserializeGuard<VpnGateway>>, String)> {
        self.gateways.state().into_iter().find_map(|guard| {
            let exits = &guard.0.as_ref().ok()?.status.as_ref()?.exits;
            let exit = exits.iter().find(|e| e.vni == vni)?.name.clone();
            Some((guard, exit))
        })
    }

    /// The gauges a scrape reads: this node's exits by how its probes see them, and its clients,
    /// by gateway.
    async fn refresh_gauges(&self) {
        let state = self.state.lock().await;
        let mut exits: BTreeMap<(String, String, ExitState), i64> = BTreeMap::new();
        for exit in state.applied.iter().flat_map(|p| &p.exits) {
            let Some((namespace, gateway)) = self.gateway_of(exit.vni) else {
                continue;
            };
            let seen = state.seen.get(&exit.vni).copied().unwrap_or_default();
            let now = match seen.up {
                Some(true) if seen.draining => ExitState::draining,
                Some(true) => ExitState::healthy,
                Some(false) => ExitState::dead,
                None => ExitState::unknown,
            };
            *exits.entry((namespace, gateway, now)).or_default() += 1;
        }
        let mut clients: BTreeMap<(String, String), i64> = BTreeMap::new();
        for attached in state.clients.values() {
            *clients
                .entry((attached.pod_namespace.clone(), attached.gateway.clone()))
                .or_default() += 1;
        }
        drop(state);
        self.metrics.exits.clear();
        for ((namespace, gateway, state), count) in exits {
            self.metrics
                .exits
                .get_or_create(&ExitLabels {
                    namespace,
                    gateway,
                    state,
                })
                .set(count);
        }
        self.metrics.clients.clear();
        for ((namespace, gateway), count) in clients {
            self.metrics
                .clients
                .get_or_create(&GatewayLabels { namespace, gateway })
                .set(count);
        }
    }

    /// An Event on the gateway of the exit `vni` when this node's probes saw it stop (or start
    /// again) answering through its link: the failover the node makes on its own, which no pod's
    /// readiness shows.
    async fn tell_failover(&self, vni: u32, up: bool) {
        let Some((guard, exit)) = self.exit_by_vni(vni) else {
            return;
        };
        let Ok(gateway) = &guard.0 else {
            return;
        };
        let here = &self.options.node_name;
        let (type_, reason, note) = if up {
            (
                EventType::Normal,
                "ExitAnswers",
                format!(
                    "node {here}: exit {exit} answers its probes again; this node sends it new flows"
                ),
            )
        } else {
            (
                EventType::Warning,
                "ExitUnanswered",
                format!(
                    "node {here}: exit {exit} stopped answering its probes through its link; this node sends new flows to the gateway's other exits and resets the flows it had sent there"
                ),
            )
        };
        let reference = kube::Resource::object_ref(gateway, &());
        self.publish_to(&reference, type_, reason, "Failover", note)
            .await;
    }

    /// Recomputes the node's plan from the clients, the gateways and the probes, and applies it
    /// when it changed; flows of exits that just died are reset.
    #[tracing::instrument(name = "reconcile", skip_all, fields(node = %self.options.node_name))]
    async fn reconcile(&self) -> bool {
        // Nothing is applied before the first full list of gateways: a plan made from part of
        // them would take the links of the other gateways' clients away.
        if !matches!(
            self.gateways.wait_until_ready().now_or_never(),
            Some(Ok(()))
        ) {
            return false;
        }
        let mut state = self.state.lock().await;
        {
            let gateways = self.gateways.state();
            let gateways: Vec<&VpnGateway> =
                gateways.iter().filter_map(|g| g.0.as_ref().ok()).collect();
            let domains = cluster_domains(&state.clients, &gateways);
            if let Ok(mut held) = self.domains.lock() {
                *held = domains;
            }
        }
        if let Some(guard) = self.guard(&state)
            && state.guarded.as_ref() != Some(&guard)
        {
            tracing::debug!(%guard, "loading the guard");
            let to_load = guard.clone();
            match self.kernel.run(move || to_load.apply()).await {
                Ok(found) => {
                    state.found_ports.extend(found.ports.clone());
                    // An exit whose interface was not found yet is looked for again at the
                    // next recheck (its frames wait; nodes cannot use it before either).
                    if found.ports.len() < guard.local.len() {
                        tracing::warn!(%guard, ?found, "an exit of this node has no interface found yet");
                    } else {
                        state.guarded = Some(guard);
                    }
                    state.guard_loaded = true;
                    // What the plugin looks for before it lets a pod start without the
                    // daemon: in the daemon's socket directory, a tmpfs that a reboot empties
                    // along with the ruleset.
                    if let Err(e) = std::fs::write(guard_marker(&self.options.socket), b"") {
                        tracing::warn!(error = %e, "marking the guard loaded for the plugin");
                    }
                }
                Err(e) => tracing::error!(error = %e, "loading the guard on the VXLAN port"),
            }
        }
        let numbers = (state.gateway_ids.clone(), state.slots.clone());
        let plan = self.plan(&mut state);
        // The file follows the numbers flows carry; a plan that kept them writes nothing.
        if numbers != (state.gateway_ids.clone(), state.slots.clone()) {
            self.save(&state);
        }
        if state.applied.as_ref() == Some(&plan) {
            return true;
        }
        let dead_slots: Vec<u8> = plan
            .exits
            .iter()
            .filter(|e| {
                e.state == ExitUse::Dead
                    && state.applied.as_ref().is_none_or(|old| {
                        old.exits
                            .iter()
                            .any(|o| o.vni == e.vni && o.state != ExitUse::Dead)
                    })
            })
            .map(|e| e.slot)
            .collect();
        // And slots that left the plan: their flows go before another exit may take the slot.
        let left_slots: Vec<u8> = state
            .applied
            .iter()
            .flat_map(|old| old.exits.iter())
            .filter(|o| {
                !plan
                    .exits
                    .iter()
                    .any(|e| e.slot == o.slot && e.vni == o.vni)
            })
            .map(|o| o.slot)
            .collect();
        tracing::debug!(exits = ?plan.exits.iter().map(|e| (e.vni, e.slot, e.state)).collect::<Vec<_>>(), clients = plan.clients.len(), "applying the node's plan");
        let to_apply = plan.clone();
        let started = std::time::Instant::now();
        let result = self
            .kernel
            .run(move || {
                to_apply.apply()?;
                let (mut dead, mut left) = (0, 0);
                for slot in dead_slots {
                    dead += reset_flows(slot)?;
                }
                for slot in left_slots {
                    left += reset_flows(slot)?;
                }
                Ok::<(u32, u32), cloak_dataplane::Error>((dead, left))
            })
            .await;
        self.metrics
            .plan_apply_duration
            .observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() {
            Outcome::ok
        } else {
            Outcome::error
        };
        self.metrics
            .plan_applies
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.plan_applied
            .store(result.is_ok(), std::sync::atomic::Ordering::Relaxed);
        self.metrics.plan_applied.set(i64::from(result.is_ok()));
        match result {
            Ok((dead, left)) => {
                for (reason, flows) in [(ResetReason::dead, dead), (ResetReason::removed, left)] {
                    self.metrics
                        .flows_reset
                        .get_or_create(&ResetLabels { reason })
                        .inc_by(u64::from(flows));
                }
                if dead + left > 0 {
                    tracing::info!(dead, left, "reset the flows of dead or removed exits");
                }
                if let Ok(mut targets) = self.targets.lock() {
                    *targets = plan.exits.iter().map(|e| (e.vni, e.slot)).collect();
                }
                state.applied = Some(plan);
                state.listed = self.kernel.run(NodePlan::loaded).await.ok();
                (state.failures, state.retry_at) = (0, None);
                true
            }
            Err(e) => {
                // Tried again after a backoff (a probe round, doubling up to MAX_BACKOFF), and
                // at once on any change.
                state.failures = state.failures.saturating_add(1);
                let backoff = PROBE_ROUND_FLOOR
                    .saturating_mul(1 << (state.failures - 1).min(8))
                    .min(MAX_BACKOFF);
                state.retry_at = Some(tokio::time::Instant::now() + backoff);
                state.applied = None;
                tracing::error!(error = %e, failures = state.failures, retry_in = ?backoff, "applying the node's plan");
                false
            }
        }
    }

    /// Why this node cannot take clients: another node's address gives the same transit address
    /// ([`transit_for`]), and exits would send one node's replies to the other.
    fn transit_clash(&self) -> Option<String> {
        let nodes = self.nodes.state();
        transit_clash(
            &self.options.node_name,
            self.options.transit,
            nodes.iter().map(|n| {
                let addresses = n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect::<Vec<Ipv4Addr>>();
                (n.name_any(), addresses)
            }),
        )
    }

    /// Forgets clients whose interfaces went, loads the guard again, and applies the
    /// node's plan again when its table is not what was listed right after the last apply
    /// (drift: `nft flush ruleset`, an edited table).
    async fn recheck(&self) {
        self.forget_vanished().await;
        let listed = self.kernel.run(NodePlan::loaded).await.ok();
        {
            let mut state = self.state.lock().await;
            state.guarded = None;
            if state.applied.is_some() && listed != state.listed {
                state.drifts += 1;
                self.metrics.drift_repairs.inc();
                tracing::warn!(
                    drifts = state.drifts,
                    "the node's table changed under the daemon; applying it again"
                );
                state.applied = None;
                state.retry_at = None;
            }
        }
        let _ = self.reconcile().await;
    }

    /// The guard for the cluster as it is now: every exit's and node's address, and the exits on
    /// this node with the addresses and identifiers their gateways' statuses give them (only the
    /// operator writes those; a pod's labels are the tenant's). None until the nodes are listed:
    /// a guard without them would take the other nodes' uplinks for pods' interfaces.
    fn guard(&self, state: &State) -> Option<Guard> {
        self.nodes.wait_until_ready().now_or_never()?.ok()?;
        let gateways = self.gateways.state();
        let gateways: Vec<&VpnGateway> =
            gateways.iter().filter_map(|g| g.0.as_ref().ok()).collect();
        let clashes = clashing_vnis(&gateways);
        let all = gateways
            .iter()
            .filter_map(|g| g.status.as_ref())
            .flat_map(|s| &s.exits);
        let exits = all
            .clone()
            .filter_map(|e| e.pod_ip.as_deref()?.parse().ok())
            .collect();
        let mut local: Vec<guard::LocalExit> = all
            .filter(|e| e.node.as_deref() == Some(self.options.node_name.as_str()))
            .filter(|e| e.vni != 0 && !clashes.contains(&e.vni))
            .filter_map(|e| {
                let address: Ipv4Addr = e.pod_ip.as_deref()?.parse().ok()?;
                Some(guard::LocalExit {
                    address,
                    vni: e.vni,
                    // As read in its sandbox at its ADD, or as found in the bridge's tables
                    // before (kept: one failed lookup must not drop a working exception).
                    port: state
                        .ports
                        .values()
                        .find(|p| p.address == address)
                        .map(|p| p.port.clone())
                        .or_else(|| state.found_ports.get(&address).cloned()),
                })
            })
            .collect();
        local.sort();
        let nodes = self
            .nodes
            .state()
            .iter()
            .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
            .flatten()
            .filter_map(|a| a.address.parse().ok())
            .chain([self.options.node_ip])
            .collect();
        Some(Guard {
            exits,
            nodes,
            local,
        })
    }

    /// Whether a guard is loaded, waiting for one (it follows the first lists of gateways and
    /// nodes, within a second of a start) for at most `limit`.
    async fn guard_loaded_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.state.lock().await.guard_loaded {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Prepares an exit's sandbox namespace (the sysctls its unprivileged pod cannot set,
    /// `gateway::prepare_exit_namespace`): an error fails the ADD, which the kubelet retries.
    /// Then records the host side of its `eth0` and its address, read in the sandbox's own
    /// namespace ([`SandboxPort`]); a failure there is logged: the guard then looks the port up
    /// in the bridge's tables.
    async fn prepare_exit(&self, request: &Request, netns: std::fs::File) -> Result<(), String> {
        let read = self
            .kernel
            .run(
                move || -> Result<Result<(String, Option<Ipv4Addr>), String>, String> {
                    let (index, address) = match in_sandbox(netns, || {
                        cloak_dataplane::gateway::prepare_exit_namespace()
                            .map_err(|e| format!("preparing the exit's namespace: {e}"))?;
                        Ok(guard::pod_interface("eth0").map_err(|e| e.to_string()))
                    })? {
                        Ok(found) => found,
                        Err(e) => return Ok(Err(e)),
                    };
                    Ok(guard::name_of(index)
                        .map_err(|e| e.to_string())
                        .map(|port| (port, address)))
                },
            )
            .await?;
        match read {
            Ok((port, Some(address))) => {
                let mut state = self.state.lock().await;
                state
                    .ports
                    .insert(request.container_id.clone(), SandboxPort { port, address });
                state.guarded = None;
                self.save(&state);
            }
            Ok((_, None)) => {
                tracing::warn!(pod = %request.pod_name, "an exit's sandbox has no IPv4 address on eth0");
            }
            Err(e) => {
                tracing::warn!(pod = %request.pod_name, error = %e, "reading an exit's sandbox interface");
            }
        }
        Ok(())
    }

    /// The plan for the current clients: the exits of their gateways, each healthy while it
    /// answers its probes (until the first probe: as the gateway's status says).
    fn plan(&self, state: &mut State) -> NodePlan {
        let gateways = self.gateways.state();
        let gateways: Vec<&VpnGateway> =
            gateways.iter().filter_map(|g| g.0.as_ref().ok()).collect();
        let wanted: std::collections::BTreeSet<(String, String)> = state
            .clients
            .values()
            .map(|c| (c.pod_namespace.clone(), c.gateway.clone()))
            .collect();
        state.gateway_ids.retain(|k, _| wanted.contains(k));
        for key in &wanted {
            if !state.gateway_ids.contains_key(key) {
                let id = (0..=u16::MAX)
                    .find(|i| !state.gateway_ids.values().any(|v| v == i))
                    .unwrap_or_default();
                state.gateway_ids.insert(key.clone(), id);
            }
        }
        let clashes = clashing_vnis(&gateways);
        for vni in &clashes {
            tracing::error!(
                vni,
                "two exits claim one VXLAN identifier: neither gets a link"
            );
        }
        let mut exits = Vec::new();
        // Each gateway's clients' MTU, by its node-local number: their flows' MSS clamp.
        let mut mtus: BTreeMap<u16, u16> = BTreeMap::new();
        let mut live_vnis = std::collections::BTreeSet::new();
        for ((ns, name), id) in &state.gateway_ids {
            let Some(gateway) = gateways
                .iter()
                .find(|g| g.namespace().as_deref() == Some(ns.as_str()) && &g.name_any() == name)
            else {
                continue;
            };
            let Some(status) = gateway.status.as_ref() else {
                continue;
            };
            mtus.insert(*id, status.mtu.unwrap_or(1420));
            for exit in &status.exits {
                let Some(remote) = exit.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) else {
                    continue;
                };
                if exit.vni == 0 || clashes.contains(&exit.vni) {
                    continue;
                }
                live_vnis.insert(exit.vni);
                let seen = state.seen.get(&exit.vni).copied().unwrap_or_default();
                // Draining as the operator says (it saw the pod's deletion) or as the exit's own
                // answers say (it got its SIGTERM: the operator may be down).
                let use_ = if exit.health == ExitHealth::Draining
                    || (seen.up == Some(true) && seen.draining)
                {
                    ExitUse::Draining
                } else {
                    // Until its first probe, an exit is as the gateway's status says.
                    let up = seen.up.unwrap_or(exit.health == ExitHealth::Healthy);
                    if up { ExitUse::Healthy } else { ExitUse::Dead }
                };
                exits.push((exit.vni, remote, *id, use_, seen.ipv6));
            }
        }
        state.slots.retain(|vni, _| live_vnis.contains(vni));
        state.seen.retain(|vni, _| live_vnis.contains(vni));
        let mut links = Vec::new();
        for (vni, remote, gateway, use_, ipv6) in exits {
            let slot = if let Some(slot) = state.slots.get(&vni) {
                *slot
            } else {
                let Some(free) = (0..=u8::MAX).find(|s| !state.slots.values().any(|v| v == s))
                else {
                    tracing::error!(vni, "more than 256 exits on one node; leaving this one out");
                    continue;
                };
                state.slots.insert(vni, free);
                free
            };
            links.push(ExitLink {
                slot,
                vni,
                remote,
                gateway,
                state: use_,
                ipv6,
            });
        }
        links.sort_by_key(|l| l.slot);
        // A pod address goes to one client: two sandboxes of one pod (its old one not yet
        // gone) would route it twice.
        let mut addressed = std::collections::BTreeSet::new();
        let clients = state
            .clients
            .iter()
            .map(|(id, c)| {
                let gateway = state
                    .gateway_ids
                    .get(&(c.pod_namespace.clone(), c.gateway.clone()))
                    .copied()
                    .unwrap_or_default();
                let mtu = mtus.get(&gateway).copied().unwrap_or(1420);
                // Its pod's address as the API says it (the kubelet writes it, not the pod), for
                // the pod of this sandbox (by UID) alone.
                let uid = state.sandboxes.get(id).map(|s| s.uid.as_str());
                let pod_ip: Option<Ipv4Addr> = self
                    .pods
                    .get(
                        &kube::runtime::reflector::ObjectRef::new(&c.pod_name)
                            .within(&c.pod_namespace),
                    )
                    .filter(|p| uid.is_some() && p.metadata.uid.as_deref() == uid)
                    .and_then(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
                    .filter(|ip| addressed.insert(*ip));
                ClientPort {
                    iface: c.iface.clone(),
                    address: c.address,
                    gateway,
                    mss: cloak_model::gateway::mss(mtu, false),
                    pod_ip,
                }
            })
            .collect();
        NodePlan {
            transit: self.options.transit,
            exits: links,
            clients,
        }
    }

    async fn serve(&self, stream: tokio::net::UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        if BufReader::new(read).read_line(&mut line).await.is_err() {
            return;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let error = match request.command {
                    Command::Add => self.add(&request).await.err(),
                    Command::Del => {
                        self.del(&request).await;
                        None
                    }
                    Command::Live => self.live().await.err(),
                    Command::Ready => match self.live().await {
                        Err(e) => Some(e),
                        Ok(()) if self.gateways.wait_until_ready().now_or_never().is_none() => {
                            Some("the gateways are not listed yet".into())
                        }
                        Ok(()) if !self.state.lock().await.guard_loaded => {
                            Some("the guard on the exits' links is not loaded yet".into())
                        }
                        Ok(()) => None,
                    },
                };
                if let Some(e) = &error {
                    tracing::warn!(pod = %format!("{}/{}", request.pod_namespace, request.pod_name), error = %e, "attaching refused");
                }
                Reply { error }
            }
            Err(e) => Reply {
                error: Some(format!("unreadable request: {e}")),
            },
        };
        if let Ok(mut text) = serde_json::to_string(&reply) {
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        }
    }

    /// Whether the kernel thread runs jobs: a no-op through its queue within [`LIVE_WITHIN`]
    /// (an apply stuck behind a wedged tool is killed after 10 s; a thread that does not come
    /// back is the daemon's end, which the kubelet's liveness probe turns into a restart).
    async fn live(&self) -> Result<(), String> {
        tokio::time::timeout(LIVE_WITHIN, self.kernel.run(|| ()))
            .await
            .map_err(|_| format!("the kernel thread ran no job within {LIVE_WITHIN:?}"))
    }

    /// Attaches a pod if it is a client: its veth, its namespace's routes and kill switch, then
    /// the node's plan with it.
    async fn add(&self, request: &Request) -> Result<(), String> {
        // Which gateway a pod belongs to can only be told from the full list of gateways, or,
        // until there is one, from the last list of the namespaces that hold a gateway. No pod
        // starts before the guard is loaded: any of them could spoof a node's address.
        let listed = matches!(
            tokio::time::timeout(Duration::from_secs(10), self.gateways.wait_until_ready()).await,
            Ok(Ok(()))
        );
        if !self.guard_loaded_within(Duration::from_secs(10)).await {
            return Err("the guard on the exits' links is not loaded yet".into());
        }
        if !listed {
            let last = Guarded::read(&guarded_file(&self.options.state_dir));
            if last.is_some_and(|g| !g.guards(&request.pod_namespace)) {
                return Ok(());
            }
            return Err("the gateways are not listed yet".into());
        }
        let pod = Api::<Pod>::namespaced(self.client.clone(), &request.pod_namespace)
            .get(&request.pod_name)
            .await
            .map_err(|e| format!("reading the pod: {e}"))?;
        let netns = request
            .netns
            .as_deref()
            .ok_or_else(|| "ADD without a network namespace".to_owned())?;
        let held = std::fs::File::open(netns)
            .map_err(|e| format!("opening the sandbox's namespace {netns}: {e}"))?;
        if pod.labels().contains_key(cloak_model::exit::LABEL_EXIT) {
            let handle = held
                .try_clone()
                .map_err(|e| format!("the sandbox's namespace: {e}"))?;
            self.prepare_exit(request, handle).await?;
        }
        let id = request.container_id.clone();
        let sandbox = Sandbox {
            namespace: request.pod_namespace.clone(),
            name: request.pod_name.clone(),
            uid: pod.uid().unwrap_or_default(),
            netns: namespace_id(&held),
        };
        // Earlier sandboxes of this pod whose DEL was not seen (the daemon was down, the node
        // rebooted) go: found again by the pod's UID, they would lead into this one.
        self.retire_others(&id, &sandbox.uid).await;
        {
            let mut state = self.state.lock().await;
            state.sandboxes.insert(id.clone(), sandbox.clone());
            if let Ok(mut all) = self.netns.lock() {
                all.insert(id.clone(), held);
            }
            self.save(&state);
        }
        match self.want(&request.pod_namespace, &pod) {
            Want::NotClient => Ok(()),
            Want::Refused(why) => Err(why),
            Want::Client(gateway) => self.attach(&id, &sandbox, &gateway, own_tunnel(&pod)).await,
        }
    }

    /// What `pod` (of `namespace`) is to the gateways as they are now.
    fn want(&self, namespace: &str, pod: &Pod) -> Want<VpnGateway> {
        let all = self.gateways.state();
        let gateways: Vec<&VpnGateway> = all.iter().filter_map(|g| g.0.as_ref().ok()).collect();
        match choose(namespace, pod.labels(), gateways.iter().copied()) {
            Choice::None => {
                // A gateway of this namespace that cannot be read may choose this pod: it does
                // not run unprotected on a guess.
                let unreadable = all.iter().find_map(|g| {
                    let invalid = g.0.as_ref().err()?;
                    (invalid.metadata.namespace.as_deref() == Some(namespace))
                        .then(|| invalid.metadata.name.clone().unwrap_or_default())
                });
                match unreadable {
                    Some(name) if !pod.labels().contains_key(cloak_model::exit::LABEL_GATEWAY) => {
                        Want::Refused(format!(
                            "gateway {name} of namespace {namespace} cannot be read (see its InvalidSpec event), so whether this pod is its client cannot be told"
                        ))
                    }
                    _ => Want::NotClient,
                }
            }
            Choice::Missing(name) => Want::Refused(format!(
                "the pod's gateway ({name}) does not exist in {namespace}"
            )),
            Choice::Gateway(name) => gateways
                .iter()
                .find(|g| g.namespace().as_deref() == Some(namespace) && g.name_any() == name)
                .map_or_else(
                    || Want::Refused(format!("gateway {name} went away")),
                    |g| Want::Client((*g).clone()),
                ),
        }
    }

    /// Attaches the sandbox `id` to `gateway`: its veth, its namespace's routes and kill switch,
    /// then the node's plan with it. Undone whole when any part fails. A sandbox that went away
    /// meanwhile (its DEL) is not attached.
    async fn attach(
        &self,
        id: &str,
        sandbox: &Sandbox,
        gateway: &VpnGateway,
        own_tunnel: Option<String>,
    ) -> Result<(), String> {
        if let Some(clash) = self.transit_clash() {
            return Err(clash);
        }
        let netns = self
            .netns_of(id, sandbox)
            .await
            .ok_or_else(|| "the pod's network namespace is not found".to_owned())?;
        let mut state = self.state.lock().await;
        if state.sandboxes.get(id).is_none_or(|s| s.uid != sandbox.uid) {
            return Err("the pod's sandbox went away".into());
        }
        if state.clients.contains_key(id) {
            return Ok(()); // a repeated ADD: attached already
        }
        let iface = iface_name(id);
        let address = (2..=0xfffe_u32)
            .map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n))
            .find(|a| {
                !state.clients.values().any(|c| c.address == *a)
                    && a.octets()[3] != 0
                    && a.octets()[3] != 255
            })
            .ok_or_else(|| "no client address left on this node".to_owned())?;
        let intranet = self.intranet_of(gateway);
        if let Some(why) = cloak_model::gateway::intranet_refusal(&intranet) {
            return Err(format!("gateway {}: {why}", gateway.name_any()));
        }
        let mtu = gateway.status.as_ref().and_then(|s| s.mtu).unwrap_or(1420);
        let client_plan = ClientPlan {
            address,
            intranet,
            mtu,
            unprotected: !gateway.spec.kill_switch,
            own_tunnel,
        };
        let host_iface = iface.clone();
        self.kernel
            .run(move || -> Result<(), String> {
                // The handle is held for the whole job: the path cannot name another namespace.
                ClientPlan::create_veth(&host_iface, &fd_path(&netns), mtu)
                    .map_err(|e| format!("the pod's interface: {e}"))?;
                let inside = in_sandbox(netns, move || {
                    client_plan
                        .apply()
                        .map_err(|e| format!("the pod's routes and kill switch: {e}"))
                });
                if inside.is_err() {
                    let _ = remove_client(&host_iface);
                }
                inside
            })
            .await?;
        state.clients.insert(
            id.to_owned(),
            Attached {
                pod_namespace: sandbox.namespace.clone(),
                pod_name: sandbox.name.clone(),
                gateway: gateway.name_any(),
                iface,
                address,
            },
        );
        // The attachment's table replaced a cut-off one.
        state.cut_off.remove(id);
        self.save(&state);
        drop(state);
        if !self.reconcile().await {
            // Without the node's table the client's traffic would have no kill switch on the
            // node: the pod must not start (or, running, is cut off by the caller).
            let mut state = self.state.lock().await;
            state.clients.remove(id);
            self.save(&state);
            drop(state);
            let iface = iface_name(id);
            let _ = self.kernel.run(move || remove_client(&iface)).await;
            return Err("the node's plan could not be applied (see the daemon's log)".into());
        }
        tracing::info!(pod = %format!("{}/{}", sandbox.namespace, sandbox.name), gateway = %gateway.name_any(), %address, "client attached");
        Ok(())
    }

    /// The ranges a gateway's clients reach over their own network: its `spec.intranet`, or the
    /// cluster's as the operator derived it (its status), or, before the operator said, the
    /// configured ranges.
    fn intranet_of(&self, gateway: &VpnGateway) -> Vec<IpNet> {
        if !gateway.spec.intranet.is_empty() {
            return gateway.spec.intranet.iter().map(|c| c.get()).collect();
        }
        let derived: Vec<IpNet> = gateway
            .status
            .iter()
            .flat_map(|s| &s.intranet)
            .filter_map(|c| c.parse().ok())
            .collect();
        if derived.is_empty() {
            self.options.intranet.clone()
        } else {
            derived
        }
    }

    /// The ranges a cut-off pod of `gateway` still reaches: its gateway's intranet, unless that
    /// is refused (it would let the internet through), then the cluster's.
    fn cut_intranet(&self, gateway: Option<&VpnGateway>) -> Vec<IpNet> {
        gateway
            .map(|g| self.intranet_of(g))
            .filter(|i| cloak_model::gateway::intranet_refusal(i).is_none())
            .unwrap_or_else(|| self.options.intranet.clone())
    }

    /// A handle to the sandbox's network namespace (a duplicate of the one the daemon holds,
    /// for a kernel job to own): opened at its ADD, or found by its pod's UID among the node's
    /// processes (after a restart, or for a pod the plugin never saw). None when it is not
    /// found, or the sandbox went away meanwhile.
    async fn netns_of(&self, id: &str, sandbox: &Sandbox) -> Option<std::fs::File> {
        if let Some(held) = self.netns.lock().ok()?.get(id) {
            return held.try_clone().ok();
        }
        let (uid, want, node) = (
            sandbox.uid.clone(),
            sandbox.netns,
            self.options.netns.clone(),
        );
        let found =
            tokio::task::spawn_blocking(move || find_pod_netns(&uid, want, node.as_deref()))
                .await
                .ok()??;
        let dup = found.try_clone().ok()?;
        let mut state = self.state.lock().await;
        let recorded = state
            .sandboxes
            .get_mut(id)
            .filter(|s| s.uid == sandbox.uid)?;
        recorded.netns = namespace_id(&found);
        self.netns
            .lock()
            .ok()?
            .entry(id.to_owned())
            .or_insert(found);
        self.save(&state);
        Some(dup)
    }

    /// Takes the sandbox's end on the node away (its veth, its place in the node's plan) and
    /// forgets it as a client. Nothing in its namespace changes: its kill switch holds until it
    /// is replaced (another attachment, a cut) or taken out ([`Daemon::detach`]).
    async fn release(&self, id: &str) {
        let mut state = self.state.lock().await;
        let Some(client) = state.clients.remove(id) else {
            return;
        };
        self.save(&state);
        drop(state);
        let (iface, address) = (client.iface.clone(), client.address);
        if let Err(e) = self
            .kernel
            .run(move || remove_client_end(&iface, address))
            .await
        {
            tracing::warn!(error = %e, iface = %client.iface, "removing a client's end on the node");
        }
        tracing::info!(pod = %format!("{}/{}", client.pod_namespace, client.pod_name), "client released");
        let _ = self.reconcile().await;
    }

    /// Detaches a running client that is no client any more: its end on the node, then cloak's
    /// table and interface in its namespace; its network is its own again. When the namespace
    /// cannot be entered, the pod is recorded as cut off (its kill switch holds), so the next
    /// sweep tries to lift it again. True when it is free.
    async fn detach(&self, id: &str, sandbox: &Sandbox) -> bool {
        self.release(id).await;
        self.lift(id, sandbox).await
    }

    /// Cuts a running sandbox off: only the kill switch in its namespace (nothing leaves but to
    /// `intranet`), replacing its attachment's table in one step, then its end on the node goes,
    /// if it had one. It stays so until it is attached or no client any more. True when cut.
    async fn cut_off(&self, id: &str, sandbox: &Sandbox, intranet: Vec<IpNet>, why: &str) -> bool {
        let pod = format!("{}/{}", sandbox.namespace, sandbox.name);
        let Some(netns) = self.netns_of(id, sandbox).await else {
            tracing::error!(%pod, "cutting a client off: its network namespace is not found");
            return false;
        };
        let cut = self
            .kernel
            .run(move || {
                in_sandbox(netns, move || {
                    ClientPlan::cut_off(&intranet).map_err(|e| e.to_string())
                })
            })
            .await;
        if let Err(e) = cut {
            tracing::error!(%pod, error = %e, "cutting a client off");
            return false;
        }
        {
            let mut state = self.state.lock().await;
            if state.sandboxes.get(id).is_none_or(|s| s.uid != sandbox.uid) {
                return false;
            }
            state.cut_off.insert(id.to_owned(), why.to_owned());
            self.save(&state);
        }
        self.release(id).await;
        tracing::warn!(%pod, why, "client cut off");
        true
    }

    /// [`Daemon::cut_off`], and a `CutOff` Event on the pod saying why once it holds.
    async fn cut_off_and_tell(
        &self,
        id: &str,
        sandbox: &Sandbox,
        pod: &Pod,
        intranet: Vec<IpNet>,
        why: &str,
    ) {
        if self.cut_off(id, sandbox, intranet, why).await {
            let note = format!("{why}; it is cut off from the internet until it can be attached");
            self.publish(pod, EventType::Warning, "CutOff", note).await;
        }
    }

    /// Takes cloak out of the sandbox's namespace (table, interface, routes): a cut is lifted, a
    /// detached client freed. A failure leaves it recorded as cut off, to be tried again. True
    /// when it is out.
    async fn lift(&self, id: &str, sandbox: &Sandbox) -> bool {
        let left = match self.netns_of(id, sandbox).await {
            Some(netns) => {
                self.kernel
                    .run(move || {
                        in_sandbox(netns, || ClientPlan::leave().map_err(|e| e.to_string()))
                    })
                    .await
            }
            None => Err("its network namespace is not found".into()),
        };
        let mut state = self.state.lock().await;
        let present = state
            .sandboxes
            .get(id)
            .is_some_and(|s| s.uid == sandbox.uid);
        match left {
            Ok(()) => {
                if state.cut_off.remove(id).is_some() {
                    self.save(&state);
                }
                true
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", sandbox.namespace, sandbox.name), error = %e, "taking cloak out of a pod's namespace");
                if present {
                    state
                        .cut_off
                        .insert(id.to_owned(), "cloak could not be taken out of it".into());
                    self.save(&state);
                }
                false
            }
        }
    }

    /// Forgets a sandbox whose pod is gone (or made anew): its records, its held namespace and
    /// its end on the node. Nothing is taken out of its namespace: were it still alive, its kill
    /// switch would hold.
    async fn forget(&self, id: &str) {
        let mut state = self.state.lock().await;
        let sandbox = state.sandboxes.remove(id).is_some();
        if let Ok(mut all) = self.netns.lock() {
            all.remove(id);
        }
        if state.cut_off.remove(id).is_some() || sandbox {
            self.save(&state);
        }
        drop(state);
        self.release(id).await;
    }

    /// Forgets every sandbox of the pod `uid` but `id`.
    async fn retire_others(&self, id: &str, uid: &str) {
        let others: Vec<String> = {
            let state = self.state.lock().await;
            state
                .sandboxes
                .iter()
                .filter(|(other, s)| *other != id && s.uid == uid)
                .map(|(other, _)| other.clone())
                .collect()
        };
        for other in others {
            self.forget(&other).await;
        }
    }

    /// Asks every sandbox on this node again what its pod is to the gateways, and attaches,
    /// detaches, cuts off or frees the ones that changed; tells a hostNetwork pod a gateway
    /// selects that it cannot be a client. Nothing before the gateways and this node's pods are
    /// listed and the guard is loaded. A sweep asked for while one runs makes that one go round
    /// again, with the stores as they are then.
    async fn sweep(&self) {
        use std::sync::atomic::Ordering;
        self.sweep_asked.store(true, Ordering::SeqCst);
        let Ok(_one) = self.sweeping.try_lock() else {
            return;
        };
        while self.sweep_asked.swap(false, Ordering::SeqCst) {
            self.sweep_once().await;
        }
    }

    async fn sweep_once(&self) {
        let ready = matches!(
            self.gateways.wait_until_ready().now_or_never(),
            Some(Ok(()))
        ) && matches!(self.pods.wait_until_ready().now_or_never(), Some(Ok(())));
        if !ready || !self.state.lock().await.guard_loaded {
            return;
        }
        let pods = self.pods.state();
        self.tell_host_network(&pods).await;
        self.adopt_and_forget(&pods).await;
        let (sandboxes, attached, cut) = {
            let state = self.state.lock().await;
            (
                state.sandboxes.clone(),
                state
                    .clients
                    .iter()
                    .map(|(id, c)| (id.clone(), c.gateway.clone()))
                    .collect::<BTreeMap<_, _>>(),
                state.cut_off.clone(),
            )
        };
        for (id, sandbox) in sandboxes {
            // A sandbox whose pod is not (or no longer) in the list is left to its DEL.
            let Some(pod) = pods.iter().find(|p| {
                p.metadata.namespace.as_deref() == Some(sandbox.namespace.as_str())
                    && p.metadata.name.as_deref() == Some(sandbox.name.as_str())
                    && p.uid().unwrap_or_default() == sandbox.uid
            }) else {
                continue;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let want = self.want(&sandbox.namespace, pod);
            let now = attached.get(&id).map(String::as_str);
            match attach::step(
                &want,
                kube::ResourceExt::name_any,
                now,
                cut.contains_key(&id),
            ) {
                Step::Keep => {}
                Step::Attach {
                    gateway,
                    detach_first,
                } => {
                    let Want::Client(g) = &want else { continue };
                    if detach_first {
                        // Its kill switch holds until the new attachment replaces it.
                        self.release(&id).await;
                    }
                    match self.attach(&id, &sandbox, g, own_tunnel(pod)).await {
                        Ok(()) => {
                            self.publish(pod, EventType::Normal, "Attached", format!(
                                "attached to gateway {gateway} while running: its internet traffic now leaves only through the gateway's exits"
                            )).await;
                        }
                        Err(e) => {
                            let why = format!(
                                "gateway {gateway} selects this pod, which could not be attached: {e}"
                            );
                            self.cut_off_and_tell(
                                &id,
                                &sandbox,
                                pod,
                                self.cut_intranet(Some(g)),
                                &why,
                            )
                            .await;
                        }
                    }
                }
                Step::Detach => {
                    if self.detach(&id, &sandbox).await {
                        self.publish(pod, EventType::Normal, "Detached", "no gateway selects this pod any more: detached, its network is its own again".into()).await;
                    }
                }
                Step::CutOff { why, .. } => {
                    // An attached pod keeps its attachment until the cut has replaced it.
                    self.cut_off_and_tell(&id, &sandbox, pod, self.cut_intranet(None), &why)
                        .await;
                }
                Step::Lift => {
                    if self.lift(&id, &sandbox).await {
                        self.publish(pod, EventType::Normal, "Detached", "no gateway selects this pod any more: its cut is lifted, its network is its own again".into()).await;
                    }
                }
            }
        }
    }

    /// Takes in the running pods of this node that are to be clients and whose sandbox the plugin
    /// never told of (they started before cloak's plugin was in the node's CNI list, or on a
    /// list without it), as `pod-<uid>`, when their namespace is found among the node's
    /// processes; forgets the sandboxes whose pod is gone and whose DEL the daemon did not see.
    async fn adopt_and_forget(&self, pods: &[Arc<Pod>]) {
        let known: std::collections::BTreeSet<String> = {
            let state = self.state.lock().await;
            state.sandboxes.values().map(|s| s.uid.clone()).collect()
        };
        for pod in pods {
            let uid = pod.uid().unwrap_or_default();
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let host = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            if known.contains(&uid) || !running || host || pod.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let namespace = pod.namespace().unwrap_or_default();
            if matches!(self.want(&namespace, pod), Want::NotClient) {
                continue;
            }
            let sandbox = Sandbox {
                namespace,
                name: pod.name_any(),
                uid: uid.clone(),
                netns: None,
            };
            let id = format!("pod-{uid}");
            {
                let mut state = self.state.lock().await;
                state.sandboxes.insert(id.clone(), sandbox.clone());
            }
            if self.netns_of(&id, &sandbox).await.is_none() {
                let mut state = self.state.lock().await;
                state.sandboxes.remove(&id);
                continue;
            }
            tracing::info!(pod = %format!("{}/{}", sandbox.namespace, sandbox.name), "a running pod the plugin never saw is to be a client: taken in");
        }
        let present: std::collections::BTreeSet<String> =
            pods.iter().filter_map(|p| p.uid()).collect();
        let gone: Vec<String> = {
            let state = self.state.lock().await;
            let held: std::collections::BTreeSet<String> = self
                .netns
                .lock()
                .map(|h| h.keys().cloned().collect())
                .unwrap_or_default();
            // A sandbox the plugin told of is forgotten here only when nothing of it is held
            // (its DEL was missed while the daemon was down): a pod of this node not listed
            // yet is not a gone one.
            state
                .sandboxes
                .iter()
                .filter(|(id, s)| {
                    !present.contains(&s.uid)
                        && (id.starts_with("pod-")
                            || !(held.contains(*id) || state.clients.contains_key(*id)))
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in gone {
            self.forget(&id).await;
        }
        // No handle outlives its sandbox.
        let state = self.state.lock().await;
        if let Ok(mut all) = self.netns.lock() {
            all.retain(|id, _| state.sandboxes.contains_key(id));
        }
    }

    /// An Event on a hostNetwork pod of this node that a gateway selects, once per pod: it shares
    /// the node's network and cannot be a client.
    async fn tell_host_network(&self, pods: &[Arc<Pod>]) {
        for pod in pods {
            let host = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            if !host || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let namespace = pod.namespace().unwrap_or_default();
            let gateway = match self.want(&namespace, pod) {
                Want::Client(g) => g.name_any(),
                Want::Refused(_) if pod.labels().contains_key(cloak_api::GATEWAY_LABEL) => {
                    pod.labels()[cloak_api::GATEWAY_LABEL].clone()
                }
                _ => continue,
            };
            let uid = pod.uid().unwrap_or_default();
            let first = self
                .told_host_network
                .lock()
                .is_ok_and(|mut told| told.insert(uid));
            if first {
                self.publish(pod, EventType::Warning, "HostNetwork", format!(
                    "gateway {gateway} selects this pod, but a hostNetwork pod shares the node's network and cannot be a client: its traffic does not go through the gateway"
                )).await;
            }
        }
    }

    /// An Event about `pod` from this node's daemon.
    async fn publish(&self, pod: &Pod, type_: EventType, reason: &str, note: String) {
        let reference = kube::Resource::object_ref(pod, &());
        self.publish_to(&reference, type_, reason, "Attach", note)
            .await;
    }

    /// An Event about the object at `reference` from this node's daemon.
    async fn publish_to(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }

    /// The plugin's DEL: the sandbox's recorded exit port, then the sandbox itself
    /// ([`Daemon::forget`]).
    async fn del(&self, request: &Request) {
        {
            let mut state = self.state.lock().await;
            if state.ports.remove(&request.container_id).is_some() {
                state.guarded = None;
                self.save(&state);
            }
        }
        self.forget(&request.container_id).await;
    }
}

/// Why `transit` (this node's, `own`) cannot be used: the node that other node's internal
/// IPv4 address gives the same one (`10.1.5.7` and `10.2.5.7` both give `198.19.5.7`).
fn transit_clash(
    own: &str,
    transit: Ipv4Addr,
    nodes: impl Iterator<Item = (String, Vec<Ipv4Addr>)>,
) -> Option<String> {
    nodes
        .filter(|(name, _)| name != own)
        .find_map(|(name, addresses)| {
            let clash = addresses.into_iter().find(|a| transit_for(*a) == transit)?;
            Some(format!(
                "this node's transit address {transit} is also node {name}'s (its address {clash}): no pod of either can be a client until one of them changes address"
            ))
        })
}

/// The VXLAN identifiers that more than one exit claims, over every gateway. The operator never
/// gives one twice; a clash means a status that was not its own (a link is keyed by its
/// identifier, and a shared one would send one tenant's clients out of another's exit), so no
/// exit that claims one gets a link.
fn clashing_vnis(gateways: &[&VpnGateway]) -> std::collections::BTreeSet<u32> {
    let mut seen = std::collections::BTreeSet::new();
    gateways
        .iter()
        .filter_map(|g| g.status.as_ref())
        .flat_map(|s| &s.exits)
        .map(|e| e.vni)
        .filter(|vni| *vni != 0 && !seen.insert(*vni))
        .collect()
}

/// The names each client resolves through the cluster DNS when its gateway has no healthy exit,
/// by the client's address: its own gateway's `clusterDomains` and `cluster.local`, never
/// another gateway's (a tenant's `[com]` would send every client's `.com` names to the cluster
/// DNS, outside any tunnel).
fn cluster_domains(
    clients: &BTreeMap<String, Attached>,
    gateways: &[&VpnGateway],
) -> BTreeMap<std::net::IpAddr, Vec<String>> {
    clients
        .values()
        .map(|c| {
            let mut domains: Vec<String> = gateways
                .iter()
                .find(|g| {
                    g.namespace().as_deref() == Some(c.pod_namespace.as_str())
                        && g.name_any() == c.gateway
                })
                .and_then(|g| g.spec.dns.as_ref())
                .map(|d| d.cluster_domains.clone())
                .unwrap_or_default();
            domains.push("cluster.local".into());
            (std::net::IpAddr::V4(c.address), domains)
        })
        .collect()
}

/// Removes everything of the node's in the kernel (`NodePlan::reset`, and `Guard::reset` unless
/// `keep_guard`: exit pods outlive an uninstall that keeps their gateways), in the network
/// namespace at `netns` (None: this process's): what an uninstall would leave behind.
pub fn reset_kernel(
    netns: Option<&std::path::Path>,
    keep_guard: bool,
) -> Result<(), cloak_dataplane::Error> {
    let netns = netns.map(std::path::Path::to_path_buf);
    std::thread::spawn(move || {
        enter(netns.as_ref()).map_err(|e| cloak_dataplane::Error::Command {
            command: "setns".into(),
            stderr: e.to_string(),
        })?;
        NodePlan::reset()?;
        if keep_guard { Ok(()) } else { Guard::reset() }
    })
    .join()
    .unwrap_or_else(|_| {
        Err(cloak_dataplane::Error::Command {
            command: "reset".into(),
            stderr: "the thread panicked".into(),
        })
    })
}

/// The node-side interface of a client: `ckg` and the first 11 characters of its sandbox's id
/// (interface names have at most 15).
pub fn iface_name(container_id: &str) -> String {
    let id: String = container_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(11)
        .collect();
    format!("{}{id}", cloak_dataplane::gateway::CLIENT_PREFIX)
}

pub use cloak_model::gateway::transit_for;

/// The tunnel interface of a pod that is an exit (a chain's hop, the client of the hop before
/// it): its own kill switch rules what leaves by it. `None` for any other pod.
fn own_tunnel(pod: &Pod) -> Option<String> {
    pod.labels()
        .contains_key(cloak_model::exit::LABEL_GATEWAY)
        .then(|| cloak_model::tunnel::DEFAULT_INTERFACE.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_interface_name_fits_and_the_transit_address_follows_the_node() {
        assert_eq!(iface_name("0f3c9a7e1b2d4c5e6f708192"), "ckg0f3c9a7e1b2");
        assert!(iface_name("0f3c9a7e1b2d4c5e6f708192").len() <= 15);
        assert_eq!(
            transit_for(Ipv4Addr::new(10, 200, 0, 11)),
            Ipv4Addr::new(198, 19, 0, 11)
        );
        assert_ne!(
            transit_for(Ipv4Addr::new(10, 0, 0, 1)),
            cloak_dataplane::gateway::EXIT_ADDRESS
        );
    }

    #[test]
    fn a_client_resolves_through_the_cluster_dns_only_its_own_gateways_domains() {
        let gateway = |ns: &str, domains: &[&str]| -> VpnGateway {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway",
                "metadata": {"name": "egress", "namespace": ns},
                "spec": {"exits": {"count": 1}, "dns": {"clusterDomains": domains}},
            }))
            .unwrap()
        };
        let client = |ns: &str, last: u8| Attached {
            pod_namespace: ns.into(),
            pod_name: "app".into(),
            gateway: "egress".into(),
            iface: format!("ckg{last}"),
            address: Ipv4Addr::new(198, 18, 0, last),
        };
        let (a, b) = (gateway("a", &["com"]), gateway("b", &[]));
        let clients = BTreeMap::from([
            ("1".to_owned(), client("a", 2)),
            ("2".to_owned(), client("b", 3)),
        ]);
        let domains = cluster_domains(&clients, &[&a, &b]);
        assert_eq!(
            domains[&std::net::IpAddr::from([198, 18, 0, 2])],
            ["com", "cluster.local"]
        );
        assert_eq!(
            domains[&std::net::IpAddr::from([198, 18, 0, 3])],
            ["cluster.local"],
            "namespace a's domains reached namespace b's client"
        );
        assert_eq!(domains.len(), 2, "only clients are answered");
    }

    #[test]
    fn an_identifier_two_exits_claim_is_a_clash_and_one_exit_alone_is_not() {
        let gateway = |ns: &str, vnis: &[u32]| -> VpnGateway {
            let exits: Vec<serde_json::Value> = vnis
                .iter()
                .enumerate()
                .map(|(i, vni)| serde_json::json!({"name": format!("egress-exit-{i}"), "vni": vni, "health": "Healthy"}))
                .collect();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway",
                "metadata": {"name": "egress", "namespace": ns},
                "spec": {"exits": {"count": 1}},
                "status": {"exits": exits},
            }))
            .unwrap()
        };
        let (a, b) = (gateway("a", &[4096, 4097]), gateway("b", &[4098, 4096, 0]));
        let c = gateway("c", &[0, 4099]);
        assert_eq!(clashing_vnis(&[&a, &b, &c]), [4096].into());
        assert!(clashing_vnis(&[&a, &c]).is_empty());
    }

    #[test]
    fn two_nodes_whose_addresses_end_alike_clash_on_their_transit_address() {
        let own = transit_for(Ipv4Addr::new(10, 1, 5, 7));
        let nodes = |list: &[(&str, [u8; 4])]| {
            list.iter()
                .map(|(name, ip)| ((*name).to_owned(), vec![Ipv4Addr::from(*ip)]))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let clash = transit_clash(
            "a",
            own,
            nodes(&[("a", [10, 1, 5, 7]), ("b", [10, 2, 5, 7])]),
        );
        assert!(
            clash
                .as_deref()
                .is_some_and(|c| c.contains("node b") && c.contains("198.19.5.7")),
            "{clash:?}"
        );
        assert_eq!(
            transit_clash(
                "a",
                own,
                nodes(&[("a", [10, 1, 5, 7]), ("b", [10, 1, 5, 8])])
            ),
            None
        );
    }
}
