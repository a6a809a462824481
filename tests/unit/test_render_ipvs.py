"""Unit tests for `netlab.render.ipvs`: everything kube-proxy's IPVS mode puts in a node.

Goldens in tests/golden/ipvs/ (README.md there): `<case>.txt` is `IpvsState.text()`, the whole
state in the tools' own forms (kube-ipvs0's addresses, `ipvsadm -Ln`, `ipset restore`, the
`iptables-restore` payload, the jumps, the sysctls). Regenerate with NETLAB_UPDATE_GOLDEN=1 and
review the diff. Address plan as in tests/conftest.py: node1 172.18.0.2 (cni0 10.244.0.1,
flannel.1 10.244.0.0), pods 10.244.<node>.0/24, services 10.96.0.0/12.

Behaviour is asserted through `trace_ipvs`, the offline model of a first packet (which real
servers a (dst, port) reaches, whether it is masqueraded); `tests/vm/test_ipvs_kernel.py` checks
the same state in a real kernel.
"""

from __future__ import annotations

import os
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from netlab.inspect import IpvsView, parse_ipvsadm
from netlab.render.ipvs import (
    FLAG_PERSISTENT,
    FLAG_SOURCE_HASH,
    IPSETS,
    RealServer,
    VirtualServer,
    ipvsadm_header,
    ipvsadm_lines,
    render_ipvs,
    trace_ipvs,
)
from netlab.render.model import Endpoint, NodeContext, ServicePort
from netlab.topology.schema import IpvsScheduler, Protocol

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "ipvs"
UPDATE = os.environ.get("NETLAB_UPDATE_GOLDEN") == "1"

A = IPv4Address


def ep(ip: str, port: int = 80, node: str = "") -> Endpoint:
    return Endpoint(A(ip), port, node)


def svc(
    spn: str, vip: str, port: int = 80, *endpoints: Endpoint, proto: Protocol = Protocol.TCP, **kw: Any
) -> ServicePort:
    """spn: "ns/name" or "ns/name:port"."""
    ns_name, _, port_name = spn.partition(":")
    ns, name = ns_name.split("/")
    return ServicePort(ns, name, port_name, proto, A(vip), port, endpoints=endpoints, **kw)


NODE1 = NodeContext(
    name="node1",
    node_ips=(A("172.18.0.2"),),
    cluster_cidr=IPv4Network("10.244.0.0/16"),
    service_cidrs=(IPv4Network("10.96.0.0/12"),),
)
# what kube-proxy finds on a flannel node: eth0, cni0 and flannel.1 (kube-ipvs0's and lo's excluded)
NODE1_ADDRESSES = [A("172.18.0.2"), A("10.244.0.1"), A("10.244.0.0")]

WEB = svc(
    "default/web:http",
    "10.96.0.100",
    80,
    ep("10.244.0.5", 8080, "node1"),
    ep("10.244.1.5", 8080, "node2"),
    ep("10.244.1.6", 8080, "node2"),
)
API = svc(
    "default/api:http",
    "10.96.0.20",
    80,
    ep("10.244.0.7", 8080, "node1"),
    ep("10.244.1.7", 8080, "node2"),
    node_port=30080,
)
API_LOCAL = replace(API, external_local=True)
DNS = svc(
    "kube-system/kube-dns:dns",
    "10.96.0.10",
    53,
    ep("10.244.0.3", 53, "node1"),
    ep("10.244.1.3", 53, "node2"),
    proto=Protocol.UDP,
)
DNS_TCP = svc(
    "kube-system/kube-dns:dns-tcp", "10.96.0.10", 53, ep("10.244.0.3", 53, "node1"), ep("10.244.1.3", 53, "node2")
)
STICKY = svc(
    "default/sticky", "10.96.0.30", 80, ep("10.244.0.8", 8080, "node1"), ep("10.244.1.8", 8080, "node2"),
    affinity_timeout=10800,
)  # fmt: skip
EMPTY = svc("default/empty:http", "10.96.0.40", 80, node_port=30040)
ITP_LOCAL_REMOTE = svc("default/itp:http", "10.96.0.50", 80, ep("10.244.1.9", 8080, "node2"), internal_local=True)
ETP_LOCAL_REMOTE = svc(
    "default/etp:http", "10.96.0.60", 80, ep("10.244.1.10", 8080, "node2"), node_port=30060, external_local=True
)
UDP_NODEPORT = svc(
    "default/syslog", "10.96.0.70", 514, ep("10.244.0.11", 5514, "node1"), proto=Protocol.UDP, node_port=30514
)

