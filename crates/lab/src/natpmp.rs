//! The fake providers' NAT-PMP gateway (RFC 6886, as ProtonVPN runs one): in each provider's
//! namespace, UDP port 5351 on every address, so a client asks the far end of its tunnel
//! (`<server's tunnel prefix>.1`). A mapping forwards the provider's exit address's external
//! port to the client's tunnel address and internal port (a DNAT map in the namespace's table
//! `inet natpmp`), for the lifetime granted (at most [`MAX_LIFETIME`]); it is gone when that
//! passes without a renewal.
//!
//! A test steers it through `providers/<name>/natpmp.json` (read at every request and every
//! second): `refuse` (every request is refused: NotAuthorized), `moves` (raised: every mapping
//! gets a new external port at its next renewal), `resets` (raised: the gateway loses every
//! mapping and its epoch starts again at 0, as a restarted gateway). Every request and what was
//! answered is logged to `providers/<name>/natpmp.log`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use cloak_model::natpmp::{self, Protocol, Request, Response, ResultCode};

use crate::{
    error::{Error, Result},
    layout::{Lab, Provider},
    sh,
};

/// The longest lifetime granted, whatever is asked: ProtonVPN's.
pub const MAX_LIFETIME: u32 = 60;
/// External ports are handed out from here up.
const FIRST_PORT: u16 = 40000;

/// What a test asks of the gateway (`natpmp.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Control {
    pub refuse: bool,
    pub moves: u32,
    pub resets: u32,
    /// A static port, as a provider's account page sets one up: this port of the provider's
    /// exit address forwarded, TCP and UDP, to the same port of this tunnel client, whatever
    /// NAT-PMP says.
    pub static_port: Option<(std::net::Ipv4Addr, u16)>,
}

/// Where a test writes provider `p`'s [`Control`].
pub fn control_file(lab: &Lab, p: &Provider) -> PathBuf {
    lab.dir().join("providers").join(p.name).join("natpmp.json")
}

/// Provider `p`'s gateway's log: a line a request.
pub fn log_file(lab: &Lab, p: &Provider) -> PathBuf {
    lab.dir().join("providers").join(p.name).join("natpmp.log")
}

/// Writes provider `p`'s [`Control`].
pub fn control(lab: &Lab, p: &Provider, control: Control) -> Result<()> {
    let path = control_file(lab, p);
    let text = serde_json::to_string(&control).map_err(|e| Error::Other(e.to_string()))?;
    fs::write(&path, text).map_err(Error::io(path))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    protocol: Protocol,
    client: Ipv4Addr,
    internal: u16,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    external: u16,
    until: Instant,
}

struct Gateway {
    ns: String,
    exit: Ipv4Addr,
    log: PathBuf,
    control_path: PathBuf,
    control: Control,
    since: Instant,
    mappings: BTreeMap<Key, Mapping>,
    /// The ports written into the namespace's table last.
    written: Option<BTreeMap<Key, u16>>,
}

/// Starts provider `p`'s gateway on a thread in its namespace; it runs until the process exits.
pub(crate) fn start(lab: &Lab, p: &Provider) -> Result<()> {
    let ns = lab.netns(&format!("p{}", p.index));
    let path = format!("/var/run/netns/{ns}");
    let exit: Ipv4Addr = p
        .exit()
        .parse()
        .map_err(|e| Error::Other(format!("{}: {e}", p.exit())))?;
    control(lab, p, Control::default())?;
    let mut gateway = Gateway {
        ns,
        exit,
        log: log_file(lab, p),
        control_path: control_file(lab, p),
        control: Control::default(),
        since: Instant::now(),
        mappings: BTreeMap::new(),
        written: None,
    };
    gateway.write_table()?;
    let (ready_tx, ready) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
    std::thread::Builder::new()
        .name(format!("natpmp-{}", p.name))
        .spawn(move || {
            let bound = fs::File::open(&path)
                .map_err(|e| format!("{path}: {e}"))
                .and_then(|f| {
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("entering {path}: {e}"))
                })
                .and_then(|()| {
                    UdpSocket::bind(("0.0.0.0", natpmp::PORT))
                        .map_err(|e| format!("binding port {}: {e}", natpmp::PORT))
                });
            match bound {
                Ok(socket) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
                    gateway.serve(&socket);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| Error::Other(format!("starting the NAT-PMP gateway: {e}")))?;
    match ready.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Other(format!("NAT-PMP gateway of {}: {e}", p.name))),
        Err(_) => Err(Error::Other(format!(
            "NAT-PMP gateway of {} did not start",
            p.name
        ))),
    }
}

