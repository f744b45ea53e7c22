//! The reference documentation cannot fall behind the code: every key of the config structs
//! in `lb/src/config.rs` is described in `lb.toml(5)` and in the key table of docs/reference.md
//! (and nothing there is a key lb does not have), the renamed keys are listed in both, every
//! command and option of `lb --help` is in `lb(1)` with the exit statuses, signals and
//! environment variables, and both pages render without a warning from groff (and mandoc's
//! linter where it is installed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use lb::config::{LbConfig, RENAMED_KEYS};

fn crate_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    let p = crate_file(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The lines of the `{ ... }` body of `pub struct NAME` in `src`, without comments.
fn struct_body<'a>(src: &'a str, name: &str) -> Vec<&'a str> {
    let head = format!("pub struct {name} {{");
    let mut lines = src.lines().skip_while(|l| l.trim() != head);
    assert!(lines.next().is_some(), "config.rs has no `{head}`");
    lines
        .take_while(|l| l.trim() != "}")
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .collect()
}

/// `(field, type)` of each `pub field: Type,` of a struct, the field under its serde name.
fn struct_fields(src: &str, name: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rename = None;
    for line in struct_body(src, name) {
        if line.starts_with("#[serde(") {
            assert!(
                !line.contains("flatten") && !line.contains("alias"),
                "{name}: this test cannot read `{line}`; teach it"
            );
            if let Some(i) = line.find("rename = \"") {
                let rest = &line[i + "rename = \"".len()..];
                rename = rest.split('"').next().map(str::to_string);
            }
            continue;
        }
        let Some(field) = line.strip_prefix("pub ") else {
            continue;
        };
        let (field, ty) = field.split_once(':').expect("pub field: Type");
        let field = rename.take().unwrap_or_else(|| field.trim().to_string());
        out.push((field, ty.trim().trim_end_matches(',').to_string()));
    }
    assert!(!out.is_empty(), "no fields read from {name}");
    out
}

/// Every key lb reads, `section.key`, from the serde structs in `config.rs`: the sections are
/// the fields of `LbConfig`, their keys the fields of each section's struct.
fn config_keys() -> BTreeSet<String> {
    let src = read("src/config.rs");
    let mut keys = BTreeSet::new();
    for (section, ty) in struct_fields(&src, "LbConfig") {
        for (key, _) in struct_fields(&src, &ty) {
            keys.insert(format!("{section}.{key}"));
        }
    }
    // The reading above is checked against serde itself: every key a full config serializes
    // (all but the unset optional ones) is among them.
    let example = LbConfig::read(&crate_file("examples/lb.toml")).unwrap();
    let full = toml::Table::try_from(&example).unwrap();
    for (section, table) in &full {
        for key in table.as_table().expect("a section").keys() {
            let k = format!("{section}.{key}");
            assert!(
                keys.contains(&k),
                "{k} is a key but was not read from config.rs"
            );
        }
    }
    assert!(keys.len() > 60, "only {} keys read: {keys:?}", keys.len());
    keys
}

/// roff text as printed: `\-` is `-`, `\(dq` a double quote, font changes dropped.
fn unroff(s: &str) -> String {
    let mut s = s.replace("\\-", "-").replace("\\(dq", "\"");
    for f in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        s = s.replace(f, "");
    }
    s
}

/// The keys `lb.toml(5)` describes: the `.B key` tag of each `.TP` paragraph.
fn man_keys(man: &str) -> BTreeSet<String> {
    let lines: Vec<&str> = man.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0].starts_with(".TP"))
        .filter_map(|w| w[1].strip_prefix(".B "))
        .map(|k| unroff(k.trim()))
        .filter(|k| !k.starts_with('/'))
        .collect()
}

/// The section of `text` from the line `start` to the next line starting with `end_prefix`.
fn section<'a>(text: &'a str, start: &str, end_prefix: &str) -> &'a str {
    let i = text
        .find(start)
        .unwrap_or_else(|| panic!("no `{start}` found"));
    let rest = &text[i + start.len()..];
    let end = rest
        .match_indices('\n')
        .map(|(j, _)| j + 1)
        .find(|&j| rest[j..].starts_with(end_prefix))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The tables of a Markdown text, by their header row: for each, the first two cells of every
