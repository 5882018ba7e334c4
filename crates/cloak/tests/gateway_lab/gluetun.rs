//! A VPN account as a gluetun user holds it, run by cloak's own data plane: the example provider
//! `wg-delta` of `examples/lab/70-gluetun.yaml` (a Secret of gluetun's variables and a server
//! list in gluetun's format) whose servers, like a commercial service's, all accept the account's
//! one address on one port.

use std::time::Duration;

use cloak_lab::{DEMO_NAMESPACE, layout};
use serde_json::Value;

use super::lab;
use lab::{eventually, str_at};

const PROVIDER: &str = "wg-delta";

fn delta() -> &'static layout::Provider {
    layout::PROVIDERS.iter().find(|p| p.gluetun).unwrap()
}

/// The number `k` of a server the list names by its hostname (`wg-delta-3.vpn.lab.test` → 3).
fn server_number(server: &str) -> u8 {
    let p = delta();
    (1..=p.servers)
        .find(|&k| p.server_name(k) == server)
        .unwrap_or_else(|| panic!("{server:?} is not one of {}'s servers", p.name))
}

/// The example provider once verified, with its list's filtered pool.
fn verified_provider(lab: &lab::TestLab) -> Value {
    eventually(
        "the gluetun provider verified",
        Duration::from_mins(2),
        || {
            let status =
                lab.json(&["-n", DEMO_NAMESPACE, "get", "vpnprovider", PROVIDER])["status"].clone();
            match str_at(&status, "/phase").as_str() {
                "Ready" | "Active" => Ok(status),
                _ => Err(status.to_string()),
            }
        },
    )
}

/// A gateway of `count` exits on the gluetun provider's slots.
fn gateway_yaml(name: &str, count: u32) -> String {
    format!(
        "apiVersion: cloak.dev/v1alpha1\nkind: VpnGateway\nmetadata:\n  name: {name}\n  namespace: {DEMO_NAMESPACE}\nspec:\n  exits:\n    count: {count}\n    providers: [gluetun]\n    drainGrace: 5s\n"
    )
}

/// Gateway `name`'s exits as its status has them now.
fn exits_now(lab: &lab::TestLab, name: &str) -> Vec<Value> {
    let gw = lab.json(&["-n", DEMO_NAMESPACE, "get", "vpngateway", name]);
    gw["status"]["exits"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Gateway `name`'s exits once there are `count` of them, all healthy.
fn healthy_exits(lab: &lab::TestLab, name: &str, count: usize, limit: Duration) -> Vec<Value> {
    eventually(
        &format!("gateway {name} has {count} healthy exits"),
        limit,
        || {
            let exits = exits_now(lab, name);
            if exits.len() == count && exits.iter().all(|e| e["health"] == "Healthy") {
                Ok(exits)
            } else {
                Err(format!("{exits:?}"))
            }
        },
    )
}

/// Deletes gateway `name` and waits until its exits' masks are gone (their slots free).
struct Gateway<'a> {
    lab: &'a lab::TestLab,
    name: &'a str,
}

impl Drop for Gateway<'_> {
    fn drop(&mut self) {
        let _ = self.lab.try_kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "delete",
            "vpngateway",
            self.name,
            "--wait=true",
            "--timeout=120s",
        ]);
    }
}

#[test]
fn a_gluetun_secret_with_a_server_list_is_verified_natively_and_a_gateways_exits_take_different_servers_moving_on_within_the_filter()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    let p = delta();
    // Verified by the agent's own tunnel: the lab has no gluetun image, so a verification that
    // passed ran cloak's. The pool is the filter's three Dutch servers of the list's four.
    let status = verified_provider(lab);
    assert_eq!(str_at(&status, "/message"), "credentials verified");
    assert_eq!(status["serverList"]["servers"], 3, "{status}");
    assert!(
        str_at(&status, "/serverList/source")
            .starts_with("configmap/wg-delta-servers/servers.json@"),
        "{status}"
    );
    let dutch: Vec<u8> = (1..=p.servers)
        .filter(|&k| layout::GLUETUN_LOCATIONS[usize::from(k) - 1].0 == "Netherlands")
        .collect();
    assert_eq!(dutch.len(), 3);

    let name = "gluetun";
    lab.apply(&gateway_yaml(name, 2));
    let _gateway = Gateway { lab, name };
    // Both exits carry traffic (their health is their own echo watch through the tunnel), each
    // on its own server; the Secret gives both the account's one address, which every server of
    // the lab's gluetun provider accepts.
    let exits = healthy_exits(lab, name, 2, Duration::from_mins(3));
    let servers: Vec<u8> = exits
        .iter()
        .map(|e| server_number(&str_at(e, "/server")))
        .collect();
    assert_ne!(servers[0], servers[1], "{exits:?}");
    assert!(servers.iter().all(|k| dutch.contains(k)), "{servers:?}");
    for exit in &exits {
        assert_eq!(str_at(exit, "/provider"), PROVIDER, "{exit}");
    }

    // The first exit's server dies: that exit moves to the one Dutch server nobody uses, the
    // other keeps its own.
    let (lost, kept) = (&exits[0], &exits[1]);
    let lost_name = str_at(lost, "/name");
    let started = std::time::Instant::now();
    let outage = lab::Outage::start(lab, &[p.server(servers[0])]);
    let spare = *dutch.iter().find(|k| !servers.contains(k)).unwrap();
    let moved = eventually(
        "the exit whose server died moves to the filter's spare server",
        Duration::from_mins(4),
        || {
            let exits = exits_now(lab, name);
            let exit = exits
                .iter()
                .find(|e| str_at(e, "/name") == lost_name)
                .cloned()
                .unwrap_or_default();
            if str_at(&exit, "/server") == p.server_name(spare) && exit["health"] == "Healthy" {
                Ok(exits)
            } else {
                Err(format!("{exits:?}"))
            }
        },
    );
    eprintln!(
        "the exit moved to the filter's next server and was healthy in {:?}",
        started.elapsed()
    );
    drop(outage);
    let kept_now = moved
        .iter()
        .find(|e| str_at(e, "/name") == str_at(kept, "/name"))
        .unwrap();
    assert_eq!(
        str_at(kept_now, "/server"),
        str_at(kept, "/server"),
        "the other exit moved too: {moved:?}"
    );
}

