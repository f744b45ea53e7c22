//! The TCP path for clients (RFC 7766): length-prefixed queries, pipelined, answered out of
//! order as backends reply.
//!
//! Each client connection is a reader (this task) and a writer task joined by a channel of
//! [`Answer`]s. A semaphore caps the queries one connection may have in flight: at the cap the
//! reader stops reading, which pushes back on the client through TCP flow control instead of
//! buffering. Queries go to the chosen backend's [`crate::tcp_backend::TcpPool`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::backend::{Choice, Shared};
use crate::stats::{DropReason, Proto};
use crate::tcp_backend::{Answer, PoolSettings, TcpQuery};
use crate::udp::check_query;

/// Client-side TCP limits and timeouts, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct TcpSettings {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_in_flight_per_connection: usize,
    pub idle_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_query_size: usize,
    pub pool: PoolSettings,
}

/// Open client connections, in total and per source address.
#[derive(Debug, Default)]
pub struct ConnLimits {
    open: AtomicUsize,
    /// Touched once per accepted and per closed connection, never per query.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnLimits {
    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn admit(self: &Arc<Self>, ip: IpAddr, s: &TcpSettings) -> Option<ConnGuard> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= s.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= s.max_connections_per_ip {
            drop(map);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *n += 1;
        Some(ConnGuard {
            limits: Arc::clone(self),
            ip,
        })
    }
}

/// Releases a connection's place in [`ConnLimits`] when dropped.
struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        drop(map);
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts client connections until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    settings: TcpSettings,
    limits: Arc<ConnLimits>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = crate::server::stopped(&mut stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off briefly instead of spinning.
                tracing::warn!("tcp accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(guard) = limits.admit(peer.ip(), &settings) else {
            shared.stats.drop(DropReason::TcpConnectionLimit);
            drop(stream);
            continue;
        };
        shared.stats.tcp_total.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tokio::spawn(async move {
            shared.stats.tcp_open.fetch_add(1, Ordering::Relaxed);
            handle_client(stream, peer, &shared, settings, stop).await;
            shared.stats.tcp_open.fetch_sub(1, Ordering::Relaxed);
            drop(guard);
        });
    }
}

/// Serves one client connection until it closes, misbehaves, idles out or `stop` turns true;
/// answers to queries already read are still written before the connection closes.
async fn handle_client(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    s: TcpSettings,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Answer>(s.max_in_flight_per_connection);
    let permits = Arc::new(Semaphore::new(s.max_in_flight_per_connection));
    let writer_shared = Arc::clone(shared);
    let writer = tokio::spawn(async move {
        while let Some(a) = rx.recv().await {
            match tokio::time::timeout(s.write_timeout, wr.write_all(&a.frame)).await {
                Ok(Ok(())) => writer_shared.stats.response(&a.frame[2..]),
                Ok(Err(_)) => break,
                Err(_) => {
                    writer_shared.stats.drop(DropReason::TcpWriteTimeout);
                    break;
                }
            }
        }
        let _ = tokio::time::timeout(s.write_timeout, wr.shutdown()).await;
    });

    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut counter = 0usize;
    'conn: loop {
        // Take every complete frame out of the buffer.
        while buf.len() >= 2 {
            let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
            if len == 0 {
                shared.stats.drop(DropReason::TcpZeroLength);
                break 'conn;
            }
            if len > s.max_query_size {
                shared.stats.drop(DropReason::TcpOversized);
                break 'conn;
            }
            if buf.len() < 2 + len {
                break;
            }
            let frame: Vec<u8> = buf[..2 + len].to_vec();
            buf.drain(..2 + len);
            shared.stats.query(Proto::Tcp);
            let q = match check_query(&frame[2..]) {
                Ok(q) => q,
                Err(r) => {
                    shared.stats.drop(r);
                    continue;
                }
            };
            let permit = tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'conn,
                },
                _ = crate::server::stopped(&mut stop) => break 'conn,
            };
            let set = shared.load();
            counter = counter.wrapping_add(1);
            let bi = match set.choose(&frame[2..], &q, counter, &shared.stats) {
                Choice::Backend(i) => i,
                Choice::Drop => continue,
                Choice::Servfail => {
                    let mut frame = frame;
                    let n = crate::wire::make_servfail(&mut frame[2..], &q);
                    frame.truncate(2 + n);
                    frame[..2].copy_from_slice(&(n as u16).to_be_bytes());
                    let _ = tx.try_send(Answer { frame, permit });
                    continue;
                }
            };
            let backend = Arc::clone(&set.backends[bi]);
            let query = TcpQuery {
                frame,
                question: q,
                reply: tx.clone(),
                permit,
                timeout: set.timeout,
                retried: false,
            };
            backend.tcp_pool.dispatch(&backend, query, s.pool, shared);
        }
        let partial = !buf.is_empty();
        let wait = if partial {
            s.read_timeout
        } else {
            s.idle_timeout
        };
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = tokio::time::sleep(wait) => {
                if partial {
                    shared.stats.drop(DropReason::TcpReadTimeout);
                    break;
                }
                if permits.available_permits() == s.max_in_flight_per_connection {
                    shared.stats.drop(DropReason::TcpIdleTimeout);
                    break;
                }
                // Answers are still due: the client is waiting, not idle.
            }
            _ = crate::server::stopped(&mut stop) => break,
        }
    }
    tracing::debug!("tcp client {peer} done");
    // The writer ends once every query's reply sender is gone: answered or timed out.
    drop(tx);
    let _ = writer.await;
}
