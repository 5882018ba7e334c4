//! `cloak agent`: the data plane inside the pods the operator creates. Config in (a YAML file,
//! re-read when it or the credentials change), a fail-closed tunnel state machine
//! ([`machine`]), status and metrics out (the admin server: `/livez`, `/readyz` ready only while
//! the tunnel passes its probe, `/metrics`).
//!
//! What does not belong here: kernel side effects (the `dataplane` crate), Kubernetes.

pub mod config;
pub mod exit;
pub mod health;
pub mod inbound;
pub mod machine;
pub mod metrics;
pub mod probe;
pub mod resolve;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{extract::State, http::StatusCode};
use cloak_dataplane::{
    Firewall, FirewallPolicy, Identifiers, RouteSet, Routes, firewall::Nftables,
    routes::LinuxRoutes, tunnel::LinuxDriver,
};
use tokio::sync::watch;

use crate::{
    config::Resolved,
    machine::{ConfigResult, Machine, Status},
    metrics::Metrics,
    probe::NetProber,
    resolve::MarkedDns,
};

/// How to run the agent.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub admin_addr: SocketAddr,
    /// Private directory for tunnel files (OpenVPN's management socket and credentials).
    pub state_dir: PathBuf,
    /// How often the config and credentials files are checked for changes.
    pub watch_interval: Duration,
    /// A token the admin server asks for (`Authorization: Bearer <token>`) before it tells
    /// anything more than ready or not: `/status`, `/metrics`, and the exit address in
    /// `/readyz`. A gateway exit has one (its gateway's Secret): its admin port is on the pod
    /// network, where any pod can reach it.
    pub admin_token: Option<String>,
    /// A file holding the SHA-256 (hex) of a token that may read `/metrics` alone: the
    /// cluster's metrics reader (a gateway exit's admin Secret has it, written by the operator,
    /// who never hands out the token itself). Read at each request: a new hash applies at once.
    pub metrics_token_sha256_file: Option<PathBuf>,
}

/// Runs until SIGTERM/SIGINT, then leaves the namespace blocked. A gateway exit first drains:
/// it keeps carrying its clients' established flows for its grace ([`exit::drain`]).
pub async fn run(options: Options) -> std::io::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (status_tx, status_rx) = watch::channel(Status::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Block first, always: the pod's traffic must not flow while anything below fails (the
    // table outlives this process, so an agent that cannot start leaves the pod closed).
    let ids = Identifiers::default();
    let mut firewall = Nftables { ids: ids.clone() };
    firewall
        .apply(&FirewallPolicy::block_all())
        .and_then(|()| LinuxRoutes { ids }.apply(&RouteSet::default()))
        .map_err(|e| std::io::Error::other(format!("blocking all traffic: {e}")))?;
    std::fs::create_dir_all(&options.state_dir).map_err(|e| {
        std::io::Error::other(format!(
            "state directory {}: {e}",
            options.state_dir.display()
        ))
    })?;
    let listener = tokio::net::TcpListener::bind(options.admin_addr)
        .await
        .map_err(|e| {
            std::io::Error::other(format!("admin server on {}: {e}", options.admin_addr))
        })?;

    let (config_tx, config_rx) = watch::channel(load(&options));
    let watcher = tokio::spawn(watch_config(options.clone(), config_tx));
    // A gateway exit's links follow the tunnel (nothing happens without an `exit` section).
    // From the first SIGTERM on, a gateway exit tells the nodes' probes it is draining.
    let (draining_tx, draining_rx) = watch::channel(false);
    let exit = tokio::spawn(exit::follow(
        config_rx.clone(),
        status_rx.clone(),
        draining_rx,
        Arc::clone(&metrics),
    ));
    let dns = tokio::spawn(exit::serve_dns(config_rx.clone(), Arc::clone(&metrics)));
    // A gateway exit's inbound ports (nothing happens without `exit.forwards`).
    let (inbound_tx, inbound_rx) = watch::channel(Vec::new());
    let inbound = tokio::spawn(inbound::follow(
        config_rx.clone(),
        status_rx.clone(),
        inbound_tx,
        Arc::clone(&metrics),
    ));

    let admin = AdminState {
        status: status_rx,
        inbound: inbound_rx,
        config: config_rx.clone(),
        metrics: Arc::clone(&metrics),
        token: options.admin_token.clone().map(Arc::from),
        metrics_hash_file: options.metrics_token_sha256_file.clone().map(Arc::from),
    };
    let app = admin_app(admin);
    tokio::spawn(async move {
        if let Err(e) = app.serve(listener).await {
            tracing::error!(%e, "admin server stopped");
        }
    });

    let machine = linux_machine(&options.state_dir, status_tx, metrics);
    let drain_config = config_rx.clone();
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = shutdown_tx.send(true);
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let drain = drain_config.borrow().as_deref().ok().and_then(|config| {
            let role = config.exit.as_ref()?;
            Some((role.drain_grace, role.drain_quiet))
        });
        if let Some((grace, quiet)) = drain {
            draining_tx.send_replace(true);
            // A second signal stops it at once.
            tokio::select! {
                () = exit::drain(grace, quiet) => {}
                _ = term.recv() => tracing::info!("stopping: a second signal during the drain"),
                _ = int.recv() => tracing::info!("stopping: a second signal during the drain"),
            }
        }
        let _ = shutdown_tx.send(true);
    });
    machine.run(config_rx, shutdown_rx).await;
    watcher.abort();
    signals.abort();
    exit.abort();
    dns.abort();
    inbound.abort();
    Ok(())
}

