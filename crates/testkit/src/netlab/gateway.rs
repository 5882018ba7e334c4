//! The network of a gateway test: a client namespace with its primary pod interface, a node
//! with an uplink to the internet (counted: nothing of a client's may pass it), a pod network
//! bridge with `EXITS` exit namespaces whose "tunnels" are veths to the internet, and the echo
//! service there. What runs on the node and in the exits is the test's: the data path's own
//! tests program it by hand, the node component's tests run the daemon.
//!
//! ```text
//!  client ─eth0 (primary, 10.244.1.5)─ node ─eth0 10.244.0.10─ br0 (pod) ─ exitN eth0 10.244.0.2N
//!                                       └─wan─ internet (uplink; counted)   exitN ─tunN─ internet
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)] // a test harness

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    process::{Child, Stdio},
};

use super::Topology;
use crate::netns::Netns;

/// The echo service's address (TCP 7 and 9: it answers with the source address it saw).
pub const ECHO: &str = "203.0.113.10";
/// Its IPv6 address.
pub const ECHO6: &str = "2001:db8:113::10";

/// Exit `i`'s address on the pod network (1-based).
pub fn exit_ip(i: u8) -> String {
    format!("10.244.0.{}", 20 + i)
}

/// What the internet sees exit `i`'s traffic come from.
pub fn exit_public(i: u8) -> String {
    format!("198.51.{}.2", 100 + i)
}

/// What the internet sees exit `i`'s IPv6 traffic come from (every exit's "tunnel" has IPv6;
/// whether an exit sends IPv6 into it is its plan's).
pub fn exit_public6(i: u8) -> String {
    format!("2001:db8:{}::2", 100 + i)
}

impl std::ops::Index<&str> for GatewayNet {
    type Output = Netns;

    fn index(&self, name: &str) -> &Netns {
        &self.net[name]
    }
}

/// Whether `address` answers one ping from `ns` within 2 s (an intranet address reached over
/// the pod's primary network).
pub fn pings(ns: &Netns, address: &str) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "2", address])
        .output()
        .unwrap()
        .status
        .success()
}

/// The namespaces and the echo service.
#[derive(Debug)]
pub struct GatewayNet {
    pub net: Topology,
    _echo: Child,
}

impl GatewayNet {
    /// Client, node, pod network, internet, and `exits` exit namespaces (`exit1`...).
    pub fn new(exits: u8) -> Self {
        Self::with_pods(exits, &[])
    }

