//! The Linux implementations against a real kernel, as root, inside a fresh network namespace:
//! apply is idempotent, `reset` removes exactly what cloak owns and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use cloak_dataplane::{
    Endpoint, Firewall, FirewallPolicy, Proto, ROUTE_TABLE, RULE_PRIORITY, RouteSet, Routes,
    firewall::Nftables, routes::LinuxRoutes,
};
use cloak_testkit::netns::{Netns, inside};

fn sh(ns: &Netns, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh", "-c", cmd])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn firewall_and_routes_apply_idempotently_and_reset_removes_only_what_cloak_owns() {
    let ns = Netns::new("dp");
    // Someone else's objects, which cloak must leave alone.
    ns.run(&["nft", "add", "table", "inet", "other"]);
    ns.run(&[
        "ip", "rule", "add", "fwmark", "7", "lookup", "100", "priority", "100",
    ]);
    ns.run(&[
        "ip",
        "route",
        "add",
        "unreachable",
        "default",
        "table",
        "100",
    ]);
    ns.run(&["ip", "addr", "add", "10.9.0.1/24", "dev", "lo"]);

    let policy = FirewallPolicy {
        endpoints: vec![Endpoint {
            addr: "192.0.2.2:51820".parse().unwrap(),
            proto: Proto::Udp,
        }],
        tunnel: Some("lo".into()),
        tunnel_ipv6: false,
        dns: Some("10.64.0.1".parse().unwrap()),
        bypass: vec!["10.9.0.0/24".parse().unwrap()],
        clamp_mss: Some(1380),
        notrack_tunnel: true,
        link_port: None,
        intranet_resolver: None,
        resolver: Some("10.9.0.53".parse().unwrap()),
    };
    let routes = RouteSet {
        tunnel: Some("lo".into()),
        ipv6: false,
        bypass: vec!["10.9.0.0/24".parse().unwrap()],
    };
    let (p, r) = (policy.clone(), routes.clone());
    inside(&ns, move || {
        for _ in 0..2 {
            Nftables::default().apply(&p).unwrap();
            LinuxRoutes::default().apply(&r).unwrap();
        }
    });
    let tables = sh(&ns, "nft list tables");
    assert!(
        tables.contains("table inet cloak") && tables.contains("table inet other"),
        "{tables}"
    );
    let rules = sh(&ns, "ip rule show");
    assert_eq!(
        rules.matches(&format!("{RULE_PRIORITY}:")).count(),
        1,
        "applying twice adds the rule once: {rules}"
    );
    assert!(
        rules.contains(&format!("not from all fwmark 0x436c lookup {ROUTE_TABLE}")),
        "{rules}"
    );
    let table = sh(&ns, &format!("ip route show table {ROUTE_TABLE}"));
    assert!(table.contains("default dev lo"), "{table}");
    assert!(table.contains("unreachable default"), "{table}");
    assert!(table.contains("10.9.0.0/24"), "bypass route: {table}");
    assert!(sh(&ns, &format!("ip -6 rule show priority {RULE_PRIORITY}")).contains("fwmark"));

    // A smaller policy replaces the bigger one whole.
    inside(&ns, move || {
        Nftables::default()
            .apply(&FirewallPolicy::block_all())
            .unwrap();
        LinuxRoutes::default().apply(&RouteSet::default()).unwrap();
    });
    let cloak = sh(&ns, "nft list table inet cloak");
    assert!(
        !cloak.contains("192.0.2.2") && !cloak.contains("chain tunnel"),
        "{cloak}"
    );
    let table = sh(&ns, &format!("ip route show table {ROUTE_TABLE}"));
    assert!(
        !table.contains("dev lo") && !table.contains("10.9.0.0"),
        "{table}"
    );

    inside(&ns, || {
        Nftables::default().reset().unwrap();
        LinuxRoutes::default().reset().unwrap();
        // Resetting what is already gone is fine.
        Nftables::default().reset().unwrap();
        LinuxRoutes::default().reset().unwrap();
    });
    let tables = sh(&ns, "nft list tables");
    assert_eq!(
        tables.trim(),
        "table inet other",
        "only cloak's table is gone"
    );
    let rules = sh(&ns, "ip rule show");
    assert!(!rules.contains(&format!("{RULE_PRIORITY}:")), "{rules}");
    assert!(
        rules.contains("100:\tfrom all fwmark 0x7 lookup 100"),
        "{rules}"
    );
    assert_eq!(
        sh(&ns, &format!("ip route show table {ROUTE_TABLE}")).trim(),
        ""
    );
    assert!(sh(&ns, "ip route show table 100").contains("unreachable default"));
}
