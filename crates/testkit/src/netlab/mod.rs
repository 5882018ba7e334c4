//! A network lab for data-plane tests: namespaces standing in for a pod, its node, a VPN provider
//! and "the internet", wired with veth pairs, plus fake VPN servers, an echo service that reports
//! the source address it saw, and leak counters on the node.
//!
//! ```text
//!   pod ──eth0─────pod0── node ──wan0──────wan── provider ──exit──────isp── internet
//!  10.77.0.2    10.77.0.1  │  192.0.2.1   192.0.2.2 (VPN)  198.51.100.2  198.51.100.1
//!  fd77::2      fd77::1    │                  fd05::2 (masquerade) fd05::1  203.0.113.10 (echo)
//!                          └──inet0──────────────────────────────uplink── 203.0.113.53 (DNS)
//!                         203.0.113.1 / fd03::1                            fd03::10
//! ```
//! The node routes and masquerades the pod's packets like a Kubernetes node does, so anything
//! the pod sends outside its tunnel reaches the internet with the node's address (203.0.113.1),
//! and through the tunnel with the provider's (198.51.100.2). The leak counters count, at the
//! node's prerouting hook, every packet from the pod that is not for the VPN endpoint.
//!
//! Everything is removed on drop, also on panic: namespaces with every process inside them, the
//! in-process WireGuard servers (their threads stop when their handle drops).

#![allow(clippy::missing_panics_doc, clippy::expect_used)] // test helpers: panicking with the reason is their contract

mod fakevpn;
pub mod gateway;
pub mod spoof;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Stdio},
    time::Duration,
};

pub use fakevpn::{FakeOpenVpn, FakeWireguard, WG_CLIENT, WG_CLIENT6, wait_until};

use crate::netns::Netns;

const ECHO: &str = include_str!("echo.py");
const CLIENT: &str = include_str!("client.py");

pub const POD: &str = "10.77.0.2";
pub const POD6: &str = "fd77::2";
pub const NODE_POD: &str = "10.77.0.1";
pub const PROVIDER: &str = "192.0.2.2";
/// The provider's IPv6 address on the underlay (for endpoints given as IPv6).
pub const PROVIDER6: &str = "fd02::2";
pub const PROVIDER_EXIT: &str = "198.51.100.2";
pub const PROVIDER_EXIT6: &str = "fd05::2";
pub const NODE_INTERNET: &str = "203.0.113.1";
pub const NODE_INTERNET6: &str = "fd03::1";
pub const INTERNET: &str = "203.0.113.10";
pub const INTERNET6: &str = "fd03::10";
pub const RESOLVER: &str = "203.0.113.53";

/// An RAII topology builder: namespaces by label, veth links, addresses, routes, sysctls. Every
/// step runs at once and panics with the command's error; dropping the topology removes every
/// namespace (and the processes in them).
#[derive(Debug, Default)]
pub struct Topology {
    spaces: BTreeMap<String, Netns>,
}

impl Topology {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a namespace (loopback up).
    #[must_use]
    pub fn ns(mut self, label: &str) -> Self {
        self.spaces.insert(label.to_owned(), Netns::new(label));
        self
    }

    /// A veth pair between two namespaces; each end gets the addresses listed (CIDRs).
    #[must_use]
    pub fn link(self, a: (&str, &str, &[&str]), b: (&str, &str, &[&str])) -> Self {
        crate::netns::veth(&self[a.0], a.1, None, &self[b.0], b.1, None);
        for (label, iface, addrs) in [a, b] {
            for addr in addrs {
                let family = if addr.contains(':') { "-6" } else { "-4" };
                self[label].run(&["ip", family, "addr", "add", addr, "dev", iface, "nodad"]);
            }
        }
        self
    }

    /// A bridge in a namespace, with the given interfaces of that namespace enslaved.
    #[must_use]
    pub fn bridge(self, label: &str, name: &str, ports: &[&str]) -> Self {
        let ns = &self[label];
        ns.run(&["ip", "link", "add", name, "type", "bridge"]);
        for port in ports {
            ns.run(&["ip", "link", "set", port, "master", name]);
        }
        ns.run(&["ip", "link", "set", name, "up"]);
        self
    }

    /// `ip route add <spec>` in a namespace (`"default via 10.0.0.1"`; an IPv6 spec is
    /// recognised by a `:`).
    #[must_use]
    pub fn route(self, label: &str, spec: &str) -> Self {
        let mut argv = vec!["ip"];
        if spec.contains(':') {
            argv.push("-6");
        }
        argv.extend(["route", "add"]);
        argv.extend(spec.split_whitespace());
        self[label].run(&argv);
        self
    }

    #[must_use]
    pub fn sysctl(self, label: &str, key: &str, value: &str) -> Self {
        self[label].sysctl(key, value);
        self
    }

