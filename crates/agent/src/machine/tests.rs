//! The state machine against the in-memory fakes, with time paused: every transition's order of
//! side effects, and that every failure path ends closed.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use cloak_dataplane::{
    Key, TunnelConfig, TunnelState, TunnelStatus, firewall::FakeFirewall, routes::FakeRoutes,
    tunnel::FakeDriver, wireguard::WireguardConfig,
};
use tokio::sync::watch;

use super::*;
use crate::{
    config::{ConfigError, HealthConfig, ProbeAddr, ProbeTarget},
    probe::ProbeOk,
};

/// Answers probes from a script: `Ok` with an exit address, or the error text; after the delay
/// in `.1` (zero unless a test sets one).
#[derive(Clone)]
struct FakeProber(Arc<Mutex<Result<(), String>>>, Arc<Mutex<Duration>>);

impl Default for FakeProber {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Ok(()))), Arc::default())
    }
}

impl Prober for FakeProber {
    async fn probe(&self, _: &ProbeTarget, _: Duration) -> Result<ProbeOk, String> {
        let delay = *self.1.lock().unwrap();
        tokio::time::sleep(delay).await;
        let answer = self.0.lock().unwrap().clone();
        answer.map(|()| ProbeOk {
            latency: Duration::from_millis(3),
            exit_ip: Some("198.51.100.2".parse().unwrap()),
        })
    }
}

/// Answers name lookups from a script: name → addresses, or the error text.
#[derive(Clone, Default)]
struct FakeResolver(Arc<Mutex<Answers>>);

type Answers = std::collections::BTreeMap<String, Result<Vec<IpAddr>, String>>;

impl Resolver for FakeResolver {
    async fn resolve(&self, _: IpAddr, name: &str) -> Result<Vec<IpAddr>, String> {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_else(|| Err("no such name (NXDOMAIN)".into()))
    }
}

struct Rig {
    journal: Arc<Mutex<Vec<String>>>,
    /// Every firewall load fails with this message while set.
    firewall_fails: Arc<Mutex<Option<String>>>,
    driver: FakeDriver,
    prober: FakeProber,
    resolver: FakeResolver,
    status: watch::Receiver<Status>,
    config: watch::Sender<ConfigResult>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// An exit role with no echo target, its cluster resolver at 10.96.0.10.
pub(crate) fn exit_role() -> crate::config::ExitRole {
    crate::config::ExitRole {
        vni: 4096,
        mss: 1380,
        link_mtu: None,
        underlay_mtu: None,
        local: Some("10.244.1.7".parse().unwrap()),
        ping: None,
        ping_interval: Duration::from_millis(100),
        ping_window: Duration::from_millis(500),
        cluster_domains: vec!["cluster.local".into()],
        cluster_resolver: Some("10.96.0.10".parse().unwrap()),
        drain_grace: Duration::ZERO,
        drain_quiet: Duration::ZERO,
        forwards: Vec::new(),
    }
}

pub(crate) fn resolved() -> Resolved {
    let conf = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 10.64.0.2/32\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 0.0.0.0/0\n",
        &*Key::generate().to_base64(),
        Key::generate().public()
    );
    Resolved {
        tunnel: TunnelConfig::WireGuard(WireguardConfig::from_wg_quick(&conf, "ck0").unwrap()),
        dns: Some("10.64.0.1".parse().unwrap()),
        resolv_conf: None,
        endpoint_resolver: None,
        bypass: vec!["10.96.0.0/12".parse().unwrap()],
        probe: Some(ProbeTarget::Tcp(ProbeAddr::Ip(
            "203.0.113.10:7".parse().unwrap(),
        ))),
        health: HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures: 3,
            ..HealthConfig::default()
        },
        connect_timeout: Duration::from_secs(10),
        backoff: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
        userspace: true,
        exit: None,
    }
}

fn start(config: ConfigResult) -> Rig {
    let journal = Arc::new(Mutex::new(Vec::new()));
    let driver = FakeDriver {
        journal: Arc::clone(&journal),
        ..FakeDriver::default()
    };
    let prober = FakeProber::default();
    let resolver = FakeResolver::default();
    let (status_tx, status) = watch::channel(Status::default());
    let (config_tx, config_rx) = watch::channel(config);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let firewall_fails = Arc::new(Mutex::new(None));
    let machine = Machine {
        firewall: FakeFirewall {
            journal: Arc::clone(&journal),
            fail: Arc::clone(&firewall_fails),
        },
        routes: FakeRoutes {
            journal: Arc::clone(&journal),
        },
        driver: driver.clone(),
        prober: prober.clone(),
        resolver: resolver.clone(),
        default_resolver: Some("10.96.0.10".parse().unwrap()),
        status: status_tx,
        metrics: Arc::new(Metrics::new()),
    };
    let task = tokio::spawn(machine.run(config_rx, shutdown_rx));
    Rig {
        journal,
        firewall_fails,
        driver,
        prober,
        resolver,
        status,
        config: config_tx,
        shutdown,
        task,
    }
}

