//! `VpnProvider`: one VPN account and how many devices its contract allows at once.

use std::num::NonZeroU32;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::GoDuration;

/// One VPN account (NordVPN, Mullvad, a WireGuard server of your own, ...) whose connection slots
/// cloak leases to `VpnMask`s, never more at once than `maxSlots`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cloak.dev",
    version = "v1alpha1",
    kind = "VpnProvider",
    namespaced,
    status = "VpnProviderStatus",
    category = "cloak",
    shortname = "vpnp",
    doc = "One VPN account whose connection slots cloak leases to VpnMasks, never more at once than maxSlots.",
    printcolumn(
        name = "Max",
        type_ = "integer",
        json_path = ".spec.maxSlots",
        description = "Contractual device limit"
    ),
    printcolumn(
        name = "Active",
        type_ = "integer",
        json_path = ".status.activeSlots",
        description = "Slots held by masks"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VpnProviderSpec {
    /// Name of the Secret, in this namespace, holding the VPN credentials: gluetun's environment
    /// variables (VPN_SERVICE_PROVIDER, OPENVPN_USER, WIREGUARD_PRIVATE_KEY, ...), a wg-quick
    /// `wg0.conf` key, or an OpenVPN `config.ovpn` key with optional `username`/`password`.
    pub secret: String,

    /// Contractual limit of devices connected at once. cloak never leases more slots than this,
    /// counting verification. Required, at least 1.
    pub max_slots: NonZeroU32,

    /// Labels that VpnMasks select providers by (`spec.providers` of a mask). A mask that names
    /// no tags may use any provider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,

    /// Namespaces whose masks may use this provider. Empty or absent: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,

    /// How the credentials are checked end to end before masks get slots. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,

    /// gluetun's server list, for a Secret of gluetun's WireGuard variables that names a
    /// provider (`VPN_SERVICE_PROVIDER: mullvad`, `WIREGUARD_PRIVATE_KEY`, `WIREGUARD_ADDRESSES`):
    /// the provider's WireGuard servers that pass the Secret's `SERVER_COUNTRIES`,
    /// `SERVER_REGIONS`, `SERVER_CITIES`, `SERVER_HOSTNAMES` and `SERVER_NAMES` become the pool
    /// cloak's agent runs (verification, masks, gateway exits, chain hops). Absent: such a
    /// Secret is run by gluetun only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_list: Option<ServerListSource>,

    /// Tunnel the credentials are for: `wireguard` or `openvpn`. Absent: read from the Secret's keys (`wg0.conf` or
    /// WIREGUARD_* → wireguard, `config.ovpn` or OPENVPN_* → openvpn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelKind>,
}

/// Where gluetun's server list is read from: `configMap` or `url`, one of them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerListSource {
    /// A ConfigMap in the provider's namespace holding the list: gluetun's
    /// `internal/storage/servers.json` as it is, or trimmed to its `version` and your provider's
    /// section (a ConfigMap holds at most 1 MiB; the whole file is about 2 MB). Only public
    /// data: the private key stays in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKey>,

    /// An `http://` or `https://` URL the operator fetches the list from (gluetun's whole file
    /// is fine), every `refreshInterval`. The provider's section of the last good copy is kept
    /// in the ConfigMap `<provider>-server-list`, which is used while a fetch fails. Nothing is
    /// fetched unless this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// How often `url` is fetched again. Default 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<GoDuration>,
}

/// One key of a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    /// The ConfigMap's name.
    pub name: String,
    /// The key holding the list. Default `servers.json`.
    #[serde(default = "servers_json")]
    pub key: String,
}

fn servers_json() -> String {
    "servers.json".into()
}

// The kind of tunnel a provider's credentials open. (A `//` comment: a type's doc would replace
// the field's own in the generated schema.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TunnelKind {
    /// WireGuard: kernel module when present, userspace otherwise.
    #[serde(rename = "wireguard")]
    WireGuard,
    /// OpenVPN 2.x.
    #[serde(rename = "openvpn")]
    OpenVpn,
}

