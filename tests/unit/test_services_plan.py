"""Services at plan time: ClusterIP/NodePort allocation, endpoints, and kube-proxy sync steps."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from netlab.plan import ObservedLab, plan, resolve
from netlab.plan.model import LabPlan, ObservedNode, ObservedRules
from netlab.plan.steps import SyncRules
from netlab.topology import Topology


def topo(services: list[dict[str, Any]], mode: str = "iptables", replicas: int = 3, **extra: Any) -> Topology:
    return Topology.model_validate(
        {
            "name": "lab1",
            "cluster": {"proxyMode": mode},
            "nodes": [{"name": "node1"}, {"name": "node2"}],
            "deployments": [{"name": "web", "replicas": replicas, "serve": [8080]}],
            "pods": [{"name": "db", "namespace": "other", "node": "node1", "labels": {"app": "web"}}],
            "services": services,
            **extra,
        }
    )


WEB = {"name": "web", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}


def test_endpoints_are_the_matching_pods_of_the_same_namespace() -> None:
    (svc,) = resolve(topo([WEB])).services
    assert [e.pod for e in svc.sorted_endpoints()] == ["default/web-0", "default/web-2", "default/web-1"]
    assert {e.port for e in svc.endpoints} == {8080}
    assert {e.node for e in svc.endpoints} == {"node1", "node2"}
    assert svc.spn == "default/web"  # an unnamed port


def test_no_selector_or_no_match_means_no_endpoints() -> None:
    svcs = resolve(
        topo([{"name": "a", "ports": [{"port": 80}]}, {"name": "b", "selector": {"app": "x"}, "ports": [{"port": 80}]}])
    ).services
    assert [s.endpoints for s in svcs] == [(), ()]


def test_target_port_defaults_to_port() -> None:
    (svc,) = resolve(topo([{"name": "web", "selector": {"app": "web"}, "ports": [{"port": 8080}]}])).services
    assert {e.port for e in svc.endpoints} == {8080}


def test_cluster_ips_are_stable_when_other_services_come_and_go() -> None:
    many = [{"name": f"s{i}", "selector": {"app": "web"}, "ports": [{"port": 80}]} for i in range(20)]
    before = {s.name: s.cluster_ip for s in resolve(topo(many)).services}
    after = {s.name: s.cluster_ip for s in resolve(topo(many[5:] + [{"name": "new", "ports": [{"port": 1}]}])).services}
    assert all(after[k] == before[k] for k in after if k in before)
    cidr = IPv4Network("10.96.0.0/12")
    assert all(ip in cidr and ip not in (cidr.network_address, cidr.network_address + 1) for ip in after.values())
    assert len(set(after.values())) == len(after)


def test_explicit_cluster_ip_and_node_port_are_kept() -> None:
    svc = {
        "name": "np",
        "type": "NodePort",
        "clusterIP": "10.96.0.10",
        "selector": {"app": "web"},
        "ports": [
            {"port": 80, "nodePort": 30080},
        ],
    }
    (s,) = resolve(topo([svc])).services
    assert s.cluster_ip == IPv4Address("10.96.0.10") and s.node_port == 30080


def test_node_ports_are_allocated_in_range_for_node_port_services_only() -> None:
    svcs = resolve(topo([{**WEB, "name": "a", "type": "NodePort"}, {**WEB, "name": "b"}])).services
    assert 30000 <= (svcs[0].node_port or 0) <= 32767 and svcs[1].node_port is None


def _observed_with_rules(lab: LabPlan) -> ObservedLab:
    assert lab.external is not None
    return ObservedLab(
        lab.name,
        underlay=lab.underlay_netns,
        external=(lab.external.netns, lab.external.fingerprint),
        nodes={
            n.name: ObservedNode(
                n.name,
                n.netns,
                n.fingerprint,
                n.ip.ip,
                n.pod_cidr,
                frozenset(m.as_peer() for m in lab.nodes if m.name != n.name),
                ObservedRules(iptables=True, last=lab.rules(n)),
            )
            for n in lab.nodes
        },
    )


def _sync_steps(desired: LabPlan, observed: ObservedLab) -> list[SyncRules]:
    return [s for s in plan(desired, observed).steps if isinstance(s, SyncRules)]


def test_rules_unchanged_means_no_sync() -> None:
    lab = resolve(topo([WEB]))
    obs = _observed_with_rules(lab)
    # pods are not observed here, so only look at the rules steps
    assert _sync_steps(lab, obs) == []


def test_a_changed_service_is_a_partial_sync_of_that_service_only() -> None:
    old = resolve(topo([WEB, {**WEB, "name": "other"}]))
    new = resolve(topo([WEB, {**WEB, "name": "other"}], replicas=2))  # web-2 is gone: endpoints change
    steps = _sync_steps(new, _observed_with_rules(old))
    assert [s.node.name for s in steps] == ["node1", "node2"]
    assert all(s.previous is not None for s in steps)
    assert steps[0].changed() == ["default/other", "default/web"]
    assert "partial sync" in steps[0].objects()[0]


def test_switching_proxy_mode_cleans_up_the_other_mode_and_syncs_in_full() -> None:
    old = resolve(topo([WEB]))
    new = resolve(topo([WEB], mode="nftables"))
    steps = _sync_steps(new, _observed_with_rules(old))
    assert len(steps) == 2
    assert all(s.cleanup == ("iptables",) and s.previous is None and s.rules.mode == "nftables" for s in steps)


def test_kernel_without_the_rules_gets_a_full_sync_even_with_a_record() -> None:
    lab = resolve(topo([WEB]))
    obs = _observed_with_rules(lab)
    obs.nodes["node1"].rules = ObservedRules(iptables=False, last=lab.rules(lab.node("node1")))  # flushed by hand
    steps = _sync_steps(lab, obs)
    assert [(s.node.name, s.previous) for s in steps] == [("node1", None)]
