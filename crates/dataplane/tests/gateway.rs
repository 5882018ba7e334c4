//! The gateway's data path (`cloak_dataplane::gateway`) against a real kernel, as root: a client
//! namespace attached to a node as the CNI plugin attaches it, the node's VXLAN links to three
//! exit namespaces, real TCP through them to an echo service, and leak counters on the node's
//! own uplink. The exits' "tunnels" are veths to the internet namespace: what is under test is
//! the path client → node → exit, not a VPN (the agent's tests cover tunnels).
//!
//! ```text
//!  client ─eth0 (primary, 10.244.1.5)─ node ─eth0 10.244.0.10─ br0 (pod) ─ exitN eth0 10.244.0.2N
//!        └─ckg0 198.18.0.5 ── ckg1 ──┘  └─wan─ internet (uplink; counted)   exitN ─tunN─ internet
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    process::{Child, Stdio},
};

use cloak_dataplane::gateway::{ClientPlan, ExitLink, ExitPlan, ExitUse, NodePlan};
use cloak_testkit::{
    netlab::{self, Topology},
    netns::{Netns, inside},
};

const EXITS: u8 = 3;
const ECHO: &str = "203.0.113.10";
const TRANSIT: &str = "198.19.0.2";
const CLIENT_ADDRESS: &str = "198.18.0.5";

fn exit_ip(i: u8) -> String {
    format!("10.244.0.{}", 20 + i)
}

/// What the internet sees exit `i`'s traffic come from.
fn exit_public(i: u8) -> String {
    format!("198.51.{}.2", 100 + i)
}

struct Gateway {
    net: Topology,
    plan: NodePlan,
    _echo: Child,
}

