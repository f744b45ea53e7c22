//! Response rate limiting with BIND's semantics (the Vixie/Schryver design), for UDP answers.
//!
//! Every answer to a QUERY lb is about to send over UDP (relayed, or its own SERVFAIL/REFUSED)
//! is put in a class by [`classify`], as BIND's RRL does (BIND limits only its answers to
//! queries: NOTIFY, UPDATE and other opcodes are never limited, nor are they here): positive answers per (name, type), NODATA per
//! name whatever the type, NXDOMAIN per zone (the SOA owner in the authority section),
//! referrals per delegation point (the NS owner), errors per client. Each (client prefix,
//! class, key) has a balance of credits: it gains `rate` per second up to `rate` (one second's
//! worth), each answer costs one, and it never falls below −`window_secs`×`rate`. An answer
//! finding the balance negative is limited: dropped, or, as BIND does, the first and then every
//! `slip`th one sent truncated and empty (TC=1) so that a real client retries over TCP, which
//! spoofed-source floods cannot. Answers limited by `all_per_second` are never slipped (nor
//! are BIND's). A prefix that keeps flooding therefore stays limited until it has stayed under
//! the rate for about `window_secs` seconds.
//! `all_per_second` caps everything one prefix gets, whatever the class: the answer to random
//! names under a wildcard (`*.example.`) has the queried name as owner (the wildcard cannot be
//! seen on the wire), so each random name would get a fresh positive balance; only this cap
//! limits such a flood.
//!
//! One [`RrlTable`] is shared by all UDP workers (with `SO_REUSEPORT` one prefix's traffic
//! spreads over the workers, so per-worker tables would multiply the limit). It has a fixed
//! number of slots, chosen by a hash keyed with a secret drawn at start (SipHash, as std's
//! `HashMap`), so a client cannot choose names or addresses that land on the slots of a prefix
//! it wants to push out or share a balance with; slots are probed over a short run; when every slot of the run is
//! taken, one whose balance has recovered is reused (the one idle longest), and only when the
//! whole run is in debt the one idle longest of those: a flood of new keys cannot push out a
//! prefix being limited. Slots are
//! updated with compare-and-swap on one 64-bit word (second, balance): no lock, no allocation
//! per packet. Concurrent first uses of one slot by two keys may let one answer through that
//! BIND would have counted; the limit holds in aggregate.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::config::RrlConfig;
use crate::prefix::{any_contains, Prefix};
use crate::wire::{self, Section, TYPE_NS, TYPE_SOA};
use crate::zeroed::{zeroed_slice, Zeroable};

/// Slots probed for a key before the one idle longest is reused.
const PROBE: usize = 4;

/// Response classes, as BIND's RRL tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Positive = 0,
    Nodata = 1,
    Nxdomain = 2,
    Referral = 3,
    Error = 4,
    /// The per-prefix cap over every class (`all_per_second`).
    All = 5,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Positive,
        Class::Nodata,
        Class::Nxdomain,
        Class::Referral,
        Class::Error,
        Class::All,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Positive => "responses",
            Class::Nodata => "nodata",
            Class::Nxdomain => "nxdomains",
            Class::Referral => "referrals",
            Class::Error => "errors",
            Class::All => "all",
        }
    }
}

/// What to do with one answer (in the order of [`RrlTable::actions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Action {
    Send = 0,
    /// Limited: send nothing.
    Drop = 1,
    /// Limited: send it truncated and empty (TC=1).
    Slip = 2,
    /// Limited, but `log_only` is on: sent in full, counted.
    Logged = 3,
}

impl Action {
    /// The `action` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Send => "sent",
            Action::Drop => "dropped",
            Action::Slip => "slipped",
            Action::Logged => "log-only",
        }
    }

    pub const ALL: [Action; 4] = [Action::Send, Action::Drop, Action::Slip, Action::Logged];
}

/// The rates in force (from `[rrl]`; part of the snapshot, replaced on reload).
#[derive(Debug, Clone, PartialEq)]
pub struct RrlPolicy {
    /// Per class, indexed by [`Class`] (`All` included); 0 = not limited.
    rates: [u32; 6],
    window: u32,
    slip: u32,
    ipv4_prefix_length: u8,
    ipv6_prefix_length: u8,
    exempt: Vec<Prefix>,
    log_only: bool,
}

