//! The operator's Prometheus metrics: one registry, every name prefixed `cloak_`, units in names.
//! Gauges describing current state (masks by phase, slots per provider) are computed from the
//! caches when scraped, so they cannot drift from what the controllers see.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub namespace: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub errors: Family<ErrorLabels, Counter>,
    pub slots_used: Family<ProviderLabels, Gauge>,
    pub slots_max: Family<ProviderLabels, Gauge>,
    pub masks: Family<PhaseLabels, Gauge>,
    /// 1 while this instance holds the leader Lease, 0 while it stands by.
    pub leader: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("cloak");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
            });
        let errors = Family::<ErrorLabels, Counter>::default();
        let slots_used = Family::<ProviderLabels, Gauge>::default();
        let slots_max = Family::<ProviderLabels, Gauge>::default();
        let masks = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and outcome",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors by category",
            errors.clone(),
        );
        registry.register(
            "provider_slots_used",
            "Slots leased per provider",
            slots_used.clone(),
        );
        registry.register(
            "provider_slots_max",
            "maxSlots per provider",
            slots_max.clone(),
        );
        registry.register("masks", "VpnMasks by phase", masks.clone());
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this instance holds the leader Lease and acts, 0 while it stands by",
            leader.clone(),
        );
        Arc::new(Self {
            registry,
            reconciles,
            reconcile_duration,
            errors,
            slots_used,
            slots_max,
            masks,
            leader,
        })
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
