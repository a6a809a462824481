"""Unit tests for `netlab.trace.nftables`: packets walked through rendered nftables rules, no kernel.

One node (node1, 172.18.0.2, pods 10.244.0.0/24; node2's pods are 10.244.1.0/24; cluster CIDR
10.244.0.0/16, service CIDR 10.96.0.0/12, an outside client 203.0.113.2). Every case runs against
both endpoint dispatch forms the renderer offers; they must behave the same.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from netlab.render.model import Endpoint, NodeContext, ServicePort
from netlab.render.nftables import nft_state, render_nftables
from netlab.topology.schema import Protocol
from netlab.trace import TraceResult
from netlab.trace.nftables import NftTable, NftTraceError, trace_nftables

NODE1 = NodeContext(
    name="node1",
    node_ips=(IPv4Address("172.18.0.2"),),
    cluster_cidr=IPv4Network("10.244.0.0/16"),
    service_cidrs=(IPv4Network("10.96.0.0/12"),),
)
NODE2 = replace(NODE1, name="node2", node_ips=(IPv4Address("172.18.0.3"),))
NODE_IPS = ["172.18.0.2"]
OUTSIDE = "203.0.113.2"
POD = "10.244.0.20"  # a client pod on node1


def ep(ip: str, port: int = 8080, node: str = "node2") -> Endpoint:
    return Endpoint(IPv4Address(ip), port, node)


def svc(name: str, vip: str, port: int, *endpoints: Endpoint, proto: Protocol = Protocol.TCP, **kw: Any) -> ServicePort:
    return ServicePort("default", name, "http", proto, IPv4Address(vip), port, endpoints=endpoints, **kw)


WEB = svc("web", "10.96.0.100", 80, ep("10.244.0.5", node="node1"), ep("10.244.1.5"), ep("10.244.1.6"))
API = svc("api", "10.96.0.20", 80, ep("10.244.0.7", node="node1"), ep("10.244.1.7"), node_port=30080)
API_LOCAL = svc(
    "api-local",
    "10.96.0.21",
    80,
    ep("10.244.0.8", node="node1"),
    ep("10.244.1.8"),
    node_port=30081,
    external_local=True,
)
ETP_REMOTE = svc("etp-remote", "10.96.0.22", 80, ep("10.244.1.10"), node_port=30082, external_local=True)
ITP_LOCAL = svc("itp", "10.96.0.50", 80, ep("10.244.0.9", node="node1"), ep("10.244.1.9"), internal_local=True)
ITP_REMOTE = svc("itp-remote", "10.96.0.51", 80, ep("10.244.1.11"), internal_local=True)
EMPTY = svc("empty", "10.96.0.40", 80, node_port=30040)
DNS = svc("dns", "10.96.0.10", 53, ep("10.244.0.3", 53, "node1"), ep("10.244.1.3", 53), proto=Protocol.UDP)
STICKY = svc("sticky", "10.96.0.30", 80, ep("10.244.0.12", node="node1"), ep("10.244.1.12"), affinity_timeout=10800)
ALL = [WEB, API, API_LOCAL, ETP_REMOTE, ITP_LOCAL, ITP_REMOTE, EMPTY, DNS, STICKY]

WEB_EPS = ["10.244.0.5:8080", "10.244.1.5:8080", "10.244.1.6:8080"]
API_EPS = ["10.244.0.7:8080", "10.244.1.7:8080"]
LOCAL_EPS = ["10.244.0.8:8080", "10.244.1.8:8080"]

# (case, src, dst, proto, dport, endpoints, masq)
CASES: list[tuple[str, str, str, str, int, list[str] | None, bool]] = [
    ("same-node pod -> ClusterIP", POD, "10.96.0.100", "tcp", 80, WEB_EPS, False),
    ("host -> ClusterIP", "172.18.0.2", "10.96.0.100", "tcp", 80, WEB_EPS, True),
    ("outside -> ClusterIP (routed to the node)", OUTSIDE, "10.96.0.100", "tcp", 80, WEB_EPS, True),
    ("hairpin: endpoint -> its own service", "10.244.0.5", "10.96.0.100", "tcp", 80, WEB_EPS, True),
    ("outside -> NodePort", OUTSIDE, "172.18.0.2", "tcp", 30080, API_EPS, True),
    ("pod -> NodePort", POD, "172.18.0.2", "tcp", 30080, API_EPS, True),
    ("host -> own NodePort", "172.18.0.2", "172.18.0.2", "tcp", 30080, API_EPS, True),
    ("NodePort on loopback is not a NodePort", "172.18.0.2", "127.0.0.1", "tcp", 30080, None, False),
    ("NodePort on another node's address", OUTSIDE, "172.18.0.3", "tcp", 30080, None, False),
    ("outside -> NodePort eTP Local", OUTSIDE, "172.18.0.2", "tcp", 30081, ["10.244.0.8:8080"], False),
    ("pod -> NodePort eTP Local (short-circuit)", POD, "172.18.0.2", "tcp", 30081, LOCAL_EPS, False),
    ("host -> NodePort eTP Local (short-circuit)", "172.18.0.2", "172.18.0.2", "tcp", 30081, LOCAL_EPS, True),
    ("outside -> NodePort eTP Local, no local endpoint", OUTSIDE, "172.18.0.2", "tcp", 30082, ["DROP"], False),
    ("pod -> NodePort eTP Local, no local endpoint", POD, "172.18.0.2", "tcp", 30082, ["10.244.1.10:8080"], False),
    ("pod -> ClusterIP iTP Local", POD, "10.96.0.50", "tcp", 80, ["10.244.0.9:8080"], False),
    ("pod -> ClusterIP iTP Local, no local endpoint", POD, "10.96.0.51", "tcp", 80, ["DROP"], False),
    ("unknown port on a ClusterIP", POD, "10.96.0.100", "tcp", 81, ["REJECT"], False),
    ("wrong protocol on a ClusterIP", POD, "10.96.0.100", "udp", 80, ["REJECT"], False),
    ("unallocated ClusterIP", POD, "10.96.0.99", "tcp", 80, ["DROP"], False),
    ("outside the service CIDR", POD, "8.8.8.8", "udp", 53, None, False),
    ("ClusterIP without endpoints", POD, "10.96.0.40", "tcp", 80, ["REJECT"], False),
    ("outside -> NodePort without endpoints", OUTSIDE, "172.18.0.2", "tcp", 30040, ["REJECT"], False),
    ("host -> own NodePort without endpoints", "172.18.0.2", "172.18.0.2", "tcp", 30040, ["REJECT"], False),
    ("UDP service", POD, "10.96.0.10", "udp", 53, ["10.244.0.3:53", "10.244.1.3:53"], False),
    ("TCP to a UDP-only port", POD, "10.96.0.10", "tcp", 53, ["REJECT"], False),
    (
        "ClientIP affinity (first connection)",
        POD,
        "10.96.0.30",
        "tcp",
        80,
        ["10.244.0.12:8080", "10.244.1.12:8080"],
        False,
    ),
]


@pytest.fixture(scope="module", params=["vmap", "rules"])
def script(request: pytest.FixtureRequest) -> str:
    return render_nftables(NODE1, ALL, endpoint_dispatch=request.param)


def trace(script: str, src: str, dst: str, dport: int, proto: str = "tcp") -> TraceResult:
    return trace_nftables(script, src=src, dst=dst, proto=proto, dport=dport, node_ips=NODE_IPS)


@pytest.mark.parametrize(
    ("case", "src", "dst", "proto", "dport", "endpoints", "masq"), CASES, ids=[c[0] for c in CASES]
)
def test_packet(
    script: str, case: str, src: str, dst: str, proto: str, dport: int, endpoints: list[str] | None, masq: bool
) -> None:
    got = trace(script, src, dst, dport, proto)
    assert (got.endpoints, got.masq) == (endpoints, masq), "\n".join(got.matched)


def test_other_node_pod_uses_its_own_nodes_rules() -> None:
    """The same services seen from node2: its pods reach every endpoint, its NodePort eTP Local only node2's."""
    script = render_nftables(NODE2, ALL)
    got = trace_nftables(script, src="10.244.1.20", dst="10.96.0.100", proto="tcp", dport=80, node_ips=["172.18.0.3"])
    assert (got.endpoints, got.masq) == (WEB_EPS, False)
    got = trace_nftables(script, src=OUTSIDE, dst="172.18.0.3", proto="tcp", dport=30081, node_ips=["172.18.0.3"])
    assert (got.endpoints, got.masq) == (["10.244.1.8:8080"], False)
    got = trace_nftables(script, src="10.244.1.20", dst="10.96.0.51", proto="tcp", dport=80, node_ips=["172.18.0.3"])
    assert got.endpoints == ["10.244.1.11:8080"]


