//! The rollout engine: runs an operation's typed [`Step`]s, records each in the journal, and
//! on a failure goes the only safe way.
//!
//! Two phases. Before the point of no return ([`Phase::Undoable`]) the old set is complete and
//! serving, so a failure undoes everything ([`undo`]): every lb is converged back to its exact
//! previous set and confirmed, and only then is anything this operation created deleted. The
//! point of no return is entered, and recorded, just before the first old instance is deleted
//! (or when the delegation is handed to the new lbs); from then on ([`Phase::Forward`]) only
//! going forward restores a complete set, so a failure stops and `--resume` finishes.
//!
//! roll-lb's hand-off sits between the two: once the delegation hook has started (or the
//! operator was asked to change the delegation), the delegation may point at the new lbs in
//! part, and only the operator knows. Nothing is undone by itself then
//! ([`crate::journal::Handoff::blocks_undo`]): a failure stops, and `rollback` needs
//! `--delegation-unchanged`.
//!
//! Resume converges before it continues: every lb with a recorded flip is read and brought to
//! the target, whatever the journal says was sent.

use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use crate::canary;
use crate::context::{next_command, Deployer};
use crate::drain::{self, WaitForOperator};
use crate::flip::{self, FlipError};
use crate::journal::{
    CanaryState, Direction, Journal, JournalState, Operation, Phase, Step, StepRecord,
};
use crate::lifecycle;
use crate::provider::Role;

/// Runs one step's work.
fn run_step(d: &Deployer, step: Step, j: &mut Journal) -> Result<String> {
    match step {
        Step::Create => lifecycle::create(d, j, Role::Nameserver, true),
        Step::CreateNameservers => lifecycle::create(d, j, Role::Nameserver, false),
        Step::CreateLbs => lifecycle::create(d, j, Role::Lb, false),
        Step::CreateLbsNext => lifecycle::create(d, j, Role::Lb, true),
        Step::Provision | Step::ProvisionNameservers => {
            lifecycle::provision(d, j, Role::Nameserver)
        }
        Step::ProvisionLbs | Step::ProvisionLbsNext => lifecycle::provision(d, j, Role::Lb),
        Step::Check | Step::CheckNameservers => lifecycle::check_new(d, j, Role::Nameserver),
        Step::CheckLbsNext => lifecycle::check_new_lbs(d, j),
        Step::Flip => {
            flip::plan(d, j)?;
            // The canary first (if any); a worse one fails the step, and the undo flips it back.
            let canary = canary::run(d, j)?;
            let done = flip::converge_all(d, j, Direction::Forward).map_err(flip_errors)?;
            Ok(match canary {
                Some(c) => format!("{c}; then {}", done.join(", ")),
                None => done.join(", "),
            })
        }
        Step::Verify | Step::CheckLbs => verify(d, j),
        Step::DeleteOld => {
            enter_forward_phase(d, j)?;
            lifecycle::delete_old(d, j, step)
        }
        Step::DeleteOldLbs => {
            // The last look before the only lbs the delegation named before go.
            let checked = drain::recheck_new_lbs(d, j)?;
            enter_forward_phase(d, j)?;
            lifecycle::delete_old(d, j, step).map(|done| format!("{checked}; {done}"))
        }
        Step::Rename | Step::RenameLbs => lifecycle::rename(d, j, step),
        Step::Handoff => drain::handoff(d, j),
        Step::Drain => drain::drain(d, j),
        Step::AllowLbsNext | Step::DisallowOldLbs => lifecycle::allow_lbs(d, j, step.name()),
    }
}

/// Every lb serves exactly its planned set (compared with its live set, not the journal) and
/// every zone answers through it with the expected serial and the zone files' content
/// ([`crate::content`]). Runs before anything is deleted.
fn verify(d: &Deployer, j: &Journal) -> Result<String> {
    let mut out = flip::check_live_sets(d, j)?;
    let zones = crate::content::read_zones(&d.cfg).map_err(|e| anyhow!(e))?;
    for l in &d.cfg.lbs {
        let inst = d
            .find(&l.name)?
            .ok_or_else(|| anyhow!("lb {} does not exist", l.name))?;
        crate::checks::check_serving(inst.dns_addr(), &j.serials, d.cfg.timeouts.check())
            .map_err(|e| anyhow!("through lb {}: {e}", l.name))?;
        let what =
            lifecycle::check_content(d, &crate::content::Asker::Direct(inst.dns_addr()), &zones)
                .map_err(|e| anyhow!("through lb {} ({}): {e}", l.name, inst.dns_addr()))?;
        out.push(format!(
            "{} ({}) serves the zones ({what})",
            l.name,
            inst.dns_addr()
        ));
    }
    Ok(out.join(", "))
}

