"""The topology a compare runs: the user's, plus what the measurements need (pure).

Added to the user's topology, all in the namespace of the measured service:

  pods      cmp-client  on the first node: every connection starts here
            cmp-echo    on the first node, serves 8080: the one endpoint of the latency targets
            cmp-far     on the last node (two nodes or more), serves 8080: a Local service's
                        only endpoint, on another node than the client
  services  a-cmp-first     ClusterIP -> cmp-echo: the first service kube-proxy looks at
            zzz-cmp-last    ClusterIP -> cmp-echo: the last one (same endpoint, same path:
                            only the position differs)
            zz-cmp-noep     selects nothing: no endpoints
            zz-cmp-local    internalTrafficPolicy Local -> cmp-far: no local endpoint for cmp-client
            zz-cmp-np       NodePort -> the measured service's pods
            zz-cmp-sched-S  (when ipvs is compared) the measured service's pods, ipvsScheduler S
            zz-fill-NNNNN   the synthetic services that scale the table to N, each selecting the
                            measured service's pods (real endpoints, as many rules as a real one)

Services are written in name order (namespace, name), so a-cmp-first comes before the user's
services and zzz-cmp-last after every synthetic one. The measured service is the user's: its
endpoints carry the load-distribution test, its ClusterIP the ping and unknown-port checks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.errors import TopologyError

__all__ = [
    "CLIENT",
    "ECHO",
    "FAR",
    "FIRST",
    "LAST",
    "LOCAL",
    "NODEPORT",
    "NOEP",
    "Setup",
    "compose",
    "prepare",
    "scheduler_service",
]

CLIENT = "cmp-client"
ECHO = "cmp-echo"
FAR = "cmp-far"
FIRST = "a-cmp-first"
LAST = "zzz-cmp-last"
NOEP = "zz-cmp-noep"
LOCAL = "zz-cmp-local"
NODEPORT = "zz-cmp-np"
FILL = "zz-fill-"
LABEL = "netlab-compare"
ECHO_PORT = 8080
PORT = 80


def scheduler_service(scheduler: str) -> str:
    return f"zz-cmp-sched-{scheduler}"


@dataclass(frozen=True)
class Setup:
    """What a compare adds to the user's topology, and what it measures."""

    file: str
    lab: str
    raw: dict[str, Any]  # the user's topology as written
    namespace: str  # the measured service's
    service: str  # the measured service (the user's)
    port: int  # its measured port (TCP)
    target_port: int
    selector: dict[str, str]
    backends: tuple[str, ...]  # names of the pods behind it
    nodes: tuple[str, ...]
    client_node: str
    far_node: str | None  # None with one node: no node without the Local service's endpoint
    user_services: int
    schedulers: tuple[str, ...] = ()
    added_pods: tuple[str, ...] = field(default=(CLIENT, ECHO, FAR))

    @property
    def added_services(self) -> list[str]:
        out = [FIRST, LAST, NOEP, NODEPORT] + ([LOCAL] if self.far_node else [])
        return out + [scheduler_service(s) for s in self.schedulers]

    @property
    def base_count(self) -> int:
        """Services before any synthetic one: the user's and the compare's own."""
        return self.user_services + len(self.added_services)

    def fillers(self, n: int) -> int:
        """How many synthetic services bring the table to n services (none if the user's and
        the compare's own are already n or more)."""
        return max(0, n - self.base_count)

    def total(self, n: int) -> int:
        return self.base_count + self.fillers(n)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "lab": self.lab,
            "namespace": self.namespace,
            "measured_service": f"{self.namespace}/{self.service}",
            "port": self.port,
            "target_port": self.target_port,
            "backends": list(self.backends),
            "client": f"{CLIENT} on {self.client_node}",
            "latency_targets": f"{FIRST} (first) and {LAST} (last), one endpoint: {ECHO} on {self.client_node}",
            "local_endpoint": f"{FAR} on {self.far_node}" if self.far_node else None,
            "user_services": self.user_services,
            "added_services": self.added_services,
            "schedulers": list(self.schedulers),
        }


def _err(file: str, path: str, msg: str) -> TopologyError:
    return TopologyError(file, path, msg)


def _eligible(topo: Any, svc: Any) -> tuple[int, int, list[Any]] | None:
    """(port, targetPort, backend pods) if the service can carry the measurements: a ClusterIP
    (or NodePort) service with Cluster policy, no affinity, and a TCP port whose targetPort the
    selected pods serve."""
    if not svc.selector or str(svc.internal_traffic_policy) != "Cluster" or str(svc.session_affinity) != "None":
        return None
    pods = [p for _, p in topo.all_pods() if p.namespace == svc.namespace and svc.selector.items() <= p.labels.items()]
    if not pods:
        return None
    for port in svc.ports:
        if str(port.protocol) != "TCP":
            continue
        tp = port.target_port if port.target_port is not None else port.port
        if not isinstance(tp, int):
            continue
        if all(any(s.port == tp and str(s.protocol) == "TCP" for s in p.serve) for p in pods):
            return port.port, tp, pods
    return None


