//! The node's guard on the gateway's VXLAN port ([`VXLAN_PORT`]): no pod may put a frame into
//! an exit, or into a node's link to one, except an exit as itself.
//!
//! The links between nodes and exits are plain VXLAN, and an exit forwards into its tunnel
//! whatever a frame with its identifier carries (issue 22: a pod of no gateway sent frames to an
//! exit's pod address and they left through that tenant's tunnel). The exit cannot tell a node's
//! frame from a pod's, and a pod with `NET_RAW` (which the runtime grants by default) can write
//! any source address. What can tell them apart is the node the pod runs on: every packet a pod
//! sends enters the node's host network namespace by the host side of the pod's interface, which
//! has no address of its own, while the nodes' own packets are made in the host, and other
//! nodes' arrive by interfaces that have addresses (the uplink, an overlay's device). So every
//! node drops, from its pods' interfaces, UDP to the VXLAN port addressed to an exit, a node, or
//! itself, whatever the source, with one exception per exit on this node: from its own
//! interface, with its own address, with its own identifier, to anything but an exit.
//!
//! Two tables, because a pod's frame to another pod on the same bridge never reaches the `inet`
//! hooks (no `br_netfilter`):
//! - `bridge cloak_guard`: frames entering a bridge by a veth (the pods' side of bridge CNIs);
//! - `inet cloak_guard`: packets entering the host by an interface with no address (the pods'
//!   veths of routed CNIs such as Calico's, and cloak's own client interfaces, `ckg…`, whose
//!   shared gateway address does not make them the node's).
//!
//! What it does not cover, and `docs/security.md` says so: a node where `cloak node` does not run
//! (its pods can write any node's address, and the other nodes cannot tell), pods with the host's
//! network (`hostNetwork`) or with an interface on the node's own network (macvlan, SR-IOV), and
//! CNIs whose datapath bypasses netfilter (Cilium's eBPF host routing).

use std::{
    collections::BTreeSet,
    fmt::{self, Write as _},
    net::Ipv4Addr,
};

use crate::{
    Error,
    command::{ip, run},
    gateway::{CLIENT_PREFIX, VXLAN_PORT},
};

/// The guard's tables (families `inet` and `bridge`), beside the node's `cloak_gateway`.
pub const GUARD_TABLE: &str = "cloak_guard";

/// An exit pod on this node, as the guard lets it through.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalExit {
    /// The host side of its interface (a bridge port, or a routed veth).
    pub port: String,
    /// Its pod address.
    pub address: Ipv4Addr,
    /// The VXLAN identifier its frames carry.
    pub vni: u32,
}

/// What the guard needs to know of the cluster; the interfaces are read from the kernel when it
/// is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    /// Every exit's pod address, on any node.
    pub exits: BTreeSet<Ipv4Addr>,
    /// Every node's addresses (this node's own are read from the kernel as well).
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
            write!(f, "{sep}{} {} vni {}", e.port, e.address, e.vni)?;
        }
        write!(f, "]")
    }
}

/// The interfaces of this namespace that are the node's own (they carry an address), and the
/// node's own IPv4 addresses: read from `ip -o addr show`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interfaces {
    pub addressed: BTreeSet<String>,
    pub local: BTreeSet<Ipv4Addr>,
}

impl Interfaces {
    /// Parses `ip -o addr show` (`2: eth0    inet 10.0.0.5/24 brd … scope global eth0`). A
    /// link-local address does not make an interface the node's (a pod's veth has one); cloak's
    /// client interfaces never are.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(_), Some(name), Some(family), Some(address)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name.starts_with(CLIENT_PREFIX) || line.contains("scope link") {
                continue;
            }
            let address = address.split('/').next().unwrap_or(address);
            if family == "inet"
                && let Ok(v4) = address.parse::<Ipv4Addr>()
            {
                out.local.insert(v4);
            }
            // Loopback too: what the node sends itself comes back in by it.
            out.addressed.insert(name.to_owned());
        }
        out
    }

    /// This namespace's.
    pub fn read() -> Result<Self, Error> {
        Ok(Self::parse(&ip(&["-o", "addr", "show"])?))
    }
}

