//! The front door (issue #16): access lists, zone transfers refused unless allowed, and
//! response rate limiting of a spoofed-source flood, with real BIND behind lb.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use integration_tests::dnsmsg::QueryBuilder;
use integration_tests::*;

const T: Duration = Duration::from_secs(3);
const TXT: u16 = 16;
const AXFR: u16 = 252;

fn bind() -> Named {
    Named::start_with(
        ZoneSpec::new(1, "a"),
        NamedOptions {
            conformance: true,
            ..NamedOptions::default()
        },
    )
}

/// A UDP exchange from a chosen local address; `None` on timeout.
fn ask_from(local: &str, server: SocketAddr, q: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind(format!("{local}:0")).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.send_to(q, server).unwrap();
    let mut buf = vec![0u8; 65535];
    let n = s.recv(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn rcode(m: &[u8]) -> u8 {
    m[3] & 0x0f
}

#[test]
fn access_lists_refuse_or_drop_and_transfers_need_transfer_allow() {
    let ns = bind();
    let lb = Lb::start(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[access]\ndeny = [\"127.0.3.0/24\"]\ntransfer_allow = [\"127.0.4.1\"]\n",
        lb_config(&[ns.addr], "round-robin", "")
    ));
    let q = query_bytes(7, "www.example.test.", RecordType::A);
    // Allowed, denied (REFUSED from lb itself, the question kept), over UDP.
    let ok = ask_from("127.0.0.1", lb.udp(), &q, T).expect("answered");
    assert_eq!(rcode(&ok), 0);
    let refused = ask_from("127.0.3.9", lb.udp(), &q, T).expect("refused, not dropped");
    assert_eq!((rcode(&refused), &refused[..2]), (5, &q[..2]));
    assert_eq!(lb::wire::question(&refused).unwrap().count, 1);
    // A zone transfer: refused by default, even over TCP; allowed to transfer_allow.
    let axfr = QueryBuilder::new(0x1111, "example.test.", AXFR).build();
    let denied = tcp_exchange(lb.tcp(), &axfr, AXFR, T);
    assert_eq!(denied.messages.len(), 1, "one REFUSED message");
    assert_eq!(rcode(&denied.messages[0]), 5);
    let scrape = lb.scrape_until("lb_responses_total{rcode=\"REFUSED\"}", 2.0);
    assert_eq!(
        sample(&scrape, "lb_access_denied_total{reason=\"client\"}"),
        1.0
    );
    assert_eq!(
        sample(&scrape, "lb_access_denied_total{reason=\"transfer\"}"),
        1.0
    );
    assert_eq!(
        sample(&scrape, "lb_responses_total{rcode=\"REFUSED\"}"),
        2.0,
        "{}",
        scrape
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("process") && !l.contains("backend"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // UPDATE and NOTIFY are refused too.
    for opcode in [4, 5] {
        let m = QueryBuilder::new(9, "example.test.", 6)
            .opcode(opcode)
            .build();
        let a = ask_from("127.0.0.1", lb.udp(), &m, T).expect("answered");
        assert_eq!(rcode(&a), 5, "opcode {opcode}");
    }

    // Drop instead of refuse, and an allow list, applied by a reload.
    let text = std::fs::read_to_string(&lb.config).unwrap().replace(
        "[access]\ndeny = [\"127.0.3.0/24\"]",
        "[access]\naction = \"drop\"\nallow = [\"127.0.0.0/24\", \"127.0.4.0/24\"]\ndeny = [\"127.0.3.0/24\"]",
    );
    std::fs::write(&lb.config, text).unwrap();
    let (code, out, err) = lb.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(ask_from("127.0.3.9", lb.udp(), &q, Duration::from_millis(500)).is_none());
    assert!(ask_from("127.0.9.9", lb.udp(), &q, Duration::from_millis(500)).is_none());
    assert_eq!(rcode(&ask_from("127.0.0.1", lb.udp(), &q, T).unwrap()), 0);
    // The secondary named in transfer_allow pulls the zone through lb, over TCP.
    let via = tcp_exchange_from("127.0.4.1", lb.tcp(), &axfr, AXFR, T);
    let direct = tcp_exchange(ns.addr, &axfr, AXFR, T);
    assert!(via.complete, "AXFR through lb for the allowed secondary");
    assert_eq!(via.messages.len(), direct.messages.len());
    assert_eq!(lb.drops("tcp-connection-limit"), 0);
}

/// What one flooding run saw.
#[derive(Debug, Default)]
struct Flood {
    sent: usize,
    bytes_sent: usize,
    full: usize,
    slipped: usize,
    bytes_received: usize,
}

/// The flood of the issue, scaled down for CI: clients on many addresses of 127.0.1.0/24 (one
/// /24) ask for a TXT of about 850 bytes at `qps` for `secs`, while a client on 127.0.2.1 asks
/// the same name 10 times a second. Returns the flood's and the good client's figures.
fn flood(target: SocketAddr, qps: u32, secs: u64) -> (Flood, usize, usize) {
    let q = QueryBuilder::new(0, "medium.example.test.", TXT)
        .edns(1232)
        .build();
    let socks: Vec<UdpSocket> = (1..=50)
        .map(|i| {
            let s = UdpSocket::bind(format!("127.0.1.{i}:0")).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let good = UdpSocket::bind("127.0.2.1:0").unwrap();
    good.set_nonblocking(true).unwrap();
    let mut f = Flood::default();
    let (mut good_sent, mut good_full) = (0usize, 0usize);
    let mut buf = vec![0u8; 4096];
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let mut next = t0;
    let mut next_good = t0;
    let interval = Duration::from_secs_f64(1.0 / f64::from(qps));
    let mut id = 0u16;
    let mut read = |s: &UdpSocket, f: &mut Flood| -> usize {
        let mut full = 0;
        while let Ok(n) = s.recv(&mut buf) {
            f.bytes_received += n;
            let tc = buf[2] & 0x02 != 0;
            let an = u16::from_be_bytes([buf[6], buf[7]]);
            if tc {
                f.slipped += 1;
            } else if an > 0 {
                full += 1;
            }
        }
        full
    };
    while Instant::now() < end {
        let now = Instant::now();
        while next <= now {
            let mut m = q.clone();
            id = id.wrapping_add(1);
            m[..2].copy_from_slice(&id.to_be_bytes());
            let s = &socks[f.sent % socks.len()];
            if s.send_to(&m, target).is_ok() {
                f.sent += 1;
                f.bytes_sent += m.len();
            }
            next += interval;
        }
        if next_good <= now {
            let _ = good.send_to(&q, target);
            good_sent += 1;
            next_good += Duration::from_millis(100);
        }
        for s in &socks {
            f.full += read(s, &mut f);
        }
        let mut g = Flood::default();
        good_full += read(&good, &mut g);
        std::thread::sleep(Duration::from_micros(500));
    }
    std::thread::sleep(Duration::from_millis(500));
    for s in &socks {
        f.full += read(s, &mut f);
    }
    let mut g = Flood::default();
    good_full += read(&good, &mut g);
    (f, good_sent, good_full)
}

#[test]
fn rate_limiting_caps_a_spoofed_flood_and_serves_other_clients() {
    let ns = bind();
    let lb = Lb::start(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[rrl]\nresponses_per_second = 20\nslip = 2\nwindow_secs = 5\n",
        lb_config(&[ns.addr], "round-robin", "")
    ));
    let (f, good_sent, good_full) = flood(lb.udp(), 2000, 3);
    let ratio = f.bytes_received as f64 / f.bytes_sent as f64;
    eprintln!(
        "rrl flood through lb: {f:?}; bytes out/in {ratio:.2}; good client {good_full}/{good_sent}"
    );
    // One second's credit, then limited (BIND with the same settings: 20 full answers).
    assert!(
        (15..=45).contains(&f.full),
        "full answers to the flooding /24: {f:?}"
    );
    assert!(
        f.slipped > f.sent / 4,
        "about half the limited answers slip: {f:?}"
    );
    assert!(ratio <= 1.0, "no amplification: out/in {ratio:.2}");
    assert_eq!(
        good_full, good_sent,
        "the client under the limit gets every answer"
    );
    let scrape = lb.scrape();
    let action = |a: &str| {
        sample(
            &scrape,
            &format!("lb_rrl_responses_total{{action=\"{a}\"}}"),
        )
    };
    assert!(
        action("dropped") > 0.0 && action("slipped") > 0.0,
        "{scrape}"
    );
    assert!(action("sent") >= (f.full + good_full) as f64);
    // TCP is never limited, even for the flooding prefix.
    let q = query_bytes(3, "medium.example.test.", RecordType::TXT);
    let via = tcp_exchange_from("127.0.1.1", lb.tcp(), &q, TXT, T);
    assert!(via.complete && rcode(&via.messages[0]) == 0);
    // The limited prefix was logged once (from the scan, not per packet).
    let t0 = Instant::now();
    while !lb.proc.output.text().contains("rrl: limiting") && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = lb.proc.output.text();
    let lines = log.lines().filter(|l| l.contains("rrl: limiting")).count();
    assert!((1..=2).contains(&lines), "{log}");
    assert!(log.contains("127.0.1.0/24"), "{log}");
    assert!(sample(&scrape, "lb_rrl_limited_prefixes") >= 1.0);
}

#[test]
fn rate_limiting_is_applied_by_a_reload_and_exempts_listed_clients() {
    let ns = bind();
    let lb = Lb::start(&lb_config(&[ns.addr], "round-robin", ""));
    // n messages (opcode `op`) back to back from one address, then the answers that come
    // within 500 ms.
    let count_op = |from: &str, n: u16, op: u8| -> u16 {
        let s = UdpSocket::bind(format!("{from}:0")).unwrap();
        for id in 0..n {
            let q = QueryBuilder::new(id, "www.example.test.", 1)
                .opcode(op)
                .build();
            s.send_to(&q, lb.udp()).unwrap();
        }
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut full = 0;
        while let Ok(n) = s.recv(&mut buf) {
            if n > 12 && buf[2] & 0x02 == 0 {
                full += 1;
            }
        }
        full
    };
    let count = |from: &str, n: u16| count_op(from, n, 0);
    assert_eq!(count("127.0.5.1", 30), 30, "no [rrl]: nothing limited");
    let mut text = std::fs::read_to_string(&lb.config).unwrap();
    text.push_str("\n[rrl]\nresponses_per_second = 5\nslip = 0\nexempt = [\"127.0.6.0/24\"]\n");
    std::fs::write(&lb.config, text).unwrap();
    let (code, out, err) = lb.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let limited = count("127.0.5.1", 30);
    assert!(
        (5..=10).contains(&limited),
        "{limited} full answers of 30 at 5/s"
    );
    assert_eq!(count("127.0.6.1", 30), 30, "exempt");
    // Only answers to queries are limited, as in BIND: NOTIFY and UPDATE (REFUSED by lb's
    // access lists here) all get their answer.
    for op in [4, 5] {
        assert_eq!(count_op("127.0.7.1", 30, op), 30, "opcode {op}");
    }
    // rrl.entries is fixed at start: a restart applies it (exit status 4, not 1).
    let text = std::fs::read_to_string(&lb.config).unwrap() + "entries = 4096\n";
    std::fs::write(&lb.config, text).unwrap();
    let (code, _, err) = lb.ctl(&["reload"]);
    assert_eq!(code, i32::from(lb::ctl::EXIT_RESTART_NEEDED));
    assert!(err.contains("rrl.entries"), "{err}");
}
