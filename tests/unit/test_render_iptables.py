"""Unit tests for `netlab.render.iptables`: kube-proxy's iptables-restore payload, byte for byte.

Two kinds of goldens live in tests/golden/iptables/ (README.md there says where each comes from):
  golden-a*.txt, upstream-*.txt   kube-proxy's own expected output (pkg/proxy/iptables/proxier_test.go,
                                  v1.28 era), compared after kube-proxy's `sortIPTablesRules`, with
                                  kube-proxy's test conventions: node IP 192.168.0.2, pods 10.0.0.0/8,
                                  ClusterIPs 172.30.0.0/16, no --random-fully.
  everything else                 this renderer's exact payload, compared unsorted; regenerate with
                                  NETLAB_UPDATE_GOLDEN=1 and review the diff. Address plan as in
                                  tests/conftest.py: pods 10.244.<node>.0/24, nodes 172.18.0.<n>,
                                  services 10.96.0.0/12.
Every full golden also passes kube-proxy's `checkIPTablesRuleJumps`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

import netlab.topology  # noqa: F401  (first: netlab.render.model imports back into netlab.topology)
from netlab.render.iptables import (
    BUILTIN_CHAINS,
    builtin_rules,
    endpoint_chain,
    external_chain,
    is_large_cluster,
    is_service_chain,
    iter_render_iptables,
    jump_rules,
    port_proto_hash,
    probability,
    render_iptables,
    render_iptables_delta,
    service_chain,
    service_chains,
    stale_chains,
)
from netlab.render.model import Endpoint, NodeContext, ServicePort
from netlab.topology.schema import Protocol
from netlab.trace.iptables import check_rule_jumps, sort_iptables_rules, trace_iptables

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "iptables"
UPDATE = os.environ.get("NETLAB_UPDATE_GOLDEN") == "1"

# --- builders -------------------------------------------------------------------------------


def ep(ip: str, port: int = 80, node: str = "") -> Endpoint:
    return Endpoint(IPv4Address(ip), port, node)


def svc(
    spn: str,
    vip: str,
    port: int = 80,
    *endpoints: Endpoint,
    proto: Protocol = Protocol.TCP,
    **kw: object,
) -> ServicePort:
    """spn: "ns/name" or "ns/name:port"."""
    ns_name, _, port_name = spn.partition(":")
    ns, name = ns_name.split("/")
    return ServicePort(ns, name, port_name, proto, IPv4Address(vip), port, endpoints=endpoints, **kw)  # type: ignore[arg-type]


# kube-proxy's NewFakeProxier
UPSTREAM_NODE = NodeContext(
    name="test-hostname",
    node_ips=(IPv4Address("192.168.0.2"),),
    cluster_cidr=IPv4Network("10.0.0.0/8"),
    random_fully=False,
)
# netlab's address plan (tests/conftest.py)
NODE1 = NodeContext(
    name="node1",
    node_ips=(IPv4Address("172.18.0.2"),),
    cluster_cidr=IPv4Network("10.244.0.0/16"),
    random_fully=False,
)


# --- chain names and probabilities ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spn", "proto", "h"),
    [
        ("default/kubernetes:https", "tcp", "NPX46M4PTMTKRN6Y"),
        ("kube-system/kube-dns:dns", "udp", "TCOU7JCQXEZGVUNU"),
        ("kube-system/kube-dns:dns-tcp", "tcp", "ERIFXISQEP7F7OF4"),
        ("ns1/svc1", "tcp", "AQI2S6QIMU7PVVRP"),
        ("ns1/svc1:p80", "tcp", "XPGD46QRK7WJZT7O"),
        ("ns2/svc2:p80", "tcp", "GNZBNJ2PO5MGZ6GT"),
        ("ns3/svc3:p80", "tcp", "X27LE4BHSL4DOUIK"),
        ("ns4/svc4:p80", "tcp", "4SW47YFZTEDKD3PK"),
        ("ns5/svc5:p80", "tcp", "NUKIZ6OKUXPJNT4C"),
    ],
)
def test_port_proto_hash(spn: str, proto: str, h: str) -> None:
    assert port_proto_hash(spn, proto) == h
    assert service_chain(spn, proto) == f"KUBE-SVC-{h}"


@pytest.mark.parametrize(
    ("spn", "endpoint", "chain"),
    [
        ("ns1/svc1:p80", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
        ("ns1/svc1:p80", "10.180.0.2:80", "KUBE-SEP-LXVODXWDISEETFEF"),
        ("ns1/svc1:p80", "10.180.0.3:80", "KUBE-SEP-ICDUIKC33SFI6ZPR"),
        ("ns1/svc1", "10.0.1.1:80", "KUBE-SEP-3JOIVZTXZZRGORX4"),
        ("ns1/svc1", "10.0.1.2:80", "KUBE-SEP-IO5XOSKPAXIFQXAJ"),
        ("ns1/svc1", "10.0.1.3:80", "KUBE-SEP-XGJFVO3L2O5SRFNT"),
        ("ns1/svc1:p80", "10.180.2.1:80", "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"),
        ("ns2/svc2:p80", "10.180.0.2:80", "KUBE-SEP-RS4RBKLTHTF2IUXJ"),
        ("ns3/svc3:p80", "10.180.0.3:80", "KUBE-SEP-OYPFS5VJICHGATKP"),
        ("ns4/svc4:p80", "10.180.0.4:80", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
        ("ns4/svc4:p80", "10.180.0.5:80", "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
    ],
)
def test_endpoint_chain(spn: str, endpoint: str, chain: str) -> None:
    assert endpoint_chain(spn, "tcp", endpoint) == chain


@pytest.mark.parametrize(
    ("n", "p"),
    [(2, "0.5000000000"), (3, "0.3333333333"), (4, "0.2500000000"), (5, "0.2000000000"), (6, "0.1666666667"),
     (7, "0.1428571429")],
)  # fmt: skip
def test_probability(n: int, p: str) -> None:
    assert probability(n) == p


def test_is_service_chain() -> None:
    assert all(is_service_chain(f"KUBE-{k}-AAAA") for k in ("SVC", "SVL", "EXT", "FW", "SEP"))
    assert not any(is_service_chain(c) for c in ("KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-XLB-AAAA", "DOCKER"))


# --- upstream goldens (kube-proxy's own expected output) ----------------------------------------

GOLDEN_A_ENDPOINTS = (ep("10.0.1.1", node="test-hostname"), ep("10.0.1.2", node="host1"), ep("10.0.1.3", node="host2"))


def _golden_a(internal_local: bool = False) -> list[ServicePort]:
    return [svc("ns1/svc1", "172.30.1.1", 80, *GOLDEN_A_ENDPOINTS, internal_local=internal_local)]


UPSTREAM: dict[str, Callable[[], list[ServicePort]]] = {
    # TestInternalTrafficPolicyE2E "internalTrafficPolicy is cluster" (Golden A)
    "golden-a": lambda: _golden_a(),
    # ... "internalTrafficPolicy is local and there are local endpoints"
    "golden-a-itp-local": lambda: _golden_a(internal_local=True),
    # ... "internalTrafficPolicy is local and there are no local endpoints"
    "golden-a-itp-local-no-local-endpoints": lambda: [
        svc(
            "ns1/svc1",
            "172.30.1.1",
            80,
            ep("10.0.1.1", node="host0"),
            ep("10.0.1.2", node="host1"),
            ep("10.0.1.3", node="host2"),
            internal_local=True,
        ),
    ],  # fmt: skip
    # TestOverallIPTablesRulesWithMultipleServices, restricted to svc1 (ClusterIP), svc3 (NodePort,
    # Cluster policy) and svc6 (no endpoints): the services netlab's model can express.
    "upstream-overall-subset": lambda: [
        svc("ns1/svc1:p80", "172.30.0.41", 80, ep("10.180.0.1")),
        svc("ns3/svc3:p80", "172.30.0.43", 80, ep("10.180.0.3"), node_port=3003),
        svc("ns6/svc6:p80", "172.30.0.46", 80),
    ],
    # TestOnlyLocalNodePorts (NodePort, externalTrafficPolicy Local, one local and one remote endpoint)
    # with the default nodePortAddresses and localhostNodePorts, i.e. the tail rule and KUBE-FIREWALL
    # of TestEnableLocalhostNodePortsIPv4.
    "upstream-etp-local-nodeport": lambda: [
        svc(
            "ns1/svc1:p80",
            "172.30.0.41",
            80,
            ep("10.180.0.1"),
            ep("10.180.2.1", node="test-hostname"),
            node_port=3001,
            external_local=True,
        ),
    ],  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_upstream_golden(name: str) -> None:
    """Rendered, then sorted like kube-proxy's assertIPTablesRulesEqual: identical to its expectation."""
    expected = (GOLDEN / f"{name}.txt").read_text()
    check_rule_jumps(expected)
    rendered = render_iptables(UPSTREAM_NODE, UPSTREAM[name]())
    assert sort_iptables_rules(rendered) == expected
    check_rule_jumps(rendered)


