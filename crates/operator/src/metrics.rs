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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderPhaseLabels {
    pub namespace: String,
    pub provider: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub namespace: String,
    pub gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChainLabels {
    pub namespace: String,
    pub chain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitHealthLabels {
    pub namespace: String,
    pub gateway: String,
    pub health: String,
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
    /// Masks waiting for a slot that each provider could serve.
    pub provider_masks_waiting: Family<ProviderLabels, Gauge>,
    /// 1 for each provider's phase (one series a provider).
    pub provider_phase: Family<ProviderPhaseLabels, Gauge>,
    /// Exits by gateway and health, as the gateways' statuses say.
    pub gateway_exits: Family<ExitHealthLabels, Gauge>,
    /// Exits that take new flows, by gateway.
    pub gateway_healthy_exits: Family<GatewayLabels, Gauge>,
    /// `spec.exits.count`, by gateway.
    pub gateway_exits_wanted: Family<GatewayLabels, Gauge>,
    /// Clients, by gateway.
    pub gateway_clients: Family<GatewayLabels, Gauge>,
    /// Hops, by chain.
    pub chain_hops: Family<ChainLabels, Gauge>,
    /// Hops whose gateway has a healthy exit, by chain.
    pub chain_healthy_hops: Family<ChainLabels, Gauge>,
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
        let provider_masks_waiting = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "provider_masks_waiting",
            "VpnMasks waiting for a slot that the provider could serve",
            provider_masks_waiting.clone(),
        );
        let provider_phase = Family::<ProviderPhaseLabels, Gauge>::default();
        registry.register(
            "provider_phase",
            "1 for the phase each VpnProvider is in",
            provider_phase.clone(),
        );
        let gateway_exits = Family::<ExitHealthLabels, Gauge>::default();
        registry.register(
            "gateway_exits",
            "A VpnGateway's exits by health, as its status says",
            gateway_exits.clone(),
        );
        let gateway_healthy_exits = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "gateway_healthy_exits",
            "A VpnGateway's exits that take new flows",
            gateway_healthy_exits.clone(),
        );
        let gateway_exits_wanted = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "gateway_exits_wanted",
            "A VpnGateway's spec.exits.count",
            gateway_exits_wanted.clone(),
        );
        let chain_hops = Family::<ChainLabels, Gauge>::default();
        registry.register("chain_hops", "A VpnChain's hops", chain_hops.clone());
        let chain_healthy_hops = Family::<ChainLabels, Gauge>::default();
        registry.register(
            "chain_healthy_hops",
            "A VpnChain's hops whose gateway has a healthy exit",
            chain_healthy_hops.clone(),
        );
        let gateway_clients = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "gateway_clients",
            "A VpnGateway's client pods",
            gateway_clients.clone(),
        );
        // Every controller's error categories from the start, at 0: a dashboard's or an alert's
        // rate over them has series before the first error.
        for controller in ["vpnprovider", "vpnmask", "vpngateway", "vpnchain"] {
            for category in crate::error::CATEGORIES {
                let _ = errors.get_or_create(&ErrorLabels {
                    controller,
                    category,
                });
            }
        }
        Arc::new(Self {
            registry,
            reconciles,
            reconcile_duration,
            errors,
            slots_used,
            slots_max,
            masks,
            leader,
            provider_masks_waiting,
            provider_phase,
            gateway_exits,
            gateway_healthy_exits,
            gateway_exits_wanted,
            gateway_clients,
            chain_hops,
            chain_healthy_hops,
        })
    }

    pub fn encode(&self) -> String {
        cloak_admin::encode(&self.registry)
    }
}
