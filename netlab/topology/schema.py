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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, field_validator, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from netlab.topology.enums import IpvsScheduler, Overlay, Protocol, ProxyMode, SessionAffinity, TrafficPolicy

__all__ = [
    "Cluster",
    "IpvsScheduler",
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
# links that already exist in the underlay namespace, where each node gets a port named after it
UNDERLAY_LINKS = ("lo", "br0", "external")


IptablesBackend = Literal["auto", "nft", "legacy"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, data: Any) -> Any:
        # `pods:` or `labels:` with nothing after it is YAML null: read it as "none".
        if isinstance(data, dict):
            optional = {f.alias or name for name, f in cls.model_fields.items() if not f.is_required()}
            return {k: v for k, v in data.items() if not (v is None and k in optional)}
        return data


def _cidr(value: Any, example: str) -> Any:
    """Strict IPv4 CIDR: '10.244.0.1/16' (host bits set) is refused with its network as the fix."""
    if not isinstance(value, str):
        return value
    try:
        ipaddress.IPv4Network(value, strict=True)
    except ValueError:
        try:
            net = ipaddress.IPv4Network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 network in CIDR form; write e.g. {example}") from None
        raise ValueError(f"{value!r} has host bits set; write its network {net}") from None
    return value


def _dns_label(value: str, what: str, limit: int = 63) -> str:
    if len(value) > limit:
        raise ValueError(f"{what} {value!r} is {len(value)} characters, the limit is {limit}; use a shorter name")
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
            raise ValueError(f"{str(data).lower()} is not a port; write 8080, '8080/tcp' or '53/udp'")
        if isinstance(data, int):
            return {"port": data}
        if isinstance(data, str):
            port, _, proto = data.partition("/")
            if not port.isdigit():
                raise ValueError(f"{data!r} is not a port; write 8080, '8080/tcp' or '53/udp'")
            if proto and proto.upper() not in Protocol.__members__:
                raise ValueError(f"{data!r} has protocol {proto!r}, which netlab does not serve; use tcp or udp")
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
    ipvs_scheduler: IpvsScheduler = Field(
        default=IpvsScheduler.RR,
        alias="ipvsScheduler",
        description="proxyMode ipvs: the IPVS scheduler of every virtual server (kube-proxy's --ipvs-scheduler).",
    )
    mtu: Annotated[int, Field(ge=1280, le=9000)] = 1500
    # VXLAN allows 24-bit VNIs, but the device is named flannel.<VNI> and interface names hold
    # 15 characters: "flannel." leaves room for 7 digits.
    vni: Annotated[int, Field(ge=1, le=9_999_999)] = 1
    vxlan_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8472, alias="vxlanPort")
    iptables_backend: IptablesBackend = Field(
        default="auto",
        alias="iptablesBackend",
        description="auto: the backend the system's `iptables` uses (as kube-proxy does); or nft, legacy.",
    )

    @field_validator("pod_cidr", mode="before")
    @classmethod
    def _pod_cidr(cls, value: Any) -> Any:
        return _cidr(value, "10.244.0.0/16")

    @field_validator("service_cidr", mode="before")
    @classmethod
    def _service_cidr(cls, value: Any) -> Any:
        return _cidr(value, "10.96.0.0/12")

    @field_validator("node_cidr", mode="before")
    @classmethod
    def _node_cidr(cls, value: Any) -> Any:
        return _cidr(value, "172.18.0.0/24")


class NodeSpec(_Model):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    pod_cidr: ipaddress.IPv4Network | None = Field(default=None, alias="podCIDR")

    @field_validator("pod_cidr", mode="before")
    @classmethod
    def _pod_cidr(cls, value: Any) -> Any:
        return _cidr(value, "10.244.1.0/24")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value in UNDERLAY_LINKS:
            raise ValueError(
                f"node name {value!r} is taken: the node's port on the underlay would clash with the "
                f"underlay's own {value}; use another name"
            )
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


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"


