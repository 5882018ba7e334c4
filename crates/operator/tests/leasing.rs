//! The VpnProvider and VpnMask controllers against a real kube-apiserver. One operator instance
//! serves every test of this binary; each test works in a namespace of its own. No kubelet runs:
//! where a test needs a pod's status, it writes it, playing the kubelet's part.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::large_futures,
    clippy::ref_option
)] // test helpers

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use cloak_api::{AssignedProvider, MaskPhase, ProviderPhase, VpnMask, VpnMaskSpec, VpnProvider};
use cloak_testkit::{ControlPlane, TestNamespace};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Pod, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// The shared operator's admin server address.
fn admin_addr() -> std::net::SocketAddr {
    static ADDR: OnceLock<std::net::SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    })
}

/// Starts the shared operator (once per test binary) on a runtime of its own.
fn operator() -> Client {
    static STARTED: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    STARTED.get_or_init(|| {
        let config = cloak_operator::Config {
            instance: "test-operator".into(),
            admin_addr: Some(admin_addr()),
            verify_ip_url: "http://ip.test.invalid/".into(),
            ..cloak_operator::Config::default()
        };
        // RUST_LOG=cloak_operator=debug shows what the operator does during a test run.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let client = cp.client();
                cloak_operator::run(client, config, futures::future::pending())
                    .await
                    .unwrap();
            });
        });
    });
    cp.client()
}

async fn setup(test: &str) -> (Client, String) {
    let client = operator();
    let ns = TestNamespace::create(&client, test).await.unwrap();
    (client, ns.name().to_owned())
}

async fn secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

/// A provider open to `ns` only, so tests running side by side never share one.
async fn provider(client: &Client, ns: &str, name: &str, mut spec: serde_json::Value) {
    spec["namespaces"] = json!([ns]);
    let object: VpnProvider = serde_json::from_value(
        json!({"apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name}, "spec": spec}),
    )
    .unwrap();
    Api::<VpnProvider>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// A provider of Secret `creds` with `maxSlots` slots, Ready without verification.
async fn skip_provider(client: &Client, ns: &str, name: &str, max_slots: u32) {
    let spec = json!({"secret": "creds", "maxSlots": max_slots, "verify": {"skip": true}});
    provider(client, ns, name, spec).await;
}

async fn mask(client: &Client, ns: &str, name: &str, tags: &[&str]) {
    let mask = VpnMask::new(
        name,
        VpnMaskSpec {
            providers: tags.iter().map(|t| (*t).to_owned()).collect(),
            avoid_providers: Vec::new(),
        },
    );
    Api::<VpnMask>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &mask)
        .await
        .unwrap();
}

/// Polls `get` until `done` holds, or fails the test with the last value seen.
async fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut get: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = get().await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last: {value:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn mask_status(client: &Client, ns: &str, name: &str) -> Option<cloak_api::VpnMaskStatus> {
    Api::<VpnMask>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|m| m.status)
}

async fn provider_status(
    client: &Client,
    ns: &str,
    name: &str,
) -> Option<cloak_api::VpnProviderStatus> {
    Api::<VpnProvider>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
        .status
}

fn phase(status: &Option<cloak_api::VpnMaskStatus>) -> Option<MaskPhase> {
    status.as_ref().and_then(|s| s.phase)
}

/// Waits until mask `name` is Ready and returns the slot it holds.
async fn ready_slot(client: &Client, ns: &str, name: &str, what: &str) -> AssignedProvider {
    wait_for(
        what,
        async || mask_status(client, ns, name).await,
        |s| phase(s) == Some(MaskPhase::Ready),
    )
    .await
    .and_then(|s| s.provider)
    .expect("a Ready mask names its slot")
}

const GLUETUN: &[(&str, &str)] = &[
    ("VPN_SERVICE_PROVIDER", "mullvad"),
    ("WIREGUARD_PRIVATE_KEY", "k"),
];

#[tokio::test]
async fn a_mask_leases_a_slot_and_gets_a_copy_of_the_credentials() {
    let (client, ns) = setup("lease").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    skip_provider(&client, &ns, "vpn", 2).await;
    wait_for(
        "the provider is Ready",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::Ready),
    )
    .await;
    mask(&client, &ns, "m", &[]).await;
    let held = ready_slot(&client, &ns, "m", "the mask is Ready").await;
    assert_eq!(
        (held.name.as_str(), held.namespace.as_str()),
        ("vpn", ns.as_str())
    );
    assert!(
        held.slot < 2,
        "slot {} of a provider with maxSlots 2",
        held.slot
    );
    let copy = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(&held.secret)
        .await
        .unwrap();
    assert_eq!(copy.data.unwrap()["VPN_SERVICE_PROVIDER"].0, b"mullvad");
    assert_eq!(copy.metadata.owner_references.unwrap()[0].name, "m");
    wait_for(
        "activeSlots is 1",
        async || provider_status(&client, &ns, "vpn").await,
        |s| {
            s.as_ref()
                .is_some_and(|s| s.active_slots == 1 && s.phase == Some(ProviderPhase::Active))
        },
    )
    .await;

    // The provider's Secret changes: the copy follows (seed 000 never updated it).
    secret(
        &client,
        &ns,
        "creds",
        &[
            ("VPN_SERVICE_PROVIDER", "nordvpn"),
            ("WIREGUARD_PRIVATE_KEY", "k2"),
        ],
    )
    .await;
    wait_for(
        "the copy is updated",
        async || {
            Api::<Secret>::namespaced(client.clone(), &ns)
                .get(&held.secret)
                .await
                .unwrap()
        },
        |s| s.data.as_ref().unwrap()["VPN_SERVICE_PROVIDER"].0 == b"nordvpn",
    )
    .await;
}

#[tokio::test]
async fn a_missing_secret_is_reported_and_recovered_from_when_it_appears() {
    let (client, ns) = setup("missing-secret").await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "later", "maxSlots": 1, "verify": {"skip": true}}),
    )
    .await;
    let status = wait_for(
        "ErrSecretNotFound",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::ErrSecretNotFound),
    )
    .await;
    assert!(status.unwrap().message.unwrap().contains("later"));
    secret(&client, &ns, "later", GLUETUN).await;
    wait_for(
        "Ready once the Secret exists",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::Ready),
    )
    .await;
}

