//! `deployer.toml`: the provider, the nameservers, the zones, the load balancers, timeouts.
//!
//! Unknown keys are rejected. Relative paths are resolved against the config file's directory.
//! The Linode API token is never read from this file: only from `LINODE_TOKEN`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// A problem with the deployer configuration, naming the file and key (the same errors and
/// messages as lb's configuration).
pub use lb::config::ConfigError as DeployConfigError;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployerConfig {
    /// The deployment's name; every instance is tagged `deployer-NAME`, and the deployer never
    /// touches an instance without its tag.
    pub deployment: String,
    /// Journal, generated inventories, known_hosts, local instances.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The Ansible tree (playbooks, roles, zones).
    #[serde(default = "default_ansible_dir")]
    pub ansible_dir: PathBuf,
    /// The `lb` binary installed on load balancers (and used for `lb ctl` locally).
    #[serde(default = "default_lb_binary")]
    pub lb_binary: PathBuf,
    pub provider: ProviderConfig,
    #[serde(default)]
    pub linode: Option<LinodeConfig>,
    #[serde(default)]
    pub machines: Option<MachinesConfig>,
    pub nameservers: Vec<NameserverConfig>,
    pub zones: ZonesConfig,
    pub lbs: Vec<LbConfig>,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub ansible: AnsibleConfig,
    #[serde(default)]
    pub roll_lb: RollLbConfig,
    #[serde(default)]
    pub canary: CanaryConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub checks: ChecksConfig,
    #[serde(default)]
    pub lease: LeaseConfig,
    /// The file this was read from (for messages).
    #[serde(skip)]
    pub source: PathBuf,
}

/// The DNS port of every VM instance (lbs and nameservers): where the deployer's checks and
/// the lbs send. Not configurable per host (see [`DeployerConfig::validate_ports`]).
pub const VM_DNS_PORT: u16 = 53;
/// The metrics port of every VM lb: where the deployer scrapes `/metrics` (the drain).
pub const VM_METRICS_PORT: u16 = 9153;

/// `[network]`: the private path between lbs and nameservers, who administers the VMs, and
/// where the deployer's own checks come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Linode VLAN label. Set: every instance gets a VLAN interface (eth1) with an address from
    /// `subnet`, lbs send to the nameservers' VLAN addresses, and the nameservers take DNS only
    /// on the VLAN. Unset: lbs reach the nameservers on their public addresses.
    #[serde(default)]
    pub vlan: Option<String>,
    /// The VLAN's IPv4 subnet; addresses are allocated from it by the deployer, across old and
    /// `-next` instances together.
    #[serde(default = "default_subnet")]
    pub subnet: Subnet,
    /// The VLAN interface's name on the VMs (Linode names interfaces by position: the public
    /// one is eth0, the VLAN eth1).
    #[serde(default = "default_vlan_interface")]
    pub interface: String,
    /// Networks allowed to reach SSH (and the lbs' metrics port) through the firewalls; the
    /// deployer's own address must be in one. Passed to the roles as `admin_networks`.
    #[serde(default)]
    pub admin_networks: Vec<String>,
    /// The deployer's own address as the nameservers see it. Set: the nameservers allow it
    /// (allow-query and firewall) and the deployer checks them directly. Unset (default): the
    /// deployer checks nameservers from an lb with `lb ctl probe`.
    #[serde(default)]
    pub check_address: Option<IpAddr>,
}

/// An IPv4 subnet (`10.0.0.0/24`), with host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub len: u8,
}

impl Subnet {
    /// The usable host addresses, lowest first (neither the network nor the broadcast address).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let size = 1u64 << (32 - u32::from(self.len));
        (1..size.saturating_sub(1)).map(move |k| Ipv4Addr::from(base + k as u32))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.len));
        u32::from(a) & mask == u32::from(self.network)
    }

    /// `a` with this subnet's prefix length, as Linode's `ipam_address` wants it.
    pub fn cidr(&self, a: Ipv4Addr) -> String {
        format!("{a}/{}", self.len)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Subnet, String> {
        let bad = || format!("`{s}` is not an IPv4 subnet like 10.0.0.0/24 (prefix length 8-30)");
        let (a, l) = s.trim().split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| (8..=30).contains(l))
            .ok_or_else(bad)?;
        let mask = u32::MAX << (32 - u32::from(len));
        if u32::from(network) & !mask != 0 {
            return Err(format!(
                "`{s}` has host bits set: the subnet is {}/{len}",
                Ipv4Addr::from(u32::from(network) & mask)
            ));
        }
        Ok(Subnet { network, len })
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            vlan: None,
            subnet: default_subnet(),
            interface: default_vlan_interface(),
            admin_networks: Vec::new(),
            check_address: None,
        }
    }
}

fn default_subnet() -> Subnet {
    Subnet {
        network: Ipv4Addr::new(10, 0, 0, 0),
        len: 24,
    }
}

fn default_vlan_interface() -> String {
    "eth1".into()
}

/// Why `label` is not a valid Linode VLAN label (the API's prose: 1-64 ASCII letters, digits
/// and hyphens, no `--`).
pub fn vlan_label_error(label: &str) -> Option<String> {
    if label.is_empty() || label.len() > 64 {
        return Some(format!("VLAN label `{label}` must be 1-64 characters"));
    }
    if !label
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return Some(format!(
            "VLAN label `{label}` may only contain ASCII letters, digits and '-'"
        ));
    }
    if label.contains("--") {
        return Some(format!("VLAN label `{label}` must not contain `--`"));
    }
    None
}

