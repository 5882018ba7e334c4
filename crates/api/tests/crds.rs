//! The generated CRDs against a real kube-apiserver: accepted as structural schemas, valid objects
//! stored and read back, invalid ones refused with a clear message, docs visible to kubectl, and
//! every YAML example of the README applied.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers, not only #[test] fns

use std::process::Command;

use cloak_api::{
    MaskPhase, Mtu, ProviderPhase, VpnGateway, VpnMask, VpnMaskSpec, VpnMaskStatus, VpnProvider,
};
use cloak_testkit::{ControlPlane, TestNamespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    core::Status,
    discovery,
};
use serde_json::json;

async fn setup(test: &str) -> (Client, TestNamespace) {
    let client = ControlPlane::shared().client();
    let ns = TestNamespace::create(&client, test).await.unwrap();
    (client, ns)
}

/// Creates `object` (JSON, as a user would write it) and returns the API server's refusal.
async fn refusal(client: &Client, ns: &str, object: serde_json::Value) -> Status {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &kube::api::ApiResource::from_gvk(&GroupVersionKind::gvk(
            "cloak.dev",
            "v1alpha1",
            object["kind"].as_str().unwrap(),
        )),
    );
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected the API server to refuse the object, got {other:?}"),
    }
}

#[allow(clippy::needless_pass_by_value)] // reads like the JSON it builds
fn provider(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn generated_crds_are_established_with_structural_schemas() {
    let client = ControlPlane::shared().client();
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for name in [
        "vpnproviders.cloak.dev",
        "vpnmasks.cloak.dev",
        "vpngateways.cloak.dev",
        "vpnchains.cloak.dev",
    ] {
        let conditions = api
            .get(name)
            .await
            .unwrap()
            .status
            .unwrap()
            .conditions
            .unwrap();
        let status = |t: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| c.status.clone())
        };
        assert_eq!(
            status("Established").as_deref(),
            Some("True"),
            "{name}: {conditions:?}"
        );
        assert_eq!(
            status("NamesAccepted").as_deref(),
            Some("True"),
            "{name}: {conditions:?}"
        );
        assert_eq!(
            status("NonStructuralSchema"),
            None,
            "{name}: {conditions:?}"
        );
    }
}

