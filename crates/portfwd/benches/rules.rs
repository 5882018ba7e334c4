//! Applying host port forwards, side by side in one run and one network namespace:
//! 5,000 mappings as one nftables transaction (cloak) vs one `iptables` command per rule (the way
//! Epok issues them), and the cost of changing one Service when 5,000 mappings exist.
//!
//! Run as root: `cargo bench -p cloak-portfwd --bench rules` (`-- 1000` for fewer mappings).
//! It re-runs itself inside a throwaway network namespace; the host's rules are never touched.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_precision_loss
)]

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Instant,
};

use cloak_model::portfwd::{Forward, Options, Protocol, Ruleset};

const INSIDE: &str = "CLOAK_BENCH_INSIDE_NETNS";

fn ruleset(mappings: u16, changed: bool) -> Ruleset {
    let forwards = (0..mappings)
        .map(|i| Forward {
            protocol: Protocol::Tcp,
            external: 10_000 + i,
            node_port: if changed && i == 0 {
                32_000
            } else {
                30_000 + (i % 2_700)
            },
            internal: false,
            allow: None,
            service: format!("bench/svc-{i}"),
        })
        .collect();
    Ruleset {
        options: Options {
            interfaces: vec!["eth0".into()],
            external_interface: None,
        },
        nodes: vec![
            "10.98.0.11".parse().unwrap(),
            "10.98.0.12".parse().unwrap(),
            "10.98.0.13".parse().unwrap(),
        ],
        forwards,
    }
}

fn nft_load(script: &str) -> f64 {
    let started = Instant::now();
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    started.elapsed().as_secs_f64()
}

fn inside(mappings: u16) {
    let full = ruleset(mappings, false);
    let render_started = Instant::now();
    let script = full.to_nft();
    let render = render_started.elapsed().as_secs_f64();
    let nft_full = nft_load(&script);
    let changed_started = Instant::now();
    let changed_script = ruleset(mappings, true)
        .update_from(&full)
        .expect("an element update");
    let changed_render = changed_started.elapsed().as_secs_f64();
    let nft_change = nft_load(&changed_script);
    let full_again = nft_load(&ruleset(mappings, true).to_nft());

    let started = Instant::now();
    for f in &full.forwards {
        let target = format!("10.98.0.11:{}", f.node_port);
        let dport = f.external.to_string();
        let status = Command::new("iptables")
            .args([
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "eth0",
                "-p",
                "tcp",
                "--dport",
                &dport,
                "-j",
                "DNAT",
                "--to-destination",
                &target,
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let iptables_full = started.elapsed().as_secs_f64();

    println!("host port forwarding, {mappings} mappings, 3 nodes (same netns, same run)");
    println!(
        "  render the nft script                      {:9.1} ms",
        render * 1e3
    );
    println!(
        "  cloak: one nft transaction                 {:9.1} ms",
        nft_full * 1e3
    );
    println!(
        "  Epok-style: one iptables command per rule  {:9.1} ms",
        iptables_full * 1e3
    );
    println!(
        "  ratio (iptables per rule / nft)            {:9.1}x",
        iptables_full / nft_full
    );
    println!(
        "  change one Service: diff + element update   {:9.1} ms ({} bytes)",
        (changed_render + nft_change) * 1e3,
        changed_script.len()
    );
    println!(
        "  (replacing the whole table instead         {:9.1} ms)",
        full_again * 1e3
    );
}

fn main() {
    let mappings: u16 = std::env::args()
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    if std::env::var_os(INSIDE).is_some() {
        inside(mappings);
        return;
    }
    let ns = format!("ck-bench-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success()
    );
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(std::env::current_exe().unwrap())
        .arg(mappings.to_string())
        .env(INSIDE, "1")
        .status();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(status.unwrap().success());
}
