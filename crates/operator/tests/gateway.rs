//! The VpnGateway controller against a real kube-apiserver: the exits it keeps (a mask each,
//! with a VXLAN identifier of its own, and a pod on a server of the provider's pool), their
//! health in the status and in Events, replacement on the next server, and scale-down. No
//! kubelet runs: the tests bind pods and write their status, playing the scheduler's and the
//! kubelet's part.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_futures)] // test helpers

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use cloak_api::{ExitHealth, VpnChain, VpnGateway, VpnMask, VpnProvider};
use cloak_model::exit;
use cloak_testkit::{ControlPlane, TestNamespace};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Event, Pod, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// A valid wg-quick file for server `n` (the keys are not secret: a fixed test key).
fn server(n: u8) -> String {
    format!(
        "[Interface]\nPrivateKey = wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=\nAddress = 10.64.0.2/32\n\n[Peer]\nPublicKey = wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=\nEndpoint = 192.0.2.{n}:51820\nAllowedIPs = 0.0.0.0/0\n"
    )
}

/// Starts the one operator of this test binary (once), on a runtime of its own. One, as in a
/// cluster: only the leader writes, and exits' VXLAN identifiers are picked by one writer.
fn operator() -> Client {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let cp = ControlPlane::shared();
    STARTED.get_or_init(|| {
        // RUST_LOG=cloak_operator=debug shows what the operator does.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let config = cloak_operator::Config {
            exit_admin_port: Some(exit_agents()),
            instance: "gateway-test-operator".into(),
            verify_ip_url: "http://203.0.113.10/ip".into(),
            agent_image: "cloak.dev/test/cloak:dev".into(),
            intranet: vec!["10.244.0.0/16".parse().unwrap()],
            // The server-list test serves its list on loopback, over plain HTTP.
            allow_http_server_lists: true,
            metrics_token_file: Some(metrics_token_file()),
            ..cloak_operator::Config::default()
        };
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                cloak_operator::run(cp.client(), config, futures::future::pending())
                    .await
                    .unwrap();
            });
        });
    });
    cp.client()
}

/// The metrics reader token the operator reads (written before it starts, changed by a test).
fn metrics_token_file() -> std::path::PathBuf {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let file = dir.join("token");
        std::fs::write(&file, "reader-1\n").unwrap();
        file
    })
    .clone()
}

/// What every exit's agent answers when the operator asks for its public address.
const PUBLIC_ADDRESS: &str = "198.51.100.7";

/// The exits' admin servers, played on loopback (the tests write every exit pod's address as
/// 127.0.0.1): each connection that carries an admin token (a gateway's: 64 hex digits) gets
/// the agent's status answer, any other a 401 as the agent gives. Returns the port.
fn exit_agents() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let mut request = [0_u8; 1024];
            let read = std::io::Read::read(&mut stream, &mut request).unwrap_or(0);
            let text = String::from_utf8_lossy(&request[..read]);
            let token = text
                .lines()
                .find_map(|l| l.strip_prefix("Authorization: Bearer "))
                .map(str::trim);
            if !token.is_some_and(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())) {
                let _ = std::io::Write::write_all(
                    &mut stream,
                    b"HTTP/1.0 401 Unauthorized\r\ncontent-length: 0\r\n\r\n",
                );
                continue;
            }
            let body = format!(
                "{{\"phase\":\"connected\",\"ready\":true,\"exitAddress\":\"{PUBLIC_ADDRESS}\"}}"
            );
            let answer = format!(
                "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut stream, answer.as_bytes());
        }
    });
    port
}

/// The test namespace, and provider `pool` (tag `nl`, `max_slots` slots, verification
/// skipped) whose Secret holds servers `s1`..`s3`.
async fn setup(test: &str, max_slots: u32) -> (Client, TestNamespace) {
    let client = operator();
    let ns = TestNamespace::create(&client, test).await.unwrap();
    let data = (1..=3)
        .map(|n| (format!("s{n}.conf"), ByteString(server(n).into_bytes())))
        .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("creds".into()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let provider: VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": "pool"},
        "spec": {"secret": "creds", "maxSlots": max_slots, "tags": ["nl"],
                 "namespaces": [ns.name()], "verify": {"skip": true}},
    }))
    .unwrap();
    Api::<VpnProvider>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &provider)
        .await
        .unwrap();
    (client, ns)
}

async fn gateway(client: &Client, ns: &str, name: &str, count: u32) {
    gateway_with(
        client,
        ns,
        name,
        json!({"count": count, "providers": ["nl"]}),
    )
    .await;
}

/// Creates gateway `name` whose `spec.exits` is `exits`.
async fn gateway_with(client: &Client, ns: &str, name: &str, exits: serde_json::Value) {
    let gateway: VpnGateway = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway", "metadata": {"name": name},
        "spec": {"exits": exits},
    }))
    .unwrap();
    Api::<VpnGateway>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &gateway)
        .await
        .unwrap();
}

/// Waits until `gateway` has its one exit healthy.
async fn until_healthy(client: &Client, ns: &str, gateway: &str, what: &str) {
    until(client, ns, gateway, what, |g, _| {
        (g.status.as_ref()?.healthy_exits == 1).then_some(())
    })
    .await;
}

