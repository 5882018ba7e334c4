//! The `cloak` binary: parses the command line and hands off to the crate that owns the work.
//! Nothing here decides anything; each subcommand is a thin call into a library crate.

use std::io::Write;

use anyhow::Context;

/// jemalloc with background purging (the default feature `jemalloc`): it kept the operator at
/// 92 MiB with 10,000 masks where glibc's malloc kept 118 MiB and mimalloc 104 MiB
/// (`docs/benchmarks.md`), and it is the operator's, the node daemon's and the agent's alike.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// mimalloc (`--features mimalloc`, without jemalloc).
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

/// Hide Kubernetes pods behind VPN services.
#[derive(Debug, Parser)]
#[command(name = "cloak", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what deploy/crds/ holds).
    Crds,
    /// Run the VpnProvider and VpnMask controllers (in the cluster, or against any kubeconfig).
    Operator(OperatorArgs),
    /// Forward host ports to NodePort Services from `cloak.dev/external-ports` annotations
    /// (or Epok's `epok.getbetter.ro/externalports`; Epok's flags and EPOK_* variables work too).
    Portfwd(PortfwdArgs),
    /// The data plane inside a pod: bring up the VPN tunnel with a kill switch, keep it healthy.
    Agent(AgentArgs),
    /// The node component of VpnGateway (a privileged DaemonSet): installs the chained CNI
    /// plugin, attaches client pods before their containers start, keeps the node's links to
    /// the exits and fails over between them.
    Node(NodeArgs),
    /// Turn another tool's objects into cloak's (`cloak migrate vpn-operator`); the old objects
    /// are only read.
    Migrate {
        #[command(subcommand)]
        from: MigrateFrom,
    },
    /// A real Kubernetes cluster on this machine, in network namespaces of its own, with cloak
    /// installed by its Helm chart, fake VPN providers and an internet (as root).
    Lab(LabArgs),
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct NodeArgs {
    /// This node's name (the chart passes `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// This node's IPv4 address: its transit address on the links to the exits is
    /// 198.19.<c>.<d> for a.b.c.d (the chart passes `status.hostIP`).
    #[arg(long, env = "NODE_IP")]
    node_ip: Option<std::net::Ipv4Addr>,
    /// Where the CNI plugin reaches the daemon.
    #[arg(long, env = "CLOAK_NODE_SOCKET", default_value = cloak_node::cni::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,
    /// Where the attached clients are remembered across restarts.
    #[arg(long, env = "CLOAK_NODE_STATE", default_value = "/var/lib/cloak/node")]
    state_dir: std::path::PathBuf,
    /// The cluster's pod and service ranges, comma-separated: a gateway's default intranet.
    #[arg(long, env = "CLOAK_INTRANET", value_delimiter = ',')]
    intranet: Vec<cloak_api::Cidr>,
    /// The node's CNI configuration directory: the plugin is appended to its conflists at start.
    #[arg(long, env = "CLOAK_CNI_CONF_DIR")]
    cni_conf_dir: Option<std::path::PathBuf>,
    /// The node's CNI binary directory: `cloak` is copied there as the plugin at start.
    #[arg(long, env = "CLOAK_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: std::path::PathBuf,
    /// Probe every exit this often (milliseconds).
    #[arg(long, default_value_t = 100)]
    probe_interval_ms: u64,
    /// An exit that misses this many probes in a row takes no flows.
    #[arg(long, default_value_t = 2)]
    probe_misses: u32,
    /// Admin server address (/livez, /readyz once the node's plan is applied, /metrics); none
    /// when not given (the chart gives it).
    #[arg(long, env = "CLOAK_ADMIN_ADDR")]
    admin_addr: Option<std::net::SocketAddr>,
    /// Program a node that is a network namespace of its own (a path): tests and labs.
    #[arg(long, hide = true)]
    netns: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<NodeCommand>,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Take the plugin out of the node's CNI configuration and remove its binary (uninstall).
    Uninstall,
    /// Ask the running daemon whether it is live (its kernel thread runs jobs) or, with
    /// `--ready`, ready (it has listed the gateways): exit 0 if so, 1 with the reason if not. The
    /// DaemonSet's liveness and readiness probes.
    Check {
        #[arg(long)]
        ready: bool,
        /// Where the daemon listens.
        #[arg(long, env = "CLOAK_NODE_SOCKET", default_value = cloak_node::cni::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct LabArgs {
    /// The lab's name: labs of different names run side by side.
    #[arg(long, env = "CLOAK_LAB_NAME", default_value = "lab", global = true)]
    name: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Build what is missing and bring the lab up; does nothing when it is up already.
    Up {
        /// Number of nodes (1-10).
        #[arg(long, env = "CLOAK_LAB_NODES", default_value_t = 2)]
        nodes: u8,
        /// The nodes' CNI: `bridge` (the bridge plugin alone) or `multus` (Multus as the
        /// meta-plugin, delegating the cluster network to the bridge plugin).
        #[arg(long, env = "CLOAK_LAB_CNI", default_value = "bridge")]
        cni: cloak_lab::Cni,
        /// The cloak repository (charts/cloak, examples/lab, tools/).
        #[arg(long, env = "CLOAK_REPO", default_value = ".")]
        repo: std::path::PathBuf,
        /// Tear the lab down when this process exits (used by tests).
        #[arg(long, hide = true)]
        owner: Option<u32>,
    },
    /// What runs: nodes, the operator's leader, providers, masks, exit addresses, ports.
    Status,
    /// Stop the lab and remove everything it made (also what a killed lab left).
    Down,
    /// Print the path of the lab's admin kubeconfig (`export KUBECONFIG=$(cloak lab kubeconfig)`).
    Kubeconfig,
    /// Run kubectl against the lab: `cloak lab kubectl get vpnmasks -A`.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The lab's supervisor (started by `up`).
    #[command(hide = true)]
    Supervise,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    /// The agent's config file (YAML; re-read when it or the credentials change).
    #[arg(
        short,
        long,
        env = "CLOAK_AGENT_CONFIG",
        default_value = "/etc/cloak/agent.yaml"
    )]
    config: std::path::PathBuf,
    /// Admin server address (/livez, /readyz while the tunnel passes its probe, /metrics).
    #[arg(long, env = "CLOAK_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: std::net::SocketAddr,
    /// A file holding the token the admin server asks for (`Authorization: Bearer`) before it
    /// answers /status or /metrics, or names the exit address in /readyz. A gateway's exits get
    /// their gateway's.
    #[arg(long, env = "CLOAK_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<std::path::PathBuf>,
    /// A file holding the SHA-256 (hex) of a token that may read /metrics alone (the cluster's
    /// metrics reader; a gateway's exits have it in their admin Secret). Read at each request;
    /// missing or not a SHA-256: nobody reads with it.
    #[arg(long, env = "CLOAK_METRICS_TOKEN_SHA256_FILE")]
    metrics_token_sha256_file: Option<std::path::PathBuf>,
    /// Private directory for tunnel state (OpenVPN's management socket and credentials).
    #[arg(long, env = "CLOAK_STATE_DIR", default_value = "/run/cloak")]
    state_dir: std::path::PathBuf,
    /// How often the config and credentials are checked for changes, in milliseconds.
    #[arg(long, env = "CLOAK_WATCH_MS", default_value_t = 1000)]
    watch_ms: u64,
    #[command(subcommand)]
    command: Option<AgentCommand>,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Remove the agent's nftables table, routing rule and routing table (after it stopped: a
    /// stopped agent leaves traffic blocked on purpose), and exit.
    Reset,
    /// Verify native credentials (what a VpnProvider's verification pod runs): bring the tunnel
    /// up behind the kill switch, ask the probe through it, exit 0 with the exit address, or 1
    /// with the reason (also written to /dev/termination-log, where Kubernetes reads it).
    Verify {
        /// The credentials: a mounted Secret (wg0.conf, or config.ovpn with username/password).
        #[arg(long, default_value = "/var/run/cloak/credentials")]
        credentials: std::path::PathBuf,
        /// A URL answering with the caller's public address (or tcp://host:port).
        #[arg(long, env = "CLOAK_VERIFY_IP_URL")]
        probe: String,
        /// How long the tunnel may take to pass the probe, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Debug, clap::Args)]
struct PortfwdArgs {
    /// Interfaces to forward from, comma-separated (required to forward; not for `clean`).
    /// Also read from Epok's EPOK_INTERFACES.
    #[arg(short, long, env = "CLOAK_INTERFACES", value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Services annotated `cloak.dev/internal` (or `epok.getbetter.ro/internal`) are not
    /// reachable through this interface. Also read from Epok's EPOK_EXTERNAL_INTERFACE.
    #[arg(long, env = "CLOAK_EXTERNAL_INTERFACE")]
    external_interface: Option<String>,
    /// Epok's option, accepted so its command lines run unchanged; no effect: the whole ruleset
    /// is always one load.
    #[arg(long, env = "EPOK_BATCH_COMMANDS", value_name = "BOOL")]
    batch_commands: Option<bool>,
    /// Epok's option, accepted so its command lines run unchanged; no effect: the whole ruleset
    /// is always one load, whatever its size.
    #[arg(long, env = "EPOK_BATCH_SIZE", value_name = "BATCH_SIZE")]
    batch_size: Option<u64>,
    /// Quiet time after a change before syncing, in milliseconds (a burst becomes one sync).
    #[arg(long, env = "CLOAK_DEBOUNCE_MS", default_value_t = 200)]
    debounce_ms: u64,
    /// How often the loaded rules are read back, in seconds; rules changed by anyone else
    /// (a flushed table) are reloaded in full.
    #[arg(long, env = "CLOAK_RESYNC_SECS", default_value_t = 30)]
    resync_secs: u64,
    /// Admin server address (/livez, /readyz once the first ruleset is loaded, /metrics).
    #[arg(long, env = "CLOAK_ADMIN_ADDR", default_value = "127.0.0.1:8081")]
    admin_addr: std::net::SocketAddr,
    /// How rules are written: one nftables table (default), or iptables-restore into cloak's
    /// own chains on hosts without nft.
    #[arg(long, env = "CLOAK_BACKEND", value_enum, default_value_t = BackendArg::Nftables)]
    backend: BackendArg,
    #[command(subcommand)]
    command: PortfwdCommand,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Nftables,
    Iptables,
}

impl From<BackendArg> for cloak_portfwd::Backend {
    fn from(arg: BackendArg) -> Self {
        match arg {
            BackendArg::Nftables => Self::Nftables,
            BackendArg::Iptables => Self::Iptables,
        }
    }
}

#[derive(Debug, Subcommand)]
enum PortfwdCommand {
    /// Forward, loading rules on this host (`nft -f -`).
    Local(LocalArgs),
    /// Forward, loading rules on the host over SSH (cloak inside the cluster).
    Ssh(SshArgs),
    /// Remove everything cloak owns on the host (its one nftables table), nothing else, and exit.
    Clean {
        #[command(subcommand)]
        executor: ExecutorArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ExecutorArgs {
    /// On this host.
    Local(LocalArgs),
    /// On the host over SSH.
    Ssh(SshArgs),
}

#[derive(Debug, clap::Args)]
struct LocalArgs {
    /// Load inside this network namespace (`ip netns exec NAME nft -f -`).
    #[arg(long, env = "CLOAK_NETNS")]
    netns: Option<String>,
}

#[derive(Debug, clap::Args)]
struct SshArgs {
    /// user@host of an account allowed to run only the rule-loading command (required). Also
    /// read from Epok's EPOK_SSH_HOST.
    #[arg(short = 'H', long, env = "CLOAK_SSH_HOST")]
    host: Option<String>,
    /// SSH port. Also read from Epok's EPOK_SSH_PORT.
    #[arg(short, long, env = "CLOAK_SSH_PORT")]
    port: Option<u16>,
    /// Private key file. Also read from Epok's EPOK_SSH_KEY.
    #[arg(short, long, env = "CLOAK_SSH_KEY")]
    key: Option<std::path::PathBuf>,
    /// Command run on the host; the script arrives on its standard input.
    #[arg(long, env = "CLOAK_SSH_COMMAND", default_value = "sudo nft -f -")]
    remote_command: String,
    /// Extra `ssh -o` options (repeatable), e.g. `UserKnownHostsFile=/etc/cloak/known_hosts`.
    /// Kept whole (`Ciphers=a,b` is one option); `CLOAK_SSH_OPTIONS` holds one per line.
    #[arg(long = "ssh-option", env = "CLOAK_SSH_OPTIONS", value_delimiter = '\n')]
    ssh_options: Vec<String>,
}

impl From<ExecutorArgs> for cloak_portfwd::Executor {
    /// Call after [`PortfwdArgs::epok_fallbacks`], which makes sure an SSH host is given.
    fn from(args: ExecutorArgs) -> Self {
        match args {
            ExecutorArgs::Local(LocalArgs { netns }) => Self::Local { netns },
            ExecutorArgs::Ssh(SshArgs {
                host,
                port,
                key,
                remote_command,
                ssh_options,
            }) => Self::Ssh {
                destination: host.unwrap_or_default(),
                port,
                key,
                remote_command,
                options: ssh_options,
            },
        }
    }
}

impl PortfwdArgs {
    /// Fills what the command line and `CLOAK_*` left unset from Epok's `EPOK_*` variables,
    /// so an Epok deployment's environment works unchanged; returns what is worth a log line
    /// (Epok's options that have no effect here).
    fn epok_fallbacks(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Vec<String>> {
        if self.interfaces.is_empty()
            && let Some(list) = env("EPOK_INTERFACES")
        {
            self.interfaces = list
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if self.external_interface.is_none() {
            self.external_interface = env("EPOK_EXTERNAL_INTERFACE").filter(|i| !i.is_empty());
        }
        let ssh = match &mut self.command {
            PortfwdCommand::Ssh(ssh)
            | PortfwdCommand::Clean {
                executor: ExecutorArgs::Ssh(ssh),
            } => Some(ssh),
            _ => None,
        };
        if let Some(ssh) = ssh {
            if ssh.host.is_none() {
                ssh.host = env("EPOK_SSH_HOST").filter(|h| !h.is_empty());
            }
            if ssh.host.is_none() {
                anyhow::bail!(
                    "--host (CLOAK_SSH_HOST or EPOK_SSH_HOST) is required: the user@host to load rules on"
                );
            }
            if ssh.port.is_none()
                && let Some(port) = env("EPOK_SSH_PORT")
            {
                ssh.port = Some(
                    port.trim()
                        .parse()
                        .with_context(|| format!("EPOK_SSH_PORT={port:?} is not a port number"))?,
                );
            }
            if ssh.key.is_none() {
                ssh.key = env("EPOK_SSH_KEY")
                    .filter(|k| !k.is_empty())
                    .map(Into::into);
            }
        }
        let mut ignored = Vec::new();
        if let Some(batch) = self.batch_commands {
            ignored.push(format!("--batch-commands {batch} has no effect: cloak loads the whole ruleset in one transaction"));
        }
        if let Some(size) = self.batch_size {
            ignored.push(format!("--batch-size {size} has no effect: cloak loads the whole ruleset in one transaction"));
        }
        Ok(ignored)
    }
}

#[derive(Debug, Subcommand)]
enum MigrateFrom {
    /// seed 000's vpn-operator: `vpn.beebs.dev/v1` Providers and Masks become VpnProviders and
    /// VpnMasks of the same names. Prints them as YAML (or applies them with --apply), lists
    /// every field without an equivalent, and the pods that must change to use the new masks.
    VpnOperator(VpnOperatorArgs),
}

#[derive(Debug, clap::Args)]
struct VpnOperatorArgs {
    /// Read the old objects from these YAML or JSON files (`-`: standard input; repeatable;
    /// `kubectl get -o yaml` lists work). Absent: read them from the cluster.
    #[arg(short = 'f', long = "filename")]
    files: Vec<std::path::PathBuf>,
    /// Read only this namespace of the cluster; for files, the namespace of objects that name
    /// none. Default: every namespace; `default` for files.
    #[arg(short, long)]
    namespace: Option<String>,
    /// Server-side apply the new objects instead of printing them. Nothing is applied when any
    /// object cannot be migrated; the old objects are never changed or deleted.
    #[arg(long)]
    apply: bool,
}

#[derive(Debug, clap::Args)]
struct OperatorArgs {
    /// Admin server address (/livez, /readyz, /metrics).
    #[arg(long, env = "CLOAK_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: std::net::SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "CLOAK_LEASE_NAME", default_value = "cloak-operator")]
    lease_name: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "CLOAK_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This instance's identity in leader election and Events.
    #[arg(long, env = "CLOAK_POD_NAME", default_value = "cloak-operator")]
    pod_name: String,
    /// Act without leader election (only for a single instance).
    #[arg(long, env = "CLOAK_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// URL answering with the caller's public IP, used by verification pods. Plain HTTP: native
    /// verification asks it with the agent's probe, which speaks HTTP or tcp://host:port.
    #[arg(
        long,
        env = "CLOAK_VERIFY_IP_URL",
        default_value = "http://ifconfig.me/ip"
    )]
    verify_ip_url: String,
    /// The image verification pods of native credentials (wg0.conf, config.ovpn) run
    /// `cloak agent verify` from: the operator's own.
    #[arg(
        long,
        env = "CLOAK_IMAGE",
        default_value = "ghcr.io/cloak-dev/cloak:latest"
    )]
    image: String,
    /// The cluster's pod and service ranges, comma-separated: a VpnGateway's default
    /// `spec.intranet`, and what its exits reach outside their tunnels.
    #[arg(long, env = "CLOAK_INTRANET", value_delimiter = ',')]
    intranet: Vec<cloak_api::Cidr>,
    /// The pod network's MTU between nodes: a VpnGateway's `mtu: auto` leaves room in it for
    /// the VXLAN links to the exits.
    #[arg(long, env = "CLOAK_POD_NETWORK_MTU", default_value_t = 1500)]
    pod_network_mtu: u16,
    /// Fetch VpnProviders' `serverList.url` over plain http:// too (a mirror inside the
    /// cluster). Off: https:// only, since whoever answers a plain request could hand out
    /// server endpoints and keys.
    #[arg(long, env = "CLOAK_ALLOW_HTTP_SERVER_LISTS")]
    allow_http_server_lists: bool,
    /// A file holding the cluster's metrics reader token (the chart's `<release>-metrics-token`
    /// Secret, with `prometheus.scrapeExits`): gateway exits get its SHA-256 and let whoever
    /// sends the token read their /metrics (a PodMonitor, a Prometheus job). Read again at each
    /// gateway reconcile. Without it only the operator reads them.
    #[arg(long, env = "CLOAK_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    // Run by a container runtime as the CNI plugin (`/opt/cni/bin/cloak`, no arguments).
    if std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1 {
        run_cni();
    }
    match Cli::parse().command {
        Command::Node(args) => run_node(args),
        Command::Migrate {
            from: MigrateFrom::VpnOperator(args),
        } => run_migrate(&args),
        Command::Crds => print_crds(&mut std::io::stdout().lock()),
        Command::Operator(args) => run_operator(args),
        Command::Portfwd(args) => run_portfwd(args),
        Command::Agent(args) => run_agent(args),
        Command::Lab(args) => run_lab(args),
    }
}

fn run_lab(args: LabArgs) -> anyhow::Result<()> {
    let lab = cloak_lab::Lab::new(&args.name)?;
    let kubectl = cloak_lab::tool("kubectl");
    match args.command {
        LabCommand::Up {
            nodes,
            cni,
            repo,
            owner,
        } => {
            let exe = std::env::current_exe().context("finding the cloak binary")?;
            let repo = std::fs::canonicalize(&repo)
                .with_context(|| format!("the cloak repository {}", repo.display()))?;
            anyhow::ensure!(
                repo.join("charts/cloak").is_dir(),
                "{} is not the cloak repository (no charts/cloak): run from it or set --repo / CLOAK_REPO",
                repo.display()
            );
            let supervisor = vec![
                exe.to_string_lossy().into_owned(),
                "lab".to_owned(),
                "supervise".to_owned(),
            ];
            let mut options = cloak_lab::UpOptions::from_repo(&repo, nodes, cni, exe, supervisor)?;
            options.owner = owner;
            lab.up(&options, &mut std::io::stdout().lock())?;
            Ok(())
        }
        LabCommand::Status => {
            let table = lab.status(&kubectl)?;
            std::io::stdout()
                .lock()
                .write_all(table.as_bytes())
                .context("writing the status")
        }
        LabCommand::Down => {
            let reaped = lab.down()?;
            writeln!(
                std::io::stdout().lock(),
                "lab {} is down: {reaped}",
                lab.name()
            )
            .context("writing")
        }
        LabCommand::Kubeconfig => {
            anyhow::ensure!(lab.is_up(), "lab {} is not up (`cloak lab up`)", lab.name());
            writeln!(std::io::stdout().lock(), "{}", lab.kubeconfig().display()).context("writing")
        }
        LabCommand::Kubectl { args } => {
            anyhow::ensure!(lab.is_up(), "lab {} is not up (`cloak lab up`)", lab.name());
            let status = lab
                .kubectl(&kubectl)
                .args(args)
                .status()
                .context("running kubectl")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCommand::Supervise => Ok(lab.supervise()?),
    }
}

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), colored only on a terminal.
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
}