/// row.
fn markdown_tables(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut tables = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let Some(row) = line.strip_prefix('|') else {
            current = None;
            continue;
        };
        let cells: Vec<String> = row.split('|').map(|c| c.trim().to_string()).collect();
        match &current {
            None => {
                let header = cells.join("|");
                tables.insert(header.clone(), Vec::new());
                current = Some(header);
            }
            Some(_) if cells[0].starts_with("---") => {}
            Some(h) => {
                let second = cells.get(1).cloned().unwrap_or_default();
                tables.get_mut(h).unwrap().push((cells[0].clone(), second));
            }
        }
    }
    tables
}

/// The keys a cell names: each backquoted name; one without a section (`timeout_ms` after
/// `health.interval_ms`) is in the section of the name before it.
fn cell_keys(cell: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = String::new();
    for (i, name) in cell.split('`').enumerate() {
        if i % 2 == 0 || name.is_empty() {
            continue;
        }
        match name.split_once('.') {
            Some((s, _)) => {
                section = s.to_string();
                out.push(name.to_string());
            }
            None => {
                assert!(!section.is_empty(), "`{name}` has no section in `{cell}`");
                out.push(format!("{section}.{name}"));
            }
        }
    }
    out
}

/// The `lb.toml` section of docs/reference.md, up to the next `## ` heading.
fn reference_lb_toml() -> String {
    let reference = read("../docs/reference.md");
    section(&reference, "\n## Configuration file `lb.toml`\n", "## ").to_string()
}

fn differences(what: &str, documented: &BTreeSet<String>, keys: &BTreeSet<String>) {
    let missing: Vec<&String> = keys.difference(documented).collect();
    let unknown: Vec<&String> = documented.difference(keys).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{what}: keys not described: {missing:?}; described but not keys of lb: {unknown:?}"
    );
}

#[test]
fn the_man_page_describes_every_key_and_no_other() {
    let man = read("dist/lb.toml.5");
    differences("lb/dist/lb.toml.5", &man_keys(&man), &config_keys());
}

#[test]
fn the_reference_table_lists_every_key_and_no_other() {
    let tables = markdown_tables(&reference_lb_toml());
    let rows = tables
        .get("key|default|meaning|")
        .expect("docs/reference.md, lb.toml: a `| key | default | meaning |` table");
    let documented: BTreeSet<String> = rows.iter().flat_map(|(k, _)| cell_keys(k)).collect();
    differences(
        "docs/reference.md lb.toml table",
        &documented,
        &config_keys(),
    );
}

#[test]
fn renamed_keys_are_listed_in_the_man_page_and_the_reference() {
    let keys = config_keys();
    let man = read("dist/lb.toml.5");
    let renamed = section(&man, ".SH \"RENAMED KEYS\"", ".SH ");
    let tables = markdown_tables(&reference_lb_toml());
    let reference_rows = tables
        .get("old name|new name|")
        .expect("docs/reference.md, lb.toml: a `| old name | new name |` table");
    let reference: BTreeSet<(String, String)> = reference_rows
        .iter()
        .map(|(old, new)| (old.trim_matches('`').into(), new.trim_matches('`').into()))
        .collect();
    let mut expected = BTreeSet::new();
    for &(section, old, new) in RENAMED_KEYS {
        let (old, new) = (format!("{section}.{old}"), format!("{section}.{new}"));
        assert!(keys.contains(&new), "{new} is not a key");
        assert!(!keys.contains(&old), "{old} is still a key");
        let line = renamed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&old))
            .unwrap_or_else(|| panic!("lb.toml.5 RENAMED KEYS lacks {old}"));
        assert_eq!(line.split_whitespace().nth(1), Some(new.as_str()), "{line}");
        expected.insert((old, new));
    }
    assert_eq!(reference, expected, "docs/reference.md renamed keys table");
}

/// The example of `lb.toml(5)` is a valid configuration.
#[test]
fn the_man_page_example_is_valid() {
    let man = read("dist/lb.toml.5");
    let examples = section(&man, ".SH EXAMPLES", ".SH ");
    let text = section(examples, ".nf\n", ".fi");
    LbConfig::parse(&unroff(text), Path::new("lb.toml.5 EXAMPLES")).unwrap();
}

