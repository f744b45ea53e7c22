#!/usr/bin/env python3
"""Starts a program as systemd starts lb.service through lb.socket, for the benchmarks.

Usage: socket-activate.py ADDR:PORT PROGRAM [ARGS...]

Creates the sockets lb.socket describes (a UDP and a TCP socket on ADDR:PORT, with its
ReusePort=yes, FreeBind=yes, ReceiveBuffer=4M, SendBuffer=4M, Backlog=1024), puts them at
descriptors 3 and 4 and execs PROGRAM with LISTEN_FDS=2 and LISTEN_PID set to its own PID, as
systemd does (sd_listen_fds(3)). It execs, so PROGRAM keeps this PID. systemd-socket-activate
cannot stand in: without --accept it waits for a first datagram or connection before it starts
the program, and it makes one kind of socket per invocation.
"""
import fcntl
import os
import socket
import sys

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_FREEBIND = 15
BUFFER = 4 << 20


def make(kind, addr):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    if kind == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # As systemd (root): the FORCE variants, not capped by net.core.[rw]mem_max.
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
    s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, BUFFER)
    s.bind(addr)
    if kind == socket.SOCK_STREAM:
        s.listen(1024)
    return s


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    host, _, port = sys.argv[1].rpartition(":")
    addr = (host, int(port))
    socks = [make(socket.SOCK_DGRAM, addr), make(socket.SOCK_STREAM, addr)]
    # Out of the way first (a socket may already sit at 3 or 4), then to 3, 4.
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in socks]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
        os.set_inheritable(3 + i, True)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(socks))
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ.pop("LISTEN_FDNAMES", None)
    os.execvp(sys.argv[2], sys.argv[2:])


main()
