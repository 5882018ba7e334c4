//! cloak's pure desired state. Every function here takes plain values and returns plain values:
//! no client, no clock, no I/O, so each is unit-tested with literals.
//!
//! - [`slots`]: which provider and slot a mask should try, and the names of slot reservations.
//! - [`credentials`]: what kind of credentials a provider's Secret holds.
//! - [`mask`]: a mask's phase and message, and which phases are announced.
//! - [`verify`]: the verification pod, with the user's overrides merged in.
//! - [`merge`]: JSON merge patch (RFC 7386), used for overrides.
//! - [`portfwd`]: Service annotations and Nodes to the host port-forwarding nftables ruleset.

pub mod credentials;
pub mod mask;
pub mod merge;
pub mod names;
pub mod portfwd;
pub mod slots;
pub mod verify;
