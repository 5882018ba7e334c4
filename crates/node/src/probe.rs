//! Health probes to the exits, through their links: one ICMP echo per exit per round, sent with
//! the exit's mark so it is routed into that exit's link, answered by the exit only while its
//! tunnel passes its own probe (`dataplane::gateway::ExitPlan`). Every exit answers from the same
//! inner address, so replies are told apart by their echo identifier.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use cloak_dataplane::{
    gateway::{DRAINING_DSCP, EXIT_ADDRESS, IPV6_DSCP, mark},
    icmp::{self, echo_reply, echo_request},
};
use nix::sys::socket::{MsgFlags, SockaddrIn, recv, sendto, setsockopt, sockopt};

/// The echo identifier of the probes to exit slot `slot`.
fn ident(slot: u8) -> u16 {
    0xc100 | u16::from(slot)
}

/// Whether a raw IPv4 packet comes from the exits' inner address.
fn from_exit(packet: &[u8]) -> bool {
    icmp::source(packet) == Some(EXIT_ADDRESS)
}

/// What one round heard from an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// No answer within the round.
    Missed,
    /// An answer: the exit's tunnel works and it takes new flows; IPv6 ones too when `ipv6`
    /// (the answer carried [`IPV6_DSCP`]).
    Up { ipv6: bool },
    /// An answer marked [`DRAINING_DSCP`]: the exit works but takes no new flows (its pod is
    /// being deleted). A node learns it from the exit itself, with the operator down too.
    Draining,
}

/// What an echo reply from an exit says.
fn answer(packet: &[u8]) -> Answer {
    match icmp::dscp(packet) {
        Some(DRAINING_DSCP) => Answer::Draining,
        dscp => Answer::Up {
            ipv6: dscp == Some(IPV6_DSCP),
        },
    }
}

/// Probes the exits on the calling thread (which must be in the node's network namespace):
/// each round, one echo to each of `targets()` (VNI → slot), then `report(vni → answer)` once
/// the round's `interval` is over. The echoes go out with TOS 0, which the exits' replies copy:
/// only a draining exit's replies carry [`DRAINING_DSCP`], and only those of an exit whose
/// tunnel carries IPv6 [`IPV6_DSCP`]. Ends when `report` returns false.
pub fn run(
    interval: Duration,
    targets: &dyn Fn() -> BTreeMap<u32, u8>,
    report: &mut dyn FnMut(BTreeMap<u32, Answer>) -> bool,
) -> std::io::Result<()> {
    let sock = icmp::raw_socket()?;
    let to = SockaddrIn::from(SocketAddrV4::new(EXIT_ADDRESS, 0));
    let mut seq: u16 = 0;
    let mut buf = [0u8; 1500];
    loop {
        seq = seq.wrapping_add(1);
        let round = targets();
        let started = Instant::now();
        let mut answered: BTreeMap<u32, Answer> =
            round.keys().map(|vni| (*vni, Answer::Missed)).collect();
        for slot in round.values() {
            setsockopt(&sock, sockopt::Mark, &mark(*slot))?;
            // A send that fails (the link is going away) is a probe not answered.
            let _ = sendto(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                &echo_request(ident(*slot), seq),
                &to,
                MsgFlags::MSG_DONTWAIT,
            );
        }
        let by_ident: BTreeMap<u16, u32> = round
            .iter()
            .map(|(vni, slot)| (ident(*slot), *vni))
            .collect();
        loop {
            // Once the round is over, the answers already queued are still read, without
            // waiting: a probe thread that was not scheduled in time has not seen them yet, and
            // they are answers, not misses.
            let left = interval.saturating_sub(started.elapsed());
            let flags = if left.is_zero() {
                MsgFlags::MSG_DONTWAIT
            } else {
                setsockopt(&sock, sockopt::ReceiveTimeout, &icmp::timeval(left))?;
                MsgFlags::empty()
            };
            match recv(std::os::fd::AsRawFd::as_raw_fd(&sock), &mut buf, flags) {
                Ok(n) => {
                    if from_exit(&buf[..n])
                        && let Some((id, s)) = echo_reply(&buf[..n])
                        && s == seq
                        && let Some(vni) = by_ident.get(&id)
                    {
                        answered.insert(*vni, answer(&buf[..n]));
                    }
                }
                // Nothing more queued once the round is over.
                Err(nix::errno::Errno::EAGAIN) if left.is_zero() => break,
                // The round's time is up, or a signal: look again.
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !report(answered) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_the_exits_only_from_their_inner_address() {
        let mut reply = vec![0x45u8; 20];
        reply.extend(echo_request(ident(1), 7));
        reply[20] = 0;
        assert!(!from_exit(&reply));
        reply[12..16].copy_from_slice(&EXIT_ADDRESS.octets());
        assert!(from_exit(&reply));
        assert_eq!(echo_reply(&reply), Some((ident(1), 7)));
        assert_eq!(answer(&reply), Answer::Up { ipv6: false });
        reply[1] = DRAINING_DSCP << 2;
        assert_eq!(answer(&reply), Answer::Draining);
        reply[1] = IPV6_DSCP << 2;
        assert_eq!(answer(&reply), Answer::Up { ipv6: true });
        reply[1] = 0x01; // ECN bits alone say nothing
        assert_eq!(answer(&reply), Answer::Up { ipv6: false });
    }
}
