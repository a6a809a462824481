"""Inject probes with scapy from the source's namespace.

scapy's routing table (`conf.route`) is the host's, and its interface table (`conf.ifaces`)
is process-wide and reloads from whatever namespace the calling thread is in: neither is
used. The route, the source address and the next hop's MAC are read by netlink inside the
source namespace; scapy only builds the bytes, with every address and MAC given explicitly.

A pod or the external client sends whole frames on its interface (AF_PACKET): they leave
exactly as the pod's kernel would send them. A node sends through a raw IP socket
(IP_HDRINCL), because a node's own packets must go through its routing and its netfilter
OUTPUT hook, where kube-proxy DNATs a node's traffic to a ClusterIP; an AF_PACKET frame
would skip both.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import time
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netlab.errors import LabError
from netlab.kernel import netns
from netlab.probe.correlate import ProbeSpec
from netlab.probe.model import Source
from netlab.probe.packet import ETH_P_ARP, parse

__all__ = ["ArpFailure", "Injector", "NoRoute", "make_specs"]

NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT
NONCE_PREFIX = b"netlab-probe "


class NoRoute(LabError):
    pass


class ArpFailure(LabError):
    def __init__(self, hop: str, target: IPv4Address) -> None:
        self.hop = hop
        self.target = target
        super().__init__(f"ARP failure: who-has {target} on {hop} got no answer")


def make_specs(
    src: IPv4Address, dst: IPv4Address, dport: int | None, proto: str, count: int, rng: random.Random
) -> list[ProbeSpec]:
    """The marks of `count` probes: distinct IP ids, source ports, sequence numbers, nonces."""
    ids = rng.sample(range(1, 65536), count)
    ports = rng.sample(range(32768, 61000), count)
    out = []
    for i in range(count):
        nonce = NONCE_PREFIX + os.urandom(8).hex().encode()
        out.append(
            ProbeSpec(
                index=i + 1,
                proto=proto,
                src=src,
                dst=dst,
                sport=ports[i] if proto != "icmp" else 0,
                dport=dport or 0,
                ip_id=ids[i],
                seq=rng.getrandbits(32) if proto == "tcp" else 0,
                nonce=nonce if proto != "tcp" else b"",
                icmp_id=ports[i] if proto == "icmp" else 0,
            )
        )
    return out


def build(spec: ProbeSpec, *, src_mac: str | None, dst_mac: str | None, mss: int = 1410) -> bytes:
    """The probe's bytes, built by scapy: a whole frame, or the IP packet when no MACs are given."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Packet, Raw

    ip = IP(src=str(spec.src), dst=str(spec.dst), id=spec.ip_id, ttl=64, flags="DF")
    l4: Packet
    if spec.proto == "tcp":
        l4 = TCP(sport=spec.sport, dport=spec.dport, seq=spec.seq, flags="S", window=64240, options=[("MSS", mss)])
    elif spec.proto == "udp":
        l4 = UDP(sport=spec.sport, dport=spec.dport) / Raw(spec.nonce)
    else:
        l4 = ICMP(type=8, id=spec.icmp_id, seq=spec.index) / Raw(spec.nonce)
    pkt = ip / l4
    if src_mac is None or dst_mac is None:
        return bytes(pkt)
    return bytes(Ether(src=src_mac, dst=dst_mac) / pkt)


def arp_request(src_mac: str, src_ip: IPv4Address, target: IPv4Address) -> bytes:
    from scapy.layers.l2 import ARP, Ether

    return bytes(
        Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc=src_mac, psrc=str(src_ip), hwdst="00:00:00:00:00:00", pdst=str(target))
    )


@dataclass
class Route:
    ifname: str
    src_ip: IPv4Address
    src_mac: str
    nexthop: IPv4Address
    nexthop_mac: str | None


def route(ns: str, dst: IPv4Address) -> Route:
    """Ask the namespace's kernel: interface, source address, next hop and its MAC."""
    with netns.inside(ns), IPRoute() as ipr:
        try:
            r = ipr.route("get", dst=str(dst))[0]
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                raise NoRoute(f"no route to {dst} from {ns}") from None
            raise
        oif = r.get("RTA_OIF")
        gw = r.get("RTA_GATEWAY")
        prefsrc = r.get("RTA_PREFSRC")
        link = ipr.get_links(oif)[0]
        nexthop = IPv4Address(gw or str(dst))
        mac = None
        for n in ipr.get_neighbours(ifindex=oif, family=socket.AF_INET):
            if n.get("NDA_DST") == str(nexthop) and n["state"] & NUD_USABLE and n.get("NDA_LLADDR"):
                mac = n.get("NDA_LLADDR")
        return Route(link.get("IFLA_IFNAME"), IPv4Address(prefsrc), link.get("IFLA_ADDRESS"), nexthop, mac)


class Injector:
    """An open socket in the source namespace, ready to send probes."""

    def __init__(self, source: Source, dst: IPv4Address) -> None:
        self.source = source
        self.sock: socket.socket | None = None
        self.route: Route | None = None
        self.hop = ""
        if source.kind == "node":
            with netns.inside(source.netns):
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
            self.src_ip = self._node_src(dst)
            return
        rt = route(source.netns, dst)
        self.route = rt
        self.src_ip = rt.src_ip
        self.hop = f"{source.name}/{rt.ifname}"
        with netns.inside(source.netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((rt.ifname, 0))

    def _node_src(self, dst: IPv4Address) -> IPv4Address:
        with netns.inside(self.source.netns), IPRoute() as ipr:
            try:
                r = ipr.route("get", dst=str(dst))[0]
            except NetlinkError as exc:
                raise NoRoute(f"no route to {dst} from node {self.source.name}") from exc
        return IPv4Address(r.get("RTA_PREFSRC"))

    def resolve(self, timeout: float = 0.6) -> None:
        """Make sure the next hop's MAC is known: the kernel's neighbour entry, else ask by ARP."""
        rt = self.route
        if rt is None or rt.nexthop_mac is not None:
            return
        with netns.inside(self.source.netns):
            rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(ETH_P_ARP))
        with rx:
            rx.bind((rt.ifname, ETH_P_ARP))
            req = arp_request(rt.src_mac, rt.src_ip, rt.nexthop)
            deadline = time.monotonic() + timeout
            tries = 0
            while time.monotonic() < deadline:
                if tries < 3:
                    self.send_raw(req)
                    tries += 1
                ready, _, _ = select.select([rx], [], [], min(0.2, max(0.0, deadline - time.monotonic())))
                if not ready:
                    continue
                pkt = parse(rx.recv(2048))
                if pkt and pkt.arp and pkt.arp.op == 2 and pkt.arp.sender_ip == rt.nexthop:
                    rt.nexthop_mac = pkt.arp.sender_mac
                    return
        raise ArpFailure(self.hop, rt.nexthop)

    def frame(self, spec: ProbeSpec) -> bytes:
        if self.route is None:
            return build(spec, src_mac=None, dst_mac=None)
        return build(spec, src_mac=self.route.src_mac, dst_mac=self.route.nexthop_mac)

    def send_raw(self, data: bytes) -> None:
        assert self.sock is not None
        if self.route is None:
            dst = socket.inet_ntoa(data[16:20])
            self.sock.sendto(data, (dst, 0))
        else:
            self.sock.send(data)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
