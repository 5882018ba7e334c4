//! WireGuard: the config value (parsed from wg-quick or gluetun's variables) and the two ways to
//! run it: the kernel module over `ip link ... type wireguard` when it exists, otherwise
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
    net::{IpAddr, SocketAddr},
    os::unix::{io::IntoRawFd, net::UnixStream},
    sync::mpsc,
    time::Duration,
};

use boringtun::device::{DeviceConfig, DeviceHandle};
use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::{
    Error, FWMARK,
    command::{ip, run},
    secret::{Key, PublicKey, Secret},
    tunnel::{Tunnel, TunnelStatus},
};

/// 1420 = 1500 - 80: the largest WireGuard overhead (IPv6 outer header 40 + UDP 8 + WireGuard 32).
pub const DEFAULT_MTU: u32 = 1420;

/// How long one UAPI exchange with the userspace device may take. It answers in microseconds; a
/// device that does not answer at all is wedged, and the caller (the agent) must get an error it
/// can act on (close and reopen) instead of a read that blocks forever.
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);

/// A WireGuard interface and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    pub interface: String,
    pub private_key: Key,
    pub listen_port: Option<u16>,
    /// Mark on the encrypted packets (the agent sets [`FWMARK`]; a server leaves it unset).
    pub fwmark: Option<u32>,
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    pub dns: Vec<IpAddr>,
    pub peer: WireguardPeer,
    /// Further peers (servers have many clients; the agent has exactly one peer).
    pub extra_peers: Vec<WireguardPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardPeer {
    pub public_key: PublicKey,
    pub preshared_key: Option<Key>,
    /// Where the peer is; with [`WireguardPeer::endpoint_name`], only its port counts until the
    /// name is resolved.
    pub endpoint: SocketAddr,
    /// The endpoint's host name, when the credentials give one (`Endpoint = vpn.example:51820`).
    pub endpoint_name: Option<String>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// Why credentials do not make a WireGuard config. Names keys and lines, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{0} is not a valid WireGuard key")]
    BadKey(&'static str),
    #[error("{key}: {problem}")]
    Bad { key: &'static str, problem: String },
    #[error("line {0}: expected `Key = Value` inside [Interface] or [Peer]")]
    Line(usize),
    #[error("{0} [Peer] sections; cloak connects to exactly one")]
    Peers(usize),
}

impl WireguardConfig {
    /// Parses a wg-quick file (`wg0.conf`). wg-quick's hooks (`PostUp`, ...) and `Table` are
    /// ignored: cloak owns routing and the firewall.
    pub fn from_wg_quick(text: &str, interface: &str) -> Result<Self, ParseError> {
        #[derive(PartialEq)]
        enum Section {
            None,
            Interface,
            Peer,
        }
        let mut section = Section::None;
        let mut private_key = None;
        let mut addresses = Vec::new();
        let mut dns = Vec::new();
        let mut mtu = None;
        let mut listen_port = None;
        let mut peers: Vec<PeerBuilder> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.eq_ignore_ascii_case("[interface]") {
                section = Section::Interface;
                continue;
            }
            if line.eq_ignore_ascii_case("[peer]") {
                section = Section::Peer;
                peers.push(PeerBuilder::default());
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ParseError::Line(n + 1));
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            match (&section, key.as_str()) {
                (Section::Interface, "privatekey") => {
                    private_key = Some(
                        Key::from_base64(value).map_err(|_| ParseError::BadKey("PrivateKey"))?,
                    );
                }
                (Section::Interface, "address") => addresses.extend(list(value, "Address")?),
                (Section::Interface, "dns") => {
                    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        // wg-quick also takes search domains here; only addresses matter to us.
                        if let Ok(addr) = item.parse() {
                            dns.push(addr);
                        }
                    }
                }
                (Section::Interface, "mtu") => {
                    mtu = Some(value.parse().map_err(|_| ParseError::Bad {
                        key: "MTU",
                        problem: "not a number".into(),
                    })?);
                }
                (Section::Interface, "listenport") => {
                    listen_port = Some(value.parse().map_err(|_| ParseError::Bad {
                        key: "ListenPort",
                        problem: "not a port".into(),
                    })?);
                }
                (Section::Peer, _) => {
                    if let Some(peer) = peers.last_mut() {
                        peer.set(&key, value)?;
                    }
                }
                (Section::None, _) => return Err(ParseError::Line(n + 1)),
                // Table, PostUp, PreDown, SaveConfig, FwMark...: cloak owns these.
                (Section::Interface, _) => {}
            }
        }
        if peers.len() != 1 {
            return Err(ParseError::Peers(peers.len()));
        }
        let peer = peers.remove(0).build()?;
        Ok(Self {
            interface: interface.to_owned(),
            private_key: private_key.ok_or(ParseError::Missing("PrivateKey"))?,
            listen_port,
            fwmark: Some(FWMARK),
            addresses: non_empty(addresses, "Address")?,
            mtu: mtu.unwrap_or(DEFAULT_MTU),
            dns,
            peer,
            extra_peers: Vec::new(),
        })
    }

    /// Builds a config from gluetun's variables for a custom WireGuard endpoint
    /// (`VPN_ENDPOINT_IP`, `VPN_ENDPOINT_PORT`, `WIREGUARD_PUBLIC_KEY`, `WIREGUARD_PRIVATE_KEY`,
    /// `WIREGUARD_ADDRESSES`, optional `WIREGUARD_PRESHARED_KEY`, `WIREGUARD_MTU`,
    /// `WIREGUARD_ALLOWED_IPS`, `WIREGUARD_PERSISTENT_KEEPALIVE_INTERVAL`). `get` returns a
    /// variable's value.
    pub fn from_gluetun(
        get: impl Fn(&str) -> Option<Secret>,
        interface: &str,
    ) -> Result<Self, ParseError> {
        let need = |k: &'static str| {
            get(k)
                .filter(|v| !v.expose().trim().is_empty())
                .ok_or(ParseError::Missing(k))
        };
        let private_key = Key::from_base64(need("WIREGUARD_PRIVATE_KEY")?.expose())
            .map_err(|_| ParseError::BadKey("WIREGUARD_PRIVATE_KEY"))?;
        let public_key = PublicKey::from_base64(need("WIREGUARD_PUBLIC_KEY")?.expose())
            .map_err(|_| ParseError::BadKey("WIREGUARD_PUBLIC_KEY"))?;
        let preshared_key = get("WIREGUARD_PRESHARED_KEY")
            .filter(|v| !v.expose().trim().is_empty())
            .map(|v| {
                Key::from_base64(v.expose())
                    .map_err(|_| ParseError::BadKey("WIREGUARD_PRESHARED_KEY"))
            })
            .transpose()?;
        let ip: IpAddr = need("VPN_ENDPOINT_IP")?
            .expose()
            .trim()
            .parse()
            .map_err(|_| ParseError::Bad {
                key: "VPN_ENDPOINT_IP",
                problem: "not an IP address".into(),
            })?;
        let port: u16 = get("VPN_ENDPOINT_PORT")
            .unwrap_or_else(|| Secret::new("51820".into()))
            .expose()
            .trim()
            .parse()
            .map_err(|_| ParseError::Bad {
                key: "VPN_ENDPOINT_PORT",
                problem: "not a port".into(),
            })?;
        let allowed_ips = match get("WIREGUARD_ALLOWED_IPS") {
            Some(v) => list(v.expose(), "WIREGUARD_ALLOWED_IPS")?,
            None => crate::tunnel::default_routes(),
        };
        let number = |key: &'static str| -> Result<Option<u32>, ParseError> {
            get(key)
                .filter(|v| !v.expose().trim().is_empty())
                .map(|v| {
                    v.expose()
                        .trim()
                        .trim_end_matches('s')
                        .parse()
                        .map_err(|_| ParseError::Bad {
                            key,
                            problem: "not a number".into(),
                        })
                })
                .transpose()
        };
        Ok(Self {
            interface: interface.to_owned(),
            private_key,
            listen_port: None,
            fwmark: Some(FWMARK),
            addresses: non_empty(
                list(need("WIREGUARD_ADDRESSES")?.expose(), "WIREGUARD_ADDRESSES")?,
                "WIREGUARD_ADDRESSES",
            )?,
            mtu: number("WIREGUARD_MTU")?.unwrap_or(DEFAULT_MTU),
            dns: Vec::new(),
            peer: WireguardPeer {
                public_key,
                preshared_key,
                endpoint: SocketAddr::new(ip, port),
                endpoint_name: None,
                allowed_ips,
                persistent_keepalive: number("WIREGUARD_PERSISTENT_KEEPALIVE_INTERVAL")?
                    .and_then(|n| u16::try_from(n).ok()),
            },
            extra_peers: Vec::new(),
        })
    }

    fn peers(&self) -> impl Iterator<Item = &WireguardPeer> {
        std::iter::once(&self.peer).chain(&self.extra_peers)
    }

    /// The UAPI `set` request (holds keys: zeroized on drop).
    fn uapi_set(&self) -> Zeroizing<String> {
        use std::fmt::Write as _;
        let mut s = Zeroizing::new(String::new());
        let _ = write!(s, "set=1\nprivate_key={}\n", &*self.private_key.to_hex());
        if let Some(port) = self.listen_port {
            let _ = writeln!(s, "listen_port={port}");
        }
        if let Some(mark) = self.fwmark {
            let _ = writeln!(s, "fwmark={mark}");
        }
        s.push_str("replace_peers=true\n");
        for peer in self.peers() {
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

    /// The `wg setconf` file (kernel path; holds keys).
    fn wg_setconf(&self) -> Zeroizing<String> {
        use std::fmt::Write as _;
        let mut s = Zeroizing::new(String::new());
        let _ = write!(
            s,
            "[Interface]\nPrivateKey = {}\n",
            &*self.private_key.to_base64()
        );
        if let Some(port) = self.listen_port {
            let _ = writeln!(s, "ListenPort = {port}");
        }
        if let Some(mark) = self.fwmark {
            let _ = writeln!(s, "FwMark = {mark}");
        }
        for peer in self.peers() {
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
}

#[derive(Default)]
struct PeerBuilder {
    public_key: Option<PublicKey>,
    preshared_key: Option<Key>,
    endpoint: Option<(SocketAddr, Option<String>)>,
    allowed_ips: Vec<IpNet>,
    keepalive: Option<u16>,
}

impl PeerBuilder {
    fn set(&mut self, key: &str, value: &str) -> Result<(), ParseError> {
        match key {
            "publickey" => {
                self.public_key = Some(
                    PublicKey::from_base64(value).map_err(|_| ParseError::BadKey("PublicKey"))?,
                );
            }
            "presharedkey" => {
                self.preshared_key =
                    Some(Key::from_base64(value).map_err(|_| ParseError::BadKey("PresharedKey"))?);
            }
            "endpoint" => {
                // An address, or a host name the agent resolves before each connection (never
                // here: the kill switch may be closed while credentials are read).
                let bad = || ParseError::Bad {
                    key: "Endpoint",
                    problem: format!("{value:?} is not address:port or host:port"),
                };
                self.endpoint = Some(if let Ok(addr) = value.parse::<SocketAddr>() {
                    (addr, None)
                } else {
                    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
                    let port: u16 = port.parse().map_err(|_| bad())?;
                    if !crate::tunnel::is_host_name(host) {
                        return Err(bad());
                    }
                    (
                        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
                        Some(host.to_ascii_lowercase()),
                    )
                });
            }
            "allowedips" => self.allowed_ips.extend(list(value, "AllowedIPs")?),
            "persistentkeepalive" => {
                self.keepalive = if value == "off" {
                    None
                } else {
                    Some(value.parse().map_err(|_| ParseError::Bad {
                        key: "PersistentKeepalive",
                        problem: "not a number".into(),
                    })?)
                };
            }
            _ => {}
        }
        Ok(())
    }

    fn build(self) -> Result<WireguardPeer, ParseError> {
        Ok(WireguardPeer {
            public_key: self.public_key.ok_or(ParseError::Missing("PublicKey"))?,
            preshared_key: self.preshared_key,
            endpoint: self
                .endpoint
                .as_ref()
                .ok_or(ParseError::Missing("Endpoint"))?
                .0,
            endpoint_name: self.endpoint.and_then(|(_, name)| name),
            allowed_ips: non_empty(self.allowed_ips, "AllowedIPs")?,
            persistent_keepalive: self.keepalive,
        })
    }
}

fn list(value: &str, key: &'static str) -> Result<Vec<IpNet>, ParseError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| ParseError::Bad {
                    key,
                    problem: format!("{item:?} is not an address or CIDR"),
                })
        })
        .collect()
}