#[tokio::test]
async fn a_valid_provider_and_mask_are_stored_and_read_back() {
    let (client, ns) = setup("valid-roundtrip").await;
    let providers: Api<VpnProvider> = Api::namespaced(client.clone(), ns.name());
    let object: VpnProvider = serde_json::from_value(provider(
        "nord",
        json!({
            "secret": "nord-credentials",
            "maxSlots": 6,
            "tags": ["default", "nl"],
            "namespaces": ["media"],
            "tunnel": "wireguard",
            "verify": {"timeout": "1m30s", "interval": "24h",
                       "overrides": {"containers": {"vpn": {"image": "qmcgaw/gluetun:v3"}}}}
        }),
    ))
    .unwrap();
    providers
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    let stored = providers.get("nord").await.unwrap();
    assert_eq!(stored.spec, object.spec);
    assert_eq!(
        stored
            .spec
            .verify
            .as_ref()
            .unwrap()
            .timeout
            .as_ref()
            .unwrap()
            .get()
            .as_secs(),
        90
    );

    let masks: Api<VpnMask> = Api::namespaced(client, ns.name());
    let mask = VpnMask::new(
        "downloader",
        VpnMaskSpec {
            providers: vec!["nl".into()],
            avoid_providers: Vec::new(),
        },
    );
    masks.create(&PostParams::default(), &mask).await.unwrap();
    let status =
        json!({"status": VpnMaskStatus { phase: Some(MaskPhase::Waiting), ..Default::default() }});
    masks
        .patch_status(
            "downloader",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    let stored = masks.get("downloader").await.unwrap();
    assert_eq!(stored.spec.providers, ["nl"]);
    assert_eq!(stored.status.unwrap().phase, Some(MaskPhase::Waiting));
}

#[tokio::test]
async fn zero_max_slots_is_refused_by_the_api_server() {
    let (client, ns) = setup("zero-slots").await;
    let refused = refusal(
        &client,
        ns.name(),
        provider("p", json!({"secret": "s", "maxSlots": 0})),
    )
    .await;
    assert_eq!(refused.code, 422);
    assert!(
        refused.message.contains("spec.maxSlots")
            && refused.message.contains("greater than or equal to 1"),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_refused_by_the_api_server() {
    let (client, ns) = setup("wrong-type").await;
    let refused = refusal(
        &client,
        ns.name(),
        provider("p", json!({"secret": "s", "maxSlots": "six"})),
    )
    .await;
    assert_eq!(refused.code, 422);
    assert!(
        refused.message.contains("spec.maxSlots") && refused.message.contains("integer"),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn a_missing_required_field_is_refused_by_the_api_server() {
    let (client, ns) = setup("missing-secret").await;
    let refused = refusal(&client, ns.name(), provider("p", json!({"maxSlots": 2}))).await;
    assert!(
        refused.message.contains("spec.secret") && refused.message.contains("Required"),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn a_malformed_duration_is_refused_by_the_api_server() {
    let (client, ns) = setup("bad-duration").await;
    let spec = json!({"secret": "s", "maxSlots": 1, "verify": {"timeout": "soon"}});
    let refused = refusal(&client, ns.name(), provider("p", spec)).await;
    assert!(
        refused.message.contains("spec.verify.timeout") && refused.message.contains("should match"),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn an_unknown_tunnel_kind_is_refused_by_the_api_server() {
    let (client, ns) = setup("bad-tunnel").await;
    let refused = refusal(
        &client,
        ns.name(),
        provider(
            "p",
            json!({"secret": "s", "maxSlots": 1, "tunnel": "ipsec"}),
        ),
    )
    .await;
    assert!(
        refused.message.contains("spec.tunnel") && refused.message.contains("supported values"),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn one_container_override_alone_needs_no_siblings() {
    // Seed 000's schema made init, vpn and probe all required once one of them was given.
    let (client, ns) = setup("lone-override").await;
    let providers: Api<VpnProvider> = Api::namespaced(client, ns.name());
    let object: VpnProvider = serde_json::from_value(provider(
        "p",
        json!({"secret": "s", "maxSlots": 1,
               "verify": {"overrides": {"containers": {"probe": {"image": "curl:8", "args": ["-s"]}}}}}),
    ))
    .unwrap();
    providers
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    let stored = providers.get("p").await.unwrap();
    let containers = stored
        .spec
        .verify
        .unwrap()
        .overrides
        .unwrap()
        .containers
        .unwrap();
    assert_eq!(
        containers.probe.unwrap(),
        json!({"image": "curl:8", "args": ["-s"]})
    );
}

#[tokio::test]
async fn an_unknown_phase_in_status_is_refused_by_the_api_server() {
    let (client, ns) = setup("bad-phase").await;
    let providers: Api<VpnProvider> = Api::namespaced(client, ns.name());
    let object: VpnProvider =
        serde_json::from_value(provider("p", json!({"secret": "s", "maxSlots": 1}))).unwrap();
    providers
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    let ok = json!({"status": {"phase": ProviderPhase::ErrSecretNotFound, "activeSlots": 0}});
    providers
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&ok))
        .await
        .unwrap();
    let bad = json!({"status": {"phase": "Sleeping"}});
    let err = providers
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err:?}")
    };
    assert!(
        status.message.contains("status.phase") && status.message.contains("ErrSecretNotFound"),
        "{}",
        status.message
    );
}

#[allow(clippy::needless_pass_by_value)] // reads like the JSON it builds
fn gateway(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "cloak.dev/v1alpha1", "kind": "VpnGateway", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn a_valid_gateway_is_stored_and_read_back_with_its_defaults_unwritten() {
    let (client, ns) = setup("gateway-roundtrip").await;
    let gateways: Api<VpnGateway> = Api::namespaced(client, ns.name());
    let full: VpnGateway = serde_json::from_value(gateway(
        "egress",
        json!({
            "exits": {"count": 3, "providers": ["nl"], "drainGrace": "2m"},
            "clients": {"podSelector": {"matchLabels": {"app": "torrent"}}},
            "intranet": ["10.0.0.0/8", "fd00::/8"],
            "dns": {"clusterDomains": ["cluster.local"], "upstreams": ["10.64.0.1"]},
            "killSwitch": false,
            "mtu": 1380
        }),
    ))
    .unwrap();
    gateways
        .create(&PostParams::default(), &full)
        .await
        .unwrap();
    let stored = gateways.get("egress").await.unwrap();
    assert_eq!(stored.spec, full.spec);
    assert_eq!(stored.spec.mtu, Mtu::Fixed(1380));

    let short: VpnGateway = serde_json::from_value(gateway(
        "short",
        json!({"exits": {"count": 1}, "mtu": "auto"}),
    ))
    .unwrap();
    gateways
        .create(&PostParams::default(), &short)
        .await
        .unwrap();
    let stored = gateways.get("short").await.unwrap();
    assert!(stored.spec.kill_switch, "the kill switch defaults to on");
    assert_eq!(stored.spec.mtu, Mtu::Auto);
}

#[tokio::test]
async fn a_gateway_with_a_bad_mtu_or_too_many_exits_is_refused_by_the_api_server() {
    let (client, ns) = setup("gateway-bad").await;
    for (spec, field) in [
        (json!({"exits": {"count": 17}}), "spec.exits.count"),
        (json!({"exits": {"count": 0}}), "spec.exits.count"),
        (json!({"exits": {"count": 1}, "mtu": 576}), "spec.mtu"),
        (json!({"exits": {"count": 1}, "mtu": "large"}), "spec.mtu"),
        (
            json!({"exits": {"count": 1}, "intranet": ["ten/8"]}),
            "spec.intranet[0]",
        ),
        (json!({"mtu": 1400}), "spec.exits"),
        // Each passes a pattern of the characters CIDRs use, and serde refuses it: a gateway
        // the API server keeps but no reader can read.
        (
            json!({"exits": {"count": 1}, "intranet": ["ffff"]}),
            "spec.intranet[0]",
        ),
        (
            json!({"exits": {"count": 1}, "intranet": ["10.0.0.0/33"]}),
            "spec.intranet[0]",
        ),
        (
            json!({"exits": {"count": 1}, "dns": {"upstreams": ["1.1.1"]}}),
            "spec.dns.upstreams",
        ),
        // Everything in the intranet: nothing would go through the exits.
        (
            json!({"exits": {"count": 1}, "intranet": ["10.0.0.0/8", "0.0.0.0/0"]}),
            "spec.intranet",
        ),
        (
            json!({"exits": {"count": 1}, "intranet": ["::/0"]}),
            "spec.intranet",
        ),
    ] {
        let refused = refusal(&client, ns.name(), gateway("g", spec.clone())).await;
        assert_eq!(refused.code, 422, "{spec}: {}", refused.message);
        assert!(
            refused.message.contains(field),
            "{spec}: {}",
            refused.message
        );
    }
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_documentation() {
    let cp = ControlPlane::shared();
    let output = Command::new(cloak_testkit::tool("kubectl"))
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["explain", "vpnproviders.spec.maxSlots"])
        .output()
        .expect("kubectl is installed by tools/install-deps.sh");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("Contractual limit of devices connected at once"),
        "{text}"
    );
}

/// Every ```yaml block of README.md, applied as the user would with `kubectl apply`.
#[tokio::test]
async fn every_yaml_example_in_the_readme_is_accepted() {
    let (client, ns) = setup("readme").await;
    let readme = std::fs::read_to_string(cloak_testkit::repo_path("README.md")).unwrap();
    let mut applied = 0;
    for block in readme.split("```yaml\n").skip(1) {
        let block = block.split("```").next().unwrap();
        for doc in serde_yaml::Deserializer::from_str(block) {
            let object: DynamicObject = serde::Deserialize::deserialize(doc).unwrap();
            let types = object.types.clone().unwrap();
            let (group, version) = types
                .api_version
                .rsplit_once('/')
                .unwrap_or(("", &types.api_version));
            let gvk = GroupVersionKind::gvk(group, version, &types.kind);
            let (resource, _) = discovery::pinned_kind(&client, &gvk).await.unwrap();
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), ns.name(), &resource);
            let name = object.metadata.name.clone().unwrap();
            api.patch(
                &name,
                &PatchParams::apply("readme-test").force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap_or_else(|e| panic!("README example {} {name}: {e}", types.kind));
            applied += 1;
        }
    }
    assert!(
        applied >= 5,
        "README should show a Secret, a VpnProvider, a VpnMask, a VpnGateway and its client Pod; applied {applied}"
    );
}
