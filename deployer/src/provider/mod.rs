//! Where instances come from: one trait, three implementations ([`local::LocalProvider`],
//! [`linode::LinodeProvider`] and [`machines::MachinesProvider`]).
//!
//! Every provider lists and touches only instances carrying the deployment's tag.

pub mod linode;
pub mod local;
pub mod machines;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What an instance is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Nameserver,
    Lb,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub label: String,
    pub role: Role,
    pub region: Option<String>,
    pub instance_type: Option<String>,
    pub image: Option<String>,
    /// A VLAN interface to attach, besides the public one.
    pub vlan: Option<VlanAttachment>,
    /// The operation creating it ([`OperationMark`]), kept with the instance (a Linode tag,
    /// a registry field) so that any deployer can tell which operation it belongs to.
    pub operation: Option<OperationMark>,
}

/// Which operation created an instance: its command and its start time (UNIX seconds, the
/// journal's `started_unix`). On Linode a tag `op-roll-1765000000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationMark {
    pub operation: crate::steps::Operation,
    pub started_unix: u64,
}

impl OperationMark {
    /// The tag prefix on Linode.
    pub const TAG_PREFIX: &'static str = "op-";

    pub fn tag(&self) -> String {
        format!(
            "{}{}-{}",
            Self::TAG_PREFIX,
            self.operation.command(),
            self.started_unix
        )
    }

    pub fn from_tag(tag: &str) -> Option<OperationMark> {
        let (op, t) = tag.strip_prefix(Self::TAG_PREFIX)?.rsplit_once('-')?;
        let operation = [
            crate::steps::Operation::Up,
            crate::steps::Operation::Roll,
            crate::steps::Operation::RollLb,
        ]
        .into_iter()
        .find(|o| o.command() == op)?;
        Some(OperationMark {
            operation,
            started_unix: t.parse().ok()?,
        })
    }
}

impl std::fmt::Display for OperationMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} started at {} (UNIX seconds)",
            self.operation.command(),
            self.started_unix
        )
    }
}

/// An instance's place on the deployment's VLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanAttachment {
    /// The VLAN's label (`[network] vlan`).
    pub label: String,
    /// The instance's address on it, allocated by the deployer.
    pub address: std::net::Ipv4Addr,
    /// Its prefix length (`[network] subnet`).
    pub prefix_len: u8,
}

impl VlanAttachment {
    /// `10.0.0.3/24`, as Linode's `ipam_address` wants it.
    pub fn ipam_address(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

/// Whether a region can hold the deployment's VLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VlanSupport {
    Yes,
    /// The region does not offer VLANs; its capabilities as the provider lists them.
    No {
        capabilities: Vec<String>,
    },
    /// The provider has no VLANs at all (the local provider: everything is on 127.0.0.1).
    Loopback,
}

/// An instance as the provider reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: u64,
    pub label: String,
    pub role: Role,
    /// Provider status (`provisioning`, `booting`, `running`, ...).
    pub status: String,
    pub address: IpAddr,
    /// DNS port (53 on VMs; one per instance on the local provider).
    pub dns_port: u16,
    /// Metrics port of an lb instance.
    pub metrics_port: u16,
    /// The local provider's instance directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Its address on the deployment's VLAN, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_address: Option<IpAddr>,
    /// The region it runs in, where the provider has regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The operation that created it (none for instances of an older deployer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationMark>,
}

impl Instance {
    /// Its public DNS address (what clients and the deployer's checks of lbs use).
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.dns_port)
    }
    /// Where lbs send to this nameserver: its VLAN address if it has one, else its public one.
    pub fn backend_addr(&self) -> SocketAddr {
        SocketAddr::new(self.private_address.unwrap_or(self.address), self.dns_port)
    }
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.metrics_port)
    }
}

/// A provider failure.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}")]
    Api(String),
    #[error("instance {0} not found")]
    NotFound(u64),
    #[error("instance {id} ({label}) is not running after {waited:?} (status {status})")]
    BootTimeout {
        id: u64,
        label: String,
        waited: Duration,
        status: String,
    },
    #[error("{0}")]
    Io(String),
    /// A create the provider answered with a refusal: nothing was created.
    #[error("{0}")]
    CreateRefused(String),
    /// A create refused because another instance has the label (someone else's, or one an
    /// earlier run left): nothing was created, and that instance is not this operation's.
    #[error("label {label} is already in use by another instance: {message}")]
    LabelInUse { label: String, message: String },
}

impl ProviderError {
    /// After a failed create: the provider said no, so the instance was certainly not created
    /// (as opposed to a lost reply or a server error, after which it may exist).
    pub fn create_refused(&self) -> bool {
        matches!(
            self,
            ProviderError::CreateRefused(_) | ProviderError::LabelInUse { .. }
        )
    }
}

/// The operations the deployer needs from a cloud.
pub trait Provider {
    /// Creates an instance tagged with the deployment's tag. Never retried blindly: callers
    /// look the label up first. A refusal is [`ProviderError::CreateRefused`] or
    /// [`ProviderError::LabelInUse`] (nothing was created); any other error leaves the outcome
    /// unknown (the request may have been carried out), and the caller looks the label up.
    fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError>;
    fn get(&self, id: u64) -> Result<Option<Instance>, ProviderError>;
    /// Every instance with the deployment's tag.
    fn list(&self) -> Result<Vec<Instance>, ProviderError>;
    /// The tagged instance with this label, if any.
    fn find_by_label(&self, label: &str) -> Result<Option<Instance>, ProviderError> {
        Ok(self.list()?.into_iter().find(|i| i.label == label))
    }
    fn rename(&self, id: u64, label: &str) -> Result<(), ProviderError>;
    fn delete(&self, id: u64) -> Result<(), ProviderError>;
    /// Waits until the instance runs (and can be provisioned).
    fn wait_running(&self, id: u64, timeout: Duration) -> Result<Instance, ProviderError>;
    /// Ansible host variables to reach and configure this instance.
    fn host_vars(&self, inst: &Instance) -> serde_json::Map<String, serde_json::Value>;
    /// How the deployer reaches the instance over SSH (`None`: it is not a machine of its own,
    /// as with the local provider).
    fn ssh_target(&self, inst: &Instance) -> Option<crate::ssh::SshTarget>;
    /// How to run `lb ctl` against an lb instance: over SSH where the instance has it.
    fn lb_control(&self, inst: &Instance, socket: &std::path::Path) -> crate::lbctl::LbControl {
        match self.ssh_target(inst) {
            Some(ssh) => crate::lbctl::LbControl::Ssh {
                ssh,
                socket: socket.to_path_buf(),
            },
            None => crate::lbctl::LbControl::Local {
                socket: socket.to_path_buf(),
            },
        }
    }
    /// Whether instances in `region` can be put on a VLAN.
    fn vlan_support(&self, region: &str) -> Result<VlanSupport, ProviderError>;
    /// Removes what the provider keeps besides the instances (the machines provider's extra
    /// machines and bridges); `deployer down` calls it once every instance is deleted.
    fn teardown(&self) -> Result<(), ProviderError> {
        Ok(())
    }
    /// Where the deployment's lease is kept, seen by every deployer of the deployment
    /// ([`crate::lease`]).
    fn lease_store(&self) -> std::sync::Arc<dyn crate::lease::LeaseStore>;
}
