"""What the service renderers take: desired services and endpoints as one node sees them.

This is the proxier's view (kube-proxy's ServicePort + Endpoint): already resolved, pure data.
The renderers (iptables.py, nftables.py) turn a NodeContext and a list of ServicePorts into
the exact text kube-proxy would hand to `iptables-restore` / `nft -f`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from netlab.topology.enums import IpvsScheduler, Protocol

__all__ = ["Endpoint", "NodeContext", "ServicePort"]


@dataclass(frozen=True)
class Endpoint:
    """One ready endpoint of a service port: a pod IP and its target port."""

    ip: IPv4Address
    port: int
    node: str  # the node the pod runs on (decides "local" for Local traffic policies)
    pod: str = ""  # "namespace/name", for display only

    @property
    def addr(self) -> str:
        """kube-proxy's endpoint string `ip:port`; endpoints sort by it, lexicographically."""
        # inet_ntoa: the same dotted quad as str(IPv4Address) in under half the time; a render
        # formats each endpoint's address 3-7 times (sort key, KUBE-SEP hash, DNAT, comment).
        # Not cached on the instance: these objects are pickled (the state record) in a thread
        # while a streamed render reads them, and a cache would change their __dict__ meanwhile.
        return f"{socket.inet_ntoa(self.ip.packed)}:{self.port}"


_PROTO = {p: str(p).lower() for p in Protocol}


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service (kube-proxy programs per service port, not per Service)."""

    namespace: str
    name: str
    port_name: str  # "" when the Service's port is unnamed
    protocol: Protocol
    cluster_ip: IPv4Address
    port: int
    node_port: int | None = None  # set for type NodePort
    affinity_timeout: int | None = None  # sessionAffinity ClientIP: timeoutSeconds; None = no affinity
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    endpoints: tuple[Endpoint, ...] = ()
    ipvs_scheduler: IpvsScheduler | None = None  # IPVS mode: this service's scheduler; None = the node's

    @property
    def spn(self) -> str:
        """ServicePortName.String(): `ns/name:port`, or `ns/name` for an unnamed port."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base

    @property
    def proto(self) -> str:
        """Lower-case protocol, as kube-proxy writes it in rules and hashes."""
        return _PROTO[self.protocol]

    def sorted_endpoints(self) -> list[Endpoint]:
        """kube-proxy orders endpoints by their `ip:port` string (so 10.0.0.10 < 10.0.0.9)."""
        return sorted(self.endpoints, key=lambda e: e.addr)

    def local_endpoints(self, node: str) -> list[Endpoint]:
        return [e for e in self.sorted_endpoints() if e.node == node]


@dataclass(frozen=True)
class NodeContext:
    """The node kube-proxy runs on, and its configuration."""

    name: str  # nodeName: endpoints with this node are local
    node_ips: tuple[IPv4Address, ...]
    cluster_cidr: IPv4Network  # --cluster-cidr: detect-local ("! -s <podCIDR> -j KUBE-MARK-MASQ")
    service_cidrs: tuple[IPv4Network, ...] = ()  # nftables: drop traffic to unallocated ClusterIPs
    masquerade_bit: int = 14  # mark 1<<14 = 0x4000
    random_fully: bool = True  # MASQUERADE --random-fully (kube-proxy's unit-test fake lacks it)
    ipvs_scheduler: IpvsScheduler = IpvsScheduler.RR  # IPVS mode: --ipvs-scheduler

    @property
    def masquerade_mark(self) -> str:
        """The mark as kube-proxy's rules show it: `0x4000` for the default bit 14."""
        return f"{1 << self.masquerade_bit:#x}"
