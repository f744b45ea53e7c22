//! The proxy core: answers identical to BIND's, TC then TCP, pipelining, policies, bad input.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use integration_tests::*;

const T: Duration = Duration::from_secs(3);

fn two_backends() -> (Named, Named) {
    (
        Named::start(ZoneSpec::new(1, "a")),
        Named::start(ZoneSpec::new(1, "b")),
    )
}

#[test]
fn answers_are_identical_to_querying_bind_directly() {
    let ns = Named::start(ZoneSpec::new(7, "a"));
    let lb = Lb::start(&lb_config(&[ns.addr], "least-outstanding", ""));
    let cases = [
        ("www.example.test.", RecordType::A),
        ("www.example.test.", RecordType::AAAA),
        ("example.test.", RecordType::SOA),
        ("example.test.", RecordType::MX),
        ("nope.example.test.", RecordType::A),
        ("WwW.ExAmPlE.TeSt.", RecordType::A),
    ];
    for (i, (name, t)) in cases.iter().enumerate() {
        let q = query_bytes(1000 + i as u16, name, *t);
        let direct = udp_exchange(ns.addr, &q, T).expect("direct answer");
        let via = udp_exchange(lb.udp(), &q, T).expect("answer through lb");
        assert_eq!(via, direct, "{name} {t:?} over UDP");
        let mut s = TcpStream::connect(lb.tcp()).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        tcp_write(&mut s, &q);
        assert_eq!(tcp_read(&mut s).unwrap(), direct, "{name} {t:?} over TCP");
    }
    let nx = udp_query(lb.udp(), "nope.example.test.", RecordType::A, T).unwrap();
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    let soa = udp_query(lb.udp(), "example.test.", RecordType::SOA, T).unwrap();
    assert_eq!(soa_serial(&soa), Some(7));
    assert!(soa.metadata.authoritative);
}

/// Queries arriving faster than the proxy wakes up are read and sent on in batches
/// (`recvmmsg`/`sendmmsg`): every one of a burst from several clients gets its own answer,
/// with its own ID, byte for byte what BIND answers, from the address it was sent to.
#[test]
fn a_burst_of_queries_is_batched_and_every_answer_matches_its_query() {
    let (a, b) = two_backends();
    let lb = Lb::start(&lb_config(
        &[a.addr, b.addr],
        "round-robin",
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    ));
    let names: Vec<(String, RecordType)> = (0..50)
        .map(|i| (format!("host{i}.example.test."), RecordType::A))
        .chain([
            ("www.example.test.".to_string(), RecordType::AAAA),
            ("nope.example.test.".to_string(), RecordType::A),
            ("example.test.".to_string(), RecordType::SOA),
        ])
        .collect();
    // Both zones are the same apart from `who`; expected answers come from BIND directly.
    let expected: Vec<Vec<u8>> = names
        .iter()
        .map(|(n, t)| udp_exchange(a.addr, &query_bytes(0, n, *t), T).expect("BIND answers"))
        .collect();
    let before = sample(&lb.scrape(), "lb_queries_total{protocol=\"udp\"}");
    // The burst is 400 queries, 200 per backend: BIND reads with the default receive buffer
    // (about 200 small datagrams), and a bigger burst loses queries in BIND's socket when the
    // machine is busy, which is not what this test is about.
    const PER_CLIENT: usize = 50;
    const CLIENTS: usize = 8;
    let clients: Vec<UdpSocket> = (0..CLIENTS)
        .map(|_| {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(T)).unwrap();
            c
        })
        .collect();
    for k in 0..PER_CLIENT {
        for (ci, c) in clients.iter().enumerate() {
            let (n, t) = &names[(k + ci) % names.len()];
            let id = (ci * PER_CLIENT + k) as u16;
            c.send_to(&query_bytes(id, n, *t), lb.udp()).unwrap();
        }
    }
    let mut buf = vec![0u8; 65535];
    for (ci, c) in clients.iter().enumerate() {
        let mut seen = [false; PER_CLIENT];
        for _ in 0..PER_CLIENT {
            let Ok((len, from)) = c.recv_from(&mut buf) else {
                panic!("client {ci}: an answer is missing; lb: {:?}", lb.status());
            };
            assert_eq!(from, lb.udp());
            let id = u16::from_be_bytes([buf[0], buf[1]]) as usize;
            let k = id
                .checked_sub(ci * PER_CLIENT)
                .expect("an ID this client sent");
            assert!(
                k < PER_CLIENT && !seen[k],
                "ID {id} answered once, to its client"
            );
            seen[k] = true;
            let mut want = expected[(k + ci) % names.len()].clone();
            want[..2].copy_from_slice(&(id as u16).to_be_bytes());
            assert_eq!(&buf[..len], &want[..], "answer to ID {id}");
        }
    }
    let scrape = lb.scrape();
    let after = sample(&scrape, "lb_queries_total{protocol=\"udp\"}");
    assert_eq!(after - before, (CLIENTS * PER_CLIENT) as f64);
    let calls = sample(&scrape, "lb_udp_batches_total{op=\"recv\"}");
    let moved = sample(&scrape, "lb_udp_batch_datagrams_total{op=\"recv\"}");
    assert!(
        moved >= (2 * CLIENTS * PER_CLIENT) as f64,
        "queries and answers were counted ({moved})"
    );
    assert!(
        moved > calls,
        "some recvmmsg calls carried several datagrams ({moved} in {calls} calls)"
    );
    assert_eq!(lb.drops("backend-timeout"), 0);
}

