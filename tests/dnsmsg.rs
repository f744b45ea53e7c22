//! Raw DNS messages for conformance tests: a query builder that can express what a codec would
//! refuse (any opcode, QDCOUNT 0 or 2, unknown classes, EDNS versions, options and flags,
//! trailing bytes), a walker over answers that never re-encodes them, the masks that make two
//! answers of the same server comparable (ID, server cookie, TSIG), hex diffs for failure
//! messages, the end-of-transfer rules of RFC 5936 (AXFR) and RFC 1995 (IXFR), and TSIG
//! (RFC 8945, hmac-sha256) signing and verification.
//!
//! Everything works on bytes: the point of these tests is that the proxy relays BIND's answers
//! byte for byte, so nothing here may normalise what it compares beyond the documented masks.

use std::fmt::Write as _;

/// Record types and classes used by name.
pub mod types {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const MX: u16 = 15;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const OPT: u16 = 41;
    pub const TSIG: u16 = 250;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
    pub const CLASS_IN: u16 = 1;
    pub const CLASS_CH: u16 = 3;
    pub const CLASS_ANY: u16 = 255;
    /// EDNS option code of DNS COOKIE (RFC 7873).
    pub const OPT_COOKIE: u16 = 10;
}
use types::*;

/// Encodes a presentation name (`www.Example.test.`) to wire format, keeping the case.
pub fn name_wire(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// The EDNS(0) OPT record of a [`QueryBuilder`].
#[derive(Clone, Debug)]
pub struct Edns {
    pub bufsize: u16,
    pub version: u8,
    /// The 16 flag bits of the OPT TTL (DO is 0x8000).
    pub flags: u16,
    pub options: Vec<(u16, Vec<u8>)>,
}

impl Edns {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(0); // root owner
        out.extend_from_slice(&OPT.to_be_bytes());
        out.extend_from_slice(&self.bufsize.to_be_bytes());
        out.push(0); // extended RCODE
        out.push(self.version);
        out.extend_from_slice(&self.flags.to_be_bytes());
        let mut rdata = Vec::new();
        for (code, data) in &self.options {
            rdata.extend_from_slice(&code.to_be_bytes());
            rdata.extend_from_slice(&(data.len() as u16).to_be_bytes());
            rdata.extend_from_slice(data);
        }
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
}

/// Builds a query byte by byte, including shapes no codec would produce.
#[derive(Clone, Debug)]
pub struct QueryBuilder {
    pub id: u16,
    /// Header bytes 2 and 3 (QR, opcode, AA, TC, RD / RA, Z, AD, CD, RCODE).
    pub flags: [u8; 2],
    pub questions: Vec<(Vec<u8>, u16, u16)>,
    /// Records for the answer, authority and additional sections, already encoded, with their
    /// counts (the OPT record is added after them).
    pub answer: Vec<u8>,
    pub ancount: u16,
    pub authority: Vec<u8>,
    pub nscount: u16,
    pub additional: Vec<u8>,
    pub arcount: u16,
    pub edns: Option<Edns>,
    /// Overrides the header's QDCOUNT (to lie about it).
    pub qdcount: Option<u16>,
    /// Bytes appended after everything (garbage after the message).
    pub trailing: Vec<u8>,
}

impl QueryBuilder {
    /// A standard query (opcode 0, RD=0, no EDNS) for `name` of `qtype`, class IN.
    pub fn new(id: u16, name: &str, qtype: u16) -> QueryBuilder {
        QueryBuilder {
            id,
            flags: [0, 0],
            questions: vec![(name_wire(name), qtype, CLASS_IN)],
            answer: Vec::new(),
            ancount: 0,
            authority: Vec::new(),
            nscount: 0,
            additional: Vec::new(),
            arcount: 0,
            edns: None,
            qdcount: None,
            trailing: Vec::new(),
        }
    }
    pub fn opcode(mut self, op: u8) -> Self {
        self.flags[0] = (self.flags[0] & !0x78) | ((op & 0x0f) << 3);
        self
    }
    pub fn rd(mut self) -> Self {
        self.flags[0] |= 0x01;
        self
    }
    pub fn ad(mut self) -> Self {
        self.flags[1] |= 0x20;
        self
    }
    pub fn cd(mut self) -> Self {
        self.flags[1] |= 0x10;
        self
    }
    /// Sets the header's Z bit (must be zero; servers ignore it).
    pub fn z(mut self) -> Self {
        self.flags[1] |= 0x40;
        self
    }
    pub fn class(mut self, class: u16) -> Self {
        for q in &mut self.questions {
            q.2 = class;
        }
        self
    }
    pub fn no_question(mut self) -> Self {
        self.questions.clear();
        self
    }
    pub fn question(mut self, name: &str, qtype: u16, class: u16) -> Self {
        self.questions.push((name_wire(name), qtype, class));
        self
    }
    /// Adds EDNS(0) with this buffer size (or changes the buffer size).
    pub fn edns(mut self, bufsize: u16) -> Self {
        match &mut self.edns {
            Some(e) => e.bufsize = bufsize,
            None => {
                self.edns = Some(Edns {
                    bufsize,
                    version: 0,
                    flags: 0,
                    options: Vec::new(),
                })
            }
        }
        self
    }
    fn edns_mut(&mut self) -> &mut Edns {
        if self.edns.is_none() {
            self.edns = Some(Edns {
                bufsize: 1232,
                version: 0,
                flags: 0,
                options: Vec::new(),
            });
        }
        self.edns.as_mut().expect("just set")
    }
    pub fn edns_version(mut self, v: u8) -> Self {
        self.edns_mut().version = v;
        self
    }
    pub fn edns_flags(mut self, flags: u16) -> Self {
        self.edns_mut().flags |= flags;
        self
    }
    pub fn dnssec_ok(self) -> Self {
        self.edns_flags(0x8000)
    }
    pub fn option(mut self, code: u16, data: &[u8]) -> Self {
        self.edns_mut().options.push((code, data.to_vec()));
        self
    }
    /// A DNS COOKIE option: the 8-byte client cookie, and a server cookie if given.
    pub fn cookie(self, client: [u8; 8], server: &[u8]) -> Self {
        let mut data = client.to_vec();
        data.extend_from_slice(server);
        self.option(OPT_COOKIE, &data)
    }
    /// Adds an encoded record to the authority section (an IXFR query carries the client's SOA
    /// there).
    pub fn authority_rr(mut self, rr: &[u8]) -> Self {
        self.authority.extend_from_slice(rr);
        self.nscount += 1;
        self
    }
    /// Adds an encoded record to the answer section.
    pub fn answer_rr(mut self, rr: &[u8]) -> Self {
        self.answer.extend_from_slice(rr);
        self.ancount += 1;
        self
    }
    /// Adds an encoded record to the additional section (before the OPT record).
    pub fn additional_rr(mut self, rr: &[u8]) -> Self {
        self.additional.extend_from_slice(rr);
        self.arcount += 1;
        self
    }
    pub fn qdcount(mut self, n: u16) -> Self {
        self.qdcount = Some(n);
        self
    }
    pub fn trailing(mut self, bytes: &[u8]) -> Self {
        self.trailing.extend_from_slice(bytes);
        self
    }
    pub fn build(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(512);
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&self.flags);
        let qd = self.qdcount.unwrap_or(self.questions.len() as u16);
        let ar = self.arcount + u16::from(self.edns.is_some());
        for n in [qd, self.ancount, self.nscount, ar] {
            m.extend_from_slice(&n.to_be_bytes());
        }
        for (name, t, c) in &self.questions {
            m.extend_from_slice(name);
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&c.to_be_bytes());
        }
        m.extend_from_slice(&self.answer);
        m.extend_from_slice(&self.authority);
        m.extend_from_slice(&self.additional);
        if let Some(e) = &self.edns {
            e.encode(&mut m);
        }
        m.extend_from_slice(&self.trailing);
        m
    }
}

