//! The DNS-aware health probe: an authoritative SOA query per zone, and its verdict.
//!
//! A backend passes only if, for every zone, it answers the SOA query with the same question,
//! RCODE NOERROR, the AA bit set and (optionally) a serial at least `min_serial`. REFUSED (a
//! server without the zone), SERVFAIL, NXDOMAIN, a non-authoritative answer, garbage or a
//! timeout is a failure with its reason. The active checker
//! ([`crate::controlplane::health`]) and `lb ctl set-backends --verify` both use
//! [`probe_backend`]; it needs nothing from the rest of the proxy.

use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::wire;

/// Why a backend failed a check: a probe's verdict, or what passive detection saw on live
/// traffic. Stored in a backend as a `u8` so the hot path's state stays atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ProbeFailure {
    None = 0,
    Timeout,
    Refused,
    Servfail,
    Nxdomain,
    OtherRcode,
    NotAuthoritative,
    NoSoa,
    SerialTooLow,
    Garbage,
    Network,
    PassiveTimeouts,
    NotChecked,
}

impl ProbeFailure {
    pub const ALL: [ProbeFailure; 12] = [
        ProbeFailure::Timeout,
        ProbeFailure::Refused,
        ProbeFailure::Servfail,
        ProbeFailure::Nxdomain,
        ProbeFailure::OtherRcode,
        ProbeFailure::NotAuthoritative,
        ProbeFailure::NoSoa,
        ProbeFailure::SerialTooLow,
        ProbeFailure::Garbage,
        ProbeFailure::Network,
        ProbeFailure::PassiveTimeouts,
        ProbeFailure::NotChecked,
    ];

    pub fn from_u8(v: u8) -> ProbeFailure {
        Self::ALL
            .into_iter()
            .find(|r| *r as u8 == v)
            .unwrap_or(ProbeFailure::None)
    }

    /// The `reason` label and status text.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeFailure::None => "ok",
            ProbeFailure::Timeout => "timeout",
            ProbeFailure::Refused => "refused",
            ProbeFailure::Servfail => "servfail",
            ProbeFailure::Nxdomain => "nxdomain",
            ProbeFailure::OtherRcode => "bad-rcode",
            ProbeFailure::NotAuthoritative => "not-authoritative",
            ProbeFailure::NoSoa => "no-soa",
            ProbeFailure::SerialTooLow => "serial-too-low",
            ProbeFailure::Garbage => "garbage",
            ProbeFailure::Network => "network-error",
            ProbeFailure::PassiveTimeouts => "passive-timeouts",
            ProbeFailure::NotChecked => "not-checked-yet",
        }
    }
}

/// A failed probe: the reason and a human detail (zone, rcode, serial...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    pub reason: ProbeFailure,
    pub detail: String,
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason.as_str(), self.detail)
    }
}

/// Checks one answer to an SOA probe.
pub fn check_answer(
    query: &[u8],
    answer: &[u8],
    min_serial: Option<u32>,
) -> Result<u32, ProbeFailure> {
    let q = wire::question(query).map_err(|_| ProbeFailure::Garbage)?;
    let h = wire::header(answer).map_err(|_| ProbeFailure::Garbage)?;
    if !h.qr || h.id != wire::id(query) || !wire::answer_matches(query, Some(&q), answer) {
        return Err(ProbeFailure::Garbage);
    }
    match h.rcode {
        0 => {}
        2 => return Err(ProbeFailure::Servfail),
        3 => return Err(ProbeFailure::Nxdomain),
        5 => return Err(ProbeFailure::Refused),
        _ => return Err(ProbeFailure::OtherRcode),
    }
    if !h.aa {
        return Err(ProbeFailure::NotAuthoritative);
    }
    let serial = wire::soa_serial(answer).ok_or(ProbeFailure::NoSoa)?;
    if min_serial.is_some_and(|m| serial < m) {
        return Err(ProbeFailure::SerialTooLow);
    }
    Ok(serial)
}

async fn probe_udp(addr: std::net::SocketAddr, query: &[u8]) -> Result<Vec<u8>, ProbeFailure> {
    let local: std::net::SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(local)
        .await
        .map_err(|_| ProbeFailure::Network)?;
    sock.connect(addr)
        .await
        .map_err(|_| ProbeFailure::Network)?;
    sock.send(query).await.map_err(|_| ProbeFailure::Network)?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            // ECONNREFUSED: nothing listens there.
            Err(_) => return Err(ProbeFailure::Network),
        };
        // Ignore stray datagrams with another ID; the caller's timeout bounds the wait.
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn probe_tcp(addr: std::net::SocketAddr, query: &[u8]) -> Result<Vec<u8>, ProbeFailure> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|_| ProbeFailure::Network)?;
    let mut frame = (query.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(query);
    s.write_all(&frame)
        .await
        .map_err(|_| ProbeFailure::Network)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .await
        .map_err(|_| ProbeFailure::Network)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)
        .await
        .map_err(|_| ProbeFailure::Network)?;
    Ok(buf)
}

