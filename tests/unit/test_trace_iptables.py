"""Unit tests for `netlab.trace.iptables`: packets through rendered kube-proxy rules, no kernel.

The lab below (address plan of tests/conftest.py): this node is node1 (172.18.0.2, pods
10.244.0.0/24); node2 has pods 10.244.1.0/24; an outside client is 203.0.113.2. Each case
names the packet and where kube-proxy sends it; the mutation tests then break one rule of a
correct payload and check that the trace notices, so the tracer is shown to be able to fail.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

import pytest

import netlab.topology  # noqa: F401  (first: netlab.render.model imports back into netlab.topology)
from netlab.render.iptables import render_iptables, service_chain
from netlab.render.model import Endpoint, NodeContext, ServicePort
from netlab.topology.schema import Protocol
from netlab.trace.iptables import (
    IptablesConsistencyError,
    IptablesParseError,
    TracePath,
    check_rule_jumps,
    parse_rule,
    sort_iptables_rules,
    trace_iptables,
    trace_iptables_paths,
)

NODE_IP = "172.18.0.2"
NODE = NodeContext(
    name="node1", node_ips=(IPv4Address(NODE_IP),), cluster_cidr=IPv4Network("10.244.0.0/16"), random_fully=False
)
POD_HERE, POD_THERE, OUTSIDE = "10.244.0.50", "10.244.1.50", "203.0.113.2"


def ep(ip: str, port: int, node: str) -> Endpoint:
    return Endpoint(IPv4Address(ip), port, node)


def sp(ns_name: str, port_name: str, vip: str, port: int, *eps: Endpoint, **kw: object) -> ServicePort:
    ns, name = ns_name.split("/")
    proto = kw.pop("protocol", Protocol.TCP)
    return ServicePort(ns, name, port_name, proto, IPv4Address(vip), port, endpoints=eps, **kw)  # type: ignore[arg-type]  # noqa: E501


SERVICES = [
    # Cluster policies, NodePort 30080, one endpoint here and one on node2.
    sp("default/web", "http", "10.96.0.10", 80, ep("10.244.0.2", 8080, "node1"), ep("10.244.1.2", 8080, "node2"),
       node_port=30080),
    # externalTrafficPolicy Local, with a local endpoint.
    sp("default/loc", "", "10.96.0.11", 80, ep("10.244.0.3", 8080, "node1"), ep("10.244.1.3", 8080, "node2"),
       node_port=30081, external_local=True),
    # externalTrafficPolicy Local, no local endpoint.
    sp("default/far", "", "10.96.0.12", 80, ep("10.244.1.4", 8080, "node2"), node_port=30082, external_local=True),
    # internalTrafficPolicy Local, with and without a local endpoint.
    sp("default/itl", "", "10.96.0.13", 80, ep("10.244.0.5", 80, "node1"), ep("10.244.1.5", 80, "node2"),
       internal_local=True),
    sp("default/itn", "", "10.96.0.14", 80, ep("10.244.1.6", 80, "node2"), internal_local=True),
    # No endpoints at all.
    sp("default/empty", "", "10.96.0.15", 80, node_port=30085),
    # UDP DNS.
    sp("kube-system/kube-dns", "dns", "10.96.0.53", 53, ep("10.244.1.7", 53, "node2"), protocol=Protocol.UDP),
    # ClientIP affinity (first packet: no affinity entry yet, so the random choice applies).
    sp("default/sticky", "", "10.96.0.16", 80, ep("10.244.0.8", 80, "node1"), ep("10.244.1.8", 80, "node2"),
       affinity_timeout=10800),
]  # fmt: skip
PAYLOAD = render_iptables(NODE, SERVICES)
WEB = ["10.244.0.2:8080", "10.244.1.2:8080"]
LOC = ["10.244.0.3:8080", "10.244.1.3:8080"]


def trace(payload: str, src: str, dst: str, dport: int, proto: str = "tcp") -> tuple[list[str] | None, bool]:
    r = trace_iptables(payload, src=src, dst=dst, proto=proto, dport=dport, node_ips=[NODE_IP])
    return r.endpoints, r.masq


CASES = [
    # (name, src, dst, dport, proto, endpoints, masq)
    ("pod on this node -> ClusterIP", POD_HERE, "10.96.0.10", 80, "tcp", WEB, False),
    ("pod on another node -> ClusterIP", POD_THERE, "10.96.0.10", 80, "tcp", WEB, False),
    ("outside the cluster -> ClusterIP: masqueraded", OUTSIDE, "10.96.0.10", 80, "tcp", WEB, True),
    ("the node itself -> ClusterIP: masqueraded", NODE_IP, "10.96.0.10", 80, "tcp", WEB, True),
    ("hairpin: an endpoint -> its own service", "10.244.0.2", "10.96.0.10", 80, "tcp", WEB, True),
    ("ClusterIP, port not served", POD_HERE, "10.96.0.10", 81, "tcp", None, False),
    ("ClusterIP, wrong protocol", POD_HERE, "10.96.0.10", 80, "udp", None, False),
    ("unknown address", POD_HERE, "10.96.0.99", 80, "tcp", None, False),
    ("outside -> NodePort (Cluster): masqueraded", OUTSIDE, NODE_IP, 30080, "tcp", WEB, True),
    ("pod -> NodePort (Cluster): masqueraded too", POD_HERE, NODE_IP, 30080, "tcp", WEB, True),
    ("outside -> NodePort on localhost", "127.0.0.1", "127.0.0.1", 30080, "tcp", WEB, True),
    ("outside -> NodePort on another node's IP", OUTSIDE, "172.18.0.3", 30080, "tcp", None, False),
    ("outside -> NodePort not allocated", OUTSIDE, NODE_IP, 31000, "tcp", None, False),
    ("outside -> NodePort (Local): local endpoint only, source kept", OUTSIDE, NODE_IP, 30081, "tcp",
     ["10.244.0.3:8080"], False),
    ("pod -> NodePort (Local): internal traffic, every endpoint", POD_HERE, NODE_IP, 30081, "tcp", LOC, False),
    ("node -> NodePort (Local): every endpoint, masqueraded", NODE_IP, NODE_IP, 30081, "tcp", LOC, True),
    ("outside -> NodePort (Local), no local endpoint: dropped", OUTSIDE, NODE_IP, 30082, "tcp", ["DROP"], False),
    ("pod -> NodePort (Local), no local endpoint: short-circuited", POD_HERE, NODE_IP, 30082, "tcp",
     ["10.244.1.4:8080"], False),
    ("pod -> ClusterIP (Local): ClusterIP of an external-Local service is Cluster", POD_HERE, "10.96.0.12", 80,
     "tcp", ["10.244.1.4:8080"], False),
    ("pod -> ClusterIP (internal Local): local endpoint only", POD_THERE, "10.96.0.13", 80, "tcp",
     ["10.244.0.5:80"], False),
    ("pod -> ClusterIP (internal Local), none here: dropped", POD_HERE, "10.96.0.14", 80, "tcp", ["DROP"], False),
    ("no endpoints -> ClusterIP: rejected", POD_HERE, "10.96.0.15", 80, "tcp", ["REJECT"], False),
    ("no endpoints -> NodePort: rejected", OUTSIDE, NODE_IP, 30085, "tcp", ["REJECT"], False),
    ("UDP DNS", POD_HERE, "10.96.0.53", 53, "udp", ["10.244.1.7:53"], False),
    ("UDP service, TCP packet", POD_HERE, "10.96.0.53", 53, "tcp", None, False),
    ("affinity, first packet", POD_HERE, "10.96.0.16", 80, "tcp", ["10.244.0.8:80", "10.244.1.8:80"], False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "src", "dst", "dport", "proto", "endpoints", "masq"), CASES, ids=[c[0] for c in CASES]
)
def test_packet(name: str, src: str, dst: str, dport: int, proto: str, endpoints: list[str] | None, masq: bool) -> None:
    assert trace(PAYLOAD, src, dst, dport, proto) == (endpoints, masq)


def test_hairpin_masquerades_only_the_path_back_to_itself() -> None:
    paths, _ = trace_iptables_paths(PAYLOAD, src="10.244.0.2", dst="10.96.0.10", proto="tcp", dport=80,
                                    node_ips=[NODE_IP])  # fmt: skip
    assert paths == [TracePath("10.244.0.2:8080", True), TracePath("10.244.1.2:8080", False)]


def test_matched_rules_are_reported() -> None:
    r = trace_iptables(PAYLOAD, src=POD_HERE, dst="10.96.0.53", proto="udp", dport=53, node_ips=[NODE_IP])
    assert r.matched[0].startswith('-A KUBE-SERVICES -m comment --comment "kube-system/kube-dns:dns cluster IP"')
    assert any("-j DNAT --to-destination 10.244.1.7:53" in m for m in r.matched)


# --- the tracer can fail: break one rule, the packet goes elsewhere -------------------------------


def mutate(payload: str, pattern: str, repl: str | None) -> str:
    """Replace (or with None, delete) exactly one line matching `pattern`."""
    lines = payload.splitlines()
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert len(hits) == 1, (pattern, hits)
    if repl is None:
        del lines[hits[0]]
    else:
        lines[hits[0]] = re.sub(pattern, repl, lines[hits[0]])
    return "\n".join(lines) + "\n"


WEB_SVC = service_chain("default/web:http", "tcp")


MUTATIONS = [
    ("drop the off-cluster masquerade rule", rf"^-A {WEB_SVC} .*! -s 10\.244\.0\.0/16 -j KUBE-MARK-MASQ$", None,
     (OUTSIDE, "10.96.0.10", 80), (WEB, True), (WEB, False)),
    ("swap a DNAT port", r"--to-destination 10\.244\.1\.2:8080$", "--to-destination 10.244.1.2:80",
     (POD_HERE, "10.96.0.10", 80), (WEB, False), (["10.244.0.2:8080", "10.244.1.2:80"], False)),
    ("make the last endpoint rule random", rf"^(-A {WEB_SVC} .*10\.244\.1\.2:8080\") -j",
     r"\1 -m statistic --mode random --probability 0.5000000000 -j",
     (POD_HERE, "10.96.0.10", 80), (WEB, False), ([*WEB, "ACCEPT"], False)),
    ("probability 1 on the first endpoint", rf"^(-A {WEB_SVC} .*)--probability 0\.5000000000 -j",
     r"\1--probability 1.0000000000 -j", (POD_HERE, "10.96.0.10", 80), (WEB, False), (WEB[:1], False)),
    ("drop the hairpin rule", r"-s 10\.244\.0\.2 -j KUBE-MARK-MASQ$", None,
     ("10.244.0.2", "10.96.0.10", 80), (WEB, True), (WEB, False)),
    ("drop the NodePort dispatch", r"nodeports; NOTE", None, (OUTSIDE, NODE_IP, 30080), (WEB, True), (None, False)),
    ("wrong NodePort", r"--dport 30080 ", "--dport 30090 ", (OUTSIDE, NODE_IP, 30080), (WEB, True), (None, False)),
    ("no masquerade in KUBE-EXT (Cluster)", r"\"masquerade traffic for default/web:http external", None,
     (OUTSIDE, NODE_IP, 30080), (WEB, True), (WEB, False)),
    ("Local NodePort jumps to KUBE-SVC instead of KUBE-SVL",
     r"^(-A KUBE-EXT-\S+) -j KUBE-SVL-(\S+)$", r"\1 -j KUBE-SVC-\2",
     (OUTSIDE, NODE_IP, 30081), (["10.244.0.3:8080"], False), (LOC, False)),
    ("pod short-circuit lost", r"\"pod traffic for default/far external", None,
     (POD_HERE, NODE_IP, 30082), (["10.244.1.4:8080"], False), (["DROP"], False)),
    ("MASQUERADE rule lost", r"-j MASQUERADE$", None, (OUTSIDE, "10.96.0.10", 80), (WEB, True), (WEB, False)),
    ("mark-masq sets the wrong bit", r"--or-mark 0x4000$", "--or-mark 0x8000",
     (OUTSIDE, "10.96.0.10", 80), (WEB, True), (WEB, False)),
    ("REJECT rule lost", r"\"default/empty has no endpoints\" -m tcp", None,
     (POD_HERE, "10.96.0.15", 80), (["REJECT"], False), (None, False)),
    ("ClusterIP rule written for UDP", r"^(-A KUBE-SERVICES .*kube-dns:dns cluster IP\") -m udp -p udp",
     r"\1 -m tcp -p tcp", (POD_HERE, "10.96.0.53", 53, "udp"), (["10.244.1.7:53"], False), (None, False)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "pattern", "repl", "packet", "before", "after"), MUTATIONS, ids=[m[0] for m in MUTATIONS]
)
def test_mutation_changes_the_trace(
    what: str, pattern: str, repl: str | None, packet: tuple[str, ...], before: tuple[object, bool],
    after: tuple[object, bool],
) -> None:  # fmt: skip
    src, dst, dport, *proto = packet
    args = (src, dst, int(dport), proto[0] if proto else "tcp")
    assert trace(PAYLOAD, *args) == before
    assert trace(mutate(PAYLOAD, pattern, repl), *args) == after, what


# --- strictness: what the tracer does not understand, it refuses ---------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        "-A KUBE-SERVICES -m tcp -p tcp --sport 80 -j KUBE-SVC-X",  # unknown option
        "-A KUBE-SERVICES --dport 80 -j KUBE-SVC-X",  # --dport without -m tcp
        "-A KUBE-SERVICES -m tcp -p udp --dport 80 -j KUBE-SVC-X",  # module/protocol mismatch
        "-A KUBE-SERVICES -m multiport -p tcp --dports 80,81 -j KUBE-SVC-X",  # unknown module
        "-A KUBE-SERVICES -m addrtype --dst-type UNICAST -j KUBE-NODEPORTS",
        "-A KUBE-SERVICES -m statistic --mode nth --every 2 -j KUBE-SEP-X",
        "-A KUBE-SERVICES -d 10.96.0.0/12x -j KUBE-SVC-X",  # bad address
        "-A KUBE-SERVICES -d 10.96.0.10 -d 10.96.0.11 -j KUBE-SVC-X",  # twice
        "-A KUBE-SERVICES ! -p tcp -j KUBE-SVC-X",  # negation we never write
        "-A KUBE-SEP-X -m tcp -p tcp -j DNAT --to-destination 10.244.0.2",  # no port
        "-A KUBE-SEP-X -j SNAT --to-source 1.2.3.4",  # unknown target
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",  # iptables-save form, not ours
        '-A KUBE-SERVICES -m comment --comment "unbalanced -j KUBE-SVC-X',
        "-A KUBE-SERVICES -j KUBE-SVC-X --probability 0.5",  # option after the target
    ],
)
def test_unknown_rule_shapes_raise(rule: str) -> None:
    with pytest.raises(IptablesParseError):
        parse_rule(rule)


def test_payload_structure_is_checked() -> None:
    with pytest.raises(IptablesParseError, match="no COMMIT"):
        trace_iptables("*nat\n:KUBE-SERVICES - [0:0]\n", src=POD_HERE, dst="1.1.1.1", proto="tcp", dport=1,
                       node_ips=[])  # fmt: skip
    with pytest.raises(IptablesParseError, match="not declared"):
        trace_iptables(mutate(PAYLOAD, rf"^:{WEB_SVC} - \[0:0\]$", None), src=POD_HERE, dst="10.96.0.10",
                       proto="tcp", dport=80, node_ips=[NODE_IP])  # fmt: skip
    with pytest.raises(IptablesParseError, match="unexpected line"):
        trace_iptables(PAYLOAD.replace("COMMIT\n*nat", "-I KUBE-SERVICES 1 -j ACCEPT\nCOMMIT\n*nat"), src=POD_HERE,
                       dst="10.96.0.10", proto="tcp", dport=80, node_ips=[NODE_IP])  # fmt: skip


def test_every_rendered_rule_parses() -> None:
    for line in PAYLOAD.splitlines():
        if line.startswith("-A "):
            assert parse_rule(line).raw == line


# --- kube-proxy's helpers, with kube-proxy's own test cases ----------------------------------------


def test_sort_matches_service_names_in_different_comment_styles() -> None:
    """Test_sortIPTablesRules "correctly match same service name in different styles of comments"."""
    text = (
        "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n"
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" svc2 line 1\n'
        "-A KUBE-SERVICES -m comment --comment ns2/svc2 svc2 line 2\n"
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" svc2 line 3\n'
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" svc1 line 1\n'
        "-A KUBE-SERVICES -m comment --comment ns1/svc1 svc1 line 2\n"
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1 blah" svc1 line 3\n'
        "-A KUBE-SERVICES -m comment --comment ns4/svc4 svc4 line 1\n"
        '-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" svc4 line 2\n'
        '-A KUBE-SERVICES -m comment --comment "ns4/svc4 blah" svc4 line 3\n'
        '-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" svc3 line 1\n'
        '-A KUBE-SERVICES -m comment --comment "ns3/svc3 blah" svc3 line 2\n'
        "-A KUBE-SERVICES -m comment --comment ns3/svc3 svc3 line 3\n"
        "COMMIT\n"
    )
    lines = sort_iptables_rules(text).splitlines()
    assert [line.rsplit(" ", 3)[-3:] for line in lines if line.startswith("-A")] == [
        [s, "line", n] for s in ("svc1", "svc2", "svc3", "svc4") for n in "123"
    ]


def test_sort_preserves_unexpected_lines() -> None:
    """Test_sortIPTablesRules "unexpected junk lines are preserved"."""
    text = (
        "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]\n:KUBE-AAAAA - [0:0]\n"
        ":KUBE-ZZZZZ - [0:0]\n:WHY-IS-THIS-CHAIN-HERE - [0:0]\n"
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" svc2 line 1\n'
        "-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80\n"  # noqa: E501
        '-A KUBE-ZZZZZ -m comment --comment "mystery chain number 1"\n'
        "-A KUBE-SERVICES -m comment --comment ns2/svc2 svc2 line 2\n"
        "-A WHY-IS-THIS-CHAIN-HERE -j ACCEPT\n"
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" svc2 line 3\n'
        '-A KUBE-AAAAA -m comment --comment "mystery chain number 2"\n'
        "COMMIT\n"
    )  # fmt: skip
    assert sort_iptables_rules(text) == (
        "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-AAAAA - [0:0]\n:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]\n"
        ":KUBE-ZZZZZ - [0:0]\n:WHY-IS-THIS-CHAIN-HERE - [0:0]\n"
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" svc2 line 1\n'
        "-A KUBE-SERVICES -m comment --comment ns2/svc2 svc2 line 2\n"
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" svc2 line 3\n'
        '-A KUBE-AAAAA -m comment --comment "mystery chain number 2"\n'
        "-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80\n"  # noqa: E501
        '-A KUBE-ZZZZZ -m comment --comment "mystery chain number 1"\n'
        "-A WHY-IS-THIS-CHAIN-HERE -j ACCEPT\n"
        "COMMIT\n"
    )  # fmt: skip


def test_sort_keeps_deleted_chains_and_the_last_rule_last() -> None:
    text = render_iptables(NODE, SERVICES[:2], stale=["KUBE-SVC-AAAAAAAAAAAAAAAA"])
    out = sort_iptables_rules(text)
    nat = out.split("*nat\n", 1)[1].splitlines()
    assert nat[:2] == [":KUBE-NODEPORTS - [0:0]", ":KUBE-SERVICES - [0:0]"]
    services = [line for line in nat if line.startswith("-A KUBE-SERVICES")]
    assert "must be the last rule" in services[-1]
    assert nat[-2:] == ["-X KUBE-SVC-AAAAAAAAAAAAAAAA", "COMMIT"]
    assert sort_iptables_rules(out) == out


_VALID_NAT = (
    ":KUBE-MARK-MASQ - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n"
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"
    '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 10.20.30.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O\n'  # noqa: E501
    '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 10.20.30.41 --dport 80 ! -s 10.0.0.0/24 -j KUBE-MARK-MASQ\n'  # noqa: E501
)  # fmt: skip
_JUMP = '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O\n'  # noqa: E501


@pytest.mark.parametrize(
    ("nat", "error"),
    [
        (_VALID_NAT, None),
        (":KUBE-SERVICES - [0:0]\n" + _JUMP, "some chains in nat are used but were not created"),
        (":KUBE-SERVICES - [0:0]\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n" + _JUMP,
         "some chains in nat are jumped to but have no rules"),
        (":KUBE-MARK-MASQ - [0:0]\n:KUBE-SERVICES - [0:0]\n"
         '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" ...\n'
         '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
         "--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n", "some chains in nat are used but were not created"),
        (":KUBE-MARK-MASQ - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n"
         '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" ...\n',
         "some chains in nat are created but not used"),
    ],
)  # fmt: skip
def test_check_rule_jumps(nat: str, error: str | None) -> None:
    """TestCheckIPTablesRuleJumps' cases."""
    payload = "*filter\nCOMMIT\n*nat\n" + nat + "COMMIT\n"
    if error is None:
        check_rule_jumps(payload)
    else:
        with pytest.raises(IptablesConsistencyError, match=error):
            check_rule_jumps(payload)


def test_check_rule_jumps_on_a_broken_render() -> None:
    check_rule_jumps(PAYLOAD)
    with pytest.raises(IptablesConsistencyError, match="jumped to but have no rules"):
        check_rule_jumps(mutate(PAYLOAD, r"^-A KUBE-MARK-MASQ ", None))
