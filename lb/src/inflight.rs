//! The bounded per-backend table of UDP queries in flight, keyed by the upstream DNS ID.
//!
//! Each worker owns one table per backend, so it is never shared and never locked. The ID sent
//! upstream is drawn from a CSPRNG (RFC 5452: an off-path attacker must not predict it) and
//! mapped to a slot through a 64 Ki-entry index (128 KiB). Slots hold a copy of the client's
//! query: the question is needed to match the answer, and the whole query to re-send it to the
//! new set if its backend is removed and then stays silent. Slots are created on demand up to
//! the table's capacity and reused after that, so steady traffic allocates nothing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::mmsg::LocalAddr;
use crate::wire::Question;

/// Slot capacity reserved for a query copy up front; larger queries grow the slot once.
const QUERY_COPY_CAPACITY: usize = 512;

/// One query waiting for its answer.
#[derive(Debug)]
pub struct Slot {
    pub upstream_id: u16,
    pub client_id: u16,
    pub client: SocketAddr,
    /// Index of the listener socket the query arrived on (the answer leaves from it).
    pub listener: usize,
    /// The address the query was sent to, on a wildcard listener (the answer's source).
    pub local: Option<LocalAddr>,
    pub sent_at: Instant,
    /// The client's query as received (with the client's ID).
    pub query: Vec<u8>,
    /// Its first question, if it parses (the answer must echo it).
    pub question: Option<Question>,
    /// Already re-sent once after a swap; never re-sent twice.
    pub resent: bool,
    /// The caller's number for the socket the query left from (its answer must come back on
    /// it).
    pub sock: u32,
    /// The cache epoch the query was forwarded in, if its answer may be cached (0: not).
    pub cache_epoch: u64,
    in_use: bool,
}

/// Why a query could not be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

/// Where a query came from: the client, and the listener and local address it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub client: SocketAddr,
    pub listener: usize,
    pub local: Option<LocalAddr>,
}

/// A fixed-capacity map from upstream ID to [`Slot`].
#[derive(Debug)]
pub struct InflightTable {
    /// `index[id]` is slot number + 1, or 0 when `id` is free.
    index: Box<[u16]>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    capacity: usize,
    in_use: usize,
}

impl InflightTable {
    /// A table holding at most `capacity` (1..=65000) queries.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, 65_000);
        InflightTable {
            index: vec![0u16; 1 << 16].into_boxed_slice(),
            slots: Vec::new(),
            free: Vec::new(),
            capacity,
            in_use: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.in_use
    }

    pub fn is_empty(&self) -> bool {
        self.in_use == 0
    }

