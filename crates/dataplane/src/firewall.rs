//! The kill switch: one nftables table (`inet cloak`) rendered from a [`FirewallPolicy`] value,
//! replaced in one transaction (declare, delete, recreate: a load either applies whole or not at
//! all), then read back and checked rule by rule.
//!
//! Output and forward chains drop by default. What may leave: replies to connections that came
//! in, the VPN endpoints (only their address, transport and port), anything through the tunnel
//! interface (IPv6 only when the tunnel carries it), the bypass networks, and DNS only through
//! the tunnel to the one resolver. IPv6 neighbour discovery leaves in every phase, as ARP does:
//! it is link-local by construction and carries nothing of the pod's traffic.

use std::{
    fmt::{self, Write as _},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use ipnet::IpNet;

use crate::{Endpoint, Error, Identifiers, command::run};

/// Neighbour solicitations and advertisements, which leave in every phase.
const NEIGHBOUR_DISCOVERY: &str =
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept";

/// What may leave the namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallPolicy {
    /// VPN servers: reachable outside the tunnel.
    pub endpoints: Vec<Endpoint>,
    /// The tunnel interface; `None` blocks everything but the endpoints.
    pub tunnel: Option<String>,
    /// Let IPv6 through the tunnel (only when the tunnel carries it; otherwise IPv6 is dropped).
    pub tunnel_ipv6: bool,
    /// The one DNS server; DNS to any other address is dropped. DNS never leaves outside the
    /// tunnel, with or without it.
    pub dns: Option<IpAddr>,
    /// Networks reachable outside the tunnel (the cluster, a LAN).
    pub bypass: Vec<IpNet>,
    /// While the agent resolves VPN server names: DNS over UDP to this one server, only from
    /// sockets carrying the data plane's fwmark (the agent's own, see `dns`). Applications cannot set that
    /// mark without `CAP_NET_ADMIN`, so their DNS stays dropped.
    pub resolver: Option<IpAddr>,
    /// IPv4 TCP MSS to clamp forwarded SYNs to, in both directions (tunnel MTU - 40; NETNOTES
    /// trap 2). IPv6 SYNs are clamped 20 bytes lower (tunnel MTU - 60).
    pub clamp_mss: Option<u32>,
    /// Skip connection tracking for the tunnel's packets (plain ones on the tunnel interface,
    /// encrypted ones to and from the endpoints). Tracking them cost ~7 % of single-stream
    /// throughput in the benchmark, and nothing here needs it; it must stay off where traffic
    /// is NATed through the tunnel (a gateway), which needs the conntrack entries. Also while
    /// reconnecting (no tunnel interface): a tracked endpoint flow made the server's late
    /// packets to a dead client port a "connection that came in", and the kernel's ICMP
    /// port-unreachable its "reply", which the reply rule let out.
    pub notrack_tunnel: bool,
    /// A gateway exit's VXLAN links: UDP from and to this port leaves outside the tunnel (the
    /// outer packets to the nodes; what they carry is the exit's own table's business).
    pub link_port: Option<u16>,
    /// A gateway exit's forwarder asks this resolver (the cluster DNS, in the bypass networks)
    /// for cluster names: DNS to it leaves outside the tunnel, from this host only.
    pub intranet_resolver: Option<IpAddr>,
}

impl FirewallPolicy {
    /// Nothing leaves at all (no config, or a config that cannot be used).
    pub fn block_all() -> Self {
        Self::default()
    }

    /// The nftables script that replaces the agent's table with this policy.
    pub fn render(&self) -> String {
        self.render_for(&Identifiers::default())
    }

