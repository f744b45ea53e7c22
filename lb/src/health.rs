//! DNS-aware health checks: an authoritative SOA probe per zone, active and passive.
//!
//! A backend is healthy only if, for every configured zone, it answers the SOA query with the
//! same question, RCODE NOERROR, the AA bit set and (optionally) a serial at least
//! `min_serial`. REFUSED (a server without the zone), SERVFAIL, NXDOMAIN, a non-authoritative
//! answer, garbage or a timeout is a failure with its reason kept. The same [`probe_backend`] is
//! used by `lb ctl set-backends --verify`.
//!
//! Health lives in each [`Backend`]'s atomics, which are part of the snapshot the hot path
//! reads: a flip is one atomic store on the same object whichever snapshot is current, so it
//! cannot race a swap. One probe at most is in flight per backend; the checker probes the
//! backends of the current set only, so a removed backend's probes stop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Notify;

use crate::backend::{Backend, Shared};
use crate::wire;

/// What the proxy does with a query when no backend is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllDown {
    /// Keep sending to every undrained backend, as a last resort.
    #[default]
    FailOpen,
    /// Answer SERVFAIL at once (resolvers then try another nameserver).
    Servfail,
    /// Drop the query.
    Drop,
}

impl AllDown {
    pub fn as_str(self) -> &'static str {
        match self {
            AllDown::FailOpen => "fail-open",
            AllDown::Servfail => "servfail",
            AllDown::Drop => "drop",
        }
    }
}

/// `[health]`: active and passive checks; may change at run time (reload).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Active checks run when true and `zones` is non-empty; with `[health]` present, zones are
    /// required unless `enabled = false`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Zones whose SOA each backend must serve authoritatively, e.g. `["example.test."]`.
    #[serde(default)]
    pub zones: Vec<String>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes for a down backend to come back up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures for an up backend to go down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Also probe over TCP (the proxy forwards TCP too).
    #[serde(default)]
    pub tcp: bool,
    /// Lowest acceptable SOA serial (for every zone), if set.
    #[serde(default)]
    pub min_serial: Option<u32>,
    /// Consecutive UDP query timeouts on live traffic that mark a backend down before the next
    /// probe would (0 turns passive checks off).
    #[serde(default = "default_passive_timeouts")]
    pub passive_timeouts: u32,
    /// What happens to queries when every backend is down.
    #[serde(default)]
    pub all_down: AllDown,
    /// Deadline for `set-backends --verify` probes.
    #[serde(default = "default_verify_timeout_ms")]
    pub verify_timeout_ms: u64,
}

fn default_true() -> bool {
    true
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_passive_timeouts() -> u32 {
    10
}
fn default_verify_timeout_ms() -> u64 {
    2000
}

impl Default for HealthConfig {
    /// No `[health]` section: no active checks (there is no zone to ask for), passive checks
    /// on, fail-open.
    fn default() -> Self {
        HealthConfig {
            enabled: false,
            zones: Vec::new(),
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            rise: default_rise(),
            fall: default_fall(),
            tcp: false,
            min_serial: None,
            passive_timeouts: default_passive_timeouts(),
            all_down: AllDown::FailOpen,
            verify_timeout_ms: default_verify_timeout_ms(),
        }
    }
}

impl HealthConfig {
    /// True when active probes run.
    pub fn active(&self) -> bool {
        self.enabled && !self.zones.is_empty()
    }

    /// Checks the section; the message names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.enabled && self.zones.is_empty() {
            return Err((
                "health.zones".into(),
                "at least one zone is required when health checks are on (or set enabled = false)"
                    .into(),
            ));
        }
        for z in &self.zones {
            wire::encode_name(z).map_err(|m| ("health.zones".to_string(), m))?;
        }
        for (k, v) in [
            ("health.interval_ms", self.interval_ms),
            ("health.timeout_ms", self.timeout_ms),
            ("health.verify_timeout_ms", self.verify_timeout_ms),
        ] {
            if v == 0 {
                return Err((k.into(), "must be greater than 0".into()));
            }
        }
        for (k, v) in [("health.rise", self.rise), ("health.fall", self.fall)] {
            if v == 0 || v > 100 {
                return Err((k.into(), format!("{v} is outside 1..=100")));
            }
        }
        Ok(())
    }

    /// The zones as wire-format names (validated at load).
    pub fn zone_names(&self) -> Vec<Vec<u8>> {
        self.zones
            .iter()
            .filter_map(|z| wire::encode_name(z).ok())
            .collect()
    }
}

/// Why a probe failed. Stored in a backend as a `u8` so the hot path's state stays atomic.
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
    if !h.qr || h.id != wire::id(query) || !wire::same_question(query, &q, answer) {
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
        let zone_text = zone_to_text(zone);
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
    }
    Ok(lowest)
}

