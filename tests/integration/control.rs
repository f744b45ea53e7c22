//! The control socket: atomic swap under load with zero lost queries, --verify refusal,
//! drain, reload, state file across restarts, hostile control clients.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use integration_tests::*;

const T: Duration = Duration::from_secs(3);

fn health(zones: &str) -> String {
    format!("\n[health]\nzones = [{zones}]\ninterval_ms = 200\ntimeout_ms = 300\n")
}

#[test]
fn swap_under_load_loses_no_query_and_serves_the_new_serial() {
    let mut a = Named::start(ZoneSpec::new(1, "a"));
    let mut b = Named::start(ZoneSpec::new(1, "b"));
    let c = Named::start(ZoneSpec::new(2, "c"));
    let d = Named::start(ZoneSpec::new(2, "d"));
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr, b.addr], "least-outstanding", ""),
        health("\"example.test.\"")
    ));
    assert_eq!(lb.status().generation, 1);

    // A TCP client keeps one connection open across the swap.
    let mut tcp = TcpStream::connect(lb.tcp()).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    let tcp_soa = |s: &mut TcpStream, id: u16| {
        tcp_write(s, &query_bytes(id, "example.test.", RecordType::SOA));
        soa_serial(&Message::from_vec(&tcp_read(s).expect("tcp answer")).unwrap())
    };
    assert_eq!(tcp_soa(&mut tcp, 1), Some(1));

    let load = LoadClient::start(lb.udp(), 2000);
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    let (code, out, err) = lb.ctl(&["set-backends", &c.addr.to_string(), &d.addr.to_string()]);
    let swap_latency = t.elapsed();
    let swapped_at = load.started.elapsed();
    // The old backends die the moment the command returns.
    a.stop();
    b.stop();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("generation 2"), "{out}");
    std::thread::sleep(Duration::from_millis(1000));
    let report = load.finish();
    eprintln!(
        "swap under load: sent {}, answered {}, lost {}, set-backends took {swap_latency:?} (with process start)",
        report.sent,
        report.answered,
        report.lost()
    );
    assert!(report.sent > 2500, "load ran: {}", report.sent);
    assert_eq!(report.lost(), 0, "every query answered");
    assert_eq!(report.errors, 0);
    // Queries sent after the command returned are answered by the new set.
    let late: Vec<_> = report
        .answers
        .iter()
        .filter(|(sent, _)| *sent > swapped_at + Duration::from_millis(5))
        .collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|(_, serial)| *serial == Some(2)),
        "new serial after swap"
    );

    // The TCP connection survived; its next query goes to the new set.
    assert_eq!(tcp_soa(&mut tcp, 2), Some(2));
    let st = lb.status();
    assert_eq!(st.generation, 2);
    let addrs: Vec<_> = st.backends.iter().map(|b| b.address.clone()).collect();
    assert_eq!(addrs, vec![c.addr.to_string(), d.addr.to_string()]);
    // Human status output names the generation and backends.
    let (code, out, _) = lb.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("generation 2") && out.contains(&c.addr.to_string()),
        "{out}"
    );
}

#[test]
fn verify_refuses_a_backend_without_the_zone_and_keeps_the_set() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let good = Named::start(ZoneSpec::new(2, "c"));
    let refused = Named::start(ZoneSpec {
        serial: None,
        tag: "r".into(),
    });
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr], "round-robin", ""),
        health("\"example.test.\"")
    ));
    let (code, _, err) = lb.ctl(&[
        "set-backends",
        "--verify",
        &good.addr.to_string(),
        &refused.addr.to_string(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&refused.addr.to_string()) && err.contains("refused"),
        "{err}"
    );
    assert!(
        !err.contains(&format!("backend {} failed", good.addr)),
        "{err}"
    );
    // A dead address fails too, within the verify deadline.
    let dead = format!("127.0.0.1:{}", free_port());
    let t = Instant::now();
    let (code, _, err) = lb.ctl(&["set-backends", "--verify", &dead]);
    assert_eq!(code, 1);
    assert!(err.contains(&dead), "{err}");
    assert!(t.elapsed() < Duration::from_secs(4));
    let st = lb.status();
    assert_eq!(st.generation, 1, "the current set stays");
    assert_eq!(st.backends[0].address, a.addr.to_string());

    // A verified swap to good backends succeeds in about one probe round trip.
    let t = Instant::now();
    let (code, out, err) = lb.ctl(&["set-backends", "--verify", &good.addr.to_string()]);
    eprintln!(
        "verified set-backends took {:?} (with process start)",
        t.elapsed()
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("generation 2"));
    let m = udp_query(lb.udp(), "example.test.", RecordType::SOA, T).unwrap();
    assert_eq!(soa_serial(&m), Some(2));
}

