//! The example VpnGateway of `examples/lab/50-gateway.yaml` as the gateway tests see it: its
//! status, plain client pods, flows to the echo service (which tells the exit a flow left by:
//! each exit's provider has its own exit address), and leak counters on the nodes.

use std::{collections::BTreeMap, time::Duration};

use cloak_lab::{DEMO_NAMESPACE, layout};
use serde_json::Value;

use super::{TestLab, eventually, str_at};

pub(crate) const GATEWAY: &str = "egress";
pub(crate) const ECHO: &str = layout::ECHO;
pub(crate) const ECHO6: &str = layout::ECHO6;

/// The example gateway as it is now.
pub(crate) fn gateway(lab: &TestLab) -> Value {
    lab.json(&["-n", DEMO_NAMESPACE, "get", "vpngateway", GATEWAY])
}

/// The example gateway once both exits are healthy (they prefer different nodes; a replaced
/// one may land beside the other).
pub(crate) fn healthy_gateway(lab: &TestLab) -> Value {
    healthy_gateway_of(lab, 2)
}

/// Exit `name` as the gateway's status `gw` lists it (`null` while it is not listed).
pub(crate) fn exit_named(gw: &Value, name: &str) -> Value {
    gw["status"]["exits"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| str_at(e, "/name") == name)
        .cloned()
        .unwrap_or_default()
}

/// The example gateway once it has exactly `count` exits, every one healthy.
pub(crate) fn healthy_gateway_of(lab: &TestLab, count: usize) -> Value {
    eventually(
        &format!("the example gateway has {count} healthy exits"),
        Duration::from_mins(3),
        || {
            let gw = gateway(lab);
            let exits = gw["status"]["exits"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let healthy = exits.iter().filter(|e| e["health"] == "Healthy").count();
            if healthy == count && exits.len() == count {
                Ok(gw)
            } else {
                Err(format!("{}", gw["status"]))
            }
        },
    )
}

/// The address the echo service sees for flows through the exit of provider `gw-<x>`: the lab
/// provider whose servers its pool holds.
pub(crate) fn exit_address(exit: &Value) -> String {
    exit_provider(exit).exit()
}

/// The lab provider a gateway exit's VpnProvider (`gw-<name>`) is a pool of.
pub(crate) fn exit_provider(exit: &Value) -> &'static layout::Provider {
    let provider = str_at(exit, "/provider");
    let of = provider.strip_prefix("gw-").expect("a gateway provider");
    layout::PROVIDERS
        .iter()
        .find(|p| p.name.ends_with(of))
        .expect("a lab provider")
}

/// The addresses the echo service sees for IPv6 flows through the gateway's exits whose
/// providers carry IPv6.
pub(crate) fn exit_addresses6(gw: &Value) -> Vec<String> {
    gw["status"]["exits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(exit_provider)
        .filter(|p| p.ipv6)
        .map(layout::Provider::exit6)
        .collect()
}

/// The addresses the echo service sees for flows through each of the gateway's exits.
pub(crate) fn exit_addresses(gw: &Value) -> Vec<String> {
    gw["status"]["exits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(exit_address)
        .collect()
}

/// A plain pod labelled as the gateway's client: one busybox container, nothing else.
pub(crate) fn client_yaml(name: &str) -> String {
    client_yaml_on(name, None)
}

/// [`client_yaml`], bound to `node` when given (`spec.nodeName`, as the scheduler would set it).
pub(crate) fn client_yaml_on(name: &str, node: Option<&str>) -> String {
    let node = node.map_or(String::new(), |n| format!("  nodeName: {n}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {DEMO_NAMESPACE}\n  labels: {{cloak.dev/gateway: {GATEWAY}, app: gw-test}}\nspec:\n{node}  terminationGracePeriodSeconds: 0\n  containers:\n    - name: c\n      image: cloak.dev/lab/client:dev\n      imagePullPolicy: Never\n      command: [sleep, \"100000\"]\n"
    )
}

pub(crate) fn running_client(lab: &TestLab, name: &str) -> Value {
    running_client_on(lab, name, None)
}

/// The client pod `name` (on `node` when given) once it runs.
pub(crate) fn running_client_on(lab: &TestLab, name: &str, node: Option<&str>) -> Value {
    lab.apply(&client_yaml_on(name, node));
    until_running(lab, name)
}

/// The pod `name` of the demo namespace once it runs (90 s at most).
pub(crate) fn until_running(lab: &TestLab, name: &str) -> Value {
    eventually(
        &format!("pod {name} Running"),
        Duration::from_secs(90),
        || {
            let pod = lab.json(&["-n", DEMO_NAMESPACE, "get", "pod", name]);
            if pod["status"]["phase"] == "Running" {
                Ok(pod)
            } else {
                Err(format!("{}", pod["status"]))
            }
        },
    )
}

/// A plain pod on `node`: no gateway chooses it (no label of one), the runtime's default
/// capabilities (`NET_RAW` among them), Running.
pub(crate) fn running_plain_pod_on(lab: &TestLab, name: &str, node: &str) -> Value {
    lab.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {DEMO_NAMESPACE}\n  labels: {{app: gw-test}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 0\n  containers:\n    - name: c\n      image: cloak.dev/lab/client:dev\n      imagePullPolicy: Never\n      command: [sleep, \"100000\"]\n"
    ));
    until_running(lab, name)
}

/// The network namespace of the pod with uid `uid`, as a path: that of a process in its cgroup
/// (the kubelet names a pod's cgroup after its uid, with `_` for `-` under systemd).
pub(crate) fn pod_netns(uid: &str) -> String {
    format!("/proc/{}/ns/net", pod_process(uid, None))
}

/// A process of the pod with this UID (by its cgroup), the one named `comm` if given.
pub(crate) fn pod_process(uid: &str, comm: Option<&str>) -> u32 {
    let underscored = uid.replace('-', "_");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(uid) || c.contains(&underscored))
                && comm.is_none_or(|want| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == want)
                })
        })
        .unwrap_or_else(|| panic!("no process {comm:?} of pod {uid}"))
}

