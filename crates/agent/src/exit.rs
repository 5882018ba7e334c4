//! The exit role: while the agent runs as one exit of a VpnGateway, its end of the nodes' VXLAN
//! links follows the tunnel. The link, forwarding and masquerade into the tunnel are set up once
//! a config names the role; the exit answers the nodes' health probes only while the tunnel
//! passes its own probe, so the nodes move new flows off it as soon as it does not. Nothing here
//! can let a client's flow out another way: the agent's kill switch still drops everything
//! forwarded anywhere but into the tunnel.

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

/// Keeps the exit's data plane in step with the config and the agent's status, until both
/// channels close.
pub async fn follow(
    mut config: watch::Receiver<ConfigResult>,
    mut status: watch::Receiver<Status>,
) {
    let mut applied: Option<ExitPlan> = None;
    loop {
        let want = plan(&config.borrow_and_update(), &status.borrow_and_update());
        let mut failed = false;
        if want != applied {
            if let Some(next) = want.clone() {
                let result = tokio::task::spawn_blocking(move || next.apply()).await;
                match result {
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
            } else {
                applied = None;
            }
        }
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            r = status.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}
