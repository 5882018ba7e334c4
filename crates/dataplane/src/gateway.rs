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
//! - [`ClientPort`]: what the CNI plugin builds in a client's namespace: a second interface to
//!   the node carrying every route but the intranet's, and a kill switch that lets nothing else
//!   out except to the intranet.
//! - [`NodePlan`]: the node's links to the exits, its routing rules and tables, and one nftables
//!   table that pins each new flow to a healthy exit (`ct mark`), keeps it there, refuses client
//!   traffic when no exit is healthy, and forwards nothing from a client anywhere but an exit.
//! - [`ExitPlan`]: an exit's end of the links (one learning VXLAN interface for every node),
//!   forwarding into its tunnel with masquerade, MSS clamped both ways, and the health answer
//!   that stops when the tunnel does.
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

/// The mark of the flows on exit slot `slot`.
pub fn mark(slot: u8) -> u32 {
    MARK_TAG | (u32::from(slot) << 16)
}

/// Resets the flows carrying slot `slot`'s mark (a slot about to be taken by another exit).
pub fn reset_flows(slot: u8) -> Result<u32, Error> {
    delete_flows(mark(slot))
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

/// One client pod's attachment, as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPort {
    /// The host side of the client's veth (`ckg<id>`).
    pub iface: String,
    /// The client's address on [`CLIENT_IFACE`], in [`CLIENT_RANGE`].
    pub address: Ipv4Addr,
    /// The gateway it belongs to (a node-local number): its flows go to that gateway's exits.
    pub gateway: u16,
}

/// What a node's exit link is for, as health and rollouts decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitUse {
    /// Takes new flows.
    Healthy,
    /// No new flows; its established flows stay (a rollout or drain).
    Draining,
    /// No flows at all: its flows are reset.
    Dead,
}

/// One exit as a node links to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitLink {
    /// The node-local index that names its mark, table and rules.
    pub slot: u8,
    /// The VXLAN network identifier the exit listens on.
    pub vni: u32,
    /// The exit pod's IP.
    pub remote: IpAddr,
    /// The gateway it serves (a node-local number, as [`ClientPort::gateway`]).
    pub gateway: u16,
    pub state: ExitUse,
    /// Whether its tunnel carries IPv6: only such exits get the clients' IPv6 flows.
    pub ipv6: bool,
}

impl ExitLink {
    /// The node's interface for this exit.
    pub fn iface(&self) -> String {
        format!("{LINK_PREFIX}{}", self.vni)
    }
}

/// A node's whole gateway data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// The node's own address on every link, in `198.19.0.0/16`, unique among the nodes.
    pub transit: Ipv4Addr,
    pub exits: Vec<ExitLink>,
    pub clients: Vec<ClientPort>,
    /// TCP MSS clamped on client flows, both ways (NETNOTES trap 2).
    pub mss: u16,
}

