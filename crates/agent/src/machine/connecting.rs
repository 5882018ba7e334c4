//! Connecting: server names resolved through the one narrow path, the tunnel opened behind the
//! endpoints-only policy, then watched until its implementation reports it up and the probe (when
//! there is one) passes through it. Only then does the machine enter Connected.

use std::{sync::Arc, time::Duration};

use cloak_dataplane::{FirewallPolicy, RouteSet, Tunnel, TunnelConfig};
use tokio::time::Instant;

use super::{Effects, Phase, Transition, connected::Connected, policy};
use crate::config::Resolved;

/// While connecting, a handshake that has not completed after this long is started afresh: a
/// server that comes back is then found within about a second, not at WireGuard's next 5 s retry.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);

pub(super) struct Connecting {
    /// The config as read, server names unresolved (what a retry starts from).
    pub(super) source: Arc<Resolved>,
    /// The config this attempt runs: names replaced by their addresses.
    pub(super) cfg: Resolved,
    pub(super) tunnel: Box<dyn Tunnel>,
    pub(super) routes: RouteSet,
    /// Failures in a row before this attempt.
    failures: u32,
    endpoints: String,
    deadline: Instant,
    handshake_started: Instant,
    pub(super) last: (u64, u64),
}

impl Connecting {
    /// Enters Connecting: resolves server names (when the credentials give any), applies the
    /// endpoints-only policy, opens the tunnel, routes into it. `Err` is the reason to reconnect.
    pub(super) async fn enter<M: Effects>(
        m: &mut M,
        source: Arc<Resolved>,
        failures: u32,
    ) -> Result<Self, String> {
        let names = source.tunnel.names();
        let cfg = if names.is_empty() {
            (*source).clone()
        } else {
            Resolved {
                tunnel: resolve_names(m, &source, &names).await?,
                ..(*source).clone()
            }
        };
        let endpoints = cfg
            .tunnel
            .endpoints()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(tunnel = %cfg.tunnel, "connecting");
        m.enter_phase(
            Phase::Connecting,
            format!("connecting to {endpoints}"),
            &policy::connecting(&cfg, true),
            &RouteSet::default(),
        )
        .map_err(|e| format!("firewall: {e}"))?;
        let tunnel = m
            .open(&cfg.tunnel, cfg.userspace)
            .map_err(|e| format!("opening the tunnel: {e}"))?;
        let routes = RouteSet {
            tunnel: Some(cfg.tunnel.interface().to_owned()),
            ipv6: cfg.tunnel.carries_ipv6(),
            bypass: cfg.bypass.clone(),
        };
        tracing::info!(%routes, "routes");
        m.apply_routes(&routes)
            .map_err(|e| format!("routes: {e}"))?;
        let implementation = tunnel.implementation();
        m.status()
            .send_modify(|s| s.implementation = Some(implementation));
        let now = Instant::now();
        Ok(Self {
            deadline: now + cfg.connect_timeout,
            handshake_started: now,
            source,
            cfg,
            tunnel,
            routes,
            failures,
            endpoints,
            last: (0, 0),
        })
    }

    /// Looks often while connecting.
    pub(super) fn pause(&self) -> Duration {
        self.cfg.health.interval.min(Duration::from_millis(100))
    }

    /// Reads the tunnel's report; probes through it once it could carry the probe.
    pub(super) async fn on_tick<M: Effects>(mut self, m: &mut M) -> Transition {
        let up = match m.judge(self.tunnel.as_mut(), &self.cfg, &mut self.last) {
            Ok(up) => up,
            Err(reason) => return self.fail(reason),
        };
        if !up && self.handshake_started.elapsed() >= HANDSHAKE_RETRY {
            self.handshake_started = Instant::now();
            if let Err(e) = self.tunnel.restart_handshake() {
                return self.fail(format!("restarting the handshake: {e}"));
            }
        }
        let Some(target) = self.cfg.probe.clone() else {
            if up {
                return Connected::enter(m, self, None);
            }
            if Instant::now() > self.deadline {
                let reason = self.no_handshake();
                return self.fail(reason);
            }
            return Transition::Stay(super::State::Connecting(Box::new(self)));
        };
        // A WireGuard tunnel handshakes only when it has something to send: while connecting,
        // the probe is that something (and proves the path end to end).
        match m.probe(&target, self.cfg.health.timeout).await {
            Ok(ok) => Connected::enter(m, self, Some(&ok)),
            Err(e) => {
                m.metrics().probe_failures.inc();
                tracing::warn!(error = %e, "probe failed");
                if Instant::now() > self.deadline {
                    let reason = if up {
                        format!("probe through the tunnel failed: {e}")
                    } else {
                        self.no_handshake()
                    };
                    return self.fail(reason);
                }
                Transition::Stay(super::State::Connecting(Box::new(self)))
            }
        }
    }

    fn no_handshake(&self) -> String {
        format!(
            "no {} handshake with {} within {:?}",
            self.cfg.tunnel.kind(),
            self.endpoints,
            self.cfg.connect_timeout
        )
    }

    /// This attempt failed: the tunnel closes (dropped with `self`), then Reconnecting.
    fn fail(self, reason: String) -> Transition {
        Transition::Reconnect {
            cfg: self.source,
            failures: self.failures.saturating_add(1),
            reason,
        }
    }
}

/// Resolves the tunnel's server names through the one narrow path: the firewall lets the agent's
/// marked queries reach the resolver (and nothing else out but the servers given as addresses),
/// then the tunnel's config is returned with addresses in place of names. The next phase's policy
/// closes the path again.
async fn resolve_names<M: Effects>(
    m: &mut M,
    cfg: &Resolved,
    names: &[String],
) -> Result<TunnelConfig, String> {
    let server = cfg
        .endpoint_resolver
        .or(m.default_resolver())
        .ok_or_else(|| {
            format!(
                "{} must be resolved, but no resolver is known: set endpointResolver",
                names.join(", ")
            )
        })?;
    let policy = FirewallPolicy {
        resolver: Some(server),
        ..policy::connecting(cfg, false)
    };
    m.enter_phase(
        Phase::Connecting,
        format!("resolving {} via {server}", names.join(", ")),
        &policy,
        &RouteSet::default(),
    )
    .map_err(|e| format!("firewall: {e}"))?;
    let mut answers = std::collections::BTreeMap::new();
    for name in names {
        let found = m
            .resolve(server, name)
            .await
            .map_err(|e| format!("resolving {name} via {server}: {e}"))?;
        tracing::info!(%name, addresses = ?found, "resolved");
        answers.insert(name.clone(), found);
    }
    cfg.tunnel.resolve(&answers)
}
