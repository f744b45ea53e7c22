//! The journal: what the running (or last) operation did, written atomically after every change.
//!
//! It records each step's outcome, every instance created (its label *before* the create call),
//! the phase, and per lb the flip's plan and state, so that a deployer killed anywhere can be
//! resumed (`roll --resume`) or undone (`rollback`) without orphaning anything. Each field has
//! one meaning. The file carries a format number: a journal written by an older deployer is
//! refused with a clear message rather than misread.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::provider::Instance;
pub use crate::steps::{Operation, Step};

/// Atomic writes of the deployer's state files: private (0600), see [`crate::private`].
pub use crate::private::write_atomic;

/// The journal format this deployer writes and reads.
pub const JOURNAL_FORMAT: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalState {
    InProgress,
    Done,
    RolledBack,
    /// Failed and could not be undone; the journal says what is left.
    Failed,
}

/// Which way an operation may still go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Before the point of no return: the old set is complete, everything can be undone.
    Undoable,
    /// Past it (old instances being deleted, or the delegation handed to the new lbs): only
    /// going forward restores a complete set.
    Forward,
    /// An undo has begun deleting what the operation created (every lb is back on its previous
    /// set): the new set is no longer complete, so only finishing the rollback settles it.
    RollingBack,
}

/// Which set an lb is being converged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// To the new backends (the roll's target).
    Forward,
    /// Back to the exact previous backends (rollback).
    Back,
}

/// Where one lb's flip (in its current [`Direction`]) stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum FlipState {
    /// Recorded, nothing sent yet.
    Planned,
    /// `set-backends` sent (or about to be): the lb may or may not have applied it. Only a
    /// read of its live set resolves this.
    Sent,
    /// The lb applied the set but said it could not save it (it would come back on the old
    /// set after a restart): sent again until it is saved.
    Unsaved,
    /// The lb's live set is the wanted one, at this generation.
    Confirmed { generation: u64 },
}

/// One lb's flip: the exact set it had, the set it goes to, and where that stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbFlip {
    pub lb: String,
    pub previous: Vec<String>,
    pub target: Vec<String>,
    pub direction: Direction,
    #[serde(flatten)]
    pub state: FlipState,
}

impl LbFlip {
    /// The set wanted in the current direction.
    pub fn wanted(&self) -> &[String] {
        match self.direction {
            Direction::Forward => &self.target,
            Direction::Back => &self.previous,
        }
    }
}

/// roll-lb's hand-off of the delegation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Handoff {
    #[default]
    NotStarted,
    /// Recorded before the delegation hook is started: it may have changed the delegation in
    /// part (it ran, failed, timed out, or the deployer died while it ran).
    Started,
    /// The instructions were printed; `roll-lb --resume` confirms the operator made the change.
    WaitingForOperator,
    Done,
}

impl Handoff {
    /// The delegation may point at the new lbs, and only the operator knows whether it does:
    /// nothing undoes the operation by itself (`rollback --delegation-unchanged` confirms it
    /// does not).
    pub fn blocks_undo(self) -> bool {
        matches!(self, Handoff::Started | Handoff::WaitingForOperator)
    }
}

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub ok: bool,
    pub detail: String,
    pub elapsed_ms: u64,
}

/// The journal file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub format: u32,
    pub operation: Operation,
    pub state: JournalState,
    pub phase: Phase,
    pub started_unix: u64,
    pub steps: Vec<StepRecord>,
    /// Labels being created right now (recorded before the API call, so a crash between the
    /// call and recording its result is found again by label).
    pub creating: Vec<String>,
    /// Instances this operation created.
    pub created: Vec<Instance>,
    /// Instances this operation replaces.
    pub old: Vec<Instance>,
    /// Per lb, the flip (roll only); planned for every lb before any is sent.
    pub flips: Vec<LbFlip>,
    /// Expected SOA serial per zone, read from the zone files when the operation started.
    pub serials: Vec<(String, u32)>,
    pub handoff: Handoff,
    pub error: Option<String>,
    /// VLAN addresses this operation allocated, each recorded before its instance's create
    /// call (so a crash cannot hand the same address out twice).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlan_addresses: Vec<VlanAddress>,
    /// roll: the canary flip and its verdict (none without a canary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryRecord>,
    /// roll-lb: each old lb's query rate measured just before the hand-off (the drain's
    /// relative threshold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handoff_rates: Vec<LbRate>,
    /// roll-lb: the longest NS or glue TTL the parent servers gave once the delegation was
    /// checked (the drain's quiet period is at least this long).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_ttl: Option<u64>,
}

/// One old lb's query rate before the hand-off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LbRate {
    /// The old lb's label.
    pub lb: String,
    pub qps: f64,
}

