//! A packet cache for authoritative answers that can never serve the old zone after a roll.
//!
//! Answers are stored as the backend sent them, keyed by everything that can change an answer:
//! the name (case-insensitively; a hit carries the asking client's own spelling), type, class,
//! the RD, CD and DO bits, whether EDNS was used, the UDP payload size class and the transport
//! the answer was fetched over ([`Transport`]: BIND's answer to the same question differs
//! between UDP and TCP once it passes BIND's `max-udp-size`). A hit is the
//! stored answer with the client's ID and its TTLs aged. Only plain queries are looked up or
//! stored: opcode QUERY, one question, not AXFR/IXFR, no TSIG, EDNS version 0 without options
//! (a query with a DNS cookie bypasses the cache: a stored answer's server cookie was minted by
//! BIND for another client). Only NOERROR and NXDOMAIN answers that are not truncated and fit a
//! slot are stored, for their smallest TTL (at most `max_ttl_secs`; NXDOMAIN and NODATA at most
//! `negative_ttl_secs` and the zone's SOA minimum).
//!
//! Never the old zone: every entry is valid for one *epoch*, the backend set's generation and
//! the count of serial changes the health checker has seen. A swap or a reload makes a new
//! generation and a serial change (up or down) bumps the count, which invalidates every entry
//! at once (a
//! flush is one atomic add). A query carries the epoch it was forwarded in and its answer is
//! stored only if that epoch is still current, so an answer from the old set still in flight
//! during a flush is never stored after it; answers from a backend whose serial lags are not
//! stored at all.
//!
//! Fixed memory: `entries` slots of `max_answer_size_bytes` bytes, allocated at start. One table is
//! shared by every UDP worker and the TCP path. Each slot is a sequence lock: readers copy the
//! answer with atomic loads and keep it only if the sequence did not move, writers claim a slot
//! by compare-and-swap and skip it if another writer holds it. No lock, no allocation per
//! query.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::Instant;

use crate::config::CacheConfig;
use crate::wire::{self, Question, Section, TYPE_AXFR, TYPE_IXFR, TYPE_OPT, TYPE_SOA, TYPE_TSIG};
use crate::zeroed::{zeroed_slice, Zeroable};

/// Slots probed for a key.
const PROBE: usize = 4;
/// TTL of a stale answer (RFC 8767).
const STALE_TTL_SECS: u32 = 30;

/// Why the cache was flushed (`lb_cache_flushes_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum FlushReason {
    /// `set-backends`.
    Swap,
    /// A reload (a new backend set generation).
    Reload,
    /// A health probe saw a zone's serial change (up or down).
    Serial,
}

impl FlushReason {
    pub const ALL: [FlushReason; 3] = [FlushReason::Swap, FlushReason::Reload, FlushReason::Serial];

    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Swap => "swap",
            FlushReason::Reload => "reload",
            FlushReason::Serial => "serial",
        }
    }
}

/// The transport a query came over, part of its [`CacheKey`].
///
/// An answer is served from the cache only over the transport it was fetched over. BIND sends
/// an answer over UDP only up to its `max-udp-size` (1232 bytes by default) and the client's
/// payload size, leaving out additional records that do not fit and setting TC when the answer
/// itself does not; over TCP it sends the whole answer. One entry for both would hand a UDP
/// client an answer fetched over TCP that BIND would have truncated (a datagram larger than
/// BIND sends, fragmented on the way), or a TCP client an answer trimmed to fit a datagram.
/// Keyed apart, a hit is always what BIND sent over that very transport, whatever BIND's
/// `max-udp-size` and `minimal-responses` settings; the cost is a second entry for a name
/// asked over both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The part of the key taken from a query: its name hash and the bits that change an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey {
    hash: u64,
    /// qtype << 16 | RD << 0 | CD << 1 | DO << 2 | EDNS << 3 | size class << 4 | TCP << 6.
    bits: u64,
    qclass: u16,
    /// The largest answer the client takes over UDP: 512 without EDNS, else its payload size
    /// (at least 512). Not part of the key: a class of sizes shares entries, and a hit longer
    /// than this is not served over UDP (the backend answers, truncating as BIND does).
    udp_limit: u16,
}

