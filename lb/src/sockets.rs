//! Building the listening and upstream sockets with the options the proxy needs, and the
//! `SO_REUSEPORT` groups the UDP listeners form (one member per worker).

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5) and `SO_DETACH_REUSEPORT_BPF` (Linux 5.8), from
/// `asm-generic/socket.h`; the `libc` crate does not export them for every target.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

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
    set_option(sock, level, name, &(1 as libc::c_int))
}

/// `setsockopt(level, name, value)` with a plain-data value of its exact size.
fn set_option<T: Copy>(
    sock: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live, initialised `T` (plain data: Copy) and its exact size is
    // passed; the descriptor is borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts a bound UDP socket (one systemd passed) in a position to head an `SO_REUSEPORT`
/// group: sets `SO_REUSEPORT` if the unit did not (`ReusePort=yes`). Linux lets a socket bound
/// without it take it afterwards; the group is formed when a second socket binds next to it,
/// with this one as its first member.
pub fn ensure_reuse_port(sock: &std::net::UdpSocket) -> io::Result<()> {
    let s = SockRef::from(sock);
    if !s.reuse_port()? {
        s.set_reuse_port(true)?;
    }
    Ok(())
}

/// A new member of the `SO_REUSEPORT` group `first` belongs to (a socket systemd passed): a
/// UDP socket bound to the same address, with the options the kernel requires to match
/// (`IPV6_V6ONLY`, the bound device) or the bind needs (`IP_FREEBIND`, as `FreeBind=yes`)
/// copied from `first`, and `bufs` applied.
///
/// The kernel also requires both sockets to belong to the same user (the socket's owner, not
/// the process's): see [`crate::systemd::adopt_socket`] for systemd's, created by root.
pub fn join_reuseport_group(
    first: &std::net::UdpSocket,
    bufs: BufferSizes,
) -> io::Result<std::net::UdpSocket> {
    let first = SockRef::from(first);
    let addr = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    let s = Socket::new(domain(&addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(first.only_v6()?)?;
        s.set_freebind_v6(first.freebind_v6()?)?;
    } else {
        s.set_freebind_v4(first.freebind_v4()?)?;
    }
    if let Some(device) = first.device()? {
        s.bind_device(Some(&device))?;
    }
    s.set_reuse_port(true)?;
    set_buffers(&s, bufs);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Raises the buffers of a socket created by someone else (systemd) to `bufs`, never lowering
/// them: systemd's `ReceiveBuffer=` may have forced more than `net.core.rmem_max` allows lb.
pub fn raise_buffers(sock: &std::net::UdpSocket, bufs: BufferSizes) {
    let (recv, send) = effective_buffers(sock);
    let s = SockRef::from(sock);
    if recv < bufs.recv {
        let _ = s.set_recv_buffer_size(bufs.recv);
    }
    if send < bufs.send {
        let _ = s.set_send_buffer_size(bufs.send);
    }
}

/// The buffer sizes a socket has, as they were asked for: Linux reports twice the size set
/// (the bookkeeping overhead), so half of what `SO_RCVBUF`/`SO_SNDBUF` read back.
pub fn effective_buffers(sock: &impl AsFd) -> (usize, usize) {
    let s = SockRef::from(sock);
    (
        s.recv_buffer_size().unwrap_or(0) / 2,
        s.send_buffer_size().unwrap_or(0) / 2,
    )
}

/// Makes the kernel deliver every new datagram for the `SO_REUSEPORT` group `sock` belongs to
/// to the group's first member (a classic BPF program returning index 0), instead of spreading
/// them by the hash of their addresses.
///
/// Used when an lb started by socket activation stops without a successor: the first member
/// is systemd's socket, which outlives lb and is passed to the next one, so what arrives
/// during the stop waits there instead of in a socket about to be closed.
pub fn steer_group_to_first(sock: &impl AsFd) -> io::Result<()> {
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the program during the call.
    set_option(sock, libc::SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

/// Removes a program [`steer_group_to_first`] attached to `sock`'s group, so the kernel
/// spreads datagrams over every member again; no program attached is fine.
pub fn spread_group(sock: &impl AsFd) -> io::Result<()> {
    match set_option(
        sock,
        libc::SOL_SOCKET,
        SO_DETACH_REUSEPORT_BPF,
        &(0 as libc::c_int),
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    /// Sends `n` datagrams to `to`, each from a new socket (a new source port, so a new hash),
    /// and counts what each of `socks` received.
    fn spread_counts(socks: &[&UdpSocket], to: SocketAddr, n: usize) -> Vec<usize> {
        for _ in 0..n {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(b"x", to).unwrap();
        }
        let mut buf = [0u8; 16];
        socks
            .iter()
            .map(|s| {
                s.set_nonblocking(true).unwrap();
                let mut k = 0;
                while s.recv(&mut buf).is_ok() {
                    k += 1;
                }
                k
            })
            .collect()
    }

    #[test]
    fn members_join_a_socket_bound_without_reuseport_and_steering_moves_traffic_to_it() {
        let bufs = BufferSizes {
            recv: 150_000,
            send: 0,
        };
        // As systemd without ReusePort=yes: bound first, the option set afterwards.
        let first = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = first.local_addr().unwrap();
        assert!(join_reuseport_group(&first, bufs).is_err());
        ensure_reuse_port(&first).unwrap();
        let b = join_reuseport_group(&first, bufs).unwrap();
        let c = join_reuseport_group(&first, bufs).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
        assert_eq!(effective_buffers(&b).0, 150_000);
        // Spread by hash: with 96 source ports, the chance that the two new members get
        // nothing is 3^-96.
        let n = spread_counts(&[&first, &b, &c], addr, 96);
        assert_eq!(n.iter().sum::<usize>(), 96);
        assert!(n[1] + n[2] > 0, "{n:?}");
        // Steered (through any member): everything to the first member.
        steer_group_to_first(&c).unwrap();
        assert_eq!(spread_counts(&[&first, &b, &c], addr, 96), [96, 0, 0]);
        // Spread again; a second removal finds nothing to remove, which is fine.
        spread_group(&first).unwrap();
        spread_group(&first).unwrap();
        let n = spread_counts(&[&first, &b, &c], addr, 96);
        assert!(n[1] + n[2] > 0, "{n:?}");
    }

    #[test]
    fn raise_buffers_never_lowers() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Below the default net.core.[rw]mem_max (212992), so no host caps them.
        SockRef::from(&s).set_recv_buffer_size(150_000).unwrap();
        SockRef::from(&s).set_send_buffer_size(50_000).unwrap();
        raise_buffers(
            &s,
            BufferSizes {
                recv: 100_000,
                send: 120_000,
            },
        );
        assert_eq!(effective_buffers(&s), (150_000, 120_000));
    }
}