impl NodePlan {
    /// The node's nftables table, whole: applied in one transaction that replaces the last.
    pub fn render(&self) -> String {
        // One pick per gateway: a new flow of one of its clients gets the mark of one of its
        // healthy exits. A gateway with no healthy exit has no pick: its clients' new flows
        // keep mark 0 and the forward chain refuses them.
        let mut pick = String::new();
        // A gateway with no healthy exit has its clients' DNS answered by the node instead
        // (cluster names only: `dnsforward`).
        let mut dns_here = String::new();
        let gateways: std::collections::BTreeSet<u16> =
            self.clients.iter().map(|c| c.gateway).collect();
        for gateway in gateways {
            let healthy: Vec<&ExitLink> = self
                .exits
                .iter()
                .filter(|e| e.gateway == gateway && e.state == ExitUse::Healthy)
                .collect();
            let ifaces: Vec<String> = self
                .clients
                .iter()
                .filter(|c| c.gateway == gateway)
                .map(|c| format!("\"{}\"", c.iface))
                .collect();
            if healthy.is_empty() {
                let _ = writeln!(
                    dns_here,
                    "\t\tiifname {{ {} }} ip daddr {EXIT_ADDRESS} {DNS} dnat ip to {CLIENT_GATEWAY}",
                    ifaces.join(", ")
                );
                continue;
            }
            // IPv6 flows only to the exits whose tunnels carry IPv6; with none, they keep mark
            // 0 and are refused like every flow of a gateway with no exit.
            let ipv6: Vec<&ExitLink> = healthy.iter().copied().filter(|e| e.ipv6).collect();
            for (family, exits) in [("ipv4", &healthy), ("ipv6", &ipv6)] {
                if exits.is_empty() {
                    continue;
                }
                let elements: Vec<String> = exits
                    .iter()
                    .enumerate()
                    .map(|(i, e)| format!("{i} : {:#x}", mark(e.slot)))
                    .collect();
                let _ = writeln!(
                    pick,
                    "\t\tiifname {{ {} }} meta nfproto {family} ct state new ct mark set numgen random mod {} map {{ {} }}",
                    ifaces.join(", "),
                    exits.len(),
                    elements.join(", ")
                );
            }
        }
        // The flows of a dead exit are refused by the ruleset itself, in the same transaction
        // that takes the exit out of the picks: a TCP flow gets a reset at its next packet
        // (NETNOTES trap 6) even when deleting its conntrack entry loses a race with a packet in
        // flight, which then re-creates the entry with the dead exit's mark.
        let dead: Vec<String> = self
            .exits
            .iter()
            .filter(|e| e.state == ExitUse::Dead)
            .map(|e| format!("{:#x}", mark(e.slot)))
            .collect();
        let refuse_dead = if dead.is_empty() {
            String::new()
        } else {
            let marks = dead.join(", ");
            format!(
                "\t\tiifname \"{CLIENT_PREFIX}*\" ct mark {{ {marks} }} meta l4proto tcp reject with tcp reset\n\
                 \t\tct mark {{ {marks} }} drop\n"
            )
        };
        let clamp = clamps(self.mss);
        // IPv6 with no exit's mark is refused here, before routing: a node with no IPv6 route of
        // its own would otherwise answer it with rate-limited "no route" errors, a second
        // apart, instead of at once. The link's own traffic (neighbour discovery) and the
        // node's address go on.
        let refuse_v6 = refuse_ipv6(
            &format!("iifname \"{CLIENT_PREFIX}*\" meta mark and {TAG_MASK:#x} != {MARK_TAG:#x}"),
            twin(CLIENT_GATEWAY),
        );
        format!(
            "table inet {NODE_TABLE}\n\
             delete table inet {NODE_TABLE}\n\
             table inet {NODE_TABLE} {{\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority mangle; policy accept;\n\
             {pick}\
             \t\tiifname \"{CLIENT_PREFIX}*\" meta mark set ct mark\n\
             {refuse_v6}\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{CLIENT_PREFIX}*\" oifname \"{LINK_PREFIX}*\" {clamp_v4}\n\
             \t\tiifname \"{CLIENT_PREFIX}*\" oifname \"{LINK_PREFIX}*\" {clamp_v6}\n\
             \t\tiifname \"{LINK_PREFIX}*\" oifname \"{CLIENT_PREFIX}*\" {clamp_v4}\n\
             \t\tiifname \"{LINK_PREFIX}*\" oifname \"{CLIENT_PREFIX}*\" {clamp_v6}\n\
             {refuse_dead}\
             \t\tiifname \"{CLIENT_PREFIX}*\" oifname \"{LINK_PREFIX}*\" ct mark and {TAG_MASK:#x} == {MARK_TAG:#x} accept\n\
             \t\tiifname \"{LINK_PREFIX}*\" oifname \"{CLIENT_PREFIX}*\" ct state established,related accept\n\
             \t\tiifname \"{CLIENT_PREFIX}*\" meta l4proto tcp reject with tcp reset\n\
             \t\tiifname \"{CLIENT_PREFIX}*\" reject with icmpx admin-prohibited\n\
             \t\toifname \"{CLIENT_PREFIX}*\" drop\n\
             \t\tiifname \"{LINK_PREFIX}*\" drop\n\
             \t\tct mark and {TAG_MASK:#x} == {MARK_TAG:#x} drop\n\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\tct mark and {TAG_MASK:#x} == {MARK_TAG:#x} oifname != \"{LINK_PREFIX}*\" oifname != \"{CLIENT_PREFIX}*\" drop\n\
             \t\tip saddr {TRANSIT_RANGE} oifname != \"{LINK_PREFIX}*\" drop\n\
             \t\tip daddr {TRANSIT_RANGE} oifname != \"{LINK_PREFIX}*\" drop\n\
             \t\tip6 saddr {TRANSIT_RANGE6} oifname != \"{LINK_PREFIX}*\" drop\n\
             \t\tip6 daddr {TRANSIT_RANGE6} oifname != \"{LINK_PREFIX}*\" drop\n\
             \t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{CLIENT_PREFIX}*\" ip daddr {CLIENT_GATEWAY} {DNS} accept\n\
             \t\tip daddr {CLIENT_GATEWAY} {DNS} drop\n\
             \t\t{NEIGHBOUR_DISCOVERY}\n\
             \t\tiifname \"{CLIENT_PREFIX}*\" meta l4proto tcp reject with tcp reset\n\
             \t\tiifname \"{CLIENT_PREFIX}*\" meta l4proto != icmp reject with icmpx admin-prohibited\n\
             \t\tiifname \"{LINK_PREFIX}*\" icmp type echo-reply accept\n\
             \t\tiifname \"{LINK_PREFIX}*\" drop\n\
             \t}}\n\
             \tchain dns {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             {dns_here}\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"{LINK_PREFIX}*\" ct mark and {TAG_MASK:#x} == {MARK_TAG:#x} meta nfproto ipv4 snat ip to {transit}\n\
             \t\toifname \"{LINK_PREFIX}*\" ct mark and {TAG_MASK:#x} == {MARK_TAG:#x} meta nfproto ipv6 snat ip6 to {transit6}\n\
             \t}}\n\
             }}\n",
            transit = self.transit,
            transit6 = twin(self.transit),
            clamp_v4 = clamp[0],
            clamp_v6 = clamp[1],
        )
    }