#[tokio::test]
async fn an_exhausted_provider_leaves_masks_waiting_until_a_slot_is_released() {
    let (client, ns) = setup("exhausted").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    skip_provider(&client, &ns, "vpn", 1).await;
    mask(&client, &ns, "first", &[]).await;
    wait_for(
        "first is Ready",
        async || mask_status(&client, &ns, "first").await,
        |s| phase(s) == Some(MaskPhase::Ready),
    )
    .await;
    mask(&client, &ns, "second", &[]).await;
    wait_for(
        "second is Waiting",
        async || mask_status(&client, &ns, "second").await,
        |s| phase(s) == Some(MaskPhase::Waiting),
    )
    .await;

    Api::<VpnMask>::namespaced(client.clone(), &ns)
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    let second = ready_slot(&client, &ns, "second", "second gets the freed slot").await;
    assert_eq!(second.slot, 0);
    wait_for(
        "first is gone",
        async || {
            Api::<VpnMask>::namespaced(client.clone(), &ns)
                .get_opt("first")
                .await
                .unwrap()
        },
        Option::is_none,
    )
    .await;
}

/// Two operators allocating for one mask at once, or one stopping between reserving a slot and
/// recording it, leave the mask a second reservation. The provider releases it (the mask keeps
/// the one its status names) and a waiting mask gets the slot.
#[tokio::test]
async fn a_second_reservation_of_a_mask_is_released_for_a_waiting_mask() {
    let (client, ns) = setup("double").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    skip_provider(&client, &ns, "vpn", 2).await;
    mask(&client, &ns, "first", &[]).await;
    let held = ready_slot(&client, &ns, "first", "first is Ready").await;
    let first_uid = Api::<VpnMask>::namespaced(client.clone(), &ns)
        .get("first")
        .await
        .unwrap()
        .uid()
        .unwrap();
    let other = 1 - held.slot;
    let extra: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(json!({
        "metadata": {
            "name": format!("cloak-slot-vpn-{other}"),
            "labels": {
                "app.kubernetes.io/managed-by": "cloak",
                "cloak.dev/provider": "vpn",
                "cloak.dev/provider-uid": held.uid,
                "cloak.dev/mask-uid": first_uid,
                "cloak.dev/slot": other.to_string(),
            },
            "annotations": {"cloak.dev/mask": format!("{ns}/first")},
        },
        "spec": {"holderIdentity": format!("{ns}/first")},
    }))
    .unwrap();
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), &ns);
    leases.create(&PostParams::default(), &extra).await.unwrap();
    mask(&client, &ns, "second", &[]).await;

    let second = ready_slot(
        &client,
        &ns,
        "second",
        "second gets the slot first held twice",
    )
    .await;
    assert_eq!(second.slot, other);
    let lease = leases
        .get_metadata(&format!("cloak-slot-vpn-{other}"))
        .await
        .unwrap();
    assert_ne!(lease.labels()["cloak.dev/mask-uid"], first_uid);
    let first = mask_status(&client, &ns, "first").await.unwrap();
    assert_eq!(
        first.provider,
        Some(held),
        "first keeps the slot it records"
    );
}

