//! The packet cache (issue #19): cached answers are BIND's (ID and spelling the client's, TTLs
//! aged) over the transport they were fetched over, and never the old zone once a swap
//! returned or a probe saw the serial change.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::dnsmsg::{self, QueryBuilder};
use integration_tests::*;

const T: Duration = Duration::from_secs(3);

fn cached_lb(backends: &[SocketAddr], extra: &str) -> Lb {
    Lb::start(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[cache]\nentries = 4096\n{extra}",
        lb_config(backends, "round-robin", "")
    ))
}

fn counter(lb: &Lb, series: &str) -> f64 {
    sample(&lb.scrape(), series)
}

/// The TTL fields of a message (answer, authority, additional but OPT), in order.
fn ttls(msg: &[u8]) -> Vec<u32> {
    lb::wire::records(msg)
        .filter(|r| r.rtype != lb::wire::TYPE_OPT)
        .map(|r| u32::from_be_bytes(msg[r.ttl_at..r.ttl_at + 4].try_into().unwrap()))
        .collect()
}

/// `msg` with its ID and TTLs zeroed.
fn without_id_and_ttls(msg: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[..2].copy_from_slice(&[0, 0]);
    let at: Vec<usize> = lb::wire::records(msg)
        .filter(|r| r.rtype != lb::wire::TYPE_OPT)
        .map(|r| r.ttl_at)
        .collect();
    for p in at {
        m[p..p + 4].copy_from_slice(&[0; 4]);
    }
    m
}

#[test]
fn cached_answers_are_binds_with_the_clients_id_and_spelling_over_udp_and_tcp() {
    let ns = Named::start_with(
        ZoneSpec::new(1, "a"),
        NamedOptions {
            conformance: true,
            ..NamedOptions::default()
        },
    );
    let lb = cached_lb(&[ns.addr], "max_answer_size_bytes = 1232\n");
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        ("A", QueryBuilder::new(1, "www.example.test.", 1).build()),
        (
            "AAAA rd",
            QueryBuilder::new(2, "www.example.test.", 28).rd().build(),
        ),
        (
            "MX edns 1232",
            QueryBuilder::new(3, "example.test.", 15).edns(1232).build(),
        ),
        (
            "TXT edns 4096 do",
            QueryBuilder::new(4, "medium.example.test.", 16)
                .edns(4096)
                .dnssec_ok()
                .build(),
        ),
        (
            "NXDOMAIN",
            QueryBuilder::new(5, "nope.example.test.", 1).build(),
        ),
        (
            "NODATA",
            QueryBuilder::new(6, "www.example.test.", 15)
                .edns(1232)
                .build(),
        ),
        (
            "referral",
            QueryBuilder::new(7, "x.sub.example.test.", 1).build(),
        ),
        (
            "0x20",
            QueryBuilder::new(8, "mAiL.ExAmPlE.tEsT.", 1).build(),
        ),
        (
            "CD",
            QueryBuilder::new(9, "mail.example.test.", 1).cd().build(),
        ),
    ];
    let hits0 = counter(&lb, "lb_cache_hits_total");
    for (name, q) in &shapes {
        let direct = udp_exchange(ns.addr, q, T).expect("BIND answers");
        // First through lb: a miss, stored. Second, with another ID and another spelling of
        // the name (the case of every letter flipped), over UDP: a hit.
        let first = udp_exchange(lb.udp(), q, T).expect("answered");
        assert_eq!(
            without_id_and_ttls(&first),
            without_id_and_ttls(&direct),
            "{name}"
        );
        let mut again = q.clone();
        again[..2].copy_from_slice(&[0xab, 0xcd]);
        let qq = lb::wire::question(&again).unwrap();
        for b in &mut again[qq.name_start..qq.name_end] {
            if b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        let hit = udp_exchange(lb.udp(), &again, T).expect("answered from the cache");
        assert_eq!(&hit[..2], &[0xab, 0xcd], "{name}: the client's ID");
        assert_eq!(
            &hit[qq.name_start..qq.name_end],
            &again[qq.name_start..qq.name_end],
            "{name}: the client's spelling"
        );
        // BIND's answer to the first spelling, with the client's ID and spelling of the
        // question: BIND itself answers another spelling with owner names in the zone's case
        // rather than compressed to the question (a deliberate difference, in docs/operator-guide.md).
        let mut stored = direct.clone();
        stored[..2].copy_from_slice(&[0xab, 0xcd]);
        stored[qq.name_start..qq.name_end].copy_from_slice(&again[qq.name_start..qq.name_end]);
        assert_eq!(
            without_id_and_ttls(&hit),
            without_id_and_ttls(&stored),
            "{name}: a hit is BIND's answer\n{}",
            dnsmsg::diff(&stored, &hit).unwrap_or_default()
        );
        // TTLs aged, never above BIND's.
        for (got, full) in ttls(&hit).iter().zip(ttls(&direct)) {
            assert!(
                *got <= full && full - *got <= 2,
                "{name}: TTL {got} of {full}"
            );
        }
        // The same over TCP, from entries of its own: the first a miss (BIND's answer), the
        // second, in the other spelling, a hit.
        let direct_tcp = tcp_exchange(ns.addr, q, 1, T).messages.remove(0);
        let mut stored_tcp = direct_tcp.clone();
        stored_tcp[qq.name_start..qq.name_end].copy_from_slice(&again[qq.name_start..qq.name_end]);
        for (query, want) in [(q, &direct_tcp), (&again, &stored_tcp)] {
            let tcp = tcp_exchange(lb.tcp(), query, 1, T);
            assert_eq!(
                without_id_and_ttls(&tcp.messages[0]),
                without_id_and_ttls(want),
                "{name} over TCP"
            );
        }
    }
    let hits = counter(&lb, "lb_cache_hits_total") - hits0;
    assert!(
        hits >= 2.0 * shapes.len() as f64,
        "every second query over each transport was a hit ({hits})"
    );
    assert!(counter(&lb, "lb_cache_entries") >= shapes.len() as f64);
    // Never cached: TC answers, a query with a cookie, other opcodes.
    let big = QueryBuilder::new(20, "big.example.test.", 16).build();
    for q in [
        big.clone(),
        QueryBuilder::new(21, "www.example.test.", 1)
            .edns(1232)
            .cookie([7; 8], &[])
            .build(),
    ] {
        let before = counter(&lb, "lb_cache_hits_total");
        udp_exchange(lb.udp(), &q, T).unwrap();
        udp_exchange(lb.udp(), &q, T).unwrap();
        assert_eq!(
            counter(&lb, "lb_cache_hits_total"),
            before,
            "{}",
            dnsmsg::summary(&q)
        );
    }
}

