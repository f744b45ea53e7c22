//! A UDP worker's side of the path to its backends: per backend, a set of connected sockets
//! whose source ports the kernel picks at random, replaced after a number of queries, and one
//! in-flight table.
//!
//! An off-path attacker who wants a forged answer accepted must hit, for a question it knows
//! is in flight, the upstream ID (16 random bits) *and* the port the query left from (RFC 5452
//! asks resolvers for the same pair). With one socket per backend for the process's life the
//! port never changes, and a port learnt once (side channels have revealed ports before) leaves
//! only the ID to guess. Here each backend has `upstream_sockets` sockets in use at once, each
//! replaced after it sent `upstream_socket_queries` queries; an answer is accepted only on the
//! socket its query left from. A replaced socket is kept, for its answers only, until its last
//! query is answered or timed out.
//!
//! Bounds: at most `upstream_sockets` sockets in use and [`MAX_RETIRED`] replaced ones open
//! per backend per worker; while that many replaced sockets still wait for answers, a socket
//! past its quota stays in use. When the process cannot open a socket (e.g. `RLIMIT_NOFILE`
//! reached), the socket due for replacement stays in use too: fewer ports, nothing lost; each
//! failure is counted and logged at most once a minute.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use crate::backend::Backend;
use crate::inflight::{InflightTable, Origin, Slot, TableFull};
use crate::mmsg::SendBatch;
use crate::sockets::{build_upstream_udp, BufferSizes};
use crate::stats::Stats;
use crate::wire::Question;

/// Replaced sockets still waiting for answers, per backend per worker.
pub const MAX_RETIRED: usize = 64;
/// A failure to open an upstream socket is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Settings for upstream sockets, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    /// Sockets in use at once per backend.
    pub sockets: usize,
    /// Queries one socket sends before it is replaced.
    pub socket_queries: u32,
    pub max_in_flight: usize,
    pub max_datagram: usize,
    pub buffers: BufferSizes,
}

/// A worker's path to one backend.
pub struct Upstream {
    pub backend: Arc<Backend>,
    /// Queries in flight over all of this backend's sockets (IDs unique across them).
    pub table: InflightTable,
    /// Sockets in use (indices into the socket slab).
    active: Vec<usize>,
    /// The socket the next queries leave from: `active[next % active.len()]`.
    next: usize,
    /// Replaced sockets still open for answers.
    open_retired: usize,
    /// The backend is no longer in the current set; kept until its table is empty.
    pub retired: bool,
}

/// One connected socket to a backend.
struct UpSocket {
    upstream: usize,
    socket: UdpSocket,
    /// Queries waiting for the next `sendmmsg`, tagged with their upstream ID.
    out: SendBatch,
    sent: u32,
    /// Queries of the table that left from this socket and are not answered yet.
    in_flight: u32,
    active: bool,
}

/// Every upstream of a worker and their sockets. Socket `i` is polled under token
/// `token_base + i`.
pub struct Upstreams {
    list: Vec<Option<Upstream>>,
    socks: Vec<Option<UpSocket>>,
    token_base: usize,
    settings: UpstreamSettings,
    /// Send batches of closed sockets, reused so replacing a socket allocates nothing.
    spare: Vec<SendBatch>,
    /// Counts sockets that could not be opened.
    stats: Arc<Stats>,
    last_log: Option<Instant>,
}

/// What one flush of a socket did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    pub calls: usize,
    pub queued: usize,
    pub sent: u64,
    /// The backend's port is closed (ICMP port unreachable) and the queries it refused were
    /// kept for evacuation.
    pub refused: bool,
    /// Queries the kernel refused otherwise (dropped, released).
    pub failed: u64,
}

impl Upstreams {
    pub fn new(token_base: usize, settings: UpstreamSettings, stats: Arc<Stats>) -> Upstreams {
        Upstreams {
            list: Vec::new(),
            socks: Vec::new(),
            token_base,
            settings,
            spare: Vec::new(),
            stats,
            last_log: None,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, ui: usize) -> Option<&Upstream> {
        self.list.get(ui).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, ui: usize) -> Option<&mut Upstream> {
        self.list.get_mut(ui).and_then(Option::as_mut)
    }

    /// Every upstream, for iteration by index.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.list.iter().flatten()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Upstream> {
        self.list.iter_mut().flatten()
    }

    /// The upstream of `backend` (the same `Arc`), if there is one.
    pub fn find(&self, backend: &Arc<Backend>) -> Option<usize> {
        self.list
            .iter()
            .position(|u| u.as_ref().is_some_and(|u| Arc::ptr_eq(&u.backend, backend)))
    }

    /// The socket polled under `token`, and its upstream.
    pub fn by_token(&self, token: Token) -> Option<(usize, usize)> {
        let si = token.0.checked_sub(self.token_base)?;
        let s = self.socks.get(si)?.as_ref()?;
        Some((si, s.upstream))
    }

