"""Probe planning: SRC/DST resolution and the hops a probe can take (pure, no root)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from netlab.errors import LabError
from netlab.probe.model import EndpointView, ExternalView, LabView, NodeView, PodView, ServiceView
from netlab.probe.path import plan_probe, resolve_destination, resolve_source, split_port

A = IPv4Address


def lab(overlay: str = "vxlan") -> LabView:
    vx = overlay == "vxlan"
    nodes = tuple(
        NodeView(
            f"node{i + 1}",
            f"nl-t-node{i + 1}",
            A(f"172.18.0.{i + 2}"),
            IPv4Network(f"10.244.{i}.0/24"),
            overlay,
            "flannel.1" if vx else None,
            1 if vx else None,
            8472 if vx else None,
            "iptables",
        )
        for i in range(2)
    )
    pods = (
        PodView("default", "client", "node1", "nl-t-default-client", "vethc", A("10.244.0.2")),
        PodView("default", "web-0", "node1", "nl-t-default-web-0", "veth0", A("10.244.0.3")),
        PodView("default", "web-1", "node2", "nl-t-default-web-1", "veth1", A("10.244.1.2")),
        PodView("other", "web-1", "node2", "nl-t-other-web-1", "veth9", A("10.244.1.3")),
    )
    eps = (
        EndpointView(A("10.244.0.3"), 8080, "default/web-0", "node1"),
        EndpointView(A("10.244.1.2"), 8080, "default/web-1", "node2"),
    )
    services = (
        ServiceView("default", "web", "http", "TCP", A("10.96.0.10"), 80, endpoints=eps),
        ServiceView("default", "web", "dns", "UDP", A("10.96.0.10"), 53, endpoints=eps),
        ServiceView("default", "np", "", "TCP", A("10.96.0.11"), 80, node_port=30080, endpoints=eps),
        ServiceView("default", "empty", "", "TCP", A("10.96.0.12"), 80),
        ServiceView("default", "local", "", "TCP", A("10.96.0.13"), 80, internal_local=True, endpoints=eps),
    )
    return LabView("t", "nl-t-underlay", nodes, pods, services, ExternalView("nl-t-external", A("172.18.0.254")))


def labels(hops: tuple[object, ...]) -> list[str]:
    return [h.label for h in hops]  # type: ignore[attr-defined]


def test_split_port() -> None:
    assert split_port("web:80", None) == ("web", 80)
    assert split_port("10.96.0.10:80", 80) == ("10.96.0.10", 80)
    assert split_port("web", 8080) == ("web", 8080)
    with pytest.raises(LabError, match="--port says 81"):
        split_port("web:80", 81)


def test_sources() -> None:
    v = lab()
    assert resolve_source(v, "client").kind == "pod"
    assert resolve_source(v, "default/client").netns == "nl-t-default-client"
    assert resolve_source(v, "node2").kind == "node"
    assert resolve_source(v, "external").ip == A("172.18.0.254")
    with pytest.raises(LabError, match="names more than one thing.*write namespace/name"):
        resolve_source(v, "web-1")
    with pytest.raises(LabError, match="lab t has no pod or node 'nope'; use one of: node1, node2, default/client"):
        resolve_source(v, "nope")


def test_cross_node_vxlan_there_and_back() -> None:
    v = lab()
    src = resolve_source(v, "client")
    p = plan_probe(v, src, resolve_destination(v, "default/web-1:8080", None, None, src))
    assert len(p.branches) == 1
    assert labels(p.branches[0].hops) == [
        "default/client/eth0",
        "node1/vethc",
        "node1/cni0",
        "node1/flannel.1",
        "node1/eth0",
        "underlay/br0",
        "node2/eth0",
        "node2/flannel.1",
        "node2/cni0",
        "node2/veth1",
        "default/web-1/eth0",
    ]
    assert p.nodes == ["node1", "node2"]
    assert [h for h in p.hops if h.role == "underlay"][0].promisc
    assert not [h for h in p.hops if h.role == "cni"][0].promisc  # see path._Hops.cni


def test_same_node_and_host_gw() -> None:
    v = lab()
    src = resolve_source(v, "client")
    p = plan_probe(v, src, resolve_destination(v, "web-0", 8080, None, src))
    assert labels(p.branches[0].hops) == [
        "default/client/eth0",
        "node1/vethc",
        "node1/cni0",
        "node1/veth0",
        "default/web-0/eth0",
    ]
    v = lab("host-gw")
    p = plan_probe(v, src, resolve_destination(v, "default/web-1", 8080, None, src))
    assert "node1/flannel.1" not in labels(p.branches[0].hops)
    assert labels(p.branches[0].hops)[3:6] == ["node1/eth0", "underlay/br0", "node2/eth0"]


def test_service_branches_cover_every_endpoint() -> None:
    v = lab()
    src = resolve_source(v, "client")
    d = resolve_destination(v, "web:80", None, None, src)
    assert (d.kind, d.proto, d.port, str(d.ip)) == ("service", "tcp", 80, "10.96.0.10")
    p = plan_probe(v, src, d)
    assert [b.endpoint.pod for b in p.branches if b.endpoint] == ["default/web-0", "default/web-1"]
    hops = labels(tuple(p.hops))
    assert "default/web-0/eth0" in hops and "default/web-1/eth0" in hops and len(hops) == len(set(hops))
    assert resolve_destination(v, "web:53", None, None, src).proto == "udp"
    # internalTrafficPolicy Local: only the client's node's endpoints
    local = resolve_destination(v, "local:80", None, None, src)
    assert [c.pod for c in local.candidates] == ["default/web-0"]


def test_node_port_from_external_enters_at_that_node() -> None:
    v = lab()
    src = resolve_source(v, "external")
    d = resolve_destination(v, "172.18.0.3:30080", None, None, src)
    assert (d.kind, d.entry_node) == ("nodeport", "node2")
    p = plan_probe(v, src, d)
    to_web0 = next(b for b in p.branches if b.endpoint and b.endpoint.pod == "default/web-0")
    assert labels(to_web0.hops) == [
        "external/eth0",
        "underlay/br0",
        "node2/eth0",
        "node2/flannel.1",
        "node2/eth0",
        "underlay/br0",
        "node1/eth0",
        "node1/flannel.1",
        "node1/cni0",
        "node1/veth0",
        "default/web-0/eth0",
    ]


def test_service_without_endpoints_ends_at_the_node() -> None:
    v = lab()
    src = resolve_source(v, "client")
    p = plan_probe(v, src, resolve_destination(v, "empty", None, None, src))
    assert [b.endpoint for b in p.branches] == [None]
    assert labels(p.branches[0].hops) == ["default/client/eth0", "node1/vethc", "node1/cni0"]


def test_node_source_starts_in_the_node() -> None:
    v = lab()
    src = resolve_source(v, "node2")
    p = plan_probe(v, src, resolve_destination(v, "web-0:8080", None, None, src))
    assert labels(p.branches[0].hops)[0] == "node2/flannel.1"
    assert p.nodes[0] == "node2"


@pytest.mark.parametrize(
    ("dst", "port", "proto", "message"),
    [
        ("web", None, None, "Service default/web has more than one port (80/TCP (http), 53/UDP (dns)); give one"),
        ("web:81", None, None, "Service default/web has no port 81; it has 80/TCP (http), 53/UDP (dns)"),
        ("web:80", None, "udp", "Service default/web has no port 80/UDP"),
        ("nope:80", None, None, "lab t has no pod or Service 'nope'"),
        ("web-1:80", None, None, "'web-1' names more than one pod in lab t"),
        ("client", None, None, "give a port to probe default/client over TCP"),
        ("10.96.0.10", None, None, "10.96.0.10 is the ClusterIP of Service default/web; give a port"),
        (
            "172.18.0.2:31000",
            None,
            None,
            "172.18.0.2 is node node1, and no Service has NodePort 31000 (NodePorts: 30080",
        ),
        ("web:80", None, "sctp", "--proto sctp is not one of tcp, udp, icmp"),
    ],
)
def test_destination_errors_are_one_clear_sentence(dst: str, port: int | None, proto: str | None, message: str) -> None:
    v = lab()
    src = resolve_source(v, "client")
    with pytest.raises(LabError) as exc:
        resolve_destination(v, dst, port, proto, src)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_icmp_needs_no_port_and_ips_resolve() -> None:
    v = lab()
    src = resolve_source(v, "client")
    d = resolve_destination(v, "web-0", None, "icmp", src)
    assert (d.kind, d.port) == ("pod", None)
    assert resolve_destination(v, "10.244.1.2:8080", None, None, src).name == "default/web-1"
    assert resolve_destination(v, "10.96.0.10:53", None, None, src).service.port_name == "dns"  # type: ignore[union-attr]
    other = resolve_destination(v, "192.0.2.1:80", None, None, src)
    assert other.kind == "ip"
    p = plan_probe(v, src, other)
    assert labels(p.branches[0].hops)[-2:] == ["node1/eth0", "underlay/br0"]  # the default route
