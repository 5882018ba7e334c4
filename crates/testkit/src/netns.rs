//! Network namespaces for tests: created with a unique prefix, removed on drop (also on panic),
//! together with every process started inside them (found with `ip netns pids`, killed by PID);
//! those of a test process that was killed are removed by the next one.

#![allow(clippy::missing_panics_doc)] // test helpers: panicking with the reason is their contract

use std::{
    process::{Command, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

/// A network namespace owned by a test.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"))
}

/// Runs `ip args`, panicking with its stderr on failure.
pub fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates `ck<pid>-<n>-<label>`. The first one a process creates also removes what dead
    /// test processes left behind ([`reap_orphans`]).
    pub fn new(label: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        static REAP: Once = Once::new();
        REAP.call_once(reap_orphans);
        let name = format!(
            "ck{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip_ok(&["netns", "add", &name]);
        let ns = Self { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace, panicking with its stderr on failure.
    pub fn run(&self, argv: &[&str]) -> String {
        let out = self
            .command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert!(
            out.status.success(),
            "in {}: {argv:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// Kills every process in namespace `name` (by PID) and deletes it.
fn remove(name: &str) {
    let pids = ip(&["netns", "pids", name]);
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    let _ = ip(&["netns", "del", name]);
}

/// Removes the namespaces of test processes that died without dropping them (killed by a
/// timeout, SIGKILL): `ck<pid>-…` whose `<pid>` is no longer running. A namespace whose PID
/// was reused meanwhile is left alone; only names of this shape are ever touched.
pub fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ck")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove(&name);
        }
    }
}

/// A veth pair from `a` (named `a_if`, address `a_addr`) to `b` (`b_if`, `b_addr`), both up.
/// Addresses are CIDRs (`10.1.0.1/24`); `None` leaves an end unaddressed.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: Option<&str>,
    b: &Netns,
    b_if: &str,
    b_addr: Option<&str>,
) {
    ip_ok(&[
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    for (ns, iface, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if let Some(addr) = addr {
            ns.run(&["ip", "addr", "add", addr, "dev", iface]);
        }
        ns.run(&["ip", "link", "set", iface, "up"]);
    }
}

/// Runs `f` on a thread inside `ns` (what the node daemon, the CNI plugin and the agent do in
/// theirs): the kernel tools it runs inherit the namespace.
#[allow(clippy::expect_used, clippy::missing_panics_doc)] // a test helper: panicking with the reason is its contract
pub fn inside<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("the namespace's file");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("the thread inside the namespace panicked")
}
