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

__all__ = ["STATE_DIR", "forget", "load", "save"]

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


def save(lab: str, node: str, plan: RulesPlan) -> None:
    path = _path(lab, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(plan, f)
    os.replace(tmp, path)  # atomic: a crash leaves the old record or the new one


def forget(lab: str, node: str) -> None:
    try:
        _path(lab, node).unlink()
    except FileNotFoundError:
        pass
