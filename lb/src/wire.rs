//! DNS wire-format inspection for the per-packet path: header, first question, ID rewrite,
//! answer matching, and a walk over the resource records where a feature needs one.
//!
//! The proxy never decodes and re-encodes a message: re-encoding changes name compression and
//! record order, and has caused denial-of-service bugs in other proxies. It reads the 12-byte
//! header and walks the question section, then patches the 2-byte ID in place. Everything else
//! (EDNS OPT, TC, TSIG, unknown types, classes and opcodes) passes through byte for byte.
//!
//! Nothing here allocates; errors are a plain enum because malformed packets are normal traffic.

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest wire-format name allowed by RFC 1035.
const MAX_NAME_LEN: usize = 255;
/// Compression pointers followed before a name is declared a loop.
const MAX_POINTER_HOPS: usize = 16;

/// Why a packet could not be inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the 12-byte header.
    ShortHeader,
    /// A name, or a question's or record's fixed fields, run past the end or are malformed.
    BadQuestion,
}

/// Where the first question sits in a message, plus its type and class.
///
/// `name_start..name_end` is the wire-format name as it appears in the packet (possibly ending in
/// a compression pointer); `end` is the offset just past QCLASS of the first question. A message
/// with QDCOUNT=0 (legal, e.g. a DNS COOKIE refresh) has an empty question at offset 12; one
/// with more questions (which servers answer FORMERR) is described by its first, and `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Question {
    pub name_start: usize,
    pub name_end: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub end: usize,
    pub count: u16,
}

/// Header fields the proxy looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub qr: bool,
    pub opcode: u8,
    pub tc: bool,
    pub aa: bool,
    pub rcode: u8,
    pub qdcount: u16,
    pub ancount: u16,
}

/// Reads the fixed header.
pub fn header(msg: &[u8]) -> Result<Header, WireError> {
    if msg.len() < HEADER_LEN {
        return Err(WireError::ShortHeader);
    }
    Ok(Header {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        qr: msg[2] & 0x80 != 0,
        opcode: (msg[2] >> 3) & 0x0f,
        aa: msg[2] & 0x04 != 0,
        tc: msg[2] & 0x02 != 0,
        rcode: msg[3] & 0x0f,
        qdcount: u16::from_be_bytes([msg[4], msg[5]]),
        ancount: u16::from_be_bytes([msg[6], msg[7]]),
    })
}

/// Reads the DNS ID.
#[inline]
pub fn id(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

/// Reads the opcode (0 for a message shorter than the header).
#[inline]
pub fn opcode(msg: &[u8]) -> u8 {
    msg.get(2).map_or(0, |b| (b >> 3) & 0x0f)
}

/// Overwrites the DNS ID in place.
#[inline]
pub fn set_id(msg: &mut [u8], id: u16) {
    msg[..2].copy_from_slice(&id.to_be_bytes());
}

/// Walks the first question of a message (queries and responses alike).
///
/// Compression pointers are followed for validation (bounded hops, must point backwards), but
/// the returned span covers only the bytes in place, so a caller can compare names with
/// [`names_equal`] or [`names_identical`].
pub fn question(msg: &[u8]) -> Result<Question, WireError> {
    let h = header(msg)?;
    if h.qdcount == 0 {
        return Ok(Question {
            name_start: HEADER_LEN,
            name_end: HEADER_LEN,
            qtype: 0,
            qclass: 0,
            end: HEADER_LEN,
            count: 0,
        });
    }
    let name_end = skip_name(msg, HEADER_LEN)?;
    let end = name_end + 4;
    if end > msg.len() {
        return Err(WireError::BadQuestion);
    }
    Ok(Question {
        name_start: HEADER_LEN,
        name_end,
        qtype: u16::from_be_bytes([msg[name_end], msg[name_end + 1]]),
        qclass: u16::from_be_bytes([msg[name_end + 2], msg[name_end + 3]]),
        end,
        count: h.qdcount,
    })
}

/// Returns the offset just past the name starting at `pos`, validating the whole name
/// (including any compression pointer target).
fn skip_name(msg: &[u8], pos: usize) -> Result<usize, WireError> {
    let mut labels = NameLabels::new(msg, pos);
    let mut total = 0usize;
    while let Some(label) = labels.next_label()? {
        total += label.len() + 1;
        if total > MAX_NAME_LEN {
            return Err(WireError::BadQuestion);
        }
    }
    Ok(labels.end_in_place)
}

/// Iterates over the labels of a wire-format name, following compression pointers.
struct NameLabels<'a> {
    msg: &'a [u8],
    pos: usize,
    hops: usize,
    /// Offset just past the name's bytes in place (set once the first pointer or the root
    /// label is reached).
    end_in_place: usize,
    jumped: bool,
    done: bool,
}

