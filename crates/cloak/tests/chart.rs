//! The Helm chart: lints clean, and every object it renders is accepted by a real kube-apiserver
//! (server-side dry run), with default values and with every toggle flipped.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers, not only #[test] fns

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use cloak_testkit::{ControlPlane, TestNamespace, tool};

/// The chart of the checkout running the test (see `cloak_testkit::repo_path`).
fn chart() -> std::path::PathBuf {
    cloak_testkit::repo_path("charts/cloak")
}

fn run(command: &mut Command, stdin: Option<&str>) -> String {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(pipe);
    let output = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{command:?} failed:\n{out}\n{err}");
    out.into_owned()
}

fn render(namespace: &str, values: &[&str]) -> String {
    let mut helm = Command::new(tool("helm"));
    helm.args(["template", "cloak"])
        .arg(chart())
        .args(["--namespace", namespace]);
    for value in values {
        helm.args(["--set", value]);
    }
    run(&mut helm, None)
}

fn server_dry_run(kubeconfig: &Path, namespace: &str, manifest: &str) -> String {
    run(
        Command::new(tool("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=chart-test",
                "--dry-run=server",
                "--namespace",
                namespace,
                "-f",
                "-",
            ]),
        Some(manifest),
    )
}

#[test]
fn the_chart_lints_clean() {
    run(
        Command::new(tool("helm"))
            .args(["lint", "--strict"])
            .arg(chart()),
        None,
    );
}

#[tokio::test]
async fn every_rendered_object_is_accepted_by_the_api_server() {
    let cp = ControlPlane::shared();
    let ns = TestNamespace::create(&cp.client(), "chart").await.unwrap();
    let manifest = render(ns.name(), &[]);
    let applied = server_dry_run(cp.kubeconfig(), ns.name(), &manifest);
    for kind in [
        "customresourcedefinition.apiextensions.k8s.io/vpnproviders.cloak.dev",
        "customresourcedefinition.apiextensions.k8s.io/vpnmasks.cloak.dev",
        "serviceaccount/cloak",
        "clusterrole.rbac.authorization.k8s.io/cloak",
        "clusterrolebinding.rbac.authorization.k8s.io/cloak",
        "role.rbac.authorization.k8s.io/cloak-leader-election",
        "rolebinding.rbac.authorization.k8s.io/cloak-leader-election",
        "deployment.apps/cloak",
    ] {
        assert!(applied.contains(kind), "{kind} missing from:\n{applied}");
    }
}

#[tokio::test]
async fn toggles_render_objects_the_api_server_accepts() {
    let cp = ControlPlane::shared();
    let ns = TestNamespace::create(&cp.client(), "chart-toggles")
        .await
        .unwrap();
    let manifest = render(
        ns.name(),
        &[
            "crds.install=false",
            "rbac.create=false",
            "serviceAccount.create=false",
            "prometheus.expose=false",
        ],
    );
    assert!(!manifest.contains("CustomResourceDefinition") && !manifest.contains("ClusterRole"));
    assert!(!manifest.contains("prometheus.io/scrape"));
    server_dry_run(cp.kubeconfig(), ns.name(), &manifest);

    let with_monitor = render(
        ns.name(),
        &[
            "prometheus.podMonitors=true",
            "prometheus.labels.release=kps",
        ],
    );
    assert!(with_monitor.contains("kind: PodMonitor") && with_monitor.contains("release: kps"));
}

#[test]
fn the_charts_crds_are_the_generated_ones_marked_keep() {
    let chart_copy = std::fs::read_to_string(chart().join("files/crds.yaml")).unwrap();
    let generated =
        std::fs::read_to_string(cloak_testkit::repo_path("deploy/crds/cloak.dev.yaml")).unwrap();
    assert!(
        chart_copy == generated,
        "charts/cloak/files/crds.yaml drifted: copy deploy/crds/cloak.dev.yaml over it"
    );
    let rendered = render("default", &[]);
    // One per CRD: VpnProvider, VpnMask, VpnGateway, VpnChain.
    assert_eq!(
        rendered.matches("helm.sh/resource-policy: keep").count(),
        cloak_api::crds().len()
    );
}

