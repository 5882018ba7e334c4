//! A network partition on demand: a TCP proxy on loopback to one upstream address that can be
//! frozen. While frozen it forwards nothing in either direction but keeps every connection
//! open, so a client's requests neither fail nor finish: what a partition looks like to a
//! process that set no timeout.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// The proxy; it stops (with every connection) when dropped.
#[derive(Debug)]
pub struct Partition {
    addr: SocketAddr,
    frozen: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    /// Starts forwarding `127.0.0.1:<free port>` to `upstream`, on the calling runtime.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding the partition proxy: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("partition proxy address: {e}"));
        let frozen = Arc::new(watch::channel(false).0);
        let state = Arc::clone(&frozen);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                connections.spawn(pump(cr, sw, state.subscribe()));
                connections.spawn(pump(sr, cw, state.subscribe()));
            }
        });
        Self { addr, frozen, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops (true) or resumes (false) all forwarding.
    pub fn freeze(&self, on: bool) {
        self.frozen.send_replace(on);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding every chunk while frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
