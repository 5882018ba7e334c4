//! Test-only harnesses for cloak. Nothing here ships in the binary.
//!
//! - [`controlplane`]: a real Kubernetes control plane (etcd, kube-apiserver and, on request,
//!   kube-controller-manager) on loopback ports, shared by the tests of one test binary.
//! - [`netns`]: network namespaces and veth pairs that are removed, with their processes, on drop.
//! - [`partition`]: a loopback TCP proxy that can be frozen, to partition a client from a server.

pub mod controlplane;
pub mod netlab;
pub mod netns;
pub mod partition;

pub use controlplane::{ControlPlane, Error, TestNamespace};

/// Path of a tool the tests run (`helm`, `kubectl`): the copy `tools/install-deps.sh` put in the
/// cache when there is one, otherwise whatever `PATH` finds.
pub fn tool(name: &str) -> std::path::PathBuf {
    let cache = std::env::var_os("CLOAK_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache"))
                })
                .map(|c| c.join("cloak"))
        });
    cache
        .map(|c| c.join("bin").join(name))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// A path inside this repository, e.g. `repo_path("deploy/crds")`.
///
/// Resolved when the test runs, from the `CARGO_MANIFEST_DIR` cargo sets for every test process
/// (a crate two levels below the root), not from the value compiled in: builds are cached in a
/// target directory shared by every checkout (`tools/test.sh`), and a test binary compiled in
/// one checkout must read the files of the checkout that runs it.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    );
    manifest_dir.join("../..").join(relative)
}

/// (VmRSS, VmHWM) of process `pid` in MiB (0 when it cannot be read): what the benchmarks
/// report for a process of their own.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// `GET path` over HTTP/1.0 from a server on `addr` (an admin server, on loopback): its status
/// code and body. Blocking, bounded (2 s to connect, 10 s to answer): for tests and benchmarks
/// whose server runs in another process or thread.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:.80}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
