//! The internet's echo service: HTTP on port 80 of [`ECHO`](crate::layout::ECHO) and
//! [`ECHO6`](crate::layout::ECHO6) answers every request with the source address it saw (so a
//! client learns its exit address), and remembers the last address per `?from=<name>`, which
//! `cloak lab status` shows as each workload's exit. UDP port 7 answers each datagram with the
//! source address too. `GET /files/<name>` serves the lab's file `www/<name>` instead (the
//! server list a VpnProvider may fetch).

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::error::{Error, Result};

/// Starts the service on threads that entered `netns_path`; they run until the process exits.
pub(crate) fn start(netns_path: &str, record: PathBuf, files: PathBuf) -> Result<()> {
    let (ready_tx, ready) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
    let path = netns_path.to_owned();
    std::thread::Builder::new()
        .name("echo".into())
        .spawn(move || {
            let bound = enter(&path).and_then(|()| {
                let (mut tcp, mut udp) = (Vec::new(), Vec::new());
                for address in [crate::layout::ECHO, crate::layout::ECHO6] {
                    let ip: std::net::IpAddr =
                        address.parse().map_err(|e| format!("{address}: {e}"))?;
                    tcp.push(
                        TcpListener::bind((ip, 80))
                            .map_err(|e| format!("binding {address} port 80: {e}"))?,
                    );
                    udp.push(
                        UdpSocket::bind((ip, 7))
                            .map_err(|e| format!("binding {address} port 7/udp: {e}"))?,
                    );
                }
                Ok((tcp, udp))
            });
            let (tcp, udp) = match bound {
                Ok(sockets) => {
                    let _ = ready_tx.send(Ok(()));
                    sockets
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for udp in udp {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(format!("{}\n", from.ip()).as_bytes(), from);
                    }
                });
            }
            let seen = Arc::new(Mutex::new(BTreeMap::<String, (String, u64)>::new()));
            // A thread a listener (threads inherit the namespace of the thread that starts them).
            for tcp in tcp {
                let (seen, record, files) = (seen.clone(), record.clone(), files.clone());
                std::thread::spawn(move || {
                    for stream in tcp.incoming().flatten() {
                        let (seen, record, files) = (seen.clone(), record.clone(), files.clone());
                        std::thread::spawn(move || answer(&stream, &seen, &record, &files));
                    }
                });
            }
        })
        .map_err(|e| Error::Other(format!("starting the echo service: {e}")))?;
    match ready.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Other(format!("echo service: {e}"))),
        Err(_) => Err(Error::Other("echo service did not start".into())),
    }
}

fn enter(path: &str) -> std::result::Result<(), String> {
    let file = fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("entering {path}: {e}"))
}

fn answer(
    stream: &TcpStream,
    seen: &Mutex<BTreeMap<String, (String, u64)>>,
    record: &PathBuf,
    files: &std::path::Path,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Headers up to the blank line; bounded like everything a client controls.
    for _ in 0..100 {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.trim().is_empty() => break,
            Ok(_) => {}
        }
    }
    if let Some(name) = file_name(&request_line) {
        serve(stream, &files.join(name));
        return;
    }
    let ip = peer.ip().to_string();
    if let Some(name) = from_parameter(&request_line) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.insert(name, (ip.clone(), now));
        if seen.len() > 1000 {
            let oldest = seen
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                seen.remove(&oldest);
            }
        }
        let json: BTreeMap<&String, serde_json::Value> = seen
            .iter()
            .map(|(k, (ip, at))| (k, serde_json::json!({"ip": ip, "at": at})))
            .collect();
        let tmp = record.with_extension("tmp");
        if fs::write(&tmp, serde_json::to_string(&json).unwrap_or_default()).is_ok() {
            let _ = fs::rename(&tmp, record);
        }
    }
    let body = format!("{ip}\n");
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// `name` from `GET /files/<name> HTTP/1.1`, when it is a plain file name.
fn file_name(request_line: &str) -> Option<&str> {
    let target = request_line.split_whitespace().nth(1)?;
    let name = target.strip_prefix("/files/")?;
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    valid.then_some(name)
}

/// Answers with the file at `path` (at most 64 MiB), or 404 when there is none.
fn serve(mut stream: &TcpStream, path: &std::path::Path) {
    let body = fs::metadata(path)
        .ok()
        .filter(|m| m.is_file() && m.len() <= 64 << 20)
        .and_then(|_| fs::read(path).ok());
    let _ = match body {
        Some(body) => write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .and_then(|()| stream.write_all(&body)),
        None => write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    };
}

/// `name` from `GET /anything?from=name HTTP/1.1`, when it is a plain label.
fn from_parameter(request_line: &str) -> Option<String> {
    let target = request_line.split_whitespace().nth(1)?;
    let query = target.split_once('?')?.1;
    let value = query.split('&').find_map(|kv| kv.strip_prefix("from="))?;
    let valid = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '/' | '_'));
    valid.then(|| value.to_owned())
}

/// What the echo service last saw per `from` name: name → (address, unix time).
pub(crate) fn seen(record: &std::path::Path) -> BTreeMap<String, (String, u64)> {
    let text = fs::read_to_string(record).unwrap_or_default();
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_default();
    parsed
        .into_iter()
        .filter_map(|(k, v)| {
            Some((
                k,
                (v.get("ip")?.as_str()?.to_owned(), v.get("at")?.as_u64()?),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_from_parameter_is_read_only_when_it_is_a_plain_name() {
        assert_eq!(
            from_parameter("GET /ip?from=demo/client-1 HTTP/1.1\r\n").as_deref(),
            Some("demo/client-1")
        );
        assert_eq!(
            from_parameter("GET /?a=1&from=x HTTP/1.1").as_deref(),
            Some("x")
        );
        assert_eq!(from_parameter("GET / HTTP/1.1"), None);
        assert_eq!(from_parameter("GET /?from=<script> HTTP/1.1"), None);
        assert_eq!(from_parameter("GET /?from= HTTP/1.1"), None);
    }

    #[test]
    fn only_plain_file_names_are_served() {
        assert_eq!(
            file_name("GET /files/servers.json HTTP/1.1"),
            Some("servers.json")
        );
        for bad in [
            "GET /files/ HTTP/1.1",
            "GET /files/../pki/ca.key HTTP/1.1",
            "GET /files/.hidden HTTP/1.1",
            "GET /files/a/b HTTP/1.1",
            "GET /ip HTTP/1.1",
        ] {
            assert_eq!(file_name(bad), None, "{bad}");
        }
    }
}
