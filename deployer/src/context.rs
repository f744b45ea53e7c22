//! [`Deployer`]: one deployment as configured, with its provider, journal, output and test
//! hooks. The steps ([`crate::lifecycle`], [`crate::flip`], [`crate::drain`]), the
//! [`crate::engine`] and the [`crate::operations`] all work through it.

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{DeployerConfig, LbConfig, ProviderKind};
use crate::faults::Faults;
use crate::journal::{Handoff, Journal, JournalFile, JournalState, Phase};
use crate::lbctl::LbControl;
use crate::lease::Lease;
use crate::lock::DeploymentLock;
use crate::provider::linode::{LinodeClient, LinodeProvider};
use crate::provider::local::LocalProvider;
use crate::provider::machines::MachinesProvider;
use crate::provider::{Instance, Provider, ProviderError, Role};
use crate::report::Reporter;
use crate::zones;

/// One deployment, as configured.
pub struct Deployer {
    pub cfg: DeployerConfig,
    pub provider: Box<dyn Provider>,
    pub journal: JournalFile,
    pub out: Reporter,
    pub faults: Faults,
    /// Held while this process may change the deployment: the flock on the state directory
    /// (the fast path: refuses at once a second deployer sharing it) ...
    lock: Option<DeploymentLock>,
    /// ... and the deployment's lease, where every deployer of it looks ([`crate::lease`]).
    lease: Option<Lease>,
    /// What the operator has to do, when the last operation stopped to wait for them (not
    /// finished, not failed): `main` reports it with its own event and exit status.
    pub waiting: Option<String>,
}

impl Deployer {
    pub fn new(cfg: DeployerConfig, json: bool) -> Result<Deployer> {
        let provider: Box<dyn Provider> = match cfg.provider.kind {
            ProviderKind::Local => {
                migrate_registry(&cfg.state_dir.join("local"), &cfg.registry_dir())?;
                Box::new(LocalProvider::new(&cfg.registry_dir(), &cfg.lb_binary))
            }
            ProviderKind::Machines => {
                let m = cfg
                    .machines
                    .as_ref()
                    .ok_or_else(|| anyhow!("[machines] section missing"))?;
                migrate_registry(&cfg.state_dir.join("machines"), &cfg.registry_dir())?;
                Box::new(MachinesProvider::new(
                    m,
                    &cfg.deployment,
                    &cfg.registry_dir(),
                    &cfg.state_dir,
                ))
            }
            ProviderKind::Linode => {
                let l = cfg
                    .linode
                    .clone()
                    .ok_or_else(|| anyhow!("[linode] section missing"))?;
                // Every label this deployment may use, NAME and NAME-next, checked before any
                // call: a roll must not fail at its rename step on a label Linode refuses.
                for (key, name) in cfg
                    .nameservers
                    .iter()
                    .map(|n| ("nameservers.name", &n.name))
                    .chain(cfg.lbs.iter().map(|l| ("lbs.name", &l.name)))
                {
                    for label in [name.clone(), format!("{name}-next")] {
                        if let Some(e) = crate::provider::linode::label_error(&label) {
                            bail!("{key} `{name}`: not usable as a Linode label: {e}");
                        }
                    }
                }
                let mut client = LinodeClient::from_env(&l.api_url, cfg.timeouts.api())?;
                client.retry_deadline = cfg.timeouts.api_retry();
                Box::new(LinodeProvider::new(client, l, cfg.tag(), &cfg.state_dir))
            }
        };
        // 0700: the run files, the journal and known_hosts are the deployment's own.
        crate::private::create_dir(&cfg.state_dir).with_context(|| {
            format!(
                "cannot create state directory {} (mode 0700)",
                cfg.state_dir.display()
            )
        })?;
        Ok(Deployer {
            journal: JournalFile::new(&cfg.state_dir),
            cfg,
            provider,
            out: Reporter::new(json),
            faults: Faults::from_env(),
            lock: None,
            lease: None,
            waiting: None,
        })
    }

    /// Takes the deployment's lock (once per process): the state directory's flock, then the
    /// deployment's lease; refuses if another deployer holds either, naming it.
    pub fn lock(&mut self) -> Result<()> {
        if self.lock.is_none() {
            self.lock = Some(DeploymentLock::acquire(&self.cfg.state_dir)?);
        }
        if self.lease.is_none() {
            let lease = Lease::acquire(
                self.provider.lease_store(),
                &self.cfg.deployment,
                self.cfg.lease.times(),
            )?;
            for t in &lease.took_over {
                self.out.info(&format!(
                    "took over the lease of {t}: what it left unfinished is read from the world and the journal"
                ));
            }
            self.lease = Some(lease);
        }
        Ok(())
    }

