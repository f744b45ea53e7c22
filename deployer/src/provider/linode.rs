//! A small client of the Linode API v4 (instances only) and the provider built on it.
//!
//! - Auth: `Authorization: Bearer $LINODE_TOKEN`; the token comes only from the environment and
//!   is never printed (the client's `Debug` redacts it).
//! - Lists follow pagination (`page`, `page_size`, `pages`) and filter with `X-Filter`.
//! - 429 is retried after `Retry-After`, honoured as sent, as long as the wait ends within the
//!   request's retry deadline (`[timeouts] api_retry_secs`, default 600 s); one that would end
//!   later fails at once and says so. 5xx and network errors are retried with backoff (at most 6
//!   attempts, within the same deadline) for reads, renames and deletes. A create is never retried blindly after a 5xx or a lost
//!   response (the API has no idempotency key): the caller looks the label up first.
//! - Errors `{"errors":[{"reason","field"?}]}` are shown with the status code (`field` is
//!   omitted when the error concerns no single field).
//! - The documented rules are checked before any call, so a request the API would refuse is
//!   never sent: labels (3-64 characters, letters, digits, `-`, `_`, `.`, starting and ending
//!   with a letter or digit, no `--`, `__` or `..`; the spec's own `pattern` is broken, so this
//!   follows its prose), `page_size` 25-500, `type` and `region` on create.
//! - Linode Create is limited to 10 requests per 30 s: creates are paced to stay under it.
//! - VLANs: an instance on the deployment's VLAN is created with two `interfaces` (the
//!   `LinodeConfigInterface` schema): `{"purpose": "public"}` first (eth0, the default route),
//!   then `{"purpose": "vlan", "label", "ipam_address"}` (eth1). The instance API does not
//!   return interfaces, so the VLAN address is also carried as a tag (`ipam-10.0.0.3`), read
//!   back on every list. Whether a region offers VLANs is read from `GET /regions/{id}`
//!   (`capabilities` contains `Vlans`) before anything is created.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::blocking::{Client, Response};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Instance, InstanceSpec, Provider, ProviderError, Role, VlanSupport};
use crate::config::LinodeConfig;
use crate::ssh::SshTarget;

/// Most attempts for one request failing with server or network errors (rate limits are
/// bounded by the retry deadline instead: Linode says how long to wait).
const MAX_ATTEMPTS: u32 = 6;
/// Default of [`LinodeClient::retry_deadline`] (`[timeouts] api_retry_secs`).
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(600);
const PAGE_SIZE: u32 = 100;
/// `page_size` bounds of the API.
const PAGE_SIZE_RANGE: std::ops::RangeInclusive<u32> = 25..=500;
/// Linode Create: at most this many requests per [`CREATE_WINDOW`].
pub const CREATE_LIMIT: usize = 10;
pub const CREATE_WINDOW: Duration = Duration::from_secs(30);
/// The tag that carries an instance's VLAN address (`ipam-10.0.0.3`).
pub const IPAM_TAG_PREFIX: &str = "ipam-";
/// The region capability that says VLANs are offered.
pub const VLAN_CAPABILITY: &str = "Vlans";

/// Why `label` is not a valid Linode label, if it is not (the rules of the API's prose).
pub fn label_error(label: &str) -> Option<String> {
    let n = label.chars().count();
    if !(3..=64).contains(&n) {
        return Some(format!(
            "label `{label}` must be 3-64 characters (it has {n})"
        ));
    }
    if !label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Some(format!(
            "label `{label}` may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    let b = label.as_bytes();
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Some(format!(
            "label `{label}` must begin and end with a letter or digit"
        ));
    }
    for twice in ["--", "__", ".."] {
        if label.contains(twice) {
            return Some(format!("label `{label}` must not contain `{twice}`"));
        }
    }
    None
}

/// A Linode API failure.
#[derive(Debug, thiserror::Error)]
pub enum LinodeError {
    #[error("LINODE_TOKEN is not set: export a Linode API token with Linodes read/write scope")]
    MissingToken,
    #[error("Linode API {method} {path}: HTTP {status}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("Linode API {method} {path}: {message}")]
    Transport {
        method: String,
        path: String,
        message: String,
    },
    #[error("Linode API {method} {path}: not sent: {field}: {message}")]
    Invalid {
        method: String,
        path: String,
        field: String,
        message: String,
    },
    #[error("Linode API {method} {path}: gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        method: String,
        path: String,
        attempts: u32,
        last: String,
    },
    #[error("Linode API {method} {path}: rate limited (HTTP 429) and Linode asks to retry after {retry_after}s, past this request's retry deadline of {deadline}s ([timeouts] api_retry_secs; {waited}s already spent over {attempts} attempts): not retried. Run the command again later, or raise api_retry_secs")]
    RateLimited {
        method: String,
        path: String,
        retry_after: u64,
        deadline: u64,
        waited: u64,
        attempts: u32,
    },
}

