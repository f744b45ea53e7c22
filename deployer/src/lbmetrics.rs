//! Reading an lb's `/metrics`: the counters the drain and the canary judge by.
//!
//! lb exposes Prometheus text; only the few series the deployer needs are kept, in an
//! [`LbSnapshot`]. Backend series exist only while a backend is in the lb's set (or still
//! draining after a swap), so a window between two snapshots is computed per backend
//! ([`LbSnapshot::window`]), never from totals that would jump when a series disappears.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// What could not be read, naming the address.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("GET http://{addr}/metrics: {message}")]
    Fetch { addr: SocketAddr, message: String },
    #[error("no lb_queries_total in the metrics at {0}")]
    NotLb(SocketAddr),
}

/// One backend's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BackendCounters {
    /// `lb_backend_queries_total`.
    pub queries: f64,
    /// `lb_backend_timeouts_total`.
    pub timeouts: f64,
    /// `lb_backend_answer_duration_seconds_count`.
    pub answered: f64,
    /// `lb_backend_answer_duration_seconds_sum`.
    pub answer_secs: f64,
}

/// The series of one scrape the deployer uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LbSnapshot {
    /// `lb_queries_total`, every protocol.
    pub queries: f64,
    /// `lb_responses_total`, every RCODE.
    pub responses: f64,
    /// `lb_responses_total{rcode="SERVFAIL"}`.
    pub servfail: f64,
    /// `process_start_time_seconds` (changes when the lb process is replaced).
    pub start_time: Option<f64>,
    /// Per backend address (as lb prints it).
    pub backends: BTreeMap<String, BackendCounters>,
}

/// Counts over the time between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub responses: f64,
    pub servfail: f64,
    pub backend_queries: f64,
    pub timeouts: f64,
    pub answered: f64,
    pub answer_secs: f64,
}

impl Window {
    /// SERVFAIL answers over all answers (0 without answers).
    pub fn servfail_ratio(&self) -> f64 {
        ratio(self.servfail, self.responses)
    }
    /// Backend queries that timed out over those settled (answered or timed out; 0 without
    /// any). Queries still in flight at the end of the window are left out: they would count
    /// as neither and make a backend that drops everything look better than it is.
    pub fn timeout_ratio(&self) -> f64 {
        ratio(self.timeouts, self.timeouts + self.answered)
    }
    /// Mean time from forwarding a query to its answer, in milliseconds (`None` without one).
    pub fn mean_answer_ms(&self) -> Option<f64> {
        (self.answered > 0.0).then(|| self.answer_secs / self.answered * 1000.0)
    }
    pub fn add(&mut self, o: &Window) {
        self.responses += o.responses;
        self.servfail += o.servfail;
        self.backend_queries += o.backend_queries;
        self.timeouts += o.timeouts;
        self.answered += o.answered;
        self.answer_secs += o.answer_secs;
    }
}

fn ratio(n: f64, d: f64) -> f64 {
    if d > 0.0 {
        n / d
    } else {
        0.0
    }
}

/// A counter's increase; a counter that went down was reset (a restart), so all of its
/// value is new.
fn delta(before: f64, after: f64) -> f64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

impl LbSnapshot {
    /// The lb's counts between `before` and `self`, its backend counters taken only from the
    /// backends in `backends` (the set it serves from in the window).
    pub fn window(&self, before: &LbSnapshot, backends: &[String]) -> Window {
        let mut w = Window {
            responses: delta(before.responses, self.responses),
            servfail: delta(before.servfail, self.servfail),
            ..Window::default()
        };
        let wanted: Vec<String> = backends.iter().map(|b| normalise(b)).collect();
        for (addr, now) in &self.backends {
            if !wanted.contains(&normalise(addr)) {
                continue;
            }
            let was = before.backends.get(addr).copied().unwrap_or_default();
            w.backend_queries += delta(was.queries, now.queries);
            w.timeouts += delta(was.timeouts, now.timeouts);
            w.answered += delta(was.answered, now.answered);
            w.answer_secs += delta(was.answer_secs, now.answer_secs);
        }
        w
    }
}

fn normalise(a: &str) -> String {
    a.parse::<SocketAddr>()
        .map_or_else(|_| a.trim().to_string(), |s| s.to_string())
}