/// `[roll_lb]`: the hand-off to the registrar, the check of the delegation at the parent and
/// the drain of the old load balancers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollLbConfig {
    /// A command run at the hand-off with the new lb addresses as arguments and a JSON
    /// description on stdin (e.g. a script calling the registrar's API). Unset: the deployer
    /// prints what to change and waits for `deployer roll-lb --resume`.
    #[serde(default)]
    pub delegation_hook: Option<String>,
    /// The parent zone's servers (`"IP"` or `"IP:PORT"`, port 53 by default), asked for every
    /// zone's NS and glue after the hand-off. Unset: found through the resolver of
    /// `/etc/resolv.conf` (the SOA of the zone's parent name, then that zone's NS and their
    /// addresses), per zone.
    #[serde(default)]
    pub parent_servers: Option<Vec<String>>,
    /// Check the delegation at the parent after the hand-off (the explicit opt-out: `false`
    /// trusts the hook or operator, and the drain alone decides when the old lbs go).
    #[serde(default = "d_true")]
    pub check_delegation: bool,
    /// How long the delegation may take to show at every parent server (a registrar's change
    /// reaches the TLD's servers after a while) before the deployer stops.
    #[serde(default = "d_delegation_wait")]
    pub delegation_wait_secs: u64,
    /// Names of the deployer's environment variables passed on to the hook (its credentials
    /// for the registrar), besides `PATH`, `HOME`, `USER`, `LOGNAME`, the locale (`LANG`,
    /// `LC_*`), `TZ` and `TMPDIR`; nothing else is (`LINODE_TOKEN` only if listed here).
    #[serde(default)]
    pub hook_env: Vec<String>,
    /// An old lb counts as drained at or below this many queries per second...
    #[serde(default = "d_threshold")]
    pub drain_threshold_qps: f64,
    /// ...and at or below this fraction of its own rate before the hand-off (the smaller
    /// bound applies).
    #[serde(default = "d_drain_ratio")]
    pub drain_ratio: f64,
    /// How long each old lb's rate is measured before the hand-off.
    #[serde(default = "d_baseline")]
    pub baseline_secs: f64,
    /// How long the rate must stay below the threshold; default: the longest TTL of the
    /// delegation records (NS and their glue) in the zones. Never shorter than the longest
    /// NS or glue TTL the parent servers gave.
    #[serde(default)]
    pub quiet_secs: Option<u64>,
    /// Longest wait for the old lbs to drain before the deployer stops (they are not deleted).
    #[serde(default = "d_max_drain")]
    pub max_drain_secs: u64,
    /// How often the old lbs' metrics (and, while it waits, the parent servers) are read.
    #[serde(default = "d_poll")]
    pub poll_secs: f64,
}

impl Default for RollLbConfig {
    fn default() -> Self {
        RollLbConfig {
            delegation_hook: None,
            parent_servers: None,
            hook_env: Vec::new(),
            check_delegation: true,
            delegation_wait_secs: d_delegation_wait(),
            drain_threshold_qps: d_threshold(),
            drain_ratio: d_drain_ratio(),
            baseline_secs: d_baseline(),
            quiet_secs: None,
            max_drain_secs: d_max_drain(),
            poll_secs: d_poll(),
        }
    }
}

impl RollLbConfig {
    /// `parent_servers` as socket addresses (port 53 when none is given); checked when the
    /// config is read.
    pub fn parent_addrs(&self) -> Result<Option<Vec<SocketAddr>>, String> {
        let Some(list) = &self.parent_servers else {
            return Ok(None);
        };
        if list.is_empty() {
            return Err("is empty: list the parent zone's servers, or remove the key to find them through the resolver".into());
        }
        list.iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        format!("`{s}` is not an address (`IP`, `IP:PORT` or `[IPv6]:PORT`)")
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn d_true() -> bool {
    true
}
fn d_delegation_wait() -> u64 {
    600
}
fn d_threshold() -> f64 {
    1.0
}
fn d_drain_ratio() -> f64 {
    0.01
}
fn d_baseline() -> f64 {
    5.0
}
fn d_max_drain() -> u64 {
    86_400
}
fn d_poll() -> f64 {
    5.0
}

/// `[canary]`: `roll` flips one lb first, soaks, and compares it with the lbs still on the old
/// set before it flips the rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The canary lb; default: the first of `[[lbs]]`.
    #[serde(default)]
    pub lb: Option<String>,
    /// How long the canary serves from the new set before it is judged; 0 flips every lb at
    /// once (no canary).
    #[serde(default = "d_soak")]
    pub soak_secs: u64,
    /// The canary fails when its share of SERVFAIL answers exceeds the others' by more than
    /// this (a fraction: 0.01 is one percentage point).
    #[serde(default = "d_ratio_increase")]
    pub max_servfail_ratio_increase: f64,
    /// ... or its share of backend queries that time out, likewise.
    #[serde(default = "d_ratio_increase")]
    pub max_timeout_ratio_increase: f64,
    /// ... or its mean backend answer time exceeds the others' by more than this.
    #[serde(default = "d_latency_increase")]
    pub max_latency_increase_ms: f64,
    /// Fewest answers the canary and the others must each have sent in the soak for a
    /// verdict; with fewer the roll is rolled back as inconclusive (0: judge whatever came).
    #[serde(default = "d_min_answers")]
    pub min_answers: u64,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            lb: None,
            soak_secs: d_soak(),
            max_servfail_ratio_increase: d_ratio_increase(),
            max_timeout_ratio_increase: d_ratio_increase(),
            max_latency_increase_ms: d_latency_increase(),
            min_answers: d_min_answers(),
        }
    }
}

