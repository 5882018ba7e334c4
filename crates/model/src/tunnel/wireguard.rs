//! WireGuard credentials as a value: parsed from a wg-quick file or from gluetun's variables for a
//! custom endpoint. Running it is the data plane's job (`cloak_dataplane::wireguard`).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::secret::{Key, PublicKey, Secret};

/// 1420 = 1500 - 80: the largest WireGuard overhead (IPv6 outer header 40 + UDP 8 + WireGuard 32).
pub const DEFAULT_MTU: u32 = 1420;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    pub interface: String,
    pub private_key: Key,
    pub listen_port: Option<u16>,
    /// Mark on the encrypted packets. Parsed credentials leave it unset: the data plane that opens
    /// the tunnel sets its own (`Identifiers::fwmark`); a test server leaves it unset.
    pub fwmark: Option<u32>,
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    pub dns: Vec<IpAddr>,
    pub peer: WireguardPeer,
    /// Further peers (servers have many clients; the agent has exactly one peer).
    pub extra_peers: Vec<WireguardPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardPeer {
    pub public_key: PublicKey,
    pub preshared_key: Option<Key>,
    /// Where the peer is; with [`WireguardPeer::endpoint_name`], only its port counts until the
    /// name is resolved.
    pub endpoint: SocketAddr,
    /// The endpoint's host name, when the credentials give one (`Endpoint = vpn.example:51820`).
    pub endpoint_name: Option<String>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// Why credentials do not make a WireGuard config. Names keys and lines, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{0} is not a valid WireGuard key")]
    BadKey(&'static str),
    #[error("{key}: {problem}")]
    Bad { key: &'static str, problem: String },
    #[error("line {0}: expected `Key = Value` inside [Interface] or [Peer]")]
    Line(usize),
    #[error("{0} [Peer] sections; cloak connects to exactly one")]
    Peers(usize),
}

impl WireguardConfig {
    /// Parses a wg-quick file (`wg0.conf`). wg-quick's hooks (`PostUp`, ...) and `Table` are
    /// ignored: cloak owns routing and the firewall.
    pub fn from_wg_quick(text: &str, interface: &str) -> Result<Self, ParseError> {
        #[derive(PartialEq)]
        enum Section {
            None,
            Interface,
            Peer,
        }
        let mut section = Section::None;
        let mut private_key = None;
        let mut addresses = Vec::new();
        let mut dns = Vec::new();
        let mut mtu = None;
        let mut listen_port = None;
        let mut peers: Vec<PeerBuilder> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.eq_ignore_ascii_case("[interface]") {
                section = Section::Interface;
                continue;
            }
            if line.eq_ignore_ascii_case("[peer]") {
                section = Section::Peer;
                peers.push(PeerBuilder::default());
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ParseError::Line(n + 1));
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            match (&section, key.as_str()) {
                (Section::Interface, "privatekey") => {
                    private_key = Some(
                        Key::from_base64(value).map_err(|_| ParseError::BadKey("PrivateKey"))?,
                    );
                }
                (Section::Interface, "address") => addresses.extend(list(value, "Address")?),
                (Section::Interface, "dns") => {
                    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        // wg-quick also takes search domains here; only addresses matter to us.
                        if let Ok(addr) = item.parse() {
                            dns.push(addr);
                        }
                    }
                }
                (Section::Interface, "mtu") => {
                    mtu = Some(value.parse().map_err(|_| ParseError::Bad {
                        key: "MTU",
                        problem: "not a number".into(),
                    })?);
                }
                (Section::Interface, "listenport") => {
                    listen_port = Some(value.parse().map_err(|_| ParseError::Bad {
                        key: "ListenPort",
                        problem: "not a port".into(),
                    })?);
                }
                (Section::Peer, _) => {
                    if let Some(peer) = peers.last_mut() {
                        peer.set(&key, value)?;
                    }
                }
                (Section::None, _) => return Err(ParseError::Line(n + 1)),
                // Table, PostUp, PreDown, SaveConfig, FwMark...: cloak owns these.
                (Section::Interface, _) => {}
            }
        }
        if peers.len() != 1 {
            return Err(ParseError::Peers(peers.len()));
        }
        let peer = peers.remove(0).build()?;
        Ok(Self {
            interface: interface.to_owned(),
            private_key: private_key.ok_or(ParseError::Missing("PrivateKey"))?,
            listen_port,
            fwmark: None,
            addresses: non_empty(addresses, "Address")?,
            mtu: mtu.unwrap_or(DEFAULT_MTU),
            dns,
            peer,
            extra_peers: Vec::new(),
        })
    }

    /// The config as a wg-quick file, which [`Self::from_wg_quick`] reads back as the same
    /// config (for the agent's one peer; a name endpoint is written by name). A [`Secret`]: it
    /// holds the private key.
    pub fn to_wg_quick(&self) -> Secret {
        use std::fmt::Write as _;
        let join = |items: &[String]| items.join(", ");
        let mut out = String::from("[Interface]\n");
        let _ = writeln!(out, "PrivateKey = {}", &*self.private_key.to_base64());
        let addresses: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "Address = {}", join(&addresses));
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "DNS = {}", join(&dns));
        }
        let _ = writeln!(out, "MTU = {}", self.mtu);
        if let Some(port) = self.listen_port {
            let _ = writeln!(out, "ListenPort = {port}");
        }
        let peer = &self.peer;
        let _ = writeln!(out, "\n[Peer]\nPublicKey = {}", peer.public_key);
        if let Some(psk) = &peer.preshared_key {
            let _ = writeln!(out, "PresharedKey = {}", &*psk.to_base64());
        }
        let endpoint = peer.endpoint_name.as_ref().map_or_else(
            || peer.endpoint.to_string(),
            |name| format!("{name}:{}", peer.endpoint.port()),
        );
        let _ = writeln!(out, "Endpoint = {endpoint}");
        let allowed: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "AllowedIPs = {}", join(&allowed));
        if let Some(keepalive) = peer.persistent_keepalive {
            let _ = writeln!(out, "PersistentKeepalive = {keepalive}");
        }
        Secret::new(out)
    }

    /// Builds a config from gluetun's variables for a custom WireGuard endpoint
    /// (`VPN_ENDPOINT_IP`, `VPN_ENDPOINT_PORT`, `WIREGUARD_PUBLIC_KEY`, `WIREGUARD_PRIVATE_KEY`,
    /// `WIREGUARD_ADDRESSES`, optional `WIREGUARD_PRESHARED_KEY`, `WIREGUARD_MTU`,
    /// `WIREGUARD_ALLOWED_IPS`, `WIREGUARD_PERSISTENT_KEEPALIVE_INTERVAL`). `get` returns a
    /// variable's value.
    pub fn from_gluetun(
        get: impl Fn(&str) -> Option<Secret>,
        interface: &str,
    ) -> Result<Self, ParseError> {
        let need = |k: &'static str| {
            get(k)
                .filter(|v| !v.expose().trim().is_empty())
                .ok_or(ParseError::Missing(k))
        };
        let private_key = Key::from_base64(need("WIREGUARD_PRIVATE_KEY")?.expose())
            .map_err(|_| ParseError::BadKey("WIREGUARD_PRIVATE_KEY"))?;
        let public_key = PublicKey::from_base64(need("WIREGUARD_PUBLIC_KEY")?.expose())
            .map_err(|_| ParseError::BadKey("WIREGUARD_PUBLIC_KEY"))?;
        let preshared_key = get("WIREGUARD_PRESHARED_KEY")
            .filter(|v| !v.expose().trim().is_empty())
            .map(|v| {
                Key::from_base64(v.expose())
                    .map_err(|_| ParseError::BadKey("WIREGUARD_PRESHARED_KEY"))
            })
            .transpose()?;
        let ip: IpAddr = need("VPN_ENDPOINT_IP")?
            .expose()
            .trim()
            .parse()
            .map_err(|_| ParseError::Bad {
                key: "VPN_ENDPOINT_IP",
                problem: "not an IP address".into(),
            })?;
        let port: u16 = get("VPN_ENDPOINT_PORT")
            .unwrap_or_else(|| Secret::new("51820".into()))
            .expose()
            .trim()
            .parse()
            .map_err(|_| ParseError::Bad {
                key: "VPN_ENDPOINT_PORT",
                problem: "not a port".into(),
            })?;
        let allowed_ips = match get("WIREGUARD_ALLOWED_IPS") {
            Some(v) => list(v.expose(), "WIREGUARD_ALLOWED_IPS")?,
            None => crate::tunnel::default_routes(),
        };
        let number = |key: &'static str| -> Result<Option<u32>, ParseError> {
            get(key)
                .filter(|v| !v.expose().trim().is_empty())
                .map(|v| {
                    v.expose()
                        .trim()
                        .trim_end_matches('s')
                        .parse()
                        .map_err(|_| ParseError::Bad {
                            key,
                            problem: "not a number".into(),
                        })
                })
                .transpose()
        };
        Ok(Self {
            interface: interface.to_owned(),
            private_key,
            listen_port: None,
            fwmark: None,
            addresses: non_empty(
                list(need("WIREGUARD_ADDRESSES")?.expose(), "WIREGUARD_ADDRESSES")?,
                "WIREGUARD_ADDRESSES",
            )?,
            mtu: number("WIREGUARD_MTU")?.unwrap_or(DEFAULT_MTU),
            dns: Vec::new(),
            peer: WireguardPeer {
                public_key,
                preshared_key,
                endpoint: SocketAddr::new(ip, port),
                endpoint_name: None,
                allowed_ips,
                persistent_keepalive: number("WIREGUARD_PERSISTENT_KEEPALIVE_INTERVAL")?
                    .and_then(|n| u16::try_from(n).ok()),
            },
            extra_peers: Vec::new(),
        })
    }

    /// The first peer, then the others.
    pub fn peers(&self) -> impl Iterator<Item = &WireguardPeer> {
        std::iter::once(&self.peer).chain(&self.extra_peers)
    }
}