    /// Ok while this process holds the deployment's lease (or took none: `status`, dry runs).
    /// Every write checks it first: a deployer whose lease was taken over stops.
    pub fn check_lease(&self) -> Result<()> {
        match &self.lease {
            Some(l) => Ok(l.check()?),
            None => Ok(()),
        }
    }

    /// The VLAN label when instances go on a VLAN (`[network] vlan` with a provider that has
    /// VLANs; the local provider keeps loopback).
    pub fn vlan(&self) -> Option<&str> {
        match self.cfg.provider.kind {
            ProviderKind::Linode | ProviderKind::Machines => self.cfg.network.vlan.as_deref(),
            ProviderKind::Local => None,
        }
    }

    /// Expected serial of every zone, from the zone files.
    pub fn serials(&self) -> Result<Vec<(String, u32)>> {
        self.cfg
            .zones
            .names
            .iter()
            .map(|z| {
                let s = zones::soa_serial(&self.cfg.zone_file(z), z).map_err(|e| anyhow!(e))?;
                Ok((z.clone(), s))
            })
            .collect()
    }

    /// The unfinished operation, if any: the journal's, or rebuilt from the world.
    pub fn unfinished(&self) -> Result<Option<Journal>> {
        Ok(self.unfinished_with_source()?.map(|(j, _)| j))
    }

    /// The unfinished operation and, when it was rebuilt from the world ([`crate::world`]),
    /// what the world showed (empty when the journal was used).
    ///
    /// The journal is a cache: it is used when it records an unfinished operation that the
    /// world does not contradict (no later operation marked on an instance, no old instance of
    /// an undoable operation gone). Without one (a new host, a lost state directory), or when
    /// it is contradicted, the operation is rebuilt from the world; a world that cannot be told
    /// safely is an [`UnclearWorld`] error saying what was seen and what settles it.
    pub fn unfinished_with_source(&self) -> Result<Option<(Journal, Vec<String>)>> {
        let recorded = self.journal.load()?;
        let instances = self.provider.list()?;
        let mark = crate::world::latest_mark(&instances);
        let mut why = None;
        match &recorded {
            Some(j) if j.state == JournalState::InProgress => {
                let newer = mark.is_some_and(|m| m.started_unix > j.started_unix);
                let exists = |id: u64| instances.iter().any(|i| i.id == id);
                let old_gone = j.phase == Phase::Undoable && j.old.iter().any(|o| !exists(o.id));
                // Undone elsewhere: nothing it created is left, and no instance carries its mark.
                let undone = j.phase != Phase::Forward
                    && !j.created.is_empty()
                    && !j.created.iter().any(|c| exists(c.id))
                    && !instances.iter().any(|i| {
                        i.operation.is_some_and(|m| {
                            m.operation == j.operation && m.started_unix == j.started_unix
                        })
                    });
                if !newer && !old_gone && !undone {
                    return Ok(Some((j.clone(), Vec::new())));
                }
                why = Some(format!(
                    "the journal {} records an unfinished {} (started at {}) that the world contradicts ({}): rebuilt from the world instead",
                    self.journal.path.display(),
                    j.operation.command(),
                    j.started_unix,
                    if newer {
                        "a later operation created instances"
                    } else if undone {
                        "nothing it created is left: it was undone from another state directory"
                    } else {
                        "old instances it would keep are gone"
                    }
                ));
            }
            // The operation the world's latest marks belong to finished here.
            Some(j) if mark.is_some() && crate::world::same_operation(j, mark) => return Ok(None),
            _ => {}
        }
        if mark.is_none() {
            return Ok(None);
        }
        let world = self.read_world(instances);
        match crate::world::rebuild(&self.cfg, &world, self.serials()?) {
            crate::world::Rebuilt::Nothing => Ok(None),
            crate::world::Rebuilt::Journal { journal, mut saw } => {
                if recorded.is_none() {
                    saw.insert(
                        0,
                        format!(
                            "no journal in {}: where the operation stands was rebuilt from the world",
                            self.cfg.state_dir.display()
                        ),
                    );
                }
                saw.extend(why);
                Ok(Some((*journal, saw)))
            }
            crate::world::Rebuilt::Unclear { mut saw, settle } => {
                saw.extend(why);
                Err(UnclearWorld(format!(
                    "an unfinished operation is in the world, and where it stands cannot be told safely: {}. {settle}",
                    saw.join("; ")
                ))
                .into())
            }
        }
    }