# name -> (services, node, render keyword arguments)
CASES: dict[str, tuple[list[ServicePort], NodeContext, dict[str, Any]]] = {
    "clusterip-3-endpoints": ([WEB], NODE1, {}),
    "nodeport-cluster": ([API], NODE1, {"nodeport_addresses": NODE1_ADDRESSES}),
    "nodeport-local": ([API_LOCAL], NODE1, {"nodeport_addresses": NODE1_ADDRESSES}),
    "nodeport-udp": ([UDP_NODEPORT], NODE1, {}),
    "udp-dns": ([DNS, DNS_TCP], NODE1, {}),
    "affinity": ([STICKY], NODE1, {}),
    "no-endpoints": ([EMPTY], NODE1, {}),
    "local-no-local-endpoints": ([ITP_LOCAL_REMOTE, ETP_LOCAL_REMOTE], NODE1, {}),
    "schedulers": (
        [replace(WEB, ipvs_scheduler=IpvsScheduler.SH), replace(STICKY, ipvs_scheduler=IpvsScheduler.MH), DNS],
        replace(NODE1, ipvs_scheduler=IpvsScheduler.WLC),
        {},
    ),
    "empty": ([], NODE1, {"strict_arp": False}),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with NETLAB_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name}: the rendered state changed; NETLAB_UPDATE_GOLDEN=1 rewrites it"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    services, node, kw = CASES[name]
    check_golden(f"{name}.txt", render_ipvs(node, services, **kw).text())


def test_every_golden_file_is_a_case() -> None:
    assert {p.name for p in GOLDEN.iterdir()} <= {f"{n}.txt" for n in CASES} | {"README.md"}


# --- the IPVS table -----------------------------------------------------------------------------------------


def vs_of(services: list[ServicePort], proto: str, ip: str, port: int, **kw: Any) -> VirtualServer:
    v = render_ipvs(NODE1, services, **kw).lookup(proto, A(ip), port)
    assert v is not None, f"no virtual server {proto} {ip}:{port}"
    return v


def test_one_virtual_server_per_cluster_ip_port_and_per_node_address_node_port() -> None:
    state = render_ipvs(NODE1, [API, DNS, DNS_TCP], nodeport_addresses=[*NODE1_ADDRESSES, A("127.0.0.1")])
    keys = {(v.protocol, str(v.ip), v.port) for v in state.virtual_servers}
    assert keys == {
        ("TCP", "10.96.0.20", 80),
        ("TCP", "172.18.0.2", 30080),
        ("TCP", "10.244.0.1", 30080),
        ("TCP", "10.244.0.0", 30080),  # loopback never gets a NodePort virtual server
        ("UDP", "10.96.0.10", 53),
        ("TCP", "10.96.0.10", 53),
    }
    assert state.addresses == (A("10.96.0.10"), A("10.96.0.20"))  # ClusterIPs only, each once
    for v in state.virtual_servers:
        assert (v.scheduler, v.flags, v.timeout) == ("rr", 0, 0)
        assert all((r.weight, r.forward_name) == (1, "Masq") for r in v.real_servers)


def test_node_port_defaults_to_the_node_ips() -> None:
    state = render_ipvs(NODE1, [API])
    assert {str(v.ip) for v in state.virtual_servers if v.port == 30080} == {"172.18.0.2"}


def test_session_affinity_is_persistence_with_the_timeout() -> None:
    v = vs_of([replace(STICKY, affinity_timeout=60)], "TCP", "10.96.0.30", 80)
    assert v.persistent and v.flags == FLAG_PERSISTENT and v.timeout == 60


