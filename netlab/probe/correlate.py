"""Turn what every hop captured into walks: one probe, hop by hop, there and back.

Each probe is recognisable at every hop by what no hop rewrites: its IP id and its TCP
sequence number (or, for UDP and ICMP, a nonce in the payload). NAT changes addresses and
ports, forwarding changes the TTL and MACs, VXLAN wraps the frame in another one; none of
them touches those fields. Replies are recognised by what the answer has to carry: a TCP
SYN-ACK or RST acknowledges seq+1, an ICMP error quotes the probe's IP header (IP id), an
echo reply repeats the nonce, and a UDP reply is the datagram going back on the reverse of
the tuple the request had where it stopped, followed from there by its own IP id and payload.

Frames are put in order by their capture timestamps; stacked devices that see one received
skb (veth then cni0, eth0 then flannel.1) share a timestamp and are ordered lower first.
Pure: unit-tested on synthetic frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from netlab.probe.model import Branch, EndpointView, Hop, ProbePlan
from netlab.probe.nftrace import ChainPath, TraceEvent, chain_path
from netlab.probe.packet import ICMP, TCP, UDP, IPv4, Packet, parse

__all__ = ["Captured", "Change", "Observation", "ProbeSpec", "Walk", "correlate"]

PROTO_NUM = {"tcp": 6, "udp": 17, "icmp": 1}


@dataclass(frozen=True)
class Captured:
    """One frame as one capture socket returned it."""

    hop: int  # index into ProbePlan.hops
    ts_ns: int  # the kernel's capture timestamp (CLOCK_REALTIME)
    outgoing: bool  # PACKET_OUTGOING: the interface sent it
    data: bytes


@dataclass(frozen=True)
class ProbeSpec:
    """What one injected probe carried: the marks to find it again."""

    index: int
    proto: str
    src: IPv4Address
    dst: IPv4Address
    sport: int
    dport: int
    ip_id: int
    seq: int = 0  # TCP
    nonce: bytes = b""  # UDP / ICMP payload
    icmp_id: int = 0
    sent_ns: int = 0
    sent: bytes = b""  # the IP packet as sent (a node's probe is seen first after its own NAT)

    def is_request(self, ip: IPv4) -> bool:
        if ip.ident != self.ip_id or ip.proto != PROTO_NUM[self.proto]:
            return False
        l4 = ip.l4
        if isinstance(l4, TCP):
            return l4.seq == self.seq and bool(l4.flags & 0x02)
        if isinstance(l4, UDP):
            return self.nonce in l4.payload
        if isinstance(l4, ICMP):
            return l4.type == 8 and l4.ident == self.icmp_id and self.nonce in l4.payload
        return False

    def is_reply(self, ip: IPv4) -> bool:
        """A reply that names the probe itself (UDP replies are found by tuple instead)."""
        l4 = ip.l4
        if isinstance(l4, TCP) and self.proto == "tcp":
            return l4.ack == (self.seq + 1) & 0xFFFFFFFF and bool(l4.flags & 0x10) and bool(l4.flags & 0x06)
        if isinstance(l4, ICMP):
            if l4.quoted is not None:
                return l4.quoted.ident == self.ip_id and l4.quoted.proto == PROTO_NUM[self.proto]
            return self.proto == "icmp" and l4.type == 0 and l4.ident == self.icmp_id and self.nonce in l4.payload
        return False


@dataclass
class Change:
    kind: str  # dnat | snat | un-dnat | un-snat | encap | decap | bridged | ttl | mac
    text: str
    where: str  # the namespace it happened in (node name, pod, ...) or "a -> b" for a wire
    chains: list[str] = field(default_factory=list)  # the rule path that decided (from the trace)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "where": self.where, "chains": self.chains}


@dataclass
class Observation:
    hop: Hop
    ts_ns: int
    direction: str  # "in" | "out"
    packet: Packet
    data: bytes
    changes: list[Change] = field(default_factory=list)

    @property
    def ip(self) -> IPv4:
        ip = self.packet.innermost.ip
        assert ip is not None
        return ip

    def as_dict(self, t0: int) -> dict[str, Any]:
        inner = self.packet.innermost
        ip = self.ip
        d: dict[str, Any] = {
            "hop": self.hop.label,
            "netns": self.hop.netns,
            "owner": self.hop.owner,
            "interface": self.hop.ifname,
            "direction": self.direction,
            "t_us": round((self.ts_ns - t0) / 1000, 1),
            "summary": self.packet.summary(),
            "src": ip.endpoint("src"),
            "dst": ip.endpoint("dst"),
            "ttl": ip.ttl,
            "ip_id": ip.ident,
            "mac_src": inner.src_mac,
            "mac_dst": inner.dst_mac,
            "changes": [c.as_dict() for c in self.changes],
        }
        if self.packet.inner is not None and self.packet.ip is not None:
            o = self.packet.ip
            d["vxlan"] = {
                "outer_src": o.endpoint("src"),
                "outer_dst": o.endpoint("dst"),
                "vni": self.packet.vni,
                "outer_mac_src": self.packet.src_mac,
                "outer_mac_dst": self.packet.dst_mac,
            }
        return d


@dataclass
class Walk:
    probe: ProbeSpec
    request: list[Observation] = field(default_factory=list)
    reply: list[Observation] = field(default_factory=list)
    reply_kind: str = ""  # "SYN-ACK", "RST", "port-unreachable", "echo-reply", "UDP reply", ""
    endpoint: EndpointView | None = None  # the endpoint the request reached (or was DNATed to)
    answered_by: str | None = None  # the hop owner the reply came from
    traces: list[tuple[str, str, ChainPath]] = field(default_factory=list)  # (node, "request"|"reply", path)
    arp_unanswered: list[tuple[Hop, str]] = field(default_factory=list)
    verdict: str = ""  # answered | refused | rejected | dropped | lost
    reason: str = ""
    stopped_at: str | None = None  # the hop where the request was last seen, when it did not get through
    frames: int = 0  # frames of this probe written to a pcap (request + reply + ARP)

    def as_dict(self, t0: int | None = None) -> dict[str, Any]:
        base = self.probe.sent_ns if t0 is None else t0
        return {
            "probe": self.probe.index,
            "ip_id": self.probe.ip_id,
            "sport": self.probe.sport,
            "seq": self.probe.seq if self.probe.proto == "tcp" else None,
            "verdict": self.verdict,
            "reason": self.reason,
            "reply": self.reply_kind or None,
            "endpoint": (
                {
                    "ip": str(self.endpoint.ip),
                    "port": self.endpoint.port,
                    "pod": self.endpoint.pod,
                    "node": self.endpoint.node,
                }
                if self.endpoint
                else None
            ),
            "answered_by": self.answered_by,
            "stopped_at": self.stopped_at,
            "request": [o.as_dict(base) for o in self.request],
            "reply_walk": [o.as_dict(base) for o in self.reply],
            "rules": [
                {
                    "node": n,
                    "packet": which,
                    "path": p.text(),
                    "chains": [p.base, *p.chains],
                    "verdict": p.verdict,
                    "rule": p.last.rule if p.last else None,
                }
                for n, which, p in self.traces
            ],
            "arp_unanswered": [{"hop": h.label, "who_has": t} for h, t in self.arp_unanswered],
        }


def _order(o: Observation) -> tuple[int, int, int]:
    # one timestamp for one skb seen by stacked devices: a sender's copy, then the lower device
    return (o.ts_ns, 0 if o.direction == "out" else 1, o.hop.layer)


def _observe(plan: ProbePlan, frames: list[Captured], vxlan_ports: frozenset[int]) -> list[Observation]:
    out: list[Observation] = []
    for f in frames:
        pkt = parse(f.data, vxlan_ports)
        if pkt is None:
            continue
        out.append(Observation(plan.hops[f.hop], f.ts_ns, "out" if f.outgoing else "in", pkt, f.data))
    out.sort(key=_order)
    return out


def _local(plan: ProbePlan, probe: ProbeSpec) -> Observation:
    """A node's probe as its socket handed it to the kernel, before routing and netfilter."""
    hop = Hop(plan.source.netns, "(local)", plan.source.name, "local")
    data = b"\0" * 12 + b"\x08\x00" + probe.sent
    pkt = parse(data)
    assert pkt is not None
    return Observation(hop, probe.sent_ns, "out", pkt, data)


