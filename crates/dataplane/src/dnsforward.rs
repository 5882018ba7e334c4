//! The gateway's DNS forwarder. Every DNS query a gateway client sends is redirected by its kill
//! switch to the exits' inner address (`gateway::EXIT_ADDRESS`), port 53, and goes over the
//! node's links like any other flow: hashed to a healthy exit, kept on it. There the exit's agent
//! sends it on, as it is, to one of two resolvers:
//!
//! - names under the cluster's domains (and reverse names of intranet addresses) to the
//!   cluster DNS, outside the tunnel, so cluster names resolve as before;
//! - every other name to the tunnel's resolver, through the tunnel. No other name ever reaches
//!   the cluster DNS, whose upstream is outside every tunnel.
//!
//! When a gateway has no healthy exit, its node answers instead (`gateway::CLIENT_GATEWAY`):
//! cluster names from the cluster DNS, SERVFAIL for every other name, so the cluster stays
//! reachable by name and nothing else is resolved outside a tunnel.
//!
//! A malformed query, or one whose resolver is unknown, gets SERVFAIL; a query whose resolver
//! does not answer gets nothing (the client retries, as it would any lost datagram).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    sockopt,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};

/// How long a resolver has to answer one query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client's TCP connection may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries in flight at once over UDP, and TCP connections open at once; more are dropped (the
/// clients retry). Separate, so idle TCP connections cannot starve UDP.
const IN_FLIGHT: usize = 512;
const TCP_CONNECTIONS: usize = 64;

/// Where a query goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Name suffixes the cluster DNS answers (`cluster.local`).
    pub cluster_domains: Vec<String>,
    /// The cluster DNS, reached outside the tunnel.
    pub cluster: Option<IpAddr>,
    /// The tunnel's resolver; `None` (a node whose gateway has no healthy exit): every name
    /// outside the cluster gets SERVFAIL.
    pub tunnel: Option<IpAddr>,
    /// The intranet: reverse names of its addresses are the cluster DNS's to answer.
    pub intranet: Vec<IpNet>,
}

impl Routing {
    /// The resolver for `name` (lower case, no final dot).
    pub fn upstream(&self, name: &str) -> Option<IpAddr> {
        if self.is_cluster(name) {
            self.cluster
        } else {
            self.tunnel
        }
    }

    fn is_cluster(&self, name: &str) -> bool {
        self.cluster_domains.iter().any(|domain| {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            name == domain
                || name
                    .strip_suffix(domain.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        }) || reverse_v4(name).is_some_and(|ip| {
            self.intranet
                .iter()
                .any(|net| net.contains(&IpAddr::V4(ip)))
        })
    }
}

/// The name asked by a DNS message's first question: lower case, no final dot; `None` when
/// the message is malformed or holds no question.
pub fn question_name(msg: &[u8]) -> Option<String> {
    question(msg).map(|(name, _)| name)
}

/// A standard query's one question: its name (as [`question_name`]) and where it ends.
/// Anything else is `None`: another opcode, no or several questions, a compressed or
/// truncated name, or a label holding a dot (`a.cluster.local` as one label would pass for a
/// cluster name here and be forwarded by the cluster DNS as a name of the root zone).
fn question(msg: &[u8]) -> Option<(String, usize)> {
    if msg.len() < 12 || (msg[2] >> 3) & 0x0f != 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(at)?);
        if len == 0 {
            break;
        }
        // A question's name is never compressed; a pointer here is a malformed query.
        if len & 0xc0 != 0 || at > 12 + 255 {
            return None;
        }
        let label = msg.get(at + 1..at + 1 + len)?;
        if label.contains(&b'.') {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += 1 + len;
    }
    // The root label, then the type and class.
    let end = at + 1 + 4;
    (msg.len() >= end).then(|| (labels.join("."), end))
}

