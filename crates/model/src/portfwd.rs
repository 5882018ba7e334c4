//! Host port forwarding, pure: Service annotations and Nodes in, one nftables ruleset out.
//!
//! Seed 003 (Epok) drove iptables from `epok.getbetter.ro/*` annotations. cloak reads its own
//! `cloak.dev/*` names and Epok's, exactly as Epok documents them, so an Epok user's Services
//! work unchanged:
//! - `cloak.dev/external-ports` or `epok.getbetter.ro/externalports`: `"22:2022,53:8053:udp"`,
//!   host port 22 to the Service's port 2022 (through its NodePort), host port 53/udp to its
//!   port 8053.
//! - `cloak.dev/internal` or `epok.getbetter.ro/internal`: not reachable through the external
//!   interface.
//! - `cloak.dev/allow-range` or `epok.getbetter.ro/allow-range`: `"203.0.113.0/24"`, only that
//!   source range may connect.
//! - Nodes with the `cloak.dev/exclude` annotation or label, the `epok.getbetter.ro/exclude`
//!   annotation or the `epok_exclude` label, or not Ready, receive nothing.
//!
//! Each setting is read from its `cloak.dev` name when present, from Epok's otherwise; a Service
//! whose two names disagree is a [`Conflict`] (an Event), and the `cloak.dev` one is used.
//! Annotations are parsed once into typed values; a Service with a bad annotation yields an
//! error for that Service and is left out, the others are still forwarded. The ruleset is one
//! table cloak owns outright, rendered so that loading it replaces the table atomically.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

pub const ANNOTATION_PORTS: &str = "cloak.dev/external-ports";
pub const ANNOTATION_INTERNAL: &str = "cloak.dev/internal";
pub const ANNOTATION_ALLOW: &str = "cloak.dev/allow-range";
pub const EXCLUDE: &str = "cloak.dev/exclude";
/// Epok's names for the same settings (seed 003), read when the `cloak.dev` one is absent.
pub const EPOK_PORTS: &str = "epok.getbetter.ro/externalports";
pub const EPOK_INTERNAL: &str = "epok.getbetter.ro/internal";
pub const EPOK_ALLOW: &str = "epok.getbetter.ro/allow-range";
/// Epok excludes a node by this annotation (any value) or by the label [`EPOK_EXCLUDE_LABEL`].
pub const EPOK_EXCLUDE: &str = "epok.getbetter.ro/exclude";
pub const EPOK_EXCLUDE_LABEL: &str = "epok_exclude";
/// The nftables table cloak owns (family `ip`); nothing else is ever touched.
pub const TABLE: &str = "cloak_portfwd";
/// The iptables chains cloak owns (nat and filter), for hosts without nft.
pub const CHAIN_NAT: &str = "CLOAK-PORTFWD";
pub const CHAIN_FORWARD: &str = "CLOAK-PORTFWD-FWD";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One `external:service-port[:udp]` term of `cloak.dev/external-ports`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub external: u16,
    pub service_port: u16,
    pub protocol: Protocol,
}

/// An IPv4 CIDR, normalized (host bits must be zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a Service's annotations cannot be used. Becomes an Event on that Service, prefixed with
/// the annotation it was read from ([`Rejected::message`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("{term:?} is not external:port or external:port:udp")]
    Term { term: String },
    #[error("{port:?} is not a port number from 1 to 65535")]
    Port { port: String },
    #[error("protocol {0:?} is not tcp or udp")]
    Protocol(String),
    #[error("external port {0} is listed twice")]
    Duplicate(String),
    #[error("{0:?} is not an IPv4 CIDR like 203.0.113.0/24")]
    Cidr(String),
    #[error("{0} has host bits set (did you mean {1}?)")]
    HostBits(String, Ipv4Cidr),
    #[error("service has no port {port}/{protocol} with a nodePort (is it of type NodePort?)")]
    NoNodePort { port: u16, protocol: Protocol },
}

fn port(text: &str) -> Result<u16, AnnotationError> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| AnnotationError::Port { port: text.into() })
}

