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
