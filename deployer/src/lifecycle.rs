//! Instance lifecycle within an operation: create (adopting what a killed run created),
//! provision with Ansible, check, delete the old, rename `NAME-next` to `NAME`, and delete what
//! an undone operation created.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::ansible;
use crate::checks::{check_serving, probe_from_lb};
use crate::content::{self, AskError, Asker};
use crate::context::Deployer;
use crate::drain::scrape_queries;
use crate::journal::{Journal, Step};
use crate::lbctl::LbControl;
use crate::network;
use crate::provider::{Instance, InstanceSpec, OperationMark, ProviderError, Role};
use crate::zones::{RrsetKey, ZoneContent};

/// Creates the instances of `role` (labels `NAME-next` when `next`) and waits until they run.
///
/// Each label is recorded in the journal *before* its create call, so an instance created by a
/// run killed before it recorded the id is adopted by label instead of created twice.
pub fn create(d: &Deployer, j: &mut Journal, role: Role, next: bool) -> Result<String> {
    let label = |name: &str| {
        if next {
            format!("{name}-next")
        } else {
            name.to_string()
        }
    };
    // Kept with each instance: any deployer can tell which operation it belongs to.
    let mark = OperationMark {
        operation: j.operation,
        started_unix: j.started_unix,
    };
    let specs: Vec<InstanceSpec> = match role {
        Role::Nameserver => d
            .cfg
            .nameservers
            .iter()
            .map(|n| InstanceSpec {
                label: label(&n.name),
                role,
                region: n.region.clone(),
                instance_type: n.instance_type.clone(),
                image: n.image.clone(),
                vlan: None,
                operation: Some(mark),
            })
            .collect(),
        Role::Lb => d
            .cfg
            .lbs
            .iter()
            .map(|l| InstanceSpec {
                label: label(&l.name),
                role,
                region: l.region.clone(),
                instance_type: l.instance_type.clone(),
                image: l.image.clone(),
                vlan: None,
                operation: Some(mark),
            })
            .collect(),
    };
    for spec in &specs {
        if j.created.iter().any(|i| i.label == spec.label) {
            continue;
        }
        if let Some(existing) = d.find(&spec.label)? {
            if j.creating.contains(&spec.label) {
                j.created.push(existing);
                j.creating.retain(|l| l != &spec.label);
                d.save(j)?;
                continue;
            }
            bail!(
                "instance {} (id {}) already exists and this run did not create it: run `deployer rollback`, or delete it",
                spec.label,
                existing.id
            );
        }
        // The VLAN address is recorded before the label, and both before the create call.
        let mut spec = spec.clone();
        spec.vlan = network::attachment(d, j, &spec.label)?;
        j.creating.push(spec.label.clone());
        d.save(j)?;
        d.out.doing(&format!("creating {}", spec.label));
        let inst = match d.provider.create(&spec) {
            Ok(inst) => inst,
            Err(e) if e.create_refused() => {
                // Nothing was created: this operation has no claim on the label, so no undo
                // may adopt (and delete) whatever instance has it.
                j.creating.retain(|l| l != &spec.label);
                d.save(j)?;
                return Err(match e {
                    ProviderError::LabelInUse { .. } => anyhow!(e).context(format!(
                        "creating {}: the label belongs to an instance this run did not create (someone else's, or one an earlier run left); it is neither adopted nor deleted: rename or delete it, then run the command again",
                        spec.label
                    )),
                    _ => anyhow!(e).context(format!("creating {}", spec.label)),
                });
            }
            Err(e) => {
                // A lost or timed-out reply, or a server error: the instance may exist. It was
                // being created by this operation (the label is in `creating`), so an instance
                // with the label and the deployment's tag is this create's.
                d.out.info(&format!(
                    "create of {} failed with an unknown outcome ({e}); looking the label up",
                    spec.label
                ));
                match d.find(&spec.label) {
                    Ok(Some(found)) => {
                        d.out.info(&format!(
                            "{} (id {}) was created after all: adopted",
                            found.label, found.id
                        ));
                        found
                    }
                    // Still in `creating`: a rollback or resume looks it up again.
                    Ok(None) => {
                        return Err(anyhow!(e).context(format!(
                            "creating {} (no instance with the label exists now; a rollback looks for it again)",
                            spec.label
                        )))
                    }
                    Err(l) => {
                        return Err(anyhow!(e).context(format!(
                            "creating {} (and looking the label up after it: {l:#}; a rollback looks for it again)",
                            spec.label
                        )))
                    }
                }
            }
        };
        j.created.push(inst);
        j.creating.retain(|l| l != &spec.label);
        d.save(j)?;
    }
    let mut made = Vec::new();
    for i in 0..j.created.len() {
        if j.created[i].role != role {
            continue;
        }
        d.out
            .doing(&format!("waiting for {} to boot", j.created[i].label));
        let running = d
            .provider
            .wait_running(j.created[i].id, d.cfg.timeouts.boot())
            .with_context(|| format!("waiting for {} to boot", j.created[i].label))?;
        // "Running" at a cloud comes well before sshd listens; provisioning needs SSH.
        d.wait_ssh(&running)?;
        j.created[i] = running;
        made.push(format!(
            "{} (id {}, {})",
            j.created[i].label,
            j.created[i].id,
            j.created[i].dns_addr()
        ));
    }
    d.save(j)?;
    Ok(made.join(", "))
}

