//! The journal: what the running (or last) operation did, written atomically after every step.
//!
//! It records each step's outcome and every instance created, so that a failed step rolls back
//! precisely, and a deployer killed mid-roll can be resumed (`roll --resume`) or undone
//! (`rollback`) without orphaning anything.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::provider::Instance;

pub use lb::state::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    Up,
    Roll,
    RollLb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalState {
    InProgress,
    Done,
    RolledBack,
    /// Failed and could not be rolled back completely; the journal says what is left.
    Failed,
}

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    pub ok: bool,
    pub detail: String,
    pub elapsed_ms: u64,
}

/// An lb flipped to a new backend set, with the set it had before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flip {
    pub lb: String,
    pub previous: Vec<String>,
    pub new: Vec<String>,
}

/// The journal file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub operation: Operation,
    pub state: JournalState,
    pub started_unix: u64,
    pub steps: Vec<StepRecord>,
    /// Labels being created right now (recorded before the API call, so a crash between the
    /// call and recording its result is found again by label).
    pub creating: Vec<String>,
    /// Instances this operation created.
    pub created: Vec<Instance>,
    /// Instances this operation replaces (roll).
    pub old: Vec<Instance>,
    pub flips: Vec<Flip>,
    /// Expected SOA serial per zone, read from the zone files when the operation started.
    pub serials: Vec<(String, u32)>,
    /// Past the point of no return (old instances being deleted, or the delegation handed to
    /// the new lbs): the operation can only go forward.
    pub deleting_old: bool,
    /// roll-lb: the hand-off instructions were printed; `--resume` confirms the change.
    #[serde(default)]
    pub waiting_for_handoff: bool,
    #[serde(default)]
    pub error: Option<String>,
}

impl Journal {
    pub fn new(operation: Operation, serials: Vec<(String, u32)>) -> Journal {
        Journal {
            operation,
            state: JournalState::InProgress,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            steps: Vec::new(),
            creating: Vec::new(),
            created: Vec::new(),
            old: Vec::new(),
            flips: Vec::new(),
            serials,
            deleting_old: false,
            waiting_for_handoff: false,
            error: None,
        }
    }

    /// True once `step` has completed.
    pub fn done(&self, step: &str) -> bool {
        self.steps.iter().any(|s| s.step == step && s.ok)
    }
}

/// Where the journal lives.
pub struct JournalFile {
    pub path: PathBuf,
}

impl JournalFile {
    pub fn new(state_dir: &Path) -> JournalFile {
        JournalFile {
            path: state_dir.join("journal.json"),
        }
    }

    pub fn load(&self) -> anyhow::Result<Option<Journal>> {
        match std::fs::read_to_string(&self.path) {
            Ok(t) => Ok(Some(serde_json::from_str(&t).map_err(|e| {
                anyhow::anyhow!("journal {} is corrupt: {e}", self.path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read journal {}: {e}",
                self.path.display()
            )),
        }
    }

    pub fn save(&self, j: &Journal) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(j)?;
        write_atomic(&self.path, &bytes)
            .map_err(|e| anyhow::anyhow!("cannot write journal {}: {e}", self.path.display()))
    }
}
