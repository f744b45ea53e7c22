//! Facts the deployer needs from zone files (the SOA serial, the longest TTL of the delegation
//! records, the whole content RRset by RRset for the content checks), read with hickory-proto's zone-file parser so that `$ORIGIN`, `$INCLUDE`, `$TTL`,
//! multi-line records and relative names mean what they mean to BIND.
//!
//! Limits of that parser, refused with a clear message rather than misread: `$GENERATE` (a BIND
//! extension: expand it first with `named-compilezone -D -o - ZONE FILE`), and `$INCLUDE` with
//! an origin argument. A relative `$INCLUDE` is read relative to the including file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hickory_proto::rr::{Name, RData, RecordSet, RecordType, RrKey};

use hickory_proto::serialize::txt::Parser;

/// Most nested `$INCLUDE`s followed when looking for `$GENERATE`.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Parses the zone file of `zone`; the error names the file.
fn parse(path: &Path, zone: &str) -> Result<BTreeMap<RrKey, RecordSet>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read zone file {}: {e}", path.display()))?;
    refuse_generate(path, &text, 0)?;
    let origin = Name::from_ascii(zone)
        .map_err(|e| format!("zone file {}: zone name `{zone}`: {e}", path.display()))?;
    let (_, records) = Parser::new(text, Some(path.to_path_buf()), Some(origin))
        .parse()
        .map_err(|e| format!("zone file {}: {e}", path.display()))?;
    Ok(records)
}

/// Refuses a file (or a file it includes) that uses `$GENERATE`, which the parser lacks.
fn refuse_generate(path: &Path, text: &str, depth: usize) -> Result<(), String> {
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split(';').next().unwrap_or("").split_whitespace();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("$GENERATE") => {
                return Err(format!(
                    "zone file {} line {}: $GENERATE is not supported here; expand it first (e.g. `named-compilezone -D -o - ZONE {}`) and deploy the expanded file",
                    path.display(),
                    n + 1,
                    path.display()
                ))
            }
            Some("$INCLUDE") if depth < MAX_INCLUDE_DEPTH => {
                let Some(file) = words.next() else { continue };
                let file = file.trim_matches('"');
                let inc: PathBuf = if Path::new(file).is_absolute() {
                    file.into()
                } else {
                    path.parent().unwrap_or(Path::new(".")).join(file)
                };
                // An unreadable include is reported by the parser, with its own message.
                if let Ok(t) = std::fs::read_to_string(&inc) {
                    refuse_generate(&inc, &t, depth + 1)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The SOA serial of zone `zone` in its file.
pub fn soa_serial(path: &Path, zone: &str) -> Result<u32, String> {
    let records = parse(path, zone)?;
    records
        .values()
        .filter(|rs| rs.record_type() == RecordType::SOA)
        .flat_map(|rs| rs.records_without_rrsigs())
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(soa.serial),
            _ => None,
        })
        .ok_or_else(|| format!("zone file {} has no SOA record", path.display()))
}

/// The longest TTL of the delegation records of a zone: its NS records and the A/AAAA (glue)
/// records of their targets inside the zone. Resolvers may cache these that long, so an old
/// load balancer can receive queries for that long after the delegation changed.
pub fn delegation_max_ttl(path: &Path, zone: &str) -> Result<u64, String> {
    let records = parse(path, zone)?;
    let all = || records.values().flat_map(|rs| rs.records_without_rrsigs());
    let targets: Vec<Name> = all()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.to_lowercase()),
            _ => None,
        })
        .collect();
    all()
        .filter(|r| match r.record_type() {
            RecordType::NS => true,
            RecordType::A | RecordType::AAAA => targets.contains(&r.name.to_lowercase()),
            _ => false,
        })
        .map(|r| u64::from(r.ttl))
        .max()
        .ok_or_else(|| format!("zone file {} has no NS record", path.display()))
}

/// Up to `n` (name, type) pairs of the zone that any server for it must answer with data,
/// spread over the zone in its canonical order: the apex's MX/TXT and names' A, AAAA, TXT, MX,
/// CNAME, SRV... Never the SOA or NS (checked elsewhere), wildcards, or names at or below a
/// delegation (those get a referral, not an answer).
pub fn sample_names(path: &Path, zone: &str, n: usize) -> Result<Vec<(Name, RecordType)>, String> {
    let records = parse(path, zone)?;
    let apex = Name::from_ascii(zone)
        .map_err(|e| format!("zone `{zone}`: {e}"))?
        .to_lowercase();
    let cuts: Vec<Name> = records
        .values()
        .filter(|rs| rs.record_type() == RecordType::NS)
        .map(|rs| rs.name().to_lowercase())
        .filter(|name| !name.eq_ignore_root(&apex))
        .collect();
    let skip = [
        RecordType::SOA,
        RecordType::NS,
        RecordType::DS,
        RecordType::RRSIG,
        RecordType::NSEC,
        RecordType::NSEC3,
        RecordType::NSEC3PARAM,
        RecordType::DNSKEY,
    ];
    let all: Vec<(Name, RecordType)> = records
        .values()
        .filter(|rs| !skip.contains(&rs.record_type()))
        .filter(|rs| !rs.name().is_wildcard())
        .filter(|rs| !cuts.iter().any(|c| c.zone_of(&rs.name().to_lowercase())))
        .map(|rs| (rs.name().clone(), rs.record_type()))
        .collect();
    if all.len() <= n {
        return Ok(all);
    }
    // Evenly spaced, so a sample is not just the start of the zone.
    Ok((0..n).map(|k| all[k * all.len() / n].clone()).collect())
}

