"""What a probe works from and what it plans: the lab as the kernel holds it (LabView), the
source and destination a user named, and the hops to capture on. Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

__all__ = [
    "Branch",
    "Destination",
    "EndpointView",
    "ExternalView",
    "Hop",
    "LabView",
    "NodeView",
    "PodView",
    "ProbePlan",
    "ServiceView",
    "Source",
]


@dataclass(frozen=True)
class NodeView:
    name: str
    netns: str
    ip: IPv4Address  # eth0 on the underlay
    pod_cidr: IPv4Network
    overlay: str  # "vxlan" | "host-gw"
    vxlan_dev: str | None = None  # flannel.<VNI>
    vni: int | None = None
    vxlan_port: int | None = None
    proxy_mode: str | None = None  # "iptables" | "nftables" | "ipvs" | None (no rules)
    iptables_backend: str = "nft"  # the backend kube-proxy's iptables rules are in: "nft" | "legacy"

    @property
    def tracer(self) -> str:
        """How the rule path can be read: "nftrace" (nftables, and iptables on the nft backend:
        its rules are nf_tables rules), "counters" (iptables-legacy), or "none"."""
        if self.proxy_mode == "nftables" or (self.proxy_mode == "iptables" and self.iptables_backend == "nft"):
            return "nftrace"
        if self.proxy_mode == "iptables":
            return "counters"
        return "none"


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    node: str
    netns: str
    host_veth: str  # the pod's port on its node's cni0
    ip: IPv4Address | None = None  # read from the kernel only when a probe needs it

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class EndpointView:
    ip: IPv4Address
    port: int
    pod: str  # namespace/name
    node: str


@dataclass(frozen=True)
class ServiceView:
    namespace: str
    name: str
    port_name: str
    protocol: str  # "TCP" | "UDP" | "SCTP"
    cluster_ip: IPv4Address
    port: int
    node_port: int | None = None
    internal_local: bool = False
    external_local: bool = False
    endpoints: tuple[EndpointView, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def display(self) -> str:
        return self.key + (f":{self.port_name}" if self.port_name else "")


@dataclass(frozen=True)
class ExternalView:
    netns: str
    ip: IPv4Address


@dataclass(frozen=True)
class LabView:
    name: str
    underlay_netns: str
    nodes: tuple[NodeView, ...]
    pods: tuple[PodView, ...]
    services: tuple[ServiceView, ...] = ()
    external: ExternalView | None = None
    underlay_bridge: str = "br0"

    def node(self, name: str) -> NodeView:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pod(self, key: str) -> PodView:
        for p in self.pods:
            if p.key == key:
                return p
        raise KeyError(key)


@dataclass(frozen=True)
class Hop:
    """One capture point: an interface in a namespace."""

    netns: str
    ifname: str
    owner: str  # who the namespace is: a node name, "underlay", "external", or a pod's ns/name
    role: str  # "pod" | "external" | "veth" | "cni" | "vxlan" | "uplink" | "underlay"
    promisc: bool = False  # a bridge shows the frames it forwards between ports only when promiscuous

    @property
    def label(self) -> str:
        """The name of the hop in tables and pcapng interface blocks: `node1/cni0`, `underlay/br0`."""
        return f"{self.owner}/{self.ifname}"

    @property
    def layer(self) -> int:
        """Stacked devices see one received skb with one timestamp: the lower device first."""
        return 1 if self.role in ("cni", "vxlan", "underlay") else 0


@dataclass(frozen=True)
class Source:
    kind: str  # "pod" | "node" | "external"
    name: str  # pod ns/name, node name, or "external"
    netns: str
    ip: IPv4Address | None
    node: str | None  # the node a pod runs on, or the node itself


@dataclass(frozen=True)
class Destination:
    kind: str  # "pod" | "service" | "nodeport" | "ip"
    name: str  # what the user asked for, resolved (`default/web:http`, `default/web-0`)
    ip: IPv4Address
    port: int | None
    proto: str  # "tcp" | "udp" | "icmp"
    service: ServiceView | None = None
    entry_node: str | None = None  # NodePort: the node whose IP is the destination
    candidates: tuple[EndpointView, ...] = ()  # where the packet may end up (one for a pod)


@dataclass(frozen=True)
class Branch:
    """The hops a probe takes to one candidate endpoint, in order; the reply takes them back."""

    endpoint: EndpointView | None
    hops: tuple[Hop, ...]


@dataclass
class ProbePlan:
    source: Source
    destination: Destination
    hops: list[Hop] = field(default_factory=list)  # every capture point, each once
    branches: list[Branch] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # nodes the probe can cross (trace there)

    def index(self, hop: Hop) -> int:
        return self.hops.index(hop)
