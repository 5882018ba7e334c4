//! VpnChain in the same lab: the example chain `onion` of `examples/lab/60-chain.yaml`, three
//! hops over three fake providers (WireGuard, WireGuard, OpenVPN), each hop a real exit pod whose
//! tunnel runs through the hop before it, and plain client pods labelled `cloak.dev/chain: onion`.

use std::time::{Duration, Instant};

use cloak_lab::{DEMO_NAMESPACE, layout};
use serde_json::Value;

use super::lab::{self, eventually, gateway::*, str_at};

const CHAIN: &str = "onion";

/// The example chain once every hop carries traffic and the last one's address is known.
pub(crate) fn healthy_chain(lab: &lab::TestLab) -> Value {
    healthy_example_chain(lab)
}

/// The fake providers in the example's order of hops.
fn providers() -> [&'static layout::Provider; 3] {
    let by_name = |name: &str| layout::PROVIDERS.iter().find(|p| p.name == name).unwrap();
    [
        by_name("wg-alpha"),
        by_name("wg-beta"),
        by_name("ovpn-gamma"),
    ]
}

/// A plain pod labelled as the chain's client, once it runs.
fn running_chain_client(lab: &lab::TestLab, name: &str) -> Value {
    lab.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {DEMO_NAMESPACE}\n  labels: {{cloak.dev/chain: {CHAIN}, app: chain-test}}\nspec:\n  terminationGracePeriodSeconds: 0\n  containers:\n    - name: c\n      image: cloak.dev/lab/client:dev\n      imagePullPolicy: Never\n      command: [sleep, \"100000\"]\n"
    ));
    until_running(lab, name)
}

/// The server number `k` of a hop's `server` status (`server-4` → 4).
fn server_number(hop: &Value) -> u8 {
    str_at(hop, "/server")
        .trim_start_matches("server-")
        .parse()
        .unwrap()
}

/// Forgets what provider `p`'s namespace tracked of the tunnel flows to its server `k`: a
/// provider's verification pod connected to it straight from a node before the hop did.
fn forget_seen(lab: &lab::TestLab, p: &layout::Provider, k: u8) {
    let port = p.port(k).to_string();
    for direction in [["--dport", "-d"], ["--sport", "-s"]] {
        let _ = lab.exec_in(
            &format!("p{}", p.index),
            &[
                "conntrack",
                "-D",
                "-p",
                "udp",
                direction[0],
                &port,
                direction[1],
                &p.server(k),
            ],
        );
    }
}

/// The addresses provider `p`'s namespace saw its server `k`'s tunnel flows with: the flow's
/// far end, whichever side sent first (after [`forget_seen`], the server's own keepalive may).
fn seen_by(lab: &lab::TestLab, p: &layout::Provider, k: u8) -> Vec<String> {
    let (server, port) = (p.server(k), p.port(k).to_string());
    let table = lab
        .exec_in(&format!("p{}", p.index), &["conntrack", "-L", "-p", "udp"])
        .unwrap_or_default();
    let mut seen: Vec<String> = table
        .lines()
        .filter_map(|l| {
            // The original direction's tuple: its first src=, dst=, sport=, dport=.
            let field = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_owned)
            };
            let (src, dst) = (field("src=")?, field("dst=")?);
            let (sport, dport) = (field("sport=")?, field("dport=")?);
            if dst == server && dport == port {
                Some(src)
            } else if src == server && sport == port {
                Some(dst)
            } else {
                None
            }
        })
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

/// The pod of hop `k`'s exit (the one exit of its gateway).
fn hop_pod(lab: &lab::TestLab, k: usize) -> Value {
    exit_pod_named(lab, &format!("{CHAIN}-hop-{k}-exit-0"))
}

/// IPv4 fragments made in the network namespace at `netns` since it was made.
fn fragments_made(netns: &str) -> u64 {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "FragCreates")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

