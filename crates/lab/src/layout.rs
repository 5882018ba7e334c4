//! Where everything of one lab lives: its directory, its namespaces' names and the addresses of
//! its networks. One value, so two labs (a user's and a test binary's) never collide.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The node network every namespace of the lab is attached to (bridge `br0` in `ck-<lab>-lan`).
pub const LAN_PREFIX: &str = "10.250.0";
/// The internet namespace's address on the lan: every other namespace's default gateway.
pub const GATEWAY: &str = "10.250.0.1";
/// The control-plane namespace's address: kube-apiserver listens here on port 6443.
pub const API_SERVER: &str = "10.250.0.2";
pub const API_PORT: u16 = 6443;
/// The host namespace (where `cloak portfwd` runs) on the lan, and on its second network
/// towards `ck-<lab>-ext`, the namespace an external client uses.
pub const HOST: &str = "10.250.0.254";
pub const HOST_EXTERNAL: &str = "100.127.0.1";
pub const EXTERNAL_CLIENT: &str = "100.127.0.2";
/// The external network (not 198.18.0.0/15: a VpnGateway's nodes use that range inside).
pub const EXTERNAL_NET: &str = "100.127.0.0/24";
/// All pods; node `n` (1-based) has `10.244.<n>.0/24` on its bridge `cni0`.
pub const POD_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service (first address of the range) and the cluster DNS Service.
pub const KUBERNETES_SERVICE: &str = "10.96.0.1";
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// The internet's echo service: HTTP on port 80 answers with the source address it saw.
pub const ECHO: &str = "203.0.113.10";
/// Its IPv6 address (no DNS name has it: names keep resolving to IPv4 alone).
pub const ECHO6: &str = "2001:db8:113::10";
/// The internet's DNS server (CoreDNS, zone `lab.test`): the nodes' resolver and the cluster
/// DNS's upstream.
pub const INTERNET_DNS: &str = "203.0.113.53";
pub const INTERNET_ZONE: &str = "lab.test";

/// The kind of tunnel a fake provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Wireguard,
    OpenVpn,
}

/// A fake VPN provider of the internet: a namespace with a pool of servers and one exit address.
#[derive(Debug, Clone, Copy)]
pub struct Provider {
    /// Its name: the DNS label (`<name>-<k>.vpn.lab.test`), and the VpnProvider and Secret
    /// names in `examples/lab`. Its namespace is `ck-<lab>-p<index>`.
    pub name: &'static str,
    pub kind: TunnelKind,
    /// 1-based; picks its addresses.
    pub index: u8,
    /// How many servers it has.
    pub servers: u8,
    /// The first of the servers kept for the chains (`<name>-chain`, `examples/lab/60-chain.yaml`):
    /// server 1 is the masks', the ones before this the gateway's (`<name>-pool`), so no two
    /// users of one account key ever share a server.
    pub chain_from: u8,
    /// Whether its tunnels carry IPv6 (its clients get an IPv6 address and route).
    pub ipv6: bool,
    /// Whether it is given to cloak as a gluetun user holds it: a Secret of gluetun's variables
    /// and a server list in gluetun's format. Its servers then behave as a commercial
    /// service's do: every one accepts the account's one address
    /// ([`Provider::account_address`]) and answers on one port.
    pub gluetun: bool,
}

impl Provider {
    /// The address the internet sees for traffic through any of its servers.
    pub fn exit(&self) -> String {
        format!("198.51.100.{}", 10 + self.index)
    }

    /// The address the internet sees for IPv6 through any of its servers (when it carries
    /// IPv6).
    pub fn exit6(&self) -> String {
        format!("2001:db8:5100::{}", 10 + self.index)
    }

    /// Server `k`'s (1-based) public address.
    pub fn server(&self, k: u8) -> String {
        format!("192.0.2.{}", 10 * self.index + k)
    }

    /// Server `k`'s DNS name in the internet's zone.
    pub fn server_name(&self, k: u8) -> String {
        format!("{}-{k}.vpn.{INTERNET_ZONE}", self.name)
    }