/// One CNI call: its answer on stdout, exit status 1 with the spec's error object on failure.
fn run_cni() -> ! {
    let mut stdin = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin);
    let env = |key: &str| std::env::var(key).ok();
    let (out, code) = match cloak_node::cni::plugin(&env, &stdin) {
        Ok(out) => (out, 0),
        Err(e) => {
            let version = serde_json::from_str::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "1.0.0".into());
            (e.to_json(&version), 1)
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    std::process::exit(code)
}

fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    init_logging();
    let paths = args
        .cni_conf_dir
        .clone()
        .map(|conf_dir| cloak_node::install::Paths {
            conf_dir,
            bin_dir: args.cni_bin_dir.clone(),
            socket: args.socket.display().to_string(),
            guarded: cloak_node::daemon::guarded_file(&args.state_dir)
                .display()
                .to_string(),
        });
    if let Some(NodeCommand::Check { ready, socket }) = &args.command {
        if let Some(why) = cloak_node::cni::check(&socket.display().to_string(), *ready) {
            anyhow::bail!(why);
        }
        return Ok(());
    }
    if let Some(NodeCommand::Uninstall) = args.command {
        let paths = paths.context("uninstall needs --cni-conf-dir")?;
        let changed = cloak_node::install::uninstall(&paths).context("removing the CNI plugin")?;
        tracing::info!(?changed, "CNI plugin removed");
        return Ok(());
    }
    anyhow::ensure!(
        !args.node_name.is_empty(),
        "--node-name (NODE_NAME) is required"
    );
    let node_ip = args.node_ip.context("--node-ip (NODE_IP) is required")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let options = cloak_node::daemon::Options {
            node_name: args.node_name.clone(),
            socket: args.socket,
            state_dir: args.state_dir,
            intranet: args.intranet.iter().map(|c| c.get()).collect(),
            transit: cloak_node::daemon::transit_for(node_ip),
            node_ip,
            netns: args.netns.clone(),
            probe_interval: std::time::Duration::from_millis(args.probe_interval_ms),
            probe_misses: args.probe_misses,
            admin_addr: args.admin_addr,
        };
        let shutdown = shutdown_signal()?;
        let netns = args.netns.clone();
        let node_name = args.node_name.clone();
        let daemon = Box::pin(cloak_node::daemon::run(client.clone(), options, shutdown));
        let mut installer = None;
        if let Some(paths) = &paths {
            // After the socket listens: a plugin entry must never point at no daemon for longer
            // than a restart.
            let exe = std::env::current_exe().context("finding the cloak binary")?;
            let paths = paths.clone();
            // Checked again every few seconds: the primary CNI may write its conflist after this
            // pod started, or rewrite it, and a list without the plugin would start client pods
            // unattached. (Installing is idempotent: an unchanged list is not rewritten.)
            installer = Some(tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                loop {
                    match cloak_node::install::install(&paths, &exe) {
                        Ok(changed) if !changed.is_empty() => {
                            tracing::info!(?changed, "CNI plugin installed");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "installing the CNI plugin"),
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
            }));
        }
        daemon.await.context("node daemon")?;
        // The installer stops first: its next round would put back a plugin an uninstall below
        // has just taken out (it did, now and then: the chart test found the plugin in a
        // node's list after `helm uninstall --wait`).
        if let Some(installer) = installer {
            installer.abort();
            let _ = installer.await;
        }
        // A restart (rollout, crash) leaves the plugin in place: pods started meanwhile wait for
        // the daemon instead of starting unattached. Only when its DaemonSet goes (uninstall)
        // does it take the plugin out.
        if let (Some(paths), Ok(daemonset)) = (&paths, std::env::var("CLOAK_DAEMONSET"))
            && let Some((ns, name)) = daemonset.split_once('/')
        {
            let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
                kube::Api::namespaced(client.clone(), ns);
            let going = match api.get_opt(name).await {
                Ok(None) => true,
                Ok(Some(ds)) => ds.metadata.deletion_timestamp.is_some(),
                // `helm uninstall` deletes the ServiceAccount and its RBAC with the DaemonSet.
                Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the DaemonSet; leaving the plugin installed");
                    false
                }
            };
            if going {
                let changed = cloak_node::install::uninstall(paths)
                    .context("removing the CNI plugin")?;
                tracing::info!(?changed, "the DaemonSet is going away: CNI plugin removed");
                // Then what it put in the kernel: the links to the exits, their rules and
                // tables, the node's table, and the guard unless an exit pod still runs here
                // (gateways, and so their exits, outlive an uninstall that keeps the CRDs; when
                // that cannot be asked, the guard stays). Clients keep their own kill switch
                // (nothing of theirs goes out unprotected); IPv6 forwarding stays on (the
                // node's own network may rely on it by now).
                let exits_here = kube::Api::<k8s_openapi::api::core::v1::Pod>::all(client.clone())
                    .list_metadata(
                        &kube::api::ListParams::default()
                            .labels(cloak_model::exit::LABEL_EXIT)
                            .fields(&format!("spec.nodeName={node_name}")),
                    )
                    .await
                    .map_or(true, |pods| !pods.items.is_empty());
                cloak_node::daemon::reset_kernel(netns.as_deref(), exits_here)
                    .context("removing the node's links, routes and tables")?;
                tracing::info!("the DaemonSet is going away: the node's kernel state removed");
            }
        }
        Ok(())
    })
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    init_logging();
    match args.command {
        Some(AgentCommand::Reset) => {
            return cloak_agent::reset().context("removing the agent's firewall and routes");
        }
        Some(AgentCommand::Verify {
            credentials,
            probe,
            timeout,
        }) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let outcome = runtime.block_on(cloak_agent::verify(cloak_agent::VerifyOptions {
                credentials,
                probe,
                timeout: std::time::Duration::from_secs(timeout),
                state_dir: args.state_dir,
            }));
            let message = match &outcome {
                Ok(Some(ip)) => format!("verified: exit address {ip}"),
                Ok(None) => "verified".to_owned(),
                Err(e) => e.clone(),
            };
            // Kubernetes puts this file's text into the container's terminated state.
            let _ = std::fs::write("/dev/termination-log", &message);
            // The namespace is open again afterwards (the agent's kill switch stays otherwise).
            if let Err(e) = cloak_agent::reset() {
                tracing::warn!(error = %e, "removing the verification's firewall and routes");
            }
            tracing::info!(%message, "verification");
            std::process::exit(i32::from(outcome.is_err()));
        }
        None => {}
    }
    let admin_token = args
        .admin_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime
        .block_on(cloak_agent::run(cloak_agent::Options {
            config: args.config,
            admin_addr: args.admin_addr,
            state_dir: args.state_dir,
            watch_interval: std::time::Duration::from_millis(args.watch_ms),
            admin_token,
            metrics_token_sha256_file: args.metrics_token_sha256_file,
        }))
        .context("agent")
}

