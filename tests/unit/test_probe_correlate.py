"""Correlation: synthetic frames at every hop -> one walk, in order, with what changed (pure)."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from test_probe_path import lab

from netlab.probe.correlate import Captured, ProbeSpec, correlate
from netlab.probe.nftrace import TraceEvent
from netlab.probe.packet import parse
from netlab.probe.path import plan_probe, resolve_destination, resolve_source

ID, SEQ, SPORT = 4242, 1000000, 40001
M = {
    k: f"02:00:00:00:00:{i:02x}"
    for i, k in enumerate(["client", "cni1", "vtep1", "vtep2", "cni2", "web1", "eth1", "eth2"])
}


def tcp(
    src: str, dst: str, sport: int, dport: int, ttl: int, flags: str, seq: int, ack: int = 0, ip_id: int = ID
) -> IP:
    return IP(src=src, dst=dst, id=ip_id, ttl=ttl) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)


def vx(inner: bytes, src: str, dst: str) -> bytes:
    return bytes(
        Ether(src=M["eth1"], dst=M["eth2"])
        / IP(src=src, dst=dst, id=7, ttl=64)
        / UDP(sport=51000, dport=8472)
        / VXLAN(vni=1, flags=0x08)
        / Raw(inner)
    )


def cross_node_service() -> tuple[object, ProbeSpec, list[Captured]]:
    v = lab()
    src = resolve_source(v, "client")
    plan = plan_probe(v, src, resolve_destination(v, "web:80", None, None, src))
    idx = {h.label: i for i, h in enumerate(plan.hops)}
    req0 = bytes(Ether(src=M["client"], dst=M["cni1"]) / tcp("10.244.0.2", "10.96.0.10", SPORT, 80, 64, "S", SEQ))
    req1 = bytes(Ether(src=M["vtep1"], dst=M["vtep2"]) / tcp("10.244.0.2", "10.244.1.2", SPORT, 8080, 63, "S", SEQ))
    req2 = bytes(Ether(src=M["cni2"], dst=M["web1"]) / tcp("10.244.0.2", "10.244.1.2", SPORT, 8080, 62, "S", SEQ))
    ack = SEQ + 1
    rep0 = bytes(
        Ether(src=M["web1"], dst=M["cni2"]) / tcp("10.244.1.2", "10.244.0.2", 8080, SPORT, 64, "SA", 9, ack, 0)
    )
    rep1 = bytes(
        Ether(src=M["vtep2"], dst=M["vtep1"]) / tcp("10.244.1.2", "10.244.0.2", 8080, SPORT, 63, "SA", 9, ack, 0)
    )
    rep2 = bytes(
        Ether(src=M["cni1"], dst=M["client"]) / tcp("10.96.0.10", "10.244.0.2", 80, SPORT, 62, "SA", 9, ack, 0)
    )
    frames = [
        Captured(idx["default/client/eth0"], 1000, True, req0),
        Captured(idx["node1/vethc"], 1100, False, req0),
        Captured(idx["node1/cni0"], 1100, False, req0),  # one skb, one timestamp: veth first
        Captured(idx["node1/flannel.1"], 1200, True, req1),
        Captured(idx["node1/eth0"], 1300, True, vx(req1, "172.18.0.2", "172.18.0.3")),
        Captured(idx["underlay/br0"], 1310, False, vx(req1, "172.18.0.2", "172.18.0.3")),
        Captured(idx["node2/eth0"], 1320, False, vx(req1, "172.18.0.2", "172.18.0.3")),
        Captured(idx["node2/flannel.1"], 1320, False, req1),
        Captured(idx["node2/cni0"], 1400, True, req2),
        Captured(idx["node2/veth1"], 1410, True, req2),
        Captured(idx["default/web-1/eth0"], 1420, False, req2),
        Captured(idx["default/web-1/eth0"], 2000, True, rep0),
        Captured(idx["node2/veth1"], 2010, False, rep0),
        Captured(idx["node2/cni0"], 2010, False, rep0),
        Captured(idx["node2/flannel.1"], 2100, True, rep1),
        Captured(idx["node2/eth0"], 2200, True, vx(rep1, "172.18.0.3", "172.18.0.2")),
        Captured(idx["underlay/br0"], 2210, False, vx(rep1, "172.18.0.3", "172.18.0.2")),
        Captured(idx["node1/eth0"], 2220, False, vx(rep1, "172.18.0.3", "172.18.0.2")),
        Captured(idx["node1/flannel.1"], 2220, False, rep1),
        Captured(idx["node1/cni0"], 2300, True, rep2),
        Captured(idx["node1/vethc"], 2310, True, rep2),
        Captured(idx["default/client/eth0"], 2320, False, rep2),
        # noise: the client kernel's RST for the SYN-ACK it has no socket for
        Captured(
            idx["default/client/eth0"],
            2400,
            True,
            bytes(Ether() / tcp("10.244.0.2", "10.96.0.10", SPORT, 80, 64, "R", SEQ + 1, 0, 0)),
        ),
    ]
    spec = ProbeSpec(
        1, "tcp", IPv4Address("10.244.0.2"), IPv4Address("10.96.0.10"), SPORT, 80, ID, seq=SEQ, sent_ns=990
    )
    return plan, spec, frames


def nat_trace() -> list[TraceEvent]:
    pkt = parse(bytes(Ether() / tcp("10.244.0.2", "10.96.0.10", SPORT, 80, 64, "S", SEQ)))
    assert pkt is not None and pkt.ip is not None
    evs = [
        TraceEvent(7, 2, "nat", "PREROUTING", "rule", "jump", "KUBE-SERVICES", 1, packet=pkt.ip),
        TraceEvent(7, 2, "nat", "KUBE-SERVICES", "rule", "jump", "KUBE-SVC-AAAA", 2),
        TraceEvent(7, 2, "nat", "KUBE-SVC-AAAA", "rule", "jump", "KUBE-MARK-MASQ", 3),
        TraceEvent(7, 2, "nat", "KUBE-MARK-MASQ", "rule", "continue", None, 4),
        TraceEvent(7, 2, "nat", "KUBE-SVC-AAAA", "rule", "jump", "KUBE-SEP-BBBB", 5),
        TraceEvent(7, 2, "nat", "KUBE-SEP-BBBB", "rule", "accept", None, 6),
    ]
    for e in evs:
        e.node, e.ts_ns = "node1", 1150
    return evs


def test_walk_in_order_with_nat_vxlan_and_ttl() -> None:
    plan, spec, frames = cross_node_service()
    shuffled = frames[:]
    random.Random(1).shuffle(shuffled)
    (walk,) = correlate(plan, [spec], shuffled, nat_trace(), end_ns=5000)  # type: ignore[arg-type]
    assert [(o.hop.label, o.direction) for o in walk.request] == [
        ("default/client/eth0", "out"),
        ("node1/vethc", "in"),
        ("node1/cni0", "in"),
        ("node1/flannel.1", "out"),
        ("node1/eth0", "out"),
        ("underlay/br0", "in"),
        ("node2/eth0", "in"),
        ("node2/flannel.1", "in"),
        ("node2/cni0", "out"),
        ("node2/veth1", "out"),
        ("default/web-1/eth0", "in"),
    ]
    assert len(walk.reply) == 11 and walk.reply[-1].hop.label == "default/client/eth0"
    changes = {(c.kind, c.where): c for o in walk.request for c in o.changes}
    dnat = changes[("dnat", "node1")]
    assert dnat.text == "DNAT 10.96.0.10:80 -> 10.244.1.2:8080"
    assert dnat.chains == ["nat PREROUTING", "KUBE-SERVICES", "KUBE-SVC-AAAA", "KUBE-MARK-MASQ", "KUBE-SEP-BBBB"]
    assert (
        changes[("encap", "node1")].text == "VXLAN encapsulation: outer 172.18.0.2:51000 > 172.18.0.3:8472 UDP, VNI 1"
    )
    assert ("decap", "node2") in changes
    assert changes[("ttl", "node1")].text == "TTL 64 -> 63"
    assert ("mac", "node2") in changes
    back = {c.kind: c for o in walk.reply for c in o.changes}
    assert back["un-dnat"].text == "reverse DNAT (conntrack) 10.244.1.2:8080 -> 10.96.0.10:80"
    assert (walk.verdict, walk.reply_kind, walk.answered_by) == ("answered", "SYN-ACK", "default/web-1")
    assert walk.endpoint is not None and walk.endpoint.pod == "default/web-1"
    d = walk.as_dict()
    assert d["request"][4]["vxlan"] == {
        "outer_src": "172.18.0.2:51000",
        "outer_dst": "172.18.0.3:8472",
        "vni": 1,
        "outer_mac_src": M["eth1"],
        "outer_mac_dst": M["eth2"],
    }


def test_vxlan_is_decoded_on_the_labs_port_only() -> None:
    inner = bytes(Ether() / tcp("10.244.0.2", "10.244.1.2", 1, 2, 64, "S", 5))
    assert parse(vx(inner, "172.18.0.2", "172.18.0.3")).inner is not None  # type: ignore[union-attr]
    assert parse(vx(inner, "172.18.0.2", "172.18.0.3"), frozenset({4789})).inner is None  # type: ignore[union-attr]


def test_rejected_probe_names_the_rule() -> None:
    v = lab()
    src = resolve_source(v, "client")
    plan = plan_probe(v, src, resolve_destination(v, "empty", None, None, src))
    idx = {h.label: i for i, h in enumerate(plan.hops)}
    req = IP(src="10.244.0.2", dst="10.96.0.12", id=ID, ttl=64) / TCP(sport=SPORT, dport=80, flags="S", seq=SEQ)
    icmp = bytes(Ether() / IP(src="10.244.0.1", dst="10.244.0.2", id=0) / ICMP(type=3, code=3) / bytes(req)[:28])
    frames = [
        Captured(idx["default/client/eth0"], 10, True, bytes(Ether() / req)),
        Captured(idx["node1/vethc"], 11, False, bytes(Ether() / req)),
        Captured(idx["node1/cni0"], 11, False, bytes(Ether() / req)),
        Captured(idx["node1/cni0"], 20, True, icmp),
        Captured(idx["node1/vethc"], 21, True, icmp),
        Captured(idx["default/client/eth0"], 22, False, icmp),
    ]
    pkt = parse(bytes(Ether() / req))
    assert pkt is not None
    drop = TraceEvent(
        9, 2, "filter", "FORWARD", "rule", "jump", "KUBE-SERVICES", 3, packet=pkt.ip, node="node1", ts_ns=12
    )
    rej = TraceEvent(9, 2, "filter", "KUBE-SERVICES", "rule", "drop", None, 11, node="node1", ts_ns=12)
    rej.rule = (
        '-A KUBE-SERVICES -d 10.96.0.12/32 -p tcp -m comment --comment "default/empty has no endpoints" -j REJECT'
    )
    spec = ProbeSpec(1, "tcp", IPv4Address("10.244.0.2"), IPv4Address("10.96.0.12"), SPORT, 80, ID, seq=SEQ, sent_ns=5)
    (walk,) = correlate(plan, [spec], frames, [drop, rej], end_ns=100)
    assert walk.verdict == "rejected"
    assert walk.reply_kind == "port-unreachable"
    assert walk.stopped_at == "node1/cni0"
    assert walk.reason.startswith("Service default/empty has no endpoints; rejected at node node1 by -A KUBE-SERVICES")
    assert "in filter KUBE-SERVICES; path filter FORWARD -> KUBE-SERVICES" in walk.reason


def test_udp_reply_is_followed_from_the_reverse_tuple() -> None:
    v = lab()
    src = resolve_source(v, "client")
    plan = plan_probe(v, src, resolve_destination(v, "web-0:5353", None, "udp", src))
    idx = {h.label: i for i, h in enumerate(plan.hops)}
    nonce = b"netlab-probe 00ff"
    req = bytes(Ether() / IP(src="10.244.0.2", dst="10.244.0.3", id=ID) / UDP(sport=SPORT, dport=5353) / Raw(nonce))
    rep = bytes(Ether() / IP(src="10.244.0.3", dst="10.244.0.2", id=0) / UDP(sport=5353, dport=SPORT) / Raw(b"web-0\n"))
    other = bytes(Ether() / IP(src="10.244.0.3", dst="10.244.0.9", id=0) / UDP(sport=5353, dport=1) / Raw(b"web-0\n"))
    frames = [
        Captured(idx["default/client/eth0"], 10, True, req),
        Captured(idx["node1/vethc"], 11, False, req),
        Captured(idx["node1/veth0"], 15, True, req),
        Captured(idx["default/web-0/eth0"], 16, False, req),
        Captured(idx["default/web-0/eth0"], 30, True, rep),
        Captured(idx["default/web-0/eth0"], 31, True, other),
        Captured(idx["node1/veth0"], 32, False, rep),
        Captured(idx["node1/vethc"], 35, True, rep),
        Captured(idx["default/client/eth0"], 36, False, rep),
    ]
    spec = ProbeSpec(
        1, "udp", IPv4Address("10.244.0.2"), IPv4Address("10.244.0.3"), SPORT, 5353, ID, nonce=nonce, sent_ns=5
    )
    (walk,) = correlate(plan, [spec], frames, end_ns=100)
    assert [o.hop.label for o in walk.reply] == [
        "default/web-0/eth0",
        "node1/veth0",
        "node1/vethc",
        "default/client/eth0",
    ]
    assert walk.verdict == "answered" and walk.reply_kind == "UDP reply"
    bridged = [c for o in walk.request for c in o.changes if c.kind == "bridged"]
    assert bridged and bridged[0].text == "bridged by cni0 from port vethc to port veth0"


def test_lost_probe_says_where_and_arp() -> None:
    v = lab()
    src = resolve_source(v, "client")
    plan = plan_probe(v, src, resolve_destination(v, "192.0.2.1:80", None, None, src))
    idx = {h.label: i for i, h in enumerate(plan.hops)}
    req = bytes(Ether() / tcp("10.244.0.2", "192.0.2.1", SPORT, 80, 64, "S", SEQ))
    from scapy.layers.l2 import ARP

    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="172.18.0.2", pdst="172.18.0.1"))
    frames = [
        Captured(idx["default/client/eth0"], 10, True, req),
        Captured(idx["node1/vethc"], 11, False, req),
        Captured(idx["node1/eth0"], 20, True, arp),
        Captured(idx["underlay/br0"], 21, False, arp),
    ]
    spec = ProbeSpec(1, "tcp", IPv4Address("10.244.0.2"), IPv4Address("192.0.2.1"), SPORT, 80, ID, seq=SEQ, sent_ns=5)
    (walk,) = correlate(plan, [spec], frames, end_ns=100)
    assert walk.verdict == "lost"
    assert walk.reason == "ARP failure: who-has 172.18.0.1 on node1/eth0 got no answer"
    assert walk.stopped_at == "node1/vethc"


def test_probes_split_by_window() -> None:
    plan, spec, frames = cross_node_service()
    spec2 = ProbeSpec(2, "tcp", spec.src, spec.dst, SPORT + 1, 80, ID + 1, seq=SEQ + 100, sent_ns=3000)
    walks = correlate(plan, [spec, spec2], frames, end_ns=5000)  # type: ignore[arg-type]
    assert len(walks[0].request) == 11 and walks[1].request == [] and walks[1].verdict == "lost"
    assert walks[1].reason == "the probe was not seen leaving the source"


def test_no_route_is_reported_for_the_node_that_lost_it() -> None:
    from netlab.probe.correlate import diagnose

    v = lab()
    src = resolve_source(v, "client")
    plan = plan_probe(v, src, resolve_destination(v, "192.0.2.1:80", None, None, src))
    idx = {h.label: i for i, h in enumerate(plan.hops)}
    req = bytes(Ether() / tcp("10.244.0.2", "192.0.2.1", SPORT, 80, 64, "S", SEQ))
    frames = [
        Captured(idx["default/client/eth0"], 10, True, req),
        Captured(idx["node1/vethc"], 11, False, req),
        Captured(idx["node1/cni0"], 11, False, req),
    ]
    spec = ProbeSpec(1, "tcp", IPv4Address("10.244.0.2"), IPv4Address("192.0.2.1"), SPORT, 80, ID, seq=SEQ, sent_ns=5)
    (walk,) = correlate(plan, [spec], frames, end_ns=100)
    assert walk.reason == "last seen at node1/cni0 (in); never reached node1/eth0"
    diagnose(plan, walk, {"node1": "no route to 192.0.2.1 in node node1"})
    assert (walk.verdict, walk.reason, walk.stopped_at) == ("lost", "no route to 192.0.2.1 in node node1", "node1/cni0")
