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

use cloak_dataplane::gateway::{ClientPlan, ExitLink, ExitPlan, ExitUse, NodePlan};
use cloak_testkit::{
    netlab::gateway::{
        ECHO6, Flows, GatewayNet, exit_ip, exit_public, exit_public6, pings, spread, spread_to,
    },
    netns::inside,
};

const EXITS: u8 = 3;
const TRANSIT: &str = "198.19.0.2";
const CLIENT_ADDRESS: &str = "198.18.0.5";

/// The gateway network with the data path programmed by hand, as the CNI plugin, the node
/// daemon and the exits' agents would.
struct Gateway {
    net: GatewayNet,
    plan: NodePlan,
}

impl Gateway {
    /// Exits whose tunnels carry IPv4 alone.
    fn new() -> Self {
        Self::with_ipv6(&[])
    }

    /// Exits `ipv6` carry IPv6 too.
    fn with_ipv6(ipv6: &[u8]) -> Self {
        Self::with(ipv6, 1400)
    }

    /// Exits `ipv6` carry IPv6 too; the client's link has `mtu`.
    fn with(ipv6: &[u8], mtu: u16) -> Self {
        let net = GatewayNet::new(EXITS);
        for i in 1..=EXITS {
            let plan = ExitPlan {
                vni: 4096 + u32::from(i),
                local: exit_ip(i).parse().unwrap(),
                tunnel: format!("tun{i}"),
                mss: 1360,
                link_mtu: Some(1450),
                healthy: true,
                draining: false,
                ipv6: ipv6.contains(&i),
            };
            inside(&net[&format!("exit{i}")], move || plan.apply()).unwrap();
        }
        let netns = format!("/var/run/netns/{}", net["client"].name());
        inside(&net["node"], move || {
            ClientPlan::create_veth("ckg1", &netns, mtu)
        })
        .unwrap();
        let client = ClientPlan {
            address: CLIENT_ADDRESS.parse().unwrap(),
            intranet: vec!["10.244.0.0/16".parse().unwrap()],
            mtu,
            unprotected: false,
            own_tunnel: None,
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
                    ipv6: ipv6.contains(&i),
                })
                .collect(),
            clients: vec![cloak_dataplane::gateway::ClientPort {
                iface: "ckg1".into(),
                address: CLIENT_ADDRESS.parse().unwrap(),
                gateway: 0,
                mss: 1360,
                pod_ip: None,
            }],
        };
        let mut gateway = Self { net, plan };
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

    fn count_uplink(&self) {
        self.net.count_uplink();
    }

    fn uplink_packets(&self) -> u64 {
        self.net.uplink_packets()
    }
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
fn a_client_link_under_1280_bytes_as_a_deep_chains_is_made_and_carries_ipv4() {
    // A three-hop chain's clients get 1268 bytes: the kernel keeps no IPv6 on such a link, and
    // attaching must not ask it for any.
    let gateway = Gateway::with(&[], 1268);
    gateway.count_uplink();
    let seen = spread(&gateway.net["client"], 12);
    assert_eq!(seen.values().sum::<usize>(), 12, "{seen:?}");
    assert_eq!(gateway.uplink_packets(), 0);
}

