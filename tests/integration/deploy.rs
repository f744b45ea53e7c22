//! The deployer end to end on the local provider (real `named` and `lb` processes provisioned
//! by the Ansible roles): a roll under load loses nothing, and a failure at each step leaves
//! the old set serving with nothing orphaned.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use integration_tests::*;
use serde_json::Value;

mod canary;
mod crash_matrix;
mod handoff;

const T: Duration = Duration::from_secs(3);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `extra` with what most tests leave out: no canary (`[canary] soak_secs = 0`), no check of
/// the delegation at a parent zone (these deployments have none: `check_delegation = false`)
/// and a short rate measurement before the hand-off. The tests of those features set them.
fn with_defaults(extra: &str) -> String {
    let mut out = extra.to_string();
    if !out.contains("[canary]") {
        out.push_str("\n[canary]\nsoak_secs = 0\n");
    }
    let mut defaults = String::new();
    if !out.contains("check_delegation") && !out.contains("parent_servers") {
        defaults.push_str("check_delegation = false\n");
    }
    if !out.contains("baseline_secs") {
        defaults.push_str("baseline_secs = 0.5\n");
    }
    if out.contains("[roll_lb]\n") {
        out = out.replacen("[roll_lb]\n", &format!("[roll_lb]\n{defaults}"), 1);
    } else {
        out.push_str(&format!("\n[roll_lb]\n{defaults}"));
    }
    out
}

/// One deployment in its own directory, with its own copy of the Ansible tree.
struct Deployment {
    dir: TempDir,
    cfg: PathBuf,
    ns_vars: [String; 2],
    lb_vars: [String; 2],
    /// More TOML appended to the config (e.g. a `[roll_lb]` section).
    extra: String,
    /// Keep the Ansible run files of successful runs (`DEPLOYER_KEEP_RUNS`), for tests that
    /// read the inventories.
    keep_runs: bool,
}

impl Deployment {
    fn new(name: &str) -> Deployment {
        let dir = TempDir::new(name);
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        copy_dir(&repo.join("ansible"), &dir.path().join("ansible"));
        let d = Deployment {
            cfg: dir.path().join("deployer.toml"),
            dir,
            ns_vars: Default::default(),
            lb_vars: Default::default(),
            extra: String::new(),
            keep_runs: true,
        };
        d.write_config();
        d
    }

    fn write_config(&self) {
        let p = self.dir.path();
        let vars = |v: &str| {
            if v.is_empty() {
                String::new()
            } else {
                format!("vars = {v}\n")
            }
        };
        let text = format!(
            "deployment = \"{}\"\nstate_dir = \"{}/state\"\nansible_dir = \"{}/ansible\"\nlb_binary = \"{}\"\n\n\
             [provider]\nkind = \"local\"\nregistry_dir = \"{}/world\"\n\n\
             [[nameservers]]\nname = \"ns1\"\n{}\n[[nameservers]]\nname = \"ns2\"\n{}\n\
             [zones]\nnames = [\"example.test\"]\n\n\
             [[lbs]]\nname = \"lb1\"\nfronts = [\"ns1\"]\n{}\n[[lbs]]\nname = \"lb2\"\nfronts = [\"ns2\"]\n{}\n\
             [timeouts]\nboot_secs = 30\nprovision_secs = 240\ncheck_secs = 5\nctl_secs = 10\n{}",
            p.file_name().unwrap().to_string_lossy().replace('.', "-"),
            p.display(),
            p.display(),
            bin("lb").display(),
            p.display(),
            vars(&self.ns_vars[0]),
            vars(&self.ns_vars[1]),
            vars(&self.lb_vars[0]),
            vars(&self.lb_vars[1]),
            with_defaults(&self.extra),
        );
        std::fs::write(&self.cfg, text).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("deployer"));
        c.arg("-c").arg(&self.cfg).args(args).stdin(Stdio::null());
        if self.keep_runs {
            c.env("DEPLOYER_KEEP_RUNS", "1");
        }
        c
    }

    /// Runs the deployer; returns (exit code, stdout, stderr).
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("deployer runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args, &[]);
        assert_eq!(code, 0, "deployer {args:?} failed:\n{out}\n{err}");
        out
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["--json", "status"])).unwrap()
    }

    /// (label, id) of every instance, sorted.
    fn instances(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["label"].as_str().unwrap().to_string(),
                    i["id"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn lb_addrs(&self) -> Vec<SocketAddr> {
        self.status()["lbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["address"].as_str().unwrap().parse().unwrap())
            .collect()
    }

    /// Backends of each lb, in config order.
    fn lb_backends(&self) -> Vec<Vec<String>> {
        self.status()["lbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                l["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b["address"].as_str().unwrap().to_string())
                    .collect()
            })
            .collect()
    }

    fn zone(&self) -> PathBuf {
        self.dir.path().join("ansible/zones/example.test.zone")
    }

    fn serial(&self) -> u32 {
        let text = std::fs::read_to_string(self.zone()).unwrap();
        text.lines()
            .find(|l| l.contains("; serial"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Bumps the zone's serial; returns the new one.
    fn bump_serial(&self) -> u32 {
        let old = self.serial();
        let text = std::fs::read_to_string(self.zone()).unwrap();
        std::fs::write(
            self.zone(),
            text.replace(&old.to_string(), &(old + 1).to_string()),
        )
        .unwrap();
        old + 1
    }

    /// Every lb answers with this serial.
    fn assert_serving(&self, serial: u32) {
        for a in self.lb_addrs() {
            let m = udp_query(a, "example.test.", RecordType::SOA, T)
                .unwrap_or_else(|| panic!("{a} answers"));
            assert_eq!(soa_serial(&m), Some(serial), "serial through {a}");
            let m = tcp_query(a, "example.test.", RecordType::SOA).expect("tcp answer");
            assert_eq!(soa_serial(&m), Some(serial));
        }
    }

    fn journal_state(&self) -> String {
        let j: Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.path().join("state/journal.json")).unwrap(),
        )
        .unwrap();
        j["state"].as_str().unwrap().to_string()
    }

    /// After a failed roll: rolled back, the same instances, the old serial served, and a new
    /// roll may start.
    fn assert_rolled_back(&self, before: &[(String, u64)], backends: &[Vec<String>], serial: u32) {
        assert_eq!(self.journal_state(), "rolled-back");
        assert_eq!(
            self.instances(),
            before,
            "nothing created is left, nothing old is gone"
        );
        assert_eq!(
            self.lb_backends(),
            backends,
            "every lb is back on the old set"
        );
        self.assert_serving(serial);
        let dirs = std::fs::read_dir(self.dir.path().join("world"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .parse::<u64>()
                    .is_ok()
            })
            .count();
        assert_eq!(dirs, before.len(), "no instance directory left behind");
    }
}

impl Deployment {
    /// The lb labels in the `lbs` group of the inventory of the playbook run named `*-{run}`.
    fn run_lbs(&self, run: &str) -> Vec<String> {
        let runs = self.dir.path().join("state/runs");
        let dir = std::fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .ends_with(&format!("-{run}"))
            })
            .unwrap_or_else(|| panic!("no run *-{run} in {}", runs.display()));
        let inv: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("inventory.json")).unwrap())
                .unwrap();
        let mut lbs: Vec<String> = inv["all"]["children"]["lbs"]["hosts"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        lbs.sort();
        lbs
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.run(&["down", "--yes"], &[]);
        // Whatever `down` could not delete (a deployer that still held the lock, a broken
        // registry): the instances' own processes, by their PID files.
        let local = self.dir.path().join("world");
        for dir in std::fs::read_dir(local).into_iter().flatten().flatten() {
            for pidfile in ["named.pid", "lb.pid"] {
                let pid = std::fs::read_to_string(dir.path().join(pidfile))
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok());
                if let Some(pid) = pid.filter(|p| *p > 1) {
                    // SAFETY: kill(2) on a PID this test's deployment started; no memory.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

/// A spawned deployer, killed and reaped on drop: a failed assertion must not leave one running
/// (it would hold the deployment's lock, `down` in [`Deployment`]'s drop would refuse, and every
/// instance would leak). Declared after the [`Deployment`], it is dropped first.
struct Running(Option<std::process::Child>);

impl Running {
    fn spawn(c: &mut Command) -> Running {
        Running(Some(c.spawn().expect("deployer starts")))
    }
    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("not yet waited for")
    }
    fn pid(&mut self) -> u32 {
        self.child().id()
    }
    fn wait_with_output(mut self) -> std::process::Output {
        self.0
            .take()
            .expect("not yet waited for")
            .wait_with_output()
            .unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True while process `pid` runs (a zombie, or gone, is not running).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.to_string()))
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// Waits (bounded) until `pid` no longer runs; false if it still does after 10 s.
fn gone(pid: i32) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Waits (bounded) for a file holding a PID, written by a hook; returns the PID.
fn read_pid(path: &Path) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "{} was written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn up(name: &str) -> Deployment {
    let d = Deployment::new(name);
    d.ok(&["up"]);
    d
}

#[test]
fn roll_under_load_loses_no_query_and_changes_the_serial() {
    let d = up("dep-roll");
    let before = d.instances();
    let old_serial = d.serial();
    d.assert_serving(old_serial);
    let loads: Vec<_> = d
        .lb_addrs()
        .into_iter()
        .map(|a| LoadClient::start(a, 300))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let new_serial = d.bump_serial();
    let t = Instant::now();
    let out = d.ok(&["roll"]);
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (mut sent, mut lost) = (0, 0);
    for l in loads {
        let r = l.finish();
        sent += r.sent;
        lost += r.lost();
    }
    eprintln!("deployer roll under load: {took:?}, queries sent {sent}, lost {lost}\n{out}");
    assert!(sent > 1000);
    assert_eq!(lost, 0, "no query lost during the roll");
    for step in [
        "create",
        "provision",
        "check",
        "flip",
        "verify",
        "delete-old",
        "rename",
    ] {
        assert!(out.contains(step), "{step} reported:\n{out}");
    }
    // The new nameservers answer only the lbs: each was checked from the lb that fronts it.
    assert!(
        out.contains("ns1-next authoritative (probed from lb lb1; content: ")
            && out.contains("ns2-next authoritative (probed from lb lb2; content: "),
        "{out}"
    );
    d.assert_serving(new_serial);
    let after = d.instances();
    let labels: Vec<_> = after.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels, vec!["lb1", "lb2", "ns1", "ns2"]);
    assert_ne!(after, before, "the nameservers are new instances");
    assert_eq!(d.journal_state(), "done");
    assert!(d.status()["unfinished"].is_null());
    // A dry run changes nothing.
    d.bump_serial();
    let out = d.ok(&["roll", "--dry-run"]);
    assert!(out.contains("dry run"));
    assert_eq!(d.instances(), after);
}