/// The instances of `role` this operation created.
pub fn created(j: &Journal, role: Role) -> Vec<Instance> {
    j.created
        .iter()
        .filter(|i| i.role == role)
        .cloned()
        .collect()
}

/// Runs the role's playbook on the instances of `role` this operation created.
pub fn provision(d: &Deployer, j: &Journal, role: Role) -> Result<String> {
    let targets = created(j, role);
    // Existing lbs are listed only for the nameservers (rate-limit exemptions); a play on
    // `lbs` must touch nothing but the new instances.
    let lbs = match role {
        Role::Nameserver => d.lb_instances()?,
        Role::Lb => Vec::new(),
    };
    let known_hosts = d.cfg.state_dir.join("known_hosts");
    let mut inv = ansible::inventory(d.provider.as_ref(), &targets, &lbs, &d.cfg, &known_hosts);
    if role == Role::Lb {
        // Each lb starts pointed at the nameservers it fronts.
        let hosts = inv["all"]["children"]["lbs"]["hosts"]
            .as_object_mut()
            .ok_or_else(|| anyhow!("inventory has no lbs"))?;
        for t in &targets {
            let base = t.label.trim_end_matches("-next");
            let backends = planned_backends(d, j, base)?;
            if let Some(Value::Object(h)) = hosts.get_mut(&t.label) {
                h.insert("lb_backends".into(), json!(backends));
            }
        }
    }
    let (playbook, what) = match role {
        Role::Nameserver => ("nameserver.yml", "nameservers"),
        Role::Lb => ("lb.yml", "lbs"),
    };
    let vars = ansible::run_vars(&d.cfg);
    let run = format!("{}-{what}", j.started_unix);
    d.out.doing(&format!(
        "provisioning {} (ansible-playbook {playbook})",
        targets
            .iter()
            .map(|i| i.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    ansible::run_playbook(
        &d.cfg,
        playbook,
        &run,
        &inv,
        &vars,
        None,
        d.cfg.timeouts.provision(),
    )?;
    Ok(targets
        .iter()
        .map(|i| i.label.clone())
        .collect::<Vec<_>>()
        .join(", "))
}

/// The backends lb `name` should serve from for this operation: the nameservers it fronts.
pub fn planned_backends(d: &Deployer, j: &Journal, name: &str) -> Result<Vec<String>> {
    d.lb_config(name)?
        .fronts
        .iter()
        .map(|f| d.nameserver_addr(j, f))
        .collect()
}

/// Re-runs the nameserver role's access part (`--tags nameserver-access`: allow-query and the
/// firewall) on every nameserver of the deployment, with the lbs that exist now: roll-lb adds
/// the `-next` lbs this way before they are provisioned, and removes the deleted ones at its
/// end (and when it is undone). Zones and the rest of named.conf are not touched.
pub fn allow_lbs(d: &Deployer, j: &Journal, step: &str) -> Result<String> {
    let all = d.provider.list()?;
    let nameservers: Vec<Instance> = all
        .iter()
        .filter(|i| i.role == Role::Nameserver)
        .cloned()
        .collect();
    let lbs: Vec<Instance> = all.iter().filter(|i| i.role == Role::Lb).cloned().collect();
    if nameservers.is_empty() {
        return Ok("no nameserver to update".into());
    }
    let known_hosts = d.cfg.state_dir.join("known_hosts");
    let inv = ansible::inventory(
        d.provider.as_ref(),
        &nameservers,
        &lbs,
        &d.cfg,
        &known_hosts,
    );
    let vars = ansible::run_vars(&d.cfg);
    ansible::run_playbook(
        &d.cfg,
        "nameserver.yml",
        &format!("{}-{step}", j.started_unix),
        &inv,
        &vars,
        Some(ansible::ACCESS_TAG),
        d.cfg.timeouts.provision(),
    )?;
    Ok(format!(
        "nameservers {} answer lbs {}",
        nameservers
            .iter()
            .map(|i| i.label.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        lbs.iter()
            .map(|i| i.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The lb a new nameserver is checked from (the nameservers answer only lbs): the first lb of
/// the config that fronts it, else the first that exists.
fn checking_lb(d: &Deployer, nameserver: &str) -> Result<(String, LbControl)> {
    let fronting = d
        .cfg
        .lbs
        .iter()
        .filter(|l| l.fronts.iter().any(|f| f == nameserver));
    let others = d
        .cfg
        .lbs
        .iter()
        .filter(|l| !l.fronts.iter().any(|f| f == nameserver));
    for l in fronting.chain(others) {
        if let Some(inst) = d.find(&l.name)? {
            return Ok((
                l.name.clone(),
                d.provider.lb_control(&inst, &l.control_socket),
            ));
        }
    }
    bail!(
        "no lb exists to check nameserver {nameserver} from (nameservers answer only the lbs, loopback and [network] check_address): create the lbs first, or set [network] check_address to the deployer's address"
    )
}

/// Every created instance of `role` answers authoritatively with the expected serials, then
/// serves exactly the content of the zone files (every RRset, or a sample of a large zone, and
/// the smoke checks: see [`crate::content`]): from an lb (`lb ctl probe` and `lb ctl query`,
/// over TCP too, to the address lbs use), or directly from the deployer when `[network]
/// check_address` says the nameservers allow it.
pub fn check_new(d: &Deployer, j: &Journal, role: Role) -> Result<String> {
    let zones = content::read_zones(&d.cfg).map_err(|e| anyhow!(e))?;
    let mut done = Vec::new();
    for i in created(j, role) {
        match d.cfg.network.check_address {
            Some(from) => {
                // The address lbs use: on a VLAN the nameservers take DNS there only (and the
                // config check makes sure `from` is on it).
                check_serving(i.backend_addr(), &j.serials, d.cfg.timeouts.check())
                    .map_err(|e| anyhow!("{} does not serve the zones: {e}", i.label))?;
                let what = check_content(d, &Asker::Direct(i.backend_addr()), &zones)
                    .map_err(|e| anyhow!("{} ({}): {e}", i.label, i.backend_addr()))?;
                done.push(format!(
                    "{} authoritative (checked directly from {from}; {what})",
                    i.label
                ));
            }
            None => {
                let base = i.label.trim_end_matches("-next");
                let (lb, ctl) = checking_lb(d, base)?;
                probe_from_lb(
                    &ctl,
                    i.backend_addr(),
                    &j.serials,
                    d.cfg.timeouts.check(),
                    d.cfg.timeouts.ctl(),
                )
                .map_err(|e| {
                    anyhow!(
                        "{} does not serve the zones (probed from lb {lb}): {e}",
                        i.label
                    )
                })?;
                let asker = Asker::FromLb {
                    lb: &lb,
                    ctl: &ctl,
                    backend: i.backend_addr(),
                };
                match check_content(d, &asker, &zones) {
                    Ok(what) => done.push(format!(
                        "{} authoritative (probed from lb {lb}; {what})",
                        i.label
                    )),
                    Err(AskError::Unsupported(why)) => {
                        d.out.info(&format!(
                            "warning: the content of {} is not checked before the flip: {why}; it is checked through every lb after the flip",
                            i.label
                        ));
                        done.push(format!("{} authoritative (probed from lb {lb})", i.label));
                    }
                    Err(e) => bail!("{} (asked from lb {lb}): {e}", i.label),
                }
            }
        }
    }
    Ok(format!(
        "{}; serials {}",
        done.join(", "),
        fmt_serials(&j.serials)
    ))
}

/// The content of the zones on the server behind `asker` is the zone files' (see
/// [`content::check_server`]); the RRsets changed since the last recorded deployment are
/// always asked, even in a sampled zone.
pub fn check_content(
    d: &Deployer,
    asker: &Asker,
    zones: &[ZoneContent],
) -> Result<String, AskError> {
    let timeout = match asker {
        Asker::Direct(_) => d.cfg.timeouts.check(),
        Asker::FromLb { .. } => d.cfg.timeouts.ctl(),
    };
    let always: Vec<RrsetKey> = zones
        .iter()
        .filter_map(|z| {
            content::recorded(&d.cfg.state_dir, &z.zone).map(|r| content::changed_keys(&r, z))
        })
        .flatten()
        .collect();
    content::check_server(asker, zones, &d.cfg.checks, &always, timeout)
}

/// The new lbs serve every zone over UDP and TCP with the zone files' content, and their
/// metrics endpoint is up.
pub fn check_new_lbs(d: &Deployer, j: &Journal) -> Result<String> {
    let zones = content::read_zones(&d.cfg).map_err(|e| anyhow!(e))?;
    let mut out = Vec::new();
    for i in created(j, Role::Lb) {
        check_serving(i.dns_addr(), &j.serials, d.cfg.timeouts.check())
            .map_err(|e| anyhow!("new lb {} does not serve the zones: {e}", i.label))?;
        let what = check_content(d, &Asker::Direct(i.dns_addr()), &zones)
            .map_err(|e| anyhow!("new lb {} ({}): {e}", i.label, i.dns_addr()))?;
        scrape_queries(i.metrics_addr(), d.cfg.timeouts.ctl()).map_err(|e| {
            anyhow!(
                "new lb {}: /metrics at {} is not up: {e:#}",
                i.label,
                i.metrics_addr()
            )
        })?;
        out.push(format!(
            "{} ({}) ok, {what}, metrics up",
            i.label,
            i.dns_addr()
        ));
    }
    Ok(out.join(", "))
}

/// Deletes the instances this operation replaces (the caller has entered the forward phase).
pub fn delete_old(d: &Deployer, j: &Journal, step: Step) -> Result<String> {
    let mut out = Vec::new();
    for i in &j.old {
        d.faults.point(&format!("{step}:{}:before", i.label));
        d.delete_instance(i)?;
        out.push(format!("{} (id {})", i.label, i.id));
        if d.faults.fail_at(step) {
            bail!(
                "failure injected at step {step} after deleting {} (DEPLOYER_FAIL_AT)",
                i.label
            );
        }
    }
    Ok(out.join(", "))
}

/// Renames every created `NAME-next` to `NAME`, recording each rename.
pub fn rename(d: &Deployer, j: &mut Journal, step: Step) -> Result<String> {
    let mut out = Vec::new();
    for k in 0..j.created.len() {
        let i = j.created[k].clone();
        let Some(base) = i.label.strip_suffix("-next") else {
            continue;
        };
        d.faults.point(&format!("{step}:{}:before", i.label));
        d.provider
            .rename(i.id, base)
            .with_context(|| format!("renaming {} to {base}", i.label))?;
        j.created[k].label = base.to_string();
        d.save(j)?;
        out.push(format!("{} -> {base}", i.label));
    }
    Ok(out.join(", "))
}

/// Deletes everything the operation created (and adopts, then deletes, an instance whose
/// create was in flight when a run died). Returns the errors; what was deleted leaves the
/// journal.
pub fn delete_created(d: &Deployer, j: &mut Journal) -> Result<Vec<String>> {
    let mut errors = Vec::new();
    for label in j.creating.clone() {
        match d.find(&label) {
            Ok(Some(i)) => {
                if !j.created.iter().any(|c| c.id == i.id) {
                    j.created.push(i);
                }
                j.creating.retain(|l| l != &label);
            }
            Ok(None) => j.creating.retain(|l| l != &label),
            Err(e) => errors.push(format!("looking up {label}: {e:#}")),
        }
    }
    d.save(j)?;
    for i in j.created.clone() {
        d.faults.point(&format!("rollback:{}:before", i.label));
        match d.delete_instance(&i) {
            Ok(()) => {
                d.out
                    .info(&format!("rollback: deleted {} (id {})", i.label, i.id));
                j.created.retain(|c| c.id != i.id);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        d.save(j)?;
    }
    Ok(errors)
}

pub fn fmt_serials(s: &[(String, u32)]) -> String {
    s.iter()
        .map(|(z, n)| format!("{z} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
