//! Building the listening and upstream sockets with the options the proxy needs.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer sizes to request (0 keeps the system default).
#[derive(Debug, Clone, Copy)]
pub struct BufferSizes {
    pub recv: usize,
    pub send: usize,
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

fn set_buffers(s: &Socket, bufs: BufferSizes) {
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer is not fatal, so a
    // refusal is ignored (the Ansible role raises the sysctls).
    if bufs.recv > 0 {
        let _ = s.set_recv_buffer_size(bufs.recv);
    }
    if bufs.send > 0 {
        let _ = s.set_send_buffer_size(bufs.send);
    }
}

/// A non-blocking UDP listener. With `reuseport`, several workers can bind the same address
/// and the kernel spreads clients over them.
pub fn build_udp_listener(
    addr: SocketAddr,
    reuseport: bool,
    bufs: BufferSizes,
) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(domain(&addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if reuseport {
        s.set_reuse_port(true)?;
    }
    set_buffers(&s, bufs);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Makes a UDP socket report the local address each datagram was sent to (`IP_PKTINFO`, or
/// `IPV6_RECVPKTINFO` for IPv6), so that answers can leave from it. Needed on sockets bound to
/// a wildcard address only.
pub fn enable_pktinfo(sock: &impl AsFd, ipv6: bool) -> io::Result<()> {
    let (level, name) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let on: libc::c_int = 1;
    // SAFETY: the option value is a live c_int and its exact size is passed; the descriptor
    // is borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking TCP listener.
pub fn build_tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(domain(&addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A non-blocking UDP socket connected to one backend, on a kernel-chosen (random) port.
///
/// Being connected, the kernel delivers only datagrams from the backend's address and port:
/// that is the answer's source-address check, before the ID and question are compared.
pub fn build_upstream_udp(
    backend: SocketAddr,
    bufs: BufferSizes,
) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(domain(&backend), Type::DGRAM, Some(Protocol::UDP))?;
    let local: SocketAddr = match backend.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    set_buffers(&s, bufs);
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    s.connect(&backend.into())?;
    Ok(s.into())
}