/// A token from a file (a mounted Secret's key), trimmed; an empty one is an error.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token {}", path.display()))?;
    let token = token.trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "the token {} is empty", path.display());
    Ok(token)
}

fn run_portfwd(mut args: PortfwdArgs) -> anyhow::Result<()> {
    init_logging();
    for ignored in args.epok_fallbacks(|key| std::env::var(key).ok())? {
        tracing::info!("{ignored}");
    }
    let (executor, clean): (cloak_portfwd::Executor, bool) = match args.command {
        PortfwdCommand::Local(local) => (ExecutorArgs::Local(local).into(), false),
        PortfwdCommand::Ssh(ssh) => (ExecutorArgs::Ssh(ssh).into(), false),
        PortfwdCommand::Clean { executor } => (executor.into(), true),
    };
    if !clean && args.interfaces.is_empty() {
        anyhow::bail!(
            "--interfaces (CLOAK_INTERFACES or EPOK_INTERFACES) is required: the interfaces to forward from"
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        if clean {
            return executor
                .clean_with(args.backend.into())
                .await
                .context("removing cloak's rules");
        }
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let config = cloak_portfwd::Config {
            options: cloak_model::portfwd::Options {
                interfaces: args.interfaces,
                external_interface: args.external_interface,
            },
            executor,
            backend: args.backend.into(),
            debounce: std::time::Duration::from_millis(args.debounce_ms),
            resync: std::time::Duration::from_secs(args.resync_secs.max(1)),
            instance: hostname(),
        };
        let metrics = std::sync::Arc::new(cloak_portfwd::Metrics::new());
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut registry = prometheus_client::registry::Registry::with_prefix("cloak");
        metrics.register(&mut registry);
        let admin = admin_server(
            args.admin_addr,
            std::sync::Arc::new(registry),
            ready.clone(),
        );
        let shutdown = shutdown_signal()?;
        tokio::select! {
            () = Box::pin(cloak_portfwd::run(client, config, metrics, ready, shutdown)) => Ok(()),
            result = admin => result.context("admin server"),
        }
    })
}

