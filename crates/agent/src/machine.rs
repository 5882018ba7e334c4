//! The tunnel state machine. It fails closed: entering a phase applies that phase's firewall
//! policy *before* anything else happens, and every error lands in a phase whose policy lets
//! nothing out but the VPN endpoints (or, with no usable config, nothing at all).
//!
//! ```text
//!            config error                        config error
//!   start ─────────────────► Blocked ◄──────────────────────────────┐
//!     │ config ok               │ config changes                    │
//!     ▼                         ▼                                   │
//!   Connecting ──(up + probe ok)──► Connected ──(probes fail,       │
//!     ▲   │ timeout/error               │        stale handshake,   │
//!     │   ▼                             ▼        tunnel dies)       │
//!   Reconnecting ◄──────────────────────┘                           │
//!    (backoff, doubling)  ────────── config changes ────────────────┘
//! ```
//!
//! | phase | firewall | routes (cloak's table) |
//! |---|---|---|
//! | Blocked | nothing leaves | unreachable |
//! | Connecting, Reconnecting | endpoints only (the tunnel interface leads only to them) | tunnel when open, else unreachable |
//! | Connected | endpoints, tunnel, bypass, DNS to the resolver through the tunnel | tunnel |

use std::{fmt, net::IpAddr, sync::Arc, time::Duration};

use cloak_dataplane::{Firewall, FirewallPolicy, RouteSet, Routes, TunnelDriver};
use tokio::{
    sync::watch,
    time::{Instant, sleep},
};

use crate::{
    config::{ConfigError, Resolved},
    health::{self, Verdict},
    metrics::Metrics,
    probe::Prober,
    resolve::Resolver,
};

/// While connecting, a handshake that has not completed after this long is started afresh: a
/// server that comes back is then found within about a second, not at WireGuard's next 5 s retry.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);

/// Where the agent is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    /// No usable config, or stopped: nothing leaves.
    #[default]
    Blocked,
    Connecting,
    Connected,
    /// The tunnel failed; waiting out the backoff before the next attempt.
    Reconnecting,
}

