//! The canary of `roll`: one lb goes to the new nameservers first, serves from them for
//! `[canary] soak_secs`, and is compared with the lbs still on the old set over the same window
//! (its SERVFAIL share, its backend timeouts, its mean backend answer time, from `/metrics`).
//! Only a canary no worse than the others by the configured margins lets the rest be flipped;
//! a worse one fails the flip step, and the engine's undo flips it back and deletes the new
//! nameservers.
//!
//! The trial is journalled ([`CanaryState`]): `flipping` before the canary's flip (which is
//! itself planned/sent/confirmed like every flip), `soaking` once it is confirmed, then
//! `passed` or `failed`. A deployer killed before `passed` has flipped nothing but the canary:
//! `roll --resume` converges the canary again and soaks from the start (a window cut short says
//! nothing), `rollback` flips it back. After `failed` only undoing is possible: `--resume`
//! rolls back. Crash points: `flip:canary:soaking` (confirmed and recorded, before the soak)
//! and `flip:canary:judged` (the verdict recorded, before the rest is flipped or undone).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::config::CanaryConfig;
use crate::context::Deployer;
use crate::journal::{CanaryRecord, CanaryState, Journal};
use crate::lbmetrics::{self, LbSnapshot, Window};

/// How a canary compares with the lbs on the old set.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Passed(String),
    Worse(String),
    /// Too little traffic to tell.
    Inconclusive(String),
}

fn pct(r: f64) -> String {
    format!("{:.2}%", r * 100.0)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |m| format!("{m:.1} ms"))
}

/// Compares the canary's window with the others' (pure: the decision, unit-tested).
pub fn judge(cfg: &CanaryConfig, canary: &Window, others: &Window) -> Verdict {
    let line = format!(
        "{} answers, SERVFAIL {} (others {}), timeouts {} (others {}), mean answer {} (others {}; {} answers)",
        canary.responses,
        pct(canary.servfail_ratio()),
        pct(others.servfail_ratio()),
        pct(canary.timeout_ratio()),
        pct(others.timeout_ratio()),
        ms(canary.mean_answer_ms()),
        ms(others.mean_answer_ms()),
        others.responses
    );
    let min = cfg.min_answers as f64;
    // A canary that sends its backends plenty and answers little is judged (it is failing),
    // not excused for having answered little.
    let canary_busy = canary.responses >= min || canary.backend_queries >= min;
    if others.responses < min || !canary_busy {
        return Verdict::Inconclusive(format!(
            "{line}: fewer than [canary] min_answers = {} answers to compare",
            cfg.min_answers
        ));
    }
    let mut worse = Vec::new();
    let sf = canary.servfail_ratio() - others.servfail_ratio();
    if sf > cfg.max_servfail_ratio_increase {
        worse.push(format!(
            "SERVFAIL share up {} (max_servfail_ratio_increase {})",
            pct(sf),
            cfg.max_servfail_ratio_increase
        ));
    }
    let to = canary.timeout_ratio() - others.timeout_ratio();
    if to > cfg.max_timeout_ratio_increase {
        worse.push(format!(
            "timeout share up {} (max_timeout_ratio_increase {})",
            pct(to),
            cfg.max_timeout_ratio_increase
        ));
    }
    if let (Some(c), Some(o)) = (canary.mean_answer_ms(), others.mean_answer_ms()) {
        if c - o > cfg.max_latency_increase_ms {
            worse.push(format!(
                "mean answer time up {:.1} ms (max_latency_increase_ms {})",
                c - o,
                cfg.max_latency_increase_ms
            ));
        }
    }
    if worse.is_empty() {
        Verdict::Passed(line)
    } else {
        Verdict::Worse(format!("{line}: {}", worse.join(", ")))
    }
}

/// Where each lb of the roll (the canary and the others) serves its metrics, looked up once
/// (a provider's API is not asked at every poll).
fn metrics_addrs(d: &Deployer, lbs: &[String]) -> Result<Vec<SocketAddr>> {
    lbs.iter()
        .map(|name| {
            Ok(d.find(name)?
                .ok_or_else(|| anyhow!("lb {name} does not exist"))?
                .metrics_addr())
        })
        .collect()
}

