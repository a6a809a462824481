"""`netlab compare`: build one topology in each proxy mode in turn, drive the same traffic,
collect the numbers side by side (report.json's shape is documented in docs/compare.md).

  for each service count N (ascending):
      for each mode on this kernel:   netlab up (mode switch / N services; pods stay)
          objects per node, full programming and one-service change on the client's node,
          first-connection latency to the first and the last service (and a pod, directly)
          at the first N only: load distribution and the behaviour rows (they do not depend on N)
  netlab down
  ipvs on a kernel without IPVS: the same compare, --modes ipvs, inside `netlab vm`, merged

Nothing here prints: progress goes to a `log` callback; the CLI renders.
"""

from __future__ import annotations

import json
import shlex
import subprocess  # noqa: TID251 - the IPVS part runs as `netlab vm -- ...`, a process
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.bench_services import WARMUP
from netlab.compare import measure, report
from netlab.compare import topology as ctopo
from netlab.compare.measure import CompareError

__all__ = ["BEHAVIOUR", "MODES", "Options", "compare", "merge_vm", "parse_modes", "parse_sizes"]

MODES = ("iptables", "ipvs", "nftables")
SCHEDULERS = ("rr", "wrr", "lc", "sh")
KIND = "netlab-compare"
Log = Callable[[str], None]
PING_TIMEOUT = 1.0  # s: a node answers a ping at once or not at all
TCP_TIMEOUT = 2.0  # s: a REJECT answers at once; a DROP (or nothing) runs into this
NOT_ECHO = ("no-reply", "port-unreachable", "host-unreachable", "net-unreachable", "admin-prohibited")


@dataclass(frozen=True)
class Row:
    """One behaviour row: what is tried, and the outcomes kube-proxy's mode gives (None: not
    stated by kube-proxy; the observed outcome is reported without a verdict)."""

    id: str
    title: str
    expected: dict[str, tuple[str, ...] | None]
    why: str


BEHAVIOUR = (
    Row(
        "noep",
        "service without endpoints: connect",
        {"iptables": ("refused",), "nftables": ("refused",), "ipvs": ("refused",)},
        "iptables: filter KUBE-SERVICES REJECT; nftables: no-endpoint-services reject; IPVS has no "
        "rule for it: the virtual server without real servers answers ICMP port unreachable itself "
        "(ip_vs_leave)",
    ),
    Row(
        "ping",
        "ping to a ClusterIP",
        {"iptables": NOT_ECHO, "nftables": NOT_ECHO, "ipvs": ("port-unreachable",)},
        "a ClusterIP is bound to no interface in iptables and nftables mode; IPVS binds every "
        "ClusterIP to kube-ipvs0, so the node itself answers: ICMP port unreachable from the "
        "ClusterIP, since KUBE-IPVS-FILTER rejects what is not a service port (an echo reply "
        "before that filter, kube-proxy < 1.26)",
    ),
    Row(
        "unknown-port",
        "unknown port on a ClusterIP",
        {
            "iptables": ("timeout", "host-unreachable", "net-unreachable"),
            "nftables": ("refused",),
            "ipvs": ("refused",),
        },
        "iptables: no rule matches, the packet follows the default route; nftables: cluster-ips-check "
        "rejects; IPVS: KUBE-IPVS-FILTER rejects new connections to kube-ipvs0 addresses",
    ),
    Row(
        "local",
        "internalTrafficPolicy Local, no local endpoint",
        {"iptables": ("timeout",), "nftables": ("timeout",), "ipvs": ("refused",)},
        'iptables and nftables drop ("has no local endpoints"); IPVS keeps only local endpoints for '
        "internalTrafficPolicy Local (syncEndpoint; its PR #97081 fallback to the cluster's endpoints "
        "is for externalTrafficPolicy Local), so the virtual server has no real server and IPVS "
        "answers port unreachable",
    ),
    Row(
        "hairpin",
        "hairpin: a pod to itself through its service",
        {"iptables": ("answered",), "nftables": ("answered",), "ipvs": ("answered",)},
        "the pod's own service's only endpoint is the pod: DNAT back to the sender, masqueraded "
        "(hairpin mode on the bridge port)",
    ),
)
NODEPORT_ROW = Row(
    "nodeport",
    "NodePort from outside, on node {node} ({ip})",
    {"iptables": ("answered",), "nftables": ("answered",), "ipvs": ("answered",)},
    "KUBE-NODEPORTS / service-nodeports / a virtual server per node IP",
)


