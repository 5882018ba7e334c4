//! The VpnGateway under Multus, end to end in a real lab from `cloak lab up --cni multus` (root):
//! each node's container runtime calls Multus (its thin plugin, built from its Go module), whose
//! configuration holds the bridge list inline as its cluster network, as Multus's DaemonSet
//! writes it. `cloak node` (the chart's DaemonSet) adds its plugin to that inline list, so it
//! runs inside Multus's call at sandbox creation as it does behind the bridge plugin alone.
//! `gateway_lab.rs` covers that CNI and every failure; here: attachment, egress, no leak, DEL,
//! and the spread over three exits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers

mod labkit;

use labkit as lab;

use std::time::Duration;

use cloak_lab::{DEMO_NAMESPACE, layout};
use lab::gateway::*;
use lab::{eventually, str_at};
use serde_json::Value;

/// Multus's annotation on every pod it set up: proof that its ADD ran for the pod.
const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";

fn plugin_types(list: &Value) -> Vec<String> {
    list["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| str_at(p, "/type"))
        .collect()
}

#[test]
fn under_multus_the_plugin_joins_the_delegated_list_and_pods_on_either_node_egress_only_through_the_exits_and_leave_nothing()
 {
    let lab = lab::shared_under("multus");
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let addresses = exit_addresses(&gw);

    // The runtime reads Multus's file (the first of the directory), written before cloak was
    // installed: cloak's entry is in the cluster network Multus holds inline, last, and not
    // beside Multus itself. (The primary list on disk has it too, for a Multus that copies it
    // again.)
    for k in 1..=2 {
        let dir = lab.lab.node_dir(k).join("cni");
        let read = |file: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap()
        };
        let multus = read("00-multus.conf");
        assert_eq!(multus["type"], "multus", "{multus}");
        assert!(multus.get("plugins").is_none(), "{multus}");
        assert_eq!(
            plugin_types(&multus["delegates"][0]),
            ["bridge", "cloak"],
            "{multus}"
        );
        let primary = read("10-lab.conflist");
        assert_eq!(plugin_types(&primary), ["bridge", "cloak"], "{primary}");
    }

    let nodes: Vec<String> = (1..=2).map(layout::node_name).collect();
    // The example chain's hops are clients too, each made once the hop before it is up.
    healthy_example_chain(lab);
    let settled = settled_client_links(lab, &nodes);
    let before: Vec<(Vec<String>, usize)> = settled
        .into_iter()
        .zip(1..=2)
        .map(|(links, k)| (links, recorded_clients(lab, k)))
        .collect();
    let names: Vec<String> = (1..=2).map(|k| format!("gw-multus-{k}")).collect();
    for (k, name) in (1..=2).zip(&names) {
        let node = layout::node_name(k);
        let pod = running_client_on(lab, name, Some(&node));
        assert_spec_as_written(&pod);
        let status = str_at(
            &pod,
            &format!(
                "/metadata/annotations/{}",
                NETWORK_STATUS.replace('/', "~1")
            ),
        );
        assert!(
            status.contains(&str_at(&pod, "/status/podIP")),
            "Multus set up {name}: {status}"
        );

        let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
        // 30 flows, only through the exits, and both exits carry some.
        assert_spread(
            &format!("{name} on {node}"),
            &ask(lab, name, 30),
            &addresses,
            1,
        );
        assert_reaches_the_cluster(lab, name);
        assert_eq!(leaks.read("leaked6"), 0, "IPv6 left by an uplink");
        leaks.assert_carried_and_none_leaked();
    }

    // Multus's DEL reaches the delegate list: the pods go (none hangs in Terminating), and the
    // node component forgets them, their links and their routes.
    for name in &names {
        delete_client(lab, name);
    }
    eventually(
        "the pods are gone, and their links and records with them",
        Duration::from_mins(1),
        || {
            let left = lab.json(&["-n", DEMO_NAMESPACE, "get", "pods", "-l", "app=gw-test"]);
            let left = left["items"].as_array().map_or(0, Vec::len);
            let now: Vec<(Vec<String>, usize)> = (1..=2)
                .map(|k| {
                    (
                        client_links(lab, &layout::node_name(k)),
                        recorded_clients(lab, k),
                    )
                })
                .collect();
            if left == 0 && now == before {
                Ok(())
            } else {
                Err(format!("{left} pods left; now {now:?}, before {before:?}"))
            }
        },
    );
}

/// A third provider for the example gateway: the OpenVPN pool's other server, so the third exit
/// has an exit address of its own (198.51.100.13) and a tunnel of the other kind.
const THIRD_PROVIDER: &str = "apiVersion: cloak.dev/v1alpha1\nkind: VpnProvider\nmetadata:\n  name: gw-gamma\n  namespace: cloak-demo\nspec:\n  secret: ovpn-gamma-pool\n  maxSlots: 1\n  tags: [gateway]\n  tunnel: openvpn\n  verify:\n    timeout: 45s\n";

#[test]
fn a_hundred_new_flows_spread_over_three_exits_with_none_below_a_fifth() {
    let lab = lab::shared_under("multus");
    let _turn = lab::serial();
    healthy_gateway(lab);
    lab.apply(THIRD_PROVIDER);
    set_exit_count(lab, 3).unwrap();
    // Back to the example's two exits, without the third provider, however this test ends:
    // the other test expects them.
    let _restore = Restore(lab);
    let gw = healthy_gateway_of(lab, 3);
    let addresses = exit_addresses(&gw);
    assert_eq!(
        addresses
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "three exits, three exit addresses: {addresses:?}"
    );
    let name = "gw-three";
    let pod = running_client(lab, name);
    let leaks = Leaks::install(lab, &str_at(&pod, "/status/podIP"));
    let answers = ask(lab, name, 100);
    assert_eq!(answers.len(), 100, "{answers:?}");
    // Each flow picks an exit at random: one of three gets under 20 of 100 in about 0.3 % of
    // runs by chance alone (the target, as it is written).
    let counts = assert_spread(name, &answers, &addresses, 20);
    eprintln!("100 new flows over 3 exits: {counts:?}");
    // The OpenVPN provider's tunnel carries IPv4 alone: IPv6 flows go to the other two only.
    let addresses6 = exit_addresses6(&gateway(lab));
    assert_eq!(addresses6.len(), 2, "{addresses6:?}");
    let counts = assert_spread(name, &ask_to(lab, name, ECHO6, 40), &addresses6, 8);
    eprintln!("40 new IPv6 flows over the 2 exits that carry IPv6: {counts:?}");
    assert_eq!(leaks.read("leaked6"), 0, "IPv6 left by an uplink");
    leaks.assert_carried_and_none_leaked();
}

/// Deletes the test's client, scales the example gateway back to two exits and removes the
/// third provider.
struct Restore<'a>(&'a lab::TestLab);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let lab = self.0;
        delete_client(lab, "gw-three");
        let _ = set_exit_count(lab, 2);
        let _ = lab.try_kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "delete",
            "vpnprovider",
            "gw-gamma",
            "--wait=true",
            "--timeout=60s",
        ]);
        if !std::thread::panicking() {
            healthy_gateway_of(lab, 2);
        }
    }
}