#[test]
fn an_answer_fetched_over_tcp_never_goes_over_udp_larger_than_bind_sends() {
    // `big` is a TXT of about 1,600 bytes: over UDP BIND truncates it at its max-udp-size
    // (1232) even for a client advertising 4096; over TCP it sends it whole. Fetched over TCP
    // first (and cached), it must still reach a UDP client as BIND's TC=1, byte for byte.
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = cached_lb(
        &[ns.addr],
        "max_answer_size_bytes = 4096
",
    );
    let q = QueryBuilder::new(30, "big.example.test.", 16)
        .edns(4096)
        .build();
    let direct_udp = udp_exchange(ns.addr, &q, T).expect("BIND answers over UDP");
    let direct_tcp = tcp_exchange(ns.addr, &q, 16, T);
    assert_ne!(direct_udp[2] & 0x02, 0, "BIND truncates it over UDP");
    assert!(
        direct_tcp.messages[0].len() > 1232,
        "and sends it whole over TCP"
    );
    let hits0 = counter(&lb, "lb_cache_hits_total");
    for round in 0..2 {
        let tcp = tcp_exchange(lb.tcp(), &q, 16, T);
        assert_eq!(
            without_id_and_ttls(&tcp.messages[0]),
            without_id_and_ttls(&direct_tcp.messages[0]),
            "over TCP, round {round}"
        );
        let udp = udp_exchange(lb.udp(), &q, T).expect("answered over UDP");
        assert_eq!(
            dnsmsg::mask(&udp).bytes,
            dnsmsg::mask(&direct_udp).bytes,
            "over UDP, round {round}: BIND's TC=1 answer\n{}",
            dnsmsg::diff(&direct_udp, &udp).unwrap_or_default()
        );
        assert_eq!(&udp[..2], &q[..2]);
    }
    assert_eq!(
        counter(&lb, "lb_cache_hits_total") - hits0,
        1.0,
        "the second TCP query is the one hit"
    );
}

#[test]
fn a_serial_that_goes_down_flushes_the_cache_too() {
    // The zone is restored from a backup on its one nameserver: serial 5 -> 4. The cache held
    // serial 5's SOA (TTL 300): once the probe saw 4, nothing of 5 is served.
    let mut ns = Named::start(ZoneSpec::new(5, "a"));
    let lb = cached_lb(
        &[ns.addr],
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 200\ntimeout_ms = 300\n",
    );
    let load = LoadClient::start(lb.udp(), 300);
    std::thread::sleep(Duration::from_millis(600));
    let hits = counter(&lb, "lb_cache_hits_total");
    assert!(hits > 50.0, "served from the cache ({hits})");
    let flushes = counter(&lb, "lb_cache_flushes_total{reason=\"serial\"}");
    ns.set_zone(ZoneSpec::new(4, "a"));
    let t0 = Instant::now();
    while counter(&lb, "lb_cache_flushes_total{reason=\"serial\"}") <= flushes
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let probed = load.started.elapsed();
    assert!(
        counter(&lb, "lb_cache_flushes_total{reason=\"serial\"}") > flushes,
        "the probe saw the serial go down and flushed"
    );
    std::thread::sleep(Duration::from_millis(600));
    let report = load.finish();
    let after = serials_after(&report, probed);
    assert!(after.len() > 50, "{} answers after the probe", after.len());
    assert!(
        after.iter().all(|s| *s == 4),
        "answers of serial 5 after the probe saw 4: {}",
        after.iter().filter(|s| **s != 4).count()
    );
    assert!(counter(&lb, "lb_cache_hits_total") > hits, "cached again");
}