#[test]
fn set_backends_rejects_bad_lists() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&lb_config(&[a.addr], "round-robin", ""));
    let (code, _, err) = lb.ctl(&["set-backends", "nonsense"]);
    assert_eq!(code, 1);
    assert!(err.contains("nonsense"), "{err}");
    let x = a.addr.to_string();
    let (code, _, err) = lb.ctl(&["set-backends", &x, &x]);
    assert_eq!(code, 1);
    assert!(err.contains("twice"), "{err}");
    // An empty list is refused by the protocol too, not just the CLI.
    let r = lb::control_protocol::send_request(
        &lb.socket(),
        lb::control_protocol::ControlCommand::SetBackends {
            backends: vec![],
            verify: false,
            if_generation: None,
        },
        T,
    )
    .unwrap();
    assert!(!r.ok && r.error.unwrap().contains("empty"));
    // --verify without zones in the config is refused with the reason.
    let (code, _, err) = lb.ctl(&["set-backends", "--verify", &x]);
    assert_eq!(code, 1);
    assert!(err.contains("[health] zones"), "{err}");
    assert_eq!(lb.status().generation, 1);
    let (code, out, _) = lb.ctl(&["--json", "set-backends", "nonsense"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
}

#[test]
fn drain_and_undrain() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&lb_config(&[a.addr, b.addr], "round-robin", ""));
    let tags = |n: usize| {
        let mut v = Vec::new();
        for i in 0..n {
            let m = udp_query(
                lb.udp(),
                &format!("q{i}.who.example.test."),
                RecordType::TXT,
                T,
            )
            .unwrap();
            v.push(txt(&m).unwrap());
        }
        v
    };
    let (code, out, _) = lb.ctl(&["drain", &a.addr.to_string()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(lb.backend_state(a.addr).unwrap().0, "draining");
    assert!(tags(30).iter().all(|t| t == "b"));
    let (code, _, _) = lb.ctl(&["undrain", &a.addr.to_string()]);
    assert_eq!(code, 0);
    assert!(tags(30).iter().any(|t| t == "a"));
    let (code, _, err) = lb.ctl(&["drain", "127.0.0.9:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("not in the current set"), "{err}");
}

#[test]
fn reload_refuses_bad_config_and_applies_good_changes() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&lb_config(&[a.addr], "round-robin", ""));
    let original = std::fs::read_to_string(&lb.config).unwrap();

    std::fs::write(&lb.config, original.replace("round-robin", "bogus")).unwrap();
    let (code, _, err) = lb.ctl(&["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains("refused") && err.contains("bogus"), "{err}");
    assert!(udp_query(lb.udp(), "www.example.test.", RecordType::A, T).is_some());

    // A valid file that changes what only a restart applies: refused with its own exit code
    // and kind, which scripts (the Ansible role) restart on; an invalid one above never is.
    std::fs::write(&lb.config, original.replace("workers = 2", "workers = 3")).unwrap();
    let (code, _, err) = lb.ctl(&["reload"]);
    assert_eq!(code, i32::from(lb::ctl::EXIT_RESTART_NEEDED), "{err}");
    assert!(err.contains("[listen]") && err.contains("restart"), "{err}");
    let (code, out, _) = lb.ctl(&["--json", "reload"]);
    assert_eq!(code, i32::from(lb::ctl::EXIT_RESTART_NEEDED));
    assert!(out.contains(r#""refusal":"restart-needed""#), "{out}");

    // Editing the backend list in the file applies it; SIGHUP does the same as `lb ctl reload`.
    std::fs::write(
        &lb.config,
        original.replace(&format!("\"{}\"", a.addr), &format!("\"{}\"", b.addr)),
    )
    .unwrap();
    lb.proc.signal("HUP");
    let t0 = Instant::now();
    while lb.status().generation != 2 && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = lb.status();
    assert_eq!(st.generation, 2);
    assert_eq!(st.backends[0].address, b.addr.to_string());
    // A reload with the list unchanged keeps a swap made through the socket.
    lb.ctl(&["set-backends", &a.addr.to_string()]);
    let (code, out, _) = lb.ctl(&["reload"]);
    assert_eq!(code, 0);
    assert!(out.contains("kept"), "{out}");
    assert_eq!(lb.status().backends[0].address, a.addr.to_string());
}

#[test]
fn state_file_survives_restart_and_corruption_falls_back() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let c = Named::start(ZoneSpec::new(2, "c"));
    let lb = Lb::start(&lb_config(&[a.addr], "round-robin", ""));
    let (code, _, _) = lb.ctl(&["set-backends", &c.addr.to_string()]);
    assert_eq!(code, 0);
    lb.ctl(&["drain", &c.addr.to_string()]);
    lb.ctl(&["undrain", &c.addr.to_string()]);
    // Socket is 0660.
    let mode = std::fs::metadata(lb.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let state_path = lb.dir.path().join("state.json");
    let lb = lb.restart();
    let st = lb.status();
    assert_eq!(st.generation, 2);
    assert_eq!(st.backends[0].address, c.addr.to_string());
    let m = udp_query(lb.udp(), "example.test.", RecordType::SOA, T).unwrap();
    assert_eq!(soa_serial(&m), Some(2), "a restart never reverts a deploy");

    std::fs::write(&state_path, "{ corrupt").unwrap();
    let mut lb = lb;
    lb.proc.signal("TERM");
    assert_eq!(lb.proc.wait_exit(T), Some(0));
    let lb = lb.restart();
    assert!(lb.proc.output.text().contains("corrupt"));
    assert_eq!(lb.status().backends[0].address, a.addr.to_string());
}

#[test]
fn hostile_control_clients_get_errors_and_the_proxy_keeps_serving() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&lb_config(&[a.addr], "round-robin", ""));
    let sock = lb.socket();
    let ask = |line: &[u8]| -> String {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(line).unwrap();
        let mut r = String::new();
        let _ = BufReader::new(s).read_line(&mut r);
        r
    };
    assert!(ask(b"not json\n").contains("invalid request"));
    assert!(
        ask(b"{\"version\":1,\"request\":{\"command\":\"explode\"}}\n").contains("invalid request")
    );
    assert!(ask(b"{\"version\":99,\"request\":{\"command\":\"status\"}}\n").contains("version 99"));
    let mut long = vec![b'x'; 70_000];
    long.push(b'\n');
    assert!(ask(&long).contains("longer than"));
    // A client that stalls mid-request and one that disconnects mid-request hold nothing up.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"{\"version\":1,").unwrap();
    {
        let mut gone = UnixStream::connect(&sock).unwrap();
        gone.write_all(b"{\"vers").unwrap();
    }
    // Many clients at once: every one gets a response line (status or "too many").
    let handles: Vec<_> = (0..60)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"{\"version\":1,\"request\":{\"command\":\"status\"}}\n")
                    .unwrap();
                let mut r = String::new();
                let _ = BufReader::new(s).read_line(&mut r);
                r
            })
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert!(r.contains("\"ok\":true") || r.contains("too many"), "{r}");
    }
    assert_eq!(lb.status().generation, 1);
    assert!(udp_query(lb.udp(), "www.example.test.", RecordType::A, T).is_some());
    drop(stalled);
}

