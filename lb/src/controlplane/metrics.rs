//! Prometheus metrics over HTTP (`GET /metrics`, `GET /healthz`).
//!
//! The per-packet path only does relaxed atomic adds on counters it already owns
//! ([`crate::stats::Stats`] and each backend's [`crate::backend::BackendState`]); nothing is
//! looked up by label per packet. At scrape time [`LbCollector`] reads those atomics and builds
//! the metric families, so a backend's series exist exactly while it is in the current set or
//! still draining answers after a swap (no unbounded label growth). The `prometheus` crate
//! (without protobuf) provides the data model, the process collector and the text encoder.
//!
//! `lb_build_info{version, revision}`: the version is the crate's, the revision what
//! `lb/build.rs` found (`LB_BUILD_REVISION` if set, else `git describe --always --dirty`, else
//! `unknown`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::backend::{Backend, Shared};
use crate::cache::FlushReason;
use crate::config::AllDown;
use crate::lifecycle::Lifecycle;
use crate::probe::ProbeFailure;
use crate::rrl::Action;
use crate::stats::{
    BatchOp, Denied, DropKind, DropReason, HistogramSnapshot, OpRecord, Outcome, Proto,
    LATENCY_BUCKETS,
};

/// The git revision lb was built from (see `lb/build.rs`).
pub const BUILD_REVISION: &str = env!("LB_BUILD_REVISION");

/// The Prometheus form of a latency histogram.
fn histogram_proto(s: &HistogramSnapshot) -> proto::Histogram {
    let mut h = proto::Histogram::default();
    let buckets = LATENCY_BUCKETS
        .iter()
        .zip(s.cumulative)
        .map(|(ub, n)| {
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*ub);
            b.set_cumulative_count(n);
            b
        })
        .collect();
    h.set_bucket(buckets);
    h.set_sample_count(s.count);
    h.set_sample_sum(s.sum_seconds);
    h
}

/// One metric family under construction.
struct Family {
    mf: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, t: MetricType) -> Family {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(t);
        Family { mf }
    }

    fn metric(labels: &[(&str, &str)]) -> proto::Metric {
        let mut m = proto::Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        m
    }

    fn counter(&mut self, labels: &[(&str, &str)], v: u64) {
        let mut m = Self::metric(labels);
        let mut c = proto::Counter::default();
        c.set_value(v as f64);
        m.set_counter(c);
        self.mf.mut_metric().push(m);
    }

    fn gauge(&mut self, labels: &[(&str, &str)], v: f64) {
        let mut m = Self::metric(labels);
        let mut g = proto::Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
        self.mf.mut_metric().push(m);
    }

    fn histogram(&mut self, labels: &[(&str, &str)], h: proto::Histogram) {
        let mut m = Self::metric(labels);
        m.set_histogram(h);
        self.mf.mut_metric().push(m);
    }
}

