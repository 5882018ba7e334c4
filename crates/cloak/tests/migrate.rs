//! `cloak migrate vpn-operator` as a user runs it: the binary against a real kube-apiserver that
//! holds vpn-operator's CRDs (written from seed 000's field list) and seed 000's README Provider
//! and Mask, word for word. What it prints, what it applies, what it refuses, and that the old
//! objects are left as they were. (That a migrated provider verifies and a migrated mask gets a
//! slot is shown in the lab: `lab.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers

use std::{
    io::Write,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use cloak_testkit::{ControlPlane, repo_path, tool};
use serde_json::Value;

fn fixture(name: &str) -> String {
    repo_path(&format!("crates/cloak/tests/fixtures/vpn-operator/{name}"))
        .display()
        .to_string()
}

/// Runs `program args...` against the control plane with `stdin` on its standard input.
fn run(cp: &ControlPlane, program: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn kubectl(cp: &ControlPlane, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(cp, &tool("kubectl"), args, stdin.unwrap_or_default());
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `cloak migrate vpn-operator args...`.
fn migrate(cp: &ControlPlane, args: &[&str], stdin: &str) -> Output {
    let mut all = vec!["migrate", "vpn-operator"];
    all.extend(args);
    run(
        cp,
        std::path::Path::new(env!("CARGO_BIN_EXE_cloak")),
        &all,
        stdin,
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// vpn-operator's CRDs, installed and served.
fn install_old_crds(cp: &ControlPlane) {
    kubectl(cp, &["apply", "-f", &fixture("crds.yaml")], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    for crd in ["providers.vpn.beebs.dev", "masks.vpn.beebs.dev"] {
        loop {
            let established = kubectl(
                cp,
                &[
                    "get",
                    "crd",
                    crd,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
                ],
                None,
            );
            if established == "True" {
                break;
            }
            assert!(Instant::now() < deadline, "{crd} not established");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn seed_000s_provider_and_mask_are_printed_applied_and_left_in_place_and_pods_told_what_to_change()
{
    let cp = ControlPlane::shared();
    install_old_crds(cp);
    // The user's cluster: seed 000's README objects, their Secret (gluetun's variables, as the
    // README shows), an old mask that holds a slot, and a pod that uses it.
    kubectl(
        cp,
        &[
            "apply",
            "-f",
            &fixture("provider.yaml"),
            "-f",
            &fixture("mask.yaml"),
        ],
        None,
    );
    kubectl(
        cp,
        &["apply", "-f", "-"],
        Some(
            r#"{"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "my-vpn-credentials", "namespace": "default"},
                "stringData": {"VPN_SERVICE_PROVIDER": "nordvpn", "OPENVPN_USER": "myuser@mydomain.com",
                               "OPENVPN_PASSWORD": "examplePassword12345", "SERVER_REGIONS": "Netherlands"}}"#,
        ),
    );
    // vpn-operator gave the mask a slot and a copy of the credentials, and a pod uses both.
    kubectl(
        cp,
        &[
            "patch",
            "mask",
            "my-mask",
            "--type",
            "merge",
            "-p",
            r#"{"status": {"phase": "Active", "provider": {"name": "my-vpn", "namespace": "default",
              "uid": "u", "slot": 0, "secret": "my-mask-my-vpn"}}}"#,
        ],
        None,
    );
    let uid = kubectl(
        cp,
        &["get", "mask", "my-mask", "-o", "jsonpath={.metadata.uid}"],
        None,
    );
    kubectl(
        cp,
        &["apply", "-f", "-"],
        Some(&format!(
            r#"{{"apiVersion": "v1", "kind": "Pod",
                "metadata": {{"name": "downloader", "namespace": "default", "ownerReferences": [
                  {{"apiVersion": "vpn.beebs.dev/v1", "kind": "Mask", "name": "my-mask", "uid": "{uid}",
                    "blockOwnerDeletion": true}}]}},
                "spec": {{"containers": [
                  {{"name": "vpn", "image": "qmcgaw/gluetun", "envFrom": [{{"secretRef": {{"name": "my-mask-my-vpn"}}}}]}},
                  {{"name": "app", "image": "busybox"}}]}}}}"#
        )),
    );

    let versions = || {
        kubectl(
            cp,
            &[
                "get",
                "providers.vpn.beebs.dev,masks.vpn.beebs.dev,pods",
                "-o",
                "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion} {end}",
            ],
            None,
        )
    };
    let before = versions();

    // Printed, from the cluster: every field carried over, nothing applied yet.
    let out = migrate(cp, &[], "");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(objects.len(), 2, "{stdout}");
    let provider = &objects[0];
    assert_eq!(provider["apiVersion"], "cloak.dev/v1alpha1");
    assert_eq!(provider["kind"], "VpnProvider");
    assert_eq!(provider["metadata"]["name"], "my-vpn");
    assert_eq!(provider["metadata"]["namespace"], "default");
    assert!(
        provider["metadata"].get("annotations").is_none(),
        "{stdout}"
    );
    let spec = &provider["spec"];
    assert_eq!(spec["secret"], "my-vpn-credentials");
    assert_eq!(spec["maxSlots"], 6);
    assert_eq!(
        spec["tags"],
        serde_json::json!(["default", "preferred", "my-vpn"])
    );
    assert_eq!(spec["verify"]["timeout"], "1m30s");
    assert_eq!(spec["verify"]["interval"], "24h");
    assert!(
        spec["verify"].get("skip").is_none(),
        "false is the default: {stdout}"
    );
    let overrides = &spec["verify"]["overrides"];
    assert_eq!(overrides["pod"]["metadata"]["labels"]["mylabel"], "myvalue");
    // gluetun's variables: cloak verifies them with the same three containers.
    assert_eq!(
        overrides["containers"]["init"]["image"],
        "curlimages/curl:7.88.1"
    );
    assert_eq!(
        overrides["containers"]["vpn"]["image"],
        "qmcgaw/gluetun:latest"
    );
    assert_eq!(overrides["containers"]["vpn"]["imagePullPolicy"], "Always");
    assert_eq!(
        overrides["containers"]["probe"]["image"],
        "curlimages/curl:7.88.1"
    );
    assert_eq!(objects[1]["kind"], "VpnMask");
    assert_eq!(objects[1]["metadata"]["name"], "my-mask");
    assert!(
        !stdout.contains("examplePassword"),
        "no secret value is printed"
    );
    assert!(
        stderr.contains(
            "note: Provider default/my-vpn: vpn-operator's masks still hold 1 of its slots"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("pod default/downloader must change: ownerReference Mask my-mask (vpn.beebs.dev) -> VpnMask my-mask")
            && stderr.contains("pod default/downloader must change: Secret my-mask-my-vpn (mask my-mask's credentials) -> my-mask-vpn-credentials"),
        "{stderr}"
    );
    let none = kubectl(
        cp,
        &["get", "vpnproviders,vpnmasks", "-A", "-o", "name"],
        None,
    );
    assert!(none.trim().is_empty(), "printing applies nothing: {none}");

    // Applied (twice: server-side apply is idempotent): the same objects, the old ones kept.
    for _ in 0..2 {
        let out = migrate(cp, &["--apply", "--namespace", "default"], "");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            "vpnprovider default/my-vpn applied\nvpnmask default/my-mask applied\n"
        );
    }
    let applied: Value = serde_json::from_str(&kubectl(
        cp,
        &[
            "get",
            "vpnprovider",
            "my-vpn",
            "-o",
            "json",
            "--show-managed-fields",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(applied["spec"], provider["spec"]);
    assert_eq!(
        applied["metadata"]["managedFields"][0]["manager"],
        "cloak-migrate"
    );
    kubectl(cp, &["get", "vpnmask", "my-mask"], None);
    // The old objects and the pod are exactly as they were.
    assert_eq!(versions(), before);
    assert!(
        before.contains("Provider/my-vpn=") && before.contains("Pod/downloader="),
        "{before}"
    );
}

#[test]
fn from_a_file_a_field_without_an_equivalent_is_listed_and_a_broken_object_stops_everything() {
    let cp = ControlPlane::shared();
    let provider = std::fs::read_to_string(fixture("provider.yaml")).unwrap();
    let mask = std::fs::read_to_string(fixture("mask.yaml")).unwrap();
    // A newer vpn-operator's field, and a typo.
    let extended = provider.replace(
        "  maxSlots: 6",
        "  maxSlots: 6\n  region: eu\n  verify.skip: true",
    );
    let out = migrate(cp, &["-f", "-", "-f", &fixture("mask.yaml")], &extended);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("kind: VpnProvider") && stdout.contains("kind: VpnMask"),
        "{stdout}"
    );
    for field in ["spec.region", "spec.verify.skip"] {
        assert!(
            stderr.contains(&format!(
                "note: Provider default/my-vpn {field}: no equivalent in cloak; left out"
            )),
            "{field}: {stderr}"
        );
    }
    // No Secret was read (none is in the files): the overrides are kept, with a warning.
    assert!(
        stderr.contains("the credentials Secret was not read"),
        "{stderr}"
    );

    // One object that cannot be migrated: nothing is printed, nothing applied, status 1.
    let broken = format!(
        "{}\n---\n{}",
        provider
            .replace("name: my-vpn", "name: broken")
            .replace("maxSlots: 6", "maxSlots: 0"),
        mask.replace("name: my-mask", "name: fine")
    );
    for args in [&["-f", "-"][..], &["-f", "-", "--apply"][..]] {
        let out = migrate(cp, args, &broken);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(
            stderr.contains(
                "error: Provider default/broken spec.maxSlots: 0 is not a device limit from 1"
            ),
            "{stderr}"
        );
    }
    let none = kubectl(
        cp,
        &["get", "vpnmask", "fine", "--ignore-not-found", "-o", "name"],
        None,
    );
    assert!(none.trim().is_empty(), "half-applied: {none}");

    // An object the API server refuses (a namespace that does not exist) stops the apply before
    // anything is written: the provider before it is not created either.
    let refused = format!(
        "{}\n---\n{}",
        provider.replace("name: my-vpn", "name: first"),
        mask.replace("name: my-mask", "name: lost")
            .replace("namespace: default", "namespace: nowhere")
    );
    let out = migrate(cp, &["-f", "-", "--apply"], &refused);
    assert!(!out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("applying the new objects"),
        "{}",
        text(&out.stderr)
    );
    let none = kubectl(
        cp,
        &[
            "get",
            "vpnprovider",
            "first",
            "--ignore-not-found",
            "-o",
            "name",
        ],
        None,
    );
    assert!(none.trim().is_empty(), "half-applied: {none}");
}
