//! What a provider's credentials Secret holds. Read once, from the Secret's keys and the few
//! values needed to tell formats apart; the values themselves are never logged or returned.

use std::collections::BTreeMap;

use cloak_api::TunnelKind;

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

/// A Secret's credentials, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub format: Format,
    pub tunnel: TunnelKind,
}

/// Why a Secret cannot serve as credentials. Messages name keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "the Secret has no credentials: expected a wg0.conf key, a config.ovpn key, or gluetun variables (VPN_SERVICE_PROVIDER or WIREGUARD_PRIVATE_KEY)"
    )]
    Empty,
    #[error("wg0.conf is malformed: {0}")]
    WgQuick(&'static str),
    #[error("config.ovpn is malformed: {0}")]
    Ovpn(&'static str),
    #[error("spec.tunnel is {declared:?} but the Secret holds {found:?} credentials")]
    TunnelMismatch {
        declared: TunnelKind,
        found: TunnelKind,
    },
    #[error("key {0} is not valid UTF-8")]
    NotUtf8(String),
}

/// Classifies a Secret's `data` (key → bytes). `declared` is the provider's `spec.tunnel`.
pub fn classify(
    data: &BTreeMap<String, Vec<u8>>,
    declared: Option<TunnelKind>,
) -> Result<Credentials, CredentialsError> {
    let text = |key: &str| -> Result<Option<&str>, CredentialsError> {
        data.get(key)
            .map(|v| std::str::from_utf8(v).map_err(|_| CredentialsError::NotUtf8(key.to_owned())))
            .transpose()
    };
    let found = if let Some(conf) = text("wg0.conf")? {
        check_wg_quick(conf)?;
        Credentials {
            format: Format::WgQuick,
            tunnel: TunnelKind::WireGuard,
        }
    } else if let Some(conf) = text("config.ovpn")? {
        if !conf.lines().any(|l| l.trim_start().starts_with("remote ")) {
            return Err(CredentialsError::Ovpn("no `remote` line"));
        }
        Credentials {
            format: Format::Ovpn,
            tunnel: TunnelKind::OpenVpn,
        }
    } else if data.contains_key("VPN_SERVICE_PROVIDER")
        || data.contains_key("WIREGUARD_PRIVATE_KEY")
    {
        let wireguard = text("VPN_TYPE")?.is_some_and(|t| t.trim() == "wireguard")
            || data.contains_key("WIREGUARD_PRIVATE_KEY");
        let tunnel = if wireguard {
            TunnelKind::WireGuard
        } else {
            TunnelKind::OpenVpn
        };
        Credentials {
            format: Format::Gluetun,
            tunnel,
        }
    } else {
        return Err(CredentialsError::Empty);
    };
    match declared {
        Some(declared) if declared != found.tunnel => Err(CredentialsError::TunnelMismatch {
            declared,
            found: found.tunnel,
        }),
        _ => Ok(found),
    }
}

fn check_wg_quick(conf: &str) -> Result<(), CredentialsError> {
    let has = |section: &str| conf.lines().any(|l| l.trim().eq_ignore_ascii_case(section));
    let key = |name: &str| {
        conf.lines().any(|l| {
            l.split_once('=')
                .is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case(name) && !v.trim().is_empty())
        })
    };
    if !has("[Interface]") {
        return Err(CredentialsError::WgQuick("no [Interface] section"));
    }
    if !key("PrivateKey") {
        return Err(CredentialsError::WgQuick("no PrivateKey in [Interface]"));
    }
    if !has("[Peer]") || !key("PublicKey") || !key("Endpoint") {
        return Err(CredentialsError::WgQuick(
            "no [Peer] with PublicKey and Endpoint",
        ));
    }
    Ok(())
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

    const WG: &str = "[Interface]\nPrivateKey = abc=\nAddress = 10.2.0.2/32\n[Peer]\nPublicKey = def=\nEndpoint = vpn.example:51820\n";

    #[test]
    fn each_accepted_format_is_recognized() {
        let wg = classify(&secret(&[("wg0.conf", WG)]), None).unwrap();
        assert_eq!(
            wg,
            Credentials {
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
            Credentials {
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
    }

    #[test]
    fn a_declared_tunnel_must_match_the_secret() {
        let err = classify(&secret(&[("wg0.conf", WG)]), Some(TunnelKind::OpenVpn)).unwrap_err();
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
