"""Ask the running kernel whether it has what a lab needs, before building anything.

Each probe creates the object in a scratch network namespace that is never named: it lives
in a short-lived thread and the kernel frees it when the thread exits, so a probe leaves
nothing behind and touches nothing outside.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netlab.errors import FeatureError

__all__ = ["check"]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _probe(need_vxlan: bool, out: list[str]) -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        out.append(
            "netns: cannot create a network namespace (unshare CLONE_NEWNET failed); "
            "run as root on a kernel with CONFIG_NET_NS"
        )
        return
    import os

    if not os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
        out.append(
            "br_netfilter: the kernel has no net.bridge.bridge-nf-call-iptables (detected by "
            "looking for the sysctl in a fresh namespace); run `modprobe br_netfilter`"
        )
    with IPRoute() as ipr:
        probes: list[tuple[str, dict[str, Any]]] = [("bridge", {}), ("veth", {"peer": "nlprobe1"})]
        if need_vxlan:
            probes.append(("vxlan", {"vxlan_id": 1, "vxlan_port": 8472, "vxlan_learning": 0}))
        for kind, kw in probes:
            try:
                ipr.link("add", ifname=f"nlprobe-{kind[:5]}", kind=kind, **kw)
            except NetlinkError as exc:
                fix = (
                    "run `modprobe vxlan` or set cluster.overlay: host-gw"
                    if kind == "vxlan"
                    else f"run `modprobe {kind}`"
                )
                out.append(
                    f"{kind}: creating a {kind} link in a scratch namespace failed ({os.strerror(exc.code)}); {fix}"
                )


def check(*, vxlan: bool) -> None:
    """Raise FeatureError naming what is missing, how it was detected, and the fix."""
    problems: list[str] = []
    t = threading.Thread(target=_probe, args=(vxlan, problems), name="netlab-feature-probe")
    t.start()
    t.join()
    if problems:
        raise FeatureError("this kernel lacks what the lab needs: " + "; ".join(problems))
