//! Policy routing in the one table and the one rule cloak owns: every packet without the
//! tunnel's [`FWMARK`] looks up [`ROUTE_TABLE`], whose default route is the tunnel and whose
//! fallback is `unreachable` (so with the tunnel gone, sockets get an error at once instead of
//! their packets waiting on the firewall). The tunnel's own encrypted packets carry the mark and
//! use `main`, where the node's default route is. Bypass networks get a route in cloak's table
//! via whatever `main` uses for them.

use std::{
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use ipnet::IpNet;

use crate::{Error, Identifiers, ROUTE_TABLE, command::ip};

/// 4096: any metric above the tunnel's default (0); the fallback only answers when the tunnel's
/// route is gone.
const FALLBACK_METRIC: &str = "4096";

/// The routes and rule cloak wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSet {
    /// Interface the default route points at; `None` leaves only the `unreachable` fallback.
    pub tunnel: Option<String>,
    /// Route IPv6 into the tunnel too (otherwise IPv6 is unreachable).
    pub ipv6: bool,
    /// Networks routed outside the tunnel, the way `main` routes them.
    pub bypass: Vec<IpNet>,
}

impl fmt::Display for RouteSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {ROUTE_TABLE} for unmarked packets: ")?;
        match &self.tunnel {
            Some(t) => write!(
                f,
                "default dev {t}{}",
                if self.ipv6 {
                    " (ipv4+ipv6)"
                } else {
                    " (ipv6 unreachable)"
                }
            )?,
            None => f.write_str("unreachable")?,
        }
        if !self.bypass.is_empty() {
            let nets: Vec<String> = self.bypass.iter().map(ToString::to_string).collect();
            write!(f, ", bypass [{}]", nets.join(", "))?;
        }
        Ok(())
    }
}

/// Applies route sets to the kernel objects cloak owns.
pub trait Routes: Send {
    fn apply(&mut self, routes: &RouteSet) -> Result<(), Error>;
    /// Removes cloak's rule and flushes cloak's table, nothing else.
    fn reset(&mut self) -> Result<(), Error>;
}

/// The Linux implementation (`ip route`, `ip rule`), on the table, rule and mark `ids` names.
#[derive(Debug, Default)]
pub struct LinuxRoutes {
    pub ids: Identifiers,
}

impl Routes for LinuxRoutes {
    fn apply(&mut self, routes: &RouteSet) -> Result<(), Error> {
        let table = self.ids.route_table.to_string();
        let prio = self.ids.rule_priority.to_string();
        let mark = self.ids.fwmark.to_string();
        // Bypass next hops are read from main before anything changes.
        let mut bypass = Vec::new();
        for net in &routes.bypass {
            bypass.push((net, main_route(net.addr(), self.ids.fwmark)?));
        }
        for family in ["-4", "-6"] {
            ip(&[
                family,
                "route",
                "replace",
                "unreachable",
                "default",
                "metric",
                FALLBACK_METRIC,
                "table",
                &table,
            ])?;
            let carry = family == "-4" || routes.ipv6;
            match (&routes.tunnel, carry) {
                (Some(tun), true) => {
                    ip(&[
                        family, "route", "replace", "default", "dev", tun, "table", &table,
                    ])?;
                }
                _ => {
                    let _ = ip(&[
                        family, "route", "del", "default", "metric", "0", "table", &table,
                    ]);
                }
            }
            if !has_rule(family, self.ids.rule_priority)? {
                ip(&[
                    family, "rule", "add", "not", "fwmark", &mark, "lookup", &table, "priority",
                    &prio,
                ])?;
            }
        }
        // Bypass routes: drop the ones no longer wanted, then replace the wanted ones.
        for family in ["-4", "-6"] {
            let listing = ip(&[family, "route", "show", "table", &table])?;
            for line in listing.lines() {
                let dst = line.split_whitespace().next().unwrap_or("");
                if matches!(dst, "default" | "unreachable" | "") {
                    continue;
                }
                if !routes
                    .bypass
                    .iter()
                    .any(|n| n.to_string() == dst || n.addr().to_string() == dst)
                {
                    let _ = ip(&[family, "route", "del", dst, "table", &table]);
                }
            }
        }
        for (net, hop) in bypass {
            let net = net.to_string();
            let mut args = vec!["route", "replace", net.as_str()];
            if let Some(via) = &hop.via {
                args.extend(["via", via.as_str()]);
            }
            args.extend(["dev", hop.dev.as_str(), "table", &table]);
            ip(&args)?;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Error> {
        let table = self.ids.route_table.to_string();
        let prio = self.ids.rule_priority.to_string();
        for family in ["-4", "-6"] {
            while has_rule(family, self.ids.rule_priority)? {
                ip(&[family, "rule", "del", "priority", &prio])?;
            }
            match ip(&[family, "route", "flush", "table", &table]) {
                Ok(_) => {}
                // An empty table does not exist as far as `ip` is concerned.
                Err(Error::Command { stderr, .. })
                    if stderr.contains("FIB table does not exist") || stderr.is_empty() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn has_rule(family: &str, priority: u32) -> Result<bool, Error> {
    let rules = ip(&[family, "rule", "show", "priority", &priority.to_string()])?;
    Ok(!rules.trim().is_empty())
}

struct Hop {
    via: Option<String>,
    dev: String,
}

/// How `main` reaches `addr` (asked with the mark, so cloak's own rule is skipped).
fn main_route(addr: IpAddr, fwmark: u32) -> Result<Hop, Error> {
    let out = ip(&[
        "route",
        "get",
        &addr.to_string(),
        "mark",
        &fwmark.to_string(),
    ])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .map(|s| (*s).to_owned())
    };
    Ok(Hop {
        via: after("via"),
        dev: after("dev").ok_or_else(|| {
            Error::Verify(format!(
                "no route to bypass network {addr} in the main table"
            ))
        })?,
    })
}

/// The in-memory fake: records every route set applied into a shared journal.
#[derive(Debug, Clone, Default)]
pub struct FakeRoutes {
    pub journal: Arc<Mutex<Vec<String>>>,
}

impl Routes for FakeRoutes {
    fn apply(&mut self, routes: &RouteSet) -> Result<(), Error> {
        if let Ok(mut j) = self.journal.lock() {
            j.push(format!("routes {routes}"));
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Error> {
        if let Ok(mut j) = self.journal.lock() {
            j.push("routes reset".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_set_reads_in_one_line() {
        let r = RouteSet {
            tunnel: Some("ck0".into()),
            ipv6: false,
            bypass: vec!["10.96.0.0/12".parse().unwrap()],
        };
        assert_eq!(
            r.to_string(),
            "table 17260 for unmarked packets: default dev ck0 (ipv6 unreachable), bypass [10.96.0.0/12]"
        );
        assert_eq!(
            RouteSet::default().to_string(),
            "table 17260 for unmarked packets: unreachable"
        );
    }
}
