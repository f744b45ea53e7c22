//! What a TCP client connection and the tasks serving its queries (a pooled backend connection,
//! or a transfer's own connection) pass each other.
//!
//! A query travels with a [`ClientHandle`]: where its answer goes, where a transfer's stream of
//! messages goes, and where the query goes back if its backend connection fails. Every query
//! holds one of the connection's in-flight permits until its (last) answer is written, which
//! bounds what a connection can have queued whatever its backends and its client do.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit};

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