    /// The nftables script that replaces the table `ids` names with this policy.
    pub fn render_for(&self, ids: &Identifiers) -> String {
        let chains = self.chains_for(ids);
        let table = &ids.table;
        let mut s = format!(
            "table inet {table} {{\n}}\ndelete table inet {table}\ntable inet {table} {{\n"
        );
        for chain in &chains {
            let _ = writeln!(s, "\tchain {} {{", chain.name);
            if !chain.hook.is_empty() {
                let _ = writeln!(s, "\t\t{}", chain.hook);
            }
            for rule in &chain.rules {
                let _ = writeln!(s, "\t\t{rule}");
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        s
    }

    #[cfg(test)]
    fn chains(&self) -> Vec<Chain> {
        self.chains_for(&Identifiers::default())
    }

    fn chains_for(&self, ids: &Identifiers) -> Vec<Chain> {
        let dns = "meta l4proto { tcp, udp } th dport 53";
        // Into the tunnel: the hot path, so it is the second rule of each base chain. DNS only
        // to the one resolver; IPv6 only when the tunnel carries it.
        let mut tunnel = Vec::new();
        // A resolver of one family leaves no DNS of the other (an `ip daddr` match never sees
        // an IPv6 packet).
        match self.dns {
            Some(IpAddr::V4(r)) => tunnel.extend([
                format!("{dns} ip daddr != {r} drop"),
                format!("{dns} meta nfproto ipv6 drop"),
            ]),
            Some(IpAddr::V6(r)) => tunnel.extend([
                format!("{dns} ip6 daddr != {r} drop"),
                format!("{dns} meta nfproto ipv4 drop"),
            ]),
            None => {}
        }
        tunnel.push("meta nfproto ipv4 accept".to_owned());
        if self.tunnel_ipv6 {
            tunnel.push("meta nfproto ipv6 accept".to_owned());
        }
        let jump: Vec<String> = self
            .tunnel
            .iter()
            .map(|tun| format!("oifname \"{tun}\" jump tunnel"))
            .collect();
        // Outside the tunnel: never DNS (checked before the bypass networks), then the bypass.
        let mut outside = vec![format!("{dns} drop")];
        for net in &self.bypass {
            let family = if net.addr().is_ipv4() { "ip" } else { "ip6" };
            outside.push(format!("{family} daddr {net} accept"));
        }
        outside.push("counter drop".to_owned());
        // Replies to connections that came in (probes, the admin server, forwarded clients).
        // Only the reply direction: an outbound flow must never continue outside the tunnel
        // once the tunnel's route is gone.
        let replies = "ct state established,related ct direction reply accept".to_owned();

        let mut output = vec!["oifname \"lo\" accept".to_owned()];
        output.extend(jump.iter().cloned());
        output.push(replies.clone());
        // IPv6 neighbour discovery, the counterpart of ARP (which an inet table never sees):
        // without it an IPv6 endpoint or bypass network has no link-layer address to go to.
        // Hop limit 255 is what receivers require, so these never travel past the link.
        output.push(NEIGHBOUR_DISCOVERY.to_owned());
        if let Some(r) = self.resolver {
            let family = if r.is_ipv4() { "ip" } else { "ip6" };
            output.push(format!(
                "meta mark {:#x} {family} daddr {r} udp dport 53 accept",
                ids.fwmark
            ));
        }
        if let Some(port) = self.link_port {
            output.push(format!("udp sport {port} udp dport {port} accept"));
        }
        if let Some(r) = self.intranet_resolver {
            let family = if r.is_ipv4() { "ip" } else { "ip6" };
            output.push(format!("{family} daddr {r} {dns} accept"));
        }
        // The endpoints come before the DNS drop: some providers listen on port 53.
        for ep in &self.endpoints {
            let family = if ep.addr.is_ipv4() { "ip" } else { "ip6" };
            output.push(format!(
                "{family} daddr {} {} dport {} accept",
                ep.addr.ip(),
                ep.proto.as_str(),
                ep.addr.port()
            ));
        }
        output.extend(outside.iter().cloned());

        let mut forward = jump;
        forward.push(replies);
        forward.extend(outside);

        let mut chains = vec![
            Chain {
                name: "output",
                hook: "type filter hook output priority filter; policy drop;".into(),
                rules: output,
            },
            Chain {
                name: "forward",
                hook: "type filter hook forward priority filter; policy drop;".into(),
                rules: forward,
            },
        ];
        if self.notrack_tunnel && (self.tunnel.is_some() || !self.endpoints.is_empty()) {
            let mut out = Vec::new();
            let mut into = Vec::new();
            if let Some(tun) = &self.tunnel {
                out.push(format!("oifname \"{tun}\" notrack"));
                into.push(format!("iifname \"{tun}\" notrack"));
            }
            for ep in &self.endpoints {
                let (family, ip, proto, port) = (
                    if ep.addr.is_ipv4() { "ip" } else { "ip6" },
                    ep.addr.ip(),
                    ep.proto.as_str(),
                    ep.addr.port(),
                );
                out.push(format!("{family} daddr {ip} {proto} dport {port} notrack"));
                into.push(format!("{family} saddr {ip} {proto} sport {port} notrack"));
            }
            chains.push(Chain {
                name: "raw_output",
                hook: "type filter hook output priority raw; policy accept;".into(),
                rules: out,
            });
            chains.push(Chain {
                name: "raw_prerouting",
                hook: "type filter hook prerouting priority raw; policy accept;".into(),
                rules: into,
            });
        }
        if self.tunnel.is_some() {
            chains.push(Chain {
                name: "tunnel",
                hook: String::new(),
                rules: tunnel,
            });
        }
        if let (Some(tun), Some(mss)) = (&self.tunnel, self.clamp_mss) {
            chains.push(Chain {
                name: "clamp",
                hook: "type filter hook forward priority mangle; policy accept;".into(),
                // An IPv6 header is 20 bytes longer than an IPv4 one.
                rules: ["oifname", "iifname"]
                    .iter()
                    .flat_map(|dir| {
                        [("ipv4", mss), ("ipv6", mss.saturating_sub(20))].map(|(family, mss)| {
                            format!(
                                "{dir} \"{tun}\" meta nfproto {family} tcp flags syn tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
                            )
                        })
                    })
                    .collect(),
            });
        }
        chains
    }
}

struct Chain {
    name: &'static str,
    hook: String,
    rules: Vec<String>,
}

impl fmt::Display for FirewallPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.endpoints.is_empty()
            && self.tunnel.is_none()
            && self.bypass.is_empty()
            && self.resolver.is_none()
        {
            return f.write_str("block all");
        }
        write!(f, "allow endpoints [")?;
        for (i, ep) in self.endpoints.iter().enumerate() {
            write!(f, "{}{ep}", if i > 0 { ", " } else { "" })?;
        }
        f.write_str("]")?;
        match &self.tunnel {
            Some(t) => write!(
                f,
                ", tunnel {t} ({})",
                if self.tunnel_ipv6 {
                    "ipv4+ipv6"
                } else {
                    "ipv4, ipv6 blocked"
                }
            )?,
            None => f.write_str(", no tunnel")?,
        }
        if let Some(dns) = self.dns {
            write!(f, ", dns {dns} only")?;
        }
        if let Some(r) = self.resolver {
            write!(f, ", endpoint names via {r} (marked)")?;
        }
        if !self.bypass.is_empty() {
            let nets: Vec<String> = self.bypass.iter().map(ToString::to_string).collect();
            write!(f, ", bypass [{}]", nets.join(", "))?;
        }
        if let Some(mss) = self.clamp_mss {
            write!(f, ", mss {mss}")?;
        }
        if self.notrack_tunnel && self.tunnel.is_some() {
            f.write_str(", tunnel untracked")?;
        } else if self.notrack_tunnel && !self.endpoints.is_empty() {
            f.write_str(", endpoints untracked")?;
        }
        Ok(())
    }
}

