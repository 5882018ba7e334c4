//! Reconnecting: the tunnel failed and is closed; the backoff (doubling per failure, capped) runs
//! out behind the endpoints-only policy, then the machine connects again.

use std::{sync::Arc, time::Duration};

use cloak_dataplane::RouteSet;

use super::{Effects, Phase, Transition, policy};
use crate::config::Resolved;

pub(super) struct Reconnecting {
    /// The config as read (server names unresolved: the next attempt resolves them again).
    cfg: Arc<Resolved>,
    failures: u32,
    backoff: Duration,
}

impl Reconnecting {
    /// Enters Reconnecting after the `failures`-th failure in a row, for `reason`.
    pub(super) fn enter<M: Effects>(
        m: &mut M,
        cfg: Arc<Resolved>,
        failures: u32,
        reason: &str,
    ) -> Self {
        let backoff = backoff(cfg.backoff, cfg.backoff_max, failures);
        tracing::warn!(%reason, attempt = failures, ?backoff, "tunnel failed; reconnecting");
        m.metrics().reconnects.inc();
        m.status().send_modify(|s| s.reconnects += 1);
        if let Err(e) = m.enter_phase(
            Phase::Reconnecting,
            format!("{reason} (attempt {failures}, next in {backoff:?})"),
            &policy::connecting(&cfg, false),
            &RouteSet::default(),
        ) {
            tracing::error!(%e, "applying the reconnecting policy failed");
        }
        Self {
            cfg,
            failures,
            backoff,
        }
    }

    pub(super) fn pause(&self) -> Duration {
        self.backoff
    }

    /// The backoff is over: connect again.
    pub(super) fn on_tick(self) -> Transition {
        Transition::Connect {
            cfg: self.cfg,
            failures: self.failures,
        }
    }
}

/// `initial × 2^(failures-1)`, capped.
pub(super) fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    initial
        .saturating_mul(1 << failures.saturating_sub(1).min(20))
        .min(max)
}
