"""`netlab bench services`: how fast netlab programs kube-proxy's rules, and what a packet pays.

For each service count N (default 1000, 5000, 10000) it builds one real lab, `bsvc`: one node,
a deployment `web` of 3 replicas serving TCP 8080, a pod `client`, and N ClusterIP services
`s00000..` with `selector: {app: web}` and port 80 -> 8080, so every service has 3 real
endpoints. The lab comes up with `netlab up` in iptables mode; the other modes are reached by
rewriting `cluster.proxyMode` (and `iptablesBackend`) and running `netlab up` again (the pods
stay): iptables (the system's backend, nft on Debian 12), nftables, iptables with the legacy
backend. The lab is removed (`netlab down`) after each N. In each mode, in this order:

  1. bare tool, the floor: the exact payload a full sync sends (rendered once, in-process) piped
     to `iptables-restore -w 5 --noflush --counters` / `nft -f -` inside the node's netns right
     after `proxy.cleanup`, and inside a fresh empty netns (iptables also without --noflush, for
     reference). nftables also times the same services rendered with endpoint_dispatch="rules"
     and, in a fresh netns, with one *named* map per service instead of the anonymous vmap.
  2. full programming: `proxy.sync(previous=None)` in-process after `proxy.cleanup`, split into
     its parts (render, kernel apply, ...) by wrapping the functions it calls. The payload it
     hands the kernel is checked to be byte-identical to the one timed bare in step 1. Then the
     kernel is checked: N ClusterIP rules / map elements, 3N endpoint chains, the jumps.
  3. one-service change: the middle service loses one endpoint (a RulesPlan with that change),
     `proxy.sync(previous=old)` (kube-proxy's partial sync), then gets it back, alternately,
     `--changes` timed syncs in all. After each, the kernel's chain for that service must jump
     to exactly the planned endpoints' chains. Then the same kind of change as a user makes it:
     the service's targetPort edited in the topology and `netlab up` (wall time; put back untimed).
  4. what-if measurements for the recommendations in docs/benchmarks.md, applied by hand (the
     product code is not changed): the full iptables sync as one whole-table restore without
     --noflush with the jumps in the payload (over the synced node it must leave `iptables-save`
     unchanged, i.e. program exactly what proxy.sync did), a partial payload without the
     unchanged top-level chains, stale chains computed from the previous plan instead of
     `iptables-save`, rendering only the changed service (for nftables checked byte-identical
     to the partial sync's script), a smaller state record, the renderers' chain-name hashing
     without base32 of the whole digest (same output), and the floor any change pays on this
     node (one rule in a scratch chain, with and without a jump).
  5. first-connection latency: from the client pod, `--connections` new TCP connections (after
     20 warm-ups) to the first and to the last service in KUBE-SERVICES (read from the node's
     `iptables-save`, not assumed) and, as the "nothing matched" reference, straight to a web
     pod, interleaved; connect() timed with perf_counter_ns, closed with RST. Checked: replies
     come from web-0/1/2 through both ClusterIPs, and the node's conntrack holds at least one
     new entry per connection (so each one went through the nat rules).

Full programming and bare timings repeat `--repeat` times but stop once their runs add up to
`--cap` seconds (iptables-nft at 10k takes about a minute a run); the count is in the results.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import statistics
import subprocess  # noqa: TID251 - a benchmark drives the CLI and the kernel tools as processes
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from netlab.bench import BenchError, machine, netlab_argv

__all__ = ["MODES", "parse_sizes", "print_tables", "services", "topology_yaml"]

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
BUILTIN_CHAINS = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}

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


def _repeat(fn: Callable[[], float], repeat: int, cap: float) -> list[float]:
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


class _Parts:
    """While active, wraps the functions proxy.sync calls (module attributes, restored on exit)
    and adds up the seconds spent in each group; records the payloads handed to the kernel.
    Only the outermost wrapped call counts (cleanup calls apply_iptables, for instance)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.payloads: list[str] = []
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def _targets(self) -> list[tuple[Any, str, str, int | None]]:
        from netlab.kernel import proxy, rules, rules_state
        from netlab.render import iptables as ri
        from netlab.render import nftables as rn

        return [
            (rules, "iptables_chains", "read", None),
            (rules, "apply_iptables", "apply", 2),
            (rules, "apply_nft", "apply", 1),
            (proxy, "ensure_jumps", "jumps", None),
            (ri, "service_chains", "prepare", None),
            (rn, "nft_state", "prepare", None),
            (ri, "render_iptables", "render", None),
            (rn, "render_nftables", "render", None),
            (rules_state, "save", "save", None),
        ]

    def _wrap(self, fn: Callable[..., Any], part: str, capture: int | None) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            if capture is not None:
                self.payloads.append(args[capture])
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0
                self._depth -= 1

        return wrapper

    def __enter__(self) -> _Parts:
        for mod, attr, part, capture in self._targets():
            orig = getattr(mod, attr)
            self._saved.append((mod, attr, orig))
            setattr(mod, attr, self._wrap(orig, part, capture))
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, attr, orig in reversed(self._saved):
            setattr(mod, attr, orig)
        self._saved.clear()


