//! The firewall policy of each phase, from the config alone (pure; the states apply them).

use cloak_dataplane::FirewallPolicy;

use crate::config::Resolved;

/// While (re)connecting: only the endpoints, and the tunnel interface, whose packets leave only
/// as encrypted packets to the endpoints.
pub(super) fn connecting(cfg: &Resolved, with_tunnel: bool) -> FirewallPolicy {
    FirewallPolicy {
        endpoints: cfg.tunnel.endpoints(),
        tunnel: with_tunnel.then(|| cfg.tunnel.interface().to_owned()),
        tunnel_ipv6: cfg.tunnel.carries_ipv6(),
        dns: cfg.dns,
        bypass: Vec::new(),
        clamp_mss: None,
        resolver: None,
        // The agent forwards nothing through the tunnel (yet): its traffic needs no tracking.
        notrack_tunnel: true,
    }
}

/// Connected: the connecting policy plus the bypass networks, with MSS clamped to the tunnel.
pub(super) fn connected(cfg: &Resolved) -> FirewallPolicy {
    FirewallPolicy {
        bypass: cfg.bypass.clone(),
        // TCP header 20 + IPv4 header 20; the firewall clamps IPv6 20 bytes lower.
        clamp_mss: Some(cfg.tunnel.mtu().saturating_sub(40)),
        ..connecting(cfg, true)
    }
}
