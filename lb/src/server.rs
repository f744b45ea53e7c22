//! Binding the listeners, starting the UDP workers and the TCP runtime, and shutting down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::backend::{SetParams, Shared};
use crate::cache::PacketCache;
use crate::config::{BackendAddr, LbConfig};
use crate::controlplane::commands::{Caller, ControlContext, UpgradeHooks};
use crate::controlplane::upgrade::{self, HandoffSockets};
use crate::controlplane::{metrics, rrl_watch, socket};
use crate::dataplane::tcp::{self, TcpFrontend, TcpSettings};
use crate::dataplane::tcp_pool::PoolSettings;
use crate::dataplane::transfer::TransferSettings;
use crate::dataplane::udp::{self, UdpSettings};
use crate::dataplane::upstream::UpstreamSettings;
use crate::lifecycle::Lifecycle;
use crate::sockets::{build_tcp_listener, build_udp_listener, BufferSizes};
use crate::state;
use crate::systemd::{self, Heartbeats};

/// The listening sockets, bound before [`run`] so that tests (and socket activation) can hand
/// them in.
#[derive(Debug)]
pub struct Listeners {
    /// Per UDP worker, its sockets: one per `[listen] udp` address (or more, when there are
    /// more sockets of an address than workers).
    pub udp: Vec<Vec<std::net::UdpSocket>>,
    pub tcp: Vec<std::net::TcpListener>,
    /// The `/metrics` endpoint, if configured.
    pub metrics: Option<std::net::TcpListener>,
    /// The control socket, if configured.
    pub control: Option<std::os::unix::net::UnixListener>,
    /// Set when the sockets came from an upgrading process: where to report readiness, and the
    /// backend set it handed over.
    pub handoff: Option<(std::os::unix::net::UnixStream, crate::state::RuntimeState)>,
    /// The UDP sockets of each address are an `SO_REUSEPORT` group whose first member is the
    /// socket systemd passed (lb.socket), which systemd keeps open across restarts: a stop
    /// that hands over to no new process steers the groups' new datagrams to it.
    pub systemd_group: bool,
}

/// Options of [`run`] that do not come from the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Logs are JSON (passed on to the new process of an upgrade).
    pub log_json: bool,
}

/// Which sockets each worker reads, for `count` sockets of one address and `workers`
/// workers: per worker, indices into the address's sockets. Socket k goes to worker
/// k % workers; with fewer sockets than workers the other workers share them (worker w reads
/// socket w % count too), so every worker reads every address and every socket is read.
fn spread_over_workers(count: usize, workers: usize) -> Vec<Vec<usize>> {
    let mut plan = vec![Vec::new(); workers];
    if count == 0 || workers == 0 {
        return plan;
    }
    for w in 0..count.max(workers) {
        plan[w % workers].push(w % count);
    }
    plan
}

/// Gives the sockets of one address to the workers as [`spread_over_workers`] says.
fn assign_to_workers(
    socks: Vec<std::net::UdpSocket>,
    udp: &mut [Vec<std::net::UdpSocket>],
) -> Result<()> {
    for (w, picks) in spread_over_workers(socks.len(), udp.len())
        .into_iter()
        .enumerate()
    {
        for k in picks {
            udp[w].push(
                socks[k]
                    .try_clone()
                    .context("cannot duplicate a udp socket")?,
            );
        }
    }
    Ok(())
}

/// The UDP sockets grouped by the address they are bound to, in the order first seen.
fn by_address(
    socks: Vec<std::net::UdpSocket>,
) -> Result<Vec<(SocketAddr, Vec<std::net::UdpSocket>)>> {
    let mut groups: Vec<(SocketAddr, Vec<std::net::UdpSocket>)> = Vec::new();
    for s in socks {
        let a = s
            .local_addr()
            .context("a udp socket has no local address")?;
        match groups.iter_mut().find(|(g, _)| *g == a) {
            Some((_, v)) => v.push(s),
            None => groups.push((a, vec![s])),
        }
    }
    Ok(groups)
}

