//! Process-wide counters (queries, answers by RCODE, every reason the proxy drops for) and the
//! latency histograms each backend keeps.
//!
//! Plain atomics indexed by enums, so counting costs one relaxed add and the metrics exporter
//! reads them without touching the per-packet path. The control plane's operations (reloads,
//! upgrades, swaps, state file writes) keep an [`OpRecord`] each: outcomes counted, the time of
//! the last success, and whether the last attempt failed (a gauge that stays set until fixed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::AllDown;

/// Every reason a packet, frame or connection is dropped. Each one is counted, under the
/// family of its [`DropKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A datagram or frame shorter than the DNS header.
    ShortHeader,
    /// A response (QR=1) arriving at a listener.
    QrSet,
    /// A client datagram longer than `udp.max_datagram_bytes`.
    OversizedDatagram,
    /// No usable backend and the all-down behaviour says drop.
    NoBackend,
    /// The chosen backend's in-flight table is full.
    BackendFull,
    /// An answer from a backend that matches no query in flight (late, spoofed or duplicated).
    UnmatchedAnswer,
    /// An answer whose ID matched but whose question did not (possible spoofing).
    MismatchedQuestion,
    /// A backend answer too short or malformed to inspect.
    BadAnswer,
    /// A backend did not answer in time.
    BackendTimeout,
    /// Sending failed (socket buffer full, unreachable).
    SendFailed,
    /// A TCP frame with length 0.
    TcpZeroLength,
    /// A TCP frame longer than `tcp.max_query_size_bytes`.
    TcpOversized,
    /// A TCP client that sent nothing for `tcp.idle_timeout_ms`.
    TcpIdleTimeout,
    /// A TCP client that started a frame and did not complete it within `tcp.read_timeout_ms`
    /// of its first byte.
    TcpReadTimeout,
    /// A TCP client that did not read its answers within `tcp.write_timeout_ms`.
    TcpWriteTimeout,
    /// A TCP connection refused by `tcp.max_connections`.
    TcpConnectionLimit,
    /// A TCP connection refused by `tcp.max_connections_per_prefix` (its client network has
    /// that many open).
    TcpPrefixLimit,
    /// A TCP connection closed (after answering what it had read) at
    /// `tcp.max_connection_age_ms`.
    TcpMaxAge,
    /// A TCP connection closed (after answering what it had read) at
    /// `tcp.max_queries_per_connection`.
    TcpMaxQueries,
    /// An answer for a TCP client whose queued answers would go past
    /// `tcp.max_queued_per_connection_bytes` or `tcp.max_queued_bytes`; the connection closes.
    TcpAnswerQueueFull,
    /// A query lost because its backend TCP connection failed.
    TcpBackendError,
    /// An answer for a TCP client that had already gone.
    ClientGone,
    /// A zone transfer that did not end within `tcp.transfer_timeout_ms`.
    TransferTimeout,
    /// A zone transfer longer than `tcp.max_transfer_size_bytes`.
    TransferTooLarge,
}

