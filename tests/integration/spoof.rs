//! The path from lb to its nameservers cannot be spoofed off-path (issue #21): queries to a
//! backend leave from many random source ports, and an answer is accepted only on the socket
//! its query left from, so a forger must guess the port as well as the 16-bit ID.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::dnsmsg::{self, QueryBuilder};
use integration_tests::*;

const A: u16 = 1;
/// The name the fake backend never answers, so a forged answer has all the time it needs.
const MARKER: &str = "marker.example.test.";

/// A backend that answers every query with one A record (192.0.2.1), except the marker name,
/// and records the source port of every query it sees (and of the marker separately).
struct FakeBackend {
    addr: SocketAddr,
    /// A second handle on the backend's socket: what a forger sending "from the backend"
    /// uses (it never reads from it).
    forger: UdpSocket,
    ports: Arc<Mutex<Vec<u16>>>,
    marker_ports: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
}

impl FakeBackend {
    fn start() -> FakeBackend {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = s.local_addr().unwrap();
        let forger = s.try_clone().unwrap();
        let ports = Arc::new(Mutex::new(Vec::new()));
        let marker_ports = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, m, st) = (ports.clone(), marker_ports.clone(), stop.clone());
        std::thread::spawn(move || {
            let marker = dnsmsg::name_wire(MARKER);
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    continue;
                };
                let q = &buf[..n];
                p.lock().unwrap().push(from.port());
                if n >= 12 + marker.len() && q[12..12 + marker.len()].eq_ignore_ascii_case(&marker)
                {
                    m.lock().unwrap().push(from.port());
                    continue;
                }
                let _ = s.send_to(&answer(q, [192, 0, 2, 1]), from);
            }
        });
        FakeBackend {
            addr,
            forger,
            ports,
            marker_ports,
            stop,
        }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The answer to query `q` (first question kept) with one A record.
fn answer(q: &[u8], a: [u8; 4]) -> Vec<u8> {
    let end = lb::wire::question(q).map_or(12, |x| x.end);
    let mut r = q[..end].to_vec();
    r[2] |= 0x84;
    r[3] = 0;
    r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    r.extend_from_slice(&a);
    r
}

/// Asks `n` ordinary names through lb from `c`, one at a time; all must be answered.
fn ask_many(c: &UdpSocket, lb: SocketAddr, n: u16) {
    let mut buf = [0u8; 512];
    for id in 0..n {
        let q = QueryBuilder::new(id, &format!("h{id}.example.test."), A).build();
        c.send_to(&q, lb).unwrap();
        let len = c.recv(&mut buf).expect("an ordinary query is answered");
        assert_eq!(&buf[..2], &id.to_be_bytes());
        assert!(len > 12);
    }
}

/// One attack: the forger learnt the source port of an earlier query (`learnt`), lb then served
/// 1,000 other queries, and a client asks the marker name; the forger sends a forged answer
/// with every ID to the learnt port. Returns whether the client got the forged answer, and the
/// ports the backend saw the marker query arrive from.
fn attack(extra: &str) -> (bool, u16, Vec<u16>) {
    let be = FakeBackend::start();
    let lb = Lb::start(&lb_config(
        &[be.addr],
        "round-robin",
        &format!("timeout_ms = 10000\n{extra}"),
    ));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    ask_many(&client, lb.udp(), 1);
    let learnt = be.ports.lock().unwrap()[0];
    ask_many(&client, lb.udp(), 1000);
    let marker_q = QueryBuilder::new(0x7777, MARKER, A).build();
    client.send_to(&marker_q, lb.udp()).unwrap();
    let t0 = Instant::now();
    while be.marker_ports.lock().unwrap().is_empty() && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Every ID, to the learnt port, from the backend's own address; paced so that lb's socket
    // buffer takes them all (the test measures ports, not who wins a race).
    let to: SocketAddr = ([127, 0, 0, 1], learnt).into();
    let mut forged = answer(&marker_q, [6, 6, 6, 6]);
    for id in 0..=u16::MAX {
        forged[..2].copy_from_slice(&id.to_be_bytes());
        let _ = be.forger.send_to(&forged, to);
        if id % 500 == 499 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut buf = [0u8; 512];
    let got_forged = match client.recv(&mut buf) {
        Ok(n) => buf[..n].ends_with(&[6, 6, 6, 6]),
        Err(_) => false,
    };
    let marker_ports = be.marker_ports.lock().unwrap().clone();
    (got_forged, learnt, marker_ports)
}

#[test]
fn a_forger_who_learnt_a_port_gets_nothing_through_but_would_against_a_fixed_port() {
    // Control: one socket for the process's life, as before: the forger, given the port,
    // guesses the ID and succeeds. Proof that the attack works and the test can fail.
    let (forged, learnt, marker) =
        attack("upstream_sockets = 1\nupstream_socket_queries = 4294967295\n");
    assert_eq!(
        marker,
        vec![learnt],
        "a fixed port: the marker left from the learnt port"
    );
    assert!(
        forged,
        "against a fixed port every ID to it finds the one in flight"
    );

    // With the defaults the learnt port was replaced long before the marker was asked: every
    // forged answer misses. (If the kernel happened to hand the same port to a new socket, the
    // attack is run again: that is a guess that hit, not a flaw.)
    for _ in 0..3 {
        let (forged, learnt, marker) = attack("");
        if marker.contains(&learnt) {
            continue;
        }
        assert!(
            !forged,
            "a forged answer got through on port {learnt} (marker from {marker:?})"
        );
        return;
    }
    panic!("the marker left from the learnt port three times: ports are not being replaced");
}

#[test]
fn ten_thousand_queries_to_one_backend_leave_from_many_ports() {
    let be = FakeBackend::start();
    let lb = Lb::start(&lb_config(&[be.addr], "round-robin", ""));
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // Pipelined: 50 at a time.
    let mut buf = [0u8; 512];
    for round in 0..200u16 {
        for k in 0..50u16 {
            let id = round * 50 + k;
            let q = QueryBuilder::new(id, &format!("h{k}.example.test."), A).build();
            c.send_to(&q, lb.udp()).unwrap();
        }
        for _ in 0..50 {
            c.recv(&mut buf).expect("answered");
        }
    }
    let ports: HashSet<u16> = be.ports.lock().unwrap().iter().copied().collect();
    let seen = be.ports.lock().unwrap().len();
    eprintln!(
        "10,000 queries to one backend came from {} source ports",
        ports.len()
    );
    assert_eq!(seen, 10_000);
    assert!(ports.len() >= 64, "{} distinct source ports", ports.len());
    assert_eq!(lb.drops("backend-timeout"), 0);
}
