//! Which gateway a pod is a client of: pure, from the pod's namespace and labels and the
//! gateways of its namespace. The node decides it when it attaches a pod; the operator counts a
//! gateway's clients with it.

use std::collections::BTreeMap;

use cloak_api::{CHAIN_LABEL, GATEWAY_LABEL, VpnGateway};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// What a pod is to the gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// No gateway's client: its network is left alone.
    None,
    /// A client of this gateway (its name, in the pod's namespace).
    Gateway(String),
    /// It names a gateway that does not exist (yet): it must not start unattached.
    Missing(String),
}

/// The label cloak puts on a chain's last hop (a VpnGateway): the chain's name. A pod labelled
/// `cloak.dev/chain: <chain>` is that gateway's client.
pub const LAST_HOP_LABEL: &str = "cloak.dev/last-hop-of";

/// The gateway a pod in `namespace` with `labels` belongs to.
///
/// - An exit (`cloak.dev/exit-of: <gateway>`) is a client only of the gateway its own gateway's
///   `exits.through` names (a chain's hop, through the hop before it): never by its labels. An
///   exit whose own gateway is not there is [`Choice::Missing`]: a hop's exit must never run
///   outside the hop before it, so the node refuses it or cuts it off, never frees it.
/// - Otherwise the `cloak.dev/gateway` label decides when present, then the
///   `cloak.dev/chain` label (the gateway of the chain's last hop), then the first gateway (by
///   name) of the namespace whose `clients.podSelector` matches.
pub fn choose<'a>(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    gateways: impl IntoIterator<Item = &'a VpnGateway>,
) -> Choice {
    let mut here: Vec<&VpnGateway> = gateways
        .into_iter()
        .filter(|g| g.metadata.namespace.as_deref() == Some(namespace))
        .collect();
    here.sort_by_key(|g| name_of(g));
    let named = |name: &str| {
        if here.iter().any(|g| name_of(g) == name) {
            Choice::Gateway(name.to_owned())
        } else {
            Choice::Missing(name.to_owned())
        }
    };
    if let Some(own) = labels.get(crate::exit::LABEL_GATEWAY) {
        return match here.iter().find(|g| name_of(g) == own) {
            None => Choice::Missing(own.clone()),
            Some(g) => g.spec.exits.through.as_deref().map_or(Choice::None, named),
        };
    }
    if let Some(name) = labels.get(GATEWAY_LABEL) {
        return named(name);
    }
    if let Some(chain) = labels.get(CHAIN_LABEL) {
        // The chain's own last hop: labelled so, and owned by that chain (another gateway of the
        // namespace given the label does not take the chain's clients).
        return here
            .iter()
            .find(|g| {
                g.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LAST_HOP_LABEL))
                    == Some(chain)
                    && g.metadata.owner_references.iter().flatten().any(|o| {
                        o.kind == "VpnChain" && &o.name == chain && o.controller == Some(true)
                    })
            })
            .map_or_else(
                || Choice::Missing(format!("the last hop of chain {chain}")),
                |g| Choice::Gateway(name_of(g).to_owned()),
            );
    }
    here.iter()
        .find(|g| {
            g.spec
                .clients
                .as_ref()
                .and_then(|c| c.pod_selector.as_ref())
                .is_some_and(|s| matches(s, labels))
        })
        .map_or(Choice::None, |g| Choice::Gateway(name_of(g).to_owned()))
}

fn name_of(gateway: &VpnGateway) -> &str {
    gateway.metadata.name.as_deref().unwrap_or_default()
}

