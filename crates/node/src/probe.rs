//! Health probes to the exits, through their links: one ICMP echo per exit per round, sent with
//! the exit's mark so it is routed into that exit's link, answered by the exit only while its
//! tunnel passes its own probe (`dataplane::gateway::ExitPlan`). Every exit answers from the same
//! inner address, so replies are told apart by their echo identifier.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use cloak_dataplane::gateway::{EXIT_ADDRESS, mark};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recv, sendto,
    setsockopt, socket, sockopt,
};

/// The echo identifier of the probes to exit slot `slot`.
fn ident(slot: u8) -> u16 {
    0xc100 | u16::from(slot)
}

/// An ICMP echo request (type 8) with its checksum.
pub(crate) fn echo_request(id: u16, seq: u16) -> [u8; 16] {
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
pub(crate) fn checksum(data: &[u8]) -> u16 {
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

/// Whether a raw IPv4 packet comes from the exits' inner address.
fn from_exit(packet: &[u8]) -> bool {
    packet.get(12..16) == Some(&EXIT_ADDRESS.octets()[..])
}

/// The identifier and sequence of an echo reply in a raw IPv4 packet, if it is one.
pub(crate) fn echo_reply(packet: &[u8]) -> Option<(u16, u16)> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(header..header + 8)?;
    (icmp[0] == 0).then(|| {
        (
            u16::from_be_bytes([icmp[4], icmp[5]]),
            u16::from_be_bytes([icmp[6], icmp[7]]),
        )
    })
}

/// Probes the exits on the calling thread (which must be in the node's network namespace):
/// each round, one echo to each of `targets()` (VNI → slot), then `report(vni → answered)` once
/// the round's `interval` is over. Ends when `report` returns false.
pub fn run(
    interval: Duration,
    targets: &dyn Fn() -> BTreeMap<u32, u8>,
    report: &mut dyn FnMut(BTreeMap<u32, bool>) -> bool,
) -> std::io::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )?;
    let to = SockaddrIn::from(SocketAddrV4::new(EXIT_ADDRESS, 0));
    let mut seq: u16 = 0;
    let mut buf = [0u8; 1500];
    loop {
        seq = seq.wrapping_add(1);
        let round = targets();
        let started = Instant::now();
        let mut answered: BTreeMap<u32, bool> = round.keys().map(|vni| (*vni, false)).collect();
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
                setsockopt(&sock, sockopt::ReceiveTimeout, &timeval(left))?;
                MsgFlags::empty()
            };
            match recv(std::os::fd::AsRawFd::as_raw_fd(&sock), &mut buf, flags) {
                Ok(n) => {
                    if from_exit(&buf[..n])
                        && let Some((id, s)) = echo_reply(&buf[..n])
                        && s == seq
                        && let Some(vni) = by_ident.get(&id)
                    {
                        answered.insert(*vni, true);
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

fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(
        nix::libc::time_t::try_from(d.as_secs()).unwrap_or(nix::libc::time_t::MAX),
        // At least a microsecond: a zero timeout means "block forever".
        nix::libc::suseconds_t::from(d.subsec_micros().max(1)),
    )
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
        assert!(!from_exit(&reply));
        reply[12..16].copy_from_slice(&EXIT_ADDRESS.octets());
        assert!(from_exit(&reply));
        reply[20] = 3; // destination unreachable
        assert_eq!(echo_reply(&reply), None);
    }
}
