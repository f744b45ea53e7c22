//! The operations: `up`, `roll`, `roll-lb`, `rollback`, `status`, `down`.
//!
//! Each one that changes anything takes the deployment's lock first (a second deployer refuses
//! at once), then builds or loads the journal and hands the steps to the [`engine`]. `status`
//! and `--dry-run` take no lock and change nothing.

use anyhow::{anyhow, bail, Context, Result};

use crate::content::{self, Asker};
use crate::context::{next_command, Deployer};
use crate::engine;
use crate::journal::{Handoff, Journal, JournalState, Operation, Phase, Step};
use crate::lifecycle::fmt_serials;
use crate::provider::Instance;
use crate::status::{BackendView, InstanceView, LastView, LbView, StatusView, UnfinishedView};
use crate::steps::{ROLL_LB_STEPS, ROLL_STEPS, UP_STEPS};
use crate::zones::ZoneContent;

impl Deployer {
    /// `deployer up` (or `--resume`).
    pub fn up(&mut self, resume: bool, dry_run: bool) -> Result<()> {
        if resume {
            if dry_run {
                let j = self.resumable(Operation::Up)?;
                self.plan_resume(&j);
                return Ok(());
            }
            self.lock()?;
            let mut j = self.resumable(Operation::Up)?;
            if !j.done(Step::ProvisionLbs) {
                self.lb_package_preflight()?;
            }
            self.out.info(&format!(
                "resuming up: {} of {} steps done",
                j.steps_done().len(),
                UP_STEPS.len()
            ));
            // Creates adopt what a killed run created (by label); the rest is idempotent.
            return engine::run_steps(self, &mut j, &UP_STEPS);
        }
        if !dry_run {
            self.lock()?;
            self.refuse_if_unfinished()?;
        }
        let serials = self.serials()?;
        self.lb_package_preflight()?;
        if !self.cfg.lb_binary.exists() {
            bail!(
                "lb binary {} not found (key lb_binary): build it with `cargo build --release -p lb`",
                self.cfg.lb_binary.display()
            );
        }
        self.network_preflight(Operation::Up, &[])?;
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
        self.save(&j)?;
        engine::run_steps(self, &mut j, &UP_STEPS)
    }

    /// On VMs the lb role installs the `lb` Debian package copied from this machine
    /// (`lb_package`): checked before anything is created, so that a missing package is not
    /// found only once VMs exist and Ansible runs.
    fn lb_package_preflight(&self) -> Result<()> {
        if !self.cfg.provider.kind.is_vm() {
            return Ok(());
        }
        let extra = &self.cfg.ansible.extra_vars;
        for l in &self.cfg.lbs {
            let var = |k: &str| extra.get(k).or_else(|| l.vars.get(k));
            if var("lb_mode").and_then(|m| m.as_str()) == Some("local") {
                continue;
            }
            let missing = || {
                anyhow!(
                    "lb {}: `lb_package` is not set: on Linode the lb role installs the lb Debian package from this machine. Build it with `scripts/package.sh` (it prints the path of the .deb) and set `lb_package = \"/path/to/lb_VERSION_ARCH.deb\"` under [ansible] extra_vars (or in the lb's `vars`) in {}; nothing was created",
                    l.name,
                    self.cfg.source.display()
                )
            };
            let path = match var("lb_package") {
                Some(serde_json::Value::String(p)) if !p.trim().is_empty() => p.clone(),
                Some(serde_json::Value::String(_)) | None => return Err(missing()),
                Some(other) => bail!(
                    "lb {}: `lb_package` must be the path of the lb .deb, not {other}; nothing was created",
                    l.name
                ),
            };
            if !std::path::Path::new(&path).is_file() {
                bail!(
                    "lb {}: lb_package {path} does not exist: build it with `scripts/package.sh` (it prints the path of the .deb); nothing was created",
                    l.name
                );
            }
        }
        Ok(())
    }

    /// The VLAN checks before an operation creates anything (see [`crate::network`]).
    fn network_preflight(&self, op: Operation, existing: &[Instance]) -> Result<()> {
        if let Some(notice) = crate::network::preflight(self, op, existing)? {
            self.out.info(&notice);
        }
        Ok(())
    }