    /// Server `k`'s port, as its clients reach it: each server's own
    /// ([`Provider::listen_port`]), or one for all of a gluetun provider's, as a commercial
    /// service has (its namespace forwards each server address's packets to that server's own).
    pub fn port(&self, k: u8) -> u16 {
        if self.gluetun {
            self.listen_port(1)
        } else {
            self.listen_port(k)
        }
    }

    /// The port server `k`'s device listens on. Each server of a pool has its own: the
    /// userspace WireGuard servers of one provider share its namespace and bind the wildcard
    /// address, and two devices on one port would split a client's handshakes between them
    /// (SO_REUSEPORT).
    pub fn listen_port(&self, k: u8) -> u16 {
        let base = match self.kind {
            TunnelKind::Wireguard => 51820,
            TunnelKind::OpenVpn => 1194,
        };
        base + u16::from(k) - 1
    }

    /// The client address a gluetun provider's account has on every one of its servers
    /// (`WIREGUARD_ADDRESSES`), outside every server's own tunnel subnet.
    pub fn account_address(&self) -> String {
        format!("10.{}.0.2", 64 + self.index)
    }

    /// The tunnel subnet of server `k`: the server is `.1`, its client `.2`.
    pub fn tunnel_prefix(&self, k: u8) -> String {
        format!("10.{}.{k}", 64 + self.index)
    }

    /// The transit link between the internet (`.1`) and the provider (`.2`).
    pub fn transit_prefix(&self) -> String {
        format!("100.64.{}", self.index)
    }

    /// The IPv6 /64 of the transit link (`::1` and `::2`, as [`Provider::transit_prefix`]).
    pub fn transit_prefix6(&self) -> String {
        format!("2001:db8:64:{}::", self.index)
    }

    /// The IPv6 /64 of server `k`'s tunnel: the server is `::1`, its client `::2`.
    pub fn tunnel_prefix6(&self, k: u8) -> String {
        format!("fd64:{}:{k}::", self.index)
    }
}

/// The lab's fake providers: two WireGuard services whose tunnels carry IPv6 too, one OpenVPN
/// service that carries IPv4 alone, and one WireGuard service given as a gluetun Secret and
/// server list, each with its own exit addresses and a pool of servers.
pub const PROVIDERS: [Provider; 4] = [
    Provider {
        name: "wg-alpha",
        kind: TunnelKind::Wireguard,
        index: 1,
        servers: 5,
        chain_from: 4,
        ipv6: true,
        gluetun: false,
    },
    Provider {
        name: "wg-beta",
        kind: TunnelKind::Wireguard,
        index: 2,
        servers: 5,
        chain_from: 4,
        ipv6: true,
        gluetun: false,
    },
    Provider {
        name: "ovpn-gamma",
        kind: TunnelKind::OpenVpn,
        index: 3,
        servers: 4,
        chain_from: 3,
        ipv6: false,
        gluetun: false,
    },
    // Servers 1-3 are in the Netherlands (the example provider's filter), 4 in Switzerland
    // (`examples/lab/70-gluetun.yaml`; see [`GLUETUN_LOCATIONS`]).
    Provider {
        name: "wg-delta",
        kind: TunnelKind::Wireguard,
        index: 4,
        servers: 4,
        chain_from: 5,
        ipv6: false,
        gluetun: true,
    },
];

/// Where a gluetun provider's server `k` is, by its list: (country, city).
pub const GLUETUN_LOCATIONS: [(&str, &str); 4] = [
    ("Netherlands", "Amsterdam"),
    ("Netherlands", "Amsterdam"),
    ("Netherlands", "Rotterdam"),
    ("Switzerland", "Zurich"),
];

/// The section of the lab's server list that holds a gluetun provider's servers: its
/// `VPN_SERVICE_PROVIDER`, named as a gluetun user's would be.
pub const GLUETUN_SERVICE: &str = "mullvad";

