"""The topology file's schema: YAML keys -> typed, validated pydantic models.

Keys are camelCase like Kubernetes objects (`podCIDR`, `proxyMode`); unknown keys are
rejected. Cross-field rules that need the whole file (duplicate names, pods on unknown
nodes, overlapping CIDRs, capacity) live in `validate.py` so that each error can name
its exact key path.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, field_validator, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

__all__ = [
    "Cluster",
    "NodeSpec",
    "Overlay",
    "PodSpec",
    "Protocol",
    "ProxyMode",
    "ServePort",
    "Topology",
]

# RFC 1123 label, as Kubernetes requires for namespaces, and the names we put in the kernel.
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Linux interface names hold IFNAMSIZ-1 = 15 bytes. A node's name is its port on the
# underlay bridge (as a switch port is labelled with the host plugged into it).
IFNAMSIZ = 15


class Overlay(StrEnum):
    VXLAN = "vxlan"
    HOST_GW = "host-gw"


class ProxyMode(StrEnum):
    IPTABLES = "iptables"
    NFTABLES = "nftables"
    IPVS = "ipvs"


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _dns_label(value: str, what: str, limit: int = 63) -> str:
    if len(value) > limit:
        raise ValueError(
            f"{what} {value!r} is {len(value)} characters, the limit is {limit}; use a shorter name"
        )
    if not DNS1123_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} is not a DNS-1123 label; use lower-case letters, digits and "
            "'-', starting and ending with a letter or digit"
        )
    return value


class ServePort(_Model):
    """A port on which netlab runs a small responder in the pod (answers with the pod's name)."""

    port: Annotated[int, Field(ge=1, le=65535)]
    protocol: Protocol = Protocol.TCP

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `8080`, `"8080"`, `"53/udp"` are accepted as shorthands.
        if isinstance(data, bool):
            raise ValueError("a port must be a number like 8080 or a string like '53/udp'")
        if isinstance(data, int):
            return {"port": data}
        if isinstance(data, str):
            port, _, proto = data.partition("/")
            if not port.isdigit():
                raise ValueError(f"{data!r} is not a port; write 8080, '8080/tcp' or '53/udp'")
            return {"port": int(port), "protocol": (proto or "TCP").upper()}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # editors must accept the shorthands too: 8080, "8080/tcp", "53/udp"
        full = handler.resolve_ref_schema(handler(core))
        return {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": "^[0-9]{1,5}(/(tcp|udp|TCP|UDP))?$"},
                full,
            ]
        }


class Cluster(_Model):
    pod_cidr: ipaddress.IPv4Network = Field(
        default=ipaddress.IPv4Network("10.244.0.0/16"),
        alias="podCIDR",
        description="The cluster's pod network; each node gets one subnet of it.",
    )
    node_cidr_mask_size: Annotated[int, Field(ge=16, le=28)] = Field(
        default=24, alias="nodeCIDRMaskSize", description="Prefix length of each node's pod subnet."
    )
    service_cidr: ipaddress.IPv4Network = Field(
        default=ipaddress.IPv4Network("10.96.0.0/12"), alias="serviceCIDR", description="ClusterIP range."
    )
    node_cidr: ipaddress.IPv4Network = Field(
        default=ipaddress.IPv4Network("172.18.0.0/24"),
        alias="nodeCIDR",
        description="The underlay network between nodes (node eth0 addresses).",
    )
    overlay: Overlay = Overlay.VXLAN
    proxy_mode: ProxyMode = Field(default=ProxyMode.IPTABLES, alias="proxyMode")
    mtu: Annotated[int, Field(ge=1280, le=9000)] = 1500
    vni: Annotated[int, Field(ge=1, le=16777215)] = 1
    vxlan_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8472, alias="vxlanPort")

    @field_validator("pod_cidr", "service_cidr", "node_cidr", mode="before")
    @classmethod
    def _strict_cidr(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                ipaddress.IPv4Network(value, strict=True)
            except ValueError as exc:
                raise ValueError(
                    f"{value!r} is not an IPv4 network in CIDR form ({exc}); write e.g. 10.244.0.0/16"
                ) from None
        return value


class NodeSpec(_Model):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    pod_cidr: ipaddress.IPv4Network | None = Field(default=None, alias="podCIDR")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > IFNAMSIZ:
            raise ValueError(
                f"node name {value!r} is {len(value)} characters but becomes the node's port on the "
                f"underlay bridge, and Linux interface names hold at most {IFNAMSIZ}; "
                "use a shorter name"
            )
        return _dns_label(value, "node name")


class PodSpec(_Model):
    name: str
    namespace: str = "default"
    node: str
    labels: dict[str, str] = Field(default_factory=dict)
    serve: list[ServePort] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "pod name")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _dns_label(value, "namespace")


class Topology(_Model):
    """One lab: a cluster's nodes and pods."""

    name: str = Field(description="Lab name; every kernel object of the lab carries it.")
    cluster: Cluster = Field(default_factory=Cluster)
    nodes: list[NodeSpec] = Field(min_length=1)
    pods: list[PodSpec] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # Lab names go into netns names `nl-<lab>-...` and ownership marks; keep them short.
        return _dns_label(value, "lab name", limit=32)