impl DropReason {
    pub const ALL: [DropReason; 24] = [
        DropReason::ShortHeader,
        DropReason::QrSet,
        DropReason::OversizedDatagram,
        DropReason::NoBackend,
        DropReason::BackendFull,
        DropReason::UnmatchedAnswer,
        DropReason::MismatchedQuestion,
        DropReason::BadAnswer,
        DropReason::BackendTimeout,
        DropReason::SendFailed,
        DropReason::TcpZeroLength,
        DropReason::TcpOversized,
        DropReason::TcpIdleTimeout,
        DropReason::TcpReadTimeout,
        DropReason::TcpWriteTimeout,
        DropReason::TcpConnectionLimit,
        DropReason::TcpPrefixLimit,
        DropReason::TcpMaxAge,
        DropReason::TcpMaxQueries,
        DropReason::TcpAnswerQueueFull,
        DropReason::TcpBackendError,
        DropReason::ClientGone,
        DropReason::TransferTimeout,
        DropReason::TransferTooLarge,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ShortHeader => "short-header",
            DropReason::QrSet => "qr-set",
            DropReason::OversizedDatagram => "oversized-datagram",
            DropReason::NoBackend => "no-backend",
            DropReason::BackendFull => "backend-full",
            DropReason::UnmatchedAnswer => "unmatched-answer",
            DropReason::MismatchedQuestion => "mismatched-question",
            DropReason::BadAnswer => "bad-answer",
            DropReason::BackendTimeout => "backend-timeout",
            DropReason::SendFailed => "send-failed",
            DropReason::TcpZeroLength => "tcp-zero-length",
            DropReason::TcpOversized => "tcp-oversized",
            DropReason::TcpIdleTimeout => "tcp-idle-timeout",
            DropReason::TcpReadTimeout => "tcp-read-timeout",
            DropReason::TcpWriteTimeout => "tcp-write-timeout",
            DropReason::TcpConnectionLimit => "tcp-connection-limit",
            DropReason::TcpPrefixLimit => "tcp-prefix-limit",
            DropReason::TcpMaxAge => "tcp-max-age",
            DropReason::TcpMaxQueries => "tcp-max-queries",
            DropReason::TcpAnswerQueueFull => "tcp-answer-queue-full",
            DropReason::TcpBackendError => "tcp-backend-error",
            DropReason::ClientGone => "client-gone",
            DropReason::TransferTimeout => "transfer-timeout",
            DropReason::TransferTooLarge => "transfer-too-large",
        }
    }

    /// What the drop counts: a packet (a datagram, a frame, a query or an answer) or a TCP
    /// connection (refused at accept, or closed by lb).
    ///
    /// A reason that drops an answer and then closes its connection (`tcp-answer-queue-full`)
    /// counts the answer; a broken frame (`tcp-zero-length`, `tcp-oversized`) closes the
    /// connection it came on, which is what is counted, as for a zone transfer cut short.
    pub fn kind(self) -> DropKind {
        match self {
            DropReason::TcpZeroLength
            | DropReason::TcpOversized
            | DropReason::TcpIdleTimeout
            | DropReason::TcpReadTimeout
            | DropReason::TcpWriteTimeout
            | DropReason::TcpConnectionLimit
            | DropReason::TcpPrefixLimit
            | DropReason::TcpMaxAge
            | DropReason::TcpMaxQueries
            | DropReason::TransferTimeout
            | DropReason::TransferTooLarge => DropKind::Connection,
            DropReason::ShortHeader
            | DropReason::QrSet
            | DropReason::OversizedDatagram
            | DropReason::NoBackend
            | DropReason::BackendFull
            | DropReason::UnmatchedAnswer
            | DropReason::MismatchedQuestion
            | DropReason::BadAnswer
            | DropReason::BackendTimeout
            | DropReason::SendFailed
            | DropReason::TcpAnswerQueueFull
            | DropReason::TcpBackendError
            | DropReason::ClientGone => DropKind::Packet,
        }
    }
}

/// What a [`DropReason`] counts (`lb_dropped_packets_total` or `lb_dropped_connections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropKind {
    /// A datagram, frame, query or answer.
    Packet,
    /// A TCP connection refused or closed.
    Connection,
}

/// How a control operation ended (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub const ALL: [Outcome; 2] = [Outcome::Success, Outcome::Failure];

    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

/// What became of one kind of control operation: outcomes counted, when it last succeeded, and
/// whether its last attempt failed.
///
/// `last_failed` is the gauge an alert can rely on: it stays set until an attempt succeeds,
/// whereas an alert on `increase()` of the failure counter resolves by itself once the
/// failure leaves its window, fixed or not. Control plane only (never the per-packet path).
#[derive(Debug, Default)]
pub struct OpRecord {
    outcomes: [AtomicU64; 2],
    /// Milliseconds since the Unix epoch of the last success; 0 = never.
    last_success_ms: AtomicU64,
    last_failed: AtomicBool,
}

