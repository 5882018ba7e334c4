//! `VpnGateway`: sidecar-less egress for selected pods through several VPN exits.

use std::{fmt, num::NonZeroU32, str::FromStr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::GoDuration;

/// The label a pod carries to choose a gateway by name (`cloak.dev/gateway: <name>`), whatever
/// the gateway's own selectors say. The pod must be in the gateway's namespace.
pub const GATEWAY_LABEL: &str = "cloak.dev/gateway";

/// Sends the internet traffic of selected pods through `exits.count` VPN exits, each holding a
/// slot of a matching VpnProvider. Client pods are left exactly as written: their network is set
/// up by cloak's node component before their containers start.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cloak.dev",
    version = "v1alpha1",
    kind = "VpnGateway",
    namespaced,
    status = "VpnGatewayStatus",
    category = "cloak",
    shortname = "vpng",
    doc = "Sidecar-less VPN egress for selected pods through several exits, flow-sticky, fail-closed.",
    printcolumn(
        name = "Exits",
        type_ = "integer",
        json_path = ".spec.exits.count",
        description = "Exits wanted"
    ),
    printcolumn(
        name = "Healthy",
        type_ = "integer",
        json_path = ".status.healthyExits",
        description = "Exits carrying new flows"
    ),
    printcolumn(
        name = "Clients",
        type_ = "integer",
        json_path = ".status.clients",
        description = "Attached client pods"
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
pub struct VpnGatewaySpec {
    /// The exits: how many, and which providers they lease their slots from.
    pub exits: ExitsSpec,

    /// Which pods are clients. A pod labelled `cloak.dev/gateway: <this gateway's name>` always
    /// is; `podSelector` adds the pods it matches. Absent: only the labelled pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<ClientsSpec>,

    /// Destinations that never go through an exit (CIDRs, IPv4 or IPv6): clients reach them over
    /// their own pod network as before. Absent: the cluster's pod and service ranges (the node
    /// component's `--intranet`, set by the chart). Everything else is routed through the exits
    /// as the complement of this list. A /0 is refused: it would leave nothing to the exits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [{
        "rule": "self.all(c, !isCIDR(c) || cidr(c).prefixLength() > 0)",
        "message": "a /0 in the intranet would send nothing through the exits",
    }]))]
    pub intranet: Vec<Cidr>,

    /// How clients resolve names. Absent: cluster names through the cluster DNS, every other name
    /// only through an exit's tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsSpec>,

    /// Drop client internet traffic whenever no exit can carry it (default `true`). `false` is
    /// meant to let it leave unmasked through the pod network while every exit is down; that is
    /// not implemented yet (traffic is still refused), and the `KillSwitch` condition says so.
    #[serde(default = "enabled", skip_serializing_if = "is_enabled")]
    pub kill_switch: bool,

    /// MTU of the clients' gateway interface: `auto` (default: the smallest of what the exits'
    /// tunnels carry whole, each its server's configured MTU or its kind's default, WireGuard
    /// 1420 and OpenVPN 1500, within the pod network less the tunnel's overhead, and of the pod
    /// network's MTU less VXLAN's 50 bytes) or a number from 1280 to 9000. TCP MSS is clamped to
    /// it in both directions.
    #[serde(default, skip_serializing_if = "Mtu::is_auto")]
    pub mtu: Mtu,

    /// Inbound ports: ports the VPN provider forwards to each exit, each reaching a Service of
    /// this namespace. Published in `status.exits[].ports`, on the Service (annotation
    /// `cloak.dev/forwarded-ports`), in the ConfigMap `<gateway>-ports` and by an Event on every
    /// change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ports: Vec<PortRequest>,
}

/// One inbound port request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRequest {
    /// The request's name (a DNS label: lowercase letters, digits and `-`, at most 63): its
    /// key in the ConfigMap and the status.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The Service, in the gateway's namespace, that connections to the forwarded port reach.
    /// It needs a cluster IP (not headless) and a selector: a Service without one sends to
    /// whatever endpoints are written for it, which could be any address of the cluster.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// The Service's port connections reach (its `port`, a number). Absent: its first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// `TCP`, `UDP` or `Both` (default).
    #[serde(default, skip_serializing_if = "PortProtocol::is_both")]
    pub protocol: PortProtocol,
    /// Static ports: the external port each exit's provider forwards, in exit order (`exit-0`
    /// first), as picked in the provider's account page (AirVPN, Windscribe). Absent: each exit
    /// asks its tunnel's gateway for a port by NAT-PMP (ProtonVPN) and renews it.
    #[serde(default, rename = "static", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 1, max = 65535)))]
    pub static_ports: Vec<u16>,
    /// The NAT-PMP gateway inside the tunnel. Absent: the tunnel address's `.1` (ProtonVPN's
    /// 10.2.0.1 for its 10.2.0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_pmp_gateway: Option<std::net::Ipv4Addr>,
}

// TCP, UDP or both. (A `//` comment: a type's doc would replace the field's own in the
// generated schema.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum PortProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[default]
    Both,
}

