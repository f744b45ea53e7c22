//! The deployer's child processes (ansible-playbook, the delegation hook, `ssh` for `lb ctl`):
//! started so that they never outlive the deployer, and waited for with a deadline.
//!
//! Every child gets its own process group (a timeout stops it and everything it started) and
//! `PR_SET_PDEATHSIG(SIGTERM)`: if the deployer dies, however it dies (SIGKILL included), the
//! kernel sends the child SIGTERM. SIGTERM rather than SIGKILL because ansible-playbook handles
//! it by stopping its workers, which run in sessions of their own that no signal to its group
//! reaches. The death signal reaches the child only, not what it started: a hook that runs
//! other programs should `exec` the last one, or pass SIGTERM on.
//!
//! SIGINT, SIGTERM and SIGHUP to the deployer ([`handle_termination`]) stop every child group
//! (SIGTERM, a grace period, then SIGKILL) before the deployer exits, so the deployment's lock
//! (held by the deployer's open file) is released only once they are gone. The exit is then
//! what a crash is to the journal: nothing more is written, and `status`, `--resume` and
//! `rollback` take it from there.
//!
//! No child inherits the deployer's environment ([`restrict_env`]): each gets the few
//! variables it needs ([`ChildEnv`]), so the Linode token stays with the deployer.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Most child process groups alive at once (the deployer runs one child at a time; the bound
/// only has to exist).
const MAX_GROUPS: usize = 16;

/// Process groups of running children; 0 = free slot. Atomics, so that a crash point or the
/// termination thread can read them without a lock another thread might hold.
static GROUPS: [AtomicI32; MAX_GROUPS] = [const { AtomicI32::new(0) }; MAX_GROUPS];

/// Set once the deployer is terminating: waits stop reaping, so that the main thread never acts
/// on a child it saw die because the termination killed it (an undo on a killed playbook).
static TERMINATING: AtomicBool = AtomicBool::new(false);

/// How long children get to exit after SIGTERM before SIGKILL (their groups).
pub const GRACE: Duration = Duration::from_secs(5);

/// What every child gets of the deployer's environment (when set): where programs are, the
/// home directory (ssh's `~/.ssh`, Ansible's `~/.ansible`), the locale and time zone, the
/// temporary directory and the user's name. Nothing else: `LINODE_TOKEN` above all.
pub const BASE_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "LC_NUMERIC",
    "LC_TIME",
    "TZ",
    "TMPDIR",
];

/// Which child a [`Command`] is, for the environment it is given ([`restrict_env`]).
#[derive(Debug, Clone, Copy)]
pub enum ChildEnv<'a> {
    /// `ssh` and `ssh-keygen` (`lb ctl` over SSH, waiting for SSH, forgetting host keys): the
    /// base and `SSH_AUTH_SOCK` (the agent holding the key).
    Ssh,
    /// `ansible-playbook` (and through it ssh, and in local mode the daemons the roles start):
    /// the base, `SSH_AUTH_SOCK`, and the operator's own `ANSIBLE_*` settings (e.g.
    /// `ANSIBLE_VAULT_PASSWORD_FILE`); the deployer sets its own `ANSIBLE_*` after them.
    Ansible,
    /// The delegation hook: the base and the variables `[roll_lb] hook_env` names (the
    /// registrar's credentials; `LINODE_TOKEN` only if it is listed there).
    Hook(&'a [String]),
}

impl ChildEnv<'_> {
    /// True if the variable `name` of the deployer's environment is passed to this child.
    pub fn allows(&self, name: &str) -> bool {
        if BASE_ENV.contains(&name) {
            return true;
        }
        match self {
            ChildEnv::Ssh => name == "SSH_AUTH_SOCK",
            ChildEnv::Ansible => name == "SSH_AUTH_SOCK" || name.starts_with("ANSIBLE_"),
            ChildEnv::Hook(extra) => extra.iter().any(|e| e == name),
        }
    }
}

/// Clears `cmd`'s environment and gives it back only what `which` allows from the deployer's
/// own. Call it before setting the child's own variables (`env_clear` would drop them).
pub fn restrict_env<'c>(cmd: &'c mut Command, which: ChildEnv<'_>) -> &'c mut Command {
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(|name| which.allows(name)) {
            cmd.env(k, v);
        }
    }
    cmd
}

/// Prepares `cmd` to run as a supervised child: its own process group and SIGTERM when the
/// deployer dies.
pub fn supervise(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit).
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.process_group(0).pre_exec(move || {
            let none: libc::c_ulong = 0;
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                none,
                none,
                none,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The deployer died between fork and prctl: the death signal will never come.
            if libc::getppid() != parent {
                libc::_exit(143);
            }
            Ok(())
        })
    }
}

/// Spawns a supervised child and registers its process group (see [`supervise`]).
pub fn spawn(cmd: &mut Command) -> std::io::Result<Supervised> {
    let child = supervise(cmd).spawn()?;
    register(child.id());
    Ok(Supervised { child })
}

