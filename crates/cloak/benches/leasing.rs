//! Slot-leasing benchmark against a real local control plane, with `cloak operator` running as
//! its own process so its memory is its own:
//!
//! - time to lease 1,000 masks across 50 providers,
//! - API requests per mask (kube-apiserver's own request counter, minus the benchmark's requests),
//! - the operator's RSS (current and peak) with 1,000 and then 10,000 masks.
//!
//! Run: `cargo bench -p cloak --bench leasing` (or `-- 200` for a quick run with fewer masks).
//! Prints figures; asserts nothing about speed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::large_futures,
    clippy::cast_precision_loss // counts far below 2^52
)]

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cloak_testkit::{ControlPlane, rss_mib};
use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, PostParams},
};
use serde_json::json;

const PROVIDERS: usize = 50;
const SLOTS_PER_PROVIDER: u32 = 200;

/// Total requests kube-apiserver has served, from its own metrics.
async fn apiserver_requests(client: &Client) -> f64 {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many samples the operator's `/metrics` holds (what one scrape stores).
fn series(admin: std::net::SocketAddr) -> usize {
    let (_, body) = cloak_testkit::http_get(admin, "/metrics").unwrap();
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// Creates masks `from..to`, 16 at a time; returns how many requests that took.
async fn create_masks(client: &Client, ns: &str, from: usize, to: usize) -> usize {
    let masks: Api<cloak_api::VpnMask> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(from..to)
        .map(|i| {
            let masks = masks.clone();
            async move {
                let mask =
                    cloak_api::VpnMask::new(&format!("m{i}"), cloak_api::VpnMaskSpec::default());
                masks.create(&PostParams::default(), &mask).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    to - from
}

/// Polls until `want` masks are Ready; returns the number of list requests made.
async fn wait_ready(client: &Client, ns: &str, want: usize) -> usize {
    let masks: Api<cloak_api::VpnMask> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_mins(30);
    let mut polls = 0;
    loop {
        polls += 1;
        let ready = masks
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|m| {
                m.status.as_ref().and_then(|s| s.phase) == Some(cloak_api::MaskPhase::Ready)
            })
            .count();
        if ready >= want {
            return polls;
        }
        assert!(
            Instant::now() < deadline,
            "only {ready} of {want} masks Ready after 30 min"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() {
    let first: usize = std::env::args()
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let second = first * 10;
    let cp = ControlPlane::start().await.unwrap();
    let client = cp.client();
    let ns = "bench";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("creds".into()),
            ..ObjectMeta::default()
        },
        data: Some(
            [(
                "VPN_SERVICE_PROVIDER".to_owned(),
                ByteString(b"mullvad".to_vec()),
            )]
            .into(),
        ),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let providers: Api<cloak_api::VpnProvider> = Api::namespaced(client.clone(), ns);
    for i in 0..PROVIDERS {
        let p: cloak_api::VpnProvider = serde_json::from_value(json!({
            "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": format!("p{i}")},
            "spec": {"secret": "creds", "maxSlots": SLOTS_PER_PROVIDER, "verify": {"skip": true}}
        }))
        .unwrap();
        providers.create(&PostParams::default(), &p).await.unwrap();
    }

    // CLOAK_BENCH_WRAP runs the operator under a tool, e.g. `heaptrack -o /tmp/operator` for
    // a heap profile (the RSS figures are then the tool's, not the operator's).
    let wrap = std::env::var("CLOAK_BENCH_WRAP").unwrap_or_default();
    let mut wrap = wrap.split_whitespace();
    let mut operator = match wrap.next() {
        Some(tool) => {
            let mut c = Command::new(tool);
            c.args(wrap).arg(env!("CARGO_BIN_EXE_cloak"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_cloak")),
    };
    // Its own process group: a wrapper's children are stopped with it.
    std::os::unix::process::CommandExt::process_group(&mut operator, 0);
    // A free port for its admin server, read for the series it exports.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut operator = operator
        .args(["operator", "--no-leader-election", "--admin-addr"])
        .arg(admin.to_string())
        .env("KUBECONFIG", cp.kubeconfig())
        .env("RUST_LOG", "warn")
        // As the chart runs it (fewer glibc arenas: 8-14 % less RSS at 1,000-10,000 masks).
        .env(
            "MALLOC_ARENA_MAX",
            std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = operator.id();
    // Providers Ready before the clock starts.
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        let ready = providers
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().and_then(|s| s.phase) == Some(cloak_api::ProviderPhase::Ready)
            })
            .count();
        if ready == PROVIDERS {
            break;
        }
        assert!(Instant::now() < deadline, "providers not Ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (idle_rss, _) = rss_mib(pid);

    let before = apiserver_requests(&client).await;
    let started = Instant::now();
    let creates = create_masks(&client, ns, 0, first).await;
    let polls = wait_ready(&client, ns, first).await;
    let elapsed = started.elapsed();
    // Let trailing status writes and events land before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = apiserver_requests(&client).await;
    // The benchmark's own requests: creates, list polls, and the two metric reads.
    let ours = (creates + polls + 2) as f64;
    let per_mask = (after - before - ours) / first as f64;
    let (rss_first, hwm_first) = rss_mib(pid);
    let series_first = series(admin);

    let started_second = Instant::now();
    create_masks(&client, ns, first, second).await;
    wait_ready(&client, ns, second).await;
    let elapsed_second = started_second.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_second, hwm_second) = rss_mib(pid);
    let series_second = series(admin);

    // `--`: without it, `kill` takes `-<pid>` for a signal and stops nothing (the run then
    // waited forever for the operator).
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{pid}")])
        .status();
    let _ = operator.wait();
    println!(
        "leasing benchmark ({PROVIDERS} providers x {SLOTS_PER_PROVIDER} slots, operator as its own process)"
    );
    println!("  operator RSS idle (providers only)       {idle_rss:8.1} MiB");
    println!(
        "  lease {first:>6} masks                      {:8.2} s  ({:.0} masks/s)",
        elapsed.as_secs_f64(),
        first as f64 / elapsed.as_secs_f64()
    );
    println!("  API requests per mask (operator)         {per_mask:8.1}");
    println!(
        "  operator RSS at {first:>6} masks            {rss_first:8.1} MiB (peak {hwm_first:.1} MiB)"
    );
    println!(
        "  lease {:>6} more masks                 {:8.2} s",
        second - first,
        elapsed_second.as_secs_f64()
    );
    println!(
        "  operator RSS at {second:>6} masks            {rss_second:8.1} MiB (peak {hwm_second:.1} MiB)"
    );
    println!(
        "  operator /metrics series at {first} / {second} masks   {series_first} / {series_second}"
    );
    drop(cp);
}