#[tokio::test]
async fn a_mask_with_unmatched_tags_has_no_providers() {
    let (client, ns) = setup("no-providers").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "creds", "maxSlots": 1, "tags": ["eu"], "verify": {"skip": true}}),
    )
    .await;
    mask(&client, &ns, "m", &["us"]).await;
    let status = wait_for(
        "ErrNoProviders",
        async || mask_status(&client, &ns, "m").await,
        |s| phase(s) == Some(MaskPhase::ErrNoProviders),
    )
    .await;
    assert!(status.unwrap().message.unwrap().contains("us"));
}

#[tokio::test]
async fn the_provider_with_most_free_slots_is_chosen() {
    let (client, ns) = setup("spread").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    provider(
        &client,
        &ns,
        "small",
        json!({"secret": "creds", "maxSlots": 1, "tags": ["t"], "verify": {"skip": true}}),
    )
    .await;
    provider(
        &client,
        &ns,
        "big",
        json!({"secret": "creds", "maxSlots": 3, "tags": ["t"], "verify": {"skip": true}}),
    )
    .await;
    for p in ["small", "big"] {
        wait_for(
            "providers Ready",
            async || provider_status(&client, &ns, p).await,
            |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::Ready),
        )
        .await;
    }
    mask(&client, &ns, "m", &["t"]).await;
    let held = ready_slot(&client, &ns, "m", "m is Ready").await;
    assert_eq!(held.name, "big");
}

#[tokio::test]
async fn a_pod_owned_by_the_mask_makes_it_active_and_delays_release_until_it_is_gone() {
    let (client, ns) = setup("active").await;
    one_slot_provider_and_ready_mask(&client, &ns).await;
    use_mask(&client, &ns, "m", "user").await;

    delete_mask_in_use(&client, &ns, &DeleteParams::default()).await;
}

#[tokio::test]
async fn deleting_a_provider_moves_its_masks_to_another() {
    let (client, ns) = setup("provider-deleted").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    skip_provider(&client, &ns, "a", 5).await;
    wait_for(
        "a Ready",
        async || provider_status(&client, &ns, "a").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::Ready),
    )
    .await;
    mask(&client, &ns, "m", &[]).await;
    let first_secret = ready_slot(&client, &ns, "m", "m on a").await.secret;
    skip_provider(&client, &ns, "b", 1).await;
    Api::<VpnProvider>::namespaced(client.clone(), &ns)
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    let moved = wait_for(
        "m moves to b",
        async || mask_status(&client, &ns, "m").await,
        |s| {
            s.as_ref()
                .and_then(|s| s.provider.as_ref())
                .is_some_and(|p| p.name == "b")
        },
    )
    .await;
    assert_eq!(moved.unwrap().phase, Some(MaskPhase::Ready));
    let copy = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&first_secret)
        .await
        .unwrap();
    assert!(
        copy.is_some(),
        "the copy is recreated for the new provider under the same name"
    );
}

