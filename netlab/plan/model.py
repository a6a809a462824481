"""The resolved lab: every address, MAC and kernel name decided, ready to plan against.

Also the *observed* lab, the same facts read back from the kernel, so that planning is a
pure diff of two values (the reconciliation loop, applied to ourselves).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING

from netlab.render.model import NodeContext, ServicePort
from netlab.topology.enums import IpvsScheduler, Overlay, ProxyMode

if TYPE_CHECKING:  # the pydantic schema is not needed to read a plan (see topology/enums.py)
    from netlab.topology.schema import ServePort

__all__ = [
    "ExternalPlan",
    "LabPlan",
    "NodePlan",
    "ObservedLab",
    "ObservedNode",
    "ObservedPod",
    "ObservedRules",
    "Peer",
    "PodPlan",
    "RulesPlan",
]


def _fp(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Peer:
    """What one node programs for one remote node (flannel's three objects, or one route)."""

    subnet: IPv4Network  # the remote node's pod subnet
    node_ip: IPv4Address  # the remote node's underlay address
    vtep_mac: str | None  # the remote flannel.<VNI> MAC (None for host-gw)


@dataclass(frozen=True)
class NodePlan:
    name: str
    netns: str
    ip: IPv4Interface  # eth0 on the underlay
    mac: str  # eth0
    underlay_port: str  # the node's port on the underlay bridge
    underlay_port_mac: str
    pod_cidr: IPv4Network
    cni_mac: str
    vtep_mac: str
    labels: tuple[tuple[str, str], ...]
    overlay: Overlay
    mtu: int  # underlay MTU
    pod_mtu: int
    vni: int
    vxlan_port: int

    @property
    def gateway(self) -> IPv4Interface:
        """cni0's address: the first host of the subnet (bridge CNI isGateway)."""
        return IPv4Interface(f"{self.pod_cidr.network_address + 1}/{self.pod_cidr.prefixlen}")

    @property
    def router(self) -> IPv4Address:
        """The underlay's .1: the node's default gateway (no host answers there; the lab is sealed)."""
        return self.ip.network.network_address + 1

    @property
    def vtep_ip(self) -> IPv4Address:
        """flannel.<VNI> carries the subnet's network address as a /32."""
        return self.pod_cidr.network_address

    def as_peer(self) -> Peer:
        return Peer(self.pod_cidr, self.ip.ip, self.vtep_mac if self.overlay == Overlay.VXLAN else None)

    @property
    def fingerprint(self) -> str:
        return _fp(
            self.ip,
            self.mac,
            self.underlay_port,
            self.pod_cidr,
            self.cni_mac,
            self.vtep_mac,
            self.overlay,
            self.mtu,
            self.pod_mtu,
            self.vni,
            self.vxlan_port,
        )


@dataclass(frozen=True)
class PodPlan:
    namespace: str
    name: str
    node: str
    netns: str
    ip: IPv4Interface
    gateway: IPv4Address
    mac: str
    host_veth: str
    host_mac: str
    mtu: int
    serve: tuple[ServePort, ...]
    labels: tuple[tuple[str, str], ...]
    node_fingerprint: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def fingerprint(self) -> str:
        serve = tuple((s.port, str(s.protocol)) for s in self.serve)
        return _fp(
            self.node,
            self.ip,
            self.mac,
            self.host_veth,
            self.host_mac,
            self.mtu,
            serve,
            self.node_fingerprint,
        )


@dataclass(frozen=True)
class ExternalPlan:
    """A client outside the cluster: a namespace on the underlay, like a laptop on the node LAN."""

    netns: str
    ip: IPv4Interface
    mac: str
    underlay_port: str
    underlay_port_mac: str
    mtu: int

    @property
    def fingerprint(self) -> str:
        return _fp(self.ip, self.mac, self.underlay_port, self.underlay_port_mac, self.mtu)


@dataclass(frozen=True)
class RulesPlan:
    """What kube-proxy programs on one node: the mode, the iptables backend and its input."""

    mode: ProxyMode
    iptables_backend: str  # "auto" (what `iptables` is on this system), "nft" or "legacy"
    context: NodeContext
    services: tuple[ServicePort, ...]

    @property
    def fingerprint(self) -> str:
        return _fp(self.mode, self.iptables_backend, self.context, self.services)


@dataclass(frozen=True)
class LabPlan:
    name: str
    source: str
    overlay: Overlay
    proxy_mode: ProxyMode
    pod_cidr: IPv4Network
    service_cidr: IPv4Network
    node_cidr: IPv4Network
    underlay_netns: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    external: ExternalPlan | None = None
    services: tuple[ServicePort, ...] = ()
    iptables_backend: str = "auto"
    ipvs_scheduler: IpvsScheduler = IpvsScheduler.RR

    def rules(self, node: NodePlan) -> RulesPlan:
        """kube-proxy's input on `node`: detect-local by the cluster's pod CIDR (--cluster-cidr)."""
        context = NodeContext(
            name=node.name,
            node_ips=(node.ip.ip,),
            cluster_cidr=self.pod_cidr,
            service_cidrs=(self.service_cidr,),
            ipvs_scheduler=self.ipvs_scheduler,
        )
        return RulesPlan(self.proxy_mode, self.iptables_backend, context, self.services)

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def netns_names(self) -> list[str]:
        external = [self.external.netns] if self.external else []
        return [self.underlay_netns, *external, *(n.netns for n in self.nodes), *(p.netns for p in self.pods)]


@dataclass
class ObservedNode:
    name: str
    netns: str
    fingerprint: str
    ip: IPv4Address | None = None
    pod_cidr: IPv4Network | None = None
    peers: frozenset[Peer] = frozenset()
    rules: ObservedRules | None = None


@dataclass
class ObservedRules:
    """kube-proxy state on a node: which modes' objects the kernel holds, and what netlab last
    programmed there (from its state file, trusted only while the kernel still agrees).

    iptables has two backends with separate rule sets in the kernel (x_tables for legacy,
    nf_tables tables for nft); a rule set is named like its tool: "iptables" (the system's
    backend, iptablesBackend auto), "iptables-nft", "iptables-legacy"; nftables mode is "nftables".
    """

    iptables: bool = False  # nat KUBE-SERVICES is in effect, in the backend `last` used (auto without it)
    nftables: bool = False  # table ip kube-proxy exists
    ipvs: bool = False  # kube-ipvs0 exists (IPVS mode; its fixed iptables rules are then its own)
    ipvs_draining: bool = False  # real servers at weight 0 wait for a sync to remove them
    last: RulesPlan | None = None
    # the other iptables backend's rule set when it holds kube-proxy's rules too (an
    # iptablesBackend switch left them): e.g. ("iptables-legacy",)
    iptables_leftovers: tuple[str, ...] = ()

    @staticmethod
    def iptables_rule_set(backend: str) -> str:
        """The rule set an iptablesBackend writes: "auto" -> "iptables", "legacy" -> "iptables-legacy"."""
        return "iptables" if backend == "auto" else f"iptables-{backend}"

    @staticmethod
    def iptables_backend_of(rule_set: str) -> str:
        """The inverse of iptables_rule_set."""
        return rule_set.partition("-")[2] or "auto"


@dataclass
class ObservedPod:
    key: str
    netns: str
    fingerprint: str
    node: str | None = None
    ip: IPv4Address | None = None
    responders: tuple[int, ...] = ()


@dataclass
class ObservedLab:
    """A lab as the kernel shows it: found by ownership marks, never by name patterns."""

    name: str
    underlay: str | None = None  # netns name when present
    external: tuple[str, str] | None = None  # (netns name, fingerprint) when present
    nodes: dict[str, ObservedNode] = field(default_factory=dict)
    pods: dict[str, ObservedPod] = field(default_factory=dict)
    # lab netns names that exist but are half-built (mark written, fingerprint "-")
    # are reported as nodes/pods with fingerprint "-", so the planner replaces them.
    taken: dict[str, str] = field(default_factory=dict)  # netns name -> owning lab (other labs)

    @property
    def empty(self) -> bool:
        return self.underlay is None and not self.nodes and not self.pods