PART_ORDER = ("read", "prepare", "render", "apply", "jumps", "save", "other")


def _timed_sync(ns: str, rp: Any, previous: Any) -> tuple[float, dict[str, float], list[str]]:
    from netlab.kernel import proxy

    with _Parts() as parts:
        t0 = time.perf_counter()
        proxy.sync(LAB, NODE, ns, rp, previous, ())
        total = time.perf_counter() - t0
    split = dict(parts.seconds)
    split["other"] = max(0.0, total - sum(split.values()))
    return total, split, parts.payloads


def _median_parts(splits: list[dict[str, float]]) -> dict[str, float | None]:
    return {k: _r(_median(s.get(k, 0.0) for s in splits)) for k in PART_ORDER if any(k in s for s in splits)}


# --- the kernel: reading back -------------------------------------------------------------------


def _tool(mode: Mode) -> Any:
    from netlab.kernel import rules

    return rules.IptablesTool(mode.backend)


def _save_tables(ns: str, save_bin: str) -> dict[str, str]:
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


def _kube_services(nat: str) -> list[tuple[str, str, int, str]]:
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
    nft_ipt = _save_tables(ns, "iptables-nft-save").get("nat", "")
    legacy = _save_tables(ns, "iptables-legacy-save").get("nat", "")
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
    tables = _save_tables(ns, _tool(mode).save)
    nat = tables.get("nat", "")
    svc = _kube_services(nat)
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


def _iptables_floor(ns_path: str, tool: Any) -> dict[str, float | None]:
    """What any change costs on this node: a one-rule restore into a scratch chain, with a plain
    verdict and with a jump. With the nft backend the kernel then validates every chain reachable
    from the base chains (nft_table_validate), i.e. all of kube-proxy's rules; with legacy the
    whole table blob is replaced. The scratch chain is deleted after each run."""
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


def _conntrack_count(ns: str, ip: str) -> int:
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
            "conntrack_entries": _conntrack_count(ns, ip),
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


# --- what-if payloads (the recommendations, applied by hand) -----------------------------------


def _quote(args: list[str]) -> str:
    return " ".join(f'"{a}"' if " " in a else a for a in args)