def test_matched_rules_explain_the_result(script: str) -> None:
    got = trace(script, OUTSIDE, "172.18.0.2", 30080)
    assert any("jump services" in m for m in got.matched)
    assert any("dnat to 10.244.0.7:8080" in m for m in got.matched)
    assert any("masquerade fully-random" in m for m in got.matched)


def test_full_then_partial_scripts() -> None:
    old, new = [WEB, API], [replace(WEB, endpoints=WEB.endpoints[:1]), API_LOCAL]
    script = render_nftables(NODE1, old) + render_nftables(NODE1, new, previous=nft_state(NODE1, old))
    assert trace(script, POD, "10.96.0.100", 80).endpoints == ["10.244.0.5:8080"]
    assert trace(script, POD, "10.96.0.20", 80).endpoints == ["DROP"]  # api is gone: unallocated now
    assert trace(script, OUTSIDE, "172.18.0.2", 30081).endpoints == ["10.244.0.8:8080"]
    assert trace(script, OUTSIDE, "172.18.0.2", 30080).endpoints is None


# --- a changed rule changes the outcome -------------------------------------------------------------------


def _mutate(script: str, old: str, new: str) -> str:
    assert script.count(old) >= 1, old
    return script.replace(old, new)


def test_mutations_change_the_outcome() -> None:
    script = render_nftables(NODE1, ALL)
    base = trace(script, POD, "10.96.0.100", 80)
    assert (base.endpoints, base.masq) == (WEB_EPS, False)

    # detect-local inverted: pod traffic is masqueraded
    flipped = _mutate(script, "ip saddr != 10.244.0.0/16 jump", "ip saddr 10.244.0.0/16 jump")
    assert trace(flipped, POD, "10.96.0.100", 80).masq is True

    # the masquerade bit set and the bit tested disagree: nothing is masqueraded any more
    wrong_bit = _mutate(
        script, "mark-for-masquerade mark set mark or 0x004000", "mark-for-masquerade mark set mark or 0x008000"
    )
    assert trace(wrong_bit, OUTSIDE, "172.18.0.2", 30080).masq is False

    # postrouting no longer jumps to masquerading
    no_jump = _mutate(script, "add rule ip kube-proxy nat-postrouting jump masquerading\n", "")
    assert trace(no_jump, OUTSIDE, "172.18.0.2", 30080).masq is False

    # one endpoint lost from the random choice: that branch is not DNATed and cluster-ips-check rejects it
    lost = _mutate(script, " , 2 : goto endpoint-", " } #")
    lost = "\n".join(line.split(" } #")[0] + " }" if " } #" in line else line for line in lost.splitlines()) + "\n"
    got = trace(lost, POD, "10.96.0.100", 80)
    assert got.endpoints == WEB_EPS[:2] + ["REJECT"]

    # cluster-ips-check run before DNAT (in the -110 prerouting chain): valid ClusterIP traffic is refused
    early = _mutate(
        script,
        "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check",
        "add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump cluster-ips-check",
    )
    assert trace(early, POD, "10.96.0.100", 80).endpoints == ["REJECT"]

    # a no-endpoint verdict changed from reject to drop
    dropped = _mutate(script, '"default/empty:http" : goto reject-chain', '"default/empty:http" : drop')
    assert trace(dropped, POD, "10.96.0.40", 80).endpoints == ["DROP"]

    # NodePorts only on @nodeport-ips with the wrong address: the NodePort is gone
    ips = render_nftables(NODE1, ALL, nodeport_addresses=[IPv4Address("172.18.0.9")])
    assert trace(ips, OUTSIDE, "172.18.0.2", 30080).endpoints is None
    ips = render_nftables(NODE1, ALL, nodeport_addresses=[IPv4Address("172.18.0.2")])
    assert trace(ips, OUTSIDE, "172.18.0.2", 30080).endpoints == API_EPS


