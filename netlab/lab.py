"""The library API: up, down, status, exec targets. The CLI is a thin shell over this.

up(file)  : load -> validate -> observe the kernel -> resolve -> plan (diff) -> apply
down(lab) : found by ownership marks in the kernel; stop processes, delete namespaces
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.errors import LabError
from netlab.kernel import build, features, netns, observe, proxy
from netlab.labs import find_lab, require_root
from netlab.plan import LabPlan, Plan, plan, resolve
from netlab.plan.steps import (
    AddPeer,
    CreateExternal,
    CreateNode,
    CreatePod,
    CreateUnderlay,
    DeleteNetns,
    DeletePeer,
    StartResponder,
    Step,
    SyncRules,
)
from netlab.topology import load
from netlab.topology.schema import Overlay, ProxyMode, Topology

__all__ = ["DownResult", "UpResult", "down", "find_lab", "plan_file", "require_root", "status", "up"]

Progress = Callable[[int, int, Step], None]


@contextmanager
def _lock(lab: str) -> Iterator[None]:
    build.STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(build.STATE_DIR / f".{lab}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabError(f"another netlab command is changing lab {lab!r} right now; wait for it to finish") from None
        yield


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # SIGTERM (systemd, `timeout`, CI) must roll back like Ctrl-C does, not leave a half lab.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def plan_file(file: str | Path, *, observe_kernel: bool, topo: Topology | None = None) -> tuple[Topology, Plan]:
    """Load and plan a topology. Without root (or observe_kernel=False) plan against nothing."""
    topo = topo or load(file)
    observed = None
    if observe_kernel:
        observed = observe.observe_lab(topo.name, topo.cluster.vni)
    from netlab.plan.model import ObservedLab

    obs = observed if observed is not None else ObservedLab(topo.name)
    desired = resolve(topo, str(file), obs)
    return topo, plan(desired, obs)


@dataclass
class UpResult:
    lab: str
    plan: Plan
    seconds: float
    changed: bool


def _fault(i: int) -> None:
    """Test hooks (documented in tests/): die or fail after step i, to prove cleanup."""
    if os.environ.get("NETLAB_FAULT_KILL_AFTER") == str(i):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("NETLAB_FAULT_FAIL_AFTER") == str(i):
        from netlab.errors import KernelError

        raise KernelError("injected fault", f"step {i}", None, "NETLAB_FAULT_FAIL_AFTER")


def apply(p: Plan, progress: Progress | None = None) -> None:
    """Run the plan's steps. On any failure or interrupt, undo what this run created."""
    lab = p.lab
    undo: build.Undo = []
    steps = list(p.steps)
    total = len(steps)
    done = 0

    def finished(batch: list[Step]) -> None:
        nonlocal done
        for s in batch:
            done += 1
            if progress:
                progress(done, total, s)
            _fault(done)

    try:
        i = 0
        while i < total:
            step = steps[i]
            j = i + 1
            if isinstance(step, StartResponder | CreatePod):
                # consecutive steps of these kinds run as one batch: Python start-up dominates
                # responders; netlink round trips dominate pods (see kernel/rtnl.py)
                while j < total and type(steps[j]) is type(step):
                    j += 1
            batch = steps[i:j]
            if isinstance(step, StartResponder):
                build.start_responders(lab.name, [s.pod for s in batch if isinstance(s, StartResponder)], undo)
                finished(batch)
            elif isinstance(step, CreatePod):
                by_node: dict[str, list[CreatePod]] = {}
                for s in batch:
                    if isinstance(s, CreatePod):
                        by_node.setdefault(s.node.name, []).append(s)
                for group in by_node.values():
                    build.create_pods(lab.name, group[0].node, [s.pod for s in group], undo)
                    finished(list(group))
            else:
                _run(lab, step, undo)
                finished([step])
            i = j
    except BaseException:
        for fn in reversed(undo):
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep undoing; the original error is what matters
                pass
        raise


