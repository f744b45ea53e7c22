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
//!
//! Whether a backend is up is written in one place only: [`Backend::mark_down`] and
//! [`Backend::mark_up`], called by the active checker (and by [`Shared::replace`] when checks
//! are turned off, bringing every backend back). Live traffic (timeouts, an ICMP
//! "port unreachable") can only make a backend *suspect*, which asks the checker for a probe
//! now: anyone can send queries a backend will not answer, or forge an ICMP error, so only a
//! probe's verdict decides. The snapshot holds no connections: the data plane keeps its
//! sockets and pools itself, keyed by the snapshot's backends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::access::AccessPolicy;
use crate::cache::PacketCache;
use crate::config::{AllDown, BackendAddr, LbConfig};
use crate::policy::{pick, Candidate, PickContext, Policy};
use crate::probe::ProbeFailure;
use crate::rrl::{RrlPolicy, RrlTable};
use crate::stats::{LatencyHistogram, LocalHistogram, Stats};

/// One nameserver behind the proxy.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Hash of the address, precomputed for the qname-hash policy.
    pub addr_hash: u64,
    pub state: BackendState,
}

/// Counters and flags shared by every worker, all atomics.
///
/// `up` (health) and `draining` (operator intent) are kept apart, as pingora does with
/// `set_enable`: undraining a backend must not make a dead one look healthy. `up` and the
/// reason change only through [`Backend::mark_down`] / [`Backend::mark_up`].
#[derive(Debug)]
pub struct BackendState {
    outstanding: AtomicUsize,
    pub queries: AtomicU64,
    pub answers: AtomicU64,
    pub timeouts: AtomicU64,
    up: AtomicBool,
    draining: AtomicBool,
    /// Last health verdict ([`ProbeFailure`] as u8; `None` = healthy).
    reason: AtomicU8,
    /// Consecutive probe successes / failures (the active checker's, written by it only).
    pub health_ok: AtomicU32,
    pub health_fail: AtomicU32,
    /// Consecutive UDP timeouts on live traffic (reset by any answer).
    passive_timeouts: AtomicU32,
    /// Why passive detection suspects the backend and asked for a probe to confirm
    /// ([`Suspicion`] as u8; 0 = not suspect).
    suspect: AtomicU8,
    /// ICMP "port unreachable" reports on the UDP path's connected sockets to this backend
    /// (a closed port, or a forgery).
    pub port_unreachable: AtomicU64,
    /// Its last probe saw a zone serial lower than another backend's: its answers are not
    /// cached (written by the checker only).
    behind: AtomicBool,
    /// A probe of this backend is in flight (one at most).
    probe_running: AtomicBool,
    health_failures: [AtomicU64; ProbeFailure::ALL.len()],
    /// Time from forwarding to the matched answer.
    pub latency: LatencyHistogram,
    /// (zone, SOA serial) of each zone of `health.zones` at the backend's last probe, empty
    /// while its last probe failed (`lb_backend_zone_serial`). Written by the checker, read
    /// at scrape time; the per-packet path never touches it.
    zone_serials: Mutex<Vec<(String, u32)>>,
}

impl BackendState {
    fn new(up: bool, reason: ProbeFailure) -> Self {
        BackendState {
            outstanding: AtomicUsize::new(0),
            queries: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            up: AtomicBool::new(up),
            draining: AtomicBool::new(false),
            reason: AtomicU8::new(reason as u8),
            health_ok: AtomicU32::new(0),
            health_fail: AtomicU32::new(0),
            passive_timeouts: AtomicU32::new(0),
            suspect: AtomicU8::new(0),
            port_unreachable: AtomicU64::new(0),
            behind: AtomicBool::new(false),
            probe_running: AtomicBool::new(false),
            health_failures: Default::default(),
            latency: LatencyHistogram::default(),
            zone_serials: Mutex::new(Vec::new()),
        }
    }

    /// Stores the serials of a probe (zone names and serials in the same order), or forgets
    /// them when `serials` is `None` (a failed probe).
    pub fn set_zone_serials(&self, zones: &[String], serials: Option<&[u32]>) {
        let mut z = self.zone_serials.lock().unwrap_or_else(|e| e.into_inner());
        z.clear();
        if let Some(serials) = serials {
            z.extend(zones.iter().cloned().zip(serials.iter().copied()));
        }
    }