/// `[checks]`: how much of each zone's content the deployer compares with what a server
/// serves (every new nameserver before the flip, every lb after it), and the smoke checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksConfig {
    /// Zones with at most this many records are compared whole, every RRset.
    #[serde(default = "d_max_full_records")]
    pub max_full_records: usize,
    /// Larger zones: this many RRsets chosen at random (each check draws its own), plus the
    /// apex SOA and NS, plus the RRsets the roll changes.
    #[serde(default = "d_sample_rrsets")]
    pub sample_rrsets: usize,
    /// `[[checks.smoke]]`: questions with the answer the operator expects.
    #[serde(default)]
    pub smoke: Vec<SmokeCheckConfig>,
}

/// `[[checks.smoke]]`: `name` asked for `type` must be answered with exactly the records
/// `expect` (RDATA in zone-file syntax, compared as a set; empty: no such records).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheckConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub expect: Vec<String>,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        ChecksConfig {
            max_full_records: d_max_full_records(),
            sample_rrsets: d_sample_rrsets(),
            smoke: Vec::new(),
        }
    }
}

fn d_soak() -> u64 {
    30
}
fn d_ratio_increase() -> f64 {
    0.01
}
fn d_latency_increase() -> f64 {
    50.0
}
fn d_min_answers() -> u64 {
    100
}
fn d_max_full_records() -> usize {
    10_000
}
fn d_sample_rrsets() -> usize {
    1_000
}

/// `[provider]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Where the local and machines providers keep their instance registry (and the
    /// instances' files, and the deployment's lease): the "world" of those providers, shared
    /// by every deployer of the deployment on this host, and apart from `state_dir`, so that
    /// losing a state directory loses no instance, as on a cloud. Default: local,
    /// `CONFIG_DIR/.deployer-world/DEPLOYMENT`; machines, `/var/lib/lb-deployer/DEPLOYMENT`.
    /// Not used by linode (Linode is the registry).
    #[serde(default)]
    pub registry_dir: Option<PathBuf>,
}

/// `[lease]`: one deployer per deployment across hosts (see [`crate::lease`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal (renewed every third of it).
    #[serde(default = "d_lease_ttl")]
    pub ttl_secs: f64,
    /// How far behind another host's clock may be: a lease counts as expired for others only
    /// this long after its expiry.
    #[serde(default = "d_lease_skew")]
    pub clock_skew_secs: f64,
}

fn d_lease_ttl() -> f64 {
    120.0
}
fn d_lease_skew() -> f64 {
    30.0
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl_secs: d_lease_ttl(),
            clock_skew_secs: d_lease_skew(),
        }
    }
}

impl LeaseConfig {
    pub fn times(&self) -> crate::lease::LeaseTimes {
        crate::lease::LeaseTimes {
            ttl: Duration::from_secs_f64(self.ttl_secs),
            clock_skew: Duration::from_secs_f64(self.clock_skew_secs),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// Real `named` and `lb` processes on loopback (nameservers on 127.0.0.1, each lb on an
    /// address of its own), one port per instance.
    Local,
    /// Linode API v4.
    Linode,
    /// Debian 12 machines on this host: systemd-nspawn containers booted with systemd, each
    /// with its own network stack on two host bridges (`[machines]`).
    Machines,
}

impl ProviderKind {
    /// Instances are machines of their own, reached over SSH, with the fixed ports
    /// [`VM_DNS_PORT`] and [`VM_METRICS_PORT`], the lb Debian package and the firewalls
    /// (everything but the local provider).
    pub fn is_vm(self) -> bool {
        !matches!(self, ProviderKind::Local)
    }
}

/// `[machines]`: the machines provider's image, host bridges and SSH key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachinesConfig {
    /// The base image directory, printed by `scripts/machine-image.sh` (built once, cached).
    pub image: PathBuf,
    /// The host bridge standing for the internet: every machine's eth0 is on it, and so is
    /// this host, with the first address of `public_subnet` (the admin address).
    #[serde(default = "default_public_bridge")]
    pub public_bridge: String,
    /// Public addresses, from this host only: the host takes the first, machines the rest.
    #[serde(default = "default_public_subnet")]
    pub public_subnet: Subnet,
    /// The host bridge standing for the Linode VLAN (`[network] vlan`): the machines' eth1;
    /// the host has no address on it.
    #[serde(default = "default_private_bridge")]
    pub private_bridge: String,
    /// The deployer's SSH key for root on every machine (generated on first use when missing).
    /// Default: `REGISTRY_DIR/id_ed25519` (`[provider] registry_dir`: every deployer of the
    /// deployment on this host reaches the machines with it).
    #[serde(default)]
    pub ssh_key: Option<PathBuf>,
    /// Where the machines of every deployment on this host lease their public addresses.
    #[serde(default = "default_machines_run_dir")]
    pub run_dir: PathBuf,
}

impl MachinesConfig {
    /// This host's address on the public bridge (the first of `public_subnet`).
    pub fn host_address(&self) -> Ipv4Addr {
        self.public_subnet
            .hosts()
            .next()
            .unwrap_or(self.public_subnet.network)
    }
}

fn default_public_bridge() -> String {
    "lbm-public".into()
}
fn default_private_bridge() -> String {
    "lbm-vlan".into()
}
fn default_public_subnet() -> Subnet {
    Subnet {
        network: Ipv4Addr::new(10, 231, 0, 0),
        len: 24,
    }
}
fn default_machines_run_dir() -> PathBuf {
    PathBuf::from("/run/lb-machines")
}

/// Why `name` cannot be a network interface (a bridge): 1-15 letters, digits, '-', '_', '.'.
pub fn interface_name_error(name: &str) -> Option<String> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Some(format!(
            "`{name}` is not an interface name (1-15 letters, digits, '-', '_', '.')"
        ));
    }
    None
}