/// A running child whose process group is registered; unregistered when dropped.
pub struct Supervised {
    pub child: Child,
}

impl Supervised {
    /// Waits until the child exits or `timeout` passes; then stops its group (SIGTERM, then
    /// SIGKILL after `grace`) and returns `None`.
    pub fn wait_deadline(
        &mut self,
        timeout: Duration,
        grace: Duration,
    ) -> std::io::Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                // Killed by the termination (which marks itself first)? Then never act on it.
                park_if_terminating();
                return Ok(Some(st));
            }
            if start.elapsed() >= timeout {
                self.stop(grace);
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the child's group, SIGKILL after `grace` (or once the child is gone) to what
    /// is left of it; then reaped.
    pub fn stop(&mut self, grace: Duration) {
        let pgid = self.child.id() as i32;
        signal_group(pgid, libc::SIGTERM);
        let start = Instant::now();
        // Not reaped yet: while the child is a zombie its PID, the group's ID, cannot be reused.
        while start.elapsed() < grace && !exited(pgid) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever else is left in the group (a hook's own children).
        signal_group(pgid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        unregister(self.child.id());
    }
}

fn register(pgid: u32) {
    for slot in &GROUPS {
        if slot
            .compare_exchange(0, pgid as i32, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
    // No slot: the child still dies with the deployer (its death signal), it is only not
    // stopped first on SIGINT/SIGTERM.
}

fn unregister(pgid: u32) {
    for slot in &GROUPS {
        let _ = slot.compare_exchange(pgid as i32, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The registered process groups.
fn groups() -> Vec<i32> {
    GROUPS
        .iter()
        .map(|g| g.load(Ordering::SeqCst))
        .filter(|g| *g > 1)
        .collect()
}

fn signal_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// Kills every registered child group with SIGKILL at once (a crash point: as a killed process
/// group would be).
pub fn kill_all_now() {
    for g in groups() {
        signal_group(g, libc::SIGKILL);
    }
}

/// True once [`handle_termination`] has started stopping the deployer.
pub fn terminating() -> bool {
    TERMINATING.load(Ordering::SeqCst)
}

/// Blocks forever once the deployer is terminating (the termination thread exits the process).
pub fn park_if_terminating() {
    while terminating() {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A process has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "PID (COMM) S ...".
        Ok(s) => s
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP stop every child group, then exit with 128 + the signal.
///
/// The signals are blocked in the calling thread (call it first in `main`, before any other
/// thread exists, so that every thread inherits the mask) and taken by a dedicated thread with
/// `sigwait`, where stopping children is ordinary code rather than a signal handler. Children
/// start with an empty signal mask (std resets it before exec).
pub fn handle_termination() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset before use.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        set
    };
    std::thread::Builder::new()
        .name("termination".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid, initialised signal set; `sig` is written by sigwait.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                terminate(sig);
            }
        })?;
    Ok(())
}

fn terminate(sig: i32) -> ! {
    TERMINATING.store(true, Ordering::SeqCst);
    let name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    };
    let gs = groups();
    eprintln!(
        "deployer: {name} received: stopping {} child process group(s), then exiting; the journal keeps the operation as it stands (`deployer status` says what to run next)",
        gs.len()
    );
    for &g in &gs {
        signal_group(g, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < GRACE && !gs.iter().all(|g| exited(*g)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &g in &gs {
        signal_group(g, libc::SIGKILL);
    }
    // SAFETY: _exit ends the process at once; the main thread may hold locks that exit(3)'s
    // handlers would need, and nothing is left to flush that matters (the journal is written
    // atomically).
    unsafe { libc::_exit(128 + sig) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_child_gets_only_what_it_needs() {
        for w in [ChildEnv::Ssh, ChildEnv::Ansible, ChildEnv::Hook(&[])] {
            assert!(w.allows("PATH") && w.allows("HOME") && w.allows("LANG"));
            assert!(!w.allows("LINODE_TOKEN"), "{w:?}");
            assert!(!w.allows("AWS_SECRET_ACCESS_KEY"), "{w:?}");
        }
        assert!(ChildEnv::Ssh.allows("SSH_AUTH_SOCK"));
        assert!(!ChildEnv::Ssh.allows("ANSIBLE_CONFIG"));
        assert!(ChildEnv::Ansible.allows("ANSIBLE_VAULT_PASSWORD_FILE"));
        assert!(!ChildEnv::Hook(&[]).allows("SSH_AUTH_SOCK"));
        let listed = ["REGISTRAR_TOKEN".to_string(), "LINODE_TOKEN".to_string()];
        assert!(ChildEnv::Hook(&listed).allows("REGISTRAR_TOKEN"));
        assert!(
            ChildEnv::Hook(&listed).allows("LINODE_TOKEN"),
            "only when the config names it"
        );
    }
}
