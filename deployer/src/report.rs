//! Terminal reporting: one line per step with its elapsed time, progress lines, information;
//! or, with `--json`, one JSON object per line on stdout. A [`Heartbeat`] says what a long
//! step is doing ("still provisioning ns1-next, ns2-next… 30 s") whenever nothing else was
//! printed for [`HEARTBEAT`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::journal::StepRecord;

/// How long a step may print nothing before its [`Heartbeat`] says what it is doing.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Human or JSON progress output.
pub struct Reporter {
    pub json: bool,
    /// When the last progress line went out (progress to a pipe is throttled).
    last_progress: std::cell::Cell<Option<Instant>>,
    /// When anything was last printed (the heartbeat stays quiet while lines flow).
    last_line: Arc<Mutex<Instant>>,
    /// What the running step is doing, and since when.
    doing: Arc<Mutex<(String, Instant)>>,
}

/// Prints "still WHAT… N s" from a thread of its own while a step runs; stops when dropped.
pub struct Heartbeat {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `still provisioning ns1-next… 30 s`.
pub fn still_line(what: &str, elapsed: Duration) -> String {
    format!("still {what}… {} s", elapsed.as_secs())
}

impl Reporter {
    pub fn new(json: bool) -> Reporter {
        Reporter {
            json,
            last_progress: std::cell::Cell::new(None),
            last_line: Arc::new(Mutex::new(Instant::now())),
            doing: Arc::new(Mutex::new((String::new(), Instant::now()))),
        }
    }

    fn printed(&self) {
        if let Ok(mut t) = self.last_line.lock() {
            *t = Instant::now();
        }
    }

    /// Says what the running step is doing now (shown by its heartbeat).
    pub fn doing(&self, what: &str) {
        if let Ok(mut d) = self.doing.lock() {
            *d = (what.to_string(), Instant::now());
        }
    }

    /// Starts a heartbeat for a step doing `what`: every [`HEARTBEAT`] without output, a
    /// "still WHAT… N s" line (a progress event with `--json`).
    pub fn heartbeat(&self, what: &str) -> Heartbeat {
        self.doing(what);
        self.printed();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (json, last_line, doing) = (self.json, self.last_line.clone(), self.doing.clone());
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(Duration::from_secs(1))
            {
                let Ok(mut last) = last_line.lock() else {
                    return;
                };
                if last.elapsed() < HEARTBEAT {
                    continue;
                }
                *last = Instant::now();
                let line = match doing.lock() {
                    Ok(d) => still_line(&d.0, d.1.elapsed()),
                    Err(_) => return,
                };
                if json {
                    println!("{}", json!({"event": "progress", "message": line}));
                } else {
                    println!("{line}");
                }
            }
        });
        Heartbeat {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// `[n/total] step ok (1.2s) detail`.
    pub fn step(&self, n: usize, total: usize, rec: &StepRecord) {
        self.printed();
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
        self.printed();
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
        self.printed();
        if self.json {
            println!("{}", json!({"event": "info", "message": msg}));
        } else {
            println!("{msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_lines_say_what_and_how_long() {
        assert_eq!(
            still_line("creating ns1-next", Duration::from_secs(30)),
            "still creating ns1-next… 30 s"
        );
        // Starting and stopping one is quick (the thread wakes when it is dropped).
        let r = Reporter::new(false);
        let t = Instant::now();
        drop(r.heartbeat("testing"));
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
