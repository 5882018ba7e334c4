//! The gateway's data path (docs/architecture.md, "VpnGateway"): the three places it lives and
//! the kernel objects cloak owns in each, as values with a Linux `apply`.
//!
//! ```text
//!  client netns ──ckg0 ─ veth ─ ckg<id>── node (host netns) ──ckx<vni> VXLAN── exit netns ──tunnel──
//!  198.18.a.b              198.18.0.1 │  198.19.x.y (transit)   198.19.0.1 ckx0   masquerade
//!  routes: complement      ct mark from a map over healthy exits → table per exit → its link
//!  of the intranet         masquerade to the transit address; only ckg→ckx is forwarded
//! ```
//!
//! This module holds the addressing (the ranges, marks, tables and names every side agrees on)
//! and the kernel helpers the sides share; each side is a module of its own:
//!
//! - `client` ([`ClientPlan`]): what the node daemon builds in a client's namespace: a second
//!   interface to the node carrying every route but the intranet's, and a kill switch that lets
//!   nothing else out except to the intranet.
//! - `node` ([`NodePlan`]): the node's links to the exits, its routing rules and tables, and one
//!   nftables table that pins each new flow to a healthy exit (`ct mark`), keeps it there,
//!   refuses client traffic when no exit is healthy, and forwards nothing from a client anywhere
//!   but an exit.
//! - `exit` ([`ExitPlan`]): an exit's end of the links (one learning VXLAN interface for every
//!   node), forwarding into its tunnel with masquerade, MSS clamped both ways, and the health
//!   answer that stops when the tunnel does.
//! - `flows` ([`FlowWatch`]): the client flows a draining exit still carries.
//!
//! Every address below lives on interfaces cloak creates, as /32 (IPv6: /128) with no prefix
//! route but the exit's own link prefix, and every route in cloak's own tables: the host's main
//! table and ruleset are never changed. The node turns IPv6 forwarding on (and `accept_ra` 1 into
//! 2 first, so it keeps the routes it learns from router advertisements); nothing undoes that.
//!
//! IPv6 takes the same path with the same numbers: each address has an IPv6 twin ([`twin`]: the
//! IPv4 address in the last 32 bits of a ULA /96), so a client, a node and an exit need no
//! second allocation. A client's IPv6 goes to its node like its IPv4; the node spreads it over
//! the exits whose tunnels carry IPv6 (they say so in their probe answers, [`IPV6_DSCP`]) and
//! refuses it at once when there is none.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::{
    Error,
    command::{ip, run},
};

mod client;
mod exit;
mod flows;
mod node;

pub use client::ClientPlan;
pub use exit::{DRAINING_DSCP, ExitPlan, IPV6_DSCP, prepare_exit_namespace, route_inbound};
pub use flows::{FlowWatch, list_flows};
pub use node::{
    ClientPort, ExitLink, ExitUse, NodePlan, forget_client_flows, link_mac, reset_flows,
};

/// The client's interface to the node, inside the client's namespace.
pub const CLIENT_IFACE: &str = "ckg0";
/// Host-side client interfaces are `ckg<id>`; exit links `ckx<vni>`.
pub const CLIENT_PREFIX: &str = "ckg";
pub const LINK_PREFIX: &str = "ckx";
/// The exit's VXLAN interface, inside the exit's namespace.
pub const EXIT_IFACE: &str = "ckx0";
/// The node's address as every client sees it (on each host-side client interface).
pub const CLIENT_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Clients' addresses on [`CLIENT_IFACE`] come from this range (RFC 2544's, never on the
/// internet), unique per node only: the node masquerades them before they reach an exit.
pub const CLIENT_RANGE: &str = "198.18.0.0/16";
/// Every exit's inner address; each node has a transit address of its own in `198.19.0.0/16`.
pub const EXIT_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The exits' links' inner range: nothing from it may leave a node but by a link (the kernel
/// answers a late packet of a reset flow with a reset from the transit address, which would
/// otherwise go out by the node's default route).
pub const TRANSIT_RANGE: &str = "198.19.0.0/16";
/// The inner prefix of the exits' links.
pub const TRANSIT_PREFIX: u8 = 16;
/// The ULA /96 that holds the IPv6 twin of every address above (`fd63:6c6b` is "clk").
pub const TWIN_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd63, 0x6c6b, 0, 0, 0, 0, 0, 0);
/// [`CLIENT_RANGE`]'s twin.
pub const CLIENT_RANGE6: &str = "fd63:6c6b::c612:0/112";
/// [`TRANSIT_RANGE`]'s twin.
pub const TRANSIT_RANGE6: &str = "fd63:6c6b::c613:0/112";
/// [`TRANSIT_PREFIX`]'s twin.
pub const TRANSIT_PREFIX6: u8 = 112;

