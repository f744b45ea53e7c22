//! roll's canary (issue 27, item 7): lb1 is flipped first and soaks under load while lb2 stays
//! on the old set; a canary worse than lb2 (its new nameserver drops most of the load's
//! queries) rolls the roll back by itself, and a good one lets the rest be flipped. Both failed
//! on the deployer before the canary (it flipped every lb at once and finished the bad roll).

use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use integration_tests::*;

use super::{Deployment, Running};

/// A roll whose new nameservers rate-limit their answers (BIND's RRL, 5 identical answers a
/// second, the rest dropped): through the canary most of the load times out. The canary is
/// judged worse within the soak, flipped back, the new nameservers deleted, and the old set
/// serves as before; lb2 never left it.
#[test]
fn a_worse_canary_rolls_back_by_itself() {
    let mut d = Deployment::new("dep-canary-bad");
    d.extra = "\n[canary]\nsoak_secs = 30\nmin_answers = 50\n".into();
    d.write_config();
    d.ok(&["up"]);
    let (before, backends, serial) = (d.instances(), d.lb_backends(), d.serial());
    // Only nameservers provisioned from now on (the new ones) get the limit. The health
    // probes and the deployer's checks ask for the SOA, which stays under it.
    let template = d
        .dir
        .path()
        .join("ansible/roles/nameserver/templates/named.conf.j2");
    let text = std::fs::read_to_string(&template).unwrap();
    assert!(text.contains("    dnssec-validation no;\n"));
    std::fs::write(
        &template,
        text.replace(
            "    dnssec-validation no;\n",
            "    dnssec-validation no;\n    rate-limit { responses-per-second 5; slip 0; window 1; };\n",
        ),
    )
    .unwrap();
    d.bump_serial();
    let loads: Vec<_> = d
        .lb_addrs()
        .into_iter()
        .map(|a| LoadClient::start_query(a, 100, "www.example.test.", RecordType::A))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let (code, out, err) = d.run(&["roll"], &[]);
    eprintln!("{out}\n{err}\nroll took {:?}", t.elapsed());
    let reports: Vec<_> = loads.into_iter().map(|l| l.finish()).collect();
    assert_eq!(code, 1, "the roll fails");
    assert!(
        err.contains("the canary lb lb1 is worse than the lbs on the old set")
            && err.contains("timeout share up"),
        "{err}"
    );
    assert!(err.contains("step flip failed; rolled back"), "{err}");
    assert!(
        out.contains("canary: flipping lb1 first") && out.contains("against lb2"),
        "{out}"
    );
    assert!(out.contains("rollback: lb lb1 back on"), "{out}");
    // lb2 never left the old set: the load through it lost nothing.
    assert_eq!(reports[1].lost(), 0, "lb2 stayed on the old set");
    d.assert_rolled_back(&before, &backends, serial);
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.dir.path().join("state/journal.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["canary"]["canary_state"], "failed", "{st}");
}

/// A good canary: lb1 alone serves from the new nameservers for the soak (seen from outside
/// with `status`: lb1 new, lb2 old), is judged no worse than lb2, then lb2 is flipped too; the
/// load through both loses nothing.
#[test]
fn a_good_canary_soaks_alone_then_the_rest_is_flipped() {
    let mut d = Deployment::new("dep-canary-good");
    d.extra = "\n[canary]\nsoak_secs = 6\nmin_answers = 50\n".into();
    d.write_config();
    d.ok(&["up"]);
    let old = d.lb_backends();
    let new_serial = d.bump_serial();
    let loads: Vec<_> = d
        .lb_addrs()
        .into_iter()
        .map(|a| LoadClient::start(a, 100))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut child = Running::spawn(
        d.command(&["roll"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let stdout = child.child().stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut seen_canary_alone = false;
    while child.child().try_wait().unwrap().is_none() {
        let now = d.lb_backends();
        if now[0] != old[0] && now[1] == old[1] {
            seen_canary_alone = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = lines.join().unwrap();
    let status = child.wait_with_output().status;
    eprintln!("{out}");
    assert!(status.success(), "{out}");
    assert!(
        seen_canary_alone,
        "lb1 served from the new set while lb2 stayed on the old one"
    );
    assert!(
        out.contains("canary lb1") && out.contains("passed a 6s soak"),
        "{out}"
    );
    let (mut sent, mut lost) = (0, 0);
    for l in loads {
        let r = l.finish();
        sent += r.sent;
        lost += r.lost();
    }
    assert!(sent > 1000);
    assert_eq!(lost, 0, "no query lost");
    d.assert_serving(new_serial);
    assert_eq!(d.journal_state(), "done");
}
