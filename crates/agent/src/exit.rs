//! The exit role: while the agent runs as one exit of a VpnGateway, its end of the nodes' VXLAN
//! links follows the tunnel. The link, forwarding and masquerade into the tunnel are set up once
//! a config names the role; the exit answers the nodes' health probes only while the tunnel
//! passes its own probe, so the nodes move new flows off it as soon as it does not. The exit's
//! own table forwards client flows from the links into the tunnel alone (its forward chain drops
//! everything else), and the agent's kill switch applies besides.

use std::time::Duration;

use cloak_dataplane::gateway::ExitPlan;
use tokio::sync::watch;

use crate::machine::{ConfigResult, Status};

/// Wait before applying again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// The exit's plan for this config and status; `None` when the config names no exit role.
pub fn plan(config: &ConfigResult, status: &Status) -> Option<ExitPlan> {
    let cfg = config.as_ref().ok()?;
    let role = cfg.exit.as_ref()?;
    Some(ExitPlan {
        vni: role.vni,
        local: role.local?,
        tunnel: cfg.tunnel.interface().to_owned(),
        mss: role.mss,
        healthy: status.ready(),
    })
}

/// Keeps the exit's data plane in step with the config and the agent's status, until either
/// channel closes. A config that stops being usable keeps the last exit role, unhealthy: the
/// nodes must stop sending new flows to an agent that blocks.
pub async fn follow(
    mut config: watch::Receiver<ConfigResult>,
    mut status: watch::Receiver<Status>,
) {
    let mut applied: Option<ExitPlan> = None;
    loop {
        let want = plan(&config.borrow_and_update(), &status.borrow_and_update()).or_else(|| {
            applied.clone().map(|last| ExitPlan {
                healthy: false,
                ..last
            })
        });
        let mut failed = false;
        if want != applied
            && let Some(next) = want.clone()
        {
            match tokio::task::spawn_blocking(move || next.apply()).await {
                Ok(Ok(())) => {
                    tracing::info!(
                        healthy = want.as_ref().is_some_and(|p| p.healthy),
                        "exit data plane applied"
                    );
                    applied = want;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "exit data plane");
                    failed = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "exit data plane task");
                    failed = true;
                }
            }
        }
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            r = status.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}
