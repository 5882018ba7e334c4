//! Inbound ports of a gateway exit (`exit.forwards`): the ports its provider forwards to it,
//! static or asked for by NAT-PMP (RFC 6886) through the tunnel, and the exit's own nftables
//! table that sends each to its Service.
//!
//! - A dynamic port is asked of the tunnel's gateway from the tunnel's own address (a socket on
//!   `0.0.0.0` would lose its answer to policy routing), renewed at half its lifetime suggesting
//!   the port it had, asked again at once for every mapping when the gateway's epoch says it
//!   lost them, and after every reconnect. Retransmissions double from 250 ms, bounded by what
//!   is left of the lease. A request removed from the config is released (lifetime 0), again
//!   until the provider answers or the mapping has lapsed.
//! - Connections arriving on the tunnel for a mapped port (its internal port, or its external
//!   one: ProtonVPN forwards the external port number as it is) are sent to the Service's
//!   cluster address, their source masqueraded to the exit's pod address, so their replies come
//!   back to this exit and leave by the tunnel they arrived on.
//!
//! What is mapped is published on a watch channel: the admin server's `/status` shows it, and
//! the operator publishes it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use cloak_model::{
    exit::Backend,
    natpmp::{self, Epoch, Map, Protocol, Request, Response, ResultCode},
};
use serde::Serialize;
use tokio::{net::UdpSocket, sync::watch, time::Instant};

use crate::{
    config::Forward,
    machine::{ConfigResult, Phase, Status},
    metrics::Metrics,
};

/// The exit's table for inbound ports.
pub const TABLE: &str = "cloak_inbound";
/// A failed request is tried again after this long.
const RETRY: Duration = Duration::from_secs(10);
/// A release the provider did not answer is sent again after this long, while the mapping may
/// still live there.
const RELEASE_RETRY: Duration = Duration::from_secs(1);
/// How long a first request may take in all (there is no lease to bound it yet).
const FIRST_LIMIT: Duration = Duration::from_secs(8);

/// One port the provider forwards to this exit now, or why it does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mapped {
    pub name: String,
    pub protocol: Protocol,
    /// The external port; 0 while there is none.
    pub port: u16,
    /// `static` or `natpmp`.
    pub source: &'static str,
    /// Seconds the gateway granted (NAT-PMP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One mapping's state.
#[derive(Debug, Clone)]
struct Lease {
    internal: u16,
    target: SocketAddrV4,
    backends: Vec<Backend>,
    external: u16,
    lifetime: u32,
    /// When it is asked again (renewal, or retry after a failure).
    due: Instant,
    /// When the provider forgets it.
    expires: Option<Instant>,
    error: Option<String>,
    dynamic: bool,
    gateway: Option<Ipv4Addr>,
}

/// One inbound rule: the request's name, its protocol, its internal and external ports, and
/// where its connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub protocol: Protocol,
    pub internal: u16,
    pub external: u16,
    /// The Service's cluster address (masqueraded).
    pub target: SocketAddrV4,
    /// When not empty, these instead, over the links with the remote's address kept.
    pub backends: Vec<Backend>,
}

/// The connections each inbound rule has taken, by `<name>/<protocol>` (its counter: the nat
/// chain sees the first packet of a connection only). Empty without the table.
pub fn connection_counts() -> BTreeMap<String, u64> {
    cloak_dataplane::nft_list_json(&["chain", "inet", TABLE, "prerouting"])
        .map(|json| counts_of(&json))
        .unwrap_or_default()
}

/// [`connection_counts`] from `nft -j` output (pure).
fn counts_of(json: &str) -> BTreeMap<String, u64> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return BTreeMap::new();
    };
    value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let rule = item.get("rule")?;
            let comment = rule.get("comment")?.as_str()?.to_owned();
            let packets = rule
                .get("expr")?
                .as_array()?
                .iter()
                .find_map(|e| e.get("counter")?.get("packets")?.as_u64())?;
            Some((comment, packets))
        })
        .collect()
}

