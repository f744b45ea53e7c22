//! Batched datagram I/O with `recvmmsg(2)` and `sendmmsg(2)`.
//!
//! One system call moves up to [`MAX_BATCH`] datagrams, and a batch of datagrams to the same
//! peer wakes that peer once instead of once per datagram, which on loopback is charged to the
//! sender. Buffers are allocated once and sized for the worst case; the kernel only touches the
//! pages a datagram lands in, so the resident size follows the real datagram sizes.
//!
//! The header arrays the kernel reads (`mmsghdr`, `iovec`) hold raw pointers into the buffers;
//! they are rebuilt on the stack for every call, so the batches themselves own plain data only
//! and can never hold a dangling pointer.
//!
//! On a socket bound to a wildcard address, the address each datagram was sent to comes with
//! it (`IP_PKTINFO` / `IPV6_PKTINFO`, [`LocalAddr`]), and an answer is sent back from that very
//! address: otherwise the kernel would pick the source by routing and a client that asked a
//! second address of the host would get an answer from another one, and reject it. The control
//! messages live in [`CmsgSpace`] buffers aligned for `cmsghdr`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Most datagrams moved by one system call.
pub const MAX_BATCH: usize = 32;

/// The local address a datagram arrived on (and the interface), for the reply's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr {
    pub ip: IpAddr,
    pub ifindex: u32,
}

/// Room for one `IP_PKTINFO` or `IPV6_PKTINFO` control message, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgSpace([u8; 64]);

impl Default for CmsgSpace {
    fn default() -> Self {
        CmsgSpace([0; 64])
    }
}

/// Datagrams received by one `recvmmsg` call.
#[derive(Default)]
pub struct RecvBatch {
    data: Box<[u8]>,
    slot_len: usize,
    addrs: Box<[libc::sockaddr_storage]>,
    lens: [usize; MAX_BATCH],
    truncated: [bool; MAX_BATCH],
    /// Control buffers, when the socket reports each datagram's local address.
    control: Box<[CmsgSpace]>,
    locals: [Option<LocalAddr>; MAX_BATCH],
    count: usize,
}

impl RecvBatch {
    /// Room for [`MAX_BATCH`] datagrams of at most `slot_len` bytes each.
    pub fn new(slot_len: usize) -> RecvBatch {
        RecvBatch {
            data: vec![0u8; slot_len * MAX_BATCH].into_boxed_slice(),
            slot_len,
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid (AF_UNSPEC) value.
            addrs: vec![unsafe { zeroed::<libc::sockaddr_storage>() }; MAX_BATCH]
                .into_boxed_slice(),
            lens: [0; MAX_BATCH],
            truncated: [false; MAX_BATCH],
            control: Box::default(),
            locals: [None; MAX_BATCH],
            count: 0,
        }
    }

    /// Like [`new`](Self::new), and also reads each datagram's local address (the socket must
    /// have [`crate::sockets::enable_pktinfo`]).
    pub fn with_local_addrs(slot_len: usize) -> RecvBatch {
        RecvBatch {
            control: vec![CmsgSpace::default(); MAX_BATCH].into_boxed_slice(),
            ..RecvBatch::new(slot_len)
        }
    }

    /// Receives up to [`MAX_BATCH`] datagrams from non-blocking socket `fd` without waiting.
    /// Returns how many arrived; fewer than [`MAX_BATCH`] means the queue was empty.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.count = 0;
        // An empty (default) batch has no room; it exists only as a placeholder.
        let slots = self.addrs.len().min(MAX_BATCH);
        if slots == 0 {
            return Ok(0);
        }
        // SAFETY: both arrays are plain data for which all zeroes is valid.
        let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        let base = self.data.as_mut_ptr();
        for i in 0..slots {
            iovs[i].iov_base = base.wrapping_add(i * self.slot_len).cast();
            iovs[i].iov_len = self.slot_len;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if let Some(c) = self.control.get_mut(i) {
                h.msg_control = c.0.as_mut_ptr().cast();
                h.msg_controllen = c.0.len() as _;
            }
        }
        // SAFETY: every header points at a live iovec of this frame and at this batch's own
        // slot, address and control buffers, each as long as the length given; the kernel
        // writes at most those lengths and the arrays outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                slots as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = (h.msg_len as usize).min(self.slot_len);
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.locals[i] = if self.control.is_empty() {
                None
            } else {
                local_addr_of(&h.msg_hdr)
            };
        }
        self.count = n;
        Ok(n)
    }

    /// Datagram `i` (below what the last [`recv`](Self::recv) returned): its bytes (writable,
    /// for the ID rewrite), whether it was longer than the slot, and its source address (None
    /// for a family other than IPv4/IPv6).
    pub fn get_mut(&mut self, i: usize) -> (&mut [u8], bool, Option<SocketAddr>) {
        debug_assert!(i < self.count);
        let start = i * self.slot_len;
        let msg = &mut self.data[start..start + self.lens[i]];
        (msg, self.truncated[i], from_storage(&self.addrs[i]))
    }

    /// The local address datagram `i` was sent to (only with
    /// [`with_local_addrs`](Self::with_local_addrs)).
    pub fn local(&self, i: usize) -> Option<LocalAddr> {
        self.locals[i]
    }
}

