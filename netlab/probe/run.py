"""`netlab probe` and `netlab capture`: plan, open every capture socket, trace, inject, collect,
close everything, correlate.

    resolve SRC/DST -> plan hops (pure) -> open one AF_PACKET socket per hop -> trace tables +
    listeners in the nodes -> send probe k, read until its reply is back at the source (or a
    timeout) -> close sockets, remove trace tables -> walks (pure) -> table / JSON / pcapng
"""

from __future__ import annotations

import dataclasses
import random
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.errors import LabError
from netlab.kernel import netns
from netlab.probe import path, view
from netlab.probe.capture import CaptureSet
from netlab.probe.correlate import Captured, ProbeSpec, Walk, correlate, diagnose
from netlab.probe.inject import ArpFailure, Injector, NoRoute, make_specs
from netlab.probe.model import Hop, LabView, ProbePlan
from netlab.probe.nftrace import ChainPath, TraceEvent
from netlab.probe.packet import UDP, parse
from netlab.probe.pcapng import PcapngWriter
from netlab.probe.tracer import Counters, TraceSession, table_name

__all__ = ["CaptureResult", "ProbeResult", "capture", "probe"]


@dataclass
class ProbeResult:
    lab: str
    plan: ProbePlan
    walks: list[Walk]
    tracer: dict[str, str]  # node -> "nftrace" | "counters" | "none"
    counters: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    events: list[TraceEvent] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)  # hop -> frames its socket dropped
    frames_captured: int = 0
    pcap: str | None = None
    pcap_frames: int = 0
    pcap_arp: int = 0  # of which ARP frames seen while the probes ran
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # set when the probe could not be sent (ARP failure at the source)

    def as_dict(self) -> dict[str, Any]:
        d = self.plan.destination
        s = self.plan.source
        return {
            "lab": self.lab,
            "source": {"kind": s.kind, "name": s.name, "ip": str(s.ip) if s.ip else None, "netns": s.netns},
            "destination": {
                "kind": d.kind,
                "name": d.name,
                "ip": str(d.ip),
                "port": d.port,
                "proto": d.proto,
                "candidates": [{"ip": str(c.ip), "port": c.port, "pod": c.pod, "node": c.node} for c in d.candidates],
            },
            "hops": [{"hop": h.label, "netns": h.netns, "interface": h.ifname, "role": h.role} for h in self.plan.hops],
            "branches": [
                {"endpoint": b.endpoint.pod if b.endpoint else None, "hops": [h.label for h in b.hops]}
                for b in self.plan.branches
            ],
            "tracer": self.tracer,
            "walks": [w.as_dict() for w in self.walks],
            "counters": {n: [{"packets": p, "rule": r} for p, r in v] for n, v in self.counters.items()},
            "capture": {"frames": self.frames_captured, "drops": self.drops},
            "pcap": {
                "file": self.pcap,
                "frames": self.pcap_frames,
                "arp_frames": self.pcap_arp,
                "interfaces": [h.label for h in self.plan.hops],
            }
            if self.pcap
            else None,
            "timings_ms": self.timings_ms,
            "error": self.error,
        }


def _vxlan_ports(v: LabView) -> frozenset[int]:
    return frozenset(n.vxlan_port for n in v.nodes if n.vxlan_port) or frozenset({8472})


def _reply_home(spec: ProbeSpec, frame: Captured, plan: ProbePlan, ports: frozenset[int]) -> bool:
    """Whether this frame is the probe's answer arriving back in the source's namespace."""
    hop = plan.hops[frame.hop]
    if hop.netns != plan.source.netns or frame.outgoing:
        return False
    pkt = parse(frame.data, ports)
    if pkt is None or pkt.innermost.ip is None:
        return False
    ip = pkt.innermost.ip
    if spec.is_reply(ip):
        return True
    if isinstance(ip.l4, UDP) and spec.proto == "udp":
        if plan.source.kind == "node":  # before the node's own reverse NAT: from the endpoint
            return ip.src in {spec.dst, *(c.ip for c in plan.destination.candidates)}
        return ip.dst == spec.src and ip.l4.dport == spec.sport and ip.l4.sport == spec.dport
    return False


