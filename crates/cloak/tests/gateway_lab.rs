//! The VpnGateway end to end in a real `cloak lab` (root): the chart's `cloak node` DaemonSet on
//! two real nodes (kubelet, containerd, the bridge CNI), the example gateway of
//! `examples/lab/50-gateway.yaml` with its two exits (one a node, each a real `cloak agent` pod
//! with a userspace WireGuard tunnel to a fake provider), and plain client pods created by the
//! tests. The echo service on the lab's internet tells which exit a flow left by: each exit's
//! provider has its own exit address.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers

mod labkit;

#[path = "gateway_lab/chain.rs"]
mod chain;
#[path = "gateway_lab/gluetun.rs"]
mod gluetun;
#[path = "gateway_lab/inbound.rs"]
mod inbound;
#[path = "gateway_lab/observability.rs"]
mod observability;

use labkit as lab;

use std::time::Duration;

use cloak_lab::{DEMO_NAMESPACE, layout};
use lab::gateway::*;
use lab::{eventually, str_at};

#[test]
fn a_labelled_pod_keeps_its_spec_and_reaches_the_internet_only_through_the_exits_spread_over_both()
{
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let addresses = exit_addresses(&gw);
    let name = "gw-spread";
    let pod = running_client(lab, name);

    assert_spec_as_written(&pod);

    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    // 40 flows, each exit at least 20 % of them.
    assert_spread(name, &ask(lab, name, 40), &addresses, 8);
    // The cluster stays reachable outside the exits, by its own names.
    assert_reaches_the_cluster(lab, name);
    assert_eq!(leaks.read("leaked6"), 0, "IPv6 left by an uplink");
    leaks.assert_carried_and_none_leaked();
    delete_client(lab, name);
}

#[test]
fn a_clients_ipv6_leaves_only_through_the_exits_whose_tunnels_carry_it_spread_over_both_and_never_by_an_uplink()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    // Both of the example's providers carry IPv6.
    let addresses = exit_addresses6(&gw);
    assert_eq!(addresses.len(), 2, "{addresses:?}");
    let name = "gw-ipv6";
    let pod = running_client(lab, name);
    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    // The node learns that an exit carries IPv6 from its answers to the probes: within a round
    // of the exit coming up, long before a test gets here, unless the node missed it.
    let answers = ask_to(lab, name, ECHO6, 40);
    assert_spread(name, &answers, &addresses, 8);
    // IPv4 goes on over both (both missed by one in 2⁻²⁹ runs).
    assert_spread(name, &ask(lab, name, 30), &exit_addresses(&gw), 1);
    assert!(leaks.read("carried6") > 0, "the IPv6 counter is blind");
    assert_eq!(leaks.read("leaked6"), 0, "IPv6 left by an uplink");
    leaks.assert_carried_and_none_leaked();
    delete_client(lab, name);
}

#[test]
fn a_deleted_exit_pod_moves_new_flows_to_the_other_and_is_replaced_on_the_next_server() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let name = "gw-failover";
    let pod = running_client(lab, name);
    let client_node = str_at(&pod, "/spec/nodeName");
    let (gone, kept) = exit_to_lose(&gw, &client_node);
    let (gone_name, gone_server) = (str_at(&gone, "/name"), str_at(&gone, "/server"));
    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    // Its replacement cannot come up until the survivor's share is checked (it would answer
    // from the same address): the internet drops the provider's other servers. The deleted
    // exit's own server stays reachable, so its tunnel works: only its deletion (its drain)
    // can move new flows off it.
    let provider = layout::PROVIDERS
        .iter()
        .find(|p| exit_address(&gone) == p.exit())
        .unwrap();
    let others: Vec<String> = (2..=provider.servers)
        .filter(|k| format!("server-{k}") != gone_server)
        .map(|k| provider.server(k))
        .collect();
    assert_eq!(
        others.len(),
        gateway_servers(&[provider]).len() - 1,
        "{gone_server}"
    );
    let outage = lab::Outage::start(lab, &others);
    // Events of this deletion only (an earlier test's may name the same exit).
    let since = now_rfc3339();
    lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "delete",
        "pod",
        &gone_name,
        "--wait=false",
    ]);
    let survivor = exit_address(&kept);
    assert_new_flows_settle_on(lab, name, &survivor);
    drop(outage);

    // The operator replaces the exit on its pool's next server, and it rejoins.
    let replaced = eventually(
        "the exit is replaced on the next server and healthy",
        Duration::from_mins(3),
        || {
            let gw = gateway(lab);
            let exit = exit_named(&gw, &gone_name);
            if exit["health"] == "Healthy" && str_at(&exit, "/server") != gone_server {
                Ok(exit)
            } else {
                Err(format!("{exit}"))
            }
        },
    );
    let events = lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=VpnGateway",
        "-o",
        "jsonpath={range .items[*]}{.eventTime}{.lastTimestamp} {.reason} {.message}{\"\\n\"}{end}",
    ]);
    assert!(
        events.lines().any(|l| {
            let mut words = l.split_whitespace();
            let at = words.next().unwrap_or_default();
            at.get(..19).is_some_and(|t| t >= &since[..19])
                && words.next() == Some("ExitDown")
                && l.contains(&gone_name)
        }),
        "no ExitDown for {gone_name} since {since}: {events}"
    );
    let back = exit_address(&replaced);
    let counts = eventually(
        "new flows use the replaced exit again",
        Duration::from_secs(30),
        || {
            let counts = tally(&ask(lab, name, 20));
            if counts.contains_key(&back) && counts.contains_key(&survivor) {
                Ok(counts)
            } else {
                Err(format!("{counts:?}"))
            }
        },
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    leaks.assert_carried_and_none_leaked();
    delete_client(lab, name);
}