fn non_empty(v: Vec<IpNet>, key: &'static str) -> Result<Vec<IpNet>, ParseError> {
    if v.is_empty() {
        Err(ParseError::Missing(key))
    } else {
        Ok(v)
    }
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
        tunnel.uapi(&config.uapi_set())?;
        configure_interface(config)?;
        Ok(tunnel)
    }

    /// Replaces the device's configuration (keys, peers) in place.
    pub fn reconfigure(&mut self, config: &WireguardConfig) -> Result<(), Error> {
        // `replace_peers` is in every request: boringtun panics on an update to an existing peer.
        self.uapi(&config.uapi_set())?;
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
        let request = self.config.uapi_set();
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
            Some(config.wg_setconf().as_bytes()),
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

    fn conf(private: &Key, peer: &Key) -> String {
        format!(
            "# comment\n[Interface]\nPrivateKey = {}\nAddress = 10.64.0.2/32, fd64::2/128\nDNS = 10.64.0.1, corp.example\nMTU = 1380\nPostUp = iptables -A ...\n\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
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
    fn wg_quick_file_parses_and_hooks_are_ignored() {
        let (k, p) = (Key::generate(), Key::generate());
        let c = WireguardConfig::from_wg_quick(&conf(&k, &p), "ck0").unwrap();
        assert_eq!(c.private_key, k);
        assert_eq!(c.mtu, 1380);
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.dns, vec!["10.64.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.peer.public_key, p.public());
        assert_eq!(c.peer.endpoint, "192.0.2.2:51820".parse().unwrap());
        assert_eq!(c.peer.persistent_keepalive, Some(25));
        assert_eq!(c.fwmark, Some(FWMARK));
    }

    #[test]
    fn wg_quick_errors_name_the_key_not_the_value() {
        let (k, p) = (Key::generate(), Key::generate());
        let text = conf(&k, &p);
        let no_key = text.replace(&format!("PrivateKey = {}\n", &*k.to_base64()), "");
        assert_eq!(
            WireguardConfig::from_wg_quick(&no_key, "ck0"),
            Err(ParseError::Missing("PrivateKey"))
        );
        let bad_key = text.replace(&*k.to_base64(), "c2VjcmV0");
        let err = WireguardConfig::from_wg_quick(&bad_key, "ck0").unwrap_err();
        assert_eq!(err, ParseError::BadKey("PrivateKey"));
        assert!(!err.to_string().contains("c2VjcmV0"));
        assert_eq!(
            WireguardConfig::from_wg_quick("garbage", "ck0"),
            Err(ParseError::Line(1))
        );
        let two_peers = format!("{text}[Peer]\nPublicKey = {}\n", p.public());
        assert_eq!(
            WireguardConfig::from_wg_quick(&two_peers, "ck0"),
            Err(ParseError::Peers(2))
        );
    }

    #[test]
    fn gluetun_custom_endpoint_variables_parse() {
        let (k, p) = (Key::generate(), Key::generate());
        let vars = [
            ("VPN_SERVICE_PROVIDER", "custom".to_owned()),
            ("VPN_TYPE", "wireguard".to_owned()),
            ("VPN_ENDPOINT_IP", "192.0.2.2".to_owned()),
            ("VPN_ENDPOINT_PORT", "51821".to_owned()),
            ("WIREGUARD_PRIVATE_KEY", k.to_base64().to_string()),
            ("WIREGUARD_PUBLIC_KEY", p.public().to_string()),
            ("WIREGUARD_ADDRESSES", "10.64.0.2/32".to_owned()),
        ];
        let get = |key: &str| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| Secret::new(v.clone()))
        };
        let c = WireguardConfig::from_gluetun(get, "ck0").unwrap();
        assert_eq!(c.peer.endpoint, "192.0.2.2:51821".parse().unwrap());
        assert_eq!(c.peer.allowed_ips.len(), 2, "full tunnel by default");
        assert_eq!(c.mtu, DEFAULT_MTU);
        let missing = WireguardConfig::from_gluetun(
            |key| (key != "VPN_ENDPOINT_IP").then(|| get(key)).flatten(),
            "ck0",
        );
        assert_eq!(missing, Err(ParseError::Missing("VPN_ENDPOINT_IP")));
    }

    #[test]
    fn uapi_request_carries_every_setting() {
        let (k, p) = (Key::generate(), Key::generate());
        let c = WireguardConfig::from_wg_quick(&conf(&k, &p), "ck0").unwrap();
        let set = c.uapi_set();
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