/// The `IP_PKTINFO` / `IPV6_PKTINFO` control message of a received message, if any.
fn local_addr_of(h: &libc::msghdr) -> Option<LocalAddr> {
    if h.msg_control.is_null() || h.msg_controllen < size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: the header's control pointer and length describe one of this batch's aligned
    // control buffers as the kernel filled it; CMSG_FIRSTHDR/CMSG_NXTHDR stay within that
    // length and CMSG_DATA points inside a message whose length the kernel set; the payload is
    // read unaligned into a plain-data struct after its type and length are checked.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let len = (*c).cmsg_len as usize;
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO)
                    if len >= libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize =>
                {
                    let pi: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                    return Some(LocalAddr {
                        ip: IpAddr::V4(Ipv4Addr::from(pi.ipi_addr.s_addr.to_ne_bytes())),
                        ifindex: pi.ipi_ifindex as u32,
                    });
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                    if len >= libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize =>
                {
                    let pi: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                    return Some(LocalAddr {
                        ip: IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)),
                        ifindex: pi.ipi6_ifindex,
                    });
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Writes the control message that makes a datagram leave from `local` into `space`; returns
/// its length.
fn write_pktinfo(local: &LocalAddr, space: &mut CmsgSpace) -> usize {
    // SAFETY: a msghdr describing `space` (aligned for cmsghdr, 64 bytes, more than
    // CMSG_SPACE of either payload) is built only so CMSG_FIRSTHDR can locate the first header
    // inside it; the header and payload are written within CMSG_SPACE(payload) bytes.
    unsafe {
        let mut h: libc::msghdr = zeroed();
        h.msg_control = space.0.as_mut_ptr().cast();
        h.msg_controllen = space.0.len() as _;
        let c = libc::CMSG_FIRSTHDR(&h);
        match local.ip {
            IpAddr::V4(ip) => {
                let payload = size_of::<libc::in_pktinfo>() as u32;
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
                let pi = libc::in_pktinfo {
                    // Routing picks the interface; the source is the address the query reached.
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), pi);
                libc::CMSG_SPACE(payload) as usize
            }
            IpAddr::V6(ip) => {
                let payload = size_of::<libc::in6_pktinfo>() as u32;
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    // The arrival interface: required for link-local addresses.
                    ipi6_ifindex: local.ifindex,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), pi);
                libc::CMSG_SPACE(payload) as usize
            }
        }
    }
}

/// One queued datagram of a [`SendBatch`].
#[derive(Clone, Copy)]
struct Queued {
    start: usize,
    len: usize,
    /// The datagram's address is in `addrs` (false: the socket's connected peer).
    has_addr: bool,
    /// Leave from this local address (wildcard listeners).
    local: Option<LocalAddr>,
    tag: u32,
}

/// Datagrams queued for one socket, sent together by [`SendBatch::flush`].
pub struct SendBatch {
    data: Vec<u8>,
    queued: Vec<Queued>,
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: [libc::socklen_t; MAX_BATCH],
    /// Per message of a flush: the control message naming its source address, if it has one.
    control: Box<[CmsgSpace]>,
}

/// What happened to one queued datagram.
pub type Sent<'a> = (u32, &'a [u8], io::Result<()>);