def prepare(file: str | Path, lab: str, *, schedulers: Sequence[str] = (), service: str | None = None) -> Setup:
    """Read and check the user's topology and choose the service to measure."""
    import yaml

    from netlab.topology import load

    file = str(file)
    topo = load(file)  # validates: a bad topology is refused here, with the loader's message
    raw = yaml.load(Path(file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    chosen = None
    for svc in topo.services:
        if service is not None and svc.name != service and f"{svc.namespace}/{svc.name}" != service:
            continue
        ok = _eligible(topo, svc)
        if ok:
            chosen = (svc, ok)
            break
        if service is not None:
            raise _err(
                file,
                "services",
                f"service {service!r} cannot be measured: it needs a selector matching pods that serve a TCP "
                f"targetPort, internalTrafficPolicy Cluster and no session affinity",
            )
    if chosen is None:
        if service is not None:
            raise _err(file, "services", f"no service named {service!r}")
        raise _err(
            file,
            "services",
            "no service to measure: compare needs one ClusterIP or NodePort service whose selector matches "
            "pods serving its TCP targetPort (see topologies/services.yaml)",
        )
    svc, (port, target, pods) = chosen
    names = {(p.namespace, p.name) for _, p in topo.all_pods()}
    for pod in (CLIENT, ECHO, FAR):
        if (svc.namespace, pod) in names:
            raise _err(file, "pods", f"pod {svc.namespace}/{pod} is one compare adds; rename yours")
    taken = {(s.namespace, s.name) for s in topo.services}
    for name in (FIRST, LAST, NOEP, LOCAL, NODEPORT):
        if (svc.namespace, name) in taken:
            raise _err(file, "services", f"service {svc.namespace}/{name} is one compare adds; rename yours")
    nodes = tuple(n.name for n in topo.nodes)
    return Setup(
        file=file,
        lab=lab,
        raw=raw,
        namespace=svc.namespace,
        service=svc.name,
        port=port,
        target_port=target,
        selector=dict(svc.selector),
        backends=tuple(p.name for p in pods),
        nodes=nodes,
        client_node=nodes[0],
        far_node=nodes[-1] if len(nodes) > 1 else None,
        user_services=len(topo.services),
        schedulers=tuple(schedulers),
    )


def compose(setup: Setup, n: int, mode: str, *, backend: str | None = None) -> dict[str, Any]:
    """The topology for one run: the user's, renamed to the compare's lab, in `mode`, with the
    compare's pods and services and enough synthetic services for n services in all."""
    topo: dict[str, Any] = json.loads(json.dumps(setup.raw))  # a deep copy of plain data
    topo["name"] = setup.lab
    cluster = topo.setdefault("cluster", {}) or {}
    topo["cluster"] = cluster
    cluster["proxyMode"] = mode
    if backend is not None:
        cluster["iptablesBackend"] = backend
    ns = setup.namespace
    pods = list(topo.get("pods") or [])
    pods += [
        {"name": CLIENT, "namespace": ns, "node": setup.client_node},
        {"name": ECHO, "namespace": ns, "node": setup.client_node, "labels": {LABEL: "echo"}, "serve": [ECHO_PORT]},
    ]
    if setup.far_node:
        pods.append(
            {"name": FAR, "namespace": ns, "node": setup.far_node, "labels": {LABEL: "far"}, "serve": [ECHO_PORT]}
        )
    topo["pods"] = pods

    def svc(name: str, selector: dict[str, str], target: int | None = None, **extra: Any) -> dict[str, Any]:
        port: dict[str, Any] = {"port": PORT}
        if target is not None:
            port["targetPort"] = target
        return {"name": name, "namespace": ns, "selector": selector, "ports": [port], **extra}

    echo = {LABEL: "echo"}
    services = list(topo.get("services") or [])
    services += [
        svc(FIRST, echo, ECHO_PORT),
        svc(LAST, echo, ECHO_PORT),
        svc(NOEP, {LABEL: "none"}),
        svc(NODEPORT, setup.selector, setup.target_port, type="NodePort"),
    ]
    if setup.far_node:
        services.append(svc(LOCAL, {LABEL: "far"}, ECHO_PORT, internalTrafficPolicy="Local"))
    services += [
        svc(scheduler_service(s), setup.selector, setup.target_port, ipvsScheduler=s) for s in setup.schedulers
    ]
    fill = setup.fillers(n)
    width = max(5, len(str(fill - 1)))
    services += [svc(f"{FILL}{i:0{width}d}", setup.selector, setup.target_port) for i in range(fill)]
    topo["services"] = services
    return topo


def write(topo: dict[str, Any], path: Path) -> Path:
    """Write a composed topology (JSON, which is YAML: libyaml reads 10k services in a blink)."""
    path.write_text(f"# generated by `netlab compare` from {topo['name']}\n" + json.dumps(topo) + "\n")
    return path
