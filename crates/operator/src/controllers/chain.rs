//! The VpnChain controller: one VpnGateway a hop (`<chain>-hop-<k>`, owned by the chain), each
//! hop's exit a client of the hop before it; hops past the end go. It reports every hop's
//! provider, server, address, health and switches, with an Event on every switch.
//!
//! Repair is the hops' gateways' own: an exit that cannot connect moves to its pool's next
//! server, and a hop whose outer hop carries nothing is not judged (the gateway controller's
//! `through` rule), so the outermost failed hop is repaired first and a healthy hop is never
//! restarted for a failure further out.

use std::sync::Arc;

use cloak_api::{VpnChain, VpnChainStatus, VpnGateway};
use cloak_model::chain;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    core::DeserializeGuard,
    runtime::{Controller, controller::Action, events::EventType, watcher},
};

use super::{condition, measured, publish, status::write_if_changed};
use crate::{Context, Error, MANAGER, Result};

const CONTROLLER: &str = "vpnchain";

/// The chain controller: its chains and the gateways they own.
pub(crate) fn controller(client: &Client) -> Controller<DeserializeGuard<VpnChain>> {
    Controller::new(
        Api::<DeserializeGuard<VpnChain>>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<DeserializeGuard<VpnGateway>>::all(client.clone()),
        watcher::Config::default().labels(chain::LABEL_CHAIN),
    )
}

#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "VpnChain", object = %super::object_name(&*guard))
)]
pub(crate) async fn reconcile(
    guard: Arc<DeserializeGuard<VpnChain>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    measured(&ctx, CONTROLLER, async {
        let chain = match &guard.0 {
            Ok(chain) => chain,
            Err(invalid) => return Err(super::report_invalid::<VpnChain>(&ctx, invalid).await),
        };
        if chain.meta().deletion_timestamp.is_some() {
            // Its gateways are its dependents: the garbage collector removes them, and with them
            // every hop's mask and slot.
            return Ok(Action::await_change());
        }
        apply(chain, &ctx).await
    })
    .await
}

