//! `cloak agent` end to end, as root, in the network lab: a real `cloak agent` process in a "pod"
//! namespace, real WireGuard (userspace boringtun) and OpenVPN tunnels to fake providers, real
//! packets to an echo service that reports the source address it saw, and leak counters on the
//! node that count everything the pod sends outside its tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cloak_dataplane::Key;
use cloak_testkit::netlab::{
    FakeOpenVpn, FakeWireguard, INTERNET, INTERNET6, Lab, LeakCounters, NODE_INTERNET,
    NODE_INTERNET6, PROVIDER, PROVIDER_EXIT, PROVIDER_EXIT6, PROVIDER6, RESOLVER, wait_until,
};

const HEALTH: &str = "health:\n  probe: tcp://203.0.113.10:7\n  interval: 300ms\n  timeout: 700ms\n  failures: 2\nconnectTimeout: 3s\nbackoff: 200ms\nbackoffMax: 1s\n";

/// A `cloak agent` process in the lab's pod namespace. Stopped (by PID) on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    pod: String,
}

impl Agent {
    /// Starts the agent with `yaml` as its config and `files` in its credentials directory.
    fn start(lab: &Lab, yaml: &str, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("creds")).unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join("creds").join(name), content).unwrap();
        }
        std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", lab.pod().name()])
            .arg(env!("CARGO_BIN_EXE_cloak"))
            .args([
                "agent",
                "--admin-addr",
                "127.0.0.1:9090",
                "--watch-ms",
                "200",
            ])
            .arg("--config")
            .arg(dir.path().join("agent.yaml"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            dir,
            pod: lab.pod().name().to_owned(),
        }
    }

    /// Runs the agent to its exit with `args` (its config and state directory among them):
    /// for starts that must fail. Returns its exit status and output.
    fn run_to_exit(lab: &Lab, args: &[&str]) -> (std::process::ExitStatus, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", lab.pod().name()])
            .arg(env!("CARGO_BIN_EXE_cloak"))
            .arg("agent")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not exit within 10s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status, text)
    }

    fn creds(&self) -> PathBuf {
        self.dir.path().join("creds")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// GET on the admin server, from inside the pod: (status code, body).
    fn admin(&self, path: &str) -> (u16, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.pod,
                "curl",
                "-s",
                "-m",
                "2",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://127.0.0.1:9090{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Waits until `/readyz` answers `ready` (true) or not (false); returns its last body.
    fn wait_ready(&self, ready: bool, limit: Duration) -> String {
        let mut last = String::new();
        let ok = wait_until(limit, || {
            let (code, body) = self.admin("/readyz");
            last = body;
            (code == 200) == ready && code != 0
        });
        assert!(
            ok,
            "readyz never became {}: {last}\n--- agent log\n{}",
            if ready { "ready" } else { "unready" },
            self.log()
        );
        last
    }

    /// Waits until `/readyz` says `text`; returns that answer (a later one may already say
    /// something else: the agent retries meanwhile).
    fn wait_readyz(&self, text: &str, limit: Duration) -> String {
        let mut last = String::new();
        let ok = wait_until(limit, || {
            last = self.admin("/readyz").1;
            last.contains(text)
        });
        assert!(
            ok,
            "readyz never said {text:?}: {last}\n--- agent log\n{}",
            self.log()
        );
        last
    }

    fn metric(&self, line_start: &str) -> Option<String> {
        self.admin("/metrics")
            .1
            .lines()
            .find(|l| l.starts_with(line_start))
            .map(str::to_owned)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wg_lab() -> (Lab, FakeWireguard, Key) {
    let lab = Lab::new();
    let key = Key::generate();
    let server = FakeWireguard::start(
        lab.provider(),
        format!("{PROVIDER}:51820").parse().unwrap(),
        key.public(),
    );
    (lab, server, key)
}

/// An OpenVPN server on `endpoint`, leak counters that know it, and an agent connected to it
/// (asserted: ready, through OpenVPN, with the provider's exit address).
fn openvpn_connected<'a>(lab: &'a Lab, endpoint: &str) -> (FakeOpenVpn, LeakCounters<'a>, Agent) {
    let server = FakeOpenVpn::start(lab.provider(), endpoint.parse().unwrap());
    let counters = lab.count_leaks(&[server.endpoint], "udp");
    let agent = Agent::start(
        lab,
        &format!("credentials: creds\ndns: {RESOLVER}\n{HEALTH}"),
        &[("config.ovpn", server.client_ovpn())],
    );
    let ready = agent.wait_ready(true, Duration::from_secs(30));
    assert!(
        ready.contains("connected via openvpn, exit 198.51.100.2"),
        "{ready}"
    );
    (server, counters, agent)
}

/// Every kind of traffic a leak could take, tried from the pod: TCP, UDP, DNS to the resolver
/// and to another server, IPv6. Returns how many attempts succeeded.
fn try_everything(lab: &Lab) -> usize {
    let t = Duration::from_millis(400);
    [
        lab.ask("tcp", INTERNET, t),
        lab.ask("udp", INTERNET, t),
        lab.ask("dns", RESOLVER, t),
        lab.ask("dns", INTERNET, t),
        lab.ask("tcp", INTERNET6, t),
    ]
    .iter()
    .filter(|r| r.is_ok())
    .count()
}

/// A DNS server for host names (the pod's cluster DNS, outside the tunnel): answers A queries
/// from the `name address [delay-seconds]` lines of the file it is given, read anew for every
/// query, each answer in a thread of its own (a delayed answer holds up no other); NXDOMAIN for
/// other names, no records for other types. Prints "ready" once bound.
const NAME_SERVER: &str = r#"
import socket, sys, threading, time
bind, table = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((bind, 53))
print("ready", flush=True)
def answer(q, peer):
    at, labels = 12, []
    while q[at]:
        labels.append(q[at + 1:at + 1 + q[at]].decode().lower()); at += 1 + q[at]
    qtype = int.from_bytes(q[at + 1:at + 3], "big")
    names = {l.split()[0]: l.split()[1:] for l in open(table) if l.strip()}
    ip, *delay = names.get(".".join(labels), [None])
    time.sleep(float(delay[0]) if delay else 0)
    rcode = 0 if ip else 3
    answers = b""
    if ip and qtype == 1:
        answers = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x01\x00\x04" + socket.inet_aton(ip)
    head = q[:2] + bytes([0x81, 0x80 | rcode]) + b"\x00\x01" + (b"\x00\x01" if answers else b"\x00\x00") + b"\x00\x00\x00\x00"
    s.sendto(head + q[12:at + 5] + answers, peer)
while True:
    q, peer = s.recvfrom(512)
    threading.Thread(target=answer, args=(q, peer), daemon=True).start()
"#;

/// [`NAME_SERVER`] in the node namespace on the pod's gateway address, with its table.
struct NameServer {
    child: Child,
    table: tempfile::NamedTempFile,
}

impl NameServer {
    const ADDR: &str = "10.77.0.1";

    fn start(lab: &Lab, names: &str) -> Self {
        let table = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(table.path(), names).unwrap();
        let mut child = lab
            .node()
            .command("python3")
            .args(["-c", NAME_SERVER, Self::ADDR])
            .arg(table.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        Self { child, table }
    }

    fn set(&self, names: &str) {
        write_atomically(self.table.path(), names);
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

#[test]
fn wireguard_egress_leaves_through_the_provider_and_nothing_else_leaves() {
    let (lab, server, key) = wg_lab();
    let counters = lab.count_leaks(&[server.endpoint], "udp");
    let etc = tempfile::tempdir().unwrap();
    let resolv_conf = etc.path().join("resolv.conf");
    let agent = Agent::start(
        &lab,
        &format!(
            "credentials: creds\nresolvConf: {}\nbypass: []\n{HEALTH}",
            resolv_conf.display()
        ),
        &[("wg0.conf", &server.client_conf(&key))],
    );
    let ready = agent.wait_ready(true, Duration::from_secs(20));
    assert!(
        ready.starts_with("ready: connected: connected via boringtun, exit 198.51.100.2"),
        "{ready}"
    );

    let t = Duration::from_secs(2);
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert_eq!(lab.ask("http", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert_eq!(lab.ask("udp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert_eq!(
        lab.ask("dns", RESOLVER, t).as_deref(),
        Ok(PROVIDER_EXIT),
        "DNS goes through the tunnel to the configured resolver"
    );
    let short = Duration::from_millis(500);
    assert!(
        lab.ask("dns", INTERNET, short).is_err(),
        "DNS to any other server is dropped"
    );
    assert!(
        lab.ask("tcp", INTERNET6, short).is_err(),
        "IPv6 is blocked: the tunnel carries only IPv4 here"
    );

    let leaks = counters.read();
    assert_eq!(
        leaks.leaked(),
        0,
        "packets left outside the tunnel: {leaks:?}"
    );
    assert!(
        leaks.tunnel > 10,
        "the traffic went to the endpoint: {leaks:?}"
    );

    assert_eq!(
        agent
            .metric("cloak_agent_state{state=\"connected\"}")
            .as_deref(),
        Some("cloak_agent_state{state=\"connected\"} 1")
    );
    assert!(
        agent
            .metric("cloak_agent_exit_info{ip=\"198.51.100.2\"} 1")
            .is_some()
    );
    assert!(
        agent
            .metric("cloak_agent_probe_latency_seconds_count")
            .is_some()
    );
    let written = std::fs::read_to_string(&resolv_conf).unwrap();
    assert!(
        written.starts_with("# written by cloak agent\n")
            && written.ends_with("\nnameserver 203.0.113.53\n"),
        "{written}"
    );
    let log = agent.log();
    assert!(
        !log.contains(&*key.to_base64()),
        "the private key is never logged"
    );
    assert!(log.contains("firewall"), "{log}");

    // A stopped agent leaves the pod closed; `cloak agent reset` opens it, and then traffic
    // leaves through the node, where the leak counters see it (they are not blind).
    drop(agent);
    assert!(
        lab.ask("tcp", INTERNET, short).is_err(),
        "closed after the agent stopped"
    );
    assert_eq!(counters.read().leaked(), 0);
    lab.pod()
        .run(&[env!("CARGO_BIN_EXE_cloak"), "agent", "reset"]);
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(NODE_INTERNET));
    let after = counters.read();
    assert!(
        after.ipv4 > 0,
        "the counters count traffic outside the tunnel: {after:?}"
    );
    assert_eq!(lab.pod().run(&["nft", "list", "tables"]).trim(), "");
    assert!(!lab.pod().run(&["ip", "rule", "show"]).contains("17260"));
}

#[test]
fn kill_switch_holds_while_the_provider_is_stopped_blackholed_or_rekeyed_and_traffic_resumes() {
    let (lab, mut server, key) = wg_lab();
    let counters = lab.count_leaks(&[server.endpoint], "udp");
    let agent = Agent::start(
        &lab,
        &format!("credentials: creds\n{HEALTH}"),
        &[("wg0.conf", &server.client_conf(&key))],
    );
    agent.wait_ready(true, Duration::from_secs(20));
    let t = Duration::from_secs(2);

    // 1. The provider stops.
    server.stop();
    let before = counters.read();
    let unready = agent.wait_ready(false, Duration::from_secs(10));
    assert!(unready.starts_with("not ready: "), "{unready}");
    assert_eq!(
        try_everything(&lab),
        0,
        "nothing gets through while the provider is down"
    );
    let outage = counters.read() - before;
    assert_eq!(outage.leaked(), 0, "leaked during the outage: {outage:?}");
    assert_eq!(outage.dns, 0);
    server.resume();
    agent.wait_ready(true, Duration::from_secs(20));
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));

    // 2. The path to the provider silently drops everything.
    let before = counters.read();
    lab.blackhole_provider(true);
    agent.wait_ready(false, Duration::from_secs(10));
    assert_eq!(try_everything(&lab), 0);
    lab.blackhole_provider(false);
    agent.wait_ready(true, Duration::from_secs(20));
    let outage = counters.read() - before;
    assert_eq!(
        outage.leaked(),
        0,
        "leaked during the blackhole: {outage:?}"
    );
    assert_eq!(lab.ask("udp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));

    // 3. The provider rotates its key: the agent cannot connect until its credentials change.
    let before = counters.read();
    server.rotate_key();
    let unready = agent.wait_ready(false, Duration::from_secs(10));
    assert!(unready.contains("not ready"), "{unready}");
    assert_eq!(try_everything(&lab), 0);
    let outage = counters.read() - before;
    assert_eq!(
        outage.leaked(),
        0,
        "leaked after the key rotation: {outage:?}"
    );
    write_atomically(&agent.creds().join("wg0.conf"), &server.client_conf(&key));
    agent.wait_ready(true, Duration::from_secs(20));
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert!(agent.log().contains("config changed; re-applying"));
    let reconnects = agent.metric("cloak_agent_reconnects_total").unwrap();
    assert_ne!(reconnects, "cloak_agent_reconnects_total 0");
    assert_eq!(counters.read().leaked(), 0);
}

#[test]
fn openvpn_egress_works_and_its_kill_switch_holds_across_a_server_restart() {
    let lab = Lab::new();
    let (mut server, counters, agent) = openvpn_connected(&lab, &format!("{PROVIDER}:1194"));
    let t = Duration::from_secs(2);
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert_eq!(lab.ask("dns", RESOLVER, t).as_deref(), Ok(PROVIDER_EXIT));
    assert!(
        lab.ask("dns", INTERNET, Duration::from_millis(500))
            .is_err()
    );

    server.stop();
    let before = counters.read();
    agent.wait_ready(false, Duration::from_secs(15));
    assert_eq!(try_everything(&lab), 0);
    let outage = counters.read() - before;
    assert_eq!(outage.leaked(), 0, "leaked during the outage: {outage:?}");
    server.resume();
    agent.wait_ready(true, Duration::from_secs(40));
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert_eq!(counters.read().leaked(), 0, "{:?}", counters.read());
}

#[test]
fn a_healthy_openvpn_tunnel_is_kept_past_the_wireguard_handshake_limit() {
    let lab = Lab::new();
    let server = FakeOpenVpn::start(lab.provider(), format!("{PROVIDER}:1194").parse().unwrap());
    // handshakeTimeout is WireGuard's stale-handshake limit; OpenVPN's own keepalive judges
    // its peer, so a connection older than the limit is no reason to reconnect.
    let agent = Agent::start(
        &lab,
        &format!(
            "credentials: creds\ndns: {RESOLVER}\n{}",
            HEALTH.replace("failures: 2\n", "failures: 2\n  handshakeTimeout: 2s\n")
        ),
        &[("config.ovpn", server.client_ovpn())],
    );
    agent.wait_ready(true, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(7));
    let (code, body) = agent.admin("/readyz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        agent.metric("cloak_agent_reconnects_total").as_deref(),
        Some("cloak_agent_reconnects_total 0"),
        "{}",
        agent.log()
    );
    assert_eq!(
        lab.ask("tcp", INTERNET, Duration::from_secs(2)).as_deref(),
        Ok(PROVIDER_EXIT)
    );
}

#[test]
fn an_agent_that_cannot_start_leaves_the_pod_blocked() {
    let (lab, server, key) = wg_lab();
    assert_ne!(
        try_everything(&lab),
        0,
        "before any agent the pod is open (or this test proves nothing)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("creds")).unwrap();
    std::fs::write(dir.path().join("creds/wg0.conf"), server.client_conf(&key)).unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, format!("credentials: creds\n{HEALTH}")).unwrap();
    let config = config.to_str().unwrap();
    // A state directory that cannot be created (its parent is a file).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let state = file.join("state");
    let (status, output) = Agent::run_to_exit(
        &lab,
        &["--config", config, "--state-dir", state.to_str().unwrap()],
    );
    assert!(!status.success(), "{output}");
    assert!(output.contains("a-file/state"), "{output}");
    assert_eq!(
        try_everything(&lab),
        0,
        "a state-directory error fails open"
    );

    // An admin address that cannot be bound (not an address of this namespace).
    let (status, output) = Agent::run_to_exit(&lab, &["reset"]);
    assert!(status.success(), "{output}");
    assert_ne!(try_everything(&lab), 0);
    let (status, output) = Agent::run_to_exit(
        &lab,
        &[
            "--config",
            config,
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--admin-addr",
            "192.0.2.250:9090",
        ],
    );
    assert!(!status.success(), "{output}");
    assert!(output.contains("192.0.2.250:9090"), "{output}");
    assert_eq!(try_everything(&lab), 0, "an admin-port error fails open");
}

/// A WireGuard endpoint given as a host name resolves while the kill switch is closed, through
/// the one narrow path (the agent's own marked queries, to the one resolver), and is resolved
/// again at every attempt: while the name points nowhere the agent keeps failing, and once it
/// points at the server the next attempt connects there. Applications' DNS to that resolver
/// stays dropped.
#[test]
fn a_wireguard_endpoint_host_name_resolves_under_the_kill_switch_at_every_attempt() {
    let (lab, server, key) = wg_lab();
    // Slow answers: the agent spends about 2 s of each attempt with the narrow path open.
    let names = NameServer::start(&lab, "vpn.provider.test 192.0.2.99 2\n");
    let dns = format!("{}:53", NameServer::ADDR).parse().unwrap();
    let counters = lab.count_leaks(
        &[server.endpoint, "192.0.2.99:51820".parse().unwrap(), dns],
        "udp",
    );
    let conf = server
        .client_conf(&key)
        .replace(&format!("{PROVIDER}:51820"), "vpn.provider.test:51820");
    let agent = Agent::start(
        &lab,
        &format!(
            "credentials: creds\nendpointResolver: {}\n{HEALTH}",
            NameServer::ADDR
        ),
        &[("wg0.conf", &conf)],
    );
    agent.wait_readyz(
        "no wireguard handshake with 192.0.2.99:51820/udp within 3s (attempt 2",
        Duration::from_secs(15),
    );
    assert_eq!(try_everything(&lab), 0);
    // While the agent's own query is out (the path open), an application's query to the same
    // resolver (the server answers it at once) is still dropped: the mark is what lets through.
    let mut probed = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while probed < 2 && Instant::now() < deadline {
        if agent
            .admin("/readyz")
            .1
            .contains("resolving vpn.provider.test")
        {
            assert!(
                lab.ask("dns", NameServer::ADDR, Duration::from_millis(500))
                    .is_err(),
                "an application's DNS left while the agent was resolving"
            );
            probed += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(probed, 2, "never caught the agent resolving");
    assert!(
        lab.ask("dns", NameServer::ADDR, Duration::from_millis(500))
            .is_err(),
        "an application's DNS to the endpoint resolver is dropped"
    );

    names.set(&format!("vpn.provider.test {PROVIDER}\n"));
    agent.wait_ready(true, Duration::from_secs(20));
    assert_eq!(
        lab.ask("tcp", INTERNET, Duration::from_secs(2)).as_deref(),
        Ok(PROVIDER_EXIT)
    );
    assert!(
        lab.ask("dns", NameServer::ADDR, Duration::from_millis(500))
            .is_err(),
        "still dropped once connected"
    );
    let leaks = counters.read();
    assert_eq!(leaks.leaked(), 0, "{leaks:?}");
}

/// An OpenVPN `remote` given as a host name connects: openvpn is handed the address the agent
/// resolved (its own lookup would be dropped by the kill switch).
#[test]
fn an_openvpn_remote_host_name_connects() {
    let lab = Lab::new();
    let server = FakeOpenVpn::start(lab.provider(), format!("{PROVIDER}:1194").parse().unwrap());
    let _names = NameServer::start(&lab, &format!("gw.provider.test {PROVIDER}\n"));
    let ovpn = server
        .client_ovpn()
        .replace(&format!("remote {PROVIDER}"), "remote gw.provider.test");
    assert!(ovpn.contains("remote gw.provider.test"), "{ovpn}");
    let agent = Agent::start(
        &lab,
        &format!(
            "credentials: creds\ndns: {RESOLVER}\nendpointResolver: {}\n{HEALTH}",
            NameServer::ADDR
        ),
        &[("config.ovpn", &ovpn)],
    );
    let ready = agent.wait_ready(true, Duration::from_secs(30));
    assert!(ready.contains("connected via openvpn"), "{ready}");
}

#[test]
fn openvpn_to_an_ipv6_endpoint_connects_and_nothing_else_leaves() {
    let lab = Lab::new();
    let (_server, counters, _agent) = openvpn_connected(&lab, &format!("[{PROVIDER6}]:1194"));
    let t = Duration::from_secs(2);
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert!(
        lab.ask("tcp", INTERNET6, Duration::from_millis(500))
            .is_err(),
        "IPv6 to anything but the endpoint stays blocked"
    );
    let leaks = counters.read();
    assert_eq!(leaks.leaked(), 0, "{leaks:?}");
    assert!(leaks.tunnel > 10, "{leaks:?}");
}

#[test]
fn bad_config_keeps_the_pod_closed_says_what_is_wrong_and_recovers_when_fixed() {
    let (lab, server, key) = wg_lab();
    // The agent is pointed at an unreachable endpoint below; packets to it are not leaks.
    let counters = lab.count_leaks(
        &[server.endpoint, "192.0.2.99:51820".parse().unwrap()],
        "udp",
    );
    let good = server.client_conf(&key);
    let no_key: String = good
        .lines()
        .filter(|l| !l.starts_with("PrivateKey"))
        .flat_map(|l| [l, "\n"])
        .collect();
    let agent = Agent::start(
        &lab,
        &format!("credentials: creds\n{HEALTH}"),
        &[("wg0.conf", &no_key)],
    );

    // Missing key: blocked, with the reason in /readyz and the log; nothing leaves.
    agent.wait_readyz("PrivateKey", Duration::from_secs(10));
    let unready = agent.wait_ready(false, Duration::from_secs(10));
    assert!(unready.contains("blocked: config: "), "{unready}");
    assert!(
        unready.contains("wg0.conf: PrivateKey is missing"),
        "{unready}"
    );
    assert_eq!(try_everything(&lab), 0);
    assert!(agent.log().contains("PrivateKey is missing"));

    // Malformed agent config.
    write_atomically(
        &agent.dir.path().join("agent.yaml"),
        "credentials: [not, a, path\n",
    );
    agent.wait_readyz("is not a valid agent config", Duration::from_secs(5));

    // Unreachable endpoint: keeps retrying, says so.
    let unreachable = good.replace(&format!("{PROVIDER}:51820"), "192.0.2.99:51820");
    write_atomically(&agent.creds().join("wg0.conf"), &unreachable);
    write_atomically(
        &agent.dir.path().join("agent.yaml"),
        &format!("credentials: creds\n{HEALTH}"),
    );
    agent.wait_readyz(
        "no wireguard handshake with 192.0.2.99:51820/udp within 3s (attempt 2",
        Duration::from_secs(15),
    );
    assert_eq!(try_everything(&lab), 0);

    // Fixed: connects by itself.
    write_atomically(&agent.creds().join("wg0.conf"), &good);
    agent.wait_ready(true, Duration::from_secs(20));
    assert_eq!(
        lab.ask("tcp", INTERNET, Duration::from_secs(2)).as_deref(),
        Ok(PROVIDER_EXIT)
    );
    let leaks = counters.read();
    assert_eq!(leaks.leaked(), 0, "{leaks:?}");
}

#[test]
fn ipv6_goes_through_the_tunnel_when_the_tunnel_carries_it() {
    let (lab, server, key) = wg_lab();
    let counters = lab.count_leaks(&[server.endpoint], "udp");
    let agent = Agent::start(
        &lab,
        &format!("credentials: creds\n{HEALTH}"),
        &[("wg0.conf", &server.client_conf_dual_stack(&key))],
    );
    let ready = agent.wait_ready(true, Duration::from_secs(20));
    assert!(ready.contains("exit 198.51.100.2"), "{ready}");
    let t = Duration::from_secs(2);
    assert_eq!(lab.ask("tcp", INTERNET6, t).as_deref(), Ok(PROVIDER_EXIT6));
    assert_eq!(lab.ask("udp", INTERNET6, t).as_deref(), Ok(PROVIDER_EXIT6));
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    let leaks = counters.read();
    assert_eq!(leaks.leaked(), 0, "{leaks:?}");
}

#[test]
fn bypass_networks_are_reached_outside_the_tunnel_over_ipv4_and_ipv6_but_never_dns() {
    let (lab, server, key) = wg_lab();
    let counters = lab.count_leaks(&[server.endpoint], "udp");
    // The resolver's address stands in for a cluster network; the echo service answers TCP on
    // every address, so what it reports tells which way each connection went.
    let agent = Agent::start(
        &lab,
        &format!("credentials: creds\nbypass: [{RESOLVER}/32, {INTERNET6}/128]\n{HEALTH}"),
        &[("wg0.conf", &server.client_conf(&key))],
    );
    agent.wait_ready(true, Duration::from_secs(20));
    assert_eq!(counters.read().leaked(), 0, "{:?}", counters.read());

    let t = Duration::from_secs(2);
    assert_eq!(
        lab.ask("tcp", INTERNET, t).as_deref(),
        Ok(PROVIDER_EXIT),
        "everything else still goes through the tunnel"
    );
    assert_eq!(
        lab.ask("tcp", RESOLVER, t).as_deref(),
        Ok(NODE_INTERNET),
        "an IPv4 bypass network is reached through the node"
    );
    assert_eq!(
        lab.ask("tcp", INTERNET6, t).as_deref(),
        Ok(NODE_INTERNET6),
        "an IPv6 bypass network is reached through the node (neighbour discovery works)"
    );
    assert!(
        lab.ask("dns", RESOLVER, Duration::from_millis(500))
            .is_err(),
        "DNS never leaves outside the tunnel, not even to a bypass network"
    );
    let leaks = counters.read();
    assert!(leaks.ipv4 > 0 && leaks.ipv6 > 0, "{leaks:?}");
    assert_eq!(leaks.dns, 0, "{leaks:?}");
}

#[test]
fn a_wireguard_endpoint_given_as_ipv6_connects_and_the_kill_switch_holds() {
    let lab = Lab::new();
    let key = Key::generate();
    let mut server = FakeWireguard::start(
        lab.provider(),
        format!("[{PROVIDER6}]:51820").parse().unwrap(),
        key.public(),
    );
    let counters = lab.count_leaks(&[server.endpoint], "udp");
    let agent = Agent::start(
        &lab,
        &format!("credentials: creds\n{HEALTH}"),
        &[("wg0.conf", &server.client_conf(&key))],
    );
    let ready = agent.wait_ready(true, Duration::from_secs(20));
    assert!(ready.contains("exit 198.51.100.2"), "{ready}");
    let t = Duration::from_secs(2);
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    assert!(
        lab.ask("tcp", INTERNET6, Duration::from_millis(500))
            .is_err(),
        "IPv6 to anything but the endpoint stays blocked"
    );

    server.stop();
    agent.wait_ready(false, Duration::from_secs(15));
    assert_eq!(try_everything(&lab), 0);
    server.resume();
    agent.wait_ready(true, Duration::from_secs(40));
    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(PROVIDER_EXIT));
    let leaks = counters.read();
    assert_eq!(leaks.leaked(), 0, "{leaks:?}");
    assert!(leaks.tunnel > 10, "{leaks:?}");
}

#[test]
fn openvpn_username_and_password_are_used_and_a_wrong_password_is_reported() {
    let lab = Lab::new();
    let server = FakeOpenVpn::start_with_password(
        lab.provider(),
        format!("{PROVIDER}:1194").parse().unwrap(),
        "alice",
        "s3cret",
    );
    let counters = lab.count_leaks(&[server.endpoint], "udp");
    let agent = Agent::start(
        &lab,
        &format!("credentials: creds\ndns: {RESOLVER}\n{HEALTH}"),
        &[
            ("config.ovpn", server.client_ovpn()),
            ("username", "alice"),
            ("password", "wrong"),
        ],
    );
    // The answer that told the failure.
    let readyz = agent.wait_readyz("AUTH_FAILED", Duration::from_secs(30));
    assert_eq!(try_everything(&lab), 0);
    assert!(
        !agent.log().contains("wrong"),
        "the password is never logged"
    );
    // /readyz answers anyone who can reach the pod: it gives the reason in cloak's words, not
    // openvpn's own output (addresses, certificate names, pushed options).
    assert!(
        readyz.contains("the server refused the username or password (AUTH_FAILED)"),
        "{readyz}"
    );
    for raw in ["SIGTERM", "[AF_INET]", "process exiting", " | "] {
        assert!(
            !readyz.contains(raw),
            "openvpn's own output in /readyz: {readyz}"
        );
    }

    write_atomically(&agent.creds().join("password"), "s3cret");
    agent.wait_ready(true, Duration::from_secs(30));
    assert_eq!(
        lab.ask("tcp", INTERNET, Duration::from_secs(2)).as_deref(),
        Ok(PROVIDER_EXIT)
    );
    assert_eq!(counters.read().leaked(), 0, "{:?}", counters.read());
}

#[test]
fn gluetun_variables_for_a_custom_wireguard_endpoint_connect() {
    let (lab, server, key) = wg_lab();
    let private = key.to_base64();
    let public = server.public_key().to_string();
    let agent = Agent::start(
        &lab,
        &format!("credentials: creds\ndns: {RESOLVER}\n{HEALTH}"),
        &[
            ("VPN_SERVICE_PROVIDER", "custom"),
            ("VPN_TYPE", "wireguard"),
            ("VPN_ENDPOINT_IP", PROVIDER),
            ("VPN_ENDPOINT_PORT", "51820"),
            ("WIREGUARD_PRIVATE_KEY", &private),
            ("WIREGUARD_PUBLIC_KEY", &public),
            ("WIREGUARD_ADDRESSES", "10.64.0.2/32"),
        ],
    );
    agent.wait_ready(true, Duration::from_secs(20));
    assert_eq!(
        lab.ask("tcp", INTERNET, Duration::from_secs(2)).as_deref(),
        Ok(PROVIDER_EXIT)
    );
}
