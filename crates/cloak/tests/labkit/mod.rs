//! Helpers for the end-to-end tests that run in a real `cloak lab`: a real kubelet, containerd,
//! CNI and kube-proxy on each node, cloak installed by its Helm chart, fake VPN providers.
//!
//! One lab per test binary ([`shared`]), brought up by the `cloak` binary under test with this
//! process as its owner: the lab's supervisor tears everything down when the test binary exits,
//! however it exits. Tests take turns ([`serial`]): several of them change what the others see
//! (the operator's pods, the providers' Secrets, node annotations) and put it back afterwards.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc
)]

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use serde_json::Value;

pub(crate) mod gateway;

/// A lab this test binary owns.
pub(crate) struct TestLab {
    pub(crate) lab: cloak_lab::Lab,
    pub(crate) kubectl: PathBuf,
    pub(crate) helm: PathBuf,
}

/// `e<pid in base 36>`: at most 8 characters, unique per live test process.
pub(crate) fn unique_name(prefix: char) -> String {
    let mut pid = std::process::id();
    let mut digits = Vec::new();
    while pid > 0 {
        digits.push(std::char::from_digit(pid % 36, 36).unwrap());
        pid /= 36;
    }
    std::iter::once(prefix)
        .chain(digits.into_iter().rev())
        .collect()
}

/// Runs `cloak lab <args>` with this lab's name; returns its output.
pub(crate) fn cloak_lab(name: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloak"))
        .arg("lab")
        .args(args)
        .args(["--name", name])
        .env("CLOAK_REPO", cloak_testkit::repo_path(""))
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Brings up a lab of `nodes` nodes owned by this process, its nodes under the bridge plugin.
pub(crate) fn up(name: &str, nodes: u8) -> Result<TestLab, String> {
    up_under(name, nodes, "bridge")
}

/// Brings up a lab of `nodes` nodes owned by this process, its nodes under `cni` (`cloak lab up
/// --cni`).
pub(crate) fn up_under(name: &str, nodes: u8, cni: &str) -> Result<TestLab, String> {
    let owner = std::process::id().to_string();
    let out = cloak_lab(
        name,
        &[
            "up",
            "--nodes",
            &nodes.to_string(),
            "--cni",
            cni,
            "--owner",
            &owner,
        ],
    );
    if !out.status.success() {
        return Err(format!(
            "cloak lab up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(TestLab {
        lab: cloak_lab::Lab::new(name).map_err(|e| e.to_string())?,
        kubectl: cloak_lab::tool("kubectl"),
        helm: cloak_lab::tool("helm"),
    })
}

/// The lab shared by every test of this binary: 2 nodes under the bridge plugin, started on
/// first use.
pub(crate) fn shared() -> &'static TestLab {
    shared_under("bridge")
}

/// The lab shared by every test of this binary: 2 nodes under `cni`, started on first use (a
/// binary uses one CNI: the first call decides).
pub(crate) fn shared_under(cni: &str) -> &'static TestLab {
    static LAB: OnceLock<Result<TestLab, String>> = OnceLock::new();
    match LAB.get_or_init(|| up_under(&unique_name('e'), 2, cni)) {
        Ok(lab) => lab,
        Err(e) => panic!("{e}"),
    }
}

/// Held while a test uses the shared lab.
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TestLab {
    /// `kubectl args...`, its standard output; panics with standard error on failure.
    pub(crate) fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    pub(crate) fn try_kubectl(&self, args: &[&str]) -> Result<String, String> {
        stdout_or_stderr(&self.lab.kubectl(&self.kubectl).args(args).output().unwrap())
    }

    /// `kubectl args... -o json`, parsed.
    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).unwrap()
    }

    /// `kubectl apply` of a YAML document.
    pub(crate) fn apply(&self, yaml: &str) {
        let mut child = self
            .lab
            .kubectl(&self.kubectl)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `helm args...` against the lab.
    pub(crate) fn helm(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.helm)
            .args(args)
            .arg("--kubeconfig")
            .arg(self.lab.kubeconfig())
            .output()
            .unwrap();
        stdout_or_stderr(&out)
    }

    /// A fresh Kubernetes namespace for one test.
    pub(crate) fn namespace(&self, prefix: &str) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed));
        self.kubectl(&["create", "namespace", &name]);
        name
    }

    /// The network namespace of a lab role (`ext`, `host`, `n1`, `p1`, ...).
    pub(crate) fn netns(&self, role: &str) -> String {
        self.lab.netns(role)
    }

    /// Runs `argv` inside a network namespace of the lab.
    pub(crate) fn exec_in(&self, role: &str, argv: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns(role)])
            .args(argv)
            .output()
            .unwrap();
        stdout_or_stderr(&out)
    }

    /// Loads an nftables script inside a network namespace of the lab; panics when `nft`
    /// refuses it.
    pub(crate) fn nft(&self, role: &str, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns(role), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft in {role}: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl TestLab {
    /// The packets nftables counter `name` of `table` (`family` `ip` or `inet`) has counted in a
    /// lab namespace; 0 when it cannot be read.
    pub(crate) fn nft_packets(&self, role: &str, family: &str, table: &str, name: &str) -> u64 {
        let text = self
            .exec_in(role, &["nft", "list", "counter", family, table, name])
            .unwrap();
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// Every packet to and from `servers` dropped by the internet's router, until dropped.
pub(crate) struct Outage<'a> {
    lab: &'a TestLab,
}

impl<'a> Outage<'a> {
    pub(crate) fn start(lab: &'a TestLab, servers: &[String]) -> Self {
        let set = servers.join(", ");
        lab.nft(
            "net",
            &format!(
                "table ip cloak_test_outage {{\n  chain forward {{\n    type filter hook forward priority -400; policy accept;\n    ip daddr {{ {set} }} drop\n    ip saddr {{ {set} }} drop\n  }}\n}}\n"
            ),
        );
        Self { lab }
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec_in(
            "net",
            &["nft", "delete", "table", "ip", "cloak_test_outage"],
        );
    }
}

/// Standard output of a command that succeeded, its standard error otherwise.
fn stdout_or_stderr(out: &Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `limit`; panics naming
/// `what` and the last value seen otherwise.
pub(crate) fn eventually<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let last = match check() {
            Ok(value) => return value,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(crate) fn str_at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}
