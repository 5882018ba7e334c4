//! End to end in a real `cloak lab` (root): the Helm chart on real nodes, seed 000's ownership
//! model with a real kubelet, `cloak agent` as a container whose egress the echo service sees,
//! the kill switch counted on the node, credential rotation through a mounted Secret, and
//! `cloak portfwd` in front of the nodes' NodePorts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers

mod labkit;

use labkit as lab;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloak_lab::{CLOAK_NAMESPACE, DEMO_NAMESPACE, layout};
use lab::{eventually, str_at};
use serde_json::Value;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn operator_pods(lab: &lab::TestLab) -> Vec<Value> {
    lab.json(&[
        "-n",
        CLOAK_NAMESPACE,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=cloak,app.kubernetes.io/component!=node",
    ])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn leader(lab: &lab::TestLab) -> String {
    lab.kubectl(&[
        "-n",
        CLOAK_NAMESPACE,
        "get",
        "lease",
        "cloak",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
}

/// Two Ready operator replicas, and the Lease held by one of them.
fn two_ready_replicas_one_leader(lab: &lab::TestLab) -> Result<String, String> {
    let pods = operator_pods(lab);
    let names: Vec<String> = pods
        .iter()
        .filter(|p| ready(p))
        .map(|p| str_at(p, "/metadata/name"))
        .collect();
    let holder = leader(lab);
    if names.len() == 2 && names.contains(&holder) {
        Ok(holder)
    } else {
        Err(format!("ready replicas {names:?}, leader {holder:?}"))
    }
}

/// A mask in `ns` for providers tagged `tag`; returns its status once Ready.
fn ready_mask(lab: &lab::TestLab, ns: &str, name: &str, tag: &str) -> Value {
    lab.apply(&format!(
        "apiVersion: cloak.dev/v1alpha1\nkind: VpnMask\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{providers: [{tag}]}}\n"
    ));
    eventually(
        &format!("mask {ns}/{name} Ready"),
        Duration::from_mins(1),
        || {
            let mask = lab.json(&["-n", ns, "get", "vpnmask", name]);
            match str_at(&mask, "/status/phase").as_str() {
                "Ready" | "Active" => Ok(mask["status"].clone()),
                other => Err(format!(
                    "phase {other:?}: {}",
                    str_at(&mask, "/status/message")
                )),
            }
        },
    )
}

#[test]
fn the_chart_installs_two_ready_replicas_rolls_out_an_upgrade_hands_leadership_over_and_uninstalls_keeping_providers()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    let first_leader = eventually(
        "2 Ready replicas, one leader",
        Duration::from_mins(1),
        || two_ready_replicas_one_leader(lab),
    );

    // A changed value rolls out to completion: the new standby replica must become Ready.
    let chart = cloak_testkit::repo_path("charts/cloak");
    let chart = chart.to_string_lossy();
    lab.helm(&[
        "upgrade",
        "cloak",
        &chart,
        "--namespace",
        CLOAK_NAMESPACE,
        "--reuse-values",
        "--set",
        "operator.logLevel=debug",
        "--wait",
        "--timeout",
        "180s",
    ])
    .unwrap_or_else(|e| panic!("helm upgrade did not roll out: {e}"));
    let pods = operator_pods(lab);
    assert!(
        pods.iter().filter(|p| ready(p)).all(|p| {
            p["spec"]["containers"][0]["env"]
                .as_array()
                .is_some_and(|env| {
                    env.iter()
                        .any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug")
                })
        }),
        "every Ready replica runs the new value"
    );
    let upgraded_leader = eventually("a leader after the upgrade", Duration::from_mins(1), || {
        two_ready_replicas_one_leader(lab)
    });
    assert_ne!(
        first_leader, upgraded_leader,
        "the rollout replaced both pods"
    );

    // Deleting the leader's pod hands leadership to the other replica, which serves masks.
    lab.kubectl(&[
        "-n",
        CLOAK_NAMESPACE,
        "delete",
        "pod",
        &upgraded_leader,
        "--wait=false",
    ]);
    let within = cloak_operator::leader::LEASE_DURATION + Duration::from_secs(30);
    let next = eventually("leadership handed over", within, || {
        let holder = leader(lab);
        let alive = operator_pods(lab)
            .iter()
            .any(|p| ready(p) && str_at(p, "/metadata/name") == holder);
        if holder != upgraded_leader && alive {
            Ok(holder)
        } else {
            Err(format!("holder {holder:?}"))
        }
    });
    let ns = lab.namespace("handover");
    let status = ready_mask(lab, &ns, "after-handover", "us");
    assert_eq!(str_at(&status, "/provider/name"), "wg-beta");
    assert_ne!(next, upgraded_leader);
    lab.kubectl(&[
        "-n",
        &ns,
        "delete",
        "vpnmask",
        "after-handover",
        "--wait=true",
        "--timeout=60s",
    ]);

    // Uninstalling keeps the CRDs and every VpnProvider.
    lab.helm(&[
        "uninstall",
        "cloak",
        "--namespace",
        CLOAK_NAMESPACE,
        "--wait",
        "--timeout",
        "120s",
    ])
    .unwrap();
    for crd in ["vpnproviders.cloak.dev", "vpnmasks.cloak.dev"] {
        lab.kubectl(&["get", "crd", crd]);
    }
    // ... and nothing of cloak node on the nodes: no plugin in the conflist or the CNI binary
    // directory, no table, no link to an exit.
    for k in 1..=2 {
        let node = layout::node_name(k);
        let dir = lab.lab.node_dir(k);
        for entry in std::fs::read_dir(dir.join("cni")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(!text.contains("\"cloak\""), "{}: {text}", path.display());
        }
        assert!(
            !dir.join("cni-bin/cloak").exists(),
            "{node}: the plugin binary stayed"
        );
        let tables = lab.exec_in(&node, &["nft", "list", "tables"]).unwrap();
        assert!(!tables.contains("cloak_gateway"), "{node}: {tables}");
        // The guard stays while an exit pod runs there: the gateways, and so their exits,
        // outlive an uninstall that keeps the CRDs.
        let exits_here = lab.kubectl(&[
            "get",
            "pods",
            "-A",
            "-l",
            "cloak.dev/exit",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "name",
        ]);
        assert_eq!(
            tables.contains("cloak_guard"),
            !exits_here.trim().is_empty(),
            "{node}: exit pods [{exits_here}], tables {tables}"
        );
        let links = lab.exec_in(&node, &["ip", "-o", "link", "show"]).unwrap();
        assert!(!links.contains(": ckx"), "{node}: {links}");
    }
    let providers = lab.json(&["-n", DEMO_NAMESPACE, "get", "vpnproviders"]);
    let names: Vec<String> = providers["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| str_at(p, "/metadata/name"))
        .collect();
    assert_eq!(
        names,
        [
            "chain-alpha",
            "chain-beta",
            "chain-gamma",
            "gw-alpha",
            "gw-beta",
            "ovpn-gamma",
            "wg-alpha",
            "wg-beta",
            "wg-delta"
        ]
    );

    // Back as the lab installed it, for the other tests.
    let mut args: Vec<&str> = vec!["install", "cloak", &chart, "--namespace", CLOAK_NAMESPACE];
    for value in cloak_lab::HELM_VALUES {
        args.extend(["--set", value]);
    }
    args.extend(["--wait", "--timeout", "180s"]);
    lab.helm(&args).unwrap();
}

#[test]
fn a_pod_owning_a_mask_makes_it_active_and_its_slot_is_released_only_once_the_pod_is_gone() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let ns = lab.namespace("owner");
    let status = ready_mask(lab, &ns, "m", "us");
    let provider = str_at(&status, "/provider/name");
    let slot = status["provider"]["slot"].as_u64().unwrap();
    let reservation = format!("cloak-slot-{provider}-{slot}");
    let uid = lab.kubectl(&[
        "-n",
        &ns,
        "get",
        "vpnmask",
        "m",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    // The container ignores SIGTERM, so the kubelet keeps the pod for its whole grace period.
    lab.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: holder
  namespace: {ns}
  ownerReferences:
    - {{apiVersion: cloak.dev/v1alpha1, kind: VpnMask, name: m, uid: "{uid}", blockOwnerDeletion: true}}
spec:
  terminationGracePeriodSeconds: 8
  containers:
    - name: c
      image: cloak.dev/lab/client:dev
      imagePullPolicy: Never
      command: [sh, -c, 'trap "" TERM; while true; do sleep 1; done']
"#
    ));
    eventually(
        "the pod Running and the mask Active",
        Duration::from_mins(1),
        || {
            let pod = lab.json(&["-n", &ns, "get", "pod", "holder"]);
            let phase = lab.kubectl(&[
                "-n",
                &ns,
                "get",
                "vpnmask",
                "m",
                "-o",
                "jsonpath={.status.phase}",
            ]);
            if str_at(&pod, "/status/phase") == "Running" && phase == "Active" {
                Ok(())
            } else {
                Err(format!(
                    "pod {}, mask {phase}",
                    str_at(&pod, "/status/phase")
                ))
            }
        },
    );

    lab.kubectl(&["-n", &ns, "delete", "vpnmask", "m", "--wait=false"]);
    // While the kubelet still runs the terminating pod, the slot stays reserved.
    let mut checked_while_terminating = 0;
    let deadline = Instant::now() + Duration::from_mins(1);
    while let Ok(text) = lab.try_kubectl(&["-n", &ns, "get", "pod", "holder", "-o", "json"]) {
        let holder: Value = serde_json::from_str(&text).unwrap();
        if !holder["metadata"]["deletionTimestamp"].is_null() {
            let reserved = lab.try_kubectl(&["-n", DEMO_NAMESPACE, "get", "lease", &reservation]);
            // The pod may vanish between the two reads; only a pod still there counts.
            if lab
                .try_kubectl(&["-n", &ns, "get", "pod", "holder"])
                .is_ok()
            {
                assert!(
                    reserved.is_ok(),
                    "slot {reservation} released while pod holder still terminates"
                );
                checked_while_terminating += 1;
            }
        }
        assert!(Instant::now() < deadline, "pod holder was never deleted");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        checked_while_terminating >= 3,
        "the pod was seen terminating only {checked_while_terminating} times: the grace period did not hold it"
    );
    eventually(
        "the slot released and the mask gone",
        Duration::from_mins(1),
        || {
            let reserved = lab
                .try_kubectl(&["-n", DEMO_NAMESPACE, "get", "lease", &reservation])
                .is_ok();
            let mask = lab.try_kubectl(&["-n", &ns, "get", "vpnmask", "m"]).is_ok();
            if reserved || mask {
                Err(format!("reservation there: {reserved}, mask there: {mask}"))
            } else {
                Ok(())
            }
        },
    );
}

/// The exit address the echo service last saw for the example client, if seen after `since`.
fn client_exit_since(lab: &lab::TestLab, since: u64) -> Result<String, String> {
    match lab.lab.echo_seen().get("cloak-demo/client") {
        Some((ip, at)) if *at >= since => Ok(ip.clone()),
        other => Err(format!("echo record {other:?}")),
    }
}

#[test]
fn the_agent_container_egresses_with_the_providers_exit_address() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let alpha = layout::PROVIDERS[0];
    eventually(
        "client pod Ready (its agent's /readyz)",
        Duration::from_secs(90),
        || {
            let pod = lab.json(&["-n", DEMO_NAMESPACE, "get", "pod", "client"]);
            if ready(&pod) {
                Ok(())
            } else {
                Err(format!("{}", pod["status"]["conditions"]))
            }
        },
    );
    let since = now();
    let exit = eventually(
        "the echo service sees the client",
        Duration::from_secs(30),
        || client_exit_since(lab, since),
    );
    assert_eq!(
        exit,
        alpha.exit(),
        "the client's egress is the provider's exit address"
    );
    let asked = lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "exec",
        "client",
        "-c",
        "client",
        "--",
        "sh",
        "-c",
        "printf 'GET /ip HTTP/1.0\\r\\n\\r\\n' | nc -w 3 203.0.113.10 80 | tail -n 1",
    ]);
    assert_eq!(asked.trim(), alpha.exit());
}

