"""Read a topology file: YAML syntax -> schema -> whole-file rules, each error one sentence.

Every error names the file, the key path (`pods[2].serve[0].port`), the bad value and the fix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from netlab.errors import TopologyError
from netlab.topology.schema import ServePort, Topology

__all__ = ["load", "load_text"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a topology must not."""


# libyaml's parser when PyYAML was built with it (Debian's and PyPI's wheels are): 2.3x faster
# on a 10k-service topology (3.6 s -> 1.55 s), same documents, same safe constructors. Its
# error texts are vaguer ("did not find expected ','"), so a file it refuses is parsed again
# by the pure-Python loader for the message.
class _FastUniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    pass


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping; keep only one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


for _loader in (_UniqueKeyLoader, _FastUniqueKeyLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _get(data: Any, loc: Sequence[int | str]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


_ALIASES = {
    "pod_cidr": "podCIDR",
    "node_cidr_mask_size": "nodeCIDRMaskSize",
    "service_cidr": "serviceCIDR",
    "node_cidr": "nodeCIDR",
    "proxy_mode": "proxyMode",
    "vxlan_port": "vxlanPort",
    "iptables_backend": "iptablesBackend",
    "ipvs_scheduler": "ipvsScheduler",
}


def _allowed_keys(model: Any) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(loc: Sequence[int | str]) -> Any:
    """The pydantic model that owns the mapping at `loc` (for 'allowed keys' hints)."""
    from netlab.topology import schema

    model: Any = schema.Topology
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or model.model_fields.get(
            {v: k for k, v in _ALIASES.items()}.get(part, part)
        )
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _kind(value: Any) -> str:
    kinds = {list: "list", dict: "mapping", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), type(value).__name__)


def _yaml(value: Any) -> str:
    """A value as the user wrote it in YAML (true, not True)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


_EXAMPLES = {"nodes": "- name: node1", "pods": "- {name: web, node: node1}"}


def _bounds(loc: Sequence[int | str]) -> tuple[Any, Any]:
    model = _model_at(loc[:-1])
    if model is None:
        return None, None
    names = {f.alias or n: f for n, f in model.model_fields.items()}
    field = names.get(str(loc[-1]))
    ge = le = None
    for meta in getattr(field, "metadata", []):
        ge = getattr(meta, "ge", ge)
        le = getattr(meta, "le", le)
    return ge, le


def _message(err: Any, data: Any) -> tuple[str, str]:
    loc = [_ALIASES.get(p, p) if isinstance(p, str) else p for p in err["loc"]]
    # pydantic puts the name of a "before" validator's target into loc; drop those artefacts.
    loc = [p for p in loc if p not in ("function-after[_shorthand(), ServePort]",)]
    kind = err["type"]
    value = _get(data, loc)
    if value is None and not isinstance(err.get("input"), dict):
        value = err.get("input")
    path = _path(loc)
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = ", ".join(_allowed_keys(parent)) if parent else ""
        hint = f"; allowed keys here: {allowed}" if allowed else ""
        return path, f"unknown key {loc[-1]!r}{hint}; remove or rename it"
    if kind == "missing":
        return path, f"required key {loc[-1]!r} is missing; add it"
    if kind in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        return path, f"{value!r} is not allowed; use one of {expected}"
    if kind == "too_short" and loc and loc[-1] == "nodes":
        return path, "a lab needs at least one node; add one under nodes:"
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        ge, le = _bounds(loc)
        what = "not a port number" if loc[-1] == "port" else "out of range"
        if ge is not None and le is not None:
            return path, f"{_yaml(value)} is {what}; use {ge} to {le}"
        return path, f"{_yaml(value)} is {what}; {err['msg'].lower()}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        parent = next((p for p in reversed(loc) if isinstance(p, str)), "")
        example = _EXAMPLES.get(str(parent)) if loc and isinstance(loc[-1], int) else None
        fix = f"write e.g. {example}" if example else "write it as `key: value` pairs"
        return path, f"{_yaml(value)} is a {_kind(value)} but a mapping is expected here; {fix}"
    if kind == "list_type":
        return path, f"{_yaml(value)} is a {_kind(value)} but a list is expected here; write one `- item` per line"
    if kind == "string_type":
        return path, f"{_yaml(value)} is a {_kind(value)} but a string is expected here; quote it"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return path, f"{_yaml(value)} is not a whole number; write a number here"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return path, msg
    shown = f" (got {value!r})" if value is not None else ""
    return path, f"{msg[0].lower()}{msg[1:]}{shown}; fix the value"


def load_text(text: str, file: str = "<topology>") -> Topology:
    """Parse and validate topology YAML. Raises TopologyError with one actionable sentence."""
    try:
        try:
            data = yaml.load(text, Loader=_FastUniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - for its clearer message
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = exc.problem or exc.context or "invalid YAML"
        if "appears twice" in problem:
            raise TopologyError(file, "", f"{where}: {problem}") from None
        raise TopologyError(file, "", f"{where}: {problem}; fix the YAML syntax there") from None
    except yaml.YAMLError as exc:
        raise TopologyError(file, "", f"not valid YAML ({exc}); fix the syntax") from None
    if data is None:
        raise TopologyError(file, "", "the file is empty; a topology needs at least `name:` and `nodes:`")
    if not isinstance(data, dict):
        raise TopologyError(
            file,
            "",
            f"the file holds a YAML {_kind(data)}, not a mapping; start it with `name:` and `nodes:` at the top level",
        )
    try:
        topo = Topology.model_validate(data)
    except ValidationError as exc:
        path, msg = _message(exc.errors()[0], data)
        raise TopologyError(file, path, msg) from None
    check(topo, file)
    return topo


def load(path: str | Path) -> Topology:
    """Load a topology file; `-` reads standard input."""
    if str(path) == "-":
        import sys

        return load_text(sys.stdin.read(), "<stdin>")
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TopologyError(str(p), "", "no such file; check the path") from None
    except OSError as exc:
        raise TopologyError(str(p), "", f"cannot read it ({exc.strerror})") from None
    return load_text(text, str(p))


def check(topo: Topology, file: str) -> None:
    """Rules that span the whole file. Each raises with the key path of the offending value."""
    c = topo.cluster
    nets = {
        "cluster.podCIDR": c.pod_cidr,
        "cluster.serviceCIDR": c.service_cidr,
        "cluster.nodeCIDR": c.node_cidr,
    }
    keys = list(nets)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if nets[a].overlaps(nets[b]):
                raise TopologyError(
                    file,
                    b,
                    f"{nets[b]} overlaps {a} {nets[a]}; pick ranges that do not overlap",
                )
    if c.node_cidr_mask_size <= c.pod_cidr.prefixlen:
        raise TopologyError(
            file,
            "cluster.nodeCIDRMaskSize",
            f"{c.node_cidr_mask_size} is not larger than podCIDR {c.pod_cidr}'s prefix "
            f"/{c.pod_cidr.prefixlen}, so nodes cannot each get a subnet of it; use "
            f"{c.pod_cidr.prefixlen + 1} or more, or a larger podCIDR",
        )
    node_subnets = 2 ** (c.node_cidr_mask_size - c.pod_cidr.prefixlen)
    if len(topo.nodes) > node_subnets:
        raise TopologyError(
            file,
            "cluster.podCIDR",
            f"{c.pod_cidr} holds {node_subnets} node subnets of /{c.node_cidr_mask_size} but there "
            f"are {len(topo.nodes)} nodes; use a larger podCIDR or a larger nodeCIDRMaskSize",
        )
    # network, broadcast, .1 (kept for a gateway) and the last host (kept for `external`)
    node_ips = c.node_cidr.num_addresses - 4
    if len(topo.nodes) > node_ips:
        raise TopologyError(
            file,
            "cluster.nodeCIDR",
            f"{c.node_cidr} holds {node_ips} node addresses but there are {len(topo.nodes)} nodes; "
            "use a larger nodeCIDR",
        )

    names: dict[str, int] = {}
    explicit: dict[ipaddress.IPv4Network, int] = {}
    for i, node in enumerate(topo.nodes):
        if node.name in names:
            raise TopologyError(
                file,
                f"nodes[{i}].name",
                f"{node.name!r} is already the name of nodes[{names[node.name]}]; node names must be unique",
            )
        names[node.name] = i
        if node.pod_cidr is not None:
            where = f"nodes[{i}].podCIDR"
            if not node.pod_cidr.subnet_of(c.pod_cidr) or node.pod_cidr.prefixlen != c.node_cidr_mask_size:
                raise TopologyError(
                    file,
                    where,
                    f"{node.pod_cidr} is not a /{c.node_cidr_mask_size} inside cluster.podCIDR "
                    f"{c.pod_cidr}; pick one such subnet or leave it out to allocate one",
                )
            if node.pod_cidr in explicit:
                raise TopologyError(
                    file,
                    where,
                    f"{node.pod_cidr} is already nodes[{explicit[node.pod_cidr]}].podCIDR; "
                    "each node needs its own subnet",
                )
            explicit[node.pod_cidr] = i

    for i, d in enumerate(topo.deployments):
        for j, node_name in enumerate(d.nodes):
            if node_name not in names:
                raise TopologyError(
                    file,
                    f"deployments[{i}].nodes[{j}]",
                    f"{node_name!r} is not a node of this lab; use one of: {', '.join(sorted(names))}",
                )
        _check_serve(file, f"deployments[{i}]", d.serve)

    capacity = 2 ** (32 - c.node_cidr_mask_size) - 3  # network, gateway (.1), broadcast
    per_node: dict[str, int] = {}
    pods: dict[tuple[str, str], str] = {}
    all_pods = topo.all_pods()
    for where, pod in all_pods:
        declared_by_pod = where.startswith("pods[")
        key = (pod.namespace, pod.name)
        if key in pods:
            raise TopologyError(
                file,
                f"{where}.name",
                f"{pod.namespace}/{pod.name} is already declared by {pods[key]}; pod names (including "
                "<deployment>-<i>) must be unique within a namespace",
            )
        pods[key] = where
        if pod.node not in names:
            raise TopologyError(
                file,
                f"{where}.node",
                f"{pod.node!r} is not a node of this lab; use one of: {', '.join(sorted(names))}",
            )
        per_node[pod.node] = per_node.get(pod.node, 0) + 1
        if per_node[pod.node] > capacity:
            raise TopologyError(
                file,
                f"{where}.node" if declared_by_pod else f"{where}.replicas",
                f"node {pod.node!r} would hold more than {capacity} pods, all a "
                f"/{c.node_cidr_mask_size} pod subnet can address; spread pods over more nodes or "
                "lower cluster.nodeCIDRMaskSize",
            )
        if declared_by_pod:
            _check_serve(file, where, pod.serve)

    _check_services(topo, file)

    from netlab.plan import naming  # here: netlab.plan imports the topology model

    # Every node and pod becomes a netns named nl-<lab>-<node> / nl-<lab>-<namespace>-<pod>,
    # beside nl-<lab>-underlay and nl-<lab>-external: two of them must not share a name.
    owners: dict[str, str] = {
        naming.netns_underlay(topo.name): "the underlay",
        naming.netns_external(topo.name): "the external client",
    }
    for where, ns in [
        *((f"nodes[{i}].name", naming.netns_node(topo.name, n.name)) for i, n in enumerate(topo.nodes)),
        *((f"{w}.name", naming.netns_pod(topo.name, p.namespace, p.name)) for w, p in all_pods),
    ]:
        if ns in owners:
            raise TopologyError(
                file,
                where,
                f"gives the network namespace name {ns}, which {owners[ns]} already has "
                "(names join as nl-<lab>-<node> and nl-<lab>-<namespace>-<pod>); rename one of them",
            )
        owners[ns] = where


def _check_serve(file: str, where: str, serve: Sequence[ServePort]) -> None:
    seen: set[tuple[int, str]] = set()
    for j, sp in enumerate(serve):
        if (sp.port, sp.protocol) in seen:
            raise TopologyError(
                file, f"{where}.serve[{j}]", f"{sp.port}/{sp.protocol} is listed twice; list each port once"
            )
        seen.add((sp.port, sp.protocol))


def _check_services(topo: Topology, file: str) -> None:
    """The API server's Service validation, for what netlab models."""
    c = topo.cluster
    seen: dict[str, int] = {}
    cluster_ips: dict[ipaddress.IPv4Address, int] = {}
    node_ports: dict[tuple[int, str], str] = {}
    for i, svc in enumerate(topo.services):
        where = f"services[{i}]"
        if svc.key in seen:
            raise TopologyError(
                file,
                f"{where}.name",
                f"{svc.key} is already services[{seen[svc.key]}]; service names must be unique within a namespace",
            )
        seen[svc.key] = i
        if svc.cluster_ip is not None:
            ip = svc.cluster_ip
            usable = ip in c.service_cidr and ip not in (
                c.service_cidr.network_address,
                c.service_cidr.broadcast_address,
            )
            if not usable:
                raise TopologyError(
                    file,
                    f"{where}.clusterIP",
                    f"{ip} is not a usable address of cluster.serviceCIDR {c.service_cidr}; "
                    "pick one inside it or leave clusterIP out",
                )
            if ip in cluster_ips:
                raise TopologyError(
                    file,
                    f"{where}.clusterIP",
                    f"{ip} is already services[{cluster_ips[ip]}].clusterIP; each service needs its own",
                )
            cluster_ips[ip] = i
        names: set[str] = set()
        for j, port in enumerate(svc.ports):
            pwhere = f"{where}.ports[{j}]"
            if len(svc.ports) > 1 and not port.name:
                raise TopologyError(
                    file, f"{pwhere}.name", "a service with several ports must name each of them; add name:"
                )
            if port.name in names:
                raise TopologyError(
                    file,
                    f"{pwhere}.name",
                    f"port name {port.name!r} is used twice in this service; names must be unique",
                )
            names.add(port.name)
            if port.node_port is not None:
                if svc.type != "NodePort":
                    raise TopologyError(
                        file,
                        f"{pwhere}.nodePort",
                        f"{port.node_port} is set but the service's type is {svc.type}; "
                        "set type: NodePort or remove nodePort",
                    )
                np_key = (port.node_port, str(port.protocol))
                if np_key in node_ports:
                    raise TopologyError(
                        file,
                        f"{pwhere}.nodePort",
                        f"{port.node_port}/{port.protocol} is already {node_ports[np_key]}; "
                        "each NodePort must be unique",
                    )
                node_ports[np_key] = f"{pwhere}.nodePort"
        if svc.type == "ClusterIP" and svc.external_traffic_policy != "Cluster":
            raise TopologyError(
                file,
                f"{where}.externalTrafficPolicy",
                "externalTrafficPolicy applies to NodePort services only; remove it or set type: NodePort",
            )
