//! Driving an `lb` through its control socket: directly on this machine, or through SSH running
//! `lb ctl --json` on the lb host. Both speak [`lb::control_protocol`], so they cannot drift.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use lb::control_protocol::{
    send_request, ControlCommand, ControlResponse, ControlResult, StatusReport,
};

/// A failed control request: either lb answered no (it kept its state), or the answer never
/// came (lb may or may not have acted: only reading its status again tells).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("no answer: {0}")]
    Transport(String),
}

impl CtlError {
    pub fn reason(&self) -> &str {
        match self {
            CtlError::Refused(r) | CtlError::Transport(r) => r,
        }
    }
}

/// What lb answered to `set-backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapDone {
    pub generation: u64,
    pub message: String,
}

impl SwapDone {
    /// False when lb applied the set but said it could not write its state file (an lb
    /// restarted then would come back on its previous set). An lb of this version refuses
    /// such a swap instead (and the deployer sees a refusal); lbs of the first release applied
    /// it with this note, and a fleet being upgraded may still run some.
    pub fn saved(&self) -> bool {
        !(self.message.contains("state file") && self.message.contains("not written"))
    }
}

/// How to reach one lb's control socket.
#[derive(Debug, Clone)]
pub enum LbControl {
    Local {
        socket: PathBuf,
    },
    Ssh {
        /// `user@host`.
        target: String,
        socket: PathBuf,
        known_hosts: PathBuf,
    },
}

impl LbControl {
    /// Sends one command; an `Err` is a failure to reach lb or a refusal, with the reason.
    pub fn request(
        &self,
        cmd: ControlCommand,
        timeout: Duration,
    ) -> Result<ControlResult, CtlError> {
        let resp = match self {
            LbControl::Local { socket } => send_request(socket, cmd, timeout)
                .map_err(|e| CtlError::Transport(e.to_string()))?,
            LbControl::Ssh {
                target,
                socket,
                known_hosts,
            } => ssh_request(target, socket, known_hosts, cmd, timeout)
                .map_err(CtlError::Transport)?,
        };
        if resp.ok {
            resp.result
                .ok_or_else(|| CtlError::Transport("lb sent an empty response".into()))
        } else {
            Err(CtlError::Refused(
                resp.error
                    .unwrap_or_else(|| "lb refused without a reason".into()),
            ))
        }
    }

    pub fn status(&self, timeout: Duration) -> Result<StatusReport, CtlError> {
        match self.request(ControlCommand::Status, timeout)? {
            ControlResult::Status(s) => Ok(s),
            other => Err(CtlError::Transport(format!(
                "unexpected status response {other:?}"
            ))),
        }
    }

    /// `set-backends [--verify]`.
    pub fn set_backends(
        &self,
        backends: &[String],
        verify: bool,
        timeout: Duration,
    ) -> Result<SwapDone, CtlError> {
        match self.request(
            ControlCommand::SetBackends {
                backends: backends.to_vec(),
                verify,
            },
            timeout,
        )? {
            ControlResult::Done {
                generation,
                message,
            } => Ok(SwapDone {
                generation,
                message,
            }),
            other => Err(CtlError::Transport(format!(
                "unexpected set-backends response {other:?}"
            ))),
        }
    }
}

fn ssh_request(
    target: &str,
    socket: &std::path::Path,
    known_hosts: &std::path::Path,
    cmd: ControlCommand,
    timeout: Duration,
) -> Result<ControlResponse, String> {
    let mut args: Vec<String> = vec![
        "lb".into(),
        "ctl".into(),
        "--json".into(),
        "--socket".into(),
        socket.display().to_string(),
        "--timeout-ms".into(),
        timeout.as_millis().to_string(),
    ];
    match cmd {
        ControlCommand::Status => args.push("status".into()),
        ControlCommand::SetBackends { backends, verify } => {
            args.push("set-backends".into());
            if verify {
                args.push("--verify".into());
            }
            args.extend(backends);
        }
        ControlCommand::Drain { backend } => args.extend(["drain".into(), backend]),
        ControlCommand::Undrain { backend } => args.extend(["undrain".into(), backend]),
        ControlCommand::Reload => args.push("reload".into()),
        ControlCommand::Upgrade { binary } => {
            args.push("upgrade".into());
            if let Some(b) = binary {
                args.extend(["--binary".into(), b]);
            }
        }
        ControlCommand::Probe {
            backend,
            zones,
            tcp,
        } => {
            args.push("probe".into());
            if tcp {
                args.push("--tcp".into());
            }
            for z in zones {
                args.extend(["--zone".into(), z]);
            }
            args.push(backend);
        }
    }
    let out = Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            &format!("ConnectTimeout={}", timeout.as_secs().max(1)),
            target,
        ])
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run ssh to {target}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).map_err(|_| {
        format!(
            "`lb ctl` over ssh to {target} failed (exit {:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}
