//! `cloak portfwd`: forwards host ports to NodePort Services (seed 003, Epok, rebuilt).
//!
//! Watches Services and Nodes, turns them into one desired ruleset (`cloak_model::portfwd`), and
//! loads it as one nftables transaction that replaces cloak's own table and nothing else. A sync
//! whose ruleset equals the last one applied is skipped; bursts of events are debounced; a failed
//! apply is retried with exponential backoff (Epok dropped a failed reconcile for good).
//!
//! Where the ruleset is loaded is the [`Executor`]'s business: `nft -f -` on this host, or the
//! same over SSH to a restricted account on the host when cloak runs inside the cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use cloak_model::portfwd::{self as model, NodeInput, Options, Protocol, ServiceInput};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::io::AsyncWriteExt;

/// Why loading a ruleset failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited with {status}: {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Where rulesets are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executor {
    /// `nft -f -` on this host; with `netns`, inside that network namespace (tests, or a host
    /// whose forwarding lives in a namespace).
    Local { netns: Option<String> },
    /// `ssh [-p port] [-i key] destination <remote command>`, the script on standard input. The
    /// account on the host should be allowed to run only that command (see docs).
    Ssh {
        destination: String,
        port: Option<u16>,
        key: Option<PathBuf>,
        remote_command: String,
        options: Vec<String>,
    },
}

/// How rules are written on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// One nftables table replaced (or its map elements updated) in one `nft -f` transaction.
    #[default]
    Nftables,
    /// `iptables-restore --noflush` into cloak's own chains, for hosts without nft.
    Iptables,
}

/// After the restore, the jumps into cloak's chains are added once (checked with `-C` first).
const IPTABLES_LOAD: &str = "iptables-restore --noflush && \
{ iptables -t nat -C PREROUTING -j CLOAK-PORTFWD 2>/dev/null || iptables -t nat -I PREROUTING 1 -j CLOAK-PORTFWD; } && \
{ iptables -C FORWARD -j CLOAK-PORTFWD-FWD 2>/dev/null || iptables -I FORWARD 1 -j CLOAK-PORTFWD-FWD; }";
/// Removes the jumps (each loop deletes one per pass, and stops when none is left) and the chains.
const IPTABLES_CLEAN: &str = "while iptables -t nat -D PREROUTING -j CLOAK-PORTFWD 2>/dev/null; do :; done; \
iptables -t nat -F CLOAK-PORTFWD 2>/dev/null; iptables -t nat -X CLOAK-PORTFWD 2>/dev/null; \
while iptables -D FORWARD -j CLOAK-PORTFWD-FWD 2>/dev/null; do :; done; \
iptables -F CLOAK-PORTFWD-FWD 2>/dev/null; iptables -X CLOAK-PORTFWD-FWD 2>/dev/null; true";

impl Backend {
    fn loader(self) -> &'static [&'static str] {
        match self {
            Self::Nftables => &["nft", "-f", "-"],
            Self::Iptables => &["sh", "-c", IPTABLES_LOAD],
        }
    }

    /// The whole ruleset.
    pub fn render(self, ruleset: &model::Ruleset) -> String {
        match self {
            Self::Nftables => ruleset.to_nft(),
            Self::Iptables => ruleset.to_iptables_restore(),
        }
    }

    /// Only what changed since `old`, where the backend can express that.
    pub fn update(self, ruleset: &model::Ruleset, old: &model::Ruleset) -> Option<String> {
        match self {
            Self::Nftables => ruleset.update_from(old),
            Self::Iptables => None,
        }
    }
}