impl Phase {
    pub const ALL: [Self; 4] = [
        Self::Blocked,
        Self::Connecting,
        Self::Connected,
        Self::Reconnecting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Reconnecting => "reconnecting",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent reports (admin server, logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub phase: Phase,
    /// Why the agent is in this phase, in words.
    pub message: String,
    /// Whether the last probe passed (always true without a probe once connected).
    pub probe_ok: bool,
    pub implementation: Option<&'static str>,
    pub handshake_age: Option<Duration>,
    pub exit_ip: Option<IpAddr>,
    pub probe_latency: Option<Duration>,
    pub reconnects: u64,
}

impl Status {
    /// Ready: connected, and the tunnel passes its probe.
    pub fn ready(&self) -> bool {
        self.phase == Phase::Connected && self.probe_ok
    }
}

/// The config as the watcher last read it.
pub type ConfigResult = Result<Arc<Resolved>, ConfigError>;

enum Outcome {
    Shutdown,
    ConfigChanged,
    Failed(String),
}

/// The state machine and the side effects it drives.
#[allow(missing_debug_implementations)] // holds trait objects' implementations, not data
pub struct Machine<F, R, D, P, N> {
    pub firewall: F,
    pub routes: R,
    pub driver: D,
    pub prober: P,
    /// Resolves VPN server names given as host names, before each attempt.
    pub resolver: N,
    /// Where names are resolved when the config names no `endpointResolver` (the pod's
    /// resolv.conf as found at start).
    pub default_resolver: Option<IpAddr>,
    pub status: watch::Sender<Status>,
    pub metrics: Arc<Metrics>,
}

impl<F, R, D, P, N> Machine<F, R, D, P, N>
where
    F: Firewall,
    R: Routes,
    D: TunnelDriver,
    P: Prober,
    N: Resolver,
{
    /// Runs until `shutdown` turns true; leaves everything blocked on the way out (the
    /// application containers outlive the agent; they must not leak when it stops).
    pub async fn run(
        mut self,
        mut config: watch::Receiver<ConfigResult>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut failures: u32 = 0;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let current = config.borrow_and_update().clone();
            let cfg = match current {
                Err(e) => {
                    self.block(&format!("config: {e}"));
                    tokio::select! {
                        () = changed(&mut config) => continue,
                        _ = shutdown.changed() => break,
                    }
                }
                Ok(cfg) => cfg,
            };
            match self
                .session(&cfg, &mut failures, &mut config, &mut shutdown)
                .await
            {
                Outcome::Shutdown => break,
                Outcome::ConfigChanged => failures = 0,
                Outcome::Failed(reason) => {
                    failures = failures.saturating_add(1);
                    let backoff = backoff(cfg.backoff, cfg.backoff_max, failures);
                    tracing::warn!(%reason, attempt = failures, ?backoff, "tunnel failed; reconnecting");
                    self.metrics.reconnects.inc();
                    self.status.send_modify(|s| s.reconnects += 1);
                    if let Err(e) = self.enter(
                        Phase::Reconnecting,
                        format!("{reason} (attempt {failures}, next in {backoff:?})"),
                        &connecting_policy(&cfg, false),
                        &RouteSet::default(),
                    ) {
                        tracing::error!(%e, "applying the reconnecting policy failed");
                    }
                    tokio::select! {
                        () = sleep(backoff) => {}
                        () = changed(&mut config) => failures = 0,
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
        self.block("agent stopped");
    }

    /// One connection: open, wait for it to work, then watch it until it fails. A connection
    /// that worked clears `failures`: the next outage starts again from the shortest backoff.
    async fn session(
        &mut self,
        cfg: &Resolved,
        failures: &mut u32,
        config: &mut watch::Receiver<ConfigResult>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let names = cfg.tunnel.names();
        let resolved;
        let cfg = if names.is_empty() {
            cfg
        } else {
            let tunnel = tokio::select! {
                tunnel = self.resolve_names(cfg, &names) => tunnel,
                () = changed(config) => return Outcome::ConfigChanged,
                _ = shutdown.changed() => return Outcome::Shutdown,
            };
            match tunnel {
                Ok(tunnel) => {
                    resolved = Resolved {
                        tunnel,
                        ..cfg.clone()
                    };
                    &resolved
                }
                Err(reason) => return Outcome::Failed(reason),
            }
        };
        let endpoints: Vec<String> = cfg
            .tunnel
            .endpoints()
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(tunnel = %cfg.tunnel, "connecting");
        if let Err(e) = self.enter(
            Phase::Connecting,
            format!("connecting to {}", endpoints.join(", ")),
            &connecting_policy(cfg, true),
            &RouteSet::default(),
        ) {
            return Outcome::Failed(format!("firewall: {e}"));
        }
        let mut tunnel = match self.driver.open(&cfg.tunnel, cfg.userspace) {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(format!("opening the tunnel: {e}")),
        };
        let implementation = tunnel.implementation();
        let routes = RouteSet {
            tunnel: Some(cfg.tunnel.interface().to_owned()),
            ipv6: cfg.tunnel.carries_ipv6(),
            bypass: cfg.bypass.clone(),
        };
        tracing::info!(%routes, "routes");
        if let Err(e) = self.routes.apply(&routes) {
            return Outcome::Failed(format!("routes: {e}"));
        }
        self.status
            .send_modify(|s| s.implementation = Some(implementation));
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut connected = false;
        let mut probe_failures = 0;
        let mut last = (0, 0);
        let mut handshake_started = Instant::now();
        loop {
            // While connecting, look often; once connected, at the probe interval.
            let pause = if connected {
                cfg.health.interval
            } else {
                cfg.health.interval.min(Duration::from_millis(100))
            };
            tokio::select! {
                () = sleep(pause) => {}
                () = changed(config) => return Outcome::ConfigChanged,
                _ = shutdown.changed() => return Outcome::Shutdown,
            }
            let status = match tunnel.status() {
                Ok(s) => s,
                Err(e) => return Outcome::Failed(format!("reading tunnel status: {e}")),
            };
            self.metrics.record_tunnel(&status, &mut last);
            self.status
                .send_modify(|s| s.handshake_age = status.handshake_age);
            let up = match health::judge(&cfg.tunnel, &status, &cfg.health) {
                Verdict::Dead(reason) => return Outcome::Failed(reason),
                Verdict::Up => true,
                Verdict::NotUp => false,
            };
            if !up && !connected && handshake_started.elapsed() >= HANDSHAKE_RETRY {
                handshake_started = Instant::now();
                if let Err(e) = tunnel.restart_handshake() {
                    return Outcome::Failed(format!("restarting the handshake: {e}"));
                }
            }
            // A WireGuard tunnel handshakes only when it has something to send: while
            // connecting, the probe is that something (and proves the path end to end).
            if !up && (connected || cfg.probe.is_none()) {
                if !connected && Instant::now() > deadline {
                    return Outcome::Failed(format!(
                        "no {} handshake with {} within {:?}",
                        cfg.tunnel.kind(),
                        endpoints.join(", "),
                        cfg.connect_timeout
                    ));
                }
                if connected {
                    probe_failures += 1;
                    if probe_failures >= cfg.health.failures {
                        return Outcome::Failed(format!(
                            "{implementation} reports the tunnel down"
                        ));
                    }
                }
                continue;
            }
            let probe = match &cfg.probe {
                None => Ok(None),
                Some(target) => self
                    .prober
                    .probe(target, cfg.health.timeout)
                    .await
                    .map(Some),
            };
            match probe {
                Ok(result) => {
                    probe_failures = 0;
                    if let Some(ok) = &result {
                        self.metrics.record_probe(ok);
                    }
                    let exit_ip = result.as_ref().and_then(|r| r.exit_ip);
                    if !connected {
                        connected = true;
                        *failures = 0;
                        let message = format!("connected via {implementation}");
                        tracing::info!(exit = ?exit_ip, "{message}");
                        if let Err(e) =
                            self.enter(Phase::Connected, message, &connected_policy(cfg), &routes)
                        {
                            return Outcome::Failed(format!("firewall: {e}"));
                        }
                        // Only the resolver found at start is kept: a configured one comes
                        // from the config again.
                        write_resolv_conf(cfg, self.default_resolver);
                    }
                    self.status.send_modify(|s| {
                        s.probe_ok = true;
                        if let Some(r) = &result {
                            s.exit_ip = r.exit_ip.or(s.exit_ip);
                            s.probe_latency = Some(r.latency);
                        }
                    });
                }
                Err(e) => {
                    self.metrics.probe_failures.inc();
                    probe_failures += 1;
                    tracing::warn!(error = %e, failures = probe_failures, "probe failed");
                    if !connected && Instant::now() > deadline {
                        return Outcome::Failed(if up {
                            format!("probe through the tunnel failed: {e}")
                        } else {
                            format!(
                                "no {} handshake with {} within {:?}",
                                cfg.tunnel.kind(),
                                endpoints.join(", "),
                                cfg.connect_timeout
                            )
                        });
                    }
                    if connected {
                        self.status.send_modify(|s| {
                            s.probe_ok = false;
                            s.message = format!(
                                "probe failing ({probe_failures}/{}): {e}",
                                cfg.health.failures
                            );
                        });
                        if probe_failures >= cfg.health.failures {
                            return Outcome::Failed(format!(
                                "{probe_failures} probes in a row failed: {e}"
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Resolves the tunnel's server names through the one narrow path: the firewall lets the
    /// agent's marked queries reach the resolver (and nothing else out but the servers given as
    /// addresses), then the tunnel's config is returned with addresses in place of names. The
    /// next phase's policy closes the path again.
    async fn resolve_names(
        &mut self,
        cfg: &Resolved,
        names: &[String],
    ) -> Result<cloak_dataplane::TunnelConfig, String> {
        let server = cfg
            .endpoint_resolver
            .or(self.default_resolver)
            .ok_or_else(|| {
                format!(
                    "{} must be resolved, but no resolver is known: set endpointResolver",
                    names.join(", ")
                )
            })?;
        let policy = FirewallPolicy {
            resolver: Some(server),
            ..connecting_policy(cfg, false)
        };
        self.enter(
            Phase::Connecting,
            format!("resolving {} via {server}", names.join(", ")),
            &policy,
            &RouteSet::default(),
        )
        .map_err(|e| format!("firewall: {e}"))?;
        let mut answers = std::collections::BTreeMap::new();
        for name in names {
            let found = self
                .resolver
                .resolve(server, name)
                .await
                .map_err(|e| format!("resolving {name} via {server}: {e}"))?;
            tracing::info!(%name, addresses = ?found, "resolved");
            answers.insert(name.clone(), found);
        }
        cfg.tunnel.resolve(&answers)
    }

    /// Applies the phase's firewall policy first, then its routes, then reports the phase.
    /// When the policy cannot be loaded, block-all is tried in its place and the phase reported
    /// is Blocked, with both outcomes in its message.
    fn enter(
        &mut self,
        phase: Phase,
        message: String,
        policy: &FirewallPolicy,
        routes: &RouteSet,
    ) -> Result<(), cloak_dataplane::Error> {
        tracing::info!(%phase, %policy, "firewall");
        if let Err(e) = self.firewall.apply(policy) {
            // Whatever failed, what remains must be closed.
            let fallback = if phase == Phase::Blocked {
                Err(e.to_string())
            } else {
                self.firewall
                    .apply(&FirewallPolicy::block_all())
                    .map_err(|e| e.to_string())
            };
            let report = match &fallback {
                Ok(()) => {
                    format!("{message}: loading the {phase} firewall failed ({e}); blocked instead")
                }
                Err(_) if phase == Phase::Blocked => format!(
                    "{message}: loading the block-all firewall failed ({e}): the firewall is in an unknown state"
                ),
                Err(again) => format!(
                    "{message}: loading the {phase} firewall failed ({e}) and the block-all fallback failed too ({again}): the firewall is in an unknown state"
                ),
            };
            tracing::error!(%report, "firewall");
            self.metrics.set_phase(Phase::Blocked);
            self.metrics.set_exit_ip(None);
            self.status.send_modify(|s| {
                s.phase = Phase::Blocked;
                s.message = report;
                s.probe_ok = false;
                s.handshake_age = None;
                s.exit_ip = None;
                s.probe_latency = None;
            });
            return Err(e);
        }
        self.routes.apply(routes)?;
        self.metrics.set_phase(phase);
        self.status.send_modify(|s| {
            s.phase = phase;
            s.message = message;
            s.probe_ok = false;
            if phase != Phase::Connected {
                s.handshake_age = None;
                s.exit_ip = None;
                s.probe_latency = None;
            }
        });
        if phase != Phase::Connected {
            self.metrics.set_exit_ip(None);
        }
        Ok(())
    }

    fn block(&mut self, message: &str) {
        tracing::warn!(reason = message, "blocking all traffic");
        // A failure is reported by `enter` (firewall) or here (routes); the next config change
        // or the shutdown tries again.
        if let Err(e) = self.enter(
            Phase::Blocked,
            message.to_owned(),
            &FirewallPolicy::block_all(),
            &RouteSet::default(),
        ) {
            tracing::error!(%e, "applying the block-all policy failed");
            self.status.send_modify(|s| {
                if !s.message.contains("block-all") {
                    s.message = format!("{message}; applying the block-all policy failed: {e}");
                }
            });
        }
    }
}

/// A change of the config. Once its sender is gone no change can come, which is not a change:
/// this then waits forever (shutdown still ends the machine) instead of returning at once in a
/// loop.
async fn changed(config: &mut watch::Receiver<ConfigResult>) {
    if config.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// While (re)connecting: only the endpoints, and the tunnel interface, whose packets leave only
/// as encrypted packets to the endpoints.
fn connecting_policy(cfg: &Resolved, with_tunnel: bool) -> FirewallPolicy {
    FirewallPolicy {
        endpoints: cfg.tunnel.endpoints(),
        tunnel: with_tunnel.then(|| cfg.tunnel.interface().to_owned()),
        tunnel_ipv6: cfg.tunnel.carries_ipv6(),
        dns: cfg.dns,
        bypass: Vec::new(),
        clamp_mss: None,
        resolver: None,
        // The agent forwards nothing through the tunnel (yet): its traffic needs no tracking.
        notrack_tunnel: true,
    }
}

fn connected_policy(cfg: &Resolved) -> FirewallPolicy {
    FirewallPolicy {
        bypass: cfg.bypass.clone(),
        // TCP header 20 + IPv4 header 20; the firewall clamps IPv6 20 bytes lower.
        clamp_mss: Some(cfg.tunnel.mtu().saturating_sub(40)),
        ..connecting_policy(cfg, true)
    }
}

fn write_resolv_conf(cfg: &Resolved, endpoint_resolver: Option<IpAddr>) {
    if let (Some(path), Some(dns)) = (&cfg.resolv_conf, cfg.dns)
        && let Err(e) = std::fs::write(path, crate::resolve::resolv_conf(dns, endpoint_resolver))
    {
        tracing::warn!(path = %path.display(), %e, "writing resolv.conf failed");
    }
}

/// `initial × 2^(failures-1)`, capped.
fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    initial
        .saturating_mul(1 << failures.saturating_sub(1).min(20))
        .min(max)
}

#[cfg(test)]
mod tests;
