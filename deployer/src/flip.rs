//! The lb flip: plan every lb's flip, converge each lb's live backend set to the wanted one,
//! and compare live sets with the plan.
//!
//! Converge, do not trust: every decision starts from the lb's live set (`status`), never from
//! what the journal says was sent. A flip is `planned` (recorded with the exact previous set and
//! the target, for every lb, before anything is sent), then `sent` (recorded *before* the
//! request goes out), then `confirmed` with the generation lb reported. A transport error
//! (lost reply, SSH drop) keeps the record and is resolved by reading the live set again within
//! `ctl_secs`; a refusal (lb answered no) means lb kept its set. The same code flips back, to the
//! exact previous set, with the same confirmation.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::context::Deployer;
use crate::journal::{Direction, FlipState, Journal, LbFlip};
use crate::lbctl::{CtlError, LbControl};
use crate::lifecycle::planned_backends;

/// Why an lb is not (known to be) on the wanted set.
#[derive(Debug, thiserror::Error)]
pub enum FlipError {
    #[error("lb {lb} refused the swap to {}: {reason}", .wanted.join(" "))]
    Refused {
        lb: String,
        wanted: Vec<String>,
        reason: String,
    },
    #[error("lb {lb} applied {} but could not save it (it would come back on its previous set after a restart): {message}", .wanted.join(" "))]
    Unsaved {
        lb: String,
        wanted: Vec<String>,
        message: String,
    },
    #[error("lb {lb}: its live set is unknown ({reason}); the flip stays recorded and is settled by reading the lb's status again")]
    Unknown { lb: String, reason: String },
    #[error("lb {lb} changed since this deployer read it at generation {generation} ({reason}): another deployer or an operator changed its backends meanwhile, and this flip was not applied. Nothing more is sent to it; see `deployer status`")]
    Moved {
        lb: String,
        generation: u64,
        reason: String,
    },
    #[error("lb {lb} did not answer the swap ({reason}) and serves {}, not {}", .live.join(" "), .wanted.join(" "))]
    NotApplied {
        lb: String,
        live: Vec<String>,
        wanted: Vec<String>,
        reason: String,
    },
}

impl FlipError {
    pub fn lb(&self) -> &str {
        match self {
            FlipError::Refused { lb, .. }
            | FlipError::Unsaved { lb, .. }
            | FlipError::Unknown { lb, .. }
            | FlipError::Moved { lb, .. }
            | FlipError::NotApplied { lb, .. } => lb,
        }
    }
}

