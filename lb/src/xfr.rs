//! Where a zone transfer's answer stream ends (AXFR, RFC 5936; IXFR, RFC 1995).
//!
//! A transfer is one query answered by a sequence of TCP messages. The proxy relays them in
//! order and must know when the last one went by, because servers such as BIND keep the
//! connection open afterwards: closing on end of stream would wait forever.
//!
//! - AXFR: the zone's SOA opens the stream and the same SOA closes it.
//! - IXFR: the server's current SOA (serial N) opens it. A reply of that SOA alone means "up to
//!   date". If the second record is not an SOA, the reply is AXFR-style and ends at the next
//!   SOA. Otherwise it is incremental: difference sequences (SOA old, deletions, SOA new,
//!   additions) follow, the last of which moves to N, and a final SOA N closes it: the third SOA
//!   with serial N. Difference sequences carry SOAs of their own, so counting SOAs alone would
//!   end too early.
//! - Any RCODE other than NOERROR ends either.

use crate::wire::{self, TYPE_AXFR, TYPE_IXFR, TYPE_SOA};

/// The kind of transfer a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XfrKind {
    Axfr,
    Ixfr,
}

impl XfrKind {
    /// The transfer a query's type asks for, if any.
    pub fn of_qtype(qtype: u16) -> Option<XfrKind> {
        match qtype {
            TYPE_AXFR => Some(XfrKind::Axfr),
            TYPE_IXFR => Some(XfrKind::Ixfr),
            _ => None,
        }
    }
}

/// Follows one transfer's answer messages and says which one is the last.
#[derive(Debug, Clone)]
pub struct XfrTracker {
    kind: XfrKind,
    /// Serial of the opening SOA, once seen.
    serial: Option<u32>,
    /// Answer records seen so far.
    records: u64,
    /// IXFR only: the reply is incremental (its second record is an SOA).
    incremental: bool,
    /// SOA records with the opening serial seen so far.
    soas_with_serial: u32,
    messages: u64,
    done: bool,
}

impl XfrTracker {
    pub fn new(kind: XfrKind) -> XfrTracker {
        XfrTracker {
            kind,
            serial: None,
            records: 0,
            incremental: false,
            soas_with_serial: 0,
            messages: 0,
            done: false,
        }
    }

    /// Messages fed so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Feeds the next answer message of the stream; true when it is the last one. A message
    /// that cannot be read ends the stream too (the client judges what it got).
    pub fn feed(&mut self, msg: &[u8]) -> bool {
        if self.done {
            return true;
        }
        self.messages += 1;
        let Ok(h) = wire::header(msg) else {
            self.done = true;
            return true;
        };
        if h.rcode != 0 || (self.messages == 1 && h.ancount == 0) {
            self.done = true;
            return true;
        }
        let mut walk = wire::records(msg);
        let first_message = self.messages == 1;
        for r in walk
            .by_ref()
            .take_while(|r| r.section == wire::Section::Answer)
        {
            self.records += 1;
            let soa = (r.rtype == TYPE_SOA)
                .then(|| wire::soa_serial_of(msg, &r))
                .flatten();
            if self.record(soa) {
                self.done = true;
                return true;
            }
        }
        if walk.malformed() {
            self.done = true;
            return true;
        }
        // An IXFR reply of the current SOA alone: the client is up to date.
        if self.kind == XfrKind::Ixfr && first_message && self.records == 1 && h.ancount == 1 {
            self.done = true;
        }
        self.done
    }

