//! Whether an open tunnel is healthy, judged per tunnel kind from what the tunnel itself reports
//! (a pure function of values; the state machine acts on the verdict).
//!
//! - **WireGuard** has no connection: it handshakes at least every 2 minutes while traffic
//!   flows, so a handshake older than `handshakeTimeout` means the peer is gone.
//! - **OpenVPN** watches its peer itself (`ping`/`ping-restart`, defaulted to 10 s/60 s when
//!   the provider's file sets none) and leaves CONNECTED when the peer stops answering; the age
//!   of its connection says nothing about its health.
//!
//! Either way a tunnel that dies outright (`Failed`) is reopened at once, and the active probe
//! (when configured) judges the path end to end on top of this.

use cloak_dataplane::{TunnelConfig, TunnelState, TunnelStatus};

use crate::config::HealthConfig;

/// What the tunnel's own report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The implementation reports it up and nothing says the peer is gone.
    Up,
    /// Not (yet, or no longer) up by the implementation's account: connecting, or OpenVPN
    /// reconnecting by itself. The machine's probe and failure counters decide what follows.
    NotUp,
    /// Reopen the tunnel: why, in words.
    Dead(String),
}

/// Judges `status` of a tunnel opened from `tunnel` against the health limits.
pub fn judge(tunnel: &TunnelConfig, status: &TunnelStatus, limits: &HealthConfig) -> Verdict {
    if let TunnelState::Failed(reason) = &status.state {
        return Verdict::Dead(reason.clone());
    }
    if let TunnelConfig::WireGuard(_) = tunnel
        && let Some(age) = status.handshake_age
        && age > limits.handshake_timeout
    {
        return Verdict::Dead(format!(
            "last handshake {}s ago (limit {}s): the server is not answering",
            age.as_secs(),
            limits.handshake_timeout.as_secs()
        ));
    }
    match status.state {
        TunnelState::Up => Verdict::Up,
        _ => Verdict::NotUp,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cloak_dataplane::{Key, openvpn::OpenVpnConfig, wireguard::WireguardConfig};

    use super::*;

    fn wireguard() -> TunnelConfig {
        let conf = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.64.0.2/32\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 0.0.0.0/0\n",
            &*Key::generate().to_base64(),
            Key::generate().public()
        );
        TunnelConfig::WireGuard(WireguardConfig::from_wg_quick(&conf, "ck0").unwrap())
    }

    fn openvpn() -> TunnelConfig {
        TunnelConfig::OpenVpn(
            OpenVpnConfig::from_ovpn("client\ndev tun\nremote 192.0.2.2 1194\n", None, "ck0")
                .unwrap(),
        )
    }

    fn status(state: TunnelState, age: Option<u64>) -> TunnelStatus {
        TunnelStatus {
            state,
            handshake_age: age.map(Duration::from_secs),
            ..TunnelStatus::default()
        }
    }

    fn limits() -> HealthConfig {
        HealthConfig {
            handshake_timeout: Duration::from_mins(3),
            ..HealthConfig::default()
        }
    }

    #[test]
    fn a_wireguard_handshake_older_than_the_limit_means_the_peer_is_gone() {
        let wg = wireguard();
        assert_eq!(
            judge(&wg, &status(TunnelState::Up, Some(179)), &limits()),
            Verdict::Up
        );
        assert_eq!(
            judge(&wg, &status(TunnelState::Up, Some(181)), &limits()),
            Verdict::Dead(
                "last handshake 181s ago (limit 180s): the server is not answering".into()
            )
        );
        assert_eq!(
            judge(&wg, &status(TunnelState::Connecting, None), &limits()),
            Verdict::NotUp
        );
    }

    #[test]
    fn an_openvpn_connection_is_judged_by_openvpn_not_by_its_age() {
        let ovpn = openvpn();
        // However long it has been up: OpenVPN reports no handshake age at all, and an age
        // (from any source) is not a verdict on it.
        assert_eq!(
            judge(&ovpn, &status(TunnelState::Up, None), &limits()),
            Verdict::Up
        );
        assert_eq!(
            judge(&ovpn, &status(TunnelState::Up, Some(86_400)), &limits()),
            Verdict::Up
        );
        // ping-restart fired: openvpn reconnects by itself.
        assert_eq!(
            judge(&ovpn, &status(TunnelState::Connecting, None), &limits()),
            Verdict::NotUp
        );
        assert_eq!(
            judge(
                &ovpn,
                &status(
                    TunnelState::Failed("openvpn exited: AUTH_FAILED".into()),
                    None
                ),
                &limits()
            ),
            Verdict::Dead("openvpn exited: AUTH_FAILED".into())
        );
    }
}