#[test]
fn lb_check_and_the_start_log_say_which_zones_the_cache_protects() {
    let dir = TempDir::new("cachecheck");
    let check = |text: &str| -> String {
        let p = dir.path().join("lb.toml");
        std::fs::write(&p, text).unwrap();
        let out = std::process::Command::new(bin("lb"))
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let base = lb_config(&["127.0.0.1:5301".parse().unwrap()], "round-robin", "");
    let off = check(&base);
    assert!(!off.contains("packet cache"), "{off}");
    let unprotected = format!("{base}\n[cache]\nentries = 64\n");
    let out = check(&unprotected);
    assert!(
        out.contains("warning: packet cache on, but no health.zones"),
        "{out}"
    );
    let out = check(&format!(
        "{unprotected}\n[health]\nzones = [\"example.test.\", \"other.test.\"]\n"
    ));
    assert!(
        out.contains("example.test., other.test. change") && !out.contains("warning"),
        "{out}"
    );
    // lb run says the same at start: a warning when no zone is protected.
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = cached_lb(&[ns.addr], "");
    let t0 = Instant::now();
    while !lb.proc.output.text().contains("no health.zones") {
        assert!(t0.elapsed() < T, "{}", lb.proc.output.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lb.proc.output.text().contains("WARN"));
}

/// The answers a steady load got, as (sent at, serial) for queries sent after `after`.
fn serials_after(r: &LoadReport, after: Duration) -> Vec<u32> {
    r.answers
        .iter()
        .filter(|(sent, _)| *sent > after)
        .filter_map(|(_, s)| *s)
        .collect()
}

#[test]
fn no_old_zone_once_a_swap_returned_or_a_probe_saw_the_serial_rise() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let b = Named::start(ZoneSpec::new(1, "b"));
    let mut c = Named::start(ZoneSpec::new(2, "c"));
    let lb = cached_lb(
        &[a.addr, b.addr],
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 200\ntimeout_ms = 300\n",
    );
    let load = LoadClient::start(lb.udp(), 500);
    std::thread::sleep(Duration::from_millis(800));
    let hits_before = counter(&lb, "lb_cache_hits_total");
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        counter(&lb, "lb_cache_hits_total") > hits_before + 50.0,
        "the load is served from the cache"
    );

    // 1. A swap to backends with a new serial: from its return on, nothing of the old zone.
    let (code, out, err) = lb.ctl(&["set-backends", &c.addr.to_string()]);
    let swapped = load.started.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(800));

    // 2. The zone changes on the same backend (serial 3): once the next probe saw it, nothing
    // of serial 2.
    let flushes = counter(&lb, "lb_cache_flushes_total{reason=\"serial\"}");
    c.set_zone(ZoneSpec::new(3, "c"));
    let t0 = Instant::now();
    while counter(&lb, "lb_cache_flushes_total{reason=\"serial\"}") <= flushes
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let probed = load.started.elapsed();
    assert!(
        counter(&lb, "lb_cache_flushes_total{reason=\"serial\"}") > flushes,
        "the probe saw the serial rise and flushed"
    );
    std::thread::sleep(Duration::from_millis(800));
    let hits_end = counter(&lb, "lb_cache_hits_total");
    let report = load.finish();

    let after_swap: Vec<u32> = serials_after(&report, swapped)
        .into_iter()
        .filter(|_| true)
        .collect();
    assert!(!after_swap.is_empty());
    let old = after_swap.iter().filter(|s| **s == 1).count();
    assert_eq!(old, 0, "answers of the old zone after the swap returned");
    let after_probe = serials_after(&report, probed);
    assert!(
        after_probe.len() > 100,
        "{} answers after the probe",
        after_probe.len()
    );
    assert!(
        after_probe.iter().all(|s| *s == 3),
        "answers of serial 2 after the probe saw serial 3: {:?}",
        after_probe.iter().filter(|s| **s != 3).count()
    );
    assert!(hits_end > hits_before, "the cache served throughout");
    assert!(counter(&lb, "lb_cache_flushes_total{reason=\"swap\"}") >= 1.0);
}