/// Family names, help texts, types and label names; also the collector's descriptors.
const FAMILIES: [(&str, &str, MetricType, &[&str]); 42] = [
    (
        "lb_queries_total",
        "Queries received from clients, by protocol.",
        MetricType::COUNTER,
        &["protocol"],
    ),
    (
        "lb_responses_total",
        "Answers sent to clients, by RCODE.",
        MetricType::COUNTER,
        &["rcode"],
    ),
    (
        "lb_dropped_total",
        "Deprecated, removed in the next release: lb_dropped_packets_total and lb_dropped_connections_total together.",
        MetricType::COUNTER,
        &["reason"],
    ),
    (
        "lb_all_down_total",
        "Queries that found every backend down, by the behaviour applied.",
        MetricType::COUNTER,
        &["behaviour"],
    ),
    (
        "lb_backend_queries_total",
        "Queries forwarded to a backend.",
        MetricType::COUNTER,
        &["backend"],
    ),
    (
        "lb_backend_answers_total",
        "Answers received from a backend and matched.",
        MetricType::COUNTER,
        &["backend"],
    ),
    (
        "lb_backend_timeouts_total",
        "Queries a backend did not answer in time.",
        MetricType::COUNTER,
        &["backend"],
    ),
    (
        "lb_backend_answer_duration_seconds",
        "Time from forwarding a query to its matched answer.",
        MetricType::HISTOGRAM,
        &["backend"],
    ),
    (
        "lb_backend_in_flight",
        "Queries in flight to a backend.",
        MetricType::GAUGE,
        &["backend"],
    ),
    (
        "lb_backend_up",
        "1 if the backend passes its health checks, else 0.",
        MetricType::GAUGE,
        &["backend"],
    ),
    (
        "lb_backend_draining",
        "1 if the backend is drained by the operator, else 0.",
        MetricType::GAUGE,
        &["backend"],
    ),
    (
        "lb_backend_health_check_failures_total",
        "Failed health checks, by reason.",
        MetricType::COUNTER,
        &["backend", "reason"],
    ),
    (
        "lb_backend_set_generation",
        "Generation of the backend set in force.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_backend_set_swaps_total",
        "Backend set swaps (set-backends, reloads) since start.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_tcp_connections_open",
        "Client TCP connections open.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_tcp_connections_total",
        "Client TCP connections accepted.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_build_info",
        "Build information: the version and the git revision lb was built from; always 1.",
        MetricType::GAUGE,
        &["version", "revision"],
    ),
    (
        "lb_udp_batches_total",
        "UDP system calls that moved datagrams (recvmmsg, sendmmsg), by operation.",
        MetricType::COUNTER,
        &["op"],
    ),
    (
        "lb_udp_batch_datagrams_total",
        "Datagrams moved by those system calls, by operation.",
        MetricType::COUNTER,
        &["op"],
    ),
    (
        "lb_rrl_responses_total",
        "UDP answers seen by response rate limiting, by what happened to them.",
        MetricType::COUNTER,
        &["action"],
    ),
    (
        "lb_rrl_limited_prefixes",
        "Client prefixes with anything limited within the last RRL window.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_access_denied_total",
        "Queries the access lists refused or dropped, by reason.",
        MetricType::COUNTER,
        &["reason"],
    ),
    (
        "lb_state_file_write_failures_total",
        "Writes of the state file that failed (a swap or drain was refused).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_swap_failures_total",
        "set-backends refused (invalid list, failed verification, state file not writable).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_cache_hits_total",
        "Queries answered from the packet cache.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_cache_misses_total",
        "Cacheable queries not found in the packet cache (forwarded).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_cache_entries",
        "Answers in the packet cache valid now.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_cache_flushes_total",
        "Packet cache flushes, by reason: swap, reload, serial (a zone's serial changed).",
        MetricType::COUNTER,
        &["reason"],
    ),
    (
        "lb_upstream_socket_failures_total",
        "Upstream UDP sockets (random source ports) that could not be opened; the ones in use stay.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_tcp_queued_answer_bytes",
        "Bytes of answers waiting for slow TCP clients, all connections together (at most tcp.max_queued_bytes).",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_dropped_packets_total",
        "Datagrams, frames, queries or answers dropped, by reason.",
        MetricType::COUNTER,
        &["reason"],
    ),
    (
        "lb_dropped_connections_total",
        "TCP client connections refused or closed by lb, by reason.",
        MetricType::COUNTER,
        &["reason"],
    ),
    (
        "lb_backend_zone_serial",
        "SOA serial of each zone of health.zones a backend served at its last probe (absent while its probes fail).",
        MetricType::GAUGE,
        &["backend", "zone"],
    ),
    (
        "lb_reloads_total",
        "Config reloads (lb ctl reload, SIGHUP), by result.",
        MetricType::COUNTER,
        &["result"],
    ),
    (
        "lb_upgrades_total",
        "Binary upgrades (lb ctl upgrade, SIGUSR2), by result; continued across upgrades.",
        MetricType::COUNTER,
        &["result"],
    ),
    (
        "lb_last_reload_success_timestamp_seconds",
        "Time of the last successful config load: a reload, or the start.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_last_upgrade_success_timestamp_seconds",
        "Time of the last successful upgrade hand-over; 0 if none.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_last_swap_success_timestamp_seconds",
        "Time of the last backend set swap (set-backends, reloads); 0 if none.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_state_file_write_failing",
        "1 from a failed write of the state file until the next successful one.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_last_swap_failed",
        "1 from a refused set-backends until the next successful swap.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_last_reload_failed",
        "1 from a refused reload until the next successful one.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_last_upgrade_failed",
        "1 from a failed upgrade until the next successful one.",
        MetricType::GAUGE,
        &[],
    ),
];

