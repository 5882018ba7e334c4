//! `cloak lab`: the whole system on one Linux machine, without touching the host's network.
//!
//! A real Kubernetes cluster — etcd, kube-apiserver, kube-controller-manager and kube-scheduler in
//! one network namespace; on each node a real containerd, runc, CNI (bridge + host-local, or Multus
//! in front of them), kubelet and kube-proxy in a network namespace and a mount namespace of its
//! own; CoreDNS as the cluster DNS — plus an "internet" namespace with an echo service that reports
//! the source address it saw, a DNS server, and fake VPN providers (userspace WireGuard and OpenVPN
//! servers, each with a pool of servers and its own exit address), and a "host" namespace for
//! `cloak portfwd`. cloak itself is installed by its Helm chart from a locally built image.
//!
//! ```text
//!                         ck-<lab>-lan: bridge br0, 10.250.0.0/24
//!   ┌──────────┬──────────────┬───────────────┬─────────────────┬────────────────┐
//!  cp .2      n1 .11 … nN    host .254       net .1 (gateway)   │
//!  etcd       containerd     cloak portfwd   echo 203.0.113.10  ├─ p1 wg-alpha: WireGuard servers, exit 198.51.100.11
//!  apiserver  kubelet        ext0 ── ext     DNS  203.0.113.53  ├─ p2 wg-beta: WireGuard servers, exit 198.51.100.12
//!  kcm, sched kube-proxy     100.127.0.0/24  /files/servers.json├─ p3 ovpn-gamma: OpenVPN servers, exit 198.51.100.13
//!             pods 10.244.<n>.0/24 on cni0                      └─ p4 wg-delta: gluetun-style WireGuard servers, exit 198.51.100.14
//! ```
//!
//! Life cycle. `cloak lab up` starts a supervisor (`cloak lab supervise`, detached) that builds
//! everything, reports progress into the lab's directory, then holds the processes: every
//! process it starts gets `PR_SET_PDEATHSIG` (through `setpriv`), so a SIGKILLed supervisor takes
//! its servers with it. `cloak lab down` asks the supervisor to stop and then reaps by name
//! whatever is left (processes in the lab's namespaces and cgroups, namespaces, cgroup
//! directories, files) and restores the sysctls the kubelet changes: the same reaping runs
//! before every `up`, so a lab left by a killed `up` never lingers.

pub mod certs;
mod cluster;
mod echo;
mod error;
mod images;
pub mod layout;
pub mod natpmp;
mod procs;
pub mod prometheus;
mod proxy;
mod reap;
mod sh;
mod supervisor;
mod vpn;

pub use cluster::Binaries;
pub use error::Error;
pub use images::CLOAK_PACKAGES;
pub use layout::Lab;
pub use manifests::HELM_VALUES;
pub use supervisor::{CLOAK_NAMESPACE, Cni, DEMO_NAMESPACE, Reaped, UpOptions, tool};
pub use vpn::{Pki, client_config, server_list_file};

mod manifests;
mod status;

/// `kubectl get ... -o jsonpath=<path>` against the lab.
pub(crate) fn lab_kubectl_jsonpath(
    lab: &Lab,
    kubectl: &std::path::Path,
    args: &[&str],
    path: &str,
) -> Result<String, Error> {
    let mut command = lab.kubectl(kubectl);
    command.args(args).arg("-o").arg(format!("jsonpath={path}"));
    sh::output(&mut command)
}
