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
//!
//! Each state is a module ([`blocked`], [`connecting`], [`connected`], [`reconnecting`]) with an
//! `enter` that applies the state's policy before anything else, and an `on_tick` that judges
//! what the tunnel reports and returns a [`Transition`]. The two events every state answers alike
//! live here, in the driver ([`Machine::run`]): a config change (a broken config blocks, a good
//! one connects afresh with the failure count reset) and the shutdown (block, stop). The tunnel
//! belongs to the state that opened it, so leaving Connecting or Connected closes it before the
//! next state is entered.

use std::{fmt, net::IpAddr, sync::Arc, time::Duration};

use cloak_dataplane::{
    Firewall, FirewallPolicy, RouteSet, Routes, Tunnel, TunnelConfig, TunnelDriver,
};
use tokio::{sync::watch, time::sleep};

#[cfg(test)]
use self::reconnecting::backoff;
use self::{connected::Connected, connecting::Connecting, reconnecting::Reconnecting};
use crate::{
    config::{ConfigError, ProbeTarget, Resolved},
    health::{self, Verdict},
    metrics::Metrics,
    probe::{ProbeOk, Prober},
    resolve::Resolver,
};

mod blocked;
mod connected;
mod connecting;
mod policy;
mod reconnecting;

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

/// The state the machine is in, with what it holds (the open tunnel, the failure count).
enum State {
    Blocked,
    // Boxed: each holds a whole config and its tunnel.
    Connecting(Box<Connecting>),
    Connected(Box<Connected>),
    Reconnecting(Reconnecting),
}

impl State {
    /// How long the state waits before its next look at the tunnel; `None`: only a config change
    /// or the shutdown moves it.
    fn pause(&self) -> Option<Duration> {
        match self {
            Self::Blocked => None,
            Self::Connecting(c) => Some(c.pause()),
            Self::Connected(c) => Some(c.pause()),
            Self::Reconnecting(r) => Some(r.pause()),
        }
    }
}

/// Where a state's answer to an event leads.
enum Transition {
    /// Stay, with the state as it now is.
    Stay(State),
    Block(String),
    /// Connect with `cfg` (as read: names unresolved), after `failures` failures in a row.
    Connect {
        cfg: Arc<Resolved>,
        failures: u32,
    },
    Reconnect {
        cfg: Arc<Resolved>,
        failures: u32,
        reason: String,
    },
    Stop,
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
        let mut next = read(&mut config);
        // The config the tunnel runs with: a change of the exit's inbound ports alone leaves
        // it running (`crate::inbound` follows those).
        let mut running: Option<Arc<Resolved>> = None;
        loop {
            if *shutdown.borrow() {
                // The tunnel (held by the state) closes before the block-all below.
                drop(next);
                break;
            }
            let state = match next {
                Transition::Stop => break,
                Transition::Stay(state) => state,
                Transition::Block(reason) => {
                    running = None;
                    blocked::enter(&mut self, &reason);
                    State::Blocked
                }
                Transition::Connect { cfg, failures } => {
                    running = Some(Arc::clone(&cfg));
                    // Resolving names takes time: a config change or the shutdown cuts it short.
                    let entered = tokio::select! {
                        entered = Connecting::enter(&mut self, Arc::clone(&cfg), failures) => entered,
                        () = changed(&mut config) => {
                            next = read(&mut config);
                            continue;
                        }
                        _ = shutdown.changed() => break,
                    };
                    match entered {
                        Ok(connecting) => State::Connecting(Box::new(connecting)),
                        Err(reason) => {
                            next = Transition::Reconnect {
                                cfg,
                                failures: failures.saturating_add(1),
                                reason,
                            };
                            continue;
                        }
                    }
                }
                Transition::Reconnect {
                    cfg,
                    failures,
                    reason,
                } => State::Reconnecting(Reconnecting::enter(&mut self, cfg, failures, &reason)),
            };
            let pause = state.pause();
            let tick = async {
                match pause {
                    Some(pause) => sleep(pause).await,
                    None => std::future::pending().await,
                }
            };
            next = tokio::select! {
                () = tick => match state {
                    State::Blocked => Transition::Stay(State::Blocked),
                    State::Connecting(c) => (*c).on_tick(&mut self).await,
                    State::Connected(c) => (*c).on_tick(&mut self).await,
                    State::Reconnecting(r) => r.on_tick(),
                },
                // The state (and its tunnel) is dropped before the next one is entered, unless
                // only the exit's inbound ports changed.
                () = changed(&mut config) => {
                    let fresh = config.borrow().clone();
                    match (&fresh, &running) {
                        (Ok(new), Some(old)) if new != old && same_but_inbound(new, old) => {
                            Transition::Stay(state)
                        }
                        _ => read(&mut config),
                    }
                }
                _ = shutdown.changed() => Transition::Stop,
            };
        }
        blocked::enter(&mut self, "agent stopped");
    }
}

