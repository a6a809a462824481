"""Topology files: YAML -> a validated `Topology` model."""

from netlab.topology.load import load, load_text
from netlab.topology.schema import (
    Cluster,
    NodeSpec,
    Overlay,
    PodSpec,
    Protocol,
    ProxyMode,
    ServePort,
    Topology,
)

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
