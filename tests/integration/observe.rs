//! Observability and supervision: Prometheus metrics checked by promtool and by counting,
//! systemd socket activation, READY/WATCHDOG/STOPPING notifications, graceful SIGTERM.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
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

/// Starts `lb run` with `fds` passed as LISTEN_FDS (at fd 3, 4, ...) and extra environment.
fn spawn_activated(lb_toml: &std::path::Path, fds: &[i32], env: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" run --config \"$1\"")
        .arg(bin("lb"))
        .arg(lb_toml)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let fds = fds.to_vec();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                let target = 3 + i as i32;
                if *fd == target {
                    let flags = libc::fcntl(target, libc::F_GETFD);
                    libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
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
        name: "lb (socket-activated)".into(),
    };
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            if l.contains("lb started") {
                return p;
            }
        }
    }
    panic!("lb did not start:\n{}", p.output.text());
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