#[test]
fn dig_through_the_proxy() {
    let ns = Named::start(ZoneSpec::new(3, "a"));
    let lb = Lb::start(&lb_config(&[ns.addr], "round-robin", ""));
    let out = Command::new("dig")
        .args(["+short", "+norec", "-p"])
        .arg(lb.udp().port().to_string())
        .args(["@127.0.0.1", "www.example.test", "AAAA"])
        .output()
        .expect("dig (apt-get install dnsutils)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2001:db8::1");
    // EDNS with a cookie passes through byte for byte: BIND echoes the client cookie.
    let out = Command::new("dig")
        .args(["+norec", "+cookie", "-p"])
        .arg(lb.udp().port().to_string())
        .args(["@127.0.0.1", "example.test", "SOA"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("COOKIE:") && text.contains("status: NOERROR"),
        "{text}"
    );
}

#[test]
fn large_answer_truncates_over_udp_then_succeeds_over_tcp() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&lb_config(&[ns.addr], "least-outstanding", ""));
    let udp = udp_query(lb.udp(), "big.example.test.", RecordType::TXT, T).unwrap();
    assert!(udp.metadata.truncation, "no EDNS: 512-byte limit, TC=1");
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    tcp_write(
        &mut s,
        &query_bytes(9, "big.example.test.", RecordType::TXT),
    );
    let raw = tcp_read(&mut s).unwrap();
    assert!(raw.len() > 1232, "answer is {} bytes", raw.len());
    let m = Message::from_vec(&raw).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.metadata.id, 9);
    let t = txt(&m).unwrap();
    assert!(t.starts_with('0'));
}

#[test]
fn fifty_pipelined_queries_on_one_tcp_connection() {
    let (a, b) = two_backends();
    let lb = Lb::start(&lb_config(&[a.addr, b.addr], "round-robin", ""));
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut all = Vec::new();
    for i in 0..50u16 {
        let name = format!("host{i}.example.test.");
        let q = query_bytes(500 + i, &name, RecordType::A);
        all.extend_from_slice(&(q.len() as u16).to_be_bytes());
        all.extend_from_slice(&q);
    }
    s.write_all(&all).unwrap();
    let mut seen = HashMap::new();
    for _ in 0..50 {
        let m = Message::from_vec(&tcp_read(&mut s).expect("answer")).unwrap();
        let i = m.metadata.id - 500;
        let name = m.queries[0].name().to_ascii();
        assert_eq!(name, format!("host{i}.example.test."));
        let addr = match &m.answers[0].data {
            hickory_proto::rr::RData::A(a) => a.0,
            other => panic!("{other:?}"),
        };
        assert_eq!(addr.octets()[3] as u16, i);
        assert!(seen.insert(i, ()).is_none(), "answer {i} twice");
    }
    assert_eq!(seen.len(), 50);
}