#[test]
fn bad_input_is_counted_by_reason() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&lb_config(
        &[a.addr],
        "round-robin",
        "[tcp]\nidle_timeout_ms = 200\n",
    ));
    let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let good = query_bytes(1, "www.example.test.", RecordType::A);
    let mut qr = good.clone();
    qr[2] |= 0x80;
    // (A malformed question is not counted here: it is a query, forwarded to BIND, which
    // answers FORMERR; see the conformance suite.)
    for _ in 0..3 {
        c.send_to(&[1, 2, 3], lb.udp()).unwrap();
        c.send_to(&qr, lb.udp()).unwrap();
        c.send_to(&[0u8; 5000], lb.udp()).unwrap();
    }
    let mut s = TcpStream::connect(lb.tcp()).unwrap();
    s.write_all(&[0, 0]).unwrap();
    let _idle = TcpStream::connect(lb.tcp()).unwrap();
    let t0 = Instant::now();
    while lb.drops("tcp-idle-timeout") < 1 && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lb.drops("short-header"), 3);
    assert_eq!(lb.drops("qr-set"), 3);
    assert_eq!(lb.drops("oversized-datagram"), 3);
    assert_eq!(lb.drops("tcp-zero-length"), 1);
    assert_eq!(lb.drops("tcp-idle-timeout"), 1);
}