    pub fn fd(&self, si: usize) -> Option<RawFd> {
        self.socks
            .get(si)
            .and_then(Option::as_ref)
            .map(|s| s.socket.as_raw_fd())
    }

    /// Adds an upstream for `backend` with its sockets; `None` if not one socket opened.
    pub fn add(&mut self, backend: &Arc<Backend>, registry: &Registry) -> Option<usize> {
        let ui = match self.list.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.list.push(None);
                self.list.len() - 1
            }
        };
        self.list[ui] = Some(Upstream {
            backend: Arc::clone(backend),
            table: InflightTable::new(self.settings.max_in_flight),
            active: Vec::with_capacity(self.settings.sockets),
            next: 0,
            open_retired: 0,
            retired: false,
        });
        for _ in 0..self.settings.sockets.max(1) {
            if let Some(si) = self.open_socket(ui, registry) {
                if let Some(u) = self.list[ui].as_mut() {
                    u.active.push(si);
                }
            }
        }
        if self.list[ui].as_ref().is_some_and(|u| u.active.is_empty()) {
            self.list[ui] = None;
            return None;
        }
        Some(ui)
    }

    fn open_socket(&mut self, ui: usize, registry: &Registry) -> Option<usize> {
        let addr = self.list[ui].as_ref()?.backend.addr;
        let opened = build_upstream_udp(addr, self.settings.buffers).and_then(|s| {
            let mut socket = UdpSocket::from_std(s);
            let si = self
                .socks
                .iter()
                .position(Option::is_none)
                .unwrap_or(self.socks.len());
            registry.register(&mut socket, Token(self.token_base + si), Interest::READABLE)?;
            Ok((si, socket))
        });
        let (si, socket) = match opened {
            Ok(x) => x,
            Err(e) => {
                self.stats
                    .upstream_socket_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let now = Instant::now();
                if self
                    .last_log
                    .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
                {
                    self.last_log = Some(now);
                    tracing::warn!(
                        "cannot open an upstream socket to {addr} ({e}); the sockets in use stay in use"
                    );
                }
                return None;
            }
        };
        let out = self
            .spare
            .pop()
            .unwrap_or_else(|| SendBatch::new(self.settings.max_datagram));
        let s = UpSocket {
            upstream: ui,
            socket,
            out,
            sent: 0,
            in_flight: 0,
            active: true,
        };
        if si == self.socks.len() {
            self.socks.push(Some(s));
        } else {
            self.socks[si] = Some(s);
        }
        Some(si)
    }

    /// Enters a query for upstream `ui` under a fresh random ID and queues it on the socket
    /// whose turn it is; returns the ID and the socket. The caller sends a socket whose batch
    /// [`Upstreams::is_full`] first.
    pub fn enqueue(
        &mut self,
        ui: usize,
        random_id: impl FnMut() -> u16,
        origin: Origin,
        msg: &mut [u8],
        question: Option<Question>,
        now: Instant,
    ) -> Result<(u16, usize), Enqueue> {
        let up = self.list[ui].as_mut().ok_or(Enqueue::NoSocket)?;
        if up.active.is_empty() {
            return Err(Enqueue::NoSocket);
        }
        let si = up.active[up.next % up.active.len()];
        let sock = self.socks[si].as_mut().ok_or(Enqueue::NoSocket)?;
        let id = up
            .table
            .insert(random_id, origin, msg, question, now, si as u32)
            .map_err(|TableFull| Enqueue::TableFull)?;
        let client_id = crate::wire::id(msg);
        crate::wire::set_id(msg, id);
        let queued = sock.out.push(msg, None, u32::from(id));
        crate::wire::set_id(msg, client_id);
        if !queued {
            up.table.release(id);
            return Err(Enqueue::TooLong);
        }
        sock.in_flight += 1;
        up.backend.state.in_flight_add(1);
        Ok((id, si))
    }

    /// The socket the next query of `ui` would leave from, if its batch cannot take `len`
    /// more bytes.
    pub fn full_socket(&self, ui: usize, len: usize) -> Option<usize> {
        let up = self.get(ui)?;
        let si = *up.active.get(up.next % up.active.len().max(1))?;
        self.socks[si].as_ref()?.out.is_full(len).then_some(si)
    }

    /// Sends what socket `si` has queued. A query the kernel refuses is released and counted
    /// as failed, except when the backend's port is closed and `keep_refused`: then it stays
    /// in the table for the caller to evacuate. Moves the upstream's turn to its next socket,
    /// replacing this one if it reached its quota.
    pub fn send(&mut self, si: usize, keep_refused: bool, registry: &Registry) -> Flushed {
        let mut f = Flushed::default();
        let Some(sock) = self.socks.get_mut(si).and_then(Option::as_mut) else {
            return f;
        };
        if sock.out.is_empty() {
            return f;
        }
        let ui = sock.upstream;
        let Some(up) = self.list[ui].as_mut() else {
            return f;
        };
        let fd = sock.socket.as_raw_fd();
        f.queued = sock.out.len();
        let (mut sent, mut refused, mut released) = (0u64, false, 0u32);
        let table = &mut up.table;
        let backend = &up.backend;
        f.calls = sock.out.flush(fd, |(tag, _, result)| match result {
            Ok(()) => sent += 1,
            Err(e) if keep_refused && e.kind() == io::ErrorKind::ConnectionRefused => {
                refused = true;
            }
            Err(_) => {
                if table.release(tag as u16) {
                    backend.state.in_flight_done();
                    released += 1;
                }
            }
        });
        sock.in_flight -= released;
        sock.sent = sock.sent.saturating_add(sent as u32);
        up.backend
            .state
            .queries
            .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
        f.sent = sent;
        f.refused = refused;
        f.failed = u64::from(released);
        let due = sock.active && sock.sent >= self.settings.socket_queries;
        up.next = up.next.wrapping_add(1);
        if due && up.open_retired < MAX_RETIRED {
            self.replace(si, registry);
        }
        f
    }

    /// Replaces active socket `si` by a new one on a new random port; `si` stays open for the
    /// answers to what it sent. Nothing changes if a new socket cannot be opened.
    fn replace(&mut self, si: usize, registry: &Registry) {
        let Some(ui) = self.socks[si].as_ref().map(|s| s.upstream) else {
            return;
        };
        let Some(new) = self.open_socket(ui, registry) else {
            return;
        };
        let Some(up) = self.list[ui].as_mut() else {
            return;
        };
        if let Some(pos) = up.active.iter().position(|&s| s == si) {
            up.active[pos] = new;
        }
        up.open_retired += 1;
        if let Some(old) = self.socks[si].as_mut() {
            old.active = false;
        }
        self.close_if_done(si, registry);
    }

    /// Takes the slot of answer `id` that arrived on socket `si`, if a query is in flight
    /// under that ID *from that socket* (an answer on another port is not its answer).
    pub fn slot(&self, si: usize, id: u16) -> Option<&Slot> {
        let ui = self.socks.get(si)?.as_ref()?.upstream;
        let slot = self.list[ui].as_ref()?.table.get(id)?;
        (slot.sock == si as u32).then_some(slot)
    }

    /// Frees the slot of `id` in upstream `ui` (answered, expired or moved), keeping the
    /// socket's count; closes a replaced socket whose last query this was. Returns the freed
    /// slot's socket, or `None` if `id` was not in flight.
    pub fn release(&mut self, ui: usize, id: u16, registry: &Registry) -> Option<usize> {
        let up = self.list.get_mut(ui)?.as_mut()?;
        let si = up.table.get(id)?.sock as usize;
        up.table.release(id);
        if let Some(s) = self.socks.get_mut(si).and_then(Option::as_mut) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        self.close_if_done(si, registry);
        Some(si)
    }

    /// Closes socket `si` if it is replaced (or its backend removed) and nothing of it is in
    /// flight.
    fn close_if_done(&mut self, si: usize, registry: &Registry) {
        let Some(s) = self.socks.get(si).and_then(Option::as_ref) else {
            return;
        };
        if s.active || s.in_flight > 0 {
            return;
        }
        let Some(mut s) = self.socks[si].take() else {
            return;
        };
        let _ = registry.deregister(&mut s.socket);
        if let Some(up) = self.list.get_mut(s.upstream).and_then(Option::as_mut) {
            up.open_retired = up.open_retired.saturating_sub(1);
        }
        self.spare.push(s.out);
    }

    /// Marks upstream `ui` as belonging to a backend no longer in the set, or back in it.
    pub fn set_retired(&mut self, ui: usize, retired: bool) {
        if let Some(up) = self.get_mut(ui) {
            up.retired = retired;
        }
    }

    /// Closes a retired upstream whose table is empty, with all its sockets.
    pub fn close_if_drained(&mut self, ui: usize, registry: &Registry) {
        let Some(up) = self.get(ui) else { return };
        if !up.retired || !up.table.is_empty() {
            return;
        }
        let sockets: Vec<usize> = self
            .socks
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.upstream == ui))
            .map(|(i, _)| i)
            .collect();
        for si in sockets {
            if let Some(s) = self.socks[si].as_mut() {
                s.active = false;
                s.in_flight = 0;
            }
            self.close_if_done(si, registry);
        }
        self.list[ui] = None;
    }

    /// Socket slots (open or free): the range [`Upstreams::send`] takes.
    pub fn socket_slots(&self) -> usize {
        self.socks.len()
    }

    /// Sockets open to backend `ui` (in use and replaced), for tests and metrics.
    pub fn sockets_of(&self, ui: usize) -> usize {
        self.socks
            .iter()
            .flatten()
            .filter(|s| s.upstream == ui)
            .count()
    }
}

/// Why a query could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueue {
    /// The backend's in-flight table is full.
    TableFull,
    /// No socket to the backend could be opened.
    NoSocket,
    /// Longer than a batch slot (cannot happen for a query under `udp.max_datagram_bytes`).
    TooLong,
}