def test_scheduler_per_lab_and_per_service() -> None:
    node = replace(NODE1, ipvs_scheduler=IpvsScheduler.LC)
    state = render_ipvs(node, [WEB, replace(DNS, ipvs_scheduler=IpvsScheduler.SH)])
    assert state.lookup("TCP", A("10.96.0.100"), 80).scheduler == "lc"  # type: ignore[union-attr]
    assert state.lookup("UDP", A("10.96.0.10"), 53).scheduler == "sh"  # type: ignore[union-attr]
    mh = vs_of([replace(STICKY, ipvs_scheduler=IpvsScheduler.MH)], "TCP", "10.96.0.30", 80)
    assert mh.flags == FLAG_PERSISTENT | FLAG_SOURCE_HASH  # kube-proxy adds the source-hash flag for mh


def test_local_policies_use_local_endpoints_and_fall_back_to_cluster_ones() -> None:
    # Local with a local endpoint: only that one, on the NodePort; the ClusterIP keeps all
    assert [r.addr for r in vs_of([API_LOCAL], "TCP", "172.18.0.2", 30080).real_servers] == ["10.244.0.7:8080"]
    assert len(vs_of([API_LOCAL], "TCP", "10.96.0.20", 80).real_servers) == 2
    # externalTrafficPolicy Local, no local endpoint: falls back to every endpoint (iptables mode DROPs)
    etp = vs_of([ETP_LOCAL_REMOTE], "TCP", "172.18.0.2", 30060)
    assert [r.addr for r in etp.real_servers] == ["10.244.1.10:8080"]
    # internalTrafficPolicy Local on a ClusterIP-only service, no local endpoint: no cluster
    # endpoints to fall back to (UsesClusterEndpoints is false), so the virtual server is empty
    assert vs_of([ITP_LOCAL_REMOTE], "TCP", "10.96.0.50", 80).real_servers == ()
    itp_here = replace(ITP_LOCAL_REMOTE, endpoints=(*ITP_LOCAL_REMOTE.endpoints, ep("10.244.0.9", 8080, "node1")))
    assert [r.addr for r in vs_of([itp_here], "TCP", "10.96.0.50", 80).real_servers] == ["10.244.0.9:8080"]


def test_a_service_without_endpoints_still_gets_its_virtual_servers() -> None:
    state = render_ipvs(NODE1, [EMPTY])
    assert [(str(v.ip), v.port, v.real_servers) for v in state.virtual_servers] == [
        ("172.18.0.2", 30040, ()),
        ("10.96.0.40", 80, ()),
    ]
    assert "REJECT" not in state.iptables.split("KUBE-IPVS-FILTER -m conntrack")[0]  # no per-service REJECT


def test_two_services_on_one_address_port_are_refused() -> None:
    with pytest.raises(ValueError, match="TCP 10.96.0.100:80 is claimed by"):
        render_ipvs(NODE1, [WEB, replace(WEB, name="web2")])


# --- ipsets -------------------------------------------------------------------------------------------------


def test_ipsets_hold_what_the_rules_match() -> None:
    state = render_ipvs(NODE1, [WEB, API_LOCAL, DNS, UDP_NODEPORT])
    assert [s.name for s in state.ipsets] == [name for name, _, _ in IPSETS]
    assert state.ipset("KUBE-CLUSTER-IP").entries == (
        "10.96.0.10,udp:53",
        "10.96.0.20,tcp:80",
        "10.96.0.70,udp:514",
        "10.96.0.100,tcp:80",
    )
    # hairpin: the node's own endpoints only, ip,proto:port,ip
    assert state.ipset("KUBE-LOOP-BACK").entries == (
        "10.244.0.3,udp:53,10.244.0.3",
        "10.244.0.5,tcp:8080,10.244.0.5",
        "10.244.0.7,tcp:8080,10.244.0.7",
        "10.244.0.11,udp:5514,10.244.0.11",
    )
    assert state.ipset("KUBE-NODE-PORT-TCP").entries == ("30080",)
    assert state.ipset("KUBE-NODE-PORT-LOCAL-TCP").entries == ("30080",)
    assert state.ipset("KUBE-NODE-PORT-UDP").entries == ("30514",)
    assert state.ipset("KUBE-NODE-PORT-LOCAL-UDP").entries == ()
    assert state.ipset("KUBE-IPVS-IPS").entries == ("10.96.0.10", "10.96.0.20", "10.96.0.70", "10.96.0.100")
    assert state.ipset("KUBE-NODE-PORT-TCP").create() == "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"
    assert state.ipset("KUBE-LOOP-BACK").create() == (
        "create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536"
    )