def _where(a: Observation, b: Observation) -> str:
    if a.hop.netns == b.hop.netns:
        return a.hop.owner
    return f"{a.hop.owner} -> {b.hop.owner}"


def diff(a: Observation, b: Observation, direction: str) -> list[Change]:
    """What changed between two sightings of one packet."""
    out: list[Change] = []
    where = _where(a, b)
    pa, pb = a.packet, b.packet
    if pa.inner is None and pb.inner is not None and pb.ip is not None:
        o = pb.ip
        out.append(
            Change(
                "encap",
                f"VXLAN encapsulation: outer {o.endpoint('src')} > {o.endpoint('dst')} UDP, VNI {pb.vni}",
                where,
            )
        )
    elif pa.inner is not None and pb.inner is None:
        out.append(Change("decap", f"VXLAN decapsulation (VNI {pa.vni})", where))
    if a.hop.role == "veth" and b.hop.role == "veth" and a.hop.netns == b.hop.netns and a.hop != b.hop:
        out.append(Change("bridged", f"bridged by cni0 from port {a.hop.ifname} to port {b.hop.ifname}", where))
    ia, ib = a.ip, b.ip
    src_a, src_b = ia.endpoint("src"), ib.endpoint("src")
    dst_a, dst_b = ia.endpoint("dst"), ib.endpoint("dst")
    if dst_a != dst_b:
        kind = "dnat" if direction == "request" else "un-snat"
        label = "DNAT" if direction == "request" else "reverse SNAT (conntrack)"
        out.append(Change(kind, f"{label} {dst_a} -> {dst_b}", where))
    if src_a != src_b:
        kind = "snat" if direction == "request" else "un-dnat"
        label = "SNAT (masquerade)" if direction == "request" else "reverse DNAT (conntrack)"
        out.append(Change(kind, f"{label} {src_a} -> {src_b}", where))
    if ia.ttl != ib.ttl:
        out.append(Change("ttl", f"TTL {ia.ttl} -> {ib.ttl}", where))
    ea, eb = pa.innermost, pb.innermost
    if (ea.src_mac, ea.dst_mac) != (eb.src_mac, eb.dst_mac) and a.hop.netns == b.hop.netns and a.hop.role != "local":
        out.append(Change("mac", f"MAC {ea.src_mac} > {ea.dst_mac} -> {eb.src_mac} > {eb.dst_mac}", where))
    return out


