//! `cloak portfwd` end to end: Services and Nodes on a real kube-apiserver; a "host" network
//! namespace whose nftables the forwarder writes; node namespaces on a bridge running TCP and UDP
//! echo servers on their NodePorts (each answers with its node's name); an external and an
//! internal client namespace. Every assertion is a real connection. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_futures)] // test helpers

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use cloak_model::portfwd::Options;
use cloak_portfwd::{Backend, Config, Executor, Metrics};
use cloak_testkit::{
    ControlPlane, TestNamespace,
    netns::{Netns, veth},
};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// TCP and UDP echo: answers every connection or datagram with the node's name. Bounded by the
/// namespace's lifetime (its processes are killed when the namespace is dropped).
const ECHO: &str = r#"
import socket, sys, threading
name = sys.argv[1].encode()
def tcp(s):
    while True:
        c, _ = s.accept(); c.sendall(name); c.close()
def udp(s):
    while True:
        _, a = s.recvfrom(64); s.sendto(name, a)
for p in sys.argv[2:]:
    kind, port = p.split("/")
    if kind == "tcp":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port))); s.listen(64)
        threading.Thread(target=tcp, args=(s,), daemon=True).start()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(port)))
        threading.Thread(target=udp, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// One connection: prints the answer, or ERR and the reason. One second at most.
const CLIENT: &str = r#"
import socket, sys
kind, host, port, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(1.0)
    if src != "-": s.bind((src, 0))
    if kind == "tcp":
        s.connect((host, port)); print(s.recv(64).decode())
    else:
        s.sendto(b"hi", (host, port)); print(s.recv(64).decode())
except Exception as e:
    print("ERR", type(e).__name__)
"#;

struct Lab {
    host: Netns,
    ext: Netns,
    int: Netns,
    _nodes: Vec<Netns>,
    echo: Vec<Child>,
}

const NODES: [(&str, &str); 4] = [
    ("node1", "10.98.0.11"),
    ("node2", "10.98.0.12"),
    ("node3", "10.98.0.13"),
    ("node4", "10.98.0.14"),
];

impl Lab {
    fn new(base: u16) -> Self {
        let host = Netns::new("host");
        let ext = Netns::new("ext");
        let int = Netns::new("int");
        host.sysctl("net.ipv4.ip_forward", "1");
        veth(
            &host,
            "ext0",
            Some("198.51.100.1/24"),
            &ext,
            "eth0",
            Some("198.51.100.2/24"),
        );
        ext.run(&["ip", "addr", "add", "198.51.100.3/24", "dev", "eth0"]);
        veth(
            &host,
            "int0",
            Some("10.99.0.1/24"),
            &int,
            "eth0",
            Some("10.99.0.2/24"),
        );
        host.run(&["ip", "link", "add", "br0", "type", "bridge"]);
        host.run(&["ip", "addr", "add", "10.98.0.1/24", "dev", "br0"]);
        host.run(&["ip", "link", "set", "br0", "up"]);
        let mut nodes = Vec::new();
        let mut echo = Vec::new();
        for (i, (name, ip)) in NODES.iter().enumerate() {
            let ns = Netns::new(name);
            let port = format!("n{i}");
            veth(&host, &port, None, &ns, "eth0", Some(&format!("{ip}/24")));
            host.run(&["ip", "link", "set", &port, "master", "br0"]);
            ns.run(&["ip", "route", "add", "default", "via", "10.98.0.1"]);
            let mut child = ns
                .command("python3")
                .args(["-c", ECHO, name])
                .args([
                    format!("tcp/{}", base + 22),
                    format!("udp/{}", base + 53),
                    format!("tcp/{}", base + 80),
                    format!("tcp/{}", base + 90),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Every socket is bound before "ready" is printed.
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.take().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(line.trim(), "ready", "echo server in {name} did not start");
            echo.push(child);
            nodes.push(ns);
        }
        Self {
            host,
            ext,
            int,
            _nodes: nodes,
            echo,
        }
    }

    fn connect(from: &Netns, kind: &str, host: &str, port: u16, src: Option<&str>) -> String {
        from.run(&[
            "python3",
            "-c",
            CLIENT,
            kind,
            host,
            &port.to_string(),
            src.unwrap_or("-"),
        ])
        .trim()
        .to_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.echo {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn node(client: &Client, name: &str, ip: &str, ready: bool, excluded: bool) {
    let labels = if excluded {
        json!({"cloak.dev/exclude": "true"})
    } else {
        json!({})
    };
    let api: Api<Node> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap(),
    )
    .await
    .unwrap();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "reason": "Test"}],
        "addresses": [{"type": "InternalIP", "address": ip}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn service(
    client: &Client,
    ns: &str,
    name: &str,
    annotations: serde_json::Value,
    port: u16,
    node_port: u16,
    protocol: &str,
) {
    let object: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"type": "NodePort", "ports": [{"port": port, "nodePort": node_port, "protocol": protocol}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// Nodes are cluster-wide and every forwarder spreads over all of them: tests that create nodes
/// take turns.
static NODES_IN_USE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A forwarder running on the test's runtime, with its metrics and readiness.
struct Forwarder {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    fn start(client: Client, config: Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let (metrics, ready) = (metrics.clone(), ready.clone());
            async move {
                cloak_portfwd::run(client, config, metrics, ready, async {
                    let _ = stopped.await;
                })
                .await;
            }
        });
        Self {
            metrics,
            ready,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

/// Polls `check` until it holds (10 s at most).
async fn eventually(what: &str, mut check: impl FnMut() -> (bool, String)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, seen) = check();
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Both backends, one after the other: a forwarder sees every Service and Node of the cluster,
/// so two scenarios side by side would forward each other's ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_follow_annotations_and_nodes_with_real_traffic_on_both_backends() {
    let _turn = NODES_IN_USE.lock().await;
    scenario(Backend::Nftables, "pf-nft", 30_000).await;
    scenario(Backend::Iptables, "pf-ipt", 30_100).await;
}

/// NodePorts are cluster-wide: each scenario uses its own (`base + 22`, `+ 53`, `+ 80`, `+ 90`).
async fn scenario(backend: Backend, prefix: &str, base: u16) {
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, prefix).await.unwrap();
    let ns = ns.name().to_owned();
    let lab = Lab::new(base);
    // A table of someone else's, which nothing cloak does may touch.
    lab.host.run(&["nft", "add", "table", "ip", "foreign"]);
    lab.host.run(&[
        "nft",
        "add",
        "chain",
        "ip",
        "foreign",
        "keep",
        "{ type filter hook input priority 0 ; policy accept ; }",
    ]);
    lab.host.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "1",
        "-j",
        "ACCEPT",
    ]);

    let node_name = |i: usize| format!("{prefix}-{}", NODES[i].0);
    node(&client, &node_name(0), NODES[0].1, true, false).await;
    node(&client, &node_name(1), NODES[1].1, true, false).await;
    node(&client, &node_name(2), NODES[2].1, true, true).await; // excluded
    node(&client, &node_name(3), NODES[3].1, false, false).await; // NotReady
    service(
        &client,
        &ns,
        "ssh",
        json!({"cloak.dev/external-ports": "22:2022"}),
        2022,
        base + 22,
        "TCP",
    )
    .await;
    service(
        &client,
        &ns,
        "dns",
        json!({"cloak.dev/external-ports": "53:5353:udp"}),
        5353,
        base + 53,
        "UDP",
    )
    .await;
    service(
        &client,
        &ns,
        "admin",
        json!({"cloak.dev/external-ports": "8080:8080", "cloak.dev/internal": "true"}),
        8080,
        base + 80,
        "TCP",
    )
    .await;
    service(&client, &ns, "partner", json!({"cloak.dev/external-ports": "9000:9000", "cloak.dev/allow-range": "198.51.100.2/32"}), 9000, base + 90, "TCP").await;
    service(
        &client,
        &ns,
        "broken",
        json!({"cloak.dev/external-ports": "22"}),
        1,
        base + 1,
        "TCP",
    )
    .await;

    let executor = Executor::Local {
        netns: Some(lab.host.name().to_owned()),
    };
    let config = Config {
        options: Options {
            interfaces: vec!["ext0".into(), "int0".into()],
            external_interface: Some("ext0".into()),
        },
        executor: executor.clone(),
        backend,
        debounce: Duration::from_millis(100),
        resync: Duration::from_secs(1),
        instance: "test".into(),
    };
    let forwarder = Forwarder::start(cp.client(), config);
    let (metrics, ready) = (forwarder.metrics.clone(), forwarder.ready.clone());

    // TCP and UDP reach the ready, not excluded nodes, spread over both, never the others.
    eventually("ssh is forwarded", || {
        let r = Lab::connect(&lab.ext, "tcp", "198.51.100.1", 22, None);
        (r.starts_with("node"), r)
    })
    .await;
    let answers: Vec<String> = (0..12)
        .map(|_| Lab::connect(&lab.ext, "tcp", "198.51.100.1", 22, None))
        .collect();
    assert!(
        answers.iter().all(|a| a == "node1" || a == "node2"),
        "{answers:?}"
    );
    assert!(
        answers.iter().any(|a| a == "node1") && answers.iter().any(|a| a == "node2"),
        "spread: {answers:?}"
    );
    let udp = Lab::connect(&lab.ext, "udp", "198.51.100.1", 53, None);
    assert!(udp == "node1" || udp == "node2", "udp: {udp}");

    // Internal: refused on the external interface, served on the internal one.
    assert!(Lab::connect(&lab.ext, "tcp", "198.51.100.1", 8080, None).starts_with("ERR"));
    let internal = Lab::connect(&lab.int, "tcp", "10.99.0.1", 8080, None);
    assert!(internal.starts_with("node"), "internal: {internal}");

    // allow-range admits only its CIDR.
    assert!(
        Lab::connect(&lab.ext, "tcp", "198.51.100.1", 9000, Some("198.51.100.2"))
            .starts_with("node")
    );
    assert!(
        Lab::connect(&lab.ext, "tcp", "198.51.100.1", 9000, Some("198.51.100.3"))
            .starts_with("ERR")
    );

    // The malformed Service got an Event; the others were forwarded anyway (above).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let listed = events
        .list(&kube::api::ListParams::default())
        .await
        .unwrap();
    assert!(
        listed
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidPortForward")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("external-ports"))),
        "no InvalidPortForward event"
    );

    // Removing the annotation removes the forward.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services
        .patch(
            "ssh",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"cloak.dev/external-ports": null}}})),
        )
        .await
        .unwrap();
    eventually("ssh is no longer forwarded", || {
        let r = Lab::connect(&lab.ext, "tcp", "198.51.100.1", 22, None);
        (r.starts_with("ERR"), r)
    })
    .await;
    // A node becoming NotReady stops receiving.
    let nodes: Api<Node> = Api::all(client.clone());
    let not_ready =
        json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Test"}]}});
    nodes
        .patch_status(
            &node_name(1),
            &PatchParams::default(),
            &Patch::Merge(&not_ready),
        )
        .await
        .unwrap();
    eventually("node2, NotReady now, no longer receives", || {
        let answers: Vec<String> = (0..8)
            .map(|_| Lab::connect(&lab.int, "tcp", "10.99.0.1", 8080, None))
            .collect();
        (answers.iter().all(|a| a == "node1"), format!("{answers:?}"))
    })
    .await;

    forwarder.stop().await;
    assert!(ready.load(std::sync::atomic::Ordering::Relaxed));
    assert!(metrics.syncs.get() >= 3, "syncs: {}", metrics.syncs.get());

    // clean removes what cloak owns and nothing else, and can run twice.
    executor.clean_with(backend).await.unwrap();
    executor.clean_with(backend).await.unwrap();
    let tables = lab.host.run(&["nft", "list", "tables"]);
    assert!(
        tables.contains("table ip foreign") && !tables.contains("cloak_portfwd"),
        "{tables}"
    );
    let nat = lab.host.run(&["iptables", "-t", "nat", "-S"]);
    assert!(
        nat.contains("-A PREROUTING -p tcp -m tcp --dport 1 -j ACCEPT"),
        "{nat}"
    );
    assert!(!nat.contains("CLOAK"), "{nat}");
    for i in 0..NODES.len() {
        nodes
            .delete(&node_name(i), &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in ["ssh", "dns", "admin", "partner", "broken"] {
        services
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
}

/// A NodePort Service with several ports: `(port, nodePort, protocol)`.
async fn service_ports(
    client: &Client,
    ns: &str,
    name: &str,
    annotations: serde_json::Value,
    ports: &[(u16, u16, &str)],
) {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(port, node_port, protocol)| {
            json!({"name": format!("p{port}"), "port": port, "nodePort": node_port, "protocol": protocol})
        })
        .collect();
    let object: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"type": "NodePort", "ports": ports}
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// Seed 003's README annotations, word for word, on real Services: an Epok user's cluster is
/// forwarded by `cloak portfwd` unchanged (TCP and UDP, `internal`, `allow-range`, Epok's two
/// ways to exclude a node), and a Service whose `cloak.dev` and Epok names disagree is
/// forwarded by the `cloak.dev` one and gets an Event saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoks_annotations_and_node_exclusions_are_honoured_as_epok_documents_them() {
    let _turn = NODES_IN_USE.lock().await;
    let (prefix, base) = ("pf-epok", 30_200);
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, prefix).await.unwrap();
    let ns = ns.name().to_owned();
    let lab = Lab::new(base);
    let node_name = |i: usize| format!("{prefix}-{}", NODES[i].0);
    node(&client, &node_name(0), NODES[0].1, true, false).await;
    node(&client, &node_name(1), NODES[1].1, true, false).await;
    node(&client, &node_name(2), NODES[2].1, true, false).await;
    node(&client, &node_name(3), NODES[3].1, true, false).await;
    // Epok's two exclusions: the annotation with any value, and the label.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &node_name(2),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"epok.getbetter.ro/exclude": ""}}})),
        )
        .await
        .unwrap();
    nodes
        .patch(
            &node_name(3),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"epok_exclude": "true"}}})),
        )
        .await
        .unwrap();
    // `epok.getbetter.ro/externalports: 22:2022,25:2025`, internal.
    service_ports(
        &client,
        &ns,
        "mail",
        json!({"epok.getbetter.ro/externalports": "22:2022,25:2025", "epok.getbetter.ro/internal": "true"}),
        &[(2022, base + 22, "TCP"), (2025, base + 80, "TCP")],
    )
    .await;
    // `epok.getbetter.ro/externalports: 53:8053:udp`, for one source range only.
    service_ports(
        &client,
        &ns,
        "dns",
        json!({"epok.getbetter.ro/externalports": "53:8053:udp", "epok.getbetter.ro/allow-range": "198.51.100.2/32"}),
        &[(8053, base + 53, "UDP")],
    )
    .await;
    // Both names, disagreeing: cloak.dev's 9000 is forwarded, Epok's 9001 is not.
    service_ports(
        &client,
        &ns,
        "both",
        json!({"cloak.dev/external-ports": "9000:9000", "epok.getbetter.ro/externalports": "9001:9000"}),
        &[(9000, base + 90, "TCP")],
    )
    .await;

    let config = Config {
        options: Options {
            interfaces: vec!["ext0".into(), "int0".into()],
            external_interface: Some("ext0".into()),
        },
        executor: Executor::Local {
            netns: Some(lab.host.name().to_owned()),
        },
        backend: Backend::Nftables,
        debounce: Duration::from_millis(100),
        resync: Duration::from_secs(1),
        instance: "test".into(),
    };
    let forwarder = Forwarder::start(cp.client(), config);

    eventually("mail is forwarded on the internal interface", || {
        let r = Lab::connect(&lab.int, "tcp", "10.99.0.1", 22, None);
        (r.starts_with("node"), r)
    })
    .await;
    // Only the two nodes Epok's names do not exclude receive, both of them.
    let answers: Vec<String> = (0..12)
        .map(|_| Lab::connect(&lab.int, "tcp", "10.99.0.1", 25, None))
        .collect();
    assert!(
        answers.iter().all(|a| a == "node1" || a == "node2"),
        "excluded nodes received: {answers:?}"
    );
    assert!(
        answers.iter().any(|a| a == "node1") && answers.iter().any(|a| a == "node2"),
        "spread: {answers:?}"
    );
    // internal: not through the external interface.
    for port in [22, 25] {
        let r = Lab::connect(&lab.ext, "tcp", "198.51.100.1", port, None);
        assert!(
            r.starts_with("ERR"),
            "internal port {port} from outside: {r}"
        );
    }
    // allow-range over UDP: its source is answered, another is not.
    let udp = Lab::connect(&lab.ext, "udp", "198.51.100.1", 53, Some("198.51.100.2"));
    assert!(
        udp == "node1" || udp == "node2",
        "udp from the range: {udp}"
    );
    let udp = Lab::connect(&lab.ext, "udp", "198.51.100.1", 53, Some("198.51.100.3"));
    assert!(udp.starts_with("ERR"), "udp from outside the range: {udp}");
    // The cloak.dev name won.
    let r = Lab::connect(&lab.ext, "tcp", "198.51.100.1", 9000, None);
    assert!(r.starts_with("node"), "cloak.dev port: {r}");
    let r = Lab::connect(&lab.ext, "tcp", "198.51.100.1", 9001, None);
    assert!(r.starts_with("ERR"), "Epok's disagreeing port: {r}");

    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let mut conflict = None;
    for _ in 0..50 {
        let listed = events
            .list(&kube::api::ListParams::default())
            .await
            .unwrap();
        conflict = listed
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ConflictingAnnotations"));
        if conflict.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let conflict = conflict.expect("no ConflictingAnnotations event");
    assert_eq!(
        conflict.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("both")
    );
    let note = conflict.note.unwrap_or_default();
    assert!(
        note.contains("\"9001:9000\"") && note.ends_with("cloak.dev/external-ports is used"),
        "{note}"
    );
    // Reported once: later syncs (a change to another Service) do not publish it again, which
    // the recorder would show as a series on the same Event.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services
        .patch(
            "mail",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"touched": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = events
        .list(&kube::api::ListParams::default())
        .await
        .unwrap();
    let again: Vec<_> = listed
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ConflictingAnnotations"))
        .collect();
    assert_eq!(again.len(), 1);
    assert!(
        again[0].series.is_none(),
        "published again: {:?}",
        again[0].series
    );

    forwarder.stop().await;
    Executor::Local {
        netns: Some(lab.host.name().to_owned()),
    }
    .clean_with(Backend::Nftables)
    .await
    .unwrap();
    // Removed now, not with the namespace later: the other scenarios claim the same external
    // ports (22, 53), which go to the first Service in namespace order.
    for name in ["mail", "dns", "both"] {
        services
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for i in 0..NODES.len() {
        nodes
            .delete(&node_name(i), &DeleteParams::default())
            .await
            .unwrap();
    }
}

/// Kills sshd and removes its files when the test ends, even on panic.
struct Kill(Child, std::path::PathBuf);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The SSH executor against a real sshd (on 127.0.0.1, a throwaway host key and client key),
/// whose account may run only the rule-loading command: here the forced command loads into the
/// test's "host" namespace, as a restricted account on a real host would run `sudo nft -f -`.
#[tokio::test]
async fn the_ssh_executor_loads_rules_through_a_restricted_account() {
    let host = Netns::new("sshhost");
    let dir = std::env::temp_dir().join(format!("cloak-sshd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let keygen = |file: &str| {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(file))
            .status()
            .unwrap();
        assert!(status.success());
    };
    keygen("host_key");
    keygen("client_key");
    let public = std::fs::read_to_string(dir.join("client_key.pub")).unwrap();
    let forced = format!(
        "command=\"ip netns exec {} nft -f -\",no-pty,no-port-forwarding {public}",
        host.name()
    );
    std::fs::write(dir.join("authorized_keys"), forced).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\nPidFile {dir}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut sshd = Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(sshd.try_wait().unwrap().is_none(), "sshd exited");
        assert!(Instant::now() < deadline, "sshd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _guard = Kill(sshd, dir.clone());

    let executor = Executor::Ssh {
        destination: "root@127.0.0.1".into(),
        port: Some(port),
        key: Some(dir.join("client_key")),
        remote_command: "sudo nft -f -".into(),
        options: vec![
            "StrictHostKeyChecking=no".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "LogLevel=ERROR".into(),
        ],
    };
    let options = Options {
        interfaces: vec!["eth0".into()],
        external_interface: None,
    };
    let ruleset = cloak_model::portfwd::Ruleset {
        options,
        nodes: vec!["10.98.0.11".parse().unwrap()],
        forwards: vec![],
    };
    executor.load(&ruleset.to_nft()).await.unwrap();
    assert!(
        host.run(&["nft", "list", "tables"])
            .contains("table ip cloak_portfwd")
    );
    executor.clean_with(Backend::Nftables).await.unwrap();
    assert!(
        !host
            .run(&["nft", "list", "tables"])
            .contains("cloak_portfwd")
    );
    // A broken script is an error that says why.
    let err = executor.load("this is not nft\n").await.unwrap_err();
    assert!(err.to_string().contains("exited with"), "{err}");
}

/// Deletes a namespace made outside [`Netns`] (its name is fixed in advance), even on panic.
struct Del(String);
impl Drop for Del {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A failed apply is retried with backoff until it succeeds (Epok dropped it): the forwarder
/// starts while its target namespace does not exist yet, and loads once it appears.
#[tokio::test]
async fn a_failed_apply_is_retried_until_it_succeeds() {
    let cp = ControlPlane::shared();
    let later = format!("ck{}-later", std::process::id() % 100_000);
    let config = Config {
        options: Options {
            interfaces: vec!["eth0".into()],
            external_interface: None,
        },
        executor: Executor::Local {
            netns: Some(later.clone()),
        },
        backend: Backend::Nftables,
        debounce: Duration::from_millis(50),
        resync: Duration::from_secs(1),
        instance: "retry-test".into(),
    };
    let forwarder = Forwarder::start(cp.client(), config);
    let (metrics, ready) = (forwarder.metrics.clone(), forwarder.ready.clone());
    eventually("an apply has failed", || {
        (
            metrics.failures.get() >= 1,
            format!("failures {}", metrics.failures.get()),
        )
    })
    .await;
    assert!(
        !ready.load(std::sync::atomic::Ordering::Relaxed),
        "not ready before a ruleset is loaded"
    );
    cloak_testkit::netns::ip_ok(&["netns", "add", &later]);
    let _cleanup = Del(later.clone());
    eventually("the retry loads the ruleset", || {
        (
            ready.load(std::sync::atomic::Ordering::Relaxed),
            String::new(),
        )
    })
    .await;
    let tables = Command::new("ip")
        .args(["netns", "exec", &later, "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&tables.stdout).contains("cloak_portfwd"));
    forwarder.stop().await;
}

/// What the forwarder's table holds in `host` now (empty when there is none).
fn listing(host: &Netns) -> String {
    let out = host
        .command("nft")
        .args(["list", "table", "ip", "cloak_portfwd"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn annotate(client: &Client, ns: &str, name: &str, annotations: serde_json::Value) {
    Api::<Service>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap();
}

/// An incremental update that fails (someone removed, by hand, an element it deletes) is not
/// retried as it is forever: the next attempt loads the whole table, and later changes apply.
#[tokio::test]
async fn a_failed_incremental_update_falls_back_to_a_full_load() {
    let _turn = NODES_IN_USE.lock().await;
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, "pf-delta").await.unwrap();
    let ns = ns.name().to_owned();
    let host = Netns::new("delta");
    node(&client, "pf-delta-node", "10.98.0.21", true, false).await;
    for (name, external, node_port) in [("a", 41_001, 30_301), ("b", 41_002, 30_302)] {
        service(
            &client,
            &ns,
            name,
            json!({"cloak.dev/external-ports": format!("{external}:{external}")}),
            external,
            node_port,
            "TCP",
        )
        .await;
    }
    let config = Config {
        options: Options {
            interfaces: vec!["eth0".into()],
            external_interface: None,
        },
        executor: Executor::Local {
            netns: Some(host.name().to_owned()),
        },
        backend: Backend::Nftables,
        debounce: Duration::from_millis(50),
        // Long: this test is about the failed update, not about the periodic read-back.
        resync: Duration::from_hours(1),
        instance: "delta-test".into(),
    };
    let forwarder = Forwarder::start(cp.client(), config);
    eventually("a and b are forwarded", || {
        let l = listing(&host);
        (l.contains("41001") && l.contains("41002"), l)
    })
    .await;
    // Someone removes a's elements by hand; then a stops being forwarded and c starts: the
    // update deletes a's elements, which are gone, so it fails as one transaction.
    let table = listing(&host);
    let a_keys: Vec<&str> = table
        .split(['{', '}', ','])
        .map(str::trim)
        .filter(|e| e.contains(". 41001 :"))
        .map(|e| e.split(" :").next().unwrap())
        .collect();
    assert!(!a_keys.is_empty(), "{table}");
    host.run(&[
        "nft",
        "delete",
        "element",
        "ip",
        "cloak_portfwd",
        "fwd_tcp",
        &format!("{{ {} }}", a_keys.join(", ")),
    ]);
    annotate(&client, &ns, "a", json!({"cloak.dev/external-ports": null})).await;
    service(
        &client,
        &ns,
        "c",
        json!({"cloak.dev/external-ports": "41003:41003"}),
        41_003,
        30_303,
        "TCP",
    )
    .await;
    eventually("c is forwarded and a is not", || {
        let l = listing(&host);
        (l.contains("41003") && !l.contains("41001"), l)
    })
    .await;
    assert!(forwarder.metrics.failures.get() >= 1, "the delta failed");
    forwarder.stop().await;
    let _ = Api::<Node>::all(client.clone())
        .delete("pf-delta-node", &DeleteParams::default())
        .await;
}

/// Rules changed on the host behind the forwarder's back (a flushed table, a flushed chain) are
/// noticed by the periodic read-back, counted as drift, and reloaded in full, on both backends.
#[tokio::test]
async fn rules_flushed_on_the_host_are_noticed_and_restored() {
    let _turn = NODES_IN_USE.lock().await;
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, "pf-drift").await.unwrap();
    let ns = ns.name().to_owned();
    node(&client, "pf-drift-node", "10.98.0.22", true, false).await;
    service(
        &client,
        &ns,
        "d",
        json!({"cloak.dev/external-ports": "42001:42001"}),
        42_001,
        30_311,
        "TCP",
    )
    .await;
    for backend in [Backend::Nftables, Backend::Iptables] {
        let host = Netns::new("drift");
        let config = Config {
            options: Options {
                interfaces: vec!["eth0".into()],
                external_interface: None,
            },
            executor: Executor::Local {
                netns: Some(host.name().to_owned()),
            },
            backend,
            debounce: Duration::from_millis(50),
            resync: Duration::from_millis(500),
            instance: "drift-test".into(),
        };
        let (loaded, flush): (Box<dyn Fn() -> String>, &[&str]) = match backend {
            Backend::Nftables => (
                Box::new(|| listing(&host)),
                &["nft", "delete", "table", "ip", "cloak_portfwd"],
            ),
            Backend::Iptables => (
                Box::new(|| {
                    let out = host.command("iptables-save").output().unwrap();
                    String::from_utf8_lossy(&out.stdout).into_owned()
                }),
                &["iptables", "-t", "nat", "-F", "CLOAK-PORTFWD"],
            ),
        };
        let forwarder = Forwarder::start(cp.client(), config);
        eventually("d is forwarded", || {
            let l = loaded();
            (l.contains("42001"), l)
        })
        .await;
        assert_eq!(
            forwarder.metrics.drift.get(),
            0,
            "{backend:?}: no drift yet"
        );
        // Another test's annotated Service changes this forwarder's rules too, and the load
        // that follows may put the flushed rules back before the read-back notices: flushed
        // again then, a few times at most.
        for _ in 0..5 {
            host.run(flush);
            if loaded().contains("42001") {
                continue; // a load came between the flush and the look
            }
            eventually("the flushed rules are back", || {
                let l = loaded();
                (l.contains("42001"), l)
            })
            .await;
            if forwarder.metrics.drift.get() >= 1 {
                break;
            }
        }
        assert!(forwarder.metrics.drift.get() >= 1, "{backend:?}");
        // Counted once the loader has exited, which may be just after the rules are seen.
        eventually("the repair counted as a full load", || {
            let loads = forwarder.metrics.full_loads.get();
            (loads >= 2, format!("{backend:?}: {loads} full loads"))
        })
        .await;
        forwarder.stop().await;
    }
    let _ = Api::<Node>::all(client.clone())
        .delete("pf-drift-node", &DeleteParams::default())
        .await;
}
