//! Content checks: a server must serve exactly what the zone files hold, not just their SOA
//! serial. Every RRset of a zone ([`ZoneContent`], up to `[checks] max_full_records` records;
//! a random sample above that) is asked of the server, one question per RRset over TCP
//! (pipelined on one connection: no truncation, no rate limiting, which lb applies to UDP
//! only), and the answer is compared with the file's as a set of RDATA (canonical form; TTLs
//! are not compared: an lb's cache counts them down). `[[checks.smoke]]` questions are asked
//! too and compared with what the operator expects.
//!
//! A server is asked directly ([`Asker::Direct`]: an lb's public port, or a nameserver that
//! allows the deployer's `[network] check_address`) or from an lb with `lb ctl query`
//! ([`Asker::FromLb`]: nameservers answer lbs only).
//!
//! Before a roll flips anything, [`diff`] compares what the running set serves (read through
//! an lb, which still sends to it) with the new zone files: the changes are printed, and a zone
//! whose content changes while its serial does not is an error ([`ZoneDiff::unbumped`]).
//! Which names to ask comes from the new files and from the zones as recorded at the last
//! successful `up` or `roll` ([`record_deployed`], `STATE_DIR/deployed/ZONE.zone`), so that
//! removed names are found; without a record, removals cannot be listed and the diff says so.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use rand::seq::IndexedRandom;

use crate::config::{ChecksConfig, SmokeCheckConfig};
use crate::lbctl::{CtlError, LbControl};
use crate::zones::{self, canonical_rdata, Answered, RrsetKey, ZoneContent};

/// Most hexadecimal query bytes in one `lb ctl query` request (lb reads requests of up to
/// 64 KiB).
const MAX_REQUEST_HEX: usize = 40_000;
/// Most differences listed in one message (the rest are counted).
const MAX_LISTED: usize = 20;

/// How the server to check is reached.
pub enum Asker<'a> {
    /// The deployer asks it itself.
    Direct(SocketAddr),
    /// `lb ctl query` on lb `lb`, to `backend`.
    FromLb {
        lb: &'a str,
        ctl: &'a LbControl,
        backend: SocketAddr,
    },
}

/// Why a server could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    /// The lb does not know `query` (an lb older than the content checks).
    Unsupported(String),
    Failed(String),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Unsupported(m) | AskError::Failed(m) => f.write_str(m),
        }
    }
}

impl Asker<'_> {
    /// What is asked, for messages.
    pub fn describe(&self) -> String {
        match self {
            Asker::Direct(a) => a.to_string(),
            Asker::FromLb { lb, backend, .. } => format!("{backend} (asked from lb {lb})"),
        }
    }

    /// Sends every question, returns the answers in order. `timeout`: for each answer when
    /// asking directly, for each request to the lb otherwise.
    fn ask(
        &self,
        questions: &[(Name, RecordType)],
        timeout: Duration,
    ) -> Result<Vec<Message>, AskError> {
        let queries: Vec<Vec<u8>> = questions.iter().map(|(n, t)| query(n, *t)).collect();
        let raw: Vec<Vec<u8>> = match self {
            Asker::Direct(addr) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| AskError::Failed(format!("cannot start a runtime: {e}")))?;
                let mut out = Vec::with_capacity(queries.len());
                for chunk in queries.chunks(lb::probe::MAX_ASK) {
                    out.extend(
                        rt.block_on(lb::probe::ask_tcp(*addr, chunk, timeout))
                            .map_err(AskError::Failed)?,
                    );
                }
                out
            }
            Asker::FromLb { lb, ctl, backend } => {
                let mut out = Vec::with_capacity(queries.len());
                let mut chunk: Vec<String> = Vec::new();
                let mut size = 0;
                let send = |chunk: Vec<String>, out: &mut Vec<Vec<u8>>| {
                    let answers = ctl.query(*backend, chunk, timeout).map_err(|e| match e {
                        CtlError::Refused(r) if r.contains("unknown variant") => AskError::Unsupported(format!(
                            "lb {lb} does not know `lb ctl query` (an older lb: upgrade it with `deployer provision-lbs`): {r}"
                        )),
                        e => AskError::Failed(format!("lb {lb}: {e}")),
                    })?;
                    for a in answers {
                        out.push(lb::wire::from_hex(&a).ok_or_else(|| {
                            AskError::Failed(format!(
                                "lb {lb} sent an answer that is not hexadecimal"
                            ))
                        })?);
                    }
                    Ok::<_, AskError>(())
                };
                for q in &queries {
                    let hex = lb::wire::to_hex(q);
                    if size + hex.len() > MAX_REQUEST_HEX && !chunk.is_empty() {
                        send(std::mem::take(&mut chunk), &mut out)?;
                        size = 0;
                    }
                    size += hex.len();
                    chunk.push(hex);
                }
                if !chunk.is_empty() {
                    send(chunk, &mut out)?;
                }
                out
            }
        };
        if raw.len() != questions.len() {
            return Err(AskError::Failed(format!(
                "{} answers to {} questions",
                raw.len(),
                questions.len()
            )));
        }
        raw.iter()
            .map(|m| {
                Message::from_vec(m)
                    .map_err(|e| AskError::Failed(format!("an answer does not parse: {e}")))
            })
            .collect()
    }
}

