//! The orchestration: `up`, `roll` (the seed's seven steps), `rollback`, `status`, `down`.
//!
//! Every step is recorded in the [`Journal`] before the deployer moves on. A failure in steps
//! 1-5 rolls back at once (flip flipped lbs back, delete what was created) with the old set
//! serving throughout. Once old instances are being deleted (step 6) a roll can only go
//! forward: `roll --resume` finishes it.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::ansible;
use crate::checks::check_serving;
use crate::config::{DeployerConfig, ProviderKind};
use crate::journal::{Flip, Journal, JournalFile, JournalState, Operation, StepRecord};
use crate::provider::linode::{LinodeClient, LinodeProvider};
use crate::provider::local::LocalProvider;
use crate::provider::{Instance, InstanceSpec, Provider, Role};
use crate::zones;

/// The roll's steps, in order (the seed's numbered list).
pub const ROLL_STEPS: [&str; 7] = [
    "create",
    "provision",
    "check",
    "flip",
    "verify",
    "delete-old",
    "rename",
];
/// The steps of `roll-lb` (the seed's second list).
pub const ROLL_LB_STEPS: [&str; 7] = [
    "create-lbs-next",
    "provision-lbs-next",
    "check-lbs-next",
    "handoff",
    "drain",
    "delete-old-lbs",
    "rename-lbs",
];

/// A step that stops the run without failing it: the operator has to act, then resume.
#[derive(Debug)]
struct WaitForOperator(String);

impl std::fmt::Display for WaitForOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WaitForOperator {}

/// The steps of `up`.
pub const UP_STEPS: [&str; 6] = [
    "create-nameservers",
    "provision-nameservers",
    "check-nameservers",
    "create-lbs",
    "provision-lbs",
    "check-lbs",
];

/// Human or JSON progress output, one line per step with elapsed time.
pub struct Reporter {
    pub json: bool,
    /// When the last progress line went out (progress to a pipe is throttled).
    last_progress: std::cell::Cell<Option<Instant>>,
}

