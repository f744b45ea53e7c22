//! Health checks against real BIND: detection and recovery times, REFUSED never up, zone loss,
//! the three all-down behaviours.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use integration_tests::*;

const T: Duration = Duration::from_secs(3);
const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 200;
const RISE: u64 = 2;
const FALL: u64 = 2;

fn health(extra: &str) -> String {
    format!(
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n{extra}"
    )
}

fn no_zone() -> ZoneSpec {
    ZoneSpec {
        serial: None,
        tag: "r".into(),
    }
}

#[test]
fn a_stopped_backend_is_marked_down_in_time_and_comes_back() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let mut b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr, b.addr], "round-robin", ""),
        health("tcp = true\n")
    ));
    assert_eq!(lb.wait_state(b.addr, "up", T).map(|_| ()), Some(()));
    assert_eq!(lb.backend_state(a.addr).unwrap().0, "up");

    let qps = 1000;
    let load = LoadClient::start(lb.udp(), qps);
    std::thread::sleep(Duration::from_millis(500));
    b.stop();
    let stopped_at = load.started.elapsed();
    let detect = lb.wait_state(b.addr, "down", T).expect("marked down");
    let detected_at = load.started.elapsed();
    let window = Duration::from_millis(INTERVAL_MS * FALL + TIMEOUT_MS);
    assert!(
        detect <= window + Duration::from_millis(300),
        "down after {detect:?}, window {window:?}"
    );
    let (_, reason) = lb.backend_state(b.addr).unwrap();
    assert!(reason.is_some(), "the reason is kept");
    std::thread::sleep(Duration::from_millis(500));
    b.restart();
    let recover = lb.wait_state(b.addr, "up", T).expect("back up");
    let rise_window = Duration::from_millis(INTERVAL_MS * RISE + TIMEOUT_MS);
    assert!(
        recover <= rise_window + Duration::from_millis(300),
        "up after {recover:?}, window {rise_window:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    let lost_after_detection = report
        .answers
        .iter()
        .filter(|(sent, serial)| {
            *sent > detected_at + Duration::from_millis(50) && serial.is_none()
        })
        .count();
    eprintln!(
        "health: detection {detect:?} (window {window:?}), recovery {recover:?}; at {qps} qps sent {}, lost {} (all sent between {stopped_at:?} and {detected_at:?}), lost after detection {lost_after_detection}",
        report.sent,
        report.lost()
    );
    assert_eq!(
        lost_after_detection, 0,
        "the other backend answers everything once b is down"
    );
    let bound = (qps as f64 * (window.as_secs_f64() + 0.3)) as usize;
    assert!(
        report.lost() <= bound,
        "lost {} > bound {bound}",
        report.lost()
    );
}

#[test]
fn refused_backend_is_never_up_and_zone_loss_marks_down() {
    let mut a = Named::start(ZoneSpec::new(1, "a"));
    let r = Named::start(no_zone());
    // r first: first-available would prefer it if it were ever up.
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[r.addr, a.addr], "first-available", ""),
        health("")
    ));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        let (state, reason) = lb.backend_state(r.addr).unwrap();
        assert_eq!(state, "down");
        assert_eq!(reason.as_deref(), Some("refused"));
        let m = udp_query(lb.udp(), "who.example.test.", RecordType::TXT, T).unwrap();
        assert_eq!(txt(&m).as_deref(), Some("a"));
        std::thread::sleep(Duration::from_millis(50));
    }
    // a loses the zone: it answers REFUSED from now on and goes down.
    a.set_zone(no_zone());
    let took = lb
        .wait_state(a.addr, "down", T)
        .expect("zone loss detected");
    assert_eq!(
        lb.backend_state(a.addr).unwrap().1.as_deref(),
        Some("refused")
    );
    eprintln!("zone loss detected after {took:?}");
}

