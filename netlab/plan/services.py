"""Services -> the proxier's view: ClusterIPs, NodePorts and endpoints (pure).

What the API server and the endpoint controller do in a cluster, done at plan time:
- a ClusterIP is allocated from cluster.serviceCIDR when none is given, a NodePort from
  30000-32767. Allocation is deterministic and sticky in practice: each service starts at a
  hash of its own name, so adding or removing one never moves another (only a collision on the
  same address is settled, in name order). The network address and .1 (the `kubernetes`
  service's address in a real cluster) are never handed out.
- endpoints: the pods of the service's namespace whose labels contain the selector, with the
  port's targetPort. A service without a selector gets no endpoints (as in Kubernetes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from netlab.errors import PlanError
from netlab.plan.model import PodPlan
from netlab.render.model import Endpoint, ServicePort
from netlab.topology.enums import SessionAffinity, TrafficPolicy
from netlab.topology.schema import ServiceSpec, ServiceType

__all__ = ["NODE_PORT_RANGE", "resolve_services"]

NODE_PORT_RANGE = range(30000, 32768)


def _start(key: str, size: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % size


def _allocate_cluster_ips(services: Sequence[ServiceSpec], cidr: IPv4Network) -> dict[str, IPv4Address]:
    first = int(cidr.network_address) + 2  # skip the network address and .1
    size = cidr.num_addresses - 3  # ... and the broadcast address
    taken = {s.cluster_ip for s in services if s.cluster_ip is not None}
    out: dict[str, IPv4Address] = {s.key: s.cluster_ip for s in services if s.cluster_ip is not None}
    for svc in sorted((s for s in services if s.cluster_ip is None), key=lambda s: s.key):
        start = _start(svc.key, size)
        for k in range(size):
            ip = IPv4Address(first + (start + k) % size)
            if ip not in taken:
                break
        else:
            raise PlanError(f"cluster.serviceCIDR {cidr} has no free address for service {svc.key}; use a larger range")
        taken.add(ip)
        out[svc.key] = ip
    return out


def _allocate_node_ports(services: Sequence[ServiceSpec]) -> dict[tuple[str, int], int]:
    size = len(NODE_PORT_RANGE)
    taken = {p.node_port for s in services for p in s.ports if p.node_port is not None}
    out: dict[tuple[str, int], int] = {}
    for svc in sorted(services, key=lambda s: s.key):
        if svc.type != ServiceType.NODE_PORT:
            continue
        for i, port in enumerate(svc.ports):
            if port.node_port is not None:
                out[(svc.key, i)] = port.node_port
                continue
            start = _start(f"{svc.key}:{port.name}:{port.protocol}", size)
            for k in range(size):
                np = NODE_PORT_RANGE.start + (start + k) % size
                if np not in taken:
                    break
            else:
                raise PlanError(f"no free NodePort left for service {svc.key}")
            taken.add(np)
            out[(svc.key, i)] = np
    return out


def resolve_services(
    services: Sequence[ServiceSpec], pods: Sequence[PodPlan], service_cidr: IPv4Network
) -> tuple[ServicePort, ...]:
    ips = _allocate_cluster_ips(services, service_cidr)
    node_ports = _allocate_node_ports(services)
    out: list[ServicePort] = []
    for svc in services:
        selected = (
            [p for p in pods if p.namespace == svc.namespace and set(svc.selector.items()) <= set(p.labels)]
            if svc.selector
            else []
        )
        for i, port in enumerate(svc.ports):
            endpoints = tuple(
                Endpoint(ip=p.ip.ip, port=port.effective_target_port, node=p.node, pod=p.key) for p in selected
            )
            out.append(
                ServicePort(
                    namespace=svc.namespace,
                    name=svc.name,
                    port_name=port.name,
                    protocol=port.protocol,
                    cluster_ip=ips[svc.key],
                    port=port.port,
                    node_port=node_ports.get((svc.key, i)),
                    affinity_timeout=(
                        svc.session_affinity_config.client_ip.timeout_seconds
                        if svc.session_affinity == SessionAffinity.CLIENT_IP
                        else None
                    ),
                    internal_local=svc.internal_traffic_policy == TrafficPolicy.LOCAL,
                    external_local=svc.external_traffic_policy == TrafficPolicy.LOCAL,
                    endpoints=tuple(sorted(endpoints, key=lambda e: e.addr)),
                    ipvs_scheduler=svc.ipvs_scheduler,
                )
            )
    return tuple(out)
