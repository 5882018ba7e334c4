//! WireGuard: the two ways to run a `WireguardConfig` (the value `cloak_model` parses from
//! wg-quick or gluetun's variables, re-exported here): the kernel module over `ip link ... type wireguard` when it exists, otherwise
//! userspace WireGuard (boringtun) embedded in this process, so the image needs no extra binary.
//!
//! Userspace runs **one** worker thread. Measured on a 2-vCPU node (NETNOTES): boringtun with one
//! thread carried 1.5–1.75 Gbit/s in a single TCP stream, with its default four threads 0.74–0.78
//! (the threads contend for one tun queue and one socket), wireguard-go 1.1. Pods sit on small
//! nodes; one thread is both the fastest and the cheapest.
//!
//! boringtun is configured over the cross-platform UAPI through a socket pair we hold (no file in
//! `/var/run/wireguard`, which "pods" of one test would share, and the device exits when the pair
//! closes). Its UAPI reports `last_handshake_time_sec` as the *age* of the handshake, not a Unix
//! time (why `wg show` against boringtun prints "56 years ago"); [`Userspace::status`] reads it
//! as the age it is.

use std::{
    fmt,
    io::{BufRead, BufReader, Write},
    os::unix::{io::IntoRawFd, net::UnixStream},
    sync::mpsc,
    time::Duration,
};

use boringtun::device::{DeviceConfig, DeviceHandle};
use zeroize::Zeroizing;

use crate::{
    Error,
    command::{ip, run},
    tunnel::{Tunnel, TunnelStatus},
};

/// How long one UAPI exchange with the userspace device may take. It answers in microseconds; a
/// device that does not answer at all is wedged, and the caller (the agent) must get an error it
/// can act on (close and reopen) instead of a read that blocks forever.
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);

pub use cloak_model::tunnel::wireguard::{DEFAULT_MTU, ParseError, WireguardConfig, WireguardPeer};

/// The UAPI `set` request for `config` (holds keys: zeroized on drop).
fn uapi_set(config: &WireguardConfig) -> Zeroizing<String> {
    use std::fmt::Write as _;
    let mut s = Zeroizing::new(String::new());
    let _ = write!(s, "set=1\nprivate_key={}\n", &*config.private_key.to_hex());
    if let Some(port) = config.listen_port {
        let _ = writeln!(s, "listen_port={port}");
    }
    if let Some(mark) = config.fwmark {
        let _ = writeln!(s, "fwmark={mark}");
    }
    s.push_str("replace_peers=true\n");
    for peer in config.peers() {
        let _ = writeln!(s, "public_key={}", peer.public_key.to_hex());
        if let Some(psk) = &peer.preshared_key {
            let _ = writeln!(s, "preshared_key={}", &*psk.to_hex());
        }
        if !peer.endpoint.ip().is_unspecified() && peer.endpoint_name.is_none() {
            let _ = writeln!(s, "endpoint={}", peer.endpoint);
        }
        if let Some(keepalive) = peer.persistent_keepalive {
            let _ = writeln!(s, "persistent_keepalive_interval={keepalive}");
        }
        s.push_str("replace_allowed_ips=true\n");
        for net in &peer.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
    }
    s.push('\n');
    s
}

