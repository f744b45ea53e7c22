//! TCP client connections (issue #26): a connection whose in-flight permits are all held by
//! queries handed back after their backend connection broke still routes them and closes;
//! what one client network, one slow frame, one long-lived connection and one slow reader may
//! hold is bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use integration_tests::*;

/// A nameserver that accepts TCP connections and reads queries (counting them) but never
/// answers, until `stop` is set: then it closes every connection and stops listening, as a
/// nameserver that is shut down (or restarted) does.
fn silent_tcp_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (read2, stop2) = (read.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
        let t = Instant::now();
        while !stop2.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(60) {
            if let Ok((s, _)) = listener.accept() {
                s.set_nonblocking(true).unwrap();
                conns.push((s, Vec::new()));
            }
            let mut chunk = [0u8; 4096];
            for (s, buf) in conns.iter_mut() {
                while let Ok(n @ 1..) = s.read(&mut chunk) {
                    buf.extend_from_slice(&chunk[..n]);
                }
                // Count whole frames.
                while buf.len() >= 2 {
                    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                    if buf.len() < 2 + len {
                        break;
                    }
                    buf.drain(..2 + len);
                    read2.fetch_add(1, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for (s, _) in conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    });
    (addr, read, stop)
}

/// Waits until lb reports no client TCP connection open; returns whether it did within 10 s.
fn connections_close(lb: &Lb) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if lb.status().tcp_connections_open == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `n` queries for `host{i % 50}.example.test. A`, IDs from `first_id`, framed back to back.
fn pipelined(n: usize, first_id: u16) -> Vec<u8> {
    let mut all = Vec::new();
    for i in 0..n {
        let q = query_bytes(
            first_id + i as u16,
            &format!("host{}.example.test.", i % 50),
            RecordType::A,
        );
        all.extend_from_slice(&(q.len() as u16).to_be_bytes());
        all.extend_from_slice(&q);
    }
    all
}

/// Reads answers until `n` arrived, the connection closed, or `limit` passed; returns their IDs
/// and whether the connection was seen closed (EOF or reset, not a timeout).
fn read_answers(s: &mut TcpStream, n: usize, limit: Duration) -> (Vec<u16>, bool) {
    let end = Instant::now() + limit;
    let mut ids = Vec::new();
    while ids.len() < n {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (ids, false);
        }
        s.set_read_timeout(Some(left)).unwrap();
        let mut len = [0u8; 2];
        if let Err(e) = s.read_exact(&mut len) {
            let closed = !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
            return (ids, closed);
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        if let Err(e) = s.read_exact(&mut msg) {
            let closed = !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
            return (ids, closed);
        }
        ids.push(Message::from_vec(&msg).unwrap().metadata.id);
    }
    (ids, false)
}

/// True if the peer closed the connection (EOF or reset) within `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// A TCP connection from `local` (any port) to `server`.
fn connect_from(local: &str, server: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{local}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock.connect_timeout(&server.into(), Duration::from_secs(2))
        .unwrap();
    sock.into()
}

/// Issue #26, item 2: 150 pipelined queries on one connection (more than its 100 in-flight
/// permits) go to a backend whose connections then break (set-backends, then the old
/// nameserver stops). The 100 queries handed back hold every permit while the reader waits for
/// one for query 101; they must still be routed again (to the new backend), and the rest after
/// them, so the client gets every answer and the connection's slot is freed when it leaves.
/// Before the fix the reader awaited a permit outside its `select!`: the connection hung for
/// good, deaf to its timeouts and to the client closing.
#[test]
fn tcp_queries_handed_back_with_every_permit_are_routed_again_and_the_slot_is_freed() {
    let ns = Named::start(ZoneSpec::new(1, "new"));
    let (old, read, stop) = silent_tcp_backend();
    let lb = Lb::start(&lb_config(&[old], "first-available", "timeout_ms = 3000\n"));
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.write_all(&pipelined(150, 1000)).unwrap();
    // The reader takes as many as it has permits (100) and waits for the 101st.
    let t = Instant::now();
    while read.load(Ordering::Relaxed) < 100 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        read.load(Ordering::Relaxed),
        100,
        "the old backend holds a connection's worth of queries"
    );
    let (code, out, err) = lb.ctl(&["set-backends", &ns.addr.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    stop.store(true, Ordering::Relaxed);

    // Within the timeouts (query timeout 3 s): every answer, each once.
    let (mut ids, closed) = read_answers(&mut s, 150, Duration::from_secs(10));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        150,
        "answers {} (connection closed: {closed}); status {:?}",
        ids.len(),
        lb.status().drops
    );
    assert!(ids.iter().all(|id| (1000..1150).contains(id)));
    drop(s);
    assert!(
        connections_close(&lb),
        "the connection's slot is freed once the client leaves"
    );
}

/// Item 3: the connection limit counts client networks (an IPv4 /24 by default), not single
/// addresses: with 3 allowed, a fourth connection from another address of the same /24 is
/// refused (`tcp-prefix-limit`) while one from another /24 is served. The old name of the key,
/// `max_connections_per_ip`, sets it, with a warning naming the file, the old and the new key
/// from `lb check`, in the log at start and in `lb ctl reload`'s answer (issue 28, item 9).
#[test]
fn tcp_connections_are_limited_per_client_network() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&format!(
        "{}\n[tcp]\nmax_connections_per_ip = 3\n",
        lb_config(&[ns.addr], "first-available", "")
    ));
    let ask = |s: &mut TcpStream, id: u16| -> bool {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        if s.write_all(&{
            let q = query_bytes(id, "www.example.test.", RecordType::A);
            let mut f = (q.len() as u16).to_be_bytes().to_vec();
            f.extend_from_slice(&q);
            f
        })
        .is_err()
        {
            return false;
        }
        tcp_read(s).is_some_and(|m| Message::from_vec(&m).unwrap().metadata.id == id)
    };
    let mut held: Vec<TcpStream> = ["127.0.0.1", "127.0.0.1", "127.0.0.3"]
        .iter()
        .map(|a| connect_from(a, lb.tcp()))
        .collect();
    for (i, s) in held.iter_mut().enumerate() {
        assert!(ask(s, i as u16), "connection {i} of the /24 is served");
    }
    let mut fourth = connect_from("127.0.0.4", lb.tcp());
    assert!(
        !ask(&mut fourth, 9),
        "a fourth from the same /24 is refused"
    );
    assert_eq!(lb.drops("tcp-prefix-limit"), 1);
    let mut other = connect_from("127.0.1.1", lb.tcp());
    assert!(ask(&mut other, 10), "another /24 is served");
    assert_eq!(lb.drops("tcp-connection-limit"), 0);

    let warning = format!(
        "config file {}: key `tcp.max_connections_per_ip` is deprecated, renamed \
         `tcp.max_connections_per_prefix`",
        lb.config.display()
    );
    let log = lb.proc.output.text();
    assert!(log.contains(&warning), "start: {warning:?} not in:\n{log}");
    let (code, out, err) = lb.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&warning), "reload: {warning:?} not in {out:?}");
    let check = std::process::Command::new(bin("lb"))
        .args(["check", "--config"])
        .arg(&lb.config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{out}");
    assert!(out.contains(&format!("warning: {warning}")), "check: {out}");
}