    /// Takes one answer record (its SOA serial, if it is an SOA); true if it closes the stream.
    fn record(&mut self, soa: Option<u32>) -> bool {
        let Some(serial) = self.serial else {
            // The stream must open with an SOA; anything else is not a transfer we can follow.
            return match soa {
                Some(s) => {
                    self.serial = Some(s);
                    self.soas_with_serial = 1;
                    false
                }
                None => true,
            };
        };
        if self.records == 2 && self.kind == XfrKind::Ixfr {
            self.incremental = soa.is_some();
        }
        if soa == Some(serial) {
            self.soas_with_serial += 1;
        }
        match (self.kind, self.incremental) {
            (XfrKind::Axfr, _) | (XfrKind::Ixfr, false) => soa.is_some(),
            (XfrKind::Ixfr, true) => self.soas_with_serial >= 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response message whose answer section is `rrs` (SOA serials, or None for an A record).
    fn message(rrs: &[Option<u32>], rcode: u8) -> Vec<u8> {
        let mut m = vec![0, 1, 0x84, rcode, 0, 1, 0, rrs.len() as u8, 0, 0, 0, 0];
        m.extend_from_slice(b"\x04zone\x00\x00\xfc\x00\x01");
        for rr in rrs {
            m.extend_from_slice(&[0xc0, 12]);
            match rr {
                Some(serial) => {
                    m.extend_from_slice(&[0, 6, 0, 1, 0, 0, 0, 60]);
                    let rdata = [
                        &[0xc0, 12][..],
                        &[0xc0, 12],
                        &serial.to_be_bytes(),
                        &[0; 16],
                    ]
                    .concat();
                    m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
                    m.extend_from_slice(&rdata);
                }
                None => m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]),
            }
        }
        m
    }

    fn ends_at(kind: XfrKind, messages: &[Vec<u8>]) -> Option<usize> {
        let mut t = XfrTracker::new(kind);
        messages.iter().position(|m| t.feed(m))
    }

    #[test]
    fn axfr_ends_at_the_closing_soa_across_messages() {
        let msgs = [
            message(&[Some(7), None, None], 0),
            message(&[None, None], 0),
            message(&[None, Some(7)], 0),
            message(&[None], 0),
        ];
        assert_eq!(ends_at(XfrKind::Axfr, &msgs), Some(2));
        assert_eq!(
            ends_at(XfrKind::Axfr, &[message(&[Some(7), None, Some(7)], 0)]),
            Some(0)
        );
        // The first message alone with only the SOA does not end an AXFR.
        assert_eq!(
            ends_at(
                XfrKind::Axfr,
                &[message(&[Some(7)], 0), message(&[None, Some(7)], 0)]
            ),
            Some(1)
        );
    }

    #[test]
    fn ixfr_incremental_ends_at_the_third_current_soa() {
        // SOA 9, (SOA 7, del, SOA 8, add), (SOA 8, del, SOA 9, add), SOA 9.
        let stream = [
            Some(9),
            Some(7),
            None,
            Some(8),
            None,
            Some(8),
            None,
            Some(9),
            None,
            Some(9),
        ];
        let msgs: Vec<Vec<u8>> = stream.chunks(3).map(|c| message(c, 0)).collect();
        assert_eq!(ends_at(XfrKind::Ixfr, &msgs), Some(msgs.len() - 1));
        let mut t = XfrTracker::new(XfrKind::Ixfr);
        for m in &msgs[..msgs.len() - 1] {
            assert!(!t.feed(m), "difference sequences carry SOAs of their own");
        }
    }

    #[test]
    fn ixfr_up_to_date_axfr_style_and_errors() {
        assert_eq!(ends_at(XfrKind::Ixfr, &[message(&[Some(9)], 0)]), Some(0));
        let axfr_style = [
            message(&[Some(9), None, None], 0),
            message(&[None, Some(9)], 0),
        ];
        assert_eq!(ends_at(XfrKind::Ixfr, &axfr_style), Some(1));
        assert_eq!(
            ends_at(XfrKind::Axfr, &[message(&[], 5)]),
            Some(0),
            "REFUSED"
        );
        assert_eq!(
            ends_at(XfrKind::Axfr, &[message(&[Some(1)], 0), message(&[], 9)]),
            Some(1)
        );
        assert_eq!(
            ends_at(XfrKind::Axfr, &[message(&[None], 0)]),
            Some(0),
            "no opening SOA"
        );
        assert_eq!(ends_at(XfrKind::Axfr, &[vec![1, 2, 3]]), Some(0));
        assert_eq!(XfrKind::of_qtype(252), Some(XfrKind::Axfr));
        assert_eq!(XfrKind::of_qtype(1), None);
    }

    proptest::proptest! {
        /// Arbitrary message bytes never panic and a tracker that said "done" stays done.
        #[test]
        fn arbitrary_streams_never_panic(msgs in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..6)) {
            for kind in [XfrKind::Axfr, XfrKind::Ixfr] {
                let mut t = XfrTracker::new(kind);
                let mut done = false;
                for m in &msgs {
                    let d = t.feed(m);
                    proptest::prop_assert!(!done || d);
                    done = d;
                }
            }
        }
    }
}
