//! The agent's declarative config: a YAML file (the operator renders it) naming the credentials
//! and the health settings, read and checked once into a [`Resolved`] value the state machine
//! uses. Everything that can be wrong with the input is found here and reported with the key or
//! file at fault, never with a secret value.

use std::{
    collections::BTreeMap,
    fmt,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use cloak_dataplane::{Secret, TunnelConfig};
use cloak_model::credentials;
use ipnet::IpNet;
use serde::Deserialize;

/// Seconds between WireGuard keepalives when the credentials set none: below the 30 s after
/// which common NATs forget an idle UDP mapping.
const DEFAULT_KEEPALIVE: u16 = 25;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// A directory of credential files (a mounted Secret: `wg0.conf`, or `config.ovpn` with
    /// optional `username`/`password`, or gluetun variables one per file), or one such file
    /// (`*.conf` wg-quick, `*.ovpn` OpenVPN, anything else `KEY=value` lines).
    pub credentials: PathBuf,
    /// Name of the tunnel interface.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// The DNS server, reached through the tunnel; DNS to anything else is dropped. Defaults to
    /// the `DNS =` of a wg-quick file.
    #[serde(default)]
    pub dns: Option<IpAddr>,
    /// Write `nameserver <dns>` to this file (the pod's `/etc/resolv.conf`) once connected.
    #[serde(default)]
    pub resolv_conf: Option<PathBuf>,
    /// The DNS server that resolves VPN server names given as host names (`Endpoint =
    /// vpn.example.com:51820`, `remote vpn.example.com`), outside the tunnel, before each
    /// connection attempt. Defaults to the first `nameserver` of `/etc/resolv.conf` as the agent
    /// found it at start (in a pod: the cluster DNS); when the agent itself wrote that file
    /// (`resolvConf`), to the resolver it kept in it then, never to the tunnel's.
    #[serde(default)]
    pub endpoint_resolver: Option<IpAddr>,
    /// Networks reached outside the tunnel (cluster and service CIDRs, a LAN).
    #[serde(default)]
    pub bypass: Vec<IpNet>,
    #[serde(default)]
    pub health: HealthConfig,
    /// How long a connection attempt may take before it is abandoned and retried.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Wait before the first retry; doubles per failure up to `backoffMax`.
    #[serde(default = "default_backoff", with = "duration")]
    pub backoff: Duration,
    #[serde(default = "default_backoff_max", with = "duration")]
    pub backoff_max: Duration,
    /// Use userspace WireGuard even where the kernel module exists.
    #[serde(default)]
    pub userspace: bool,
    /// The exit role: this agent is one exit of a VpnGateway and forwards the flows the nodes
    /// send over their VXLAN links into its tunnel (the operator writes this section).
    #[serde(default)]
    pub exit: Option<ExitRole>,
}

/// What an exit needs besides its tunnel.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExitRole {
    /// The VXLAN network identifier the nodes' links to this exit use.
    pub vni: u32,
    /// TCP MSS clamped on client flows, both ways.
    pub mss: u16,
    /// The MTU of the exit's end of the links (`ckx0`): the pod network's less VXLAN's 50
    /// bytes. Default: the kernel's for a VXLAN device (1500), which fragments outer packets.
    #[serde(default)]
    pub link_mtu: Option<u16>,
    /// The MTU this exit's own encrypted packets have room for, when its tunnel runs through
    /// another gateway (a chain's hop): the tunnel's MTU is lowered to fit it, less the tunnel
    /// kind's overhead, so no hop fragments. Default: the credentials' MTU stands.
    #[serde(default)]
    pub underlay_mtu: Option<u16>,
    /// This pod's own address, the far end of the nodes' links. Default: `$POD_IP` (the
    /// operator sets it from the downward API).
    #[serde(default)]
    pub local: Option<IpAddr>,
    /// An address behind the tunnel that answers ICMP echoes: the exit sends it one every
    /// `pingInterval` and stops answering the nodes (they take it out as dead) after `pingWindow` without a reply (a silent
    /// blackhole), long before the probe fails. Default: the tunnel's resolver, when it is an
    /// IPv4 address; without one, the probe alone judges.
    #[serde(default)]
    pub ping: Option<std::net::Ipv4Addr>,
    #[serde(default = "default_ping_interval", with = "duration")]
    pub ping_interval: Duration,
    #[serde(default = "default_ping_window", with = "duration")]
    pub ping_window: Duration,
    /// Name suffixes the exit's DNS forwarder sends to the cluster DNS (every other name goes
    /// to the tunnel's resolver). Default: `cluster.local`.
    #[serde(default = "default_cluster_domains")]
    pub cluster_domains: Vec<String>,
    /// The cluster DNS. Default: the first `nameserver` of the pod's `/etc/resolv.conf`, which
    /// the kubelet writes.
    #[serde(default)]
    pub cluster_resolver: Option<IpAddr>,
    /// How long the exit keeps carrying its clients' established flows after SIGTERM (its pod
    /// is being deleted: the nodes give it no new flows). It stops sooner once no client flow
    /// has carried a packet for `drainQuiet`. Zero: it stops at once. Default 5m.
    #[serde(default = "default_drain_grace", with = "duration")]
    pub drain_grace: Duration,
    /// How long every client flow must have been quiet for a draining exit to stop before its
    /// grace ends. Default 1m.
    #[serde(default = "default_drain_quiet", with = "duration")]
    pub drain_quiet: Duration,
    /// Inbound ports: what the exit's provider forwards to it, and the Service address each
    /// reaches (`crate::inbound`).
    #[serde(default)]
    pub forwards: Vec<Forward>,
}

