//! The UDP path: worker threads that forward queries and relay answers.
//!
//! Each worker is one OS thread with its own `mio` poll, its own `SO_REUSEPORT` listener per
//! address, and its own [`Upstreams`]: per backend a few connected upstream sockets on random
//! ports (replaced as they are used, see [`crate::dataplane::upstream`]) and one in-flight
//! table. Nothing on this path is shared between workers except the backend snapshot (loaded
//! once per wake-up), the rate-limiting table and atomic counters, so there is no lock and,
//! once the tables are warm, no allocation.
//!
//! Datagrams move in batches ([`crate::mmsg`]): one `recvmmsg` reads what a socket has queued,
//! the queries it yields are queued per backend and leave in one `sendmmsg` per backend, and
//! answers likewise leave in one `sendmmsg` per listener. Under load this divides the system
//! calls and, more importantly on loopback, the wake-ups of the receiving processes, by the
//! batch size; at low rates a batch is a single datagram and nothing waits for a batch to fill.
//!
//! A wake-up runs in phases, and calls only go down this list, never back up:
//! 1. read each ready socket: [`Worker::read_listener`] validates, routes and queues queries,
//!    [`Worker::read_upstream`] matches answers and queues replies;
//! 2. [`Worker::flush`] sends what is queued; a backend found closed (ICMP port unreachable)
//!    is only noted while sending, and then [`Worker::evacuate`]d: made suspect (a probe is
//!    asked for at once; only its verdict takes the backend down), its queries queued for the
//!    rest of the set, sent in the next bounded round;
//! 3. every tick, [`Worker::scan_tables`] expires old queries and re-sends those stuck on
//!    removed or down backends.
//!
//! After a swap a worker keeps the upstreams of removed backends ("retired") until their tables
//! are empty: late answers from old backends are still delivered, and a query an old backend
//! leaves unanswered for `resend_after` is re-sent once to the new set.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use rand::Rng;

use crate::access::Verdict;
use crate::backend::{BackendSet, Shared};
use crate::cache::{self, PacketCache, Transport};
use crate::dataplane::query::{check_query, route, Route};
use crate::dataplane::upstream::{Enqueue, UpstreamSettings, Upstreams};
use crate::inflight::Origin;
use crate::lifecycle::Lifecycle;
use crate::mmsg::{RecvBatch, SendBatch, MAX_BATCH};
use crate::rrl::{Action, RrlPolicy};
use crate::sockets::enable_pktinfo;
use crate::stats::{BatchOp, DropReason, LocalHistogram, Proto};
use crate::systemd::Heartbeats;
use crate::wire::{self, Question};

/// How often in-flight tables are scanned for timeouts and due re-sends.
const TICK: Duration = Duration::from_millis(10);
/// How often a worker retries opening upstream sockets it could not open.
const ROUTE_RETRY: Duration = Duration::from_secs(1);
/// Largest UDP payload; answers are read into buffers this big.
const MAX_UDP: usize = 65_535;
/// The RCODE of lb's own answer to a query the access lists refuse.
const RCODE_REFUSED: u8 = 5;
/// Rounds of re-sending after sends found backends' ports closed; each query is re-sent at
/// most once, so this bound is only a guard.
const MAX_FLUSH_ROUNDS: usize = 4;
/// At stop, most batches read from each listener to empty it: more than a 4 MiB receive
/// buffer holds of small queries, and a bound where datagrams keep arriving.
const DRAIN_BATCHES: usize = 256;

/// Settings a UDP worker needs, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct UdpSettings {
    pub max_datagram: usize,
    pub upstream: UpstreamSettings,
    /// After shutdown starts, how long to keep waiting for answers to queries in flight.
    pub drain_timeout: Duration,
}

