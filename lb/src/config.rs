//! The TOML configuration, split like dnsdist's: what is fixed once the process runs
//! ([`ListenConfig`], [`UdpConfig`], [`TcpConfig`], [`ControlConfig`]) and what may change at run
//! time through a reload or the control socket ([`BackendsConfig`], [`HealthConfig`]).
//!
//! Every struct denies unknown keys, so a typo is an error rather than a silently ignored key.
//! Errors name the file and the key at fault.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::policy::Policy;
use crate::prefix::Prefix;
use crate::wire;

/// Most prefixes in one access or exemption list.
pub const MAX_PREFIXES: usize = 256;

/// A configuration problem, with the file (and where known the key) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The OS error is part of the message, not a `source`, so a report of the error chain
    // does not print it twice.
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// A bad value of `key` in the file at `path`.
    pub fn invalid(path: &Path, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_string(),
            message,
        }
    }
}

/// Reads a TOML file into `T`; every error names the file. Used for lb's and the deployer's
/// configuration.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_toml(&text, path)
}

/// Parses TOML text into `T`; `path` is only used in messages.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Keys renamed so that each carries its unit, as `(section, old name, new name)`. A file with
/// an old name still loads, for one release, with a [`Deprecation`] note that `lb check`
/// prints and `lb run` logs at start and on every reload; a file setting both names is refused
/// naming both. The old names leave this list (and become unknown keys) in the next release.
pub const RENAMED_KEYS: &[(&str, &str, &str)] = &[
    ("udp", "max_datagram", "max_datagram_bytes"),
    ("udp", "recv_buffer", "recv_buffer_bytes"),
    ("udp", "send_buffer", "send_buffer_bytes"),
    (
        "tcp",
        "max_connections_per_ip",
        "max_connections_per_prefix",
    ),
    ("tcp", "max_query_size", "max_query_size_bytes"),
    ("tcp", "max_transfer_size", "max_transfer_size_bytes"),
    ("rrl", "window", "window_secs"),
    ("cache", "max_answer_size", "max_answer_size_bytes"),
    ("cache", "max_ttl", "max_ttl_secs"),
    ("cache", "negative_ttl", "negative_ttl_secs"),
    ("cache", "stale_ttl", "stale_ttl_secs"),
];

/// A config file that set a key by its old name ([`RENAMED_KEYS`]): what to tell the operator.
///
/// The config reader returns these next to the config instead of logging them itself, so each
/// caller says it where its user looks: `lb check` on its output, `lb run` in its log (at start
/// and on reload), a reload also in the answer `lb ctl reload` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprecation {
    /// The file that used the old name.
    pub path: PathBuf,
    /// The old key, `section.key`.
    pub old: String,
    /// The key it is now, `section.key`.
    pub new: String,
}

impl fmt::Display for Deprecation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config file {}: key `{}` is deprecated, renamed `{}`: rename it (the old name \
             stops working in the next release)",
            self.path.display(),
            self.old,
            self.new
        )
    }
}

/// Parses lb's config text, moving every old key name ([`RENAMED_KEYS`]) to its new one first.
///
/// The renaming works on the parsed document, whose keys keep their place in the text, so
/// errors about the file still point at its line whichever name it used.
fn parse_lb_toml(text: &str, path: &Path) -> Result<(LbConfig, Vec<Deprecation>), ConfigError> {
    use toml::de::{DeTable, DeValue, Deserializer};
    let parse_error = |e: toml::de::Error| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_string(),
    };
    let mut root = DeTable::parse(text).map_err(parse_error)?;
    let mut notes = Vec::new();
    for &(section, old, new) in RENAMED_KEYS {
        let Some(DeValue::Table(table)) = root.get_mut().get_mut(section).map(|v| v.get_mut())
        else {
            continue;
        };
        let Some((key, value)) = table.remove_entry(old) else {
            continue;
        };
        if table.contains_key(new) {
            return Err(ConfigError::invalid(
                path,
                &format!("{section}.{new}"),
                format!(
                    "also set under its old name `{section}.{old}`: keep only `{section}.{new}`"
                ),
            ));
        }
        table.insert(toml::Spanned::new(key.span(), new.into()), value);
        notes.push(Deprecation {
            path: path.to_owned(),
            old: format!("{section}.{old}"),
            new: format!("{section}.{new}"),
        });
    }
    let cfg = LbConfig::deserialize(Deserializer::from(root)).map_err(|mut e| {
        e.set_input(Some(text));
        parse_error(e)
    })?;
    Ok((cfg, notes))
}

/// The whole `lb` configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    pub listen: ListenConfig,
    pub backends: BackendsConfig,
    #[serde(default)]
    pub udp: UdpConfig,
    #[serde(default)]
    pub tcp: TcpConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub rrl: RrlConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// `[cache]`: the packet cache; fixed after start.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Answers kept (0 = no cache, the default). Memory is fixed: `entries` ×
    /// `max_answer_size_bytes` bytes, plus 48 bytes each.
    #[serde(default)]
    pub entries: usize,
    /// The largest answer stored, in bytes; larger ones are not cached.
    #[serde(default = "default_cache_max_answer_size_bytes")]
    pub max_answer_size_bytes: usize,
    /// Longest time an answer is kept, in seconds, whatever its TTL.
    #[serde(default = "default_cache_max_ttl_secs")]
    pub max_ttl_secs: u32,
    /// Longest time an NXDOMAIN or NODATA answer is kept, in seconds (also bounded by the
    /// SOA's minimum).
    #[serde(default = "default_cache_negative_ttl_secs")]
    pub negative_ttl_secs: u32,
    /// Seconds past its expiry an answer may still be served while every backend is down
    /// (0 = never).
    #[serde(default)]
    pub stale_ttl_secs: u32,
}