/// Polls `check` on the gateway until it returns `Some`, for at most [`WAIT`].
async fn until<T>(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&VpnGateway, &[Pod]) -> Option<T>,
) -> T {
    let gateways: Api<VpnGateway> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + WAIT;
    loop {
        let g = gateways.get(name).await.unwrap();
        let list = pods
            .list(&ListParams::default().labels(&format!("{}={name}", exit::LABEL_GATEWAY)))
            .await
            .unwrap()
            .items;
        if let Some(found) = check(&g, &list) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; status {:#?}",
            g.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Binds `pod` to `node` as the scheduler would.
async fn bind(client: &Client, ns: &str, pod: &str, node: &str) {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    Api::<Pod>::namespaced(client.clone(), ns)
        .create_subresource::<_, serde_json::Value>(
            "binding",
            pod,
            &PostParams::default(),
            &binding,
        )
        .await
        .unwrap();
}

/// Writes the pod's status as the kubelet would: running, ready or not, or failed.
async fn set_pod(client: &Client, ns: &str, pod: &str, phase: &str, ready: bool) {
    let ready = if ready { "True" } else { "False" };
    let status = json!({"status": {
        "phase": phase, "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": ready}],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

fn exit_health(g: &VpnGateway, exit: &str) -> Option<ExitHealth> {
    g.status
        .as_ref()?
        .exits
        .iter()
        .find(|e| e.name == exit)
        .map(|e| e.health)
}

async fn event_reasons(client: &Client, ns: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

#[tokio::test]
async fn each_exit_holds_a_slot_with_its_own_vni_and_runs_a_pod_on_its_own_server() {
    let (client, ns) = setup("gw-exits", 3).await;
    gateway(&client, ns.name(), "egress", 2).await;
    let pods = until(&client, ns.name(), "egress", "two exit pods", |_, pods| {
        (pods.len() == 2).then(|| pods.to_vec())
    })
    .await;
    let servers: BTreeSet<String> = pods
        .iter()
        .map(|p| p.annotations()[exit::ANNOTATION_SERVER].clone())
        .collect();
    assert_eq!(
        servers.len(),
        2,
        "exits on one provider use different servers"
    );
    for pod in &pods {
        let v = serde_json::to_value(pod).unwrap();
        let server = &pod.annotations()[exit::ANNOTATION_SERVER];
        assert_eq!(
            v["spec"]["volumes"][0]["secret"]["items"],
            json!([{"key": format!("{server}.conf"), "path": "wg0.conf"}]),
            "the pod mounts its one server as wg0.conf"
        );
        assert_eq!(pod.owner_references()[0].kind, "VpnMask");
    }

    let masks = Api::<VpnMask>::namespaced(client.clone(), ns.name())
        .list(&ListParams::default().labels(&format!("{}=egress", exit::LABEL_GATEWAY)))
        .await
        .unwrap()
        .items;
    let vnis: BTreeSet<String> = masks
        .iter()
        .map(|m| m.annotations()[exit::ANNOTATION_VNI].clone())
        .collect();
    assert_eq!(vnis.len(), 2, "{vnis:?}");

    let configs = Api::<ConfigMap>::namespaced(client.clone(), ns.name())
        .get("egress-exits")
        .await
        .unwrap()
        .data
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(&configs["egress-exit-0.yaml"]).unwrap();
    assert!(
        vnis.contains(&config["exit"]["vni"].to_string()),
        "{config}"
    );
    assert_eq!(config["exit"]["mss"], 1380, "auto MTU 1420 less 40");
    // The cluster's intranet: the configured range and the API server's Service range (and
    // the nodes another test of this binary may have made).
    let bypass = config["bypass"].as_array().unwrap();
    for want in ["10.244.0.0/16", "10.96.0.0/16"] {
        assert!(bypass.contains(&json!(want)), "{want}: {bypass:?}");
    }

    let g = until(
        &client,
        ns.name(),
        "egress",
        "status of two exits",
        |g, _| {
            let s = g.status.as_ref()?;
            (s.exits.len() == 2
                && s.exits
                    .iter()
                    .all(|e| e.slot.is_some() && e.server.is_some()))
            .then(|| g.clone())
        },
    )
    .await;
    let status = g.status.unwrap();
    assert_eq!(status.healthy_exits, 0);
    assert_eq!(status.mtu, Some(1420));
    for e in &status.exits {
        assert_eq!(e.provider.as_deref(), Some("pool"));
        assert_eq!(e.health, ExitHealth::Pending, "unscheduled: {e:?}");
    }
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
}

#[tokio::test]
async fn an_exit_going_down_and_back_is_in_the_status_and_in_events_and_a_stopped_pod_moves_to_the_next_server()
 {
    let (client, ns) = setup("gw-health", 2).await;
    gateway(&client, ns.name(), "egress", 2).await;
    until(&client, ns.name(), "egress", "two exit pods", |_, pods| {
        (pods.len() == 2).then_some(())
    })
    .await;
    let exit0 = "egress-exit-0";
    bind(&client, ns.name(), exit0, "node-1").await;
    set_pod(&client, ns.name(), exit0, "Running", true).await;
    until(&client, ns.name(), "egress", "exit 0 healthy", |g, _| {
        (exit_health(g, exit0) == Some(ExitHealth::Healthy)
            && g.status.as_ref()?.healthy_exits == 1)
            .then_some(())
    })
    .await;
    let g = Api::<VpnGateway>::namespaced(client.clone(), ns.name())
        .get("egress")
        .await
        .unwrap();
    let status = g.status.unwrap();
    let e0 = status.exits.iter().find(|e| e.name == exit0).unwrap();
    assert_eq!(e0.node.as_deref(), Some("node-1"));
    assert_eq!(e0.pod_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        e0.public_address.as_deref(),
        Some(PUBLIC_ADDRESS),
        "asked of its agent once healthy"
    );
    let condition = |t: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(condition("Ready"), "True");
    assert_eq!(condition("Degraded"), "True", "one of two exits healthy");

    set_pod(&client, ns.name(), exit0, "Running", false).await;
    until(&client, ns.name(), "egress", "exit 0 unhealthy", |g, _| {
        (exit_health(g, exit0) == Some(ExitHealth::Unhealthy)).then_some(())
    })
    .await;
    set_pod(&client, ns.name(), exit0, "Running", true).await;
    until(
        &client,
        ns.name(),
        "egress",
        "exit 0 healthy again",
        |g, _| (exit_health(g, exit0) == Some(ExitHealth::Healthy)).then_some(()),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let reasons = event_reasons(&client, ns.name()).await;
        if ["ExitUp", "ExitDown", "ExitRecovered"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r))
        {
            break;
        }
        assert!(Instant::now() < deadline, "events: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A stopped pod is replaced; its exit moves on to the server no sibling uses.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let first = pods.get(exit0).await.unwrap();
    let (uid, server) = (
        first.uid().unwrap(),
        first.annotations()[exit::ANNOTATION_SERVER].clone(),
    );
    let sibling =
        pods.get("egress-exit-1").await.unwrap().annotations()[exit::ANNOTATION_SERVER].clone();
    set_pod(&client, ns.name(), exit0, "Failed", false).await;
    let next = until(
        &client,
        ns.name(),
        "egress",
        "exit 0 replaced",
        |_, pods| {
            pods.iter()
                .find(|p| p.name_any() == exit0 && p.uid().as_deref() != Some(uid.as_str()))
                .map(|p| p.annotations()[exit::ANNOTATION_SERVER].clone())
        },
    )
    .await;
    assert_ne!(next, server, "the replacement uses the next server");
    assert_ne!(next, sibling, "and not its sibling's");
    assert!(
        event_reasons(&client, ns.name())
            .await
            .iter()
            .any(|r| r == "ExitReplaced")
    );
}

#[tokio::test]
async fn two_gateways_never_share_a_vni_and_scaling_down_removes_the_last_exits() {
    let (client, ns) = setup("gw-scale", 3).await;
    // Created together: their exits pick identifiers at the same time.
    tokio::join!(
        gateway(&client, ns.name(), "a", 3),
        gateway(&client, ns.name(), "b", 3)
    );
    let masks: Api<VpnMask> = Api::namespaced(client.clone(), ns.name());
    let deadline = Instant::now() + WAIT;
    let vnis = loop {
        let list = masks
            .list(&ListParams::default().labels(exit::LABEL_GATEWAY))
            .await
            .unwrap()
            .items;
        if list.len() == 6 {
            break list
                .iter()
                .map(|m| m.annotations()[exit::ANNOTATION_VNI].clone())
                .collect::<BTreeSet<_>>();
        }
        assert!(Instant::now() < deadline, "{} exit masks", list.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(vnis.len(), 6, "{vnis:?}");

    Api::<VpnGateway>::namespaced(client.clone(), ns.name())
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"exits": {"count": 1}}})),
        )
        .await
        .unwrap();
    until(&client, ns.name(), "a", "one exit left", |g, _| {
        let s = g.status.as_ref()?;
        (s.exits.len() == 1 && s.exits[0].name == "a-exit-0").then_some(())
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let left: Vec<String> = masks
            .list(&ListParams::default().labels(&format!("{}=a", exit::LABEL_GATEWAY)))
            .await
            .unwrap()
            .items
            .iter()
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .map(ResourceExt::name_any)
            .collect();
        if left == ["a-exit-0"] {
            break;
        }
        assert!(Instant::now() < deadline, "masks left: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates pod `name` with `labels`, binds it and, when `running`, writes it Running.
#[tokio::test]
async fn an_exit_whose_tunnel_does_not_connect_or_that_a_user_moves_goes_to_the_next_server_and_says_why()
 {
    let (client, ns) = setup("gw-move", 1).await;
    gateway_with(
        &client,
        ns.name(),
        "egress",
        json!({"count": 1, "providers": ["nl"], "moveAfter": "3s"}),
    )
    .await;
    let exit0 = "egress-exit-0";
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let first = until(&client, ns.name(), "egress", "the exit's pod", |_, pods| {
        pods.iter().find(|p| p.name_any() == exit0).cloned()
    })
    .await;
    // Running, its tunnel never connecting (never Ready): it moves after 3 s.
    bind(&client, ns.name(), exit0, "node-1").await;
    set_pod(&client, ns.name(), exit0, "Running", false).await;
    let server = |p: &Pod| p.annotations()[exit::ANNOTATION_SERVER].clone();
    let (uid, from) = (first.uid().unwrap(), server(&first));
    kubelet_confirms_deletion(&client, ns.name(), exit0).await;
    let second = until(&client, ns.name(), "egress", "exit 0 moved", |_, pods| {
        pods.iter()
            .find(|p| p.name_any() == exit0 && p.uid().as_deref() != Some(uid.as_str()))
            .cloned()
    })
    .await;
    assert_ne!(
        server(&second),
        from,
        "the replacement uses the next server"
    );
    let moved = until(
        &client,
        ns.name(),
        "egress",
        "the status says why",
        |g, _| g.status.as_ref()?.exits.first()?.last_move.clone(),
    )
    .await;
    assert!(
        moved.contains(&from) && moved.contains("had not connected for 3s"),
        "{moved}"
    );
    // Healthy, then a user asks it to move (a site banned its address).
    bind(&client, ns.name(), exit0, "node-1").await;
    set_pod(&client, ns.name(), exit0, "Running", true).await;
    until(&client, ns.name(), "egress", "exit 0 healthy", |g, _| {
        (exit_health(g, exit0) == Some(ExitHealth::Healthy)).then_some(())
    })
    .await;
    let (uid, from) = (second.uid().unwrap(), server(&second));
    pods.patch(
        exit0,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {exit::ANNOTATION_MOVE: "banned"}}})),
    )
    .await
    .unwrap();
    kubelet_confirms_deletion(&client, ns.name(), exit0).await;
    let third = until(
        &client,
        ns.name(),
        "egress",
        "exit 0 moved on request",
        |_, pods| {
            pods.iter()
                .find(|p| p.name_any() == exit0 && p.uid().as_deref() != Some(uid.as_str()))
                .cloned()
        },
    )
    .await;
    assert_ne!(server(&third), from);
    assert!(!third.annotations().contains_key(exit::ANNOTATION_MOVE));
    until(
        &client,
        ns.name(),
        "egress",
        "the status says why",
        |g, _| {
            let why = g.status.as_ref()?.exits.first()?.last_move.clone()?;
            (why.contains(&from) && why.contains(exit::ANNOTATION_MOVE)).then_some(())
        },
    )
    .await;
}

/// Waits (at most [`WAIT`]) until the operator deletes `pod`, then removes it as its node's
/// kubelet would once its containers stopped (there is no kubelet here).
async fn kubelet_confirms_deletion(client: &Client, ns: &str, pod: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Some(uid) = pods.get_opt(pod).await.unwrap().map(|p| p.uid()) else {
        return;
    };
    let deadline = Instant::now() + WAIT;
    // Deleted at once (grace 0: an exit with nothing to drain) it may be made again under its
    // name before this looks: a pod of another uid is the old one gone.
    while pods
        .get_opt(pod)
        .await
        .unwrap()
        .is_some_and(|p| p.uid() == uid && p.metadata.deletion_timestamp.is_none())
    {
        assert!(Instant::now() < deadline, "{pod} was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if pods
        .get_opt(pod)
        .await
        .unwrap()
        .is_some_and(|p| p.uid() == uid)
    {
        let _ = pods
            .delete(pod, &kube::api::DeleteParams::default().grace_period(0))
            .await;
    }
}

/// The VXLAN identifiers of the gateway's exits as its status says, once each has one.
fn vnis(g: &VpnGateway, count: usize) -> Option<Vec<u32>> {
    let exits = &g.status.as_ref()?.exits;
    (exits.len() == count && exits.iter().all(|e| e.vni != 0))
        .then(|| exits.iter().map(|e| e.vni).collect())
}

#[tokio::test]
async fn a_tenant_who_changes_an_exits_vni_annotation_to_another_gateways_changes_nothing() {
    let (client, ns) = setup("gw-vni-forged", 3).await;
    gateway(&client, ns.name(), "a", 1).await;
    gateway(&client, ns.name(), "b", 1).await;
    let a = until(&client, ns.name(), "a", "a's identifier", |g, _| vnis(g, 1)).await;
    let b = until(&client, ns.name(), "b", "b's identifier", |g, _| vnis(g, 1)).await;
    assert_ne!(a, b);
    Api::<VpnMask>::namespaced(client.clone(), ns.name())
        .patch(
            "b-exit-0",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {exit::ANNOTATION_VNI: a[0].to_string()}}}),
            ),
        )
        .await
        .unwrap();
    // A second exit: a reconcile of b after the change, seen in the status.
    Api::<VpnGateway>::namespaced(client.clone(), ns.name())
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"exits": {"count": 2}}})),
        )
        .await
        .unwrap();
    let now = until(&client, ns.name(), "b", "b's second exit", |g, _| {
        vnis(g, 2)
    })
    .await;
    assert_eq!(now[0], b[0], "the status followed the tenant's annotation");
    assert!(!now.contains(&a[0]), "{now:?} shares a's {a:?}");
}

