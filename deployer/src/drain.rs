//! roll-lb's hand-off and drain: point the delegation at the new lbs (hook or operator), then
//! wait until every old lb's query rate stays below a threshold for the quiet period before
//! anything is deleted.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::context::Deployer;
use crate::journal::{Handoff, Journal, Phase};
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
    let client = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .context("cannot build an HTTP client")?;
    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .with_context(|| format!("GET http://{addr}/metrics"))?;
    queries_total(&text).ok_or_else(|| anyhow!("no lb_queries_total in the metrics at {addr}"))
}

/// Sums the `lb_queries_total{...}` samples of a Prometheus text exposition.
fn queries_total(text: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("lb_queries_total") else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
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
    // Recorded at once: from here the delegation points at the new lbs, so nothing may undo
    // them, even if the deployer dies before this step is recorded as done.
    j.handoff = Handoff::Done;
    j.phase = Phase::Forward;
    d.save(j)?;
    Ok(describe_plan(&plan))
}

/// Waits until every old lb's query rate stays below the threshold for the quiet period.
pub fn drain(d: &Deployer, j: &Journal) -> Result<String> {
    let rl = d.cfg.roll_lb.clone();
    let quiet = match rl.quiet_secs {
        Some(q) => Duration::from_secs(q),
        None => {
            let mut ttl = 0;
            for z in &d.cfg.zones.names {
                ttl = ttl.max(
                    zones::delegation_max_ttl(&d.cfg.zone_file(z), z).map_err(|e| anyhow!(e))?,
                );
            }
            Duration::from_secs(ttl)
        }
    };
    let poll = Duration::from_secs_f64(rl.poll_secs.max(0.05));
    let max_wait = Duration::from_secs(rl.max_drain_secs);
    let start = Instant::now();
    struct Watch {
        label: String,
        addr: std::net::SocketAddr,
        last: Option<(f64, Instant)>,
        rate: Option<f64>,
        below_since: Option<Instant>,
    }
    let mut w: Vec<Watch> = j
        .old
        .iter()
        .map(|i| Watch {
            label: i.label.clone(),
            addr: i.metrics_addr(),
            last: None,
            rate: None,
            below_since: None,
        })
        .collect();
    loop {
        let now = Instant::now();
        for x in &mut w {
            match scrape_queries(x.addr, d.cfg.timeouts.ctl()) {
                Ok(total) => {
                    if let Some((prev, t)) = x.last {
                        let dt = now.duration_since(t).as_secs_f64().max(1e-3);
                        x.rate = Some(((total - prev) / dt).max(0.0));
                    }
                    x.last = Some((total, now));
                }
                // Unknown is not quiet: never delete an lb we cannot see.
                Err(_) => x.rate = None,
            }
            match x.rate {
                Some(r) if r <= rl.drain_threshold_qps => {
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
            .map(|x| match x.rate {
                Some(r) => format!(
                    "{} {r:.1} qps (quiet {}s/{}s)",
                    x.label,
                    x.below_since.map_or(0, |b| now.duration_since(b).as_secs()),
                    quiet.as_secs()
                ),
                None => format!("{} rate unknown", x.label),
            })
            .collect::<Vec<_>>()
            .join(", ");
        d.out.progress(&format!("drain: {line}"));
        if drained {
            d.out.progress_end();
            return Ok(format!(
                "old lbs quiet for {}s below {} qps",
                quiet.as_secs(),
                rl.drain_threshold_qps
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_protocol_and_ignores_other_series() {
        let text = "# HELP lb_queries_total q\n# TYPE lb_queries_total counter\nlb_queries_total{proto=\"udp\"} 10\nlb_queries_total{proto=\"tcp\"} 2.5\nlb_queries_total_other 99\n";
        assert_eq!(queries_total(text), Some(12.5));
        assert_eq!(queries_total("lb_answers_total 3\n"), None);
    }

    #[test]
    fn glue_is_the_address_without_the_port() {
        assert_eq!(ip_of("192.0.2.7:53"), "192.0.2.7");
        assert_eq!(ip_of("[2001:db8::7]:53"), "2001:db8::7");
        assert_eq!(ip_of("192.0.2.7"), "192.0.2.7");
    }
}