def test_upstream_input_order_does_not_matter() -> None:
    services = UPSTREAM["upstream-overall-subset"]()
    assert render_iptables(UPSTREAM_NODE, services) == render_iptables(UPSTREAM_NODE, services[::-1])


@pytest.mark.parametrize(
    ("name", "src", "dst", "dport", "endpoints", "masq"),
    [
        ("golden-a", "10.0.0.2", "172.30.1.1", 80, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"], False),
        ("golden-a-itp-local", "10.0.0.2", "172.30.1.1", 80, ["10.0.1.1:80"], False),
        ("golden-a-itp-local-no-local-endpoints", "10.0.0.2", "172.30.1.1", 80, ["DROP"], False),
        ("upstream-etp-local-nodeport", "10.0.0.2", "172.30.0.41", 80, ["10.180.0.1:80", "10.180.2.1:80"], False),
        ("upstream-etp-local-nodeport", "203.0.113.2", "192.168.0.2", 3001, ["10.180.2.1:80"], False),
        ("upstream-etp-local-nodeport", "10.0.0.2", "192.168.0.2", 3001, ["10.180.0.1:80", "10.180.2.1:80"], False),
    ],
)
def test_upstream_flows(name: str, src: str, dst: str, dport: int, endpoints: list[str], masq: bool) -> None:
    """kube-proxy's own packet-flow expectations for these cases, through our tracer."""
    payload = (GOLDEN / f"{name}.txt").read_text()
    r = trace_iptables(payload, src=src, dst=dst, proto="tcp", dport=dport, node_ips=["192.168.0.2"])
    assert (r.endpoints, r.masq) == (endpoints, masq)


def test_golden_a_endpoints_deleted_rejects() -> None:
    """TestInternalTrafficPolicyE2E, after the EndpointSlice is deleted: REJECT for either policy."""
    for internal_local in (False, True):
        payload = render_iptables(UPSTREAM_NODE, [svc("ns1/svc1", "172.30.1.1", 80, internal_local=internal_local)])
        r = trace_iptables(payload, src="10.0.0.2", dst="172.30.1.1", proto="tcp", dport=80, node_ips=["192.168.0.2"])
        assert r.endpoints == ["REJECT"]
        assert '"ns1/svc1 has no endpoints"' in payload


# --- netlab's own goldens -------------------------------------------------------------------------

WEB_EPS = (ep("10.244.0.2", 8080, "node1"), ep("10.244.1.2", 8080, "node2"))

OWN: dict[str, tuple[NodeContext, Callable[[], list[ServicePort]]]] = {
    # NodePort, externalTrafficPolicy Cluster: KUBE-EXT masquerades, then KUBE-SVC.
    "nodeport-cluster": (NODE1, lambda: [svc("default/web:http", "10.96.0.10", 80, *WEB_EPS, node_port=30080)]),
    # NodePort, externalTrafficPolicy Local with a local endpoint: KUBE-EXT -> KUBE-SVL.
    "nodeport-local": (
        NODE1,
        lambda: [svc("default/web:http", "10.96.0.10", 80, *WEB_EPS, node_port=30080, external_local=True)],
    ),
    # ... and without one: KUBE-EXT only short-circuits pods and the node; outside clients are dropped.
    "nodeport-local-no-local-endpoints": (
        NODE1,
        lambda: [
            svc(
                "default/web:http",
                "10.96.0.10",
                80,
                ep("10.244.1.2", 8080, "node2"),
                node_port=30080,
                external_local=True,
            )
        ],
    ),  # fmt: skip
    # internalTrafficPolicy Local without local endpoints on a Cluster NodePort: ClusterIP dropped, NodePort works.
    "itp-local-nodeport": (
        NODE1,
        lambda: [
            svc(
                "default/web:http",
                "10.96.0.10",
                80,
                ep("10.244.1.2", 8080, "node2"),
                node_port=30080,
                internal_local=True,
            )
        ],
    ),  # fmt: skip
    # Two ports of one service, UDP and TCP (kube-dns): the hash includes the protocol.
    "udp-dns": (
        NODE1,
        lambda: [
            svc(
                "kube-system/kube-dns:dns",
                "10.96.0.10",
                53,
                ep("10.244.0.5", 53, "node1"),
                ep("10.244.1.5", 53, "node2"),
                proto=Protocol.UDP,
            ),
            svc(
                "kube-system/kube-dns:dns-tcp",
                "10.96.0.10",
                53,
                ep("10.244.0.5", 53, "node1"),
                ep("10.244.1.5", 53, "node2"),
            ),
        ],
    ),  # fmt: skip
    # sessionAffinity ClientIP: `recent --rcheck` before the random choice, `recent --set` in each SEP.
    "affinity": (NODE1, lambda: [svc("default/web:http", "10.96.0.10", 80, *WEB_EPS, affinity_timeout=10800)]),
    # No endpoints at all: REJECT for the ClusterIP (filter KUBE-SERVICES) and the NodePort (KUBE-EXTERNAL-SERVICES).
    "no-endpoints": (NODE1, lambda: [svc("default/web:http", "10.96.0.10", 80, node_port=30080)]),
    # Two services; endpoints ordered by their ip:port *string*: 10.244.0.10 before 10.244.0.9.
    "two-services": (
        NODE1,
        lambda: [
            svc(
                "default/web:http",
                "10.96.0.10",
                80,
                ep("10.244.0.9", 8080, "node1"),
                ep("10.244.0.10", 8080, "node1"),
                ep("10.244.1.3", 8080, "node2"),
            ),
            svc("shop/api", "10.96.0.20", 443, ep("10.244.1.4", 8443, "node2")),
        ],
    ),  # fmt: skip
    # iptables with --random-fully (a real node's iptables >= 1.6.2; kube-proxy's fake lacks it).
    "random-fully": (
        NodeContext(name="node1", node_ips=(IPv4Address("172.18.0.2"),), cluster_cidr=IPv4Network("10.244.0.0/16")),
        lambda: [svc("default/web:http", "10.96.0.10", 80, *WEB_EPS)],
    ),
}


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with NETLAB_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name}: the payload changed; NETLAB_UPDATE_GOLDEN=1 rewrites it"


