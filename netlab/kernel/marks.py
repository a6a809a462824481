"""Which network namespaces belong to netlab, and to which lab: the ownership mark.

Every namespace netlab makes carries a mark in the alias of its `lo` (lab, role, id,
fingerprint). Reading it is one RTM_GETLINK per namespace, and this module imports nothing
heavier than the netlink message classes, so a command that only needs to find its lab
(`netlab probe`, `netlab exec`) starts fast.
"""

from __future__ import annotations

from netlab.kernel import netns, rtnl
from netlab.plan import naming

__all__ = ["lab_netns", "list_labs", "read_mark"]


def read_mark(name: str) -> tuple[str, str, str, str] | None:
    """The netlab ownership mark of netns `name` (lab, role, id, fingerprint), or None."""
    if netns.inode(name) is None:
        return None
    try:
        # one RTM_GETLINK for ifindex 1 (lo), not a dump: `down` reads every lab netns' mark
        with netns.inside(name):
            nl = rtnl.Batch(name)
        with nl:
            lo = nl.get_link(index=1)
    except OSError:
        return None
    return naming.parse_mark((lo.get("IFLA_IFALIAS") if lo else None) or "")


def lab_netns() -> dict[str, tuple[str, str, str, str]]:
    """Every netns that carries a netlab mark: name -> (lab, role, id, fingerprint)."""
    out: dict[str, tuple[str, str, str, str]] = {}
    for name in netns.list_names(naming.NETNS_PREFIX):
        mark = read_mark(name)
        if mark is not None:
            out[name] = mark
    return out


def list_labs() -> list[str]:
    return sorted({mark[0] for mark in lab_netns().values()})
