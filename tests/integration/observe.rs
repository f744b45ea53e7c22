//! Observability and supervision: Prometheus metrics checked by promtool and by counting,
//! systemd socket activation, READY/WATCHDOG/STOPPING notifications, graceful SIGTERM.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use integration_tests::*;

const T: Duration = Duration::from_secs(3);

fn with_metrics(cfg: String) -> String {
    format!("{cfg}\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
}

#[test]
fn metrics_pass_promtool_and_count_exactly() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&with_metrics(lb_config(
        &[a.addr, b.addr],
        "round-robin",
        "",
    )));
    // Warm up so both backends have series with data.
    for _ in 0..4 {
        udp_query(lb.udp(), "www.example.test.", RecordType::A, T).unwrap();
    }
    // A worker counts an answer after sending it: let the last warm-up count land before the
    // baseline, as the final scrape below waits too.
    std::thread::sleep(Duration::from_millis(100));
    let before = lb.scrape();
    // promtool (Debian `prometheus`) lints the exposition format.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(before.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{before}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for family in [
        "lb_queries_total",
        "lb_responses_total",
        "lb_dropped_total",
        "lb_dropped_packets_total",
        "lb_dropped_connections_total",
        "lb_backend_queries_total",
        "lb_backend_answers_total",
        "lb_backend_timeouts_total",
        "lb_backend_answer_duration_seconds_bucket",
        "lb_backend_in_flight",
        "lb_backend_up",
        "lb_backend_health_check_failures_total",
        "lb_backend_set_generation",
        "lb_backend_set_swaps_total",
        "lb_tcp_connections_open",
        "lb_tcp_connections_total",
        "lb_build_info",
        "lb_udp_batches_total",
        "lb_udp_batch_datagrams_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(before.contains(family), "missing {family}");
    }

    // Traffic while scraping: 40 UDP + 10 TCP good queries, 5 NXDOMAIN, 3 short datagrams.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..40 {
        udp_query(lb.udp(), "www.example.test.", RecordType::A, T).unwrap();
        let _ = lb.scrape();
    }
    for _ in 0..5 {
        udp_query(lb.udp(), "nx.example.test.", RecordType::A, T).unwrap();
    }
    for _ in 0..3 {
        c.send_to(&[1, 2], lb.udp()).unwrap();
    }
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    for i in 0..10 {
        tcp_write(&mut s, &query_bytes(i, "www.example.test.", RecordType::A));
        tcp_read(&mut s).unwrap();
    }
    drop(s);
    std::thread::sleep(Duration::from_millis(100));
    let after = lb.scrape();
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta("lb_queries_total{protocol=\"udp\"}"), 48.0);
    assert_eq!(delta("lb_queries_total{protocol=\"tcp\"}"), 10.0);
    assert_eq!(delta("lb_responses_total{rcode=\"NOERROR\"}"), 50.0);
    assert_eq!(delta("lb_responses_total{rcode=\"NXDOMAIN\"}"), 5.0);
    assert_eq!(
        delta("lb_dropped_packets_total{reason=\"short-header\"}"),
        3.0
    );
    // The deprecated family still counts every drop (one more release).
    assert_eq!(delta("lb_dropped_total{reason=\"short-header\"}"), 3.0);
    let answers = |scrape: &str| {
        sample(
            scrape,
            &format!("lb_backend_answers_total{{backend=\"{}\"}}", a.addr),
        ) + sample(
            scrape,
            &format!("lb_backend_answers_total{{backend=\"{}\"}}", b.addr),
        )
    };
    assert_eq!(answers(&after) - answers(&before), 55.0);
    assert_eq!(delta("lb_tcp_connections_total"), 1.0);
    assert_eq!(
        sample(&after, &format!("lb_backend_up{{backend=\"{}\"}}", a.addr)),
        1.0
    );
    let count = |scrape: &str| {
        sample(
            scrape,
            &format!(
                "lb_backend_answer_duration_seconds_count{{backend=\"{}\"}}",
                a.addr
            ),
        ) + sample(
            scrape,
            &format!(
                "lb_backend_answer_duration_seconds_count{{backend=\"{}\"}}",
                b.addr
            ),
        )
    };
    assert_eq!(count(&after) - count(&before), 55.0);

    // A swap bumps generation and swaps; the removed backend's series disappear once drained.
    let (code, _, _) = lb.ctl(&["set-backends", &a.addr.to_string()]);
    assert_eq!(code, 0);
    let after_swap = lb.scrape();
    assert_eq!(sample(&after_swap, "lb_backend_set_generation"), 2.0);
    assert_eq!(sample(&after_swap, "lb_backend_set_swaps_total"), 1.0);
    assert!(
        !after_swap.contains(&format!("backend=\"{}\"", b.addr)),
        "removed backend still exported"
    );
    let (status, body) = http_get(lb.metrics.unwrap(), "/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(lb.metrics.unwrap(), "/nope").0, 404);
}