/// Applies firewall policies to the kernel objects cloak owns.
pub trait Firewall: Send {
    /// Replaces the whole policy atomically and verifies it.
    fn apply(&mut self, policy: &FirewallPolicy) -> Result<(), Error>;
    /// Removes cloak's table, and nothing else.
    fn reset(&mut self) -> Result<(), Error>;
    /// Packets the output chain dropped so far, when known.
    fn blocked_packets(&mut self) -> Option<u64>;
}

/// The nftables implementation, on the table `ids` names.
#[derive(Debug, Default)]
pub struct Nftables {
    pub ids: Identifiers,
}

impl Firewall for Nftables {
    fn apply(&mut self, policy: &FirewallPolicy) -> Result<(), Error> {
        run(
            "nft",
            &["-f", "-"],
            Some(policy.render_for(&self.ids).as_bytes()),
        )?;
        verify(policy, &self.ids)
    }

    fn reset(&mut self) -> Result<(), Error> {
        match run("nft", &["delete", "table", "inet", &self.ids.table], None) {
            Err(Error::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            other => other.map(drop),
        }
    }

    fn blocked_packets(&mut self) -> Option<u64> {
        let listing = run(
            "nft",
            &["list", "chain", "inet", &self.ids.table, "output"],
            None,
        )
        .ok()?;
        listing
            .lines()
            .find(|l| l.contains("counter packets") && l.trim_end().ends_with("drop"))
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))
            .and_then(|n| n.parse().ok())
    }
}

