//! The TCP path for clients (RFC 7766): length-prefixed queries, pipelined, answered out of
//! order as backends reply.
//!
//! Each client connection is a reader (this task) and a writer task joined by channels of
//! [`Answer`]s. A semaphore caps the queries one connection may have in flight, and an
//! [`AnswerQueue`] the bytes of answers waiting for a client that reads slowly: at either cap the
//! reader stops reading, which pushes back on the client through TCP flow control instead of
//! buffering. Queries go to the chosen backend's pool ([`TcpPools`]); zone transfers get a
//! backend connection of their own ([`transfer`]); a query whose backend connection failed
//! comes back to the reader and is routed once more over the current set, avoiding that
//! backend.
//!
//! The reader waits for everything in one `select!`: the client's bytes, a permit for a query
//! already read, queries handed back, its deadlines, the stop signal and the writer's end. It
//! never waits on one of them alone, so a connection whose permits are all held by handed-back
//! queries still routes them, times out and stops.
//!
//! What a connection may hold: `tcp.max_connections` in all and `tcp.max_connections_per_prefix`
//! per client network; a frame must be whole within `tcp.read_timeout_ms` of its first byte;
//! at `tcp.max_connection_age_ms` or `tcp.max_queries_per_connection` it reads no more, answers
//! what it read, and closes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::access::Verdict;
use crate::backend::Shared;
use crate::cache;
use crate::dataplane::query::{check_query, route, Route};
use crate::dataplane::tcp_msg::{Answer, AnswerQueue, ClientHandle, TcpQuery};
use crate::dataplane::tcp_pool::{PoolSettings, TcpPools};
use crate::dataplane::transfer::{self, TransferSettings};
use crate::lifecycle::Lifecycle;
use crate::prefix::Prefix;
use crate::stats::{DropReason, Proto, Stats};

/// Client-side TCP limits and timeouts, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct TcpSettings {
    pub max_connections: usize,
    /// Connections open at once from one client network.
    pub max_connections_per_prefix: usize,
    pub ipv4_prefix_length: u8,
    pub ipv6_prefix_length: u8,
    pub max_in_flight_per_connection: usize,
    pub idle_timeout: Duration,
    /// A started frame must be whole within this time of its first byte.
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// Reading stops this long after the connection opened (`None`: no limit).
    pub max_connection_age: Option<Duration>,
    /// Reading stops after this many queries (`None`: no limit).
    pub max_queries_per_connection: Option<u64>,
    /// [`AnswerQueue`] budgets: one connection's, and all connections' together.
    pub max_queued_per_connection: usize,
    pub max_queued_total: usize,
    pub max_query_size: usize,
    pub pool: PoolSettings,
    pub transfer: TransferSettings,
}

/// Transfer messages queued per client connection before the transfer waits for the client.
const STREAM_QUEUE: usize = 4;
/// Once the process stops, a client connection closes after this long without a query.
const DRAIN_IDLE: Duration = Duration::from_millis(50);
/// How long a connection closed at a limit waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// How often a connection that stopped reading for others' backlog looks again (nothing wakes
/// it when other connections' writers drain).
const BACKLOG_RECHECK: Duration = Duration::from_millis(10);

/// Open client connections, in total and per client network.
#[derive(Debug, Default)]
pub struct ConnLimits {
    open: AtomicUsize,
    /// Touched once per accepted and per closed connection, never per query; an entry per
    /// network with a connection open, so at most `max_connections` entries.
    per_prefix: Mutex<HashMap<Prefix, usize>>,
}

impl ConnLimits {
    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for a connection from `ip`, or the limit that refuses it.
    fn admit(self: &Arc<Self>, ip: IpAddr, s: &TcpSettings) -> Result<ConnGuard, DropReason> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= s.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(DropReason::TcpConnectionLimit);
        }
        let prefix = Prefix::network(ip, s.ipv4_prefix_length, s.ipv6_prefix_length);
        let mut map = self.per_prefix.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(prefix).or_insert(0);
        if *n >= s.max_connections_per_prefix {
            drop(map);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(DropReason::TcpPrefixLimit);
        }
        *n += 1;
        Ok(ConnGuard {
            limits: Arc::clone(self),
            prefix,
        })
    }
}

