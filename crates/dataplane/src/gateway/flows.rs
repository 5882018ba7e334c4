//! The flows a draining exit still carries, watched over `conntrack` listings ([`FlowWatch`]).

use super::{
    EXIT_ADDRESS, Error, IpAddr, IpNet, TRANSIT_RANGE, TRANSIT_RANGE6, has_ipv6, run, twin,
};

/// The IPv4 and IPv6 flows of the exit's namespace (the calling thread's), as `conntrack -L`
/// lists them: what a draining exit watches ([`FlowWatch`]).
pub fn list_flows() -> Result<String, Error> {
    let mut flows = run("conntrack", &["-L", "-f", "ipv4"], None)?;
    if has_ipv6() {
        flows.push_str(&run("conntrack", &["-L", "-f", "ipv6"], None)?);
    }
    Ok(flows)
}

/// The clients' flows a draining exit still carries, watched over successive `conntrack -L`
/// listings: a flow is in use while it carried a packet within the quiet time. A packet shows
/// as a higher packet count (the exit turns conntrack accounting on) or, without counts, as its
/// remaining timeout moving other than by the clock. A flow first seen counts as just used.
#[derive(Debug, Default)]
pub struct FlowWatch {
    flows: std::collections::HashMap<String, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    packets: u64,
    remaining: u64,
    at: std::time::Instant,
    active: std::time::Instant,
}

impl FlowWatch {
    /// Takes in a listing made at `now`; returns how many client flows carried a packet within
    /// `quiet` of it. Client flows: from the nodes' transit range (either family), not to the
    /// exit's own DNS forwarder; TCP not yet closed (TIME_WAIT and CLOSE end by themselves) and
    /// UDP seen both ways.
    pub fn update(
        &mut self,
        listing: &str,
        now: std::time::Instant,
        quiet: std::time::Duration,
    ) -> usize {
        let transit: [IpNet; 2] = [TRANSIT_RANGE, TRANSIT_RANGE6].map(|range| {
            range
                .parse()
                .unwrap_or(IpNet::V4(ipnet::Ipv4Net::default()))
        });
        let exit = [IpAddr::V4(EXIT_ADDRESS), IpAddr::V6(twin(EXIT_ADDRESS))];
        let mut flows = std::collections::HashMap::new();
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let first = |key: &str| words.iter().find_map(|w| w.strip_prefix(key));
            let address = |key: &str| first(key).and_then(|v| v.parse::<IpAddr>().ok());
            let from_a_client = address("src=")
                .is_some_and(|a| transit.iter().any(|t| t.contains(&a)))
                && address("dst=").is_some_and(|a| !exit.contains(&a));
            let carried = match words.first() {
                Some(&"tcp") => !matches!(words.get(3), Some(&("TIME_WAIT" | "CLOSE"))),
                Some(&"udp") => words.contains(&"[ASSURED]"),
                _ => false,
            };
            if !from_a_client || !carried {
                continue;
            }
            let key = format!(
                "{} {} {} {} {}",
                words[0],
                first("src=").unwrap_or_default(),
                first("dst=").unwrap_or_default(),
                first("sport=").unwrap_or_default(),
                first("dport=").unwrap_or_default(),
            );
            let packets = words
                .iter()
                .filter_map(|w| w.strip_prefix("packets=")?.parse::<u64>().ok())
                .sum();
            let remaining = words
                .get(2)
                .and_then(|w| w.parse().ok())
                .unwrap_or_default();
            let active = match self.flows.get(&key) {
                None => now,
                Some(was) => {
                    let elapsed = now.saturating_duration_since(was.at).as_secs();
                    let moved = remaining > was.remaining
                        || remaining + elapsed + 1 < was.remaining
                        || packets > was.packets;
                    if moved { now } else { was.active }
                }
            };
            flows.insert(
                key,
                Seen {
                    packets,
                    remaining,
                    at: now,
                    active,
                },
            );
        }
        self.flows = flows;
        self.flows
            .values()
            .filter(|f| now.saturating_duration_since(f.active) < quiet)
            .count()
    }
}
