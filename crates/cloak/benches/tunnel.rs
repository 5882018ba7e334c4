//! Data-plane benchmark, side by side in one run, in the network lab (as root):
//!
//! - throughput of one TCP stream (iperf3, upload and download) through `cloak agent`'s tunnel
//!   versus a bare tunnel of the same implementation (the dataplane crate's boringtun device,
//!   one thread, plain routes, no firewall, no policy routing) between the same namespaces to the
//!   same fake provider;
//! - UDP round-trip latency through each, and over the bare underlay for reference;
//! - the agent's RSS, idle and after the throughput runs (peak).
//!
//! Bare and agent runs alternate (`ROUNDS` each) so drift on a shared machine hits both alike.
//! Run: `cargo bench -p cloak --bench tunnel` (`-- 3 9`: 3-second iperf runs, 9 rounds). Prints figures;
//! asserts nothing about speed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_precision_loss
)]

use std::{
    fs::File,
    net::UdpSocket,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use cloak_dataplane::{
    Key,
    wireguard::{Userspace, WireguardConfig},
};
use cloak_testkit::netlab::{FakeWireguard, INTERNET, Lab, PROVIDER, wait_until};

const ROUNDS: usize = 5;
/// Throughput runs: a probe every 2 s, as a deployment would.
const SLOW_PROBES: &str = "health:\n  probe: tcp://203.0.113.10:7\n  interval: 2s\n";
/// Outage runs: the settings the end-to-end tests use.
const FAST_PROBES: &str = "health:\n  probe: tcp://203.0.113.10:7\n  interval: 300ms\n  timeout: 700ms\n  failures: 2\nbackoff: 200ms\nbackoffMax: 1s\n";

/// Runs `f` on a thread inside namespace `ns` and returns its result.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// The baseline: the same boringtun device in the pod, a plain route to the internet through
/// it, nothing else.
struct BareTunnel {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareTunnel {
    fn start(pod: &str, wg0: &str) -> Self {
        let mut config = WireguardConfig::from_wg_quick(wg0, "ckbare").unwrap();
        config.fwmark = None;
        let path = format!("/var/run/netns/{pod}");
        let (stop, stopped) = mpsc::channel::<()>();
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = File::open(path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let tunnel = Userspace::open(&config).unwrap();
            let ok = Command::new("ip")
                .args(["route", "add", "203.0.113.0/24", "dev", "ckbare"])
                .status()
                .unwrap();
            assert!(ok.success());
            ready_tx.send(()).unwrap();
            let _ = stopped.recv();
            drop(tunnel);
        });
        ready.recv().unwrap();
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for BareTunnel {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// One iperf3 run from the pod to the internet; Mbit/s received.
fn iperf(lab: &Lab, seconds: u64, reverse: bool) -> f64 {
    let mut cmd = lab.pod().command("iperf3");
    cmd.args(["-c", INTERNET, "-J", "-t", &seconds.to_string()]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("iperf3: {}", String::from_utf8_lossy(&out.stderr)));
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 failed: {json}"))
        / 1e6
}

/// UDP round trips to the echo service from inside the pod: (median, p99) in microseconds.
fn udp_rtt(pod: &str, samples: usize) -> (f64, f64) {
    let mut rtts = in_netns(pod, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        socket.connect(format!("{INTERNET}:7")).unwrap();
        let mut buf = [0u8; 64];
        let mut rtts = Vec::with_capacity(samples);
        for _ in 0..samples {
            let start = Instant::now();
            socket.send(b"ping").unwrap();
            if socket.recv(&mut buf).is_ok() {
                rtts.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        rtts
    });
    rtts.sort_by(f64::total_cmp);
    let at = |percent: usize| rtts[(rtts.len() - 1) * percent / 100];
    (at(50), at(99))
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

struct Agent {
    child: Child,
    pod: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(lab: &Lab, wg0: &str, health: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("wg0.conf"), wg0).unwrap();
        std::fs::write(
            dir.path().join("agent.yaml"),
            format!("credentials: wg0.conf\n{health}"),
        )
        .unwrap();
        let child = lab
            .pod()
            .command(env!("CARGO_BIN_EXE_cloak"))
            .args(["agent", "--admin-addr", "127.0.0.1:9090", "--config"])
            .arg(dir.path().join("agent.yaml"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Self {
            child,
            pod: lab.pod().name().to_owned(),
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(30), || ready(lab)),
            "the agent did not become ready"
        );
        agent
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        // A stopped agent leaves the pod blocked on purpose; the next round needs it open.
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.pod,
                env!("CARGO_BIN_EXE_cloak"),
                "agent",
                "reset",
            ])
            .status();
    }
}

fn ready(lab: &Lab) -> bool {
    lab.pod()
        .command("curl")
        .args(["-sf", "-m", "1", "http://127.0.0.1:9090/readyz"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a TCP connection from the pod to the internet gets its answer within 200 ms.
fn tcp_works(pod: &str) -> bool {
    in_netns(pod, || {
        let addr = format!("{INTERNET}:7").parse().unwrap();
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// Stops the provider and measures until the agent reports unready, then restarts it and
/// measures until traffic flows again and until the agent reports ready: seconds.
fn outage(lab: &Lab, server: &mut FakeWireguard) -> (f64, f64, f64) {
    let pod = lab.pod().name().to_owned();
    server.stop();
    let start = Instant::now();
    assert!(wait_until(Duration::from_secs(20), || !ready(lab)));
    let detected = start.elapsed().as_secs_f64();
    // Let the agent sit in its backoff a while, as it would during a real outage.
    std::thread::sleep(Duration::from_secs(3));
    server.resume();
    let start = Instant::now();
    assert!(wait_until(Duration::from_secs(30), || tcp_works(&pod)));
    let traffic = start.elapsed().as_secs_f64();
    assert!(wait_until(Duration::from_secs(30), || ready(lab)));
    (detected, traffic, start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // cargo passes `--bench`; the numbers are ours: [seconds per iperf run] [rounds].
    let numbers: Vec<u64> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let seconds = numbers.first().copied().unwrap_or(5);
    let rounds = numbers
        .get(1)
        .map_or(ROUNDS, |&r| usize::try_from(r).unwrap_or(ROUNDS));
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the tunnel benchmark needs root (network namespaces)"
    );
    let lab = Lab::new();
    let pod = lab.pod().name().to_owned();
    let key = Key::generate();
    let server = FakeWireguard::start(
        lab.provider(),
        format!("{PROVIDER}:51820").parse().unwrap(),
        key.public(),
    );
    let wg0 = server.client_conf(&key);
    let mut iperf_server = lab
        .internet()
        .command("iperf3")
        .args(["-s"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let underlay = udp_rtt(&pod, 500);
    let (mut bare_up, mut bare_down, mut agent_up, mut agent_down) =
        (vec![], vec![], vec![], vec![]);
    let (mut bare_rtt, mut agent_rtt) = (vec![], vec![]);
    let (mut idle_rss, mut peak_rss) = (0, 0);
    for round in 1..=rounds {
        {
            let _bare = BareTunnel::start(&pod, &wg0);
            bare_rtt.push(udp_rtt(&pod, 500).0);
            bare_up.push(iperf(&lab, seconds, false));
            bare_down.push(iperf(&lab, seconds, true));
        }
        {
            let agent = Agent::start(&lab, &wg0, SLOW_PROBES);
            let pid = agent.child.id();
            idle_rss = idle_rss.max(rss_kib(pid, "VmRSS:"));
            agent_rtt.push(udp_rtt(&pod, 500).0);
            agent_up.push(iperf(&lab, seconds, false));
            agent_down.push(iperf(&lab, seconds, true));
            peak_rss = peak_rss.max(rss_kib(pid, "VmHWM:"));
        }
        println!(
            "round {round}: bare {:.0}/{:.0} Mbit/s up/down, agent {:.0}/{:.0}",
            bare_up[round - 1],
            bare_down[round - 1],
            agent_up[round - 1],
            agent_down[round - 1]
        );
    }
    let (bu, bd, au, ad) = (
        median(bare_up),
        median(bare_down),
        median(agent_up),
        median(agent_down),
    );
    let (br, ar) = (median(bare_rtt), median(agent_rtt));
    println!(
        "\n| one TCP stream, {seconds} s, median of {rounds} | bare boringtun | cloak agent | agent/bare |"
    );
    println!("|---|---|---|---|");
    println!(
        "| upload (pod -> internet) | {bu:.0} Mbit/s | {au:.0} Mbit/s | {:.1} % |",
        au / bu * 100.0
    );
    println!(
        "| download (internet -> pod) | {bd:.0} Mbit/s | {ad:.0} Mbit/s | {:.1} % |",
        ad / bd * 100.0
    );
    println!(
        "| UDP round trip, median | {br:.0} µs | {ar:.0} µs | {:+.0} µs |",
        ar - br
    );
    println!(
        "\nunderlay (no tunnel) UDP round trip: median {:.0} µs, p99 {:.0} µs",
        underlay.0, underlay.1
    );
    println!(
        "agent RSS: {:.1} MiB connected and idle, {:.1} MiB peak (VmHWM) after the runs",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );

    let mut server = server;
    let agent = Agent::start(&lab, &wg0, FAST_PROBES);
    println!(
        "\n| provider outage (probe every 300 ms, timeout 700 ms, 2 failures; backoff 200 ms..1 s) | detected (unready) | traffic flows after restart | ready after restart |"
    );
    println!("|---|---|---|---|");
    for round in 1..=3 {
        let (detected, traffic, ready) = outage(&lab, &mut server);
        println!("| round {round} | {detected:.2} s | {traffic:.2} s | {ready:.2} s |");
    }
    drop(agent);
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
}