    /// (zone, serial) at the last probe, if it passed.
    pub fn zone_serials(&self) -> Vec<(String, u32)> {
        self.zone_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The last health verdict.
    pub fn reason(&self) -> ProbeFailure {
        ProbeFailure::from_u8(self.reason.load(Ordering::Relaxed))
    }

    /// Counts a failed check without changing whether the backend is up (a probe failure
    /// below `fall`), keeping its reason for `lb ctl status`.
    pub fn record_failure(&self, r: ProbeFailure) {
        self.reason.store(r as u8, Ordering::Relaxed);
        self.count_failure(r);
    }

    fn count_failure(&self, r: ProbeFailure) {
        if let Some(i) = ProbeFailure::ALL.iter().position(|x| *x == r) {
            self.health_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed checks with this reason since the backend was added.
    pub fn health_failures(&self, r: ProbeFailure) -> u64 {
        ProbeFailure::ALL
            .iter()
            .position(|x| *x == r)
            .map_or(0, |i| self.health_failures[i].load(Ordering::Relaxed))
    }

    /// Claims the backend's one probe slot; false if a probe is already running.
    pub fn try_start_probe(&self) -> bool {
        !self.probe_running.swap(true, Ordering::AcqRel)
    }

    /// Releases the probe slot.
    pub fn end_probe(&self) {
        self.probe_running.store(false, Ordering::Release);
    }

    /// Notes that the backend proved alive: an answer matched one of its queries by ID (the
    /// question need not match: the backend answered), or a probe passed. Resets the passive
    /// timeout run. Called once per batch; writes only when there is a run to reset.
    #[inline]
    pub fn alive(&self) {
        if self.passive_timeouts.load(Ordering::Relaxed) != 0 {
            self.passive_timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// True if its zones lag another backend's serial (its answers are not cached).
    #[inline]
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Relaxed)
    }

    /// The checker's verdict on the serials it last saw.
    pub fn set_behind(&self, behind: bool) {
        self.behind.store(behind, Ordering::Relaxed);
    }

    /// Clears and returns the passive suspicion (the checker, when a probe result is in).
    pub fn take_suspicion(&self) -> Option<Suspicion> {
        Suspicion::from_u8(self.suspect.swap(0, Ordering::AcqRel))
    }

    /// Makes the backend suspect for `why` unless it is already; true if it was not (the
    /// caller then asks for a probe, once per suspicion).
    fn suspect(&self, why: Suspicion) -> bool {
        self.suspect
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
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
    pub fn answered(&self, tally: &LocalHistogram) {
        if tally.count == 0 {
            return;
        }
        self.answers.fetch_add(tally.count, Ordering::Relaxed);
        self.outstanding
            .fetch_sub(tally.count as usize, Ordering::Relaxed);
        self.alive();
        self.latency.merge(tally);
    }

    /// Accounts for one matched answer (the TCP path, which is not batched).
    pub fn answered_one(&self, took: Duration) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        self.in_flight_done();
        self.alive();
        self.latency.observe(took);
    }

    /// Accounts for a query that got no answer in time.
    pub fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        self.in_flight_done();
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Operator intent, separate from health.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }
}

impl Backend {
    /// A backend that is up until a check says otherwise.
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_state(addr, true, ProbeFailure::None)
    }

    /// A backend that starts down ("not checked yet") until its first successful probe.
    pub fn unchecked(addr: SocketAddr) -> Self {
        Self::with_state(addr, false, ProbeFailure::NotChecked)
    }

    /// A backend that is used at once but not checked yet: its first failed probe takes it
    /// down (not `fall` of them). What a plain swap adds, so that a swap back to a set that
    /// just served (a rollback) never leaves clients without a backend.
    pub fn provisional(addr: SocketAddr) -> Self {
        Self::with_state(addr, true, ProbeFailure::NotChecked)
    }

    fn with_state(addr: SocketAddr, up: bool, reason: ProbeFailure) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in addr.to_string().bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Backend {
            addr,
            addr_hash: h,
            state: BackendState::new(up, reason),
        }
    }

