//! Conformance (issue #15): whatever BIND answers directly, a client gets through lb, byte for
//! byte except the ID, over UDP and TCP; zone transfers (AXFR, real incremental IXFR, TSIG)
//! are relayed whole; odd queries cannot steer health; wildcard listeners answer from the
//! address the query was sent to; the TCP data path survives broken backend connections and
//! slow clients; and the control path keeps its promises.
//!
//! The suite sends each query shape to BIND directly and through lb and compares the answers
//! with [`dnsmsg::mask`] (ID zeroed and checked separately, server cookie zeroed, TSIG removed
//! and verified with the key instead). `conformance_suite_compares_bind_with_itself` runs the
//! same comparison with BIND on both sides, so a difference reported through lb is lb's.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use integration_tests::dnsmsg::{self, types::*, QueryBuilder, TsigKey};
use integration_tests::netns::NetNs;
use integration_tests::*;

const T: Duration = Duration::from_secs(3);
/// How long to wait for BIND's own answers (it answers in microseconds, or not at all).
const DIRECT_WAIT: Duration = Duration::from_millis(1500);
/// How long to wait for an answer through lb; above lb's query timeout in [`suite_lb`].
const VIA_WAIT: Duration = Duration::from_millis(2500);
/// TCP exchanges the suite runs at once.
const TCP_CLIENTS: usize = 8;
/// Records in the zone transferred whole (the issue asks for at least 20,000).
const BIG_ZONE: usize = 20_000;

/// One query shape of the suite.
struct Shape {
    name: String,
    query: Vec<u8>,
    /// The query's type, which decides where a TCP answer stream ends.
    qtype: u16,
    /// MAC of a TSIG-signed query: its answers are verified with the key.
    request_mac: Option<Vec<u8>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The shapes: every opcode, QDCOUNT 0/1-without-question/2, unknown class and type, CHAOS,
/// EDNS versions, options, flags and buffer sizes, TC, NXDOMAIN, NODATA, referral, wildcard,
/// CNAME, ANY, 0x20 case, cookies, trailing bytes, transfers, TSIG (signed, unknown key, bad
/// MAC).
fn shapes() -> Vec<Shape> {
    let key = TsigKey::test_key();
    let mut v: Vec<(String, QueryBuilder)> = Vec::new();
    let mut add = |name: &str, b: QueryBuilder| v.push((name.to_string(), b));
    let q = |name: &str, t: u16| QueryBuilder::new(0, name, t);
    let www = || q("www.example.test.", A);
    add("A", www());
    add("AAAA", q("www.example.test.", AAAA));
    add("SOA at the apex", q("example.test.", SOA));
    add("MX", q("example.test.", MX));
    add("ANY at the apex", q("example.test.", ANY));
    add("NXDOMAIN", q("nope.example.test.", A));
    add("NODATA (TXT at www)", q("www.example.test.", TXT));
    add("wildcard TXT", q("x.who.example.test.", TXT));
    add("CNAME", q("alias.example.test.", A));
    add("referral (A below sub)", q("host.sub.example.test.", A));
    add("referral (NS of sub)", q("sub.example.test.", NS));
    add("unknown type 65280", q("www.example.test.", 65280));
    add("unknown class 0xff00", www().class(0xff00));
    add(
        "CHAOS version.bind TXT",
        q("version.bind.", TXT).class(CLASS_CH),
    );
    add("not authoritative (root SOA)", q(".", SOA));
    add("255-byte name", {
        let labels: Vec<String> = (0..3).map(|_| "a".repeat(63)).collect();
        let name = format!("{}.{}.example.test.", labels.join("."), "b".repeat(47));
        q(&name, A)
    });
    add("0x20 mixed case", q("WwW.ExAmPlE.TeSt.", A));
    add("RD set", www().rd());
    add("AD set", www().ad());
    add("CD set", www().cd());
    add("Z bit set", www().z());
    add("no EDNS, big TXT (TC)", q("big.example.test.", TXT));
    add("no EDNS, medium TXT (TC)", q("medium.example.test.", TXT));
    add(
        "EDNS 512, big TXT (TC)",
        q("big.example.test.", TXT).edns(512),
    );
    add(
        "EDNS 512, medium TXT (TC)",
        q("medium.example.test.", TXT).edns(512),
    );
    add(
        "EDNS 1232, medium TXT",
        q("medium.example.test.", TXT).edns(1232),
    );
    add("EDNS 4096, big TXT", q("big.example.test.", TXT).edns(4096));
    add("EDNS 4096, A", www().edns(4096));
    add("EDNS DO bit", www().edns(1232).dnssec_ok());
    add("EDNS version 1 (BADVERS)", www().edns(1232).edns_version(1));
    add("EDNS unknown option", www().option(65001, b"hello"));
    add(
        "EDNS unknown flag bits",
        www().edns(1232).edns_flags(0x0101),
    );
    add("EDNS two OPT records", {
        let opt = dnsmsg::rr(".", OPT, 1232, 0, &[]);
        www().edns(1232).additional_rr(&opt)
    });
    add("client cookie", www().cookie(*b"clientck", &[]));
    add(
        "client cookie + stale server cookie",
        www().cookie(
            *b"clientck",
            &[0x01, 0, 0, 0, 0x5f, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        ),
    );
    add(
        "cookie-only (QDCOUNT 0, OPT)",
        www().no_question().cookie(*b"onlycook", &[]),
    );
    add("QDCOUNT 0, no OPT", www().no_question());
    add("QDCOUNT 2", www().question("example.test.", SOA, CLASS_IN));
    add(
        "QDCOUNT 1, question missing",
        www().no_question().qdcount(1),
    );
    add(
        "trailing bytes after the question",
        www().trailing(&[0xde, 0xad]),
    );
    add("ANCOUNT 1 in a query", {
        let a = dnsmsg::rr("www.example.test.", A, CLASS_IN, 300, &[192, 0, 2, 1]);
        www().answer_rr(&a)
    });
    for op in 1..16u8 {
        let name = match op {
            1 => "opcode 1 IQUERY".to_string(),
            2 => "opcode 2 STATUS".to_string(),
            4 => "opcode 4 NOTIFY".to_string(),
            5 => "opcode 5 UPDATE".to_string(),
            n => format!("opcode {n}"),
        };
        let b = match op {
            4 => {
                let mut b = q("example.test.", SOA).opcode(4);
                b.flags[0] |= 0x04; // AA, as a primary sends it
                b
            }
            5 => {
                // Zone example.test, one update: add an A record (refused: no allow-update).
                let a = dnsmsg::rr("new.example.test.", A, CLASS_IN, 300, &[192, 0, 2, 9]);
                q("example.test.", SOA).opcode(5).authority_rr(&a)
            }
            n => www().opcode(n),
        };
        add(&name, b);
    }
    add("opcode 1 IQUERY, classic (QD 0, AN 1)", {
        let a = dnsmsg::rr("www.example.test.", A, CLASS_IN, 300, &[192, 0, 2, 1]);
        www().no_question().answer_rr(&a).opcode(1)
    });
    add("opcode 2 STATUS, QD 0", www().no_question().opcode(2));
    add("AXFR example.test", q("example.test.", AXFR));
    add(
        "IXFR example.test from serial 0",
        q("example.test.", IXFR).authority_rr(&dnsmsg::soa_rr("example.test.", 0)),
    );
    add("AXFR of a zone not served", q("other.test.", AXFR));
    add(
        "IXFR of a zone not served",
        q("other.test.", IXFR).authority_rr(&dnsmsg::soa_rr("other.test.", 1)),
    );

    let mut out: Vec<Shape> = v
        .into_iter()
        .enumerate()
        .map(|(i, (name, mut b))| {
            b.id = 0x1000 + i as u16;
            let qtype = b.questions.first().map_or(0, |q| q.1);
            Shape {
                name,
                query: b.build(),
                qtype,
                request_mac: None,
            }
        })
        .collect();
    // TSIG: signed now (BIND accepts 300 s of clock difference).
    let time = now_secs();
    let n = out.len() as u16;
    for (i, (name, qname, qtype)) in [
        ("TSIG-signed SOA", "example.test.", SOA),
        ("TSIG-signed AXFR", "example.test.", AXFR),
        ("TSIG-signed NXDOMAIN", "nope.example.test.", A),
    ]
    .into_iter()
    .enumerate()
    {
        let q = QueryBuilder::new(0x2000 + n + i as u16, qname, qtype).build();
        let (signed, mac) = key.sign_query(&q, time);
        out.push(Shape {
            name: name.into(),
            query: signed,
            qtype,
            request_mac: Some(mac),
        });
    }
    let q = QueryBuilder::new(0x3000, "example.test.", SOA).build();
    let unknown = TsigKey {
        name: "no-such-key.".into(),
        secret: vec![1; 32],
    };
    out.push(Shape {
        name: "TSIG unknown key (BADKEY)".into(),
        query: unknown.sign_query(&q, time).0,
        qtype: SOA,
        request_mac: None,
    });
    let (mut bad_mac, _) = key.sign_query(&q, time);
    let l = bad_mac.len();
    bad_mac[l - 10] ^= 0xff; // inside the MAC
    out.push(Shape {
        name: "TSIG bad MAC (BADSIG)".into(),
        query: bad_mac,
        qtype: SOA,
        request_mac: None,
    });
    out
}

/// Compares one answer through the target with BIND's own, for shape `s`.
fn compare_message(s: &Shape, direct: &[u8], via: &[u8]) -> Result<(), String> {
    let want_id = &s.query[..2];
    if via.len() < 2 || &via[..2] != want_id {
        return Err(format!(
            "answer ID {:02x?} is not the client's {:02x?}; {}",
            &via[..via.len().min(2)],
            want_id,
            dnsmsg::summary(via)
        ));
    }
    let (d, g) = (dnsmsg::mask(direct), dnsmsg::mask(via));
    if let Some(diff) = dnsmsg::diff(&d.bytes, &g.bytes) {
        return Err(diff);
    }
    match (&d.tsig, &g.tsig) {
        (None, None) => Ok(()),
        (Some(_), None) | (None, Some(_)) => {
            Err("one answer has a TSIG record and the other not".into())
        }
        (Some(_), Some(_)) => {
            let (td, tg) = (
                dnsmsg::parse_tsig(direct).map_err(|e| format!("direct TSIG: {e}"))?,
                dnsmsg::parse_tsig(via).map_err(|e| format!("TSIG through lb: {e}"))?,
            );
            if (&td.key, &td.algorithm, td.error, td.mac.len())
                != (&tg.key, &tg.algorithm, tg.error, tg.mac.len())
            {
                return Err(format!("TSIG records differ: {td:?} vs {tg:?}"));
            }
            Ok(())
        }
    }
}

/// One shape's outcome on one transport: what BIND answered, or why lb's answer differs.
type Outcome = Result<String, String>;

/// RCODE names for the table.
fn rcode_name(rcode: u16) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        9 => "NOTAUTH".into(),
        16 => "BADVERS".into(),
        n => format!("RCODE{n}"),
    }
}

