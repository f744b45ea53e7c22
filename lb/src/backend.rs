//! Backends and the one immutable snapshot the per-packet path reads.
//!
//! [`BackendSet`] holds everything a packet needs (the backends with their shared atomic state,
//! the policy, timeouts, a generation number) and sits behind a single `ArcSwap` in [`Shared`].
//! Workers load it once per batch or connection and never lock. Control (the control socket,
//! reloads, health checks) builds a new set off the hot path and stores it whole.
//!
//! A backend that stays across a swap keeps its `Arc<Backend>`, so its health, drain flag and
//! counters carry over and a health flip racing a swap lands on the same object either way (the
//! race pingora's two separate `ArcSwap`s admit). A removed backend lives on through the
//! in-flight entries and worker upstreams that still hold it, until its last answer is in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{BackendAddr, LbConfig};
use crate::health::{AllDown, ProbeFailure};
use crate::metrics::LatencyHistogram;
use crate::policy::{pick, PickContext, Policy};
use crate::stats::{DropReason, Stats};
use crate::tcp_backend::TcpPool;
use crate::wire::{self, Question};

/// One nameserver behind the proxy.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Hash of the address, precomputed for the qname-hash policy.
    pub addr_hash: u64,
    pub state: BackendState,
    /// Pooled TCP connections to this backend, shared by all client connections.
    pub tcp_pool: TcpPool,
}

/// Counters and flags shared by every worker, all atomics.
///
/// `up` (health) and `draining` (operator intent) are kept apart, as pingora does with
/// `set_enable`: undraining a backend must not make a dead one look healthy.
#[derive(Debug)]
pub struct BackendState {
    outstanding: AtomicUsize,
    pub queries: AtomicU64,
    pub answers: AtomicU64,
    pub timeouts: AtomicU64,
    up: AtomicBool,
    pub draining: AtomicBool,
    /// Last health verdict ([`ProbeFailure`] as u8; `None` = healthy).
    reason: AtomicU8,
    /// Consecutive probe successes / failures (written by the checker only).
    pub health_ok: AtomicU32,
    pub health_fail: AtomicU32,
    /// Consecutive UDP timeouts on live traffic (reset by any answer).
    pub passive_timeouts: AtomicU32,
    /// A probe of this backend is in flight (one at most).
    pub probe_running: AtomicBool,
    health_failures: [AtomicU64; ProbeFailure::ALL.len()],
    /// Time from forwarding to the matched answer.
    pub latency: LatencyHistogram,
}

impl BackendState {
    fn new() -> Self {
        BackendState {
            outstanding: AtomicUsize::new(0),
            queries: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            reason: AtomicU8::new(ProbeFailure::None as u8),
            health_ok: AtomicU32::new(0),
            health_fail: AtomicU32::new(0),
            passive_timeouts: AtomicU32::new(0),
            probe_running: AtomicBool::new(false),
            health_failures: Default::default(),
            latency: LatencyHistogram::default(),
        }
    }

    /// The last health verdict.
    pub fn reason(&self) -> ProbeFailure {
        ProbeFailure::from_u8(self.reason.load(Ordering::Relaxed))
    }

    pub fn set_reason(&self, r: ProbeFailure) {
        self.reason.store(r as u8, Ordering::Relaxed);
    }