#[test]
fn probe_runs_the_health_probe_from_the_lb_against_any_address() {
    let a = Named::start(ZoneSpec::new(7, "a"));
    let outside = Named::start(ZoneSpec::new(9, "outside"));
    let empty = Named::start(ZoneSpec {
        serial: None,
        tag: "none".into(),
    });
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr], "round-robin", ""),
        health("\"example.test.\"")
    ));
    // A nameserver that is not in the set: probed from the lb, with the config's zones.
    let (code, out, err) = lb.ctl(&["probe", "--tcp", &outside.addr.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.trim(),
        format!("{}: example.test. serial 9", outside.addr)
    );
    // JSON form, zones named explicitly.
    let (code, out, _) = lb.ctl(&[
        "--json",
        "probe",
        "--zone",
        "example.test",
        &a.addr.to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["result"]["zones"][0]["serial"], 7, "{v}");
    // A server without the zone, and nothing listening: refused, naming the reason.
    let (code, _, err) = lb.ctl(&["probe", &empty.addr.to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("refused"), "{err}");
    let (code, _, err) = lb.ctl(&["probe", "--zone", "nope.", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("nope."),
        "{err}"
    );
    assert_eq!(lb.status().generation, 1, "a probe changes nothing");
}

/// `set-backends --if-generation N`: a compare-and-swap on the generation. A client that read
/// generation N and decides after someone else swapped is refused (exit 5, its own refusal
/// kind), and the set in force stays; at the current generation it swaps as usual.
#[test]
fn if_generation_refuses_a_stale_swap_and_keeps_the_set() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(2, "b"));
    let c = Named::start(ZoneSpec::new(3, "c"));
    let lb = Lb::start(&format!(
        "{}{}",
        lb_config(&[a.addr], "round-robin", ""),
        health("\"example.test.\"")
    ));
    let read = lb.status().generation;
    assert_eq!(read, 1);
    // Someone else swaps first.
    let (code, _, err) = lb.ctl(&["set-backends", &b.addr.to_string()]);
    assert_eq!(code, 0, "{err}");
    // The stale client, verified or not, is refused at the generation it read.
    for verify in [false, true] {
        let mut args = vec!["set-backends", "--if-generation", "1"];
        if verify {
            args.push("--verify");
        }
        let c_addr = c.addr.to_string();
        args.push(&c_addr);
        let (code, _, err) = lb.ctl(&args);
        assert_eq!(code, 5, "refused as a generation mismatch: {err}");
        assert!(
            err.contains("generation 2, not 1") && err.contains("current set stays"),
            "{err}"
        );
    }
    let (code, out, _) = lb.ctl(&[
        "--json",
        "set-backends",
        "--if-generation",
        "1",
        &c.addr.to_string(),
    ]);
    assert_eq!(code, 5);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["refusal"], "generation-mismatch", "{v}");
    let st = lb.status();
    assert_eq!(st.generation, 2, "nothing changed");
    assert_eq!(st.backends.len(), 1);
    assert_eq!(st.backends[0].address, b.addr.to_string());
    let m = udp_query(lb.udp(), "example.test.", RecordType::SOA, T).unwrap();
    assert_eq!(soa_serial(&m), Some(2), "still served by the set in force");
    // At the generation in force the swap goes through, verified.
    let (code, out, err) = lb.ctl(&[
        "set-backends",
        "--verify",
        "--if-generation",
        "2",
        &c.addr.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("generation 3"), "{out}");
}
