"""The planner's kube-proxy cleanups: another proxyMode's rules, and another iptables backend's."""

from __future__ import annotations

from typing import Any

import pytest

from netlab.plan import ObservedLab, plan, resolve
from netlab.plan.model import LabPlan, ObservedNode, ObservedRules
from netlab.plan.steps import SyncRules
from netlab.topology import Topology

WEB = {"name": "web", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}


def lab(mode: str = "iptables", backend: str = "auto") -> LabPlan:
    return resolve(
        Topology.model_validate(
            {
                "name": "lab1",
                "cluster": {"proxyMode": mode, "iptablesBackend": backend},
                "nodes": [{"name": "node1"}],
                "deployments": [{"name": "web", "replicas": 2, "serve": [8080]}],
                "services": [WEB],
            }
        )
    )


def observed(old: LabPlan, **rules: Any) -> ObservedLab:
    """`old` as the kernel holds it; `rules` overrides what observe_rules found on the node."""
    (n,) = old.nodes
    obs = ObservedRules(last=old.rules(n), **rules)
    node = ObservedNode(n.name, n.netns, n.fingerprint, n.ip.ip, n.pod_cidr, frozenset(), obs)
    return ObservedLab(old.name, underlay=old.underlay_netns, nodes={n.name: node})


def sync_step(new: LabPlan, obs: ObservedLab) -> SyncRules | None:
    steps = [s for s in plan(new, obs).steps if isinstance(s, SyncRules)]
    assert len(steps) <= 1
    return steps[0] if steps else None


@pytest.mark.parametrize(
    ("old", "new", "cleanup"),
    [
        (("iptables", "auto"), ("iptables", "legacy"), ("iptables",)),
        (("iptables", "legacy"), ("iptables", "auto"), ("iptables-legacy",)),
        (("iptables", "nft"), ("iptables", "legacy"), ("iptables-nft",)),
        (("iptables", "legacy"), ("nftables", "legacy"), ("iptables-legacy",)),
        (("iptables", "auto"), ("nftables", "auto"), ("iptables",)),
    ],
)
def test_switching_backend_or_mode_removes_the_old_rule_set(
    old: tuple[str, str], new: tuple[str, str], cleanup: tuple[str, ...]
) -> None:
    step = sync_step(lab(*new), observed(lab(*old), iptables=True))
    assert step is not None and step.cleanup == cleanup and step.previous is None
    assert any("remove" in line and cleanup[0] in line for line in step.objects())


def test_the_other_backends_leftovers_are_removed_even_without_a_change() -> None:
    """A record that matches, but the other backend still holds kube-proxy's rules (say an
    older netlab switched backends without removing them): they go, the sync stays partial."""
    now = lab("iptables", "auto")
    step = sync_step(now, observed(now, iptables=True, iptables_leftovers=("iptables-legacy",)))
    assert step is not None and step.cleanup == ("iptables-legacy",) and step.previous == now.rules(now.nodes[0])
    assert sync_step(now, observed(now, iptables=True)) is None


def test_leftovers_in_the_wanted_backend_are_synced_over_not_removed() -> None:
    """The record says auto (nothing left there), legacy holds rules and legacy is wanted: a full sync."""
    step = sync_step(
        lab("iptables", "legacy"), observed(lab(), iptables=False, iptables_leftovers=("iptables-legacy",))
    )
    assert step is not None and step.cleanup == () and step.previous is None


def test_nftables_leftovers_go_when_iptables_is_wanted() -> None:
    step = sync_step(lab("iptables", "legacy"), observed(lab("nftables"), nftables=True))
    assert step is not None and step.cleanup == ("nftables",)


@pytest.mark.parametrize(
    ("backend", "rule_set"), [("auto", "iptables"), ("nft", "iptables-nft"), ("legacy", "iptables-legacy")]
)
def test_rule_set_names(backend: str, rule_set: str) -> None:
    assert ObservedRules.iptables_rule_set(backend) == rule_set
    assert ObservedRules.iptables_backend_of(rule_set) == backend


def test_ipvs_partial_sync_unless_real_servers_drain() -> None:
    """IPVS mode with a matching record: no sync while nothing changed, a partial one for a
    change; while real servers drain at weight 0, a sync even without a change, and a full one
    (`resync`: a partial sync looks at the changed services only, a drain may sit elsewhere)."""
    now = lab("ipvs")
    assert sync_step(now, observed(now, ipvs=True)) is None
    step = sync_step(now, observed(now, ipvs=True, ipvs_draining=True))
    assert step is not None and step.resync and step.full and step.previous == now.rules(now.nodes[0])
    assert any("draining" in line for line in step.objects()) and "full sync" in step.objects()[0]
    other = resolve(
        Topology.model_validate(
            {
                "name": "lab1",
                "cluster": {"proxyMode": "ipvs"},
                "nodes": [{"name": "node1"}],
                "deployments": [{"name": "web", "replicas": 3, "serve": [8080]}],
                "services": [WEB],
            }
        )
    )
    step = sync_step(other, observed(now, ipvs=True))
    assert step is not None and not step.resync and not step.full and "partial sync" in step.objects()[0]