/// nftables counters on a node for what the pod at `pod_ip` sends: to the VPN servers (the
/// tunnel's packets) and to anything else that is not the cluster (leaks).
struct NodeCounters<'a> {
    lab: &'a lab::TestLab,
    node: String,
}

impl<'a> NodeCounters<'a> {
    fn install(lab: &'a lab::TestLab, node: &str, pod_ip: &str) -> Self {
        let script = format!(
            "table ip cloak_test_leaks {{\n  counter tunnel {{}}\n  counter leaked {{}}\n  chain pre {{\n    type filter hook prerouting priority -400; policy accept;\n    iifname \"lan0\" return\n    ip saddr {pod_ip} ip daddr 192.0.2.0/24 counter name tunnel\n    ip saddr {pod_ip} ip daddr != {{ 192.0.2.0/24, {pods}, {services} }} counter name leaked\n  }}\n}}\n",
            pods = layout::POD_CIDR,
            services = layout::SERVICE_CIDR,
        );
        lab.nft(node, &script);
        Self {
            lab,
            node: node.to_owned(),
        }
    }

    fn read(&self, name: &str) -> u64 {
        self.lab
            .nft_packets(&self.node, "ip", "cloak_test_leaks", name)
    }
}

impl Drop for NodeCounters<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec_in(
            &self.node,
            &["nft", "delete", "table", "ip", "cloak_test_leaks"],
        );
    }
}

