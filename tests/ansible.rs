//! Running the repository's playbooks against a JSON inventory, as the deployer does.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// The repository's `ansible/` directory.
pub fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ansible")
        .canonicalize()
        .unwrap()
}

/// Host variables for this machine as the target (connection local, the playbook's Python).
pub fn local_host(vars: &Value) -> Value {
    let mut host = vars.clone();
    host["ansible_connection"] = json!("local");
    host["ansible_python_interpreter"] = json!("{{ ansible_playbook_python }}");
    host
}

/// Runs `playbook` against inventory `inv` (written into `dir`) with extra arguments, as if the
/// play connected over SSH from `ssh_from` (the firewall tasks read `SSH_CONNECTION` to refuse
/// rules that would cut off their own connection); never with the test runner's own SSH
/// session. Returns (exit code, stdout and stderr).
pub fn run_playbook(
    playbook: &str,
    inv: &Value,
    args: &[&str],
    dir: &Path,
    ssh_from: Option<&str>,
) -> (i32, String) {
    let inv_path = dir.join("inventory.json");
    std::fs::write(&inv_path, inv.to_string()).unwrap();
    let mut c = Command::new("ansible-playbook");
    c.env_remove("SSH_CONNECTION");
    if let Some(from) = ssh_from {
        c.env("SSH_CONNECTION", format!("{from} 50000 10.1.1.1 22"));
    }
    let out = c
        .arg("-i")
        .arg(&inv_path)
        .arg(ansible_dir().join(playbook))
        .args(args)
        .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .expect("ansible-playbook (pip install ansible-core)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The sum of the `changed=` counts of a play recap.
pub fn changed_count(output: &str) -> usize {
    output
        .lines()
        .filter_map(|l| {
            l.split("changed=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}