/// Releases a connection's place in [`ConnLimits`] when dropped.
struct ConnGuard {
    limits: Arc<ConnLimits>,
    prefix: Prefix,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = self
            .limits
            .per_prefix
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.prefix) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.prefix);
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
        let guard = match fe.limits.admit(peer.ip(), &fe.settings) {
            Ok(g) => g,
            Err(reason) => {
                stats.dropped(reason);
                drop(stream);
                continue;
            }
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

/// Serves one client connection until it closes, misbehaves, idles out, reaches a limit or
/// the process stops; answers to queries already read are still written before the connection
/// closes.
async fn handle_client(stream: TcpStream, peer: SocketAddr, fe: &TcpFrontend) {
    let s = fe.settings;
    let stats = &fe.shared.stats;
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let opened = Instant::now();
    let permits_max = s.max_in_flight_per_connection;
    // One place per permit in each: a single answer or a handed-back query always fits.
    let (answers, answers_rx) = mpsc::channel::<Answer>(permits_max);
    let (stream_tx, stream_rx) = mpsc::channel::<Answer>(STREAM_QUEUE);
    let (retry_tx, mut retry_rx) = mpsc::channel::<TcpQuery>(permits_max);
    let queue = Arc::new(AnswerQueue::new(
        s.max_queued_per_connection,
        s.max_queued_total,
        Arc::clone(stats),
    ));
    let client = ClientHandle {
        answers,
        stream: stream_tx,
        retry: retry_tx,
        queue: Arc::clone(&queue),
    };
    let permits = Arc::new(Semaphore::new(permits_max));
    let mut writer = tokio::spawn(write_answers(
        wr,
        answers_rx,
        stream_rx,
        Arc::clone(&queue),
        Arc::clone(stats),
        s.write_timeout,
    ));
    let mut writer_done = false;

    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut counter = 0usize;
    let mut queries: u64 = 0;
    // A permit that came while a whole frame waited for one; the frame takes it next.
    let mut spare: Option<OwnedSemaphorePermit> = None;
    // When the first byte of the frame at the head of `buf` arrived (or reading resumed after
    // a pause that was not the client's doing): the whole frame is due `read_timeout` later.
    let mut frame_since = opened;
    let mut was_reading = true;
    // The last query read or byte received, or the last time answers were found due.
    let mut last_active = opened;
    let age_limit = s.max_connection_age.map(|a| opened + a);
    // A limit was reached: nothing more is read, what was read is answered, then the
    // connection closes, counted under this reason.
    let mut finishing: Option<DropReason> = None;
    let mut stopping = false;
    'conn: loop {
        // Take every whole frame out of the buffer while there is a permit and room for its
        // answer.
        let mut frame_waits = false;
        // Why the loop stopped, decided once: asking `backlogged()` again below could find
        // the writer drained meanwhile and read on with whole frames left in `buf`.
        let mut backlogged = false;
        while finishing.is_none() {
            if queue.backlogged() {
                backlogged = true;
                break;
            }
            let len = match next_frame(&buf, s.max_query_size) {
                Frame::Incomplete => break,
                Frame::Complete(len) => len,
                Frame::Bad(reason) => {
                    stats.dropped(reason);
                    break 'conn;
                }
            };
            let permit = match spare.take() {
                Some(p) => p,
                None => match Arc::clone(&permits).try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        // Every permit is out: answers, or queries handed back to be routed
                        // again, return them (the `select!` below takes both).
                        frame_waits = true;
                        break;
                    }
                },
            };
            let frame: Vec<u8> = buf[..2 + len].to_vec();
            buf.drain(..2 + len);
            let now = Instant::now();
            frame_since = now;
            last_active = now;
            queries += 1;
            stats.query(Proto::Tcp);
            match check_query(&frame[2..]) {
                Ok(q) => {
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
                Err(r) => stats.dropped(r),
            }
            if s.max_queries_per_connection.is_some_and(|m| queries >= m) {
                finishing = Some(DropReason::TcpMaxQueries);
            }
        }
        if let Some(reason) = finishing {
            // Nothing more is read, so no frame will take it.
            spare = None;
            if permits.available_permits() == permits_max {
                stats.dropped(reason);
                break;
            }
        }
        let free = permits.available_permits() + usize::from(spare.is_some());
        let in_flight = free < permits_max;
        let reading = finishing.is_none() && !frame_waits && !backlogged;
        if reading && !was_reading {
            // Not reading was lb's doing (permits, backlog): the frame's time starts again.
            frame_since = Instant::now();
        }
        was_reading = reading;
        // While reading, the buffer holds no whole frame: anything in it is a frame started.
        let partial = reading && !buf.is_empty();
        let idle_wait = if stopping { DRAIN_IDLE } else { s.idle_timeout };
        let mut deadline = if partial {
            frame_since + s.read_timeout
        } else {
            last_active + idle_wait
        };
        if let (None, Some(age)) = (finishing, age_limit) {
            deadline = deadline.min(age);
        }
        if backlogged && finishing.is_none() {
            deadline = deadline.min(Instant::now() + BACKLOG_RECHECK);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf), if reading => {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let now = Instant::now();
                        if buf.len() == n {
                            // The buffer was empty: a frame starts with these bytes.
                            frame_since = now;
                        }
                        last_active = now;
                    }
                }
            },
            Some(q) = retry_rx.recv() => dispatch(fe, q, peer, &mut counter),
            p = Arc::clone(&permits).acquire_owned(), if frame_waits => spare = p.ok(),
            // Every answer written (no other acquire runs while finishing): closes above.
            _ = permits.acquire_many(permits_max as u32), if finishing.is_some() && in_flight => {}
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if finishing.is_none() && age_limit.is_some_and(|a| now >= a) {
                    // Answer what was read, then close.
                    finishing = Some(DropReason::TcpMaxAge);
                } else if partial && now >= frame_since + s.read_timeout {
                    stats.dropped(DropReason::TcpReadTimeout);
                    break;
                } else if !partial && now >= last_active + idle_wait {
                    if !in_flight {
                        if !stopping {
                            stats.dropped(DropReason::TcpIdleTimeout);
                        }
                        break;
                    }
                    // Answers are still due: the client is waiting, not idle.
                    last_active = now;
                }
            }
            // Stopping (SIGTERM, or an upgrade handed the sockets over): keep serving this
            // client until it pauses, then close between its queries, so a client querying
            // steadily is not cut off with a query in the air (it reconnects to whoever
            // serves now). The process's drain deadline bounds this.
            _ = fe.lifecycle.stopped(), if !stopping => {
                stopping = true;
                last_active = Instant::now();
            }
            // The writer gave up (write timeout, the client reset, a transfer broke off, an
            // answer that did not fit): nothing more can reach this client.
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                break;
            }
        }
    }
    tracing::debug!("tcp client {peer} done");
    drop(spare);
    // Queries still in flight may come back for another route; the channel closes once every
    // query is answered or given up (each holds a sender), and then the writer ends too.
    drop(client);
    while let Some(q) = retry_rx.recv().await {
        dispatch(fe, q, peer, &mut counter);
    }
    if !writer_done {
        let _ = writer.await;
    }
    if finishing.is_some() {
        // A clean close at a limit: the client may have sent more than was read, and closing
        // a socket with unread bytes resets it, which can destroy answers it has not read yet.
        // Read and discard until the client closes too (it has our FIN), for a bounded time.
        let _ = tokio::time::timeout(LINGER, async {
            let mut scratch = [0u8; 512];
            while let Ok(1..) = rd.read(&mut scratch).await {}
        })
        .await;
    }
}

