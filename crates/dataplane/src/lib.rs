//! cloak's side-effect seam: everything the data plane does to the kernel goes through the traits
//! here, [`Tunnel`]/[`TunnelDriver`], [`Firewall`] and [`Routes`]. Each has a Linux implementation
//! and an in-memory fake beside it, so the agent's state machine is unit-tested without root.
//!
//! Desired state is a value ([`TunnelConfig`], [`FirewallPolicy`], [`RouteSet`]) with a one-line
//! `Display` the agent logs on every apply. Values are applied to kernel objects cloak owns
//! outright, named by the constants below, and `reset()` removes exactly those.
//!
//! The tunnel values themselves ([`TunnelConfig`] and its parts, [`Secret`], [`Key`]) are
//! `cloak_model`'s, re-exported here: credentials are parsed there, once, for the operator and the
//! agent alike. What does not belong here: deciding *when* to apply what (the agent's state
//! machine), parsing credentials, anything Kubernetes.

mod command;
pub mod dns;
pub mod dnsforward;
pub mod firewall;
pub mod gateway;
pub mod guard;
pub mod icmp;
pub mod openvpn;
pub mod routes;
pub mod secret;
pub mod tunnel;
pub mod wireguard;

pub use firewall::{Firewall, FirewallPolicy};

/// Loads an nftables script (`nft -f -`) in the calling thread's network namespace.
pub fn nft(script: &str) -> Result<(), Error> {
    command::run("nft", &["-f", "-"], Some(script.as_bytes())).map(drop)
}

/// `nft -j list <what>` in the calling thread's network namespace: the JSON listing.
pub fn nft_list_json(what: &[&str]) -> Result<String, Error> {
    let mut args = vec!["-j", "list"];
    args.extend_from_slice(what);
    command::run("nft", &args, None)
}
pub use routes::{RouteSet, Routes};
pub use secret::{Key, Secret};
pub use tunnel::{
    Endpoint, Proto, Remote, Tunnel, TunnelConfig, TunnelDriver, TunnelState, TunnelStatus,
};

/// The one nftables table cloak owns in a pod's network namespace (family `inet`).
pub const NFT_TABLE: &str = "cloak";

/// The routing table cloak owns. 17260 = 0x436c, "Cl"; far from the tables CNIs use (Cilium
/// 2004/2005, Calico 254-adjacent via rules, wg-quick 51820), and never `main`/`local`.
pub const ROUTE_TABLE: u32 = 17_260;

/// The firewall mark carried by the tunnel's own encrypted packets, so they bypass
/// [`ROUTE_TABLE`] (which would send them into the tunnel again). Same value as the table; the
/// bits avoid kube-proxy's 0x4000/0x8000 and Cilium's 0x0f00 ranges.
pub const FWMARK: u32 = 0x436c;

/// Priority of cloak's two policy-routing rules (this one and the next): above `main` (32766),
/// below anything a CNI installs at the low end.
pub const RULE_PRIORITY: u32 = 17_260;

/// The kernel objects one data plane owns in a network namespace: its nftables table, the
/// fwmark its tunnel's own packets (and its resolver queries) carry, its routing table and the
/// priority of its routing rules. They are a value, not globals, because one namespace will hold
/// several data planes (a gateway's exits, a chain's hops), each with a set of its own (their
/// policies must then also know of each other: docs/architecture.md); the agent's is
/// [`Identifiers::default`] (the constants above).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifiers {
    /// The nftables table (family `inet`).
    pub table: String,
    pub fwmark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
}

impl Default for Identifiers {
    fn default() -> Self {
        Self {
            table: NFT_TABLE.to_owned(),
            fwmark: FWMARK,
            route_table: ROUTE_TABLE,
            rule_priority: RULE_PRIORITY,
        }
    }
}

/// Interface names cloak creates start with this, so `reset` and humans can tell them apart.
pub const IFACE_PREFIX: &str = "ck";

/// Why applying a desired state failed. Messages name the object and the kernel's answer; they
/// never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{0}")]
    Verify(String),
    #[error("{0}")]
    Tunnel(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
