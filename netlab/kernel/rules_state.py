"""What netlab last programmed as kube-proxy on each node (kube-proxy keeps this in memory).

It lets a sync rewrite only the services that changed. It is a hint, never the truth: the
planner uses it only while the kernel still holds that mode's rules, and a missing or
unreadable record just means a full sync.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from netlab.plan.model import RulesPlan

__all__ = ["STATE_DIR", "encode", "forget", "load", "save", "write"]

STATE_DIR = Path("/run/netlab")


def _path(lab: str, node: str) -> Path:
    return STATE_DIR / lab / "rules" / f"{node}.pickle"


def load(lab: str, node: str) -> RulesPlan | None:
    try:
        with open(_path(lab, node), "rb") as f:
            value = pickle.load(f)  # noqa: S301 - our own root-only file in /run
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None
    return value if isinstance(value, RulesPlan) else None


def encode(plan: RulesPlan) -> bytes:
    """The record's bytes. At 10k services this is ~70 ms of pickling (40k IPv4Address objects),
    so a sync computes it while the tool it runs is busy in the kernel (see proxy.sync)."""
    return pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)


def write(lab: str, node: str, data: bytes) -> None:
    path = _path(lab, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a crash leaves the old record or the new one


def save(lab: str, node: str, plan: RulesPlan) -> None:
    write(lab, node, encode(plan))


def forget(lab: str, node: str) -> None:
    try:
        _path(lab, node).unlink()
    except FileNotFoundError:
        pass