    /// Healthy and not drained: may take new queries.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.state.is_up() && !self.state.is_draining()
    }

    /// Takes the backend out of use for `reason` (`detail` says why, for the log). Returns
    /// true if it was up. The one place a backend goes down: the active checker, passive
    /// detection and the UDP path all call it. A never-checked backend's first failure is
    /// logged too (it was down already, but nobody knew why).
    pub fn mark_down(&self, reason: ProbeFailure, detail: &dyn std::fmt::Display) -> bool {
        let s = &self.state;
        let first_verdict = s.reason() == ProbeFailure::NotChecked;
        s.reason.store(reason as u8, Ordering::Relaxed);
        let was_up = s.up.swap(false, Ordering::Relaxed);
        if was_up {
            s.health_ok.store(0, Ordering::Relaxed);
            s.count_failure(reason);
        }
        if was_up || first_verdict {
            tracing::warn!("backend {} is down: {detail}", self.addr);
        }
        was_up
    }

    /// Puts the backend back into use (the active checker's verdict). Returns true if it was
    /// down.
    pub fn mark_up(&self) -> bool {
        let s = &self.state;
        s.reason.store(ProbeFailure::None as u8, Ordering::Relaxed);
        let was_down = !s.up.swap(true, Ordering::Relaxed);
        if was_down {
            tracing::info!("backend {} is up", self.addr);
        }
        was_down
    }

    /// Records a UDP timeout on live traffic. After `limit` in a row with no answer at all
    /// in between (0 = passive checks off) the backend is suspect, and the caller must ask
    /// for a probe at once ([`Shared::request_probe`]): returns true then, once per suspicion.
    ///
    /// Timeouts alone never take a backend down: queries it chooses not to answer are
    /// something any client can send, so the probe's verdict decides
    /// ([`crate::controlplane::health`] takes a suspect backend down at its first failure).
    pub fn passive_timeout(&self, limit: u32) -> bool {
        let n = self.state.passive_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        limit > 0 && n >= limit && self.state.is_up() && self.state.suspect(Suspicion::Timeouts)
    }

    /// Records an ICMP "port unreachable" on a connected upstream socket to this backend. An
    /// up backend becomes suspect and the caller must ask for a probe at once: returns true
    /// then, once per suspicion.
    ///
    /// The report alone never takes a backend down: an off-path attacker can forge it (it
    /// needs only the addresses and ports, not the query's ID), and would otherwise take the
    /// backends down one after another. A closed port fails the probe within its round trip
    /// (the probe sees the same refusal), and the suspect backend goes down at that first
    /// failure; one whose probe passes stays up.
    pub fn port_unreachable(&self) -> bool {
        self.state.port_unreachable.fetch_add(1, Ordering::Relaxed);
        self.state.is_up() && self.state.suspect(Suspicion::PortUnreachable)
    }
}

/// What made passive detection suspect a backend (and ask for a probe to confirm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Suspicion {
    /// `passive_timeouts` live queries in a row went unanswered.
    Timeouts = 1,
    /// ICMP "port unreachable" on the UDP path (genuine or forged).
    PortUnreachable = 2,
}

impl Suspicion {
    fn from_u8(v: u8) -> Option<Suspicion> {
        match v {
            1 => Some(Suspicion::Timeouts),
            2 => Some(Suspicion::PortUnreachable),
            _ => None,
        }
    }
}

impl Candidate for Arc<Backend> {
    fn outstanding(&self) -> usize {
        self.state.outstanding()
    }
    fn identity_hash(&self) -> u64 {
        self.addr_hash
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
    /// Consecutive live timeouts that make a backend suspect (0 = off).
    pub passive_timeouts: u32,
    /// Who is served, and who may transfer zones, update or notify through the proxy.
    pub access: Arc<AccessPolicy>,
    /// Response rate limiting of UDP answers; `None` when off.
    pub rrl: Option<Arc<RrlPolicy>>,
}

/// The run-time parameters of a [`BackendSet`] other than its backends (from the config;
/// replaced on reload).
#[derive(Debug, Clone, PartialEq)]
pub struct SetParams {
    pub policy: Policy,
    pub timeout: Duration,
    pub resend_after: Duration,
    pub all_down: AllDown,
    pub passive_timeouts: u32,
    /// Active health checks run: new backends start down until their first probe.
    pub checked: bool,
    pub access: Arc<AccessPolicy>,
    pub rrl: Option<Arc<RrlPolicy>>,
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
            access: Arc::new(AccessPolicy::from_config(&c.access)),
            rrl: RrlPolicy::from_config(&c.rrl).map(Arc::new),
        }
    }

    /// The parameters a set was built with (`checked` is not part of a set).
    fn of(set: &BackendSet, checked: bool) -> SetParams {
        SetParams {
            policy: set.policy,
            timeout: set.timeout,
            resend_after: set.resend_after,
            all_down: set.all_down,
            passive_timeouts: set.passive_timeouts,
            checked,
            access: Arc::clone(&set.access),
            rrl: set.rrl.clone(),
        }
    }
}

