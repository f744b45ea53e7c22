//! Network namespaces for tests that need addresses loopback does not have by default (a
//! second IPv6 address): `ip netns add`, with a guard that deletes the namespace on drop.
//!
//! Processes run inside with `ip netns exec NAME PROGRAM` (which `exec`s, so the PID the test
//! holds is the program's own). The test's own sockets enter the namespace from a scoped thread
//! that calls `setns(2)`: the switch is per thread, so the rest of the test process stays where
//! it was.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace with loopback up, deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e} (apt-get install iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates a namespace named after the test process and `tag`, with `lo` up.
    pub fn create(tag: &str) -> Result<NetNs, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("lbtest-{}-{tag}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adds an address to `lo` inside the namespace (`fd00::5/128`), without duplicate address
    /// detection so it is usable at once.
    pub fn add_loopback_address(&self, cidr: &str) -> Result<(), String> {
        let mut args = vec!["ip", "addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.exec(&args)
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates live there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a thread inside the named namespace (see [`NetNs::run`]).
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new("/var/run/netns").join(name);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            // SAFETY: setns on a valid namespace file descriptor affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns({}) failed: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}