/// Writes answers and transfer streams to the client until both channels close, a write
/// stalls past `timeout`, a broken transfer asks to close the connection, or an answer did not
/// fit the connection's [`AnswerQueue`].
async fn write_answers(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut answers: mpsc::Receiver<Answer>,
    mut stream: mpsc::Receiver<Answer>,
    queue: Arc<AnswerQueue>,
    stats: Arc<Stats>,
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
            _ = queue.aborted() => break,
        };
        if !a.frame.is_empty() {
            let write = tokio::time::timeout(timeout, wr.write_all(&a.frame));
            let written = tokio::select! {
                w = write => w,
                _ = queue.aborted() => break,
            };
            match written {
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
    // Answers still queued are dropped with the channel: their bytes and permits return.
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
            return answer_self(q, RCODE_REFUSED, stats);
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
                return q.client.answer(frame, q.permit, stats);
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
        Route::Servfail => answer_self(q, RCODE_SERVFAIL, stats),
    }
}

thread_local! {
    /// Where cache hits are looked up (sized to the cache's largest answer on first use).
    static HIT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

/// Answers a query with `rcode` from lb itself.
fn answer_self(q: TcpQuery, rcode: u8, stats: &Stats) {
    let mut frame = q.frame;
    let n = crate::wire::make_error(&mut frame[2..], q.question.as_ref(), rcode);
    frame.truncate(2 + n);
    frame[..2].copy_from_slice(&(n as u16).to_be_bytes());
    q.client.answer(frame, q.permit, stats);
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
