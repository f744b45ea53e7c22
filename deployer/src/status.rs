//! `deployer status`: what exists, what each lb serves, and any unfinished operation.
//!
//! The JSON form (`deployer --json status`) is an interface scripts rely on: `instances[]` with
//! `label`, `id`, `role`, `address`, `dns_port`; `lbs[]` with `name`, `address`, `generation`,
//! `backends[]` (each with `address`, `state`); `unfinished` (null when none). These types pin
//! it; fields may be added, never renamed or removed.

use serde::Serialize;

use crate::journal::{CanaryRecord, Handoff, Journal, JournalState, LbFlip, Operation, Phase};
use crate::provider::{Instance, Role};

/// The whole report.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub deployment: String,
    pub instances: Vec<InstanceView>,
    pub lbs: Vec<LbView>,
    pub unfinished: Option<UnfinishedView>,
    /// An unfinished operation the world shows but whose state cannot be told safely (no
    /// journal says, and the world is ambiguous): what was seen and the command that settles
    /// it. Null otherwise.
    pub unclear: Option<String>,
    /// The last recorded operation and how it ended.
    pub last: Option<LastView>,
}

#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub label: String,
    pub id: u64,
    pub role: Role,
    /// The provider's status (`running`, ...).
    pub status: String,
    pub address: String,
    pub dns_port: u16,
    pub metrics_port: u16,
    /// Its address on the deployment's VLAN (where lbs reach a nameserver), null when none.
    pub private_address: Option<String>,
    /// Its region, null where the provider has none.
    pub region: Option<String>,
    /// The operation that created it (`roll started at ...`), null for instances of an older
    /// deployer.
    pub operation: Option<String>,
}

impl From<&Instance> for InstanceView {
    fn from(i: &Instance) -> Self {
        InstanceView {
            label: i.label.clone(),
            id: i.id,
            role: i.role,
            status: i.status.clone(),
            address: i.address.to_string(),
            dns_port: i.dns_port,
            metrics_port: i.metrics_port,
            private_address: i.private_address.map(|a| a.to_string()),
            region: i.region.clone(),
            operation: i.operation.map(|m| m.to_string()),
        }
    }
}

/// One configured lb. When it cannot be read, `generation` is null, `backends` empty and
/// `error` says why.
#[derive(Debug, Serialize)]
pub struct LbView {
    pub name: String,
    /// Its DNS address (`IP:PORT`), null when the instance does not exist.
    pub address: Option<String>,
    pub generation: Option<u64>,
    pub backends: Vec<BackendView>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub address: String,
    /// `up`, `down` or `draining`.
    pub state: String,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct UnfinishedView {
    pub operation: Operation,
    pub phase: Phase,
    pub steps_done: Vec<&'static str>,
    pub created: Vec<InstanceView>,
    pub flips: Vec<LbFlip>,
    pub handoff: Handoff,
    pub error: Option<String>,
    /// What the operator can run.
    pub next: String,
    /// roll's canary (`lb`, `canary_state` and its details), null without one.
    pub canary: Option<CanaryRecord>,
    /// `journal` (this state directory's record) or `world` (rebuilt from the instances and
    /// the lbs: no journal here, or one the world contradicts).
    pub source: &'static str,
    /// What the world showed, when rebuilt from it.
    pub saw: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LastView {
    pub operation: Operation,
    pub state: JournalState,
}

impl UnfinishedView {
    pub fn from_journal(j: &Journal) -> UnfinishedView {
        UnfinishedView {
            operation: j.operation,
            phase: j.phase,
            steps_done: j.steps_done(),
            created: j.created.iter().map(InstanceView::from).collect(),
            flips: j.flips.clone(),
            handoff: j.handoff,
            error: j.error.clone(),
            next: crate::context::next_command(j),
            canary: j.canary.clone(),
            source: "journal",
            saw: Vec::new(),
        }
    }
}