/// A short description of BIND's answer for the table: RCODE, section counts, TC.
fn brief(msg: &[u8]) -> String {
    if msg.len() < 12 {
        return format!("{} bytes", msg.len());
    }
    let c = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    format!(
        "{} qd={} an={} ns={} ar={}{}",
        rcode_name(dnsmsg::rcode(msg)),
        c(4),
        c(6),
        c(8),
        c(10),
        if msg[2] & 0x02 != 0 { " TC" } else { "" }
    )
}

fn compare_udp(
    s: &Shape,
    direct: &Option<(Vec<u8>, SocketAddr)>,
    via: &Option<(Vec<u8>, SocketAddr)>,
    target: SocketAddr,
) -> Outcome {
    match (direct, via) {
        (None, None) => Ok("no answer from BIND, none through lb".into()),
        (None, Some((g, _))) => Err(format!(
            "BIND does not answer this, but lb answered: {}",
            dnsmsg::summary(g)
        )),
        (Some((d, _)), None) => Err(format!(
            "no answer through lb within {VIA_WAIT:?}; BIND answers: {}",
            dnsmsg::summary(d)
        )),
        (Some((d, _)), Some((g, from))) => {
            if *from != target {
                return Err(format!(
                    "answer came from {from}, the query went to {target}"
                ));
            }
            compare_message(s, d, g)?;
            if let Some(mac) = &s.request_mac {
                let key = TsigKey::test_key();
                key.verify_response(d, mac)
                    .map_err(|e| format!("direct answer's TSIG: {e}"))?;
                key.verify_response(g, mac)
                    .map_err(|e| format!("TSIG of the answer through lb: {e}"))?;
            }
            Ok(format!("identical: {}", brief(d)))
        }
    }
}

fn compare_tcp(s: &Shape, direct: &Transfer, via: &Transfer) -> Outcome {
    if direct.messages.is_empty() {
        if via.messages.is_empty() {
            return Ok("no answer from BIND, none through lb".into());
        }
        return Err(format!(
            "BIND does not answer this, but lb answered: {}",
            dnsmsg::summary(&via.messages[0])
        ));
    }
    if !direct.complete {
        return Err(format!("BIND's own answer: {}", direct.describe()));
    }
    for (i, (d, g)) in direct.messages.iter().zip(&via.messages).enumerate() {
        compare_message(s, d, g)
            .map_err(|e| format!("message {} of {}: {e}", i + 1, direct.messages.len()))?;
    }
    if via.messages.len() != direct.messages.len() || !via.complete {
        return Err(format!(
            "BIND: {} ({}); through lb: {}",
            direct.describe(),
            brief(&direct.messages[0]),
            via.describe()
        ));
    }
    if let Some(mac) = &s.request_mac {
        let key = TsigKey::test_key();
        key.verify_stream(&direct.messages, mac)
            .map_err(|e| format!("direct answer's TSIG: {e}"))?;
        key.verify_stream(&via.messages, mac)
            .map_err(|e| format!("TSIG of the answer through lb: {e}"))?;
    }
    Ok(if direct.messages.len() > 1 {
        format!("identical streams of {} messages", direct.messages.len())
    } else {
        format!("identical: {}", brief(&direct.messages[0]))
    })
}