/// The pod of a gateway's exit as its status lists it.
pub(crate) fn exit_pod(lab: &TestLab, exit: &Value) -> Value {
    exit_pod_named(lab, &str_at(exit, "/name"))
}

/// The pod of the exit called `name` (its label `cloak.dev/exit`).
pub(crate) fn exit_pod_named(lab: &TestLab, name: &str) -> Value {
    let pods = lab.json(&[
        "-n",
        DEMO_NAMESPACE,
        "get",
        "pod",
        "-l",
        &format!("cloak.dev/exit={name}"),
    ]);
    pods["items"][0].clone()
}

pub(crate) fn delete_client(lab: &TestLab, name: &str) {
    let _ = lab.try_kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "delete",
        "pod",
        name,
        "--wait=true",
        "--timeout=60s",
    ]);
}

/// Of the gateway's two exits, the one a test takes away and the one it keeps: the exit on
/// another node than the client's goes (the client's flows to it cross the nodes), or the first
/// when both share the client's node.
pub(crate) fn exit_to_lose(gw: &Value, client_node: &str) -> (Value, Value) {
    let exits = gw["status"]["exits"].as_array().unwrap();
    let gone = exits
        .iter()
        .find(|e| str_at(e, "/node") != client_node)
        .unwrap_or(&exits[0]);
    let kept = exits.iter().find(|e| *e != gone).unwrap();
    (gone.clone(), kept.clone())
}

/// `script` run by `sh -c` in the example namespace's pod `pod`: its standard output.
pub(crate) fn in_pod(lab: &TestLab, pod: &str, script: &str) -> String {
    lab.kubectl(&["-n", DEMO_NAMESPACE, "exec", pod, "--", "sh", "-c", script])
}

/// The answers a flow script run in `pod` printed, one `r=<answer>` line a flow.
pub(crate) fn answers(lab: &TestLab, pod: &str, script: &str) -> Vec<String> {
    in_pod(lab, pod, script)
        .lines()
        .filter_map(|l| l.strip_prefix("r="))
        .map(|r| r.trim().to_owned())
        .collect()
}

/// `count` new TCP flows from the pod to the echo service, one after another: what each saw
/// as the source address, or the error `nc` printed.
pub(crate) fn ask(lab: &TestLab, pod: &str, count: u32) -> Vec<String> {
    ask_to(lab, pod, ECHO, count)
}

/// [`ask`] of the echo service at `address` ([`ECHO`] or [`ECHO6`]).
pub(crate) fn ask_to(lab: &TestLab, pod: &str, address: &str, count: u32) -> Vec<String> {
    answers(
        lab,
        pod,
        &format!(
            "i=0; while [ $i -lt {count} ]; do r=$(printf 'GET /ip HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} 80 2>&1 | tail -n 1); echo \"r=$r\"; i=$((i+1)); done"
        ),
    )
}

