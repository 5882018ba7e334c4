//! The internet's fake VPN providers. Each lives in a namespace of its own (`ck-<lab>-p<i>`)
//! behind a transit link to the internet, with a pool of servers on addresses of its own and
//! one exit address that it masquerades its clients' traffic to — what a commercial VPN does.
//!
//! - WireGuard servers are boringtun devices (the data plane crate's userspace WireGuard), each
//!   on a thread of the supervisor that entered the provider's namespace. One account key per
//!   provider is accepted by every server of its pool.
//! - OpenVPN servers are `openvpn` processes sharing one fresh EC PKI per provider.
//!
//! What clients need is written under `providers/<name>/`: one client configuration per server
//! (`server-<k>.conf` or `server-<k>.ovpn`); the first one goes into the provider's Secret.

use std::{
    fmt::Write as _, fs, net::SocketAddr, path::Path, sync::mpsc, thread::JoinHandle,
    time::Duration,
};

use cloak_dataplane::{
    Key,
    wireguard::{Userspace, WireguardConfig, WireguardPeer},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::{
    error::{Error, Result},
    layout::{self, Lab, Provider, TunnelKind},
    procs::Procs,
    sh,
};

/// A running WireGuard server: dropping it stops the device (its thread then ends).
#[derive(Debug)]
pub(crate) struct WireguardServer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for WireguardServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Wires provider `p`'s namespace to the internet: transit link, server and exit addresses,
/// forwarding, masquerade to the exit address.
pub(crate) fn network(lab: &Lab, p: &Provider) -> Result<()> {
    let ns = lab.netns(&format!("p{}", p.index));
    let net = lab.netns("net");
    let transit = p.transit_prefix();
    sh::run(&["ip", "netns", "add", &ns])?;
    sh::ip(&ns, &["link", "set", "lo", "up"])?;
    let outside = format!("p{}", p.index);
    sh::ip(
        &net,
        &[
            "link", "add", &outside, "type", "veth", "peer", "name", "up0", "netns", &ns,
        ],
    )?;
    sh::ip(
        &net,
        &["addr", "add", &format!("{transit}.1/30"), "dev", &outside],
    )?;
    sh::ip(&net, &["link", "set", &outside, "up"])?;
    sh::ip(
        &ns,
        &["addr", "add", &format!("{transit}.2/30"), "dev", "up0"],
    )?;
    sh::ip(&ns, &["link", "set", "up0", "up"])?;
    sh::ip(
        &ns,
        &["route", "add", "default", "via", &format!("{transit}.1")],
    )?;
    let mut owned = vec![p.exit()];
    owned.extend((1..=p.servers).map(|k| p.server(k)));
    for addr in &owned {
        sh::ip(&ns, &["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        sh::ip(
            &net,
            &[
                "route",
                "add",
                &format!("{addr}/32"),
                "via",
                &format!("{transit}.2"),
            ],
        )?;
    }
    // The userspace servers bind the wildcard address, so a reply's source would be the transit
    // address; each server's port is routed through a table whose default route has that
    // server's address as the source (route lookups for a socket's packets see its port). Only
    // the servers' own packets (`iif lo`): a client's traffic the provider forwards may come
    // from another provider's server on the same port (a chain's inner hop), and must go back
    // into its tunnel.
    if p.kind == TunnelKind::Wireguard {
        for k in 1..=p.servers {
            let table = (100 + u32::from(k)).to_string();
            let port = p.listen_port(k).to_string();
            sh::ip(
                &ns,
                &[
                    "rule", "add", "iif", "lo", "ipproto", "udp", "sport", &port, "table", &table,
                    "pref", &table,
                ],
            )?;
            sh::ip(
                &ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{transit}.1"),
                    "dev",
                    "up0",
                    "src",
                    &p.server(k),
                    "table",
                    &table,
                ],
            )?;
        }
    }
    sh::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
    // Replies to clients come back on the tunnel interfaces, not the transit link.
    sh::sysctl(&ns, "net.ipv4.conf.all.rp_filter", "0")?;
    let mut masquerade = format!(
        "    oifname \"up0\" ip saddr 10.0.0.0/8 snat ip to {}\n",
        p.exit()
    );
    if p.ipv6 {
        network_ipv6(lab, p)?;
        let _ = writeln!(
            masquerade,
            "    oifname \"up0\" ip6 saddr fd00::/8 snat ip6 to {}",
            p.exit6()
        );
    }
    let shared = if p.gluetun {
        one_account(lab, p)?
    } else {
        String::new()
    };
    sh::nft(
        &ns,
        &format!(
            "table inet provider {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{masquerade}  }}\n{shared}}}\n"
        ),
    )
}

/// What makes a gluetun provider's servers behave as a commercial service's: one port on every
/// server address (forwarded to the server's own device port), and one client address on every
/// server. Its replies find their way back by connection: a connection is marked with the
/// server it last came in from, and a reply to the account (seen after the masquerade is undone:
/// the chain runs after `dstnat`) is routed to the device of the server its mark names
/// (table `200 + k`, filled once the device exists: [`wireguard`]). A reply nobody marked is
/// dropped. Returns the nftables chains.
fn one_account(lab: &Lab, p: &Provider) -> Result<String> {
    let ns = lab.netns(&format!("p{}", p.index));
    let account = p.account_address();
    sh::ip(
        &ns,
        &["route", "add", "blackhole", &format!("{account}/32")],
    )?;
    let (mut forward, mut mark) = (String::new(), String::new());
    for k in 1..=p.servers {
        let table = (200 + u32::from(k)).to_string();
        sh::ip(
            &ns,
            &[
                "rule",
                "add",
                "fwmark",
                &k.to_string(),
                "table",
                &table,
                "pref",
                &table,
            ],
        )?;
        if p.port(k) != p.listen_port(k) {
            let _ = writeln!(
                forward,
                "    ip daddr {server} udp dport {} dnat ip to {server}:{}",
                p.port(k),
                p.listen_port(k),
                server = p.server(k),
            );
        }
        let _ = writeln!(mark, "    iifname \"wgs{k}\" ct mark set {k}");
    }
    Ok(format!(
        "  chain ports {{\n    type nat hook prerouting priority dstnat; policy accept;\n{forward}  }}\n  chain servers {{\n    type filter hook prerouting priority -90; policy accept;\n{mark}    iifname \"up0\" ip daddr {account} meta mark set ct mark\n  }}\n"
    ))
}

/// The IPv6 half of provider `p`'s network: its transit link's /64, its IPv6 exit address, and
/// forwarding (its clients' tunnel addresses are masqueraded to that exit address).
fn network_ipv6(lab: &Lab, p: &Provider) -> Result<()> {
    let (ns, net) = (lab.netns(&format!("p{}", p.index)), lab.netns("net"));
    let transit = p.transit_prefix6();
    let outside = format!("p{}", p.index);
    sh::ip(
        &net,
        &[
            "-6",
            "addr",
            "add",
            &format!("{transit}1/64"),
            "dev",
            &outside,
            "nodad",
        ],
    )?;
    sh::ip(
        &ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{transit}2/64"),
            "dev",
            "up0",
            "nodad",
        ],
    )?;
    sh::ip(
        &ns,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{transit}1"),
        ],
    )?;
    let exit = p.exit6();
    sh::ip(
        &ns,
        &["-6", "addr", "add", &format!("{exit}/128"), "dev", "lo"],
    )?;
    sh::ip(
        &net,
        &[
            "-6",
            "route",
            "add",
            &format!("{exit}/128"),
            "via",
            &format!("{transit}2"),
        ],
    )?;
    sh::sysctl(&ns, "net.ipv6.conf.all.forwarding", "1")
}