/// The state machine on this machine's kernel: nftables, routes, tunnels, probes.
fn linux_machine(
    state_dir: &std::path::Path,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
) -> Machine<Nftables, LinuxRoutes, LinuxDriver, NetProber, MarkedDns> {
    // Read once, at start: once connected the agent may rewrite this file to the tunnel's
    // resolver, which is reachable only through the tunnel.
    let default_resolver = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|text| resolve::endpoint_resolver(&text));
    // The agent's data plane is the only one in its pod: the default identifiers.
    let ids = Identifiers::default();
    Machine {
        firewall: Nftables { ids: ids.clone() },
        routes: LinuxRoutes { ids: ids.clone() },
        driver: LinuxDriver {
            state_dir: state_dir.to_owned(),
            fwmark: ids.fwmark,
        },
        prober: NetProber,
        resolver: MarkedDns { fwmark: ids.fwmark },
        default_resolver,
        status,
        metrics,
    }
}

/// Removes everything the agent owns (its nftables table, routing rule and table).
pub fn reset() -> Result<(), cloak_dataplane::Error> {
    let ids = Identifiers::default();
    Nftables { ids: ids.clone() }.reset()?;
    LinuxRoutes { ids }.reset()
}

fn load(options: &Options) -> ConfigResult {
    let loaded = Resolved::load(&options.config).map(Arc::new);
    if let Err(e) = &loaded {
        tracing::error!(error = %e, "config");
    }
    loaded
}

/// Re-reads the config whenever the file or the credentials change (a mounted Secret changes
/// by a symlink swap, which a content fingerprint notices and a watch on one inode would not).
async fn watch_config(options: Options, tx: watch::Sender<ConfigResult>) {
    let mut seen = config::fingerprint(&options.config);
    loop {
        tokio::time::sleep(options.watch_interval).await;
        let now = config::fingerprint(&options.config);
        if now == seen {
            continue;
        }
        seen = now;
        let next = load(&options);
        let same = match (&*tx.borrow(), &next) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        if !same {
            tracing::info!("config changed; re-applying");
            let _ = tx.send(next);
        }
    }
}

#[derive(Clone)]
struct AdminState {
    status: watch::Receiver<Status>,
    inbound: watch::Receiver<Vec<inbound::Mapped>>,
    config: watch::Receiver<ConfigResult>,
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
    metrics_hash_file: Option<Arc<std::path::Path>>,
}

/// The admin server: `/readyz` (the exit address only with the admin token), `/metrics` (with
/// the admin token, or the metrics reader's without the exit address), `/status` (the admin
/// token).
fn admin_app(admin: AdminState) -> cloak_admin::Admin {
    let (ready, scrape, allowed) = (admin.clone(), admin.clone(), admin.clone());
    cloak_admin::Admin::new_async(move |headers| {
        let full = scrape.authorized(headers);
        scrape.clone().metrics_text(full)
    })
    .ready(move |headers| ready.readyz(headers))
    .metrics_allowed(move |headers| allowed.authorized(headers) || allowed.metrics_reader(headers))
    .route(
        cloak_model::exit::STATUS_PATH,
        axum::routing::get(status_json).with_state(admin),
    )
}

/// OpenMetrics text without the family `name` (its metadata and samples).
fn without_family(text: &str, name: &str) -> String {
    text.lines()
        .filter(|line| {
            let sample = line
                .trim_start_matches("# HELP ")
                .trim_start_matches("# TYPE ");
            let sample = sample.trim_start_matches("# UNIT ");
            !(sample.starts_with(name) && sample[name.len()..].starts_with([' ', '{']))
        })
        .flat_map(|line| [line, "\n"])
        .collect()
}