/// Two backend lists name the same set (order and spelling of addresses aside).
pub fn same_set(a: &[String], b: &[String]) -> bool {
    let norm = |v: &[String]| {
        let mut v: Vec<String> = v
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .map_or_else(|_| s.trim().to_string(), |a| a.to_string())
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    norm(a) == norm(b)
}

/// An lb's live backend addresses and generation, retrying within `timeout` (a restarting lb
/// or a flaky SSH hop is not an answer).
pub fn read_live(ctl: &LbControl, timeout: Duration) -> Result<(Vec<String>, u64), CtlError> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match ctl.status(left.max(Duration::from_secs(1))) {
            Ok(s) => {
                return Ok((
                    s.backends.into_iter().map(|b| b.address).collect(),
                    s.generation,
                ))
            }
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Records the flip of every lb (its live set as `previous`, the nameservers it fronts in this
/// operation as `target`) in one journal write, before any lb is sent anything. Already
/// planned: kept as recorded.
pub fn plan(d: &Deployer, j: &mut Journal) -> Result<()> {
    if !j.flips.is_empty() {
        return Ok(());
    }
    let mut flips = Vec::new();
    for l in &d.cfg.lbs {
        let (_, ctl) = d.lb_control(&l.name)?;
        let (previous, _) = read_live(&ctl, d.cfg.timeouts.ctl())
            .map_err(|e| anyhow::anyhow!("lb {}: cannot read its backends: {e}", l.name))?;
        flips.push(LbFlip {
            lb: l.name.clone(),
            previous,
            target: planned_backends(d, j, &l.name)?,
            direction: Direction::Forward,
            state: FlipState::Planned,
        });
    }
    j.flips = flips;
    d.save(j)
}

/// Points every recorded flip in `direction` (resetting the state of those that change
/// direction) and converges each lb; returns one line per lb, or every lb's error.
pub fn converge_all(
    d: &Deployer,
    j: &mut Journal,
    direction: Direction,
) -> Result<Vec<String>, Vec<FlipError>> {
    let mut changed = false;
    for f in &mut j.flips {
        if f.direction != direction {
            f.direction = direction;
            f.state = FlipState::Planned;
            changed = true;
        }
    }
    if changed {
        if let Err(e) = d.save(j) {
            return Err(vec![FlipError::Unknown {
                lb: "(journal)".into(),
                reason: format!("{e:#}"),
            }]);
        }
    }
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for k in 0..j.flips.len() {
        match converge(d, j, k) {
            Ok(line) => done.push(line),
            Err(e) => {
                errors.push(e);
                // Going forward, one lb that will not take the new set is enough to stop (and
                // undo); going back, every lb is tried so that as many as possible are restored.
                if direction == Direction::Forward {
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(done)
    } else {
        Err(errors)
    }
}

/// Converges the one lb `lb` forward (the canary): the others are not touched.
pub fn converge_lb(d: &Deployer, j: &mut Journal, lb: &str) -> Result<String, FlipError> {
    let unknown = |reason: String| FlipError::Unknown {
        lb: lb.to_string(),
        reason,
    };
    let k = j
        .flips
        .iter()
        .position(|f| f.lb == lb)
        .ok_or_else(|| unknown("no flip is planned for it".into()))?;
    if j.flips[k].direction != Direction::Forward {
        j.flips[k].direction = Direction::Forward;
        j.flips[k].state = FlipState::Planned;
        d.save(j).map_err(|e| unknown(format!("{e:#}")))?;
    }
    converge(d, j, k)
}

/// Converges lb `j.flips[k]` to its wanted set.
fn converge(d: &Deployer, j: &mut Journal, k: usize) -> Result<String, FlipError> {
    let name = j.flips[k].lb.clone();
    let wanted = j.flips[k].wanted().to_vec();
    let forward = j.flips[k].direction == Direction::Forward;
    let timeout = d.cfg.timeouts.ctl();
    let unknown = |reason: String| FlipError::Unknown {
        lb: name.clone(),
        reason,
    };
    let save = |j: &Journal| d.save(j).map_err(|e| unknown(format!("{e:#}")));
    let (_, ctl) = d.lb_control(&name).map_err(|e| unknown(format!("{e:#}")))?;
    let (live, generation) = read_live(&ctl, timeout).map_err(|e| unknown(e.to_string()))?;
    if same_set(&live, &wanted) && j.flips[k].state != FlipState::Unsaved {
        j.flips[k].state = FlipState::Confirmed { generation };
        save(j)?;
        return Ok(format!(
            "{name} on {} (generation {generation})",
            wanted.join(" ")
        ));
    }
    // Recorded before the request: a crash from here on leaves `sent`, which only a read of
    // the live set settles.
    j.flips[k].state = FlipState::Sent;
    save(j)?;
    if forward {
        d.faults.point(&format!("flip:{name}:before-swap"));
    }
    // Verified both ways: lb probes the set before it serves from it, so a flip back to old
    // nameservers that stopped answering is refused (and nothing is deleted) instead of
    // pointing the lb at dead servers. Compare-and-swap on the generation read above: if
    // anyone changed the lb since (a stale deployer, an operator), lb refuses and nothing of
    // theirs is overwritten.
    d.check_lease().map_err(|e| unknown(format!("{e:#}")))?;
    let mut r = ctl.set_backends(&wanted, true, Some(generation), timeout);
    if forward && d.faults.lost_reply(&name) {
        r = Err(CtlError::Transport("the reply was lost (injected)".into()));
    }
    if forward {
        d.faults.point(&format!("flip:{name}:after-swap"));
    }
    match r {
        Ok(done) if done.saved() => {
            j.flips[k].state = FlipState::Confirmed {
                generation: done.generation,
            };
            save(j)?;
            Ok(format!(
                "{name} -> {} (generation {})",
                wanted.join(" "),
                done.generation
            ))
        }
        Ok(done) => {
            j.flips[k].state = FlipState::Unsaved;
            save(j)?;
            Err(FlipError::Unsaved {
                lb: name.clone(),
                wanted,
                message: done.message,
            })
        }
        Err(CtlError::GenerationMoved(reason)) => {
            // Nothing applied: the lb's set is someone else's now.
            j.flips[k].state = FlipState::Planned;
            save(j)?;
            Err(FlipError::Moved {
                lb: name.clone(),
                generation,
                reason,
            })
        }
        Err(CtlError::Refused(reason)) => {
            // lb answered: it kept its set. Nothing of this flip is in force.
            j.flips[k].state = FlipState::Planned;
            save(j)?;
            Err(FlipError::Refused {
                lb: name.clone(),
                wanted,
                reason,
            })
        }
        Err(CtlError::Transport(reason)) => {
            // The swap may or may not have happened: ask the lb, never assume.
            let (live, generation) = read_live(&ctl, timeout)
                .map_err(|e| unknown(format!("{reason}; then status: {e}")))?;
            if same_set(&live, &wanted) {
                j.flips[k].state = FlipState::Confirmed { generation };
                save(j)?;
                Ok(format!(
                    "{name} -> {} (generation {generation}, confirmed by status after: {reason})",
                    wanted.join(" ")
                ))
            } else {
                Err(FlipError::NotApplied {
                    lb: name.clone(),
                    live,
                    wanted,
                    reason,
                })
            }
        }
    }
}

/// Each lb's live set is the one planned for it (its flip's target, or for an operation
/// without flips the nameservers it fronts). Returns one line per lb.
pub fn check_live_sets(d: &Deployer, j: &Journal) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for l in &d.cfg.lbs {
        let want = match j.flips.iter().find(|f| f.lb == l.name) {
            Some(f) => f.target.clone(),
            None => planned_backends(d, j, &l.name)?,
        };
        let (_, ctl) = d.lb_control(&l.name)?;
        let (live, generation) = read_live(&ctl, d.cfg.timeouts.ctl())
            .map_err(|e| anyhow::anyhow!("lb {}: cannot read its backends: {e}", l.name))?;
        if !same_set(&live, &want) {
            anyhow::bail!(
                "lb {} serves from {}, but the plan says {}",
                l.name,
                live.join(" "),
                want.join(" ")
            );
        }
        out.push(format!("{} on the plan (generation {generation})", l.name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_compare_without_order_or_spelling() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(same_set(
            &s(&["127.0.0.1:53", "[::1]:53"]),
            &s(&["[0:0:0:0:0:0:0:1]:53", "127.0.0.1:53"])
        ));
        assert!(!same_set(&s(&["127.0.0.1:53"]), &s(&["127.0.0.1:54"])));
        assert!(!same_set(&s(&["127.0.0.1:53"]), &s(&[])));
    }
}