async fn client_pod(client: &Client, ns: &str, name: &str, labels: serde_json::Value) {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "cloak.dev/test/client:dev"}]},
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    bind(client, ns, name, "node-1").await;
}

/// Waits until the gateway's status counts `want` clients.
async fn until_clients(client: &Client, ns: &str, gateway: &str, want: u32, what: &str) {
    until(client, ns, gateway, what, |g, _| {
        (g.status.as_ref()?.clients == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_status_counts_running_clients_by_label_and_selector_at_once_and_not_those_going_away()
{
    let (client, ns) = setup("gw-clients", 2).await;
    let gateways = Api::<VpnGateway>::namespaced(client.clone(), ns.name());
    let egress: VpnGateway = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway", "metadata": {"name": "egress"},
        "spec": {"exits": {"count": 1, "providers": ["nl"]},
                 "clients": {"podSelector": {"matchLabels": {"app": "dl"}}}},
    }))
    .unwrap();
    gateways
        .create(&PostParams::default(), &egress)
        .await
        .unwrap();
    until_clients(&client, ns.name(), "egress", 0, "a status").await;

    let ns_ = ns.name();
    client_pod(
        &client,
        ns_,
        "by-label",
        json!({"cloak.dev/gateway": "egress"}),
    )
    .await;
    client_pod(&client, ns_, "by-selector", json!({"app": "dl"})).await;
    client_pod(&client, ns_, "not-a-client", json!({"app": "web"})).await;
    client_pod(
        &client,
        ns_,
        "other-gateway",
        json!({"cloak.dev/gateway": "nope"}),
    )
    .await;
    client_pod(&client, ns_, "pending", json!({"app": "dl"})).await;
    for pod in ["by-label", "by-selector", "not-a-client", "other-gateway"] {
        set_pod(&client, ns_, pod, "Running", true).await;
    }
    // Well within the controller's one-minute resync: the pods' changes ask for the count.
    until_clients(&client, ns_, "egress", 2, "two running clients").await;

    // Deleted: with no kubelet to confirm it, the pod stays, going away, and is not counted.
    Api::<Pod>::namespaced(client.clone(), ns_)
        .delete("by-label", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    until_clients(&client, ns_, "egress", 1, "the deleted pod uncounted").await;

    // Relabelled out of the selector: the gateway it left recounts.
    Api::<Pod>::namespaced(client.clone(), ns_)
        .patch(
            "by-selector",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
        )
        .await
        .unwrap();
    until_clients(&client, ns_, "egress", 0, "the relabelled pod uncounted").await;
}

#[tokio::test]
async fn a_gateways_default_intranet_is_derived_from_the_nodes_and_service_ranges_and_shown_in_its_status()
 {
    let (client, ns) = setup("gw-intranet", 2).await;
    // A node of a k3s-like cluster: its own pod range and address, outside the chart's ranges.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let name = format!("intranet-{}", ns.name());
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": "10.42.7.0/24", "podCIDRs": ["10.42.7.0/24"]},
    }))
    .unwrap();
    let _ = nodes
        .delete(&name, &kube::api::DeleteParams::default())
        .await;
    nodes.create(&PostParams::default(), &node).await.unwrap();
    nodes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.77.7"},
                {"type": "ExternalIP", "address": "198.51.100.77"},
            ]}})),
        )
        .await
        .unwrap();
    gateway(&client, ns.name(), "egress", 1).await;
    let intranet = until(
        &client,
        ns.name(),
        "egress",
        "the derived intranet",
        |g, _| {
            let intranet: Vec<String> = g
                .status
                .as_ref()?
                .intranet
                .iter()
                .map(ToString::to_string)
                .collect();
            intranet
                .contains(&"10.42.7.0/24".to_owned())
                .then_some(intranet)
        },
    )
    .await;
    let _ = nodes
        .delete(&name, &kube::api::DeleteParams::default())
        .await;
    for want in [
        "10.244.0.0/16",   // configured (the chart's cluster.intranet)
        "10.42.7.0/24",    // the node's pod range
        "192.168.77.7/32", // the node's internal address
        "10.96.0.0/16",    // the API server's ServiceCIDR
    ] {
        assert!(intranet.iter().any(|n| n == want), "{want}: {intranet:?}");
    }
    assert!(
        !intranet.iter().any(|n| n.starts_with("198.51.100.77")),
        "an external address: {intranet:?}"
    );
}