impl Executor {
    fn command(&self, loader: &[&str]) -> tokio::process::Command {
        match self {
            Self::Local { netns: None } => {
                let mut c = tokio::process::Command::new(loader[0]);
                c.args(&loader[1..]);
                c
            }
            Self::Local { netns: Some(ns) } => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).args(loader);
                c
            }
            Self::Ssh {
                destination,
                port,
                key,
                remote_command,
                options,
            } => {
                let mut c = tokio::process::Command::new("ssh");
                c.args(["-o", "BatchMode=yes"]);
                for option in options {
                    c.args(["-o", option]);
                }
                if let Some(port) = port {
                    c.args(["-p", &port.to_string()]);
                }
                if let Some(key) = key {
                    c.arg("-i").arg(key);
                }
                c.arg(destination).arg(remote_command);
                c
            }
        }
    }

    /// Loads an nftables script: one `nft -f` run, so one transaction.
    pub async fn load(&self, script: &str) -> Result<(), Error> {
        self.load_with(Backend::Nftables, script).await
    }

    /// Loads `script` with `backend`'s loader. Over SSH the remote account's command decides.
    pub async fn load_with(&self, backend: Backend, script: &str) -> Result<(), Error> {
        self.run(backend.loader(), script).await
    }

    /// What is loaded now, as the kernel lists it, to compare with what was listed right after
    /// the last load: any difference is drift (someone flushed the table or edited it). For
    /// nftables the listing goes through the same loader (`nft -f -` runs `list` commands too),
    /// so it works over SSH with the restricted account. iptables is read back locally only
    /// (`None`: the SSH account's command loads, it cannot list).
    pub async fn read_back(&self, backend: Backend) -> Option<Result<String, Error>> {
        match (backend, self) {
            (Backend::Nftables, _) => Some(
                self.output(
                    backend.loader(),
                    &format!("list table ip {}\n", model::TABLE),
                )
                .await,
            ),
            (Backend::Iptables, Self::Local { .. }) => Some(
                self.output(
                    &["sh", "-c", "iptables-save -t nat; iptables-save -t filter"],
                    "",
                )
                .await
                // Only cloak's rules and the jumps to them; the counters of other chains
                // change with traffic.
                .map(|saved| {
                    saved
                        .lines()
                        .filter(|l| l.starts_with("-A") && l.contains("CLOAK-PORTFWD"))
                        .collect::<Vec<_>>()
                        .join("\n")
                }),
            ),
            (Backend::Iptables, Self::Ssh { .. }) => None,
        }
    }

    /// Runs `program` here, in the namespace, or over SSH, with `script` on its standard input;
    /// a non-zero exit is an error carrying its standard error.
    async fn run(&self, program: &[&str], script: &str) -> Result<(), Error> {
        self.output(program, script).await.map(drop)
    }

    /// [`Self::run`], returning the standard output.
    async fn output(&self, program: &[&str], script: &str) -> Result<String, Error> {
        let mut command = self.command(program);
        let program = format!("{:?}", command.as_std());
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                program: program.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error shows up as the command's failure below.
            let _ = stdin.write_all(script.as_bytes()).await;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|source| Error::Spawn {
                program: program.clone(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(Error::Failed {
                program,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// Removes everything cloak owns for `backend` and nothing else: its table, or its chains
    /// and the jumps to them. Succeeds when there is nothing to remove.
    pub async fn clean_with(&self, backend: Backend) -> Result<(), Error> {
        match backend {
            Backend::Nftables => self.run(backend.loader(), &model::clean_script()).await,
            Backend::Iptables => self.run(&["sh", "-c", IPTABLES_CLEAN], "").await,
        }
    }
}

/// Settings of `cloak portfwd`.
#[derive(Debug, Clone)]
pub struct Config {
    pub options: Options,
    pub executor: Executor,
    pub backend: Backend,
    /// Quiet time after an event before syncing, so a burst becomes one sync.
    pub debounce: Duration,
    /// How often what is loaded is read back and compared with what was loaded; a difference
    /// (drift) is repaired by a full load.
    pub resync: Duration,
    /// Identity in Events.
    pub instance: String,
}

/// The forwarder's metrics, registered under `cloak_portfwd_*`.
#[derive(Debug)]
pub struct Metrics {
    pub syncs: Counter,
    pub skipped: Counter,
    pub failures: Counter,
    /// Loads of the whole table, and of only the changed map elements.
    pub full_loads: Counter,
    pub delta_loads: Counter,
    /// Read-backs that differed from what was loaded (each repaired by a full load).
    pub drift: Counter,
    pub rules: Gauge,
    pub apply_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            syncs: Counter::default(),
            skipped: Counter::default(),
            failures: Counter::default(),
            full_loads: Counter::default(),
            delta_loads: Counter::default(),
            drift: Counter::default(),
            rules: Gauge::default(),
            apply_seconds: Histogram::new([0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register("portfwd_syncs", "Rulesets applied", self.syncs.clone());
        registry.register(
            "portfwd_skipped",
            "Syncs skipped: nothing changed",
            self.skipped.clone(),
        );
        registry.register(
            "portfwd_failures",
            "Failed applies (retried)",
            self.failures.clone(),
        );
        registry.register(
            "portfwd_full_loads",
            "Loads of the whole table",
            self.full_loads.clone(),
        );
        registry.register(
            "portfwd_delta_loads",
            "Loads of only the changed map elements",
            self.delta_loads.clone(),
        );
        registry.register(
            "portfwd_drift",
            "Read-backs that differed from what was loaded, each repaired by a full load",
            self.drift.clone(),
        );
        registry.register(
            "portfwd_rules",
            "Forwarded ports in the applied ruleset",
            self.rules.clone(),
        );
        registry.register(
            "portfwd_apply_duration_seconds",
            "Time to load one ruleset",
            self.apply_seconds.clone(),
        );
    }
}

fn service_input(service: &Service) -> ServiceInput {
    let mut node_ports = BTreeMap::new();
    for port in service.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
        let protocol = if port.protocol.as_deref() == Some("UDP") {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        if let (Ok(p), Some(Ok(np))) = (u16::try_from(port.port), port.node_port.map(u16::try_from))
        {
            node_ports.insert((p, protocol), np);
        }
    }
    ServiceInput {
        namespace: service.namespace().unwrap_or_default(),
        name: service.name_any(),
        annotations: service.annotations().clone(),
        node_ports,
    }
}

fn node_input(node: &Node) -> NodeInput {
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let internal_ip = status
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
        .and_then(|a| a.address.parse().ok());
    let excluded = model::excluded(node.annotations(), node.labels());
    NodeInput {
        name: node.name_any(),
        ready,
        excluded,
        internal_ip,
    }
}

/// Runs the forwarder until `shutdown` resolves. `ready` is set once the first ruleset is loaded.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (services, service_writer) = reflector::store::<Service>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (tx_s, tx_n) = (tx.clone(), tx);
    let service_events = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(service_writer)
    .for_each(move |_| {
        let _ = tx_s.send(());
        futures::future::ready(())
    });
    let node_events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(node_writer)
        .for_each(move |_| {
            let _ = tx_n.send(());
            futures::future::ready(())
        });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "cloak-portfwd".into(),
            instance: Some(config.instance.clone()),
        },
    );

    let sync_loop = async {
        let _ = tokio::join!(services.wait_until_ready(), nodes.wait_until_ready());
        // What was last loaded, and how the kernel listed it right after: `None` after a failed
        // load or a drift, so the next load is a full one.
        let mut applied: Option<(model::Ruleset, Option<String>)> = None;
        let mut reported: BTreeSet<String> = BTreeSet::new();
        loop {
            let mut backoff = Duration::from_millis(200);
            loop {
                let ruleset = sync_once(
                    &services,
                    &nodes,
                    &config,
                    &recorder,
                    &mut reported,
                    &metrics,
                )
                .await;
                if applied.as_ref().is_some_and(|(a, _)| a == &ruleset) {
                    metrics.skipped.inc();
                    break;
                }
                // Only what changed when only map elements changed; the whole table otherwise.
                let delta = applied
                    .as_ref()
                    .and_then(|(old, _)| config.backend.update(&ruleset, old));
                let full = delta.is_none();
                // A full load repairs whatever changed outside cloak since the last one: count
                // that as drift, as the resync would have (a change can come first).
                if full && drifted(&config, applied.as_ref()).await {
                    metrics.drift.inc();
                    tracing::warn!(
                        "the loaded rules changed outside cloak; the next load is full anyway"
                    );
                }
                let script = delta.unwrap_or_else(|| config.backend.render(&ruleset));
                let started = Instant::now();
                match config.executor.load_with(config.backend, &script).await {
                    Ok(()) => {
                        metrics
                            .apply_seconds
                            .observe(started.elapsed().as_secs_f64());
                        metrics.syncs.inc();
                        if full {
                            metrics.full_loads.inc();
                        } else {
                            metrics.delta_loads.inc();
                        }
                        tracing::info!(
                            forwards = ruleset.forwards.len(),
                            bytes = script.len(),
                            full,
                            "ruleset applied"
                        );
                        let listed = match config.executor.read_back(config.backend).await {
                            Some(Ok(listed)) => Some(listed),
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "reading back the loaded rules failed");
                                None
                            }
                            None => None,
                        };
                        applied = Some((ruleset, listed));
                        ready.store(true, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        metrics.failures.inc();
                        // A delta that failed on rules changed outside cloak (a flushed table)
                        // is that drift, noticed by the load before the resync could.
                        if !full && drifted(&config, applied.as_ref()).await {
                            metrics.drift.inc();
                            tracing::warn!(
                                "the loaded rules changed outside cloak; loading them in full"
                            );
                        }
                        // Whatever the failed script was, the next attempt loads it all: a
                        // delta that failed once (an element someone removed) fails again.
                        applied = None;
                        tracing::warn!(error = %e, full, retry_in = ?backoff, "applying the ruleset failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            // Until the next change: every `resync`, check that what is loaded is still what
            // was loaded.
            loop {
                tokio::select! {
                    event = rx.recv() => {
                        if event.is_none() {
                            return;
                        }
                        // Debounce: wait until events stop arriving for `debounce`.
                        while let Ok(Some(())) = tokio::time::timeout(config.debounce, rx.recv()).await {}
                        break;
                    }
                    () = tokio::time::sleep(config.resync) => {
                        let Some((_, listed)) = applied.as_mut() else { continue };
                        let Some(expected) = listed.as_ref() else {
                            if config.executor.read_back(config.backend).await.is_none() {
                                continue; // this backend cannot be read back here
                            }
                            // The read-back after the last load failed, so what is loaded was
                            // never confirmed: load it all again.
                            metrics.drift.inc();
                            applied = None;
                            break;
                        };
                        let now = config.executor.read_back(config.backend).await;
                        if let Some(Ok(now)) = &now && now == expected {
                            continue;
                        }
                        metrics.drift.inc();
                        tracing::warn!(
                            read_back = ?now.map(|r| r.map(|l| l.len())),
                            "the loaded rules changed outside cloak; reloading them in full"
                        );
                        applied = None;
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = shutdown => {},
        () = sync_loop => {},
        () = service_events => {},
        () = node_events => {},
    }
}

/// Whether what is loaded now differs from what the kernel listed right after the last load
/// (`applied`; nothing to compare when that listing failed or the backend cannot be read back).
async fn drifted(config: &Config, applied: Option<&(model::Ruleset, Option<String>)>) -> bool {
    let Some((_, Some(expected))) = applied else {
        return false;
    };
    match config.executor.read_back(config.backend).await {
        Some(Ok(now)) => now != *expected,
        Some(Err(_)) => true,
        None => false,
    }
}

/// Computes the ruleset from the caches and reports, as Events, Services newly rejected and
/// Services whose `cloak.dev` and Epok annotations newly disagree.
async fn sync_once(
    services: &Store<Service>,
    nodes: &Store<Node>,
    config: &Config,
    recorder: &Recorder,
    reported: &mut BTreeSet<String>,
    metrics: &Metrics,
) -> model::Ruleset {
    let service_inputs: Vec<ServiceInput> =
        services.state().iter().map(|s| service_input(s)).collect();
    let node_inputs: Vec<NodeInput> = nodes.state().iter().map(|n| node_input(n)).collect();
    let (ruleset, rejected) = model::desired(&service_inputs, &node_inputs, &config.options);
    metrics
        .rules
        .set(i64::try_from(ruleset.forwards.len()).unwrap_or(i64::MAX));
    let rejected = rejected.into_iter().map(|r| {
        (
            r.namespace.clone(),
            r.name.clone(),
            "InvalidPortForward",
            r.message(),
        )
    });
    let conflicts = model::conflicts(&service_inputs).into_iter().map(|c| {
        (
            c.namespace.clone(),
            c.name.clone(),
            "ConflictingAnnotations",
            c.to_string(),
        )
    });
    let mut now_reported = BTreeSet::new();
    for (namespace, name, reason, note) in rejected.chain(conflicts) {
        let key = format!("{namespace}/{name}: {reason}: {note}");
        if !reported.contains(&key) {
            tracing::warn!(service = %format!("{namespace}/{name}"), reason, "{note}");
            if let Some(service) =
                services.get(&reflector::ObjectRef::new(&name).within(&namespace))
            {
                let event = Event {
                    type_: EventType::Warning,
                    reason: reason.into(),
                    note: Some(note),
                    action: "PortForward".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &service.object_ref(&())).await {
                    tracing::warn!(error = %e, "publishing an event failed");
                }
            }
        }
        now_reported.insert(key);
    }
    *reported = now_reported;
    ruleset
}
