//! `cloak migrate vpn-operator`, pure: seed 000's `vpn.beebs.dev/v1` objects in, the equivalent
//! `VpnProvider`s and `VpnMask`s out, and every field without an equivalent listed.
//!
//! cloak's two resources were modelled on seed 000's, so most fields carry over as they are:
//! `secret`, `maxSlots`, `tags`, `namespaces`, `verify` (`skip`, `timeout`, `interval`,
//! `overrides`) and a mask's `providers`. What changes:
//! - Native credentials (`wg0.conf`, `config.ovpn`) are verified by one container, `probe`,
//!   running cloak's own agent, not by vpn-operator's `init`/`vpn`/`probe` trio: overrides of
//!   `init` and `vpn` have nothing to apply to, and a `probe` override's `image`, `command` and
//!   `args` would replace the agent. They are left out, each listed. gluetun variables are
//!   verified by the same trio as in vpn-operator, so their overrides carry over whole.
//! - A field cloak does not know (a newer vpn-operator's, a typo) is left out and listed.
//! - ownerReferences into `vpn.beebs.dev` are left out (deleting vpn-operator's objects would
//!   delete the new ones), each listed; other owners are kept. vpn-operator's own verification
//!   masks (owned by a `Provider`) are not migrated: cloak verifies through a mask of its own,
//!   of the same name.
//! - Observed state (`status`) is not carried: cloak verifies and leases anew.
//!
//! Nothing here deletes or changes the old objects; the caller only ever creates new ones.

use std::collections::BTreeMap;

use cloak_api::{
    ContainerOverrides, GoDuration, VerifyOverrides, VerifySpec, VpnMask, VpnMaskSpec, VpnProvider,
    VpnProviderSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Map, Value};

use crate::credentials::Format;

/// seed 000's API group.
pub const GROUP: &str = "vpn.beebs.dev";
/// The annotation `kubectl apply` keeps, which describes the old object, not the new one.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Something the user should know about one object: a field left out, a change of meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Provider default/my-vpn`.
    pub object: String,
    /// The old object's field, `spec.verify.overrides.containers.vpn`; empty for the object.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{} {}: {}", self.object, self.field, self.message)
        }
    }
}

/// What the old objects become.
#[derive(Debug, Clone, Default)]
pub struct Migration {
    pub providers: Vec<VpnProvider>,
    pub masks: Vec<VpnMask>,
    /// Fields left out or changed in meaning: the new objects are made anyway.
    pub notes: Vec<Note>,
    /// Objects that cannot be migrated as they are (a missing secret, `maxSlots: 0`): when any
    /// exists, nothing should be applied.
    pub errors: Vec<Note>,
}

/// One old object's identity, for notes.
fn describe(kind: &str, meta: &ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The old object's metadata as the new object's: name, namespace (`default_namespace` when it
/// has none, as in a file), labels, annotations and owners. Nothing the API server wrote.
fn carry_metadata(object: &Value, default_namespace: &str) -> Option<ObjectMeta> {
    let meta = object.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_owned();
    let strings = |key: &str| -> Option<BTreeMap<String, String>> {
        let map: BTreeMap<String, String> = meta
            .get(key)?
            .as_object()?
            .iter()
            .filter(|(k, _)| k.as_str() != LAST_APPLIED)
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    Some(ObjectMeta {
        name: Some(name),
        namespace: Some(
            meta.get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(default_namespace)
                .to_owned(),
        ),
        labels: strings("labels"),
        annotations: strings("annotations"),
        owner_references: meta
            .get("ownerReferences")
            .and_then(|o| serde_json::from_value(o.clone()).ok())
            .filter(|o: &Vec<_>| !o.is_empty()),
        ..ObjectMeta::default()
    })
}

/// Just the namespace and name, for [`describe`].
fn meta_name(namespace: &str, object: &Value) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.to_owned()),
        name: object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_owned),
        ..ObjectMeta::default()
    }
}

