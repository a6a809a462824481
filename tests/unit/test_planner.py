"""Unit tests for `netlab.plan.plan()`: the diff between a desired LabPlan and an ObservedLab.

Each test resolves a topology (sticky against what is "observed", as `netlab up` does), builds
the ObservedLab the kernel would report for a lab that matches some plan exactly, changes one
thing, and checks that the steps are exactly the ones that change needs, in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from netlab.errors import LabError
from netlab.plan import LabPlan, ObservedLab, ObservedNode, ObservedPod, Plan, plan, resolve
from netlab.plan.model import ObservedRules
from netlab.plan.steps import (
    AddPeer,
    CreateNode,
    CreatePod,
    CreateUnderlay,
    DeleteNetns,
    DeletePeer,
    StartResponder,
)
from netlab.topology import Topology

# --- builders -------------------------------------------------------------------------------


def topo(
    nodes: list[str],
    pods: list[tuple[str, str] | dict[str, Any]] = (),
    **cluster: Any,  # type: ignore[assignment]
) -> Topology:
    """pods: (name, node) tuples (no serve) or full dicts."""
    pod_specs = [p if isinstance(p, dict) else {"name": p[0], "node": p[1]} for p in pods]
    return Topology.model_validate(
        {"name": "lab1", "cluster": cluster, "nodes": [{"name": n} for n in nodes], "pods": pod_specs}
    )


def observe(lab: LabPlan) -> ObservedLab:
    """The ObservedLab of a kernel that holds `lab` exactly: marks, peers and responders."""
    nodes = {
        n.name: ObservedNode(
            n.name,
            n.netns,
            n.fingerprint,
            ip=n.ip.ip,
            pod_cidr=n.pod_cidr,
            peers=frozenset(m.as_peer() for m in lab.nodes if m.name != n.name),
            rules=ObservedRules(iptables=True, last=lab.rules(n)),
        )
        for n in lab.nodes
    }
    pods = {
        p.key: ObservedPod(
            p.key,
            p.netns,
            p.fingerprint,
            node=p.node,
            ip=p.ip.ip,
            responders=tuple(s.port for s in p.serve),
        )
        for p in lab.pods
    }
    assert lab.external is not None
    return ObservedLab(
        lab.name,
        underlay=lab.underlay_netns,
        external=(lab.external.netns, lab.external.fingerprint),
        nodes=nodes,
        pods=pods,
    )


def replan(t: Topology, observed: ObservedLab) -> Plan:
    """What `netlab up` does: resolve stickily against the kernel, then diff."""
    return plan(resolve(t, observed=observed), observed)


def kinds(p: Plan) -> list[str]:
    return [type(s).__name__ for s in p.steps]


def targets(p: Plan) -> list[str]:
    return [f"{type(s).__name__} {s.target}" for s in p.steps]


def step_set(p: Plan) -> set[str]:
    out = set(targets(p))
    assert len(out) == len(p.steps), f"duplicate steps: {targets(p)}"
    return out


WEB = {"name": "web", "node": "node2", "serve": [8080, "53/udp"]}
BASE = topo(["node1", "node2", "node3"], [("a1", "node1"), ("a2", "node1"), WEB, ("c1", "node3")])


# --- from nothing ---------------------------------------------------------------------------


def test_plan_from_empty_builds_everything_in_order() -> None:
    desired = resolve(BASE)
    p = plan(desired, ObservedLab("lab1"))
    assert p.counts() == {
        "CreateUnderlay": 1,
        "CreateExternal": 1,
        "CreateNode": 3,
        "AddPeer": 3 * 2,
        "CreatePod": 4,
        "SyncRules": 3,
        "StartResponder": 1,
    }
    # underlay and the external client, then nodes, peers, pods, kube-proxy's rules on every
    # node (services or not), and last the responders
    assert kinds(p) == [
        "CreateUnderlay",
        "CreateExternal",
        *["CreateNode"] * 3,
        *["AddPeer"] * 6,
        *["CreatePod"] * 4,
        *["SyncRules"] * 3,
        "StartResponder",
    ]
    assert p.steps[0] == CreateUnderlay("lab1", "nl-lab1-underlay")
    assert [s.node.name for s in p.steps if isinstance(s, CreateNode)] == ["node1", "node2", "node3"]
    responder = next(s for s in p.steps if isinstance(s, StartResponder))
    assert responder.pod.key == "default/web"
    assert p.lab is desired
    assert not p.empty


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_each_node_gets_one_peer_per_other_node(n: int) -> None:
    desired = resolve(topo([f"node{i}" for i in range(1, n + 1)]))
    p = plan(desired, ObservedLab("lab1"))
    peers = [s for s in p.steps if isinstance(s, AddPeer)]
    assert len(peers) == n * (n - 1)
    for node in desired.nodes:
        got = {s.peer for s in peers if s.node.name == node.name}
        assert got == {m.as_peer() for m in desired.nodes if m.name != node.name}


def test_peers_carry_vtep_mac_for_vxlan_and_none_for_host_gw() -> None:
    for overlay, has_mac in (("vxlan", True), ("host-gw", False)):
        desired = resolve(topo(["node1", "node2"], overlay=overlay))
        peers = [s.peer for s in plan(desired, ObservedLab("lab1")).steps if isinstance(s, AddPeer)]
        assert all((peer.vtep_mac is not None) == has_mac for peer in peers)
        assert {str(peer.node_ip) for peer in peers} == {"172.18.0.2", "172.18.0.3"}


# --- nothing to do --------------------------------------------------------------------------


def test_plan_against_a_matching_lab_is_empty() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    assert obs.pods["default/web"].responders  # the serving pod's responder runs
    p = plan(desired, obs)
    assert p.empty
    assert p.steps == ()
    assert p.counts() == {}


def test_second_up_plans_nothing() -> None:
    first = resolve(BASE)
    assert replan(BASE, observe(first)).empty


# --- pods -----------------------------------------------------------------------------------


def test_removing_a_pod_deletes_only_its_netns() -> None:
    obs = observe(resolve(BASE))
    t = topo(["node1", "node2", "node3"], [("a2", "node1"), WEB, ("c1", "node3")])
    p = replan(t, obs)
    assert p.steps == (DeleteNetns("pod", "default/a1", "nl-lab1-default-a1"),)


def test_adding_a_pod_creates_only_that_pod() -> None:
    obs = observe(resolve(BASE))
    t = topo(
        ["node1", "node2", "node3"],
        [("a1", "node1"), ("a2", "node1"), WEB, ("c1", "node3"), {"name": "new", "node": "node3", "serve": [80]}],
    )
    p = replan(t, obs)
    assert targets(p) == ["CreatePod pod default/new", "StartResponder pod default/new"]
    assert str(p.steps[0].pod.ip) == "10.244.2.3/24"  # type: ignore[union-attr]


def test_half_built_pod_is_replaced() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    obs.pods["default/web"].fingerprint = "-"
    obs.pods["default/web"].responders = ()
    p = plan(desired, obs)
    assert targets(p) == [
        "DeleteNetns pod default/web",
        "CreatePod pod default/web",
        "StartResponder pod default/web",
    ]
    assert p.steps[0] == DeleteNetns("pod", "default/web", "nl-lab1-default-web")


def test_half_built_pod_without_serve_is_replaced_without_responder() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    obs.pods["default/a1"].fingerprint = "-"
    assert targets(plan(desired, obs)) == ["DeleteNetns pod default/a1", "CreatePod pod default/a1"]


def test_pod_whose_responder_died_gets_only_start_responder() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    obs.pods["default/web"].responders = ()
    p = plan(desired, obs)
    assert targets(p) == ["StartResponder pod default/web"]
    assert p.steps[0] == StartResponder("lab1", desired.pods[2])


def test_changing_a_pods_ports_replaces_it() -> None:
    obs = observe(resolve(BASE))
    t = topo(["node1", "node2", "node3"], [("a1", "node1"), ("a2", "node1"), {**WEB, "serve": [8080]}, ("c1", "node3")])
    assert targets(replan(t, obs)) == [
        "DeleteNetns pod default/web",
        "CreatePod pod default/web",
        "StartResponder pod default/web",
    ]


def test_moving_a_pod_to_another_node_replaces_it() -> None:
    obs = observe(resolve(BASE))
    t = topo(["node1", "node2", "node3"], [("a1", "node3"), ("a2", "node1"), WEB, ("c1", "node3")])
    p = replan(t, obs)
    assert targets(p) == ["DeleteNetns pod default/a1", "CreatePod pod default/a1"]
    assert p.steps[1].node.name == "node3"  # type: ignore[union-attr]


# --- nodes ----------------------------------------------------------------------------------


def test_adding_a_node_creates_it_and_its_peers_only() -> None:
    old = resolve(BASE)
    obs = observe(old)
    t = topo(["node1", "node2", "node3", "node4"], [("a1", "node1"), ("a2", "node1"), WEB, ("c1", "node3")])
    p = replan(t, obs)
    new = p.lab.node("node4")
    others = ["node1", "node2", "node3"]
    assert step_set(p) == (
        {"CreateNode node node4", "SyncRules node node4 iptables rules"}
        | {f"AddPeer node {o} -> {new.pod_cidr}" for o in others}
        | {f"AddPeer node node4 -> {old.node(o).pod_cidr}" for o in others}
    )
    assert kinds(p)[0] == "CreateNode"
    for s in p.steps:
        if isinstance(s, AddPeer) and s.node.name != "node4":
            assert s.peer == new.as_peer()


def test_removing_a_node_deletes_its_pods_itself_and_its_peers() -> None:
    old = resolve(BASE)
    obs = observe(old)
    t = topo(["node1", "node3"], [("a1", "node1"), ("a2", "node1"), ("c1", "node3")])
    p = replan(t, obs)
    gone = old.node("node2")
    assert p.steps == (
        DeleteNetns("pod", "default/web", "nl-lab1-default-web"),
        DeleteNetns("node", "node2", "nl-lab1-node2"),
        DeletePeer("node1", "nl-lab1-node1", 1, gone.as_peer()),
        DeletePeer("node3", "nl-lab1-node3", 1, gone.as_peer()),
    )


def test_removing_the_first_node_keeps_the_others_untouched() -> None:
    """Sticky addresses: node2/node3 and their pods keep their fingerprints."""
    old = resolve(BASE)
    t = topo(["node2", "node3"], [WEB, ("c1", "node3")])
    p = replan(t, observe(old))
    assert step_set(p) == {
        "DeleteNetns pod default/a1",
        "DeleteNetns pod default/a2",
        "DeleteNetns node node1",
        f"DeletePeer node node2 -> {old.node('node1').pod_cidr}",
        f"DeletePeer node node3 -> {old.node('node1').pod_cidr}",
    }


def test_half_built_node_is_replaced_with_its_pods() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    obs.nodes["node1"].fingerprint = "-"
    obs.nodes["node1"].peers = frozenset()
    p = plan(desired, obs)
    assert step_set(p) == {
        "DeleteNetns pod default/a1",
        "DeleteNetns pod default/a2",
        "DeleteNetns node node1",
        "CreateNode node node1",
        f"AddPeer node node1 -> {desired.node('node2').pod_cidr}",
        f"AddPeer node node1 -> {desired.node('node3').pod_cidr}",
        "CreatePod pod default/a1",
        "CreatePod pod default/a2",
        "SyncRules node node1 iptables rules",
    }
    # deletes strictly before creates
    verbs = [s.verb for s in p.steps]
    assert verbs == sorted(verbs, key=lambda v: v != "delete")


def test_missing_peer_on_a_kept_node_is_added() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    lost = desired.node("node3").as_peer()
    obs.nodes["node1"].peers = obs.nodes["node1"].peers - {lost}
    assert plan(desired, obs).steps == (AddPeer(desired.node("node1"), lost),)


def test_stale_peer_on_a_kept_node_is_deleted() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    stale = dataclasses.replace(desired.node("node3").as_peer(), vtep_mac="02:00:00:00:00:01")
    obs.nodes["node1"].peers = obs.nodes["node1"].peers | {stale}
    assert plan(desired, obs).steps == (DeletePeer("node1", "nl-lab1-node1", 1, stale),)


def test_missing_underlay_is_created_alone() -> None:
    desired = resolve(BASE)
    obs = observe(desired)
    obs.underlay = None
    assert plan(desired, obs).steps == (CreateUnderlay("lab1", "nl-lab1-underlay"),)


def test_changing_overlay_replaces_all_nodes_and_pods() -> None:
    old = resolve(BASE)
    t = topo(["node1", "node2", "node3"], [("a1", "node1"), ("a2", "node1"), WEB, ("c1", "node3")], overlay="host-gw")
    p = replan(t, observe(old))
    assert p.counts() == {
        "DeleteNetns": 4 + 3,
        "CreateNode": 3,
        "AddPeer": 6,
        "CreatePod": 4,
        "SyncRules": 3,
        "StartResponder": 1,
    }
    deleted = [s.target for s in p.steps if isinstance(s, DeleteNetns)]
    assert deleted == [
        "pod default/a1",
        "pod default/a2",
        "pod default/c1",
        "pod default/web",
        "node node1",
        "node node2",
        "node node3",
    ]
    assert all(s.peer.vtep_mac is None for s in p.steps if isinstance(s, AddPeer))
    assert not any(isinstance(s, (DeletePeer, CreateUnderlay)) for s in p.steps)
    # the new lab keeps its addresses: only the overlay changed
    assert {n.name: n.pod_cidr for n in p.lab.nodes} == {n.name: n.pod_cidr for n in old.nodes}
    assert {q.key: q.ip for q in p.lab.pods} == {q.key: q.ip for q in old.pods}
    assert all(q.mtu == 1500 for q in p.lab.pods)


# --- ownership ------------------------------------------------------------------------------


def test_netns_owned_by_another_lab_is_refused() -> None:
    # lab "lab1" node "x-y" and lab "lab1-x" node "y" both want nl-lab1-x-y
    desired = resolve(topo(["node1", "x-y"]))
    obs = ObservedLab("lab1", taken={"nl-lab1-x-y": "lab1-x"})
    with pytest.raises(LabError) as info:
        plan(desired, obs)
    msg = str(info.value)
    assert "nl-lab1-x-y" in msg
    assert "'lab1-x'" in msg and "'lab1'" in msg


def test_netns_of_other_labs_that_do_not_clash_are_fine() -> None:
    desired = resolve(topo(["node1"]))
    obs = ObservedLab("lab1", taken={"nl-lab2-node1": "lab2"})
    assert kinds(plan(desired, obs)) == ["CreateUnderlay", "CreateExternal", "CreateNode", "SyncRules"]


# --- step descriptions ----------------------------------------------------------------------


def test_step_objects_describe_the_kernel_objects() -> None:
    desired = resolve(BASE)
    p = plan(desired, ObservedLab("lab1"))
    node1 = next(s for s in p.steps if isinstance(s, CreateNode))
    text = "\n".join(node1.objects())
    assert "netns nl-lab1-node1" in text
    assert "eth0 172.18.0.2/24 <-> nl-lab1-underlay/node1 on br0" in text
    assert "bridge cni0 10.244.0.1/24 mtu 1450" in text
    assert "vxlan flannel.1 id 1 dstport 8472 local 172.18.0.2 nolearning mtu 1450 10.244.0.0/32" in text
    peer = next(s for s in p.steps if isinstance(s, AddPeer))
    assert peer.objects()[2] == "route 10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink"
    web = next(s for s in p.steps if isinstance(s, StartResponder))
    assert web.objects() == ["responder on 8080/TCP 53/UDP (answers 'web')"]
    pod = next(s for s in p.steps if isinstance(s, CreatePod))
    assert pod.objects()[-1] == "route default via 10.244.0.1"


@pytest.mark.parametrize("overlay", ["vxlan", "host-gw"])
def test_replacing_a_node_by_a_new_one_reuses_its_subnet(overlay: str) -> None:
    """node1 goes, node4 comes and takes node1's subnet and IP (lowest free). With VXLAN the
    remote VTEP MAC changes, so peers are deleted before they are re-added; with host-gw the
    route (subnet via node IP) is identical and stays."""
    old = resolve(topo(["node1", "node2", "node3"], overlay=overlay))
    p = replan(topo(["node2", "node3", "node4"], overlay=overlay), observe(old))
    new = p.lab.node("node4")
    assert new.pod_cidr == old.node("node1").pod_cidr and new.ip == old.node("node1").ip
    expected = [
        "DeleteNetns node node1",
        "CreateNode node node4",
        f"AddPeer node node4 -> {old.node('node2').pod_cidr}",
        f"AddPeer node node4 -> {old.node('node3').pod_cidr}",
    ]
    if overlay == "vxlan":
        cidr = new.pod_cidr
        expected[1:1] = [f"DeletePeer node node2 -> {cidr}", f"DeletePeer node node3 -> {cidr}"]
        expected[5:5] = [f"AddPeer node node2 -> {cidr}", f"AddPeer node node3 -> {cidr}"]
    expected.append("SyncRules node node4 iptables rules")
    assert sorted(targets(p)) == sorted(expected)
    assert [s.verb for s in p.steps].index("create") == sum(s.verb == "delete" for s in p.steps)
