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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{BackendAddr, BackendsConfig};
use crate::policy::{pick, PickContext, Policy};
use crate::stats::Stats;
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
}

impl BackendSet {
    /// Chooses the backend for a query: the policy over usable (healthy, undrained) backends,
    /// or, when none is usable, over every undrained one (fail-open: a last resort beats
    /// certain failure). `None` only when every backend is drained.
    #[inline]
    pub fn choose(&self, msg: &[u8], q: &Question, counter: usize) -> Option<usize> {
        let qname_hash = if self.policy == Policy::QnameHash {
            wire::qname_hash(msg, q)
        } else {
            0
        };
        let ctx = PickContext {
            qname_hash,
            counter,
        };
        pick(self.policy, &self.backends, ctx, Backend::is_usable)
            .or_else(|| pick(self.policy, &self.backends, ctx, |b| !b.state.is_draining()))
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
}

impl Shared {
    /// Builds the first snapshot (generation 1) from the `[backends]` config.
    pub fn new(cfg: &BackendsConfig, servers: &[BackendAddr], pool_size: usize) -> Shared {
        let backends = servers
            .iter()
            .map(|a| Arc::new(Backend::with_pool_size(a.0, pool_size)))
            .collect();
        Shared {
            set: ArcSwap::from_pointee(BackendSet {
                generation: 1,
                policy: cfg.policy,
                backends,
                timeout: cfg.timeout(),
                resend_after: cfg.resend_after(),
            }),
            stats: Stats::default(),
            write_lock: Mutex::new(()),
            pool_size,
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

    /// Replaces the backend list (and optionally policy and timeouts) atomically and returns the
    /// new generation. Backends present before keep their state; `servers` must already have
    /// passed [`crate::config::check_backend_list`].
    pub fn replace(&self, servers: &[BackendAddr], cfg: Option<&BackendsConfig>) -> u64 {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.set.load_full();
        let backends = servers
            .iter()
            .map(|a| match old.find(a.0) {
                Some(b) => Arc::clone(b),
                None => Arc::new(Backend::with_pool_size(a.0, self.pool_size)),
            })
            .collect();
        let generation = old.generation + 1;
        self.set.store(Arc::new(BackendSet {
            generation,
            policy: cfg.map_or(old.policy, |c| c.policy),
            backends,
            timeout: cfg.map_or(old.timeout, |c| c.timeout()),
            resend_after: cfg.map_or(old.resend_after, |c| c.resend_after()),
        }));
        self.stats.swaps.fetch_add(1, Ordering::Relaxed);
        generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendsConfig;

    fn cfg() -> BackendsConfig {
        BackendsConfig {
            servers: vec![],
            policy: Policy::RoundRobin,
            timeout_ms: 1000,
            max_in_flight: 16,
            resend_after_ms: 100,
        }
    }

    fn addrs(list: &[&str]) -> Vec<BackendAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn replace_keeps_state_of_staying_backends() {
        let shared = Shared::new(&cfg(), &addrs(&["127.0.0.1:1", "127.0.0.2:1"]), 2);
        let before = shared.current();
        before.backends[1].state.set_up(false);
        let g = shared.replace(&addrs(&["127.0.0.2:1", "127.0.0.3:1"]), None);
        assert_eq!(g, 2);
        let after = shared.current();
        assert!(Arc::ptr_eq(&before.backends[1], &after.backends[0]));
        assert!(!after.backends[0].state.is_up());
        assert!(after.backends[1].state.is_up());
        // The old snapshot is untouched: in-flight users still see what they loaded.
        assert_eq!(before.backends.len(), 2);
        assert_eq!(before.generation, 1);
    }
}