/// The objects of YAML or JSON documents (a `List`'s items counted one by one).
fn read_documents(text: &str, into: &mut Vec<serde_json::Value>) -> anyhow::Result<()> {
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).context("parsing YAML")?;
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::Object(ref map)
                if map.get("kind").and_then(serde_json::Value::as_str) == Some("List") =>
            {
                into.extend(
                    map.get("items")
                        .and_then(serde_json::Value::as_array)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
            other => into.push(other),
        }
    }
    Ok(())
}

/// `cloak migrate vpn-operator`: the new objects on standard output (or applied), what the user
/// must know on standard error; exit status 1, with nothing printed or applied, when an object
/// cannot be migrated.
fn run_migrate(args: &VpnOperatorArgs) -> anyhow::Result<()> {
    use cloak_operator::migrate as io;
    let default_namespace = args.namespace.as_deref().unwrap_or("default");
    let mut objects = Vec::new();
    for file in &args.files {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        read_documents(&text, &mut objects).with_context(|| format!("in {}", file.display()))?;
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = if args.files.is_empty() || args.apply {
            Some(
                kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API")?,
            )
        } else {
            None
        };
        if args.files.is_empty()
            && let Some(client) = &client
        {
            objects = io::read_cluster(client, args.namespace.as_deref())
                .await
                .context("listing vpn.beebs.dev objects")?;
        }
        let formats = io::secret_formats(client.as_ref(), &objects, default_namespace).await;
        let migration = cloak_model::migrate::migrate(&objects, default_namespace, &|ns, name| {
            formats.get(&(ns.to_owned(), name.to_owned())).copied()
        });
        let mut err = std::io::stderr().lock();
        for note in &migration.notes {
            writeln!(err, "note: {note}")?;
        }
        for error in &migration.errors {
            writeln!(err, "error: {error}")?;
        }
        if !migration.errors.is_empty() {
            anyhow::bail!(
                "{} object(s) cannot be migrated as they are; nothing was {}",
                migration.errors.len(),
                if args.apply { "applied" } else { "printed" }
            );
        }
        if migration.providers.is_empty() && migration.masks.is_empty() {
            writeln!(err, "no vpn.beebs.dev Providers or Masks found")?;
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        if let (true, Some(client)) = (args.apply, &client) {
            io::apply(client, &migration)
                .await
                .context("applying the new objects")?;
            let applied = (migration
                .providers
                .iter()
                .map(|p| ("vpnprovider", &p.metadata)))
            .chain(migration.masks.iter().map(|m| ("vpnmask", &m.metadata)));
            for (kind, meta) in applied {
                let (ns, name) = (meta.namespace.as_deref(), meta.name.as_deref());
                writeln!(
                    out,
                    "{kind} {}/{} applied",
                    ns.unwrap_or_default(),
                    name.unwrap_or_default()
                )?;
            }
        } else {
            out.write_all(io::to_yaml(&migration).context("writing YAML")?.as_bytes())?;
        }
        let Some(client) = &client else {
            writeln!(
                err,
                "note: pods that use the old masks are not listed: files alone do not reach the \
                 cluster (run without -f, or with --apply)"
            )?;
            return Ok(());
        };
        let masks: Vec<cloak_model::migrate::OldMask> = objects
            .iter()
            .filter_map(|o| cloak_model::migrate::OldMask::of(o, default_namespace))
            .collect();
        // The new objects are out already: a failure here is a warning, not a failed migration.
        match io::pods_to_change(client, &masks).await {
            Ok(pods) => {
                for (pod, changes) in pods {
                    for change in changes {
                        writeln!(err, "pod {pod} must change: {change}")?;
                    }
                }
            }
            Err(e) => writeln!(
                err,
                "warning: the pods that use the old masks could not be listed: {e}"
            )?,
        }
        Ok(())
    })
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT (a terminal).
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "cloak-portfwd".into(), |h| h.trim().to_owned())
}

