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
        // Only an exit forwards through the tunnel, with masquerade, which needs conntrack.
        notrack_tunnel: cfg.exit.is_none(),
        // An exit's links to the nodes: their outer packets leave whatever the phase (they
        // carry only what the nodes sent and the replies; the exit's own table forwards them
        // into the tunnel alone).
        link_port: cfg.exit.as_ref().map(|_| cloak_model::gateway::VXLAN_PORT),
        intranet_resolver: None,
    }
}

/// Connected: the connecting policy plus the bypass networks, with MSS clamped to the tunnel.
pub(super) fn connected(cfg: &Resolved) -> FirewallPolicy {
    FirewallPolicy {
        bypass: cfg.bypass.clone(),
        // An exit's DNS forwarder asks the cluster DNS for cluster names, and only it.
        intranet_resolver: cfg.exit.as_ref().and_then(|role| role.cluster_resolver),
        // TCP header 20 + IPv4 header 20; the firewall clamps IPv6 20 bytes lower.
        clamp_mss: Some(cfg.tunnel.mtu().saturating_sub(40)),
        ..connecting(cfg, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_keeps_conntrack_for_its_masquerade_and_lets_its_links_out_in_every_phase() {
        let plain = super::super::tests::resolved();
        assert!(connected(&plain).notrack_tunnel);
        assert_eq!(connected(&plain).link_port, None);
        let exit = Resolved {
            exit: Some(super::super::tests::exit_role()),
            ..plain.clone()
        };
        assert_eq!(connected(&plain).intranet_resolver, None);
        assert_eq!(
            connected(&exit).intranet_resolver,
            Some("10.96.0.10".parse().unwrap()),
            "an exit's forwarder asks the cluster DNS for cluster names"
        );
        assert_eq!(connecting(&exit, true).intranet_resolver, None);
        for policy in [connecting(&exit, false), connected(&exit)] {
            assert!(!policy.notrack_tunnel);
            assert_eq!(policy.link_port, Some(cloak_model::gateway::VXLAN_PORT));
        }
    }
}
