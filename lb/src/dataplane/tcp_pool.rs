//! Pooled TCP connections from the proxy to each backend (the downstream side of RFC 7766).
//!
//! [`TcpPools`] keeps one [`TcpPool`] per backend of the current set, in a table that follows
//! the snapshot's generation: a backend that stays across a swap keeps its pool, a removed one's
//! pool is dropped from the table and its connections close once their last query is done. The
//! snapshot itself holds no connection.
//!
//! Each pooled connection is a task that pipelines queries under fresh random IDs and matches
//! answers (ID and question) as they arrive, in any order. A connection closes once idle. A
//! query whose connection breaks (or never opens) before it is answered is handed back to its
//! client connection ([`hand_back`]), which routes it once more over the *current* set,
//! avoiding that backend (BIND closes idle connections on its own schedule, and a query can
//! cross that close); a pool never routes. Zone transfers do not use the pools
//! ([`crate::dataplane::transfer`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::backend::{Backend, BackendSet};
use crate::cache::{self, PacketCache};
use crate::dataplane::tcp_msg::{hand_back, TcpQuery};
use crate::stats::{DropReason, Stats};
use crate::wire;

/// How often a pooled connection checks timeouts.
const TICK: Duration = Duration::from_millis(50);

/// Settings for pooled backend connections, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub size: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_in_flight: usize,
}

struct ConnHandle {
    tx: mpsc::Sender<TcpQuery>,
}

/// One backend's pooled connections.
pub struct TcpPool {
    backend: Arc<Backend>,
    slots: Box<[ArcSwapOption<ConnHandle>]>,
    next: AtomicUsize,
}

impl fmt::Debug for TcpPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let open = self
            .slots
            .iter()
            .filter(|s| s.load().as_ref().is_some_and(|h| !h.tx.is_closed()))
            .count();
        f.debug_struct("TcpPool")
            .field("backend", &self.backend.addr)
            .field("size", &self.slots.len())
            .field("open", &open)
            .finish()
    }
}

