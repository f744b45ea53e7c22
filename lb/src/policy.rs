//! Backend selection policies: small pure functions over a backend slice.
//!
//! They share one signature (like dnsdist's `firstAvailable`, `leastOutstanding`, `roundrobin`,
//! `chashed`), read only atomics, and never allocate, so they are trivial to unit-test and bench.
//! They see a backend only through [`Candidate`] (as pingora's `BackendSelection` never sees
//! health-check internals): whether it is usable is the caller's predicate.

use serde::{Deserialize, Serialize};

/// What a policy needs to know of a backend.
pub trait Candidate {
    /// Queries in flight to it now (least-outstanding).
    fn outstanding(&self) -> usize;
    /// A stable hash of its identity (qname-hash's rendezvous score).
    fn identity_hash(&self) -> u64;
}

/// How a query's backend is chosen among the usable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Fewest queries in flight; ties rotate so an idle set is still spread evenly.
    #[default]
    LeastOutstanding,
    /// Each usable backend in turn.
    RoundRobin,
    /// The first usable backend in configured order (primary with fall-backs).
    FirstAvailable,
    /// Rendezvous hash of the lowercased query name: a name sticks to one backend, and removing a
    /// backend moves only the names it had.
    QnameHash,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::LeastOutstanding => "least-outstanding",
            Policy::RoundRobin => "round-robin",
            Policy::FirstAvailable => "first-available",
            Policy::QnameHash => "qname-hash",
        }
    }
}

/// Per-query inputs to a policy.
#[derive(Debug, Clone, Copy)]
pub struct PickContext {
    /// Hash of the query name (only read by qname-hash).
    pub qname_hash: u64,
    /// A per-worker counter advanced per query (round-robin position and tie-breaking).
    pub counter: usize,
}

/// Picks the index of a backend for which `usable` holds, or `None` if there is none.
pub fn pick<C: Candidate>(
    policy: Policy,
    backends: &[C],
    ctx: PickContext,
    usable: impl Fn(&C) -> bool,
) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    match policy {
        Policy::FirstAvailable => backends.iter().position(&usable),
        Policy::RoundRobin => {
            let start = ctx.counter % n;
            (0..n)
                .map(|k| (start + k) % n)
                .find(|&i| usable(&backends[i]))
        }
        Policy::LeastOutstanding => {
            let start = ctx.counter % n;
            let mut best: Option<(usize, usize)> = None;
            for k in 0..n {
                let i = (start + k) % n;
                let b = &backends[i];
                if !usable(b) {
                    continue;
                }
                let load = b.outstanding();
                if best.is_none_or(|(_, l)| load < l) {
                    best = Some((i, load));
                }
            }
            best.map(|(i, _)| i)
        }
        Policy::QnameHash => {
            let mut best: Option<(usize, u64)> = None;
            for (i, b) in backends.iter().enumerate() {
                if !usable(b) {
                    continue;
                }
                let score = mix(ctx.qname_hash ^ b.identity_hash());
                if best.is_none_or(|(_, s)| score > s) {
                    best = Some((i, score));
                }
            }
            best.map(|(i, _)| i)
        }
    }
}

/// A 64-bit finaliser (splitmix64) so that rendezvous scores are well spread.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A backend as a policy sees it.
    struct B {
        load: Cell<usize>,
        hash: u64,
        usable: Cell<bool>,
    }

    impl Candidate for B {
        fn outstanding(&self) -> usize {
            self.load.get()
        }
        fn identity_hash(&self) -> u64 {
            self.hash
        }
    }

    fn set(n: usize) -> Vec<B> {
        (0..n)
            .map(|i| B {
                load: Cell::new(0),
                hash: mix(i as u64 + 1),
                usable: Cell::new(true),
            })
            .collect()
    }

    fn usable(b: &B) -> bool {
        b.usable.get()
    }

    fn ctx(counter: usize, qname_hash: u64) -> PickContext {
        PickContext {
            qname_hash,
            counter,
        }
    }

    #[test]
    fn round_robin_cycles_and_skips_unusable() {
        let b = set(3);
        let picks: Vec<_> = (0..6)
            .map(|c| pick(Policy::RoundRobin, &b, ctx(c, 0), usable).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        b[1].usable.set(false);
        let picks: Vec<_> = (0..4)
            .map(|c| pick(Policy::RoundRobin, &b, ctx(c, 0), usable).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 2, 2, 0]);
    }

    #[test]
    fn first_available_prefers_order() {
        let b = set(3);
        assert_eq!(pick(Policy::FirstAvailable, &b, ctx(7, 0), usable), Some(0));
        b[0].usable.set(false);
        assert_eq!(pick(Policy::FirstAvailable, &b, ctx(7, 0), usable), Some(1));
        b[1].usable.set(false);
        b[2].usable.set(false);
        assert_eq!(pick(Policy::FirstAvailable, &b, ctx(7, 0), usable), None);
    }

    #[test]
    fn least_outstanding_prefers_idle_and_rotates_ties() {
        let b = set(3);
        b[0].load.set(5);
        b[1].load.set(2);
        b[2].load.set(9);
        assert_eq!(
            pick(Policy::LeastOutstanding, &b, ctx(0, 0), usable),
            Some(1)
        );
        let idle = set(2);
        let a = pick(Policy::LeastOutstanding, &idle, ctx(0, 0), usable);
        let c = pick(Policy::LeastOutstanding, &idle, ctx(1, 0), usable);
        assert_ne!(a, c);
    }

    #[test]
    fn qname_hash_is_stable_and_moves_only_removed_names() {
        let b = set(4);
        let mut counts = [0usize; 4];
        let mut before = Vec::new();
        for h in 0..4000u64 {
            let h = mix(h);
            let i = pick(Policy::QnameHash, &b, ctx(h as usize, h), usable).unwrap();
            assert_eq!(pick(Policy::QnameHash, &b, ctx(1, h), usable).unwrap(), i);
            counts[i] += 1;
            before.push(i);
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
        // Taking backend 3 out moves only the names it had.
        b[3].usable.set(false);
        for (k, h) in (0..4000u64).enumerate() {
            let i = pick(Policy::QnameHash, &b, ctx(0, mix(h)), usable).unwrap();
            if before[k] != 3 {
                assert_eq!(i, before[k]);
            }
        }
    }
}
