//! Test-only harnesses for cloak. Nothing here ships in the binary.
//!
//! - [`controlplane`]: a real Kubernetes control plane (etcd, kube-apiserver and, on request,
//!   kube-controller-manager) on loopback ports, shared by the tests of one test binary.

mod certs;
pub mod controlplane;

pub use controlplane::{ControlPlane, Error, TestNamespace};