impl Gateway {
    fn new() -> Self {
        let mut net = Topology::new()
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
        let mut ports = vec!["n0".to_owned()];
        for i in 1..=EXITS {
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
                        &[&format!("{}/24", exit_public(i))],
                    ),
                    (
                        "internet",
                        &format!("x{i}"),
                        &[&format!("198.51.{}.1/24", 100 + i)],
                    ),
                )
                .route(&exit, &format!("default via 198.51.{}.1", 100 + i))
                .route(&exit, "10.244.1.0/24 via 10.244.0.10");
            ports.push(format!("e{i}"));
        }
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        net = net.bridge("pod", "br0", &ports);
        let echo = netlab::echo(&net["internet"], &[]);

        for i in 1..=EXITS {
            let plan = ExitPlan {
                vni: 4096 + u32::from(i),
                local: exit_ip(i).parse().unwrap(),
                tunnel: format!("tun{i}"),
                mss: 1360,
                healthy: true,
            };
            inside(&net[&format!("exit{i}")], move || plan.apply()).unwrap();
        }
        let netns = format!("/var/run/netns/{}", net["client"].name());
        inside(&net["node"], move || {
            ClientPlan::create_veth("ckg1", &netns, 1400)
        })
        .unwrap();
        let client = ClientPlan {
            address: CLIENT_ADDRESS.parse().unwrap(),
            intranet: vec!["10.244.0.0/16".parse().unwrap()],
            mtu: 1400,
            unprotected: false,
        };
        inside(&net["client"], move || client.apply()).unwrap();

        let plan = NodePlan {
            transit: TRANSIT.parse().unwrap(),
            exits: (1..=EXITS)
                .map(|i| ExitLink {
                    slot: i - 1,
                    vni: 4096 + u32::from(i),
                    remote: exit_ip(i).parse().unwrap(),
                    gateway: 0,
                    state: ExitUse::Healthy,
                })
                .collect(),
            clients: vec![cloak_dataplane::gateway::ClientPort {
                iface: "ckg1".into(),
                address: CLIENT_ADDRESS.parse().unwrap(),
                gateway: 0,
            }],
            mss: 1360,
        };
        let mut gateway = Self {
            net,
            plan,
            _echo: echo,
        };
        gateway.apply();
        gateway
    }

    fn apply(&mut self) {
        let plan = self.plan.clone();
        inside(&self.net["node"], move || {
            plan.apply()?;
            plan.reset_dead_flows()
        })
        .unwrap();
    }

    fn set(&mut self, exit: u8, state: ExitUse) {
        self.plan.exits[usize::from(exit - 1)].state = state;
        self.apply();
    }

    /// Counts, on the internet's side of the node's own uplink, every packet that arrives
    /// there (client traffic that left outside an exit), except the IPv6 neighbour discovery
    /// and listener reports a new interface sends by itself.
    fn count_uplink(&self) {
        netlab::nft(
            &self.net["internet"],
            "table inet leaks {\n\tchain pre {\n\t\ttype filter hook prerouting priority -300; policy accept;\n\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report } return\n\t\tiifname \"uplink\" log prefix \"uplink \" counter\n\t}\n}\n",
        );
    }

    fn uplink_packets(&self) -> u64 {
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

struct Flows {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Flows {
    fn start(ns: &Netns) -> Self {
        let mut child = ns
            .command("python3")
            .args(["-c", FLOWS, ECHO])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    fn say(&mut self, line: &str) -> String {
        writeln!(self.child.stdin.as_mut().unwrap(), "{line}").unwrap();
        let mut answer = String::new();
        self.out.read_line(&mut answer).unwrap();
        answer.trim().to_owned()
    }

    fn open(&mut self, n: usize) -> Vec<String> {
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
fn spread(ns: &Netns, n: usize) -> BTreeMap<String, usize> {
    let mut flows = Flows::start(ns);
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

#[test]
fn a_hundred_new_flows_spread_over_three_exits_with_none_below_a_fifth_and_none_leaves_outside_them()
 {
    let gateway = Gateway::new();
    gateway.count_uplink();
    let seen = spread(&gateway.net["client"], 100);
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        (1..=EXITS).map(exit_public).collect::<Vec<_>>(),
        "{seen:?}"
    );
    assert!(seen.values().all(|n| *n >= 20), "{seen:?}");
    assert_eq!(
        gateway.uplink_packets(),
        0,
        "client traffic left by the node's uplink"
    );
}

#[test]
fn a_flow_stays_on_its_exit_and_a_dead_exits_flows_are_reset_while_the_others_lose_nothing() {
    let mut gateway = Gateway::new();
    gateway.count_uplink();
    let mut flows = Flows::start(&gateway.net["client"]);
    let vias = flows.open(12);
    assert!(
        (1..=EXITS).all(|i| vias.contains(&exit_public(i))),
        "12 flows should reach every exit: {vias:?}"
    );
    for _ in 0..3 {
        let pokes = flows.say("poke");
        assert!(pokes.split(',').all(|p| p.starts_with("ok")), "{pokes}");
    }

    gateway.set(1, ExitUse::Dead);
    let pokes = flows.say("poke");
    for (via, poke) in vias.iter().zip(pokes.split(',')) {
        if *via == exit_public(1) {
            let ms: u64 = poke
                .strip_prefix("reset ")
                .unwrap_or_else(|| panic!("a flow on the dead exit got {poke:?}, not a reset"))
                .parse()
                .unwrap();
            assert!(ms < 1000, "the reset took {ms} ms");
        } else {
            assert!(poke.starts_with("ok"), "a flow on {via} got {poke:?}");
        }
    }
    let seen = spread(&gateway.net["client"], 30);
    assert!(!seen.contains_key(&exit_public(1)), "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 30, "{seen:?}");
    // The client goes away with its flows open: the closes of every flow, and the server's
    // late answers on flows the node has forgotten, must leave by an exit or not at all.
    drop(flows);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        gateway.uplink_packets(),
        0,
        "packets left by the node's uplink"
    );
}

#[test]
fn a_draining_exit_gets_no_new_flows_and_keeps_its_established_ones() {
    let mut gateway = Gateway::new();
    let mut flows = Flows::start(&gateway.net["client"]);
    let vias = flows.open(12);
    assert!(vias.contains(&exit_public(2)), "{vias:?}");
    gateway.set(2, ExitUse::Draining);
    let pokes = flows.say("poke");
    assert!(
        pokes.split(',').all(|p| p.starts_with("ok")),
        "{vias:?}: {pokes}"
    );
    let seen = spread(&gateway.net["client"], 30);
    assert!(!seen.contains_key(&exit_public(2)), "{seen:?}");
}

#[test]
fn with_every_exit_dead_client_connections_are_refused_at_once_and_the_intranet_still_works() {
    let mut gateway = Gateway::new();
    gateway.count_uplink();
    for i in 1..=EXITS {
        gateway.set(i, ExitUse::Dead);
    }
    let mut flows = Flows::start(&gateway.net["client"]);
    for _ in 0..5 {
        let answer = flows.say("connect");
        let ms: u64 = answer
            .strip_prefix("error ConnectionRefusedError ")
            .unwrap_or_else(|| panic!("expected a refusal, got {answer:?}"))
            .parse()
            .unwrap();
        assert!(ms < 500, "refused after {ms} ms");
    }
    let intranet = gateway.net["client"]
        .command("ping")
        .args(["-c", "1", "-W", "2", &exit_ip(1)])
        .output()
        .unwrap();
    assert!(
        intranet.status.success(),
        "an intranet address stopped answering"
    );
    assert_eq!(
        gateway.uplink_packets(),
        0,
        "client traffic left by the node's uplink"
    );

    gateway.set(3, ExitUse::Healthy);
    let seen = spread(&gateway.net["client"], 5);
    assert_eq!(seen.get(&exit_public(3)), Some(&5), "{seen:?}");
}

#[test]
fn an_exit_answers_the_nodes_health_probe_only_while_its_tunnel_is_up() {
    let gateway = Gateway::new();
    let probe = || {
        gateway.net["node"]
            .command("ping")
            // As the node daemon probes: with exit 1's mark (slot 0), which routes into its link.
            .args([
                "-c",
                "1",
                "-W",
                "1",
                "-m",
                &cloak_dataplane::gateway::mark(0).to_string(),
                "198.19.0.1",
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(probe(), "a healthy exit must answer");
    let down = ExitPlan {
        vni: 4097,
        local: exit_ip(1).parse().unwrap(),
        tunnel: "tun1".into(),
        mss: 1360,
        healthy: false,
    };
    inside(&gateway.net["exit1"], move || down.apply()).unwrap();
    assert!(!probe(), "an exit whose tunnel is down must not answer");
}

#[test]
fn a_node_plan_applied_twice_changes_nothing_and_reset_leaves_none_of_it() {
    let gateway = Gateway::new();
    let node = &gateway.net["node"];
    let state = || {
        [
            node.run(&["ip", "-o", "link", "show"]),
            node.run(&["ip", "rule", "show"]),
            // IPv4 only: IPv6 link-local routes appear by themselves, after DAD.
            node.run(&["ip", "-4", "route", "show", "table", "all"]),
            node.run(&["nft", "list", "ruleset"]),
        ]
        .join("\n")
    };
    let before = state();
    let plan = gateway.plan.clone();
    inside(node, move || plan.apply()).unwrap();
    assert_eq!(before, state());

    inside(node, NodePlan::reset).unwrap();
    let after = state();
    for owned in [
        "ckx",
        "cloak_gateway",
        "lookup 17299",
        "lookup 17300",
        "table 17301",
    ] {
        assert!(
            !after.contains(owned),
            "{owned} is left after reset:\n{after}"
        );
    }
    assert!(
        after.contains("lab_nat"),
        "reset removed what it does not own"
    );
}