/// Parses a port list (`cloak.dev/external-ports`, `epok.getbetter.ro/externalports`).
pub fn parse_ports(value: &str) -> Result<Vec<PortMapping>, AnnotationError> {
    let mut mappings: Vec<PortMapping> = Vec::new();
    for term in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let parts: Vec<&str> = term.split(':').collect();
        let protocol = match parts.get(2).map(|p| p.trim().to_ascii_lowercase()) {
            None => Protocol::Tcp,
            Some(p) if p == "tcp" => Protocol::Tcp,
            Some(p) if p == "udp" => Protocol::Udp,
            Some(p) => return Err(AnnotationError::Protocol(p)),
        };
        if !(2..=3).contains(&parts.len()) {
            return Err(AnnotationError::Term { term: term.into() });
        }
        let mapping = PortMapping {
            external: port(parts[0])?,
            service_port: port(parts[1])?,
            protocol,
        };
        if mappings
            .iter()
            .any(|m| m.external == mapping.external && m.protocol == mapping.protocol)
        {
            return Err(AnnotationError::Duplicate(format!(
                "{}/{}",
                mapping.external, protocol
            )));
        }
        mappings.push(mapping);
    }
    if mappings.is_empty() {
        return Err(AnnotationError::Term { term: value.into() });
    }
    Ok(mappings)
}

impl FromStr for Ipv4Cidr {
    type Err = AnnotationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || AnnotationError::Cidr(text.into());
        let (addr, prefix) = text.trim().split_once('/').unwrap_or((text.trim(), "32"));
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(AnnotationError::HostBits(
                text.into(),
                Self {
                    addr: network,
                    prefix,
                },
            ));
        }
        Ok(Self { addr, prefix })
    }
}

/// What the forwarder needs of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInput {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    /// `(port, protocol) -> nodePort` from `spec.ports`.
    pub node_ports: BTreeMap<(u16, Protocol), u16>,
}

/// What the forwarder needs of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInput {
    pub name: String,
    pub ready: bool,
    pub excluded: bool,
    pub internal_ip: Option<Ipv4Addr>,
}

/// Forwarder settings (flags of `cloak portfwd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Interfaces traffic is forwarded from.
    pub interfaces: Vec<String>,
    /// Internal services are not reachable through this one.
    pub external_interface: Option<String>,
}

/// One forwarded port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    pub protocol: Protocol,
    pub external: u16,
    pub node_port: u16,
    pub internal: bool,
    pub allow: Option<Ipv4Cidr>,
    /// `namespace/name`, for the rule comment.
    pub service: String,
}

/// The desired state: every forward and the nodes traffic is spread over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub options: Options,
    pub nodes: Vec<Ipv4Addr>,
    pub forwards: Vec<Forward>,
}

/// A Service left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub namespace: String,
    pub name: String,
    /// The annotation the faulty setting was read from (a `cloak.dev` name or Epok's).
    pub annotation: &'static str,
    pub error: AnnotationError,
}

impl Rejected {
    /// What the Event on the Service says: the annotation, then what is wrong with it.
    pub fn message(&self) -> String {
        format!("{}: {}", self.annotation, self.error)
    }
}

/// A Service that sets one setting under both names, to different values: the `cloak.dev` one
/// is used, and an Event on the Service says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub namespace: String,
    pub name: String,
    /// The `cloak.dev` annotation, used.
    pub used: &'static str,
    pub used_value: String,
    /// Epok's annotation, ignored.
    pub ignored: &'static str,
    pub ignored_value: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An Event's note holds at most 1 KiB: long values are cut.
        let cut = |v: &str| -> String {
            if v.chars().count() > 200 {
                format!("{}...", v.chars().take(200).collect::<String>())
            } else {
                v.to_owned()
            }
        };
        write!(
            f,
            "{} ({:?}) and {} ({:?}) disagree: {} is used",
            self.used,
            cut(&self.used_value),
            self.ignored,
            cut(&self.ignored_value),
            self.used
        )
    }
}

/// One setting's `cloak.dev` name and Epok's.
const SETTINGS: [(&str, &str); 3] = [
    (ANNOTATION_PORTS, EPOK_PORTS),
    (ANNOTATION_INTERNAL, EPOK_INTERNAL),
    (ANNOTATION_ALLOW, EPOK_ALLOW),
];

/// The annotation a setting is read from and its value: the `cloak.dev` name when present,
/// Epok's otherwise.
fn read<'a>(
    annotations: &'a BTreeMap<String, String>,
    (cloak, epok): (&'static str, &'static str),
) -> Option<(&'static str, &'a str)> {
    annotations
        .get(cloak)
        .map(|v| (cloak, v.as_str()))
        .or_else(|| annotations.get(epok).map(|v| (epok, v.as_str())))
}

