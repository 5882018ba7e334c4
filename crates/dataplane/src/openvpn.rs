//! OpenVPN: the provider's `config.ovpn` (+ optional username/password) run by a supervised
//! `openvpn` child process. cloak keeps routing and the firewall to itself: the child is told not
//! to touch routes (`--route-noexec`, pushed `redirect-gateway` ignored), to mark its packets
//! with the data plane's fwmark, to keep its tun across its own restarts (`--persist-tun`), and to report its
//! state over a management socket private to this tunnel. Restarting a dead child is the agent's
//! job (with backoff); [`OpenVpn::status`] says when it died and why.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    Error, Remote,
    tunnel::{Tunnel, TunnelState, TunnelStatus},
};

pub use cloak_model::tunnel::openvpn::{OpenVpnConfig, ParseError};

#[derive(Debug, Default)]
struct Shared {
    /// OpenVPN's state name (`CONNECTING`, `WAIT`, `AUTH`, `GET_CONFIG`, `CONNECTED`, ...).
    state: String,
    rx: u64,
    tx: u64,
    /// Why openvpn is failing, in cloak's words, from the last line of its output that said.
    failure: Option<&'static str>,
}

/// What a line of openvpn's output says went wrong, in a fixed vocabulary: statuses and
/// `/readyz` (which anyone who reaches the pod can read) repeat these words, never openvpn's.
fn failure_reason(line: &str) -> Option<&'static str> {
    const REASONS: [(&str, &str); 9] = [
        (
            "AUTH_FAILED",
            "the server refused the username or password (AUTH_FAILED)",
        ),
        (
            "auth-failure",
            "the server refused the username or password (AUTH_FAILED)",
        ),
        (
            "VERIFY ERROR",
            "the server's certificate was not accepted (VERIFY ERROR)",
        ),
        (
            "certificate verify failed",
            "the server's certificate was not accepted (VERIFY ERROR)",
        ),
        (
            "TLS handshake failed",
            "the TLS handshake with the server failed",
        ),
        (
            "Options error",
            "openvpn refused an option of config.ovpn (Options error)",
        ),
        (
            "Cannot resolve host address",
            "openvpn could not resolve a remote",
        ),
        (
            "Cannot open TUN/TAP dev",
            "openvpn could not open the tun device",
        ),
        (
            "Exiting due to fatal error",
            "openvpn stopped on a fatal error",
        ),
    ];
    REASONS
        .iter()
        .find(|(needle, _)| line.contains(needle))
        .map(|(_, reason)| *reason)
}

/// The reason to keep: a specific one is not replaced by the generic lines openvpn prints on
/// its way out ("Exiting due to fatal error" after the error itself).
fn more_telling(kept: Option<&'static str>, new: &'static str) -> &'static str {
    const GENERIC: [&str; 2] = [
        "openvpn stopped on a fatal error",
        "the TLS handshake with the server failed",
    ];
    match kept {
        Some(kept) if GENERIC.contains(&new) && !GENERIC.contains(&kept) => kept,
        _ => new,
    }
}

/// A supervised `openvpn` process.
#[derive(Debug)]
pub struct OpenVpn {
    interface: String,
    child: Child,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
}

impl OpenVpn {
    /// Starts `openvpn`; files go to `state_dir/openvpn-<interface>` (mode 0700).
    pub fn open(config: &OpenVpnConfig, state_dir: &Path, fwmark: u32) -> Result<Self, Error> {
        let dir = state_dir.join(format!("openvpn-{}", config.interface));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("chmod {}", dir.display())))?;
        let write_private = |name: &str, content: &str| -> Result<PathBuf, Error> {
            let path = dir.join(name);
            fs::write(&path, content).map_err(Error::io(format!("writing {}", path.display())))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(Error::io(format!("chmod {}", path.display())))?;
            Ok(path)
        };
        let conf = write_private("config.ovpn", &with_remotes(config)?)?;
        // cloak creates the tun itself, before openvpn runs: routes and firewall rules naming it
        // can be in place while openvpn connects, and it outlives openvpn's own restarts.
        let _ = crate::command::ip(&["tuntap", "del", "dev", &config.interface, "mode", "tun"]);
        crate::command::ip(&["tuntap", "add", "dev", &config.interface, "mode", "tun"])?;
        crate::command::ip(&[
            "link",
            "set",
            "dev",
            &config.interface,
            "mtu",
            &config.mtu.to_string(),
            "up",
        ])?;
        let mgmt = dir.join("management.sock");
        let mut cmd = Command::new("openvpn");
        // Unless the provider's file sets `keepalive` (openvpn refuses it beside `--ping`):
        // without them, it would never notice a silent peer.
        cmd.args(keepalive_defaults(config.config.expose()))
            .arg("--config")
            .arg(&conf)
            .args(["--dev", &config.interface, "--dev-type", "tun"])
            .args([
                "--route-noexec",
                "--pull-filter",
                "ignore",
                "redirect-gateway",
            ])
            .args(["--pull-filter", "ignore", "dhcp-option"])
            .args(["--mark", &fwmark.to_string(), "--persist-tun"])
            .args(["--connect-retry", "1", "5", "--script-security", "1"])
            .arg("--management")
            .arg(&mgmt)
            .args(["unix", "--verb", "3", "--cd"])
            .arg(&dir);
        if let Some((user, pass)) = &config.auth {
            let auth = write_private(
                "auth.txt",
                &format!("{}\n{}\n", user.expose(), pass.expose()),
            )?;
            cmd.arg("--auth-user-pass").arg(auth).arg("--auth-nocache");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io("starting openvpn"))?;
        let shared = Arc::new(Mutex::new(Shared {
            state: "STARTING".into(),
            ..Shared::default()
        }));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    // openvpn's own words carry addresses, certificate names and pushed
                    // options: only at trace level, never in a status.
                    tracing::trace!(target: "openvpn", "{line}");
                    if let Some(reason) = failure_reason(&line)
                        && let Ok(mut s) = shared.lock()
                    {
                        s.failure = Some(more_telling(s.failure, reason));
                    }
                }
            });
        }
        let reader = Arc::clone(&shared);
        std::thread::spawn(move || management(&mgmt, &reader));
        Ok(Self {
            interface: config.interface.clone(),
            child,
            dir,
            shared,
        })
    }
}

