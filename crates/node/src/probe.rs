//! Health probes to the exits, through their links: one ICMP echo per exit per round, sent with
//! the exit's mark so it is routed into that exit's link, answered by the exit only while its
//! tunnel passes its own probe (`dataplane::gateway::ExitPlan`). Every exit answers from the same
//! inner address, so replies are told apart by their echo identifier.
//!
//! An answer counts only when it came in by the exit's own link (the raw socket sees every ICMP
//! packet the node receives, and any pod can send one from the exits' inner address) and
//! carries the identifier and sequence number of this round's probe to that exit, both drawn at
//! random, so a pod cannot keep a dead exit alive, or take a live one out, by forging answers.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use cloak_dataplane::{
    gateway::{DRAINING_DSCP, EXIT_ADDRESS, IPV6_DSCP, LINK_PREFIX, mark},
    icmp::{self, echo_reply, echo_request},
};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendto, setsockopt, sockopt,
};
use rand_core::RngCore as _;

/// The echo identifier of the probes to exit slot `slot`, from this run's random `base`.
fn ident(base: u16, slot: u8) -> u16 {
    base.wrapping_add(u16::from(slot))
}

/// One probe of a round: the exit it went to and the index of the link it must come back by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    vni: u32,
    ifindex: u32,
}

/// The exit a received packet answers for: an echo reply from the exits' inner address that came
/// in by the link of the exit its identifier was sent to, with this round's sequence number.
fn answered_by(packet: &[u8], ifindex: u32, seq: u16, sent: &BTreeMap<u16, Sent>) -> Option<u32> {
    let (id, s) = echo_reply(packet)?;
    let probe = sent.get(&id)?;
    (from_exit(packet) && s == seq && probe.ifindex == ifindex).then_some(probe.vni)
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
    rtt: &dyn Fn(Duration),
) -> std::io::Result<()> {
    let sock = icmp::raw_socket()?;
    setsockopt(&sock, sockopt::Ipv4PacketInfo, &true)?;
    let to = SockaddrIn::from(SocketAddrV4::new(EXIT_ADDRESS, 0));
    let mut rng = rand_core::OsRng;
    let mut random = move || {
        let [a, b, ..] = rng.next_u32().to_le_bytes();
        u16::from_le_bytes([a, b])
    };
    let base = random();
    let mut seq = random();
    let mut buf = [0u8; 1500];
    loop {
        // Forward by a random step: never this round's number again soon, never guessable.
        seq = seq.wrapping_add(1 + (random() >> 1));
        let round = targets();
        let started = Instant::now();
        let mut answered: BTreeMap<u32, Answer> =
            round.keys().map(|vni| (*vni, Answer::Missed)).collect();
        let mut sent: BTreeMap<u16, Sent> = BTreeMap::new();
        // When each exit's probe left: its answer's round trip.
        let mut sent_at: BTreeMap<u32, Instant> = BTreeMap::new();
        for (vni, slot) in &round {
            // A link that is not there (yet) cannot be probed: a probe not answered.
            let Ok(ifindex) = nix::net::if_::if_nametoindex(format!("{LINK_PREFIX}{vni}").as_str())
            else {
                continue;
            };
            setsockopt(&sock, sockopt::Mark, &mark(*slot))?;
            // A send that fails (the link is going away) is a probe not answered.
            let _ = sendto(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                &echo_request(ident(base, *slot), seq),
                &to,
                MsgFlags::MSG_DONTWAIT,
            );
            sent.insert(ident(base, *slot), Sent { vni: *vni, ifindex });
            sent_at.insert(*vni, Instant::now());
        }
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
            match receive(&sock, &mut buf, flags) {
                Ok((n, ifindex)) => {
                    if let Some(vni) = answered_by(&buf[..n], ifindex, seq, &sent) {
                        answered.insert(vni, answer(&buf[..n]));
                        if let Some(at) = sent_at.get(&vni) {
                            rtt(at.elapsed());
                        }
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

/// Reads one packet; returns its length and the index of the interface it came in by (0 when
/// the kernel did not say).
fn receive(
    sock: &std::os::fd::OwnedFd,
    buf: &mut [u8],
    flags: MsgFlags,
) -> nix::Result<(usize, u32)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(nix::libc::in_pktinfo);
    let msg = recvmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(sock),
        &mut iov,
        Some(&mut space),
        flags,
    )?;
    let ifindex = msg
        .cmsgs()?
        .find_map(|c| match c {
            ControlMessageOwned::Ipv4PacketInfo(info) => u32::try_from(info.ipi_ifindex).ok(),
            _ => None,
        })
        .unwrap_or(0);
    Ok((msg.bytes, ifindex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_the_exits_only_from_their_inner_address() {
        let mut reply = vec![0x45u8; 20];
        reply.extend(echo_request(ident(0xfff0, 1), 7));
        reply[20] = 0;
        assert!(!from_exit(&reply));
        reply[12..16].copy_from_slice(&EXIT_ADDRESS.octets());
        assert!(from_exit(&reply));
        assert_eq!(echo_reply(&reply), Some((ident(0xfff0, 1), 7)));
        assert_eq!(answer(&reply), Answer::Up { ipv6: false });
        reply[1] = DRAINING_DSCP << 2;
        assert_eq!(answer(&reply), Answer::Draining);
        reply[1] = IPV6_DSCP << 2;
        assert_eq!(answer(&reply), Answer::Up { ipv6: true });
        reply[1] = 0x01; // ECN bits alone say nothing
        assert_eq!(answer(&reply), Answer::Up { ipv6: false });
    }

    #[test]
    fn an_answer_counts_only_by_its_exits_link_with_this_rounds_identifier_and_sequence() {
        let reply = |from: std::net::Ipv4Addr, id: u16, seq: u16| {
            let mut packet = vec![0x45u8; 20];
            packet[12..16].copy_from_slice(&from.octets());
            packet.extend(echo_request(id, seq));
            packet[20] = 0;
            packet
        };
        let base = 0xfffe; // identifiers wrap
        let sent = BTreeMap::from([
            (
                ident(base, 0),
                Sent {
                    vni: 4096,
                    ifindex: 7,
                },
            ),
            (
                ident(base, 1),
                Sent {
                    vni: 4097,
                    ifindex: 8,
                },
            ),
        ]);
        let good = reply(EXIT_ADDRESS, ident(base, 1), 300);
        assert_eq!(answered_by(&good, 8, 300, &sent), Some(4097));
        assert_eq!(
            answered_by(&good, 7, 300, &sent),
            None,
            "by another exit's link"
        );
        assert_eq!(
            answered_by(&good, 3, 300, &sent),
            None,
            "by the pod network"
        );
        assert_eq!(answered_by(&good, 8, 301, &sent), None, "another round's");
        let other = reply(EXIT_ADDRESS, ident(base, 2), 300);
        assert_eq!(answered_by(&other, 8, 300, &sent), None, "no such probe");
        let stranger = reply(std::net::Ipv4Addr::new(10, 0, 0, 9), ident(base, 1), 300);
        assert_eq!(answered_by(&stranger, 8, 300, &sent), None);
    }
}