#[tokio::test]
async fn verification_holds_a_slot_and_passes_when_the_probe_succeeds() {
    let (client, ns) = setup("verify-pass").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    provider(&client, &ns, "vpn", json!({"secret": "creds", "maxSlots": 1,
        "verify": {"timeout": "5m", "overrides": {"containers": {"vpn": {"image": "qmcgaw/gluetun:v3"}}}}}))
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let pod = wait_for(
        "the verification pod exists",
        async || pods.get_opt("vpn-verify").await.unwrap(),
        Option::is_some,
    )
    .await
    .unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some("qmcgaw/gluetun:v3")
    );
    wait_for(
        "verification holds one of the provider's slots",
        async || provider_status(&client, &ns, "vpn").await,
        |s| {
            s.as_ref()
                .is_some_and(|s| s.phase == Some(ProviderPhase::Verifying) && s.active_slots == 1)
        },
    )
    .await;

    // Play the kubelet: the probe container exits 0.
    let probe_done = json!({"status": {"phase": "Running", "containerStatuses": [
        {"name": "probe", "ready": false, "restartCount": 0, "image": "curl", "imageID": "",
         "state": {"terminated": {"exitCode": 0}}}]}});
    pods.patch_status(
        "vpn-verify",
        &PatchParams::default(),
        &Patch::Merge(&probe_done),
    )
    .await
    .unwrap();
    let status = wait_for(
        "the provider is Ready",
        async || provider_status(&client, &ns, "vpn").await,
        |s| {
            s.as_ref()
                .is_some_and(|s| s.phase == Some(ProviderPhase::Ready) && s.active_slots == 0)
        },
    )
    .await;
    assert!(status.unwrap().last_verified.is_some());
    wait_for(
        "the verification pod is removed",
        async || pods.get_opt("vpn-verify").await.unwrap(),
        Option::is_none,
    )
    .await;
}

#[tokio::test]
async fn verification_fails_when_the_probe_fails_and_says_why() {
    let (client, ns) = setup("verify-fail").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "creds", "maxSlots": 1}),
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    wait_for(
        "the verification pod exists",
        async || pods.get_opt("vpn-verify").await.unwrap(),
        Option::is_some,
    )
    .await;
    let failed = json!({"status": {"phase": "Running", "containerStatuses": [
        {"name": "probe", "ready": false, "restartCount": 0, "image": "curl", "imageID": "",
         "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}});
    pods.patch_status(
        "vpn-verify",
        &PatchParams::default(),
        &Patch::Merge(&failed),
    )
    .await
    .unwrap();
    let status = wait_for(
        "ErrVerifyFailed",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::ErrVerifyFailed),
    )
    .await;
    assert!(
        status
            .unwrap()
            .message
            .unwrap()
            .contains("probe exited with 1")
    );
    // Masks get no slot of an unverified provider.
    mask(&client, &ns, "m", &[]).await;
    wait_for(
        "m has no provider",
        async || mask_status(&client, &ns, "m").await,
        |s| phase(s) == Some(MaskPhase::ErrNoProviders),
    )
    .await;
}

#[tokio::test]
async fn malformed_credentials_fail_verification_without_creating_a_pod() {
    let (client, ns) = setup("bad-creds").await;
    secret(&client, &ns, "creds", &[("username", "x")]).await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "creds", "maxSlots": 1}),
    )
    .await;
    let status = wait_for(
        "ErrVerifyFailed",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::ErrVerifyFailed),
    )
    .await;
    assert!(status.unwrap().message.unwrap().contains("no credentials"));
    assert!(
        Api::<Pod>::namespaced(client, &ns)
            .get_opt("vpn-verify")
            .await
            .unwrap()
            .is_none()
    );
}

/// Defect 6 of the hardening issue: the retry guard compared only the provider's generation,
/// so fixing the Secret left the provider failed until someone edited the provider itself.
#[tokio::test]
async fn a_failed_verification_is_retried_when_the_secret_is_fixed() {
    let (client, ns) = setup("fixed-creds").await;
    secret(&client, &ns, "creds", &[("wg0.conf", "[Interface]\n")]).await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "creds", "maxSlots": 1}),
    )
    .await;
    wait_for(
        "ErrVerifyFailed",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::ErrVerifyFailed),
    )
    .await;
    let fixed = "[Interface]\nPrivateKey = wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=\nAddress = 10.64.0.2/32\n\n[Peer]\nPublicKey = wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n";
    secret(&client, &ns, "creds", &[("wg0.conf", fixed)]).await;
    // Without a kubelet the verification pod never runs: Verifying is the retry.
    let status = wait_for(
        "verification retried",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::Verifying),
    )
    .await;
    assert!(status.is_some());
}