@pytest.mark.parametrize("name", sorted(OWN))
def test_own_golden(name: str) -> None:
    node, services = OWN[name]
    text = render_iptables(node, services())
    _check_golden(name, text)
    check_rule_jumps(text)


def test_every_golden_file_is_used() -> None:
    names = {p.stem for p in GOLDEN.glob("*.txt")}
    assert names == set(UPSTREAM) | set(OWN) | {"partial-sync"}


# --- rule shapes that matter -------------------------------------------------------------------


def test_random_fully_only_when_supported() -> None:
    with_rf = (GOLDEN / "random-fully.txt").read_text()
    assert '"kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully\n' in with_rf
    without = render_iptables(NODE1, [svc("default/web:http", "10.96.0.10", 80, *WEB_EPS)])
    assert "--random-fully" not in without


def test_payload_shape() -> None:
    """Both tables, filter first, chain lines before rules, the NodePort dispatch as the last nat rule."""
    text = render_iptables(NODE1, OWN["two-services"][1]())
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines.count("COMMIT") == 2 and lines[-1] == "COMMIT"
    nat = lines[lines.index("*nat") + 1 : -1]
    assert nat[-1].startswith('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE:')
    first_rule = next(i for i, line in enumerate(nat) if not line.startswith(":"))
    assert all(not line.startswith(":") for line in nat[first_rule:])
    assert text.endswith("COMMIT\n")


