//! Tunnels: the desired tunnel as a value ([`TunnelConfig`]), a [`TunnelDriver`] that opens it and
//! an open [`Tunnel`] that reports its [`TunnelStatus`]. Closing is dropping.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{Error, wireguard::WireguardConfig};

pub use cloak_model::tunnel::{
    Endpoint, Proto, Remote, TunnelConfig, default_routes, is_host_name,
};

/// What an open tunnel reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStatus {
    pub state: TunnelState,
    /// WireGuard: time since the last completed handshake, `None` before the first. OpenVPN
    /// has no such figure (it watches its peer itself) and reports `None`.
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl TunnelStatus {
    /// A WireGuard tunnel's status: up once a handshake completed.
    pub fn wireguard(handshake_age: Option<Duration>, rx_bytes: u64, tx_bytes: u64) -> Self {
        Self {
            state: if handshake_age.is_some() {
                TunnelState::Up
            } else {
                TunnelState::Connecting
            },
            handshake_age,
            rx_bytes,
            tx_bytes,
        }
    }
}

/// Where a tunnel is in its own lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TunnelState {
    /// Interface up, no handshake yet (or the implementation is still connecting).
    #[default]
    Connecting,
    /// The implementation reports the tunnel up (WireGuard: a handshake completed).
    Up,
    /// The implementation failed for good (OpenVPN exited); the tunnel must be reopened.
    Failed(String),
}

/// An open tunnel. Dropping it tears it down.
pub trait Tunnel: Send + fmt::Debug {
    /// Reads the current status from the implementation.
    fn status(&mut self) -> Result<TunnelStatus, Error>;
    /// Which implementation is carrying it (`boringtun`, `kernel`, `openvpn`), for logs/metrics.
    fn implementation(&self) -> &'static str;
    /// Forgets a handshake that has not completed, so the next packet starts a new one at once
    /// (WireGuard otherwise retries only every 5 s: REKEY_TIMEOUT). Called while connecting.
    fn restart_handshake(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// Opens tunnels. The agent holds one driver and asks it for a tunnel per attempt.
pub trait TunnelDriver: Send + Sync {
    /// Opens `config`'s tunnel; `userspace_only` keeps WireGuard out of the kernel even where
    /// the module exists (read from each attempt's config, so a change applies on reconnect).
    fn open(&self, config: &TunnelConfig, userspace_only: bool) -> Result<Box<dyn Tunnel>, Error>;
}

/// The Linux driver: WireGuard in the kernel when the module exists, otherwise userspace
/// (boringtun, in this process); OpenVPN as a supervised child process.
#[derive(Debug, Clone)]
pub struct LinuxDriver {
    /// Directory for per-tunnel files (OpenVPN management socket, credentials), private to
    /// this agent: pods in one test share a filesystem.
    pub state_dir: std::path::PathBuf,
    /// The mark the tunnel's own encrypted packets carry (its data plane's
    /// [`crate::Identifiers::fwmark`]), so they skip the routing table that leads into it.
    pub fwmark: u32,
}

/// Makes `/dev/net/tun` when the container has none: an exit pod runs with `MKNOD` and
/// `NET_ADMIN` instead of privileged with the host's `/dev` mounted, and the runtime's device
/// rules let a container use the tun device (runc allows it by default) but do not create it.
pub fn ensure_tun_device() -> Result<(), Error> {
    let path = std::path::Path::new("/dev/net/tun");
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all("/dev/net").map_err(Error::io("/dev/net"))?;
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(10, 200),
    )
    .or_else(|e| {
        if e == nix::errno::Errno::EEXIST {
            Ok(())
        } else {
            Err(e)
        }
    })
    .map_err(|e| {
        Error::io("making /dev/net/tun (the pod needs the MKNOD capability)")(std::io::Error::from(
            e,
        ))
    })
}

impl TunnelDriver for LinuxDriver {
    fn open(&self, config: &TunnelConfig, userspace_only: bool) -> Result<Box<dyn Tunnel>, Error> {
        ensure_tun_device()?;
        match config {
            TunnelConfig::WireGuard(c) => {
                let marked = WireguardConfig {
                    fwmark: Some(self.fwmark),
                    ..c.clone()
                };
                crate::wireguard::open(&marked, userspace_only)
            }
            TunnelConfig::OpenVpn(c) => {
                crate::openvpn::OpenVpn::open(c, &self.state_dir, self.fwmark)
                    .map(|t| Box::new(t) as _)
            }
        }
    }
}

/// The in-memory fake: records what was opened; tests script what the tunnels report.
#[derive(Debug, Clone, Default)]
pub struct FakeDriver {
    pub inner: Arc<Mutex<FakeDriverState>>,
    /// Opening and closing land here as `tunnel open <interface>` and `tunnel close
    /// <interface>` (share it with the fake firewall and routes to observe their order).
    pub journal: Arc<Mutex<Vec<String>>>,
}

/// What a [`FakeDriver`] saw and what it will answer.
#[derive(Debug, Default)]
pub struct FakeDriverState {
    /// Every config opened, in order, with its `userspace_only`.
    pub opened: Vec<(TunnelConfig, bool)>,
    /// Tunnels currently open.
    pub open_now: usize,
    /// Opening fails with this message while set.
    pub fail_open: Option<String>,
    /// What every open tunnel reports.
    pub status: TunnelStatus,
}

impl TunnelDriver for FakeDriver {
    fn open(&self, config: &TunnelConfig, userspace_only: bool) -> Result<Box<dyn Tunnel>, Error> {
        let mut state = self
            .inner
            .lock()
            .map_err(|_| Error::Tunnel("poisoned".into()))?;
        state.opened.push((config.clone(), userspace_only));
        if let Some(message) = &state.fail_open {
            return Err(Error::Tunnel(message.clone()));
        }
        state.open_now += 1;
        let interface = config.interface().to_owned();
        if let Ok(mut j) = self.journal.lock() {
            j.push(format!("tunnel open {interface}"));
        }
        Ok(Box::new(FakeTunnel {
            driver: Arc::clone(&self.inner),
            journal: Arc::clone(&self.journal),
            interface,
        }))
    }
}

#[derive(Debug)]
struct FakeTunnel {
    driver: Arc<Mutex<FakeDriverState>>,
    journal: Arc<Mutex<Vec<String>>>,
    interface: String,
}

impl Tunnel for FakeTunnel {
    fn status(&mut self) -> Result<TunnelStatus, Error> {
        Ok(self
            .driver
            .lock()
            .map_err(|_| Error::Tunnel("poisoned".into()))?
            .status
            .clone())
    }

    fn implementation(&self) -> &'static str {
        "fake"
    }
}

impl Drop for FakeTunnel {
    fn drop(&mut self) {
        if let Ok(mut state) = self.driver.lock() {
            state.open_now -= 1;
        }
        if let Ok(mut j) = self.journal.lock() {
            j.push(format!("tunnel close {}", self.interface));
        }
    }
}