@dataclass(frozen=True)
class Options:
    modes: tuple[str, ...]
    sizes: tuple[int, ...]
    connections: int = 300
    out: Path = Path("compare-out")
    lab: str | None = None
    service: str | None = None
    repeat: int = 3
    cap: float = 10.0
    changes: int = 4
    fifo: bool = True
    distribution: int | None = None  # connections for the distribution (default: `connections`)
    vm: bool = True  # run ipvs through `netlab vm` when the kernel lacks IPVS
    command: str = ""


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise CompareError(f"--modes {text!r}: use one or more of {', '.join(MODES)}, comma-separated")
    return modes


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    except ValueError:
        raise CompareError(f"--services {text!r} is not a list of numbers; write e.g. 100,1000,5000") from None
    if len(sizes) < 2 or any(s < 1 or s > 60000 for s in sizes):
        raise CompareError(
            f"--services {text!r}: give two or more service counts (a slope needs two), each from 1 to 60000"
        )
    return tuple(sizes)


def default_lab(name: str) -> str:
    return f"cmp-{name}"[:32].rstrip("-")


# --- one run on this kernel -------------------------------------------------------------------


@dataclass
class _Lab:
    setup: ctopo.Setup
    opts: Options
    log: Log
    work: Path
    built: bool = False
    ups: list[float] = field(default_factory=list)

    def up(self, n: int, mode: str) -> float:
        from netlab import lab

        path = ctopo.write(ctopo.compose(self.setup, n, mode), self.work / f"{self.setup.lab}.yaml")
        t0 = time.perf_counter()
        lab.up(path)
        self.built = True
        return time.perf_counter() - t0

    def ns(self, target: str) -> str:
        from netlab import lab

        return lab.exec_target(self.setup.lab, target)


def _svc(services: Sequence[Any], name: str, port: int | None = None) -> Any:
    """The programmed service port of service `name` (its `port`, or its first)."""
    for x in services:
        if x.name == name and (port is None or x.port == port):
            return x
    raise CompareError(f"service {name} is not in the programmed rules")


def _plan_positions(lab: str, node: str, names: dict[str, str]) -> tuple[dict[str, int], int]:
    """Position of each named service's ClusterIP rule in kube-proxy's iptables order (services
    with endpoints, by namespace, name, port name, protocol), from the recorded plan."""
    from netlab.kernel import rules_state

    rp = rules_state.load(lab, node)
    assert rp is not None
    usable = [
        s for s in rp.services if s.endpoints and (not s.internal_local or any(e.node == node for e in s.endpoints))
    ]
    ordered = sorted(usable, key=lambda s: (s.namespace, s.name, s.port_name, str(s.protocol)))
    pos = {s.name: i + 1 for i, s in enumerate(ordered)}
    return {k: pos.get(v, 0) for k, v in names.items()}, len(ordered)


def _measure_size(lb: _Lab, n: int, mode: str, first_size: bool) -> dict[str, Any]:
    from netlab import lab
    from netlab.kernel import rules_state

    s, opts, log = lb.setup, lb.opts, lb.log
    log(f"N={n} {mode}: netlab up ({'build' if not lb.built else 'update'})")
    up_s = lb.up(n, mode)
    node_ns = lb.ns(s.client_node)
    client_ns = lb.ns(f"{s.namespace}/{ctopo.CLIENT}")
    rp = rules_state.load(s.lab, s.client_node)
    if rp is None or str(rp.mode) != mode:
        raise CompareError(f"after `netlab up` node {s.client_node} is not programmed in {mode} mode")
    by_name = rp.services
    res: dict[str, Any] = {
        "mode": mode,
        "where": "host",
        "requested": n,
        "services": s.total(n),
        "service_ports": len(rp.services),
        "up_s": round(up_s, 3),
        "problems": [],
    }
    log(f"N={n} {mode}: counting programmed objects on every node")
    st = lab.status(s.lab)
    res["objects"] = {node["name"]: measure.objects(node["netns"], mode, rp.iptables_backend) for node in st["nodes"]}
    log(f"N={n} {mode}: full programming and one-service change on {s.client_node}")
    res["programming"] = measure.programming(
        s.lab, s.client_node, node_ns, repeat=opts.repeat, cap=opts.cap, changes=opts.changes
    )
    echo_ip = next(p["ip"] for p in st["pods"] if p["name"] == ctopo.ECHO and p["namespace"] == s.namespace)
    targets = {
        "first": (str(_svc(by_name, ctopo.FIRST).cluster_ip), ctopo.PORT),
        "last": (str(_svc(by_name, ctopo.LAST).cluster_ip), ctopo.PORT),
        "direct": (echo_ip, ctopo.ECHO_PORT),
    }
    log(f"N={n} {mode}: latency, {opts.connections} new connections each to the first, the last service, a pod")
    server = (lb.ns(f"{s.namespace}/{ctopo.ECHO}"), ctopo.ECHO_PORT)
    lat = measure.latency(node_ns, client_ns, targets, opts.connections, fifo=opts.fifo, server=server)
    positions, count = _plan_positions(s.lab, s.client_node, {"first": ctopo.FIRST, "last": ctopo.LAST})
    if mode == "iptables":  # the kernel's own order: a Local service without a local endpoint has no rule here
        positions, count = measure.kube_services_positions(
            node_ns, rp.iptables_backend, {k: targets[k] for k in ("first", "last")}
        )
    for key in ("first", "last"):
        lat["targets"][key]["service"] = ctopo.FIRST if key == "first" else ctopo.LAST
        lat["targets"][key]["position"] = positions[key]
    lat["clusterip_rules"] = count
    lat["position_source"] = "iptables-save" if mode == "iptables" else "kube-proxy's iptables order (plan)"
    res["problems"] += measure.latency_problems(lat, opts.connections, {k: {ctopo.ECHO} for k in targets})
    res["latency"] = lat
    if first_size:
        res["distribution"] = _distribution(lb, mode, by_name, client_ns)
        res["behaviour"] = _behaviour(lb, mode, by_name, st)
    return res