/// Scrapes every lb of the roll.
fn scrape_all(d: &Deployer, lbs: &[String], addrs: &[SocketAddr]) -> Result<Vec<LbSnapshot>> {
    lbs.iter()
        .zip(addrs)
        .map(|(name, addr)| {
            lbmetrics::scrape(*addr, d.cfg.timeouts.ctl())
                .map_err(|e| anyhow!("lb {name}: {e} (the canary is judged from the lbs' metrics)"))
        })
        .collect()
}

/// The canary's and the others' windows between two scrapes of every lb.
fn windows(
    j: &Journal,
    lbs: &[String],
    canary: &str,
    a: &[LbSnapshot],
    b: &[LbSnapshot],
) -> (Window, Window) {
    let mut c = Window::default();
    let mut o = Window::default();
    for (k, name) in lbs.iter().enumerate() {
        let Some(f) = j.flips.iter().find(|f| &f.lb == name) else {
            continue;
        };
        if name == canary {
            c = b[k].window(&a[k], &f.target);
        } else {
            o.add(&b[k].window(&a[k], &f.previous));
        }
    }
    (c, o)
}

fn record(d: &Deployer, j: &mut Journal, lb: &str, state: CanaryState) -> Result<()> {
    j.canary = Some(CanaryRecord {
        lb: lb.to_string(),
        state,
    });
    d.save(j)
}

