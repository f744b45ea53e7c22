//! The control socket server: status, atomic backend swaps (optionally verified), drain,
//! reload. Everything here runs off the per-packet path; a change is built as a new snapshot
//! and stored whole (see [`crate::backend::Shared::replace`]).
//!
//! The socket is a local Unix socket with mode 0660 (root and the service's group); remote
//! deployers reach it through SSH running `lb ctl`. Hostile or broken clients are bounded: a
//! request line is at most [`MAX_REQUEST_BYTES`], must arrive within [`REQUEST_TIMEOUT`], and
//! at most [`MAX_CLIENTS`] clients are served at once.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify, Semaphore};

use crate::backend::{SetParams, Shared};
use crate::config::{check_backend_list, BackendAddr, LbConfig};
use crate::control_protocol::{
    BackendStatus, ControlCommand, ControlRequest, ControlResponse, ControlResult, StatusReport,
    MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};
use crate::health::{self, AllDown, CheckerSettings};
use crate::state::{self, RuntimeState};
use crate::stats::{DropReason, Proto};
use crate::upgrade::HandoffSockets;

/// Control clients served at once; more get an error and are closed.
pub const MAX_CLIENTS: usize = 32;
/// A request line must arrive within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the control socket with mode 0660, replacing a stale socket file left by a crash but
/// refusing to steal one a live process still answers on.
pub fn bind_control_socket(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use anyhow::Context;
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => anyhow::bail!(
                "control socket {} is in use by another running process",
                path.display()
            ),
            Err(_) => {
                std::fs::remove_file(path).with_context(|| {
                    format!("cannot remove stale control socket {}", path.display())
                })?;
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create directory for control socket {}",
                path.display()
            )
        })?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on control socket {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// What the control plane needs: the shared state and what it was built from.
pub struct ControlContext {
    pub shared: Arc<Shared>,
    pub config_path: PathBuf,
    /// The config in force (last successful load or reload).
    config: Mutex<LbConfig>,
    /// Active checker settings, swapped on reload.
    pub checker: Arc<ArcSwapOption<CheckerSettings>>,
    /// Wakes the checker after a swap so new backends are probed at once.
    pub wake: Arc<Notify>,
    /// What a binary upgrade needs; `None` where upgrades are not possible (tests).
    pub upgrade: Option<Arc<UpgradeHooks>>,
}

/// What `lb ctl upgrade` / SIGUSR2 needs from the running process.
pub struct UpgradeHooks {
    /// Duplicates of every listening socket, handed to the new process.
    pub sockets: HandoffSockets,
    /// This binary's path as started (a replaced file at that path is the new binary).
    pub exe: PathBuf,
    pub log_json: bool,
    /// Stops accepting (control included) as soon as the new process serves.
    pub stop_tx: watch::Sender<bool>,
    /// Notified once the new process has taken over.
    pub done: Notify,
    /// PID of the process that took over (0 while none).
    pub new_pid: AtomicU32,
    in_progress: AtomicBool,
}

impl UpgradeHooks {
    pub fn new(
        sockets: HandoffSockets,
        exe: PathBuf,
        log_json: bool,
        stop_tx: watch::Sender<bool>,
    ) -> Self {
        UpgradeHooks {
            sockets,
            exe,
            log_json,
            stop_tx,
            done: Notify::new(),
            new_pid: AtomicU32::new(0),
            in_progress: AtomicBool::new(false),
        }
    }
}

impl ControlContext {
    pub fn new(shared: Arc<Shared>, config_path: PathBuf, config: LbConfig) -> Self {
        let checker = Arc::new(ArcSwapOption::from_pointee(CheckerSettings::from_config(
            &config.health,
        )));
        ControlContext {
            shared,
            config_path,
            config: Mutex::new(config),
            checker,
            wake: Arc::new(Notify::new()),
            upgrade: None,
        }
    }

    /// Enables `upgrade`.
    pub fn with_upgrade(mut self, hooks: UpgradeHooks) -> Self {
        self.upgrade = Some(Arc::new(hooks));
        self
    }

    /// The current backend set as persisted state.
    fn runtime_state(&self, cfg: &LbConfig) -> RuntimeState {
        self.shared.with_write_lock(|set| {
            RuntimeState::new(
                set.generation,
                set.backends.iter().map(|b| BackendAddr(b.addr)).collect(),
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
    /// success starts this process's shutdown. On failure this process keeps serving.
    pub async fn upgrade(&self, binary: Option<String>) -> Result<ControlResult, String> {
        let h = self
            .upgrade
            .as_ref()
            .ok_or_else(|| "upgrades are not available in this process".to_string())?;
        if h.in_progress.swap(true, Ordering::AcqRel) {
            return Err("an upgrade is already in progress".into());
        }
        let cfg = self.config();
        let binary = binary.map(PathBuf::from).unwrap_or_else(|| h.exe.clone());
        let handoff = match &cfg.control.socket {
            Some(s) => s.with_extension("upgrade"),
            None => std::env::temp_dir().join(format!("lb-upgrade-{}.sock", std::process::id())),
        };
        let _ = self.persist(&cfg);
        let st = self.runtime_state(&cfg);
        let generation = st.generation;
        let hooks = Arc::clone(h);
        let config_path = self.config_path.clone();
        let bin2 = binary.clone();
        tracing::info!("upgrade: starting {}", binary.display());
        let r = tokio::task::spawn_blocking(move || {
            crate::upgrade::hand_over(
                &bin2,
                &config_path,
                hooks.log_json,
                &handoff,
                &hooks.sockets,
                st,
            )
        })
        .await
        .unwrap_or_else(|e| Err(format!("upgrade task failed: {e}")));
        match r {
            Ok(pid) => {
                tracing::info!(
                    "upgrade: pid {pid} serves now; this process (pid {}) drains and exits",
                    std::process::id()
                );
                h.new_pid.store(pid, Ordering::Release);
                let _ = h.stop_tx.send(true);
                h.done.notify_one();
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
                h.in_progress.store(false, Ordering::Release);
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

    /// Handles one command.
    pub async fn handle(&self, cmd: ControlCommand) -> ControlResponse {
        let t0 = std::time::Instant::now();
        let r = match cmd {
            ControlCommand::Status => Ok(ControlResult::Status(self.status())),
            ControlCommand::SetBackends { backends, verify } => {
                self.set_backends(&backends, verify).await
            }
            ControlCommand::Drain { backend } => self.set_drain(&backend, true),
            ControlCommand::Undrain { backend } => self.set_drain(&backend, false),
            ControlCommand::Reload => {
                self.reload()
                    .map(|(generation, message)| ControlResult::Done {
                        generation,
                        message,
                    })
            }
            ControlCommand::Upgrade { binary } => self.upgrade(binary).await,
        };
        let mut resp = match r {
            Ok(res) => ControlResponse::ok(res),
            Err(e) => ControlResponse::error(e),
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
                        reason: (reason != health::ProbeFailure::None)
                            .then(|| reason.as_str().to_string()),
                        in_flight: s.outstanding() as u64,
                        queries: s.queries.load(Ordering::Relaxed),
                        answers: s.answers.load(Ordering::Relaxed),
                        timeouts: s.timeouts.load(Ordering::Relaxed),
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
            swaps: st.swaps.load(Ordering::Relaxed),
            tcp_connections_open: st.tcp_open.load(Ordering::Relaxed),
            pid: std::process::id(),
        }
    }

    async fn set_backends(&self, list: &[String], verify: bool) -> Result<ControlResult, String> {
        let mut addrs = Vec::with_capacity(list.len());
        for s in list {
            addrs.push(s.parse::<BackendAddr>()?);
        }
        check_backend_list(&addrs)?;
        let cfg = self.config();
        if verify {
            self.verify(&cfg, &addrs).await?;
        }
        let generation = self.shared.replace(&addrs, None, verify);
        self.wake.notify_one();
        let persisted = self.persist(&cfg);
        tracing::info!(
            "backend set replaced: generation {generation}, backends {}{}",
            join(&addrs),
            if verify { " (verified)" } else { "" }
        );
        Ok(ControlResult::Done {
            generation,
            message: format!("now serving from {}{persisted}", join(&addrs)),
        })
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
                let r = health::probe_backend(addr, &zones, min_serial, tcp, deadline).await;
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
            b.state.draining.store(drain, Ordering::Relaxed);
            Ok::<u64, String>(set.generation)
        })?;
        let persisted = self.persist(&cfg);
        let verb = if drain { "draining" } else { "undrained" };
        tracing::info!("backend {addr} {verb}");
        Ok(ControlResult::Done {
            generation,
            message: format!("backend {addr} {verb}{persisted}"),
        })
    }

    /// Re-reads the config. Refused whole (the running config stays) if it is invalid or
    /// changes a part fixed at start. The backend list is taken from the file only if the
    /// file's `backends.servers` changed since it was last loaded, so a reload never reverts a
    /// swap made through the control socket.
    pub fn reload(&self) -> Result<(u64, String), String> {
        let new = LbConfig::read(&self.config_path)
            .map_err(|e| format!("reload refused, the running config stays: {e}"))?;
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
        if !fixed.is_empty() {
            return Err(format!(
                "reload refused, the running config stays: {} changed in {}, which only a restart applies",
                fixed.join(", "),
                self.config_path.display()
            ));
        }
        let params = SetParams::from_config(&new);
        let current: Vec<BackendAddr> = self
            .shared
            .current()
            .backends
            .iter()
            .map(|b| BackendAddr(b.addr))
            .collect();
        let list_changed = new.backends.servers != old.backends.servers;
        let servers = if list_changed {
            new.backends.servers.clone()
        } else {
            current
        };
        let generation = self.shared.replace(&servers, Some(params), false);
        self.checker
            .store(CheckerSettings::from_config(&new.health).map(Arc::new));
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
        self.wake.notify_one();
        let persisted = self.persist(&new);
        let msg = format!(
            "reloaded {}: generation {generation}, backends {}{}{persisted}",
            self.config_path.display(),
            join(&servers),
            if list_changed {
                " (from the file)"
            } else {
                " (kept)"
            }
        );
        tracing::info!("{msg}");
        Ok((generation, msg))
    }

    /// Writes the state file if one is configured; returns a note for the reply on failure.
    fn persist(&self, cfg: &LbConfig) -> String {
        let Some(path) = &cfg.control.state_file else {
            return String::new();
        };
        let st = self.runtime_state(cfg);
        match state::save(path, &st) {
            Ok(()) => String::new(),
            Err(e) => {
                tracing::warn!("cannot write state file {}: {e}", path.display());
                format!(" (warning: state file {} not written: {e})", path.display())
            }
        }
    }
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

/// Serves control clients until `stop` turns true.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<ControlContext>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("control accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::server::stopped(&mut stop) => return,
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(async move {
                let mut s = stream;
                let _ = reply(
                    &mut s,
                    &ControlResponse::error("too many control clients at once, try again"),
                )
                .await;
            });
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            handle_client(stream, &ctx).await;
            drop(permit);
        });
    }
}

async fn reply(s: &mut (impl AsyncWriteExt + Unpin), r: &ControlResponse) -> std::io::Result<()> {
    let mut line = serde_json::to_string(r).expect("responses always serialise");
    line.push('\n');
    tokio::time::timeout(REQUEST_TIMEOUT, s.write_all(line.as_bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

/// Serves requests on one connection until EOF, a bad line, or a stall.
async fn handle_client(stream: UnixStream, ctx: &ControlContext) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let mut limited = (&mut rd).take(MAX_REQUEST_BYTES as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
            Err(_) => {
                let _ = reply(&mut wr, &ControlResponse::error("request timed out")).await;
                return;
            }
            Ok(Err(_)) | Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
        }
        if line.len() > MAX_REQUEST_BYTES {
            let _ = reply(
                &mut wr,
                &ControlResponse::error(format!("request longer than {MAX_REQUEST_BYTES} bytes")),
            )
            .await;
            return;
        }
        if line.last() != Some(&b'\n') {
            // EOF in the middle of a line: the client went away.
            return;
        }
        let resp = match serde_json::from_slice::<ControlRequest>(&line) {
            Err(e) => ControlResponse::error(format!("invalid request: {e}")),
            Ok(req) if req.version != PROTOCOL_VERSION => ControlResponse::error(format!(
                "protocol version {} is not supported (this lb speaks {PROTOCOL_VERSION})",
                req.version
            )),
            Ok(req) => ctx.handle(req.request).await,
        };
        if reply(&mut wr, &resp).await.is_err() {
            return;
        }
    }
}