/// Builds [`Listeners`] from sockets handed over by an upgrading `lb`: every socket of each
/// address (the old workers' whole `SO_REUSEPORT` group), spread over this process's workers.
fn listeners_from_handoff(workers: usize, r: upgrade::Received) -> Result<Listeners> {
    let mut udp: Vec<Vec<std::net::UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    let count = r.udp.len();
    for (addr, socks) in by_address(r.udp)? {
        tracing::info!("listening for udp on {addr}");
        if r.systemd_group {
            // A previous process may have steered the group on a stop that was then taken
            // over; spreading again is harmless when nothing is attached.
            if let Err(e) = crate::sockets::spread_group(&socks[0]) {
                tracing::warn!("udp {addr}: cannot spread datagrams over the workers again: {e}");
            }
        }
        assign_to_workers(socks, &mut udp)?;
    }
    for l in &r.tcp {
        tracing::info!("listening for tcp on {}", l.local_addr()?);
    }
    if let Some(m) = &r.metrics {
        tracing::info!("listening for metrics on {}", m.local_addr()?);
    }
    tracing::info!(
        "took over {count} udp, {} tcp sockets from the previous process",
        r.tcp.len()
    );
    Ok(Listeners {
        udp,
        tcp: r.tcp,
        metrics: r.metrics,
        control: r.control,
        handoff: Some((r.stream, r.state)),
        systemd_group: r.systemd_group,
    })
}

fn buffers(cfg: &LbConfig) -> BufferSizes {
    BufferSizes {
        recv: cfg.udp.recv_buffer_bytes,
        send: cfg.udp.send_buffer_bytes,
    }
}

/// Warns once per address when its sockets got smaller buffers than `[udp]` asks for: the
/// kernel caps what an unprivileged process sets at `net.core.rmem_max`/`wmem_max`.
fn note_buffers(addr: SocketAddr, socks: &[std::net::UdpSocket], bufs: BufferSizes) {
    let (mut recv, mut send) = (usize::MAX, usize::MAX);
    for s in socks {
        let (r, w) = crate::sockets::effective_buffers(s);
        recv = recv.min(r);
        send = send.min(w);
    }
    if recv < bufs.recv {
        tracing::warn!(
            "udp {addr}: udp.recv_buffer_bytes = {} but a socket got {recv} bytes: raise the \
             sysctl net.core.rmem_max to at least {}",
            bufs.recv,
            bufs.recv
        );
    }
    if send < bufs.send {
        tracing::warn!(
            "udp {addr}: udp.send_buffer_bytes = {} but a socket got {send} bytes: raise the \
             sysctl net.core.wmem_max to at least {}",
            bufs.send,
            bufs.send
        );
    }
}

/// Under socket activation: makes the UDP sockets systemd passed for `addr` an
/// `SO_REUSEPORT` group with (at least) one member per worker, systemd's first, binding the
/// missing members, so that the workers read sockets of their own as when lb binds [listen]
/// itself. Returns the group and whether lb added members. If it cannot (see
/// [`systemd::adopt_socket`] and [`crate::sockets::join_reuseport_group`]), it says why and
/// returns systemd's sockets alone, which the workers then share.
fn complete_group(
    addr: SocketAddr,
    mut passed: Vec<std::net::UdpSocket>,
    workers: usize,
    bufs: BufferSizes,
) -> (Vec<std::net::UdpSocket>, bool) {
    for s in &passed {
        crate::sockets::raise_buffers(s, bufs);
    }
    let from_systemd = passed.len();
    let missing = workers.saturating_sub(from_systemd);
    if missing == 0 {
        return (passed, false);
    }
    let joined = || -> Result<Vec<std::net::UdpSocket>> {
        for s in &passed {
            systemd::adopt_socket(s).context("cannot make it lb's")?;
            crate::sockets::ensure_reuse_port(s).context("cannot set SO_REUSEPORT on it")?;
        }
        (0..missing)
            .map(|_| {
                crate::sockets::join_reuseport_group(&passed[0], bufs)
                    .context("cannot bind another socket next to it")
            })
            .collect()
    };
    match joined() {
        Ok(more) => {
            // A previous lb's stop steered the group to systemd's socket: spread it again.
            if let Err(e) = crate::sockets::spread_group(&passed[0]) {
                tracing::warn!("udp {addr}: cannot spread datagrams over the workers again: {e}");
            }
            passed.extend(more);
            tracing::info!(
                "udp {addr}: one SO_REUSEPORT socket per worker ({from_systemd} passed by systemd, \
                 {missing} bound by lb)"
            );
            (passed, true)
        }
        Err(e) => {
            tracing::warn!(
                "udp {addr}: the socket systemd passed: {e:#}; the {workers} udp workers share \
                 {from_systemd} socket(s) instead of one each"
            );
            (passed, false)
        }
    }
}