impl RrlPolicy {
    /// The policy of a `[rrl]` section, or `None` when no rate is set.
    pub fn from_config(c: &RrlConfig) -> Option<RrlPolicy> {
        if !c.active() {
            return None;
        }
        let r = c.responses_per_second;
        Some(RrlPolicy {
            rates: [
                r,
                c.nodata_per_second.unwrap_or(r),
                c.nxdomains_per_second.unwrap_or(r),
                c.referrals_per_second.unwrap_or(r),
                c.errors_per_second.unwrap_or(r),
                c.all_per_second,
            ],
            window: c.window_secs.max(1),
            slip: c.slip,
            ipv4_prefix_length: c.ipv4_prefix_length,
            ipv6_prefix_length: c.ipv6_prefix_length,
            exempt: c.exempt.clone(),
            log_only: c.log_only,
        })
    }

    /// Seconds a limited prefix stays limited once it stops (the balance's floor, in time).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Limited answers are counted, not limited.
    pub fn log_only(&self) -> bool {
        self.log_only
    }

    /// The client's network as RRL counts it (an IPv4 client on a dual-stack socket as IPv4).
    pub fn prefix_of(&self, ip: IpAddr) -> Prefix {
        Prefix::network(ip, self.ipv4_prefix_length, self.ipv6_prefix_length)
    }
}

/// The class of an answer and the hash of its key (name and type, zone, or delegation point).
pub fn classify(answer: &[u8]) -> (Class, u64) {
    let Ok(h) = wire::header(answer) else {
        return (Class::Error, 0);
    };
    let q = wire::question(answer).ok().filter(|q| q.count > 0);
    let qname = q.map_or(0, |q| wire::name_hash(answer, q.name_start));
    match h.rcode {
        0 if h.ancount > 0 => (Class::Positive, qname ^ u64::from(q.map_or(0, |q| q.qtype))),
        0 | 3 => {
            let mut soa = None;
            let mut ns = None;
            let mut walk = wire::records(answer);
            for r in walk.by_ref() {
                match (r.section, r.rtype) {
                    (Section::Authority, TYPE_SOA) => soa = soa.or(Some(r.name_start)),
                    (Section::Authority, TYPE_NS) => ns = ns.or(Some(r.name_start)),
                    (Section::Additional, _) => break,
                    _ => {}
                }
            }
            let zone = |pos: Option<usize>| pos.map_or(qname, |p| wire::name_hash(answer, p));
            if h.rcode == 3 {
                (Class::Nxdomain, zone(soa))
            } else if wire::extended_rcode(answer) != 0 {
                // BADVERS, BADCOOKIE...: NOERROR in the header's bits only.
                (Class::Error, 0)
            } else if soa.is_none() && ns.is_some() {
                (Class::Referral, zone(ns))
            } else {
                // BIND: every empty answer for a name is the same, whatever the type.
                (Class::Nodata, qname)
            }
        }
        _ => (Class::Error, 0),
    }
}

/// One (prefix, class, key) balance.
#[derive(Debug)]
#[repr(C)]
struct Slot {
    /// Hash of (prefix, class, key); 0 = free.
    tag: AtomicU64,
    /// (second << 32) | balance as u32: updated as one word.
    state: AtomicU64,
    /// Limited answers since the balance last went negative (slip rotation).
    limited: AtomicU32,
    /// Second (+1) of the last limited answer; 0 = never. Read by the log scan.
    last_limited: AtomicU32,
    /// The prefix and class, for the log: address bits (high, low) and (len | class << 8 |
    /// v4 << 16 | logged << 17).
    net_hi: AtomicU64,
    net_lo: AtomicU64,
    meta: AtomicU32,
}

// SAFETY: `repr(C)` of atomics only, each valid as all-zero (a free slot).
unsafe impl Zeroable for Slot {}

const META_V4: u32 = 1 << 16;
const META_LOGGED: u32 = 1 << 17;