def _run(lab: LabPlan, step: Step, undo: build.Undo) -> None:
    if isinstance(step, DeleteNetns):
        build.delete_netns([step.netns])
    elif isinstance(step, DeletePeer):
        build.delete_peer(step.netns, step.vni, step.peer)
    elif isinstance(step, CreateUnderlay):
        build.create_underlay(lab.name, step.netns, undo)
    elif isinstance(step, CreateExternal):
        build.create_external(lab.name, step.underlay_netns, step.external, undo)
    elif isinstance(step, SyncRules):
        ns, node = step.node.netns, step.node.name
        undo.append(proxy.undo_for(lab.name, node, ns, step.rules, step.previous))
        # a resync (IPVS real servers draining) is a full sync; undo still goes back to `previous`
        proxy.sync(lab.name, node, ns, step.rules, None if step.resync else step.previous, step.cleanup)
    elif isinstance(step, CreateNode):
        build.create_node(lab.name, step.underlay_netns, step.node, undo)
    elif isinstance(step, AddPeer):
        build.add_peer(step.node, step.peer, undo)
    else:  # pragma: no cover - exhaustive
        raise TypeError(step)


def up(file: str | Path, progress: Progress | None = None) -> UpResult:
    require_root("up")
    t0 = time.perf_counter()
    topo = load(file)
    with _lock(topo.name), _sigterm_as_interrupt():
        # proxyMode ipvs on a kernel without IPVS stops here, naming `netlab vm -- netlab up FILE`
        features.check(
            vxlan=topo.cluster.overlay == Overlay.VXLAN,
            ipvs=topo.cluster.proxy_mode == ProxyMode.IPVS,
            file=str(file),
        )
        _, p = plan_file(file, observe_kernel=True, topo=topo)
        if not p.empty:
            state = build.STATE_DIR / topo.name
            state.mkdir(parents=True, exist_ok=True)
            (state / "state.json").write_text(
                json.dumps(
                    {
                        "lab": topo.name,
                        "source": str(file) if str(file) == "-" else str(Path(file).resolve()),
                        "topology": topo.model_dump(mode="json", by_alias=True),
                    },
                    indent=2,
                )
            )
            apply(p, progress)
    return UpResult(topo.name, p, time.perf_counter() - t0, not p.empty)


@dataclass
class DownResult:
    labs: list[str]
    netns: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _role_order(mark: tuple[str, str, str, str]) -> int:
    return {"pod": 0, "node": 1, "underlay": 2}.get(mark[1], 3)


def down(lab: str | None = None, *, all_labs: bool = False) -> DownResult:
    """Remove a lab (or every lab) exactly: the namespaces that carry its mark, the processes
    inside them, the half-made namespace files its journal names, and its state directory."""
    require_root("down")
    t0 = time.perf_counter()
    marks = observe.lab_netns()
    labs = sorted({m[0] for m in marks.values()}) if all_labs else [lab] if lab else []
    if all_labs and build.STATE_DIR.exists():
        labs = sorted(set(labs) | {d.name for d in build.STATE_DIR.iterdir() if d.is_dir()})
    res = DownResult(labs)
    for name in labs:
        with _lock(name):
            mine = sorted((ns for ns, m in marks.items() if m[0] == name), key=lambda ns: _role_order(marks[ns]))
            res.processes += build.stop_processes(mine)
            for ns in mine:
                netns.delete(ns)
            res.netns += mine
            # A crash between creating /run/netns/<name> and mounting it leaves an empty file;
            # the journal, written before each creation, names it.
            journal = build.STATE_DIR / name / "journal"
            if journal.exists():
                for line in journal.read_text().splitlines():
                    kind, _, rest = line.partition(" ")
                    if kind == "netns" and netns.exists(rest) and netns.inode(rest) is None and rest not in marks:
                        netns.delete(rest)
                        res.netns.append(rest)
            shutil.rmtree(build.STATE_DIR / name, ignore_errors=True)
        try:
            (build.STATE_DIR / f".{name}.lock").unlink()
        except FileNotFoundError:
            pass
    res.seconds = time.perf_counter() - t0
    return res


