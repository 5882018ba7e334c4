//! cloak's pure desired state. Every function here takes plain values and returns plain values:
//! no client, no clock, no I/O, so each is unit-tested with literals. The one exception is
//! `secret::Key::generate`, which reads the OS random number generator (tests and fake
//! providers make keys with it).
//!
//! - [`slots`]: which provider and slot a mask should try, and the names of slot reservations.
//! - [`credentials`]: a credentials Secret's keys parsed into the tunnel they describe: the one
//!   parser the operator (classification, verification) and the agent share; a provider's pool
//!   of servers and which one an exit uses next.
//! - [`tunnel`]: that tunnel as a value (WireGuard, OpenVPN), its servers and their names.
//! - [`serverlist`]: gluetun's server list, its `SERVER_*` filters, and the WireGuard pool it
//!   gives a gluetun Secret.
//! - [`secret`]: keys and secret strings that never print and are zeroized when dropped.
//! - [`clients`]: which gateway a pod is a client of (its label, then the gateways' selectors).
//! - [`gateway`]: a gateway's client routes (the intranet's complement), MTU, MSS, exit names
//!   and VXLAN identifiers.
//! - [`exit`]: a gateway's exits as objects (the exit pod with one server, the agent's exit
//!   config) and an exit's health as its pod shows it.
//! - [`mask`]: a mask's phase and message, and which phases are announced.
//! - [`verify`]: the verification pod, with the user's overrides merged in.
//! - [`merge`]: JSON merge patch (RFC 7386), used for overrides.
//! - [`migrate`]: seed 000's `vpn.beebs.dev` Providers and Masks as VpnProviders and VpnMasks,
//!   with every field that has no equivalent listed.
//! - [`portfwd`]: Service annotations and Nodes to the host port-forwarding nftables ruleset.

pub mod chain;
pub mod clients;
pub mod credentials;
pub mod exit;
pub mod gateway;
pub mod mask;
pub mod merge;
pub mod migrate;
pub mod names;
pub mod natpmp;
pub mod portfwd;
pub mod secret;
pub mod serverlist;
pub mod slots;
pub mod tunnel;
pub mod verify;