#[tokio::test]
async fn an_exit_whose_node_stays_not_ready_starts_elsewhere_on_the_slot_its_mask_holds() {
    let (client, ns) = setup("gw-lost", 1).await;
    // A node whose kubelet stopped answering ten minutes ago.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let lost = format!("lost-{}", ns.name());
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": lost}}),
    )
    .unwrap();
    let _ = nodes
        .delete(&lost, &kube::api::DeleteParams::default())
        .await;
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let since =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_mins(10);
    nodes
        .patch_status(
            &lost,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [
                {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
                 "lastHeartbeatTime": since.to_string(), "lastTransitionTime": since.to_string()},
            ]}})),
        )
        .await
        .unwrap();
    gateway_with(
        &client,
        ns.name(),
        "egress",
        json!({"count": 1, "providers": ["nl"], "moveAfter": "3s"}),
    )
    .await;
    let exit0 = "egress-exit-0";
    let first = until(&client, ns.name(), "egress", "the exit's pod", |_, pods| {
        pods.iter().find(|p| p.name_any() == exit0).cloned()
    })
    .await;
    let masks: Api<VpnMask> = Api::namespaced(client.clone(), ns.name());
    let mask_uid = masks.get(exit0).await.unwrap().uid();
    // It runs, healthy, on the node that then stays unreachable.
    bind(&client, ns.name(), exit0, &lost).await;
    set_pod(&client, ns.name(), exit0, "Running", true).await;
    let uid = first.uid().unwrap();
    let second = until(
        &client,
        ns.name(),
        "egress",
        "the exit starts again",
        |_, pods| {
            pods.iter()
                .find(|p| p.name_any() == exit0 && p.uid().as_deref() != Some(uid.as_str()))
                .cloned()
        },
    )
    .await;
    let moved = until(
        &client,
        ns.name(),
        "egress",
        "the status says why",
        |g, _| g.status.as_ref()?.exits.first()?.last_move.clone(),
    )
    .await;
    let _ = nodes
        .delete(&lost, &kube::api::DeleteParams::default())
        .await;
    assert_ne!(second.uid(), first.uid());
    assert!(
        moved.contains(&format!("its node {lost} has not been ready")),
        "{moved}"
    );
    // The same exit on the same slot: one mask, the one that held it before.
    let listed = masks.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].uid(), mask_uid);
    assert!(
        listed[0]
            .status
            .as_ref()
            .and_then(|s| s.provider.as_ref())
            .is_some(),
        "the mask still holds its slot"
    );
    let _ = nodes
        .delete(&lost, &kube::api::DeleteParams::default())
        .await;
}