/// Scrapes `http://ADDR/metrics`.
pub fn scrape(addr: SocketAddr, timeout: Duration) -> Result<LbSnapshot, MetricsError> {
    let fetch = |message: String| MetricsError::Fetch { addr, message };
    let client = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| fetch(format!("cannot build an HTTP client: {e}")))?;
    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .map_err(|e| fetch(e.to_string()))?;
    parse(&text).ok_or(MetricsError::NotLb(addr))
}

/// Reads the series of [`LbSnapshot`] from a Prometheus text exposition; `None` when it has
/// no `lb_queries_total` (not an lb).
pub fn parse(text: &str) -> Option<LbSnapshot> {
    let mut s = LbSnapshot::default();
    let mut seen_queries = false;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series.trim(), ""),
        };
        let label = |key: &str| -> Option<String> {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        match name {
            "lb_queries_total" => {
                seen_queries = true;
                s.queries += v;
            }
            "lb_responses_total" => {
                s.responses += v;
                if label("rcode").as_deref() == Some("SERVFAIL") {
                    s.servfail += v;
                }
            }
            "process_start_time_seconds" => s.start_time = Some(v),
            "lb_backend_queries_total"
            | "lb_backend_timeouts_total"
            | "lb_backend_answer_duration_seconds_count"
            | "lb_backend_answer_duration_seconds_sum" => {
                let Some(b) = label("backend") else { continue };
                let c = s.backends.entry(b).or_default();
                match name {
                    "lb_backend_queries_total" => c.queries += v,
                    "lb_backend_timeouts_total" => c.timeouts += v,
                    "lb_backend_answer_duration_seconds_count" => c.answered += v,
                    _ => c.answer_secs += v,
                }
            }
            _ => {}
        }
    }
    seen_queries.then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP lb_queries_total q\n# TYPE lb_queries_total counter\nlb_queries_total{protocol=\"udp\"} 10\nlb_queries_total{protocol=\"tcp\"} 2.5\nlb_queries_total_other 99\nlb_responses_total{rcode=\"NOERROR\"} 90\nlb_responses_total{rcode=\"SERVFAIL\"} 10\nlb_backend_queries_total{backend=\"127.0.0.1:5301\"} 100\nlb_backend_timeouts_total{backend=\"127.0.0.1:5301\"} 4\nlb_backend_answer_duration_seconds_bucket{backend=\"127.0.0.1:5301\",le=\"0.001\"} 90\nlb_backend_answer_duration_seconds_sum{backend=\"127.0.0.1:5301\"} 0.192\nlb_backend_answer_duration_seconds_count{backend=\"127.0.0.1:5301\"} 96\nprocess_start_time_seconds 1700000000\n";

    #[test]
    fn reads_the_series_the_deployer_needs() {
        let s = parse(TEXT).unwrap();
        assert_eq!(s.queries, 12.5);
        assert_eq!((s.responses, s.servfail), (100.0, 10.0));
        assert_eq!(s.start_time, Some(1.7e9));
        let b = s.backends["127.0.0.1:5301"];
        assert_eq!((b.queries, b.timeouts, b.answered), (100.0, 4.0, 96.0));
        assert!((b.answer_secs - 0.192).abs() < 1e-9);
        assert_eq!(parse("lb_answers_total 3\n"), None);
    }

    #[test]
    fn windows_count_per_backend_and_survive_resets_and_swaps() {
        let before = parse(TEXT).unwrap();
        let mut after = before.clone();
        after.responses = 300.0;
        after.servfail = 10.0;
        // A backend that appeared in the window (after a swap) counts from zero; one that is
        // not in the set given is ignored.
        after.backends.insert(
            "127.0.0.1:5302".into(),
            BackendCounters {
                queries: 50.0,
                timeouts: 5.0,
                answered: 45.0,
                answer_secs: 0.09,
            },
        );
        let w = after.window(&before, &["127.0.0.1:5302".to_string()]);
        assert_eq!((w.responses, w.servfail), (200.0, 0.0));
        assert_eq!((w.backend_queries, w.timeouts), (50.0, 5.0));
        assert!((w.timeout_ratio() - 0.1).abs() < 1e-9);
        assert!((w.mean_answer_ms().unwrap() - 2.0).abs() < 1e-9);
        // A counter that went down was reset: its whole value is new.
        after.responses = 40.0;
        assert_eq!(after.window(&before, &[]).responses, 40.0);
        assert_eq!(Window::default().servfail_ratio(), 0.0);
        assert_eq!(Window::default().mean_answer_ms(), None);
    }
}
