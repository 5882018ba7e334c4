//! The operator's admin server: `/livez`, `/readyz` (see [`Health`]) and `/metrics`. State
//! gauges are computed from the caches on each scrape.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use kube::ResourceExt;

use crate::{Context, Health, metrics::Metrics};

/// Binds `addr` and serves it in a task ([`cloak_admin::Admin`]): ready while caches are synced
/// and the last election attempt was answered; gauges refreshed from the caches at each scrape.
pub(crate) async fn spawn(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
    ctx: Arc<Context>,
) -> std::io::Result<()> {
    cloak_admin::Admin::new(move || {
        refresh_gauges(&ctx, &metrics);
        metrics.encode()
    })
    .ready(move |_| {
        if health.is_ready() {
            Ok("ok".into())
        } else {
            Err(
                "caches not synced, or the API server did not answer the last election attempt"
                    .into(),
            )
        }
    })
    .spawn(addr)
    .await
    .map(drop)
}

/// Masks by phase and slots per provider, from the caches.
pub(crate) fn refresh_gauges(ctx: &Context, metrics: &Metrics) {
    use crate::metrics::{PhaseLabels, ProviderLabels};
    let mut phases: BTreeMap<String, i64> = BTreeMap::new();
    for mask in ctx.masks.state() {
        let phase = match &mask.0 {
            Ok(m) => m
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}")),
            Err(_) => "Invalid".to_owned(),
        };
        *phases.entry(phase).or_default() += 1;
    }
    metrics.masks.clear();
    for (phase, count) in phases {
        metrics
            .masks
            .get_or_create(&PhaseLabels { phase })
            .set(count);
    }
    refresh_gateways(ctx, metrics);
    refresh_chains(ctx, metrics);
    let taken = crate::controllers::leasing::reservations_by_provider(ctx);
    let waiting = crate::controllers::leasing::waiting_by_provider(ctx);
    metrics.slots_used.clear();
    metrics.slots_max.clear();
    metrics.provider_phase.clear();
    metrics.provider_masks_waiting.clear();
    for provider in ctx.providers.state() {
        let Ok(p) = &provider.0 else { continue };
        let key = ProviderLabels {
            namespace: p.namespace().unwrap_or_default(),
            provider: p.name_any(),
        };
        let used = p
            .uid()
            .and_then(|uid| taken.get(&uid))
            .map_or(0, std::collections::BTreeSet::len);
        metrics
            .slots_used
            .get_or_create(&key)
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        metrics
            .slots_max
            .get_or_create(&key)
            .set(i64::from(p.spec.max_slots.get()));
        metrics.provider_masks_waiting.get_or_create(&key).set(
            p.uid()
                .and_then(|uid| waiting.get(&uid).copied())
                .unwrap_or(0),
        );
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
        metrics
            .provider_phase
            .get_or_create(&crate::metrics::ProviderPhaseLabels {
                namespace: key.namespace.clone(),
                provider: key.provider.clone(),
                phase,
            })
            .set(1);
    }
}

/// Each gateway's exits by health, healthy and wanted exits and clients, from its status.
fn refresh_gateways(ctx: &Context, metrics: &Metrics) {
    use crate::metrics::{ExitHealthLabels, GatewayLabels};
    metrics.gateway_exits.clear();
    metrics.gateway_healthy_exits.clear();
    metrics.gateway_exits_wanted.clear();
    metrics.gateway_clients.clear();
    let Some(gateways) = ctx.gateways.get() else {
        return;
    };
    for gateway in gateways.state() {
        let Ok(g) = &gateway.0 else { continue };
        let key = GatewayLabels {
            namespace: g.namespace().unwrap_or_default(),
            gateway: g.name_any(),
        };
        let status = g.status.clone().unwrap_or_default();
        let mut by_health: BTreeMap<String, i64> = BTreeMap::new();
        for exit in &status.exits {
            let health = format!("{:?}", exit.health);
            *by_health.entry(health).or_default() += 1;
        }
        for (health, count) in by_health {
            metrics
                .gateway_exits
                .get_or_create(&ExitHealthLabels {
                    namespace: key.namespace.clone(),
                    gateway: key.gateway.clone(),
                    health,
                })
                .set(count);
        }
        metrics
            .gateway_healthy_exits
            .get_or_create(&key)
            .set(i64::from(status.healthy_exits));
        metrics
            .gateway_exits_wanted
            .get_or_create(&key)
            .set(i64::from(g.spec.exits.count.get()));
        metrics
            .gateway_clients
            .get_or_create(&key)
            .set(i64::from(status.clients));
    }
}

/// Each chain's hops and healthy hops, from its status.
fn refresh_chains(ctx: &Context, metrics: &Metrics) {
    use crate::metrics::ChainLabels;
    metrics.chain_hops.clear();
    metrics.chain_healthy_hops.clear();
    let Some(chains) = ctx.chains.get() else {
        return;
    };
    for chain in chains.state() {
        let Ok(c) = &chain.0 else { continue };
        let key = ChainLabels {
            namespace: c.namespace().unwrap_or_default(),
            chain: c.name_any(),
        };
        metrics
            .chain_hops
            .get_or_create(&key)
            .set(i64::try_from(c.spec.hops.len()).unwrap_or(i64::MAX));
        metrics
            .chain_healthy_hops
            .get_or_create(&key)
            .set(i64::from(c.status.as_ref().map_or(0, |s| s.healthy_hops)));
    }
}
