"""Where a probe can go: resolve SRC and DST against the lab, then plan the hops.

    pod eth0 -> host veth -> cni0 -> (node) -> flannel.1 -> node eth0 -> underlay br0
             -> remote node eth0 -> flannel.1 -> cni0 -> veth -> pod eth0          (VXLAN)
    ...      -> node eth0 -> underlay br0 -> remote node eth0 -> cni0 -> ...        (host-gw)
    pod eth0 -> host veth -> cni0 -> veth -> pod eth0                              (same node)
    external eth0 -> underlay br0 -> node eth0 -> (NodePort DNAT) -> ...            (NodePort)

A Service's DNAT may pick any endpoint, so a Service probe has one branch per endpoint it
could reach and captures on the union of their hops; the walk then shows the one taken.
The reply takes the branch back. Pure: no kernel, unit-tested.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address

from netlab.errors import LabError
from netlab.probe.model import (
    Branch,
    Destination,
    EndpointView,
    Hop,
    LabView,
    NodeView,
    PodView,
    ProbePlan,
    ServiceView,
    Source,
)

__all__ = ["PROTOCOLS", "plan_probe", "resolve_destination", "resolve_source", "split_port"]

PROTOCOLS = ("tcp", "udp", "icmp")


def _ip(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def _pods_named(view: LabView, name: str) -> list[PodView]:
    if "/" in name:
        return [p for p in view.pods if p.key == name]
    return [p for p in view.pods if p.name == name]


def _choices(view: LabView) -> str:
    names = [*(n.name for n in view.nodes), *(p.key for p in view.pods)]
    if view.external is not None:
        names.append("external")
    return ", ".join(names)


def resolve_source(view: LabView, spec: str) -> Source:
    """SRC: a pod (`name` or `namespace/name`), a node, or `external`."""
    if spec == "external":
        if view.external is None:
            raise LabError(f"lab {view.name} has no external client; run `netlab up` again to add it")
        return Source("external", "external", view.external.netns, view.external.ip, None)
    if spec == "underlay":
        raise LabError("the underlay is a bridge without an address; probe from a pod, a node or `external`")
    pods = _pods_named(view, spec)
    nodes = [n for n in view.nodes if n.name == spec]
    if len(pods) > 1 or (pods and nodes):
        found = ", ".join([*(p.key for p in pods), *(f"node {n.name}" for n in nodes)])
        raise LabError(f"{spec!r} names more than one thing in lab {view.name} ({found}); write namespace/name")
    if pods:
        p = pods[0]
        return Source("pod", p.key, p.netns, p.ip, p.node)
    if nodes:
        n = nodes[0]
        return Source("node", n.name, n.netns, n.ip, n.name)
    raise LabError(f"lab {view.name} has no pod or node {spec!r}; use one of: {_choices(view)}")


def split_port(spec: str, port: int | None) -> tuple[str, int | None]:
    """`web:80` -> ("web", 80); a --port that disagrees is an error."""
    m = re.fullmatch(r"(.+):(\d{1,5})", spec)
    if not m:
        return spec, port
    target, inline = m.group(1), int(m.group(2))
    if not 0 < inline < 65536:
        raise LabError(f"port {inline} in {spec!r} is not a port number (1-65535)")
    if port is not None and port != inline:
        raise LabError(f"{spec!r} names port {inline} but --port says {port}; give one of them")
    return target, inline


def _service_ports(view: LabView, key_or_name: str) -> list[ServiceView]:
    if "/" in key_or_name:
        return [s for s in view.services if s.key == key_or_name]
    return [s for s in view.services if s.name == key_or_name]


def _ports_text(ports: list[ServiceView]) -> str:
    return ", ".join(f"{s.port}/{s.protocol}" + (f" ({s.port_name})" if s.port_name else "") for s in ports)


def _pick_port(view: LabView, ports: list[ServiceView], port: int | None, proto: str | None, what: str) -> ServiceView:
    keys = sorted({s.key for s in ports})
    if len(keys) > 1:
        raise LabError(
            f"{what!r} names more than one Service in lab {view.name} ({', '.join(keys)}); write namespace/name"
        )
    match = [
        s
        for s in ports
        if (port is None or s.port == port) and (proto in (None, "icmp") or s.protocol.lower() == proto)
    ]
    if port is None and len(match) > 1:
        raise LabError(
            f"Service {keys[0]} has more than one port ({_ports_text(ports)}); give one, e.g. {what}:{ports[0].port}"
        )
    if not match:
        wanted = f"port {port}" if port is not None else "a port"
        if proto not in (None, "icmp"):
            wanted += f"/{proto.upper()}"
        raise LabError(f"Service {keys[0]} has no {wanted}; it has {_ports_text(ports)}")
    return match[0]


def _proto_for(svc: ServiceView, proto: str | None) -> str:
    if proto is not None:
        return proto
    p = svc.protocol.lower()
    if p not in ("tcp", "udp"):
        raise LabError(f"Service {svc.display} is {svc.protocol}; netlab probes TCP, UDP and ICMP only")
    return p


def _candidates(svc: ServiceView, local_to: str | None, local: bool) -> tuple[EndpointView, ...]:
    eps = tuple(sorted(svc.endpoints, key=lambda e: f"{e.ip}:{e.port}"))
    if local and local_to is not None:
        return tuple(e for e in eps if e.node == local_to)
    return eps


def _pod_endpoint(view: LabView, pod: PodView, port: int | None) -> EndpointView:
    if pod.ip is None:
        raise LabError(f"pod {pod.key} has no address on eth0; is lab {view.name} still being built?")
    return EndpointView(pod.ip, port or 0, pod.key, pod.node)


def resolve_destination(view: LabView, spec: str, port: int | None, proto: str | None, source: Source) -> Destination:
    """DST: a pod, a Service (`namespace/name` or `name`), a ClusterIP:port, or a nodeIP:nodePort.

    `proto` None means: the Service port's protocol, else TCP."""
    if proto is not None and proto not in PROTOCOLS:
        raise LabError(f"--proto {proto} is not one of {', '.join(PROTOCOLS)}")
    target, port = split_port(spec, port)
    ip = _ip(target)
    if ip is not None:
        return _resolve_ip(view, ip, port, proto, source)
    ports = _service_ports(view, target)
    pods = _pods_named(view, target)
    if ports and pods:
        raise LabError(
            f"{target!r} names both a Service and a pod in lab {view.name}; write the ClusterIP "
            f"({ports[0].cluster_ip}) or the pod IP instead"
        )
    if ports:
        svc = _pick_port(view, ports, port, proto, target)
        return _service_dest(svc, _proto_for(svc, proto), source)
    if len(pods) > 1:
        raise LabError(
            f"{target!r} names more than one pod in lab {view.name} "
            f"({', '.join(p.key for p in pods)}); write namespace/name"
        )
    if pods:
        return _pod_dest(view, pods[0], port, proto or "tcp")
    if any(n.name == target for n in view.nodes):
        node = view.node(target)
        return _checked(Destination("ip", f"node {node.name}", node.ip, port, proto or "tcp"))
    services = sorted({s.key for s in view.services})
    raise LabError(
        f"lab {view.name} has no pod or Service {target!r}; pods: {', '.join(p.key for p in view.pods) or '-'}"
        + (f"; Services: {', '.join(services)}" if services else "")
    )