#[test]
fn a_silently_blackholed_exit_gets_no_new_flows_on_its_echo_watch_and_rejoins_once_its_provider_answers()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let name = "gw-blackhole";
    let pod = running_client(lab, name);
    let exits = gw["status"]["exits"].as_array().unwrap().clone();
    let (gone, kept) = (&exits[0], &exits[1]);
    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    let provider = layout::PROVIDERS
        .iter()
        .find(|p| exit_address(gone) == p.exit())
        .unwrap();
    // The internet drops everything to and from the provider's servers: the exit's tunnel
    // stays "up" by its own account, its pod stays, and nothing tells the nodes but probes.
    let outage = lab::Outage::start(lab, &gateway_servers(&[provider]));
    let survivor = exit_address(kept);
    assert_new_flows_settle_on(lab, name, &survivor);
    let logs = lab.kubectl(&["-n", DEMO_NAMESPACE, "logs", &str_at(gone, "/name")]);
    assert!(
        logs.contains("no echo reply"),
        "the exit was not taken out by its echo watch:\n{logs}"
    );
    drop(outage);
    let counts = eventually(
        "new flows use both exits again",
        Duration::from_mins(3),
        || {
            let counts = tally(&ask(lab, name, 20));
            if counts.len() == 2 {
                Ok(counts)
            } else {
                Err(format!("{counts:?}"))
            }
        },
    );
    assert!(counts.contains_key(&survivor), "{counts:?}");
    leaks.assert_carried_and_none_leaked();
    delete_client(lab, name);
}

#[test]
fn a_clients_internet_names_resolve_only_through_an_exits_tunnel_and_cluster_names_as_before() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let name = "gw-dns";
    running_client(lab, name);
    // A name nobody has asked before: every query for it the internet's DNS logs is this test's.
    let unknown = format!("{}.{}", lab::unique_name('q'), layout::INTERNET_ZONE);
    let echo = format!("echo.{}", layout::INTERNET_ZONE);
    let script = format!("nslookup {echo} 2>&1; nslookup {unknown} 2>&1; true");
    let out = in_pod(lab, name, &script);
    assert!(
        out.contains(&format!("Address: {ECHO}")),
        "an internet name resolves: {out}"
    );
    assert_reaches_the_cluster(lab, name);

    // The internet's DNS logs each query with its source (CoreDNS's `log`): the client's come
    // from an exit's public address, never from a node (the cluster DNS forwarding them).
    let log = std::fs::read_to_string(lab.lab.dir().join("logs/internet-dns.log")).unwrap();
    let exits = exit_addresses(&gw);
    let asked: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("{unknown}.")) || l.contains(&format!(" {echo}.")))
        .collect();
    assert!(
        asked.iter().any(|l| l.contains(&unknown)),
        "the unknown name never reached the internet's DNS:\n{log}"
    );
    for line in &asked {
        assert!(
            exits.iter().any(|a| line.contains(&format!("] {a}:"))),
            "a query reached the internet's DNS from outside the exits: {line}\n(exits {exits:?})"
        );
    }
    delete_client(lab, name);
}

