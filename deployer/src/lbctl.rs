//! Driving an `lb` through its control socket: directly on this machine, or through SSH running
//! `lb ctl --json` on the lb host. Both speak [`lb::control_protocol`], so they cannot drift.

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use lb::control_protocol::{
    send_request, ControlCommand, ControlResponse, ControlResult, Refusal, StatusReport,
};

/// A failed control request: either lb answered no (it kept its state), or the answer never
/// came (lb may or may not have acted: only reading its status again tells).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("no answer: {0}")]
    Transport(String),
    /// `set-backends --if-generation N` refused: the lb's set is no longer at generation N
    /// (someone else changed it since it was read). Nothing changed.
    #[error("refused: {0}")]
    GenerationMoved(String),
}

impl CtlError {
    pub fn reason(&self) -> &str {
        match self {
            CtlError::Refused(r) | CtlError::Transport(r) | CtlError::GenerationMoved(r) => r,
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
        ssh: crate::ssh::SshTarget,
        socket: PathBuf,
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
            LbControl::Ssh { ssh, socket } => ssh_request(ssh, socket, cmd, timeout)?,
        };
        if resp.ok {
            resp.result
                .ok_or_else(|| CtlError::Transport("lb sent an empty response".into()))
        } else {
            let reason = resp
                .error
                .unwrap_or_else(|| "lb refused without a reason".into());
            Err(match resp.refusal {
                Some(Refusal::GenerationMismatch) => CtlError::GenerationMoved(reason),
                _ => CtlError::Refused(reason),
            })
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
        if_generation: Option<u64>,
        timeout: Duration,
    ) -> Result<SwapDone, CtlError> {
        match self.request(
            ControlCommand::SetBackends {
                backends: backends.to_vec(),
                verify,
                if_generation,
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

impl LbControl {
    /// `query`: sends whole DNS queries (hexadecimal) from the lb to `backend` over TCP;
    /// returns the answers (hexadecimal), in order.
    pub fn query(
        &self,
        backend: std::net::SocketAddr,
        queries: Vec<String>,
        timeout: Duration,
    ) -> Result<Vec<String>, CtlError> {
        match self.request(
            ControlCommand::Query {
                backend: backend.to_string(),
                queries,
            },
            timeout,
        )? {
            ControlResult::Answers(a) => Ok(a.answers),
            other => Err(CtlError::Transport(format!(
                "unexpected query response {other:?}"
            ))),
        }
    }
}

/// Seconds added to the `lb ctl` timeout and ssh's connect timeout before an `lb ctl` over SSH
/// is killed: the remote side's own timeouts should fire first.
const SSH_MARGIN: Duration = Duration::from_secs(5);

/// How long the output of an exited ssh may take to reach EOF.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// The most output kept from one `lb ctl` over SSH (stdout and stderr each); the rest is read
/// and dropped.
const MAX_SSH_OUTPUT: u64 = 4 << 20;

/// `lb ctl --json ...` on the lb host over SSH.
///
/// Only an answer from lb itself is a refusal: `lb ctl` exits 1 ([`lb::ctl::EXIT_REFUSED`]),
/// or 4 for a reload only a restart applies ([`lb::ctl::EXIT_RESTART_NEEDED`]), after printing
/// lb's `{"ok":false,...}` (the code matching the answer, [`lb::ctl::exit_code`]). Everything else is a transport failure (lb may or may
/// not have acted): ssh's own failures (exit 255), `lb ctl` unable to reach or hear lb (exit 2,
/// [`lb::ctl::EXIT_UNREACHABLE`], with its own `{"ok":false,...}` line), any other exit or
/// output, and an exchange that outlives its deadline (`timeout` for lb ctl, as much for ssh's
/// connect, plus [`SSH_MARGIN`]; keepalives every 5 s end a dead connection within 10 s), when
/// ssh is killed.
fn ssh_request(
    target: &crate::ssh::SshTarget,
    socket: &std::path::Path,
    cmd: ControlCommand,
    timeout: Duration,
) -> Result<ControlResponse, CtlError> {
    let transport = |m: String| CtlError::Transport(m);
    let (program, target_name) = (target.program.as_str(), target.target.as_str());
    let connect = Duration::from_secs(timeout.as_secs().max(1));
    let mut ssh = target.command(connect);
    ssh.args(ctl_args(socket, cmd, timeout))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = crate::children::spawn(&mut ssh)
        .map_err(|e| transport(format!("cannot run {program} to {target_name}: {e}")))?;
    let stdout = read_bounded(child.child.stdout.take());
    let stderr = read_bounded(child.child.stderr.take());
    let deadline = timeout + connect + SSH_MARGIN;
    let status = child
        .wait_deadline(deadline, Duration::from_secs(1))
        .map_err(|e| transport(format!("waiting for {program} to {target_name}: {e}")))?;
    let Some(status) = status else {
        return Err(transport(format!(
            "`lb ctl` over ssh to {target_name} did not finish within {}s and was stopped",
            deadline.as_secs()
        )));
    };
    // ssh has exited; its pipes close unless something it started (an `ssh_command` wrapper's
    // child in another process group) still holds them.
    let (Ok(stdout), Ok(stderr)) = (
        stdout.recv_timeout(PIPE_GRACE),
        stderr.recv_timeout(PIPE_GRACE),
    ) else {
        return Err(transport(format!(
            "{program} to {target_name} exited ({status}) but something it started still holds its output open; no answer read"
        )));
    };
    let stderr = String::from_utf8_lossy(&stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&stdout);
    let answer: Option<ControlResponse> = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    let code = status.code();
    let lb_said = |a: &Option<ControlResponse>| {
        a.as_ref()
            .and_then(|r| r.error.clone())
            .unwrap_or_else(|| stderr.clone())
    };
    match (code, answer) {
        (Some(0), Some(r)) if r.ok => Ok(r),
        (Some(c), Some(r)) if !r.ok && i32::from(lb::ctl::exit_code(&r)) == c => Ok(r),
        (Some(255), _) => Err(transport(format!(
            "ssh to {target_name} failed (exit 255): {stderr}"
        ))),
        (Some(c), a) if i32::from(lb::ctl::EXIT_UNREACHABLE) == c => Err(transport(format!(
            "`lb ctl` on {target_name} could not reach lb (exit {c}): {}",
            lb_said(&a)
        ))),
        (c, a) => Err(transport(format!(
            "`lb ctl` over ssh to {target_name} failed ({}): {}",
            c.map_or("killed by a signal".to_string(), |c| format!("exit {c}")),
            lb_said(&a)
        ))),
    }
}

/// Reads a pipe to its end on a thread, keeping at most [`MAX_SSH_OUTPUT`] bytes.
fn read_bounded<R: Read + Send + 'static>(r: Option<R>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = (&mut r).take(MAX_SSH_OUTPUT).read_to_end(&mut buf);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        }
        let _ = tx.send(buf);
    });
    rx
}

/// The `lb ctl --json` command line for `cmd`.
fn ctl_args(socket: &std::path::Path, cmd: ControlCommand, timeout: Duration) -> Vec<String> {
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
        ControlCommand::SetBackends {
            backends,
            verify,
            if_generation,
        } => {
            args.push("set-backends".into());
            if verify {
                args.push("--verify".into());
            }
            if let Some(n) = if_generation {
                args.extend(["--if-generation".into(), n.to_string()]);
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
        // Hexadecimal messages: nothing the remote shell would interpret.
        ControlCommand::Query { backend, queries } => {
            args.extend(["query".into(), backend]);
            args.extend(queries);
        }
    }
    args
}
