//! Upgrading the lb binary without losing a query: `lb ctl upgrade` and SIGUSR2 hand the
//! listening sockets to a new process; a failed upgrade leaves the old one serving.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use integration_tests::*;

/// A TCP client that keeps querying over one connection, reconnecting (and re-sending) when
/// the server closes it cleanly. Returns (answered, reconnects, lost).
fn tcp_client(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize, usize)> {
    std::thread::spawn(move || {
        let (mut answered, mut reconnects, mut lost) = (0, 0, 0);
        let connect = || {
            let s = TcpStream::connect(addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            Some(s)
        };
        let mut s = connect();
        let mut id: u16 = 0;
        while !stop.load(Ordering::Relaxed) {
            id = id.wrapping_add(1);
            let q = query_bytes(id, "example.test.", RecordType::SOA);
            let mut ok = false;
            for _attempt in 0..2 {
                let Some(conn) = s.as_mut() else {
                    s = connect();
                    reconnects += 1;
                    continue;
                };
                tcp_write(conn, &q);
                match tcp_read(conn) {
                    Some(r) if Message::from_vec(&r).is_ok_and(|m| m.metadata.id == id) => {
                        ok = true;
                        break;
                    }
                    // Closed (the old process finished this connection): reconnect, resend.
                    _ => {
                        s = connect();
                        reconnects += 1;
                    }
                }
            }
            if ok {
                answered += 1;
            } else {
                lost += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (answered, reconnects, lost)
    })
}

/// Kills the process that took over (not our child) when the test ends, even on failure.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        if self.0 != 0 {
            let _ = std::process::Command::new("kill")
                .arg(self.0.to_string())
                .status();
        }
    }
}

/// The PID now answering on the control socket at `socket`, once it differs from `old`.
fn new_pid(socket: &std::path::Path, old: u32) -> KillPid {
    let t = Instant::now();
    loop {
        if let Ok(r) = lb::control_protocol::send_request(
            socket,
            lb::control_protocol::ControlCommand::Status,
            Duration::from_secs(2),
        ) {
            if let Some(lb::control_protocol::ControlResult::Status(s)) = r.result {
                if s.pid != old {
                    return KillPid(s.pid);
                }
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a new process took over"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn copy_binary(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::copy(bin("lb"), &p).unwrap();
    p
}

#[test]
fn upgrade_under_udp_and_tcp_load_loses_nothing() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        lb_config(&[a.addr, b.addr], "round-robin", "")
    ));
    let old_pid = lb.proc.pid();
    assert_eq!(lb.status().pid, old_pid);
    // Swap once so the runtime set differs from the config's and must carry over.
    lb.ctl(&["set-backends", &b.addr.to_string()]);
    let bins = TempDir::new("bins");
    let new_bin = copy_binary(&bins, "lb-v2");

    let load = LoadClient::start(lb.udp(), 1000);
    let stop = Arc::new(AtomicBool::new(false));
    let tcp = tcp_client(lb.tcp(), stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    let (code, out, err) = lb.ctl(&["upgrade", "--binary", &new_bin.display().to_string()]);
    let took = t.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("upgraded"), "{out}");
    let _new = new_pid(&lb.socket(), old_pid);
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let report = load.finish();
    let (tcp_answered, reconnects, tcp_lost) = tcp.join().unwrap();
    eprintln!(
        "upgrade under load: took {took:?}; udp sent {} lost {}; tcp answered {tcp_answered}, reconnects {reconnects}, lost {tcp_lost}",
        report.sent,
        report.lost()
    );
    assert!(report.sent > 1000);
    assert_eq!(report.lost(), 0, "no UDP query lost");
    assert!(tcp_answered > 100);
    assert_eq!(tcp_lost, 0, "no TCP query lost");

    // The old process is gone; the new one serves with the same runtime set and socket path.
    let mut old = lb;
    assert!(
        old.proc.wait_exit(Duration::from_secs(5)).is_some(),
        "old process exited"
    );
    let st = old.status();
    assert_ne!(st.pid, old_pid);
    assert_eq!(st.backends.len(), 1);
    assert_eq!(st.backends[0].address, b.addr.to_string());
    assert_eq!(st.generation, 2);
    assert!(old.answers_udp());
    assert!(http_get(old.metrics.unwrap(), "/metrics")
        .1
        .contains("lb_queries_total"));
    // The new process is not our child: stop it by PID.
    let _ = std::process::Command::new("kill")
        .arg(st.pid.to_string())
        .status();
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&lb_config(&[a.addr], "round-robin", ""));
    let pid = lb.proc.pid();
    for bad in ["/bin/false", "/nonexistent/lb"] {
        let (code, _, err) = lb.ctl(&["upgrade", "--binary", bad]);
        assert_eq!(code, 1, "{bad}");
        assert!(
            err.contains("upgrade failed") && err.contains("keeps serving"),
            "{err}"
        );
        assert_eq!(lb.status().pid, pid);
        assert!(lb.answers_udp());
    }
}

