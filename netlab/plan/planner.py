"""Plan = diff(desired LabPlan, ObservedLab): the ordered steps that make the kernel match.

Entities are compared by fingerprint (every kernel-visible property of a node or pod hashes
into it, and it is written into the entity's netns mark only once the entity is complete), so
a half-built or changed entity is replaced, an identical one is left alone, and a second `up`
plans nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from netlab.errors import LabError
from netlab.plan.model import LabPlan, ObservedLab, ObservedRules, Peer, RulesPlan
from netlab.plan.steps import (
    AddPeer,
    CreateExternal,
    CreateNode,
    CreatePod,
    CreateUnderlay,
    DeleteNetns,
    DeletePeer,
    StartResponder,
    Step,
    SyncRules,
)
from netlab.topology.schema import ProxyMode

__all__ = ["Plan", "plan"]


@dataclass(frozen=True)
class Plan:
    lab: LabPlan
    steps: tuple[Step, ...]

    @property
    def empty(self) -> bool:
        return not self.steps

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[type(s).__name__] = out.get(type(s).__name__, 0) + 1
        return out


def plan(desired: LabPlan, observed: ObservedLab) -> Plan:
    for ns in desired.netns_names:
        owner = observed.taken.get(ns)
        if owner is not None:
            raise LabError(
                f"network namespace {ns} already belongs to lab {owner!r}; rename lab "
                f"{desired.name!r} or the clashing node/pod (netns names are nl-<lab>-<name>)"
            )

    removes: list[Step] = []
    creates: list[Step] = []
    want_nodes = {n.name: n for n in desired.nodes}
    want_pods = {p.key: p for p in desired.pods}

    replaced_nodes: set[str] = set()
    for name, obs in sorted(observed.nodes.items()):
        want = want_nodes.get(name)
        if want is None or want.fingerprint != obs.fingerprint:
            replaced_nodes.add(name)

    # Pods first: a pod whose node goes away loses its host veth with it.
    for key, obs_pod in sorted(observed.pods.items()):
        want_pod = want_pods.get(key)
        if want_pod is None or want_pod.fingerprint != obs_pod.fingerprint or obs_pod.node in replaced_nodes:
            removes.append(DeleteNetns("pod", key, obs_pod.netns))

    for name in sorted(replaced_nodes):
        removes.append(DeleteNetns("node", name, observed.nodes[name].netns))

    # Peers on nodes that stay: remove what no longer matches a desired remote node.
    kept = {n: o for n, o in observed.nodes.items() if n not in replaced_nodes}
    for name, obs in sorted(kept.items()):
        want_peers = {m.as_peer() for m in desired.nodes if m.name != name}
        for peer in sorted(obs.peers - want_peers, key=_peer_key):
            removes.append(DeletePeer(name, obs.netns, want_nodes[name].vni, peer))

    if observed.underlay is None:
        creates.append(CreateUnderlay(desired.name, desired.underlay_netns))
    ext = desired.external
    if ext is not None and (observed.external is None or observed.external[1] != ext.fingerprint):
        if observed.external is not None:
            removes.append(DeleteNetns("external", "client", observed.external[0]))
        creates.append(CreateExternal(desired.name, desired.underlay_netns, ext))
    for node in desired.nodes:
        if node.name not in kept:
            creates.append(CreateNode(desired.name, desired.underlay_netns, node))
    for node in desired.nodes:
        have = kept[node.name].peers if node.name in kept else frozenset()
        for remote in desired.nodes:
            if remote.name != node.name and remote.as_peer() not in have:
                creates.append(AddPeer(node, remote.as_peer()))

    responders: list[Step] = []
    removed_pods = {s.ident for s in removes if isinstance(s, DeleteNetns) and s.role == "pod"}
    for pod in desired.pods:
        running = observed.pods.get(pod.key)
        if running is None or pod.key in removed_pods:
            creates.append(CreatePod(desired.name, pod, desired.node(pod.node)))
            running = None
        if pod.serve and (running is None or not running.responders):
            responders.append(StartResponder(desired.name, pod))

    # kube-proxy on every node, services or not (a real node always has its base chains)
    for node in desired.nodes:
        want_rules = desired.rules(node)
        obs_rules = kept[node.name].rules if node.name in kept else None
        present = (
            {
                "iptables": obs_rules.iptables and not obs_rules.ipvs,
                "nftables": obs_rules.nftables,
                "ipvs": obs_rules.ipvs,
            }
            if obs_rules
            else {}
        )
        cleanup = _rules_cleanup(want_rules, obs_rules) if obs_rules else ()
        last = obs_rules.last if obs_rules and present.get(str(want_rules.mode)) else None
        if last is not None and (last.mode != want_rules.mode or last.iptables_backend != want_rules.iptables_backend):
            last = None
        draining = obs_rules is not None and obs_rules.ipvs_draining  # graceful removals to finish
        if last is not None and last.fingerprint == want_rules.fingerprint and not cleanup and not draining:
            continue
        resync = draining and want_rules.mode == ProxyMode.IPVS
        creates.append(SyncRules(desired.name, node, want_rules, previous=last, cleanup=cleanup, resync=resync))
    creates += responders

    return Plan(desired, tuple(removes + creates))


def _rules_cleanup(want: RulesPlan, obs: ObservedRules) -> tuple[str, ...]:
    """The rule sets to remove before `want` is synced (ObservedRules names them): another
    proxyMode's, and within iptables mode another backend's, whose rules would stay in effect
    next to the new ones (both backends' hooks see every packet)."""
    recorded = ObservedRules.iptables_rule_set(obs.last.iptables_backend if obs.last else "auto")
    wanted = ObservedRules.iptables_rule_set(want.iptables_backend) if want.mode == ProxyMode.IPTABLES else None
    out = []
    if obs.ipvs:
        # IPVS mode's KUBE-SERVICES (match-set rules) is its own: "ipvs" removes it with the
        # ipsets, virtual servers and kube-ipvs0, first (its rules reference the sets)
        if want.mode != ProxyMode.IPVS or want.iptables_backend != (obs.last.iptables_backend if obs.last else "auto"):
            out.append("ipvs" + recorded.removeprefix("iptables"))
    elif obs.iptables and recorded != wanted:
        out.append(recorded)
    if obs.nftables and want.mode != ProxyMode.NFTABLES:
        out.append("nftables")
    out += [s for s in obs.iptables_leftovers if s != wanted and s not in out]
    return tuple(out)


def _peer_key(p: Peer) -> tuple[int, int]:
    return (int(p.subnet.network_address), int(p.node_ip))