def _wait(
    caps: CaptureSet,
    trace: TraceSession | None,
    until: float,
    done: Callable[[list[Captured]], bool],
    frames: list[Captured],
) -> bool:
    """Read every socket until `done(new frames)` or the deadline; True if done."""
    poller = select.poll()
    for s in caps.socks:
        poller.register(s.fileno(), select.POLLIN)
    tfds = trace.fds() if trace else {}
    for fd in tfds:
        poller.register(fd, select.POLLIN)
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return False
        ready = poller.poll(max(1, int(left * 1000)))
        if trace:
            for fd, _ in ready:
                if fd in tfds:
                    trace.read(fd)
        new = caps.drain()
        frames.extend(new)
        if new and done(new):
            return True


def probe(
    lab_name: str,
    src: str,
    dst: str,
    *,
    port: int | None = None,
    proto: str | None = None,
    count: int = 1,
    timeout: float = 1.0,
    pcap: str | Path | None = None,
    seed: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> ProbeResult:
    """Walk `count` probes from SRC to DST and back; see the module docstring."""
    t0 = time.perf_counter()
    if count < 1:
        raise LabError("--count must be at least 1")
    with view.reading(lab_name):
        v = view.load_view(lab_name)
        source = path.resolve_source(v, src)
        dest = path.resolve_destination(v, dst, port, proto, source)
        plan = path.plan_probe(v, source, dest)
        nodes = [v.node(n) for n in plan.nodes]
        tracer = {n.name: n.tracer for n in nodes}
        ports = _vxlan_ports(v)
        t_plan = time.perf_counter()
        rng = random.Random(seed)
        frames: list[Captured] = []
        specs: list[ProbeSpec] = []
        result = ProbeResult(lab_name, plan, [], tracer)
        try:
            with Injector(source, dest.ip) as inj:
                specs = make_specs(inj.src_ip, dest.ip, dest.port, dest.proto, count, rng)
                with (
                    CaptureSet(plan.hops) as caps,
                    TraceSession(nodes, [s.ip_id for s in specs]) as trace,
                    Counters(nodes) as counters,
                ):
                    t_ready = time.perf_counter()
                    if on_ready:
                        on_ready()
                    try:
                        inj.resolve()
                    except ArpFailure as exc:
                        result.error = str(exc)
                    sent: list[ProbeSpec] = []
                    if result.error is None:
                        for spec in specs:
                            data = inj.frame(spec)
                            spec = dataclasses.replace(
                                spec, sent_ns=time.time_ns(), sent=data if source.kind == "node" else b""
                            )
                            inj.send_raw(data)
                            sent.append(spec)

                            def home(new: list[Captured], s: ProbeSpec = spec) -> bool:
                                return any(_reply_home(s, f, plan, ports) for f in new)

                            _wait(caps, trace, time.monotonic() + timeout, home, frames)
                    specs = sent
                    # the reply is the last thing to happen: whatever else there was is queued already
                    frames.extend(caps.drain(0.005))
                    trace.drain()
                    caps.read_drops()
                    result.drops = {plan.hops[i].label: st.drops for i, st in enumerate(caps.stats) if st.drops}
                    result.events = list(trace.events)
                    result.counters = {k: v2 for k, v2 in counters.moved().items() if v2}
                    t_sent = time.perf_counter()
                    trace.name_rules(result.events)
        except NoRoute as exc:
            result.error = str(exc)
            t_ready = t_sent = time.perf_counter()
        except FileNotFoundError as exc:
            raise LabError(f"lab {lab_name!r} is being torn down: {exc.filename or 'a namespace'} is gone") from None
    end_ns = time.time_ns()
    result.frames_captured = len(frames)
    result.walks = correlate(
        plan, specs, frames, result.events, vxlan_ports=ports, end_ns=end_ns, skip_tables=(table_name(),)
    )
    _add_counters(result)
    if result.error and not result.walks:
        result.walks = []
    for w in result.walks:
        if w.verdict == "lost" and w.request:
            _check_route(v, w, plan)
    if pcap is not None:
        result.pcap = str(pcap)
        result.pcap_frames, result.pcap_arp = write_pcap(pcap, plan.hops, result.walks, frames, ports)
    t_end = time.perf_counter()
    result.timings_ms = {
        "plan": round((t_plan - t0) * 1000, 1),
        "setup": round((t_ready - t_plan) * 1000, 1),
        "probes": round((t_sent - t_ready) * 1000, 1),
        "total": round((t_end - t0) * 1000, 1),
    }
    return result


def _add_counters(result: ProbeResult) -> None:
    """iptables-legacy: no trace; the rules whose counters moved stand in for the rule path."""
    for node, moved in result.counters.items():
        cp = ChainPath("counters (iptables-legacy)", chains=counter_path([r for _, r in moved]))
        rejects = [r for _, r in moved if " -j REJECT" in r or " -j DROP" in r]
        if rejects:
            table, rule = rejects[0].split(" ", 1)
            cp.verdict = "drop"
            cp.last = TraceEvent(0, 2, table, rule.split()[1], "rule", "drop", rule=rule)
        for w in result.walks:
            w.traces.append((node, "request", cp))
            for o in w.request:
                for c in o.changes:
                    if c.kind == "dnat" and c.where == node and not c.chains:
                        c.chains = ["counters"] + cp.chains
            if cp.verdict == "drop" and w.verdict in ("rejected", "lost", "dropped"):
                diagnose(result.plan, w)


def counter_path(moved: list[str]) -> list[str]:
    """Follow the nat rules whose counters moved from PREROUTING (or OUTPUT) through their jumps:
    KUBE-SERVICES -> KUBE-SVC-... -> KUBE-SEP-... -> DNAT <endpoint>. `moved` holds
    `<table> -A <chain> ... -j <target>` lines."""
    edges: dict[str, list[str]] = {}
    for line in moved:
        table, _, rule = line.partition(" ")
        if table != "nat":
            continue
        parts = rule.split()
        if len(parts) < 2 or "-j" not in parts:
            continue
        target = parts[parts.index("-j") + 1]
        if target in ("MARK", "RETURN", "ACCEPT", "CONNMARK"):
            continue
        if target == "DNAT" and "--to-destination" in parts:
            target = "DNAT " + parts[parts.index("--to-destination") + 1]
        edges.setdefault(parts[1], []).append(target)
    out: list[str] = []
    start = "PREROUTING" if "PREROUTING" in edges else "OUTPUT"
    seen = {start}

    def walk(chain: str) -> None:
        for t in edges.get(chain, []):
            if t in seen:
                continue
            seen.add(t)
            out.append(t)
            walk(t)

    walk(start)
    return [f"nat {start}", *out] if out else []


def _check_route(v: LabView, w: Walk, plan: ProbePlan) -> None:
    """A probe lost inside a node: ask that node's kernel whether it has a route at all."""
    last = w.request[-1]
    if last.hop.role not in ("cni", "uplink", "vxlan", "veth"):
        return
    try:
        node = v.node(last.hop.owner)
    except KeyError:
        return
    from netlab.probe.inject import route

    try:
        route(node.netns, last.ip.dst)
    except NoRoute:
        diagnose(plan, w, {node.name: f"no route to {last.ip.dst} in node {node.name}"})
    except Exception:  # noqa: BLE001 - only a hint
        return


def write_pcap(
    file: str | Path, hops: list[Hop], walks: list[Walk], frames: list[Captured], ports: frozenset[int]
) -> tuple[int, int]:
    """One pcapng: an interface per hop, the frames of every walk (and ARP seen meanwhile)."""
    picked: list[tuple[int, int, bool, bytes, str]] = []
    index = {h: i for i, h in enumerate(hops)}
    for w in walks:
        for which, obs in (("request", w.request), ("reply", w.reply)):
            for o in obs:
                picked.append((o.ts_ns, index[o.hop], o.direction == "out", o.data, f"probe {w.probe.index} {which}"))
    for f in frames:
        pkt = parse(f.data, ports)
        if pkt is not None and pkt.arp is not None:
            picked.append((f.ts_ns, f.hop, f.outgoing, f.data, "ARP"))
    picked.sort(key=lambda x: x[0])
    with open(file, "wb") as fh:
        wr = PcapngWriter(fh)
        for h in hops:
            wr.interface(h.label, f"{h.ifname} in netns {h.netns}")
        for ts, i, out, data, comment in picked:
            wr.frame(i, ts, data, outgoing=out, comment=comment)
    return len(picked), sum(1 for p in picked if p[4] == "ARP")


# --- netlab capture ----------------------------------------------------------------------------


@dataclass
class CaptureResult:
    lab: str
    file: str
    hops: list[Hop]
    frames: dict[str, int]
    drops: dict[str, int]
    seconds: float
    stopped_by: str  # "duration" | "interrupt" | "teardown" | "count"

    def as_dict(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "file": self.file,
            "interfaces": [h.label for h in self.hops],
            "frames": self.frames,
            "total_frames": sum(self.frames.values()),
            "drops": self.drops,
            "seconds": round(self.seconds, 3),
            "stopped_by": self.stopped_by,
        }


def capture_hops(lab_name: str, targets: list[str]) -> list[Hop]:
    """TARGET[/IFACE]: a pod, node, `underlay` or `external`; every interface but lo without IFACE."""
    from netlab import lab as labmod

    hops: list[Hop] = []
    for t in targets:
        ns = None
        iface = None
        try:
            ns = labmod.exec_target(lab_name, t)
            owner = t
        except LabError:
            if "/" not in t:
                raise
            base, _, iface = t.rpartition("/")
            ns = labmod.exec_target(lab_name, base)
            owner = base
        names = _links(ns)
        if iface is not None and iface not in names:
            raise LabError(f"{owner} has no interface {iface!r}; it has: {', '.join(sorted(names))}")
        for name in [iface] if iface else sorted(names):
            hop = Hop(ns, name, owner, "bridge" if names[name] == "bridge" else "link", promisc=names[name] == "bridge")
            if hop not in hops:
                hops.append(hop)
    return hops


def _links(ns: str) -> dict[str, str]:
    from pyroute2 import IPRoute

    with netns.inside(ns), IPRoute() as ipr:
        return {
            str(m.get("IFLA_IFNAME")): str(m.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "")
            for m in ipr.get_links()
            if m.get("IFLA_IFNAME") != "lo"
        }


def capture(
    lab_name: str,
    targets: list[str],
    file: str | Path,
    *,
    duration: float | None = None,
    count: int | None = None,
    on_ready: Callable[[list[Hop]], None] | None = None,
) -> CaptureResult:
    """Capture on every hop at once into one pcapng until `duration`, `count` frames, Ctrl-C,
    or the lab's teardown. The file is valid whenever it stops: frames are written as they
    come, after every interface block."""
    hops = capture_hops(lab_name, targets)
    t0 = time.monotonic()
    stopped = "interrupt"
    frames = dict.fromkeys((h.label for h in hops), 0)
    drops: dict[str, int] = {}
    stop: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append("interrupt" if signum == signal.SIGINT else "terminated")

    # Ctrl-C and SIGTERM end the loop between two frames, never in the middle of writing one
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(file, "wb") as fh, CaptureSet(hops) as caps:
            wr = PcapngWriter(fh)
            for h in hops:
                wr.interface(h.label, f"{h.ifname} in netns {h.netns}")
            fh.flush()
            if on_ready:
                on_ready(hops)
            total = 0
            next_check = t0 + 0.5
            while not stop:
                now = time.monotonic()
                if duration is not None and now - t0 >= duration:
                    stopped = "duration"
                    break
                if now >= next_check:
                    next_check = now + 0.5
                    if not all(netns.exists(h.netns) for h in hops):
                        stopped = "teardown"
                        break
                wait = 0.2 if duration is None else max(0.001, min(0.2, duration - (now - t0)))
                try:
                    batch = caps.drain(wait)
                except InterruptedError:
                    continue
                batch.sort(key=lambda f: f.ts_ns)
                for f in batch:
                    wr.frame(f.hop, f.ts_ns, f.data, outgoing=f.outgoing)
                    frames[hops[f.hop].label] += 1
                total += len(batch)
                if batch:
                    fh.flush()
                if count is not None and total >= count:
                    stopped = "count"
                    break
            if stop:
                stopped = stop[0]
            for f in sorted(caps.drain(), key=lambda f: f.ts_ns):
                wr.frame(f.hop, f.ts_ns, f.data, outgoing=f.outgoing)
                frames[hops[f.hop].label] += 1
            caps.read_drops()
            drops = {hops[i].label: st.drops for i, st in enumerate(caps.stats) if st.drops}
            fh.flush()
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
    return CaptureResult(lab_name, str(file), hops, frames, drops, time.monotonic() - t0, stopped)
