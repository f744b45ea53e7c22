//! [`Deployer`]: one deployment as configured, with its provider, journal, output and test
//! hooks. The steps ([`crate::lifecycle`], [`crate::flip`], [`crate::drain`]), the
//! [`crate::engine`] and the [`crate::operations`] all work through it.

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{DeployerConfig, LbConfig, ProviderKind};
use crate::faults::Faults;
use crate::journal::{Handoff, Journal, JournalFile, JournalState, Phase};
use crate::lbctl::LbControl;
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
    /// Held while this process may change the deployment.
    lock: Option<DeploymentLock>,
    /// What the operator has to do, when the last operation stopped to wait for them (not
    /// finished, not failed): `main` reports it with its own event and exit status.
    pub waiting: Option<String>,
}

impl Deployer {
    pub fn new(cfg: DeployerConfig, json: bool) -> Result<Deployer> {
        let provider: Box<dyn Provider> = match cfg.provider.kind {
            ProviderKind::Local => Box::new(LocalProvider::new(&cfg.state_dir, &cfg.lb_binary)),
            ProviderKind::Machines => {
                let m = cfg
                    .machines
                    .as_ref()
                    .ok_or_else(|| anyhow!("[machines] section missing"))?;
                Box::new(MachinesProvider::new(m, &cfg.deployment, &cfg.state_dir))
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
            waiting: None,
        })
    }

    /// Takes the deployment's lock (once per process); refuses at once if another deployer
    /// holds it.
    pub fn lock(&mut self) -> Result<()> {
        if self.lock.is_none() {
            self.lock = Some(DeploymentLock::acquire(&self.cfg.state_dir)?);
        }
        Ok(())
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

    /// The recorded operation, if it is unfinished.
    pub fn unfinished(&self) -> Result<Option<Journal>> {
        Ok(self
            .journal
            .load()?
            .filter(|j| j.state == JournalState::InProgress))
    }

    pub fn refuse_if_unfinished(&self) -> Result<()> {
        if let Some(j) = self.unfinished()? {
            bail!(
                "an unfinished {} is recorded in {} (steps done: {}): {}",
                j.operation.command(),
                self.journal.path.display(),
                j.steps_done().join(", "),
                next_command(&j)
            );
        }
        Ok(())
    }

    pub fn save(&self, j: &Journal) -> Result<()> {
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
