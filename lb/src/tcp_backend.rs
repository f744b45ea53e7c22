//! Pooled TCP connections from the proxy to one backend (the downstream side of RFC 7766).
//!
//! Every [`Backend`] owns a [`TcpPool`] of a few persistent connections shared by all client
//! connections. Each pooled connection is a task that pipelines queries under fresh random IDs
//! and matches answers (ID and question) as they arrive, in any order. A connection closes
//! once idle, so a backend removed by a swap loses its connections when its last query is done.
//! A query whose connection breaks before it is answered is retried once on a fresh one (BIND
//! closes idle connections on its own schedule, and a query can cross that close).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::backend::{Backend, Shared};
use crate::stats::DropReason;
use crate::wire::{self, Question};

/// How often a pooled connection checks timeouts.
const TICK: Duration = Duration::from_millis(50);

/// Settings for pooled backend connections, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_in_flight: usize,
}

/// An answer on its way to a client connection's writer, framed (2-byte length first).
///
/// It carries the client connection's in-flight permit, so the permit returns only once the
/// answer is written: a slow reader cannot make the proxy buffer more than the cap.
#[derive(Debug)]
pub struct Answer {
    pub frame: Vec<u8>,
    pub permit: OwnedSemaphorePermit,
}

/// A client query bound for a backend over TCP.
#[derive(Debug)]
pub struct TcpQuery {
    /// The query framed as on the wire: 2-byte length, then the message with the client's ID.
    pub frame: Vec<u8>,
    /// The question, with offsets relative to `frame[2..]`.
    pub question: Question,
    pub reply: mpsc::Sender<Answer>,
    pub permit: OwnedSemaphorePermit,
    /// Query timeout from the snapshot the query was routed with.
    pub timeout: Duration,
    /// Already retried once after a broken connection.
    pub retried: bool,
}

struct ConnHandle {
    tx: mpsc::Sender<TcpQuery>,
}

/// A backend's pooled connections.
pub struct TcpPool {
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
            .field("size", &self.slots.len())
            .field("open", &open)
            .finish()
    }
}