impl<'a> NameLabels<'a> {
    fn new(msg: &'a [u8], pos: usize) -> Self {
        NameLabels {
            msg,
            pos,
            hops: 0,
            end_in_place: pos,
            jumped: false,
            done: false,
        }
    }

    /// The next label, `None` at the root, or an error for a malformed name.
    fn next_label(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        if self.done {
            return Ok(None);
        }
        loop {
            let len = *self.msg.get(self.pos).ok_or(WireError::BadQuestion)? as usize;
            match len & 0xc0 {
                0x00 => {
                    if len == 0 {
                        if !self.jumped {
                            self.end_in_place = self.pos + 1;
                        }
                        self.done = true;
                        return Ok(None);
                    }
                    let start = self.pos + 1;
                    let end = start + len;
                    if end > self.msg.len() {
                        return Err(WireError::BadQuestion);
                    }
                    self.pos = end;
                    return Ok(Some(&self.msg[start..end]));
                }
                0xc0 => {
                    let lo = *self.msg.get(self.pos + 1).ok_or(WireError::BadQuestion)? as usize;
                    let target = ((len & 0x3f) << 8) | lo;
                    if !self.jumped {
                        self.end_in_place = self.pos + 2;
                        self.jumped = true;
                    }
                    // Pointers must go backwards; together with the hop limit this rules out loops.
                    if target >= self.pos || self.hops >= MAX_POINTER_HOPS {
                        return Err(WireError::BadQuestion);
                    }
                    self.hops += 1;
                    self.pos = target;
                }
                // 0x40 and 0x80 are the obsolete extended label types: refuse them.
                _ => return Err(WireError::BadQuestion),
            }
        }
    }
}

