//! The active health probe: a connection through the tunnel to a configured target, timed. The
//! target may answer with the address it saw (a what-is-my-IP service); that is the public exit
//! address the agent reports.

use std::{net::IpAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout},
};

use crate::config::{ProbeAddr, ProbeTarget};

/// A probe that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOk {
    pub latency: Duration,
    /// The address the target reports having seen, when it reports one.
    pub exit_ip: Option<IpAddr>,
}

/// Runs probes; the real one dials, tests script the answers.
pub trait Prober: Send + Sync {
    fn probe(
        &self,
        target: &ProbeTarget,
        timeout: Duration,
    ) -> impl Future<Output = Result<ProbeOk, String>> + Send;
}

/// Dials the target over TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetProber;

impl Prober for NetProber {
    async fn probe(&self, target: &ProbeTarget, limit: Duration) -> Result<ProbeOk, String> {
        let start = Instant::now();
        let answer = timeout(limit, exchange(target))
            .await
            .map_err(|_| format!("{target}: no answer within {limit:?}"))?
            .map_err(|e| format!("{target}: {e}"))?;
        Ok(ProbeOk {
            latency: start.elapsed(),
            exit_ip: answer,
        })
    }
}

/// The probe server's address: as configured, or looked up through the tunnel.
async fn address(addr: &ProbeAddr) -> std::io::Result<std::net::SocketAddr> {
    match addr {
        ProbeAddr::Ip(a) => Ok(*a),
        ProbeAddr::Name {
            host,
            port,
            resolver,
        } => {
            let (host, server) = (host.clone(), std::net::SocketAddr::new(*resolver, 53));
            let found = tokio::task::spawn_blocking(move || {
                cloak_dataplane::dns::resolve(server, &host, None, Duration::from_secs(2))
            })
            .await
            .map_err(std::io::Error::other)?
            .map_err(|e| std::io::Error::other(format!("resolving the probe host: {e}")))?;
            Ok(std::net::SocketAddr::new(found[0], *port))
        }
    }
}

async fn exchange(target: &ProbeTarget) -> std::io::Result<Option<IpAddr>> {
    const LIMIT: u64 = 4096;
    let addr = address(target.addr()).await?;
    match target {
        ProbeTarget::Tcp(_) => {
            let stream = TcpStream::connect(addr).await?;
            // A what-is-my-IP service answers at once and closes; any other service is fine
            // as long as it accepted the connection.
            let mut buf = Vec::new();
            let _ = timeout(
                Duration::from_millis(200),
                stream.take(LIMIT).read_to_end(&mut buf),
            )
            .await;
            Ok(parse_ip(&buf))
        }
        ProbeTarget::Http { host, path, .. } => {
            let mut stream = TcpStream::connect(addr).await?;
            let request =
                format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: cloak-agent\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut buf = Vec::new();
            stream.take(LIMIT).read_to_end(&mut buf).await?;
            let text = String::from_utf8_lossy(&buf);
            let status = text.split_whitespace().nth(1).unwrap_or("");
            if !status.starts_with('2') {
                return Err(std::io::Error::other(format!("HTTP status {status:?}")));
            }
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            Ok(parse_ip(body.as_bytes()))
        }
    }
}

fn parse_ip(bytes: &[u8]) -> Option<IpAddr> {
    String::from_utf8_lossy(bytes).trim().parse().ok()
}