/// Creates provider `name` (tag `nl`, `max_slots` slots, verification skipped) on the test's
/// Secret `creds`.
async fn provider(client: &Client, ns: &str, name: &str, max_slots: u32) {
    let provider: VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name},
        "spec": {"secret": "creds", "maxSlots": max_slots, "tags": ["nl"],
                 "namespaces": [ns], "verify": {"skip": true}},
    }))
    .unwrap();
    Api::<VpnProvider>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &provider)
        .await
        .unwrap();
}

/// Creates chain `name` with `hops` hops over tag `nl` and `extra` merged into its spec.
async fn chain(client: &Client, ns: &str, name: &str, hops: usize, extra: serde_json::Value) {
    let mut spec = json!({"hops": vec![json!({"providers": ["nl"]}); hops]});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let chain: VpnChain = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnChain", "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    Api::<VpnChain>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &chain)
        .await
        .unwrap();
}

/// Waits (at most [`WAIT`]) until the chain has made gateway `name`.
async fn hop_made(client: &Client, ns: &str, name: &str) {
    let gateways: Api<VpnGateway> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + WAIT;
    while gateways.get_opt(name).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "{name} was not made");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pod `name` of namespace `ns`.
async fn pods_of(client: &Client, ns: &str, name: &str) -> Pod {
    Api::<Pod>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

/// Polls `check` on chain `onion`'s status until it returns `Some`, for at most [`WAIT`].
async fn until_chain<T>(
    client: &Client,
    ns: &str,
    what: &str,
    check: impl Fn(&cloak_api::VpnChainStatus) -> Option<T>,
) -> T {
    let chains: Api<VpnChain> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + WAIT;
    loop {
        let status = chains
            .get("onion")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if let Some(found) = check(&status) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; chain status {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Hop `k`'s exit pod running, its tunnel connected or not.
async fn run_hop(client: &Client, ns: &str, k: usize, ready: bool) -> Pod {
    let gateway = format!("onion-hop-{k}");
    hop_made(client, ns, &gateway).await;
    let exit0 = format!("{gateway}-exit-0");
    let pod = until(client, ns, &gateway, "the hop's pod", |_, pods| {
        pods.iter().find(|p| p.name_any() == exit0).cloned()
    })
    .await;
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_none()
    {
        bind(client, ns, &exit0, "node-1").await;
    }
    set_pod(client, ns, &exit0, "Running", ready).await;
    pod
}

#[tokio::test]
async fn a_chains_hops_are_gateways_through_the_hop_before_each_on_a_provider_no_other_hop_holds() {
    // Taking the provider with the most free slots, every hop would take `pool`: nine free
    // against one. Each hop avoids the providers the others hold.
    let (client, ns) = setup("chain-providers", 9).await;
    provider(&client, ns.name(), "pool-b", 1).await;
    provider(&client, ns.name(), "pool-c", 1).await;
    chain(&client, ns.name(), "onion", 3, json!({})).await;
    let gateways: Api<VpnGateway> = Api::namespaced(client.clone(), ns.name());
    let mut held = BTreeSet::new();
    for k in 1..=3 {
        let name = format!("onion-hop-{k}");
        hop_made(&client, ns.name(), &name).await;
        let provider = until(&client, ns.name(), &name, "the hop holds a slot", |g, _| {
            g.status.as_ref()?.exits.first()?.provider.clone()
        })
        .await;
        held.insert(provider);
        let g = gateways.get(&name).await.unwrap();
        let through = g.spec.exits.through.clone();
        assert_eq!(
            through,
            (k > 1).then(|| format!("onion-hop-{}", k - 1)),
            "{name}"
        );
        assert_eq!(g.spec.exits.count.get(), 1);
        assert_eq!(
            g.labels().get("cloak.dev/last-hop-of").map(String::as_str),
            (k == 3).then_some("onion"),
            "{name}"
        );
        assert_eq!(g.owner_references()[0].kind, "VpnChain");
    }
    assert_eq!(held.len(), 3, "two hops share a provider: {held:?}");
    let gateway = until_chain(&client, ns.name(), "the chain's status", |status| {
        let shared = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ProvidersShared");
        (status.hops.len() == 3
            && status.hops.iter().all(|h| h.provider.is_some())
            && shared.is_some_and(|c| c.status == "False"))
        .then(|| status.gateway.clone())
    })
    .await;
    assert_eq!(gateway.as_deref(), Some("onion-hop-3"));
}

#[tokio::test]
async fn a_hop_behind_a_dead_hop_is_not_moved_and_is_judged_again_once_the_hop_before_is_healthy() {
    let (client, ns) = setup("chain-outer-first", 3).await;
    chain(
        &client,
        ns.name(),
        "onion",
        2,
        json!({"moveAfter": "3s", "shareProviders": true}),
    )
    .await;
    run_hop(&client, ns.name(), 1, true).await;
    until_healthy(&client, ns.name(), "onion-hop-1", "hop 1 healthy").await;
    // Hop 2 starts once hop 1 carries traffic, and connects.
    let first = run_hop(&client, ns.name(), 2, true).await;
    until_healthy(&client, ns.name(), "onion-hop-2", "hop 2 healthy").await;
    // Hop 1's server dies: hop 1 and, through it, hop 2 lose their tunnels. Hop 1 moves on
    // after its moveAfter; hop 2 stays where it is meanwhile, and for twice its moveAfter more
    // while hop 1's next pod has not connected: its server is not the one to blame.
    let hop1 = pods_of(&client, ns.name(), "onion-hop-1-exit-0").await;
    set_pod(&client, ns.name(), "onion-hop-1-exit-0", "Running", false).await;
    set_pod(&client, ns.name(), "onion-hop-2-exit-0", "Running", false).await;
    kubelet_confirms_deletion(&client, ns.name(), "onion-hop-1-exit-0").await;
    until(
        &client,
        ns.name(),
        "onion-hop-1",
        "hop 1 moved",
        |_, pods| {
            pods.iter()
                .find(|p| p.name_any() == "onion-hop-1-exit-0" && p.uid() != hop1.uid())
                .map(drop)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let still = pods.get("onion-hop-2-exit-0").await.unwrap();
    assert_eq!(still.uid(), first.uid(), "hop 2 moved while hop 1 was down");
    assert!(still.metadata.deletion_timestamp.is_none());
    // Hop 1 connects on its next server. Hop 2's clock starts then, not when its tunnel went
    // down: looked at again at once (a change to its gateway), it stays.
    run_hop(&client, ns.name(), 1, true).await;
    until_healthy(&client, ns.name(), "onion-hop-1", "hop 1 healthy again").await;
    Api::<VpnGateway>::namespaced(client.clone(), ns.name())
        .patch(
            "onion-hop-2",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = pods.get("onion-hop-2-exit-0").await.unwrap();
    assert!(
        still.uid() == first.uid() && still.metadata.deletion_timestamp.is_none(),
        "hop 2 was judged by the time its tunnel was down behind a dead hop 1"
    );
    // It does not connect within its moveAfter from then: it is judged, and moves.
    kubelet_confirms_deletion(&client, ns.name(), "onion-hop-2-exit-0").await;
    let moved = until(
        &client,
        ns.name(),
        "onion-hop-2",
        "hop 2 moved",
        |_, pods| {
            pods.iter()
                .find(|p| p.name_any() == "onion-hop-2-exit-0" && p.uid() != first.uid())
                .cloned()
        },
    )
    .await;
    assert_ne!(
        moved.annotations()[exit::ANNOTATION_SERVER],
        first.annotations()[exit::ANNOTATION_SERVER]
    );
    let switches = until_chain(&client, ns.name(), "hop 2's switch counted", |status| {
        let counts: Vec<u32> = status.hops.iter().map(|h| h.switches).collect();
        (counts.get(1) == Some(&1)).then_some(counts)
    })
    .await;
    assert_eq!(switches, [1, 1], "hop 1 moved once, hop 2 once");
    let deadline = Instant::now() + WAIT;
    while !event_reasons(&client, ns.name())
        .await
        .iter()
        .any(|r| r == "HopSwitched")
    {
        assert!(Instant::now() < deadline, "no HopSwitched event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// gluetun's server list (issue 27): a gluetun Secret naming a provider, with the list in a
/// ConfigMap, is a pool of the provider's WireGuard servers that pass the Secret's filters; the
/// masks' copies hold them as `<hostname>.conf` files and a gateway's exits take two different
/// ones. A filter that matches nothing stops the provider with a message naming it.
#[tokio::test]
async fn a_gluetun_secret_with_a_server_list_is_a_pool_of_its_filtered_servers() {
    let client = operator();
    let ns = TestNamespace::create(&client, "gw-list").await.unwrap();
    let ns = ns.name().to_owned();
    // A public key is public: the fixed test key serves as every server's.
    let key = "wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=";
    let wg = |host: &str, city: &str, ip: &str| {
        json!({"vpn": "wireguard", "country": "Netherlands", "city": city, "hostname": host,
               "wgpubkey": key, "ips": [ip], "owned": true})
    };
    let list = json!({"version": 4, "mullvad": {"version": 4, "timestamp": 1_733_000_000, "servers": [
        wg("nl-ams-wg-001", "Amsterdam", "192.0.2.11"),
        wg("se-got-wg-001", "Gothenburg", "192.0.2.12"),
        {"vpn": "openvpn", "city": "Amsterdam", "hostname": "nl-ams-ovpn-001", "udp": true, "ips": ["192.0.2.13"]},
        wg("nl-ams-wg-002", "Amsterdam", "192.0.2.14"),
        wg("nl-ams-wg-003", "amsterdam", "192.0.2.15")]}});
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "gluetun-servers"},
        "data": {"servers.json": list.to_string()},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "mullvad"},
        "stringData": {"VPN_SERVICE_PROVIDER": "mullvad", "VPN_TYPE": "wireguard",
                       "WIREGUARD_PRIVATE_KEY": key, "WIREGUARD_ADDRESSES": "10.64.222.21/32",
                       "SERVER_CITIES": "Amsterdam"},
    }))
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let provider: VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": "listed"},
        "spec": {"secret": "mullvad", "maxSlots": 3, "tags": ["gl"], "namespaces": [&ns],
                 "verify": {"skip": true}, "serverList": {"configMap": {"name": "gluetun-servers"}}},
    }))
    .unwrap();
    let providers: Api<VpnProvider> = Api::namespaced(client.clone(), &ns);
    providers
        .create(&PostParams::default(), &provider)
        .await
        .unwrap();

    let status = |p: &VpnProvider| p.status.clone().unwrap_or_default();
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let p = providers.get("listed").await.unwrap();
        if status(&p).server_list.is_some() {
            break status(&p);
        }
        assert!(
            Instant::now() < deadline,
            "no server list in {:?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let list_status = listed.server_list.unwrap();
    assert_eq!(
        list_status.servers, 3,
        "the three WireGuard servers in Amsterdam, any case"
    );
    assert_eq!(list_status.updated.unwrap().0.as_second(), 1_733_000_000);
    assert!(
        list_status
            .source
            .starts_with("configmap/gluetun-servers/servers.json@")
    );

    gateway_with(
        &client,
        &ns,
        "egress",
        json!({"count": 2, "providers": ["gl"]}),
    )
    .await;
    let pods = until(&client, &ns, "egress", "two exit pods", |_, pods| {
        (pods.len() == 2).then(|| pods.to_vec())
    })
    .await;
    let servers: BTreeSet<String> = pods
        .iter()
        .map(|p| p.annotations()[exit::ANNOTATION_SERVER].clone())
        .collect();
    assert_eq!(servers.len(), 2, "two exits, two servers: {servers:?}");
    for (pod, server) in pods.iter().zip(&servers) {
        assert!(server.starts_with("nl-ams-wg-00"), "{server}");
        let v = serde_json::to_value(pod).unwrap();
        let items = &v["spec"]["volumes"][0]["secret"]["items"];
        assert_eq!(items[0]["path"], "wg0.conf", "{items}");
    }
    // The mask's copy holds the servers as files, and the Secret's variables.
    let mask = Api::<VpnMask>::namespaced(client.clone(), &ns)
        .get(&pods[0].owner_references()[0].name)
        .await
        .unwrap();
    let copy_name = mask.status.unwrap().provider.unwrap().secret;
    let copy = secrets.get(&copy_name).await.unwrap();
    let keys: Vec<String> = copy.data.unwrap().into_keys().collect();
    for want in [
        "nl-ams-wg-001.conf",
        "nl-ams-wg-002.conf",
        "nl-ams-wg-003.conf",
        "WIREGUARD_PRIVATE_KEY",
    ] {
        assert!(keys.contains(&want.to_owned()), "{want}: {keys:?}");
    }
    assert!(!keys.contains(&"se-got-wg-001.conf".to_owned()), "{keys:?}");

    // A new list (ConfigMaps are not watched: read again within a minute) rewrites the copies.
    let mut shorter = list.clone();
    shorter["mullvad"]["servers"].as_array_mut().unwrap().pop();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(
            "gluetun-servers",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"servers.json": shorter.to_string()}})),
        )
        .await
        .unwrap();
    let copy_keys = || async {
        let copy = secrets.get(&copy_name).await.unwrap();
        copy.data.unwrap().into_keys().collect::<Vec<String>>()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let keys = copy_keys().await;
        if !keys.contains(&"nl-ams-wg-003.conf".to_owned()) {
            assert!(keys.contains(&"nl-ams-wg-001.conf".to_owned()), "{keys:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy kept the old list: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let s = status(&providers.get("listed").await.unwrap());
    assert_eq!(s.server_list.map(|l| l.servers), Some(2));

    // A filter that matches nothing: the provider says which, and gives no new slot.
    secrets
        .patch(
            "mullvad",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"SERVER_CITIES": "Paris"}})),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = status(&providers.get("listed").await.unwrap());
        let message = s.message.clone().unwrap_or_default();
        if message.contains("SERVER_CITIES=Paris matches none of the 3 servers left") {
            assert_eq!(s.phase, Some(cloak_api::ProviderPhase::ErrVerifyFailed));
            assert!(s.server_list.is_none());
            break;
        }
        assert!(Instant::now() < deadline, "no filter error: {s:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The masks holding slots keep the servers their copies have, and get the Secret's change.
    let deadline = Instant::now() + WAIT;
    loop {
        let copy = secrets.get(&copy_name).await.unwrap();
        let data = copy.data.unwrap();
        if data.get("SERVER_CITIES").map(|v| v.0.as_slice()) == Some(b"Paris".as_slice()) {
            assert!(data.contains_key("nl-ams-wg-001.conf"), "{:?}", data.keys());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy did not follow the Secret"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A loopback HTTP server answering every request with the current `(status, body)`.
fn list_server(answer: std::sync::Arc<std::sync::Mutex<(u16, String)>>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let mut request = [0_u8; 2048];
            let _ = std::io::Read::read(&mut stream, &mut request);
            let (status, body) = answer.lock().unwrap().clone();
            let reply = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut stream, reply.as_bytes());
        }
    });
    port
}

