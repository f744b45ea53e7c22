//! A pipelined DNS-over-TCP load generator for the peer benchmark (dnsperf's TCP mode does not
//! pipeline enough to load a proxy): CONNS persistent connections, each keeping DEPTH queries
//! in flight, for SECS seconds. Prints `qps N answered N errors N`.
//!
//! Usage: cargo run --release -p integration-tests --example tcpload -- ADDR [CONNS] [DEPTH] [SECS]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn query(id: u16, i: usize) -> Vec<u8> {
    let name = format!("a{}.example.test.", i % 250);
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.trim_end_matches('.').split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut f = (m.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(&m);
    f
}

fn run(addr: SocketAddr, depth: usize, dur: Duration) -> (u64, u64) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, 1);
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let (mut answered, mut errors, mut next) = (0u64, 0u64, 0usize);
    let start = Instant::now();
    let mut batch = Vec::new();
    for _ in 0..depth {
        batch.extend_from_slice(&query(next as u16, next));
        next += 1;
    }
    if s.write_all(&batch).is_err() {
        return (0, 1);
    }
    let mut in_flight = depth;
    let mut len = [0u8; 2];
    let mut buf = vec![0u8; 65535];
    while in_flight > 0 {
        if s.read_exact(&mut len).is_err() {
            errors += 1;
            break;
        }
        let n = u16::from_be_bytes(len) as usize;
        if s.read_exact(&mut buf[..n]).is_err() {
            errors += 1;
            break;
        }
        answered += 1;
        in_flight -= 1;
        if start.elapsed() < dur {
            if s.write_all(&query(next as u16, next)).is_err() {
                errors += 1;
                break;
            }
            next += 1;
            in_flight += 1;
        }
    }
    (answered, errors)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: tcpload ADDR [CONNS] [DEPTH] [SECS]");
    let conns: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(8);
    let depth: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(20);
    let secs: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(10);
    let start = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|_| std::thread::spawn(move || run(addr, depth, Duration::from_secs(secs))))
        .collect();
    let (mut answered, mut errors) = (0, 0);
    for h in handles {
        let (a, e) = h.join().unwrap_or((0, 1));
        answered += a;
        errors += e;
    }
    let qps = answered as f64 / start.elapsed().as_secs_f64();
    println!("qps {qps:.0} answered {answered} errors {errors}");
}
