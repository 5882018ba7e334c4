//! gluetun's server list (`internal/storage/servers.json` in gluetun's repository), pure: the
//! list parsed, a gluetun Secret's `SERVER_*` filters applied as gluetun applies them, and the
//! WireGuard servers left turned into the same tunnel configs a `<server>.conf` pool gives
//! (issue 27).
//!
//! The file is one JSON object: a `version`, then one section per provider (`"mullvad"`,
//! `"private internet access"`, ...), each `{version, timestamp, servers: [...]}`. A server has
//! `vpn` (`wireguard` or `openvpn`), `country`, `region`, `city`, `hostname`, `server_name`
//! (some providers), `ips`, `wgpubkey` (WireGuard), and provider-specific fields, which are
//! ignored. A section that cannot be read is reported and skipped, never fatal for the others;
//! unknown sections and fields are kept or ignored. The list holds only public data: the
//! private key comes from the provider's Secret and stays in the tunnel configs built here.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::{Value, value::RawValue};

use crate::{
    credentials::Server,
    secret::Secret,
    tunnel::{TunnelConfig, wireguard::WireguardConfig},
};

/// One server of a provider's section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedServer {
    /// `wireguard`, `openvpn`, or whatever a newer list says.
    pub vpn: String,
    pub country: String,
    pub region: String,
    pub city: String,
    pub hostname: String,
    /// `server_name` where the provider has one (ProtonVPN, Windscribe, AirVPN, ...).
    pub server_name: String,
    pub ips: Vec<IpAddr>,
    /// The server's WireGuard public key (base64), for WireGuard servers.
    pub wgpubkey: Option<String>,
}

/// A provider's section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub version: u64,
    /// When the section was last updated (Unix seconds).
    pub timestamp: i64,
    pub servers: Vec<ListedServer>,
}

/// The whole list: its sections by provider name, as the file spells them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerList {
    pub version: u64,
    pub sections: BTreeMap<String, Section>,
    /// Sections or servers that could not be read, in words (the rest is used).
    pub skipped: Vec<String>,
}

/// Why a list or a selection from it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("the server list is not JSON: {0}")]
    Json(String),
    #[error("the server list is not a JSON object of provider sections")]
    NotAnObject,
    #[error("the server list has no section for provider {0:?} (it has {1})")]
    NoSection(String, String),
    #[error("{filter}={value} matches none of the {left} servers left of provider {provider:?}")]
    NoMatch {
        provider: String,
        filter: &'static str,
        value: String,
        left: usize,
    },
    #[error("provider {0:?} lists no WireGuard server (only WireGuard lists are run natively)")]
    NoWireguard(String),
    #[error(
        "VPN_TYPE={0}: cloak runs a list's WireGuard servers only (OpenVPN through the list is not supported yet); remove serverList to have gluetun run this Secret"
    )]
    NotWireguard(String),
    #[error("the Secret has no VPN_SERVICE_PROVIDER naming a section of the server list")]
    NoProvider,
    #[error("{key}: {value:?} is not a port number")]
    Port { key: &'static str, value: String },
    #[error("server {server}: {problem}")]
    Server { server: String, problem: String },
    #[error(
        "{0} is not applied by cloak yet: unset it, or narrow the pool with SERVER_COUNTRIES, SERVER_REGIONS, SERVER_CITIES, SERVER_HOSTNAMES or SERVER_NAMES"
    )]
    Unsupported(&'static str),
    #[error(
        "none of the {0} servers of provider {1:?} left by the filters has an IPv4 address and a wgpubkey"
    )]
    NoUsable(usize, String),
}