/// The IPv6 twin of one of the gateway's IPv4 addresses: the same address in the last 32 bits
/// of [`TWIN_PREFIX`].
pub fn twin(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(TWIN_PREFIX) | u128::from(u32::from(v4)))
}

/// Whether this network namespace has IPv6 at all (a kernel booted with `ipv6.disable=1` has
/// none): without it the gateway is IPv4 only, and client IPv6 has nowhere to go.
pub fn has_ipv6() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6/conf/all/forwarding").exists()
}
/// The UDP port of every link (the model's, clear of the CNIs' 4789 and 8472).
pub const VXLAN_PORT: u16 = cloak_model::gateway::VXLAN_PORT;

/// What a DNS query looks like to nftables.
const DNS: &str = "meta l4proto { tcp, udp } th dport 53";
/// IPv6 neighbour discovery (the counterpart of ARP, which an `inet` table never sees), from the
/// link itself (hop limit 255): what an IPv6 address on a link needs to be reached.
const NEIGHBOUR_DISCOVERY: &str =
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept";

/// Two prerouting rules that refuse the IPv6 that `matches` selects (TCP with a reset, the rest
/// with admin-prohibited), all but the link's own traffic (neighbour discovery, multicast) and
/// what is addressed to `own`.
fn refuse_ipv6(matches: &str, own: Ipv6Addr) -> String {
    let refused =
        format!("{matches} meta nfproto ipv6 ip6 daddr != {{ fe80::/10, ff00::/8, {own} }}");
    format!(
        "\t\t{refused} meta l4proto tcp reject with tcp reset\n\
         \t\t{refused} reject with icmpx admin-prohibited\n"
    )
}

/// The rules that clamp the MSS of TCP SYNs to `mss` for IPv4 and 20 bytes less for IPv6 (its
/// header is 20 bytes longer): NETNOTES trap 2.
fn clamps(mss: u16) -> [String; 2] {
    [("ipv4", mss), ("ipv6", mss.saturating_sub(20))].map(|(family, mss)| {
        format!(
            "meta nfproto {family} tcp flags syn / syn,rst tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
        )
    })
}

/// The node's nftables table (family `inet`).
pub const NODE_TABLE: &str = "cloak_gateway";
/// The exit's nftables table (family `inet`), beside the agent's own `cloak`.
pub const EXIT_TABLE: &str = "cloak_exit";
/// The client's kill switch (family `inet`).
pub const CLIENT_TABLE: &str = "cloak_client";
/// The node's routing table for the routes back to its clients.
pub const CLIENTS_ROUTE_TABLE: u32 = 17_299;
/// An exit's routing table for the backends of its inbound ports that are clients of its
/// gateway (each by way of its node over the links).
pub const INBOUND_ROUTE_TABLE: u32 = 17_298;
/// Exit slot `s` routes by table `17_300 + s` and rule priorities `17_300 + 2s` (`to <exit>
/// lookup main`, for the link's own outer packets) and `17_301 + 2s` (the mark's table).
pub const EXIT_ROUTE_TABLE_BASE: u32 = 17_300;
/// The flows of exit slot `s` carry conntrack and packet mark `MARK_TAG | s << 16`: bits clear of
/// kube-proxy's 0x4000/0x8000 and Cilium's 0x0f00.
pub const MARK_TAG: u32 = 0x4300_0000;
/// The bits of a mark that say "a gateway flow, slot s".
pub const MARK_MASK: u32 = 0xffff_0000;
/// The bits of a mark that say "a gateway flow".
pub const TAG_MASK: u32 = 0xff00_0000;
/// The packet mark of whatever a node receives by an exit's link: routed by
/// [`CLIENTS_ROUTE_TABLE`] first, where the clients' pod addresses lead to their veths.
pub const LINK_MARK: u32 = 0x4200_0000;