def test_comments_quoted_like_kube_proxy() -> None:
    """Comments with spaces are written in double quotes; the bare service-port name is not."""
    text = render_iptables(NODE1, OWN["nodeport-cluster"][1]())
    assert "-A KUBE-NODEPORTS -m comment --comment default/web:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-" in text
    assert re.search(r"-A KUBE-SEP-\w+ -m comment --comment default/web:http -s 10.244.0.2 -j KUBE-MARK-MASQ\n", text)
    assert '--comment "default/web:http -> 10.244.0.2:8080" -m statistic' in text
    # every comment is either one word or quoted: what follows it is always the next option
    for m in re.finditer(r'--comment ("[^"]*"|[^" ]+) (\S+)', text):
        assert m.group(2).startswith("-"), m.group(0)
    assert text.count("--comment") == len(re.findall(r'--comment ("[^"]*"|[^" ]+) -', text))


def test_large_cluster_mode_drops_endpoint_comments() -> None:
    def many(n: int) -> list[ServicePort]:
        eps = [ep(f"10.244.{i // 250}.{i % 250 + 1}", 80, "node2") for i in range(n)]
        return [svc("default/big", "10.96.0.100", 80, *eps)]

    small = render_iptables(NODE1, many(1000))
    assert '--comment "default/big -> ' in small and "--comment default/big -s" in small
    big = render_iptables(NODE1, many(1001))
    assert "default/big ->" not in big and "--comment default/big" not in big
    assert '--comment "default/big cluster IP"' in big  # the ClusterIP rules keep theirs
    r = trace_iptables(big, src="10.244.9.7", dst="10.96.0.100", proto="tcp", dport=80, node_ips=["172.18.0.2"])
    assert r.endpoints is not None and len(r.endpoints) == 1001 and not r.masq