/// One RRset's key: its owner (lowercase, absolute) and type.
pub type RrsetKey = (Name, RecordType);

/// What a zone file holds, RRset by RRset, as a server loading it would serve it.
#[derive(Debug, Clone)]
pub struct ZoneContent {
    /// The zone's name, as configured.
    pub zone: String,
    pub origin: Name,
    /// The SOA serial.
    pub serial: u32,
    /// Every RRset, its RDATA in canonical order without duplicates. Types a server derives
    /// or signs itself (RRSIG, NSEC, NSEC3) are left out.
    pub rrsets: BTreeMap<RrsetKey, Vec<RData>>,
    /// Records in the file (what `[checks] max_full_records` counts).
    pub records: usize,
    /// Delegation points: owners other than the apex with an NS RRset.
    pub cuts: Vec<Name>,
}

impl ZoneContent {
    /// How a server answers for this RRset: `Authoritative` from the answer section;
    /// `Referral` (the NS RRset of a delegation: in the authority section of a referral);
    /// `None` for data below a delegation (glue and occluded names: not authoritative, not
    /// compared).
    pub fn answered_as(&self, key: &RrsetKey) -> Option<Answered> {
        let (name, rtype) = key;
        let below = |c: &Name| c.zone_of(name) && c != name;
        if self.cuts.iter().any(below) {
            return None;
        }
        if self.cuts.contains(name) {
            return match rtype {
                RecordType::NS => Some(Answered::Referral),
                // Authoritative in the parent side of the cut.
                RecordType::DS => Some(Answered::Authoritative),
                _ => None,
            };
        }
        Some(Answered::Authoritative)
    }
}

/// Where a server puts an RRset of the zone in its answer (see [`ZoneContent::answered_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    Authoritative,
    Referral,
}

/// Reads the whole content of zone `zone` from its file.
pub fn content(path: &Path, zone: &str) -> Result<ZoneContent, String> {
    let records = parse(path, zone)?;
    let origin = Name::from_ascii(zone)
        .map_err(|e| format!("zone file {}: zone name `{zone}`: {e}", path.display()))?
        .to_lowercase();
    let mut origin = origin;
    origin.set_fqdn(true);
    let mut rrsets: BTreeMap<RrsetKey, Vec<RData>> = BTreeMap::new();
    let mut count = 0;
    for rs in records.values() {
        let rtype = rs.record_type();
        if matches!(
            rtype,
            RecordType::RRSIG | RecordType::NSEC | RecordType::NSEC3
        ) {
            continue;
        }
        for r in rs.records_without_rrsigs() {
            count += 1;
            rrsets
                .entry((r.name.to_lowercase(), rtype))
                .or_default()
                .push(r.data.clone());
        }
    }
    ZoneContent::new(zone, origin, rrsets, count)
        .map_err(|e| format!("zone file {}: {e}", path.display()))
}

impl ZoneContent {
    /// A zone's content from its RRsets (sorted and deduplicated here); `records` as counted
    /// in its file. The serial is the apex SOA's.
    pub fn new(
        zone: &str,
        origin: Name,
        mut rrsets: BTreeMap<RrsetKey, Vec<RData>>,
        records: usize,
    ) -> Result<ZoneContent, String> {
        for v in rrsets.values_mut() {
            v.sort_by_key(canonical_rdata);
            v.dedup_by_key(|r| canonical_rdata(r));
        }
        let serial = rrsets
            .get(&(origin.clone(), RecordType::SOA))
            .and_then(|v| {
                v.iter().find_map(|r| match r {
                    RData::SOA(soa) => Some(soa.serial),
                    _ => None,
                })
            })
            .ok_or_else(|| "no SOA record at the zone's apex".to_string())?;
        let cuts = rrsets
            .keys()
            .filter(|(n, t)| *t == RecordType::NS && *n != origin)
            .map(|(n, _)| n.clone())
            .collect();
        Ok(ZoneContent {
            zone: zone.to_string(),
            serial,
            origin,
            rrsets,
            records,
            cuts,
        })
    }
}

/// RDATA in canonical form (RFC 4034 6.2: names in lowercase, uncompressed): two RDATA are the
/// same record exactly when these bytes are equal.
pub fn canonical_rdata(r: &RData) -> Vec<u8> {
    use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
    let mut buf = Vec::new();
    let mut e = BinEncoder::new(&mut buf);
    e.set_canonical_form(true);
    if r.emit(&mut e).is_err() {
        // Not encodable (never for parsed data): compare by the presentation form.
        return r.to_string().into_bytes();
    }
    buf
}