/// A query for `name`/`rtype`, RD clear, no EDNS (the ID is set by whoever sends it).
fn query(name: &Name, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(name.clone(), rtype));
    m.to_vec().unwrap_or_default()
}

/// What a server answered for one RRset: its RDATA (canonical order), or why there is none
/// worth comparing (a refusal, a server failure).
type Served = Result<Vec<RData>, String>;

/// The RDATA of `key` in `msg`: the answer section's records of the owner and type (the
/// authority section's for a delegation's NS). NXDOMAIN and NODATA are an empty set.
fn served(msg: &Message, key: &RrsetKey, how: Answered) -> Served {
    let rcode = msg.metadata.response_code;
    if rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain {
        return Err(format!("{rcode}"));
    }
    if how == Answered::Authoritative && !msg.metadata.authoritative {
        return Err("not authoritative".into());
    }
    let section = match how {
        Answered::Authoritative => &msg.answers,
        Answered::Referral => &msg.authorities,
    };
    Ok(sorted(
        section
            .iter()
            .filter(|r| r.record_type() == key.1 && r.name.to_lowercase() == key.0)
            .map(|r| r.data.clone())
            .collect(),
    ))
}

fn sorted(mut v: Vec<RData>) -> Vec<RData> {
    v.sort_by_key(canonical_rdata);
    v.dedup_by_key(|r| canonical_rdata(r));
    v
}

fn same(a: &[RData], b: &[RData]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| canonical_rdata(x) == canonical_rdata(y))
}