/// Reads the table back and checks every chain holds exactly the rules rendered.
fn verify(policy: &FirewallPolicy, ids: &Identifiers) -> Result<(), Error> {
    let listing = run("nft", &["list", "table", "inet", &ids.table], None)?;
    for chain in policy.chains_for(ids) {
        let header = format!("chain {} {{", chain.name);
        let Some(start) = listing.find(&header) else {
            return Err(Error::Verify(format!(
                "nftables table {} has no chain {} after apply",
                ids.table, chain.name
            )));
        };
        let rules = listing[start + header.len()..]
            .lines()
            .map(str::trim)
            .take_while(|l| *l != "}")
            .filter(|l| !l.is_empty() && !l.starts_with("type "))
            .count();
        if rules != chain.rules.len() {
            return Err(Error::Verify(format!(
                "chain {} holds {rules} rules after apply, {} expected",
                chain.name,
                chain.rules.len()
            )));
        }
    }
    Ok(())
}

/// The in-memory fake: records every policy applied into a shared journal.
#[derive(Debug, Clone, Default)]
pub struct FakeFirewall {
    pub journal: Arc<Mutex<Vec<String>>>,
    /// Applying fails with this message while set.
    pub fail: Arc<Mutex<Option<String>>>,
}

impl Firewall for FakeFirewall {
    fn apply(&mut self, policy: &FirewallPolicy) -> Result<(), Error> {
        let fail = self.fail.lock().ok().and_then(|f| f.clone());
        if let Ok(mut j) = self.journal.lock() {
            j.push(match &fail {
                None => format!("firewall {policy}"),
                Some(_) => format!("firewall {policy} FAILED"),
            });
        }
        fail.map_or(Ok(()), |message| Err(Error::Verify(message)))
    }

    fn reset(&mut self) -> Result<(), Error> {
        if let Ok(mut j) = self.journal.lock() {
            j.push("firewall reset".into());
        }
        Ok(())
    }

