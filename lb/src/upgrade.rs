//! Binary upgrade with no gap: the running `lb` starts a new binary and hands it every
//! listening socket over a Unix socket with `SCM_RIGHTS`, like nginx's USR2 upgrade.
//!
//! Sequence (`lb ctl upgrade` or SIGUSR2):
//! 1. The old process binds a one-shot handoff socket next to the control socket and starts
//!    the new binary with `LB_UPGRADE_SOCKET` pointing at it (same config file).
//! 2. The new process connects, receives a description and the descriptors of every UDP and
//!    TCP listener, the metrics listener and the control listener, and starts on them (it
//!    binds nothing; the backend set comes from the state file the old one keeps current).
//! 3. Once it serves, it writes `ready PID`. Until then the old process never stopped serving;
//!    if the new one fails or is not ready within [`READY_TIMEOUT`], it is killed and the old one
//!    carries on, reporting the failure.
//! 4. The old process stops reading its (shared) sockets, answers what it already forwarded,
//!    finishes its TCP client connections (answered, then closed), and exits.
//!
//! Because both processes hold the very same sockets, no datagram or connection queued in
//! them is lost during the switch.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::state::RuntimeState;

/// How long the new process may take to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The environment variable naming the handoff socket.
pub const ENV_UPGRADE_SOCKET: &str = "LB_UPGRADE_SOCKET";
/// Most descriptors sent in one handoff (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;

/// Duplicates of the listening sockets, kept by the control plane for a handoff.
#[derive(Debug, Default)]
pub struct HandoffSockets {
    pub udp: Vec<OwnedFd>,
    pub tcp: Vec<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
}

/// What the descriptors that follow are, in order, and the runtime backend set to start with
/// (so it carries over even without a state file).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Manifest {
    udp: usize,
    tcp: usize,
    metrics: bool,
    control: bool,
    state: RuntimeState,
}

/// The sockets received from the old process.
#[derive(Debug)]
pub struct Received {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: Vec<std::net::TcpListener>,
    pub metrics: Option<std::net::TcpListener>,
    pub control: Option<std::os::unix::net::UnixListener>,
    /// The old process's backend set at the moment of the handoff.
    pub state: RuntimeState,
    /// Where to report readiness.
    pub stream: UnixStream,
}

/// Sends `bytes` with `fds` attached as one `SCM_RIGHTS` message.
fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u8; space.max(1)];
    let iov = [IoSlice::new(bytes)];
    // SAFETY: msghdr is plain data; every pointer below points into live buffers of the
    // stated lengths for the duration of sendmsg.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != bytes.len() {
            return Err(std::io::Error::other("short write of the handoff manifest"));
        }
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it.
fn recv_with_fds(sock: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut fds = Vec::new();
    // SAFETY: as in send_with_fds; received descriptors are wrapped in OwnedFd at once, so each
    // is closed exactly once.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(std::io::Error::other("handoff descriptors were truncated"));
        }
        n as usize
    };
    buf.truncate(n);
    Ok((buf, fds))
}

/// In the new process: receives the sockets from the old one (`LB_UPGRADE_SOCKET`), if set.
pub fn receive_from_env() -> anyhow::Result<Option<Received>> {
    use anyhow::Context;
    let Some(path) = std::env::var_os(ENV_UPGRADE_SOCKET) else {
        return Ok(None);
    };
    // Children of this process must not try to take over again.
    std::env::remove_var(ENV_UPGRADE_SOCKET);
    let stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot connect to the upgrade handoff socket {}",
            PathBuf::from(&path).display()
        )
    })?;
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let (bytes, mut fds) =
        recv_with_fds(&stream).context("cannot receive the listening sockets")?;
    let m: Manifest = serde_json::from_slice(&bytes).context("invalid handoff manifest")?;
    let want = m.udp + m.tcp + m.metrics as usize + m.control as usize;
    if fds.len() != want {
        anyhow::bail!(
            "handoff sent {} descriptors, the manifest names {want}",
            fds.len()
        );
    }
    let mut rest = fds.split_off(0).into_iter();
    let mut take = || rest.next().expect("counted above");
    let udp = (0..m.udp)
        .map(|_| std::net::UdpSocket::from(take()))
        .collect();
    let tcp = (0..m.tcp)
        .map(|_| std::net::TcpListener::from(take()))
        .collect();
    let metrics = m.metrics.then(|| std::net::TcpListener::from(take()));
    let control = m.control.then(|| UnixListener::from(take()));
    Ok(Some(Received {
        udp,
        tcp,
        metrics,
        control,
        state: m.state,
        stream,
    }))
}