async fn apply(chain: &VpnChain, ctx: &Context) -> Result<Action> {
    let ns = chain.namespace().unwrap_or_default();
    let name = chain.name_any();
    let owner = chain
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Invalid("the chain has no uid yet".into()))?;
    let owner = serde_json::to_value(&owner).map_err(|e| Error::Invalid(e.to_string()))?;
    let gateways: Api<VpnGateway> = Api::namespaced(ctx.client.clone(), &ns);
    let hops = chain.spec.hops.len();

    // Every hop's gateway as the spec says now, all at once: the last hop (the one that chooses
    // the clients) exists from the start, so a pod the chain selects never starts outside it.
    // Applied last hop first: when a hop is added at the end, the new last hop selects the
    // clients before the old one stops. A hop takes its slot once the hop before holds one
    // (its gateway waits for that), avoiding the providers the other hops hold: the lists are
    // recomputed here whenever a hop's status changes. A gateway of that name the chain does
    // not own is not taken over.
    let existing: Vec<VpnGateway> = gateways
        .list(&ListParams::default().labels(&format!("{}={name}", chain::LABEL_CHAIN)))
        .await?
        .items;
    let held_by = |hop: &str| -> Option<String> {
        existing
            .iter()
            .find(|g| g.name_any() == hop)?
            .status
            .as_ref()?
            .exits
            .first()?
            .provider
            .clone()
    };
    let mut applied = Vec::with_capacity(hops);
    for k in (1..=hops).rev() {
        let hop = chain::hop_name(&name, k);
        if let Some(other) = gateways.get_opt(&hop).await?
            && !other
                .owner_references()
                .iter()
                .any(|o| o.uid == chain.uid().unwrap_or_default())
        {
            return Err(Error::Invalid(format!(
                "chain {name}: gateway {hop} exists and is not this chain's"
            )));
        }
        let avoid: Vec<String> = if chain.spec.share_providers {
            Vec::new()
        } else {
            let mut avoid: Vec<String> = (1..=hops)
                .filter(|j| *j != k)
                .filter_map(|j| held_by(&chain::hop_name(&name, j)))
                .collect();
            avoid.sort();
            avoid.dedup();
            avoid
        };
        let wanted = chain::hop_gateway(chain, k, &owner, &avoid);
        let gateway = gateways
            .patch(
                &hop,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&wanted),
            )
            .await?;
        applied.push(gateway);
    }
    applied.reverse();
    // Hops past the end go, each in the foreground: its exit pod goes before its gateway, so the
    // node never sees a hop's exit whose gateway is gone (it would cut it off, never free it).
    for gateway in existing {
        let k: usize = gateway
            .labels()
            .get(chain::LABEL_HOP)
            .and_then(|k| k.parse().ok())
            .unwrap_or(0);
        if k > hops && gateway.meta().deletion_timestamp.is_none() {
            gateways
                .delete(&gateway.name_any(), &DeleteParams::foreground())
                .await?;
            tracing::info!(chain = %name, hop = k, "hop removed");
        }
    }

    let previous = chain.status.clone().unwrap_or_default();
    let hop_statuses: Vec<_> = (1..=hops)
        .map(|k| chain::hop_status(&name, k, applied.get(k - 1)))
        .collect();
    let next = std::time::Duration::from_mins(1);
    for (hop, old, new) in chain::switches(&previous.hops, &hop_statuses) {
        publish(
            ctx,
            chain,
            EventType::Normal,
            "HopSwitched",
            format!(
                "hop {} ({}) switched from server {old} to {new}: {}",
                hop.hop,
                hop.provider.as_deref().unwrap_or("its provider"),
                hop.last_switch.as_deref().unwrap_or("moved")
            ),
        )
        .await;
    }
    let healthy = hop_statuses
        .iter()
        .filter(|h| h.health == cloak_api::ExitHealth::Healthy)
        .count();
    let all_healthy = healthy == hops;
    // Clients attach to the last hop, once it is there.
    let last = applied.get(hops - 1);
    let down: Vec<String> = hop_statuses
        .iter()
        .filter(|h| h.health != cloak_api::ExitHealth::Healthy)
        .map(|h| format!("hop {} {:?}", h.hop, h.health))
        .collect();
    let message = if all_healthy {
        format!("all {hops} hops healthy")
    } else {
        format!("{}: the chain's clients get nothing out", down.join(", "))
    };
    let shared = chain::shared_provider(&hop_statuses);
    let generation = chain.meta().generation;
    let status = VpnChainStatus {
        healthy_hops: u32::try_from(healthy).unwrap_or(u32::MAX),
        gateway: Some(chain::hop_name(&name, hops)),
        public_address: hop_statuses.last().and_then(|h| h.public_address.clone()),
        mtu: last.and_then(|g| g.status.as_ref()?.mtu),
        conditions: vec![
            condition(
                &previous.conditions,
                "Ready",
                all_healthy,
                if all_healthy {
                    "HopsHealthy"
                } else {
                    "HopDown"
                },
                &message,
                generation,
            ),
            condition(
                &previous.conditions,
                "ProvidersShared",
                shared.is_some(),
                if shared.is_some() {
                    "Shared"
                } else {
                    "Distinct"
                },
                &shared.as_ref().map_or_else(
                    || "every hop holds a slot of its own provider".to_owned(),
                    |(p, a, b)| {
                        format!(
                            "hops {a} and {b} both hold slots of provider {p}{}",
                            if chain.spec.share_providers {
                                " (allowed by spec.shareProviders)"
                            } else {
                                ": give the hops providers of distinct tags"
                            }
                        )
                    },
                ),
                generation,
            ),
        ],
        hops: hop_statuses,
        observed_generation: generation,
    };
    let api: Api<VpnChain> = Api::namespaced(ctx.client.clone(), &ns);
    write_if_changed(&api, &name, &previous, &status, None).await?;
    Ok(Action::requeue(next))
}

/// Runs the controller until `stop`.
pub(crate) async fn run(ctx: Arc<Context>, stop: tokio::sync::watch::Receiver<bool>) {
    let controller = controller(&ctx.client);
    let _ = ctx.chains.set(controller.store());
    super::run(controller, reconcile, ctx, futures::stream::empty(), stop).await;
}