def _distribution(lb: _Lab, mode: str, by_name: Sequence[Any], client_ns: str) -> list[dict[str, Any]]:
    s, n = lb.setup, lb.opts.distribution or lb.opts.connections
    out = []
    svc = _svc(by_name, s.service, s.port)
    lb.log(f"{mode}: load distribution, {n} connections to {s.service}")
    d = measure.distribution(client_ns, str(svc.cluster_ip), s.port, n, s.backends)
    out.append({"mode": mode, "scheduler": None, "service": f"{s.namespace}/{s.service}", **d})
    if mode == "ipvs":
        for sched in s.schedulers:
            name = ctopo.scheduler_service(sched)
            lb.log(f"{mode}: load distribution, scheduler {sched}")
            d = measure.distribution(client_ns, str(_svc(by_name, name).cluster_ip), ctopo.PORT, n, s.backends)
            out.append({"mode": mode, "scheduler": sched, "service": f"{s.namespace}/{name}", **d})
        out[0]["scheduler"] = "rr (cluster default)"
    return out


def _unknown_port(services: Sequence[Any], ip: Any) -> int:
    used = {x.port for x in services if x.cluster_ip == ip}
    return next(p for p in (81, 8081, 9999, 12345) if p not in used)


def _behaviour(lb: _Lab, mode: str, by_name: Sequence[Any], st: dict[str, Any]) -> list[dict[str, Any]]:
    s = lb.setup
    lb.log(f"{mode}: behaviour rows (real traffic)")
    measured = _svc(by_name, s.service, s.port)
    vip = str(measured.cluster_ip)
    probes: list[dict[str, Any]] = [
        {"id": "noep", "kind": "tcp", "host": str(_svc(by_name, ctopo.NOEP).cluster_ip), "port": ctopo.PORT},
        {"id": "ping", "kind": "ping", "host": vip},
        {"id": "unknown-port", "kind": "tcp", "host": vip, "port": _unknown_port(by_name, measured.cluster_ip)},
    ]
    if s.far_node:
        probes.append({"id": "local", "kind": "tcp", "host": str(_svc(by_name, ctopo.LOCAL).cluster_ip), "port": 80})
    for p in probes:
        p["timeout"] = PING_TIMEOUT if p["kind"] == "ping" else TCP_TIMEOUT
    results = measure.behaviour_probes(lb.ns(f"{s.namespace}/{ctopo.CLIENT}"), probes)
    hair: dict[str, Any] = {
        "id": "hairpin", "kind": "tcp", "host": str(_svc(by_name, ctopo.FIRST).cluster_ip), "port": ctopo.PORT,
        "timeout": TCP_TIMEOUT,
    }  # fmt: skip
    results.update(measure.behaviour_probes(lb.ns(f"{s.namespace}/{ctopo.ECHO}"), [hair]))
    np_port = _svc(by_name, ctopo.NODEPORT).node_port
    nps: list[dict[str, Any]] = [
        {"id": f"nodeport:{node['name']}", "kind": "tcp", "host": node["ip"].split("/")[0], "port": np_port,
         "timeout": TCP_TIMEOUT}
        for node in st["nodes"]
    ]  # fmt: skip
    results.update(measure.behaviour_probes(lb.ns("external"), nps))
    rows = []
    details = {p["id"]: p for p in [*probes, hair, *nps]}
    for row in BEHAVIOUR:
        if row.id == "local" and not s.far_node:
            rows.append(
                {"id": "local", "title": row.title, "mode": mode, "outcome": "n/a", "by": "",
                 "detail": "one node: every endpoint is local", "expected": None, "pass": None}
            )  # fmt: skip
            continue
        r = results[row.id]
        rows.append(_verdict(row, mode, r, details[row.id], s))
    for node in st["nodes"]:
        pid = f"nodeport:{node['name']}"
        row = Row(pid, NODEPORT_ROW.title.format(node=node["name"], ip=node["ip"].split("/")[0]),
                  NODEPORT_ROW.expected, NODEPORT_ROW.why)  # fmt: skip
        rows.append(_verdict(row, mode, results[pid], details[pid], s))
    return rows


