"""The lab as the kernel holds it, for a probe: nodes, pods, Services, the external client.

Found by ownership marks (never by name patterns), addresses read by netlink inside each
namespace, Services from what netlab last programmed as kube-proxy on the nodes. A lab
whose namespaces are half-made (a mark still says "-") is being built or torn down.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface

from pyroute2 import IPRoute

from netlab.errors import LabError
from netlab.kernel import netns, rules, rules_state
from netlab.kernel.marks import lab_netns
from netlab.kernel.rules_state import STATE_DIR
from netlab.plan import naming
from netlab.probe.model import EndpointView, ExternalView, LabView, NodeView, PodView, ServiceView

__all__ = ["load_view", "pod_ips", "reading"]

RTM_GETADDR = 22
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
NLMSG_ERROR = 2
IFA_ADDRESS = 1
IFA_LOCAL = 2
_HDR = struct.Struct("=LHHLL")


@contextmanager
def reading(lab: str) -> Iterator[None]:
    """Hold the lab's lock shared while a probe reads and captures: `up` and `down` take it
    exclusively, so a probe never starts on a lab that is being changed or torn down, and
    neither of them starts during a probe."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / f".{lab}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabError(
                f"lab {lab!r} is being changed or torn down by another netlab command right now; "
                "probe it when that command has finished"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _addrs_v4(ns: str) -> dict[int, IPv4Interface]:
    """ifindex -> first IPv4 address, from one RTM_GETADDR dump (pods: eth0 is ifindex 2)."""
    out: dict[int, IPv4Interface] = {}
    with netns.inside(ns):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    with s:
        s.bind((0, 0))
        req = _HDR.pack(_HDR.size + 8, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + struct.pack(
            "=BBBBI", socket.AF_INET, 0, 0, 0, 0
        )
        s.send(req)
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, _, _, _ = _HDR.unpack_from(data, off)
                if mtype in (NLMSG_DONE, NLMSG_ERROR):
                    return out
                family, plen, _fl, _sc, index = struct.unpack_from("=BBBBI", data, off + 16)
                a = off + 24
                addr = None
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if atype in (IFA_LOCAL, IFA_ADDRESS) and alen == 8:
                        addr = socket.inet_ntoa(data[a + 4 : a + 8])
                        if atype == IFA_LOCAL:
                            break
                    a += (alen + 3) & ~3
                if family == socket.AF_INET and addr and index not in out:
                    out[index] = IPv4Interface(f"{addr}/{plen}")
                off += (length + 3) & ~3


def pod_ips(pods: list[PodView]) -> list[PodView]:
    """The pods with their eth0 address read from the kernel."""
    out = []
    for p in pods:
        try:
            a = _addrs_v4(p.netns).get(2)
        except OSError:
            a = None
        out.append(PodView(p.namespace, p.name, p.node, p.netns, p.host_veth, a.ip if a else None))
    return out


def _node(lab: str, name: str, ns: str) -> NodeView:
    with netns.inside(ns), IPRoute() as ipr:
        links = ipr.get_links()
        addrs = ipr.get_addr(family=socket.AF_INET)
    byindex = {m["index"]: m.get_attr("IFLA_IFNAME") for m in links}
    ifaddr: dict[str, IPv4Interface] = {}
    for a in addrs:
        ifname = byindex.get(a["index"])
        if ifname and ifname not in ifaddr:
            ifaddr[ifname] = IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
    vx_dev = vni = port = None
    for m in links:
        # flannel.<VNI>: read the VXLAN attributes of that one link (pyroute2 decodes lazily)
        ifname = byindex.get(m["index"]) or ""
        if not ifname.startswith("flannel."):
            continue
        info = m.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            continue
        data = info.get_attr("IFLA_INFO_DATA")
        vx_dev = ifname
        vni = data.get_attr("IFLA_VXLAN_ID")
        port = data.get_attr("IFLA_VXLAN_PORT")
    eth0 = ifaddr.get(naming.NODE_UPLINK)
    cni = ifaddr.get(naming.CNI_BRIDGE)
    if eth0 is None or cni is None:
        raise LabError(f"node {name} of lab {lab} has no address on eth0 or cni0; is the lab being changed?")
    rp = rules_state.load(lab, name)
    mode = str(rp.mode) if rp is not None else None
    backend = rules.IptablesTool(rp.iptables_backend).concrete if rp is not None else "nft"
    return NodeView(
        name=name,
        netns=ns,
        ip=eth0.ip,
        pod_cidr=cni.network,
        overlay="vxlan" if vx_dev else "host-gw",
        vxlan_dev=vx_dev,
        vni=int(vni) if vni is not None else None,
        vxlan_port=int(port) if port is not None else None,
        proxy_mode=mode,
        iptables_backend=backend,
    )


def load_view(lab: str, *, with_pod_ips: bool = True) -> LabView:
    marks = {ns: m for ns, m in lab_netns().items() if m[0] == lab}
    if not marks:
        raise LabError(f"no lab named {lab!r} is up; start it with `netlab up FILE`")
    half = sorted(ns for ns, m in marks.items() if m[3] == "-")
    if half:
        raise LabError(
            f"lab {lab!r} is being built or torn down (namespace {half[0]} is incomplete); "
            "wait for that command to finish, or run `netlab up` again"
        )
    underlay = next((ns for ns, m in marks.items() if m[1] == "underlay"), None)
    if underlay is None:
        raise LabError(f"lab {lab!r} has no underlay namespace; it is being torn down or was interrupted")
    nodes = []
    pods = []
    external = None
    try:
        for ns, (_, role, ident, _fp) in sorted(marks.items()):
            if role == "node":
                nodes.append(_node(lab, ident, ns))
            elif role == "pod":
                key, _, node = ident.partition("@")
                namespace, _, name = key.partition("/")
                pods.append(PodView(namespace, name, node, ns, naming.host_veth(lab, namespace, name)))
            elif role == "external":
                a = [ip for ip in _addrs_v4(ns).values() if not ip.ip.is_loopback]
                if a:
                    external = ExternalView(ns, a[0].ip)
    except FileNotFoundError as exc:
        raise LabError(f"lab {lab!r} is being torn down: namespace {exc.filename or ''} is gone".rstrip()) from None
    if with_pod_ips:
        pods = pod_ips(pods)
    services: list[ServiceView] = []
    for n in nodes:
        rp = rules_state.load(lab, n.name)
        if rp is None:
            continue
        for s in rp.services:
            services.append(
                ServiceView(
                    namespace=s.namespace,
                    name=s.name,
                    port_name=s.port_name,
                    protocol=str(s.protocol),
                    cluster_ip=s.cluster_ip,
                    port=s.port,
                    node_port=s.node_port,
                    internal_local=s.internal_local,
                    external_local=s.external_local,
                    endpoints=tuple(EndpointView(e.ip, e.port, e.pod, e.node) for e in s.endpoints),
                )
            )
        break
    return LabView(lab, underlay, tuple(nodes), tuple(pods), tuple(services), external)


def node_ips(view: LabView) -> dict[str, IPv4Address]:
    return {n.name: n.ip for n in view.nodes}


def lab_alive(view: LabView) -> bool:
    return os.path.exists(netns.path(view.underlay_netns)) and all(netns.exists(n.netns) for n in view.nodes)