/// Starts one worker thread per entry of `listeners` (each entry: one socket per listen address).
/// Workers stop reading when `lifecycle` stops, and beat `beats` once per wake-up.
pub fn spawn_workers(
    listeners: Vec<Vec<std::net::UdpSocket>>,
    shared: Arc<Shared>,
    settings: UdpSettings,
    lifecycle: Arc<Lifecycle>,
    beats: Arc<Heartbeats>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::new();
    for (n, socks) in listeners.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let lifecycle = Arc::clone(&lifecycle);
        let beats = Arc::clone(&beats);
        let h = std::thread::Builder::new()
            .name(format!("lb-udp-{n}"))
            .spawn(move || match Worker::new(socks, shared, settings) {
                Ok(mut w) => w.run(&lifecycle, &beats, n),
                Err(e) => tracing::error!("udp worker {n} failed to start: {e}"),
            })?;
        handles.push(h);
    }
    Ok(handles)
}

/// Why a query was not forwarded.
enum Refusal {
    /// Drop it and count this reason.
    Drop(DropReason),
    /// Answer SERVFAIL (every backend down, `all_down = "servfail"`).
    Servfail,
}

struct Worker {
    poll: Poll,
    listeners: Vec<UdpSocket>,
    /// The paths to the backends; their sockets' tokens start at `listeners.len()`.
    up: Upstreams,
    /// For the snapshot of `route_generation`: backend index -> upstream index.
    route: Vec<Option<usize>>,
    route_generation: u64,
    /// From the snapshot of `route_generation`: passive checks run, so a query refused by a
    /// closed port is kept and moved rather than dropped.
    evacuate_refused: bool,
    /// From the snapshot of `route_generation`: response rate limiting, if on.
    rrl: Option<Arc<RrlPolicy>>,
    /// The rate table's second at this wake-up.
    rrl_now: u32,
    /// Answers by RRL action since the last flush, published once per flush.
    rrl_tally: [u64; 4],
    /// The packet cache, if on; a hit is built in `hit_buf`.
    cache: Option<Arc<PacketCache>>,
    hit_buf: Vec<u8>,
    /// Cache hits and misses since the last flush, published once per flush.
    cache_tally: (u64, u64),
    shared: Arc<Shared>,
    settings: UdpSettings,
    /// Queries read from a listener.
    queries: RecvBatch,
    /// Answers read from an upstream.
    answers: RecvBatch,
    /// Per listener: answers waiting for the next `sendmmsg`.
    replies: Vec<SendBatch>,
    /// Upstreams whose backend's port was found closed since the last [`Worker::flush`].
    refused: Vec<usize>,
    /// Copy of a query being re-sent.
    resend_buf: Vec<u8>,
    /// Scratch list of expired IDs.
    expired: Vec<u16>,
    /// Sockets that still had data when their batch budget ran out.
    hot: Vec<Token>,
    next_hot: Vec<Token>,
    counter: usize,
    rng: rand::rngs::ThreadRng,
}

impl Worker {
    fn new(
        socks: Vec<std::net::UdpSocket>,
        shared: Arc<Shared>,
        settings: UdpSettings,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut listeners = Vec::with_capacity(socks.len());
        let mut wildcard = false;
        for (i, s) in socks.into_iter().enumerate() {
            s.set_nonblocking(true)?;
            // On a wildcard address, learn where each query was sent, to answer from there.
            let local = s.local_addr()?;
            if local.ip().is_unspecified() {
                enable_pktinfo(&s, local.is_ipv6())?;
                wildcard = true;
            }
            let mut s = UdpSocket::from_std(s);
            poll.registry()
                .register(&mut s, Token(i), Interest::READABLE)?;
            listeners.push(s);
        }
        let replies = (0..listeners.len())
            .map(|_| SendBatch::new(MAX_UDP))
            .collect();
        Ok(Worker {
            poll,
            up: Upstreams::new(
                listeners.len(),
                settings.upstream,
                Arc::clone(&shared.stats),
            ),
            listeners,
            route: Vec::new(),
            route_generation: 0,
            evacuate_refused: false,
            rrl: None,
            rrl_now: 0,
            rrl_tally: [0; 4],
            hit_buf: vec![0; shared.cache.as_ref().map_or(0, |c| c.max_answer_size())],
            cache: shared.cache.clone(),
            cache_tally: (0, 0),
            shared,
            settings,
            // One byte more than allowed, to tell an oversized query from a full-size one.
            queries: if wildcard {
                RecvBatch::with_local_addrs(settings.max_datagram + 1)
            } else {
                RecvBatch::new(settings.max_datagram + 1)
            },
            answers: RecvBatch::new(MAX_UDP),
            replies,
            refused: Vec::new(),
            resend_buf: Vec::with_capacity(MAX_UDP),
            expired: Vec::new(),
            hot: Vec::new(),
            next_hot: Vec::new(),
            counter: 0,
            rng: rand::rng(),
        })
    }