impl Gateway {
    fn serve(&mut self, socket: &UdpSocket) {
        let mut buf = [0u8; 64];
        loop {
            self.steer();
            self.expire();
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                if let Some(answer) = self.answer(&buf[..n], from) {
                    let _ = socket.send_to(&answer, from);
                }
                self.expire();
            }
            if let Err(e) = self.write_table() {
                self.log(&format!("writing the table: {e}"));
            }
        }
    }

    /// Applies a changed [`Control`].
    fn steer(&mut self) {
        let Some(control) = fs::read_to_string(&self.control_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Control>(&t).ok())
        else {
            return;
        };
        if control.resets > self.control.resets {
            self.mappings.clear();
            self.since = Instant::now();
            self.log("reset: every mapping lost, epoch 0");
        }
        if control.moves > self.control.moves {
            // Each mapping's port changes at its next renewal: forget which it had.
            for m in self.mappings.values_mut() {
                m.external = 0;
            }
            self.log("moves: every mapping gets a new port at its next renewal");
        }
        self.control = control;
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let before = self.mappings.len();
        self.mappings.retain(|_, m| m.until > now);
        if self.mappings.len() != before {
            self.log(&format!(
                "{} mapping(s) expired",
                before - self.mappings.len()
            ));
        }
    }

    fn epoch(&self) -> u32 {
        u32::try_from(self.since.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn answer(&mut self, datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        // Only the provider's own clients, from inside their tunnels (never the internet).
        let SocketAddr::V4(from) = from else {
            return None;
        };
        if from.ip().octets()[0] != 10 {
            self.log(&format!("{from}: not a tunnel client, ignored"));
            return None;
        }
        let request = match Request::decode(datagram) {
            Ok(r) => r,
            Err(e) => {
                self.log(&format!("{from}: {e}"));
                return None;
            }
        };
        let epoch = self.epoch();
        let refuse = self.control.refuse;
        let response = match request {
            Request::Address => Response::Address {
                result: if refuse {
                    ResultCode::NotAuthorized
                } else {
                    ResultCode::Success
                },
                epoch,
                address: self.exit,
            },
            Request::Map(map) => {
                let key = Key {
                    protocol: map.protocol,
                    client: *from.ip(),
                    internal: map.internal,
                };
                let port = self.port_for(key, map.external);
                let (result, external, lifetime) = if refuse {
                    (ResultCode::NotAuthorized, 0, 0)
                } else if map.lifetime == 0 {
                    self.mappings.remove(&key);
                    (ResultCode::Success, 0, 0)
                } else if let Some(external) = port {
                    let lifetime = map.lifetime.min(MAX_LIFETIME);
                    self.mappings.insert(
                        key,
                        Mapping {
                            external,
                            until: Instant::now() + Duration::from_secs(u64::from(lifetime)),
                        },
                    );
                    (ResultCode::Success, external, lifetime)
                } else {
                    (ResultCode::OutOfResources, 0, 0)
                };
                Response::Map {
                    protocol: map.protocol,
                    result,
                    epoch,
                    internal: map.internal,
                    external,
                    lifetime,
                }
            }
        };
        self.log(&format!("{from}: {request:?} -> {response:?}"));
        Some(response.encode())
    }

    /// The external port for `key`: the one it has, else the suggested one when free (and not
    /// after a move), else the lowest free one; `None` when none is free.
    fn port_for(&self, key: Key, suggested: u16) -> Option<u16> {
        if let Some(m) = self.mappings.get(&key)
            && m.external != 0
        {
            return Some(m.external);
        }
        let moved = self.mappings.get(&key).is_some_and(|m| m.external == 0);
        let taken = |port: u16| {
            self.mappings
                .iter()
                .any(|(k, m)| k.protocol == key.protocol && m.external == port && *k != key)
        };
        if suggested >= FIRST_PORT && !moved && !taken(suggested) {
            return Some(suggested);
        }
        (FIRST_PORT..=u16::MAX).find(|&p| !(taken(p) || (moved && p == suggested)))
    }

    /// The namespace's DNAT maps, when they changed.
    fn write_table(&mut self) -> Result<()> {
        let mut ports: BTreeMap<Key, u16> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.external != 0)
            .map(|(k, m)| (*k, m.external))
            .collect();
        if let Some((client, port)) = self.control.static_port {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                ports.insert(
                    Key {
                        protocol,
                        client,
                        internal: port,
                    },
                    port,
                );
            }
        }
        if self.written.as_ref() == Some(&ports) {
            return Ok(());
        }
        let mut maps = String::new();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let elements: Vec<String> = ports
                .iter()
                .filter(|(k, _)| k.protocol == protocol)
                .map(|(k, port)| format!("{port} : {} . {}", k.client, k.internal))
                .collect();
            let elements = if elements.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }};", elements.join(", "))
            };
            let _ = writeln!(
                maps,
                "  map ports_{p} {{ type inet_service : ipv4_addr . inet_service;{elements} }}",
                p = protocol.as_str()
            );
        }
        let script = format!(
            "table ip natpmp\ndelete table ip natpmp\ntable ip natpmp {{\n{maps}  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {exit} dnat ip to tcp dport map @ports_tcp\n    ip daddr {exit} dnat ip to udp dport map @ports_udp\n  }}\n}}\n",
            exit = self.exit
        );
        sh::nft(&self.ns, &script)?;
        self.written = Some(ports);
        Ok(())
    }

    fn log(&self, line: &str) {
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let _ = writeln!(f, "{:.3} {line}", self.since.elapsed().as_secs_f64());
        }
    }
}
