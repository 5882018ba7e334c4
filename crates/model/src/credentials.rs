//! A provider's credentials Secret, parsed once into the tunnel it describes. This is the one
//! parser: the operator classifies and verifies a provider with it and the agent runs what it
//! returns, so a provider is never Ready with credentials the agent would refuse. Values are
//! never logged or put in an error; messages name keys and lines.
//!
//! Parsing stops at host names: a server given as `vpn.example.com` stays a name in the
//! [`TunnelConfig`], and resolving it is a separate step ([`TunnelConfig::names`],
//! [`TunnelConfig::resolve`]) taken by whoever connects, right before connecting.

use std::collections::BTreeMap;

use cloak_api::TunnelKind;

use crate::{
    secret::Secret,
    tunnel::{
        TunnelConfig,
        openvpn::{self, OpenVpnConfig},
        wireguard::{self, WireguardConfig},
    },
};

/// The formats a credentials Secret may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// gluetun's environment variables (`VPN_SERVICE_PROVIDER`, `OPENVPN_USER`, ...).
    Gluetun,
    /// A wg-quick configuration under the key `wg0.conf`.
    WgQuick,
    /// An OpenVPN configuration under the key `config.ovpn` (+ optional `username`/`password`).
    Ovpn,
}

/// A Secret's credentials, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub format: Format,
    pub kind: TunnelKind,
    /// The tunnel cloak's agent runs. `None` only for gluetun variables that name a provider's
    /// server list (`VPN_SERVICE_PROVIDER=mullvad`, ...), which only gluetun can turn into a
    /// server.
    pub tunnel: Option<TunnelConfig>,
    /// gluetun's `VPN_SERVICE_PROVIDER`, when given (a provider's name, not a secret).
    pub provider: Option<String>,
}

/// What a Secret holds, without the tunnel: what the operator records and verifies by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub format: Format,
    pub tunnel: TunnelKind,
}

/// Why a Secret cannot serve as credentials. Messages name keys and lines, never secret values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "the Secret has no credentials: expected a wg0.conf key, a config.ovpn key (with optional username and password), a pool of server files (<name>.conf or <name>.ovpn), or gluetun variables (VPN_SERVICE_PROVIDER, or WIREGUARD_PRIVATE_KEY, WIREGUARD_PUBLIC_KEY, WIREGUARD_ADDRESSES and VPN_ENDPOINT_IP for a custom endpoint)"
    )]
    Empty,
    #[error("wg0.conf: {0}")]
    WgQuick(wireguard::ParseError),
    /// openvpn's messages already name `config.ovpn`.
    #[error("{0}")]
    Ovpn(openvpn::ParseError),
    #[error("gluetun WireGuard variables: {0}")]
    GluetunWireguard(wireguard::ParseError),
    #[error("username and password must be given together")]
    HalfAuth,
    #[error(
        "gluetun variables for VPN_SERVICE_PROVIDER={provider} are run by gluetun only (a provider's server list, or a custom OpenVPN config file): give a wg0.conf, a config.ovpn (with username and password), or a custom WireGuard endpoint (VPN_ENDPOINT_IP, WIREGUARD_PUBLIC_KEY)"
    )]
    NeedsGluetun { provider: String },
    #[error("spec.tunnel is {declared:?} but the Secret holds {found:?} credentials")]
    TunnelMismatch {
        declared: TunnelKind,
        found: TunnelKind,
    },
    #[error("key {0} is not valid UTF-8")]
    NotUtf8(String),
    #[error(
        "the Secret mixes WireGuard (.conf) and OpenVPN (.ovpn) servers; a provider has one tunnel kind"
    )]
    MixedPool,
    /// A pool's server file is named by its key.
    #[error("{key}: {source}")]
    PoolServer {
        key: String,
        source: Box<CredentialsError>,
    },
}

/// The Secret key naming the ports a provider forwards to this account for good (picked in the
/// provider's account page: AirVPN, Windscribe): gluetun's name for them.
pub const STATIC_PORTS_KEY: &str = "FIREWALL_VPN_INPUT_PORTS";