def test_duplicate_service_port_is_refused() -> None:
    s = svc("default/web:http", "10.96.0.10", 80)
    with pytest.raises(ValueError, match="listed twice"):
        render_iptables(NODE1, [s, s])


# --- jump rules ---------------------------------------------------------------------------------


def test_jump_rules_are_kube_proxys() -> None:
    """iptablesJumpChains then iptablesKubeletJumpChains, argv form (no shell quotes)."""
    new = ["-m", "conntrack", "--ctstate", "NEW"]

    def c(text: str) -> list[str]:
        return ["-m", "comment", "--comment", text]

    ext = c("kubernetes externally-visible service portals")
    assert jump_rules(NODE1) == [
        ("filter", "INPUT", [*new, *ext, "-j", "KUBE-EXTERNAL-SERVICES"]),
        ("filter", "FORWARD", [*new, *ext, "-j", "KUBE-EXTERNAL-SERVICES"]),
        ("filter", "INPUT", [*c("kubernetes health check service ports"), "-j", "KUBE-NODEPORTS"]),
        ("filter", "FORWARD", [*new, *c("kubernetes service portals"), "-j", "KUBE-SERVICES"]),
        ("filter", "OUTPUT", [*new, *c("kubernetes service portals"), "-j", "KUBE-SERVICES"]),
        ("filter", "FORWARD", [*c("kubernetes forwarding rules"), "-j", "KUBE-FORWARD"]),
        ("filter", "INPUT", [*new, *c("kubernetes load balancer firewall"), "-j", "KUBE-PROXY-FIREWALL"]),
        ("filter", "OUTPUT", [*new, *c("kubernetes load balancer firewall"), "-j", "KUBE-PROXY-FIREWALL"]),
        ("filter", "FORWARD", [*new, *c("kubernetes load balancer firewall"), "-j", "KUBE-PROXY-FIREWALL"]),
        ("nat", "OUTPUT", [*c("kubernetes service portals"), "-j", "KUBE-SERVICES"]),
        ("nat", "PREROUTING", [*c("kubernetes service portals"), "-j", "KUBE-SERVICES"]),
        ("nat", "POSTROUTING", [*c("kubernetes postrouting rules"), "-j", "KUBE-POSTROUTING"]),
        ("filter", "INPUT", ["-j", "KUBE-FIREWALL"]),
        ("filter", "OUTPUT", ["-j", "KUBE-FIREWALL"]),
    ]  # fmt: skip
    assert jump_rules(None) == jump_rules(NODE1)


def test_jump_targets_are_declared_by_the_payload() -> None:
    text = render_iptables(NODE1, [])
    for table, _chain, args in jump_rules(NODE1):
        block = text.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
        assert f":{args[-1]} - [0:0]" in block


# --- partial sync and stale chains ---------------------------------------------------------------


def restore_noflush(kernel: dict[str, dict[str, list[str]]], payload: str) -> None:
    """What `iptables-restore --noflush` does to the kernel's chains (creates-or-flushes on `:C`)."""
    table = ""
    for line in payload.splitlines():
        if line.startswith("*"):
            table = line[1:]
            kernel.setdefault(table, {})
        elif line.startswith(":"):
            kernel[table][line[1:].split(" ", 1)[0]] = []
        elif line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            assert chain in kernel[table], f"iptables-restore: no chain {chain}"
            kernel[table][chain].append(line)
        elif line.startswith("-X "):
            chain = line[3:]
            assert kernel[table].pop(chain) == [], f"iptables-restore: {chain} not empty"
            assert not any(f"-j {chain}" in r for rules in kernel[table].values() for r in rules), "chain in use"
        else:
            assert line == "COMMIT"


def dump(kernel: dict[str, dict[str, list[str]]]) -> str:
    """The kernel's chains back as a payload (what the tracer reads)."""
    out = []
    for table in ("filter", "nat"):
        out += [f"*{table}", *(f":{c} - [0:0]" for c in kernel[table])]
        out += [r for rules in kernel[table].values() for r in rules]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


OLD = [
    svc("default/web:http", "10.96.0.10", 80, ep("10.244.0.2", 8080, "node1"), ep("10.244.1.2", 8080, "node2"),
        node_port=30080),
    svc("shop/api", "10.96.0.20", 443, ep("10.244.1.4", 8443, "node2")),
    svc("shop/db", "10.96.0.30", 5432, ep("10.244.1.9", 5432, "node2")),
]  # fmt: skip
NEW = [
    # web: one endpoint replaced; api unchanged; db deleted; cache added.
    svc("default/web:http", "10.96.0.10", 80, ep("10.244.0.2", 8080, "node1"), ep("10.244.1.3", 8080, "node2"),
        node_port=30080),
    OLD[1],
    svc("shop/cache", "10.96.0.40", 6379, ep("10.244.0.8", 6379, "node1")),
]  # fmt: skip


