//! A faithful local fake of the Linode API v4 instance endpoints, for testing the deployer's
//! client without the internet.
//!
//! Implements `POST/GET /v4/linode/instances`, `GET/PUT/DELETE /v4/linode/instances/{id}` with
//! bearer-token auth, `page`/`page_size` pagination (`data`, `page`, `pages`, `results`),
//! `X-Filter` on `label`, `tags`, `region` and `status`, the `{"errors":[{"reason","field"}]}`
//! error shape, instances that go `provisioning` -> `booting` -> `running` over a few polls, and
//! injected failures (5xx, 429 with `Retry-After`; for creates, a reply dropped after the
//! instance was made and a label taken just before, see [`CreateFault`]), and Linode Create's documented rate limit
//! (10 requests per 30 s; 429 with `Retry-After` in seconds past it). `GET /v4/regions/{id}`
//! answers with each region's capabilities (`us-east` and `eu-central` offer `Vlans`; the
//! made-up `xx-novlan` does not). A create's `interfaces` are held to the rules the spec states
//! in prose (its schema checks only types): at most one `public` interface, with no label or
//! address; `vlan` interfaces with a label (letters, digits, `-`, no `--`), attached once, in a
//! region that offers VLANs; and every VLAN address in use is recorded, so a test can assert
//! that no two instances on one VLAN got the same one (the API itself does not refuse that).
//!
//! Tags (the deployer's lease): `GET /v4/tags` lists every tag of the account, those created
//! with `POST /v4/tags` and those applied to instances (paginated like instances; tags have no
//! filterable field, so no `X-Filter`), `POST /v4/tags` creates one (`label` 3-50 characters,
//! as the schema says; an existing label is refused with 400 naming `label`, which the spec
//! does not document), `DELETE /v4/tags/{label}` removes it from every instance and deletes
//! it (404 when there is none).
//!
//! Every request body and every response is validated against Linode's published OpenAPI
//! schemas ([`crate::openapi`]): a request the spec rejects is answered 400 like the API would,
//! and every violation (by the client or by the fake itself) is recorded; dropping the fake
//! fails the test if any was, so the fake cannot drift from the documented API.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A failure to return instead of handling the next matching request.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Only requests with this method (any when `None`).
    pub method: Option<String>,
    pub status: u16,
    pub retry_after: Option<u64>,
}

/// A fault in the handling of the next create (`POST /linode/instances`).
#[derive(Debug, Clone)]
pub enum CreateFault {
    /// The instance is created, then the connection is closed without a reply: a reply lost
    /// (or timed out) after Linode acted on the request.
    DropReplyAfterCreate,
    /// Just before the create is handled, an instance with the same label and these tags
    /// appears (someone else, or another deployer, won the race): Linode refuses the create
    /// with 400 "Label must be unique among your linodes".
    LabelTakenFirst { tags: Vec<String> },
}

/// The fake's state, shared with the test.
#[derive(Debug)]
pub struct FakeState {
    pub token: String,
    pub instances: Vec<Value>,
    next_id: u64,
    /// GETs of an instance before it reports `running` (half of them `provisioning`).
    pub boot_polls: u32,
    polls: std::collections::HashMap<u64, u32>,
    /// The most results per page the fake returns, whatever `page_size` asks.
    pub max_page_size: usize,
    pub inject: VecDeque<Injection>,
    /// Every request: (method, path with query, X-Filter).
    pub log: Vec<(String, String, Option<String>)>,
    /// Linode Create: at most this many per window (documented: 10 per 30 s).
    pub create_limit: (usize, Duration),
    creates: VecDeque<Instant>,
    /// Creates answered 429 because of the create limit.
    pub creates_rate_limited: usize,
    /// Schema violations of requests (by the client) and responses (by the fake).
    pub violations: Vec<String>,
    /// Responses checked against the schemas.
    pub responses_checked: usize,
    /// Capabilities of each region (`GET /regions/{id}`).
    pub regions: std::collections::BTreeMap<String, Vec<String>>,
    /// The `interfaces` each instance was created with (the instance API does not return them).
    pub interfaces: std::collections::BTreeMap<u64, Value>,
    /// Two live instances on one VLAN with the same `ipam_address` (VLAN, address, ids).
    pub vlan_conflicts: Vec<String>,
    /// Faults for the next creates, in order.
    pub create_faults: VecDeque<CreateFault>,
    /// Tags created with `POST /tags` (those applied to instances are listed too).
    pub tags: std::collections::BTreeSet<String>,
}