#[test]
fn sigusr2_upgrades_to_the_binary_at_the_same_path() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let bins = TempDir::new("bins");
    let path = copy_binary(&bins, "lb");
    let dir = TempDir::new("lb");
    let cfg = dir.path().join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[control]\nsocket = \"{}/control.sock\"\n",
            lb_config(&[a.addr], "round-robin", ""),
            dir.path().display()
        ),
    )
    .unwrap();
    let mut lb = Lb::start_binary(&path, dir, cfg, &[]);
    let old = lb.proc.pid();
    // Replace the file at the same path, as a package upgrade would, then signal.
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(bin("lb"), &path).unwrap();
    lb.proc.signal("USR2");
    assert!(
        lb.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "old process exited"
    );
    let st = lb.status();
    assert_ne!(st.pid, old);
    assert!(lb.answers_udp());
    let _ = std::process::Command::new("kill")
        .arg(st.pid.to_string())
        .status();
}

/// `lb ctl ARGS` run as user `uid` in group 0 (root's group: the control socket's group here,
/// standing for the service's group), as a member of that group who is not root would.
fn ctl_as(uid: u32, lb_bin: &std::path::Path, lb: &Lb, args: &[&str]) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(lb_bin)
        .args(["ctl", "--socket"])
        .arg(lb.socket())
        .args(args)
        .uid(uid)
        .gid(0)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn only_root_may_upgrade_to_a_binary_of_its_choice() {
    // A member of the control socket's group who is not root names a binary of its own: lb
    // must not start it (it would run as lb's user, holding the DNS sockets). This lb's own
    // binary, at the path it was started from, it may still upgrade to.
    const NOBODY: u32 = 65534;
    let a = Named::start(ZoneSpec::new(1, "a"));
    let bins = TempDir::new("bins");
    let path = copy_binary(&bins, "lb");
    let dir = TempDir::new("lb");
    let cfg = dir.path().join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[control]\nsocket = \"{}/control.sock\"\n",
            lb_config(&[a.addr], "round-robin", ""),
            dir.path().display()
        ),
    )
    .unwrap();
    let lb = Lb::start_binary(&path, dir, cfg, &[]);
    let old = lb.proc.pid();
    // The would-be binary leaves a mark if it is ever started.
    let mark = bins.path().join("started");
    let evil = bins.path().join("evil");
    std::fs::write(
        &evil,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", mark.display()),
    )
    .unwrap();
    std::fs::set_permissions(&evil, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, out) = ctl_as(
        NOBODY,
        &path,
        &lb,
        &["upgrade", "--binary", evil.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("only root") && out.contains("uid 65534"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!mark.exists(), "lb started a binary named by uid {NOBODY}");
    assert_eq!(lb.status().pid, old);
    assert!(lb.answers_udp());
    // Root may (here it fails, and the old process keeps serving).
    let (code, out) = ctl_as(
        0,
        &path,
        &lb,
        &["upgrade", "--binary", evil.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("upgrade failed") && out.contains("keeps serving"),
        "{out}"
    );
    assert!(mark.exists(), "root's choice was started");
    assert_eq!(lb.status().pid, old);
    // The same user may upgrade to this lb's own binary.
    let (code, out) = ctl_as(
        NOBODY,
        &path,
        &lb,
        &["upgrade", "--binary", path.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    let _new = new_pid(&lb.socket(), old);
    assert!(lb.answers_udp());
}

/// An upgrade never cuts a zone transfer: the old process keeps relaying an AXFR that began
/// before the hand-over until its end (bounded by `tcp.transfer_timeout_ms`), although that
/// takes far longer than the query timeout its drain is otherwise bounded by.
#[test]
fn an_upgrade_lets_a_zone_transfer_in_progress_finish() {
    use std::io::Read;
    const AXFR: u16 = 252;
    let ns = Named::start_with(
        ZoneSpec::new(1, "a"),
        NamedOptions {
            // Its BIND allows transfers.
            conformance: true,
            // About 6 MB on the wire: more than the kernel buffers between lb and the client
            // hold (net.ipv4.tcp_wmem's maximum is 4 MiB), so the old process is still relaying
            // when it is asked to stop.
            big_zone_records: 300_000,
            ..NamedOptions::default()
        },
    );
    // The old process would stop waiting for its clients 600 ms after the hand-over.
    let lb = Lb::start(&format!(
        "{}\n[access]\ntransfer_allow = [\"127.0.0.0/8\"]\n",
        lb_config(&[ns.addr], "round-robin", "timeout_ms = 500\n")
    ));
    let q = integration_tests::dnsmsg::QueryBuilder::new(0x7a01, "big.test.", AXFR).build();
    let direct = tcp_exchange(ns.addr, &q, AXFR, Duration::from_secs(20));
    assert!(
        direct.complete && direct.messages.len() > 10,
        "{}",
        direct.describe()
    );
    let old = lb::control_protocol::send_request(
        &lb.socket(),
        lb::control_protocol::ControlCommand::Status,
        Duration::from_secs(2),
    )
    .ok()
    .and_then(|r| match r.result {
        Some(lb::control_protocol::ControlResult::Status(s)) => Some(s.pid),
        _ => None,
    })
    .expect("status");
    // A small receive window, so that the transfer cannot sit in kernel buffers when the old
    // process exits: it must still be relaying.
    let mut c = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&lb.tcp().into()).unwrap();
        TcpStream::from(s)
    };
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp_write(&mut c, &q);
    let mut state = integration_tests::dnsmsg::TransferState::new(AXFR);
    let mut messages = 0;
    let mut upgraded = None;
    let t = Instant::now();
    while !state.done {
        let mut len = [0u8; 2];
        c.read_exact(&mut len).unwrap_or_else(|e| {
            panic!(
                "the transfer was cut after {messages} messages ({:?}): {e}",
                t.elapsed()
            )
        });
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut buf).expect("a whole message");
        state.feed(&buf).expect("a valid AXFR stream");
        messages += 1;
        if messages == 2 {
            // Hand over mid-transfer; the new process serves new clients at once.
            let r = lb::control_protocol::send_request(
                &lb.socket(),
                lb::control_protocol::ControlCommand::Upgrade { binary: None },
                Duration::from_secs(30),
            )
            .expect("upgrade");
            assert!(r.ok, "{r:?}");
            upgraded = Some(new_pid(&lb.socket(), old));
            let m = udp_query(
                lb.udp(),
                "www.example.test.",
                RecordType::A,
                Duration::from_secs(3),
            )
            .expect("the new process answers");
            assert_eq!(m.answers.len(), 1);
        }
        // A slow secondary: the transfer lasts seconds, well past the old drain bound.
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(upgraded.is_some());
    assert_eq!(
        messages,
        direct.messages.len(),
        "the whole transfer arrived"
    );
    assert!(t.elapsed() > Duration::from_secs(1), "{:?}", t.elapsed());
}

/// Under socket activation every UDP worker has a socket of its own in one SO_REUSEPORT group
/// with systemd's: an upgrade hands the whole group over (a member left behind would close with
/// the old process, with what it had queued) and loses nothing of a steady load; the new
/// process, not started by systemd, still knows the group is systemd's, so a restart after it
/// loses nothing either. (Half the queries go to a backend that answers after 300 ms: each
/// stopping process waits for them, with its sockets open.)
#[test]
fn upgrade_under_socket_activation_hands_over_the_whole_group() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let slow = delayed_echo(Duration::from_millis(300));
    let dir = TempDir::new("sd-upgrade");
    let udp = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        std::net::UdpSocket::from(s)
    };
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let cfg = dir.path().join("lb.toml");
    let control = dir.path().join("control.sock");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[control]\nsocket = \"{}\"\n",
            lb_config(&[a.addr, slow], "round-robin", "").replace("workers = 2", "workers = 3"),
            control.display()
        ),
    )
    .unwrap();
    use std::os::fd::AsRawFd;
    let fds = [udp.as_raw_fd(), tcp.as_raw_fd()];
    let mut old = spawn_activated(&cfg, &fds, &[]);
    let group: Vec<u64> = udp_sockets_bound_to(old.pid(), addr)
        .iter()
        .map(socket_inode)
        .collect();
    assert_eq!(group.len(), 3, "{}", old.output.text());

    let load = LoadClient::start(addr, 1000);
    std::thread::sleep(Duration::from_millis(500));
    let out = std::process::Command::new(bin("lb"))
        .args(["ctl", "--socket"])
        .arg(&control)
        .arg("upgrade")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut new = new_pid(&control, old.pid());
    assert_eq!(
        old.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        old.output.text()
    );
    std::thread::sleep(Duration::from_millis(700));
    let report = load.finish();
    eprintln!(
        "upgrade under socket activation: sent {}, lost {}",
        report.sent,
        report.lost()
    );
    assert!(report.sent > 1000);
    assert_eq!(report.lost(), 0, "no UDP query lost");
    let mut handed: Vec<u64> = udp_sockets_bound_to(new.0, addr)
        .iter()
        .map(socket_inode)
        .collect();
    handed.sort_unstable();
    let mut group = group;
    group.sort_unstable();
    assert_eq!(handed, group, "the new process holds the very same sockets");

    // A restart of the upgraded process (SIGTERM, then systemd starts lb again).
    let load = LoadClient::start(addr, 400);
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .arg(new.0.to_string())
        .status();
    // Not our child: gone, or a zombie waiting for whoever adopted it.
    let exited = |pid: u32| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(st) => st
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    };
    let end = Instant::now() + Duration::from_secs(5);
    while !exited(new.0) {
        assert!(
            Instant::now() < end,
            "the upgraded process exits on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    new.0 = 0;
    let mut next = spawn_activated(&cfg, &fds, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish();
    eprintln!(
        "restart after the upgrade: sent {}, lost {}",
        report.sent,
        report.lost()
    );
    assert_eq!(report.lost(), 0, "no UDP query lost across the restart");
    assert_eq!(udp_sockets_bound_to(next.pid(), addr).len(), 3);
    next.kill();
}
