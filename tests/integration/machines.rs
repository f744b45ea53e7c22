//! The production path on machines: Debian 12 systemd-nspawn containers booted with systemd
//! (the deployer's `machines` provider), the lb package under systemd, provisioned over SSH.
//!
//! Needs root (containers, bridges, network namespaces) and builds the machine image once
//! (`scripts/machine-image.sh`, cached). Everything a test makes is removed when it ends,
//! failed or not, and the test checks that nothing is left.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use deployer::config::{MachinesConfig, Subnet};
use deployer::provider::machines::MachinesProvider;
use integration_tests::TempDir;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The machine image (built on first use, then cached).
fn image() -> PathBuf {
    let out = Command::new(repo().join("scripts/machine-image.sh"))
        .output()
        .expect("scripts/machine-image.sh");
    assert!(
        out.status.success(),
        "machine-image.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// What is left on the host of the machines named `lbm-NAME-*` and bridges `NAME-*`.
fn leftovers(name: &str, dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&netns.stdout).lines() {
        if l.starts_with(&format!("lbm-{name}-")) {
            left.push(format!("netns {l}"));
        }
    }
    for b in ["pub", "vlan"] {
        if Path::new("/sys/class/net")
            .join(format!("{name}-{b}"))
            .exists()
        {
            left.push(format!("bridge {name}-{b}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    for m in mounts.lines() {
        if m.contains(&dir.display().to_string()) {
            left.push(format!("mount {m}"));
        }
    }
    let ps = Command::new("pgrep")
        .args(["-af", &format!("systemd-nspawn.*lbm-{name}-")])
        .output()
        .unwrap();
    for l in String::from_utf8_lossy(&ps.stdout).lines() {
        left.push(format!("process {l}"));
    }
    left
}

/// Machines of one test: torn down when dropped, even when the test fails.
struct Machines {
    provider: MachinesProvider,
    name: String,
    dir: TempDir,
}

impl Machines {
    fn new(name: &str, net: u8) -> Machines {
        let dir = TempDir::new(name);
        let cfg = MachinesConfig {
            image: image(),
            public_bridge: format!("{name}-pub"),
            public_subnet: Subnet {
                network: std::net::Ipv4Addr::new(10, net, 0, 0),
                len: 24,
            },
            private_bridge: format!("{name}-vlan"),
            ssh_key: None,
            run_dir: dir.path().join("run"),
        };
        Machines {
            provider: MachinesProvider::new(&cfg, name, &dir.path().join("machines"), dir.path()),
            name: name.to_string(),
            dir,
        }
    }

    /// Runs `script` as root on the machine at `addr` over SSH; (exit code, stdout+stderr).
    fn ssh(&self, addr: &str, script: &str) -> (i32, String) {
        let out = Command::new("ssh")
            .arg("-i")
            .arg(self.provider.ssh_key())
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.path().join("known_hosts").display()
            ))
            .args([
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "ConnectTimeout=10",
            ])
            .arg(format!("root@{addr}"))
            .arg(script)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn scp(&self, from: &Path, addr: &str, to: &str) {
        let st = Command::new("scp")
            .arg("-i")
            .arg(self.provider.ssh_key())
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.path().join("known_hosts").display()
            ))
            .arg(from)
            .arg(format!("root@{addr}:{to}"))
            .status()
            .unwrap();
        assert!(st.success(), "scp {} to {addr}:{to}", from.display());
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        if let Err(e) = self.provider.teardown_all() {
            eprintln!("teardown of {}: {e}", self.name);
        }
    }
}

/// systemd's view of lb.service on a machine: (MainPID, NRestarts).
fn lb_unit(m: &Machines, addr: &str) -> (u32, u32) {
    let (code, out) = m.ssh(
        addr,
        "systemctl show -p MainPID --value lb.service; systemctl show -p NRestarts --value lb.service",
    );
    assert_eq!(code, 0, "{out}");
    let v: Vec<u32> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(v.len(), 2, "{out}");
    (v[0], v[1])
}

/// The packaged lb under systemd as PID 1, upgraded with `lb ctl upgrade` (what the package's
/// postinst runs): the new process must keep systemd's watchdog fed (it used to inherit the
/// old process's WATCHDOG_PID, never ping, and be killed 10 s later), and lb's warnings must
/// reach the journal as warnings (priority 4), without colour codes.
#[test]
fn upgraded_lb_keeps_the_watchdog_fed_and_logs_with_priorities() {
    let m = Machines::new("mwd", 236);
    let lb = m
        .provider
        .create_extra("lb", Duration::from_secs(60))
        .unwrap();
    let addr = lb.address.to_string();
    let (deb, _) = crate::ops::test_packages();
    m.scp(deb, &addr, "/root/lb.deb");
    // A backend that does not answer: lb starts (fail-open) and logs a warning for it.
    let (code, out) = m.ssh(
        &addr,
        "set -e; dpkg -i /root/lb.deb >/dev/null; \
         sed -i 's/^servers = .*/servers = [\"127.0.0.1:1\"]/' /etc/lb/lb.toml; \
         grep -q '^\\[health\\]' /etc/lb/lb.toml || printf '\\n[health]\\nzones = [\"example.test\"]\\n' >> /etc/lb/lb.toml; \
         lb check --config /etc/lb/lb.toml; systemctl enable --now lb.service",
    );
    assert_eq!(code, 0, "{out}");
    let (pid, restarts) = lb_unit(&m, &addr);
    assert!(pid > 0 && restarts == 0, "pid {pid}, restarts {restarts}");
    let (code, out) = m.ssh(&addr, "lb ctl upgrade");
    assert_eq!(code, 0, "{out}");
    // Past the watchdog's 10 s with margin.
    std::thread::sleep(Duration::from_secs(15));
    let (pid2, restarts2) = lb_unit(&m, &addr);
    let (_, journal) = m.ssh(&addr, "journalctl -u lb.service --no-pager -o cat");
    assert!(
        !journal.contains("Watchdog timeout"),
        "systemd's watchdog killed the upgraded lb:\n{journal}"
    );
    assert_eq!(restarts2, 0, "lb was restarted:\n{journal}");
    assert_ne!(
        pid2, pid,
        "the upgrade handed over to a new process:\n{journal}"
    );
    assert!(journal.contains("serves now"), "{journal}");
    // Priorities: the backend-down warning is in `journalctl -p warning`, an info line is not.
    let (_, warnings) = m.ssh(
        &addr,
        "journalctl -u lb.service -p warning --no-pager -o cat",
    );
    assert!(
        warnings.contains("WARN") && warnings.contains("127.0.0.1:1"),
        "no lb warning at priority <= 4:\n{warnings}\nwhole journal:\n{journal}"
    );
    assert!(!warnings.contains("lb started"), "{warnings}");
    assert!(!journal.contains('\u{1b}'), "ANSI escapes in the journal");
    let (_, ident) = m.ssh(
        &addr,
        "journalctl -u lb.service -o verbose --no-pager -n 5 | grep SYSLOG_IDENTIFIER= | sort -u",
    );
    assert!(ident.contains("SYSLOG_IDENTIFIER=lb"), "{ident}");
    drop(m);
    assert_eq!(
        leftovers("mwd", Path::new("/nonexistent")),
        Vec::<String>::new()
    );
}

/// The whole production rehearsal (scripts/demo.sh) with a small load: `deployer up` on
/// machines, a parent zone and a resolver, roll, roll-lb with the delegation changed at the
/// parent, an lb package upgrade through the role; nothing lost, no SERVFAIL, no wrong answer,
/// no restart, nothing left on the host.
#[test]
fn rehearsal_loses_nothing_and_leaves_nothing() {
    let name = "rt";
    let t = Instant::now();
    let out = Command::new(repo().join("scripts/demo.sh"))
        .args(["--qps", "100", "--steady", "5", "--settle", "15"])
        .env("REHEARSAL_NAME", name)
        .env("REHEARSAL_NET", "237")
        // The test binaries are the debug build: the rehearsal packages them.
        .env("CARGO_PROFILE", "dev")
        .env("REHEARSAL_NO_BUILD", "1")
        .output()
        .expect("scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("rehearsal took {:?}\n{stdout}", t.elapsed());
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("rehearsal: "))
        .unwrap_or_else(|| panic!("no verdict line:\n{stdout}\n{stderr}"));
    let field = |k: &str| -> u64 {
        verdict
            .split(", ")
            .find_map(|p| {
                p.trim_start_matches("rehearsal: ")
                    .strip_prefix(&format!("{k} "))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {verdict}"))
    };
    assert!(field("sent") > 500, "{verdict}");
    for k in ["lost", "servfail", "wrong", "restarts", "leftovers"] {
        assert_eq!(field(k), 0, "{k}: {verdict}\n{stdout}\n{stderr}");
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        leftovers(name, Path::new("/tmp/lb-rt.")),
        Vec::<String>::new()
    );
}
