//! systemd integration: readiness and stopping notifications, the watchdog, and sockets
//! passed by socket activation (`lb.socket`), so a service restart keeps the listening sockets
//! and the queries queued in them.

use std::os::fd::FromRawFd;
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
