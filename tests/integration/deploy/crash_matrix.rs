//! The crash matrix (issue #17): on the local provider with two lbs and two nameservers and a
//! steady load through both lbs, crash `deployer roll` at a point, then `roll --resume` (every
//! point) or `rollback` (every point before `delete-old`), and lose a reply of each lb's swap.
//! After each case: every lb serves from a complete set (all old or all new, read with
//! `lb ctl status`), the deployment has exactly its instances, the zones answer through every
//! lb, and the load lost no query.
//!
//! The roll has a canary (lb1, soaked for 2 s), so the points of its trial are in the matrix.
//!
//! `scripts/test.sh` runs one point per phase; `CRASH_MATRIX=full` (benches/crash-matrix.sh)
//! runs every point and `CRASH_MATRIX_OUT=FILE` writes the table.

use std::time::{Duration, Instant};

use deployer::steps::{crash_points, Operation, PointNames};
use integration_tests::LoadClient;

use super::{assert_complete, Deployment};

/// The matrix's canary: a short soak, judged on the matrix's own load.
const CANARY: &str = "\n[canary]\nsoak_secs = 2\nmin_answers = 50\n";

/// What is done to the roll.
#[derive(Debug, Clone)]
enum Case {
    /// Crash at the point, then `roll --resume` (or `rollback` when `undo`).
    Crash { point: String, undo: bool },
    /// Lose the reply of this lb's swap (the roll goes on); with `fail_verify`, the roll then
    /// fails at verify and rolls back.
    LostReply { lb: String, fail_verify: bool },
}

impl Case {
    fn name(&self) -> String {
        match self {
            Case::Crash { point, .. } => point.clone(),
            Case::LostReply { lb, fail_verify } => format!(
                "flip:{lb}:lost-reply{}",
                if *fail_verify {
                    " + fail at verify"
                } else {
                    ""
                }
            ),
        }
    }
    fn then(&self) -> &'static str {
        match self {
            Case::Crash { undo: false, .. } => "roll --resume",
            Case::Crash { undo: true, .. } => "rollback",
            Case::LostReply {
                fail_verify: false, ..
            } => "(roll goes on)",
            Case::LostReply {
                fail_verify: true, ..
            } => "(roll rolls back)",
        }
    }
}

/// One row of the table.
struct Row {
    case: String,
    then: &'static str,
    first_exit: String,
    outcome: &'static str,
    sent: usize,
    lost: usize,
    secs: f64,
}

fn all_cases() -> Vec<Case> {
    let lbs = ["lb1".to_string(), "lb2".to_string()];
    let ns = ["ns1".to_string(), "ns2".to_string()];
    let points = crash_points(
        Operation::Roll,
        &PointNames {
            lbs: &lbs,
            nameservers: &ns,
            canary: Some("lb1"),
        },
    );
    let last_undoable = points
        .iter()
        .position(|p| p == "delete-old:before")
        .expect("delete-old has a before point");
    let mut cases: Vec<Case> = points
        .iter()
        .map(|p| Case::Crash {
            point: p.clone(),
            undo: false,
        })
        .collect();
    cases.extend(points[..=last_undoable].iter().map(|p| Case::Crash {
        point: p.clone(),
        undo: true,
    }));
    for lb in lbs {
        for fail_verify in [false, true] {
            cases.push(Case::LostReply {
                lb: lb.clone(),
                fail_verify,
            });
        }
    }
    cases
}

/// One point per phase: before the flip, inside it (both directions of the window), past the
/// point of no return, and a lost reply.
fn ci_cases() -> Vec<Case> {
    let crash = |p: &str, undo| Case::Crash {
        point: p.into(),
        undo,
    };
    vec![
        crash("provision:after", false),
        crash("flip:canary:soaking", false),
        crash("flip:canary:judged", true),
        crash("flip:lb2:before-swap", false),
        crash("flip:lb1:after-swap", true),
        crash("delete-old:ns2:before", false),
        Case::LostReply {
            lb: "lb1".into(),
            fail_verify: false,
        },
    ]
}