/// Compares two names case-insensitively (ASCII, as DNS requires), each possibly compressed.
pub fn names_equal(a_msg: &[u8], a_pos: usize, b_msg: &[u8], b_pos: usize) -> bool {
    let mut a = NameLabels::new(a_msg, a_pos);
    let mut b = NameLabels::new(b_msg, b_pos);
    loop {
        match (a.next_label(), b.next_label()) {
            (Ok(None), Ok(None)) => return true,
            (Ok(Some(x)), Ok(Some(y))) => {
                if !x.eq_ignore_ascii_case(y) {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// Compares two names byte for byte, case included, each possibly compressed.
pub fn names_identical(a_msg: &[u8], a_pos: usize, b_msg: &[u8], b_pos: usize) -> bool {
    let mut a = NameLabels::new(a_msg, a_pos);
    let mut b = NameLabels::new(b_msg, b_pos);
    loop {
        match (a.next_label(), b.next_label()) {
            (Ok(None), Ok(None)) => return true,
            (Ok(Some(x)), Ok(Some(y))) if x == y => {}
            _ => return false,
        }
    }
}

/// True when `resp` may be relayed as the answer to `query`, whose first question (if it could
/// be parsed) is `q`; the ID has already matched.
///
/// An answer that carries a question must carry the query's first question exactly: name
/// bytes (case included: servers echo them, so a resolver's 0x20 case randomisation holds
/// through the proxy), type and class. An answer without a question is accepted when the
/// query had none (or none that parses), or when its RCODE is one BIND may send without the
/// question ([`rcode_may_omit_question`]: FORMERR, NOTIMP, BADVERS, BADCOOKIE). BIND echoes
/// the question in NXDOMAIN, SERVFAIL and REFUSED, so a forged answer without one cannot pass
/// for those.
pub fn answer_matches(query: &[u8], q: Option<&Question>, resp: &[u8]) -> bool {
    let Ok(h) = header(resp) else {
        return false;
    };
    if h.qdcount == 0 {
        return q.is_none_or(|q| q.count == 0) || rcode_may_omit_question(extended_rcode(resp));
    }
    let (Some(q), Ok(r)) = (q, question(resp)) else {
        return false;
    };
    q.count > 0
        && r.qtype == q.qtype
        && r.qclass == q.qclass
        && names_identical(query, q.name_start, resp, r.name_start)
}

/// FORMERR: the query could not be parsed.
pub const RCODE_FORMERR: u16 = 1;
/// NOTIMP: an opcode the server does not implement.
pub const RCODE_NOTIMP: u16 = 4;
/// BADVERS: an EDNS version the server does not speak (extended RCODE, RFC 6891).
pub const RCODE_BADVERS: u16 = 16;
/// BADCOOKIE: a bad or missing server cookie (extended RCODE, RFC 7873).
pub const RCODE_BADCOOKIE: u16 = 23;

/// True for the (extended) RCODEs a server may answer without echoing the question: what it
/// could not parse (FORMERR), an opcode it does not implement (NOTIMP), an EDNS version it does
/// not speak (BADVERS) and a cookie-only or bad-cookie exchange (BADCOOKIE). Every other
/// answer BIND sends carries the question.
#[inline]
pub fn rcode_may_omit_question(rcode: u16) -> bool {
    matches!(
        rcode,
        RCODE_FORMERR | RCODE_NOTIMP | RCODE_BADVERS | RCODE_BADCOOKIE
    )
}

/// A stable 64-bit hash of the question name, case-folded (FNV-1a over lowercased labels).
///
/// Used by the qname-hash policy, so equal names in any case land on the same backend.
pub fn qname_hash(msg: &[u8], q: &Question) -> u64 {
    if q.count == 0 {
        return FNV_OFFSET;
    }
    name_hash(msg, q.name_start)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A stable 64-bit hash of the name at `pos` (compression followed), case-folded.
pub fn name_hash(msg: &[u8], pos: usize) -> u64 {
    let mut h = FNV_OFFSET;
    let mut labels = NameLabels::new(msg, pos);
    while let Ok(Some(label)) = labels.next_label() {
        h ^= label.len() as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        for &c in label {
            h ^= c.to_ascii_lowercase() as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Turns a query in `buf` into a SERVFAIL answer in place; see [`make_error`].
pub fn make_servfail(buf: &mut [u8], q: Option<&Question>) -> usize {
    make_error(buf, q, 2)
}

/// Turns a query in `buf` into an answer with `rcode` (SERVFAIL, REFUSED) in place: keeps the
/// header and the first question (`q`, from [`question`]; none when it did not parse), sets QR
/// and the RCODE, clears the other sections and returns the new length. A query with EDNS gets
/// an OPT record back, as BIND answers (payload [`EDNS_PAYLOAD`], DO echoed, no options). Used
/// when lb answers itself (no usable backend, access refused).
pub fn make_error(buf: &mut [u8], q: Option<&Question>, rcode: u8) -> usize {
    // Also for a cookie-only query (no question, an OPT record: RFC 7873 §5.4).
    let opt = find_opt(buf);
    buf[2] = (buf[2] & 0x79) | 0x80; // QR=1, keep opcode and RD, clear AA and TC
    buf[3] = rcode & 0x0f; // RA=0, Z=0
    let (qdcount, end) = match q {
        Some(q) if q.count > 0 => (1u16, q.end),
        _ => (0, HEADER_LEN),
    };
    buf[4..6].copy_from_slice(&qdcount.to_be_bytes());
    for b in &mut buf[6..12] {
        *b = 0;
    }
    match opt {
        // The query's OPT (at least 11 bytes) lay at or after `end`, so the new one fits.
        Some(r) if end + OPT_LEN <= buf.len() => {
            let do_bit = buf.get(r.ttl_at + 2).map_or(0, |b| b & 0x80);
            let payload = EDNS_PAYLOAD.to_be_bytes();
            buf[end..end + OPT_LEN]
                .copy_from_slice(&[0, 0, 41, payload[0], payload[1], 0, 0, do_bit, 0, 0, 0]);
            buf[10..12].copy_from_slice(&1u16.to_be_bytes());
            end + OPT_LEN
        }
        _ => end,
    }
}

/// The UDP payload size lb advertises in the OPT records of the answers it makes itself (the
/// DNS Flag Day 2020 figure BIND also uses).
pub const EDNS_PAYLOAD: u16 = 1232;
/// An OPT record with no options: root owner, type, class, TTL, RDLENGTH.
const OPT_LEN: usize = 11;

/// The OPT record of a message's additional section, if it has one with the root owner.
fn find_opt(msg: &[u8]) -> Option<Record> {
    records(msg)
        .find(|r| r.section == Section::Additional && r.rtype == TYPE_OPT)
        .filter(|r| msg.get(r.name_start) == Some(&0))
}

/// Turns an answer in `buf` into its truncated, empty form in place (TC=1, the first question
/// and the OPT record kept, no other records) and returns the new length: what response rate
/// limiting "slips" so a real client retries over TCP. BIND's slipped answers carry the OPT
/// record too.
pub fn make_truncated(buf: &mut [u8]) -> usize {
    let end = match question(buf) {
        Ok(q) if q.count > 0 => q.end,
        _ => HEADER_LEN,
    };
    let opt = if end > HEADER_LEN {
        find_opt(buf)
    } else {
        None
    };
    buf[2] |= 0x02;
    let qdcount: u16 = if end > HEADER_LEN { 1 } else { 0 };
    buf[4..6].copy_from_slice(&qdcount.to_be_bytes());
    for b in &mut buf[6..12] {
        *b = 0;
    }
    match opt {
        // The OPT record lies after the question: moving it down overwrites only what is cut.
        Some(r) => {
            buf.copy_within(r.name_start..r.rdata_end, end);
            buf[10..12].copy_from_slice(&1u16.to_be_bytes());
            end + (r.rdata_end - r.name_start)
        }
        None => end,
    }
}

/// Encodes a presentation-format name (`example.test.` or `example.test`) to wire format.
pub fn encode_name(name: &str) -> Result<Vec<u8>, String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(trimmed.len() + 2);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(format!(
                    "`{name}` is not a valid zone name (empty or over-long label)"
                ));
            }
            if !label.bytes().all(|c| c.is_ascii_graphic() && c != b'\\') {
                return Err(format!(
                    "`{name}` is not a valid zone name (unsupported character)"
                ));
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    if out.len() > MAX_NAME_LEN {
        return Err(format!("`{name}` is longer than 255 bytes"));
    }
    Ok(out)
}

/// `bytes` in lowercase hexadecimal (how the control protocol carries DNS messages).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The bytes of a hexadecimal string (either case); `None` if it is not one.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Builds a query for `qname` (wire format) with RD=0 and no EDNS.
pub fn build_query(id: u16, qname: &[u8], qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + qname.len() + 4);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(qname);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// The serial of the first SOA record in the answer section, if there is one.
pub fn soa_serial(msg: &[u8]) -> Option<u32> {
    records(msg)
        .take_while(|r| r.section == Section::Answer)
        .find(|r| r.rtype == TYPE_SOA)
        .and_then(|r| soa_serial_of(msg, &r))
}

/// The serial in the RDATA of SOA record `r` of `msg`.
pub fn soa_serial_of(msg: &[u8], r: &Record) -> Option<u32> {
    let p = skip_name(msg, r.rdata_start).ok()?; // MNAME
    let p = skip_name(msg, p).ok()?; // RNAME
    if p + 20 > r.rdata_end {
        return None;
    }
    let serial = msg.get(p..p + 4)?;
    Some(u32::from_be_bytes([
        serial[0], serial[1], serial[2], serial[3],
    ]))
}

/// The whole 12-bit RCODE: the header's 4 bits, and the 8 bits above them in the OPT record's
/// TTL when there is one (BADVERS, BADCOOKIE... have 0 in the header's bits).
pub fn extended_rcode(msg: &[u8]) -> u16 {
    let low = msg.get(3).map_or(0, |b| u16::from(b & 0x0f));
    let high = records(msg)
        .find(|r| r.section == Section::Additional && r.rtype == TYPE_OPT)
        .and_then(|r| msg.get(r.ttl_at))
        .map_or(0, |b| u16::from(*b));
    (high << 4) | low
}

/// RR type codes the proxy looks at.
pub const TYPE_SOA: u16 = 6;
pub const TYPE_NS: u16 = 2;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_TSIG: u16 = 250;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;

/// The section a resource record is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

/// Where one resource record sits in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub section: Section,
    /// Offset of the owner name (possibly a compression pointer).
    pub name_start: usize,
    pub rtype: u16,
    pub class: u16,
    /// Offset of the 4-byte TTL.
    pub ttl_at: usize,
    pub rdata_start: usize,
    pub rdata_end: usize,
}

/// The resource records of a message after its questions, in order; see [`records`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    msg: &'a [u8],
    pos: usize,
    left: [u16; 3],
    malformed: bool,
}

/// Walks every resource record of the answer, authority and additional sections. The walk
/// stops at the first malformed record; [`Records::malformed`] then tells.
pub fn records(msg: &[u8]) -> Records<'_> {
    let mut it = Records {
        msg,
        pos: HEADER_LEN,
        left: [0; 3],
        malformed: false,
    };
    let Ok(h) = header(msg) else {
        it.malformed = true;
        return it;
    };
    for _ in 0..h.qdcount {
        match skip_name(msg, it.pos) {
            Ok(p) if p + 4 <= msg.len() => it.pos = p + 4,
            _ => {
                it.malformed = true;
                return it;
            }
        }
    }
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    it.left = [count(6), count(8), count(10)];
    it
}

impl Records<'_> {
    /// True when the walk stopped at a record that runs past the end or is malformed.
    pub fn malformed(&self) -> bool {
        self.malformed
    }
}

impl Iterator for Records<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        if self.malformed {
            return None;
        }
        let i = self.left.iter().position(|n| *n > 0)?;
        self.left[i] -= 1;
        let section = [Section::Answer, Section::Authority, Section::Additional][i];
        let name_start = self.pos;
        let fixed = match skip_name(self.msg, name_start) {
            Ok(p) => p,
            Err(_) => {
                self.malformed = true;
                return None;
            }
        };
        let Some(f) = self.msg.get(fixed..fixed + 10) else {
            self.malformed = true;
            return None;
        };
        let rdlen = u16::from_be_bytes([f[8], f[9]]) as usize;
        let rdata_start = fixed + 10;
        let rdata_end = rdata_start + rdlen;
        if rdata_end > self.msg.len() {
            self.malformed = true;
            return None;
        }
        self.pos = rdata_end;
        Some(Record {
            section,
            name_start,
            rtype: u16::from_be_bytes([f[0], f[1]]),
            class: u16::from_be_bytes([f[2], f[3]]),
            ttl_at: fixed + 4,
            rdata_start,
            rdata_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[&str], qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn parses_question() {
        let m = query(&["www", "example", "test"], 1);
        let q = question(&m).unwrap();
        assert_eq!(q.qtype, 1);
        assert_eq!(q.qclass, 1);
        assert_eq!(q.end, m.len());
        assert_eq!(q.name_end, m.len() - 4);
    }

    #[test]
    fn rejects_short_and_truncated() {
        assert_eq!(question(&[0; 5]), Err(WireError::ShortHeader));
        let m = query(&["www", "example"], 1);
        assert_eq!(question(&m[..m.len() - 1]), Err(WireError::BadQuestion));
        let mut m2 = m.clone();
        m2[12] = 60; // label length past end
        assert_eq!(question(&m2), Err(WireError::BadQuestion));
        let mut m3 = m;
        m3[5] = 2;
        let q3 = question(&m3).unwrap();
        assert_eq!(
            (q3.count, q3.qtype),
            (2, 1),
            "the first of several questions"
        );
    }

    #[test]
    fn rejects_pointer_loops_and_overlong_names() {
        let mut m = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]); // points at itself
        assert_eq!(question(&m), Err(WireError::BadQuestion));
        let labels: Vec<String> = (0..5).map(|_| "a".repeat(63)).collect();
        let refs: Vec<&str> = labels.iter().map(|s| s.as_str()).collect();
        assert_eq!(question(&query(&refs, 1)), Err(WireError::BadQuestion));
    }

    fn answer_to(q: &[u8], rcode: u8) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r[3] = rcode;
        r
    }

    #[test]
    fn answers_match_the_exact_question_or_carry_none_with_an_error() {
        let a = query(&["WwW", "Example", "TEST"], 1);
        let b = query(&["www", "example", "test"], 1);
        let qa = question(&a).unwrap();
        assert_eq!(qname_hash(&a, &qa), qname_hash(&b, &question(&b).unwrap()));
        assert!(names_equal(&a, 12, &b, 12) && !names_identical(&a, 12, &b, 12));
        assert!(answer_matches(&a, Some(&qa), &answer_to(&a, 0)));
        assert!(
            !answer_matches(&a, Some(&qa), &answer_to(&b, 0)),
            "the case is part of the question (0x20)"
        );
        let c = query(&["WwW", "Example", "TES"], 1);
        assert!(!answer_matches(&a, Some(&qa), &answer_to(&c, 0)));
        let d = query(&["WwW", "Example", "TEST"], 28);
        assert!(!answer_matches(&a, Some(&qa), &answer_to(&d, 0)));
        // No question in the answer: relayed for the errors BIND sends that way, or for a
        // query without one.
        let mut bare = answer_to(&a, 4);
        bare[5] = 0;
        bare.truncate(HEADER_LEN);
        assert!(
            answer_matches(&a, Some(&qa), &bare),
            "NOTIMP without a question"
        );
        bare[3] = 0;
        assert!(
            !answer_matches(&a, Some(&qa), &bare),
            "NOERROR must echo it"
        );
        let mut cookie_only = a[..HEADER_LEN].to_vec();
        cookie_only[5] = 0;
        let q0 = question(&cookie_only).unwrap();
        assert!(answer_matches(&cookie_only, Some(&q0), &bare));
        assert!(!answer_matches(&cookie_only, Some(&q0), &answer_to(&a, 0)));
        assert!(answer_matches(&[0; 13], None, &answer_to(&bare, 1)));
        // BIND echoes the question in NXDOMAIN, SERVFAIL and REFUSED: without it, an answer
        // with those (or any RCODE but FORMERR, NOTIMP, BADVERS, BADCOOKIE) is not the answer.
        for (rcode, ok) in [
            (1, true),
            (2, false),
            (3, false),
            (4, true),
            (5, false),
            (9, false),
        ] {
            bare[3] = rcode;
            assert_eq!(
                answer_matches(&a, Some(&qa), &bare),
                ok,
                "RCODE {rcode} without a question"
            );
        }
        bare[3] = 0;
        // BADVERS (16): NOERROR in the header's bits, 1 in the OPT record's extended RCODE.
        let mut badvers = bare.clone();
        badvers[11] = 1; // ARCOUNT
        badvers.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(extended_rcode(&badvers), 16);
        assert!(
            answer_matches(&a, Some(&qa), &badvers),
            "BADVERS without a question"
        );
        // BADCOOKIE (23): 7 in the header's bits, 1 in the OPT record's; BADTRUNC (22) is not
        // one BIND sends without the question.
        let mut badcookie = badvers.clone();
        badcookie[3] = 7;
        assert_eq!(extended_rcode(&badcookie), 23);
        assert!(answer_matches(&a, Some(&qa), &badcookie));
        badcookie[3] = 6;
        assert!(!answer_matches(&a, Some(&qa), &badcookie), "BADTRUNC");
        assert!(!answer_matches(&a, Some(&qa), &[1, 2, 3]));
    }

    #[test]
    fn encodes_names_and_reads_soa_serial() {
        assert_eq!(encode_name("a.test.").unwrap(), b"\x01a\x04test\x00");
        assert_eq!(encode_name("a.test").unwrap(), b"\x01a\x04test\x00");
        assert_eq!(encode_name(".").unwrap(), b"\x00");
        assert!(encode_name("a..test").is_err());
        let q = build_query(5, &encode_name("a.test.").unwrap(), 6);
        let mut r = q.clone();
        r[2] |= 0x84;
        r[7] = 1; // ANCOUNT
        r.extend_from_slice(&[0xc0, 12, 0, 6, 0, 1, 0, 0, 0, 60]);
        let rdata: Vec<u8> =
            [&[0xc0, 12][..], &[0xc0, 12], &42u32.to_be_bytes(), &[0; 16]].concat();
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
        assert_eq!(soa_serial(&r), Some(42));
        assert_eq!(soa_serial(&r[..r.len() - 1]), None);
        assert_eq!(soa_serial(&q), None);
    }

    #[test]
    fn rewrites_id_in_place() {
        let mut m = query(&["a"], 1);
        set_id(&mut m, 0xbeef);
        assert_eq!(id(&m), 0xbeef);
        assert_eq!(header(&m).unwrap().id, 0xbeef);
    }

    #[test]
    fn truncated_form_keeps_the_question_and_sets_tc() {
        let mut m = query(&["a", "test"], 1);
        let qlen = m.len();
        m[2] |= 0x84;
        m[7] = 1;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
        let n = make_truncated(&mut m);
        assert_eq!(n, qlen);
        let h = header(&m[..n]).unwrap();
        assert!(h.tc && h.qr && h.aa);
        assert_eq!((h.qdcount, h.ancount), (1, 0));
        let mut refused = query(&["a"], 1);
        let q = question(&refused).unwrap();
        let n = make_error(&mut refused, Some(&q), 5);
        assert_eq!(header(&refused[..n]).unwrap().rcode, 5);
    }

    /// An OPT record: payload 4096, DO set, one 8-byte client COOKIE option.
    const OPT: [u8; 23] = [
        0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    #[test]
    fn truncated_form_keeps_the_opt_record() {
        let mut m = query(&["a", "test"], 16);
        let qlen = m.len();
        m[2] |= 0x84;
        m[7] = 1; // one TXT answer, then the OPT record
        m[11] = 1;
        m.extend_from_slice(&[
            0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 60, 0, 4, 3, b'a', b'b', b'c',
        ]);
        m.extend_from_slice(&OPT);
        let n = make_truncated(&mut m);
        assert_eq!(n, qlen + OPT.len());
        let h = header(&m[..n]).unwrap();
        assert!(h.tc);
        assert_eq!((h.qdcount, h.ancount), (1, 0));
        assert_eq!(&m[8..12], &[0, 0, 0, 1]);
        assert_eq!(&m[qlen..n], &OPT);
        let r = records(&m[..n]).next().unwrap();
        assert_eq!((r.section, r.rtype), (Section::Additional, TYPE_OPT));
    }

    #[test]
    fn own_answers_to_edns_queries_carry_an_opt_record() {
        let mut m = query(&["a", "test"], 1);
        let qlen = m.len();
        m[11] = 1;
        m.extend_from_slice(&OPT);
        let q = question(&m).unwrap();
        let n = make_error(&mut m, Some(&q), 5);
        assert_eq!(n, qlen + 11);
        let h = header(&m[..n]).unwrap();
        assert_eq!((h.rcode, h.qdcount), (5, 1));
        assert_eq!(&m[6..12], &[0, 0, 0, 0, 0, 1]);
        // Our payload size, DO echoed, no options (the client's cookie is not echoed).
        assert_eq!(&m[qlen..n], &[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(extended_rcode(&m[..n]), 5);
        // A cookie-only query (QDCOUNT 0) gets one too.
        let mut cookie_only = vec![0x12, 0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        cookie_only.extend_from_slice(&OPT);
        let n = make_error(&mut cookie_only, None, 5);
        assert_eq!(n, HEADER_LEN + 11);
        assert_eq!(&cookie_only[4..12], &[0, 0, 0, 0, 0, 0, 0, 1]);
        // Without EDNS, none.
        let mut plain = query(&["a", "test"], 1);
        let q = question(&plain).unwrap();
        assert_eq!(make_error(&mut plain, Some(&q), 5), qlen);
        assert_eq!(&plain[10..12], &[0, 0]);
    }

    #[test]
    fn servfail_keeps_question() {
        let mut m = query(&["a", "test"], 1);
        m.extend_from_slice(&[0; 11]); // pretend an OPT record follows
        m[11] = 1;
        let q = question(&m).unwrap();
        let n = make_servfail(&mut m, Some(&q));
        let h = header(&m[..n]).unwrap();
        assert!(h.qr);
        assert_eq!(h.rcode, 2);
        assert_eq!(h.qdcount, 1);
        assert_eq!(&m[6..12], &[0; 6]);
        assert_eq!(question(&m[..n]).unwrap().qtype, 1);
    }
}

/// Property tests over arbitrary and generated packets: the same code a fuzzer drives (see
/// `fuzz/`), run on stable in CI.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn label() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![b'a'..=b'z', b'A'..=b'Z', b'0'..=b'9', Just(b'-')],
            1..20,
        )
    }

    /// A well-formed query for a generated name, type and class.
    fn query() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<u8>>, u16, u16, u16)> {
        (
            any::<u16>(),
            proptest::collection::vec(label(), 0..5),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(id, labels, qtype, qclass)| {
                let mut m = id.to_be_bytes().to_vec();
                m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                for l in &labels {
                    m.push(l.len() as u8);
                    m.extend_from_slice(l);
                }
                m.push(0);
                m.extend_from_slice(&qtype.to_be_bytes());
                m.extend_from_slice(&qclass.to_be_bytes());
                (m, labels, id, qtype, qclass)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = header(&bytes);
            if let Ok(q) = question(&bytes) {
                prop_assert!(q.end <= bytes.len());
                prop_assert!(q.name_start <= q.name_end && q.name_end <= q.end);
                let _ = qname_hash(&bytes, &q);
                let _ = answer_matches(&bytes, Some(&q), &bytes);
                let mut copy = bytes.clone();
                let n = make_servfail(&mut copy, Some(&q));
                prop_assert!(n <= bytes.len());
                prop_assert_eq!(header(&copy[..n]).unwrap().rcode, 2);
            }
            if bytes.len() >= HEADER_LEN {
                let mut copy = bytes.clone();
                let n = make_truncated(&mut copy);
                prop_assert!(n <= bytes.len());
                prop_assert!(header(&copy[..n]).unwrap().tc);
            }
            let _ = soa_serial(&bytes);
            let mut walk = records(&bytes);
            for r in walk.by_ref() {
                prop_assert!(r.name_start < r.ttl_at && r.ttl_at + 6 == r.rdata_start);
                prop_assert!(r.rdata_start <= r.rdata_end && r.rdata_end <= bytes.len());
            }
            let _ = walk.malformed();
        }

        #[test]
        fn generated_queries_parse_and_match((m, labels, id, qtype, qclass) in query()) {
            let q = question(&m).unwrap();
            prop_assert_eq!((q.qtype, q.qclass, q.end), (qtype, qclass, m.len()));
            prop_assert_eq!(self::id(&m), id);
            // Any change of case matches and hashes alike; another type does not match.
            let mut upper = m.clone();
            for b in &mut upper[HEADER_LEN..q.name_end] {
                b.make_ascii_uppercase();
            }
            let mut answer = m.clone();
            answer[2] |= 0x80;
            prop_assert!(answer_matches(&m, Some(&q), &answer));
            prop_assert_eq!(upper == m, answer_matches(&m, Some(&q), &{ let mut u = upper.clone(); u[2] |= 0x80; u }));
            prop_assert_eq!(qname_hash(&m, &q), qname_hash(&upper, &question(&upper).unwrap()));
            let mut other = answer.clone();
            let n = other.len();
            other[n - 3] ^= 1;
            prop_assert!(!answer_matches(&m, Some(&q), &other));
            let mut rewritten = m.clone();
            set_id(&mut rewritten, id ^ 0xffff);
            prop_assert_eq!(self::id(&rewritten), id ^ 0xffff);
            prop_assert_eq!(&rewritten[2..], &m[2..]);
            prop_assert!(labels.len() < 5);
        }

        #[test]
        fn truncations_of_a_query_never_panic((m, _l, _i, _t, _c) in query(), cut in 0usize..64) {
            let cut = cut.min(m.len());
            let t = &m[..m.len() - cut];
            match question(t) {
                Ok(q) => prop_assert!(q.end <= t.len()),
                Err(_) => prop_assert!(cut > 0),
            }
        }
    }
}
