//! Files that may hold secrets (the run files given to Ansible carry `[ansible] extra_vars`, a
//! TSIG key among them perhaps; the journal names every instance): written 0600, in
//! directories made 0700, whatever the umask.
//!
//! Atomic writes go through a temporary file created 0600 next to the target; a temporary file
//! left by a deployer that died mid-write is removed by the next one once its writer's PID no
//! longer runs ([`remove_stale_temps`]).

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its missing parents) 0700, and makes an existing `dir` 0700.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
}

/// Writes `bytes` to `path`, created (or truncated) 0600.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: make it private too.
    f.set_permissions(Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// Replaces `path` with `bytes` atomically (a 0600 temporary file `NAME.tmp.PID.SEQ`, synced,
/// then renamed over it; the directory is synced after).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    lb::state::write_atomic_mode(path, bytes, 0o600)
}

/// Removes the temporary files of [`write_atomic`] for `target` (`NAME.tmp.PID.SEQ`) whose
/// writer no longer runs: a deployer killed between creating one and renaming it.
pub fn remove_stale_temps(target: &Path) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let prefix = format!("{}.tmp.", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        let running = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !running {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_are_private_whatever_the_umask_and_stale_temps_go() {
        let base = std::env::temp_dir().join(format!("dprivate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, Permissions::from_mode(0o755)).unwrap();
        create_dir(&base.join("a/b")).unwrap();
        assert_eq!(mode(&base.join("a/b")), 0o700);
        create_dir(&base).unwrap();
        assert_eq!(mode(&base), 0o700, "an existing directory is made private");
        let f = base.join("a/b/vars.json");
        std::fs::write(&f, "old").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        write(&f, b"{}").unwrap();
        assert_eq!(mode(&f), 0o600);
        let j = base.join("journal.json");
        write_atomic(&j, b"1").unwrap();
        assert_eq!(mode(&j), 0o600);
        // A dead writer's temporary file goes; a running one's stays.
        let dead = base.join("journal.json.tmp.999999999.0");
        let alive = base.join(format!("journal.json.tmp.{}.77", std::process::id()));
        std::fs::write(&dead, "x").unwrap();
        std::fs::write(&alive, "x").unwrap();
        remove_stale_temps(&j);
        assert!(!dead.exists() && alive.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