/// Runs every shape against BIND directly and against `udp`/`tcp` (lb, or BIND itself for the
/// sanity run); returns (shape, transport, outcome) rows.
fn run_suite(
    bind: SocketAddr,
    udp: SocketAddr,
    tcp: SocketAddr,
) -> Vec<(String, &'static str, Outcome)> {
    let shapes = shapes();
    let queries: Vec<Vec<u8>> = shapes.iter().map(|s| s.query.clone()).collect();
    let direct = udp_exchange_many(bind, &queries, DIRECT_WAIT);
    let via = udp_exchange_many(udp, &queries, VIA_WAIT);
    let mut rows = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        rows.push((
            s.name.clone(),
            "udp",
            compare_udp(s, &direct[i], &via[i], udp),
        ));
    }
    // A few connections at a time: BIND's TCP listen queue is short (`tcp-listen-queue` 10),
    // and a dropped SYN costs a 1 s retransmission.
    let next = AtomicUsize::new(0);
    let mut streams: Vec<Option<(Transfer, Transfer)>> = Vec::new();
    streams.resize_with(shapes.len(), || None);
    let results = std::sync::Mutex::new(streams);
    std::thread::scope(|sc| {
        for _ in 0..TCP_CLIENTS {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(s) = shapes.get(i) else { break };
                let d = tcp_exchange(bind, &s.query, s.qtype, DIRECT_WAIT);
                let g = tcp_exchange(tcp, &s.query, s.qtype, VIA_WAIT);
                results.lock().unwrap()[i] = Some((d, g));
            });
        }
    });
    let streams: Vec<(Transfer, Transfer)> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every shape ran"))
        .collect();
    for (s, (d, g)) in shapes.iter().zip(&streams) {
        rows.push((s.name.clone(), "tcp", compare_tcp(s, d, g)));
    }
    rows
}