impl TcpPool {
    fn new(backend: Arc<Backend>, size: usize) -> Self {
        TcpPool {
            backend,
            slots: (0..size.max(1)).map(|_| ArcSwapOption::empty()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Hands a query to one of the pooled connections, opening one if needed. Must run inside
    /// the tokio runtime. On failure the query is dropped and counted here.
    fn dispatch(
        &self,
        q: TcpQuery,
        settings: &PoolSettings,
        stats: &Arc<Stats>,
        cache: &Option<Arc<PacketCache>>,
    ) {
        let backend = &self.backend;
        backend.state.in_flight_add(1);
        if !q.retried {
            // A query handed back and routed again is still one query.
            backend.state.queries.fetch_add(1, Ordering::Relaxed);
        }
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut q = q;
        let mut reopen = None;
        for k in 0..n {
            let i = (start + k) % n;
            let guard = self.slots[i].load();
            match guard.as_ref() {
                Some(h) => match h.tx.try_send(q) {
                    Ok(()) => return,
                    Err(TrySendError::Full(back)) => q = back,
                    Err(TrySendError::Closed(back)) => {
                        q = back;
                        reopen.get_or_insert(i);
                    }
                },
                None => {
                    reopen.get_or_insert(i);
                }
            }
        }
        let Some(i) = reopen else {
            backend.state.in_flight_done();
            stats.dropped(DropReason::BackendFull);
            return;
        };
        let (tx, rx) = mpsc::channel(settings.max_in_flight);
        // Cannot fail: the channel is new and has room.
        let _ = tx.try_send(q);
        self.slots[i].store(Some(Arc::new(ConnHandle { tx })));
        tokio::spawn(run_conn(
            Arc::clone(backend),
            rx,
            *settings,
            Arc::clone(stats),
            cache.clone(),
        ));
    }
}

/// The pools of the current set's backends, parallel to its `backends`.
struct PoolTable {
    generation: u64,
    pools: Vec<Arc<TcpPool>>,
}

/// Every backend's pool, owned by the TCP data plane and shared by its client connections.
pub struct TcpPools {
    table: ArcSwap<PoolTable>,
    settings: PoolSettings,
    stats: Arc<Stats>,
    /// Where answers to cacheable queries are stored.
    cache: Option<Arc<PacketCache>>,
}

impl TcpPools {
    pub fn new(
        settings: PoolSettings,
        stats: Arc<Stats>,
        cache: Option<Arc<PacketCache>>,
    ) -> TcpPools {
        TcpPools {
            table: ArcSwap::from_pointee(PoolTable {
                generation: 0,
                pools: Vec::new(),
            }),
            settings,
            stats,
            cache,
        }
    }

    /// Hands `q` to the pool of backend `i` of `set`.
    pub fn dispatch(&self, set: &BackendSet, i: usize, q: TcpQuery) {
        self.pool(set, i)
            .dispatch(q, &self.settings, &self.stats, &self.cache);
    }

    /// The pool of backend `i` of `set`. The table follows the newest snapshot seen: the first
    /// query after a swap rebuilds it, keeping the pools of backends that stayed.
    fn pool(&self, set: &BackendSet, i: usize) -> Arc<TcpPool> {
        let t = self.table.load();
        if t.generation == set.generation {
            return Arc::clone(&t.pools[i]);
        }
        if set.generation > t.generation {
            self.table.rcu(|old| {
                if old.generation >= set.generation {
                    return Arc::clone(old);
                }
                let pools = set
                    .backends
                    .iter()
                    .map(|b| {
                        old.pools
                            .iter()
                            .find(|p| Arc::ptr_eq(&p.backend, b))
                            .cloned()
                            .unwrap_or_else(|| {
                                Arc::new(TcpPool::new(Arc::clone(b), self.settings.size))
                            })
                    })
                    .collect();
                Arc::new(PoolTable {
                    generation: set.generation,
                    pools,
                })
            });
        }
        // Routed on an older snapshot than the table's (a swap raced this query): its backend
        // may still be pooled; otherwise a one-off pool serves this query.
        let t = self.table.load();
        let b = &set.backends[i];
        t.pools
            .iter()
            .find(|p| Arc::ptr_eq(&p.backend, b))
            .cloned()
            .unwrap_or_else(|| Arc::new(TcpPool::new(Arc::clone(b), 1)))
    }
}

struct Pending {
    query: TcpQuery,
    client_id: u16,
    sent_at: Instant,
}

/// One pooled connection: write queries, read answers, expire, close when idle.
async fn run_conn(
    backend: Arc<Backend>,
    mut rx: mpsc::Receiver<TcpQuery>,
    settings: PoolSettings,
    stats: Arc<Stats>,
    cache: Option<Arc<PacketCache>>,
) {
    let connect = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(backend.addr));
    let stream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!("tcp connect to {} failed: {e}", backend.addr);
            rx.close();
            let queued: Vec<TcpQuery> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            return hand_back(&backend, queued, &stats);
        }
        Err(_) => {
            tracing::debug!("tcp connect to {} timed out", backend.addr);
            rx.close();
            let queued: Vec<TcpQuery> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            return hand_back(&backend, queued, &stats);
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut pending: HashMap<u16, Pending> = HashMap::with_capacity(settings.max_in_flight);
    let mut rbuf: Vec<u8> = Vec::with_capacity(4096);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut last_active = Instant::now();
    let mut rx_done = false;
    let broken = loop {
        if rx_done && pending.is_empty() {
            break false;
        }
        tokio::select! {
            q = rx.recv(), if !rx_done && pending.len() < settings.max_in_flight => {
                let Some(mut q) = q else {
                    rx_done = true;
                    continue;
                };
                let id = loop {
                    let id: u16 = rng.random();
                    if !pending.contains_key(&id) {
                        break id;
                    }
                };
                let client_id = wire::id(&q.frame[2..]);
                wire::set_id(&mut q.frame[2..], id);
                let write = tokio::time::timeout(settings.write_timeout, wr.write_all(&q.frame)).await;
                wire::set_id(&mut q.frame[2..], client_id);
                let now = Instant::now();
                pending.insert(id, Pending { query: q, client_id, sent_at: now });
                last_active = now;
                if !matches!(write, Ok(Ok(()))) {
                    break true;
                }
            }
            r = rd.read_buf(&mut rbuf) => {
                match r {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {}
                }
                last_active = Instant::now();
                let used = handle_answers(&mut rbuf, &mut pending, &backend, &stats, cache.as_deref());
                rbuf.drain(..used);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                pending.retain(|_, p| {
                    if now.saturating_duration_since(p.sent_at) < p.query.timeout {
                        return true;
                    }
                    backend.state.timed_out();
                    stats.dropped(DropReason::BackendTimeout);
                    false
                });
                if pending.is_empty() && !rx_done && now.saturating_duration_since(last_active) >= settings.idle_timeout {
                    // Refuse new queries but still take those already queued; they go out
                    // before this connection closes.
                    rx.close();
                }
            }
        }
    };
    if broken {
        rx.close();
        let queued = std::iter::from_fn(|| rx.try_recv().ok());
        let unanswered: Vec<TcpQuery> = pending
            .into_values()
            .map(|p| p.query)
            .chain(queued)
            .collect();
        hand_back(&backend, unanswered, &stats);
    }
}

/// Matches every complete answer frame in `rbuf` and forwards it; returns the bytes consumed.
fn handle_answers(
    rbuf: &mut [u8],
    pending: &mut HashMap<u16, Pending>,
    backend: &Backend,
    stats: &Stats,
    cache: Option<&PacketCache>,
) -> usize {
    let mut off = 0;
    while rbuf.len() - off >= 2 {
        let len = u16::from_be_bytes([rbuf[off], rbuf[off + 1]]) as usize;
        if rbuf.len() - off - 2 < len {
            break;
        }
        let msg = &mut rbuf[off + 2..off + 2 + len];
        off += 2 + len;
        let Ok(h) = wire::header(msg) else {
            stats.dropped(DropReason::BadAnswer);
            continue;
        };
        if !h.qr {
            stats.dropped(DropReason::BadAnswer);
            continue;
        }
        let Some(p) = pending.get(&h.id) else {
            stats.dropped(DropReason::UnmatchedAnswer);
            continue;
        };
        if !wire::answer_matches(&p.query.frame[2..], p.query.question.as_ref(), msg) {
            // The backend answered (its ID matched): alive, though this answer is refused.
            backend.state.alive();
            stats.dropped(DropReason::MismatchedQuestion);
            continue;
        }
        let Some(p) = pending.remove(&h.id) else {
            continue;
        };
        // Not from a backend whose zones lag: its answer may be the old zone's.
        if let Some(c) = cache.filter(|_| p.query.cache_epoch != 0 && !backend.state.is_behind()) {
            if let Some(key) = cache::key_of(&p.query.frame[2..], p.query.question.as_ref()) {
                c.insert(&key, p.query.cache_epoch, msg);
            }
        }
        backend.state.answered_one(p.sent_at.elapsed());
        wire::set_id(msg, p.client_id);
        let mut frame = Vec::with_capacity(len + 2);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
        frame.extend_from_slice(msg);
        // Never waits for the client: queued, or dropped and counted.
        let TcpQuery { client, permit, .. } = p.query;
        client.answer(frame, permit, stats);
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Backend answer streams of arbitrary bytes, in arbitrary chunks: never a panic,
        /// never more consumed than received, and nothing matched without a pending query.
        #[test]
        fn answer_stream_of_garbage_is_safe(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let stats = Stats::default();
            let b = Backend::new("127.0.0.1:53".parse().unwrap());
            let mut pending = HashMap::new();
            let mut rbuf = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while pos < bytes.len() {
                let n = (*cut.next().unwrap()).min(bytes.len() - pos);
                rbuf.extend_from_slice(&bytes[pos..pos + n]);
                pos += n;
                let used = handle_answers(&mut rbuf, &mut pending, &b, &stats, None);
                prop_assert!(used <= rbuf.len());
                rbuf.drain(..used);
            }
            prop_assert_eq!(b.state.answers.load(Ordering::Relaxed), 0);
        }
    }
}
