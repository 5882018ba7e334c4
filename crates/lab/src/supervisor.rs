//! `up`, `supervise`, `down` and `status`: the lab's life cycle.
//!
//! `up` writes the options into the lab's directory and starts `cloak lab supervise` detached;
//! the supervisor reports each step into `progress` (`begin`/`done <ms>`/`ready`/`failed`),
//! which `up` prints as it goes. Once ready, the supervisor holds every process until SIGTERM
//! (from `down`) or until its owner process exits (tests pass their PID), then stops them and
//! reaps the lab.

use std::{
    fmt::Write as _,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{
    cluster::{self, Binaries},
    echo,
    error::{Error, Result},
    images,
    layout::{self, Lab, TunnelKind},
    procs::{self, Procs},
    prometheus, proxy, reap, sh, vpn,
};

pub use reap::Reaped;

/// Everything `up` needs besides the lab's name.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpOptions {
    pub nodes: u8,
    /// The nodes' CNI configuration (a lab written before this option ran the bridge plugin).
    #[serde(default)]
    pub cni: Cni,
    pub kubernetes_bin: PathBuf,
    pub lab_bin: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// `charts/cloak`.
    pub chart: PathBuf,
    /// `examples/lab`: applied once cloak runs.
    pub examples: PathBuf,
    /// The `cloak` binary the image is built from.
    pub cloak: PathBuf,
    /// The command that runs `cloak lab supervise --name <lab>` (the name is appended).
    pub supervisor: Vec<String>,
    /// Stop the lab when this process exits (tests pass their own PID).
    pub owner: Option<u32>,
    /// Prometheus, promtool and the prometheus-operator's CRDs (`tools/build-prometheus.sh`);
    /// empty: the lab runs no Prometheus (a lab written before it had one).
    #[serde(default)]
    pub prometheus_bin: PathBuf,
}

/// A gluetun provider's Secret as a gluetun user holds it (`<provider>-gluetun`: the account's
/// key and address, and a filter to the Netherlands' servers), and the ConfigMap
/// `<provider>-servers` with the lab's server list, `servers.json` as gluetun names it.
fn gluetun_example(lab: &Lab, p: &layout::Provider, config: &str) -> Result<String> {
    let key = config
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .ok_or_else(|| Error::Other(format!("{}: no PrivateKey in server 1's config", p.name)))?;
    let path = vpn::server_list_file(lab);
    let list = fs::read_to_string(&path).map_err(Error::io(&path))?;
    let quote = |v: &str| serde_json::to_string(v).map_err(|e| Error::Other(e.to_string()));
    Ok(format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-gluetun\n  namespace: {DEMO_NAMESPACE}\n  labels: {{app.kubernetes.io/part-of: cloak-lab}}\nstringData:\n  VPN_SERVICE_PROVIDER: {service}\n  VPN_TYPE: wireguard\n  WIREGUARD_PRIVATE_KEY: {key}\n  WIREGUARD_ADDRESSES: {address}/32\n  SERVER_COUNTRIES: Netherlands\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}-servers\n  namespace: {DEMO_NAMESPACE}\n  labels: {{app.kubernetes.io/part-of: cloak-lab}}\ndata:\n  servers.json: {list}\n",
        name = p.name,
        service = layout::GLUETUN_SERVICE,
        key = quote(key)?,
        address = p.account_address(),
        list = quote(&list)?,
    ))
}

impl UpOptions {
    fn binaries(&self) -> Binaries {
        Binaries {
            kubernetes: self.kubernetes_bin.clone(),
            lab: self.lab_bin.clone(),
            kubectl: self.kubectl.clone(),
            helm: self.helm.clone(),
        }
    }
}

/// What the nodes' container runtime calls for a pod's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cni {
    /// The `bridge` plugin (with host-local IPAM), alone in the node's conflist.
    #[default]
    Bridge,
    /// Multus (its thin plugin) as the meta-plugin, with that same bridge list inline as its
    /// cluster network, as Multus's DaemonSet writes its configuration by default.
    Multus,
}

