//! `VpnChain`: multi-hop egress, one VPN inside another, across providers (seed 001).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ClientsSpec, DnsSpec, ExitHealth, GoDuration};

/// The label a pod carries to be a client of a chain by name (`cloak.dev/chain: <name>`),
/// whatever the chain's own selector says. The pod must be in the chain's namespace.
pub const CHAIN_LABEL: &str = "cloak.dev/chain";

/// Sends the internet traffic of selected pods through several VPN providers in turn: the first
/// hop's provider sees the node, each next one only the hop before it, the internet only the
/// last. Each hop is a one-exit VpnGateway (`<chain>-hop-<k>`, owned by the chain) whose exit's
/// tunnel runs through the hop before it; clients attach to the last hop exactly as to any
/// gateway.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cloak.dev",
    version = "v1alpha1",
    kind = "VpnChain",
    namespaced,
    status = "VpnChainStatus",
    category = "cloak",
    shortname = "vpnc",
    doc = "Multi-hop VPN egress for selected pods: one provider's tunnel inside another's, each hop repaired on its own.",
    printcolumn(
        name = "Hops",
        type_ = "integer",
        json_path = ".status.healthyHops",
        description = "Hops carrying traffic"
    ),
    printcolumn(
        name = "Exit",
        type_ = "string",
        json_path = ".status.publicAddress",
        description = "The address the internet sees"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VpnChainSpec {
    /// The hops, outermost (the one the node reaches) first, 1 to 8. Hops added or removed at
    /// the end leave the others running. A hop's providers are read when it takes its slot (a
    /// new hop, or one whose slot was released): a hop holding one keeps it.
    #[schemars(length(min = 1, max = 8))]
    pub hops: Vec<HopSpec>,

    /// Which pods are clients. A pod labelled `cloak.dev/chain: <this chain's name>` always is;
    /// `podSelector` adds the pods it matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<ClientsSpec>,

    /// How clients resolve names, as a VpnGateway's `dns`: every internet name through the
    /// last hop's tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsSpec>,

    /// How long a hop's tunnel may go without connecting, while every hop before it is healthy,
    /// before the hop moves to its pool's next server. The first hop moves only after this
    /// (Tor's guard rule: a first hop that rotates exposes its user more); later hops too.
    /// Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_after: Option<GoDuration>,

    /// Let two hops hold slots of one provider. Off by default: one company would then see
    /// both ends of a stretch of the chain.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share_providers: bool,
}

/// One hop of a chain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HopSpec {
    /// Provider tags the hop accepts, as `VpnMask.spec.providers`: a provider qualifies when it
    /// carries one of them. Empty or absent: any provider that allows this namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,
}

/// Observed state of a `VpnChain`, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpnChainStatus {
    /// Every hop, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<HopStatus>,

    /// How many hops carry traffic now.
    #[serde(default)]
    pub healthy_hops: u32,

    /// The gateway clients attach to (the last hop's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,

    /// The address the internet sees: the last hop's exit address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_address: Option<String>,

    /// The MTU of the clients' interface: what fits through every hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,

    /// `Ready` (every hop carries traffic; while one does not, clients get nothing out), and
    /// `ProvidersShared` (two hops hold slots of one provider).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One hop as the operator last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HopStatus {
    /// 1 for the outermost hop.
    pub hop: u32,
    /// Its gateway (`<chain>-hop-<k>`).
    pub gateway: String,
    /// The provider whose slot it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The server of the provider's pool its tunnel connects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The address its traffic leaves its provider with: what the next hop's provider sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_address: Option<String>,
    /// Whether it carries traffic.
    pub health: ExitHealth,
    /// Since when it has had this health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// How many times it has switched server (seed 001's `SwitchServer`, as an observed count).
    #[serde(default)]
    pub switches: u32,
    /// The last switch: when, from which server, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switch: Option<String>,
    /// What the operator last saw of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