impl CacheConfig {
    /// The bytes the table takes (allocated zeroed at start, resident as it fills): slots
    /// rounded up to a power of two, each an answer of `max_answer_size_bytes` (in 8-byte words)
    /// and 48 bytes of key and times.
    pub fn memory_bytes(&self) -> u64 {
        if self.entries == 0 {
            return 0;
        }
        let slots = self.entries.max(4).next_power_of_two() as u64;
        slots * (self.max_answer_size_bytes.div_ceil(8) as u64 * 8 + 48)
    }
}

/// The smallest answer queue budget, 128 KiB: below half of it (reading pauses at half) a
/// queue holds at most 65,535 bytes, and the largest TCP answer frame (2 + 65,535 bytes) still
/// fits on top.
pub const MIN_QUEUED_BYTES: usize = 128 << 10;

/// The largest packet cache lb agrees to allocate.
const MAX_CACHE_BYTES: u64 = 16 << 30;

/// `[rrl]`: response rate limiting with BIND's semantics (per client prefix and response
/// class); may change at run time, except `entries`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RrlConfig {
    /// Positive answers per second per (prefix, name, type); also the default of the other
    /// rates. 0 turns rate limiting off.
    #[serde(default)]
    pub responses_per_second: u32,
    /// NODATA answers per second per (prefix, zone); default `responses_per_second`.
    #[serde(default)]
    pub nodata_per_second: Option<u32>,
    /// NXDOMAIN answers per second per (prefix, zone); default `responses_per_second`.
    #[serde(default)]
    pub nxdomains_per_second: Option<u32>,
    /// Referrals per second per (prefix, delegation point); default `responses_per_second`.
    #[serde(default)]
    pub referrals_per_second: Option<u32>,
    /// Error answers (SERVFAIL, REFUSED, FORMERR...) per second per prefix; default
    /// `responses_per_second`.
    #[serde(default)]
    pub errors_per_second: Option<u32>,
    /// Every answer per second per prefix, whatever its class (0 = no such cap).
    #[serde(default)]
    pub all_per_second: u32,
    /// Seconds of debt a flooding prefix accumulates (the balance floor is −window×rate).
    #[serde(default = "default_rrl_window_secs")]
    pub window_secs: u32,
    /// Every `slip`th limited answer is sent truncated (TC=1, empty) instead of dropped, so
    /// real clients retry over TCP; 0 never.
    #[serde(default = "default_rrl_slip")]
    pub slip: u32,
    #[serde(default = "default_ipv4_prefix_length")]
    pub ipv4_prefix_length: u8,
    #[serde(default = "default_ipv6_prefix_length")]
    pub ipv6_prefix_length: u8,
    /// Clients never limited.
    #[serde(default)]
    pub exempt: Vec<Prefix>,
    /// Count what would be limited, limit nothing.
    #[serde(default)]
    pub log_only: bool,
    /// Size of the rate table (fixed at start): the (prefix, class) pairs tracked at once.
    #[serde(default = "default_rrl_entries")]
    pub entries: usize,
}

/// `[access]`: who may use the proxy at all, and for what; may change at run time.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// If not empty, only these clients are served.
    #[serde(default)]
    pub allow: Vec<Prefix>,
    /// These clients are never served (checked before `allow`).
    #[serde(default)]
    pub deny: Vec<Prefix>,
    /// What a refused client gets: `refuse` (REFUSED) or `drop` (nothing).
    #[serde(default)]
    pub action: AccessAction,
    /// Clients that may pull zone transfers (AXFR, IXFR) through the proxy; default none.
    #[serde(default)]
    pub transfer_allow: Vec<Prefix>,
    /// Clients that may send UPDATE through the proxy; default none.
    #[serde(default)]
    pub update_allow: Vec<Prefix>,
    /// Clients that may send NOTIFY through the proxy; default none.
    #[serde(default)]
    pub notify_allow: Vec<Prefix>,
}

/// What `[access]` does to a client it refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessAction {
    /// Answer REFUSED.
    #[default]
    Refuse,
    /// Answer nothing.
    Drop,
}

/// `[metrics]`: the Prometheus endpoint; fixed after start.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for `GET /metrics` and `GET /healthz` (unset: no HTTP endpoint).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[listen]`: addresses and worker threads; fixed after start.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// UDP listen addresses.
    #[serde(default)]
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// UDP worker threads, each with its own `SO_REUSEPORT` socket per address and its own
    /// upstream sockets. 0 means one per CPU.
    #[serde(default)]
    pub workers: usize,
}

