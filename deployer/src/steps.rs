//! The typed steps of every operation, their printed names, and the crash points inside them.
//!
//! Steps are an enum, not strings, so the engine's dispatch is checked by the compiler and the
//! journal cannot record a step that does not exist. The names printed (and accepted by
//! `DEPLOYER_FAIL_AT`, `DEPLOYER_PAUSE_AFTER` and `DEPLOYER_CRASH_AT`) are the ones the
//! deployer always printed.

use serde::{Deserialize, Serialize};

/// An operation recorded in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    Up,
    Roll,
    RollLb,
}

impl Operation {
    /// The command that runs it.
    pub fn command(self) -> &'static str {
        match self {
            Operation::Up => "up",
            Operation::Roll => "roll",
            Operation::RollLb => "roll-lb",
        }
    }

    /// Its steps, in order.
    pub fn steps(self) -> &'static [Step] {
        match self {
            Operation::Up => &UP_STEPS,
            Operation::Roll => &ROLL_STEPS,
            Operation::RollLb => &ROLL_LB_STEPS,
        }
    }
}

/// One step of `up`, `roll` or `roll-lb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    // roll: the seed's seven steps.
    Create,
    Provision,
    Check,
    Flip,
    Verify,
    DeleteOld,
    Rename,
    // up.
    CreateNameservers,
    ProvisionNameservers,
    CheckNameservers,
    CreateLbs,
    ProvisionLbs,
    CheckLbs,
    // roll-lb: the seed's second list.
    CreateLbsNext,
    ProvisionLbsNext,
    CheckLbsNext,
    Handoff,
    Drain,
    DeleteOldLbs,
    RenameLbs,
    // roll-lb: the nameservers' allow lists and firewalls follow the set of lbs.
    AllowLbsNext,
    DisallowOldLbs,
}

/// The roll's steps, in order (the seed's numbered list).
pub const ROLL_STEPS: [Step; 7] = [
    Step::Create,
    Step::Provision,
    Step::Check,
    Step::Flip,
    Step::Verify,
    Step::DeleteOld,
    Step::Rename,
];

/// The steps of `up`. The lbs are created before the nameservers are provisioned (the
/// nameservers answer and let through only the lbs, so they must know their addresses) and
/// provisioned before the nameservers are checked (the checks run from an lb).
pub const UP_STEPS: [Step; 6] = [
    Step::CreateNameservers,
    Step::CreateLbs,
    Step::ProvisionNameservers,
    Step::ProvisionLbs,
    Step::CheckNameservers,
    Step::CheckLbs,
];

/// The steps of `roll-lb` (the seed's second list), with the nameservers' allow lists opened
/// to the new lbs before they are provisioned and closed to the old ones once they are gone.
pub const ROLL_LB_STEPS: [Step; 9] = [
    Step::CreateLbsNext,
    Step::AllowLbsNext,
    Step::ProvisionLbsNext,
    Step::CheckLbsNext,
    Step::Handoff,
    Step::Drain,
    Step::DeleteOldLbs,
    Step::RenameLbs,
    Step::DisallowOldLbs,
];

const ALL: [Step; 22] = [
    Step::Create,
    Step::Provision,
    Step::Check,
    Step::Flip,
    Step::Verify,
    Step::DeleteOld,
    Step::Rename,
    Step::CreateNameservers,
    Step::ProvisionNameservers,
    Step::CheckNameservers,
    Step::CreateLbs,
    Step::ProvisionLbs,
    Step::CheckLbs,
    Step::CreateLbsNext,
    Step::ProvisionLbsNext,
    Step::CheckLbsNext,
    Step::Handoff,
    Step::Drain,
    Step::DeleteOldLbs,
    Step::RenameLbs,
    Step::AllowLbsNext,
    Step::DisallowOldLbs,
];

impl Step {
    /// The name as printed.
    pub fn name(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Provision => "provision",
            Step::Check => "check",
            Step::Flip => "flip",
            Step::Verify => "verify",
            Step::DeleteOld => "delete-old",
            Step::Rename => "rename",
            Step::CreateNameservers => "create-nameservers",
            Step::ProvisionNameservers => "provision-nameservers",
            Step::CheckNameservers => "check-nameservers",
            Step::CreateLbs => "create-lbs",
            Step::ProvisionLbs => "provision-lbs",
            Step::CheckLbs => "check-lbs",
            Step::CreateLbsNext => "create-lbs-next",
            Step::ProvisionLbsNext => "provision-lbs-next",
            Step::CheckLbsNext => "check-lbs-next",
            Step::Handoff => "handoff",
            Step::Drain => "drain",
            Step::DeleteOldLbs => "delete-old-lbs",
            Step::RenameLbs => "rename-lbs",
            Step::AllowLbsNext => "allow-lbs-next",
            Step::DisallowOldLbs => "disallow-old-lbs",
        }
    }

    /// The step printed as `name`, if any.
    pub fn parse(name: &str) -> Option<Step> {
        ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The names an operation's instances and lbs go by, for naming the crash points inside steps.
pub struct PointNames<'a> {
    /// Load balancers, in config order.
    pub lbs: &'a [String],
    /// Nameservers, in config order.
    pub nameservers: &'a [String],
    /// The canary lb of `roll`, if it has one (flipped first, then soaked and judged).
    pub canary: Option<&'a str>,
}