/// Prints the table and fails with every failing row's details.
fn assert_rows(what: &str, rows: &[(String, &'static str, Outcome)]) {
    let mut table = format!("{what}: {} checks\n", rows.len());
    for (name, proto, r) in rows {
        let verdict = match r {
            Ok(how) => format!("pass, {how}"),
            Err(e) => format!("FAIL: {}", e.lines().next().unwrap_or("")),
        };
        table.push_str(&format!("  {proto:3} {name:45} {verdict}\n"));
    }
    eprintln!("{table}");
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|(name, proto, r)| {
            r.as_ref()
                .err()
                .map(|e| format!("--- {name} over {proto}: {e}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{what}: {} of {} checks differ from BIND:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

fn conformance_bind() -> Named {
    Named::start_with(
        ZoneSpec::new(1, "a"),
        NamedOptions {
            conformance: true,
            ..NamedOptions::default()
        },
    )
}

/// lb in front of one BIND, with room for the suite's parallel TCP connections.
fn suite_lb(backends: &[SocketAddr], extra: &str) -> Lb {
    Lb::start(&format!(
        "{}\n{LOOPBACK_MAY_TRANSFER}",
        lb_config(
            backends,
            "round-robin",
            &format!("timeout_ms = 2000\n\n[tcp]\nmax_connections_per_prefix = 1000\n{extra}"),
        )
    ))
}

/// lb refuses zone transfers, UPDATE and NOTIFY unless `[access]` names the client: the
/// suite's clients (loopback) are named, so BIND's own answers can be compared.
const LOOPBACK_MAY_TRANSFER: &str = "[access]\ntransfer_allow = [\"127.0.0.0/8\", \"::1\"]\nupdate_allow = [\"127.0.0.0/8\", \"::1\"]\nnotify_allow = [\"127.0.0.0/8\", \"::1\"]\n";

/// The comparison itself is sound: BIND compared with BIND (second answer asked again of
/// BIND directly) passes every shape, so masks and stream ends neither hide nor invent
/// differences.
#[test]
fn conformance_suite_compares_bind_with_itself() {
    let ns = conformance_bind();
    let all = shapes();
    assert!(all.len() >= 40, "{} shapes", all.len());
    let rows = run_suite(ns.addr, ns.addr, ns.addr);
    assert_rows("BIND against itself", &rows);

    // And the comparison does see differences: take BIND's answer to a query with a client
    // cookie and to a TSIG-signed one, and alter them.
    let s = all.iter().find(|s| s.name == "client cookie").unwrap();
    let a = udp_exchange(ns.addr, &s.query, T).expect("BIND answers");
    let b = udp_exchange(ns.addr, &s.query, T).expect("BIND answers");
    assert!(
        compare_message(s, &a, &b).is_ok(),
        "server cookies are masked"
    );
    let mut other_id = b.clone();
    other_id[1] ^= 1;
    assert!(compare_message(s, &a, &other_id).is_err(), "ID checked");
    let mut client_cookie = b.clone();
    let at = b.windows(8).position(|w| w == b"clientck").unwrap();
    client_cookie[at] ^= 1;
    assert!(
        compare_message(s, &a, &client_cookie).is_err(),
        "client cookie compared"
    );
    for at in [3, 20, b.len() - 30] {
        let mut flipped = b.clone();
        flipped[at] ^= 0x01;
        let err = compare_message(s, &a, &flipped).expect_err("a flipped byte is seen");
        assert!(err.contains(&format!("offset {at} ")), "{err}");
    }
    let s = all.iter().find(|s| s.name == "TSIG-signed SOA").unwrap();
    let mac = s.request_mac.as_ref().unwrap();
    let signed = udp_exchange(ns.addr, &s.query, T).expect("BIND answers");
    let key = TsigKey::test_key();
    key.verify_response(&signed, mac)
        .expect("BIND's MAC verifies");
    let mut bad = signed.clone();
    bad[20] ^= 1;
    assert!(
        key.verify_response(&bad, mac).is_err(),
        "a changed answer fails the MAC"
    );
    let mut bad = signed.clone();
    let l = bad.len();
    bad[l - 10] ^= 1;
    assert!(
        key.verify_response(&bad, mac).is_err(),
        "a changed MAC fails"
    );
}

#[test]
fn conformance_suite_through_lb() {
    let ns = conformance_bind();
    let lb = suite_lb(&[ns.addr], "");
    let rows = run_suite(ns.addr, lb.udp(), lb.tcp());
    eprintln!("lb after the suite: {:?}", lb.status());
    assert_rows("through lb", &rows);
}

/// Runs `dig @IP -p PORT +time=5 +tries=1 +norec ARGS`; returns (exit code, stdout + stderr).
fn dig(server: SocketAddr, args: &[&str]) -> (i32, String) {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args([
            "-p",
            &server.port().to_string(),
            "+time=5",
            "+tries=1",
            "+norec",
        ])
        .args(args)
        .output()
        .expect("dig (apt-get install dnsutils)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// What `dig` printed for a transfer: the records (TSIG lines apart: they differ by time and
/// original ID), the TSIG lines counted, and the `XFR size` line.
struct DigTransfer {
    code: i32,
    records: Vec<String>,
    tsig_lines: usize,
    size: Option<String>,
    problems: Vec<String>,
}

fn dig_transfer(server: SocketAddr, args: &[&str]) -> DigTransfer {
    let (code, text) = dig(server, args);
    let mut t = DigTransfer {
        code,
        records: Vec::new(),
        tsig_lines: 0,
        size: None,
        problems: Vec::new(),
    };
    for line in text.lines() {
        if let Some(size) = line.strip_prefix(";; XFR size: ") {
            t.size = Some(size.to_string());
        } else if line.contains("Couldn't verify")
            || line.contains("Transfer failed")
            || line.contains("communications error")
            || line.contains("timed out")
            || line.contains("WARNING")
            || line.contains("tsig")
        {
            t.problems.push(line.to_string());
        } else if line.starts_with(';') || line.trim().is_empty() {
            continue;
        } else if line.split_whitespace().nth(3) == Some("TSIG") {
            t.tsig_lines += 1;
        } else {
            t.records.push(line.to_string());
        }
    }
    t
}

/// Checks a dig transfer through lb against the same one direct from BIND.
fn assert_same_dig_transfer(what: &str, direct: &DigTransfer, via: &DigTransfer, signed: bool) {
    assert!(
        direct.code == 0 && direct.problems.is_empty() && direct.size.is_some(),
        "{what}: dig directly from BIND failed (exit {}): {:?}",
        direct.code,
        direct.problems
    );
    if signed {
        assert!(direct.tsig_lines > 0, "{what}: BIND signed nothing");
    }
    let first_diff = direct
        .records
        .iter()
        .zip(&via.records)
        .position(|(a, b)| a != b);
    assert!(
        via.code == 0 && via.problems.is_empty(),
        "{what}: dig through lb failed (exit {}) after {} of {} records: {:?}",
        via.code,
        via.records.len(),
        direct.records.len(),
        via.problems
    );
    assert!(
        via.records == direct.records,
        "{what}: records differ: {} through lb vs {} from BIND; first difference at record {first_diff:?}",
        via.records.len(),
        direct.records.len()
    );
    assert_eq!(via.size, direct.size, "{what}: XFR size line");
    assert_eq!(
        via.tsig_lines, direct.tsig_lines,
        "{what}: TSIG records (one per signed message)"
    );
}

/// Compares two transfers message by message (ID and server cookie masked, TSIG removed).
fn assert_same_stream(what: &str, query: &[u8], direct: &Transfer, via: &Transfer) {
    assert!(
        direct.complete,
        "{what}: BIND's own answer: {}",
        direct.describe()
    );
    let s = Shape {
        name: what.into(),
        query: query.to_vec(),
        qtype: 0,
        request_mac: None,
    };
    for (i, (d, g)) in direct.messages.iter().zip(&via.messages).enumerate() {
        if let Err(e) = compare_message(&s, d, g) {
            panic!(
                "{what}: message {} of {} differs: {e}",
                i + 1,
                direct.messages.len()
            );
        }
    }
    assert!(
        via.complete && via.messages.len() == direct.messages.len(),
        "{what}: BIND sent {}; through lb: {}",
        direct.describe(),
        via.describe()
    );
}

fn transfer_bind(big: usize, ixfr: usize) -> Named {
    Named::start_with(
        ZoneSpec::new(1, "a"),
        NamedOptions {
            conformance: true,
            big_zone_records: big,
            ixfr_zone_records: ixfr,
            ..NamedOptions::default()
        },
    )
}

/// AXFR of a zone of 20,000 records (dozens of messages) through lb equals BIND's own, read
/// by our reader (message by message, byte for byte but the ID) and by `dig`; signed with
/// TSIG, every message's MAC verifies through lb (dig, and [`TsigKey::verify_stream`]).
#[test]
fn axfr_of_a_large_zone_through_lb_equals_binds() {
    let ns = transfer_bind(BIG_ZONE, 0);
    let lb = suite_lb(&[ns.addr], "");
    let q = QueryBuilder::new(0x4a58, "big.test.", AXFR).build();
    let limit = Duration::from_secs(20);
    let direct = tcp_exchange(ns.addr, &q, AXFR, limit);
    let records: usize = direct
        .messages
        .iter()
        .map(|m| dnsmsg::layout(m).map_or(0, |l| l.answers.len()))
        .sum();
    assert!(
        direct.complete && records > BIG_ZONE && direct.messages.len() > 10,
        "BIND's AXFR: {} with {records} records",
        direct.describe()
    );
    // BIND keeps the connection open after a transfer: the end is the closing SOA, and the
    // client's connection carries on with the next query.
    let mut c = TcpStream::connect(lb.tcp()).unwrap();
    let via = tcp_transfer(&mut c, &q, AXFR, limit);
    assert_same_stream("AXFR big.test (our reader)", &q, &direct, &via);
    let next = query_bytes(0x4a59, "www.example.test.", RecordType::A);
    let after = tcp_transfer(&mut c, &next, A, T);
    let want = tcp_exchange(ns.addr, &next, A, T);
    assert_same_stream(
        "a query after the transfer, same connection",
        &next,
        &want,
        &after,
    );

    let d = dig_transfer(ns.addr, &["+tcp", "big.test", "AXFR"]);
    let g = dig_transfer(lb.tcp(), &["+tcp", "big.test", "AXFR"]);
    assert_same_dig_transfer("dig AXFR big.test", &d, &g, false);

    let key = TsigKey::test_key();
    let (signed, mac) = key.sign_query(&q, now_secs());
    let via = tcp_exchange(lb.tcp(), &signed, AXFR, limit);
    assert!(via.complete, "TSIG AXFR through lb: {}", via.describe());
    let n = key
        .verify_stream(&via.messages, &mac)
        .unwrap_or_else(|e| panic!("TSIG AXFR through lb does not verify: {e}"));
    assert!(n >= 1);
    let y = key.dig_arg();
    let d = dig_transfer(ns.addr, &["-y", &y, "big.test", "AXFR"]);
    let g = dig_transfer(lb.tcp(), &["-y", &y, "big.test", "AXFR"]);
    assert_same_dig_transfer("dig -y AXFR big.test", &d, &g, true);
}

/// A real incremental IXFR (RFC 1995): BIND computes the differences itself
/// (`ixfr-from-differences`, two reloads), answers in several messages with SOAs inside the
/// difference sequences; through lb the stream is the same, over TCP, signed or not; the
/// up-to-date answer (one SOA) and UDP IXFR (which stays UDP) are the same too.
#[test]
fn incremental_ixfr_through_lb_equals_binds() {
    let mut ns = transfer_bind(0, 4000);
    ns.ixfr_update(2);
    ns.ixfr_update(3);
    let lb = suite_lb(&[ns.addr], "");
    let limit = Duration::from_secs(10);
    let ixfr = |id: u16, serial: u32| {
        QueryBuilder::new(id, "ixfr.test.", IXFR)
            .authority_rr(&dnsmsg::soa_rr("ixfr.test.", serial))
            .build()
    };
    let q = ixfr(0x1f01, 1);
    let direct = tcp_exchange(ns.addr, &q, IXFR, limit);
    let soas: usize = direct
        .messages
        .iter()
        .map(|m| {
            dnsmsg::layout(m).map_or(0, |l| l.answers.iter().filter(|r| r.rtype == SOA).count())
        })
        .sum();
    assert!(
        direct.complete && direct.incremental && direct.messages.len() > 1 && soas == 6,
        "BIND must answer IXFR from serial 1 incrementally, in several messages, with two difference sequences (6 SOAs): {} incremental={} SOAs={soas}",
        direct.describe(),
        direct.incremental
    );
    let via = tcp_exchange(lb.tcp(), &q, IXFR, limit);
    assert_same_stream("IXFR ixfr.test from 1 over TCP", &q, &direct, &via);

    for (serial, what) in [
        (2, "IXFR from 2 (one difference sequence)"),
        (3, "IXFR from 3 (up to date: one SOA)"),
    ] {
        let q = ixfr(0x1f00 + serial as u16, serial);
        let direct = tcp_exchange(ns.addr, &q, IXFR, limit);
        let via = tcp_exchange(lb.tcp(), &q, IXFR, limit);
        assert_same_stream(what, &q, &direct, &via);
    }

    // UDP IXFR stays UDP: the answer lb relays is BIND's UDP answer.
    let q = ixfr(0x1f10, 1);
    let direct = udp_exchange(ns.addr, &q, T).expect("BIND answers IXFR over UDP");
    let via = udp_exchange(lb.udp(), &q, T);
    let s = Shape {
        name: "IXFR over UDP".into(),
        query: q.clone(),
        qtype: IXFR,
        request_mac: None,
    };
    match via {
        None => panic!(
            "IXFR over UDP: no answer through lb; BIND answers {}",
            dnsmsg::summary(&direct)
        ),
        Some(v) => {
            if let Err(e) = compare_message(&s, &direct, &v) {
                panic!("IXFR over UDP: {e}");
            }
        }
    }

    // Signed: dig -y through lb verifies every message.
    let y = TsigKey::test_key().dig_arg();
    let d = dig_transfer(ns.addr, &["-y", &y, "ixfr.test", "IXFR=1"]);
    let g = dig_transfer(lb.tcp(), &["-y", &y, "ixfr.test", "IXFR=1"]);
    assert_same_dig_transfer("dig -y IXFR=1 ixfr.test", &d, &g, true);
}

/// A TSIG-signed query through lb verifies at the client with the real key (`dig -y`, and
/// our own verification of the MAC), over UDP and TCP: lb's ID rewrite is legal because the
/// TSIG carries the original ID.
#[test]
fn tsig_signed_queries_verify_through_lb() {
    let ns = conformance_bind();
    let lb = suite_lb(&[ns.addr], "");
    let key = TsigKey::test_key();
    let y = key.dig_arg();
    for (proto, target) in [("+notcp", lb.udp()), ("+tcp", lb.tcp())] {
        for server in [ns.addr, target] {
            let (code, out) = dig(server, &[proto, "-y", &y, "example.test", "SOA"]);
            let tsig = out
                .lines()
                .find(|l| l.split_whitespace().nth(3) == Some("TSIG"))
                .unwrap_or("");
            assert!(
                code == 0
                    && out.contains("status: NOERROR")
                    && tsig.contains("NOERROR")
                    && !out.contains("Couldn't verify")
                    && !out.contains("WARNING"),
                "dig {proto} -y via {server} (BIND is {}): exit {code}\n{out}",
                ns.addr
            );
        }
    }
    let q = QueryBuilder::new(0x7516, "www.example.test.", A).build();
    let (signed, mac) = key.sign_query(&q, now_secs());
    let a = udp_exchange(lb.udp(), &signed, T).expect("signed query answered through lb");
    key.verify_response(&a, &mac)
        .unwrap_or_else(|e| panic!("TSIG through lb: {e}: {}", dnsmsg::summary(&a)));
    assert_eq!(&a[..2], &[0x75, 0x16], "the client's ID");
}

/// The odd packets of the flood, by index: opcodes 1-15, QDCOUNT 0 (with and without OPT) and
/// 2, a QDCOUNT with no question, an unknown class and EDNS version 1 (under several
/// opcodes), and garbage.
fn odd_packet(i: usize, rng: &mut impl rand::Rng) -> Vec<u8> {
    let id: u16 = rng.random();
    let www = QueryBuilder::new(id, "www.example.test.", A);
    match i % 22 {
        0 => www.no_question().build(),
        k @ 1..=15 => www.opcode(k as u8).build(),
        16 => www.no_question().cookie(rng.random(), &[]).build(),
        17 => www.question("example.test.", SOA, CLASS_IN).build(),
        18 => www.no_question().qdcount(1).build(),
        19 => www.class(0xff00).opcode((i % 16) as u8).build(),
        20 => www.edns(1232).edns_version(1).opcode((i % 3) as u8).build(),
        _ => {
            let len = rng.random_range(0..64);
            (0..len).map(|_| rng.random()).collect()
        }
    }
}

/// Client-steered health (issue #15): 10,000 odd packets from one source and no other
/// traffic, against lb with health checks and passive timeouts on and two healthy BINDs:
/// every backend stays `up` and `/healthz` stays 200 throughout (polled during the flood and
/// after the last query could have timed out).
#[test]
fn a_flood_of_odd_queries_cannot_take_backends_down() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&format!(
        "{}\n[health]\nzones = [\"example.test.\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        lb_config(&[a.addr, b.addr], "round-robin", "timeout_ms = 500\n")
    ));
    for ns in [&a, &b] {
        assert!(lb.wait_state(ns.addr, "up", T).is_some(), "{} up", ns.addr);
    }
    let metrics = lb.metrics.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    // Watcher: /healthz and `status` every 50 ms; records every moment something is not fine.
    let watcher = {
        let stop = stop.clone();
        let socket = lb.socket();
        std::thread::spawn(move || {
            let mut bad: Vec<String> = Vec::new();
            let mut polls = 0;
            while !stop.load(Ordering::Relaxed) {
                polls += 1;
                let mut wrong = Vec::new();
                let (code, body) = http_get(metrics, "/healthz");
                if code != 200 {
                    wrong.push(format!("/healthz {code} {}", body.trim()));
                }
                let st = lb::control_protocol::send_request(
                    &socket,
                    lb::control_protocol::ControlCommand::Status,
                    T,
                );
                if let Ok(lb::control_protocol::ControlResponse {
                    result: Some(lb::control_protocol::ControlResult::Status(s)),
                    ..
                }) = st
                {
                    for be in s.backends.iter().filter(|be| be.state != "up") {
                        wrong.push(format!(
                            "backend {} {} ({:?})",
                            be.address, be.state, be.reason
                        ));
                    }
                }
                if !wrong.is_empty() {
                    bad.push(format!("at {:?}: {}", t0.elapsed(), wrong.join(", ")));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (polls, bad)
        })
    };
    // 10,000 packets at about 5,000 a second, answers read and counted.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_nonblocking(true).unwrap();
    let mut rng = rand::rng();
    let mut answered = 0usize;
    let mut buf = [0u8; 4096];
    const FLOOD: usize = 10_000;
    for i in 0..FLOOD {
        let _ = c.send_to(&odd_packet(i, &mut rng), lb.udp());
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(10));
            while c.recv(&mut buf).is_ok() {
                answered += 1;
            }
        }
    }
    let flood_took = t0.elapsed();
    // Past the query timeout (500 ms) and a few probe rounds (1 s).
    std::thread::sleep(Duration::from_millis(2500));
    while c.recv(&mut buf).is_ok() {
        answered += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (polls, bad) = watcher.join().unwrap();
    let st = lb.status();
    eprintln!(
        "flood: {FLOOD} odd packets in {flood_took:?}, {answered} answered; {polls} health polls; drops {:?}",
        st.drops
    );
    assert!(polls > 20, "the watcher polled ({polls})");
    assert!(
        bad.is_empty(),
        "odd queries changed health in {} of {polls} polls; first: {:?}; last: {:?}; backends now {:?}",
        bad.len(),
        bad.first(),
        bad.last(),
        st.backends
            .iter()
            .map(|b| (&b.address, &b.state, &b.reason, b.timeouts))
            .collect::<Vec<_>>()
    );
    for be in &st.backends {
        assert_eq!(be.state, "up", "{be:?}");
    }
}

/// Queries of a burst: their answers fit a client's default receive buffer.
const BURST: u16 = 100;

/// An lb config with these listen addresses (instead of 127.0.0.1:0).
fn listen_config(udp: &[&str], tcp: &[&str], backends: &[SocketAddr]) -> String {
    let q = |v: &[&str]| {
        v.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    lb_config(backends, "round-robin", "")
        .replace("udp = [\"127.0.0.1:0\"]", &format!("udp = [{}]", q(udp)))
        .replace("tcp = [\"127.0.0.1:0\"]", &format!("tcp = [{}]", q(tcp)))
}

/// Sends queries to `dest` from a socket bound to `local`, all at once (`burst` of them, so
/// they are read and answered in batches); returns a description of every answer that did not
/// come back from `dest`, or did not come back.
fn answers_from(local: SocketAddr, dest: SocketAddr, burst: u16) -> Vec<String> {
    let c = UdpSocket::bind(local).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    for id in 0..burst {
        c.send_to(&query_bytes(id, "www.example.test.", RecordType::A), dest)
            .unwrap();
    }
    let mut problems = Vec::new();
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while got < burst {
        match c.recv_from(&mut buf) {
            Ok((_, from)) => {
                got += 1;
                if from != dest {
                    problems.push(format!("query to {dest} from {local} answered from {from}"));
                }
            }
            Err(_) => {
                problems.push(format!(
                    "{} of {burst} queries to {dest} from {local} unanswered",
                    burst - got
                ));
                break;
            }
        }
    }
    problems.dedup();
    problems
}

/// A wildcard listener (`0.0.0.0`) answers from the address each query was sent to: a
/// client of 127.0.0.5 gets its answer from 127.0.0.5 (a connected socket accepts nothing
/// else), one query or a burst, mixed with queries to 127.0.0.1 in the same batches; TCP too.
#[test]
fn wildcard_ipv4_listener_answers_from_the_address_queried() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&listen_config(&["0.0.0.0:0"], &["0.0.0.0:0"], &[ns.addr]));
    let port = lb.udp().port();
    assert!(lb.udp().ip().is_unspecified(), "{}", lb.udp());
    let five = SocketAddr::from(([127, 0, 0, 5], port));
    let one = SocketAddr::from(([127, 0, 0, 1], port));
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut problems = answers_from(local, five, 1);
    // A connected client: the kernel drops datagrams from any other source.
    let c = UdpSocket::bind(local).unwrap();
    c.connect(five).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    c.send(&query_bytes(7, "www.example.test.", RecordType::A))
        .unwrap();
    let mut buf = [0u8; 512];
    if c.recv(&mut buf).is_err() {
        problems.push("a client connected to 127.0.0.5 got no answer".into());
    }
    // Bursts to both addresses at once: the batched path keeps each answer's source.
    let (p5, p1) = std::thread::scope(|s| {
        let h5 = s.spawn(|| answers_from(local, five, BURST));
        let h1 = s.spawn(|| answers_from(local, one, BURST));
        (h5.join().unwrap(), h1.join().unwrap())
    });
    problems.extend(p5);
    problems.extend(p1);
    // TCP: an accepted connection always answers from its own address.
    let tcp5 = SocketAddr::from(([127, 0, 0, 5], lb.tcp().port()));
    if tcp_query(tcp5, "www.example.test.", RecordType::A).is_none() {
        problems.push("TCP query to 127.0.0.5 unanswered".into());
    }
    assert!(problems.is_empty(), "wildcard 0.0.0.0: {problems:#?}");
}

/// The same for IPv6 with a second address, in a network namespace: `[::]` and `0.0.0.0`
/// listeners; queries to fd00::5 and to ::1 (from the other address), and to 127.0.0.5,
/// are answered from the address queried, singly and in bursts.
#[test]
fn wildcard_ipv6_listener_answers_from_the_address_queried() {
    let ns_net = match NetNs::create("v6") {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIPPED: cannot create a network namespace: {e}");
            return;
        }
    };
    ns_net
        .add_loopback_address("fd00::5/128")
        .expect("add fd00::5 inside the namespace");
    let named = Named::start_with(
        ZoneSpec::new(1, "a"),
        NamedOptions {
            netns: Some(ns_net.name.clone()),
            ..NamedOptions::default()
        },
    );
    let lb = Lb::start_in_netns(
        &listen_config(&["[::]:0", "0.0.0.0:0"], &["[::]:0"], &[named.addr]),
        &ns_net,
    );
    let v6 = lb.udp_all[0].port();
    let v4 = lb.udp_all[1].port();
    let tcp6 = lb.tcp();
    let problems = ns_net.run(|| {
        let mut p = Vec::new();
        let ula: SocketAddr = format!("[fd00::5]:{v6}").parse().unwrap();
        let lo6: SocketAddr = format!("[::1]:{v6}").parse().unwrap();
        let five: SocketAddr = format!("127.0.0.5:{v4}").parse().unwrap();
        p.extend(answers_from("[::1]:0".parse().unwrap(), ula, 1));
        p.extend(answers_from("[fd00::5]:0".parse().unwrap(), lo6, 1));
        p.extend(answers_from("127.0.0.1:0".parse().unwrap(), five, 1));
        p.extend(answers_from("[::1]:0".parse().unwrap(), ula, BURST));
        p.extend(answers_from("[fd00::5]:0".parse().unwrap(), lo6, BURST));
        let t = SocketAddr::new("fd00::5".parse().unwrap(), tcp6.port());
        if tcp_query(t, "www.example.test.", RecordType::A).is_none() {
            p.push(format!("TCP query to {t} unanswered"));
        }
        p
    });
    assert!(problems.is_empty(), "wildcard [::]: {problems:#?}");
}

/// A TCP backend whose connection breaks mid-query: it accepts one connection, reads one
/// query and reports it, then (when told) closes the connection and stops listening, so the
/// query can only be answered if lb re-sends it elsewhere.
fn breaking_tcp_backend() -> (SocketAddr, mpsc::Receiver<Vec<u8>>, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_tx, got_rx) = mpsc::channel();
    let (close_tx, close_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return,
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        if let Some(q) = tcp_read(&mut conn) {
            let _ = got_tx.send(q);
        }
        let _ = close_rx.recv_timeout(Duration::from_secs(15));
        drop(conn);
        drop(listener);
    });
    (addr, got_rx, close_tx)
}

/// A query in flight on a backend connection that breaks is re-sent once, to the current
/// set: here the set was swapped meanwhile, so the new backend answers it.
#[test]
fn a_query_on_a_broken_backend_connection_is_re_sent_to_the_current_set() {
    let real = Named::start(ZoneSpec::new(1, "new"));
    let (fake, got, close) = breaking_tcp_backend();
    let lb = Lb::start(&lb_config(&[fake], "round-robin", "timeout_ms = 4000\n"));
    let q = query_bytes(0x3131, "who.example.test.", RecordType::TXT);
    let mut c = TcpStream::connect(lb.tcp()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    tcp_write(&mut c, &q);
    got.recv_timeout(T)
        .expect("lb forwarded the query to the first backend");
    let (code, out, err) = lb.ctl(&["set-backends", &real.addr.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    close.send(()).unwrap();
    let answer = tcp_read(&mut c).unwrap_or_else(|| {
        panic!(
            "no answer: the query on the broken connection was not re-sent to the new set {}; drops {:?}",
            real.addr,
            lb.status().drops
        )
    });
    let direct = tcp_exchange(real.addr, &q, TXT, T);
    let s = Shape {
        name: "re-sent".into(),
        query: q,
        qtype: TXT,
        request_mac: None,
    };
    if let Err(e) = compare_message(&s, &direct.messages[0], &answer) {
        panic!("the re-sent query's answer is not the new backend's: {e}");
    }
}

/// A backend that refuses TCP connections (nothing listens on its port) does not cost the
/// client its query: the failed connect is retried on another backend of the set
/// (`first-available` puts the refusing backend first, and without health checks nothing
/// marks it down).
#[test]
fn a_failed_backend_connect_is_retried_on_another_backend() {
    let real = Named::start(ZoneSpec::new(1, "a"));
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let lb = Lb::start(&lb_config(
        &[closed, real.addr],
        "first-available",
        "timeout_ms = 2000\n",
    ));
    let q = query_bytes(100, "www.example.test.", RecordType::A);
    let t = tcp_exchange(lb.tcp(), &q, A, T);
    assert!(
        t.complete,
        "TCP query unanswered when the first backend refuses connections: {}; drops {:?}",
        t.describe(),
        lb.status().drops
    );
    let direct = tcp_exchange(real.addr, &q, A, T);
    assert_same_stream("after a failed connect", &q, &direct, &t);
}

/// A TCP client with a tiny receive buffer that stops reading.
fn stalled_client(target: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&target.into()).unwrap();
    s.into()
}

/// Checks `n` queries on a new connection are each answered within 2 s; returns the slowest.
fn prompt_answers(target: SocketAddr, n: u16) -> Result<Duration, String> {
    let mut c = TcpStream::connect(target).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        tcp_write(
            &mut c,
            &query_bytes(9000 + i, &format!("host{i}.example.test."), RecordType::A),
        );
        let m = tcp_read(&mut c).ok_or(format!("query {i} of {n} not answered within 2 s"))?;
        if m[..2] != (9000 + i).to_be_bytes() {
            return Err(format!("query {i}: wrong answer {}", dnsmsg::summary(&m)));
        }
        slowest = slowest.max(t.elapsed());
    }
    Ok(slowest)
}

/// A client that pipelines big answers and stops reading cannot stall the backend connection
/// it shares with others (one pooled connection): another client's queries are answered.
#[test]
fn a_slow_pipelining_client_does_not_stall_other_clients() {
    let ns = conformance_bind();
    let lb = Lb::start(&lb_config(
        &[ns.addr],
        "round-robin",
        "\n[tcp]\npool_size = 1\nwrite_timeout_ms = 10000\n",
    ));
    let mut slow = stalled_client(lb.tcp());
    let mut burst = Vec::new();
    for i in 0..100u16 {
        let q = query_bytes(i, "big.example.test.", RecordType::TXT);
        burst.extend_from_slice(&(q.len() as u16).to_be_bytes());
        burst.extend_from_slice(&q);
    }
    slow.write_all(&burst).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let slowest = prompt_answers(lb.tcp(), 20)
        .unwrap_or_else(|e| panic!("while a client stopped reading 100 big answers: {e}"));
    eprintln!("slowest answer next to a stalled client: {slowest:?}");
    drop(slow);
}

/// A zone transfer to a client that stops reading stalls only that transfer: other clients'
/// queries are answered, and another client's AXFR of the same zone from the same backend
/// completes and equals BIND's.
#[test]
fn a_stalled_transfer_does_not_stall_other_clients_or_transfers() {
    let ns = transfer_bind(BIG_ZONE, 0);
    let lb = suite_lb(&[ns.addr], "write_timeout_ms = 10000\n");
    let q = QueryBuilder::new(0x5151, "big.test.", AXFR).build();
    let mut slow = stalled_client(lb.tcp());
    tcp_write(&mut slow, &q);
    std::thread::sleep(Duration::from_millis(500));
    let slowest = prompt_answers(lb.tcp(), 20)
        .unwrap_or_else(|e| panic!("while a client stalls an AXFR: {e}"));
    eprintln!("slowest answer next to a stalled transfer: {slowest:?}");
    let limit = Duration::from_secs(20);
    let direct = tcp_exchange(ns.addr, &q, AXFR, limit);
    let via = tcp_exchange(lb.tcp(), &q, AXFR, limit);
    assert_same_stream("AXFR next to a stalled AXFR", &q, &direct, &via);
    drop(slow);
}

/// `[control]` with a state file whose directory can be replaced by a regular file (tests run
/// as root, so permissions cannot make it unwritable).
fn control_in(dir: &TempDir) -> String {
    let d = dir.path().display();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    format!("\n[control]\nsocket = \"{d}/control.sock\"\nstate_file = \"{d}/state/state.json\"\n")
}

/// Swaps are durable or refused: when the state file cannot be written, `set-backends` fails
/// (exit 1, naming the file) and the running set stays the old one.
#[test]
fn set_backends_fails_and_keeps_the_set_when_the_state_file_cannot_be_written() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let dir = TempDir::new("ctl");
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr], "round-robin", ""),
        control_in(&dir)
    ));
    let state_dir = dir.path().join("state");
    std::fs::remove_dir_all(&state_dir).unwrap();
    std::fs::write(&state_dir, "not a directory").unwrap();
    let (code, out, err) = lb.ctl(&["set-backends", &b.addr.to_string()]);
    let st = lb.status();
    let addrs: Vec<&str> = st.backends.iter().map(|b| b.address.as_str()).collect();
    assert_eq!(
        code, 1,
        "set-backends must fail when {}/state.json cannot be written; it said: {out}{err}; backends now {addrs:?}",
        state_dir.display()
    );
    assert!(
        err.contains("state"),
        "the error names the state file: {err}"
    );
    assert_eq!(addrs, vec![a.addr.to_string()], "the old set stays");
    assert_eq!(st.generation, 1);
    let m = udp_query(lb.udp(), "who.example.test.", RecordType::TXT, T).unwrap();
    assert_eq!(
        txt(&m).as_deref(),
        Some("a"),
        "queries still go to the old set"
    );
}

