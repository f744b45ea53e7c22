//! One deployer per deployment across hosts: a lease held where every deployer of the
//! deployment looks, at the provider (Linode: a tag, created with `POST /tags` and found by
//! listing tags) or in the provider's shared registry directory (local and machines: a file).
//!
//! A lease is a name, `dlease_DEP_EXPIRES_NONCE_HOLDER` (at most 50 characters, Linode's limit
//! for a tag): `DEP` a hash of the deployment's name, `EXPIRES` UNIX seconds, `NONCE` random,
//! `HOLDER` the holder's host and PID. Neither store can compare-and-swap, so acquiring is
//! *create, then look*: list the deployment's leases; if another valid one is there, wait a
//! moment and look again (it may be a contender about to withdraw), then refuse naming its
//! holder; else create ours and list again: if any other valid lease is there now, delete ours
//! and try again (at most three times), else ours is held. Two contenders can both withdraw,
//! never both hold: of two creates, the later one's list sees the earlier lease, and the earlier
//! one's holder deletes it only when it lost. No clock decides who wins; clocks only decide
//! expiry.
//!
//! **Renewal and expiry.** A thread renews the lease every third of `ttl_secs` (a new name
//! with the new expiry is created, then the old one deleted), after checking that the old one
//! is still there and unexpired. Another deployer takes a lease for expired once its expiry is
//! `clock_skew_secs` behind its own clock, deletes it, and acquires as above. On the holder's
//! host a dead holder is known at once: the holder keeps an exclusive `flock` on a liveness
//! file named for its nonce (in the registry directory, or for Linode in the temporary
//! directory), which the kernel releases however the holder dies; a lease whose liveness file
//! exists and is not locked is a dead holder's, taken over without waiting for its expiry.
//!
//! **A stale holder** (stopped, or cut off from the API, past its expiry) finds at its next
//! renewal that its lease is gone or expired and marks it lost; every write the deployer makes
//! (each journal write, each step, each delete, each flip) checks the lease first
//! ([`Lease::check`]) and stops with [`LeaseError::Lost`]. What a stale holder could still
//! send between its last check and the write (a flip) is refused by lb itself: flips are
//! compare-and-swap on the lb's generation (`set-backends --if-generation`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

/// Linode's limit for a tag label.
pub const MAX_NAME: usize = 50;
/// Every lease name starts with this.
pub const PREFIX: &str = "dlease_";

/// Where leases are kept.
pub trait LeaseStore: Send + Sync {
    /// Every lease name in the store (of any deployment: [`Lease`] filters).
    fn list(&self) -> Result<Vec<String>, String>;
    fn create(&self, name: &str) -> Result<(), String>;
    /// Deletes a lease; already gone is success.
    fn delete(&self, name: &str) -> Result<(), String>;
    /// Where holders keep their liveness files on this host.
    fn liveness_dir(&self) -> PathBuf;
    /// What the store is, for messages (`Linode tags`, `/var/lib/...`).
    fn describe(&self) -> String;
}

/// Why the lease is not (or no longer) held.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    #[error("another deployer holds the lease on deployment {deployment} ({holder}, until {expires_unix}, UNIX seconds; {store}): wait for it to finish; if it died on another host, its lease expires by itself and is taken over {skew}s after that")]
    Held {
        deployment: String,
        holder: String,
        expires_unix: u64,
        store: String,
        skew: u64,
    },
    #[error("this deployer's lease on deployment {deployment} was lost ({why}): another deployer may have taken over, so this one stops without changing anything more. Run `deployer status`, then `--resume` or `rollback` from wherever the operation should finish")]
    Lost { deployment: String, why: String },
    #[error("the lease on deployment {deployment} cannot be read or written ({store}): {message}")]
    Store {
        deployment: String,
        store: String,
        message: String,
    },
}

/// A lease name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseName {
    pub deployment_hash: String,
    pub expires_unix: u64,
    pub nonce: String,
    pub holder: String,
}

impl LeaseName {
    pub fn encode(&self) -> String {
        let head = format!(
            "{PREFIX}{}_{}_{}_",
            self.deployment_hash, self.expires_unix, self.nonce
        );
        let room = MAX_NAME.saturating_sub(head.len());
        // The PID is the holder's end: keep it whole, shorten the host.
        let holder = if self.holder.len() <= room {
            self.holder.clone()
        } else {
            let (host, pid) = self.holder.rsplit_once('-').unwrap_or(("", &self.holder));
            let keep = room.saturating_sub(pid.len() + 1);
            format!("{}-{pid}", &host[..keep.min(host.len())])
        };
        format!("{head}{holder}")
    }