/// Where the policy sends a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A usable backend.
    Backend(usize),
    /// No backend is usable; `mode` (the set's `all_down`) decides. With fail-open,
    /// `fallback` is the policy's pick among every undrained backend (None: all drained).
    AllDown {
        mode: AllDown,
        fallback: Option<usize>,
    },
}

impl BackendSet {
    fn new(generation: u64, backends: Vec<Arc<Backend>>, p: SetParams) -> BackendSet {
        BackendSet {
            generation,
            policy: p.policy,
            backends,
            timeout: p.timeout,
            resend_after: p.resend_after,
            all_down: p.all_down,
            passive_timeouts: p.passive_timeouts,
            access: p.access,
            rrl: p.rrl,
        }
    }

    /// Chooses where a query goes: the policy over usable (healthy, undrained) backends, or,
    /// when none is usable, what `all_down` says (fail-open: the policy over every undrained
    /// backend, a last resort that beats certain failure). A backend to `avoid` (one that just
    /// failed this very query) is passed over while another is usable. Pure: the caller counts.
    #[inline]
    pub fn choose(&self, qname_hash: u64, counter: usize, avoid: Option<SocketAddr>) -> Choice {
        let ctx = PickContext {
            qname_hash,
            counter,
        };
        if let Some(a) = avoid {
            let other = |b: &Arc<Backend>| b.is_usable() && b.addr != a;
            if let Some(i) = pick(self.policy, &self.backends, ctx, other) {
                return Choice::Backend(i);
            }
        }
        if let Some(i) = pick(self.policy, &self.backends, ctx, |b| b.is_usable()) {
            return Choice::Backend(i);
        }
        let fallback = match self.all_down {
            AllDown::FailOpen => pick(self.policy, &self.backends, ctx, |b| !b.state.is_draining()),
            AllDown::Servfail | AllDown::Drop => None,
        };
        Choice::AllDown {
            mode: self.all_down,
            fallback,
        }
    }

    /// A backend by address.
    pub fn find(&self, addr: SocketAddr) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.addr == addr)
    }

    /// The backends' addresses, in order.
    pub fn addrs(&self) -> Vec<BackendAddr> {
        self.backends.iter().map(|b| BackendAddr(b.addr)).collect()
    }
}

/// State shared by every worker and the control plane: the snapshot and the counters.
#[derive(Debug)]
pub struct Shared {
    set: ArcSwap<BackendSet>,
    /// Shared with the TCP pools, which count their drops and timeouts here.
    pub stats: Arc<Stats>,
    /// Serialises writers (swap, drain, reload) so that two control commands cannot interleave
    /// their read-modify-store; readers never take it.
    write_lock: Mutex<()>,
    /// Whether active checks run (new backends then start down until probed).
    checked: AtomicBool,
    /// Backends removed by a swap, kept (weakly) so their metrics stay visible while they still
    /// have queries in flight.
    retired: Mutex<Vec<Weak<Backend>>>,
    /// Passive detection asks the checker for a probe now.
    probe_wanted: tokio::sync::Notify,
    /// Response rate limiting's balances, shared by every UDP worker (fixed size).
    pub rrl: RrlTable,
    /// The packet cache, shared by every worker and the TCP path; `None` when off.
    pub cache: Option<Arc<PacketCache>>,
}

/// The backends of a swap about to be stored, for the caller to persist first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSet {
    pub generation: u64,
    pub backends: Vec<BackendAddr>,
    pub drained: Vec<BackendAddr>,
}

