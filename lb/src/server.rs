//! Binding the listeners, starting the UDP workers and the TCP runtime, and shutting down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::backend::Shared;
use crate::config::LbConfig;
use crate::sockets::{build_tcp_listener, build_udp_listener, BufferSizes};
use crate::tcp::{self, ConnLimits, TcpSettings};
use crate::tcp_backend::PoolSettings;
use crate::udp::{self, UdpControl, UdpSettings};

/// The listening sockets, bound before [`run`] so that tests (and socket activation) can hand
/// them in.
#[derive(Debug)]
pub struct Listeners {
    /// Per UDP worker, one socket per `[listen] udp` address.
    pub udp: Vec<Vec<std::net::UdpSocket>>,
    pub tcp: Vec<std::net::TcpListener>,
}

fn buffers(cfg: &LbConfig) -> BufferSizes {
    BufferSizes {
        recv: cfg.udp.recv_buffer,
        send: cfg.udp.send_buffer,
    }
}

/// Binds every configured address and logs `listening for udp on ADDR` /
/// `listening for tcp on ADDR` with the real (port 0 resolved) address.
pub fn bind_listeners(cfg: &LbConfig) -> Result<Listeners> {
    let workers = cfg.workers();
    let bufs = buffers(cfg);
    let mut udp: Vec<Vec<std::net::UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    for addr in &cfg.listen.udp {
        let first = build_udp_listener(*addr, true, bufs)
            .with_context(|| format!("cannot bind udp {addr}"))?;
        let real: SocketAddr = first.local_addr()?;
        udp[0].push(first);
        for w in udp.iter_mut().skip(1) {
            let s = build_udp_listener(real, true, bufs)
                .with_context(|| format!("cannot bind udp {real} for another worker"))?;
            w.push(s);
        }
        tracing::info!("listening for udp on {real}");
    }
    let mut tcp = Vec::new();
    for addr in &cfg.listen.tcp {
        let l = build_tcp_listener(*addr).with_context(|| format!("cannot bind tcp {addr}"))?;
        tracing::info!("listening for tcp on {}", l.local_addr()?);
        tcp.push(l);
    }
    Ok(Listeners { udp, tcp })
}

fn tcp_settings(cfg: &LbConfig) -> TcpSettings {
    let t = &cfg.tcp;
    TcpSettings {
        max_connections: t.max_connections,
        max_connections_per_ip: t.max_connections_per_ip,
        max_in_flight_per_connection: t.max_in_flight_per_connection,
        idle_timeout: Duration::from_millis(t.idle_timeout_ms),
        read_timeout: Duration::from_millis(t.read_timeout_ms),
        write_timeout: Duration::from_millis(t.write_timeout_ms),
        max_query_size: t.max_query_size,
        pool: PoolSettings {
            connect_timeout: Duration::from_millis(t.connect_timeout_ms),
            idle_timeout: Duration::from_millis(t.backend_idle_timeout_ms),
            write_timeout: Duration::from_millis(t.write_timeout_ms),
            max_in_flight: t.backend_max_in_flight,
        },
    }
}

/// Runs the proxy on already-bound sockets until SIGTERM or SIGINT, then stops reading new
/// queries, answers those in flight (bounded by the query timeout) and returns.
pub fn run(cfg: LbConfig, config_path: PathBuf, listeners: Listeners) -> Result<()> {
    let shared = Arc::new(Shared::new(
        &cfg.backends,
        &cfg.backends.servers,
        cfg.tcp.pool_size,
    ));
    let drain_timeout = cfg.backends.timeout() + Duration::from_millis(100);
    let udp_control = Arc::new(UdpControl::default());
    let udp_settings = UdpSettings {
        max_datagram: cfg.udp.max_datagram,
        max_in_flight: cfg.backends.max_in_flight,
        buffers: buffers(&cfg),
        drain_timeout,
    };
    let workers = udp::spawn_workers(
        listeners.udp,
        Arc::clone(&shared),
        udp_settings,
        Arc::clone(&udp_control),
    )
    .context("cannot start udp workers")?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers().clamp(1, 4))
        .thread_name("lb-rt")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let tcp_set = tcp_settings(&cfg);
    let limits = Arc::new(ConnLimits::default());
    rt.block_on(async {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut servers = Vec::new();
        for l in listeners.tcp {
            let l = tokio::net::TcpListener::from_std(l).context("cannot register tcp listener")?;
            servers.push(tokio::spawn(tcp::serve(
                l,
                Arc::clone(&shared),
                tcp_set,
                Arc::clone(&limits),
                stop_rx.clone(),
            )));
        }
        tracing::info!(
            "lb started: {} udp workers, {} backends, policy {}, config {}",
            workers.len(),
            shared.current().backends.len(),
            shared.current().policy.as_str(),
            config_path.display()
        );
        wait_for_stop_signal().await;
        tracing::info!("shutting down: answering queries in flight");
        let _ = stop_tx.send(true);
        udp_control
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for s in servers {
            let _ = s.await;
        }
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while limits.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(())
    })?;
    for w in workers {
        let _ = w.join();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    tokio::select! {
        _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        _ = async { match int.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
    }
}