    pub fn parse(name: &str) -> Option<LeaseName> {
        let rest = name.strip_prefix(PREFIX)?;
        let mut parts = rest.splitn(4, '_');
        let deployment_hash = parts.next()?.to_string();
        let expires_unix = parts.next()?.parse().ok()?;
        let nonce = parts.next()?.to_string();
        let holder = parts.next()?.to_string();
        (!nonce.is_empty()).then_some(LeaseName {
            deployment_hash,
            expires_unix,
            nonce,
            holder,
        })
    }
}

/// Eight hex digits naming a deployment (FNV-1a): lease names have no room for the name.
pub fn deployment_hash(deployment: &str) -> String {
    let mut h: u32 = 2_166_136_261;
    for b in deployment.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    format!("{h:08x}")
}

/// This process as a lease holder: `HOST-PID`, the host in lower case letters, digits and '-'.
pub fn this_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    format!("{host}-{}", std::process::id())
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long a lease lasts and how much clock difference between hosts is tolerated.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    pub ttl: Duration,
    pub clock_skew: Duration,
}

/// What the holder's thread and the deployer share.
#[derive(Debug)]
struct Held {
    name: LeaseName,
    lost: Option<String>,
}

/// A held lease; released (deleted) when dropped. A holder killed outright leaves it to expire
/// (or, on the same host, to be found dead through its liveness file).
pub struct Lease {
    store: Arc<dyn LeaseStore>,
    deployment: String,
    times: LeaseTimes,
    held: Arc<Mutex<Held>>,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
    /// Locked while this process lives.
    liveness: Option<(PathBuf, File)>,
    /// Leases of others that were found expired (or dead) and deleted on the way in.
    pub took_over: Vec<String>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("deployment", &self.deployment)
            .field("held", &self.held)
            .finish()
    }
}

/// Tries an exclusive lock on `path` without waiting: `Some(true)` if locked (the holder is
/// dead; the lock is dropped again), `Some(false)` if someone holds it, `None` if no such file.
fn holder_dead(path: &Path) -> Option<bool> {
    let f = File::open(path).ok()?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    Some(r == 0)
}

fn liveness_path(store: &dyn LeaseStore, nonce: &str) -> PathBuf {
    store.liveness_dir().join(format!("live-{nonce}"))
}