impl Shared {
    /// Builds the first snapshot. With active checks its backends start down until their first
    /// probe (the server runs one round before it serves). `rrl_entries` sizes the rate table.
    pub fn new(
        params: SetParams,
        servers: &[BackendAddr],
        generation: u64,
        rrl_entries: usize,
    ) -> Shared {
        let backends = servers
            .iter()
            .map(|a| {
                Arc::new(match params.checked {
                    true => Backend::unchecked(a.0),
                    false => Backend::new(a.0),
                })
            })
            .collect();
        Shared {
            checked: AtomicBool::new(params.checked),
            set: ArcSwap::from_pointee(BackendSet::new(generation, backends, params)),
            stats: Arc::default(),
            write_lock: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
            probe_wanted: tokio::sync::Notify::new(),
            rrl: RrlTable::new(rrl_entries),
            cache: None,
        }
    }

    /// With a packet cache (at start only: the cache is fixed for the process's life).
    pub fn with_cache(mut self, cache: Option<PacketCache>) -> Shared {
        if let Some(c) = &cache {
            c.set_generation(self.set.load().generation);
        }
        self.cache = cache.map(Arc::new);
        self
    }

    /// Asks the checker to probe now (a backend became suspect on live traffic). Rare: once
    /// per suspicion.
    pub fn request_probe(&self) {
        self.probe_wanted.notify_one();
    }

