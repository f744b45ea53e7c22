//! Reading facts the deployer needs from zone files: the SOA serial and the longest TTL of
//! the delegation records.

use std::path::Path;

/// Strips comments and joins parenthesised multi-line records into one line each.
fn records(text: &str) -> Vec<String> {
    records_keep_owner(text)
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// The SOA serial of a zone file.
pub fn soa_serial(path: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read zone file {}: {e}", path.display()))?;
    for rec in records(&text) {
        let fields: Vec<&str> = rec.split_whitespace().collect();
        if let Some(i) = fields.iter().position(|f| f.eq_ignore_ascii_case("SOA")) {
            // SOA MNAME RNAME SERIAL ...
            let serial = fields
                .get(i + 3)
                .ok_or_else(|| format!("zone file {}: SOA record has no serial", path.display()))?;
            return serial.parse().map_err(|_| {
                format!(
                    "zone file {}: SOA serial `{serial}` is not a number",
                    path.display()
                )
            });
        }
    }
    Err(format!("zone file {} has no SOA record", path.display()))
}

/// Parses a TTL: seconds, or BIND units (`1h30m`, `2d`, `1w`).
fn parse_ttl(s: &str) -> Option<u64> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total += n * match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
    }
    if !num.is_empty() {
        return None;
    }
    Some(total)
}

/// The longest TTL of the delegation records of a zone: its NS records and the A/AAAA (glue)
/// records of their targets inside the zone. Resolvers may cache these that long, so an old
/// load balancer can receive queries for that long after the delegation changed.
pub fn delegation_max_ttl(path: &Path, origin: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read zone file {}: {e}", path.display()))?;
    let origin = format!("{}.", origin.trim_end_matches('.'));
    let mut default_ttl = 86_400u64;
    let mut owner = origin.clone();
    let mut recs: Vec<(String, u64, String, String)> = Vec::new();
    for (starts_blank, rec) in records_keep_owner(&text) {
        let f: Vec<&str> = rec.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        if f[0].eq_ignore_ascii_case("$TTL") {
            default_ttl = f.get(1).and_then(|t| parse_ttl(t)).unwrap_or(default_ttl);
            continue;
        }
        if f[0].starts_with('$') {
            continue;
        }
        let mut i = 0;
        if !starts_blank {
            owner = absolute(f[0], &origin);
            i = 1;
        }
        let mut ttl = default_ttl;
        let mut rtype = None;
        while i < f.len() {
            let t = f[i];
            if let Some(n) = parse_ttl(t).filter(|_| t.as_bytes()[0].is_ascii_digit()) {
                ttl = n;
            } else if t.eq_ignore_ascii_case("IN") || t.eq_ignore_ascii_case("CH") {
            } else {
                rtype = Some(t.to_ascii_uppercase());
                i += 1;
                break;
            }
            i += 1;
        }
        if let Some(rt) = rtype {
            recs.push((
                owner.clone(),
                ttl,
                rt,
                f.get(i).map(|x| absolute(x, &origin)).unwrap_or_default(),
            ));
        }
    }
    let targets: Vec<String> = recs
        .iter()
        .filter(|r| r.2 == "NS")
        .map(|r| r.3.to_ascii_lowercase())
        .collect();
    let max = recs
        .iter()
        .filter(|r| {
            r.2 == "NS"
                || ((r.2 == "A" || r.2 == "AAAA") && targets.contains(&r.0.to_ascii_lowercase()))
        })
        .map(|r| r.1)
        .max();
    max.ok_or_else(|| format!("zone file {} has no NS record", path.display()))
}

fn absolute(name: &str, origin: &str) -> String {
    if name == "@" {
        origin.to_string()
    } else if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.{origin}")
    }
}

/// Like [`records`], with whether each record's first line started blank (owner omitted).
fn records_keep_owner(text: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut blank = false;
    let mut first = true;
    let mut depth = 0i32;
    let mut cur = String::new();
    for raw in text.lines() {
        if first {
            blank = raw.starts_with([' ', '\t']);
        }
        let (line, d) = strip_line(raw);
        depth += d;
        cur.push(' ');
        cur.push_str(&line);
        if depth <= 0 {
            if !cur.trim().is_empty() {
                out.push((blank, cur.clone()));
            }
            cur.clear();
            depth = 0;
            first = true;
        } else {
            first = false;
        }
    }
    out
}

/// Strips a comment and parentheses from one line; returns it and the parenthesis balance.
fn strip_line(raw: &str) -> (String, i32) {
    let mut line = String::new();
    let mut in_quote = false;
    let mut depth = 0;
    for c in raw.chars() {
        match c {
            '"' => {
                in_quote = !in_quote;
                line.push(c);
            }
            ';' if !in_quote => break,
            '(' if !in_quote => {
                depth += 1;
                line.push(' ');
            }
            ')' if !in_quote => {
                depth -= 1;
                line.push(' ');
            }
            _ => line.push(c),
        }
    }
    (line, depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multiline_soa() {
        let dir = std::env::temp_dir().join(format!("dz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("z");
        std::fs::write(
            &p,
            "$TTL 300\n; comment (\n@ IN SOA ns1 host. (\n 2026010203 ; serial\n 1 2 3 4 )\n@ IN TXT \"a ; (b\"\n",
        )
        .unwrap();
        assert_eq!(soa_serial(&p), Ok(2026010203));
        std::fs::write(&p, "@ IN SOA ns1 host 12 1 2 3 4\n").unwrap();
        assert_eq!(soa_serial(&p), Ok(12));
        std::fs::write(&p, "@ IN A 1.2.3.4\n").unwrap();
        assert!(soa_serial(&p).unwrap_err().contains("no SOA"));
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
        assert_eq!(parse_ttl("1h30m"), Some(5400));
        assert_eq!(parse_ttl("x"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
