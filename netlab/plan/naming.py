"""Every kernel name netlab uses, in one place.

    netns      nl-<lab>-underlay            the physical L2 network between nodes (bridge br0)
               nl-<lab>-external            a client outside the cluster, on the underlay
               nl-<lab>-<node>              a Kubernetes node
               nl-<lab>-<namespace>-<pod>   a pod
    links      underlay: br0, one port per node named after the node (<= 15 chars), and `external`
               node:     eth0 (underlay), cni0 (bridge CNI), flannel.<VNI> (VXLAN), veth<8 hex> per pod
               pod:      eth0
    marks      every lab netns has its `lo` alias set to `netlab:<lab>:<role>:<id>:<fingerprint>`;
               every link netlab creates has the alias `netlab:<lab>`.

Interface names must fit IFNAMSIZ (15 bytes + NUL). The pod's host-side veth is named like
the bridge CNI plugin names it (`veth` + 8 hex), but derived from a hash of the pod's identity
instead of random bytes, so that re-planning gives the same name.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "IFNAMSIZ",
    "MARK_PREFIX",
    "NETNS_PREFIX",
    "host_veth",
    "link_alias",
    "mac_address",
    "netns_node",
    "netns_pod",
    "netns_underlay",
    "vxlan_device",
]

IFNAMSIZ = 15
NETNS_PREFIX = "nl-"
MARK_PREFIX = "netlab:"
UNDERLAY_BRIDGE = "br0"
CNI_BRIDGE = "cni0"
NODE_UPLINK = "eth0"
POD_IFNAME = "eth0"


def netns_underlay(lab: str) -> str:
    return f"{NETNS_PREFIX}{lab}-underlay"


def netns_external(lab: str) -> str:
    """A client outside every node, on the underlay: NodePort traffic comes from here."""
    return f"{NETNS_PREFIX}{lab}-external"


def netns_node(lab: str, node: str) -> str:
    return f"{NETNS_PREFIX}{lab}-{node}"


def netns_pod(lab: str, namespace: str, pod: str) -> str:
    return f"{NETNS_PREFIX}{lab}-{namespace}-{pod}"


def vxlan_device(vni: int) -> str:
    # flannel names its device flannel.<VNI>; the schema caps VNI at 9999999 so this fits IFNAMSIZ.
    return f"flannel.{vni}"


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def host_veth(lab: str, namespace: str, pod: str) -> str:
    """`veth` + 8 hex, as the bridge CNI plugin names the host end (12 chars <= IFNAMSIZ)."""
    return "veth" + _digest("veth", lab, namespace, pod).hex()[:8]


def mac_address(*identity: str) -> str:
    """A stable, locally administered unicast MAC for an interface identity."""
    b = bytearray(_digest("mac", *identity)[:6])
    b[0] = (b[0] & 0b11111100) | 0b00000010  # unicast, locally administered
    return ":".join(f"{x:02x}" for x in b)


def link_alias(lab: str) -> str:
    return f"{MARK_PREFIX}{lab}"


def netns_mark(lab: str, role: str, ident: str, fingerprint: str) -> str:
    """The ownership mark written to a lab netns' `lo` alias (IFALIASZ is 256 bytes)."""
    return f"{MARK_PREFIX}{lab}:{role}:{ident}:{fingerprint}"


def parse_mark(alias: str) -> tuple[str, str, str, str] | None:
    """Inverse of netns_mark: (lab, role, id, fingerprint), or None if not a netlab mark."""
    if not alias.startswith(MARK_PREFIX):
        return None
    parts = alias[len(MARK_PREFIX) :].split(":")
    if len(parts) != 4:
        return None
    lab, role, ident, fp = parts
    return lab, role, ident, fp