/// The provider's config with its `remote` lines replaced by the resolved remotes, so openvpn
/// never looks a name up itself (its lookup would be dropped by the kill switch). Lines inside
/// inline blocks are kept as they are.
fn with_remotes(config: &OpenVpnConfig) -> Result<zeroize::Zeroizing<String>, Error> {
    use std::fmt::Write as _;
    // The file may hold inline keys: the copy is zeroized like the original.
    let mut out = zeroize::Zeroizing::new(String::with_capacity(config.config.expose().len() + 64));
    let mut in_block = false;
    for line in config.config.expose().lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("</") {
            in_block = false;
        } else if trimmed.starts_with('<') {
            in_block = true;
        } else if !in_block && trimmed.split_whitespace().next() == Some("remote") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    for remote in &config.remotes {
        let Remote::Addr(e) = remote else {
            return Err(Error::Tunnel(format!(
                "remote {remote} was not resolved before opening the tunnel"
            )));
        };
        let _ = writeln!(
            out,
            "remote {} {} {}",
            e.addr.ip(),
            e.addr.port(),
            e.proto.as_str()
        );
    }
    Ok(out)
}

/// `--ping 10 --ping-restart 60` (given before `--config`, so the file's own `ping` or
/// `ping-restart` overrides either), unless the file sets `keepalive`, which openvpn refuses
/// beside `--ping`.
fn keepalive_defaults(text: &str) -> &'static [&'static str] {
    let mut in_block = false;
    let own = text.lines().map(str::trim).any(|line| {
        if line.starts_with("</") {
            in_block = false;
        } else if line.starts_with('<') {
            in_block = true;
        }
        !in_block
            && matches!(
                line.split_whitespace().next(),
                Some("keepalive" | "--keepalive")
            )
    });
    if own {
        &[]
    } else {
        &["--ping", "10", "--ping-restart", "60"]
    }
}

/// Follows the management interface: real-time state and byte counts.
fn management(path: &Path, shared: &Mutex<Shared>) {
    // The socket appears once openvpn has parsed its config; give it up to 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return,
        }
    };
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if writer.write_all(b"state on\nbytecount 1\nstate\n").is_err() {
        return;
    }
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        let Ok(mut s) = shared.lock() else { return };
        if let Some(counts) = line.strip_prefix(">BYTECOUNT:") {
            let mut it = counts.split(',').map(|n| n.trim().parse().unwrap_or(0));
            s.rx = it.next().unwrap_or(0);
            s.tx = it.next().unwrap_or(0);
            continue;
        }
        // ">STATE:1700000000,CONNECTED,SUCCESS,10.8.0.2,..." or the same without the prefix as
        // the answer to `state`.
        let body = line.strip_prefix(">STATE:").unwrap_or(&line);
        let mut fields = body.split(',');
        if let (Some(ts), Some(name)) = (fields.next(), fields.next())
            && ts.chars().all(|c| c.is_ascii_digit())
            && !ts.is_empty()
        {
            if name == "CONNECTED" {
                // A cause told before a connection that worked is not the next failure's.
                s.failure = None;
            }
            name.clone_into(&mut s.state);
        }
    }
}