/// Encodes a resource record (uncompressed owner).
pub fn rr(owner: &str, rtype: u16, class: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut out = name_wire(owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
    out
}

/// The SOA record an IXFR query carries in its authority section (RFC 1995 §3).
pub fn soa_rr(zone: &str, serial: u32) -> Vec<u8> {
    let mut rdata = name_wire(&format!("ns1.{zone}"));
    rdata.extend(name_wire(&format!("hostmaster.{zone}")));
    for v in [serial, 3600, 600, 86400, 300] {
        rdata.extend_from_slice(&v.to_be_bytes());
    }
    rr(zone, SOA, CLASS_IN, 0, &rdata)
}

/// One resource record located in a message.
#[derive(Clone, Copy, Debug)]
pub struct RrPos {
    pub start: usize,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub rdata: usize,
    pub end: usize,
}

/// Where everything sits in a message.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub qdcount: u16,
    /// Offset just past the question section.
    pub question_end: usize,
    pub answers: Vec<RrPos>,
    pub authority: Vec<RrPos>,
    pub additional: Vec<RrPos>,
    /// Bytes after the last counted record.
    pub trailing: usize,
}

/// Skips a (possibly compressed) name at `pos`; returns the offset just past it in place.
pub fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, String> {
    for _ in 0..256 {
        let len = *msg.get(pos).ok_or("name runs past the end")? as usize;
        match len & 0xc0 {
            0 if len == 0 => return Ok(pos + 1),
            0 => pos += 1 + len,
            0xc0 => {
                msg.get(pos + 1).ok_or("pointer runs past the end")?;
                return Ok(pos + 2);
            }
            _ => return Err(format!("bad label type at {pos}")),
        }
    }
    Err("name too long".into())
}