/// End-to-end verification of a provider's credentials: a pod connects through the VPN and
/// checks that its public address changed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// Skip verification: the provider becomes Ready at once, whatever the Secret holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip: bool,

    /// How long verification may take before it fails, in Go duration syntax (`1m30s`).
    /// Default 1m30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<GoDuration>,

    /// Re-verify this often (`24h`). Absent: verify once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<GoDuration>,

    /// Changes merged onto the generated verification pod and its containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<VerifyOverrides>,
}

/// Overrides for the verification pod. Every part is optional and independent of the others.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyOverrides {
    /// Merged onto the generated Pod (metadata, spec), e.g. `{metadata: {labels: {a: b}}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::free_form_object")]
    pub pod: Option<serde_json::Value>,

    /// Overrides for each generated container, kept apart from `pod` so they can be given alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<ContainerOverrides>,
}

/// Per-container overrides of the verification pod; any subset may be given.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerOverrides {
    /// Merged onto the init container that records the unmasked public address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::free_form_object")]
    pub init: Option<serde_json::Value>,

    /// Merged onto the VPN container that connects with the provider's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::free_form_object")]
    pub vpn: Option<serde_json::Value>,

    /// Merged onto the probe container that exits 0 once the public address differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::free_form_object")]
    pub probe: Option<serde_json::Value>,
}

/// Observed state of a `VpnProvider`, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpnProviderStatus {
    /// Summary of the provider's state: Pending, Verifying, Verified, Ready (usable, no slot
    /// leased), Active (slots leased), ErrVerifyFailed or ErrSecretNotFound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProviderPhase>,

    /// Why the provider is in its phase, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Standard conditions (`Ready`, `Verified`), merged by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// Slots currently leased to masks, verification included.
    #[serde(default)]
    pub active_slots: u32,

    /// When the credentials last passed verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<Time>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The credentials Secret's resourceVersion this status was decided with: a failed
    /// verification is retried once the spec or the Secret changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_secret_version: Option<String>,

    /// The pool read from `spec.serverList`, when one is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_list: Option<ServerListStatus>,
}

/// What the server list gave.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerListStatus {
    /// WireGuard servers of the provider's section that pass the Secret's filters: the pool.
    pub servers: u32,
    /// When the provider's section was last updated, as the list says: the list's age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
    /// Where the list was read from (`configmap/<name>/<key>`) and its resourceVersion.
    pub source: String,

    /// For a `url`: when the copy in use was fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched: Option<Time>,

    /// For a `url`: the SHA-256 of the copy in use, as fetched (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,

    /// For a `url`: why the last fetch failed, while the last good copy is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_error: Option<String>,
}

// Phases of a `VpnProvider` (seed 000's, unchanged).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ProviderPhase {
    /// First seen by the operator.
    Pending,
    /// The credentials are being checked by a verification pod.
    Verifying,
    /// Verification passed; Ready or Active follows at the next reconcile.
    Verified,
    /// Usable, no slot leased.
    Ready,
    /// Usable, one or more slots leased.
    Active,
    /// Verification failed; `message` says why.
    ErrVerifyFailed,
    /// The Secret named by `spec.secret` does not exist.
    ErrSecretNotFound,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_000_provider_manifest_reads_as_is() {
        let yaml = r"
secret: my-vpn-credentials
maxSlots: 6
tags: [default, preferred]
verify:
  skip: false
  timeout: 1m30s
  interval: 24h
  overrides:
    containers:
      vpn:
        image: qmcgaw/gluetun:latest
";
        let spec: VpnProviderSpec = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(spec.max_slots.get(), 6);
        let verify = spec.verify.unwrap();
        assert_eq!(verify.timeout.unwrap().get().as_secs(), 90);
        let containers = verify.overrides.unwrap().containers.unwrap();
        assert!(containers.init.is_none() && containers.probe.is_none());
        assert_eq!(containers.vpn.unwrap()["image"], "qmcgaw/gluetun:latest");
    }

    #[test]
    fn zero_max_slots_is_refused_when_read() {
        let err = serde_yaml::from_str::<VpnProviderSpec>("secret: s\nmaxSlots: 0\n").unwrap_err();
        assert!(err.to_string().contains("nonzero"), "{err}");
    }
}
