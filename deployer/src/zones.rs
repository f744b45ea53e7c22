//! Reading facts the deployer needs from zone files: the SOA serial and the longest TTL of
//! the delegation records.

use std::path::Path;

/// Strips comments and joins parenthesised multi-line records into one line each.
fn records(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0i32;
    for raw in text.lines() {
        let mut line = String::new();
        let mut in_quote = false;
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
        cur.push(' ');
        cur.push_str(&line);
        if depth <= 0 {
            if !cur.trim().is_empty() {
                out.push(cur.clone());
            }
            cur.clear();
            depth = 0;
        }
    }
    out
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