/// `/livez`, `/readyz` (the first ruleset is loaded) and `/metrics` for `cloak portfwd`.
async fn admin_server(
    addr: std::net::SocketAddr,
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    cloak_admin::Admin::new(move || cloak_admin::encode(&registry))
        .ready(move |_| {
            if ready.load(std::sync::atomic::Ordering::Relaxed) {
                Ok("ok".into())
            } else {
                Err("no ruleset loaded yet".into())
            }
        })
        .bind_and_serve(addr)
        .await
}

fn run_operator(args: OperatorArgs) -> anyhow::Result<()> {
    init_logging();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let config = cloak_operator::Config {
            instance: args.pod_name,
            admin_addr: Some(args.admin_addr),
            leader_lease: (!args.no_leader_election)
                .then_some((args.lease_namespace, args.lease_name)),
            verify_ip_url: args.verify_ip_url,
            agent_image: args.image,
            intranet: args.intranet,
            pod_network_mtu: args.pod_network_mtu,
            allow_http_server_lists: args.allow_http_server_lists,
            metrics_token_file: args.metrics_token_file,
            ..cloak_operator::Config::default()
        };
        // Kubernetes stops pods with SIGTERM; a terminal sends SIGINT.
        let shutdown = shutdown_signal()?;
        Box::pin(cloak_operator::run(client, config, shutdown))
            .await
            .context("operator")
    })
}