def _dedupe(obs: list[Observation]) -> list[Observation]:
    """A socket sees a frame once; the same hop, direction and bytes twice is a real second pass
    (hairpin), so only exact repeats at one timestamp go."""
    seen: set[tuple[str, str, int, bytes]] = set()
    out = []
    for o in obs:
        key = (o.hop.label, o.direction, o.ts_ns, o.data)
        if key in seen:
            continue
        seen.add(key)
        out.append(o)
    return out


def _udp_reply(req: list[Observation], window: list[Observation]) -> list[Observation]:
    """A UDP reply names nothing of the probe: it is the datagram going back on the reverse of
    the tuple the request had where it ended, then the same datagram (IP id and payload) on
    the reverse of any tuple the request had on its way (NAT undone hop by hop)."""
    if not req:
        return []
    last = req[-1]
    ip = last.ip
    srcs = {(o.ip.src, o.ip.sport) for o in req}
    dsts = {(o.ip.dst, o.ip.dport) for o in req}
    for o in window:
        if o.ts_ns < last.ts_ns or o.packet.innermost.ip is None:
            continue
        r = o.ip
        if isinstance(r.l4, UDP) and (r.src, r.dst, r.sport, r.dport) == (ip.dst, ip.src, ip.dport, ip.sport):
            key = (r.ident, r.l4.payload)
            return [
                x
                for x in window
                if x.ts_ns >= last.ts_ns
                and x.packet.innermost.ip is not None
                and isinstance(x.ip.l4, UDP)
                and (x.ip.ident, x.ip.l4.payload) == key
                and (x.ip.dst, x.ip.dport) in srcs
                and (x.ip.src, x.ip.sport) in dsts
            ]
    return []


def _reply_kind(ip: IPv4) -> str:
    l4 = ip.l4
    if isinstance(l4, TCP):
        return "SYN-ACK" if l4.flags & 0x02 else "RST"
    if isinstance(l4, ICMP):
        return l4.name
    return "UDP reply"


def _endpoint_of(plan: ProbePlan, walk: Walk) -> EndpointView | None:
    if not walk.request:
        return None
    cands = plan.destination.candidates
    for o in reversed(walk.request):
        ip = o.ip
        for c in cands:
            if ip.dst == c.ip and (ip.dport in (None, c.port) or c.port == 0):
                return c
    return None