/// Whether two values of one setting mean the same: equal once parsed (port lists in any
/// order), or equal as text. `internal` is read by presence, so any two values agree.
fn agree(cloak: &str, a: &str, b: &str) -> bool {
    if a.trim() == b.trim() {
        return true;
    }
    match cloak {
        ANNOTATION_PORTS => match (parse_ports(a), parse_ports(b)) {
            (Ok(mut a), Ok(mut b)) => {
                let key = |m: &PortMapping| (m.protocol, m.external, m.service_port);
                a.sort_by_key(key);
                b.sort_by_key(key);
                a == b
            }
            _ => false,
        },
        ANNOTATION_INTERNAL => true,
        _ => matches!((a.parse::<Ipv4Cidr>(), b.parse::<Ipv4Cidr>()), (Ok(a), Ok(b)) if a == b),
    }
}

/// Services to forward (a port list under either name) whose `cloak.dev` and Epok annotations
/// of one setting disagree, in namespace/name order.
pub fn conflicts(services: &[ServiceInput]) -> Vec<Conflict> {
    let mut found: Vec<Conflict> = services
        .iter()
        .filter(|s| read(&s.annotations, SETTINGS[0]).is_some())
        .flat_map(|s| {
            SETTINGS.iter().filter_map(move |&(cloak, epok)| {
                let (used, ignored) = (s.annotations.get(cloak)?, s.annotations.get(epok)?);
                (!agree(cloak, used, ignored)).then(|| Conflict {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    used: cloak,
                    used_value: used.clone(),
                    ignored: epok,
                    ignored_value: ignored.clone(),
                })
            })
        })
        .collect();
    found.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    found
}

/// Whether a node is left out: the `cloak.dev/exclude` annotation or label, Epok's
/// `epok.getbetter.ro/exclude` annotation (any value) or its `epok_exclude` label.
pub fn excluded(annotations: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    annotations.contains_key(EXCLUDE)
        || labels.contains_key(EXCLUDE)
        || annotations.contains_key(EPOK_EXCLUDE)
        || labels.contains_key(EPOK_EXCLUDE_LABEL)
}

/// (services, nodes, options) → desired ruleset, plus the Services left out with their reason.
/// External ports claimed by two Services go to the first in namespace/name order; the other is
/// rejected.
pub fn desired(
    services: &[ServiceInput],
    nodes: &[NodeInput],
    options: &Options,
) -> (Ruleset, Vec<Rejected>) {
    let mut nodes: Vec<Ipv4Addr> = nodes
        .iter()
        .filter(|n| n.ready && !n.excluded)
        .filter_map(|n| n.internal_ip)
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut sorted: Vec<&ServiceInput> = services
        .iter()
        .filter(|s| read(&s.annotations, SETTINGS[0]).is_some())
        .collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut forwards: Vec<Forward> = Vec::new();
    let mut rejected = Vec::new();
    for service in sorted {
        match service_forwards(service) {
            Ok(mine) => {
                let clash = mine.iter().find(|f| {
                    forwards
                        .iter()
                        .any(|o| o.external == f.external && o.protocol == f.protocol)
                });
                match clash {
                    Some(f) => rejected.push(Rejected {
                        namespace: service.namespace.clone(),
                        name: service.name.clone(),
                        annotation: read(&service.annotations, SETTINGS[0])
                            .map_or(ANNOTATION_PORTS, |(key, _)| key),
                        error: AnnotationError::Duplicate(format!(
                            "{}/{} (already forwarded for another Service)",
                            f.external, f.protocol
                        )),
                    }),
                    None => forwards.extend(mine),
                }
            }
            Err((annotation, error)) => rejected.push(Rejected {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                annotation,
                error,
            }),
        }
    }
    forwards.sort();
    (
        Ruleset {
            options: options.clone(),
            nodes,
            forwards,
        },
        rejected,
    )
}

/// A Service's forwards, or the annotation at fault and why.
fn service_forwards(
    service: &ServiceInput,
) -> Result<Vec<Forward>, (&'static str, AnnotationError)> {
    let (ports_key, ports) =
        read(&service.annotations, SETTINGS[0]).unwrap_or((ANNOTATION_PORTS, ""));
    let mappings = parse_ports(ports).map_err(|e| (ports_key, e))?;
    let internal = read(&service.annotations, SETTINGS[1]).is_some();
    let allow = read(&service.annotations, SETTINGS[2])
        .map(|(key, value)| match value.parse::<Ipv4Cidr>() {
            // Epok handed the range to `iptables -s`, which clears host bits: so does cloak for
            // Epok's name (its own name refuses them, naming the network meant).
            Err(AnnotationError::HostBits(_, network)) if key == EPOK_ALLOW => Ok(network),
            other => other.map_err(|e| (key, e)),
        })
        .transpose()?;
    mappings
        .into_iter()
        .map(|m| {
            let node_port = *service
                .node_ports
                .get(&(m.service_port, m.protocol))
                .ok_or((
                    ports_key,
                    AnnotationError::NoNodePort {
                        port: m.service_port,
                        protocol: m.protocol,
                    },
                ))?;
            Ok(Forward {
                protocol: m.protocol,
                external: m.external,
                node_port,
                internal,
                allow,
                service: format!("{}/{}", service.namespace, service.name),
            })
        })
        .collect()
}

