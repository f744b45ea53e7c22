//! Where an operation stands, rebuilt from the world: the instances at the provider (their
//! labels, `NAME` and `NAME-next`, and the operation each was created by, kept with it as an
//! [`OperationMark`]) and each lb's live backend set and generation (`lb ctl status`).
//!
//! The journal in `state_dir` is a record and a cache of this, not the only truth: when it is
//! missing (a lost laptop or CI runner, a deleted state directory), or records an older
//! operation than the world shows, the deployer rebuilds a journal from the world
//! ([`rebuild`]) so that `status`, `rollback` and `--resume` work from any host with the same
//! config.
//!
//! The rebuild is conservative. It never yields a state whose next step would delete
//! something that serves: the point of no return is taken as passed as soon as one old
//! instance is gone (then only going forward is offered), and every lb not on the old set gets
//! a recorded flip with the old set as its `previous`, so a rollback converges it back before
//! anything is deleted. A step is recorded as done only when the world proves it (every
//! instance created, every lb on the new set, every old instance gone); anything else runs
//! again, which every step allows (creates adopt, deletes accept "already gone"). Where the
//! world cannot tell (an lb that cannot be read, an lb on neither set, an operation without
//! marks), the rebuild stops with [`Rebuilt::Unclear`]: what it saw, and the command that
//! settles it. roll-lb's hand-off cannot be seen at all once the new lbs serve (the hook may
//! have changed the registrar without the parent showing it yet), so it is rebuilt as begun:
//! `--resume` runs the hand-off again, and only the operator's `rollback
//! --delegation-unchanged` undoes it.

use crate::config::DeployerConfig;
use crate::journal::{
    CanaryRecord, CanaryState, Direction, FlipState, Handoff, Journal, JournalState, LbFlip, Phase,
    StepRecord,
};
use crate::provider::{Instance, OperationMark, Role};
use crate::steps::{Operation, Step};

/// One configured lb's live set, as read from it.
#[derive(Debug, Clone)]
pub struct LbLive {
    pub name: String,
    /// Its live backends and generation, or why it could not be read.
    pub live: Result<(Vec<String>, u64), String>,
}

/// What the world shows: every instance of the deployment and each configured lb's live set
/// (read through the instance labelled with its name).
#[derive(Debug, Clone)]
pub struct WorldView {
    pub instances: Vec<Instance>,
    pub lbs: Vec<LbLive>,
    /// Whether each `-next` lb answers `lb ctl status` (roll-lb: provisioned, may have been
    /// handed the delegation).
    pub next_lbs_serving: Vec<(String, bool)>,
}

/// The outcome of a rebuild.
#[derive(Debug, Clone, PartialEq)]
pub enum Rebuilt {
    /// No unfinished operation in the world.
    Nothing,
    /// The unfinished operation, as a journal, and what the world showed.
    Journal {
        journal: Box<Journal>,
        saw: Vec<String>,
    },
    /// An unfinished operation whose state the world cannot tell safely.
    Unclear { saw: Vec<String>, settle: String },
}

impl Rebuilt {
    fn unclear(saw: Vec<String>, settle: impl Into<String>) -> Rebuilt {
        Rebuilt::Unclear {
            saw,
            settle: settle.into(),
        }
    }
}

/// The latest operation any instance carries the mark of.
pub fn latest_mark(instances: &[Instance]) -> Option<OperationMark> {
    instances
        .iter()
        .filter_map(|i| i.operation)
        .max_by_key(|m| m.started_unix)
}

fn done(steps: &[Step]) -> Vec<StepRecord> {
    steps
        .iter()
        .map(|&step| StepRecord {
            step,
            ok: true,
            detail: "rebuilt from the world".into(),
            elapsed_ms: 0,
        })
        .collect()
}

fn same_set(a: &[String], b: &[String]) -> bool {
    crate::flip::same_set(a, b)
}

