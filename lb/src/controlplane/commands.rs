//! What each control command does: status, atomic backend swaps (optionally verified), drain,
//! reload, upgrade. Everything here runs off the per-packet path; a change is built as a new
//! snapshot and stored whole (see [`crate::backend::Shared::replace`]). The socket that carries
//! the commands is [`crate::controlplane::socket`]; `SIGHUP` and `SIGUSR2` call the same methods.
//!
//! Each operation's outcome is recorded here, in the [`crate::stats::OpRecord`]s of
//! [`crate::stats::Stats`] (`lb_reloads_total`, `lb_upgrades_total`, the failing gauges and the
//! last-success timestamps), whichever way it was asked for.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{PendingSet, SetParams, Shared};
use crate::cache::FlushReason;
use crate::config::{check_backend_list, AllDown, BackendAddr, LbConfig};
use crate::control_protocol::{
    AnswersReport, BackendStatus, ControlCommand, ControlResponse, ControlResult, ProbeReport,
    Refusal, StatusReport, ZoneSerial,
};
use crate::controlplane::health::Checker;
use crate::controlplane::upgrade::{self, HandoffSockets};
use crate::lifecycle::Lifecycle;
use crate::probe::{self, ProbeFailure};
use crate::state::{self, RuntimeState};
use crate::stats::{unix_now_ms, DropReason, Outcome, Proto};

/// What the control plane needs: the shared state, the checker, the process lifecycle, and
/// the config it was built from.
pub struct ControlContext {
    pub shared: Arc<Shared>,
    pub config_path: PathBuf,
    /// The config in force (last successful load or reload).
    config: Mutex<LbConfig>,
    /// The active health checker (its settings follow reloads).
    pub checker: Arc<Checker>,
    pub lifecycle: Arc<Lifecycle>,
    /// What a binary upgrade needs; `None` where upgrades are not possible (tests).
    upgrade: Option<UpgradeHooks>,
}

/// Why a reload was refused; the running config stays either way.
///
/// The two kinds differ for whoever asked: an invalid file needs fixing, while a valid one
/// that changes settings fixed at start is applied by a restart (the Ansible role does it on
/// [`Refusal::RestartNeeded`], carried to `lb ctl` by the control protocol, never by reading
/// the message).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or is invalid, or the new state could not be saved.
    #[error("reload refused, the running config stays: {0}")]
    Invalid(String),
    /// The file is valid but changes `changed`, which only a restart applies.
    #[error(
        "reload refused, the running config stays: {changed} changed in {path}, which only a restart applies"
    )]
    RestartNeeded { changed: String, path: String },
}

impl ReloadError {
    /// The kind a client acts on, if any.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            ReloadError::Invalid(_) => None,
            ReloadError::RestartNeeded { .. } => Some(Refusal::RestartNeeded),
        }
    }
}

/// What `lb ctl upgrade` / SIGUSR2 needs from the running process.
pub struct UpgradeHooks {
    /// Duplicates of every listening socket, handed to the new process.
    pub sockets: Arc<HandoffSockets>,
    /// This binary's path as started (a replaced file at that path is the new binary): the
    /// only binary a client other than root may upgrade to.
    pub exe: PathBuf,
    pub log_json: bool,
}

/// Who sent a control command: the user of the process at the other end of the control
/// connection, from the kernel (`SO_PEERCRED`), not from anything the client says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// `None` when the kernel could not tell (treated as not root).
    pub uid: Option<u32>,
}

impl Caller {
    /// This process itself (SIGUSR2): as trusted as root.
    pub const PROCESS: Caller = Caller { uid: Some(0) };

    pub fn is_root(&self) -> bool {
        self.uid == Some(0)
    }
}

