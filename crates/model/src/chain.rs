//! A `VpnChain` as gateways: hop `k` is a one-exit VpnGateway (`<chain>-hop-<k>`) whose exit's
//! tunnel runs through hop `k-1` (`spec.exits.through`); the last hop carries the chain's
//! clients. Pure: what the operator applies and what it reports.

use std::time::Duration;

use cloak_api::{ExitHealth, HopStatus, VpnChain, VpnGateway};
use serde_json::{Value, json};

use crate::{clients::LAST_HOP_LABEL, names};

/// The label on a chain's gateways: the chain's name.
pub const LABEL_CHAIN: &str = "cloak.dev/hop-of";
/// The label on a chain's gateways: the hop's number, 1 for the outermost.
pub const LABEL_HOP: &str = "cloak.dev/hop";

/// `spec.moveAfter` when absent: a hop that cannot connect with every hop before it healthy
/// moves on sooner than a gateway's exit (2m), since the whole chain waits on it.
pub const DEFAULT_MOVE_AFTER: Duration = Duration::from_secs(30);

/// The gateway of hop `k` (1-based) of chain `chain`.
pub fn hop_name(chain: &str, k: usize) -> String {
    names::join(&[chain, "hop", &k.to_string()])
}

/// The gateway hop `k` (1-based) of `chain` is, as applied (server-side) by the operator, with
/// `owner` (the chain's controller reference, as JSON). Hop 1's exit reaches its server over the
/// pod network, every other through the hop before it; the last hop alone has clients (the
/// pods labelled `cloak.dev/chain: <chain>` and the chain's selector) and answers their DNS.
/// `avoid`: the providers (by name) the hop must not take a slot of (the other hops').
pub fn hop_gateway(chain: &VpnChain, k: usize, owner: &Value, avoid: &[String]) -> Value {
    let name = chain.metadata.name.as_deref().unwrap_or_default();
    let hops = chain.spec.hops.len();
    let hop = &chain.spec.hops[k - 1];
    let last = k == hops;
    let move_after = chain
        .spec
        .move_after
        .as_ref()
        .map_or(DEFAULT_MOVE_AFTER, cloak_api::GoDuration::get);
    let mut labels = json!({
        LABEL_CHAIN: name,
        LABEL_HOP: k.to_string(),
        "app.kubernetes.io/managed-by": "cloak",
    });
    if last {
        labels[LAST_HOP_LABEL] = json!(name);
    }
    let mut exits = json!({
        "count": 1,
        "moveAfter": format!("{}s", move_after.as_secs()),
    });
    if !hop.providers.is_empty() {
        exits["providers"] = json!(hop.providers);
    }
    if k > 1 {
        exits["through"] = json!(hop_name(name, k - 1));
    }
    if !avoid.is_empty() {
        exits["avoidProviders"] = json!(avoid);
    }
    let mut spec = json!({"exits": exits});
    if last {
        if let Some(clients) = &chain.spec.clients {
            spec["clients"] = json!(clients);
        }
        if let Some(dns) = &chain.spec.dns {
            spec["dns"] = json!(dns);
        }
    }
    json!({
        "apiVersion": "cloak.dev/v1alpha1",
        "kind": "VpnGateway",
        "metadata": {
            "name": hop_name(name, k),
            "namespace": chain.metadata.namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": spec,
    })
}

/// What hop `k` (1-based) is, from its gateway (`None` while it does not exist yet).
pub fn hop_status(chain: &str, k: usize, gateway: Option<&VpnGateway>) -> HopStatus {
    let exit = gateway
        .and_then(|g| g.status.as_ref())
        .and_then(|s| s.exits.first());
    HopStatus {
        hop: u32::try_from(k).unwrap_or(u32::MAX),
        gateway: hop_name(chain, k),
        provider: exit.and_then(|e| e.provider.clone()),
        server: exit.and_then(|e| e.server.clone()),
        public_address: exit.and_then(|e| e.public_address.clone()),
        health: exit.map_or(ExitHealth::Pending, |e| e.health),
        since: exit.and_then(|e| e.since.clone()),
        switches: exit.map_or(0, |e| e.moves),
        last_switch: exit.and_then(|e| e.last_move.clone()),
        message: exit.and_then(|e| e.message.clone()),
    }
}

/// The hops whose server changed since `before`: (hop, old server, new server), for an Event
/// each.
pub fn switches<'a>(
    before: &'a [HopStatus],
    now: &'a [HopStatus],
) -> Vec<(&'a HopStatus, &'a str, &'a str)> {
    now.iter()
        .filter_map(|hop| {
            let was = before.iter().find(|b| b.gateway == hop.gateway)?;
            let (old, new) = (was.server.as_deref()?, hop.server.as_deref()?);
            (old != new).then_some((hop, old, new))
        })
        .collect()
}