    /// Enters a query and returns the fresh upstream ID to send it with.
    ///
    /// `random_id` supplies candidate IDs; with the table at most ~99% of the ID space full a
    /// free one is found in a few draws, and a linear probe from the last draw guarantees an
    /// answer.
    pub fn insert(
        &mut self,
        mut random_id: impl FnMut() -> u16,
        origin: Origin,
        query: &[u8],
        question: Option<Question>,
        now: Instant,
        sock: u32,
    ) -> Result<u16, TableFull> {
        if self.in_use >= self.capacity {
            return Err(TableFull);
        }
        let mut id = random_id();
        let mut tries = 0;
        while self.index[id as usize] != 0 {
            tries += 1;
            id = if tries < 8 {
                random_id()
            } else {
                id.wrapping_add(1)
            };
        }
        let slot_no = match self.free.pop() {
            Some(n) => n as usize,
            None => {
                self.slots.push(Slot {
                    upstream_id: 0,
                    client_id: 0,
                    client: origin.client,
                    listener: 0,
                    local: None,
                    sent_at: now,
                    query: Vec::with_capacity(QUERY_COPY_CAPACITY),
                    question,
                    resent: false,
                    sock: 0,
                    cache_epoch: 0,
                    in_use: false,
                });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[slot_no];
        slot.upstream_id = id;
        slot.client_id = crate::wire::id(query);
        slot.client = origin.client;
        slot.listener = origin.listener;
        slot.local = origin.local;
        slot.sent_at = now;
        slot.query.clear();
        slot.query.extend_from_slice(query);
        slot.question = question;
        slot.resent = false;
        slot.sock = sock;
        slot.cache_epoch = 0;
        slot.in_use = true;
        self.index[id as usize] = slot_no as u16 + 1;
        self.in_use += 1;
        Ok(id)
    }

    /// The slot waiting under `id`, if any.
    #[inline]
    pub fn get(&self, id: u16) -> Option<&Slot> {
        match self.index[id as usize] {
            0 => None,
            n => Some(&self.slots[n as usize - 1]),
        }
    }

    /// The slot waiting under `id`, mutably.
    pub fn get_mut(&mut self, id: u16) -> Option<&mut Slot> {
        match self.index[id as usize] {
            0 => None,
            n => Some(&mut self.slots[n as usize - 1]),
        }
    }

    /// Frees the slot under `id`; returns whether there was one.
    pub fn release(&mut self, id: u16) -> bool {
        let n = self.index[id as usize];
        if n == 0 {
            return false;
        }
        self.index[id as usize] = 0;
        let slot = &mut self.slots[n as usize - 1];
        slot.in_use = false;
        self.free.push(n - 1);
        self.in_use -= 1;
        true
    }

    /// Appends to `out` the upstream IDs of queries sent at least `age` ago.
    pub fn older_than(&self, now: Instant, age: Duration, out: &mut Vec<u16>) {
        for s in &self.slots {
            if s.in_use && now.saturating_duration_since(s.sent_at) >= age {
                out.push(s.upstream_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    fn q() -> (Vec<u8>, Option<Question>) {
        let m = vec![
            0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
        ];
        let question = wire::question(&m).ok();
        (m, question)
    }

    fn from(client: SocketAddr, listener: usize) -> Origin {
        Origin {
            client,
            listener,
            local: None,
        }
    }

    #[test]
    fn insert_get_release_and_bound() {
        let (m, question) = q();
        let client: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let now = Instant::now();
        let mut t = InflightTable::new(3);
        let mut seq = [7u16, 7, 7, 9, 9, 9, 9, 9, 9, 9, 9, 9].into_iter();
        let a = t
            .insert(
                || seq.next().unwrap(),
                from(client, 0),
                &m,
                question,
                now,
                0,
            )
            .unwrap();
        let b = t
            .insert(
                || seq.next().unwrap(),
                from(client, 1),
                &m,
                question,
                now,
                0,
            )
            .unwrap();
        assert_eq!(a, 7);
        assert_eq!(b, 9, "a taken ID is never reused while in flight");
        let c = t
            .insert(|| 9, from(client, 1), &m, question, now, 0)
            .unwrap();
        assert_eq!(c, 10, "falls back to probing");
        assert_eq!(
            t.insert(|| 1, from(client, 0), &m, question, now, 0),
            Err(TableFull)
        );
        let s = t.get(b).unwrap();
        assert_eq!((s.client_id, s.listener), (0xabcd, 1));
        assert!(t.release(b));
        assert!(!t.release(b));
        assert!(t.get(b).is_none());
        assert_eq!(t.len(), 2);
        t.insert(|| 100, from(client, 0), &m, question, now, 0)
            .unwrap();
        assert_eq!(t.slots.len(), 3, "freed slots are reused");
    }

    proptest::proptest! {
        /// A model check: random inserts and releases keep the table consistent with a map,
        /// within its capacity, never handing out an ID already in flight.
        #[test]
        fn behaves_like_a_bounded_map(ops in proptest::collection::vec((proptest::bool::ANY, proptest::num::u16::ANY), 0..400)) {
            let (m, question) = q();
            let client: SocketAddr = "127.0.0.1:9".parse().unwrap();
            let now = Instant::now();
            let mut t = InflightTable::new(32);
            let mut model = std::collections::HashSet::new();
            for (insert, x) in ops {
                if insert {
                    let mut seed = x;
                    let r = t.insert(|| { seed = seed.wrapping_mul(31).wrapping_add(7); seed }, from(client, 0), &m, question, now, 0);
                    match r {
                        Ok(id) => proptest::prop_assert!(model.insert(id), "id {} handed out twice", id),
                        Err(TableFull) => proptest::prop_assert_eq!(model.len(), 32),
                    }
                } else {
                    let id = model.iter().next().copied().unwrap_or(x);
                    proptest::prop_assert_eq!(t.release(id), model.remove(&id));
                }
                proptest::prop_assert_eq!(t.len(), model.len());
                for id in &model {
                    proptest::prop_assert_eq!(t.get(*id).map(|s| s.upstream_id), Some(*id));
                }
            }
        }
    }

    #[test]
    fn finds_expired() {
        let (m, question) = q();
        let client: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let t0 = Instant::now();
        let mut t = InflightTable::new(10);
        t.insert(|| 1, from(client, 0), &m, question, t0, 0)
            .unwrap();
        t.insert(
            || 2,
            from(client, 0),
            &m,
            question,
            t0 + Duration::from_secs(1),
            0,
        )
        .unwrap();
        let mut out = Vec::new();
        t.older_than(
            t0 + Duration::from_millis(1500),
            Duration::from_secs(1),
            &mut out,
        );
        assert_eq!(out, vec![1]);
    }
}