    /// Makes the kernel hold exactly this plan: links to the exits in it (others removed), their
    /// rules and tables, the routes back to the clients, and the nftables table.
    pub fn apply(&self) -> Result<(), Error> {
        // The table first: whatever fails after it, client traffic is already held to the
        // links (and refused when it has none).
        run("nft", &["-f", "-"], Some(self.render().as_bytes()))?;
        let ipv6 = has_ipv6();
        if ipv6 && !self.clients.is_empty() {
            forward_ipv6()?;
        }
        for exit in &self.exits {
            ensure_link(exit, self.transit, ipv6)?;
        }
        remove_other_links(&self.exits)?;
        for exit in &self.exits {
            route_exit(exit, ipv6)?;
        }
        remove_other_exit_rules(&self.exits, ipv6)?;
        route_clients(&self.clients, ipv6)?;
        Ok(())
    }

    /// Resets the flows of every exit that is [`ExitUse::Dead`], so their next packet is a new
    /// flow on a healthy exit (which the far end answers with a reset: NETNOTES trap 6).
    /// Returns how many flows were deleted.
    pub fn reset_dead_flows(&self) -> Result<u32, Error> {
        let mut deleted = 0;
        for exit in self.exits.iter().filter(|e| e.state == ExitUse::Dead) {
            deleted += delete_flows(mark(exit.slot))?;
        }
        Ok(deleted)
    }

    /// The node's table as the kernel lists it now: compared with the listing right after the
    /// last apply, a difference is drift (a flushed ruleset, an edited table). An error (no
    /// table) is drift too.
    pub fn loaded() -> Result<String, Error> {
        run("nft", &["list", "table", "inet", NODE_TABLE], None)
    }

