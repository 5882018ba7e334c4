//! A client pod's side: its interface to the node, its routes and its kill switch
//! ([`ClientPlan`]), and the cut-off that is all of it but the interface.

use super::*;

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
    /// The pod's own tunnel, when the pod is an exit whose tunnel runs through this gateway (a
    /// chain's hop): what it sends into that tunnel or to its own clients (its end of the links,
    /// [`EXIT_IFACE`]: probe answers, DNS answers) leaves by them, and its DNS is left as its
    /// own kill switch has it (its tunnel's resolver, the cluster DNS for cluster names),
    /// never sent to the node. Its own table rules those interfaces and its DNS.
    pub own_tunnel: Option<String>,
}

impl ClientPlan {
    /// Creates the client's veth pair from the node's namespace: `host_iface` stays on the
    /// node, its peer [`CLIENT_IFACE`] goes into the namespace at `netns` (a path).
    pub fn create_veth(host_iface: &str, netns: &str, mtu: u16) -> Result<(), Error> {
        let bytes = mtu;
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
        // The kernel keeps no IPv6 on a link under 1280 bytes (a deep chain's): IPv4 alone.
        if has_ipv6() && bytes >= 1280 {
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
        let own = self
            .own_tunnel
            .as_ref()
            .map_or_else(String::new, |t| format!(", \"{t}\", \"{EXIT_IFACE}\""));
        let exit = self.own_tunnel.is_some();
        // IPv6 DNS has no forwarder to go to: refused at once, so a resolver library moves on
        // to the next server instead of waiting.
        let dns_v6 = if self.unprotected || exit {
            String::new()
        } else {
            format!(
                "\t\toifname != \"lo\" meta nfproto ipv6 {DNS} reject with icmpx admin-prohibited\n"
            )
        };
        let dns_refused = if self.unprotected || exit {
            String::new()
        } else {
            // The filter hook still sees the interface the query was routed to before the
            // redirect (the primary one): the redirected queries are told by their address.
            format!(
                "\t\tip daddr {EXIT_ADDRESS} {DNS} accept\n\t\t{DNS} reject with icmpx admin-prohibited\n"
            )
        };
        let redirect = if exit {
            String::new()
        } else {
            format!("\t\tip daddr != 127.0.0.0/8 {DNS} dnat ip to {EXIT_ADDRESS}\n")
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
             {redirect}\
             \t}}\n\
             \tchain source {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"{CLIENT_IFACE}\" ip saddr != {CLIENT_RANGE} masquerade\n\
             \t\toifname \"{CLIENT_IFACE}\" ip6 saddr != {CLIENT_RANGE6} masquerade\n\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             {dns_v6}\
             \t\toifname {{ \"lo\", \"{CLIENT_IFACE}\"{own} }} accept\n\
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
            own_tunnel: None,
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