fn text(server: &Value, key: &str) -> String {
    server
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn server(value: &Value) -> Result<ListedServer, String> {
    let hostname = text(value, "hostname");
    let vpn = text(value, "vpn");
    if hostname.is_empty() {
        return Err("a server without a hostname".into());
    }
    let ips = value
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .map(|ip| {
                    ip.as_str()
                        .and_then(|ip| ip.parse().ok())
                        .ok_or_else(|| format!("{hostname}: {ip} is not an IP address"))
                })
                .collect::<Result<Vec<IpAddr>, String>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(ListedServer {
        // gluetun's older lists leave `vpn` out for OpenVPN-only providers.
        vpn: if vpn.is_empty() {
            "openvpn".into()
        } else {
            vpn
        },
        country: text(value, "country"),
        region: text(value, "region"),
        city: text(value, "city"),
        server_name: text(value, "server_name"),
        wgpubkey: value
            .get("wgpubkey")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty())
            .map(str::to_owned),
        hostname,
        ips,
    })
}

/// A JSON object's members, each left as its text: walking a list this way never holds more
/// than one server as a tree (gluetun's whole file as one `Value` took about ten times its
/// size, which the allocator then kept).
type Members<'a> = BTreeMap<String, &'a RawValue>;

/// The list's top level: a JSON object, or [`ListError`].
fn members(json: &[u8]) -> Result<Members<'_>, ListError> {
    serde_json::from_slice::<Members<'_>>(json).map_err(|e| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok() {
            ListError::NotAnObject
        } else {
            ListError::Json(e.to_string())
        }
    })
}

/// A member read as `T`, when it is one.
fn member<T: serde::de::DeserializeOwned>(members: &Members<'_>, key: &str) -> Option<T> {
    serde_json::from_str(members.get(key)?.get()).ok()
}

/// Parses gluetun's server list. Only a file that is not a JSON object is an error; a section
/// or a server that cannot be read is listed in [`ServerList::skipped`] and left out.
pub fn parse(json: &[u8]) -> Result<ServerList, ListError> {
    let root = members(json)?;
    let mut list = ServerList {
        version: member(&root, "version").unwrap_or(0),
        ..ServerList::default()
    };
    for (name, section) in &root {
        if name == "version" {
            continue;
        }
        let section: Members<'_> = serde_json::from_str(section.get()).unwrap_or_default();
        let Some(servers) = section
            .get("servers")
            .and_then(|s| serde_json::from_str::<Vec<&RawValue>>(s.get()).ok())
        else {
            list.skipped
                .push(format!("section {name:?}: no servers list"));
            continue;
        };
        let mut read = Vec::with_capacity(servers.len());
        for s in servers {
            let parsed = serde_json::from_str::<Value>(s.get())
                .map_err(|e| e.to_string())
                .and_then(|s| server(&s));
            match parsed {
                Ok(s) => read.push(s),
                Err(e) => list.skipped.push(format!("section {name:?}: {e}")),
            }
        }
        list.sections.insert(
            name.clone(),
            Section {
                version: member(&section, "version").unwrap_or(0),
                timestamp: member(&section, "timestamp").unwrap_or(0),
                servers: read,
            },
        );
    }
    Ok(list)
}

/// Provider names as gluetun's variable and file spell them, compared without case, spaces,
/// hyphens or underscores (`private internet access`, `Private-Internet-Access`).
pub fn same_provider(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| !matches!(c, ' ' | '-' | '_'))
            .flat_map(char::to_lowercase)
            .collect()
    };
    norm(a) == norm(b)
}

/// The field of a server a filter reads.
type Field = fn(&ListedServer) -> &str;

/// The list trimmed to its `version` and `provider`'s section (as JSON): what fits in a
/// ConfigMap when the whole file (about 2 MB) does not.
pub fn section_only(json: &[u8], provider: &str) -> Result<Vec<u8>, ListError> {
    let root = members(json)?;
    let (name, section) = root
        .iter()
        .find(|(name, _)| *name != "version" && same_provider(name, provider))
        .ok_or_else(|| {
            let names: Vec<&str> = root
                .keys()
                .filter(|k| *k != "version")
                .map(String::as_str)
                .collect();
            ListError::NoSection(provider.to_owned(), names.join(", "))
        })?;
    let mut trimmed: BTreeMap<&str, &RawValue> = BTreeMap::from([(name.as_str(), *section)]);
    if let Some(version) = root.get("version") {
        trimmed.insert("version", version);
    }
    // gluetun's file is indented: the section's text is copied without the blanks between
    // tokens, or a section that fits a ConfigMap compact would not as it is written.
    let text = serde_json::to_string(&trimmed).map_err(|e| ListError::Json(e.to_string()))?;
    Ok(compact(&text).into_bytes())
}