/// The ports of [`STATIC_PORTS_KEY`] (comma-separated, spaces allowed), in order, each once;
/// none when the key is absent. A value that is no port list is an error naming it.
pub fn static_ports(keys: &BTreeMap<String, Secret>) -> Result<Vec<u16>, String> {
    let Some(value) = keys.get(STATIC_PORTS_KEY) else {
        return Ok(Vec::new());
    };
    let mut ports = Vec::new();
    for item in value
        .expose()
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        match item.parse::<u16>() {
            Ok(port) if port != 0 => {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
            _ => {
                return Err(format!(
                    "{STATIC_PORTS_KEY}: {item:?} is not a port (1-65535; a comma-separated list)"
                ));
            }
        }
    }
    Ok(ports)
}

/// Parses credentials from Secret keys (a Secret's `data`, or a mounted Secret's files).
/// `interface` names the tunnel interface the result will have.
///
/// The keys are looked at in this order: `wg0.conf`; `config.ovpn` with `username`/`password`
/// (or gluetun's `OPENVPN_USER`/`OPENVPN_PASSWORD`); a pool's first server (`<name>.conf` or
/// `<name>.ovpn`, see [`Pool`]); gluetun variables.
pub fn parse(
    keys: &BTreeMap<String, Secret>,
    interface: &str,
) -> Result<Credentials, CredentialsError> {
    let get = |k: &str| {
        keys.get(k)
            .map(|s| Secret::new(s.expose().trim().to_owned()))
    };
    if let Some(conf) = keys.get("wg0.conf") {
        let wg = WireguardConfig::from_wg_quick(conf.expose(), interface)
            .map_err(CredentialsError::WgQuick)?;
        return Ok(Credentials {
            format: Format::WgQuick,
            kind: TunnelKind::WireGuard,
            tunnel: Some(TunnelConfig::WireGuard(wg)),
            provider: None,
        });
    }
    if let Some(conf) = keys.get("config.ovpn") {
        let user = get("username").or_else(|| get("OPENVPN_USER"));
        let pass = get("password").or_else(|| get("OPENVPN_PASSWORD"));
        let auth = match (user, pass) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err(CredentialsError::HalfAuth),
        };
        let ovpn = OpenVpnConfig::from_ovpn(conf.expose(), auth, interface)
            .map_err(CredentialsError::Ovpn)?;
        return Ok(Credentials {
            format: Format::Ovpn,
            kind: TunnelKind::OpenVpn,
            tunnel: Some(TunnelConfig::OpenVpn(ovpn)),
            provider: None,
        });
    }
    // A pool of servers (see [`Pool`]) without a single-server file, as a provider's Secret or
    // a mask's copy of it mounted whole: its first server in key order, with the shared login.
    let mut servers = keys.keys().filter_map(|k| Some((k, server_kind(k)?)));
    if let Some((first, kind)) = servers.next() {
        if servers.any(|(_, other)| other != kind) {
            return Err(CredentialsError::MixedPool);
        }
        return parse(&one_server(keys, first, kind), interface).map_err(|e| {
            CredentialsError::PoolServer {
                key: first.clone(),
                source: Box::new(e),
            }
        });
    }
    let provider = get("VPN_SERVICE_PROVIDER");
    if provider.is_none() && !keys.contains_key("WIREGUARD_PRIVATE_KEY") {
        return Err(CredentialsError::Empty);
    }
    let wireguard = get("VPN_TYPE").is_some_and(|t| t.expose() == "wireguard")
        || keys.contains_key("WIREGUARD_PRIVATE_KEY");
    let kind = if wireguard {
        TunnelKind::WireGuard
    } else {
        TunnelKind::OpenVpn
    };
    // A custom endpoint (or no provider at all) is a whole WireGuard config cloak can run. A
    // named provider means gluetun's server list, even with VPN_ENDPOINT_IP (gluetun takes that
    // as an address override and the key from its list), unless the server's key is given too.
    let custom = provider.as_ref().is_none_or(|p| p.expose() == "custom")
        || (keys.contains_key("VPN_ENDPOINT_IP") && keys.contains_key("WIREGUARD_PUBLIC_KEY"));
    let tunnel = if wireguard && custom {
        let wg = WireguardConfig::from_gluetun(get, interface)
            .map_err(CredentialsError::GluetunWireguard)?;
        Some(TunnelConfig::WireGuard(wg))
    } else {
        None
    };
    Ok(Credentials {
        format: Format::Gluetun,
        kind,
        tunnel,
        provider: provider.map(|p| p.expose().to_owned()),
    })
}