def _checked(d: Destination) -> Destination:
    if d.proto != "icmp" and d.port is None:
        raise LabError(
            f"give a port to probe {d.name} over {d.proto.upper()}: `{d.name}:PORT`, --port, or --proto icmp"
        )
    if d.proto == "icmp":
        return Destination(d.kind, d.name, d.ip, None, d.proto, d.service, d.entry_node, d.candidates)
    return d


def _pod_dest(view: LabView, pod: PodView, port: int | None, proto: str) -> Destination:
    return _checked(
        Destination(
            "pod", pod.key, _pod_endpoint(view, pod, port).ip, port, proto, candidates=(_pod_endpoint(view, pod, port),)
        )
    )


def _service_dest(svc: ServiceView, proto: str, source: Source) -> Destination:
    cands = _candidates(svc, source.node, svc.internal_local)
    return Destination("service", svc.display, svc.cluster_ip, svc.port, proto, svc, candidates=cands)


def _resolve_ip(view: LabView, ip: IPv4Address, port: int | None, proto: str | None, source: Source) -> Destination:
    ports = [s for s in view.services if s.cluster_ip == ip]
    if ports:
        if port is None and proto != "icmp":
            raise LabError(
                f"{ip} is the ClusterIP of Service {ports[0].key}; give a port: "
                f"{ip}:{ports[0].port} ({_ports_text(ports)})"
            )
        if proto == "icmp":
            svc = ports[0]
            return Destination("service", svc.display, ip, None, "icmp", svc, candidates=())
        svc = _pick_port(view, ports, port, proto, str(ip))
        return _service_dest(svc, _proto_for(svc, proto), source)
    for n in view.nodes:
        if n.ip != ip:
            continue
        nps = [s for s in view.services if s.node_port is not None and (port is None or s.node_port == port)]
        if port is not None and nps:
            svc = (
                nps[0]
                if len(nps) == 1
                else next((s for s in nps if proto is None or s.protocol.lower() == proto), nps[0])
            )
            local = svc.external_local
            cands = _candidates(svc, n.name, local)
            return Destination(
                "nodeport",
                f"{svc.display} (NodePort {port} on {n.name})",
                ip,
                port,
                _proto_for(svc, proto),
                svc,
                n.name,
                cands,
            )
        if port is not None and proto != "icmp":
            have = ", ".join(f"{s.node_port} ({s.display})" for s in view.services if s.node_port) or "none"
            raise LabError(f"{ip} is node {n.name}, and no Service has NodePort {port} (NodePorts: {have})")
        return _checked(Destination("ip", f"node {n.name}", ip, port, proto or "icmp"))
    for p in view.pods:
        if p.ip == ip:
            return _pod_dest(view, p, port, proto or "tcp")
    for s in view.services:
        for e in s.endpoints:
            if e.ip == ip:
                pod = view.pod(e.pod) if any(p.key == e.pod for p in view.pods) else None
                if pod is not None:
                    return _pod_dest(
                        view,
                        PodView(pod.namespace, pod.name, pod.node, pod.netns, pod.host_veth, ip),
                        port,
                        proto or "tcp",
                    )
    return _checked(Destination("ip", str(ip), ip, port, proto or "tcp"))