/// JSON text without the blanks between its tokens (strings kept as they are).
fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    out
}

/// gluetun's filters, in the order they narrow the list: the variable, its older name (still
/// read by gluetun), and the server field it reads.
const FILTERS: [(&str, &str, Field); 5] = [
    ("SERVER_COUNTRIES", "COUNTRY", |s| &s.country),
    ("SERVER_REGIONS", "REGION", |s| &s.region),
    ("SERVER_CITIES", "CITY", |s| &s.city),
    ("SERVER_HOSTNAMES", "SERVER_HOSTNAME", |s| &s.hostname),
    ("SERVER_NAMES", "SERVER_NAME", |s| &s.server_name),
];

/// gluetun's other filters, which cloak does not apply yet: refused when set, rather than a pool
/// wider than the user asked for.
const UNSUPPORTED: [&str; 11] = [
    "ISP",
    "SERVER_NUMBER",
    "SERVER_CATEGORIES",
    "OWNED_ONLY",
    "FREE_ONLY",
    "PREMIUM_ONLY",
    "STREAM_ONLY",
    "MULTIHOP_ONLY",
    "SECURE_CORE_ONLY",
    "TOR_ONLY",
    "PORT_FORWARD_ONLY",
];

/// A variable that is set to something: not empty, and not one of gluetun's "off" words.
fn set(variables: &BTreeMap<String, String>, key: &str) -> Option<String> {
    variables
        .get(key)
        .map(|v| v.trim())
        .filter(|v| {
            !v.is_empty() && !matches!(v.to_ascii_lowercase().as_str(), "off" | "no" | "false")
        })
        .map(str::to_owned)
}

/// The provider's WireGuard servers that pass the Secret's `SERVER_*` filters (comma lists,
/// compared without case, as gluetun does), in the list's order. A filter that leaves nothing
/// is an error naming it and the servers it was given.
pub fn select<'a>(
    list: &'a ServerList,
    variables: &BTreeMap<String, String>,
) -> Result<(&'a str, Vec<&'a ListedServer>), ListError> {
    let provider = variables
        .get("VPN_SERVICE_PROVIDER")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .ok_or(ListError::NoProvider)?;
    if let Some(kind) = set(variables, "VPN_TYPE")
        && !kind.eq_ignore_ascii_case("wireguard")
    {
        return Err(ListError::NotWireguard(kind.clone()));
    }
    let (name, section) = list
        .sections
        .iter()
        .find(|(name, _)| same_provider(name, provider))
        .ok_or_else(|| {
            ListError::NoSection(
                provider.to_owned(),
                list.sections.keys().cloned().collect::<Vec<_>>().join(", "),
            )
        })?;
    let mut servers: Vec<&ListedServer> = section
        .servers
        .iter()
        .filter(|s| s.vpn.eq_ignore_ascii_case("wireguard") || s.vpn.eq_ignore_ascii_case("both"))
        .collect();
    if servers.is_empty() {
        return Err(ListError::NoWireguard(name.clone()));
    }
    if let Some(filter) = UNSUPPORTED.iter().find(|f| set(variables, f).is_some()) {
        return Err(ListError::Unsupported(filter));
    }
    for (filter, older, field) in FILTERS {
        let (filter, value) = match (set(variables, filter), set(variables, older)) {
            (Some(value), _) => (filter, value),
            (None, Some(value)) => (older, value),
            (None, None) => continue,
        };
        let wanted: Vec<String> = value
            .split(',')
            .map(|v| v.trim().to_lowercase())
            .filter(|v| !v.is_empty())
            .collect();
        let left = servers.len();
        servers.retain(|s| wanted.contains(&field(s).to_lowercase()));
        if servers.is_empty() {
            return Err(ListError::NoMatch {
                provider: name.clone(),
                filter,
                value: value.clone(),
                left,
            });
        }
    }
    Ok((name, servers))
}

