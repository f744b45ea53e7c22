//! The TCP path for clients (RFC 7766): length-prefixed queries, pipelined, answered out of
//! order as backends reply.
//!
//! Each client connection is a reader (this task) and a writer task joined by channels of
//! [`Answer`]s. A semaphore caps the queries one connection may have in flight: at the cap the
//! reader stops reading, which pushes back on the client through TCP flow control instead of
//! buffering. Queries go to the chosen backend's pool ([`TcpPools`]); zone transfers get a
//! backend connection of their own ([`transfer`]); a query whose backend connection failed
//! comes back to the reader and is routed once more over the current set, avoiding that
//! backend.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::access::Verdict;
use crate::backend::Shared;
use crate::cache;
use crate::dataplane::query::{check_query, route, Route};
use crate::dataplane::tcp_msg::{Answer, ClientHandle, TcpQuery};
use crate::dataplane::tcp_pool::{PoolSettings, TcpPools};
use crate::dataplane::transfer::{self, TransferSettings};
use crate::lifecycle::Lifecycle;
use crate::stats::{DropReason, Proto};

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
    pub transfer: TransferSettings,
}

/// Transfer messages queued per client connection before the transfer waits for the client.
const STREAM_QUEUE: usize = 4;
/// Once the process stops, a client connection closes after this long without a query.
const DRAIN_IDLE: Duration = Duration::from_millis(50);

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

/// What every client connection shares: the snapshot, the backend pools, limits, settings.
pub struct TcpFrontend {
    pub shared: Arc<Shared>,
    pub pools: TcpPools,
    pub settings: TcpSettings,
    pub limits: Arc<ConnLimits>,
    pub lifecycle: Arc<Lifecycle>,
}

impl TcpFrontend {
    pub fn new(shared: Arc<Shared>, settings: TcpSettings, lifecycle: Arc<Lifecycle>) -> Self {
        TcpFrontend {
            pools: TcpPools::new(
                settings.pool,
                Arc::clone(&shared.stats),
                shared.cache.clone(),
            ),
            shared,
            settings,
            limits: Arc::new(ConnLimits::default()),
            lifecycle,
        }
    }
}

/// Accepts client connections until the process stops.
pub async fn serve(listener: TcpListener, fe: Arc<TcpFrontend>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = fe.lifecycle.stopped() => return,
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
        let stats = &fe.shared.stats;
        let Some(guard) = fe.limits.admit(peer.ip(), &fe.settings) else {
            stats.dropped(DropReason::TcpConnectionLimit);
            drop(stream);
            continue;
        };
        stats.tcp_total.fetch_add(1, Ordering::Relaxed);
        let fe = Arc::clone(&fe);
        tokio::spawn(async move {
            fe.shared.stats.tcp_open.fetch_add(1, Ordering::Relaxed);
            handle_client(stream, peer, &fe).await;
            fe.shared.stats.tcp_open.fetch_sub(1, Ordering::Relaxed);
            drop(guard);
        });
    }
}

/// What the start of a client's TCP byte stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole frame yet.
    Incomplete,
    /// A whole message of this length follows the 2-byte prefix.
    Complete(usize),
    /// A frame the connection must be closed for.
    Bad(DropReason),
}

