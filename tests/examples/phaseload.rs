//! A steady DNS load against a resolver, counted per phase: the rehearsal's client.
//!
//! Sends queries from a file (`NAME TYPE [RCODE]` per line: dnsperf's format, plus the RCODE
//! the answer must carry, NOERROR when not given) round-robin at a fixed rate over UDP, with
//! RD=1, and counts per phase what came back: answers by RCODE, answers whose RCODE is not the
//! expected one (`wrong`), and timeouts.
//! A query belongs to the phase in which it was sent, whenever its answer arrives, so a phase
//! boundary loses nothing from the count. SIGUSR1 starts the next phase; SIGTERM or SIGINT (or
//! `--max-secs`) stops sending, waits for every answer still due (at most the timeout), prints
//! one line per phase and a total, and exits 0.
//!
//! Output (stdout), one line per phase, then `total`:
//! `phase NAME: sent N answered N noerror N nxdomain N servfail N refused N other N timeouts N max_ms N wrong N`
//!
//! Usage: phaseload SERVER:PORT QUERY_FILE QPS PHASE[,PHASE...] [TIMEOUT_MS=5000] [MAX_SECS=3600]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static NEXT_PHASE: AtomicUsize = AtomicUsize::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    NEXT_PHASE.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Seconds since start at which queries failed (timeout, SERVFAIL, or a wrong RCODE), with
/// their count: where in the run the failures sit (printed as `failures: SECOND:COUNT ...`).
type FailTimes = std::collections::BTreeMap<u64, u64>;

/// Queries awaiting their answer: ID -> (phase, sent at, expected RCODE).
type Pending = HashMap<u16, (usize, Instant, u8)>;

#[derive(Default, Clone, Copy)]
struct Counts {
    sent: u64,
    /// Answers whose RCODE is not the one the query file expects.
    wrong: u64,
    answered: u64,
    rcodes: [u64; 16],
    timeouts: u64,
    max_ms: u64,
}

fn qtype(t: &str) -> Option<u16> {
    Some(match t.to_ascii_uppercase().as_str() {
        "A" => 1,
        "NS" => 2,
        "SOA" => 6,
        "MX" => 15,
        "TXT" => 16,
        "AAAA" => 28,
        "SRV" => 33,
        _ => return None,
    })
}

fn rcode(name: &str) -> Option<u8> {
    Some(match name.to_ascii_uppercase().as_str() {
        "NOERROR" => 0,
        "FORMERR" => 1,
        "SERVFAIL" => 2,
        "NXDOMAIN" => 3,
        "NOTIMP" => 4,
        "REFUSED" => 5,
        _ => return None,
    })
}