/// `lb HELP-ARGS --help`.
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "lb {args:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands and long options of one `--help` text.
fn commands_and_options(help: &str) -> (Vec<String>, Vec<String>) {
    let mut commands = Vec::new();
    let mut options = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_commands = line == "Commands:";
            continue;
        }
        if in_commands {
            if let Some(name) = line.split_whitespace().next() {
                if name != "help" {
                    commands.push(name.to_string());
                }
            }
        }
        for word in line.split(|c: char| c.is_whitespace() || c == ',' || c == '[') {
            let word = word.trim_end_matches(|c: char| !c.is_alphanumeric());
            if word.starts_with("--") && word.len() > 2 && !options.contains(&word.to_string()) {
                options.push(word.to_string());
            }
        }
    }
    (commands, options)
}

#[test]
fn the_lb_man_page_lists_every_command_option_exit_status_signal_and_variable() {
    let man = read("dist/lb.1");
    let text = unroff(&man);
    let mut missing = Vec::new();
    let mut pending = vec![Vec::<String>::new()];
    while let Some(path) = pending.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let (commands, options) = commands_and_options(&help(&args));
        for o in options {
            if !text.contains(&o) {
                missing.push(format!("lb {} {o}", path.join(" ")));
            }
        }
        for c in commands {
            let mut sub = path.clone();
            sub.push(c);
            // `ctl status` is written so in lb.1; `run` and `ctl` are .TP tags of their own.
            let name = sub.join(" ");
            let tagged = man
                .lines()
                .any(|l| unroff(l).trim_start_matches(".B ").starts_with(&name));
            let also = sub.len() == 2 && text.contains(&format!("ctl {}", sub[1]));
            if !tagged && !also {
                missing.push(format!("command `lb {name}`"));
            }
            pending.push(sub);
        }
    }
    let exit = section(&man, ".SH EXIT STATUS", ".SH ");
    for code in [
        lb::ctl::EXIT_REFUSED,
        lb::ctl::EXIT_UNREACHABLE,
        lb::ctl::EXIT_RESTART_NEEDED,
    ] {
        if !exit.lines().any(|l| l == code.to_string()) {
            missing.push(format!("lb ctl exit status {code}"));
        }
    }
    let signals = section(&man, ".SH SIGNALS", ".SH ");
    for s in ["SIGTERM", "SIGINT", "SIGHUP", "SIGUSR2"] {
        if !signals.contains(s) {
            missing.push(format!("signal {s}"));
        }
    }
    let env = section(&man, ".SH ENVIRONMENT", ".SH ");
    for v in [
        "RUST_LOG",
        "JOURNAL_STREAM",
        "LISTEN_FDS",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
        lb::controlplane::upgrade::ENV_UPGRADE_FD,
    ] {
        if !env.contains(v) {
            missing.push(format!("environment variable {v}"));
        }
    }
    assert!(missing.is_empty(), "lb/dist/lb.1 lacks: {missing:?}");
}

/// Runs a checker on a page: it must succeed and print nothing on stderr.
fn quiet(cmd: &str, args: &[&str], page: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .arg(page)
        .output()
        .unwrap_or_else(|e| {
            panic!("{cmd}: {e} (apt-get install groff-base; scripts/install-deps.sh does)")
        });
    let err = String::from_utf8_lossy(&out.stderr);
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "{cmd} {args:?} {}: {}\n{err}{msg}",
        page.display(),
        out.status
    );
}

#[test]
fn both_man_pages_render_without_warnings() {
    let mandoc = Command::new("mandoc").arg("-V").output().is_ok();
    for page in ["dist/lb.1", "dist/lb.toml.5"] {
        let page = crate_file(page);
        // What man(1) runs, every warning category on, output discarded.
        quiet("groff", &["-man", "-Tutf8", "-ww", "-z"], &page);
        if mandoc {
            // mandoc's linter, from warnings up (its style notes depend on the manual pages
            // installed on the machine, for SEE ALSO).
            let out = Command::new("mandoc")
                .args(["-T", "lint", "-W", "warning"])
                .arg(&page)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && text.trim().is_empty(),
                "mandoc -T lint {}:\n{text}",
                page.display()
            );
        }
    }
}