/// Every crash point of `op`, in the order a run passes them: `STEP:before` and `STEP:after`
/// for each step, and inside the steps that touch several instances `flip:LB:before-swap`,
/// `flip:LB:after-swap`, `delete-old:NAME:before` (the old instance's label) and
/// `rename:NAME:before` (the label being renamed, `NAME-next`); likewise
/// `delete-old-lbs:NAME:before` and `rename-lbs:NAME:before` for `roll-lb`, whose hand-off
/// with a delegation hook also has `handoff:started` and `handoff:hook-running`. With a
/// canary, `flip` passes the canary's swap points first, then `flip:canary:soaking` (the
/// canary confirmed and recorded, before the soak) and `flip:canary:judged` (the verdict
/// recorded), then the other lbs' swap points.
pub fn crash_points(op: Operation, names: &PointNames) -> Vec<String> {
    let mut out = Vec::new();
    for &step in op.steps() {
        out.push(format!("{step}:before"));
        match step {
            Step::Flip => {
                let swap = |out: &mut Vec<String>, lb: &str| {
                    out.push(format!("flip:{lb}:before-swap"));
                    out.push(format!("flip:{lb}:after-swap"));
                };
                if let Some(c) = names.canary {
                    swap(&mut out, c);
                    out.push("flip:canary:soaking".into());
                    out.push("flip:canary:judged".into());
                }
                for lb in names.lbs {
                    if Some(lb.as_str()) != names.canary {
                        swap(&mut out, lb);
                    }
                }
            }
            Step::DeleteOld => {
                for n in names.nameservers {
                    out.push(format!("delete-old:{n}:before"));
                }
            }
            Step::Rename => {
                for n in names.nameservers {
                    out.push(format!("rename:{n}-next:before"));
                }
            }
            Step::Handoff => {
                // With a delegation hook: the hand-off recorded as started, the hook not yet
                // run; and the hook running (a crash kills it with the deployer).
                out.push("handoff:started".into());
                out.push("handoff:hook-running".into());
            }
            Step::DeleteOldLbs => {
                for n in names.lbs {
                    out.push(format!("delete-old-lbs:{n}:before"));
                }
            }
            Step::RenameLbs => {
                for n in names.lbs {
                    out.push(format!("rename-lbs:{n}-next:before"));
                }
            }
            _ => {}
        }
        out.push(format!("{step}:after"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_serde_matches_the_printed_name() {
        for s in ALL {
            assert_eq!(Step::parse(s.name()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.name())
            );
        }
        assert_eq!(Step::parse("nope"), None);
    }

    #[test]
    fn roll_points_are_in_run_order() {
        let lbs = ["lb1".to_string(), "lb2".to_string()];
        let ns = ["ns1".to_string(), "ns2".to_string()];
        let p = crash_points(
            Operation::Roll,
            &PointNames {
                lbs: &lbs,
                nameservers: &ns,
                canary: None,
            },
        );
        assert_eq!(p.len(), 7 * 2 + 4 + 2 + 2);
        assert_eq!(p[0], "create:before");
        let i = p.iter().position(|x| x == "flip:lb2:after-swap").unwrap();
        assert_eq!(p[i + 1], "flip:after");
        assert!(p.contains(&"rename:ns1-next:before".to_string()));
        assert_eq!(p.last().unwrap(), "rename:after");
        // With a canary: its swap, its soak and verdict, then the others.
        let p = crash_points(
            Operation::Roll,
            &PointNames {
                lbs: &lbs,
                nameservers: &ns,
                canary: Some("lb2"),
            },
        );
        let f = p.iter().position(|x| x == "flip:before").unwrap();
        assert_eq!(
            p[f + 1..f + 8],
            [
                "flip:lb2:before-swap",
                "flip:lb2:after-swap",
                "flip:canary:soaking",
                "flip:canary:judged",
                "flip:lb1:before-swap",
                "flip:lb1:after-swap",
                "flip:after"
            ]
        );
    }

    #[test]
    fn up_creates_the_lbs_before_the_checks_and_roll_lb_opens_the_allow_lists_first() {
        let pos = |steps: &[Step], s: Step| steps.iter().position(|x| *x == s).unwrap();
        assert!(pos(&UP_STEPS, Step::CreateLbs) < pos(&UP_STEPS, Step::ProvisionNameservers));
        assert!(pos(&UP_STEPS, Step::ProvisionLbs) < pos(&UP_STEPS, Step::CheckNameservers));
        let r = &ROLL_LB_STEPS;
        assert!(pos(r, Step::CreateLbsNext) < pos(r, Step::AllowLbsNext));
        assert!(pos(r, Step::AllowLbsNext) < pos(r, Step::ProvisionLbsNext));
        assert_eq!(r.last(), Some(&Step::DisallowOldLbs));
        let lbs = ["lb1".to_string()];
        let ns = ["ns1".to_string()];
        let p = crash_points(
            Operation::RollLb,
            &PointNames {
                lbs: &lbs,
                nameservers: &ns,
                canary: None,
            },
        );
        assert_eq!(p[2], "allow-lbs-next:before");
        let h = p.iter().position(|x| x == "handoff:before").unwrap();
        assert_eq!(
            p[h..h + 4],
            [
                "handoff:before",
                "handoff:started",
                "handoff:hook-running",
                "handoff:after"
            ]
        );
        assert_eq!(p.last().unwrap(), "disallow-old-lbs:after");
    }
}
