//! Binary upgrade with no gap: the running `lb` starts a new binary and hands it every
//! listening socket with `SCM_RIGHTS` ([`crate::fdpass`]), like nginx's USR2 upgrade.
//!
//! Sequence (`lb ctl upgrade` or SIGUSR2):
//! 1. The old process makes a connected Unix socket pair and starts the new binary (same
//!    config file) with one end inherited as a descriptor, named by `LB_UPGRADE_FD`. No path
//!    exists in the file system, so no other process can connect in its place.
//! 2. The new process receives a description and the descriptors of every UDP and TCP
//!    listener, the metrics listener and the control listener, and starts on them (it binds
//!    nothing; the backend set comes in the description).
//! 3. Once it serves, it writes `ready PID`. Until then the old process never stopped serving;
//!    if the new one fails or is not ready within [`READY_TIMEOUT`], it is killed and the old one
//!    carries on, reporting the failure.
//! 4. The old process stops reading its (shared) sockets, answers what it already forwarded,
//!    finishes its TCP client connections (answered, then closed), and exits.
//!
//! Because both processes hold the very same sockets, no datagram or connection queued in
//! them is lost during the switch. Every UDP worker's socket is handed over, the whole
//! `SO_REUSEPORT` group of each address (under socket activation too, where systemd's socket
//! is its first member): a member left behind would be closed with the old process, and the
//! datagrams the kernel had queued in it lost.
//!
//! The description also carries the control plane's records ([`CarriedRecords`]: upgrades,
//! swaps, state file writes), with this upgrade already counted as a success, so the new
//! process's `lb_upgrades_total` and failing gauges continue the old one's. An older binary on
//! either side ignores or lacks them (the field is optional), and the new process then starts
//! its records afresh.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fdpass::{recv_with_fds, send_with_fds, MAX_FDS};
use crate::state::RuntimeState;
use crate::stats::CarriedRecords;

/// How long the new process may take to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The environment variable naming the inherited hand-over descriptor.
pub const ENV_UPGRADE_FD: &str = "LB_UPGRADE_FD";

/// Duplicates of the listening sockets, kept by the control plane for a hand-over.
#[derive(Debug, Default)]
pub struct HandoffSockets {
    pub udp: Vec<OwnedFd>,
    pub tcp: Vec<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    /// The UDP sockets are `SO_REUSEPORT` groups whose first member systemd keeps (socket
    /// activation), see [`crate::server::Listeners::systemd_group`].
    pub systemd_group: bool,
}

/// What the descriptors that follow are, in order, and the runtime backend set to start with
/// (so it carries over even without a state file).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Manifest {
    udp: usize,
    tcp: usize,
    metrics: bool,
    control: bool,
    state: RuntimeState,
    /// Absent from an older binary's hand-over.
    #[serde(default)]
    records: Option<CarriedRecords>,
    /// Absent from the manifests of versions before it: false.
    #[serde(default)]
    systemd_group: bool,
}

/// The records received with the sockets, once per process (set by [`receive_from_env`]).
///
/// Process-wide like the `LB_UPGRADE_FD` variable they come with: the sockets are received
/// before the shared state exists, and the control plane takes the records up when it starts
/// ([`carried_records`]).
static CARRIED: OnceLock<CarriedRecords> = OnceLock::new();

/// The records the previous process handed over, if this one was started by an upgrade.
pub fn carried_records() -> Option<&'static CarriedRecords> {
    CARRIED.get()
}

/// The sockets received from the old process.
#[derive(Debug)]
pub struct Received {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: Vec<std::net::TcpListener>,
    pub metrics: Option<std::net::TcpListener>,
    pub control: Option<UnixListener>,
    /// The old process's backend set at the moment of the hand-over.
    pub state: RuntimeState,
    /// See [`HandoffSockets::systemd_group`].
    pub systemd_group: bool,
    /// Where to report readiness.
    pub stream: UnixStream,
}

/// In the new process: receives the sockets from the old one (`LB_UPGRADE_FD`), if set.
pub fn receive_from_env() -> anyhow::Result<Option<Received>> {
    use anyhow::Context;
    let Some(value) = std::env::var_os(ENV_UPGRADE_FD) else {
        return Ok(None);
    };
    // Children of this process must not try to take over again.
    std::env::remove_var(ENV_UPGRADE_FD);
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd > 2)
        .with_context(|| format!("{ENV_UPGRADE_FD}={value:?} is not a descriptor number"))?;
    // SAFETY: the upgrading process created this descriptor for us and cleared its
    // close-on-exec flag only for this exec; nothing else in this process knows or owns it.
    // Its type is checked below before any use.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let kind = rustix::net::sockopt::socket_type(&owned)
        .with_context(|| format!("{ENV_UPGRADE_FD}={fd} is not a socket"))?;
    anyhow::ensure!(
        kind == rustix::net::SocketType::STREAM,
        "{ENV_UPGRADE_FD}={fd} is not a stream socket"
    );
    let stream = UnixStream::from(owned);
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let (bytes, fds) = recv_with_fds(&stream).context("cannot receive the listening sockets")?;
    let m: Manifest = serde_json::from_slice(&bytes).context("invalid hand-over manifest")?;
    let want = m.udp + m.tcp + m.metrics as usize + m.control as usize;
    anyhow::ensure!(
        fds.len() == want,
        "hand-over sent {} descriptors, the manifest names {want}",
        fds.len()
    );
    let mut rest = fds.into_iter();
    let mut take = || rest.next().expect("counted above");
    let udp = (0..m.udp)
        .map(|_| std::net::UdpSocket::from(take()))
        .collect();
    let tcp = (0..m.tcp)
        .map(|_| std::net::TcpListener::from(take()))
        .collect();
    let metrics = m.metrics.then(|| std::net::TcpListener::from(take()));
    let control = m.control.then(|| UnixListener::from(take()));
    if let Some(r) = m.records {
        let _ = CARRIED.set(r);
    }
    Ok(Some(Received {
        udp,
        tcp,
        metrics,
        control,
        state: m.state,
        systemd_group: m.systemd_group,
        stream,
    }))
}