/// The status [`handle`] returns for "close the connection without a reply".
const DROP_REPLY: u16 = 0;

/// A running fake on 127.0.0.1.
pub struct FakeLinode {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
}

impl FakeLinode {
    pub fn start(token: &str) -> FakeLinode {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(FakeState {
            token: token.into(),
            instances: Vec::new(),
            next_id: 1000,
            boot_polls: 0,
            polls: Default::default(),
            max_page_size: 500,
            inject: VecDeque::new(),
            log: Vec::new(),
            create_limit: (10, Duration::from_secs(30)),
            creates: VecDeque::new(),
            creates_rate_limited: 0,
            violations: Vec::new(),
            responses_checked: 0,
            regions: [
                ("us-east", true),
                ("eu-central", true),
                ("xx-novlan", false),
            ]
            .into_iter()
            .map(|(r, vlans)| {
                let mut caps: Vec<String> = [
                    "Linodes",
                    "NodeBalancers",
                    "Block Storage",
                    "Cloud Firewall",
                ]
                .map(String::from)
                .to_vec();
                if vlans {
                    caps.push("Vlans".into());
                }
                (r.to_string(), caps)
            })
            .collect(),
            interfaces: Default::default(),
            vlan_conflicts: Vec::new(),
            create_faults: VecDeque::new(),
            tags: Default::default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || serve(s, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeLinode { addr, state, stop }
    }

    /// The API base URL, like `https://api.linode.com/v4`.
    pub fn base(&self) -> String {
        format!("http://{}/v4", self.addr)
    }

    /// Adds an instance directly (e.g. one that belongs to someone else).
    pub fn seed(&self, label: &str, tags: &[&str]) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.instances
            .push(instance(id, label, "us-east", tags, "running"));
        id
    }

    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.log
            .iter()
            .filter(|(m, p, _)| m == method && p.starts_with(path_prefix))
            .count()
    }
}

impl Drop for FakeLinode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if !std::thread::panicking() {
            let v = self.state.lock().unwrap().violations.clone();
            assert!(
                v.is_empty(),
                "requests or responses that Linode's OpenAPI schemas reject:\n{}",
                v.join("\n")
            );
        }
    }
}

fn instance(id: u64, label: &str, region: &str, tags: &[&str], status: &str) -> Value {
    json!({
        "id": id, "label": label, "region": region, "type": "g6-nanode-1", "image": "linode/debian12",
        "status": status, "ipv4": [format!("192.0.2.{}", id % 250), format!("192.168.128.{}", id % 250)],
        "ipv6": "2001:db8::1/128", "tags": tags, "group": "", "hypervisor": "kvm",
        "created": "2026-11-27T00:00:00", "updated": "2026-11-27T00:00:00",
    })
}

