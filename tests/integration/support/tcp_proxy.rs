//! A TCP forwarding proxy that can *freeze*: it forwards bytes both ways between each client
//! and the upstream address until [`TcpProxy::freeze_open_connections`], after which the
//! connections open at that moment forward nothing more, either way, yet stay open (no FIN, no
//! reset). Both peers then see what a network partition looks like: silence, with every byte
//! they send still acknowledged by the proxy's kernel, so TCP itself never reports an error.
//! Connections accepted after a freeze forward normally (a new route).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// A running proxy; dropping it closes every connection.
pub struct TcpProxy {
    /// The port on 127.0.0.1 that forwards to the upstream.
    pub port: u16,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    upstream: SocketAddr,
    /// Bumped by each freeze: a connection accepted in an earlier epoch is frozen.
    epoch: watch::Sender<u64>,
    accepted: AtomicU64,
}

impl TcpProxy {
    /// Starts forwarding 127.0.0.1:`port` (chosen here) to 127.0.0.1:`upstream_port`.
    pub fn start(upstream_port: u16) -> TcpProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tcp-proxy")
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            epoch: watch::channel(0).0,
            accepted: AtomicU64::new(0),
        });
        // Bound here (std), served on the proxy's own runtime: block_on would panic inside a
        // test's runtime.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the tcp proxy");
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let s = shared.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let epoch = *s.epoch.borrow();
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(s.upstream).await else {
                        return; // dropping the client closes it, as a refused route would
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, s.clone(), epoch));
                    tokio::spawn(pump(sr, cw, s, epoch));
                });
            }
        });
        TcpProxy {
            port,
            shared,
            runtime: Some(runtime),
        }
    }

    /// Stops forwarding on every connection open now, both ways, without closing any.
    pub fn freeze_open_connections(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Forwards one direction until EOF, an error, or a freeze of its epoch; once frozen, holds
/// both halves open, reading nothing more, until the proxy is dropped.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, s: Arc<Shared>, epoch: u64) {
    let mut frozen = s.epoch.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            () = async { drop(frozen.wait_for(|e| *e > epoch).await) } => break,
            r = from.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => {
                        let _ = to.shutdown().await;
                        return;
                    }
                    Ok(n) => n,
                };
                if *s.epoch.borrow() > epoch {
                    break; // frozen meanwhile: these bytes are lost in the partition
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    // Frozen: keep both sockets open, forward nothing.
    std::future::pending::<()>().await;
    drop((from, to));
}