/// New flows of client `pod` all leave by `survivor`: 40 in a row, within 200 tries (asked 20
/// at a time). Ten in a row came by chance 2-3 % of the time with no failover at all (2⁻¹⁰ a
/// try, over 50 tries); 40 in a row by chance, 2⁻⁴⁰ a try.
fn assert_new_flows_settle_on(lab: &lab::TestLab, pod: &str, survivor: &str) {
    let mut streak = 0;
    let mut seen = Vec::new();
    'asking: for _ in 0..10 {
        for answer in ask(lab, pod, 20) {
            streak = if answer == survivor { streak + 1 } else { 0 };
            seen.push(answer);
            if streak == 40 {
                break 'asking;
            }
        }
    }
    assert_eq!(
        streak, 40,
        "new flows did not settle on {survivor}: {seen:?}"
    );
}

/// `count` slow TCP flows at once from the pod to the echo service, each sending a header line
/// every 3 s for about 18 s before its request ends: what each saw as the source address.
fn slow_flows(lab: &lab::TestLab, pod: &str, count: u32) -> Vec<String> {
    answers(
        lab,
        pod,
        &format!(
            "k=0; while [ $k -lt {count} ]; do (r=$( (printf 'GET /ip HTTP/1.0\\r\\n'; i=0; while [ $i -lt 6 ]; do sleep 3; printf 'X-Slow: %s\\r\\n' $i; i=$((i+1)); done; printf '\\r\\n') | nc -w 30 {ECHO} 80 2>&1 | tail -n 1); echo \"r=$r\") & k=$((k+1)); done; wait"
        ),
    )
}

#[test]
fn a_deleted_exit_drains_keeping_its_established_flows_taking_no_new_ones_and_leaves_once_they_end()
{
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let grace = gw["spec"]["exits"]["drainGrace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        grace, "3m",
        "the example's drain grace, which this test measures against"
    );
    let name = "gw-drain";
    let pod = running_client(lab, name);
    let client_node = str_at(&pod, "/spec/nodeName");
    let (gone, kept) = exit_to_lose(&gw, &client_node);
    let (gone_name, draining, survivor) = (
        str_at(&gone, "/name"),
        exit_address(&gone),
        exit_address(&kept),
    );
    let gone_uid = str_at(
        &lab.json(&["-n", DEMO_NAMESPACE, "get", "pod", &gone_name]),
        "/metadata/uid",
    );
    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    // The client is carried before its flows are counted. (Once, in a full run with the example
    // chain still coming up, a new client's first twelve flows were all refused at once by its
    // node: an open question noted with issue 23, not this test's subject, which is the drain.)
    eventually("the client is carried", Duration::from_secs(30), || {
        let answers = ask(lab, name, 1);
        if answers.iter().all(|a| *a == draining || *a == survivor) {
            Ok(())
        } else {
            Err(format!("{answers:?}"))
        }
    });

    let (answers, flows_ended) = std::thread::scope(|scope| {
        // Twelve flows, each on either exit: all twelve on the survivor is 1 run in 4,096.
        let slow = scope.spawn(|| {
            let answers = slow_flows(lab, name, 12);
            (answers, std::time::Instant::now())
        });
        std::thread::sleep(Duration::from_secs(4));
        lab.kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "delete",
            "pod",
            &gone_name,
            "--wait=false",
        ]);
        // New flows leave by the survivor while the draining exit still carries the old ones.
        assert_new_flows_settle_on(lab, name, &survivor);
        slow.join().unwrap()
    });
    let tally = tally(&answers);
    assert_eq!(
        answers.len(),
        12,
        "every slow flow got its answer: {answers:?}"
    );
    assert!(
        answers.iter().all(|a| *a == draining || *a == survivor),
        "a slow flow failed: {answers:?}"
    );
    assert!(
        tally.contains_key(&draining),
        "no slow flow took the exit that was deleted, so its drain was not seen: {tally:?}"
    );

    // Its flows ended (closed, so not counted at all): it leaves well before its three-minute
    // grace. The minute of quiet is for flows that stay open; the unit test covers it.
    let left = eventually(
        "the drained exit's pod is gone",
        Duration::from_mins(2),
        || {
            let now = lab.try_kubectl(&[
                "-n",
                DEMO_NAMESPACE,
                "get",
                "pod",
                &gone_name,
                "-o",
                "jsonpath={.metadata.uid}",
            ]);
            match now {
                Ok(uid) if uid.trim() == gone_uid => Err("still draining".to_owned()),
                _ => Ok(flows_ended.elapsed()),
            }
        },
    );
    eprintln!("the drained exit left {left:?} after its last flow ended");
    leaks.assert_carried_and_none_leaked();
    delete_client(lab, name);
}