/// Collects notes and errors about one object.
struct Report<'a> {
    object: String,
    migration: &'a mut Migration,
    failed: bool,
}

impl Report<'_> {
    fn note(&mut self, field: &str, message: impl Into<String>) {
        self.migration.notes.push(Note {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.failed = true;
        self.migration.errors.push(Note {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Lists the keys of `map` not in `known`, as fields without an equivalent.
    fn unknown(&mut self, path: &str, map: &Map<String, Value>, known: &[&str]) {
        for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
            self.note(&format!("{path}.{key}"), "no equivalent in cloak; left out");
        }
    }
}

/// A list of strings, or an error naming the field.
fn strings(report: &mut Report<'_>, field: &str, value: Option<&Value>) -> Vec<String> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        Some(other) => {
            report.error(field, format!("{other} is not a list of strings"));
            Vec::new()
        }
    }
}

/// An optional object field, or an error naming it.
fn object<'v>(
    report: &mut Report<'_>,
    field: &str,
    value: Option<&'v Value>,
) -> Option<&'v Map<String, Value>> {
    match value {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => Some(map),
        Some(other) => {
            report.error(field, format!("{other} is not an object"));
            None
        }
    }
}

fn duration(report: &mut Report<'_>, field: &str, value: Option<&Value>) -> Option<GoDuration> {
    let text = match value? {
        Value::Null => return None,
        Value::String(text) => text,
        other => {
            report.error(field, format!("{other} is not a duration like 1m30s"));
            return None;
        }
    };
    match text.parse::<GoDuration>() {
        Ok(d) => Some(d),
        Err(e) => {
            report.error(field, e.to_string());
            None
        }
    }
}

/// `spec.verify.overrides.containers`, fitted to the verification cloak runs for `format`.
fn containers(
    report: &mut Report<'_>,
    map: &Map<String, Value>,
    format: Option<Format>,
) -> Option<ContainerOverrides> {
    const PATH: &str = "spec.verify.overrides.containers";
    report.unknown(PATH, map, &["init", "vpn", "probe"]);
    let mut get = |name: &str| -> Option<Value> {
        let field = format!("{PATH}.{name}");
        object(report, &field, map.get(name)).map(|m| Value::Object(m.clone()))
    };
    let (init, vpn, mut probe) = (get("init"), get("vpn"), get("probe"));
    let native = matches!(format, Some(Format::WgQuick | Format::Ovpn));
    if !native {
        if format.is_none() && (init.is_some() || vpn.is_some() || probe.is_some()) {
            report.note(
                PATH,
                "carried over as is; the credentials Secret was not read: if it holds wg0.conf or \
                 config.ovpn, cloak verifies it with its own agent in one container, `probe`, \
                 and these overrides (an image above all) apply differently",
            );
        }
        let overrides = ContainerOverrides { init, vpn, probe };
        return (overrides != ContainerOverrides::default()).then_some(overrides);
    }
    for (name, given) in [("init", &init), ("vpn", &vpn)] {
        if given.is_some() {
            report.note(
                &format!("{PATH}.{name}"),
                "left out: native credentials are verified by cloak's agent in one container, \
                 `probe`; there is no such container",
            );
        }
    }
    if let Some(Value::Object(fields)) = probe.as_mut() {
        for key in ["image", "command", "args"] {
            if let Some(value) = fields.remove(key) {
                report.note(
                    &format!("{PATH}.probe.{key}"),
                    format!(
                        "left out ({value}): the probe of native credentials is cloak's agent \
                         from the operator's image, which this would replace"
                    ),
                );
            }
        }
        if fields.is_empty() {
            probe = None;
        }
    }
    probe.map(|probe| ContainerOverrides {
        probe: Some(probe),
        ..ContainerOverrides::default()
    })
}