    /// Counts a failed health check by reason.
    pub fn count_health_failure(&self, r: ProbeFailure) {
        if let Some(i) = ProbeFailure::ALL.iter().position(|x| *x == r) {
            self.health_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed health checks with this reason since the backend was added.
    pub fn health_failures(&self, r: ProbeFailure) -> u64 {
        ProbeFailure::ALL
            .iter()
            .position(|x| *x == r)
            .map_or(0, |i| self.health_failures[i].load(Ordering::Relaxed))
    }

    /// Records a UDP timeout on live traffic; marks the backend down after `limit` in a row
    /// (0 = passive checks off).
    pub fn passive_timeout(&self, addr: SocketAddr, limit: u32) {
        let n = self.passive_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if limit > 0 && n >= limit && self.is_up() {
            self.set_up(false);
            self.set_reason(ProbeFailure::PassiveTimeouts);
            self.health_ok.store(0, Ordering::Relaxed);
            self.count_health_failure(ProbeFailure::PassiveTimeouts);
            tracing::warn!("backend {addr} is down: {n} queries in a row timed out");
        }
    }

    /// Records an answer on live traffic (resets the passive timeout run).
    #[inline]
    pub fn passive_answer(&self) {
        if self.passive_timeouts.load(Ordering::Relaxed) != 0 {
            self.passive_timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// `up`, `down` or `draining`, as `lb ctl status` shows it.
    pub fn state_name(&self) -> &'static str {
        if self.is_draining() {
            "draining"
        } else if self.is_up() {
            "up"
        } else {
            "down"
        }
    }

    /// Queries in flight to this backend over all workers and protocols.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Adds `n` in-flight queries (one call per forwarded query).
    #[inline]
    pub fn in_flight_add(&self, n: usize) {
        self.outstanding.fetch_add(n, Ordering::Relaxed);
    }

    /// Removes one in-flight query (answered, timed out or abandoned).
    #[inline]
    pub fn in_flight_done(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// Accounts for a batch of matched answers: counters, in-flight gauge, passive health
    /// and latency, with one shared update each.
    pub fn answered(&self, tally: &crate::metrics::LocalHistogram) {
        if tally.count == 0 {
            return;
        }
        self.answers.fetch_add(tally.count, Ordering::Relaxed);
        self.outstanding
            .fetch_sub(tally.count as usize, Ordering::Relaxed);
        self.passive_answer();
        self.latency.merge(tally);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

impl Backend {
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_pool_size(addr, 4)
    }

    /// A backend that starts down ("not checked yet") until its first successful probe.
    pub fn unchecked(addr: SocketAddr, pool_size: usize) -> Self {
        let b = Self::with_pool_size(addr, pool_size);
        b.state.set_up(false);
        b.state.set_reason(ProbeFailure::NotChecked);
        b
    }

    pub fn with_pool_size(addr: SocketAddr, pool_size: usize) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in addr.to_string().bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Backend {
            addr,
            addr_hash: h,
            state: BackendState::new(),
            tcp_pool: TcpPool::new(pool_size),
        }
    }

    /// Healthy and not drained: may take new queries.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.state.is_up() && !self.state.is_draining()
    }
}

/// The immutable snapshot every packet reads: the backends and how to use them.
#[derive(Debug)]
pub struct BackendSet {
    /// Increases by one on every swap; shown by `lb ctl status`.
    pub generation: u64,
    pub policy: Policy,
    pub backends: Vec<Arc<Backend>>,
    /// How long a forwarded query waits for its answer.
    pub timeout: Duration,
    /// How long a query to a removed backend waits before it is re-sent to this set.
    pub resend_after: Duration,
    /// What to do when no backend is usable.
    pub all_down: AllDown,
    /// Consecutive live timeouts that mark a backend down (0 = off).
    pub passive_timeouts: u32,
}

/// The run-time parameters of a [`BackendSet`] other than its backends (from the config;
/// replaced on reload).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SetParams {
    pub policy: Policy,
    pub timeout: Duration,
    pub resend_after: Duration,
    pub all_down: AllDown,
    pub passive_timeouts: u32,
    /// Active health checks run: new backends start down until their first probe.
    pub checked: bool,
}

impl SetParams {
    pub fn from_config(c: &LbConfig) -> SetParams {
        let checked = c.health.active();
        SetParams {
            policy: c.backends.policy,
            timeout: c.backends.timeout(),
            resend_after: c.backends.resend_after(),
            all_down: c.health.all_down,
            // Without probes nothing would bring a passively downed backend back.
            passive_timeouts: if checked {
                c.health.passive_timeouts
            } else {
                0
            },
            checked,
        }
    }
}

/// Where a query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Backend(usize),
    /// Every backend is down and `all_down = "servfail"`.
    Servfail,
    /// No backend can take it (all drained, or all down with `all_down = "drop"`).
    Drop,
}

impl BackendSet {
    /// Chooses where a query goes: the policy over usable (healthy, undrained) backends, or,
    /// when none is usable, what `all_down` says (fail-open: the policy over every undrained
    /// backend, a last resort that beats certain failure). Counts the all-down outcomes.
    #[inline]
    pub fn choose(&self, msg: &[u8], q: &Question, counter: usize, stats: &Stats) -> Choice {
        let qname_hash = if self.policy == Policy::QnameHash {
            wire::qname_hash(msg, q)
        } else {
            0
        };
        let ctx = PickContext {
            qname_hash,
            counter,
        };
        if let Some(i) = pick(self.policy, &self.backends, ctx, Backend::is_usable) {
            return Choice::Backend(i);
        }
        stats.all_down(self.all_down);
        match self.all_down {
            AllDown::FailOpen => {
                match pick(self.policy, &self.backends, ctx, |b| !b.state.is_draining()) {
                    Some(i) => Choice::Backend(i),
                    None => {
                        stats.drop(DropReason::NoBackend);
                        Choice::Drop
                    }
                }
            }
            AllDown::Servfail => Choice::Servfail,
            AllDown::Drop => {
                stats.drop(DropReason::NoBackend);
                Choice::Drop
            }
        }
    }