/// The gateway servers (2 and up) of the lab providers `providers`: what an outage of their
/// exits cuts off.
fn gateway_servers(providers: &[&layout::Provider]) -> Vec<String> {
    providers
        .iter()
        .flat_map(|p| (2..=p.servers).map(|k| p.server(k)))
        .collect()
}

#[test]
fn with_every_exit_down_internet_connections_are_refused_and_the_cluster_stays_reachable() {
    let lab = lab::shared();
    let _turn = lab::serial();
    healthy_gateway(lab);
    let name = "gw-down";
    let pod = running_client(lab, name);
    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    let outage = lab::Outage::start(
        lab,
        &gateway_servers(&[&layout::PROVIDERS[0], &layout::PROVIDERS[1]]),
    );
    eventually(
        "the gateway sees no healthy exit",
        Duration::from_mins(1),
        || {
            let gw = gateway(lab);
            if gw["status"]["healthyExits"] == 0 {
                Ok(())
            } else {
                Err(format!("{}", gw["status"]["exits"]))
            }
        },
    );
    // Refused at once (a reset from the node), not left to time out: IPv4 and IPv6.
    for echo in [ECHO, ECHO6] {
        let answers = ask_to(lab, name, echo, 5);
        assert!(
            answers
                .iter()
                .all(|a| a.contains("Connection refused") || a.contains("reset")),
            "{echo}: {answers:?}"
        );
    }
    assert_reaches_the_cluster(lab, name);
    // Its node answers the client's DNS meanwhile: cluster names only.
    let script = format!("nslookup echo.{} 2>&1; true", layout::INTERNET_ZONE);
    let out = in_pod(lab, name, &script);
    assert!(
        !out.contains(&format!("Address: {ECHO}")),
        "an internet name resolved with every exit down: {out}"
    );
    assert_eq!(leaks.read("leaked"), 0, "client packets left by an uplink");
    assert_eq!(leaks.read("leaked6"), 0, "client IPv6 left by an uplink");
    drop(outage);
    healthy_gateway(lab);
    let counts = tally(&ask(lab, name, 10));
    assert!(
        counts.keys().all(|a| a.starts_with("198.51.100.")),
        "{counts:?}"
    );
    drop(leaks);
    delete_client(lab, name);
}