/// GET on the shared operator's admin server: (status code, body).
async fn admin_get(path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin_addr()).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn the_admin_server_reports_liveness_readiness_and_recorded_metrics() {
    let (client, ns) = setup("metrics").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    skip_provider(&client, &ns, "metered", 3).await;
    mask(&client, &ns, "m", &[]).await;
    wait_for(
        "m is Ready",
        async || mask_status(&client, &ns, "m").await,
        |s| phase(s) == Some(MaskPhase::Ready),
    )
    .await;
    let (code, body) = wait_for(
        "the admin server answers",
        async || match tokio::net::TcpStream::connect(admin_addr()).await {
            Ok(_) => admin_get("/livez").await,
            Err(_) => (0, String::new()),
        },
        |(code, _)| *code == 200,
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(admin_get("/readyz").await, (200, "ok\n".to_owned()));
    let (code, metrics) = admin_get("/metrics").await;
    assert_eq!(code, 200);
    // Seed 000's metrics were never recorded (a feature-flag typo); these must be.
    let line = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_owned)
    };
    let reconciles =
        line("cloak_reconciles_total{controller=\"vpnmask\",outcome=\"success\"}").expect(&metrics);
    assert!(
        reconciles
            .split_whitespace()
            .last()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= 1.0,
        "{reconciles}"
    );
    assert!(
        line("cloak_reconcile_duration_seconds_count{controller=\"vpnprovider\"}").is_some(),
        "{metrics}"
    );
    let used = format!("cloak_provider_slots_used{{namespace=\"{ns}\",provider=\"metered\"}} 1");
    let max = format!("cloak_provider_slots_max{{namespace=\"{ns}\",provider=\"metered\"}} 3");
    assert!(
        metrics.lines().any(|l| l == used),
        "missing {used} in\n{metrics}"
    );
    assert!(metrics.lines().any(|l| l == max), "missing {max}");
    assert!(line("cloak_masks{phase=\"Ready\"}").is_some(), "{metrics}");
    // The provider's phase, the masks it keeps waiting (none), and every error category from
    // 0 before any error.
    // (Ready or Active: the status follows the lease a reconcile later.)
    let usable = ["Ready", "Active"].map(|p| {
        format!("cloak_provider_phase{{namespace=\"{ns}\",provider=\"metered\",phase=\"{p}\"}} 1")
    });
    assert!(
        metrics.lines().any(|l| usable.iter().any(|u| u == l)),
        "missing {usable:?} in\n{metrics}"
    );
    let waiting =
        format!("cloak_provider_masks_waiting{{namespace=\"{ns}\",provider=\"metered\"}} 0");
    assert!(
        metrics.lines().any(|l| l == waiting),
        "missing {waiting} in\n{metrics}"
    );
    assert!(
        line("cloak_reconcile_errors_total{controller=\"vpnchain\",category=\"Timeout\"}")
            .is_some(),
        "{metrics}"
    );
    // Four masks for three slots: the provider keeps one waiting.
    for name in ["m2", "m3", "m4"] {
        mask(&client, &ns, name, &[]).await;
    }
    wait_for(
        "one of them waits",
        async || {
            let mut phases = Vec::new();
            for name in ["m2", "m3", "m4"] {
                phases.push(phase(&mask_status(&client, &ns, name).await));
            }
            phases
        },
        |phases| phases.contains(&Some(MaskPhase::Waiting)),
    )
    .await;
    let waiting =
        format!("cloak_provider_masks_waiting{{namespace=\"{ns}\",provider=\"metered\"}} 1");
    let (_, metrics) = admin_get("/metrics").await;
    assert!(
        metrics.lines().any(|l| l == waiting),
        "missing {waiting} in\n{metrics}"
    );
}

#[tokio::test]
async fn lowering_max_slots_below_the_holders_keeps_them_and_gives_no_new_slot() {
    let (client, ns) = setup("shrink").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    skip_provider(&client, &ns, "vpn", 2).await;
    for m in ["a", "b"] {
        mask(&client, &ns, m, &[]).await;
        wait_for(
            "holders Ready",
            async || mask_status(&client, &ns, m).await,
            |s| phase(s) == Some(MaskPhase::Ready),
        )
        .await;
    }
    let providers = Api::<VpnProvider>::namespaced(client.clone(), &ns);
    providers
        .patch(
            "vpn",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxSlots": 1}})),
        )
        .await
        .unwrap();
    let status = wait_for(
        "the provider says so",
        async || provider_status(&client, &ns, "vpn").await,
        |s| {
            s.as_ref()
                .and_then(|s| s.message.as_deref())
                .is_some_and(|m| m.contains("maxSlots is 1 but 2 slots are held"))
        },
    )
    .await;
    assert_eq!(status.unwrap().active_slots, 2, "holders keep their slots");
    mask(&client, &ns, "c", &[]).await;
    wait_for(
        "c waits",
        async || mask_status(&client, &ns, "c").await,
        |s| phase(s) == Some(MaskPhase::Waiting),
    )
    .await;
    for m in ["a", "b"] {
        assert_eq!(
            phase(&mask_status(&client, &ns, m).await),
            Some(MaskPhase::Ready)
        );
    }
    // One holder leaves: one slot remains held, which is the new maximum, so c still waits.
    let holder_of_slot_1 = if mask_status(&client, &ns, "a")
        .await
        .unwrap()
        .provider
        .unwrap()
        .slot
        == 1
    {
        "a"
    } else {
        "b"
    };
    Api::<VpnMask>::namespaced(client.clone(), &ns)
        .delete(holder_of_slot_1, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "one slot left held",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().is_some_and(|s| s.active_slots == 1),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        phase(&mask_status(&client, &ns, "c").await),
        Some(MaskPhase::Waiting)
    );
}