/// `[linode]`: defaults for instances; each nameserver may override region/type/image.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinodeConfig {
    #[serde(default = "default_api_url")]
    pub api_url: String,
    pub region: String,
    #[serde(rename = "type")]
    pub instance_type: String,
    pub image: String,
    /// SSH public key file(s) authorized for root on new instances.
    #[serde(default)]
    pub authorized_keys_files: Vec<PathBuf>,
    /// The SSH user Ansible and `lb ctl` connect as.
    #[serde(default = "default_ssh_user")]
    pub ssh_user: String,
    /// The ssh client the deployer runs `lb ctl` with (a wrapper, e.g. through a bastion, takes
    /// ssh's arguments).
    #[serde(default = "default_ssh_command")]
    pub ssh_command: String,
}

/// `[[nameservers]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameserverConfig {
    pub name: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default, rename = "type")]
    pub instance_type: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    /// Extra Ansible host variables for this nameserver's instances.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
}

/// `[zones]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZonesConfig {
    /// Zone names; each is served from `ANSIBLE_DIR/zones/NAME.zone`.
    pub names: Vec<String>,
}

/// `[[lbs]]`: a load balancer and the nameservers it fronts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    pub name: String,
    /// Names of the nameservers this lb sends to (the seed runs one lb per nameserver).
    pub fronts: Vec<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default, rename = "type")]
    pub instance_type: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    /// The control socket on the lb host.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Extra Ansible host variables for this lb.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
}

/// `[timeouts]`, in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    #[serde(default = "d_boot")]
    pub boot_secs: u64,
    #[serde(default = "d_provision")]
    pub provision_secs: u64,
    #[serde(default = "d_check")]
    pub check_secs: u64,
    #[serde(default = "d_ctl")]
    pub ctl_secs: u64,
    #[serde(default = "d_api")]
    pub api_secs: u64,
    /// Longest a Linode API request is retried (rate limits honoured with the `Retry-After`
    /// Linode sends, server errors with backoff) before the deployer gives up on it.
    #[serde(default = "d_api_retry")]
    pub api_retry_secs: u64,
}

/// `[ansible]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AnsibleConfig {
    /// `ansible-playbook` to run (default: from PATH).
    #[serde(default)]
    pub playbook_command: Option<String>,
    /// Extra variables for every run (highest precedence).
    #[serde(default)]
    pub extra_vars: BTreeMap<String, serde_json::Value>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".deployer")
}
fn default_ansible_dir() -> PathBuf {
    PathBuf::from("ansible")
}
fn default_lb_binary() -> PathBuf {
    PathBuf::from("target/release/lb")
}
fn default_api_url() -> String {
    "https://api.linode.com/v4".into()
}
fn default_ssh_user() -> String {
    "root".into()
}
fn default_ssh_command() -> String {
    "ssh".into()
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/lb/control.sock")
}
fn d_boot() -> u64 {
    600
}
fn d_provision() -> u64 {
    900
}
fn d_check() -> u64 {
    60
}
fn d_ctl() -> u64 {
    30
}
fn d_api() -> u64 {
    30
}
fn d_api_retry() -> u64 {
    600
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            boot_secs: d_boot(),
            provision_secs: d_provision(),
            check_secs: d_check(),
            ctl_secs: d_ctl(),
            api_secs: d_api(),
            api_retry_secs: d_api_retry(),
        }
    }
}

