"""A small, fast dissector for the frames a lab carries: Ethernet, ARP, IPv4, TCP, UDP, ICMP,
and VXLAN on the lab's port (flannel's 8472, not IANA's 4789), with the inner frame.

scapy builds the probes; this reads what the capture sockets return. A walk reads every frame
of every hop, and the benchmark 30 000 of them: scapy dissects ~3-4 k frames/s here, these
struct unpacks ~100 k/s, and they parse exactly the fields a walk compares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

__all__ = ["ARP", "ICMP", "TCP", "UDP", "IPv4", "Packet", "parse", "tcp_flags"]

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_NAMES = {PROTO_ICMP: "ICMP", PROTO_TCP: "TCP", PROTO_UDP: "UDP"}

_ETH = struct.Struct("!6s6sH")
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHLLBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHHH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")

ICMP_ECHO_REPLY = 0
ICMP_UNREACH = 3
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
UNREACH_CODES = {
    0: "net-unreachable",
    1: "host-unreachable",
    2: "protocol-unreachable",
    3: "port-unreachable",
    4: "frag-needed",
    9: "net-prohibited",
    10: "host-prohibited",
    13: "admin-prohibited",
}


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def tcp_flags(flags: int) -> str:
    """tcpdump's letters: S SYN, . ACK, R RST, F FIN, P PSH (e.g. `S.` for SYN-ACK)."""
    out = ""
    for bit, ch in ((0x02, "S"), (0x01, "F"), (0x04, "R"), (0x08, "P"), (0x20, "U")):
        if flags & bit:
            out += ch
    if flags & 0x10:
        out += "."
    return out or "none"


@dataclass(slots=True)
class TCP:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes

    @property
    def flag_str(self) -> str:
        return tcp_flags(self.flags)


@dataclass(slots=True)
class UDP:
    sport: int
    dport: int
    payload: bytes


@dataclass(slots=True)
class ICMP:
    type: int
    code: int
    ident: int  # echo request/reply only
    seq: int
    payload: bytes
    quoted: IPv4 | None = None  # the offending packet's header, in an error message

    @property
    def name(self) -> str:
        if self.type == ICMP_ECHO:
            return "echo-request"
        if self.type == ICMP_ECHO_REPLY:
            return "echo-reply"
        if self.type == ICMP_UNREACH:
            return UNREACH_CODES.get(self.code, f"unreachable code {self.code}")
        if self.type == ICMP_TIME_EXCEEDED:
            return "time-exceeded"
        return f"type {self.type} code {self.code}"

    @property
    def is_error(self) -> bool:
        return self.type in (ICMP_UNREACH, ICMP_TIME_EXCEEDED, 4, 5, 12)


@dataclass(slots=True)
class IPv4:
    src: IPv4Address
    dst: IPv4Address
    ident: int
    ttl: int
    proto: int
    length: int
    l4: TCP | UDP | ICMP | None = None

    @property
    def sport(self) -> int | None:
        return self.l4.sport if isinstance(self.l4, TCP | UDP) else None

    @property
    def dport(self) -> int | None:
        return self.l4.dport if isinstance(self.l4, TCP | UDP) else None

    def endpoint(self, which: str) -> str:
        """`ip:port` (or the bare IP when the protocol has no ports)."""
        ip, port = (self.src, self.sport) if which == "src" else (self.dst, self.dport)
        return f"{ip}:{port}" if port is not None else str(ip)

    def summary(self, quoted: bool = False) -> str:
        name = PROTO_NAMES.get(self.proto, f"proto {self.proto}")
        l4 = self.l4
        if quoted and isinstance(l4, TCP | UDP):  # an ICMP error quotes the ports and no more
            return f"{name} {self.endpoint('src')} > {self.endpoint('dst')}"
        if isinstance(l4, TCP):
            return f"TCP {self.endpoint('src')} > {self.endpoint('dst')} [{l4.flag_str}] seq={l4.seq} ack={l4.ack}"
        if isinstance(l4, UDP):
            return f"UDP {self.endpoint('src')} > {self.endpoint('dst')} len={len(l4.payload)}"
        if isinstance(l4, ICMP):
            text = f"ICMP {self.src} > {self.dst} {l4.name}"
            if l4.type in (ICMP_ECHO, ICMP_ECHO_REPLY):
                text += f" id={l4.ident} seq={l4.seq}"
            if l4.quoted is not None:
                text += f" (for {l4.quoted.summary(quoted=True)})"
            return text
        return f"{name} {self.src} > {self.dst}"