/// Reads a name (following pointers) as presentation text, case kept, for diagnostics and
/// TSIG key names.
pub fn read_name(msg: &[u8], mut pos: usize) -> Result<String, String> {
    let mut out = String::new();
    for _ in 0..128 {
        let len = *msg.get(pos).ok_or("name runs past the end")? as usize;
        match len & 0xc0 {
            0 if len == 0 => {
                if out.is_empty() {
                    out.push('.');
                }
                return Ok(out);
            }
            0 => {
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or("label runs past the end")?;
                out.push_str(&String::from_utf8_lossy(label));
                out.push('.');
                pos += 1 + len;
            }
            0xc0 => {
                let lo = *msg.get(pos + 1).ok_or("pointer runs past the end")? as usize;
                pos = ((len & 0x3f) << 8) | lo;
            }
            _ => return Err("bad label type".into()),
        }
    }
    Err("name loop".into())
}

/// Walks a whole message: header, questions, and every record of the three sections.
pub fn layout(msg: &[u8]) -> Result<Layout, String> {
    if msg.len() < 12 {
        return Err(format!("{} bytes: shorter than a header", msg.len()));
    }
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    let mut l = Layout {
        qdcount: count(4),
        ..Layout::default()
    };
    let mut pos = 12;
    for _ in 0..l.qdcount {
        pos = skip_name(msg, pos)? + 4;
        if pos > msg.len() {
            return Err("question runs past the end".into());
        }
    }
    l.question_end = pos;
    for (section, n) in [(0, count(6)), (1, count(8)), (2, count(10))] {
        for _ in 0..n {
            let name_end = skip_name(msg, pos)?;
            let fixed = msg
                .get(name_end..name_end + 10)
                .ok_or("record header runs past the end")?;
            let rdlen = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
            let r = RrPos {
                start: pos,
                rtype: u16::from_be_bytes([fixed[0], fixed[1]]),
                class: u16::from_be_bytes([fixed[2], fixed[3]]),
                ttl: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
                rdata: name_end + 10,
                end: name_end + 10 + rdlen,
            };
            if r.end > msg.len() {
                return Err("record data runs past the end".into());
            }
            pos = r.end;
            match section {
                0 => l.answers.push(r),
                1 => l.authority.push(r),
                _ => l.additional.push(r),
            }
        }
    }
    l.trailing = msg.len() - pos;
    Ok(l)
}