impl Rig {
    fn set_tunnel(&self, state: TunnelState, age: Option<u64>) {
        self.driver.inner.lock().unwrap().status = TunnelStatus {
            state,
            handshake_age: age.map(Duration::from_secs),
            ..TunnelStatus::default()
        };
    }

    async fn wait_phase(&mut self, phase: Phase) -> Status {
        let journal = Arc::clone(&self.journal);
        tokio::time::timeout(
            Duration::from_mins(10),
            self.status.wait_for(|s| s.phase == phase),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "never reached {phase}; journal {:?}",
                journal.lock().unwrap()
            )
        })
        .unwrap()
        .clone()
    }

    fn journal(&self) -> Vec<String> {
        self.journal.lock().unwrap().clone()
    }

    fn open_now(&self) -> usize {
        self.driver.inner.lock().unwrap().open_now
    }

    async fn stop(self) -> Vec<String> {
        self.shutdown.send(true).unwrap();
        let journal = self.journal();
        self.task.await.unwrap();
        let mut after = self.journal.lock().unwrap().clone();
        after.drain(..journal.len().min(after.len()));
        [journal, after].concat()
    }
}

#[tokio::test(start_paused = true)]
async fn a_bad_config_blocks_everything_and_says_why() {
    let mut rig = start(Err(ConfigError::Interface("x".repeat(20))));
    let s = rig
        .status
        .wait_for(|s| !s.message.is_empty())
        .await
        .unwrap()
        .clone();
    assert_eq!(s.phase, Phase::Blocked);
    assert!(
        s.message.starts_with("config: interface name"),
        "{}",
        s.message
    );
    assert!(!s.ready());
    assert_eq!(
        rig.journal(),
        [
            "firewall block all",
            "routes table 17260 for unmarked packets: unreachable"
        ]
    );
    assert!(
        rig.driver.inner.lock().unwrap().opened.is_empty(),
        "no tunnel without a config"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn connecting_closes_the_firewall_before_the_tunnel_opens_and_opens_it_only_after_the_probe()
{
    let mut rig = start(Ok(Arc::new(resolved())));
    rig.set_tunnel(TunnelState::Up, Some(1));
    let s = rig.wait_phase(Phase::Connected).await;
    assert!(s.ready());
    assert_eq!(s.exit_ip, Some("198.51.100.2".parse().unwrap()));
    let j = rig.journal();
    assert_eq!(
        j[0],
        "firewall allow endpoints [192.0.2.2:51820/udp], tunnel ck0 (ipv4, ipv6 blocked), dns 10.64.0.1 only, tunnel untracked",
        "connecting: endpoints only, no bypass"
    );
    assert_eq!(
        j[1], "routes table 17260 for unmarked packets: unreachable",
        "no route into the tunnel before it exists"
    );
    assert_eq!(
        j[2], "tunnel open ck0",
        "the tunnel opens behind that firewall"
    );
    assert!(j[3].starts_with("routes table 17260 for unmarked packets: default dev ck0"));
    assert!(
        j[4].ends_with("bypass [10.96.0.0/12], mss 1380, tunnel untracked"),
        "the bypass opens only once the probe passed: {}",
        j[4]
    );
    assert_eq!(rig.driver.inner.lock().unwrap().opened.len(), 1);
    let j = rig.stop().await;
    assert_eq!(
        j.last().unwrap(),
        "routes table 17260 for unmarked packets: unreachable"
    );
    assert_eq!(
        j[j.len() - 2],
        "firewall block all",
        "stopping leaves the namespace closed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_that_never_comes_up_is_retried_with_doubling_backoff_and_stays_closed() {
    let mut rig = start(Ok(Arc::new(resolved())));
    // No handshake, so nothing gets through the tunnel either.
    *rig.prober.0.lock().unwrap() = Err("203.0.113.10:7: no answer within 1s".into());
    let s = rig.wait_phase(Phase::Reconnecting).await;
    assert!(
        s.message.starts_with(
            "no wireguard handshake with 192.0.2.2:51820/udp within 10s (attempt 1, next in 1s)"
        ),
        "{}",
        s.message
    );
    assert_eq!(rig.open_now(), 0, "the failed tunnel is closed");
    rig.wait_phase(Phase::Connecting).await;
    let s = rig.wait_phase(Phase::Reconnecting).await;
    assert!(
        s.message.ends_with("(attempt 2, next in 2s)"),
        "{}",
        s.message
    );
    assert!(
        rig.journal()
            .iter()
            .filter(|l| l.starts_with("firewall"))
            .all(|l| !l.contains("bypass")),
        "nothing but the endpoints is ever allowed while the tunnel does not work"
    );
    // The server returns: the next attempt connects by itself.
    rig.set_tunnel(TunnelState::Up, Some(0));
    *rig.prober.0.lock().unwrap() = Ok(());
    rig.wait_phase(Phase::Connected).await;
    assert_eq!(rig.status.borrow().reconnects, 2);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failing_probes_make_the_agent_unready_then_reconnect() {
    let mut rig = start(Ok(Arc::new(resolved())));
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    *rig.prober.0.lock().unwrap() = Err("203.0.113.10:7: no answer within 1s".into());
    let s = tokio::time::timeout(
        Duration::from_mins(1),
        rig.status
            .wait_for(|s| s.phase == Phase::Connected && !s.probe_ok),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(!s.ready());
    assert!(
        s.message.starts_with("probe failing (1/3)"),
        "{}",
        s.message
    );
    let s = rig.wait_phase(Phase::Reconnecting).await;
    assert!(
        s.message.starts_with("3 probes in a row failed"),
        "{}",
        s.message
    );
    assert_eq!(rig.open_now(), 0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stale_handshake_or_a_dead_tunnel_process_reconnects() {
    let mut rig = start(Ok(Arc::new(resolved())));
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    rig.set_tunnel(TunnelState::Up, Some(200));
    let s = rig.wait_phase(Phase::Reconnecting).await;
    assert!(
        s.message
            .starts_with("last handshake 200s ago (limit 180s)"),
        "{}",
        s.message
    );
    rig.set_tunnel(
        TunnelState::Failed("openvpn exited (exit status: 1): AUTH_FAILED".into()),
        None,
    );
    rig.wait_phase(Phase::Connecting).await;
    let s = rig.wait_phase(Phase::Reconnecting).await;
    assert!(
        s.message
            .starts_with("openvpn exited (exit status: 1): AUTH_FAILED"),
        "{}",
        s.message
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_worked_starts_the_next_outage_at_the_shortest_backoff() {
    let mut rig = start(Ok(Arc::new(resolved())));
    for _ in 0..3 {
        rig.set_tunnel(TunnelState::Up, Some(1));
        rig.wait_phase(Phase::Connected).await;
        rig.set_tunnel(TunnelState::Failed("openvpn exited".into()), None);
        let s = rig.wait_phase(Phase::Reconnecting).await;
        assert!(
            s.message.ends_with("(attempt 1, next in 1s)"),
            "each outage after a working connection is attempt 1: {}",
            s.message
        );
    }
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_config_change_reconnects_at_once_and_a_broken_one_blocks() {
    let mut rig = start(Ok(Arc::new(resolved())));
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    rig.config.send(Ok(Arc::new(resolved()))).unwrap();
    rig.wait_phase(Phase::Connecting).await;
    rig.wait_phase(Phase::Connected).await;
    assert_eq!(rig.driver.inner.lock().unwrap().opened.len(), 2);
    rig.config
        .send(Err(ConfigError::Credentials {
            path: "/creds".into(),
            reason: "wg0.conf: PrivateKey is missing".into(),
        }))
        .unwrap();
    let s = rig.wait_phase(Phase::Blocked).await;
    assert_eq!(s.message, "config: /creds: wg0.conf: PrivateKey is missing");
    assert_eq!(rig.open_now(), 0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_exit_whose_inbound_ports_alone_change_keeps_its_tunnel() {
    let exit = Resolved {
        exit: Some(exit_role()),
        ..resolved()
    };
    let mut rig = start(Ok(Arc::new(exit.clone())));
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    let mut ports = exit.clone();
    if let Some(role) = ports.exit.as_mut() {
        role.forwards.push(crate::config::Forward {
            name: "web".into(),
            protocols: vec![cloak_model::natpmp::Protocol::Tcp],
            target: "10.96.0.50:80".parse().unwrap(),
            external: None,
            gateway: None,
            backends: Vec::new(),
        });
    }
    rig.config.send(Ok(Arc::new(ports))).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        rig.driver.inner.lock().unwrap().opened.len(),
        1,
        "reconnected"
    );
    assert_eq!(rig.status.borrow().phase, Phase::Connected);
    // Anything else that changes is a new connection, as before.
    let other = Resolved {
        exit: Some(crate::config::ExitRole {
            mss: 1200,
            ..exit_role()
        }),
        ..resolved()
    };
    rig.config.send(Ok(Arc::new(other))).unwrap();
    rig.wait_phase(Phase::Connecting).await;
    rig.wait_phase(Phase::Connected).await;
    assert_eq!(rig.driver.inner.lock().unwrap().opened.len(), 2);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_that_cannot_open_is_retried() {
    let rig = start(Ok(Arc::new(resolved())));
    rig.driver.inner.lock().unwrap().fail_open = Some("creating ck0: permission denied".into());
    let mut rig = rig;
    let s = rig.wait_phase(Phase::Reconnecting).await;
    assert!(
        s.message
            .starts_with("opening the tunnel: creating ck0: permission denied"),
        "{}",
        s.message
    );
    rig.driver.inner.lock().unwrap().fail_open = None;
    rig.set_tunnel(TunnelState::Up, Some(0));
    rig.wait_phase(Phase::Connected).await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_change_of_the_userspace_flag_applies_at_the_next_connection() {
    let kernel = Resolved {
        userspace: false,
        ..resolved()
    };
    let mut rig = start(Ok(Arc::new(kernel)));
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    rig.config.send(Ok(Arc::new(resolved()))).unwrap();
    rig.wait_phase(Phase::Connecting).await;
    rig.wait_phase(Phase::Connected).await;
    let userspace: Vec<bool> = rig
        .driver
        .inner
        .lock()
        .unwrap()
        .opened
        .iter()
        .map(|(_, userspace)| *userspace)
        .collect();
    assert_eq!(userspace, [false, true]);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_config_source_that_goes_away_leaves_the_tunnel_as_it_is() {
    let mut rig = start(Ok(Arc::new(resolved())));
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    // The watcher's sender is dropped (the watcher task ended): no change can come any more.
    drop(std::mem::replace(
        &mut rig.config,
        watch::channel(Err(ConfigError::Interface(String::new()))).0,
    ));
    let journal_before = rig.journal().len();
    tokio::time::sleep(Duration::from_mins(1)).await;
    assert_eq!(rig.status.borrow().phase, Phase::Connected);
    assert_eq!(
        rig.driver.inner.lock().unwrap().opened.len(),
        1,
        "no reconnect"
    );
    assert_eq!(rig.journal().len(), journal_before, "{:?}", rig.journal());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_bad_config_whose_source_goes_away_stays_blocked_without_spinning() {
    let mut rig = start(Err(ConfigError::Interface("x".repeat(20))));
    rig.wait_phase(Phase::Blocked).await;
    drop(std::mem::replace(
        &mut rig.config,
        watch::channel(Err(ConfigError::Interface(String::new()))).0,
    ));
    tokio::time::sleep(Duration::from_mins(1)).await;
    assert_eq!(rig.journal().len(), 2, "{:?}", rig.journal());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_firewall_that_cannot_be_loaded_keeps_the_tunnel_shut_and_says_so() {
    let mut rig = start(Err(ConfigError::Interface("x".repeat(20))));
    rig.wait_phase(Phase::Blocked).await;
    *rig.firewall_fails.lock().unwrap() = Some("nft: Operation not permitted".into());
    rig.config.send(Ok(Arc::new(resolved()))).unwrap();
    let s = tokio::time::timeout(
        Duration::from_mins(1),
        rig.status.wait_for(|s| s.message.contains("block-all")),
    )
    .await
    .expect("the failure is reported")
    .unwrap()
    .clone();
    assert!(!s.ready());
    assert!(
        s.message.contains("nft: Operation not permitted"),
        "{}",
        s.message
    );
    let j = rig.journal();
    assert!(
        j.iter().any(|l| l == "firewall block all FAILED"),
        "the block-all fallback was tried: {j:?}"
    );
    assert!(
        rig.driver.inner.lock().unwrap().opened.is_empty(),
        "no tunnel without a firewall: {j:?}"
    );
    // The firewall works again: the machine recovers by itself.
    *rig.firewall_fails.lock().unwrap() = None;
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    rig.stop().await;
}

/// The config of `resolved()` with its endpoint given as a host name.
fn named() -> Resolved {
    let mut cfg = resolved();
    if let TunnelConfig::WireGuard(wg) = &mut cfg.tunnel {
        wg.peer.endpoint = "0.0.0.0:51820".parse().unwrap();
        wg.peer.endpoint_name = Some("vpn.example.invalid".into());
    }
    cfg
}

#[tokio::test(start_paused = true)]
async fn a_host_name_endpoint_is_resolved_through_the_narrow_path_before_each_attempt() {
    let mut rig = start(Err(ConfigError::Interface("x".repeat(20))));
    rig.wait_phase(Phase::Blocked).await;
    let answers = Arc::clone(&rig.resolver.0);
    answers.lock().unwrap().insert(
        "vpn.example.invalid".into(),
        Err("no answer in time".into()),
    );
    rig.config.send(Ok(Arc::new(named()))).unwrap();
    let s = rig.wait_phase(Phase::Reconnecting).await;
    assert!(
        s.message
            .starts_with("resolving vpn.example.invalid via 10.96.0.10: no answer in time"),
        "{}",
        s.message
    );
    assert!(rig.driver.inner.lock().unwrap().opened.is_empty());
    // The resolver answers: the next attempt resolves anew and connects to that address.
    answers.lock().unwrap().insert(
        "vpn.example.invalid".into(),
        Ok(vec!["192.0.2.7".parse().unwrap()]),
    );
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    let j = rig.journal();
    let resolving = j
        .iter()
        .rposition(|l| l.contains("endpoint names via 10.96.0.10 (marked)"))
        .unwrap();
    assert_eq!(
        j[resolving],
        "firewall allow endpoints [], no tunnel, dns 10.64.0.1 only, endpoint names via 10.96.0.10 (marked)"
    );
    let open = j.iter().position(|l| l == "tunnel open ck0").unwrap();
    assert!(resolving < open, "{j:?}");
    assert!(
        j[resolving + 1..open]
            .iter()
            .filter(|l| l.starts_with("firewall"))
            .all(|l| l.contains("192.0.2.7:51820/udp") && !l.contains("endpoint names")),
        "the path closes before the tunnel opens, and the resolved address is the endpoint: {j:?}"
    );
    let opened = rig.driver.inner.lock().unwrap().opened.clone();
    assert_eq!(
        opened[0].0.endpoints()[0].addr,
        "192.0.2.7:51820".parse().unwrap()
    );
    // A reconnect resolves again, and follows the name to its new address.
    answers.lock().unwrap().insert(
        "vpn.example.invalid".into(),
        Ok(vec!["192.0.2.8".parse().unwrap()]),
    );
    rig.set_tunnel(TunnelState::Failed("gone".into()), None);
    rig.wait_phase(Phase::Reconnecting).await;
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    let opened = rig.driver.inner.lock().unwrap().opened.clone();
    assert_eq!(
        opened.last().unwrap().0.endpoints()[0].addr,
        "192.0.2.8:51820".parse().unwrap()
    );
    rig.stop().await;
}

#[test]
fn backoff_doubles_and_caps() {
    let (a, b) = (Duration::from_millis(500), Duration::from_secs(30));
    assert_eq!(backoff(a, b, 1), Duration::from_millis(500));
    assert_eq!(backoff(a, b, 3), Duration::from_secs(2));
    assert_eq!(backoff(a, b, 40), b);
}

/// Found in review of the split into states: a shutdown that came while a probe was running left
/// the tunnel open until after the block-all.
#[tokio::test(start_paused = true)]
async fn a_shutdown_during_a_probe_closes_the_tunnel_before_blocking() {
    let mut rig = start(Ok(Arc::new(resolved())));
    rig.set_tunnel(TunnelState::Up, Some(1));
    rig.wait_phase(Phase::Connected).await;
    *rig.prober.1.lock().unwrap() = Duration::from_secs(30);
    // The next probe starts after one interval (1 s) and runs for 30 s: stop in the middle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let j = rig.stop().await;
    let close = j.iter().rposition(|e| e == "tunnel close ck0");
    let block = j.iter().rposition(|e| e == "firewall block all");
    assert!(
        close.is_some() && close < block,
        "the tunnel closes, then everything is blocked: {j:?}"
    );
}

#[test]
fn the_bypass_and_the_mss_clamp_belong_to_connected_alone() {
    let cfg = resolved();
    let connecting = policy::connecting(&cfg, true);
    assert!(
        connecting.bypass.is_empty(),
        "no bypass before the tunnel works"
    );
    assert_eq!(connecting.clamp_mss, None);
    assert_eq!(connecting.tunnel.as_deref(), Some("ck0"));
    assert_eq!(
        policy::connecting(&cfg, false).tunnel,
        None,
        "reconnecting: no tunnel"
    );
    let connected = policy::connected(&cfg);
    assert_eq!(connected.bypass, cfg.bypass);
    assert_eq!(connected.clamp_mss, Some(cfg.tunnel.mtu() - 40));
    assert_eq!(connected.endpoints, connecting.endpoints);
}
