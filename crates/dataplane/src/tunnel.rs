//! Tunnels: the desired tunnel as a value ([`TunnelConfig`]), a [`TunnelDriver`] that opens it and
//! an open [`Tunnel`] that reports its [`TunnelStatus`]. Closing is dropping.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnet::IpNet;

use crate::{Error, openvpn::OpenVpnConfig, wireguard::WireguardConfig};

/// The tunnel to bring up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelConfig {
    WireGuard(WireguardConfig),
    OpenVpn(OpenVpnConfig),
}

impl TunnelConfig {
    /// Where the encrypted packets go: the only destinations the kill switch lets out. Servers
    /// named by host name are not among them until [`TunnelConfig::resolve`] replaced the name
    /// by its addresses.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        match self {
            Self::WireGuard(c) if c.peer.endpoint_name.is_none() => vec![Endpoint {
                addr: c.peer.endpoint,
                proto: Proto::Udp,
            }],
            Self::WireGuard(_) => Vec::new(),
            Self::OpenVpn(c) => c
                .remotes
                .iter()
                .filter_map(|r| match r {
                    Remote::Addr(e) => Some(*e),
                    Remote::Name { .. } => None,
                })
                .collect(),
        }
    }

    /// The host names of servers that must be resolved before connecting (each once).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Self::WireGuard(c) => c.peer.endpoint_name.iter().cloned().collect(),
            Self::OpenVpn(c) => c
                .remotes
                .iter()
                .filter_map(|r| match r {
                    Remote::Name { host, .. } => Some(host.clone()),
                    Remote::Addr(_) => None,
                })
                .collect(),
        };
        names.sort();
        names.dedup();
        names
    }

    /// The same tunnel with every server name replaced by its addresses (`answers`, from
    /// whatever resolved [`TunnelConfig::names`]): WireGuard takes the first address of its
    /// one peer, OpenVPN tries every address in turn. Fails naming a name without addresses.
    pub fn resolve(
        &self,
        answers: &std::collections::BTreeMap<String, Vec<IpAddr>>,
    ) -> Result<Self, String> {
        let lookup = |host: &str| {
            answers
                .get(host)
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("{host} has no address"))
        };
        match self {
            Self::WireGuard(c) => {
                let mut c = c.clone();
                if let Some(host) = c.peer.endpoint_name.take() {
                    c.peer.endpoint.set_ip(lookup(&host)?[0]);
                }
                Ok(Self::WireGuard(c))
            }
            Self::OpenVpn(c) => {
                let mut c = c.clone();
                let mut remotes = Vec::new();
                for remote in &c.remotes {
                    match remote {
                        Remote::Addr(_) => remotes.push(remote.clone()),
                        Remote::Name { host, port, proto } => {
                            remotes.extend(lookup(host)?.iter().map(|ip| {
                                Remote::Addr(Endpoint {
                                    addr: SocketAddr::new(*ip, *port),
                                    proto: *proto,
                                })
                            }));
                        }
                    }
                }
                c.remotes = remotes;
                Ok(Self::OpenVpn(c))
            }
        }
    }

    /// Whether the tunnel carries IPv6 (otherwise IPv6 is blocked outright).
    pub fn carries_ipv6(&self) -> bool {
        match self {
            Self::WireGuard(c) => {
                c.addresses.iter().any(|a| a.addr().is_ipv6())
                    && c.peer.allowed_ips.iter().any(|n| n.addr().is_ipv6())
            }
            Self::OpenVpn(c) => c.ipv6,
        }
    }

    /// Interface name the tunnel will have.
    pub fn interface(&self) -> &str {
        match self {
            Self::WireGuard(c) => &c.interface,
            Self::OpenVpn(c) => &c.interface,
        }
    }

    /// The MTU of the tunnel interface.
    pub fn mtu(&self) -> u32 {
        match self {
            Self::WireGuard(c) => c.mtu,
            Self::OpenVpn(c) => c.mtu,
        }
    }

    /// DNS servers the credentials name (wg-quick `DNS =`), if any.
    pub fn dns(&self) -> &[IpAddr] {
        match self {
            Self::WireGuard(c) => &c.dns,
            Self::OpenVpn(_) => &[],
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::WireGuard(_) => "wireguard",
            Self::OpenVpn(_) => "openvpn",
        }
    }
}