/// The first provider two hops hold slots of, if any: (provider, first hop, second hop).
pub fn shared_provider(hops: &[HopStatus]) -> Option<(String, u32, u32)> {
    hops.iter().enumerate().find_map(|(i, a)| {
        let provider = a.provider.as_ref()?;
        hops[i + 1..]
            .iter()
            .find(|b| b.provider.as_ref() == Some(provider))
            .map(|b| (provider.clone(), a.hop, b.hop))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(spec: Value) -> VpnChain {
        let spec: cloak_api::VpnChainSpec = serde_json::from_value(spec).unwrap();
        let mut chain = VpnChain::new("onion", spec);
        chain.metadata.namespace = Some("apps".into());
        chain
    }

    #[test]
    fn each_hop_is_a_one_exit_gateway_through_the_hop_before_and_the_last_has_the_clients() {
        let chain = chain_of(json!({
            "hops": [{"providers": ["a"]}, {"providers": ["b"]}, {}],
            "clients": {"podSelector": {"matchLabels": {"app": "dl"}}},
            "dns": {"upstreams": ["9.9.9.9"]},
            "moveAfter": "45s",
        }));
        let owner = json!({"kind": "VpnChain", "name": "onion", "uid": "u", "controller": true});
        let hops: Vec<Value> = (1..=3)
            .map(|k| hop_gateway(&chain, k, &owner, &[]))
            .collect();
        let names: Vec<&str> = hops
            .iter()
            .map(|h| h["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["onion-hop-1", "onion-hop-2", "onion-hop-3"]);
        assert_eq!(hops[0]["spec"]["exits"]["through"], Value::Null);
        assert_eq!(hops[1]["spec"]["exits"]["through"], "onion-hop-1");
        assert_eq!(hops[2]["spec"]["exits"]["through"], "onion-hop-2");
        assert_eq!(hops[0]["spec"]["exits"]["providers"], json!(["a"]));
        assert_eq!(hops[2]["spec"]["exits"]["providers"], Value::Null);
        for (k, hop) in hops.iter().enumerate() {
            assert_eq!(hop["spec"]["exits"]["count"], 1);
            assert_eq!(hop["spec"]["exits"]["moveAfter"], "45s");
            assert_eq!(hop["metadata"]["labels"][LABEL_HOP], (k + 1).to_string());
            assert_eq!(hop["metadata"]["ownerReferences"][0], owner);
            // Each must read as a VpnGateway.
            let _: VpnGateway = serde_json::from_value(hop.clone()).unwrap();
        }
        assert_eq!(hops[2]["metadata"]["labels"][LAST_HOP_LABEL], "onion");
        assert_eq!(
            hops[2]["spec"]["clients"]["podSelector"]["matchLabels"]["app"],
            "dl"
        );
        assert_eq!(hops[2]["spec"]["dns"]["upstreams"][0], "9.9.9.9");
        for inner in &hops[..2] {
            assert_eq!(inner["metadata"]["labels"][LAST_HOP_LABEL], Value::Null);
            assert_eq!(inner["spec"]["clients"], Value::Null);
        }
        let short = chain_of(json!({"hops": [{}]}));
        assert_eq!(
            hop_gateway(&short, 1, &owner, &[])["spec"]["exits"]["moveAfter"],
            "30s"
        );
        assert_eq!(
            hop_gateway(&chain, 2, &owner, &["p1".into()])["spec"]["exits"]["avoidProviders"],
            json!(["p1"])
        );
    }

    fn hop(k: u32, provider: Option<&str>, server: Option<&str>) -> HopStatus {
        HopStatus {
            hop: k,
            gateway: hop_name("c", k as usize),
            provider: provider.map(Into::into),
            server: server.map(Into::into),
            public_address: None,
            health: ExitHealth::Healthy,
            since: None,
            switches: 0,
            last_switch: None,
            message: None,
        }
    }

    #[test]
    fn a_switch_is_a_server_that_changed_and_a_shared_provider_is_found() {
        let before = [hop(1, Some("a"), Some("s1")), hop(2, Some("b"), Some("t1"))];
        let now = [
            hop(1, Some("a"), Some("s2")),
            hop(2, Some("b"), Some("t1")),
            hop(3, Some("a"), Some("s3")),
        ];
        let switched = switches(&before, &now);
        assert_eq!(switched.len(), 1);
        assert_eq!(
            (switched[0].0.hop, switched[0].1, switched[0].2),
            (1, "s1", "s2")
        );
        assert!(
            switches(&before, &[hop(1, Some("a"), None)]).is_empty(),
            "no server yet"
        );
        assert_eq!(shared_provider(&now), Some(("a".into(), 1, 3)));
        assert_eq!(shared_provider(&before), None);
    }
}
