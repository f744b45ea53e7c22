//! What a TCP client connection and the tasks serving its queries (a pooled backend connection,
//! or a transfer's own connection) pass each other.
//!
//! A query travels with a [`ClientHandle`]: where its answer goes, where a transfer's stream of
//! messages goes, and where the query goes back if its backend connection fails. Every query
//! holds one of the connection's in-flight permits until its (last) answer is written, which
//! bounds how many answers a connection can have queued whatever its backends and its client
//! do; [`AnswerQueue`] bounds their bytes, per connection and for all connections together.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

use crate::backend::Backend;
use crate::stats::{DropReason, Stats};
use crate::wire::Question;

/// A message on its way to a client connection's writer, framed (2-byte length first).
#[derive(Debug)]
pub struct Answer {
    pub frame: Vec<u8>,
    /// The query's in-flight permit, returned once this is written: on an answer, and on the
    /// last message of a transfer. A slow reader cannot make the proxy buffer more than the cap.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Close the client connection after this (a transfer that broke off midway: the client
    /// must see the stream fail, not wait for the rest).
    pub close: bool,
    /// Its bytes in the connection's [`AnswerQueue`], given back when the answer is dropped
    /// (written, or thrown away with the connection). `None` for transfer streams, which wait
    /// for their client instead.
    pub queued: Option<Queued>,
    /// On a transfer's last message: the transfer counts as in progress until this is
    /// written or thrown away.
    pub transfer: Option<ActiveTransfer>,
}

/// Counts a zone transfer in [`Stats::transfers_active`] from its start until its last message
/// is written to the client (or given up): an upgrade's old process waits for these, so the
/// messages still queued for a slow secondary are not cut off.
pub struct ActiveTransfer(Arc<Stats>);

impl ActiveTransfer {
    pub fn new(stats: &Arc<Stats>) -> Self {
        stats.transfers_active.fetch_add(1, Ordering::Relaxed);
        ActiveTransfer(Arc::clone(stats))
    }
}

impl std::fmt::Debug for ActiveTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActiveTransfer")
    }
}