    fn blocked_packets(&mut self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Proto;

    fn connected() -> FirewallPolicy {
        FirewallPolicy {
            endpoints: vec![Endpoint {
                addr: "192.0.2.2:51820".parse().unwrap(),
                proto: Proto::Udp,
            }],
            tunnel: Some("ck0".into()),
            tunnel_ipv6: false,
            dns: Some("10.64.0.1".parse().unwrap()),
            bypass: vec!["10.96.0.0/12".parse().unwrap()],
            clamp_mss: Some(1380),
            notrack_tunnel: true,
            link_port: None,
            intranet_resolver: None,
            resolver: None,
        }
    }

    #[test]
    fn block_all_lets_nothing_out_but_loopback_replies_and_neighbour_discovery() {
        let policy = FirewallPolicy::block_all();
        assert_eq!(policy.to_string(), "block all");
        let chains = policy.chains();
        assert_eq!(
            chains.iter().map(|c| c.name).collect::<Vec<_>>(),
            ["output", "forward"]
        );
        assert_eq!(
            chains[0].rules,
            [
                "oifname \"lo\" accept",
                "ct state established,related ct direction reply accept",
                NEIGHBOUR_DISCOVERY,
                "meta l4proto { tcp, udp } th dport 53 drop",
                "counter drop",
            ]
        );
        let script = policy.render();
        assert!(script.starts_with("table inet cloak {\n}\ndelete table inet cloak\n"));
        assert_eq!(script.matches("policy drop;").count(), 2);
    }

    #[test]
    fn connected_policy_allows_endpoint_tunnel_bypass_and_one_resolver() {
        let p = connected();
        let script = p.render();
        for rule in [
            "ip daddr 192.0.2.2 udp dport 51820 accept",
            "oifname \"ck0\" jump tunnel",
            "meta l4proto { tcp, udp } th dport 53 drop",
            "meta l4proto { tcp, udp } th dport 53 ip daddr != 10.64.0.1 drop",
            "\t\tmeta nfproto ipv4 accept",
            "ip daddr 10.96.0.0/12 accept",
            "iifname \"ck0\" meta nfproto ipv4 tcp flags syn tcp option maxseg size > 1380 tcp option maxseg size set 1380",
        ] {
            assert!(script.contains(rule), "missing {rule:?} in\n{script}");
        }
        assert!(
            !script.contains("nfproto ipv6 accept"),
            "IPv6 stays blocked"
        );
        assert_eq!(
            p.to_string(),
            "allow endpoints [192.0.2.2:51820/udp], tunnel ck0 (ipv4, ipv6 blocked), dns 10.64.0.1 only, bypass [10.96.0.0/12], mss 1380, tunnel untracked"
        );
        let v6 = FirewallPolicy {
            tunnel_ipv6: true,
            ..p
        };
        assert!(v6.render().contains("\t\tmeta nfproto ipv6 accept"));
    }

    #[test]
    fn inside_the_tunnel_dns_of_either_family_goes_only_to_the_resolver() {
        let v4_resolver = FirewallPolicy {
            tunnel_ipv6: true,
            ..connected()
        };
        let tunnel = |p: &FirewallPolicy| {
            p.chains()
                .into_iter()
                .find(|c| c.name == "tunnel")
                .unwrap()
                .rules
        };
        assert_eq!(
            tunnel(&v4_resolver)[..2],
            [
                "meta l4proto { tcp, udp } th dport 53 ip daddr != 10.64.0.1 drop",
                "meta l4proto { tcp, udp } th dport 53 meta nfproto ipv6 drop",
            ],
            "an IPv4 resolver: no IPv6 DNS at all"
        );
        let v6_resolver = FirewallPolicy {
            dns: Some("fd00::53".parse().unwrap()),
            ..v4_resolver
        };
        assert_eq!(
            tunnel(&v6_resolver)[..2],
            [
                "meta l4proto { tcp, udp } th dport 53 ip6 daddr != fd00::53 drop",
                "meta l4proto { tcp, udp } th dport 53 meta nfproto ipv4 drop",
            ],
            "an IPv6 resolver: no IPv4 DNS at all"
        );
    }

    #[test]
    fn while_resolving_only_the_agents_marked_queries_reach_the_one_resolver() {
        let resolving = FirewallPolicy {
            tunnel: None,
            dns: None,
            bypass: vec!["10.96.0.0/12".parse().unwrap()],
            clamp_mss: None,
            resolver: Some("10.96.0.10".parse().unwrap()),
            ..connected()
        };
        let output = &resolving.chains()[0].rules;
        let allow = "meta mark 0x436c ip daddr 10.96.0.10 udp dport 53 accept";
        let at = |rule: &str| output.iter().position(|r| r == rule).unwrap();
        assert!(
            at(allow) < at("meta l4proto { tcp, udp } th dport 53 drop"),
            "{output:?}"
        );
        assert!(
            resolving
                .to_string()
                .contains("endpoint names via 10.96.0.10 (marked)")
        );
        assert!(
            !connected().render().contains("meta mark"),
            "only while resolving"
        );
    }

    /// Another set of identifiers (a gateway's second exit) renders into a table of its own
    /// with its own mark. (Running both side by side needs more: see docs/architecture.md.)
    #[test]
    fn identifiers_name_the_table_and_the_mark() {
        let exit = Identifiers {
            table: "cloak_exit1".into(),
            fwmark: 0x436d,
            route_table: 17_261,
            rule_priority: 17_262,
        };
        let policy = FirewallPolicy {
            resolver: Some("10.96.0.10".parse().unwrap()),
            ..connected()
        };
        let script = policy.render_for(&exit);
        assert!(script.starts_with(
            "table inet cloak_exit1 {\n}\ndelete table inet cloak_exit1\ntable inet cloak_exit1 {\n"
        ));
        assert!(!script.contains("inet cloak {"), "{script}");
        assert!(script.contains("meta mark 0x436d ip daddr 10.96.0.10 udp dport 53 accept"));
        assert!(policy.render().contains("meta mark 0x436c "));
    }

    #[test]
    fn forwarded_syns_are_clamped_per_family() {
        let p = FirewallPolicy {
            tunnel_ipv6: true,
            ..connected()
        };
        let clamp = p
            .chains()
            .into_iter()
            .find(|c| c.name == "clamp")
            .unwrap()
            .rules;
        assert_eq!(
            clamp,
            [
                "oifname \"ck0\" meta nfproto ipv4 tcp flags syn tcp option maxseg size > 1380 tcp option maxseg size set 1380",
                "oifname \"ck0\" meta nfproto ipv6 tcp flags syn tcp option maxseg size > 1360 tcp option maxseg size set 1360",
                "iifname \"ck0\" meta nfproto ipv4 tcp flags syn tcp option maxseg size > 1380 tcp option maxseg size set 1380",
                "iifname \"ck0\" meta nfproto ipv6 tcp flags syn tcp option maxseg size > 1360 tcp option maxseg size set 1360",
            ],
            "an IPv6 header is 20 bytes longer than an IPv4 one"
        );
    }

    #[test]
    fn endpoint_traffic_is_untracked_also_while_there_is_no_tunnel() {
        let reconnecting = FirewallPolicy {
            tunnel: None,
            dns: None,
            bypass: Vec::new(),
            clamp_mss: None,
            ..connected()
        };
        let chains = reconnecting.chains();
        let raw: Vec<&Vec<String>> = chains
            .iter()
            .filter(|c| c.name.starts_with("raw_"))
            .map(|c| &c.rules)
            .collect();
        assert_eq!(
            raw,
            [
                &vec!["ip daddr 192.0.2.2 udp dport 51820 notrack".to_owned()],
                &vec!["ip saddr 192.0.2.2 udp sport 51820 notrack".to_owned()],
            ]
        );
        assert!(
            reconnecting
                .to_string()
                .ends_with(", no tunnel, endpoints untracked")
        );
    }

    #[test]
    fn dns_is_checked_before_anything_that_accepts_it() {
        let script = connected().render();
        let at = |needle: &str| script.find(needle).unwrap_or_else(|| panic!("{needle}"));
        // Outside the tunnel: the endpoints (some listen on 53), then no DNS, then the bypass.
        assert!(at("udp dport 51820 accept") < at("th dport 53 drop"));
        assert!(at("th dport 53 drop") < at("ip daddr 10.96.0.0/12 accept"));
        // Inside: only to the resolver, checked before the accept.
        let tunnel = at("chain tunnel");
        assert!(tunnel < at("th dport 53 ip daddr != 10.64.0.1 drop"));
        assert!(at("th dport 53 ip daddr != 10.64.0.1 drop") < at("\t\tmeta nfproto ipv4 accept"));
    }
}