def test_partial_sync_reaches_the_same_kernel_state() -> None:
    """old full sync + partial sync (changed services, stale chains) == a fresh full sync of the new state."""
    kernel: dict[str, dict[str, list[str]]] = {}
    restore_noflush(kernel, render_iptables(NODE1, OLD))
    stale = stale_chains(NODE1, NEW, kernel["nat"])
    assert stale == sorted(
        [endpoint_chain("default/web:http", "tcp", "10.244.1.2:8080"), service_chain("shop/db", "tcp"),
         endpoint_chain("shop/db", "tcp", "10.244.1.9:5432")]
    )  # fmt: skip
    partial = render_iptables(NODE1, NEW, only={"default/web:http", "shop/cache"}, stale=stale)
    _check_golden("partial-sync", partial)

    # api's chains are not rewritten, but its ClusterIP rule (top-level chain) is.
    api = service_chain("shop/api", "tcp")
    assert f":{api} - [0:0]" not in partial and f"-A {api} " not in partial
    assert f"-d 10.96.0.20 --dport 443 -j {api}" in partial
    for chain in stale:
        assert f":{chain} - [0:0]\n" in partial and f"-X {chain}\n" in partial

    restore_noflush(kernel, partial)
    fresh: dict[str, dict[str, list[str]]] = {}
    restore_noflush(fresh, render_iptables(NODE1, NEW))
    assert {t: dict(sorted(c.items())) for t, c in kernel.items()} == {
        t: dict(sorted(c.items())) for t, c in fresh.items()
    }

    # ... and it behaves like it: web now reaches the new endpoint.
    r = trace_iptables(dump(kernel), src="10.244.0.7", dst="10.96.0.10", proto="tcp", dport=80, node_ips=["172.18.0.2"])
    assert r.endpoints == ["10.244.0.2:8080", "10.244.1.3:8080"]


def test_partial_sync_without_changes_writes_only_top_level_chains() -> None:
    text = render_iptables(NODE1, NEW, only=set())
    declared = re.findall(r"^:(\S+)", text, flags=re.M)
    assert declared == ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                        "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL", "KUBE-SERVICES", "KUBE-NODEPORTS",
                        "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]  # fmt: skip


def test_stale_must_be_an_unused_service_chain() -> None:
    with pytest.raises(ValueError, match="not a kube-proxy service chain"):
        render_iptables(NODE1, NEW, stale=["KUBE-SERVICES"])
    with pytest.raises(ValueError, match="still used"):
        render_iptables(NODE1, NEW, stale=[service_chain("shop/api", "tcp")])


