//! The lab's servers on the host's loopback: a TCP proxy from `127.0.0.1:<port>` (in the
//! supervisor's own namespace, the host's) to a server in one of the lab's namespaces
//! (kube-apiserver in the control-plane namespace, Prometheus on node 1). Nothing of the host's
//! network changes: the proxy is a listening socket, and each upstream connection is made by a
//! thread that entered the server's namespace.

use std::{
    fs, io,
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

use crate::{
    error::{Error, Result},
    layout,
};

/// The API server, on a free loopback port (or `port`), until the process exits. Returns the
/// port.
pub(crate) fn start(cp_netns_path: &str, port: u16) -> Result<u16> {
    to(
        cp_netns_path,
        port,
        (layout::API_SERVER.to_owned(), layout::API_PORT),
    )
}

/// `target` in the namespace at `netns_path`, on a free loopback port (or `port`), until the
/// process exits. Returns the port.
pub(crate) fn to(netns_path: &str, port: u16, target: (String, u16)) -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))
        .map_err(|e| Error::Other(format!("binding a proxy on 127.0.0.1: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Other(e.to_string()))?
        .port();
    let path = netns_path.to_owned();
    std::thread::Builder::new()
        .name(format!("proxy-{}", target.1))
        .spawn(move || {
            for client in listener.incoming().flatten() {
                let (path, target) = (path.clone(), target.clone());
                std::thread::spawn(move || {
                    if let Ok(upstream) = connect_in(&path, &target) {
                        pipe(client, upstream);
                    }
                });
            }
        })
        .map_err(|e| Error::Other(format!("starting a proxy: {e}")))?;
    Ok(port)
}

/// Connects to `target` from inside the namespace at `path` (this thread enters it for good:
/// it serves only this connection).
fn connect_in(path: &str, target: &(String, u16)) -> io::Result<TcpStream> {
    let file = fs::File::open(path)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::other)?;
    let addr = (target.0.as_str(), target.1);
    let stream = std::net::ToSocketAddrs::to_socket_addrs(&addr)?
        .next()
        .ok_or_else(|| io::Error::other("no address"))
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)))?;
    Ok(stream)
}

/// Copies both ways until either side closes.
fn pipe(client: TcpStream, upstream: TcpStream) {
    let (Ok(mut client_r), Ok(mut upstream_w)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut client_r, &mut upstream_w);
        let _ = upstream_w.shutdown(Shutdown::Write);
    });
    let (mut upstream_r, mut client_w) = (upstream, client);
    let _ = io::copy(&mut upstream_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    let _ = up.join();
}
