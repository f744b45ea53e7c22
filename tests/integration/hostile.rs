//! Hostile clients and misbehaving backends: while each attack runs (bounded in rate and time,
//! from another loopback address), a well-behaved client keeps querying and must keep getting
//! correct answers; the proxy's memory stays bounded and every drop is counted.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use integration_tests::*;
use rand::Rng;

/// Where attacks come from (the good client uses 127.0.0.1).
const ATTACKER: &str = "127.0.0.5";
/// Documented bound on the proxy's peak RSS in these tests (debug build, defaults).
const RSS_BOUND_KB: u64 = 96 * 1024;

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// A good client: a query every 2 ms for `dur`, each checked (ID, question, answer).
/// Returns the share answered correctly.
fn good_client(lb: SocketAddr, dur: Duration) -> f64 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (mut sent, mut ok) = (0u32, 0u32);
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < dur {
        sent += 1;
        let id = sent as u16;
        s.send_to(&query_bytes(id, "www.example.test.", RecordType::A), lb)
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let Ok((n, _)) = s.recv_from(&mut buf) else {
                break;
            };
            let Ok(m) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if m.metadata.id == id {
                if m.queries[0].name().to_ascii() == "www.example.test." && m.answers.len() == 1 {
                    ok += 1;
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    ok as f64 / sent.max(1) as f64
}

/// Runs `attack` (until the flag turns true) beside a good client; returns the success ratio.
fn under_attack(lb: &Lb, name: &str, attack: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || attack(s2));
    std::thread::sleep(Duration::from_millis(100));
    let ratio = good_client(lb.udp(), Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    let rss = peak_rss_kb(lb.proc.pid());
    eprintln!(
        "hostile {name}: good client success {:.1}%, lb peak RSS {} KiB",
        ratio * 100.0,
        rss
    );
    assert!(
        rss < RSS_BOUND_KB,
        "{name}: peak RSS {rss} KiB over the bound"
    );
    ratio
}

/// Sends datagrams made by `make` at up to `pps` per second until stopped (bounded).
fn udp_flood(
    target: SocketAddr,
    pps: u32,
    stop: Arc<AtomicBool>,
    make: impl Fn(&mut rand::rngs::ThreadRng) -> Vec<u8>,
) {
    let s = UdpSocket::bind((ATTACKER, 0)).unwrap();
    let mut rng = rand::rng();
    let t = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(10) {
        let _ = s.send_to(&make(&mut rng), target);
        n += 1;
        let due = Duration::from_secs_f64(n as f64 / pps as f64);
        if let Some(wait) = due.checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

fn hostile_config(backend: SocketAddr) -> String {
    format!(
        "{}\n[tcp]\nmax_connections = 300\nmax_connections_per_prefix = 50\nidle_timeout_ms = 1000\nread_timeout_ms = 500\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        lb_config(&[backend], "least-outstanding", "timeout_ms = 500\n")
    )
}

#[test]
fn floods_and_hostile_clients() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&hostile_config(ns.addr));
    let target = lb.udp();
    let mut ratios = Vec::new();

    ratios.push(under_attack(&lb, "random-byte UDP flood", move |stop| {
        udp_flood(target, 5000, stop, |r| {
            let n = r.random_range(0..700);
            (0..n).map(|_| r.random()).collect()
        })
    }));
    ratios.push(under_attack(&lb, "random IDs and names", move |stop| {
        udp_flood(target, 3000, stop, |r| {
            let name = format!("r{}.example.test.", r.random::<u32>());
            query_bytes(r.random(), &name, RecordType::A)
        })
    }));
    ratios.push(under_attack(
        &lb,
        "responses sent to the listener",
        move |stop| {
            udp_flood(target, 5000, stop, |r| {
                let mut q = query_bytes(r.random(), "www.example.test.", RecordType::A);
                q[2] |= 0x80;
                q
            })
        },
    ));
    let tcp = lb.tcp();
    ratios.push(under_attack(
        &lb,
        "TCP silence, slowloris, oversized, connection flood",
        move |stop| {
            let mut held = Vec::new();
            let t = Instant::now();
            while !stop.load(Ordering::Relaxed)
                && held.len() < 400
                && t.elapsed() < Duration::from_secs(5)
            {
                let Ok(sock) =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                else {
                    break;
                };
                let _ = sock.bind(&SocketAddr::from(([127, 0, 0, 5], 0)).into());
                if sock.connect(&tcp.into()).is_err() {
                    continue;
                }
                let mut s: TcpStream = sock.into();
                match held.len() % 3 {
                    0 => {}
                    1 => {
                        let _ = s.write_all(&[0, 100, 1, 2]);
                    }
                    _ => {
                        let _ = s.write_all(&[0xff, 0xff]);
                    }
                }
                held.push(s);
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        },
    ));
    // A well-behaved TCP client is still served during and after the connection flood.
    let m = tcp_query(lb.tcp(), "www.example.test.", RecordType::A).expect("tcp still served");
    assert_eq!(m.answers.len(), 1);

    for r in &ratios {
        assert!(*r >= 0.9, "good client success ratios {ratios:?}");
    }
    let scrape = lb.scrape();
    // (Random bytes that parse as a header with QR=0 are queries: lb forwards them and BIND
    // answers or not, so no "bad question" reason is expected here.)
    // The connection flood comes from one address: the per-network limit (50) refuses it
    // long before the total (300).
    for (family, reason) in [
        ("lb_dropped_packets_total", "short-header"),
        ("lb_dropped_packets_total", "qr-set"),
        ("lb_dropped_connections_total", "tcp-prefix-limit"),
    ] {
        let v = sample(&scrape, &format!("{family}{{reason=\"{reason}\"}}"));
        assert!(v > 0.0, "drops for {reason} are counted in {family}");
    }
}

/// A fake backend answering each query with `extra` unsolicited random-ID answers first, then
/// (if `answer`) the real answer copied from BIND; TCP connections are accepted and ignored.
fn spoofing_backend(real: SocketAddr, extra: usize, answer: bool) -> (SocketAddr, Arc<AtomicBool>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    let tcp = std::net::TcpListener::bind(addr).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        tcp.set_nonblocking(true).unwrap();
        while !st.load(Ordering::Relaxed) {
            if let Ok((c, _)) = tcp.accept() {
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let st = stop.clone();
    std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut rng = rand::rng();
        while !st.load(Ordering::Relaxed) {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                continue;
            };
            let q = buf[..n].to_vec();
            for _ in 0..extra {
                let mut fake = q.clone();
                fake[2] |= 0x84;
                fake[0] = rng.random();
                fake[1] = rng.random();
                let _ = s.send_to(&fake, from);
                // A right ID with a wrong question, and a truncated one.
                let mut wrong = q.clone();
                wrong[2] |= 0x80;
                let len = wrong.len();
                wrong[len - 6] ^= 0x20 ^ 0x01;
                let _ = s.send_to(&wrong, from);
                let _ = s.send_to(&q[..q.len().min(13)], from);
            }
            if answer {
                if let Some(r) = udp_exchange(real, &q, Duration::from_secs(1)) {
                    let _ = s.send_to(&r, from);
                }
            }
        }
    });
    (addr, stop)
}

#[test]
fn spoofed_and_garbage_answers_never_reach_the_client() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let (bad, stop) = spoofing_backend(ns.addr, 20, true);
    let lb = Lb::start(&hostile_config(bad));
    let ratio = good_client(lb.udp(), Duration::from_secs(2));
    eprintln!(
        "hostile spoofing backend: good client success {:.1}%",
        ratio * 100.0
    );
    assert!(ratio >= 0.95, "{ratio}");
    let scrape = lb.scrape();
    assert!(
        sample(
            &scrape,
            "lb_dropped_packets_total{reason=\"unmatched-answer\"}"
        ) > 100.0
    );
    assert!(
        sample(
            &scrape,
            "lb_dropped_packets_total{reason=\"mismatched-question\"}"
        ) > 10.0
    );
    assert!(sample(&scrape, "lb_dropped_packets_total{reason=\"bad-answer\"}") > 10.0);
    // TCP to a backend that accepts and never answers: the query times out and is counted;
    // UDP keeps working.
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    tcp_write(&mut s, &query_bytes(1, "www.example.test.", RecordType::A));
    assert!(tcp_read(&mut s).is_none());
    let t = Instant::now();
    while sample(
        &lb.scrape(),
        "lb_dropped_packets_total{reason=\"backend-timeout\"}",
    ) < 1.0
    {
        assert!(t.elapsed() < Duration::from_secs(3), "timeout counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lb.answers_udp());
    assert!(peak_rss_kb(lb.proc.pid()) < RSS_BOUND_KB);
    stop.store(true, Ordering::Relaxed);
}

/// A backend that answers each query first with a bare header (the query's ID, QR=1, the RCODE
/// in `rcode`, no question, no records), as an off-path forger who guessed the ID and the port
/// would, then with BIND's real answer.
fn questionless_backend(real: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicU8>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    let rcode = Arc::new(std::sync::atomic::AtomicU8::new(2));
    let rc = rcode.clone();
    std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = buf[..n].to_vec();
            let mut bare = q[..12].to_vec();
            bare[2] |= 0x80;
            bare[3] = rc.load(Ordering::Relaxed);
            bare[4..12].copy_from_slice(&[0; 8]);
            let _ = s.send_to(&bare, from);
            if let Some(r) = udp_exchange(real, &q, Duration::from_secs(1)) {
                let _ = s.send_to(&r, from);
            }
        }
    });
    (addr, rcode)
}