#[test]
fn provisioning_failure_rolls_back() {
    let d = up("dep-prov");
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    d.bump_serial();
    // Well-formed for a parser, refused by named-checkzone (the role checks every zone).
    let text = std::fs::read_to_string(d.zone()).unwrap();
    std::fs::write(
        d.zone(),
        format!("{text}alias IN CNAME www\nalias IN A 192.0.2.7\n"),
    )
    .unwrap();
    let (code, out, err) = d.run(&["roll"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("CNAME and other data"),
        "named-checkzone's message is shown:\n{err}"
    );
    assert!(err.contains("step provision failed; rolled back"), "{err}");
    assert!(out.contains("FAILED"));
    d.assert_rolled_back(&before, &backends, serial);
}

#[test]
fn a_new_server_answering_refused_rolls_back() {
    let mut d = up("dep-refused");
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    d.bump_serial();
    // ns1's new instance serves no zone at all: BIND answers REFUSED.
    d.ns_vars[0] = "{ dns_zones = [] }".into();
    d.write_config();
    let (code, _, err) = d.run(&["roll"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("ns1-next does not serve the zones") && err.contains("refused"),
        "{err}"
    );
    assert!(err.contains("step check failed; rolled back"), "{err}");
    d.assert_rolled_back(&before, &backends, serial);
}

#[test]
fn an_lb_refusing_the_swap_flips_the_others_back() {
    let mut d = Deployment::new("dep-lbrefuse");
    // lb2's health checks demand a serial no zone has: its verified swap will be refused.
    d.lb_vars[1] = "{ lb_health_min_serial = 4000000000 }".into();
    // The operator allows the deployer's own address: nameservers are checked directly.
    d.extra = "\n[network]\ncheck_address = \"127.0.0.1\"\n".into();
    d.write_config();
    let out = d.ok(&["up"]);
    assert!(
        out.contains("ns1 authoritative (checked directly from 127.0.0.1; content: "),
        "{out}"
    );
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    d.bump_serial();
    let (code, out, err) = d.run(&["roll"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("lb lb2 refused the swap") && err.contains("serial-too-low"),
        "{err}"
    );
    assert!(
        out.contains("rollback: lb lb1 back on"),
        "lb1 was flipped and is flipped back:\n{out}"
    );
    d.assert_rolled_back(&before, &backends, serial);
}

#[test]
fn injected_failures_roll_back_before_deletion_and_resume_after() {
    let d = up("dep-inject");
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    let new_serial = d.bump_serial();
    for step in ["create", "flip", "verify"] {
        let (code, _, err) = d.run(&["roll"], &[("DEPLOYER_FAIL_AT", step)]);
        assert_eq!(code, 1, "{step}");
        assert!(
            err.contains(&format!("step {step} failed; rolled back")),
            "{err}"
        );
        d.assert_rolled_back(&before, &backends, serial);
    }
    // Past the point of no return a failure stops; --resume finishes the roll.
    for step in ["delete-old", "rename"] {
        let (code, _, err) = d.run(&["roll"], &[("DEPLOYER_FAIL_AT", step)]);
        assert_eq!(code, 1);
        assert!(err.contains("deployer roll --resume"), "{err}");
        assert_eq!(d.journal_state(), "in-progress");
        let (code, _, err) = d.run(&["roll"], &[]);
        assert_eq!(code, 1, "a new roll refuses while one is unfinished");
        assert!(err.contains("unfinished"), "{err}");
        let (code, _, err) = d.run(&["rollback"], &[]);
        assert_eq!(
            code, 1,
            "cannot roll back once old instances are being deleted"
        );
        assert!(err.contains("--resume"), "{err}");
        d.ok(&["roll", "--resume"]);
        assert_eq!(d.journal_state(), "done");
        d.assert_serving(d.serial());
        let labels: Vec<_> = d.instances().into_iter().map(|(l, _)| l).collect();
        assert_eq!(labels, vec!["lb1", "lb2", "ns1", "ns2"]);
        d.bump_serial();
    }
    assert!(d.serial() > new_serial);
}

/// Starts `deployer roll` paused after `step`, waits for the pause, and kills it with SIGKILL.
fn kill_roll_after(d: &Deployment, step: &str) {
    let stderr_file = d.dir.path().join("roll.stderr");
    let mut c = d.command(&["roll"]);
    c.env("DEPLOYER_PAUSE_AFTER", step)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_file).unwrap());
    let mut child = Running::spawn(&mut c);
    let stdout = child.child().stdout.take().unwrap();
    let marker = format!("pausing after {step}");
    let mut seen = String::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(&marker) {
            break;
        }
    }
    drop(child);
    assert!(
        seen.contains(&marker),
        "deployer reached {step}:\n{seen}\n{}",
        std::fs::read_to_string(&stderr_file).unwrap_or_default()
    );
}