class ServicePortSpec(_Model):
    name: str = ""
    port: Annotated[int, Field(ge=1, le=65535)]
    target_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=None, alias="targetPort", description="The pods' port; defaults to port."
    )
    protocol: Protocol = Protocol.TCP
    node_port: Annotated[int, Field(ge=30000, le=32767)] | None = Field(
        default=None, alias="nodePort", description="type NodePort only; allocated from 30000-32767 if left out."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "port name", limit=15) if value else value

    @property
    def effective_target_port(self) -> int:
        return self.target_port or self.port


class ClientIPConfig(_Model):
    timeout_seconds: Annotated[int, Field(ge=1, le=86400)] = Field(default=10800, alias="timeoutSeconds")


class SessionAffinityConfig(_Model):
    client_ip: ClientIPConfig = Field(default_factory=ClientIPConfig, alias="clientIP")


class ServiceSpec(_Model):
    """A Kubernetes Service: its endpoints are the pods of its namespace that match `selector`."""

    name: str
    namespace: str = "default"
    type: ServiceType = ServiceType.CLUSTER_IP
    selector: dict[str, str] = Field(default_factory=dict)
    ports: list[ServicePortSpec] = Field(min_length=1)
    cluster_ip: ipaddress.IPv4Address | None = Field(
        default=None, alias="clusterIP", description="Allocated from cluster.serviceCIDR if left out."
    )
    session_affinity: SessionAffinity = Field(default=SessionAffinity.NONE, alias="sessionAffinity")
    session_affinity_config: SessionAffinityConfig = Field(
        default_factory=SessionAffinityConfig, alias="sessionAffinityConfig"
    )
    internal_traffic_policy: TrafficPolicy = Field(default=TrafficPolicy.CLUSTER, alias="internalTrafficPolicy")
    external_traffic_policy: TrafficPolicy = Field(default=TrafficPolicy.CLUSTER, alias="externalTrafficPolicy")
    ipvs_scheduler: IpvsScheduler | None = Field(
        default=None,
        alias="ipvsScheduler",
        description="proxyMode ipvs: this service's IPVS scheduler, instead of cluster.ipvsScheduler "
        "(a netlab extension, like an annotation; kube-proxy has one scheduler per node).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "service name")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _dns_label(value, "namespace")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class DeploymentSpec(_Model):
    """`replicas` pods named `<name>-<i>`, placed on `nodes` in turn (default: every node in turn)."""

    name: str
    namespace: str = "default"
    replicas: Annotated[int, Field(ge=0, le=10000)] = 1
    labels: dict[str, str] = Field(default_factory=dict, description="Pod labels; default {app: <name>}.")
    nodes: list[str] = Field(default_factory=list, description="Nodes to place replicas on, in turn.")
    serve: list[ServePort] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # pods are named <name>-<i>: leave room for the suffix within the 63-character label
        return _dns_label(value, "deployment name", limit=57)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _dns_label(value, "namespace")


class Topology(_Model):
    """One lab: a cluster's nodes, pods, deployments and services."""

    name: str = Field(description="Lab name; every kernel object of the lab carries it.")
    cluster: Cluster = Field(default_factory=Cluster)
    nodes: list[NodeSpec] = Field(min_length=1)
    pods: list[PodSpec] = Field(default_factory=list)
    deployments: list[DeploymentSpec] = Field(default_factory=list)
    services: list[ServiceSpec] = Field(default_factory=list)

    def all_pods(self) -> list[tuple[str, PodSpec]]:
        """Every pod with the key path that declares it: `pods[i]`, or `deployments[i]` for the
        replicas a deployment expands to (the ReplicaSet controller's job, done at plan time)."""
        out = [(f"pods[{i}]", p) for i, p in enumerate(self.pods)]
        all_nodes = [n.name for n in self.nodes]
        for i, d in enumerate(self.deployments):
            place = d.nodes or all_nodes
            labels = d.labels or {"app": d.name}
            for r in range(d.replicas):
                pod = PodSpec(
                    name=f"{d.name}-{r}",
                    namespace=d.namespace,
                    node=place[r % len(place)],
                    labels=labels,
                    serve=d.serve,
                )
                out.append((f"deployments[{i}]", pod))
        return out

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # Lab names go into netns names `nl-<lab>-...` and ownership marks; keep them short.
        return _dns_label(value, "lab name", limit=32)
