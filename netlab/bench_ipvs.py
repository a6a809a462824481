"""`netlab bench ipvs` / `python -m netlab.bench_ipvs`: IPVS mode's programming cost against
ipvsadm and against the iptables and nftables modes, all in one kernel (docs/benchmarks.md,
"IPVS (inside the VM tier)").

The host kernels netlab is developed on have no IPVS, so this runs inside the VM tier:

    sudo .venv/bin/netlab vm -- python -m netlab.bench_ipvs --services 100,1000

For each service count N: N ClusterIP services `default/s00000..`, TCP port 80 -> 8080, each with
the same 3 endpoints (10.244.0.2-4, on this node), as RulesPlans built here (no lab, no pods:
what is timed is the node's programming). Every measurement runs in a fresh, empty netns of
its own (`bench_services._fresh_netns`, with lo up and eth0 172.18.0.2/24 plus a default route:
IPVS refuses a real server without a unicast route to it), in this order:

  1. ipvs full: `proxy_ipvs.sync_ipvs` into the empty netns (it makes kube-ipvs0, the ipsets,
     the IPVS table, the addresses and the fixed iptables rules), split into its parts by
     wrapping the functions it calls; "ipvs_table" is the netlink part (opening the socket and
     looking up the IPVS family, reading the empty table, queueing the virtual and real
     servers, the batched commit). Checked: N virtual servers and 3N real servers read back.
  2. the floor: the same virtual/real-server table as `ipvsadm --restore` lines (`-A -t VIP:80
     -s rr`, `-a -t VIP:80 -r EP:8080 -m -w 1`) through nsenter + ipvsadm; and, timed apart, the
     dummy link plus its N /32s through one `ip -batch -` and the ipsets through one `ipset
     restore` (ipvsadm only does the IPVS table). Like for like: ipvs_table vs ipvsadm.
  3. iptables and nftables full: `proxy.sync(previous=None)` of the same services in those modes.
  4. one-service change: the middle service loses one endpoint, then gets it back (`--changes`
     syncs, alternating), in each mode, on the node its full sync left; median seconds. Each is
     given the previous plan, so it is a partial sync in every mode (IPVS: from the record,
     reading back only the changed virtual server's real servers). Checked for IPVS: each
     change was partial, and after the last one the table equals the full sync's render.

JSON goes to stdout on one line starting with `BENCH-IPVS-JSON ` (the VM's files live in its
RAM), and to --out if given; the tables go to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess  # noqa: TID251 - a benchmark drives the kernel tools as processes
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from netlab.bench import BenchError, machine
from netlab.bench_services import (
    BARE_NETNS,
    _fresh_netns,
    _ns_run,
    _r,
    _timed_tool,
    _tool_versions,
    changed_plans,
    parse_sizes,
    repeat_capped,
    service_name,
)
from netlab.plan.model import RulesPlan
from netlab.render.model import Endpoint, NodeContext, ServicePort
from netlab.topology.schema import Protocol, ProxyMode

__all__ = ["build_plan", "ipvsadm_restore", "main", "run"]

LAB = "bipvs"
NODE = "node1"
NS = BARE_NETNS  # _fresh_netns makes and deletes this name
PORT = 80
TARGET_PORT = 8080
ENDPOINTS = tuple(Endpoint(IPv4Address(f"10.244.0.{i}"), TARGET_PORT, NODE, f"default/web-{i - 2}") for i in (2, 3, 4))
CTX = NodeContext(NODE, (IPv4Address("172.18.0.2"),), IPv4Network("10.244.0.0/16"), (IPv4Network("10.96.0.0/12"),))
SERVICE_BASE = int(IPv4Address("10.96.0.0")) + 10
JSON_MARK = "BENCH-IPVS-JSON "
MODES = ("ipvs", "iptables", "nftables")


def build_plan(n: int, mode: ProxyMode) -> RulesPlan:
    """n ClusterIP services, TCP 80 -> 8080, each with the same 3 local endpoints."""
    services = tuple(
        ServicePort(
            "default",
            service_name(i, n),
            "",
            Protocol.TCP,
            IPv4Address(SERVICE_BASE + i),
            PORT,
            endpoints=ENDPOINTS,
        )
        for i in range(n)
    )
    return RulesPlan(mode, "auto", CTX, services)


def ipvsadm_restore(rp: RulesPlan) -> str:
    """The IPVS table of `rp` as `ipvsadm --restore` input (what `ipvsadm -Sn` prints)."""
    from netlab.render.ipvs import render_ipvs

    state = render_ipvs(rp.context, rp.services, nodeport_addresses=())
    flag = {"TCP": "-t", "UDP": "-u"}
    out: list[str] = []
    for v in state.virtual_servers:
        out.append(f"-A {flag[v.protocol]} {v.addr} -s {v.scheduler}" + (f" -p {v.timeout}" if v.persistent else ""))
        out += [f"-a {flag[v.protocol]} {v.addr} -r {r.addr} -m -w {r.weight}" for r in v.real_servers]
    return "".join(line + "\n" for line in out)


NODE_SETUP = (
    "link set lo up\n"
    "link add eth0 type veth peer name eth1\n"
    "link set eth1 up\n"
    "address add 172.18.0.2/24 dev eth0\n"
    "link set eth0 up\n"
    "route add default via 172.18.0.1\n"
)


@contextmanager
def _node_netns() -> Iterator[str]:
    """A fresh netns with a node's minimum: lo up, eth0 172.18.0.2/24 (a veth, its peer eth1
    beside it) and a default route via it.
    IPVS refuses a real server whose address has no unicast route (ip_vs_new_dest: EINVAL,
    "address not unicast"), so an empty netns takes the virtual servers but none of their real
    servers. Set up before any timing, the same for every mode and for the floors."""
    with _fresh_netns() as path:
        r = subprocess.run(["ip", "-n", NS, "-batch", "-"], input=NODE_SETUP, capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"setting up {NS} failed: {r.stderr.strip()}")
        yield path


# --- timing sync_ipvs by its parts --------------------------------------------------------------


@contextmanager
def _ipvs_parts() -> Iterator[dict[str, float]]:
    """While active, adds up the seconds sync_ipvs spends in each of its steps (none nest)."""
    from netlab.kernel import ipset, proxy_ipvs, rules
    from netlab.kernel import ipvs as kipvs

    seconds: dict[str, float] = defaultdict(float)
    targets: list[tuple[Any, str, str]] = [
        (kipvs.Ipvs, "__init__", "ipvs_table"),  # the socket, the family lookup (ipvsadm does both too)
        (proxy_ipvs, "_diff_ipvs", "ipvs_table"),  # dump the table, queue the changes
        (proxy_ipvs, "_diff_ipvs_partial", "ipvs_table"),  # a partial sync's: queue, dump changed ones
        (kipvs.Ipvs, "commit", "ipvs_table"),  # the netlink batches
        (kipvs, "addresses", "dummy_link"),  # make kube-ipvs0, read the addresses
        (kipvs, "set_addresses", "addresses"),  # bind the ClusterIPs (rtnetlink batch)
        (kipvs, "write_sysctls", "sysctls"),
        (proxy_ipvs, "render_ipvs", "render"),
        (proxy_ipvs, "render_ipvs_delta", "render"),
        (ipset, "save", "ipsets"),
        (ipset, "restore", "ipsets"),
        (rules, "iptables_save", "iptables"),
        (rules, "apply_iptables", "iptables"),
    ]
    saved = []

    def wrap(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - t0

        return wrapper

    for obj, attr, part in targets:
        orig = obj.__dict__[attr]
        saved.append((obj, attr, orig))
        setattr(obj, attr, wrap(orig, part))
    try:
        yield seconds
    finally:
        for obj, attr, orig in reversed(saved):
            setattr(obj, attr, orig)


# --- the measurements ---------------------------------------------------------------------------


def _ipvs_counts() -> tuple[int, int]:
    from netlab.kernel import ipvs as kipvs

    with kipvs.opened(NS) as ipvs:
        table = ipvs.services()
    return len(table), sum(len(v.real_servers) for v in table)


def _ipvs_table() -> list[tuple[Any, ...]]:
    """The kernel's IPVS table in NS as comparable tuples (key, config, real servers and weights)."""
    from netlab.kernel import ipvs as kipvs

    with kipvs.opened(NS) as ipvs:
        table = ipvs.services()
    return sorted(
        (v.key, v.scheduler, v.flags, v.timeout, tuple(sorted((r.ip, r.port, r.weight) for r in v.real_servers)))
        for v in table
    )


