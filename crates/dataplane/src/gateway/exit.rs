//! An exit's side: its end of the links, forwarding into its tunnel, the health answers the
//! nodes probe ([`ExitPlan`]), and the sysctls the node sets in its namespace.

use super::{
    DNS, EXIT_ADDRESS, EXIT_IFACE, EXIT_TABLE, Error, INBOUND_ROUTE_TABLE, IpAddr, Ipv4Addr,
    NEIGHBOUR_DISCOVERY, TRANSIT_PREFIX, TRANSIT_PREFIX6, TRANSIT_RANGE, TRANSIT_RANGE6,
    VXLAN_PORT, add_ipv6, clamps, ensure_vxlan, forward_ipv6, has_ipv6, ip, refuse_ipv6,
    replace_rule, run, sysctl, twin,
};

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
             \t\tiifname \"{tunnel}\" oifname \"eth0\" ct status dnat accept\n\
             \t\tiifname \"eth0\" oifname \"{tunnel}\" ct status dnat accept\n\
             \t\tiifname \"{tunnel}\" oifname \"{EXIT_IFACE}\" ct status dnat accept\n\
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

/// Routes each backend of the exit's inbound ports (a client pod of its gateway) by way of its
/// node's transit address over the links, in a table of their own ([`INBOUND_ROUTE_TABLE`])
/// looked up ahead of the tunnel's for what arrives by the tunnel `tunnel` (the connections
/// its DNAT rules turned to the pods; nothing of the exit's own), replacing what that table
/// held. `backends` are (pod address, node transit address) pairs.
pub fn route_inbound(tunnel: &str, backends: &[(Ipv4Addr, Ipv4Addr)]) -> Result<(), Error> {
    let table = INBOUND_ROUTE_TABLE.to_string();
    replace_rule(
        "-4",
        crate::RULE_PRIORITY - 3,
        &["iif", tunnel, "lookup", &table],
        &format!("iif {tunnel} lookup {table}"),
    )?;
    // An empty table does not exist for `ip route show`: nothing to remove then.
    let listing = ip(&["-4", "route", "show", "table", &table]).unwrap_or_default();
    for line in listing.lines() {
        let dst = line.split_whitespace().next().unwrap_or_default();
        if !dst.is_empty() && !backends.iter().any(|(a, _)| a.to_string() == dst) {
            ip(&["-4", "route", "del", dst, "table", &table])?;
        }
    }
    for (address, node) in backends {
        ip(&[
            "-4",
            "route",
            "replace",
            &address.to_string(),
            "via",
            &node.to_string(),
            "dev",
            EXIT_IFACE,
            "onlink",
            "table",
            &table,
        ])?;
    }
    Ok(())
}