# --- iptables ---------------------------------------------------------------------------------------------


def test_iptables_rules_do_not_grow_with_services() -> None:
    def count(n: int) -> int:
        services = [svc(f"default/s{i}", f"10.96.1.{i}", 80, ep(f"10.244.0.{i}", 80, "node1")) for i in range(1, n)]
        return render_ipvs(NODE1, services).iptables.count("\n-A ")

    assert count(2) == count(200)


def test_rules_for_empty_sets_are_left_out_and_the_order_is_kube_proxys() -> None:
    empty = render_ipvs(NODE1, []).iptables
    assert "KUBE-CLUSTER-IP dst,dst -j" not in empty.split("*filter")[0]
    assert "KUBE-LOOP-BACK" not in empty and "KUBE-NODE-PORT-TCP" not in empty
    full = render_ipvs(NODE1, [API]).iptables.splitlines()
    services = [line for line in full if line.startswith("-A KUBE-SERVICES")]
    assert services[0] == "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN"
    assert "! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in services[1]
    assert services[2] == "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT"
    assert services[-1] == "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT"  # must be last
    post = [line for line in full if line.startswith("-A KUBE-POSTROUTING")]
    assert "KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in post[0]  # hairpin first, then the mark
    assert full.index("*nat") < full.index("*filter")


def test_mark_and_random_fully_follow_the_node() -> None:
    out = render_ipvs(replace(NODE1, masquerade_bit=5, random_fully=False), [WEB]).iptables
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x000020" in out
    assert "-A KUBE-POSTROUTING -m mark ! --mark 0x000020/0x000020 -j RETURN" in out
    assert out.count("--random-fully") == 0
    assert "--random-fully" in render_ipvs(NODE1, [WEB]).iptables


def test_jumps_and_sysctls() -> None:
    state = render_ipvs(NODE1, [])
    assert [(t, c, argv[-1]) for t, c, argv in state.jumps] == [
        ("nat", "OUTPUT", "KUBE-SERVICES"),
        ("nat", "PREROUTING", "KUBE-SERVICES"),
        ("nat", "POSTROUTING", "KUBE-POSTROUTING"),
        ("filter", "FORWARD", "KUBE-FORWARD"),
        ("filter", "INPUT", "KUBE-NODE-PORT"),
        ("filter", "INPUT", "KUBE-PROXY-FIREWALL"),
        ("filter", "FORWARD", "KUBE-PROXY-FIREWALL"),
        ("filter", "INPUT", "KUBE-IPVS-FILTER"),
        ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER"),
    ]
    assert dict(state.sysctls) == {
        "net.ipv4.vs.conntrack": 1,
        "net.ipv4.vs.expire_nodest_conn": 1,
        "net.ipv4.vs.expire_quiescent_template": 1,
        "net.ipv4.ip_forward": 1,
        "net.ipv4.conf.all.arp_ignore": 1,
        "net.ipv4.conf.all.arp_announce": 2,
    }
    assert "net.ipv4.conf.all.arp_ignore" not in dict(render_ipvs(NODE1, [], strict_arp=False).sysctls)


# --- behaviour: which endpoints each (dst, port) reaches, offline --------------------------------------------

POD_HERE = A("10.244.0.2")  # a client pod on node1
POD_THERE = A("10.244.1.2")  # a client pod on node2 (routed to node1 through the overlay)
OUTSIDE = A("172.18.0.250")  # the external client on the underlay
API_LOCAL2 = replace(API_LOCAL, name="api-local", cluster_ip=A("10.96.0.21"), node_port=30081)
ALL = [WEB, API, API_LOCAL2, DNS, STICKY, EMPTY, ITP_LOCAL_REMOTE, ETP_LOCAL_REMOTE, UDP_NODEPORT]
STATE = render_ipvs(NODE1, ALL, nodeport_addresses=NODE1_ADDRESSES)
WEB_EPS = ("10.244.0.5:8080", "10.244.1.5:8080", "10.244.1.6:8080")