/// Rebuilds the unfinished operation from `w`, if there is one (see the module's doc).
/// `serials` are the zone files' (what a new operation would record).
pub fn rebuild(cfg: &DeployerConfig, w: &WorldView, serials: Vec<(String, u32)>) -> Rebuilt {
    let unmarked_next: Vec<&Instance> = w
        .instances
        .iter()
        .filter(|i| i.label.ends_with("-next") && i.operation.is_none())
        .collect();
    if !unmarked_next.is_empty() {
        return Rebuilt::unclear(
            unmarked_next
                .iter()
                .map(|i| {
                    format!(
                        "{} (id {}) carries no operation mark (an older deployer created it)",
                        i.label, i.id
                    )
                })
                .collect(),
            "restore the state directory of the deployer that created them and run the command there, or delete them by hand (after checking with `lb ctl status` that no lb sends to them)",
        );
    }
    let Some(mark) = latest_mark(&w.instances) else {
        return Rebuilt::Nothing;
    };
    let mut j = Journal::new(mark.operation, serials);
    j.started_unix = mark.started_unix;
    match mark.operation {
        Operation::Roll => rebuild_roll(cfg, w, mark, j),
        Operation::RollLb => rebuild_roll_lb(cfg, w, mark, j),
        Operation::Up => rebuild_up(cfg, w, mark, j),
    }
}

/// Where an lb stands between the old set and the new one.
#[derive(Debug, Clone, PartialEq)]
enum LbAt {
    Previous(u64),
    Target(u64),
    /// Both sets are the same (nothing to flip), or it serves another set.
    Other(Vec<String>, u64),
    Unreadable(String),
}

/// What an interrupted roll (of nameservers or of lbs: `role`) shows, by configured name:
/// the instances it created (`NAME-next`, or `NAME` once renamed) and the old ones still there.
struct Sides<'a> {
    w: &'a WorldView,
    mark: OperationMark,
    role: Role,
    created: Vec<Instance>,
}

impl<'a> Sides<'a> {
    fn new(w: &'a WorldView, mark: OperationMark, role: Role) -> Self {
        let created = w
            .instances
            .iter()
            .filter(|i| i.operation == Some(mark) && i.role == role)
            .cloned()
            .collect();
        Sides {
            w,
            mark,
            role,
            created,
        }
    }

    /// False once every instance it created is renamed: the operation went through.
    fn unfinished(&self) -> bool {
        self.created.iter().any(|i| i.label.ends_with("-next"))
    }

    /// The instance created to replace `name`.
    fn created(&self, name: &str) -> Option<&Instance> {
        self.created
            .iter()
            .find(|i| i.label == format!("{name}-next") || i.label == name)
    }

    /// The old instance `name`, if it still exists.
    fn old(&self, name: &str) -> Option<&'a Instance> {
        self.w
            .instances
            .iter()
            .find(|i| i.label == name && i.operation != Some(self.mark) && i.role == self.role)
    }

    fn all_created(&self, names: &[&str]) -> bool {
        names.iter().all(|n| self.created(n).is_some())
    }

    /// The names whose replacement exists and whose old instance is deleted already.
    fn old_gone<'n>(&self, names: &[&'n str]) -> Vec<&'n str> {
        names
            .iter()
            .copied()
            .filter(|n| self.created(n).is_some() && self.old(n).is_none())
            .collect()
    }

    /// The old instances still there, in the order of `names`.
    fn old_of(&self, names: &[&str]) -> Vec<Instance> {
        names.iter().filter_map(|n| self.old(n).cloned()).collect()
    }
}

