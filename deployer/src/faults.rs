//! Test hooks from the environment: crash points, injected faults, failures and pauses.
//!
//! - `DEPLOYER_CRASH_AT=POINT` makes the process die at that point as SIGKILL would: no
//!   cleanup, no journal write, and the process groups of its children (ansible-playbook, the
//!   delegation hook) killed with it, as a killed process group would be. Points are listed by
//!   [`crate::steps::crash_points`].
//! - `DEPLOYER_FAULT=flip:LB:lost-reply` sends LB's swap and then reports a transport error, as
//!   if the reply was lost.
//! - `DEPLOYER_FAIL_AT=STEP` fails a step before it runs (`delete-old`: after its first
//!   deletion).
//! - `DEPLOYER_PAUSE_AFTER=STEP` sleeps `DEPLOYER_PAUSE_SECS` (default 120) after the step is
//!   recorded, so a test can act (or kill) meanwhile.
//!
//! Each injected crash or fault first prints `fault injected: POINT` on stderr.

use std::time::Duration;

use crate::steps::Step;

/// The hooks read once from the environment.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    crash_at: Option<String>,
    fault: Option<String>,
    fail_at: Option<String>,
    pause_after: Option<String>,
    pause: Duration,
}

impl Faults {
    pub fn from_env() -> Faults {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Faults {
            crash_at: var("DEPLOYER_CRASH_AT"),
            fault: var("DEPLOYER_FAULT"),
            fail_at: var("DEPLOYER_FAIL_AT"),
            pause_after: var("DEPLOYER_PAUSE_AFTER"),
            pause: Duration::from_secs(
                var("DEPLOYER_PAUSE_SECS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(120),
            ),
        }
    }

    /// Dies here if `DEPLOYER_CRASH_AT` names this point.
    pub fn point(&self, point: &str) {
        if self.crash_at.as_deref() == Some(point) {
            crash(point);
        }
    }

    /// True (after saying so) if `DEPLOYER_FAULT` asks to lose the reply of LB's swap.
    pub fn lost_reply(&self, lb: &str) -> bool {
        let point = format!("flip:{lb}:lost-reply");
        if self.fault.as_deref() == Some(point.as_str()) {
            eprintln!("fault injected: {point}");
            return true;
        }
        false
    }

    /// True if `DEPLOYER_FAIL_AT` names this step.
    pub fn fail_at(&self, step: Step) -> bool {
        self.fail_at.as_deref() == Some(step.name())
    }

    /// How long to pause after this step, if `DEPLOYER_PAUSE_AFTER` names it.
    pub fn pause_after(&self, step: Step) -> Option<Duration> {
        (self.pause_after.as_deref() == Some(step.name())).then_some(self.pause)
    }
}

/// Kills the children's process groups, then this process, with SIGKILL.
fn crash(point: &str) -> ! {
    eprintln!("fault injected: {point}");
    crate::children::kill_all_now();
    // SAFETY: kill(2) on this process; no memory is involved.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; should it not be delivered at once, end without cleanup.
    // SAFETY: _exit ends the process without running destructors or flushing buffers.
    unsafe { libc::_exit(137) }
}