/// `192.0.2.1, 192.0.2.2`, or `(none)`.
pub fn show(v: &[RData]) -> String {
    if v.is_empty() {
        "(none)".into()
    } else {
        v.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn show_key(key: &RrsetKey) -> String {
    format!("{} {}", key.0, key.1)
}

/// The zones' contents, from their files.
pub fn read_zones(cfg: &crate::config::DeployerConfig) -> Result<Vec<ZoneContent>, String> {
    cfg.zones
        .names
        .iter()
        .map(|z| zones::content(&cfg.zone_file(z), z))
        .collect()
}

/// The RRsets of `zone` a check asks for: all of them up to `max_full_records` records, else
/// `sample_rrsets` at random plus the apex SOA and NS plus `always`.
fn selection(zone: &ZoneContent, checks: &ChecksConfig, always: &[RrsetKey]) -> Vec<RrsetKey> {
    let eligible: Vec<&RrsetKey> = zone
        .rrsets
        .keys()
        .filter(|k| zone.answered_as(k).is_some())
        .collect();
    if zone.records <= checks.max_full_records {
        return eligible.into_iter().cloned().collect();
    }
    let mut picked: BTreeSet<RrsetKey> = eligible
        .choose_multiple(&mut rand::rng(), checks.sample_rrsets)
        .map(|k| (*k).clone())
        .collect();
    for t in [RecordType::SOA, RecordType::NS] {
        picked.insert((zone.origin.clone(), t));
    }
    picked.extend(always.iter().filter(|k| zone.origin.zone_of(&k.0)).cloned());
    picked.into_iter().collect()
}

/// A smoke check, parsed.
struct Smoke {
    name: Name,
    rtype: RecordType,
    expect: Vec<RData>,
    text: String,
}

fn smokes(checks: &ChecksConfig) -> Result<Vec<Smoke>, String> {
    checks
        .smoke
        .iter()
        .map(|c: &SmokeCheckConfig| {
            let mut name = Name::from_ascii(&c.name).map_err(|e| e.to_string())?;
            name.set_fqdn(true);
            let expect = c
                .expect
                .iter()
                .map(|e| zones::parse_rdata(&c.name, &c.rtype, e))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Smoke {
                name: name.to_lowercase(),
                rtype: zones::record_type(&c.rtype)?,
                expect: sorted(expect),
                text: format!("{} {}", c.name, c.rtype),
            })
        })
        .collect()
}

/// Checks that the server behind `asker` serves the zones exactly as `zones` hold them (see
/// the module doc for what is asked), and answers every smoke check as expected. `always`:
/// RRsets asked even in a sampled zone (what the roll changes). Ok: a summary; Err: every
/// difference (the first [`MAX_LISTED`]) with the server named by the caller.
pub fn check_server(
    asker: &Asker,
    zones: &[ZoneContent],
    checks: &ChecksConfig,
    always: &[RrsetKey],
    timeout: Duration,
) -> Result<String, AskError> {
    let mut keys: Vec<(usize, RrsetKey)> = Vec::new();
    let mut sampled = Vec::new();
    for (z, zone) in zones.iter().enumerate() {
        let sel = selection(zone, checks, always);
        if zone.records > checks.max_full_records {
            sampled.push(format!(
                "{} ({} of {} records)",
                zone.zone,
                sel.len(),
                zone.records
            ));
        }
        keys.extend(sel.into_iter().map(|k| (z, k)));
    }
    let smoke = smokes(checks).map_err(AskError::Failed)?;
    let mut questions: Vec<(Name, RecordType)> = keys.iter().map(|(_, k)| k.clone()).collect();
    questions.extend(smoke.iter().map(|s| (s.name.clone(), s.rtype)));
    let answers = asker.ask(&questions, timeout)?;
    let mut wrong = Vec::new();
    for ((z, key), msg) in keys.iter().zip(&answers) {
        let zone = &zones[*z];
        let how = zone.answered_as(key).unwrap_or(Answered::Authoritative);
        let want = &zone.rrsets[key];
        match served(msg, key, how) {
            Ok(got) if same(&got, want) => {}
            Ok(got) => wrong.push(format!(
                "{}: serves {}, the zone file has {}",
                show_key(key),
                show(&got),
                show(want)
            )),
            Err(e) => wrong.push(format!("{}: answered {e}", show_key(key))),
        }
    }
    for (s, msg) in smoke.iter().zip(&answers[keys.len()..]) {
        let rcode = msg.metadata.response_code;
        let got = sorted(
            msg.answers
                .iter()
                .filter(|r| r.record_type() == s.rtype)
                .map(|r| r.data.clone())
                .collect(),
        );
        if rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain {
            wrong.push(format!("smoke check {}: answered {rcode}", s.text));
        } else if !same(&got, &s.expect) {
            wrong.push(format!(
                "smoke check {}: answered {}, expected {}",
                s.text,
                show(&got),
                show(&s.expect)
            ));
        }
    }
    if !wrong.is_empty() {
        let more = wrong.len().saturating_sub(MAX_LISTED);
        wrong.truncate(MAX_LISTED);
        return Err(AskError::Failed(format!(
            "content differs from the zone files in {} place(s): {}{}",
            wrong.len() + more,
            wrong.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        )));
    }
    Ok(format!(
        "content: {} RRsets{}{}",
        keys.len(),
        if sampled.is_empty() {
            String::new()
        } else {
            format!(" (sampled: {})", sampled.join(", "))
        },
        if smoke.is_empty() {
            String::new()
        } else {
            format!(", {} smoke checks", smoke.len())
        }
    ))
}

/// What changes in one zone between the running set and the new files.
#[derive(Debug, Clone, Default)]
pub struct ZoneDiff {
    pub zone: String,
    /// The serial the running set serves (`None`: it does not serve the zone).
    pub old_serial: Option<u32>,
    pub new_serial: u32,
    pub added: Vec<(RrsetKey, Vec<RData>)>,
    pub removed: Vec<(RrsetKey, Vec<RData>)>,
    pub changed: Vec<(RrsetKey, Vec<RData>, Vec<RData>)>,
    /// No record of the deployed zone: names only the old set has were not asked for.
    pub removals_unknown: bool,
    /// The zone is sampled (above `max_full_records`): changes outside the sample and the
    /// recorded differences may be missed.
    pub sampled: bool,
}

impl ZoneDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// The content changes but the serial does not: secondaries (which transfer by serial)
    /// would never pick the change up, and lb's cache, which follows serials, would keep
    /// serving old answers.
    pub fn unbumped(&self) -> bool {
        !self.is_empty() && self.old_serial == Some(self.new_serial)
    }

    /// The printed diff, one line per change (the SOA's own change, the serial, is in the
    /// header).
    pub fn lines(&self) -> Vec<String> {
        let serial = match self.old_serial {
            Some(s) => format!("serial {s} -> {}", self.new_serial),
            None => format!("new zone, serial {}", self.new_serial),
        };
        let mut out = vec![format!(
            "zone {}: {serial}: {} added, {} removed, {} changed{}{}",
            self.zone,
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            if self.removals_unknown {
                " (no record of the deployed zone on this host: removed names are not listed)"
            } else {
                ""
            },
            if self.sampled { " (sampled zone)" } else { "" }
        )];
        for (k, v) in &self.added {
            out.push(format!("  + {} {}", show_key(k), show(v)));
        }
        for (k, v) in &self.removed {
            out.push(format!("  - {} {}", show_key(k), show(v)));
        }
        for (k, old, new) in &self.changed {
            out.push(format!(
                "  ~ {} {} -> {}",
                show_key(k),
                show(old),
                show(new)
            ));
        }
        out
    }
}

