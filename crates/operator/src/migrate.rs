//! `cloak migrate vpn-operator`: reads seed 000's `vpn.beebs.dev/v1` objects (from the cluster,
//! or from YAML the caller parsed), turns them into `VpnProvider`s and `VpnMask`s with
//! [`cloak_model::migrate`], and applies those with server-side apply when asked. The old objects
//! are only ever read.

use std::collections::BTreeMap;

use cloak_model::{
    credentials::{self, Format},
    migrate::{self, GROUP, Migration, OldMask},
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    core::GroupVersionKind,
};
use serde_json::Value;

/// The field manager of what `cloak migrate` applies.
pub const MANAGER: &str = "cloak-migrate";

/// seed 000's kinds and their plurals: `Provider` (the seed's), `MaskProvider` (its later
/// name), `Mask`, and the later `MaskConsumer`/`MaskReservation`, read only to be listed as
/// having no equivalent.
const KINDS: [(&str, &str); 5] = [
    ("Provider", "providers"),
    ("MaskProvider", "maskproviders"),
    ("Mask", "masks"),
    ("MaskConsumer", "maskconsumers"),
    ("MaskReservation", "maskreservations"),
];

fn api(client: &Client, namespace: Option<&str>, kind: &str, plural: &str) -> Api<DynamicObject> {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", kind), plural);
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// Every seed 000 object in `namespace` (all namespaces when `None`). A kind whose
/// CustomResourceDefinition is not installed is skipped.
pub async fn read_cluster(client: &Client, namespace: Option<&str>) -> kube::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for (kind, plural) in KINDS {
        match api(client, namespace, kind, plural)
            .list(&ListParams::default())
            .await
        {
            Ok(list) => {
                for item in list.items {
                    let mut value = serde_json::to_value(&item).unwrap_or_default();
                    // Listed items carry no type; the migration reads it.
                    value["apiVersion"] = format!("{GROUP}/v1").into();
                    value["kind"] = kind.into();
                    objects.push(value);
                }
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(objects)
}

/// What each provider's credentials Secret holds, for the Secrets that exist in the cluster or
/// among `given` (Secrets in the input files). Only the keys' contents are parsed, in memory;
/// nothing of them is printed.
pub async fn secret_formats(
    client: Option<&Client>,
    objects: &[Value],
    default_namespace: &str,
) -> BTreeMap<(String, String), Format> {
    let mut formats = BTreeMap::new();
    for object in objects {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(default_namespace);
        let is_provider = matches!(
            object.get("kind").and_then(Value::as_str),
            Some("Provider" | "MaskProvider")
        );
        if object.get("kind").and_then(Value::as_str) == Some("Secret")
            && object.get("apiVersion").and_then(Value::as_str) == Some("v1")
        {
            if let (Some(name), Ok(secret)) = (
                object.pointer("/metadata/name").and_then(Value::as_str),
                serde_json::from_value::<Secret>(object.clone()),
            ) && let Some(format) = format_of(&secret)
            {
                formats.insert((namespace.to_owned(), name.to_owned()), format);
            }
        } else if is_provider
            && let (Some(client), Some(name)) = (
                client,
                object.pointer("/spec/secret").and_then(Value::as_str),
            )
            && !formats.contains_key(&(namespace.to_owned(), name.to_owned()))
            && let Ok(Some(secret)) = Api::<Secret>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await
            && let Some(format) = format_of(&secret)
        {
            formats.insert((namespace.to_owned(), name.to_owned()), format);
        }
    }
    formats
}

/// The credentials' format, from `data` and `stringData` (a Secret in a file may use either).
fn format_of(secret: &Secret) -> Option<Format> {
    credentials::classify(&crate::secret_bytes(secret), None)
        .ok()
        .map(|s| s.format)
}

/// The new objects, providers first, each with its type and without status.
fn objects(migration: &Migration) -> Vec<Value> {
    let typed = |mut v: Value, kind: &str| {
        v["apiVersion"] = "cloak.dev/v1alpha1".into();
        v["kind"] = kind.into();
        if let Some(map) = v.as_object_mut() {
            map.remove("status");
        }
        v
    };
    migration
        .providers
        .iter()
        .map(|p| typed(serde_json::to_value(p).unwrap_or_default(), "VpnProvider"))
        .chain(
            migration
                .masks
                .iter()
                .map(|m| typed(serde_json::to_value(m).unwrap_or_default(), "VpnMask")),
        )
        .collect()
}

/// Server-side applies the new objects (providers first), as [`MANAGER`]: all of them as a dry
/// run first, so that one the API server refuses (a conflict, a webhook, RBAC) stops the
/// migration before anything is written.
pub async fn apply(client: &Client, migration: &Migration) -> kube::Result<()> {
    let real = PatchParams::apply(MANAGER);
    for params in [real.clone().dry_run(), real] {
        apply_all(client, migration, &params).await?;
    }
    Ok(())
}

async fn apply_all(
    client: &Client,
    migration: &Migration,
    params: &PatchParams,
) -> kube::Result<()> {
    for object in objects(migration) {
        let at = |key: &str| {
            object
                .pointer(&format!("/metadata/{key}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (namespace, name) = (at("namespace"), at("name"));
        if object["kind"] == "VpnProvider" {
            Api::<cloak_api::VpnProvider>::namespaced(client.clone(), &namespace)
                .patch(&name, params, &Patch::Apply(&object))
                .await?;
        } else {
            Api::<cloak_api::VpnMask>::namespaced(client.clone(), &namespace)
                .patch(&name, params, &Patch::Apply(&object))
                .await?;
        }
    }
    Ok(())
}

/// Pods that use an old mask, each with what must change: `namespace/name` → changes.
pub async fn pods_to_change(
    client: &Client,
    masks: &[OldMask],
) -> kube::Result<Vec<(String, Vec<String>)>> {
    let mut namespaces: Vec<&str> = masks.iter().map(|m| m.namespace.as_str()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut found = Vec::new();
    for namespace in namespaces {
        for pod in Api::<Pod>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?
        {
            let value = serde_json::to_value(&pod).unwrap_or_default();
            let changes = migrate::pod_changes(&value, masks);
            if !changes.is_empty() {
                found.push((
                    format!("{namespace}/{}", pod.metadata.name.unwrap_or_default()),
                    changes,
                ));
            }
        }
    }
    Ok(found)
}

/// The new objects as one YAML stream, as `kubectl apply -f` takes it (keys sorted, which puts
/// `apiVersion`, `kind`, `metadata` and `spec` in their usual order).
pub fn to_yaml(migration: &Migration) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for object in objects(migration) {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object)?);
    }
    Ok(out)
}