/// The exit's inbound nftables table for these leases on tunnel `tunnel` (pure). Besides the
/// rules, it drops NAT-PMP answers that did not come by the tunnel: a neighbour on the pod
/// network could otherwise send one to the tunnel's address.
pub fn render(tunnel: &str, rules: &[Rule]) -> String {
    use std::fmt::Write as _;
    let mut dnat = String::new();
    for rule in rules {
        let (internal, external) = (rule.internal, rule.external);
        let ports = if internal == external || external == 0 {
            internal.to_string()
        } else {
            format!("{{ {internal}, {external} }}")
        };
        // One backend: to it; several: one picked at random a connection.
        let to = match rule.backends.as_slice() {
            [] => format!("ip to {}", rule.target),
            [one] => format!("ip to {}", one.address),
            many => {
                let elements: Vec<String> = many
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("{i} : {} . {}", b.address.ip(), b.address.port()))
                    .collect();
                format!(
                    "ip addr . port to numgen random mod {} map {{ {} }}",
                    many.len(),
                    elements.join(", ")
                )
            }
        };
        let _ = writeln!(
            dnat,
            "\t\tiifname \"{tunnel}\" meta nfproto ipv4 {p} dport {ports} counter dnat {to} comment \"{name}/{p}\"",
            p = rule.protocol.as_str(),
            name = rule.name,
        );
    }
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         {dnat}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tiifname \"{tunnel}\" oifname != \"{link}\" ct status dnat masquerade\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tudp sport {port} iifname != \"{tunnel}\" drop\n\
         \t}}\n\
         }}\n",
        port = natpmp::PORT,
        link = cloak_dataplane::gateway::EXIT_IFACE,
    )
}

/// The first IPv4 address of interface `name`.
fn interface_ipv4(name: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        if ifa.interface_name != name {
            return None;
        }
        let addr = ifa.address?;
        addr.as_sockaddr_in().map(nix::sys::socket::SockaddrIn::ip)
    })
}

/// The default NAT-PMP gateway of a tunnel address: its `.1`.
pub fn default_gateway(address: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = address.octets();
    Ipv4Addr::new(a, b, c, 1)
}

/// Sends `request` to `gateway` until an answer comes, as RFC 6886 says: 250 ms, doubling,
/// for at most `limit` in all.
async fn ask(
    socket: &UdpSocket,
    gateway: Ipv4Addr,
    request: &Request,
    bytes: &[u8],
    limit: Duration,
) -> Result<Response, String> {
    let to = SocketAddr::from((gateway, natpmp::PORT));
    let mut buf = [0u8; 64];
    for wait in natpmp::waits(limit) {
        socket
            .send_to(bytes, to)
            .await
            .map_err(|e| format!("sending to {to}: {e}"))?;
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(format!("reading from {to}: {e}")),
                Ok(Ok((n, from))) => {
                    if from != to {
                        continue;
                    }
                    if let Ok(answer) = Response::decode(&buf[..n])
                        && answer.answers(request)
                    {
                        return Ok(answer);
                    }
                }
            }
        }
    }
    Err(format!("no answer from {to} within {limit:?}"))
}

/// What a provider grants for a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub external: u16,
    /// Seconds; renewed at half of it.
    pub lifetime: u32,
    /// The provider says it lost every mapping since it was last asked: every other one must
    /// be asked for again at once.
    pub lost_all: bool,
}

