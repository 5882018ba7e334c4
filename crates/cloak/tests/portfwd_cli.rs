//! `cloak portfwd` as a user runs it: the binary against a real kube-apiserver, loading into a
//! test network namespace; its admin server reports ready once a ruleset is loaded, and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cloak_testkit::{ControlPlane, netns::Netns};

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    cloak_testkit::http_get(([127, 0, 0, 1], port).into(), path).ok()
}

/// Kills the process when the test ends, even on panic.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_portfwd_binary_loads_rules_and_reports_ready_and_metrics() {
    let cp = ControlPlane::shared();
    let host = Netns::new("cli");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_cloak"))
            .args([
                "portfwd",
                "--interfaces",
                "eth0",
                "--admin-addr",
                &format!("127.0.0.1:{port}"),
                "local",
                "--netns",
                host.name(),
            ])
            .env("KUBECONFIG", cp.kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "cloak portfwd exited"
        );
        if let Some((200, body)) = get(port, "/readyz") {
            break body;
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ready, "ok\n");
    assert!(
        host.run(&["nft", "list", "tables"])
            .contains("table ip cloak_portfwd")
    );
    let (code, metrics) = get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cloak_portfwd_syncs_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloak_portfwd_apply_duration_seconds_count"),
        "{metrics}"
    );
}