fn verify(report: &mut Report<'_>, map: &Map<String, Value>, format: Option<Format>) -> VerifySpec {
    report.unknown(
        "spec.verify",
        map,
        &["skip", "timeout", "interval", "overrides"],
    );
    let skip = match map.get("skip") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(skip)) => *skip,
        Some(other) => {
            report.error("spec.verify.skip", format!("{other} is not true or false"));
            false
        }
    };
    let overrides = object(report, "spec.verify.overrides", map.get("overrides")).and_then(|o| {
        report.unknown("spec.verify.overrides", o, &["pod", "containers"]);
        let pod = object(report, "spec.verify.overrides.pod", o.get("pod"))
            .map(|p| Value::Object(p.clone()));
        let containers = object(
            report,
            "spec.verify.overrides.containers",
            o.get("containers"),
        )
        .and_then(|c| containers(report, c, format));
        (pod.is_some() || containers.is_some()).then_some(VerifyOverrides { pod, containers })
    });
    VerifySpec {
        skip,
        timeout: duration(report, "spec.verify.timeout", map.get("timeout")),
        interval: duration(report, "spec.verify.interval", map.get("interval")),
        overrides,
    }
}

/// A seed 000 `Provider` (or a later vpn-operator's `MaskProvider`) as a `VpnProvider`.
fn provider(
    migration: &mut Migration,
    kind: &str,
    object: &Value,
    meta: ObjectMeta,
    format: Option<Format>,
) {
    let mut report = Report {
        object: describe(kind, &meta),
        migration,
        failed: false,
    };
    let empty = Map::new();
    let spec = self::object(&mut report, "spec", object.get("spec")).unwrap_or(&empty);
    report.unknown(
        "spec",
        spec,
        &["secret", "maxSlots", "tags", "namespaces", "verify"],
    );
    let secret = match spec.get("secret").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => {
            report.error("spec.secret", "missing: the Secret holding the credentials");
            String::new()
        }
    };
    let max_slots = spec
        .get("maxSlots")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .and_then(std::num::NonZeroU32::new);
    if max_slots.is_none() {
        report.error(
            "spec.maxSlots",
            format!(
                "{} is not a device limit from 1 to {}",
                spec.get("maxSlots").unwrap_or(&Value::Null),
                u32::MAX
            ),
        );
    }
    let tags = strings(&mut report, "spec.tags", spec.get("tags"));
    let namespaces = strings(&mut report, "spec.namespaces", spec.get("namespaces"));
    let verify = self::object(&mut report, "spec.verify", spec.get("verify"))
        .map(|v| verify(&mut report, v, format))
        .filter(|v| v != &VerifySpec::default());
    if report.failed {
        return;
    }
    let Some(max_slots) = max_slots else { return };
    report.migration.providers.push(VpnProvider {
        metadata: meta,
        spec: VpnProviderSpec {
            secret,
            max_slots,
            tags,
            namespaces,
            verify,
            tunnel: None,
            server_list: None,
        },
        status: None,
    });
}

fn mask(migration: &mut Migration, object: &Value, meta: ObjectMeta) {
    let mut report = Report {
        object: describe("Mask", &meta),
        migration,
        failed: false,
    };
    let empty = Map::new();
    let spec = self::object(&mut report, "spec", object.get("spec")).unwrap_or(&empty);
    report.unknown("spec", spec, &["providers"]);
    let providers = strings(&mut report, "spec.providers", spec.get("providers"));
    if report.failed {
        return;
    }
    report.migration.masks.push(VpnMask {
        metadata: meta,
        spec: VpnMaskSpec {
            providers,
            avoid_providers: Vec::new(),
        },
        status: None,
    });
}

/// Whether an ownerReference points into seed 000's group, and at which kind.
fn old_owner_kind(owner: &Value) -> Option<&str> {
    let api_version = owner.get("apiVersion")?.as_str()?;
    (api_version.split_once('/')?.0 == GROUP).then(|| owner.get("kind")?.as_str())?
}