/// One server of a provider's pool: a Secret key holding one server's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The key's name without its extension (`se-got-101` for `se-got-101.conf`): what a status
    /// records, never a secret.
    pub name: String,
    /// The Secret key it came from.
    pub key: String,
    pub tunnel: TunnelConfig,
}

/// A provider's servers, for the exits and masks that pick one each (issue 9's server pools).
///
/// A Secret names its servers one per key: wg-quick files as `<name>.conf`, OpenVPN files as
/// `<name>.ovpn` (with one `username`/`password` for all), never both kinds. `wg0.conf` or
/// `config.ovpn` alone is a pool of one. gluetun variables are no pool: gluetun picks its
/// servers itself, so `servers` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub format: Format,
    pub kind: TunnelKind,
    /// In key order.
    pub servers: Vec<Server>,
}

/// Why a Secret is no pool of servers. Names keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("{key}: {source}")]
    Server {
        key: String,
        source: Box<CredentialsError>,
    },
    #[error(
        "the Secret mixes WireGuard (.conf) and OpenVPN (.ovpn) servers; a provider has one tunnel kind"
    )]
    Mixed,
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

/// Reads a provider's pool of servers from its Secret's keys (see [`Pool`]).
pub fn pool(keys: &BTreeMap<String, Secret>, interface: &str) -> Result<Pool, PoolError> {
    let of_kind = |kind| {
        keys.keys()
            .filter(|k| server_kind(k) == Some(kind))
            .cloned()
            .collect::<Vec<_>>()
    };
    let (wg, ovpn) = (of_kind(TunnelKind::WireGuard), of_kind(TunnelKind::OpenVpn));
    let (format, kind, server_keys) = match (wg.is_empty(), ovpn.is_empty()) {
        (false, false) => return Err(PoolError::Mixed),
        (false, true) => (Format::WgQuick, TunnelKind::WireGuard, wg),
        (true, false) => (Format::Ovpn, TunnelKind::OpenVpn, ovpn),
        (true, true) => {
            let gluetun = parse(keys, interface)?;
            return Ok(Pool {
                format: gluetun.format,
                kind: gluetun.kind,
                servers: Vec::new(),
            });
        }
    };
    let mut servers = Vec::new();
    for key in server_keys {
        // Each server parses as the Secret of one server would, its login included.
        let parsed =
            parse(&one_server(keys, &key, kind), interface).map_err(|e| PoolError::Server {
                key: key.clone(),
                source: Box::new(e),
            })?;
        let Some(tunnel) = parsed.tunnel else {
            continue;
        };
        let name = key[..key.rfind('.').unwrap_or(key.len())].to_owned();
        servers.push(Server { name, key, tunnel });
    }
    Ok(Pool {
        format,
        kind,
        servers,
    })
}

/// The key a Secret of one server of `kind` holds its file under.
fn single_server_file(kind: TunnelKind) -> &'static str {
    match kind {
        TunnelKind::WireGuard => "wg0.conf",
        TunnelKind::OpenVpn => "config.ovpn",
    }
}

/// The Secret of one server of a pool: the pool's keys that are no server file (a shared login),
/// and `key`'s file under the single-server name of `kind`.
fn one_server(
    keys: &BTreeMap<String, Secret>,
    key: &str,
    kind: TunnelKind,
) -> BTreeMap<String, Secret> {
    let mut one: BTreeMap<String, Secret> = keys
        .iter()
        .filter(|(k, _)| server_kind(k).is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    one.insert(single_server_file(kind).to_owned(), keys[key].clone());
    one
}

/// The kind of server a key holds by its extension (`.conf` WireGuard, `.ovpn` OpenVPN, any
/// case), or `None` for keys that are no server file.
fn server_kind(key: &str) -> Option<TunnelKind> {
    let (stem, extension) = key.rsplit_once('.')?;
    if stem.is_empty() {
        None
    } else if extension.eq_ignore_ascii_case("conf") {
        Some(TunnelKind::WireGuard)
    } else if extension.eq_ignore_ascii_case("ovpn") {
        Some(TunnelKind::OpenVpn)
    } else {
        None
    }
}

impl Pool {
    /// The keys of a copy that holds only `server`: `(key in the copy, key in the provider's
    /// Secret)`. The copy names the server's file `wg0.conf` or `config.ovpn`, as a Secret of one
    /// server does, so whatever reads it (cloak's agent, a user's wg-quick) needs no pool logic.
    pub fn copy_keys<'a>(
        &self,
        server: &'a Server,
        keys: &'a BTreeMap<String, Secret>,
    ) -> Vec<(&'static str, &'a str)> {
        let mut copy = vec![(single_server_file(self.kind), server.key.as_str())];
        // The login, and the ports the provider forwards to the account for good.
        for login in [
            "username",
            "password",
            "OPENVPN_USER",
            "OPENVPN_PASSWORD",
            STATIC_PORTS_KEY,
        ] {
            if let Some((key, _)) = keys.get_key_value(login) {
                copy.push((login, key.as_str()));
            }
        }
        copy
    }
}