impl PortProtocol {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_both(&self) -> bool {
        *self == Self::Both
    }
}

/// A port an exit's provider forwards to it now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedPort {
    /// The request (`spec.ports[].name`).
    pub name: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The external port, on the exit's public address.
    pub port: u16,
}

fn enabled() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_enabled(value: &bool) -> bool {
    *value
}

/// The exits of a gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExitsSpec {
    /// How many exits to run, each holding one provider slot (its own VpnMask). Flows are spread
    /// over the healthy ones; losing one drops only its share. 1 to 16.
    #[schemars(range(min = 1, max = 16))]
    pub count: NonZeroU32,

    /// Provider tags the exits accept, as `VpnMask.spec.providers`: a provider qualifies when it
    /// carries one of them. Empty or absent: any provider that allows this namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,

    /// How long a draining exit (rollout, node drain, scale-down) keeps carrying its established
    /// flows after it stops getting new ones; it leaves sooner once they have ended or been
    /// quiet for a minute. Its pod's termination grace period is this plus 10 s, fixed when the
    /// pod is created: a change applies to exits created after it. Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_grace: Option<GoDuration>,

    /// How long an exit's tunnel may go without connecting (its pod running but not Ready)
    /// before the exit moves to its pool's next server, as when its server is down or refuses
    /// it. An exit also moves when its pod is annotated `cloak.dev/move` (any value), as when a
    /// site bans its address. Default 2m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_after: Option<GoDuration>,

    /// A gateway of this namespace whose client every exit is: the exits' own tunnels then run
    /// through that gateway's exits, one encryption inside the other (each hop of a VpnChain
    /// names the hop before it). The exits take their slots once that gateway's exits hold
    /// theirs, start once it carries traffic, and while it has none are not moved for a tunnel
    /// that does not connect (a dead outer hop makes every inner one look dead); `moveAfter`
    /// counts from when it is healthy again. Absent: the exits reach their servers over the
    /// pod network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub through: Option<String>,

    /// Providers (by name) the exits never take a slot of, whatever their tags (a VpnChain's
    /// hop avoids its other hops' providers). Read when an exit's slot is taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub avoid_providers: Vec<String>,
}

/// Which pods a gateway serves, besides those labelled `cloak.dev/gateway: <name>`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientsSpec {
    /// Pods of the gateway's namespace matching this selector are clients. Absent: none beyond
    /// the labelled ones. (Clients are always in the gateway's own namespace: a tenant's gateway
    /// never chooses another namespace's pods.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Name resolution for clients.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsSpec {
    /// Name suffixes answered by the cluster DNS, as before. Default `[cluster.local]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_domains: Vec<String>,

    /// Resolvers asked, through an exit's tunnel, for every other name: the first one (an
    /// exit's kill switch lets DNS through its tunnel to one resolver). Absent: the DNS server
    /// of the exit's credentials (`DNS =` of a wg-quick file, `dhcp-option DNS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(max = 45)), extend("x-kubernetes-validations" = [{
        "rule": "self.all(u, isIP(u))", "message": "each must be an IPv4 or IPv6 address",
    }]))]
    pub upstreams: Vec<std::net::IpAddr>,
}

/// An MTU: computed (`auto`) or fixed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mtu {
    /// The tunnel's MTU less the encapsulation between a client's node and its exit.
    #[default]
    Auto,
    /// This many bytes, 1280 to 9000.
    Fixed(u16),
}

impl Mtu {
    /// The smallest MTU accepted: IPv6's minimum.
    pub const MIN: u16 = 1280;
    /// The largest MTU accepted: a jumbo frame.
    pub const MAX: u16 = 9000;

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

impl Serialize for Mtu {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => serializer.serialize_str("auto"),
            Self::Fixed(bytes) => serializer.serialize_u16(*bytes),
        }
    }
}

impl<'de> Deserialize<'de> for Mtu {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Number(i64),
            Text(String),
        }
        let out_of_range = || {
            serde::de::Error::custom(format!(
                "mtu must be `auto` or a number from {} to {}",
                Mtu::MIN,
                Mtu::MAX
            ))
        };
        match Wire::deserialize(deserializer)? {
            Wire::Text(text) if text == "auto" => Ok(Self::Auto),
            Wire::Text(_) => Err(out_of_range()),
            Wire::Number(n) => u16::try_from(n)
                .ok()
                .filter(|n| (Self::MIN..=Self::MAX).contains(n))
                .map(Self::Fixed)
                .ok_or_else(out_of_range),
        }
    }
}

impl JsonSchema for Mtu {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Mtu".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // A structural schema allows an int-or-string only without a type or with exactly
        // `anyOf: [{type: integer}, {type: string}]`, and kube's rewriter strips the types from
        // plain `anyOf` branches. So the field has no type, and each check applies to its own
        // kind of value: the bounds to numbers, the pattern to strings.
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "minimum": Mtu::MIN,
            "maximum": Mtu::MAX,
            "pattern": "^auto$",
        })
    }
}

/// An IPv4 or IPv6 network in CIDR notation (`10.0.0.0/8`, `fd00::/8`). A bare address is a
/// /32 or /128. Host bits are cleared when read (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

