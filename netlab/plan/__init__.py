"""Pure planning: names, addresses, and the diff against what the kernel holds.

Names are imported on first use (PEP 562): reading a plan (the state record) must not import
the planner and with it the pydantic schema.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netlab.plan.ipam import resolve
    from netlab.plan.model import LabPlan, NodePlan, ObservedLab, ObservedNode, ObservedPod, Peer, PodPlan
    from netlab.plan.planner import Plan, plan

_WHERE = {
    "resolve": "netlab.plan.ipam",
    "LabPlan": "netlab.plan.model",
    "NodePlan": "netlab.plan.model",
    "ObservedLab": "netlab.plan.model",
    "ObservedNode": "netlab.plan.model",
    "ObservedPod": "netlab.plan.model",
    "Peer": "netlab.plan.model",
    "PodPlan": "netlab.plan.model",
    "Plan": "netlab.plan.planner",
    "plan": "netlab.plan.planner",
}

__all__ = [
    "LabPlan",
    "NodePlan",
    "ObservedLab",
    "ObservedNode",
    "ObservedPod",
    "Peer",
    "Plan",
    "PodPlan",
    "plan",
    "resolve",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'netlab.plan' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