    /// Position of a backend by address.
    pub fn find(&self, addr: SocketAddr) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.addr == addr)
    }
}

/// State shared by every worker and the control plane.
#[derive(Debug)]
pub struct Shared {
    set: ArcSwap<BackendSet>,
    pub stats: Stats,
    /// Serialises writers (swap, drain, reload) so that two control commands cannot interleave
    /// their read-modify-store; readers never take it.
    write_lock: Mutex<()>,
    pool_size: usize,
    /// Whether active checks run (new backends then start down until probed).
    checked: AtomicBool,
    /// Backends removed by a swap, kept (weakly) so their metrics stay visible while they still
    /// have queries in flight.
    retired: Mutex<Vec<Weak<Backend>>>,
}

fn new_backend(addr: SocketAddr, pool_size: usize, unchecked: bool) -> Backend {
    if unchecked {
        Backend::unchecked(addr, pool_size)
    } else {
        Backend::with_pool_size(addr, pool_size)
    }
}

impl Shared {
    /// Builds the first snapshot. With active checks its backends start down until their first
    /// probe (the server runs one round before it serves).
    pub fn new(
        params: SetParams,
        servers: &[BackendAddr],
        generation: u64,
        pool_size: usize,
    ) -> Shared {
        let backends = servers
            .iter()
            .map(|a| Arc::new(new_backend(a.0, pool_size, params.checked)))
            .collect();
        Shared {
            set: ArcSwap::from_pointee(BackendSet {
                generation,
                policy: params.policy,
                backends,
                timeout: params.timeout,
                resend_after: params.resend_after,
                all_down: params.all_down,
                passive_timeouts: params.passive_timeouts,
            }),
            stats: Stats::default(),
            write_lock: Mutex::new(()),
            pool_size,
            checked: AtomicBool::new(params.checked),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The current snapshot, for code off the per-packet path.
    pub fn current(&self) -> Arc<BackendSet> {
        self.set.load_full()
    }

    /// A cheap borrow of the current snapshot for the per-packet path (no refcount traffic).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<BackendSet>> {
        self.set.load()
    }

    /// Replaces the backend list (and, with `params`, the run-time parameters) atomically and
    /// returns the new generation. Backends present before keep their `Arc` and so their state;
    /// new ones start up when `verified` (they just passed a probe) or when no active checks
    /// run, else down until their first probe. `servers` must already have passed
    /// [`crate::config::check_backend_list`].
    pub fn replace(
        &self,
        servers: &[BackendAddr],
        params: Option<SetParams>,
        verified: bool,
    ) -> u64 {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.set.load_full();
        let checked = params.map_or(self.checked.load(Ordering::Relaxed), |p| p.checked);
        let backends = servers
            .iter()
            .map(|a| match old.find(a.0) {
                Some(b) => Arc::clone(b),
                None => Arc::new(new_backend(a.0, self.pool_size, checked && !verified)),
            })
            .collect();
        if let Some(p) = params {
            self.checked.store(p.checked, Ordering::Relaxed);
        }
        let generation = old.generation + 1;
        self.set.store(Arc::new(BackendSet {
            generation,
            policy: params.map_or(old.policy, |p| p.policy),
            backends,
            timeout: params.map_or(old.timeout, |p| p.timeout),
            resend_after: params.map_or(old.resend_after, |p| p.resend_after),
            all_down: params.map_or(old.all_down, |p| p.all_down),
            passive_timeouts: params.map_or(old.passive_timeouts, |p| p.passive_timeouts),
        }));
        self.stats.swaps.fetch_add(1, Ordering::Relaxed);
        let current = self.set.load();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        for b in &old.backends {
            if current.find(b.addr).is_none() {
                retired.push(Arc::downgrade(b));
            }
        }
        retired.retain(|w| w.upgrade().is_some_and(|b| current.find(b.addr).is_none()));
        generation
    }

    /// Removed backends that still have queries in flight (for metrics).
    pub fn draining_retired(&self) -> Vec<Arc<Backend>> {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|w| w.upgrade().is_some_and(|b| b.state.outstanding() > 0));
        retired.iter().filter_map(Weak::upgrade).collect()
    }