impl fmt::Display for TunnelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WireGuard(c) => write!(
                f,
                "wireguard {} mtu {} addresses [{}] peer {} endpoint {} allowed [{}]",
                c.interface,
                c.mtu,
                join(&c.addresses),
                c.peer.public_key,
                c.peer.endpoint_name.as_ref().map_or_else(
                    || c.peer.endpoint.to_string(),
                    |host| format!("{host}:{}", c.peer.endpoint.port())
                ),
                join(&c.peer.allowed_ips),
            ),
            Self::OpenVpn(c) => write!(
                f,
                "openvpn {} mtu {} remotes [{}]{}",
                c.interface,
                c.mtu,
                join(&c.remotes),
                if c.auth.is_some() { " with auth" } else { "" },
            ),
        }
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Transport of a tunnel's encrypted packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// A VPN server address the encrypted packets go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto.as_str())
    }
}

/// A VPN server as the credentials name it: an address, or a host name resolved before each
/// connection attempt (never by the tunnel implementation itself, whose lookups the kill switch
/// would drop).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Remote {
    Addr(Endpoint),
    Name {
        host: String,
        port: u16,
        proto: Proto,
    },
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(e) => e.fmt(f),
            Self::Name { host, port, proto } => write!(f, "{host}:{port}/{}", proto.as_str()),
        }
    }
}

/// Whether `host` may be a DNS name (letters, digits, `-`, `.`; labels of 1-63 characters).
pub fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        })
        && host.parse::<IpAddr>().is_err()
}

/// What an open tunnel reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStatus {
    pub state: TunnelState,
    /// WireGuard: time since the last completed handshake, `None` before the first. OpenVPN
    /// has no such figure (it watches its peer itself) and reports `None`.
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl TunnelStatus {
    /// A WireGuard tunnel's status: up once a handshake completed.
    pub fn wireguard(handshake_age: Option<Duration>, rx_bytes: u64, tx_bytes: u64) -> Self {
        Self {
            state: if handshake_age.is_some() {
                TunnelState::Up
            } else {
                TunnelState::Connecting
            },
            handshake_age,
            rx_bytes,
            tx_bytes,
        }
    }
}

/// Where a tunnel is in its own lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TunnelState {
    /// Interface up, no handshake yet (or the implementation is still connecting).
    #[default]
    Connecting,
    /// The implementation reports the tunnel up (WireGuard: a handshake completed).
    Up,
    /// The implementation failed for good (OpenVPN exited); the tunnel must be reopened.
    Failed(String),
}