def test_service_chains() -> None:
    chains = service_chains(NODE1, NEW)
    assert chains["filter"] == {"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                                "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"}  # fmt: skip
    declared = set(re.findall(r"^:(\S+)", render_iptables(NODE1, NEW).split("*nat\n", 1)[1], flags=re.M))
    assert chains["nat"] == declared
    assert stale_chains(NODE1, NEW, ["KUBE-SERVICES", "DOCKER", *declared]) == []


def test_names_hash_only_the_bytes_they_keep() -> None:
    """16 base32 characters are the first 10 bytes of the digest: the same as encoding all 32."""
    for i in range(300):
        spn = f"ns{i % 7}/svc-{i}:p{i % 3}"
        full = base64.b32encode(hashlib.sha256(f"{spn}tcp".encode()).digest()).decode()
        assert port_proto_hash(spn, "tcp") == full[:16]
        full = base64.b32encode(hashlib.sha256(f"{spn}udp10.0.{i}.1:80".encode()).digest()).decode()
        assert endpoint_chain(spn, "udp", f"10.0.{i}.1:80") == "KUBE-SEP-" + full[:16]


def _many(n: int) -> list[ServicePort]:
    """n service ports of every kind the renderer branches on: no endpoints, affinity, NodePort
    with Cluster and Local policies, internal Local, several endpoints on both nodes."""
    out = []
    for i in range(n):
        eps = tuple(ep(f"10.244.{j % 2}.{(i + j) % 250 + 2}", 8080, f"node{j % 2 + 1}") for j in range(i % 4))
        kw: dict[str, object] = {}
        if i % 5 == 1:
            kw["affinity_timeout"] = 10800
        if i % 3 == 2:
            kw["node_port"] = 30000 + i
            kw["external_local"] = i % 2 == 0
        if i % 7 == 3:
            kw["internal_local"] = True
        out.append(svc(f"ns{i % 3}/svc-{i}:p", f"10.96.{i // 250}.{i % 250 + 1}", 80, *eps, **kw))
    return out


@pytest.mark.parametrize("whole_tables", [False, True])
def test_streamed_pieces_are_the_same_payload(whole_tables: bool) -> None:
    """A sync writes the pieces to iptables-restore as they are rendered: joined, they must be the
    unstreamed render byte for byte, for a full render, a partial one (only) and with stale
    chains, over more service ports than one deferred segment holds."""
    from netlab.render import iptables as ri

    services = _many(ri.STREAM_BATCH * 2 + 37)
    only = {s.spn for s in services[::9]}
    stale = ["KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB"]
    for kw in ({}, {"only": only}, {"stale": stale}):
        pieces = list(iter_render_iptables(NODE1, services, whole_tables=whole_tables, **kw))  # type: ignore[arg-type]
        large = is_large_cluster(services)
        plans = ri._plans(NODE1, services)
        t = ri._render(NODE1, plans, large_cluster=large, only=kw.get("only"), stale=kw.get("stale", ()))  # type: ignore[arg-type]
        if whole_tables:
            ri._add_builtin_chains(t, NODE1)
        assert "".join(pieces) == t.text()
        assert len(pieces) > 3  # really in pieces: the service ports' rules come in segments
        assert all(p.endswith("\n") for p in pieces)


def test_streamed_render_checks_its_arguments_before_any_piece() -> None:
    """Bad arguments raise when the render is asked for, not halfway through feeding a tool."""
    services = [svc("default/web:http", "10.96.0.10", 80, *WEB_EPS)]
    used = service_chain("default/web:http", "tcp")
    for stale, dup in (([used], False), (["KUBE-SERVICES"], False), ([], True)):
        with pytest.raises(ValueError):
            iter_render_iptables(NODE1, services * 2 if dup else services, stale=stale)


def test_large_cluster_flag_can_come_from_the_caller() -> None:
    """A partial render sees a few services; the comments depend on the whole cluster's endpoints."""
    services = [svc("default/web:http", "10.96.0.10", 80, *WEB_EPS)]
    assert not is_large_cluster(services)
    assert render_iptables(NODE1, services, large_cluster=False) == render_iptables(NODE1, services)
    big = render_iptables(NODE1, services, large_cluster=True)
    assert '--comment "default/web:http -> ' not in big and "--comment default/web:http -s" not in big
    assert '--comment "default/web:http cluster IP"' in big


# --- whole-table payload (a full sync over a node holding only kube-proxy's rules) ---------------


def test_builtin_rules_are_the_jumps_as_ensure_rule_prepend_leaves_them() -> None:
    rules = builtin_rules(NODE1)
    assert set(rules) == {(t, c) for t, chains in BUILTIN_CHAINS.items() for c in chains}
    assert rules[("nat", "INPUT")] == [] and rules[("nat", "PREROUTING")] == [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    ]
    # each jump is inserted at the top: the last one ensured comes first
    assert [r.rsplit(" ", 1)[1] for r in rules[("filter", "INPUT")]] == [
        "KUBE-FIREWALL", "KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"
    ]  # fmt: skip
    for table, chain, args in jump_rules(NODE1):
        assert sum(r.endswith(" -j " + args[-1]) for r in rules[(table, chain)]) == 1


def test_whole_table_payload_is_the_payload_plus_builtin_chains_and_jumps() -> None:
    plain = render_iptables(NODE1, NEW)
    whole = render_iptables(NODE1, NEW, whole_tables=True)
    extra = [line for line in whole.splitlines() if line not in plain.splitlines()]
    expected = []
    for table, builtins in BUILTIN_CHAINS.items():  # declared first, jumps after every other rule
        expected += [f":{c} ACCEPT [0:0]" for c in builtins]
        expected += [r for c in builtins for r in builtin_rules()[(table, c)]]
    assert extra == expected
    for table in ("filter", "nat"):
        block = whole.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0].splitlines()
        assert block[: len(BUILTIN_CHAINS[table])] == [f":{c} ACCEPT [0:0]" for c in BUILTIN_CHAINS[table]]
    assert [line for line in whole.splitlines() if line not in extra] == plain.splitlines()


# --- delta render: a partial sync from the changed services alone --------------------------------


def _changes(old: list[ServicePort], new: list[ServicePort]) -> tuple[list[ServicePort], list[ServicePort]]:
    before, after = {s.spn: s for s in old}, {s.spn: s for s in new}
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [before[k] for k in keys if k in before], [after[k] for k in keys if k in after]


