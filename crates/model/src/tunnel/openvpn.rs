//! OpenVPN credentials as a value: the provider's `config.ovpn` (kept whole: it may hold inline
//! keys) with the `remote` lines read out of it, plus optional username and password. Running it
//! is the data plane's job (`cloak_dataplane::openvpn`).

use std::net::SocketAddr;

use crate::{
    secret::Secret,
    tunnel::{Endpoint, Proto, Remote},
};

/// An OpenVPN client configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenVpnConfig {
    pub interface: String,
    /// The provider's config file as given (it may hold inline keys).
    pub config: Secret,
    /// Username and password for `--auth-user-pass`.
    pub auth: Option<(Secret, Secret)>,
    /// The `remote` lines, in order (host names are resolved by the agent before each
    /// connection, and openvpn is handed the addresses).
    pub remotes: Vec<Remote>,
    /// Whether the config routes IPv6 (`ifconfig-ipv6`, `route-ipv6`, `tun-ipv6`).
    pub ipv6: bool,
    pub mtu: u32,
}

/// Why a `config.ovpn` cannot be used. Names directives, never values of secret ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("config.ovpn has no `remote` line")]
    NoRemote,
    #[error("config.ovpn line {line}: {problem}")]
    Bad { line: usize, problem: String },
    #[error("config.ovpn uses `dev tap`; cloak supports tun only")]
    Tap,
}

impl OpenVpnConfig {
    pub fn from_ovpn(
        text: &str,
        auth: Option<(Secret, Secret)>,
        interface: &str,
    ) -> Result<Self, ParseError> {
        let mut proto = Proto::Udp;
        let mut port: u16 = 1194;
        let mut remotes: Vec<(usize, String, Option<u16>, Option<Proto>)> = Vec::new();
        let mut ipv6 = false;
        let mut mtu = 1500;
        let parse_proto = |p: &str| {
            if p.starts_with("tcp") {
                Proto::Tcp
            } else {
                Proto::Udp
            }
        };
        let mut in_block = false;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            // Inline blocks (<ca>...</ca>) hold keys and certificates: skip their contents.
            if line.starts_with("</") {
                in_block = false;
                continue;
            }
            if line.starts_with('<') {
                in_block = true;
                continue;
            }
            if in_block || line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let bad = |problem: &str| ParseError::Bad {
                line: n + 1,
                problem: problem.to_owned(),
            };
            match words[0] {
                "proto" => {
                    proto = parse_proto(words.get(1).ok_or_else(|| bad("proto needs a value"))?);
                }
                "port" => {
                    port = words
                        .get(1)
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| bad("port is not a number"))?;
                }
                "remote" => {
                    let host = words.get(1).ok_or_else(|| bad("remote needs a host"))?;
                    let rport = words
                        .get(2)
                        .map(|p| p.parse().map_err(|_| bad("remote port is not a number")))
                        .transpose()?;
                    remotes.push((
                        n + 1,
                        (*host).to_owned(),
                        rport,
                        words.get(3).map(|p| parse_proto(p)),
                    ));
                }
                "dev" | "dev-type" if words.get(1).is_some_and(|d| d.starts_with("tap")) => {
                    return Err(ParseError::Tap);
                }
                "ifconfig-ipv6" | "route-ipv6" | "tun-ipv6" => ipv6 = true,
                "tun-mtu" => {
                    mtu = words
                        .get(1)
                        .and_then(|m| m.parse().ok())
                        .ok_or_else(|| bad("tun-mtu is not a number"))?;
                }
                _ => {}
            }
        }
        if remotes.is_empty() {
            return Err(ParseError::NoRemote);
        }
        let mut endpoints = Vec::new();
        for (line, host, rport, rproto) in remotes {
            let (port, proto) = (rport.unwrap_or(port), rproto.unwrap_or(proto));
            endpoints.push(match host.parse::<std::net::IpAddr>() {
                Ok(ip) => Remote::Addr(Endpoint {
                    addr: SocketAddr::new(ip, port),
                    proto,
                }),
                Err(_) if crate::tunnel::is_host_name(&host) => Remote::Name {
                    host: host.to_ascii_lowercase(),
                    port,
                    proto,
                },
                Err(_) => {
                    return Err(ParseError::Bad {
                        line,
                        problem: format!("remote {host:?} is neither an address nor a host name"),
                    });
                }
            });
        }
        Ok(Self {
            interface: interface.to_owned(),
            config: Secret::new(text.to_owned()),
            auth,
            remotes: endpoints,
            ipv6,
            mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVPN: &str = "client\ndev tun\nproto udp\nremote 192.0.2.2 1194\nremote 192.0.2.3 443 tcp\nport 1195\nnobind\n<key>\n-----BEGIN PRIVATE KEY-----\nremote 6.6.6.6\n-----END PRIVATE KEY-----\n</key>\n";

    #[test]
    fn remotes_are_read_outside_inline_blocks() {
        let c = OpenVpnConfig::from_ovpn(OVPN, None, "ck0").unwrap();
        assert_eq!(
            c.remotes,
            vec![
                Remote::Addr(Endpoint {
                    addr: "192.0.2.2:1194".parse().unwrap(),
                    proto: Proto::Udp
                }),
                Remote::Addr(Endpoint {
                    addr: "192.0.2.3:443".parse().unwrap(),
                    proto: Proto::Tcp
                }),
            ]
        );
        assert!(!c.ipv6);
        assert_eq!(format!("{:?}", c.config), "<redacted>");
    }

    #[test]
    fn bad_ovpn_files_say_what_is_wrong() {
        assert_eq!(
            OpenVpnConfig::from_ovpn("client\ndev tun\n", None, "ck0"),
            Err(ParseError::NoRemote)
        );
        assert_eq!(
            OpenVpnConfig::from_ovpn("dev tap0\nremote 192.0.2.2\n", None, "ck0"),
            Err(ParseError::Tap)
        );
        assert!(matches!(
            OpenVpnConfig::from_ovpn("remote 192.0.2.2 notaport\n", None, "ck0"),
            Err(ParseError::Bad { line: 1, .. })
        ));
    }
}
