//! Build script: the git revision for `lb_build_info{revision}` (`LB_BUILD_REVISION` at
//! compile time).
//!
//! `LB_BUILD_REVISION` in the environment wins (packaging from a tarball, or a build that wants
//! a fixed value); otherwise `git describe --always --dirty` run in this directory; otherwise
//! `unknown` (no git, or not a checkout). The script reruns when the variable, `HEAD` or the
//! branch it points to changes, or a file under `src/` does; other edits elsewhere in the
//! checkout do not refresh `-dirty` until then (the revision of a development build is a
//! hint; packages set the variable).

use std::path::{Path, PathBuf};
use std::process::Command;

const ENV: &str = "LB_BUILD_REVISION";

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The files whose change means another commit: `HEAD`, the branch's ref, `packed-refs`.
/// Only existing ones: cargo reruns a script on every build for a missing path.
fn git_files(dir: &Path) -> Vec<PathBuf> {
    let mut names = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        names.push(branch);
    }
    names
        .iter()
        .filter_map(|n| git(dir, &["rev-parse", "--git-path", n]))
        .map(|p| dir.join(p))
        .filter(|p| p.is_file())
        .collect()
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-env-changed={ENV}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src");
    let from_env = std::env::var(ENV).ok().filter(|v| !v.trim().is_empty());
    let revision = match from_env {
        Some(v) => v.trim().to_string(),
        None => {
            for f in git_files(&dir) {
                println!("cargo:rerun-if-changed={}", f.display());
            }
            git(&dir, &["describe", "--always", "--dirty"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env={ENV}={revision}");
}
