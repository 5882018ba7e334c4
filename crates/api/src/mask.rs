//! `VpnMask`: a lease of one connection slot of some matching `VpnProvider`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A request for one connection slot of a matching VpnProvider. Once Ready, `status.provider.secret`
/// names a copy of the provider's credentials in the mask's namespace. Pods that use the slot
/// carry an ownerReference to the mask with `blockOwnerDeletion: true`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cloak.dev",
    version = "v1alpha1",
    kind = "VpnMask",
    namespaced,
    status = "VpnMaskStatus",
    category = "cloak",
    shortname = "vpnm",
    doc = "A lease of one connection slot of a matching VpnProvider.",
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".status.provider.name"
    ),
    printcolumn(name = "Slot", type_ = "integer", json_path = ".status.provider.slot"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VpnMaskSpec {
    /// Provider tags this mask accepts: a provider qualifies when it carries at least one of
    /// them. Empty or absent: any provider that allows this namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,

    /// Providers (by name) this mask never takes a slot of, whatever their tags: a VpnChain's
    /// hop avoids the providers its other hops hold, so that no company sees two of its hops.
    /// Read when a slot is taken; a slot already held is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub avoid_providers: Vec<String>,
}

/// Observed state of a `VpnMask`, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpnMaskStatus {
    /// Summary of the mask's state: Pending, Waiting (every matching slot taken), Ready (slot
    /// held, unused), Active (a Pod uses it) or ErrNoProviders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MaskPhase>,

    /// Why the mask is in its phase, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Standard conditions (`Ready`), merged by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The provider slot this mask holds, when it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<AssignedProvider>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The slot a mask holds and where its credentials are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignedProvider {
    /// The provider's name.
    pub name: String,
    /// The provider's namespace.
    pub namespace: String,
    /// The provider's uid: a provider deleted and recreated under the same name is another one.
    pub uid: String,
    /// The slot index held, from 0 to `maxSlots - 1`.
    pub slot: u32,
    /// Name of the copy of the provider's credentials Secret in the mask's namespace.
    pub secret: String,
}

// Phases of a `VpnMask` (seed 000's, unchanged). (A `//` comment: a type's doc would replace
// the field's own in the generated schema.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MaskPhase {
    /// First seen by the operator.
    Pending,
    /// Matching providers exist but every slot is taken.
    Waiting,
    /// A slot is held and the credentials copy is in place; no pod uses it yet.
    Ready,
    /// A slot is held and some Pod has an ownerReference to the mask.
    Active,
    /// No provider matches the mask's tags and namespace.
    ErrNoProviders,
}
