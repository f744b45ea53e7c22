//! roll-lb's hand-off and drain: measure each old lb's query rate, point the delegation at the
//! new lbs (hook or operator), check at every parent server that it names the new lbs and none
//! of the old ([`crate::delegation`]), then wait until every old lb's query rate stays below
//! its threshold for the quiet period; right before the old lbs are deleted, check once more
//! that every new lb serves ([`recheck_new_lbs`]).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::context::Deployer;
use crate::delegation::{self, DelegationError, Expected};
use crate::journal::{Handoff, Journal, LbRate, Phase};
use crate::lbmetrics;
use crate::provider::Role;
use crate::zones;

/// A step that stops the run without failing it: the operator has to act, then resume.
#[derive(Debug)]
pub struct WaitForOperator(pub String);

impl std::fmt::Display for WaitForOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WaitForOperator {}

/// Sum of `lb_queries_total` (all protocols) from an lb's `/metrics`.
pub fn scrape_queries(addr: std::net::SocketAddr, timeout: Duration) -> Result<f64> {
    Ok(lbmetrics::scrape(addr, timeout)?.queries)
}

/// Measures each old lb's query rate over `[roll_lb] baseline_secs`, before the hand-off, and
/// records it (once: a resumed hand-off keeps the rates measured before the first attempt,
/// when the traffic may already have begun to move).
fn measure_rates(d: &Deployer, j: &mut Journal) -> Result<()> {
    if !j.handoff_rates.is_empty() {
        return Ok(());
    }
    let window = Duration::from_secs_f64(d.cfg.roll_lb.baseline_secs.max(0.2));
    let timeout = d.cfg.timeouts.ctl();
    let scrape_all = || -> Result<Vec<(f64, Option<f64>)>> {
        j.old
            .iter()
            .map(|i| {
                let s = lbmetrics::scrape(i.metrics_addr(), timeout).with_context(|| {
                    format!(
                        "old lb {}: its query rate before the hand-off cannot be read (the drain needs its metrics)",
                        i.label
                    )
                })?;
                Ok((s.queries, s.start_time))
            })
            .collect()
    };
    d.out.info(&format!(
        "hand-off: measuring the old lbs' query rates for {:.0}s first",
        window.as_secs_f64()
    ));
    let t0 = Instant::now();
    let before = scrape_all()?;
    std::thread::sleep(window);
    let after = scrape_all()?;
    let dt = t0.elapsed().as_secs_f64().max(1e-3);
    let mut rates = Vec::new();
    for ((i, (q0, s0)), (q1, s1)) in j.old.iter().zip(&before).zip(&after) {
        if q1 < q0 || s0 != s1 {
            bail!(
                "old lb {} restarted while its query rate was measured; run `deployer roll-lb --resume` to measure again",
                i.label
            );
        }
        rates.push(LbRate {
            lb: i.label.clone(),
            qps: (q1 - q0) / dt,
        });
    }
    d.out.info(&format!(
        "hand-off: old lbs' query rates: {}",
        rates
            .iter()
            .map(|r| format!("{} {:.1} qps", r.lb, r.qps))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    j.handoff_rates = rates;
    d.save(j)
}

/// The hand-off as the parent servers must show it: per lb, its old and new address.
fn expected(plan: &[(String, String, String)]) -> Vec<Expected> {
    plan.iter()
        .filter_map(|(n, o, w)| {
            Some(Expected {
                lb: n.clone(),
                old: ip_of(o).parse().ok()?,
                new: ip_of(w).parse().ok()?,
            })
        })
        .collect()
}

/// Waits (up to `delegation_wait_secs`) until every parent server of every zone names the new
/// lbs and none of the old; records the longest NS/glue TTL seen. Returns a line for the step.
fn check_delegation(
    d: &Deployer,
    j: &mut Journal,
    plan: &[(String, String, String)],
) -> Result<String, DelegationError> {
    let rl = &d.cfg.roll_lb;
    if !rl.check_delegation {
        return Ok("delegation not checked at the parent (check_delegation = false)".into());
    }
    let parents = rl
        .parent_addrs()
        .map_err(|e| DelegationError::CannotCheck(format!("roll_lb.parent_servers {e}")))?;
    let seen = delegation::wait_for(
        &d.cfg.zones.names,
        parents.as_deref(),
        &expected(plan),
        Duration::from_secs(rl.delegation_wait_secs),
        Duration::from_secs_f64(rl.poll_secs.max(0.05)),
        |t, e| {
            d.out.progress(&format!(
                "hand-off: waiting for the parent servers ({}s/{}s): {e}",
                t.as_secs(),
                rl.delegation_wait_secs
            ))
        },
    );
    d.out.progress_end();
    let seen = seen?;
    let ttl = seen.iter().map(|s| s.ttl).max().unwrap_or(0);
    j.delegation_ttl = Some(ttl);
    let servers: BTreeSet<String> = seen.iter().map(|s| s.server.to_string()).collect();
    Ok(format!(
        "the parent servers ({}) name the new lbs and none of the old (NS/glue TTL up to {ttl}s)",
        servers.into_iter().collect::<Vec<_>>().join(", ")
    ))
}

/// What to tell the hook's owner or the operator when the delegation check did not pass.
fn delegation_advice(e: &DelegationError) -> &'static str {
    match e {
        DelegationError::Wrong(_) => "",
        DelegationError::CannotCheck(_) => {
            " The check could not run: list the parent zone's servers in [roll_lb] parent_servers (\"IP\" or \"IP:PORT\"), or make /etc/resolv.conf name a resolver that finds them; `check_delegation = false` skips the check (then nothing but the drain stands between a wrong delegation and deleting the only lbs it names)."
        }
    }
}

/// `roll-lb --resume` after the operator was asked to change the delegation: the parent
/// servers must agree before the hand-off counts as done. Until they do, the operation keeps
/// waiting for the operator ([`WaitForOperator`]), saying what is still wrong.
pub fn confirm_operator_handoff(d: &Deployer, j: &mut Journal) -> Result<()> {
    let plan = handoff_plan(d, j);
    let line = match check_delegation(d, j, &plan) {
        Ok(line) => line,
        Err(e @ DelegationError::Wrong(_)) => {
            let mut msg = format!(
                "the delegation does not point at the new load balancers only yet: {e}.\nChange it at your registrar (NS glue addresses):\n"
            );
            for (name, old, new) in &plan {
                msg.push_str(&format!("  {name}: replace {} by {}\n", ip_of(old), ip_of(new)));
            }
            msg.push_str("then run `deployer roll-lb --resume` again (nothing was deleted). If you decide not to change it, `deployer rollback --delegation-unchanged` deletes the new load balancers");
            return Err(WaitForOperator(msg).into());
        }
        Err(e) => bail!(
            "cannot check the delegation at the parent: {e}.{} Nothing was deleted; run `deployer roll-lb --resume` again",
            delegation_advice(&e)
        ),
    };
    d.out.info(&format!(
        "hand-off confirmed by the operator (--resume): {line}"
    ));
    j.handoff = Handoff::Done;
    j.phase = Phase::Forward;
    j.steps.push(crate::journal::StepRecord {
        step: crate::journal::Step::Handoff,
        ok: true,
        detail: format!("confirmed by the operator (--resume); {line}"),
        elapsed_ms: 0,
    });
    d.save(j)
}

/// What has to change at the registrar: per lb, its name, old and new address.
pub fn handoff_plan(d: &Deployer, j: &Journal) -> Vec<(String, String, String)> {
    d.cfg
        .lbs
        .iter()
        .filter_map(|l| {
            let old = j.old.iter().find(|i| i.label == l.name)?;
            let new = j
                .created
                .iter()
                .find(|i| i.label == format!("{}-next", l.name))?;
            Some((
                l.name.clone(),
                old.dns_addr().to_string(),
                new.dns_addr().to_string(),
            ))
        })
        .collect()
}

/// The address part of `IP:PORT` or `[IPv6]:PORT` (glue is an address, without the port).
pub fn ip_of(addr: &str) -> String {
    addr.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| addr.to_string())
}