#[test]
fn all_down_behaviours() {
    let r = Named::start(no_zone());

    // fail-open (default): queries still go to the backend; BIND's REFUSED comes back.
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[r.addr], "round-robin", ""),
        health("")
    ));
    let m = udp_query(lb.udp(), "www.example.test.", RecordType::A, T).expect("fail-open answers");
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let st = lb.status();
    assert!(
        st.all_down.iter().any(|(k, n)| k == "fail-open" && *n >= 1),
        "{:?}",
        st.all_down
    );
    drop(lb);

    // servfail: the proxy answers SERVFAIL itself, over UDP and TCP, with the client's ID.
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[r.addr], "round-robin", ""),
        health("all_down = \"servfail\"\n")
    ));
    let m = udp_query(lb.udp(), "www.example.test.", RecordType::A, T).expect("servfail answer");
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.queries[0].name().to_ascii(), "www.example.test.");
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    tcp_write(
        &mut s,
        &query_bytes(321, "www.example.test.", RecordType::AAAA),
    );
    let m = Message::from_vec(&tcp_read(&mut s).unwrap()).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (321, ResponseCode::ServFail)
    );
    let st = lb.status();
    assert!(
        st.all_down.iter().any(|(k, n)| k == "servfail" && *n >= 2),
        "{:?}",
        st.all_down
    );
    drop(lb);

    // drop: no answer, counted.
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[r.addr], "round-robin", ""),
        health("all_down = \"drop\"\n")
    ));
    assert!(udp_query(
        lb.udp(),
        "www.example.test.",
        RecordType::A,
        Duration::from_millis(500)
    )
    .is_none());
    assert!(lb.drops("no-backend") >= 1);
    let st = lb.status();
    assert!(
        st.all_down.iter().any(|(k, n)| k == "drop" && *n >= 1),
        "{:?}",
        st.all_down
    );
}

/// A UDP relay in front of a real server that can be told to go silent: it keeps its socket
/// open (so no ICMP "port unreachable" tells the proxy), it just stops answering.
fn silenceable_relay(
    real: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    let silent = std::sync::Arc::new(AtomicBool::new(false));
    let flag = silent.clone();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if flag.load(Ordering::Relaxed) {
                continue;
            }
            if let Some(r) = udp_exchange(real, &buf[..n], Duration::from_secs(1)) {
                let _ = s.send_to(&r, from);
            }
        }
    });
    (addr, silent)
}

#[test]
fn passive_timeouts_mark_a_silent_backend_down_before_the_probe_would() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let (relay, silent) = silenceable_relay(b.addr);
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr, relay], "round-robin", "timeout_ms = 300\n"),
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 60000\ntimeout_ms = 300\npassive_timeouts = 5\n"
    ));
    assert!(lb.wait_state(relay, "up", T).is_some());
    let load = LoadClient::start(lb.udp(), 500);
    std::thread::sleep(Duration::from_millis(200));
    silent.store(true, std::sync::atomic::Ordering::Relaxed);
    let took = lb
        .wait_state(relay, "down", T)
        .expect("passively marked down");
    let _ = load.finish();
    assert_eq!(
        lb.backend_state(relay).unwrap().1.as_deref(),
        Some("passive-timeouts")
    );
    eprintln!("passive detection after {took:?} (probe interval 60 s)");
}

#[test]
fn a_killed_backend_is_detected_from_port_unreachable_and_its_queries_re_sent() {
    // Killing a backend closes its port: the kernel reports "port unreachable" on the proxy's
    // connected upstream socket, the backend goes down at once and its in-flight queries are
    // re-sent to the others, so the client loses nothing.
    let a = Named::start(ZoneSpec::new(1, "a"));
    let mut b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr, b.addr], "round-robin", ""),
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 60000\n"
    ));
    assert!(lb.wait_state(b.addr, "up", T).is_some());
    let load = LoadClient::start(lb.udp(), 1000);
    std::thread::sleep(Duration::from_millis(300));
    b.stop();
    let took = lb.wait_state(b.addr, "down", T).expect("marked down");
    std::thread::sleep(Duration::from_millis(300));
    let r = load.finish();
    eprintln!(
        "port unreachable: down after {took:?}; sent {}, lost {}",
        r.sent,
        r.lost()
    );
    assert_eq!(
        lb.backend_state(b.addr).unwrap().1.as_deref(),
        Some("network-error")
    );
    assert_eq!(r.lost(), 0);
}