/// `[backends]`: the nameservers and how to spread queries over them; may change at run time.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendsConfig {
    /// `IP:PORT` (or a bare IP, meaning port 53).
    pub servers: Vec<BackendAddr>,
    #[serde(default)]
    pub policy: Policy,
    /// How long a forwarded query waits for its answer before it counts as a backend timeout.
    #[serde(default = "default_query_timeout_ms")]
    pub timeout_ms: u64,
    /// In-flight queries per backend and per UDP worker (the ID table's bound). A query that
    /// finds its backend's table full is dropped and counted.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// After a swap, a query still in flight to a removed backend that has not been answered
    /// this long is re-sent to the new set, so killing an old backend right away costs no answer.
    #[serde(default = "default_resend_after_ms")]
    pub resend_after_ms: u64,
    /// UDP sockets in use at once per backend and per worker, each on a port the kernel picks
    /// at random (an answer is accepted only on the socket its query left from).
    #[serde(default = "default_upstream_sockets")]
    pub upstream_sockets: usize,
    /// Queries one upstream socket sends before it is replaced by one on a new random port.
    #[serde(default = "default_upstream_socket_queries")]
    pub upstream_socket_queries: u32,
}

/// `[udp]`: per-socket settings; fixed after start.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UdpConfig {
    /// Largest client datagram read, in bytes; longer ones are dropped and counted.
    #[serde(default = "default_max_datagram_bytes")]
    pub max_datagram_bytes: usize,
    /// `SO_RCVBUF` for listeners and upstream sockets, in bytes (0 keeps the system default).
    #[serde(default = "default_socket_buffer_bytes")]
    pub recv_buffer_bytes: usize,
    /// `SO_SNDBUF` in bytes (0 keeps the system default).
    #[serde(default = "default_socket_buffer_bytes")]
    pub send_buffer_bytes: usize,
}

/// `[tcp]`: limits and timeouts for client and backend connections; fixed after start.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Client connections open at once; more are accepted and closed at once, counted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Client connections open at once from one client network (`ipv4_prefix_length`,
    /// `ipv6_prefix_length`). `max_connections_per_ip`, its name before it counted networks,
    /// is still accepted (see [`RENAMED_KEYS`]).
    #[serde(default = "default_max_connections_per_prefix")]
    pub max_connections_per_prefix: usize,
    /// The IPv4 network `max_connections_per_prefix` counts by (32: each address).
    #[serde(default = "default_tcp_ipv4_prefix_length")]
    pub ipv4_prefix_length: u8,
    /// The IPv6 network `max_connections_per_prefix` counts by (128: each address).
    #[serde(default = "default_ipv6_prefix_length")]
    pub ipv6_prefix_length: u8,
    /// Queries one client connection may have in flight; the proxy stops reading it at the cap.
    #[serde(default = "default_max_in_flight_per_connection")]
    pub max_in_flight_per_connection: usize,
    /// A client connection with nothing in flight and nothing read for this long is closed.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Once a frame has started, the rest of it must arrive within this time.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// An answer must be written to the client within this time.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// A client connection stops reading this long after it opened, answers what it has
    /// read, then closes (0: no limit).
    #[serde(default = "default_max_connection_age_ms")]
    pub max_connection_age_ms: u64,
    /// A client connection stops reading after this many queries, answers them, then closes
    /// (0: no limit).
    #[serde(default)]
    pub max_queries_per_connection: u64,
    /// Bytes of answers one client connection may have waiting for its writer (beyond what the
    /// kernel's socket buffer took): from half of it the connection reads no new query; an
    /// answer that does not fit closes the connection.
    #[serde(default = "default_max_queued_per_connection_bytes")]
    pub max_queued_per_connection_bytes: usize,
    /// The same for every client connection together: from half of it a connection with
    /// answers waiting reads no new query; an answer that does not fit closes its connection.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Largest query frame accepted from a client, in bytes; longer ones close the connection,
    /// counted.
    #[serde(default = "default_max_query_size_bytes")]
    pub max_query_size_bytes: usize,
    /// Pooled connections per backend, shared by all client connections.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Timeout for establishing a backend connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A pooled backend connection with nothing in flight for this long is closed.
    #[serde(default = "default_backend_idle_timeout_ms")]
    pub backend_idle_timeout_ms: u64,
    /// Queries in flight on one pooled backend connection.
    #[serde(default = "default_backend_max_in_flight")]
    pub backend_max_in_flight: usize,
    /// A zone transfer (AXFR/IXFR) must end within this time.
    #[serde(default = "default_transfer_timeout_ms")]
    pub transfer_timeout_ms: u64,
    /// Most bytes one zone transfer may relay.
    #[serde(default = "default_max_transfer_size_bytes")]
    pub max_transfer_size_bytes: u64,
}

/// `[control]`: the local control socket and the runtime state file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket path for `lb ctl`; no control socket when unset.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Where the runtime backend set is persisted; loaded in preference to `backends.servers`.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

/// The longest duration any `*_ms` key takes: 7 days. Far past any sensible timeout, and
/// far from where adding it to a time would overflow (which would panic on the packet path).
pub const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;