/// A provider's way of handing out forwarded ports: the one provider-specific part. NAT-PMP
/// ([`NatPmp`], ProtonVPN) is one; PIA's signed-port API would be another, with nothing else
/// changed.
pub trait PortSource {
    /// Asks for (or renews) a mapping of `internal`, suggesting `suggested` (0: any), within
    /// `limit`.
    fn map(
        &mut self,
        protocol: Protocol,
        internal: u16,
        suggested: u16,
        limit: Duration,
    ) -> impl Future<Output = Result<Grant, String>> + Send;
    /// Gives a mapping back.
    fn release(
        &mut self,
        protocol: Protocol,
        internal: u16,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// NAT-PMP (RFC 6886) from the tunnel's address to its gateway; `epoch` is what this gateway
/// said last (kept across rounds), `clock` when the agent started.
#[derive(Debug)]
pub struct NatPmp<'a> {
    pub socket: &'a UdpSocket,
    pub gateway: Ipv4Addr,
    pub epoch: &'a mut Epoch,
    pub clock: Instant,
}

impl<'a> NatPmp<'a> {
    /// The source for `lease` from the tunnel address `address`: its gateway (or the
    /// address's `.1`), with the epoch that gateway said last.
    fn of(
        socket: &'a UdpSocket,
        address: Ipv4Addr,
        lease: &Lease,
        epochs: &'a mut BTreeMap<Ipv4Addr, Epoch>,
        clock: Instant,
    ) -> Self {
        let gateway = lease.gateway.unwrap_or_else(|| default_gateway(address));
        Self {
            socket,
            gateway,
            epoch: epochs.entry(gateway).or_default(),
            clock,
        }
    }
}

impl PortSource for NatPmp<'_> {
    async fn map(
        &mut self,
        protocol: Protocol,
        internal: u16,
        suggested: u16,
        limit: Duration,
    ) -> Result<Grant, String> {
        let map = Map {
            protocol,
            internal,
            external: suggested,
            lifetime: natpmp::LIFETIME,
        };
        let answer = ask(
            self.socket,
            self.gateway,
            &Request::Map(map),
            &map.encode(),
            limit,
        )
        .await?;
        let lost_all = self
            .epoch
            .observe(answer.epoch(), self.clock.elapsed().as_secs_f64());
        match answer {
            Response::Map {
                result: ResultCode::Success,
                external,
                lifetime,
                ..
            } if external != 0 => Ok(Grant {
                external,
                lifetime,
                lost_all,
            }),
            other => Err(format!("the gateway answered: {}", other.result())),
        }
    }

    async fn release(&mut self, protocol: Protocol, internal: u16) -> Result<(), String> {
        let map = Map {
            protocol,
            internal,
            external: 0,
            lifetime: 0,
        };
        ask(
            self.socket,
            self.gateway,
            &Request::Map(map),
            &map.encode(),
            Duration::from_secs(2),
        )
        .await
        .map(drop)
    }
}

/// The forwards of a config, its tunnel's interface, and whether it is an exit's.
fn wanted(config: &ConfigResult) -> (Vec<Forward>, String, bool) {
    match config.as_ref() {
        Ok(cfg) => (
            usable(
                cfg.exit
                    .as_ref()
                    .map(|e| e.forwards.clone())
                    .unwrap_or_default(),
            ),
            cfg.tunnel.interface().to_owned(),
            cfg.exit.is_some(),
        ),
        Err(_) => (Vec::new(), String::new(), false),
    }
}

/// The forwards the exit can serve: a name that is a DNS label (it goes into the table's
/// rules) and an internal port no earlier forward of the same protocol has (the provider maps
/// one internal port once). The operator sends no others; the config is in the tenant's
/// namespace, so it is checked again here.
fn usable(forwards: Vec<Forward>) -> Vec<Forward> {
    let mut taken = std::collections::BTreeSet::new();
    forwards
        .into_iter()
        .filter(|f| {
            let internal = f.internal();
            let ok = cloak_model::names::is_dns_label(&f.name)
                && internal != 0
                && f.protocols.iter().all(|p| !taken.contains(&(*p, internal)));
            if ok {
                taken.extend(f.protocols.iter().map(|p| (*p, internal)));
            } else {
                tracing::warn!(name = ?f.name, "inbound port refused: a bad name or a port asked for twice");
            }
            ok
        })
        .collect()
}