const RCODES: [&str; 16] = [
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
    "DSOTYPENI",
    "RCODE12",
    "RCODE13",
    "RCODE14",
    "RCODE15",
];

/// Reads the proxy's atomics at scrape time.
pub struct LbCollector {
    shared: Arc<Shared>,
    descs: Vec<Desc>,
}

impl LbCollector {
    pub fn new(shared: Arc<Shared>) -> LbCollector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .expect("static metric descriptors are valid")
            })
            .collect();
        LbCollector { shared, descs }
    }
}

impl Collector for LbCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut f: Vec<Family> = FAMILIES
            .iter()
            .map(|(n, h, t, _)| Family::new(n, h, *t))
            .collect();
        let st = &self.shared.stats;
        f[0].counter(&[("protocol", "udp")], st.queries(Proto::Udp));
        f[0].counter(&[("protocol", "tcp")], st.queries(Proto::Tcp));
        for (i, name) in RCODES.iter().enumerate() {
            let n = st.responses(i as u8);
            if n > 0 || i < 6 {
                f[1].counter(&[("rcode", name)], n);
            }
        }
        for r in DropReason::ALL {
            let l = [("reason", r.as_str())];
            f[2].counter(&l, st.drops(r));
            let i = match r.kind() {
                DropKind::Packet => 30,
                DropKind::Connection => 31,
            };
            f[i].counter(&l, st.drops(r));
        }
        for m in [AllDown::FailOpen, AllDown::Servfail, AllDown::Drop] {
            f[3].counter(&[("behaviour", m.as_str())], st.all_down_count(m));
        }
        let set = self.shared.current();
        let mut backends: Vec<Arc<Backend>> = set.backends.clone();
        for b in self.shared.draining_retired() {
            if !backends.iter().any(|x| x.addr == b.addr) {
                backends.push(b);
            }
        }
        for b in &set.backends {
            let addr = b.addr.to_string();
            for (zone, serial) in b.state.zone_serials() {
                f[32].gauge(
                    &[("backend", addr.as_str()), ("zone", zone.as_str())],
                    f64::from(serial),
                );
            }
        }
        for b in &backends {
            let addr = b.addr.to_string();
            let l = [("backend", addr.as_str())];
            let s = &b.state;
            f[4].counter(&l, s.queries.load(Ordering::Relaxed));
            f[5].counter(&l, s.answers.load(Ordering::Relaxed));
            f[6].counter(&l, s.timeouts.load(Ordering::Relaxed));
            f[7].histogram(&l, histogram_proto(&s.latency.snapshot()));
            f[8].gauge(&l, s.outstanding() as f64);
            f[9].gauge(&l, if s.is_up() { 1.0 } else { 0.0 });
            f[10].gauge(&l, if s.is_draining() { 1.0 } else { 0.0 });
            for r in ProbeFailure::ALL {
                if r == ProbeFailure::NotChecked {
                    continue;
                }
                f[11].counter(
                    &[("backend", addr.as_str()), ("reason", r.as_str())],
                    s.health_failures(r),
                );
            }
        }
        f[12].gauge(&[], set.generation as f64);
        f[13].counter(&[], st.swaps.count(Outcome::Success));
        f[14].gauge(&[], st.tcp_open.load(Ordering::Relaxed) as f64);
        f[15].counter(&[], st.tcp_total.load(Ordering::Relaxed));
        f[16].gauge(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", BUILD_REVISION),
            ],
            1.0,
        );
        for op in [BatchOp::Recv, BatchOp::Send] {
            let (calls, datagrams) = st.batches(op);
            f[17].counter(&[("op", op.as_str())], calls);
            f[18].counter(&[("op", op.as_str())], datagrams);
        }
        let rrl = &self.shared.rrl;
        for (a, n) in Action::ALL.iter().zip(rrl.actions()) {
            f[19].counter(&[("action", a.as_str())], n);
        }
        f[20].gauge(&[], rrl.limited_now() as f64);
        for d in Denied::ALL {
            f[21].counter(&[("reason", d.as_str())], st.denied_count(d));
        }
        f[22].counter(&[], st.state_writes.count(Outcome::Failure));
        f[23].counter(&[], st.swaps.count(Outcome::Failure));
        let cache = self.shared.cache.as_deref();
        f[24].counter(&[], cache.map_or(0, |c| c.hits()));
        f[25].counter(&[], cache.map_or(0, |c| c.misses()));
        f[26].gauge(
            &[],
            cache.map_or(0, |c| c.entries(c.epoch(set.generation))) as f64,
        );
        for r in FlushReason::ALL {
            f[27].counter(&[("reason", r.as_str())], cache.map_or(0, |c| c.flushes(r)));
        }
        f[28].counter(&[], st.upstream_socket_failures.load(Ordering::Relaxed));
        f[29].gauge(&[], st.tcp_queued_bytes.load(Ordering::Relaxed) as f64);
        let outcomes = |f: &mut Family, r: &OpRecord| {
            for o in Outcome::ALL {
                f.counter(&[("result", o.as_str())], r.count(o));
            }
        };
        outcomes(&mut f[33], &st.reloads);
        outcomes(&mut f[34], &st.upgrades);
        f[35].gauge(&[], st.reloads.last_success_seconds());
        f[36].gauge(&[], st.upgrades.last_success_seconds());
        f[37].gauge(&[], st.swaps.last_success_seconds());
        let flag = |r: &OpRecord| if r.last_failed() { 1.0 } else { 0.0 };
        f[38].gauge(&[], flag(&st.state_writes));
        f[39].gauge(&[], flag(&st.swaps));
        f[40].gauge(&[], flag(&st.reloads));
        f[41].gauge(&[], flag(&st.upgrades));
        f.into_iter()
            .map(|x| x.mf)
            .filter(|mf| !mf.get_metric().is_empty())
            .collect()
    }
}