/// An instance as the API returns it (the fields the deployer uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinodeInstance {
    pub id: u64,
    pub label: String,
    pub status: String,
    #[serde(default)]
    pub ipv4: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub region: String,
    #[serde(default, rename = "type")]
    pub instance_type: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
}

/// `POST /linode/instances`.
#[derive(Debug, Clone, Serialize)]
pub struct CreateInstance {
    pub label: String,
    pub region: String,
    #[serde(rename = "type")]
    pub instance_type: String,
    pub image: String,
    pub root_pass: String,
    pub authorized_keys: Vec<String>,
    pub tags: Vec<String>,
    pub booted: bool,
    /// Network interfaces in order (eth0, eth1, ...); absent: Linode's default public one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<InterfaceRequest>>,
}

/// One entry of `interfaces` in a create request (`LinodeConfigInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfaceRequest {
    /// `public` or `vlan`.
    pub purpose: String,
    /// The VLAN's label (vlan only; a public interface sends no label).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The address on the VLAN in CIDR notation (vlan only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipam_address: Option<String>,
}

impl InterfaceRequest {
    /// The public interface, as the public interface is sent: its purpose only.
    pub fn public() -> InterfaceRequest {
        InterfaceRequest {
            purpose: "public".into(),
            label: None,
            ipam_address: None,
        }
    }

    pub fn vlan(label: &str, ipam_address: &str) -> InterfaceRequest {
        InterfaceRequest {
            purpose: "vlan".into(),
            label: Some(label.into()),
            ipam_address: Some(ipam_address.into()),
        }
    }
}

/// Why `interfaces` breaks the rules `LinodeConfigInterface` documents in prose (the schema
/// itself checks only types), if it does: 1-3 entries; at most one `public`, with no label or
/// address; `vlan` entries with a valid label, once each, and an IPv4 `ipam_address` in CIDR
/// notation, unique.
pub fn interfaces_error(interfaces: &[InterfaceRequest]) -> Option<(String, String)> {
    let field = |k: usize, f: &str| format!("interfaces[{k}].{f}");
    if !(1..=3).contains(&interfaces.len()) {
        return Some((
            "interfaces".into(),
            format!("1 to 3 interfaces, not {}", interfaces.len()),
        ));
    }
    let mut vlans = Vec::new();
    let mut addresses = Vec::new();
    for (k, i) in interfaces.iter().enumerate() {
        match i.purpose.as_str() {
            "public" => {
                if interfaces[..k].iter().any(|x| x.purpose == "public") {
                    return Some((field(k, "purpose"), "only one public interface".into()));
                }
                if i.label.as_deref().is_some_and(|l| !l.is_empty())
                    || i.ipam_address.as_deref().is_some_and(|a| !a.is_empty())
                {
                    return Some((
                        field(k, "label"),
                        "a public interface has no label or ipam_address".into(),
                    ));
                }
            }
            "vlan" => {
                let label = i.label.as_deref().unwrap_or("");
                if let Some(e) = crate::config::vlan_label_error(label) {
                    return Some((field(k, "label"), e));
                }
                if vlans.contains(&label) {
                    return Some((
                        field(k, "label"),
                        format!("VLAN `{label}` is attached twice"),
                    ));
                }
                vlans.push(label);
                let a = i.ipam_address.as_deref().unwrap_or("");
                let ok = a.split_once('/').is_some_and(|(ip, len)| {
                    ip.parse::<std::net::Ipv4Addr>().is_ok()
                        && len.parse::<u8>().is_ok_and(|l| (1..=32).contains(&l))
                });
                if !ok {
                    return Some((
                        field(k, "ipam_address"),
                        format!("`{a}` is not an IPv4 address with a prefix length (10.0.0.1/24)"),
                    ));
                }
                if addresses.contains(&a) {
                    return Some((field(k, "ipam_address"), format!("`{a}` is used twice")));
                }
                addresses.push(a);
            }
            other => {
                return Some((
                    field(k, "purpose"),
                    format!("`{other}` is not a purpose this client sends (public, vlan)"),
                ))
            }
        }
    }
    None
}