def whole_table_payload(payload: str, jumps: list[tuple[str, str, list[str]]]) -> str:
    """The full-sync payload as a whole-table restore (no --noflush): the builtin chains declared
    (policy ACCEPT) and holding the jump rules in the order ensure_jumps leaves them (each is
    prepended, so reversed), so one atomic restore leaves exactly what restore + ensure_jumps do."""
    per_chain: dict[tuple[str, str], list[list[str]]] = defaultdict(list)
    for table, chain, args in jumps:
        per_chain[(table, chain)].insert(0, args)
    out: list[str] = []
    table = ""
    for line in payload.splitlines():
        if line.startswith("*"):
            table = line[1:]
            out.append(line)
            out += [f":{c} ACCEPT [0:0]" for c in BUILTIN_CHAINS.get(table, ())]
        elif line == "COMMIT":
            for c in BUILTIN_CHAINS.get(table, ()):
                out += [f"-A {c} {_quote(args)}" for args in per_chain[(table, c)]]
            out.append(line)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def minimal_partial_payload(payload: str) -> str:
    """A partial-sync payload without the top-level chains and the filter table (for a change
    that leaves them as they are): only the service chains' declarations, rules and deletions."""
    from netlab.render import iptables as ri

    out: list[str] = []
    table = ""
    for line in payload.splitlines():
        if line.startswith("*"):
            table = line[1:]
        if table != "nat":
            continue
        if line.startswith("*") or line == "COMMIT":
            out.append(line)
        elif line.startswith(":"):
            if ri.is_service_chain(line[1:].split(" ", 1)[0]):
                out.append(line)
        elif ri.is_service_chain(line.split(" ", 2)[1]):
            out.append(line)
    return "\n".join(out) + "\n"


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


@contextlib.contextmanager
def _short_hashes() -> Iterator[None]:
    """The renderers' chain-name hashes with base32 of only the digest bytes they keep (10 bytes
    = the 16 characters iptables uses, 5 bytes = nftables' 8) and a per-render cache; the names
    are identical. Patched in-process, restored on exit."""
    import base64
    import functools
    import hashlib

    from netlab.render import iptables as ri
    from netlab.render import nftables as rn

    @functools.cache
    def port_proto_hash(spn: str, proto: str) -> str:
        return base64.b32encode(hashlib.sha256((spn + proto).encode()).digest()[:10]).decode()

    @functools.cache
    def endpoint_chain(spn: str, proto: str, endpoint: str) -> str:
        digest = hashlib.sha256((spn + proto + endpoint).encode()).digest()[:10]
        return ri.SEP_PREFIX + base64.b32encode(digest).decode()

    @functools.cache
    def hash_and_truncate(name: str) -> str:
        out = f"{base64.b32encode(hashlib.sha256(name.encode()).digest()[:5]).decode()}-{name}"
        return out if len(out) <= rn._NAME_BASE_MAX else out[: rn._NAME_BASE_MAX - 3] + "..."

    saved = (ri.port_proto_hash, ri.endpoint_chain, rn.hash_and_truncate)
    ri.port_proto_hash, ri.endpoint_chain, rn.hash_and_truncate = port_proto_hash, endpoint_chain, hash_and_truncate
    try:
        yield
    finally:
        ri.port_proto_hash, ri.endpoint_chain, rn.hash_and_truncate = saved
        for f in (port_proto_hash, endpoint_chain, hash_and_truncate):
            f.cache_clear()


def _best_of(fn: Callable[[], Any], n: int = 3) -> tuple[float, Any]:
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