#[test]
fn lab_status_shows_the_gateways_exits_and_the_address_its_example_client_is_seen_with() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let addresses = exit_addresses(&gw);
    // The example client asks the echo service every 5 s.
    eventually(
        "the echo service sees the example gateway client",
        Duration::from_mins(1),
        || match lab.lab.echo_seen().get("cloak-demo/gw-client") {
            Some((ip, _)) if addresses.contains(ip) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // Each exit's public address, as its agent's probe saw it, is in the status.
    let gw = eventually(
        "each exit's public address in the status",
        Duration::from_mins(1),
        || {
            let gw = gateway(lab);
            let exits = gw["status"]["exits"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if exits.len() == 2
                && exits
                    .iter()
                    .all(|e| str_at(e, "/publicAddress") == exit_address(e))
            {
                Ok(gw)
            } else {
                Err(format!("{}", gw["status"]))
            }
        },
    );
    let out = lab::cloak_lab(lab.lab.name(), &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for exit in gw["status"]["exits"].as_array().unwrap() {
        let row = format!("cloak-demo/egress:{}", str_at(exit, "/name"));
        assert!(
            text.lines().any(|l| l.starts_with(&row)
                && l.contains("Healthy")
                && l.contains(&exit_address(exit))),
            "{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("cloak-demo/gw-client") && l.contains("egress")),
        "{text}"
    );
    // Each of the client's requests is a new flow, so the exit it is seen from may have changed
    // since: the row shows one of the exits' addresses.
    assert!(
        text.lines().any(|l| l.starts_with("cloak-demo/gw-client")
            && addresses.iter().any(|a| l.contains(a.as_str()))),
        "{text}"
    );
}

#[test]
fn fifty_client_pods_created_and_deleted_leave_nothing_behind_in_the_node_component_or_on_the_nodes()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    healthy_gateway(lab);
    // The example chain's hops are clients too, each made once the hop before it is up.
    chain::healthy_chain(lab);
    let nodes: Vec<String> = (1..=2).map(layout::node_name).collect();
    let links = |node: &str| client_links(lab, node);
    let before = settled_client_links(lab, &nodes);
    // The gateway's status counts its running clients: as many as run now, 50 more once they
    // run, and as many again once they are gone.
    let status_clients = || {
        gateway(lab)["status"]["clients"]
            .as_u64()
            .unwrap_or_default()
    };
    let running_clients = || {
        let pods = lab.json(&[
            "-n",
            DEMO_NAMESPACE,
            "get",
            "pods",
            "-l",
            &format!("cloak.dev/gateway={GATEWAY}"),
        ]);
        pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
            })
            .count() as u64
    };
    let clients_before = eventually(
        "status.clients matches the running clients",
        Duration::from_mins(1),
        || {
            let (counted, running) = (status_clients(), running_clients());
            if counted == running {
                Ok(counted)
            } else {
                Err(format!("status.clients {counted}, running {running}"))
            }
        },
    );
    lab.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: gw-many\n  namespace: {DEMO_NAMESPACE}\nspec:\n  replicas: 50\n  selector:\n    matchLabels: {{app: gw-many}}\n  template:\n    metadata:\n      labels: {{app: gw-many, cloak.dev/gateway: {GATEWAY}}}\n    spec:\n      terminationGracePeriodSeconds: 0\n      containers:\n        - name: c\n          image: cloak.dev/lab/client:dev\n          imagePullPolicy: Never\n          command: [sleep, \"100000\"]\n          resources: {{requests: {{cpu: 1m, memory: 4Mi}}}}\n"
    ));
    let attached = eventually("50 client pods Running", Duration::from_mins(5), || {
        let pods = lab.json(&["-n", DEMO_NAMESPACE, "get", "pods", "-l", "app=gw-many"]);
        let running = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["status"]["phase"] == "Running")
            .count();
        let links: usize = nodes.iter().map(|n| links(n).len()).sum();
        if running == 50 {
            Ok(links)
        } else {
            Err(format!("{running} Running"))
        }
    });
    let before_total: usize = before.iter().map(Vec::len).sum();
    assert_eq!(
        attached,
        before_total + 50,
        "every client has its link on its node"
    );
    eventually(
        "status.clients counts the 50",
        Duration::from_secs(30),
        || {
            let counted = status_clients();
            if counted == clients_before + 50 {
                Ok(())
            } else {
                Err(format!("status.clients {counted}, before {clients_before}"))
            }
        },
    );
    lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "delete",
        "deployment",
        "gw-many",
        "--wait=true",
        "--timeout=120s",
    ]);
    eventually(
        "the 50 pods are gone and their links with them",
        Duration::from_mins(5),
        || {
            let pods = lab.json(&["-n", DEMO_NAMESPACE, "get", "pods", "-l", "app=gw-many"]);
            let left = pods["items"].as_array().map_or(0, Vec::len);
            let now: Vec<Vec<String>> = nodes.iter().map(|n| links(n)).collect();
            if left == 0 && now == before {
                Ok(())
            } else {
                Err(format!(
                    "{left} pods left; links {now:?}, before {before:?}"
                ))
            }
        },
    );
    eventually("status.clients is back", Duration::from_secs(30), || {
        let counted = status_clients();
        if counted == clients_before {
            Ok(())
        } else {
            Err(format!("status.clients {counted}, before {clients_before}"))
        }
    });
    // The node component's own record of clients, and the nodes' routes to clients, hold
    // nothing of them either (the pods opened no flows: conntrack is not looked at).
    for (k, node) in nodes.iter().enumerate() {
        assert_eq!(
            recorded_clients(lab, u8::try_from(k + 1).unwrap()),
            before[k].len(),
            "{node}: the state file still lists clients"
        );
        let routes = lab
            .exec_in(node, &["ip", "-4", "route", "show", "table", "all"])
            .unwrap();
        let client_routes = routes.lines().filter(|l| l.starts_with("198.18.")).count();
        assert_eq!(client_routes, before[k].len(), "{node}: {routes}");
    }
}