/// Every answer is one of the exits' `addresses`, and each exit took at least `min_each` of
/// them. `context` names the client in the failure.
pub(crate) fn assert_spread(
    context: &str,
    answers: &[String],
    addresses: &[String],
    min_each: usize,
) -> BTreeMap<String, usize> {
    let counts = tally(answers);
    for (answer, n) in &counts {
        assert!(
            addresses.contains(answer),
            "{context}: a flow was seen from {answer} ({n}x), not from an exit {addresses:?}"
        );
    }
    for address in addresses {
        let n = counts.get(address).copied().unwrap_or(0);
        assert!(
            n >= min_each,
            "{context}: exit {address} took {n} of {} flows (under {min_each}): {counts:?}",
            answers.len()
        );
    }
    counts
}

/// Merges `spec` (JSON) into the example gateway's spec.
pub(crate) fn patch_spec(lab: &TestLab, spec: &str) -> Result<String, String> {
    lab.try_kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "patch",
        "vpngateway",
        GATEWAY,
        "--type=merge",
        "-p",
        &format!("{{\"spec\":{spec}}}"),
    ])
}

/// Sets the example gateway's exit count.
pub(crate) fn set_exit_count(lab: &TestLab, count: u32) -> Result<String, String> {
    patch_spec(lab, &format!("{{\"exits\":{{\"count\":{count}}}}}"))
}

/// The pod resolves a cluster name through the cluster DNS and fetches the example web page
/// from that Service's address: the intranet goes outside the exits.
pub(crate) fn assert_reaches_the_cluster(lab: &TestLab, pod: &str) {
    let ip = lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "get",
        "service",
        "web",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let script = format!(
        "nslookup web.{DEMO_NAMESPACE}.svc.cluster.local 2>&1; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80 2>&1 | tail -n 1"
    );
    let out = in_pod(lab, pod, &script);
    assert!(out.contains(&format!("Address: {ip}")), "{out}");
    assert!(out.contains("hello from the cloak lab"), "{out}");
}

/// Now as the API server writes times (RFC 3339, UTC, whole seconds), a second early: the lab's
/// API server runs on this machine's clock.
pub(crate) fn now_rfc3339() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", "-1 second", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub(crate) fn tally(answers: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.clone()).or_default() += 1;
    }
    counts
}

/// Counters on every node for client traffic (from `pod_ip` or the gateway's client range)
/// leaving by the node's uplink to anything outside the cluster (leaks), and entering a link to
/// an exit (carried). Counted before any NAT.
pub(crate) struct Leaks<'a> {
    lab: &'a TestLab,
    nodes: Vec<String>,
}

impl<'a> Leaks<'a> {
    pub(crate) fn install(lab: &'a TestLab, pod_ip: &str) -> Self {
        let nodes: Vec<String> = (1..=2).map(layout::node_name).collect();
        for node in &nodes {
            let script = format!(
                "table inet cloak_test_gw {{\n  counter carried {{}}\n  counter carried6 {{}}\n  counter leaked {{}}\n  counter leaked6 {{}}\n  chain post {{\n    type filter hook postrouting priority -400; policy accept;\n    oifname \"ckx*\" ip saddr 198.18.0.0/16 counter name carried\n    oifname \"ckx*\" ip6 saddr {clients6} counter name carried6\n    oifname \"lan0\" ip saddr {{ {pod_ip}, 198.18.0.0/15 }} ip daddr != {{ {pods}, {services}, 10.250.0.0/24 }} counter name leaked\n    oifname \"lan0\" meta nfproto ipv6 ip6 saddr != fe80::/10 counter name leaked6\n  }}\n}}\n",
                pods = layout::POD_CIDR,
                services = layout::SERVICE_CIDR,
                clients6 = cloak_dataplane::gateway::CLIENT_RANGE6,
            );
            lab.nft(node, &script);
        }
        Self { lab, nodes }
    }

    /// The counters saw client traffic carried to the exits, and none of it left by an uplink.
    pub(crate) fn assert_carried_and_none_leaked(self) {
        assert!(self.read("carried") > 0, "the counters are blind");
        assert_eq!(self.read("leaked"), 0, "client packets left by an uplink");
    }

    pub(crate) fn read(&self, name: &str) -> u64 {
        self.nodes
            .iter()
            .map(|node| self.lab.nft_packets(node, "inet", "cloak_test_gw", name))
            .sum()
    }
}

impl Drop for Leaks<'_> {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = self
                .lab
                .exec_in(node, &["nft", "delete", "table", "inet", "cloak_test_gw"]);
        }
    }
}

/// The client pod's spec is what `client_yaml` wrote: one container, no securityContext, no init
/// containers, no volume beyond the service account token the API server adds to every pod.
pub(crate) fn assert_spec_as_written(pod: &Value) {
    let spec = &pod["spec"];
    assert_eq!(spec["containers"].as_array().unwrap().len(), 1, "{spec}");
    assert!(spec["initContainers"].is_null(), "{spec}");
    assert!(spec["containers"][0]["securityContext"].is_null(), "{spec}");
    let volumes: Vec<String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| str_at(v, "/name"))
        .collect();
    assert!(
        volumes.iter().all(|v| v.starts_with("kube-api-access-")),
        "{volumes:?}"
    );
}

