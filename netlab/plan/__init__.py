"""Pure planning: names, addresses, and the diff against what the kernel holds."""

from netlab.plan.ipam import resolve
from netlab.plan.model import LabPlan, NodePlan, ObservedLab, ObservedNode, ObservedPod, Peer, PodPlan
from netlab.plan.planner import Plan, plan

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
