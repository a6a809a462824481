"""`netlab bench services`: how fast netlab programs kube-proxy's rules, and what a packet pays.

For each service count N (default 1000, 5000, 10000) it builds one real lab, `bsvc`: one node,
a deployment `web` of 3 replicas serving TCP 8080, a pod `client`, and N ClusterIP services
`s00000..` with `selector: {app: web}` and port 80 -> 8080, so every service has 3 real
endpoints. The lab comes up with `netlab up` in iptables mode; the other modes are reached by
rewriting `cluster.proxyMode` (and `iptablesBackend`) and running `netlab up` again (the pods
stay): iptables (the system's backend, nft on Debian 12), nftables, iptables with the legacy
backend. The lab is removed (`netlab down`) after each N. In each mode, in this order:

  1. bare tool, the floor of a full sync: the payload a full sync sends, rendered once in the
     benchmark, through the same tool with the same flags (iptables: the whole-table restore,
     `iptables-restore -w 5 --counters` without --noflush, which proxy.sync uses on a node whose
     filter and nat hold only kube-proxy's rules; nftables: `nft -f -`), through nsenter inside
     a fresh empty netns, and (in 2) inside the node's netns right after `proxy.cleanup`.
     iptables also times kube-proxy's own way, `iptables-restore --noflush` of its payload, in
     the node (informational); nftables the same services rendered with
     endpoint_dispatch="rules" and, in a fresh netns, with one *named* map per service instead
     of the anonymous vmap (what-ifs).
  2. full programming: rounds of the bare tool in the node after cleanup, then
     `proxy.sync(previous=None)` in-process after cleanup, so both see the same load on a shared
     machine. The sync is split into its parts by wrapping the functions it calls (read,
     ownership check, render, apply, state record; the rest is "other"). Wall and CPU seconds
     (this process and its finished children: the tool's user time and the kernel's work in its
     transaction), the latter barely moved by other work on the CPUs. Checked: the tool the sync
     runs, its flags and its stdin are exactly the ones timed bare; the kernel then holds N
     ClusterIP rules / map elements, 3N endpoint chains and the jumps.
  3. one-service change: the middle service loses one endpoint, then gets it back, alternately,
     `--changes` timed `proxy.sync(previous=old)` (the partial sync; parts as in 2). Checked: the
     payload equals a delta rendered independently (iptables: render_iptables_delta; nftables:
     the full-state form render_nftables(previous=nft_state(all services))); after each sync the
     kernel's chain for that service jumps to exactly the planned endpoints' chains; afterwards
     the ruleset equals the full sync's. Next to it, in the same run: the same deltas through the
     same tool bare (nsenter + tool, no netlab Python; for nftables the floor), the kernel floor
     of any iptables transaction on this node (a one-rule restore into a scratch chain, removed
     again) and nft's (a script without cache, a rule, a jump), and what else netlab spends
     around a change (the RulesPlan fingerprint `netlab up` compares; the state record as plain
     tuples, a what-if). Then the same kind of change as a user makes it: the service's targetPort
     edited in the topology and `netlab up` (wall time; put back untimed).
  4. first-connection latency: from the client pod, `--connections` new TCP connections (after
     20 warm-ups) to the first and to the last service in KUBE-SERVICES (read from the node's
     `iptables-save`, not assumed) and, as the "nothing matched" reference, straight to a web
     pod, interleaved; connect() timed with perf_counter_ns, closed with RST. Checked: replies
     come from web-0/1/2 through both ClusterIPs, and the node's conntrack holds at least one
     new entry per connection (so each one went through the nat rules).

Full programming and bare timings repeat `--repeat` times but stop once their runs add up to
`--cap` seconds (an nftables load at 10k takes 20-50 s); the count is in the results.
Wall-clock is what the targets are stated in; where other work shared the CPUs, the CPU ratios
say how much of a wall ratio is netlab's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import resource
import statistics
import subprocess  # noqa: TID251 - a benchmark drives the CLI and the kernel tools as processes
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netlab.bench import BenchError, machine, netlab_argv

__all__ = [
    "CLIENT_CODE",
    "MODES",
    "WARMUP",
    "changed_plans",
    "conntrack_count",
    "kube_services_order",
    "parse_sizes",
    "print_tables",
    "repeat_capped",
    "save_tables",
    "services",
    "topology_yaml",
]

LAB = "bsvc"
NODE = "node1"
CLIENT = "client"
WEB = "web"
REPLICAS = 3
PORT = 80
TARGET_PORT = 8080
WARMUP = 20
TARGET_FULL_RATIO = 1.2
TARGET_CHANGE_S = 0.050
KUBE_PROXY_CHANGE_S = 0.141
BARE_NETNS = f"nlbench-{LAB}-bare"
NFT_PREFIX = "add table ip kube-proxy\ndelete table ip kube-proxy\n"  # what proxy's full sync prepends
NFT_ARGV = ["nft", "-f", "-"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class Mode:
    key: str  # column name
    proxy_mode: str  # cluster.proxyMode
    backend: str  # cluster.iptablesBackend

    @property
    def kind(self) -> str:
        """proxy.cleanup's mode argument."""
        return self.proxy_mode


MODES = (
    Mode("iptables", "iptables", "auto"),
    Mode("nftables", "nftables", "auto"),
    Mode("iptables-legacy", "iptables", "legacy"),
)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BenchError(f"--services {text!r} is not a list of numbers; write e.g. 1000,5000,10000") from None
    if not sizes or any(s < 2 or s > 60000 for s in sizes):
        raise BenchError(f"--services {text!r}: give one or more service counts, each from 2 to 60000")
    return sizes


def service_name(i: int, n: int) -> str:
    return f"s{i:0{max(5, len(str(n - 1)))}d}"


def topology_yaml(n: int, mode: Mode, target_ports: dict[str, int] | None = None) -> str:
    """One node, `web` x3 serving 8080, a client pod, n services port 80 -> 8080 selecting app=web
    (`target_ports` overrides the targetPort of the services it names)."""
    tp = target_ports or {}
    lines = [
        f"# generated by `netlab bench services` (netlab/bench_services.py): {n} services x {REPLICAS} endpoints",
        f"name: {LAB}",
        "cluster:",
        f"  proxyMode: {mode.proxy_mode}",
        f"  iptablesBackend: {mode.backend}",
        "nodes:",
        f"  - name: {NODE}",
        "deployments:",
        f"  - name: {WEB}",
        f"    replicas: {REPLICAS}",
        f"    serve: [{TARGET_PORT}]",
        "pods:",
        f"  - name: {CLIENT}",
        f"    node: {NODE}",
        "services:",
    ]
    lines += [
        f"  - {{name: {service_name(i, n)}, selector: {{app: {WEB}}}, "
        f"ports: [{{port: {PORT}, targetPort: {tp.get(service_name(i, n), TARGET_PORT)}}}]}}"
        for i in range(n)
    ]
    return "\n".join(lines) + "\n"


# --- small helpers --------------------------------------------------------------------------