/// Whether `object` (a Mask) is vpn-operator's own: the verification mask a Provider owns.
/// cloak's verification leases through a mask of its own (`<provider>-verify`, the same name).
fn owned_by_old_provider(object: &Value) -> bool {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|o| matches!(old_owner_kind(o), Some("Provider" | "MaskProvider")))
}

/// Whether `object` is of seed 000's group, and its kind.
fn old_kind(object: &Value) -> Option<&str> {
    let api_version = object.get("apiVersion")?.as_str()?;
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    (group == GROUP).then(|| object.get("kind")?.as_str())?
}

/// The old objects as new ones. `format` says what the credentials Secret `(namespace, name)`
/// holds, when it could be read; objects of other groups are ignored.
pub fn migrate(
    objects: &[Value],
    default_namespace: &str,
    format: &dyn Fn(&str, &str) -> Option<Format>,
) -> Migration {
    let mut migration = Migration::default();
    // Slots vpn-operator's masks hold, per provider `(namespace, name)`.
    let mut held: BTreeMap<(String, String), u32> = BTreeMap::new();
    for object in objects {
        let Some(kind) = old_kind(object) else {
            continue;
        };
        let Some(mut meta) = carry_metadata(object, default_namespace) else {
            migration.errors.push(Note {
                object: kind.to_owned(),
                field: "metadata.name".into(),
                message: "missing".into(),
            });
            continue;
        };
        let namespace = meta.namespace.clone().unwrap_or_default();
        if kind == "Mask" && owned_by_old_provider(object) {
            migration.notes.push(Note {
                object: describe(kind, &meta),
                field: String::new(),
                message: "vpn-operator's own verification mask: cloak verifies through a mask \
                          of its own; not migrated"
                    .into(),
            });
            continue;
        }
        // An owner in seed 000's group would take the new object with it when vpn-operator's
        // objects are deleted.
        if let Some(owners) = meta.owner_references.as_mut() {
            owners.retain(|o| {
                let old = o.api_version.split_once('/').map(|(g, _)| g) == Some(GROUP);
                if old {
                    migration.notes.push(Note {
                        object: describe(kind, &meta_name(&namespace, object)),
                        field: "metadata.ownerReferences".into(),
                        message: format!(
                            "{} {} ({GROUP}) left out: deleting vpn-operator's objects would \
                             delete the new one",
                            o.kind, o.name
                        ),
                    });
                }
                !old
            });
            if owners.is_empty() {
                meta.owner_references = None;
            }
        }
        match kind {
            "Provider" | "MaskProvider" => {
                let secret = object
                    .pointer("/spec/secret")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let format = format(&namespace, secret);
                provider(&mut migration, kind, object, meta, format);
            }
            "Mask" => {
                if let Some(p) = object.pointer("/status/provider")
                    && let Some(name) = p.get("name").and_then(Value::as_str)
                {
                    let ns = p
                        .get("namespace")
                        .and_then(Value::as_str)
                        .unwrap_or(&namespace);
                    *held.entry((ns.to_owned(), name.to_owned())).or_default() += 1;
                }
                mask(&mut migration, object, meta);
            }
            other => migration.notes.push(Note {
                object: describe(other, &meta),
                field: String::new(),
                message: "no equivalent: a VpnMask holds its slot and its credentials itself; \
                          not migrated"
                    .into(),
            }),
        }
    }
    // A mask named as cloak names a provider's verification mask would be taken for it.
    let verification: Vec<(String, String)> = migration
        .providers
        .iter()
        .map(|p| {
            let (ns, name) = (p.metadata.namespace.clone(), p.metadata.name.clone());
            (
                ns.unwrap_or_default(),
                crate::names::verification(&name.unwrap_or_default()),
            )
        })
        .collect();
    let masks = std::mem::take(&mut migration.masks);
    for mask in masks {
        let key = (
            mask.metadata.namespace.clone().unwrap_or_default(),
            mask.metadata.name.clone().unwrap_or_default(),
        );
        if verification.contains(&key) {
            migration.notes.push(Note {
                object: describe("Mask", &mask.metadata),
                field: String::new(),
                message: "not migrated: cloak's verification of the provider of that name uses \
                          a mask of this name; recreate it under another name"
                    .into(),
            });
        } else {
            migration.masks.push(mask);
        }
    }
    for ((namespace, name), slots) in held {
        migration.notes.push(Note {
            object: format!("Provider {namespace}/{name}"),
            field: String::new(),
            message: format!(
                "vpn-operator's masks still hold {slots} of its slots; until their pods move to \
                 the new masks and vpn-operator is stopped, the account may see up to {slots} \
                 connections more than maxSlots"
            ),
        });
    }
    migration
}

