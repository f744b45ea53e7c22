//! A spoofed-source flood for the rate-limiting benchmark: clients on N addresses of one /24
//! ask NAME (TXT, EDNS 1232) at RATE queries a second for SECS seconds, while a client on
//! GOOD asks the same name 10 times a second. Prints one line:
//! `sent N bytes_sent N full N slipped N bytes_received N good_sent N good_full N`.
//!
//! Usage: cargo run --release -p integration-tests --example rrlflood -- \
//!        TARGET RATE SECS [PREFIX=127.0.1] [CLIENTS=50] [GOOD=127.0.2.1] [NAME=medium.example.test.]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 1]);
    for l in name.trim_end_matches('.').split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 16, 0, 1]);
    // OPT: UDP payload 1232, no options.
    m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    m
}

/// Reads what `s` has; returns (full answers, slipped, bytes).
fn drain(s: &UdpSocket, buf: &mut [u8]) -> (u64, u64, u64) {
    let (mut full, mut slipped, mut bytes) = (0, 0, 0);
    while let Ok(n) = s.recv(buf) {
        bytes += n as u64;
        if n >= 12 && buf[2] & 0x02 != 0 {
            slipped += 1;
        } else if n >= 12 && u16::from_be_bytes([buf[6], buf[7]]) > 0 {
            full += 1;
        }
    }
    (full, slipped, bytes)
}

/// What came back: full answers and slips to the flooded prefix, its bytes, and the good
/// client's full answers.
#[derive(Default)]
struct Counts {
    full: u64,
    slipped: u64,
    bytes_received: u64,
    good_full: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let target: SocketAddr = arg(0, "127.0.0.1:53").parse().expect("TARGET is IP:PORT");
    let rate: f64 = arg(1, "5000").parse().expect("RATE");
    let secs: u64 = arg(2, "10").parse().expect("SECS");
    let prefix = arg(3, "127.0.1");
    let clients: usize = arg(4, "50").parse().expect("CLIENTS");
    let good_addr = arg(5, "127.0.2.1");
    let name = arg(6, "medium.example.test.");
    let socks: Vec<UdpSocket> = (1..=clients)
        .map(|i| {
            let s = UdpSocket::bind(format!("{prefix}.{i}:0")).expect("bind a flood address");
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let good = UdpSocket::bind(format!("{good_addr}:0")).expect("bind the good client");
    good.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 65535];
    let (mut sent, mut bytes_sent, mut good_sent) = (0u64, 0u64, 0u64);
    let mut counts = Counts::default();
    // Reads every flood socket and the good client's.
    let drain_all = |buf: &mut [u8], c: &mut Counts| {
        for s in &socks {
            let (f, sl, b) = drain(s, buf);
            c.full += f;
            c.slipped += sl;
            c.bytes_received += b;
        }
        c.good_full += drain(&good, buf).0;
    };
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = t0;
    let mut next_good = t0;
    let mut id: u16 = 0;
    while Instant::now() < end {
        let now = Instant::now();
        while next <= now {
            id = id.wrapping_add(1);
            let q = query(id, &name);
            if socks[(sent as usize) % socks.len()]
                .send_to(&q, target)
                .is_ok()
            {
                sent += 1;
                bytes_sent += q.len() as u64;
            }
            next += interval;
        }
        if next_good <= now {
            let _ = good.send_to(&query(id, &name), target);
            good_sent += 1;
            next_good += Duration::from_millis(100);
        }
        drain_all(&mut buf, &mut counts);
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    drain_all(&mut buf, &mut counts);
    let Counts {
        full,
        slipped,
        bytes_received,
        good_full,
    } = counts;
    println!(
        "sent {sent} bytes_sent {bytes_sent} full {full} slipped {slipped} bytes_received {bytes_received} good_sent {good_sent} good_full {good_full}"
    );
}