def _changed_plans(rp: Any) -> tuple[Any, Any, Any]:
    """(the changed service before, after, the RulesPlan with it): the middle service by name
    loses its last endpoint."""
    ordered = sorted(rp.services, key=lambda s: (s.namespace, s.name))
    svc = ordered[len(ordered) // 2]
    eps = svc.sorted_endpoints()
    changed = replace(svc, endpoints=tuple(e for e in svc.endpoints if e != eps[-1]))
    return svc, changed, replace(rp, services=tuple(changed if s == svc else s for s in rp.services))


def run_mode(
    n: int, mode: Mode, topo: Path, positions: dict[str, Any], cfg: dict[str, Any], log: Log
) -> dict[str, Any]:
    from netlab.kernel import netns, proxy, rules_state
    from netlab.render import iptables as ri
    from netlab.render import nftables as rn

    ns = _node_ns()
    ns_path = netns.path(ns)
    rp = rules_state.load(LAB, NODE)
    res: dict[str, Any] = {"services": n, "mode": mode.key, "proxy_mode": mode.proxy_mode, "backend": mode.backend}
    problems: list[str] = []
    if rp is None or str(rp.mode) != mode.proxy_mode or rp.iptables_backend != mode.backend or len(rp.services) != n:
        raise BenchError(f"after `netlab up` the node's recorded rules are not {mode.key} with {n} services")
    problems += _check_exclusive(ns, mode)
    is_nft = mode.proxy_mode == "nftables"
    tool = _tool(mode)
    repeat, cap = cfg["repeat"], cfg["cap"]

    cleanups: list[float] = []

    def clean() -> None:
        t0 = time.perf_counter()
        proxy.cleanup(ns, mode.kind, previous_backend=mode.backend)
        cleanups.append(time.perf_counter() - t0)

    # -- first and last service in KUBE-SERVICES (iptables modes read it; nftables reuses it)
    if not is_nft:
        order = _kube_services(_save_tables(ns, tool.save).get("nat", ""))
        first, last = order[0], order[-1]
        if positions and (positions["first"]["service"], positions["last"]["service"]) != (first[0], last[0]):
            problems.append(f"KUBE-SERVICES order differs from the other iptables mode: {first[0]} .. {last[0]}")
        positions.update(
            first={"service": first[0], "ip": first[1], "position": 1},
            last={"service": last[0], "ip": last[1], "position": len(order)},
        )

    # -- 1. bare tool, same payload
    t0 = time.perf_counter()
    if is_nft:
        payload = NFT_PREFIX + rn.render_nftables(rp.context, rp.services)
        argv = ["nft", "-f", "-"]
    else:
        payload = ri.render_iptables(rp.context, rp.services)
        argv = [tool.restore, "-w", "5", "--noflush", "--counters"]
    res["render_once_s"] = _r(time.perf_counter() - t0)
    res["payload"] = {"bytes": len(payload), "lines": payload.count("\n"), "argv": " ".join(argv)}
    log(f"  {mode.key}: payload {len(payload) / 1e6:.1f} MB, {payload.count(chr(10))} lines; bare in the node netns")

    def bare_node(text: str = payload, args: list[str] = argv) -> Callable[[], float]:
        def one() -> float:
            clean()
            return _timed_tool(ns_path, args, text)

        return one

    bare: dict[str, Any] = {"node_s": _repeat(bare_node(), repeat, cap)}
    variants: dict[str, Any] = {}
    exp: dict[str, Any] = {}
    if is_nft:
        t0 = time.perf_counter()
        rules_script = NFT_PREFIX + rn.render_nftables(rp.context, rp.services, endpoint_dispatch="rules")
        variants["rules"] = {"render_s": _r(time.perf_counter() - t0), "bytes": len(rules_script)}
        variants["rules"]["node_s"] = _repeat(bare_node(rules_script), repeat, cap)
    else:
        whole = whole_table_payload(payload, ri.jump_rules(rp.context))
        whole_argv = [tool.restore, "-w", "5", "--counters"]
        exp["whole_table"] = {"argv": " ".join(whole_argv), "bytes": len(whole)}
    log(f"  {mode.key}: bare in a fresh netns")

    def bare_fresh(text: str, args: list[str]) -> Callable[[], float]:
        def one() -> float:
            with _fresh_netns() as path:
                return _timed_tool(path, args, text)

        return one

    bare["fresh_s"] = _repeat(bare_fresh(payload, argv), repeat, cap)
    if is_nft:
        variants["rules"]["fresh_s"] = _repeat(bare_fresh(rules_script, argv), repeat, cap)
        named = named_map_script(payload)
        variants["named_maps"] = {"bytes": len(named), "fresh_s": _repeat(bare_fresh(named, argv), 1, cap)}
    else:
        flush_argv = [tool.restore, "-w", "5", "--counters"]
        bare["fresh_no_noflush_s"] = _repeat(bare_fresh(payload, flush_argv), repeat, cap)
        exp["whole_table"]["fresh_s"] = _repeat(bare_fresh(whole, whole_argv), repeat, cap)
    res["bare"] = bare

    # -- 2. full programming: proxy.sync(previous=None) after cleanup
    log(f"  {mode.key}: full sync (proxy.sync, previous=None) after cleanup")
    splits: list[dict[str, float]] = []

    def full() -> float:
        clean()
        total, split, payloads = _timed_sync(ns, rp, None)
        splits.append(split)
        if payloads != [payload]:
            problems.append("the full sync's payload differs from the one timed bare")
        return total

    full_runs = _repeat(full, repeat, cap)
    res["full"] = {
        "runs_s": [_r(x) for x in full_runs],
        "median_s": _r(_median(full_runs)),
        "parts": _median_parts(splits),
    }
    bad = _check_full(ns, mode, rp)
    if bad:
        problems.append(f"after the full sync: {bad}")
    base = statistics.median(bare["node_s"])
    res["full_ratio"] = _r(statistics.median(full_runs) / base, 3)
    # what netlab adds on top of the tool: robust against the kernel's run-to-run spread
    own = statistics.median(full_runs) - (res["full"]["parts"].get("apply") or 0.0)
    res["overhead_ratio"] = _r(1 + own / base, 3)
    log(
        f"  {mode.key}: full sync {statistics.median(full_runs):.3f} s (n={len(full_runs)}), bare {base:.3f} s, "
        f"ratio {res['full_ratio']}"
    )

    # -- 4a. whole-table restore over the synced node (a resync). It replaces filter and nat
    # entirely, so an unchanged `iptables-save` proves it programs exactly what proxy.sync did.
    if not is_nft:
        synced = _normalized(_save_tables(ns, tool.save))
        exp["whole_table"]["over_synced_s"] = [_timed_tool(ns_path, whole_argv, whole) for _ in range(min(repeat, 2))]
        same = _normalized(_save_tables(ns, tool.save)) == synced
        exp["whole_table"]["equal_to_sync"] = same
        if not same:
            problems.append("the whole-table restore left a different ruleset than proxy.sync")

    # -- 3. one-service change, partial sync, each way
    before, after, rp_drop = _changed_plans(rp)
    res_change: dict[str, Any] = {
        "service": before.spn,
        "change": f"drop endpoint {before.sorted_endpoints()[-1].addr}, then put it back",
    }
    log(f"  {mode.key}: {cfg['changes']} x one-service change ({before.spn}) and back")
    drop_s: list[float] = []
    readd_s: list[float] = []
    csplits: list[dict[str, float]] = []
    partial_payloads: list[str] = []
    steps = ((rp_drop, rp, drop_s, after), (rp, rp_drop, readd_s, before))
    # `changes` timed syncs, alternating drop / put back; an odd count ends with an untimed put-back
    for i in range(cfg["changes"] + cfg["changes"] % 2):
        target, prev, store, want = steps[i % 2]
        total, split, payloads = _timed_sync(ns, target, prev)
        if i < cfg["changes"]:
            store.append(total)
            csplits.append(split)
            partial_payloads.append(payloads[0] if payloads else "")
        if not _endpoints_ok(ns, mode, want):
            problems.append(f"after a one-service change the kernel does not show {before.spn}'s endpoints")
    allc = drop_s + readd_s
    res_change.update(
        runs_s=[_r(x) for x in allc],
        median_s=_r(_median(allc)),
        drop_median_s=_r(_median(drop_s)),
        readd_median_s=_r(_median(readd_s)),
        parts=_median_parts(csplits),
        payload_lines=partial_payloads[0].count("\n"),
    )
    res["change"] = res_change
    log(f"  {mode.key}: one-service change median {statistics.median(allc) * 1000:.1f} ms ({res_change['parts']})")

    # -- 4b. what a partial sync could cost
    state = _state_encodings(rp)
    if not is_nft:
        spn = before.spn
        old_sub = ri.service_chains(rp.context, [before])["nat"]
        t0 = time.perf_counter()
        stale_sub = sorted(c for c in old_sub - ri.service_chains(rp.context, [after])["nat"] if ri.is_service_chain(c))
        t_stale = time.perf_counter() - t0
        stale_full = ri.stale_chains(rp.context, rp_drop.services, ri.service_chains(rp.context, rp.services)["nat"])
        if stale_sub != stale_full:
            problems.append(f"stale chains from the changed service {stale_sub} != from all services {stale_full}")
        top_same = ri.render_iptables(rp.context, rp.services, only=()) == ri.render_iptables(
            rp_drop.context, rp_drop.services, only=()
        )
        t_render_sub, _ = _best_of(lambda: ri.render_iptables(rp.context, [after], stale=stale_sub))
        drop_min = minimal_partial_payload(
            ri.render_iptables(rp.context, rp_drop.services, only={spn}, stale=stale_sub)
        )
        readd_min = minimal_partial_payload(ri.render_iptables(rp.context, rp.services, only={spn}))
        mins: list[float] = []
        if not top_same:
            problems.append("the one-service change altered a top-level chain; the minimal payload does not apply")
        for i in range(cfg["changes"] + cfg["changes"] % 2 if top_same else 0):
            text, want = (drop_min, after) if i % 2 == 0 else (readd_min, before)
            dt = _timed_tool(ns_path, argv, text)
            if i < cfg["changes"]:
                mins.append(dt)
            if not _endpoints_ok(ns, mode, want):
                problems.append("a minimal partial payload did not leave the service's endpoints as planned")
        apply_min = _median(mins) or 0.0
        exp["partial"] = {
            "top_level_unchanged": top_same,
            "payload_lines": drop_min.count("\n"),
            "apply_min_s": _r(apply_min),
            "apply_min_runs_s": [_r(x) for x in mins],
            "stale_from_plans_s": _r(t_stale, 6),
            "render_changed_only_s": _r(t_render_sub),
            **state,
            "projected_s": _r(t_stale + t_render_sub + apply_min + (state["pickle_tuples_s"] or 0.0)),
        }
        if _normalized(_save_tables(ns, tool.save)) != synced:
            problems.append("after the partial syncs and the minimal payloads the ruleset is not the synced one")
        exp["floor"] = _iptables_floor(ns_path, tool)
    else:
        # the delta rendered from the changed service alone, on both sides
        t_sub, script_sub = _best_of(
            lambda: rn.render_nftables(rp.context, [after], previous=rn.nft_state(rp.context, [before]))
        )
        exp["partial"] = {
            "render_changed_only_s": _r(t_sub),
            "same_script": script_sub == partial_payloads[0],
            **state,
        }
        probe = (
            "add chain ip kube-proxy bench-probe\nadd rule ip kube-proxy bench-probe counter\n"
            "flush chain ip kube-proxy bench-probe\ndelete chain ip kube-proxy bench-probe\n"
        )
        jump = probe.replace("bench-probe counter", "bench-probe jump mark-for-masquerade")
        exp["floor"] = {
            "no_cache_s": _r(_median(_timed_tool(ns_path, argv, "add table ip kube-proxy\n") for _ in range(5))),
            "add_rule_s": _r(_median(_timed_tool(ns_path, argv, probe) for _ in range(5))),
            "add_jump_s": _r(_median(_timed_tool(ns_path, argv, jump) for _ in range(5))),
        }
        apply_now = res_change["parts"].get("apply") or 0.0
        exp["partial"]["projected_s"] = _r(t_sub + apply_now + (state["pickle_tuples_s"] or 0.0))
        if not exp["partial"]["same_script"]:
            problems.append(
                "the nftables delta rendered from the changed service alone differs from the partial sync's"
            )

    # -- 4c. render cost with the shorter hashing (same output)
    def fn() -> str:
        return rn.render_nftables(rp.context, rp.services) if is_nft else ri.render_iptables(rp.context, rp.services)

    t_now, out_now = _best_of(fn, 2)

    def fresh_cache() -> Any:
        with _short_hashes():
            return fn()

    t_short, out_short = _best_of(fresh_cache, 2)
    exp["render_hash"] = {"now_s": _r(t_now), "short_s": _r(t_short), "same_output": out_now == out_short}
    if out_now != out_short:
        problems.append("render with the shorter hashing differs")
    res["variants"] = variants
    res["experiments"] = exp
    res["cleanup_s"] = _r(_median(cleanups))

    # -- 3b. a one-service change as a user makes it: edit the topology's targetPort, `netlab up`
    # (the installed CLI, timed); then back in-process (proxy.sync, untimed), as `up` would do it
    port = TARGET_PORT + 1
    topo.write_text(topology_yaml(n, mode, {before.name: port}))
    up = _up(topo, log, f"{before.spn} targetPort {port}")
    now = rules_state.load(LAB, NODE)
    svc = next((s for s in now.services if s.spn == before.spn), None) if now else None
    if now is None or svc is None or {e.port for e in svc.endpoints} != {port} or up["steps"] != 1:
        problems.append(f"`netlab up` did not plan one sync with targetPort {port} for {before.spn}")
    else:
        if not _endpoints_ok(ns, mode, svc):
            problems.append(f"after `netlab up` the kernel does not show {before.spn} on port {port}")
        proxy.sync(LAB, NODE, ns, rp, now, ())
        topo.write_text(topology_yaml(n, mode))
    if not _endpoints_ok(ns, mode, before):
        problems.append(f"after putting {before.spn}'s targetPort back the kernel does not show its endpoints")
    res["change"]["via_cli"] = {"target_port": port, **up}

    # -- 5. latency
    targets = {
        "first": (positions["first"]["ip"], PORT),
        "last": (positions["last"]["ip"], PORT),
        "direct": (cfg["direct_ip"], TARGET_PORT),
    }
    log(f"  {mode.key}: latency, {cfg['connections']} new connections each to first, last, a pod")
    lat = _latency(ns, targets, cfg["connections"])
    for key in ("first", "last"):
        lat[key].update(service=positions[key]["service"], position=positions[key]["position"])
    problems += _latency_problems(lat, cfg["connections"])
    res["latency"] = lat
    log(
        f"  {mode.key}: first {lat['first']['median_us']} us, last {lat['last']['median_us']} us, "
        f"direct {lat['direct']['median_us']} us (medians)"
    )
    res["problems"] = problems
    res["ok"] = not problems
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
        ch = r["change"]["median_s"]
        out.append(
            {
                "what": "one-service change (s)",
                "services": top,
                "mode": r["mode"],
                "value": ch,
                "target": TARGET_CHANGE_S,
                "met": ch is not None and ch <= TARGET_CHANGE_S,
                "binding": main,
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


def print_tables(data: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    m = data["machine"]
    tools = m["tools"]
    console.print(
        f"[bold]services benchmark[/bold]: {data['lab']}; {m['nproc']} CPUs, Linux {m['kernel']}; "
        f"{tools['iptables']}, {tools['nft']}; total {data['total_s']} s"
    )
    t = Table(
        "SVC", "MODE", "FULL s", "n", "render", "apply", "jumps", "BARE node", "fresh", "RATIO", "OWN",
        box=None, padding=(0, 1, 0, 0), pad_edge=False, title="full programming (s)",
    )  # fmt: skip
    for r in data["runs"]:
        fp = r["full"]["parts"]
        t.add_row(
            str(r["services"]), r["mode"], _f(r["full"]["median_s"], digits=3), str(len(r["full"]["runs_s"])),
            _f(fp.get("render")), _f(fp.get("apply")), _f(fp.get("jumps")),
            _f(_median(r["bare"]["node_s"]), digits=3), _f(_median(r["bare"]["fresh_s"]), digits=3),
            _f(r["full_ratio"]), _f(r["overhead_ratio"]),
        )  # fmt: skip
    console.print(t)
    t = Table(
        "SVC", "MODE", "1-SVC", "read", "prepare", "render", "apply", "save", "via netlab up",
        box=None, padding=(0, 1, 0, 0), pad_edge=False, title="one-service change (ms)",
    )  # fmt: skip
    for r in data["runs"]:
        c = r["change"]
        cp = c["parts"]
        cli = _f(c["via_cli"]["wall_s"], 1000, 0) if "via_cli" in c else ""
        t.add_row(
            str(r["services"]), r["mode"], _f(c["median_s"], 1000, 1), _f(cp.get("read"), 1000, 0),
            _f(cp.get("prepare"), 1000, 0), _f(cp.get("render"), 1000, 0), _f(cp.get("apply"), 1000, 0),
            _f(cp.get("save"), 1000, 0), cli or "-",
        )  # fmt: skip
    console.print(t)
    t = Table(
        "SVC", "MODE", "FIRST med µs", "p99", "LAST med µs", "p99", "DIRECT med µs", "LAST-FIRST µs", "n",
        box=None, padding=(0, 1, 0, 0), pad_edge=False, title="first-connection latency",
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
    t = Table("SVC", "MODE", "WHAT-IF", "s", box=None, padding=(0, 1, 0, 0), pad_edge=False, title="what-if (by hand)")
    for r in data["runs"]:
        e, v = r["experiments"], r["variants"]
        rows: list[tuple[str, float | None]] = []
        if "whole_table" in e:
            w = e["whole_table"]
            rows += [
                ("full: whole-table restore, jumps in payload (fresh netns)", _median(w["fresh_s"])),
                ("full: whole-table restore over the synced node", _median(w["over_synced_s"])),
                ("bare fresh netns without --noflush (reference)", _median(r["bare"]["fresh_no_noflush_s"])),
            ]
        if "rules" in v:
            rows += [
                ("full: endpoint_dispatch=rules (node, after cleanup)", _median(v["rules"]["node_s"])),
                ("full: one named map per service (fresh netns)", _median(v["named_maps"]["fresh_s"])),
            ]
        p = e["partial"]
        if "apply_min_s" in p:
            rows.append(("1-svc: kernel apply without unchanged top-level chains", p["apply_min_s"]))
        rows += [
            ("1-svc: render only the changed service", p["render_changed_only_s"]),
            ("1-svc: state record as tuples (now: pickle of RulesPlan)", p["pickle_tuples_s"]),
            ("1-svc: projected total", p["projected_s"]),
        ]
        f = e.get("floor", {})
        if "no_cache_s" in f:
            rows.append(("floor: nft -f without a cache (add table)", f["no_cache_s"]))
        rows += [
            ("floor: one rule into a scratch chain, plain verdict", f.get("add_rule_s")),
            ("floor: one rule into a scratch chain, a jump", f.get("add_jump_s")),
        ]
        rows.append(
            (
                f"full render with 10-byte base32 hashing (now {e['render_hash']['now_s']:.3f} s)",
                e["render_hash"]["short_s"],
            )
        )
        for what, s in rows:
            t.add_row(str(r["services"]), r["mode"], what, _f(s, digits=3))
    console.print(t)
    for q in data["targets"]:
        verdict = "[green]met[/green]" if q["met"] else "[red]missed[/red]"
        tgt = "" if q["target"] is None else f" (target {q['target']})"
        note = "" if q["binding"] else " [dim](informational)[/dim]"
        console.print(f"N={q['services']} {q['mode']}: {q['what']} = {q['value']}{tgt}: {verdict}{note}")
    for r in data["runs"]:
        for p in r["problems"]:
            console.print(f"[red]N={r['services']} {r['mode']}: {p}[/red]")


def check(data: dict[str, Any]) -> None:
    """Raise if any run failed its checks (after the tables are printed)."""
    bad = [f"N={r['services']} {r['mode']}: {p}" for r in data["runs"] for p in r["problems"]]
    if bad:
        raise BenchError("benchmark run failed its checks: " + "; ".join(bad))
