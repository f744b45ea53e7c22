//! Zone transfers (AXFR, IXFR) over TCP: one query, a stream of answer messages.
//!
//! A transfer gets a backend connection of its own, opened for it and closed after it, so no
//! other client's query is interleaved with the stream and a slow client slows only its own
//! transfer. The query goes out byte for byte, ID included (the connection is nobody else's, so
//! there is nothing to tell apart); TSIG-signed transfers therefore verify at the client as
//! they would directly. Messages are relayed in order until [`XfrTracker`] sees the last one,
//! the backend closes the connection, or a bound is hit: the whole transfer within
//! `tcp.transfer_timeout_ms`, no more than `tcp.max_transfer_size_bytes` bytes, and each message
//! within `tcp.backend_idle_timeout_ms` of the previous one. A transfer cut short closes the
//! client connection, so the client sees it fail rather than wait.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::dataplane::tcp_msg::{hand_back, ActiveTransfer, Answer, TcpQuery};
use crate::stats::{DropReason, Stats};
use crate::wire;
use crate::xfr::{XfrKind, XfrTracker};

/// Bounds of one transfer, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct TransferSettings {
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    /// Longest wait for the next message.
    pub idle_timeout: Duration,
    /// Longest whole transfer.
    pub timeout: Duration,
    /// Most bytes relayed for one transfer.
    pub max_size: u64,
}

/// The transfer a TCP query asks for, if it is one (opcode QUERY, type AXFR or IXFR).
pub fn transfer_kind(q: &TcpQuery) -> Option<XfrKind> {
    let msg = &q.frame[2..];
    let opcode = wire::header(msg).ok()?.opcode;
    let question = q.question.filter(|q| q.count == 1)?;
    (opcode == 0).then_some(())?;
    XfrKind::of_qtype(question.qtype)
}

/// Why a transfer stopped before its end.
enum Cut {
    /// Nothing was relayed yet: the query can be routed again.
    BeforeFirst,
    /// Relayed partly; counted under this reason.
    After(DropReason),
    /// The client connection has gone.
    ClientGone,
}

/// Runs one transfer of `q` from `backend` (spawned per transfer).
pub async fn run(
    backend: Arc<Backend>,
    q: TcpQuery,
    kind: XfrKind,
    s: TransferSettings,
    stats: Arc<Stats>,
) {
    // Counted until its last message is written (or given up): an upgrade waits for it.
    let active = ActiveTransfer::new(&stats);
    backend.state.in_flight_add(1);
    if !q.retried {
        backend.state.queries.fetch_add(1, Ordering::Relaxed);
    }
    let started = Instant::now();
    let mut relayed = false;
    let outcome = relay(&backend, &q, kind, &s, &stats, started, &mut relayed).await;
    // The last message (or, for a stream the backend ended by closing, an empty marker that
    // writes nothing) carries the permit back.
    let last = match outcome {
        Ok(last) => Answer {
            frame: last.unwrap_or_default(),
            permit: Some(q.permit),
            close: false,
            queued: None,
            transfer: Some(active),
        },
        Err(Cut::BeforeFirst) => return hand_back(&backend, [q], &stats),
        Err(Cut::ClientGone) => {
            if !relayed {
                backend.state.in_flight_done();
            }
            return stats.dropped(DropReason::ClientGone);
        }
        Err(Cut::After(reason)) => {
            if !relayed {
                backend.state.timed_out();
            }
            stats.dropped(reason);
            Answer {
                frame: Vec::new(),
                permit: Some(q.permit),
                close: true,
                queued: None,
                transfer: Some(active),
            }
        }
    };
    if q.client.stream.send(last).await.is_err() {
        stats.dropped(DropReason::ClientGone);
    }
}

/// Connects, sends the query and relays the stream but its last message, which it returns
/// (`None` when the backend ended the stream by closing the connection).
async fn relay(
    backend: &Backend,
    q: &TcpQuery,
    kind: XfrKind,
    s: &TransferSettings,
    stats: &Stats,
    started: Instant,
    relayed: &mut bool,
) -> Result<Option<Vec<u8>>, Cut> {
    let connect = tokio::time::timeout(s.connect_timeout, TcpStream::connect(backend.addr));
    let Ok(Ok(mut conn)) = connect.await else {
        return Err(Cut::BeforeFirst);
    };
    let _ = conn.set_nodelay(true);
    match tokio::time::timeout(s.write_timeout, conn.write_all(&q.frame)).await {
        Ok(Ok(())) => {}
        _ => return Err(Cut::BeforeFirst),
    }
    let deadline = started + s.timeout;
    let mut tracker = XfrTracker::new(kind);
    let mut total: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(Cut::After(DropReason::TransferTimeout));
        }
        let wait = s.idle_timeout.min(deadline - now);
        let frame = match tokio::time::timeout(wait, read_frame(&mut conn)).await {
            Ok(Ok(Some(f))) => f,
            // The backend closed the connection after some of the stream: that ends it.
            Ok(Ok(None)) if *relayed => return Ok(None),
            Ok(Ok(None)) | Ok(Err(_)) if !*relayed => return Err(Cut::BeforeFirst),
            Ok(Ok(None)) | Ok(Err(_)) => return Err(Cut::After(DropReason::TcpBackendError)),
            Err(_) if Instant::now() >= deadline => {
                return Err(Cut::After(DropReason::TransferTimeout))
            }
            Err(_) => return Err(Cut::After(DropReason::BackendTimeout)),
        };
        total += frame.len() as u64;
        if total > s.max_size {
            return Err(Cut::After(DropReason::TransferTooLarge));
        }
        let msg = &frame[2..];
        let Ok(h) = wire::header(msg) else {
            stats.dropped(DropReason::BadAnswer);
            continue;
        };
        // The connection is the transfer's own and the ID the client's: a message with
        // another ID, or a first message with another question, is not part of it.
        let first_ok = *relayed || wire::answer_matches(&q.frame[2..], q.question.as_ref(), msg);
        if !h.qr || h.id != wire::id(&q.frame[2..]) || !first_ok {
            stats.dropped(DropReason::MismatchedQuestion);
            continue;
        }
        if !*relayed {
            backend.state.answered_one(started.elapsed());
            *relayed = true;
        }
        if tracker.feed(msg) {
            return Ok(Some(frame));
        }
        let answer = Answer {
            frame,
            permit: None,
            close: false,
            queued: None,
            transfer: None,
        };
        if q.client.stream.send(answer).await.is_err() {
            return Err(Cut::ClientGone);
        }
    }
}

/// Reads one length-prefixed message; `None` at a clean end of stream.
async fn read_frame(conn: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match conn.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u16::from_be_bytes(len) as usize;
    let mut frame = vec![0u8; 2 + n];
    frame[..2].copy_from_slice(&len);
    conn.read_exact(&mut frame[2..]).await?;
    Ok(Some(frame))
}