impl Lease {
    /// Acquires the deployment's lease or refuses naming the holder (see the module's doc).
    pub fn acquire(
        store: Arc<dyn LeaseStore>,
        deployment: &str,
        times: LeaseTimes,
    ) -> Result<Lease, LeaseError> {
        let hash = deployment_hash(deployment);
        let store_err = |message: String| LeaseError::Store {
            deployment: deployment.to_string(),
            store: store.describe(),
            message,
        };
        let nonce = format!("{:08x}", rand::rng().random::<u32>());
        // The liveness file first, locked for as long as this process lives.
        let dir = store.liveness_dir();
        crate::private::create_dir(&dir)
            .map_err(|e| store_err(format!("{}: {e}", dir.display())))?;
        let live = liveness_path(store.as_ref(), &nonce);
        let file =
            File::create(&live).map_err(|e| store_err(format!("{}: {e}", live.display())))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(store_err(format!(
                "cannot lock {}: {}",
                live.display(),
                std::io::Error::last_os_error()
            )));
        }
        let mut took_over = Vec::new();
        let mut last_other = None;
        for attempt in 0..3 {
            let others = Self::valid_others(&store, &hash, times, None, &mut took_over)
                .map_err(store_err)?;
            if let Some(o) = others.into_iter().next() {
                last_other = Some(o);
                std::thread::sleep(Duration::from_millis(
                    100 + rand::rng().random_range(0..300) * (attempt + 1),
                ));
                continue;
            }
            let name = LeaseName {
                deployment_hash: hash.clone(),
                expires_unix: now_unix() + times.ttl.as_secs(),
                nonce: nonce.clone(),
                holder: this_holder(),
            };
            let encoded = name.encode();
            store.create(&encoded).map_err(store_err)?;
            let others = Self::valid_others(&store, &hash, times, Some(&nonce), &mut took_over)
                .map_err(store_err)?;
            if let Some(o) = others.into_iter().next() {
                // Someone created theirs meanwhile: both may withdraw, never both hold.
                let _ = store.delete(&encoded);
                last_other = Some(o);
                std::thread::sleep(Duration::from_millis(
                    100 + rand::rng().random_range(0..300) * (attempt + 1),
                ));
                continue;
            }
            let held = Arc::new(Mutex::new(Held { name, lost: None }));
            let stop = Arc::new(AtomicBool::new(false));
            let renewer = {
                let (store, held, stop) =
                    (Arc::clone(&store), Arc::clone(&held), Arc::clone(&stop));
                std::thread::spawn(move || renew_loop(store.as_ref(), &held, &stop, times))
            };
            return Ok(Lease {
                store,
                deployment: deployment.to_string(),
                times,
                held,
                stop,
                renewer: Some(renewer),
                liveness: Some((live, file)),
                took_over,
            });
        }
        drop(file);
        let _ = std::fs::remove_file(&live);
        let o = last_other.expect("three attempts each saw another lease");
        Err(LeaseError::Held {
            deployment: deployment.to_string(),
            holder: format!(
                "holder {}",
                o.holder
                    .rsplit_once('-')
                    .map_or(o.holder.clone(), |(h, p)| format!("{h}, PID {p}"))
            ),
            expires_unix: o.expires_unix,
            store: store.describe(),
            skew: times.clock_skew.as_secs(),
        })
    }

    /// The deployment's leases other than `ours` that are still valid. Expired ones, and on
    /// this host dead holders' ones, are deleted on the way (and reported in `took_over`).
    fn valid_others(
        store: &Arc<dyn LeaseStore>,
        hash: &str,
        times: LeaseTimes,
        ours: Option<&str>,
        took_over: &mut Vec<String>,
    ) -> Result<Vec<LeaseName>, String> {
        let now = now_unix();
        let mut out = Vec::new();
        for raw in store.list()? {
            let Some(l) = LeaseName::parse(&raw) else {
                continue;
            };
            if l.deployment_hash != hash || Some(l.nonce.as_str()) == ours {
                continue;
            }
            let live = liveness_path(store.as_ref(), &l.nonce);
            let dead = holder_dead(&live) == Some(true);
            let expired = now > l.expires_unix + times.clock_skew.as_secs();
            if dead || expired {
                store.delete(&raw)?;
                let _ = std::fs::remove_file(&live);
                took_over.push(format!(
                    "{} ({})",
                    l.holder,
                    if dead {
                        "its process on this host is gone".to_string()
                    } else {
                        format!("expired at {} UNIX seconds", l.expires_unix)
                    }
                ));
                continue;
            }
            out.push(l);
        }
        Ok(out)
    }

    /// Ok while the lease is held: not lost at a renewal, and not past its expiry (a holder
    /// whose renewals stopped, e.g. a stopped process, must not act on an expired lease).
    pub fn check(&self) -> Result<(), LeaseError> {
        let h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &h.lost {
            return Err(LeaseError::Lost {
                deployment: self.deployment.clone(),
                why: why.clone(),
            });
        }
        if now_unix() >= h.name.expires_unix {
            return Err(LeaseError::Lost {
                deployment: self.deployment.clone(),
                why: format!(
                    "it expired at {} UNIX seconds without being renewed (was this process stopped?)",
                    h.name.expires_unix
                ),
            });
        }
        Ok(())
    }

    /// The name of the lease as held now (it changes at every renewal).
    pub fn name(&self) -> String {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .name
            .encode()
    }

    pub fn times(&self) -> LeaseTimes {
        self.times
    }
}

