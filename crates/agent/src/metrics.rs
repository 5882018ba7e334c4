//! The agent's metrics: one registry, names prefixed `cloak_agent_`, units in names.

use std::{net::IpAddr, sync::Mutex};

use cloak_dataplane::TunnelStatus;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{machine::Phase, probe::ProbeOk};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    ip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InboundLabels {
    name: String,
    protocol: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    state: Family<StateLabels, Gauge>,
    handshake_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    rx: Counter,
    tx: Counter,
    pub(crate) reconnects: Counter,
    probe_latency: Histogram,
    pub(crate) probe_failures: Counter,
    exit: Family<ExitLabels, Gauge>,
    exit_now: Mutex<Option<IpAddr>>,
    pub(crate) inbound_mappings: Gauge,
    pub(crate) inbound_renewals: Counter,
    pub(crate) inbound_failures: Counter,
    pub(crate) inbound_epoch_resets: Counter,
    inbound_connections: Family<InboundLabels, Counter>,
    /// The inbound rules' counters as last read (a table written anew starts them from 0).
    inbound_last: Mutex<std::collections::BTreeMap<String, u64>>,
    pub(crate) exit_healthy: Gauge,
    pub(crate) exit_draining: Gauge,
    pub(crate) exit_client_flows: Gauge,
    pub(crate) exit_dns_queries: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cloak_agent");
        let state = Family::<StateLabels, Gauge>::default();
        let handshake_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let (rx, tx, reconnects, probe_failures) = Default::default();
        let probe_latency =
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        let exit = Family::<ExitLabels, Gauge>::default();
        registry.register("state", "1 for the phase the agent is in", state.clone());
        registry.register(
            "handshake_age_seconds",
            "Age of the tunnel's last handshake",
            handshake_age.clone(),
        );
        registry.register(
            "tunnel_received_bytes",
            "Bytes received through the tunnel",
            Counter::clone(&rx),
        );
        registry.register(
            "tunnel_sent_bytes",
            "Bytes sent through the tunnel",
            Counter::clone(&tx),
        );
        registry.register(
            "reconnects",
            "Tunnel reconnections",
            Counter::clone(&reconnects),
        );
        registry.register(
            "probe_latency_seconds",
            "Round trip of successful health probes through the tunnel",
            probe_latency.clone(),
        );
        registry.register(
            "probe_failures",
            "Failed health probes",
            Counter::clone(&probe_failures),
        );
        registry.register(
            "exit_info",
            "The public exit address the probe target reported (value 1)",
            exit.clone(),
        );
        let inbound_mappings = Gauge::default();
        let (inbound_renewals, inbound_failures, inbound_epoch_resets) = Default::default();
        registry.register(
            "inbound_mappings",
            "Inbound ports the provider forwards to this exit now",
            inbound_mappings.clone(),
        );
        registry.register(
            "inbound_renewals",
            "NAT-PMP mappings granted or renewed",
            Counter::clone(&inbound_renewals),
        );
        registry.register(
            "inbound_failures",
            "NAT-PMP requests refused or unanswered",
            Counter::clone(&inbound_failures),
        );
        registry.register(
            "inbound_epoch_resets",
            "Times the NAT-PMP gateway's epoch said it had lost every mapping",
            Counter::clone(&inbound_epoch_resets),
        );
        let inbound_connections = Family::<InboundLabels, Counter>::default();
        registry.register(
            "inbound_connections",
            "Connections taken on an inbound port, by request name and protocol",
            inbound_connections.clone(),
        );
        let mut m = Self {
            registry: Registry::default(),
            state,
            handshake_age,
            rx,
            tx,
            reconnects,
            probe_latency,
            probe_failures,
            exit,
            exit_now: Mutex::new(None),
            inbound_mappings,
            inbound_renewals,
            inbound_failures,
            inbound_epoch_resets,
            inbound_connections,
            inbound_last: Mutex::new(std::collections::BTreeMap::new()),
            exit_healthy: Gauge::default(),
            exit_draining: Gauge::default(),
            exit_client_flows: Gauge::default(),
            exit_dns_queries: Counter::default(),
        };
        m.register_exit(&mut registry);
        m.set_phase(Phase::Blocked);
        m.registry = registry;
        m
    }

    /// A gateway exit's own series (0 on an agent that is no exit).
    fn register_exit(&self, registry: &mut Registry) {
        registry.register(
            "exit_healthy",
            "1 while this gateway exit takes new flows (its tunnel up and its probes answered)",
            self.exit_healthy.clone(),
        );
        registry.register(
            "exit_draining",
            "1 while this gateway exit drains: established flows go on, no new ones come",
            self.exit_draining.clone(),
        );
        registry.register(
            "exit_client_flows",
            "Client flows this gateway exit carries now (conntrack, read at each scrape)",
            self.exit_client_flows.clone(),
        );
        registry.register(
            "exit_dns_queries",
            "DNS queries of the gateway's clients this exit forwarded",
            Counter::clone(&self.exit_dns_queries),
        );
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        for p in Phase::ALL {
            self.state
                .get_or_create(&StateLabels { state: p.as_str() })
                .set(i64::from(p == phase));
        }
    }

    /// Adds the byte counts since the last reading (`last` is per tunnel: a new tunnel starts
    /// from zero).
    pub(crate) fn record_tunnel(&self, status: &TunnelStatus, last: &mut (u64, u64)) {
        self.rx.inc_by(status.rx_bytes.saturating_sub(last.0));
        self.tx.inc_by(status.tx_bytes.saturating_sub(last.1));
        *last = (status.rx_bytes, status.tx_bytes);
        self.handshake_age
            .set(status.handshake_age.map_or(0.0, |a| a.as_secs_f64()));
    }

    pub(crate) fn record_probe(&self, ok: &ProbeOk) {
        self.probe_latency.observe(ok.latency.as_secs_f64());
        if ok.exit_ip.is_some() {
            self.set_exit_ip(ok.exit_ip);
        }
    }

    pub(crate) fn set_exit_ip(&self, ip: Option<IpAddr>) {
        let Ok(mut now) = self.exit_now.lock() else {
            return;
        };
        if *now != ip {
            self.exit.clear();
            if let Some(ip) = ip {
                self.exit
                    .get_or_create(&ExitLabels { ip: ip.to_string() })
                    .set(1);
            }
            *now = ip;
        }
    }

    /// Adds the connections the inbound rules took since they were last read (`counts`: by
    /// `<name>/<protocol>`, as the rules' counters stand now).
    pub(crate) fn record_inbound(&self, counts: &std::collections::BTreeMap<String, u64>) {
        let Ok(mut last) = self.inbound_last.lock() else {
            return;
        };
        for (key, now) in counts {
            let before = last.get(key).copied().unwrap_or(0);
            // Lower than before: the table was written anew, its counters started from 0.
            let new = now.checked_sub(before).unwrap_or(*now);
            let (name, protocol) = key.rsplit_once('/').unwrap_or((key, ""));
            self.inbound_connections
                .get_or_create(&InboundLabels {
                    name: name.to_owned(),
                    protocol: protocol.to_owned(),
                })
                .inc_by(new);
        }
        last.clone_from(counts);
    }

    /// Forgets the inbound rules' last counts: their table was written anew, its counters
    /// start from 0.
    pub(crate) fn reset_inbound_counts(&self) {
        if let Ok(mut last) = self.inbound_last.lock() {
            last.clear();
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        cloak_admin::encode(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