/// `lb1 OLD -> NEW, lb2 ...`: the hand-off in one line, for messages.
pub fn describe_plan(plan: &[(String, String, String)]) -> String {
    plan.iter()
        .map(|(n, o, w)| format!("{n}: {o} -> {w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Points the delegation at the new lbs: through the hook, or by the operator. Success moves
/// the operation past the point of no return.
///
/// The hand-off is recorded as started before the hook runs: from its first moment part of the
/// delegation may point at the new lbs, so from then on nothing deletes them by itself. A hook
/// that fails or times out (or a deployer killed while it runs) leaves the operation stopped,
/// neither undone nor finished; `roll-lb --resume` runs the hook again (hooks must be
/// idempotent: they set the delegation to the addresses they are given), and only
/// `rollback --delegation-unchanged`, the operator's word that the delegation still points at
/// the old lbs alone, undoes it.
pub fn handoff(d: &Deployer, j: &mut Journal) -> Result<String> {
    let plan = handoff_plan(d, j);
    // Every lb must have its old and its new instance: a rollback that stopped half way (some
    // `-next` lbs deleted) must not hand the delegation to what is left of the new set.
    if plan.len() != d.cfg.lbs.len() {
        let missing: Vec<&str> = d
            .cfg
            .lbs
            .iter()
            .map(|l| l.name.as_str())
            .filter(|n| !plan.iter().any(|p| p.0 == *n))
            .collect();
        bail!(
            "hand-off refused: lb {} has no old or no new instance in this deployment (a rollback that stopped half way deletes new lbs); finish it with `deployer rollback`",
            missing.join(", ")
        );
    }
    let zones: Vec<&str> = d.cfg.zones.names.iter().map(|z| z.as_str()).collect();
    // Before anything may move: the drain judges each old lb against its own rate now.
    measure_rates(d, j)?;
    let Some(hook) = d.cfg.roll_lb.delegation_hook.clone() else {
        j.handoff = Handoff::WaitingForOperator;
        d.save(j)?;
        let mut msg = format!(
            "hand-off: change the delegation at your registrar (NS glue addresses) for the zones {}:\n",
            zones.join(", ")
        );
        for (name, old, new) in &plan {
            msg.push_str(&format!(
                "  {name}: replace {} by {}\n",
                ip_of(old),
                ip_of(new)
            ));
        }
        msg.push_str("then run `deployer roll-lb --resume` (the old load balancers keep serving until they drain). If you decide not to change it, `deployer rollback --delegation-unchanged` deletes the new load balancers");
        return Err(WaitForOperator(msg).into());
    };
    let input = json!({
        "deployment": d.cfg.deployment,
        "zones": zones,
        // Glue is an address, not an address and port: `old_ip`/`new_ip` are what a registrar
        // takes; `*_address` (with the DNS port) stay for hooks written against them.
        "lbs": plan.iter().map(|(n, o, w)| json!({
            "name": n,
            "old_address": o,
            "new_address": w,
            "old_ip": ip_of(o),
            "new_ip": ip_of(w),
        })).collect::<Vec<_>>(),
    });
    let before = j.handoff;
    j.handoff = Handoff::Started;
    d.save(j)?;
    d.faults.point("handoff:started");
    let mut cmd = std::process::Command::new(&hook);
    // Only what operators need: never the deployer's LINODE_TOKEN unless `hook_env` lists it.
    crate::children::restrict_env(
        &mut cmd,
        crate::children::ChildEnv::Hook(&d.cfg.roll_lb.hook_env),
    );
    cmd.args(plan.iter().map(|p| ip_of(&p.2)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut child = match crate::children::spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            // It never ran this time; an earlier run (a resume) may still have changed the
            // delegation, so the state goes back to what it was, never further.
            j.handoff = before;
            d.save(j)?;
            return Err(anyhow!(e).context(format!("cannot run delegation_hook {hook}")));
        }
    };
    if let Some(mut stdin) = child.child.stdin.take() {
        // From a thread: a hook that never reads a large input must not block the deployer
        // past the deadline below (killing the hook ends the write with EPIPE).
        let input = input.to_string();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(input.as_bytes());
        });
    }
    d.faults.point("handoff:hook-running");
    d.out.doing(&format!("waiting for delegation_hook {hook}"));
    let timeout = d.cfg.timeouts.provision();
    let outcome = match child.wait_deadline(timeout, crate::children::GRACE) {
        Ok(Some(st)) if st.success() => None,
        Ok(Some(st)) => Some(format!("delegation_hook {hook} failed ({st})")),
        Ok(None) => Some(format!(
            "delegation_hook {hook} did not finish within {}s (timeouts.provision_secs) and was stopped",
            timeout.as_secs()
        )),
        Err(e) => Some(format!("delegation_hook {hook}: cannot wait for it: {e}")),
    };
    drop(child);
    if let Some(what) = outcome {
        bail!(
            "{what}. It may have changed part of the delegation, so nothing was undone: the new load balancers stay and the old ones keep serving ({}). Check the delegation (NS and glue) of {} at the registrar, then either point it at the new load balancers (fix the hook, then `deployer roll-lb --resume` runs it again), or make sure it points at the old ones only and run `deployer rollback --delegation-unchanged`",
            describe_plan(&plan),
            zones.join(", ")
        );
    }
    // The hook says it is done; the parent servers say whether it is. Until they agree the
    // hand-off stays `started`: nothing is undone by itself, and `--resume` runs the hook again.
    let checked = check_delegation(d, j, &plan).map_err(|e| {
        anyhow!(
            "delegation_hook {hook} exited 0, but {}: {e}.{} Nothing was deleted and the old load balancers keep serving. Fix the hook (or the delegation at the registrar), then `deployer roll-lb --resume` runs it and checks again; or, if the delegation still points at the old load balancers only, `deployer rollback --delegation-unchanged`",
            match e {
                DelegationError::Wrong(_) => "the parent servers do not show the new load balancers only",
                DelegationError::CannotCheck(_) => "the delegation could not be checked at the parent",
            },
            delegation_advice(&e)
        )
    })?;
    // Recorded at once: from here the delegation points at the new lbs, so nothing may undo
    // them, even if the deployer dies before this step is recorded as done.
    j.handoff = Handoff::Done;
    j.phase = Phase::Forward;
    d.save(j)?;
    Ok(format!("{}; {checked}", describe_plan(&plan)))
}

/// The quiet period: `quiet_secs` (default: the longest NS/glue TTL in the zone files), never
/// shorter than the longest NS/glue TTL the parent servers gave.
fn quiet_period(d: &Deployer, j: &Journal) -> Result<(Duration, String)> {
    let child = match d.cfg.roll_lb.quiet_secs {
        Some(q) => (q, "quiet_secs"),
        None => {
            let mut ttl = 0;
            for z in &d.cfg.zones.names {
                ttl = ttl.max(
                    zones::delegation_max_ttl(&d.cfg.zone_file(z), z).map_err(|e| anyhow!(e))?,
                );
            }
            (ttl, "the zones' NS/glue TTL")
        }
    };
    Ok(match j.delegation_ttl {
        Some(p) if p > child.0 => (
            Duration::from_secs(p),
            format!(
                "the parent's NS/glue TTL, longer than {} ({}s)",
                child.1, child.0
            ),
        ),
        _ => (Duration::from_secs(child.0), child.1.to_string()),
    })
}

/// The rate at or below which old lb `label` counts as drained: `drain_threshold_qps`, or
/// `drain_ratio` of its rate before the hand-off if that is lower.
pub fn drained_below(threshold_qps: f64, ratio: f64, before: Option<f64>) -> f64 {
    match before {
        Some(b) => threshold_qps.min(ratio * b),
        None => threshold_qps,
    }
}

/// Waits until every old lb's query rate stays at or below its threshold for the quiet period.
///
/// An lb whose metrics cannot be read, or that restarted (its `lb_queries_total` went down, or
/// its process start time changed), is not quiet: its quiet time starts again, since whatever
/// it received before the restart is not in the counter any more.
pub fn drain(d: &Deployer, j: &Journal) -> Result<String> {
    let rl = d.cfg.roll_lb.clone();
    let (quiet, quiet_why) = quiet_period(d, j)?;
    let poll = Duration::from_secs_f64(rl.poll_secs.max(0.05));
    let max_wait = Duration::from_secs(rl.max_drain_secs);
    let start = Instant::now();
    struct Watch {
        label: String,
        addr: std::net::SocketAddr,
        threshold: f64,
        last: Option<(f64, Option<f64>, Instant)>,
        rate: Option<f64>,
        restarts: u32,
        below_since: Option<Instant>,
    }
    let mut w: Vec<Watch> = j
        .old
        .iter()
        .map(|i| {
            let before = j
                .handoff_rates
                .iter()
                .find(|r| r.lb == i.label)
                .map(|r| r.qps);
            Watch {
                label: i.label.clone(),
                addr: i.metrics_addr(),
                threshold: drained_below(rl.drain_threshold_qps, rl.drain_ratio, before),
                last: None,
                rate: None,
                restarts: 0,
                below_since: None,
            }
        })
        .collect();
    d.out.info(&format!(
        "drain: quiet period {}s ({quiet_why}); thresholds {}",
        quiet.as_secs(),
        w.iter()
            .map(|x| format!("{} {:.3} qps", x.label, x.threshold))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    loop {
        let now = Instant::now();
        for x in &mut w {
            match lbmetrics::scrape(x.addr, d.cfg.timeouts.ctl()) {
                Ok(s) => {
                    let restarted = x.last.is_some_and(|(prev, started, _)| {
                        s.queries < prev || (started.is_some() && started != s.start_time)
                    });
                    if restarted {
                        x.restarts += 1;
                        x.rate = None;
                    } else if let Some((prev, _, t)) = x.last {
                        let dt = now.duration_since(t).as_secs_f64().max(1e-3);
                        x.rate = Some(((s.queries - prev) / dt).max(0.0));
                    }
                    x.last = Some((s.queries, s.start_time, now));
                }
                // Unknown is not quiet: never delete an lb we cannot see.
                Err(_) => {
                    x.rate = None;
                    x.last = None;
                }
            }
            match x.rate {
                Some(r) if r <= x.threshold => {
                    x.below_since.get_or_insert(now);
                }
                _ => x.below_since = None,
            }
        }
        let drained = w.iter().all(|x| {
            x.below_since
                .is_some_and(|b| now.duration_since(b) >= quiet)
        });
        let line = w
            .iter()
            .map(|x| {
                let restarted = if x.restarts > 0 {
                    format!(", restarted {}x", x.restarts)
                } else {
                    String::new()
                };
                match x.rate {
                    Some(r) => format!(
                        "{} {r:.1} qps (<= {:.3}; quiet {}s/{}s{restarted})",
                        x.label,
                        x.threshold,
                        x.below_since.map_or(0, |b| now.duration_since(b).as_secs()),
                        quiet.as_secs()
                    ),
                    None => format!("{} rate unknown{restarted}", x.label),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        d.out
            .progress(&format!("drain: {line} ({}s)", start.elapsed().as_secs()));
        if drained {
            d.out.progress_end();
            return Ok(format!(
                "old lbs quiet for {}s ({quiet_why}): {line}",
                quiet.as_secs(),
            ));
        }
        if start.elapsed() >= max_wait {
            d.out.progress_end();
            bail!(
                "the old lbs did not drain within {}s ({line}); they were NOT deleted: an lb that still receives traffic is never deleted. Run `deployer roll-lb --resume` to keep waiting",
                max_wait.as_secs()
            );
        }
        std::thread::sleep(poll);
    }
}

/// Right before the old lbs are deleted: every new lb answers, through itself, every zone's
/// SOA with the expected serial and a small sample of names from the zone files.
pub fn recheck_new_lbs(d: &Deployer, j: &Journal) -> Result<String> {
    let lbs: Vec<_> = j.created.iter().filter(|i| i.role == Role::Lb).collect();
    if lbs.is_empty() {
        bail!("no new lb is recorded in this operation: nothing would be left serving");
    }
    let mut samples = Vec::new();
    for z in &d.cfg.zones.names {
        samples.extend(
            zones::sample_names(&d.cfg.zone_file(z), z, RECHECK_NAMES).map_err(|e| anyhow!(e))?,
        );
    }
    for i in &lbs {
        crate::checks::check_serving(i.dns_addr(), &j.serials, d.cfg.timeouts.check()).map_err(
            |e| {
                anyhow!(
                    "new lb {} before the old lbs are deleted: {e}; nothing was deleted",
                    i.label
                )
            },
        )?;
        for (name, rtype) in &samples {
            let m = crate::dns::query(i.dns_addr(), name, *rtype, false, delegation::QUERY_TIMEOUT)
                .map_err(|e| anyhow!("new lb {} before the old lbs are deleted: {name} {rtype}: {e}; nothing was deleted", i.label))?;
            let rcode = m.metadata.response_code;
            if rcode != hickory_proto::op::ResponseCode::NoError || m.answers.is_empty() {
                bail!(
                    "new lb {} ({}) before the old lbs are deleted: {name} {rtype} answers {rcode} with {} records, but the zone file has it; nothing was deleted",
                    i.label,
                    i.dns_addr(),
                    m.answers.len()
                );
            }
        }
    }
    Ok(format!(
        "{} serve the serials and {} sample names",
        lbs.iter()
            .map(|i| i.label.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        samples.len()
    ))
}

/// How many names of each zone [`recheck_new_lbs`] asks for.
pub const RECHECK_NAMES: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_relative_to_the_rate_before() {
        // 200 qps before: 1% is 2 qps, above the absolute 1 qps.
        assert_eq!(drained_below(1.0, 0.01, Some(200.0)), 1.0);
        // 20 qps before: 0.2 qps, though 0.5 qps is below the absolute threshold.
        assert!((drained_below(1.0, 0.01, Some(20.0)) - 0.2).abs() < 1e-12);
        // Idle before: only silence is drained. Unknown before: the absolute threshold.
        assert_eq!(drained_below(1.0, 0.01, Some(0.0)), 0.0);
        assert_eq!(drained_below(1.0, 0.01, None), 1.0);
    }

    #[test]
    fn glue_is_the_address_without_the_port() {
        assert_eq!(ip_of("192.0.2.7:53"), "192.0.2.7");
        assert_eq!(ip_of("[2001:db8::7]:53"), "2001:db8::7");
        assert_eq!(ip_of("192.0.2.7"), "192.0.2.7");
    }
}