impl TcpPool {
    pub fn new(size: usize) -> Self {
        TcpPool {
            slots: (0..size.max(1)).map(|_| ArcSwapOption::empty()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Hands a query to one of `backend`'s pooled connections, opening one if needed.
    ///
    /// Must run inside the tokio runtime. On failure the query is dropped and counted here.
    pub fn dispatch(
        &self,
        backend: &Arc<Backend>,
        q: TcpQuery,
        settings: PoolSettings,
        shared: &Arc<Shared>,
    ) {
        backend.state.in_flight_add(1);
        if !q.retried {
            // A retry after a broken connection is the same query, counted once.
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
            shared.stats.drop(DropReason::BackendFull);
            return;
        };
        let (tx, rx) = mpsc::channel(settings.max_in_flight);
        // Cannot fail: the channel is new and has room.
        let _ = tx.try_send(q);
        self.slots[i].store(Some(Arc::new(ConnHandle { tx })));
        tokio::spawn(run_conn(
            Arc::clone(backend),
            rx,
            settings,
            Arc::clone(shared),
        ));
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
    shared: Arc<Shared>,
) {
    let connect = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(backend.addr));
    let stream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!("tcp connect to {} failed: {e}", backend.addr);
            return fail_queued(&backend, &mut rx, &shared);
        }
        Err(_) => {
            tracing::debug!("tcp connect to {} timed out", backend.addr);
            return fail_queued(&backend, &mut rx, &shared);
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
                let used = handle_answers(&mut rbuf, &mut pending, &backend, &shared);
                rbuf.drain(..used);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                pending.retain(|_, p| {
                    if now.saturating_duration_since(p.sent_at) < p.query.timeout {
                        return true;
                    }
                    backend.state.timeouts.fetch_add(1, Ordering::Relaxed);
                    backend.state.in_flight_done();
                    shared.stats.drop(DropReason::BackendTimeout);
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
        // Retry each unanswered query once on a fresh connection; then those still queued.
        rx.close();
        let queued = std::iter::from_fn(|| rx.try_recv().ok());
        let unanswered: Vec<TcpQuery> = pending
            .into_values()
            .map(|p| p.query)
            .chain(queued)
            .collect();
        for mut q in unanswered {
            // Every query was counted in flight by dispatch; a retry counts it again.
            backend.state.in_flight_done();
            if q.retried {
                shared.stats.drop(DropReason::TcpBackendError);
                continue;
            }
            q.retried = true;
            backend.tcp_pool.dispatch(&backend, q, settings, &shared);
        }
    }
}

/// Fails (or retries once) every query waiting in a connection that never opened.
fn fail_queued(backend: &Arc<Backend>, rx: &mut mpsc::Receiver<TcpQuery>, shared: &Arc<Shared>) {
    rx.close();
    while let Ok(_q) = rx.try_recv() {
        backend.state.in_flight_done();
        shared.stats.drop(DropReason::TcpBackendError);
    }
}

/// Matches every complete answer frame in `rbuf` and forwards it; returns the bytes consumed.
fn handle_answers(
    rbuf: &mut [u8],
    pending: &mut HashMap<u16, Pending>,
    backend: &Backend,
    shared: &Shared,
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
            shared.stats.drop(DropReason::BadAnswer);
            continue;
        };
        if !h.qr {
            shared.stats.drop(DropReason::BadAnswer);
            continue;
        }
        let Some(p) = pending.get(&h.id) else {
            shared.stats.drop(DropReason::UnmatchedAnswer);
            continue;
        };
        if !wire::same_question(&p.query.frame[2..], &p.query.question, msg) {
            shared.stats.drop(DropReason::MismatchedQuestion);
            continue;
        }
        let Some(p) = pending.remove(&h.id) else {
            continue;
        };
        backend.state.answers.fetch_add(1, Ordering::Relaxed);
        backend.state.in_flight_done();
        backend.state.latency.observe(p.sent_at.elapsed());
        wire::set_id(msg, p.client_id);
        let mut frame = Vec::with_capacity(len + 2);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
        frame.extend_from_slice(msg);
        let answer = Answer {
            frame,
            permit: p.query.permit,
        };
        // The channel has one place per permit, so it is never full; it is closed only when
        // the client has gone.
        if p.query.reply.try_send(answer).is_err() {
            shared.stats.drop(DropReason::ClientGone);
        }
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SetParams;
    use crate::health::AllDown;
    use crate::policy::Policy;
    use proptest::prelude::*;

    fn shared() -> Shared {
        let p = SetParams {
            policy: Policy::RoundRobin,
            timeout: Duration::from_secs(1),
            resend_after: Duration::from_millis(100),
            all_down: AllDown::FailOpen,
            passive_timeouts: 0,
            checked: false,
        };
        Shared::new(p, &["127.0.0.1:53".parse().unwrap()], 1, 1)
    }

    proptest! {
        /// Backend answer streams of arbitrary bytes, in arbitrary chunks: never a panic,
        /// never more consumed than received, and nothing matched without a pending query.
        #[test]
        fn answer_stream_of_garbage_is_safe(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let sh = shared();
            let b = sh.current().backends[0].clone();
            let mut pending = HashMap::new();
            let mut rbuf = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while pos < bytes.len() {
                let n = (*cut.next().unwrap()).min(bytes.len() - pos);
                rbuf.extend_from_slice(&bytes[pos..pos + n]);
                pos += n;
                let used = handle_answers(&mut rbuf, &mut pending, &b, &sh);
                prop_assert!(used <= rbuf.len());
                rbuf.drain(..used);
            }
            prop_assert_eq!(b.state.answers.load(Ordering::Relaxed), 0);
        }
    }
}
