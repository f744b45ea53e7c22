//! What the parent zone says: roll-lb's check that the delegation of every zone names the new
//! lbs and none of the old, at every server of the parent zone, before anything is drained.
//!
//! A hook that exits 0, or an operator who runs `--resume`, is a claim; the parent's servers
//! are what resolvers ask. Each is asked for the zone's NS without recursion: a referral (NS in
//! the authority section, glue in the additional section). An NS name whose address is not in
//! the additional section is asked of the same parent server (names inside the parent zone,
//! like the rehearsal's `lb1.ns.test.`, are answered authoritatively there), and only then of
//! the system resolver (names in some other zone). The addresses seen are compared as glue is:
//! IP addresses, without ports.
//!
//! Where the parent servers come from: `[roll_lb] parent_servers`, or, unset, the resolver of
//! `/etc/resolv.conf`: the SOA of the zone's parent name gives the parent zone (the closest
//! enclosing zone cut), its NS and their addresses give the servers, port 53. A check that
//! cannot run stops the roll (the message says how to fix it); `check_delegation = false` is
//! the only way to skip it.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::dns;

/// Longest wait for one answer (two UDP tries, or a TCP exchange).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(4);

/// Why the delegation check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    /// The parent servers were asked and still name what they should not (or lack what they
    /// should): one line per server and zone.
    #[error("{}", .0.join("; "))]
    Wrong(Vec<String>),
    /// The check could not run (no parent server found, none answered usefully).
    #[error("{0}")]
    CannotCheck(String),
}

/// One NS name of a delegation and its addresses as found.
#[derive(Debug, Clone, PartialEq)]
pub struct NsTarget {
    pub name: Name,
    pub addrs: Vec<IpAddr>,
}

/// What one parent server says about one zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Delegation {
    pub server: SocketAddr,
    pub zone: String,
    pub ns: Vec<NsTarget>,
    /// The longest TTL of the NS records and of the addresses the parent gave.
    pub ttl: u64,
}

impl Delegation {
    fn addrs(&self) -> BTreeSet<IpAddr> {
        self.ns
            .iter()
            .flat_map(|n| n.addrs.iter().copied())
            .collect()
    }