/// The address a full IPv4 reverse name (`d.c.b.a.in-addr.arpa`) names.
fn reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let octets: Vec<u8> = name
        .strip_suffix(".in-addr.arpa")?
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<_>>()?;
    match octets[..] {
        [d, c, b, a] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// The first `nameserver` of a resolv.conf text (a link-local address's `%zone` dropped).
pub fn first_nameserver(resolv_conf: &str) -> Option<IpAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next().and_then(|a| a.split('%').next()?.parse().ok()))
            .flatten()
    })
}

/// A SERVFAIL answer to `query`: its header and question (when it has one it can be read
/// by), flagged as a response; nothing (no answer at all) for fewer bytes than a header.
pub fn servfail(query: &[u8]) -> Vec<u8> {
    if query.len() < 12 {
        return Vec::new();
    }
    let mut answer = if let Some((_, end)) = question(query) {
        query[..end].to_vec()
    } else {
        let mut header = query[..12].to_vec();
        header[4..6].fill(0);
        header
    };
    answer[2] |= 0x80; // QR: a response
    answer[3] = 0x80 | 2; // RA, RCODE 2
    answer[6..12].fill(0); // no answer, authority or additional records
    answer
}

/// The answer to one query, from its resolver.
async fn resolve(routing: Option<Routing>, query: &[u8], tcp: bool) -> Vec<u8> {
    let upstream = question_name(query)
        .and_then(|name| routing.as_ref()?.upstream(&name))
        .map(|ip| SocketAddr::new(ip, 53));
    let Some(upstream) = upstream else {
        return servfail(query);
    };
    let answer = if tcp {
        timeout(UPSTREAM_TIMEOUT, ask_tcp(upstream, query)).await
    } else {
        timeout(UPSTREAM_TIMEOUT, ask_udp(upstream, query)).await
    };
    match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            tracing::debug!(%upstream, %e, "resolver");
            servfail(query)
        }
        Err(_) => Vec::new(),
    }
}

async fn ask_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // The same transaction, or a stray datagram to ignore.
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream).await
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await
}

/// A socket on `addr` that binds before the address exists (an exit's link comes up with its
/// data plane, after the forwarder starts; a node has the address once it has a client).
fn bound(addr: SocketAddrV4, kind: SockType) -> std::io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Inet,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    if kind == SockType::Stream {
        listen(&fd, Backlog::new(128).map_err(std::io::Error::other)?)?;
    }
    Ok(fd)
}

/// The UDP and TCP sockets a forwarder serves on, bound in the calling thread's network
/// namespace.
#[derive(Debug)]
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

impl Sockets {
    pub fn bind(addr: SocketAddrV4) -> std::io::Result<Self> {
        Ok(Self {
            udp: std::net::UdpSocket::from(bound(addr, SockType::Datagram)?),
            tcp: std::net::TcpListener::from(bound(addr, SockType::Stream)?),
        })
    }
}

