//! The exit role: while the agent runs as one exit of a VpnGateway, its end of the nodes' VXLAN
//! links follows the tunnel. The link, forwarding and masquerade into the tunnel are set up once
//! a config names the role; the exit answers the nodes' health probes only while the tunnel
//! passes its own probe and answers its echoes (`dataplane::icmp::Liveness`), so the nodes move
//! new flows off it as soon as it does not. The exit's
//! own table forwards client flows from the links into the tunnel alone (its forward chain drops
//! everything else), and the agent's kill switch applies besides.

use std::{net::SocketAddrV4, time::Duration};

use cloak_dataplane::{
    dnsforward::{self, Routing, Sockets},
    gateway::{EXIT_ADDRESS, ExitPlan},
    icmp::{Liveness, LivenessConfig},
};
use tokio::sync::watch;

use crate::machine::{ConfigResult, Phase, Status};

/// Wait before applying again after a failure.
const RETRY: Duration = Duration::from_secs(1);
/// Silent this long, the echo target is no longer trusted (see [`LivenessConfig::give_up`]):
/// well past the agent's probe, which fails within 3 s on a tunnel that is really dead.
const GIVE_UP: Duration = Duration::from_secs(5);

/// The exit's plan for this config and status (`silent`: the tunnel's echoes go unanswered;
/// `draining`: the agent got its SIGTERM); `None` when the config names no exit role.
///
/// With an echo watch, the exit is healthy while its tunnel is connected and answers the
/// echoes: one HTTP probe that misses its 1 s under a full tunnel does not take it out (that
/// took the exit out of every node and reset all of its flows in a 6-stream bench). Without
/// one, the probe is the only sign of a blackhole, and the last one must have passed.
pub fn plan(
    config: &ConfigResult,
    status: &Status,
    silent: bool,
    draining: bool,
) -> Option<ExitPlan> {
    let cfg = config.as_ref().ok()?;
    let role = cfg.exit.as_ref()?;
    Some(ExitPlan {
        vni: role.vni,
        local: role.local?,
        tunnel: cfg.tunnel.interface().to_owned(),
        mss: role.mss,
        link_mtu: role.link_mtu,
        healthy: if role.ping.is_some() {
            status.phase == Phase::Connected && !silent
        } else {
            status.ready()
        },
        draining,
        ipv6: cfg.tunnel.carries_ipv6(),
    })
}

/// How this config's tunnel is watched by echo: `None` without an exit role or an echo target.
pub fn liveness(config: &ConfigResult) -> Option<LivenessConfig> {
    let cfg = config.as_ref().ok()?;
    let role = cfg.exit.as_ref()?;
    Some(LivenessConfig {
        interface: cfg.tunnel.interface().to_owned(),
        target: role.ping?,
        interval: role.ping_interval,
        window: role.ping_window,
        give_up: GIVE_UP.max(role.ping_window * 2),
    })
}