def _branch(plan: ProbePlan, ep: EndpointView | None) -> Branch | None:
    for b in plan.branches:
        if b.endpoint == ep:
            return b
    return plan.branches[0] if len(plan.branches) == 1 else None


def _same_packet(ev: TraceEvent, ip: IPv4) -> bool:
    p = ev.packet
    if p is None or p.ident != ip.ident or p.proto != ip.proto:
        return False
    if isinstance(p.l4, TCP) and isinstance(ip.l4, TCP):
        return p.l4.seq == ip.l4.seq and p.l4.ack == ip.l4.ack
    return True


def _attach_traces(walk: Walk, events: list[TraceEvent], skip_tables: tuple[str, ...]) -> None:
    """Group the trace events of the walk's packets per node and packet, in arrival order."""
    groups: dict[tuple[str, int], list[TraceEvent]] = {}
    which: dict[tuple[str, int], str] = {}
    req_ip = walk.request[0].ip if walk.request else None
    rep_ip = walk.reply[0].ip if walk.reply else None
    for ev in events:
        key = (ev.node, ev.trace_id)
        if ev.packet is not None:
            kind = None
            if req_ip is not None and _same_packet(ev, req_ip):
                kind = "request"
            elif rep_ip is not None and _same_packet(ev, rep_ip):
                kind = "reply"
            elif ev.packet.ident == walk.probe.ip_id and ev.packet.proto == PROTO_NUM[walk.probe.proto]:
                kind = "request"
            if kind is None:
                continue
            which[key] = kind
        if key not in which:
            continue
        groups.setdefault(key, []).append(ev)
    for key, evs in groups.items():
        for p in chain_path(evs, skip_tables):
            walk.traces.append((key[0], which[key], p))


def _attach_rule_paths(walk: Walk) -> None:
    """Name the rules that decided each NAT change: the trace's nat chains in that node."""
    for obs in walk.request + walk.reply:
        for c in obs.changes:
            if c.kind not in ("dnat", "snat"):
                continue
            for node, which, p in walk.traces:
                if which != "request" or node != c.where:
                    continue
                table = p.base.split(" ", 1)[0]
                is_nat = table == "nat" or "nat" in p.base.split(" ", 1)[1]
                if (
                    c.kind == "dnat"
                    and is_nat
                    and p.chains
                    and ("PREROUTING" in p.base or "OUTPUT" in p.base or "prerouting" in p.base or "output" in p.base)
                ):
                    c.chains = [p.base, *p.chains]
                elif c.kind == "snat" and is_nat and ("POSTROUTING" in p.base or "postrouting" in p.base):
                    c.chains = [p.base, *p.chains]


def correlate(
    plan: ProbePlan,
    probes: list[ProbeSpec],
    frames: list[Captured],
    events: list[TraceEvent] | None = None,
    *,
    vxlan_ports: frozenset[int] = frozenset({8472}),
    end_ns: int | None = None,
    skip_tables: tuple[str, ...] = (),
) -> list[Walk]:
    """One Walk per probe. A probe's window runs from its sending to the next probe's."""
    observations = _observe(plan, frames, vxlan_ports)
    walks: list[Walk] = []
    for i, probe in enumerate(probes):
        start = probe.sent_ns
        stop = probes[i + 1].sent_ns if i + 1 < len(probes) else (end_ns or 2**63)
        window = [o for o in observations if start - 1_000_000 <= o.ts_ns < stop]
        walk = Walk(probe)
        if plan.source.kind == "node" and probe.sent:
            window.insert(0, _local(plan, probe))
        ips = [o for o in window if o.packet.innermost.ip is not None]
        walk.request = _dedupe([o for o in ips if probe.is_request(o.ip)])
        if probe.proto == "udp":
            replies = [o for o in ips if probe.is_reply(o.ip)] or _udp_reply(walk.request, ips)
        else:
            replies = [o for o in ips if probe.is_reply(o.ip)]
        walk.reply = _dedupe(replies)
        for seq, direction in ((walk.request, "request"), (walk.reply, "reply")):
            for a, b in zip(seq, seq[1:], strict=False):
                b.changes = diff(a, b, direction)
        if walk.reply:
            walk.reply_kind = _reply_kind(walk.reply[0].ip)
            walk.answered_by = walk.reply[0].hop.owner
        walk.endpoint = _endpoint_of(plan, walk)
        # ARP: a who-has on a hop with no is-at for that address in the window
        asked: dict[tuple[str, str], Hop] = {}
        answered: set[str] = set()
        for o in window:
            arp = o.packet.arp
            if arp is None:
                continue
            if arp.op == 1:
                asked.setdefault((o.hop.label, str(arp.target_ip)), o.hop)
            elif arp.op == 2:
                answered.add(str(arp.sender_ip))
        walk.arp_unanswered = [(hop, t) for (_, t), hop in asked.items() if t not in answered]
        if events:
            _attach_traces(walk, [e for e in events if start - 1_000_000 <= e.ts_ns < stop + 50_000_000], skip_tables)
        _attach_rule_paths(walk)
        walk.frames = len(walk.request) + len(walk.reply)
        diagnose(plan, walk)
        walks.append(walk)
    return walks


