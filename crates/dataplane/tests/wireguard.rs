//! The userspace WireGuard device against a real kernel, as root, inside a fresh namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use cloak_dataplane::{
    Key,
    wireguard::{Userspace, WireguardConfig, WireguardPeer},
};
use cloak_testkit::netns::{Netns, inside};

fn server(interface: String, port: u16) -> WireguardConfig {
    WireguardConfig {
        interface,
        private_key: Key::generate(),
        listen_port: Some(port),
        fwmark: None,
        addresses: vec!["10.64.0.1/24".parse().unwrap()],
        mtu: cloak_dataplane::wireguard::DEFAULT_MTU,
        dns: Vec::new(),
        peer: WireguardPeer {
            public_key: Key::generate().public(),
            preshared_key: None,
            endpoint: SocketAddr::from(([0, 0, 0, 0], 0)),
            endpoint_name: None,
            allowed_ips: vec!["10.64.0.2/32".parse().unwrap()],
            persistent_keepalive: None,
        },
        extra_peers: Vec::new(),
    }
}

/// boringtun 0.7.1 registers a *copy* of each listening socket with its event loop and later
/// removes the event by the *original's* number. In a process whose other threads open and close
/// files (the agent, the node daemon, the test harness), the copy can get a lower number than the
/// original; setting a listen port then indexed past the event table and killed the device's
/// thread ("index out of bounds: the len is 16 but the index is 16", seen in CI). Each device here
/// opens while another thread churns file descriptors; every one must come up and answer.
#[test]
fn a_listen_port_is_set_while_other_threads_open_and_close_files() {
    let ns = Netns::new("wgfd");
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_mins(2);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // Holds a few low numbers for a moment, then frees them at once.
                let held: Vec<File> = (0..4)
                    .filter_map(|_| File::open("/dev/null").ok())
                    .collect();
                std::thread::yield_now();
                drop(held);
            }
        })
    };
    let failures = inside(&ns, || {
        let mut failures = Vec::new();
        for i in 0..60u16 {
            match Userspace::open(&server(format!("wgfd{i}"), 40000 + i)) {
                Ok(device) => drop(device),
                Err(e) => failures.push(format!("device {i}: {e}")),
            }
        }
        failures
    });
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");

    // The sockets of the port a device starts with (a random one) are closed once its own is
    // set: upstream left their event-loop copies open and listening. In a namespace of its own:
    // the devices above close their sockets on their own threads, after `drop` returns, and one
    // still closing was once taken for a leak.
    let quiet = Netns::new("wgfq");
    let listening = inside(&quiet, || {
        let device = Userspace::open(&server("wgfdl".into(), 41000)).unwrap();
        let out = std::process::Command::new("ss")
            .args(["-H", "-l", "-u", "-n"])
            .output()
            .unwrap();
        drop(device);
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    let ports: Vec<&str> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit(':').next())
        .collect();
    assert!(
        !ports.is_empty() && ports.iter().all(|p| *p == "41000"),
        "{listening}"
    );
}