/// Probes one backend for every zone (UDP, and TCP too if `tcp`), each within `timeout`.
/// Returns the lowest serial seen.
pub async fn probe_backend(
    addr: std::net::SocketAddr,
    zones: &[Vec<u8>],
    min_serial: Option<u32>,
    tcp: bool,
    timeout: Duration,
) -> Result<u32, ProbeError> {
    let mut lowest = u32::MAX;
    for zone in zones {
        lowest = lowest.min(probe_zone(addr, zone, min_serial, tcp, timeout).await?);
    }
    Ok(lowest)
}

/// Probes one backend for every zone, like [`probe_backend`], and returns each zone's serial.
pub async fn probe_serials(
    addr: std::net::SocketAddr,
    zones: &[Vec<u8>],
    min_serial: Option<u32>,
    tcp: bool,
    timeout: Duration,
) -> Result<Vec<u32>, ProbeError> {
    let mut serials = Vec::with_capacity(zones.len());
    for zone in zones {
        serials.push(probe_zone(addr, zone, min_serial, tcp, timeout).await?);
    }
    Ok(serials)
}

/// Probes one backend for one zone (wire-format name) over UDP, and TCP too if `tcp`, each
/// within `timeout`; returns the zone's serial (the lower one if the two transports differ).
pub async fn probe_zone(
    addr: std::net::SocketAddr,
    zone: &[u8],
    min_serial: Option<u32>,
    tcp: bool,
    timeout: Duration,
) -> Result<u32, ProbeError> {
    let zone_text = zone_to_text(zone);
    let mut lowest = u32::MAX;
    for use_tcp in [false, true] {
        if use_tcp && !tcp {
            continue;
        }
        let query = wire::build_query(rand::rng().random(), zone, 6);
        let fut = async {
            if use_tcp {
                probe_tcp(addr, &query).await
            } else {
                probe_udp(addr, &query).await
            }
        };
        let proto = if use_tcp { "tcp" } else { "udp" };
        let answer = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(a)) => a,
            Ok(Err(reason)) => {
                return Err(ProbeError {
                    reason,
                    detail: format!("SOA {zone_text} over {proto}"),
                })
            }
            Err(_) => {
                return Err(ProbeError {
                    reason: ProbeFailure::Timeout,
                    detail: format!("SOA {zone_text} over {proto}, no answer in {timeout:?}"),
                })
            }
        };
        match check_answer(&query, &answer, min_serial) {
            Ok(serial) => lowest = lowest.min(serial),
            Err(reason) => {
                let serial = wire::soa_serial(&answer)
                    .map(|s| format!(", serial {s}"))
                    .unwrap_or_default();
                return Err(ProbeError {
                    reason,
                    detail: format!("SOA {zone_text} over {proto}{serial}"),
                });
            }
        }
    }
    Ok(lowest)
}

/// Most queries one [`ask_tcp`] sends (they are told apart by their IDs).
pub const MAX_ASK: usize = 65_535;