def test_rules_dispatch_mutation_shows_fall_through() -> None:
    script = render_nftables(NODE1, [WEB], endpoint_dispatch="rules")
    broken = _mutate(script, "numgen random mod 2 == 0 goto", "numgen random mod 3 == 0 goto")
    assert trace(broken, POD, "10.96.0.100", 80).endpoints == WEB_EPS  # still all reachable
    broken = _mutate(script, "http goto endpoint-", "http numgen random mod 2 == 0 goto endpoint-")
    assert trace(broken, POD, "10.96.0.100", 80).endpoints == WEB_EPS + ["REJECT"]


# --- what the tracer refuses ------------------------------------------------------------------------------


def test_unknown_shapes_raise() -> None:
    script = render_nftables(NODE1, [WEB])
    with pytest.raises(NftTraceError, match="unknown rule shape"):
        NftTable.from_script(script + "add rule ip kube-proxy services counter\n")
    with pytest.raises(NftTraceError, match="unsupported statement"):
        NftTable.from_script(script + "insert rule ip kube-proxy services drop\n")
    with pytest.raises(NftTraceError, match="only table ip kube-proxy"):
        NftTable.from_script("add table ip filter\n")
    with pytest.raises(NftTraceError, match="unknown rule shape"):
        trace(script + "add rule ip kube-proxy services ip daddr 10.96.0.100 tcp dport 80 drop\n", POD, "10.96.0.1", 80)


