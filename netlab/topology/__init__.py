"""Topology files: YAML -> a validated `Topology` model.

Names are imported on first use (PEP 562), so `netlab.topology.enums` can be imported without
pydantic (see that module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netlab.topology.enums import Overlay, Protocol, ProxyMode
    from netlab.topology.loader import load, load_text
    from netlab.topology.schema import Cluster, NodeSpec, PodSpec, ServePort, Topology

_WHERE = {
    "load": "netlab.topology.loader",
    "load_text": "netlab.topology.loader",
    "Cluster": "netlab.topology.schema",
    "NodeSpec": "netlab.topology.schema",
    "PodSpec": "netlab.topology.schema",
    "ServePort": "netlab.topology.schema",
    "Topology": "netlab.topology.schema",
    "Overlay": "netlab.topology.enums",
    "Protocol": "netlab.topology.enums",
    "ProxyMode": "netlab.topology.enums",
}

__all__ = [
    "Cluster",
    "NodeSpec",
    "Overlay",
    "PodSpec",
    "Protocol",
    "ProxyMode",
    "ServePort",
    "Topology",
    "load",
    "load_text",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'netlab.topology' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