/// A prefix starting or stopping being limited (found by [`RrlTable::scan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub prefix: String,
    pub class: Class,
    pub limited: bool,
}

/// The shared table of balances, and RRL's counters.
#[derive(Debug)]
pub struct RrlTable {
    slots: Box<[Slot]>,
    /// The secret key of the slot hash ([`RrlTable::tag_of`]), random per process.
    secret: RandomState,
    epoch: Instant,
    /// Answers by [`Action`]: sent, dropped, slipped, logged.
    actions: [AtomicU64; 4],
    /// Prefixes limited within the last `window` (kept by [`RrlTable::scan`]).
    limited_now: AtomicU64,
}

impl RrlTable {
    /// A table of `entries` slots (rounded up to a power of two).
    pub fn new(entries: usize) -> RrlTable {
        let n = entries.max(PROBE).next_power_of_two();
        RrlTable {
            // Zeroed: resident only as prefixes use slots (64 Ki slots are 3 MiB).
            slots: zeroed_slice(n),
            secret: RandomState::new(),
            epoch: Instant::now(),
            actions: Default::default(),
            limited_now: AtomicU64::new(0),
        }
    }

    /// Seconds since the table was made (the clock of the balances).
    pub fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// Decides what happens to `answer` for `client` at second `now`. Pure accounting: the
    /// caller counts the action ([`RrlTable::count`]) and builds a slip. Only answers to
    /// queries (opcode QUERY) are limited, as BIND's RRL: answers to NOTIFY, UPDATE and other
    /// opcodes are sent and charge nothing.
    pub fn decide(&self, p: &RrlPolicy, client: IpAddr, answer: &[u8], now: u32) -> Action {
        if wire::opcode(answer) != 0 || any_contains(&p.exempt, client) {
            return Action::Send;
        }
        let prefix = p.prefix_of(client);
        let (class, key) = classify(answer);
        let charge = |c: Class, k: u64| match p.rates[c as usize] {
            0 => None,
            rate => self.account(&prefix, c, k, rate, p.window, now),
        };
        let by_class = charge(class, key);
        let by_all = charge(Class::All, 0);
        match (by_class, by_all) {
            (None, None) => Action::Send,
            _ if p.log_only => Action::Logged,
            // As BIND: the all-per-second limit wins and is never slipped.
            (_, Some(_)) => Action::Drop,
            // The first limited answer slips, then every `slip`th (BIND's rotation).
            (Some(n), None) if p.slip > 0 && n.wrapping_sub(1) % p.slip == 0 => Action::Slip,
            (Some(_), None) => Action::Drop,
        }
    }

    /// Adds a batch's tally of actions (sent, dropped, slipped, logged).
    pub fn count(&self, tally: &[u64; 4]) {
        for (c, n) in self.actions.iter().zip(tally) {
            if *n > 0 {
                c.fetch_add(*n, Ordering::Relaxed);
            }
        }
    }