/// What a state may do: the machine's side effects behind one bound, so each state's code says
/// `M: Effects` instead of naming the five seams.
trait Effects {
    /// Applies the phase's firewall policy first, then its routes, then reports the phase.
    fn enter_phase(
        &mut self,
        phase: Phase,
        message: String,
        policy: &FirewallPolicy,
        routes: &RouteSet,
    ) -> Result<(), cloak_dataplane::Error>;
    fn apply_routes(&mut self, routes: &RouteSet) -> Result<(), cloak_dataplane::Error>;
    fn open(
        &mut self,
        tunnel: &TunnelConfig,
        userspace_only: bool,
    ) -> Result<Box<dyn Tunnel>, cloak_dataplane::Error>;
    fn judge(
        &mut self,
        tunnel: &mut dyn Tunnel,
        cfg: &Resolved,
        last: &mut (u64, u64),
    ) -> Result<bool, String>;
    fn record_probe(&mut self, probe: Option<&ProbeOk>);
    fn probe(
        &self,
        target: &ProbeTarget,
        timeout: Duration,
    ) -> impl Future<Output = Result<ProbeOk, String>> + Send;
    fn resolve(
        &self,
        server: IpAddr,
        name: &str,
    ) -> impl Future<Output = Result<Vec<IpAddr>, String>> + Send;
    fn default_resolver(&self) -> Option<IpAddr>;
    fn status(&self) -> &watch::Sender<Status>;
    fn metrics(&self) -> &Metrics;
}

impl<F, R, D, P, N> Effects for Machine<F, R, D, P, N>
where
    F: Firewall,
    R: Routes,
    D: TunnelDriver,
    P: Prober,
    N: Resolver,
{
    /// Reads the tunnel's report into the metrics and the status, and judges it: whether it is
    /// up, or why it must be reopened.
    fn judge(
        &mut self,
        tunnel: &mut dyn Tunnel,
        cfg: &Resolved,
        last: &mut (u64, u64),
    ) -> Result<bool, String> {
        let status = tunnel
            .status()
            .map_err(|e| format!("reading tunnel status: {e}"))?;
        self.metrics.record_tunnel(&status, last);
        self.status
            .send_modify(|s| s.handshake_age = status.handshake_age);
        match health::judge(&cfg.tunnel, &status, &cfg.health) {
            Verdict::Dead(reason) => Err(reason),
            Verdict::Up => Ok(true),
            Verdict::NotUp => Ok(false),
        }
    }

    /// A passed probe (`None`: no probe is configured and the tunnel is up).
    fn record_probe(&mut self, probe: Option<&ProbeOk>) {
        if let Some(ok) = probe {
            self.metrics.record_probe(ok);
        }
        self.status.send_modify(|s| {
            s.probe_ok = true;
            if let Some(r) = probe {
                s.exit_ip = r.exit_ip.or(s.exit_ip);
                s.probe_latency = Some(r.latency);
            }
        });
    }

    /// Applies the phase's firewall policy first, then its routes, then reports the phase.
    /// When the policy cannot be loaded, block-all is tried in its place and the phase reported
    /// is Blocked, with both outcomes in its message.
    fn enter_phase(
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

    fn apply_routes(&mut self, routes: &RouteSet) -> Result<(), cloak_dataplane::Error> {
        self.routes.apply(routes)
    }

    fn open(
        &mut self,
        tunnel: &TunnelConfig,
        userspace_only: bool,
    ) -> Result<Box<dyn Tunnel>, cloak_dataplane::Error> {
        self.driver.open(tunnel, userspace_only)
    }

    fn probe(
        &self,
        target: &ProbeTarget,
        timeout: Duration,
    ) -> impl Future<Output = Result<ProbeOk, String>> + Send {
        self.prober.probe(target, timeout)
    }

    fn resolve(
        &self,
        server: IpAddr,
        name: &str,
    ) -> impl Future<Output = Result<Vec<IpAddr>, String>> + Send {
        self.resolver.resolve(server, name)
    }

    fn default_resolver(&self) -> Option<IpAddr> {
        self.default_resolver
    }

    fn status(&self) -> &watch::Sender<Status> {
        &self.status
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The config as the watcher last read it, as where it leads: a broken one blocks, a good one
/// connects afresh (no failures counted).
fn read(config: &mut watch::Receiver<ConfigResult>) -> Transition {
    match config.borrow_and_update().clone() {
        Err(e) => Transition::Block(format!("config: {e}")),
        Ok(cfg) => Transition::Connect { cfg, failures: 0 },
    }
}

/// Whether two configs differ in the exit's inbound ports (`exit.forwards`) at most: the
/// tunnel need not be made again for those.
fn same_but_inbound(a: &Resolved, b: &Resolved) -> bool {
    let strip = |r: &Resolved| {
        let mut r = r.clone();
        if let Some(exit) = r.exit.as_mut() {
            exit.forwards.clear();
        }
        r
    };
    strip(a) == strip(b)
}

/// A change of the config. Once its sender is gone no change can come, which is not a change:
/// this then waits forever (shutdown still ends the machine) instead of returning at once in a
/// loop.
async fn changed(config: &mut watch::Receiver<ConfigResult>) {
    if config.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
pub(crate) mod tests;