/// The serial of a SOA record.
pub fn soa_serial_at(msg: &[u8], r: &RrPos) -> Option<u32> {
    if r.rtype != SOA {
        return None;
    }
    let p = skip_name(msg, r.rdata).ok()?;
    let p = skip_name(msg, p).ok()?;
    let b = msg.get(p..p + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The RCODE of a message, with the extended bits from its OPT record.
pub fn rcode(msg: &[u8]) -> u16 {
    let low = u16::from(msg.get(3).map_or(0, |b| b & 0x0f));
    let high = layout(msg)
        .ok()
        .and_then(|l| l.additional.iter().find(|r| r.rtype == OPT).copied())
        .map_or(0, |r| u16::from(msg[r.start + 5]));
    (high << 4) | low
}

/// A one-line summary of a message for failure output.
pub fn summary(msg: &[u8]) -> String {
    if msg.len() < 12 {
        return format!("{} bytes (no header)", msg.len());
    }
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    let flags = [
        (msg[2] & 0x80, "qr"),
        (msg[2] & 0x04, "aa"),
        (msg[2] & 0x02, "tc"),
        (msg[2] & 0x01, "rd"),
        (msg[3] & 0x80, "ra"),
        (msg[3] & 0x20, "ad"),
        (msg[3] & 0x10, "cd"),
    ];
    let f: Vec<&str> = flags
        .iter()
        .filter(|(b, _)| *b != 0)
        .map(|(_, n)| *n)
        .collect();
    let mut s = format!(
        "{} bytes id={} opcode={} rcode={} flags=[{}] qd={} an={} ns={} ar={}",
        msg.len(),
        count(0),
        (msg[2] >> 3) & 0x0f,
        rcode(msg),
        f.join(" "),
        count(4),
        count(6),
        count(8),
        count(10)
    );
    if let Ok(l) = layout(msg) {
        if l.qdcount > 0 {
            let _ = write!(
                s,
                " q={}",
                read_name(msg, 12).unwrap_or_else(|e| format!("<{e}>"))
            );
        }
    }
    s
}

/// Hex dump, 16 bytes a line, with offsets.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "  {:04x}:", i * 16);
        for b in chunk {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}

/// Hex dump of `bytes[from..to]` (clamped), offsets kept.
fn hex_window(bytes: &[u8], from: usize, to: usize) -> String {
    let from = from.min(bytes.len()) & !15;
    let to = to.min(bytes.len());
    let mut s = String::new();
    for (i, chunk) in bytes[from..to].chunks(16).enumerate() {
        let _ = write!(s, "  {:04x}:", from + i * 16);
        for b in chunk {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}

/// `None` if equal, else where and how two messages differ: summaries, the first differing
/// offset and a hex dump of both around it (whole dumps when short).
pub fn diff(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let first = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let (dump_w, dump_g) = if want.len().max(got.len()) <= 256 {
        (hex(want), hex(got))
    } else {
        (
            hex_window(want, first.saturating_sub(32), first + 48),
            hex_window(got, first.saturating_sub(32), first + 48),
        )
    };
    Some(format!(
        "first difference at offset {first} (0x{first:x}); lengths {} vs {}\n    expected (BIND directly): {}\n{dump_w}    got (through lb):         {}\n{dump_g}",
        want.len(),
        got.len(),
        summary(want),
        summary(got)
    ))
}

/// What [`mask`] took out of a message.
#[derive(Clone, Debug, Default)]
pub struct Masked {
    /// The message with ID and server cookie zeroed and any TSIG record removed.
    pub bytes: Vec<u8>,
    /// The TSIG record that was removed, if any (verify it with [`TsigKey`]).
    pub tsig: Option<Vec<u8>>,
}

/// Makes two answers of the same server to the same query comparable: zeroes the ID (checked
/// separately) and the server part of a DNS COOKIE (a timestamp and hash, new on every
/// response), and removes a trailing TSIG record (its MAC covers the ID the server saw and the
/// time; [`TsigKey::verify_response`] checks it instead). Nothing else is touched.
pub fn mask(msg: &[u8]) -> Masked {
    let mut out = msg.to_vec();
    if out.len() >= 2 {
        out[0] = 0;
        out[1] = 0;
    }
    let Ok(l) = layout(msg) else {
        return Masked {
            bytes: out,
            tsig: None,
        };
    };
    for r in &l.additional {
        if r.rtype != OPT {
            continue;
        }
        let mut p = r.rdata;
        while p + 4 <= r.end {
            let code = u16::from_be_bytes([msg[p], msg[p + 1]]);
            let len = u16::from_be_bytes([msg[p + 2], msg[p + 3]]) as usize;
            let data = p + 4;
            if code == OPT_COOKIE && len > 8 && data + len <= r.end {
                out[data + 8..data + len].fill(0);
            }
            p = data + len;
        }
    }
    let mut tsig = None;
    if let Some(last) = l.additional.last() {
        if last.rtype == TSIG && l.trailing == 0 {
            tsig = Some(msg[last.start..last.end].to_vec());
            out.truncate(last.start);
            let ar = u16::from_be_bytes([out[10], out[11]]) - 1;
            out[10..12].copy_from_slice(&ar.to_be_bytes());
        }
    }
    Masked { bytes: out, tsig }
}

/// Where a TCP answer stream stands after each message ([`TransferState::feed`]).
#[derive(Clone, Debug)]
pub struct TransferState {
    qtype: u16,
    /// Serial of the first SOA (the server's current one).
    serial: Option<u32>,
    records: usize,
    /// IXFR only: `Some(true)` once the second record shows an incremental answer.
    incremental: Option<bool>,
    /// IXFR incremental: the next SOA starts a deletion list (true) or an addition list.
    expect_deletions_soa: bool,
    pub messages: usize,
    pub done: bool,
}

impl TransferState {
    pub fn new(qtype: u16) -> TransferState {
        TransferState {
            qtype,
            serial: None,
            records: 0,
            incremental: None,
            expect_deletions_soa: true,
            messages: 0,
            done: false,
        }
    }

    /// Takes the next message of the stream. For a query that is not AXFR/IXFR, one message
    /// ends it. AXFR (RFC 5936 §2.2) ends with the SOA that closes it; IXFR (RFC 1995 §4) ends
    /// with a single-SOA answer, the closing SOA of an AXFR-style answer, or the SOA with the
    /// current serial that follows the last difference sequence; any RCODE other than NOERROR
    /// ends both.
    pub fn feed(&mut self, msg: &[u8]) -> Result<(), String> {
        self.messages += 1;
        if self.qtype != AXFR && self.qtype != IXFR {
            self.done = true;
            return Ok(());
        }
        if rcode(msg) != 0 {
            self.done = true;
            return Ok(());
        }
        let l = layout(msg)?;
        for r in &l.answers {
            let serial = soa_serial_at(msg, r);
            self.records += 1;
            if self.records == 1 {
                self.serial = Some(serial.ok_or("a transfer must start with a SOA")?);
                continue;
            }
            if self.qtype == IXFR && self.records == 2 {
                self.incremental = Some(serial.is_some() && serial != self.serial);
                if self.incremental == Some(true) {
                    self.expect_deletions_soa = false;
                    continue;
                }
            }
            let Some(s) = serial else { continue };
            if self.incremental == Some(true) {
                if self.expect_deletions_soa && Some(s) == self.serial {
                    self.done = true;
                } else {
                    self.expect_deletions_soa = !self.expect_deletions_soa;
                }
            } else if Some(s) == self.serial {
                self.done = true;
            }
            if self.done {
                break;
            }
        }
        // A lone SOA in the first message is a complete IXFR answer ("you are up to date",
        // or "retry with TCP/AXFR").
        if self.qtype == IXFR && self.messages == 1 && self.records == 1 && l.answers.len() == 1 {
            self.done = true;
        }
        Ok(())
    }

    /// True for an IXFR answer made of difference sequences (not AXFR-style, not a lone SOA).
    pub fn is_incremental(&self) -> bool {
        self.incremental == Some(true)
    }
}

/// A TSIG key (hmac-sha256) shared by the tests and the test BIND.
#[derive(Clone, Debug)]
pub struct TsigKey {
    pub name: String,
    pub secret: Vec<u8>,
}

/// A parsed TSIG record.
#[derive(Clone, Debug)]
pub struct TsigRecord {
    pub key: String,
    pub algorithm: String,
    pub time_signed: u64,
    pub fudge: u16,
    pub mac: Vec<u8>,
    pub original_id: u16,
    pub error: u16,
    pub other: Vec<u8>,
    /// Offset of the record in its message.
    pub start: usize,
}

/// The hmac-sha256 algorithm name, canonical wire form.
const HMAC_SHA256: &str = "hmac-sha256.";

impl TsigKey {
    /// The fixed test key: `xfr-key`, hmac-sha256, secret bytes 0..32.
    pub fn test_key() -> TsigKey {
        TsigKey {
            name: "xfr-key.".into(),
            secret: (0u8..32).collect(),
        }
    }

    /// The secret in base64, for `named.conf` and `dig -y`.
    pub fn secret_base64(&self) -> String {
        base64(&self.secret)
    }

    /// `hmac-sha256:NAME:SECRET`, the argument of `dig -y`.
    pub fn dig_arg(&self) -> String {
        format!(
            "hmac-sha256:{}:{}",
            self.name.trim_end_matches('.'),
            self.secret_base64()
        )
    }

    /// A `key` statement for `named.conf`.
    pub fn named_conf(&self) -> String {
        format!(
            "key \"{}\" {{ algorithm hmac-sha256; secret \"{}\"; }};\n",
            self.name.trim_end_matches('.'),
            self.secret_base64()
        )
    }

    fn mac(&self, data: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.secret);
        ring::hmac::sign(&key, data).as_ref().to_vec()
    }

    /// The TSIG variables of RFC 8945 §4.3.3 (everything but the message and prior MAC).
    fn variables(&self, time: u64, fudge: u16, error: u16, other: &[u8]) -> Vec<u8> {
        let mut v = name_wire(&self.name.to_ascii_lowercase());
        v.extend_from_slice(&CLASS_ANY.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend(name_wire(HMAC_SHA256));
        v.extend_from_slice(&time.to_be_bytes()[2..]);
        v.extend_from_slice(&fudge.to_be_bytes());
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&(other.len() as u16).to_be_bytes());
        v.extend_from_slice(other);
        v
    }

    /// Signs a query: returns the message with a TSIG record appended, and its MAC (needed to
    /// verify the answer).
    pub fn sign_query(&self, msg: &[u8], time: u64) -> (Vec<u8>, Vec<u8>) {
        let fudge = 300u16;
        let mut data = msg.to_vec();
        data.extend(self.variables(time, fudge, 0, &[]));
        let mac = self.mac(&data);
        let mut rdata = name_wire(HMAC_SHA256);
        rdata.extend_from_slice(&time.to_be_bytes()[2..]);
        rdata.extend_from_slice(&fudge.to_be_bytes());
        rdata.extend_from_slice(&(mac.len() as u16).to_be_bytes());
        rdata.extend_from_slice(&mac);
        rdata.extend_from_slice(&msg[..2]); // original ID
        rdata.extend_from_slice(&[0, 0, 0, 0]); // error, other len
        let mut out = msg.to_vec();
        out.extend(rr(&self.name, TSIG, CLASS_ANY, 0, &rdata));
        let ar = u16::from_be_bytes([out[10], out[11]]) + 1;
        out[10..12].copy_from_slice(&ar.to_be_bytes());
        (out, mac)
    }

    /// Verifies the TSIG record that ends `resp`, an answer to a query signed with
    /// `request_mac` (RFC 8945 §5.3: the digest covers the request MAC, the message with the
    /// TSIG's original ID in place of the header ID and the TSIG removed, and the variables).
    /// Returns the record on success.
    pub fn verify_response(&self, resp: &[u8], request_mac: &[u8]) -> Result<TsigRecord, String> {
        let t = parse_tsig(resp)?;
        if !t.key.eq_ignore_ascii_case(&self.name) {
            return Err(format!(
                "signed with key {} instead of {}",
                t.key, self.name
            ));
        }
        if t.error != 0 {
            return Err(format!("TSIG error {} from the server", t.error));
        }
        let mut data = (request_mac.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(request_mac);
        data.extend(unsigned_part(resp, &t));
        data.extend(self.variables(t.time_signed, t.fudge, t.error, &t.other));
        if self.mac(&data) != t.mac {
            return Err("MAC does not verify".into());
        }
        Ok(t)
    }

    /// Verifies every TSIG of a multi-message answer (RFC 8945 §5.3.1): the first covers the
    /// request MAC, each later one the previous MAC, the messages since, and the timers only.
    /// Returns how many messages carried a TSIG.
    pub fn verify_stream(&self, msgs: &[Vec<u8>], request_mac: &[u8]) -> Result<usize, String> {
        let mut prior = request_mac.to_vec();
        let mut unsigned: Vec<u8> = Vec::new();
        let mut signed = 0;
        for (i, m) in msgs.iter().enumerate() {
            let has_tsig = layout(m)
                .map_err(|e| format!("message {i}: {e}"))?
                .additional
                .last()
                .is_some_and(|r| r.rtype == TSIG);
            if !has_tsig {
                if i == 0 {
                    return Err("first message is not signed".into());
                }
                unsigned.extend_from_slice(m);
                continue;
            }
            let t = parse_tsig(m).map_err(|e| format!("message {i}: {e}"))?;
            let mut data = (prior.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&prior);
            data.extend_from_slice(&unsigned);
            data.extend(unsigned_part(m, &t));
            if i == 0 {
                data.extend(self.variables(t.time_signed, t.fudge, t.error, &t.other));
            } else {
                data.extend_from_slice(&t.time_signed.to_be_bytes()[2..]);
                data.extend_from_slice(&t.fudge.to_be_bytes());
            }
            if t.error != 0 {
                return Err(format!("message {i}: TSIG error {}", t.error));
            }
            if self.mac(&data) != t.mac {
                return Err(format!(
                    "message {i} of {}: MAC does not verify",
                    msgs.len()
                ));
            }
            prior = t.mac;
            unsigned.clear();
            signed += 1;
        }
        if !unsigned.is_empty() {
            return Err("the last message is not signed".into());
        }
        Ok(signed)
    }
}

/// The message as it was before the TSIG was added: original ID, ARCOUNT one less, no TSIG.
fn unsigned_part(msg: &[u8], t: &TsigRecord) -> Vec<u8> {
    let mut m = msg[..t.start].to_vec();
    m[..2].copy_from_slice(&t.original_id.to_be_bytes());
    let ar = u16::from_be_bytes([m[10], m[11]]).wrapping_sub(1);
    m[10..12].copy_from_slice(&ar.to_be_bytes());
    m
}

/// Parses the TSIG record that must end the additional section.
pub fn parse_tsig(msg: &[u8]) -> Result<TsigRecord, String> {
    let l = layout(msg)?;
    let r = l
        .additional
        .last()
        .filter(|r| r.rtype == TSIG)
        .ok_or("no TSIG record")?;
    let key = read_name(msg, r.start)?;
    let algorithm = read_name(msg, r.rdata)?;
    let mut p = skip_name(msg, r.rdata)?;
    let get = |p: usize, n: usize| msg.get(p..p + n).ok_or("TSIG runs past the end");
    let t = get(p, 6)?;
    let time_signed = t.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
    p += 6;
    let fudge = u16::from_be_bytes(get(p, 2)?.try_into().expect("2 bytes"));
    let mac_len = u16::from_be_bytes(get(p + 2, 2)?.try_into().expect("2 bytes")) as usize;
    p += 4;
    let mac = get(p, mac_len)?.to_vec();
    p += mac_len;
    let original_id = u16::from_be_bytes(get(p, 2)?.try_into().expect("2 bytes"));
    let error = u16::from_be_bytes(get(p + 2, 2)?.try_into().expect("2 bytes"));
    let other_len = u16::from_be_bytes(get(p + 4, 2)?.try_into().expect("2 bytes")) as usize;
    let other = get(p + 6, other_len)?.to_vec();
    Ok(TsigRecord {
        key,
        algorithm,
        time_signed,
        fudge,
        mac,
        original_id,
        error,
        other,
        start: r.start,
    })
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            TsigKey::test_key().secret_base64(),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        );
    }

    #[test]
    fn builder_and_layout_agree() {
        let q = QueryBuilder::new(7, "WwW.example.test.", A)
            .opcode(4)
            .rd()
            .cookie([1; 8], &[])
            .build();
        let l = layout(&q).unwrap();
        assert_eq!(l.qdcount, 1);
        assert_eq!(l.additional.len(), 1);
        assert_eq!(l.additional[0].rtype, OPT);
        assert_eq!((q[2] >> 3) & 0x0f, 4);
        assert_eq!(read_name(&q, 12).unwrap(), "WwW.example.test.");
        let m = mask(&q);
        assert_eq!(m.bytes[..2], [0, 0]);
    }

    #[test]
    fn tsig_signs_and_verifies_a_round_trip() {
        let k = TsigKey::test_key();
        let q = QueryBuilder::new(9, "example.test.", SOA).build();
        let (signed, mac) = k.sign_query(&q, 1_700_000_000);
        let t = parse_tsig(&signed).unwrap();
        assert_eq!(t.mac, mac);
        assert_eq!(t.original_id, 9);
        // A "response" signed the same way verifies against the request MAC.
        let mut resp = q.clone();
        resp[2] |= 0x80;
        let mut data = (mac.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&mac);
        data.extend_from_slice(&resp);
        data.extend(k.variables(1_700_000_000, 300, 0, &[]));
        let rmac = k.mac(&data);
        let mut rdata = name_wire(HMAC_SHA256);
        rdata.extend_from_slice(&1_700_000_000u64.to_be_bytes()[2..]);
        rdata.extend_from_slice(&300u16.to_be_bytes());
        rdata.extend_from_slice(&32u16.to_be_bytes());
        rdata.extend_from_slice(&rmac);
        rdata.extend_from_slice(&[0, 9, 0, 0, 0, 0]);
        let mut signed_resp = resp.clone();
        signed_resp.extend(rr(&k.name, TSIG, CLASS_ANY, 0, &rdata));
        signed_resp[11] += 1;
        // The ID may be rewritten (as a proxy does): the original ID makes it verify.
        signed_resp[0] = 0xab;
        assert!(k.verify_response(&signed_resp, &mac).is_ok());
        let last = signed_resp.len() - 10;
        signed_resp[last] ^= 1;
        assert!(k.verify_response(&signed_resp, &mac).is_err());
    }

    #[test]
    fn transfer_end_rules() {
        let soa = |serial| soa_rr("z.test.", serial);
        let a = rr("a.z.test.", A, CLASS_IN, 0, &[1, 2, 3, 4]);
        let msg = |records: &[&Vec<u8>]| {
            let mut b = QueryBuilder::new(1, "z.test.", IXFR);
            for r in records {
                b = b.answer_rr(r);
            }
            let mut m = b.build();
            m[2] |= 0x80;
            m
        };
        // IXFR: a lone SOA is complete.
        let mut st = TransferState::new(IXFR);
        st.feed(&msg(&[&soa(3)])).unwrap();
        assert!(st.done && !st.is_incremental());
        // IXFR incremental over two messages with two sequences: not done at the inner SOAs.
        let mut st = TransferState::new(IXFR);
        st.feed(&msg(&[&soa(3), &soa(1), &a, &soa(2), &a])).unwrap();
        assert!(!st.done && st.is_incremental());
        st.feed(&msg(&[&soa(2), &a, &soa(3)])).unwrap();
        assert!(!st.done, "SOA 3 here starts the additions");
        st.feed(&msg(&[&a, &soa(3)])).unwrap();
        assert!(st.done);
        // AXFR: done at the closing SOA.
        let mut st = TransferState::new(AXFR);
        st.feed(&msg(&[&soa(3), &a])).unwrap();
        assert!(!st.done);
        st.feed(&msg(&[&a, &soa(3)])).unwrap();
        assert!(st.done);
    }
}