/// The WireGuard port: `WIREGUARD_ENDPOINT_PORT` (gluetun's name), or the older
/// `VPN_ENDPOINT_PORT`, `0` meaning unset as in gluetun; else the provider's default, as gluetun
/// has it (IVPN 58237, Windscribe 1194, AirVPN 1637, the others 51820).
fn port(variables: &BTreeMap<String, String>, provider: &str) -> Result<u16, ListError> {
    for key in ["WIREGUARD_ENDPOINT_PORT", "VPN_ENDPOINT_PORT"] {
        if let Some(value) = variables.get(key).filter(|v| !v.trim().is_empty()) {
            match value.trim().parse::<u16>() {
                Ok(0) => break,
                Ok(port) => return Ok(port),
                Err(_) => {
                    return Err(ListError::Port {
                        key,
                        value: value.clone(),
                    });
                }
            }
        }
    }
    Ok(
        match provider
            .to_ascii_lowercase()
            .replace([' ', '-', '_'], "")
            .as_str()
        {
            "ivpn" => 58237,
            "windscribe" => 1194,
            "airvpn" => 1637,
            _ => 51820,
        },
    )
}

/// The provider's pool from the list: each selected server as a tunnel config made of the
/// Secret's key and addresses and the server's endpoint and public key, named by its hostname.
/// `variables` are the Secret's (gluetun's) variables; the private key only passes through.
pub fn pool(
    list: &ServerList,
    variables: &BTreeMap<String, String>,
    interface: &str,
) -> Result<Vec<Server>, ListError> {
    let (provider, servers) = select(list, variables)?;
    let port = port(variables, provider)?;
    let selected = servers.len();
    // A server without an IPv4 address (gluetun, too, leaves IPv6 out unless asked) or a public
    // key cannot be connected to: it is left out, not fatal for the others.
    let usable: Vec<(&ListedServer, IpAddr, &str)> = servers
        .into_iter()
        .filter_map(|s| {
            Some((
                s,
                *s.ips.iter().find(|ip| ip.is_ipv4())?,
                s.wgpubkey.as_deref()?,
            ))
        })
        .collect();
    if usable.is_empty() {
        return Err(ListError::NoUsable(selected, provider.to_owned()));
    }
    usable
        .into_iter()
        .map(|(s, ip, key)| {
            let bad = |problem: String| ListError::Server {
                server: s.hostname.clone(),
                problem,
            };
            let endpoint = ip.to_string();
            let get = |k: &str| -> Option<Secret> {
                match k {
                    "VPN_ENDPOINT_IP" => Some(Secret::new(endpoint.clone())),
                    "VPN_ENDPOINT_PORT" => Some(Secret::new(port.to_string())),
                    "WIREGUARD_PUBLIC_KEY" => Some(Secret::new(key.to_owned())),
                    other => variables
                        .get(other)
                        .map(|v| Secret::new(v.trim().to_owned())),
                }
            };
            let wg =
                WireguardConfig::from_gluetun(get, interface).map_err(|e| bad(e.to_string()))?;
            Ok(Server {
                name: s.hostname.clone(),
                key: s.hostname.clone(),
                tunnel: TunnelConfig::WireGuard(wg),
            })
        })
        .collect()
}