/// Sends whole DNS `queries` to `addr` pipelined over TCP (RFC 7766) and returns the answers
/// in the order of the queries. Each query's ID is replaced by its position, which is how the
/// answers (in any order) are matched, along with their question. Every answer must come
/// within `timeout` of the previous one (or of the connection); a connection the server closes
/// early (a limit on queries per connection) is opened again for the rest as long as the last
/// one brought answers.
///
/// The writer runs beside the reader, so a server that answers while it reads never stalls
/// both sides on full buffers.
pub async fn ask_tcp(
    addr: std::net::SocketAddr,
    queries: &[Vec<u8>],
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, String> {
    if queries.len() > MAX_ASK {
        return Err(format!(
            "{} queries, at most {MAX_ASK} at once",
            queries.len()
        ));
    }
    let queries: Vec<Vec<u8>> = queries
        .iter()
        .enumerate()
        .map(|(k, q)| {
            let mut q = q.clone();
            if q.len() >= wire::HEADER_LEN {
                wire::set_id(&mut q, k as u16);
            }
            q
        })
        .collect();
    let questions: Vec<Option<wire::Question>> =
        queries.iter().map(|q| wire::question(q).ok()).collect();
    let mut answers: Vec<Option<Vec<u8>>> = vec![None; queries.len()];
    let mut left = queries.len();
    while left > 0 {
        let before = left;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} over TCP: no answer in {timeout:?}"))?
            .map_err(|e| format!("connecting to {addr} over TCP: {e}"))?;
        let (mut rd, mut wr) = stream.into_split();
        let mut frames = Vec::new();
        for (k, q) in queries.iter().enumerate() {
            if answers[k].is_none() {
                frames.extend_from_slice(&(q.len() as u16).to_be_bytes());
                frames.extend_from_slice(q);
            }
        }
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&frames).await;
            // Keep the write side open: some servers close at once on EOF.
            wr
        });
        let mut closed = None;
        while left > 0 {
            let mut len = [0u8; 2];
            let read = async {
                rd.read_exact(&mut len).await?;
                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                rd.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            };
            let msg = match tokio::time::timeout(timeout, read).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    closed = Some(e.to_string());
                    break;
                }
                Err(_) => {
                    writer.abort();
                    return Err(format!(
                        "{addr} over TCP: no answer in {timeout:?} ({} of {} answered)",
                        queries.len() - left,
                        queries.len()
                    ));
                }
            };
            if msg.len() < wire::HEADER_LEN {
                continue;
            }
            let k = usize::from(wire::id(&msg));
            if k < queries.len()
                && answers[k].is_none()
                && wire::answer_matches(&queries[k], questions[k].as_ref(), &msg)
            {
                answers[k] = Some(msg);
                left -= 1;
            }
        }
        writer.abort();
        if left > 0 && left == before {
            return Err(format!(
                "{addr} closed the TCP connection without answering ({}; {} of {} answered)",
                closed.unwrap_or_default(),
                queries.len() - left,
                queries.len()
            ));
        }
    }
    Ok(answers.into_iter().flatten().collect())
}

/// A wire-format name in presentation form (`example.test.`).
pub fn zone_to_text(wire_name: &[u8]) -> String {
    let mut out = String::new();
    let mut p = 0;
    while p < wire_name.len() && wire_name[p] != 0 {
        let l = wire_name[p] as usize;
        out.push_str(&String::from_utf8_lossy(
            &wire_name[p + 1..(p + 1 + l).min(wire_name.len())],
        ));
        out.push('.');
        p += 1 + l;
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(query: &[u8], flags: u8, rcode: u8, serial: Option<u32>) -> Vec<u8> {
        let mut r = query.to_vec();
        r[2] = 0x80 | flags;
        r[3] = rcode;
        if let Some(s) = serial {
            r[7] = 1;
            r.extend_from_slice(&[0xc0, 12, 0, 6, 0, 1, 0, 0, 0, 60]);
            let rdata: Vec<u8> =
                [&[0xc0, 12][..], &[0xc0, 12], &s.to_be_bytes(), &[0; 16]].concat();
            r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            r.extend_from_slice(&rdata);
        }
        r
    }

    #[test]
    fn judges_answers_like_an_authoritative_check() {
        let q = wire::build_query(77, &wire::encode_name("example.test.").unwrap(), 6);
        assert_eq!(check_answer(&q, &answer(&q, 0x04, 0, Some(5)), None), Ok(5));
        assert_eq!(
            check_answer(&q, &answer(&q, 0x04, 0, Some(5)), Some(6)),
            Err(ProbeFailure::SerialTooLow)
        );
        assert_eq!(
            check_answer(&q, &answer(&q, 0x00, 0, Some(5)), None),
            Err(ProbeFailure::NotAuthoritative)
        );
        assert_eq!(
            check_answer(&q, &answer(&q, 0x00, 5, None), None),
            Err(ProbeFailure::Refused)
        );
        assert_eq!(
            check_answer(&q, &answer(&q, 0x04, 2, None), None),
            Err(ProbeFailure::Servfail)
        );
        assert_eq!(
            check_answer(&q, &answer(&q, 0x04, 3, None), None),
            Err(ProbeFailure::Nxdomain)
        );
        assert_eq!(
            check_answer(&q, &answer(&q, 0x04, 0, None), None),
            Err(ProbeFailure::NoSoa)
        );
        assert_eq!(
            check_answer(&q, &[1, 2, 3], None),
            Err(ProbeFailure::Garbage)
        );
        let mut other = answer(&q, 0x04, 0, Some(5));
        other[0] ^= 1;
        assert_eq!(check_answer(&q, &other, None), Err(ProbeFailure::Garbage));
    }
}
