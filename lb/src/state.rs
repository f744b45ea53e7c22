//! The runtime backend set persisted across restarts.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory) after every swap,
//! drain and reload, and loaded on start in preference to the config's list, so a restart or
//! reboot never reverts a deploy. The config list it was derived from is stored too: if the
//! operator edited `backends.servers` since, the edit wins.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::BackendAddr;

const STATE_VERSION: u32 = 1;

/// The persisted state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeState {
    pub version: u32,
    pub generation: u64,
    pub backends: Vec<BackendAddr>,
    #[serde(default)]
    pub drained: Vec<BackendAddr>,
    /// `backends.servers` of the config in force when this was written.
    pub config_servers: Vec<BackendAddr>,
}

impl RuntimeState {
    pub fn new(
        generation: u64,
        backends: Vec<BackendAddr>,
        drained: Vec<BackendAddr>,
        config_servers: Vec<BackendAddr>,
    ) -> Self {
        RuntimeState {
            version: STATE_VERSION,
            generation,
            backends,
            drained,
            config_servers,
        }
    }
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory. A
/// crash leaves either the old file or the new one, never a torn one. Creates the directory
/// when missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(parent_dir(path))?;
    write_atomic_mode(path, bytes, 0o666)
}

/// [`write_atomic`] into an existing directory, the temporary file (`NAME.tmp.PID.SEQ`)
/// created with `mode` (before the umask): the deployer's private files use 0600.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_dir(path);
    // A name of its own per call: two writers must never share (and tear) one temporary file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{seq}", std::process::id()));
    let tmp = dir.join(name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes the state atomically.
pub fn save(path: &Path, state: &RuntimeState) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(state).expect("state always serialises");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads the state: `Ok(None)` if there is no file, `Err` with the reason if it is unusable.
pub fn load(path: &Path) -> Result<Option<RuntimeState>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read state file {}: {e}", path.display())),
    };
    let st: RuntimeState = serde_json::from_str(&text)
        .map_err(|e| format!("state file {} is corrupt: {e}", path.display()))?;
    if st.version != STATE_VERSION {
        return Err(format!(
            "state file {} has version {}, expected {STATE_VERSION}",
            path.display(),
            st.version
        ));
    }
    crate::config::check_backend_list(&st.backends)
        .map_err(|m| format!("state file {}: {m}", path.display()))?;
    Ok(Some(st))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_corruption() {
        let dir = std::env::temp_dir().join(format!("lb-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.json");
        assert_eq!(load(&p), Ok(None));
        let a: BackendAddr = "127.0.0.1:53".parse().unwrap();
        let st = RuntimeState::new(7, vec![a], vec![], vec![a]);
        save(&p, &st).unwrap();
        assert_eq!(load(&p), Ok(Some(st)));
        std::fs::write(&p, "{not json").unwrap();
        assert!(load(&p).unwrap_err().contains("corrupt"));
        std::fs::write(
            &p,
            r#"{"version":1,"generation":1,"backends":[],"config_servers":[]}"#,
        )
        .unwrap();
        assert!(load(&p).unwrap_err().contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