/// The chart's RBAC is enough for the operator: applied for real, then the operator runs as the
/// chart's ServiceAccount (impersonated) with leader election, leases a slot, verifies a
/// provider with a pod, and publishes Events. A missing verb fails this test.
#[tokio::test]
async fn the_operator_works_with_exactly_the_charts_rbac() {
    use cloak_api::{MaskPhase, VpnMask, VpnMaskSpec, VpnProvider};
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};

    let cp = ControlPlane::shared();
    let admin = cp.client();
    let ns = TestNamespace::create(&admin, "chart-rbac").await.unwrap();
    let ns = ns.name().to_owned();
    let manifest = render(&ns, &["crds.install=false"]);
    let mut apply = Command::new(tool("kubectl"));
    apply.arg("--kubeconfig").arg(cp.kubeconfig()).args([
        "apply",
        "--server-side",
        "--namespace",
        &ns,
        "-f",
        "-",
    ]);
    // Only the RBAC objects and the ServiceAccount: no kubelet would run the Deployment here.
    let rbac: String = manifest
        .split("\n---")
        .filter(|doc| !doc.contains("kind: Deployment"))
        .collect::<Vec<_>>()
        .join("\n---");
    run(&mut apply, Some(&rbac));

    let config = cloak_operator::Config {
        instance: "rbac-test".into(),
        leader_lease: Some((ns.clone(), "cloak".into())),
        ..cloak_operator::Config::default()
    };
    let client = cp.client_as(&format!("system:serviceaccount:{ns}:cloak"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(Box::pin(cloak_operator::run(client, config, async {
        let _ = stopped.await;
    })));

    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "creds"}, "stringData": {}, "data": {"VPN_SERVICE_PROVIDER": "bXVsbHZhZA=="}
    }))
    .unwrap();
    Api::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let providers: Api<VpnProvider> = Api::namespaced(admin.clone(), &ns);
    let provider = |name: &str, skip: bool| -> VpnProvider {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name},
            "spec": {"secret": "creds", "maxSlots": 2, "namespaces": [ns], "verify": {"skip": skip}}
        }))
        .unwrap()
    };
    providers
        .create(&PostParams::default(), &provider("skipped", true))
        .await
        .unwrap();
    providers
        .create(&PostParams::default(), &provider("verified", false))
        .await
        .unwrap();
    let masks: Api<VpnMask> = Api::namespaced(admin.clone(), &ns);
    masks
        .create(
            &PostParams::default(),
            &VpnMask::new("m", VpnMaskSpec::default()),
        )
        .await
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let mask_ready =
            masks.get("m").await.unwrap().status.and_then(|s| s.phase) == Some(MaskPhase::Ready);
        let verifying = pods.get_opt("verified-verify").await.unwrap().is_some();
        let copied = masks
            .get("m")
            .await
            .unwrap()
            .status
            .and_then(|s| s.provider)
            .is_some();
        if mask_ready && verifying && copied {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "with the chart's RBAC: mask Ready {mask_ready}, verification pod {verifying}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let _ = stop.send(());
    operator.await.unwrap().unwrap();
}

/// The PodMonitor, the PrometheusRule and the dashboard's ConfigMap, checked against the
/// prometheus-operator's own CRDs (generated from its Go types by `tools/build-prometheus.sh`):
/// accepted as rendered, and a rule the schema forbids is refused (so the check can fail).
#[tokio::test]
async fn monitoring_objects_are_accepted_by_the_prometheus_operators_crds() {
    let cp = ControlPlane::shared();
    let crds = cloak_testkit::controlplane::prometheus_dir()
        .unwrap()
        .join("crds");
    let kubectl = || {
        let mut c = Command::new(tool("kubectl"));
        c.arg("--kubeconfig").arg(cp.kubeconfig());
        c
    };
    run(
        kubectl()
            .args(["apply", "--server-side", "--field-manager=chart-test", "-f"])
            .arg(&crds),
        None,
    );
    run(
        kubectl().args([
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/podmonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ]),
        None,
    );
    let ns = TestNamespace::create(&cp.client(), "chart-monitoring")
        .await
        .unwrap();
    let manifest = render(
        ns.name(),
        &[
            "prometheus.podMonitors=true",
            "prometheus.scrapeExits=true",
            "prometheus.rules=true",
            "prometheus.dashboard=true",
            "prometheus.labels.release=kps",
        ],
    );
    let applied = server_dry_run(cp.kubeconfig(), ns.name(), &manifest);
    for object in [
        "podmonitor.monitoring.coreos.com/cloak ",
        "podmonitor.monitoring.coreos.com/cloak-exits",
        "secret/cloak-metrics-token",
        "prometheusrule.monitoring.coreos.com/cloak",
        "configmap/cloak-dashboard",
    ] {
        assert!(
            applied.contains(object),
            "{object} missing from:\n{applied}"
        );
    }
    assert!(manifest.contains("grafana_dashboard: \"1\""), "{manifest}");
    // Exits are scraped only when asked: no token, no exits' PodMonitor, no operator mount.
    let without = render(ns.name(), &["prometheus.podMonitors=true"]);
    assert!(
        !without.contains("cloak-metrics-token") && !without.contains("cloak-exits"),
        "{without}"
    );
    assert!(manifest.contains("CLOAK_METRICS_TOKEN_FILE"), "{manifest}");
    assert!(
        manifest.contains("alert: CloakGatewayNoHealthyExit"),
        "{manifest}"
    );

    let broken = manifest.replacen("for: 1m", "for: soon", 1);
    assert_ne!(broken, manifest);
    let refused = kubectl()
        .args([
            "apply",
            "--server-side",
            "--field-manager=chart-test",
            "--dry-run=server",
            "--namespace",
            ns.name(),
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = refused;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(broken.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("PrometheusRule"),
        "a rule with `for: soon` was accepted: {stderr}"
    );
}