/// Keeps the exit's data plane in step with the config, the agent's status, the tunnel's echoes
/// and `draining` (true from the agent's SIGTERM on: its answers to the nodes' probes say so),
/// until one of those channels closes. A config that stops being usable keeps the last
/// exit role, unhealthy: the nodes must stop sending new flows to an agent that blocks.
pub async fn follow(
    mut config: watch::Receiver<ConfigResult>,
    mut status: watch::Receiver<Status>,
    mut draining: watch::Receiver<bool>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    let (silent_tx, mut silent) = watch::channel(false);
    let mut watching: Option<(LivenessConfig, Liveness)> = None;
    let mut applied: Option<ExitPlan> = None;
    loop {
        let current = config.borrow_and_update().clone();
        let wanted = liveness(&current);
        if wanted.as_ref() != watching.as_ref().map(|(c, _)| c) {
            // Stopping the old watch waits for its thread's round (one interval at most): off
            // the async workers.
            if let Some(old) = watching.take() {
                let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            }
            silent_tx.send_replace(false);
            watching = wanted.map(|c| {
                tracing::info!(target = %c.target, interval = ?c.interval, window = ?c.window, "watching the tunnel by echo");
                let tx = silent_tx.clone();
                let (target, window) = (c.target, c.window);
                let watch = Liveness::start(c.clone(), move |quiet| {
                    if quiet {
                        tracing::warn!(%target, "no echo reply for {window:?}: the nodes take this exit out");
                    } else {
                        tracing::info!(%target, "the echo watch no longer holds this exit out (answered again, or given up on)");
                    }
                    tx.send_replace(quiet);
                });
                (c, watch)
            });
        }
        let quiet = *silent.borrow_and_update();
        let want = plan(
            &current,
            &status.borrow_and_update(),
            quiet,
            *draining.borrow_and_update(),
        )
        .or_else(|| {
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
                    let (healthy, draining) = want
                        .as_ref()
                        .map_or((false, false), |p| (p.healthy, p.draining));
                    metrics.exit_healthy.set(i64::from(healthy));
                    metrics.exit_draining.set(i64::from(draining));
                    tracing::info!(
                        healthy = want.as_ref().is_some_and(|p| p.healthy),
                        draining = want.as_ref().is_some_and(|p| p.draining),
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
            _ = silent.changed() => {}
            r = draining.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}

/// Where the exit's DNS forwarder sends its clients' queries, from a config with an exit role.
pub fn dns_routing(config: &ConfigResult) -> Option<Routing> {
    let cfg = config.as_ref().ok()?;
    let role = cfg.exit.as_ref()?;
    Some(Routing {
        cluster_domains: role.cluster_domains.clone(),
        cluster: role.cluster_resolver,
        tunnel: cfg.dns,
        intranet: cfg.bypass.clone(),
    })
}

/// A draining exit (SIGTERM: its pod is being deleted, and the nodes give it no new flows)
/// keeps carrying its clients' flows until none has carried a packet for `quiet`, for at most
/// `grace`. The flows are read every second from conntrack ([`FlowWatch`]).
///
/// [`FlowWatch`]: cloak_dataplane::gateway::FlowWatch
pub async fn drain(grace: Duration, quiet: Duration) {
    if grace.is_zero() {
        return;
    }
    tracing::info!(
        ?grace,
        ?quiet,
        "draining: established flows go on, no new ones come"
    );
    let began = tokio::time::Instant::now();
    let deadline = began + grace;
    let mut watch = cloak_dataplane::gateway::FlowWatch::default();
    loop {
        let listed = tokio::task::spawn_blocking(cloak_dataplane::gateway::list_flows).await;
        match listed {
            Ok(Ok(listing)) => match watch.update(&listing, std::time::Instant::now(), quiet) {
                0 => {
                    tracing::info!(after = ?began.elapsed(), "drained: no client flow carried a packet lately");
                    return;
                }
                flows => tracing::debug!(flows, "draining"),
            },
            Ok(Err(e)) => tracing::warn!(%e, "listing the client flows; again in 1 s"),
            Err(e) => tracing::warn!(%e, "listing the client flows; again in 1 s"),
        }
        if tokio::time::Instant::now() + Duration::from_secs(1) >= deadline {
            tracing::info!(?grace, "drain grace over");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits for a config with an exit role, then serves its clients' DNS on the exits' inner address
/// (`dataplane::dnsforward`), routing each query by the config current when it arrives (and
/// counting it).
pub async fn serve_dns(
    mut config: watch::Receiver<ConfigResult>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    while dns_routing(&config.borrow_and_update()).is_none() {
        if config.changed().await.is_err() {
            return;
        }
    }
    let addr = SocketAddrV4::new(EXIT_ADDRESS, 53);
    loop {
        let config = config.clone();
        let metrics = std::sync::Arc::clone(&metrics);
        let served = match Sockets::bind(addr) {
            Ok(sockets) => {
                tracing::info!(%addr, "serving the clients' DNS");
                dnsforward::serve(sockets, move |_| {
                    metrics.exit_dns_queries.inc();
                    dns_routing(&config.borrow())
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = served {
            tracing::error!(%addr, %e, "the clients' DNS forwarder failed; starting it again in 1 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How many client flows the exit carries now (its namespace's conntrack, as a draining exit
/// reads it); None when they cannot be listed.
pub(crate) fn client_flows() -> Option<usize> {
    let listing = cloak_dataplane::gateway::list_flows().ok()?;
    Some(cloak_dataplane::gateway::FlowWatch::default().update(
        &listing,
        std::time::Instant::now(),
        Duration::MAX,
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{ExitRole, Resolved};

    fn exit_config(ping: Option<std::net::Ipv4Addr>) -> Arc<Resolved> {
        Arc::new(Resolved {
            exit: Some(ExitRole {
                ping,
                ..crate::machine::tests::exit_role()
            }),
            ..crate::machine::tests::resolved()
        })
    }

    #[test]
    fn one_failed_http_probe_takes_an_echo_watched_exit_out_of_no_node() {
        let probe_failed = Status {
            phase: Phase::Connected,
            probe_ok: false,
            ..Status::default()
        };
        let healthy = |ping, status: &Status, silent| {
            plan(&Ok(exit_config(ping)), status, silent, false)
                .unwrap()
                .healthy
        };
        let watched = Some("10.64.0.1".parse().unwrap());
        assert!(healthy(watched, &probe_failed, false));
        assert!(
            !healthy(watched, &probe_failed, true),
            "its echoes went unanswered"
        );
        let reconnecting = Status {
            phase: Phase::Reconnecting,
            ..Status::default()
        };
        assert!(!healthy(watched, &reconnecting, false));
        assert!(
            !healthy(None, &probe_failed, false),
            "without an echo watch the probe is the only sign of a blackhole"
        );
    }
}
