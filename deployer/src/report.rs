//! Terminal reporting: one line per step with its elapsed time, progress lines, information;
//! or, with `--json`, one JSON object per line on stdout.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::journal::StepRecord;

/// Human or JSON progress output.
pub struct Reporter {
    pub json: bool,
    /// When the last progress line went out (progress to a pipe is throttled).
    last_progress: std::cell::Cell<Option<Instant>>,
}

impl Reporter {
    pub fn new(json: bool) -> Reporter {
        Reporter {
            json,
            last_progress: std::cell::Cell::new(None),
        }
    }

    /// `[n/total] step ok (1.2s) detail`.
    pub fn step(&self, n: usize, total: usize, rec: &StepRecord) {
        if self.json {
            println!(
                "{}",
                json!({"event": "step", "n": n, "of": total, "step": rec.step, "ok": rec.ok,
                       "detail": rec.detail, "elapsed_ms": rec.elapsed_ms})
            );
        } else {
            println!(
                "[{n}/{total}] {:<22} {} ({:.1}s) {}",
                rec.step.name(),
                if rec.ok { "ok" } else { "FAILED" },
                rec.elapsed_ms as f64 / 1000.0,
                rec.detail
            );
        }
    }

    /// A progress line that replaces itself on a terminal (one JSON event per call with --json).
    pub fn progress(&self, msg: &str) {
        use std::io::{IsTerminal, Write};
        let tty = !self.json && std::io::stdout().is_terminal();
        if !tty {
            // To a pipe or log: one line every 5 s, not a flood.
            if self
                .last_progress
                .get()
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
            {
                return;
            }
            self.last_progress.set(Some(Instant::now()));
        }
        if self.json {
            println!("{}", json!({"event": "progress", "message": msg}));
        } else if tty {
            print!("\r{msg}\x1b[K");
            let _ = std::io::stdout().flush();
        } else {
            println!("{msg}");
        }
    }

    pub fn progress_end(&self) {
        use std::io::IsTerminal;
        if !self.json && std::io::stdout().is_terminal() {
            println!();
        }
        self.last_progress.set(None);
    }

    pub fn info(&self, msg: &str) {
        if self.json {
            println!("{}", json!({"event": "info", "message": msg}));
        } else {
            println!("{msg}");
        }
    }
}