/// One inbound port of an exit.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Forward {
    /// The gateway's request it serves (`spec.ports[].name`).
    pub name: String,
    pub protocols: Vec<cloak_model::natpmp::Protocol>,
    /// The Service's cluster address and port that connections go to. Its port is also the
    /// internal port asked of the provider.
    pub target: std::net::SocketAddrV4,
    /// The provider's static external port; absent: asked for by NAT-PMP and renewed.
    #[serde(default)]
    pub external: Option<u16>,
    /// The NAT-PMP gateway; absent: the tunnel address's `.1` (ProtonVPN's 10.2.0.1 for its
    /// 10.2.0.2).
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The Service's backends, when every one is a client of the exit's gateway: connections
    /// go to them over the links with the remote's address kept, instead of to `target`.
    #[serde(default)]
    pub backends: Vec<cloak_model::exit::Backend>,
}

impl Forward {
    /// The port the exit asks the provider to forward to (and its rules match): a static port
    /// arrives as it is, a dynamic one on the Service's port number.
    pub fn internal(&self) -> u16 {
        self.external.unwrap_or(self.target.port())
    }
}

fn default_drain_grace() -> Duration {
    Duration::from_mins(5)
}

fn default_drain_quiet() -> Duration {
    Duration::from_mins(1)
}

fn default_cluster_domains() -> Vec<String> {
    vec!["cluster.local".into()]
}

fn default_ping_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_ping_window() -> Duration {
    Duration::from_millis(500)
}

/// How the agent decides the tunnel works.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthConfig {
    /// Active probe through the tunnel: `tcp://host:port` (connect; a reply line holding an IP
    /// address is taken as the public exit address) or `http://host:port/path` (GET; the body
    /// likewise). Without a probe, the tunnel's own state decides.
    #[serde(default)]
    pub probe: Option<String>,
    #[serde(default = "default_interval", with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Consecutive failed probes before the tunnel is reconnected.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// A WireGuard handshake older than this means the peer is gone (WireGuard re-handshakes
    /// every 2 minutes while traffic flows; 180 s = 120 s + the 3 × 5 s retries + slack).
    #[serde(default = "default_handshake_timeout", with = "duration")]
    pub handshake_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            probe: None,
            interval: default_interval(),
            timeout: default_timeout(),
            failures: default_failures(),
            handshake_timeout: default_handshake_timeout(),
        }
    }
}

fn default_interface() -> String {
    "ck0".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_failures() -> u32 {
    3
}
fn default_handshake_timeout() -> Duration {
    Duration::from_mins(3)
}

/// A checked config: what the state machine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub tunnel: TunnelConfig,
    pub dns: Option<IpAddr>,
    pub resolv_conf: Option<PathBuf>,
    pub endpoint_resolver: Option<IpAddr>,
    pub bypass: Vec<IpNet>,
    pub probe: Option<ProbeTarget>,
    pub health: HealthConfig,
    pub connect_timeout: Duration,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub userspace: bool,
    /// The exit role, its local address resolved.
    pub exit: Option<ExitRole>,
}