#[test]
fn a_questionless_answer_passes_only_for_the_rcodes_bind_sends_that_way() {
    // BIND echoes the question in NXDOMAIN, SERVFAIL and REFUSED: a question-less one is
    // forged, dropped, and the real answer reaches the client. FORMERR and NOTIMP may come
    // without it and are relayed.
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let (backend, rcode) = questionless_backend(ns.addr);
    let lb = Lb::start(&hostile_config(backend));
    for (code, relayed) in [(2u8, false), (3, false), (5, false), (1, true), (4, true)] {
        rcode.store(code, Ordering::Relaxed);
        let before = lb.drops("mismatched-question");
        let q = query_bytes(0x4242, "www.example.test.", RecordType::A);
        let a = udp_exchange(lb.udp(), &q, Duration::from_secs(3)).expect("an answer");
        let h = lb::wire::header(&a).unwrap();
        if relayed {
            assert_eq!(h.rcode, code, "RCODE {code}: relayed");
            assert_eq!(h.qdcount, 0);
        } else {
            assert_eq!(
                (h.rcode, h.qdcount, h.ancount),
                (0, 1, 1),
                "RCODE {code}: BIND's answer"
            );
            assert_eq!(lb.drops("mismatched-question"), before + 1, "RCODE {code}");
        }
        assert_eq!(&a[..2], &q[..2]);
    }
}