/// The pool as the files of a `<server>.conf` pool: `<hostname>.conf` → a wg-quick file, what
/// a mask's copy of the credentials holds, so that the agent, verification, exits and chain
/// hops read a list's servers exactly as a pool a user wrote (no second path). A hostname that
/// cannot be a Secret key, or a second server of the same hostname, is left out.
pub fn files(
    list: &ServerList,
    variables: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Secret>, ListError> {
    let servers = pool(list, variables, crate::tunnel::DEFAULT_INTERFACE)?;
    let mut files = BTreeMap::new();
    for server in servers {
        let key = format!("{}.conf", server.name);
        let valid = key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid || files.contains_key(&key) {
            continue;
        }
        if let TunnelConfig::WireGuard(wg) = &server.tunnel {
            let text = wg.to_wg_quick();
            // What the agent will read: a config that does not read back is refused here.
            WireguardConfig::from_wg_quick(text.expose(), crate::tunnel::DEFAULT_INTERFACE)
                .map_err(|e| ListError::Server {
                    server: server.name.clone(),
                    problem: e.to_string(),
                })?;
            files.insert(key, text);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Key;

    /// A list with one section in each provider's shape (the fields gluetun's file uses for
    /// them), public keys made fresh.
    fn sample() -> String {
        let k = || Key::generate().public().to_string();
        serde_json::json!({
            "version": 4,
            "mullvad": {"version": 4, "timestamp": 1_733_000_000, "servers": [
                {"vpn": "wireguard", "country": "Sweden", "city": "Gothenburg", "hostname": "se-got-wg-001",
                 "isp": "31173", "owned": true, "wgpubkey": k(), "ips": ["185.213.154.68", "2a03:1b20:5:f011::a09f"]},
                {"vpn": "wireguard", "country": "Netherlands", "city": "Amsterdam", "hostname": "nl-ams-wg-001",
                 "wgpubkey": k(), "ips": ["193.32.249.66"]},
                {"vpn": "openvpn", "country": "Netherlands", "city": "Amsterdam", "hostname": "nl-ams-ovpn-001",
                 "udp": true, "ips": ["193.32.249.70"]},
                {"vpn": "wireguard", "country": "Netherlands", "city": "Amsterdam", "hostname": "nl-ams-wg-002",
                 "wgpubkey": k(), "ips": ["193.32.249.67"]}]},
            "ivpn": {"version": 2, "timestamp": 1_733_000_001, "servers": [
                {"vpn": "wireguard", "country": "Germany", "city": "Frankfurt", "isp": "Leaseweb",
                 "hostname": "de1.wg.ivpn.net", "wgpubkey": k(), "ips": ["185.102.219.26"]}]},
            "protonvpn": {"version": 3, "timestamp": 1_733_000_002, "servers": [
                {"vpn": "wireguard", "country": "Switzerland", "region": "Zurich", "city": "Zurich",
                 "server_name": "CH#1", "hostname": "node-ch-01.protonvpn.net", "wgpubkey": k(),
                 "free": false, "stream": true, "secure_core": true, "port_forward": true, "ips": ["185.159.157.1"]}]},
            "windscribe": {"version": 2, "timestamp": 1_733_000_003, "servers": [
                {"vpn": "wireguard", "region": "Canada East", "city": "Montreal", "server_name": "Montreal - Bagel Poutine",
                 "hostname": "yul-359-wg.whiskergalaxy.com", "wgpubkey": k(), "ips": ["104.254.92.11"]}]},
            "airvpn": {"version": 1, "timestamp": 1_733_000_004, "servers": [
                {"vpn": "wireguard", "country": "Netherlands", "region": "Europe", "city": "Alblasserdam",
                 "server_name": "Alchiba", "hostname": "nl3.vpn.airdns.org", "wgpubkey": k(),
                 "ips": ["213.152.161.4", "2a00:1678:1337:2329:e5f:35d4:4404:ef9f"]}]},
            "surfshark": {"version": 4, "timestamp": 1_733_000_005, "servers": [
                {"vpn": "wireguard", "region": "Europe", "country": "Albania", "city": "Tirana",
                 "hostname": "al-tia.prod.surfshark.com", "retroloc": "", "multihop": false,
                 "wgpubkey": k(), "ips": ["31.171.153.66"]}]},
            "private internet access": {"version": 1, "timestamp": 1, "servers": [
                {"region": "CA Montreal", "server_name": "montreal403", "hostname": "ca-montreal.privacy.network",
                 "tcp": true, "udp": true, "port_forward": true, "ips": ["172.98.71.1"]}]}
        })
        .to_string()
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let key = Key::generate().to_base64().to_string();
        let mut v: BTreeMap<String, String> = [
            ("VPN_TYPE", "wireguard".to_owned()),
            ("WIREGUARD_PRIVATE_KEY", key),
            ("WIREGUARD_ADDRESSES", "10.64.222.21/32".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, val) in pairs {
            v.insert((*k).to_owned(), (*val).to_owned());
        }
        v
    }

    #[test]
    fn each_providers_shape_is_read_and_unknown_fields_are_ignored() {
        let list = parse(sample().as_bytes()).unwrap();
        assert_eq!(list.version, 4);
        assert!(list.skipped.is_empty(), "{:?}", list.skipped);
        for provider in [
            "mullvad",
            "ivpn",
            "protonvpn",
            "windscribe",
            "airvpn",
            "surfshark",
        ] {
            let section = &list.sections[provider];
            assert!(section.timestamp > 1_700_000_000, "{provider}");
            let s = &section.servers[0];
            assert_eq!(s.vpn, "wireguard", "{provider}");
            assert!(
                s.wgpubkey.is_some() && !s.ips.is_empty() && !s.hostname.is_empty(),
                "{provider}"
            );
        }
        assert_eq!(list.sections["protonvpn"].servers[0].server_name, "CH#1");
        assert_eq!(list.sections["airvpn"].servers[0].ips.len(), 2);
        // An OpenVPN-only section without `vpn` reads as OpenVPN.
        assert_eq!(
            list.sections["private internet access"].servers[0].vpn,
            "openvpn"
        );
    }

    #[test]
    fn gluetuns_filters_narrow_the_wireguard_servers_without_case() {
        let list = parse(sample().as_bytes()).unwrap();
        let names = |pairs: &[(&str, &str)]| -> Vec<String> {
            let (_, servers) = select(&list, &vars(pairs)).unwrap();
            servers.iter().map(|s| s.hostname.clone()).collect()
        };
        assert_eq!(
            names(&[("VPN_SERVICE_PROVIDER", "mullvad")]),
            ["se-got-wg-001", "nl-ams-wg-001", "nl-ams-wg-002"],
            "every WireGuard server, in the list's order, never the OpenVPN one"
        );
        assert_eq!(
            names(&[
                ("VPN_SERVICE_PROVIDER", "Mullvad"),
                ("SERVER_CITIES", "amsterdam")
            ]),
            ["nl-ams-wg-001", "nl-ams-wg-002"]
        );
        assert_eq!(
            names(&[
                ("VPN_SERVICE_PROVIDER", "mullvad"),
                ("SERVER_COUNTRIES", "sweden, NETHERLANDS"),
                ("SERVER_HOSTNAMES", "se-got-wg-001,nl-ams-wg-002")
            ]),
            ["se-got-wg-001", "nl-ams-wg-002"]
        );
        assert_eq!(
            names(&[
                ("VPN_SERVICE_PROVIDER", "protonvpn"),
                ("SERVER_NAMES", "ch#1"),
                ("SERVER_REGIONS", "ZURICH")
            ]),
            ["node-ch-01.protonvpn.net"]
        );
    }

    #[test]
    fn an_empty_match_names_its_filter_and_other_misses_say_what_is_wrong() {
        let list = parse(sample().as_bytes()).unwrap();
        let err = |pairs: &[(&str, &str)]| select(&list, &vars(pairs)).unwrap_err().to_string();
        assert_eq!(
            err(&[
                ("VPN_SERVICE_PROVIDER", "mullvad"),
                ("SERVER_COUNTRIES", "Sweden"),
                ("SERVER_CITIES", "Amsterdam")
            ]),
            "SERVER_CITIES=Amsterdam matches none of the 1 servers left of provider \"mullvad\""
        );
        assert!(
            err(&[("VPN_SERVICE_PROVIDER", "nordvpn")])
                .starts_with("the server list has no section for provider \"nordvpn\"")
        );
        assert!(
            err(&[("VPN_SERVICE_PROVIDER", "Private-Internet-Access")])
                .contains("lists no WireGuard server")
        );
        assert!(err(&[]).contains("no VPN_SERVICE_PROVIDER"));
        // An OpenVPN account is not turned into WireGuard tunnels it has no key for.
        assert_eq!(
            err(&[("VPN_SERVICE_PROVIDER", "mullvad"), ("VPN_TYPE", "OpenVPN")]),
            "VPN_TYPE=OpenVPN: cloak runs a list's WireGuard servers only (OpenVPN through the \
             list is not supported yet); remove serverList to have gluetun run this Secret"
        );
        assert!(
            select(
                &list,
                &vars(&[
                    ("VPN_SERVICE_PROVIDER", "mullvad"),
                    ("VPN_TYPE", "WireGuard")
                ])
            )
            .is_ok()
        );
    }

    #[test]
    fn a_section_is_kept_without_the_files_indentation() {
        let pretty = b"{\n  \"version\": 1,\n  \"mullvad\": {\n    \"version\": 4,\n    \"servers\": [\n      {\"hostname\": \"a b\\\" c\", \"ips\": [ \"192.0.2.1\" ]}\n    ]\n  },\n  \"ivpn\": {}\n}";
        let trimmed = String::from_utf8(section_only(pretty, "mullvad").unwrap()).unwrap();
        assert_eq!(
            trimmed,
            r#"{"mullvad":{"version":4,"servers":[{"hostname":"a b\" c","ips":["192.0.2.1"]}]},"version":1}"#
        );
    }

    #[test]
    fn a_malformed_list_is_an_error_and_a_malformed_section_or_server_is_skipped() {
        assert!(matches!(parse(b"{not json"), Err(ListError::Json(_))));
        assert_eq!(parse(b"[1, 2]"), Err(ListError::NotAnObject));
        let list = parse(
            br#"{"version": 1, "odd": {"servers": "many"},
                 "mullvad": {"version": 1, "timestamp": 2, "servers": [
                   {"vpn": "wireguard", "hostname": "", "ips": ["192.0.2.1"]},
                   {"vpn": "wireguard", "hostname": "a", "ips": ["not-an-ip"]},
                   {"vpn": "wireguard", "hostname": "b", "ips": ["192.0.2.2"], "wgpubkey": "k", "new_field": {"x": 1}}]}}"#,
        )
        .unwrap();
        assert_eq!(list.sections["mullvad"].servers.len(), 1);
        assert_eq!(list.skipped.len(), 3, "{:?}", list.skipped);
        assert!(!list.sections.contains_key("odd"));
    }

    #[test]
    fn the_files_are_a_pool_the_credentials_parser_reads_as_the_same_servers() {
        let list = parse(sample().as_bytes()).unwrap();
        let variables = vars(&[
            ("VPN_SERVICE_PROVIDER", "mullvad"),
            ("SERVER_CITIES", "Amsterdam"),
        ]);
        let files = files(&list, &variables).unwrap();
        let keys: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(keys, ["nl-ams-wg-001.conf", "nl-ams-wg-002.conf"]);
        let from_files = crate::credentials::pool(&files, "ck0").unwrap();
        let from_list = pool(&list, &variables, "ck0").unwrap();
        let tunnels = |servers: &[Server]| -> Vec<TunnelConfig> {
            servers.iter().map(|s| s.tunnel.clone()).collect()
        };
        assert_eq!(tunnels(&from_files.servers), tunnels(&from_list));
        let names: Vec<&str> = from_files.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["nl-ams-wg-001", "nl-ams-wg-002"]);
    }

    #[test]
    fn a_list_trimmed_to_one_section_reads_the_same_for_that_provider() {
        let whole = sample();
        let trimmed = section_only(whole.as_bytes(), "Mullvad").unwrap();
        let (a, b) = (parse(whole.as_bytes()).unwrap(), parse(&trimmed).unwrap());
        assert_eq!(b.sections.keys().collect::<Vec<_>>(), ["mullvad"]);
        assert_eq!(a.sections["mullvad"], b.sections["mullvad"]);
        assert_eq!(b.version, 4);
        assert!(matches!(
            section_only(whole.as_bytes(), "nordvpn"),
            Err(ListError::NoSection(..))
        ));
    }

    #[test]
    fn gluetuns_older_names_default_ports_and_both_servers_are_honoured_and_other_filters_refused()
    {
        let k = Key::generate().public().to_string();
        let list = parse(
            serde_json::json!({"version": 1,
                "ivpn": {"version": 1, "timestamp": 1, "servers": [
                    {"vpn": "both", "country": "Germany", "city": "Frankfurt", "hostname": "de1", "wgpubkey": k, "ips": ["192.0.2.1"]},
                    {"vpn": "wireguard", "country": "Germany", "city": "Berlin", "hostname": "de2", "wgpubkey": k, "ips": ["2001:db8::2"]},
                    {"vpn": "wireguard", "country": "Germany", "city": "Berlin", "hostname": "de3", "ips": ["192.0.2.3"]}]}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let servers = pool(
            &list,
            &vars(&[("VPN_SERVICE_PROVIDER", "ivpn"), ("COUNTRY", "germany")]),
            "ck0",
        )
        .unwrap();
        let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["de1"],
            "`both` counts, IPv6-only and keyless servers are left out"
        );
        let TunnelConfig::WireGuard(wg) = &servers[0].tunnel else {
            panic!()
        };
        assert_eq!(wg.peer.endpoint.port(), 58237, "IVPN's default port");
        let zero = vars(&[
            ("VPN_SERVICE_PROVIDER", "ivpn"),
            ("WIREGUARD_ENDPOINT_PORT", "0"),
        ]);
        let TunnelConfig::WireGuard(wg) = &pool(&list, &zero, "ck0").unwrap()[0].tunnel else {
            panic!()
        };
        assert_eq!(wg.peer.endpoint.port(), 58237, "0 is unset, as in gluetun");
        assert_eq!(
            pool(
                &list,
                &vars(&[("VPN_SERVICE_PROVIDER", "ivpn"), ("CITY", "Berlin")]),
                "ck0"
            )
            .unwrap_err(),
            ListError::NoUsable(2, "ivpn".into())
        );
        let refused = select(
            &list,
            &vars(&[
                ("VPN_SERVICE_PROVIDER", "ivpn"),
                ("PORT_FORWARD_ONLY", "on"),
            ]),
        );
        assert_eq!(
            refused.unwrap_err(),
            ListError::Unsupported("PORT_FORWARD_ONLY")
        );
        assert!(
            select(
                &list,
                &vars(&[("VPN_SERVICE_PROVIDER", "ivpn"), ("FREE_ONLY", "off")])
            )
            .is_ok()
        );
    }

    #[test]
    fn the_pool_is_the_secrets_key_with_each_servers_endpoint_and_public_key() {
        let list = parse(sample().as_bytes()).unwrap();
        let variables = vars(&[
            ("VPN_SERVICE_PROVIDER", "mullvad"),
            ("SERVER_CITIES", "Amsterdam,Gothenburg"),
            ("WIREGUARD_ENDPOINT_PORT", "51821"),
        ]);
        let servers = pool(&list, &variables, "ck0").unwrap();
        let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["se-got-wg-001", "nl-ams-wg-001", "nl-ams-wg-002"]);
        let TunnelConfig::WireGuard(wg) = &servers[0].tunnel else {
            panic!("not WireGuard");
        };
        assert_eq!(
            wg.peer.endpoint,
            "185.213.154.68:51821".parse().unwrap(),
            "IPv4 first"
        );
        let listed = list.sections["mullvad"].servers[0]
            .wgpubkey
            .clone()
            .unwrap();
        assert_eq!(wg.peer.public_key.to_string(), listed);
        // The private key is the Secret's, never printed.
        assert!(!format!("{servers:?}").contains(&variables["WIREGUARD_PRIVATE_KEY"]));
        // A bad port, or a Secret without the key, is an error naming it.
        let mut bad = variables.clone();
        bad.insert("WIREGUARD_ENDPOINT_PORT".into(), "wg".into());
        assert_eq!(
            pool(&list, &bad, "ck0").unwrap_err().to_string(),
            "WIREGUARD_ENDPOINT_PORT: \"wg\" is not a port number"
        );
        let mut keyless = variables;
        keyless.remove("WIREGUARD_PRIVATE_KEY");
        assert!(
            pool(&list, &keyless, "ck0")
                .unwrap_err()
                .to_string()
                .contains("WIREGUARD_PRIVATE_KEY")
        );
    }
}