fn check_duration_ms(v: u64) -> Result<(), String> {
    if v > MAX_DURATION_MS {
        return Err(format!("{v} is more than {MAX_DURATION_MS} (7 days)"));
    }
    Ok(())
}

fn default_query_timeout_ms() -> u64 {
    2000
}
fn default_max_in_flight() -> usize {
    4096
}
fn default_resend_after_ms() -> u64 {
    250
}
fn default_upstream_sockets() -> usize {
    4
}
fn default_upstream_socket_queries() -> u32 {
    100
}
fn default_max_datagram_bytes() -> usize {
    4096
}
fn default_socket_buffer_bytes() -> usize {
    4 << 20
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_prefix() -> usize {
    64
}
fn default_tcp_ipv4_prefix_length() -> u8 {
    24
}
fn default_max_connection_age_ms() -> u64 {
    120_000
}
fn default_max_queued_per_connection_bytes() -> usize {
    256 << 10
}
fn default_max_queued_bytes() -> usize {
    32 << 20
}
fn default_max_in_flight_per_connection() -> usize {
    100
}
fn default_idle_timeout_ms() -> u64 {
    10_000
}
fn default_read_timeout_ms() -> u64 {
    5_000
}
fn default_write_timeout_ms() -> u64 {
    5_000
}
fn default_max_query_size_bytes() -> usize {
    16 * 1024
}
fn default_pool_size() -> usize {
    4
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_backend_idle_timeout_ms() -> u64 {
    10_000
}
fn default_backend_max_in_flight() -> usize {
    256
}
fn default_rrl_window_secs() -> u32 {
    15
}
fn default_rrl_slip() -> u32 {
    2
}
fn default_ipv4_prefix_length() -> u8 {
    24
}
fn default_ipv6_prefix_length() -> u8 {
    56
}
fn default_rrl_entries() -> usize {
    65_536
}
fn default_transfer_timeout_ms() -> u64 {
    600_000
}
fn default_max_transfer_size_bytes() -> u64 {
    1 << 30
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            max_datagram_bytes: default_max_datagram_bytes(),
            recv_buffer_bytes: default_socket_buffer_bytes(),
            send_buffer_bytes: default_socket_buffer_bytes(),
        }
    }
}

fn default_cache_max_answer_size_bytes() -> usize {
    512
}
fn default_cache_max_ttl_secs() -> u32 {
    86_400
}
fn default_cache_negative_ttl_secs() -> u32 {
    3_600
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            entries: 0,
            max_answer_size_bytes: default_cache_max_answer_size_bytes(),
            max_ttl_secs: default_cache_max_ttl_secs(),
            negative_ttl_secs: default_cache_negative_ttl_secs(),
            stale_ttl_secs: 0,
        }
    }
}

impl Default for RrlConfig {
    /// No `[rrl]` section: no rate limiting.
    fn default() -> Self {
        RrlConfig {
            responses_per_second: 0,
            nodata_per_second: None,
            nxdomains_per_second: None,
            referrals_per_second: None,
            errors_per_second: None,
            all_per_second: 0,
            window_secs: default_rrl_window_secs(),
            slip: default_rrl_slip(),
            ipv4_prefix_length: default_ipv4_prefix_length(),
            ipv6_prefix_length: default_ipv6_prefix_length(),
            exempt: Vec::new(),
            log_only: false,
            entries: default_rrl_entries(),
        }
    }
}