def _rule(p: ChainPath) -> str:
    """`<rule text>` in <table chain>, reached by <path>."""
    where = p.last.where if p.last else p.base
    rule = p.last.rule if p.last and p.last.rule else "a rule"
    return f"{rule} (in {where}; path {' -> '.join([p.base, *p.chains])})"


def diagnose(plan: ProbePlan, walk: Walk, no_route: dict[str, str] | None = None) -> None:
    """Say how the probe ended, with the cause the captures and the trace prove."""
    dst = plan.destination
    drop = next(((n, p) for n, w, p in walk.traces if w == "request" and p.verdict == "drop"), None)
    if walk.reply:
        kind = walk.reply_kind
        origin = walk.reply[0].hop.owner
        if kind in ("SYN-ACK", "UDP reply", "echo-reply"):
            walk.verdict = "answered"
            ep = walk.endpoint
            walk.reason = f"{kind} from {origin}" + (f" ({ep.ip}:{ep.port})" if ep and ep.port else "")
        elif kind == "RST":
            walk.verdict = "refused"
            ip = walk.request[-1].ip if walk.request else None
            where = f"{ip.dst}:{ip.dport}" if ip else str(dst.ip)
            walk.reason = f"no listener on {origin} {where}: its kernel answered RST"
        elif kind == "port-unreachable" and walk.reply[0].hop.role == "pod" and drop is None:
            walk.verdict = "refused"
            ip = walk.request[-1].ip if walk.request else None
            where = f"{ip.dst}:{ip.dport}" if ip else str(dst.ip)
            walk.reason = (
                f"no {dst.proto.upper()} listener on {origin} {where}: its kernel answered ICMP port-unreachable"
            )
        else:
            walk.verdict = "rejected"
            walk.reason = f"ICMP {kind} from {walk.reply[0].ip.src}"
            if drop is not None:
                node, p = drop
                walk.reason = f"rejected at node {node} by {_rule(p)}"
            if dst.kind in ("service", "nodeport") and not dst.candidates:
                walk.reason = (
                    f"Service {dst.service.display if dst.service else dst.name} has no endpoints; " + walk.reason
                )
        if walk.verdict != "answered" and walk.request:
            walk.stopped_at = walk.request[-1].hop.label
        return
    walk.verdict = "lost"
    last = walk.request[-1] if walk.request else None
    walk.stopped_at = last.hop.label if last else None
    if drop is not None:
        node, p = drop
        walk.verdict = "dropped"
        walk.reason = f"dropped at node {node} by {_rule(p)}"
    elif walk.arp_unanswered:
        hop, target = walk.arp_unanswered[0]
        walk.reason = f"ARP failure: who-has {target} on {hop.label} got no answer"
    elif last is None:
        walk.reason = "the probe was not seen leaving the source"
    elif no_route and last.hop.owner in no_route:
        walk.reason = no_route[last.hop.owner]
    elif last.hop.role == "pod" and last.direction == "in":
        walk.reason = f"{last.hop.owner} received it and did not answer"
    else:
        branch = _branch(plan, walk.endpoint)
        nxt = None
        if branch is not None and last.hop in branch.hops:
            i = branch.hops.index(last.hop)
            nxt = branch.hops[i + 1].label if i + 1 < len(branch.hops) else None
        walk.reason = f"last seen at {last.hop.label} ({last.direction})" + (f"; never reached {nxt}" if nxt else "")
    if dst.kind in ("service", "nodeport") and not dst.candidates:
        walk.reason = f"Service {dst.service.display if dst.service else dst.name} has no endpoints; {walk.reason}"