def _median(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def repeat_capped(fn: Callable[[], float], repeat: int, cap: float) -> list[float]:
    """Run fn (which returns its own timed seconds) up to `repeat` times, stopping once the
    timed seconds add up to `cap` (always at least once)."""
    out: list[float] = []
    while len(out) < repeat:
        out.append(fn())
        if sum(out) >= cap:
            break
    return out


def _ns_run(
    ns_path: str, argv: list[str], stdin: str | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={ns_path}", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _timed_tool(ns_path: str, argv: list[str], payload: str) -> float:
    """Seconds for one tool run with the payload on stdin (nsenter + exec included, as netlab runs it)."""
    t0 = time.perf_counter()
    r = _ns_run(ns_path, argv, payload)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed in {ns_path} (exit {r.returncode}): {r.stderr.strip()[-400:]}")
    return dt


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its children that have finished: the
    tools' own user time and the kernel time of their transactions. Unlike wall time it barely
    moves when other work shares the CPUs, so it backs up the wall-clock ratios on a busy machine."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def _fresh_netns() -> Iterator[str]:
    """A new, empty network namespace (ours; deleted afterwards). Yields its path."""
    from netlab.kernel import netns

    if netns.exists(BARE_NETNS):
        subprocess.run(["ip", "netns", "del", BARE_NETNS], check=False)
    subprocess.run(["ip", "netns", "add", BARE_NETNS], check=True)
    try:
        yield netns.path(BARE_NETNS)
    finally:
        subprocess.run(["ip", "netns", "del", BARE_NETNS], check=False)


def _tool_versions() -> dict[str, str]:
    out = {}
    for name, argv in {
        "iptables": ["iptables", "--version"],
        "iptables-legacy": ["iptables-legacy", "--version"],
        "nft": ["nft", "--version"],
        "conntrack": ["conntrack", "--version"],
    }.items():
        try:
            r = subprocess.run(argv, capture_output=True, text=True, check=False)
            out[name] = (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            out[name] = "missing"
    return out


# --- timing proxy.sync by its parts -----------------------------------------------------------

# (module, function, part): every function proxy.sync calls that costs more than a few µs. Each
# part gets the seconds spent in its functions minus those of wrapped functions they call
# (render_nftables_delta calls changed_subset, nft_state and render_nftables, for instance).
PARTS = (
    ("netlab.kernel.rules", "iptables_tables", "read"),  # one iptables-save, parsed
    ("netlab.kernel.proxy", "_only_kube_proxy", "check"),  # may the full sync replace whole tables?
    ("netlab.render.iptables", "service_chains", "check"),  # (the top-level chain names it allows)
    ("netlab.kernel.proxy", "_changed_services", "diff"),  # which service ports differ
    ("netlab.render.nftables", "changed_subset", "diff"),
    ("netlab.render.iptables", "is_large_cluster", "diff"),  # kube-proxy's large-cluster flag
    ("netlab.render.nftables", "nft_state", "prepare"),  # the changed services' previous state
    ("netlab.render.iptables", "render_iptables", "render"),
    ("netlab.render.iptables", "iter_render_iptables", "render"),  # + its pieces, timed as they are made
    ("netlab.render.iptables", "render_iptables_delta", "render"),
    ("netlab.render.nftables", "render_nftables", "render"),
    ("netlab.render.nftables", "render_nftables_delta", "render"),
    ("netlab.kernel.rules", "apply_iptables", "apply"),  # nsenter + iptables-restore
    ("netlab.kernel.rules", "apply_nft", "apply"),  # nsenter + nft -f
    ("netlab.kernel.rules_state", "write", "save"),  # writing the state record (pickled meanwhile)
)
PART_ORDER = ("read", "check", "diff", "prepare", "render", "apply", "save", "other")


class _Parts:
    """While active, wraps the PARTS functions (module attributes, restored on exit) and adds up
    each part's own seconds; records every tool run that gets a payload on stdin (argv without
    the nsenter prefix, stdin), i.e. exactly what the sync hands the kernel's tools."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sent: list[tuple[list[str], str]] = []
        self._inner: list[float] = []  # per active wrapped call: seconds of wrapped calls inside it
        self._saved: list[tuple[Any, str, Any]] = []

    def _timed(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.seconds[part] += dt - self._inner.pop()
                if self._inner:
                    self._inner[-1] += dt

        return wrapper

    def _captured(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(ns: str, argv: list[str], **kwargs: Any) -> Any:
            stdin = kwargs.get("stdin")
            if stdin is None or isinstance(stdin, str):
                if stdin is not None:
                    self.sent.append((list(argv), stdin))
                return fn(ns, argv, **kwargs)
            # a streamed render: its pieces are computed while the tool runs; record them and
            # count the time spent producing them as "render" (inside, not on top of, "apply")
            pieces: list[str] = []
            kwargs["stdin"] = self._rendering(stdin, pieces)
            try:
                return fn(ns, argv, **kwargs)
            finally:
                self.sent.append((list(argv), "".join(pieces)))

        return wrapper

    def _rendering(self, stdin: Iterator[str], into: list[str]) -> Iterator[str]:
        it = iter(stdin)
        while True:
            t0 = time.perf_counter()
            piece = next(it, None)
            dt = time.perf_counter() - t0
            self.seconds["render"] += dt
            if self._inner:
                self._inner[-1] += dt
            if piece is None:
                return
            into.append(piece)
            yield piece

    def _patch(self, mod: Any, attr: str, new: Callable[..., Any]) -> None:
        self._saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, new)

    def __enter__(self) -> _Parts:
        import importlib

        from netlab.kernel import rules

        for modname, attr, part in PARTS:
            mod = importlib.import_module(modname)
            self._patch(mod, attr, self._timed(getattr(mod, attr), part))
        self._patch(rules, "run", self._captured(rules.run))
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, attr, orig in reversed(self._saved):
            setattr(mod, attr, orig)
        self._saved.clear()


def _timed_sync(ns: str, rp: Any, previous: Any) -> tuple[float, dict[str, float], list[tuple[list[str], str]]]:
    """proxy.sync in-process: (seconds, seconds per part, the tool runs with their stdin)."""
    from netlab.kernel import proxy

    with _Parts() as parts:
        t0 = time.perf_counter()
        proxy.sync(LAB, NODE, ns, rp, previous, ())
        total = time.perf_counter() - t0
    split = dict(parts.seconds)
    split["other"] = max(0.0, total - sum(split.values()))
    return total, split, parts.sent


def _median_parts(splits: list[dict[str, float]]) -> dict[str, float | None]:
    return {k: _r(_median(s.get(k, 0.0) for s in splits)) for k in PART_ORDER if any(k in s for s in splits)}


def _cmd(argv: list[str]) -> str:
    return " ".join(argv)


# --- the kernel: reading back -------------------------------------------------------------------


def _tool(mode: Mode) -> Any:
    from netlab.kernel import rules

    return rules.IptablesTool(mode.backend)


def save_tables(ns: str, save_bin: str) -> dict[str, str]:
    """table -> its `iptables-save` section. No `-t`: asking legacy for a table creates it."""
    from netlab.kernel import netns

    r = _ns_run(netns.path(ns), [save_bin])
    if r.returncode != 0:
        raise BenchError(f"{save_bin} failed in {ns}: {r.stderr.strip()[-300:]}")
    out: dict[str, list[str]] = {}
    table = None
    for line in r.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
            out[table] = []
        elif table is not None and not line.startswith("#"):
            out[table].append(line)
    return {t: "\n".join(lines) + "\n" for t, lines in out.items()}


_COUNTERS = re.compile(r" \[\d+:\d+\]$")


def _normalized(tables: dict[str, str]) -> str:
    """filter + nat as `iptables-save` prints them, without counters (to compare two rulesets)."""
    return "".join(f"*{t}\n" + _COUNTERS.sub("", tables.get(t, "")) for t in ("filter", "nat"))


_SVC_RULE = re.compile(r'^-A KUBE-SERVICES -d (\S+)/32 .*--comment "([^"]+) cluster IP".* --dport (\d+) -j (KUBE-S\S+)')


def kube_services_order(nat: str) -> list[tuple[str, str, int, str]]:
    """(spn, ClusterIP, port, target chain) of each ClusterIP rule in KUBE-SERVICES, in order."""
    out = []
    for line in nat.splitlines():
        m = _SVC_RULE.match(line)
        if m:
            out.append((m.group(2), m.group(1), int(m.group(3)), m.group(4)))
    return out


def _check_exclusive(ns: str, mode: Mode) -> list[str]:
    """The node holds this mode's rules and no other mode's (a switch must clean up)."""
    from netlab.kernel import rules

    problems = []
    nft_ipt = save_tables(ns, "iptables-nft-save").get("nat", "")
    legacy = save_tables(ns, "iptables-legacy-save").get("nat", "")
    has = {
        "iptables": ":KUBE-SERVICES " in nft_ipt,
        "iptables-legacy": ":KUBE-SERVICES " in legacy,
        "nftables": rules.has_nft_table(ns),
    }
    for key, there in has.items():
        if there != (key == mode.key):
            problems.append(f"{'found' if there else 'missing'} {key} rules in {mode.key} mode")
    return problems


def _check_full(ns: str, mode: Mode, rp: Any) -> str | None:
    """None if the kernel holds every service with its 3 endpoints (and the jumps), else what is wrong."""
    n = len(rp.services)
    if mode.proxy_mode == "nftables":
        from netlab.kernel import rules

        r = rules.run(ns, ["nft", "list", "map", "ip", "kube-proxy", "service-ips"], check=False)
        got = r.stdout.count(": goto service-")
        if got != n:
            return f"service-ips holds {got} elements, expected {n}"
        return None
    tables = save_tables(ns, _tool(mode).save)
    nat = tables.get("nat", "")
    svc = kube_services_order(nat)
    seps = sum(1 for line in nat.splitlines() if line.startswith(":KUBE-SEP-"))
    jumps = '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat
    if len(svc) != n or seps != REPLICAS * n or not jumps:
        return (
            f"KUBE-SERVICES has {len(svc)} ClusterIP rules (want {n}), {seps} KUBE-SEP chains "
            f"(want {REPLICAS * n}), PREROUTING jump {'present' if jumps else 'missing'}"
        )
    return None


def _endpoints_ok(ns: str, mode: Mode, svc: Any) -> bool:
    """True if the kernel's service chain for `svc` dispatches to exactly its endpoints' chains
    (names hash `ip:port`, so a changed targetPort shows too)."""
    from netlab.kernel import rules
    from netlab.render import iptables as ri
    from netlab.render import nftables as rn

    if mode.proxy_mode == "nftables":
        chain = f"service-{rn.service_chain_base(svc)}"
        out = rules.run(ns, ["nft", "list", "chain", "ip", "kube-proxy", chain], check=False).stdout
        got = set(re.findall(r"goto (endpoint-[^\s,}]+)", out))
        return got == {f"endpoint-{rn.endpoint_chain_base(svc, e)}" for e in svc.endpoints}
    chain = ri.service_chain(svc.spn, svc.proto)
    out = rules.run(ns, [_tool(mode).iptables, "-w", "5", "-t", "nat", "-S", chain], check=False).stdout
    return set(re.findall(r"-j (KUBE-SEP-\S+)", out)) == {
        ri.endpoint_chain(svc.spn, svc.proto, e.addr) for e in svc.endpoints
    }


def _ruleset(ns: str, mode: Mode) -> str:
    """The node's kube-proxy ruleset in a form that compares two states (counters, handles and
    the kernel's listing order of chains and map elements left out; rule order kept)."""
    if mode.proxy_mode != "nftables":
        return _normalized(save_tables(ns, _tool(mode).save))
    from netlab.kernel import rules

    r = rules.run(ns, ["nft", "-s", "-j", "list", "table", "ip", "kube-proxy"], check=False)
    if r.returncode != 0:
        return f"nft list failed: {r.stderr.strip()[-200:]}"
    objects: list[str] = []
    chain_rules: dict[str, list[str]] = defaultdict(list)
    for item in json.loads(r.stdout)["nftables"]:
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if isinstance(body.get("elem"), list):
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        text = json.dumps(body, sort_keys=True)
        if kind == "rule":
            chain_rules[body["chain"]].append(text)
        else:
            objects.append(f"{kind} {text}")
    return "\n".join(sorted(objects) + [f"{c}: {rs}" for c, rs in sorted(chain_rules.items())])


# --- the floor of a change on this node ---------------------------------------------------------


def _iptables_floor(ns_path: str, tool: Any) -> dict[str, float | None]:
    """What any transaction costs on this node: a one-rule `iptables-restore --noflush` into a
    scratch chain, with a plain verdict and with a jump (the chain is deleted after each run,
    untimed). With the nft backend the kernel then validates every chain reachable from the base
    chains (nft_chain_validate), i.e. all of kube-proxy's rules; with legacy the whole table blob
    is replaced."""
    argv = [tool.restore, "-w", "5", "--noflush", "--counters"]
    chain = "NLBENCH-PROBE"
    out: dict[str, float | None] = {}
    for key, target in (("add_rule_s", "RETURN"), ("add_jump_s", "KUBE-MARK-MASQ")):
        xs = []
        for _ in range(5):
            xs.append(_timed_tool(ns_path, argv, f"*nat\n:{chain} - [0:0]\n-A {chain} -j {target}\nCOMMIT\n"))
            _timed_tool(ns_path, argv, f"*nat\n:{chain} - [0:0]\n-X {chain}\nCOMMIT\n")
        out[key] = _r(_median(xs))
    return out


def _nft_floor(ns_path: str) -> dict[str, float | None]:
    """Where `nft -f` spends a small transaction on this node: a script that needs no cache (`add
    table`), one rule into a scratch chain (nft 1.0.6 first fetches every chain of the table), and
    a jump (the kernel then validates the chains it reaches). The chain is removed in the same
    script."""
    probe = (
        "add chain ip kube-proxy bench-probe\nadd rule ip kube-proxy bench-probe counter\n"
        "flush chain ip kube-proxy bench-probe\ndelete chain ip kube-proxy bench-probe\n"
    )
    jump = probe.replace("bench-probe counter", "bench-probe jump mark-for-masquerade")
    scripts = {"no_cache_s": "add table ip kube-proxy\n", "add_rule_s": probe, "add_jump_s": jump}
    return {k: _r(_median(_timed_tool(ns_path, NFT_ARGV, s) for _ in range(5))) for k, s in scripts.items()}


# --- the lab --------------------------------------------------------------------------------


def _netlab(args: list[str], timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETLAB_FAULT_")}
    t0 = time.perf_counter()
    r = subprocess.run([*netlab_argv(), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    return time.perf_counter() - t0, r


def _up(topo: Path, log: Log, what: str) -> dict[str, Any]:
    wall, r = _netlab(["up", str(topo), "-o", "json"])
    if r.returncode != 0:
        raise BenchError(f"`netlab up` ({what}) failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    data = json.loads(r.stdout)
    log(f"  netlab up ({what}): {wall:.2f} s wall, {data.get('seconds')} s in-process, {len(data['steps'])} steps")
    return {"wall_s": _r(wall, 3), "in_process_s": data.get("seconds"), "steps": len(data["steps"])}


def _lab_netns() -> list[str]:
    from netlab.kernel import netns

    return netns.list_names(f"nl-{LAB}-")


def _node_ns() -> str:
    from netlab import lab

    return lab.exec_target(LAB, NODE)


def _pod_ip(name: str) -> str:
    from netlab import lab

    st = lab.status(LAB)
    for p in st["pods"]:
        if p["name"] == name:
            return str(p["ip"]).split("/")[0]
    raise BenchError(f"pod {name} not found in lab {LAB}")


# --- latency --------------------------------------------------------------------------------

CLIENT_CODE = r"""
import json, socket, struct, sys, time
targets = json.loads(sys.argv[1]); n = int(sys.argv[2]); warm = int(sys.argv[3])
rst = struct.pack("ii", 1, 0)
replies = {}
for key, (host, port) in targets.items():
    got = []
    for _ in range(3):
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(b"hello\n")
        got.append(s.recv(200).decode(errors="replace").strip())
        s.close()
    replies[key] = got
keys = list(targets)
out = {k: [] for k in keys}
fails = 0
for i in range(warm + n):
    r = i % len(keys)
    for key in keys[r:] + keys[:r]:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
        s.settimeout(3)
        t0 = time.perf_counter_ns()
        try:
            s.connect(tuple(targets[key]))
        except OSError:
            fails += 1
            s.close()
            continue
        t1 = time.perf_counter_ns()
        s.close()
        if i >= warm:
            out[key].append(t1 - t0)
print(json.dumps({"replies": replies, "ns": out, "fails": fails}))
"""


def conntrack_count(ns: str, ip: str) -> int:
    from netlab.kernel import rules

    r = rules.run(ns, ["conntrack", "-L", "-p", "tcp", "-d", ip], check=False)
    return sum(1 for line in r.stdout.splitlines() if line.strip())


def _latency(ns: str, targets: dict[str, tuple[str, int]], connections: int) -> dict[str, Any]:
    from netlab.kernel import rules

    rules.run(ns, ["conntrack", "-F"], check=False)  # the lab node's own table: every connection starts new
    args = ["exec", "--lab", LAB, CLIENT, "--", sys.executable, "-c", CLIENT_CODE]
    _, r = _netlab([*args, json.dumps(targets), str(connections), str(WARMUP)], timeout=600)
    if r.returncode != 0:
        raise BenchError(f"latency client failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {"fails": data["fails"]}
    for key, (ip, port) in targets.items():
        xs = [x / 1000 for x in data["ns"][key]]
        out[key] = {
            "ip": ip,
            "port": port,
            "n": len(xs),
            "median_us": _r(statistics.median(xs), 1),
            "p99_us": _r(_p99(xs), 1),
            "replies": sorted(set(data["replies"][key])),
            "conntrack_entries": conntrack_count(ns, ip),
        }
    return out


def _latency_problems(lat: dict[str, Any], connections: int) -> list[str]:
    problems = []
    if lat["fails"]:
        problems.append(f"{lat['fails']} connections failed")
    web = {f"{WEB}-{i}" for i in range(REPLICAS)}
    for key in ("first", "last", "direct"):
        t = lat[key]
        if t["n"] != connections:
            problems.append(f"{key}: {t['n']} of {connections} connections timed")
        if not set(t["replies"]) <= web or not t["replies"]:
            problems.append(f"{key}: replies {t['replies']}, expected {sorted(web)}")
        if t["conntrack_entries"] < connections + WARMUP:
            problems.append(f"{key}: {t['conntrack_entries']} conntrack entries for {connections + WARMUP} connections")
    return problems


# --- what-ifs and netlab's own costs around a sync ------------------------------------------------


def named_map_script(script: str) -> str:
    """The nftables script with each anonymous `numgen random mod N vmap { ... }` turned into a
    named map (declared, filled, referenced): named sets skip the kernel's anonymous-set path."""
    n = [0]

    def sub(m: re.Match[str]) -> str:
        chain, mod, entries = m.groups()
        n[0] += 1
        name = f"eps-{n[0]}"
        return (
            f"add map ip kube-proxy {name} {{ typeof numgen random mod 1 : verdict ; }}\n"
            f"add element ip kube-proxy {name} {{ {entries} }}\n"
            f"add rule ip kube-proxy {chain} numgen random mod {mod} vmap @{name}"
        )

    return re.sub(r"^add rule ip kube-proxy (\S+) numgen random mod (\d+) vmap \{ (.*) \}$", sub, script, flags=re.M)


def _best_of(fn: Callable[[], Any], n: int = 3) -> tuple[float, Any]:
    """(median seconds of n calls, the last result)."""
    times, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _state_rows(rp: Any) -> tuple[Any, ...]:
    """RulesPlan's services as plain tuples (what a compact state record could hold)."""
    return tuple(
        (
            s.namespace, s.name, s.port_name, str(s.protocol), int(s.cluster_ip), s.port, s.node_port,
            s.affinity_timeout, s.internal_local, s.external_local,
            tuple((int(e.ip), e.port, e.node, e.pod) for e in s.endpoints),
        )
        for s in rp.services
    )  # fmt: skip


def _write_atomic(data: bytes, directory: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, tmp + ".done")
    os.unlink(tmp + ".done")


def _state_encodings(rp: Any) -> dict[str, float | None]:
    """Seconds to write the sync's state record: as now (pickle of the RulesPlan) and as tuples."""
    with tempfile.TemporaryDirectory(dir="/run" if os.access("/run", os.W_OK) else None) as d:
        now, _ = _best_of(lambda: _write_atomic(pickle.dumps(rp), d))
        rows, _ = _best_of(lambda: _write_atomic(pickle.dumps(_state_rows(rp), protocol=5), d))
    return {"pickle_rulesplan_s": _r(now), "pickle_tuples_s": _r(rows)}


# --- one mode at one size ----------------------------------------------------------------------


@dataclass
class _Run:
    """One mode at one size: the node, the recorded plan, and what the steps share."""

    n: int
    mode: Mode
    ns: str
    ns_path: str
    rp: Any  # the RulesPlan `netlab up` programmed
    cfg: dict[str, Any]
    log: Log
    problems: list[str] = field(default_factory=list)
    cleanups: list[float] = field(default_factory=list)

    @property
    def is_nft(self) -> bool:
        return self.mode.proxy_mode == "nftables"

    def clean(self) -> None:
        from netlab.kernel import proxy

        t0 = time.perf_counter()
        proxy.cleanup(self.ns, self.mode.kind, previous_backend=self.mode.backend)
        self.cleanups.append(time.perf_counter() - t0)

    def repeat(self, fn: Callable[[], float], times: int | None = None) -> list[float]:
        return repeat_capped(fn, self.cfg["repeat"] if times is None else times, self.cfg["cap"])

    def on_node(self, argv: list[str], text: str) -> Callable[[], float]:
        """One bare run in the node's netns after proxy.cleanup (timed: the tool only)."""

        def one() -> float:
            self.clean()
            return _timed_tool(self.ns_path, argv, text)

        return one


def _on_fresh_netns(argv: list[str], text: str) -> Callable[[], float]:
    def one() -> float:
        with _fresh_netns() as path:
            return _timed_tool(path, argv, text)

    return one


def _full_payload(run: _Run) -> tuple[list[str], str]:
    """What proxy.sync's full sync runs on a node holding only kube-proxy's rules: (argv, stdin)."""
    from netlab.render import iptables as ri
    from netlab.render import nftables as rn

    ctx, services = run.rp.context, run.rp.services
    if run.is_nft:
        return NFT_ARGV, NFT_PREFIX + rn.render_nftables(ctx, services)
    tool = _tool(run.mode)
    return [tool.restore, "-w", "5", "--counters"], ri.render_iptables(ctx, services, whole_tables=True)


def _bare_elsewhere(run: _Run, argv: list[str], payload: str) -> dict[str, Any]:
    """The full-sync payload, same tool and flags, in a fresh netns; for iptables also kube-proxy's
    own way, `--noflush` with its payload, in the node's netns after cleanup (informational)."""
    from netlab.render import iptables as ri

    run.log(f"  {run.mode.key}: bare `{_cmd(argv)}` in a fresh netns")
    out: dict[str, Any] = {"fresh_s": run.repeat(_on_fresh_netns(argv, payload))}
    if not run.is_nft:
        tool = _tool(run.mode)
        kp_argv = [tool.restore, "-w", "5", "--noflush", "--counters"]
        kp = ri.render_iptables(run.rp.context, run.rp.services)
        run.log(f"  {run.mode.key}: kube-proxy's `{_cmd(kp_argv)}` ({len(kp) / 1e6:.1f} MB) in the node netns")
        out["kube_proxy"] = {"argv": _cmd(kp_argv), "bytes": len(kp), "node_s": run.repeat(run.on_node(kp_argv, kp))}
    return out


def _nft_variants(run: _Run) -> dict[str, Any]:
    """What-ifs for the nftables full sync (docs/benchmarks.md, "Full nftables sync"): the services
    rendered with endpoint_dispatch="rules", and with one named map per service instead of the
    anonymous vmap."""
    from netlab.render import nftables as rn

    run.log(f"  {run.mode.key}: variants: endpoint_dispatch=rules, named maps")
    t0 = time.perf_counter()
    rules_script = NFT_PREFIX + rn.render_nftables(run.rp.context, run.rp.services, endpoint_dispatch="rules")
    out: dict[str, Any] = {"rules": {"render_s": _r(time.perf_counter() - t0), "bytes": len(rules_script)}}
    out["rules"]["node_s"] = run.repeat(run.on_node(NFT_ARGV, rules_script))
    out["rules"]["fresh_s"] = run.repeat(_on_fresh_netns(NFT_ARGV, rules_script))
    named = named_map_script(NFT_PREFIX + rn.render_nftables(run.rp.context, run.rp.services))
    out["named_maps"] = {"bytes": len(named), "fresh_s": run.repeat(_on_fresh_netns(NFT_ARGV, named), 1)}
    return out


def _sent_problem(what: str, sent: list[tuple[list[str], str]], argv: list[str], text: str) -> str | None:
    """None if `sent` is exactly one run of argv with stdin `text`, else what differs."""
    if sent == [(argv, text)]:
        return None
    runs = "; ".join(f"`{_cmd(a)}` ({len(s)} bytes{', same stdin' if s == text else ''})" for a, s in sent)
    return f"{what} ran {runs or 'nothing'}, not `{_cmd(argv)}` of the expected {len(text)} bytes"


def _full_vs_bare(run: _Run, argv: list[str], payload: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(full sync, bare tool in the node): rounds of the bare payload in the node's netns after
    cleanup, then proxy.sync(previous=None) after cleanup (by parts; it must run exactly that
    payload), so both see the same load on a shared machine. Wall and CPU seconds."""
    run.log(f"  {run.mode.key}: bare `{_cmd(argv)}` and the full sync (proxy.sync, previous=None), alternately")
    bare: dict[str, list[float]] = {"node_s": [], "node_cpu_s": []}
    full: dict[str, list[float]] = {"runs_s": [], "cpu_s": []}
    splits: list[dict[str, float]] = []

    def one() -> float:
        run.clean()
        c0 = _cpu_s()
        bare["node_s"].append(_timed_tool(run.ns_path, argv, payload))
        bare["node_cpu_s"].append(_cpu_s() - c0)
        run.clean()
        c0 = _cpu_s()
        total, split, sent = _timed_sync(run.ns, run.rp, None)
        full["cpu_s"].append(_cpu_s() - c0)
        full["runs_s"].append(total)
        splits.append(split)
        bad = _sent_problem("the full sync", sent, argv, payload)
        if bad and bad not in run.problems:
            run.problems.append(bad)
        return bare["node_s"][-1] + total

    run.repeat(one)
    bad = _check_full(run.ns, run.mode, run.rp)
    if bad:
        run.problems.append(f"after the full sync: {bad}")
    out: dict[str, Any] = {k: [_r(x) for x in xs] for k, xs in full.items()}
    out.update(median_s=_r(_median(full["runs_s"])), cpu_median_s=_r(_median(full["cpu_s"])))
    out["parts"] = _median_parts(splits)
    return out, {k: [_r(x) for x in xs] for k, xs in bare.items()}


def changed_plans(rp: Any) -> tuple[Any, Any, Any]:
    """(the changed service before, after, the RulesPlan with it): the middle service by name
    loses its last endpoint."""
    ordered = sorted(rp.services, key=lambda s: (s.namespace, s.name))
    svc = ordered[len(ordered) // 2]
    eps = svc.sorted_endpoints()
    changed = replace(svc, endpoints=tuple(e for e in svc.endpoints if e != eps[-1]))
    return svc, changed, replace(rp, services=tuple(changed if s == svc else s for s in rp.services))


def _deltas(run: _Run, before: Any, after: Any, rp_drop: Any) -> tuple[list[str], str, str]:
    """(argv, drop payload, put-back payload) of the partial sync, rendered here: for iptables by
    render_iptables_delta from the changed service, for nftables by the full-state form
    render_nftables(all services, previous=nft_state(all services)) that the delta must equal."""
    from netlab.render import iptables as ri
    from netlab.render import nftables as rn

    ctx, rp = run.rp.context, run.rp
    if run.is_nft:
        drop = rn.render_nftables(ctx, rp_drop.services, previous=rn.nft_state(ctx, rp.services))
        readd = rn.render_nftables(ctx, rp.services, previous=rn.nft_state(ctx, rp_drop.services))
        return NFT_ARGV, drop, readd
    tool = _tool(run.mode)
    large_drop, large = ri.is_large_cluster(rp_drop.services), ri.is_large_cluster(rp.services)
    drop = ri.render_iptables_delta(ctx, [before], [after], rp_drop.services, large_cluster=large_drop)
    readd = ri.render_iptables_delta(ctx, [after], [before], rp.services, large_cluster=large)
    return [tool.restore, "-w", "5", "--noflush", "--counters"], drop, readd


def _change(run: _Run) -> dict[str, Any]:
    """The one-service change: timed partial syncs, the same deltas bare, the floor, and netlab's
    own costs around it. Leaves the node as the full sync left it (checked)."""
    rp, changes = run.rp, run.cfg["changes"]
    before, after, rp_drop = changed_plans(rp)
    argv, drop, readd = _deltas(run, before, after, rp_drop)
    synced = _ruleset(run.ns, run.mode)
    # (plan, previous plan, the payload it must send, the service as it then is, timings)
    drop_s: list[float] = []
    readd_s: list[float] = []
    steps = ((rp_drop, rp, drop, after, drop_s), (rp, rp_drop, readd, before, readd_s))
    # an odd count ends with an untimed put-back, so the node ends as it started
    rounds = changes + changes % 2
    run.log(f"  {run.mode.key}: {changes} x one-service change ({before.spn}) and back, partial sync")
    splits: list[dict[str, float]] = []
    cpu: list[float] = []
    for i in range(rounds):
        target, prev, text, want, store = steps[i % 2]
        c0 = _cpu_s()
        total, split, sent = _timed_sync(run.ns, target, prev)
        if i < changes:
            cpu.append(_cpu_s() - c0)
            store.append(total)
            splits.append(split)
        bad = _sent_problem("a partial sync", sent, argv, text)
        if bad and bad not in run.problems:
            run.problems.append(bad)
        if not _endpoints_ok(run.ns, run.mode, want):
            run.problems.append(f"after a partial sync the kernel does not show {before.spn}'s planned endpoints")
    if _ruleset(run.ns, run.mode) != synced:
        run.problems.append("after the partial syncs (and back) the ruleset differs from the full sync's")

    run.log(f"  {run.mode.key}: the same deltas bare (`{_cmd(argv)}`), and the floor")
    bare: list[float] = []
    bare_cpu: list[float] = []
    for i in range(rounds):
        _, _, text, want, _ = steps[i % 2]
        c0 = _cpu_s()
        dt = _timed_tool(run.ns_path, argv, text)
        if i < changes:
            bare_cpu.append(_cpu_s() - c0)
            bare.append(dt)
        if not _endpoints_ok(run.ns, run.mode, want):
            run.problems.append(f"after a bare delta the kernel does not show {before.spn}'s planned endpoints")
    floor = _nft_floor(run.ns_path) if run.is_nft else _iptables_floor(run.ns_path, _tool(run.mode))
    if _ruleset(run.ns, run.mode) != synced:
        run.problems.append("after the bare deltas and the floor probes the ruleset differs from the full sync's")

    allc = drop_s + readd_s
    parts = _median_parts(splits)
    median = statistics.median(allc)
    bare_median = statistics.median(bare)
    # nftables: the bare delta is the floor (nft's cache and the kernel); iptables: any restore
    floor_s = bare_median if run.is_nft else (floor["add_rule_s"] or 0.0)
    t_fp, _ = _best_of(lambda: rp.fingerprint)
    out = {
        "service": before.spn,
        "change": f"drop endpoint {before.sorted_endpoints()[-1].addr}, then put it back",
        "argv": _cmd(argv),
        "payload_lines": drop.count("\n"),
        "payload_bytes": len(drop),
        "runs_s": [_r(x) for x in allc],
        "median_s": _r(median),
        "drop_median_s": _r(_median(drop_s)),
        "readd_median_s": _r(_median(readd_s)),
        "parts": parts,
        "own_s": _r(median - (parts.get("apply") or 0.0)),
        "bare_runs_s": [_r(x) for x in bare],
        "bare_median_s": _r(bare_median),
        "cpu_median_s": _r(_median(cpu)),
        "bare_cpu_median_s": _r(_median(bare_cpu)),
        "floor": floor,
        "floor_s": _r(floor_s),
        "fingerprint_s": _r(t_fp),
        "state_record": _state_encodings(rp),
    }
    run.log(
        f"  {run.mode.key}: one-service change {median * 1000:.1f} ms (bare delta {bare_median * 1000:.1f} ms, "
        f"floor {floor_s * 1000:.1f} ms; parts {parts})"
    )
    return out


def _change_via_cli(run: _Run, topo: Path, svc_before: Any) -> dict[str, Any]:
    """A one-service change as a user makes it: the topology's targetPort edited, `netlab up` (the
    installed CLI, timed); then put back in-process (proxy.sync, untimed), as `up` would do it."""
    from netlab.kernel import proxy, rules_state

    port = TARGET_PORT + 1
    topo.write_text(topology_yaml(run.n, run.mode, {svc_before.name: port}))
    up = _up(topo, run.log, f"{svc_before.spn} targetPort {port}")
    now = rules_state.load(LAB, NODE)
    svc = next((s for s in now.services if s.spn == svc_before.spn), None) if now else None
    if now is None or svc is None or {e.port for e in svc.endpoints} != {port} or up["steps"] != 1:
        run.problems.append(f"`netlab up` did not plan one sync with targetPort {port} for {svc_before.spn}")
    else:
        if not _endpoints_ok(run.ns, run.mode, svc):
            run.problems.append(f"after `netlab up` the kernel does not show {svc_before.spn} on port {port}")
        proxy.sync(LAB, NODE, run.ns, run.rp, now, ())
        topo.write_text(topology_yaml(run.n, run.mode))
    if not _endpoints_ok(run.ns, run.mode, svc_before):
        run.problems.append(f"after putting {svc_before.spn}'s targetPort back the kernel does not show its endpoints")
    return {"target_port": port, **up}


def run_mode(
    n: int, mode: Mode, topo: Path, positions: dict[str, Any], cfg: dict[str, Any], log: Log
) -> dict[str, Any]:
    from netlab.kernel import netns, rules_state

    ns = _node_ns()
    rp = rules_state.load(LAB, NODE)
    if rp is None or str(rp.mode) != mode.proxy_mode or rp.iptables_backend != mode.backend or len(rp.services) != n:
        raise BenchError(f"after `netlab up` the node's recorded rules are not {mode.key} with {n} services")
    run = _Run(n, mode, ns, netns.path(ns), rp, cfg, log)
    res: dict[str, Any] = {"services": n, "mode": mode.key, "proxy_mode": mode.proxy_mode, "backend": mode.backend}
    # the machine's 1-minute load average when the mode starts and ends (2 CPUs: above 2, other
    # work was waiting for them too, and wall times stretch)
    res["loadavg"] = [round(os.getloadavg()[0], 2)]
    run.problems += _check_exclusive(ns, mode)

    # -- first and last service in KUBE-SERVICES (iptables modes read it; nftables reuses it)
    if not run.is_nft:
        order = kube_services_order(save_tables(ns, _tool(mode).save).get("nat", ""))
        first, last = order[0], order[-1]
        if positions and (positions["first"]["service"], positions["last"]["service"]) != (first[0], last[0]):
            run.problems.append(f"KUBE-SERVICES order differs from the other iptables mode: {first[0]} .. {last[0]}")
        positions.update(
            first={"service": first[0], "ip": first[1], "position": 1},
            last={"service": last[0], "ip": last[1], "position": len(order)},
        )

    # -- 1. the full sync's payload; the same through the same tool elsewhere; nftables what-ifs
    t0 = time.perf_counter()
    argv, payload = _full_payload(run)
    res["render_once_s"] = _r(time.perf_counter() - t0)
    res["payload"] = {"bytes": len(payload), "lines": payload.count("\n"), "argv": _cmd(argv)}
    log(f"  {mode.key}: full-sync payload {len(payload) / 1e6:.1f} MB, {payload.count(chr(10))} lines")
    res["bare"] = _bare_elsewhere(run, argv, payload)
    if run.is_nft:
        res["variants"] = _nft_variants(run)

    # -- 2. full programming against the bare tool in the node (leaves the node synced)
    full, bare_node = _full_vs_bare(run, argv, payload)
    res["full"] = full
    res["bare"].update(bare_node)
    base = statistics.median(res["bare"]["node_s"])
    res["full_ratio"] = _r(full["median_s"] / base, 3)
    # what netlab adds on top of the tool: robust against the kernel's run-to-run spread
    res["overhead_ratio"] = _r(1 + (full["median_s"] - (full["parts"].get("apply") or 0.0)) / base, 3)
    # the same in CPU seconds: robust against other work on the machine
    res["cpu_ratio"] = _r(full["cpu_median_s"] / statistics.median(res["bare"]["node_cpu_s"]), 3)
    log(
        f"  {mode.key}: full sync {full['median_s']:.3f} s (n={len(full['runs_s'])}, {full['parts']}), "
        f"bare {base:.3f} s, ratio {res['full_ratio']}, CPU ratio {res['cpu_ratio']}"
    )

    # -- 3. one-service change
    res["change"] = _change(run)
    before = changed_plans(rp)[0]
    res["change"]["via_cli"] = _change_via_cli(run, topo, before)
    res["cleanup_s"] = _r(_median(run.cleanups))

    # -- 4. latency
    targets = {
        "first": (positions["first"]["ip"], PORT),
        "last": (positions["last"]["ip"], PORT),
        "direct": (cfg["direct_ip"], TARGET_PORT),
    }
    log(f"  {mode.key}: latency, {cfg['connections']} new connections each to first, last, a pod")
    lat = _latency(ns, targets, cfg["connections"])
    for key in ("first", "last"):
        lat[key].update(service=positions[key]["service"], position=positions[key]["position"])
    run.problems += _latency_problems(lat, cfg["connections"])
    res["latency"] = lat
    log(
        f"  {mode.key}: first {lat['first']['median_us']} us, last {lat['last']['median_us']} us, "
        f"direct {lat['direct']['median_us']} us (medians)"
    )
    res["loadavg"].append(round(os.getloadavg()[0], 2))
    res["problems"] = run.problems
    res["ok"] = not run.problems
    return res


# --- the whole run ----------------------------------------------------------------------------


def run_size(n: int, modes: list[Mode], cfg: dict[str, Any], work: Path, log: Log) -> list[dict[str, Any]]:
    if _lab_netns():
        raise BenchError(f"lab {LAB} (namespaces nl-{LAB}-*) already exists; remove it with `netlab down {LAB}`")
    topo = work / f"{LAB}-{n}.yaml"
    results: list[dict[str, Any]] = []
    positions: dict[str, Any] = {}
    try:
        for i, mode in enumerate(modes):
            topo.write_text(topology_yaml(n, mode))
            log(f"N={n}: {mode.key}")
            up = _up(topo, log, f"{n} services, {mode.key}" + (", build the lab" if i == 0 else ", switch mode"))
            if i == 0:
                cfg["direct_ip"] = _pod_ip(f"{WEB}-0")
            res = run_mode(n, mode, topo, positions, cfg, log)
            res["up"] = {"what": "build" if i == 0 else "mode switch", **up}
            results.append(res)
    except BaseException:
        _netlab(["down", LAB])  # the original error is what matters
        raise
    _, r = _netlab(["down", LAB])
    if r.returncode != 0 or _lab_netns():
        raise BenchError(f"`netlab down {LAB}` failed or left namespaces: {(r.stderr or r.stdout).strip()[-300:]}")
    return results


def _targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not runs:
        return []
    top = max(r["services"] for r in runs)
    out = []
    for r in (x for x in runs if x["services"] == top):
        main = r["mode"] in ("iptables", "nftables")
        ratio = r.get("full_ratio")
        out.append(
            {
                "what": "full programming / bare tool (node netns, same payload)",
                "services": top,
                "mode": r["mode"],
                "value": ratio,
                "target": TARGET_FULL_RATIO,
                "met": ratio is not None and ratio <= TARGET_FULL_RATIO,
                "binding": main,
            }
        )
        c = r["change"]
        ch = c["median_s"]
        out.append(
            {
                "what": "one-service change (s)",
                "services": top,
                "mode": r["mode"],
                "value": ch,
                "target": TARGET_CHANGE_S,
                "met": ch is not None and ch <= TARGET_CHANGE_S,
                "binding": main,
                # the same run's floor (iptables: any restore on the node; nftables: the bare
                # delta) and what netlab adds to its own kernel apply
                "floor": c["floor_s"],
                "floor_above_target": c["floor_s"] is not None and c["floor_s"] > TARGET_CHANGE_S,
                "own": c["own_s"],
                "kube_proxy": KUBE_PROXY_CHANGE_S,
            }
        )
        lat = r["latency"]
        first, last = lat["first"]["median_us"], lat["last"]["median_us"]
        if r["proxy_mode"] == "iptables":
            # visibly growing: the last service costs at least 25 us and 25 % more than the first
            met = last - first >= max(25.0, 0.25 * first)
            what = "latency grows with position (last - first, us)"
        else:
            # flat: within 10 us or 10 % of each other
            met = abs(last - first) <= max(10.0, 0.10 * first)
            what = "latency flat (last - first, us)"
        out.append(
            {
                "what": what,
                "services": top,
                "mode": r["mode"],
                "value": round(last - first, 1),
                "target": None,
                "met": met,
                "binding": main,
            }
        )
    return out


def _commit() -> str:
    """The checkout's commit, "+dirty" when netlab/ differs from it (what the numbers belong to)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "netlab"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def services(
    sizes: Iterable[int],
    *,
    connections: int = 300,
    repeat: int = 3,
    cap: float = 10.0,
    changes: int = 5,
    legacy: bool = True,
    log: Log = print,
    command: str = "",
) -> dict[str, Any]:
    """Run the services benchmark; a JSON-ready dict of machine facts, runs and targets."""
    if os.geteuid() != 0:
        from netlab.errors import PrivilegeError

        raise PrivilegeError("`netlab bench services` needs root: it builds a lab and namespaces; run it with sudo")
    sizes = list(sizes)
    modes = [m for m in MODES if legacy or m.backend != "legacy"]
    cfg = {"connections": connections, "repeat": repeat, "cap": cap, "changes": changes}
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="netlab-bench-services-") as tmp:
        for n in sizes:
            runs += run_size(n, modes, cfg, Path(tmp), log)
    return {
        "command": command,
        "machine": {**machine(), "tools": _tool_versions()},
        "commit": _commit(),
        "lab": (
            f"1 node; deployment {WEB} x{REPLICAS} serving {TARGET_PORT}; pod {CLIENT}; "
            f"N services port {PORT} -> {TARGET_PORT}"
        ),
        "sizes": sizes,
        "modes": [m.key for m in modes],
        "connections": connections,
        "warmup": WARMUP,
        "repeat": repeat,
        "cap_s": cap,
        "changes": changes,
        "runs": runs,
        "targets": _targets(runs),
        "total_s": round(time.perf_counter() - t0, 1),
        "ok": all(r["ok"] for r in runs),
    }


# --- output -----------------------------------------------------------------------------------


def _f(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _table(title: str, *columns: str) -> Any:
    from rich.table import Table

    return Table(*columns, box=None, padding=(0, 1, 0, 0), pad_edge=False, title=title)


def print_tables(data: dict[str, Any], console: Any) -> None:
    if not console.is_terminal:  # a file or a pipe gets the tables whole, not wrapped at 80 columns
        from rich.console import Console

        console = Console(file=console.file, width=200, highlight=False, soft_wrap=True)
    m = data["machine"]
    tools = m["tools"]
    console.print(
        f"[bold]services benchmark[/bold]: {data['lab']}; {m['nproc']} CPUs, Linux {m['kernel']}; "
        f"{tools['iptables']}, {tools['nft']}; commit {data.get('commit')}; total {data['total_s']} s"
    )
    t = _table(
        "full programming (s)", "SVC", "MODE", "FULL", "n", "read", "check", "render", "apply", "save", "other",
        "BARE node", "fresh", "RATIO", "OWN", "CPU RATIO", "kube-proxy --noflush",
    )  # fmt: skip
    for r in data["runs"]:
        fp, b = r["full"]["parts"], r["bare"]
        kp = b.get("kube_proxy")
        t.add_row(
            str(r["services"]), r["mode"], _f(r["full"]["median_s"], digits=3), str(len(r["full"]["runs_s"])),
            *(_f(fp.get(k), digits=3) for k in ("read", "check", "render", "apply", "save", "other")),
            _f(_median(b["node_s"]), digits=3), _f(_median(b["fresh_s"]), digits=3),
            _f(r["full_ratio"]), _f(r["overhead_ratio"]), _f(r["cpu_ratio"]),
            _f(_median(kp["node_s"]), digits=3) if kp else "-",
        )  # fmt: skip
    console.print(t)
    t = _table(
        "one-service change (ms)", "SVC", "MODE", "1-SVC", "diff", "prepare", "render", "apply", "save", "other",
        "OWN", "BARE delta", "FLOOR", "CPU", "BARE CPU", "lines", "via netlab up",
    )  # fmt: skip
    for r in data["runs"]:
        c = r["change"]
        cp = c["parts"]
        t.add_row(
            str(r["services"]), r["mode"], _f(c["median_s"], 1000, 1),
            *(_f(cp.get(k), 1000, 1) for k in ("diff", "prepare", "render", "apply", "save", "other")),
            _f(c["own_s"], 1000, 1), _f(c["bare_median_s"], 1000, 1), _f(c["floor_s"], 1000, 1),
            _f(c["cpu_median_s"], 1000, 1), _f(c["bare_cpu_median_s"], 1000, 1),
            str(c["payload_lines"]), _f(c["via_cli"]["wall_s"], 1000, 0) if "via_cli" in c else "-",
        )  # fmt: skip
    console.print(t)
    t = _table(
        "first-connection latency", "SVC", "MODE", "FIRST med µs", "p99", "LAST med µs", "p99", "DIRECT med µs",
        "LAST-FIRST µs", "n",
    )  # fmt: skip
    for r in data["runs"]:
        lat = r["latency"]
        t.add_row(
            str(r["services"]), r["mode"],
            _f(lat["first"]["median_us"], digits=1), _f(lat["first"]["p99_us"], digits=1),
            _f(lat["last"]["median_us"], digits=1), _f(lat["last"]["p99_us"], digits=1),
            _f(lat["direct"]["median_us"], digits=1),
            _f(lat["last"]["median_us"] - lat["first"]["median_us"], digits=1),
            str(lat["first"]["n"]),
        )  # fmt: skip
    console.print(t)
    t = _table("floors, netlab's own costs, what-ifs", "SVC", "MODE", "WHAT", "ms")
    for r in data["runs"]:
        c = r["change"]
        fl = c["floor"]
        rows: list[tuple[str, float | None]] = []
        if "no_cache_s" in fl:
            rows += [
                ("floor: nft -f without a cache (add table)", fl["no_cache_s"]),
                ("floor: nft -f, one rule into a scratch chain", fl["add_rule_s"]),
                ("floor: nft -f, one jump into a scratch chain", fl["add_jump_s"]),
            ]
        else:
            rows += [
                ("floor: one-rule restore into a scratch chain", fl["add_rule_s"]),
                ("floor: the same with a jump", fl["add_jump_s"]),
            ]
        st = c["state_record"]
        rows += [
            ("netlab up: RulesPlan fingerprint (twice per up)", c["fingerprint_s"]),
            ("state record: pickle of the RulesPlan (now)", st["pickle_rulesplan_s"]),
            ("what-if: state record as plain tuples", st["pickle_tuples_s"]),
        ]
        v = r.get("variants")
        if v:
            rows += [
                ("what-if full: endpoint_dispatch=rules (node, after cleanup)", _median(v["rules"]["node_s"])),
                ("what-if full: one named map per service (fresh netns)", _median(v["named_maps"]["fresh_s"])),
            ]
        for what, s in rows:
            t.add_row(str(r["services"]), r["mode"], what, _f(s, 1000, 1))
    console.print(t)
    for q in data["targets"]:
        verdict = "[green]met[/green]" if q["met"] else "[red]missed[/red]"
        tgt = "" if q["target"] is None else f" (target {q['target']})"
        note = "" if q["binding"] else " [dim](informational)[/dim]"
        floor = ""
        if "floor" in q:
            floor = f"; floor {_f(q['floor'], digits=3)}, netlab's own {_f(q['own'], digits=3)}"
        console.print(f"N={q['services']} {q['mode']}: {q['what']} = {q['value']}{tgt}: {verdict}{floor}{note}")
    for r in data["runs"]:
        for p in r["problems"]:
            console.print(f"[red]N={r['services']} {r['mode']}: {p}[/red]")


def check(data: dict[str, Any]) -> None:
    """Raise if any run failed its checks (after the tables are printed)."""
    bad = [f"N={r['services']} {r['mode']}: {p}" for r in data["runs"] for p in r["problems"]]
    if bad:
        raise BenchError("benchmark run failed its checks: " + "; ".join(bad))
