"""What a compare measures on a running lab: programmed objects, programming time, first-
connection latency, load distribution and behaviour, each from the kernel or real traffic.

The timing code is `netlab bench services`' (netlab/bench_services.py), imported, not copied:
its latency client (CLIENT_CODE: connect() timed with perf_counter_ns, RST on close, targets
interleaved round by round, warm-ups first), the conntrack check, the KUBE-SERVICES reader,
the one-service change (the middle service loses an endpoint, then gets it back) and the
capped repetition. What is added here, and why:

- the latency client runs as SCHED_FIFO (priority 10). On two CPUs shared with other work
  (a TCG VM takes a whole CPU), a time-shared client is preempted inside its timed connect()
  now and then: that noise is what made the p99s useless. A FIFO task is not preempted by
  normal tasks; the kernel handles SYN, DNAT and SYN-ACK in softirq on the same CPU, so the
  timed interval is the datapath's, and the kernel's RT throttling (95 %) keeps the machine
  usable. `fifo=False` measures the old way (kept for the docs' before/after).
- every connection binds a source port of its own (FRESH_PORTS_PREFIX): with the kernel's
  choice, a connection now and then reused the 4-tuple of an earlier one whose conntrack entry
  was still there, and skipped the nat table (no rule walk at all). The client's node's
  conntrack table is flushed before each latency run and its entries counted after it: one
  per connection, or the run is flagged.
"""

from __future__ import annotations

import json
import math
import subprocess  # noqa: TID251 - a compare drives a client inside a pod's netns, as the benchmark does
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from netlab.bench_services import (
    CLIENT_CODE,
    WARMUP,
    changed_plans,
    conntrack_count,
    kube_services_order,
    repeat_capped,
    save_tables,
)
from netlab.compare import stats
from netlab.errors import NetlabError

__all__ = [
    "CompareError",
    "behaviour_probes",
    "distribution",
    "latency",
    "objects",
    "programming",
    "run_in",
]

Log = Callable[[str], None]


class CompareError(NetlabError):
    """A measurement failed or its check did not hold."""


# Every TCP socket of the latency client binds its own source port, counting up from 20000
# (below the kernel's ephemeral range, 32768-60999): no two connections of a run share a
# 4-tuple. With the kernel's own choice, one connection in a few hundred now and then reused
# the tuple of an earlier one whose conntrack entry (CLOSE after the RST, 10 s) was still
# there: it skipped the nat table altogether and the conntrack count came up one short.
FRESH_PORTS_PREFIX = r"""
import errno as _errno
import socket as _socket
import struct as _struct


class _FreshPort(_socket.socket):
    next_port = FIRST_PORT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.family == _socket.AF_INET and self.type == _socket.SOCK_STREAM:
            # RST on close, for the reply checks too: no TIME_WAIT keeps a port of this run
            self.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _struct.pack("ii", 1, 0))
            while True:
                port = _FreshPort.next_port
                _FreshPort.next_port += 1
                try:
                    self.bind(("0.0.0.0", port))
                    break
                except OSError as e:  # still held by an earlier run's socket: take the next
                    if e.errno != _errno.EADDRINUSE or port > 32000:
                        raise


_socket.socket = _FreshPort
"""

FIFO_PREFIX = (
    "import os\ntry:\n    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))\nexcept OSError:\n    pass\n"
)