impl Tunnel for OpenVpn {
    fn status(&mut self) -> Result<TunnelStatus, Error> {
        let exited = self
            .child
            .try_wait()
            .map_err(Error::io("waiting for openvpn"))?;
        let s = self
            .shared
            .lock()
            .map_err(|_| Error::Tunnel("openvpn state poisoned".into()))?;
        let state = match exited {
            Some(code) => TunnelState::Failed(format!(
                "openvpn exited ({code}): {}",
                s.failure
                    .unwrap_or("no known reason (RUST_LOG=openvpn=trace shows its output)")
            )),
            None if s.state == "CONNECTED" => TunnelState::Up,
            None => TunnelState::Connecting,
        };
        Ok(TunnelStatus {
            state,
            handshake_age: None,
            rx_bytes: s.rx,
            tx_bytes: s.tx,
        })
    }

    fn implementation(&self) -> &'static str {
        "openvpn"
    }
}

impl Drop for OpenVpn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = crate::command::ip(&["tuntap", "del", "dev", &self.interface, "mode", "tun"]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Proto;

    const OVPN: &str = "client\ndev tun\nproto udp\nremote 192.0.2.2 1194\nremote 192.0.2.3 443 tcp\nport 1195\nnobind\n<key>\n-----BEGIN PRIVATE KEY-----\nremote 6.6.6.6\n-----END PRIVATE KEY-----\n</key>\n";

    #[test]
    fn failures_are_told_in_cloaks_words_never_in_openvpns() {
        let lines = [
            "2026-12-02 00:38:51 AUTH: Received control message: AUTH_FAILED",
            "2026-12-02 00:38:51 SIGTERM[soft,auth-failure] received, process exiting",
            "VERIFY ERROR: depth=0, error=self-signed certificate: CN=vpn-7.provider.example",
            "Options error: Unrecognized option or missing or extra parameter(s) in config.ovpn:12: pull-secret hunter2 (2.6.3)",
        ];
        let told: Vec<&str> = lines.iter().filter_map(|l| failure_reason(l)).collect();
        assert_eq!(
            told,
            [
                "the server refused the username or password (AUTH_FAILED)",
                "the server refused the username or password (AUTH_FAILED)",
                "the server's certificate was not accepted (VERIFY ERROR)",
                "openvpn refused an option of config.ovpn (Options error)",
            ]
        );
        assert_eq!(
            failure_reason("Peer Connection Initiated with [AF_INET]192.0.2.2:1194"),
            None
        );
        // As openvpn prints them: the cause, then generic lines on its way out.
        let sequence = [
            "VERIFY ERROR: depth=0, error=certificate has expired",
            "TLS_ERROR: BIO read tls_read_plaintext error",
            "TLS Error: TLS handshake failed",
            "Exiting due to fatal error",
        ];
        let kept = sequence
            .iter()
            .filter_map(|l| failure_reason(l))
            .fold(None, |kept, new| Some(more_telling(kept, new)));
        assert_eq!(
            kept,
            Some("the server's certificate was not accepted (VERIFY ERROR)")
        );
    }

    #[test]
    fn a_providers_own_keepalive_is_kept_and_ours_fills_in_otherwise() {
        assert_eq!(
            keepalive_defaults("client\nremote 192.0.2.2\n"),
            ["--ping", "10", "--ping-restart", "60"]
        );
        for own in ["keepalive 10 60", "  --keepalive 10 60"] {
            assert!(
                keepalive_defaults(&format!("client\n{own}\nremote 192.0.2.2\n")).is_empty(),
                "{own}: openvpn refuses keepalive beside --ping"
            );
        }
        // The file's own ping or ping-restart overrides ours (theirs come after --config).
        assert_eq!(keepalive_defaults("client\nping 15\n").len(), 4);
        assert_eq!(
            keepalive_defaults("client\n<tls-crypt>\nkeepalive 5 30\n</tls-crypt>\n").len(),
            4,
            "inside an inline block it is no directive"
        );
    }

    #[test]
    fn remotes_are_written_back_resolved_and_the_rest_kept() {
        let mut c = OpenVpnConfig::from_ovpn(OVPN, None, "ck0").unwrap();
        c.remotes.push(Remote::Name {
            host: "gw.example.invalid".into(),
            port: 1194,
            proto: Proto::Udp,
        });
        assert!(with_remotes(&c).is_err(), "a name must be resolved first");
        c.remotes.pop();
        let text = with_remotes(&c).unwrap();
        assert!(
            text.ends_with("</key>\nremote 192.0.2.2 1194 udp\nremote 192.0.2.3 443 tcp\n"),
            "{}",
            &*text
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("remote ")).count(),
            3,
            "the two written back, and the inline block's line kept as it is"
        );
        assert!(text.contains("nobind\n") && text.contains("port 1195\n"));
    }
}