/// Binds every configured address and logs `listening for udp on ADDR` /
/// `listening for tcp on ADDR` with the real (port 0 resolved) address.
///
/// With socket activation (`LISTEN_FDS`), the passed sockets are used instead of `[listen]`,
/// each UDP one completed into an `SO_REUSEPORT` group with a socket per worker
/// ([`complete_group`]). `CAP_CHOWN`, which lb.service grants for that, is given up before
/// this returns, whatever the path.
pub fn bind_listeners(cfg: &LbConfig) -> Result<Listeners> {
    let listeners = bind_all(cfg);
    match systemd::drop_chown_capability() {
        Ok(true) => tracing::debug!("gave up CAP_CHOWN"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot give up CAP_CHOWN: {e}"),
    }
    listeners
}

/// True if binding `addr` failed only because this host has no IPv6 (booted with
/// `ipv6.disable=1`, or a unit's `RestrictAddressFamilies=` without `AF_INET6`).
fn no_ipv6(addr: &SocketAddr, e: &std::io::Error) -> bool {
    addr.is_ipv6() && e.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

fn bind_all(cfg: &LbConfig) -> Result<Listeners> {
    let workers = cfg.workers();
    if let Some(r) = upgrade::receive_from_env()? {
        return listeners_from_handoff(workers, r);
    }
    // The control socket is bound last: once its file exists every DNS socket is bound, so a
    // script that waits for it (the Ansible role in local mode) can query at once.
    let bind_control = || match &cfg.control.socket {
        Some(p) => socket::bind_control_socket(p).map(Some),
        None => Ok(None),
    };
    let bufs = buffers(cfg);
    let mut udp: Vec<Vec<std::net::UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    let metrics = match cfg.metrics.listen {
        Some(addr) => {
            let l = metrics::bind(addr)?;
            tracing::info!("listening for metrics on {}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    if let Some(inh) = systemd::inherited_sockets()? {
        tracing::info!(
            "using {} udp and {} tcp sockets passed by systemd instead of [listen]",
            inh.udp.len(),
            inh.tcp.len()
        );
        let mut systemd_group = false;
        for (addr, passed) in by_address(inh.udp)? {
            let (socks, grown) = complete_group(addr, passed, workers, bufs);
            systemd_group |= grown;
            note_buffers(addr, &socks, bufs);
            assign_to_workers(socks, &mut udp)?;
            tracing::info!("listening for udp on {addr}");
        }
        for l in &inh.tcp {
            tracing::info!("listening for tcp on {}", l.local_addr()?);
        }
        return Ok(Listeners {
            udp,
            tcp: inh.tcp,
            metrics,
            control: bind_control()?,
            handoff: None,
            systemd_group,
        });
    }
    // Skipping an IPv6 address is fine as long as the list keeps one to serve on.
    let all_skipped = |proto: &str, addr: SocketAddr, e: std::io::Error| {
        Err(e).with_context(|| {
            format!("cannot bind {proto} {addr}, and no other [listen] {proto} address could be")
        })
    };
    let mut skipped = None;
    for addr in &cfg.listen.udp {
        let first = match build_udp_listener(*addr, true, bufs) {
            Ok(s) => s,
            Err(e) if no_ipv6(addr, &e) => {
                tracing::warn!("not listening for udp on {addr}: this host has no IPv6 ({e})");
                skipped = Some((*addr, e));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot bind udp {addr}")),
        };
        let real: SocketAddr = first.local_addr()?;
        let mut group = vec![first];
        for _ in 1..workers {
            let s = build_udp_listener(real, true, bufs)
                .with_context(|| format!("cannot bind udp {real} for another worker"))?;
            group.push(s);
        }
        note_buffers(real, &group, bufs);
        assign_to_workers(group, &mut udp)?;
        tracing::info!("listening for udp on {real}");
    }
    if let Some((addr, e)) = skipped.take() {
        if udp.iter().all(Vec::is_empty) {
            return all_skipped("udp", addr, e);
        }
    }
    let mut tcp = Vec::new();
    for addr in &cfg.listen.tcp {
        let l = match build_tcp_listener(*addr) {
            Ok(l) => l,
            Err(e) if no_ipv6(addr, &e) => {
                tracing::warn!("not listening for tcp on {addr}: this host has no IPv6 ({e})");
                skipped = Some((*addr, e));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot bind tcp {addr}")),
        };
        tracing::info!("listening for tcp on {}", l.local_addr()?);
        tcp.push(l);
    }
    if let Some((addr, e)) = skipped {
        if tcp.is_empty() {
            return all_skipped("tcp", addr, e);
        }
    }
    Ok(Listeners {
        udp,
        tcp,
        metrics,
        control: bind_control()?,
        handoff: None,
        systemd_group: false,
    })
}

fn tcp_settings(cfg: &LbConfig) -> TcpSettings {
    let t = &cfg.tcp;
    TcpSettings {
        max_connections: t.max_connections,
        max_connections_per_prefix: t.max_connections_per_prefix,
        ipv4_prefix_length: t.ipv4_prefix_length,
        ipv6_prefix_length: t.ipv6_prefix_length,
        max_in_flight_per_connection: t.max_in_flight_per_connection,
        idle_timeout: Duration::from_millis(t.idle_timeout_ms),
        read_timeout: Duration::from_millis(t.read_timeout_ms),
        write_timeout: Duration::from_millis(t.write_timeout_ms),
        max_connection_age: (t.max_connection_age_ms > 0)
            .then(|| Duration::from_millis(t.max_connection_age_ms)),
        max_queries_per_connection: (t.max_queries_per_connection > 0)
            .then_some(t.max_queries_per_connection),
        max_queued_per_connection: t.max_queued_per_connection_bytes,
        max_queued_total: t.max_queued_bytes,
        max_query_size: t.max_query_size_bytes,
        pool: PoolSettings {
            size: t.pool_size,
            connect_timeout: Duration::from_millis(t.connect_timeout_ms),
            idle_timeout: Duration::from_millis(t.backend_idle_timeout_ms),
            write_timeout: Duration::from_millis(t.write_timeout_ms),
            max_in_flight: t.backend_max_in_flight,
        },
        transfer: TransferSettings {
            connect_timeout: Duration::from_millis(t.connect_timeout_ms),
            write_timeout: Duration::from_millis(t.write_timeout_ms),
            idle_timeout: Duration::from_millis(t.backend_idle_timeout_ms),
            timeout: Duration::from_millis(t.transfer_timeout_ms),
            max_size: t.max_transfer_size_bytes,
        },
    }
}

/// Chooses the starting backend list: the state file's (a restart never reverts a deploy)
/// unless it is missing, corrupt, or the config's list was edited since it was written.
/// Returns (servers, generation, drained).
fn initial_backends(
    cfg: &LbConfig,
    handed: Option<&state::RuntimeState>,
) -> (Vec<BackendAddr>, u64, Vec<BackendAddr>) {
    if let Some(st) = handed {
        tracing::info!(
            "backend set (generation {}) handed over by the previous process",
            st.generation
        );
        return (st.backends.clone(), st.generation, st.drained.clone());
    }
    let from_config = (cfg.backends.servers.clone(), 1, Vec::new());
    let Some(path) = &cfg.control.state_file else {
        return from_config;
    };
    match state::load(path) {
        Ok(None) => from_config,
        Ok(Some(st)) if st.config_servers != cfg.backends.servers => {
            tracing::info!(
                "backends.servers changed in the config since {} was written: using the config's list",
                path.display()
            );
            (cfg.backends.servers.clone(), st.generation + 1, Vec::new())
        }
        Ok(Some(st)) => {
            tracing::info!(
                "backend set (generation {}) restored from {}",
                st.generation,
                path.display()
            );
            (st.backends, st.generation, st.drained)
        }
        Err(e) => {
            tracing::warn!("{e}; using the config's backend list");
            from_config
        }
    }
}

/// Runs the proxy on already-bound sockets until SIGTERM or SIGINT (or an upgrade handed the
/// sockets over), then stops reading new queries, answers those in flight (bounded by the
/// query timeout) and returns. SIGHUP reloads the config like `lb ctl reload`.
pub fn run(
    cfg: LbConfig,
    config_path: PathBuf,
    listeners: Listeners,
    opts: RunOptions,
) -> Result<()> {
    let mut listeners = listeners;
    let handoff = listeners.handoff.take();
    let (servers, generation, drained) = initial_backends(&cfg, handoff.as_ref().map(|h| &h.1));
    // Generation 0 means "no set yet" to the workers' route tables and the cache's epochs: a
    // state file or hand-over saying 0 (hand-written, or corrupt) starts at 1.
    let generation = generation.max(1);
    let shared = Arc::new(
        Shared::new(
            SetParams::from_config(&cfg),
            &servers,
            generation,
            cfg.rrl.entries,
        )
        .with_cache(PacketCache::new(&cfg.cache)),
    );
    match cfg.cache_zones_note() {
        Some((note, true)) => tracing::warn!("{note}"),
        Some((note, false)) => tracing::info!("{note}"),
        None => {}
    }
    for b in &shared.current().backends {
        if drained.contains(&BackendAddr(b.addr)) {
            b.state.set_draining(true);
        }
    }
    let drain_timeout = cfg.backends.timeout() + Duration::from_millis(100);
    let control_listener = listeners.control.take();
    let sockets = Arc::new(handoff_duplicates(&listeners, control_listener.as_ref())?);
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("lb"));
    let lifecycle = Arc::new(Lifecycle::default());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers().clamp(1, 4))
        .thread_name("lb-rt")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let beats = Arc::new(Heartbeats::new(listeners.udp.len()));
    let udp_settings = UdpSettings {
        max_datagram: cfg.udp.max_datagram_bytes,
        upstream: UpstreamSettings {
            sockets: cfg.backends.upstream_sockets,
            socket_queries: cfg.backends.upstream_socket_queries,
            max_in_flight: cfg.backends.max_in_flight,
            max_datagram: cfg.udp.max_datagram_bytes,
            buffers: buffers(&cfg),
        },
        drain_timeout,
    };
    let tcp_settings = tcp_settings(&cfg);
    let ctx = Arc::new(
        ControlContext::new(
            Arc::clone(&shared),
            config_path.clone(),
            cfg,
            Arc::clone(&lifecycle),
        )
        .with_upgrade(UpgradeHooks {
            sockets: Arc::clone(&sockets),
            exe,
            log_json: opts.log_json,
        }),
    );
    let (workers, frontend) = rt.block_on(async {
        let _guard = rt.enter();
        // One probe round before serving, so health is known from the first query.
        ctx.checker.probe_round(&shared).await;
        tokio::spawn(Arc::clone(&ctx.checker).run(Arc::clone(&shared)));
        tokio::spawn(rrl_watch::run(Arc::clone(&shared), Arc::clone(&lifecycle)));
        let workers = udp::spawn_workers(
            listeners.udp,
            Arc::clone(&shared),
            udp_settings,
            Arc::clone(&lifecycle),
            Arc::clone(&beats),
        )
        .context("cannot start udp workers")?;
        let frontend = Arc::new(TcpFrontend::new(
            Arc::clone(&shared),
            tcp_settings,
            Arc::clone(&lifecycle),
        ));
        let mut servers = Vec::new();
        for l in listeners.tcp {
            let l = tokio::net::TcpListener::from_std(l).context("cannot register tcp listener")?;
            servers.push(tokio::spawn(tcp::serve(l, Arc::clone(&frontend))));
        }
        if let Some(l) = listeners.metrics {
            let l =
                tokio::net::TcpListener::from_std(l).context("cannot register metrics listener")?;
            tokio::spawn(metrics::serve(
                l,
                Arc::clone(&shared),
                Arc::clone(&lifecycle),
            ));
        }
        if let Some(l) = control_listener {
            let l =
                tokio::net::UnixListener::from_std(l).context("cannot register control socket")?;
            tokio::spawn(socket::serve(l, Arc::clone(&ctx), Arc::clone(&lifecycle)));
        }
        let set = shared.current();
        tracing::info!(
            "lb started: {} udp workers, generation {}, backends {}, policy {}, config {}",
            workers.len(),
            set.generation,
            set.backends
                .iter()
                .map(|b| format!("{} ({})", b.addr, b.state.state_name()))
                .collect::<Vec<_>>()
                .join(", "),
            set.policy.as_str(),
            config_path.display()
        );
        match handoff {
            // Under systemd the old process makes this one the main PID before it exits.
            Some((mut stream, _)) => upgrade::report_ready(&mut stream),
            None => systemd::notify_ready(),
        }
        tokio::spawn(systemd::run_watchdog(Arc::clone(&beats)));
        wait_for_stop_signal(&ctx).await;
        match lifecycle.successor() {
            Some(pid) => systemd::notify_main_pid(pid),
            None => {
                systemd::notify_stopping();
                if sockets.systemd_group {
                    steer_to_systemd(&sockets.udp);
                }
            }
        }
        tracing::info!("shutting down: answering queries in flight");
        lifecycle.stop();
        for s in servers {
            let _ = s.await;
        }
        let handed_over = lifecycle.successor().is_some();
        wait_for_clients(&frontend, &shared, drain_timeout, handed_over).await;
        anyhow::Ok((workers, frontend))
    })?;
    drop(frontend);
    for w in workers {
        let _ = w.join();
    }
    if lifecycle.successor().is_none() {
        // After an upgrade the socket file belongs to the new process.
        if let Some(p) = &ctx.config().control.socket {
            let _ = std::fs::remove_file(p);
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Waits for the TCP client connections to finish what they were sent: up to `drain_timeout`
/// for queries, and, after an upgrade handed the sockets over, for every zone transfer in
/// progress too (each bounded by `tcp.transfer_timeout_ms`), so that an upgrade never cuts an
/// AXFR. A SIGTERM stop does not wait for transfers: systemd's `TimeoutStopSec` would kill
/// the process first.
async fn wait_for_clients(
    frontend: &TcpFrontend,
    shared: &Shared,
    drain_timeout: Duration,
    handed_over: bool,
) {
    let start = tokio::time::Instant::now();
    let mut deadline = start + drain_timeout;
    let transfers_end = start + frontend.settings.transfer.timeout;
    let mut waited_for_transfers = false;
    while frontend.limits.open() > 0 {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let transfers = shared.stats.transfers_active.load(Ordering::Relaxed);
            if !(handed_over && transfers > 0 && now < transfers_end) {
                break;
            }
            if !waited_for_transfers {
                tracing::info!("waiting for {transfers} zone transfer(s) in progress");
                waited_for_transfers = true;
            }
            // A transfer counts until its last message is written; then its connection gets
            // one write timeout more to close.
            deadline = now + frontend.settings.write_timeout;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Duplicates of every listening socket, kept for a later upgrade's hand-over: each UDP
/// socket once, even when several workers read it.
fn handoff_duplicates(
    listeners: &Listeners,
    control: Option<&std::os::unix::net::UnixListener>,
) -> Result<HandoffSockets> {
    let dup = |fd: std::io::Result<std::os::fd::OwnedFd>| {
        fd.context("cannot duplicate a listening socket")
    };
    let mut udp = Vec::new();
    let mut seen = Vec::new();
    for s in listeners.udp.iter().flatten() {
        // Duplicates of one socket share its inode.
        let st = rustix::fs::fstat(s).context("cannot inspect a udp socket")?;
        if !seen.contains(&(st.st_dev, st.st_ino)) {
            seen.push((st.st_dev, st.st_ino));
            udp.push(dup(s.try_clone().map(Into::into))?);
        }
    }
    Ok(HandoffSockets {
        udp,
        tcp: listeners
            .tcp
            .iter()
            .map(|s| dup(s.try_clone().map(Into::into)))
            .collect::<Result<_>>()?,
        metrics: listeners
            .metrics
            .as_ref()
            .map(|s| dup(s.try_clone().map(Into::into)))
            .transpose()?,
        control: control
            .map(|s| dup(s.try_clone().map(Into::into)))
            .transpose()?,
        systemd_group: listeners.systemd_group,
    })
}

/// On a stop with no successor under socket activation: from now on the kernel delivers the
/// UDP groups' datagrams to systemd's socket only, where they wait for the next lb, instead
/// of to this process's own sockets, which close when it exits. The workers then read what
/// their sockets had queued once (`dataplane::udp`) and answer it before exiting.
fn steer_to_systemd(udp: &[std::os::fd::OwnedFd]) {
    let mut failed = None;
    for fd in udp {
        if let Err(e) = crate::sockets::steer_group_to_first(fd) {
            failed = Some(e);
        }
    }
    match failed {
        None => tracing::info!("new udp queries wait in systemd's sockets for the next lb"),
        Some(e) => tracing::warn!(
            "cannot steer new udp queries to systemd's sockets ({e}): those that arrive in \
             this process's own sockets until it exits are lost"
        ),
    }
}

/// Waits for SIGTERM or SIGINT, or for an upgrade to have handed over; SIGHUP in the meantime
/// reloads the config and SIGUSR2 upgrades to the binary at this one's path.
async fn wait_for_stop_signal(ctx: &Arc<ControlContext>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = ctx.lifecycle.stopped() => return,
            _ = hup.recv() => {
                match ctx.reload() {
                    Ok(_) => systemd::notify_reloaded(),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            _ = usr2.recv() => {
                let ctx = Arc::clone(ctx);
                tokio::spawn(async move {
                    if let Err(e) = ctx.upgrade(None, Caller::PROCESS).await {
                        tracing::warn!("{e}");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spread_over_workers;

    #[test]
    fn every_worker_reads_every_address_and_every_socket_is_read() {
        // One socket per worker: each its own.
        assert_eq!(spread_over_workers(3, 3), [vec![0], vec![1], vec![2]]);
        // Fewer sockets (systemd's alone): shared, round-robin.
        assert_eq!(spread_over_workers(1, 3), [vec![0], vec![0], vec![0]]);
        assert_eq!(spread_over_workers(2, 3), [vec![0], vec![1], vec![0]]);
        // More sockets (a hand-over to fewer workers): some read two.
        assert_eq!(spread_over_workers(5, 2), [vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(spread_over_workers(0, 2), [Vec::<usize>::new(), Vec::new()]);
    }
}