/// Records the point of no return, after checking once more that every lb is on the new set.
fn enter_forward_phase(d: &Deployer, j: &mut Journal) -> Result<()> {
    if j.phase == Phase::Forward {
        return Ok(());
    }
    if !j.flips.is_empty() {
        flip::check_live_sets(d, j)?;
    }
    j.phase = Phase::Forward;
    d.save(j)
}

fn flip_errors(errors: Vec<FlipError>) -> anyhow::Error {
    anyhow!(
        "{}",
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    )
}

/// On resume: converges every lb with a recorded flip to the target before anything else.
///
/// Not while a canary's trial is unfinished: then only the canary may be on the new set, and
/// the flip step runs its trial again. A canary judged worse cannot go forward (the error makes
/// the resume undo the roll).
pub fn reconcile_forward(d: &Deployer, j: &mut Journal) -> Result<()> {
    if j.flips.is_empty() {
        return Ok(());
    }
    if let Some(c) = &j.canary {
        match &c.state {
            CanaryState::Failed { verdict } => bail!(
                "the canary lb {} was judged worse than the lbs on the old set ({verdict}): the roll cannot go forward",
                c.lb
            ),
            CanaryState::Flipping | CanaryState::Soaking { .. } => {
                d.out.info(&format!(
                    "resume: the canary {} had not passed its soak; it soaks again from the start",
                    c.lb
                ));
                return Ok(());
            }
            CanaryState::Passed { .. } => {}
        }
    }
    let done = flip::converge_all(d, j, Direction::Forward).map_err(flip_errors)?;
    d.out.info(&format!(
        "resume: lbs converged to the new set: {}",
        done.join(", ")
    ));
    Ok(())
}

/// Runs the steps of `j` not yet done. A failure before the point of no return undoes the
/// operation; after it, stops and says to resume.
pub fn run_steps(d: &mut Deployer, j: &mut Journal, steps: &[Step]) -> Result<()> {
    let total = steps.len();
    for (k, &step) in steps.iter().enumerate() {
        if j.done(step) {
            continue;
        }
        // A deployer whose lease was taken over stops before its next step.
        d.check_lease()?;
        d.faults.point(&format!("{step}:before"));
        let t = Instant::now();
        // delete-old injects its failure mid-deletion (see `lifecycle::delete_old`).
        let mid_step = matches!(step, Step::DeleteOld | Step::DeleteOldLbs);
        // Long steps say what they are doing at least every `report::HEARTBEAT`.
        let heartbeat = d.out.heartbeat(&format!("in step {step}"));
        let r = if d.faults.fail_at(step) && !mid_step {
            Err(anyhow!(
                "failure injected at step {step} (DEPLOYER_FAIL_AT)"
            ))
        } else {
            run_step(d, step, j)
        };
        drop(heartbeat);
        if let Err(e) = &r {
            if let Some(w) = e.downcast_ref::<WaitForOperator>() {
                // Not finished and not failed: the caller reports it (its own event and exit
                // status), and the journal stays unfinished for `--resume`.
                d.save(j)?;
                d.waiting = Some(w.0.clone());
                return Ok(());
            }
        }
        if r.is_ok() {
            // The work is done and not yet recorded: a crash here re-runs the step on resume.
            d.faults.point(&format!("{step}:after"));
        }
        let rec = StepRecord {
            step,
            ok: r.is_ok(),
            detail: match &r {
                Ok(s) => s.clone(),
                Err(e) => format!("{e:#}"),
            },
            elapsed_ms: t.elapsed().as_millis() as u64,
        };
        d.out.step(k + 1, total, &rec);
        j.steps.push(rec);
        d.save(j)?;
        if let Err(e) = r {
            if j.handoff.blocks_undo() {
                // The delegation hook ran (in part, perhaps): undoing would delete lbs the
                // delegation may already point at. Stop; the operator decides.
                j.error = Some(format!("{e:#}"));
                d.save(j)?;
                return Err(e.context(format!(
                    "step {step} failed during the delegation hand-off; NOT rolled back (the delegation may already point at the new load balancers)"
                )));
            }
            if j.phase == Phase::Undoable {
                return Err(match undo(d, j) {
                    Ok(()) => e.context(format!(
                        "step {step} failed; rolled back: the old set kept serving and nothing created is left"
                    )),
                    Err(u) => e.context(format!("step {step} failed and the rollback stopped: {u:#}")),
                });
            }
            j.error = Some(format!("{e:#}"));
            d.save(j)?;
            return Err(e.context(format!(
                "step {step} failed after the point of no return; fix the cause and run `deployer {} --resume`",
                j.operation.command()
            )));
        }
        if let Some(p) = d.faults.pause_after(step) {
            d.out
                .info(&format!("pausing after {step} (DEPLOYER_PAUSE_AFTER)"));
            std::thread::sleep(p);
        }
    }
    j.state = JournalState::Done;
    j.error = None;
    d.save(j)?;
    if matches!(j.operation, Operation::Up | Operation::Roll) {
        // What the next roll's diff asks the running set about (removed names included).
        let recorded = crate::content::read_zones(&d.cfg)
            .map_err(|e| anyhow!(e))
            .and_then(|z| Ok(crate::content::record_deployed(&d.cfg.state_dir, &z)?));
        if let Err(e) = recorded {
            d.out.info(&format!(
                "warning: the deployed zones could not be recorded ({e:#}); the next roll's diff cannot list removed names"
            ));
        }
    }
    Ok(())
}

