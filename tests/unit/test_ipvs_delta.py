"""Unit tests for IPVS mode's partial sync pieces that need no kernel: `render_ipvs_delta` (the
change between two plans, from the changed services only) and the hand-made IPVS netlink
messages of `netlab.kernel.ipvs` (checked byte for byte against pyroute2's encoder and decoder).

The delta's property: applied to `render_ipvs(old)`, it gives `render_ipvs(new)` (the same
virtual servers, ipset entries, kube-ipvs0 addresses and fixed iptables rules).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

import pytest
from pyroute2.netlink.generic.ipvs import ipvsmsg
from test_render_ipvs import (  # the same services and node (pytest puts tests/unit on sys.path)
    API,
    API_LOCAL,
    DNS,
    DNS_TCP,
    EMPTY,
    ETP_LOCAL_REMOTE,
    ITP_LOCAL_REMOTE,
    NODE1,
    NODE1_ADDRESSES,
    STICKY,
    UDP_NODEPORT,
    WEB,
    ep,
    svc,
)

from netlab.kernel import ipvs as kipvs
from netlab.render.ipvs import (
    IpvsState,
    RealServer,
    VirtualServer,
    ipvsadm_order,
    render_ipvs,
    render_ipvs_delta,
)
from netlab.render.model import ServicePort
from netlab.topology.schema import IpvsScheduler

A = IPv4Address
ALL = [WEB, API, DNS, DNS_TCP, STICKY, EMPTY, ITP_LOCAL_REMOTE, ETP_LOCAL_REMOTE, UDP_NODEPORT]


def apply(state: IpvsState, delta: Any) -> tuple[Any, ...]:
    """`state` with `delta` applied, in the form `summary` gives."""
    table = {v.key: v for v in state.virtual_servers}
    for v in delta.before:
        del table[v.key]
    for v in delta.after:
        table[v.key] = v
    sets = {s.name: set(s.entries) for s in state.ipsets}
    for name, entry in delta.ipset_del:
        assert entry in sets[name], (name, entry)
        sets[name].discard(entry)
    for name, entry in delta.ipset_add:
        assert entry not in sets[name], (name, entry)
        sets[name].add(entry)
    addresses = set(state.addresses)
    assert not set(delta.addresses_add) & addresses
    assert set(delta.addresses_del) <= addresses
    addresses = (addresses | set(delta.addresses_add)) - set(delta.addresses_del)
    iptables = state.iptables if delta.iptables is None else delta.iptables
    return tuple(ipvsadm_order(table.values())), sets, addresses, iptables


def summary(state: IpvsState) -> tuple[Any, ...]:
    return (
        tuple(state.virtual_servers),
        {s.name: set(s.entries) for s in state.ipsets},
        set(state.addresses),
        state.iptables,
    )


def check(old: list[ServicePort], new: list[ServicePort], addresses: Any = None) -> Any:
    kw = {"nodeport_addresses": addresses}
    delta = render_ipvs_delta(NODE1, old, new, **kw)
    assert apply(render_ipvs(NODE1, old, **kw), delta) == summary(render_ipvs(NODE1, new, **kw))
    return delta


WEB2 = svc("default/web2:http", "10.96.0.101", 80, ep("10.244.0.5", 8080, "node1"), ep("10.244.1.5", 8080, "node2"))
API_TCP_PORT2 = svc("default/api:metrics", "10.96.0.20", 9090, ep("10.244.0.7", 9090, "node1"), node_port=30090)


@pytest.mark.parametrize(
    "old,new",
    [
        ([], []),
        (ALL, ALL),
        ([], ALL),
        (ALL, []),
        (ALL, [s for s in ALL if s is not WEB]),
        ([WEB, WEB2], [WEB2]),  # WEB2 still uses 10.244.0.5:8080: KUBE-LOOP-BACK keeps it
        ([WEB2], [WEB, WEB2]),
        ([WEB], [replace(WEB, endpoints=WEB.endpoints[1:])]),  # the local endpoint goes: LOOP-BACK empties
        ([WEB, DNS, DNS_TCP], [WEB, DNS]),  # a port of a two-port ClusterIP goes: the address stays
        ([WEB, DNS], [WEB, DNS, DNS_TCP]),
        ([API], [API_LOCAL]),  # externalTrafficPolicy flips: NODE-PORT-LOCAL-TCP fills
        ([API, API_TCP_PORT2], [API]),
        ([API], [replace(API, node_port=30081)]),
        ([EMPTY], [replace(EMPTY, endpoints=(ep("10.244.0.9", 80, "node1"),))]),
        ([STICKY], [replace(STICKY, affinity_timeout=60)]),
        ([WEB], [replace(WEB, ipvs_scheduler=IpvsScheduler.MH)]),
        ([UDP_NODEPORT, WEB], [WEB]),  # the last UDP NodePort goes: its rule goes
        ([WEB], [replace(WEB, cluster_ip=A("10.96.0.102"))]),
    ],
)
@pytest.mark.parametrize("addresses", [None, NODE1_ADDRESSES])
def test_delta_applied_to_old_state_gives_the_new_one(
    old: list[ServicePort], new: list[ServicePort], addresses: Any
) -> None:
    check(old, new, addresses)


def test_no_change_is_an_empty_delta() -> None:
    assert not check(ALL, list(ALL), NODE1_ADDRESSES)


def test_one_endpoint_of_many_services_touches_one_virtual_server_only() -> None:
    """The benchmark's change: every service shares the same endpoints; dropping one from one
    service touches its virtual server and nothing else (the endpoint's hairpin entry stays)."""
    eps = tuple(ep(f"10.244.0.{i}", 8080, "node1") for i in (2, 3, 4))
    old = [svc(f"default/s{i:03d}", str(A("10.96.0.10") + i), 80, *eps) for i in range(50)]
    new = list(old)
    new[25] = replace(old[25], endpoints=eps[:2])
    delta = check(old, new)
    assert [v.addr for v in delta.before] == [v.addr for v in delta.after] == ["10.96.0.35:80"]
    assert len(delta.before[0].real_servers) == 3 and len(delta.after[0].real_servers) == 2
    assert not delta.ipset_add and not delta.ipset_del and delta.iptables is None
    assert not delta.addresses_add and not delta.addresses_del


# --- the hand-made netlink messages ------------------------------------------------------------------

VS = VirtualServer("TCP", A("10.96.0.10"), 80, "rr")
VS_STICKY = VirtualServer("UDP", A("10.96.0.30"), 53, "wlc", flags=1, timeout=10800)
VS_MH = VirtualServer("TCP", A("172.18.0.2"), 30080, "mh", flags=0x10)
RS = RealServer(A("10.244.0.2"), 8080)
RS_DRAIN = RealServer(A("10.244.1.200"), 65535, weight=0)


def _pyroute2(cmd: int, attrs: list[tuple[str, Any]], seq: int, family: int) -> bytes:
    msg = ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = kipvs.GENL_VERSION
    msg["attrs"] = attrs
    msg["header"]["type"] = family
    msg["header"]["flags"] = kipvs.NLM_F_REQUEST | kipvs.NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def _svc_attrs(vs: VirtualServer, full: bool) -> dict[str, Any]:
    attrs: list[tuple[str, Any]] = [
        ("IPVS_SVC_ATTR_AF", socket.AF_INET),
        ("IPVS_SVC_ATTR_PROTOCOL", {"TCP": 6, "UDP": 17}[vs.protocol]),
        ("IPVS_SVC_ATTR_ADDR", str(vs.ip)),
        ("IPVS_SVC_ATTR_PORT", vs.port),
    ]
    if full:
        attrs += [
            ("IPVS_SVC_ATTR_SCHED_NAME", vs.scheduler),
            ("IPVS_SVC_ATTR_FLAGS", {"flags": vs.flags, "mask": 0xFFFFFFFF}),
            ("IPVS_SVC_ATTR_TIMEOUT", vs.timeout),
            ("IPVS_SVC_ATTR_NETMASK", "255.255.255.255"),
        ]
    return {"attrs": attrs}


def _dest_attrs(rs: RealServer, full: bool) -> dict[str, Any]:
    attrs: list[tuple[str, Any]] = [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", socket.AF_INET),
        ("IPVS_DEST_ATTR_ADDR", str(rs.ip)),
        ("IPVS_DEST_ATTR_PORT", rs.port),
    ]
    if full:
        attrs += [
            ("IPVS_DEST_ATTR_FWD_METHOD", rs.forward),
            ("IPVS_DEST_ATTR_WEIGHT", rs.weight),
            ("IPVS_DEST_ATTR_U_THRESH", 0),
            ("IPVS_DEST_ATTR_L_THRESH", 0),
        ]
    return {"attrs": attrs}


class _Queue(kipvs.Ipvs):
    """An Ipvs without a socket: only the queue."""

    def __init__(self) -> None:  # noqa: D107 - no socket, no family lookup
        self.where, self.seq, self.queue, self.requests, self.family = "test", 0, [], 0, 0x1F
        self._keys = {}


@pytest.mark.parametrize("vs", [VS, VS_STICKY, VS_MH])
@pytest.mark.parametrize("rs", [RS, RS_DRAIN])
def test_requests_are_what_pyroute2_encodes(vs: VirtualServer, rs: RealServer) -> None:
    q = _Queue()
    q.add_service(vs)
    q.set_service(vs)
    q.del_service(vs)
    q.add_dest(vs, rs)
    q.set_dest(vs, rs)
    q.del_dest(vs, rs)
    q.flush()
    svc_only = [("IPVS_CMD_ATTR_SERVICE", _svc_attrs(vs, False))]
    want = [
        (kipvs.IPVS_CMD_NEW_SERVICE, [("IPVS_CMD_ATTR_SERVICE", _svc_attrs(vs, True))]),
        (kipvs.IPVS_CMD_SET_SERVICE, [("IPVS_CMD_ATTR_SERVICE", _svc_attrs(vs, True))]),
        (kipvs.IPVS_CMD_DEL_SERVICE, svc_only),
        (kipvs.IPVS_CMD_NEW_DEST, [*svc_only, ("IPVS_CMD_ATTR_DEST", _dest_attrs(rs, True))]),
        (kipvs.IPVS_CMD_SET_DEST, [*svc_only, ("IPVS_CMD_ATTR_DEST", _dest_attrs(rs, True))]),
        (kipvs.IPVS_CMD_DEL_DEST, [*svc_only, ("IPVS_CMD_ATTR_DEST", _dest_attrs(rs, False))]),
        (kipvs.IPVS_CMD_FLUSH, []),
    ]
    assert [seq for seq, _, _ in q.queue] == list(range(1, 8))
    for (seq, data, _), (cmd, attrs) in zip(q.queue, want, strict=True):
        assert data == _pyroute2(cmd, attrs, seq, q.family), cmd


def _reply(cmd: int, attrs: list[tuple[str, Any]]) -> bytes:
    """A dump reply as the kernel sends it (addresses as the 16-byte nf_inet_addr union)."""
    return _pyroute2(cmd, attrs, 9, 0x1F)


def test_dump_replies_decode_like_pyroute2() -> None:
    svc_attrs = _svc_attrs(VS_STICKY, True)["attrs"] + [("IPVS_SVC_ATTR_FWMARK", 0)]
    svc_attrs[5] = ("IPVS_SVC_ATTR_FLAGS", {"flags": 1 | 0x2, "mask": 0xFFFFFFFF})  # the kernel adds HASHED
    got = kipvs.parse_service(_reply(kipvs.IPVS_CMD_NEW_SERVICE, [("IPVS_CMD_ATTR_SERVICE", {"attrs": svc_attrs})]))
    assert got == VS_STICKY
    dest = _dest_attrs(RS_DRAIN, True)["attrs"] + [
        ("IPVS_DEST_ATTR_ACTIVE_CONNS", 2),
        ("IPVS_DEST_ATTR_INACT_CONNS", 7),
        ("IPVS_DEST_ATTR_PERSIST_CONNS", 1),
    ]
    got_rs = kipvs.parse_dest(_reply(kipvs.IPVS_CMD_NEW_DEST, [("IPVS_CMD_ATTR_DEST", {"attrs": dest})]))
    assert got_rs == replace(RS_DRAIN, active=2, inactive=7, persistent=1)


def test_dump_reply_with_the_kernels_16_byte_address_and_nested_flag() -> None:
    """The kernel sends IPVS_SVC_ATTR_ADDR as the whole nf_inet_addr union and may mark nested
    attributes with NLA_F_NESTED."""
    body = (
        kipvs._u16(kipvs.SVC_AF, socket.AF_INET)
        + kipvs._u16(kipvs.SVC_PROTOCOL, 6)
        + kipvs._nla(kipvs.SVC_ADDR, A("10.96.0.10").packed + bytes(12))
        + kipvs._be16(kipvs.SVC_PORT, 80)
        + kipvs._nla(kipvs.SVC_SCHED_NAME, b"rr\0")
        + kipvs._nla(kipvs.SVC_FLAGS, struct.pack("=II", 2, 0xFFFFFFFF))
        + kipvs._u32(kipvs.SVC_TIMEOUT, 0)
    )
    payload = kipvs._nla(kipvs.IPVS_CMD_ATTR_SERVICE | 0x8000, body)
    msg = kipvs._HDR.pack(20 + 4 + len(payload), 0x1F, 2, 1, 0) + kipvs._GENL.pack(1, 1, 0) + payload
    assert kipvs.parse_service(msg) == VS
    ipv6 = msg.replace(kipvs._u16(kipvs.SVC_AF, socket.AF_INET), kipvs._u16(kipvs.SVC_AF, socket.AF_INET6))
    assert kipvs.parse_service(ipv6) is None


def test_changed_subset_shortcut_matches_nftables() -> None:
    from netlab.render.ipvs import changed_subset as ipvs_subset
    from netlab.render.nftables import changed_subset

    moved = replace(API_TCP_PORT2, node_port=30080, protocol=API.protocol)
    for old, new in [
        (ALL, ALL),
        (ALL, [replace(s, endpoints=()) if s is DNS else s for s in ALL]),  # shares DNS_TCP's ClusterIP
        ([API, API_TCP_PORT2], [replace(API, node_port=30070), moved]),  # a NodePort moves
        ([WEB, WEB2], [WEB2, WEB]),  # reordered: the general path
        (ALL, ALL[1:]),
    ]:
        assert ipvs_subset(old, new) == changed_subset(old, new)


class _FakeNetlink:
    """Acks like the kernel: an error for every refused sequence number, an ack for NLM_F_ACK."""

    def __init__(self, refuse: set[int]) -> None:
        self.refuse, self.sent, self.replies = refuse, [], []

    def send(self, chunk: Any) -> None:
        chunk = bytes(chunk)
        self.sent.append(chunk)
        off = 0
        while off < len(chunk):
            length, _, flags, seq, _ = kipvs._HDR.unpack_from(chunk, off)
            code = -17 if seq in self.refuse else 0
            if code or flags & kipvs.NLM_F_ACK:
                self.replies.append(
                    kipvs._HDR.pack(36, kipvs.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", code) + bytes(12)
                )
            off += length

    def recv(self, _size: int) -> bytes:
        return self.replies.pop(0)


def test_batches_ask_one_ack_per_send_and_keep_every_error() -> None:
    q = _Queue()
    for i in range(3000):  # more than one 64 KiB send
        q.add_dest(VS, RealServer(A("10.244.0.0") + i, 8080))
    fake = _FakeNetlink(refuse={5, 2999})
    failed = kipvs.send_batch(fake, q.queue)  # type: ignore[arg-type]
    assert len(fake.sent) > 1 and not fake.replies
    for chunk in fake.sent:
        flags = []
        off = 0
        while off < len(chunk):
            length, _, f, _, _ = kipvs._HDR.unpack_from(chunk, off)
            flags.append(f & kipvs.NLM_F_ACK)
            off += length
        assert flags[-1] and not any(flags[:-1])
    assert [kipvs._describe(w) for w, _ in failed] == [
        "add real server 10.244.0.4:8080 of TCP 10.96.0.10:80",
        "add real server 10.244.11.182:8080 of TCP 10.96.0.10:80",
    ]
    assert {err for _, err in failed} == {17}


PROC_IP_VS = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A60001E:0050 rr persistent 10800 FFFFFFFF
  -> 0AF40008:1F90      Masq    1      0          0
TCP  0A600064:0050 rr 
  -> 0AF40005:1F90      Masq    0      1          3
  -> 0AF40006:1F90      Masq    1      0          0
UDP  0A60000A:0035 rr 
TCP  [2001:0db8:0000:0000:0000:0000:0000:0001]:0050 rr 
  -> [2001:0db8:0000:0000:0000:0000:0000:0002]:1F90      Masq    1      0          0
FWM  00000001 rr 
  -> 0AF40009:1F90      Route   1      0          0
"""


def test_proc_ip_vs_listing_gives_every_real_server_in_one_pass() -> None:
    got = kipvs.parse_proc_ip_vs(PROC_IP_VS)
    assert got == {
        ("TCP", A("10.96.0.30"), 80): (RealServer(A("10.244.0.8"), 8080),),
        ("TCP", A("10.96.0.100"), 80): (
            RealServer(A("10.244.0.5"), 8080, weight=0, active=1, inactive=3),
            RealServer(A("10.244.0.6"), 8080),
        ),
        ("UDP", A("10.96.0.10"), 53): (),
    }
