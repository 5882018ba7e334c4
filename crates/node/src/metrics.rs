//! `cloak node`'s metrics: one registry, names prefixed `cloak_node_`, units in the names, and
//! no label per pod or flow (a gateway's namespace and name at most).

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GatewayLabels {
    pub(crate) namespace: String,
    pub(crate) gateway: String,
}

/// How this node sees an exit now.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum ExitState {
    /// Answers its probes and takes new flows.
    healthy,
    /// Answers, says it is going: keeps its flows, takes no new ones.
    draining,
    /// Missed its probes: takes no new flows, its flows were reset.
    dead,
    /// Neither answered nor missed enough yet: the gateway's status decides.
    unknown,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ExitLabels {
    pub(crate) namespace: String,
    pub(crate) gateway: String,
    pub(crate) state: ExitState,
}

/// Why new flows left an exit.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum FailoverReason {
    /// It stopped answering its probes through its link.
    unanswered,
    /// It said it drains (its pod is going away).
    draining,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FailoverLabels {
    pub(crate) namespace: String,
    pub(crate) gateway: String,
    pub(crate) reason: FailoverReason,
}

/// Why flows were reset.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum ResetReason {
    /// Their exit stopped answering.
    dead,
    /// Their exit left the gateway (or the slot was given to another exit).
    removed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResetLabels {
    pub(crate) reason: ResetReason,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum Outcome {
    ok,
    error,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub(crate) outcome: Outcome,
}

#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Exits by gateway and how this node sees them (set at each scrape).
    pub(crate) exits: Family<ExitLabels, Gauge>,
    /// Attached clients by gateway (set at each scrape).
    pub(crate) clients: Family<GatewayLabels, Gauge>,
    pub(crate) failovers: Family<FailoverLabels, Counter>,
    pub(crate) flows_reset: Family<ResetLabels, Counter>,
    pub(crate) probe_rtt: Histogram,
    pub(crate) plan_applies: Family<OutcomeLabels, Counter>,
    pub(crate) plan_apply_duration: Histogram,
    pub(crate) drift_repairs: Counter,
    /// 1 while the node's plan is applied (what `/readyz` says).
    pub(crate) plan_applied: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("cloak_node");
        let exits = Family::<ExitLabels, Gauge>::default();
        registry.register(
            "exits",
            "Exits of each gateway with clients on this node, by how this node's probes see them",
            exits.clone(),
        );
        let clients = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "clients",
            "Pods attached to each gateway on this node",
            clients.clone(),
        );
        let failovers = Family::<FailoverLabels, Counter>::default();
        registry.register(
            "failovers",
            "Exits this node stopped giving new flows to, by gateway and reason",
            failovers.clone(),
        );
        let flows_reset = Family::<ResetLabels, Counter>::default();
        registry.register(
            "flows_reset",
            "Flows reset on this node because their exit died or left",
            flows_reset.clone(),
        );
        // The probe interval is 100 ms by default: an answer is in well under it.
        let probe_rtt = Histogram::new([
            0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        ]);
        registry.register(
            "probe_rtt_seconds",
            "Round trip of the exits' probe answers through their links",
            probe_rtt.clone(),
        );
        let plan_applies = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "plan_applies",
            "The node's plan applied (its table, routes and links), by outcome",
            plan_applies.clone(),
        );
        let plan_apply_duration =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]);
        registry.register(
            "plan_apply_duration_seconds",
            "How long applying the node's plan took",
            plan_apply_duration.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Times the node's table was found changed under the daemon and applied again",
            drift_repairs.clone(),
        );
        let applied_now = Gauge::default();
        registry.register(
            "plan_applied",
            "1 while the node's plan is applied, 0 before the first apply or after a failed one",
            applied_now.clone(),
        );
        Self {
            registry,
            exits,
            clients,
            failovers,
            flows_reset,
            probe_rtt,
            plan_applies,
            plan_apply_duration,
            drift_repairs,
            plan_applied: applied_now,
        }
    }

    pub(crate) fn encode(&self) -> String {
        cloak_admin::encode(&self.registry)
    }
}
