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
        "the Secret has no credentials: expected a wg0.conf key, a config.ovpn key (with optional username and password), or gluetun variables (VPN_SERVICE_PROVIDER, or WIREGUARD_PRIVATE_KEY, WIREGUARD_PUBLIC_KEY, WIREGUARD_ADDRESSES and VPN_ENDPOINT_IP for a custom endpoint)"
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
}

/// Parses credentials from Secret keys (a Secret's `data`, or a mounted Secret's files).
/// `interface` names the tunnel interface the result will have.
///
/// The keys are looked at in this order: `wg0.conf`; `config.ovpn` with `username`/`password`
/// (or gluetun's `OPENVPN_USER`/`OPENVPN_PASSWORD`); gluetun variables.
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
}
