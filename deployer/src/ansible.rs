//! Running the playbooks in `ansible/` on the instances of one step.
//!
//! Per run the deployer writes an inventory and a variables file (JSON) under the state
//! directory, runs `ansible-playbook` with a timeout while its output streams to the terminal
//! (stderr, so `--json` keeps stdout clean), and maps the exit status to a clear error. SSH
//! host keys are accepted on first use into a per-deployment known_hosts file; checking is
//! never turned off.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::config::DeployerConfig;
use crate::provider::{Instance, Provider, Role};

/// The tag of the nameserver role's access part (allow-query, transfers, firewall), re-run
/// alone on serving nameservers when the set of lbs changes.
pub const ACCESS_TAG: &str = "nameserver-access";

/// What went wrong with a playbook run.
#[derive(Debug, thiserror::Error)]
pub enum AnsibleError {
    #[error("cannot run {command}: {source} (install ansible-core: pip install ansible-core)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("ansible-playbook {playbook} timed out after {0:?} and was stopped", .timeout)]
    Timeout { playbook: String, timeout: Duration },
    #[error(
        "ansible-playbook {playbook} failed: {meaning} (exit status {code}); its output is above"
    )]
    Failed {
        playbook: String,
        code: i32,
        meaning: &'static str,
    },
    #[error("cannot write the ansible run files in {dir}: {source}")]
    Files {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The meaning of `ansible-playbook`'s exit codes.
pub fn exit_meaning(code: i32) -> &'static str {
    match code {
        1 => "an error occurred",
        2 => "one or more hosts failed a task",
        3 => "one or more hosts were unreachable",
        4 => "the playbook or inventory could not be parsed",
        5 => "bad or incomplete options",
        99 => "interrupted",
        250 => "unexpected error",
        _ => "unknown failure",
    }
}

/// The inventory for one run: `targets` in their group; every known lb in `lbs` too, so the
/// nameservers answer (allow-query) and let through their firewall exactly the load
/// balancers. An instance on the VLAN carries `vlan_address`, and a nameserver on it
/// `nameserver_vlan_interface` (it then takes DNS from the lbs' VLAN addresses, on that
/// interface only).
pub fn inventory(
    provider: &dyn Provider,
    targets: &[Instance],
    known_lbs: &[Instance],
    cfg: &DeployerConfig,
    known_hosts: &std::path::Path,
) -> Value {
    let mut ns = Map::new();
    let mut lbs = Map::new();
    let host_entry = |i: &Instance| {
        let mut vars = provider.host_vars(i);
        if vars.get("ansible_connection").and_then(Value::as_str) != Some("local") {
            vars.insert(
                "ansible_ssh_common_args".into(),
                json!(format!(
                    "-o UserKnownHostsFile={} -o StrictHostKeyChecking=accept-new",
                    known_hosts.display()
                )),
            );
        }
        // The zones are a host variable (not an extra var) so that a per-instance `vars` entry
        // in deployer.toml can still override them; host vars beat the playbook's group_vars.
        vars.insert("dns_zones".into(), zones_var(cfg));
        if let Some(a) = i.private_address {
            vars.insert("vlan_address".into(), json!(a.to_string()));
            if i.role == Role::Nameserver {
                vars.insert(
                    "nameserver_vlan_interface".into(),
                    json!(cfg.network.interface),
                );
            }
        }
        let base = i.label.trim_end_matches("-next");
        let extra = match i.role {
            Role::Nameserver => cfg
                .nameservers
                .iter()
                .find(|n| n.name == base)
                .map(|n| &n.vars),
            Role::Lb => cfg.lbs.iter().find(|l| l.name == base).map(|l| &l.vars),
        };
        for (k, v) in extra.into_iter().flatten() {
            vars.insert(k.clone(), v.clone());
        }
        Value::Object(vars)
    };
    for i in targets {
        match i.role {
            Role::Nameserver => ns.insert(i.label.clone(), host_entry(i)),
            Role::Lb => lbs.insert(i.label.clone(), host_entry(i)),
        };
    }
    for i in known_lbs {
        if !lbs.contains_key(&i.label) {
            let mut entry = json!({ "ansible_host": i.address.to_string() });
            if let Some(a) = i.private_address {
                entry["vlan_address"] = json!(a.to_string());
            }
            lbs.insert(i.label.clone(), entry);
        }
    }
    json!({ "all": { "children": {
        "nameservers": { "hosts": ns },
        "lbs": { "hosts": lbs },
    }}})
}