def test_kernel_refusals_are_modelled() -> None:
    script = render_nftables(NODE1, [WEB])
    chain = next(w for w in script.split() if w.startswith("service-") and "/web/" in w)
    with pytest.raises(NftTraceError, match="EBUSY"):
        NftTable.from_script(script + f"delete chain ip kube-proxy {chain}\n")
    with pytest.raises(NftTraceError, match="EEXIST"):
        NftTable.from_script(script + "add element ip kube-proxy service-ips { 10.96.0.100 . tcp . 80 : drop }\n")
    with pytest.raises(NftTraceError, match="ENOENT"):
        NftTable.from_script(script + "flush chain ip kube-proxy service-nope\n")
    with pytest.raises(NftTraceError, match="ENOENT"):
        NftTable.from_script(script + "delete element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 }\n")
    with pytest.raises(NftTraceError, match="EBUSY"):
        NftTable.from_script(script + "delete map ip kube-proxy service-ips\n")
    with pytest.raises(NftTraceError, match="missing chain"):
        NftTable.from_script(script + "add rule ip kube-proxy services goto nowhere\n")
    with pytest.raises(NftTraceError, match="hook properties"):
        NftTable.from_script(script + "add chain ip kube-proxy nat-output { type nat hook output priority 0 ; }\n")


def test_flush_table_keeps_elements() -> None:
    table = NftTable.from_script(render_nftables(NODE1, [WEB]) + "flush table ip kube-proxy\n")
    assert all(not c.rules for c in table.chains.values())
    assert table.containers["service-ips"].elements