/// The binary an upgrade may start for `caller` when it names `requested`: root may name any
/// path; anyone else only this lb's own (`exe`, compared as written or once symbolic links
/// are resolved), and then `exe` itself is started, never the client's string (a link it
/// could swap between the check and the start).
///
/// The control socket is open to the service's group, and the new binary inherits every
/// listening socket and runs as lb's user: letting any member name a binary would let it run
/// code of its choice as that user, on the DNS port.
fn upgrade_binary(requested: &str, exe: &Path, caller: Caller) -> Result<PathBuf, String> {
    if caller.is_root() {
        return Ok(PathBuf::from(requested));
    }
    let same = Path::new(requested) == exe
        || matches!(
            (std::fs::canonicalize(requested), std::fs::canonicalize(exe)),
            (Ok(a), Ok(b)) if a == b
        );
    if same {
        return Ok(exe.to_path_buf());
    }
    Err(format!(
        "upgrade refused: only root may start another binary than this lb's own ({}); the \
         request came from uid {}. Replace the file at that path and run `lb ctl upgrade` \
         without --binary",
        exe.display(),
        caller
            .uid
            .map_or_else(|| "unknown".into(), |u| u.to_string())
    ))
}

impl ControlContext {
    pub fn new(
        shared: Arc<Shared>,
        config_path: PathBuf,
        config: LbConfig,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        // The config read at start is the first successful load.
        shared.stats.reloads.mark_success_time();
        ControlContext {
            shared,
            config_path,
            checker: Arc::new(Checker::new(&config.health)),
            config: Mutex::new(config),
            lifecycle,
            upgrade: None,
        }
    }

    /// Enables `upgrade`, and continues the records of the process this one took over from,
    /// if an upgrade started it ([`upgrade::carried_records`]).
    pub fn with_upgrade(mut self, hooks: UpgradeHooks) -> Self {
        self.upgrade = Some(hooks);
        if let Some(r) = upgrade::carried_records() {
            self.shared.stats.restore_records(r);
        }
        self
    }

    /// The current backend set as persisted state.
    fn runtime_state(&self, cfg: &LbConfig) -> RuntimeState {
        self.shared.with_write_lock(|set| {
            RuntimeState::new(
                set.generation,
                set.addrs(),
                set.backends
                    .iter()
                    .filter(|b| b.state.is_draining())
                    .map(|b| BackendAddr(b.addr))
                    .collect(),
                cfg.backends.servers.clone(),
            )
        })
    }

    /// Starts `binary` (default: this one), hands it the sockets and the backend set, and on
    /// success starts this process's shutdown. On failure this process keeps serving. Only
    /// root may name another binary than this one's own path ([`upgrade_binary`]).
    pub async fn upgrade(
        &self,
        binary: Option<String>,
        caller: Caller,
    ) -> Result<ControlResult, String> {
        let r = self.try_upgrade(binary, caller).await;
        self.shared.stats.upgrades.record(&r);
        r
    }

    async fn try_upgrade(
        &self,
        binary: Option<String>,
        caller: Caller,
    ) -> Result<ControlResult, String> {
        let h = self
            .upgrade
            .as_ref()
            .ok_or_else(|| "upgrades are not available in this process".to_string())?;
        let binary = match binary {
            Some(b) => upgrade_binary(&b, &h.exe, caller)?,
            None => h.exe.clone(),
        };
        let Some(_slot) = self.lifecycle.begin_upgrade() else {
            return Err("an upgrade is already in progress".into());
        };
        let cfg = self.config();
        let _ = self.persist(&cfg);
        let st = self.runtime_state(&cfg);
        let generation = st.generation;
        let sockets = Arc::clone(&h.sockets);
        let (config_path, log_json, bin) = (self.config_path.clone(), h.log_json, binary.clone());
        // The new process continues the records, with this upgrade counted as it will be here.
        let mut records = self.shared.stats.carried_records();
        records.upgrades.successes += 1;
        records.upgrades.last_success_ms = unix_now_ms();
        records.upgrades.last_failed = false;
        tracing::info!("upgrade: starting {}", binary.display());
        let r = tokio::task::spawn_blocking(move || {
            upgrade::hand_over(&bin, &config_path, log_json, &sockets, st, records)
        })
        .await
        .unwrap_or_else(|e| Err(format!("upgrade task failed: {e}")));
        match r {
            Ok(pid) => {
                tracing::info!(
                    "upgrade: pid {pid} serves now; this process (pid {}) drains and exits",
                    std::process::id()
                );
                self.lifecycle.handed_over(pid);
                Ok(ControlResult::Done {
                    generation,
                    message: format!(
                        "upgraded to {} (pid {pid}); pid {} answers what it forwarded and exits",
                        binary.display(),
                        std::process::id()
                    ),
                })
            }
            Err(e) => {
                tracing::warn!("upgrade failed, still serving: {e}");
                Err(format!("upgrade failed, this process keeps serving: {e}"))
            }
        }
    }