#[test]
fn socket_activation_and_sd_notify() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let dir = TempDir::new("sd");
    // Sockets created by "systemd" (the test), on ports the config does not mention.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let cfg = dir.path().join("lb.toml");
    std::fs::write(&cfg, lb_config(&[a.addr], "round-robin", "")).unwrap();
    let mut p = spawn_activated(
        &cfg,
        &[udp.as_raw_fd(), tcp.as_raw_fd()],
        &[
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            ("WATCHDOG_USEC", "200000".into()),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    let end = Instant::now() + Duration::from_secs(5);
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) && Instant::now() < end {
        if let Ok(n) = notify.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    assert!(seen.contains("READY=1"), "{seen}");
    assert!(seen.contains("WATCHDOG=1"), "{seen}");
    // The passed sockets serve, and [listen]'s port-0 addresses were not bound instead.
    assert!(p
        .output
        .text()
        .contains(&format!("listening for udp on {udp_addr}")));
    let m =
        udp_query(udp_addr, "www.example.test.", RecordType::A, T).expect("udp via passed socket");
    assert_eq!(m.answers.len(), 1);
    let m = tcp_query(tcp_addr, "www.example.test.", RecordType::A).expect("tcp via passed socket");
    assert_eq!(m.answers.len(), 1);
    // SIGTERM: STOPPING=1, exit 0.
    p.signal("TERM");
    assert_eq!(p.wait_exit(T), Some(0), "{}", p.output.text());
    let mut stopping = false;
    while let Ok(n) = notify.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping);
    // The sockets outlive the process, as with lb.socket: a queued query waits for the next one.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.send_to(
        &query_bytes(4, "www.example.test.", RecordType::A),
        udp_addr,
    )
    .unwrap();
    let mut p2 = spawn_activated(&cfg, &[udp.as_raw_fd(), tcp.as_raw_fd()], &[]);
    c.set_read_timeout(Some(T)).unwrap();
    let mut b2 = [0u8; 512];
    let (n, _) = c
        .recv_from(&mut b2)
        .expect("the query queued during the restart is answered");
    assert!(n > 12 && b2[0..2] == [0, 4]);
    p2.kill();
}

/// "systemd"'s UDP socket as lb.socket makes it (`ReusePort=yes`), on a free loopback port.
fn systemd_udp_socket() -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    s.into()
}

/// How many of `n` datagrams, each from a new source port, a socket of the test that joins
/// the `SO_REUSEPORT` group at `addr` receives: some when the kernel spreads datagrams over the
/// group, none while a stop steered them to its first member.
fn share_of_a_new_member(addr: std::net::SocketAddr, n: usize) -> usize {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    let s: UdpSocket = s.into();
    for _ in 0..n {
        // Not DNS: lb counts them as dropped.
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"x", addr)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    let mut got = 0;
    while s.recv(&mut buf).is_ok() {
        got += 1;
    }
    got
}