/// Keeps the exit's inbound ports in step with its config and tunnel until a channel closes.
pub async fn follow(
    mut config: watch::Receiver<ConfigResult>,
    mut status: watch::Receiver<Status>,
    published: watch::Sender<Vec<Mapped>>,
    metrics: Arc<Metrics>,
) {
    let mut leases: BTreeMap<(String, Protocol), Lease> = BTreeMap::new();
    let mut releasing: BTreeMap<(String, Protocol), Lease> = BTreeMap::new();
    let mut epochs: BTreeMap<Ipv4Addr, Epoch> = BTreeMap::new();
    let mut applied: Option<String> = None;
    // The tunnel and the backend routes last put in.
    let mut routed: Option<(String, Vec<(Ipv4Addr, Ipv4Addr)>)> = None;
    let mut reconnects = status.borrow().reconnects;
    let start = Instant::now();
    loop {
        let (forwards, tunnel, is_exit) = wanted(&config.borrow_and_update());
        let connected = status.borrow_and_update().phase == Phase::Connected;
        let now_reconnects = status.borrow().reconnects;
        // A new connection (another session, maybe another server): every mapping is asked
        // again.
        if now_reconnects != reconnects {
            reconnects = now_reconnects;
            for lease in leases.values_mut() {
                lease.due = Instant::now();
            }
        }
        let address = if connected {
            interface_ipv4(&tunnel)
        } else {
            None
        };
        let socket = match address {
            Some(a) => UdpSocket::bind((a, 0)).await.ok(),
            None => None,
        };

        // Removed requests are released; new ones are added.
        let keep: Vec<(String, Protocol)> = forwards
            .iter()
            .flat_map(|f| f.protocols.iter().map(|p| (f.name.clone(), *p)))
            .collect();
        let gone: Vec<(String, Protocol)> = leases
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        // Released once the tunnel carries the request (a mapping still alive at the
        // provider would otherwise forward to this exit until it lapses).
        for key in gone {
            if let Some(lease) = leases.remove(&key)
                && lease.dynamic
                && lease.external != 0
                && lease.expires.is_some_and(|e| e > Instant::now())
            {
                releasing.insert(key, lease);
            }
        }
        // A release still pending for an internal port that a current request uses again
        // would delete that request's mapping: dropped.
        let in_use: Vec<(Protocol, u16)> = forwards
            .iter()
            .flat_map(|f| f.protocols.iter().map(move |p| (*p, f.internal())))
            .collect();
        releasing.retain(|(_, protocol), l| {
            l.expires.is_some_and(|e| e > Instant::now())
                && !in_use.contains(&(*protocol, l.internal))
        });
        let pending: Vec<((String, Protocol), Lease)> = if socket.is_some() {
            std::mem::take(&mut releasing).into_iter().collect()
        } else {
            Vec::new()
        };
        for (key, lease) in pending {
            if let (Some(socket), Some(address)) = (&socket, address) {
                let mut source = NatPmp::of(socket, address, &lease, &mut epochs, start);
                match source.release(key.1, lease.internal).await {
                    Ok(()) => {
                        tracing::info!(name = %key.0, protocol = ?key.1, "inbound port released");
                    }
                    // Asked again (while the mapping may still live at the provider) until
                    // the provider answers.
                    Err(e) => {
                        tracing::warn!(name = %key.0, protocol = ?key.1, %e, "releasing an inbound port; trying again");
                        releasing.insert(key, lease);
                    }
                }
            }
        }
        for f in &forwards {
            for protocol in &f.protocols {
                let key = (f.name.clone(), *protocol);
                let fresh = Lease {
                    internal: f.internal(),
                    target: f.target,
                    backends: f.backends.clone(),
                    external: f.external.unwrap_or(0),
                    lifetime: 0,
                    due: Instant::now(),
                    expires: None,
                    error: None,
                    dynamic: f.external.is_none(),
                    gateway: f.gateway,
                };
                // The backends change with the pods (a restart, a scale-out): the mapping
                // stays, only the rules follow them.
                if let Some(l) = leases.get_mut(&key) {
                    l.backends.clone_from(&fresh.backends);
                }
                let same = leases.get(&key).is_some_and(|l| {
                    l.target == fresh.target
                        && l.dynamic == fresh.dynamic
                        && l.gateway == fresh.gateway
                        && (l.dynamic || l.external == fresh.external)
                });
                if !same {
                    leases.insert(key, fresh);
                }
            }
        }

        // Due requests, while the tunnel is up.
        if let (Some(socket), Some(address)) = (&socket, address) {
            let mut round = 0;
            'again: while round < 3 {
                round += 1;
                let keys: Vec<(String, Protocol)> = leases.keys().cloned().collect();
                for key in keys {
                    let Some(lease) = leases.get(&key).cloned() else {
                        continue;
                    };
                    if !lease.dynamic || lease.due > Instant::now() {
                        continue;
                    }
                    // One request at a time: none may hold the others up for long.
                    let limit = lease
                        .expires
                        .map_or(FIRST_LIMIT, |e| e.saturating_duration_since(Instant::now()))
                        .clamp(Duration::from_secs(1), FIRST_LIMIT);
                    let mut source = NatPmp::of(socket, address, &lease, &mut epochs, start);
                    let gateway = source.gateway;
                    let grant = source
                        .map(key.1, lease.internal, lease.external, limit)
                        .await;
                    let Some(entry) = leases.get_mut(&key) else {
                        continue;
                    };
                    match grant {
                        Ok(grant) => {
                            metrics.inbound_renewals.inc();
                            if entry.external != grant.external {
                                tracing::info!(name = %key.0, protocol = ?key.1, external = grant.external, "inbound port mapped");
                            }
                            let lifetime = grant.lifetime.min(natpmp::MAX_LIFETIME);
                            entry.external = grant.external;
                            entry.lifetime = lifetime;
                            entry.due = Instant::now() + natpmp::renew_after(lifetime);
                            entry.expires =
                                Some(Instant::now() + Duration::from_secs(u64::from(lifetime)));
                            entry.error = None;
                            if grant.lost_all {
                                metrics.inbound_epoch_resets.inc();
                                tracing::warn!(%gateway, "the port gateway lost its mappings: asking again for every one");
                                for (k, l) in &mut leases {
                                    if *k != key {
                                        l.due = Instant::now();
                                    }
                                }
                                continue 'again;
                            }
                        }
                        Err(e) => {
                            metrics.inbound_failures.inc();
                            entry.error = Some(e);
                            entry.due = Instant::now() + RETRY;
                        }
                    }
                }
                break;
            }
        }
        // A lease past its lifetime is gone at the provider.
        for lease in leases.values_mut() {
            if lease.dynamic && lease.expires.is_some_and(|e| e <= Instant::now()) {
                lease.external = 0;
                lease.expires = None;
            }
            if !connected && lease.dynamic {
                lease
                    .error
                    .get_or_insert_with(|| "the tunnel is down".into());
            }
        }

        // The backends that are clients of the gateway are routed over the links before any
        // rule sends them a connection: once at an exit's start (a restarted agent's namespace
        // may hold an older table), then on every change. Until their routes are in, their
        // connections go to the Service's cluster address (masqueraded) instead.
        let mut table_error = None;
        let mut backend_routes: Vec<(Ipv4Addr, Ipv4Addr)> = forwards
            .iter()
            .flat_map(|f| f.backends.iter().map(|b| (*b.address.ip(), b.node)))
            .collect();
        backend_routes.sort();
        backend_routes.dedup_by_key(|r| r.0);
        let wanted_routes = (tunnel.clone(), backend_routes);
        if is_exit && !tunnel.is_empty() && routed.as_ref() != Some(&wanted_routes) {
            match cloak_dataplane::gateway::route_inbound(&tunnel, &wanted_routes.1) {
                Ok(()) => routed = Some(wanted_routes.clone()),
                Err(e) => {
                    routed = None;
                    tracing::warn!(%e, "inbound ports: routing the backends; the Services' cluster addresses meanwhile");
                }
            }
        }
        let routes_in = routed.as_ref() == Some(&wanted_routes);
        let rules: Vec<Rule> = leases
            .iter()
            .filter(|(_, l)| l.external != 0)
            .map(|((name, p), l)| Rule {
                name: name.clone(),
                protocol: *p,
                internal: l.internal,
                external: l.external,
                target: l.target,
                backends: if routes_in {
                    l.backends.clone()
                } else {
                    Vec::new()
                },
            })
            .collect();
        // Written as soon as there are forwards (its input chain guards the first request),
        // kept (emptied) once there were.
        if !tunnel.is_empty() && (!forwards.is_empty() || applied.is_some()) {
            let script = render(&tunnel, &rules);
            if applied.as_deref() != Some(script.as_str()) {
                // The counters start again with a new table: what they counted goes first.
                if applied.is_some() {
                    metrics.record_inbound(&connection_counts());
                }
                match cloak_dataplane::nft(&script) {
                    Ok(()) => {
                        applied = Some(script);
                        metrics.reset_inbound_counts();
                    }
                    Err(e) => {
                        tracing::warn!(%e, "inbound ports: applying the table");
                        table_error
                            .get_or_insert(format!("the exit's rules could not be written: {e}"));
                    }
                }
            }
        }
        // Published only as the table carries them: with no table, no port leads anywhere.
        let carried = table_error.is_none() && applied.is_some();
        let now_published: Vec<Mapped> = leases
            .iter()
            .map(|((name, protocol), l)| Mapped {
                name: name.clone(),
                protocol: *protocol,
                port: if connected && carried { l.external } else { 0 },
                source: if l.dynamic { "natpmp" } else { "static" },
                lifetime: l.dynamic.then_some(l.lifetime).filter(|l| *l > 0),
                error: table_error.clone().or_else(|| l.error.clone()),
            })
            .collect();
        metrics
            .inbound_mappings
            .set(i64::try_from(now_published.iter().filter(|m| m.port != 0).count()).unwrap_or(0));
        published.send_if_modified(|p| {
            if *p == now_published {
                false
            } else {
                *p = now_published;
                true
            }
        });

        // While the tunnel is down, only a change wakes it; a release that failed is tried
        // again after `RELEASE_RETRY`.
        let next = leases
            .values()
            .filter(|l| l.dynamic && connected)
            .map(|l| l.due)
            .chain((connected && !releasing.is_empty()).then(|| Instant::now() + RELEASE_RETRY))
            .min()
            .map_or(Duration::from_mins(1), |d| {
                d.saturating_duration_since(Instant::now())
            })
            .max(Duration::from_millis(100));
        tokio::select! {
            changed = config.changed() => if changed.is_err() { return },
            changed = status.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_port_and_its_internal_one_reach_the_service_and_only_from_the_tunnel() {
        let target: SocketAddrV4 = "10.96.0.50:6881".parse().unwrap();
        let rule = |protocol, external| Rule {
            name: "torrent".into(),
            protocol,
            internal: 6881,
            external,
            target,
            backends: Vec::new(),
        };
        let table = render(
            "wg0",
            &[rule(Protocol::Tcp, 40001), rule(Protocol::Udp, 6881)],
        );
        assert!(table.contains(
            "iifname \"wg0\" meta nfproto ipv4 tcp dport { 6881, 40001 } counter dnat ip to 10.96.0.50:6881 comment \"torrent/tcp\""
        ));
        assert!(table.contains(
            "iifname \"wg0\" meta nfproto ipv4 udp dport 6881 counter dnat ip to 10.96.0.50:6881 comment \"torrent/udp\""
        ));
        // The Service's address is masqueraded to; backends over the links are not.
        assert!(table.contains("iifname \"wg0\" oifname != \"ckx0\" ct status dnat masquerade"));
        // A NAT-PMP answer is believed only from the tunnel.
        assert!(table.contains("udp sport 5351 iifname != \"wg0\" drop"));
        // Replaced whole, never appended to.
        assert!(table.starts_with("table inet cloak_inbound\ndelete table inet cloak_inbound\n"));
        // Nothing mapped: no rule sends anything anywhere.
        assert!(!render("wg0", &[]).contains("dnat ip to"));
    }

    #[test]
    fn backends_that_are_clients_of_the_gateway_are_sent_to_directly_one_picked_a_connection() {
        let backend = |address: &str, node: &str| Backend {
            address: address.parse().unwrap(),
            node: node.parse().unwrap(),
        };
        let mut rule = Rule {
            name: "web".into(),
            protocol: Protocol::Tcp,
            internal: 80,
            external: 40001,
            target: "10.96.0.50:80".parse().unwrap(),
            backends: vec![backend("10.244.1.5:8080", "198.19.0.11")],
        };
        assert!(render("wg0", std::slice::from_ref(&rule)).contains(
            "tcp dport { 80, 40001 } counter dnat ip to 10.244.1.5:8080 comment \"web/tcp\""
        ));
        rule.backends
            .push(backend("10.244.2.7:8081", "198.19.0.12"));
        assert!(render("wg0", &[rule]).contains(
            "counter dnat ip addr . port to numgen random mod 2 map { 0 : 10.244.1.5 . 8080, 1 : 10.244.2.7 . 8081 } comment \"web/tcp\""
        ));
    }

    /// A NAT-PMP gateway on `address:5351` (a loopback address of the test's own) that
    /// ignores the first `drop` requests, then answers each mapping with `epochs` in turn
    /// (port 40000 + the request's number); returns the times requests came.
    fn fake_gateway(
        address: Ipv4Addr,
        drop: usize,
        epochs: Vec<u32>,
    ) -> std::thread::JoinHandle<Vec<std::time::Instant>> {
        let socket = std::net::UdpSocket::bind((address, natpmp::PORT)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            let mut answered = 0;
            while answered < epochs.len() {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    break;
                };
                seen.push(std::time::Instant::now());
                if seen.len() <= drop {
                    continue;
                }
                let Ok(Request::Map(m)) = Request::decode(&buf[..n]) else {
                    continue;
                };
                let answer = Response::Map {
                    protocol: m.protocol,
                    result: ResultCode::Success,
                    epoch: epochs[answered],
                    internal: m.internal,
                    external: 40000 + u16::try_from(answered).unwrap(),
                    lifetime: 60,
                };
                answered += 1;
                socket.send_to(&answer.encode(), from).unwrap();
            }
            seen
        })
    }

    #[tokio::test]
    async fn a_request_is_retransmitted_from_250_ms_doubling_until_the_gateway_answers() {
        let gateway = Ipv4Addr::new(127, 77, 0, 1);
        let fake = fake_gateway(gateway, 2, vec![100]);
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let mut epoch = Epoch::default();
        let mut source = NatPmp {
            socket: &socket,
            gateway,
            epoch: &mut epoch,
            clock: Instant::now(),
        };
        let grant = source
            .map(Protocol::Tcp, 6881, 0, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            grant,
            Grant {
                external: 40000,
                lifetime: 60,
                lost_all: false
            }
        );
        let seen = fake.join().unwrap();
        assert_eq!(seen.len(), 3, "two unanswered tries, then one answered");
        let gaps: Vec<u128> = seen.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        assert!((240..400).contains(&gaps[0]), "{gaps:?}");
        assert!((490..700).contains(&gaps[1]), "{gaps:?}");
    }

    #[tokio::test]
    async fn a_gateway_whose_epoch_goes_back_has_lost_every_mapping() {
        let gateway = Ipv4Addr::new(127, 77, 0, 2);
        let fake = fake_gateway(gateway, 0, vec![500, 501, 3]);
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let mut epoch = Epoch::default();
        let mut source = NatPmp {
            socket: &socket,
            gateway,
            epoch: &mut epoch,
            clock: Instant::now(),
        };
        let mut lost = Vec::new();
        for _ in 0..3 {
            let grant = source
                .map(Protocol::Udp, 6881, 0, Duration::from_secs(2))
                .await
                .unwrap();
            lost.push(grant.lost_all);
        }
        assert_eq!(lost, [false, false, true]);
        fake.join().unwrap();
        // Nobody answers: an error naming the gateway, within the limit.
        let started = Instant::now();
        let err = NatPmp {
            socket: &socket,
            gateway: Ipv4Addr::new(127, 77, 0, 3),
            epoch: &mut epoch,
            clock: Instant::now(),
        }
        .map(Protocol::Udp, 6881, 0, Duration::from_secs(1))
        .await
        .unwrap_err();
        assert!(err.contains("127.77.0.3:5351"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn each_rules_connections_are_read_from_its_counter_by_its_comment() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "inet", "table": "cloak_inbound", "name": "prerouting"}},
            {"rule": {"family": "inet", "table": "cloak_inbound", "chain": "prerouting", "handle": 2,
              "comment": "http/tcp", "expr": [{"match": {}}, {"counter": {"packets": 7, "bytes": 420}}, {"dnat": {}}]}},
            {"rule": {"family": "inet", "table": "cloak_inbound", "chain": "prerouting", "handle": 3,
              "expr": [{"counter": {"packets": 1, "bytes": 60}}]}}]}"#;
        assert_eq!(
            counts_of(json),
            BTreeMap::from([("http/tcp".to_owned(), 7)])
        );
        assert!(counts_of("").is_empty());
    }

    #[test]
    fn a_forward_with_a_name_that_is_no_label_or_a_port_asked_twice_is_left_out() {
        let forward = |name: &str, port: u16, external: Option<u16>| Forward {
            name: name.into(),
            protocols: vec![Protocol::Tcp],
            target: SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 50), port),
            external,
            gateway: None,
            backends: Vec::new(),
        };
        let kept = usable(vec![
            forward("web", 80, None),
            forward("x\" ; flush ruleset", 81, None),
            forward("again", 80, None),
            forward("fixed", 80, Some(51413)),
            forward("zero", 0, None),
        ]);
        let names: Vec<&str> = kept.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["web", "fixed"]);
    }

    #[test]
    fn the_default_gateway_is_the_tunnel_addresss_first() {
        assert_eq!(
            default_gateway(Ipv4Addr::new(10, 2, 0, 2)),
            Ipv4Addr::new(10, 2, 0, 1)
        );
    }
}