impl TimeoutsConfig {
    pub fn boot(&self) -> Duration {
        Duration::from_secs(self.boot_secs)
    }
    pub fn provision(&self) -> Duration {
        Duration::from_secs(self.provision_secs)
    }
    pub fn check(&self) -> Duration {
        Duration::from_secs(self.check_secs)
    }
    pub fn ctl(&self) -> Duration {
        Duration::from_secs(self.ctl_secs)
    }
    pub fn api(&self) -> Duration {
        Duration::from_secs(self.api_secs)
    }
    pub fn api_retry(&self) -> Duration {
        Duration::from_secs(self.api_retry_secs)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

impl DeployerConfig {
    /// Reads, validates and resolves relative paths against the file's directory.
    pub fn read(path: &Path) -> Result<DeployerConfig, DeployConfigError> {
        let mut cfg: DeployerConfig = lb::config::read_toml(path)?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
        for p in [&mut cfg.state_dir, &mut cfg.ansible_dir, &mut cfg.lb_binary]
            .into_iter()
            .chain(cfg.provider.registry_dir.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if cfg.provider.registry_dir.is_none() {
            cfg.provider.registry_dir = match cfg.provider.kind {
                ProviderKind::Local => Some(base.join(".deployer-world").join(&cfg.deployment)),
                ProviderKind::Machines => {
                    Some(Path::new("/var/lib/lb-deployer").join(&cfg.deployment))
                }
                ProviderKind::Linode => None,
            };
        }
        // The lb package is copied from this machine: a relative path is the config's, as
        // every path here (Ansible would look for it in its role and playbook directories).
        let vars = std::iter::once(&mut cfg.ansible.extra_vars)
            .chain(cfg.lbs.iter_mut().map(|l| &mut l.vars));
        for v in vars {
            if let Some(serde_json::Value::String(p)) = v.get_mut("lb_package") {
                if !p.trim().is_empty() && Path::new(p.as_str()).is_relative() {
                    *p = base.join(p.as_str()).display().to_string();
                }
            }
        }
        cfg.source = path.to_path_buf();
        if let Some(l) = cfg.linode.as_mut() {
            for f in &mut l.authorized_keys_files {
                if let (Ok(rest), Some(home)) = (f.strip_prefix("~"), std::env::var_os("HOME")) {
                    *f = PathBuf::from(home).join(rest);
                } else if f.is_relative() {
                    *f = base.join(&*f);
                }
            }
        }
        if let Some(m) = cfg.machines.as_mut() {
            for p in std::iter::once(&mut m.image).chain(m.ssh_key.as_mut()) {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), DeployConfigError> {
        let invalid = |key: &str, message: String| DeployConfigError::invalid(path, key, message);
        if !valid_name(&self.deployment) {
            return Err(invalid(
                "deployment",
                format!(
                    "`{}` must be 1-40 letters, digits, '-' or '_'",
                    self.deployment
                ),
            ));
        }
        if !(self.lease.ttl_secs.is_finite() && self.lease.ttl_secs >= 3.0) {
            return Err(invalid(
                "lease.ttl_secs",
                format!(
                    "{} must be at least 3 (seconds; renewed every third of it)",
                    self.lease.ttl_secs
                ),
            ));
        }
        if !(self.lease.clock_skew_secs.is_finite() && self.lease.clock_skew_secs >= 0.0) {
            return Err(invalid(
                "lease.clock_skew_secs",
                format!("{} must be 0 or more", self.lease.clock_skew_secs),
            ));
        }
        if self.nameservers.is_empty() {
            return Err(invalid(
                "nameservers",
                "at least one [[nameservers]] is required".into(),
            ));
        }
        if self.lbs.is_empty() {
            return Err(invalid("lbs", "at least one [[lbs]] is required".into()));
        }
        let mut names: Vec<&str> = Vec::new();
        for (key, name) in self
            .nameservers
            .iter()
            .map(|n| ("nameservers.name", n.name.as_str()))
            .chain(self.lbs.iter().map(|l| ("lbs.name", l.name.as_str())))
        {
            if !valid_name(name) || name.ends_with("-next") {
                return Err(invalid(
                    key,
                    format!(
                        "`{name}` must be 1-40 letters, digits, '-' or '_' and not end in -next"
                    ),
                ));
            }
            if names.contains(&name) {
                return Err(invalid(key, format!("`{name}` is used twice")));
            }
            names.push(name);
        }
        for l in &self.lbs {
            if l.fronts.is_empty() {
                return Err(invalid(
                    "lbs.fronts",
                    format!("lb `{}` fronts no nameserver", l.name),
                ));
            }
            for f in &l.fronts {
                if !self.nameservers.iter().any(|n| &n.name == f) {
                    return Err(invalid(
                        "lbs.fronts",
                        format!(
                            "lb `{}` fronts `{f}`, which is not in [[nameservers]]",
                            l.name
                        ),
                    ));
                }
            }
        }
        if self.zones.names.is_empty() {
            return Err(invalid(
                "zones.names",
                "at least one zone is required".into(),
            ));
        }
        for z in &self.zones.names {
            lb::wire::encode_name(z).map_err(|m| invalid("zones.names", m))?;
            let f = self.zone_file(z);
            if !f.exists() {
                return Err(invalid(
                    "zones.names",
                    format!("zone `{z}` has no file {}", f.display()),
                ));
            }
        }
        if self.provider.kind == ProviderKind::Linode && self.linode.is_none() {
            return Err(invalid(
                "linode",
                "provider kind \"linode\" needs a [linode] section".into(),
            ));
        }
        if self.provider.kind == ProviderKind::Machines {
            let Some(m) = &self.machines else {
                return Err(invalid(
                    "machines",
                    "provider kind \"machines\" needs a [machines] section with `image` (build the image with scripts/machine-image.sh, which prints its path)".into(),
                ));
            };
            for (key, b) in [
                ("machines.public_bridge", &m.public_bridge),
                ("machines.private_bridge", &m.private_bridge),
            ] {
                if let Some(e) = interface_name_error(b) {
                    return Err(invalid(key, e));
                }
            }
            if m.public_bridge == m.private_bridge {
                return Err(invalid(
                    "machines.private_bridge",
                    format!(
                        "`{}` is also the public bridge: the VLAN needs a bridge of its own",
                        m.private_bridge
                    ),
                ));
            }
            if self.network.vlan.is_some() && self.network.subnet.network == m.public_subnet.network
            {
                return Err(invalid(
                    "machines.public_subnet",
                    format!(
                        "{} is also [network] subnet, the VLAN's: give them different subnets",
                        m.public_subnet
                    ),
                ));
            }
        }
        self.validate_ports(path)?;
        self.validate_roll_lb(path)?;
        self.validate_checks(path)?;
        self.validate_network(path)
    }

    /// `[roll_lb]` and `[canary]`: addresses that parse, fractions between 0 and 1, a canary
    /// that is one of the lbs.
    fn validate_roll_lb(&self, path: &Path) -> Result<(), DeployConfigError> {
        let invalid = |key: &str, message: String| DeployConfigError::invalid(path, key, message);
        let rl = &self.roll_lb;
        rl.parent_addrs()
            .map_err(|e| invalid("roll_lb.parent_servers", e))?;
        let fraction = |key: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("{v} is not a fraction between 0 and 1"),
                ))
            }
        };
        fraction("roll_lb.drain_ratio", rl.drain_ratio)?;
        let c = &self.canary;
        fraction(
            "canary.max_servfail_ratio_increase",
            c.max_servfail_ratio_increase,
        )?;
        fraction(
            "canary.max_timeout_ratio_increase",
            c.max_timeout_ratio_increase,
        )?;
        for (key, v) in [
            ("roll_lb.drain_threshold_qps", rl.drain_threshold_qps),
            ("roll_lb.baseline_secs", rl.baseline_secs),
            ("roll_lb.poll_secs", rl.poll_secs),
            ("canary.max_latency_increase_ms", c.max_latency_increase_ms),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(key, format!("{v} must be a number >= 0")));
            }
        }
        if let Some(lb) = &c.lb {
            if !self.lbs.iter().any(|l| &l.name == lb) {
                return Err(invalid(
                    "canary.lb",
                    format!("`{lb}` is not one of [[lbs]]"),
                ));
            }
        }
        Ok(())
    }

    /// Every smoke check names a record type, RDATA that parses, and a name inside a zone.
    fn validate_checks(&self, path: &Path) -> Result<(), DeployConfigError> {
        for c in &self.checks.smoke {
            let key = format!("checks.smoke ({} {})", c.name, c.rtype);
            let invalid = |m: String| DeployConfigError::invalid(path, &key, m);
            let name = hickory_proto::rr::Name::from_ascii(&c.name)
                .map_err(|e| invalid(format!("`{}`: {e}", c.name)))?;
            let inside =
                self.zones.names.iter().any(|z| {
                    hickory_proto::rr::Name::from_ascii(z).is_ok_and(|z| z.zone_of(&name))
                });
            if !inside {
                return Err(invalid(format!(
                    "`{}` is in none of the zones ({})",
                    c.name,
                    self.zones.names.join(", ")
                )));
            }
            crate::zones::record_type(&c.rtype).map_err(&invalid)?;
            for e in &c.expect {
                crate::zones::parse_rdata(&c.name, &c.rtype, e).map_err(&invalid)?;
            }
        }
        Ok(())
    }

    /// The canary lb of `roll` (`[canary] lb`, else the first lb), or `None` without a canary
    /// (`soak_secs = 0`, or a single lb: nothing on the old set to compare it with).
    pub fn canary_lb(&self) -> Option<&str> {
        if self.canary.soak_secs == 0 || self.lbs.len() < 2 {
            return None;
        }
        Some(
            self.canary
                .lb
                .as_deref()
                .unwrap_or_else(|| self.lbs[0].name.as_str()),
        )
    }

    /// Host variables that would move an instance's DNS or metrics port away from the one the
    /// provider reports (and the deployer's checks, the lbs' backends and the drain use) are
    /// refused: on VMs the ports are [`VM_DNS_PORT`] and [`VM_METRICS_PORT`]; the local
    /// provider gives every instance ports of its own and sets these variables itself.
    fn validate_ports(&self, path: &Path) -> Result<(), DeployConfigError> {
        let invalid = |key: &str, message: String| DeployConfigError::invalid(path, key, message);
        let port = |s: &str| s.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        // (variable, the port it must carry on VMs) per role.
        let lb_vars = [
            ("lb_listen", VM_DNS_PORT),
            ("lb_metrics_listen", VM_METRICS_PORT),
        ];
        let ns_vars = [("nameserver_port", VM_DNS_PORT)];
        let check = |key: &str,
                     vars: &BTreeMap<String, serde_json::Value>,
                     checked: &[(&str, u16)]|
         -> Result<(), DeployConfigError> {
            for &(var, want) in checked {
                let Some(v) = vars.get(var) else { continue };
                if !self.provider.kind.is_vm() {
                    return Err(invalid(
                        key,
                        format!("`{var}` cannot be set with the local provider: it gives every instance its own loopback address and ports and sets `{var}` itself"),
                    ));
                }
                let values: Vec<&serde_json::Value> = match v {
                    serde_json::Value::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                for x in values {
                    let got = match x {
                        serde_json::Value::Number(n) => {
                            n.as_u64().and_then(|p| u16::try_from(p).ok())
                        }
                        serde_json::Value::String(s) if var == "nameserver_port" => s.parse().ok(),
                        serde_json::Value::String(s) => port(s),
                        _ => None,
                    };
                    if got != Some(want) {
                        return Err(invalid(
                            key,
                            format!("`{var}` = {x} would move the port to {}, but on VMs the deployer's checks, the lbs' backends and the drain use port {want}: keep port {want} (the address may change), or remove the override", got.map_or("an unknown one".to_string(), |p| p.to_string())),
                        ));
                    }
                }
            }
            Ok(())
        };
        let all: Vec<(&str, u16)> = lb_vars.iter().chain(ns_vars.iter()).copied().collect();
        check("ansible.extra_vars", &self.ansible.extra_vars, &all)?;
        for l in &self.lbs {
            check(&format!("lbs.vars ({})", l.name), &l.vars, &lb_vars)?;
        }
        for n in &self.nameservers {
            check(&format!("nameservers.vars ({})", n.name), &n.vars, &ns_vars)?;
        }
        Ok(())
    }

    fn validate_network(&self, path: &Path) -> Result<(), DeployConfigError> {
        let invalid = |key: &str, message: String| DeployConfigError::invalid(path, key, message);
        let net = &self.network;
        for n in &net.admin_networks {
            n.parse::<lb::prefix::Prefix>()
                .map_err(|e| invalid("network.admin_networks", e))?;
        }
        if self.provider.kind == ProviderKind::Linode
            && net.admin_networks.is_empty()
            && !["admin_networks", "lb_admin_networks"]
                .iter()
                .any(|k| self.ansible.extra_vars.contains_key(*k))
        {
            return Err(invalid(
                "network.admin_networks",
                "required with the linode provider: the firewalls open SSH (and the lbs' metrics port) only to these networks, and the deployer needs both; list the networks that administer the deployment, the deployer's own address among them".into(),
            ));
        }
        if net.interface.is_empty()
            || !net
                .interface
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(invalid(
                "network.interface",
                format!("`{}` is not an interface name", net.interface),
            ));
        }
        let Some(vlan) = &net.vlan else {
            return Ok(());
        };
        if let Some(e) = vlan_label_error(vlan) {
            return Err(invalid("network.vlan", e));
        }
        // Old and -next instances hold addresses at the same time.
        let needed = 2 * (self.nameservers.len() + self.lbs.len());
        let have = net.subnet.hosts().count();
        if have < needed {
            return Err(invalid(
                "network.subnet",
                format!(
                    "{} has {have} host addresses; {needed} are needed (every instance and its -next at once)",
                    net.subnet
                ),
            ));
        }
        if let (true, Some(a)) = (self.provider.kind.is_vm(), net.check_address) {
            let on_vlan = match a {
                IpAddr::V4(v4) => net.subnet.contains(v4),
                IpAddr::V6(_) => false,
            };
            if !on_vlan {
                return Err(invalid(
                    "network.check_address",
                    format!(
                        "{a} is not on the VLAN ({}): with [network] vlan the nameservers take DNS only on the VLAN interface, from the lbs and the check address, so direct checks must come from the deployer's address on the VLAN. Remove check_address (the nameservers are then checked from an lb with `lb ctl probe`), or run the deployer on a machine on the VLAN and give its address there",
                        net.subnet
                    ),
                ));
            }
        }
        if self.provider.kind == ProviderKind::Linode {
            // A VLAN exists in one region only: every instance must land in the same one.
            let default = self
                .linode
                .as_ref()
                .map(|l| l.region.as_str())
                .unwrap_or("");
            let placed: Vec<(&str, &str)> = self
                .nameservers
                .iter()
                .map(|n| (n.name.as_str(), n.region.as_deref().unwrap_or(default)))
                .chain(
                    self.lbs
                        .iter()
                        .map(|l| (l.name.as_str(), l.region.as_deref().unwrap_or(default))),
                )
                .collect();
            let first = placed.first().map_or(default, |p| p.1);
            if placed.iter().any(|p| p.1 != first) {
                return Err(invalid(
                    "network.vlan",
                    format!(
                        "a VLAN exists in one region only, but the instances would land in several ({}); put them all in one region, or run one deployment per region",
                        placed
                            .iter()
                            .map(|(n, r)| format!("{n}: {r}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The region every instance lands in when a VLAN is configured (checked to be one).
    pub fn vlan_region(&self) -> Option<String> {
        self.network.vlan.as_ref()?;
        let l = self.linode.as_ref()?;
        Some(
            self.nameservers
                .first()
                .and_then(|n| n.region.clone())
                .unwrap_or_else(|| l.region.clone()),
        )
    }

    /// The zone file of `zone` under the Ansible tree.
    pub fn zone_file(&self, zone: &str) -> PathBuf {
        self.ansible_dir
            .join("zones")
            .join(format!("{}.zone", zone.trim_end_matches('.')))
    }

    /// The local or machines provider's registry directory (see
    /// [`ProviderConfig::registry_dir`]); a config not read from a file falls back to
    /// `STATE_DIR/world`.
    pub fn registry_dir(&self) -> PathBuf {
        self.provider
            .registry_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("world"))
    }

    /// The tag every instance of this deployment carries.
    pub fn tag(&self) -> String {
        format!("deployer-{}", self.deployment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join("ansible/zones")).unwrap();
        std::fs::write(dir.join("ansible/zones/example.test.zone"), "").unwrap();
        let p = dir.join("deployer.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    const LINODE: &str = "deployment = \"t\"\n[provider]\nkind = \"linode\"\n[linode]\nregion = \"us-east\"\ntype = \"g6-nanode-1\"\nimage = \"linode/debian12\"\n[[nameservers]]\nname = \"ns1\"\n[[nameservers]]\nname = \"ns2\"\nREGION2\n[zones]\nnames = [\"example.test\"]\n[[lbs]]\nname = \"lb1\"\nfronts = [\"ns1\", \"ns2\"]\n";

    #[test]
    fn subnets_parse_and_allocate_hosts_only() {
        let s: Subnet = "10.0.0.0/29".parse().unwrap();
        let hosts: Vec<_> = s.hosts().collect();
        assert_eq!(hosts.len(), 6);
        assert_eq!(hosts[0], Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(hosts[5], Ipv4Addr::new(10, 0, 0, 6));
        assert_eq!(s.cidr(hosts[0]), "10.0.0.1/29");
        assert!(s.contains(Ipv4Addr::new(10, 0, 0, 7)) && !s.contains(Ipv4Addr::new(10, 0, 0, 8)));
        let e = "10.0.0.5/24".parse::<Subnet>().unwrap_err();
        assert!(e.contains("10.0.0.0/24"), "{e}");
        for bad in ["10.0.0.0", "10.0.0.0/31", "10.0.0.0/7", "fd00::/64", "x/24"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vlan_labels_follow_the_api_prose() {
        assert!(vlan_label_error("dns-backplane").is_none());
        for bad in ["", "a--b", "a_b", &"x".repeat(65)] {
            assert!(vlan_label_error(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn network_rules_are_checked_with_the_key_named() {
        let dir = std::env::temp_dir().join(format!("dcfg-{}", std::process::id()));
        let cfg = |region2: &str, network: &str| {
            let body = LINODE.replace("REGION2", region2) + network;
            DeployerConfig::read(&write(&dir, &body))
        };
        let e = cfg("", "").unwrap_err().to_string();
        assert!(
            e.contains("network.admin_networks") && e.contains("required"),
            "{e}"
        );
        let admin = "[network]\nadmin_networks = [\"198.51.100.0/24\"]\n";
        cfg("", admin).unwrap();
        // Different regions are fine on public addresses, refused with a VLAN, naming them.
        cfg("region = \"eu-central\"", admin).unwrap();
        let vlan = format!("{admin}vlan = \"dns\"\n");
        let e = cfg("region = \"eu-central\"", &vlan)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network.vlan")
                && e.contains("ns2: eu-central")
                && e.contains("ns1: us-east"),
            "{e}"
        );
        let c = cfg("", &vlan).unwrap();
        assert_eq!(c.vlan_region().as_deref(), Some("us-east"));
        let e = cfg("", &format!("{vlan}subnet = \"10.0.0.0/30\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network.subnet") && e.contains("2 host addresses; 6 are needed"),
            "{e}"
        );
        let e = cfg("", &format!("{admin}vlan = \"a--b\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("network.vlan") && e.contains("--"), "{e}");
        let e = cfg("", "[network]\nadmin_networks = [\"nope\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network.admin_networks") && e.contains("nope"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn per_host_ports_the_deployer_does_not_use_are_refused() {
        let dir = std::env::temp_dir().join(format!("dcfg-ports-{}", std::process::id()));
        let admin = "[network]\nadmin_networks = [\"198.51.100.0/24\"]\n";
        let linode = |lb_vars: &str, extra: &str| {
            let body = LINODE.replace("REGION2", "").replace(
                "fronts = [\"ns1\", \"ns2\"]\n",
                &format!("fronts = [\"ns1\", \"ns2\"]\n{lb_vars}"),
            ) + admin
                + extra;
            DeployerConfig::read(&write(&dir, &body))
        };
        // The address may change, the port may not.
        linode(
            "vars = { lb_listen = [\"0.0.0.0:53\", \"[::]:53\"], lb_metrics_listen = \"0.0.0.0:9153\" }\n",
            "",
        )
        .unwrap();
        let e = linode("vars = { lb_listen = [\"0.0.0.0:5353\"] }\n", "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lbs.vars (lb1)") && e.contains("lb_listen") && e.contains("port 53"),
            "{e}"
        );
        let e = linode(
            "",
            "[ansible]\nextra_vars = { lb_metrics_listen = \"0.0.0.0:9100\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ansible.extra_vars") && e.contains("9100") && e.contains("9153"),
            "{e}"
        );
        let e = linode("", "[ansible]\nextra_vars = { nameserver_port = 5353 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nameserver_port") && e.contains("5353"), "{e}");
        // The local provider sets them itself, per instance.
        let local = LINODE
            .replace("REGION2", "")
            .replace("\"linode\"\n[linode]", "\"local\"\n[linode]")
            + "[ansible]\nextra_vars = { lb_listen = [\"127.0.0.1:53\"] }\n";
        let e = DeployerConfig::read(&write(&dir, &local))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("local provider") && e.contains("lb_listen"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn with_a_vlan_the_check_address_must_be_on_it() {
        let dir = std::env::temp_dir().join(format!("dcfg-check-{}", std::process::id()));
        let cfg = |check: &str| {
            let body = LINODE.replace("REGION2", "")
                + &format!("[network]\nadmin_networks = [\"198.51.100.0/24\"]\nvlan = \"dns\"\ncheck_address = \"{check}\"\n");
            DeployerConfig::read(&write(&dir, &body))
        };
        let e = cfg("198.51.100.7").unwrap_err().to_string();
        assert!(
            e.contains("network.check_address") && e.contains("not on the VLAN"),
            "{e}"
        );
        cfg("10.0.0.250").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_relative_lb_package_is_the_configs() {
        let dir = std::env::temp_dir().join(format!("dcfg-pkg-{}", std::process::id()));
        let body = LINODE.replace("REGION2", "")
            + "[network]\nadmin_networks = [\"198.51.100.0/24\"]\n[ansible]\nextra_vars = { lb_package = \"debs/lb.deb\" }\n";
        let c = DeployerConfig::read(&write(&dir, &body)).unwrap();
        let p = c.ansible.extra_vars["lb_package"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            Path::new(&p).is_absolute() && p.ends_with("debs/lb.deb"),
            "{p}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn smoke_checks_are_checked_with_the_key_named() {
        let dir = std::env::temp_dir().join(format!("dcfg-smoke-{}", std::process::id()));
        let cfg = |smoke: &str| {
            let body = LINODE.replace("REGION2", "")
                + "[network]\nadmin_networks = [\"198.51.100.0/24\"]\n"
                + smoke;
            DeployerConfig::read(&write(&dir, &body))
        };
        let c = cfg("[checks]\nmax_full_records = 5\n[[checks.smoke]]\nname = \"www.example.test\"\ntype = \"MX\"\nexpect = [\"10 mail.example.test.\"]\n").unwrap();
        assert_eq!(c.checks.max_full_records, 5);
        assert_eq!(c.checks.sample_rrsets, 1000);
        assert_eq!(c.checks.smoke.len(), 1);
        for (smoke, want) in [
            (
                "name = \"www.other.test\"\ntype = \"A\"\nexpect = []",
                "in none of the zones",
            ),
            (
                "name = \"www.example.test\"\ntype = \"NOPE\"\nexpect = []",
                "not a record type",
            ),
            (
                "name = \"www.example.test\"\ntype = \"A\"\nexpect = [\"not-an-address\"]",
                "not-an-address",
            ),
        ] {
            let e = cfg(&format!("[[checks.smoke]]\n{smoke}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("checks.smoke (") && e.contains(want), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for f in ["local.toml", "linode.toml"] {
            let c = DeployerConfig::read(&dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(c.network.vlan.is_none(), "{f}");
        }
    }
}