impl SendBatch {
    /// Room for [`MAX_BATCH`] datagrams of at most `max_len` bytes each (reserved, not
    /// touched: the resident size follows what is queued).
    pub fn new(max_len: usize) -> SendBatch {
        SendBatch {
            data: Vec::with_capacity(max_len * MAX_BATCH),
            queued: Vec::with_capacity(MAX_BATCH),
            // SAFETY: as in RecvBatch::new.
            addrs: vec![unsafe { zeroed::<libc::sockaddr_storage>() }; MAX_BATCH]
                .into_boxed_slice(),
            addr_lens: [0; MAX_BATCH],
            control: vec![CmsgSpace::default(); MAX_BATCH].into_boxed_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// True when the next datagram of `len` bytes must wait for a flush.
    pub fn is_full(&self, len: usize) -> bool {
        self.queued.len() == MAX_BATCH || self.data.len() + len > self.data.capacity()
    }

    /// Queues a datagram (to `dest`, or to the connected peer when None) with a caller's
    /// `tag` that [`flush`](Self::flush) reports back. The caller checks
    /// [`is_full`](Self::is_full) first; a datagram that does not fit is refused (false).
    pub fn push(&mut self, msg: &[u8], dest: Option<SocketAddr>, tag: u32) -> bool {
        self.push_from(msg, dest, None, tag)
    }

    /// Like [`push`](Self::push), with the local address the datagram must leave from.
    pub fn push_from(
        &mut self,
        msg: &[u8],
        dest: Option<SocketAddr>,
        local: Option<LocalAddr>,
        tag: u32,
    ) -> bool {
        if self.is_full(msg.len()) {
            return false;
        }
        let i = self.queued.len();
        if let Some(d) = dest {
            self.addr_lens[i] = to_storage(&d, &mut self.addrs[i]);
        }
        self.queued.push(Queued {
            start: self.data.len(),
            len: msg.len(),
            has_addr: dest.is_some(),
            local,
            tag,
        });
        self.data.extend_from_slice(msg);
        true
    }

    /// Sends everything queued on non-blocking socket `fd` and reports each datagram's fate
    /// to `done` in order. A datagram the kernel refuses is reported with its error and
    /// skipped; the rest are still sent. Leaves the batch empty; returns the system calls made.
    pub fn flush(&mut self, fd: RawFd, mut done: impl FnMut(Sent<'_>)) -> usize {
        let total = self.queued.len();
        let mut next = 0;
        let mut calls = 0;
        while next < total {
            calls += 1;
            let n = total - next;
            // SAFETY: plain data, all zeroes valid.
            let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
            let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
            for k in 0..n {
                let q = self.queued[next + k];
                iovs[k].iov_base = self.data[q.start..].as_ptr() as *mut libc::c_void;
                iovs[k].iov_len = q.len;
                let h = &mut hdrs[k].msg_hdr;
                if q.has_addr {
                    h.msg_name = (&self.addrs[next + k] as *const libc::sockaddr_storage) as *mut _;
                    h.msg_namelen = self.addr_lens[next + k];
                }
                h.msg_iov = &mut iovs[k];
                h.msg_iovlen = 1;
                if let Some(local) = &q.local {
                    let c = &mut self.control[k];
                    let len = write_pktinfo(local, c);
                    h.msg_control = c.0.as_mut_ptr().cast();
                    h.msg_controllen = len as _;
                }
            }
            // SAFETY: the headers point at this frame's iovecs, which point into `data`
            // within its length, at this batch's addresses and at this frame's control
            // buffers; the kernel only reads them during the call.
            let r = unsafe {
                libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if r <= 0 {
                // Zero would mean no progress; it counts as the first datagram failing.
                let e = if r < 0 {
                    io::Error::last_os_error()
                } else {
                    io::Error::from(io::ErrorKind::WriteZero)
                };
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first datagram failed: report it and go on with the next.
                let q = self.queued[next];
                done((q.tag, &self.data[q.start..q.start + q.len], Err(e)));
                next += 1;
                continue;
            }
            let sent = (r as usize).min(n);
            for q in &self.queued[next..next + sent] {
                done((q.tag, &self.data[q.start..q.start + q.len], Ok(())));
            }
            next += sent;
        }
        self.queued.clear();
        self.data.clear();
        calls
    }
}

/// Writes `addr` as a C socket address; returns its length.
fn to_storage(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a C socket address the kernel filled in.
fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is aligned
            // and large enough for it.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn address_round_trip() {
        for a in [
            "127.0.0.1:53",
            "192.0.2.200:65535",
            "[::1]:5300",
            "[2001:db8::1%3]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: plain data.
            let mut s: libc::sockaddr_storage = unsafe { zeroed() };
            to_storage(&a, &mut s);
            assert_eq!(from_storage(&s), Some(a));
        }
    }

    #[test]
    fn batches_move_datagrams_both_ways() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut out = SendBatch::new(600);
        for i in 0..40u32 {
            if out.is_full(600) {
                out.flush(tx.as_raw_fd(), |(_, _, r)| r.unwrap());
            }
            let msg = vec![i as u8; 10 + i as usize];
            assert!(out.push(&msg, Some(to), i));
        }
        let mut tags = Vec::new();
        out.flush(tx.as_raw_fd(), |(t, m, r)| {
            r.unwrap();
            assert_eq!(m.len(), 10 + t as usize);
            tags.push(t);
        });
        assert_eq!(tags, (32..40).collect::<Vec<_>>());
        assert!(out.is_empty());

        let mut inb = RecvBatch::new(30);
        let mut seen = Vec::new();
        for _ in 0..100 {
            match inb.recv(rx.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (m, trunc, from) = inb.get_mut(i);
                        assert_eq!(from, Some(tx.local_addr().unwrap()));
                        // Datagram i is 10 + i bytes long; the slots hold 30.
                        assert_eq!(trunc, m[0] > 20);
                        assert_eq!(m.len(), (10 + m[0] as usize).min(30));
                        seen.push(m[0]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if seen.len() == 40 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seen, (0..40).collect::<Vec<u8>>());
    }

    #[test]
    fn a_refused_datagram_is_reported_and_the_rest_still_go() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut out = SendBatch::new(100);
        assert!(out.push(b"one", Some(rx.local_addr().unwrap()), 1));
        // The kernel refuses a datagram to port 0 (EINVAL).
        assert!(out.push(b"two", Some("127.0.0.1:0".parse().unwrap()), 2));
        assert!(out.push(b"three", Some(rx.local_addr().unwrap()), 3));
        let mut fates = Vec::new();
        out.flush(tx.as_raw_fd(), |(t, _, r)| fates.push((t, r.is_ok())));
        assert_eq!(fates, vec![(1, true), (2, false), (3, true)]);
        let mut inb = RecvBatch::new(100);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(inb.recv(rx.as_raw_fd()).unwrap(), 2);
        assert_eq!(inb.get_mut(1).0, b"three");
    }
}