    /// Answers by action since start: sent, dropped, slipped, logged.
    pub fn actions(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.actions[i].load(Ordering::Relaxed))
    }

    /// Prefixes (and classes) limited within the last window, as of the last scan.
    pub fn limited_now(&self) -> u64 {
        self.limited_now.load(Ordering::Relaxed)
    }

    /// Charges one answer to (prefix, class, key); returns the count of limited answers in
    /// this run of limiting (1 for the first) if the balance went negative.
    fn account(
        &self,
        prefix: &Prefix,
        class: Class,
        key: u64,
        rate: u32,
        window: u32,
        now: u32,
    ) -> Option<u32> {
        let tag = self.tag_of(prefix, class, key);
        let slot = self.slot_for(tag, prefix, (class, rate, window), now);
        let rate = rate as i64;
        let floor = -(window as i64) * rate;
        let mut cur = slot.state.load(Ordering::Relaxed);
        let balance = loop {
            let (ts, bal) = unpack(cur);
            let credited = (bal + rate * i64::from(now.saturating_sub(ts))).min(rate);
            let next = (credited - 1).max(floor);
            match slot.state.compare_exchange_weak(
                cur,
                pack(now, next),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break next,
                Err(actual) => cur = actual,
            }
        };
        if balance >= 0 {
            if slot.limited.load(Ordering::Relaxed) != 0 {
                slot.limited.store(0, Ordering::Relaxed);
            }
            return None;
        }
        slot.last_limited.store(now + 1, Ordering::Relaxed);
        // Wrapping: only the rotation of slips depends on it.
        Some(slot.limited.fetch_add(1, Ordering::Relaxed).wrapping_add(1))
    }

    /// The slot of `tag`: its own, a free one (claimed), or one reused: the one idle longest
    /// among those whose balance has recovered, else (the whole run in debt) the one idle
    /// longest. A new slot starts with one second's credit.
    fn slot_for(
        &self,
        tag: u64,
        prefix: &Prefix,
        (class, rate, window): (Class, u32, u32),
        now: u32,
    ) -> &Slot {
        let mask = self.slots.len() - 1;
        let start = (tag as usize) & mask;
        // (index, idle since) of the best candidate, recovered ones first.
        let mut oldest = (start, u32::MAX);
        let mut oldest_recovered: Option<(usize, u32)> = None;
        for k in 0..PROBE {
            let i = (start + k) & mask;
            let s = &self.slots[i];
            let t = s.tag.load(Ordering::Acquire);
            if t == tag {
                return s;
            }
            if t == 0
                && s.tag
                    .compare_exchange(0, tag, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return self.init(s, prefix, class, rate, now);
            }
            let (ts, bal) = unpack(s.state.load(Ordering::Relaxed));
            // In debt, a balance is at least −window×rate, so after `window` idle seconds it
            // has recovered whatever its rate.
            let recovered = bal >= 0 || now.saturating_sub(ts) >= window;
            if recovered && oldest_recovered.is_none_or(|(_, t)| ts < t) {
                oldest_recovered = Some((i, ts));
            }
            if ts < oldest.1 {
                oldest = (i, ts);
            }
        }
        let s = &self.slots[oldest_recovered.unwrap_or(oldest).0];
        s.tag.store(tag, Ordering::Release);
        self.init(s, prefix, class, rate, now)
    }

    fn init<'a>(
        &self,
        s: &'a Slot,
        prefix: &Prefix,
        class: Class,
        rate: u32,
        now: u32,
    ) -> &'a Slot {
        s.state.store(pack(now, i64::from(rate)), Ordering::Relaxed);
        s.limited.store(0, Ordering::Relaxed);
        s.last_limited.store(0, Ordering::Relaxed);
        let (hi, lo, v4) = prefix.bits();
        s.net_hi.store(hi, Ordering::Relaxed);
        s.net_lo.store(lo, Ordering::Relaxed);
        let v4 = if v4 { META_V4 } else { 0 };
        s.meta.store(
            u32::from(prefix.len()) | (class as u32) << 8 | v4,
            Ordering::Relaxed,
        );
        s
    }

    /// Walks the table (the control plane, once a second): returns the (prefix, class) pairs
    /// that started being limited since the last scan and those whose limiting stopped
    /// (nothing of theirs limited for `window` seconds), one transition per pair however many
    /// names it is limited on, and updates the gauge of prefixes being limited. Off the
    /// per-packet path.
    pub fn scan(&self, window: u32) -> Vec<Transition> {
        #[derive(Default)]
        struct Group {
            logged_before: bool,
            recent: bool,
            started: bool,
            stopped: bool,
        }
        let now = self.now();
        // Keyed by (network bits, length | class | family): the pair a log line names.
        let mut groups: std::collections::HashMap<(u64, u64, u32), Group> =
            std::collections::HashMap::new();
        let mut prefixes = std::collections::HashSet::new();
        for s in self.slots.iter() {
            let last = s.last_limited.load(Ordering::Relaxed);
            if last == 0 {
                continue;
            }
            let meta = s.meta.load(Ordering::Relaxed);
            let recent = now.saturating_sub(last - 1) < window;
            let logged = meta & META_LOGGED != 0;
            let (hi, lo) = (
                s.net_hi.load(Ordering::Relaxed),
                s.net_lo.load(Ordering::Relaxed),
            );
            let g = groups.entry((hi, lo, meta & !META_LOGGED)).or_default();
            g.logged_before |= logged;
            g.recent |= recent;
            if recent {
                prefixes.insert((hi, lo, meta & (0xff | META_V4)));
            }
            if recent != logged {
                g.started |= recent;
                g.stopped |= !recent;
                let old_meta = meta;
                let meta = if recent {
                    meta | META_LOGGED
                } else {
                    meta & !META_LOGGED
                };
                // Only if the slot was not reused meanwhile (a worker's `init` rewrites it).
                let _ =
                    s.meta
                        .compare_exchange(old_meta, meta, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
        self.limited_now
            .store(prefixes.len() as u64, Ordering::Relaxed);
        let mut out = Vec::new();
        for ((hi, lo, meta), g) in groups {
            let limited = if g.started && !g.logged_before {
                true
            } else if g.stopped && !g.recent {
                false
            } else {
                continue;
            };
            out.push(Transition {
                prefix: describe(hi, lo, meta),
                class: Class::ALL[((meta >> 8) & 0xff) as usize % Class::ALL.len()],
                limited,
            });
        }
        out
    }
}

fn describe(hi: u64, lo: u64, meta: u32) -> String {
    let len = meta & 0xff;
    if meta & META_V4 != 0 {
        format!("{}/{len}", std::net::Ipv4Addr::from(lo as u32))
    } else {
        let bits = (u128::from(hi) << 64) | u128::from(lo);
        format!("{}/{len}", std::net::Ipv6Addr::from(bits))
    }
}

#[inline]
fn pack(ts: u32, balance: i64) -> u64 {
    (u64::from(ts) << 32) | u64::from(balance as i32 as u32)
}

#[inline]
fn unpack(v: u64) -> (u32, i64) {
    ((v >> 32) as u32, i64::from(v as u32 as i32))
}

impl RrlTable {
    /// The slot tag of (prefix, class, key) under this process's secret; never 0 (the free
    /// mark). It also chooses the slots probed, so without the secret neither can be aimed.
    #[inline]
    fn tag_of(&self, prefix: &Prefix, class: Class, key: u64) -> u64 {
        self.secret.hash_one((prefix.key(), class as u8, key)) | 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rate: u32, window: u32, slip: u32) -> RrlPolicy {
        RrlPolicy::from_config(&RrlConfig {
            responses_per_second: rate,
            window_secs: window,
            slip,
            ..RrlConfig::default()
        })
        .unwrap()
    }

    /// A positive answer for `name` (one A record).
    fn positive(name: &str) -> Vec<u8> {
        let mut m = wire::build_query(1, &wire::encode_name(name).unwrap(), 1);
        m[2] |= 0x84;
        m[7] = 1;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
        m
    }

    /// An NXDOMAIN or NODATA answer with the zone's SOA in the authority section.
    fn negative(name: &str, rcode: u8, zone: &str) -> Vec<u8> {
        let mut m = wire::build_query(1, &wire::encode_name(name).unwrap(), 1);
        m[2] |= 0x84;
        m[3] = rcode;
        m[9] = 1; // NSCOUNT
        m.extend_from_slice(&wire::encode_name(zone).unwrap());
        m.extend_from_slice(&[0, 6, 0, 1, 0, 0, 0, 60, 0, 22, 0xc0, 12, 0xc0, 12]);
        m.extend_from_slice(&[0; 20]);
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classes_follow_bind() {
        let a = positive("www.example.test.");
        assert_eq!(classify(&a).0, Class::Positive);
        assert_eq!(
            classify(&a),
            classify(&positive("WWW.example.TEST.")),
            "case-folded"
        );
        assert_ne!(classify(&a).1, classify(&positive("mail.example.test.")).1);
        let nx1 = negative("a.example.test.", 3, "example.test.");
        let nx2 = negative("b.example.test.", 3, "example.test.");
        assert_eq!(classify(&nx1).0, Class::Nxdomain);
        assert_eq!(
            classify(&nx1).1,
            classify(&nx2).1,
            "NXDOMAIN is keyed by zone"
        );
        let nodata = negative("a.example.test.", 0, "example.test.");
        assert_eq!(classify(&nodata).0, Class::Nodata);
        // NODATA is keyed by the name whatever the type (BIND), not by the zone.
        let mut nodata_aaaa = nodata.clone();
        let qtype_at = wire::question(&nodata).unwrap().name_end;
        nodata_aaaa[qtype_at..qtype_at + 2].copy_from_slice(&28u16.to_be_bytes());
        assert_eq!(classify(&nodata), classify(&nodata_aaaa));
        assert_ne!(
            classify(&nodata).1,
            classify(&negative("b.example.test.", 0, "example.test.")).1
        );
        let mut servfail = a.clone();
        servfail[3] = 2;
        assert_eq!(classify(&servfail), (Class::Error, 0));
        assert_eq!(classify(&[1, 2]).0, Class::Error);
    }

    #[test]
    fn answers_to_notify_update_and_other_opcodes_are_never_limited() {
        let p = policy(1, 15, 0);
        let t = RrlTable::new(1024);
        let c = ip("192.0.2.7");
        for opcode in [4u8, 5, 1, 2, 6, 15] {
            let mut a = negative("example.test.", 0, "example.test.");
            a[2] = (a[2] & 0x87) | opcode << 3;
            for _ in 0..100 {
                assert_eq!(t.decide(&p, c, &a, 10), Action::Send, "opcode {opcode}");
            }
        }
        // The same answer to a QUERY is limited after one second's credit.
        let q = negative("example.test.", 0, "example.test.");
        assert_eq!(t.decide(&p, c, &q, 10), Action::Send);
        assert_eq!(t.decide(&p, c, &q, 10), Action::Drop);
    }

    #[test]
    fn slots_are_chosen_with_a_secret_of_each_process() {
        // Two tables stand for two processes: the same (prefix, class, key) gets unrelated
        // tags, and so unrelated slots; a client cannot work out which keys collide.
        let (a, b) = (RrlTable::new(1 << 16), RrlTable::new(1 << 16));
        let p = policy(1, 15, 0).prefix_of(ip("192.0.2.7"));
        let tags = |t: &RrlTable| -> Vec<u64> {
            (0..64).map(|k| t.tag_of(&p, Class::Positive, k)).collect()
        };
        let (ta, tb) = (tags(&a), tags(&b));
        assert_eq!(ta, tags(&a), "stable within a process");
        assert!(ta.iter().all(|t| t & 1 == 1), "never the free mark");
        let same = ta.iter().zip(&tb).filter(|(x, y)| x == y).count();
        assert_eq!(same, 0, "{ta:?} {tb:?}");
    }

    #[test]
    fn one_seconds_credit_then_limited_until_the_window_passes() {
        let p = policy(20, 5, 2);
        let t = RrlTable::new(1024);
        let a = positive("big.example.test.");
        let c = ip("192.0.2.7");
        let mut sent = 0;
        let mut actions = Vec::new();
        for _ in 0..5000 {
            match t.decide(&p, c, &a, 100) {
                Action::Send => sent += 1,
                x => actions.push(x),
            }
        }
        assert_eq!(sent, 20, "one second's worth of credit");
        assert_eq!(
            actions[0],
            Action::Slip,
            "the first limited answer slips (BIND)"
        );
        assert_eq!(actions[1], Action::Drop);
        let slipped = actions.iter().filter(|x| **x == Action::Slip).count();
        assert_eq!(
            slipped,
            actions.len() / 2,
            "every second limited answer slips"
        );
        // The same /24 shares the balance; another /24 and another name do not.
        assert_ne!(t.decide(&p, ip("192.0.2.200"), &a, 100), Action::Send);
        assert_eq!(t.decide(&p, ip("192.0.3.1"), &a, 100), Action::Send);
        assert_eq!(
            t.decide(&p, c, &positive("x.example.test."), 100),
            Action::Send
        );
        // Flooding kept the balance at the floor (-window * rate): still limited after 4 s of
        // credit, served again after about the window.
        assert_ne!(t.decide(&p, c, &a, 104), Action::Send);
        assert_eq!(t.decide(&p, c, &a, 110), Action::Send);
    }

    #[test]
    fn all_per_second_exempt_log_only_and_scan() {
        let mut cfg = RrlConfig {
            all_per_second: 10,
            exempt: vec!["198.51.100.0/24".parse().unwrap()],
            ..RrlConfig::default()
        };
        let p = RrlPolicy::from_config(&cfg).unwrap();
        let t = RrlTable::new(1024);
        let c = ip("203.0.113.9");
        // Random names (a wildcard flood) each get a fresh positive balance; the cap holds.
        let sent = (0..100)
            .filter(|i| {
                t.decide(&p, c, &positive(&format!("r{i}.example.test.")), 7) == Action::Send
            })
            .count();
        assert_eq!(sent, 10);
        assert_eq!(
            t.decide(&p, ip("198.51.100.1"), &positive("a."), 7),
            Action::Send
        );
        let changes = t.scan(15);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].prefix, "203.0.113.0/24");
        assert!(changes[0].limited && changes[0].class == Class::All);
        assert_eq!(t.limited_now(), 1);
        assert!(t.scan(15).is_empty(), "logged once");
        cfg.log_only = true;
        let p = RrlPolicy::from_config(&cfg).unwrap();
        assert_eq!(t.decide(&p, c, &positive("z."), 7), Action::Logged);
        assert!(RrlPolicy::from_config(&RrlConfig::default()).is_none());
    }

    #[test]
    fn a_full_table_reuses_the_slot_idle_longest() {
        let p = policy(1, 15, 0);
        let t = RrlTable::new(4);
        let a = positive("a.");
        for i in 0..64u8 {
            t.decide(&p, ip(&format!("10.0.{i}.1")), &a, u32::from(i));
        }
        // A prefix flooding now keeps its (limited) slot while others come and go.
        let flooder = ip("10.9.9.9");
        assert_eq!(t.decide(&p, flooder, &a, 100), Action::Send);
        assert_eq!(t.decide(&p, flooder, &a, 100), Action::Drop);
    }

    #[test]
    fn all_per_second_limits_are_never_slipped() {
        let p = RrlPolicy::from_config(&RrlConfig {
            responses_per_second: 100,
            all_per_second: 5,
            slip: 1,
            ..RrlConfig::default()
        })
        .unwrap();
        let t = RrlTable::new(1024);
        let c = ip("203.0.113.9");
        let actions: Vec<Action> = (0..50)
            .map(|i| t.decide(&p, c, &positive(&format!("r{i}.example.test.")), 7))
            .collect();
        assert_eq!(actions.iter().filter(|a| **a == Action::Send).count(), 5);
        assert!(!actions.contains(&Action::Slip), "{actions:?}");
    }

    #[test]
    fn a_churn_of_new_keys_does_not_evict_a_prefix_in_debt() {
        let p = policy(1, 15, 0);
        let t = RrlTable::new(4);
        let a = positive("a.");
        let flooder = ip("10.9.9.9");
        assert_eq!(t.decide(&p, flooder, &a, 100), Action::Send);
        assert_eq!(t.decide(&p, flooder, &a, 100), Action::Drop);
        // In the same second, many new prefixes (one answer each, balances still >= 0) pass
        // through the four slots: the flooder's debt stays.
        for i in 0..64u8 {
            t.decide(&p, ip(&format!("10.0.{i}.1")), &a, 100);
        }
        assert_eq!(t.decide(&p, flooder, &a, 100), Action::Drop);
    }

    #[test]
    fn a_prefix_limited_on_many_names_is_one_prefix_and_one_log_line() {
        let p = policy(1, 5, 0);
        let t = RrlTable::new(1024);
        let c = ip("192.0.2.7");
        for i in 0..50 {
            let a = positive(&format!("n{i}.example.test."));
            for _ in 0..3 {
                t.decide(&p, c, &a, 10);
            }
        }
        let changes = t.scan(5);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].prefix, "192.0.2.0/24");
        assert!(changes[0].limited);
        assert_eq!(t.limited_now(), 1);
        assert!(t.scan(5).is_empty());
    }
}
