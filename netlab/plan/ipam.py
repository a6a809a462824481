"""Address and MAC allocation: Topology (+ what the kernel already holds) -> LabPlan.

Like Kubernetes' own allocators, allocation is sticky: a node keeps its pod subnet and node
IP, a pod keeps its IP, for as long as they exist. So adding or removing one pod or node never
renumbers the rest. New objects take the lowest free address (kube-controller-manager's range
allocator for node subnets; host-local IPAM for pod IPs, starting after the gateway .1).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from netlab.errors import PlanError
from netlab.plan import naming
from netlab.plan.model import ExternalPlan, LabPlan, NodePlan, ObservedLab, PodPlan
from netlab.plan.services import resolve_services
from netlab.topology.schema import Overlay, Topology

__all__ = ["VXLAN_OVERHEAD", "resolve"]

# outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 = 50 bytes: flannel's MTU = link MTU - 50.
VXLAN_OVERHEAD = 50


def _lowest_free(candidates: list[IPv4Address], used: set[IPv4Address]) -> IPv4Address | None:
    for a in candidates:
        if a not in used:
            return a
    return None


def _free_hosts(subnet: IPv4Network, used: set[IPv4Address]) -> Iterator[IPv4Address]:
    """Hosts of a node's pod subnet after .1 (cni0), lowest first, skipping those in `used`
    (checked lazily, so addresses added to `used` later are skipped too)."""
    return (a for a in itertools.islice(subnet.hosts(), 1, None) if a not in used)


def resolve(topo: Topology, source: str = "", observed: ObservedLab | None = None) -> LabPlan:
    c = topo.cluster
    lab = topo.name
    pod_mtu = c.mtu - VXLAN_OVERHEAD if c.overlay == Overlay.VXLAN else c.mtu
    obs_nodes = observed.nodes if observed else {}
    obs_pods = observed.pods if observed else {}

    # --- node pod subnets: explicit, then sticky, then lowest free --------------------------
    subnets: dict[str, IPv4Network] = {n.name: n.pod_cidr for n in topo.nodes if n.pod_cidr}
    taken = set(subnets.values())
    for n in topo.nodes:
        prev = obs_nodes.get(n.name)
        if n.name in subnets or prev is None or prev.pod_cidr is None:
            continue
        if (
            prev.pod_cidr.subnet_of(c.pod_cidr)
            and prev.pod_cidr.prefixlen == c.node_cidr_mask_size
            and prev.pod_cidr not in taken
        ):
            subnets[n.name] = prev.pod_cidr
            taken.add(prev.pod_cidr)
    free = (s for s in c.pod_cidr.subnets(new_prefix=c.node_cidr_mask_size) if s not in taken)
    for n in topo.nodes:
        if n.name not in subnets:
            subnet = next(free, None)
            if subnet is None:  # unreachable after validation, kept as a guard
                raise PlanError(f"cluster.podCIDR {c.pod_cidr} has no free subnet for node {n.name}")
            subnets[n.name] = subnet
            taken.add(subnet)

    # --- node IPs on the underlay: sticky, then lowest free from .2 -------------------------
    hosts = list(c.node_cidr.hosts())
    node_candidates = hosts[1:-1]  # .1 is left for a router/gateway, the last for `external`
    node_ips: dict[str, IPv4Address] = {}
    for n in topo.nodes:
        prev = obs_nodes.get(n.name)
        if prev and prev.ip is not None and prev.ip in node_candidates and prev.ip not in node_ips.values():
            node_ips[n.name] = prev.ip
    for n in topo.nodes:
        if n.name not in node_ips:
            ip = _lowest_free(node_candidates, set(node_ips.values()))
            if ip is None:
                raise PlanError(f"cluster.nodeCIDR {c.node_cidr} has no free address for node {n.name}")
            node_ips[n.name] = ip

    nodes: list[NodePlan] = []
    for n in topo.nodes:
        nodes.append(
            NodePlan(
                name=n.name,
                netns=naming.netns_node(lab, n.name),
                ip=IPv4Interface(f"{node_ips[n.name]}/{c.node_cidr.prefixlen}"),
                mac=naming.mac_address(lab, "node", n.name, "eth0"),
                underlay_port=n.name,
                underlay_port_mac=naming.mac_address(lab, "underlay", n.name),
                pod_cidr=subnets[n.name],
                cni_mac=naming.mac_address(lab, "node", n.name, "cni0"),
                vtep_mac=naming.mac_address(lab, "node", n.name, "vtep"),
                labels=tuple(sorted(n.labels.items())),
                overlay=c.overlay,
                mtu=c.mtu,
                pod_mtu=pod_mtu,
                vni=c.vni,
                vxlan_port=c.vxlan_port,
            )
        )
    by_name = {n.name: n for n in nodes}

    # --- pod IPs: sticky on the same node, then lowest free after the gateway ---------------
    used: dict[str, set[IPv4Address]] = {n.name: set() for n in nodes}
    pod_ips: dict[str, IPv4Address] = {}
    for _, p in topo.all_pods():
        key = f"{p.namespace}/{p.name}"
        prev_pod = obs_pods.get(key)
        node = by_name[p.node]
        if (
            prev_pod
            and prev_pod.node == p.node
            and prev_pod.ip is not None
            and prev_pod.ip in node.pod_cidr
            and prev_pod.ip not in (node.pod_cidr.network_address, node.gateway.ip, node.pod_cidr.broadcast_address)
            and prev_pod.ip not in used[p.node]
        ):
            pod_ips[key] = prev_pod.ip
            used[p.node].add(prev_pod.ip)
    pods: list[PodPlan] = []
    veths: dict[tuple[str, str], str] = {}
    # lowest free first: one lazy walk per node over its hosts after .1 (cni0), skipping the
    # sticky addresses (all taken above) and each new one as it is handed out
    free_ips = {n.name: _free_hosts(n.pod_cidr, used[n.name]) for n in nodes}
    for _, p in topo.all_pods():
        key = f"{p.namespace}/{p.name}"
        node = by_name[p.node]
        if key not in pod_ips:
            ip = next(free_ips[p.node], None)
            if ip is None:
                raise PlanError(f"node {p.node}'s pod subnet {node.pod_cidr} is full; cannot place {key}")
            pod_ips[key] = ip
            used[p.node].add(ip)
        veth = naming.host_veth(lab, p.namespace, p.name)
        clash = veths.get((p.node, veth))
        if clash:
            raise PlanError(
                f"pods {clash} and {key} hash to the same host veth name {veth} on node {p.node}; rename one of them"
            )
        veths[(p.node, veth)] = key
        pods.append(
            PodPlan(
                namespace=p.namespace,
                name=p.name,
                node=p.node,
                netns=naming.netns_pod(lab, p.namespace, p.name),
                ip=IPv4Interface(f"{pod_ips[key]}/{node.pod_cidr.prefixlen}"),
                gateway=node.gateway.ip,
                mac=naming.mac_address(lab, "pod", key, "eth0"),
                host_veth=veth,
                host_mac=naming.mac_address(lab, "pod", key, "host"),
                mtu=pod_mtu,
                serve=tuple(p.serve),
                labels=tuple(sorted(p.labels.items())),
                node_fingerprint=node.fingerprint,
            )
        )

    plan = LabPlan(
        name=lab,
        source=source,
        overlay=c.overlay,
        proxy_mode=c.proxy_mode,
        pod_cidr=c.pod_cidr,
        service_cidr=c.service_cidr,
        node_cidr=c.node_cidr,
        underlay_netns=naming.netns_underlay(lab),
        nodes=tuple(nodes),
        pods=tuple(pods),
        external=ExternalPlan(
            netns=naming.netns_external(lab),
            ip=IPv4Interface(f"{hosts[-1]}/{c.node_cidr.prefixlen}"),  # the last host, kept free above
            mac=naming.mac_address(lab, "external", "eth0"),
            underlay_port="external",
            underlay_port_mac=naming.mac_address(lab, "underlay", "external"),
            mtu=c.mtu,
        ),
        services=resolve_services(topo.services, pods, c.service_cidr),
        iptables_backend=c.iptables_backend,
        ipvs_scheduler=c.ipvs_scheduler,
    )
    names: dict[str, str] = {}
    for ns in plan.netns_names:
        if ns in names:
            raise PlanError(
                f"two objects of lab {lab} would share the network namespace name {ns}; rename one "
                "(names join as nl-<lab>-<node> and nl-<lab>-<namespace>-<pod>)"
            )
        names[ns] = ns
    return plan