def _delta(old: list[ServicePort], new: list[ServicePort]) -> str:
    """The delta payload; checks that over a kernel holding `old` it leaves exactly a full `new`."""
    large = is_large_cluster(new)
    assert large == is_large_cluster(old)
    kernel: dict[str, dict[str, list[str]]] = {}
    restore_noflush(kernel, render_iptables(NODE1, old))
    before, after = _changes(old, new)
    payload = render_iptables_delta(NODE1, before, after, new, large_cluster=large)
    restore_noflush(kernel, payload)
    fresh: dict[str, dict[str, list[str]]] = {}
    restore_noflush(fresh, render_iptables(NODE1, new))
    assert {t: dict(sorted(c.items())) for t, c in kernel.items()} == {
        t: dict(sorted(c.items())) for t, c in fresh.items()
    }
    return payload


def _declared(payload: str) -> list[str]:
    return re.findall(r"^:(\S+)", payload, flags=re.M)


def test_delta_of_an_endpoint_change_leaves_every_top_level_chain_out() -> None:
    old = OLD
    new = [NEW[0], *OLD[1:]]  # web: one endpoint replaced
    payload = _delta(old, new)
    web = "default/web:http"
    assert "*filter" not in payload
    assert _declared(payload) == [
        external_chain(web, "tcp"),  # web's own chains, rewritten
        service_chain(web, "tcp"),
        *[endpoint_chain(web, "tcp", e.addr) for e in NEW[0].sorted_endpoints()],
        endpoint_chain(web, "tcp", "10.244.1.2:8080"),  # stale: flushed, then deleted
    ]
    assert payload.count("-X ") == 1 and f"-X {endpoint_chain(web, 'tcp', '10.244.1.2:8080')}\n" in payload


def test_delta_of_added_and_removed_services_rewrites_kube_services() -> None:
    payload = _delta(OLD, NEW)  # web changed, db deleted, cache added
    assert ":KUBE-SERVICES - [0:0]" in payload and "*filter" not in payload
    assert ":KUBE-NODEPORTS" not in payload  # web's NodePort line did not change
    assert f"-X {service_chain('shop/db', 'tcp')}" in payload
    assert f":{service_chain('shop/api', 'tcp')} " not in payload  # unchanged: not rewritten


def test_delta_to_no_endpoints_and_back() -> None:
    gone = [OLD[0], svc("shop/api", "10.96.0.20", 443), OLD[2]]
    payload = _delta(OLD, gone)
    assert "*filter" in payload and '"shop/api has no endpoints" -m tcp -p tcp -d 10.96.0.20' in payload
    assert _declared(payload)[:2] == ["KUBE-SERVICES", "KUBE-SERVICES"]  # filter's and nat's, nothing else top-level
    assert f"-X {service_chain('shop/api', 'tcp')}" in payload
    back = _delta(gone, OLD)
    assert "*filter" in back and "has no endpoints" not in back


def test_delta_of_a_node_port_change() -> None:
    moved = [svc("default/web:http", "10.96.0.10", 80, *OLD[0].endpoints, node_port=30081), *OLD[1:]]
    payload = _delta(OLD, moved)
    assert [c for c in _declared(payload) if not is_service_chain(c)] == ["KUBE-NODEPORTS"]
    local = [dataclasses.replace(moved[0], external_local=True), *OLD[1:]]
    payload = _delta(moved, local)  # a Local policy with a local endpoint: KUBE-SVL appears
    assert any(c.startswith("KUBE-SVL-") for c in _declared(payload))
    lost = [dataclasses.replace(local[0], endpoints=(ep("10.244.1.2", 8080, "node2"),)), *OLD[1:]]
    payload = _delta(local, lost)  # ... and loses it: the NodePort DROPs in filter
    assert '"default/web:http has no local endpoints"' in payload


def test_delta_in_a_large_cluster_keeps_its_comment_style() -> None:
    big = svc(
        "default/big", "10.96.0.100", 80, *[ep(f"10.244.{i // 250}.{i % 250 + 1}", 80, "node2") for i in range(1001)]
    )
    old, new = [big, *OLD], [big, NEW[0], *OLD[1:]]
    payload = _delta(old, new)  # _delta renders with the caller's flag: the whole cluster is large
    assert '"default/web:http -> ' not in payload and "--comment default/web:http -s" not in payload
    assert f"-A {service_chain('default/web:http', 'tcp')} -m statistic" in payload


def test_delta_without_changes_is_empty() -> None:
    assert _delta(OLD, list(OLD)) == ""
    assert render_iptables_delta(NODE1, [], [], OLD, large_cluster=False) == ""