/// Under socket activation each UDP worker reads a socket of its own, as when lb binds
/// [listen] itself: systemd's and, next to it in one SO_REUSEPORT group, one lb binds per other
/// worker, all with [udp] recv_buffer_bytes. A query queued in systemd's socket before lb starts
/// is answered, and a restart under steady load loses nothing: the stopping lb steers new
/// queries to systemd's socket, which the next one reads. (Half the queries go to a backend that
/// answers after 300 ms, so the stopping lb waits that long for them: long enough for queries
/// arriving meanwhile in its own sockets to be lost, were they not steered.)
#[test]
fn socket_activation_gives_every_worker_its_own_socket_and_restarts_lose_nothing() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let slow = delayed_echo(Duration::from_millis(300));
    let dir = TempDir::new("sd-group");
    let udp = systemd_udp_socket();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let cfg = dir.path().join("lb.toml");
    std::fs::write(
        &cfg,
        lb_config(
            &[a.addr, slow],
            "round-robin",
            "[udp]\nrecv_buffer_bytes = 1000000\n",
        )
        .replace("workers = 2", "workers = 3"),
    )
    .unwrap();
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.send_to(&query_bytes(7, "www.example.test.", RecordType::A), addr)
        .unwrap();
    let mut p = spawn_activated(&cfg, &[udp.as_raw_fd(), tcp.as_raw_fd()], &[]);
    let mut buf = [0u8; 512];
    let (n, _) = c
        .recv_from(&mut buf)
        .expect("the query queued before lb started is answered");
    assert!(n > 12 && buf[0..2] == [0, 7]);

    let socks = udp_sockets_bound_to(p.pid(), addr);
    assert_eq!(socks.len(), 3, "one socket per worker\n{}", p.output.text());
    assert!(
        socks.iter().any(|s| socket_inode(s) == socket_inode(&udp)),
        "systemd's socket is one of them"
    );
    for s in &socks {
        let s = socket2::SockRef::from(s);
        assert!(s.reuse_port().unwrap());
        // Linux reports twice the size set.
        assert_eq!(s.recv_buffer_size().unwrap(), 2_000_000);
    }
    assert!(p.output.text().contains(&format!(
        "udp {addr}: one SO_REUSEPORT socket per worker (1 passed by systemd, 2 bound by lb)"
    )));
    assert!(share_of_a_new_member(addr, 64) > 0, "spread over the group");
    // Copies held here would keep lb's sockets in the group after it exits.
    drop(socks);

    let load = LoadClient::start(addr, 400);
    std::thread::sleep(Duration::from_millis(400));
    p.signal("TERM");
    assert_eq!(p.wait_exit(T), Some(0), "{}", p.output.text());
    // Down for a while: queries wait in systemd's socket.
    std::thread::sleep(Duration::from_millis(300));
    let mut p2 = spawn_activated(&cfg, &[udp.as_raw_fd(), tcp.as_raw_fd()], &[]);
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish();
    eprintln!(
        "restart under load: sent {}, lost {}",
        report.sent,
        report.lost()
    );
    assert!(report.sent > 300);
    assert_eq!(report.lost(), 0, "no query lost across the restart");
    assert!(p
        .output
        .text()
        .contains("new udp queries wait in systemd's sockets for the next lb"));
    // The new lb completed the group again and undid the stop's steering.
    assert_eq!(udp_sockets_bound_to(p2.pid(), addr).len(), 3);
    assert!(
        share_of_a_new_member(addr, 64) > 0,
        "spread over the group again"
    );
    p2.kill();
}

/// As packaged: systemd's socket belongs to root, lb runs as another user (here uid 65534)
/// with CAP_NET_BIND_SERVICE and CAP_CHOWN. lb makes the socket its own so that its workers'
/// sockets can join its SO_REUSEPORT group (the kernel wants one owner), then gives CAP_CHOWN
/// up in every thread. Without CAP_CHOWN it says why and the workers share systemd's socket.
#[test]
fn socket_activation_as_an_unprivileged_user_adopts_systemds_socket() {
    const NOBODY: u32 = 65534;
    let a = Named::start(ZoneSpec::new(1, "a"));
    let dir = TempDir::new("sd-user");
    let cfg = dir.path().join("lb.toml");
    std::fs::write(&cfg, lb_config(&[a.addr], "round-robin", "")).unwrap();
    let readable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(dir.path(), readable).unwrap();
    let caps = |caps: &str| {
        [
            "setpriv".to_string(),
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            format!("--inh-caps={caps}"),
            format!("--ambient-caps={caps}"),
        ]
    };
    let owner = |s: &UdpSocket| {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `st` for a live descriptor; checked before it is read.
        assert_eq!(unsafe { libc::fstat(s.as_raw_fd(), st.as_mut_ptr()) }, 0);
        // SAFETY: initialised by the successful fstat.
        unsafe { st.assume_init() }.st_uid
    };

    // Granted, as lb.service does.
    let udp = systemd_udp_socket();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    assert_eq!(owner(&udp), 0);
    let prefix = caps("+chown,+net_bind_service");
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let mut p = spawn_activated_through(&prefix, &cfg, &[udp.as_raw_fd(), tcp.as_raw_fd()], &[]);
    assert_eq!(owner(&udp), NOBODY, "systemd's socket is lb's now");
    assert_eq!(udp_sockets_bound_to(p.pid(), addr).len(), 2);
    assert!(udp_query(addr, "www.example.test.", RecordType::A, T).is_some());
    // CAP_CHOWN (bit 0) is gone from every thread; CAP_NET_BIND_SERVICE (bit 10) stays.
    for task in std::fs::read_dir(format!("/proc/{}/task", p.pid())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            let line = status
                .lines()
                .find(|l| l.starts_with(set))
                .unwrap()
                .to_string();
            let bits = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            assert_eq!(bits & 1, 0, "{line}");
            assert_eq!(bits & (1 << 10), 1 << 10, "{line}");
        }
    }
    p.kill();

    // Not granted: lb says why, names the address, and serves on systemd's socket alone.
    let udp = systemd_udp_socket();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let prefix = caps("+net_bind_service");
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let mut p = spawn_activated_through(&prefix, &cfg, &[udp.as_raw_fd(), tcp.as_raw_fd()], &[]);
    assert_eq!(owner(&udp), 0);
    assert!(
        p.output.text().contains(&format!(
            "udp {addr}: the socket systemd passed: cannot make it lb's: it belongs to uid 0 and \
             lb runs as uid {NOBODY} without CAP_CHOWN"
        )),
        "{}",
        p.output.text()
    );
    assert_eq!(udp_sockets_bound_to(p.pid(), addr).len(), 1);
    assert!(udp_query(addr, "www.example.test.", RecordType::A, T).is_some());
    p.kill();
}