impl Cidr {
    /// The network.
    pub fn get(self) -> IpNet {
        self.0
    }
}

impl From<IpNet> for Cidr {
    fn from(net: IpNet) -> Self {
        Self(net.trunc())
    }
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}: expected an address and a prefix length, like 10.0.0.0/8 or fd00::/8")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(Self::from)
            .map_err(|_| CidrError(text.to_owned()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Cidr".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            // 43: the longest IPv6 address and prefix.
            "maxLength": 43,
            "x-kubernetes-validations": [{
                "rule": "isCIDR(self) || isIP(self)",
                "message": "must be a CIDR (10.0.0.0/8, fd00::/8) or an address",
            }],
        })
    }
}

/// Observed state of a `VpnGateway`, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpnGatewayStatus {
    /// Every exit, healthy or not, in the order of their names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exits: Vec<ExitStatus>,

    /// Exits that take new flows now.
    #[serde(default)]
    pub healthy_exits: u32,

    /// Running pods that are this gateway's clients (its label, or its `podSelector`), not
    /// being deleted. The node attaches a pod when its sandbox is created, and one that becomes
    /// a client while it runs within about a second (or cuts it off, with an Event on the pod);
    /// attached and not yet attached pods are not counted apart.
    #[serde(default)]
    pub clients: u32,

    /// The MTU clients get: `spec.mtu`, or what `auto` computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,

    /// The intranet clients reach outside the exits: `spec.intranet`, or, without it, the
    /// cluster's as derived (the nodes' pod CIDRs and internal addresses, the ServiceCIDRs,
    /// and the chart's `cluster.intranet`), as CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intranet: Vec<String>,

    /// Standard conditions, merged by type: `Ready` (at least one exit healthy), `Degraded`
    /// (fewer healthy exits than `spec.exits.count`), `KillSwitch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One exit of a gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExitStatus {
    /// The exit's name: its VpnMask and its pod are called so.
    pub name: String,
    /// The exit pod's node, once scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The VXLAN network identifier of every node's link to this exit, unique among all
    /// gateways' exits.
    pub vni: u32,
    /// The exit pod's IP, the far end of every node's link to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// The provider whose slot the exit holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The slot held, from 0 to the provider's `maxSlots - 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// The server of the provider's pool the exit connects to (the Secret key it came from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The public address the internet sees the exit's traffic from, once measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_address: Option<String>,
    /// Pending, Connecting, Healthy, Unhealthy or Draining.
    pub health: ExitHealth,
    /// When `health` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Why the exit is in its state, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The last time the exit moved to another server, and why (`server-2 → next: its tunnel had
    /// not connected for 2m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_move: Option<String>,
    /// How many times the exit has moved to another server since it was made.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub moves: u32,
    /// The inbound ports its provider forwards to it now (`spec.ports`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ForwardedPort>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(value: &u32) -> bool {
    *value == 0
}

// The health of an exit. (A `//` comment: a type's doc would replace the field's own in the
// generated schema.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ExitHealth {
    /// Waiting for a slot or for its pod to be scheduled.
    Pending,
    /// Its pod runs; its tunnel is not up yet.
    Connecting,
    /// Its tunnel is up and it answers health probes: it takes new flows.
    Healthy,
    /// It stopped answering or its tunnel is down: it takes no flows, its flows were reset.
    Unhealthy,
    /// Going away (rollout, drain, scale-down): no new flows, established ones kept for the grace.
    Draining,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_gateway_manifest_reads_with_its_defaults() {
        let spec: VpnGatewaySpec = serde_yaml::from_str("exits: {count: 3}\n").unwrap();
        assert_eq!(spec.exits.count.get(), 3);
        assert!(spec.kill_switch, "the kill switch is on unless turned off");
        assert_eq!(spec.mtu, Mtu::Auto);
        assert!(spec.intranet.is_empty() && spec.clients.is_none() && spec.dns.is_none());
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({"exits": {"count": 3}}),
            "defaults are not written back"
        );
    }

    #[test]
    fn an_mtu_is_auto_or_a_number_in_range() {
        let read = |v: &str| serde_yaml::from_str::<Mtu>(v);
        assert_eq!(read("auto").unwrap(), Mtu::Auto);
        assert_eq!(read("1380").unwrap(), Mtu::Fixed(1380));
        for bad in ["1279", "9001", "70000", "big", "-1"] {
            let err = read(bad).unwrap_err().to_string();
            assert!(err.contains("from 1280 to 9000"), "{bad}: {err}");
        }
        assert_eq!(serde_json::to_string(&Mtu::Fixed(1400)).unwrap(), "1400");
    }

    #[test]
    fn a_cidr_loses_its_host_bits_and_a_bare_address_is_a_host_route() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "fd00::1".parse::<Cidr>().unwrap().to_string(),
            "fd00::1/128"
        );
        let err = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(err.to_string().contains("10.0.0.0/33"), "{err}");
        assert!(serde_json::from_str::<Cidr>("\"nope\"").is_err());
    }
}
