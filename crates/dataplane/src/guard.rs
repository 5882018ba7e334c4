//! The node's guard on the gateway's VXLAN port ([`VXLAN_PORT`]): no pod may put a frame into
//! an exit, or into a node's link to one, except an exit as itself.
//!
//! The links between nodes and exits are plain VXLAN, and an exit forwards into its tunnel
//! whatever a frame with its identifier carries (issue 22: a pod of no gateway sent frames to an
//! exit's pod address and they left through that tenant's tunnel). The exit cannot tell a node's
//! frame from a pod's, and a pod with `NET_RAW` (which the runtime grants by default) can write
//! any source and destination address. What can tell them apart is the node the pod runs on:
//! every packet a pod sends enters the node's host network namespace by the host side of the
//! pod's veth, while the nodes' own packets are made in the host, and other nodes' arrive by an
//! uplink or an overlay's device. So every node drops UDP to the VXLAN port that enters by a veth
//! other than its uplinks (the veths holding one of the nodes' addresses: a node that is itself
//! a container has one), whatever its source and destination, with one exception per exit on
//! this node: from its own interface, with its own address and its own identifier, to anything
//! but an exit. Which exits are on this node, with which address and identifier, comes from the
//! gateways' statuses, which only the operator writes; never from a pod's labels.
//!
//! Two tables, because a pod's frame to another pod on the same bridge never reaches the `inet`
//! hooks (no `br_netfilter`): `bridge cloak_guard` for frames entering a bridge by a veth (the
//! pods' side of bridge CNIs), `inet cloak_guard` for packets entering the host by a veth (routed
//! CNIs such as Calico's and the `ptp` plugin's, and cloak's own client interfaces, `ckg…`). The
//! exit drops, besides, VXLAN to any address but its pod's (`gateway::ExitPlan`). A packet
//! translated to the port from another (a Service whose target port is it) is dropped after NAT,
//! whoever sent it: none of cloak's own is ever translated so.
//!
//! What it does not cover, and `docs/security.md` says so: a node where `cloak node` does not run
//! (its pods can write any node's address, and the other nodes cannot tell), pods with the host's
//! network (`hostNetwork`) or with an interface on the node's own network (macvlan, ipvlan,
//! SR-IOV), and datapaths that bypass netfilter (Cilium's eBPF, OVS-based CNIs such as OVN-K's
//! and Antrea's).

use std::{
    collections::BTreeSet,
    fmt::{self, Write as _},
    net::Ipv4Addr,
};

use crate::{
    Error,
    command::{ip, run},
    gateway::VXLAN_PORT,
};

/// The guard's tables (families `inet` and `bridge`), beside the node's `cloak_gateway`.
pub const GUARD_TABLE: &str = "cloak_guard";

/// An exit pod on this node, as its gateway's status gives it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalExit {
    /// Its pod address.
    pub address: Ipv4Addr,
    /// The VXLAN identifier its frames carry.
    pub vni: u32,
    /// The host side of its veth as read in its own namespace when its sandbox was made (which
    /// no other pod can change); None: looked up in the bridge's tables instead ([`port_of`]),
    /// for an exit whose sandbox the daemon did not see made.
    pub port: Option<String>,
}

/// What the guard needs to know of the cluster; the interfaces, and each local exit's, are read
/// from the kernel when it is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    /// Every exit's pod address, on any node.
    pub exits: BTreeSet<Ipv4Addr>,
    /// Every node's addresses: an interface holding one is an uplink, not a pod's.
    pub nodes: BTreeSet<Ipv4Addr>,
    /// The exits on this node.
    pub local: Vec<LocalExit>,
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guard: {} exits, {} node addresses, local exits [",
            self.exits.len(),
            self.nodes.len()
        )?;
        for (i, e) in self.local.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{} vni {}", e.address, e.vni)?;
        }
        write!(f, "]")
    }
}

/// The UDP ports of the overlays a node may decapsulate for anyone who sends to it (the
/// standard VXLAN port, Geneve's, flannel's and Cilium's VXLAN): a pod could otherwise wrap a
/// packet to an exit's port in one and have the node unwrap it past the guard.
const OVERLAY_PORTS: &str = "4789, 6081, 8472";
/// The IP protocols a node may decapsulate likewise: IP in IP, IPv6 in IPv4, GRE.
const TUNNEL_PROTOCOLS: &str = "4, 41, 47";