    /// Each configured lb's live set (read through the instance labelled with its name) and
    /// whether each `-next` lb answers, for [`crate::world::rebuild`].
    pub fn read_world(&self, instances: Vec<Instance>) -> crate::world::WorldView {
        let timeout = self.cfg.timeouts.ctl();
        let lbs = self
            .cfg
            .lbs
            .iter()
            .map(|l| crate::world::LbLive {
                name: l.name.clone(),
                live: match instances.iter().find(|i| i.label == l.name) {
                    None => Err("no instance has its label".into()),
                    Some(inst) => crate::flip::read_live(
                        &self.provider.lb_control(inst, &l.control_socket),
                        timeout,
                    )
                    .map_err(|e| e.to_string()),
                },
            })
            .collect();
        let next_lbs_serving = instances
            .iter()
            .filter(|i| i.role == Role::Lb && i.label.ends_with("-next"))
            .map(|i| {
                let socket = self
                    .cfg
                    .lbs
                    .iter()
                    .find(|l| i.label == format!("{}-next", l.name))
                    .map(|l| l.control_socket.clone())
                    .unwrap_or_default();
                let up = self
                    .provider
                    .lb_control(i, &socket)
                    .status(timeout.min(std::time::Duration::from_secs(5)))
                    .is_ok();
                (i.label.clone(), up)
            })
            .collect();
        crate::world::WorldView {
            instances,
            lbs,
            next_lbs_serving,
        }
    }

    pub fn refuse_if_unfinished(&self) -> Result<()> {
        if let Some((j, saw)) = self.unfinished_with_source()? {
            bail!(
                "an unfinished {} is {} (steps done: {}): {}",
                j.operation.command(),
                if saw.is_empty() {
                    format!("recorded in {}", self.journal.path.display())
                } else {
                    format!("in the world ({})", saw.join("; "))
                },
                j.steps_done().join(", "),
                next_command(&j)
            );
        }
        Ok(())
    }

    /// The unfinished operation for `--resume` or `rollback`: says what the world showed when
    /// it was rebuilt, and, when this deployer holds the lease (not a dry run), caches the
    /// rebuilt journal in the state directory.
    pub fn unfinished_to_act_on(&self) -> Result<Option<Journal>> {
        let Some((j, saw)) = self.unfinished_with_source()? else {
            return Ok(None);
        };
        if !saw.is_empty() {
            for line in &saw {
                self.out.info(line);
            }
            self.out.info(&format!(
                "rebuilt: {} phase {:?}, steps done: {}",
                j.operation.command(),
                j.phase,
                j.steps_done().join(", ")
            ));
            if self.lease.is_some() {
                self.save(&j)?;
            }
        }
        Ok(Some(j))
    }

    pub fn save(&self, j: &Journal) -> Result<()> {
        self.check_lease()?;
        Ok(self.journal.save(j)?)
    }

    pub fn lb_instances(&self) -> Result<Vec<Instance>> {
        let all = self.provider.list()?;
        Ok(all.into_iter().filter(|i| i.role == Role::Lb).collect())
    }

    pub fn find(&self, label: &str) -> Result<Option<Instance>> {
        Ok(self.provider.find_by_label(label)?)
    }