    fn plan_up(&self) {
        self.out
            .info("plan for `deployer up` (dry run, nothing changes):");
        for n in &self.cfg.nameservers {
            self.out.info(&format!("  create nameserver {}", n.name));
        }
        for l in &self.cfg.lbs {
            self.out.info(&format!(
                "  create lb {} fronting {}",
                l.name,
                l.fronts.join(", ")
            ));
        }
        self.out.info(
            "  provision the nameservers with ansible/nameserver.yml (answering only those lbs), the lbs with ansible/lb.yml",
        );
        self.out.info(&format!(
            "  check every zone on every nameserver ({}), then through every lb",
            match self.cfg.network.check_address {
                Some(a) => format!("directly from {a}"),
                None => "from an lb, with `lb ctl probe`".into(),
            }
        ));
    }

    /// Loads the unfinished operation for `--resume`, checking it is `op`.
    fn resumable(&self, op: Operation) -> Result<Journal> {
        let j = self
            .unfinished_to_act_on()?
            .ok_or_else(|| anyhow!("there is no unfinished {} to resume", op.command()))?;
        if j.operation != op {
            bail!(
                "the unfinished operation is {}, not {}: {}",
                j.operation.command(),
                op.command(),
                next_command(&j)
            );
        }
        if j.phase == Phase::RollingBack {
            bail!(
                "cannot resume the unfinished {}: {}",
                op.command(),
                next_command(&j)
            );
        }
        Ok(j)
    }

    /// Prints what `--resume` would do.
    fn plan_resume(&self, j: &Journal) {
        self.out.info(&format!(
            "plan for `deployer {} --resume` (dry run, nothing changes): phase {:?}",
            j.operation.command(),
            j.phase
        ));
        if !j.flips.is_empty() {
            self.out
                .info("  read every lb's live backends and converge each to the new set");
        }
        for s in j.operation.steps().iter().filter(|s| !j.done(**s)) {
            self.out.info(&format!("  {s}"));
        }
    }

    /// `deployer roll` (or `--resume`).
    pub fn roll(&mut self, resume: bool, dry_run: bool) -> Result<()> {
        if resume {
            if dry_run {
                let j = self.resumable(Operation::Roll)?;
                self.plan_resume(&j);
                return Ok(());
            }
            self.lock()?;
            let mut j = self.resumable(Operation::Roll)?;
            self.out.info(&format!(
                "resuming the roll: {} of {} steps done, phase {:?}",
                j.steps_done().len(),
                ROLL_STEPS.len(),
                j.phase
            ));
            if let Err(e) = engine::reconcile_forward(self, &mut j) {
                return Err(self.fail_on_resume(&mut j, e));
            }
            return engine::run_steps(self, &mut j, &ROLL_STEPS);
        }
        if !dry_run {
            self.lock()?;
            self.refuse_if_unfinished()?;
        }
        let serials = self.serials()?;
        self.network_preflight(Operation::Roll, &self.list()?)?;
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
        // What the roll changes in the zones, from what the running set serves; an edit
        // without a serial bump is refused before anything is created.
        let refusal = self.zone_diff()?;
        if let (Some(r), false) = (&refusal, dry_run) {
            bail!("{r}; nothing was created");
        }
        if dry_run {
            self.out
                .info("plan for `deployer roll` (dry run, nothing changes):");
            if let Some(j) = self.unfinished()? {
                self.out.info(&format!(
                    "  (an unfinished {} is recorded: {})",
                    j.operation.command(),
                    next_command(&j)
                ));
            }
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
            if let Some(r) = refusal {
                bail!("the roll would be refused: {r}");
            }
            return Ok(());
        }
        let mut j = Journal::new(Operation::Roll, serials);
        j.old = old;
        self.save(&j)?;
        engine::run_steps(self, &mut j, &ROLL_STEPS)
    }

