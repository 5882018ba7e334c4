//! NAT-PMP (RFC 6886), pure: the messages both ways, the retransmission schedule, when a mapping
//! is renewed, and the epoch check that tells a gateway which lost its mappings. What ProtonVPN
//! (and a home router) speaks; the exit's agent asks its tunnel's gateway with it, and the lab's
//! fake providers answer with it.
//!
//! A client sends requests to the gateway's UDP port 5351:
//! - external address: `[0, 0]`; answer `[0, 128, result:u16, epoch:u32, address:4]`;
//! - a mapping: `[0, op, 0:u16, internal:u16, suggested external:u16, lifetime:u32]`, `op` 1 UDP
//!   or 2 TCP; answer `[0, 128 + op, result:u16, epoch:u32, internal:u16, external:u16,
//!   lifetime:u32]`. Lifetime 0 deletes the mapping (with suggested external 0).
//!
//! All numbers are big-endian.

use std::{net::Ipv4Addr, time::Duration};

/// The gateway's port.
pub const PORT: u16 = 5351;
/// The longest lifetime a client believes: a gateway granting more (up to `u32::MAX`, never
/// renewed) is renewed as if it had granted this (the RFC's recommended 7200 s).
pub const MAX_LIFETIME: u32 = 7200;
/// The lifetime a client asks for (the RFC recommends 7200 s; ProtonVPN grants 60 s whatever
/// is asked, and gluetun asks 60 s).
pub const LIFETIME: u32 = 60;
/// The first retransmission waits this long, each next one twice as long (RFC 6886 §3.1).
pub const FIRST_WAIT: Duration = Duration::from_millis(250);
/// At most this many tries (the RFC's nine: 250 ms to 64 s).
pub const TRIES: u32 = 9;

/// A mapping's transport protocol.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    /// The request's opcode.
    pub fn opcode(self) -> u8 {
        match self {
            Self::Udp => 1,
            Self::Tcp => 2,
        }
    }

    fn from_opcode(op: u8) -> Option<Self> {
        match op {
            1 => Some(Self::Udp),
            2 => Some(Self::Tcp),
            _ => None,
        }
    }

    /// `tcp` or `udp`, as nftables writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// A gateway's result code (RFC 6886 §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultCode {
    Success,
    UnsupportedVersion,
    /// Refused: the gateway does not allow mappings (or not this one).
    NotAuthorized,
    NetworkFailure,
    OutOfResources,
    UnsupportedOpcode,
    Other(u16),
}

impl ResultCode {
    pub fn from_u16(code: u16) -> Self {
        match code {
            0 => Self::Success,
            1 => Self::UnsupportedVersion,
            2 => Self::NotAuthorized,
            3 => Self::NetworkFailure,
            4 => Self::OutOfResources,
            5 => Self::UnsupportedOpcode,
            other => Self::Other(other),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            Self::Success => 0,
            Self::UnsupportedVersion => 1,
            Self::NotAuthorized => 2,
            Self::NetworkFailure => 3,
            Self::OutOfResources => 4,
            Self::UnsupportedOpcode => 5,
            Self::Other(other) => other,
        }
    }
}

impl std::fmt::Display for ResultCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Success => f.write_str("success"),
            Self::UnsupportedVersion => f.write_str("unsupported version"),
            Self::NotAuthorized => f.write_str("not authorized (refused)"),
            Self::NetworkFailure => f.write_str("network failure"),
            Self::OutOfResources => f.write_str("out of resources"),
            Self::UnsupportedOpcode => f.write_str("unsupported opcode"),
            Self::Other(code) => write!(f, "result code {code}"),
        }
    }
}

/// A request, as a gateway reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Address,
    Map(Map),
}

/// A mapping request: `internal` port of the client, the `external` port it suggests (0: any),
/// for `lifetime` seconds (0: delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Map {
    pub protocol: Protocol,
    pub internal: u16,
    pub external: u16,
    pub lifetime: u32,
}

impl Map {
    pub fn encode(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[1] = self.protocol.opcode();
        b[4..6].copy_from_slice(&self.internal.to_be_bytes());
        b[6..8].copy_from_slice(&self.external.to_be_bytes());
        b[8..12].copy_from_slice(&self.lifetime.to_be_bytes());
        b
    }
}

/// The external-address request.
pub const ADDRESS_REQUEST: [u8; 2] = [0, 0];

/// Why a datagram is not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes is too short for a NAT-PMP message")]
    Short(usize),
    #[error("NAT-PMP version {0} (only 0 is spoken)")]
    Version(u8),
    #[error("opcode {0} is not one this side reads")]
    Opcode(u8),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Request {
    /// Reads a client's datagram (a gateway's side).
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < 2 {
            return Err(DecodeError::Short(b.len()));
        }
        if b[0] != 0 {
            return Err(DecodeError::Version(b[0]));
        }
        if b[1] == 0 {
            return Ok(Self::Address);
        }
        let protocol = Protocol::from_opcode(b[1]).ok_or(DecodeError::Opcode(b[1]))?;
        if b.len() < 12 {
            return Err(DecodeError::Short(b.len()));
        }
        Ok(Self::Map(Map {
            protocol,
            internal: be16(b, 4),
            external: be16(b, 6),
            lifetime: be32(b, 8),
        }))
    }
}

