"""Capture sockets: one AF_PACKET socket per hop, opened inside the hop's namespace.

setns(2) moves only the calling thread, and a socket stays in the namespace it was created
in: the caller's thread enters each namespace (netns.inside), opens and binds the socket
there, and comes back. From then on one poll loop in the caller's thread reads every hop at
once; there is no capture thread to leak. Each socket has a large receive buffer (frames
wait in the kernel while a probe runs) and kernel timestamps (SO_TIMESTAMPNS); bridges are
put in promiscuous mode by socket membership (PACKET_MR_PROMISC), which the kernel drops
when the socket closes, as tcpdump does, so the bridge shows the frames it forwards.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from netlab.errors import KernelError, LabError
from netlab.kernel import netns
from netlab.probe.correlate import Captured
from netlab.probe.model import Hop

__all__ = ["CaptureSet"]

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_STATISTICS = 6
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
RCVBUF = 32 << 20
_TIMESPEC = struct.Struct("=qq")
_ANC = socket.CMSG_SPACE(_TIMESPEC.size)


@dataclass
class HopStats:
    frames: int = 0
    drops: int = 0  # frames the kernel could not queue to the socket (PACKET_STATISTICS)


class CaptureSet:
    """Open sockets on `hops` (all at once, before anything is sent); `drain()`; `close()`."""

    def __init__(self, hops: list[Hop]) -> None:
        self.hops = hops
        self.socks: list[socket.socket] = []
        self.stats = [HopStats() for _ in hops]
        self._fd_hop: dict[int, int] = {}
        self.poller = select.poll()
        try:
            for i, hop in enumerate(hops):
                s = self._open(hop)
                self.socks.append(s)
                self._fd_hop[s.fileno()] = i
                self.poller.register(s.fileno(), select.POLLIN)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(hop: Hop) -> socket.socket:
        try:
            with netns.inside(hop.netns):
                # protocol 0: no receive hook until bind(), which then registers it once
                # (a socket made with ETH_P_ALL would unhook and rehook: an RCU grace period)
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        except FileNotFoundError:
            raise LabError(f"namespace {hop.netns} is gone: the lab is being torn down") from None
        try:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            try:
                s.bind((hop.ifname, ETH_P_ALL))  # the name is looked up in the socket's namespace
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    raise LabError(
                        f"{hop.label}: there is no interface {hop.ifname} in {hop.netns}; is the lab being changed?"
                    ) from None
                raise KernelError(f"bind capture socket to {hop.ifname}", hop.netns, exc.errno) from None
            if hop.promisc:
                ifindex = _ifindex(s)
                mreq = struct.pack("=iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
                s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            _stats(s)  # reset the counters: count from now
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    def drain(self, timeout: float = 0.0) -> list[Captured]:
        """Every frame queued now; waits up to `timeout` seconds for the first one."""
        out: list[Captured] = []
        events = self.poller.poll(int(timeout * 1000)) if timeout > 0 else [(s.fileno(), 0) for s in self.socks]
        for fd, _ in events:
            i = self._fd_hop.get(fd)
            if i is None:
                continue
            s = self.socks[i]
            while True:
                try:
                    data, anc, _flags, addr = s.recvmsg(65535, _ANC)
                except (BlockingIOError, InterruptedError):
                    break
                ts = 0
                for level, typ, val in anc:
                    if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(val) >= _TIMESPEC.size:
                        sec, nsec = _TIMESPEC.unpack_from(val)
                        ts = sec * 1_000_000_000 + nsec
                out.append(Captured(i, ts or time.time_ns(), addr[2] == PACKET_OUTGOING, data))
                self.stats[i].frames += 1
        return out

    def read_drops(self) -> None:
        for i, s in enumerate(self.socks):
            if s.fileno() >= 0:
                self.stats[i].drops += _stats(s)[1]

    def close(self) -> None:
        for s in self.socks:
            try:
                if s.fileno() >= 0:
                    self.poller.unregister(s.fileno())
            except (KeyError, ValueError):
                pass
        close_all(self.socks)
        self.socks = []

    def __enter__(self) -> CaptureSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_all(socks: list[socket.socket]) -> None:
    """Close sockets together: closing an AF_PACKET socket waits for an RCU grace period
    (synchronize_net), ~10 ms each; closed from parallel threads the waits overlap. Every
    thread is joined before this returns."""
    socks = [s for s in socks if s.fileno() >= 0]
    if len(socks) < 3:
        for s in socks:
            s.close()
        return
    threads = [threading.Thread(target=s.close, name="netlab-close") for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _ifindex(s: socket.socket) -> int:
    # getsockname() of a bound AF_PACKET socket: (ifname, proto, pkttype, hatype, addr); the
    # index comes from the kernel of the socket's own namespace via SIOCGIFINDEX
    name = s.getsockname()[0]
    req = struct.pack("16si", name.encode(), 0)
    res = fcntl.ioctl(s.fileno(), 0x8933, req)  # SIOCGIFINDEX
    return int(struct.unpack("16si", res)[1])


def _stats(s: socket.socket) -> tuple[int, int]:
    """(packets, drops) since the last call (the kernel resets them on read)."""
    raw = s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    packets, drops = struct.unpack("=II", raw)
    return packets, drops


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
