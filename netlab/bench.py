"""`netlab bench bringup`: how fast netlab builds and removes a lab, against mininet.

For each pod count N it

  1. writes a topology of N pods spread round-robin over `nodes` nodes with a VXLAN overlay
     (lab `bench<N>`) to a temporary file;
  2. times `netlab up FILE` as its own process (the installed CLI, exactly as a user runs it:
     interpreter start-up and imports included) and its peak RSS (GNU time's %M, see _run);
  3. checks, outside the timing, that the lab really works: `netlab status -o json` shows every
     node Ready and all N pods Running, the kernel holds the expected number of objects, and
     `netlab exec` pings from a pod on one node to a pod on another (through flannel.1);
  4. times `netlab down bench<N>` the same way, checks that no namespace of the lab is left, and
     waits until the kernel has finished freeing them (the CPUs idle: `settle`, reported apart);
  5. runs the baseline in the same run: mininet's `mn --topo single,N --switch lxbr
     --controller none --test none`, reproduced in a small driver (see MININET_DRIVER) that runs
     under Debian's /usr/bin/python3 inside a throwaway namespace `nl-bench-mininet`, with
     mininet's host-wide sysctl tuning (`fixLimits`) disabled, so the host is not changed.

Objects (what each tool asks the kernel to create; sysctls, `lo` and kernel-made connected
routes are not counted; a veth pair is two links):

  netlab  = 6 + 9*n + 3*n*(n-1) + 5*N      (n nodes, N pods, VXLAN)
            underlay: netns + br0                                             2
            external: netns + veth pair + address (the client outside)        4
            node:     netns + veth pair + cni0 + flannel.1 + 3 addresses
                      + default route                                         9 per node
            peers:    neigh + fdb + route on each node for each other node    3 per ordered pair
            pod:      netns + veth pair + address + default route             5 per pod
  mininet = 1 + 4*N    bridge s1; per host: netns + veth pair + address

kube-proxy's rules (one iptables-restore per node, plus its jump rules) are programmed too and
are in the timing, but not counted as objects.

The netlab count is also taken from the kernel after `up` (every lab namespace, its links,
addresses, static routes, permanent neighbours and FDB entries); a mismatch fails the run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess  # noqa: TID251 - a benchmark drives the CLI and mininet as processes
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netlab.errors import NetlabError

__all__ = [
    "BenchError",
    "RunResult",
    "bringup",
    "mininet_objects",
    "netlab_objects",
    "parse_counts",
    "print_table",
    "topology_yaml",
]

MININET_NETNS = "nl-bench-mininet"
MININET_PYTHON = "/usr/bin/python3"
MININET_INSTALL = "apt-get install mininet bridge-utils"
TARGET_RATIO = 0.1
TIMEOUT = 900.0
GNU_TIME = "/usr/bin/time"
SANE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What mininet's fixLimits() would write host-wide; checked unchanged after the baseline.
HOST_SYSCTLS = (
    "fs.file-max",
    "kernel.pty.max",
    "net.core.wmem_max",
    "net.core.rmem_max",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.core.netdev_max_backlog",
    "net.ipv4.neigh.default.gc_thresh1",
    "net.ipv4.neigh.default.gc_thresh2",
    "net.ipv4.neigh.default.gc_thresh3",
    "net.ipv4.route.max_size",
)

Log = Callable[[str], None]


class BenchError(NetlabError):
    pass


@dataclass
class RunResult:
    tool: str
    pods: int
    nodes: int | None
    ok: bool = False
    check: str = "not run"
    up_s: float | None = None
    down_s: float | None = None
    settle_s: float | None = None
    objects: int | None = None
    objects_in_kernel: int | None = None
    peak_rss_kib: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total_s(self) -> float | None:
        if self.up_s is None or self.down_s is None:
            return None
        return self.up_s + self.down_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_s"] = _r(self.total_s)
        d["up_s"], d["down_s"], d["settle_s"] = _r(self.up_s), _r(self.down_s), _r(self.settle_s)
        d["up_objects_per_s"] = _rate(self.objects, self.up_s)
        d["down_objects_per_s"] = _rate(self.objects, self.down_s)
        d["peak_rss_mib"] = round(self.peak_rss_kib / 1024, 1) if self.peak_rss_kib else None
        return d


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _rate(objects: int | None, seconds: float | None) -> float | None:
    if not objects or not seconds:
        return None
    return round(objects / seconds, 1)


# --- topology and object counts ------------------------------------------------------------


def lab_name(pods: int) -> str:
    return f"bench{pods}"


def node_name(i: int) -> str:
    return f"node{i}"


def pod_name(i: int, width: int) -> str:
    return f"p{i:0{width}d}"


def topology_yaml(pods: int, nodes: int, header: str = "") -> str:
    """N pods round-robin over `nodes` nodes, flannel-style VXLAN, lab `bench<N>`."""
    width = max(4, len(str(max(pods - 1, 0))))
    lines = [header.rstrip("\n")] if header else []
    lines += [
        f"name: {lab_name(pods)}",
        "cluster:",
        "  podCIDR: 10.244.0.0/16",
        "  overlay: vxlan",
        "nodes:",
        *(f"  - name: {node_name(i)}" for i in range(nodes)),
        "pods:" if pods else "pods: []",
        *(f"  - {{name: {pod_name(i, width)}, node: {node_name(i % nodes)}}}" for i in range(pods)),
    ]
    return "\n".join(lines) + "\n"


def netlab_objects(pods: int, nodes: int) -> int:
    return 6 + 9 * nodes + 3 * nodes * (nodes - 1) + 5 * pods


def mininet_objects(pods: int) -> int:
    return 1 + 4 * pods


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BenchError(f"--pods {text!r} is not a list of numbers; write e.g. 100,1000") from None
    if not counts or any(c < 2 for c in counts):
        raise BenchError(f"--pods {text!r}: give one or more pod counts, each at least 2")
    return counts


# --- running and timing a process ------------------------------------------------------------


@dataclass
class Proc:
    argv: list[str]
    rc: int
    seconds: float
    maxrss_kib: int
    stdout: str
    stderr: str


def _run(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = TIMEOUT, cwd: str | None = None
) -> Proc:
    """Run argv: wall time from spawn to reap, and the peak RSS of the command.

    The peak RSS comes from GNU time (`%M`, the command's ru_maxrss), not from our own wait4:
    Linux carries a parent's RSS high-water mark into a forked child's ru_maxrss across exec,
    so every child of this process would report at least this process's own size. Without
    /usr/bin/time, VmHWM is sampled from /proc every 10 ms instead.
    """
    with (
        tempfile.TemporaryFile() as fo,
        tempfile.TemporaryFile() as fe,
        tempfile.NamedTemporaryFile(prefix="netlab-bench-rss-") as rss,
    ):
        gnu_time = os.access(GNU_TIME, os.X_OK)
        full = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv] if gnu_time else argv
        hwm = [0]
        t0 = time.perf_counter()
        # its own process group, so that a timeout or Ctrl-C stops the command and its helper
        p = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env, cwd=cwd, start_new_session=True
        )
        timer = threading.Timer(timeout, _terminate, (p.pid,))
        timer.start()
        sampler = None
        if not gnu_time:
            sampler = threading.Thread(target=_sample_hwm, args=(p.pid, hwm), daemon=True)
            sampler.start()
        try:
            while True:
                try:
                    _, status, _ = os.wait4(p.pid, 0)
                    break
                except InterruptedError:
                    continue
                except KeyboardInterrupt:
                    _terminate(p.pid)
                    os.wait4(p.pid, 0)
                    raise
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if sampler is not None:
            sampler.join()
        maxrss = hwm[0]
        if gnu_time:
            lines = Path(rss.name).read_text().split()
            maxrss = int(lines[-1]) if lines and lines[-1].isdigit() else 0
        fo.seek(0)
        fe.seek(0)
        return Proc(
            argv, p.returncode, seconds, maxrss, fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
        )


def _sample_hwm(pid: int, out: list[int]) -> None:
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        out[0] = max(out[0], int(line.split()[1]))
                        break
                else:
                    return  # a zombie: its memory is gone
        except (OSError, ValueError):
            return
        time.sleep(0.01)


def _terminate(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # the group this run started (pgid == pid)
    except ProcessLookupError:
        pass


def _cpu_busy() -> tuple[int, int]:
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # busy (neither idle nor iowait), all


def settle(limit: float = 15.0, window: float = 0.1, idle_pct: float = 10.0, streak: int = 10) -> float:
    """Seconds until the machine goes idle again. After `down` returns, the kernel still frees
    the deleted namespaces (and their veths) in a work queue; mininet's killed node shells
    leave the same work. Idle = `streak` windows in a row under `idle_pct` % CPU (of all
    CPUs); returns when the first of them began, at most `limit`."""
    t0 = time.perf_counter()
    b0, a0 = _cpu_busy()
    idle_since = t0
    quiet = 0
    while time.perf_counter() - t0 < limit:
        start = time.perf_counter()
        time.sleep(window)
        b1, a1 = _cpu_busy()
        pct = 100.0 * (b1 - b0) / max(1, a1 - a0)
        b0, a0 = b1, a1
        if pct >= idle_pct:
            quiet = 0
            continue
        if quiet == 0:
            idle_since = start
        quiet += 1
        if quiet >= streak:
            return idle_since - t0
    return limit


def _tail(text: str, n: int = 5) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return " | ".join(lines[-n:])


def netlab_argv() -> list[str]:
    """The installed CLI next to this interpreter (the venv's `netlab`), else the same via -c."""
    exe = Path(sys.executable).parent / "netlab"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-c", "from netlab.cli import main; main()"]


def _netlab_env() -> dict[str, str]:
    # never let a test fault hook leak into a timed run
    return {k: v for k, v in os.environ.items() if not k.startswith("NETLAB_FAULT_")}


# --- netlab -------------------------------------------------------------------------------


def _kernel_objects(lab: str) -> int:
    """Objects the kernel holds for `lab`: namespaces, links, addresses, static routes,
    permanent neighbours, FDB entries with a remote (what netlab asked for)."""
    from netlab.kernel import observe

    total = 0
    for ns, mark in observe.lab_netns().items():
        if mark[0] != lab:
            continue
        st = observe.read_state(ns)
        total += 1 + len(st.links) + len(st.addrs) + len(st.routes) + len(st.neigh) + len(st.fdb)
    return total


def _lab_netns(lab: str) -> list[str]:
    from netlab.kernel import netns

    return netns.list_names(f"nl-{lab}-")


def run_netlab(pods: int, nodes: int, workdir: Path, log: Log) -> RunResult:
    lab = lab_name(pods)
    res = RunResult("netlab", pods, nodes, objects=netlab_objects(pods, nodes))
    cli = netlab_argv()
    env = _netlab_env()
    if _lab_netns(lab):
        raise BenchError(
            f"lab {lab} (or namespaces nl-{lab}-*) already exists; remove it with "
            f"`netlab down {lab}` and run the benchmark again"
        )
    topo = workdir / f"{lab}.yaml"
    topo.write_text(topology_yaml(pods, nodes))
    _run([*cli, "--version"], env=env)  # warm the page cache: the timed runs start equal
    built = False
    try:
        log(f"netlab  N={pods}: up ({nodes} nodes, vxlan)")
        up = _run([*cli, "up", str(topo)], env=env)
        built = True
        res.up_s = up.seconds
        res.peak_rss_kib = up.maxrss_kib
        res.detail["up_peak_rss_kib"] = up.maxrss_kib
        m = re.search(r"in ([0-9.]+) s", up.stdout)
        if m:
            res.detail["up_in_process_s"] = float(m.group(1))
        if up.rc != 0:
            res.check = f"`netlab up` failed (exit {up.rc}): {_tail(up.stderr or up.stdout)}"
            return res
        log(f"netlab  N={pods}: up in {up.seconds:.2f} s; checking the lab works")
        problem = _verify_netlab(lab, pods, nodes, cli, env, res)
        log(f"netlab  N={pods}: down")
        down = _run([*cli, "down", lab], env=env)
        built = down.rc != 0
        res.down_s = down.seconds
        res.detail["down_peak_rss_kib"] = down.maxrss_kib
        res.peak_rss_kib = max(up.maxrss_kib, down.maxrss_kib)
        if down.rc != 0:
            res.check = f"`netlab down` failed (exit {down.rc}): {_tail(down.stderr or down.stdout)}"
            return res
        res.settle_s = settle()
        left = _lab_netns(lab)
        if left:
            problem = problem or f"{len(left)} namespaces left after down (e.g. {left[0]})"
        res.ok = problem is None
        res.check = problem or "ok: all pods Running, objects match, cross-node ping, nothing left"
        log(f"netlab  N={pods}: down in {down.seconds:.2f} s (kernel idle {res.settle_s:.2f} s later); {res.check}")
        return res
    finally:
        if built or _lab_netns(lab):
            _run([*cli, "down", lab], env=env)


def _verify_netlab(lab: str, pods: int, nodes: int, cli: list[str], env: dict[str, str], res: RunResult) -> str | None:
    """None if the lab is complete and carries traffic across nodes, else what is wrong."""
    st = _run([*cli, "status", lab, "-o", "json"], env=env)
    if st.rc != 0:
        return f"`netlab status` failed: {_tail(st.stderr)}"
    data = json.loads(st.stdout)["labs"][0]
    ready = sum(1 for n in data["nodes"] if n["state"] == "Ready")
    running = [p for p in data["pods"] if p["state"] == "Running"]
    res.detail["nodes_ready"], res.detail["pods_running"] = ready, len(running)
    if ready != nodes or len(running) != pods:
        return f"status shows {ready}/{nodes} nodes Ready and {len(running)}/{pods} pods Running"
    try:
        res.objects_in_kernel = _kernel_objects(lab)
    except Exception as exc:  # noqa: BLE001 - reported, and fails the run
        return f"could not count the lab's objects in the kernel: {exc}"
    if res.objects_in_kernel != res.objects:
        return f"the kernel holds {res.objects_in_kernel} objects, the formula says {res.objects}"
    src = running[0]
    dst = next((p for p in reversed(running) if p["node"] != src["node"]), None)
    if dst is None:
        return "no two pods on different nodes to ping between"
    ping = _run([*cli, "exec", "--lab", lab, src["name"], "--", "ping", "-c1", "-W3", dst["ip"]], env=env, timeout=30)
    res.detail["ping"] = f"{src['name']}@{src['node']} -> {dst['name']}@{dst['node']} ({dst['ip']})"
    if ping.rc != 0:
        return f"ping {res.detail['ping']} failed: {_tail(ping.stdout + ping.stderr)}"
    return None


# --- mininet -----------------------------------------------------------------------------

# Runs under Debian's python3 inside the bench namespace. Reproduces what /usr/bin/mn does for
# `--topo single,N --switch lxbr --controller none --test none` (MininetRunner.begin with the
# default host, link, ipbase, listenport), minus three things: mininet.clean.cleanup() is never
# called (`mn -c` kills and deletes by name host-wide), fixLimits() does not write the host-wide
# sysctls (it only raises this process's own rlimits, as it also would), and the one ping
# between h1 and hN (the proof the network works) is stamped out of the timing.
MININET_DRIVER = r"""
import json, sys, time
t_start = time.time()
sys.path.insert(0, "/usr/lib/python3/dist-packages")
from resource import RLIMIT_NOFILE, RLIMIT_NPROC
import mininet.net, mininet.util
def fixLimits():
    mininet.util.rlimitTestAndSet(RLIMIT_NPROC, 8192)
    mininet.util.rlimitTestAndSet(RLIMIT_NOFILE, 16384)
mininet.util.fixLimits = fixLimits
mininet.net.fixLimits = fixLimits
from mininet.log import lg
from mininet.net import Mininet, VERSION
from mininet.node import Host, NullController
from mininet.nodelib import LinuxBridge
from mininet.link import Link
from mininet.topo import SingleSwitchTopo
n, out = int(sys.argv[1]), sys.argv[2]
lg.setLogLevel("info")
r = {"version": VERSION, "t_start": t_start, "t_imported": time.time()}
net = None
try:
    net = Mininet(topo=SingleSwitchTopo(n), switch=LinuxBridge, host=Host,
                  controller=[NullController], link=Link, ipBase="10.0.0.0/8",
                  inNamespace=False, xterms=False, autoSetMacs=False, autoStaticArp=False,
                  autoPinCpus=False, waitConnected=False, listenPort=6654)
    net.start()
    r["t_up"] = time.time()
    h1, hn = net.hosts[0], net.hosts[-1]
    r["hosts"] = len(net.hosts)
    r["switch_ports"] = len([i for i in net.switches[0].intfList() if i.name != "lo"])
    r["ping"] = "%s -> %s (%s)" % (h1.name, hn.name, hn.IP())
    r["ping_ok"] = " 0% packet loss" in h1.cmd("ping -c1 -W3 " + hn.IP())
    pss = 0
    for node in net.hosts + net.switches:
        try:
            with open("/proc/%d/smaps_rollup" % node.pid) as f:
                pss += sum(int(l.split()[1]) for l in f if l.startswith("Pss:"))
        except (OSError, ValueError):
            pass
    r["shells_pss_kib"] = pss
    r["t_verified"] = time.time()
finally:
    if net is not None:
        net.stop()
    r["t_down"] = time.time()
    with open(out, "w") as f:
        json.dump(r, f)
"""


def mininet_missing() -> str | None:
    """None if the baseline can run, else why not and how to fix it."""
    missing = [x for x in ("mn", "mnexec", "brctl", "ifconfig") if not shutil.which(x, path=SANE_PATH)]
    if missing or not Path(MININET_PYTHON).exists():
        return (
            f"mininet baseline skipped: {', '.join(missing) or MININET_PYTHON} not found; install it "
            f"with `{MININET_INSTALL}` (or pass --no-baseline)"
        )
    r = subprocess.run(
        [MININET_PYTHON, "-c", "import mininet.net"], capture_output=True, text=True, env={"PATH": SANE_PATH}
    )
    if r.returncode != 0:
        return f"mininet baseline skipped: {MININET_PYTHON} cannot import mininet ({_tail(r.stderr, 1)})"
    return None


def _mininet_pids() -> set[int]:
    """Processes of mininet's nodes (`bash ... -is mininet:<node>`)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"\0mininet:" in f.read():
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


def _root_links() -> set[str]:
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines() if ":" in line}


def _host_sysctls() -> dict[str, str]:
    out = {}
    for key in HOST_SYSCTLS:
        try:
            out[key] = Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
        except OSError:
            continue
    return out


def _bench_netns() -> list[str]:
    from netlab.kernel import netns

    return netns.list_names("nl-bench")


def run_mininet(pods: int, workdir: Path, log: Log) -> RunResult:
    res = RunResult("mininet", pods, None, objects=mininet_objects(pods))
    from netlab.kernel import netns

    if netns.exists(MININET_NETNS):
        raise BenchError(
            f"namespace {MININET_NETNS} exists (left by a crashed run?); remove it with "
            f"`ip netns del {MININET_NETNS}` and run the benchmark again"
        )
    env = {"PATH": SANE_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    before_pids, before_links, before_sysctls = _mininet_pids(), _root_links(), _host_sysctls()
    out = workdir / f"mininet-{pods}.json"
    # warm the page cache, as for netlab
    subprocess.run([MININET_PYTHON, "-c", "import mininet.net, mininet.nodelib"], env=env, check=False)
    problems: list[str] = []
    subprocess.run(["ip", "netns", "add", MININET_NETNS], check=True)
    try:
        log(
            f"mininet N={pods}: mn --topo single,{pods} --switch lxbr --controller none --test none "
            f"(in netns {MININET_NETNS})"
        )
        p = _run(
            ["ip", "netns", "exec", MININET_NETNS, MININET_PYTHON, "-c", MININET_DRIVER, str(pods), str(out)],
            env=env,
            cwd=str(workdir),
        )
        res.peak_rss_kib = p.maxrss_kib
        t_exit = time.time()
        res.settle_s = settle()
        r: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        res.detail.update({k: r[k] for k in ("version", "hosts", "switch_ports", "ping", "shells_pss_kib") if k in r})
        if p.rc != 0 or "t_up" not in r:
            problems.append(f"mininet failed (exit {p.rc}): {_tail(p.stderr or p.stdout)}")
        else:
            # up: process start (interpreter, imports) to net.start() done; down: net.stop() to exit.
            # The ping in between is not timed. Same boundaries as netlab's two processes.
            res.up_s = r["t_up"] - (t_exit - p.seconds)
            res.down_s = t_exit - r["t_verified"]
            res.detail["build_start_s"] = round(r["t_up"] - r["t_imported"], 3)
            res.detail["stop_s"] = round(r["t_down"] - r["t_verified"], 3)
            res.detail["python_import_s"] = round(r["t_imported"] - (t_exit - p.seconds), 3)
            if r.get("hosts") != pods or r.get("switch_ports") != pods:
                problems.append(f"mininet built {r.get('hosts')} hosts and {r.get('switch_ports')} switch ports")
            if not r.get("ping_ok"):
                problems.append(f"ping {r.get('ping')} failed")
    finally:
        subprocess.run(["ip", "netns", "del", MININET_NETNS], check=False)
        problems += _mininet_leftovers(before_pids, before_links, before_sysctls)
    res.ok = not problems
    res.check = "; ".join(problems) or "ok: N hosts, h1 -> hN ping, host untouched, nothing left"
    if res.total_s is not None:
        log(
            f"mininet N={pods}: up {res.up_s:.2f} s, down {res.down_s:.2f} s (kernel idle {res.settle_s:.2f} s "
            f"later); {res.check}"
        )
    else:
        log(f"mininet N={pods}: {res.check}")
    return res


def _mininet_leftovers(before_pids: set[int], before_links: set[str], before_sysctls: dict[str, str]) -> list[str]:
    problems = []
    deadline = time.monotonic() + 10
    left = _mininet_pids() - before_pids
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _mininet_pids() - before_pids
    if left:
        problems.append(f"{len(left)} mininet node processes outlived stop(); killed")
        for pid in left:  # ours: started by this run's mininet, found by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    left_ns = _bench_netns()
    if left_ns:
        problems.append(f"namespaces left: {', '.join(left_ns)}")
    new_links = _root_links() - before_links
    mn_like = sorted(x for x in new_links if re.fullmatch(r"s\d+(-eth\d+)?|h\d+-eth\d+", x))
    if mn_like:
        problems.append(f"mininet links appeared in the root namespace: {', '.join(mn_like[:5])}")
    now = _host_sysctls()
    changed = {k: (v, now.get(k)) for k, v in before_sysctls.items() if now.get(k) != v}
    if changed:
        problems.append(f"host sysctls changed: {changed}")
    return problems


# --- the whole run -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def bringup(
    pods: Iterable[int], nodes: int = 10, *, baseline: bool = True, log: Log = print, command: str = ""
) -> dict[str, Any]:
    """Run the bring-up benchmark; a JSON-ready dict of machine facts, runs and ratios."""
    pods = list(pods)
    if os.geteuid() != 0:
        from netlab.errors import PrivilegeError

        raise PrivilegeError("`netlab bench bringup` needs root: it builds labs and namespaces; run it with sudo")
    for n in pods:
        if n // nodes > 253:
            raise BenchError(f"{n} pods over {nodes} nodes is more than 253 per node (a /24 each); add --nodes")
    skip = None if baseline else "mininet baseline skipped (--no-baseline)"
    if baseline:
        skip = mininet_missing()
        if skip:
            log(skip)
    before_links = _root_links()
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="netlab-bench-") as tmp:
        work = Path(tmp)
        for n in pods:
            results.append(run_netlab(n, nodes, work, log))
            if not skip:
                results.append(run_mininet(n, work, log))
    after_links = _root_links()
    ratios = []
    for n in pods:
        nl = next((r for r in results if r.tool == "netlab" and r.pods == n), None)
        mn = next((r for r in results if r.tool == "mininet" and r.pods == n), None)
        if nl and mn and nl.ok and mn.ok and nl.total_s and mn.total_s:
            ratio = nl.total_s / mn.total_s
            with_settle = (nl.total_s + (nl.settle_s or 0)) / (mn.total_s + (mn.settle_s or 0))
            ratios.append(
                {
                    "pods": n,
                    "netlab_s": round(nl.total_s, 3),
                    "mininet_s": round(mn.total_s, 3),
                    "ratio": round(ratio, 4),
                    "speedup": round(1 / ratio, 1),
                    "target": TARGET_RATIO,
                    "met": ratio <= TARGET_RATIO,
                    "ratio_with_settle": round(with_settle, 4),
                }
            )
    mininet_version = next((r.detail.get("version") for r in results if r.tool == "mininet"), None)
    return {
        "command": command,
        "machine": {**machine(), "mininet": mininet_version},
        "nodes": nodes,
        "overlay": "vxlan",
        "baseline": skip or "mininet: mn --topo single,N --switch lxbr --controller none --test none",
        "objects_formula": {"netlab": "2 + 8*nodes + 3*nodes*(nodes-1) + 5*pods", "mininet": "1 + 4*pods"},
        "runs": [r.as_dict() for r in results],
        "ratios": ratios,
        "root_links_unchanged": before_links == after_links,
        "ok": all(r.ok for r in results) and before_links == after_links,
    }


def print_table(data: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    m = data["machine"]
    console.print(
        f"[bold]bring-up benchmark[/bold]: {data['nodes']} nodes, {data['overlay']}; "
        f"{m['nproc']} CPUs, Linux {m['kernel']}, Python {m['python']}"
        + (f", mininet {m['mininet']}" if m.get("mininet") else "")
    )
    failed = [r for r in data["runs"] if not r["ok"]]
    cols = ["PODS", "TOOL", "UP s", "DOWN s", "TOTAL s", "IDLE s", "OBJECTS", "UP obj/s", "DOWN obj/s", "RSS MiB"]
    t = Table(*cols, *(["CHECK"] if failed else []), box=None, padding=(0, 1, 0, 0), pad_edge=False)
    for r in data["runs"]:
        row = [
            str(r["pods"]),
            r["tool"],
            _f(r["up_s"]),
            _f(r["down_s"]),
            _f(r["total_s"]),
            _f(r["settle_s"]),
            str(r["objects"]),
            _f(r["up_objects_per_s"], 0),
            _f(r["down_objects_per_s"], 0),
            _f(r["peak_rss_mib"], 1),
        ]
        if failed:
            row.append("ok" if r["ok"] else f"[red]FAILED[/red] {r['check']}")
        t.add_row(*row)
    console.print(t)
    if not failed:
        console.print(
            "checked: every netlab lab had all pods Running, the expected objects in the kernel and a cross-node "
            "ping before `down` was timed; mininet pinged h1 -> hN; nothing was left behind"
        )
    console.print(
        "TOTAL = up + down, each the wall time of its process; IDLE = seconds after down until the kernel's "
        "namespace cleanup let the CPUs go idle (not in TOTAL); RSS = peak of the tool's own process"
    )
    for q in data["ratios"]:
        verdict = "[green]met[/green]" if q["met"] else "[red]missed[/red]"
        console.print(
            f"N={q['pods']}: netlab {q['netlab_s']:.2f} s vs mininet {q['mininet_s']:.2f} s = "
            f"{q['ratio']:.3f} ({q['speedup']}x faster; {q['ratio_with_settle']:.3f} with the kernel's cleanup "
            f"until idle); target <= {q['target']}: {verdict}"
        )
    if not data["baseline"].startswith("mininet:"):
        console.print(data["baseline"])
    if not data["root_links_unchanged"]:
        console.print("[red]the root namespace's links changed during the run[/red]")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def check(data: dict[str, Any]) -> None:
    """Raise if any run failed its checks (after the table is printed)."""
    bad = [f"{r['tool']} N={r['pods']}: {r['check']}" for r in data["runs"] if not r["ok"]]
    if not data["root_links_unchanged"]:
        bad.append("the root namespace's links changed")
    if bad:
        raise BenchError("benchmark run failed its checks: " + "; ".join(bad))


def _main(argv: list[str]) -> int:
    """`python -m netlab.bench --topology N [NODES]`: print the generated topology."""
    if len(argv) >= 2 and argv[0] == "--topology":
        pods = int(argv[1])
        nodes = int(argv[2]) if len(argv) > 2 else 10
        header = (
            f"# Generated by `python -m netlab.bench --topology {pods} {nodes}` (netlab/bench.py):\n"
            f"# the lab `netlab bench bringup --pods {pods} --nodes {nodes}` times: {pods} pods\n"
            f"# round-robin over {nodes} nodes, flannel-style VXLAN. "
            f"{netlab_objects(pods, nodes)} kernel objects (docs/benchmarks.md).\n"
        )
        sys.stdout.write(topology_yaml(pods, nodes, header))
        return 0
    sys.stderr.write("usage: python -m netlab.bench --topology PODS [NODES]\n")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