/// Whether `given` and `want` are the same, in a time that does not tell where they differ.
fn same_secret(given: &str, want: &str) -> bool {
    given.len() == want.len()
        && given
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn bearer(headers: &axum::http::HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

impl AdminState {
    /// Whether the request carries the metrics reader's token (its hash is what this agent
    /// was given).
    fn metrics_reader(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(want) = self
            .metrics_hash_file
            .as_deref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| h.len() == 64)
        else {
            return false;
        };
        let given = bearer(headers);
        !given.is_empty() && same_secret(&cloak_model::exit::token_sha256(given), &want)
    }

    /// Whether the request may be told more than ready or not: no token is asked for, or it
    /// carries it (compared in constant time).
    fn authorized(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        same_secret(bearer(headers), token)
    }
}

const UNAUTHORIZED: (StatusCode, &str) = (
    StatusCode::UNAUTHORIZED,
    "this needs the exit's admin token (Authorization: Bearer)\n",
);

impl AdminState {
    /// Ready while the tunnel passes its probe; the exit address only for a caller with the
    /// token.
    fn readyz(&self, headers: &axum::http::HeaderMap) -> cloak_admin::Readiness {
        let s = self.status.borrow().clone();
        let mut line = format!("{}: {}", s.phase, s.message);
        if let Some(ip) = s.exit_ip.filter(|_| self.authorized(headers)) {
            line = format!("{line}, exit {ip}");
        }
        if s.ready() {
            Ok(format!("ready: {line}"))
        } else {
            Err(format!("not ready: {line}"))
        }
    }

    /// The metrics; `full`: for the admin token's holder. The metrics reader (a weaker
    /// credential: the exits' PodMonitor presents it to any pod that looks like an exit) is not
    /// told the exit's public address (`cloak_agent_exit_info`).
    async fn metrics_text(self, full: bool) -> String {
        if exit::dns_routing(&self.config.borrow()).is_some() {
            let flows = tokio::task::spawn_blocking(exit::client_flows).await;
            if let Ok(Some(flows)) = flows {
                self.metrics
                    .exit_client_flows
                    .set(i64::try_from(flows).unwrap_or(i64::MAX));
            }
        }
        if !self.inbound.borrow().is_empty() {
            let counts = tokio::task::spawn_blocking(inbound::connection_counts)
                .await
                .unwrap_or_default();
            self.metrics.record_inbound(&counts);
        }
        let text = self.metrics.encode();
        if full {
            text
        } else {
            without_family(&text, "cloak_agent_exit_info")
        }
    }
}

async fn status_json(
    State(admin): State<AdminState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if !admin.authorized(&headers) {
        return UNAUTHORIZED.into_response();
    }
    let s = admin.status.borrow().clone();
    let body = serde_json::json!({
        "phase": s.phase.to_string(),
        "message": s.message,
        "ready": s.ready(),
        "exitAddress": s.exit_ip,
        "reconnects": s.reconnects,
        "forwards": *admin.inbound.borrow(),
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What `cloak agent verify` needs: the credentials (a mounted Secret), the URL that answers
/// with the caller's address, and how long the tunnel may take to pass it.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub credentials: PathBuf,
    pub probe: String,
    pub timeout: Duration,
    pub state_dir: PathBuf,
}

/// Verifies native credentials (`wg0.conf`, `config.ovpn`): brings the tunnel up behind the kill
/// switch in this network namespace, exactly as the agent does, and returns the exit address
/// the probe reports through the tunnel (none for a `tcp://` probe). Fails at once on
/// credentials the agent refuses, and with the agent's own last reason ("no wireguard handshake
/// with ...") when the tunnel did not pass its probe within the timeout.
pub async fn verify(options: VerifyOptions) -> Result<Option<std::net::IpAddr>, String> {
    std::fs::create_dir_all(&options.state_dir)
        .map_err(|e| format!("{}: {e}", options.state_dir.display()))?;
    let config_path = options.state_dir.join("verify.yaml");
    let yaml = format!(
        "credentials: {}\nhealth:\n  probe: {}\n  interval: 1s\n  timeout: 3s\n  failures: 3\nconnectTimeout: 15s\nbackoff: 500ms\nbackoffMax: 5s\n",
        yaml_quoted(&options.credentials.to_string_lossy()),
        yaml_quoted(&options.probe),
    );
    std::fs::write(&config_path, yaml).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let loaded = Resolved::load(&config_path).map(Arc::new);
    if let Err(e) = &loaded {
        return Err(format!("the agent refuses its config or credentials: {e}"));
    }
    let (status_tx, mut status_rx) = watch::channel(Status::default());
    let (_shutdown_tx, shutdown_rx) = watch::channel(false);
    let (_config_tx, config_rx) = watch::channel(loaded);
    let machine = linux_machine(&options.state_dir, status_tx, Arc::new(Metrics::new()));
    // The reason of the last failed attempt ("no wireguard handshake with ... within 15s") says
    // more than the attempt in progress when time runs out.
    let mut last_failure: Option<String> = None;
    let passed = async {
        loop {
            {
                let status = status_rx.borrow_and_update();
                if status.ready() {
                    return status.exit_ip;
                }
                if matches!(
                    status.phase,
                    machine::Phase::Reconnecting | machine::Phase::Blocked
                ) && !status.message.is_empty()
                {
                    last_failure = Some(status.message.clone());
                }
            }
            if status_rx.changed().await.is_err() {
                return None;
            }
        }
    };
    // The machine runs until the probe passes or time is up; the pod is thrown away afterwards,
    // and the machine's tunnel and firewall with its network namespace.
    let outcome = tokio::select! {
        () = machine.run(config_rx, shutdown_rx) => None,
        passed = tokio::time::timeout(options.timeout, passed) => Some(passed),
    };
    match outcome {
        Some(Ok(exit)) => return Ok(exit),
        None => return Err("the agent stopped before its tunnel passed the probe".into()),
        Some(Err(_)) => {}
    }
    let last = status_rx.borrow().clone();
    let why = last_failure.unwrap_or_else(|| format!("{}: {}", last.phase, last.message));
    Err(format!(
        "the tunnel did not pass its probe within {:?}: {why}",
        options.timeout
    ))
}

/// A YAML single-quoted scalar: any text, with `'` doubled.
fn yaml_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(token: Option<&str>, reader: Option<&str>) -> AdminState {
        let metrics_hash_file = reader.map(|r| {
            let dir = tempfile::tempdir().unwrap().keep();
            let file = dir.join("metrics-token-sha256");
            std::fs::write(&file, cloak_model::exit::token_sha256(r)).unwrap();
            Arc::from(file.as_path())
        });
        AdminState {
            status: watch::channel(Status::default()).1,
            inbound: watch::channel(Vec::new()).1,
            config: watch::channel(Err(config::ConfigError::Read {
                path: String::new(),
                reason: String::new(),
            }))
            .1,
            metrics: Arc::new(Metrics::new()),
            token: token.map(Arc::from),
            metrics_hash_file,
        }
    }

    fn bearing(token: &str) -> axum::http::HeaderMap {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn the_metrics_reader_token_reads_metrics_only_and_only_by_its_hash() {
        let exit = admin(Some("admin"), Some("reader"));
        assert!(exit.authorized(&bearing("admin")));
        assert!(!exit.metrics_reader(&bearing("admin")));
        // The reader: /metrics, not /status or the exit address.
        assert!(exit.metrics_reader(&bearing("reader")));
        assert!(!exit.authorized(&bearing("reader")));
        // Its hash is no token.
        let hash = cloak_model::exit::token_sha256("reader");
        assert!(!exit.metrics_reader(&bearing(&hash)));
        assert!(!exit.metrics_reader(&axum::http::HeaderMap::new()));
        assert!(!exit.metrics_reader(&bearing("")));
        // Without a reader hash nobody but the admin token's holder reads.
        assert!(!admin(Some("admin"), None).metrics_reader(&bearing("reader")));
    }

    /// `GET path` from the agent's admin server with `token` as its bearer: status and body.
    async fn get(admin: AdminState, path: &str, token: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(admin_app(admin).serve(listener));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        server.abort();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        (head[9..12].parse().unwrap(), body.to_owned())
    }

    #[tokio::test]
    async fn over_http_the_reader_gets_metrics_without_the_exit_address_and_no_status() {
        let exit = admin(Some("admin"), Some("reader"));
        exit.metrics
            .set_exit_ip(Some("198.51.100.11".parse().unwrap()));
        let (status, full) = get(exit.clone(), "/metrics", "admin").await;
        assert_eq!(status, 200);
        assert!(
            full.contains("cloak_agent_exit_info{ip=\"198.51.100.11\"} 1"),
            "{full}"
        );
        let (status, read) = get(exit.clone(), "/metrics", "reader").await;
        assert_eq!(status, 200);
        assert!(
            !read.contains("exit_info") && !read.contains("198.51.100.11"),
            "{read}"
        );
        assert!(
            read.contains("cloak_agent_tunnel_sent_bytes_total"),
            "{read}"
        );
        assert!(read.ends_with("# EOF\n"), "{read}");
        assert_eq!(get(exit.clone(), "/status", "reader").await.0, 401);
        assert_eq!(get(exit.clone(), "/status", "admin").await.0, 200);
        assert_eq!(get(exit.clone(), "/metrics", "nobody").await.0, 401);
    }
}
