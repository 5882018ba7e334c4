//! cloak's node component, for VpnGateway clients: the chained CNI plugin ([`cni`]) and the node
//! daemon it hands its calls to ([`daemon`]), which attaches client pods before their containers
//! start (and running pods that become clients later, [`attach`]), keeps the node's links to the exits, probes them ([`probe`]) and fails over. Which
//! gateway a pod belongs to is decided by `cloak_model::clients`.

pub mod attach;
pub mod cni;
pub mod daemon;
pub mod install;
mod metrics;
pub mod probe;
pub mod sandbox;