#[test]
fn a_three_hop_chain_shows_each_provider_only_the_hop_before_it_and_the_internet_only_the_last() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let chain = healthy_chain(lab);
    let providers = providers();
    let hops = chain["status"]["hops"].as_array().unwrap().clone();
    assert_eq!(hops.len(), 3, "{chain}");
    for (hop, p) in hops.iter().zip(providers) {
        assert_eq!(str_at(hop, "/publicAddress"), p.exit(), "{hop}");
    }
    assert_eq!(str_at(&chain, "/status/gateway"), "onion-hop-3");
    let name = "chain-seen";
    let pod = running_chain_client(lab, name);
    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    for (hop, p) in hops.iter().zip(providers) {
        forget_seen(lab, p, server_number(hop));
    }
    let answers = ask(lab, name, 10);
    assert!(
        answers.iter().all(|a| *a == providers[2].exit()),
        "the internet must see the last hop's exit alone: {answers:?}"
    );
    // Each provider saw the hop before it: the first the cluster's own address, the others the
    // exit address of the provider before.
    let seen: Vec<Vec<String>> = hops
        .iter()
        .zip(providers)
        .map(|(hop, p)| seen_by(lab, p, server_number(hop)))
        .collect();
    assert!(
        seen[0].len() == 1 && !seen[0][0].starts_with("198.51.100."),
        "hop 1's provider must see the cluster, not a provider: {seen:?}"
    );
    assert_eq!(seen[1], [providers[0].exit()], "{seen:?}");
    assert_eq!(seen[2], [providers[1].exit()], "{seen:?}");
    assert_reaches_the_cluster(lab, name);
    leaks.assert_carried_and_none_leaked();
    delete_client(lab, name);
}

#[test]
fn a_chain_client_pings_at_the_mtu_computed_through_every_hop_with_dont_fragment_and_no_hop_fragments()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    let chain = healthy_chain(lab);
    // WireGuard over the 1500-byte pod network: 1420. WireGuard through it: 1420 - 80. OpenVPN
    // through that: 1340 - 72.
    let mtu = chain["status"]["mtu"].as_u64().unwrap();
    assert_eq!(mtu, 1268, "{chain}");
    let client = running_chain_client(lab, "chain-mtu");
    let netns = pod_netns(&str_at(&client, "/metadata/uid"));
    let hop_netns: Vec<String> = (1..=3)
        .map(|k| pod_netns(&str_at(&hop_pod(lab, k), "/metadata/uid")))
        .collect();
    let before: Vec<u64> = hop_netns.iter().map(|n| fragments_made(n)).collect();
    assert_pings_at_mtu(&netns, mtu);
    // A full-size TCP exchange too (the clamped MSS), then no hop has fragmented anything.
    assert_eq!(ask(lab, "chain-mtu", 3).len(), 3);
    let after: Vec<u64> = hop_netns.iter().map(|n| fragments_made(n)).collect();
    assert_eq!(before, after, "a hop fragmented packets");
    delete_client(lab, "chain-mtu");
}

#[test]
fn a_dead_first_hop_server_moves_hop_one_alone_and_the_inner_hops_keep_their_pods() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let chain = healthy_chain(lab);
    let providers = providers();
    let first = chain["status"]["hops"][0].clone();
    let old_server = str_at(&first, "/server");
    let switches = first["switches"].as_u64().unwrap_or(0);
    let inner: Vec<String> = (2..=3)
        .map(|k| str_at(&hop_pod(lab, k), "/metadata/uid"))
        .collect();
    let name = "chain-repair";
    running_chain_client(lab, name);
    let started = Instant::now();
    let outage = lab::Outage::start(lab, &[providers[0].server(server_number(&first))]);
    let moved = eventually(
        "hop 1 moves to its pool's next server and the chain recovers",
        Duration::from_mins(4),
        || {
            let chain = lab.json(&["-n", DEMO_NAMESPACE, "get", "vpnchain", CHAIN]);
            let hop = &chain["status"]["hops"][0];
            if str_at(hop, "/server") != old_server && chain["status"]["healthyHops"] == 3 {
                Ok(chain)
            } else {
                Err(chain["status"].to_string())
            }
        },
    );
    let took = started.elapsed();
    drop(outage);
    eprintln!("hop 1 moved and the chain recovered in {took:?}");
    let hops = moved["status"]["hops"].as_array().unwrap();
    assert_eq!(
        hops[0]["switches"].as_u64().unwrap(),
        switches + 1,
        "{moved}"
    );
    for (k, uid) in (2..=3).zip(&inner) {
        assert_eq!(
            &str_at(&hop_pod(lab, k), "/metadata/uid"),
            uid,
            "hop {k} was restarted for hop 1's failure"
        );
        assert_eq!(hops[k - 1]["switches"].as_u64().unwrap_or(0), 0, "{moved}");
    }
    let answers = eventually(
        "the client is carried again",
        Duration::from_mins(1),
        || {
            let answers = ask(lab, name, 3);
            if answers.iter().all(|a| *a == providers[2].exit()) {
                Ok(answers)
            } else {
                Err(format!("{answers:?}"))
            }
        },
    );
    assert_eq!(answers.len(), 3);
    let events = lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={CHAIN},reason=HopSwitched"),
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(
        events.contains(&format!(
            "hop 1 (chain-alpha) switched from server {old_server} to "
        )),
        "{events}"
    );
    delete_client(lab, name);
}