/// An old mask, as pods refer to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldMask {
    pub namespace: String,
    pub name: String,
    /// The old mask's copy of the credentials (`status.provider.secret`), when it had one.
    pub secret: Option<String>,
}

impl OldMask {
    /// Reads an old `Mask` object.
    pub fn of(object: &Value, default_namespace: &str) -> Option<Self> {
        (old_kind(object)? == "Mask" && !owned_by_old_provider(object)).then_some(())?;
        let meta = object.get("metadata")?;
        Some(Self {
            namespace: meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(default_namespace)
                .to_owned(),
            name: meta.get("name")?.as_str()?.to_owned(),
            secret: object
                .pointer("/status/provider/secret")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }
}

/// What a pod must change to use the new masks instead of `masks`: an ownerReference to an old
/// `Mask` becomes one to the `VpnMask` of the same name, and a reference to the old mask's
/// credentials Secret becomes one to the new mask's (`<mask>-vpn-credentials`). Empty when the
/// pod uses none of them.
pub fn pod_changes(pod: &Value, masks: &[OldMask]) -> Vec<String> {
    let namespace = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mine: Vec<&OldMask> = masks.iter().filter(|m| m.namespace == namespace).collect();
    let mut changes = Vec::new();
    for owner in pod
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = owner
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if old_owner_kind(owner) == Some("Mask") && mine.iter().any(|m| m.name == name) {
            changes.push(format!(
                "ownerReference Mask {name} ({GROUP}) -> VpnMask {name} (apiVersion \
                 cloak.dev/v1alpha1, the new object's uid, blockOwnerDeletion: true)"
            ));
        }
    }
    let mut secrets: Vec<&str> = Vec::new();
    collect_secret_refs(pod.get("spec").unwrap_or(&Value::Null), &mut secrets);
    secrets.sort_unstable();
    secrets.dedup();
    for secret in secrets {
        if let Some(mask) = mine.iter().find(|m| m.secret.as_deref() == Some(secret)) {
            changes.push(format!(
                "Secret {secret} (mask {}'s credentials) -> {}",
                mask.name,
                crate::names::mask_secret(&mask.name)
            ));
        }
    }
    changes
}

/// Every Secret name a pod spec refers to: `envFrom[].secretRef`, `env[].valueFrom.secretKeyRef`
/// and `volumes[].secret`, in any container.
fn collect_secret_refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let name = match key.as_str() {
                    "secretRef" | "secretKeyRef" => inner.get("name"),
                    "secret" => inner.get("secretName"),
                    _ => None,
                };
                if let Some(name) = name.and_then(Value::as_str) {
                    out.push(name);
                }
                collect_secret_refs(inner, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_secret_refs(i, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Seed 000's README Provider, as `kubectl get -o json` shows it.
    fn seed_provider() -> Value {
        json!({
            "apiVersion": "vpn.beebs.dev/v1", "kind": "Provider",
            "metadata": {"name": "my-vpn", "namespace": "default", "uid": "u1",
                         "resourceVersion": "7",
                         "annotations": {LAST_APPLIED: "{}"}},
            "spec": {
                "maxSlots": 6, "tags": ["default", "preferred", "my-vpn"],
                "secret": "my-vpn-credentials",
                "verify": {"skip": false, "timeout": "1m30s", "interval": "24h", "overrides": {
                    "pod": {"metadata": {"labels": {"mylabel": "myvalue"}}},
                    "containers": {
                        "init": {"image": "curlimages/curl:7.88.1"},
                        "vpn": {"image": "qmcgaw/gluetun:latest", "imagePullPolicy": "Always"},
                        "probe": {"image": "curlimages/curl:7.88.1"}}}}},
            "status": {"phase": "Active", "activeSlots": 1}
        })
    }

    fn seed_mask() -> Value {
        json!({"apiVersion": "vpn.beebs.dev/v1", "kind": "Mask",
               "metadata": {"name": "my-mask", "namespace": "default"}, "spec": null,
               "status": {"phase": "Active", "provider": {"name": "my-vpn", "namespace": "default",
                          "secret": "my-mask-my-vpn"}}})
    }

    /// The first migrated provider's verification overrides.
    fn overrides_of(m: &Migration) -> &VerifyOverrides {
        let verify = m.providers[0].spec.verify.as_ref().unwrap();
        verify.overrides.as_ref().unwrap()
    }

    #[test]
    fn seed_000s_objects_carry_over_field_by_field_for_gluetun_credentials() {
        let m = migrate(&[seed_provider(), seed_mask()], "default", &|_, _| {
            Some(Format::Gluetun)
        });
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let p = &m.providers[0];
        assert_eq!(p.metadata.name.as_deref(), Some("my-vpn"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(
            p.metadata.annotations, None,
            "last-applied is the old object's"
        );
        assert_eq!(p.metadata.uid, None);
        assert_eq!(p.spec.max_slots.get(), 6);
        assert_eq!(p.spec.tags, ["default", "preferred", "my-vpn"]);
        assert_eq!(p.spec.secret, "my-vpn-credentials");
        assert!(p.status.is_none());
        let verify = p.spec.verify.as_ref().unwrap();
        assert!(!verify.skip);
        assert_eq!(verify.timeout.as_ref().unwrap().get().as_secs(), 90);
        assert_eq!(verify.interval.as_ref().unwrap().as_str(), "24h");
        let overrides = verify.overrides.as_ref().unwrap();
        assert_eq!(
            overrides.pod.as_ref().unwrap()["metadata"]["labels"]["mylabel"],
            "myvalue"
        );
        let c = overrides.containers.as_ref().unwrap();
        assert_eq!(c.vpn.as_ref().unwrap()["imagePullPolicy"], "Always");
        assert_eq!(c.probe.as_ref().unwrap()["image"], "curlimages/curl:7.88.1");
        assert_eq!(m.masks[0].metadata.name.as_deref(), Some("my-mask"));
        assert!(m.masks[0].spec.providers.is_empty());
        // The only note: the slot vpn-operator's mask still holds.
        let notes: Vec<String> = m.notes.iter().map(ToString::to_string).collect();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("Provider default/my-vpn: vpn-operator's masks still hold 1"));
    }

    #[test]
    fn native_credentials_drop_the_gluetun_containers_overrides_each_listed() {
        let m = migrate(&[seed_provider()], "default", &|ns, name| {
            assert_eq!((ns, name), ("default", "my-vpn-credentials"));
            Some(Format::WgQuick)
        });
        let verify = m.providers[0].spec.verify.as_ref().unwrap();
        let overrides = verify.overrides.as_ref().unwrap();
        assert!(overrides.pod.is_some(), "the pod's labels still apply");
        assert_eq!(
            overrides.containers, None,
            "the probe override held only an image"
        );
        let fields: Vec<&str> = m.notes.iter().map(|n| n.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.verify.overrides.containers.init",
                "spec.verify.overrides.containers.vpn",
                "spec.verify.overrides.containers.probe.image",
            ]
        );
        // What else a probe override sets (resources, say) is kept.
        let mut p = seed_provider();
        p["spec"]["verify"]["overrides"]["containers"]["probe"]["resources"] =
            json!({"limits": {"memory": "64Mi"}});
        let m = migrate(&[p], "default", &|_, _| Some(Format::Ovpn));
        let c = overrides_of(&m);
        let probe = c.containers.as_ref().unwrap().probe.as_ref().unwrap();
        assert_eq!(probe, &json!({"resources": {"limits": {"memory": "64Mi"}}}));
    }

    #[test]
    fn an_unread_secret_keeps_the_overrides_and_says_how_they_may_apply() {
        let m = migrate(&[seed_provider()], "default", &|_, _| None);
        let c = overrides_of(&m);
        assert!(c.containers.as_ref().unwrap().init.is_some());
        assert!(
            m.notes
                .iter()
                .any(|n| n.field == "spec.verify.overrides.containers"
                    && n.message.contains("was not read"))
        );
    }

    #[test]
    fn fields_without_an_equivalent_are_listed_never_dropped_silently() {
        let mut p = seed_provider();
        p["spec"]["region"] = json!("eu");
        p["spec"]["verify"]["retries"] = json!(3);
        p["spec"]["verify"]["overrides"]["containers"]["sidecar"] = json!({});
        let mut mask = seed_mask();
        mask["spec"] = json!({"providers": ["my-vpn"], "priority": 1});
        let consumer = json!({"apiVersion": "vpn.beebs.dev/v1", "kind": "MaskConsumer",
                              "metadata": {"name": "my-mask", "namespace": "default"}});
        let unrelated = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        let m = migrate(&[p, mask, consumer, unrelated], "default", &|_, _| {
            Some(Format::Gluetun)
        });
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let listed: Vec<String> = m
            .notes
            .iter()
            .map(|n| format!("{} {}", n.object, n.field))
            .collect();
        for want in [
            "Provider default/my-vpn spec.region",
            "Provider default/my-vpn spec.verify.retries",
            "Provider default/my-vpn spec.verify.overrides.containers.sidecar",
            "Mask default/my-mask spec.priority",
            "MaskConsumer default/my-mask ",
        ] {
            assert!(listed.iter().any(|l| l == want), "{want} not in {listed:?}");
        }
        assert_eq!(m.masks[0].spec.providers, ["my-vpn"]);
    }

    #[test]
    fn objects_that_cannot_be_migrated_are_errors_and_yield_nothing() {
        let mut p = seed_provider();
        p["spec"]["maxSlots"] = json!(0);
        p["spec"]["verify"]["timeout"] = json!("90 seconds");
        let mut q = seed_provider();
        q["metadata"]["name"] = json!("no-secret");
        q["spec"].as_object_mut().unwrap().remove("secret");
        let mut mask = seed_mask();
        mask["spec"] = json!({"providers": "my-vpn"});
        let m = migrate(&[p, q, mask], "default", &|_, _| None);
        assert!(m.providers.is_empty() && m.masks.is_empty());
        let errors: Vec<String> = m.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(
            errors[0].contains("spec.maxSlots: 0 is not a device limit"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("spec.verify.timeout: unknown unit"),
            "{errors:?}"
        );
        assert!(errors[2].starts_with("Provider default/no-secret spec.secret: missing"));
        assert!(errors[3].contains("spec.providers: \"my-vpn\" is not a list of strings"));
    }

    #[test]
    fn a_file_object_without_a_namespace_takes_the_default_one() {
        let mut p = seed_provider();
        p["metadata"].as_object_mut().unwrap().remove("namespace");
        let m = migrate(&[p], "vpn", &|ns, _| {
            assert_eq!(ns, "vpn");
            None
        });
        assert_eq!(m.providers[0].metadata.namespace.as_deref(), Some("vpn"));
    }

    #[test]
    fn vpn_operators_own_masks_and_owners_in_its_group_are_left_out_each_listed() {
        // vpn-operator's verification mask, owned by its Provider.
        let verify = json!({"apiVersion": "vpn.beebs.dev/v1", "kind": "Mask",
            "metadata": {"name": "my-vpn-verify", "namespace": "default", "ownerReferences": [
                {"apiVersion": "vpn.beebs.dev/v1", "kind": "Provider", "name": "my-vpn", "uid": "p",
                 "controller": true}]}});
        // A user's mask owned by the user's resource and, oddly, by an old MaskConsumer.
        let mut mask = seed_mask();
        mask["metadata"]["ownerReferences"] = json!([
            {"apiVersion": "example.com/v1", "kind": "Download", "name": "d", "uid": "u"},
            {"apiVersion": "vpn.beebs.dev/v1", "kind": "MaskConsumer", "name": "c", "uid": "c"}]);
        // A mask that is not vpn-operator's but carries the name cloak's verification uses.
        let mut clash = seed_mask();
        clash["metadata"]["name"] = json!("my-vpn-verify");
        clash["metadata"]["namespace"] = json!("default");
        let m = migrate(
            &[seed_provider(), verify.clone(), mask],
            "default",
            &|_, _| None,
        );
        let names: Vec<&str> = m
            .masks
            .iter()
            .filter_map(|m| m.metadata.name.as_deref())
            .collect();
        assert_eq!(names, ["my-mask"]);
        let owners = m.masks[0].metadata.owner_references.as_ref().unwrap();
        let kinds: Vec<&str> = owners.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(kinds, ["Download"]);
        let notes: Vec<String> = m.notes.iter().map(ToString::to_string).collect();
        assert!(
            notes.iter().any(|n| n
                .starts_with("Mask default/my-vpn-verify: vpn-operator's own verification mask")),
            "{notes:?}"
        );
        assert!(notes.iter().any(|n| n.starts_with("Mask default/my-mask metadata.ownerReferences: MaskConsumer c (vpn.beebs.dev) left out")), "{notes:?}");
        assert!(OldMask::of(&verify, "default").is_none());
        let m = migrate(&[seed_provider(), clash], "default", &|_, _| None);
        assert!(m.masks.is_empty());
        assert!(
            m.notes
                .iter()
                .any(|n| n.message.starts_with("not migrated: cloak's verification"))
        );
    }

    #[test]
    fn a_pod_learns_which_owner_and_which_secret_to_change() {
        let masks = [OldMask::of(&seed_mask(), "default").unwrap()];
        let pod = json!({
            "metadata": {"name": "dl", "namespace": "default", "ownerReferences": [
                {"apiVersion": "vpn.beebs.dev/v1", "kind": "Mask", "name": "my-mask", "uid": "u"},
                {"apiVersion": "example.com/v1", "kind": "Download", "name": "d", "uid": "v"}]},
            "spec": {"containers": [{"name": "vpn", "envFrom": [{"secretRef": {"name": "my-mask-my-vpn"}}]},
                                    {"name": "app", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}}]}]}
        });
        let changes = pod_changes(&pod, &masks);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            changes[0]
                .starts_with("ownerReference Mask my-mask (vpn.beebs.dev) -> VpnMask my-mask")
        );
        assert_eq!(
            changes[1],
            "Secret my-mask-my-vpn (mask my-mask's credentials) -> my-mask-vpn-credentials"
        );
        // vpn-operator's own pods (owned by a Provider or a MaskConsumer) and pods of another
        // namespace have nothing to change.
        let mut own = pod.clone();
        own["metadata"]["ownerReferences"] = json!([
            {"apiVersion": "vpn.beebs.dev/v1", "kind": "Provider", "name": "my-vpn", "uid": "p"},
            {"apiVersion": "vpn.beebs.dev/v1", "kind": "Mask", "name": "my-vpn-verify", "uid": "v"}]);
        own["spec"] = json!({});
        assert!(pod_changes(&own, &masks).is_empty());
        let mut elsewhere = pod.clone();
        elsewhere["metadata"]["namespace"] = json!("other");
        elsewhere["metadata"]["ownerReferences"] = json!([]);
        assert!(pod_changes(&elsewhere, &masks).is_empty());
    }
}
