//! Fake VPN providers: a WireGuard server (userspace, the dataplane crate's own boringtun device,
//! run on a thread of the test process that entered the provider's namespace) and an OpenVPN
//! server (an `openvpn` process in that namespace, with a fresh EC PKI). The provider namespace
//! masquerades tunnel traffic into the internet, so the internet sees the provider's exit address.

#![allow(clippy::missing_panics_doc, clippy::expect_used)] // test helpers: panicking with the reason is their contract

use std::{
    fs::File,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use cloak_dataplane::{
    Key,
    secret::PublicKey,
    wireguard::{Userspace, WireguardConfig, WireguardPeer},
};

use crate::netns::Netns;

/// The client's addresses inside the WireGuard tunnel (IPv6 only in a dual-stack client config).
pub const WG_CLIENT: &str = "10.64.0.2";
pub const WG_CLIENT6: &str = "fd64::2";

/// A WireGuard server in a namespace. Dropping it stops it.
#[derive(Debug)]
pub struct FakeWireguard {
    pub endpoint: SocketAddr,
    netns_path: String,
    key: Key,
    client: PublicKey,
    generation: u32,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    commands: mpsc::Sender<(WireguardConfig, mpsc::Sender<Result<(), String>>)>,
    thread: JoinHandle<()>,
    /// Disconnects when the server thread has ended.
    exited: mpsc::Receiver<()>,
}

/// The longest a fake server may take to start, stop or answer. It takes milliseconds alone, but
/// a full suite on two cores once went past 10 s at start (most likely waiting for the kernel's
/// network lock while parallel tests tore their namespaces down). A bound against a wedged
/// device, not a figure.
const SERVER_WAIT: Duration = Duration::from_secs(30);

impl FakeWireguard {
    /// Starts a server listening on `endpoint` (an address of `ns`) that accepts `client`.
    pub fn start(ns: &Netns, endpoint: SocketAddr, client: PublicKey) -> Self {
        let mut server = Self {
            endpoint,
            netns_path: format!("/var/run/netns/{}", ns.name()),
            key: Key::generate(),
            client,
            generation: 0,
            running: None,
        };
        server.resume();
        server
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// A wg-quick file for the client holding `client_key` (IPv4 inside the tunnel).
    pub fn client_conf(&self, client_key: &Key) -> String {
        self.conf(client_key, &format!("{WG_CLIENT}/32"))
    }

    /// The same with an IPv6 address too: the tunnel then carries IPv6.
    pub fn client_conf_dual_stack(&self, client_key: &Key) -> String {
        self.conf(client_key, &format!("{WG_CLIENT}/32, {WG_CLIENT6}/128"))
    }

    fn conf(&self, client_key: &Key, addresses: &str) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = {addresses}\nDNS = {}\n\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = 0.0.0.0/0, ::/0\n",
            &*client_key.to_base64(),
            super::RESOLVER,
            self.public_key(),
            self.endpoint
        )
    }

    fn config(&self) -> WireguardConfig {
        WireguardConfig {
            // A new name per start: the previous device's tun may still be closing.
            interface: format!("wgs{}", self.generation),
            private_key: self.key.clone(),
            listen_port: Some(self.endpoint.port()),
            fwmark: None,
            addresses: vec![
                "10.64.0.1/24".parse().expect("cidr"),
                "fd64::1/64".parse().expect("cidr"),
            ],
            mtu: cloak_dataplane::wireguard::DEFAULT_MTU,
            dns: Vec::new(),
            peer: WireguardPeer {
                public_key: self.client,
                preshared_key: None,
                endpoint: SocketAddr::from(([0, 0, 0, 0], 0)),
                endpoint_name: None,
                allowed_ips: vec![
                    format!("{WG_CLIENT}/32").parse().expect("cidr"),
                    format!("{WG_CLIENT6}/128").parse().expect("cidr"),
                ],
                persistent_keepalive: None,
            },
            extra_peers: Vec::new(),
        }
    }

    /// Stops the server (the provider goes away).
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            drop(running.commands);
            // Bounded: a wedged device must fail the test, not hang it; and never a second
            // panic while a failing test unwinds (that aborts the whole test binary).
            let stopped = match running.exited.recv_timeout(SERVER_WAIT) {
                Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                    "the fake WireGuard server did not stop within {SERVER_WAIT:?}"
                )),
                _ => running
                    .thread
                    .join()
                    .map_err(|_| "the fake WireGuard server thread panicked".to_owned()),
            };
            if let Err(message) = stopped {
                if std::thread::panicking() {
                    eprintln!("{message}");
                } else {
                    panic!("{message}");
                }
            }
            // The device deleted its interface from the server thread, which was inside the
            // provider's namespace; make sure of it from outside too.
            let ns = self
                .netns_path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let _ = std::process::Command::new("ip")
                .args(["-n", &ns, "link", "del", &format!("wgs{}", self.generation)])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Starts it again with the same keys.
    pub fn resume(&mut self) {
        assert!(self.running.is_none(), "already running");
        self.generation += 1;
        let config = self.config();
        let path = self.netns_path.clone();
        let (commands, rx) = mpsc::channel::<(WireguardConfig, mpsc::Sender<Result<(), String>>)>();
        let (ready_tx, ready) = mpsc::channel();
        let (exited_tx, exited) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // Dropped last, after the device: tells `stop` the thread is done.
            let _exited = exited_tx;
            // Namespaces are per thread: this thread enters the provider's, and the device's
            // worker thread it spawns inherits it.
            let entered = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())
            });
            let device = entered.and_then(|()| Userspace::open(&config).map_err(|e| e.to_string()));
            let mut device = match device {
                Ok(d) => {
                    let _ = ready_tx.send(Ok(()));
                    d
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for (config, ack) in rx {
                let _ = ack.send(device.reconfigure(&config).map_err(|e| e.to_string()));
            }
        });
        ready
            .recv_timeout(SERVER_WAIT)
            .expect("the fake WireGuard server thread did not report")
            .unwrap_or_else(|e| panic!("starting the fake WireGuard server: {e}"));
        self.running = Some(Running {
            commands,
            thread,
            exited,
        });
    }

    /// Replaces the server's private key: clients holding the old public key can no longer
    /// connect. Returns the new public key.
    pub fn rotate_key(&mut self) -> PublicKey {
        self.key = Key::generate();
        let mut config = self.config();
        config.interface.clear();
        let running = self.running.as_ref().expect("server running");
        let (ack, done) = mpsc::channel();
        running.commands.send((config, ack)).expect("server thread");
        done.recv_timeout(SERVER_WAIT)
            .expect("the fake WireGuard server did not answer")
            .unwrap_or_else(|e| panic!("rotating the key: {e}"));
        self.public_key()
    }
}

