//! The active health checker: probes every backend of the current set on a period and turns
//! the verdicts into up/down with `rise`/`fall` hysteresis.
//!
//! Health lives in each [`Backend`]'s atomics, which are part of the snapshot the hot path
//! reads: a flip is one atomic store on the same object whichever snapshot is current, so it
//! cannot race a swap. One probe at most is in flight per backend; only backends of the current
//! set are probed, so a removed backend's probes stop. The probe itself is [`crate::probe`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::backend::{Backend, Shared, Suspicion};
use crate::config::HealthConfig;
pub use crate::probe::{check_answer, probe_backend, probe_serials, ProbeError, ProbeFailure};

/// Applies one probe result to a backend: up after `rise` successes (or the first success of a
/// never-checked backend), down after `fall` failures, or at once when passive detection
/// suspected it (timeouts or a port unreachable on live traffic, now confirmed by the probe);
/// every failure is counted by reason. A suspicion the probe does not confirm is dropped.
pub fn record_result(backend: &Backend, result: &Result<u32, ProbeError>, rise: u32, fall: u32) {
    let st = &backend.state;
    let never_checked = st.reason() == ProbeFailure::NotChecked;
    if let Some(why) = st.take_suspicion() {
        if let Err(e) = result {
            let (reason, detail) = match why {
                Suspicion::Timeouts => (
                    ProbeFailure::PassiveTimeouts,
                    format!("queries on live traffic timed out and a probe failed: {e}"),
                ),
                Suspicion::PortUnreachable => (
                    e.reason,
                    format!("port unreachable on live traffic and a probe failed: {e}"),
                ),
            };
            if backend.mark_down(reason, &detail) {
                st.health_ok.store(0, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
    }
    match result {
        Ok(_) => {
            st.health_fail
                .store(0, std::sync::atomic::Ordering::Relaxed);
            st.alive();
            let ok = st
                .health_ok
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if st.is_up() || ok >= rise || never_checked {
                backend.mark_up();
            }
        }
        Err(e) => {
            st.health_ok.store(0, std::sync::atomic::Ordering::Relaxed);
            let failed = st
                .health_fail
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            let flip = (st.is_up() && failed >= fall) || never_checked;
            // mark_down counts the failure when it flips the backend; otherwise count it here.
            if !(flip && backend.mark_down(e.reason, e)) {
                st.record_failure(e.reason);
            }
        }
    }
}

/// The shortest time between two probe rounds asked for by passive detection.
pub const MIN_REQUESTED_GAP: Duration = Duration::from_millis(50);

/// Settings the active checker reads each round (rebuilt on reload).
#[derive(Debug, Clone)]
pub struct CheckerSettings {
    pub zones: Vec<Vec<u8>>,
    /// The same zones as text (`example.com.`), the `zone` label of `lb_backend_zone_serial`.
    pub zone_texts: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub tcp: bool,
    pub min_serial: Option<u32>,
}

impl CheckerSettings {
    pub fn from_config(c: &HealthConfig) -> Option<CheckerSettings> {
        c.active().then(|| CheckerSettings {
            zones: c.zone_names(),
            zone_texts: c
                .zone_names()
                .iter()
                .map(|z| crate::probe::zone_to_text(z))
                .collect(),
            interval: Duration::from_millis(c.interval_ms),
            timeout: Duration::from_millis(c.timeout_ms),
            rise: c.rise,
            fall: c.fall,
            tcp: c.tcp,
            min_serial: c.min_serial,
        })
    }
}

/// The checker's handle: its settings (swapped on reload), a way to make it probe now, and the
/// serials it has seen.
#[derive(Debug, Default)]
pub struct Checker {
    settings: ArcSwapOption<CheckerSettings>,
    wake: Notify,
    serials: Mutex<SerialBook>,
}

/// The zone serials the backends of the current set served at their last probe.
#[derive(Debug, Default)]
struct SerialBook {
    /// The zones the serials below are for (those of the settings in force).
    zones: Vec<Vec<u8>>,
    /// Per zone of `zones`, the serial the zone is at now (`None`: none seen yet): the one a
    /// backend last changed to (up or down), else the newest a backend of the current set
    /// serves. A backend serving another is behind.
    current: Vec<Option<u32>>,
    /// Per backend of the current set, the serials of its last successful probe.
    last: HashMap<SocketAddr, Vec<u32>>,
}

/// True if serial `a` is newer than `b` (RFC 1982: a difference below 2^31).
fn newer(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

impl Checker {
    pub fn new(c: &HealthConfig) -> Checker {
        let checker = Checker::default();
        checker.reconfigure(c);
        checker
    }

    /// Applies a (reloaded) `[health]` section from the next round on.
    ///
    /// The serials seen are kept while the zone list stays the same: a reload must not forget
    /// them, or a rise between the reload and the next probe would go unnoticed.
    pub fn reconfigure(&self, c: &HealthConfig) {
        let s = CheckerSettings::from_config(c);
        let zones = s.as_ref().map_or_else(Vec::new, |s| s.zones.clone());
        let mut book = self.serials.lock().unwrap_or_else(|e| e.into_inner());
        if book.zones != zones || book.current.len() != zones.len() {
            *book = SerialBook {
                current: vec![None; zones.len()],
                zones,
                last: HashMap::new(),
            };
        }
        drop(book);
        self.settings.store(s.map(Arc::new));
    }

    /// Takes in the serials a probe of `b` saw (per zone of `s`), and flushes the packet cache
    /// when a zone changed.
    ///
    /// A zone's serial *changes* when a backend's own probe shows another serial than its
    /// last one: a reload, or a restore from backup (the serial goes down, which RFC 1982
    /// order would call old, but the zone served is the new one). The zone is then taken to
    /// be at that serial. A backend first probed on a serial newer than the zone's (after a
    /// start, or a swap that added it) changes it too. When backends leave the set, the zone
    /// is taken afresh at the newest serial of those that stay (so a swap back to older
    /// nameservers, a rollback, is cached from again).
    ///
    /// On a change, every backend not known to serve the zone's new serial (not probed since,
    /// or probed on another) is marked behind first, so nothing it answers is cached, and then
    /// the cache is flushed. A backend stays behind until its own probe shows every zone at
    /// the zone's serial. A backend found behind without a change (probed after the others,
    /// e.g. after a start or a swap to nameservers that disagree) has had its answers cached
    /// until now: that flushes the cache too. Only the zones in `health.zones` are probed:
    /// others on the same nameservers are flushed by swaps and reloads only.
    fn note_serials(&self, b: &Backend, serials: &[u32], s: &CheckerSettings, shared: &Shared) {
        let set = shared.current();
        let mut book = self.serials.lock().unwrap_or_else(|e| e.into_inner());
        if book.zones != s.zones || serials.len() != s.zones.len() || set.find(b.addr).is_none() {
            return; // settings or the set changed while the probe ran
        }
        let before = book.last.len();
        book.last.retain(|a, _| set.find(*a).is_some());
        let left = book.last.len() != before;
        let prev = book.last.insert(b.addr, serials.to_vec());
        let mut changed = false;
        for z in 0..s.zones.len() {
            let was = book.current[z];
            let own_change = prev.as_ref().is_some_and(|p| p[z] != serials[z]);
            let now = if own_change {
                Some(serials[z])
            } else if left || was.is_none() {
                book.last
                    .values()
                    .map(|v| v[z])
                    .reduce(|a, x| if newer(x, a) { x } else { a })
            } else if prev.is_none() && was.is_some_and(|w| newer(serials[z], w)) {
                Some(serials[z])
            } else {
                was
            };
            changed |= was.is_some() && now != was;
            book.current[z] = now;
        }
        let mut newly_behind = false;
        for other in &set.backends {
            let behind = book.last.get(&other.addr).is_none_or(|v| {
                v.iter()
                    .zip(&book.current)
                    .any(|(serial, c)| Some(*serial) != *c)
            });
            // Unprobed backends are only marked behind once a change makes it matter.
            if book.last.contains_key(&other.addr) || changed {
                newly_behind |= behind && !other.state.is_behind();
                other.state.set_behind(behind);
            }
        }
        drop(book);
        // Marked behind first, then flushed: nothing a lagging backend answers after the
        // flush is cached.
        if changed || newly_behind {
            if let Some(cache) = &shared.cache {
                cache.flush_serial();
                tracing::info!(
                    "{} (backend {}): packet cache flushed",
                    if changed {
                        "a zone's serial changed"
                    } else {
                        "a backend is behind the zone's serial"
                    },
                    b.addr
                );
            }
        }
    }

    /// The settings in force; `None` when active checks are off.
    pub fn settings(&self) -> Option<Arc<CheckerSettings>> {
        self.settings.load_full()
    }

    /// Probes the current set at once (after a swap added backends).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Probes every backend of the current set once, concurrently, and waits for the results.
    pub async fn probe_round(self: &Arc<Self>, shared: &Arc<Shared>) {
        let Some(s) = self.settings() else { return };
        let set = shared.current();
        let tasks: Vec<_> = set
            .backends
            .iter()
            .filter_map(|b| self.spawn_probe(b, &s, shared))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Runs forever: probes the current set every interval, and at once when woken (a swap) or
    /// asked (passive detection suspects a backend). Rounds asked for by passive detection
    /// start at most every [`MIN_REQUESTED_GAP`]: forged ICMP errors can ask for probes, but
    /// not make the checker probe the backends faster than that.
    pub async fn run(self: Arc<Self>, shared: Arc<Shared>) {
        let mut last_requested: Option<tokio::time::Instant> = None;
        loop {
            let s = self.settings();
            let interval = s.as_ref().map_or(Duration::from_secs(1), |s| s.interval);
            if let Some(s) = s {
                for b in &shared.current().backends {
                    self.spawn_probe(b, &s, &shared);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
                _ = shared.probe_requested() => {
                    if let Some(t) = last_requested {
                        tokio::time::sleep_until(t + MIN_REQUESTED_GAP).await;
                    }
                    last_requested = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

impl Checker {
    /// Starts a probe of `b` unless one is already in flight.
    fn spawn_probe(
        self: &Arc<Self>,
        b: &Arc<Backend>,
        s: &Arc<CheckerSettings>,
        shared: &Arc<Shared>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !b.state.try_start_probe() {
            return None;
        }
        let (b, s, shared, checker) = (
            Arc::clone(b),
            Arc::clone(s),
            Arc::clone(shared),
            Arc::clone(self),
        );
        Some(tokio::spawn(async move {
            let r = probe_serials(b.addr, &s.zones, s.min_serial, s.tcp, s.timeout).await;
            if let Ok(serials) = &r {
                checker.note_serials(&b, serials, &s, &shared);
            }
            b.state
                .set_zone_serials(&s.zone_texts, r.as_ref().ok().map(Vec::as_slice));
            let r = r.map(|serials| serials.into_iter().min().unwrap_or(0));
            record_result(&b, &r, s.rise, s.fall);
            b.state.end_probe();
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let b = Backend::unchecked("127.0.0.1:53".parse().unwrap());
        let ok: Result<u32, ProbeError> = Ok(1);
        let bad: Result<u32, ProbeError> = Err(ProbeError {
            reason: ProbeFailure::Refused,
            detail: String::new(),
        });
        record_result(&b, &ok, 2, 3);
        assert!(b.state.is_up(), "first success of a never-checked backend");
        record_result(&b, &bad, 2, 3);
        record_result(&b, &bad, 2, 3);
        assert!(b.state.is_up());
        record_result(&b, &bad, 2, 3);
        assert!(!b.state.is_up());
        assert_eq!(b.state.reason(), ProbeFailure::Refused);
        record_result(&b, &ok, 2, 3);
        assert!(!b.state.is_up(), "rise = 2");
        record_result(&b, &ok, 2, 3);
        assert!(b.state.is_up());
        assert_eq!(b.state.reason(), ProbeFailure::None);
        assert_eq!(b.state.health_failures(ProbeFailure::Refused), 3);
        // A never-checked backend's first failure is counted once.
        let c = Backend::unchecked("127.0.0.2:53".parse().unwrap());
        record_result(&c, &bad, 2, 3);
        assert!(!c.state.is_up());
        assert_eq!(c.state.health_failures(ProbeFailure::Refused), 1);
        // A suspect backend goes down at the first failed probe, as a passive detection.
        let d = Backend::new("127.0.0.3:53".parse().unwrap());
        assert!(d.passive_timeout(1));
        record_result(&d, &bad, 2, 3);
        assert!(!d.state.is_up());
        assert_eq!(d.state.reason(), ProbeFailure::PassiveTimeouts);
        // ... and a passed probe clears the suspicion.
        let e = Backend::new("127.0.0.4:53".parse().unwrap());
        assert!(e.passive_timeout(1));
        record_result(&e, &ok, 2, 3);
        assert!(e.state.is_up() && e.state.take_suspicion().is_none());
        // A port unreachable (perhaps forged): a passed probe keeps the backend up, a failed
        // one takes it down at once, with the probe's own reason.
        let f = Backend::new("127.0.0.5:53".parse().unwrap());
        assert!(f.port_unreachable());
        record_result(&f, &ok, 2, 3);
        assert!(f.state.is_up() && f.state.take_suspicion().is_none());
        let network: Result<u32, ProbeError> = Err(ProbeError {
            reason: ProbeFailure::Network,
            detail: "connection refused".into(),
        });
        assert!(f.port_unreachable());
        record_result(&f, &network, 2, 3);
        assert!(
            !f.state.is_up(),
            "confirmed at the first failure, not after fall = 3"
        );
        assert_eq!(f.state.reason(), ProbeFailure::Network);
    }

    /// A set of backends at the given addresses with a packet cache, and checker settings
    /// for one zone.
    fn setup(addrs: &[&str]) -> (Arc<Shared>, Checker, CheckerSettings) {
        use crate::backend::SetParams;
        use crate::config::{AllDown, BackendAddr, CacheConfig, HealthConfig};
        let params = SetParams {
            policy: crate::policy::Policy::RoundRobin,
            timeout: Duration::from_secs(1),
            resend_after: Duration::from_millis(100),
            all_down: AllDown::FailOpen,
            passive_timeouts: 0,
            checked: false,
            access: Arc::default(),
            rrl: None,
        };
        let list: Vec<BackendAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
        let cache = crate::cache::PacketCache::new(&CacheConfig {
            entries: 64,
            ..CacheConfig::default()
        });
        let shared = Arc::new(Shared::new(params, &list, 1, 64).with_cache(cache));
        let health = HealthConfig {
            enabled: true,
            zones: vec!["example.test.".into()],
            ..HealthConfig::default()
        };
        let checker = Checker::new(&health);
        let settings = checker.settings().unwrap().as_ref().clone();
        (shared, checker, settings)
    }

    fn serial_flushes(shared: &Shared) -> u64 {
        let c = shared.cache.as_ref().unwrap();
        c.flushes(crate::cache::FlushReason::Serial)
    }

    #[test]
    fn a_serial_rise_marks_every_backend_not_yet_on_it_behind() {
        let (shared, checker, s) = setup(&["127.0.0.1:53", "127.0.0.2:53"]);
        let set = shared.current();
        let (a, b) = (&set.backends[0], &set.backends[1]);
        checker.note_serials(a, &[1], &s, &shared);
        checker.note_serials(b, &[1], &s, &shared);
        assert!(!a.state.is_behind() && !b.state.is_behind());
        assert_eq!(serial_flushes(&shared), 0, "a first sighting is no rise");
        // The zone is reloaded on A first: flushed, and B (still on 1, not probed since) is
        // behind at once, before its own probe.
        checker.note_serials(a, &[2], &s, &shared);
        assert_eq!(serial_flushes(&shared), 1);
        assert!(!a.state.is_behind() && b.state.is_behind());
        checker.note_serials(b, &[1], &s, &shared);
        assert!(b.state.is_behind());
        // B catches up: no second flush (nothing new), and it is cached from again.
        checker.note_serials(b, &[2], &s, &shared);
        assert!(!b.state.is_behind());
        assert_eq!(serial_flushes(&shared), 1);
    }

    #[test]
    fn a_backend_found_behind_without_a_rise_flushes_what_it_answered() {
        // Two nameservers that disagree from the start: A (serial 2) is probed first, so no
        // rise is ever seen; B's serial-1 answers were cached until its probe.
        let (shared, checker, s) = setup(&["127.0.0.1:53", "127.0.0.2:53"]);
        let set = shared.current();
        let (a, b) = (&set.backends[0], &set.backends[1]);
        checker.note_serials(a, &[2], &s, &shared);
        assert_eq!(serial_flushes(&shared), 0);
        checker.note_serials(b, &[1], &s, &shared);
        assert!(b.state.is_behind());
        assert_eq!(serial_flushes(&shared), 1);
        // Still behind at its next probe: nothing new to flush.
        checker.note_serials(b, &[1], &s, &shared);
        assert_eq!(serial_flushes(&shared), 1);
    }

    #[test]
    fn a_reload_keeps_the_serials_seen_unless_the_zones_change() {
        let (shared, checker, s) = setup(&["127.0.0.1:53"]);
        let a = Arc::clone(&shared.current().backends[0]);
        checker.note_serials(&a, &[2], &s, &shared);
        let health = crate::config::HealthConfig {
            enabled: true,
            zones: vec!["example.test.".into()],
            ..crate::config::HealthConfig::default()
        };
        checker.reconfigure(&health);
        checker.note_serials(&a, &[3], &s, &shared);
        assert_eq!(
            serial_flushes(&shared),
            1,
            "the rise across a reload is seen"
        );
        // Other zones: a probe made under the old settings is not taken for them.
        let other = crate::config::HealthConfig {
            enabled: true,
            zones: vec!["other.test.".into()],
            ..crate::config::HealthConfig::default()
        };
        checker.reconfigure(&other);
        checker.note_serials(&a, &[9], &s, &shared);
        assert_eq!(serial_flushes(&shared), 1);
    }

    #[test]
    fn a_serial_that_goes_down_flushes_too() {
        // One nameserver restored from a backup: its serial goes from 5 to 3. What was cached
        // is serial 5's zone, no longer served: flushed.
        let (shared, checker, s) = setup(&["127.0.0.1:53"]);
        let a = Arc::clone(&shared.current().backends[0]);
        checker.note_serials(&a, &[5], &s, &shared);
        checker.note_serials(&a, &[5], &s, &shared);
        assert_eq!(serial_flushes(&shared), 0);
        checker.note_serials(&a, &[3], &s, &shared);
        assert_eq!(serial_flushes(&shared), 1, "down is a change too");
        assert!(!a.state.is_behind());
        checker.note_serials(&a, &[3], &s, &shared);
        assert_eq!(serial_flushes(&shared), 1);
    }

    #[test]
    fn a_restore_on_one_of_two_nameservers_makes_the_other_behind() {
        // Both on 5; A is restored to 3 first: the zone is at 3 now, so B (still serving 5,
        // the zone as it was) is behind and not cached from; once B follows, it is not.
        let (shared, checker, s) = setup(&["127.0.0.1:53", "127.0.0.2:53"]);
        let set = shared.current();
        let (a, b) = (&set.backends[0], &set.backends[1]);
        checker.note_serials(a, &[5], &s, &shared);
        checker.note_serials(b, &[5], &s, &shared);
        checker.note_serials(a, &[3], &s, &shared);
        assert_eq!(serial_flushes(&shared), 1);
        assert!(!a.state.is_behind() && b.state.is_behind());
        // B's next probe, still on 5, is no change of its own: it stays behind.
        checker.note_serials(b, &[5], &s, &shared);
        assert!(b.state.is_behind());
        assert_eq!(serial_flushes(&shared), 1);
        checker.note_serials(b, &[3], &s, &shared);
        assert!(!b.state.is_behind());
        assert_eq!(
            serial_flushes(&shared),
            1,
            "nothing of B's was cached meanwhile"
        );
    }

    #[test]
    fn a_swap_back_to_older_nameservers_lowers_the_newest_serial() {
        let (shared, checker, s) = setup(&["127.0.0.1:53"]);
        let a = Arc::clone(&shared.current().backends[0]);
        checker.note_serials(&a, &[5], &s, &shared);
        // Rolled back to a nameserver on serial 4: the old set's serial is forgotten, so the
        // new backend is not behind (and its answers are cached).
        let back: Vec<crate::config::BackendAddr> = vec!["127.0.0.9:53".parse().unwrap()];
        shared.replace(Some(&back), None, true, |_| Ok(())).unwrap();
        let c = Arc::clone(&shared.current().backends[0]);
        checker.note_serials(&c, &[4], &s, &shared);
        assert!(!c.state.is_behind());
        // Serial 0 is a serial like any other: 0 -> 1 is a rise.
        checker.note_serials(&c, &[0], &s, &shared);
        let before = serial_flushes(&shared);
        checker.note_serials(&c, &[1], &s, &shared);
        assert_eq!(serial_flushes(&shared), before + 1);
    }
}