/// Undoes an operation that is before its point of no return: every lb back on its exact
/// previous set, confirmed by reading it; then, and only then, everything created is deleted.
///
/// An lb that cannot be confirmed on its previous set (refused, unsaved, unreachable) stops the
/// undo before anything is deleted: deleting the new instances would leave that lb pointing at
/// nothing. The journal stays unfinished so that `deployer rollback` can be run again.
pub fn undo(d: &Deployer, j: &mut Journal) -> Result<()> {
    if j.phase == Phase::Forward || j.handoff.blocks_undo() {
        bail!("{}", next_command(j));
    }
    if !j.flips.is_empty() {
        match flip::converge_all(d, j, Direction::Back) {
            Ok(_) => {
                for f in &j.flips {
                    let generation = match f.state {
                        crate::journal::FlipState::Confirmed { generation } => generation,
                        _ => 0,
                    };
                    d.out.info(&format!(
                        "rollback: lb {} back on {} (generation {generation}, confirmed)",
                        f.lb,
                        f.previous.join(" ")
                    ));
                }
            }
            Err(errors) => {
                let lbs: Vec<&str> = errors.iter().map(|e| e.lb()).collect();
                let msg = format!(
                    "{}. Nothing was deleted: the new instances stay, so no lb is left pointing at a deleted nameserver. Fix lb {} (its control socket, its state file, or the previous nameservers it probes: see `lb ctl status` on it), then run `deployer rollback` again; or run `deployer {} --resume` to go forward instead",
                    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
                    lbs.join(", "),
                    j.operation.command()
                );
                j.error = Some(msg.clone());
                d.save(j)?;
                bail!("{msg}");
            }
        }
    }
    // From the first delete on, `--resume` could only hand lbs an incomplete new set.
    j.phase = Phase::RollingBack;
    d.save(j)?;
    let errors = lifecycle::delete_created(d, j)?;
    if !errors.is_empty() {
        let msg = format!(
            "every lb is back on its previous set, but these could not be deleted: {}; run `deployer rollback` again",
            errors.join("; ")
        );
        j.error = Some(msg.clone());
        d.save(j)?;
        bail!("{msg}");
    }
    // The nameservers were opened to the new lbs: close them again (the lbs are gone, and an
    // address they had may go to someone else). Best effort: the rollback itself is done, and
    // the next roll-lb or roll sets the allow lists from the lbs that exist then.
    if j.operation == crate::journal::Operation::RollLb && j.done(Step::CreateLbsNext) {
        if let Err(e) = lifecycle::allow_lbs(d, j, "rollback-allow-lbs") {
            d.out.info(&format!(
                "rollback: the nameservers still allow the deleted lbs' addresses ({e:#}); the next `deployer roll-lb` or `deployer roll` removes them"
            ));
        }
    }
    j.state = JournalState::RolledBack;
    j.error = None;
    d.save(j)?;
    Ok(())
}