def _verdict(row: Row, mode: str, r: dict[str, Any], probe: dict[str, Any], s: ctopo.Setup) -> dict[str, Any]:
    expected = row.expected.get(mode)
    ok: bool | None = None if expected is None else r["outcome"] in expected
    if ok and row.id == "hairpin":
        ok = r["by"] == ctopo.ECHO
    elif ok and row.id.startswith("nodeport"):
        ok = r["by"] in s.backends
    target = f"{probe['host']}" + (f":{probe['port']}" if probe.get("port") else "")
    return {
        "id": row.id,
        "title": row.title,
        "mode": mode,
        "target": target,
        "outcome": r["outcome"],
        "by": r["by"],
        "ms": r["ms"],
        "expected": list(expected) if expected is not None else None,
        "pass": ok,
        "why": row.why,
    }


def _local(setup: ctopo.Setup, opts: Options, modes: Sequence[str], log: Log) -> list[dict[str, Any]]:
    """Every size in every mode on this kernel, in one lab; removed at the end, whatever happens."""
    from netlab import lab
    from netlab.kernel import observe

    if setup.lab in observe.list_labs():
        raise CompareError(f"lab {setup.lab} is already up; remove it with `netlab down {setup.lab}` or use --lab")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="netlab-compare-") as tmp:
        lb = _Lab(setup, opts, log, Path(tmp))
        try:
            for i, n in enumerate(opts.sizes):
                for mode in modes:
                    res = _measure_size(lb, n, mode, i == 0)
                    runs.append(res)
                    log(report.progress_line(res))
        finally:
            if lb.built or setup.lab in observe.list_labs():
                log(f"netlab down {setup.lab}")
                lab.down(setup.lab)
    return runs


# --- IPVS through the VM tier ----------------------------------------------------------------------


def _vm_unavailable() -> str | None:
    """Why `netlab vm` cannot run here (None if it can)."""
    try:
        from netlab import vm
    except ImportError as exc:
        return f"the VM tier (netlab.vm) is not in this netlab ({exc})"
    try:
        kernel = vm.find_kernel()
        spec = vm.VmSpec(kernel=kernel, command=("true",), cwd=Path.cwd(), venv_bin=Path(sys.prefix) / "bin")
        vm.check_tools(spec)
    except Exception as exc:  # noqa: BLE001 - any reason the VM cannot boot is the column's reason
        return str(exc)
    return None


def vm_argv(file: str, opts: Options, lab: str) -> list[str]:
    """`netlab vm -- python -m netlab.cli_compare FILE --modes ipvs ... -o json` (the standalone
    entry, so it works before `compare` is registered in netlab.cli). The guest's writes go to
    RAM, so its --out is a guest /tmp path; the JSON comes back on stdout."""
    inner = [
        "python", "-m", "netlab.cli_compare", str(Path(file).resolve()),
        "--modes", "ipvs",
        "--services", ",".join(str(n) for n in opts.sizes),
        "--connections", str(opts.connections),
        "--out", "/tmp/netlab-compare-ipvs",
        "--lab", lab,
        "--no-plots",
        "-o", "json",
    ]  # fmt: skip
    if opts.service:
        inner += ["--service", opts.service]
    if not opts.fifo:
        inner.append("--no-fifo")
    return [sys.executable, "-c", "from netlab.cli import main; main()", "vm", "--memory", "3G", "--", *inner]