/// A region as `GET /regions/{id}` returns it (the fields the deployer uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LinodeRegion {
    pub id: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct TagItem {
    label: String,
}

/// Linode's bounds for a tag's label (`POST /tags`: `minLength` 3, `maxLength` 50).
pub const TAG_LABEL_LEN: std::ops::RangeInclusive<usize> = 3..=50;

/// One page of a paginated list (`GET /linode/instances`, `GET /tags`).
#[derive(Debug, Deserialize)]
struct Page<T> {
    data: Vec<T>,
    #[serde(default)]
    page: u32,
    #[serde(default)]
    pages: u32,
}

#[derive(Debug, Deserialize)]
struct ApiErrors {
    errors: Vec<ApiErrorItem>,
}

#[derive(Debug, Deserialize)]
struct ApiErrorItem {
    reason: String,
    #[serde(default)]
    field: Option<String>,
}

/// The HTTP client.
pub struct LinodeClient {
    base: String,
    token: String,
    http: Client,
    /// Base delay of the exponential backoff, and the least wait after a 429 (tests shorten it).
    pub backoff: Duration,
    /// How long one request may be retried in all. A `Retry-After` is honoured as sent (no cap)
    /// while the wait ends within it; one that would end later fails at once, saying so.
    pub retry_deadline: Duration,
    /// Creates allowed per window (Linode's documented 10 per 30 s; tests shorten it).
    pub create_limit: (usize, Duration),
    /// When the recent creates were sent, to pace the next one.
    recent_creates: std::sync::Mutex<std::collections::VecDeque<Instant>>,
}

impl std::fmt::Debug for LinodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinodeClient")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Whether a failed request may be sent again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads, renames and deletes: retry 5xx, 429 and network errors.
    Safe,
    /// Creates: retry only 429 (the request was rejected before it was processed).
    OnlyRateLimit,
}

impl LinodeClient {
    /// A client using `LINODE_TOKEN`.
    pub fn from_env(base: &str, timeout: Duration) -> Result<LinodeClient, LinodeError> {
        let token = std::env::var("LINODE_TOKEN").map_err(|_| LinodeError::MissingToken)?;
        if token.trim().is_empty() {
            return Err(LinodeError::MissingToken);
        }
        Ok(Self::new(base, &token, timeout))
    }

    pub fn new(base: &str, token: &str, timeout: Duration) -> LinodeClient {
        let http = Client::builder()
            .timeout(timeout)
            .user_agent(concat!("lb-deployer/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with rustls builds");
        LinodeClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
            backoff: Duration::from_millis(500),
            retry_deadline: DEFAULT_RETRY_DEADLINE,
            create_limit: (CREATE_LIMIT, CREATE_WINDOW),
            recent_creates: Default::default(),
        }
    }

