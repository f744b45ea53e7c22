//! systemd integration: readiness and stopping notifications, the watchdog, and sockets
//! passed by socket activation (`lb.socket`), so a service restart keeps the listening sockets
//! and the queries queued in them.

use std::os::fd::{AsFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sd_notify::NotifyState;
use socket2::{Socket, Type};

/// Sockets received through `LISTEN_FDS`, sorted by type.
pub struct Inherited {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: Vec<std::net::TcpListener>,
}

/// Takes the sockets systemd passed (if `LISTEN_PID` is this process), or `None`.
pub fn inherited_sockets() -> Result<Option<Inherited>> {
    let fds: Vec<i32> = sd_notify::listen_fds()
        .context("invalid LISTEN_FDS/LISTEN_PID")?
        .collect();
    if fds.is_empty() {
        return Ok(None);
    }
    let mut out = Inherited {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for fd in fds {
        // SAFETY: systemd passed this descriptor to us and nothing else in the process owns it;
        // listen_fds() only yields the LISTEN_FDS range of this very process.
        let sock = unsafe { Socket::from_raw_fd(fd) };
        let ty = sock
            .r#type()
            .with_context(|| format!("passed fd {fd} is not a socket"))?;
        sock.set_nonblocking(true)?;
        if ty == Type::DGRAM {
            out.udp.push(sock.into());
        } else if ty == Type::STREAM {
            out.tcp.push(sock.into());
        } else {
            anyhow::bail!("passed fd {fd} is neither a UDP nor a TCP socket");
        }
    }
    Ok(Some(out))
}

/// Why lb cannot make a socket systemd passed its own: see [`adopt_socket`].
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// (`source`, the kernel's refusal, follows in the error chain.)
    #[error(
        "it belongs to uid {owner} and lb runs as uid {uid} without CAP_CHOWN (lb.service \
         grants it for this, with AmbientCapabilities=)"
    )]
    NotPermitted {
        owner: u32,
        uid: u32,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Makes a socket systemd passed belong to lb's user, so that sockets lb binds can join its
/// `SO_REUSEPORT` group: the kernel admits a socket to a group only if both belong to the
/// same user, and systemd creates its sockets as root while lb.service runs as `User=lb`.
///
/// Needs `CAP_CHOWN` once (lb.service grants it; [`drop_chown_capability`] gives it up as soon
/// as the sockets are bound). Nothing to do when lb runs as the owner already (as root, or
/// after a restart: the socket keeps the owner the previous lb gave it).
pub fn adopt_socket(sock: &impl AsFd) -> Result<(), AdoptError> {
    let owner = rustix::fs::fstat(sock)
        .map_err(std::io::Error::from)?
        .st_uid;
    let uid = rustix::process::geteuid();
    if owner == uid.as_raw() {
        return Ok(());
    }
    rustix::fs::fchown(sock, Some(uid), None).map_err(|e| AdoptError::NotPermitted {
        owner,
        uid: uid.as_raw(),
        source: e.into(),
    })
}

/// Gives up `CAP_CHOWN` (effective, permitted and inheritable, and so ambient) if this process
/// has it: lb.service grants it only for [`adopt_socket`], at start. Called before any other
/// thread exists (capabilities are per thread), so no thread, and no process started by an
/// upgrade, keeps it. Returns whether it was held.
pub fn drop_chown_capability() -> std::io::Result<bool> {
    use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
    let mut caps = capabilities(None)?;
    let held = (caps.permitted | caps.effective | caps.inheritable).contains(CapabilitySet::CHOWN);
    if held {
        caps.effective.remove(CapabilitySet::CHOWN);
        caps.permitted.remove(CapabilitySet::CHOWN);
        caps.inheritable.remove(CapabilitySet::CHOWN);
        set_capabilities(None, caps)?;
    }
    Ok(held)
}

/// Tells systemd the service is ready (all sockets bound, backend set loaded).
pub fn notify_ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Tells systemd that `pid` (the process this one upgraded to) is the service's main process.
///
/// A watchdog ping goes in the same message, sent while this process is still the main one
/// (`NotifyAccess=main`): the new process's pings count only from now on, and its first one
/// may be up to half the watchdog interval away.
pub fn notify_main_pid(pid: u32) {
    let _ = sd_notify::notify(&[
        NotifyState::MainPid(pid),
        NotifyState::Watchdog,
        NotifyState::Status("upgraded"),
    ]);
}

/// Tells systemd a reload is done (also fine without `Type=notify-reload`).
pub fn notify_reloaded() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

/// Per-worker liveness: each UDP worker stores the time of its last loop iteration here.
#[derive(Debug)]
pub struct Heartbeats {
    start: Instant,
    beats: Box<[AtomicU64]>,
}

impl Heartbeats {
    pub fn new(workers: usize) -> Heartbeats {
        Heartbeats {
            start: Instant::now(),
            beats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Called by worker `i` once per wake-up (at least every tick), not per packet.
    #[inline]
    pub fn beat(&self, i: usize) {
        if let Some(b) = self.beats.get(i) {
            b.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// True if every worker beat within `limit`.
    pub fn all_alive(&self, limit: Duration) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        self.beats
            .iter()
            .all(|b| now.saturating_sub(b.load(Ordering::Relaxed)) <= limit.as_millis() as u64)
    }
}

/// Pings the systemd watchdog at half its interval while every UDP worker is alive; a stuck
/// worker stops the pings and systemd restarts the service.
pub async fn run_watchdog(beats: Arc<Heartbeats>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(10));
    loop {
        if beats.all_alive(Duration::from_secs(5).min(interval)) {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else {
            tracing::error!("a UDP worker stopped making progress; withholding the watchdog ping");
        }
        tokio::time::sleep(period).await;
    }
}