/// What is done between the first run and the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Between {
    /// Nothing: the second run finds the journal the first left.
    Nothing,
    /// The state directory is deleted (a lost laptop or CI runner): the second run rebuilds
    /// where the roll stands from the world, and resumes or rolls back as that allows.
    DeleteStateDir,
}

fn run_case(d: &Deployment, case: &Case) -> Row {
    run_case_with(d, case, Between::Nothing)
}

fn run_case_with(d: &Deployment, case: &Case, between: Between) -> Row {
    let t = Instant::now();
    let before = d.instances();
    let zone_text = std::fs::read_to_string(d.zone()).unwrap();
    d.bump_serial();
    let loads: Vec<_> = d
        .lb_addrs()
        .into_iter()
        .map(|a| LoadClient::start(a, 100))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (env, then): (Vec<(&str, String)>, Option<&[&str]>) = match case {
        Case::Crash { point, undo } => (
            vec![("DEPLOYER_CRASH_AT", point.clone())],
            Some(if *undo {
                &["rollback"][..]
            } else {
                &["roll", "--resume"][..]
            }),
        ),
        Case::LostReply { lb, fail_verify } => {
            let mut env = vec![("DEPLOYER_FAULT", format!("flip:{lb}:lost-reply"))];
            if *fail_verify {
                env.push(("DEPLOYER_FAIL_AT", "verify".into()));
            }
            (env, None)
        }
    };
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, out, err) = d.run(&["roll"], &env_ref);
    let first_exit = match code {
        -1 => "killed".to_string(),
        c => format!("exit {c}"),
    };
    match case {
        Case::Crash { point, .. } => {
            assert_eq!(code, -1, "{point}: the roll is killed there:\n{out}\n{err}");
            assert!(
                err.contains(&format!("fault injected: {point}")),
                "{point}: {err}"
            );
        }
        Case::LostReply { lb, fail_verify } => {
            assert!(
                err.contains(&format!("fault injected: flip:{lb}:lost-reply")),
                "{err}"
            );
            assert_eq!(code, if *fail_verify { 1 } else { 0 }, "{out}\n{err}");
        }
    }
    let mut then = then;
    if between == Between::DeleteStateDir {
        std::fs::remove_dir_all(d.dir.path().join("state")).unwrap();
        let st = d.status();
        let u = &st["unfinished"];
        assert!(st["unclear"].is_null(), "{}: {st}", case.name());
        if u.is_null() {
            // Nothing the world shows is unfinished (e.g. every instance renamed).
            then = None;
        } else {
            assert_eq!(
                u["source"],
                "world",
                "{}: rebuilt from the world: {u}",
                case.name()
            );
            assert_eq!(u["operation"], "roll", "{u}");
            // Past the point of no return only going forward is offered.
            if u["phase"] == "forward" {
                then = Some(&["roll", "--resume"][..]);
            }
            eprintln!(
                "state dir deleted after {}: rebuilt phase {}, steps done {}",
                case.name(),
                u["phase"],
                u["steps_done"]
            );
        }
    }
    if let Some(args) = then {
        let (code, out, err) = d.run(args, &[]);
        assert_eq!(
            code,
            0,
            "{}: `deployer {}` after the crash failed:\n{out}\n{err}",
            case.name(),
            args.join(" ")
        );
    }
    let st = d.status();
    let rolled_back = if st["last"].is_null() {
        // No journal (the state directory was deleted and nothing was left to finish): the
        // world says which set serves, by the nameservers' ids.
        let ns = |v: &[(String, u64)]| -> Vec<u64> {
            v.iter()
                .filter(|(l, _)| l.starts_with("ns"))
                .map(|(_, id)| *id)
                .collect()
        };
        ns(&d.instances()) == ns(&before)
    } else {
        st["last"]["state"] == "rolled-back"
    };
    if rolled_back {
        // The old set serves the old serial: the zone file goes back to it.
        std::fs::write(d.zone(), zone_text).unwrap();
    }
    let old = assert_complete(d, &before);
    assert_eq!(
        old,
        rolled_back,
        "{}: outcome matches the journal",
        case.name()
    );
    std::thread::sleep(Duration::from_millis(300));
    let (mut sent, mut lost) = (0, 0);
    for l in loads {
        let r = l.finish();
        sent += r.sent;
        lost += r.lost();
    }
    assert!(sent > 100, "{}: the load ran ({sent})", case.name());
    assert_eq!(lost, 0, "{}: no query lost", case.name());
    Row {
        case: case.name(),
        then: case.then(),
        first_exit,
        outcome: if old { "all old" } else { "all new" },
        sent,
        lost,
        secs: t.elapsed().as_secs_f64(),
    }
}