# --- hops ------------------------------------------------------------------------------------


class _Hops:
    def __init__(self, view: LabView) -> None:
        self.view = view

    def pod(self, p: PodView) -> Hop:
        return Hop(p.netns, "eth0", p.key, "pod")

    def veth(self, p: PodView) -> Hop:
        return Hop(self.view.node(p.node).netns, p.host_veth, p.node, "veth")

    def cni(self, n: NodeView) -> Hop:
        # not promiscuous: a promiscuous bridge also hands every frame it forwards up its own
        # stack, and with br_netfilter that copy crosses the node's FORWARD chain a second time
        # (traced as an INVALID drop). Frames cni0 bridges port to port show on the two veths.
        return Hop(n.netns, "cni0", n.name, "cni")

    def uplink(self, n: NodeView) -> Hop:
        return Hop(n.netns, "eth0", n.name, "uplink")

    def underlay(self) -> Hop:
        return Hop(self.view.underlay_netns, self.view.underlay_bridge, "underlay", "underlay", promisc=True)

    def vxlan(self, n: NodeView) -> Hop:
        assert n.vxlan_dev is not None
        return Hop(n.netns, n.vxlan_dev, n.name, "vxlan")

    def external(self) -> Hop:
        assert self.view.external is not None
        return Hop(self.view.external.netns, "eth0", "external", "external")

    def across(self, a: NodeView, b: NodeView) -> list[Hop]:
        """Node a to node b, for a packet to b's pod subnet: the overlay."""
        if a.name == b.name:
            return []
        if a.overlay == "vxlan" and a.vxlan_dev:
            return [self.vxlan(a), self.uplink(a), self.underlay(), self.uplink(b), self.vxlan(b)]
        return [self.uplink(a), self.underlay(), self.uplink(b)]

    def to_node_ip(self, a: NodeView, b: NodeView) -> list[Hop]:
        """Node a to node b's own address: plain routing on the underlay."""
        if a.name == b.name:
            return []
        return [self.uplink(a), self.underlay(), self.uplink(b)]

    def to_pod(self, at: NodeView, p: PodView) -> list[Hop]:
        b = self.view.node(p.node)
        return [*self.across(at, b), self.cni(b), self.veth(p), self.pod(p)]