/// The mark of the flows on exit slot `slot`.
pub fn mark(slot: u8) -> u32 {
    MARK_TAG | (u32::from(slot) << 16)
}

/// Removes a client's veth from the node (its peer in the client's namespace goes with it);
/// nothing to do when it is gone already.
pub fn remove_client(iface: &str) -> Result<(), Error> {
    match ip(&["link", "del", "dev", iface]) {
        Err(Error::Command { stderr, .. }) if stderr.contains("Cannot find device") => Ok(()),
        other => other.map(drop),
    }
}

/// Whether the node has an interface of this name.
pub fn link_exists(iface: &str) -> bool {
    ip(&["link", "show", "dev", iface]).is_ok()
}

/// The address families cloak routes, as `ip` options: IPv6 too when the namespace has it.
fn families(ipv6: bool) -> &'static [&'static str] {
    if ipv6 { &["-4", "-6"] } else { &["-4"] }
}

/// Turns IPv6 forwarding on. A host that forwards ignores router advertisements on interfaces
/// whose `accept_ra` is 1: those are set to 2 first, so a node that learns its IPv6 routes from
/// advertisements keeps them.
fn forward_ipv6() -> Result<(), Error> {
    let conf = std::path::Path::new("/proc/sys/net/ipv6/conf");
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    if read(&conf.join("all/forwarding")).trim() == "1" {
        return Ok(());
    }
    let dirs = std::fs::read_dir(conf).map_err(Error::io(conf.display().to_string()))?;
    for dir in dirs.flatten() {
        let accept_ra = dir.path().join("accept_ra");
        // An interface that went away meanwhile needs nothing.
        if read(&accept_ra).trim() == "1"
            && let Err(e) = std::fs::write(&accept_ra, "2")
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(Error::io(accept_ra.display().to_string())(e));
        }
    }
    sysctl("net.ipv6.conf.all.forwarding", "1")
}

/// `ip addr replace` of an IPv6 address with no duplicate address detection (it would hold the
/// address back for a second or more; cloak's addresses are unique by construction).
fn add_ipv6(address: &str, iface: &str) -> Result<(), Error> {
    ip(&["-6", "addr", "replace", address, "dev", iface, "nodad"]).map(drop)
}

/// Keeps the VXLAN interface `iface` when `ip -d link show` prints `expected` for it; otherwise
/// (re)creates it with `args` after `type vxlan`.
fn ensure_vxlan(iface: &str, expected: &str, args: &[&str]) -> Result<(), Error> {
    let details = ip(&["-d", "link", "show", "dev", iface]).unwrap_or_default();
    if details.contains(expected) {
        return Ok(());
    }
    if !details.is_empty() {
        ip(&["link", "del", "dev", iface])?;
    }
    let mut add = vec!["link", "add", iface, "type", "vxlan"];
    add.extend(args);
    ip(&add).map(drop)
}

/// Puts the rule `spec` of `family` (`-4` or `-6`) at `priority` unless it is there already (an
/// apply on a health change must not take a healthy exit's rule away, even for a moment),
/// replacing whatever other rule held that priority. `shown` is how `ip rule show` prints it,
/// after `from all `.
fn replace_rule(family: &str, priority: u32, spec: &[&str], shown: &str) -> Result<(), Error> {
    let prio = priority.to_string();
    let listing = ip(&[family, "rule", "show", "priority", &prio])?;
    let wanted = format!("{prio}:\tfrom all {shown}");
    // `ip` names protocols it finds in /etc/protocols; rules are given and compared by number.
    let listing = listing.replace("ipproto udp ", "ipproto 17 ");
    if listing.lines().map(str::trim_end).eq([wanted.as_str()]) {
        return Ok(());
    }
    while ip(&[family, "rule", "del", "priority", &prio]).is_ok() {}
    let mut args = vec![family, "rule", "add"];
    args.extend(spec);
    args.extend(["priority", &prio]);
    ip(&args).map(drop)
}