/// Issue #27: the state directory is deleted at every phase of the CI subset (every crash point
/// with `CRASH_MATRIX=full`; after the crash: lost replies do not stop the roll) and a fresh one
/// finishes: `deployer status` rebuilds where
/// the roll stands from the instances (their operation marks) and the lbs' live sets, then
/// `roll --resume` or `rollback` (as the rebuilt phase allows) ends on a complete set, with no
/// query lost and nothing left over.
#[test]
fn a_deleted_state_dir_is_rebuilt_from_the_world_at_every_phase() {
    let mut d = Deployment::new("dep-world-matrix");
    d.extra = CANARY.into();
    d.write_config();
    d.ok(&["up"]);
    // `CRASH_MATRIX=full` (benches/crash-matrix.sh): at every crash point.
    let full = std::env::var("CRASH_MATRIX").is_ok_and(|v| v == "full");
    for case in if full { all_cases() } else { ci_cases() }
        .into_iter()
        .filter(|c| matches!(c, Case::Crash { .. }))
    {
        let row = run_case_with(&d, &case, Between::DeleteStateDir);
        eprintln!(
            "state-dir matrix: {:<34} then {:<16} -> {} ({} queries, {} lost, {:.1}s)",
            row.case, row.then, row.outcome, row.sent, row.lost, row.secs
        );
    }
}

#[test]
fn crash_points_resume_or_roll_back_to_a_complete_set_under_load() {
    let full = std::env::var("CRASH_MATRIX").is_ok_and(|v| v == "full");
    let cases = if full { all_cases() } else { ci_cases() };
    let mut d = Deployment::new(if full {
        "dep-matrix-full"
    } else {
        "dep-matrix"
    });
    // The roll flips lb1 first as a canary, soaks it under the load, then flips lb2.
    d.extra = CANARY.into();
    d.write_config();
    d.ok(&["up"]);
    let mut rows = Vec::new();
    for case in &cases {
        let row = run_case(&d, case);
        eprintln!(
            "crash matrix: {:<34} then {:<16} {:<7} -> {} ({} queries, {} lost, {:.1}s)",
            row.case, row.then, row.first_exit, row.outcome, row.sent, row.lost, row.secs
        );
        rows.push(row);
    }
    let mut table = String::from(
        "| # | point | then | first run | outcome | queries | lost | seconds |\n| ---: | --- | --- | --- | --- | ---: | ---: | ---: |\n",
    );
    for (k, r) in rows.iter().enumerate() {
        table.push_str(&format!(
            "| {} | `{}` | {} | {} | {} | {} | {} | {:.1} |\n",
            k + 1,
            r.case,
            r.then,
            r.first_exit,
            r.outcome,
            r.sent,
            r.lost,
            r.secs
        ));
    }
    eprintln!("{table}");
    if let Some(path) = std::env::var_os("CRASH_MATRIX_OUT") {
        std::fs::write(path, &table).unwrap();
    }
    assert_eq!(rows.len(), cases.len());
}
