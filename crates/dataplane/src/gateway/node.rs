//! The node's side: its links to the exits (one VXLAN interface each), the routes and marks
//! that send each client's new flows to a healthy exit of its gateway, and the table that
//! balances them ([`NodePlan`]).

use super::*;

/// The priority of the rule that looks up [`CLIENTS_ROUTE_TABLE`] for what a link sends
/// ([`LINK_MARK`]), just ahead of the clients' range's own.
const LINK_RULE: u32 = CLIENTS_ROUTE_TABLE - 1;

/// Resets the flows carrying slot `slot`'s mark (a slot about to be taken by another exit).
pub fn reset_flows(slot: u8) -> Result<u32, Error> {
    delete_flows(mark(slot))
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
    /// TCP MSS clamped on its flows, both ways (NETNOTES trap 2): its own gateway's, so that a
    /// gateway with a small MTU (a deep chain's) lowers no other gateway's clients.
    pub mss: u16,
    /// The pod's own address (its primary interface's): an exit of its gateway may send it the
    /// connections of an inbound port, over the exit's link, with the remote's address kept.
    pub pod_ip: Option<Ipv4Addr>,
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
        // Inbound ports: an exit's link may open connections to its own gateway's clients only
        // (to their pod addresses, which the links' packets are routed to), each pinned to the
        // exit it came by, so that the replies go back through it.
        let mut inbound = String::new();
        for link in self.exits.iter().filter(|e| e.state != ExitUse::Dead) {
            let ifaces: Vec<String> = self
                .clients
                .iter()
                .filter(|c| c.gateway == link.gateway && c.pod_ip.is_some())
                .map(|c| format!("\"{}\"", c.iface))
                .collect();
            if ifaces.is_empty() {
                continue;
            }
            let _ = writeln!(
                inbound,
                "\t\tiifname \"{}\" oifname {{ {} }} meta nfproto ipv4 ct state new ct mark set {:#x} accept",
                link.iface(),
                ifaces.join(", "),
                mark(link.slot)
            );
        }
        // One set of clamps per MSS, over the clients whose gateways have it.
        let mut by_mss: std::collections::BTreeMap<u16, Vec<String>> =
            std::collections::BTreeMap::new();
        for client in &self.clients {
            by_mss
                .entry(client.mss)
                .or_default()
                .push(format!("\"{}\"", client.iface));
        }
        let mut clamp = String::new();
        for (mss, ifaces) in &by_mss {
            let set = format!("{{ {} }}", ifaces.join(", "));
            let links = format!("\"{LINK_PREFIX}*\"");
            for (from, to) in [(&set, &links), (&links, &set)] {
                for rule in clamps(*mss) {
                    let _ = writeln!(clamp, "\t\tiifname {from} oifname {to} {rule}");
                }
            }
        }
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
             \t\tiifname \"{LINK_PREFIX}*\" meta mark set {LINK_MARK:#x}\n\
             {refuse_v6}\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             {clamp}\
             {refuse_dead}\
             {inbound}\
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
        let _ = ip(&["-4", "rule", "del", "priority", &LINK_RULE.to_string()]);
        match run("nft", &["delete", "table", "inet", NODE_TABLE], None) {
            Err(Error::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            other => other.map(drop),
        }
    }
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
    // What comes by a link is routed by this table first: the clients' pod addresses (an
    // exit's inbound port) are here, routed to their veths.
    let link_mark = format!("{LINK_MARK:#x}/{TAG_MASK:#x}");
    replace_rule(
        "-4",
        LINK_RULE,
        &["fwmark", &link_mark, "lookup", &table],
        &format!("fwmark {link_mark} lookup {table}"),
    )?;
    let pods: Vec<(String, &ClientPort)> = clients
        .iter()
        .filter_map(|c| Some((c.pod_ip?.to_string(), c)))
        .collect();
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
            let pod = family == "-4" && pods.iter().any(|(ip, _)| *ip == dst);
            if !clients.iter().any(|c| address(c).to_string() == dst) && !pod && !dst.is_empty() {
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
    for (pod_ip, client) in &pods {
        let via = client.address.to_string();
        let routed = ip(&[
            "-4",
            "route",
            "replace",
            pod_ip,
            "via",
            &via,
            "dev",
            &client.iface,
            "onlink",
            "table",
            &table,
        ]);
        match routed {
            Ok(_) => {}
            Err(e) if !link_exists(&client.iface) => {
                tracing::warn!(iface = %client.iface, error = %e, "a client's interface is gone");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn delete_flows(mark: u32) -> Result<u32, Error> {
    delete_conntrack(&["-D", "--mark", &mark.to_string()])
}

/// Deletes the node's flows of a client that went (its address and its IPv6 twin): a client
/// given the same address later must not find them, marks and all.
pub fn forget_client_flows(address: Ipv4Addr) -> Result<u32, Error> {
    let v4 = delete_conntrack(&["-D", "-f", "ipv4", "-s", &address.to_string()])?;
    let v6 = if has_ipv6() {
        delete_conntrack(&["-D", "-f", "ipv6", "-s", &twin(address).to_string()])?
    } else {
        0
    };
    Ok(v4 + v6)
}

/// Runs `conntrack` with `args` (a deletion); how many entries it deleted.
fn delete_conntrack(args: &[&str]) -> Result<u32, Error> {
    // `conntrack -D` exits 1 when nothing matched; its stderr then says "0 flow entries".
    let out = std::process::Command::new("conntrack")
        .args(args)
        .output()
        .map_err(Error::io("conntrack -D"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .find(|(_, next)| *next == "flow")
        .and_then(|(n, _)| n.parse().ok())
        .ok_or_else(|| Error::Command {
            command: format!("conntrack {}", args.join(" ")),
            stderr: text.trim().to_owned(),
        })
}