/// An open tunnel. Dropping it tears it down.
pub trait Tunnel: Send + fmt::Debug {
    /// Reads the current status from the implementation.
    fn status(&mut self) -> Result<TunnelStatus, Error>;
    /// Which implementation is carrying it (`boringtun`, `kernel`, `openvpn`), for logs/metrics.
    fn implementation(&self) -> &'static str;
    /// Forgets a handshake that has not completed, so the next packet starts a new one at once
    /// (WireGuard otherwise retries only every 5 s: REKEY_TIMEOUT). Called while connecting.
    fn restart_handshake(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// Opens tunnels. The agent holds one driver and asks it for a tunnel per attempt.
pub trait TunnelDriver: Send + Sync {
    /// Opens `config`'s tunnel; `userspace_only` keeps WireGuard out of the kernel even where
    /// the module exists (read from each attempt's config, so a change applies on reconnect).
    fn open(&self, config: &TunnelConfig, userspace_only: bool) -> Result<Box<dyn Tunnel>, Error>;
}

/// The Linux driver: WireGuard in the kernel when the module exists, otherwise userspace
/// (boringtun, in this process); OpenVPN as a supervised child process.
#[derive(Debug, Clone)]
pub struct LinuxDriver {
    /// Directory for per-tunnel files (OpenVPN management socket, credentials), private to
    /// this agent: pods in one test share a filesystem.
    pub state_dir: std::path::PathBuf,
    /// The mark the tunnel's own encrypted packets carry (its data plane's
    /// [`crate::Identifiers::fwmark`]), so they skip the routing table that leads into it.
    pub fwmark: u32,
}

impl TunnelDriver for LinuxDriver {
    fn open(&self, config: &TunnelConfig, userspace_only: bool) -> Result<Box<dyn Tunnel>, Error> {
        match config {
            TunnelConfig::WireGuard(c) => {
                let marked = WireguardConfig {
                    fwmark: Some(self.fwmark),
                    ..c.clone()
                };
                crate::wireguard::open(&marked, userspace_only)
            }
            TunnelConfig::OpenVpn(c) => {
                crate::openvpn::OpenVpn::open(c, &self.state_dir, self.fwmark)
                    .map(|t| Box::new(t) as _)
            }
        }
    }
}

/// The in-memory fake: records what was opened; tests script what the tunnels report.
#[derive(Debug, Clone, Default)]
pub struct FakeDriver {
    pub inner: Arc<Mutex<FakeDriverState>>,
    /// Opening and closing land here as `tunnel open <interface>` and `tunnel close
    /// <interface>` (share it with the fake firewall and routes to observe their order).
    pub journal: Arc<Mutex<Vec<String>>>,
}

/// What a [`FakeDriver`] saw and what it will answer.
#[derive(Debug, Default)]
pub struct FakeDriverState {
    /// Every config opened, in order, with its `userspace_only`.
    pub opened: Vec<(TunnelConfig, bool)>,
    /// Tunnels currently open.
    pub open_now: usize,
    /// Opening fails with this message while set.
    pub fail_open: Option<String>,
    /// What every open tunnel reports.
    pub status: TunnelStatus,
}

impl TunnelDriver for FakeDriver {
    fn open(&self, config: &TunnelConfig, userspace_only: bool) -> Result<Box<dyn Tunnel>, Error> {
        let mut state = self
            .inner
            .lock()
            .map_err(|_| Error::Tunnel("poisoned".into()))?;
        state.opened.push((config.clone(), userspace_only));
        if let Some(message) = &state.fail_open {
            return Err(Error::Tunnel(message.clone()));
        }
        state.open_now += 1;
        let interface = config.interface().to_owned();
        if let Ok(mut j) = self.journal.lock() {
            j.push(format!("tunnel open {interface}"));
        }
        Ok(Box::new(FakeTunnel {
            driver: Arc::clone(&self.inner),
            journal: Arc::clone(&self.journal),
            interface,
        }))
    }
}

#[derive(Debug)]
struct FakeTunnel {
    driver: Arc<Mutex<FakeDriverState>>,
    journal: Arc<Mutex<Vec<String>>>,
    interface: String,
}

impl Tunnel for FakeTunnel {
    fn status(&mut self) -> Result<TunnelStatus, Error> {
        Ok(self
            .driver
            .lock()
            .map_err(|_| Error::Tunnel("poisoned".into()))?
            .status
            .clone())
    }

    fn implementation(&self) -> &'static str {
        "fake"
    }
}

impl Drop for FakeTunnel {
    fn drop(&mut self) {
        if let Ok(mut state) = self.driver.lock() {
            state.open_now -= 1;
        }
        if let Ok(mut j) = self.journal.lock() {
            j.push(format!("tunnel close {}", self.interface));
        }
    }
}

/// Networks a full-tunnel config routes (`0.0.0.0/0`, `::/0`).
pub fn default_routes() -> Vec<IpNet> {
    vec![
        IpNet::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0).unwrap_or_default(),
        IpNet::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0).unwrap_or_default(),
    ]
}