/// A relay in front of a real server (UDP and TCP) that delays the health probe's query
/// (SOA) by `delay` and passes everything else at once, so the time between a swap and the
/// first probe result is long enough to observe.
fn slow_probe_relay(real: SocketAddr, delay: Duration) -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).unwrap();
    let is_soa = |q: &[u8]| {
        dnsmsg::layout(q).is_ok_and(|l| {
            l.qdcount == 1 && q[l.question_end - 4..l.question_end - 2] == SOA.to_be_bytes()
        })
    };
    udp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let udp = Arc::new(udp);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let q = buf[..n].to_vec();
            let wait = if is_soa(&q) { delay } else { Duration::ZERO };
            let udp = udp.clone();
            std::thread::spawn(move || {
                std::thread::sleep(wait);
                if let Some(r) = udp_exchange(real, &q, Duration::from_secs(1)) {
                    let _ = udp.send_to(&r, from);
                }
            });
        }
    });
    std::thread::spawn(move || {
        for mut c in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let Ok(mut up) = TcpStream::connect(real) else {
                    return;
                };
                up.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                while let Some(q) = tcp_read(&mut c) {
                    if is_soa(&q) {
                        std::thread::sleep(delay);
                    }
                    tcp_write(&mut up, &q);
                    let Some(r) = tcp_read(&mut up) else { return };
                    tcp_write(&mut c, &r);
                }
            });
        }
    });
    addr
}

