//! The admin server: `/livez` (the process runs), `/readyz` (see [`Health`]) and `/metrics`
//! (Prometheus text). State gauges are computed from the caches on each scrape.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use kube::ResourceExt;

use crate::{Context, Health, metrics::Metrics};

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    health: Health,
    ctx: Arc<Context>,
}

pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
    ctx: Arc<Context>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Admin {
            metrics,
            health,
            ctx,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

async fn readyz(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.health.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "caches not synced, or the API server did not answer the last election attempt",
        )
    }
}

async fn metrics_text(State(admin): State<Admin>) -> String {
    refresh_gauges(&admin.ctx, &admin.metrics);
    admin.metrics.encode()
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
    let taken = crate::controllers::leasing::reservations_by_provider(ctx);
    metrics.slots_used.clear();
    metrics.slots_max.clear();
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
    }
}