/// RRsets whose content differs between two versions of a zone.
pub fn changed_keys(old: &ZoneContent, new: &ZoneContent) -> Vec<RrsetKey> {
    let keys: BTreeSet<&RrsetKey> = old.rrsets.keys().chain(new.rrsets.keys()).collect();
    keys.into_iter()
        .filter(|k| match (old.rrsets.get(*k), new.rrsets.get(*k)) {
            (Some(a), Some(b)) => !same(a, b),
            _ => true,
        })
        .cloned()
        .collect()
}

/// Compares what the running set serves (through `asker`, an lb still sending to it) with
/// the new zones, asking for the RRsets of the new files and of `recorded` (the zones as last
/// deployed, when known).
pub fn diff(
    asker: &Asker,
    new: &[ZoneContent],
    recorded: &[Option<ZoneContent>],
    checks: &ChecksConfig,
    timeout: Duration,
) -> Result<Vec<ZoneDiff>, AskError> {
    let mut asked: Vec<(usize, RrsetKey, Answered)> = Vec::new();
    for (z, zone) in new.iter().enumerate() {
        let rec = recorded.get(z).and_then(Option::as_ref);
        let changed = rec.map(|r| changed_keys(r, zone)).unwrap_or_default();
        let mut keys: BTreeSet<RrsetKey> = selection(zone, checks, &changed).into_iter().collect();
        keys.insert((zone.origin.clone(), RecordType::SOA));
        if let Some(r) = rec {
            if zone.records <= checks.max_full_records {
                keys.extend(r.rrsets.keys().cloned());
            } else {
                keys.extend(changed);
            }
        }
        for k in keys {
            let how = zone
                .answered_as(&k)
                .or_else(|| rec.and_then(|r| r.answered_as(&k)));
            if let Some(how) = how {
                asked.push((z, k, how));
            }
        }
    }
    let questions: Vec<(Name, RecordType)> = asked.iter().map(|(_, k, _)| k.clone()).collect();
    let answers = asker.ask(&questions, timeout)?;
    let mut diffs: Vec<ZoneDiff> = new
        .iter()
        .enumerate()
        .map(|(z, zone)| ZoneDiff {
            zone: zone.zone.clone(),
            new_serial: zone.serial,
            removals_unknown: recorded.get(z).is_none_or(Option::is_none),
            sampled: zone.records > checks.max_full_records,
            ..ZoneDiff::default()
        })
        .collect();
    let mut refused: BTreeMap<usize, bool> = BTreeMap::new();
    for ((z, key, how), msg) in asked.iter().zip(&answers) {
        let zone = &new[*z];
        let d = &mut diffs[*z];
        let old = match served(msg, key, *how) {
            Ok(v) => v,
            // The running set does not serve the zone (a zone being added): all is new.
            Err(_) if msg.metadata.response_code == ResponseCode::Refused => {
                refused.insert(*z, true);
                Vec::new()
            }
            Err(e) => {
                return Err(AskError::Failed(format!(
                    "{}: the running set answered {e}",
                    show_key(key)
                )))
            }
        };
        if key.1 == RecordType::SOA && key.0 == zone.origin {
            d.old_serial = old.iter().find_map(|r| match r {
                RData::SOA(s) => Some(s.serial),
                _ => None,
            });
            // The serial is the header's; the rest of the SOA is compared below.
        }
        let new_v = zone.rrsets.get(key).cloned().unwrap_or_default();
        let soa_rest = |v: &[RData]| -> Vec<RData> {
            v.iter()
                .map(|r| match r {
                    RData::SOA(s) => {
                        let mut s = s.clone();
                        s.serial = 0;
                        RData::SOA(s)
                    }
                    r => r.clone(),
                })
                .collect()
        };
        if same(&soa_rest(&old), &soa_rest(&new_v)) {
            continue;
        }
        match (old.is_empty(), new_v.is_empty()) {
            (true, _) => d.added.push((key.clone(), new_v)),
            (false, true) => d.removed.push((key.clone(), old)),
            (false, false) => d.changed.push((key.clone(), old, new_v)),
        }
    }
    for (z, _) in refused {
        if diffs[z].old_serial.is_none() {
            diffs[z].removals_unknown = false;
        }
    }
    Ok(diffs)
}