/// Starts `lb run --config CFG` as on a host booted without IPv6 (`ipv6.disable=1`): a seccomp
/// filter makes every `socket(AF_INET6, ...)` fail with EAFNOSUPPORT, as that kernel does.
/// Returns the process and its stderr lines.
fn spawn_without_ipv6(cfg: &std::path::Path) -> (Proc, std::sync::mpsc::Receiver<String>) {
    use std::os::unix::process::CommandExt;
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low half, little-endian).
    let mut program = vec![
        stmt(load, 4),
        jeq(AUDIT_ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, 0),
        jeq(libc::SYS_socket as u32, 0, 3),
        stmt(load, 16),
        jeq(libc::AF_INET6 as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let mut cmd = Command::new(bin("lb"));
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only prctl between fork and exec; the program outlives the call (moved in).
    unsafe {
        cmd.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_mut_ptr(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let output = Output::default();
    let (tx, rx) = std::sync::mpsc::channel();
    output.collect_lines(child.stderr.take().unwrap(), tx);
    let p = Proc {
        child,
        output,
        name: "lb (no IPv6)".into(),
    };
    (p, rx)
}

/// The packaged [listen] is dual-stack ("0.0.0.0:53" and "[::]:53"): on a host without IPv6
/// lb says so and serves IPv4, rather than failing to start; with nothing but IPv6 in a list
/// it fails, naming the address.
#[test]
fn starts_without_ipv6_on_its_ipv4_addresses() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let dir = TempDir::new("no-ipv6");
    let cfg = dir.path().join("lb.toml");
    let listen = |udp: &str, tcp: &str| {
        lb_config(&[a.addr], "round-robin", "").replace(
            "udp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]",
            &format!("udp = [{udp}]\ntcp = [{tcp}]"),
        )
    };
    let both = "\"127.0.0.1:0\", \"[::]:0\"";
    std::fs::write(&cfg, listen(both, both)).unwrap();
    let (mut p, lines) = spawn_without_ipv6(&cfg);
    let mut udp = None;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let line = lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("lb did not start:\n{}", p.output.text()));
        if let Some(a) = line
            .split("listening for udp on ")
            .nth(1)
            .and_then(|rest| rest.trim().parse::<std::net::SocketAddr>().ok())
        {
            udp = Some(a);
        }
        if line.contains("lb started") {
            break;
        }
    }
    let text = p.output.text();
    for proto in ["udp", "tcp"] {
        assert!(
            text.contains(&format!(
                "not listening for {proto} on [::]:0: this host has no IPv6"
            )),
            "{text}"
        );
    }
    let udp = udp.expect("an IPv4 udp listener");
    assert!(udp.is_ipv4());
    assert!(udp_query(udp, "www.example.test.", RecordType::A, T).is_some());
    p.kill();

    std::fs::write(&cfg, listen("\"[::]:0\"", both)).unwrap();
    let (mut p, _) = spawn_without_ipv6(&cfg);
    assert_eq!(p.wait_exit(T), Some(1), "{}", p.output.text());
    assert!(
        p.output.text().contains("cannot bind udp [::]:0"),
        "{}",
        p.output.text()
    );
}