    fn run(&mut self, lifecycle: &Lifecycle, beats: &Heartbeats, n: usize) {
        let mut events = Events::with_capacity(256);
        let mut last_scan = Instant::now();
        let mut last_route_retry = last_scan;
        let mut stopping: Option<Instant> = None;
        loop {
            let timeout = if self.hot.is_empty() {
                TICK
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("udp worker poll failed: {e}");
                    return;
                }
            }
            beats.beat(n);
            if stopping.is_none() && lifecycle.is_stopping() {
                stopping = Some(Instant::now());
                // After an upgrade the new process reads these very sockets: reading them
                // here would only take queries from it while this process's tables empty.
                if lifecycle.successor().is_none() {
                    self.drain_listeners();
                }
                for l in &mut self.listeners {
                    let _ = self.poll.registry().deregister(l);
                }
                self.hot.retain(|t| t.0 >= self.listeners.len());
            }
            for ev in events.iter() {
                self.hot.push(ev.token());
            }
            // A guard, not a clone: no shared refcount write per wake-up.
            let set = self.shared.load();
            if set.generation != self.route_generation {
                self.rebuild_routes(&set);
            }
            if self.rrl.is_some() {
                self.rrl_now = self.shared.rrl.now();
            }
            let hot = std::mem::take(&mut self.hot);
            for &tok in &hot {
                let more = if tok.0 < self.listeners.len() {
                    stopping.is_none() && self.read_listener(tok.0)
                } else {
                    self.read_upstream(tok)
                };
                // Send at once per socket batch, so backends and clients start working while
                // the next socket is read.
                self.flush(&self.shared.load());
                if more && !self.next_hot.contains(&tok) {
                    self.next_hot.push(tok);
                }
            }
            self.hot = hot;
            self.hot.clear();
            std::mem::swap(&mut self.hot, &mut self.next_hot);

            let now = Instant::now();
            if now.duration_since(last_scan) >= TICK {
                last_scan = now;
                // Once a second: each failed attempt is counted and logged.
                if set.generation == self.route_generation
                    && self.route.contains(&None)
                    && now.duration_since(last_route_retry) >= ROUTE_RETRY
                {
                    last_route_retry = now;
                    self.retry_routes(&set);
                }
                self.scan_tables(&set, now);
                self.flush(&set);
            }
            if let Some(since) = stopping {
                let in_flight: usize = self.up.iter().map(|u| u.table.len()).sum();
                if in_flight == 0 || since.elapsed() >= self.settings.drain_timeout {
                    return;
                }
            }
        }
    }

    /// Maps the new snapshot's backends to upstreams, creating sockets for new backends and
    /// retiring (not closing) those of removed ones.
    fn rebuild_routes(&mut self, set: &BackendSet) {
        for ui in 0..self.up.len() {
            self.up.set_retired(ui, true);
        }
        self.route.clear();
        for b in &set.backends {
            let idx = match self.up.find(b) {
                Some(i) => Some(i),
                None => self.up.add(b, self.poll.registry()),
            };
            if let Some(i) = idx {
                self.up.set_retired(i, false);
            } else {
                tracing::warn!("no upstream socket to {}: its queries are dropped", b.addr);
            }
            self.route.push(idx);
        }
        self.route_generation = set.generation;
        self.evacuate_refused = set.passive_timeouts != 0;
        self.rrl = set.rrl.clone();
    }

    /// Tries again to open sockets to the backends of the current set this worker has none
    /// to (the file descriptor limit was reached when the set came in).
    fn retry_routes(&mut self, set: &BackendSet) {
        for (bi, b) in set.backends.iter().enumerate() {
            if self.route.get(bi) != Some(&None) {
                continue;
            }
            if let Some(i) = self.up.add(b, self.poll.registry()) {
                self.up.set_retired(i, false);
                self.route[bi] = Some(i);
                tracing::info!(
                    "upstream socket to {} opened: its queries are sent again",
                    b.addr
                );
            }
        }
    }

    /// At stop: reads, once, what the listeners have queued, so that those queries are
    /// answered rather than closed with the sockets. Under socket activation the groups were
    /// steered to systemd's socket just before (`server::steer_to_systemd`), so nothing new
    /// arrives in the others; what arrives in systemd's waits for the next lb. Not after an
    /// upgrade: the new process reads the same sockets.
    fn drain_listeners(&mut self) {
        for li in 0..self.listeners.len() {
            for _ in 0..DRAIN_BATCHES {
                let more = self.read_listener(li);
                self.flush(&self.shared.load());
                if !more {
                    break;
                }
            }
        }
    }

    // ----- phase 1: reading -----

    /// Reads one batch of queries from listener `li` and queues them; true if the listener
    /// may have more.
    fn read_listener(&mut self, li: usize) -> bool {
        let mut batch = std::mem::take(&mut self.queries);
        let more = match batch.recv(self.listeners[li].as_raw_fd()) {
            Ok(n) => {
                // The snapshot as of after the datagrams arrived: a query sent once a swap has
                // returned is routed (and looked up in the cache) on the new set, never the old.
                let set = self.shared.load();
                if set.generation != self.route_generation {
                    self.rebuild_routes(&set);
                }
                self.shared.stats.batch(BatchOp::Recv, 1, n);
                self.shared.stats.queries_add(Proto::Udp, n);
                let now = Instant::now();
                for i in 0..n {
                    let local = batch.local(i);
                    let (msg, truncated, from) = batch.get_mut(i);
                    match from {
                        Some(client) => {
                            let origin = Origin {
                                client,
                                listener: li,
                                local,
                            };
                            self.handle_query(msg, truncated, origin, &set, now);
                        }
                        // Not possible on an IPv4/IPv6 socket; counted rather than ignored.
                        None => self.shared.stats.dropped(DropReason::SendFailed),
                    }
                }
                // A short batch means the queue was empty; edge-triggered polling reports
                // every datagram that arrives after that.
                n == MAX_BATCH
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            // ICMP errors for earlier sends surface here; they concern no particular query.
            Err(_) => true,
        };
        self.queries = batch;
        more
    }

    fn handle_query(
        &mut self,
        msg: &mut [u8],
        truncated: bool,
        origin: Origin,
        set: &BackendSet,
        now: Instant,
    ) {
        let stats = &self.shared.stats;
        if truncated || msg.len() > self.settings.max_datagram {
            return stats.dropped(DropReason::OversizedDatagram);
        }
        let q = match check_query(msg) {
            Ok(q) => q,
            Err(r) => return stats.dropped(r),
        };
        let qtype = q.filter(|q| q.count > 0).map(|q| q.qtype);
        match set
            .access
            .check(origin.client.ip(), wire::opcode(msg), qtype)
        {
            Verdict::Pass => {}
            Verdict::Drop(why) => return stats.denied(why),
            Verdict::Refuse(why) => {
                stats.denied(why);
                let n = wire::make_error(msg, q.as_ref(), RCODE_REFUSED);
                return self.reply(origin, &mut msg[..n]);
            }
        }
        // The packet cache: a hit is answered here; a miss goes on, tagged with the epoch it
        // was forwarded in (its answer is stored only if that epoch is still current).
        let mut cache_epoch = 0;
        if let Some(cache) = &self.cache {
            let key = cache::key_for(msg, q.as_ref(), Transport::Udp);
            if let (Some(key), Some(question)) = (key, q.as_ref()) {
                let epoch = cache.epoch(set.generation);
                // Stale answers only while no backend can answer.
                let stale = cache.serves_stale() && !set.backends.iter().any(|b| b.is_usable());
                let mut buf = std::mem::take(&mut self.hit_buf);
                let room = key.udp_limit().min(buf.len());
                let hit = cache.lookup(&key, msg, question, epoch, stale, &mut buf[..room]);
                if let Some(n) = hit {
                    self.cache_tally.0 += 1;
                    self.reply(origin, &mut buf[..n]);
                    self.hit_buf = buf;
                    return;
                }
                self.hit_buf = buf;
                self.cache_tally.1 += 1;
                cache_epoch = epoch;
            }
        }
        match self.forward(msg, q, origin, set, now, None) {
            Ok((ui, id)) => {
                if cache_epoch != 0 {
                    if let Some(slot) = self.up.get_mut(ui).and_then(|u| u.table.get_mut(id)) {
                        slot.cache_epoch = cache_epoch;
                    }
                }
            }
            Err(Refusal::Drop(r)) => self.shared.stats.dropped(r),
            Err(Refusal::Servfail) => {
                let n = wire::make_servfail(msg, q.as_ref());
                self.reply(origin, &mut msg[..n]);
            }
        }
    }

    /// Sends an answer to the client of `origin`, unless response rate limiting drops it or
    /// slips it (truncated, empty). Every UDP answer goes through here; TCP is never limited.
    fn reply(&mut self, origin: Origin, msg: &mut [u8]) {
        let action = match &self.rrl {
            None => return self.queue_reply(origin, msg),
            Some(p) => self
                .shared
                .rrl
                .decide(p, origin.client.ip(), msg, self.rrl_now),
        };
        self.rrl_tally[action as usize] += 1;
        match action {
            Action::Send | Action::Logged => self.queue_reply(origin, msg),
            Action::Drop => {}
            Action::Slip => {
                let n = wire::make_truncated(msg);
                self.queue_reply(origin, &msg[..n]);
            }
        }
    }

    /// Reads one batch of answers from the upstream socket of `token` and queues those that
    /// match a query in flight; true if the socket may have more. A closed port is only noted
    /// here.
    fn read_upstream(&mut self, token: Token) -> bool {
        let Some((si, ui)) = self.up.by_token(token) else {
            return false;
        };
        let Some(fd) = self.up.fd(si) else {
            return false;
        };
        let mut batch = std::mem::take(&mut self.answers);
        let more = match batch.recv(fd) {
            Ok(n) => {
                self.shared.stats.batch(BatchOp::Recv, 1, n);
                let mut tally = LocalHistogram::default();
                let mut id_matched = false;
                for i in 0..n {
                    let (msg, _, _) = batch.get_mut(i);
                    id_matched |= self.relay_answer(si, ui, msg, &mut tally);
                }
                if let Some(up) = self.up.get(ui) {
                    up.backend.state.answered(&tally);
                    if id_matched {
                        up.backend.state.alive();
                    }
                }
                n == MAX_BATCH
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    self.note_refused(ui);
                }
                true
            }
        };
        self.answers = batch;
        more
    }

    /// Matches one answer that arrived on socket `si` (of upstream `ui`) to its query, queues
    /// it for the client and tallies it (the backend's counters are updated once per batch).
    /// Returns whether its ID matched a query in flight from that socket: proof the backend is
    /// alive, even if the answer is refused.
    fn relay_answer(
        &mut self,
        si: usize,
        ui: usize,
        msg: &mut [u8],
        tally: &mut LocalHistogram,
    ) -> bool {
        let stats = &self.shared.stats;
        let Ok(h) = wire::header(msg) else {
            stats.dropped(DropReason::BadAnswer);
            return false;
        };
        if !h.qr {
            stats.dropped(DropReason::BadAnswer);
            return false;
        }
        // Only the socket the query left from: a forger must guess the port as well as the ID.
        let Some(slot) = self.up.slot(si, h.id) else {
            stats.dropped(DropReason::UnmatchedAnswer);
            return false;
        };
        if !wire::answer_matches(&slot.query, slot.question.as_ref(), msg) {
            // Keep the slot: a spoofed answer must not cancel the real one.
            stats.dropped(DropReason::MismatchedQuestion);
            return true;
        }
        if slot.cache_epoch != 0 {
            if let (Some(cache), Some(up)) = (&self.cache, self.up.get(ui)) {
                // Not from a backend whose zones lag: its answer may be the old zone's.
                if !up.backend.state.is_behind() {
                    let q = slot.question.as_ref();
                    if let Some(key) = cache::key_for(&slot.query, q, Transport::Udp) {
                        cache.insert(&key, slot.cache_epoch, msg);
                    }
                }
            }
        }
        wire::set_id(msg, slot.client_id);
        let origin = Origin {
            client: slot.client,
            listener: slot.listener,
            local: slot.local,
        };
        tally.observe(slot.sent_at.elapsed());
        self.up.release(ui, h.id, self.poll.registry());
        self.reply(origin, msg);
        true
    }

    // ----- queueing (never sends more than a full batch, never re-sends) -----

    /// Routes a validated query over `set` (avoiding the backend at `avoid` while another is
    /// usable) and queues it for its backend under a fresh random ID; returns where it went.
    fn forward(
        &mut self,
        msg: &mut [u8],
        q: Option<Question>,
        origin: Origin,
        set: &BackendSet,
        now: Instant,
        avoid: Option<SocketAddr>,
    ) -> Result<(usize, u16), Refusal> {
        self.counter = self.counter.wrapping_add(1);
        let stats = &self.shared.stats;
        let bi = match route(set, msg, q.as_ref(), self.counter, Some(stats), avoid) {
            Route::Backend(i) => i,
            Route::Servfail => return Err(Refusal::Servfail),
            Route::Drop(r) => return Err(Refusal::Drop(r)),
        };
        let ui = match self.route.get(bi).copied().flatten() {
            Some(ui) => ui,
            // This worker has no socket to that backend (none could be opened; retried every
            // second): route once more, avoiding it.
            None => {
                let avoid = Some(set.backends[bi].addr);
                match route(set, msg, q.as_ref(), self.counter, None, avoid) {
                    Route::Backend(i) => self.route.get(i).copied().flatten(),
                    _ => None,
                }
                .ok_or(Refusal::Drop(DropReason::SendFailed))?
            }
        };
        if let Some(si) = self.up.full_socket(ui, msg.len()) {
            self.send_queued(si);
        }
        let rng = &mut self.rng;
        match self.up.enqueue(ui, || rng.random(), origin, msg, q, now) {
            Ok((id, _)) => Ok((ui, id)),
            Err(Enqueue::TableFull) => Err(Refusal::Drop(DropReason::BackendFull)),
            // Only a query longer than max_datagram could fail to fit, and those are dropped
            // before this point; no socket: counted as a failed send.
            Err(Enqueue::NoSocket | Enqueue::TooLong) => Err(Refusal::Drop(DropReason::SendFailed)),
        }
    }

    /// Queues an answer to the client of `origin`, from the listener (and, on a wildcard
    /// listener, the very address) its query arrived on.
    fn queue_reply(&mut self, origin: Origin, msg: &[u8]) {
        let li = origin.listener;
        if self.replies[li].is_full(msg.len()) {
            self.send_replies(li);
        }
        if !self.replies[li].push_from(msg, Some(origin.client), origin.local, 0) {
            self.shared.stats.dropped(DropReason::SendFailed);
        }
    }

    /// Records that upstream `ui`'s backend refused a datagram (port closed); handled by the
    /// next [`Self::flush`].
    fn note_refused(&mut self, ui: usize) {
        if !self.refused.contains(&ui) {
            self.refused.push(ui);
        }
    }

    // ----- phase 2: sending -----

    /// Sends the queries queued on upstream socket `si`. A query the kernel refuses is taken
    /// out of the table and counted, except when the backend's port is closed and health checks
    /// run: then it stays, the refusal is noted, and [`Self::flush`] evacuates it.
    fn send_queued(&mut self, si: usize) {
        let keep_refused = self.evacuate_refused;
        let f = self.up.send(si, keep_refused, self.poll.registry());
        if f.queued == 0 {
            return;
        }
        let stats = &self.shared.stats;
        stats.batch(BatchOp::Send, f.calls, f.queued);
        for _ in 0..f.failed {
            stats.dropped(DropReason::SendFailed);
        }
        if f.refused {
            if let Some((_, ui)) = self.up.by_token(Token(self.listeners.len() + si)) {
                self.note_refused(ui);
            }
        }
    }

    fn send_replies(&mut self, li: usize) {
        let fd = self.listeners[li].as_raw_fd();
        let stats = &self.shared.stats;
        let queued = self.replies[li].len();
        let mut by_rcode = [0u32; 16];
        let calls = self.replies[li].flush(fd, |(_, msg, result)| match result {
            Ok(()) => by_rcode[usize::from(msg.get(3).map_or(0, |b| b & 0x0f))] += 1,
            Err(_) => stats.dropped(DropReason::SendFailed),
        });
        stats.responses_add(&by_rcode);
        stats.batch(BatchOp::Send, calls, queued);
    }

    /// Sends every queued query and reply. Backends found closed meanwhile are evacuated and
    /// the queries they had are sent in the next round (bounded: a query moves once).
    fn flush(&mut self, set: &BackendSet) {
        for _ in 0..MAX_FLUSH_ROUNDS {
            for si in 0..self.up.socket_slots() {
                self.send_queued(si);
            }
            if self.refused.is_empty() {
                break;
            }
            let mut refused = std::mem::take(&mut self.refused);
            for &ui in &refused {
                self.evacuate(ui, set);
            }
            refused.clear();
            self.refused = refused;
        }
        for li in 0..self.replies.len() {
            if !self.replies[li].is_empty() {
                self.send_replies(li);
            }
        }
        if self.rrl_tally != [0; 4] {
            self.shared.rrl.count(&self.rrl_tally);
            self.rrl_tally = [0; 4];
        }
        if let Some(cache) = &self.cache {
            if self.cache_tally != (0, 0) {
                cache.count(self.cache_tally.0, self.cache_tally.1);
                self.cache_tally = (0, 0);
            }
        }
    }

    /// An ICMP "port unreachable" came back on a connected socket to the backend of `ui`:
    /// nothing listens there any more, or an off-path attacker forged it. With health checks
    /// on, the backend becomes suspect and the checker probes it at once: a closed port fails
    /// that probe and goes down, a forgery changes nothing (only probes decide). Meanwhile what
    /// it had in flight is queued for the rest of the set (avoiding it while another backend
    /// is usable) instead of waiting for the timeout; each query moves once. Without health
    /// checks nothing would probe it, so timeouts decide.
    fn evacuate(&mut self, ui: usize, set: &BackendSet) {
        let Some(up) = self.up.get(ui) else {
            return;
        };
        if set.passive_timeouts == 0 {
            return;
        }
        if up.backend.port_unreachable() {
            self.shared.request_probe();
        }
        let avoid = up.backend.addr;
        let mut ids = std::mem::take(&mut self.expired);
        ids.clear();
        let now = Instant::now();
        up.table.older_than(now, Duration::ZERO, &mut ids);
        for &id in &ids {
            self.resend_once(ui, id, set, now, Some(avoid));
        }
        self.expired = ids;
    }

    // ----- phase 3: timers -----

    /// Times out old queries, re-sends those stuck on removed or down backends, and closes
    /// retired upstreams whose tables are empty.
    fn scan_tables(&mut self, set: &BackendSet, now: Instant) {
        for ui in 0..self.up.len() {
            let Some(up) = self.up.get(ui) else {
                continue;
            };
            let mut expired = std::mem::take(&mut self.expired);
            expired.clear();
            // Queries stuck on a removed backend, or on one found down meanwhile (possibly by
            // another worker), move to the usable backends instead of waiting for the timeout.
            if up.retired || !up.backend.state.is_up() {
                up.table.older_than(now, set.resend_after, &mut expired);
                for &id in &expired {
                    self.resend_or_expire(ui, id, set, now);
                }
            } else {
                up.table.older_than(now, set.timeout, &mut expired);
                for &id in &expired {
                    if self.expire(ui, id) {
                        let suspect = self
                            .up
                            .get(ui)
                            .is_some_and(|u| u.backend.passive_timeout(set.passive_timeouts));
                        if suspect {
                            self.shared.request_probe();
                        }
                    }
                }
            }
            self.expired = expired;
            self.up.close_if_drained(ui, self.poll.registry());
        }
    }

    /// A query on a retired or down upstream went unanswered for `resend_after`: send it once
    /// to the current set; if it was already re-sent, count a timeout once the normal timeout
    /// has passed.
    fn resend_or_expire(&mut self, ui: usize, id: u16, set: &BackendSet, now: Instant) {
        let Some(slot) = self.up.get(ui).and_then(|u| u.table.get(id)) else {
            return;
        };
        if slot.resent {
            if now.saturating_duration_since(slot.sent_at) >= set.timeout {
                self.expire(ui, id);
            }
            return;
        }
        self.resend_once(ui, id, set, now, None);
    }

    /// Moves one query from upstream `ui` to a backend of the current set (once per query),
    /// other than `avoid` while another is usable.
    fn resend_once(
        &mut self,
        ui: usize,
        id: u16,
        set: &BackendSet,
        now: Instant,
        avoid: Option<SocketAddr>,
    ) {
        let Some(up) = self.up.get(ui) else {
            return;
        };
        let Some(slot) = up.table.get(id) else {
            return;
        };
        if slot.resent {
            return;
        }
        let origin = Origin {
            client: slot.client,
            listener: slot.listener,
            local: slot.local,
        };
        let question = slot.question;
        let mut msg = std::mem::take(&mut self.resend_buf);
        msg.clear();
        msg.extend_from_slice(&slot.query);
        up.backend.state.in_flight_done();
        self.up.release(ui, id, self.poll.registry());
        match self.forward(&mut msg, question, origin, set, now, avoid) {
            Ok((new_ui, new_id)) => {
                if let Some(slot) = self
                    .up
                    .get_mut(new_ui)
                    .and_then(|u| u.table.get_mut(new_id))
                {
                    slot.resent = true;
                }
            }
            Err(Refusal::Drop(r)) => self.shared.stats.dropped(r),
            // The client's first query got no SERVFAIL either; let it retry.
            Err(Refusal::Servfail) => self.shared.stats.dropped(DropReason::NoBackend),
        }
        self.resend_buf = msg;
    }

    /// Gives up on query `id` of upstream `ui` as a backend timeout; false if it was no longer
    /// in flight.
    fn expire(&mut self, ui: usize, id: u16) -> bool {
        let Some(backend) = self.up.get(ui).map(|u| Arc::clone(&u.backend)) else {
            return false;
        };
        if self.up.release(ui, id, self.poll.registry()).is_none() {
            return false;
        }
        backend.state.timed_out();
        self.shared.stats.dropped(DropReason::BackendTimeout);
        true
    }
}