/// Counts which backend (by its TXT tag) answers `n` distinct names.
fn distribution(lb: &Lb, n: usize, name: impl Fn(usize) -> String) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let m = udp_query(lb.udp(), &name(i), RecordType::TXT, T).expect("answer");
        *counts.entry(txt(&m).unwrap()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn policies_distribute_as_documented() {
    let (a, b) = two_backends();
    let backends = [a.addr, b.addr];

    let lb = Lb::start(&lb_config(&backends, "first-available", ""));
    let d = distribution(&lb, 40, |i| format!("n{i}.who.example.test."));
    assert_eq!(d.get("a"), Some(&40), "first-available: {d:?}");
    drop(lb);

    let lb = Lb::start(&lb_config(&backends, "round-robin", ""));
    let d = distribution(&lb, 200, |i| format!("n{i}.who.example.test."));
    let (ca, cb) = (d["a"], d["b"]);
    assert!(ca >= 60 && cb >= 60, "round-robin: {d:?}");
    drop(lb);

    let lb = Lb::start(&lb_config(&backends, "least-outstanding", ""));
    let d = distribution(&lb, 200, |i| format!("n{i}.who.example.test."));
    assert!(
        d["a"] >= 40 && d["b"] >= 40,
        "least-outstanding spreads ties: {d:?}"
    );
    drop(lb);

    let lb = Lb::start(&lb_config(&backends, "qname-hash", ""));
    // The same name (in any case) always lands on the same backend...
    let first = distribution(&lb, 1, |_| "stable.who.example.test.".into());
    let again = distribution(&lb, 30, |i| {
        if i % 2 == 0 {
            "stable.who.example.test.".into()
        } else {
            "STABLE.Who.Example.Test.".into()
        }
    });
    let tag = first.keys().next().unwrap().clone();
    assert_eq!(
        again.get(&tag),
        Some(&30),
        "qname-hash is sticky: {again:?}"
    );
    // ...and distinct names spread over both.
    let d = distribution(&lb, 200, |i| format!("n{i}.who.example.test."));
    assert!(
        d["a"] >= 50 && d["b"] >= 50,
        "qname-hash spreads names: {d:?}"
    );
}

/// Checks the proxy still answers a good query.
fn still_serving(lb: &Lb) {
    let m = udp_query(lb.udp(), "www.example.test.", RecordType::A, T).expect("still answers UDP");
    assert_eq!(m.answers.len(), 1);
    let m = tcp_query(lb.tcp(), "www.example.test.", RecordType::A).expect("still answers TCP");
    assert_eq!(m.answers.len(), 1);
}

#[test]
fn bad_client_input_is_dropped_and_the_proxy_keeps_serving() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&lb_config(
        &[ns.addr],
        "least-outstanding",
        "[tcp]\nidle_timeout_ms = 300\nread_timeout_ms = 300\nmax_query_size_bytes = 1024\n",
    ));
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let good = query_bytes(77, "www.example.test.", RecordType::A);
    let mut qr = good.clone();
    qr[2] |= 0x80;
    let mut garbage_question = good.clone();
    garbage_question.truncate(good.len() - 3);
    let mut bad_label = good.clone();
    bad_label[12] = 0x7f;
    let mut two_questions = good.clone();
    two_questions[5] = 2;
    // Not DNS queries at all (shorter than a header, QR=1), or over udp.max_datagram_bytes: lb
    // drops them, no answer.
    let inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![1, 2, 3],
        vec![0; 11],
        qr.clone(),
        vec![0xff; 5000], // over udp.max_datagram_bytes
    ];
    for bad in &inputs {
        c.send_to(bad, lb.udp()).unwrap();
    }
    let mut buf = [0u8; 512];
    assert!(
        c.recv_from(&mut buf).is_err(),
        "bad datagrams get no answer"
    );
    // Malformed queries are still DNS queries: BIND answers them (FORMERR), and through lb
    // the client gets BIND's own answer (issue #15: lb drops only what is not a query).
    for (what, bad) in [
        ("a truncated question", garbage_question),
        ("a bad label type", bad_label),
        ("QDCOUNT 2 with one question", two_questions),
    ] {
        let direct = udp_exchange(ns.addr, &bad, Duration::from_millis(500));
        let via = udp_exchange(lb.udp(), &bad, Duration::from_millis(2500));
        assert_eq!(
            via.as_deref().map(integration_tests::dnsmsg::summary),
            direct.as_deref().map(integration_tests::dnsmsg::summary),
            "{what}: through lb, the client gets what BIND answers"
        );
        assert_eq!(via, direct, "{what}: byte for byte");
    }
    still_serving(&lb);

    // TCP: zero-length frame, oversized frame, a stalled half frame, and silence all end in a
    // closed connection without hurting other clients.
    let closed = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        assert!(
            tcp_read(&mut s).is_none(),
            "connection closed without an answer"
        );
    };
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.write_all(&[0, 0]).unwrap();
    closed(s);
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.write_all(&[0xff, 0xff, 1, 2, 3]).unwrap();
    closed(s);
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.write_all(&[0, 40, 1, 2]).unwrap();
    closed(s);
    closed(TcpStream::connect(lb.tcp()).unwrap());
    // A frame that is not a query (shorter than a header, or QR=1) is dropped but the
    // connection keeps going.
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    tcp_write(&mut s, &[9; 5]);
    tcp_write(&mut s, &qr);
    tcp_write(&mut s, &good);
    let m = Message::from_vec(&tcp_read(&mut s).unwrap()).unwrap();
    assert_eq!(m.metadata.id, 77);
    still_serving(&lb);
}

