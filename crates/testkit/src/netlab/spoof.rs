//! Packets a hostile pod forges, for the tests that show they get nowhere: VXLAN frames into an
//! exit, sent from a pod's network namespace with its own source address or a spoofed one.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)] // a test harness

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn};

/// A VXLAN payload with identifier `vni` carrying an Ethernet frame to `mac` with an IPv4 UDP
/// packet from `from` to `to`:`port`: what a pod puts in a datagram to an exit's VXLAN port.
pub fn vxlan_frame(vni: u32, mac: [u8; 6], from: [u8; 4], to: [u8; 4], port: u16) -> Vec<u8> {
    let mut frame = vec![0x08, 0, 0, 0];
    frame.extend(&vni.to_be_bytes()[1..]);
    frame.push(0);
    frame.extend(mac);
    frame.extend([0x02, 0xbb, 0, 0, 0, 1, 0x08, 0x00]);
    let payload = b"through someone else's tunnel";
    let length = u16::try_from(20 + 8 + payload.len()).unwrap();
    let mut header = vec![0x45, 0];
    header.extend(length.to_be_bytes());
    header.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    header.extend(from);
    header.extend(to);
    let sum = cloak_dataplane::icmp::checksum(&header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend(header);
    frame.extend(40_000u16.to_be_bytes());
    frame.extend(port.to_be_bytes());
    frame.extend((length - 20).to_be_bytes());
    frame.extend([0, 0]);
    frame.extend(payload);
    frame
}

/// A raw IPv4 socket whose packets carry the header the caller writes (`IPPROTO_RAW`): any
/// source address, as a pod with `NET_RAW` can send.
pub fn raw_socket() -> std::os::fd::OwnedFd {
    nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Raw,
    )
    .unwrap()
}

/// Sends `payload` five times to `to`:4790 from the network namespace at `netns` (a path), with
/// the kernel's source address, or, with `spoofed`, from that address on a raw socket (as a pod
/// with `NET_RAW` can).
pub fn send_vxlan(netns: &str, to: Ipv4Addr, spoofed: Option<Ipv4Addr>, payload: Vec<u8>) {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let Some(from) = spoofed else {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_broadcast(true).unwrap();
            for _ in 0..5 {
                sock.send_to(&payload, (to, 4790)).unwrap();
            }
            return;
        };
        let sock = raw_socket();
        let length = u16::try_from(20 + 8 + payload.len()).unwrap();
        let mut packet = vec![0x45, 0];
        packet.extend(length.to_be_bytes());
        packet.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
        packet.extend(from.octets());
        packet.extend(to.octets());
        packet.extend(4790u16.to_be_bytes());
        packet.extend(4790u16.to_be_bytes());
        packet.extend((length - 20).to_be_bytes());
        packet.extend([0, 0]);
        packet.extend(payload);
        let dest = SockaddrIn::from(SocketAddrV4::new(to, 0));
        for _ in 0..5 {
            nix::sys::socket::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                &packet,
                &dest,
                MsgFlags::empty(),
            )
            .unwrap();
        }
    })
    .join()
    .unwrap();
}