def _rendered_table(rp: RulesPlan) -> list[tuple[Any, ...]]:
    from netlab.render.ipvs import render_ipvs

    state = render_ipvs(rp.context, rp.services, nodeport_addresses=CTX.node_ips)
    return sorted(
        (v.key, v.scheduler, v.flags, v.timeout, tuple(sorted((r.ip, r.port, r.weight) for r in v.real_servers)))
        for v in state.virtual_servers
    )


def _sync(
    rp: RulesPlan, previous: RulesPlan | None, problems: list[str] | None = None
) -> tuple[float, dict[str, float], int]:
    """One sync in mode rp.mode in NS: (seconds, IPVS parts, IPVS netlink requests). An IPVS
    sync given `previous` must have been partial (else a problem is noted)."""
    from netlab.kernel import proxy, proxy_ipvs, rules_state

    if rp.mode == ProxyMode.IPVS:
        with _ipvs_parts() as parts:
            t0 = time.perf_counter()
            res = proxy_ipvs.sync_ipvs(NS, rp, previous)
            dt = time.perf_counter() - t0
        if previous is not None and problems is not None and not res.partial:
            problems.append(f"ipvs change was a full sync ({res.fell_back or 'not partial'})")
        split = dict(parts)
        split["other"] = max(0.0, dt - sum(split.values()))
        return dt, split, res.netlink_requests
    t0 = time.perf_counter()
    proxy.sync(LAB, NODE, NS, rp, previous, ())
    dt = time.perf_counter() - t0
    rules_state.forget(LAB, NODE)
    return dt, {}, 0


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _mode_run(n: int, mode: str, repeat: int, cap: float, changes: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Full programming `repeat` times (fresh netns each, capped at `cap` s), then on the last
    node `changes` one-service changes."""
    rp = build_plan(n, ProxyMode(mode))
    fulls: list[float] = []
    splits: list[dict[str, float]] = []
    requests = 0
    problems: list[str] = []
    change: list[float] = []
    change_splits: list[dict[str, float]] = []
    change_requests: list[int] = []
    runs_left = repeat
    while runs_left:
        runs_left -= 1
        with _node_netns():
            dt, split, requests = _sync(rp, None)
            fulls.append(dt)
            splits.append(split)
            if mode == "ipvs":
                vs, rs = _ipvs_counts()
                if (vs, rs) != (n, 3 * n):
                    problems.append(f"ipvs full: {vs} virtual / {rs} real servers, want {n} / {3 * n}")
            if sum(fulls) >= cap or not runs_left:
                _, _, rp_drop = changed_plans(rp)
                prev = rp
                for i in range(changes):
                    nxt = rp_drop if i % 2 == 0 else rp
                    cdt, csplit, creq = _sync(nxt, prev, problems)
                    change.append(cdt)
                    change_splits.append(csplit)
                    change_requests.append(creq)
                    prev = nxt
                if mode == "ipvs" and _ipvs_table() != _rendered_table(prev):
                    problems.append("ipvs: the table differs from the plan's after the changes")
                break
    log(f"  {mode:9} n={n}: full {_median(fulls):.3f} s ({len(fulls)}x), change {_median(change) or 0:.4f} s")
    out: dict[str, Any] = {
        "full_s": [_r(x) for x in fulls],
        "full_median_s": _r(_median(fulls)),
        "change_s": [_r(x) for x in change],
        "change_median_s": _r(_median(change)),
    }
    if mode == "ipvs":
        keys = sorted({k for s in splits for k in s})
        out["full_parts_median_s"] = {k: _r(_median([s.get(k, 0.0) for s in splits])) for k in keys}
        out["change_parts_median_s"] = {k: _r(_median([s.get(k, 0.0) for s in change_splits])) for k in keys}
        out["full_netlink_requests"] = requests
        out["change_netlink_requests"] = change_requests
    if problems:
        out["problems"] = problems
    return out


def _floors(n: int, repeat: int, cap: float) -> dict[str, Any]:
    """ipvsadm --restore of the table; the dummy link + /32s via `ip -batch`; `ipset restore`."""
    from netlab.render.ipvs import DUMMY_DEVICE, render_ipvs

    rp = build_plan(n, ProxyMode.IPVS)
    table = ipvsadm_restore(rp)
    state = render_ipvs(rp.context, rp.services, nodeport_addresses=())
    ip_batch = f"link add {DUMMY_DEVICE} type dummy\n" + "".join(
        f"address add {a}/32 dev {DUMMY_DEVICE}\n" for a in state.addresses
    )
    problems: list[str] = []

    def one(argv: list[str], payload: str, check: Callable[[str], str | None] | None = None) -> float:
        with _node_netns() as path:
            dt = _timed_tool(path, argv, payload)
            if check is not None:
                p = check(path)
                if p:
                    problems.append(p)
        return dt

    def ipvsadm_ok(path: str) -> str | None:
        saved = _ns_run(path, ["ipvsadm", "-Sn"]).stdout.splitlines()
        vs = sum(1 for line in saved if line.startswith("-A"))
        rs = sum(1 for line in saved if line.startswith("-a"))
        return None if (vs, rs) == (n, 3 * n) else f"ipvsadm: {vs} / {rs} read back, want {n} / {3 * n}"

    res = {
        "ipvsadm_restore_s": repeat_capped(lambda: one(["ipvsadm", "--restore"], table, ipvsadm_ok), repeat, cap),
        "ip_batch_addresses_s": repeat_capped(lambda: one(["ip", "-batch", "-"], ip_batch), repeat, cap),
        "ipset_restore_s": repeat_capped(lambda: one(["ipset", "restore"], state.ipset_restore()), repeat, cap),
    }
    out: dict[str, Any] = {k: [_r(x) for x in v] for k, v in res.items()}
    out.update({k.replace("_s", "_median_s"): _r(_median(v)) for k, v in res.items()})
    out["ipvsadm_lines"] = len(table.splitlines())
    if problems:
        out["problems"] = problems
    return out


def run(sizes: list[int], repeat: int, cap: float, changes: int, log: Callable[[str], None]) -> dict[str, Any]:
    from netlab.kernel import ipvs as kipvs

    try:
        with _fresh_netns(), kipvs.opened(NS) as ipvs:
            version, _ = ipvs.info()
    except Exception as exc:  # noqa: BLE001 - say why instead of a traceback
        hint = "run it in the VM tier: sudo .venv/bin/netlab vm -- python -m netlab.bench_ipvs"
        raise BenchError(f"no IPVS in this kernel ({exc}); {hint}") from exc
    t0 = time.monotonic()
    data: dict[str, Any] = {
        "machine": machine(),
        "kernel": subprocess.run(["uname", "-r"], capture_output=True, text=True, check=False).stdout.strip(),
        "ipvs_version": version,
        "tools": {
            **_tool_versions(),
            "ipvsadm": _version(["ipvsadm", "--version"]),
            "ipset": _version(["ipset", "-v"]),
        },
        "config": {"services": sizes, "endpoints": len(ENDPOINTS), "repeat": repeat, "cap_s": cap, "changes": changes},
        "sizes": [],
    }
    for n in sizes:
        log(f"n={n}")
        row: dict[str, Any] = {"services": n, "floor": _floors(n, repeat, cap)}
        for mode in MODES:
            row[mode] = _mode_run(n, mode, repeat, cap, changes, log)
        table = row["ipvs"]["full_parts_median_s"].get("ipvs_table")
        floor = row["floor"]["ipvsadm_restore_median_s"]
        row["ipvs_table_vs_ipvsadm"] = _r(table / floor, 2) if table and floor else None
        fl = row["floor"]
        floor_sum = sum(
            fl[k] for k in ("ipvsadm_restore_median_s", "ip_batch_addresses_median_s", "ipset_restore_median_s")
        )
        row["ipvs_full_vs_floor_sum"] = _r(row["ipvs"]["full_median_s"] / floor_sum, 2) if floor_sum else None
        data["sizes"].append(row)
    if len(data["sizes"]) > 1:
        a, b = data["sizes"][0], data["sizes"][-1]
        data["change_growth"] = {
            m: _r(b[m]["change_median_s"] / a[m]["change_median_s"], 2) if a[m]["change_median_s"] else None
            for m in MODES
        }
    data["wall_s"] = round(time.monotonic() - t0, 1)
    return data


def _version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "missing"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def format_tables(data: dict[str, Any]) -> str:
    out = [f"kernel {data['kernel']}, IPVS {data['ipvs_version']}; milliseconds, medians"]
    out.append(
        f"{'N':>6} {'ipvs full':>10} {'ipvs table':>10} {'ipvsadm':>9} {'ratio':>6} "
        f"{'ip addrs':>9} {'ipset':>7} {'iptables':>9} {'nftables':>9}"
    )
    for row in data["sizes"]:
        ip, fl = row["ipvs"], row["floor"]
        table = ip["full_parts_median_s"].get("ipvs_table")
        out.append(
            f"{row['services']:>6} {_ms(ip['full_median_s']):>10} {_ms(table):>10} "
            f"{_ms(fl['ipvsadm_restore_median_s']):>9} {row['ipvs_table_vs_ipvsadm'] or '-':>6} "
            f"{_ms(fl['ip_batch_addresses_median_s']):>9} {_ms(fl['ipset_restore_median_s']):>7} "
            f"{_ms(row['iptables']['full_median_s']):>9} {_ms(row['nftables']['full_median_s']):>9}"
        )
    out.append("one-service change (drop one endpoint of the middle service / put it back):")
    out.append(f"{'N':>6} " + " ".join(f"{m:>9}" for m in MODES))
    for row in data["sizes"]:
        out.append(f"{row['services']:>6} " + " ".join(f"{_ms(row[m]['change_median_s']):>9}" for m in MODES))
    out.append(
        "ipvs full parts: "
        + "; ".join(
            f"N={row['services']}: " + ", ".join(f"{k} {_ms(v)}" for k, v in row["ipvs"]["full_parts_median_s"].items())
            for row in data["sizes"]
        )
    )
    for row in data["sizes"]:
        if "as_is_error" in row["ipvs"]:
            out.append(
                f"N={row['services']}: ipvs as is FAILED ({row['ipvs']['as_is_error']}); "
                f"ipvs numbers with {row['ipvs']['workaround']}"
            )
    for row in data["sizes"]:
        for where in ("floor", *MODES):
            for p in row[where].get("problems", []):
                out.append(f"PROBLEM N={row['services']} {where}: {p}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netlab bench ipvs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", default="100,1000", help="service counts, comma-separated (default 100,1000)")
    ap.add_argument("--repeat", type=int, default=3, help="full-programming runs per mode (default 3)")
    ap.add_argument("--cap", type=float, default=20.0, help="stop repeating once the runs add up to this many s")
    ap.add_argument("--changes", type=int, default=6, help="one-service changes per mode, alternating (default 6)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        data = run(parse_sizes(args.services), max(1, args.repeat), args.cap, max(2, args.changes), log)
    except BenchError as exc:
        log(f"bench ipvs: {exc}")
        return 4
    text = json.dumps(data, sort_keys=False)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stderr.write(format_tables(data))
    print(JSON_MARK + text, flush=True)
    problems = [p for row in data["sizes"] for w in ("floor", *MODES) for p in row[w].get("problems", [])]
    problems += [row["ipvs"]["as_is_error"] for row in data["sizes"] if "as_is_error" in row["ipvs"]]
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