fn rebuild_roll(
    cfg: &DeployerConfig,
    w: &WorldView,
    mark: OperationMark,
    mut j: Journal,
) -> Rebuilt {
    let sides = Sides::new(w, mark, Role::Nameserver);
    if !sides.unfinished() {
        // Every instance it created is renamed: the roll went through (at most its last
        // record was lost).
        return Rebuilt::Nothing;
    }
    let mut saw = vec![format!(
        "the world shows an unfinished roll ({mark}): created {}",
        sides
            .created
            .iter()
            .map(|i| format!("{} (id {})", i.label, i.id))
            .collect::<Vec<_>>()
            .join(", ")
    )];
    let names: Vec<&str> = cfg.nameservers.iter().map(|n| n.name.as_str()).collect();
    let all_created = sides.all_created(&names);
    let old_gone = sides.old_gone(&names);
    j.created = sides.created.clone();
    j.old = sides.old_of(&names);
    let forward = !old_gone.is_empty();
    if forward {
        saw.push(format!(
            "old nameservers already deleted: {} (past the point of no return)",
            old_gone.join(", ")
        ));
        if !all_created {
            return Rebuilt::unclear(
                saw,
                "some old nameservers are deleted and not every new one exists: check each lb with `lb ctl status`, recreate what is missing by hand, or restore the state directory",
            );
        }
    }
    // Each lb against the old set and the new one.
    let addrs = |fronts: &[String], pick: &dyn Fn(&str) -> Option<String>| -> Option<Vec<String>> {
        fronts.iter().map(|f| pick(f)).collect()
    };
    let mut flips = Vec::new();
    let mut at = Vec::new();
    for l in &cfg.lbs {
        let previous = addrs(&l.fronts, &|n| {
            sides.old(n).map(|i| i.backend_addr().to_string())
        });
        let target = addrs(&l.fronts, &|n| {
            sides.created(n).map(|i| i.backend_addr().to_string())
        });
        let live = w
            .lbs
            .iter()
            .find(|x| x.name == l.name)
            .map_or(Err("not found".to_string()), |x| x.live.clone());
        let here = match &live {
            Err(e) => LbAt::Unreadable(e.clone()),
            Ok((set, g)) if target.as_ref().is_some_and(|t| same_set(set, t)) => LbAt::Target(*g),
            Ok((set, g)) if previous.as_ref().is_some_and(|p| same_set(set, p)) => {
                LbAt::Previous(*g)
            }
            Ok((set, g)) => LbAt::Other(set.clone(), *g),
        };
        saw.push(format!(
            "lb {} serves {}",
            l.name,
            match &live {
                Ok((set, g)) => format!(
                    "{} (generation {g}: {})",
                    set.join(" "),
                    match here {
                        LbAt::Target(_) => "the new set",
                        LbAt::Previous(_) => "the old set",
                        _ => "neither the old set nor the new one",
                    }
                ),
                Err(e) => format!("? (cannot be read: {e})"),
            }
        ));
        flips.push(LbFlip {
            lb: l.name.clone(),
            // Where the old set is gone, what it serves is what a flip back would restore.
            previous: previous
                .clone()
                .or_else(|| live.as_ref().ok().map(|(s, _)| s.clone()))
                .unwrap_or_default(),
            target: target.clone().unwrap_or_default(),
            direction: Direction::Forward,
            state: match here {
                LbAt::Target(generation) => FlipState::Confirmed { generation },
                _ => FlipState::Planned,
            },
        });
        at.push((l.name.clone(), here));
    }
    if let Some((name, LbAt::Unreadable(e))) =
        at.iter().find(|(_, a)| matches!(a, LbAt::Unreadable(_)))
    {
        return Rebuilt::unclear(
            saw,
            format!("lb {name} cannot be read ({e}), so which set it serves is unknown: fix it (`lb ctl status` on it), then run the command again"),
        );
    }
    let on_target: Vec<&str> = at
        .iter()
        .filter(|(_, a)| matches!(a, LbAt::Target(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    if forward {
        // Only forward: every lb is converged to the new set, whatever it serves now.
        j.phase = Phase::Forward;
        j.flips = flips;
        j.canary = cfg.canary_lb().map(|lb| CanaryRecord {
            lb: lb.to_string(),
            state: CanaryState::Passed {
                verdict: "rebuilt from the world: old nameservers were already deleted".into(),
            },
        });
        let mut steps = vec![
            Step::Create,
            Step::Provision,
            Step::Check,
            Step::Flip,
            Step::Verify,
        ];
        if j.old.is_empty() {
            steps.push(Step::DeleteOld);
        }
        j.steps = done(&steps);
        return Rebuilt::Journal {
            journal: Box::new(j),
            saw,
        };
    }
    if let Some((name, _)) = at.iter().find(|(_, a)| matches!(a, LbAt::Other(..))) {
        return Rebuilt::unclear(
            saw,
            format!("lb {name} serves neither the old nameservers nor the new ones, so nothing can be deleted safely: point it at one of them (`lb ctl set-backends` on it), or restore the state directory, then run the command again"),
        );
    }
    if !all_created {
        if !on_target.is_empty() {
            return Rebuilt::unclear(
                saw,
                "an lb serves new nameservers although not every new one exists: restore the state directory, or flip it back by hand",
            );
        }
        // Creating: nothing serves from what was created. `--resume` creates the rest,
        // `rollback` deletes what exists.
        return Rebuilt::Journal {
            journal: Box::new(j),
            saw,
        };
    }
    if on_target.is_empty() {
        // The flip had not begun (or sent nothing that was applied): the new nameservers were
        // created; their provisioning and checks run again on `--resume`.
        j.steps = done(&[Step::Create]);
        return Rebuilt::Journal {
            journal: Box::new(j),
            saw,
        };
    }
    // The flip had begun: every lb's flip is recorded, so a rollback brings each back to the
    // old set before anything is deleted, and a resume converges each to the new one.
    j.flips = flips;
    let all_flipped = on_target.len() == cfg.lbs.len();
    j.canary = cfg.canary_lb().map(|lb| CanaryRecord {
        lb: lb.to_string(),
        state: if on_target == [lb] && !all_flipped {
            // Only the canary is on the new set: its trial is run again from the start.
            CanaryState::Flipping
        } else {
            CanaryState::Passed {
                verdict: "rebuilt from the world: lbs other than the canary were on the new set"
                    .into(),
            }
        },
    });
    let mut steps = vec![Step::Create, Step::Provision, Step::Check];
    if all_flipped {
        steps.push(Step::Flip);
    }
    j.steps = done(&steps);
    Rebuilt::Journal {
        journal: Box::new(j),
        saw,
    }
}

fn rebuild_roll_lb(
    cfg: &DeployerConfig,
    w: &WorldView,
    mark: OperationMark,
    mut j: Journal,
) -> Rebuilt {
    let sides = Sides::new(w, mark, Role::Lb);
    if !sides.unfinished() {
        return Rebuilt::Nothing;
    }
    let mut saw = vec![format!(
        "the world shows an unfinished roll-lb ({mark}): created {}",
        sides
            .created
            .iter()
            .map(|i| format!("{} (id {}, {})", i.label, i.id, i.address))
            .collect::<Vec<_>>()
            .join(", ")
    )];
    let names: Vec<&str> = cfg.lbs.iter().map(|l| l.name.as_str()).collect();
    let all_created = sides.all_created(&names);
    let old_gone = sides.old_gone(&names);
    j.created = sides.created.clone();
    j.old = sides.old_of(&names);
    if !old_gone.is_empty() {
        saw.push(format!(
            "old lbs already deleted: {} (past the point of no return: the delegation was handed over and they were drained)",
            old_gone.join(", ")
        ));
        if !all_created {
            return Rebuilt::unclear(
                saw,
                "some old lbs are deleted and not every new one exists: restore the state directory, or recreate the missing lbs by hand",
            );
        }
        j.phase = Phase::Forward;
        j.handoff = Handoff::Done;
        let mut steps = vec![
            Step::CreateLbsNext,
            Step::AllowLbsNext,
            Step::ProvisionLbsNext,
            Step::CheckLbsNext,
            Step::Handoff,
            Step::Drain,
        ];
        if j.old.is_empty() {
            steps.push(Step::DeleteOldLbs);
        }
        j.steps = done(&steps);
        return Rebuilt::Journal {
            journal: Box::new(j),
            saw,
        };
    }
    let serving: Vec<&str> = w
        .next_lbs_serving
        .iter()
        .filter(|(_, up)| *up)
        .map(|(l, _)| l.as_str())
        .collect();
    if !all_created || serving.is_empty() {
        // No new lb serves: none can have been handed the delegation.
        saw.push("no new lb answers yet: the hand-off cannot have begun".into());
        if all_created {
            j.steps = done(&[Step::CreateLbsNext]);
        }
        return Rebuilt::Journal {
            journal: Box::new(j),
            saw,
        };
    }
    saw.push(format!(
        "new lbs serve ({}): whether the delegation hand-off began cannot be told from the world (a registrar's change may not show at the parent yet), so it counts as begun",
        serving.join(", ")
    ));
    j.handoff = Handoff::Started;
    j.steps = done(&[Step::CreateLbsNext]);
    Rebuilt::Journal {
        journal: Box::new(j),
        saw,
    }
}

fn rebuild_up(cfg: &DeployerConfig, w: &WorldView, mark: OperationMark, mut j: Journal) -> Rebuilt {
    let ours: Vec<Instance> = w
        .instances
        .iter()
        .filter(|i| i.operation == Some(mark))
        .cloned()
        .collect();
    let exists = |n: &str| ours.iter().any(|i| i.label == n);
    let ns_all = cfg.nameservers.iter().all(|n| exists(&n.name));
    let lbs_all = cfg.lbs.iter().all(|l| exists(&l.name));
    let lbs_serve = cfg.lbs.iter().all(|l| {
        w.lbs
            .iter()
            .any(|x| x.name == l.name && x.live.as_ref().is_ok_and(|(s, _)| !s.is_empty()))
    });
    if ns_all && lbs_all && lbs_serve {
        // Everything exists and every lb serves: nothing is left to create (an up whose last
        // checks did not run looks the same; `deployer roll` checks everything again).
        return Rebuilt::Nothing;
    }
    let saw = vec![format!(
        "the world shows an unfinished up ({mark}): created {}{}",
        ours.iter()
            .map(|i| format!("{} (id {})", i.label, i.id))
            .collect::<Vec<_>>()
            .join(", "),
        if lbs_serve {
            ""
        } else {
            "; not every lb serves yet"
        }
    )];
    j.created = ours;
    let mut steps = Vec::new();
    if ns_all {
        steps.push(Step::CreateNameservers);
    }
    if ns_all && lbs_all {
        steps.push(Step::CreateLbs);
    }
    j.steps = done(&steps);
    Rebuilt::Journal {
        journal: Box::new(j),
        saw,
    }
}

/// True when the recorded journal is the same operation as the world's latest mark (or the
/// world shows none).
pub fn same_operation(j: &Journal, mark: Option<OperationMark>) -> bool {
    mark.is_none_or(|m| m.operation == j.operation && m.started_unix == j.started_unix)
}

/// A recorded journal that is finished cannot describe the world's unfinished operation.
pub fn is_finished(j: &Journal) -> bool {
    j.state != JournalState::InProgress
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn cfg(extra: &str) -> DeployerConfig {
        let text = format!(
            "deployment = \"t\"\n[provider]\nkind = \"local\"\n[[nameservers]]\nname = \"ns1\"\n[[nameservers]]\nname = \"ns2\"\n[zones]\nnames = [\"example.test\"]\n[[lbs]]\nname = \"lb1\"\nfronts = [\"ns1\"]\n[[lbs]]\nname = \"lb2\"\nfronts = [\"ns2\"]\n{extra}"
        );
        lb::config::parse_toml(&text, std::path::Path::new("deployer.toml")).unwrap()
    }

    const ROLL: OperationMark = OperationMark {
        operation: Operation::Roll,
        started_unix: 200,
    };
    const UP: OperationMark = OperationMark {
        operation: Operation::Up,
        started_unix: 100,
    };

    fn inst(id: u64, label: &str, role: Role, port: u16, mark: OperationMark) -> Instance {
        Instance {
            id,
            label: label.into(),
            role,
            status: "running".into(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dns_port: port,
            metrics_port: 0,
            dir: None,
            private_address: None,
            region: None,
            operation: Some(mark),
        }
    }

    /// ns1, ns2 (ports 1, 2) and lb1, lb2 from `up`; ns1-next, ns2-next (ports 11, 12) from a roll.
    fn world(lb1: &str, lb2: &str, old: &[&str]) -> WorldView {
        let mut instances = vec![
            inst(3, "lb1", Role::Lb, 53, UP),
            inst(4, "lb2", Role::Lb, 54, UP),
            inst(5, "ns1-next", Role::Nameserver, 11, ROLL),
            inst(6, "ns2-next", Role::Nameserver, 12, ROLL),
        ];
        for (id, n, port) in [(1, "ns1", 1), (2, "ns2", 2)] {
            if old.contains(&n) {
                instances.push(inst(id, n, Role::Nameserver, port, UP));
            }
        }
        let live = |s: &str| Ok((vec![format!("127.0.0.1:{s}")], 7));
        WorldView {
            instances,
            lbs: vec![
                LbLive {
                    name: "lb1".into(),
                    live: live(lb1),
                },
                LbLive {
                    name: "lb2".into(),
                    live: live(lb2),
                },
            ],
            next_lbs_serving: Vec::new(),
        }
    }

    fn journal(r: Rebuilt) -> Journal {
        match r {
            Rebuilt::Journal { journal, .. } => *journal,
            other => panic!("not rebuilt: {other:?}"),
        }
    }

    #[test]
    fn a_roll_is_rebuilt_no_further_than_the_world_proves() {
        let c = cfg("[canary]\nsoak_secs = 2\n");
        // Created, nothing flipped: undoable, only the create is done.
        let j = journal(rebuild(&c, &world("1", "2", &["ns1", "ns2"]), vec![]));
        assert_eq!((j.phase, j.steps_done()), (Phase::Undoable, vec!["create"]));
        assert!(j.flips.is_empty() && j.old.len() == 2 && j.created.len() == 2);
        assert_eq!(j.started_unix, 200, "the operation keeps its mark");
        // The canary alone on the new set: every flip recorded, its trial to run again.
        let j = journal(rebuild(&c, &world("11", "2", &["ns1", "ns2"]), vec![]));
        assert_eq!(j.flips.len(), 2);
        assert_eq!(j.flips[0].state, FlipState::Confirmed { generation: 7 });
        assert_eq!(j.flips[1].state, FlipState::Planned);
        assert_eq!(j.flips[1].previous, vec!["127.0.0.1:2".to_string()]);
        assert_eq!(j.canary.as_ref().unwrap().state, CanaryState::Flipping);
        assert!(!j.done(Step::Flip));
        // Every lb on the new set: the flip is done, verify runs again.
        let j = journal(rebuild(&c, &world("11", "12", &["ns1", "ns2"]), vec![]));
        assert!(j.done(Step::Flip) && !j.done(Step::Verify));
        // One old nameserver gone: past the point of no return, only forward.
        let j = journal(rebuild(&c, &world("11", "12", &["ns2"]), vec![]));
        assert_eq!(j.phase, Phase::Forward);
        assert!(j.done(Step::Verify) && !j.done(Step::DeleteOld));
        assert_eq!(j.old.len(), 1);
    }

    #[test]
    fn what_the_world_cannot_tell_is_said_not_guessed() {
        let c = cfg("");
        // An lb on neither set.
        let r = rebuild(&c, &world("99", "2", &["ns1", "ns2"]), vec![]);
        let Rebuilt::Unclear { saw, settle } = r else {
            panic!("{r:?}")
        };
        assert!(saw.iter().any(|l| l.contains("neither")), "{saw:?}");
        assert!(settle.contains("lb lb1"), "{settle}");
        // An lb that cannot be read.
        let mut w = world("1", "2", &["ns1", "ns2"]);
        w.lbs[1].live = Err("connection refused".into());
        assert!(matches!(rebuild(&c, &w, vec![]), Rebuilt::Unclear { .. }));
        // A -next instance without a mark (an older deployer's).
        let mut w = world("1", "2", &["ns1", "ns2"]);
        w.instances[2].operation = None;
        assert!(matches!(rebuild(&c, &w, vec![]), Rebuilt::Unclear { .. }));
        // Everything renamed: nothing unfinished.
        let mut w = world("11", "12", &[]);
        w.instances[2].label = "ns1".into();
        w.instances[3].label = "ns2".into();
        assert_eq!(rebuild(&c, &w, vec![]), Rebuilt::Nothing);
    }

    #[test]
    fn a_serving_roll_lb_counts_as_handed_off() {
        let c = cfg("");
        let rl = OperationMark {
            operation: Operation::RollLb,
            started_unix: 300,
        };
        let mut w = world("1", "2", &["ns1", "ns2"]);
        w.instances.truncate(2);
        w.instances.extend([
            inst(1, "ns1", Role::Nameserver, 1, UP),
            inst(2, "ns2", Role::Nameserver, 2, UP),
            inst(7, "lb1-next", Role::Lb, 55, rl),
            inst(8, "lb2-next", Role::Lb, 56, rl),
        ]);
        w.next_lbs_serving = vec![("lb1-next".into(), false), ("lb2-next".into(), false)];
        let j = journal(rebuild(&c, &w, vec![]));
        assert_eq!(j.handoff, Handoff::NotStarted, "no new lb serves yet");
        w.next_lbs_serving[1].1 = true;
        let j = journal(rebuild(&c, &w, vec![]));
        assert_eq!(
            j.handoff,
            Handoff::Started,
            "only the operator can say it was not"
        );
        assert!(j.handoff.blocks_undo());
        // An old lb gone: forward.
        w.instances.retain(|i| i.label != "lb1");
        let j = journal(rebuild(&c, &w, vec![]));
        assert_eq!((j.phase, j.handoff), (Phase::Forward, Handoff::Done));
    }
}