    /// Waits until one more create fits in the rate window, and counts it.
    fn pace_create(&self) {
        let (limit, window) = self.create_limit;
        let Ok(mut recent) = self.recent_creates.lock() else {
            return;
        };
        loop {
            while recent.front().is_some_and(|t| t.elapsed() >= window) {
                recent.pop_front();
            }
            if recent.len() < limit.max(1) {
                break;
            }
            let oldest = *recent.front().expect("non-empty: len >= limit >= 1");
            // A margin, because the API counts when a request arrives, not when it was sent:
            // one that took longer on the way than the next would otherwise make the next 429.
            let margin = (window / 20).max(Duration::from_millis(5));
            std::thread::sleep(window.saturating_sub(oldest.elapsed()) + margin);
        }
        recent.push_back(Instant::now());
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        filter: Option<&Value>,
        body: Option<&Value>,
        retry: Retry,
    ) -> Result<Value, LinodeError> {
        let url = format!("{}{path}", self.base);
        let start = Instant::now();
        // Attempts in all, and those that failed with server or network errors.
        let (mut attempts, mut failures) = (0u32, 0u32);
        loop {
            attempts += 1;
            // What went wrong with this attempt (set by every branch that retries).
            let last: String;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.token)
                .query(query);
            if let Some(f) = filter {
                req = req.header("X-Filter", f.to_string());
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let wait = match req.send() {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        return resp.json::<Value>().or_else(|e| {
                            if status == StatusCode::OK {
                                Err(LinodeError::Transport {
                                    method: method.to_string(),
                                    path: path.into(),
                                    message: format!("invalid JSON in response: {e}"),
                                })
                            } else {
                                Ok(Value::Null)
                            }
                        });
                    }
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        let after = retry_after(&resp);
                        // Saturating: `Retry-After` is whatever the server sent.
                        if after > self.retry_deadline.saturating_sub(start.elapsed()) {
                            return Err(LinodeError::RateLimited {
                                method: method.to_string(),
                                path: path.into(),
                                retry_after: after.as_secs(),
                                deadline: self.retry_deadline.as_secs(),
                                waited: start.elapsed().as_secs(),
                                attempts,
                            });
                        }
                        last = format!("HTTP 429 (retry after {after:?})");
                        // Not a hot loop on `Retry-After: 0`.
                        after.max(self.backoff)
                    } else if status.is_server_error() && retry == Retry::Safe {
                        failures += 1;
                        last = format!("HTTP {}: {}", status.as_u16(), error_message(resp));
                        self.backoff_for(failures)
                    } else {
                        return Err(LinodeError::Api {
                            method: method.to_string(),
                            path: path.into(),
                            status: status.as_u16(),
                            message: error_message(resp),
                        });
                    }
                }
                Err(e) if retry == Retry::Safe => {
                    failures += 1;
                    last = e.to_string();
                    self.backoff_for(failures)
                }
                Err(e) => {
                    return Err(LinodeError::Transport {
                        method: method.to_string(),
                        path: path.into(),
                        message: format!(
                        "{e} (not retried: the instance may or may not exist; look it up by label)"
                    ),
                    })
                }
            };
            if failures >= MAX_ATTEMPTS
                || wait > self.retry_deadline.saturating_sub(start.elapsed())
            {
                return Err(LinodeError::RetriesExhausted {
                    method: method.to_string(),
                    path: path.into(),
                    attempts,
                    last: if failures >= MAX_ATTEMPTS {
                        last
                    } else {
                        format!(
                            "{last}; the next try would pass the retry deadline of {}s ([timeouts] api_retry_secs)",
                            self.retry_deadline.as_secs()
                        )
                    },
                });
            }
            std::thread::sleep(wait);
        }
    }

    fn backoff_for(&self, attempt: u32) -> Duration {
        let base = self.backoff * 2u32.saturating_pow(attempt.saturating_sub(1)).min(32);
        let jitter = rand::rng().random_range(0..=base.as_millis() as u64 / 4 + 1);
        base + Duration::from_millis(jitter)
    }

    pub fn create_instance(&self, req: &CreateInstance) -> Result<LinodeInstance, LinodeError> {
        let invalid = |field: &str, message: String| LinodeError::Invalid {
            method: "POST".into(),
            path: "/linode/instances".into(),
            field: field.into(),
            message,
        };
        if let Some(e) = label_error(&req.label) {
            return Err(invalid("label", e));
        }
        if req.region.trim().is_empty() {
            return Err(invalid("region", "region is required".into()));
        }
        if req.instance_type.trim().is_empty() {
            return Err(invalid("type", "type is required".into()));
        }
        if let Some((field, message)) = req.interfaces.as_deref().and_then(interfaces_error) {
            return Err(invalid(&field, message));
        }
        let body = serde_json::to_value(req).expect("create request serialises");
        self.pace_create();
        let v = self.request(
            Method::POST,
            "/linode/instances",
            &[],
            None,
            Some(&body),
            Retry::OnlyRateLimit,
        )?;
        parse(v, "POST", "/linode/instances")
    }

    /// `GET /regions/{id}`; a region that does not exist is an error naming it.
    pub fn get_region(&self, id: &str) -> Result<LinodeRegion, LinodeError> {
        if id.is_empty() || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return Err(LinodeError::Invalid {
                method: "GET".into(),
                path: "/regions/{regionId}".into(),
                field: "regionId".into(),
                message: format!("`{id}` is not a region id"),
            });
        }
        let path = format!("/regions/{id}");
        let v = self.request(Method::GET, &path, &[], None, None, Retry::Safe)?;
        parse(v, "GET", &path)
    }

    /// `None` if the instance does not exist (404).
    pub fn get_instance(&self, id: u64) -> Result<Option<LinodeInstance>, LinodeError> {
        let path = format!("/linode/instances/{id}");
        match self.request(Method::GET, &path, &[], None, None, Retry::Safe) {
            Ok(v) => parse(v, "GET", &path).map(Some),
            Err(LinodeError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every page of `GET /linode/instances` matching `filter`.
    pub fn list_instances(&self, filter: &Value) -> Result<Vec<LinodeInstance>, LinodeError> {
        self.list_instances_paged(filter, PAGE_SIZE)
    }

    /// [`Self::list_instances`] with an explicit page size (25-500).
    pub fn list_instances_paged(
        &self,
        filter: &Value,
        page_size: u32,
    ) -> Result<Vec<LinodeInstance>, LinodeError> {
        if !PAGE_SIZE_RANGE.contains(&page_size) {
            return Err(LinodeError::Invalid {
                method: "GET".into(),
                path: "/linode/instances".into(),
                field: "page_size".into(),
                message: format!("{page_size} is not within 25-500"),
            });
        }
        self.all_pages("/linode/instances", page_size, Some(filter))
    }

    /// Every item of a paginated list, page after page (at most 1,000 pages).
    fn all_pages<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        page_size: u32,
        filter: Option<&Value>,
    ) -> Result<Vec<T>, LinodeError> {
        let mut out = Vec::new();
        let mut page = 1;
        loop {
            let v = self.request(
                Method::GET,
                path,
                &[
                    ("page", page.to_string()),
                    ("page_size", page_size.to_string()),
                ],
                filter,
                None,
                Retry::Safe,
            )?;
            let p: Page<T> = parse(v, "GET", path)?;
            out.extend(p.data);
            if p.pages <= p.page.max(page) || page >= 1000 {
                return Ok(out);
            }
            page += 1;
        }
    }

    /// Every tag on the account (`GET /tags`, every page). Tags have no filterable field, so
    /// the caller filters.
    pub fn list_tags(&self) -> Result<Vec<String>, LinodeError> {
        let tags: Vec<TagItem> = self.all_pages("/tags", PAGE_SIZE, None)?;
        Ok(tags.into_iter().map(|t| t.label).collect())
    }

    /// `POST /tags` with a label only (no objects tagged). Retried like a read: creating a
    /// tag that exists already is harmless to the lease (its name is unique to its holder).
    pub fn create_tag(&self, label: &str) -> Result<(), LinodeError> {
        if !TAG_LABEL_LEN.contains(&label.len()) {
            return Err(LinodeError::Invalid {
                method: "POST".into(),
                path: "/tags".into(),
                field: "label".into(),
                message: format!("`{label}` must be 3-50 characters"),
            });
        }
        self.request(
            Method::POST,
            "/tags",
            &[],
            None,
            Some(&json!({ "label": label })),
            Retry::Safe,
        )?;
        Ok(())
    }

    /// `DELETE /tags/{label}`; a 404 (already gone) is success.
    pub fn delete_tag(&self, label: &str) -> Result<(), LinodeError> {
        if label.is_empty()
            || !label
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(LinodeError::Invalid {
                method: "DELETE".into(),
                path: "/tags/{tagLabel}".into(),
                field: "tagLabel".into(),
                message: format!("`{label}` is not a tag this client deletes"),
            });
        }
        let path = format!("/tags/{label}");
        match self.request(Method::DELETE, &path, &[], None, None, Retry::Safe) {
            Ok(_) | Err(LinodeError::Api { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn update_label(&self, id: u64, label: &str) -> Result<(), LinodeError> {
        let path = format!("/linode/instances/{id}");
        if let Some(message) = label_error(label) {
            return Err(LinodeError::Invalid {
                method: "PUT".into(),
                path,
                field: "label".into(),
                message,
            });
        }
        self.request(
            Method::PUT,
            &path,
            &[],
            None,
            Some(&json!({ "label": label })),
            Retry::Safe,
        )?;
        Ok(())
    }

    /// Deletes; a 404 (already gone) is success.
    pub fn delete_instance(&self, id: u64) -> Result<(), LinodeError> {
        let path = format!("/linode/instances/{id}");
        match self.request(Method::DELETE, &path, &[], None, None, Retry::Safe) {
            Ok(_) | Err(LinodeError::Api { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    v: Value,
    method: &str,
    path: &str,
) -> Result<T, LinodeError> {
    serde_json::from_value(v).map_err(|e| LinodeError::Transport {
        method: method.into(),
        path: path.into(),
        message: format!("unexpected response shape: {e}"),
    })
}

/// The wait a 429 asks for: `Retry-After` in seconds (as Linode documents it), honoured as sent;
/// 1 s when it is missing or unreadable.
fn retry_after(resp: &Response) -> Duration {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
}

/// `field: reason; ...` from the API's error JSON, or the raw body.
fn error_message(resp: Response) -> String {
    let text = resp.text().unwrap_or_default();
    match serde_json::from_str::<ApiErrors>(&text) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|x| match &x.field {
                Some(f) => format!("{f}: {}", x.reason),
                None => x.reason.clone(),
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => text.chars().take(300).collect(),
    }
}

/// The deployment's lease as Linode tags (`POST /tags`, `GET /tags`, `DELETE /tags/{label}`),
/// seen by every deployer with a token for the account ([`crate::lease`]).
pub struct LinodeTagLeases {
    client: std::sync::Arc<LinodeClient>,
}

impl LinodeTagLeases {
    pub fn new(client: std::sync::Arc<LinodeClient>) -> LinodeTagLeases {
        LinodeTagLeases { client }
    }
}

impl crate::lease::LeaseStore for LinodeTagLeases {
    fn list(&self) -> Result<Vec<String>, String> {
        Ok(self
            .client
            .list_tags()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|t| t.starts_with(crate::lease::PREFIX))
            .collect())
    }
    fn create(&self, name: &str) -> Result<(), String> {
        self.client.create_tag(name).map_err(|e| e.to_string())
    }
    fn delete(&self, name: &str) -> Result<(), String> {
        self.client.delete_tag(name).map_err(|e| e.to_string())
    }
    /// The host's temporary directory: a holder's liveness file there tells a deployer on the
    /// same host (with the same `TMPDIR`) that the holder died.
    fn liveness_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join("lb-deployer-leases")
    }
    fn describe(&self) -> String {
        "a Linode tag".into()
    }
}

/// Instances as Linode VMs.
pub struct LinodeProvider {
    client: std::sync::Arc<LinodeClient>,
    cfg: LinodeConfig,
    tag: String,
    known_hosts: std::path::PathBuf,
}

impl LinodeProvider {
    pub fn new(
        client: LinodeClient,
        cfg: LinodeConfig,
        tag: String,
        state_dir: &Path,
    ) -> LinodeProvider {
        LinodeProvider {
            client: std::sync::Arc::new(client),
            cfg,
            tag,
            known_hosts: state_dir.join("known_hosts"),
        }
    }

    fn convert(&self, li: LinodeInstance) -> Instance {
        let role = if li.tags.iter().any(|t| t == "role-lb") {
            Role::Lb
        } else {
            Role::Nameserver
        };
        let address = li
            .ipv4
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .find(|a| !is_private(a))
            .or_else(|| li.ipv4.iter().find_map(|a| a.parse().ok()))
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let private_address = li
            .tags
            .iter()
            .find_map(|t| t.strip_prefix(IPAM_TAG_PREFIX)?.parse::<IpAddr>().ok());
        Instance {
            id: li.id,
            label: li.label,
            role,
            status: li.status,
            address,
            dns_port: crate::config::VM_DNS_PORT,
            metrics_port: crate::config::VM_METRICS_PORT,
            dir: None,
            private_address,
            region: Some(li.region).filter(|r| !r.is_empty()),
            operation: li
                .tags
                .iter()
                .find_map(|t| super::OperationMark::from_tag(t)),
        }
    }
}

fn is_private(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_private() || v.is_loopback(),
        IpAddr::V6(_) => false,
    }
}

fn api_err(e: LinodeError) -> ProviderError {
    ProviderError::Api(e.to_string())
}

/// A failed create: refused (an HTTP 4xx answer, rate limits included, or a request never
/// sent), with a label already in use told apart (Linode answers 400 naming the `label`
/// field: "Label must be unique among your linodes"); or of unknown outcome (a server error, a
/// lost or timed-out reply: Linode may have created the instance).
fn create_err(label: &str, e: LinodeError) -> ProviderError {
    match &e {
        LinodeError::Api {
            status, message, ..
        } if (400..500).contains(status) => {
            let m = message.to_ascii_lowercase();
            if *status == 400
                && m.contains("label")
                && (m.contains("unique") || m.contains("in use") || m.contains("already"))
            {
                ProviderError::LabelInUse {
                    label: label.to_string(),
                    message: e.to_string(),
                }
            } else {
                ProviderError::CreateRefused(e.to_string())
            }
        }
        LinodeError::Invalid { .. }
        | LinodeError::MissingToken
        | LinodeError::RateLimited { .. }
        // A create is retried only on 429, which Linode did not act on.
        | LinodeError::RetriesExhausted { .. } => ProviderError::CreateRefused(e.to_string()),
        LinodeError::Api { .. } | LinodeError::Transport { .. } => api_err(e),
    }
}

impl Provider for LinodeProvider {
    fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let mut keys = Vec::new();
        for f in &self.cfg.authorized_keys_files {
            let k = std::fs::read_to_string(f).map_err(|e| {
                ProviderError::Io(format!("cannot read authorized key {}: {e}", f.display()))
            })?;
            keys.extend(
                k.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string),
            );
        }
        // A random root password is required by the API; login is by key only, so it is
        // never stored or shown.
        let root_pass: String = (0..32)
            .map(|_| {
                let c = rand::rng().random_range(0..62u8);
                (match c {
                    0..=9 => b'0' + c,
                    10..=35 => b'a' + c - 10,
                    _ => b'A' + c - 36,
                }) as char
            })
            .collect::<String>()
            + "#9aA";
        let role_tag = match spec.role {
            Role::Lb => "role-lb",
            Role::Nameserver => "role-nameserver",
        };
        let mut tags = vec![self.tag.clone(), role_tag.to_string()];
        tags.extend(spec.operation.map(|m| m.tag()));
        // eth0 public (the default route, reachable from the internet), eth1 on the VLAN.
        let interfaces = spec.vlan.as_ref().map(|v| {
            tags.push(format!("{IPAM_TAG_PREFIX}{}", v.address));
            vec![
                InterfaceRequest::public(),
                InterfaceRequest::vlan(&v.label, &v.ipam_address()),
            ]
        });
        let req = CreateInstance {
            label: spec.label.clone(),
            region: spec
                .region
                .clone()
                .unwrap_or_else(|| self.cfg.region.clone()),
            instance_type: spec
                .instance_type
                .clone()
                .unwrap_or_else(|| self.cfg.instance_type.clone()),
            image: spec.image.clone().unwrap_or_else(|| self.cfg.image.clone()),
            root_pass,
            authorized_keys: keys,
            tags,
            booted: true,
            interfaces,
        };
        self.client
            .create_instance(&req)
            .map(|li| self.convert(li))
            .map_err(|e| create_err(&spec.label, e))
    }

    fn get(&self, id: u64) -> Result<Option<Instance>, ProviderError> {
        let li = self.client.get_instance(id).map_err(api_err)?;
        Ok(li
            .filter(|l| l.tags.contains(&self.tag))
            .map(|l| self.convert(l)))
    }

    fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let all = self
            .client
            .list_instances(&json!({ "tags": self.tag }))
            .map_err(api_err)?;
        // The filter is the API's; check the tag again so a lax filter can never widen it.
        Ok(all
            .into_iter()
            .filter(|l| l.tags.contains(&self.tag))
            .map(|l| self.convert(l))
            .collect())
    }

    fn find_by_label(&self, label: &str) -> Result<Option<Instance>, ProviderError> {
        let all = self
            .client
            .list_instances(&json!({ "label": label, "tags": self.tag }))
            .map_err(api_err)?;
        Ok(all
            .into_iter()
            .find(|l| l.label == label && l.tags.contains(&self.tag))
            .map(|l| self.convert(l)))
    }

    fn rename(&self, id: u64, label: &str) -> Result<(), ProviderError> {
        self.client.update_label(id, label).map_err(api_err)
    }

    fn delete(&self, id: u64) -> Result<(), ProviderError> {
        self.client.delete_instance(id).map_err(api_err)
    }

    fn wait_running(&self, id: u64, timeout: Duration) -> Result<Instance, ProviderError> {
        let start = Instant::now();
        loop {
            let (label, last) = match self.get(id)? {
                Some(i) if i.status == "running" => return Ok(i),
                Some(i) => (i.label, i.status),
                None => return Err(ProviderError::NotFound(id)),
            };
            if start.elapsed() >= timeout {
                return Err(ProviderError::BootTimeout {
                    id,
                    label,
                    waited: timeout,
                    status: last,
                });
            }
            std::thread::sleep(self.client.backoff.min(Duration::from_secs(5)));
        }
    }

    fn host_vars(&self, inst: &Instance) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("ansible_host".into(), json!(inst.address.to_string()));
        m.insert("ansible_user".into(), json!(self.cfg.ssh_user));
        m
    }

    fn ssh_target(&self, inst: &Instance) -> Option<SshTarget> {
        Some(SshTarget {
            program: self.cfg.ssh_command.clone(),
            target: format!("{}@{}", self.cfg.ssh_user, inst.address),
            known_hosts: self.known_hosts.clone(),
            identity: None,
        })
    }

    fn lease_store(&self) -> std::sync::Arc<dyn crate::lease::LeaseStore> {
        std::sync::Arc::new(LinodeTagLeases::new(std::sync::Arc::clone(&self.client)))
    }

    fn vlan_support(&self, region: &str) -> Result<VlanSupport, ProviderError> {
        let r = self.client.get_region(region).map_err(api_err)?;
        if r.capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(VLAN_CAPABILITY))
        {
            Ok(VlanSupport::Yes)
        } else {
            Ok(VlanSupport::No {
                capabilities: r.capabilities,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_follow_the_documented_rules() {
        let ok = [
            InterfaceRequest::public(),
            InterfaceRequest::vlan("dns", "10.0.0.3/24"),
        ];
        assert_eq!(interfaces_error(&ok), None);
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!([{"purpose": "public"}, {"purpose": "vlan", "label": "dns", "ipam_address": "10.0.0.3/24"}])
        );
        let cases: Vec<(Vec<InterfaceRequest>, &str)> = vec![
            (vec![], "interfaces"),
            (
                vec![InterfaceRequest::public(), InterfaceRequest::public()],
                "interfaces[1].purpose",
            ),
            (
                vec![InterfaceRequest::vlan("a--b", "10.0.0.3/24")],
                "interfaces[0].label",
            ),
            (
                vec![InterfaceRequest::vlan("dns", "10.0.0.3")],
                "interfaces[0].ipam_address",
            ),
            (
                vec![
                    InterfaceRequest::vlan("dns", "10.0.0.3/24"),
                    InterfaceRequest::vlan("dns", "10.0.0.4/24"),
                ],
                "interfaces[1].label",
            ),
            (
                vec![InterfaceRequest {
                    purpose: "public".into(),
                    label: Some("x".into()),
                    ipam_address: None,
                }],
                "interfaces[0].label",
            ),
        ];
        for (ifs, field) in cases {
            let (f, _) = interfaces_error(&ifs).unwrap_or_else(|| panic!("{ifs:?} accepted"));
            assert_eq!(f, field, "{ifs:?}");
        }
    }
}