/// Runs the canary's trial if the roll has one and it has not passed yet: flips the canary,
/// soaks, judges. `Ok(Some(line))` when it passed now, `Ok(None)` without a canary (or when it
/// passed before a resume); an error when it is worse, inconclusive, or could not be flipped or
/// measured (the engine then undoes the roll).
pub fn run(d: &Deployer, j: &mut Journal) -> Result<Option<String>> {
    if let Some(CanaryRecord { lb, state }) = &j.canary {
        match state {
            CanaryState::Passed { .. } => return Ok(None),
            CanaryState::Failed { verdict } => {
                bail!("the canary lb {lb} was judged worse than the lbs on the old set: {verdict}")
            }
            CanaryState::Flipping | CanaryState::Soaking { .. } => {}
        }
    }
    let canary = match (&j.canary, d.cfg.canary_lb()) {
        // A trial begun before a resume goes on with the same lb.
        (Some(r), _) => r.lb.clone(),
        (None, Some(lb)) => lb.to_string(),
        (None, None) => {
            if d.cfg.canary.soak_secs > 0 && d.cfg.lbs.len() < 2 {
                d.out.info("canary: one lb only, nothing on the old set to compare it with: flipping it directly");
            }
            return Ok(None);
        }
    };
    let cfg = d.cfg.canary.clone();
    let soak = Duration::from_secs(cfg.soak_secs.max(1));
    record(d, j, &canary, CanaryState::Flipping)?;
    let others: Vec<String> = j
        .flips
        .iter()
        .map(|f| f.lb.clone())
        .filter(|l| *l != canary)
        .collect();
    d.out.info(&format!(
        "canary: flipping {canary} first; it soaks {}s against {} (still on the old set)",
        soak.as_secs(),
        others.join(", ")
    ));
    let line = crate::flip::converge_lb(d, j, &canary).map_err(|e| anyhow!("canary: {e}"))?;
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    record(d, j, &canary, CanaryState::Soaking { since_unix })?;
    d.faults.point("flip:canary:soaking");
    let lbs: Vec<String> = std::iter::once(canary.clone()).chain(others).collect();
    let addrs = metrics_addrs(d, &lbs)?;
    let start_snap = scrape_all(d, &lbs, &addrs)?;
    let start = Instant::now();
    let poll = Duration::from_secs(5).min(soak);
    let verdict = loop {
        std::thread::sleep(
            poll.min(soak.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(50)),
        );
        let now = scrape_all(d, &lbs, &addrs)?;
        let (c, o) = windows(j, &lbs, &canary, &start_snap, &now);
        let v = judge(&cfg, &c, &o);
        let done = start.elapsed() >= soak;
        d.out.progress(&format!(
            "canary {canary}: soaking {}s/{}s: {}",
            start.elapsed().as_secs(),
            soak.as_secs(),
            match &v {
                Verdict::Passed(l) | Verdict::Worse(l) | Verdict::Inconclusive(l) => l,
            }
        ));
        // Clearly worse with enough traffic: stop at once, the soak is for finding this.
        let enough = c.responses.max(c.backend_queries) >= cfg.min_answers as f64;
        if done || (enough && matches!(v, Verdict::Worse(_))) {
            break v;
        }
    };
    d.out.progress_end();
    let (state, result) = match verdict {
        Verdict::Passed(l) => (
            CanaryState::Passed { verdict: l.clone() },
            Ok(Some(format!("canary {line} passed a {}s soak: {l}", soak.as_secs()))),
        ),
        Verdict::Worse(l) => (
            CanaryState::Failed { verdict: l.clone() },
            Err(anyhow!(
                "the canary lb {canary} is worse than the lbs on the old set after {}s on the new nameservers: {l}",
                start.elapsed().as_secs()
            )),
        ),
        Verdict::Inconclusive(l) => (
            CanaryState::Failed { verdict: l.clone() },
            Err(anyhow!(
                "the canary lb {canary} could not be judged after {}s: {l}. Roll when the lbs carry traffic, raise [canary] soak_secs, lower [canary] min_answers, or set [canary] soak_secs = 0 to flip every lb at once",
                soak.as_secs()
            )),
        ),
    };
    record(d, j, &canary, state)?;
    d.faults.point("flip:canary:judged");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(responses: f64, servfail: f64, queries: f64, timeouts: f64, ms: f64) -> Window {
        Window {
            responses,
            servfail,
            backend_queries: queries,
            timeouts,
            answered: queries - timeouts,
            answer_secs: (queries - timeouts) * ms / 1000.0,
        }
    }

    #[test]
    fn a_canary_is_judged_by_each_margin() {
        let cfg = CanaryConfig::default();
        let base = w(1000.0, 0.0, 1000.0, 0.0, 1.0);
        assert!(matches!(
            judge(&cfg, &w(1000.0, 5.0, 1000.0, 5.0, 2.0), &base),
            Verdict::Passed(_)
        ));
        let v = judge(&cfg, &w(1000.0, 50.0, 1000.0, 0.0, 1.0), &base);
        assert!(
            matches!(&v, Verdict::Worse(l) if l.contains("SERVFAIL share up 5.00%")),
            "{v:?}"
        );
        let v = judge(&cfg, &w(1000.0, 0.0, 1000.0, 300.0, 1.0), &base);
        assert!(
            matches!(&v, Verdict::Worse(l) if l.contains("timeout share")),
            "{v:?}"
        );
        let v = judge(&cfg, &w(1000.0, 0.0, 1000.0, 0.0, 80.0), &base);
        assert!(
            matches!(&v, Verdict::Worse(l) if l.contains("mean answer time up 79.0 ms")),
            "{v:?}"
        );
        // Too little traffic on either side: no verdict...
        assert!(matches!(
            judge(&cfg, &w(10.0, 0.0, 10.0, 0.0, 1.0), &base),
            Verdict::Inconclusive(_)
        ));
        assert!(matches!(
            judge(&cfg, &base, &w(10.0, 0.0, 10.0, 0.0, 1.0)),
            Verdict::Inconclusive(_)
        ));
        // ...unless the canary sent its backends plenty and answered almost nothing.
        assert!(matches!(
            judge(&cfg, &w(5.0, 0.0, 500.0, 495.0, 1.0), &base),
            Verdict::Worse(_)
        ));
        // min_answers = 0 judges whatever came.
        let any = CanaryConfig {
            min_answers: 0,
            ..CanaryConfig::default()
        };
        assert!(matches!(
            judge(&any, &Window::default(), &Window::default()),
            Verdict::Passed(_)
        ));
    }
}