/// Serves DNS on `sockets` until an error on them, routing each query by what `routing` says
/// for its sender when it arrives (`None`: SERVFAIL).
pub async fn serve(
    sockets: Sockets,
    routing: impl Fn(IpAddr) -> Option<Routing> + Send + Sync + 'static,
) -> std::io::Result<()> {
    let udp = Arc::new(UdpSocket::from_std(sockets.udp)?);
    let tcp = TcpListener::from_std(sockets.tcp)?;
    let routing = Arc::new(routing);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let connections = Arc::new(Semaphore::new(TCP_CONNECTIONS));
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            got = udp.recv_from(&mut buf) => {
                // An error on one datagram (an ICMP error queued for the socket) is not the
                // forwarder's end.
                let Ok((n, client)) = got else { continue };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else { continue };
                let (udp, query, routing) = (Arc::clone(&udp), buf[..n].to_vec(), routing(client.ip()));
                tokio::spawn(async move {
                    let answer = resolve(routing, &query, false).await;
                    if !answer.is_empty() {
                        let _ = udp.send_to(&answer, client).await;
                    }
                    drop(slot);
                });
            }
            got = tcp.accept() => {
                let Ok((mut stream, client)) = got else { continue };
                let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else { continue };
                let routing = Arc::clone(&routing);
                tokio::spawn(async move {
                    while let Ok(Ok(query)) = timeout(TCP_IDLE, read_framed(&mut stream)).await {
                        let answer = resolve(routing(client.ip()), &query, true).await;
                        if answer.is_empty() || write_framed(&mut stream, &answer).await.is_err() {
                            break;
                        }
                    }
                    drop(slot);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name`, type A.
    fn query(name: &str) -> Vec<u8> {
        let mut msg = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            msg.push(u8::try_from(label.len()).unwrap());
            msg.extend_from_slice(label.as_bytes());
        }
        msg.extend_from_slice(&[0, 0, 1, 0, 1]);
        msg
    }

    fn routing() -> Routing {
        Routing {
            cluster_domains: vec!["cluster.local".into()],
            cluster: Some("10.96.0.10".parse().unwrap()),
            tunnel: Some("10.64.0.1".parse().unwrap()),
            intranet: vec![
                "10.96.0.0/12".parse().unwrap(),
                "10.244.0.0/16".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn cluster_names_and_intranet_reverse_names_go_to_the_cluster_dns_and_every_other_to_the_tunnel()
     {
        let r = routing();
        let cluster = r.cluster;
        let tunnel = r.tunnel;
        for name in [
            "web.demo.svc.cluster.local",
            "cluster.local",
            // A search-list expansion of an internet name: the cluster DNS answers NXDOMAIN
            // itself, without asking its upstream.
            "example.com.demo.svc.cluster.local",
            "10.0.96.10.in-addr.arpa",
            "5.1.244.10.in-addr.arpa",
        ] {
            assert_eq!(r.upstream(name), cluster, "{name}");
        }
        for name in [
            "example.com",
            "echo.lab",
            "notcluster.local",
            "evilcluster.local",
            "cluster.local.example.com",
            "4.4.8.8.in-addr.arpa",
            "10.in-addr.arpa",
            "",
        ] {
            assert_eq!(r.upstream(name), tunnel, "{name}");
        }
    }

    #[test]
    fn a_questions_name_is_read_lower_case_and_a_malformed_query_gets_servfail() {
        assert_eq!(
            question_name(&query("Echo.LAB")).as_deref(),
            Some("echo.lab")
        );
        assert_eq!(question_name(&query("")).as_deref(), Some(""));
        assert_eq!(question_name(&[0u8; 11]), None);
        let mut compressed = query("a.b");
        compressed[12] = 0xc0;
        assert_eq!(question_name(&compressed), None);
        let mut truncated = query("example.com");
        truncated.truncate(16);
        assert_eq!(question_name(&truncated), None);

        let mut dotted = query("a.cluster.local");
        dotted[12] = 15; // one label "a.cluster.local" instead of three
        dotted.drain(13..);
        dotted.extend_from_slice(b"a.cluster.local\0\0\x01\0\x01");
        assert_eq!(question_name(&dotted), None, "a dot inside a label");
        let mut update = query("example.com");
        update[2] = 5 << 3; // opcode UPDATE
        assert_eq!(question_name(&update), None);
        let mut two = query("example.com");
        two[5] = 2;
        assert_eq!(question_name(&two), None, "two questions");

        assert!(servfail(&[0u8; 11]).is_empty(), "no header: no answer");
        let mut with_edns = query("example.com");
        let asked = with_edns.len();
        with_edns[11] = 1;
        with_edns.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
        let answer = servfail(&with_edns);
        assert_eq!(answer.len(), asked, "header and question only: {answer:?}");
        let answer = servfail(&query("example.com"));
        assert_eq!(&answer[..2], &[0x12, 0x34], "the query's id");
        assert_eq!(answer[2] & 0x80, 0x80, "a response");
        assert_eq!(answer[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(question_name(&answer).as_deref(), Some("example.com"));
    }
}