/// Starts every WireGuard server of `p` and writes the client configurations. Returns the
/// servers (they stop when dropped).
pub(crate) fn wireguard(lab: &Lab, p: &Provider, dir: &Path) -> Result<Vec<WireguardServer>> {
    let ns_path = format!("/var/run/netns/{}", lab.netns(&format!("p{}", p.index)));
    let client = Key::generate();
    let (mut servers, mut listed) = (Vec::new(), Vec::new());
    for k in 1..=p.servers {
        let server_key = Key::generate();
        let prefix = p.tunnel_prefix(k);
        let parse = |cidr: String| {
            cidr.parse()
                .map_err(|e| Error::Other(format!("{cidr}: {e}")))
        };
        let prefix6 = p.tunnel_prefix6(k);
        let client_address = if p.gluetun {
            p.account_address()
        } else {
            format!("{prefix}.2")
        };
        let (mut addresses, mut allowed) = (
            vec![parse(format!("{prefix}.1/24"))?],
            vec![parse(format!("{client_address}/32"))?],
        );
        let (mut client_addresses, mut client_allowed) =
            (format!("{client_address}/32"), "0.0.0.0/0".to_owned());
        if p.ipv6 {
            addresses.push(parse(format!("{prefix6}1/64"))?);
            allowed.push(parse(format!("{prefix6}2/128"))?);
            let _ = write!(client_addresses, ", {prefix6}2/128");
            client_allowed.push_str(", ::/0");
        }
        let config = WireguardConfig {
            interface: format!("wgs{k}"),
            private_key: server_key.clone(),
            listen_port: Some(p.listen_port(k)),
            fwmark: None,
            addresses,
            mtu: cloak_dataplane::wireguard::DEFAULT_MTU,
            dns: Vec::new(),
            peer: WireguardPeer {
                public_key: client.public(),
                preshared_key: None,
                endpoint: SocketAddr::from(([0, 0, 0, 0], 0)),
                endpoint_name: None,
                allowed_ips: allowed,
                persistent_keepalive: None,
            },
            extra_peers: Vec::new(),
        };
        servers.push(start_wireguard(&ns_path, config)?);
        if p.gluetun {
            let ns = lab.netns(&format!("p{}", p.index));
            let (table, device) = ((200 + u32::from(k)).to_string(), format!("wgs{k}"));
            sh::ip(
                &ns,
                &[
                    "route",
                    "add",
                    &client_address,
                    "dev",
                    &device,
                    "table",
                    &table,
                ],
            )?;
            listed.push(serde_json::json!({
                "vpn": "wireguard",
                "country": layout::GLUETUN_LOCATIONS[usize::from(k) - 1].0,
                "city": layout::GLUETUN_LOCATIONS[usize::from(k) - 1].1,
                "hostname": p.server_name(k),
                "ips": [p.server(k)],
                "wgpubkey": server_key.public().to_string(),
            }));
        }
        let conf = format!(
            "[Interface]\nPrivateKey = {}\nAddress = {client_addresses}\nDNS = {}\n\n[Peer]\nPublicKey = {}\nEndpoint = {}:{}\nAllowedIPs = {client_allowed}\n",
            &*client.to_base64(),
            layout::INTERNET_DNS,
            server_key.public(),
            p.server(k),
            p.port(k)
        );
        crate::certs::write_private(&dir.join(format!("server-{k}.conf")), &conf)?;
    }
    if p.gluetun {
        let list = server_list(&listed);
        let path = dir.join("servers.json");
        fs::write(&path, &list).map_err(Error::io(&path))?;
        let www = lab.dir().join("www");
        fs::create_dir_all(&www).map_err(Error::io(&www))?;
        let path = www.join("servers.json");
        fs::write(&path, &list).map_err(Error::io(&path))?;
    }
    Ok(servers)
}