fn query(id: u16, name: &str, t: u16) -> Vec<u8> {
    // RD=1: a resolver's client.
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 1]);
    for l in name.trim_end_matches('.').split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&t.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    // OPT: UDP payload 1232.
    m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    m
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: phaseload SERVER:PORT QUERY_FILE QPS PHASE[,PHASE...] [TIMEOUT_MS=5000] [MAX_SECS=3600]");
        std::process::exit(2);
    }
    let server: SocketAddr = args[0].parse().expect("SERVER:PORT");
    let text = std::fs::read_to_string(&args[1]).expect("query file");
    let queries: Vec<(String, u16, u8)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            let t = qtype(w.next()?)?;
            let want = w.next().map_or(Some(0), rcode)?;
            Some((name.to_string(), t, want))
        })
        .collect();
    assert!(!queries.is_empty(), "no `NAME TYPE` lines in {}", args[1]);
    let qps: f64 = args[2].parse().expect("QPS");
    let phases: Vec<String> = args[3].split(',').map(str::to_string).collect();
    let timeout =
        Duration::from_millis(args.get(4).map_or(5000, |t| t.parse().expect("TIMEOUT_MS")));
    let max = Duration::from_secs(args.get(5).map_or(3600, |t| t.parse().expect("MAX_SECS")));
    // IDs are sequential: at most 60,000 queries may be outstanding at once.
    assert!(
        qps * timeout.as_secs_f64() < 60_000.0,
        "QPS x TIMEOUT would need more than 60,000 outstanding IDs"
    );
    // SAFETY: the handlers only store to atomics, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let counts = Arc::new(Mutex::new(vec![Counts::default(); phases.len()]));
    let fails: Arc<Mutex<FailTimes>> = Arc::new(Mutex::new(FailTimes::new()));
    let start = Instant::now();
    let pending: Arc<Mutex<Pending>> = Arc::new(Mutex::new(HashMap::new()));
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (sock, counts, pending, done, fails) = (
            sock.try_clone().unwrap(),
            Arc::clone(&counts),
            Arc::clone(&pending),
            Arc::clone(&done),
            Arc::clone(&fails),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !done.load(Ordering::SeqCst) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                if n < 12 || buf[2] & 0x80 == 0 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let Some((phase, at, want)) = pending.lock().unwrap().remove(&id) else {
                    continue;
                };
                let mut c = counts.lock().unwrap();
                let c = &mut c[phase];
                c.answered += 1;
                let got = buf[3] & 0x0f;
                c.rcodes[got as usize] += 1;
                if got != want {
                    c.wrong += 1;
                    *fails
                        .lock()
                        .unwrap()
                        .entry(start.elapsed().as_secs())
                        .or_insert(0) += 1;
                }
                c.max_ms = c.max_ms.max(at.elapsed().as_millis() as u64);
            }
        })
    };
    let interval = Duration::from_secs_f64(1.0 / qps.max(0.001));
    let mut next = Instant::now();
    let mut id: u16 = 0;
    let mut i = 0usize;
    let mut phase = 0usize;
    eprintln!("phaseload: phase {} started", phases[0]);
    let sweep = |pending: &Mutex<Pending>, all: bool| {
        let mut p = pending.lock().unwrap();
        let mut c = counts.lock().unwrap();
        p.retain(|_, (ph, at, _)| {
            if all || at.elapsed() >= timeout {
                c[*ph].timeouts += 1;
                // Counted at the second the query was sent.
                let sent = at.saturating_duration_since(start).as_secs();
                *fails.lock().unwrap().entry(sent).or_insert(0) += 1;
                false
            } else {
                true
            }
        });
    };
    while !STOP.load(Ordering::SeqCst) && start.elapsed() < max {
        let want = NEXT_PHASE.load(Ordering::SeqCst).min(phases.len() - 1);
        if want != phase {
            phase = want;
            eprintln!(
                "phaseload: phase {} started at {}s",
                phases[phase],
                start.elapsed().as_secs()
            );
        }
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(20)));
            continue;
        }
        next += interval;
        let (name, t, want) = &queries[i % queries.len()];
        i += 1;
        id = id.wrapping_add(1);
        pending
            .lock()
            .unwrap()
            .insert(id, (phase, Instant::now(), *want));
        counts.lock().unwrap()[phase].sent += 1;
        let _ = sock.send(&query(id, name, *t));
        if i.is_multiple_of(64) {
            sweep(&pending, false);
        }
    }
    // Every answer still due gets its full timeout.
    let end = Instant::now() + timeout;
    while Instant::now() < end && !pending.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
        sweep(&pending, false);
    }
    sweep(&pending, true);
    done.store(true, Ordering::SeqCst);
    let _ = receiver.join();
    let c = counts.lock().unwrap();
    let mut total = Counts::default();
    let line = |name: &str, c: &Counts| {
        let other: u64 =
            c.rcodes.iter().sum::<u64>() - c.rcodes[0] - c.rcodes[2] - c.rcodes[3] - c.rcodes[5];
        println!(
            "phase {name}: sent {} answered {} noerror {} nxdomain {} servfail {} refused {} other {} timeouts {} max_ms {} wrong {}",
            c.sent, c.answered, c.rcodes[0], c.rcodes[3], c.rcodes[2], c.rcodes[5], other, c.timeouts, c.max_ms, c.wrong
        );
    };
    for (name, c) in phases.iter().zip(c.iter()) {
        line(name, c);
        total.sent += c.sent;
        total.answered += c.answered;
        total.timeouts += c.timeouts;
        total.wrong += c.wrong;
        total.max_ms = total.max_ms.max(c.max_ms);
        for k in 0..16 {
            total.rcodes[k] += c.rcodes[k];
        }
    }
    line("total", &total);
    let f = fails.lock().unwrap();
    if !f.is_empty() {
        let list: Vec<String> = f.iter().map(|(s, n)| format!("{s}:{n}")).collect();
        println!("failures: {}", list.join(" "));
    }
}