/// Parses the length prefix at the start of `buf` (RFC 7766 framing).
pub fn next_frame(buf: &[u8], max_query_size: usize) -> Frame {
    if buf.len() < 2 {
        return Frame::Incomplete;
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if len == 0 {
        Frame::Bad(DropReason::TcpZeroLength)
    } else if len > max_query_size {
        Frame::Bad(DropReason::TcpOversized)
    } else if buf.len() < 2 + len {
        Frame::Incomplete
    } else {
        Frame::Complete(len)
    }
}

/// Serves one client connection until it closes, misbehaves, idles out or the process stops;
/// answers to queries already read are still written before the connection closes.
async fn handle_client(stream: TcpStream, peer: SocketAddr, fe: &TcpFrontend) {
    let s = fe.settings;
    let stats = &fe.shared.stats;
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    // One place per permit in each: a single answer or a handed-back query always fits.
    let (answers, answers_rx) = mpsc::channel::<Answer>(s.max_in_flight_per_connection);
    let (stream_tx, stream_rx) = mpsc::channel::<Answer>(STREAM_QUEUE);
    let (retry_tx, mut retry_rx) = mpsc::channel::<TcpQuery>(s.max_in_flight_per_connection);
    let client = ClientHandle {
        answers,
        stream: stream_tx,
        retry: retry_tx,
    };
    let permits = Arc::new(Semaphore::new(s.max_in_flight_per_connection));
    let writer = tokio::spawn(write_answers(
        wr,
        answers_rx,
        stream_rx,
        Arc::clone(stats),
        s.write_timeout,
    ));

    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut counter = 0usize;
    let mut stopping = false;
    'conn: loop {
        // Take every complete frame out of the buffer.
        loop {
            let len = match next_frame(&buf, s.max_query_size) {
                Frame::Incomplete => break,
                Frame::Complete(len) => len,
                Frame::Bad(reason) => {
                    stats.dropped(reason);
                    break 'conn;
                }
            };
            let frame: Vec<u8> = buf[..2 + len].to_vec();
            buf.drain(..2 + len);
            stats.query(Proto::Tcp);
            let q = match check_query(&frame[2..]) {
                Ok(q) => q,
                Err(r) => {
                    stats.dropped(r);
                    continue;
                }
            };
            // Answers return permits whatever the process is doing, so this wait ends.
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break 'conn;
            };
            let query = TcpQuery {
                frame,
                question: q,
                client: client.clone(),
                permit,
                timeout: Duration::ZERO,
                retried: false,
                avoid: None,
                cache_epoch: 0,
            };
            dispatch(fe, query, peer, &mut counter);
        }
        let partial = !buf.is_empty();
        let wait = if partial {
            s.read_timeout
        } else if stopping {
            DRAIN_IDLE
        } else {
            s.idle_timeout
        };
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            Some(q) = retry_rx.recv() => dispatch(fe, q, peer, &mut counter),
            _ = tokio::time::sleep(wait) => {
                if partial {
                    stats.dropped(DropReason::TcpReadTimeout);
                    break;
                }
                if permits.available_permits() == s.max_in_flight_per_connection {
                    if !stopping {
                        stats.dropped(DropReason::TcpIdleTimeout);
                    }
                    break;
                }
                // Answers are still due: the client is waiting, not idle.
            }
            // Stopping (SIGTERM, or an upgrade handed the sockets over): keep serving this
            // client until it pauses, then close between its queries, so a client querying
            // steadily is not cut off with a query in the air (it reconnects to whoever
            // serves now). The process's drain deadline bounds this.
            _ = fe.lifecycle.stopped(), if !stopping => stopping = true,
        }
    }
    tracing::debug!("tcp client {peer} done");
    // Queries still in flight may come back for another route; the channel closes once every
    // query is answered or given up (each holds a sender), and then the writer ends too.
    drop(client);
    while let Some(q) = retry_rx.recv().await {
        dispatch(fe, q, peer, &mut counter);
    }
    let _ = writer.await;
}

/// Writes answers and transfer streams to the client until both channels close, a write
/// stalls past `timeout`, or a broken transfer asks to close the connection.
async fn write_answers(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut answers: mpsc::Receiver<Answer>,
    mut stream: mpsc::Receiver<Answer>,
    stats: Arc<crate::stats::Stats>,
    timeout: Duration,
) {
    let (mut answers_open, mut stream_open) = (true, true);
    while answers_open || stream_open {
        let a = tokio::select! {
            a = answers.recv(), if answers_open => match a {
                Some(a) => a,
                None => { answers_open = false; continue; }
            },
            a = stream.recv(), if stream_open => match a {
                Some(a) => a,
                None => { stream_open = false; continue; }
            },
        };
        if !a.frame.is_empty() {
            match tokio::time::timeout(timeout, wr.write_all(&a.frame)).await {
                Ok(Ok(())) => stats.response(&a.frame[2..]),
                Ok(Err(_)) => break,
                Err(_) => {
                    stats.dropped(DropReason::TcpWriteTimeout);
                    break;
                }
            }
        }
        if a.close {
            break;
        }
    }
    let _ = tokio::time::timeout(timeout, wr.shutdown()).await;
}