#[test]
fn nothing_leaves_the_node_outside_the_tunnel_while_the_provider_is_unreachable() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let pod = eventually("client pod Ready", Duration::from_secs(90), || {
        let pod = lab.json(&["-n", DEMO_NAMESPACE, "get", "pod", "client"]);
        if ready(&pod) {
            Ok(pod)
        } else {
            Err("not Ready".into())
        }
    });
    let node = str_at(&pod, "/spec/nodeName");
    let pod_ip = str_at(&pod, "/status/podIP");
    let counters = NodeCounters::install(lab, &node, &pod_ip);
    // The provider drops off the internet: the internet's router drops everything to and from
    // its servers (a link taken down would also take its routes with it for good).
    let alpha = layout::PROVIDERS[0];
    let outage = lab::Outage::start(
        lab,
        &(1..=alpha.servers)
            .map(|k| alpha.server(k))
            .collect::<Vec<_>>(),
    );
    // The client keeps asking the echo service every 5 s and the agent keeps retrying its
    // server: 20 s covers the agent's probe failures, its reconnects and several client tries.
    std::thread::sleep(Duration::from_secs(20));
    let (tunnel, leaked) = (counters.read("tunnel"), counters.read("leaked"));
    drop(outage);
    assert!(
        tunnel > 0,
        "the counters saw none of the pod's tunnel packets: they are blind"
    );
    assert_eq!(
        leaked, 0,
        "packets left the pod outside its tunnel while the provider was gone"
    );
    let since = now();
    let exit = eventually("the client reconnected", Duration::from_secs(90), || {
        client_exit_since(lab, since)
    });
    assert_eq!(exit, layout::PROVIDERS[0].exit());
}