/// A gateway's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Address {
        result: ResultCode,
        epoch: u32,
        address: Ipv4Addr,
    },
    Map {
        protocol: Protocol,
        result: ResultCode,
        epoch: u32,
        internal: u16,
        external: u16,
        lifetime: u32,
    },
}

impl Response {
    pub fn epoch(&self) -> u32 {
        match self {
            Self::Address { epoch, .. } | Self::Map { epoch, .. } => *epoch,
        }
    }

    pub fn result(&self) -> ResultCode {
        match self {
            Self::Address { result, .. } | Self::Map { result, .. } => *result,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8];
        match self {
            Self::Address {
                result,
                epoch,
                address,
            } => {
                b.push(128);
                b.extend(result.as_u16().to_be_bytes());
                b.extend(epoch.to_be_bytes());
                b.extend(address.octets());
            }
            Self::Map {
                protocol,
                result,
                epoch,
                internal,
                external,
                lifetime,
            } => {
                b.push(128 + protocol.opcode());
                b.extend(result.as_u16().to_be_bytes());
                b.extend(epoch.to_be_bytes());
                b.extend(internal.to_be_bytes());
                b.extend(external.to_be_bytes());
                b.extend(lifetime.to_be_bytes());
            }
        }
        b
    }

    /// Reads a gateway's datagram (a client's side). An error answer may be as short as its
    /// header (RFC 6886 §3.5: 8 bytes); it is read with zeros for what it leaves out.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < 8 {
            return Err(DecodeError::Short(b.len()));
        }
        if b[0] != 0 {
            return Err(DecodeError::Version(b[0]));
        }
        let result = ResultCode::from_u16(be16(b, 2));
        let epoch = be32(b, 4);
        let mut full = [0u8; 16];
        full[..b.len().min(16)].copy_from_slice(&b[..b.len().min(16)]);
        if result == ResultCode::Success {
            let need = if b[1] == 128 { 12 } else { 16 };
            if b.len() < need {
                return Err(DecodeError::Short(b.len()));
            }
        }
        match b[1] {
            128 => Ok(Self::Address {
                result,
                epoch,
                address: Ipv4Addr::new(full[8], full[9], full[10], full[11]),
            }),
            op if op > 128 => {
                let protocol = Protocol::from_opcode(op - 128).ok_or(DecodeError::Opcode(op))?;
                Ok(Self::Map {
                    protocol,
                    result,
                    epoch,
                    internal: be16(&full, 8),
                    external: be16(&full, 10),
                    lifetime: be32(&full, 12),
                })
            }
            op => Err(DecodeError::Opcode(op)),
        }
    }

    /// Whether this answers `request` (its opcode and, for a mapping, its internal port).
    pub fn answers(&self, request: &Request) -> bool {
        match (self, request) {
            (Self::Address { .. }, Request::Address) => true,
            (
                Self::Map {
                    protocol, internal, ..
                },
                Request::Map(m),
            ) => {
                // A short error answer (its header alone) carries no internal port: read as 0.
                *protocol == m.protocol
                    && (*internal == m.internal
                        || (*internal == 0 && self.result() != ResultCode::Success))
            }
            _ => false,
        }
    }
}

/// How long to wait for an answer after each try: 250 ms, then twice as long each time, at most
/// [`TRIES`] tries, and never past `limit` in all (a renewal must end before the lease does).
pub fn waits(limit: Duration) -> Vec<Duration> {
    let mut waits = Vec::new();
    let (mut wait, mut total) = (FIRST_WAIT, Duration::ZERO);
    for _ in 0..TRIES {
        if total >= limit {
            break;
        }
        let this = wait.min(limit.saturating_sub(total));
        waits.push(this);
        total += this;
        wait *= 2;
    }
    waits
}

/// When a mapping granted for `lifetime` seconds is renewed: at half its lifetime (RFC 6886
/// §3.3), and at least a second later, so a gateway granting 0-2 s is not asked in a loop.
pub fn renew_after(lifetime: u32) -> Duration {
    Duration::from_millis(u64::from(lifetime) * 500).max(Duration::from_secs(1))
}

/// The gateway's epoch as last seen: the seconds since its mappings were last lost, and when
/// it was seen (seconds on the client's clock).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Epoch {
    last: Option<(u32, f64)>,
}

impl Epoch {
    /// Records an answer's epoch seen at `now` (seconds on any monotonic clock); true when
    /// the gateway lost its mappings since the last answer: its epoch went back, or moved on by
    /// less than the client's clock less an allowance for drift (RFC 6886 §3.6: the epoch must
    /// have advanced by at least 7/8 of the elapsed time, less 2 s). The client must then
    /// re-create every mapping at once.
    pub fn observe(&mut self, epoch: u32, now: f64) -> bool {
        let reset = self.last.is_some_and(|(last, at)| {
            let elapsed = (now - at).max(0.0);
            f64::from(epoch) + 2.0 < f64::from(last) + elapsed * 7.0 / 8.0
        });
        self.last = Some((epoch, now));
        reset
    }

