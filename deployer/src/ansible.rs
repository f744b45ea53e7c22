//! Running the playbooks in `ansible/` on the instances of one step.
//!
//! Per run the deployer writes an inventory and a variables file (JSON, 0600 in 0700
//! directories: the variables may carry secrets) under the state directory, removed once the
//! run succeeded and kept when it failed, runs `ansible-playbook` with a timeout while its output streams to the terminal
//! (stderr, so `--json` keeps stdout clean), and maps the exit status to a clear error. SSH
//! host keys are accepted on first use into a per-deployment known_hosts file; checking is
//! never turned off.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::config::DeployerConfig;
use crate::provider::{Instance, Provider, Role};

/// Test hook: set (to anything), the run files of successful runs are kept too.
pub const KEEP_RUNS_VAR: &str = "DEPLOYER_KEEP_RUNS";

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
    #[error("ansible-playbook {playbook} timed out after {0:?} and was stopped; its inventory and variables are kept in {files} (0600)", .timeout)]
    Timeout {
        playbook: String,
        timeout: Duration,
        files: PathBuf,
    },
    #[error(
        "ansible-playbook {playbook} failed: {meaning} (exit status {code}); its output is above, its inventory and variables are kept in {files} (0600)"
    )]
    Failed {
        playbook: String,
        code: i32,
        meaning: &'static str,
        files: PathBuf,
    },
    #[error("cannot write the ansible run files in {dir}: {source}")]
    Files {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The meaning of `ansible-playbook`'s exit codes, as ansible-core sets them
/// (`ansible.errors.ExitCode` and the task queue manager's `RUN_*` codes): 2 a host failed a
/// task (`RUN_FAILED_HOSTS`), 4 a host was unreachable (`RUN_UNREACHABLE_HOSTS`, which the
/// strategy returns before failed hosts when both happened). ansible-core gives 4 to a parser
/// error of the playbook or inventory too (its own FIXME: `PARSER_ERROR = 4` "conflicts with
/// HOST_UNREACHABLE"); that one comes before any host is contacted, and its message says so.
/// 3 is not used by ansible-core (older documentation listed it for unreachable hosts).
pub fn exit_meaning(code: i32) -> &'static str {
    match code {
        1 => "an error occurred",
        2 => "one or more hosts failed a task",
        4 => "one or more hosts were unreachable (SSH failed: is the instance up, its address in the known_hosts file under the state directory current, and the deployer's address in [network] admin_networks?); ansible-core also exits 4 when the playbook or inventory cannot be parsed, before any host is contacted",
        5 => "bad or incomplete options",
        8 => "a host failed and the play was stopped (any_errors_fatal or max_fail_percentage)",
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
    // The variables may hold secrets ([ansible] extra_vars): 0600 files in 0700 directories,
    // removed once the run succeeded (kept on failure, to look at).
    // A name of its own: the files a failed run left (perhaps within the same second, under
    // the same name) stay as they are.
    let runs = cfg.state_dir.join("runs");
    let dir = (1..)
        .map(|n| match n {
            1 => runs.join(run_name),
            n => runs.join(format!("{run_name}.{n}")),
        })
        .find(|d| !d.exists())
        .expect("an unused name");
    let files = |source| AnsibleError::Files {
        dir: dir.clone(),
        source,
    };
    crate::private::create_dir(&cfg.state_dir).map_err(files)?;
    crate::private::create_dir(&dir).map_err(files)?;
    let inv = dir.join("inventory.json");
    let varfile = dir.join("vars.json");
    crate::private::write(
        &inv,
        &serde_json::to_vec_pretty(inventory).unwrap_or_default(),
    )
    .map_err(files)?;
    crate::private::write(
        &varfile,
        &serde_json::to_vec_pretty(vars).unwrap_or_default(),
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
    // Not the deployer's environment (LINODE_TOKEN): what Ansible and its ssh need, then the
    // deployer's own settings.
    crate::children::restrict_env(&mut cmd, crate::children::ChildEnv::Ansible);
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
            files: dir,
        }),
        Some(st) if st.success() => {
            if std::env::var_os(KEEP_RUNS_VAR).is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(())
        }
        Some(st) => {
            let code = st.code().unwrap_or(250);
            Err(AnsibleError::Failed {
                playbook: playbook.into(),
                code,
                meaning: exit_meaning(code),
                files: dir,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_mean_what_ansible_core_says() {
        assert!(
            exit_meaning(4).contains("unreachable"),
            "RUN_UNREACHABLE_HOSTS"
        );
        assert!(
            exit_meaning(2).contains("failed a task"),
            "RUN_FAILED_HOSTS"
        );
        assert!(!exit_meaning(3).contains("unreachable"), "3 is not used");
        assert_eq!(exit_meaning(3), "unknown failure");
    }
}