/// A backend added by a plain `set-backends` (no `--verify`) serves at once, even with health
/// checks on and `all_down = "servfail"`, until a probe says otherwise (here the first probe
/// of the new backend takes 500 ms to answer).
#[test]
fn an_unverified_new_backend_serves_at_once() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let slow_b = slow_probe_relay(b.addr, Duration::from_millis(500));
    // The relay passes ordinary queries at once, over UDP and TCP.
    let t0 = Instant::now();
    let via_relay = udp_query(slow_b, "who.example.test.", RecordType::TXT, T).map(|m| txt(&m));
    let tcp_relay = tcp_query(slow_b, "who.example.test.", RecordType::TXT).map(|m| txt(&m));
    assert_eq!(
        (via_relay, tcp_relay),
        (Some(Some("b".into())), Some(Some("b".into())))
    );
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    let lb = Lb::start(&format!(
        "{}\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 5000\ntimeout_ms = 1000\nall_down = \"servfail\"\n",
        lb_config(&[a.addr], "round-robin", "")
    ));
    assert!(lb.wait_state(a.addr, "up", T).is_some());
    let (code, out, err) = lb.ctl(&["set-backends", &slow_b.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let state = lb.backend_state(slow_b);
    let m = udp_query(lb.udp(), "who.example.test.", RecordType::TXT, T).expect("UDP answer");
    assert_eq!(
        (m.metadata.response_code, txt(&m)),
        (ResponseCode::NoError, Some("b".to_string())),
        "UDP query right after an unverified swap (new backend {state:?})"
    );
    let m = tcp_query(lb.tcp(), "who.example.test.", RecordType::TXT).expect("TCP answer");
    assert_eq!(
        (m.metadata.response_code, txt(&m)),
        (ResponseCode::NoError, Some("b".to_string())),
        "TCP query right after an unverified swap"
    );
    // The probe, once answered, agrees: still up.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(lb.backend_state(slow_b).map(|s| s.0).as_deref(), Some("up"));
}

/// A reload that turns health checks off brings backends that checks had marked down back
/// into use.
#[test]
fn a_reload_turning_health_checks_off_brings_down_backends_back() {
    let r = Named::start(ZoneSpec {
        serial: None,
        tag: "r".into(),
    });
    let a = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&format!(
        "{}\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 200\n",
        lb_config(&[r.addr, a.addr], "first-available", "")
    ));
    assert!(lb.wait_state(a.addr, "up", T).is_some());
    assert_eq!(
        lb.backend_state(r.addr).unwrap().0,
        "down",
        "REFUSED is down"
    );
    let text = std::fs::read_to_string(&lb.config).unwrap();
    std::fs::write(
        &lb.config,
        text.replace("[health]\n", "[health]\nenabled = false\n"),
    )
    .unwrap();
    let (code, out, err) = lb.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let back = lb.wait_state(r.addr, "up", Duration::from_secs(2));
    assert!(
        back.is_some(),
        "with health checks off, {} must be up again; it is {:?}",
        r.addr,
        lb.backend_state(r.addr)
    );
    // first-available: the first backend takes the queries again (and answers REFUSED).
    let m = udp_query(lb.udp(), "www.example.test.", RecordType::A, T).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

/// How the fake backend of [`answer_matching_rules`] answers, chosen by the query's first
/// label: `echo*` echoes the question as sent, `lower*` echoes it lowercased, `qd0noerror*`
/// answers NOERROR without a question, `qd0notimp*` NOTIMP without a question.
fn fake_answer(q: &[u8]) -> Option<Vec<u8>> {
    let l = dnsmsg::layout(q).ok()?;
    let mut r = q[..l.question_end].to_vec();
    r[2] |= 0x80;
    r[3] = 0;
    r[6..12].fill(0);
    let label = dnsmsg::read_name(q, 12).ok()?.to_ascii_lowercase();
    if label.starts_with("lower") {
        for b in &mut r[12..l.question_end - 4] {
            b.make_ascii_lowercase();
        }
    } else if label.starts_with("qd0") {
        r.truncate(12);
        r[4..6].fill(0);
        if label.starts_with("qd0notimp") {
            r[3] = 4;
        }
    }
    Some(r)
}

/// A fake backend over UDP and TCP answering with [`fake_answer`].
fn fake_backend() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            if let Some(r) = fake_answer(&buf[..n]) {
                let _ = udp.send_to(&r, from);
            }
        }
    });
    std::thread::spawn(move || {
        for mut c in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                while let Some(q) = tcp_read(&mut c) {
                    if let Some(r) = fake_answer(&q) {
                        tcp_write(&mut c, &r);
                    }
                }
            });
        }
    });
    addr
}