fn zone_to_text(wire_name: &[u8]) -> String {
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

/// Applies one probe result to a backend, flipping it at `rise`/`fall` and logging the flip.
pub fn record_result(backend: &Backend, result: &Result<u32, ProbeError>, rise: u32, fall: u32) {
    let st = &backend.state;
    match result {
        Ok(_) => {
            st.health_fail.store(0, Ordering::Relaxed);
            st.passive_timeouts.store(0, Ordering::Relaxed);
            let ok = st.health_ok.fetch_add(1, Ordering::Relaxed) + 1;
            let never_checked = st.reason() == ProbeFailure::NotChecked;
            if !st.is_up() && (ok >= rise || never_checked) {
                st.set_up(true);
                st.set_reason(ProbeFailure::None);
                tracing::info!("backend {} is up", backend.addr);
            } else if st.is_up() {
                st.set_reason(ProbeFailure::None);
            }
        }
        Err(e) => {
            st.health_ok.store(0, Ordering::Relaxed);
            st.count_health_failure(e.reason);
            let failed = st.health_fail.fetch_add(1, Ordering::Relaxed) + 1;
            let first_check = st.reason() == ProbeFailure::NotChecked;
            st.set_reason(e.reason);
            if st.is_up() && failed >= fall {
                st.set_up(false);
                tracing::warn!("backend {} is down: {e}", backend.addr);
            } else if first_check {
                tracing::warn!("backend {} is down: {e}", backend.addr);
            }
        }
    }
}

/// Settings the active checker reads each round (rebuilt on reload).
#[derive(Debug, Clone)]
pub struct CheckerSettings {
    pub zones: Vec<Vec<u8>>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub tcp: bool,
    pub min_serial: Option<u32>,
}

impl CheckerSettings {
    pub fn from_config(c: &HealthConfig) -> Option<CheckerSettings> {
        c.active().then(|| CheckerSettings {
            zones: c.zone_names(),
            interval: Duration::from_millis(c.interval_ms),
            timeout: Duration::from_millis(c.timeout_ms),
            rise: c.rise,
            fall: c.fall,
            tcp: c.tcp,
            min_serial: c.min_serial,
        })
    }
}

/// Probes every backend of the current set once, concurrently, and waits for the results.
pub async fn probe_round(shared: &Arc<Shared>, s: &CheckerSettings) {
    let set = shared.current();
    let mut tasks = Vec::new();
    for b in &set.backends {
        if let Some(t) = spawn_probe(b, s) {
            tasks.push(t);
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Starts a probe of `b` unless one is already in flight.
fn spawn_probe(b: &Arc<Backend>, s: &CheckerSettings) -> Option<tokio::task::JoinHandle<()>> {
    if b.state.probe_running.swap(true, Ordering::AcqRel) {
        return None;
    }
    let b = Arc::clone(b);
    let s = s.clone();
    Some(tokio::spawn(async move {
        let r = probe_backend(b.addr, &s.zones, s.min_serial, s.tcp, s.timeout).await;
        record_result(&b, &r, s.rise, s.fall);
        b.state.probe_running.store(false, Ordering::Release);
    }))
}

/// The active checker: probes the current set every interval, and at once when `wake` is
/// notified (a swap added backends). Settings are re-read from `settings` each round.
pub async fn run_checker(
    shared: Arc<Shared>,
    settings: Arc<arc_swap::ArcSwapOption<CheckerSettings>>,
    wake: Arc<Notify>,
) {
    loop {
        let s = settings.load_full();
        let interval = s.as_ref().map_or(Duration::from_secs(1), |s| s.interval);
        if let Some(s) = s {
            let set = shared.current();
            for b in &set.backends {
                spawn_probe(b, &s);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => {}
        }
    }
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

    #[test]
    fn rise_and_fall() {
        let b = Backend::new("127.0.0.1:53".parse().unwrap());
        b.state.set_up(false);
        b.state.set_reason(ProbeFailure::NotChecked);
        let ok: Result<u32, ProbeError> = Ok(1);
        let bad: Result<u32, ProbeError> = Err(ProbeError {
            reason: ProbeFailure::Refused,
            detail: String::new(),
        });
        record_result(&b, &ok, 2, 3);
        assert!(b.state.is_up(), "first success of a never-checked backend");
        record_result(&b, &bad, 2, 3);
        record_result(&b, &bad, 2, 3);
        assert!(b.state.is_up());
        record_result(&b, &bad, 2, 3);
        assert!(!b.state.is_up());
        assert_eq!(b.state.reason(), ProbeFailure::Refused);
        record_result(&b, &ok, 2, 3);
        assert!(!b.state.is_up(), "rise = 2");
        record_result(&b, &ok, 2, 3);
        assert!(b.state.is_up());
        assert_eq!(b.state.reason(), ProbeFailure::None);
        assert_eq!(b.state.health_failures(ProbeFailure::Refused), 3);
    }
}
