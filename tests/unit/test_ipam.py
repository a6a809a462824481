"""Unit tests for `netlab.plan.resolve()`: addresses, MACs and kernel names of a lab.

The address plan under test (the defaults, as in tests/conftest.py's docstring):
  pods   10.244.0.0/16, one /24 per node in node order; cni0 is .1, pods from .2
  nodes  172.18.0.0/24 on the underlay, from .2 in node order
Allocation is sticky: given what the kernel already holds (an `ObservedLab`), nodes keep their
pod subnet and node IP and pods keep their IP; new objects take the lowest free address.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest

from netlab.errors import PlanError
from netlab.plan import LabPlan, ObservedLab, ObservedNode, ObservedPod, naming, resolve
from netlab.topology import Topology

# --- builders -------------------------------------------------------------------------------


def topo(nodes: list[Any], pods: list[Any] = (), name: str = "lab1", **cluster: Any) -> Topology:  # type: ignore[assignment]
    """nodes: names or dicts; pods: (name, node) / (namespace, name, node) tuples or dicts."""
    node_specs = [{"name": n} if isinstance(n, str) else n for n in nodes]
    pod_specs = []
    for p in pods:
        if isinstance(p, dict):
            pod_specs.append(p)
        elif len(p) == 2:
            pod_specs.append({"name": p[0], "node": p[1]})
        else:
            pod_specs.append({"namespace": p[0], "name": p[1], "node": p[2]})
    return Topology.model_validate({"name": name, "cluster": cluster, "nodes": node_specs, "pods": pod_specs})


def observe(plan: LabPlan) -> ObservedLab:
    """What the kernel would report after building `plan` (only what IPAM reads matters here)."""
    return ObservedLab(
        name=plan.name,
        underlay=plan.underlay_netns,
        nodes={
            n.name: ObservedNode(n.name, n.netns, n.fingerprint, ip=n.ip.ip, pod_cidr=n.pod_cidr) for n in plan.nodes
        },
        pods={p.key: ObservedPod(p.key, p.netns, p.fingerprint, node=p.node, ip=p.ip.ip) for p in plan.pods},
    )


def node_subnets(plan: LabPlan) -> dict[str, str]:
    return {n.name: str(n.pod_cidr) for n in plan.nodes}


def node_ips(plan: LabPlan) -> dict[str, str]:
    return {n.name: str(n.ip) for n in plan.nodes}


def pod_ips(plan: LabPlan) -> dict[str, str]:
    return {p.key: str(p.ip) for p in plan.pods}


THREE = ["node1", "node2", "node3"]
PODS = [("a1", "node1"), ("a2", "node1"), ("b1", "node2"), ("a3", "node1"), ("b2", "node2")]


# --- default allocation ---------------------------------------------------------------------


def test_node_subnets_and_ips_in_node_order() -> None:
    plan = resolve(topo(THREE))
    assert node_subnets(plan) == {
        "node1": "10.244.0.0/24",
        "node2": "10.244.1.0/24",
        "node3": "10.244.2.0/24",
    }
    assert node_ips(plan) == {
        "node1": "172.18.0.2/24",
        "node2": "172.18.0.3/24",
        "node3": "172.18.0.4/24",
    }


def test_pod_ips_from_dot_2_per_node_and_gateway_dot_1() -> None:
    plan = resolve(topo(THREE, PODS))
    assert pod_ips(plan) == {
        "default/a1": "10.244.0.2/24",
        "default/a2": "10.244.0.3/24",
        "default/b1": "10.244.1.2/24",
        "default/a3": "10.244.0.4/24",
        "default/b2": "10.244.1.3/24",
    }
    for p in plan.pods:
        node = plan.node(p.node)
        assert node.gateway == IPv4Interface(f"{node.pod_cidr.network_address + 1}/24")
        assert p.gateway == node.gateway.ip
        assert p.ip.ip in node.pod_cidr and p.ip.network == node.pod_cidr


def test_vtep_ip_is_the_subnet_network_address() -> None:
    plan = resolve(topo(THREE))
    assert [str(n.vtep_ip) for n in plan.nodes] == ["10.244.0.0", "10.244.1.0", "10.244.2.0"]


@pytest.mark.parametrize(
    ("overlay", "mtu", "pod_mtu"),
    [("vxlan", 1500, 1450), ("host-gw", 1500, 1500), ("vxlan", 9000, 8950)],
)
def test_pod_mtu_depends_on_overlay(overlay: str, mtu: int, pod_mtu: int) -> None:
    plan = resolve(topo(["node1"], [("a1", "node1")], overlay=overlay, mtu=mtu))
    assert plan.nodes[0].mtu == mtu
    assert plan.nodes[0].pod_mtu == pod_mtu
    assert plan.pods[0].mtu == pod_mtu


def test_custom_cluster_ranges() -> None:
    plan = resolve(
        topo(
            ["node1", "node2"],
            [("a1", "node2")],
            podCIDR="10.10.0.0/16",
            nodeCIDRMaskSize=26,
            nodeCIDR="192.168.50.0/28",
        )
    )
    assert node_subnets(plan) == {"node1": "10.10.0.0/26", "node2": "10.10.0.64/26"}
    assert node_ips(plan) == {"node1": "192.168.50.2/28", "node2": "192.168.50.3/28"}
    assert pod_ips(plan) == {"default/a1": "10.10.0.66/26"}
    assert plan.pods[0].gateway == IPv4Address("10.10.0.65")


def test_source_and_cluster_facts_carried_into_plan() -> None:
    plan = resolve(topo(["node1"], proxyMode="ipvs"), source="lab.yaml")
    assert plan.name == "lab1"
    assert plan.source == "lab.yaml"
    assert str(plan.proxy_mode) == "ipvs"
    assert plan.pod_cidr == IPv4Network("10.244.0.0/16")
    assert plan.service_cidr == IPv4Network("10.96.0.0/12")
    assert plan.node_cidr == IPv4Network("172.18.0.0/24")


def test_resolve_is_deterministic() -> None:
    t = topo(THREE, PODS)
    assert resolve(t) == resolve(t)


# --- explicit node podCIDR ------------------------------------------------------------------


def test_explicit_node_pod_cidr_is_honoured_and_others_skip_it() -> None:
    t = topo(["node1", {"name": "node2", "podCIDR": "10.244.0.0/24"}, "node3"], [("b1", "node2")])
    plan = resolve(t)
    assert node_subnets(plan) == {
        "node1": "10.244.1.0/24",
        "node2": "10.244.0.0/24",
        "node3": "10.244.2.0/24",
    }
    assert pod_ips(plan) == {"default/b1": "10.244.0.2/24"}


def test_explicit_pod_cidr_beats_a_sticky_one() -> None:
    first = resolve(topo(["node1", "node2"]))  # node1 holds 10.244.0.0/24, node2 10.244.1.0/24
    t = topo(["node1", {"name": "node2", "podCIDR": "10.244.0.0/24"}])
    plan = resolve(t, observed=observe(first))
    # node1 loses its subnet to node2's explicit one and takes the lowest free: node2's old one.
    assert node_subnets(plan) == {"node1": "10.244.1.0/24", "node2": "10.244.0.0/24"}


# --- stickiness -----------------------------------------------------------------------------


def test_removing_the_first_node_does_not_renumber_the_others() -> None:
    first = resolve(topo(THREE, [("a1", "node1"), ("b1", "node2"), ("c1", "node3")]))
    again = resolve(topo(["node2", "node3"], [("b1", "node2"), ("c1", "node3")]), observed=observe(first))
    assert node_subnets(again) == {"node2": "10.244.1.0/24", "node3": "10.244.2.0/24"}
    assert node_ips(again) == {"node2": "172.18.0.3/24", "node3": "172.18.0.4/24"}
    assert pod_ips(again) == {"default/b1": "10.244.1.2/24", "default/c1": "10.244.2.2/24"}
    # Nothing kernel-visible changed for the survivors.
    for n in again.nodes:
        assert n == first.node(n.name)
    assert set(again.pods) <= set(first.pods)


def test_a_node_added_later_takes_the_lowest_free_subnet_and_ip() -> None:
    first = resolve(topo(THREE))
    gap = resolve(topo(["node2", "node3"]), observed=observe(first))
    plan = resolve(topo(["node2", "node3", "node4"]), observed=observe(gap))
    assert node_subnets(plan)["node4"] == "10.244.0.0/24"
    assert node_ips(plan)["node4"] == "172.18.0.2/24"
    assert node_subnets(plan)["node2"] == "10.244.1.0/24"


def test_removing_the_first_pod_does_not_renumber_the_others() -> None:
    first = resolve(topo(["node1"], [("a1", "node1"), ("a2", "node1"), ("a3", "node1")]))
    again = resolve(topo(["node1"], [("a2", "node1"), ("a3", "node1")]), observed=observe(first))
    assert pod_ips(again) == {"default/a2": "10.244.0.3/24", "default/a3": "10.244.0.4/24"}
    assert set(again.pods) <= set(first.pods)


def test_a_new_pod_gets_the_lowest_free_ip() -> None:
    first = resolve(topo(["node1"], [("a1", "node1"), ("a2", "node1"), ("a3", "node1")]))
    gap = resolve(topo(["node1"], [("a2", "node1"), ("a3", "node1")]), observed=observe(first))
    # The new pod is listed first; sticky pods are placed before any new one, whatever the order.
    plan = resolve(
        topo(["node1"], [("new", "node1"), ("a2", "node1"), ("a3", "node1"), ("new2", "node1")]),
        observed=observe(gap),
    )
    assert pod_ips(plan) == {
        "default/new": "10.244.0.2/24",
        "default/a2": "10.244.0.3/24",
        "default/a3": "10.244.0.4/24",
        "default/new2": "10.244.0.5/24",
    }


def test_new_pods_skip_sticky_addresses_on_every_node() -> None:
    """Each node's free-address walk checks that node's own sticky addresses (not the last
    node's: a late-binding closure once made every node check the last node's set)."""
    first = resolve(topo(["node1", "node2"], [("a1", "node1"), ("b1", "node2"), ("b2", "node2")]))
    plan = resolve(
        topo(["node1", "node2"], [("new1", "node1"), ("a1", "node1"), ("b2", "node2")]),
        observed=observe(first),
    )
    assert pod_ips(plan) == {
        "default/new1": "10.244.0.3/24",
        "default/a1": "10.244.0.2/24",
        "default/b2": "10.244.1.3/24",
    }


def test_deployment_replicas_get_addresses_like_pods() -> None:
    t = Topology.model_validate(
        {
            "name": "lab1",
            "nodes": [{"name": "node1"}, {"name": "node2"}],
            "deployments": [{"name": "web", "replicas": 3, "serve": [8080]}],
        }
    )
    assert pod_ips(resolve(t)) == {
        "default/web-0": "10.244.0.2/24",
        "default/web-1": "10.244.1.2/24",
        "default/web-2": "10.244.0.3/24",
    }


def test_a_pod_moved_to_another_node_gets_an_address_there() -> None:
    first = resolve(topo(["node1", "node2"], [("a1", "node1"), ("a2", "node1")]))
    plan = resolve(topo(["node1", "node2"], [("a1", "node2"), ("a2", "node1")]), observed=observe(first))
    assert pod_ips(plan) == {"default/a1": "10.244.1.2/24", "default/a2": "10.244.0.3/24"}


def test_observed_addresses_outside_the_ranges_are_not_reused() -> None:
    """A stale observation (e.g. the cluster ranges changed) falls back to fresh allocation."""
    obs = ObservedLab(
        name="lab1",
        nodes={
            "node1": ObservedNode(
                "node1", "nl-lab1-node1", "x", ip=IPv4Address("10.0.0.9"), pod_cidr=IPv4Network("10.99.0.0/24")
            )
        },
        pods={
            "default/a1": ObservedPod(
                "default/a1", "nl-lab1-default-a1", "x", node="node1", ip=IPv4Address("10.244.0.1")
            )
        },  # the gateway
    )
    plan = resolve(topo(["node1"], [("a1", "node1")]), observed=obs)
    assert node_subnets(plan) == {"node1": "10.244.0.0/24"}
    assert node_ips(plan) == {"node1": "172.18.0.2/24"}
    assert pod_ips(plan) == {"default/a1": "10.244.0.2/24"}


def test_a_28_node_subnet_holds_13_pods() -> None:
    """/28: network .0, gateway .1 and broadcast .15 leave .2-.14 for pods."""
    pods = [(f"p{i}", "node1") for i in range(13)]
    plan = resolve(topo(["node1"], pods, nodeCIDRMaskSize=28))
    assert str(plan.pods[-1].ip) == "10.244.0.14/28"


# --- MACs -----------------------------------------------------------------------------------


def _macs(plan: LabPlan) -> list[str]:
    out = []
    for n in plan.nodes:
        out += [n.mac, n.underlay_port_mac, n.cni_mac, n.vtep_mac]
    for p in plan.pods:
        out += [p.mac, p.host_mac]
    return out


def test_macs_are_locally_administered_unicast_and_unique() -> None:
    macs = _macs(resolve(topo(THREE, PODS)))
    assert len(macs) == len(set(macs)) == 3 * 4 + len(PODS) * 2
    for mac in macs:
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac), mac
        first = int(mac[:2], 16)
        assert first & 0b01 == 0, f"{mac} is multicast"
        assert first & 0b10 == 0b10, f"{mac} is not locally administered"


def test_macs_are_stable_across_runs_and_order() -> None:
    a = resolve(topo(THREE, PODS))
    b = resolve(topo(list(reversed(THREE)), list(reversed(PODS))))
    assert {n.name: (n.mac, n.cni_mac, n.vtep_mac) for n in a.nodes} == {
        n.name: (n.mac, n.cni_mac, n.vtep_mac) for n in b.nodes
    }
    assert {p.key: (p.mac, p.host_mac) for p in a.pods} == {p.key: (p.mac, p.host_mac) for p in b.pods}


def test_macs_depend_on_the_lab_name() -> None:
    a = resolve(topo(["node1"], [("a1", "node1")], name="lab1"))
    b = resolve(topo(["node1"], [("a1", "node1")], name="lab2"))
    assert set(_macs(a)).isdisjoint(_macs(b))


# --- kernel names ---------------------------------------------------------------------------


def test_host_veth_names() -> None:
    plan = resolve(topo(THREE, [*PODS, ("prod", "a1", "node1")]))
    veths = [p.host_veth for p in plan.pods]
    assert len(set(veths)) == len(veths)
    for v in veths:
        assert re.fullmatch(r"veth[0-9a-f]{8}", v), v
        assert len(v.encode()) <= naming.IFNAMSIZ
    assert plan.pods[0].host_veth == naming.host_veth("lab1", "default", "a1")


def test_netns_names_as_documented() -> None:
    plan = resolve(topo(["node1", "node2"], [("a1", "node1"), ("prod", "web", "node2")], name="demo"))
    assert plan.underlay_netns == "nl-demo-underlay"
    assert [n.netns for n in plan.nodes] == ["nl-demo-node1", "nl-demo-node2"]
    assert [p.netns for p in plan.pods] == ["nl-demo-default-a1", "nl-demo-prod-web"]
    assert plan.external is not None and plan.external.netns == "nl-demo-external"
    assert str(plan.external.ip) == "172.18.0.254/24"  # the last host of nodeCIDR, never a node's
    assert plan.netns_names == [
        "nl-demo-underlay",
        "nl-demo-external",
        "nl-demo-node1",
        "nl-demo-node2",
        "nl-demo-default-a1",
        "nl-demo-prod-web",
    ]


def test_node_links_named_as_documented() -> None:
    plan = resolve(topo(["node1"], vni=42))
    n = plan.nodes[0]
    assert n.underlay_port == "node1"
    assert naming.vxlan_device(n.vni) == "flannel.42"
    assert len(naming.vxlan_device(9_999_999)) <= naming.IFNAMSIZ


def test_vni_that_would_overflow_ifnamsiz_is_refused() -> None:
    """flannel.<VNI> must fit IFNAMSIZ (15): VNIs of 8 digits are refused at load time."""
    from netlab.errors import TopologyError
    from netlab.topology import load_text

    assert len(naming.vxlan_device(9_999_999)) == naming.IFNAMSIZ
    with pytest.raises(TopologyError, match=r"cluster\.vni: 10000000 is out of range; use 1 to 9999999"):
        load_text("name: lab1\ncluster: {vni: 10000000}\nnodes: [{name: node1}]\n", "x.yaml")


def test_marks_round_trip() -> None:
    mark = naming.netns_mark("lab1", "pod", "default/a1", "0123456789ab")
    assert mark == "netlab:lab1:pod:default/a1:0123456789ab"
    assert naming.parse_mark(mark) == ("lab1", "pod", "default/a1", "0123456789ab")
    assert naming.parse_mark("netlab:lab1") is None
    assert naming.parse_mark("something else") is None
    assert naming.link_alias("lab1") == "netlab:lab1"


@pytest.mark.parametrize(
    ("nodes", "pods"),
    [
        (["underlay"], []),  # node netns nl-lab1-underlay is the underlay's
        (["a-b"], [("a", "b", "a-b")]),  # node a-b and pod a/b both give nl-lab1-a-b
    ],
)
def test_netns_name_clash_within_a_lab_is_a_plan_error(nodes: list[str], pods: list[Any]) -> None:
    with pytest.raises(PlanError, match="share the network namespace name"):
        resolve(topo(nodes, pods))