/// Where the zones as last deployed are recorded.
fn recorded_path(state_dir: &Path, zone: &str) -> PathBuf {
    state_dir
        .join("deployed")
        .join(format!("{}.zone", zone.trim_end_matches('.')))
}

/// Records `zones` as deployed (after a successful `up` or `roll`), 0600: one file per zone,
/// a line per record, `NAME TYPE RDATA` with the RDATA in canonical wire form (hexadecimal),
/// which reads back exactly.
pub fn record_deployed(state_dir: &Path, zones: &[ZoneContent]) -> std::io::Result<()> {
    let dir = state_dir.join("deployed");
    crate::private::create_dir(&dir)?;
    for z in zones {
        let mut text = format!(
            "; {} as deployed by the last successful `deployer up` or `roll` (what the next roll's diff asks for): NAME TYPE RDATA (canonical wire form)\n",
            z.zone
        );
        for ((name, rtype), rdata) in &z.rrsets {
            for r in rdata {
                text.push_str(&format!(
                    "{name} {} {}\n",
                    u16::from(*rtype),
                    lb::wire::to_hex(&canonical_rdata(r))
                ));
            }
        }
        crate::private::write_atomic(&recorded_path(state_dir, &z.zone), text.as_bytes())?;
    }
    Ok(())
}