/// A plain pod with the runtime's `NET_RAW` sends VXLAN frames into each exit (its identifier,
/// its MAC, an inner packet to the internet): from its own address, and from each node's. None
/// may leave through an exit's tunnel; the same frames from the exit's node do (the control).
#[test]
fn a_plain_pod_with_net_raw_puts_no_frame_into_any_exit_from_its_own_address_or_a_nodes() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let name = "gw-spoof";
    let pod = running_plain_pod_on(lab, name, &layout::node_name(1));
    let netns = pod_netns(&str_at(&pod, "/metadata/uid"));
    lab.nft(
        "net",
        "table inet cloak_test_spoof {\n  counter through {}\n  chain input {\n    type filter hook input priority 0; policy accept;\n    udp dport 5555 counter name through\n  }\n}\n",
    );
    let through = || lab.nft_packets("net", "inet", "cloak_test_spoof", "through");
    let echo: std::net::Ipv4Addr = ECHO.parse().unwrap();
    let exits = gw["status"]["exits"].as_array().unwrap().clone();
    assert_eq!(exits.len(), 2, "{gw}");
    let frames: Vec<(std::net::Ipv4Addr, Vec<u8>, String)> = exits
        .iter()
        .map(|exit| {
            let address = str_at(exit, "/podIp");
            let vni = u32::try_from(exit["vni"].as_u64().unwrap()).unwrap();
            let pod = exit_pod(lab, exit);
            let inside = pod_netns(&str_at(&pod, "/metadata/uid"));
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={inside}"))
                .args(["ip", "-o", "link", "show", "dev", "ckx0"])
                .output()
                .unwrap();
            let link = String::from_utf8_lossy(&out.stdout).into_owned();
            let mac: Vec<u8> = link
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .unwrap_or_else(|| panic!("the exit's ckx0: {link}"))
                .split(':')
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect();
            let frame = cloak_testkit::netlab::spoof::vxlan_frame(
                vni,
                mac.try_into().expect("the exit's ckx0 MAC"),
                [198, 19, 9, 9],
                echo.octets(),
                5555,
            );
            (
                address.parse().unwrap(),
                frame,
                str_at(&pod, "/spec/nodeName"),
            )
        })
        .collect();
    let nodes: Vec<std::net::Ipv4Addr> = (1..=2)
        .map(|k| layout::node_ip(k).parse().unwrap())
        .collect();
    // Each exit's node read its interface in its own sandbox when it was made: the exception's
    // port is not one a pod could move by poisoning the bridge's tables.
    for (exit, _, node) in &frames {
        let k: u8 = node.trim_start_matches('n').parse().unwrap();
        let state = lab
            .lab
            .node_dir(k)
            .join("root/var/lib/cloak/node/clients.json");
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        assert!(
            text.contains(&format!("\"address\":\"{exit}\"")),
            "{node} recorded no port for exit {exit}: {text}"
        );
    }
    for (exit, frame, _) in &frames {
        let send =
            |to, from| cloak_testkit::netlab::spoof::send_vxlan(&netns, to, from, frame.clone());
        send(*exit, None);
        for node in &nodes {
            send(*exit, Some(*node));
        }
        // Not to the exit's address: to every address of its node's pod network at once.
        let [a, b, c, _] = exit.octets();
        send(std::net::Ipv4Addr::new(a, b, c, 255), None);
        send(std::net::Ipv4Addr::BROADCAST, None);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        through(),
        0,
        "a plain pod's frames left through an exit's tunnel"
    );
    // The control: the same frames from each exit's node pass.
    for (exit, frame, node) in &frames {
        let host = format!("/var/run/netns/{}", lab.lab.netns(node));
        cloak_testkit::netlab::spoof::send_vxlan(&host, *exit, None, frame.clone());
    }
    eventually(
        "the nodes' frames through the exits",
        Duration::from_secs(5),
        || {
            let n = through();
            if n >= 10 {
                Ok(())
            } else {
                Err(format!("{n} of 10"))
            }
        },
    );
    let _ = lab.exec_in(
        "net",
        &["nft", "delete", "table", "inet", "cloak_test_spoof"],
    );
    delete_client(lab, name);
}

