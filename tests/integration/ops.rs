//! Operations: the Debian packages (`scripts/package.sh`), the Grafana dashboard and the
//! Prometheus alert rules of `lb/dist/`, checked for real: promtool, a live `lb` in front of
//! real BIND, a real Prometheus scraping it, `dpkg -i` on this machine, the Ansible role in
//! `system` mode, lintian.
//!
//! The package tests install the `lb` package on the machine running the tests (as CI does) and
//! purge it afterwards; they take a lock so that two of them never run `dpkg` at once, and
//! refuse to touch an `lb` package they did not install.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use integration_tests::ansible::{changed_count, local_host, run_playbook};
use integration_tests::*;
use serde_json::{json, Value};

/// Metric families the dashboard and the alert rules use that `lb` does not export yet (RRL,
/// cache, state file and swap failure counters, being added in lb/src). The one place to edit:
/// when a family lands, remove it here and the tests require it from a live lb (they fail while
/// a family listed here is exported, as a reminder).
const PENDING_METRICS: &[&str] = &[];

/// Series Prometheus makes itself for every target (not in `/metrics`).
const SCRAPE_SERIES: &[&str] = &["up"];

/// Families `lb` still exports for one release but the dashboard and the rules must no longer
/// use (docs/reference.md, Metrics): `lb_dropped_total` is `lb_dropped_packets_total` and
/// `lb_dropped_connections_total` together.
const DEPRECATED_METRICS: &[&str] = &["lb_dropped_total"];

/// Where the rules' `runbook_url`s point: docs/runbooks.md as the package installs it
/// (docs/runbooks.md, The alerts).
const RUNBOOK_BASE: &str = "file:///usr/share/doc/lb/runbooks.md";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn dist(file: &str) -> PathBuf {
    repo().join("lb/dist").join(file)
}

// ---------------------------------------------------------------------------------------------
// PromQL and the two artefacts

/// Metric names referenced by a PromQL expression (also with Grafana variables in it): every
/// identifier that is not a function, keyword, label name (in `{}` or a grouping clause),
/// range, string or variable.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Binary operators and modifiers, and the aggregation operators, which may be followed by
    // `by (...)` before their parenthesis.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'{' | b'[' => {
                let close = if c == b'{' { b'}' } else { b']' };
                // Label matchers and ranges; strings inside may hold a brace.
                i += 1;
                while i < b.len() && b[i] != close {
                    if b[i] == b'"' {
                        i += 1;
                        while i < b.len() && b[i] != b'"' {
                            i += if b[i] == b'\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            b'(' if skip_group => {
                // The label list of by/without/on/ignoring/group_*.
                while i < b.len() && b[i] != b')' {
                    i += 1;
                }
                i += 1;
                skip_group = false;
            }
            b'$' => {
                // A Grafana variable: $name or ${name}.
                i += 1;
                if i < b.len() && b[i] == b'{' {
                    while i < b.len() && b[i] != b'}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    skip_group = j < b.len() && b[j] == b'(';
                } else if j < b.len() && b[j] == b'(' {
                    // A function call.
                } else if !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word.to_string());
                }
            }
            b'0'..=b'9' | b'.' => {
                // Numbers and durations (1e9, 0.99, 5m).
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The families of a scrape, from its `# TYPE name type` lines.
fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_string(), t.trim().to_string()))
        .collect()
}

/// The family a metric name belongs to (`x_bucket`, `x_sum`, `x_count` of a histogram `x`).
fn family_of(name: &str, families: &BTreeMap<String, String>) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(
            families.get(base).map(String::as_str),
            Some("histogram" | "summary")
        )
        .then(|| base.to_string())
    })
}

fn pending_base(name: &str) -> Option<&'static str> {
    pending_base_in(PENDING_METRICS, name)
}

fn pending_base_in(pending: &[&'static str], name: &str) -> Option<&'static str> {
    pending.iter().copied().find(|p| {
        name == *p
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s) == Some(p))
    })
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(dist("grafana-dashboard.json")).unwrap();
    serde_json::from_str(&text).expect("grafana-dashboard.json is valid JSON")
}