/// Renews every third of the lease's life until stopped; marks the lease lost when it finds it
/// gone or expired.
fn renew_loop(store: &dyn LeaseStore, held: &Mutex<Held>, stop: &AtomicBool, times: LeaseTimes) {
    let period = (times.ttl / 3).max(Duration::from_millis(300));
    let mut next = std::time::Instant::now() + period;
    loop {
        while std::time::Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        next = std::time::Instant::now() + period;
        let current = held.lock().unwrap_or_else(|e| e.into_inner()).name.clone();
        if held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lost
            .is_some()
        {
            return;
        }
        let lose = |why: String| {
            held.lock().unwrap_or_else(|e| e.into_inner()).lost = Some(why);
        };
        if now_unix() >= current.expires_unix {
            lose(format!(
                "it expired at {} UNIX seconds before it could be renewed",
                current.expires_unix
            ));
            return;
        }
        let names = match store.list() {
            Ok(n) => n,
            // Tried again at the next period; the lease expires if this goes on.
            Err(_) => continue,
        };
        if !names.contains(&current.encode()) {
            lose(format!(
                "{} no longer holds it: it was deleted, by a deployer that took it for expired",
                store.describe()
            ));
            return;
        }
        let renewed = LeaseName {
            expires_unix: now_unix() + times.ttl.as_secs(),
            ..current.clone()
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if store.create(&renewed.encode()).is_err() {
            continue;
        }
        let keep = renewed.encode();
        held.lock().unwrap_or_else(|e| e.into_inner()).name = renewed;
        // The old name, and any a failed attempt may have left (a create whose reply was lost).
        for n in names.iter().chain([&current.encode()]) {
            if *n != keep && LeaseName::parse(n).is_some_and(|l| l.nonce == current.nonce) {
                let _ = store.delete(n);
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        let h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if h.lost.is_none() {
            let _ = self.store.delete(&h.name.encode());
            // Any other name of ours (a renewal whose reply was lost) would block others until
            // it expired.
            for n in self.store.list().unwrap_or_default() {
                if LeaseName::parse(&n).is_some_and(|l| l.nonce == h.name.nonce) {
                    let _ = self.store.delete(&n);
                }
            }
        }
        if let Some((path, file)) = self.liveness.take() {
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
    }
}

/// Leases as files in a directory shared by every deployer of the deployment on this host
/// (the local and machines providers' registry directory).
pub struct FileLeaseStore {
    pub dir: PathBuf,
}

impl LeaseStore for FileLeaseStore {
    fn list(&self) -> Result<Vec<String>, String> {
        match std::fs::read_dir(&self.dir) {
            Ok(d) => Ok(d
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(PREFIX))
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("{}: {e}", self.dir.display())),
        }
    }

    fn create(&self, name: &str) -> Result<(), String> {
        crate::private::create_dir(&self.dir)
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let p = self.dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map(drop)
            .map_err(|e| format!("{}: {e}", p.display()))
    }

    fn delete(&self, name: &str) -> Result<(), String> {
        let p = self.dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    fn liveness_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    fn describe(&self) -> String {
        format!("lease files in {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dlease-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn names_round_trip_and_fit_a_linode_tag() {
        let n = LeaseName {
            deployment_hash: deployment_hash("demo"),
            expires_unix: 1_765_000_000,
            nonce: "0badcafe".into(),
            holder: "a-very-long-host-name-indeed.example.com-4194304".into(),
        };
        let s = n.encode();
        assert!(s.len() <= MAX_NAME, "{s}");
        let back = LeaseName::parse(&s).unwrap();
        assert_eq!(back.expires_unix, n.expires_unix);
        assert_eq!(back.nonce, n.nonce);
        assert!(back.holder.ends_with("-4194304"), "the PID is kept: {s}");
        assert_eq!(LeaseName::parse("dlease_x"), None);
        assert_eq!(LeaseName::parse("deployer-demo"), None);
    }

    #[test]
    fn a_second_holder_is_refused_and_an_expired_lease_is_taken_over() {
        let dir = temp("files");
        let store: Arc<dyn LeaseStore> = Arc::new(FileLeaseStore { dir: dir.clone() });
        let times = LeaseTimes {
            ttl: Duration::from_secs(60),
            clock_skew: Duration::from_secs(0),
        };
        let first = Lease::acquire(Arc::clone(&store), "demo", times).unwrap();
        first.check().unwrap();
        let e = Lease::acquire(Arc::clone(&store), "demo", times).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("PID {}", std::process::id())),
            "names the holder: {msg}"
        );
        // Another deployment's lease is another lease.
        let other = Lease::acquire(Arc::clone(&store), "other", times).unwrap();
        drop(other);
        // An expired lease (here: a holder elsewhere that stopped renewing) is taken over, and
        // its holder finds out at its next check.
        let stale = LeaseName {
            expires_unix: now_unix() - 1,
            ..first.held.lock().unwrap().name.clone()
        };
        store.delete(&first.name()).unwrap();
        store.create(&stale.encode()).unwrap();
        first.held.lock().unwrap().name = stale;
        let taker = Lease::acquire(Arc::clone(&store), "demo", times).unwrap();
        assert_eq!(taker.took_over.len(), 1, "{:?}", taker.took_over);
        assert!(matches!(first.check(), Err(LeaseError::Lost { .. })));
        drop(first);
        assert_eq!(store.list().unwrap(), vec![taker.name()]);
        drop(taker);
        assert!(store.list().unwrap().is_empty(), "released on drop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