#[test]
fn kill_9_mid_roll_then_resume() {
    let d = up("dep-resume");
    let new_serial = d.bump_serial();
    kill_roll_after(&d, "flip");
    assert_eq!(d.journal_state(), "in-progress");
    let st = d.status();
    assert!(
        !st["unfinished"].is_null(),
        "status reports the unfinished roll"
    );
    let human = d.ok(&["status"]);
    assert!(human.contains("UNFINISHED"), "{human}");
    let (code, _, err) = d.run(&["roll"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--resume") && err.contains("rollback"),
        "{err}"
    );
    // The lbs already serve the new nameservers while the deployer is dead.
    d.assert_serving(new_serial);
    let out = d.ok(&["roll", "--resume"]);
    assert!(out.contains("resuming"), "{out}");
    assert_eq!(d.journal_state(), "done");
    d.assert_serving(new_serial);
    let labels: Vec<_> = d.instances().into_iter().map(|(l, _)| l).collect();
    assert_eq!(labels, vec!["lb1", "lb2", "ns1", "ns2"]);
}

#[test]
fn kill_9_mid_roll_then_rollback() {
    let d = up("dep-rollback");
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    d.bump_serial();
    kill_roll_after(&d, "verify");
    assert_eq!(
        d.instances().len(),
        6,
        "the new instances exist while the roll is unfinished"
    );
    // The rollback dies after deleting one new nameserver: the new set is incomplete, so
    // `--resume` must refuse to hand it to the lbs; only finishing the rollback settles it.
    let (code, _, err) = d.run(
        &["rollback"],
        &[("DEPLOYER_CRASH_AT", "rollback:ns2-next:before")],
    );
    assert_eq!(code, -1, "{err}");
    assert_eq!(d.instances().len(), 5, "ns1-next was deleted");
    let (code, _, err) = d.run(&["roll", "--resume"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only `deployer rollback` can finish"), "{err}");
    assert_eq!(d.status()["unfinished"]["phase"], "rolling-back");
    d.assert_serving(serial);
    d.ok(&["rollback"]);
    d.assert_rolled_back(&before, &backends, serial);
}

#[test]
fn dry_runs_and_confirmation_change_nothing() {
    let mut d = Deployment::new("dep-dry");
    d.extra = "\n[network]\nvlan = \"dns\"\n".into();
    d.write_config();
    let out = d.ok(&["up", "--dry-run"]);
    assert!(out.contains("dry run") && out.contains("lb1"));
    assert!(
        out.contains("not used by the local provider") && out.contains("loopback"),
        "the local provider keeps loopback and says so:\n{out}"
    );
    assert!(out.contains("from an lb, with `lb ctl probe`"), "{out}");
    assert!(d.instances().is_empty());
    d.ok(&["up"]);
    let before = d.instances();
    let (code, _, _) = d.run(&["up"], &[]);
    assert_eq!(code, 1, "up refuses when the deployment exists");
    let (code, _, err) = d.run(&["down"], &[]);
    assert_eq!(code, 1, "down asks for confirmation");
    assert!(err.contains("not confirmed"), "{err}");
    assert_eq!(d.instances(), before);
    let out = d.ok(&["down", "--dry-run"]);
    assert!(out.contains("would delete"));
    assert_eq!(d.instances(), before);
    d.ok(&["down", "--yes"]);
    assert!(d.instances().is_empty());
    let out = Command::new(bin("deployer"))
        .args(["--config", "/nonexistent.toml", "status"])
        .output()
        .unwrap();
    let (code, err) = (out.status.code(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent.toml"), "{err}");
}

/// The hook writes the new addresses (its arguments) and its stdin JSON to files.
fn write_hook(d: &Deployment) -> PathBuf {
    let hook = d.dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncat > {0}/hook-input.json\necho \"$@\" > {0}/new-targets.tmp\nmv {0}/new-targets.tmp {0}/new-targets\n",
            d.dir.path().display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&hook)
        .status()
        .unwrap();
    hook
}

#[test]
fn roll_lb_under_load_with_a_delegation_hook_loses_nothing() {
    let mut d = Deployment::new("dep-rolllb");
    let hook = write_hook(&d);
    d.extra = format!(
        "\n[roll_lb]\ndelegation_hook = \"{}\"\ndrain_threshold_qps = 1.0\nquiet_secs = 2\npoll_secs = 0.2\nmax_drain_secs = 60\n",
        hook.display()
    );
    d.write_config();
    d.ok(&["up"]);
    let serial = d.serial();
    let before = d.instances();
    let old_addrs = d.lb_addrs();
    // Clients follow the delegation: they use the old lbs until the hook announces new ones.
    let old_loads: Vec<_> = old_addrs
        .iter()
        .map(|a| LoadClient::start(*a, 200))
        .collect();
    let child = Running::spawn(
        d.command(&["roll-lb"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let targets = d.dir.path().join("new-targets");
    let t0 = Instant::now();
    while !targets.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the hook ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    let input: Value = serde_json::from_str(
        &std::fs::read_to_string(d.dir.path().join("hook-input.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(input["lbs"][0]["name"], "lb1");
    assert_eq!(input["lbs"][0]["old_address"], old_addrs[0].to_string());
    // Every local lb has a loopback address of its own: glue (arguments, `*_ip`) is that
    // address alone, without the port the JSON's `*_address` carries.
    let new_addrs: Vec<SocketAddr> = input["lbs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["new_address"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(new_addrs.len(), 2);
    assert!(new_addrs.iter().all(|a| !old_addrs.contains(a)));
    let args = std::fs::read_to_string(&targets).unwrap();
    let new_ips: Vec<String> = new_addrs.iter().map(|a| a.ip().to_string()).collect();
    assert_eq!(
        args.split_whitespace().collect::<Vec<_>>(),
        new_ips,
        "{args}"
    );
    assert_eq!(input["lbs"][1]["new_ip"], new_ips[1]);
    assert_eq!(input["lbs"][1]["old_ip"], old_addrs[1].ip().to_string());
    let all_ips: std::collections::BTreeSet<_> =
        old_addrs.iter().chain(&new_addrs).map(|a| a.ip()).collect();
    assert_eq!(all_ips.len(), 4, "old and new lbs differ by address");
    let new_loads: Vec<_> = new_addrs
        .iter()
        .map(|a| LoadClient::start(*a, 200))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // The old lbs are still there after the hand-off: they are deleted only once quiet.
    assert_eq!(d.instances().len(), 6);
    let switched = Instant::now();
    let (mut sent, mut lost) = (0, 0);
    for l in old_loads {
        let r = l.finish();
        sent += r.sent;
        lost += r.lost();
    }
    let out = child.wait_with_output();
    let waited_after_switch = switched.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for l in new_loads {
        let r = l.finish();
        sent += r.sent;
        lost += r.lost();
    }
    eprintln!("roll-lb under load: sent {sent}, lost {lost}; deleted {waited_after_switch:?} after clients left\n{stdout}");
    assert!(sent > 500);
    assert_eq!(lost, 0);
    assert!(
        waited_after_switch >= Duration::from_secs(2),
        "old lbs deleted only after the quiet period"
    );
    assert!(stdout.contains("drain"));
    // The nameservers were opened to the new lbs before those were provisioned, and closed to
    // the old ones once they were gone.
    let step = |name: &str| {
        stdout
            .find(&format!("] {name} "))
            .unwrap_or_else(|| panic!("{name}:\n{stdout}"))
    };
    assert!(step("create-lbs-next") < step("allow-lbs-next"));
    assert!(step("allow-lbs-next") < step("provision-lbs-next"));
    assert!(step("rename-lbs") < step("disallow-old-lbs"));
    assert_eq!(
        d.run_lbs("allow-lbs-next"),
        vec!["lb1", "lb1-next", "lb2", "lb2-next"]
    );
    assert_eq!(d.run_lbs("disallow-old-lbs"), vec!["lb1", "lb2"]);
    let after = d.instances();
    let labels: Vec<_> = after.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels, vec!["lb1", "lb2", "ns1", "ns2"]);
    assert_ne!(after, before);
    assert_eq!(d.lb_addrs(), new_addrs);
    d.assert_serving(serial);
    assert_eq!(d.journal_state(), "done");
}

#[test]
fn roll_lb_without_a_hook_waits_for_the_operator_and_never_deletes_a_busy_lb() {
    let mut d = Deployment::new("dep-rolllb-manual");
    d.extra = "\n[roll_lb]\nquiet_secs = 1\npoll_secs = 0.2\nmax_drain_secs = 2\n".into();
    d.write_config();
    d.ok(&["up"]);
    let old_addrs = d.lb_addrs();
    // Waiting is neither done nor failed: its own event and exit status.
    let (code, out, err) = d.run(&["--json", "roll-lb"], &[]);
    assert_eq!(code, 3, "waiting for the operator:\n{out}\n{err}");
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last = events.last().expect("events");
    assert_eq!(last["event"], "waiting", "{out}");
    assert!(!events.iter().any(|e| e["event"] == "done"), "{out}");
    assert_eq!(last["next"], "deployer roll-lb --resume");
    let msg = last["message"].as_str().unwrap();
    assert!(
        msg.contains("replace") && msg.contains("roll-lb --resume"),
        "{msg}"
    );
    // Glue is an address: the old lb's IP, without its port.
    assert!(
        msg.contains(&format!("replace {} by", old_addrs[0].ip())),
        "{msg}"
    );
    assert_eq!(d.journal_state(), "in-progress");
    assert_eq!(d.instances().len(), 6);
    // The operator may have changed the delegation already: no rollback without their word.
    let next = d.status()["unfinished"]["next"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(next.contains("--delegation-unchanged"), "{next}");
    let (code, _, err) = d.run(&["rollback"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--delegation-unchanged") && err.contains("roll-lb --resume"),
        "{err}"
    );
    assert_eq!(d.instances().len(), 6, "nothing deleted");
    // The old lb1 keeps receiving traffic: the drain gives up and deletes nothing.
    let busy = LoadClient::start(old_addrs[0], 100);
    let (code, _, err) = d.run(&["roll-lb", "--resume"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("NOT deleted"), "{err}");
    assert_eq!(
        d.instances().len(),
        6,
        "nothing deleted while traffic flows"
    );
    let r = busy.finish();
    assert_eq!(r.lost(), 0);
    // Traffic gone: --continue finishes.
    d.ok(&["roll-lb", "--continue"]);
    assert_eq!(d.journal_state(), "done");
    let labels: Vec<_> = d.instances().into_iter().map(|(l, _)| l).collect();
    assert_eq!(labels, vec!["lb1", "lb2", "ns1", "ns2"]);
    assert!(d.lb_addrs().iter().all(|a| !old_addrs.contains(a)));
}

#[test]
fn roll_lb_failure_before_the_handoff_rolls_back() {
    let d = up("dep-rolllb-fail");
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    let (code, _, err) = d.run(&["roll-lb"], &[("DEPLOYER_FAIL_AT", "check-lbs-next")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("step check-lbs-next failed; rolled back"),
        "{err}"
    );
    d.assert_rolled_back(&before, &backends, serial);
    // Opened to lb1-next and lb2-next, then closed again once they were deleted.
    assert_eq!(
        d.run_lbs("allow-lbs-next"),
        vec!["lb1", "lb1-next", "lb2", "lb2-next"]
    );
    assert_eq!(d.run_lbs("rollback-allow-lbs"), vec!["lb1", "lb2"]);
}

// ---------------------------------------------------------------------------------------------
// The unsafe windows of issue #17, the lock, and a refused flip back. Each of these failed on
// the deployer before the typed engine (see the commit that added them).

/// Address of every lb's live backends and of every instance, checked against the complete-set
/// invariant: each lb serves exactly from the instance named like the nameserver it fronts
/// (`lb1` -> `ns1`, `lb2` -> `ns2`), the deployment has exactly its four instances, nothing is
/// unfinished, and the zones answer through every lb. Returns whether the nameservers are the
/// ones of `before` (`false`: all of them are new).
fn assert_complete(d: &Deployment, before: &[(String, u64)]) -> bool {
    let st = d.status();
    assert!(
        st["unfinished"].is_null(),
        "an operation is unfinished: {st}"
    );
    let labels: Vec<_> = d.instances().into_iter().map(|(l, _)| l).collect();
    assert_eq!(
        labels,
        vec!["lb1", "lb2", "ns1", "ns2"],
        "no instance the deployment does not list, none missing"
    );
    let ns_addr = |label: &str| -> String {
        st["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["label"] == label)
            .map(|i| format!("{}:{}", i["address"].as_str().unwrap(), i["dns_port"]))
            .unwrap()
    };
    // `deployer --json status` is an interface: these fields, with these types.
    for i in st["instances"].as_array().unwrap() {
        assert!(i["label"].is_string() && i["id"].is_u64() && i["role"].is_string());
        assert!(i["address"].is_string() && i["dns_port"].is_u64(), "{i}");
    }
    for l in st["lbs"].as_array().unwrap() {
        assert!(l["name"].is_string() && l["address"].is_string(), "{l}");
        assert!(l["generation"].is_u64(), "{l}");
        for b in l["backends"].as_array().unwrap() {
            assert!(b["address"].is_string() && b["state"].is_string(), "{b}");
        }
    }
    let backends = d.lb_backends();
    assert_eq!(
        backends,
        vec![vec![ns_addr("ns1")], vec![ns_addr("ns2")]],
        "every lb serves from the nameserver it fronts (a complete set, no deleted backend)"
    );
    d.assert_serving(d.serial());
    let old_ids: Vec<u64> = before
        .iter()
        .filter(|(l, _)| l.starts_with("ns"))
        .map(|(_, id)| *id)
        .collect();
    let now_ids: Vec<u64> = d
        .instances()
        .into_iter()
        .filter(|(l, _)| l.starts_with("ns"))
        .map(|(_, id)| id)
        .collect();
    let kept = now_ids.iter().filter(|i| old_ids.contains(i)).count();
    assert!(
        kept == 0 || kept == old_ids.len(),
        "all old or all new, never a mix: before {old_ids:?}, now {now_ids:?}"
    );
    kept == old_ids.len()
}

/// Window 1: `flip` recorded its intent for lb2, saved the journal and died before sending.
/// A roll that changes no serial (a role or OS change) used to resume past lb2 and delete the
/// nameserver lb2 still used.
#[test]
fn window_crash_between_recording_and_sending_a_flip_converges_on_resume() {
    let d = up("dep-win-flip");
    let before = d.instances();
    let (code, _, err) = d.run(&["roll"], &[("DEPLOYER_CRASH_AT", "flip:lb2:before-swap")]);
    assert_eq!(code, -1, "killed at the crash point:\n{err}");
    assert!(
        err.contains("fault injected: flip:lb2:before-swap"),
        "{err}"
    );
    let out = d.ok(&["roll", "--resume"]);
    eprintln!("{out}");
    assert!(!assert_complete(&d, &before), "the roll finished: all new");
}

/// Window 2: the reply to lb2's `set-backends` is lost after lb2 applied it, then the roll
/// fails (at verify) and rolls back: lb2 must be flipped back too, never left on a deleted set.
#[test]
fn window_lost_reply_is_resolved_by_reading_the_live_set() {
    let d = up("dep-win-lost");
    let before = d.instances();
    let backends = d.lb_backends();
    d.bump_serial();
    let (code, out, err) = d.run(
        &["roll"],
        &[
            ("DEPLOYER_FAULT", "flip:lb2:lost-reply"),
            ("DEPLOYER_FAIL_AT", "verify"),
        ],
    );
    eprintln!("{out}\n{err}");
    assert_eq!(code, 1);
    assert!(err.contains("fault injected: flip:lb2:lost-reply"), "{err}");
    assert_eq!(d.lb_backends(), backends, "both lbs back on the old set");
    assert_eq!(d.instances(), before);
    // The zone file now has a serial no instance serves: check the old one through the lbs.
    for a in d.lb_addrs() {
        let m = udp_query(a, "example.test.", RecordType::SOA, T).expect("answers");
        assert_eq!(soa_serial(&m), Some(d.serial() - 1));
    }
}

/// Window 3: an lb is not on the new set when `verify` runs (here: flipped back behind the
/// deployer's back during a pause). With an unchanged serial the old verify passed and
/// `delete-old` removed the nameserver that lb still used.
#[test]
fn window_verify_compares_each_lbs_live_set_with_the_plan() {
    let d = up("dep-win-verify");
    let before = d.instances();
    let old = d.lb_backends();
    let lb1_socket = d
        .dir
        .path()
        .join("world")
        .join(
            before
                .iter()
                .find(|(l, _)| l == "lb1")
                .unwrap()
                .1
                .to_string(),
        )
        .join("control.sock");
    let mut child = Running::spawn(
        d.command(&["roll"])
            .env("DEPLOYER_PAUSE_AFTER", "flip")
            .env("DEPLOYER_PAUSE_SECS", "3")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stdout = child.child().stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("pausing after flip") {
            break;
        }
    }
    assert!(seen.contains("pausing after flip"), "{seen}");
    let out = Command::new(bin("lb"))
        .arg("ctl")
        .arg("--socket")
        .arg(&lb1_socket)
        .arg("set-backends")
        .args(&old[0])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for line in lines {
        let Ok(line) = line else { break };
        seen.push_str(&line);
        seen.push('\n');
    }
    let out = child.wait_with_output();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{seen}\n{err}");
    assert_eq!(out.status.code(), Some(1), "verify must fail");
    assert!(err.contains("lb1"), "the error names lb1: {err}");
    assert!(assert_complete(&d, &before), "rolled back: all old");
}

/// The lock: while one deployer changes the deployment, a second one that would change
/// anything refuses at once and names the first one's PID; `status` and dry runs still work.
#[test]
fn lock_refuses_a_second_deployer_naming_the_first() {
    let d = up("dep-lock");
    let before = d.instances();
    let mut child = Running::spawn(
        d.command(&["roll"])
            .env("DEPLOYER_PAUSE_AFTER", "create")
            .env("DEPLOYER_PAUSE_SECS", "60")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let pid = child.pid();
    let stdout = child.child().stdout.take().unwrap();
    let mut seen = false;
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.contains("pausing after create") {
            seen = true;
            break;
        }
    }
    assert!(seen, "the first deployer reached its pause");
    for args in [
        &["roll", "--resume"][..],
        &["rollback"],
        &["roll"],
        &["up"],
        &["roll-lb"],
        &["down", "--yes"],
    ] {
        let (code, _, err) = d.run(args, &[]);
        assert_eq!(code, 1, "{args:?} must refuse: {err}");
        assert!(
            err.contains(&format!("PID {pid}")),
            "{args:?} names the running deployer: {err}"
        );
        // At once: it refused while the first one still holds the lock (it did not wait for it).
        assert!(
            child.child().try_wait().unwrap().is_none(),
            "{args:?} refused while the first deployer still runs"
        );
    }
    assert_eq!(d.status()["unfinished"]["operation"], "roll");
    let out = d.ok(&["roll", "--dry-run"]);
    assert!(out.contains("dry run"), "{out}");
    drop(child);
    // The lock dies with its holder: the unfinished roll can be undone at once.
    d.ok(&["rollback"]);
    assert!(assert_complete(&d, &before));
}

/// A flip back that lb refuses (its state file cannot be written, so it would come back on
/// the new set after a restart) stops the rollback before anything is deleted; once the
/// state file is writable again, `rollback` finishes.
#[test]
fn a_refused_flip_back_stops_before_anything_is_deleted() {
    let d = up("dep-refuse-back");
    let before = d.instances();
    let old = d.lb_backends();
    let zone_text = std::fs::read_to_string(d.zone()).unwrap();
    d.bump_serial();
    let (code, _, err) = d.run(&["roll"], &[("DEPLOYER_CRASH_AT", "verify:before")]);
    assert_eq!(code, -1, "{err}");
    assert_ne!(d.lb_backends(), old, "the lbs were flipped");
    let lb1_dir = d.dir.path().join("world").join(
        before
            .iter()
            .find(|(l, _)| l == "lb1")
            .unwrap()
            .1
            .to_string(),
    );
    // Root ignores permissions: a directory where the state file should be stops any write.
    let state = lb1_dir.join("state.json");
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    let (code, out, err) = d.run(&["rollback"], &[]);
    eprintln!("{out}\n{err}");
    assert_eq!(code, 1);
    assert!(err.contains("lb lb1"), "names the lb: {err}");
    assert!(
        err.contains("Nothing was deleted") && err.contains("deployer rollback"),
        "says what to do: {err}"
    );
    assert_eq!(d.instances().len(), 6, "nothing deleted");
    assert_eq!(d.status()["unfinished"]["operation"], "roll");
    std::fs::remove_dir(&state).unwrap();
    d.ok(&["rollback"]);
    std::fs::write(d.zone(), zone_text).unwrap();
    assert!(assert_complete(&d, &before));
    assert_eq!(d.lb_backends(), old);
}

/// Inputs the deployer cannot use are refused before anything is created, with the file named:
/// a journal from an older deployer, and a zone using `$GENERATE`.
#[test]
fn an_old_journal_and_a_generate_zone_are_refused_clearly() {
    let d = Deployment::new("dep-refuse-input");
    let journal = d.dir.path().join("state/journal.json");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
    std::fs::write(
        &journal,
        r#"{"operation":"roll","state":"in-progress","started_unix":1,"steps":[{"step":"flip","ok":true,"detail":"","elapsed_ms":1}],"creating":[],"created":[],"old":[],"flips":[],"serials":[],"deleting_old":false}"#,
    )
    .unwrap();
    for args in [
        &["roll", "--resume"][..],
        &["status"],
        &["rollback"],
        &["up"],
    ] {
        let (code, _, err) = d.run(args, &[]);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.contains("older deployer") && err.contains("journal.json"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_file(&journal).unwrap();
    let text = std::fs::read_to_string(d.zone()).unwrap();
    std::fs::write(
        d.zone(),
        format!("{text}$GENERATE 1-3 gen$ IN A 192.0.2.$\n"),
    )
    .unwrap();
    let (code, _, err) = d.run(&["up"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("$GENERATE") && err.contains("example.test.zone"),
        "{err}"
    );
    assert!(d.instances().is_empty(), "nothing was created");
}

/// roll-lb: once the delegation hook has run, the new lbs may be what clients use: a crash right
/// after it must leave the operation forward-only (never undone), and `--resume` finishes it.
#[test]
fn roll_lb_crash_after_the_handoff_only_goes_forward() {
    let mut d = Deployment::new("dep-rolllb-crash");
    let hook = write_hook(&d);
    d.extra = format!(
        "\n[roll_lb]\ndelegation_hook = \"{}\"\nquiet_secs = 1\npoll_secs = 0.2\nmax_drain_secs = 60\n",
        hook.display()
    );
    d.write_config();
    d.ok(&["up"]);
    let old_addrs = d.lb_addrs();
    let (code, _, err) = d.run(&["roll-lb"], &[("DEPLOYER_CRASH_AT", "handoff:after")]);
    assert_eq!(code, -1, "{err}");
    assert!(err.contains("fault injected: handoff:after"), "{err}");
    assert_eq!(d.status()["unfinished"]["phase"], "forward");
    let (code, _, err) = d.run(&["rollback"], &[]);
    assert_eq!(code, 1, "no rollback past the hand-off");
    assert!(err.contains("roll-lb --resume"), "{err}");
    assert_eq!(d.instances().len(), 6, "nothing deleted");
    d.ok(&["roll-lb", "--resume"]);
    let labels: Vec<_> = d.instances().into_iter().map(|(l, _)| l).collect();
    assert_eq!(labels, vec!["lb1", "lb2", "ns1", "ns2"]);
    assert!(d.lb_addrs().iter().all(|a| !old_addrs.contains(a)));
    d.assert_serving(d.serial());
}

/// roll-lb killed right after it opened the nameservers to the new lbs: `rollback` deletes the
/// new lbs and closes the nameservers to them again (crash points of the added step).
#[test]
fn roll_lb_crash_after_opening_the_nameservers_rolls_back_and_closes_them() {
    let d = up("dep-rolllb-allow");
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    let (code, _, err) = d.run(
        &["roll-lb"],
        &[("DEPLOYER_CRASH_AT", "allow-lbs-next:after")],
    );
    assert_eq!(code, -1, "{err}");
    assert!(
        err.contains("fault injected: allow-lbs-next:after"),
        "{err}"
    );
    assert_eq!(d.instances().len(), 6, "the new lbs exist");
    assert_eq!(
        d.run_lbs("allow-lbs-next"),
        vec!["lb1", "lb1-next", "lb2", "lb2-next"]
    );
    d.ok(&["rollback"]);
    d.assert_rolled_back(&before, &backends, serial);
    assert_eq!(d.run_lbs("rollback-allow-lbs"), vec!["lb1", "lb2"]);
}

/// `up --resume` finishes an `up` that was killed, and the unfinished `up` says to run it.
#[test]
fn an_unfinished_up_is_finished_by_up_resume() {
    let d = Deployment::new("dep-up-resume");
    let (code, _, err) = d.run(&["up"], &[("DEPLOYER_CRASH_AT", "provision-lbs:before")]);
    assert_eq!(code, -1, "{err}");
    let (code, _, err) = d.run(&["up"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("`deployer up --resume`"), "{err}");
    let out = d.ok(&["up", "--resume", "--dry-run"]);
    assert!(
        out.contains("provision-lbs") && !out.contains("create-lbs"),
        "{out}"
    );
    let out = d.ok(&["up", "--resume"]);
    assert!(out.contains("resuming up"), "{out}");
    assert_eq!(d.journal_state(), "done");
    let labels: Vec<_> = d.instances().into_iter().map(|(l, _)| l).collect();
    assert_eq!(labels, vec!["lb1", "lb2", "ns1", "ns2"]);
    d.assert_serving(d.serial());
}

/// Writes the delegation hook's body (after a `#!/bin/sh` line; DIR is replaced by the
/// deployment's directory).
fn set_hook(d: &Deployment, body: &str) {
    let hook = d.dir.path().join("hook.sh");
    let tmp = d.dir.path().join("hook.sh.tmp");
    std::fs::write(
        &tmp,
        format!(
            "#!/bin/sh\n{}",
            body.replace("DIR", &d.dir.path().display().to_string())
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&tmp).status().unwrap();
    std::fs::rename(&tmp, &hook).unwrap();
    for f in ["hook.pid", "hook-child.pid"] {
        let _ = std::fs::remove_file(d.dir.path().join(f));
    }
}

/// Inside roll-lb's hand-off the delegation may already point at the new lbs: a failing hook,
/// a SIGTERM, a SIGKILL or a crash there never deletes them by itself. The hook and its
/// children do not outlive the deployer; `rollback` needs `--delegation-unchanged`, and
/// `--resume` runs the hook again and finishes.
#[test]
fn roll_lb_inside_the_handoff_is_never_undone_by_itself() {
    let mut d = Deployment::new("dep-handoff");
    d.extra = format!(
        "\n[roll_lb]\ndelegation_hook = \"{}\"\nquiet_secs = 1\npoll_secs = 0.2\nmax_drain_secs = 60\n",
        d.dir.path().join("hook.sh").display()
    );
    d.write_config();
    d.ok(&["up"]);
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    let old_addrs = d.lb_addrs();

    // 1. The hook fails (having changed, for all we know, part of the delegation).
    set_hook(&d, "cat >/dev/null\nexit 3\n");
    let (code, out, err) = d.run(&["roll-lb"], &[]);
    eprintln!("{out}\n{err}");
    assert_eq!(code, 1);
    assert!(
        err.contains("delegation_hook")
            && err.contains("failed")
            && err.contains("NOT rolled back"),
        "{err}"
    );
    assert!(
        err.contains("rollback --delegation-unchanged") && err.contains("roll-lb --resume"),
        "says both ways out: {err}"
    );
    assert!(!out.contains("rollback: deleted"), "{out}");
    assert_eq!(d.instances().len(), 6, "the new lbs are not deleted");
    let st = d.status();
    assert_eq!(st["unfinished"]["handoff"], "started", "{st}");
    let (code, _, err) = d.run(&["rollback"], &[]);
    assert_eq!(code, 1, "no rollback without the operator's word");
    assert!(err.contains("--delegation-unchanged"), "{err}");
    assert_eq!(d.instances().len(), 6);
    // The operator checked: the delegation still points at the old lbs only.
    d.ok(&["rollback", "--delegation-unchanged"]);
    d.assert_rolled_back(&before, &backends, serial);

    // 2. SIGTERM while the hook runs: the hook and its child are stopped, then the deployer
    // exits (holding the lock until they are gone), and nothing is undone.
    set_hook(
        &d,
        "cat >/dev/null\necho $$ > DIR/hook.pid\nsleep 300 &\necho $! > DIR/hook-child.pid\nwait\n",
    );
    // Its stderr (ansible's output too) to a file: a pipe nobody reads would stop it.
    let stderr_file = d.dir.path().join("roll-lb.stderr");
    let mut run = Running::spawn(
        d.command(&["roll-lb"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_file).unwrap()),
    );
    let hook = read_pid(&d.dir.path().join("hook.pid"));
    let hook_child = read_pid(&d.dir.path().join("hook-child.pid"));
    // SAFETY: kill(2) on the deployer this test started.
    unsafe {
        libc::kill(run.pid() as i32, libc::SIGTERM);
    }
    let out = run.wait_with_output();
    let err = std::fs::read_to_string(&stderr_file).unwrap();
    assert_eq!(out.status.code(), Some(128 + 15), "{err}");
    assert!(err.contains("SIGTERM received"), "{err}");
    assert!(gone(hook), "the hook outlived the deployer");
    assert!(gone(hook_child), "the hook's child outlived the deployer");
    assert_eq!(d.status()["unfinished"]["handoff"], "started");
    assert_eq!(d.instances().len(), 6, "nothing deleted");

    // 3. SIGKILL while the hook runs (`roll-lb --resume` runs it again): the kernel stops it.
    set_hook(
        &d,
        "cat >/dev/null\necho $$ > DIR/hook.pid\nexec sleep 300\n",
    );
    let mut run = Running::spawn(
        d.command(&["roll-lb", "--resume"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let hook = read_pid(&d.dir.path().join("hook.pid"));
    let _ = run.child().kill();
    let _ = run.child().wait();
    assert!(gone(hook), "the hook outlived the killed deployer");
    assert_eq!(d.instances().len(), 6);
    let (code, _, err) = d.run(&["rollback"], &[]);
    assert_eq!(code, 1, "{err}");

    // 4. A crash point inside the hand-off, while the hook runs (killed with the deployer).
    let (code, _, err) = d.run(
        &["roll-lb", "--resume"],
        &[("DEPLOYER_CRASH_AT", "handoff:hook-running")],
    );
    assert_eq!(code, -1, "{err}");
    assert!(
        err.contains("fault injected: handoff:hook-running"),
        "{err}"
    );
    assert_eq!(d.status()["unfinished"]["handoff"], "started");
    assert_eq!(d.instances().len(), 6);

    // 5. The hook cannot even be started on resume (moved away): the earlier runs may have
    // changed the delegation, so the hand-off stays started and nothing is undone.
    std::fs::remove_file(d.dir.path().join("hook.sh")).unwrap();
    let (code, _, err) = d.run(&["roll-lb", "--resume"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot run delegation_hook"), "{err}");
    assert_eq!(d.status()["unfinished"]["handoff"], "started");
    assert_eq!(d.instances().len(), 6, "nothing deleted");

    // 6. A working hook: `--resume` runs it again and finishes.
    set_hook(&d, "cat >/dev/null\necho \"$@\" > DIR/new-targets\n");
    d.ok(&["roll-lb", "--resume"]);
    assert!(assert_complete(&d, &before));
    let new_addrs = d.lb_addrs();
    assert!(new_addrs.iter().all(|a| !old_addrs.contains(a)));
    let announced = std::fs::read_to_string(d.dir.path().join("new-targets")).unwrap();
    // Glue: the new lbs' addresses without the port.
    for a in &new_addrs {
        assert!(announced.contains(&a.ip().to_string()), "{announced}");
        assert!(!announced.contains(&a.to_string()), "{announced}");
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets (issue #27): no child gets the deployer's environment; run files are private and go
// once their run succeeded.

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Makes `body` (after `#!/bin/sh`, DIR replaced) an executable script at `DIR/name`.
fn script(d: &Deployment, name: &str, body: &str) -> PathBuf {
    let p = d.dir.path().join(name);
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n{}",
            body.replace("DIR", &d.dir.path().display().to_string())
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    p
}

#[test]
fn secrets_stay_with_the_deployer() {
    let mut d = Deployment::new("dep-secrets");
    d.keep_runs = false;
    // ansible-playbook through a wrapper that records the environment it was given (and fails
    // while DIR/fail-playbook exists); a hook that records its own.
    let wrapper = script(
        &d,
        "playbook.sh",
        "env > DIR/ansible-env.$$\n[ -e DIR/fail-playbook ] && exit 2\nexec ansible-playbook \"$@\"\n",
    );
    let hook = script(&d, "hook.sh", "env > DIR/hook-env\ncat > /dev/null\n");
    d.extra = format!(
        "\n[ansible]\nplaybook_command = \"{}\"\n\n[roll_lb]\ndelegation_hook = \"{}\"\nhook_env = [\"REGISTRAR_TOKEN\"]\nquiet_secs = 1\npoll_secs = 0.2\nmax_drain_secs = 60\n",
        wrapper.display(),
        hook.display()
    );
    d.write_config();
    let env = [
        ("LINODE_TOKEN", "linode-secret-4711"),
        ("REGISTRAR_TOKEN", "registrar-secret-0815"),
    ];
    let state = d.dir.path().join("state");
    // A failed run keeps its files, private.
    std::fs::write(d.dir.path().join("fail-playbook"), "").unwrap();
    let (code, _, err) = d.run(&["up"], &env);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("state/runs/") && err.contains("(0600)"),
        "{err}"
    );
    assert_eq!(mode(&state), 0o700, "the state directory");
    assert_eq!(mode(&state.join("journal.json")), 0o600, "the journal");
    let failed: Vec<PathBuf> = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(mode(&failed[0]), 0o700);
    for f in ["inventory.json", "vars.json"] {
        assert_eq!(mode(&failed[0].join(f)), 0o600, "{f}");
    }
    // Successful runs leave nothing behind.
    std::fs::remove_file(d.dir.path().join("fail-playbook")).unwrap();
    let (code, out, err) = d.run(&["up"], &env);
    assert_eq!(code, 0, "{out}\n{err}");
    let left: Vec<PathBuf> = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, failed, "only the failed run's files are left");
    let mut runs = 0;
    for e in std::fs::read_dir(d.dir.path()).unwrap() {
        let p = e.unwrap().path();
        if !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ansible-env.")
        {
            continue;
        }
        runs += 1;
        let env = std::fs::read_to_string(&p).unwrap();
        assert!(
            env.contains("PATH=") && env.contains("ANSIBLE_CONFIG="),
            "{env}"
        );
        assert!(
            !env.contains("LINODE_TOKEN") && !env.contains("secret-"),
            "ansible-playbook got a secret:\n{env}"
        );
    }
    assert!(runs >= 3, "{runs} playbook runs recorded");
    // The hook gets what hook_env names, and not the Linode token.
    let (code, out, err) = d.run(&["roll-lb"], &env);
    assert_eq!(code, 0, "{out}\n{err}");
    let hook_env = std::fs::read_to_string(d.dir.path().join("hook-env")).unwrap();
    assert!(
        hook_env.contains("REGISTRAR_TOKEN=registrar-secret-0815"),
        "{hook_env}"
    );
    assert!(!hook_env.contains("LINODE_TOKEN"), "{hook_env}");
    assert_eq!(mode(&state.join("journal.json")), 0o600);
}

// ---------------------------------------------------------------------------------------------
// Content, not just the serial (issue #27).

/// Rewrites the zone file with `edit` applied to its text.
fn edit_zone(d: &Deployment, edit: impl Fn(String) -> String) {
    let text = std::fs::read_to_string(d.zone()).unwrap();
    std::fs::write(d.zone(), edit(text)).unwrap();
}

#[test]
fn content_is_checked_and_diffed_not_just_the_serial() {
    let mut d = Deployment::new("dep-content");
    d.extra = "\n[[checks.smoke]]\nname = \"ns1.example.test\"\ntype = \"A\"\nexpect = [\"192.0.2.53\"]\n".into();
    d.write_config();
    let out = d.ok(&["up"]);
    assert!(
        out.contains("content: ") && out.contains("1 smoke checks"),
        "the nameservers and lbs are checked RRset by RRset:\n{out}"
    );
    let before = d.instances();
    let serial = d.serial();

    // 1. An edit without a serial bump is refused before anything is created; the dry run
    //    shows it too.
    edit_zone(&d, |t| {
        t.replace("www     IN A    192.0.2.1", "www     IN A    192.0.2.7")
    });
    let (code, out, err) = d.run(&["roll"], &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("zone example.test changes")
            && err.contains(&format!("serial stays {serial}")),
        "{err}"
    );
    assert!(
        out.contains("~ www.example.test. A 192.0.2.1 -> 192.0.2.7"),
        "{out}"
    );
    let (code, out, err) = d.run(&["roll", "--dry-run"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains("~ www.example.test. A 192.0.2.1 -> 192.0.2.7")
            && err.contains("would be refused"),
        "{out}\n{err}"
    );
    assert_eq!(d.instances(), before, "nothing created");

    // 2. With a bump: the diff (from what the lbs serve now) is printed, removals included
    //    (the zone was recorded at `up`), and the roll goes through, content checked.
    let new_serial = d.bump_serial();
    edit_zone(&d, |t| {
        t.replace("@       IN TXT  \"v=spf1 mx -all\"\n", "") + "new     IN A    192.0.2.8\n"
    });
    let out = d.ok(&["roll", "--dry-run"]);
    for line in [
        &format!("serial {serial} -> {new_serial}: 1 added, 1 removed, 1 changed"),
        "+ new.example.test. A 192.0.2.8",
        "- example.test. TXT",
        "~ www.example.test. A 192.0.2.1 -> 192.0.2.7",
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    let out = d.ok(&["roll"]);
    assert!(out.contains("+ new.example.test. A 192.0.2.8"), "{out}");
    assert!(
        out.contains("ns1-next authoritative (probed from lb lb1; content: "),
        "checked from the lb with `lb ctl query`:\n{out}"
    );
    assert!(
        out.contains("lb2 (") && out.contains("serves the zones (content: "),
        "checked through every lb after the flip:\n{out}"
    );
    for a in d.lb_addrs() {
        let m = tcp_query(a, "new.example.test.", RecordType::A).expect("answer");
        assert_eq!(m.answers.len(), 1, "new.example.test through {a}");
    }
    d.assert_serving(new_serial);

    // 3. A new nameserver that serves other content at the expected serial (another file)
    //    fails the check: rolled back.
    let (before, backends) = (d.instances(), d.lb_backends());
    let bumped = d.bump_serial();
    let text = std::fs::read_to_string(d.zone()).unwrap();
    std::fs::write(
        d.dir.path().join("ansible/zones/other.zone"),
        text.replace("192.0.2.7", "192.0.2.66"),
    )
    .unwrap();
    d.ns_vars[0] = "{ dns_zones = [{ name = \"example.test\", file = \"other.zone\" }] }".into();
    d.write_config();
    let (code, _, err) = d.run(&["roll"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("ns1-next (asked from lb lb1)")
            && err.contains("www.example.test. A: serves 192.0.2.66, the zone file has 192.0.2.7"),
        "{err}"
    );
    assert!(err.contains("step check failed; rolled back"), "{err}");
    d.assert_rolled_back(&before, &backends, new_serial);

    // 4. A change that breaks what a smoke check expects fails the check: rolled back.
    d.ns_vars[0] = String::new();
    d.write_config();
    edit_zone(&d, |t| {
        t.replace("ns1     IN A    192.0.2.53", "ns1     IN A    192.0.2.99")
    });
    let (code, _, err) = d.run(&["roll"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("smoke check ns1.example.test A: answered 192.0.2.99, expected 192.0.2.53"),
        "{err}"
    );
    d.assert_rolled_back(&before, &backends, new_serial);
    assert!(bumped > new_serial);
}

/// The lease (issue #27): two deployers of one deployment with different state directories
/// (two hosts' worth: the flock of each state directory does not see the other) share the
/// local provider's registry directory, and the lease there keeps them to one at a time. The
/// second refuses naming the holder; a stopped holder's lease expires and is taken over (the
/// taker rebuilds the roll from the world, having no journal of its own, and rolls it back);
/// the stale holder's next write is refused; a killed holder's lease is taken over at once
/// (its liveness file is unlocked).
#[test]
fn a_lease_keeps_one_deployer_across_state_dirs() {
    let mut d = Deployment::new("dep-lease");
    d.extra = "\n[lease]\nttl_secs = 3\nclock_skew_secs = 0\n".into();
    d.write_config();
    d.ok(&["up"]);
    let before = d.instances();
    let text = std::fs::read_to_string(&d.cfg).unwrap();
    let other_cfg = d.dir.path().join("deployer-other.toml");
    let p = d.dir.path().display().to_string();
    std::fs::write(
        &other_cfg,
        text.replace(&format!("{p}/state\""), &format!("{p}/state-other\"")),
    )
    .unwrap();
    let other = |args: &[&str]| {
        let out = Command::new(bin("deployer"))
            .arg("-c")
            .arg(&other_cfg)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let spawn_paused = |secs: &str| {
        let mut child = Running::spawn(
            d.command(&["roll"])
                .env("DEPLOYER_PAUSE_AFTER", "create")
                .env("DEPLOYER_PAUSE_SECS", secs)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let stdout = child.child().stdout.take().unwrap();
        let mut seen = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("pausing after create") {
                seen = true;
                break;
            }
        }
        assert!(seen, "the first deployer reached its pause");
        child
    };
    d.bump_serial();
    let mut holder = spawn_paused("12");
    let pid = holder.pid() as i32;
    for args in [&["roll"][..], &["rollback"], &["roll", "--resume"]] {
        let (code, _, err) = other(args);
        assert_eq!(code, 1, "{args:?} must refuse: {err}");
        assert!(
            err.contains("holds the lease") && err.contains(&format!("PID {pid}")),
            "{args:?} names the holder: {err}"
        );
    }
    // The other deployer sees the roll from the world, with no journal of its own.
    let (code, out, _) = other(&["--json", "status"]);
    assert_eq!(code, 0);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["unfinished"]["source"], "world", "{st}");
    assert_eq!(st["unfinished"]["operation"], "roll");

    // The holder stops (a suspended laptop): its lease expires, and the other takes over.
    // SAFETY: kill(2) on the deployer this test started; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(4));
    let (code, out, err) = other(&["rollback"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("took over the lease"), "{out}");
    eprintln!("takeover rollback:\n{out}\n{err}");
    assert!(out.contains("rebuilt from the world"), "{out}");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = holder.wait_with_output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the stale holder stops: {err}");
    assert!(err.contains("lease") && err.contains("was lost"), "{err}");
    assert!(assert_complete_old(&d, &before));

    // A holder killed outright: its lease is taken over at once (no waiting for expiry).
    let mut killed = spawn_paused("60");
    let _ = killed.child().kill();
    let _ = killed.child().wait();
    let t = Instant::now();
    let (code, out, err) = other(&["rollback"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("its process on this host is gone"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(assert_complete_old(&d, &before));
}

/// After a rollback from another state directory: the old set, complete (the zone file goes
/// back to the serial the old set serves).
fn assert_complete_old(d: &Deployment, before: &[(String, u64)]) -> bool {
    let serial = d.serial();
    let text = std::fs::read_to_string(d.zone()).unwrap();
    std::fs::write(
        d.zone(),
        text.replace(&serial.to_string(), &(serial - 1).to_string()),
    )
    .unwrap();
    let old = assert_complete(d, before);
    std::fs::write(d.zone(), text).unwrap();
    old
}