/// The zone as recorded at the last successful `up` or `roll`, if this host has it (and it
/// can be read).
pub fn recorded(state_dir: &Path, zone: &str) -> Option<ZoneContent> {
    use hickory_proto::serialize::binary::{BinDecoder, Restrict};
    let text = std::fs::read_to_string(recorded_path(state_dir, zone)).ok()?;
    let mut origin = Name::from_ascii(zone).ok()?.to_lowercase();
    origin.set_fqdn(true);
    let mut rrsets: BTreeMap<RrsetKey, Vec<RData>> = BTreeMap::new();
    let mut records = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
    {
        let mut w = line.split_whitespace();
        let (name, rtype, hex) = (w.next()?, w.next()?, w.next()?);
        let name = Name::from_ascii(name).ok()?;
        let rtype = RecordType::from(rtype.parse::<u16>().ok()?);
        let bytes = lb::wire::from_hex(hex)?;
        let len = u16::try_from(bytes.len()).ok()?;
        let rdata = RData::read(&mut BinDecoder::new(&bytes), rtype, Restrict::new(len)).ok()?;
        rrsets.entry((name, rtype)).or_default().push(rdata);
        records += 1;
    }
    ZoneContent::new(zone, origin, rrsets, records).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(text: &str) -> ZoneContent {
        let d = std::env::temp_dir().join(format!(
            "dcontent-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("z");
        std::fs::write(&p, text).unwrap();
        let z = zones::content(&p, "example.test").unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        z
    }

    const BASE: &str = "$TTL 300\n@ IN SOA ns1 host. 7 1 2 3 4\n@ IN NS ns1\nns1 IN A 192.0.2.1\nwww IN A 192.0.2.2\nwww IN A 192.0.2.3\nsub IN NS ns.sub\nns.sub IN A 192.0.2.9\n";

    #[test]
    fn zones_are_read_as_rrsets_with_delegations_apart() {
        let z = zone(BASE);
        assert_eq!(z.serial, 7);
        assert_eq!(z.records, 7);
        let www = (
            Name::from_ascii("www.example.test.").unwrap(),
            RecordType::A,
        );
        assert_eq!(z.rrsets[&www].len(), 2);
        let sub = Name::from_ascii("sub.example.test.").unwrap();
        assert_eq!(z.cuts, vec![sub.clone()]);
        assert_eq!(
            z.answered_as(&(sub, RecordType::NS)),
            Some(Answered::Referral)
        );
        let glue = (
            Name::from_ascii("ns.sub.example.test.").unwrap(),
            RecordType::A,
        );
        assert_eq!(z.answered_as(&glue), None, "glue is not compared");
        assert_eq!(z.answered_as(&www), Some(Answered::Authoritative));
        // Sampling: a zone over the limit is asked a sample plus its apex.
        let checks = ChecksConfig {
            max_full_records: 3,
            sample_rrsets: 1,
            smoke: vec![],
        };
        let sel = selection(&z, &checks, &[]);
        assert!(
            sel.contains(&(z.origin.clone(), RecordType::SOA)),
            "{sel:?}"
        );
        assert!(sel.len() <= 3, "{sel:?}");
        let sel = selection(&z, &ChecksConfig::default(), &[]);
        assert_eq!(sel.len(), 5, "every RRset but the glue: {sel:?}");
    }

    #[test]
    fn changes_are_found_as_sets_of_rdata() {
        let old = zone(BASE);
        let new = zone(&BASE.replace(
            "www IN A 192.0.2.3",
            "www IN A 192.0.2.4\nmail IN MX 10 www",
        ));
        let keys = changed_keys(&old, &new);
        let names: Vec<String> = keys.iter().map(show_key).collect();
        assert_eq!(names, vec!["mail.example.test. MX", "www.example.test. A"]);
        assert!(changed_keys(&old, &zone(BASE)).is_empty());
        // Order and name case do not matter.
        let shuffled = zone(
            &BASE
                .replace(
                    "ns1 IN A 192.0.2.1\nwww IN A 192.0.2.2\nwww IN A 192.0.2.3",
                    "www IN A 192.0.2.3\nWWW IN A 192.0.2.2\nns1 IN A 192.0.2.1",
                )
                .replace("@ IN NS ns1", "@ IN NS NS1"),
        );
        assert!(changed_keys(&old, &shuffled).is_empty());
        let d = ZoneDiff {
            zone: "example.test".into(),
            old_serial: Some(7),
            new_serial: 7,
            changed: vec![(keys[1].clone(), vec![], vec![])],
            ..ZoneDiff::default()
        };
        assert!(d.unbumped());
        assert!(d.lines()[0].contains("serial 7 -> 7"), "{:?}", d.lines());
    }

    #[test]
    fn recorded_zones_read_back_the_same() {
        let dir = std::env::temp_dir().join(format!("dcontent-rec-{}", std::process::id()));
        let z = zone(&format!("{BASE}txt IN TXT \"a b\" \"c;d\"\n"));
        record_deployed(&dir, std::slice::from_ref(&z)).unwrap();
        let back = recorded(&dir, "example.test").expect("recorded");
        assert!(
            changed_keys(&z, &back).is_empty(),
            "{:?}",
            changed_keys(&z, &back)
        );
        assert_eq!((back.serial, back.records, back.cuts.len()), (7, 8, 1));
        assert!(recorded(&dir, "other.test").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