#[derive(Default)]
struct PeerBuilder {
    public_key: Option<PublicKey>,
    preshared_key: Option<Key>,
    endpoint: Option<(SocketAddr, Option<String>)>,
    allowed_ips: Vec<IpNet>,
    keepalive: Option<u16>,
}

impl PeerBuilder {
    fn set(&mut self, key: &str, value: &str) -> Result<(), ParseError> {
        match key {
            "publickey" => {
                self.public_key = Some(
                    PublicKey::from_base64(value).map_err(|_| ParseError::BadKey("PublicKey"))?,
                );
            }
            "presharedkey" => {
                self.preshared_key =
                    Some(Key::from_base64(value).map_err(|_| ParseError::BadKey("PresharedKey"))?);
            }
            "endpoint" => {
                // An address, or a host name the agent resolves before each connection (never
                // here: the kill switch may be closed while credentials are read).
                let bad = || ParseError::Bad {
                    key: "Endpoint",
                    problem: format!("{value:?} is not address:port or host:port"),
                };
                self.endpoint = Some(if let Ok(addr) = value.parse::<SocketAddr>() {
                    (addr, None)
                } else {
                    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
                    let port: u16 = port.parse().map_err(|_| bad())?;
                    if !crate::tunnel::is_host_name(host) {
                        return Err(bad());
                    }
                    (
                        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
                        Some(host.to_ascii_lowercase()),
                    )
                });
            }
            "allowedips" => self.allowed_ips.extend(list(value, "AllowedIPs")?),
            "persistentkeepalive" => {
                self.keepalive = if value == "off" {
                    None
                } else {
                    Some(value.parse().map_err(|_| ParseError::Bad {
                        key: "PersistentKeepalive",
                        problem: "not a number".into(),
                    })?)
                };
            }
            _ => {}
        }
        Ok(())
    }

