//! Two operator instances handling one mask at once (a leader handover, or two replicas
//! without leader election), driven into one exact interleaving against a real kube-apiserver:
//! one instance reserves a slot and is held just before it records it; the other adopts that
//! reservation and records it; then the first one's write fails. The reservation must stay
//! with the mask that records it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_futures)] // test helpers

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

mod common;

use cloak_api::{VpnMask, VpnProvider};
use cloak_testkit::{ControlPlane, TestNamespace};
use common::Running;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, ResourceExt, api::PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Holds the first `PATCH` whose path ends with `suffix` until the test opens the gate.
struct Gate {
    suffix: String,
    taken: AtomicBool,
    hit: tokio::sync::Notify,
    open: tokio::sync::watch::Sender<bool>,
}

struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
}

struct GateLayer(Arc<Gate>);

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.0.clone(),
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let hold = request.method() == http::Method::PATCH
            && request.uri().path().ends_with(&self.gate.suffix)
            && !self.gate.taken.swap(true, Ordering::SeqCst);
        let gate = self.gate.clone();
        // The client's futures send nothing until polled: holding the future holds the request.
        let response = self.inner.call(request);
        Box::pin(async move {
            if hold {
                gate.hit.notify_one();
                let _ = gate.open.subscribe().wait_for(|open| *open).await;
            }
            response.await
        })
    }
}

fn operator(instance: &str, client: Client) -> Running {
    let config = cloak_operator::Config {
        instance: instance.into(),
        ..cloak_operator::Config::default()
    };
    Running::start(client, config)
}

async fn until<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_reservation_adopted_by_another_operator_is_not_released_by_the_one_whose_record_lost() {
    // RUST_LOG=cloak_operator=debug shows what the two instances do.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, "handover").await.unwrap();
    common::credentials_secret(&client, ns.name()).await;
    let gate = Arc::new(Gate {
        suffix: "/vpnmasks/b/status".into(),
        taken: AtomicBool::new(false),
        hit: tokio::sync::Notify::new(),
        open: tokio::sync::watch::channel(false).0,
    });
    let gated = kube::client::ClientBuilder::try_from(cp.config())
        .unwrap()
        .with_layer(&GateLayer(gate.clone()))
        .build();
    let first = operator("handover-first", gated);

    let providers = Api::<VpnProvider>::namespaced(client.clone(), ns.name());
    let provider: VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": "p"},
        "spec": {"secret": "creds", "maxSlots": 1, "namespaces": [ns.name()], "verify": {"skip": true}},
    }))
    .unwrap();
    providers
        .create(&PostParams::default(), &provider)
        .await
        .unwrap();
    until("provider p Ready", || async {
        let p = providers.get("p").await.ok()?;
        let ready = p
            .status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;

    // The first operator reserves the slot for mask b and is held at recording it.
    let masks = Api::<VpnMask>::namespaced(client.clone(), ns.name());
    let mask: VpnMask = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnMask", "metadata": {"name": "b"},
        "spec": {},
    }))
    .unwrap();
    masks.create(&PostParams::default(), &mask).await.unwrap();
    tokio::time::timeout(WAIT, gate.hit.notified())
        .await
        .expect("the first operator writes mask b's status");
    let leases = Api::<Lease>::namespaced(client.clone(), ns.name());
    let reserved = leases
        .get_metadata("cloak-slot-p-0")
        .await
        .expect("the first operator reserved slot 0 before recording it");

    // The second operator adopts the reservation and records it.
    let second = operator("handover-second", client.clone());
    until("the second operator records slot p/0 for b", || async {
        let b = masks.get("b").await.ok()?;
        let held = b.status?.provider?;
        (held.name == "p" && held.slot == 0).then_some(())
    })
    .await;

    // The second one adopted it by claiming it (a renew time), not by a reservation of its own.
    let adopted = leases.get("cloak-slot-p-0").await.unwrap();
    assert_eq!(
        adopted.uid(),
        reserved.uid(),
        "the first operator's reservation"
    );
    assert!(
        adopted.spec.and_then(|s| s.renew_time).is_some(),
        "the second operator recorded b without claiming the reservation"
    );

    // The first operator's record now fails on b's changed resourceVersion.
    gate.open.send_replace(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = leases.get_metadata_opt("cloak-slot-p-0").await.unwrap();
    assert_eq!(
        now.as_ref().and_then(ResourceExt::uid),
        reserved.uid(),
        "the reservation b records was released (and maybe made again): {now:?}"
    );
    let b = masks.get("b").await.unwrap();
    let held = b.status.and_then(|s| s.provider).unwrap();
    assert_eq!((held.name.as_str(), held.slot), ("p", 0));

    first.stop().await;
    second.stop().await;
}
