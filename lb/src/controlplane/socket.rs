//! The control socket server: one newline-delimited JSON request per line
//! ([`crate::control_protocol`]), each handled by [`ControlContext::handle`].
//!
//! The socket is a local Unix socket with mode 0660 (root and the service's group); remote
//! deployers reach it through SSH running `lb ctl`. Each connection's peer credentials
//! (`SO_PEERCRED`) say who sent its commands: only root may upgrade to a binary of its choice
//! ([`crate::controlplane::commands::Caller`]). Hostile or broken clients are bounded: a
//! request line is at most [`MAX_REQUEST_BYTES`], must arrive within [`REQUEST_TIMEOUT`], and
//! at most [`MAX_CLIENTS`] clients are served at once.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::control_protocol::{
    ControlRequest, ControlResponse, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};
use crate::controlplane::commands::{Caller, ControlContext};
use crate::lifecycle::Lifecycle;

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

/// Serves control clients until the process stops.
pub async fn serve(listener: UnixListener, ctx: Arc<ControlContext>, lifecycle: Arc<Lifecycle>) {
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
            _ = lifecycle.stopped() => return,
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
    let caller = Caller {
        uid: stream.peer_cred().ok().map(|c| c.uid()),
    };
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
            Ok(req) => ctx.handle(req.request, caller).await,
        };
        if reply(&mut wr, &resp).await.is_err() {
            return;
        }
    }
}
