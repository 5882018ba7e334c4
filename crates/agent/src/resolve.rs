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

/// Asks `server` over UDP from a socket carrying the firewall mark the kill switch lets out.
#[derive(Debug, Clone, Copy, Default)]
pub struct MarkedDns;

impl Resolver for MarkedDns {
    async fn resolve(&self, server: IpAddr, name: &str) -> Result<Vec<IpAddr>, String> {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            cloak_dataplane::dns::resolve(
                std::net::SocketAddr::new(server, 53),
                &name,
                Some(cloak_dataplane::FWMARK),
                TIMEOUT,
            )
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// The first `nameserver` of a resolv.conf text.
pub fn first_nameserver(resolv_conf: &str) -> Option<IpAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next().and_then(|a| a.split('%').next()?.parse().ok()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
