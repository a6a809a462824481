"""What the kernel must hold for a planned lab, in the same text form `observe.read_state` reads.

Used to verify a build (`read-back == plan`) and by the tests; pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netlab.plan import naming
from netlab.plan.model import LabPlan
from netlab.topology.schema import Overlay

__all__ = ["ExpectedNetns", "expected_state"]


@dataclass
class ExpectedNetns:
    links: dict[str, dict[str, object]] = field(default_factory=dict)  # name -> kind/mac/mtu/master
    addrs: set[str] = field(default_factory=set)
    routes: set[str] = field(default_factory=set)
    neigh: set[str] = field(default_factory=set)
    fdb: set[str] = field(default_factory=set)
    sysctls: dict[str, str] = field(default_factory=dict)


def expected_state(lab: LabPlan) -> dict[str, ExpectedNetns]:
    out: dict[str, ExpectedNetns] = {}
    under = out[lab.underlay_netns] = ExpectedNetns(sysctls={"net.ipv6.conf.all.disable_ipv6": "1"})
    under.links[naming.UNDERLAY_BRIDGE] = {"kind": "bridge", "master": None}
    if lab.external is not None:
        x = lab.external
        under.links[x.underlay_port] = {
            "kind": "veth",
            "mac": x.underlay_port_mac,
            "mtu": x.mtu,
            "master": naming.UNDERLAY_BRIDGE,
        }
        ext = out[x.netns] = ExpectedNetns(sysctls={"net.ipv6.conf.all.disable_ipv6": "1"})
        ext.links[naming.NODE_UPLINK] = {"kind": "veth", "mac": x.mac, "mtu": x.mtu, "master": None}
        ext.addrs.add(f"{naming.NODE_UPLINK} {x.ip}")
    for n in lab.nodes:
        under.links[n.underlay_port] = {
            "kind": "veth",
            "mac": n.underlay_port_mac,
            "mtu": n.mtu,
            "master": naming.UNDERLAY_BRIDGE,
        }
        e = out[n.netns] = ExpectedNetns(
            sysctls={
                "net.ipv4.ip_forward": "1",
                "net.bridge.bridge-nf-call-iptables": "1",
                "net.ipv6.conf.all.disable_ipv6": "1",
            }
        )
        e.links[naming.NODE_UPLINK] = {"kind": "veth", "mac": n.mac, "mtu": n.mtu, "master": None}
        e.links[naming.CNI_BRIDGE] = {"kind": "bridge", "mac": n.cni_mac, "mtu": n.pod_mtu, "master": None}
        e.addrs |= {f"{naming.NODE_UPLINK} {n.ip}", f"{naming.CNI_BRIDGE} {n.gateway}"}
        e.routes.add(f"default via {n.router} dev {naming.NODE_UPLINK}")
        if n.overlay == Overlay.VXLAN:
            dev = naming.vxlan_device(n.vni)
            e.links[dev] = {"kind": "vxlan", "mac": n.vtep_mac, "mtu": n.pod_mtu, "master": None}
            e.addrs.add(f"{dev} {n.vtep_ip}/32")
        for m in lab.nodes:
            if m.name == n.name:
                continue
            if n.overlay == Overlay.VXLAN:
                dev = naming.vxlan_device(n.vni)
                gw = m.pod_cidr.network_address
                e.routes.add(f"{m.pod_cidr} via {gw} dev {dev} onlink")
                e.neigh.add(f"{gw} lladdr {m.vtep_mac} dev {dev} permanent")
                e.fdb.add(f"{m.vtep_mac} dev {dev} dst {m.ip.ip}")
            else:
                e.routes.add(f"{m.pod_cidr} via {m.ip.ip} dev {naming.NODE_UPLINK}")
    for p in lab.pods:
        node = out[lab.node(p.node).netns]
        node.links[p.host_veth] = {
            "kind": "veth",
            "mac": p.host_mac,
            "mtu": p.mtu,
            "master": naming.CNI_BRIDGE,
            "hairpin": True,
        }
        e = out[p.netns] = ExpectedNetns(sysctls={"net.ipv6.conf.all.disable_ipv6": "1"})
        e.links[naming.POD_IFNAME] = {"kind": "veth", "mac": p.mac, "mtu": p.mtu, "master": None}
        e.addrs.add(f"{naming.POD_IFNAME} {p.ip}")
        e.routes.add(f"default via {p.gateway} dev {naming.POD_IFNAME}")
    return out