#[test]
fn a_flow_stays_on_its_exit_and_a_dead_exits_flows_are_reset_while_the_others_lose_nothing() {
    let mut gateway = Gateway::new();
    gateway.count_uplink();
    let mut flows = Flows::start(&gateway.net["client"]);
    // 24 flows miss one of three exits with a chance under 3 × (2/3)^24, about 1 in 5,000
    // (with 12, about 1 in 40: seen).
    let vias = flows.open(24);
    assert!(
        (1..=EXITS).all(|i| vias.contains(&exit_public(i))),
        "24 flows should reach every exit: {vias:?}"
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
fn client_ipv6_leaves_only_by_the_exits_whose_tunnels_carry_it_and_is_refused_at_once_when_none_does()
 {
    let mut gateway = Gateway::with_ipv6(&[1, 2]);
    gateway.count_uplink();
    // 60 flows over two exits: one of them under 15 with a chance of about 1 in 24,000.
    let seen = spread_to(&gateway.net["client"], ECHO6, 60);
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        [exit_public6(1), exit_public6(2)],
        "IPv6 flows left only by the exits that carry IPv6, and by both: {seen:?}"
    );
    assert!(seen.values().all(|n| *n >= 15), "{seen:?}");
    // 30 flows miss one of three exits with a chance of about 1 in 60,000.
    let seen = spread(&gateway.net["client"], 30);
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        (1..=EXITS).map(exit_public).collect::<Vec<_>>(),
        "IPv4 still goes through every exit: {seen:?}"
    );

    for exit in &mut gateway.plan.exits {
        exit.ipv6 = false;
    }
    gateway.apply();
    let mut flows = Flows::start_to(&gateway.net["client"], ECHO6);
    flows.assert_refused_at_once(5);
    assert_eq!(
        spread(&gateway.net["client"], 10).values().sum::<usize>(),
        10
    );
    assert_eq!(
        gateway.uplink_packets(),
        0,
        "client traffic left by the node's uplink"
    );
}