impl Reporter {
    fn step(&self, n: usize, total: usize, rec: &StepRecord) {
        if self.json {
            println!(
                "{}",
                json!({"event": "step", "n": n, "of": total, "step": rec.step, "ok": rec.ok,
                       "detail": rec.detail, "elapsed_ms": rec.elapsed_ms})
            );
        } else {
            println!(
                "[{n}/{total}] {:<22} {} ({:.1}s) {}",
                rec.step,
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

/// Test hooks from the environment: `DEPLOYER_FAIL_AT=STEP` fails that step before it runs;
/// `DEPLOYER_PAUSE_AFTER=STEP` sleeps after the step is recorded (so a test can kill -9).
#[derive(Debug, Default, Clone)]
struct Hooks {
    fail_at: Option<String>,
    pause_after: Option<String>,
}

impl Hooks {
    fn from_env() -> Hooks {
        Hooks {
            fail_at: std::env::var("DEPLOYER_FAIL_AT").ok(),
            pause_after: std::env::var("DEPLOYER_PAUSE_AFTER").ok(),
        }
    }
}

/// One deployment, as configured.
pub struct Deployer {
    pub cfg: DeployerConfig,
    provider: Box<dyn Provider>,
    journal: JournalFile,
    pub out: Reporter,
    hooks: Hooks,
    /// Set when the last operation stopped to wait for the operator (not finished, not failed).
    pub waiting: bool,
}

fn elapsed_ms(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

impl Deployer {
    pub fn new(cfg: DeployerConfig, json: bool) -> Result<Deployer> {
        let provider: Box<dyn Provider> = match cfg.provider.kind {
            ProviderKind::Local => Box::new(LocalProvider::new(&cfg.state_dir, &cfg.lb_binary)),
            ProviderKind::Linode => {
                let l = cfg
                    .linode
                    .clone()
                    .ok_or_else(|| anyhow!("[linode] section missing"))?;
                let client = LinodeClient::from_env(&l.api_url, cfg.timeouts.api())?;
                Box::new(LinodeProvider::new(client, l, cfg.tag(), &cfg.state_dir))
            }
        };
        std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
            format!("cannot create state directory {}", cfg.state_dir.display())
        })?;
        Ok(Deployer {
            journal: JournalFile::new(&cfg.state_dir),
            cfg,
            provider,
            out: Reporter {
                json,
                last_progress: std::cell::Cell::new(None),
            },
            hooks: Hooks::from_env(),
            waiting: false,
        })
    }

    /// Expected serial of every zone, from the zone files.
    fn serials(&self) -> Result<Vec<(String, u32)>> {
        self.cfg
            .zones
            .names
            .iter()
            .map(|z| {
                let s = zones::soa_serial(&self.cfg.zone_file(z)).map_err(|e| anyhow!(e))?;
                Ok((z.clone(), s))
            })
            .collect()
    }

    fn unfinished(&self) -> Result<Option<Journal>> {
        Ok(self
            .journal
            .load()?
            .filter(|j| j.state == JournalState::InProgress))
    }

    fn refuse_if_unfinished(&self) -> Result<()> {
        if let Some(j) = self.unfinished()? {
            bail!(
                "an unfinished {:?} is recorded in {} ({} steps done): run `deployer roll --resume` to finish it or `deployer rollback` to undo it",
                j.operation,
                self.journal.path.display(),
                j.steps.iter().filter(|s| s.ok).count()
            );
        }
        Ok(())
    }

    fn lb_instances(&self) -> Result<Vec<Instance>> {
        let all = self.provider.list()?;
        Ok(all.into_iter().filter(|i| i.role == Role::Lb).collect())
    }

    fn find(&self, label: &str) -> Result<Option<Instance>> {
        Ok(self.provider.find_by_label(label)?)
    }

    /// Runs the steps not yet done; on a failure before any old instance may have been
    /// deleted, rolls back.
    fn run_steps(&mut self, j: &mut Journal, steps: &[&'static str]) -> Result<()> {
        let total = steps.len();
        for (k, step) in steps.iter().enumerate() {
            if j.done(step) {
                continue;
            }
            let t = Instant::now();
            // delete-old injects its failure mid-deletion (see `delete_old`).
            let r = if self.hooks.fail_at.as_deref() == Some(step) && *step != "delete-old" {
                Err(anyhow!(
                    "failure injected at step {step} (DEPLOYER_FAIL_AT)"
                ))
            } else {
                self.run_step(step, j)
            };
            if let Err(e) = &r {
                if let Some(w) = e.downcast_ref::<WaitForOperator>() {
                    self.out.info(&w.0);
                    self.journal.save(j)?;
                    self.waiting = true;
                    return Ok(());
                }
            }
            let rec = StepRecord {
                step: step.to_string(),
                ok: r.is_ok(),
                detail: match &r {
                    Ok(d) => d.clone(),
                    Err(e) => format!("{e:#}"),
                },
                elapsed_ms: elapsed_ms(t),
            };
            self.out.step(k + 1, total, &rec);
            j.steps.push(rec);
            self.journal.save(j)?;
            if let Err(e) = r {
                // Until an old instance may have been deleted, undoing is safe and is the
                // default; after that only going forward can restore a complete set.
                if !j.deleting_old {
                    let rb = self.rollback_journal(j);
                    return Err(match rb {
                        Ok(()) => e.context(format!(
                            "step {step} failed; rolled back: the old set kept serving and nothing created is left"
                        )),
                        Err(rb) => e.context(format!(
                            "step {step} failed and the rollback was incomplete: {rb:#}; see {}",
                            self.journal.path.display()
                        )),
                    });
                }
                j.state = JournalState::InProgress;
                self.journal.save(j)?;
                return Err(e.context(format!(
                    "step {step} failed after the old instances started being deleted; fix the cause and run `deployer roll --resume`"
                )));
            }
            if self.hooks.pause_after.as_deref() == Some(step) {
                self.out
                    .info(&format!("pausing after {step} (DEPLOYER_PAUSE_AFTER)"));
                std::thread::sleep(Duration::from_secs(120));
            }
        }
        j.state = JournalState::Done;
        self.journal.save(j)?;
        Ok(())
    }

    fn run_step(&mut self, step: &str, j: &mut Journal) -> Result<String> {
        match step {
            "create" => self.create(j, Role::Nameserver, true),
            "provision" => self.provision(j, Role::Nameserver),
            "check" => self.check_new(j, Role::Nameserver),
            "flip" => self.flip(j),
            "verify" => self.verify_lbs(j),
            "delete-old" => self.delete_old(j),
            "rename" => self.rename(j),
            "create-nameservers" => self.create(j, Role::Nameserver, false),
            "provision-nameservers" => self.provision(j, Role::Nameserver),
            "check-nameservers" => self.check_new(j, Role::Nameserver),
            "create-lbs" => self.create(j, Role::Lb, false),
            "provision-lbs" => self.provision(j, Role::Lb),
            "check-lbs" => self.verify_lbs(j),
            "create-lbs-next" => self.create(j, Role::Lb, true),
            "provision-lbs-next" => self.provision(j, Role::Lb),
            "check-lbs-next" => self.check_new_lbs(j),
            "handoff" => self.handoff(j),
            "drain" => self.drain(j),
            "delete-old-lbs" => self.delete_old(j),
            "rename-lbs" => self.rename(j),
            other => bail!("unknown step {other}"),
        }
    }

    /// Creates the instances of `role` (labels `NAME-next` when `next`), adopting one that a
    /// killed run created before it could record it.
    fn create(&mut self, j: &mut Journal, role: Role, next: bool) -> Result<String> {
        let specs: Vec<InstanceSpec> = match role {
            Role::Nameserver => self
                .cfg
                .nameservers
                .iter()
                .map(|n| InstanceSpec {
                    label: if next {
                        format!("{}-next", n.name)
                    } else {
                        n.name.clone()
                    },
                    role,
                    region: n.region.clone(),
                    instance_type: n.instance_type.clone(),
                    image: n.image.clone(),
                })
                .collect(),
            Role::Lb => self
                .cfg
                .lbs
                .iter()
                .map(|l| InstanceSpec {
                    label: if next {
                        format!("{}-next", l.name)
                    } else {
                        l.name.clone()
                    },
                    role,
                    region: l.region.clone(),
                    instance_type: l.instance_type.clone(),
                    image: l.image.clone(),
                })
                .collect(),
        };
        let mut made = Vec::new();
        for spec in &specs {
            if j.created.iter().any(|i| i.label == spec.label) {
                continue;
            }
            if let Some(existing) = self.find(&spec.label)? {
                if j.creating.contains(&spec.label) {
                    j.created.push(existing);
                    j.creating.retain(|l| l != &spec.label);
                    self.journal.save(j)?;
                    continue;
                }
                bail!(
                    "instance {} (id {}) already exists and this run did not create it: run `deployer rollback`, or delete it",
                    spec.label,
                    existing.id
                );
            }
            j.creating.push(spec.label.clone());
            self.journal.save(j)?;
            let inst = self.provider.create(spec)?;
            j.created.push(inst);
            j.creating.retain(|l| l != &spec.label);
            self.journal.save(j)?;
        }
        for i in 0..j.created.len() {
            if j.created[i].role != role {
                continue;
            }
            let running = self
                .provider
                .wait_running(j.created[i].id, self.cfg.timeouts.boot())
                .with_context(|| format!("waiting for {} to boot", j.created[i].label))?;
            j.created[i] = running;
            made.push(format!(
                "{} (id {}, {})",
                j.created[i].label,
                j.created[i].id,
                j.created[i].dns_addr()
            ));
        }
        self.journal.save(j)?;
        Ok(made.join(", "))
    }

    fn created(&self, j: &Journal, role: Role) -> Vec<Instance> {
        j.created
            .iter()
            .filter(|i| i.role == role)
            .cloned()
            .collect()
    }

    /// Address of the instance serving nameserver `name` for this operation.
    fn nameserver_addr(&self, j: &Journal, name: &str) -> Result<String> {
        let next = format!("{name}-next");
        if let Some(i) = j
            .created
            .iter()
            .find(|i| i.label == next || i.label == name)
        {
            return Ok(i.dns_addr().to_string());
        }
        let i = self
            .find(name)?
            .ok_or_else(|| anyhow!("nameserver {name} does not exist: run `deployer up` first"))?;
        Ok(i.dns_addr().to_string())
    }

    fn provision(&mut self, j: &mut Journal, role: Role) -> Result<String> {
        let targets = self.created(j, role);
        // Existing lbs are listed only for the nameservers (rate-limit exemptions); a play on
        // `lbs` must touch nothing but the new instances.
        let lbs = match role {
            Role::Nameserver => self.lb_instances()?,
            Role::Lb => Vec::new(),
        };
        let known_hosts = self.cfg.state_dir.join("known_hosts");
        let mut inv = ansible::inventory(
            self.provider.as_ref(),
            &targets,
            &lbs,
            &self.cfg,
            &known_hosts,
        );
        if role == Role::Lb {
            // Each lb starts pointed at the nameservers it fronts.
            let hosts = inv["all"]["children"]["lbs"]["hosts"]
                .as_object_mut()
                .ok_or_else(|| anyhow!("inventory has no lbs"))?;
            for t in &targets {
                let base = t.label.trim_end_matches("-next");
                let l = self
                    .cfg
                    .lbs
                    .iter()
                    .find(|l| l.name == base)
                    .ok_or_else(|| anyhow!("lb {base} is not in the config"))?;
                let backends: Vec<String> = l
                    .fronts
                    .iter()
                    .map(|f| self.nameserver_addr(j, f))
                    .collect::<Result<_>>()?;
                if let Some(Value::Object(h)) = hosts.get_mut(&t.label) {
                    h.insert("lb_backends".into(), json!(backends));
                }
            }
        }
        let (playbook, what) = match role {
            Role::Nameserver => ("nameserver.yml", "nameservers"),
            Role::Lb => ("lb.yml", "lbs"),
        };
        let vars = ansible::run_vars(&self.cfg);
        let run = format!("{}-{what}", j.started_unix);
        ansible::run_playbook(
            &self.cfg,
            playbook,
            &run,
            &inv,
            &vars,
            self.cfg.timeouts.provision(),
        )?;
        Ok(targets
            .iter()
            .map(|i| i.label.clone())
            .collect::<Vec<_>>()
            .join(", "))
    }

    fn check_new(&mut self, j: &mut Journal, role: Role) -> Result<String> {
        let mut done = Vec::new();
        for i in self.created(j, role) {
            check_serving(i.dns_addr(), &j.serials, self.cfg.timeouts.check())
                .map_err(|e| anyhow!("{} does not serve the zones: {e}", i.label))?;
            done.push(format!("{} authoritative", i.label));
        }
        Ok(format!(
            "{}; serials {}",
            done.join(", "),
            fmt_serials(&j.serials)
        ))
    }

    /// Flips every lb to the new nameservers with a verified swap.
    fn flip(&mut self, j: &mut Journal) -> Result<String> {
        let mut out = Vec::new();
        for l in self.cfg.lbs.clone() {
            if j.flips.iter().any(|f| f.lb == l.name) {
                continue;
            }
            let inst = self
                .find(&l.name)?
                .ok_or_else(|| anyhow!("lb {} does not exist: run `deployer up` first", l.name))?;
            let ctl = self.provider.lb_control(&inst, &l.control_socket);
            let previous: Vec<String> = ctl
                .status(self.cfg.timeouts.ctl())
                .map_err(|e| anyhow!("lb {}: {e}", l.name))?
                .backends
                .into_iter()
                .map(|b| b.address)
                .collect();
            let new: Vec<String> = l
                .fronts
                .iter()
                .map(|f| self.nameserver_addr(j, f))
                .collect::<Result<_>>()?;
            // Record intent first: a kill between the swap and this write must still flip back.
            j.flips.push(Flip {
                lb: l.name.clone(),
                previous: previous.clone(),
                new: new.clone(),
            });
            self.journal.save(j)?;
            match ctl.set_backends(&new, true, self.cfg.timeouts.ctl()) {
                Ok(g) => out.push(format!("{} -> {} (generation {g})", l.name, new.join(" "))),
                Err(e) => {
                    // Refused: the lb kept its set, so there is nothing to flip back here.
                    j.flips.retain(|f| f.lb != l.name);
                    self.journal.save(j)?;
                    bail!("lb {} refused the swap: {e}", l.name);
                }
            }
        }
        Ok(out.join(", "))
    }

    fn verify_lbs(&mut self, j: &mut Journal) -> Result<String> {
        let mut out = Vec::new();
        for l in &self.cfg.lbs {
            let inst = self
                .find(&l.name)?
                .ok_or_else(|| anyhow!("lb {} does not exist", l.name))?;
            check_serving(inst.dns_addr(), &j.serials, self.cfg.timeouts.check())
                .map_err(|e| anyhow!("through lb {}: {e}", l.name))?;
            out.push(format!("{} ({}) ok", l.name, inst.dns_addr()));
        }
        Ok(out.join(", "))
    }

    fn delete_old(&mut self, j: &mut Journal) -> Result<String> {
        j.deleting_old = true;
        self.journal.save(j)?;
        let mut out = Vec::new();
        for i in j.old.clone() {
            self.provider
                .delete(i.id)
                .or_else(|e| match e {
                    crate::provider::ProviderError::NotFound(_) => Ok(()),
                    e => Err(e),
                })
                .with_context(|| format!("deleting {} (id {})", i.label, i.id))?;
            out.push(format!("{} (id {})", i.label, i.id));
            if self.hooks.fail_at.as_deref() == Some("delete-old") {
                bail!(
                    "failure injected at step delete-old after deleting {} (DEPLOYER_FAIL_AT)",
                    i.label
                );
            }
        }
        Ok(out.join(", "))
    }

    fn rename(&mut self, j: &mut Journal) -> Result<String> {
        let mut out = Vec::new();
        for k in 0..j.created.len() {
            let i = j.created[k].clone();
            let Some(base) = i.label.strip_suffix("-next") else {
                continue;
            };
            self.provider
                .rename(i.id, base)
                .with_context(|| format!("renaming {} to {base}", i.label))?;
            j.created[k].label = base.to_string();
            self.journal.save(j)?;
            out.push(format!("{} -> {base}", i.label));
        }
        Ok(out.join(", "))
    }

    /// Undoes an operation: flips lbs back, deletes what it created.
    fn rollback_journal(&mut self, j: &mut Journal) -> Result<()> {
        let mut errors = Vec::new();
        for f in j.flips.clone().iter().rev() {
            let r = self
                .find(&f.lb)
                .map_err(|e| e.to_string())
                .and_then(|inst| {
                    let inst = inst.ok_or_else(|| format!("lb {} not found", f.lb))?;
                    let socket = self
                        .cfg
                        .lbs
                        .iter()
                        .find(|l| l.name == f.lb)
                        .map(|l| l.control_socket.clone())
                        .unwrap_or_default();
                    let ctl = self.provider.lb_control(&inst, &socket);
                    // Not verified: putting the old set back must not be refused.
                    ctl.set_backends(&f.previous, false, self.cfg.timeouts.ctl())
                });
            match r {
                Ok(g) => {
                    self.out.info(&format!(
                        "rollback: lb {} back on {} (generation {g})",
                        f.lb,
                        f.previous.join(" ")
                    ));
                    j.flips.retain(|x| x.lb != f.lb);
                }
                Err(e) => errors.push(format!("flipping lb {} back: {e}", f.lb)),
            }
            self.journal.save(j)?;
        }
        for label in j.creating.clone() {
            if let Ok(Some(i)) = self.find(&label) {
                if !j.created.iter().any(|c| c.id == i.id) {
                    j.created.push(i);
                }
            }
            j.creating.retain(|l| l != &label);
        }
        for i in j.created.clone() {
            match self.provider.delete(i.id) {
                Ok(()) | Err(crate::provider::ProviderError::NotFound(_)) => {
                    self.out
                        .info(&format!("rollback: deleted {} (id {})", i.label, i.id));
                    j.created.retain(|c| c.id != i.id);
                }
                Err(e) => errors.push(format!("deleting {} (id {}): {e}", i.label, i.id)),
            }
            self.journal.save(j)?;
        }
        if errors.is_empty() {
            j.state = JournalState::RolledBack;
            self.journal.save(j)?;
            Ok(())
        } else {
            j.state = JournalState::Failed;
            j.error = Some(errors.join("; "));
            self.journal.save(j)?;
            Err(anyhow!("{}", errors.join("; ")))
        }
    }

    /// `deployer up`.
    pub fn up(&mut self, dry_run: bool) -> Result<()> {
        self.refuse_if_unfinished()?;
        let serials = self.serials()?;
        if !self.cfg.lb_binary.exists() {
            bail!(
                "lb binary {} not found (key lb_binary): build it with `cargo build --release -p lb`",
                self.cfg.lb_binary.display()
            );
        }
        if dry_run {
            self.plan_up();
            return Ok(());
        }
        for name in self
            .cfg
            .nameservers
            .iter()
            .map(|n| n.name.clone())
            .chain(self.cfg.lbs.iter().map(|l| l.name.clone()))
        {
            if let Some(i) = self.find(&name)? {
                bail!(
                    "{name} (id {}) already exists: this deployment is up; use `deployer roll`, or `deployer down` first",
                    i.id
                );
            }
        }
        let mut j = Journal::new(Operation::Up, serials);
        self.journal.save(&j)?;
        self.run_steps(&mut j, &UP_STEPS)
    }

    fn plan_up(&self) {
        self.out
            .info("plan for `deployer up` (dry run, nothing changes):");
        for n in &self.cfg.nameservers {
            self.out.info(&format!("  create nameserver {}", n.name));
        }
        self.out
            .info("  provision them with ansible/nameserver.yml, check every zone");
        for l in &self.cfg.lbs {
            self.out.info(&format!(
                "  create lb {} fronting {}",
                l.name,
                l.fronts.join(", ")
            ));
        }
        self.out
            .info("  provision them with ansible/lb.yml, check every zone through every lb");
    }

    /// `deployer roll` (or `--resume`).
    pub fn roll(&mut self, resume: bool, dry_run: bool) -> Result<()> {
        let mut j = if resume {
            let j = self
                .unfinished()?
                .ok_or_else(|| anyhow!("there is no unfinished roll to resume"))?;
            if j.operation != Operation::Roll {
                bail!(
                    "the unfinished operation is {:?}, not a roll: run `deployer rollback`",
                    j.operation
                );
            }
            self.out.info(&format!(
                "resuming the roll: {} of {} steps done",
                j.steps.iter().filter(|s| s.ok).count(),
                ROLL_STEPS.len()
            ));
            j
        } else {
            self.refuse_if_unfinished()?;
            let serials = self.serials()?;
            let mut old = Vec::new();
            for n in &self.cfg.nameservers {
                let i = self.find(&n.name)?.ok_or_else(|| {
                    anyhow!(
                        "nameserver {} does not exist: run `deployer up` first",
                        n.name
                    )
                })?;
                old.push(i);
            }
            if dry_run {
                self.out
                    .info("plan for `deployer roll` (dry run, nothing changes):");
                for (k, s) in ROLL_STEPS.iter().enumerate() {
                    self.out.info(&format!("  {}. {s}", k + 1));
                }
                for i in &old {
                    self.out.info(&format!(
                        "  replace {} (id {}, {}) by {}-next",
                        i.label,
                        i.id,
                        i.dns_addr(),
                        i.label
                    ));
                }
                self.out
                    .info(&format!("  expected serials: {}", fmt_serials(&serials)));
                return Ok(());
            }
            let mut j = Journal::new(Operation::Roll, serials);
            j.old = old;
            self.journal.save(&j)?;
            j
        };
        self.run_steps(&mut j, &ROLL_STEPS)
    }

    /// `deployer rollback`: undo an unfinished operation.
    pub fn rollback(&mut self) -> Result<()> {
        let mut j = self
            .unfinished()?
            .ok_or_else(|| anyhow!("there is no unfinished operation to roll back"))?;
        if j.deleting_old {
            bail!(
                "past the point of no return (old instances being deleted, or the delegation handed over); only `deployer {} --resume` can finish",
                if j.operation == Operation::RollLb { "roll-lb" } else { "roll" }
            );
        }
        self.rollback_journal(&mut j)?;
        self.out
            .info("rolled back: the old set serves and nothing created is left");
        Ok(())
    }

    /// The new lbs serve every zone over UDP and TCP, and their metrics endpoint is up.
    fn check_new_lbs(&mut self, j: &mut Journal) -> Result<String> {
        let mut out = Vec::new();
        for i in self.created(j, Role::Lb) {
            check_serving(i.dns_addr(), &j.serials, self.cfg.timeouts.check())
                .map_err(|e| anyhow!("new lb {} does not serve the zones: {e}", i.label))?;
            scrape_queries(i.metrics_addr(), self.cfg.timeouts.ctl()).map_err(|e| {
                anyhow!(
                    "new lb {}: /metrics at {} is not up: {e}",
                    i.label,
                    i.metrics_addr()
                )
            })?;
            out.push(format!("{} ({}) ok, metrics up", i.label, i.dns_addr()));
        }
        Ok(out.join(", "))
    }

    /// What has to change at the registrar: per lb, old and new address.
    fn handoff_plan(&self, j: &Journal) -> Vec<(String, String, String)> {
        self.cfg
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

    /// Points the delegation at the new lbs: through the hook, or by the operator.
    fn handoff(&mut self, j: &mut Journal) -> Result<String> {
        let plan = self.handoff_plan(j);
        let zones: Vec<&String> = self.cfg.zones.names.iter().collect();
        let Some(hook) = self.cfg.roll_lb.delegation_hook.clone() else {
            j.waiting_for_handoff = true;
            self.journal.save(j)?;
            let mut msg = String::from(
                "hand-off: change the delegation at your registrar (NS glue addresses) for the zones ",
            );
            msg.push_str(
                &zones
                    .iter()
                    .map(|z| z.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            msg.push_str(":\n");
            for (name, old, new) in &plan {
                msg.push_str(&format!("  {name}: replace {old} by {new}\n"));
            }
            msg.push_str("then run `deployer roll-lb --resume` (the old load balancers keep serving until they drain)");
            return Err(WaitForOperator(msg).into());
        };
        let input = json!({
            "deployment": self.cfg.deployment,
            "zones": zones,
            "lbs": plan.iter().map(|(n, o, w)| json!({"name": n, "old_address": o, "new_address": w})).collect::<Vec<_>>(),
        });
        let mut child = std::process::Command::new(&hook)
            .args(plan.iter().map(|p| p.2.clone()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run delegation_hook {hook}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let _ = stdin.write_all(input.to_string().as_bytes());
        }
        let status = wait_child(&mut child, self.cfg.timeouts.provision())
            .with_context(|| format!("delegation_hook {hook}"))?;
        if !status.success() {
            bail!(
                "delegation_hook {hook} failed ({status}); if it changed part of the delegation, restore it"
            );
        }
        j.deleting_old = true;
        Ok(plan
            .iter()
            .map(|(n, o, w)| format!("{n}: {o} -> {w}"))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// Waits until every old lb's query rate stays below the threshold for the quiet period.
    fn drain(&mut self, j: &mut Journal) -> Result<String> {
        let rl = self.cfg.roll_lb.clone();
        let quiet = match rl.quiet_secs {
            Some(q) => Duration::from_secs(q),
            None => {
                let mut ttl = 0;
                for z in &self.cfg.zones.names {
                    ttl = ttl.max(
                        zones::delegation_max_ttl(&self.cfg.zone_file(z), z)
                            .map_err(|e| anyhow!(e))?,
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
                match scrape_queries(x.addr, self.cfg.timeouts.ctl()) {
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
            self.out.progress(&format!("drain: {line}"));
            if drained {
                self.out.progress_end();
                return Ok(format!(
                    "old lbs quiet for {}s below {} qps",
                    quiet.as_secs(),
                    rl.drain_threshold_qps
                ));
            }
            if start.elapsed() >= max_wait {
                self.out.progress_end();
                bail!(
                    "the old lbs did not drain within {}s ({line}); they were NOT deleted: an lb that still receives traffic is never deleted. Run `deployer roll-lb --resume` to keep waiting",
                    max_wait.as_secs()
                );
            }
            std::thread::sleep(poll);
        }
    }

    /// `deployer roll-lb` (or `--resume`): blue-green the load balancers themselves.
    pub fn roll_lb(&mut self, resume: bool, dry_run: bool) -> Result<()> {
        let mut j = if resume {
            let mut j = self
                .unfinished()?
                .ok_or_else(|| anyhow!("there is no unfinished roll-lb to resume"))?;
            if j.operation != Operation::RollLb {
                bail!(
                    "the unfinished operation is {:?}, not a roll-lb",
                    j.operation
                );
            }
            if j.waiting_for_handoff {
                // The operator says the delegation now points at the new lbs.
                j.waiting_for_handoff = false;
                j.deleting_old = true;
                j.steps.push(StepRecord {
                    step: "handoff".into(),
                    ok: true,
                    detail: "confirmed by the operator (--resume)".into(),
                    elapsed_ms: 0,
                });
                self.journal.save(&j)?;
            }
            j
        } else {
            self.refuse_if_unfinished()?;
            let serials = self.serials()?;
            let mut old = Vec::new();
            for l in &self.cfg.lbs {
                old.push(self.find(&l.name)?.ok_or_else(|| {
                    anyhow!("lb {} does not exist: run `deployer up` first", l.name)
                })?);
            }
            if dry_run {
                self.out
                    .info("plan for `deployer roll-lb` (dry run, nothing changes):");
                for (k, s) in ROLL_LB_STEPS.iter().enumerate() {
                    self.out.info(&format!("  {}. {s}", k + 1));
                }
                for i in &old {
                    self.out.info(&format!(
                        "  replace lb {} ({}) by {}-next",
                        i.label,
                        i.dns_addr(),
                        i.label
                    ));
                }
                return Ok(());
            }
            if !self.cfg.lb_binary.exists() {
                bail!(
                    "lb binary {} not found (key lb_binary)",
                    self.cfg.lb_binary.display()
                );
            }
            let mut j = Journal::new(Operation::RollLb, serials);
            j.old = old;
            self.journal.save(&j)?;
            j
        };
        self.run_steps(&mut j, &ROLL_LB_STEPS)
    }

    /// `deployer status`.
    pub fn status(&self) -> Result<Value> {
        let instances = self.provider.list()?;
        let mut lbs = Vec::new();
        for l in &self.cfg.lbs {
            let entry = match instances.iter().find(|i| i.label == l.name) {
                None => json!({"name": l.name, "error": "not created"}),
                Some(inst) => match self
                    .provider
                    .lb_control(inst, &l.control_socket)
                    .status(self.cfg.timeouts.ctl())
                {
                    Ok(s) => json!({"name": l.name, "address": inst.dns_addr().to_string(),
                                    "generation": s.generation, "backends": s.backends}),
                    Err(e) => {
                        json!({"name": l.name, "address": inst.dns_addr().to_string(), "error": e})
                    }
                },
            };
            lbs.push(entry);
        }
        let journal = self.journal.load()?;
        let unfinished = journal
            .as_ref()
            .filter(|j| j.state == JournalState::InProgress);
        Ok(json!({
            "deployment": self.cfg.deployment,
            "instances": instances,
            "lbs": lbs,
            "unfinished": unfinished.map(|j| json!({
                "operation": j.operation,
                "steps_done": j.steps.iter().filter(|s| s.ok).map(|s| s.step.clone()).collect::<Vec<_>>(),
                "created": j.created,
            })),
            "last": journal.as_ref().map(|j| json!({"operation": j.operation, "state": j.state})),
        }))
    }

    /// `deployer down`: delete every instance of this deployment.
    pub fn down(&mut self, dry_run: bool) -> Result<Vec<Instance>> {
        let all = self.provider.list()?;
        if dry_run {
            return Ok(all);
        }
        let mut errors = Vec::new();
        for i in &all {
            match self.provider.delete(i.id) {
                Ok(()) | Err(crate::provider::ProviderError::NotFound(_)) => {
                    self.out.info(&format!("deleted {} (id {})", i.label, i.id))
                }
                Err(e) => errors.push(format!("{} (id {}): {e}", i.label, i.id)),
            }
        }
        if let Some(mut j) = self.unfinished()? {
            j.state = JournalState::RolledBack;
            j.error = Some("deployment taken down".into());
            self.journal.save(&j)?;
        }
        if errors.is_empty() {
            Ok(all)
        } else {
            Err(anyhow!("could not delete: {}", errors.join("; ")))
        }
    }

    pub fn list(&self) -> Result<Vec<Instance>> {
        Ok(self.provider.list()?)
    }
}

/// Sum of `lb_queries_total` (all protocols) from an lb's `/metrics`.
pub fn scrape_queries(addr: std::net::SocketAddr, timeout: Duration) -> Result<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    if !text.starts_with("HTTP/1.") || !text.contains(" 200 ") {
        bail!("unexpected response: {}", text.lines().next().unwrap_or(""));
    }
    let mut total = 0.0;
    let mut seen = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("lb_queries_total{") {
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                total += v;
                seen = true;
            }
        }
    }
    if !seen {
        bail!("no lb_queries_total in the metrics");
    }
    Ok(total)
}

/// Waits for a child with a deadline, killing it when it passes.
fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?} and was stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fmt_serials(s: &[(String, u32)]) -> String {
    s.iter()
        .map(|(z, n)| format!("{z} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