def extract_json(stdout: str) -> dict[str, Any] | None:
    """The compare's JSON document among whatever else the VM printed: the last line that is
    one JSON object of our kind."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and f'"kind": "{KIND}"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict):
                return data
    return None


def _in_vm(file: str, opts: Options, lab: str, log: Log) -> tuple[dict[str, Any] | None, str]:
    """(the inner compare's JSON or None, what happened)."""
    why = _vm_unavailable()
    if why:
        return None, f"skipped: this kernel has no IPVS and the VM tier is not available: {why}"
    argv = vm_argv(file, opts, lab)
    log(f"ipvs: this kernel has no IPVS; running it in the VM tier: {shlex.join(argv[3:])}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=False)
    tail: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip()
            if line:
                tail.append(line)
                del tail[:-20]
                log(f"vm | {line}")

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        stdout, _ = proc.communicate()
    except BaseException:
        proc.terminate()  # `netlab vm` stops its qemu on SIGTERM
        proc.wait()
        raise
    t.join(timeout=5)
    data = extract_json(stdout)
    took = time.perf_counter() - t0
    if data is None:
        return None, f"failed in the VM (exit {proc.returncode} after {took:.0f} s): " + " / ".join(tail[-3:])
    return data, f"measured in the VM tier (qemu TCG, {took:.0f} s)"


def merge_vm(data: dict[str, Any], inner: dict[str, Any] | None, status: str) -> None:
    """Put the VM's ipvs column into the host's results."""
    if inner is None:
        data["columns"]["ipvs"] = {"status": "skipped" if status.startswith("skipped") else "failed", "reason": status}
        return
    runs = [dict(r, where="vm") for r in inner.get("runs", []) if r.get("mode") == "ipvs"]
    col = inner.get("columns", {}).get("ipvs", {})
    if not runs or col.get("status") not in (None, "measured"):
        data["columns"]["ipvs"] = {"status": "failed", "reason": col.get("reason") or f"{status}: no ipvs runs"}
        return
    data["runs"] += runs
    data["columns"]["ipvs"] = {
        "status": "measured",
        "where": "vm",
        "reason": status,
        "machine": inner.get("machine"),
        "note": "times under qemu TCG are 25-30x the host's: compare the shape (slope against its own "
        "base), not the microseconds",
    }


# --- the whole compare --------------------------------------------------------------------------------


def compare(file: str, opts: Options, log: Log = lambda _: None) -> dict[str, Any]:
    """Run the compare; a JSON-ready dict (report.build fills in slopes, shape and verdicts)."""
    from netlab.bench import machine
    from netlab.kernel import features
    from netlab.lab import require_root

    require_root("compare")
    t0 = time.perf_counter()
    from netlab.topology import load

    name = load(file).name
    lab = opts.lab or default_lab(name)
    schedulers = SCHEDULERS if "ipvs" in opts.modes else ()
    setup = ctopo.prepare(file, lab, schedulers=schedulers, service=opts.service)
    has_ipvs = features.has_ipvs()
    here = [m for m in opts.modes if m != "ipvs" or has_ipvs]
    data: dict[str, Any] = {
        "kind": KIND,
        "version": 1,
        "command": opts.command,
        "topology": file,
        "machine": machine(),
        "host_has_ipvs": has_ipvs,
        "modes": list(opts.modes),
        "sizes": list(opts.sizes),
        "connections": opts.connections,
        "warmup": WARMUP,
        "fifo": opts.fifo,
        "setup": setup.as_dict(),
        "columns": {m: {"status": "measured", "where": "host"} for m in here},
        "runs": [],
    }
    if here:
        data["runs"] = _local(setup, opts, here, log)
    if "ipvs" in opts.modes and not has_ipvs:
        if opts.vm:
            inner, status = _in_vm(file, opts, lab, log)
        else:
            inner, status = None, "skipped: this kernel has no IPVS (--no-vm)"
        merge_vm(data, inner, status)
    data["total_s"] = round(time.perf_counter() - t0, 1)
    report.build(data)
    return data


def write_outputs(data: dict[str, Any], out: Path, *, plots: bool = True) -> dict[str, str]:
    """report.json, report.md and the PNGs in `out`; returns name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if plots:
        from netlab.compare import plot

        files.update(plot.write_all(data, out))
        data["plots"] = {k: Path(v).name for k, v in files.items()}
    (out / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "report.md").write_text(report.markdown(data))
    files["report.json"] = str(out / "report.json")
    files["report.md"] = str(out / "report.md")
    return files