/// A reconcile that fails (here: the API server refuses the mask's copy of the credentials, as
/// an admission policy makes it) becomes a Warning Event on the object whose reason is the
/// error's category, once however often it is retried.
#[tokio::test]
async fn a_failing_reconcile_becomes_one_warning_event_named_by_its_category() {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let (client, ns) = setup("failing").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    let admission = |kind: &str| {
        let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
        Api::<DynamicObject>::all_with(client.clone(), &ApiResource::from_gvk(&gvk))
    };
    let policy = format!("cloak-test-{ns}");
    let objects = [
        (
            "ValidatingAdmissionPolicy",
            json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": policy},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": [{
                        "apiGroups": [""], "apiVersions": ["v1"],
                        "operations": ["CREATE"], "resources": ["secrets"]
                    }]},
                    "validations": [{
                        "expression": "!object.metadata.name.endsWith('-credentials')",
                        "message": "credential copies are refused here"
                    }]
                }
            }),
        ),
        (
            "ValidatingAdmissionPolicyBinding",
            json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": policy},
                "spec": {
                    "policyName": policy,
                    "validationActions": ["Deny"],
                    "matchResources": {"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": ns
                    }}}
                }
            }),
        ),
    ];
    for (kind, object) in &objects {
        admission(kind)
            .create(
                &PostParams::default(),
                &serde_json::from_value(object.clone()).unwrap(),
            )
            .await
            .unwrap();
    }
    // The policy takes effect once the API server has loaded it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let probe: Secret = serde_json::from_value(json!({
        "metadata": {"name": "probe-credentials"}
    }))
    .unwrap();
    let _refused = wait_for(
        "the admission policy to refuse a copy",
        async || {
            let created = secrets.create(&PostParams::default(), &probe).await;
            if created.is_ok() {
                let _ = secrets
                    .delete("probe-credentials", &DeleteParams::default())
                    .await;
            }
            created.map(|_| ()).map_err(|e| e.to_string())
        },
        |r| r.as_ref().is_err_and(|e| e.contains("refused")),
    )
    .await;

    skip_provider(&client, &ns, "vpn", 1).await;
    mask(&client, &ns, "m", &[]).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let about_m = async || {
        events
            .list(&kube::api::ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("m")
                    && e.reason.as_deref() == Some("KubeApi")
            })
            .collect::<Vec<_>>()
    };
    let kube_errors = async || {
        let (_, metrics) = admin_get("/metrics").await;
        metrics
            .lines()
            .find(|l| {
                l.starts_with(
                    "cloak_reconcile_errors_total{controller=\"vpnmask\",category=\"KubeApi\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let errors_before = kube_errors().await;
    let found = wait_for("a KubeApi event about m", about_m, |e| !e.is_empty()).await;
    assert_eq!(found[0].type_.as_deref(), Some("Warning"));
    let note = found[0].note.as_deref().unwrap_or_default();
    assert!(
        note.contains("credential copies are refused here"),
        "{note}"
    );
    // Retried meanwhile; still one Event, not one per attempt. (The counter is the shared
    // operator's, so other tests' failures add to it: only "retried" is asserted here, the
    // backoff's timing is `retry.rs`'s unit tests'.)
    tokio::time::sleep(Duration::from_secs(6)).await;
    let retried = kube_errors().await - errors_before;
    assert!(retried >= 2.0, "{retried} failed reconciles in ~6 s");
    let later = about_m().await;
    assert_eq!(later.len(), 1, "{later:?}");
    assert!(
        later[0].series.as_ref().is_none_or(|s| s.count <= 2),
        "{:?}",
        later[0].series
    );
    for (kind, _) in objects.iter().rev() {
        admission(kind)
            .delete(&policy, &DeleteParams::default())
            .await
            .unwrap();
    }
}

/// A provider whose Secret is missing says so in its status phase, and in a Warning Event.
#[tokio::test]
async fn a_provider_whose_secret_is_missing_says_so_in_a_warning_event() {
    let (client, ns) = setup("events").await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "absent", "maxSlots": 1, "verify": {"skip": true}}),
    )
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let found = wait_for(
        "an ErrSecretNotFound event",
        async || {
            events
                .list(&kube::api::ListParams::default())
                .await
                .unwrap()
                .items
        },
        |items| {
            items.iter().any(|e| {
                e.reason.as_deref() == Some("ErrSecretNotFound")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("vpn")
            })
        },
    )
    .await;
    let event = found
        .iter()
        .find(|e| e.reason.as_deref() == Some("ErrSecretNotFound"))
        .unwrap();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.note.as_deref().unwrap().contains("absent"));
}

