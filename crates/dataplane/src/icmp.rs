//! ICMP echo, as cloak uses it twice: the node probes each exit through its link, and an exit
//! watches its own tunnel with echoes to an address behind it ([`Liveness`]).
//!
//! Why an exit needs its own watch: the agent's end-to-end probe (an HTTP request to a
//! what-is-my-IP service) runs once a second and takes its timeout to fail, so a tunnel whose
//! provider silently stops forwarding is noticed after 1–3 s. An echo every 100 ms to the
//! provider's in-tunnel resolver costs about 720 bytes a second (36-byte echoes each way) and
//! notices it within the window (500 ms by default): the exit then stops answering the nodes'
//! probes, and they take it out as dead (its flows get a reset, as any dead exit's do). The
//! agent's probe still decides when to reconnect.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recv, sendto,
    setsockopt, socket, sockopt,
};

/// An ICMP echo request (type 8) with its checksum.
pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut packet = [0u8; 16];
    packet[0] = 8;
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..16].copy_from_slice(b"cloak-gw");
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[allow(clippy::cast_possible_truncation)] // folded to 16 bits above
    let folded = sum as u16;
    !folded
}

/// The identifier and sequence of an echo reply in a raw IPv4 packet, if it is one.
pub fn echo_reply(packet: &[u8]) -> Option<(u16, u16)> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(header..header + 8)?;
    (icmp[0] == 0).then(|| {
        (
            u16::from_be_bytes([icmp[4], icmp[5]]),
            u16::from_be_bytes([icmp[6], icmp[7]]),
        )
    })
}

/// The DSCP of a raw IPv4 packet (the top six bits of its TOS byte).
pub fn dscp(packet: &[u8]) -> Option<u8> {
    Some(packet.get(1)? >> 2)
}

/// The source address of a raw IPv4 packet.
pub fn source(packet: &[u8]) -> Option<Ipv4Addr> {
    let bytes: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
    Some(Ipv4Addr::from(bytes))
}

/// A socket timeout of `d` (at least a microsecond: a zero timeout means "block forever").
pub fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(
        nix::libc::time_t::try_from(d.as_secs()).unwrap_or(nix::libc::time_t::MAX),
        nix::libc::suseconds_t::from(d.subsec_micros().max(1)),
    )
}

/// What [`Liveness`] watches, and how strictly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessConfig {
    /// The tunnel's interface: echoes are sent out of it alone, whatever the routes say.
    pub interface: String,
    /// An address behind the tunnel that answers echoes (the provider's in-tunnel resolver).
    pub target: Ipv4Addr,
    /// One echo per interval.
    pub interval: Duration,
    /// Silent: no reply for this long, once the target has answered at least once.
    pub window: Duration,
    /// Silent this long, the target is no longer trusted: it may have stopped answering echoes
    /// while the tunnel works (the agent's own probe judges the tunnel; it has long since failed
    /// if the tunnel is really dead). The watch is off until the target answers again.
    pub give_up: Duration,
}

/// Watches a tunnel by echo on a thread of its own (in the calling thread's network namespace),
/// and calls `report(silent)` each time the verdict changes. Until the target first answers,
/// nothing is judged: a target that never answers echoes leaves the verdict to the agent's
/// probe. Dropping it stops the thread.
#[derive(Debug)]
pub struct Liveness {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Liveness {
    pub fn start(config: LivenessConfig, report: impl FnMut(bool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("cloak-liveness".into())
            .spawn(move || watch(&config, &flag, report))
            .ok();
        if thread.is_none() {
            tracing::error!("the liveness thread did not start: the agent's probe alone judges");
        }
        Self { stop, thread }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A raw IPv4 ICMP socket (root only): what sends the echoes and reads every reply.
pub fn raw_socket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )
}

/// A raw ICMP socket that sends out of `interface` only.
fn bound_socket(interface: &str) -> nix::Result<OwnedFd> {
    let sock = raw_socket()?;
    setsockopt(&sock, sockopt::BindToDevice, &interface.into())?;
    Ok(sock)
}

/// The verdict after a reply last seen at `last` (`None`: never, or given up on).
fn silent(config: &LivenessConfig, last: Option<Instant>, now: Instant) -> bool {
    last.is_some_and(|at| now.duration_since(at) > config.window)
}

fn watch(config: &LivenessConfig, stop: &AtomicBool, mut report: impl FnMut(bool)) {
    // The process's identifier tells our replies from other echoes' in the namespace.
    #[allow(clippy::cast_possible_truncation)] // any 16 bits of it will do
    let id = std::process::id() as u16 ^ 0x5a5a;
    let to = SockaddrIn::from(SocketAddrV4::new(config.target, 0));
    let mut sock: Option<OwnedFd> = None;
    let mut last: Option<Instant> = None;
    let mut reported = false;
    let mut seq: u16 = 0;
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        seq = seq.wrapping_add(1);
        let round = Instant::now();
        // The tunnel's interface comes and goes with reconnections: a socket bound to a gone
        // device is made again on the next round.
        if sock.is_none() {
            sock = bound_socket(&config.interface).ok();
        }
        if let Some(s) = &sock
            && sendto(
                s.as_raw_fd(),
                &echo_request(id, seq),
                &to,
                MsgFlags::MSG_DONTWAIT,
            )
            .is_err()
        {
            sock = None;
        }
        loop {
            let left = config.interval.saturating_sub(round.elapsed());
            let Some(s) = sock.as_ref().filter(|_| !left.is_zero()) else {
                std::thread::sleep(left);
                break;
            };
            if setsockopt(s, sockopt::ReceiveTimeout, &timeval(left)).is_err() {
                sock = None;
                continue;
            }
            match recv(s.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => {
                    let packet = &buf[..n];
                    if source(packet) == Some(config.target)
                        && echo_reply(packet).is_some_and(|(i, _)| i == id)
                    {
                        last = Some(Instant::now());
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(_) => sock = None,
            }
        }
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) > config.give_up) {
            tracing::warn!(
                target = %config.target,
                "no echo reply for {:?}: the tunnel watch is off until the target answers again",
                config.give_up
            );
            last = None;
        }
        let verdict = silent(config, last, now);
        if verdict != reported {
            reported = verdict;
            report(verdict);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_request_checksums_to_zero_and_a_reply_is_read_back() {
        let request = echo_request(0xc101, 7);
        assert_eq!(
            checksum(&request),
            0,
            "a packet with its checksum sums to zero"
        );
        let mut reply = vec![0x45u8; 20];
        let mut icmp = request.to_vec();
        icmp[0] = 0;
        reply.extend(icmp);
        assert_eq!(echo_reply(&reply), Some((0xc101, 7)));
        reply[12..16].copy_from_slice(&[10, 64, 0, 1]);
        assert_eq!(source(&reply), Some(Ipv4Addr::new(10, 64, 0, 1)));
        reply[20] = 3; // destination unreachable
        assert_eq!(echo_reply(&reply), None);
    }

    #[test]
    fn silence_is_judged_only_once_the_target_has_answered() {
        let config = LivenessConfig {
            interface: "ck0".into(),
            target: Ipv4Addr::new(10, 64, 0, 1),
            interval: Duration::from_millis(100),
            window: Duration::from_millis(500),
            give_up: Duration::from_secs(5),
        };
        let at = Instant::now();
        assert!(!silent(&config, None, at + Duration::from_mins(1)));
        assert!(!silent(&config, Some(at), at + Duration::from_millis(500)));
        assert!(silent(&config, Some(at), at + Duration::from_millis(501)));
    }
}