    /// Prints what a roll changes in every zone: what the running set serves (asked through
    /// the first lb, which still sends to it) against the new zone files (see
    /// [`crate::content::diff`]). Returns why the roll must be refused, if it must: a zone
    /// whose content changes while its serial stays.
    fn zone_diff(&self) -> Result<Option<String>> {
        let zones = content::read_zones(&self.cfg).map_err(|e| anyhow!(e))?;
        let recorded: Vec<Option<ZoneContent>> = zones
            .iter()
            .map(|z| content::recorded(&self.cfg.state_dir, &z.zone))
            .collect();
        let mut through = None;
        for l in &self.cfg.lbs {
            if let Some(i) = self.find(&l.name)? {
                through = Some((l.name.clone(), i));
                break;
            }
        }
        let Some((lb, inst)) = through else {
            bail!("no lb exists to read the running zones through: run `deployer up` first");
        };
        let diffs = content::diff(
            &Asker::Direct(inst.dns_addr()),
            &zones,
            &recorded,
            &self.cfg.checks,
            self.cfg.timeouts.check(),
        )
        .map_err(|e| {
            anyhow!(
                "cannot read what the running set serves through lb {lb} ({}): {e}",
                inst.dns_addr()
            )
        })?;
        self.out.info(&format!(
            "what the roll changes (the running set, read through lb {lb}, against the zone files):"
        ));
        for d in &diffs {
            for line in d.lines() {
                self.out.info(&format!("  {line}"));
            }
        }
        let unbumped: Vec<String> = diffs
            .iter()
            .filter(|d| d.unbumped())
            .map(|d| {
                format!(
                    "zone {} changes ({} added, {} removed, {} changed) but its serial stays {} ({})",
                    d.zone,
                    d.added.len(),
                    d.removed.len(),
                    d.changed.len(),
                    d.new_serial,
                    self.cfg.zone_file(&d.zone).display()
                )
            })
            .collect();
        Ok((!unbumped.is_empty()).then(|| {
            format!(
                "{}: bump the serial, or secondaries (which transfer by serial) and lb's cache (which follows the serial) would keep the old content",
                unbumped.join("; ")
            )
        }))
    }

    /// A resume that could not converge the lbs: undo if still possible, else stop.
    fn fail_on_resume(&mut self, j: &mut Journal, e: anyhow::Error) -> anyhow::Error {
        if j.phase == Phase::Undoable {
            match engine::undo(self, j) {
                Ok(()) => e.context(
                    "resume could not bring every lb to the new set; rolled back: the old set serves and nothing created is left",
                ),
                Err(u) => e.context(format!(
                    "resume could not bring every lb to the new set and the rollback stopped: {u:#}"
                )),
            }
        } else {
            e.context(format!(
                "resume could not bring every lb to the new set; fix the cause and run `deployer {} --resume` again",
                j.operation.command()
            ))
        }
    }

    /// `deployer rollback`: undo an unfinished operation (before its point of no return).
    ///
    /// Once roll-lb's hand-off has begun (the hook started, or the operator was asked to change
    /// the delegation), only `delegation_unchanged` (`--delegation-unchanged`, the operator's
    /// word that the delegation still points at the old lbs alone) lets it delete the new lbs.
    pub fn rollback(&mut self, delegation_unchanged: bool) -> Result<()> {
        self.lock()?;
        let mut j = self
            .unfinished_to_act_on()?
            .ok_or_else(|| anyhow!("there is no unfinished operation to roll back"))?;
        if j.phase == Phase::Forward {
            bail!(
                "past the point of no return (old instances being deleted, or the delegation handed over); only `deployer {} --resume` can finish",
                j.operation.command()
            );
        }
        if j.handoff.blocks_undo() {
            let plan = crate::drain::handoff_plan(self, &j);
            if !delegation_unchanged {
                bail!(
                    "the delegation hand-off has begun ({}), so the delegation of {} may already point at the new load balancers ({}), and a rollback deletes them. Check it at the registrar: if it points at the old load balancers only, run `deployer rollback --delegation-unchanged`; otherwise finish with `deployer {} --resume`",
                    match j.handoff {
                        Handoff::Started => "delegation_hook was started",
                        _ => "the operator was asked to change it",
                    },
                    self.cfg.zones.names.join(", "),
                    crate::drain::describe_plan(&plan),
                    j.operation.command()
                );
            }
            self.out.info(
                "rollback: the operator confirms the delegation still points at the old load balancers (--delegation-unchanged)",
            );
            j.handoff = Handoff::NotStarted;
            self.save(&j)?;
        }
        engine::undo(self, &mut j)?;
        self.out
            .info("rolled back: the old set serves and nothing created is left");
        Ok(())
    }