#[test]
fn rotated_credentials_in_the_providers_secret_reach_the_running_pod_which_reconnects() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let alpha = layout::PROVIDERS[0];
    let secret = format!("{}-credentials", alpha.name);
    let rotate_to = |k: u8| {
        let conf = cloak_lab::client_config(&lab.lab, &alpha, k).unwrap();
        let patch = serde_json::json!({"stringData": {"wg0.conf": conf}}).to_string();
        lab.kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "patch",
            "secret",
            &secret,
            "--type=merge",
            "-p",
            &patch,
        ]);
    };
    let logs_since = |t: &str| {
        lab.try_kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "logs",
            "client",
            "-c",
            "agent",
            &format!("--since-time={t}"),
        ])
        .unwrap_or_default()
    };
    let started = lab.kubectl(&["get", "--raw", "/version"]);
    assert!(!started.is_empty());
    let stamp = || {
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap()
    };
    // Rotates the Secret to server `k` and waits until the agent connects to it.
    let rotate_and_reconnect = |k: u8| {
        let t = stamp();
        rotate_to(k);
        let endpoint = format!("endpoint {}:{}", alpha.server(k), alpha.port(k));
        eventually(
            &format!("the agent connects to server {k}"),
            Duration::from_secs(90),
            || {
                if logs_since(&t).contains(&endpoint) {
                    Ok(())
                } else {
                    Err("not yet".into())
                }
            },
        );
    };
    rotate_and_reconnect(2);
    let since = now();
    let exit = eventually(
        "the client's traffic flows again",
        Duration::from_mins(1),
        || client_exit_since(lab, since),
    );
    assert_eq!(exit, alpha.exit());
    // Back to server 1 for the other tests.
    rotate_and_reconnect(1);
}