impl CacheKey {
    /// The largest answer this client takes over UDP.
    #[inline]
    pub fn udp_limit(&self) -> usize {
        usize::from(self.udp_limit)
    }
}

/// One slot: six 64-bit atomics.
#[derive(Debug)]
#[repr(C)]
struct Slot {
    /// Even: stable; odd: being written.
    seq: AtomicU64,
    /// Key hash (0 = empty).
    tag: AtomicU64,
    /// Key bits and class: bits << 16 | qclass.
    key: AtomicU64,
    /// The epoch the answer belongs to.
    epoch: AtomicU64,
    /// inserted second << 32 | expiry second.
    times: AtomicU64,
    /// Answer length in bytes.
    len: AtomicU64,
}

// SAFETY: `repr(C)` of atomics only, each valid as all-zero.
unsafe impl Zeroable for Slot {}

/// The shared cache (allocated at start; `None` in [`crate::backend::Shared`] when off).
#[derive(Debug)]
pub struct PacketCache {
    slots: Box<[Slot]>,
    /// Answer bytes, `words` 64-bit words per slot.
    data: Box<[AtomicU64]>,
    words: usize,
    max_ttl: u32,
    negative_ttl: u32,
    stale_ttl: u32,
    started: Instant,
    /// Serial changes seen (part of the epoch).
    serial_flushes: AtomicU64,
    /// The backend set generation in force (told by [`crate::backend::Shared`] on a swap).
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    flushes: [AtomicU64; 3],
}

/// Whether and how a query that came over TCP may use the cache: [`key_for`] with
/// [`Transport::Tcp`].
#[inline]
pub fn key_of(msg: &[u8], q: Option<&Question>) -> Option<CacheKey> {
    key_for(msg, q, Transport::Tcp)
}

/// Whether and how a query that came over `transport` may use the cache.
#[inline]
pub fn key_for(msg: &[u8], q: Option<&Question>, transport: Transport) -> Option<CacheKey> {
    let q = q.filter(|q| q.count == 1)?;
    let h = wire::header(msg).ok()?;
    if h.opcode != 0 || matches!(q.qtype, TYPE_AXFR | TYPE_IXFR) {
        return None;
    }
    let counts = [
        u16::from_be_bytes([msg[6], msg[7]]),
        u16::from_be_bytes([msg[8], msg[9]]),
        u16::from_be_bytes([msg[10], msg[11]]),
    ];
    if counts[0] != 0 || counts[1] != 0 || counts[2] > 1 {
        return None;
    }
    let mut edns = 0u64;
    let mut dnssec_ok = 0u64;
    let mut size_class = 0u64;
    let mut udp_limit = 512u16;
    if counts[2] == 1 {
        // The one additional record must be a plain OPT: version 0, no options.
        let opt = wire::records(msg).next()?;
        let ttl = msg.get(opt.ttl_at..opt.ttl_at + 4)?;
        if opt.rtype != TYPE_OPT || ttl[1] != 0 || opt.rdata_start != opt.rdata_end {
            return None;
        }
        edns = 1;
        dnssec_ok = u64::from(ttl[2] >> 7);
        udp_limit = opt.class.max(512);
        size_class = match opt.class {
            0..=1231 => 1,
            1232..=4095 => 2,
            _ => 3,
        };
    }
    let rd = u64::from(msg[2] & 0x01);
    let cd = u64::from((msg[3] >> 4) & 0x01);
    Some(CacheKey {
        hash: wire::name_hash(msg, q.name_start),
        bits: (u64::from(q.qtype) << 16)
            | rd
            | cd << 1
            | dnssec_ok << 2
            | edns << 3
            | size_class << 4
            | u64::from(transport == Transport::Tcp) << 6,
        qclass: q.qclass,
        udp_limit,
    })
}

impl PacketCache {
    /// The cache of a `[cache]` section, or `None` when `entries` is 0.
    pub fn new(c: &CacheConfig) -> Option<PacketCache> {
        if c.entries == 0 {
            return None;
        }
        let n = c.entries.max(PROBE).next_power_of_two();
        let words = c.max_answer_size_bytes.div_ceil(8);
        // Zeroed: memory is fixed by `entries`, and resident only as slots fill.
        let slots: Box<[Slot]> = zeroed_slice(n);
        let data: Box<[AtomicU64]> = zeroed_slice(n * words);
        Some(PacketCache {
            slots,
            data,
            words,
            max_ttl: c.max_ttl_secs,
            negative_ttl: c.negative_ttl_secs,
            stale_ttl: c.stale_ttl_secs,
            started: Instant::now(),
            serial_flushes: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            flushes: Default::default(),
        })
    }