#[test]
fn systemd_units_verify() {
    let dir = TempDir::new("units");
    let service = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../lb/dist/lb.service"
    ))
    .unwrap();
    let socket =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../lb/dist/lb.socket"))
            .unwrap();
    // systemd-analyze checks that ExecStart exists: point it at the built binary.
    std::fs::write(
        dir.path().join("lb.service"),
        service.replace("/usr/bin/lb", &bin("lb").display().to_string()),
    )
    .unwrap();
    std::fs::write(dir.path().join("lb.socket"), socket).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("lb.service"))
        .arg(dir.path().join("lb.socket"))
        .output()
        .expect("systemd-analyze (Debian systemd)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("lb.service:") && !text.contains("lb.socket:"),
        "warnings: {text}"
    );
}

#[test]
fn sigterm_answers_in_flight_queries_then_exits_zero() {
    // A backend that answers after 300 ms: a query in flight at SIGTERM must still be answered.
    let slow = UdpSocket::bind("127.0.0.1:0").unwrap();
    let slow_addr = slow.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = slow.recv_from(&mut buf) {
            std::thread::sleep(Duration::from_millis(300));
            let mut r = buf[..n].to_vec();
            r[2] |= 0x84;
            let _ = slow.send_to(&r, from);
        }
    });
    let mut lb = Lb::start(&lb_config(&[slow_addr], "round-robin", ""));
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.send_to(
        &query_bytes(99, "www.example.test.", RecordType::A),
        lb.udp(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    lb.proc.signal("TERM");
    let mut buf = [0u8; 512];
    let (n, _) = c
        .recv_from(&mut buf)
        .expect("in-flight query answered during shutdown");
    assert!(n > 12 && buf[0..2] == [0, 99]);
    assert_eq!(lb.proc.wait_exit(T), Some(0));
    assert!(lb.proc.output.text().contains("stopped"));
}

/// Kills the process an upgrade started (not our child) when the test ends, even on failure.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}

#[test]
fn control_operations_keep_failing_gauges_until_fixed_and_upgrades_carry_them_over() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let mut b = Named::start(ZoneSpec::new(2, "b"));
    let lb = Lb::start(&with_metrics(lb_config(
        &[a.addr, b.addr],
        "round-robin",
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 1\n",
    )));
    let serial = |x: std::net::SocketAddr| {
        format!("lb_backend_zone_serial{{backend=\"{x}\",zone=\"example.test.\"}}")
    };
    let m = lb.scrape();
    // From the start: the config load counts as the last successful reload; nothing failed.
    assert!(sample(&m, "lb_last_reload_success_timestamp_seconds") > 1.6e9);
    for zero in [
        "lb_reloads_total{result=\"success\"}",
        "lb_reloads_total{result=\"failure\"}",
        "lb_upgrades_total{result=\"failure\"}",
        "lb_last_upgrade_success_timestamp_seconds",
        "lb_last_swap_success_timestamp_seconds",
        "lb_state_file_write_failing",
        "lb_last_swap_failed",
        "lb_last_reload_failed",
        "lb_last_upgrade_failed",
    ] {
        assert_eq!(sample(&m, zero), 0.0, "{zero}");
    }
    let info = m
        .lines()
        .find(|l| l.starts_with("lb_build_info{"))
        .expect("lb_build_info");
    assert!(
        info.contains("version=\"")
            && info.contains("revision=\"")
            && !info.contains("revision=\"\""),
        "{info}"
    );
    // The serial each backend serves, from the health probes; a backend that stops answering
    // has none.
    assert_eq!(
        sample(&lb.scrape_until(&serial(a.addr), 1.0), &serial(a.addr)),
        1.0
    );
    assert_eq!(
        sample(&lb.scrape_until(&serial(b.addr), 2.0), &serial(b.addr)),
        2.0
    );
    b.stop();
    assert!(lb
        .wait_state(b.addr, "down", Duration::from_secs(5))
        .is_some());
    assert!(try_sample(&lb.scrape(), &serial(b.addr)).is_none());

    // A refused reload: failing until a reload succeeds.
    let good = std::fs::read_to_string(&lb.config).unwrap();
    std::fs::write(&lb.config, format!("{good}\n[nonsense]\n")).unwrap();
    assert_ne!(lb.ctl(&["reload"]).0, 0);
    let m = lb.scrape();
    assert_eq!(sample(&m, "lb_reloads_total{result=\"failure\"}"), 1.0);
    assert_eq!(sample(&m, "lb_last_reload_failed"), 1.0);
    let started = sample(&m, "lb_last_reload_success_timestamp_seconds");
    std::fs::write(&lb.config, &good).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(lb.ctl(&["reload"]).0, 0);
    let m = lb.scrape();
    assert_eq!(sample(&m, "lb_reloads_total{result=\"success\"}"), 1.0);
    assert_eq!(sample(&m, "lb_last_reload_failed"), 0.0);
    assert!(sample(&m, "lb_last_reload_success_timestamp_seconds") > started);

    // A refused set-backends, then one refused because the state file cannot be written:
    // both gauges stay set until a swap succeeds.
    assert_ne!(lb.ctl(&["set-backends", "not-an-address"]).0, 0);
    let m = lb.scrape();
    assert_eq!(sample(&m, "lb_swap_failures_total"), 1.0);
    assert_eq!(sample(&m, "lb_last_swap_failed"), 1.0);
    assert_eq!(sample(&m, "lb_state_file_write_failing"), 0.0);
    let state = lb.dir.path().join("state.json");
    let _ = std::fs::remove_file(&state);
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("in-the-way"), b"x").unwrap();
    assert_ne!(lb.ctl(&["set-backends", &a.addr.to_string()]).0, 0);
    let m = lb.scrape();
    assert_eq!(sample(&m, "lb_state_file_write_failures_total"), 1.0);
    assert_eq!(sample(&m, "lb_state_file_write_failing"), 1.0);
    assert_eq!(sample(&m, "lb_swap_failures_total"), 2.0);
    assert_eq!(sample(&m, "lb_last_swap_failed"), 1.0);
    assert_eq!(
        sample(&m, "lb_backend_set_generation"),
        2.0,
        "the reload swapped once"
    );
    std::fs::remove_dir_all(&state).unwrap();
    assert_eq!(lb.ctl(&["set-backends", &a.addr.to_string()]).0, 0);
    let m = lb.scrape();
    assert_eq!(sample(&m, "lb_state_file_write_failing"), 0.0);
    assert_eq!(sample(&m, "lb_last_swap_failed"), 0.0);
    assert_eq!(sample(&m, "lb_backend_set_swaps_total"), 2.0);
    let swapped_at = sample(&m, "lb_last_swap_success_timestamp_seconds");
    assert!(swapped_at > 1.6e9);

    // A failed upgrade (root may name any binary), then a successful one: the new process
    // continues the upgrade, swap and state file records; its reload record starts afresh.
    assert_ne!(lb.ctl(&["upgrade", "--binary", "/nonexistent/lb"]).0, 0);
    let m = lb.scrape();
    assert_eq!(sample(&m, "lb_upgrades_total{result=\"failure\"}"), 1.0);
    assert_eq!(sample(&m, "lb_last_upgrade_failed"), 1.0);
    let old_pid = lb.proc.pid();
    let (code, out, err) = lb.ctl(&["upgrade"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut old = lb;
    assert!(old.proc.wait_exit(Duration::from_secs(10)).is_some());
    let new_pid = old.status().pid;
    assert_ne!(new_pid, old_pid);
    let _new = KillPid(new_pid);
    let m = old.scrape();
    assert_eq!(sample(&m, "lb_upgrades_total{result=\"success\"}"), 1.0);
    assert_eq!(sample(&m, "lb_upgrades_total{result=\"failure\"}"), 1.0);
    assert_eq!(sample(&m, "lb_last_upgrade_failed"), 0.0);
    assert!(sample(&m, "lb_last_upgrade_success_timestamp_seconds") >= swapped_at);
    assert_eq!(sample(&m, "lb_swap_failures_total"), 2.0);
    assert_eq!(sample(&m, "lb_backend_set_swaps_total"), 2.0);
    assert_eq!(
        sample(&m, "lb_last_swap_success_timestamp_seconds"),
        swapped_at
    );
    assert_eq!(sample(&m, "lb_state_file_write_failures_total"), 1.0);
    assert_eq!(sample(&m, "lb_reloads_total{result=\"success\"}"), 0.0);
    assert_eq!(sample(&m, "lb_backend_set_generation"), 3.0);
}