/// The `dns_zones` variable for the roles, from the deployer's `[zones]`.
fn zones_var(cfg: &DeployerConfig) -> Value {
    Value::Array(
        cfg.zones
            .names
            .iter()
            .map(|z| {
                let name = z.trim_end_matches('.');
                json!({ "name": name, "file": format!("{name}.zone") })
            })
            .collect(),
    )
}

/// Variables for every host of a run (paths of the zone sources and the lb binary; from
/// `[network]`, the shared input `admin_networks` for both firewalls and the deployer's
/// `check_address` for the nameservers' allow lists), plus `[ansible] extra_vars`; passed with
/// `-e`, so they win over everything. The roles' variables are prefixed with the role's name
/// (`lb_`, `nameserver_`); the shared inputs without a prefix (`admin_networks`, `dns_zones`,
/// `vlan_address`) are documented in ansible/group_vars/all.yml.
pub fn run_vars(cfg: &DeployerConfig) -> Value {
    let mut m = Map::new();
    m.insert(
        "nameserver_zones_src".into(),
        json!(cfg.ansible_dir.join("zones")),
    );
    m.insert("lb_binary_src".into(), json!(cfg.lb_binary));
    if !cfg.network.admin_networks.is_empty() {
        m.insert("admin_networks".into(), json!(cfg.network.admin_networks));
    } else if let (crate::config::ProviderKind::Machines, Some(mc)) =
        (cfg.provider.kind, cfg.machines.as_ref())
    {
        // The machines are administered from this host, through its public-bridge address.
        m.insert(
            "admin_networks".into(),
            json!([format!("{}/32", mc.host_address())]),
        );
    }
    if let Some(a) = cfg.network.check_address {
        m.insert("nameserver_check_addresses".into(), json!([a.to_string()]));
    }
    for (k, v) in &cfg.ansible.extra_vars {
        m.insert(k.clone(), v.clone());
    }
    Value::Object(m)
}

/// Runs `playbook` against `inventory` with `vars` (only the tasks tagged `tags`, when given),
/// streaming its output to stderr.
pub fn run_playbook(
    cfg: &DeployerConfig,
    playbook: &str,
    run_name: &str,
    inventory: &Value,
    vars: &Value,
    tags: Option<&str>,
    timeout: Duration,
) -> Result<(), AnsibleError> {
    let dir = cfg.state_dir.join("runs").join(run_name);
    let files = |source| AnsibleError::Files {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(files)?;
    let inv = dir.join("inventory.json");
    let varfile = dir.join("vars.json");
    std::fs::write(
        &inv,
        serde_json::to_vec_pretty(inventory).unwrap_or_default(),
    )
    .map_err(files)?;
    std::fs::write(
        &varfile,
        serde_json::to_vec_pretty(vars).unwrap_or_default(),
    )
    .map_err(files)?;

    let command = cfg
        .ansible
        .playbook_command
        .clone()
        .unwrap_or_else(|| "ansible-playbook".into());
    let stderr_fd = std::io::stderr();
    let out = std::os::fd::AsFd::as_fd(&stderr_fd)
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::inherit());
    let mut cmd = Command::new(&command);
    if let Some(t) = tags {
        cmd.arg("--tags").arg(t);
    }
    cmd.arg("-i")
        .arg(&inv)
        .arg(cfg.ansible_dir.join(playbook))
        .arg("-e")
        .arg(format!("@{}", varfile.display()))
        .env("ANSIBLE_CONFIG", cfg.ansible_dir.join("ansible.cfg"))
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_NOCOLOR", "1")
        .stdin(Stdio::null())
        .stdout(out);
    // Its own process group (a timeout stops ansible and everything it started), SIGTERM if
    // the deployer dies, stopped before the deployer exits on SIGINT/SIGTERM; a crash point
    // kills the group with the deployer, as a killed process group would be.
    let mut child = crate::children::spawn(&mut cmd).map_err(|source| AnsibleError::Spawn {
        command: command.clone(),
        source,
    })?;
    let status = child
        .wait_deadline(timeout, crate::children::GRACE)
        .map_err(|source| AnsibleError::Spawn {
            command: command.clone(),
            source,
        })?;
    match status {
        None => Err(AnsibleError::Timeout {
            playbook: playbook.into(),
            timeout,
        }),
        Some(st) if st.success() => Ok(()),
        Some(st) => {
            let code = st.code().unwrap_or(250);
            Err(AnsibleError::Failed {
                playbook: playbook.into(),
                code,
                meaning: exit_meaning(code),
            })
        }
    }
}