/// An [`OpRecord`] as handed to the new process of an upgrade.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpSnapshot {
    pub successes: u64,
    pub failures: u64,
    pub last_success_ms: u64,
    pub last_failed: bool,
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl OpRecord {
    /// Counts a success: the time is now and the failing gauge clears.
    pub fn succeeded(&self) {
        self.outcomes[Outcome::Success as usize].fetch_add(1, Ordering::Relaxed);
        self.last_success_ms.store(unix_now_ms(), Ordering::Relaxed);
        self.last_failed.store(false, Ordering::Relaxed);
    }

    /// Counts a failure; the failing gauge stays set until the next success.
    pub fn failed(&self) {
        self.outcomes[Outcome::Failure as usize].fetch_add(1, Ordering::Relaxed);
        self.last_failed.store(true, Ordering::Relaxed);
    }

    /// Counts `r` as a success or a failure.
    pub fn record<T, E>(&self, r: &Result<T, E>) {
        match r {
            Ok(_) => self.succeeded(),
            Err(_) => self.failed(),
        }
    }

    /// Sets the time of the last success to now without counting one (the config read at
    /// start is the first successful load, as Prometheus's own
    /// `prometheus_config_last_reload_success_timestamp_seconds` has it).
    pub fn mark_success_time(&self) {
        self.last_success_ms.store(unix_now_ms(), Ordering::Relaxed);
    }

    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes[o as usize].load(Ordering::Relaxed)
    }

    /// Seconds since the Unix epoch of the last success; 0 if none yet.
    pub fn last_success_seconds(&self) -> f64 {
        self.last_success_ms.load(Ordering::Relaxed) as f64 / 1e3
    }

    /// True from a failure until the next success.
    pub fn last_failed(&self) -> bool {
        self.last_failed.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> OpSnapshot {
        OpSnapshot {
            successes: self.count(Outcome::Success),
            failures: self.count(Outcome::Failure),
            last_success_ms: self.last_success_ms.load(Ordering::Relaxed),
            last_failed: self.last_failed(),
        }
    }

    /// Continues the record of another process (an upgrade's predecessor).
    pub fn restore(&self, s: &OpSnapshot) {
        self.outcomes[Outcome::Success as usize].store(s.successes, Ordering::Relaxed);
        self.outcomes[Outcome::Failure as usize].store(s.failures, Ordering::Relaxed);
        self.last_success_ms
            .store(s.last_success_ms, Ordering::Relaxed);
        self.last_failed.store(s.last_failed, Ordering::Relaxed);
    }
}

/// Transport a query arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Proto {
    Udp,
    Tcp,
}

/// The counters. One instance lives in [`crate::backend::Shared`].
#[derive(Debug, Default)]
pub struct Stats {
    drops: [AtomicU64; DropReason::ALL.len()],
    queries: [AtomicU64; 2],
    responses: [AtomicU64; 16],
    /// Backend set swaps: successes are every change of the set (set-backends and reloads,
    /// `lb_backend_set_swaps_total`), failures the refused set-backends
    /// (`lb_swap_failures_total`, `lb_last_swap_failed`).
    pub swaps: OpRecord,
    /// `lb ctl reload` and SIGHUP.
    pub reloads: OpRecord,
    /// `lb ctl upgrade` and SIGUSR2, as seen by the process that hands over (failures) and
    /// continued by the one it hands over to (successes).
    pub upgrades: OpRecord,
    /// Writes of the state file: failures are `lb_state_file_write_failures_total`, and
    /// `lb_state_file_write_failing` stays 1 until a write succeeds (the swap or drain was
    /// refused meanwhile).
    pub state_writes: OpRecord,
    /// TCP client connections open now.
    pub tcp_open: AtomicU64,
    /// TCP client connections accepted since start.
    pub tcp_total: AtomicU64,
    /// Bytes of answers waiting for TCP clients' writers, every connection together (bounded
    /// by `tcp.max_queued_bytes`).
    pub tcp_queued_bytes: AtomicU64,
    /// Queries that found every backend down, by the all-down behaviour applied.
    all_down: [AtomicU64; 3],
    /// UDP system calls (recvmmsg, sendmmsg) and the datagrams they moved: their ratio is
    /// the batch size, the main lever on CPU per query under load.
    batches: [AtomicU64; 2],
    batched: [AtomicU64; 2],
    /// Queries refused or dropped by the access lists, by [`Denied`].
    denied: [AtomicU64; Denied::ALL.len()],
    /// Upstream UDP sockets that could not be opened (e.g. at `RLIMIT_NOFILE`).
    pub upstream_socket_failures: AtomicU64,
    /// Zone transfers being relayed now (an upgrade's old process waits for them).
    pub transfers_active: AtomicU64,
}