    /// The last epoch seen.
    pub fn last(&self) -> Option<u32> {
        self.last.map(|(e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_read_back_as_written_in_rfc_6886s_layout() {
        let map = Map {
            protocol: Protocol::Tcp,
            internal: 6881,
            external: 40000,
            lifetime: 60,
        };
        let bytes = map.encode();
        assert_eq!(bytes, [0, 2, 0, 0, 0x1a, 0xe1, 0x9c, 0x40, 0, 0, 0, 60]);
        assert_eq!(Request::decode(&bytes), Ok(Request::Map(map)));
        assert_eq!(Request::decode(&ADDRESS_REQUEST), Ok(Request::Address));
        assert_eq!(Request::decode(&[1, 0]), Err(DecodeError::Version(1)));
        assert_eq!(Request::decode(&[0, 2, 0]), Err(DecodeError::Short(3)));
        assert_eq!(Request::decode(&[0, 9]), Err(DecodeError::Opcode(9)));

        let answer = Response::Map {
            protocol: Protocol::Udp,
            result: ResultCode::Success,
            epoch: 1234,
            internal: 6881,
            external: 51413,
            lifetime: 60,
        };
        let bytes = answer.encode();
        assert_eq!(bytes.len(), 16);
        assert_eq!(bytes[1], 129);
        assert_eq!(Response::decode(&bytes), Ok(answer));
        let address = Response::Address {
            result: ResultCode::Success,
            epoch: 7,
            address: Ipv4Addr::new(198, 51, 100, 11),
        };
        assert_eq!(address.encode().len(), 12);
        assert_eq!(Response::decode(&address.encode()), Ok(address));
        // A refusal may be only its header.
        let refused = Response::decode(&[0, 130, 0, 2, 0, 0, 0, 9]).unwrap();
        assert_eq!(refused.result(), ResultCode::NotAuthorized);
        assert_eq!(refused.epoch(), 9);
        assert!(refused.answers(&Request::Map(Map {
            protocol: Protocol::Tcp,
            internal: 1,
            external: 0,
            lifetime: 60
        })));
        // A success must be whole.
        assert_eq!(
            Response::decode(&[0, 130, 0, 0, 0, 0, 0, 9]),
            Err(DecodeError::Short(8))
        );
    }

    #[test]
    fn an_answer_is_matched_to_its_request_by_opcode_and_internal_port() {
        let tcp = Request::Map(Map {
            protocol: Protocol::Tcp,
            internal: 6881,
            external: 0,
            lifetime: 60,
        });
        let answer = |protocol, internal| Response::Map {
            protocol,
            result: ResultCode::Success,
            epoch: 1,
            internal,
            external: 40000,
            lifetime: 60,
        };
        assert!(answer(Protocol::Tcp, 6881).answers(&tcp));
        assert!(!answer(Protocol::Udp, 6881).answers(&tcp));
        assert!(!answer(Protocol::Tcp, 6882).answers(&tcp));
        assert!(!answer(Protocol::Tcp, 6881).answers(&Request::Address));
    }

    #[test]
    fn retransmissions_double_from_250_ms_and_stop_at_the_limit() {
        let all = waits(Duration::from_mins(5));
        assert_eq!(all.len(), 9);
        assert_eq!(all[0], Duration::from_millis(250));
        assert_eq!(all[1], Duration::from_millis(500));
        assert_eq!(all[8], Duration::from_secs(64));
        // Bounded by what is left of the lease.
        let short = waits(Duration::from_secs(2));
        assert_eq!(
            short,
            [250, 500, 1000, 250].map(Duration::from_millis).to_vec()
        );
        assert!(waits(Duration::ZERO).is_empty());
    }

    #[test]
    fn a_mapping_is_renewed_at_half_its_lifetime() {
        assert_eq!(renew_after(60), Duration::from_secs(30));
        assert_eq!(renew_after(7200), Duration::from_hours(1));
        assert_eq!(renew_after(1), Duration::from_secs(1));
        assert_eq!(renew_after(0), Duration::from_secs(1));
    }

    #[test]
    fn an_epoch_that_goes_back_or_lags_the_clock_is_a_reset() {
        let mut epoch = Epoch::default();
        assert!(!epoch.observe(100, 0.0), "the first answer is no reset");
        assert!(!epoch.observe(130, 30.0));
        // Drift allowed: 7/8 of 30 s less 2 s.
        assert!(!epoch.observe(155, 60.0));
        // Went back: the gateway restarted and lost its mappings.
        assert!(epoch.observe(3, 90.0));
        assert_eq!(epoch.last(), Some(3));
        // Stood still for a minute: also lost.
        assert!(epoch.observe(3, 150.0));
        assert!(!epoch.observe(60, 210.0));
    }
}