/// Inside a pod's network namespace: the index of the host side of its interface `ifname` (a
/// veth's peer), and the interface's first IPv4 address.
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
    let address = Interfaces::parse(&ip(&["-o", "-4", "addr", "show", "dev", ifname])?)
        .local
        .into_iter()
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
    /// Both tables, whole, with the interfaces and addresses `interfaces` holds: applied in one
    /// transaction that replaces the last.
    pub fn render(&self, interfaces: &Interfaces) -> String {
        let set = |name: &str, kind: &str, elements: Option<String>| {
            format!(
                "\tset {name} {{\n\t\ttype {kind}\n{}\t}}\n",
                elements.map_or_else(String::new, |e| format!("\t\t{e}\n"))
            )
        };
        let nodes: BTreeSet<Ipv4Addr> = self.nodes.union(&interfaces.local).copied().collect();
        let sets = format!(
            "{}{}",
            set("exits", "ipv4_addr", elements(&self.exits, false)),
            set("nodes", "ipv4_addr", elements(&nodes, false)),
        );
        let vxlan = format!("udp dport {VXLAN_PORT}");
        // An exit's own frames: from its interface, as itself, with its identifier (the VNI is
        // the 24 bits after the first 32 of the VXLAN header, itself after UDP's 64). The port
        // comes first in every rule: all the node's traffic passes these chains, and only the
        // VXLAN port's goes on to a set lookup.
        let mut exits = String::new();
        for e in &self.local {
            let _ = writeln!(
                exits,
                "\t\t{vxlan} iifname \"{port}\" ip saddr {address} ip daddr != @exits @th,96,24 {vni} accept",
                port = e.port,
                address = e.address,
                vni = e.vni,
            );
        }
        let addressed = set("addressed", "ifname", elements(&interfaces.addressed, true));
        format!(
            "table inet {GUARD_TABLE}\n\
             delete table inet {GUARD_TABLE}\n\
             table inet {GUARD_TABLE} {{\n\
             {sets}\
             {addressed}\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority raw; policy accept;\n\
             {exits}\
             \t\t{vxlan} iifname != @addressed ip daddr @exits drop\n\
             \t\t{vxlan} iifname != @addressed ip daddr @nodes drop\n\
             \t\t{vxlan} iifname != @addressed fib daddr type local drop\n\
             \t}}\n\
             }}\n\
             table bridge {GUARD_TABLE}\n\
             delete table bridge {GUARD_TABLE}\n\
             table bridge {GUARD_TABLE} {{\n\
             {sets}\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority -300; policy accept;\n\
             {exits}\
             \t\t{vxlan} meta iifkind \"veth\" ip daddr @exits drop\n\
             \t\t{vxlan} meta iifkind \"veth\" ip daddr @nodes drop\n\
             \t}}\n\
             }}\n"
        )
    }

    /// Reads this namespace's interfaces and loads both tables. Returns what it read.
    pub fn apply(&self) -> Result<Interfaces, Error> {
        let interfaces = Interfaces::read()?;
        run(
            "nft",
            &["-f", "-"],
            Some(self.render(&interfaces).as_bytes()),
        )?;
        Ok(interfaces)
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
    fn the_nodes_own_interfaces_are_those_with_an_address_but_never_a_clients() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                    2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\n\
                    2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever\n\
                    3: cni0    inet 10.244.1.1/24 brd 10.244.1.255 scope global cni0\n\
                    7: ckgc0ffee00    inet 198.18.0.1/32 scope global ckgc0ffee00\n\
                    8: flannel.1    inet6 fd00::5/64 scope global\n\
                    9: veth12@if2    inet6 fe80::9/64 scope link\n";
        let found = Interfaces::parse(text);
        assert_eq!(
            found.addressed,
            ["cni0", "eth0", "flannel.1", "lo"].map(String::from).into()
        );
        assert_eq!(
            found.local,
            [
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::new(10, 0, 0, 5),
                Ipv4Addr::new(10, 244, 1, 1)
            ]
            .into()
        );
    }

    #[test]
    fn pods_may_send_no_vxlan_to_exits_or_nodes_but_a_local_exit_may_as_itself() {
        let guard = Guard {
            exits: [Ipv4Addr::new(10, 244, 2, 7)].into(),
            nodes: [Ipv4Addr::new(10, 0, 0, 6)].into(),
            local: vec![LocalExit {
                port: "veth3a".into(),
                address: Ipv4Addr::new(10, 244, 1, 9),
                vni: 4097,
            }],
        };
        let interfaces = Interfaces {
            addressed: ["eth0".to_owned()].into(),
            local: [Ipv4Addr::new(10, 0, 0, 5)].into(),
        };
        let text = guard.render(&interfaces);
        assert!(text.contains("elements = { 10.0.0.5, 10.0.0.6 }"), "{text}");
        assert!(text.contains("elements = { \"eth0\" }"), "{text}");
        let exception = "udp dport 4790 iifname \"veth3a\" ip saddr 10.244.1.9 ip daddr != @exits @th,96,24 4097 accept";
        assert_eq!(text.matches(exception).count(), 2, "both tables: {text}");
        for rule in [
            "udp dport 4790 iifname != @addressed ip daddr @exits drop",
            "udp dport 4790 iifname != @addressed fib daddr type local drop",
            "udp dport 4790 meta iifkind \"veth\" ip daddr @exits drop",
            "udp dport 4790 meta iifkind \"veth\" ip daddr @nodes drop",
        ] {
            assert!(text.contains(rule), "{rule}: {text}");
        }
        // The exception comes before the drops it is an exception to.
        assert!(text.find(exception) < text.find("ip daddr @exits drop"));
        // Empty sets are declared without elements.
        let empty = Guard::default().render(&Interfaces::default());
        assert!(!empty.contains("elements"), "{empty}");
        assert_eq!(
            guard.to_string(),
            "guard: 1 exits, 1 node addresses, local exits [veth3a 10.244.1.9 vni 4097]"
        );
    }
}