    /// Resolves when a probe was requested.
    pub async fn probe_requested(&self) {
        self.probe_wanted.notified().await;
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
    /// returns the new generation.
    ///
    /// `servers` is the new list, or `None` to keep the list in force at that moment (read
    /// under the writers' lock, so a reload cannot undo a swap that landed while it ran); it
    /// must already have passed [`crate::config::check_backend_list`]. Backends present before
    /// keep their `Arc` and so their state. New ones start up when `verified` (they just passed
    /// a probe) or when no active checks run, and otherwise [`Backend::provisional`]: used
    /// until their first probe says otherwise. With active checks turned off, every backend
    /// health had taken down is back in use (nothing would probe it again).
    ///
    /// `persist` is called with the new set before it is stored; if it fails, nothing changes
    /// and its error is returned, so a swap that cannot be made durable never happens.
    pub fn replace(
        &self,
        servers: Option<&[BackendAddr]>,
        params: Option<SetParams>,
        verified: bool,
        persist: impl FnOnce(&PendingSet) -> Result<(), String>,
    ) -> Result<u64, String> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.set.load_full();
        let params =
            params.unwrap_or_else(|| SetParams::of(&old, self.checked.load(Ordering::Relaxed)));
        let checked = params.checked;
        let servers = servers.map_or_else(|| old.addrs(), <[BackendAddr]>::to_vec);
        let backends: Vec<Arc<Backend>> = servers
            .iter()
            .map(|a| match old.find(a.0) {
                Some(b) => Arc::clone(b),
                None if checked && !verified => Arc::new(Backend::provisional(a.0)),
                None => Arc::new(Backend::new(a.0)),
            })
            .collect();
        let generation = old.generation + 1;
        persist(&PendingSet {
            generation,
            backends: servers.clone(),
            drained: backends
                .iter()
                .filter(|b| b.state.is_draining())
                .map(|b| BackendAddr(b.addr))
                .collect(),
        })?;
        self.checked.store(checked, Ordering::Relaxed);
        if !checked {
            for b in backends.iter().filter(|b| !b.state.is_up()) {
                b.mark_up();
            }
        }
        self.set
            .store(Arc::new(BackendSet::new(generation, backends, params)));
        // Answers to queries forwarded to the old set are not stored from now on, and lookups
        // under the new set find nothing of the old one: the cache is flushed.
        if let Some(c) = &self.cache {
            c.set_generation(generation);
        }
        self.stats.swaps.succeeded();
        let current = self.set.load();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        for b in &old.backends {
            if current.find(b.addr).is_none() {
                retired.push(Arc::downgrade(b));
            }
        }
        retired.retain(|w| w.upgrade().is_some_and(|b| current.find(b.addr).is_none()));
        Ok(generation)
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
            access: Arc::default(),
            rrl: None,
        }
    }

    fn addrs(list: &[&str]) -> Vec<BackendAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn replace_keeps_state_of_staying_backends() {
        let shared = Shared::new(params(), &addrs(&["127.0.0.1:1", "127.0.0.2:1"]), 1, 1024);
        let before = shared.current();
        assert!(
            !before.backends[0].state.is_up(),
            "unchecked backends start down"
        );
        before.backends[0].mark_up();
        before.backends[1].state.set_draining(true);
        let g = shared.replace(
            Some(&addrs(&["127.0.0.2:1", "127.0.0.3:1"])),
            None,
            true,
            |_| Ok(()),
        );
        assert_eq!(g, Ok(2));
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
        for (mode, want) in [
            (AllDown::FailOpen, Some(0)),
            (AllDown::Servfail, None),
            (AllDown::Drop, None),
        ] {
            let p = SetParams {
                all_down: mode,
                policy: Policy::FirstAvailable,
                ..params()
            };
            let shared = Shared::new(p, &addrs(&["127.0.0.1:1", "127.0.0.2:1"]), 1, 1024);
            let set = shared.current();
            assert_eq!(
                set.choose(0, 0, None),
                Choice::AllDown {
                    mode,
                    fallback: want
                },
                "{mode:?}"
            );
            set.backends[1].mark_up();
            assert_eq!(set.choose(0, 0, None), Choice::Backend(1));
            set.backends[0].mark_up();
            let b1 = Some(set.backends[1].addr);
            assert_eq!(
                set.choose(0, 1, b1),
                Choice::Backend(0),
                "avoids the failed one"
            );
        }
    }

    #[test]
    fn a_swap_that_cannot_persist_changes_nothing_and_plain_swaps_add_provisional_backends() {
        let shared = Shared::new(params(), &addrs(&["127.0.0.1:1"]), 1, 1024);
        let r = shared.replace(Some(&addrs(&["127.0.0.9:1"])), None, false, |p| {
            assert_eq!(p.generation, 2);
            Err("disk full".into())
        });
        assert_eq!(r, Err("disk full".to_string()));
        assert_eq!(shared.current().generation, 1);
        assert_eq!(shared.current().addrs(), addrs(&["127.0.0.1:1"]));
        let g = shared.replace(Some(&addrs(&["127.0.0.9:1"])), None, false, |_| Ok(()));
        assert_eq!(g, Ok(2));
        let b = &shared.current().backends[0];
        assert!(b.state.is_up(), "a plain swap's new backend serves at once");
        assert_eq!(b.state.reason(), ProbeFailure::NotChecked);
        // Keeping the list in force (None) and turning checks off brings downed backends back.
        b.mark_down(ProbeFailure::Refused, &"test");
        let off = SetParams {
            checked: false,
            ..params()
        };
        let g = shared.replace(None, Some(off), false, |p| {
            assert_eq!(p.backends, addrs(&["127.0.0.9:1"]));
            Ok(())
        });
        assert_eq!(g, Ok(3));
        assert!(shared.current().backends[0].state.is_up());
    }

    #[test]
    fn one_writer_of_health_state() {
        let b = Backend::unchecked("127.0.0.1:53".parse().unwrap());
        assert!(!b.mark_down(ProbeFailure::Refused, &"first verdict"));
        assert_eq!(b.state.reason(), ProbeFailure::Refused);
        assert!(b.mark_up());
        assert!(!b.mark_up());
        assert!(!b.passive_timeout(3) && !b.passive_timeout(3));
        b.state.alive();
        assert!(
            !b.passive_timeout(3) && !b.passive_timeout(3),
            "an answer resets the run"
        );
        assert!(b.passive_timeout(3), "suspect: ask for a probe");
        assert!(!b.passive_timeout(3), "once per suspicion");
        assert!(b.state.is_up(), "timeouts alone never take it down");
        assert_eq!(b.state.take_suspicion(), Some(Suspicion::Timeouts));
        assert_eq!(b.state.take_suspicion(), None);
        // A port unreachable report (perhaps forged) only makes it suspect, once.
        assert!(b.port_unreachable(), "suspect: ask for a probe");
        assert!(!b.port_unreachable() && !b.passive_timeout(3));
        assert!(b.state.is_up(), "an ICMP error alone never takes it down");
        assert_eq!(b.state.port_unreachable.load(Ordering::Relaxed), 2);
        assert_eq!(b.state.take_suspicion(), Some(Suspicion::PortUnreachable));
        // A backend already down is not suspected (its probes run anyway).
        b.mark_down(ProbeFailure::Refused, &"test");
        assert!(!b.port_unreachable());
    }
}