/// What the guard reads from the kernel when it is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// The interfaces that hold one of the nodes' addresses.
    pub uplinks: BTreeSet<String>,
    /// This node's own IPv4 addresses.
    pub local: BTreeSet<Ipv4Addr>,
    /// Each local exit's interface on this node (the host side of its veth, a bridge port or a
    /// routed veth), by its address. An exit not found has no exception: its frames are dropped
    /// until it is (its own fault-free state: the nodes cannot use it then).
    pub ports: std::collections::BTreeMap<Ipv4Addr, String>,
}

/// The interfaces and IPv4 addresses of `ip -o addr show` output: `(name, address)`.
fn addresses(text: &str) -> impl Iterator<Item = (String, Ipv4Addr)> + '_ {
    text.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        let (_, name, family, address) =
            (words.next()?, words.next()?, words.next()?, words.next()?);
        let address: Ipv4Addr = address.split('/').next()?.parse().ok()?;
        (family == "inet").then(|| (name.split('@').next().unwrap_or(name).to_owned(), address))
    })
}

/// The interfaces of `ip -o addr show` output that hold one of `nodes`.
pub fn uplinks(text: &str, nodes: &BTreeSet<Ipv4Addr>) -> BTreeSet<String> {
    addresses(text)
        .filter(|(_, address)| nodes.contains(address))
        .map(|(name, _)| name)
        .collect()
}

/// Inside a pod's network namespace: the index of the host side of its interface `ifname` (a
/// veth's peer, `eth0@if12`), and the interface's first IPv4 address.
pub fn pod_interface(ifname: &str) -> Result<(u32, Option<Ipv4Addr>), Error> {
    let link = ip(&["-o", "link", "show", "dev", ifname])?;
    let peer = link
        .split_whitespace()
        .nth(1)
        .and_then(|name| name.trim_end_matches(':').split_once("@if"))
        .and_then(|(_, index)| index.parse().ok())
        .ok_or_else(|| Error::Command {
            command: format!("ip -o link show dev {ifname}"),
            stderr: format!("{ifname} is no veth: {link}"),
        })?;
    let address = addresses(&ip(&["-o", "-4", "addr", "show", "dev", ifname])?)
        .map(|(_, address)| address)
        .next();
    Ok((peer, address))
}

/// The name of the interface with index `index` in this namespace.
pub fn name_of(index: u32) -> Result<String, Error> {
    let links = ip(&["-o", "link", "show"])?;
    links
        .lines()
        .find_map(|line| {
            let (number, rest) = line.split_once(": ")?;
            (number.trim().parse::<u32>().ok()? == index)
                .then(|| rest.split([':', '@']).next().unwrap_or_default().to_owned())
        })
        .ok_or_else(|| Error::Command {
            command: "ip -o link show".into(),
            stderr: format!("no interface {index}"),
        })
}

/// The host-side interface of the pod at `address`: the device of the route to it, or, when
/// that is a bridge, the port its MAC was learnt on (its neighbour entry is made first, by a
/// datagram to the discard port, when there is none).
pub fn port_of(address: Ipv4Addr) -> Result<Option<String>, Error> {
    let target = address.to_string();
    let route = ip(&["-o", "route", "get", &target])?;
    let Some(dev) = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let details = ip(&["-d", "-o", "link", "show", "dev", &dev])?;
    if !details.contains(" bridge ") {
        return Ok(Some(dev));
    }
    let mac = |text: &str| {
        text.split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_owned)
    };
    let mut lladdr = mac(&ip(&["neigh", "show", "to", &target, "dev", &dev])?);
    if lladdr.is_none() {
        if let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") {
            let _ = sock.send_to(b"", (address, 9));
        }
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            lladdr = mac(&ip(&["neigh", "show", "to", &target, "dev", &dev])?);
            if lladdr.is_some() {
                break;
            }
        }
    }
    let Some(lladdr) = lladdr else {
        return Ok(None);
    };
    let fdb = run("bridge", &["fdb", "show", "br", &dev], None)?;
    Ok(fdb.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == lladdr).then_some(())?;
        words.skip_while(|w| *w != "dev").nth(1).map(str::to_owned)
    }))
}

/// `{ a, b }` for an nftables set, or None when empty.
fn elements<T: fmt::Display>(items: impl IntoIterator<Item = T>, quote: bool) -> Option<String> {
    let items: Vec<String> = items
        .into_iter()
        .map(|i| {
            if quote {
                format!("\"{i}\"")
            } else {
                i.to_string()
            }
        })
        .collect();
    (!items.is_empty()).then(|| format!("elements = {{ {} }}", items.join(", ")))
}