/// Checks a query against the access lists, routes it over the current set and hands it to
/// that backend's pool (or, for a zone transfer, to a connection of its own); or answers
/// REFUSED or SERVFAIL itself; or drops it (counted).
fn dispatch(fe: &TcpFrontend, mut q: TcpQuery, peer: SocketAddr, counter: &mut usize) {
    let stats = &fe.shared.stats;
    let set = fe.shared.load();
    *counter = counter.wrapping_add(1);
    let msg = &q.frame[2..];
    let qtype = q.question.filter(|q| q.count > 0).map(|q| q.qtype);
    match set.access.check(peer.ip(), crate::wire::opcode(msg), qtype) {
        Verdict::Pass => {}
        Verdict::Drop(why) => return stats.denied(why),
        Verdict::Refuse(why) => {
            stats.denied(why);
            return answer_self(q, RCODE_REFUSED);
        }
    }
    // The packet cache, shared with the UDP path: a hit is answered here.
    if let (Some(cache), Some(question)) = (&fe.shared.cache, q.question.as_ref()) {
        if let Some(key) = cache::key_of(msg, Some(question)) {
            let epoch = cache.epoch(set.generation);
            let stale = cache.serves_stale() && !set.backends.iter().any(|b| b.is_usable());
            // Looked up into this thread's scratch buffer: a miss allocates nothing, a hit
            // exactly its frame.
            let hit = HIT_BUF.with_borrow_mut(|buf| {
                buf.resize(cache.max_answer_size(), 0);
                let n = cache.lookup(&key, msg, question, epoch, stale, buf)?;
                let mut frame = Vec::with_capacity(2 + n);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
                frame.extend_from_slice(&buf[..n]);
                Some(frame)
            });
            if let Some(frame) = hit {
                cache.count(1, 0);
                // One place per permit: never full.
                let _ = q.client.answers.try_send(Answer {
                    frame,
                    permit: Some(q.permit),
                    close: false,
                });
                return;
            }
            cache.count(0, 1);
            q.cache_epoch = if q.retried { 0 } else { epoch };
        }
    }
    let msg = &q.frame[2..];
    match route(
        &set,
        msg,
        q.question.as_ref(),
        *counter,
        Some(stats),
        q.avoid,
    ) {
        Route::Backend(i) => {
            q.timeout = set.timeout;
            match transfer::transfer_kind(&q) {
                Some(kind) => {
                    tokio::spawn(transfer::run(
                        Arc::clone(&set.backends[i]),
                        q,
                        kind,
                        fe.settings.transfer,
                        Arc::clone(stats),
                    ));
                }
                None => fe.pools.dispatch(&set, i, q),
            }
        }
        Route::Drop(r) => stats.dropped(r),
        Route::Servfail => answer_self(q, RCODE_SERVFAIL),
    }
}

thread_local! {
    /// Where cache hits are looked up (sized to the cache's largest answer on first use).
    static HIT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

/// Answers a query with `rcode` from lb itself.
fn answer_self(q: TcpQuery, rcode: u8) {
    let mut frame = q.frame;
    let n = crate::wire::make_error(&mut frame[2..], q.question.as_ref(), rcode);
    frame.truncate(2 + n);
    frame[..2].copy_from_slice(&(n as u16).to_be_bytes());
    // One place per permit: never full.
    let _ = q.client.answers.try_send(Answer {
        frame,
        permit: Some(q.permit),
        close: false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames() {
        assert_eq!(next_frame(&[0], 512), Frame::Incomplete);
        assert_eq!(
            next_frame(&[0, 0], 512),
            Frame::Bad(DropReason::TcpZeroLength)
        );
        assert_eq!(
            next_frame(&[2, 1], 512),
            Frame::Bad(DropReason::TcpOversized)
        );
        assert_eq!(next_frame(&[0, 3, 1, 2], 512), Frame::Incomplete);
        assert_eq!(next_frame(&[0, 3, 1, 2, 3, 9], 512), Frame::Complete(3));
    }

    proptest! {
        /// Reassembling a stream cut at arbitrary points yields exactly the frames written,
        /// whatever the chunking; arbitrary bytes never panic.
        #[test]
        fn reassembly_is_independent_of_chunking(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20),
            cuts in proptest::collection::vec(1usize..64, 1..50),
            junk in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let mut stream = Vec::new();
            for m in &msgs {
                stream.extend_from_slice(&(m.len() as u16).to_be_bytes());
                stream.extend_from_slice(m);
            }
            let mut buf = Vec::new();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while pos < stream.len() {
                let n = (*cut.next().unwrap()).min(stream.len() - pos);
                buf.extend_from_slice(&stream[pos..pos + n]);
                pos += n;
                while let Frame::Complete(len) = next_frame(&buf, 512) {
                    got.push(buf[2..2 + len].to_vec());
                    buf.drain(..2 + len);
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert!(buf.is_empty());
            let _ = next_frame(&junk, 512);
        }
    }
}