/// Parses the RDATA `text` of a record of type `rtype` at `name` (presentation format, as in
/// a zone file: `192.0.2.1`, `10 mail.example.test.`, `"v=spf1 -all"`); relative names in it
/// are relative to `name`'s parent.
pub fn parse_rdata(name: &str, rtype: &str, text: &str) -> Result<RData, String> {
    let owner = Name::from_ascii(name).map_err(|e| format!("`{name}`: {e}"))?;
    let mut owner = owner;
    owner.set_fqdn(true);
    let line = format!("{owner} 0 IN {rtype} {text}\n");
    let (_, records) = Parser::new(line, None, Some(owner.base_name()))
        .parse()
        .map_err(|e| format!("`{rtype} {text}`: {e}"))?;
    let mut all = records
        .values()
        .flat_map(|rs| rs.records_without_rrsigs())
        .map(|r| r.data.clone());
    match (all.next(), all.next()) {
        (Some(r), None) => Ok(r),
        _ => Err(format!("`{rtype} {text}` is not one record")),
    }
}

/// A record type by its mnemonic (`A`, `AAAA`, `MX`, ...).
pub fn record_type(text: &str) -> Result<RecordType, String> {
    text.to_ascii_uppercase()
        .parse::<RecordType>()
        .map_err(|_| format!("`{text}` is not a record type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dz-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_multiline_soa_and_relative_names() {
        let d = dir("soa");
        let p = d.join("z");
        std::fs::write(
            &p,
            "$TTL 300\n; comment (\n@ IN SOA ns1 host. (\n 2026010203 ; serial\n 1 2 3 4 )\n@ IN NS ns1\n@ IN TXT \"a ; (b\"\nns1 IN A 192.0.2.1\n",
        )
        .unwrap();
        assert_eq!(soa_serial(&p, "example.test"), Ok(2026010203));
        std::fs::write(&p, "@ 300 IN A 1.2.3.4\n").unwrap();
        assert!(soa_serial(&p, "example.test")
            .unwrap_err()
            .contains("no SOA"));
        std::fs::write(
            &p,
            "$TTL 300\n@ IN SOA ns1 host 1 2 3 4 5\n  IN NS ns1\n@ 7200 IN NS ns2.example.test.\nns1 IN A 192.0.2.1\nns2 1d IN A 192.0.2.2\nwww 9w IN A 192.0.2.3\n",
        )
        .unwrap();
        assert_eq!(
            delegation_max_ttl(&p, "example.test"),
            Ok(86_400),
            "glue of ns2 (1d) counts, www does not"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn samples_skip_soa_ns_wildcards_and_delegations() {
        let d = dir("sample");
        let p = d.join("z");
        std::fs::write(
            &p,
            "$TTL 300\n@ IN SOA ns1 host. 1 2 3 4 5\n@ IN NS ns1\n@ IN MX 10 mail\nns1 IN A 192.0.2.1\nmail IN A 192.0.2.2\n*.w IN A 192.0.2.3\nsub IN NS ns.sub\nns.sub IN A 192.0.2.4\n",
        )
        .unwrap();
        let got: Vec<String> = sample_names(&p, "example.test", 10)
            .unwrap()
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect();
        assert_eq!(
            got,
            [
                "example.test. MX",
                "mail.example.test. A",
                "ns1.example.test. A"
            ],
            "{got:?}"
        );
        assert_eq!(sample_names(&p, "example.test", 2).unwrap().len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn origin_include_and_ttl_directives_work_as_in_bind() {
        let d = dir("inc");
        std::fs::write(
            d.join("ns.inc"),
            "$ORIGIN ns.example.test.\nglue 3600 IN A 192.0.2.9\n",
        )
        .unwrap();
        let p = d.join("z");
        std::fs::write(
            &p,
            "$TTL 1h\n@ IN SOA ns1 host. 42 1 2 3 4\n@ IN NS glue.ns\n$INCLUDE ns.inc\n",
        )
        .unwrap();
        assert_eq!(soa_serial(&p, "example.test."), Ok(42));
        assert_eq!(delegation_max_ttl(&p, "example.test"), Ok(3600));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn generate_and_garbage_are_refused_naming_the_file() {
        let d = dir("gen");
        let p = d.join("z");
        std::fs::write(
            &p,
            "@ IN SOA ns1 host. 1 1 2 3 4\n$GENERATE 1-10 host$ A 192.0.2.$\n",
        )
        .unwrap();
        let e = soa_serial(&p, "example.test").unwrap_err();
        assert!(
            e.contains("$GENERATE") && e.contains("named-compilezone"),
            "{e}"
        );
        std::fs::write(&p, "@ IN SOA ns1 host. notanumber 1 2 3 4\n").unwrap();
        let e = soa_serial(&p, "example.test").unwrap_err();
        assert!(e.contains(&p.display().to_string()), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