/// Every panel, including those nested in collapsed rows.
fn all_panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(ps: &'a Value, out: &mut Vec<&'a Value>) {
        for p in ps.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// (panel title, expr) of every query of the dashboard.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    all_panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

/// (annotation name, expr) of every Prometheus annotation of the dashboard.
fn annotation_exprs(d: &Value) -> Vec<(String, String)> {
    d["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["datasource"]["type"] == "prometheus")
        .map(|a| {
            (
                a["name"].as_str().unwrap_or("").to_string(),
                a["expr"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A YAML file as JSON, read by the Python YAML module that ansible-core brings (tests/venv).
pub(crate) fn yaml(path: &Path) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python3 with PyYAML (from the .tools/venv of install-deps.sh) reads {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (alert name, rule) of every alerting rule.
fn alert_rules() -> Vec<(String, Value)> {
    let rules = yaml(&dist("prometheus-alerts.yml"));
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter_map(|r| Some((r["alert"].as_str()?.to_string(), r.clone())))
        .collect()
}

/// Every metric name used by the dashboard and the rules, with where it is used.
fn used_metric_names() -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (title, expr) in dashboard_exprs(&dashboard()) {
        for n in metric_names(&expr) {
            used.entry(n)
                .or_default()
                .insert(format!("panel \"{title}\""));
        }
    }
    for (name, expr) in annotation_exprs(&dashboard()) {
        for n in metric_names(&expr) {
            used.entry(n)
                .or_default()
                .insert(format!("annotation \"{name}\""));
        }
    }
    for (alert, rule) in alert_rules() {
        for n in metric_names(rule["expr"].as_str().unwrap()) {
            used.entry(n).or_default().insert(format!("alert {alert}"));
        }
    }
    used
}

#[test]
fn promql_metric_names_skip_functions_labels_and_variables() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (backend, le) (rate(lb_backend_answer_duration_seconds_bucket{job=~"$job", instance=~"$instance"}[$__rate_interval])))"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["lb_backend_answer_duration_seconds_bucket".to_string()])
    );
    let names = metric_names(
        r#"(lb_backend_up{job="lb"} == 0) unless on(job, instance, backend) (lb_backend_draining{job="lb", x="a}b"} == 1) or absent(up{job="lb"}) and time() - process_start_time_seconds > 1e3"#,
    );
    let want: BTreeSet<String> = [
        "lb_backend_up",
        "lb_backend_draining",
        "up",
        "process_start_time_seconds",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, want);
    let pending = &["lb_example_seconds", "lb_example_total"];
    assert_eq!(
        pending_base_in(pending, "lb_example_total"),
        Some("lb_example_total")
    );
    assert_eq!(
        pending_base_in(pending, "lb_example_seconds_bucket"),
        Some("lb_example_seconds")
    );
    assert_eq!(pending_base_in(pending, "lb_queries_total"), None);
}

// ---------------------------------------------------------------------------------------------
// The dashboard and the rules on their own

#[test]
fn dashboard_is_grafana_json_with_datasource_and_instance_variables_and_unique_panel_ids() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 39,
        "schema of current Grafana"
    );
    assert!(d["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert_eq!(instance["datasource"]["uid"], "${datasource}");
    assert!(instance["definition"]
        .as_str()
        .unwrap()
        .starts_with("label_values("));
    assert_eq!(instance["includeAll"], true);
    assert_eq!(instance["multi"], true);

    let panels = all_panels(&d);
    let mut ids = BTreeSet::new();
    for p in &panels {
        let id = p["id"].as_u64().expect("every panel has a numeric id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24 && g["h"].as_u64().unwrap() > 0, "gridPos {g}");
        if p["type"] == "row" {
            continue;
        }
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "untitled panel {id}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        let targets = p["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {id}");
            assert!(
                refs.insert(t["refId"].as_str().unwrap()),
                "panel {id} refId"
            );
            let expr = t["expr"].as_str().unwrap();
            // Every selector is narrowed to the chosen instances.
            for name in metric_names(expr) {
                let with_sel = format!("{name}{{job=~\"$job\", instance=~\"$instance\"}}");
                assert!(
                    expr.contains(&with_sel),
                    "panel \"{}\": {name} without the $job/$instance selector in {expr}",
                    p["title"]
                );
            }
        }
    }
    // Annotations for swaps, upgrades and restarts, narrowed to the chosen instances too.
    let annotations = annotation_exprs(&d);
    for (name, needed) in [
        ("Swaps", "lb_backend_set_generation"),
        ("Upgrades", "lb_upgrades_total"),
        ("Restarts", "process_start_time_seconds"),
    ] {
        let (_, expr) = annotations
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no annotation {name}"));
        assert!(metric_names(expr).contains(needed), "{name}: {expr}");
    }
    for (name, expr) in &annotations {
        assert!(!expr.is_empty(), "annotation {name} has no expr");
        for m in metric_names(expr) {
            assert!(
                expr.contains(&format!("{m}{{job=~\"$job\", instance=~\"$instance\"")),
                "annotation {name}: {m} without the $job/$instance selector in {expr}"
            );
        }
    }
    // A table by instance of the generation and the live backends (not their maximum).
    let table = panels
        .iter()
        .find(|p| p["type"] == "table" && p["title"].as_str().unwrap().contains("generation"))
        .expect("a table panel of the generation per instance");
    let exprs: Vec<&str> = table["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["format"], "table", "{t}");
            t["expr"].as_str().unwrap()
        })
        .collect();
    for needed in [
        "lb_backend_set_generation",
        "lb_backend_up",
        "lb_backend_draining",
    ] {
        let e = exprs
            .iter()
            .find(|e| metric_names(e).contains(needed))
            .unwrap_or_else(|| panic!("the instances table shows no {needed}"));
        assert!(e.contains("by (job, instance"), "per instance: {e}");
    }
    // Expanded rows own no panels; collapsed rows carry theirs.
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" && p["collapsed"] == false {
            assert!(p["panels"].as_array().is_none_or(|x| x.is_empty()));
        }
    }
    // What the issue asks to see, by family.
    let used = used_metric_names();
    for needed in [
        "lb_queries_total",
        "lb_responses_total",
        "lb_backend_answer_duration_seconds_bucket",
        "lb_backend_up",
        "lb_backend_draining",
        "lb_backend_in_flight",
        "lb_backend_timeouts_total",
        "lb_dropped_packets_total",
        "lb_dropped_connections_total",
        "lb_backend_zone_serial",
        "lb_build_info",
        "lb_reloads_total",
        "lb_upgrades_total",
        "lb_state_file_write_failing",
        "lb_last_swap_failed",
        "lb_backend_set_swaps_total",
        "lb_backend_set_generation",
        "lb_tcp_connections_open",
        "lb_udp_batch_datagrams_total",
        "lb_udp_batches_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "lb_rrl_responses_total",
        "lb_cache_hits_total",
    ] {
        assert!(used.contains_key(needed), "the dashboard shows no {needed}");
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_every_alert_is_unit_tested_both_ways() {
    let run = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dist(""))
            .output()
            .expect("promtool (apt-get install prometheus)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    let text = run(&["check", "rules", "prometheus-alerts.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    let text = run(&["test", "rules", "prometheus-alerts.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");

    let alerts = alert_rules();
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for issue_alert in [
        "LbBackendDown",
        "LbAllBackendsDown",
        "LbBackendTimeouts",
        "LbDropsRising",
        "LbDown",
        "LbNotScraped",
        "LbRrlLimiting",
        "LbStateFileWriteFailures",
        "LbSwapFailures",
        "LbCrashLooping",
        "LbServfailRatioHigh",
        "LbRefusedRatioHigh",
        "LbBackendLatencyHigh",
        "LbZoneSerialDrift",
        "LbReloadFailed",
        "LbUpgradeFailed",
    ] {
        assert!(names.contains(issue_alert), "no alert {issue_alert}");
    }
    let tests = yaml(&dist("prometheus-alerts.test.yml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    let runbooks = std::fs::read_to_string(repo().join("docs/runbooks.md")).unwrap();
    for (name, rule) in &alerts {
        let fires = cases.iter().any(|c| {
            c["alertname"] == name.as_str()
                && c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())
        });
        let quiet = cases.iter().any(|c| {
            c["alertname"] == name.as_str()
                && c["exp_alerts"].as_array().is_none_or(|a| a.is_empty())
        });
        assert!(
            fires && quiet,
            "{name}: needs a firing and a not-firing unit test"
        );
        for key in ["summary", "description", "runbook", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: no {key} annotation"
            );
        }
        // The link goes to the runbook's heading of the alert (GitHub-style anchor).
        assert_eq!(
            rule["annotations"]["runbook_url"].as_str().unwrap(),
            format!("{RUNBOOK_BASE}#{}", name.to_lowercase()),
            "{name}: runbook_url"
        );
        assert!(
            ["critical", "warning", "info"].contains(&rule["labels"]["severity"].as_str().unwrap()),
            "{name}: severity"
        );
        assert!(
            runbooks.contains(&format!("#### {name}\n")),
            "docs/runbooks.md has no runbook paragraph \"#### {name}\""
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Against a live lb

fn health_config(backends: &[SocketAddr]) -> String {
    lb_config(
        backends,
        "round-robin",
        "\n[health]\nzones = [\"example.test.\"]\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 2\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
}

#[test]
fn dashboard_and_rules_use_only_families_a_live_lb_exports_from_start() {
    let ns = Named::start(ZoneSpec::new(1, "a"));
    let lb = Lb::start(&health_config(&[ns.addr]));
    // Before any query: every family must already be there (with zero values, or at least its
    // # TYPE line), so that dashboards and alerts work before the first event.
    let scrape = lb.scrape();
    let fams = families(&scrape);
    let mut missing = Vec::new();
    let mut landed = Vec::new();
    for (name, used_by) in used_metric_names() {
        if SCRAPE_SERIES.contains(&name.as_str()) {
            continue;
        }
        let found = family_of(&name, &fams);
        match (pending_base(&name), found) {
            (None, None) => missing.push(format!("{name} (used by {used_by:?})")),
            (Some(p), Some(_)) => landed.push(p),
            _ => {}
        }
    }
    assert!(
        missing.is_empty(),
        "metric families used by lb/dist but not exported by a freshly started lb (no # TYPE line):\n  {}\n----- /metrics -----\n{scrape}",
        missing.join("\n  ")
    );
    assert!(
        landed.is_empty(),
        "{landed:?} are exported now: remove them from PENDING_METRICS in tests/integration/ops.rs"
    );
    // And the other way round: every lb family has a place on the dashboard, except the
    // deprecated ones, which are still exported but no longer used.
    let used = used_metric_names();
    let used_families: BTreeSet<String> = used.keys().filter_map(|n| family_of(n, &fams)).collect();
    for old in DEPRECATED_METRICS {
        assert!(fams.contains_key(*old), "{old} is kept for one release");
        assert!(
            !used_families.contains(*old),
            "{old} is deprecated: used by {:?}",
            used.get(*old)
        );
    }
    let unshown: Vec<&String> = fams
        .keys()
        .filter(|f| {
            f.starts_with("lb_")
                && !used_families.contains(*f)
                && !DEPRECATED_METRICS.contains(&f.as_str())
        })
        .collect();
    assert!(
        unshown.is_empty(),
        "lb exports {unshown:?} but the dashboard and the rules never use them"
    );
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus (Debian `prometheus`) on a free port, scraping `target` every second as
/// job `lb`, with the alert rules loaded and evaluated every second.
struct Prometheus {
    addr: SocketAddr,
    _proc: Proc,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("prometheus");
        std::fs::copy(
            dist("prometheus-alerts.yml"),
            dir.path().join("prometheus-alerts.yml"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - prometheus-alerts.yml\nscrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prometheus (apt-get install prometheus)");
        let output = Output::default();
        let (tx, _rx) = std::sync::mpsc::channel();
        output.collect_lines(child.stderr.take().unwrap(), tx);
        let mut p = Proc {
            child,
            output,
            name: "prometheus".into(),
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200 {
                break;
            }
            assert!(p.is_running(), "prometheus exited:\n{}", p.output.text());
            assert!(
                Instant::now() < end,
                "prometheus not ready:\n{}",
                p.output.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Prometheus {
            addr,
            _proc: p,
            _dir: dir,
        }
    }

    /// `/api/v1/...` as JSON; panics unless the API says success.
    fn api(&self, path_and_query: &str) -> Value {
        let (status, body) = http_get(self.addr, path_and_query);
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path_and_query}: {e}: {status} {body}"));
        assert_eq!(v["status"], "success", "{path_and_query}: {body}");
        v["data"].clone()
    }

    fn query(&self, expr: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", percent_encode(expr)))["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// The dashboard's Grafana variables replaced for a direct query. Rates over 1m: the whole
/// test, so that every event of it counts.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", "lb")
        .replace("$instance", ".*")
}

#[test]
fn prometheus_evaluates_the_dashboard_and_the_rules_against_a_live_lb() {
    let a = Named::start(ZoneSpec::new(1, "a"));
    let mut b = Named::start(ZoneSpec::new(1, "b"));
    let lb = Lb::start(&health_config(&[a.addr, b.addr]));
    let prom = Prometheus::start(lb.metrics.unwrap());
    // Scraping starts a while after Prometheus is ready: rates need a sample from before the
    // traffic.
    let end = Instant::now() + Duration::from_secs(30);
    while prom.query("lb_build_info{job=\"lb\"}").is_empty() {
        assert!(Instant::now() < end, "prometheus never scraped lb");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Duration::from_secs(3);
    // Traffic of every kind the panels show: UDP and TCP queries, NXDOMAIN, a short datagram.
    for _ in 0..20 {
        udp_query(lb.udp(), "www.example.test.", RecordType::A, t).expect("answer");
        udp_query(lb.udp(), "nx.example.test.", RecordType::A, t).expect("answer");
    }
    for _ in 0..5 {
        tcp_query(lb.tcp(), "www.example.test.", RecordType::AAAA).expect("tcp answer");
    }
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(&[0, 1], lb.udp())
        .unwrap();
    // A backend dies: health checks take it down.
    b.stop();
    assert!(
        lb.wait_state(b.addr, "down", Duration::from_secs(5))
            .is_some(),
        "backend b marked down"
    );
    for _ in 0..10 {
        udp_query(lb.udp(), "www.example.test.", RecordType::A, t).expect("answer from a");
    }
    // Scrapes after all that: the down backend is seen, and every rate() over 1m has samples.
    let scrapes_since = Instant::now();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let n = prom.query("min(count_over_time(lb_backend_up{job=\"lb\"}[1m]))");
        let n: f64 = n
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
            .unwrap_or(0.0);
        let seen_down = !prom
            .query(&format!(
                "lb_backend_up{{job=\"lb\", backend=\"{}\"}} == 0",
                b.addr
            ))
            .is_empty();
        if seen_down && n >= 3.0 && scrapes_since.elapsed() >= Duration::from_secs(2) {
            break;
        }
        assert!(Instant::now() < end, "prometheus scraped too little ({n})");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Every query of the dashboard is valid PromQL; those on exported families return data.
    let d = dashboard();
    let mut empty = Vec::new();
    for (title, expr) in dashboard_exprs(&d) {
        let q = grafana_to_promql(&expr);
        let result = prom.query(&q);
        let pending = metric_names(&expr)
            .iter()
            .any(|n| pending_base(n).is_some());
        if result.is_empty() && !pending {
            empty.push(format!("\"{title}\": {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data against a live lb:\n  {}",
        empty.join("\n  ")
    );
    // The annotations' queries are valid PromQL (`query` asserts success); they are empty
    // while nothing was swapped, upgraded or restarted.
    for (name, expr) in annotation_exprs(&d) {
        let r = prom.query(&grafana_to_promql(&expr));
        assert!(r.is_empty(), "annotation {name} without an event: {r:?}");
    }
    // The build's revision is a label of lb_build_info.
    let info = prom.query("lb_build_info{job=\"lb\"}");
    let revision = info[0]["metric"]["revision"].as_str().unwrap_or("");
    assert!(!revision.is_empty(), "{info:?}");
    // The variables' queries too.
    let job_values = prom.api("/api/v1/label/job/values?match[]=lb_build_info");
    assert_eq!(job_values, json!(["lb"]));
    let instances = prom.api(&format!(
        "/api/v1/label/instance/values?match[]={}",
        percent_encode("lb_build_info{job=~\"lb\"}")
    ));
    assert_eq!(
        instances,
        json!([lb.metrics.unwrap().to_string()]),
        "$instance"
    );

    // Every rule evaluates without error; the dead backend's alert is on its way.
    let groups = prom.api("/api/v1/rules");
    let rules: Vec<&Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert_eq!(rules.len(), alert_rules().len());
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }
    let end = Instant::now() + Duration::from_secs(10);
    let alerts = loop {
        let alerts = prom.api("/api/v1/alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if alerts
            .iter()
            .any(|a| a["labels"]["alertname"] == "LbBackendDown")
        {
            break alerts;
        }
        assert!(
            Instant::now() < end,
            "LbBackendDown never became pending: {alerts:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let down: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["labels"]["alertname"] == "LbBackendDown")
        .collect();
    assert_eq!(down.len(), 1, "{alerts:?}");
    assert_eq!(down[0]["labels"]["backend"], b.addr.to_string());
    assert!(down[0]["state"] == "pending" || down[0]["state"] == "firing");
    let others: Vec<&Value> = alerts
        .iter()
        .map(|a| &a["labels"]["alertname"])
        .filter(|n| *n != "LbBackendDown")
        .collect();
    assert!(others.is_empty(), "unexpected alerts {others:?}");
}

// ---------------------------------------------------------------------------------------------
// The Debian packages

/// The test packages: the debug build packaged by `scripts/package.sh --profile dev --no-build
/// --fast` (scripts/test.sh does it first); rebuilt here when missing or older than
/// the binaries.
pub(crate) fn test_packages() -> &'static (PathBuf, PathBuf) {
    static PACKAGES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PACKAGES.get_or_init(|| {
        let lb_bin = bin("lb");
        let deployer_bin = bin("deployer");
        let target = lb_bin.parent().unwrap().parent().unwrap().to_path_buf();
        let out = target.join("debian-test");
        let find = |name: &str| -> Option<PathBuf> {
            std::fs::read_dir(&out)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| f.starts_with(&format!("{name}_")) && f.ends_with(".deb"))
                })
        };
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        // The packages also hold the files of lb/dist, deployer/dist, ansible/, the examples
        // and the documentation: a package older than any of them is stale too.
        let inputs = [
            "lb/dist",
            "lb/examples",
            "deployer/dist",
            "ansible",
            "README.md",
            "docs",
        ]
        .iter()
        .filter_map(|p| newest_mtime(&repo().join(p)))
        .max();
        let fresh = |deb: &Option<PathBuf>, bin: &Path| {
            deb.as_ref().is_some_and(|d| {
                mtime(bin).is_some() && mtime(d) >= mtime(bin) && mtime(d) >= inputs
            })
        };
        if !(fresh(&find("lb"), &lb_bin) && fresh(&find("deployer"), &deployer_bin)) {
            let _ = std::fs::remove_dir_all(&out);
            package(&target, &out, None);
        }
        (
            find("lb").expect("lb package built"),
            find("deployer").expect("deployer package built"),
        )
    })
}

/// The latest modification time of a file or of anything under a directory.
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .chain(own)
        .max()
}

/// Runs scripts/package.sh on the debug build; returns the paths it printed.
fn package(target: &Path, out: &Path, deb_version: Option<&str>) -> Vec<PathBuf> {
    let mut c = Command::new(repo().join("scripts/package.sh"));
    c.args(["--profile", "dev", "--no-build", "--fast", "--output"])
        .arg(out)
        .env("CARGO_TARGET_DIR", target);
    if let Some(v) = deb_version {
        c.args(["--deb-version", v]);
    }
    let o = c.output().expect("scripts/package.sh");
    assert!(
        o.status.success(),
        "scripts/package.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// Serializes the tests that run dpkg on this machine: a mutex within this process, an flock
/// across processes (two test runs at once).
struct DpkgLock {
    _guard: std::sync::MutexGuard<'static, ()>,
    _file: std::fs::File,
}

fn dpkg_lock() -> DpkgLock {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("lb-ops-tests-dpkg.lock"))
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; released when the file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    DpkgLock {
        _guard: guard,
        _file: file,
    }
}

/// Runs a command; returns (exit code, stdout + stderr). dpkg's lock, held by an apt run
/// elsewhere on the machine, is waited for (up to 2 minutes) instead of failing.
fn run(program: &str, args: &[&str]) -> (i32, String) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new(program)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let code = out.status.code().unwrap_or(-1);
        let locked = text.contains("frontend lock") || text.contains("database is locked");
        if code != 0 && locked && Instant::now() < end && program.starts_with("dpkg") {
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        return (code, text);
    }
}

fn dpkg_status(package: &str) -> String {
    run("dpkg-query", &["-W", "-f=${Status} ${Version}", package]).1
}

/// Written before the tests install the package, removed after they purge it: tells a package
/// left by a killed test run from one an operator installed.
const MARKER: &str = "/var/tmp/lb-ops-tests-installed-lb";

/// The `lb` package installed by a test: on drop, the lb processes the test started from it are
/// killed (by PID) and the package purged with whatever the role added.
struct InstalledLb {
    pids: Vec<u32>,
}

impl InstalledLb {
    fn prepare() -> InstalledLb {
        let status = dpkg_status("lb");
        if status.contains("installed") || status.contains("config-files") {
            assert!(
                Path::new(MARKER).exists(),
                "an lb package that these tests did not install is on this machine ({status}); \
                 the package tests would replace it: remove it first"
            );
            let (code, out) = run("dpkg", &["--purge", "lb"]);
            assert_eq!(code, 0, "purging a leftover test install: {out}");
        }
        std::fs::write(MARKER, "installed by tests/integration/ops.rs\n").unwrap();
        InstalledLb { pids: Vec::new() }
    }
}

impl Drop for InstalledLb {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = run("dpkg", &["--purge", "lb"]);
        for p in [
            "/etc/systemd/system/lb.socket.d",
            "/var/cache/lb",
            "/run/lb",
            "/var/lib/lb",
        ] {
            let _ = std::fs::remove_dir_all(p);
        }
        if !dpkg_status("lb").contains("installed") {
            let _ = std::fs::remove_file(MARKER);
        }
    }
}

/// Paths removed on drop (files a test put outside its own directories).
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The PID in lb's hand-over message ("upgraded to /usr/bin/lb (pid N); ...").
fn handed_over_pid(text: &str) -> Option<u32> {
    let rest = &text[text.find("upgraded to /usr/bin/lb (pid ")? + 29..];
    rest.split(')').next()?.parse().ok()
}

/// The Version field of a .deb.
fn deb_version(deb: &Path) -> String {
    let (code, out) = run("dpkg-deb", &["-f", deb.to_str().unwrap(), "Version"]);
    assert_eq!(code, 0, "dpkg-deb -f: {out}");
    out.trim().to_string()
}

/// A version above `base` (whatever scheme made it): for the upgrade tests.
fn newer_version(base: &str, tag: &str) -> String {
    let v = format!("{base}+{tag}");
    let (code, out) = run("dpkg", &["--compare-versions", &v, "gt", base]);
    assert_eq!(code, 0, "{v} > {base}: {out}");
    v
}

/// `dpkg --compare-versions a lt b`.
fn version_lt(a: &str, b: &str) -> bool {
    run("dpkg", &["--compare-versions", a, "lt", b]).0 == 0
}

/// The user `lb` of the package's earlier versions (which ran lb as `lb`): made for a test when
/// this machine has none (and removed after), or the one it has, left as it is.
struct OldLbUser {
    created: bool,
}

impl OldLbUser {
    fn ensure() -> OldLbUser {
        if run("getent", &["passwd", "lb"]).0 == 0 {
            return OldLbUser { created: false };
        }
        let (code, out) = run(
            "useradd",
            &[
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "lb",
            ],
        );
        assert_eq!(code, 0, "useradd lb: {out}");
        OldLbUser { created: true }
    }
}

impl Drop for OldLbUser {
    fn drop(&mut self) {
        if self.created {
            let _ = run("userdel", &["lb"]);
        }
    }
}

#[test]
fn package_versions_rise_with_every_commit_and_every_dirty_build() {
    let script = repo().join("scripts/deb-version.sh");
    let dir = TempDir::new("deb-version");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.test"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    let version = |time: u64| {
        let out = Command::new(&script)
            .args(["0.1.0"])
            .arg(dir.path())
            .env("DEB_VERSION_TIME", time.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let commit = |n: u32| {
        std::fs::write(dir.path().join("f"), n.to_string()).unwrap();
        git(&["add", "f"]);
        git(&["commit", "-q", "-m", &format!("c{n}")]);
    };
    // Not yet a git tree (a source tarball): the plain version.
    assert_eq!(version(0), "0.1.0-1");
    git(&["init", "-q"]);
    commit(1);
    let v1 = version(0);
    commit(2);
    let v2 = version(0);
    std::fs::write(dir.path().join("f"), "edited").unwrap();
    let dirty_a = version(1_000_000_000);
    let dirty_b = version(1_000_000_060);
    git(&["commit", "-qam", "c3"]);
    git(&["tag", "v0.1.0"]);
    let release = version(0);
    commit(4);
    let after = version(0);
    assert!(v1.starts_with("0.1.0-1~git1.g"), "{v1}");
    assert!(v2.starts_with("0.1.0-1~git2.g"), "{v2}");
    assert!(dirty_a.starts_with(&format!("{v2}.dirty")), "{dirty_a}");
    assert_eq!(release, "0.1.0-1");
    assert!(after.starts_with("0.1.0-1+git4.g"), "{after}");
    let ordered = [&v1, &v2, &dirty_a, &dirty_b, &release, &after];
    for w in ordered.windows(2) {
        assert!(version_lt(w[0], w[1]), "{} < {}", w[0], w[1]);
    }
    // package.sh uses it by default: the test packages carry a version of this scheme.
    let (lb_deb, deployer_deb) = test_packages();
    let v = deb_version(lb_deb);
    assert_eq!(
        v,
        deb_version(deployer_deb),
        "one version for both packages"
    );
    let rest = v.strip_prefix("0.1.0-1").unwrap_or_else(|| panic!("{v}"));
    assert!(
        rest.is_empty() || rest.starts_with("~git") || rest.starts_with("+git"),
        "{v}"
    );
}

#[test]
fn packaged_examples_work_from_usr_share_doc() {
    let (lb_deb, deployer_deb) = test_packages();
    let root = TempDir::new("pkg-examples");
    for deb in [lb_deb, deployer_deb] {
        let (code, out) = run(
            "dpkg-deb",
            &["-x", deb.to_str().unwrap(), root.path().to_str().unwrap()],
        );
        assert_eq!(code, 0, "dpkg-deb -x: {out}");
    }
    let installed = |p: &Path| root.path().join(p.strip_prefix("/").unwrap());
    let lb_example = root.path().join("usr/share/doc/lb/examples/lb.toml");
    let (code, out) = run(
        bin("lb").to_str().unwrap(),
        &["check", "--config", lb_example.to_str().unwrap()],
    );
    assert_eq!(code, 0, "lb check on the installed example: {out}");
    let examples = root.path().join("usr/share/doc/deployer/examples");
    for name in ["local.toml", "linode.toml"] {
        let cfg: deployer::config::DeployerConfig =
            lb::config::read_toml(&examples.join(name)).unwrap();
        assert!(
            cfg.ansible_dir.is_absolute() && installed(&cfg.ansible_dir).join("lb.yml").exists(),
            "{name}: ansible_dir {} is not the packaged Ansible tree",
            cfg.ansible_dir.display()
        );
        assert!(
            installed(&cfg.ansible_dir)
                .join("zones/example.test.zone")
                .exists(),
            "{name}: the example's zone is in the packaged tree"
        );
        assert_eq!(cfg.lb_binary, Path::new("/usr/bin/lb"), "{name}");
        assert!(installed(&cfg.lb_binary).exists());
        assert!(
            cfg.state_dir.is_relative() && !cfg.state_dir.starts_with(".."),
            "{name}: the state goes next to the copied config, not {}",
            cfg.state_dir.display()
        );
        let text = std::fs::read_to_string(examples.join(name)).unwrap();
        assert!(
            !text.contains("../"),
            "{name}: a repository path is left:\n{text}"
        );
    }
}

#[test]
fn packages_are_lintian_clean() {
    let (lb_deb, deployer_deb) = test_packages();
    // Tags the packages override are justified in lb/dist/lintian-overrides and
    // deployer/dist/lintian-overrides; any other error or warning fails.
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--pedantic"])
        .arg(lb_deb)
        .arg(deployer_deb)
        .output()
        .expect("lintian (apt-get install lintian)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lintian:\n{text}");
    let tags: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.starts_with("P:"))
        .collect();
    assert!(tags.is_empty(), "lintian: {tags:?}");
}

#[test]
fn lb_package_installs_hands_over_on_upgrade_without_losing_a_query_and_purges() {
    let _lock = dpkg_lock();
    let (lb_deb, _) = test_packages();
    let mut installed = InstalledLb::prepare();
    // An `lb` account (the earlier versions' user, or a person's) is on the machine.
    let _old_user = OldLbUser::ensure();
    let (_, old_lb_user) = run("getent", &["passwd", "lb"]);
    let upgrade_version = newer_version(&deb_version(lb_deb), "upgradetest1");
    let lb_deb = lb_deb.to_str().unwrap();

    // Install: files, conffile, user, units present but neither enabled nor started.
    let (code, out) = run("dpkg", &["-i", lb_deb]);
    assert_eq!(code, 0, "dpkg -i: {out}");
    assert!(dpkg_status("lb").starts_with("install ok installed"));
    for f in [
        "/usr/bin/lb",
        "/usr/lib/systemd/system/lb.service",
        "/usr/lib/systemd/system/lb.socket",
        "/etc/lb/lb.toml",
        "/usr/share/lb/grafana-dashboard.json",
        "/usr/share/lb/prometheus-alerts.yml",
        "/usr/share/man/man1/lb.1.gz",
        "/usr/share/man/man5/lb.toml.5.gz",
        "/usr/share/doc/lb/examples/lb.toml",
        // The documentation, where the alert rules' runbook_url and the units' Documentation=
        // point.
        "/usr/share/doc/lb/README.md",
        "/usr/share/doc/lb/runbooks.md",
        "/usr/share/doc/lb/operator-guide.md",
        "/usr/share/doc/lb/reference.md",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let (_, conffiles) = run("dpkg-query", &["-W", "-f=${Conffiles}", "lb"]);
    assert!(conffiles.contains("/etc/lb/lb.toml"), "{conffiles}");
    let (_, depends) = run("dpkg-query", &["-W", "-f=${Depends}", "lb"]);
    assert!(depends.contains("adduser"), "{depends}");
    // Debian's live-build ships /usr/bin/lb too.
    let (_, conflicts) = run("dpkg-query", &["-W", "-f=${Conflicts}", "lb"]);
    assert!(conflicts.contains("live-build"), "Conflicts: {conflicts}");
    // The underscore system user, made beside (never instead of) an `lb` account, which stays
    // as it was.
    let (code, user) = run("getent", &["passwd", "_lb"]);
    assert_eq!(code, 0, "the _lb user exists");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "_lb is a system user: {user}");
    assert!(
        user.trim_end().ends_with(":/nonexistent:/usr/sbin/nologin"),
        "{user}"
    );
    assert_eq!(
        run("getent", &["group", "_lb"]).0,
        0,
        "the _lb group exists"
    );
    assert_eq!(
        run("getent", &["passwd", "lb"]).1,
        old_lb_user,
        "the lb account is left alone"
    );
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/lb.service").unwrap();
    assert!(
        unit.contains("\nUser=_lb\n") && unit.contains("\nGroup=_lb\n"),
        "{unit}"
    );
    for link in [
        "/etc/systemd/system/multi-user.target.wants/lb.service",
        "/etc/systemd/system/sockets.target.wants/lb.socket",
    ] {
        assert!(
            std::fs::symlink_metadata(link).is_err(),
            "{link}: the package must not enable lb"
        );
    }
    let shipped = std::fs::read_to_string("/etc/lb/lb.toml").unwrap();
    assert!(shipped.contains("192.0.2.53:53") && shipped.contains("PLACEHOLDER"));
    let (code, out) = run("/usr/bin/lb", &["check", "--config", "/etc/lb/lb.toml"]);
    assert_eq!(code, 0, "the shipped config is valid: {out}");
    let (code, out) = run(
        "systemd-analyze",
        &[
            "verify",
            "/usr/lib/systemd/system/lb.service",
            "/usr/lib/systemd/system/lb.socket",
        ],
    );
    assert_eq!(code, 0, "systemd-analyze verify: {out}");
    assert!(
        !out.contains("lb.service:") && !out.contains("lb.socket:"),
        "systemd-analyze warnings: {out}"
    );

    // The admin sets real backends (a changed conffile) and runs lb by hand on it; no systemd
    // here, so the postinst finds it through its control socket.
    let ns = Named::start(ZoneSpec::new(3, "a"));
    let port = free_port();
    let edited = format!(
        "# edited by the admin\n[listen]\nudp = [\"127.0.0.1:{port}\"]\ntcp = [\"127.0.0.1:{port}\"]\nworkers = 1\n\n[backends]\nservers = [\"{}\"]\n\n[control]\nsocket = \"/run/lb/control.sock\"\nstate_file = \"/var/lib/lb/state.json\"\n",
        ns.addr
    );
    std::fs::write("/etc/lb/lb.toml", &edited).unwrap();
    let mut old = Lb::start_binary(
        Path::new("/usr/bin/lb"),
        TempDir::new("pkg-lb"),
        PathBuf::from("/etc/lb/lb.toml"),
        &[],
    );
    let load = LoadClient::start(old.udp(), 500);
    std::thread::sleep(Duration::from_millis(300));

    // Upgrade to a newer version of the package under load.
    let upgrade_dir = TempDir::new("pkg-upgrade");
    let lb_bin = bin("lb");
    let target = lb_bin.parent().unwrap().parent().unwrap();
    let debs = package(target, upgrade_dir.path(), Some(&upgrade_version));
    let lb_b = debs
        .iter()
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("lb_"))
        .unwrap();
    let (code, out) = run("dpkg", &["-i", lb_b.to_str().unwrap()]);
    let new_pid = handed_over_pid(&out);
    if let Some(pid) = new_pid {
        installed.pids.push(pid);
    }
    assert_eq!(code, 0, "dpkg -i (upgrade): {out}");
    assert!(
        out.contains("handed over to the new binary"),
        "postinst output: {out}"
    );
    let new_pid = new_pid.unwrap_or_else(|| panic!("no pid in: {out}"));
    assert_eq!(
        old.proc.wait_exit(Duration::from_secs(15)),
        Some(0),
        "the old process drains and exits 0:\n{}",
        old.proc.output.text()
    );
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    assert!(report.sent > 200, "{report:?}");
    assert_eq!(report.lost(), 0, "queries lost across the package upgrade");
    assert_eq!(
        std::fs::read_link(format!("/proc/{new_pid}/exe"))
            .unwrap()
            .display()
            .to_string(),
        "/usr/bin/lb"
    );
    assert!(old.answers_udp(), "the new process serves");
    assert!(dpkg_status("lb").ends_with(&upgrade_version));
    assert_eq!(
        std::fs::read_to_string("/etc/lb/lb.toml").unwrap(),
        edited,
        "the upgrade kept the admin's config"
    );

    // Remove keeps the config, purge removes it.
    let _ = Command::new("kill").arg(new_pid.to_string()).status();
    let (code, out) = run("dpkg", &["--remove", "lb"]);
    assert_eq!(code, 0, "dpkg --remove: {out}");
    assert!(dpkg_status("lb").contains("config-files"));
    assert!(!Path::new("/usr/bin/lb").exists());
    assert_eq!(std::fs::read_to_string("/etc/lb/lb.toml").unwrap(), edited);
    let (code, out) = run("dpkg", &["--purge", "lb"]);
    assert_eq!(code, 0, "dpkg --purge: {out}");
    assert!(!dpkg_status("lb").contains("installed"));
    assert!(!Path::new("/etc/lb").exists(), "purge removes /etc/lb");
    assert!(
        !Path::new("/var/lib/lb").exists(),
        "purge removes /var/lib/lb"
    );
}

/// Runs lb.yml against this machine (connection local) with -v; returns (exit code, output).
fn lb_playbook(vars: &Value, dir: &Path) -> (i32, String) {
    let mut host = local_host(vars);
    // The tests run as root without sudo.
    host["ansible_become_method"] = json!("su");
    let inv = json!({"all": {"children": {"lbs": {"hosts": {"test-host": host}}}}});
    run_playbook("lb.yml", &inv, &["-v"], dir, None)
}

#[test]
fn lb_role_installs_and_upgrades_the_package_in_system_mode() {
    let _lock = dpkg_lock();
    let (lb_deb, _) = test_packages();
    let _installed = InstalledLb::prepare();
    let ns = Named::start(ZoneSpec::new(4, "a"));
    let dir = TempDir::new("role-system");
    let port = free_port();
    let mut vars = json!({
        "lb_mode": "system",
        "lb_package": lb_deb,
        // No systemd in the test machine: install and configure only; no kernel settings.
        "lb_systemd": false,
        "lb_sysctl": false,
        // Never a firewall on the test machine's own interfaces (the firewall converges in a
        // network namespace in its own test).
        "lb_firewall_enabled": false,
        "lb_listen": [format!("127.0.0.1:{port}"), format!("[::1]:{port}")],
        "lb_backends": [ns.addr.to_string()],
        "lb_metrics_listen": "127.0.0.1:0",
        "lb_workers": 1,
    });
    // What earlier versions of the role left: the binary in /usr/local/bin, the units (and
    // their enablement) in /etc/systemd/system, shadowing the package's.
    let legacy = [
        "/usr/local/bin/lb",
        "/etc/systemd/system/lb.service",
        "/etc/systemd/system/lb.socket",
        "/etc/systemd/system/multi-user.target.wants/lb.service",
    ];
    for f in legacy {
        assert!(
            std::fs::symlink_metadata(f).is_err(),
            "{f} exists on this machine: the role test would remove it"
        );
    }
    let _legacy_cleanup = RemoveOnDrop(legacy.iter().map(PathBuf::from).collect());
    std::fs::write(legacy[0], "#!/bin/sh\n").unwrap();
    std::fs::write(
        legacy[1],
        "[Service]\nExecStart=/usr/local/bin/lb run --config /etc/lb/lb.toml\n",
    )
    .unwrap();
    std::fs::write(legacy[2], "[Socket]\nListenDatagram=0.0.0.0:53\n").unwrap();
    std::fs::create_dir_all("/etc/systemd/system/multi-user.target.wants").unwrap();
    std::os::unix::fs::symlink(legacy[1], legacy[3]).unwrap();

    let (code, out) = lb_playbook(&vars, dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(dpkg_status("lb").starts_with("install ok installed 0.1.0-1"));
    for f in legacy {
        assert!(
            std::fs::symlink_metadata(f).is_err(),
            "{f}: the role removes what its earlier versions installed"
        );
    }
    let config = std::fs::read_to_string("/etc/lb/lb.toml").unwrap();
    assert!(
        config.contains(&ns.addr.to_string()) && config.contains("/run/lb/control.sock"),
        "{config}"
    );
    let (code, text) = run("/usr/bin/lb", &["check", "--config", "/etc/lb/lb.toml"]);
    assert_eq!(code, 0, "{text}");
    let dropin = std::fs::read_to_string("/etc/systemd/system/lb.socket.d/listen.conf").unwrap();
    assert!(
        dropin.contains("ListenDatagram=\n")
            && dropin.contains(&format!("ListenDatagram=127.0.0.1:{port}\n"))
            && dropin.contains(&format!("ListenStream=127.0.0.1:{port}\n"))
            && dropin.contains(&format!("ListenDatagram=[::1]:{port}\n"))
            && dropin.contains(&format!("ListenStream=[::1]:{port}\n"))
            && dropin.contains("\nBindIPv6Only=ipv6-only\n"),
        "{dropin}"
    );
    assert!(
        config.contains(&format!(r#"udp = ["127.0.0.1:{port}", "[::1]:{port}"]"#)),
        "{config}"
    );

    let (code, out) = lb_playbook(&vars, dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        changed_count(&out),
        0,
        "a second run changes nothing:\n{out}"
    );

    // A newer package: the role upgrades it, keeping its config.
    let upgrade_dir = TempDir::new("role-upgrade");
    let lb_bin = bin("lb");
    let target = lb_bin.parent().unwrap().parent().unwrap();
    let role_version = newer_version(&deb_version(lb_deb), "roletest1");
    let debs = package(target, upgrade_dir.path(), Some(&role_version));
    let lb_b = debs
        .iter()
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("lb_"))
        .unwrap();
    vars["lb_package"] = json!(lb_b);
    let (code, out) = lb_playbook(&vars, dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(changed_count(&out) >= 2, "copy and install:\n{out}");
    assert!(dpkg_status("lb").ends_with(&role_version));
    assert_eq!(std::fs::read_to_string("/etc/lb/lb.toml").unwrap(), config);
}