/// The server an exit (or a mask) should use next, from the pool in its order: the first after
/// `current` (rotation: a failing server is replaced by the next one) that no sibling uses and
/// that has not failed; else the one with the fewest siblings on it that has not failed; `None`
/// when every server failed. `siblings` are the servers the other exits of the same gateway on
/// the same provider use.
pub fn next_server<'a>(
    pool: &'a [Server],
    current: Option<&str>,
    siblings: &[&str],
    failed: &[&str],
) -> Option<&'a Server> {
    let start = current
        .and_then(|c| pool.iter().position(|s| s.name == c))
        .map_or(0, |i| i + 1);
    let in_order = pool[start..].iter().chain(&pool[..start]);
    let usable = || {
        in_order
            .clone()
            .filter(|s| !failed.contains(&s.name.as_str()))
    };
    usable()
        .find(|s| !siblings.contains(&s.name.as_str()))
        .or_else(|| usable().min_by_key(|s| siblings.iter().filter(|n| **n == s.name).count()))
}

impl Credentials {
    /// The tunnel cloak runs, or why only gluetun can run these credentials.
    pub fn into_tunnel(self) -> Result<TunnelConfig, CredentialsError> {
        let provider = self.provider;
        self.tunnel.ok_or_else(|| CredentialsError::NeedsGluetun {
            provider: provider.unwrap_or_default(),
        })
    }
}