/// The control operations' records an upgrade carries over, so that the new process
/// continues the counters and failing gauges instead of starting them afresh (an upgrade's
/// success would otherwise be counted only by the process that exits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedRecords {
    pub upgrades: OpSnapshot,
    pub swaps: OpSnapshot,
    pub state_writes: OpSnapshot,
}

/// Why the access lists refused a query (`lb_access_denied_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Denied {
    /// The client is not allowed (`deny`, or not in a non-empty `allow`).
    Client,
    /// A zone transfer from a client not in `transfer_allow`.
    Transfer,
    /// UPDATE from a client not in `update_allow`.
    Update,
    /// NOTIFY from a client not in `notify_allow`.
    Notify,
}

impl Denied {
    pub const ALL: [Denied; 4] = [
        Denied::Client,
        Denied::Transfer,
        Denied::Update,
        Denied::Notify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Client => "client",
            Denied::Transfer => "transfer",
            Denied::Update => "update",
            Denied::Notify => "notify",
        }
    }
}

/// Direction of a batched UDP system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum BatchOp {
    Recv,
    Send,
}

impl BatchOp {
    /// The `op` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchOp::Recv => "recv",
            BatchOp::Send => "send",
        }
    }
}

impl Stats {
    #[inline]
    pub fn dropped(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `calls` batched system calls that moved `datagrams` (once per batch, not per
    /// packet).
    #[inline]
    pub fn batch(&self, op: BatchOp, calls: usize, datagrams: usize) {
        self.batches[op as usize].fetch_add(calls as u64, Ordering::Relaxed);
        self.batched[op as usize].fetch_add(datagrams as u64, Ordering::Relaxed);
    }

    /// (system calls, datagrams) for `op`.
    pub fn batches(&self, op: BatchOp) -> (u64, u64) {
        (
            self.batches[op as usize].load(Ordering::Relaxed),
            self.batched[op as usize].load(Ordering::Relaxed),
        )
    }

    #[inline]
    pub fn query(&self, proto: Proto) {
        self.queries[proto as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` queries at once (a UDP batch).
    #[inline]
    pub fn queries_add(&self, proto: Proto, n: usize) {
        self.queries[proto as usize].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a batch of answers tallied by RCODE.
    pub fn responses_add(&self, by_rcode: &[u32; 16]) {
        for (c, &n) in self.responses.iter().zip(by_rcode) {
            if n > 0 {
                c.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
    }

    /// Counts an answer sent to a client by its RCODE (low 4 bits of byte 3).
    #[inline]
    pub fn response(&self, msg: &[u8]) {
        let rcode = msg.get(3).map_or(0, |b| b & 0x0f) as usize;
        self.responses[rcode].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a query that found every backend down.
    #[inline]
    pub fn all_down(&self, mode: AllDown) {
        self.all_down[mode as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn all_down_count(&self, mode: AllDown) -> u64 {
        self.all_down[mode as usize].load(Ordering::Relaxed)
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    /// The records an upgrade hands to the new process: upgrades, swaps and state file
    /// writes (not reloads: the new process reads the config afresh, a successful load).
    pub fn carried_records(&self) -> CarriedRecords {
        CarriedRecords {
            upgrades: self.upgrades.snapshot(),
            swaps: self.swaps.snapshot(),
            state_writes: self.state_writes.snapshot(),
        }
    }

    /// Continues the records of the process this one took over from.
    pub fn restore_records(&self, c: &CarriedRecords) {
        self.upgrades.restore(&c.upgrades);
        self.swaps.restore(&c.swaps);
        self.state_writes.restore(&c.state_writes);
    }

    pub fn queries(&self, proto: Proto) -> u64 {
        self.queries[proto as usize].load(Ordering::Relaxed)
    }

    /// Counts a query the access lists refused.
    #[inline]
    pub fn denied(&self, reason: Denied) {
        self.denied[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn denied_count(&self, reason: Denied) -> u64 {
        self.denied[reason as usize].load(Ordering::Relaxed)
    }

    pub fn responses(&self, rcode: u8) -> u64 {
        self.responses[(rcode & 0x0f) as usize].load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the answer latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// The same bounds in nanoseconds, for the hot path.
const LATENCY_BUCKETS_NS: [u64; 14] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// A fixed-bucket latency histogram made of atomics: observing is a short scan and two adds.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts; the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// The bucket of a duration in nanoseconds (the last one is +Inf).
#[inline]
fn bucket_of(ns: u64) -> usize {
    LATENCY_BUCKETS_NS
        .iter()
        .position(|&b| ns <= b)
        .unwrap_or(LATENCY_BUCKETS_NS.len())
}

#[inline]
fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl LatencyHistogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = nanos(d);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts as Prometheus wants them: cumulative per bucket bound, total, sum.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; LATENCY_BUCKETS.len()];
        let mut total = 0;
        for (i, c) in cumulative.iter_mut().enumerate() {
            total += self.buckets[i].load(Ordering::Relaxed);
            *c = total;
        }
        total += self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            cumulative,
            count: total,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Adds what a worker tallied over one batch.
    pub fn merge(&self, local: &LocalHistogram) {
        for (b, &n) in self.buckets.iter().zip(&local.buckets) {
            if n > 0 {
                b.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sum_ns.fetch_add(local.sum_ns, Ordering::Relaxed);
    }
}

/// A [`LatencyHistogram`] read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations at or under each bound of [`LATENCY_BUCKETS`].
    pub cumulative: [u64; LATENCY_BUCKETS.len()],
    /// All observations (the +Inf bucket).
    pub count: u64,
    pub sum_seconds: f64,
}

/// A worker's tally over one batch, merged into the shared [`LatencyHistogram`] once per batch
/// instead of two shared atomic adds per answer (the workers would fight over the cache line).
#[derive(Debug, Default, Clone)]
pub struct LocalHistogram {
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    sum_ns: u64,
    pub count: u64,
}

impl LocalHistogram {
    #[inline]
    pub fn observe(&mut self, d: Duration) {
        let ns = nanos(d);
        self.buckets[bucket_of(ns)] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reasons_have_distinct_labels() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            for s in &DropReason::ALL[..i] {
                assert_ne!(s.as_str(), r.as_str());
            }
        }
    }

    #[test]
    fn every_drop_reason_is_a_packet_or_a_connection() {
        let conns: Vec<&str> = DropReason::ALL
            .iter()
            .filter(|r| r.kind() == DropKind::Connection)
            .map(|r| r.as_str())
            .collect();
        assert!(conns.contains(&"tcp-connection-limit") && conns.contains(&"tcp-idle-timeout"));
        assert_eq!(DropReason::ShortHeader.kind(), DropKind::Packet);
        assert_eq!(DropReason::TcpAnswerQueueFull.kind(), DropKind::Packet);
        assert_eq!(conns.len(), 11);
    }

    #[test]
    fn an_op_record_stays_failed_until_a_success_and_carries_over() {
        let r = OpRecord::default();
        assert!(!r.last_failed() && r.last_success_seconds() == 0.0);
        r.record::<(), ()>(&Err(()));
        r.failed();
        assert!(r.last_failed());
        assert_eq!(
            (r.count(Outcome::Success), r.count(Outcome::Failure)),
            (0, 2)
        );
        r.record::<(), ()>(&Ok(()));
        assert!(!r.last_failed() && r.last_success_seconds() > 1.6e9);
        r.failed();
        let next = OpRecord::default();
        next.restore(&r.snapshot());
        assert_eq!(next.snapshot(), r.snapshot());
        assert!(next.last_failed());
        let json = serde_json::to_string(&Stats::default().carried_records()).unwrap();
        let back: CarriedRecords = serde_json::from_str(&json).unwrap();
        assert_eq!(back, CarriedRecords::default());
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(10));
        let p = h.snapshot();
        assert_eq!(p.count, 3);
        assert_eq!(p.cumulative[0], 1);
        assert_eq!(p.cumulative[2], 2);
        assert_eq!(*p.cumulative.last().unwrap(), 2);
    }

    #[test]
    fn a_merged_batch_tally_equals_observing_one_by_one() {
        let direct = LatencyHistogram::default();
        let merged = LatencyHistogram::default();
        let mut local = LocalHistogram::default();
        for us in [1, 40, 99, 100, 101, 2_000, 70_000, 5_000_000, 1, 1] {
            let d = Duration::from_micros(us);
            direct.observe(d);
            local.observe(d);
        }
        assert_eq!(local.count, 10);
        merged.merge(&local);
        merged.merge(&LocalHistogram::default());
        assert_eq!(direct.snapshot(), merged.snapshot());
    }
}