/// The lab's server list file, put back when dropped.
struct ListFile {
    path: std::path::PathBuf,
    good: Vec<u8>,
}

impl Drop for ListFile {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.good);
    }
}

#[test]
fn a_server_list_url_in_the_labs_internet_is_fetched_and_a_failed_refresh_keeps_the_last_good_list()
{
    let lab = lab::shared();
    let _turn = lab::serial();
    let p = delta();
    // Its own namespace and Secret: the example's account, filtered to the Swiss server, the
    // one no other test here uses.
    let ns = lab.namespace("gluetun-url");
    let example = lab.json(&["-n", DEMO_NAMESPACE, "get", "secret", "wg-delta-gluetun"]);
    let mut data = example["data"].as_object().cloned().unwrap();
    // "Switzerland", base64.
    data.insert(
        "SERVER_COUNTRIES".into(),
        Value::String("U3dpdHplcmxhbmQ=".into()),
    );
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "zurich", "namespace": ns},
        "data": data,
    });
    lab.apply(&secret.to_string());
    let url = format!("http://{}/files/servers.json", layout::ECHO);
    lab.apply(&format!(
        "apiVersion: cloak.dev/v1alpha1\nkind: VpnProvider\nmetadata:\n  name: zurich\n  namespace: {ns}\nspec:\n  secret: zurich\n  serverList:\n    url: {url}\n    refreshInterval: 1m\n  maxSlots: 1\n  tunnel: wireguard\n  verify:\n    timeout: 45s\n"
    ));
    let status = |lab: &lab::TestLab| {
        lab.json(&["-n", &ns, "get", "vpnprovider", "zurich"])["status"].clone()
    };
    let fetched = eventually(
        "the provider verified with the fetched list",
        Duration::from_mins(2),
        || {
            let s = status(lab);
            if s["phase"] == "Ready" {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    let list = &fetched["serverList"];
    assert_eq!(list["servers"], 1, "{fetched}");
    // Read from the provider's copy of what the URL served.
    assert!(
        str_at(list, "/source").starts_with("configmap/zurich-server-list/"),
        "{fetched}"
    );
    assert!(!str_at(list, "/fetched").is_empty(), "{fetched}");
    let hash = str_at(list, "/hash");
    assert_eq!(hash.len(), 64, "{fetched}");
    let copy = lab.json(&["-n", &ns, "get", "configmap", "zurich-server-list"]);
    assert!(
        str_at(&copy, "/data/servers.json").contains(&p.server(4)),
        "{copy}"
    );

    // The list's server answers garbage: the next fetch fails, says so, and the last good list
    // stays in use (the provider stays Ready with its one server).
    let file = ListFile {
        path: cloak_lab::server_list_file(&lab.lab),
        good: std::fs::read(cloak_lab::server_list_file(&lab.lab)).unwrap(),
    };
    std::fs::write(&file.path, b"<html>maintenance</html>").unwrap();
    let failed = eventually(
        "a failed refresh is reported",
        Duration::from_mins(3),
        || {
            let s = status(lab);
            if str_at(&s, "/serverList/fetchError").is_empty() {
                Err(s.to_string())
            } else {
                Ok(s)
            }
        },
    );
    assert_eq!(str_at(&failed, "/phase"), "Ready", "{failed}");
    assert_eq!(failed["serverList"]["servers"], 1, "{failed}");
    assert_eq!(str_at(&failed, "/serverList/hash"), hash, "{failed}");
    let copy_now = lab.json(&["-n", &ns, "get", "configmap", "zurich-server-list"]);
    assert_eq!(copy_now["data"], copy["data"]);

    // Served again: the next fetch clears the error.
    drop(file);
    eventually(
        "a good fetch clears the error",
        Duration::from_mins(3),
        || {
            let s = status(lab);
            if str_at(&s, "/serverList/fetchError").is_empty() {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );
    lab.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}