    /// `lb1.ns.test.=127.0.0.4, lb2.ns.test.=127.0.0.5`.
    pub fn describe(&self) -> String {
        self.ns
            .iter()
            .map(|n| {
                format!(
                    "{}={}",
                    n.name,
                    n.addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The zone's name as an absolute DNS name.
pub fn fqdn(zone: &str) -> Result<Name, String> {
    let z = if zone.ends_with('.') {
        zone.to_string()
    } else {
        format!("{zone}.")
    };
    Name::from_ascii(&z).map_err(|e| format!("zone `{zone}`: {e}"))
}

fn same_name(a: &Name, b: &Name) -> bool {
    a.to_lowercase() == b.to_lowercase()
}

/// Asks `resolvers` in turn (recursion desired) until one answers NOERROR.
fn ask_resolvers(
    resolvers: &[SocketAddr],
    name: &Name,
    rtype: RecordType,
) -> Result<Message, String> {
    let mut errors = Vec::new();
    for r in resolvers {
        match dns::query(*r, name, rtype, true, QUERY_TIMEOUT) {
            Ok(m) if m.metadata.response_code == ResponseCode::NoError => return Ok(m),
            Ok(m) => errors.push(format!("{r}: {}", m.metadata.response_code)),
            Err(e) => errors.push(e),
        }
    }
    Err(format!("{name} {rtype}: {}", errors.join("; ")))
}

/// The addresses of `name` through the resolvers (A and AAAA).
fn resolve(resolvers: &[SocketAddr], name: &Name) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for t in [RecordType::A, RecordType::AAAA] {
        match ask_resolvers(resolvers, name, t) {
            Ok(m) => out.extend(m.answers.iter().filter_map(|r| address(&r.data))),
            Err(e) => errors.push(e),
        }
    }
    if out.is_empty() {
        return Err(if errors.is_empty() {
            format!("{name} has no address")
        } else {
            errors.join("; ")
        });
    }
    Ok(out)
}

fn address(d: &RData) -> Option<IpAddr> {
    match d {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// The servers of the parent zone of `zone`, found through `resolvers`: the SOA of the parent
/// name names the enclosing zone, whose NS are looked up, then their addresses (port 53).
pub fn discover_parent_servers(
    zone: &str,
    resolvers: &[SocketAddr],
) -> Result<Vec<SocketAddr>, String> {
    let name = fqdn(zone)?;
    if name.is_root() {
        return Err("the root zone has no parent".into());
    }
    let parent = name.base_name();
    let m = ask_resolvers(resolvers, &parent, RecordType::SOA)?;
    let apex = m
        .answers
        .iter()
        .chain(m.authorities.iter())
        .find(|r| r.record_type() == RecordType::SOA)
        .map(|r| r.name.clone())
        .ok_or_else(|| {
            format!("the resolver gave no SOA for {parent} (the parent zone of {zone})")
        })?;
    let m = ask_resolvers(resolvers, &apex, RecordType::NS)?;
    let names: Vec<Name> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.clone()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Err(format!(
            "the resolver gave no NS for {apex} (the parent zone of {zone})"
        ));
    }
    let mut servers = Vec::new();
    for n in &names {
        for a in resolve(resolvers, n)? {
            servers.push(SocketAddr::new(a, 53));
        }
    }
    Ok(servers)
}

/// Asks parent `server` for the delegation of `zone` (without recursion) and finds every NS
/// name's addresses: glue, else the parent itself, else `resolvers`.
pub fn ask_parent(
    server: SocketAddr,
    zone: &str,
    resolvers: &dyn Fn() -> Result<Vec<SocketAddr>, String>,
) -> Result<Delegation, String> {
    let name = fqdn(zone)?;
    let m = dns::query(server, &name, RecordType::NS, false, QUERY_TIMEOUT)?;
    if m.metadata.response_code != ResponseCode::NoError {
        return Err(format!(
            "parent {server} answers {} for {zone} NS",
            m.metadata.response_code
        ));
    }
    // A referral has the NS in the authority section; a parent that also serves the zone
    // answers them authoritatively.
    let ns_records: Vec<_> = m
        .answers
        .iter()
        .chain(m.authorities.iter())
        .filter(|r| r.record_type() == RecordType::NS && same_name(&r.name, &name))
        .collect();
    if ns_records.is_empty() {
        return Err(format!(
            "parent {server} gives no NS for {zone} (is it a server of {zone}'s parent zone?)"
        ));
    }
    let mut ttl = ns_records
        .iter()
        .map(|r| u64::from(r.ttl))
        .max()
        .unwrap_or(0);
    let mut ns = Vec::new();
    for r in ns_records {
        let RData::NS(target) = &r.data else { continue };
        let target = target.0.clone();
        if ns.iter().any(|n: &NsTarget| same_name(&n.name, &target)) {
            continue;
        }
        let mut addrs: Vec<IpAddr> = Vec::new();
        for g in m.additionals.iter().filter(|g| same_name(&g.name, &target)) {
            if let Some(a) = address(&g.data) {
                ttl = ttl.max(u64::from(g.ttl));
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            // Not in the additional section: a name in the parent zone itself is answered
            // there authoritatively.
            for t in [RecordType::A, RecordType::AAAA] {
                if let Ok(a) = dns::query(server, &target, t, false, QUERY_TIMEOUT) {
                    if a.metadata.authoritative {
                        for rec in a.answers.iter().filter(|x| same_name(&x.name, &target)) {
                            if let Some(ip) = address(&rec.data) {
                                ttl = ttl.max(u64::from(rec.ttl));
                                addrs.push(ip);
                            }
                        }
                    }
                }
            }
        }
        if addrs.is_empty() {
            // Out of the parent's data: what resolvers would find.
            let rs = resolvers()
                .map_err(|e| format!("the address of {target} (an NS of {zone} at {server}) is neither glue nor in the parent zone, and the resolver cannot be asked: {e}"))?;
            addrs = resolve(&rs, &target).map_err(|e| {
                format!("the address of {target} (an NS of {zone} at {server}): {e}")
            })?;
        }
        addrs.sort();
        addrs.dedup();
        ns.push(NsTarget {
            name: target,
            addrs,
        });
    }
    Ok(Delegation {
        server,
        zone: zone.to_string(),
        ns,
        ttl,
    })
}

/// One lb in the hand-off: its name, old and new address (glue: IPs).
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub lb: String,
    pub old: IpAddr,
    pub new: IpAddr,
}

/// What is wrong with one parent server's delegation: every new address must be named, and
/// no old one (an old address that is also some lb's new one is not "old").
pub fn problems(d: &Delegation, expected: &[Expected]) -> Option<String> {
    let have = d.addrs();
    let news: BTreeSet<IpAddr> = expected.iter().map(|e| e.new).collect();
    let mut wrong = Vec::new();
    for e in expected {
        if !have.contains(&e.new) {
            wrong.push(format!("does not name {} (new {})", e.new, e.lb));
        }
    }
    for e in expected {
        if have.contains(&e.old) && !news.contains(&e.old) {
            let via: Vec<String> =
                d.ns.iter()
                    .filter(|n| n.addrs.contains(&e.old))
                    .map(|n| n.name.to_string())
                    .collect();
            wrong.push(format!(
                "still names {} (old {}) as {}",
                e.old,
                e.lb,
                via.join(", ")
            ));
        }
    }
    (!wrong.is_empty()).then(|| {
        format!(
            "parent {} for {}: {} (it says {})",
            d.server,
            d.zone,
            wrong.join(", "),
            d.describe()
        )
    })
}

/// Asks every parent server of every zone once. `Ok` holds the delegations seen when all are
/// right; `Wrong` lists what is not; `CannotCheck` when a server could not be found or asked.
pub fn check_once(
    zones: &[String],
    parents: Option<&[SocketAddr]>,
    expected: &[Expected],
) -> Result<Vec<Delegation>, DelegationError> {
    let resolvers = || dns::system_resolvers();
    let mut seen = Vec::new();
    let mut wrong = Vec::new();
    let mut cannot = Vec::new();
    for z in zones {
        let servers = match parents {
            Some(p) => p.to_vec(),
            None => {
                let rs = resolvers().map_err(|e| {
                    DelegationError::CannotCheck(format!(
                        "cannot find the parent servers of {z}: {e}"
                    ))
                })?;
                discover_parent_servers(z, &rs).map_err(|e| {
                    DelegationError::CannotCheck(format!(
                        "cannot find the parent servers of {z} through the resolver ({}): {e}",
                        rs.iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
            }
        };
        for s in servers {
            match ask_parent(s, z, &resolvers) {
                Ok(d) => {
                    if let Some(p) = problems(&d, expected) {
                        wrong.push(p);
                    }
                    seen.push(d);
                }
                Err(e) => cannot.push(e),
            }
        }
    }
    if !cannot.is_empty() {
        // A server that does not answer is not a server that agrees.
        return Err(DelegationError::CannotCheck(
            cannot
                .into_iter()
                .chain(wrong)
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    if !wrong.is_empty() {
        return Err(DelegationError::Wrong(wrong));
    }
    Ok(seen)
}

/// Asks until every parent agrees or `wait` passes (a registrar's change takes a while to
/// reach every server), calling `progress` with what is still wrong every `poll`.
pub fn wait_for(
    zones: &[String],
    parents: Option<&[SocketAddr]>,
    expected: &[Expected],
    wait: Duration,
    poll: Duration,
    mut progress: impl FnMut(Duration, &DelegationError),
) -> Result<Vec<Delegation>, DelegationError> {
    let start = Instant::now();
    loop {
        match check_once(zones, parents, expected) {
            Ok(seen) => return Ok(seen),
            Err(e) if start.elapsed() >= wait => return Err(e),
            Err(e) => progress(start.elapsed(), &e),
        }
        std::thread::sleep(
            poll.min(wait.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(50)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deleg(addrs: &[(&str, &[&str])]) -> Delegation {
        Delegation {
            server: "192.0.2.53:53".parse().unwrap(),
            zone: "example.test".into(),
            ns: addrs
                .iter()
                .map(|(n, a)| NsTarget {
                    name: Name::from_ascii(n).unwrap(),
                    addrs: a.iter().map(|x| x.parse().unwrap()).collect(),
                })
                .collect(),
            ttl: 300,
        }
    }

    fn plan() -> Vec<Expected> {
        let e = |lb: &str, o: &str, n: &str| Expected {
            lb: lb.into(),
            old: o.parse().unwrap(),
            new: n.parse().unwrap(),
        };
        vec![
            e("lb1", "10.0.0.1", "10.0.0.3"),
            e("lb2", "10.0.0.2", "10.0.0.4"),
        ]
    }

    #[test]
    fn every_new_address_and_no_old_one() {
        let good = deleg(&[
            ("lb1.ns.test.", &["10.0.0.3"]),
            ("lb2.ns.test.", &["10.0.0.4"]),
        ]);
        assert_eq!(problems(&good, &plan()), None);
        // Another provider's secondary alongside is fine.
        let more = deleg(&[
            ("lb1.ns.test.", &["10.0.0.3"]),
            ("lb2.ns.test.", &["10.0.0.4"]),
            ("ns.other.example.", &["198.51.100.1"]),
        ]);
        assert_eq!(problems(&more, &plan()), None);
        let forgot = deleg(&[
            ("lb1.ns.test.", &["10.0.0.3"]),
            ("lb2.ns.test.", &["10.0.0.2"]),
        ]);
        let p = problems(&forgot, &plan()).unwrap();
        assert!(
            p.contains("parent 192.0.2.53:53 for example.test")
                && p.contains("does not name 10.0.0.4 (new lb2)")
                && p.contains("still names 10.0.0.2 (old lb2) as lb2.ns.test."),
            "{p}"
        );
        // An old address that is also a new one (swapped between lbs) is not stale.
        let swapped = vec![
            Expected {
                lb: "lb1".into(),
                old: "10.0.0.1".parse().unwrap(),
                new: "10.0.0.2".parse().unwrap(),
            },
            Expected {
                lb: "lb2".into(),
                old: "10.0.0.2".parse().unwrap(),
                new: "10.0.0.5".parse().unwrap(),
            },
        ];
        let d = deleg(&[("a.", &["10.0.0.2"]), ("b.", &["10.0.0.5"])]);
        assert_eq!(problems(&d, &swapped), None);
    }

    #[test]
    fn zone_names_become_absolute() {
        assert_eq!(fqdn("example.test").unwrap().to_string(), "example.test.");
        assert_eq!(fqdn("example.test.").unwrap().to_string(), "example.test.");
        assert!(discover_parent_servers(".", &[]).is_err());
    }
}