    /// [`GatewayNet::new`] and empty namespaces named `pods`, for a CNI to set up.
    pub fn with_pods(exits: u8, pods: &[&str]) -> Self {
        let mut net = Topology::new();
        for pod in pods {
            net = net
                .ns(pod)
                .sysctl(pod, "net.ipv6.conf.default.accept_ra", "0");
        }
        let mut net = net
            .ns("client")
            .ns("node")
            .ns("pod")
            .ns("internet")
            .sysctl("client", "net.ipv6.conf.default.accept_ra", "0")
            .link(
                ("client", "eth0", &["10.244.1.5/24"]),
                ("node", "cni0", &["10.244.1.1/24"]),
            )
            .link(("node", "eth0", &["10.244.0.10/24"]), ("pod", "n0", &[]))
            .link(
                ("node", "wan", &["203.0.113.1/24"]),
                ("internet", "uplink", &["203.0.113.2/24"]),
            )
            .route("client", "default via 10.244.1.1")
            .route("node", "default via 203.0.113.2")
            .forwarding("node")
            // A Kubernetes node masquerades pod traffic that leaves the cluster: a leak through
            // it would really reach the internet.
            .nft(
                "node",
                "table inet lab_nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"wan\" masquerade\n\t}\n}\n",
            );
        net["internet"].run(&["ip", "addr", "add", &format!("{ECHO}/32"), "dev", "lo"]);
        net["internet"].run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ECHO6}/128"),
            "dev",
            "lo",
        ]);
        let mut ports = vec!["n0".to_owned()];
        for i in 1..=exits {
            let exit = format!("exit{i}");
            net = net
                .ns(&exit)
                .link(
                    (&exit, "eth0", &[&format!("{}/24", exit_ip(i))]),
                    ("pod", &format!("e{i}"), &[]),
                )
                .link(
                    (
                        &exit,
                        &format!("tun{i}"),
                        &[
                            &format!("{}/24", exit_public(i)),
                            &format!("{}/64", exit_public6(i)),
                        ],
                    ),
                    (
                        "internet",
                        &format!("x{i}"),
                        &[
                            &format!("198.51.{}.1/24", 100 + i),
                            &format!("2001:db8:{}::1/64", 100 + i),
                        ],
                    ),
                )
                .route(&exit, &format!("default via 198.51.{}.1", 100 + i))
                .route(&exit, &format!("default via 2001:db8:{}::1", 100 + i))
                .route(&exit, "10.244.1.0/24 via 10.244.0.10")
                .route(&exit, "10.244.2.0/24 via 10.244.0.10");
            ports.push(format!("e{i}"));
        }
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        net = net.bridge("pod", "br0", &ports);
        let echo = super::echo(&net["internet"], &[]);
        Self { net, _echo: echo }
    }

    /// Counts, on the internet's side of the node's own uplink, every packet that arrives
    /// there (client traffic that left outside an exit), except the IPv6 neighbour discovery
    /// and listener reports a new interface sends by itself.
    pub fn count_uplink(&self) {
        super::nft(
            &self.net["internet"],
            "table inet leaks {\n\tchain pre {\n\t\ttype filter hook prerouting priority -300; policy accept;\n\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report } return\n\t\tiifname \"uplink\" log prefix \"uplink \" counter\n\t}\n}\n",
        );
    }

    /// Packets counted since [`GatewayNet::count_uplink`].
    pub fn uplink_packets(&self) -> u64 {
        let listing = self.net["internet"].run(&["nft", "list", "chain", "inet", "leaks", "pre"]);
        listing
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// A client process holding long flows to the echo service's port 9: `open N` prints the exit
/// each flow went through, `poke` sends on every flow and prints, per flow, `ok <ms>` or
/// `reset <ms>` or `timeout`; `connect` opens one more and prints its exit or the error.
const FLOWS: &str = r#"
import socket, sys, time
flows = []
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "open":
        for _ in range(int(cmd[1])):
            s = socket.create_connection((sys.argv[1], 9), timeout=2)
            flows.append(s)
            print(s.makefile().readline().strip(), flush=True)
    elif cmd[0] == "poke":
        out = []
        for s in flows:
            start = time.time()
            try:
                s.sendall(b"x"); data = s.recv(1)
                out.append("ok %d" % ((time.time() - start) * 1000) if data else "reset %d" % ((time.time() - start) * 1000))
            except socket.timeout:
                out.append("timeout")
            except OSError:
                out.append("reset %d" % ((time.time() - start) * 1000))
        print(",".join(out), flush=True)
    elif cmd[0] == "connect":
        start = time.time()
        try:
            s = socket.create_connection((sys.argv[1], 7), timeout=2)
            print("via %s %d" % (s.makefile().readline().strip(), (time.time() - start) * 1000), flush=True)
        except OSError as e:
            print("error %s %d" % (type(e).__name__, (time.time() - start) * 1000), flush=True)
"#;

#[derive(Debug)]
pub struct Flows {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Flows {
    pub fn start(ns: &Netns) -> Self {
        Self::start_to(ns, ECHO)
    }

    /// Flows to the echo service at `address` ([`ECHO`] or [`ECHO6`]).
    pub fn start_to(ns: &Netns, address: &str) -> Self {
        let mut child = ns
            .command("python3")
            .args(["-c", FLOWS, address])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    pub fn say(&mut self, line: &str) -> String {
        writeln!(self.child.stdin.as_mut().unwrap(), "{line}").unwrap();
        let mut answer = String::new();
        self.out.read_line(&mut answer).unwrap();
        answer.trim().to_owned()
    }

    /// `n` new connections, each refused (a reset) within 500 ms: not left to time out.
    pub fn assert_refused_at_once(&mut self, n: usize) {
        for _ in 0..n {
            let answer = self.say("connect");
            let ms: u64 = answer
                .strip_prefix("error ConnectionRefusedError ")
                .unwrap_or_else(|| panic!("expected a refusal, got {answer:?}"))
                .parse()
                .unwrap();
            assert!(ms < 500, "refused after {ms} ms");
        }
    }

    pub fn open(&mut self, n: usize) -> Vec<String> {
        writeln!(self.child.stdin.as_mut().unwrap(), "open {n}").unwrap();
        (0..n)
            .map(|_| {
                let mut line = String::new();
                self.out.read_line(&mut line).unwrap();
                line.trim().to_owned()
            })
            .collect()
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `n` short connections and counts the exit each was seen through.
pub fn spread(ns: &Netns, n: usize) -> BTreeMap<String, usize> {
    spread_to(ns, ECHO, n)
}

/// [`spread`] to the echo service at `address`.
pub fn spread_to(ns: &Netns, address: &str, n: usize) -> BTreeMap<String, usize> {
    let mut flows = Flows::start_to(ns, address);
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let answer = flows.say("connect");
        let via = answer
            .strip_prefix("via ")
            .unwrap_or_else(|| panic!("a connection failed: {answer}"));
        *seen
            .entry(via.split_whitespace().next().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    seen
}
