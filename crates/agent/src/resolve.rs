//! Resolving VPN server names, the agent's own step before each connection attempt (never the
//! parsers', never the tunnel implementation's). The machine opens the one narrow path first
//! (`FirewallPolicy::resolver`: marked UDP to the one resolver), asks, and closes it again with
//! the next phase's policy.

use std::{net::IpAddr, time::Duration};

/// How long one name may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Resolves names; the real one asks a DNS server, tests script the answers.
pub trait Resolver: Send + Sync {
    fn resolve(
        &self,
        server: IpAddr,
        name: &str,
    ) -> impl Future<Output = Result<Vec<IpAddr>, String>> + Send;
}

/// Asks `server` over UDP from a socket carrying the firewall mark the kill switch lets out
/// (its data plane's `Identifiers::fwmark`).
#[derive(Debug, Clone, Copy)]
pub struct MarkedDns {
    pub fwmark: u32,
}

impl Resolver for MarkedDns {
    async fn resolve(&self, server: IpAddr, name: &str) -> Result<Vec<IpAddr>, String> {
        let (name, mark) = (name.to_owned(), self.fwmark);
        tokio::task::spawn_blocking(move || {
            cloak_dataplane::dns::resolve(
                std::net::SocketAddr::new(server, 53),
                &name,
                Some(mark),
                TIMEOUT,
            )
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// What the agent writes into a resolv.conf it takes over, first line.
pub const WRITTEN: &str = "# written by cloak agent";
/// The line of such a file that keeps the resolver the file named before.
const KEPT: &str = "# cloak endpoint resolver:";

/// The resolver for server names, from a resolv.conf text: its first `nameserver`, unless the
/// agent wrote the file (then that names the tunnel's resolver, reachable only through the
/// tunnel), in which case the resolver the agent kept in it when it took the file over.
pub fn endpoint_resolver(resolv_conf: &str) -> Option<IpAddr> {
    if resolv_conf.starts_with(WRITTEN) {
        resolv_conf
            .lines()
            .find_map(|l| l.strip_prefix(KEPT)?.trim().parse().ok())
    } else {
        first_nameserver(resolv_conf)
    }
}

/// The resolv.conf the agent writes once connected: the tunnel's resolver, and the endpoint
/// resolver kept for the next start (a restarted container finds this file, not the pod's).
pub fn resolv_conf(dns: IpAddr, endpoint_resolver: Option<IpAddr>) -> String {
    let kept = endpoint_resolver.map_or_else(String::new, |r| format!("{KEPT} {r}\n"));
    format!("{WRITTEN}\n{kept}nameserver {dns}\n")
}

pub use cloak_dataplane::dnsforward::first_nameserver;

#[cfg(test)]
mod tests {
    use super::*;

    /// A restarted agent must not take the tunnel's resolver (which it wrote into the file)
    /// for the one that resolves server names outside the tunnel.
    #[test]
    fn a_resolv_conf_the_agent_wrote_gives_back_the_resolver_it_replaced() {
        let pods = "search default.svc.cluster.local\nnameserver 10.96.0.10\n";
        let first = endpoint_resolver(pods);
        assert_eq!(first, Some("10.96.0.10".parse().unwrap()));
        let written = resolv_conf("10.64.0.1".parse().unwrap(), first);
        assert_eq!(
            first_nameserver(&written),
            Some("10.64.0.1".parse().unwrap())
        );
        assert_eq!(endpoint_resolver(&written), first);
        assert_eq!(
            endpoint_resolver(&resolv_conf("10.64.0.1".parse().unwrap(), None)),
            None,
            "never the tunnel's resolver"
        );
    }

    #[test]
    fn the_first_nameserver_is_taken() {
        let text = "# generated\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n";
        assert_eq!(first_nameserver(text), Some("10.96.0.10".parse().unwrap()));
        assert_eq!(
            first_nameserver("nameserver fe80::1%eth0\n"),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(first_nameserver("search x\n"), None);
    }
}