/// Where the active probe goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    Tcp(ProbeAddr),
    Http {
        addr: ProbeAddr,
        host: String,
        path: String,
    },
}

impl ProbeTarget {
    pub fn addr(&self) -> &ProbeAddr {
        match self {
            Self::Tcp(a) | Self::Http { addr: a, .. } => a,
        }
    }
}

/// The probe's server: an address, or a host name resolved through the tunnel at each probe
/// (by the tunnel's resolver, the only DNS server reachable once connected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAddr {
    Ip(SocketAddr),
    Name {
        host: String,
        port: u16,
        resolver: IpAddr,
    },
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(ProbeAddr::Ip(a)) => write!(f, "tcp://{a}"),
            Self::Tcp(ProbeAddr::Name { host, port, .. }) => write!(f, "tcp://{host}:{port}"),
            Self::Http { host, path, .. } => write!(f, "http://{host}{path}"),
        }
    }
}

/// Why the agent cannot run with this config. Says which file or key; never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not a valid agent config: {reason}")]
    Syntax { path: String, reason: String },
    #[error("{path}: {reason}")]
    Credentials { path: String, reason: String },
    #[error("health.probe {probe:?}: {reason}")]
    Probe { probe: String, reason: String },
    #[error("interface name {0:?} must be 1-15 characters of [a-zA-Z0-9_-]")]
    Interface(String),
    #[error("exit: {0}")]
    Exit(String),
}

impl Resolved {
    /// Reads the config file and the credentials it names.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        let config: AgentConfig = serde_yaml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_config(config, path.parent().unwrap_or(Path::new(".")))
    }

    /// Checks a parsed config; relative credential paths are relative to `base`.
    pub fn from_config(config: AgentConfig, base: &Path) -> Result<Self, ConfigError> {
        let iface = &config.interface;
        if iface.is_empty()
            || iface.len() > 15
            || !iface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::Interface(iface.clone()));
        }
        let credentials = base.join(&config.credentials);
        let (mut tunnel, static_ports) = read_credentials(&credentials, iface)?;
        if let TunnelConfig::WireGuard(wg) = &mut tunnel {
            // The pod sits behind the node's NAT, whose UDP mappings expire after ~30 s idle.
            wg.peer
                .persistent_keepalive
                .get_or_insert(DEFAULT_KEEPALIVE);
        }
        if let Some(underlay) = config.exit.as_ref().and_then(|e| e.underlay_mtu) {
            tunnel.cap_mtu(u32::from(cloak_model::gateway::tunnel_fit(
                &tunnel, underlay,
            )));
        }
        let dns = config.dns.or_else(|| tunnel.dns().first().copied());
        let probe = config
            .health
            .probe
            .as_deref()
            .map(|p| parse_probe(p, dns))
            .transpose()?;
        let exit = config
            .exit
            .map(|mut role| {
                assign_static_ports(&mut role.forwards, &static_ports);
                resolve_exit(role, dns)
            })
            .transpose()?;
        Ok(Self {
            exit,
            dns,
            tunnel,
            resolv_conf: config.resolv_conf,
            endpoint_resolver: config.endpoint_resolver,
            bypass: config.bypass,
            probe,
            health: config.health,
            connect_timeout: config.connect_timeout,
            backoff: config.backoff,
            backoff_max: config.backoff_max,
            userspace: config.userspace,
        })
    }
}

/// An exit role with its local address (the config's, else `$POD_IP`) and the address its
/// echoes go to (the config's, else the tunnel's resolver `dns` when it is IPv4).
fn resolve_exit(mut role: ExitRole, dns: Option<IpAddr>) -> Result<ExitRole, ConfigError> {
    if role.ping.is_none()
        && let Some(IpAddr::V4(resolver)) = dns
    {
        role.ping = Some(resolver);
    }
    if role.cluster_resolver.is_none() {
        role.cluster_resolver = std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|text| crate::resolve::first_nameserver(&text));
    }
    if role.ping_interval.is_zero() || role.ping_window < role.ping_interval {
        return Err(ConfigError::Exit(format!(
            "pingWindow {:?} must be at least pingInterval {:?}, which must not be zero",
            role.ping_window, role.ping_interval
        )));
    }
    if role.local.is_none() {
        let from_env = std::env::var("POD_IP").map_err(|_| {
            ConfigError::Exit("no exit.local and no POD_IP in the environment".into())
        })?;
        role.local =
            Some(from_env.parse().map_err(|_| {
                ConfigError::Exit(format!("POD_IP {from_env:?} is not an IP address"))
            })?);
    }
    if !(cloak_model::gateway::FIRST_VNI..=cloak_model::gateway::LAST_VNI).contains(&role.vni) {
        return Err(ConfigError::Exit(format!(
            "vni {} is outside {}-{}",
            role.vni,
            cloak_model::gateway::FIRST_VNI,
            cloak_model::gateway::LAST_VNI
        )));
    }
    Ok(role)
}

