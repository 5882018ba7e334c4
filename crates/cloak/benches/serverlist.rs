//! gluetun server-list benchmark against a real local control plane, with `cloak operator`
//! running as its own process so its memory is its own:
//!
//! - time from a VpnProvider created with a list of 1,000 WireGuard servers (a ConfigMap of the
//!   list's section) to Ready, five providers one after another;
//! - the same from a URL serving a whole list the size of gluetun's file (about 2 MB, the
//!   1,000 servers among some 9,000 OpenVPN servers of other providers), fetched over loopback;
//! - time to a Ready mask whose copy holds the 1,000 servers' files;
//! - the operator's RSS idle, then with the lists loaded (current and peak).
//!
//! Verification is skipped: it is a pod's tunnel (measured by the lab), not the list's cost.
//! Run: `cargo bench -p cloak --bench serverlist`. Prints figures; asserts nothing about speed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::large_futures,
    clippy::cast_precision_loss // counts far below 2^52
)]

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cloak_testkit::{ControlPlane, rss_mib};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::{Api, Client, api::PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVERS: usize = 1000;
/// OpenVPN servers of other providers in the whole file, to reach gluetun's file's size.
const OTHERS: usize = 9000;
const RUNS: usize = 5;

/// A list in gluetun's format: `mullvad` with `SERVERS` WireGuard servers in 40 cities,
/// and, when `others`, sections of other providers with `OTHERS` OpenVPN servers between them.
fn server_list(others: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mullvad: Vec<Value> = (0..SERVERS)
        .map(|i| {
            json!({
                "vpn": "wireguard", "country": format!("Country {}", i % 40),
                "city": format!("City {}", i % 40), "hostname": format!("xx-c{}-wg-{i:03}", i % 40),
                "isp": "M247", "owned": i % 3 == 0,
                "ips": [format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256), format!("2001:db8::{i:x}")],
                "wgpubkey": cloak_model::secret::Key::generate().public().to_string(),
            })
        })
        .collect();
    let mut root =
        json!({"version": 1, "mullvad": {"version": 4, "timestamp": now, "servers": mullvad}});
    if others {
        let names = [
            "cyberghost",
            "expressvpn",
            "nordvpn",
            "private internet access",
            "surfshark",
            "vyprvpn",
        ];
        for (n, name) in names.iter().enumerate() {
            let servers: Vec<Value> = (0..OTHERS / names.len())
                .map(|i| {
                    json!({
                        "vpn": "openvpn", "country": format!("Country {}", i % 60),
                        "region": format!("Region {}", i % 90), "city": format!("City {}", i % 120),
                        "hostname": format!("{}{i}.{name}.example", i % 60), "tcp": true, "udp": true,
                        "ips": [format!("10.{n}.{}.{}", i / 256, i % 256)],
                    })
                })
                .collect();
            root[*name] = json!({"version": 3, "timestamp": now, "servers": servers});
        }
    }
    serde_json::to_string(&root).unwrap()
}

/// Serves `body` to every HTTP request on a loopback port; returns the port.
async fn serve(body: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    });
    port
}

