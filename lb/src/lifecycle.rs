//! The process's lifecycle: serving, stopping, and handing over to an upgraded process.
//!
//! One [`Lifecycle`] owns this state; every task and thread asks it rather than keeping its own
//! flag. Stopping is one-way: once [`Lifecycle::stop`] is called, listeners stop reading and
//! accepting, work in flight is finished, and the process exits. An upgrade is a stop that
//! records the PID of the process that took over ([`Lifecycle::handed_over`]), so the exit path
//! can tell systemd who the main process is now and leave the shared sockets' files alone.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::sync::watch;

/// Serving → stopping, plus the upgrade hand-over. Shared as `Arc<Lifecycle>`.
#[derive(Debug)]
pub struct Lifecycle {
    /// For async tasks: resolves [`Lifecycle::stopped`].
    stop_tx: watch::Sender<bool>,
    /// For the UDP worker threads, which poll it once per wake-up.
    stopping: AtomicBool,
    /// PID of the process an upgrade handed the sockets to (0: none).
    successor: AtomicU32,
    /// An upgrade is running (at most one at a time).
    upgrading: AtomicBool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            stop_tx: watch::channel(false).0,
            stopping: AtomicBool::new(false),
            successor: AtomicU32::new(0),
            upgrading: AtomicBool::new(false),
        }
    }
}

impl Lifecycle {
    /// Starts the shutdown: stop reading new work, finish what is in flight.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop_tx.send_replace(true);
    }

    /// True once [`stop`](Self::stop) was called (cheap: one atomic load).
    #[inline]
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Resolves once the process is stopping.
    pub async fn stopped(&self) {
        let mut rx = self.stop_tx.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Claims the one upgrade slot; `None` if an upgrade is already running.
    pub fn begin_upgrade(&self) -> Option<UpgradeSlot<'_>> {
        (!self.upgrading.swap(true, Ordering::AcqRel)).then_some(UpgradeSlot { owner: self })
    }

    /// Records that `pid` now serves on this process's sockets, and stops this one.
    pub fn handed_over(&self, pid: u32) {
        self.successor.store(pid, Ordering::Release);
        self.stop();
    }

    /// The process this one handed over to, if it did.
    pub fn successor(&self) -> Option<u32> {
        match self.successor.load(Ordering::Acquire) {
            0 => None,
            pid => Some(pid),
        }
    }
}

/// The claim on a running upgrade; releases the slot when dropped (a failed upgrade can be
/// retried, a successful one stops the process anyway).
#[derive(Debug)]
pub struct UpgradeSlot<'a> {
    owner: &'a Lifecycle,
}

impl Drop for UpgradeSlot<'_> {
    fn drop(&mut self) {
        self.owner.upgrading.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_wakes_waiters_and_upgrade_slot_is_exclusive() {
        let l = std::sync::Arc::new(Lifecycle::default());
        let slot = l.begin_upgrade().expect("first upgrade");
        assert!(l.begin_upgrade().is_none(), "one upgrade at a time");
        drop(slot);
        assert!(
            l.begin_upgrade().is_some(),
            "a failed upgrade frees the slot"
        );
        let waiter = tokio::spawn({
            let l = std::sync::Arc::clone(&l);
            async move { l.stopped().await }
        });
        assert!(!l.is_stopping());
        l.handed_over(42);
        waiter.await.unwrap();
        assert!(l.is_stopping());
        assert_eq!(l.successor(), Some(42));
        // A late waiter returns at once.
        l.stopped().await;
    }
}