/// The registry: the proxy's collector plus the process collector (RSS, CPU, fds).
pub fn registry(shared: Arc<Shared>) -> Registry {
    let r = Registry::new();
    r.register(Box::new(LbCollector::new(shared)))
        .expect("the lb collector registers once");
    let _ = r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    r
}

/// Renders the text exposition format.
///
/// Every family of [`FAMILIES`] is announced even before its first series exists (its
/// `# HELP` and `# TYPE` lines alone), so dashboards and alert rules can rely on every name
/// from the first scrape.
pub fn render(r: &Registry) -> String {
    let families = r.gather();
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&families, &mut out);
    let mut text = String::from_utf8(out).unwrap_or_default();
    for (name, help, t, _) in FAMILIES {
        if !families.iter().any(|mf| mf.name() == name) {
            let t = match t {
                MetricType::COUNTER => "counter",
                MetricType::GAUGE => "gauge",
                MetricType::HISTOGRAM => "histogram",
                MetricType::SUMMARY => "summary",
                MetricType::UNTYPED => "untyped",
            };
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {t}\n"));
        }
    }
    text
}

/// Scrape connections served at once.
const MAX_SCRAPERS: usize = 16;

/// Serves `/metrics` and `/healthz` until `stop` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, lifecycle: Arc<Lifecycle>) {
    let registry = Arc::new(registry(Arc::clone(&shared)));
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = lifecycle.stopped() => return,
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let registry = Arc::clone(&registry);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = Arc::clone(&registry);
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(respond(&req, &registry, &shared)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    registry: &Registry,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(registry),
        ),
        (&hyper::Method::GET, "/healthz") => {
            let set = shared.current();
            let up = set.backends.iter().filter(|b| b.is_usable()).count();
            if up > 0 {
                (
                    StatusCode::OK,
                    "text/plain",
                    format!("ok: {up} of {} backends usable\n", set.backends.len()),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no usable backend\n".to_string(),
                )
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Binds the metrics listener.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context;
    let l = crate::sockets::build_tcp_listener(addr)
        .with_context(|| format!("cannot bind metrics listener {addr}"))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SetParams;
    use crate::config::BackendAddr;

    fn shared(addrs: &[&str]) -> Arc<Shared> {
        let params = SetParams {
            policy: crate::policy::Policy::RoundRobin,
            timeout: Duration::from_secs(1),
            resend_after: Duration::from_millis(100),
            all_down: AllDown::FailOpen,
            passive_timeouts: 0,
            checked: false,
            access: Arc::default(),
            rrl: None,
        };
        let list: Vec<BackendAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
        Arc::new(Shared::new(params, &list, 1, 64))
    }

    /// The value of one sample line (`name{labels} value`) of a scrape.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_family_is_exported_from_the_first_scrape() {
        let text = render(&registry(shared(&["127.0.0.1:53"])));
        for (name, _, _, _) in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert_eq!(
            sample(&text, "lb_reloads_total{result=\"failure\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&text, "lb_state_file_write_failing"), Some(0.0));
        assert_eq!(
            sample(&text, "lb_last_upgrade_success_timestamp_seconds"),
            Some(0.0)
        );
        let info = format!(
            "lb_build_info{{version=\"{}\",revision=\"{BUILD_REVISION}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &info), Some(1.0), "{text}");
        assert!(!BUILD_REVISION.is_empty());
    }

    #[test]
    fn drops_are_split_into_packets_and_connections_and_still_summed() {
        let sh = shared(&["127.0.0.1:53"]);
        sh.stats.dropped(DropReason::ShortHeader);
        sh.stats.dropped(DropReason::TcpPrefixLimit);
        sh.stats.dropped(DropReason::TcpPrefixLimit);
        let text = render(&registry(Arc::clone(&sh)));
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("{s}:\n{text}"));
        assert_eq!(
            get("lb_dropped_packets_total{reason=\"short-header\"}"),
            1.0
        );
        assert_eq!(
            get("lb_dropped_connections_total{reason=\"tcp-prefix-limit\"}"),
            2.0
        );
        assert_eq!(get("lb_dropped_total{reason=\"tcp-prefix-limit\"}"), 2.0);
        assert!(sample(
            &text,
            "lb_dropped_packets_total{reason=\"tcp-prefix-limit\"}"
        )
        .is_none());
        assert!(sample(
            &text,
            "lb_dropped_connections_total{reason=\"short-header\"}"
        )
        .is_none());
    }

    #[test]
    fn failing_gauges_stay_set_until_a_success_and_serials_are_per_backend_and_zone() {
        let sh = shared(&["127.0.0.1:53", "127.0.0.2:53"]);
        let st = &sh.stats;
        st.state_writes.failed();
        st.swaps.failed();
        st.reloads.failed();
        st.upgrades.failed();
        let text = render(&registry(Arc::clone(&sh)));
        for g in [
            "lb_state_file_write_failing",
            "lb_last_swap_failed",
            "lb_last_reload_failed",
            "lb_last_upgrade_failed",
        ] {
            assert_eq!(sample(&text, g), Some(1.0), "{g}");
        }
        assert_eq!(sample(&text, "lb_swap_failures_total"), Some(1.0));
        assert_eq!(
            sample(&text, "lb_state_file_write_failures_total"),
            Some(1.0)
        );
        // A swap clears the swap gauge and dates it; the others stay set.
        let list: Vec<BackendAddr> = vec!["127.0.0.1:53".parse().unwrap()];
        sh.replace(Some(&list), None, true, |_| Ok(())).unwrap();
        st.reloads.succeeded();
        let set = sh.current();
        let zones = ["example.test.".to_string(), "other.test.".to_string()];
        set.backends[0]
            .state
            .set_zone_serials(&zones, Some(&[2026010101, 7]));
        let text = render(&registry(Arc::clone(&sh)));
        assert_eq!(sample(&text, "lb_last_swap_failed"), Some(0.0));
        assert_eq!(sample(&text, "lb_last_reload_failed"), Some(0.0));
        assert_eq!(sample(&text, "lb_state_file_write_failing"), Some(1.0));
        assert_eq!(sample(&text, "lb_last_upgrade_failed"), Some(1.0));
        assert_eq!(sample(&text, "lb_backend_set_swaps_total"), Some(1.0));
        assert!(sample(&text, "lb_last_swap_success_timestamp_seconds").unwrap() > 1.6e9);
        assert_eq!(
            sample(
                &text,
                "lb_backend_zone_serial{backend=\"127.0.0.1:53\",zone=\"example.test.\"}"
            ),
            Some(2026010101.0)
        );
        assert_eq!(
            sample(
                &text,
                "lb_backend_zone_serial{backend=\"127.0.0.1:53\",zone=\"other.test.\"}"
            ),
            Some(7.0)
        );
        // A failed probe forgets the serials.
        set.backends[0].state.set_zone_serials(&zones, None);
        let text = render(&registry(Arc::clone(&sh)));
        assert!(!text.contains("lb_backend_zone_serial{"), "{text}");
    }
}