    /// Turns on IPv4 and IPv6 forwarding (0 in every new namespace: NETNOTES trap 1).
    #[must_use]
    pub fn forwarding(self, label: &str) -> Self {
        self.sysctl(label, "net.ipv4.ip_forward", "1").sysctl(
            label,
            "net.ipv6.conf.all.forwarding",
            "1",
        )
    }

    /// Loads an nftables script in a namespace.
    #[must_use]
    pub fn nft(self, label: &str, script: &str) -> Self {
        nft(&self[label], script);
        self
    }
}

impl std::ops::Index<&str> for Topology {
    type Output = Netns;
    fn index(&self, label: &str) -> &Netns {
        self.spaces
            .get(label)
            .unwrap_or_else(|| panic!("no namespace {label:?} in the topology"))
    }
}

/// Loads an nftables script inside `ns`.
pub fn nft(ns: &Netns, script: &str) {
    use std::io::Write;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("writing to nft");
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft in {}: {}\n{script}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the echo service in `ns` (TCP 7, 9 and 80 on every address; UDP 7 and DNS 53 on
/// `udp_addresses`) and waits until it listens. It runs until its namespace is removed.
pub fn echo(ns: &Netns, udp_addresses: &[&str]) -> Child {
    let mut echo = ns
        .command("python3")
        .arg("-c")
        .arg(ECHO)
        .args(udp_addresses)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the echo service");
    let mut line = String::new();
    BufReader::new(echo.stdout.take().expect("echo stdout"))
        .read_line(&mut line)
        .expect("echo service");
    assert_eq!(line.trim(), "ready", "echo service did not start");
    echo
}

/// The standard lab: pod, node, provider and internet, with the echo service running.
#[derive(Debug)]
pub struct Lab {
    pub topology: Topology,
    _echo: Child,
}

impl Lab {
    pub fn new() -> Self {
        // The pod must not learn routes from router advertisements (its routes are the test's),
        // nor solicit them: set for interfaces created from here on (`all` does not reach them).
        let topology = Topology::new()
            .ns("pod")
            .sysctl("pod", "net.ipv6.conf.default.accept_ra", "0")
            .ns("node")
            .ns("provider")
            .ns("internet")
            .link(
                ("pod", "eth0", &["10.77.0.2/24", "fd77::2/64"]),
                ("node", "pod0", &["10.77.0.1/24", "fd77::1/64"]),
            )
            .link(
                ("node", "wan0", &["192.0.2.1/24", "fd02::1/64"]),
                ("provider", "wan", &["192.0.2.2/24", "fd02::2/64"]),
            )
            .link(
                ("provider", "exit", &["198.51.100.2/24", "fd05::2/64"]),
                ("internet", "isp", &["198.51.100.1/24", "fd05::1/64"]),
            )
            .link(
                ("node", "inet0", &["203.0.113.1/24", "fd03::1/64"]),
                (
                    "internet",
                    "uplink",
                    &["203.0.113.10/24", "203.0.113.53/24", "fd03::10/64"],
                ),
            )
            .route("pod", "default via 10.77.0.1")
            .route("pod", "default via fd77::1")
            .route("provider", "default via 198.51.100.1")
            .route("provider", "default via fd05::1")
            .forwarding("node")
            .forwarding("provider")
            .nft(
                "node",
                "table inet lab_nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tiifname \"pod0\" oifname != \"pod0\" masquerade\n\t}\n}\n",
            )
            .nft(
                "provider",
                "table inet lab_nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"exit\" masquerade\n\t}\n}\n",
            );
        let echo = echo(&topology["internet"], &[INTERNET, RESOLVER, INTERNET6]);
        Self {
            topology,
            _echo: echo,
        }
    }

    pub fn pod(&self) -> &Netns {
        &self.topology["pod"]
    }
    pub fn node(&self) -> &Netns {
        &self.topology["node"]
    }
    pub fn provider(&self) -> &Netns {
        &self.topology["provider"]
    }
    pub fn internet(&self) -> &Netns {
        &self.topology["internet"]
    }

    /// Asks the internet, from the pod, which address it saw: `mode` is `tcp`, `http`, `udp`
    /// (all to [`INTERNET`] or `host`) or `dns` (a query to `host`). `Err` holds the failure.
    pub fn ask(&self, mode: &str, host: &str, timeout: Duration) -> Result<String, String> {
        let port = match mode {
            "http" => "80",
            "dns" => "53",
            _ => "7",
        };
        let out = self
            .pod()
            .command("python3")
            .args([
                "-c",
                CLIENT,
                mode,
                host,
                port,
                &timeout.as_secs_f64().to_string(),
            ])
            .stdin(Stdio::null())
            .output()
            .expect("running the client");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// Installs the leak counters on the node for traffic from the pod; the VPN endpoints
    /// (the agent is told of each) are the only destinations that are not leaks.
    pub fn count_leaks(&self, endpoints: &[SocketAddr], proto: &str) -> LeakCounters<'_> {
        let mut tunnel = String::new();
        for e in endpoints {
            let _ = writeln!(
                tunnel,
                "\t\tiifname \"pod0\" {} daddr {} {proto} dport {} counter name \"tunnel\" accept",
                if e.is_ipv4() { "ip" } else { "ip6" },
                e.ip(),
                e.port()
            );
        }
        // The kernel's own link-scope control messages (neighbour and router solicitation with
        // hop limit 255, multicast listener reports with hop limit 1) never pass the node, and
        // a fresh interface sends some before any agent runs: counted apart, not as leaks.
        let link = "\t\tiifname \"pod0\" icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 counter name \"link\" accept\n\t\tiifname \"pod0\" icmpv6 type { mld-listener-report, mld2-listener-report, mld-listener-done } ip6 hoplimit 1 counter name \"link\" accept\n";
        let script = format!(
            "table inet lab_leaks {{\n\tcounter tunnel {{\n\t}}\n\tcounter ipv4 {{\n\t}}\n\tcounter ipv6 {{\n\t}}\n\tcounter dns {{\n\t}}\n\tcounter link {{\n\t}}\n\tset to4 {{\n\t\ttypeof ip daddr . meta l4proto\n\t\tsize 256\n\t\tflags dynamic\n\t}}\n\tset to6 {{\n\t\ttypeof ip6 daddr . meta l4proto\n\t\tsize 256\n\t\tflags dynamic\n\t}}\n\tchain pre {{\n\t\ttype filter hook prerouting priority -300; policy accept;\n{tunnel}\t\tiifname \"pod0\" meta l4proto {{ tcp, udp }} th dport 53 counter name \"dns\"\n{link}\t\tiifname \"pod0\" meta nfproto ipv4 counter name \"ipv4\" add @to4 {{ ip daddr . meta l4proto }}\n\t\tiifname \"pod0\" meta nfproto ipv6 counter name \"ipv6\" add @to6 {{ ip6 daddr . meta l4proto }}\n\t}}\n}}\n"
        );
        nft(self.node(), &script);
        LeakCounters { node: self.node() }
    }

    /// Makes the provider unreachable from the node (packets silently dropped), or reachable
    /// again.
    pub fn blackhole_provider(&self, on: bool) {
        if on {
            nft(
                self.node(),
                "table inet lab_blackhole {\n\tchain drop_wan {\n\t\ttype filter hook forward priority -200; policy accept;\n\t\toifname \"wan0\" drop\n\t}\n}\n",
            );
        } else {
            self.node()
                .run(&["nft", "delete", "table", "inet", "lab_blackhole"]);
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

/// Packet counts seen at the node from the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leaks {
    /// To the VPN endpoint (not a leak).
    pub tunnel: u64,
    /// IPv4 to anything else (DNS included).
    pub ipv4: u64,
    /// IPv6 to anything.
    pub ipv6: u64,
    /// DNS (port 53) to anything.
    pub dns: u64,
    /// IPv6 neighbour discovery and multicast listener reports: link-local by construction,
    /// like ARP (not a leak).
    pub link: u64,
    /// Where the leaked packets went (`address . protocol`), so a failing test says what
    /// leaked; every destination since the counters were installed.
    pub to: Vec<String>,
}

impl Leaks {
    /// Everything that is not tunnel traffic.
    pub fn leaked(&self) -> u64 {
        self.ipv4 + self.ipv6
    }
}

impl std::ops::Sub for Leaks {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            tunnel: self.tunnel - o.tunnel,
            ipv4: self.ipv4 - o.ipv4,
            ipv6: self.ipv6 - o.ipv6,
            dns: self.dns - o.dns,
            link: self.link - o.link,
            to: self.to,
        }
    }
}

/// The elements of a listed nftables set (`elements = { a . tcp,\n b . udp }`).
fn elements(listing: &str) -> Vec<String> {
    listing
        .split_once("elements = {")
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(inside, _)| {
            inside
                .split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the node's leak counters.
#[derive(Debug)]
pub struct LeakCounters<'a> {
    node: &'a Netns,
}

impl LeakCounters<'_> {
    pub fn read(&self) -> Leaks {
        let count = |name: &str| -> u64 {
            let out = self
                .node
                .run(&["nft", "list", "counter", "inet", "lab_leaks", name]);
            out.split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no packet count in {out}"))
        };
        Leaks {
            tunnel: count("tunnel"),
            ipv4: count("ipv4"),
            ipv6: count("ipv6"),
            dns: count("dns"),
            link: count("link"),
            to: ["to4", "to6"]
                .iter()
                .flat_map(|set| {
                    let out = self
                        .node
                        .run(&["nft", "list", "set", "inet", "lab_leaks", set]);
                    elements(&out)
                })
                .collect(),
        }
    }
}