/// The `wg setconf` file for `config` (kernel path; holds keys).
fn wg_setconf(config: &WireguardConfig) -> Zeroizing<String> {
    use std::fmt::Write as _;
    let mut s = Zeroizing::new(String::new());
    let _ = write!(
        s,
        "[Interface]\nPrivateKey = {}\n",
        &*config.private_key.to_base64()
    );
    if let Some(port) = config.listen_port {
        let _ = writeln!(s, "ListenPort = {port}");
    }
    if let Some(mark) = config.fwmark {
        let _ = writeln!(s, "FwMark = {mark}");
    }
    for peer in config.peers() {
        let _ = write!(s, "[Peer]\nPublicKey = {}\n", peer.public_key);
        if let Some(psk) = &peer.preshared_key {
            let _ = writeln!(s, "PresharedKey = {}", &*psk.to_base64());
        }
        if !peer.endpoint.ip().is_unspecified() && peer.endpoint_name.is_none() {
            let _ = writeln!(s, "Endpoint = {}", peer.endpoint);
        }
        if let Some(keepalive) = peer.persistent_keepalive {
            let _ = writeln!(s, "PersistentKeepalive = {keepalive}");
        }
        let _ = writeln!(
            s,
            "AllowedIPs = {}",
            peer.allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s
}

/// Opens a WireGuard tunnel: kernel when possible (unless `userspace_only`), else userspace.
pub(crate) fn open(
    config: &WireguardConfig,
    userspace_only: bool,
) -> Result<Box<dyn Tunnel>, Error> {
    if !userspace_only {
        match Kernel::open(config) {
            Ok(k) => return Ok(Box::new(k)),
            Err(KernelUnavailable::No(reason)) => {
                tracing::debug!(%reason, "no kernel WireGuard; using userspace (boringtun)");
            }
            Err(KernelUnavailable::Failed(e)) => return Err(e),
        }
    }
    Userspace::open(config).map(|u| Box::new(u) as _)
}

fn configure_interface(config: &WireguardConfig) -> Result<(), Error> {
    let name = config.interface.as_str();
    for addr in &config.addresses {
        ip(&["address", "replace", &addr.to_string(), "dev", name])?;
    }
    ip(&[
        "link",
        "set",
        "dev",
        name,
        "mtu",
        &config.mtu.to_string(),
        "up",
    ])?;
    Ok(())
}

/// Userspace WireGuard: a boringtun device in this process.
pub struct Userspace {
    interface: String,
    config: WireguardConfig,
    uapi: BufReader<UnixStream>,
    device: Option<DeviceHandle>,
}

impl fmt::Debug for Userspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Userspace")
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

impl Userspace {
    /// Creates the interface in this thread's network namespace and configures it.
    pub fn open(config: &WireguardConfig) -> Result<Self, Error> {
        let (ours, theirs) = UnixStream::pair().map_err(Error::io("UAPI socket pair"))?;
        ours.set_read_timeout(Some(UAPI_TIMEOUT))
            .and_then(|()| ours.set_write_timeout(Some(UAPI_TIMEOUT)))
            .map_err(Error::io("UAPI socket timeout"))?;
        let device = DeviceHandle::new(
            &config.interface,
            DeviceConfig {
                n_threads: 1,
                // Connected per-peer sockets take their source address from the route *before*
                // the fwmark is set, i.e. the tunnel's own address: packets the node then drops.
                use_connected_socket: false,
                use_multi_queue: false,
                uapi_fd: theirs.into_raw_fd(),
            },
        )
        .map_err(|e| Error::Tunnel(format!("creating {}: {e:?}", config.interface)))?;
        let mut tunnel = Self {
            interface: config.interface.clone(),
            config: config.clone(),
            uapi: BufReader::new(ours),
            device: Some(device),
        };
        tunnel.uapi(&uapi_set(config))?;
        configure_interface(config)?;
        Ok(tunnel)
    }

    /// Replaces the device's configuration (keys, peers) in place.
    pub fn reconfigure(&mut self, config: &WireguardConfig) -> Result<(), Error> {
        // `replace_peers` is in every request: boringtun panics on an update to an existing peer.
        self.uapi(&uapi_set(config))?;
        config.clone_into(&mut self.config);
        Ok(())
    }

    /// One UAPI exchange; returns the `key=value` lines before `errno`.
    fn uapi(&mut self, request: &str) -> Result<Vec<(String, String)>, Error> {
        let what = || format!("WireGuard UAPI of {}", self.interface);
        self.uapi
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(Error::io(what()))?;
        let mut pairs = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.uapi.read_line(&mut line).map_err(Error::io(what()))?;
            if n == 0 {
                return Err(Error::Tunnel(format!("{}: device exited", what())));
            }
            let line = line.trim_end();
            if let Some(errno) = line.strip_prefix("errno=") {
                // The reply ends with an empty line after errno.
                let mut blank = String::new();
                let _ = self.uapi.read_line(&mut blank);
                return if errno == "0" {
                    Ok(pairs)
                } else {
                    Err(Error::Tunnel(format!("{}: errno {errno}", what())))
                };
            }
            if let Some((k, v)) = line.split_once('=') {
                pairs.push((k.to_owned(), v.to_owned()));
            }
        }
    }
}

impl Tunnel for Userspace {
    fn status(&mut self) -> Result<TunnelStatus, Error> {
        // boringtun reads exactly one line per command; a trailing blank line would be taken
        // for a second (invalid) command.
        let pairs = self.uapi("get=1\n")?;
        let (mut secs, mut nanos, mut rx, mut tx) = (None, 0, 0, 0);
        for (k, v) in pairs {
            match k.as_str() {
                "last_handshake_time_sec" => secs = v.parse().ok(),
                "last_handshake_time_nsec" => nanos = v.parse().unwrap_or(0),
                "rx_bytes" => rx += v.parse::<u64>().unwrap_or(0),
                "tx_bytes" => tx += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
        // boringtun reports the handshake's age here (not a Unix time like the kernel does).
        Ok(TunnelStatus::wireguard(
            secs.map(|s| Duration::new(s, nanos)),
            rx,
            tx,
        ))
    }

    fn implementation(&self) -> &'static str {
        "boringtun"
    }

    fn restart_handshake(&mut self) -> Result<(), Error> {
        // Re-adding the peers gives each a fresh session state with no handshake timer running.
        let request = uapi_set(&self.config);
        self.uapi(&request).map(drop)
    }
}

impl Drop for Userspace {
    fn drop(&mut self) {
        if let Some(device) = self.device.take() {
            // Stopping the device takes its lock; a wedged device would hold the agent here
            // forever. Bounded: past the limit the device is left to its thread, and the
            // interface is deleted regardless, so no route or address of it stays behind.
            let (done_tx, done) = mpsc::channel::<()>();
            std::thread::spawn(move || {
                drop(device);
                drop(done_tx);
            });
            if let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(UAPI_TIMEOUT) {
                tracing::warn!(
                    interface = %self.interface,
                    "the userspace WireGuard device did not stop within {UAPI_TIMEOUT:?}; deleting its interface"
                );
            }
        }
        // boringtun opens the tun without O_CLOEXEC, so a child process started meanwhile may
        // hold it and keep the interface (its address, its routes) alive; delete it outright.
        let _ = ip(&["link", "del", "dev", &self.interface]);
    }
}

/// Kernel WireGuard, configured with `ip` and `wg` (keys on stdin, never on a command line).
#[derive(Debug)]
struct Kernel {
    interface: String,
}

enum KernelUnavailable {
    /// The module is not there: use userspace.
    No(String),
    /// The module is there but configuring failed: a real error.
    Failed(Error),
}

impl Kernel {
    fn open(config: &WireguardConfig) -> Result<Self, KernelUnavailable> {
        let name = &config.interface;
        ip(&["link", "add", "dev", name, "type", "wireguard"]).map_err(|e| {
            if no_kernel_module(&e) {
                KernelUnavailable::No(e.to_string())
            } else {
                KernelUnavailable::Failed(e)
            }
        })?;
        let kernel = Self {
            interface: name.clone(),
        };
        run(
            "wg",
            &["setconf", name, "/dev/stdin"],
            Some(wg_setconf(config).as_bytes()),
        )
        .and_then(|_| configure_interface(config))
        .map_err(KernelUnavailable::Failed)?;
        Ok(kernel)
    }
}

/// Whether `ip link add … type wireguard` failed for want of the kernel module, the one failure
/// userspace may stand in for. Anything else (the name is taken, no permission, a bad name) is
/// a real error that userspace would only hide or repeat.
fn no_kernel_module(e: &Error) -> bool {
    matches!(e, Error::Command { stderr, .. }
        if stderr.contains("Unknown device type") || stderr.contains("Operation not supported"))
}

impl Tunnel for Kernel {
    fn status(&mut self) -> Result<TunnelStatus, Error> {
        // dump: line 1 the interface, then per peer:
        // public-key psk endpoint allowed-ips latest-handshake rx tx keepalive
        let dump = run("wg", &["show", &self.interface, "dump"], None)?;
        let (mut age, mut rx, mut tx) = (None, 0, 0);
        for line in dump.lines().skip(1) {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 7 {
                continue;
            }
            let latest: u64 = f[4].parse().unwrap_or(0);
            if latest > 0 {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                age = Some(now.saturating_sub(Duration::from_secs(latest)));
            }
            rx += f[5].parse::<u64>().unwrap_or(0);
            tx += f[6].parse::<u64>().unwrap_or(0);
        }
        Ok(TunnelStatus::wireguard(age, rx, tx))
    }

    fn implementation(&self) -> &'static str {
        "kernel"
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", "dev", &self.interface]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FWMARK, Key};

    /// A client config to render (parsing is `cloak_model`'s, tested there).
    fn conf(private: &Key, peer: &Key) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.64.0.2/32\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
            &*private.to_base64(),
            peer.public()
        )
    }

    #[test]
    fn only_a_missing_kernel_module_falls_back_to_userspace() {
        let failed = |stderr: &str| Error::Command {
            command: "ip link add dev ck0 type wireguard".into(),
            stderr: stderr.into(),
        };
        // What `ip` prints on these machines (no module), and where the kernel refuses the type.
        assert!(no_kernel_module(&failed("Error: Unknown device type.")));
        assert!(no_kernel_module(&failed(
            "RTNETLINK answers: Operation not supported"
        )));
        for real in [
            "RTNETLINK answers: File exists",
            "RTNETLINK answers: Operation not permitted",
            "Error: Attribute failed policy validation.",
        ] {
            assert!(!no_kernel_module(&failed(real)), "{real}");
        }
        assert!(!no_kernel_module(&Error::Tunnel("x".into())));
    }

    #[test]
    fn uapi_request_carries_every_setting() {
        let (k, p) = (Key::generate(), Key::generate());
        let mut c = WireguardConfig::from_wg_quick(&conf(&k, &p), "ck0").unwrap();
        c.fwmark = Some(FWMARK);
        let set = uapi_set(&c);
        assert!(set.starts_with("set=1\nprivate_key="));
        assert!(set.contains(&format!("fwmark={FWMARK}\n")));
        assert!(set.contains(&format!("public_key={}\n", p.public().to_hex())));
        assert!(
            set.contains("endpoint=192.0.2.2:51820\nallowed_ip=")
                || set.contains("endpoint=192.0.2.2:51820\npersistent")
        );
        assert!(set.contains("allowed_ip=::/0\n"));
        assert!(set.ends_with("\n\n"));
    }
}