/// The capabilities in effect of the exit agent (`cloak`) of the pod with this UID, from its
/// `/proc/<pid>/status`.
fn agent_capabilities(uid: &str) -> u64 {
    let pid = pod_process(uid, Some("cloak"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// One HTTP/1.0 GET from inside the network namespace at `netns`; the whole answer.
fn http_get_from(netns: &str, address: &str, path: &str) -> String {
    let (netns, address, path) = (netns.to_owned(), address.to_owned(), path.to_owned());
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut stream =
            std::net::TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(3))
                .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        std::io::Write::write_all(
            &mut stream,
            format!("GET {path} HTTP/1.0\r\nHost: exit\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut answer = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
        answer
    })
    .join()
    .unwrap()
}

#[test]
fn exits_run_unprivileged_with_a_few_capabilities_and_tell_their_status_only_to_the_operator() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let exits = gw["status"]["exits"].as_array().unwrap().clone();
    assert!(!exits.is_empty(), "{gw}");
    // A plain pod reaches each exit's admin port (kubelet's readiness probe needs it) and is
    // told no more than ready or not; the operator, with the gateway's token, got the address.
    let plain = running_plain_pod_on(lab, "gw-admin", &layout::node_name(1));
    let netns = pod_netns(&str_at(&plain, "/metadata/uid"));
    for exit in &exits {
        let public = str_at(exit, "/publicAddress");
        assert!(!public.is_empty(), "the operator got no address: {exit}");
        let admin = format!(
            "{}:{}",
            str_at(exit, "/podIp"),
            cloak_model::exit::ADMIN_PORT
        );
        for path in ["/status", "/metrics"] {
            let answer = http_get_from(&netns, &admin, path);
            let status_line = answer.lines().next().unwrap_or_default();
            assert!(status_line.contains(" 401 "), "{path}: {answer}");
            assert!(!answer.contains(&public), "{path}: {answer}");
        }
        let ready = http_get_from(&netns, &admin, "/readyz");
        assert!(ready.contains("ready: "), "{ready}");
        assert!(!ready.contains(&public), "/readyz: {ready}");
    }
    delete_client(lab, "gw-admin");
    for exit in &exits {
        let pod = &exit_pod(lab, exit);
        let security = &pod["spec"]["containers"][0]["securityContext"];
        assert_ne!(security["privileged"], true, "{security}");
        assert_eq!(
            security["capabilities"]["add"],
            serde_json::json!(["NET_ADMIN", "NET_RAW", "MKNOD", "SETUID", "SETGID"]),
            "{security}"
        );
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        assert!(
            volumes.iter().all(|v| v.get("hostPath").is_none()),
            "{volumes:?}"
        );
        // The healthy exit's agent really runs so: NET_ADMIN (12), never SYS_ADMIN (21).
        let caps = agent_capabilities(&str_at(pod, "/metadata/uid"));
        assert_eq!(caps & (1 << 12), 1 << 12, "no NET_ADMIN: {caps:#x}");
        assert_eq!(caps & (1 << 21), 0, "SYS_ADMIN: {caps:#x}");
    }
}

#[test]
fn a_client_pings_the_internet_at_its_gateways_mtu_with_dont_fragment_and_one_byte_more_does_not_pass()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let mtu = gw["status"]["mtu"].as_u64().unwrap();
    // The lab's exits are WireGuard servers (wg-quick's 1420) over a 1500-byte pod network.
    assert_eq!(mtu, 1420, "{gw}");
    let client = running_client(lab, "gw-mtu");
    let netns = pod_netns(&str_at(&client, "/metadata/uid"));
    assert_pings_at_mtu(&netns, mtu);
    // Each exit's end of the links has the pod network's MTU less VXLAN's 50 bytes.
    for exit in gw["status"]["exits"].as_array().unwrap() {
        let inside = pod_netns(&str_at(&exit_pod(lab, exit), "/metadata/uid"));
        let link = std::process::Command::new("nsenter")
            .arg(format!("--net={inside}"))
            .args(["ip", "-o", "link", "show", "dev", "ckx0"])
            .output()
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        assert!(link.contains(" mtu 1450 "), "{link}");
    }
    delete_client(lab, "gw-mtu");
}