/// A server list in gluetun's format (`internal/storage/servers.json`) whose
/// [`GLUETUN_SERVICE`](layout::GLUETUN_SERVICE) section holds `servers`, beside a section of
/// another provider as gluetun's own file has.
fn server_list(servers: &[serde_json::Value]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let list = serde_json::json!({
        "version": 1,
        layout::GLUETUN_SERVICE: {"version": 4, "timestamp": now, "servers": servers},
        "ivpn": {"version": 2, "timestamp": now, "servers": [{
            "vpn": "wireguard", "country": "Netherlands", "city": "Amsterdam",
            "hostname": "nl1.wg.ivpn.net", "ips": ["192.0.2.250"],
            "wgpubkey": "xpfMb6l6lJ1Jg8ikBS2dRCUJqg4PVkSoKBR5ElLd7kw="
        }]},
    });
    serde_json::to_string_pretty(&list).unwrap_or_default()
}

/// The lab's server list (gluetun's format), as [`start`] wrote it: what the examples'
/// ConfigMap holds and the echo service serves at `/files/servers.json`.
pub fn server_list_file(lab: &Lab) -> std::path::PathBuf {
    lab.dir().join("www").join("servers.json")
}

/// One WireGuard device on a thread that entered the provider's namespace (namespaces are per
/// thread; the device's worker thread inherits it).
fn start_wireguard(ns_path: &str, config: WireguardConfig) -> Result<WireguardServer> {
    let (ready_tx, ready) = mpsc::channel::<std::result::Result<(), String>>();
    let (stop, stopped) = mpsc::channel::<()>();
    let path = ns_path.to_owned();
    let name = config.interface.clone();
    let thread = std::thread::Builder::new()
        .name(format!("wg-{name}"))
        .spawn(move || {
            let opened = fs::File::open(&path)
                .map_err(|e| format!("{path}: {e}"))
                .and_then(|f| {
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("entering {path}: {e}"))
                })
                .and_then(|()| Userspace::open(&config).map_err(|e| e.to_string()));
            match opened {
                Ok(device) => {
                    let _ = ready_tx.send(Ok(()));
                    // Blocks until the supervisor drops the sender.
                    let _ = stopped.recv();
                    drop(device);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| Error::Other(format!("starting the WireGuard server thread: {e}")))?;
    match ready.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(WireguardServer {
            stop: Some(stop),
            thread: Some(thread),
        }),
        Ok(Err(e)) => Err(Error::Other(format!("WireGuard server {name}: {e}"))),
        Err(_) => Err(Error::Other(format!(
            "WireGuard server {name} did not start within 10 s"
        ))),
    }
}

/// Starts every OpenVPN server of `p` (processes of the supervisor) and writes the client
/// configurations.
pub(crate) fn openvpn(lab: &Lab, p: &Provider, dir: &Path, procs: &mut Procs) -> Result<()> {
    let ns = lab.netns(&format!("p{}", p.index));
    let pki = Pki::generate()?;
    for (name, pem) in [
        ("ca.crt", &pki.ca),
        ("server.crt", &pki.server_cert),
        ("server.key", &pki.server_key),
    ] {
        crate::certs::write_private(&dir.join(name), pem)?;
    }
    for k in 1..=p.servers {
        let prefix = p.tunnel_prefix(k);
        let conf = format!(
            "dev ovs{k}\ndev-type tun\nproto udp\nlocal {server}\nport {port}\ntopology subnet\nserver {prefix}.0 255.255.255.0\nca ca.crt\ncert server.crt\nkey server.key\ndh none\nkeepalive 2 10\ndata-ciphers AES-256-GCM:AES-128-GCM\npush \"redirect-gateway def1\"\npush \"dhcp-option DNS {dns}\"\nverb 3\n",
            server = p.server(k),
            port = p.port(k),
            dns = layout::INTERNET_DNS,
        );
        let conf_path = dir.join(format!("server-{k}.server.conf"));
        fs::write(&conf_path, conf).map_err(Error::io(&conf_path))?;
        procs.spawn(
            &format!("{}-{k}", p.name),
            &sh::in_netns(
                &ns,
                [
                    "openvpn".into(),
                    "--config".into(),
                    conf_path.to_string_lossy().into_owned(),
                ],
            ),
            Some(dir),
        )?;
        let client = format!(
            "client\ndev tun\nproto udp\nremote {} {}\nnobind\nremote-cert-tls server\ndata-ciphers AES-256-GCM:AES-128-GCM\nverb 3\n<ca>\n{}</ca>\n<cert>\n{}</cert>\n<key>\n{}</key>\n",
            p.server(k),
            p.port(k),
            pki.ca,
            pki.client_cert,
            pki.client_key
        );
        crate::certs::write_private(&dir.join(format!("server-{k}.ovpn")), &client)?;
    }
    Ok(())
}

/// Starts the servers of one provider.
pub(crate) fn start(lab: &Lab, p: &Provider, procs: &mut Procs) -> Result<Vec<WireguardServer>> {
    let dir = lab.dir().join("providers").join(p.name);
    fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    network(lab, p)?;
    // Not for a gluetun provider: its clients share one address, which an inbound connection
    // (marked by no server) could not be routed to.
    if !p.gluetun {
        crate::natpmp::start(lab, p)?;
    }
    match p.kind {
        TunnelKind::Wireguard => wireguard(lab, p, &dir),
        TunnelKind::OpenVpn => openvpn(lab, p, &dir, procs).map(|()| Vec::new()),
    }
}

/// The client configuration of provider `p`'s server `k`, as written by [`start`].
pub fn client_config(lab: &Lab, p: &Provider, k: u8) -> Result<String> {
    let ext = match p.kind {
        TunnelKind::Wireguard => "conf",
        TunnelKind::OpenVpn => "ovpn",
    };
    let path = lab
        .dir()
        .join("providers")
        .join(p.name)
        .join(format!("server-{k}.{ext}"));
    fs::read_to_string(&path).map_err(Error::io(path))
}

/// A fresh EC PKI for an OpenVPN server and its client (PEM text): a CA, a server certificate
/// (serverAuth) and a client certificate (clientAuth). Also the test network lab's.
#[allow(clippy::struct_field_names)] // PEM texts; the names say which
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki(<redacted>)")
    }
}

impl Pki {
    pub fn generate() -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cloak-lab-vpn-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Issuer::new(ca_params, ca_key);
        let leaf = |cn: &str, eku: ExtendedKeyUsagePurpose| -> Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec![cn.to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyAgreement,
            ];
            params.extended_key_usages = vec![eku];
            let cert = params.signed_by(&key, &ca)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf("server", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(Self {
            ca: ca_cert.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }
}