impl Guard {
    /// Both tables, whole, with what `found` holds: applied in one transaction that replaces the
    /// last.
    pub fn render(&self, found: &Found) -> String {
        let set = |name: &str, kind: &str, elements: Option<String>| {
            format!(
                "\tset {name} {{\n\t\ttype {kind}\n{}\t}}\n",
                elements.map_or_else(String::new, |e| format!("\t\t{e}\n"))
            )
        };
        let nodes: BTreeSet<Ipv4Addr> = self.nodes.union(&found.local).copied().collect();
        let sets = format!(
            "{}{}{}",
            set("exits", "ipv4_addr", elements(&self.exits, false)),
            set("uplinks", "ifname", elements(&found.uplinks, true)),
            set("nodes", "ipv4_addr", elements(&nodes, false)),
        );
        // The port first in every rule: all the node's traffic passes these chains, and only
        // the VXLAN port's goes on to the rest. `th dport` takes IPv6 too.
        let vxlan = format!("meta l4proto udp th dport {VXLAN_PORT}");
        // An exit's own frames: from its interface, as itself, with its identifier (the VNI is
        // the 24 bits after the first 32 of the VXLAN header, itself after UDP's 64).
        let mut exits = String::new();
        for e in &self.local {
            let Some(port) = found.ports.get(&e.address) else {
                continue;
            };
            let _ = writeln!(
                exits,
                "\t\t{vxlan} iifname \"{port}\" ip saddr {address} ip daddr != @exits @th,96,24 {vni} accept",
                address = e.address,
                vni = e.vni,
            );
        }
        let pod = "meta iifkind \"veth\" iifname != @uplinks";
        let chain = |hook_priority: &str, first: &str| {
            format!(
                "\tchain prerouting {{\n\
                 \t\ttype filter hook prerouting priority {hook_priority}; policy accept;\n\
                 {first}\
                 {exits}\
                 \t\t{vxlan} {pod} drop\n\
                 \t\t{pod} ip daddr @nodes meta l4proto {{ {TUNNEL_PROTOCOLS} }} drop\n\
                 \t\t{pod} ip daddr @nodes udp dport {{ {OVERLAY_PORTS} }} drop\n\
                 \t}}\n"
            )
        };
        // A frame whose VLAN tag the kernel did not take off (a second tag inside the first)
        // shows the bridge no IP header: from a pod, no frame is tagged.
        let tagged = format!("\t\t{pod} ether type {{ 8021q, 8021ad }} drop\n");
        // What a Service or a DNAT rule of anyone's would redirect to the port from another, or
        // from the port to another (a Service's external IP taking the nodes' own frames): no
        // frame of cloak's is ever translated either way. After NAT, in every path.
        let translated = ["forward", "input", "output"].map(|hook| {
            format!(
                "\tchain {hook} {{\n\
                 \t\ttype filter hook {hook} priority filter; policy accept;\n\
                 \t\t{vxlan} ct status dnat drop\n\
                 \t\tmeta l4proto udp ct original proto-dst {VXLAN_PORT} ct status dnat drop\n\
                 \t}}\n"
            )
        });
        format!(
            "table inet {GUARD_TABLE}\n\
             delete table inet {GUARD_TABLE}\n\
             table inet {GUARD_TABLE} {{\n\
             {sets}\
             {inet}\
             {forward}\
             {input}\
             {output}\
             }}\n\
             table bridge {GUARD_TABLE}\n\
             delete table bridge {GUARD_TABLE}\n\
             table bridge {GUARD_TABLE} {{\n\
             {sets}\
             {bridge}\
             }}\n",
            inet = chain("raw", ""),
            bridge = chain("-300", &tagged),
            forward = translated[0],
            input = translated[1],
            output = translated[2],
        )
    }

    /// Reads this namespace's uplinks and its exits' interfaces, and loads both tables. Returns
    /// what it read.
    pub fn apply(&self) -> Result<Found, Error> {
        let listed = ip(&["-o", "-4", "addr", "show"])?;
        let found = Found {
            uplinks: uplinks(&listed, &self.nodes),
            local: addresses(&listed).map(|(_, address)| address).collect(),
            ports: self
                .local
                .iter()
                .filter_map(|e| {
                    let port = match &e.port {
                        Some(port) => port.clone(),
                        None => port_of(e.address).ok()??,
                    };
                    Some((e.address, port))
                })
                .collect(),
        };
        run("nft", &["-f", "-"], Some(self.render(&found).as_bytes()))?;
        Ok(found)
    }

