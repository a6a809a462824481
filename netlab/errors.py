"""The one error hierarchy of netlab. Only the CLI turns these into exit codes.

NetlabError
 ├── TopologyError     a topology file is unreadable or invalid (file, key path, value, fix)
 ├── PlanError         the topology is valid but cannot be laid out (address space, names)
 ├── LabError          a lab is missing, ambiguous, locked or owned by another lab
 ├── PrivilegeError    the command needs root (CAP_NET_ADMIN / CAP_SYS_ADMIN)
 ├── FeatureError      the running kernel lacks something the lab needs
 └── KernelError       the kernel refused an operation (carries op, target, errno)
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "FeatureError",
    "KernelError",
    "LabError",
    "NetlabError",
    "PlanError",
    "PrivilegeError",
    "TopologyError",
]


class NetlabError(Exception):
    """Base class: the message is one sentence a user can act on."""

    exit_code = 1


class TopologyError(NetlabError):
    """A topology file is invalid: names the file, the key path, the value and the fix."""

    exit_code = 2

    def __init__(self, file: str, path: str, message: str) -> None:
        self.file = file
        self.path = path
        self.message = message
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {message}")


class PlanError(NetlabError):
    exit_code = 2


class LabError(NetlabError):
    pass


class PrivilegeError(NetlabError):
    exit_code = 4


class FeatureError(NetlabError):
    exit_code = 3


class KernelError(NetlabError):
    """The kernel said no. `op` is what we asked, `target` where, `errno` the kernel's answer."""

    def __init__(self, op: str, target: str, err: int | None, detail: str = "") -> None:
        self.op = op
        self.target = target
        self.errno = err
        reason = os.strerror(err) if err else detail or "failed"
        if err and detail:
            reason = f"{reason} ({detail})"
        name = _errno.errorcode.get(err, "") if err else ""
        suffix = f" [{name}]" if name else ""
        super().__init__(f"{op} in {target}: {reason}{suffix}")