/// The nft script that removes cloak's table (declaring it first, so it also succeeds when the
/// table is absent) and touches nothing else.
pub fn clean_script() -> String {
    format!("table ip {TABLE} {{\n}}\ndelete table ip {TABLE}\n")
}

impl Ruleset {
    /// Forwards restricted by interface or source: one rule each, checked before the maps.
    fn restricted(&self) -> impl Iterator<Item = &Forward> {
        self.forwards
            .iter()
            .filter(|f| f.internal || f.allow.is_some())
    }

    /// Map elements of the unrestricted forwards: `(protocol, "i . dport", "node . nodePort")`,
    /// one per node, so `numgen inc mod N` spreads new connections over the nodes.
    fn elements(&self) -> BTreeSet<(Protocol, String, String)> {
        self.forwards
            .iter()
            .filter(|f| !f.internal && f.allow.is_none())
            .flat_map(|f| {
                self.nodes.iter().enumerate().map(move |(i, node)| {
                    (
                        f.protocol,
                        format!("{i} . {}", f.external),
                        format!("{node} . {}", f.node_port),
                    )
                })
            })
            .collect()
    }

    /// The nft script that replaces cloak's table in one transaction: the table is declared
    /// (so the delete never fails), deleted, and written anew, all in one `nft -f` run.
    ///
    /// Unrestricted forwards are elements of two maps (`fwd_tcp`, `fwd_udp`) keyed by
    /// `numgen inc mod N . dport`: thousands of forwards are thousands of map elements, not
    /// thousands of rules, and changing one Service changes only its elements ([`Ruleset::update_from`]).
    pub fn to_nft(&self) -> String {
        use std::fmt::Write as _;
        let mut out = clean_script();
        let _ = writeln!(out, "table ip {TABLE} {{");
        let n = self.nodes.len().max(1);
        let elements = self.elements();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let _ = writeln!(
                out,
                "\tmap fwd_{protocol} {{\n\t\ttypeof numgen inc mod {n} . {protocol} dport : ip daddr . {protocol} dport"
            );
            let mine: Vec<String> = elements
                .iter()
                .filter(|e| e.0 == protocol)
                .map(|(_, k, v)| format!("{k} : {v}"))
                .collect();
            if !mine.is_empty() {
                let _ = writeln!(out, "\t\telements = {{ {} }}", mine.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
        let _ = writeln!(
            out,
            "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;"
        );
        let ifaces = set(self.options.interfaces.iter().map(|i| format!("\"{i}\"")));
        if !self.nodes.is_empty() {
            for f in self.restricted() {
                let mut rule = format!("\t\tiifname {ifaces}");
                if let (true, Some(ext)) = (f.internal, &self.options.external_interface) {
                    let _ = write!(rule, " iifname != \"{ext}\"");
                }
                if let Some(cidr) = f.allow {
                    let _ = write!(rule, " ip saddr {cidr}");
                }
                let targets: Vec<String> = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, node)| format!("{i} : {node} . {}", f.node_port))
                    .collect();
                let _ = writeln!(
                    rule,
                    " {} dport {} dnat ip to numgen inc mod {n} map {{ {} }} comment \"{}\"",
                    f.protocol,
                    f.external,
                    targets.join(", "),
                    f.service
                );
                out.push_str(&rule);
            }
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let _ = writeln!(
                    out,
                    "\t\tiifname {ifaces} dnat ip to numgen inc mod {n} . {protocol} dport map @fwd_{protocol}"
                );
            }
        }
        let _ = writeln!(
            out,
            "\t}}\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;"
        );
        let _ = writeln!(out, "\t\tct status dnat accept\n\t}}\n}}");
        out
    }

    /// The `iptables-restore --noflush` input that rewrites cloak's own chains (declared, so
    /// created if absent, and flushed) in one commit per table; other chains are not named.
    /// Connections are spread with `statistic --mode nth`: with N nodes, rule i takes every
    /// (N - i)-th connection that reaches it, so each node gets 1/N.
    pub fn to_iptables_restore(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!("*nat\n:{CHAIN_NAT} - [0:0]\n-F {CHAIN_NAT}\n");
        let n = self.nodes.len();
        for f in &self.forwards {
            for iface in &self.options.interfaces {
                if f.internal && self.options.external_interface.as_deref() == Some(iface.as_str())
                {
                    continue;
                }
                for (i, node) in self.nodes.iter().enumerate() {
                    let mut rule = format!(
                        "-A {CHAIN_NAT} -i {iface} -p {} --dport {}",
                        f.protocol, f.external
                    );
                    if let Some(cidr) = f.allow {
                        let _ = write!(rule, " -s {cidr}");
                    }
                    if i + 1 < n {
                        let _ = write!(
                            rule,
                            " -m statistic --mode nth --every {} --packet 0",
                            n - i
                        );
                    }
                    let _ = writeln!(
                        rule,
                        " -m comment --comment \"{}\" -j DNAT --to-destination {node}:{}",
                        f.service, f.node_port
                    );
                    out.push_str(&rule);
                }
            }
        }
        let _ = write!(
            out,
            "COMMIT\n*filter\n:{CHAIN_FORWARD} - [0:0]\n-F {CHAIN_FORWARD}\n-A {CHAIN_FORWARD} -m conntrack --ctstate DNAT -j ACCEPT\nCOMMIT\n"
        );
        out
    }

    /// The smallest transaction taking `old` (the ruleset in place) to `self`: when only
    /// unrestricted forwards changed, just their map elements are deleted and added; otherwise
    /// `None`, and the caller loads [`Ruleset::to_nft`].
    pub fn update_from(&self, old: &Self) -> Option<String> {
        use std::fmt::Write as _;
        let same_shape = self.options == old.options
            && self.nodes == old.nodes
            && self.restricted().eq(old.restricted())
            // A port that moves between restricted and unrestricted changes the rules.
            && !self.nodes.is_empty();
        if !same_shape {
            return None;
        }
        let (new, before) = (self.elements(), old.elements());
        let mut out = String::new();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let gone: Vec<&String> = before
                .difference(&new)
                .filter(|e| e.0 == protocol)
                .map(|e| &e.1)
                .collect();
            let added: Vec<String> = new
                .difference(&before)
                .filter(|e| e.0 == protocol)
                .map(|(_, k, v)| format!("{k} : {v}"))
                .collect();
            if !gone.is_empty() {
                let keys: Vec<&str> = gone.iter().map(|k| k.as_str()).collect();
                let _ = writeln!(
                    out,
                    "delete element ip {TABLE} fwd_{protocol} {{ {} }}",
                    keys.join(", ")
                );
            }
            if !added.is_empty() {
                let _ = writeln!(
                    out,
                    "add element ip {TABLE} fwd_{protocol} {{ {} }}",
                    added.join(", ")
                );
            }
        }
        Some(out)
    }
}

