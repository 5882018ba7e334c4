//! Connected: the tunnel works. The bypass opens and the MSS is clamped; the tunnel is watched at
//! the probe interval until its implementation reports it down or `health.failures` probes in a
//! row fail, and then it is reopened.

use std::{sync::Arc, time::Duration};

use cloak_dataplane::Tunnel;

use super::{Effects, Phase, State, Transition, connecting::Connecting, policy};
use crate::{config::Resolved, probe::ProbeOk};

pub(super) struct Connected {
    source: Arc<Resolved>,
    cfg: Resolved,
    tunnel: Box<dyn Tunnel>,
    implementation: &'static str,
    probe_failures: u32,
    last: (u64, u64),
}

impl Connected {
    /// Enters Connected from a connection that just worked (`probe`: the probe that proved it,
    /// when there is a probe): the connected policy first, then the routes, then the pod's
    /// resolv.conf.
    pub(super) fn enter<M: Effects>(
        m: &mut M,
        from: Connecting,
        probe: Option<&ProbeOk>,
    ) -> Transition {
        let implementation = from.tunnel.implementation();
        let exit_ip = probe.and_then(|p| p.exit_ip);
        let message = format!("connected via {implementation}");
        tracing::info!(exit = ?exit_ip, "{message}");
        if let Err(e) = m.enter_phase(
            Phase::Connected,
            message,
            &policy::connected(&from.cfg),
            &from.routes,
        ) {
            // The connection worked: the next outage starts again from the shortest backoff.
            return Transition::Reconnect {
                cfg: from.source,
                failures: 1,
                reason: format!("firewall: {e}"),
            };
        }
        // Only the resolver found at start is kept: a configured one comes from the config again.
        write_resolv_conf(&from.cfg, m.default_resolver());
        m.record_probe(probe);
        Transition::Stay(State::Connected(Box::new(Self {
            source: from.source,
            cfg: from.cfg,
            tunnel: from.tunnel,
            implementation,
            probe_failures: 0,
            last: from.last,
        })))
    }

    pub(super) fn pause(&self) -> Duration {
        self.cfg.health.interval
    }

    pub(super) async fn on_tick<M: Effects>(mut self, m: &mut M) -> Transition {
        let up = match m.judge(self.tunnel.as_mut(), &self.cfg, &mut self.last) {
            Ok(up) => up,
            Err(reason) => return self.fail(reason),
        };
        let limit = self.cfg.health.failures;
        if !up {
            self.probe_failures += 1;
            if self.probe_failures >= limit {
                let reason = format!("{} reports the tunnel down", self.implementation);
                return self.fail(reason);
            }
            return Transition::Stay(State::Connected(Box::new(self)));
        }
        let Some(target) = self.cfg.probe.clone() else {
            self.probe_failures = 0;
            m.record_probe(None);
            return Transition::Stay(State::Connected(Box::new(self)));
        };
        match m.probe(&target, self.cfg.health.timeout).await {
            Ok(ok) => {
                self.probe_failures = 0;
                m.record_probe(Some(&ok));
            }
            Err(e) => {
                m.metrics().probe_failures.inc();
                self.probe_failures += 1;
                let failures = self.probe_failures;
                tracing::warn!(error = %e, failures, "probe failed");
                m.status().send_modify(|s| {
                    s.probe_ok = false;
                    s.message = format!("probe failing ({failures}/{limit}): {e}");
                });
                if failures >= limit {
                    return self.fail(format!("{failures} probes in a row failed: {e}"));
                }
            }
        }
        Transition::Stay(State::Connected(Box::new(self)))
    }

    /// The tunnel stopped working: it closes (dropped with `self`), then Reconnecting. It had
    /// worked, so this is the first failure of a new outage.
    fn fail(self, reason: String) -> Transition {
        Transition::Reconnect {
            cfg: self.source,
            failures: 1,
            reason,
        }
    }
}

fn write_resolv_conf(cfg: &Resolved, endpoint_resolver: Option<std::net::IpAddr>) {
    if let (Some(path), Some(dns)) = (&cfg.resolv_conf, cfg.dns)
        && let Err(e) = std::fs::write(path, crate::resolve::resolv_conf(dns, endpoint_resolver))
    {
        tracing::warn!(path = %path.display(), %e, "writing resolv.conf failed");
    }
}