impl std::str::FromStr for Cni {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bridge" => Ok(Self::Bridge),
            "multus" => Ok(Self::Multus),
            other => Err(format!("{other:?}: the lab's CNI is `bridge` or `multus`")),
        }
    }
}

impl std::fmt::Display for Cni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bridge => "bridge",
            Self::Multus => "multus",
        })
    }
}

/// The longest `up` waits for the supervisor to report ready.
const UP_TIMEOUT: Duration = Duration::from_mins(10);
/// The namespace cloak is installed into, and the examples' namespace.
pub const CLOAK_NAMESPACE: &str = "cloak-system";
pub const DEMO_NAMESPACE: &str = "cloak-demo";

impl Lab {
    /// Brings the lab up, or does nothing when it already is. Prints progress to `out`.
    pub fn up(&self, options: &UpOptions, out: &mut dyn Write) -> Result<()> {
        if options.nodes == 0 || options.nodes > layout::MAX_NODES {
            return Err(Error::Other(format!(
                "--nodes {}: a lab has 1 to {} nodes",
                options.nodes,
                layout::MAX_NODES
            )));
        }
        if supervisor_pid(self).is_some() {
            if progress(self).iter().any(|l| l.starts_with("ready")) {
                let _ = writeln!(
                    out,
                    "lab {} is already up (`cloak lab status`)",
                    self.name()
                );
                let running = fs::read_to_string(self.dir().join("options.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<UpOptions>(&t).ok())
                    .map_or((options.nodes, options.cni), |o| (o.nodes, o.cni));
                if running != (options.nodes, options.cni) {
                    let _ = writeln!(
                        out,
                        "it has {} nodes under {}, not {} under {}: `cloak lab down` first to change that",
                        running.0, running.1, options.nodes, options.cni
                    );
                }
                return Ok(());
            }
            let _ = writeln!(
                out,
                "lab {} is coming up; following its progress",
                self.name()
            );
            return self.follow(out, None);
        }
        if self.dir().exists() || !reap::lab_namespaces(self).is_empty() {
            let reaped = reap::reap(self)?;
            let _ = writeln!(
                out,
                "removed what a previous lab {} left: {reaped}",
                self.name()
            );
        }
        options.binaries().check(options.cni)?;
        fs::create_dir_all(self.dir()).map_err(Error::io(self.dir()))?;
        let options_file = self.dir().join("options.json");
        fs::write(
            &options_file,
            serde_json::to_string_pretty(options).map_err(|e| Error::Other(e.to_string()))?,
        )
        .map_err(Error::io(&options_file))?;
        let log_path = self.dir().join("supervisor.log");
        let log = fs::File::create(&log_path).map_err(Error::io(&log_path))?;
        let err = log.try_clone().map_err(Error::io(&log_path))?;
        let (program, args) = options
            .supervisor
            .split_first()
            .ok_or_else(|| Error::Other("no supervisor command".into()))?;
        // Its own process group: a Ctrl-C aimed at `up` does not cut the lab down half-built.
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(program)
                .args(args)
                .args(["--name", self.name()])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .process_group(0)
                .spawn()
                .map_err(|e| Error::Other(format!("starting the lab supervisor {program}: {e}")))?
        };
        // Recorded here too (the supervisor writes the same), so `follow` never sees a lab
        // without a supervisor while it starts.
        let identity = procs::identity(child.id()).unwrap_or_default();
        fs::write(self.supervisor_file(), identity).map_err(Error::io(self.supervisor_file()))?;
        let _ = writeln!(
            out,
            "lab {}: {} nodes under {}, supervisor PID {} (log {})",
            self.name(),
            options.nodes,
            options.cni,
            child.id(),
            log_path.display()
        );
        self.follow(out, Some(&mut child))
    }

    /// Prints the supervisor's progress until it is ready or failed. `child` is the supervisor
    /// when this process started it: its exit is then seen at once (it stays a zombie, whose
    /// identity still matches, until waited for).
    fn follow(
        &self,
        out: &mut dyn Write,
        mut child: Option<&mut std::process::Child>,
    ) -> Result<()> {
        let deadline = Instant::now() + UP_TIMEOUT;
        let mut shown = 0;
        loop {
            let lines = progress(self);
            for line in &lines[shown.min(lines.len())..] {
                let mut fields = line.splitn(3, '\t');
                match (fields.next(), fields.next(), fields.next()) {
                    (Some("begin"), Some(step), _) => {
                        let _ = writeln!(out, "  … {step}");
                    }
                    (Some("done"), Some(step), Some(ms)) => {
                        let _ = writeln!(out, "  ✓ {step} ({})", seconds(ms));
                    }
                    (Some("ready"), Some(ms), _) => {
                        let _ = writeln!(
                            out,
                            "lab {} is up in {}: `cloak lab status`, `cloak lab kubectl get vpnmasks -A`",
                            self.name(),
                            seconds(ms)
                        );
                        return Ok(());
                    }
                    (Some("failed"), Some(message), _) => {
                        return Err(Error::Other(format!(
                            "lab {} failed to come up: {}\n(logs in {}; `cloak lab down` removes it)",
                            self.name(),
                            message.replace("\\n", "\n"),
                            self.dir().join("logs").display()
                        )));
                    }
                    _ => {}
                }
                let _ = out.flush();
            }
            shown = lines.len();
            let exited = match child.as_mut() {
                Some(child) => !matches!(child.try_wait(), Ok(None)),
                None => supervisor_pid(self).is_none(),
            };
            if exited {
                return Err(Error::Other(format!(
                    "the lab supervisor exited before the lab was up; its log:\n{}",
                    procs::tail(&self.dir().join("supervisor.log"), 30)
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("lab {} up", self.name()),
                    seconds: UP_TIMEOUT.as_secs(),
                    detail: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the lab and removes everything it made. Nothing to do is not an error.
    pub fn down(&self) -> Result<Reaped> {
        let supervised = supervisor_pid(self);
        if let Some(pid) = supervised {
            let identity = procs::identity(pid);
            procs::signal(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(90);
            // On the process, not on its pid file: the supervisor's own reap deletes the file
            // before it is done.
            while procs::identity(pid).is_some() && procs::identity(pid) == identity {
                if Instant::now() > deadline {
                    procs::signal(pid, Signal::SIGKILL);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let mut reaped = reap::reap(self)?;
        reaped.supervisor_stopped = supervised.is_some();
        Ok(reaped)
    }

    /// Whether the lab's supervisor process runs (building, up, or tearing down).
    pub fn supervisor_alive(&self) -> bool {
        supervisor_pid(self).is_some()
    }

    /// Whether the supervisor runs and reported ready.
    pub fn is_up(&self) -> bool {
        supervisor_pid(self).is_some() && progress(self).iter().any(|l| l.starts_with("ready"))
    }

    /// The supervisor: builds the lab, then holds it until SIGTERM, SIGINT or the owner's exit.
    pub fn supervise(&self) -> Result<()> {
        let options_file = self.dir().join("options.json");
        let options: UpOptions = serde_json::from_str(
            &fs::read_to_string(&options_file).map_err(Error::io(&options_file))?,
        )
        .map_err(|e| Error::Other(format!("{}: {e}", options_file.display())))?;
        // Caught from here on (one that comes while the lab is built stops it once built).
        let signals = procs::StopSignals::install()?;
        let me = procs::identity(std::process::id()).unwrap_or_default();
        fs::write(self.supervisor_file(), &me).map_err(Error::io(self.supervisor_file()))?;
        if let Some(owner) = options.owner {
            watch_owner(owner)?;
        }
        let began = Instant::now();
        let mut procs = Procs::new(self.dir())?;
        let mut servers = Vec::new();
        let built = self.build(&options, &mut procs, &mut servers);
        match &built {
            Ok(()) => report(self, &format!("ready\t{}", began.elapsed().as_millis())),
            Err(e) => report(
                self,
                &format!("failed\t{}", e.to_string().replace('\n', "\\n")),
            ),
        }
        if built.is_err() {
            // A failed lab stops its processes at once but keeps its logs for the user until
            // `down` (or the owner's exit) removes it with the rest.
            drop(std::mem::take(&mut servers));
            procs.stop_all();
        }
        // Held until told to stop; a process that dies meanwhile is for `status` to show.
        signals.wait();
        drop(servers);
        procs.stop_all();
        reap::reap(self)?;
        built
    }

    fn build(
        &self,
        options: &UpOptions,
        procs: &mut Procs,
        servers: &mut Vec<vpn::WireguardServer>,
    ) -> Result<()> {
        let bins = options.binaries();
        step(self, "images (cloak, pause, coredns, client)", || {
            build_images(self, options)
        })?;
        step(self, "network namespaces and links", || {
            cluster::network(self, options.nodes)
        })?;
        step(self, "internet: echo, DNS, fake VPN providers", || {
            let net = format!("/var/run/netns/{}", self.netns("net"));
            echo::start(&net, self.dir().join("echo.json"), self.dir().join("www"))?;
            cluster::internet_dns(self, &bins, procs)?;
            for p in &layout::PROVIDERS {
                servers.extend(vpn::start(self, p, procs)?);
            }
            Ok(())
        })?;
        step(self, "control plane", || {
            let cp = format!("/var/run/netns/{}", self.netns("cp"));
            let port = proxy::start(&cp, 0)?;
            fs::write(self.dir().join("api-port"), port.to_string())
                .map_err(Error::io(self.dir().join("api-port")))?;
            cluster::control_plane(self, &bins, procs, port)
        })?;
        reap::record_sysctls()?;
        let archives = image_archives(self);
        for k in 1..=options.nodes {
            step(self, &format!("node {}", layout::node_name(k)), || {
                cluster::node(self, &bins, procs, k, options.cni, &archives)
            })?;
        }
        step(self, "nodes Ready", || {
            wait_nodes_ready(self, &bins, procs, options.nodes)
        })?;
        step(self, "cluster DNS (CoreDNS)", || cluster_dns(self, &bins))?;
        let monitored = !options.prometheus_bin.as_os_str().is_empty();
        if monitored {
            step(self, "PodMonitor and PrometheusRule CRDs", || {
                prometheus::install_crds(self, &options.kubectl, &options.prometheus_bin)
            })?;
        }
        step(self, "cloak (helm install)", || {
            helm_install(self, options, monitored)
        })?;
        step(self, "cloak portfwd (host namespace)", || {
            portfwd(self, options, procs)
        })?;
        if monitored {
            step(self, "Prometheus (node 1)", || {
                let token = crate::lab_kubectl_jsonpath(
                    self,
                    &options.kubectl,
                    &[
                        "-n",
                        CLOAK_NAMESPACE,
                        "get",
                        "secret",
                        "cloak-metrics-token",
                    ],
                    "{.data.token}",
                )?;
                let token = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    token.trim(),
                )
                .map_err(|e| Error::Other(format!("the metrics reader token: {e}")))?;
                prometheus::start(
                    self,
                    procs,
                    &options.prometheus_bin,
                    &options.chart,
                    &String::from_utf8_lossy(&token),
                )
                .map(drop)
            })?;
        }
        step(self, "examples", || examples(self, options))?;
        Ok(())
    }

    /// `kubectl` against the lab, as `cloak lab kubectl` runs it.
    pub fn kubectl(&self, kubectl: &Path) -> Command {
        let mut command = Command::new(kubectl);
        command.arg("--kubeconfig").arg(self.kubeconfig());
        command
    }

    /// What the echo service last saw per `?from=` name: name → (source address, unix time).
    pub fn echo_seen(&self) -> std::collections::BTreeMap<String, (String, u64)> {
        echo::seen(&self.dir().join("echo.json"))
    }

    /// The status table.
    pub fn status(&self, kubectl: &Path) -> Result<String> {
        crate::status::render(self, kubectl)
    }
}

/// The supervisor's PID when it is alive (its recorded identity matches a live process).
pub(crate) fn supervisor_pid(lab: &Lab) -> Option<u32> {
    let recorded = fs::read_to_string(lab.supervisor_file()).ok()?;
    let pid: u32 = recorded.split_whitespace().next()?.parse().ok()?;
    (procs::identity(pid).as_deref() == Some(recorded.trim())).then_some(pid)
}

fn progress(lab: &Lab) -> Vec<String> {
    fs::read_to_string(lab.progress_file())
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn report(lab: &Lab, line: &str) {
    if let Ok(mut file) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.progress_file())
    {
        let _ = writeln!(file, "{line}");
    }
}

fn step<T>(lab: &Lab, name: &str, run: impl FnOnce() -> Result<T>) -> Result<T> {
    report(lab, &format!("begin\t{name}"));
    let began = Instant::now();
    let value = run().map_err(|e| Error::Other(format!("{name}: {e}")))?;
    report(
        lab,
        &format!("done\t{name}\t{}", began.elapsed().as_millis()),
    );
    Ok(value)
}

fn seconds(ms: &str) -> String {
    let ms: f64 = ms.trim().parse().unwrap_or(0.0);
    format!("{:.1} s", ms / 1000.0)
}

/// SIGTERMs this process when `owner` exits (checked every 500 ms).
fn watch_owner(owner: u32) -> Result<()> {
    let identity = procs::identity(owner)
        .ok_or_else(|| Error::Other(format!("owner process {owner} is not running")))?;
    std::thread::Builder::new()
        .name("owner".into())
        .spawn(move || {
            while procs::identity(owner).as_deref() == Some(identity.as_str()) {
                std::thread::sleep(Duration::from_millis(500));
            }
            procs::signal(std::process::id(), Signal::SIGTERM);
        })
        .map(drop)
        .map_err(|e| Error::Other(format!("watching the owner: {e}")))
}

fn image_archives(lab: &Lab) -> Vec<PathBuf> {
    ["cloak", "pause", "coredns", "client"]
        .iter()
        .map(|n| lab.dir().join("images").join(format!("{n}.tar")))
        .collect()
}

fn build_images(lab: &Lab, options: &UpOptions) -> Result<()> {
    let dir = lab.dir().join("images");
    fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let built = [
        ("cloak", images::cloak(&options.cloak)?),
        ("pause", images::pause(&options.lab_bin.join("pause"))?),
        (
            "coredns",
            images::coredns(&options.lab_bin.join("coredns"))?,
        ),
        ("client", images::client(&options.lab_bin.join("udp-echo"))?),
    ];
    for (file, image) in built {
        image.write_archive(&dir.join(format!("{file}.tar")))?;
    }
    Ok(())
}

fn kubectl_json(lab: &Lab, bins_kubectl: &Path, args: &[&str]) -> Result<Value> {
    let mut command = lab.kubectl(bins_kubectl);
    command.args(args).args(["-o", "json"]);
    let text = sh::output(&mut command)?;
    serde_json::from_str(&text).map_err(|e| Error::Other(format!("kubectl {args:?}: {e}")))
}

fn kubectl_apply(lab: &Lab, kubectl: &Path, yaml: &str) -> Result<()> {
    let mut argv: Vec<String> = vec![
        kubectl.to_string_lossy().into_owned(),
        "--kubeconfig".into(),
        lab.kubeconfig().to_string_lossy().into_owned(),
    ];
    argv.extend(["apply", "--server-side", "--force-conflicts", "-f", "-"].map(String::from));
    sh::run_with_input(&argv, yaml).map(drop)
}

fn wait_nodes_ready(lab: &Lab, bins: &Binaries, procs: &mut Procs, nodes: u8) -> Result<()> {
    sh::wait_for(
        "every node Ready",
        Duration::from_mins(2),
        Duration::from_millis(250),
        || {
            procs.check_all().map_err(|e| e.to_string())?;
            let list =
                kubectl_json(lab, &bins.kubectl, &["get", "nodes"]).map_err(|e| e.to_string())?;
            let ready = list["items"]
                .as_array()
                .map_or(0, |items| items.iter().filter(|n| node_ready(n)).count());
            if ready == usize::from(nodes) {
                Ok(Some(()))
            } else {
                Err(format!("{ready} of {nodes} Ready"))
            }
        },
    )
}

pub(crate) fn node_ready(node: &Value) -> bool {
    node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn cluster_dns(lab: &Lab, bins: &Binaries) -> Result<()> {
    kubectl_apply(lab, &bins.kubectl, &crate::manifests::coredns())?;
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--"])
        .arg(&bins.kubectl)
        .arg("--kubeconfig")
        .arg(lab.kubeconfig());
    command.args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deployment/coredns",
        "--timeout=120s",
    ]);
    sh::output(&mut command).map(drop)
}

/// `monitored`: the chart's PodMonitors, PrometheusRule and dashboard too (their CRDs are in).
fn helm_install(lab: &Lab, options: &UpOptions, monitored: bool) -> Result<()> {
    // Under the supervisor's death signal like its servers: a killed supervisor leaves no helm
    // waiting out its timeout.
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--"])
        .arg(&options.helm)
        .arg("upgrade")
        .arg("--install")
        .arg("cloak")
        .arg(&options.chart)
        .args(["--namespace", CLOAK_NAMESPACE, "--create-namespace"])
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .args(
            crate::manifests::HELM_VALUES
                .iter()
                .flat_map(|v| ["--set", v]),
        )
        .args(
            crate::manifests::MONITORING_VALUES
                .iter()
                .filter(|_| monitored)
                .flat_map(|v| ["--set", v]),
        )
        .args(["--wait", "--timeout", "180s"]);
    sh::output(&mut command).map(drop)
}

/// `cloak portfwd` on the lab's host: forwards the host's `ext0` ports to NodePort Services.
fn portfwd(lab: &Lab, options: &UpOptions, procs: &mut Procs) -> Result<()> {
    procs
        .spawn(
            "portfwd",
            &sh::in_netns(
                &lab.netns("host"),
                [
                    "env".into(),
                    format!("KUBECONFIG={}", cluster::cluster_kubeconfig(lab).display()),
                    options.cloak.to_string_lossy().into_owned(),
                    "portfwd".into(),
                    "--interfaces=ext0".into(),
                    // On the lan: the lab's Prometheus scrapes it.
                    format!(
                        "--admin-addr={}:{}",
                        layout::HOST,
                        prometheus::PORTFWD_ADMIN_PORT
                    ),
                    "local".into(),
                ],
            ),
            None,
        )
        .map(drop)
}

/// The fake providers' Secrets (their keys are made fresh per lab): `<provider>-credentials`
/// with server 1, `<provider>-pool` with the gateway's, `<provider>-chain` with the chains'; for
/// a gluetun provider, `<provider>-gluetun` and its server list. Then `examples/lab`.
fn examples(lab: &Lab, options: &UpOptions) -> Result<()> {
    let mut secrets = String::new();
    for p in &layout::PROVIDERS {
        let config = vpn::client_config(lab, p, 1)?;
        if p.gluetun {
            secrets.push_str(&gluetun_example(lab, p, &config)?);
            continue;
        }
        let (key, ext) = match p.kind {
            TunnelKind::Wireguard => ("wg0.conf", "conf"),
            TunnelKind::OpenVpn => ("config.ovpn", "ovpn"),
        };
        let value = serde_json::to_string(&config).map_err(|e| Error::Other(e.to_string()))?;
        let _ = write!(
            secrets,
            "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-credentials\n  namespace: {DEMO_NAMESPACE}\n  labels: {{app.kubernetes.io/part-of: cloak-lab}}\nstringData:\n  {key}: {value}\n",
            name = p.name
        );
        // The rest, for the gateway's exits (`examples/lab/50-gateway.yaml`) and the chains'
        // hops (`60-chain.yaml`): one file a server, so that no two users of the provider's one
        // account key ever share a server.
        for (pool, servers) in [
            ("pool", 2..p.chain_from),
            ("chain", p.chain_from..p.servers + 1),
        ] {
            let _ = write!(
                secrets,
                "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-{pool}\n  namespace: {DEMO_NAMESPACE}\n  labels: {{app.kubernetes.io/part-of: cloak-lab}}\nstringData:\n",
                name = p.name
            );
            for k in servers {
                let value = serde_json::to_string(&vpn::client_config(lab, p, k)?)
                    .map_err(|e| Error::Other(e.to_string()))?;
                let _ = writeln!(secrets, "  server-{k}.{ext}: {value}");
            }
        }
    }
    kubectl_apply(
        lab,
        &options.kubectl,
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {DEMO_NAMESPACE}\n"),
    )?;
    kubectl_apply(lab, &options.kubectl, &secrets)?;
    let mut entries: Vec<PathBuf> = fs::read_dir(&options.examples)
        .map_err(Error::io(&options.examples))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let yaml = fs::read_to_string(&path).map_err(Error::io(&path))?;
        let yaml = crate::manifests::fill_owner_uids(lab, &options.kubectl, &yaml)?;
        kubectl_apply(lab, &options.kubectl, &yaml)
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

impl UpOptions {
    /// Options for a lab of `nodes` nodes built from the repository at `repo`: the binaries
    /// come from `tools/build-control-plane.sh` and `tools/build-lab.sh` (each a no-op when its
    /// cache is warm), helm and kubectl from `$CLOAK_CACHE/bin` (`tools/install-deps.sh`) or
    /// `PATH`, the image from `cloak` (the running binary).
    pub fn from_repo(
        repo: &Path,
        nodes: u8,
        cni: Cni,
        cloak: PathBuf,
        supervisor: Vec<String>,
    ) -> Result<Self> {
        let build = |script: &str| -> Result<PathBuf> {
            let path = repo.join("tools").join(script);
            let mut command = Command::new("bash");
            command.arg(&path).stderr(Stdio::inherit());
            Ok(PathBuf::from(sh::output(&mut command)?.trim()))
        };
        let kubernetes_bin = match std::env::var_os("CLOAK_CONTROL_PLANE_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => build("build-control-plane.sh")?,
        };
        let lab_bin = match std::env::var_os("CLOAK_LAB_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => build("build-lab.sh")?,
        };
        let prometheus_bin = match std::env::var_os("CLOAK_PROMETHEUS_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => build("build-prometheus.sh")?,
        };
        Ok(Self {
            nodes,
            cni,
            kubernetes_bin,
            lab_bin,
            kubectl: tool("kubectl"),
            helm: tool("helm"),
            chart: repo.join("charts/cloak"),
            examples: repo.join("examples/lab"),
            cloak,
            supervisor,
            owner: None,
            prometheus_bin,
        })
    }
}

/// `$CLOAK_CACHE/bin/<name>` (where `tools/install-deps.sh` puts helm and kubectl), else the
/// first `<name>` on `PATH`, else `/usr/bin/<name>`.
pub fn tool(name: &str) -> PathBuf {
    let cache = std::env::var_os("CLOAK_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("cloak"))
        })
        .map(|c| c.join("bin").join(name));
    if let Some(path) = cache.filter(|p| p.is_file()) {
        return path;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| Path::new("/usr/bin").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cni_is_named_on_the_command_line_and_a_lab_written_without_it_ran_the_bridge() {
        assert_eq!("multus".parse::<Cni>(), Ok(Cni::Multus));
        assert_eq!("bridge".parse::<Cni>(), Ok(Cni::Bridge));
        let err = "calico".parse::<Cni>().unwrap_err();
        assert!(err.contains("bridge") && err.contains("multus"), "{err}");
        let old = r#"{"nodes": 2, "kubernetes_bin": "/k", "lab_bin": "/l", "kubectl": "/c",
            "helm": "/h", "chart": "/ch", "examples": "/e", "cloak": "/x", "supervisor": [],
            "owner": null}"#;
        let options: UpOptions = serde_json::from_str(old).unwrap();
        assert_eq!(options.cni, Cni::Bridge);
        assert_eq!(Cni::Multus.to_string(), "multus");
    }
}