    /// The config in force (last successful load or reload).
    pub fn config(&self) -> LbConfig {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Handles one command from `caller`.
    pub async fn handle(&self, cmd: ControlCommand, caller: Caller) -> ControlResponse {
        let t0 = std::time::Instant::now();
        let mut refusal = None;
        let r = match cmd {
            ControlCommand::Status => Ok(ControlResult::Status(self.status())),
            ControlCommand::SetBackends {
                backends,
                verify,
                if_generation,
            } => {
                let r = self.set_backends(&backends, verify, if_generation).await;
                // Successes are counted by the swap itself (reloads swap too).
                if r.is_err() {
                    self.shared.stats.swaps.failed();
                }
                r.map_err(|e| {
                    if let SwapRefusal::GenerationMismatch(_) = e {
                        refusal = Some(Refusal::GenerationMismatch);
                    }
                    e.to_string()
                })
            }
            ControlCommand::Drain { backend } => self.set_drain(&backend, true),
            ControlCommand::Undrain { backend } => self.set_drain(&backend, false),
            ControlCommand::Reload => match self.reload() {
                Ok((generation, message)) => Ok(ControlResult::Done {
                    generation,
                    message,
                }),
                Err(e) => {
                    refusal = e.refusal();
                    Err(e.to_string())
                }
            },
            ControlCommand::Upgrade { binary } => self.upgrade(binary, caller).await,
            ControlCommand::Probe {
                backend,
                zones,
                tcp,
            } => self.probe(&backend, &zones, tcp).await,
            ControlCommand::Query { backend, queries } => self.query(&backend, &queries).await,
        };
        let mut resp = match (r, refusal) {
            (Ok(res), _) => ControlResponse::ok(res),
            (Err(e), Some(kind)) => ControlResponse::refused(kind, e),
            (Err(e), None) => ControlResponse::error(e),
        };
        resp.elapsed_us = Some(t0.elapsed().as_micros() as u64);
        resp
    }

    /// `lb ctl status`.
    pub fn status(&self) -> StatusReport {
        let set = self.shared.current();
        let st = &self.shared.stats;
        StatusReport {
            generation: set.generation,
            policy: set.policy.as_str().into(),
            backends: set
                .backends
                .iter()
                .map(|b| {
                    let s = &b.state;
                    let reason = s.reason();
                    BackendStatus {
                        address: b.addr.to_string(),
                        state: s.state_name().into(),
                        reason: (reason != ProbeFailure::None).then(|| reason.as_str().to_string()),
                        in_flight: s.outstanding() as u64,
                        queries: s.queries.load(Ordering::Relaxed),
                        answers: s.answers.load(Ordering::Relaxed),
                        timeouts: s.timeouts.load(Ordering::Relaxed),
                        port_unreachable: s.port_unreachable.load(Ordering::Relaxed),
                    }
                })
                .collect(),
            queries_udp: st.queries(Proto::Udp),
            queries_tcp: st.queries(Proto::Tcp),
            responses: (0..16).map(|r| st.responses(r)).sum(),
            drops: DropReason::ALL
                .iter()
                .filter(|r| st.drops(**r) > 0)
                .map(|r| (r.as_str().to_string(), st.drops(*r)))
                .collect(),
            all_down: [AllDown::FailOpen, AllDown::Servfail, AllDown::Drop]
                .iter()
                .map(|m| (m.as_str().to_string(), st.all_down_count(*m)))
                .collect(),
            swaps: st.swaps.count(Outcome::Success),
            tcp_connections_open: st.tcp_open.load(Ordering::Relaxed),
            pid: std::process::id(),
        }
    }

    /// `set-backends`. With `if_generation`, the generation is compared twice: before the
    /// verification (so a stale request costs no probes) and again under the writers' lock,
    /// at the swap itself, so that nothing that lands while the probes run can be overwritten.
    async fn set_backends(
        &self,
        list: &[String],
        verify: bool,
        if_generation: Option<u64>,
    ) -> Result<ControlResult, SwapRefusal> {
        let mut addrs = Vec::with_capacity(list.len());
        for s in list {
            addrs.push(s.parse::<BackendAddr>().map_err(SwapRefusal::Other)?);
        }
        check_backend_list(&addrs).map_err(SwapRefusal::Other)?;
        let mismatch = |current: u64| {
            SwapRefusal::GenerationMismatch(format!(
                "refused, the current set stays: the set in force is at generation {current}, not {} (--if-generation): it changed since it was read; read `lb ctl status` again",
                if_generation.unwrap_or_default()
            ))
        };
        if let Some(n) = if_generation {
            let current = self.shared.current().generation;
            if current != n {
                return Err(mismatch(current));
            }
        }
        let cfg = self.config();
        if verify {
            self.verify(&cfg, &addrs)
                .await
                .map_err(SwapRefusal::Other)?;
        }
        // Set under the writers' lock by the closure when the generation moved meanwhile.
        let mut moved = None;
        let generation = self
            .shared
            .replace(Some(&addrs), None, verify, |p| {
                // `p.generation` is the one the swap would give: the current one plus one.
                let current = p.generation - 1;
                if if_generation.is_some_and(|n| n != current) {
                    moved = Some(current);
                    return Err("generation moved".into());
                }
                self.save(&cfg, p)
            })
            .map_err(|e| match moved {
                Some(current) => mismatch(current),
                None => SwapRefusal::Other(format!("refused, the current set stays: {e}")),
            })?;
        if let Some(c) = &self.shared.cache {
            c.count_flush(FlushReason::Swap);
        }
        self.checker.wake();
        tracing::info!(
            "backend set replaced: generation {generation}, backends {}{}",
            join(&addrs),
            if verify { " (verified)" } else { "" }
        );
        Ok(ControlResult::Done {
            generation,
            message: format!("now serving from {}", join(&addrs)),
        })
    }

    /// `lb ctl probe`: the health probe from here against any address, zone by zone, within
    /// `health.verify_timeout_ms` per query.
    async fn probe(
        &self,
        backend: &str,
        zones: &[String],
        tcp: bool,
    ) -> Result<ControlResult, String> {
        let addr: BackendAddr = backend.parse()?;
        let cfg = self.config();
        let zones: Vec<String> = if zones.is_empty() {
            cfg.health.zones.clone()
        } else {
            zones.to_vec()
        };
        if zones.is_empty() {
            return Err("no zone to probe: name one (--zone) or set [health] zones".into());
        }
        let timeout = Duration::from_millis(cfg.health.verify_timeout_ms);
        let mut report = ProbeReport {
            backend: addr.to_string(),
            zones: Vec::with_capacity(zones.len()),
        };
        for zone in &zones {
            let name = crate::wire::encode_name(zone)?;
            let serial = probe::probe_zone(addr.0, &name, None, tcp, timeout)
                .await
                .map_err(|e| format!("backend {addr} failed the probe: {e}"))?;
            report.zones.push(ZoneSerial {
                zone: probe::zone_to_text(&name),
                serial,
            });
        }
        Ok(ControlResult::Probe(report))
    }

    /// `lb ctl query`: standard queries from here to any address, pipelined over TCP; each
    /// answer within `health.verify_timeout_ms` of the last.
    async fn query(&self, backend: &str, queries: &[String]) -> Result<ControlResult, String> {
        let addr: BackendAddr = backend.parse()?;
        let mut msgs = Vec::with_capacity(queries.len());
        for (k, hex) in queries.iter().enumerate() {
            let m = crate::wire::from_hex(hex)
                .ok_or_else(|| format!("query {}: not hexadecimal", k + 1))?;
            let h = crate::wire::header(&m).map_err(|_| format!("query {}: too short", k + 1))?;
            let q =
                crate::wire::question(&m).map_err(|_| format!("query {}: no question", k + 1))?;
            // Questions only: no UPDATE or NOTIFY from the lb's address, no zone transfer.
            if h.qr
                || crate::wire::opcode(&m) != 0
                || h.qdcount != 1
                || matches!(q.qtype, 251 | 252)
            {
                return Err(format!(
                    "query {}: only standard queries with one question (no zone transfer) are sent",
                    k + 1
                ));
            }
            msgs.push(m);
        }
        let timeout = Duration::from_millis(self.config().health.verify_timeout_ms);
        let answers = probe::ask_tcp(addr.0, &msgs, timeout)
            .await
            .map_err(|e| format!("backend {addr}: {e}"))?;
        Ok(ControlResult::Answers(AnswersReport {
            backend: addr.to_string(),
            answers: answers.iter().map(|a| crate::wire::to_hex(a)).collect(),
        }))
    }

    /// Probes every listed backend concurrently; all must pass before the deadline.
    async fn verify(&self, cfg: &LbConfig, addrs: &[BackendAddr]) -> Result<(), String> {
        let h = &cfg.health;
        if h.zones.is_empty() {
            return Err("--verify needs zones to probe: set [health] zones in the config".into());
        }
        let zones = h.zone_names();
        let deadline = Duration::from_millis(h.verify_timeout_ms);
        let probes = addrs.iter().map(|a| {
            let zones = zones.clone();
            let (min_serial, tcp) = (h.min_serial, h.tcp);
            let addr = a.0;
            tokio::spawn(async move {
                let r = probe::probe_backend(addr, &zones, min_serial, tcp, deadline).await;
                (addr, r)
            })
        });
        let all = futures_join(probes.collect()).await;
        let mut failures = Vec::new();
        for (addr, r) in all {
            if let Err(e) = r {
                failures.push(format!("backend {addr} failed verification: {e}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "refused, the current set stays: {}",
                failures.join("; ")
            ))
        }
    }

    fn set_drain(&self, backend: &str, drain: bool) -> Result<ControlResult, String> {
        let addr: BackendAddr = backend.parse()?;
        let cfg = self.config();
        let generation = self.shared.with_write_lock(|set| {
            let b = set
                .find(addr.0)
                .ok_or_else(|| format!("backend {addr} is not in the current set"))?;
            let mut drained: Vec<BackendAddr> = set
                .backends
                .iter()
                .filter(|b| b.state.is_draining() && b.addr != addr.0)
                .map(|b| BackendAddr(b.addr))
                .collect();
            if drain {
                drained.push(addr);
            }
            let pending = PendingSet {
                generation: set.generation,
                backends: set.addrs(),
                drained,
            };
            // Durable first, as for a swap: a restart must not undo what was acknowledged.
            self.save(&cfg, &pending)
                .map_err(|e| format!("refused, nothing changed: {e}"))?;
            b.state.set_draining(drain);
            Ok::<u64, String>(set.generation)
        })?;
        let verb = if drain { "draining" } else { "undrained" };
        tracing::info!("backend {addr} {verb}");
        Ok(ControlResult::Done {
            generation,
            message: format!("backend {addr} {verb}"),
        })
    }

    /// Re-reads the config. Refused whole (the running config stays) if it is invalid or
    /// changes a part fixed at start. The backend list is taken from the file only if the
    /// file's `backends.servers` changed since it was last loaded, so a reload never reverts a
    /// swap made through the control socket.
    pub fn reload(&self) -> Result<(u64, String), ReloadError> {
        let r = self.try_reload();
        self.shared.stats.reloads.record(&r);
        r
    }

    fn try_reload(&self) -> Result<(u64, String), ReloadError> {
        let (new, deprecations) = LbConfig::read_noting(&self.config_path)
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        // Old key names still load; say so on every reload until the file is fixed (logged
        // here, and in the answer `lb ctl reload` prints when the reload is done).
        let mut warnings = String::new();
        for d in &deprecations {
            tracing::warn!("{d}");
            warnings.push_str(&format!("; warning: {d}"));
        }
        let old = self.config();
        let mut fixed = Vec::new();
        if new.listen != old.listen {
            fixed.push("[listen]");
        }
        if new.udp != old.udp {
            fixed.push("[udp]");
        }
        if new.tcp != old.tcp {
            fixed.push("[tcp]");
        }
        if new.control != old.control {
            fixed.push("[control]");
        }
        if new.metrics != old.metrics {
            fixed.push("[metrics]");
        }
        if new.backends.max_in_flight != old.backends.max_in_flight {
            fixed.push("backends.max_in_flight");
        }
        if new.backends.upstream_sockets != old.backends.upstream_sockets
            || new.backends.upstream_socket_queries != old.backends.upstream_socket_queries
        {
            fixed.push("backends.upstream_sockets/upstream_socket_queries");
        }
        if new.rrl.entries != old.rrl.entries {
            fixed.push("rrl.entries");
        }
        if new.cache != old.cache {
            fixed.push("[cache]");
        }
        if !fixed.is_empty() {
            return Err(ReloadError::RestartNeeded {
                changed: fixed.join(", "),
                path: self.config_path.display().to_string(),
            });
        }
        let params = SetParams::from_config(&new);
        let list_changed = new.backends.servers != old.backends.servers;
        // Unchanged list: keep the one in force when the swap happens (under the writers'
        // lock), so a set-backends that lands meanwhile is not undone.
        let servers = list_changed.then_some(new.backends.servers.as_slice());
        let mut kept = Vec::new();
        let generation = self
            .shared
            .replace(servers, Some(params), false, |p| {
                kept.clone_from(&p.backends);
                self.save(&new, p)
            })
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        if let Some(c) = &self.shared.cache {
            c.count_flush(FlushReason::Reload);
        }
        self.checker.reconfigure(&new.health);
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
        self.checker.wake();
        let msg = format!(
            "reloaded {}: generation {generation}, backends {}{}",
            self.config_path.display(),
            join(&kept),
            if list_changed {
                " (from the file)"
            } else {
                " (kept)"
            }
        );
        tracing::info!("{msg}");
        Ok((generation, msg + &warnings))
    }

    /// Writes the state file if one is configured (the upgrade's last save before it hands
    /// over); returns a note for the reply on failure.
    fn persist(&self, cfg: &LbConfig) -> String {
        let Some(path) = &cfg.control.state_file else {
            return String::new();
        };
        let st = self.runtime_state(cfg);
        let r = state::save(path, &st);
        self.shared.stats.state_writes.record(&r);
        match r {
            Ok(()) => String::new(),
            Err(e) => {
                tracing::warn!("cannot write state file {}: {e}", path.display());
                format!(" (warning: state file {} not written: {e})", path.display())
            }
        }
    }

    /// Writes the set about to be stored to the state file, if one is configured.
    fn save(&self, cfg: &LbConfig, p: &PendingSet) -> Result<(), String> {
        let Some(path) = &cfg.control.state_file else {
            return Ok(());
        };
        let st = RuntimeState::new(
            p.generation,
            p.backends.clone(),
            p.drained.clone(),
            cfg.backends.servers.clone(),
        );
        let r = state::save(path, &st);
        self.shared.stats.state_writes.record(&r);
        r.map_err(|e| {
            tracing::warn!("cannot write state file {}: {e}", path.display());
            format!("cannot write state file {}: {e}", path.display())
        })
    }
}

/// Why `set-backends` was refused: the generation check apart, since the client acts on it
/// ([`Refusal::GenerationMismatch`]).
#[derive(Debug, thiserror::Error)]
enum SwapRefusal {
    #[error("{0}")]
    GenerationMismatch(String),
    #[error("{0}")]
    Other(String),
}

fn join(addrs: &[BackendAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn futures_join<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `set-backends --if-generation N` swaps only at generation N; at any other it is refused
    /// with its own kind, and the set in force stays.
    #[test]
    fn a_swap_at_another_generation_is_refused_and_changes_nothing() {
        let text = "[listen]\nudp = [\"127.0.0.1:5353\"]\ntcp = [\"127.0.0.1:5353\"]\n[backends]\nservers = [\"127.0.0.1:5301\"]\n";
        let cfg = LbConfig::parse(text, Path::new("lb.toml")).unwrap();
        let params = SetParams::from_config(&cfg);
        let shared = Arc::new(Shared::new(params, &cfg.backends.servers, 1, 64));
        let ctx = ControlContext::new(
            Arc::clone(&shared),
            PathBuf::from("lb.toml"),
            cfg,
            Arc::new(Lifecycle::default()),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let swap = |backend: &str, if_generation| {
            rt.block_on(ctx.handle(
                ControlCommand::SetBackends {
                    backends: vec![backend.into()],
                    verify: false,
                    if_generation,
                },
                Caller::PROCESS,
            ))
        };
        let ok = swap("127.0.0.1:5302", Some(1));
        assert!(ok.ok, "{ok:?}");
        assert_eq!(shared.current().generation, 2);
        // A client that read generation 1 before that swap is refused: nothing changes.
        let stale = swap("127.0.0.1:5303", Some(1));
        assert!(!stale.ok);
        assert_eq!(stale.refusal, Some(Refusal::GenerationMismatch));
        let msg = stale.error.unwrap();
        assert!(
            msg.contains("generation 2, not 1") && msg.contains("current set stays"),
            "{msg}"
        );
        assert_eq!(
            swap("127.0.0.1:5303", Some(9)).refusal,
            Some(Refusal::GenerationMismatch)
        );
        let now = shared.current();
        assert_eq!(now.generation, 2);
        assert_eq!(now.addrs(), vec!["127.0.0.1:5302".parse().unwrap()]);
        // Without the condition, as before.
        assert!(swap("127.0.0.1:5303", None).ok);
        assert_eq!(shared.current().generation, 3);
        // Other refusals keep no kind.
        let bad = swap("not-an-address", Some(3));
        assert!(!bad.ok && bad.refusal.is_none(), "{bad:?}");
    }

    #[test]
    fn only_root_may_upgrade_to_a_binary_of_its_choice() {
        let dir = std::env::temp_dir().join(format!("lb-upgrade-binary-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("lb");
        std::fs::write(&exe, b"binary").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        let other = "/tmp/evil";
        let user = Caller { uid: Some(1000) };
        let nobody_knows = Caller { uid: None };
        let root = Caller { uid: Some(0) };
        assert_eq!(upgrade_binary(other, &exe, root), Ok(PathBuf::from(other)));
        assert_eq!(
            upgrade_binary(exe.to_str().unwrap(), &exe, user),
            Ok(exe.clone())
        );
        // A link to this lb's binary is allowed, but the binary itself is what starts.
        assert_eq!(
            upgrade_binary(link.to_str().unwrap(), &exe, user),
            Ok(exe.clone())
        );
        for caller in [user, nobody_knows] {
            let e = upgrade_binary(other, &exe, caller).unwrap_err();
            assert!(e.contains("only root") && e.contains("uid"), "{e}");
        }
        assert!(Caller::PROCESS.is_root());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
