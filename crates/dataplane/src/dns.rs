//! The one narrow path by which VPN server names are resolved while the kill switch is closed:
//! A and AAAA queries over UDP to one named server, from a socket carrying the data plane's
//! fwmark.
//! The firewall lets such packets out only while the agent resolves (`FirewallPolicy::resolver`),
//! and only to that server; every other DNS packet stays dropped.
//!
//! The wire format is built and read here (RFC 1035 §4): a query of one question, answers read
//! for their A/AAAA records, names in answers skipped (a compression pointer ends a name).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// A query for `name`'s records of `qtype`, with recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(name.len() + 18);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..=63).contains(l))
            .ok_or_else(|| format!("{name:?} is not a host name"))?;
        out.push(len);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

/// The addresses in the answer to query `id`; an error for a failed answer (NXDOMAIN,
/// SERVFAIL, ...) or a malformed one.
pub fn addresses(answer: &[u8], id: u16) -> Result<Vec<IpAddr>, String> {
    let short = || "truncated answer".to_owned();
    let u16_at = |i: usize| -> Result<u16, String> {
        answer
            .get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(short)
    };
    if u16_at(0)? != id {
        return Err("answer to another query".into());
    }
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return Err("not an answer".into());
    }
    match flags & 0x000f {
        0 => {}
        3 => return Err("no such name (NXDOMAIN)".into()),
        code => return Err(format!("the server answered with error code {code}")),
    }
    let (questions, records) = (u16_at(4)?, u16_at(6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(answer, at).ok_or_else(short)? + 4;
    }
    let mut found = Vec::new();
    for _ in 0..records {
        at = skip_name(answer, at).ok_or_else(short)?;
        let (rtype, len) = (u16_at(at)?, usize::from(u16_at(at + 8)?));
        let data = answer.get(at + 10..at + 10 + len).ok_or_else(short)?;
        match (rtype, <[u8; 4]>::try_from(data), <[u8; 16]>::try_from(data)) {
            (TYPE_A, Ok(v4), _) => found.push(IpAddr::V4(Ipv4Addr::from(v4))),
            (TYPE_AAAA, _, Ok(v6)) => found.push(IpAddr::V6(Ipv6Addr::from(v6))),
            _ => {} // CNAMEs and the like: their targets' records follow in the same answer
        }
        at += 10 + len;
    }
    Ok(found)
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
    None
}

/// Resolves `name` (A, then AAAA) at `server`, from a socket marked `mark` (see the module
/// doc), within `timeout` overall. Addresses in the order A, AAAA; an error when neither query
/// gave any, naming why.
pub fn resolve(
    server: SocketAddr,
    name: &str,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<Vec<IpAddr>, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).map_err(|e| format!("a DNS socket: {e}"))?;
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(|e| format!("marking the DNS socket: {e}"))?;
    }
    socket
        .connect(server)
        .map_err(|e| format!("connecting to {server}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut found = Vec::new();
    let mut failure = None;
    // Per query id: random enough that a stray answer is not taken for ours.
    let base = u16::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() & 0xffff),
    )
    .unwrap_or(0);
    for (i, qtype) in [TYPE_A, TYPE_AAAA].into_iter().enumerate() {
        let id = base.wrapping_add(u16::try_from(i).unwrap_or(0));
        match exchange(&socket, &query(id, name, qtype)?, id, deadline) {
            Ok(addrs) => found.extend(addrs),
            Err(e) => failure = Some(e),
        }
    }
    if found.is_empty() {
        Err(failure.unwrap_or_else(|| "no A or AAAA record".into()))
    } else {
        Ok(found)
    }
}

/// Sends `question` (resending once a second) until an answer to `id` arrives or `deadline`.
fn exchange(
    socket: &UdpSocket,
    question: &[u8],
    id: u16,
    deadline: Instant,
) -> Result<Vec<IpAddr>, String> {
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no answer in time".into());
        }
        socket
            .send(question)
            .map_err(|e| format!("sending the query: {e}"))?;
        socket
            .set_read_timeout(Some(left.min(Duration::from_secs(1))))
            .map_err(|e| e.to_string())?;
        match socket.recv(&mut buf) {
            Ok(n) => match addresses(&buf[..n], id) {
                Err(e) if e == "answer to another query" => {}
                answer => return answer,
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as a server sends it: the question echoed, then `records` (type, data), each
    /// named by a compression pointer to the question's name.
    fn answer(id: u16, rcode: u8, qtype: u16, records: &[(u16, &[u8])]) -> Vec<u8> {
        let q = query(id, "vpn.example.com", qtype).unwrap();
        let mut out = q.clone();
        out[2] = 0x81;
        out[3] = 0x80 | rcode;
        out[7] = u8::try_from(records.len()).unwrap();
        for (rtype, data) in records {
            out.extend_from_slice(&[0xc0, 12]);
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            out.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn a_query_names_its_labels() {
        let q = query(7, "vpn.example.com", TYPE_A).unwrap();
        assert_eq!(&q[..4], &[0, 7, 1, 0]);
        assert_eq!(&q[12..], b"\x03vpn\x07example\x03com\x00\x00\x01\x00\x01");
        assert!(query(1, "a..b", TYPE_A).is_err());
    }

    #[test]
    fn answers_give_their_addresses_and_skip_other_records() {
        let cname = b"\x03cdn\xc0\x10";
        let got = addresses(
            &answer(
                9,
                0,
                TYPE_A,
                &[
                    (5, cname),
                    (TYPE_A, &[192, 0, 2, 2]),
                    (TYPE_A, &[192, 0, 2, 3]),
                ],
            ),
            9,
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "192.0.2.2".parse::<IpAddr>().unwrap(),
                "192.0.2.3".parse().unwrap()
            ]
        );
        let v6 = addresses(
            &answer(
                9,
                0,
                TYPE_AAAA,
                &[(TYPE_AAAA, &"fd02::2".parse::<Ipv6Addr>().unwrap().octets())],
            ),
            9,
        )
        .unwrap();
        assert_eq!(v6, ["fd02::2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn failed_foreign_and_malformed_answers_are_errors() {
        assert_eq!(
            addresses(&answer(9, 3, TYPE_A, &[]), 9),
            Err("no such name (NXDOMAIN)".into())
        );
        assert_eq!(
            addresses(&answer(8, 0, TYPE_A, &[]), 9),
            Err("answer to another query".into())
        );
        let whole = answer(9, 0, TYPE_A, &[(TYPE_A, &[192, 0, 2, 2])]);
        assert!(addresses(&whole[..whole.len() - 2], 9).is_err());
        assert!(
            addresses(&query(9, "x", TYPE_A).unwrap(), 9).is_err(),
            "a query is no answer"
        );
    }
}
