"""Ask the running kernel whether it has what a lab needs, before building anything.

Each probe creates the object in a scratch network namespace that is never named: it lives
in a short-lived thread and the kernel frees it when the thread exits, so a probe leaves
nothing behind and touches nothing outside.

IPVS is detected the way ipvsadm and kube-proxy find it: by asking generic netlink's
controller for the family "IPVS" (CTRL_CMD_GETFAMILY), never from a version string. A kernel
built with modules loads ip_vs on that very request (the module's genl family alias), so
the answer is "yes" whenever `modprobe ip_vs` would have worked.
"""

from __future__ import annotations

import ctypes
import errno
import shlex
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink import GENL_ID_CTRL, ctrlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from netlab.errors import FeatureError

__all__ = ["IPVS_GENL_FAMILY", "check", "has_ipvs", "ipvs_missing"]

# include/uapi/linux/ip_vs.h: IPVS_GENL_NAME
IPVS_GENL_FAMILY = "IPVS"
T = TypeVar("T")

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


def _ipvs_registered() -> bool:
    with GenericNetlinkSocket() as gs:
        gs.marshal.msg_map[GENL_ID_CTRL] = ctrlmsg
        try:
            gs.discovery(IPVS_GENL_FAMILY)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:  # no such family, and the kernel could not load ip_vs
                return False
            raise
    return True


def _in_scratch_netns(fn: Callable[[], T]) -> T:
    """Run fn in a thread inside a fresh, unnamed network namespace (the current one if
    unshare is refused: a generic netlink lookup changes nothing either way)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        _libc.unshare(CLONE_NEWNET)
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    t = threading.Thread(target=run, name="netlab-feature-probe")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


def has_ipvs() -> bool:
    """Whether this kernel has IPVS: its generic netlink family "IPVS" is registered (or is
    loaded on demand when asked for)."""
    return _in_scratch_netns(_ipvs_registered)


def ipvs_missing(file: str) -> str:
    """What `up` says when a topology asks for proxyMode ipvs on a kernel without IPVS."""
    f = shlex.quote(file)
    chained = shlex.quote(f"netlab up {f} && netlab status")
    return (
        f"ipvs: cluster.proxyMode: ipvs in {file} needs IPVS, and this kernel has none (asked in a scratch "
        f'namespace for the generic netlink family "{IPVS_GENL_FAMILY}": not registered, and the kernel could '
        f"not load ip_vs); run the same on a real distro kernel in a VM with `netlab vm -- netlab up {f}` (a lab "
        f"there lives only as long as the command, so chain what you want to see, e.g. "
        f"`netlab vm -- sh -c {chained}`), or use iptables or nftables here"
    )


def check(*, vxlan: bool, ipvs: bool = False, file: str = "FILE") -> None:
    """Raise FeatureError naming what is missing, how it was detected, and the fix.

    `ipvs`: the lab's proxyMode is ipvs; `file` is its topology file, named in the fix."""
    problems: list[str] = []
    t = threading.Thread(target=_probe, args=(vxlan, problems), name="netlab-feature-probe")
    t.start()
    t.join()
    if ipvs and not has_ipvs():
        problems.append(ipvs_missing(file))
    if problems:
        raise FeatureError("this kernel lacks what the lab needs: " + "; ".join(problems))