    /// Removes everything a node plan puts in the kernel.
    pub fn reset() -> Result<(), Error> {
        remove_other_links(&[])?;
        let ipv6 = has_ipv6();
        remove_other_exit_rules(&[], ipv6)?;
        let table = CLIENTS_ROUTE_TABLE.to_string();
        for family in families(ipv6) {
            let _ = ip(&[family, "rule", "del", "priority", &table]);
            let _ = ip(&[family, "route", "flush", "table", &table]);
        }
        match run("nft", &["delete", "table", "inet", NODE_TABLE], None) {
            Err(Error::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            other => other.map(drop),
        }
    }
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

fn ensure_link(exit: &ExitLink, transit: Ipv4Addr, ipv6: bool) -> Result<(), Error> {
    let iface = exit.iface();
    let (vni, port, remote) = (
        exit.vni.to_string(),
        VXLAN_PORT.to_string(),
        exit.remote.to_string(),
    );
    // A fixed source port (the kernel's range is [min, max); min == max would mean any
    // ephemeral port): the exit's replies come from its VXLAN port to ours, so any firewall
    // between sees one flow per node and exit, and the exit routes them by that port.
    let next_port = (VXLAN_PORT + 1).to_string();
    // The source ports are part of what must match: links made with an empty range keep any
    // ephemeral port, and a restarted daemon would adopt them as they are.
    ensure_vxlan(
        &iface,
        &format!("remote {remote} srcport {port} {next_port} "),
        &[
            "id",
            &vni,
            "remote",
            &remote,
            "dstport",
            &port,
            "srcport",
            &port,
            &next_port,
            "nolearning",
        ],
    )?;
    ip(&[
        "addr",
        "replace",
        &format!("{transit}/32"),
        "dev",
        &iface,
        "noprefixroute",
    ])?;
    // A MAC that follows from the node and the exit: a link made again (a daemon restart, a
    // changed exit address) keeps the address the exit's neighbour table holds for this node,
    // so established flows go on instead of waiting for that entry to go stale.
    ip(&[
        "link",
        "set",
        "dev",
        &iface,
        "address",
        &link_mac(transit, exit.vni),
    ])?;
    sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
    if ipv6 {
        sysctl(&format!("net.ipv6.conf.{iface}.disable_ipv6"), "0")?;
        add_ipv6(&format!("{}/128", twin(transit)), &iface)?;
    }
    ip(&["link", "set", "dev", &iface, "up"])?;
    Ok(())
}

/// The MAC of a node's link to an exit: locally administered, from the node's transit address
/// (unique among nodes) and the exit's VNI (one segment per exit).
pub fn link_mac(transit: Ipv4Addr, vni: u32) -> String {
    let [_, _, c, d] = transit.octets();
    let [_, v1, v2, v3] = vni.to_be_bytes();
    format!("02:{c:02x}:{d:02x}:{v1:02x}:{v2:02x}:{v3:02x}")
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

fn remove_other_links(keep: &[ExitLink]) -> Result<(), Error> {
    for iface in links_with_prefix(LINK_PREFIX)? {
        if !keep.iter().any(|e| e.iface() == iface) {
            ip(&["link", "del", "dev", &iface])?;
        }
    }
    Ok(())
}

fn route_exit(exit: &ExitLink, ipv6: bool) -> Result<(), Error> {
    let slot = u32::from(exit.slot);
    let table = (EXIT_ROUTE_TABLE_BASE + slot).to_string();
    let iface = exit.iface();
    let mut vias = vec![("-4", IpAddr::V4(EXIT_ADDRESS))];
    if ipv6 {
        vias.push(("-6", IpAddr::V6(twin(EXIT_ADDRESS))));
    }
    for (family, via) in vias {
        ip(&[
            family,
            "route",
            "replace",
            "default",
            "via",
            &via.to_string(),
            "dev",
            &iface,
            "onlink",
            "table",
            &table,
        ])?;
    }
    let mark = format!("{:#x}/{MARK_MASK:#x}", mark(exit.slot));
    // VXLAN routes its outer packet with the inner packet's mark: without this rule the outer
    // packet would follow the mark into its own link (docs/architecture.md, the prototype).
    let remote = exit.remote.to_string();
    replace_rule(
        if exit.remote.is_ipv4() { "-4" } else { "-6" },
        EXIT_ROUTE_TABLE_BASE + 2 * slot,
        &["fwmark", &mark, "to", &remote, "lookup", "main"],
        &format!("to {remote} fwmark {mark} lookup main"),
    )?;
    for family in families(ipv6) {
        replace_rule(
            family,
            EXIT_ROUTE_TABLE_BASE + 2 * slot + 1,
            &["fwmark", &mark, "lookup", &table],
            &format!("fwmark {mark} lookup {table}"),
        )?;
    }
    Ok(())
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

/// Removes the rules and tables of every slot not in `keep`, reading the rules once.
fn remove_other_exit_rules(keep: &[ExitLink], ipv6: bool) -> Result<(), Error> {
    let first = EXIT_ROUTE_TABLE_BASE;
    let last = EXIT_ROUTE_TABLE_BASE + 2 * u32::from(u8::MAX) + 1;
    let kept = |prio: u32| keep.iter().any(|e| (prio - first) / 2 == u32::from(e.slot));
    for family in families(ipv6) {
        for line in ip(&[family, "rule", "show"])?.lines() {
            let Some(prio) = line
                .split(':')
                .next()
                .and_then(|p| p.trim().parse::<u32>().ok())
            else {
                continue;
            };
            if (first..=last).contains(&prio) && !kept(prio) {
                let _ = ip(&[family, "rule", "del", "priority", &prio.to_string()]);
                if (prio - first) % 2 == 1 {
                    let table = (first + (prio - first) / 2).to_string();
                    let _ = ip(&[family, "route", "flush", "table", &table]);
                }
            }
        }
    }
    Ok(())
}

fn route_clients(clients: &[ClientPort], ipv6: bool) -> Result<(), Error> {
    /// A family's `ip` option, its client range, and a client's address in it.
    type Family = (&'static str, &'static str, fn(&ClientPort) -> IpAddr);
    let table = CLIENTS_ROUTE_TABLE.to_string();
    let mut families: Vec<Family> = vec![("-4", CLIENT_RANGE, |c| IpAddr::V4(c.address))];
    if ipv6 {
        families.push(("-6", CLIENT_RANGE6, |c| IpAddr::V6(twin(c.address))));
    }
    for (family, range, address) in families {
        replace_rule(
            family,
            CLIENTS_ROUTE_TABLE,
            &["to", range, "lookup", &table],
            &format!("to {range} lookup {table}"),
        )?;
        // An empty table does not exist for `ip route show`: nothing to remove then.
        let listing = ip(&[family, "route", "show", "table", &table]).unwrap_or_default();
        for line in listing.lines() {
            let dst = line.split_whitespace().next().unwrap_or_default();
            if !clients.iter().any(|c| address(c).to_string() == dst) && !dst.is_empty() {
                let _ = ip(&[family, "route", "del", dst, "table", &table]);
            }
        }
        for client in clients {
            let route = || {
                ip(&[
                    family,
                    "route",
                    "replace",
                    &address(client).to_string(),
                    "dev",
                    &client.iface,
                    "table",
                    &table,
                ])
            };
            match route() {
                Ok(_) => {}
                // A client's veth made with IPv6 off (by an older cloak, or turned off since)
                // gets it back; failing that, that client alone goes without IPv6 (its IPv6 is
                // then refused, never sent elsewhere) rather than the node's whole plan failing.
                Err(e) if family == "-6" => {
                    let repaired =
                        sysctl(&format!("net.ipv6.conf.{}.disable_ipv6", client.iface), "0")
                            .and_then(|()| {
                                add_ipv6(&format!("{}/128", twin(CLIENT_GATEWAY)), &client.iface)
                            })
                            .and_then(|()| route());
                    if let Err(again) = repaired {
                        tracing::warn!(iface = %client.iface, error = %e, %again, "a client without IPv6");
                    }
                }
                // A client whose interface went (its pod deleted while the daemon was away, or
                // behind its back) has nothing to route to: the others' routes must not wait for
                // the daemon to forget it.
                Err(e) if !link_exists(&client.iface) => {
                    tracing::warn!(iface = %client.iface, error = %e, "a client's interface is gone");
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn delete_flows(mark: u32) -> Result<u32, Error> {
    // `conntrack -D` exits 1 when nothing matched; its stderr then says "0 flow entries".
    let out = std::process::Command::new("conntrack")
        .args(["-D", "--mark", &mark.to_string()])
        .output()
        .map_err(Error::io("conntrack -D"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .find(|(_, next)| *next == "flow")
        .and_then(|(n, _)| n.parse().ok())
        .ok_or_else(|| Error::Command {
            command: "conntrack -D --mark".into(),
            stderr: text.trim().to_owned(),
        })
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

/// The sysctls an exit needs in its own namespace, which it cannot write itself (its
/// `/proc/sys` is read-only: it runs with a few capabilities, not privileged): forwarding, no
/// reverse-path filter on the interfaces it makes, IPv6 on them, and conntrack's packet counts
/// (what a draining exit watches). Run by the node's daemon inside the exit's sandbox namespace
/// (the calling thread's) at its ADD. Harmless in any pod's namespace: its own nftables forward
/// chain decides what an exit forwards, and a pod that only claims to be an exit gains nothing
/// but forwarding in its own namespace.
pub fn prepare_exit_namespace() -> Result<(), Error> {
    sysctl("net.ipv4.ip_forward", "1")?;
    sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    if has_ipv6() {
        sysctl("net.ipv6.conf.default.disable_ipv6", "0")?;
        forward_ipv6()?;
    }
    let _ = sysctl("net.netfilter.nf_conntrack_acct", "1");
    Ok(())
}

/// One client's namespace: its interface to the node, routes and kill switch. Applied by the
/// CNI plugin inside the namespace, after the veth is made ([`ClientPlan::create_veth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPlan {
    pub address: Ipv4Addr,
    /// Destinations that keep going through the pod's own network.
    pub intranet: Vec<IpNet>,
    pub mtu: u16,
    /// Let internet traffic out through the pod network when the node has no exit for it
    /// (`killSwitch: false`). Off by default.
    pub unprotected: bool,
}

impl ClientPlan {
    /// Creates the client's veth pair from the node's namespace: `host_iface` stays on the
    /// node, its peer [`CLIENT_IFACE`] goes into the namespace at `netns` (a path).
    pub fn create_veth(host_iface: &str, netns: &str, mtu: u16) -> Result<(), Error> {
        let mtu = mtu.to_string();
        ip(&[
            "link",
            "add",
            host_iface,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IFACE,
            "mtu",
            &mtu,
            "netns",
            netns,
        ])?;
        ip(&[
            "addr",
            "replace",
            &format!("{CLIENT_GATEWAY}/32"),
            "dev",
            host_iface,
        ])?;
        sysctl(&format!("net.ipv4.conf.{host_iface}.rp_filter"), "0")?;
        if has_ipv6() {
            sysctl(&format!("net.ipv6.conf.{host_iface}.disable_ipv6"), "0")?;
            add_ipv6(&format!("{}/128", twin(CLIENT_GATEWAY)), host_iface)?;
        }
        ip(&["link", "set", "dev", host_iface, "up"])?;
        Ok(())
    }

    /// The kill switch: nothing leaves but through [`CLIENT_IFACE`] or to the intranet.
    pub fn render(&self) -> String {
        let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = self
            .intranet
            .iter()
            .partition(|n| matches!(n, IpNet::V4(_)));
        let set = |nets: &[&IpNet]| {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut rules = String::new();
        if !v4.is_empty() {
            let _ = writeln!(rules, "\t\tip daddr {{ {} }} accept", set(&v4));
        }
        if !v6.is_empty() {
            let _ = writeln!(rules, "\t\tip6 daddr {{ {} }} accept", set(&v6));
        }
        let verdict = if self.unprotected {
            "accept"
        } else {
            "reject with icmpx admin-prohibited"
        };
        // IPv6 DNS has no forwarder to go to: refused at once, so a resolver library moves on
        // to the next server instead of waiting.
        let dns_v6 = if self.unprotected {
            String::new()
        } else {
            format!(
                "\t\toifname != \"lo\" meta nfproto ipv6 {DNS} reject with icmpx admin-prohibited\n"
            )
        };
        let dns_refused = if self.unprotected {
            String::new()
        } else {
            // The filter hook still sees the interface the query was routed to before the
            // redirect (the primary one): the redirected queries are told by their address.
            format!(
                "\t\tip daddr {EXIT_ADDRESS} {DNS} accept\n\t\t{DNS} reject with icmpx admin-prohibited\n"
            )
        };
        // Every DNS query goes to the exits' forwarders over the node (which hashes it to a
        // healthy exit like any flow), whatever resolver it was sent to: cluster names are
        // answered by the cluster DNS from there, every other name through a tunnel. The source
        // becomes the client's address on its interface (a query for an intranet resolver was
        // given the primary interface's). DNS that the redirect cannot take (IPv6 to an intranet
        // resolver) is refused, never sent around the exits. A resolver on loopback (a stub in
        // the pod) is left alone: what it asks in turn is redirected.
        format!(
            "table inet {CLIENT_TABLE}\n\
             delete table inet {CLIENT_TABLE}\n\
             table inet {CLIENT_TABLE} {{\n\
             \tchain dns {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr != 127.0.0.0/8 {DNS} dnat ip to {EXIT_ADDRESS}\n\
             \t}}\n\
             \tchain source {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"{CLIENT_IFACE}\" ip saddr != {CLIENT_RANGE} masquerade\n\
             \t\toifname \"{CLIENT_IFACE}\" ip6 saddr != {CLIENT_RANGE6} masquerade\n\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             {dns_v6}\
             \t\toifname {{ \"lo\", \"{CLIENT_IFACE}\" }} accept\n\
             {dns_refused}\
             {rules}\
             \t\ticmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report }} accept\n\
             \t\t{verdict}\n\
             \t}}\n\
             }}\n"
        )
    }

    /// The kill switch alone, inside a pod's namespace (the calling thread's), for a running pod
    /// that is to be a client and cannot be attached: nothing leaves it but to the intranet.
    /// [`ClientPlan::leave`] lifts it.
    pub fn cut_off(intranet: &[IpNet]) -> Result<(), Error> {
        let plan = Self {
            address: CLIENT_GATEWAY,
            intranet: intranet.to_vec(),
            mtu: 0,
            unprotected: false,
        };
        run("nft", &["-f", "-"], Some(plan.render().as_bytes())).map(drop)
    }

    /// Takes cloak out of a pod's namespace (the calling thread's): its kill switch, and its
    /// interface with the routes through it, if the node side did not take it already. The pod's
    /// own network is then its only one again.
    pub fn leave() -> Result<(), Error> {
        match run("nft", &["delete", "table", "inet", CLIENT_TABLE], None) {
            Err(Error::Command { stderr, .. }) if stderr.contains("No such file") => {}
            other => other.map(drop)?,
        }
        remove_client(CLIENT_IFACE)
    }

    /// Addresses, routes (every prefix outside the intranet through the node) and the kill
    /// switch, inside the client's namespace (the calling thread's).
    pub fn apply(&self) -> Result<(), Error> {
        run("nft", &["-f", "-"], Some(self.render().as_bytes()))?;
        ip(&[
            "addr",
            "replace",
            &format!("{}/32", self.address),
            "dev",
            CLIENT_IFACE,
        ])?;
        ip(&["link", "set", "dev", CLIENT_IFACE, "up"])?;
        let gateway = CLIENT_GATEWAY.to_string();
        let src = self.address.to_string();
        let mtu = self.mtu.to_string();
        ip(&["route", "replace", &gateway, "dev", CLIENT_IFACE])?;
        // IPv6 too, when the pod has it and the link can carry it (the kernel turns IPv6 off on
        // a link under 1280 bytes): every IPv6 prefix outside the intranet goes to the node,
        // which sends it through an exit that carries IPv6 or refuses it at once.
        let ipv6 = self.mtu >= 1280
            && std::fs::read_to_string(format!(
                "/proc/sys/net/ipv6/conf/{CLIENT_IFACE}/disable_ipv6"
            ))
            .is_ok_and(|v| v.trim() == "0");
        let (gateway6, src6) = (
            twin(CLIENT_GATEWAY).to_string(),
            twin(self.address).to_string(),
        );
        if ipv6 {
            add_ipv6(&format!("{src6}/128"), CLIENT_IFACE)?;
            ip(&["-6", "route", "replace", &gateway6, "dev", CLIENT_IFACE])?;
        }
        for net in cloak_model::gateway::complement(&self.intranet) {
            let (family, via, src) = match net {
                IpNet::V4(_) => ("-4", &gateway, &src),
                IpNet::V6(_) if ipv6 => ("-6", &gateway6, &src6),
                IpNet::V6(_) => continue,
            };
            ip(&[
                family,
                "route",
                "replace",
                &net.to_string(),
                "via",
                via,
                "dev",
                CLIENT_IFACE,
                "src",
                src,
                "mtu",
                &mtu,
            ])?;
        }
        Ok(())
    }
}

/// An exit's end: one VXLAN interface every node's link reaches, forwarding into the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitPlan {
    pub vni: u32,
    /// The pod's own address, the links' far end.
    pub local: IpAddr,
    /// The tunnel interface client flows leave by.
    pub tunnel: String,
    /// TCP MSS clamped on client flows, both ways.
    pub mss: u16,
    /// The MTU of the links' end (`ckx0`): the pod network's less VXLAN's overhead, so a reply
    /// bigger than a link carries whole is refused with "fragmentation needed" here instead of
    /// being fragmented outside. None: the kernel's default.
    pub link_mtu: Option<u16>,
    /// Whether the tunnel carries traffic now: the exit answers the nodes' health probes only
    /// then, so a node stops sending new flows to an exit whose tunnel is down or blackholed.
    pub healthy: bool,
    /// Whether the exit is draining (its pod is being deleted): its answers to the probes carry
    /// [`DRAINING_DSCP`], and the nodes give it no new flows while keeping its established ones,
    /// with or without the operator marking it `Draining`.
    pub draining: bool,
    /// Whether the tunnel carries IPv6: the exit then forwards the clients' IPv6 into it, and
    /// its answers to the probes carry [`IPV6_DSCP`] so the nodes send it IPv6 flows.
    pub ipv6: bool,
}

/// The DSCP of a draining exit's probe answers (CS1, "lower effort"): what tells a node that an
/// exit which answers takes no new flows.
pub const DRAINING_DSCP: u8 = 8;
/// The DSCP of a (not draining) exit's probe answers when its tunnel carries IPv6: 3, from the
/// pool RFC 2474 leaves to local use (`xxxx11`). An exit that says nothing carries IPv4 alone.
pub const IPV6_DSCP: u8 = 3;

impl ExitPlan {
    pub fn render(&self) -> String {
        let health = if self.healthy { "accept" } else { "drop" };
        let answer = match (self.draining, self.ipv6) {
            (true, _) => Some(DRAINING_DSCP),
            (false, true) => Some(IPV6_DSCP),
            (false, false) => None,
        };
        let answer = answer.map_or_else(String::new, |dscp| {
            format!(
                "\t\toifname \"{EXIT_IFACE}\" ip saddr {EXIT_ADDRESS} icmp type echo-reply ip dscp set {dscp}\n"
            )
        });
        // Without IPv6 in the tunnel, a client's IPv6 that still comes (a node that has not
        // seen the answers change yet) is refused at once, before routing (which has no IPv6
        // route then, and would answer with rate-limited errors), rather than left to time out.
        let (ipv6, refuse_ipv6) = if self.ipv6 {
            (
                format!(
                    "\t\tiifname \"{EXIT_IFACE}\" oifname \"{tunnel}\" meta nfproto ipv6 accept\n",
                    tunnel = self.tunnel
                ),
                String::new(),
            )
        } else {
            (
                String::new(),
                refuse_ipv6(&format!("iifname \"{EXIT_IFACE}\""), twin(EXIT_ADDRESS)),
            )
        };
        let [clamp_v4, clamp_v6] = clamps(self.mss);
        format!(
            "table inet {EXIT_TABLE}\n\
             delete table inet {EXIT_TABLE}\n\
             table inet {EXIT_TABLE} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tudp dport {VXLAN_PORT} iifname != \"eth0\" drop\n\
             \t\tudp dport {VXLAN_PORT} ip daddr != {local} drop\n\
             \t\tudp dport {VXLAN_PORT} meta pkttype != host drop\n\
             \t\tmeta nfproto ipv6 udp dport {VXLAN_PORT} drop\n\
             \t\tiifname \"{EXIT_IFACE}\" icmp type echo-request {health}\n\
             \t\tip daddr {EXIT_ADDRESS} iifname != \"{EXIT_IFACE}\" drop\n\
             \t\tip6 daddr {exit6} iifname != \"{EXIT_IFACE}\" drop\n\
             \t\tiifname \"{EXIT_IFACE}\" ip saddr {TRANSIT_RANGE} ip daddr {EXIT_ADDRESS} {DNS} accept\n\
             \t\tiifname \"{EXIT_IFACE}\" {NEIGHBOUR_DISCOVERY}\n\
             \t\tiifname \"{EXIT_IFACE}\" drop\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t\t{clamp_v4}\n\
             \t\t{clamp_v6}\n\
             \t\tiifname \"{EXIT_IFACE}\" oifname \"{tunnel}\" meta nfproto ipv4 accept\n\
             {ipv6}\
             \t\tiifname \"{tunnel}\" oifname \"{EXIT_IFACE}\" ct state established,related accept\n\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             {answer}\
             \t}}\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority filter; policy accept;\n\
             {refuse_ipv6}\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tiifname \"{EXIT_IFACE}\" oifname \"{tunnel}\" masquerade\n\
             \t}}\n\
             }}\n",
            tunnel = self.tunnel,
            exit6 = twin(EXIT_ADDRESS),
            local = self.local,
        )
    }

    /// The VXLAN interface (learning: it answers whichever node sent, with no list of nodes),
    /// forwarding, and the table, in the exit's namespace (the calling thread's).
    pub fn apply(&self) -> Result<(), Error> {
        let (vni, port, next_port, local) = (
            self.vni.to_string(),
            VXLAN_PORT.to_string(),
            (VXLAN_PORT + 1).to_string(),
            self.local.to_string(),
        );
        ensure_vxlan(
            EXIT_IFACE,
            &format!("vxlan id {vni} local {local} srcport {port} {next_port} "),
            &[
                "id", &vni, "local", &local, "dstport", &port, "srcport", &port, &next_port,
            ],
        )?;
        // Ahead of the agent's tunnel table (`RULE_PRIORITY`): the nodes' transit addresses
        // (client replies, probe answers) and the links' outer packets (nodes' addresses need
        // not be in the intranet) leave by the pod network, never into the tunnel.
        replace_rule(
            "-4",
            crate::RULE_PRIORITY - 2,
            &["to", TRANSIT_RANGE, "lookup", "main"],
            &format!("to {TRANSIT_RANGE} lookup main"),
        )?;
        replace_rule(
            "-4",
            crate::RULE_PRIORITY - 1,
            // By number: an image may have no /etc/protocols. `iif lo`: the exit's own packets
            // only, never a client's forwarded UDP from that port.
            &[
                "iif", "lo", "ipproto", "17", "sport", &port, "lookup", "main",
            ],
            &format!("iif lo ipproto 17 sport {port} lookup main"),
        )?;
        ip(&[
            "addr",
            "replace",
            &format!("{EXIT_ADDRESS}/{TRANSIT_PREFIX}"),
            "dev",
            EXIT_IFACE,
        ])?;
        sysctl("net.ipv4.ip_forward", "1")?;
        sysctl(&format!("net.ipv4.conf.{EXIT_IFACE}.rp_filter"), "0")?;
        // The IPv6 end of the links whenever the pod has IPv6, so a tunnel that starts to carry
        // it needs no new link; the forward chain lets IPv6 into the tunnel only when it does.
        if has_ipv6() {
            sysctl(&format!("net.ipv6.conf.{EXIT_IFACE}.disable_ipv6"), "0")?;
            add_ipv6(
                &format!("{}/{TRANSIT_PREFIX6}", twin(EXIT_ADDRESS)),
                EXIT_IFACE,
            )?;
            replace_rule(
                "-6",
                crate::RULE_PRIORITY - 2,
                &["to", TRANSIT_RANGE6, "lookup", "main"],
                &format!("to {TRANSIT_RANGE6} lookup main"),
            )?;
            if self.ipv6 {
                forward_ipv6()?;
            }
        }
        // Packet counts per flow, which a draining exit watches ([`FlowWatch`]). Without them
        // it reads the flows' timeouts, less surely: not a reason to carry no traffic.
        let _ = sysctl("net.netfilter.nf_conntrack_acct", "1");
        if let Some(mtu) = self.link_mtu {
            ip(&["link", "set", "dev", EXIT_IFACE, "mtu", &mtu.to_string()])?;
        }
        ip(&["link", "set", "dev", EXIT_IFACE, "up"])?;
        run("nft", &["-f", "-"], Some(self.render().as_bytes()))?;
        Ok(())
    }
}

/// The IPv4 and IPv6 flows of the exit's namespace (the calling thread's), as `conntrack -L`
/// lists them: what a draining exit watches ([`FlowWatch`]).
pub fn list_flows() -> Result<String, Error> {
    let mut flows = run("conntrack", &["-L", "-f", "ipv4"], None)?;
    if has_ipv6() {
        flows.push_str(&run("conntrack", &["-L", "-f", "ipv6"], None)?);
    }
    Ok(flows)
}

/// The clients' flows a draining exit still carries, watched over successive `conntrack -L`
/// listings: a flow is in use while it carried a packet within the quiet time. A packet shows
/// as a higher packet count (the exit turns conntrack accounting on) or, without counts, as its
/// remaining timeout moving other than by the clock. A flow first seen counts as just used.
#[derive(Debug, Default)]
pub struct FlowWatch {
    flows: std::collections::HashMap<String, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    packets: u64,
    remaining: u64,
    at: std::time::Instant,
    active: std::time::Instant,
}

impl FlowWatch {
    /// Takes in a listing made at `now`; returns how many client flows carried a packet within
    /// `quiet` of it. Client flows: from the nodes' transit range (either family), not to the
    /// exit's own DNS forwarder; TCP not yet closed (TIME_WAIT and CLOSE end by themselves) and
    /// UDP seen both ways.
    pub fn update(
        &mut self,
        listing: &str,
        now: std::time::Instant,
        quiet: std::time::Duration,
    ) -> usize {
        let transit: [IpNet; 2] = [TRANSIT_RANGE, TRANSIT_RANGE6].map(|range| {
            range
                .parse()
                .unwrap_or(IpNet::V4(ipnet::Ipv4Net::default()))
        });
        let exit = [IpAddr::V4(EXIT_ADDRESS), IpAddr::V6(twin(EXIT_ADDRESS))];
        let mut flows = std::collections::HashMap::new();
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let first = |key: &str| words.iter().find_map(|w| w.strip_prefix(key));
            let address = |key: &str| first(key).and_then(|v| v.parse::<IpAddr>().ok());
            let from_a_client = address("src=")
                .is_some_and(|a| transit.iter().any(|t| t.contains(&a)))
                && address("dst=").is_some_and(|a| !exit.contains(&a));
            let carried = match words.first() {
                Some(&"tcp") => !matches!(words.get(3), Some(&("TIME_WAIT" | "CLOSE"))),
                Some(&"udp") => words.contains(&"[ASSURED]"),
                _ => false,
            };
            if !from_a_client || !carried {
                continue;
            }
            let key = format!(
                "{} {} {} {} {}",
                words[0],
                first("src=").unwrap_or_default(),
                first("dst=").unwrap_or_default(),
                first("sport=").unwrap_or_default(),
                first("dport=").unwrap_or_default(),
            );
            let packets = words
                .iter()
                .filter_map(|w| w.strip_prefix("packets=")?.parse::<u64>().ok())
                .sum();
            let remaining = words
                .get(2)
                .and_then(|w| w.parse().ok())
                .unwrap_or_default();
            let active = match self.flows.get(&key) {
                None => now,
                Some(was) => {
                    let elapsed = now.saturating_duration_since(was.at).as_secs();
                    let moved = remaining > was.remaining
                        || remaining + elapsed + 1 < was.remaining
                        || packets > was.packets;
                    if moved { now } else { was.active }
                }
            };
            flows.insert(
                key,
                Seen {
                    packets,
                    remaining,
                    at: now,
                    active,
                },
            );
        }
        self.flows = flows;
        self.flows
            .values()
            .filter(|f| now.saturating_duration_since(f.active) < quiet)
            .count()
    }
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
            }],
            mss: 1360,
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
    fn each_gateways_clients_are_spread_over_that_gateways_exits_alone() {
        let mut two = plan(&[ExitUse::Healthy, ExitUse::Healthy, ExitUse::Healthy]);
        two.exits[2].gateway = 1;
        two.clients.push(ClientPort {
            iface: "ckg2".into(),
            address: Ipv4Addr::new(198, 18, 0, 3),
            gateway: 1,
        });
        two.clients.push(ClientPort {
            iface: "ckg3".into(),
            address: Ipv4Addr::new(198, 18, 0, 4),
            gateway: 2,
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
            "meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size > 1340 tcp option maxseg size set 1340",
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
        client.unprotected = true;
        assert!(!client.render().contains("reject"));
    }
}