/// Whether [`parse`] reads `key`.
fn is_read(key: &str) -> bool {
    matches!(key, "wg0.conf" | "config.ovpn" | "username" | "password")
        || ["VPN_", "WIREGUARD_", "OPENVPN_"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
}

/// A Secret's keys (its `data`, or a mounted Secret's files) as the text values [`parse`] takes.
/// Keys the parser reads must be UTF-8; other keys may hold anything (a CA bundle, notes) and
/// are left out. The operator and the agent both start here, so a binary key means the same to
/// both.
pub fn keys<'a>(
    data: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<BTreeMap<String, Secret>, CredentialsError> {
    let mut keys = BTreeMap::new();
    for (key, value) in data {
        match std::str::from_utf8(value) {
            Ok(text) => {
                keys.insert(key.to_owned(), Secret::new(text.to_owned()));
            }
            Err(_) if is_read(key) => return Err(CredentialsError::NotUtf8(key.to_owned())),
            Err(_) => {}
        }
    }
    Ok(keys)
}

/// Classifies a Secret's `data` (key → bytes), parsing it whole with [`parse`]. `declared` is the
/// provider's `spec.tunnel`.
pub fn classify(
    data: &BTreeMap<String, Vec<u8>>,
    declared: Option<TunnelKind>,
) -> Result<Summary, CredentialsError> {
    let keys = keys(data.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    let found = parse(&keys, crate::tunnel::DEFAULT_INTERFACE)?;
    match declared {
        Some(declared) if declared != found.kind => Err(CredentialsError::TunnelMismatch {
            declared,
            found: found.kind,
        }),
        _ => Ok(Summary {
            format: found.format,
            tunnel: found.kind,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secrets_static_ports_are_read_in_order_once_each_and_a_bad_one_is_named() {
        let keys =
            |v: &str| BTreeMap::from([(STATIC_PORTS_KEY.to_owned(), Secret::new(v.to_owned()))]);
        assert_eq!(
            static_ports(&keys("51413, 51414,51413")),
            Ok(vec![51413, 51414])
        );
        assert_eq!(static_ports(&BTreeMap::new()), Ok(Vec::new()));
        let err = static_ports(&keys("51413,http")).unwrap_err();
        assert!(err.contains("\"http\" is not a port"), "{err}");
        assert!(static_ports(&keys("0")).is_err());
    }

    fn secret(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Secret::new((*v).to_owned())))
            .collect()
    }

    const PRIVATE: &str = "YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUBLIC: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn wg() -> String {
        format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nAddress = 10.2.0.2/32\n[Peer]\nPublicKey = {PUBLIC}\nEndpoint = vpn.example:51820\nAllowedIPs = 0.0.0.0/0\n"
        )
    }

    #[test]
    fn each_accepted_format_is_recognized() {
        let wg = classify(&secret(&[("wg0.conf", &wg())]), None).unwrap();
        assert_eq!(
            wg,
            Summary {
                format: Format::WgQuick,
                tunnel: TunnelKind::WireGuard
            }
        );
        let ovpn = classify(
            &secret(&[("config.ovpn", "client\nremote vpn.example 1194\n")]),
            None,
        )
        .unwrap();
        assert_eq!(ovpn.tunnel, TunnelKind::OpenVpn);
        let gluetun = classify(
            &secret(&[("VPN_SERVICE_PROVIDER", "nordvpn"), ("OPENVPN_USER", "u")]),
            None,
        )
        .unwrap();
        assert_eq!(
            gluetun,
            Summary {
                format: Format::Gluetun,
                tunnel: TunnelKind::OpenVpn
            }
        );
        let gluetun_wg = classify(
            &secret(&[
                ("VPN_SERVICE_PROVIDER", "mullvad"),
                ("VPN_TYPE", "wireguard"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(gluetun_wg.tunnel, TunnelKind::WireGuard);
    }

    #[test]
    fn what_classification_accepts_the_agent_runs() {
        // The same parse: a wg0.conf the operator accepts is a tunnel, host name kept unresolved.
        let parsed = parse(&keys(&[("wg0.conf", &wg())]), "ck7").unwrap();
        let Some(TunnelConfig::WireGuard(c)) = parsed.tunnel else {
            panic!("not a WireGuard tunnel: {parsed:?}");
        };
        assert_eq!(c.interface, "ck7");
        assert_eq!(c.peer.endpoint_name.as_deref(), Some("vpn.example"));
        // A peer without AllowedIPs is refused by the agent, so classification refuses it too.
        let no_allowed = wg().replace("AllowedIPs = 0.0.0.0/0\n", "");
        assert_eq!(
            classify(&secret(&[("wg0.conf", &no_allowed)]), None),
            Err(CredentialsError::WgQuick(wireguard::ParseError::Missing(
                "AllowedIPs"
            )))
        );
        // As is a key that is not a key.
        let bad_key = wg().replace(PUBLIC, "c2hvcnQ=");
        assert!(matches!(
            classify(&secret(&[("wg0.conf", &bad_key)]), None),
            Err(CredentialsError::WgQuick(wireguard::ParseError::BadKey(
                "PublicKey"
            )))
        ));
        // gluetun's custom WireGuard endpoint is run by cloak, and so checked whole.
        let custom = [
            ("VPN_SERVICE_PROVIDER", "custom"),
            ("VPN_TYPE", "wireguard"),
            ("VPN_ENDPOINT_IP", "192.0.2.2"),
            ("WIREGUARD_PRIVATE_KEY", PRIVATE),
            ("WIREGUARD_PUBLIC_KEY", PUBLIC),
            ("WIREGUARD_ADDRESSES", "10.2.0.2/32"),
        ];
        assert!(classify(&secret(&custom), None).is_ok());
        let tunnel = parse(&keys(&custom), "ck0").unwrap().into_tunnel().unwrap();
        assert_eq!(
            tunnel.endpoints()[0].addr,
            "192.0.2.2:51820".parse().unwrap()
        );
        assert_eq!(
            classify(&secret(&custom[..5]), None),
            Err(CredentialsError::GluetunWireguard(
                wireguard::ParseError::Missing("WIREGUARD_ADDRESSES")
            ))
        );
        // A half login is refused by both.
        assert_eq!(
            classify(
                &secret(&[("config.ovpn", "remote 192.0.2.2\n"), ("username", "u")]),
                None
            ),
            Err(CredentialsError::HalfAuth)
        );
    }

    #[test]
    fn a_providers_server_list_is_gluetuns_alone() {
        let parsed = parse(
            &keys(&[
                ("VPN_SERVICE_PROVIDER", "mullvad"),
                ("VPN_TYPE", "wireguard"),
                ("WIREGUARD_PRIVATE_KEY", PRIVATE),
            ]),
            "ck0",
        )
        .unwrap();
        assert_eq!(parsed.format, Format::Gluetun);
        assert_eq!(parsed.tunnel, None);
        // VPN_ENDPOINT_IP with a named provider overrides the address of one of its servers;
        // the key still comes from gluetun's list.
        let overridden = parse(
            &keys(&[
                ("VPN_SERVICE_PROVIDER", "mullvad"),
                ("VPN_TYPE", "wireguard"),
                ("VPN_ENDPOINT_IP", "192.0.2.2"),
                ("WIREGUARD_PRIVATE_KEY", PRIVATE),
            ]),
            "ck0",
        )
        .unwrap();
        assert_eq!(overridden.tunnel, None);
        let err = parsed.into_tunnel().unwrap_err();
        assert!(
            err.to_string().contains("VPN_SERVICE_PROVIDER=mullvad"),
            "{err}"
        );
        assert!(!err.to_string().contains(PRIVATE));
    }

    #[test]
    fn malformed_or_empty_secrets_say_what_is_missing() {
        assert_eq!(
            classify(&secret(&[("foo", "bar")]), None),
            Err(CredentialsError::Empty)
        );
        assert!(matches!(
            classify(&secret(&[("wg0.conf", "[Interface]\n")]), None),
            Err(CredentialsError::WgQuick(_))
        ));
        assert!(matches!(
            classify(&secret(&[("config.ovpn", "client\n")]), None),
            Err(CredentialsError::Ovpn(_))
        ));
        let mut binary = secret(&[("wg0.conf", &wg())]);
        binary.insert("ca.der".into(), vec![0xff, 0xfe]);
        assert!(
            classify(&binary, None).is_ok(),
            "keys not read may hold bytes"
        );
        binary.insert("password".into(), vec![0xff, 0xfe]);
        assert_eq!(
            classify(&binary, None),
            Err(CredentialsError::NotUtf8("password".into()))
        );
    }

    #[test]
    fn a_declared_tunnel_must_match_the_secret() {
        let err = classify(&secret(&[("wg0.conf", &wg())]), Some(TunnelKind::OpenVpn)).unwrap_err();
        assert!(err.to_string().contains("spec.tunnel"));
    }

    #[test]
    fn errors_never_echo_secret_values() {
        let err = classify(
            &secret(&[("wg0.conf", "[Interface]\nPrivateKey = SUPERSECRET\n")]),
            None,
        )
        .unwrap_err();
        assert!(!err.to_string().contains("SUPERSECRET"));
    }

    fn wg_server(endpoint: &str) -> String {
        wg().replace("vpn.example:51820", endpoint)
    }

    #[test]
    fn a_secret_with_several_server_files_is_a_pool_in_key_order() {
        let keys = keys(&[
            ("se-2.conf", &wg_server("192.0.2.12:51820")),
            ("se-1.conf", &wg_server("192.0.2.11:51820")),
            ("notes", "not a server"),
        ]);
        let p = pool(&keys, "ck0").unwrap();
        assert_eq!(p.kind, TunnelKind::WireGuard);
        let names: Vec<_> = p.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["se-1", "se-2"]);
        assert_eq!(
            p.servers[1].tunnel.endpoints()[0].addr,
            "192.0.2.12:51820".parse().unwrap()
        );
        // The copy for one server is a Secret of one server.
        assert_eq!(
            p.copy_keys(&p.servers[1], &keys),
            [("wg0.conf", "se-2.conf")]
        );
        // A single wg0.conf is a pool of one.
        let one = pool(&keys_of_one(), "ck0").unwrap();
        assert_eq!(one.servers.len(), 1);
        assert_eq!(one.servers[0].name, "wg0");
    }

    #[test]
    fn a_pool_without_a_single_server_file_reads_as_its_first_server_and_a_mixed_one_is_refused() {
        // A provider whose Secret is a pool (and a mask's copy of it, mounted whole by a
        // verification pod or a workload's agent) is usable as it is: its first server.
        let pool_keys = keys(&[
            ("se-2.conf", &wg_server("192.0.2.12:51820")),
            ("se-1.conf", &wg_server("192.0.2.11:51820")),
        ]);
        let first = parse(&pool_keys, "ck0").unwrap();
        assert_eq!(first.format, Format::WgQuick);
        assert_eq!(
            first.tunnel.unwrap().endpoints()[0].addr,
            "192.0.2.11:51820".parse().unwrap()
        );
        let data: BTreeMap<String, Vec<u8>> = pool_keys
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().as_bytes().to_vec()))
            .collect();
        assert_eq!(
            classify(&data, Some(TunnelKind::WireGuard)).unwrap().format,
            Format::WgQuick
        );
        let mut mixed = data.clone();
        mixed.insert(
            "nl-1.ovpn".into(),
            b"client\nremote 192.0.2.21 1194\n".to_vec(),
        );
        assert!(
            classify(&mixed, None)
                .unwrap_err()
                .to_string()
                .contains("mixes WireGuard"),
        );
    }

    fn keys_of_one() -> BTreeMap<String, Secret> {
        keys(&[("wg0.conf", &wg())])
    }

    #[test]
    fn openvpn_servers_share_one_login_and_a_bad_server_is_named() {
        let keys = keys(&[
            ("nl-1.ovpn", "client\nremote 192.0.2.21 1194\n"),
            ("nl-2.ovpn", "client\nremote 192.0.2.22 1194\n"),
            ("username", "u"),
            ("password", "p"),
        ]);
        let p = pool(&keys, "ck0").unwrap();
        assert_eq!(p.servers.len(), 2);
        let TunnelConfig::OpenVpn(c) = &p.servers[0].tunnel else {
            panic!("not OpenVPN");
        };
        assert!(c.auth.is_some(), "the shared login goes with every server");
        assert_eq!(
            p.copy_keys(&p.servers[0], &keys),
            [
                ("config.ovpn", "nl-1.ovpn"),
                ("username", "username"),
                ("password", "password")
            ]
        );
        let mut bad = keys.clone();
        bad.insert("nl-3.ovpn".into(), Secret::new("client\n".into()));
        let err = pool(&bad, "ck0").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("nl-3.ovpn: config.ovpn has no `remote` line"),
            "{err}"
        );
        bad.insert("x.conf".into(), Secret::new(wg()));
        assert_eq!(pool(&bad, "ck0"), Err(PoolError::Mixed));
    }

    #[test]
    fn gluetun_variables_are_no_pool() {
        let p = pool(&keys(&[("VPN_SERVICE_PROVIDER", "mullvad")]), "ck0").unwrap();
        assert_eq!(p.format, Format::Gluetun);
        assert!(p.servers.is_empty());
    }

    #[test]
    fn exits_spread_over_servers_and_a_failing_one_is_replaced_by_the_next() {
        let keys = keys(&[
            ("a.conf", &wg_server("192.0.2.1:51820")),
            ("b.conf", &wg_server("192.0.2.2:51820")),
            ("c.conf", &wg_server("192.0.2.3:51820")),
        ]);
        let p = pool(&keys, "ck0").unwrap();
        let pick = |current, siblings: &[&str], failed: &[&str]| {
            next_server(&p.servers, current, siblings, failed).map(|s| s.name.as_str())
        };
        // New exits take servers no sibling uses.
        assert_eq!(pick(None, &[], &[]), Some("a"));
        assert_eq!(pick(None, &["a"], &[]), Some("b"));
        assert_eq!(pick(None, &["a", "b"], &[]), Some("c"));
        // More exits than servers: the least used.
        assert_eq!(pick(None, &["a", "b", "c", "a"], &[]), Some("b"));
        // A failing server is replaced by the next one in the pool, wrapping around.
        assert_eq!(pick(Some("c"), &["b"], &["c"]), Some("a"));
        assert_eq!(pick(Some("a"), &[], &["a"]), Some("b"));
        // Every server failed: none.
        assert_eq!(pick(Some("a"), &[], &["a", "b", "c"]), None);
    }
}