    /// Removes both tables.
    pub fn reset() -> Result<(), Error> {
        for family in ["inet", "bridge"] {
            match run("nft", &["delete", "table", family, GUARD_TABLE], None) {
                Err(Error::Command { stderr, .. }) if stderr.contains("No such file") => {}
                other => other.map(drop)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uplink_is_an_interface_holding_a_nodes_address_and_a_ptp_veths_gateway_is_not_one() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                    2: eth0@if9    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\n\
                    3: cni0    inet 10.244.1.1/24 brd 10.244.1.255 scope global cni0\n\
                    7: veth12@if2    inet 10.244.1.1/32 scope global veth12\n\
                    8: ckgc0ffee00    inet 198.18.0.1/32 scope global ckgc0ffee00\n";
        let nodes = [Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)].into();
        assert_eq!(uplinks(text, &nodes), ["eth0".to_owned()].into());
    }

    #[test]
    fn pods_may_send_no_vxlan_from_a_veth_but_a_local_exit_may_as_itself() {
        let guard = Guard {
            exits: [Ipv4Addr::new(10, 244, 2, 7), Ipv4Addr::new(10, 244, 1, 9)].into(),
            nodes: [Ipv4Addr::new(10, 0, 0, 5)].into(),
            local: vec![
                LocalExit {
                    address: Ipv4Addr::new(10, 244, 1, 9),
                    vni: 4097,
                    port: None,
                },
                LocalExit {
                    address: Ipv4Addr::new(10, 244, 1, 10),
                    vni: 4098,
                    port: None,
                },
            ],
        };
        let found = Found {
            uplinks: ["eth0".to_owned()].into(),
            local: [Ipv4Addr::new(10, 0, 0, 4)].into(),
            ports: [(Ipv4Addr::new(10, 244, 1, 9), "veth3a".to_owned())].into(),
        };
        let text = guard.render(&found);
        assert!(text.contains("elements = { \"eth0\" }"), "{text}");
        assert!(
            text.contains("elements = { 10.0.0.4, 10.0.0.5 }"),
            "the nodes and this one: {text}"
        );
        let exception = "meta l4proto udp th dport 4790 iifname \"veth3a\" ip saddr 10.244.1.9 ip daddr != @exits @th,96,24 4097 accept";
        assert_eq!(text.matches(exception).count(), 2, "both tables: {text}");
        assert!(
            !text.contains("4098"),
            "an exit whose interface was not found: {text}"
        );
        let drop = "meta l4proto udp th dport 4790 meta iifkind \"veth\" iifname != @uplinks drop";
        assert_eq!(text.matches(drop).count(), 2, "both tables: {text}");
        // Whatever the destination: no rule on the VXLAN port names one but the exception's.
        assert_eq!(text.matches("@exits @th").count(), 2, "{text}");
        // Nor may a pod hand the node a packet it would unwrap past the guard.
        for rule in [
            "meta iifkind \"veth\" iifname != @uplinks ip daddr @nodes meta l4proto { 4, 41, 47 } drop",
            "meta iifkind \"veth\" iifname != @uplinks ip daddr @nodes udp dport { 4789, 6081, 8472 } drop",
        ] {
            assert_eq!(text.matches(rule).count(), 2, "{rule}: {text}");
        }
        assert_eq!(
            text.matches("ether type { 8021q, 8021ad } drop").count(),
            1,
            "{text}"
        );
        // The exception comes before the drop it is an exception to.
        assert!(text.find(exception) < text.find(drop));
        // Translated to the port from another, or from it to another: dropped after NAT, in
        // every path.
        for rule in [
            "meta l4proto udp th dport 4790 ct status dnat drop",
            "meta l4proto udp ct original proto-dst 4790 ct status dnat drop",
        ] {
            assert_eq!(text.matches(rule).count(), 3, "{rule}: {text}");
        }
        // Empty sets are declared without elements.
        let empty = Guard::default().render(&Found::default());
        assert!(!empty.contains("elements"), "{empty}");
        assert_eq!(
            guard.to_string(),
            "guard: 2 exits, 1 node addresses, local exits [10.244.1.9 vni 4097, 10.244.1.10 vni 4098]"
        );
    }
}
