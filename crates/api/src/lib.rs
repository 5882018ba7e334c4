//! cloak's custom resource types, group `cloak.dev`, version `v1alpha1`.
//!
//! This crate owns the wire shape of every resource: serde, the OpenAPI schema the API server
//! validates with, and small value types that cannot hold an invalid value ([`GoDuration`]).
//! It makes no client calls and holds no controller logic; both live above it.

mod chain;
mod duration;
mod gateway;
mod mask;
mod provider;

pub use chain::{CHAIN_LABEL, HopSpec, HopStatus, VpnChain, VpnChainSpec, VpnChainStatus};
pub use duration::{DurationError, GoDuration};
pub use gateway::{
    Cidr, CidrError, ClientsSpec, DnsSpec, ExitHealth, ExitStatus, ExitsSpec, ForwardedPort,
    GATEWAY_LABEL, Mtu, PortProtocol, PortRequest, VpnGateway, VpnGatewaySpec, VpnGatewayStatus,
};
pub use mask::{AssignedProvider, MaskPhase, VpnMask, VpnMaskSpec, VpnMaskStatus};
pub use provider::{
    ConfigMapKey, ContainerOverrides, ProviderPhase, ServerListSource, ServerListStatus,
    TunnelKind, VerifyOverrides, VerifySpec, VpnProvider, VpnProviderSpec, VpnProviderStatus,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group every cloak resource belongs to.
pub const GROUP: &str = "cloak.dev";
/// The only served (and storage) version.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get cloak` category every resource joins.
pub const CATEGORY: &str = "cloak";

/// Every CRD cloak defines, in a stable order (the order `cloak crds` prints them in).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        VpnProvider::crd(),
        VpnMask::crd(),
        VpnGateway::crd(),
        VpnChain::crd(),
    ]
}

/// The schema of a free-form object whose fields the API server keeps as given
/// (`x-kubernetes-preserve-unknown-fields`). Used for pod and container overrides.
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The schema of `conditions`: the standard `metav1.Condition` list, merged by `type`.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item =
        generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>();
    schemars::json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}