/// Plays the kubelet for a verification pod: its probe container exits with `code`.
async fn finish_probe(pods: &Api<Pod>, name: &str, code: i32) {
    let status = json!({"status": {"phase": "Running", "containerStatuses": [
        {"name": "probe", "ready": false, "restartCount": 0, "image": "curl", "imageID": "",
         "state": {"terminated": {"exitCode": code}}}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

#[tokio::test]
async fn re_verification_keeps_serving_masks_from_the_other_slots() {
    let (client, ns) = setup("reverify").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "creds", "maxSlots": 2, "verify": {"interval": "3s"}}),
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let first = wait_for(
        "the first verification pod",
        async || pods.get_opt("vpn-verify").await.unwrap(),
        Option::is_some,
    )
    .await
    .unwrap();
    finish_probe(&pods, "vpn-verify", 0).await;
    wait_for(
        "verified",
        async || provider_status(&client, &ns, "vpn").await,
        |s| {
            s.as_ref()
                .is_some_and(|s| s.phase == Some(ProviderPhase::Ready) && s.last_verified.is_some())
        },
    )
    .await;

    // The interval passes: a second verification starts and holds one slot...
    let second = wait_for(
        "the second verification pod",
        async || pods.get_opt("vpn-verify").await.unwrap(),
        |p| p.as_ref().is_some_and(|p| p.uid() != first.uid()),
    )
    .await;
    assert!(second.is_some());
    assert_eq!(
        provider_status(&client, &ns, "vpn").await.unwrap().phase,
        Some(ProviderPhase::Verifying)
    );
    // ...and a new mask still gets the other one.
    mask(&client, &ns, "m", &[]).await;
    wait_for(
        "m is Ready during re-verification",
        async || mask_status(&client, &ns, "m").await,
        |s| phase(s) == Some(MaskPhase::Ready),
    )
    .await;
    finish_probe(&pods, "vpn-verify", 0).await;
    wait_for(
        "Active after re-verification",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::Active),
    )
    .await;
    assert_eq!(
        phase(&mask_status(&client, &ns, "m").await),
        Some(MaskPhase::Ready),
        "the holder kept its slot"
    );
}

#[tokio::test]
async fn verification_fails_after_its_timeout() {
    let (client, ns) = setup("verify-timeout").await;
    secret(&client, &ns, "creds", GLUETUN).await;
    provider(
        &client,
        &ns,
        "vpn",
        json!({"secret": "creds", "maxSlots": 1, "verify": {"timeout": "1s"}}),
    )
    .await;
    let status = wait_for(
        "ErrVerifyFailed",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().and_then(|s| s.phase) == Some(ProviderPhase::ErrVerifyFailed),
    )
    .await;
    assert!(
        status
            .as_ref()
            .unwrap()
            .message
            .as_deref()
            .unwrap()
            .contains("timed out after 1s"),
        "{status:?}"
    );
    wait_for(
        "the slot is released",
        async || provider_status(&client, &ns, "vpn").await,
        |s| s.as_ref().is_some_and(|s| s.active_slots == 0),
    )
    .await;
}

/// With kube-controller-manager's garbage collector running, a foreground deletion of a mask
/// (the GC deletes the pods that block it first) and the operator's finalizer cooperate: the pod
/// goes, then the slot is released, then the mask is gone.
#[tokio::test]
async fn foreground_deletion_through_the_garbage_collector_releases_the_slot_after_the_pods() {
    ControlPlane::shared()
        .ensure_controller_manager()
        .await
        .unwrap();
    let (client, ns) = setup("foreground").await;
    one_slot_provider_and_ready_mask(&client, &ns).await;
    use_mask(&client, &ns, "m", "user").await;

    delete_mask_in_use(&client, &ns, &DeleteParams::foreground()).await;
    let copy = cloak_model::names::mask_secret("m");
    wait_for(
        "the credentials copy is gone",
        async || {
            Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&copy)
                .await
                .unwrap()
        },
        Option::is_none,
    )
    .await;
}

/// Creates pod `pod` using mask `mask` (an ownerReference with blockOwnerDeletion, as seed 000
/// documents) and waits until the mask is Active.
async fn use_mask(client: &Client, ns: &str, mask: &str, pod: &str) {
    let owner = Api::<VpnMask>::namespaced(client.clone(), ns)
        .get(mask)
        .await
        .unwrap();
    let object: Pod = serde_json::from_value(json!({
        // The finalizer plays the kubelet, which holds a deleted pod for its grace period:
        // without it, a pod with no node vanishes the moment it is deleted.
        "metadata": {"name": pod, "finalizers": [HOLD], "ownerReferences": [{"apiVersion": "cloak.dev/v1alpha1", "kind": "VpnMask",
            "name": mask, "uid": owner.uid().unwrap(), "blockOwnerDeletion": true}]},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    wait_for(
        "the mask is Active",
        async || mask_status(client, ns, mask).await,
        |s| phase(s) == Some(MaskPhase::Active),
    )
    .await;
}

/// Provider `vpn` (one slot, verification skipped) and mask `m` holding that slot.
async fn one_slot_provider_and_ready_mask(client: &Client, ns: &str) {
    secret(client, ns, "creds", GLUETUN).await;
    provider(
        client,
        ns,
        "vpn",
        json!({"secret": "creds", "maxSlots": 1, "verify": {"skip": true}}),
    )
    .await;
    mask(client, ns, "m", &[]).await;
    wait_for(
        "m is Ready",
        async || mask_status(client, ns, "m").await,
        |s| phase(s) == Some(MaskPhase::Ready),
    )
    .await;
}

/// Deletes mask `m`, used by pod `user`, with `params`; then the pod goes first, the mask after,
/// and only then is the provider's slot free.
/// The finalizer test pods carry, so a deleted pod stays while the test looks.
const HOLD: &str = "cloak.test/hold";

/// Deletes mask `m` while pod `user` uses it: the pod is deleted and, while it still exists
/// (terminating), the mask and its slot are kept, checked several times; once the pod is gone,
/// the mask goes and the slot is free.
async fn delete_mask_in_use(client: &Client, ns: &str, params: &DeleteParams) {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let masks = Api::<VpnMask>::namespaced(client.clone(), ns);
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), ns);
    wait_for(
        "the provider counts the slot",
        async || provider_status(client, ns, "vpn").await,
        |s| s.as_ref().is_some_and(|s| s.active_slots == 1),
    )
    .await;
    masks.delete("m", params).await.unwrap();
    wait_for(
        "the pod using the mask is deleted",
        async || pods.get_opt("user").await.unwrap(),
        |p| {
            p.as_ref()
                .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
        },
    )
    .await;
    for _ in 0..4 {
        assert!(
            pods.get_opt("user").await.unwrap().is_some(),
            "the pod is still terminating"
        );
        let mask = masks.get_opt("m").await.unwrap();
        assert!(
            mask.is_some_and(|m| m.metadata.deletion_timestamp.is_some()),
            "the mask waits for its pod"
        );
        assert!(
            leases.get_opt("cloak-slot-vpn-0").await.unwrap().is_some(),
            "the slot's reservation is held while the pod may still send"
        );
        assert_eq!(
            provider_status(client, ns, "vpn")
                .await
                .map(|s| s.active_slots),
            Some(1),
            "and counted"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pods.patch(
        "user",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    wait_for(
        "the pod using the mask is gone",
        async || pods.get_opt("user").await.unwrap(),
        Option::is_none,
    )
    .await;
    wait_for(
        "then the mask is gone",
        async || masks.get_opt("m").await.unwrap(),
        Option::is_none,
    )
    .await;
    wait_for(
        "and the slot is free",
        async || provider_status(client, ns, "vpn").await,
        |s| s.as_ref().is_some_and(|s| s.active_slots == 0),
    )
    .await;
}
