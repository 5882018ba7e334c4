//! The tunnel to bring up, as a value: what a credentials Secret describes
//! ([`crate::credentials::parse`]), before and after its server names are resolved. No I/O:
//! resolving names and opening tunnels are the agent's and the data plane's.

pub mod openvpn;
pub mod wireguard;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;

use self::{openvpn::OpenVpnConfig, wireguard::WireguardConfig};

/// The tunnel interface's name when nothing else is asked for (the agent's default).
pub const DEFAULT_INTERFACE: &str = "ck0";

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

    /// Lowers the tunnel interface's MTU to `most` when it is above it (a chain's hop: what
    /// fits through the hop before it). Under 1280 bytes the tunnel carries IPv4 alone (the
    /// kernel keeps no IPv6 on such a link): its IPv6 addresses are dropped, so IPv6 is refused
    /// as by any tunnel without it.
    pub fn cap_mtu(&mut self, most: u32) {
        match self {
            Self::WireGuard(c) => {
                c.mtu = c.mtu.min(most);
                if c.mtu < 1280 {
                    c.addresses.retain(|a| a.addr().is_ipv4());
                }
            }
            Self::OpenVpn(c) => {
                c.mtu = c.mtu.min(most);
                if c.mtu < 1280 {
                    c.ipv6 = false;
                }
            }
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

/// Networks a full-tunnel config routes (`0.0.0.0/0`, `::/0`).
pub fn default_routes() -> Vec<IpNet> {
    vec![
        IpNet::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0).unwrap_or_default(),
        IpNet::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0).unwrap_or_default(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_capped_under_1280_bytes_drops_its_ipv6_and_one_above_keeps_it() {
        let text = "[Interface]\nPrivateKey = wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=\nAddress = 10.64.0.2/32, fd00::2/128\n\n[Peer]\nPublicKey = wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0, ::/0\n";
        let wg = || {
            TunnelConfig::WireGuard(wireguard::WireguardConfig::from_wg_quick(text, "ck0").unwrap())
        };
        let addresses = |t: &TunnelConfig| match t {
            TunnelConfig::WireGuard(c) => c.addresses.len(),
            TunnelConfig::OpenVpn(_) => 0,
        };
        let mut through_one = wg();
        through_one.cap_mtu(1340);
        assert_eq!((through_one.mtu(), addresses(&through_one)), (1340, 2));
        let mut through_two = wg();
        through_two.cap_mtu(1260);
        assert_eq!((through_two.mtu(), addresses(&through_two)), (1260, 1));
        let mut wide = wg();
        wide.cap_mtu(9000);
        assert_eq!(wide.mtu(), 1420, "never raised");
    }
}