/// The web page through the host's forwarded port 8080, from the external client namespace.
fn web_page_from_ext(lab: &lab::TestLab) -> Result<String, String> {
    let url = format!("http://{}:8080/", layout::HOST_EXTERNAL);
    lab.exec_in("ext", &["curl", "-s", "-m", "3", &url])
}

/// One UDP exchange from the external client namespace.
fn udp_from_ext(lab: &lab::TestLab, to: &str, payload: &str) -> Result<String, String> {
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\ns.sendto(b'{payload}',('{to}',5353))\nprint(s.recvfrom(200)[0].decode())\n"
    );
    lab.exec_in("ext", &["python3", "-c", &script])
        .map(|s| s.trim().to_owned())
}

fn forwarded_nodes(lab: &lab::TestLab) -> String {
    lab.exec_in(
        "host",
        &["nft", "list", "map", "ip", "cloak_portfwd", "fwd_tcp"],
    )
    .unwrap_or_default()
}

#[test]
fn portfwd_in_the_host_namespace_reaches_an_annotated_nodeport_service_over_tcp_and_udp() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let page = eventually(
        "http through the host's port 8080",
        Duration::from_mins(1),
        || web_page_from_ext(lab),
    );
    assert_eq!(page.trim(), "hello from the cloak lab");
    let echoed = eventually(
        "udp through the host's port 5353",
        Duration::from_secs(30),
        || udp_from_ext(lab, layout::HOST_EXTERNAL, "ping"),
    );
    assert_eq!(echoed, "ping");

    // A node marked excluded gets nothing; unmarked, it is back.
    let n2 = layout::node_ip(2);
    assert!(
        forwarded_nodes(lab).contains(&n2),
        "{}",
        forwarded_nodes(lab)
    );
    lab.kubectl(&[
        "annotate",
        "node",
        "n2",
        "cloak.dev/exclude=true",
        "--overwrite",
    ]);
    eventually(
        "n2 dropped from the forwards",
        Duration::from_secs(30),
        || {
            let map = forwarded_nodes(lab);
            if map.contains(&n2) || !map.contains(&layout::node_ip(1)) {
                Err(map)
            } else {
                Ok(())
            }
        },
    );
    for _ in 0..4 {
        let page = web_page_from_ext(lab);
        assert_eq!(
            page.map(|p| p.trim().to_owned()),
            Ok("hello from the cloak lab".to_owned())
        );
    }
    lab.kubectl(&["annotate", "node", "n2", "cloak.dev/exclude-"]);
    eventually("n2 forwarded again", Duration::from_secs(30), || {
        let map = forwarded_nodes(lab);
        if map.contains(&n2) { Ok(()) } else { Err(map) }
    });
}