def run_in(ns: str, code: str, args: Sequence[str], *, timeout: float = 600) -> Any:
    """Run a Python snippet inside netns `ns` (this interpreter, through nsenter, as `netlab
    exec` does); its last stdout line is JSON."""
    from netlab.kernel import netns

    argv = ["nsenter", f"--net={netns.path(ns)}", sys.executable, "-c", code, *args]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CompareError(f"a client in {ns} ran longer than {timeout:.0f} s and was stopped") from None
    if r.returncode != 0 or not r.stdout.strip():
        raise CompareError(f"a client in {ns} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- programmed objects -------------------------------------------------------------------------


def _iptables_counts(ns: str, save_bin: str) -> dict[str, int]:
    tables = save_tables(ns, save_bin)
    rules = chains = 0
    for text in tables.values():
        for line in text.splitlines():
            if line.startswith("-A "):
                rules += 1
            elif line.startswith(":") and line.split()[1] == "-":  # user-defined (no policy)
                chains += 1
    return {
        "iptables_rules": rules,
        "iptables_chains": chains,
        "kube_services_rules": len(kube_services_order(tables.get("nat", ""))),
    }


def _nft_counts(ns: str) -> dict[str, int]:
    from netlab.kernel import rules

    r = rules.run(ns, ["nft", "-j", "list", "table", "ip", "kube-proxy"], check=False)
    if r.returncode != 0:
        raise CompareError(f"nft list table ip kube-proxy failed in {ns}: {r.stderr.strip()[-200:]}")
    out = {"nft_chains": 0, "nft_rules": 0, "nft_sets": 0, "nft_maps": 0, "nft_set_elements": 0, "nft_map_elements": 0}
    for item in json.loads(r.stdout)["nftables"]:
        ((kind, body),) = item.items()
        if kind == "chain":
            out["nft_chains"] += 1
        elif kind == "rule":
            out["nft_rules"] += 1
        elif kind in ("set", "map"):
            out[f"nft_{kind}s"] += 1
            out[f"nft_{kind}_elements"] += len(body.get("elem") or [])
    return out


def _ipvs_counts(ns: str, backend: str) -> dict[str, int]:
    from netlab.kernel import proxy_ipvs

    view = proxy_ipvs.observe_ipvs(ns, iptables_backend=backend)
    return {
        "ipvs_virtual_servers": len(view.virtual_servers),
        "ipvs_real_servers": sum(len(v.real_servers) for v in view.virtual_servers),
        "kube_ipvs0_addresses": len(view.addresses),
        "ipset_entries": sum(len(entries) for _, _, entries in view.sets()),
        "iptables_rules": len(view.rules()),
    }


def objects(ns: str, mode: str, backend: str) -> dict[str, int]:
    """What kube-proxy's mode programmed on one node, counted from the kernel's own listing."""
    from netlab.kernel import rules

    if mode == "iptables":
        return _iptables_counts(ns, rules.IptablesTool(backend).save)
    if mode == "nftables":
        return _nft_counts(ns)
    return _ipvs_counts(ns, backend)


# --- programming time ---------------------------------------------------------------------------


def _cleanup(ns: str, rp: Any) -> None:
    from netlab.kernel import proxy

    mode = str(rp.mode)
    if mode == "ipvs":
        from netlab.kernel import proxy_ipvs

        proxy_ipvs.cleanup_ipvs(ns, iptables_backend=rp.iptables_backend)
    else:
        proxy.cleanup(ns, mode, previous_backend=rp.iptables_backend)


def _timed_sync(lab: str, node: str, ns: str, rp: Any, previous: Any) -> float:
    from netlab.kernel import proxy

    t0 = time.perf_counter()
    proxy.sync(lab, node, ns, rp, previous, ())
    return time.perf_counter() - t0


def programming(
    lab: str, node: str, ns: str, *, repeat: int = 3, cap: float = 10.0, changes: int = 4
) -> dict[str, Any]:
    """On one node: full programming (kube-proxy's first sync: cleanup, then sync with no
    previous state), repeated up to `repeat` times within `cap` seconds; then the one-service
    change (the middle service loses an endpoint, then gets it back: kube-proxy's partial sync),
    `changes` times. Leaves the node programmed as `netlab up` left it (and recorded)."""
    from netlab.kernel import rules_state

    rp = rules_state.load(lab, node)
    if rp is None:
        raise CompareError(f"no recorded rules for {lab}/{node}: `netlab up` did not program it")

    def full_once() -> float:
        _cleanup(ns, rp)
        return _timed_sync(lab, node, ns, rp, None)

    full = repeat_capped(full_once, repeat, cap)
    _, _, rp_drop = changed_plans(rp)
    drops: list[float] = []
    readds: list[float] = []
    for i in range(changes + changes % 2):  # an even count: the node ends as the full sync left it
        if i % 2 == 0:
            drops.append(_timed_sync(lab, node, ns, rp_drop, rp))
        else:
            readds.append(_timed_sync(lab, node, ns, rp, rp_drop))
    allc = drops + readds
    return {
        "node": node,
        "full_s": [round(x, 4) for x in full],
        "full_median_s": round(stats.median(full), 4),
        "change_s": [round(x, 4) for x in allc],
        "change_median_s": round(stats.median(allc), 4),
    }


# --- latency --------------------------------------------------------------------------------------


def kube_services_positions(ns: str, backend: str, targets: dict[str, tuple[str, int]]) -> tuple[dict[str, int], int]:
    """(target key -> 1-based position of its ClusterIP rule in nat KUBE-SERVICES, the number of
    ClusterIP rules there), read from the node's iptables-save."""
    from netlab.kernel import rules

    order = kube_services_order(save_tables(ns, rules.IptablesTool(backend).save).get("nat", ""))
    index = {(ip, port): i + 1 for i, (_, ip, port, _) in enumerate(order)}
    return {k: index.get(v, 0) for k, v in targets.items()}, len(order)


CHUNK = 100  # connections per target per client process; see latency()
FIRST_PORT = 20000
SLOW_US = 500_000  # a connect() this slow waited for a retransmitted SYN: a lost packet, not the rules


def _drain(ns: str, port: int, timeout: float = 5.0) -> int:
    """Wait until the listener on `port` in `ns` has accepted every queued connection (its
    accept queue, ss's Recv-Q, is 0); returns what was still queued at the timeout."""
    from netlab.kernel import rules

    deadline = time.monotonic() + timeout
    while True:
        r = rules.run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        queued = sum(int(line.split()[1]) for line in r.stdout.splitlines() if line.split()[1:2])
        if queued == 0 or time.monotonic() > deadline:
            return queued
        time.sleep(0.02)


def latency(
    node_ns: str,
    client_ns: str,
    targets: dict[str, tuple[str, int]],
    connections: int,
    *,
    fifo: bool = True,
    server: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """`connections` new TCP connections to each target, interleaved (after WARMUP), from the
    client pod; per target: p50/p99 in µs, the raw samples, who answered, conntrack entries.

    The client runs in chunks of CHUNK connections per target, each a fresh process with
    source ports of its own, and before each chunk the backend's accept queue (`server`:
    netns and port of the pod that answers every target) is drained: the targets share one
    responder, whose accept queue holds 512, and a FIFO client that opens ~3000 connections a
    second starves it; once the queue is full the kernel drops SYNs and connect() waits 1 s
    for the retransmission (seen once per run of 960 connections before this)."""
    from netlab.kernel import rules

    rules.run(node_ns, ["conntrack", "-F"], check=False)
    # counted after every chunk, then flushed: an entry closed by RST lives 10 s (CLOSE), and in
    # the VM tier (25-30x slower) a whole run takes longer than that, so a count at the end
    # missed the first chunks' flows (246 of 320 at 1000 services)
    entries: dict[str, int] = dict.fromkeys(targets, 0)
    samples: dict[str, list[float]] = {k: [] for k in targets}
    replies: dict[str, set[str]] = {k: set() for k in targets}
    fails = 0
    queued: list[int] = []
    port = FIRST_PORT
    done = 0
    while done < connections:
        n = min(CHUNK, connections - done)
        if server is not None:
            queued.append(_drain(*server))
        prefix = FRESH_PORTS_PREFIX.replace("next_port = FIRST_PORT", f"next_port = {port}")
        code = (FIFO_PREFIX if fifo else "") + prefix + CLIENT_CODE
        data = run_in(client_ns, code, [json.dumps(targets), str(n), str(WARMUP)])
        for key in targets:
            samples[key] += [x / 1000 for x in data["ns"][key]]
            replies[key] |= set(data["replies"][key])
        fails += data["fails"]
        for key, (ip, _) in targets.items():
            entries[key] += conntrack_count(node_ns, ip)
        rules.run(node_ns, ["conntrack", "-F"], check=False)
        port += len(targets) * (n + WARMUP + 3) + 10  # the reply checks take 3 per target
        done += n
    out: dict[str, Any] = {"fails": fails, "fifo": fifo, "chunk": CHUNK, "queued_before_chunks": queued}
    out["targets"] = {}
    for key, (ip, tport) in targets.items():
        xs = samples[key]
        out["targets"][key] = {
            "ip": ip,
            "port": tport,
            "n": len(xs),
            "p50_us": round(stats.percentile(xs, 50), 2) if xs else None,
            "p99_us": round(stats.percentile(xs, 99), 2) if xs else None,
            "replies": sorted(replies[key]),
            "conntrack_entries": entries[key],
            "slow": sum(1 for x in xs if x >= SLOW_US),
            "samples_us": [round(x, 2) for x in xs],
        }
    return out


def latency_problems(lat: dict[str, Any], connections: int, replies: dict[str, set[str]]) -> list[str]:
    """What makes a latency run untrustworthy: failed or missing connections, the wrong
    answerer, too few conntrack entries (a connection that skipped the nat rules)."""
    problems = []
    if lat["fails"]:
        problems.append(f"{lat['fails']} connections failed")
    for key, t in lat["targets"].items():
        if t["n"] != connections:
            problems.append(f"latency {key}: {t['n']} of {connections} connections timed")
        want = replies.get(key)
        if want is not None and (not t["replies"] or not set(t["replies"]) <= want):
            problems.append(f"latency {key}: answered by {t['replies']}, expected {sorted(want)}")
        if t.get("slow"):
            problems.append(
                f"latency {key}: {t['slow']} connections took over {SLOW_US / 1e6:.1f} s (a SYN was retransmitted: "
                "a packet was lost, not a rule walked)"
            )
        want_entries = connections + WARMUP * math.ceil(connections / lat.get("chunk", connections))
        if t["conntrack_entries"] < want_entries:
            problems.append(
                f"latency {key}: {t['conntrack_entries']} conntrack entries for {want_entries} connections "
                "(some reused a flow and skipped the nat rules)"
            )
    return problems


# --- load distribution -------------------------------------------------------------------------

DIST_CODE = r"""
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = {}
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(b"\n")  # speak first: the responder answers at once
        name = s.makefile().readline().strip() or "EMPTY"
        s.close()
    except OSError as e:
        name = "ERROR:" + type(e).__name__
    seen[name] = seen.get(name, 0) + 1
print(json.dumps(seen))
"""


def distribution(client_ns: str, ip: str, port: int, n: int, backends: Sequence[str]) -> dict[str, Any]:
    """n new connections to ip:port; which backend answered each, and the chi-square test of
    the split against an even one over every backend (a backend never chosen counts as 0)."""
    seen: dict[str, int] = run_in(client_ns, DIST_CODE, [ip, str(port), str(n)])
    counts = {b: seen.get(b, 0) for b in backends}
    others = {k: v for k, v in seen.items() if k not in counts}
    chi2, df, p = stats.chi_square(list(counts.values())) if len(counts) > 1 else (0.0, 0, 1.0)
    return {
        "ip": ip,
        "port": port,
        "n": n,
        "counts": counts,
        "other": others,
        "chi2": round(chi2, 3),
        "df": df,
        "p": round(p, 5),
        # the usual test at alpha = 0.001, as tests/kernel/test_services.py uses
        "uniform": not others and p >= 0.001,
    }


# --- behaviour ------------------------------------------------------------------------------------

PROBE_CODE = r"""
import errno, json, os, socket, struct, sys, time
probes = json.loads(sys.argv[1])

def tcp(host, port, timeout):
    s = socket.socket()
    s.settimeout(timeout)
    t0 = time.monotonic()
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        return "refused", "", time.monotonic() - t0
    except (socket.timeout, TimeoutError):
        return "timeout", "", time.monotonic() - t0
    except OSError as e:
        name = {errno.EHOSTUNREACH: "host-unreachable", errno.ENETUNREACH: "net-unreachable"}.get(e.errno)
        return name or errno.errorcode.get(e.errno, str(e.errno)).lower(), "", time.monotonic() - t0
    dt = time.monotonic() - t0
    try:
        s.sendall(b"\n")
        who = s.makefile().readline().strip()
    except OSError:
        who = ""
    s.close()
    return "answered", who, dt

def checksum(b):
    if len(b) % 2:
        b += b"\0"
    total = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF

UNREACH = {0: "net-unreachable", 1: "host-unreachable", 3: "port-unreachable", 10: "host-prohibited",
           13: "admin-prohibited"}

def ping(host, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    body = b"netlab-compare"
    head = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    pkt = struct.pack("!BBHHH", 8, 0, checksum(head + body), ident, 1) + body
    t0 = time.monotonic()
    s.sendto(pkt, (host, 0))
    while True:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            return "no-reply", "", time.monotonic() - t0
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(2048)
        except (socket.timeout, TimeoutError):
            return "no-reply", "", time.monotonic() - t0
        icmp = data[(data[0] & 0xF) * 4:]
        if icmp[0] == 0 and addr[0] == host and struct.unpack("!H", icmp[4:6])[0] == ident:
            return "echo-reply", addr[0], time.monotonic() - t0
        if icmp[0] == 3 and len(icmp) >= 28:
            inner = icmp[8:]
            if socket.inet_ntoa(inner[16:20]) == host and inner[9] == 1:
                return UNREACH.get(icmp[1], "unreachable-%d" % icmp[1]), addr[0], time.monotonic() - t0

out = []
for p in probes:
    if p["kind"] == "ping":
        outcome, who, dt = ping(p["host"], p["timeout"])
    else:
        outcome, who, dt = tcp(p["host"], p["port"], p["timeout"])
    out.append({"id": p["id"], "outcome": outcome, "by": who, "ms": round(dt * 1000, 1)})
print(json.dumps(out))
"""


def behaviour_probes(ns: str, probes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Run probes ({id, kind: tcp|ping, host, port, timeout}) from netns `ns`; id -> outcome."""
    results = run_in(ns, PROBE_CODE, [json.dumps(probes)], timeout=60 + sum(p["timeout"] for p in probes))
    return {r["id"]: r for r in results}