/// The most nodes a lab may have (addresses `.11`–`.20`, pod subnets `10.244.1–10`).
pub const MAX_NODES: u8 = 10;

/// One lab: a name, and the directory that holds its state, certificates, logs and node data.
#[derive(Debug, Clone)]
pub struct Lab {
    name: String,
    dir: PathBuf,
}

impl Lab {
    /// The lab called `name` (1–8 lowercase letters or digits), under `$CLOAK_LAB_ROOT`
    /// (default `/var/lib/cloak/lab`).
    pub fn new(name: &str) -> Result<Self> {
        let valid = !name.is_empty()
            && name.len() <= 8
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid {
            return Err(Error::Other(format!(
                "lab name {name:?}: use 1-8 lowercase letters or digits (it is part of namespace and cgroup names)"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            dir: root().join(name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig for clients on the host: the API server through the lab's proxy on
    /// 127.0.0.1.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The network namespace of a role: `cp`, `lan`, `net`, `host`, `ext`, `n<k>`, `p<k>`.
    pub fn netns(&self, role: &str) -> String {
        format!("ck-{}-{role}", self.name)
    }

    /// Every namespace name of this lab starts with this.
    pub(crate) fn netns_prefix(&self) -> String {
        format!("ck-{}-", self.name)
    }

    /// The cgroup directory (in every hierarchy) that node `k`'s pods live under.
    pub(crate) fn cgroup(&self, node: u8) -> String {
        format!("cloak-lab-{}-n{node}", self.name)
    }

    pub(crate) fn cgroup_prefix(&self) -> String {
        format!("cloak-lab-{}-", self.name)
    }

    pub fn node_dir(&self, node: u8) -> PathBuf {
        self.dir.join("nodes").join(format!("n{node}"))
    }

    pub(crate) fn progress_file(&self) -> PathBuf {
        self.dir.join("progress")
    }

    pub(crate) fn supervisor_file(&self) -> PathBuf {
        self.dir.join("supervisor.pid")
    }
}

/// Node `k`'s (1-based) name, lan address and pod subnet.
pub fn node_name(k: u8) -> String {
    format!("n{k}")
}

pub fn node_ip(k: u8) -> String {
    format!("{LAN_PREFIX}.{}", 10 + k)
}

pub fn node_pod_cidr(k: u8) -> String {
    format!("10.244.{k}.0/24")
}

/// Where every lab's directory lives.
pub(crate) fn root() -> PathBuf {
    std::env::var_os("CLOAK_LAB_ROOT")
        .map_or_else(|| PathBuf::from("/var/lib/cloak/lab"), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_that_cannot_be_part_of_a_namespace_name_are_refused() {
        assert!(Lab::new("lab").is_ok());
        assert!(Lab::new("t1234567").is_ok());
        for bad in ["", "Lab", "a-b", "toolongname", "a/b"] {
            assert!(Lab::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn providers_have_distinct_exits_servers_and_tunnel_subnets() {
        let mut seen = std::collections::BTreeSet::new();
        for p in PROVIDERS {
            assert!(seen.insert(p.exit()), "{}", p.exit());
            if p.gluetun {
                assert_eq!(
                    usize::from(p.servers),
                    GLUETUN_LOCATIONS.len(),
                    "{}",
                    p.name
                );
                assert!(seen.insert(p.account_address()), "{}", p.name);
            } else {
                assert!(p.chain_from > 2, "{} needs a pool for the gateway", p.name);
                assert!(
                    p.servers > p.chain_from,
                    "{} needs a pool for the chains",
                    p.name
                );
            }
            for k in 1..=p.servers {
                assert!(seen.insert(p.server(k)), "{}", p.server(k));
                assert!(seen.insert(p.tunnel_prefix(k)), "{}", p.tunnel_prefix(k));
            }
        }
        assert!(
            PROVIDERS
                .iter()
                .filter(|p| p.kind == TunnelKind::Wireguard)
                .count()
                >= 2
        );
        assert!(PROVIDERS.iter().any(|p| p.kind == TunnelKind::OpenVpn));
    }
}