/// A provider in `ns` whose Secret holds `wg0_conf`, verified within `timeout`, re-verified
/// every `interval` when given.
fn provider_with(lab: &lab::TestLab, ns: &str, name: &str, wg0_conf: &str, interval: Option<&str>) {
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-credentials"), "namespace": ns},
        "stringData": {"wg0.conf": wg0_conf},
    });
    lab.apply(&secret.to_string());
    let mut verify = serde_json::json!({"timeout": "40s"});
    if let Some(interval) = interval {
        verify["interval"] = interval.into();
    }
    let provider = serde_json::json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"secret": format!("{name}-credentials"), "maxSlots": 2, "tags": [name],
                 "namespaces": [ns], "verify": verify},
    });
    lab.apply(&provider.to_string());
}

fn provider_phase(lab: &lab::TestLab, ns: &str, name: &str, want: &str, within: Duration) -> Value {
    eventually(&format!("provider {ns}/{name} {want}"), within, || {
        let p = lab.json(&["-n", ns, "get", "vpnprovider", name]);
        if str_at(&p, "/status/phase") == want {
            Ok(p["status"].clone())
        } else {
            Err(format!(
                "{}: {}",
                str_at(&p, "/status/phase"),
                str_at(&p, "/status/message")
            ))
        }
    })
}

