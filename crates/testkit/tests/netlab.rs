//! The network lab itself, as root: the leak counters see what a pod without an agent sends
//! (they are not blind), and keep the kernel's link-scope IPv6 chatter apart from leaks; what a
//! killed test process leaves behind is reaped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cloak_testkit::netlab::{
    INTERNET, INTERNET6, Lab, NODE_INTERNET, NODE_INTERNET6, RESOLVER, wait_until,
};

#[test]
fn leak_counters_count_what_an_open_pod_sends_and_keep_neighbour_discovery_apart() {
    let lab = Lab::new();
    let counters = lab.count_leaks(&[], "udp");
    let t = Duration::from_secs(2);

    assert_eq!(lab.ask("tcp", INTERNET, t).as_deref(), Ok(NODE_INTERNET));
    let v4 = counters.read();
    assert!(v4.ipv4 > 0 && v4.ipv6 == 0 && v4.dns == 0, "{v4:?}");
    assert_eq!(v4.to, ["203.0.113.10 . tcp"]);

    // The first IPv6 packet needs the node's link-layer address: a neighbour solicitation,
    // counted as link traffic, then the connection itself, counted as IPv6.
    assert_eq!(lab.ask("tcp", INTERNET6, t).as_deref(), Ok(NODE_INTERNET6));
    let v6 = counters.read() - v4;
    assert!(v6.ipv6 > 0 && v6.ipv4 == 0, "{v6:?}");
    assert!(
        v6.link > 0,
        "neighbour discovery is seen as link traffic: {v6:?}"
    );
    assert_eq!(v6.to, ["203.0.113.10 . tcp", "fd03::10 . tcp"]);

    let before = counters.read();
    assert_eq!(lab.ask("dns", RESOLVER, t).as_deref(), Ok(NODE_INTERNET));
    let dns = counters.read() - before;
    assert!(dns.dns > 0 && dns.ipv4 == dns.dns, "{dns:?}");
    assert_eq!(dns.leaked(), dns.ipv4);
    assert!(dns.to.contains(&"203.0.113.53 . udp".to_owned()), "{dns:?}");
}

#[test]
fn namespaces_left_by_a_killed_test_process_are_reaped_and_live_ones_kept() {
    // A PID that is surely not running: a child that has exited and been waited for.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead = format!("ck{}-0-orphan", child.id());
    let ours = cloak_testkit::netns::Netns::new("live");
    cloak_testkit::netns::ip_ok(&["netns", "add", &dead]);
    let sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &dead, "sleep", "30"])
        .spawn()
        .unwrap();
    let inside = wait_until(Duration::from_secs(5), || {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &dead])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(|p| p == sleeper.id().to_string())
    });
    assert!(inside, "the sleeper never entered {dead}");

    cloak_testkit::netns::reap_orphans();

    let listed = |name: &str| std::path::Path::new(&format!("/var/run/netns/{name}")).exists();
    let left = listed(&dead);
    if left {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &dead])
            .status();
    }
    assert!(!left, "{dead} was not reaped");
    assert!(listed(ours.name()), "a live process's namespace is kept");
    let mut sleeper = sleeper;
    assert!(
        sleeper.wait().unwrap().code().is_none(),
        "the process inside the orphan was killed"
    );
}
