//! Reaching instances over SSH: one [`SshTarget`] per instance (the client, `user@host`, the
//! deployment's known_hosts file, the key), used for `lb ctl` over SSH, for waiting until a new
//! instance accepts SSH, and for forgetting a deleted instance's host key.
//!
//! Host keys are accepted on first use into the per-deployment known_hosts file and checked
//! from then on; checking is never turned off. A deleted instance's entry is removed, so that
//! a new instance given the same address (clouds reuse them) is not refused as an impostor.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How to reach one instance over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The ssh client (`[linode] ssh_command`, default `ssh`).
    pub program: String,
    /// `user@host`.
    pub target: String,
    /// The deployment's known_hosts file.
    pub known_hosts: PathBuf,
    /// The private key to use (the machines provider's); `None`: ssh's own choice (agent,
    /// `~/.ssh`).
    pub identity: Option<PathBuf>,
}

impl SshTarget {
    /// The host part of `user@host`.
    pub fn host(&self) -> &str {
        self.target
            .rsplit_once('@')
            .map_or(self.target.as_str(), |(_, h)| h)
    }

    /// `ssh` with the deployment's options and the target, ready for the remote command's
    /// arguments. Keepalives every 5 s end a dead connection within 10 s.
    pub fn command(&self, connect_timeout: Duration) -> Command {
        let mut ssh = Command::new(&self.program);
        crate::children::restrict_env(&mut ssh, crate::children::ChildEnv::Ssh);
        ssh.args(["-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=accept-new"])
            .arg("-o")
            .arg(format!(
                "ConnectTimeout={}",
                connect_timeout.as_secs().max(1)
            ))
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2"]);
        if let Some(key) = &self.identity {
            ssh.arg("-i").arg(key).args(["-o", "IdentitiesOnly=yes"]);
        }
        ssh.arg(&self.target);
        ssh
    }

    /// Runs `true` on the instance once; Ok when it answered, Err with ssh's complaint.
    pub fn try_once(&self, timeout: Duration) -> Result<(), String> {
        let mut cmd = self.command(timeout);
        cmd.arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = crate::children::spawn(&mut cmd)
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        let stderr = child.child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut e) = stderr {
                use std::io::Read;
                let _ = (&mut e).take(64 * 1024).read_to_string(&mut s);
            }
            s
        });
        let status = child
            .wait_deadline(timeout + Duration::from_secs(2), Duration::from_secs(1))
            .map_err(|e| format!("waiting for {}: {e}", self.program))?;
        drop(child);
        let err = reader.join().unwrap_or_default();
        match status {
            Some(st) if st.success() => Ok(()),
            Some(st) => Err(format!(
                "{} ({st})",
                err.lines().last().unwrap_or("no output").trim()
            )),
            None => Err(format!("no answer within {}s", timeout.as_secs())),
        }
    }
}

/// Waits until `target` accepts SSH (a cloud says "running" well before sshd listens), at most
/// `timeout`; `progress` is called about every 10 s with the time waited and the last failure.
pub fn wait_ready(
    target: &SshTarget,
    timeout: Duration,
    mut progress: impl FnMut(Duration, &str),
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut last = String::from("not tried yet");
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!(
                "{} did not accept SSH within {}s (last: {last})",
                target.host(),
                timeout.as_secs()
            ));
        }
        match target.try_once(left.min(Duration::from_secs(5))) {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) => last = e,
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            progress(start.elapsed(), &last);
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500).min(timeout.saturating_sub(start.elapsed())));
    }
}

/// Removes every key of `host` from `known_hosts` (a deleted instance's address may be given
/// to a new instance with a new key). Missing file or entry: nothing to do.
pub fn forget_host(known_hosts: &Path, host: &str) -> Result<(), String> {
    if !known_hosts.exists() {
        return Ok(());
    }
    let mut keygen = Command::new("ssh-keygen");
    crate::children::restrict_env(&mut keygen, crate::children::ChildEnv::Ssh);
    let out = keygen
        .arg("-R")
        .arg(host)
        .arg("-f")
        .arg(known_hosts)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh-keygen -R {host}: {e}"))?;
    // ssh-keygen leaves the previous file as `known_hosts.old`.
    let _ = std::fs::remove_file(known_hosts.with_extension("old"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ssh-keygen -R {host} -f {} failed: {}",
            known_hosts.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_only_the_deleted_hosts_keys() {
        let dir = std::env::temp_dir().join(format!("ssh-forget-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kh = dir.join("known_hosts");
        std::fs::write(
            &kh,
            "10.0.0.5 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0aV2MZdGbPQxWdkZxVpbA2iNz0pFLdjUO3xCWfMrnl\n\
             10.0.0.6 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVF9OrLhxy5SyhRGJj3Xp5hFyMWcxL2V/D8YVa3bE+Y\n",
        )
        .unwrap();
        forget_host(&kh, "10.0.0.5").unwrap();
        let left = std::fs::read_to_string(&kh).unwrap();
        assert!(!left.contains("10.0.0.5"), "{left}");
        assert!(left.contains("10.0.0.6"), "{left}");
        assert!(!kh.with_extension("old").exists());
        // Forgetting an unknown host, or with no file at all, is not an error.
        forget_host(&kh, "10.0.0.9").unwrap();
        forget_host(&dir.join("none"), "10.0.0.5").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_carries_the_key_and_the_known_hosts() {
        let t = SshTarget {
            program: "ssh".into(),
            target: "root@10.1.2.3".into(),
            known_hosts: PathBuf::from("/s/known_hosts"),
            identity: Some(PathBuf::from("/s/key")),
        };
        assert_eq!(t.host(), "10.1.2.3");
        let cmd = t.command(Duration::from_secs(7));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("UserKnownHostsFile=/s/known_hosts"),
            "{joined}"
        );
        assert!(
            joined.contains("StrictHostKeyChecking=accept-new"),
            "{joined}"
        );
        assert!(joined.contains("ConnectTimeout=7"), "{joined}");
        assert!(
            joined.contains("-i /s/key -o IdentitiesOnly=yes"),
            "{joined}"
        );
        assert_eq!(args.last().map(String::as_str), Some("root@10.1.2.3"));
    }
}
