//! Blocked: no usable config, or stopping. Nothing leaves; only a config change or the shutdown
//! moves the machine on (handled alike for every state, in the driver).

use cloak_dataplane::{FirewallPolicy, RouteSet};

use super::{Effects, Phase};

/// Enters Blocked: the block-all policy first, then the unreachable routes. A failure is
/// reported by `enter_phase` (firewall) or here (routes); the next config change or the shutdown
/// tries again.
pub(super) fn enter<M: Effects>(m: &mut M, reason: &str) {
    tracing::warn!(reason, "blocking all traffic");
    if let Err(e) = m.enter_phase(
        Phase::Blocked,
        reason.to_owned(),
        &FirewallPolicy::block_all(),
        &RouteSet::default(),
    ) {
        tracing::error!(%e, "applying the block-all policy failed");
        m.status().send_modify(|s| {
            if !s.message.contains("block-all") {
                s.message = format!("{reason}; applying the block-all policy failed: {e}");
            }
        });
    }
}