def status(lab: str) -> dict[str, Any]:
    """What the kernel holds for a lab: nodes, pods, links. JSON-ready."""
    marks = {ns: m for ns, m in observe.lab_netns().items() if m[0] == lab}
    state_file = build.STATE_DIR / lab / "state.json"
    source = None
    if state_file.exists():
        try:
            source = json.loads(state_file.read_text()).get("source")
        except (OSError, ValueError):
            pass
    procs = observe.processes_by_netns()
    nodes: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    underlay = None
    external: dict[str, Any] | None = None
    for ns, (_, role, ident, fp) in sorted(marks.items()):
        st = observe.read_state(ns)
        complete = fp != "-"  # the fingerprint is written last: "-" means interrupted mid-build
        links += [
            {"netns": ns, "name": li.name, "kind": li.kind, "master": li.master, "up": li.up, "mtu": li.mtu}
            for li in st.links.values()
        ]
        addr = dict(a.split(" ", 1) for a in st.addrs)
        if role == "underlay":
            underlay = ns
        elif role == "external":
            external = {"netns": ns, "ip": addr.get("eth0")}
        elif role == "node":
            nodes.append(
                {
                    "name": ident,
                    "netns": ns,
                    "ip": addr.get("eth0"),
                    "podCIDR": _net(addr.get("cni0")),
                    "overlay": "vxlan" if any(li.kind == "vxlan" for li in st.links.values()) else "host-gw",
                    "state": "Ready" if complete else "Incomplete",
                    "routes": sorted(st.routes),
                }
            )
        else:
            key, _, node = ident.partition("@")
            namespace, _, name = key.partition("/")
            ino = netns.inode(ns)
            eth0 = st.links.get("eth0")
            pods.append(
                {
                    "name": name,
                    "namespace": namespace,
                    "node": node,
                    "netns": ns,
                    "ip": addr["eth0"].split("/")[0] if "eth0" in addr else None,
                    "state": "Running" if complete and eth0 and eth0.up else "Incomplete",
                    "processes": procs.get(ino, []) if ino else [],
                }
            )
    return {
        "name": lab,
        "source": source,
        "underlay": underlay,
        "external": external,
        "nodes": nodes,
        "pods": pods,
        "services": _services(lab, [n["name"] for n in nodes]),
        "links": links,
    }


def _services(lab: str, nodes: list[str]) -> list[dict[str, Any]]:
    """Services as kube-proxy was last told them (the same on every node), with endpoints."""
    from netlab.kernel import rules_state

    for node in nodes:
        rp = rules_state.load(lab, node)
        if rp is None:
            continue
        return [
            {
                "namespace": s.namespace,
                "name": s.name,
                "portName": s.port_name,
                "protocol": str(s.protocol),
                "clusterIP": str(s.cluster_ip),
                "port": s.port,
                "nodePort": s.node_port,
                "proxyMode": str(rp.mode),
                "endpoints": [f"{e.addr} ({e.pod} on {e.node})" for e in s.sorted_endpoints()],
            }
            for s in rp.services
        ]
    return []


def _net(cidr: str | None) -> str | None:
    if not cidr:
        return None
    import ipaddress

    return str(ipaddress.IPv4Interface(cidr).network)


def exec_target(lab: str, target: str) -> str:
    """The netns for `target`: a pod (`name` or `namespace/name`), a node, `underlay` or `external`."""
    marks = {ns: m for ns, m in observe.lab_netns().items() if m[0] == lab}
    if target in ("underlay", "external"):
        for ns, m in marks.items():
            if m[1] == target:
                return ns
    nodes = {m[2]: ns for ns, m in marks.items() if m[1] == "node"}
    pods = {m[2].partition("@")[0]: ns for ns, m in marks.items() if m[1] == "pod"}
    if "/" in target and target in pods:
        return pods[target]
    matches = [ns for key, ns in pods.items() if key.split("/", 1)[1] == target]
    if len(matches) == 1 and target not in nodes:
        return matches[0]
    if target in nodes and not matches:
        return nodes[target]
    if len(matches) > 1 or (matches and target in nodes):
        raise LabError(f"{target!r} names more than one pod or node in lab {lab}; write namespace/name")
    known = sorted([*nodes, *pods])
    raise LabError(f"lab {lab} has no pod or node {target!r}; use one of: {', '.join(known)}")