/// The canary of a roll: which lb, and where its trial stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryRecord {
    pub lb: String,
    #[serde(flatten)]
    pub state: CanaryState,
}

/// Where the canary's trial stands. Only `passed` lets the other lbs be flipped; a deployer
/// killed before that soaks again from the start on `--resume` (or undoes on `rollback`), and
/// `failed` can only be undone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "canary_state")]
pub enum CanaryState {
    /// Recorded before the canary's flip; no other lb is sent anything.
    Flipping,
    /// The canary is confirmed on the new set and soaking since this time (UNIX seconds).
    Soaking { since_unix: u64 },
    /// Judged no worse than the lbs on the old set: the rest may be flipped.
    Passed { verdict: String },
    /// Judged worse (or the soak was inconclusive): the roll is undone.
    Failed { verdict: String },
}

/// One VLAN address allocation: the label it was allocated for and the address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VlanAddress {
    pub label: String,
    pub address: std::net::Ipv4Addr,
}

impl Journal {
    pub fn new(operation: Operation, serials: Vec<(String, u32)>) -> Journal {
        Journal {
            format: JOURNAL_FORMAT,
            operation,
            state: JournalState::InProgress,
            phase: Phase::Undoable,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            steps: Vec::new(),
            creating: Vec::new(),
            created: Vec::new(),
            old: Vec::new(),
            flips: Vec::new(),
            serials,
            handoff: Handoff::NotStarted,
            error: None,
            vlan_addresses: Vec::new(),
            canary: None,
            handoff_rates: Vec::new(),
            delegation_ttl: None,
        }
    }

    /// True once `step` has completed.
    pub fn done(&self, step: Step) -> bool {
        self.steps.iter().any(|s| s.step == step && s.ok)
    }

    /// Names of the completed steps.
    pub fn steps_done(&self) -> Vec<&'static str> {
        self.steps
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.step.name())
            .collect()
    }
}

/// A journal that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read journal {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("journal {path} was written by an older deployer (format {found}, this one reads {JOURNAL_FORMAT}): finish or undo its operation with the deployer that started it; if `state` in it is not \"in-progress\", nothing is unfinished and the file can be removed")]
    OldFormat { path: PathBuf, found: String },
    #[error("cannot write journal {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the journal lives.
pub struct JournalFile {
    pub path: PathBuf,
}

impl JournalFile {
    pub fn new(state_dir: &Path) -> JournalFile {
        let path = state_dir.join("journal.json");
        // Temporary files of a deployer killed mid-write (the writer is gone).
        crate::private::remove_stale_temps(&path);
        JournalFile { path }
    }

    pub fn load(&self) -> Result<Option<Journal>, JournalError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(JournalError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let corrupt = |message: String| JournalError::Corrupt {
            path: self.path.clone(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        match v.get("format").and_then(|f| f.as_u64()) {
            Some(f) if f == JOURNAL_FORMAT as u64 => {}
            other => {
                return Err(JournalError::OldFormat {
                    path: self.path.clone(),
                    found: other.map_or("1".into(), |f| f.to_string()),
                })
            }
        }
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    pub fn save(&self, j: &Journal) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec_pretty(j).expect("the journal always serialises");
        write_atomic(&self.path, &bytes).map_err(|source| JournalError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_an_old_journal() {
        let dir = std::env::temp_dir().join(format!("djournal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = JournalFile::new(&dir);
        assert!(f.load().unwrap().is_none());
        let mut j = Journal::new(Operation::Roll, vec![("example.test".into(), 7)]);
        j.flips.push(LbFlip {
            lb: "lb1".into(),
            previous: vec!["127.0.0.1:1".into()],
            target: vec!["127.0.0.1:2".into()],
            direction: Direction::Forward,
            state: FlipState::Confirmed { generation: 3 },
        });
        j.steps.push(StepRecord {
            step: Step::Flip,
            ok: true,
            detail: String::new(),
            elapsed_ms: 1,
        });
        f.save(&j).unwrap();
        assert_eq!(f.load().unwrap().unwrap(), j);
        assert!(j.done(Step::Flip) && !j.done(Step::Verify));
        // A format-1 journal (no `format`, steps by name) is refused clearly.
        std::fs::write(
            &f.path,
            r#"{"operation":"roll","state":"in-progress","steps":[{"step":"flip","ok":true}],"deleting_old":false}"#,
        )
        .unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(
            e.contains("older deployer") && e.contains("format 1"),
            "{e}"
        );
        std::fs::write(&f.path, "{").unwrap();
        assert!(f.load().unwrap_err().to_string().contains("corrupt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
