//! One deployer at a time per state directory: an exclusive `flock` on `STATE_DIR/deployer.lock`.
//!
//! The lock is held by an open file, so the kernel releases it when the holder exits, however it
//! exits (SIGKILL included): a crashed deployer never leaves a stale lock. Children do not
//! inherit it (close-on-exec), so they must not outlive the holder: on SIGINT, SIGTERM and
//! SIGHUP the deployer stops them before it exits, and on SIGKILL the kernel sends each its
//! death signal ([`crate::children`]) as the lock is released; what they started themselves
//! (ansible's workers) may take a moment longer to stop. The holder writes its
//! PID into the file so that a refused second deployer can name it. Commands that only read
//! (`status`, `--dry-run`) do not take it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another deployer (PID {pid}) is changing this deployment (lock {path}): wait for it to finish, or stop it (`kill {pid}`) and then run `deployer status`")]
    Held { pid: String, path: PathBuf },
    #[error("cannot open the lock file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DeploymentLock {
    _file: File,
    pub path: PathBuf,
}

impl DeploymentLock {
    /// Takes the lock or refuses at once, naming the holder's PID.
    pub fn acquire(state_dir: &Path) -> Result<DeploymentLock, LockError> {
        let path = state_dir.join("deployer.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            return Err(LockError::Held {
                pid: holder_pid(&mut file),
                path,
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(DeploymentLock { _file: file, path })
    }
}

/// The PID the holder wrote (it may be writing it right now: retry briefly).
fn holder_pid(file: &mut File) -> String {
    for _ in 0..20 {
        let mut s = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut s).is_ok() {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    "unknown".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_refuses_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("dlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = DeploymentLock::acquire(&dir).unwrap();
        // flock locks belong to the open file description: a second open conflicts even in
        // the same process.
        let e = DeploymentLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
        drop(held);
        DeploymentLock::acquire(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
