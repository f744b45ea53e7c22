//! roll-lb's hand-off checked where resolvers look, and the drain judged per old lb (issue 27,
//! item 1): a tiny BIND serves the parent zone `test.` (NS and glue of `example.test`, updated
//! by the delegation hook with nsupdate, as in the rehearsal); a hook that forgets an lb, or an
//! operator who resumes too early, leaves the old lbs alive; the quiet period is at least the
//! parent's TTL; a restarted old lb is not quiet; the drain threshold is relative to each old
//! lb's rate before the hand-off. Each of these failed on the deployer before it checked the
//! parent (it deleted the old lbs).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::{RData, RecordType};
use integration_tests::*;
use serde_json::Value;

use super::{set_hook, up, write_hook, Deployment, Running};

/// A parent zone server: BIND serving `test.` on 127.0.0.1, taking dynamic updates from
/// loopback, delegating `example.test` to `lb1.ns.test.` and `lb2.ns.test.` (names in the
/// parent zone itself, as in the rehearsal: their addresses are the glue).
struct Parent {
    addr: SocketAddr,
    _proc: Proc,
    _dir: TempDir,
}

impl Parent {
    /// Delegates to the lbs at `ips`, NS records with `ns_ttl`, addresses with `glue_ttl`.
    fn start(ips: [IpAddr; 2], ns_ttl: u32, glue_ttl: u32) -> Parent {
        let dir = TempDir::new("parent");
        let d = dir.path().display().to_string();
        let port = free_port();
        std::fs::write(
            dir.path().join("test.zone"),
            format!(
                "$TTL 3\n@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 3\n@ IN NS ns.test.\nns IN A 127.0.0.1\n\
                 example {ns_ttl} IN NS lb1.ns.test.\nexample {ns_ttl} IN NS lb2.ns.test.\n\
                 lb1.ns {glue_ttl} IN A {}\nlb2.ns {glue_ttl} IN A {}\n",
                ips[0], ips[1]
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("named.conf"),
            format!(
                "options {{\n  directory \"{d}\";\n  pid-file \"{d}/named.pid\";\n  session-keyfile \"{d}/session.key\";\n  managed-keys-directory \"{d}\";\n  listen-on port {port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  dnssec-validation no;\n  notify no;\n}};\ncontrols {{ }};\nzone \"test\" {{ type primary; file \"{d}/test.zone\"; allow-update {{ 127.0.0.1; }}; }};\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(named_path())
            .args(["-g", "-4", "-n", "1", "-c"])
            .arg(dir.path().join("named.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("named starts");
        let output = Output::default();
        output.collect_lines(child.stderr.take().unwrap(), std::sync::mpsc::channel().0);
        let proc = Proc {
            child,
            output,
            name: format!("parent named 127.0.0.1:{port}"),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        while udp_query(addr, "test.", RecordType::SOA, Duration::from_millis(200)).is_none() {
            assert!(t.elapsed() < Duration::from_secs(20), "the parent answers");
        }
        Parent {
            addr,
            _proc: proc,
            _dir: dir,
        }
    }

    /// The addresses the parent has for `lbN.ns.test.`.
    fn glue(&self, n: usize) -> Vec<IpAddr> {
        let m = udp_query(
            self.addr,
            &format!("lb{n}.ns.test."),
            RecordType::A,
            Duration::from_secs(2),
        )
        .expect("the parent answers");
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect()
    }

    /// The nsupdate script that points `lbN.ns.test.` at `ip` (for a shell `printf`).
    fn update_script(&self, n: &str, ip: &str) -> String {
        format!(
            "server 127.0.0.1 {}\nzone test.\nupdate delete lb{n}.ns.test. A\nupdate add lb{n}.ns.test. 3 A {ip}\nsend\n",
            self.addr.port()
        )
    }

    /// What the operator does at the registrar.
    fn set_glue(&self, n: usize, ip: IpAddr) {
        let mut c = Command::new("nsupdate")
            .stdin(Stdio::piped())
            .spawn()
            .expect("nsupdate runs");
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(
                self.update_script(&n.to_string(), &ip.to_string())
                    .as_bytes(),
            )
            .unwrap();
        assert!(c.wait().unwrap().success());
        assert_eq!(self.glue(n), vec![ip]);
    }
}

/// The delegation hook of these tests: for each new lb (arguments, in config order) an
/// nsupdate at the parent, except for lb N while `DIR/forget-lbN` exists (a hook with a bug).
fn parent_hook(d: &Deployment, parent: &Parent) {
    let script = parent.update_script("$i", "$ip").replace('\n', "\\n");
    set_hook(
        d,
        &format!(
            "cat > DIR/hook-input.json\ni=0\nfor ip in \"$@\"; do\n  i=$((i+1))\n  [ -f DIR/forget-lb$i ] && continue\n  printf \"{script}\" | nsupdate || exit 1\ndone\necho \"$@\" > DIR/new-targets\n"
        ),
    );
}

/// The new lbs' addresses while the roll-lb is unfinished (`lb1-next`, `lb2-next`).
fn next_ips(d: &Deployment) -> Vec<IpAddr> {
    let st = d.status();
    ["lb1-next", "lb2-next"]
        .iter()
        .map(|l| {
            st["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["label"] == *l)
                .unwrap_or_else(|| panic!("{l} exists: {st}"))["address"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn journal(d: &Deployment) -> Value {
    serde_json::from_str(&std::fs::read_to_string(d.dir.path().join("state/journal.json")).unwrap())
        .unwrap()
}

/// A hook that exits 0 but forgot lb2 at the parent: roll-lb stops (the hand-off stays
/// `started`, nothing deleted, the old lbs serve) and says which parent server still names
/// which old lb. With the hook fixed, `--resume` runs it again, the parent agrees, and the
/// quiet period is the parent's NS TTL (6 s), longer than `quiet_secs` (1 s).
#[test]
fn roll_lb_stops_while_a_parent_server_still_names_an_old_lb() {
    let mut d = up("dep-parent");
    let old = d.lb_addrs();
    let serial = d.serial();
    let parent = Parent::start([old[0].ip(), old[1].ip()], 6, 3);
    parent_hook(&d, &parent);
    std::fs::write(d.dir.path().join("forget-lb2"), "").unwrap();
    d.extra = format!(
        "\n[roll_lb]\ndelegation_hook = \"{}\"\nparent_servers = [\"{}\"]\ndelegation_wait_secs = 2\nquiet_secs = 1\npoll_secs = 0.2\nmax_drain_secs = 60\n",
        d.dir.path().join("hook.sh").display(),
        parent.addr
    );
    d.write_config();

    let (code, out, err) = d.run(&["roll-lb"], &[]);
    eprintln!("{out}\n{err}");
    assert_eq!(code, 1, "roll-lb stops");
    let new = next_ips(&d);
    assert!(
        err.contains("exited 0")
            && err.contains(&format!("parent {} for example.test", parent.addr))
            && err.contains(&format!(
                "still names {} (old lb2) as lb2.ns.test.",
                old[1].ip()
            ))
            && err.contains(&format!("does not name {} (new lb2)", new[1])),
        "says which server still names what: {err}"
    );
    assert!(
        err.contains("roll-lb --resume") && err.contains("NOT rolled back"),
        "{err}"
    );
    assert_eq!(d.instances().len(), 6, "nothing deleted");
    assert_eq!(d.status()["unfinished"]["handoff"], "started");
    assert_eq!(d.lb_addrs(), old, "the old lbs are still lb1 and lb2");
    d.assert_serving(serial);
    assert_eq!(parent.glue(1), vec![new[0]], "the hook did change lb1");
    assert_eq!(parent.glue(2), vec![old[1].ip()]);

    // The hook fixed: `--resume` runs it again and the parent agrees.
    std::fs::remove_file(d.dir.path().join("forget-lb2")).unwrap();
    let out = d.ok(&["roll-lb", "--resume"]);
    eprintln!("{out}");
    assert_eq!(parent.glue(2), vec![new[1]]);
    assert!(
        out.contains("name the new lbs and none of the old"),
        "{out}"
    );
    assert!(
        out.contains("quiet period 6s (the parent's NS/glue TTL"),
        "the quiet period is the parent's TTL, not quiet_secs: {out}"
    );
    let j = journal(&d);
    assert_eq!(j["delegation_ttl"], 6);
    let drain_ms = j["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "drain" && s["ok"] == true)
        .unwrap()["elapsed_ms"]
        .as_u64()
        .unwrap();
    assert!(drain_ms >= 6000, "drained for {drain_ms} ms");
    assert_eq!(d.journal_state(), "done");
    let now: Vec<IpAddr> = d.lb_addrs().iter().map(|a| a.ip()).collect();
    assert_eq!(now, new);
    d.assert_serving(serial);
}

/// Without a hook: `--resume` is the operator's word, and the parent must agree. A check that
/// cannot run (no parent servers configured, and the resolver cannot find them) stops with
/// what to set; a parent that still names the old lbs keeps the operation waiting (exit 3)
/// with what is wrong; once the parent is right, `--resume` finishes.
#[test]
fn roll_lb_resume_waits_until_the_parent_names_the_new_lbs() {
    let mut d = up("dep-parent-op");
    let old = d.lb_addrs();
    let parent = Parent::start([old[0].ip(), old[1].ip()], 2, 2);
    let roll_lb = "\n[roll_lb]\ncheck_delegation = true\ndelegation_wait_secs = 1\nquiet_secs = 1\npoll_secs = 0.2\nmax_drain_secs = 60\n";
    d.extra = roll_lb.into();
    d.write_config();
    let (code, out, err) = d.run(&["roll-lb"], &[]);
    assert_eq!(code, 3, "waiting for the operator:\n{out}\n{err}");

    // No parent_servers, and the system resolver knows no `test.`: the check cannot run.
    let (code, out, err) = d.run(&["roll-lb", "--resume"], &[]);
    eprintln!("{out}\n{err}");
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot check the delegation")
            && err.contains("parent_servers")
            && err.contains("check_delegation = false"),
        "says how to fix it: {err}"
    );
    assert_eq!(d.status()["unfinished"]["handoff"], "waiting-for-operator");
    assert_eq!(d.instances().len(), 6);

    // The parent is configured, but the operator has not changed anything yet.
    d.extra = format!(
        "{roll_lb}parent_servers = [\"127.0.0.1:{}\"]\n",
        parent.addr.port()
    );
    d.write_config();
    let (code, out, err) = d.run(&["roll-lb", "--resume"], &[]);
    eprintln!("{out}\n{err}");
    assert_eq!(code, 3, "still waiting for the operator:\n{out}\n{err}");
    assert!(
        out.contains("does not point at the new load balancers only yet")
            && out.contains(&format!(
                "still names {} (old lb1) as lb1.ns.test.",
                old[0].ip()
            )),
        "{out}"
    );
    assert_eq!(d.status()["unfinished"]["handoff"], "waiting-for-operator");
    assert_eq!(d.instances().len(), 6, "nothing deleted");

    // The operator changes the delegation at the registrar.
    let new = next_ips(&d);
    parent.set_glue(1, new[0]);
    parent.set_glue(2, new[1]);
    let out = d.ok(&["roll-lb", "--resume"]);
    assert!(out.contains("confirmed by the operator"), "{out}");
    assert_eq!(d.journal_state(), "done");
    let now: Vec<IpAddr> = d.lb_addrs().iter().map(|a| a.ip()).collect();
    assert_eq!(now, new);
}

/// The instance ids in the local provider's registry.
fn registry_ids(d: &Deployment) -> Vec<u64> {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(d.dir.path().join("world/instances.json")).unwrap(),
    )
    .unwrap();
    r["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect()
}

fn wait_for_file(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "{} appears",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An old lb replaced by a new process during the drain (here `lb ctl upgrade`: its sockets,
/// metrics included, never stop answering, but its counters start again) is not quiet: its
/// quiet period starts again, so it is deleted no sooner than `quiet_secs` after the restart.
/// Before, a counter that went down read as a rate of 0, and the lb was deleted on the old
/// timer.
#[test]
fn roll_lb_a_restarted_old_lb_is_not_quiet() {
    let mut d = Deployment::new("dep-restart");
    let hook = write_hook(&d);
    d.extra = format!(
        "\n[roll_lb]\ndelegation_hook = \"{}\"\nquiet_secs = 8\npoll_secs = 2\nmax_drain_secs = 60\n",
        hook.display()
    );
    d.write_config();
    d.ok(&["up"]);
    let old = d.lb_addrs();
    let lb1_id = d
        .instances()
        .into_iter()
        .find(|(l, _)| l == "lb1")
        .unwrap()
        .1;
    let lb1_dir = d.dir.path().join("world").join(lb1_id.to_string());
    let load = LoadClient::start(old[0], 50);
    let out_file = d.dir.path().join("roll-lb.out");
    let child = Running::spawn(
        d.command(&["roll-lb"])
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(Stdio::null()),
    );
    wait_for_file(&d.dir.path().join("new-targets"));
    let handed_off = Instant::now();
    // Clients follow the delegation; lb1 is replaced by a new process well into the drain
    // (7 s after the hand-off, with an 8 s quiet period polled every 2 s: a drain that ignored
    // the restart would delete it some 4-5 s later).
    assert_eq!(load.finish().lost(), 0);
    std::thread::sleep(Duration::from_secs(7).saturating_sub(handed_off.elapsed()));
    let socket = lb1_dir.join("control.sock");
    let ctl = |args: &[&str]| {
        let o = Command::new(bin("lb"))
            .arg("ctl")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "lb ctl {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ctl(&["upgrade"]);
    let restarted = Instant::now();
    // The new process is the instance now: deleting the instance must stop it.
    let st: Value = serde_json::from_str(&ctl(&["--json", "status"])).unwrap();
    let pid = st["pid"]
        .as_u64()
        .or(st["result"]["pid"].as_u64())
        .expect("a pid");
    std::fs::write(lb1_dir.join("lb.pid"), pid.to_string()).unwrap();
    while registry_ids(&d).contains(&lb1_id) {
        assert!(
            restarted.elapsed() < Duration::from_secs(120),
            "lb1 is deleted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let deleted_after = restarted.elapsed();
    let out = child.wait_with_output();
    let stdout = std::fs::read_to_string(&out_file).unwrap();
    assert!(out.status.success(), "{stdout}");
    eprintln!("old lb1 deleted {deleted_after:?} after its restart\n{stdout}");
    assert!(
        deleted_after >= Duration::from_secs(8),
        "a restarted lb is quiet only quiet_secs after the restart, not {deleted_after:?}"
    );
    assert!(stdout.contains("restarted"), "{stdout}");
}

/// An old lb that carried 50 qps before the hand-off and still gets 1 qps after it is not
/// drained, although 1 qps is below `drain_threshold_qps` (5): its threshold is
/// `drain_ratio` (1%) of its own rate before, 0.5 qps. The drain stops (nothing deleted, the
/// old lb keeps answering); once the trickle ends, `--resume` finishes.
#[test]
fn roll_lb_drains_relative_to_each_old_lbs_rate_before() {
    let mut d = Deployment::new("dep-ratio");
    let hook = write_hook(&d);
    d.extra = format!(
        "\n[roll_lb]\ndelegation_hook = \"{}\"\ndrain_threshold_qps = 5.0\ndrain_ratio = 0.01\nbaseline_secs = 2\nquiet_secs = 3\npoll_secs = 1.0\nmax_drain_secs = 8\n",
        hook.display()
    );
    d.write_config();
    d.ok(&["up"]);
    let old = d.lb_addrs();
    let loads: Vec<_> = old.iter().map(|a| LoadClient::start(*a, 50)).collect();
    let child = Running::spawn(
        d.command(&["roll-lb"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    wait_for_file(&d.dir.path().join("new-targets"));
    for l in loads {
        assert_eq!(l.finish().lost(), 0);
    }
    // A few clients still on the old delegation.
    let trickle = LoadClient::start(old[0], 1);
    let out = child.wait_with_output();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "the drain gives up");
    assert!(
        stderr.contains("did not drain") && stderr.contains("NOT deleted"),
        "{stderr}"
    );
    assert!(
        stdout.contains("thresholds lb1 0.") && stdout.contains("lb2 0."),
        "thresholds are 1% of about 50 qps: {stdout}"
    );
    assert_eq!(d.instances().len(), 6, "nothing deleted");
    assert_eq!(trickle.finish().lost(), 0, "the old lb1 kept answering");
    d.ok(&["roll-lb", "--resume"]);
    assert_eq!(d.journal_state(), "done");
    assert!(d.lb_addrs().iter().all(|a| !old.contains(a)));
}
