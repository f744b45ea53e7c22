//! `deployer.toml`: the provider, the nameservers, the zones, the load balancers, timeouts.
//!
//! Unknown keys are rejected. Relative paths are resolved against the config file's directory.
//! The Linode API token is never read from this file: only from `LINODE_TOKEN`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    pub nameservers: Vec<NameserverConfig>,
    pub zones: ZonesConfig,
    pub lbs: Vec<LbConfig>,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub ansible: AnsibleConfig,
    #[serde(default)]
    pub roll_lb: RollLbConfig,
}

/// `[roll_lb]`: the hand-off to the registrar and the drain of the old load balancers.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RollLbConfig {
    /// A command run at the hand-off with the new lb addresses as arguments and a JSON
    /// description on stdin (e.g. a script calling the registrar's API). Unset: the deployer
    /// prints what to change and waits for `deployer roll-lb --resume`.
    #[serde(default)]
    pub delegation_hook: Option<String>,
    /// An old lb counts as drained below this many queries per second.
    #[serde(default = "d_threshold")]
    pub drain_threshold_qps: f64,
    /// How long the rate must stay below the threshold; default: the longest TTL of the
    /// delegation records (NS and their glue) in the zones.
    #[serde(default)]
    pub quiet_secs: Option<u64>,
    /// Longest wait for the old lbs to drain before the deployer stops (they are not deleted).
    #[serde(default = "d_max_drain")]
    pub max_drain_secs: u64,
    /// How often the old lbs' metrics are read.
    #[serde(default = "d_poll")]
    pub poll_secs: f64,
}

fn d_threshold() -> f64 {
    1.0
}
fn d_max_drain() -> u64 {
    86_400
}
fn d_poll() -> f64 {
    5.0
}

/// `[provider]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// Real `named` and `lb` processes on 127.0.0.1, one port per instance.
    Local,
    /// Linode API v4.
    Linode,
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

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            boot_secs: d_boot(),
            provision_secs: d_provision(),
            check_secs: d_check(),
            ctl_secs: d_ctl(),
            api_secs: d_api(),
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
        for p in [&mut cfg.state_dir, &mut cfg.ansible_dir, &mut cfg.lb_binary] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(l) = cfg.linode.as_mut() {
            for f in &mut l.authorized_keys_files {
                if let (Ok(rest), Some(home)) = (f.strip_prefix("~"), std::env::var_os("HOME")) {
                    *f = PathBuf::from(home).join(rest);
                } else if f.is_relative() {
                    *f = base.join(&*f);
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
        Ok(())
    }

    /// The zone file of `zone` under the Ansible tree.
    pub fn zone_file(&self, zone: &str) -> PathBuf {
        self.ansible_dir
            .join("zones")
            .join(format!("{}.zone", zone.trim_end_matches('.')))
    }

    /// The tag every instance of this deployment carries.
    pub fn tag(&self) -> String {
        format!("deployer-{}", self.deployment)
    }
}