/// Writes every CRD as one multi-document YAML stream, byte for byte what `deploy/crds/` holds.
fn print_crds(out: &mut impl Write) -> anyhow::Result<()> {
    out.write_all(render_crds()?.as_bytes())
        .context("writing CRDs")
}

fn render_crds() -> anyhow::Result<String> {
    let mut yaml = String::new();
    for crd in cloak_api::crds() {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&crd).context("serializing a CRD")?);
    }
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn an_ssh_option_keeps_its_commas() {
        let cli = Cli::try_parse_from([
            "cloak",
            "portfwd",
            "ssh",
            "--host",
            "cloak@host",
            "--ssh-option",
            "Ciphers=aes128-ctr,aes256-ctr",
            "--ssh-option",
            "UserKnownHostsFile=/etc/cloak/known_hosts",
        ])
        .unwrap();
        let Command::Portfwd(PortfwdArgs {
            command: PortfwdCommand::Ssh(ssh),
            ..
        }) = cli.command
        else {
            panic!("not portfwd ssh");
        };
        assert_eq!(
            ssh.ssh_options,
            [
                "Ciphers=aes128-ctr,aes256-ctr",
                "UserKnownHostsFile=/etc/cloak/known_hosts"
            ]
        );
    }

    fn portfwd(words: &[&str]) -> PortfwdArgs {
        let cli = Cli::try_parse_from(words).unwrap();
        let Command::Portfwd(args) = cli.command else {
            panic!("not portfwd");
        };
        args
    }

    fn ssh_of(args: PortfwdArgs) -> cloak_portfwd::Executor {
        let PortfwdCommand::Ssh(ssh) = args.command else {
            panic!("not ssh");
        };
        ExecutorArgs::Ssh(ssh).into()
    }

    #[test]
    fn epoks_command_lines_run_unchanged() {
        // Seed 003's README, word for word after the program name.
        let mut args = portfwd(&[
            "cloak",
            "portfwd",
            "-i",
            "eth0",
            "ssh",
            "--host",
            "epok@host_machine",
            "--key",
            "/path/to/private.key",
        ]);
        assert!(args.epok_fallbacks(|_| None).unwrap().is_empty());
        assert_eq!(args.interfaces, ["eth0"]);
        let cloak_portfwd::Executor::Ssh {
            destination,
            key,
            port,
            ..
        } = ssh_of(args)
        else {
            panic!("not ssh");
        };
        assert_eq!(destination, "epok@host_machine");
        assert_eq!(key.unwrap().to_str(), Some("/path/to/private.key"));
        assert_eq!(port, None);
        // Epok's short SSH flags and its batch options, which are accepted and reported as
        // having no effect.
        let mut args = portfwd(&[
            "cloak",
            "portfwd",
            "--interfaces",
            "eth0,wg0",
            "--external-interface",
            "eth0",
            "--batch-commands",
            "true",
            "--batch-size",
            "1677722",
            "ssh",
            "-H",
            "epok@10.0.0.1",
            "-p",
            "22222",
            "-k",
            "/key",
        ]);
        let ignored = args.epok_fallbacks(|_| None).unwrap();
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(
            ignored[1].starts_with("--batch-size 1677722 has no effect"),
            "{ignored:?}"
        );
        assert_eq!(args.external_interface.as_deref(), Some("eth0"));
        let cloak_portfwd::Executor::Ssh {
            destination, port, ..
        } = ssh_of(args)
        else {
            panic!("not ssh");
        };
        assert_eq!((destination.as_str(), port), ("epok@10.0.0.1", Some(22222)));
    }

    #[test]
    fn epoks_environment_fills_what_the_command_line_leaves_unset() {
        let epok = |key: &str| {
            Some(match key {
                "EPOK_INTERFACES" => "eth0, wg0".to_owned(),
                "EPOK_EXTERNAL_INTERFACE" => "eth0".to_owned(),
                "EPOK_SSH_HOST" => "epok@10.0.0.1".to_owned(),
                "EPOK_SSH_PORT" => "22222".to_owned(),
                "EPOK_SSH_KEY" => "/path/to/private.key".to_owned(),
                _ => return None,
            })
        };
        let mut args = portfwd(&["cloak", "portfwd", "ssh"]);
        args.epok_fallbacks(epok).unwrap();
        assert_eq!(args.interfaces, ["eth0", "wg0"]);
        assert_eq!(args.external_interface.as_deref(), Some("eth0"));
        let cloak_portfwd::Executor::Ssh {
            destination,
            port,
            key,
            ..
        } = ssh_of(args)
        else {
            panic!("not ssh");
        };
        assert_eq!((destination.as_str(), port), ("epok@10.0.0.1", Some(22222)));
        assert!(key.is_some());
        // What is given wins over Epok's variables.
        let mut args = portfwd(&[
            "cloak", "portfwd", "-i", "ens3", "ssh", "--host", "me@h", "-p", "2",
        ]);
        args.epok_fallbacks(epok).unwrap();
        assert_eq!(args.interfaces, ["ens3"]);
        let cloak_portfwd::Executor::Ssh {
            destination, port, ..
        } = ssh_of(args)
        else {
            panic!("not ssh");
        };
        assert_eq!((destination.as_str(), port), ("me@h", Some(2)));
        // No host anywhere, or a port that is not one, is a clear error.
        let error = portfwd(&["cloak", "portfwd", "ssh"])
            .epok_fallbacks(|_| None)
            .unwrap_err();
        assert!(error.to_string().contains("EPOK_SSH_HOST"), "{error}");
        let bad_port = |key: &str| (key == "EPOK_SSH_PORT").then(|| "ssh".to_owned());
        let error = portfwd(&["cloak", "portfwd", "ssh", "-H", "h"])
            .epok_fallbacks(bad_port)
            .unwrap_err();
        assert!(
            error.to_string().contains("EPOK_SSH_PORT=\"ssh\""),
            "{error}"
        );
    }

    #[test]
    fn checked_in_crds_match_the_rust_types() {
        let path = cloak_testkit::repo_path("deploy/crds/cloak.dev.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == render_crds().unwrap(),
            "deploy/crds/cloak.dev.yaml is stale: run `cargo run -q -p cloak -- crds > deploy/crds/cloak.dev.yaml`"
        );
    }
}