/// Creates provider `name` on Secret `gluetun` with list `source`; returns the time to Ready
/// (and the pool's size it reports).
async fn time_to_ready(client: &Client, ns: &str, name: &str, source: Value) -> (Duration, u64) {
    let providers: Api<cloak_api::VpnProvider> = Api::namespaced(client.clone(), ns);
    let mut spec = json!({"secret": "gluetun", "maxSlots": 10, "tags": [name.trim_end_matches(char::is_numeric)], "verify": {"skip": true}});
    if !source.is_null() {
        spec["serverList"] = source;
    }
    let p: cloak_api::VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    let started = Instant::now();
    providers.create(&PostParams::default(), &p).await.unwrap();
    let deadline = started + Duration::from_mins(2);
    loop {
        let status = providers
            .get(name)
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if status.phase == Some(cloak_api::ProviderPhase::Ready) {
            let servers = status.server_list.map_or(0, |l| u64::from(l.servers));
            return (started.elapsed(), servers);
        }
        assert!(
            Instant::now() < deadline,
            "{name} not Ready: {:?}",
            status.message
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let cp = ControlPlane::start().await.unwrap();
    let client = cp.client();
    let ns = "bench";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let key = cloak_model::secret::Key::generate();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "gluetun"},
        "stringData": {
            "VPN_SERVICE_PROVIDER": "mullvad", "VPN_TYPE": "wireguard",
            "WIREGUARD_PRIVATE_KEY": &*key.to_base64(), "WIREGUARD_ADDRESSES": "10.64.0.2/32",
        }
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let section = server_list(false);
    let whole = server_list(true);
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "servers"}, "data": {"servers.json": section}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let whole_len = whole.len();
    let port = serve(whole).await;

    let mut operator = Command::new(env!("CARGO_BIN_EXE_cloak"));
    std::os::unix::process::CommandExt::process_group(&mut operator, 0);
    let mut operator = operator
        .args([
            "operator",
            "--no-leader-election",
            "--admin-addr",
            "127.0.0.1:0",
            "--allow-http-server-lists",
        ])
        .env("KUBECONFIG", cp.kubeconfig())
        .env("RUST_LOG", "warn")
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = operator.id();
    // A provider without a list first: the operator is up and has synced its caches.
    let plain: cloak_api::VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": "plain"},
        "spec": {"secret": "gluetun", "maxSlots": 1, "verify": {"skip": true}}
    }))
    .unwrap();
    let providers: Api<cloak_api::VpnProvider> = Api::namespaced(client.clone(), ns);
    providers
        .create(&PostParams::default(), &plain)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_mins(2);
    while providers
        .get("plain")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase)
        != Some(cloak_api::ProviderPhase::Ready)
    {
        assert!(
            Instant::now() < deadline,
            "the operator never made a provider Ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle, _) = rss_mib(pid);

    // The bare baseline: the same Secret, no list (its pool is gluetun's, not run natively).
    let mut bare = Vec::new();
    for run in 0..RUNS {
        bare.push(
            time_to_ready(&client, ns, &format!("bare{run}"), Value::Null)
                .await
                .0,
        );
    }
    let mut from_map = Vec::new();
    for run in 0..RUNS {
        let (took, servers) = time_to_ready(
            &client,
            ns,
            &format!("map{run}"),
            json!({"configMap": {"name": "servers"}}),
        )
        .await;
        assert_eq!(servers, SERVERS as u64);
        from_map.push(took);
    }
    let (rss_map, _) = rss_mib(pid);
    let url = format!("http://127.0.0.1:{port}/servers.json");
    let mut from_url = Vec::new();
    for run in 0..RUNS {
        let (took, servers) =
            time_to_ready(&client, ns, &format!("url{run}"), json!({"url": url})).await;
        assert_eq!(servers, SERVERS as u64);
        from_url.push(took);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_url, hwm_url) = rss_mib(pid);

    // A mask on the URL provider: its copy holds one file a server.
    let masks: Api<cloak_api::VpnMask> = Api::namespaced(client.clone(), ns);
    let mask: cloak_api::VpnMask = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnMask", "metadata": {"name": "m"},
        "spec": {"providers": ["url"]}
    }))
    .unwrap();
    let started = Instant::now();
    masks.create(&PostParams::default(), &mask).await.unwrap();
    let deadline = started + Duration::from_mins(2);
    let copy_name = loop {
        let status = masks.get("m").await.unwrap().status.unwrap_or_default();
        if status.phase == Some(cloak_api::MaskPhase::Ready) {
            break status.provider.map(|p| p.secret).unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "the mask never got Ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mask_took = started.elapsed();
    let copy = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&copy_name)
        .await
        .unwrap();
    let data = copy.data.unwrap_or_default();
    let files = data
        .keys()
        .filter(|k| {
            std::path::Path::new(k)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("conf"))
        })
        .count();
    let copy_bytes: usize = data.values().map(|v| v.0.len()).sum();
    let (rss_end, hwm_end) = rss_mib(pid);

    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{pid}")])
        .status();
    let _ = operator.wait();
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2].as_secs_f64() * 1e3
    };
    let baseline = median(&mut bare);
    let summary = |times: &mut Vec<Duration>| {
        let m = median(times);
        format!(
            "median {m:6.0} ms, max {:6.0} ms ({:.2}x bare)",
            times[times.len() - 1].as_secs_f64() * 1e3,
            m / baseline
        )
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "server-list benchmark ({SERVERS} WireGuard servers; operator as its own process)"
    );
    let _ = writeln!(
        out,
        "  created -> Ready, no list (bare baseline)      median {baseline:6.0} ms"
    );
    let _ = writeln!(
        out,
        "  created -> Ready, ConfigMap ({:.0} KiB section)  {}",
        section.len() as f64 / 1024.0,
        summary(&mut from_map)
    );
    let _ = writeln!(
        out,
        "  created -> Ready, URL ({:.1} MiB whole file)     {}",
        whole_len as f64 / 1024.0 / 1024.0,
        summary(&mut from_url)
    );
    let _ = writeln!(
        out,
        "  mask created -> Ready (copy: {files} files, {:.0} KiB) {:6.0} ms",
        copy_bytes as f64 / 1024.0,
        mask_took.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        out,
        "  operator RSS idle (one plain provider)     {idle:6.1} MiB"
    );
    let _ = writeln!(
        out,
        "  operator RSS, {RUNS} ConfigMap-list providers    {rss_map:6.1} MiB"
    );
    let _ = writeln!(
        out,
        "  operator RSS, + {RUNS} URL-list providers        {rss_url:6.1} MiB (peak {hwm_url:.1} MiB)"
    );
    let _ = writeln!(
        out,
        "  operator RSS, + the mask                     {rss_end:6.1} MiB (peak {hwm_end:.1} MiB)"
    );
    print!("{out}");
    drop(cp);
}
