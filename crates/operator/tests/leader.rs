//! Leader election against a real kube-apiserver: of two operator instances only the Lease holder
//! acts, and the other takes over once the holder stops.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_futures)] // test helpers

use std::time::{Duration, Instant};

mod common;

use cloak_api::VpnProvider;
use cloak_testkit::{ControlPlane, TestNamespace};
use common::Running;
use k8s_openapi::api::{coordination::v1::Lease, events::v1::Event};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use serde_json::json;

fn start(instance: &str, client: Client, lease_ns: &str) -> Running {
    let config = cloak_operator::Config {
        instance: instance.into(),
        leader_lease: Some((lease_ns.into(), "cloak-leader".into())),
        ..cloak_operator::Config::default()
    };
    Running::start(client, config)
}

async fn provider_without_secret(client: &Client, ns: &str, name: &str) {
    let object: VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name},
        "spec": {"secret": "absent", "maxSlots": 1, "namespaces": [ns]}
    }))
    .unwrap();
    Api::<VpnProvider>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// The instances that published an event about `name`, once there is one.
async fn reporters(client: &Client, ns: &str, name: &str, within: Duration) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + within;
    loop {
        let found: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.reporting_instance)
            .collect();
        if !found.is_empty() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no event about {name} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new provider is handled by `instance` alone (every Event about it is that instance's), and
/// `instance` holds the leader Lease.
async fn acts_alone(client: &Client, ns: &str, provider: &str, instance: &str, within: Duration) {
    provider_without_secret(client, ns, provider).await;
    let seen = reporters(client, ns, provider, within).await;
    assert!(
        seen.iter().all(|r| r == instance),
        "only {instance} acts: {seen:?}"
    );
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get("cloak-leader")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(instance)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_acts_and_the_other_takes_over_when_it_stops() {
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, "leader").await.unwrap();
    let ns = ns.name().to_owned();
    let first = start("first", cp.client(), &ns);
    // Let `first` win the election before `second` starts.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    while leases.get_opt("cloak-leader").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "no leader lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = start("second", cp.client(), &ns);

    acts_alone(&client, &ns, "one", "first", Duration::from_secs(20)).await;

    // The leader stops; after the lease expires the other instance takes over and acts.
    first.stop().await;
    let within = cloak_operator::leader::LEASE_DURATION + Duration::from_secs(15);
    acts_alone(&client, &ns, "two", "second", within).await;
    second.stop().await;
}

/// A leader cut off from the API server (its requests neither fail nor finish) stops acting
/// before its Lease can expire, so it never acts beside the instance that takes over
/// (defect 4 of the hardening issue: without a renew deadline and request timeouts it never
/// noticed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_steps_down_before_another_instance_can_take_over() {
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, "partition").await.unwrap();
    let ns = ns.name().to_owned();
    let partition = cloak_testkit::partition::Partition::start(cp.api_addr()).await;
    let first = start("first", cp.client_via(partition.addr()), &ns);
    acts_alone(&client, &ns, "one", "first", Duration::from_secs(20)).await;

    partition.freeze(true);
    let cut_off = Instant::now();
    let second = start("second", cp.client(), &ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let deadline = cut_off + cloak_operator::leader::LEASE_DURATION + Duration::from_secs(20);
    loop {
        let holder = leases
            .get("cloak-leader")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity);
        if holder.as_deref() == Some("second") {
            assert!(
                first.finished(),
                "second took the Lease {:?} after the partition while first still runs",
                cut_off.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "second never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stepped_down = first.outcome().await;
    let message = stepped_down
        .expect_err("first ends with an error")
        .to_string();
    assert!(message.contains("leadership lost"), "{message}");
    acts_alone(&client, &ns, "two", "second", Duration::from_secs(20)).await;
    second.stop().await;
}

/// `GET path` on `addr`: the status code and the body, or the connection error.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((code, body))
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until `GET /readyz` on `addr` answers `want`; panics with the last answer otherwise.
async fn readyz_becomes(addr: std::net::SocketAddr, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let answer = http_get(addr, "/readyz").await;
        if let Ok((code, body)) = &answer
            && *code == want
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz on {addr} did not answer {want} within {within:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A rolling update of the chart waits for every replica's readiness probe: a standby that
/// would serve once elected must be Ready, or the rollout never completes (defect 3 of the
/// hardening issue). Leadership is reported apart, in `cloak_leader`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_is_ready_and_reports_that_it_does_not_lead() {
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, "standby").await.unwrap();
    let ns = ns.name().to_owned();
    let with_admin = |instance: &str, addr| cloak_operator::Config {
        instance: instance.into(),
        admin_addr: Some(addr),
        leader_lease: Some((ns.clone(), "cloak-leader".into())),
        ..cloak_operator::Config::default()
    };
    let (leader_addr, standby_addr) = (free_addr(), free_addr());
    let leader = Running::start(cp.client(), with_admin("leader", leader_addr));
    readyz_becomes(leader_addr, 200, Duration::from_secs(30)).await;
    let standby = Running::start(cp.client(), with_admin("standby", standby_addr));
    readyz_becomes(standby_addr, 200, Duration::from_secs(30)).await;

    let leads = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("cloak_leader "))
            .map(|l| l.trim_end().ends_with(" 1"))
    };
    let (_, metrics) = http_get(leader_addr, "/metrics").await.unwrap();
    assert_eq!(leads(&metrics), Some(true), "leader's metrics:\n{metrics}");
    let (_, metrics) = http_get(standby_addr, "/metrics").await.unwrap();
    assert_eq!(
        leads(&metrics),
        Some(false),
        "standby's metrics:\n{metrics}"
    );
    standby.stop().await;
    leader.stop().await;
}