fn links_with_prefix(prefix: &str) -> Result<Vec<String>, Error> {
    Ok(ip(&["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// Sets a sysctl of the calling thread's namespace, writing only when it differs: an exit's
/// `/proc/sys` is read-only (it runs unprivileged), and the node's daemon set what it needs at
/// its sandbox's ADD ([`prepare_exit_namespace`]).
fn sysctl(key: &str, value: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    if std::fs::read_to_string(&path).is_ok_and(|now| now.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
            " (read-only here: in an exit pod, cloak node sets it when the pod's sandbox is made; is cloak node running on this node?)"
        } else {
            ""
        };
        Error::io(format!("{path}{hint}"))(e)
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_drain_counts_client_flows_while_they_carry_packets_and_nothing_else() {
        let at = |secs: u64, packets: u64, remaining: u64| {
            format!(
                "tcp      6 {remaining} ESTABLISHED src=198.19.0.2 dst=203.0.113.10 sport=40000 dport=80 packets={packets} bytes=1 src=203.0.113.10 dst=10.64.0.2 sport=80 dport=40000 packets=1 bytes=1 [ASSURED] mark=0 use=1 # {secs}"
            )
        };
        let others = "\
tcp      6 118 TIME_WAIT src=198.19.0.3 dst=203.0.113.10 sport=40002 dport=80 src=203.0.113.10 dst=10.64.0.2 sport=80 dport=40002 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.1.5 dst=10.244.2.9 sport=9090 dport=5000 src=10.244.2.9 dst=10.244.1.5 sport=5000 dport=9090 [ASSURED] mark=0 use=1
udp      17 29 src=198.19.0.3 dst=203.0.113.10 sport=5001 dport=7 [UNREPLIED] src=203.0.113.10 dst=10.64.0.2 sport=7 dport=5001 mark=0 use=1
udp      17 110 src=198.19.0.2 dst=198.19.0.1 sport=5353 dport=53 src=198.19.0.1 dst=198.19.0.2 sport=53 dport=5353 [ASSURED] mark=0 use=1
icmp     1 29 src=198.19.0.2 dst=203.0.113.10 type=8 code=0 id=7 src=203.0.113.10 dst=10.64.0.2 type=0 code=0 id=7 mark=0 use=1
";
        let quiet = std::time::Duration::from_mins(1);
        let t0 = std::time::Instant::now();
        let t = |s: u64| t0 + std::time::Duration::from_secs(s);
        let mut watch = FlowWatch::default();
        // None of the others is a client flow in use: the TIME_WAIT, the pod network's own
        // flow, one-way UDP, DNS to the exit's forwarder, ICMP.
        assert_eq!(watch.update(others, t(0), quiet), 0);
        // A bulk download waiting for acks shows the short unacknowledged timeout (300 s), not
        // the established one: its packet count tells it is busy.
        let one = |s, p, r| format!("{others}{}\n", at(s, p, r));
        assert_eq!(watch.update(&one(0, 10, 300), t(0), quiet), 1, "first seen");
        assert_eq!(
            watch.update(&one(50, 500, 290), t(50), quiet),
            1,
            "more packets"
        );
        assert_eq!(
            watch.update(&one(100, 500, 240), t(100), quiet),
            1,
            "quiet for 50 s"
        );
        assert_eq!(
            watch.update(&one(111, 500, 229), t(111), quiet),
            0,
            "quiet for 61 s"
        );
        // Without counts, the remaining timeout set back by a packet tells it.
        let bare = |r: u64| {
            format!(
                "tcp      6 {r} ESTABLISHED src=198.19.0.4 dst=203.0.113.10 sport=1 dport=443 src=203.0.113.10 dst=10.64.0.2 sport=443 dport=1 [ASSURED] mark=0 use=1\n"
            )
        };
        let mut watch = FlowWatch::default();
        assert_eq!(watch.update(&bare(431_000), t(0), quiet), 1);
        assert_eq!(
            watch.update(&bare(430_930), t(70), quiet),
            0,
            "only the clock moved it"
        );
        assert_eq!(
            watch.update(&bare(432_000), t(71), quiet),
            1,
            "a packet set it back"
        );
        assert_eq!(
            watch.update(&bare(300), t(72), quiet),
            1,
            "unacknowledged data"
        );
        assert_eq!(watch.update("", t(73), quiet), 0, "gone");
    }

    #[test]
    fn a_drain_counts_a_clients_ipv6_flows_too() {
        let quiet = std::time::Duration::from_mins(1);
        let now = std::time::Instant::now();
        let ipv6 = "\
tcp      6 431999 ESTABLISHED src=fd63:6c6b::c613:2 dst=2001:db8:113::10 sport=40000 dport=80 packets=4 bytes=1 src=2001:db8:113::10 dst=fd64:1:2::2 sport=80 dport=40000 packets=3 bytes=1 [ASSURED] mark=0 use=1
udp      17 110 src=fd63:6c6b::c613:2 dst=fd63:6c6b::c613:1 sport=5353 dport=53 src=fd63:6c6b::c613:1 dst=fd63:6c6b::c613:2 sport=53 dport=5353 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=fd00:10::5 dst=fd00:10::9 sport=9090 dport=5000 src=fd00:10::9 dst=fd00:10::5 sport=5000 dport=9090 [ASSURED] mark=0 use=1
";
        assert_eq!(
            FlowWatch::default().update(ipv6, now, quiet),
            1,
            "the client's IPv6 flow, not its DNS to the exit nor the pod network's own flow"
        );
    }
    use super::*;

    fn plan(states: &[ExitUse]) -> NodePlan {
        NodePlan {
            transit: Ipv4Addr::new(198, 19, 0, 2),
            exits: states
                .iter()
                .zip(0u8..)
                .map(|(state, slot)| ExitLink {
                    slot,
                    vni: 4096 + u32::from(slot),
                    remote: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 20 + slot)),
                    gateway: 0,
                    state: *state,
                    ipv6: false,
                })
                .collect(),
            clients: vec![ClientPort {
                iface: "ckg1".into(),
                address: Ipv4Addr::new(198, 18, 0, 2),
                gateway: 0,
                mss: 1360,
                pod_ip: None,
            }],
        }
    }

    fn pick(plan: &NodePlan) -> Option<String> {
        plan.render()
            .lines()
            .find(|l| l.contains("numgen"))
            .map(|l| l.trim().to_owned())
    }

    #[test]
    fn new_flows_are_spread_over_the_healthy_exits_alone() {
        use ExitUse::{Dead, Draining, Healthy};
        assert_eq!(
            pick(&plan(&[Healthy, Draining, Healthy, Dead])).as_deref(),
            Some(
                "iifname { \"ckg1\" } meta nfproto ipv4 ct state new ct mark set numgen random mod 2 map { 0 : 0x43000000, 1 : 0x43020000 }"
            )
        );
        assert_eq!(
            pick(&plan(&[Dead, Draining])),
            None,
            "no exit: no pick, refused"
        );
    }

    #[test]
    fn an_exits_link_may_open_connections_to_its_own_gateways_clients_alone_pinned_to_it() {
        let mut plan = plan(&[ExitUse::Healthy, ExitUse::Dead]);
        plan.clients[0].pod_ip = Some(Ipv4Addr::new(10, 244, 1, 5));
        // Another gateway's client on the same node.
        plan.clients.push(ClientPort {
            iface: "ckg9".into(),
            address: Ipv4Addr::new(198, 18, 0, 9),
            gateway: 1,
            mss: 1360,
            pod_ip: Some(Ipv4Addr::new(10, 244, 1, 9)),
        });
        let table = plan.render();
        let inbound: Vec<&str> = table
            .lines()
            .filter(|l| l.contains("ct state new ct mark set 0x"))
            .map(str::trim)
            .collect();
        // The healthy exit's link to gateway 0's client, with that exit's mark; the dead
        // exit's link to nothing.
        assert_eq!(
            inbound,
            [
                "iifname \"ckx4096\" oifname { \"ckg1\" } meta nfproto ipv4 ct state new ct mark set 0x43000000 accept"
            ]
        );
        assert!(table.contains("iifname \"ckx*\" meta mark set 0x42000000"));
        // What a link sends otherwise goes nowhere new.
        let forward = &table[table.find("chain forward").unwrap()..];
        assert!(
            forward.find("ct mark set 0x43000000 accept").unwrap()
                < forward.find("iifname \"ckx*\" drop").unwrap()
        );
        // No pod address known: no path in.
        plan.clients[0].pod_ip = None;
        assert!(!plan.render().contains("ct mark set 0x43000000 accept"));
    }

    #[test]
    fn each_gateways_clients_are_spread_over_that_gateways_exits_alone() {
        let mut two = plan(&[ExitUse::Healthy, ExitUse::Healthy, ExitUse::Healthy]);
        two.exits[2].gateway = 1;
        two.clients.push(ClientPort {
            iface: "ckg2".into(),
            address: Ipv4Addr::new(198, 18, 0, 3),
            gateway: 1,
            mss: 1228,
            pod_ip: None,
        });
        two.clients.push(ClientPort {
            iface: "ckg3".into(),
            address: Ipv4Addr::new(198, 18, 0, 4),
            gateway: 2,
            mss: 1360,
            pod_ip: None,
        });
        let picks: Vec<String> = two
            .render()
            .lines()
            .filter(|l| l.contains("numgen"))
            .map(|l| l.trim().to_owned())
            .collect();
        assert_eq!(
            picks,
            [
                "iifname { \"ckg1\" } meta nfproto ipv4 ct state new ct mark set numgen random mod 2 map { 0 : 0x43000000, 1 : 0x43010000 }",
                "iifname { \"ckg2\" } meta nfproto ipv4 ct state new ct mark set numgen random mod 1 map { 0 : 0x43020000 }",
            ],
            "gateway 2 has no exit: its client gets no mark and is refused"
        );
        // Each client's flows are clamped to its own gateway's MSS: a gateway with a small MTU
        // (a deep chain's 1268) lowers no other gateway's clients.
        let clamps: Vec<String> = two
            .render()
            .lines()
            .filter(|l| l.contains("maxseg size set") && l.contains("ipv4"))
            .map(|l| l.trim().to_owned())
            .collect();
        assert_eq!(
            clamps,
            [
                "iifname { \"ckg2\" } oifname \"ckx*\" meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1228 tcp option maxseg size set 1228",
                "iifname \"ckx*\" oifname { \"ckg2\" } meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1228 tcp option maxseg size set 1228",
                "iifname { \"ckg1\", \"ckg3\" } oifname \"ckx*\" meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1360 tcp option maxseg size set 1360",
                "iifname \"ckx*\" oifname { \"ckg1\", \"ckg3\" } meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1360 tcp option maxseg size set 1360",
            ]
        );
    }

    #[test]
    fn ipv6_flows_are_spread_over_the_healthy_exits_that_carry_ipv6_and_get_no_pick_without_one() {
        use ExitUse::{Dead, Draining, Healthy};
        let mut mixed = plan(&[Healthy, Healthy, Draining, Dead, Healthy]);
        for slot in [1, 2, 3, 4] {
            mixed.exits[slot].ipv6 = true;
        }
        let picks = |plan: &NodePlan| -> Vec<String> {
            plan.render()
                .lines()
                .filter(|l| l.contains("numgen"))
                .map(|l| l.trim().to_owned())
                .collect()
        };
        assert_eq!(
            picks(&mixed),
            [
                "iifname { \"ckg1\" } meta nfproto ipv4 ct state new ct mark set numgen random mod 3 map { 0 : 0x43000000, 1 : 0x43010000, 2 : 0x43040000 }",
                "iifname { \"ckg1\" } meta nfproto ipv6 ct state new ct mark set numgen random mod 2 map { 0 : 0x43010000, 1 : 0x43040000 }",
            ]
        );
        let rendered = plan(&[Healthy]).render();
        assert_eq!(
            picks(&plan(&[Healthy])).len(),
            1,
            "no exit carries IPv6: no IPv6 pick, so IPv6 keeps mark 0 and is refused"
        );
        for rule in [
            "meta nfproto ipv6 snat ip6 to fd63:6c6b::c613:2",
            "meta nfproto ipv4 snat ip to 198.19.0.2",
            "iifname { \"ckg1\" } oifname \"ckx*\" meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size > 1340 tcp option maxseg size set 1340",
            "iifname \"ckx*\" oifname { \"ckg1\" } meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1360 tcp option maxseg size set 1360",
            "ip6 saddr fd63:6c6b::c613:0/112 oifname != \"ckx*\" drop",
        ] {
            assert!(rendered.contains(rule), "{rule}: {rendered}");
        }
    }

    #[test]
    fn every_address_has_its_ipv6_twin_in_the_ula_prefix() {
        assert_eq!(twin(CLIENT_GATEWAY).to_string(), "fd63:6c6b::c612:1");
        assert_eq!(twin(EXIT_ADDRESS).to_string(), "fd63:6c6b::c613:1");
        for (v4, v6) in [
            (CLIENT_RANGE, CLIENT_RANGE6),
            (TRANSIT_RANGE, TRANSIT_RANGE6),
        ] {
            let (v4, v6): (ipnet::Ipv4Net, ipnet::Ipv6Net) =
                (v4.parse().unwrap(), v6.parse().unwrap());
            assert_eq!(twin(v4.network()), v6.network());
            assert_eq!(twin(v4.broadcast()), v6.broadcast());
        }
        assert_eq!(TRANSIT_PREFIX6, 96 + TRANSIT_PREFIX);
    }

    #[test]
    fn an_exits_probe_answers_say_draining_or_ipv6_and_only_an_ipv6_tunnel_takes_ipv6() {
        let exit = |draining, ipv6| {
            ExitPlan {
                vni: 4097,
                local: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 21)),
                tunnel: "wg0".into(),
                mss: 1360,
                link_mtu: None,
                healthy: true,
                draining,
                ipv6,
            }
            .render()
        };
        let dscp = |r: &str| {
            r.lines()
                .find(|l| l.contains("dscp set"))
                .map(|l| l.trim().rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(dscp(&exit(false, false)), None);
        assert_eq!(dscp(&exit(false, true)).as_deref(), Some("3"));
        assert_eq!(dscp(&exit(true, true)).as_deref(), Some("8"));
        let forwards_ipv6 = "iifname \"ckx0\" oifname \"wg0\" meta nfproto ipv6 accept";
        assert!(exit(false, true).contains(forwards_ipv6));
        assert!(!exit(false, false).contains(forwards_ipv6));
        assert!(
            exit(false, false).contains(
                "iifname \"ckx0\" meta nfproto ipv6 ip6 daddr != { fe80::/10, ff00::/8, fd63:6c6b::c613:1 } meta l4proto tcp reject with tcp reset"
            ),
            "IPv6 is refused at once by an exit that does not carry it"
        );
        assert!(
            exit(false, false).contains(
                "iifname \"ckx0\" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept\n\t\tiifname \"ckx0\" drop"
            ),
            "neighbour discovery on the link comes before its drop"
        );
    }

    #[test]
    fn the_kill_switch_rejects_unless_turned_off() {
        let mut client = ClientPlan {
            address: Ipv4Addr::new(198, 18, 0, 5),
            intranet: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            mtu: 1400,
            unprotected: false,
            own_tunnel: None,
        };
        let rendered = client.render();
        assert!(
            rendered.contains("ip daddr { 10.244.0.0/16 } accept"),
            "{rendered}"
        );
        assert!(
            rendered.contains("ip6 daddr { fd00::/8 } accept"),
            "{rendered}"
        );
        assert!(
            rendered
                .trim_end()
                .contains("reject with icmpx admin-prohibited"),
            "{rendered}"
        );
        assert!(
            rendered.contains(&format!(
                "ip daddr != 127.0.0.0/8 {DNS} dnat ip to 198.19.0.1"
            )),
            "every IPv4 query goes to the exits' forwarders: {rendered}"
        );
        assert!(
            rendered.contains(&format!("{DNS} reject")),
            "DNS the redirect cannot take is refused: {rendered}"
        );
        let output = rendered.split("chain output").nth(1).unwrap();
        assert!(
            output
                .find(&format!("oifname != \"lo\" meta nfproto ipv6 {DNS} reject"))
                .is_some_and(|refused| Some(refused) < output.find("oifname {")),
            "IPv6 DNS is refused before anything but loopback is let out: {rendered}"
        );
        assert!(!rendered.contains("ck0"), "{rendered}");
        // A chain's hop: what its own tunnel and its own end of the links carry leaves by them,
        // and its DNS is its own kill switch's to rule, never redirected to the node.
        client.own_tunnel = Some("ck0".into());
        let hop = client.render();
        let output = hop.split("chain output").nth(1).unwrap();
        assert!(
            output.contains("oifname { \"lo\", \"ckg0\", \"ck0\", \"ckx0\" } accept"),
            "{hop}"
        );
        assert!(!hop.contains("dnat") && !output.contains(DNS), "{hop}");
        assert!(
            output.contains("reject with icmpx admin-prohibited"),
            "{hop}"
        );
        client.own_tunnel = None;
        client.unprotected = true;
        assert!(!client.render().contains("reject"));
    }
}