    /// Runs `f` under the writers' lock (for drain/undrain plus persisting the result).
    pub fn with_write_lock<R>(&self, f: impl FnOnce(&BackendSet) -> R) -> R {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        f(&self.set.load())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SetParams {
        SetParams {
            policy: Policy::RoundRobin,
            timeout: Duration::from_secs(1),
            resend_after: Duration::from_millis(100),
            all_down: AllDown::FailOpen,
            passive_timeouts: 3,
            checked: true,
        }
    }

    fn addrs(list: &[&str]) -> Vec<BackendAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn replace_keeps_state_of_staying_backends() {
        let shared = Shared::new(params(), &addrs(&["127.0.0.1:1", "127.0.0.2:1"]), 1, 2);
        let before = shared.current();
        assert!(
            !before.backends[0].state.is_up(),
            "unchecked backends start down"
        );
        before.backends[0].state.set_up(true);
        before.backends[1]
            .state
            .draining
            .store(true, Ordering::Relaxed);
        let g = shared.replace(&addrs(&["127.0.0.2:1", "127.0.0.3:1"]), None, true);
        assert_eq!(g, 2);
        let after = shared.current();
        assert!(Arc::ptr_eq(&before.backends[1], &after.backends[0]));
        assert!(after.backends[0].state.is_draining());
        assert!(
            after.backends[1].state.is_up(),
            "verified backends start up"
        );
        // The old snapshot is untouched: in-flight users still see what they loaded.
        assert_eq!(before.backends.len(), 2);
        assert_eq!(before.generation, 1);
    }

    #[test]
    fn all_down_behaviours() {
        let msg = crate::wire::build_query(1, b"\x01a\x00", 1);
        let q = crate::wire::question(&msg).unwrap();
        for (mode, want) in [
            (AllDown::FailOpen, Choice::Backend(0)),
            (AllDown::Servfail, Choice::Servfail),
            (AllDown::Drop, Choice::Drop),
        ] {
            let p = SetParams {
                all_down: mode,
                policy: Policy::FirstAvailable,
                ..params()
            };
            let shared = Shared::new(p, &addrs(&["127.0.0.1:1", "127.0.0.2:1"]), 1, 1);
            let set = shared.current();
            assert_eq!(set.choose(&msg, &q, 0, &shared.stats), want, "{mode:?}");
            assert_eq!(shared.stats.all_down_count(mode), 1);
            set.backends[1].state.set_up(true);
            assert_eq!(set.choose(&msg, &q, 0, &shared.stats), Choice::Backend(1));
        }
    }
}