impl RrlConfig {
    /// True when any rate is set.
    pub fn active(&self) -> bool {
        self.responses_per_second > 0
            || self.all_per_second > 0
            || [
                self.nodata_per_second,
                self.nxdomains_per_second,
                self.referrals_per_second,
                self.errors_per_second,
            ]
            .iter()
            .any(|r| r.is_some_and(|r| r > 0))
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err((format!("rrl.{key}"), format!("{v} is outside {lo}..={hi}")))
            } else {
                Ok(())
            }
        };
        range("window_secs", self.window_secs.into(), 1, 3600)?;
        range("slip", self.slip.into(), 0, 10)?;
        range("ipv4_prefix_length", self.ipv4_prefix_length.into(), 1, 32)?;
        range("ipv6_prefix_length", self.ipv6_prefix_length.into(), 1, 128)?;
        range("entries", self.entries as u64, 1024, 1 << 24)?;
        for (key, v) in [
            ("responses_per_second", Some(self.responses_per_second)),
            ("nodata_per_second", self.nodata_per_second),
            ("nxdomains_per_second", self.nxdomains_per_second),
            ("referrals_per_second", self.referrals_per_second),
            ("errors_per_second", self.errors_per_second),
            ("all_per_second", Some(self.all_per_second)),
        ] {
            range(key, v.unwrap_or(0).into(), 0, 1_000_000)?;
            // The balance floor, −window×rate, is kept in 32 bits.
            let debt = u64::from(self.window_secs) * u64::from(v.unwrap_or(0));
            if debt > i32::MAX as u64 {
                return Err((
                    "rrl.window_secs".into(),
                    format!(
                        "window_secs {} × {key} {} = {debt} exceeds {} (the most debt a prefix can owe): lower one of them",
                        self.window_secs,
                        v.unwrap_or(0),
                        i32::MAX
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_connections: default_max_connections(),
            max_connections_per_prefix: default_max_connections_per_prefix(),
            ipv4_prefix_length: default_tcp_ipv4_prefix_length(),
            ipv6_prefix_length: default_ipv6_prefix_length(),
            max_in_flight_per_connection: default_max_in_flight_per_connection(),
            idle_timeout_ms: default_idle_timeout_ms(),
            read_timeout_ms: default_read_timeout_ms(),
            write_timeout_ms: default_write_timeout_ms(),
            max_connection_age_ms: default_max_connection_age_ms(),
            max_queries_per_connection: 0,
            max_queued_per_connection_bytes: default_max_queued_per_connection_bytes(),
            max_queued_bytes: default_max_queued_bytes(),
            max_query_size_bytes: default_max_query_size_bytes(),
            pool_size: default_pool_size(),
            connect_timeout_ms: default_connect_timeout_ms(),
            backend_idle_timeout_ms: default_backend_idle_timeout_ms(),
            backend_max_in_flight: default_backend_max_in_flight(),
            transfer_timeout_ms: default_transfer_timeout_ms(),
            max_transfer_size_bytes: default_max_transfer_size_bytes(),
        }
    }
}

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
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_health_timeout_ms")]
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
fn default_health_interval_ms() -> u64 {
    1000
}
fn default_health_timeout_ms() -> u64 {
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
            interval_ms: default_health_interval_ms(),
            timeout_ms: default_health_timeout_ms(),
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
            check_duration_ms(v).map_err(|m| (k.to_string(), m))?;
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

impl LbConfig {
    /// Which zones the packet cache keeps from serving old answers after a change on the same
    /// nameservers, as `lb check` prints it and `lb run` logs it at start; `None` when the
    /// cache is off. The second value is true when no zone is protected (a warning).
    ///
    /// Only the zones in `health.zones` are probed, so only their serial changes are seen and
    /// flush the cache; any other zone the nameservers serve is flushed only by swaps and
    /// reloads, and until then a hit may be the zone as it was, up to `cache.max_ttl_secs`.
    pub fn cache_zones_note(&self) -> Option<(String, bool)> {
        if self.cache.entries == 0 {
            return None;
        }
        Some(if self.health.active() {
            (
                format!(
                    "packet cache on: flushed when a probe sees the SOA serial of {} change (up \
                     or down); other zones these nameservers serve are flushed only by \
                     set-backends and reloads (list them in health.zones)",
                    self.health.zones.join(", ")
                ),
                false,
            )
        } else {
            (
                "packet cache on, but no health.zones are probed: a zone changed on the same \
                 nameservers is served from the cache as it was until its answers expire (up to \
                 cache.max_ttl_secs); only set-backends and reloads flush it. List every zone the \
                 nameservers serve in [health] zones"
                    .to_string(),
                true,
            )
        })
    }
}

/// A backend's address: `IP:PORT`, `[IPv6]:PORT`, or a bare IP meaning port 53.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr(pub SocketAddr);

impl FromStr for BackendAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(a) = t.parse::<SocketAddr>() {
            return Ok(BackendAddr(a));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(BackendAddr(SocketAddr::new(ip, 53)));
        }
        Err(format!(
            "`{s}` is not a backend address (expected IP:PORT, [IPv6]:PORT or a bare IP)"
        ))
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for BackendAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for BackendAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Checks a backend list the way both the config and `set-backends` need: non-empty, no
/// duplicates. Returns the message for the key's error.
pub fn check_backend_list(servers: &[BackendAddr]) -> Result<(), String> {
    if servers.is_empty() {
        return Err("the backend set must not be empty".into());
    }
    for (i, a) in servers.iter().enumerate() {
        if servers[..i].contains(a) {
            return Err(format!("backend {a} is listed twice"));
        }
        if a.0.port() == 0 {
            return Err(format!("backend {a} has port 0"));
        }
    }
    Ok(())
}

impl LbConfig {
    /// Reads and validates a config file, dropping the [`Deprecation`] notes (for `lb ctl`,
    /// which only wants the socket path; `lb run` and `lb check` use
    /// [`LbConfig::read_noting`]).
    pub fn read(path: &Path) -> Result<LbConfig, ConfigError> {
        Self::read_noting(path).map(|(cfg, _)| cfg)
    }

    /// Reads and validates a config file; also returns a note for each key set by its old
    /// name, for the caller to show.
    pub fn read_noting(path: &Path) -> Result<(LbConfig, Vec<Deprecation>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse_noting(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<LbConfig, ConfigError> {
        Self::parse_noting(text, path).map(|(cfg, _)| cfg)
    }

    /// [`LbConfig::parse`], with the [`Deprecation`] notes.
    pub fn parse_noting(
        text: &str,
        path: &Path,
    ) -> Result<(LbConfig, Vec<Deprecation>), ConfigError> {
        let (cfg, notes) = parse_lb_toml(text, path)?;
        cfg.validate(path)?;
        Ok((cfg, notes))
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::invalid(path, key, message);
        if self.listen.udp.is_empty() && self.listen.tcp.is_empty() {
            return Err(invalid(
                "listen",
                "give at least one address in `udp` or `tcp`".into(),
            ));
        }
        for (key, list) in [
            ("listen.udp", &self.listen.udp),
            ("listen.tcp", &self.listen.tcp),
        ] {
            for (i, a) in list.iter().enumerate() {
                if list[..i].contains(a) {
                    return Err(invalid(key, format!("{a} is listed twice")));
                }
            }
        }
        if self.listen.workers > 256 {
            return Err(invalid("listen.workers", "at most 256 workers".into()));
        }
        check_backend_list(&self.backends.servers).map_err(|m| invalid("backends.servers", m))?;
        let positive = [
            ("backends.timeout_ms", self.backends.timeout_ms),
            ("backends.resend_after_ms", self.backends.resend_after_ms),
            ("tcp.idle_timeout_ms", self.tcp.idle_timeout_ms),
            ("tcp.read_timeout_ms", self.tcp.read_timeout_ms),
            ("tcp.write_timeout_ms", self.tcp.write_timeout_ms),
            ("tcp.connect_timeout_ms", self.tcp.connect_timeout_ms),
            (
                "tcp.backend_idle_timeout_ms",
                self.tcp.backend_idle_timeout_ms,
            ),
            ("tcp.transfer_timeout_ms", self.tcp.transfer_timeout_ms),
            (
                "tcp.max_transfer_size_bytes",
                self.tcp.max_transfer_size_bytes,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        for (key, v) in [
            ("backends.timeout_ms", self.backends.timeout_ms),
            ("backends.resend_after_ms", self.backends.resend_after_ms),
            ("tcp.idle_timeout_ms", self.tcp.idle_timeout_ms),
            ("tcp.read_timeout_ms", self.tcp.read_timeout_ms),
            ("tcp.write_timeout_ms", self.tcp.write_timeout_ms),
            ("tcp.max_connection_age_ms", self.tcp.max_connection_age_ms),
            ("tcp.connect_timeout_ms", self.tcp.connect_timeout_ms),
            (
                "tcp.backend_idle_timeout_ms",
                self.tcp.backend_idle_timeout_ms,
            ),
            ("tcp.transfer_timeout_ms", self.tcp.transfer_timeout_ms),
        ] {
            check_duration_ms(v).map_err(|m| invalid(key, m))?;
        }
        let ranges: [(&str, usize, usize, usize); 14] = [
            (
                "backends.upstream_sockets",
                self.backends.upstream_sockets,
                1,
                64,
            ),
            (
                "backends.upstream_socket_queries",
                self.backends.upstream_socket_queries as usize,
                1,
                u32::MAX as usize,
            ),
            (
                "backends.max_in_flight",
                self.backends.max_in_flight,
                1,
                65_000,
            ),
            (
                "udp.max_datagram_bytes",
                self.udp.max_datagram_bytes,
                512,
                65_535,
            ),
            ("tcp.max_connections", self.tcp.max_connections, 1, 1 << 20),
            (
                "tcp.max_connections_per_prefix",
                self.tcp.max_connections_per_prefix,
                1,
                1 << 20,
            ),
            (
                "tcp.ipv4_prefix_length",
                self.tcp.ipv4_prefix_length.into(),
                1,
                32,
            ),
            (
                "tcp.ipv6_prefix_length",
                self.tcp.ipv6_prefix_length.into(),
                1,
                128,
            ),
            // Room for the largest answer (64 KiB) above the half where reading pauses.
            (
                "tcp.max_queued_per_connection_bytes",
                self.tcp.max_queued_per_connection_bytes,
                MIN_QUEUED_BYTES,
                1 << 30,
            ),
            (
                "tcp.max_queued_bytes",
                self.tcp.max_queued_bytes,
                MIN_QUEUED_BYTES,
                1 << 40,
            ),
            (
                "tcp.max_in_flight_per_connection",
                self.tcp.max_in_flight_per_connection,
                1,
                65_535,
            ),
            (
                "tcp.max_query_size_bytes",
                self.tcp.max_query_size_bytes,
                512,
                65_535,
            ),
            ("tcp.pool_size", self.tcp.pool_size, 1, 1024),
            (
                "tcp.backend_max_in_flight",
                self.tcp.backend_max_in_flight,
                1,
                65_000,
            ),
        ];
        for (key, v, lo, hi) in ranges {
            if v < lo || v > hi {
                return Err(invalid(key, format!("{v} is outside {lo}..={hi}")));
            }
        }
        if self.tcp.max_queued_bytes < self.tcp.max_queued_per_connection_bytes {
            return Err(invalid(
                "tcp.max_queued_bytes",
                format!(
                    "{} is less than tcp.max_queued_per_connection_bytes {}",
                    self.tcp.max_queued_bytes, self.tcp.max_queued_per_connection_bytes
                ),
            ));
        }
        self.health.validate().map_err(|(k, m)| invalid(&k, m))?;
        self.rrl.validate().map_err(|(k, m)| invalid(&k, m))?;
        for (key, v, lo, hi) in [
            ("cache.entries", self.cache.entries, 0, 1 << 24),
            (
                "cache.max_answer_size_bytes",
                self.cache.max_answer_size_bytes,
                64,
                65_535,
            ),
        ] {
            if v < lo || v > hi {
                return Err(invalid(key, format!("{v} is outside {lo}..={hi}")));
            }
        }
        // The table is allocated whole at start: refuse a size the machine is unlikely to give
        // rather than abort there.
        let table = self.cache.memory_bytes();
        if table > MAX_CACHE_BYTES {
            return Err(invalid(
                "cache.entries",
                format!(
                    "{} entries of cache.max_answer_size_bytes {} bytes take {} MiB, over the limit of {} MiB",
                    self.cache.entries,
                    self.cache.max_answer_size_bytes,
                    table >> 20,
                    MAX_CACHE_BYTES >> 20
                ),
            ));
        }
        for (key, list) in [
            ("access.allow", &self.access.allow),
            ("access.deny", &self.access.deny),
            ("access.transfer_allow", &self.access.transfer_allow),
            ("access.update_allow", &self.access.update_allow),
            ("access.notify_allow", &self.access.notify_allow),
            ("rrl.exempt", &self.rrl.exempt),
        ] {
            // Checked per packet, so the lists are kept short.
            if list.len() > MAX_PREFIXES {
                return Err(invalid(
                    key,
                    format!("{} prefixes, at most {MAX_PREFIXES}", list.len()),
                ));
            }
        }
        Ok(())
    }

    /// The number of UDP workers to run.
    pub fn workers(&self) -> usize {
        if self.listen.workers > 0 {
            self.listen.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

impl BackendsConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    pub fn resend_after(&self) -> Duration {
        Duration::from_millis(self.resend_after_ms)
    }
}

#[cfg(test)]
mod tests {
    /// `lb/examples/lb.toml` shows every key: each one the config has (defaults filled in)
    /// appears in the example, so a new key cannot be left out of it.
    #[test]
    fn the_example_lists_every_key() {
        let text = include_str!("../examples/lb.toml");
        let example: toml::Table = toml::from_str(text).unwrap();
        let cfg = LbConfig::parse(text, Path::new("examples/lb.toml")).unwrap();
        let full = toml::Table::try_from(&cfg).unwrap();
        for (section, keys) in &full {
            let toml::Value::Table(keys) = keys else {
                continue;
            };
            for key in keys.keys() {
                let shown = example
                    .get(section)
                    .and_then(|s| s.as_table())
                    .is_some_and(|s| s.contains_key(key));
                assert!(shown, "lb/examples/lb.toml lacks {section}.{key}");
            }
        }
    }

    use super::*;

    const MINIMAL: &str = r#"
        [listen]
        udp = ["127.0.0.1:5353"]
        tcp = ["127.0.0.1:5353"]
        [backends]
        servers = ["127.0.0.1:5301", "127.0.0.2"]
        policy = "round-robin"
    "#;

    fn parse(text: &str) -> Result<LbConfig, ConfigError> {
        LbConfig::parse(text, Path::new("lb.toml"))
    }

    #[test]
    fn durations_past_seven_days_are_refused_naming_the_key() {
        let over = MAX_DURATION_MS + 1;
        for (extra, key) in [
            (
                format!("[tcp]\nmax_connection_age_ms = {over}"),
                "tcp.max_connection_age_ms",
            ),
            (
                format!("[tcp]\ntransfer_timeout_ms = {over}"),
                "tcp.transfer_timeout_ms",
            ),
            (
                format!("[health]\nzones = [\"a.test\"]\ninterval_ms = {over}"),
                "health.interval_ms",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}\n{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains("7 days"), "{e}");
        }
        let text = MINIMAL.replace("policy =", &format!("timeout_ms = {over}\npolicy ="));
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("backends.timeout_ms") && e.contains("7 days"),
            "{e}"
        );
        let ok = format!("{MINIMAL}\n[tcp]\nmax_connection_age_ms = {MAX_DURATION_MS}\n");
        parse(&ok).unwrap();
    }

    #[test]
    fn parses_minimal_with_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.backends.policy, Policy::RoundRobin);
        assert_eq!(c.backends.servers[1].0, "127.0.0.2:53".parse().unwrap());
        assert_eq!(c.backends.timeout_ms, 2000);
        assert_eq!(c.tcp, TcpConfig::default());
    }

    #[test]
    fn the_per_prefix_limit_keeps_its_old_name_and_budgets_are_checked() {
        let (c, notes) = LbConfig::parse_noting(
            &format!("{MINIMAL}\n[tcp]\nmax_connections_per_ip = 7\n"),
            Path::new("lb.toml"),
        )
        .unwrap();
        assert_eq!(c.tcp.max_connections_per_prefix, 7);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(
            (c.tcp.ipv4_prefix_length, c.tcp.ipv6_prefix_length),
            (24, 56)
        );
        let e = parse(&format!(
            "{MINIMAL}\n[tcp]\nmax_connections_per_ip = 7\nmax_connections_per_prefix = 8\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tcp.max_connections_per_prefix")
                && e.contains("tcp.max_connections_per_ip"),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}\n[tcp]\nmax_queued_per_connection_bytes = 65536\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("tcp.max_queued_per_connection_bytes"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}\n[tcp]\nmax_queued_per_connection_bytes = 1048576\nmax_queued_bytes = 524288\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("tcp.max_queued_bytes"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[tcp]\nipv6_prefix_length = 129\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tcp.ipv6_prefix_length"), "{e}");
    }

    /// Every old name still loads, to the same config as its new name, with a note naming the
    /// file, the old key and the new one.
    #[test]
    fn old_key_names_load_with_a_note() {
        for &(section, old, new) in RENAMED_KEYS {
            // A value every one of the renamed keys accepts.
            let value = 1024;
            let with_old = format!("{MINIMAL}\n[{section}]\n{old} = {value}\n");
            let with_new = format!("{MINIMAL}\n[{section}]\n{new} = {value}\n");
            let (cfg, notes) = LbConfig::parse_noting(&with_old, Path::new("/etc/lb/old.toml"))
                .unwrap_or_else(|e| panic!("{section}.{old}: {e}"));
            let (expected, none) =
                LbConfig::parse_noting(&with_new, Path::new("/etc/lb/old.toml")).unwrap();
            assert_eq!(cfg, expected, "{section}.{old}");
            assert!(none.is_empty(), "{none:?}");
            assert_eq!(notes.len(), 1, "{notes:?}");
            let note = notes[0].to_string();
            assert!(
                note.contains("/etc/lb/old.toml")
                    && note.contains(&format!("`{section}.{old}`"))
                    && note.contains(&format!("`{section}.{new}`")),
                "{note}"
            );
        }
        // Dotted keys and inline tables are the same keys.
        let (cfg, notes) = LbConfig::parse_noting(
            &format!("rrl.window = 7\ncache = {{ max_ttl = 60 }}\n{MINIMAL}"),
            Path::new("lb.toml"),
        )
        .unwrap();
        assert_eq!((cfg.rrl.window_secs, cfg.cache.max_ttl_secs), (7, 60));
        assert_eq!(notes.len(), 2, "{notes:?}");
    }

    #[test]
    fn an_old_and_a_new_name_together_are_refused_naming_both() {
        let e = parse(&format!("{MINIMAL}\n[rrl]\nwindow = 5\nwindow_secs = 5\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lb.toml") && e.contains("`rrl.window_secs`") && e.contains("`rrl.window`"),
            "{e}"
        );
    }

    /// Renaming an old key keeps its place in the text: a later error still names the line.
    #[test]
    fn errors_in_a_file_with_old_names_still_point_at_the_line() {
        let e = parse(&format!(
            "{MINIMAL}\n[cache]\nmax_ttl = 60\nstale_ttl = \"1h\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 11") && e.contains("stale_ttl"), "{e}");
    }

    /// The example and the packaged file are valid and use no old key name.
    #[test]
    fn example_file_is_valid() {
        for file in ["examples/lb.toml", "dist/lb.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let (_, notes) = LbConfig::read_noting(&p).unwrap();
            assert!(notes.is_empty(), "{file}: {notes:?}");
        }
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse(&MINIMAL.replace("policy", "polcy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lb.toml") && e.contains("polcy"), "{e}");
    }

    #[test]
    fn rrl_debt_that_does_not_fit_is_refused() {
        let e = parse(&format!(
            "{MINIMAL}\n[rrl]\nresponses_per_second = 1000000\nwindow_secs = 3600\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rrl.window_secs") && e.contains("responses_per_second"),
            "{e}"
        );
        parse(&format!(
            "{MINIMAL}\n[rrl]\nresponses_per_second = 1000000\nwindow_secs = 2000\n"
        ))
        .unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse(&MINIMAL.replace("127.0.0.2", "not-an-ip"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not-an-ip"), "{e}");
        let e = parse(&MINIMAL.replace("round-robin", "fastest"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fastest") && e.contains("policy"), "{e}");
        let e = parse(&MINIMAL.replace("127.0.0.2", "127.0.0.1:5301"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backends.servers") && e.contains("twice"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[health]\nrise = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("health.zones"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[health]\nzones = [\"a..b\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("health.zones") && e.contains("a..b"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}\n[cache]\nentries = 16000000\nmax_answer_size_bytes = 65535\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cache.entries") && e.contains("MiB"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[tcp]\npool_size = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tcp.pool_size"), "{e}");
        let e = parse(&MINIMAL.replace(
            r#"servers = ["127.0.0.1:5301", "127.0.0.2"]"#,
            "servers = []",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn the_cache_note_names_the_protected_zones_or_warns() {
        assert_eq!(
            parse(MINIMAL).unwrap().cache_zones_note(),
            None,
            "cache off"
        );
        let (note, warn) = parse(&format!("{MINIMAL}\n[cache]\nentries = 64\n"))
            .unwrap()
            .cache_zones_note()
            .unwrap();
        assert!(warn && note.contains("no health.zones"), "{note}");
        let (note, warn) = parse(&format!(
            "{MINIMAL}\n[cache]\nentries = 64\n[health]\nzones = [\"a.test.\", \"b.test.\"]\n"
        ))
        .unwrap()
        .cache_zones_note()
        .unwrap();
        assert!(!warn && note.contains("a.test., b.test."), "{note}");
    }
}