/// The links `cloak node` made on `node` for its clients (`ckg…`, one a client pod).
pub(crate) fn client_links(lab: &TestLab, node: &str) -> Vec<String> {
    lab.exec_in(node, &["ip", "-o", "link", "show"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("ckg"))
        .collect()
}

/// The clients `cloak node` on node `k` (1-based) keeps in its state file.
pub(crate) fn recorded_clients(lab: &TestLab, k: u8) -> usize {
    let state = lab
        .lab
        .node_dir(k)
        .join("root/var/lib/cloak/node/clients.json");
    let text = std::fs::read_to_string(&state).unwrap_or_default();
    let clients: Value = serde_json::from_str(&text).unwrap_or_default();
    clients["clients"].as_array().map_or(0, Vec::len)
        + clients["clients"]
            .as_object()
            .map_or(0, serde_json::Map::len)
}

/// Every pod that is some gateway's client: labelled with a gateway or a chain, or the exit of a
/// chain's hop (the client of the hop before it).
pub(crate) fn client_pods(lab: &TestLab) -> Vec<Value> {
    let gateways = lab.json(&["get", "vpngateways", "-A"]);
    let through: Vec<String> = gateways["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["spec"]["exits"]["through"].is_string())
        .map(|g| str_at(g, "/metadata/name"))
        .collect();
    let pods = lab.json(&["get", "pods", "-A"]);
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            let labels = &p["metadata"]["labels"];
            labels["cloak.dev/gateway"].is_string()
                || labels["cloak.dev/chain"].is_string()
                || labels["cloak.dev/exit-of"]
                    .as_str()
                    .is_some_and(|g| through.iter().any(|t| t == g))
        })
        .cloned()
        .collect()
}

/// Each node's client links once they match the client pods on it: pods of earlier tests may
/// still be tearing down (the API server forgets a pod before its sandbox's DEL has run).
pub(crate) fn settled_client_links(lab: &TestLab, nodes: &[String]) -> Vec<Vec<String>> {
    eventually(
        "each node's links match its client pods",
        Duration::from_mins(1),
        || {
            let pods = client_pods(lab);
            let now: Vec<Vec<String>> = nodes.iter().map(|n| client_links(lab, n)).collect();
            let per_node: Vec<usize> = nodes
                .iter()
                .map(|n| {
                    pods.iter()
                        .filter(|p| str_at(p, "/spec/nodeName") == *n)
                        .count()
                })
                .collect();
            if now.iter().map(Vec::len).eq(per_node.iter().copied()) {
                Ok(now)
            } else {
                Err(format!("links {now:?}, client pods per node {per_node:?}"))
            }
        },
    )
}

/// A client pod at `netns` pings the echo service with don't-fragment: a packet of exactly `mtu`
/// bytes passes (one of three tries), and one byte more is refused at once, naming that MTU.
pub(crate) fn assert_pings_at_mtu(netns: &str, mtu: u64) {
    let ping = |payload: u64| {
        std::process::Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["ping", "-n", "-M", "do", "-c", "1", "-W", "3", "-s"])
            .arg(payload.to_string())
            .arg(ECHO)
            .output()
            .unwrap()
    };
    // IPv4's 20 bytes and ICMP's 8 around the payload.
    let fits = (1..=3).any(|_| ping(mtu - 28).status.success());
    assert!(
        fits,
        "a {mtu}-byte packet did not pass: {:?}",
        ping(mtu - 28)
    );
    let over = ping(mtu - 27);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&over.stdout),
        String::from_utf8_lossy(&over.stderr)
    );
    assert!(
        !over.status.success() && said.contains(&format!("mtu={mtu}")),
        "a {}-byte packet: {said}",
        mtu + 1
    );
}

/// The lab's example chain (`onion`, `examples/lab/60-chain.yaml`) once every hop carries
/// traffic and the last one's address is known: its hops' exits are clients too, each made once
/// the hop before is up, so counts of client links settle only then.
pub(crate) fn healthy_example_chain(lab: &TestLab) -> Value {
    eventually(
        "chain onion: every hop healthy",
        Duration::from_mins(5),
        || {
            let chain = lab.json(&["-n", DEMO_NAMESPACE, "get", "vpnchain", "onion"]);
            let status = &chain["status"];
            if status["healthyHops"] == 3 && status["publicAddress"].is_string() {
                Ok(chain)
            } else {
                Err(status.to_string())
            }
        },
    )
}