    /// `deployer roll-lb` (or `--resume`): blue-green the load balancers themselves.
    pub fn roll_lb(&mut self, resume: bool, dry_run: bool) -> Result<()> {
        if resume {
            if dry_run {
                let j = self.resumable(Operation::RollLb)?;
                self.plan_resume(&j);
                return Ok(());
            }
            self.lock()?;
            let mut j = self.resumable(Operation::RollLb)?;
            if !j.done(Step::ProvisionLbsNext) {
                self.lb_package_preflight()?;
            }
            if j.handoff == Handoff::WaitingForOperator {
                // The operator says the delegation now points at the new lbs; the parent
                // servers must say so too.
                if let Err(e) = crate::drain::confirm_operator_handoff(self, &mut j) {
                    if let Some(w) = e.downcast_ref::<crate::drain::WaitForOperator>() {
                        self.waiting = Some(w.0.clone());
                        return Ok(());
                    }
                    return Err(e);
                }
            }
            return engine::run_steps(self, &mut j, &ROLL_LB_STEPS);
        }
        if !dry_run {
            self.lock()?;
            self.refuse_if_unfinished()?;
        }
        let serials = self.serials()?;
        self.lb_package_preflight()?;
        self.network_preflight(Operation::RollLb, &self.list()?)?;
        let mut old = Vec::new();
        for l in &self.cfg.lbs {
            old.push(
                self.find(&l.name)?.ok_or_else(|| {
                    anyhow!("lb {} does not exist: run `deployer up` first", l.name)
                })?,
            );
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
        self.save(&j)?;
        engine::run_steps(self, &mut j, &ROLL_LB_STEPS)
    }

    /// `deployer status`.
    pub fn status(&self) -> Result<StatusView> {
        let instances = self.provider.list()?;
        let mut lbs = Vec::new();
        for l in &self.cfg.lbs {
            let entry = match instances.iter().find(|i| i.label == l.name) {
                None => LbView {
                    name: l.name.clone(),
                    address: None,
                    generation: None,
                    backends: Vec::new(),
                    error: Some("not created".into()),
                },
                Some(inst) => {
                    let address = Some(inst.dns_addr().to_string());
                    match self
                        .provider
                        .lb_control(inst, &l.control_socket)
                        .status(self.cfg.timeouts.ctl())
                    {
                        Ok(s) => LbView {
                            name: l.name.clone(),
                            address,
                            generation: Some(s.generation),
                            backends: s
                                .backends
                                .into_iter()
                                .map(|b| BackendView {
                                    address: b.address,
                                    state: b.state,
                                    reason: b.reason,
                                })
                                .collect(),
                            error: None,
                        },
                        Err(e) => LbView {
                            name: l.name.clone(),
                            address,
                            generation: None,
                            backends: Vec::new(),
                            error: Some(e.to_string()),
                        },
                    }
                }
            };
            lbs.push(entry);
        }
        let journal = self.journal.load()?;
        // The journal's, or rebuilt from the world (another host's operation, a lost state
        // directory); a world that cannot be told is reported, not an error.
        let (unfinished, unclear) = match self.unfinished_with_source() {
            Ok(u) => (
                u.map(|(j, saw)| {
                    let mut v = UnfinishedView::from_journal(&j);
                    if !saw.is_empty() {
                        v.source = "world";
                        v.saw = saw;
                    }
                    v
                }),
                None,
            ),
            Err(e) => match e.downcast::<crate::context::UnclearWorld>() {
                Ok(u) => (None, Some(u.0)),
                Err(e) => return Err(e),
            },
        };
        Ok(StatusView {
            deployment: self.cfg.deployment.clone(),
            instances: instances.iter().map(InstanceView::from).collect(),
            lbs,
            unfinished,
            unclear,
            last: journal.as_ref().map(|j| LastView {
                operation: j.operation,
                state: j.state,
            }),
        })
    }

    /// `deployer down`: delete every instance of this deployment.
    pub fn down(&mut self, dry_run: bool) -> Result<Vec<Instance>> {
        let all = self.provider.list()?;
        if dry_run {
            return Ok(all);
        }
        self.lock()?;
        let mut errors = Vec::new();
        for i in &all {
            match self.delete_instance(i) {
                Ok(()) => self.out.info(&format!("deleted {} (id {})", i.label, i.id)),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if errors.is_empty() {
            if let Err(e) = self.provider.teardown() {
                errors.push(e.to_string());
            }
        }
        // An old-format journal must not stop a teardown: it is replaced below.
        if let Ok(Some(mut j)) = self
            .journal
            .load()
            .map(|j| j.filter(|j| j.state == JournalState::InProgress))
        {
            j.state = JournalState::RolledBack;
            j.error = Some("deployment taken down".into());
            self.save(&j)?;
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

    /// `deployer provision-lbs`: applies the lb role again to the running lbs, one at a time,
    /// each checked before the next (the lbs are the mutable part of the deployment: a new lb
    /// package, a changed setting). Each lb keeps the backends it serves now (read from it),
    /// so that the rendered lb.toml cannot flip it. `vars` override every other variable (an
    /// upgrade: `lb_package=/path/lb_NEW.deb`; the package's postinst hands the running lb over
    /// to the new binary, with no restart and no query lost).
    pub fn provision_lbs(&mut self, vars: &[(String, String)]) -> Result<()> {
        self.lock()?;
        self.refuse_if_unfinished()?;
        let serials = self.serials()?;
        let known_hosts = self.cfg.state_dir.join("known_hosts");
        let mut run_vars = crate::ansible::run_vars(&self.cfg);
        for (k, v) in vars {
            let value = if k == "lb_package" && std::path::Path::new(v).is_relative() {
                // Relative to where the command runs, as a shell user expects.
                serde_json::json!(std::env::current_dir()?.join(v))
            } else {
                serde_json::json!(v)
            };
            run_vars[k.as_str()] = value;
        }
        if let Some(p) = run_vars.get("lb_package").and_then(|p| p.as_str()) {
            if self.cfg.provider.kind.is_vm() && !std::path::Path::new(p).is_file() {
                bail!("lb_package {p} does not exist: build it with `scripts/package.sh`; nothing was changed");
            }
        }
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for l in self.cfg.lbs.clone() {
            let t = std::time::Instant::now();
            let (inst, ctl) = self.lb_control(&l.name)?;
            let status = ctl
                .status(self.cfg.timeouts.ctl())
                .map_err(|e| anyhow!("lb {}: cannot read its backends: {e}", l.name))?;
            let backends: Vec<String> = status.backends.iter().map(|b| b.address.clone()).collect();
            let mut inv = crate::ansible::inventory(
                self.provider.as_ref(),
                std::slice::from_ref(&inst),
                &[],
                &self.cfg,
                &known_hosts,
            );
            if let Some(serde_json::Value::Object(h)) =
                inv["all"]["children"]["lbs"]["hosts"].get_mut(&inst.label)
            {
                h.insert("lb_backends".into(), serde_json::json!(backends));
            }
            crate::ansible::run_playbook(
                &self.cfg,
                "lb.yml",
                &format!("{started}-provision-{}", l.name),
                &inv,
                &run_vars,
                None,
                self.cfg.timeouts.provision(),
            )
            .with_context(|| format!("provisioning lb {}", l.name))?;
            let after = ctl
                .status(self.cfg.timeouts.ctl())
                .map_err(|e| anyhow!("lb {} does not answer after provisioning: {e}", l.name))?;
            crate::checks::check_serving(inst.dns_addr(), &serials, self.cfg.timeouts.check())
                .map_err(|e| anyhow!("lb {} does not serve the zones after provisioning: {e}; the next lbs were not touched", l.name))?;
            self.out.info(&format!(
                "lb {} provisioned in {:.1}s: pid {} -> {}, generation {}, backends {}",
                l.name,
                t.elapsed().as_secs_f64(),
                status.pid,
                after.pid,
                after.generation,
                backends.join(", ")
            ));
        }
        Ok(())
    }

    /// The machines provider of this deployment (`deployer machines ...`).
    pub fn machines_provider(&self) -> Result<crate::provider::machines::MachinesProvider> {
        match (&self.cfg.provider.kind, &self.cfg.machines) {
            (crate::config::ProviderKind::Machines, Some(m)) => Ok(
                crate::provider::machines::MachinesProvider::new(
                    m,
                    &self.cfg.deployment,
                    &self.cfg.registry_dir(),
                    &self.cfg.state_dir,
                ),
            ),
            _ => bail!(
                "`deployer machines` needs the machines provider: [provider] kind = \"machines\" in {}",
                self.cfg.source.display()
            ),
        }
    }
}