/// `spec.hops` of the example chain set to its first `count` hops (of the three).
fn set_hops(lab: &lab::TestLab, count: usize) {
    let hops: Vec<Value> = (1..=count)
        .map(|k| serde_json::json!({"providers": [format!("chain-{k}")]}))
        .collect();
    lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "patch",
        "vpnchain",
        CHAIN,
        "--type",
        "merge",
        "-p",
        &serde_json::json!({"spec": {"hops": hops}}).to_string(),
    ]);
}

#[test]
fn a_chain_that_loses_its_last_hop_and_gets_it_back_keeps_its_other_hops_and_its_running_client() {
    let lab = lab::shared();
    let _turn = lab::serial();
    healthy_chain(lab);
    let providers = providers();
    let inner: Vec<String> = (1..=2)
        .map(|k| str_at(&hop_pod(lab, k), "/metadata/uid"))
        .collect();
    let name = "chain-spec";
    running_chain_client(lab, name);
    assert!(ask(lab, name, 3).iter().all(|a| *a == providers[2].exit()));

    set_hops(lab, 2);
    // The last hop goes with its slot; the running client now leaves by hop 2.
    eventually("the chain has two hops", Duration::from_mins(2), || {
        let chain = lab.json(&["-n", DEMO_NAMESPACE, "get", "vpnchain", CHAIN]);
        let masks = lab.json(&["-n", DEMO_NAMESPACE, "get", "vpnmasks"]);
        let hop3_mask = masks["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| str_at(m, "/metadata/name").starts_with("onion-hop-3"));
        if chain["status"]["hops"].as_array().map(Vec::len) == Some(2)
            && chain["status"]["healthyHops"] == 2
            && str_at(&chain, "/status/gateway") == "onion-hop-2"
            && !hop3_mask
        {
            Ok(())
        } else {
            Err(format!("{} hop 3's mask: {hop3_mask}", chain["status"]))
        }
    });
    eventually("the client leaves by hop 2", Duration::from_mins(1), || {
        let answers = ask(lab, name, 3);
        if answers.iter().all(|a| *a == providers[1].exit()) {
            Ok(())
        } else {
            Err(format!("{answers:?}"))
        }
    });

    set_hops(lab, 3);
    healthy_chain(lab);
    eventually(
        "the client leaves by hop 3 again",
        Duration::from_mins(1),
        || {
            let answers = ask(lab, name, 3);
            if answers.iter().all(|a| *a == providers[2].exit()) {
                Ok(())
            } else {
                Err(format!("{answers:?}"))
            }
        },
    );
    for (k, uid) in (1..=2).zip(&inner) {
        assert_eq!(
            &str_at(&hop_pod(lab, k), "/metadata/uid"),
            uid,
            "hop {k} was restarted by a change to another hop"
        );
    }
    delete_client(lab, name);
}

#[test]
fn lab_status_shows_each_hop_and_the_example_chain_client_seen_with_the_last_hops_address() {
    let lab = lab::shared();
    let _turn = lab::serial();
    healthy_chain(lab);
    let providers = providers();
    // The example client asks the echo service every 5 s.
    eventually(
        "the echo service sees the example chain client from the last hop",
        Duration::from_mins(1),
        || match lab.lab.echo_seen().get("cloak-demo/chain-client") {
            Some((ip, _)) if *ip == providers[2].exit() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let out = lab::cloak_lab(lab.lab.name(), &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for (k, (p, name)) in providers
        .iter()
        .zip(["chain-alpha", "chain-beta", "chain-gamma"])
        .enumerate()
    {
        let row = format!("cloak-demo/onion:{}", k + 1);
        assert!(
            text.lines().any(|l| l.starts_with(&row)
                && l.contains(name)
                && l.contains(&p.exit())
                && l.contains("Healthy")),
            "{row}: {text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("cloak-demo/chain-client") && l.contains(&providers[2].exit())),
        "{text}"
    );
}