#[test]
fn a_draining_exit_gets_no_new_flows_and_keeps_its_established_ones() {
    let mut gateway = Gateway::new();
    let mut flows = Flows::start(&gateway.net["client"]);
    // 24 flows: all of them miss exit 2 with a chance of (2/3)^24, under 1 in 10,000 (with 12,
    // about 1 run in 130 failed here).
    let vias = flows.open(24);
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
    flows.assert_refused_at_once(5);
    assert!(
        pings(&gateway.net["client"], &exit_ip(1)),
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
        link_mtu: Some(1450),
        healthy: false,
        draining: false,
        ipv6: false,
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
            node.run(&["ip", "-6", "rule", "show"]),
            node.run(&["ip", "-6", "route", "show", "table", "17299"]),
            node.run(&["ip", "-6", "route", "show", "table", "17300"]),
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

/// An exit's echo watch of its tunnel, started inside exit 1 (whose "tunnel" `tun1` leads to
/// the internet at 198.51.101.1), reporting into a channel.
fn watch_tunnel(
    net: &GatewayNet,
    target: &str,
    give_up: std::time::Duration,
) -> (
    cloak_dataplane::icmp::Liveness,
    std::sync::mpsc::Receiver<bool>,
) {
    use std::time::Duration;
    let (tx, rx) = std::sync::mpsc::channel();
    let config = cloak_dataplane::icmp::LivenessConfig {
        interface: "tun1".into(),
        target: target.parse().unwrap(),
        interval: Duration::from_millis(100),
        window: Duration::from_millis(500),
        give_up,
    };
    let watch = inside(&net["exit1"], move || {
        cloak_dataplane::icmp::Liveness::start(config, move |silent| {
            let _ = tx.send(silent);
        })
    });
    (watch, rx)
}

/// The internet drops (or, `false`, again takes) what exit 1's tunnel sends: a silent blackhole.
fn blackhole_exit1(net: &GatewayNet, on: bool) {
    let internet = &net["internet"];
    if on {
        internet.run(&["nft", "add", "table", "inet", "blackhole"]);
        internet.run(&[
            "nft",
            "add chain inet blackhole in { type filter hook input priority -10; policy accept; }",
        ]);
        internet.run(&[
            "nft",
            "add",
            "rule",
            "inet",
            "blackhole",
            "in",
            "iifname",
            "x1",
            "drop",
        ]);
    } else {
        internet.run(&["nft", "delete", "table", "inet", "blackhole"]);
    }
}

#[test]
fn an_exits_echo_watch_turns_silent_while_its_tunnel_is_blackholed_and_back_once_it_answers() {
    use std::time::Duration;
    let net = GatewayNet::new(1);
    let (_watch, verdicts) = watch_tunnel(&net, "198.51.101.1", Duration::from_mins(1));
    assert!(
        verdicts.recv_timeout(Duration::from_secs(2)).is_err(),
        "a tunnel whose echoes are answered is not silent"
    );
    blackhole_exit1(&net, true);
    assert_eq!(
        verdicts.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "echoes unanswered past the window: silent"
    );
    blackhole_exit1(&net, false);
    assert_eq!(verdicts.recv_timeout(Duration::from_secs(10)), Ok(false));
}

#[test]
fn a_target_that_never_answered_is_never_judged_and_one_silent_past_the_give_up_is_trusted_no_more()
{
    use std::time::Duration;
    let net = GatewayNet::new(1);
    // Nobody has this address: the echoes are never answered, and nothing is judged.
    let (never, verdicts) = watch_tunnel(&net, "198.51.101.99", Duration::from_mins(1));
    assert!(verdicts.recv_timeout(Duration::from_secs(2)).is_err());
    drop(never);

    let (_watch, verdicts) = watch_tunnel(&net, "198.51.101.1", Duration::from_secs(2));
    assert!(verdicts.recv_timeout(Duration::from_secs(1)).is_err());
    blackhole_exit1(&net, true);
    assert_eq!(verdicts.recv_timeout(Duration::from_secs(10)), Ok(true));
    assert_eq!(
        verdicts.recv_timeout(Duration::from_secs(10)),
        Ok(false),
        "given up on: the agent's probe alone judges"
    );
    blackhole_exit1(&net, false);
}

/// Packets nftables counter rule `chain` of table `inet <table>` counted in `ns`.
fn counted(ns: &cloak_testkit::netns::Netns, table: &str, chain: &str) -> u64 {
    ns.run(&["nft", "list", "chain", "inet", table, chain])
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Counts, in `ns`, UDP port 53 packets to `address` where `hook` sees them, after cloak's own
/// chains (priority 300): after a redirect, and only if cloak's input chain let them in.
fn count_dns_to(ns: &cloak_testkit::netns::Netns, address: &str, hook: &str) {
    ns.run(&[
        "nft",
        &format!(
            "add table inet dnsseen\nadd chain inet dnsseen seen {{ type filter hook {hook} priority 300; }}\nadd rule inet dnsseen seen ip daddr {address} udp dport 53 counter"
        ),
    ]);
}

/// Sends one DNS query for example.com from the client to `resolver`.
fn query_from_client(gateway: &Gateway, resolver: &str) {
    let sent = gateway.net["client"]
        .command("python3")
        .args([
            "-c",
            &format!(
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                 s.sendto(bytes.fromhex('123401000001000000000000076578616d706c6503636f6d0000010001'), ('{resolver}', 53))"
            ),
        ])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
}

/// Waits (bounded) until `count()` reaches `want`, and returns what it is then.
fn settle(want: u64, count: impl Fn() -> u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while count() < want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    count()
}

#[test]
fn a_clients_dns_query_to_any_resolver_goes_to_an_exit_and_never_out_by_the_intranet_or_the_uplink()
{
    let gateway = Gateway::new();
    gateway.count_uplink();
    // Each exit counts the queries that reach its forwarder's address.
    for i in 1..=EXITS {
        count_dns_to(
            &gateway.net[&format!("exit{i}")],
            "198.19.0.1",
            "prerouting",
        );
    }
    let seen = || -> u64 {
        (1..=EXITS)
            .map(|i| counted(&gateway.net[&format!("exit{i}")], "dnsseen", "seen"))
            .sum()
    };
    // A resolver in the intranet (as the cluster DNS is) and one on the internet: the same.
    for resolver in ["10.244.0.53", "203.0.113.53"] {
        query_from_client(&gateway, resolver);
    }
    assert_eq!(
        settle(2, seen),
        2,
        "both queries reach an exit's forwarder address"
    );
    assert_eq!(
        gateway.uplink_packets(),
        0,
        "packets left by the node's uplink"
    );
}

#[test]
fn with_every_exit_dead_a_clients_dns_is_redirected_to_its_node_and_reaches_no_exit() {
    let mut gateway = Gateway::new();
    gateway.count_uplink();
    for i in 1..=EXITS {
        gateway.set(i, ExitUse::Dead);
        count_dns_to(
            &gateway.net[&format!("exit{i}")],
            "198.19.0.1",
            "prerouting",
        );
    }
    // Where the node's forwarder listens, after the node's redirect.
    count_dns_to(&gateway.net["node"], "198.18.0.1", "input");
    query_from_client(&gateway, "10.244.0.53");
    let node = || counted(&gateway.net["node"], "dnsseen", "seen");
    assert_eq!(settle(1, node), 1, "the query reaches the node's forwarder");
    let exits: u64 = (1..=EXITS)
        .map(|i| counted(&gateway.net[&format!("exit{i}")], "dnsseen", "seen"))
        .sum();
    assert_eq!(exits, 0);
    assert_eq!(gateway.uplink_packets(), 0);
}

/// One connection from the internet to exit `exit`'s public address, port 7070, which the exit
/// DNATs to `10.244.1.5:7070` (the client pod's own address) and routes over its link to the
/// node, as an inbound port whose backends are clients does: the client's answer, or the error.
fn connect_over_link(gateway: &Gateway, exit: u8) -> Result<String, String> {
    let ns = &gateway.net[&format!("exit{exit}")];
    ns.run(&[
        "ip",
        "route",
        "replace",
        "10.244.1.5/32",
        "via",
        TRANSIT,
        "dev",
        "ckx0",
        "onlink",
    ]);
    let script = format!(
        "table ip inbound_test\ndelete table ip inbound_test\ntable ip inbound_test {{\n\
         chain pre {{ type nat hook prerouting priority dstnat; iifname \"tun{exit}\" tcp dport 7070 dnat to 10.244.1.5:7070; }}\n}}\n"
    );
    cloak_testkit::netlab::nft(ns, &script);
    let out = gateway.net["internet"]
        .command("python3")
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.create_connection(('{}',7070),timeout=2)\nprint(s.recv(100).decode())",
                exit_public(exit)
            ),
        ])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// An inbound port's path: an exit's link opens a connection to its own gateway's client by
/// the client's pod address, and the answer comes back through that exit; to a pod that is no
/// client, or a client of another gateway, the node lets nothing through.
#[test]
fn an_exits_link_reaches_its_own_gateways_client_by_its_pod_address_and_no_other_pod() {
    let mut gateway = Gateway::new();
    // The client pod answers on its own address, as a backend does.
    let mut server = gateway.net["client"]
        .command("python3")
        .args([
            "-c",
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7070))\ns.listen(8)\ns.settimeout(30)\nwhile True:\n  c,a=s.accept(); c.sendall(('from '+a[0]).encode()); c.close()\n",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The exits learn where the node is from what it sends them (in a cluster, its health
    // probes every 100 ms): client flows over every exit here.
    let seen = spread(&gateway.net["client"], 30);
    assert_eq!(seen.len(), usize::from(EXITS), "{seen:?}");

    // No pod address known: no path in.
    assert!(connect_over_link(&gateway, 1).is_err());

    // Its own gateway's client: reached through either exit with the remote's own address,
    // the answer back through the exit it came by (another would not un-NAT it).
    gateway.plan.clients[0].pod_ip = Some("10.244.1.5".parse().unwrap());
    gateway.apply();
    for exit in [1, 2] {
        let answer = connect_over_link(&gateway, exit);
        let answer = answer.unwrap_or_else(|e| panic!("through exit {exit}: {e}"));
        assert!(
            answer.starts_with("from 198.51."),
            "through exit {exit}: {answer}"
        );
    }

    // A client of another gateway: its exits' links are not this gateway's.
    gateway.plan.clients[0].gateway = 1;
    gateway.apply();
    assert!(connect_over_link(&gateway, 1).is_err());

    let _ = server.kill();
    let _ = server.wait();
}