/// A fingerprint of the config file and every credentials file, to notice edits. The config is
/// hashed by content; credentials files by what their metadata says (where the path leads —
/// a mounted Secret changes by swapping a symlink —, inode, size, modification time), so the
/// secrets themselves are not read into memory every second.
pub fn fingerprint(path: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    std::fs::read(path).ok().hash(&mut h);
    let mut add = |p: &Path| {
        use std::os::unix::fs::MetadataExt as _;
        p.hash(&mut h);
        std::fs::canonicalize(p).ok().hash(&mut h);
        std::fs::metadata(p)
            .ok()
            .map(|m| {
                (
                    (m.ino(), m.dev(), m.len()),
                    (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()),
                )
            })
            .hash(&mut h);
    };
    if let Ok(text) = std::fs::read_to_string(path)
        && let Ok(config) = serde_yaml::from_str::<AgentConfig>(&text)
    {
        let creds = path
            .parent()
            .unwrap_or(Path::new("."))
            .join(config.credentials);
        if creds.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&creds)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for e in entries {
                add(&e);
            }
        } else {
            add(&creds);
        }
    }
    h.finish()
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The ports the provider forwards to this account for good (the Secret's
/// `FIREWALL_VPN_INPUT_PORTS`) go to the requests that name none, in order, instead of NAT-PMP;
/// a port some request already uses (its own static port, or a Service port asked for by
/// NAT-PMP) is passed over, so no two requests end up on one port.
fn assign_static_ports(forwards: &mut [Forward], ports: &[u16]) {
    let used: Vec<u16> = forwards
        .iter()
        .flat_map(|f| [f.external, Some(f.target.port())])
        .flatten()
        .collect();
    // (`ports` holds each port once.)
    let mut free = ports.iter().copied().filter(|p| !used.contains(p));
    for forward in forwards.iter_mut().filter(|f| f.external.is_none()) {
        let Some(port) = free.next() else { break };
        forward.external = Some(port);
    }
}

/// The tunnel of the credentials at `path`, and the static forwarded ports they name
/// ([`credentials::static_ports`]).
fn read_credentials(path: &Path, iface: &str) -> Result<(TunnelConfig, Vec<u16>), ConfigError> {
    let err = |p: &Path, reason: String| ConfigError::Credentials {
        path: p.display().to_string(),
        reason,
    };
    if path.is_dir() {
        // A mounted Secret: one file per key (Kubernetes adds dot-files for its own bookkeeping).
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| err(path, e.to_string()))? {
            let entry = entry.map_err(|e| err(path, e.to_string()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(entry.path()).map_err(|e| err(&entry.path(), e.to_string()))?,
            );
            files.push((name, bytes));
        }
        // The operator's classification takes the same bytes the same way.
        let keys = credentials::keys(files.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(|e| err(path, e.to_string()))?;
        tunnel_and_ports(&keys, iface).map_err(|reason| err(path, reason))
    } else {
        let text = Secret::new(read(path)?);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let extension = Path::new(&name)
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let key = if extension.as_deref() == Some("conf") {
            "wg0.conf".to_owned()
        } else if extension.as_deref() == Some("ovpn") {
            "config.ovpn".to_owned()
        } else {
            // KEY=value lines (an env file).
            let keys = text
                .expose()
                .lines()
                .filter_map(|l| l.trim().split_once('='))
                .map(|(k, v)| {
                    (
                        k.trim().to_owned(),
                        Secret::new(v.trim().trim_matches('"').to_owned()),
                    )
                })
                .collect();
            return tunnel_and_ports(&keys, iface).map_err(|reason| err(path, reason));
        };
        let keys = BTreeMap::from([(key, text)]);
        tunnel_and_ports(&keys, iface).map_err(|reason| err(path, reason))
    }
}

fn tunnel_and_ports(
    keys: &BTreeMap<String, Secret>,
    iface: &str,
) -> Result<(TunnelConfig, Vec<u16>), String> {
    Ok((from_keys(keys, iface)?, credentials::static_ports(keys)?))
}

/// Credentials from Secret-style keys, by the parser the operator classifies them with.
fn from_keys(keys: &BTreeMap<String, Secret>, iface: &str) -> Result<TunnelConfig, String> {
    credentials::parse(keys, iface)
        .and_then(credentials::Credentials::into_tunnel)
        .map_err(|e| e.to_string())
}

fn parse_probe(probe: &str, dns: Option<IpAddr>) -> Result<ProbeTarget, ConfigError> {
    let bad = |reason: &str| ConfigError::Probe {
        probe: probe.to_owned(),
        reason: reason.to_owned(),
    };
    let (scheme, rest) = probe
        .split_once("://")
        .ok_or_else(|| bad("expected tcp://host:port or http://host:port/path"))?;
    if scheme != "tcp" && scheme != "http" {
        return Err(bad(&format!(
            "unsupported scheme {scheme}: expected tcp://host:port or http://host[:port]/path (the probe speaks plain HTTP)"
        )));
    }
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default_port = if scheme == "http" { 80 } else { 0 };
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_owned()
    } else if default_port > 0 {
        format!("{hostport}:{default_port}")
    } else {
        return Err(bad("a tcp probe needs a port"));
    };
    let addr = if let Ok(addr) = with_port.parse::<SocketAddr>() {
        ProbeAddr::Ip(addr)
    } else {
        let (host, port) = with_port
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port"))?;
        if !cloak_dataplane::tunnel::is_host_name(host) {
            return Err(bad("the host is neither an address nor a host name"));
        }
        ProbeAddr::Name {
            host: host.to_ascii_lowercase(),
            port: port.parse().map_err(|_| bad("the port is not a number"))?,
            resolver: dns.ok_or_else(|| {
                bad("a host name is resolved through the tunnel: set `dns` (or use an address)")
            })?,
        }
    };
    match scheme {
        "tcp" => Ok(ProbeTarget::Tcp(addr)),
        "http" => Ok(ProbeTarget::Http {
            addr,
            host: hostport.to_owned(),
            path: path.to_owned(),
        }),
        _ => Err(bad("the scheme must be tcp or http")),
    }
}

/// Durations as everywhere in cloak: Go's syntax (`500ms`, `2s`, `1m30s`), parsed by
/// [`cloak_api::GoDuration`], the type the CRDs use.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<cloak_api::GoDuration>()
            .map(|d| d.get())
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a duration (examples: 500ms, 2s, 1m30s): {e}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloak_dataplane::Key;

    fn dir() -> tempdir::Dir {
        tempdir::Dir::new()
    }

    /// A tiny temporary directory (the agent has no tempfile dependency).
    mod tempdir {
        use std::path::{Path, PathBuf};

        pub(super) struct Dir(PathBuf);
        impl Dir {
            pub(super) fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "cloak-agent-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub(super) fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn wg_conf() -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.64.0.2/32\nDNS = 10.64.0.1\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 0.0.0.0/0\n",
            &*Key::generate().to_base64(),
            Key::generate().public()
        )
    }

    #[test]
    fn a_mounted_secret_directory_with_wg0_conf_loads() {
        let d = dir();
        std::fs::create_dir(d.path().join("creds")).unwrap();
        write(&d.path().join("creds"), "wg0.conf", &wg_conf());
        let cfg = write(
            d.path(),
            "agent.yaml",
            "credentials: creds\nbypass: [10.96.0.0/12]\nhealth:\n  probe: tcp://203.0.113.10:7\n  interval: 500ms\n",
        );
        let r = Resolved::load(&cfg).unwrap();
        assert_eq!(r.tunnel.interface(), "ck0");
        assert_eq!(
            r.dns,
            Some("10.64.0.1".parse().unwrap()),
            "from wg0.conf's DNS"
        );
        assert_eq!(
            r.probe,
            Some(ProbeTarget::Tcp(ProbeAddr::Ip(
                "203.0.113.10:7".parse().unwrap()
            )))
        );
        assert_eq!(r.health.interval, Duration::from_millis(500));
        assert_eq!(r.health.failures, 3);
    }

    #[test]
    fn the_static_ports_of_a_mounted_secret_go_to_the_requests_that_name_none_in_order() {
        let d = dir();
        std::fs::create_dir(d.path().join("creds")).unwrap();
        write(&d.path().join("creds"), "wg0.conf", &wg_conf());
        write(
            &d.path().join("creds"),
            "FIREWALL_VPN_INPUT_PORTS",
            "40000, 51413, 51414", // 40000 is request b's own: passed over
        );
        let cfg = write(
            d.path(),
            "exit.yaml",
            "credentials: creds\nexit:\n  vni: 4096\n  mss: 1380\n  local: 10.244.1.7\n  forwards:\n\
             \x20   - {name: a, protocols: [tcp], target: 10.96.0.1:80}\n\
             \x20   - {name: b, protocols: [tcp], target: 10.96.0.1:81, external: 40000}\n\
             \x20   - {name: c, protocols: [tcp, udp], target: 10.96.0.1:82}\n\
             \x20   - {name: d, protocols: [tcp], target: 10.96.0.1:83}\n",
        );
        let role = Resolved::load(&cfg).unwrap().exit.unwrap();
        let externals: Vec<(&str, Option<u16>)> = role
            .forwards
            .iter()
            .map(|f| (f.name.as_str(), f.external))
            .collect();
        // The request's own static port stands; the Secret's other two go to the next two; the
        // last is asked for by NAT-PMP.
        assert_eq!(
            externals,
            [
                ("a", Some(51413)),
                ("b", Some(40000)),
                ("c", Some(51414)),
                ("d", None)
            ]
        );
        write(
            &d.path().join("creds"),
            "FIREWALL_VPN_INPUT_PORTS",
            "51413,x",
        );
        let err = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(err.contains("FIREWALL_VPN_INPUT_PORTS"), "{err}");
    }

    /// Names are kept as names: resolving them is the machine's step, at each connection, and
    /// a config must load whether or not DNS works (the kill switch may be closed).
    #[test]
    fn an_exit_role_loads_with_its_address_and_an_identifier_out_of_range_is_refused() {
        let d = dir();
        write(d.path(), "wg0.conf", &wg_conf());
        let cfg = write(
            d.path(),
            "exit.yaml",
            "credentials: wg0.conf\nexit: {vni: 4096, mss: 1380, local: 10.244.1.7}\n",
        );
        let r = Resolved::load(&cfg).unwrap();
        let role = r.exit.clone().unwrap();
        assert_eq!((role.vni, role.mss), (4096, 1380));
        assert_eq!(role.local, Some("10.244.1.7".parse().unwrap()));
        assert_eq!(
            role.ping,
            Some("10.64.0.1".parse().unwrap()),
            "echoes go to the tunnel's resolver by default"
        );
        assert_eq!(
            (role.ping_interval, role.ping_window),
            (Duration::from_millis(100), Duration::from_millis(500))
        );
        assert_eq!(
            (role.drain_grace, role.drain_quiet),
            (Duration::from_mins(5), Duration::from_mins(1))
        );
        let plan = crate::exit::plan(
            &Ok(std::sync::Arc::new(r.clone())),
            &crate::machine::Status::default(),
            false,
            false,
        )
        .unwrap();
        assert_eq!(plan.tunnel, "ck0");
        assert!(
            !plan.healthy,
            "an exit not connected answers no health probe"
        );
        let ready = crate::machine::Status {
            phase: crate::machine::Phase::Connected,
            probe_ok: true,
            ..crate::machine::Status::default()
        };
        let config = Ok(std::sync::Arc::new(r));
        let healthy = crate::exit::plan(&config, &ready, false, false).unwrap();
        assert!(healthy.healthy && !healthy.draining);
        assert!(
            !crate::exit::plan(&config, &ready, true, false)
                .unwrap()
                .healthy,
            "an exit whose echoes go unanswered answers no health probe, whatever its probe says"
        );
        let draining = crate::exit::plan(&config, &ready, false, true).unwrap();
        assert!(
            draining.healthy && draining.draining,
            "a draining exit answers, saying it drains"
        );
        let watch = crate::exit::liveness(&config).unwrap();
        assert_eq!(
            (watch.interface.as_str(), watch.target.to_string().as_str()),
            ("ck0", "10.64.0.1")
        );

        assert_eq!(role.cluster_domains, ["cluster.local"]);
        let bad = write(
            d.path(),
            "bad.yaml",
            "credentials: wg0.conf\nexit: {vni: 7, mss: 1380, local: 10.244.1.7}\n",
        );
        let err = Resolved::load(&bad).unwrap_err().to_string();
        assert!(err.contains("vni 7"), "{err}");
        let slow = write(
            d.path(),
            "slow.yaml",
            "credentials: wg0.conf\nexit: {vni: 4096, mss: 1380, local: 10.244.1.7, pingInterval: 1s, pingWindow: 500ms}\n",
        );
        let err = Resolved::load(&slow).unwrap_err().to_string();
        assert!(err.contains("pingWindow"), "{err}");
    }

    #[test]
    fn host_names_load_unresolved_and_a_probe_name_needs_the_tunnels_resolver() {
        let d = dir();
        let named = wg_conf().replace("192.0.2.2:51820", "VPN.example.invalid:51820");
        write(d.path(), "wg0.conf", &named);
        write(
            d.path(),
            "vpn.ovpn",
            "client\nremote gw.example.invalid 1194 udp\nremote 192.0.2.3 443 tcp\n",
        );
        let cfg = write(
            d.path(),
            "a.yaml",
            "credentials: wg0.conf\nendpointResolver: 10.96.0.10\nhealth: {probe: 'http://ip.example.invalid/ip'}\n",
        );
        let r = Resolved::load(&cfg).unwrap();
        assert_eq!(r.tunnel.names(), ["vpn.example.invalid"]);
        assert!(
            r.tunnel.endpoints().is_empty(),
            "nothing to allow before resolving"
        );
        assert_eq!(r.endpoint_resolver, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(
            r.probe.as_ref().map(ProbeTarget::addr),
            Some(&ProbeAddr::Name {
                host: "ip.example.invalid".into(),
                port: 80,
                resolver: "10.64.0.1".parse().unwrap(),
            }),
            "through the tunnel, by wg0.conf's DNS"
        );
        let cfg = write(d.path(), "b.yaml", "credentials: vpn.ovpn\n");
        let r = Resolved::load(&cfg).unwrap();
        assert_eq!(r.tunnel.names(), ["gw.example.invalid"]);
        let resolved = r
            .tunnel
            .resolve(&BTreeMap::from([(
                "gw.example.invalid".to_owned(),
                vec!["192.0.2.2".parse().unwrap(), "192.0.2.4".parse().unwrap()],
            )]))
            .unwrap();
        let endpoints: Vec<String> = resolved
            .endpoints()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            endpoints,
            [
                "192.0.2.2:1194/udp",
                "192.0.2.4:1194/udp",
                "192.0.2.3:443/tcp"
            ]
        );
        let cfg = write(
            d.path(),
            "c.yaml",
            "credentials: vpn.ovpn\nhealth: {probe: 'tcp://ip.example.invalid:7'}\n",
        );
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("set `dns`"), "{e}");
    }

    /// Edits are noticed from metadata alone: a rewrite in place, and a mounted Secret's update
    /// (the `..data` symlink swapped to a new directory).
    #[test]
    fn the_fingerprint_notices_edits_and_symlink_swaps_of_credentials() {
        let d = dir();
        let v1 = d.path().join("..2026_v1");
        let v2 = d.path().join("..2026_v2");
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        write(&v1, "wg0.conf", &wg_conf());
        write(&v2, "wg0.conf", &wg_conf());
        std::fs::create_dir(d.path().join("creds")).unwrap();
        std::os::unix::fs::symlink("..2026_v1", d.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("../..data/wg0.conf", d.path().join("creds/wg0.conf")).unwrap();
        let cfg = write(d.path(), "agent.yaml", "credentials: creds\n");
        let first = fingerprint(&cfg);
        assert_eq!(fingerprint(&cfg), first, "stable while nothing changes");
        let swapped = d.path().join("..data_tmp");
        std::os::unix::fs::symlink("..2026_v2", &swapped).unwrap();
        std::fs::rename(&swapped, d.path().join("..data")).unwrap();
        let second = fingerprint(&cfg);
        assert_ne!(second, first, "the symlink swap");
        write(&v2, "wg0.conf", &format!("{}# edited\n", wg_conf()));
        assert_ne!(fingerprint(&cfg), second, "an edit in place");
    }

    #[test]
    fn gluetun_env_file_and_ovpn_file_load() {
        let d = dir();
        let env = format!(
            "VPN_SERVICE_PROVIDER=custom\nVPN_TYPE=wireguard\nVPN_ENDPOINT_IP=192.0.2.2\nVPN_ENDPOINT_PORT=51820\nWIREGUARD_PRIVATE_KEY={}\nWIREGUARD_PUBLIC_KEY={}\nWIREGUARD_ADDRESSES=10.64.0.2/32\n",
            &*Key::generate().to_base64(),
            Key::generate().public()
        );
        write(d.path(), "gluetun.env", &env);
        let cfg = write(d.path(), "a.yaml", "credentials: gluetun.env\n");
        assert!(matches!(
            Resolved::load(&cfg).unwrap().tunnel,
            TunnelConfig::WireGuard(_)
        ));

        write(d.path(), "vpn.ovpn", "client\nremote 192.0.2.2 1194\n");
        let cfg = write(d.path(), "b.yaml", "credentials: vpn.ovpn\n");
        assert!(matches!(
            Resolved::load(&cfg).unwrap().tunnel,
            TunnelConfig::OpenVpn(_)
        ));
    }

    /// Found in review: the operator accepted a Secret with a binary key it does not read (a CA
    /// bundle, say), while the agent read every mounted file as text and refused it.
    #[test]
    fn a_binary_key_the_parser_does_not_read_is_left_out_and_one_it_reads_is_named() {
        let d = dir();
        let creds = d.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        write(&creds, "wg0.conf", &wg_conf());
        std::fs::write(creds.join("ca.der"), [0xff, 0xfe, 0x00]).unwrap();
        let cfg = write(d.path(), "a.yaml", "credentials: creds\n");
        assert!(matches!(
            Resolved::load(&cfg).unwrap().tunnel,
            TunnelConfig::WireGuard(_)
        ));
        std::fs::write(creds.join("password"), [0xff, 0xfe]).unwrap();
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("key password is not valid UTF-8"), "{e}");
    }

    #[test]
    fn bad_configs_say_exactly_what_is_wrong() {
        let d = dir();
        let missing_key = wg_conf()
            .lines()
            .filter(|l| !l.starts_with("PrivateKey"))
            .collect::<Vec<_>>()
            .join("\n");
        write(d.path(), "wg0.conf", &missing_key);
        let cfg = write(d.path(), "a.yaml", "credentials: wg0.conf\n");
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(
            e.ends_with("wg0.conf: wg0.conf: PrivateKey is missing"),
            "{e}"
        );

        let cfg = write(
            d.path(),
            "b.yaml",
            "credentials: wg0.conf\nhealth: {intervl: 1s}\n",
        );
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("unknown field `intervl`"), "{e}");

        let cfg = write(d.path(), "c.yaml", "credentials: nowhere\n");
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read ") && e.contains("nowhere"),
            "{e}"
        );

        write(d.path(), "wg1.conf", &wg_conf());
        let cfg = write(
            d.path(),
            "d.yaml",
            "credentials: wg1.conf\nhealth: {probe: 'udp://x'}\n",
        );
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(e.starts_with("health.probe \"udp://x\""), "{e}");
        assert!(
            e.contains("unsupported scheme udp"),
            "the reason is the scheme: {e}"
        );
        let cfg = write(
            d.path(),
            "h.yaml",
            "credentials: wg1.conf\nhealth: {probe: 'https://203.0.113.10/ip'}\n",
        );
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("unsupported scheme https"), "{e}");

        let cfg = write(
            d.path(),
            "e.yaml",
            "credentials: wg1.conf\nconnectTimeout: soon\n",
        );
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("\"soon\" is not a duration"), "{e}");
    }

    #[test]
    fn errors_never_contain_key_material() {
        let d = dir();
        let conf = wg_conf();
        let key_line = conf
            .lines()
            .find(|l| l.starts_with("PrivateKey"))
            .unwrap()
            .to_owned();
        let broken = conf.replace(&key_line, &format!("{key_line}x"));
        write(d.path(), "wg0.conf", &broken);
        let cfg = write(d.path(), "a.yaml", "credentials: wg0.conf\n");
        let e = Resolved::load(&cfg).unwrap_err().to_string();
        let secret = key_line.trim_start_matches("PrivateKey = ");
        assert!(!e.contains(secret), "{e}");
        assert!(e.contains("PrivateKey is not a valid WireGuard key"), "{e}");
    }
}