/// How lb matches answers (issue #15): the question must match byte for byte, case
/// included, when the answer has one (so a resolver's 0x20 randomisation protects it at lb
/// too); an answer without a question is relayed when its RCODE is not NOERROR (NOTIMP,
/// FORMERR...), never as a NOERROR answer to a query that had one.
#[test]
fn answer_matching_rules() {
    let fake = fake_backend();
    let lb = Lb::start(&lb_config(&[fake], "round-robin", "timeout_ms = 800\n"));
    let cases = [
        ("eChO.example.test.", true, "the exact question echoed"),
        ("qd0notimp.example.test.", true, "NOTIMP without a question"),
        ("LoWeR.example.test.", false, "the question in another case"),
        (
            "qd0noerror.example.test.",
            false,
            "NOERROR without a question",
        ),
    ];
    let rows: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (name, relay, what))| {
                let (udp, tcp) = (lb.udp(), lb.tcp());
                s.spawn(move || {
                    let q = query_bytes(0x600 + i as u16, name, RecordType::A);
                    let want = fake_answer(&q).unwrap();
                    let mut wrong = Vec::new();
                    let via_udp = udp_exchange(udp, &q, Duration::from_millis(1500));
                    let via_tcp = tcp_exchange(tcp, &q, A, Duration::from_millis(1500));
                    let via_tcp = via_tcp.messages.first().cloned();
                    for (proto, got) in [("udp", via_udp), ("tcp", via_tcp)] {
                        match (relay, got) {
                            (true, Some(g)) if g == want => {}
                            (true, g) => wrong.push(format!(
                                "{what} over {proto}: must be relayed as the backend sent it; got {:?}",
                                g.as_deref().map(dnsmsg::summary)
                            )),
                            (false, None) => {}
                            (false, Some(g)) => wrong.push(format!(
                                "{what} over {proto}: must not reach the client; it got {}",
                                dnsmsg::summary(&g)
                            )),
                        }
                    }
                    wrong
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(rows.is_empty(), "answer matching: {rows:#?}");
}
