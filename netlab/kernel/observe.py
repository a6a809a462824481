"""Read a lab back from the kernel: ownership marks, addresses, routes, neighbours, FDB.

Everything here asks the kernel (netlink dumps inside each namespace, /proc for processes);
nothing is inferred from names or from netlab's own state file.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from pyroute2 import IPRoute

from netlab.kernel import netns, rules, rules_state
from netlab.kernel.marks import lab_netns, list_labs, read_mark
from netlab.plan import naming
from netlab.plan.model import ObservedLab, ObservedNode, ObservedPod, ObservedRules, Peer

__all__ = ["LinkInfo", "NetnsState", "lab_netns", "list_labs", "observe_lab", "read_mark", "read_state"]

IFF_UP = 0x1
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x4
RTPROT_KERNEL = 2
RT_TABLE_MAIN = 254
AF_BRIDGE = 7


def processes_by_netns() -> dict[tuple[int, int], list[int]]:
    """(st_dev, st_ino) of a network namespace -> pids of the processes in it."""
    out: dict[tuple[int, int], list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        out.setdefault((st.st_dev, st.st_ino), []).append(int(entry))
    return out


def _peers(ipr: IPRoute, vni: int) -> frozenset[Peer]:
    links = {m["index"]: m.get("IFLA_IFNAME") for m in ipr.get_links()}
    byname = {v: k for k, v in links.items()}
    vx = byname.get(naming.vxlan_device(vni))
    eth0 = byname.get(naming.NODE_UPLINK)
    peers: set[Peer] = set()
    routes = [r for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN) if r["proto"] != RTPROT_KERNEL]
    if vx is not None:
        neigh = {
            IPv4Address(n.get("NDA_DST")): n.get("NDA_LLADDR")
            for n in ipr.get_neighbours(ifindex=vx)
            if n["state"] & NUD_PERMANENT and n.get("NDA_DST")
        }
        fdb = {
            n.get("NDA_LLADDR"): IPv4Address(n.get("NDA_DST"))
            for n in ipr.get_neighbours(family=AF_BRIDGE, ifindex=vx)
            if n.get("NDA_DST")
        }
        for r in routes:
            if r.get("RTA_OIF") != vx or r.get("RTA_DST") is None:
                continue
            subnet = IPv4Network(f"{r.get('RTA_DST')}/{r['dst_len']}")
            gw = r.get("RTA_GATEWAY")
            mac = neigh.get(IPv4Address(gw)) if gw else None
            node_ip = fdb.get(mac) if mac else None
            if gw and IPv4Address(gw) == subnet.network_address and mac and node_ip and r["flags"] & RTNH_F_ONLINK:
                peers.add(Peer(subnet, node_ip, mac))
            else:  # a partial peer: report it so the planner deletes and re-adds it
                peers.add(Peer(subnet, node_ip or IPv4Address(0), mac or "-"))
    for r in routes:
        if r.get("RTA_OIF") == eth0 and r.get("RTA_DST") is not None and r.get("RTA_GATEWAY"):
            peers.add(Peer(IPv4Network(f"{r.get('RTA_DST')}/{r['dst_len']}"), IPv4Address(r.get("RTA_GATEWAY")), None))
    return frozenset(peers)


def _addr(ipr: IPRoute, ifname: str) -> IPv4Interface | None:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        return None
    for a in ipr.get_addr(family=socket.AF_INET, index=idx[0]):
        return IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
    return None


def observe_lab(lab: str, vni: int = 1, marks: dict[str, tuple[str, str, str, str]] | None = None) -> ObservedLab:
    """The lab as the kernel holds it, plus which netns names other labs own."""
    obs = ObservedLab(lab)
    marks = lab_netns() if marks is None else marks
    procs: dict[tuple[int, int], list[int]] | None = None
    for name, (owner, role, ident, fp) in sorted(marks.items()):
        if owner != lab:
            obs.taken[name] = owner
            continue
        if role == "underlay":
            obs.underlay = name
        elif role == "external":
            obs.external = (name, fp)
        elif role == "node":
            node = ObservedNode(ident, name, fp)
            with netns.inside(name), IPRoute() as ipr:
                eth0 = _addr(ipr, naming.NODE_UPLINK)
                cni = _addr(ipr, naming.CNI_BRIDGE)
                node.ip = eth0.ip if eth0 else None
                node.pod_cidr = cni.network if cni else None
                node.peers = _peers(ipr, vni)
            node.rules = observe_rules(lab, ident, name) if fp != "-" else None
            obs.nodes[ident] = node
        elif role == "pod":
            key, _, node_name = ident.partition("@")
            pod = ObservedPod(key, name, fp, node=node_name or None)
            with netns.inside(name), IPRoute() as ipr:
                a = _addr(ipr, naming.POD_IFNAME)
                pod.ip = a.ip if a else None
            if procs is None:
                procs = processes_by_netns()
            ino = netns.inode(name)
            pod.responders = tuple(p for p in procs.get(ino, []) if _is_responder(p)) if ino else ()
            obs.pods[key] = pod
    return obs


def observe_rules(lab: str, node: str, ns: str) -> ObservedRules:
    """Which kube-proxy rule sets the node's kernel holds, and what netlab last programmed there.

    Both iptables backends are asked (a switch of iptablesBackend must remove the other one's
    rules), each with one small listing rather than an `iptables-save` (see has_kube_services)."""
    last = rules_state.load(lab, node)
    recorded = rules.IptablesTool(last.iptables_backend if last else "auto")
    held = {b: rules.has_kube_services(ns, rules.IptablesTool(b)) for b in ("nft", "legacy")}
    from netlab.kernel import proxy_ipvs

    ipvs = proxy_ipvs.has_ipvs(ns)
    return ObservedRules(
        iptables=held[recorded.concrete],
        nftables=rules.has_nft_table(ns),
        ipvs=ipvs,
        ipvs_draining=ipvs and bool(proxy_ipvs.draining(ns)),
        last=last,
        iptables_leftovers=tuple(
            ObservedRules.iptables_rule_set(b) for b, there in held.items() if there and b != recorded.concrete
        ),
    )


def _is_responder(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"netlab.responder" in f.read()
    except OSError:
        return False


# --- full read-back, for `status`, `verify` and the tests -----------------------------------


@dataclass
class LinkInfo:
    name: str
    kind: str
    mac: str
    mtu: int
    up: bool
    master: str | None
    alias: str | None
    peer_netns: str | None = None
    hairpin: bool | None = None


@dataclass
class NetnsState:
    """The parts of one namespace that netlab programs, in `ip`-like text, comparable as sets."""

    links: dict[str, LinkInfo] = field(default_factory=dict)
    addrs: set[str] = field(default_factory=set)
    routes: set[str] = field(default_factory=set)
    neigh: set[str] = field(default_factory=set)
    fdb: set[str] = field(default_factory=set)
    sysctls: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "links": sorted(self.links),
            "addrs": sorted(self.addrs),
            "routes": sorted(self.routes),
            "neigh": sorted(self.neigh),
            "fdb": sorted(self.fdb),
        }


SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.bridge.bridge-nf-call-iptables",
    "net.ipv6.conf.all.disable_ipv6",
)


def _sysctl(key: str) -> str | None:
    try:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def read_state(name: str) -> NetnsState:
    st = NetnsState()
    with netns.inside(name), IPRoute() as ipr:
        links = ipr.get_links()
        names = {m["index"]: m.get("IFLA_IFNAME") for m in links}
        for m in links:
            ifname = m.get("IFLA_IFNAME")
            if ifname == "lo":
                continue
            kind = m.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
            master = m.get("IFLA_MASTER")
            hairpin = None
            if master and names.get(master) == naming.CNI_BRIDGE:
                mode = m.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_MODE")
                hairpin = bool(mode) if mode is not None else None
            st.links[ifname] = LinkInfo(
                name=ifname,
                kind=kind,
                mac=m.get("IFLA_ADDRESS"),
                mtu=m.get("IFLA_MTU"),
                up=bool(m["flags"] & IFF_UP),
                master=names.get(master) if master else None,
                alias=m.get("IFLA_IFALIAS"),
                hairpin=hairpin,
            )
        for a in ipr.get_addr(family=socket.AF_INET):
            ifname = names.get(a["index"])
            if ifname == "lo":
                continue
            st.addrs.add(f"{ifname} {a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if r["proto"] == RTPROT_KERNEL:
                continue
            dst = f"{r.get('RTA_DST')}/{r['dst_len']}" if r.get("RTA_DST") else "default"
            gw = f" via {r.get('RTA_GATEWAY')}" if r.get("RTA_GATEWAY") else ""
            onlink = " onlink" if r["flags"] & RTNH_F_ONLINK else ""
            st.routes.add(f"{dst}{gw} dev {names.get(r.get('RTA_OIF'))}{onlink}")
        for n in ipr.get_neighbours(family=socket.AF_INET):
            if n["state"] & NUD_PERMANENT:
                st.neigh.add(f"{n.get('NDA_DST')} lladdr {n.get('NDA_LLADDR')} dev {names.get(n['ifindex'])} permanent")
        for n in ipr.get_neighbours(family=AF_BRIDGE):
            if n.get("NDA_DST"):
                st.fdb.add(f"{n.get('NDA_LLADDR')} dev {names.get(n['ifindex'])} dst {n.get('NDA_DST')}")
        for key in SYSCTLS:
            val = _sysctl(key)
            if val is not None:
                st.sysctls[key] = val
    return st