/// Item 3: a frame must be whole within `read_timeout_ms` of its first byte. A client that
/// announces 60 bytes and sends one every 200 ms (each byte well within the timeout of the
/// last) is closed about 1 s after it started, counted as `tcp-read-timeout`; before, every
/// byte restarted the timeout and the frame could take 12 s.
#[test]
fn tcp_a_frame_must_be_whole_within_the_read_timeout_of_its_first_byte() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&format!(
        "{}\n[tcp]\nread_timeout_ms = 1000\nidle_timeout_ms = 10000\n",
        lb_config(&[ns.addr], "first-available", "")
    ));
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.write_all(&[0, 60]).unwrap();
    let t = Instant::now();
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(6) {
        if s.write_all(&[0]).is_err() || closed_within(&mut s, Duration::from_millis(200)) {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a frame trickled one byte at a time outlived the read timeout"
    );
    assert_eq!(lb.drops("tcp-read-timeout"), 1);
    assert!(connections_close(&lb));
}

/// Item 3, `max_queries_per_connection` (dnsdist's setMaxTCPQueriesPerConnection): after 5
/// queries the connection reads no more, answers those 5, and closes; the client sees every
/// answer and then the close (`tcp-max-queries`), never a query half served.
#[test]
fn tcp_a_connection_closes_cleanly_after_its_maximum_queries() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&format!(
        "{}\n[tcp]\nmax_queries_per_connection = 5\n",
        lb_config(&[ns.addr], "first-available", "")
    ));
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.write_all(&pipelined(8, 100)).unwrap();
    let (mut ids, closed) = read_answers(&mut s, 8, Duration::from_secs(5));
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![100, 101, 102, 103, 104],
        "the first 5 are answered"
    );
    assert!(closed, "then the connection closes");
    assert_eq!(lb.drops("tcp-max-queries"), 1);
    // A new connection is served as usual.
    let m = tcp_query(lb.tcp(), "www.example.test.", RecordType::A).expect("served");
    assert_eq!(m.answers.len(), 1);
}

