//! The layer check: every `crate::` path in `lb/src` points to a module of a lower layer, and
//! the two planes never import each other. The layers are the table in `lb/src/lib.rs` (the one
//! place they are kept); a module missing from it, an import that points up or sideways, and so
//! any import cycle, fail this test with the file and the path at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads the `| layer | modules |` table from the crate docs in `lib.rs`.
fn layer_table(lib_rs: &str) -> BTreeMap<String, u32> {
    let mut table = BTreeMap::new();
    for line in lib_rs.lines() {
        let Some(row) = line.strip_prefix("//! |") else {
            continue;
        };
        let mut cells = row.split('|').map(str::trim);
        let (Some(rank), Some(mods)) = (cells.next(), cells.next()) else {
            continue;
        };
        let Ok(rank) = rank.parse::<u32>() else {
            continue;
        };
        for m in mods.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            assert!(
                table.insert(m.to_string(), rank).is_none(),
                "lib.rs layer table lists `{m}` twice"
            );
        }
    }
    assert!(!table.is_empty(), "no layer table found in lib.rs");
    table
}

/// `src/dataplane/udp.rs` -> `dataplane::udp`; `src/dataplane/mod.rs` -> `dataplane`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments and without the trailing `#[cfg(test)] mod tests` block (unit
/// tests may reach anywhere below or beside them).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path a file names: `crate::a::b::Item`, `crate::{a, b::c}`, and `super::x`
/// resolved against the file's own module.
fn referenced_paths(module: &str, code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    // The leading `a::b::c` of `s`: identifiers joined by `::`, up to the first other character.
    let ident = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        for part in s.trim_start().split("::") {
            let id: String = part
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let whole = id.len() == part.len();
            if !id.is_empty() {
                out.push(id);
            }
            if !whole || out.is_empty() {
                break;
            }
        }
        out
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                paths.push(ident(item).join("::"));
            }
        } else {
            paths.push(ident(after).join("::"));
        }
        rest = after;
    }
    let parent: Vec<&str> = module.split("::").collect();
    let parent = parent[..parent.len().saturating_sub(1)].join("::");
    let mut rest = code;
    while let Some(i) = rest.find("super::") {
        let after = &rest[i + "super::".len()..];
        let p = ident(after).join("::");
        paths.push(if parent.is_empty() {
            p
        } else {
            format!("{parent}::{p}")
        });
        rest = after;
    }
    paths
}

/// The most specific module of `table` that `path` lies in.
fn resolve<'a>(table: &'a BTreeMap<String, u32>, path: &str) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find_map(|p| table.get_key_value(&p).map(|(k, _)| k.as_str()))
}

fn plane(module: &str) -> Option<&str> {
    ["dataplane", "controlplane"]
        .into_iter()
        .find(|p| module == *p || module.starts_with(&format!("{p}::")))
}

#[test]
fn imports_only_point_down_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = layer_table(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    let mut seen_modules = 0;
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "main" {
            continue;
        }
        let is_dir_root = file.file_name().is_some_and(|f| f == "mod.rs");
        let Some(&rank) = table.get(&module) else {
            if !is_dir_root {
                problems.push(format!(
                    "{}: module `{module}` is not in the layer table of lib.rs",
                    file.display()
                ));
            }
            continue;
        };
        seen_modules += 1;
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for path in referenced_paths(&module, &code) {
            let Some(target) = resolve(&table, &path) else {
                continue;
            };
            if target == module {
                continue;
            }
            let target_rank = table[target];
            if target_rank >= rank {
                problems.push(format!(
                    "{}: `{module}` (layer {rank}) imports `crate::{path}` from `{target}` (layer {target_rank}); imports must point to a lower layer",
                    file.display()
                ));
            }
            if let (Some(a), Some(b)) = (plane(&module), plane(target)) {
                if a != b {
                    problems.push(format!(
                        "{}: `{module}` imports `crate::{path}` across the planes ({a} -> {b})",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(
        seen_modules >= 20,
        "only {seen_modules} modules checked: is the table in lib.rs still read correctly?"
    );
    assert!(
        problems.is_empty(),
        "layer violations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_catches_what_it_should() {
    let table = layer_table(
        "//! | layer | modules |\n//! | --- | --- |\n//! | 0 | wire |\n//! | 1 | backend |\n//! | 2 | dataplane::udp, controlplane::health |\n",
    );
    let refs = referenced_paths(
        "dataplane::udp",
        &code_of("use crate::{wire::header, backend};\n// crate::server in a comment\nuse super::tcp;\n#[cfg(test)]\nmod tests { use crate::server; }"),
    );
    assert_eq!(refs, vec!["wire::header", "backend", "dataplane::tcp"]);
    assert_eq!(resolve(&table, "wire::header"), Some("wire"));
    assert_eq!(
        resolve(&table, "controlplane::health::Checker"),
        Some("controlplane::health")
    );
    assert_eq!(resolve(&table, "server"), None);
    assert_eq!(plane("controlplane::health"), Some("controlplane"));
    assert_eq!(plane("backend"), None);
}