impl Drop for FakeWireguard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An OpenVPN server in a namespace (UDP, tun, subnet 10.65.0.0/24). Dropping it stops it.
#[derive(Debug)]
pub struct FakeOpenVpn {
    pub endpoint: SocketAddr,
    dir: tempfile::TempDir,
    netns: String,
    child: Option<Child>,
    client_ovpn: String,
}

impl FakeOpenVpn {
    /// Generates a PKI and starts the server on `endpoint` (an address of `ns`).
    pub fn start(ns: &Netns, endpoint: SocketAddr) -> Self {
        Self::start_with(ns, endpoint, None)
    }

    /// The same, also requiring this username and password (`auth-user-pass-verify`).
    pub fn start_with_password(ns: &Netns, endpoint: SocketAddr, user: &str, pass: &str) -> Self {
        Self::start_with(ns, endpoint, Some((user, pass)))
    }

    fn start_with(ns: &Netns, endpoint: SocketAddr, password: Option<(&str, &str)>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = cloak_lab::Pki::generate().expect("generating the PKI");
        for (name, pem) in [
            ("ca.crt", &pki.ca),
            ("server.crt", &pki.server_cert),
            ("server.key", &pki.server_key),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("writing the PKI");
        }
        let conf = format!(
            "dev tun\ndev-type tun\nproto udp\nlocal {}\nport {}\ntopology subnet\nserver 10.65.0.0 255.255.255.0\nca ca.crt\ncert server.crt\nkey server.key\ndh none\nkeepalive 2 10\ndata-ciphers AES-256-GCM:AES-128-GCM\npush \"redirect-gateway def1\"\npush \"dhcp-option DNS {}\"\nverb 3\n",
            endpoint.ip(),
            endpoint.port(),
            super::RESOLVER
        );
        let mut conf = conf;
        if let Some((user, pass)) = password {
            use std::os::unix::fs::PermissionsExt;
            let check = dir.path().join("check-password");
            std::fs::write(
                &check,
                format!(
                    "#!/bin/sh\n[ \"$(sed -n 1p \"$1\")\" = '{user}' ] && [ \"$(sed -n 2p \"$1\")\" = '{pass}' ]\n"
                ),
            )
            .expect("writing the password check");
            std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            conf = format!(
                "{conf}script-security 2\nauth-user-pass-verify {} via-file\n",
                check.display()
            );
        }
        std::fs::write(dir.path().join("server.conf"), conf).expect("writing server.conf");
        let client_ovpn = format!(
            "client\ndev tun\nproto udp\nremote {} {}\nnobind\nremote-cert-tls server\ndata-ciphers AES-256-GCM:AES-128-GCM\nverb 3\n<ca>\n{}</ca>\n<cert>\n{}</cert>\n<key>\n{}</key>\n",
            endpoint.ip(),
            endpoint.port(),
            pki.ca,
            pki.client_cert,
            pki.client_key
        );
        let mut server = Self {
            endpoint,
            dir,
            netns: ns.name().to_owned(),
            child: None,
            client_ovpn,
        };
        server.resume();
        server
    }

    /// The client's `config.ovpn` (inline CA, certificate and key).
    pub fn client_ovpn(&self) -> &str {
        &self.client_ovpn
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) and waits until it is ready for clients.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "openvpn",
                "--config",
                "server.conf",
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting openvpn");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("Initialization Sequence Completed") {
                    let _ = tx.send(Ok(()));
                }
                log.push(line);
                if log.len() > 40 {
                    log.remove(0);
                }
            }
            let _ = tx.send(Err(log.join("\n")));
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => {}
            other => {
                let _ = child.kill();
                panic!("the fake OpenVPN server did not start: {other:?}");
            }
        }
        self.child = Some(child);
    }
}

impl Drop for FakeOpenVpn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `ready()` holds, checking every 50 ms, for at most `limit`.
pub fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ready()
}
