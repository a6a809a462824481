"""Typed steps: what `up` does to the kernel, one entity at a time, in order.

A step names the kernel objects it creates or deletes (`objects()`), which is what
`netlab plan` prints; the kernel layer turns each step into netlink requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from netlab.plan import naming
from netlab.plan.model import ExternalPlan, NodePlan, Peer, PodPlan, RulesPlan
from netlab.topology.schema import Overlay

__all__ = [
    "AddPeer",
    "CreateExternal",
    "CreateNode",
    "CreatePod",
    "CreateUnderlay",
    "DeleteNetns",
    "DeletePeer",
    "StartResponder",
    "Step",
    "SyncRules",
]


@dataclass(frozen=True)
class CreateUnderlay:
    lab: str
    netns: str
    verb = "create"

    @property
    def target(self) -> str:
        return "underlay"

    def objects(self) -> list[str]:
        return [f"netns {self.netns}", f"bridge {naming.UNDERLAY_BRIDGE} (the nodes' L2 network)"]


@dataclass(frozen=True)
class CreateExternal:
    lab: str
    underlay_netns: str
    external: ExternalPlan
    verb = "create"

    @property
    def target(self) -> str:
        return "external client"

    def objects(self) -> list[str]:
        e = self.external
        return [
            f"netns {e.netns}",
            f"veth {naming.NODE_UPLINK} {e.ip} <-> {self.underlay_netns}/{e.underlay_port} on {naming.UNDERLAY_BRIDGE}",
        ]


@dataclass(frozen=True)
class SyncRules:
    """Program kube-proxy's rules on a node in one transaction (kube-proxy's syncProxyRules).

    `previous` is what netlab last programmed there, when the kernel still holds it: then only
    the services that changed are rewritten (kube-proxy's partial sync). `cleanup` names the
    rule sets whose leftovers must go first, as ObservedRules names them: "nftables",
    "iptables" (the system's backend), "iptables-nft", "iptables-legacy" (a proxyMode or
    iptablesBackend switch).
    """

    lab: str
    node: NodePlan
    rules: RulesPlan
    previous: RulesPlan | None = None
    cleanup: tuple[str, ...] = ()
    # IPVS real servers are draining (weight 0): compare the whole table with the kernel again,
    # a full sync even though `previous` is known (a partial one looks at changed services only)
    resync: bool = False
    verb = "sync"

    @property
    def full(self) -> bool:
        return self.resync or self.previous is None or self.previous.context != self.rules.context

    @property
    def target(self) -> str:
        return f"node {self.node.name} {self.rules.mode} rules"

    def changed(self) -> list[str]:
        """Service ports whose rules this sync rewrites (all of them on a full sync)."""
        if self.full or self.previous is None:
            return sorted({s.spn for s in self.rules.services})
        old = {s.spn: s for s in self.previous.services}
        new = {s.spn: s for s in self.rules.services}
        return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))

    def objects(self) -> list[str]:
        svcs = self.rules.services
        eps = sum(len(s.endpoints) for s in svcs)
        kind = "full sync" if self.full else "partial sync"
        out = [f"{self.rules.mode} ({kind}): {len(svcs)} service ports, {eps} endpoints"]
        changed = self.changed()
        if kind == "partial sync":
            out.append("changed: " + (", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "") or "none"))
        if self.resync:
            out.append("IPVS real servers draining: check each against the kernel again")
        out += [f"remove {rule_set} rules left by a previous proxyMode or iptablesBackend" for rule_set in self.cleanup]
        return out


@dataclass(frozen=True)
class CreateNode:
    lab: str
    underlay_netns: str
    node: NodePlan
    verb = "create"

    @property
    def target(self) -> str:
        return f"node {self.node.name}"

    def objects(self) -> list[str]:
        n = self.node
        out = [
            f"netns {n.netns} (ip_forward=1, bridge-nf-call-iptables=1, IPv6 off)",
            f"veth {naming.NODE_UPLINK} {n.ip} <-> {self.underlay_netns}/{n.underlay_port} on {naming.UNDERLAY_BRIDGE}",
            f"route default via {n.router} (the underlay's router)",
            f"bridge {naming.CNI_BRIDGE} {n.gateway} mtu {n.pod_mtu}",
        ]
        if n.overlay == Overlay.VXLAN:
            out.append(
                f"vxlan {naming.vxlan_device(n.vni)} id {n.vni} dstport {n.vxlan_port} local {n.ip.ip} "
                f"nolearning mtu {n.pod_mtu} {n.vtep_ip}/32"
            )
        return out


def _peer_objects(node: NodePlan | None, vni: int, peer: Peer) -> list[str]:
    if peer.vtep_mac is not None:
        dev = naming.vxlan_device(vni)
        gw = peer.subnet.network_address
        return [
            f"neigh {gw} lladdr {peer.vtep_mac} dev {dev} nud permanent",
            f"fdb {peer.vtep_mac} dev {dev} dst {peer.node_ip} self permanent",
            f"route {peer.subnet} via {gw} dev {dev} onlink",
        ]
    return [f"route {peer.subnet} via {peer.node_ip} dev {naming.NODE_UPLINK}"]


@dataclass(frozen=True)
class AddPeer:
    node: NodePlan
    peer: Peer
    verb = "create"

    @property
    def target(self) -> str:
        return f"node {self.node.name} -> {self.peer.subnet}"

    def objects(self) -> list[str]:
        return _peer_objects(self.node, self.node.vni, self.peer)


@dataclass(frozen=True)
class DeletePeer:
    node: str
    netns: str
    vni: int
    peer: Peer
    verb = "delete"

    @property
    def target(self) -> str:
        return f"node {self.node} -> {self.peer.subnet}"

    def objects(self) -> list[str]:
        return _peer_objects(None, self.vni, self.peer)


@dataclass(frozen=True)
class CreatePod:
    lab: str
    pod: PodPlan
    node: NodePlan
    verb = "create"

    @property
    def target(self) -> str:
        return f"pod {self.pod.key}"

    def objects(self) -> list[str]:
        p = self.pod
        return [
            f"netns {p.netns} (IPv6 off)",
            f"veth {naming.POD_IFNAME} {p.ip} mtu {p.mtu} <-> {self.node.netns}/{p.host_veth} on "
            f"{naming.CNI_BRIDGE} (hairpin on)",
            f"route default via {p.gateway}",
        ]


@dataclass(frozen=True)
class StartResponder:
    lab: str
    pod: PodPlan
    verb = "start"

    @property
    def target(self) -> str:
        return f"pod {self.pod.key}"

    def objects(self) -> list[str]:
        ports = " ".join(f"{s.port}/{s.protocol}" for s in self.pod.serve)
        return [f"responder on {ports} (answers '{self.pod.name}')"]


@dataclass(frozen=True)
class DeleteNetns:
    """Remove a node, pod or the underlay: stop its processes, delete its netns.

    Deleting a netns deletes every link in it; the kernel then deletes each veth's peer in
    the other namespace too, so removing a pod also removes its host veth from cni0.
    """

    role: str
    ident: str
    netns: str
    verb = "delete"

    @property
    def target(self) -> str:
        return f"{self.role} {self.ident}" if self.role != "underlay" else "underlay"

    def objects(self) -> list[str]:
        return [f"netns {self.netns} and everything in it"]


Step = (
    CreateUnderlay
    | CreateExternal
    | CreateNode
    | AddPeer
    | DeletePeer
    | CreatePod
    | SyncRules
    | StartResponder
    | DeleteNetns
)