def _dedupe(hops: list[Hop]) -> tuple[Hop, ...]:
    out: list[Hop] = []
    for h in hops:
        if not out or out[-1] != h:
            out.append(h)
    return tuple(out)


def _node_of_ip(view: LabView, ip: IPv4Address) -> NodeView | None:
    for n in view.nodes:
        if ip == n.ip:
            return n
    return None


def _node_of_pod_ip(view: LabView, ip: IPv4Address) -> NodeView | None:
    for n in view.nodes:
        if ip in n.pod_cidr or ip == n.pod_cidr.network_address:
            return n
    return None


def plan_probe(view: LabView, src: Source, dst: Destination) -> ProbePlan:
    """The hops to capture on, and one branch per endpoint the probe may reach."""
    h = _Hops(view)
    start: list[Hop]
    at: NodeView | None
    if src.kind == "pod":
        sp = view.pod(src.name)
        at = view.node(sp.node)
        start = [h.pod(sp), h.veth(sp), h.cni(at)]
    elif src.kind == "node":
        at = view.node(src.name)
        start = []
    else:
        start = [h.external(), h.underlay()]
        entry = _node_of_ip(view, dst.ip)
        at = entry
        if entry is not None:
            start.append(h.uplink(entry))

    # where service DNAT happens: the source's node for a ClusterIP, the entry node for a NodePort
    if dst.kind == "nodeport" and dst.entry_node is not None and at is not None:
        entry = view.node(dst.entry_node)
        start += h.to_node_ip(at, entry)
        at = entry

    branches: list[Branch] = []
    if at is None:
        branches.append(Branch(None, _dedupe(start)))
    elif dst.candidates:
        for ep in dst.candidates:
            pod = next((p for p in view.pods if p.key == ep.pod), None)
            if pod is None:  # an endpoint whose pod is gone: go as far as its node
                node = _node_of_pod_ip(view, ep.ip)
                rest = [*h.across(at, node), h.cni(node)] if node is not None else []
                branches.append(Branch(ep, _dedupe([*start, *rest])))
                continue
            branches.append(Branch(ep, _dedupe([*start, *h.to_pod(at, pod)])))
    else:
        tail: list[Hop] = []
        if dst.kind in ("service", "nodeport"):
            tail = []  # no endpoints: the node's own rules answer (REJECT) or drop
        elif (node := _node_of_ip(view, dst.ip)) is not None:
            tail = h.to_node_ip(at, node)
        elif (node := _node_of_pod_ip(view, dst.ip)) is not None:
            tail = [*h.across(at, node), h.cni(node)]
        elif src.kind != "external":
            tail = [h.uplink(at), h.underlay()]  # the node's default route: the underlay's .1
        branches.append(Branch(None, _dedupe([*start, *tail])))

    hops: list[Hop] = []
    for b in branches:
        for hop in b.hops:
            if hop not in hops:
                hops.append(hop)
    nodes: list[str] = []
    for hop in hops:
        if hop.role in ("veth", "cni", "vxlan", "uplink") and hop.owner not in nodes:
            nodes.append(hop.owner)
    if src.kind == "node" and src.name not in nodes:
        nodes.insert(0, src.name)
    return ProbePlan(src, dst, hops, branches, nodes)
