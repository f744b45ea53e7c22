//! Passing file descriptors between processes over a Unix socket (`SCM_RIGHTS`).
//!
//! The control-message buffers are built by rustix, which aligns them for `cmsghdr` and wraps
//! every received descriptor in an [`OwnedFd`] at once, so each is closed exactly once and no
//! hand-written pointer arithmetic is involved.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 250;
/// Largest payload [`recv_with_fds`] accepts.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Sends `bytes` with `fds` attached, as one message.
pub fn send_with_fds(
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!(
            "{} descriptors are more than one message carries ({MAX_FDS})",
            fds.len()
        )));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    let n = sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::empty(),
    )?;
    if n != bytes.len() {
        return Err(std::io::Error::other(
            "short write of a descriptor-passing message",
        ));
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it (blocking, per the socket's
/// timeouts). Refuses a message whose descriptors or payload did not fit.
pub fn recv_with_fds(sock: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(std::io::Error::other("passed descriptors were truncated"));
    }
    if msg.flags.contains(ReturnFlags::TRUNC) {
        return Err(std::io::Error::other(format!(
            "descriptor-passing message longer than {MAX_PAYLOAD} bytes"
        )));
    }
    buf.truncate(msg.bytes);
    Ok((buf, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_unix_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send_with_fds(&a, b"{\"x\":1}", &[udp.as_fd(), tcp.as_fd()]).unwrap();
        let (bytes, fds) = recv_with_fds(&b).unwrap();
        assert_eq!(bytes, b"{\"x\":1}");
        assert_eq!(fds.len(), 2);
        let mut it = fds.into_iter();
        let got = std::net::UdpSocket::from(it.next().unwrap());
        assert_eq!(
            got.local_addr().unwrap(),
            udp.local_addr().unwrap(),
            "the same socket"
        );
        let got = std::net::TcpListener::from(it.next().unwrap());
        assert_eq!(got.local_addr().unwrap(), tcp.local_addr().unwrap());
    }

    #[test]
    fn a_message_without_descriptors_and_too_many_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(&a, b"plain", &[]).unwrap();
        let (bytes, fds) = recv_with_fds(&b).unwrap();
        assert_eq!((bytes.as_slice(), fds.len()), (&b"plain"[..], 0));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let many = vec![udp.as_fd(); MAX_FDS + 1];
        assert!(send_with_fds(&a, b"x", &many).is_err());
    }
}