impl Drop for ActiveTransfer {
    fn drop(&mut self) {
        self.0.transfers_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The bytes of single answers waiting for one client connection's writer, counted against
/// that connection's budget and the budget of every connection together
/// ([`Stats::tcp_queued_bytes`]).
///
/// The kernel's socket buffer takes answers as fast as they come while the client reads; only
/// a client that stops reading (or reads slower than it asks) makes answers wait here. At half
/// its budget, or with answers waiting while every connection's together are at half the total
/// budget, the connection reads no new query ([`AnswerQueue::backlogged`]): TCP flow control
/// pushes back on the client. The other half is room for answers to queries already in flight;
/// an answer that would still take either count past its budget is refused, and the connection
/// is closed ([`AnswerQueue::aborted`]): a pooled backend connection never waits for a client,
/// so refusing is the only bound that holds whatever the client does.
#[derive(Debug)]
pub struct AnswerQueue {
    bytes: AtomicUsize,
    limit: usize,
    total_limit: usize,
    stats: Arc<Stats>,
    /// An answer did not fit: the connection is closing.
    overflowed: AtomicBool,
    /// Wakes the writer when `overflowed` is set.
    abort: Notify,
}

impl AnswerQueue {
    /// A connection's queue with a budget of `limit` bytes, in a total of `total_limit`.
    pub fn new(limit: usize, total_limit: usize, stats: Arc<Stats>) -> AnswerQueue {
        AnswerQueue {
            bytes: AtomicUsize::new(0),
            limit,
            total_limit,
            stats,
            overflowed: AtomicBool::new(false),
            abort: Notify::new(),
        }
    }

    /// Bytes waiting now on this connection.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Takes `len` bytes from both budgets, or nothing (and `None`) if either would go past
    /// its limit.
    pub fn reserve(self: &Arc<Self>, len: usize) -> Option<Queued> {
        let before = self.bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.limit {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return None;
        }
        let total = &self.stats.tcp_queued_bytes;
        let before = total.fetch_add(len as u64, Ordering::AcqRel);
        if before + len as u64 > self.total_limit as u64 {
            total.fetch_sub(len as u64, Ordering::AcqRel);
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return None;
        }
        Some(Queued {
            queue: Arc::clone(self),
            len,
        })
    }

    /// True while the connection should read no new query: its answers waiting reach half its
    /// budget, or it has answers waiting while all connections' together reach half the total.
    /// A client that keeps up with its answers is never held back by others' backlog.
    pub fn backlogged(&self) -> bool {
        let mine = self.bytes();
        mine >= self.limit / 2
            || (mine > 0
                && self.stats.tcp_queued_bytes.load(Ordering::Acquire)
                    >= (self.total_limit / 2) as u64)
    }

    /// Marks the connection for closing (an answer did not fit) and wakes its writer.
    pub fn overflow(&self) {
        self.overflowed.store(true, Ordering::Release);
        self.abort.notify_one();
    }

    /// Completes once an answer did not fit (at once if one already did).
    pub async fn aborted(&self) {
        if self.overflowed.load(Ordering::Acquire) {
            return;
        }
        self.abort.notified().await;
    }
}

/// One answer's bytes in an [`AnswerQueue`], given back when dropped.
#[derive(Debug)]
pub struct Queued {
    queue: Arc<AnswerQueue>,
    len: usize,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.queue.bytes.fetch_sub(self.len, Ordering::AcqRel);
        self.queue
            .stats
            .tcp_queued_bytes
            .fetch_sub(self.len as u64, Ordering::AcqRel);
    }
}

/// Where a query's results go back to its client connection.
#[derive(Debug, Clone)]
pub struct ClientHandle {
    /// Single answers. One place per permit, so `try_send` never finds it full: a pooled
    /// backend connection never waits for a client.
    pub answers: mpsc::Sender<Answer>,
    /// Transfer streams, sent with back-pressure: a slow client slows its own transfer's
    /// dedicated backend connection, nothing else.
    pub stream: mpsc::Sender<Answer>,
    /// Queries whose backend connection failed, to be routed once more. One place per permit.
    pub retry: mpsc::Sender<TcpQuery>,
    /// The bytes of answers waiting in `answers`.
    pub queue: Arc<AnswerQueue>,
}

impl ClientHandle {
    /// Queues a single answer (`frame`, length first) for the client, giving back `permit`
    /// once it is written. Never waits: an answer that does not fit the connection's
    /// [`AnswerQueue`] is dropped (counted) and the connection closed; one for a client that
    /// has gone is dropped (counted).
    pub fn answer(&self, frame: Vec<u8>, permit: OwnedSemaphorePermit, stats: &Stats) {
        let Some(queued) = self.queue.reserve(frame.len()) else {
            stats.dropped(DropReason::TcpAnswerQueueFull);
            self.queue.overflow();
            return;
        };
        let answer = Answer {
            frame,
            permit: Some(permit),
            close: false,
            queued: Some(queued),
            transfer: None,
        };
        // The channel has one place per permit, so it is never full; it is closed only when
        // the client has gone.
        if self.answers.try_send(answer).is_err() {
            stats.dropped(DropReason::ClientGone);
        }
    }
}

/// A client query bound for a backend over TCP.
#[derive(Debug)]
pub struct TcpQuery {
    /// The query framed as on the wire: 2-byte length, then the message with the client's ID.
    pub frame: Vec<u8>,
    /// Its first question, if it parses, with offsets relative to `frame[2..]`.
    pub question: Option<Question>,
    pub client: ClientHandle,
    pub permit: OwnedSemaphorePermit,
    /// Query timeout from the snapshot the query was routed with.
    pub timeout: Duration,
    /// Already handed back once after a failed connection.
    pub retried: bool,
    /// The backend whose connection failed it, passed over when it is routed again.
    pub avoid: Option<SocketAddr>,
    /// The cache epoch it was forwarded in, if its answer may be cached (0: not).
    pub cache_epoch: u64,
}

/// Hands queries whose connection to `backend` failed (or never opened) back to their client
/// connections, to be routed once more, avoiding that backend; a query that was handed back
/// before is dropped and counted.
pub fn hand_back(backend: &Backend, queries: impl IntoIterator<Item = TcpQuery>, stats: &Stats) {
    for mut q in queries {
        // Every query was counted in flight when dispatched; routing it again counts it anew.
        backend.state.in_flight_done();
        if q.retried {
            stats.dropped(DropReason::TcpBackendError);
            continue;
        }
        q.retried = true;
        q.avoid = Some(backend.addr);
        let retry = q.client.retry.clone();
        // One place per permit: never full; closed only when the client connection has gone.
        if retry.try_send(q).is_err() {
            stats.dropped(DropReason::ClientGone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_queue_bounds_bytes_per_connection_and_in_total() {
        let stats = Arc::new(Stats::default());
        let a = Arc::new(AnswerQueue::new(1000, 1500, Arc::clone(&stats)));
        let b = Arc::new(AnswerQueue::new(1000, 1500, Arc::clone(&stats)));
        let first = a.reserve(400).unwrap();
        assert!(!a.backlogged(), "under half of its budget");
        let second = a.reserve(200).unwrap();
        assert!(a.backlogged(), "at half of its budget reading pauses");
        assert!(a.reserve(401).is_none(), "past its budget: refused");
        let c = b.reserve(800).unwrap();
        assert!(b.backlogged());
        assert_eq!(stats.tcp_queued_bytes.load(Ordering::Relaxed), 1400);
        assert!(b.reserve(101).is_none(), "past the total: refused");
        assert_eq!(b.bytes(), 800, "a refusal takes nothing");
        drop((first, second));
        assert_eq!(a.bytes(), 0);
        // Nothing waiting on `a`: others' backlog does not hold it back.
        assert!(!a.backlogged());
        let d = a.reserve(10).unwrap();
        assert!(
            a.backlogged(),
            "with answers waiting, the total at half holds it back"
        );
        drop((c, d));
        assert_eq!(stats.tcp_queued_bytes.load(Ordering::Relaxed), 0);
        assert!(!a.backlogged() && !b.backlogged());
    }

    #[tokio::test]
    async fn an_overflow_wakes_the_writer() {
        let q = Arc::new(AnswerQueue::new(1000, 1000, Arc::new(Stats::default())));
        let q2 = Arc::clone(&q);
        let waiter = tokio::spawn(async move { q2.aborted().await });
        tokio::task::yield_now().await;
        q.overflow();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        // And at once afterwards.
        q.aborted().await;
    }
}