/// A server list from a URL: fetched, trimmed to the provider's section in the operator's
/// ConfigMap, its hash and time in status; a failed fetch keeps the last good copy and says
/// why; a later good fetch replaces it; a URL never fetched well stops the provider.
#[tokio::test]
async fn a_server_list_url_is_fetched_refreshed_and_its_last_good_copy_kept_when_a_fetch_fails() {
    let client = operator();
    let ns = TestNamespace::create(&client, "gw-url").await.unwrap();
    let ns = ns.name().to_owned();
    let key = "wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=";
    let wg = |host: &str, ip: &str| {
        json!({"vpn": "wireguard", "country": "Sweden", "city": "Gothenburg", "hostname": host,
               "wgpubkey": key, "ips": [ip]})
    };
    let whole = |hosts: &[(&str, &str)]| {
        let servers: Vec<serde_json::Value> = hosts.iter().map(|(h, ip)| wg(h, ip)).collect();
        json!({"version": 4,
               "mullvad": {"version": 4, "timestamp": 1_733_000_000, "servers": servers},
               "ivpn": {"version": 2, "timestamp": 1, "servers": [wg("de1.wg.ivpn.net", "192.0.2.99")]}})
        .to_string()
    };
    let answer = std::sync::Arc::new(std::sync::Mutex::new((
        200_u16,
        whole(&[
            ("se-got-wg-001", "192.0.2.21"),
            ("se-got-wg-002", "192.0.2.22"),
        ]),
    )));
    let port = list_server(answer.clone());
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "mullvad"},
        "stringData": {"VPN_SERVICE_PROVIDER": "mullvad", "VPN_TYPE": "wireguard",
                       "WIREGUARD_PRIVATE_KEY": key, "WIREGUARD_ADDRESSES": "10.64.222.21/32"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let providers: Api<VpnProvider> = Api::namespaced(client.clone(), &ns);
    for (name, url) in [
        ("fetched", format!("http://127.0.0.1:{port}/servers.json")),
        // Nothing listens on port 9 of loopback (discard, not served here).
        ("unreachable", "http://127.0.0.1:9/servers.json".to_owned()),
    ] {
        let provider: VpnProvider = serde_json::from_value(json!({
            "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name},
            "spec": {"secret": "mullvad", "maxSlots": 1, "namespaces": [&ns], "verify": {"skip": true},
                     "serverList": {"url": url, "refreshInterval": "1m"}},
        }))
        .unwrap();
        providers
            .create(&PostParams::default(), &provider)
            .await
            .unwrap();
    }
    let until_status = |name: &'static str,
                        what: &'static str,
                        check: fn(&cloak_api::VpnProviderStatus) -> bool| {
        let providers = providers.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(100);
            loop {
                let s = providers
                    .get(name)
                    .await
                    .unwrap()
                    .status
                    .unwrap_or_default();
                if check(&s) {
                    return s;
                }
                assert!(Instant::now() < deadline, "{name}: {what}: {s:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let first = until_status("fetched", "fetched", |s| {
        s.server_list.as_ref().is_some_and(|l| l.servers == 2)
    })
    .await;
    let list = first.server_list.unwrap();
    let hash = list.hash.clone().unwrap();
    assert_eq!(hash.len(), 64, "{hash}");
    assert!(
        list.fetched.is_some() && list.fetch_error.is_none(),
        "{list:?}"
    );
    assert!(
        list.source
            .starts_with("configmap/fetched-server-list/servers.json@"),
        "{list:?}"
    );
    let copy = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("fetched-server-list")
        .await
        .unwrap();
    let kept = &copy.data.clone().unwrap()["servers.json"];
    assert!(
        kept.contains("se-got-wg-002") && !kept.contains("ivpn"),
        "only mullvad's section: {kept}"
    );
    assert_eq!(copy.owner_references()[0].kind, "VpnProvider");

    // The URL fails: the last good copy stays in use, and the status says why.
    answer.lock().unwrap().0 = 500;
    let failing = until_status("fetched", "the failure reported", |s| {
        s.server_list
            .as_ref()
            .is_some_and(|l| l.fetch_error.is_some())
    })
    .await;
    let list = failing.server_list.unwrap();
    assert_eq!(list.servers, 2);
    assert_eq!(list.hash.as_deref(), Some(hash.as_str()));
    assert!(list.fetch_error.unwrap().contains("HTTP 500"));
    assert_eq!(failing.phase, Some(cloak_api::ProviderPhase::Ready));

    // It answers again, with a longer list: the new copy replaces the old one. (A failed
    // fetch is tried again after a minute; the shortest refresh interval is a minute too.)
    *answer.lock().unwrap() = (
        200,
        whole(&[
            ("se-got-wg-001", "192.0.2.21"),
            ("se-got-wg-002", "192.0.2.22"),
            ("se-got-wg-003", "192.0.2.23"),
        ]),
    );
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let s = providers
            .get("fetched")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let l = s.server_list.clone().unwrap_or_default();
        if l.servers == 3 {
            let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get("fetched-server-list")
                .await
                .unwrap();
            assert!(
                l.fetch_error.is_none() && l.hash.as_deref() != Some(hash.as_str()),
                "{l:?} {:?} {:?}",
                cm.metadata.annotations,
                cm.metadata.resource_version
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new list was not fetched: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Never fetched well: the provider is stopped with the fetch's error.
    let s = until_status("unreachable", "the fetch error", |s| {
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("fetching http://127.0.0.1:9/servers.json failed"))
    })
    .await;
    assert_eq!(s.phase, Some(cloak_api::ProviderPhase::ErrVerifyFailed));
}

/// The metrics reader's hash on a gateway's admin Secret: (annotation, data key).
async fn metrics_hash_on(client: &Client, ns: &str, gateway: &str) -> (String, String) {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&exit::admin_secret_name(gateway))
        .await
        .unwrap()
        .unwrap_or_default();
    let annotation = secret
        .annotations()
        .get(exit::ANNOTATION_METRICS_HASH)
        .cloned()
        .unwrap_or_default();
    let data = secret
        .data
        .unwrap_or_default()
        .get(exit::METRICS_HASH_KEY)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default();
    (annotation, data)
}

#[tokio::test]
async fn exits_get_the_metrics_readers_hash_in_their_admin_secret_and_a_new_token_follows() {
    let (client, ns) = setup("gw-metrics-hash", 1).await;
    let want = |token: &str| {
        let hash = exit::token_sha256(token);
        (hash.clone(), hash)
    };
    let until_hash = async |token: &str| {
        let deadline = Instant::now() + WAIT;
        while metrics_hash_on(&client, ns.name(), "scraped").await != want(token) {
            assert!(
                Instant::now() < deadline,
                "no hash of {token}: {:?}",
                metrics_hash_on(&client, ns.name(), "scraped").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    gateway(&client, ns.name(), "scraped", 1).await;
    until_hash("reader-1").await;
    // The token changes (a new Secret, mounted into the operator): the next reconcile writes
    // the new hash, which the exits' mounted Secret follows.
    std::fs::write(metrics_token_file(), "reader-2").unwrap();
    Api::<VpnGateway>::namespaced(client.clone(), ns.name())
        .patch(
            "scraped",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/nudge": "1"}}})),
        )
        .await
        .unwrap();
    until_hash("reader-2").await;
    // Never the token itself.
    let secret = Api::<Secret>::namespaced(client.clone(), ns.name())
        .get(&exit::admin_secret_name("scraped"))
        .await
        .unwrap();
    let text = serde_json::to_string(&secret).unwrap();
    assert!(
        !text.contains("reader-2") && !text.contains("cmVhZGVyLTI"),
        "{text}"
    );
}