/// In the new process: reports readiness to the old one.
pub fn report_ready(stream: &mut UnixStream) {
    let _ = writeln!(stream, "ready {}", std::process::id());
}

/// In the old process: starts `binary` on `config`, hands it the sockets, and waits for it to
/// report ready. On any failure the new process is killed and the error returned; the caller
/// keeps serving.
pub fn hand_over(
    binary: &Path,
    config: &Path,
    log_json: bool,
    handoff_path: &Path,
    sockets: &HandoffSockets,
    state: RuntimeState,
) -> Result<u32, String> {
    let _ = std::fs::remove_file(handoff_path);
    let listener = UnixListener::bind(handoff_path)
        .map_err(|e| format!("cannot bind handoff socket {}: {e}", handoff_path.display()))?;
    let cleanup = |child: Option<&mut Child>| {
        let _ = std::fs::remove_file(handoff_path);
        if let Some(c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    let mut cmd = Command::new(binary);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .args(["--log-format", if log_json { "json" } else { "text" }])
        .env(ENV_UPGRADE_SOCKET, handoff_path)
        .stdin(Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            cleanup(None);
            return Err(format!("cannot start {}: {e}", binary.display()));
        }
    };
    let started = Instant::now();
    let _ = listener.set_nonblocking(true);
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) => {
                if let Ok(Some(status)) = child.try_wait() {
                    cleanup(None);
                    return Err(format!(
                        "new process {} exited before taking over ({status})",
                        binary.display()
                    ));
                }
                if started.elapsed() >= READY_TIMEOUT {
                    cleanup(Some(&mut child));
                    return Err(format!(
                        "new process {} did not connect within {READY_TIMEOUT:?}",
                        binary.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let _ = stream.set_nonblocking(false);
    let mut fds: Vec<RawFd> = Vec::new();
    fds.extend(sockets.udp.iter().map(|f| f.as_raw_fd()));
    fds.extend(sockets.tcp.iter().map(|f| f.as_raw_fd()));
    fds.extend(sockets.metrics.iter().map(|f| f.as_raw_fd()));
    fds.extend(sockets.control.iter().map(|f| f.as_raw_fd()));
    if fds.len() > MAX_FDS {
        cleanup(Some(&mut child));
        return Err(format!(
            "{} sockets are more than one handoff carries ({MAX_FDS})",
            fds.len()
        ));
    }
    let manifest = Manifest {
        udp: sockets.udp.len(),
        tcp: sockets.tcp.len(),
        metrics: sockets.metrics.is_some(),
        control: sockets.control.is_some(),
        state,
    };
    let bytes = serde_json::to_vec(&manifest).expect("manifest serialises");
    if let Err(e) = send_with_fds(&stream, &bytes, &fds) {
        cleanup(Some(&mut child));
        return Err(format!("cannot hand the sockets over: {e}"));
    }
    let left = READY_TIMEOUT
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    let _ = stream.set_read_timeout(Some(left));
    let mut line = String::new();
    let _ = BufReader::new(&stream).read_line(&mut line);
    let pid = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    match pid {
        Some(pid) if pid == child.id() => {
            let _ = std::fs::remove_file(handoff_path);
            // The new process outlives this one; do not wait for it.
            std::mem::forget(child);
            Ok(pid)
        }
        _ => {
            let status = child.try_wait().ok().flatten();
            cleanup(Some(&mut child));
            Err(match status {
                Some(s) => format!("new process exited before it was ready ({s})"),
                None => {
                    format!("new process was not ready within {READY_TIMEOUT:?}; it was stopped")
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_a_unix_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        send_with_fds(&a, b"{\"x\":1}", &[udp.as_raw_fd()]).unwrap();
        let (bytes, fds) = recv_with_fds(&b).unwrap();
        assert_eq!(bytes, b"{\"x\":1}");
        assert_eq!(fds.len(), 1);
        let got = std::net::UdpSocket::from(fds.into_iter().next().unwrap());
        assert_eq!(
            got.local_addr().unwrap(),
            addr,
            "the same socket, not a copy"
        );
    }
}