fn errors(reason: &str, field: Option<&str>) -> Value {
    match field {
        Some(f) => json!({"errors": [{"reason": reason, "field": f}]}),
        None => json!({"errors": [{"reason": reason}]}),
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(s: &TcpStream) -> Option<Request> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|x| !x.is_empty())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn respond(mut s: TcpStream, status: u16, body: &Value, retry_after: Option<u64>) {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    if let Some(r) = retry_after {
        head.push_str(&format!("Retry-After: {r}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(text.as_bytes());
}

fn serve(s: TcpStream, state: &Mutex<FakeState>) {
    let Some(req) = read_request(&s) else {
        return;
    };
    let (status, body, retry_after) = handle(&req, state);
    if status == DROP_REPLY {
        // The request was carried out; the client never hears of it.
        let _ = s.shutdown(std::net::Shutdown::Both);
        return;
    }
    if let Some(path) = spec_path(&req.path) {
        let pointer = crate::openapi::response_pointer(&req.method, path, status);
        let v = crate::openapi::violations(&pointer, &body);
        let mut st = state.lock().unwrap();
        st.responses_checked += 1;
        st.violations
            .extend(v.into_iter().map(|e| format!("response of the fake: {e}")));
    }
    respond(s, status, &body, retry_after);
}

/// The spec's path for a request path of the fake.
fn spec_path(path: &str) -> Option<&'static str> {
    match path.strip_prefix("/v4/tags") {
        Some("") => return Some("/tags"),
        Some(l) if l.len() > 1 && !l[1..].contains('/') => return Some("/tags/{tagLabel}"),
        _ => {}
    }
    if path
        .strip_prefix("/v4/regions/")
        .is_some_and(|r| !r.is_empty() && !r.contains('/'))
    {
        return Some("/regions/{regionId}");
    }
    match path.strip_prefix("/v4/linode/instances") {
        Some("") => Some("/linode/instances"),
        Some(id)
            if id
                .strip_prefix('/')
                .is_some_and(|x| x.parse::<u64>().is_ok()) =>
        {
            Some("/linode/instances/{linodeId}")
        }
        _ => None,
    }
}

/// Validates a request body against the spec; the API answers 400 naming the field.
fn check_request(
    st: &mut FakeState,
    method: &str,
    path: &str,
    body: &Value,
) -> Option<(u16, Value, Option<u64>)> {
    let pointer = crate::openapi::request_pointer(method, path);
    let errs = crate::openapi::validator(&pointer);
    let mut first = None;
    for e in errs.iter_errors(body) {
        let field = e
            .instance_path()
            .to_string()
            .trim_start_matches('/')
            .replace('/', ".");
        st.violations.push(format!(
            "request {method} {path} by the client: at {}: {e}",
            e.instance_path()
        ));
        first.get_or_insert((e.to_string(), field));
    }
    first.map(|(reason, field)| {
        let field = if field.is_empty() { None } else { Some(field) };
        (400, errors(&reason, field.as_deref()), None)
    })
}

/// The rules of `LinodeConfigInterface` that its schema states only in prose; `Err((reason,
/// field))` as the API would answer 400.
fn check_interfaces(st: &FakeState, body: &Value) -> Result<(), (String, String)> {
    let Some(list) = body.get("interfaces").and_then(Value::as_array) else {
        return Ok(());
    };
    let region = body["region"].as_str().unwrap_or("");
    let mut publics = 0;
    let mut vlans = Vec::new();
    for (k, i) in list.iter().enumerate() {
        let field = |f: &str| format!("interfaces[{k}].{f}");
        let empty = |f: &str| i.get(f).is_none_or(|v| v.is_null() || v == "");
        match i["purpose"].as_str() {
            Some("public") => {
                publics += 1;
                if publics > 1 {
                    return Err((
                        "Only one public interface per Linode".into(),
                        field("purpose"),
                    ));
                }
                if !empty("label") || !empty("ipam_address") {
                    return Err((
                        "Must be empty or null for public interfaces".into(),
                        field("label"),
                    ));
                }
            }
            Some("vlan") => {
                let label = i["label"].as_str().unwrap_or("");
                let ok = !label.is_empty()
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                    && !label.contains("--");
                if !ok {
                    return Err((
                        "VLAN label is required: ASCII letters, numbers and hyphens, no --".into(),
                        field("label"),
                    ));
                }
                if vlans.contains(&label) {
                    return Err((
                        "A Linode cannot be attached to a VLAN twice".into(),
                        field("label"),
                    ));
                }
                vlans.push(label);
                if i["primary"] == true {
                    return Err(("Must be false for vlan interfaces".into(), field("primary")));
                }
                if !st
                    .regions
                    .get(region)
                    .is_some_and(|c| c.iter().any(|x| x == "Vlans"))
                {
                    return Err((
                        format!("VLANs are not available in region {region}"),
                        field("purpose"),
                    ));
                }
            }
            Some("vpc") => {}
            _ => {
                return Err((
                    "purpose is required: public, vlan or vpc".into(),
                    field("purpose"),
                ))
            }
        }
    }
    Ok(())
}

fn matches_filter(inst: &Value, filter: &Value) -> Result<bool, String> {
    let Some(obj) = filter.as_object() else {
        return Err("X-Filter must be a JSON object".into());
    };
    for (k, want) in obj {
        let ok = match k.as_str() {
            "tags" => inst["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|x| x == want)),
            "label" | "region" | "status" => &inst[k] == want,
            other => return Err(format!("Cannot filter on {other}")),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `page` and `page_size` of a list request, checked as the API does; `Err` is its answer.
fn paginate(
    req: &Request,
    all: &[Value],
    max_page_size: usize,
) -> Result<Value, (u16, Value, Option<u64>)> {
    let q = |k: &str| {
        req.query
            .iter()
            .find(|(x, _)| x == k)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let page_size = q("page_size").unwrap_or(100);
    if !(25..=500).contains(&page_size) {
        return Err((400, errors("Must be 25-500", Some("page_size")), None));
    }
    let size = page_size.min(max_page_size).max(1);
    let pages = all.len().div_ceil(size).max(1);
    let page = q("page").unwrap_or(1);
    if page < 1 || page > pages {
        return Err((
            400,
            errors(
                "Must be a value between 1 and the number of pages",
                Some("page"),
            ),
            None,
        ));
    }
    let data: Vec<Value> = all
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .cloned()
        .collect();
    Ok(json!({"data": data, "page": page, "pages": pages, "results": all.len()}))
}

/// `/v4/tags` and `/v4/tags/{label}` (`rest` is what follows `/v4/tags`).
fn handle_tags(req: &Request, st: &mut FakeState, rest: &str) -> (u16, Value, Option<u64>) {
    let applied: std::collections::BTreeSet<String> = st
        .instances
        .iter()
        .flat_map(|i| i["tags"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    match (req.method.as_str(), rest) {
        ("GET", "") => {
            let all: Vec<Value> = st
                .tags
                .union(&applied)
                .map(|t| json!({ "label": t }))
                .collect();
            match paginate(req, &all, st.max_page_size) {
                Ok(v) => (200, v, None),
                Err(e) => e,
            }
        }
        ("POST", "") => {
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return (400, errors("Invalid JSON", None), None);
            };
            if let Some(refused) = check_request(st, "POST", "/tags", &body) {
                return refused;
            }
            let label = body["label"].as_str().unwrap_or_default().to_string();
            if st.tags.contains(&label) || applied.contains(&label) {
                return (
                    400,
                    errors("A tag with this label already exists", Some("label")),
                    None,
                );
            }
            for id in body["linodes"].as_array().into_iter().flatten() {
                match st.instances.iter_mut().find(|i| &i["id"] == id) {
                    Some(i) => i["tags"].as_array_mut().unwrap().push(json!(label)),
                    None => {
                        return (
                            400,
                            errors(&format!("Linode {id} not found"), Some("linodes")),
                            None,
                        )
                    }
                }
            }
            st.tags.insert(label.clone());
            (200, json!({ "label": label }), None)
        }
        ("DELETE", l) if l.len() > 1 && !l[1..].contains('/') => {
            let label = &l[1..];
            if !st.tags.remove(label) && !applied.contains(label) {
                return (404, errors("Not found", None), None);
            }
            for i in &mut st.instances {
                if let Some(t) = i["tags"].as_array_mut() {
                    t.retain(|x| x != label);
                }
            }
            (200, json!({}), None)
        }
        _ => (405, errors("Method not allowed", None), None),
    }
}

fn handle(req: &Request, state: &Mutex<FakeState>) -> (u16, Value, Option<u64>) {
    let mut st = state.lock().unwrap();
    let full = if req.query.is_empty() {
        req.path.clone()
    } else {
        format!(
            "{}?{}",
            req.path,
            req.query
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        )
    };
    st.log.push((
        req.method.clone(),
        full,
        req.header("X-Filter").map(str::to_string),
    ));
    if let Some(pos) = st
        .inject
        .iter()
        .position(|i| i.method.as_deref().is_none_or(|m| m == req.method))
    {
        let inj = st.inject.remove(pos).unwrap();
        let body = if inj.status == 429 {
            errors("Too many requests", None)
        } else {
            errors("Internal server error", None)
        };
        return (inj.status, body, inj.retry_after);
    }
    if req.header("Authorization") != Some(&format!("Bearer {}", st.token)) {
        return (401, errors("Invalid Token", None), None);
    }
    if let Some(region) = req.path.strip_prefix("/v4/regions/") {
        return match (req.method.as_str(), st.regions.get(region)) {
            ("GET", Some(caps)) => (
                200,
                json!({
                    "id": region, "label": format!("{region} (fake)"), "country": "us",
                    "capabilities": caps, "status": "ok",
                    "resolvers": {"ipv4": "192.0.2.53,192.0.2.54", "ipv6": "2001:db8::53"},
                }),
                None,
            ),
            ("GET", None) => (404, errors("Not found", None), None),
            _ => (405, errors("Method not allowed", None), None),
        };
    }
    if let Some(rest) = req.path.strip_prefix("/v4/tags") {
        return handle_tags(req, &mut st, rest);
    }
    let rest = req.path.strip_prefix("/v4/linode/instances").unwrap_or("?");
    match (req.method.as_str(), rest) {
        ("POST", "") => {
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return (400, errors("Invalid JSON", None), None);
            };
            if let Some(refused) = check_request(&mut st, "POST", "/linode/instances", &body) {
                return refused;
            }
            if let Err((reason, field)) = check_interfaces(&st, &body) {
                return (400, errors(&reason, Some(&field)), None);
            }
            // Linode Create: 10 requests per 30 s (documented); past it, 429 with Retry-After.
            let (limit, window) = st.create_limit;
            while st.creates.front().is_some_and(|t| t.elapsed() >= window) {
                st.creates.pop_front();
            }
            if st.creates.len() >= limit {
                let wait = window.saturating_sub(st.creates[0].elapsed());
                st.creates_rate_limited += 1;
                return (
                    429,
                    errors("Too many requests", None),
                    Some(wait.as_secs_f64().ceil() as u64),
                );
            }
            st.creates.push_back(Instant::now());
            for f in ["region", "type"] {
                if !body[f].is_string() {
                    return (400, errors(&format!("{f} is required"), Some(f)), None);
                }
            }
            if body["image"].is_string() && !body["root_pass"].is_string() {
                return (
                    400,
                    errors(
                        "root_pass is required when deploying an image",
                        Some("root_pass"),
                    ),
                    None,
                );
            }
            let label = body["label"].as_str().unwrap_or("linode").to_string();
            let fault = st.create_faults.pop_front();
            if let Some(CreateFault::LabelTakenFirst { tags }) = &fault {
                st.next_id += 1;
                let id = st.next_id;
                let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
                let region = body["region"].as_str().unwrap_or("us-east").to_string();
                st.instances
                    .push(instance(id, &label, &region, &tags, "running"));
            }
            if st.instances.iter().any(|i| i["label"] == label.as_str()) {
                return (
                    400,
                    errors("Label must be unique among your linodes", Some("label")),
                    None,
                );
            }
            st.next_id += 1;
            let id = st.next_id;
            let tags: Vec<&str> = body["tags"]
                .as_array()
                .map(|t| t.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let status = if st.boot_polls > 0 {
                "provisioning"
            } else {
                "running"
            };
            let inst = instance(
                id,
                &label,
                body["region"].as_str().unwrap_or(""),
                &tags,
                status,
            );
            st.instances.push(inst.clone());
            if let Some(ifs) = body.get("interfaces") {
                for i in ifs.as_array().into_iter().flatten() {
                    let (Some(vlan), Some(addr)) =
                        (i["label"].as_str(), i["ipam_address"].as_str())
                    else {
                        continue;
                    };
                    if i["purpose"] != "vlan" || addr.is_empty() {
                        continue;
                    }
                    let live: Vec<u64> = st
                        .instances
                        .iter()
                        .filter_map(|x| x["id"].as_u64())
                        .collect();
                    let clash: Vec<u64> = st
                        .interfaces
                        .iter()
                        .filter(|(other, _)| live.contains(other))
                        .filter(|(_, v)| {
                            v.as_array().into_iter().flatten().any(|o| {
                                o["purpose"] == "vlan"
                                    && o["label"] == vlan
                                    && o["ipam_address"] == addr
                            })
                        })
                        .map(|(other, _)| *other)
                        .collect();
                    if !clash.is_empty() {
                        st.vlan_conflicts
                            .push(format!("{vlan} {addr}: {id} and {clash:?}"));
                    }
                }
                st.interfaces.insert(id, ifs.clone());
            }
            if matches!(fault, Some(CreateFault::DropReplyAfterCreate)) {
                return (DROP_REPLY, Value::Null, None);
            }
            (200, inst, None)
        }
        ("GET", "") => {
            let filter = match req.header("X-Filter").map(serde_json::from_str::<Value>) {
                None => json!({}),
                Some(Ok(f)) => f,
                Some(Err(_)) => return (400, errors("Invalid X-Filter", None), None),
            };
            let mut all = Vec::new();
            for i in &st.instances {
                match matches_filter(i, &filter) {
                    Ok(true) => all.push(i.clone()),
                    Ok(false) => {}
                    Err(e) => return (400, errors(&e, None), None),
                }
            }
            let q = |k: &str| {
                req.query
                    .iter()
                    .find(|(x, _)| x == k)
                    .and_then(|(_, v)| v.parse::<usize>().ok())
            };
            let page_size = q("page_size").unwrap_or(100);
            if !(25..=500).contains(&page_size) {
                return (400, errors("Must be 25-500", Some("page_size")), None);
            }
            let size = page_size.min(st.max_page_size).max(1);
            let pages = all.len().div_ceil(size).max(1);
            let page = q("page").unwrap_or(1);
            if page < 1 || page > pages {
                return (
                    400,
                    errors(
                        "Must be a value between 1 and the number of pages",
                        Some("page"),
                    ),
                    None,
                );
            }
            let data: Vec<Value> = all
                .iter()
                .skip((page - 1) * size)
                .take(size)
                .cloned()
                .collect();
            (
                200,
                json!({"data": data, "page": page, "pages": pages, "results": all.len()}),
                None,
            )
        }
        (method, id) => {
            let Some(id) = id.strip_prefix('/').and_then(|x| x.parse::<u64>().ok()) else {
                return (404, errors("Not found", None), None);
            };
            let Some(pos) = st.instances.iter().position(|i| i["id"] == id) else {
                return (404, errors("Not found", None), None);
            };
            match method {
                "GET" => {
                    let boot = st.boot_polls;
                    let n = {
                        let c = st.polls.entry(id).or_insert(0);
                        *c += 1;
                        *c
                    };
                    let status = if n >= boot {
                        "running"
                    } else if n >= boot / 2 {
                        "booting"
                    } else {
                        "provisioning"
                    };
                    if st.instances[pos]["status"] != "running" {
                        st.instances[pos]["status"] = json!(status);
                    }
                    (200, st.instances[pos].clone(), None)
                }
                "PUT" => {
                    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                        return (400, errors("Invalid JSON", None), None);
                    };
                    if let Some(refused) =
                        check_request(&mut st, "PUT", "/linode/instances/{linodeId}", &body)
                    {
                        return refused;
                    }
                    if let Some(l) = body["label"].as_str() {
                        if st
                            .instances
                            .iter()
                            .any(|i| i["label"] == l && i["id"] != id)
                        {
                            return (
                                400,
                                errors("Label must be unique among your linodes", Some("label")),
                                None,
                            );
                        }
                        st.instances[pos]["label"] = json!(l);
                    }
                    (200, st.instances[pos].clone(), None)
                }
                "DELETE" => {
                    st.instances.remove(pos);
                    (200, json!({}), None)
                }
                _ => (405, errors("Method not allowed", None), None),
            }
        }
    }
}