fn set(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(
        name: &str,
        annotations: &[(&str, &str)],
        ports: &[(u16, Protocol, u16)],
    ) -> ServiceInput {
        ServiceInput {
            namespace: "default".into(),
            name: name.into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            node_ports: ports
                .iter()
                .map(|(p, proto, np)| ((*p, *proto), *np))
                .collect(),
        }
    }

    fn node(name: &str, ip: [u8; 4], ready: bool, excluded: bool) -> NodeInput {
        NodeInput {
            name: name.into(),
            ready,
            excluded,
            internal_ip: Some(ip.into()),
        }
    }

    fn options() -> Options {
        Options {
            interfaces: vec!["eth0".into(), "wg0".into()],
            external_interface: Some("eth0".into()),
        }
    }

    #[test]
    fn epok_style_port_lists_parse() {
        let parsed = parse_ports("22:2022, 53:8053:udp").unwrap();
        assert_eq!(
            parsed[0],
            PortMapping {
                external: 22,
                service_port: 2022,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(
            parsed[1],
            PortMapping {
                external: 53,
                service_port: 8053,
                protocol: Protocol::Udp
            }
        );
        assert_eq!(parse_ports("80:8080").unwrap().len(), 1);
    }

    #[test]
    fn bad_port_lists_say_what_is_wrong() {
        assert!(matches!(
            parse_ports("22"),
            Err(AnnotationError::Term { .. })
        ));
        assert!(matches!(
            parse_ports("22:70000"),
            Err(AnnotationError::Port { .. })
        ));
        assert!(matches!(
            parse_ports("0:22"),
            Err(AnnotationError::Port { .. })
        ));
        assert!(matches!(
            parse_ports("22:22:sctp"),
            Err(AnnotationError::Protocol(_))
        ));
        assert!(matches!(
            parse_ports("22:1,22:2"),
            Err(AnnotationError::Duplicate(_))
        ));
        assert!(
            parse_ports("53:1:udp,53:1").is_ok(),
            "same port, different protocols"
        );
        assert!(matches!(parse_ports(""), Err(AnnotationError::Term { .. })));
    }

    #[test]
    fn cidrs_must_be_networks() {
        assert_eq!("10.0.0.0/8".parse::<Ipv4Cidr>().unwrap().prefix, 8);
        assert_eq!("192.0.2.7".parse::<Ipv4Cidr>().unwrap().prefix, 32);
        assert!(matches!(
            "10.0.0.1/8".parse::<Ipv4Cidr>(),
            Err(AnnotationError::HostBits(..))
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Cidr>(),
            Err(AnnotationError::Cidr(_))
        ));
    }

    #[test]
    fn only_ready_nodes_that_are_not_excluded_receive_traffic() {
        let nodes = [
            node("a", [10, 0, 0, 2], true, false),
            node("b", [10, 0, 0, 3], false, false),
            node("c", [10, 0, 0, 4], true, true),
        ];
        let (ruleset, _) = desired(&[], &nodes, &options());
        assert_eq!(ruleset.nodes, [Ipv4Addr::new(10, 0, 0, 2)]);
    }

    #[test]
    fn a_bad_service_is_rejected_and_the_others_are_forwarded() {
        let services = [
            service(
                "ssh",
                &[(ANNOTATION_PORTS, "22:2022")],
                &[(2022, Protocol::Tcp, 30022)],
            ),
            service("broken", &[(ANNOTATION_PORTS, "22")], &[]),
            service("no-nodeport", &[(ANNOTATION_PORTS, "80:8080")], &[]),
            service("plain", &[], &[(1, Protocol::Tcp, 30001)]),
        ];
        let (ruleset, rejected) = desired(
            &services,
            &[node("a", [10, 0, 0, 2], true, false)],
            &options(),
        );
        assert_eq!(ruleset.forwards.len(), 1);
        assert_eq!(ruleset.forwards[0].node_port, 30022);
        let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["broken", "no-nodeport"]);
    }

    #[test]
    fn an_external_port_claimed_twice_goes_to_the_first_service() {
        let services = [
            service(
                "b",
                &[(ANNOTATION_PORTS, "22:22")],
                &[(22, Protocol::Tcp, 30002)],
            ),
            service(
                "a",
                &[(ANNOTATION_PORTS, "22:22")],
                &[(22, Protocol::Tcp, 30001)],
            ),
        ];
        let (ruleset, rejected) = desired(
            &services,
            &[node("n", [10, 0, 0, 2], true, false)],
            &options(),
        );
        assert_eq!(ruleset.forwards[0].node_port, 30001);
        assert_eq!(rejected[0].name, "b");
    }

    #[test]
    fn the_nft_script_replaces_only_cloaks_table_and_spreads_over_nodes() {
        let services = [
            service(
                "dns",
                &[
                    (ANNOTATION_PORTS, "53:53:udp"),
                    (ANNOTATION_INTERNAL, ""),
                    (ANNOTATION_ALLOW, "192.0.2.0/24"),
                ],
                &[(53, Protocol::Udp, 30053)],
            ),
            service(
                "ssh",
                &[(ANNOTATION_PORTS, "22:2022")],
                &[(2022, Protocol::Tcp, 30022)],
            ),
        ];
        let nodes = [
            node("a", [10, 0, 0, 2], true, false),
            node("b", [10, 0, 0, 3], true, false),
        ];
        let script = desired(&services, &nodes, &options()).0.to_nft();
        assert!(script.starts_with("table ip cloak_portfwd {\n}\ndelete table ip cloak_portfwd\n"));
        assert!(script.contains(
            "iifname { \"eth0\", \"wg0\" } iifname != \"eth0\" ip saddr 192.0.2.0/24 udp dport 53 dnat ip to numgen inc mod 2 map { 0 : 10.0.0.2 . 30053, 1 : 10.0.0.3 . 30053 } comment \"default/dns\""
        ), "{script}");
        assert!(
            script.contains("elements = { 0 . 22 : 10.0.0.2 . 30022, 1 . 22 : 10.0.0.3 . 30022 }"),
            "{script}"
        );
        assert_eq!(
            script.matches("table ip ").count(),
            3,
            "only cloak's table is named"
        );
    }

    #[test]
    fn the_iptables_rules_live_in_cloaks_chains_and_spread_over_nodes() {
        let services = [
            service(
                "ssh",
                &[(ANNOTATION_PORTS, "22:2022")],
                &[(2022, Protocol::Tcp, 30022)],
            ),
            service(
                "admin",
                &[(ANNOTATION_PORTS, "80:80"), (ANNOTATION_INTERNAL, "")],
                &[(80, Protocol::Tcp, 30080)],
            ),
        ];
        let nodes = [
            node("a", [10, 0, 0, 2], true, false),
            node("b", [10, 0, 0, 3], true, false),
        ];
        let restore = desired(&services, &nodes, &options())
            .0
            .to_iptables_restore();
        assert!(
            restore.starts_with("*nat\n:CLOAK-PORTFWD - [0:0]\n-F CLOAK-PORTFWD\n"),
            "{restore}"
        );
        assert!(restore.contains("-A CLOAK-PORTFWD -i eth0 -p tcp --dport 22 -m statistic --mode nth --every 2 --packet 0 -m comment --comment \"default/ssh\" -j DNAT --to-destination 10.0.0.2:30022\n"), "{restore}");
        assert!(restore.contains("-A CLOAK-PORTFWD -i eth0 -p tcp --dport 22 -m comment --comment \"default/ssh\" -j DNAT --to-destination 10.0.0.3:30022\n"), "{restore}");
        assert!(
            !restore.contains("-i eth0 -p tcp --dport 80"),
            "internal is not on the external interface"
        );
        assert!(restore.contains("-i wg0 -p tcp --dport 80"));
        assert!(
            !restore.contains("PREROUTING") && !restore.contains("-A FORWARD"),
            "only cloak's chains are written"
        );
    }

    #[test]
    fn changing_one_service_rewrites_only_its_map_elements() {
        let nodes = [node("a", [10, 0, 0, 2], true, false)];
        let before = [
            service(
                "ssh",
                &[(ANNOTATION_PORTS, "22:2022")],
                &[(2022, Protocol::Tcp, 30022)],
            ),
            service(
                "web",
                &[(ANNOTATION_PORTS, "80:80")],
                &[(80, Protocol::Tcp, 30080)],
            ),
        ];
        let mut after = before.clone();
        after[1].node_ports = [((80, Protocol::Tcp), 30081)].into();
        let old = desired(&before, &nodes, &options()).0;
        let new = desired(&after, &nodes, &options()).0;
        let update = new.update_from(&old).expect("an element update");
        assert_eq!(
            update,
            "delete element ip cloak_portfwd fwd_tcp { 0 . 80 }\nadd element ip cloak_portfwd fwd_tcp { 0 . 80 : 10.0.0.2 . 30081 }\n"
        );
        assert_eq!(
            new.update_from(&new).as_deref(),
            Some(""),
            "nothing changed, nothing to load"
        );
        // A node change reshapes the maps (mod N): the whole table is replaced.
        let more_nodes = [
            node("a", [10, 0, 0, 2], true, false),
            node("b", [10, 0, 0, 3], true, false),
        ];
        assert!(
            desired(&after, &more_nodes, &options())
                .0
                .update_from(&new)
                .is_none()
        );
    }

    #[test]
    fn epoks_annotations_are_read_as_epok_documents_them() {
        let services = [
            service(
                "mail",
                &[
                    (EPOK_PORTS, "22:2022,25:2025"),
                    (EPOK_INTERNAL, "true"),
                    (EPOK_ALLOW, "203.0.113.0/24"),
                ],
                &[(2022, Protocol::Tcp, 30022), (2025, Protocol::Tcp, 30025)],
            ),
            service(
                "dns",
                &[(EPOK_PORTS, "53:8053:udp")],
                &[(8053, Protocol::Udp, 30053)],
            ),
        ];
        let (ruleset, rejected) = desired(
            &services,
            &[node("a", [10, 0, 0, 2], true, false)],
            &options(),
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let forwards: Vec<(Protocol, u16, u16, bool, Option<String>)> = ruleset
            .forwards
            .iter()
            .map(|f| {
                let allow = f.allow.map(|a| a.to_string());
                (f.protocol, f.external, f.node_port, f.internal, allow)
            })
            .collect();
        let net = Some("203.0.113.0/24".to_owned());
        assert_eq!(
            forwards,
            [
                (Protocol::Tcp, 22, 30022, true, net.clone()),
                (Protocol::Tcp, 25, 30025, true, net),
                (Protocol::Udp, 53, 30053, false, None),
            ]
        );
        assert!(conflicts(&services).is_empty());
    }

    #[test]
    fn the_cloak_name_wins_over_epoks_and_only_a_real_disagreement_is_a_conflict() {
        let services = [
            service(
                "both",
                &[
                    (ANNOTATION_PORTS, "9000:9000"),
                    (EPOK_PORTS, "9001:9000"),
                    (ANNOTATION_ALLOW, "198.51.100.0/24"),
                    (EPOK_ALLOW, "198.51.100.0/24"),
                    (ANNOTATION_INTERNAL, "true"),
                    (EPOK_INTERNAL, "yes"),
                ],
                &[(9000, Protocol::Tcp, 30090)],
            ),
            service(
                "same",
                &[
                    (ANNOTATION_PORTS, "25:2025, 22:2022"),
                    (EPOK_PORTS, "22:2022,25:2025"),
                    (ANNOTATION_ALLOW, "10.0.0.0/8"),
                    (EPOK_ALLOW, "10.1.0.0/16"),
                ],
                &[(2022, Protocol::Tcp, 30022), (2025, Protocol::Tcp, 30025)],
            ),
        ];
        let (ruleset, rejected) = desired(
            &services,
            &[node("a", [10, 0, 0, 2], true, false)],
            &options(),
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let both: Vec<u16> = ruleset
            .forwards
            .iter()
            .filter(|f| f.service == "default/both")
            .map(|f| f.external)
            .collect();
        assert_eq!(both, [9000], "cloak.dev/external-ports is used");
        let found = conflicts(&services);
        let pairs: Vec<(&str, &str)> = found.iter().map(|c| (c.name.as_str(), c.used)).collect();
        assert_eq!(
            pairs,
            [("both", ANNOTATION_PORTS), ("same", ANNOTATION_ALLOW)]
        );
        assert_eq!(
            found[0].to_string(),
            "cloak.dev/external-ports (\"9000:9000\") and epok.getbetter.ro/externalports \
             (\"9001:9000\") disagree: cloak.dev/external-ports is used"
        );
        let same_allow = ruleset
            .forwards
            .iter()
            .find(|f| f.service == "default/same")
            .unwrap();
        assert_eq!(same_allow.allow.unwrap().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn an_error_names_the_annotation_it_was_read_from() {
        let services = [
            service("epok", &[(EPOK_PORTS, "22")], &[]),
            service(
                "cloak",
                &[
                    (ANNOTATION_PORTS, "22:22"),
                    (ANNOTATION_ALLOW, "10.0.0.1/8"),
                ],
                &[],
            ),
        ];
        let (_, rejected) = desired(&services, &[], &options());
        let messages: Vec<String> = rejected.iter().map(Rejected::message).collect();
        assert_eq!(
            messages,
            [
                "cloak.dev/allow-range: 10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)",
                "epok.getbetter.ro/externalports: \"22\" is not external:port or external:port:udp",
            ]
        );
    }

    #[test]
    fn settings_mix_names_one_by_one_and_epoks_range_is_cleared_of_host_bits_as_iptables_did() {
        let services = [
            service(
                "mixed",
                &[
                    (ANNOTATION_PORTS, "22:2022"),
                    (EPOK_INTERNAL, ""),
                    (EPOK_ALLOW, "10.1.2.3/16"),
                ],
                &[(2022, Protocol::Tcp, 30022)],
            ),
            // Not forwarded (no port list under either name): no conflict is reported.
            service(
                "idle",
                &[
                    (ANNOTATION_ALLOW, "10.0.0.0/8"),
                    (EPOK_ALLOW, "10.1.0.0/16"),
                ],
                &[],
            ),
        ];
        let (ruleset, rejected) = desired(
            &services,
            &[node("a", [10, 0, 0, 2], true, false)],
            &options(),
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let f = &ruleset.forwards[0];
        assert!(f.internal);
        assert_eq!(f.allow.unwrap().to_string(), "10.1.0.0/16");
        assert!(conflicts(&services).is_empty());
        // A long value is cut in the Event's note.
        let long = "1:1,".repeat(300);
        let conflict = Conflict {
            namespace: "n".into(),
            name: "s".into(),
            used: ANNOTATION_PORTS,
            used_value: "2:2".into(),
            ignored: EPOK_PORTS,
            ignored_value: long,
        };
        assert!(conflict.to_string().len() < 400, "{conflict}");
    }

    #[test]
    fn nodes_are_excluded_by_cloaks_and_epoks_names() {
        let map = |k: &str| BTreeMap::from([(k.to_owned(), String::new())]);
        let none = BTreeMap::new();
        assert!(excluded(&map(EXCLUDE), &none));
        assert!(excluded(&none, &map(EXCLUDE)));
        assert!(excluded(&map(EPOK_EXCLUDE), &none));
        assert!(excluded(&none, &map(EPOK_EXCLUDE_LABEL)));
        assert!(
            !excluded(&none, &map(EPOK_EXCLUDE)),
            "Epok's annotation name is not a label"
        );
        assert!(
            !excluded(&map("epok_exclude"), &none),
            "nor its label an annotation"
        );
    }
}
