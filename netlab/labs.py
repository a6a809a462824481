"""The two checks every lab command makes first: root, and which lab it acts on.

Kept apart from netlab.lab (which plans and builds, and so imports the schema and the
kernel layer) so that `netlab probe` or `netlab exec` finds its lab without those imports.
"""

from __future__ import annotations

import os

from netlab.errors import LabError, PrivilegeError
from netlab.kernel.marks import list_labs

__all__ = ["find_lab", "require_root"]


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"`netlab {what}` needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to work with network "
            f"namespaces; run it with sudo"
        )


def find_lab(lab: str | None) -> str:
    """The lab a command acts on: the one given, or the only one up."""
    labs = list_labs()
    if lab:
        if lab not in labs:
            raise LabError(
                f"no lab named {lab!r} is up"
                + (f" (up: {', '.join(labs)})" if labs else "")
                + "; start it with `netlab up FILE`"
            )
        return lab
    if not labs:
        raise LabError("no lab is up; start one with `netlab up FILE`")
    if len(labs) > 1:
        raise LabError(f"{len(labs)} labs are up ({', '.join(labs)}); choose one with --lab")
    return labs[0]
