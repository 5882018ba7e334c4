//! The harness itself: a control plane starts, serves, and leaves nothing behind however its
//! owner ends (drop, SIGKILL of the test process, SIGKILL of the process and its watchdogs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers, not only #[test] fns

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cloak_testkit::ControlPlane;
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, api::ListParams};

const HOLDER_ENV: &str = "CLOAK_TESTKIT_HOLDER";

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Not a test on its own: the child process the kill tests start. It starts a control plane,
/// reports where it is, and waits to be killed.
#[tokio::test]
#[ignore = "run only as the child of the kill tests"]
async fn holder() {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return;
    }
    let cp = ControlPlane::start().await.unwrap();
    let pids: Vec<String> = cp.server_pids().iter().map(u32::to_string).collect();
    println!("READY {} {}", cp.dir().display(), pids.join(","));
    tokio::time::sleep(Duration::from_mins(2)).await;
}

/// Starts the holder, returns it with the control plane's directory and server PIDs.
fn start_holder() -> (std::process::Child, PathBuf, Vec<u32>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "holder", "--ignored", "--nocapture"])
        .env(HOLDER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("READY ") {
            let (dir, pids) = rest.split_once(' ').unwrap();
            let pids = pids.split(',').map(|p| p.parse().unwrap()).collect();
            return (child, PathBuf::from(dir), pids);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("holder exited before its control plane was ready");
}

#[tokio::test]
async fn a_started_control_plane_serves_and_dropping_it_removes_everything() {
    let cp = ControlPlane::start().await.unwrap();
    eprintln!("control plane ready in {:?}", cp.startup_time());
    let namespaces = Api::<Namespace>::all(cp.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        namespaces
            .items
            .iter()
            .any(|ns| ns.metadata.name.as_deref() == Some("default"))
    );
    let (dir, pids) = (cp.dir().to_owned(), cp.server_pids());
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver");
    assert!(pids.iter().all(|&p| alive(p)));
    drop(cp);
    assert!(
        pids.iter().all(|&p| !alive(p)),
        "servers still running after drop"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn killing_the_test_process_stops_its_servers_and_removes_its_files() {
    let (mut holder, dir, pids) = start_holder();
    assert!(pids.iter().all(|&p| alive(p)));
    holder.kill().unwrap(); // SIGKILL: no destructor runs
    holder.wait().unwrap();
    wait_until("the servers stop", Duration::from_secs(20), || {
        pids.iter().all(|&p| !alive(p))
    });
    wait_until("the directory is removed", Duration::from_secs(20), || {
        !dir.exists()
    });
}

#[tokio::test]
async fn servers_orphaned_with_their_watchdogs_are_reaped_by_the_next_start() {
    let (mut holder, dir, pids) = start_holder();
    // Kill the owner and every watchdog at once, as `kill -9` of a whole session would: the
    // servers are orphaned and nothing of the first control plane remains to clean up.
    let watchdogs = std::fs::read_to_string(dir.join("watchdogs")).unwrap();
    let janitor = std::fs::read_to_string(dir.join("janitor.pid")).unwrap();
    let mut kill = Command::new("kill");
    kill.arg("-KILL")
        .args(watchdogs.split_whitespace())
        .arg(janitor.trim())
        .arg(holder.id().to_string());
    assert!(kill.status().unwrap().success());
    holder.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let orphans: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        !orphans.is_empty(),
        "servers should have been orphaned for this test to mean anything"
    );

    let cp = ControlPlane::start().await.unwrap();
    assert!(
        orphans.iter().all(|&p| !alive(p)),
        "orphaned servers were not reaped"
    );
    wait_until(
        "the stale directory is removed",
        Duration::from_secs(20),
        || !dir.exists(),
    );
    drop(cp);
}
