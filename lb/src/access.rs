//! Access lists: which clients the proxy serves at all, and who may send zone transfers,
//! UPDATE and NOTIFY through it.
//!
//! Checked before a query is forwarded, on UDP and TCP alike. Transfers, UPDATE and NOTIFY
//! are refused unless the client is listed (secondaries that pull zones through the load
//! balancer's address, by name): the nameservers behind lb see every query from lb's own
//! address, so their own ACLs cannot tell clients apart.

use std::net::IpAddr;

use crate::config::{AccessAction, AccessConfig};
use crate::prefix::{any_contains, Prefix};
pub use crate::stats::Denied;
use crate::wire::{TYPE_AXFR, TYPE_IXFR};

const OPCODE_QUERY: u8 = 0;
const OPCODE_NOTIFY: u8 = 4;
const OPCODE_UPDATE: u8 = 5;

/// What happens to a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Answer REFUSED.
    Refuse(Denied),
    /// Answer nothing.
    Drop(Denied),
}

/// The access lists in force (from `[access]`; part of the snapshot, replaced on reload).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccessPolicy {
    allow: Vec<Prefix>,
    deny: Vec<Prefix>,
    action: AccessAction,
    transfer_allow: Vec<Prefix>,
    update_allow: Vec<Prefix>,
    notify_allow: Vec<Prefix>,
}

impl AccessPolicy {
    pub fn from_config(c: &AccessConfig) -> AccessPolicy {
        AccessPolicy {
            allow: c.allow.clone(),
            deny: c.deny.clone(),
            action: c.action,
            transfer_allow: c.transfer_allow.clone(),
            update_allow: c.update_allow.clone(),
            notify_allow: c.notify_allow.clone(),
        }
    }

    /// Judges a query from `client` with this opcode and first question type (if any).
    #[inline]
    pub fn check(&self, client: IpAddr, opcode: u8, qtype: Option<u16>) -> Verdict {
        let refused_client = any_contains(&self.deny, client)
            || (!self.allow.is_empty() && !any_contains(&self.allow, client));
        if refused_client {
            return match self.action {
                AccessAction::Refuse => Verdict::Refuse(Denied::Client),
                AccessAction::Drop => Verdict::Drop(Denied::Client),
            };
        }
        let (list, denied) = match (opcode, qtype) {
            (OPCODE_QUERY, Some(TYPE_AXFR | TYPE_IXFR)) => (&self.transfer_allow, Denied::Transfer),
            (OPCODE_UPDATE, _) => (&self.update_allow, Denied::Update),
            (OPCODE_NOTIFY, _) => (&self.notify_allow, Denied::Notify),
            _ => return Verdict::Pass,
        };
        if any_contains(list, client) {
            Verdict::Pass
        } else {
            Verdict::Refuse(denied)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(toml: &str) -> AccessPolicy {
        let c: AccessConfig = toml::from_str(toml).unwrap();
        AccessPolicy::from_config(&c)
    }

    #[test]
    fn transfers_update_and_notify_are_refused_unless_listed() {
        let p = AccessPolicy::default();
        assert_eq!(p.check(ip("192.0.2.1"), 0, Some(1)), Verdict::Pass);
        assert_eq!(p.check(ip("192.0.2.1"), 0, None), Verdict::Pass);
        assert_eq!(
            p.check(ip("192.0.2.1"), 0, Some(252)),
            Verdict::Refuse(Denied::Transfer)
        );
        assert_eq!(
            p.check(ip("192.0.2.1"), 0, Some(251)),
            Verdict::Refuse(Denied::Transfer)
        );
        assert_eq!(
            p.check(ip("192.0.2.1"), 5, Some(6)),
            Verdict::Refuse(Denied::Update)
        );
        assert_eq!(
            p.check(ip("192.0.2.1"), 4, Some(6)),
            Verdict::Refuse(Denied::Notify)
        );
        // Other opcodes are the backend's to answer (NOTIMP).
        assert_eq!(p.check(ip("192.0.2.1"), 2, None), Verdict::Pass);
        let p = policy("transfer_allow = [\"198.51.100.0/24\"]\nnotify_allow = [\"::1\"]");
        assert_eq!(p.check(ip("198.51.100.9"), 0, Some(252)), Verdict::Pass);
        assert_eq!(p.check(ip("::1"), 4, None), Verdict::Pass);
    }

    #[test]
    fn allow_and_deny_with_either_action() {
        let p = policy("allow = [\"10.0.0.0/8\"]\ndeny = [\"10.9.0.0/16\"]");
        assert_eq!(p.check(ip("10.1.2.3"), 0, Some(1)), Verdict::Pass);
        assert_eq!(
            p.check(ip("10.9.2.3"), 0, Some(1)),
            Verdict::Refuse(Denied::Client)
        );
        assert_eq!(
            p.check(ip("192.0.2.1"), 0, Some(1)),
            Verdict::Refuse(Denied::Client)
        );
        let p = policy("deny = [\"2001:db8::/32\"]\naction = \"drop\"");
        assert_eq!(
            p.check(ip("2001:db8::1"), 0, Some(1)),
            Verdict::Drop(Denied::Client)
        );
        assert_eq!(p.check(ip("2001:db9::1"), 0, Some(1)), Verdict::Pass);
    }
}