    fn build(self) -> Result<WireguardPeer, ParseError> {
        Ok(WireguardPeer {
            public_key: self.public_key.ok_or(ParseError::Missing("PublicKey"))?,
            preshared_key: self.preshared_key,
            endpoint: self
                .endpoint
                .as_ref()
                .ok_or(ParseError::Missing("Endpoint"))?
                .0,
            endpoint_name: self.endpoint.and_then(|(_, name)| name),
            allowed_ips: non_empty(self.allowed_ips, "AllowedIPs")?,
            persistent_keepalive: self.keepalive,
        })
    }
}

fn list(value: &str, key: &'static str) -> Result<Vec<IpNet>, ParseError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| ParseError::Bad {
                    key,
                    problem: format!("{item:?} is not an address or CIDR"),
                })
        })
        .collect()
}

fn non_empty(v: Vec<IpNet>, key: &'static str) -> Result<Vec<IpNet>, ParseError> {
    if v.is_empty() {
        Err(ParseError::Missing(key))
    } else {
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(private: &Key, peer: &Key) -> String {
        format!(
            "# comment\n[Interface]\nPrivateKey = {}\nAddress = 10.64.0.2/32, fd64::2/128\nDNS = 10.64.0.1, corp.example\nMTU = 1380\nPostUp = iptables -A ...\n\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
            &*private.to_base64(),
            peer.public()
        )
    }

    #[test]
    fn wg_quick_file_parses_and_hooks_are_ignored() {
        let (k, p) = (Key::generate(), Key::generate());
        let c = WireguardConfig::from_wg_quick(&conf(&k, &p), "ck0").unwrap();
        assert_eq!(c.private_key, k);
        assert_eq!(c.mtu, 1380);
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.dns, vec!["10.64.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.peer.public_key, p.public());
        assert_eq!(c.peer.endpoint, "192.0.2.2:51820".parse().unwrap());
        assert_eq!(c.peer.persistent_keepalive, Some(25));
        assert_eq!(c.fwmark, None, "the data plane sets its own mark");
    }

    #[test]
    fn wg_quick_errors_name_the_key_not_the_value() {
        let (k, p) = (Key::generate(), Key::generate());
        let text = conf(&k, &p);
        let no_key = text.replace(&format!("PrivateKey = {}\n", &*k.to_base64()), "");
        assert_eq!(
            WireguardConfig::from_wg_quick(&no_key, "ck0"),
            Err(ParseError::Missing("PrivateKey"))
        );
        let bad_key = text.replace(&*k.to_base64(), "c2VjcmV0");
        let err = WireguardConfig::from_wg_quick(&bad_key, "ck0").unwrap_err();
        assert_eq!(err, ParseError::BadKey("PrivateKey"));
        assert!(!err.to_string().contains("c2VjcmV0"));
        assert_eq!(
            WireguardConfig::from_wg_quick("garbage", "ck0"),
            Err(ParseError::Line(1))
        );
        let two_peers = format!("{text}[Peer]\nPublicKey = {}\n", p.public());
        assert_eq!(
            WireguardConfig::from_wg_quick(&two_peers, "ck0"),
            Err(ParseError::Peers(2))
        );
    }

    #[test]
    fn a_config_written_as_wg_quick_reads_back_the_same() {
        let (k, p, psk) = (Key::generate(), Key::generate(), Key::generate());
        let mut c = WireguardConfig::from_wg_quick(&conf(&k, &p), "ck0").unwrap();
        c.peer.preshared_key = Some(psk);
        c.dns = vec!["10.64.0.1".parse().unwrap()];
        let text = c.to_wg_quick();
        assert_eq!(
            WireguardConfig::from_wg_quick(text.expose(), "ck0").unwrap(),
            c
        );
        c.peer.endpoint_name = Some("vpn.example".into());
        let named = WireguardConfig::from_wg_quick(c.to_wg_quick().expose(), "ck0").unwrap();
        assert_eq!(named.peer.endpoint_name.as_deref(), Some("vpn.example"));
        assert_eq!(named.peer.endpoint.port(), c.peer.endpoint.port());
    }

    #[test]
    fn gluetun_custom_endpoint_variables_parse() {
        let (k, p) = (Key::generate(), Key::generate());
        let vars = [
            ("VPN_SERVICE_PROVIDER", "custom".to_owned()),
            ("VPN_TYPE", "wireguard".to_owned()),
            ("VPN_ENDPOINT_IP", "192.0.2.2".to_owned()),
            ("VPN_ENDPOINT_PORT", "51821".to_owned()),
            ("WIREGUARD_PRIVATE_KEY", k.to_base64().to_string()),
            ("WIREGUARD_PUBLIC_KEY", p.public().to_string()),
            ("WIREGUARD_ADDRESSES", "10.64.0.2/32".to_owned()),
        ];
        let get = |key: &str| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| Secret::new(v.clone()))
        };
        let c = WireguardConfig::from_gluetun(get, "ck0").unwrap();
        assert_eq!(c.peer.endpoint, "192.0.2.2:51821".parse().unwrap());
        assert_eq!(c.peer.allowed_ips.len(), 2, "full tunnel by default");
        assert_eq!(c.mtu, DEFAULT_MTU);
        let missing = WireguardConfig::from_gluetun(
            |key| (key != "VPN_ENDPOINT_IP").then(|| get(key)).flatten(),
            "ck0",
        );
        assert_eq!(missing, Err(ParseError::Missing("VPN_ENDPOINT_IP")));
    }
}