    pub fn lb_config(&self, name: &str) -> Result<&LbConfig> {
        self.cfg
            .lbs
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| anyhow!("lb {name} is not in the config"))
    }

    /// The running lb `name` and how to reach its control socket.
    pub fn lb_control(&self, name: &str) -> Result<(Instance, LbControl)> {
        let l = self.lb_config(name)?;
        let inst = self
            .find(name)?
            .ok_or_else(|| anyhow!("lb {name} does not exist: run `deployer up` first"))?;
        let ctl = self.provider.lb_control(&inst, &l.control_socket);
        Ok((inst, ctl))
    }

    /// Address lbs send to for nameserver `name` in this operation (its VLAN address when it
    /// has one): the instance this operation created (`NAME-next`, or `NAME` once renamed),
    /// else the existing one.
    pub fn nameserver_addr(&self, j: &Journal, name: &str) -> Result<String> {
        let next = format!("{name}-next");
        if let Some(i) = j
            .created
            .iter()
            .find(|i| i.label == next || i.label == name)
        {
            return Ok(i.backend_addr().to_string());
        }
        let i = self
            .find(name)?
            .ok_or_else(|| anyhow!("nameserver {name} does not exist: run `deployer up` first"))?;
        Ok(i.backend_addr().to_string())
    }

    /// Deletes an instance; already gone is success. Its host key is forgotten: clouds give
    /// addresses to new instances, whose new keys must not be refused as impostors.
    pub fn delete_instance(&self, i: &Instance) -> Result<()> {
        self.check_lease()?;
        match self.provider.delete(i.id) {
            Ok(()) | Err(ProviderError::NotFound(_)) => {
                if let Some(t) = self.provider.ssh_target(i) {
                    if let Err(e) = crate::ssh::forget_host(&t.known_hosts, t.host()) {
                        self.out.info(&format!("warning: {e}"));
                    }
                }
                Ok(())
            }
            Err(e) => {
                Err(anyhow!(e)).with_context(|| format!("deleting {} (id {})", i.label, i.id))
            }
        }
    }

    /// Waits until a new instance accepts SSH (where the provider reaches instances over
    /// SSH), within `timeouts.boot_secs`, saying every 10 s that it still waits.
    pub fn wait_ssh(&self, i: &Instance) -> Result<()> {
        let Some(t) = self.provider.ssh_target(i) else {
            return Ok(());
        };
        let waited = crate::ssh::wait_ready(&t, self.cfg.timeouts.boot(), |elapsed, last| {
            self.out.info(&format!(
                "still waiting for SSH on {} ({}): {}s ({last})",
                i.label,
                t.host(),
                elapsed.as_secs()
            ))
        })
        .map_err(|e| anyhow!("{} (id {}): {e}", i.label, i.id))?;
        if waited > std::time::Duration::from_secs(2) {
            self.out.info(&format!(
                "{} accepts SSH after {:.0}s",
                i.label,
                waited.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// An unfinished operation is in the world and where it stands cannot be told safely: the
/// message says what was seen and which command settles it.
#[derive(Debug)]
pub struct UnclearWorld(pub String);

impl std::fmt::Display for UnclearWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnclearWorld {}

/// Moves a registry an older deployer kept in the state directory (`STATE_DIR/local` or
/// `STATE_DIR/machines`) to the registry directory, once. The instances' own files stay where
/// they are (the records name them), so the state directory must not be deleted until the
/// instances it held are gone (`deployer down`, or rolled).
fn migrate_registry(old: &std::path::Path, new: &std::path::Path) -> Result<()> {
    let (from, to) = (old.join("instances.json"), new.join("instances.json"));
    if !from.is_file() || to.exists() {
        return Ok(());
    }
    crate::private::create_dir(new)
        .with_context(|| format!("cannot create the registry directory {}", new.display()))?;
    std::fs::copy(&from, &to)
        .and_then(|_| std::fs::remove_file(&from))
        .with_context(|| {
            format!(
                "cannot move the instance registry {} to {} ([provider] registry_dir)",
                from.display(),
                to.display()
            )
        })?;
    eprintln!(
        "moved the instance registry {} to {} ([provider] registry_dir): the instances' files stay in {}, so keep that directory until they are rolled or taken down",
        from.display(),
        to.display(),
        old.display()
    );
    Ok(())
}

/// What the operator can run to settle an unfinished operation.
pub fn next_command(j: &Journal) -> String {
    let cmd = j.operation.command();
    match (j.phase, j.handoff) {
        (Phase::Undoable, Handoff::Started) => format!(
            "the delegation hand-off has begun (delegation_hook was started; it may have changed part of the delegation), so nothing is undone by itself: run `deployer {cmd} --resume` to run the hook again and finish, or, only if the delegation still points at the old load balancers alone, `deployer rollback --delegation-unchanged` to delete the new ones"
        ),
        (Phase::Undoable, Handoff::WaitingForOperator) => format!(
            "waiting for the delegation to be changed to the new load balancers: once it is, run `deployer {cmd} --resume`; if you have not changed it and will not, `deployer rollback --delegation-unchanged` deletes the new ones"
        ),
        (Phase::Undoable, _) => format!(
            "run `deployer {cmd} --resume` to finish it or `deployer rollback` to undo it"
        ),
        (Phase::Forward, _) => format!(
            "it is past the point of no return: only `deployer {cmd} --resume` can finish it"
        ),
        (Phase::RollingBack, _) => "a rollback of it has begun deleting what it created: only `deployer rollback` can finish it".to_string(),
    }
}