#[test]
fn native_credentials_are_verified_by_a_real_pod_a_wrong_key_fails_naming_the_cause_and_a_fix_is_retried()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    // The examples' providers (WireGuard and OpenVPN) passed through verification pods.
    for p in layout::PROVIDERS {
        let status = eventually(
            &format!("{} verified", p.name),
            Duration::from_mins(2),
            || {
                let status =
                    lab.json(&["-n", DEMO_NAMESPACE, "get", "vpnprovider", p.name])["status"]
                        .clone();
                match str_at(&status, "/phase").as_str() {
                    "Ready" | "Active" => Ok(status),
                    _ => Err(status.to_string()),
                }
            },
        );
        assert!(!status["lastVerified"].is_null(), "{}: {status}", p.name);
        assert_eq!(str_at(&status, "/message"), "credentials verified");
    }
    let ns = lab.namespace("verify");
    let beta = layout::PROVIDERS[1];
    let good = cloak_lab::client_config(&lab.lab, &beta, 1).unwrap();
    let wrong_key = cloak_dataplane::Key::generate();
    let bad: String = good
        .lines()
        .map(|l| {
            if l.starts_with("PrivateKey") {
                format!("PrivateKey = {}", &*wrong_key.to_base64())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    provider_with(lab, &ns, "wrong-key", &bad, None);
    let failed = provider_phase(
        lab,
        &ns,
        "wrong-key",
        "ErrVerifyFailed",
        Duration::from_mins(2),
    );
    let message = str_at(&failed, "/message");
    assert!(
        message.contains("no wireguard handshake") && message.contains(&beta.server(1)),
        "the message names the cause: {message}"
    );
    assert!(failed["lastVerified"].is_null());
    // Fixing the Secret retries the verification, which passes.
    provider_with(lab, &ns, "wrong-key", &good, None);
    provider_phase(lab, &ns, "wrong-key", "Ready", Duration::from_mins(2));
}

#[test]
fn verify_interval_re_verifies_while_masks_keep_their_slots() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let ns = lab.namespace("interval");
    let beta = layout::PROVIDERS[1];
    let good = cloak_lab::client_config(&lab.lab, &beta, 1).unwrap();
    provider_with(lab, &ns, "often", &good, Some("20s"));
    let first = provider_phase(lab, &ns, "often", "Ready", Duration::from_mins(2));
    let status = ready_mask(lab, &ns, "keeper", "often");
    let slot = status["provider"]["slot"].clone();
    let first_verified = str_at(&first, "/lastVerified");
    let later = eventually("a second verification", Duration::from_mins(2), || {
        let p = lab.json(&["-n", &ns, "get", "vpnprovider", "often"]);
        let at = str_at(&p, "/status/lastVerified");
        if !at.is_empty() && at != first_verified {
            Ok(at)
        } else {
            Err(format!(
                "lastVerified {at}, phase {}",
                str_at(&p, "/status/phase")
            ))
        }
    });
    assert!(later > first_verified);
    let mask = lab.json(&["-n", &ns, "get", "vpnmask", "keeper"]);
    assert_eq!(
        str_at(&mask, "/status/phase"),
        "Ready",
        "the mask kept its lease: {mask}"
    );
    assert_eq!(mask["status"]["provider"]["slot"], slot, "and its slot");
}

/// seed 000's README Provider and Mask, word for word, held in vpn-operator's CRDs: `cloak
/// migrate vpn-operator --apply` makes their cloak equivalents, the new provider passes a real
/// verification pod (with the seed's pod label; its gluetun-only container overrides reported
/// as left out, since the lab's Secret holds a native wg0.conf) and the new mask gets a slot.
#[test]
fn seed_000s_provider_and_mask_migrated_by_cloak_verify_and_lease_a_slot() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let fixture = |name: &str| {
        cloak_testkit::repo_path(&format!("crates/cloak/tests/fixtures/vpn-operator/{name}"))
            .display()
            .to_string()
    };
    lab.kubectl(&["apply", "-f", &fixture("crds.yaml")]);
    lab.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/providers.vpn.beebs.dev",
        "crd/masks.vpn.beebs.dev",
        "--timeout=30s",
    ]);
    let beta = layout::PROVIDERS[1];
    let conf = cloak_lab::client_config(&lab.lab, &beta, 1).unwrap();
    lab.apply(
        &serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "my-vpn-credentials", "namespace": "default"},
            "stringData": {"wg0.conf": conf},
        })
        .to_string(),
    );
    lab.kubectl(&[
        "apply",
        "-f",
        &fixture("provider.yaml"),
        "-f",
        &fixture("mask.yaml"),
    ]);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloak"))
        .args([
            "migrate",
            "vpn-operator",
            "--apply",
            "--namespace",
            "default",
        ])
        .env("KUBECONFIG", lab.lab.kubeconfig())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    for field in [
        "containers.init",
        "containers.vpn",
        "containers.probe.image",
    ] {
        assert!(
            stderr.contains(&format!(
                "note: Provider default/my-vpn spec.verify.overrides.{field}: left out"
            )),
            "{field}: {stderr}"
        );
    }

    let status = provider_phase(lab, "default", "my-vpn", "Ready", Duration::from_mins(2));
    assert_eq!(str_at(&status, "/message"), "credentials verified");
    let mask = eventually(
        "the migrated mask holds a slot",
        Duration::from_mins(1),
        || {
            let m = lab.json(&["-n", "default", "get", "vpnmask", "my-mask"]);
            match str_at(&m, "/status/phase").as_str() {
                "Ready" | "Active" => Ok(m),
                other => Err(format!("{other}: {}", str_at(&m, "/status/message"))),
            }
        },
    );
    assert!(!str_at(&mask, "/status/provider/name").is_empty(), "{mask}");
    // The old objects are untouched.
    lab.kubectl(&["-n", "default", "get", "provider.vpn.beebs.dev", "my-vpn"]);
    lab.kubectl(&["-n", "default", "get", "mask.vpn.beebs.dev", "my-mask"]);

    lab.kubectl(&[
        "-n",
        "default",
        "delete",
        "vpnmask",
        "my-mask",
        "--wait=true",
    ]);
    lab.kubectl(&[
        "-n",
        "default",
        "delete",
        "vpnprovider",
        "my-vpn",
        "--wait=true",
    ]);
    lab.kubectl(&["-n", "default", "delete", "secret", "my-vpn-credentials"]);
    lab.kubectl(&["delete", "-f", &fixture("crds.yaml"), "--wait=true"]);
}