# (src, dst, port, protocol) -> (verdict, endpoints, masquerade)
FLOWS: list[tuple[IPv4Address, str, int, str, str, tuple[str, ...], bool]] = [
    (POD_HERE, "10.96.0.100", 80, "TCP", "IPVS", WEB_EPS, False),
    (POD_THERE, "10.96.0.100", 80, "TCP", "IPVS", WEB_EPS, False),
    (OUTSIDE, "10.96.0.100", 80, "TCP", "IPVS", WEB_EPS, True),  # off-cluster source: masquerade
    (A("172.18.0.2"), "10.96.0.100", 80, "TCP", "IPVS", WEB_EPS, True),  # the node itself
    (A("127.0.0.1"), "10.96.0.100", 80, "TCP", "IPVS", WEB_EPS, False),  # localhost RETURNs early
    (POD_HERE, "10.96.0.100", 8080, "TCP", "REJECT", (), False),  # not a service port: KUBE-IPVS-FILTER
    (POD_HERE, "10.96.0.100", 80, "UDP", "REJECT", (), False),
    (POD_HERE, "10.96.0.10", 53, "UDP", "IPVS", ("10.244.0.3:53", "10.244.1.3:53"), False),
    (POD_HERE, "10.96.0.40", 80, "TCP", "NO-DESTINATION", (), False),  # no endpoints: an empty VS
    (OUTSIDE, "172.18.0.2", 30080, "TCP", "IPVS", ("10.244.0.7:8080", "10.244.1.7:8080"), True),
    (OUTSIDE, "10.244.0.1", 30080, "TCP", "IPVS", ("10.244.0.7:8080", "10.244.1.7:8080"), True),  # cni0's address
    (POD_HERE, "172.18.0.2", 30080, "TCP", "IPVS", ("10.244.0.7:8080", "10.244.1.7:8080"), True),
    (OUTSIDE, "172.18.0.2", 30081, "TCP", "IPVS", ("10.244.0.7:8080",), False),  # Local: local only, no SNAT
    (OUTSIDE, "172.18.0.2", 30060, "TCP", "IPVS", ("10.244.1.10:8080",), False),  # Local, none here: fallback
    (POD_HERE, "10.96.0.50", 80, "TCP", "NO-DESTINATION", (), False),  # internal Local, none here: empty
    (OUTSIDE, "172.18.0.2", 30514, "UDP", "IPVS", ("10.244.0.11:5514",), True),
    (OUTSIDE, "172.18.0.2", 30514, "TCP", "NOT-A-SERVICE", (), False),  # the UDP NodePort, asked over TCP
    (POD_HERE, "10.244.1.5", 8080, "TCP", "NOT-A-SERVICE", (), False),  # straight to a pod: not IPVS's
    (OUTSIDE, "172.18.0.3", 30080, "TCP", "NOT-A-SERVICE", (), False),  # another node's address
]


@pytest.mark.parametrize(("src", "dst", "port", "proto", "verdict", "endpoints", "masq"), FLOWS)
def test_flow(
    src: IPv4Address, dst: str, port: int, proto: str, verdict: str, endpoints: tuple[str, ...], masq: bool
) -> None:
    t = trace_ipvs(STATE, NODE1, src=src, dst=A(dst), port=port, protocol=proto, local_addresses=NODE1_ADDRESSES)
    assert (t.verdict, t.endpoints, t.masquerade) == (verdict, endpoints, masq)


def test_hairpin_masquerades_only_the_client_reaching_itself() -> None:
    t = trace_ipvs(STATE, NODE1, src=A("10.244.0.5"), dst=A("10.96.0.100"), port=80)
    assert t.hairpin == ("10.244.0.5:8080",) and not t.masquerade
    assert trace_ipvs(STATE, NODE1, src=POD_HERE, dst=A("10.96.0.100"), port=80).hairpin == ()
    # the remote endpoint reaching its own service through this node: not local here, no loop-back entry
    assert trace_ipvs(STATE, NODE1, src=A("10.244.1.5"), dst=A("10.96.0.100"), port=80).hairpin == ()