/// A fake backend that answers every query with `reply(query)` (or not at all when `None`).
fn fake_udp_backend(reply: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if let Some(r) = reply(&buf[..n]) {
                let _ = s.send_to(&r, from);
            }
        }
    });
    addr
}

#[test]
fn misbehaving_backends_never_reach_the_client() {
    // Wrong ID, wrong question, garbage and truncated answers: all must be dropped.
    let wrong_id = fake_udp_backend(|q| {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r[0] ^= 0xff;
        Some(r)
    });
    let wrong_question = fake_udp_backend(|q| {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        let n = r.len();
        r[n - 5] = b'z'; // last letter of the name
        Some(r)
    });
    let garbage = fake_udp_backend(|_| Some(vec![0xde, 0xad, 0xbe]));
    let truncated = fake_udp_backend(|q| {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r.truncate(14);
        Some(r)
    });
    let silent = fake_udp_backend(|_| None);
    for backend in [wrong_id, wrong_question, garbage, truncated, silent] {
        let lb = Lb::start(&lb_config(&[backend], "round-robin", "timeout_ms = 300\n"));
        let m = udp_query(
            lb.udp(),
            "www.example.test.",
            RecordType::A,
            Duration::from_millis(800),
        );
        assert!(
            m.is_none(),
            "a bad answer from {backend} reached the client: {m:?}"
        );
        // The proxy is alive and its table entry expired.
        let mut lb = lb;
        assert!(lb.proc.is_running());
    }
}

#[test]
fn config_errors_are_clear() {
    let dir = TempDir::new("cfg");
    let check = |text: &str| {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let out = Command::new(bin("lb"))
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let good = lb_config(&["127.0.0.1:5301".parse().unwrap()], "round-robin", "");
    let (code, out) = check(&good);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check(&good.replace("policy", "polic"));
    assert_eq!(code, Some(1));
    assert!(out.contains("bad.toml") && out.contains("polic"), "{out}");
    let (code, out) = check(&good.replace("127.0.0.1:5301", "127.0.0.1:99999"));
    assert_eq!(code, Some(1));
    assert!(out.contains("127.0.0.1:99999"), "{out}");
    let (code, out) = check("[listen]\nudp = [\"127.0.0.1:0\"]\n");
    assert_eq!(code, Some(1));
    assert!(out.contains("backends"), "{out}");

    // An address already in use is named, and lb exits non-zero.
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let p = dir.path().join("inuse.toml");
    std::fs::write(
        &p,
        good.replace(
            "udp = [\"127.0.0.1:0\"]",
            &format!("udp = [\"{}\"]", taken.local_addr().unwrap()),
        ),
    )
    .unwrap();
    let out = Command::new(bin("lb"))
        .args(["run", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&taken.local_addr().unwrap().to_string()) && err.contains("in use"),
        "{err}"
    );
}