/// The local ends of the connected UDP sockets on this host whose peer is `remote`
/// (`/proc/net/udp`): a proxy's upstream sockets to that backend.
fn udp_sockets_connected_to(remote: std::net::SocketAddr) -> Vec<std::net::SocketAddrV4> {
    let hex = |a: &str| -> Option<std::net::SocketAddrV4> {
        let (ip, port) = a.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        // The address is in network order read as a little-endian word.
        Some(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::from(ip.swap_bytes()),
            port,
        ))
    };
    let text = std::fs::read_to_string("/proc/net/udp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, rem) = (hex(f.get(1)?)?, hex(f.get(2)?)?);
            (std::net::SocketAddr::V4(rem) == remote).then_some(local)
        })
        .collect()
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends, from a raw socket, the ICMP "port unreachable" the kernel would send if `to` had
/// been closed when `from` sent it a UDP datagram: what an off-path attacker forges (it needs
/// the addresses and ports only). Delivered to the socket connected from `from` to `to`.
fn forge_port_unreachable(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4) {
    // The offending datagram's IPv4 header and the first 8 bytes of its UDP header.
    let mut inner = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 17, 0, 0];
    inner.extend_from_slice(&from.ip().octets());
    inner.extend_from_slice(&to.ip().octets());
    let c = checksum(&inner);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    inner.extend_from_slice(&from.port().to_be_bytes());
    inner.extend_from_slice(&to.port().to_be_bytes());
    inner.extend_from_slice(&[0, 20, 0, 0]);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&inner);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::ICMPV4),
    )
    .expect("a raw socket (the tests run as root)");
    let dst = std::net::SocketAddr::from((*from.ip(), 0));
    raw.send_to(&icmp, &dst.into()).unwrap();
}

#[test]
fn a_forged_port_unreachable_asks_for_a_probe_and_the_backend_stays_up() {
    // An off-path attacker who knows (or guesses) the proxy's upstream ports forges ICMP "port
    // unreachable" for each: the backend becomes suspect and is probed at once, the probe
    // passes, and it stays up. (Before, one forged ICMP took a backend down until its next
    // probes brought it back: with a 60 s interval, a minute per forgery.)
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr, b.addr], "round-robin", ""),
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 60000\n"
    ));
    assert!(lb.wait_state(b.addr, "up", T).is_some());
    assert!(lb.answers_udp());
    // The forgery works here: a socket of this test connected to the backend gets the error.
    let own = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    own.connect(b.addr).unwrap();
    let std::net::SocketAddr::V4(own_addr) = own.local_addr().unwrap() else {
        unreachable!()
    };
    let std::net::SocketAddr::V4(backend) = b.addr else {
        unreachable!()
    };
    forge_port_unreachable(own_addr, backend);
    own.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let err = own
        .recv(&mut [0u8; 16])
        .expect_err("the forged ICMP arrived");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    drop(own);

    let sockets = udp_sockets_connected_to(b.addr);
    assert!(!sockets.is_empty(), "lb's upstream sockets to {}", b.addr);
    for round in 0..5 {
        for s in &sockets {
            forge_port_unreachable(*s, backend);
        }
        // Never down, while its probes pass.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(300) {
            assert_eq!(
                lb.backend_state(b.addr).unwrap().0,
                "up",
                "round {round}: a forged ICMP took the backend down"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let reports = lb
        .status()
        .backends
        .iter()
        .find(|x| x.address == b.addr.to_string())
        .unwrap()
        .port_unreachable;
    assert!(reports >= 1, "lb saw the forged ICMP ({reports} reports)");
    let hits = (0..20)
        .filter(|i| {
            udp_query(
                lb.udp(),
                &format!("q{i}.who.example.test."),
                RecordType::TXT,
                T,
            )
            .is_some()
        })
        .count();
    assert_eq!(hits, 20, "both backends answer");
}