@dataclass(slots=True)
class ARP:
    op: int  # 1 request, 2 reply
    sender_mac: str
    sender_ip: IPv4Address
    target_mac: str
    target_ip: IPv4Address

    def summary(self) -> str:
        if self.op == 1:
            return f"ARP who-has {self.target_ip} tell {self.sender_ip}"
        if self.op == 2:
            return f"ARP {self.sender_ip} is-at {self.sender_mac}"
        return f"ARP op {self.op}"


@dataclass(slots=True)
class Packet:
    """One Ethernet frame; a VXLAN frame carries its inner frame in `inner`."""

    src_mac: str
    dst_mac: str
    ethertype: int
    length: int
    ip: IPv4 | None = None
    arp: ARP | None = None
    vni: int | None = None
    inner: Packet | None = None

    @property
    def innermost(self) -> Packet:
        p = self
        while p.inner is not None:
            p = p.inner
        return p

    def summary(self) -> str:
        if self.inner is not None and self.ip is not None:
            return (
                f"VXLAN {self.ip.endpoint('src')} > {self.ip.endpoint('dst')} vni={self.vni} | {self.inner.summary()}"
            )
        if self.ip is not None:
            return self.ip.summary()
        if self.arp is not None:
            return self.arp.summary()
        return f"ethertype {self.ethertype:#06x} {self.src_mac} > {self.dst_mac}"


def _ipv4(data: bytes, off: int, quoted: bool = False) -> IPv4 | None:
    if len(data) < off + 20:
        return None
    vihl, _tos, total, ident, _frag, ttl, proto, _csum, src, dst = _IP.unpack_from(data, off)
    if vihl >> 4 != 4:
        return None
    ihl = (vihl & 0x0F) * 4
    ip = IPv4(IPv4Address(src), IPv4Address(dst), ident, ttl, proto, total)
    l4off = off + ihl
    end = min(len(data), off + total) if total >= ihl else len(data)
    if proto == PROTO_TCP and len(data) >= l4off + (8 if quoted else 20):
        if quoted:  # an ICMP error quotes only the first 8 bytes of the transport header
            sport, dport, seq = struct.unpack_from("!HHL", data, l4off)
            ip.l4 = TCP(sport, dport, seq, 0, 0, b"")
        else:
            sport, dport, seq, ack, doff, flags, _w, _c, _u = _TCP.unpack_from(data, l4off)
            ip.l4 = TCP(sport, dport, seq, ack, flags, data[l4off + (doff >> 4) * 4 : end])
    elif proto == PROTO_UDP and len(data) >= l4off + 8:
        sport, dport, _len, _csum = _UDP.unpack_from(data, l4off)
        ip.l4 = UDP(sport, dport, data[l4off + 8 : end])
    elif proto == PROTO_ICMP and len(data) >= l4off + 8:
        typ, code, _csum, ident, seq = _ICMP.unpack_from(data, l4off)
        icmp = ICMP(typ, code, ident, seq, data[l4off + 8 : end])
        if icmp.is_error and not quoted:
            icmp.quoted = _ipv4(data, l4off + 8, quoted=True)
        ip.l4 = icmp
    return ip


def parse(data: bytes, vxlan_ports: frozenset[int] = frozenset({8472})) -> Packet | None:
    """Dissect one Ethernet frame; None if it is too short to be one."""
    if len(data) < 14:
        return None
    dst, src, etype = _ETH.unpack_from(data, 0)
    off = 14
    if etype == ETH_P_8021Q and len(data) >= 18:
        (etype,) = struct.unpack_from("!H", data, 16)
        off = 18
    pkt = Packet(mac_str(src), mac_str(dst), etype, len(data))
    if etype == ETH_P_IP:
        ip = _ipv4(data, off)
        pkt.ip = ip
        if ip is not None and isinstance(ip.l4, UDP) and ip.l4.dport in vxlan_ports and len(ip.l4.payload) >= 8 + 14:
            flags, vni_word = struct.unpack_from("!B3xL", ip.l4.payload, 0)
            if flags & 0x08:  # the I flag: a valid VNI follows
                pkt.vni = vni_word >> 8
                pkt.inner = parse(ip.l4.payload[8:], vxlan_ports)
    elif etype == ETH_P_ARP and len(data) >= off + 28:
        _ht, _pt, _hl, _pl, op, sha, spa, tha, tpa = _ARP.unpack_from(data, off)
        pkt.arp = ARP(op, mac_str(sha), IPv4Address(spa), mac_str(tha), IPv4Address(tpa))
    return pkt