/// Item 3, `max_connection_age_ms` (dnsdist's setMaxTCPConnectionDuration): a client querying
/// every 100 ms, well within the idle timeout, is closed once the connection is 1 s old
/// (`tcp-max-age`); each query it got in before is answered.
#[test]
fn tcp_a_connection_closes_at_its_maximum_age() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&format!(
        "{}\n[tcp]\nmax_connection_age_ms = 1000\n",
        lb_config(&[ns.addr], "first-available", "")
    ));
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    let t = Instant::now();
    let mut answered = 0;
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(6) {
        let q = query_bytes(answered, "www.example.test.", RecordType::A);
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(&q);
        if s.write_all(&f).is_err() {
            closed = true;
            break;
        }
        let (ids, eof) = read_answers(&mut s, 1, Duration::from_secs(3));
        if eof {
            closed = true;
            break;
        }
        assert_eq!(ids, vec![answered], "a query read is answered");
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed, "the connection outlived its maximum age");
    assert!(answered >= 3, "answered {answered} before the close");
    assert_eq!(lb.drops("tcp-max-age"), 1);
}

fn vm_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// Item 3, the answer queue bound: slow readers (a tiny receive window, never reading) each
/// pipeline 1,000 queries for `big.example.test. TXT` (about 1.6 KB an answer). With 1,000
/// queries in flight allowed per connection, nothing but the byte budgets stops lb from
/// holding 1.6 MB of answers per connection; with them, the answers waiting never exceed
/// `max_queued_bytes` (the gauge `lb_tcp_queued_answer_bytes`), lb's peak RSS grows by far
/// less than the answers asked for, the slow readers are cut (`tcp-answer-queue-full`), and a
/// client that reads its answers is served throughout.
#[test]
fn tcp_slow_readers_of_large_answers_cannot_make_lb_buffer_without_bound() {
    const SLOW: usize = 8;
    const DEPTH: usize = 1000;
    const TOTAL: usize = 512 * 1024;
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&format!(
        "{}\n[tcp]\nmax_in_flight_per_connection = {DEPTH}\nbackend_max_in_flight = 2048\nmax_queued_per_connection_bytes = 131072\nmax_queued_bytes = {TOTAL}\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        lb_config(&[ns.addr], "first-available", "")
    ));
    let pid = lb.proc.pid();
    // Warm up: pools open, one big answer relayed.
    let m = tcp_query(lb.tcp(), "big.example.test.", RecordType::TXT).expect("big answer");
    assert!(txt(&m).is_some());
    let rss_before = vm_kb(pid, "VmHWM:");

    let stop = Arc::new(AtomicBool::new(false));
    let target = lb.tcp();
    let stop2 = stop.clone();
    let attack = std::thread::spawn(move || {
        let mut all = Vec::new();
        for i in 0..DEPTH {
            let q = query_bytes(i as u16, "big.example.test.", RecordType::TXT);
            all.extend_from_slice(&(q.len() as u16).to_be_bytes());
            all.extend_from_slice(&q);
        }
        let mut held = Vec::new();
        for _ in 0..SLOW {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // A small window and small segments (with loopback's 64 KiB segments lb's kernel
            // would buffer megabytes of answers for each connection).
            sock.set_recv_buffer_size(4096).unwrap();
            sock.set_tcp_mss(536).unwrap();
            sock.bind(&SocketAddr::from(([127, 0, 0, 7], 0)).into())
                .unwrap();
            sock.connect(&target.into()).unwrap();
            let mut s: TcpStream = sock.into();
            s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            let _ = s.write_all(&all);
            held.push(s);
        }
        // Never read.
        while !stop2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(held);
    });

    // A client that reads its answers, meanwhile; the gauge sampled as it goes.
    let mut peak_queued = 0f64;
    let (mut asked, mut served) = (0u32, 0u32);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        asked += 1;
        if tcp_query(lb.tcp(), "www.example.test.", RecordType::A)
            .is_some_and(|m| m.answers.len() == 1)
        {
            served += 1;
        }
        let q = sample(&lb.scrape(), "lb_tcp_queued_answer_bytes");
        peak_queued = peak_queued.max(q);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    attack.join().unwrap();
    let rss_after = vm_kb(pid, "VmHWM:");
    eprintln!(
        "slow readers: good client {served}/{asked}, queued answers peak {peak_queued} bytes, peak RSS {rss_before} -> {rss_after} KiB, drops {:?}, responses {}",
        lb.status().drops, lb.status().responses
    );
    assert!(
        peak_queued <= TOTAL as f64,
        "queued answers {peak_queued} over max_queued_bytes"
    );
    assert!(
        lb.drops("tcp-answer-queue-full") > 0,
        "slow readers are cut"
    );
    assert!(
        served as f64 >= 0.9 * asked as f64,
        "a client that reads is served: {served}/{asked}"
    );
    // 8 connections × 1,000 answers of 1.6 KB is 12.8 MB asked for, and the old code grew by
    // about 16 MiB here; the budget is 512 KiB, and the 8,000 queries in flight take about
    // 6 MiB.
    assert!(
        rss_after - rss_before < 9 * 1024,
        "peak RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert!(connections_close(&lb));
    assert_eq!(
        sample(&lb.scrape(), "lb_tcp_queued_answer_bytes"),
        0.0,
        "every queued byte is given back"
    );
}
