//! The Ansible roles for real: lint, syntax, the nameserver role applied locally (as the local
//! provider does), validation failures, idempotence, and the lb role.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use integration_tests::*;
use serde_json::json;

fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ansible")
        .canonicalize()
        .unwrap()
}

/// Runs a playbook against a one-host local inventory; returns (exit code, output).
fn playbook(
    playbook: &str,
    group: &str,
    host_vars: serde_json::Value,
    extra: &[(&str, &str)],
    dir: &Path,
) -> (i32, String) {
    let mut vars = host_vars;
    vars["ansible_connection"] = json!("local");
    vars["ansible_python_interpreter"] = json!("{{ ansible_playbook_python }}");
    let inv = json!({"all": {"children": {group: {"hosts": {"test-host": vars}}}}});
    let inv_path = dir.join("inventory.json");
    std::fs::write(&inv_path, inv.to_string()).unwrap();
    let mut c = Command::new("ansible-playbook");
    c.arg("-i").arg(&inv_path).arg(ansible_dir().join(playbook));
    for (k, v) in extra {
        c.arg("-e").arg(format!("{k}={v}"));
    }
    let out = c
        .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .expect("ansible-playbook (pip install ansible-core)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn changed(output: &str) -> usize {
    output
        .lines()
        .filter(|l| l.contains("changed="))
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

/// Kills the process named by a pid file when dropped (the roles start daemons).
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[test]
fn lint_production_profile_and_syntax_check() {
    let out = Command::new("ansible-lint")
        .args([
            "--nocolor",
            "--profile",
            "production",
            "nameserver.yml",
            "lb.yml",
        ])
        .current_dir(ansible_dir())
        .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .output()
        .expect("ansible-lint (pip install ansible-lint)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for p in ["nameserver.yml", "lb.yml"] {
        let out = Command::new("ansible-playbook")
            .args(["--syntax-check", p])
            .current_dir(ansible_dir())
            .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn nameserver_role_serves_authoritatively_and_is_idempotent() {
    let dir = TempDir::new("ns-role");
    let port = free_port();
    let vars = json!({
        "nameserver_mode": "local",
        "nameserver_dir": dir.path().join("ns"),
        "nameserver_listen_address": "127.0.0.1",
        "nameserver_port": port,
    });
    let (code, out) = playbook(
        "nameserver.yml",
        "nameservers",
        vars.clone(),
        &[],
        dir.path(),
    );
    let _guard = KillOnDrop(dir.path().join("ns/named.pid"));
    assert_eq!(code, 0, "{out}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let m = udp_query(
        addr,
        "example.test.",
        RecordType::SOA,
        Duration::from_secs(3),
    )
    .expect("named answers");
    assert!(m.metadata.authoritative);
    let zone = std::fs::read_to_string(ansible_dir().join("zones/example.test.zone")).unwrap();
    let serial: u32 = zone
        .lines()
        .find(|l| l.contains("; serial"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(soa_serial(&m), Some(serial));
    let m = udp_query(
        addr,
        "www.example.test.",
        RecordType::AAAA,
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(m.answers.len(), 1);
    // Not an open resolver: names outside its zones are refused.
    let m = udp_query(addr, "example.com.", RecordType::A, Duration::from_secs(3)).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // Version hidden.
    let conf = std::fs::read_to_string(dir.path().join("ns/named.conf")).unwrap();
    assert!(
        conf.contains("version none;")
            && conf.contains("recursion no;")
            && conf.contains("rate-limit")
    );

    let (code, out) = playbook("nameserver.yml", "nameservers", vars, &[], dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(changed(&out), 0, "a second run changes nothing:\n{out}");
}

#[test]
fn a_broken_zone_fails_with_named_checkzone_and_leaves_nothing_running() {
    let dir = TempDir::new("ns-broken");
    let zones = dir.path().join("zones");
    std::fs::create_dir_all(&zones).unwrap();
    std::fs::write(
        zones.join("example.test.zone"),
        "$TTL 300\n@ IN SOA ns1 host 1 2 3 4 5\n@ IN NS ns1\nns1 IN A 192.0.2.1\nwww IN A 300.1.1.1\n",
    )
    .unwrap();
    let vars = json!({
        "nameserver_mode": "local",
        "nameserver_dir": dir.path().join("ns"),
        "nameserver_listen_address": "127.0.0.1",
        "nameserver_port": free_port(),
    });
    let (code, out) = playbook(
        "nameserver.yml",
        "nameservers",
        vars,
        &[("nameserver_zones_src", &zones.display().to_string())],
        dir.path(),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("bad dotted quad") && out.contains("failed to validate"),
        "{out}"
    );
    assert!(
        !dir.path().join("ns/named.pid").exists(),
        "named was never started"
    );
    assert!(
        !dir.path().join("ns/zones/example.test.zone").exists(),
        "the bad zone was not installed"
    );
}

#[test]
fn lb_role_runs_lb_and_is_idempotent() {
    let ns = Named::start(ZoneSpec::new(5, "a"));
    let dir = TempDir::new("lb-role");
    let port = free_port();
    let vars = json!({
        "lb_mode": "local",
        "lb_dir": dir.path().join("lb"),
        "lb_listen": [format!("127.0.0.1:{port}")],
        "lb_metrics_listen": "127.0.0.1:0",
        "lb_backends": [ns.addr.to_string()],
        "lb_binary_src": bin("lb"),
        "lb_workers": 1,
    });
    let (code, out) = playbook("lb.yml", "lbs", vars.clone(), &[], dir.path());
    let _guard = KillOnDrop(dir.path().join("lb/lb.pid"));
    assert_eq!(code, 0, "{out}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let m = udp_query(
        addr,
        "example.test.",
        RecordType::SOA,
        Duration::from_secs(3),
    )
    .expect("lb answers");
    assert_eq!(soa_serial(&m), Some(5));
    let (code, out) = playbook("lb.yml", "lbs", vars, &[], dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(changed(&out), 0, "a second run changes nothing:\n{out}");
}
