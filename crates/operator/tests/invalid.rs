//! A malformed object never stalls the controller. The API server normally refuses what the Rust
//! types refuse, so this test loosens the VpnMask schema on its own control plane (this test
//! binary's), stores a mask the operator cannot read, and checks that it is reported (Event and
//! status message) while a valid mask beside it is served.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_futures)] // test helpers

use std::time::{Duration, Instant};

mod common;

use cloak_api::{MaskPhase, VpnMask, VpnMaskSpec, VpnProvider};
use cloak_testkit::{ControlPlane, TestNamespace};
use common::Running;
use k8s_openapi::{
    api::events::v1::Event,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_mask_is_reported_and_the_others_are_still_served() {
    let cp = ControlPlane::shared();
    let client = cp.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let loosen = json!([{"op": "replace", "path": "/spec/versions/0/schema/openAPIV3Schema/properties/spec",
        "value": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}]);
    let loosen: json_patch::Patch = serde_json::from_value(loosen).unwrap();
    crds.patch(
        "vpnmasks.cloak.dev",
        &PatchParams::default(),
        &Patch::<()>::Json(loosen),
    )
    .await
    .unwrap();

    let ns = TestNamespace::create(&client, "invalid").await.unwrap();
    let ns = ns.name().to_owned();
    let resource = kube::api::ApiResource::erase::<VpnMask>(&());
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnMask", "metadata": {"name": "bad"},
        "spec": {"providers": 5}
    }))
    .unwrap();
    // The loosened schema takes a moment to be served.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dynamic.create(&PostParams::default(), &bad).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the loosened schema was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let operator = Running::start(cp.client(), cloak_operator::Config::default());
    common::credentials_secret(&client, &ns).await;
    let provider: VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": "p"},
        "spec": {"secret": "creds", "maxSlots": 2, "verify": {"skip": true}}
    }))
    .unwrap();
    Api::<VpnProvider>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &provider)
        .await
        .unwrap();
    let masks: Api<VpnMask> = Api::namespaced(client.clone(), &ns);
    masks
        .create(
            &PostParams::default(),
            &VpnMask::new("good", VpnMaskSpec::default()),
        )
        .await
        .unwrap();

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let good = masks
            .get("good")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            == Some(MaskPhase::Ready);
        let bad_status = dynamic.get("bad").await.unwrap().data["status"]["message"]
            .as_str()
            .map(str::to_owned);
        let reported = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("InvalidSpec")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad")
            });
        if good
            && reported
            && bad_status
                .as_deref()
                .is_some_and(|m| m.contains("invalid VpnMask"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "good Ready: {good}, bad reported: {reported}, bad status: {bad_status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    operator.stop().await;
}