    /// The largest answer stored.
    pub fn max_answer_size(&self) -> usize {
        self.words * 8
    }

    /// Whether stale answers may be served (while every backend is down).
    pub fn serves_stale(&self) -> bool {
        self.stale_ttl > 0
    }

    fn now(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// The epoch of backend set `generation`: an answer is stored and served only within it.
    #[inline]
    pub fn epoch(&self, generation: u64) -> u64 {
        (generation << 32) | (self.serial_flushes.load(Ordering::Acquire) & 0xffff_ffff)
    }

    /// Notes the backend set generation now in force: answers to queries forwarded under an
    /// older one are not stored any more.
    pub fn set_generation(&self, generation: u64) {
        self.generation.store(generation, Ordering::Release);
    }

    /// The epoch answers are stored in now.
    pub fn current(&self) -> u64 {
        self.epoch(self.generation.load(Ordering::Acquire))
    }

    /// Counts a flush that a new backend set generation made (swap or reload).
    pub fn count_flush(&self, reason: FlushReason) {
        self.flushes[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Invalidates every entry (a zone's serial changed).
    pub fn flush_serial(&self) {
        self.serial_flushes.fetch_add(1, Ordering::AcqRel);
        self.count_flush(FlushReason::Serial);
    }

    /// Adds a batch's tally of hits and misses.
    pub fn count(&self, hits: u64, misses: u64) {
        if hits > 0 {
            self.hits.fetch_add(hits, Ordering::Relaxed);
        }
        if misses > 0 {
            self.misses.fetch_add(misses, Ordering::Relaxed);
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub fn flushes(&self, reason: FlushReason) -> u64 {
        self.flushes[reason as usize].load(Ordering::Relaxed)
    }

    /// Entries valid in `epoch` now (a scan: for metrics, off the per-packet path).
    pub fn entries(&self, epoch: u64) -> u64 {
        let now = self.now();
        self.slots
            .iter()
            .filter(|s| {
                s.tag.load(Ordering::Relaxed) != 0
                    && s.epoch.load(Ordering::Relaxed) == epoch
                    && (s.times.load(Ordering::Relaxed) as u32) > now
            })
            .count() as u64
    }

    fn slot_range(&self, key: &CacheKey) -> impl Iterator<Item = usize> {
        let mask = self.slots.len() - 1;
        let start = (tag_of(key) as usize) & mask;
        (0..PROBE).map(move |k| (start + k) & mask)
    }

    /// Looks `query` up in `epoch`; on a hit writes the answer for it into `out` (the client's
    /// ID and spelling of the name, TTLs aged) and returns its length. With `stale`, an entry
    /// expired less than `stale_ttl_secs` ago is served too (its TTLs set to 30 s). An answer
    /// longer than `out` (for UDP: [`CacheKey::udp_limit`]) is a miss.
    pub fn lookup(
        &self,
        key: &CacheKey,
        query: &[u8],
        q: &Question,
        epoch: u64,
        stale: bool,
        out: &mut [u8],
    ) -> Option<usize> {
        let tag = tag_of(key);
        let now = self.now();
        for i in self.slot_range(key) {
            let s = &self.slots[i];
            if s.tag.load(Ordering::Relaxed) != tag {
                continue;
            }
            let seq = s.seq.load(Ordering::Acquire);
            if seq & 1 == 1 {
                return None;
            }
            let times = s.times.load(Ordering::Relaxed);
            let (inserted, expires) = ((times >> 32) as u32, times as u32);
            let fresh = expires > now;
            let usable = fresh || (stale && now < expires.saturating_add(self.stale_ttl));
            if s.epoch.load(Ordering::Relaxed) != epoch
                || s.key.load(Ordering::Relaxed) != (key.bits << 16 | u64::from(key.qclass))
                || !usable
            {
                return None;
            }
            let len = s.len.load(Ordering::Relaxed) as usize;
            if len > out.len() || len > self.words * 8 {
                return None;
            }
            self.copy_out(i, len, out);
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) != seq {
                return None;
            }
            return finish_hit(&mut out[..len], query, q, now - inserted.min(now), fresh);
        }
        None
    }

    fn copy_out(&self, slot: usize, len: usize, out: &mut [u8]) {
        let words = &self.data[slot * self.words..slot * self.words + len.div_ceil(8)];
        for (chunk, w) in out[..len].chunks_mut(8).zip(words) {
            let bytes = w.load(Ordering::Relaxed).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Stores `answer` (whose query's key is `key`) if it may be cached and `epoch` (the one
    /// its query was forwarded in) is still current.
    pub fn insert(&self, key: &CacheKey, epoch: u64, answer: &[u8]) {
        let current = self.current();
        if epoch != current || answer.len() > self.words * 8 {
            return;
        }
        let Some(ttl) = self.ttl_of(answer) else {
            return;
        };
        let now = self.now();
        let tag = tag_of(key);
        // Its own slot, else an empty, stale-epoch or expired one, else the one expiring first.
        let mut pick = None;
        let mut soonest = (usize::MAX, u32::MAX);
        for i in self.slot_range(key) {
            let s = &self.slots[i];
            let t = s.tag.load(Ordering::Relaxed);
            let expires = s.times.load(Ordering::Relaxed) as u32;
            if t == tag || t == 0 || s.epoch.load(Ordering::Relaxed) != current || expires <= now {
                pick = Some(i);
                break;
            }
            if expires < soonest.1 {
                soonest = (i, expires);
            }
        }
        let i = pick.unwrap_or(soonest.0);
        let s = &self.slots[i];
        let seq = s.seq.load(Ordering::Relaxed);
        if seq & 1 == 1
            || s.seq
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return; // another writer has it
        }
        fence(Ordering::Release);
        s.tag.store(tag, Ordering::Relaxed);
        s.key
            .store(key.bits << 16 | u64::from(key.qclass), Ordering::Relaxed);
        s.epoch.store(epoch, Ordering::Relaxed);
        s.times.store(
            u64::from(now) << 32 | u64::from(now.saturating_add(ttl)),
            Ordering::Relaxed,
        );
        s.len.store(answer.len() as u64, Ordering::Relaxed);
        let words = &self.data[i * self.words..];
        for (chunk, w) in answer.chunks(8).zip(words) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            w.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        s.seq.store(seq + 2, Ordering::Release);
    }

    /// How long `answer` may be cached, if at all.
    fn ttl_of(&self, answer: &[u8]) -> Option<u32> {
        let h = wire::header(answer).ok()?;
        // One question, the query's (checked by the caller's answer matching): an answer
        // without one is never stored, whatever its RCODE.
        if !h.qr || h.tc || h.qdcount != 1 || !(h.rcode == 0 || h.rcode == 3) {
            return None;
        }
        let mut walk = wire::records(answer);
        let mut ttl = u32::MAX;
        let mut negative_cap = None;
        for r in walk.by_ref() {
            match r.rtype {
                TYPE_OPT => continue,
                TYPE_TSIG => return None,
                _ => {}
            }
            let t = u32::from_be_bytes(answer.get(r.ttl_at..r.ttl_at + 4)?.try_into().ok()?);
            ttl = ttl.min(t);
            if r.rtype == TYPE_SOA && r.section == Section::Authority {
                // RFC 2308: the negative TTL is the smaller of the SOA's TTL and MINIMUM.
                let minimum = answer.get(r.rdata_end.checked_sub(4)?..r.rdata_end)?;
                negative_cap = Some(u32::from_be_bytes(minimum.try_into().ok()?).min(t));
            }
        }
        if walk.malformed() {
            return None;
        }
        // NXDOMAIN, and NODATA (no answer, the zone's SOA in the authority section); a referral
        // (no answer, NS records) is kept for its records' TTL like a positive answer.
        let negative = h.rcode == 3 || (h.ancount == 0 && negative_cap.is_some());
        let ttl = if negative {
            ttl.min(negative_cap?).min(self.negative_ttl)
        } else {
            ttl.min(self.max_ttl)
        };
        (ttl > 0 && ttl != u32::MAX).then_some(ttl)
    }
}

/// Turns a stored answer copied into `out` into the answer to `query`: its ID, its spelling
/// of the name, TTLs aged by `age` seconds (or set to 30 s for a stale answer).
fn finish_hit(out: &mut [u8], query: &[u8], q: &Question, age: u32, fresh: bool) -> Option<usize> {
    let stored = wire::question(out).ok()?;
    let name = &query[q.name_start..q.name_end];
    if stored.name_end - stored.name_start != name.len()
        || !wire::names_equal(out, stored.name_start, query, q.name_start)
    {
        return None;
    }
    out[stored.name_start..stored.name_end].copy_from_slice(name);
    out[..2].copy_from_slice(&query[..2]);
    // The TTLs to rewrite, found before writing (the walk borrows the message).
    let mut at = [0usize; 64];
    let mut n = 0;
    for r in wire::records(out) {
        if r.rtype == TYPE_OPT {
            continue;
        }
        if n == at.len() {
            return None; // more records than a cached answer is expected to have
        }
        at[n] = r.ttl_at;
        n += 1;
    }
    for &p in &at[..n] {
        let t = u32::from_be_bytes(out[p..p + 4].try_into().ok()?);
        let aged = if fresh {
            t.saturating_sub(age)
        } else {
            STALE_TTL_SECS
        };
        out[p..p + 4].copy_from_slice(&aged.to_be_bytes());
    }
    Some(out.len())
}

#[inline]
fn tag_of(key: &CacheKey) -> u64 {
    let mut x = key.hash ^ key.bits.rotate_left(29) ^ (u64::from(key.qclass) << 48);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(entries: usize) -> CacheConfig {
        CacheConfig {
            entries,
            ..CacheConfig::default()
        }
    }

    fn query(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = wire::build_query(0x1234, &wire::encode_name(name).unwrap(), qtype);
        m[2] |= 0x01; // RD
        if let Some(size) = edns {
            m[11] = 1;
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        m
    }

    /// BIND's answer to `q`: one A record with `ttl`.
    fn answer(q: &[u8], ttl: u32) -> Vec<u8> {
        let qq = wire::question(q).unwrap();
        let mut a = q[..qq.end].to_vec();
        a[2] |= 0x84;
        a[5] = 1;
        a[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        a.extend_from_slice(&ttl.to_be_bytes());
        a.extend_from_slice(&[0, 4, 192, 0, 2, 1]);
        a
    }

    fn key(m: &[u8]) -> CacheKey {
        key_for(m, wire::question(m).ok().as_ref(), Transport::Udp).unwrap()
    }

    #[test]
    fn a_hit_carries_the_clients_id_and_spelling_and_only_matches_its_key() {
        let c = PacketCache::new(&config(1024)).unwrap();
        let q = query("www.Example.test.", 1, None);
        let a = answer(&q, 300);
        c.set_generation(1);
        let e = c.epoch(1);
        c.insert(&key(&q), e, &a);
        let mut q2 = query("WWW.example.TEST.", 1, None);
        q2[..2].copy_from_slice(&[0xbe, 0xef]);
        let mut out = [0u8; 512];
        let qq = wire::question(&q2).unwrap();
        let n = c
            .lookup(&key(&q2), &q2, &qq, e, false, &mut out)
            .expect("hit");
        assert_eq!(&out[..2], &[0xbe, 0xef]);
        assert_eq!(
            &out[12..qq.name_end],
            &q2[12..qq.name_end],
            "the client's spelling"
        );
        assert_eq!(
            &out[qq.name_end..n],
            &a[qq.name_end..],
            "the rest as stored"
        );
        // Another type, EDNS, another size class, another epoch: misses.
        for other in [
            query("www.example.test.", 28, None),
            query("www.example.test.", 1, Some(1232)),
        ] {
            assert!(c
                .lookup(
                    &key(&other),
                    &other,
                    &wire::question(&other).unwrap(),
                    e,
                    false,
                    &mut out
                )
                .is_none());
        }
        assert_ne!(
            key(&query("a.", 1, Some(512))),
            key(&query("a.", 1, Some(4096)))
        );
        assert!(c
            .lookup(&key(&q2), &q2, &qq, c.epoch(2), false, &mut out)
            .is_none());
        c.flush_serial();
        assert!(
            c.lookup(&key(&q2), &q2, &qq, c.epoch(1), false, &mut out)
                .is_none(),
            "serial flush"
        );
        assert_eq!(c.flushes(FlushReason::Serial), 1);
    }

    #[test]
    fn a_udp_hit_is_never_longer_than_the_client_takes() {
        let c = PacketCache::new(&CacheConfig {
            entries: 64,
            max_answer_size_bytes: 2048,
            ..CacheConfig::default()
        })
        .unwrap();
        c.set_generation(1);
        let e = c.epoch(1);
        // A 900-byte answer, as a TCP retry after TC=1 would store it.
        let q = query("big.example.test.", 1, None);
        let mut a = answer(&q, 300);
        let pad = 900 - a.len();
        a[11] = 1; // one additional record: an unknown type carrying the padding
        a.extend_from_slice(&[0xc0, 12, 0xff, 0x00, 0, 1, 0, 0, 1, 44]);
        a.extend_from_slice(&((pad - 12) as u16).to_be_bytes());
        a.resize(900, 7);
        c.insert(&key(&q), e, &a);
        let qq = wire::question(&q).unwrap();
        let k = key(&q);
        assert_eq!(k.udp_limit(), 512, "no EDNS: 512 bytes");
        let mut out = [0u8; 2048];
        assert!(
            c.lookup(&k, &q, &qq, e, false, &mut out[..k.udp_limit()])
                .is_none(),
            "too long for this UDP client: the backend answers (and truncates)"
        );
        assert_eq!(
            c.lookup(&k, &q, &qq, e, false, &mut out),
            Some(900),
            "a UDP client with room for it"
        );
        assert_eq!(key(&query("a.", 1, Some(1232))).udp_limit(), 1232);
        assert_eq!(key(&query("a.", 1, Some(100))).udp_limit(), 512);
    }

    #[test]
    fn an_answer_fetched_over_one_transport_is_never_served_over_the_other() {
        let c = PacketCache::new(&CacheConfig {
            entries: 64,
            max_answer_size_bytes: 4096,
            ..CacheConfig::default()
        })
        .unwrap();
        c.set_generation(1);
        let e = c.epoch(1);
        // A 2,000-byte answer to a client advertising 4096, fetched over TCP (BIND truncated
        // it over UDP at its max-udp-size).
        let q = query("big.example.test.", 16, Some(4096));
        let qq = wire::question(&q).unwrap();
        let mut a = answer(&q, 300);
        let pad = 2000 - a.len();
        a[11] = 1;
        a.extend_from_slice(&[0xc0, 12, 0xff, 0x00, 0, 1, 0, 0, 1, 44]);
        a.extend_from_slice(&((pad - 12) as u16).to_be_bytes());
        a.resize(2000, 7);
        let tcp = key_for(&q, Some(&qq), Transport::Tcp).unwrap();
        let udp = key_for(&q, Some(&qq), Transport::Udp).unwrap();
        assert_ne!(tcp, udp);
        assert_eq!(tcp, key_of(&q, Some(&qq)).unwrap(), "key_of is the TCP key");
        c.insert(&tcp, e, &a);
        let mut out = [0u8; 4096];
        assert!(
            c.lookup(&udp, &q, &qq, e, false, &mut out[..udp.udp_limit()])
                .is_none(),
            "over UDP the backend answers (TC=1, as BIND)"
        );
        assert_eq!(c.lookup(&tcp, &q, &qq, e, false, &mut out), Some(2000));
        // And the other way: an answer fetched over UDP is not a TCP hit.
        c.flush_serial();
        let e = c.epoch(1);
        let small = answer(&q, 300);
        c.insert(&udp, e, &small);
        assert!(c.lookup(&tcp, &q, &qq, e, false, &mut out).is_none());
        assert_eq!(
            c.lookup(&udp, &q, &qq, e, false, &mut out[..udp.udp_limit()]),
            Some(small.len())
        );
    }

    #[test]
    fn what_is_never_cached() {
        let c = PacketCache::new(&config(1024)).unwrap();
        c.set_generation(1);
        let e = c.epoch(1);
        let q = query("a.test.", 1, None);
        // Not a plain query: another opcode, a transfer, a cookie, an EDNS option.
        let mut notify = q.clone();
        notify[2] |= 4 << 3;
        assert!(key_of(&notify, wire::question(&notify).ok().as_ref()).is_none());
        assert!(key_of(
            &query("a.test.", 252, None),
            wire::question(&query("a.test.", 252, None)).ok().as_ref()
        )
        .is_none());
        let mut cookie = query("a.test.", 1, Some(1232));
        let n = cookie.len();
        cookie[n - 2..].copy_from_slice(&[0, 12]);
        cookie.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(key_of(&cookie, wire::question(&cookie).ok().as_ref()).is_none());
        // Answers: TC, SERVFAIL, REFUSED, TTL 0, an epoch that moved on.
        for (mutate, why) in [
            (
                Box::new(|a: &mut Vec<u8>| a[2] |= 0x02) as Box<dyn Fn(&mut Vec<u8>)>,
                "tc",
            ),
            (Box::new(|a: &mut Vec<u8>| a[3] = 2), "servfail"),
            (Box::new(|a: &mut Vec<u8>| a[3] = 5), "refused"),
        ] {
            let mut a = answer(&q, 300);
            mutate(&mut a);
            c.insert(&key(&q), e, &a);
            let mut out = [0u8; 512];
            assert!(
                c.lookup(
                    &key(&q),
                    &q,
                    &wire::question(&q).unwrap(),
                    e,
                    false,
                    &mut out
                )
                .is_none(),
                "{why}"
            );
        }
        c.insert(&key(&q), e, &answer(&q, 0));
        c.insert(&key(&q), c.epoch(0), &answer(&q, 300));
        // An answer without a question is never stored, whatever its RCODE.
        let mut bare = answer(&q, 300);
        bare[5] = 0;
        let qq = wire::question(&q).unwrap();
        bare.drain(12..qq.end);
        bare.splice(12..14, [0]); // the record's owner: the root, not a pointer to the question
        assert_eq!(wire::records(&bare).count(), 1);
        c.insert(&key(&q), e, &bare);
        let mut out = [0u8; 512];
        assert!(c
            .lookup(
                &key(&q),
                &q,
                &wire::question(&q).unwrap(),
                e,
                false,
                &mut out
            )
            .is_none());
        assert_eq!(c.entries(e), 0);
    }

    #[test]
    fn negative_answers_are_bounded_by_the_soa_minimum() {
        let c = PacketCache::new(&CacheConfig {
            entries: 64,
            negative_ttl_secs: 3600,
            ..CacheConfig::default()
        })
        .unwrap();
        let q = query("nope.test.", 1, None);
        let qq = wire::question(&q).unwrap();
        let mut a = q[..qq.end].to_vec();
        a[2] |= 0x84;
        a[3] = 3;
        a[6..12].copy_from_slice(&[0, 0, 0, 1, 0, 0]);
        a.extend_from_slice(&[
            0xc0, 17, 0, 6, 0, 1, 0, 0, 0x0e, 0x10, 0, 24, 0xc0, 17, 0xc0, 17,
        ]);
        a.extend_from_slice(&[0; 16]);
        a.extend_from_slice(&60u32.to_be_bytes()); // MINIMUM
        assert_eq!(c.ttl_of(&a), Some(60));
    }

    proptest::proptest! {
        /// TTL ageing never underflows and arbitrary stored bytes never panic.
        #[test]
        fn ageing_and_garbage(bytes in proptest::collection::vec(proptest::num::u8::ANY, 12..300), age in 0u32..100_000) {
            let q = query("a.test.", 1, None);
            let qq = wire::question(&q).unwrap();
            let mut out = bytes.clone();
            let _ = finish_hit(&mut out, &q, &qq, age, true);
            let mut a = answer(&q, 50);
            let n = a.len();
            let r = finish_hit(&mut a, &q, &qq, age, true);
            proptest::prop_assert_eq!(r, Some(n));
            let t = u32::from_be_bytes(a[n - 10..n - 6].try_into().unwrap());
            proptest::prop_assert_eq!(t, 50u32.saturating_sub(age));
        }
    }
}