def test_affinity_flows_are_persistent() -> None:
    assert trace_ipvs(STATE, NODE1, src=POD_HERE, dst=A("10.96.0.30"), port=80).persistent


# --- the ipvsadm listing ----------------------------------------------------------------------------------


def test_ipvsadm_listing_order_and_columns() -> None:
    text = ipvsadm_lines(STATE.virtual_servers)
    lines = text.splitlines()
    assert lines[:2] == [
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn",
    ]
    # ipvsadm compares addresses as a C int difference: 172.18.0.2 sorts before 10.96.0.10
    services = [line for line in lines[2:] if not line.startswith("  ->")]
    assert services[0] == "TCP  172.18.0.2:30040 rr"
    assert services.index("TCP  10.96.0.30:80 rr persistent 10800") < services.index("TCP  10.96.0.100:80 rr")
    assert services[-1] == "UDP  10.244.0.1:30514 rr"
    assert "  -> 10.244.0.5:8080              Masq    1      0          0         " in lines
    sh = render_ipvs(NODE1, [replace(STICKY, ipvs_scheduler=IpvsScheduler.MH)]).virtual_servers
    assert "TCP  10.96.0.30:80 mh (mh-port) persistent 10800\n" in ipvsadm_lines(sh)


def test_parse_ipvsadm_reads_back_the_listing() -> None:
    text = ipvsadm_header() + ipvsadm_lines(STATE.virtual_servers)
    parsed = parse_ipvsadm(text)
    assert [(v.key, v.scheduler, v.flags, v.timeout) for v in parsed] == [
        (v.key, v.scheduler, v.flags, v.timeout) for v in STATE.virtual_servers
    ]
    assert [v.real_servers for v in parsed] == [v.real_servers for v in STATE.virtual_servers]


def test_rules_view_table_json_and_text() -> None:
    counted = [
        replace(STATE.virtual_servers[0], real_servers=(RealServer(A("10.244.1.10"), 8080, 0, active=2, inactive=7),))
    ]
    save_iptables = (
        "*nat\n:KUBE-SERVICES - [0:0]\n:PREROUTING ACCEPT [0:0]\n"
        '[12:720] -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
        "[3:180] -A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n"
    )
    view = IpvsView(
        version="1.2.1",
        size=4096,
        virtual_servers=counted,
        addresses=[A("10.96.0.100")],
        ipsets="create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n"
        "add KUBE-CLUSTER-IP 10.96.0.100,tcp:80\ncreate KUBE-LOOP-BACK hash:ip,port,ip family inet\n",
        iptables=save_iptables,
    )
    assert view.table().startswith("IP Virtual Server version 1.2.1 (size=4096)\nProt LocalAddress")
    assert "  -> 10.244.1.10:8080             Masq    0      2          7         \n" in view.table()
    d = view.as_dict()
    assert d["virtualServers"][0]["realServers"][0] == {
        "address": "10.244.1.10",
        "port": 8080,
        "forward": "Masq",
        "weight": 0,
        "activeConn": 2,
        "inActConn": 7,
    }
    assert d["ipsets"] == [
        {"name": "KUBE-CLUSTER-IP", "type": "hash:ip,port", "entries": ["10.96.0.100,tcp:80"]},
        {"name": "KUBE-LOOP-BACK", "type": "hash:ip,port,ip", "entries": []},
    ]
    assert d["kube-ipvs0"] == ["10.96.0.100"]
    # kube-proxy's chains and the jumps to them, chain by chain in the save's declaration order
    assert [(r["chain"], r["packets"]) for r in d["iptables"]] == [("KUBE-SERVICES", 3), ("PREROUTING", 12)]
    text = view.format()
    assert "KUBE-CLUSTER-IP (hash:ip,port): 10.96.0.100,tcp:80" in text and "empty: KUBE-LOOP-BACK" in text
    assert "# ipset save" in view.save()