/// In the new process: reports readiness to the old one.
pub fn report_ready(stream: &mut UnixStream) {
    let _ = writeln!(stream, "ready {}", std::process::id());
}

/// In the old process: starts `binary` on `config`, hands it the sockets, the backend set and
/// the control plane's `records` (to continue), and waits for it to report ready. On any
/// failure the new process is killed and the error returned; the caller keeps serving.
pub fn hand_over(
    binary: &Path,
    config: &Path,
    log_json: bool,
    sockets: &HandoffSockets,
    state: RuntimeState,
    records: CarriedRecords,
) -> Result<u32, String> {
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    fds.extend(sockets.udp.iter().map(|f| f.as_fd()));
    fds.extend(sockets.tcp.iter().map(|f| f.as_fd()));
    fds.extend(sockets.metrics.iter().map(|f| f.as_fd()));
    fds.extend(sockets.control.iter().map(|f| f.as_fd()));
    if fds.len() > MAX_FDS {
        return Err(format!(
            "{} sockets are more than one hand-over carries ({MAX_FDS})",
            fds.len()
        ));
    }
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("cannot make a hand-over socket pair: {e}"))?;
    // The child inherits exactly this descriptor (std opens everything else close-on-exec).
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())
        .map_err(|e| format!("cannot pass the hand-over socket to the new process: {e}"))?;
    let their_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut cmd = Command::new(binary);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .args(["--log-format", if log_json { "json" } else { "text" }])
        .env(ENV_UPGRADE_FD, their_fd.to_string())
        // systemd names this process in WATCHDOG_PID; inherited as is, the new process would
        // take the watchdog for someone else's and never ping, and systemd would kill it once
        // it is the main process. Without the variable the watchdog is the new process's
        // (WATCHDOG_USEC stays).
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null());
    let spawned = cmd.spawn();
    drop(theirs);
    let mut child = spawned.map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let fail = |child: &mut std::process::Child, msg: String| {
        let _ = child.kill();
        let _ = child.wait();
        Err(msg)
    };
    let manifest = Manifest {
        udp: sockets.udp.len(),
        tcp: sockets.tcp.len(),
        metrics: sockets.metrics.is_some(),
        control: sockets.control.is_some(),
        state,
        records: Some(records),
        systemd_group: sockets.systemd_group,
    };
    let bytes = serde_json::to_vec(&manifest).expect("manifest serialises");
    if let Err(e) = send_with_fds(&ours, &bytes, &fds) {
        return fail(&mut child, format!("cannot hand the sockets over: {e}"));
    }
    let started = Instant::now();
    let _ = ours.set_read_timeout(Some(READY_TIMEOUT));
    let mut line = String::new();
    let _ = BufReader::new(&ours).read_line(&mut line);
    let pid = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    match pid {
        Some(pid) if pid == child.id() => {
            // The new process outlives this one; do not wait for it.
            std::mem::forget(child);
            Ok(pid)
        }
        _ => {
            let status = child.try_wait().ok().flatten();
            let msg = match status {
                Some(s) => format!("new process exited before it was ready ({s})"),
                None if started.elapsed() >= READY_TIMEOUT => {
                    format!("new process was not ready within {READY_TIMEOUT:?}; it was stopped")
                }
                None => {
                    "new process closed the hand-over socket before it was ready; it was stopped"
                        .to_string()
                }
            };
            fail(&mut child, msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_binarys_manifest_without_records_is_accepted() {
        let state = RuntimeState::new(3, vec!["127.0.0.1:53".parse().unwrap()], vec![], vec![]);
        let mut m = Manifest {
            udp: 2,
            tcp: 1,
            metrics: true,
            control: false,
            state,
            records: None,
            systemd_group: false,
        };
        let mut v = serde_json::to_value(&m).unwrap();
        v.as_object_mut().unwrap().remove("records");
        let old: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(old, m);
        // And the records round-trip when present.
        let mut r = CarriedRecords::default();
        r.upgrades.successes = 4;
        r.state_writes.last_failed = true;
        m.records = Some(r);
        let back: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