/// Whether `labels` satisfy `selector` (matchLabels and matchExpressions, as Kubernetes reads
/// them). An empty selector matches every pod.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_label && by_expression
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[allow(clippy::needless_pass_by_value)] // json! literals at the call sites
    fn gateway(ns: &str, name: &str, selector: serde_json::Value) -> VpnGateway {
        serde_json::from_value(json!({
            "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"exits": {"count": 1}, "clients": {"podSelector": selector}},
        }))
        .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_label_decides_then_the_selectors_and_exits_are_never_clients() {
        let gateways = vec![
            gateway("apps", "b", json!({"matchLabels": {"app": "torrent"}})),
            gateway(
                "apps",
                "a",
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["dl"]}]}),
            ),
            gateway("other", "c", json!({})),
        ];
        let choose = |l: &[(&str, &str)]| choose("apps", &labels(l), &gateways);
        assert_eq!(
            choose(&[("cloak.dev/gateway", "b"), ("tier", "dl")]),
            Choice::Gateway("b".into())
        );
        assert_eq!(
            choose(&[("cloak.dev/gateway", "c")]),
            Choice::Missing("c".into()),
            "c is in another namespace"
        );
        assert_eq!(choose(&[("app", "torrent")]), Choice::Gateway("b".into()));
        assert_eq!(
            choose(&[("app", "torrent"), ("tier", "dl")]),
            Choice::Gateway("a".into()),
            "first by name"
        );
        assert_eq!(choose(&[("app", "web")]), Choice::None);
        assert_eq!(
            choose(&[("app", "torrent"), ("cloak.dev/exit-of", "b")]),
            Choice::None
        );
        assert_eq!(
            choose(&[("cloak.dev/gateway", "a"), ("cloak.dev/exit-of", "b")]),
            Choice::None,
            "an exit is never a client by its labels"
        );
    }

    #[test]
    fn a_hops_exits_are_clients_of_the_hop_before_and_a_chains_clients_of_its_last_hop() {
        let hop = |name: &str, through: Option<&str>, last_of: Option<&str>| -> VpnGateway {
            let owner = json!([{"apiVersion": "cloak.dev/v1alpha1", "kind": "VpnChain",
                "name": last_of.unwrap_or("c"), "uid": "u", "controller": true}]);
            serde_json::from_value(json!({
                "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway",
                "metadata": {"name": name, "namespace": "apps", "ownerReferences": owner,
                    "labels": last_of.map(|c| json!({LAST_HOP_LABEL: c})).unwrap_or(json!({}))},
                "spec": {"exits": {"count": 1, "through": through}},
            }))
            .unwrap()
        };
        let gateways = vec![
            hop("c-hop-1", None, None),
            hop("c-hop-2", Some("c-hop-1"), None),
            hop("c-hop-3", Some("c-hop-2"), Some("c")),
            hop("loose", Some("gone"), None),
            // Labelled as chain c's last hop, sorted before it, but not c's own.
            serde_json::from_value(json!({
                "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway",
                "metadata": {"name": "a-impostor", "namespace": "apps",
                    "labels": {LAST_HOP_LABEL: "c"}},
                "spec": {"exits": {"count": 1}},
            }))
            .unwrap(),
        ];
        let choose = |l: &[(&str, &str)]| choose("apps", &labels(l), &gateways);
        assert_eq!(choose(&[("cloak.dev/exit-of", "c-hop-1")]), Choice::None);
        assert_eq!(
            choose(&[("cloak.dev/exit-of", "c-hop-3"), ("cloak.dev/chain", "x")]),
            Choice::Gateway("c-hop-2".into())
        );
        assert_eq!(
            choose(&[("cloak.dev/exit-of", "loose")]),
            Choice::Missing("gone".into()),
            "an exit whose hop before is missing must not start outside it"
        );
        assert_eq!(
            choose(&[("cloak.dev/exit-of", "c-hop-9")]),
            Choice::Missing("c-hop-9".into()),
            "an exit whose own gateway went is cut off, never freed"
        );
        assert_eq!(
            choose(&[("cloak.dev/chain", "c")]),
            Choice::Gateway("c-hop-3".into())
        );
        assert_eq!(
            choose(&[("cloak.dev/chain", "d")]),
            Choice::Missing("the last hop of chain d".into())
        );
        assert_eq!(
            choose(&[("cloak.dev/chain", "c"), ("cloak.dev/gateway", "c-hop-1")]),
            Choice::Gateway("c-hop-1".into()),
            "the gateway label first"
        );
    }
}
