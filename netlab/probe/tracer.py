"""The rule path, from the kernel: nftables tracing in each node a probe crosses.

In each node's namespace (never the host's) the probe adds its own small table,
`table ip netlab-trace-<pid>`, whose chains run at priority -160 in prerouting and output and
set `meta nftrace` on the probe's packets only (by IP id; a conntrack mark carries it to the
replies), and listens on that namespace's NFNLGRP_NFTRACE netlink group: `nft monitor
trace`, without a process per node and subscribed before the first probe leaves. The table is
removed afterwards, always: on success, on error and on Ctrl-C (signals are held while it
goes). A table left by a probe that was killed (its pid gone) is removed by the next probe.

iptables rules on the nft backend are nf_tables rules, so this covers iptables mode (Debian's
default backend) and nftables mode. The legacy backend (x_tables) has no such trace here:
the rules whose packet counters moved during the probe are reported instead.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from pyroute2.nftables.main import NFTables

from netlab.kernel import netns, rules
from netlab.probe.model import NodeView
from netlab.probe.nftrace import (
    NETLINK_NETFILTER,
    TRACE_GROUP,
    TraceEvent,
    iptables_rule_text,
    nft_rule_text,
    parse_messages,
    trace_table_script,
)

__all__ = ["TABLE_PREFIX", "Counters", "TraceSession", "stale_tables"]

TABLE_PREFIX = "netlab-trace-"
CT_MARK = 0x6E6C7472  # "nltr"
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33


def table_name() -> str:
    return f"{TABLE_PREFIX}{os.getpid()}"


def _tables(ns: str) -> list[str]:
    with netns.inside(ns):
        nft = NFTables(nfgen_family=socket.AF_INET)
    with nft:
        return [str(t.get("NFTA_TABLE_NAME")) for t in nft.get_tables()]


def stale_tables(names: list[str]) -> list[str]:
    """Trace tables whose probe process is gone."""
    out = []
    for t in names:
        m = re.fullmatch(re.escape(TABLE_PREFIX) + r"(\d+)", t)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            out.append(t)
    return out


@dataclass
class _Node:
    view: NodeView
    sock: socket.socket | None = None
    installed: bool = False


@dataclass
class TraceSession:
    """Trace the probes' packets (`ip_ids`) in `nodes`. Use as a context manager."""

    nodes: list[NodeView]
    ip_ids: list[int]
    table: str = field(default_factory=table_name)
    events: list[TraceEvent] = field(default_factory=list)
    _nodes: list[_Node] = field(default_factory=list)

    def __enter__(self) -> TraceSession:
        try:
            for n in self.nodes:
                if n.tracer != "nftrace":
                    continue
                node = _Node(n)
                self._nodes.append(node)
                with netns.inside(n.netns):
                    node.sock = socket.socket(
                        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
                    )
                node.sock.bind((0, 0))
                try:
                    node.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
                except OSError:
                    pass
                node.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, TRACE_GROUP)
                node.sock.setblocking(False)
            scripts = []
            for node in self._nodes:
                stale = stale_tables(_tables(node.view.netns))
                script = "".join(f"delete table ip {t}\n" for t in stale)
                scripts.append(script + trace_table_script(self.table, self.ip_ids, CT_MARK))
                node.installed = True  # before running it: a half-applied script is still removed
            _parallel(
                [
                    (node.view.netns, ["nft", "-f", "-"], script)
                    for node, script in zip(self._nodes, scripts, strict=True)
                ]
            )
        except BaseException:
            self.close()
            raise
        return self

    def fds(self) -> dict[int, str]:
        return {n.sock.fileno(): n.view.name for n in self._nodes if n.sock is not None}

    def read(self, fd: int) -> None:
        node = next(n for n in self._nodes if n.sock is not None and n.sock.fileno() == fd)
        self._read(node)

    def _read(self, node: _Node) -> None:
        assert node.sock is not None
        while True:
            try:
                data = node.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ENOBUFS: the group overflowed; events were lost
                return
            now = time.time_ns()
            for ev in parse_messages(data):
                ev.node = node.view.name
                ev.ts_ns = now
                self.events.append(ev)

    def drain(self) -> None:
        for n in self._nodes:
            if n.sock is not None:
                self._read(n)

    def close(self) -> None:
        """Remove the trace table from every node it went into, then close the listeners."""
        with netns.signals_deferred():
            gone = [n for n in self._nodes if n.installed and netns.exists(n.view.netns)]
            _parallel([(n.view.netns, ["nft", "delete", "table", "ip", self.table], None) for n in gone], check=False)
            for n in self._nodes:
                n.installed = False
            for n in self._nodes:
                if n.sock is not None:
                    n.sock.close()
                    n.sock = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name_rules(self, events: list[TraceEvent]) -> None:
        """Fill in the text of the rules that dropped or rejected a packet."""
        listings: dict[tuple[str, str], str] = {}
        saves: dict[tuple[str, str], str] = {}
        byname = {n.view.name: n.view for n in self._nodes}
        for ev in events:
            if ev.type != "rule" or ev.handle is None or ev.verdict != "drop" or ev.table == self.table:
                continue
            node = byname.get(ev.node)
            if node is None:
                continue
            key = (node.netns, ev.table)
            if key not in listings:
                r = rules.run(node.netns, ["nft", "-a", "list", "table", "ip", ev.table], check=False)
                listings[key] = r.stdout if r.returncode == 0 else ""
            if ev.table in ("filter", "nat", "mangle", "raw") and node.proxy_mode == "iptables":
                if key not in saves:
                    tool = rules.IptablesTool("nft")
                    r = rules.run(node.netns, [tool.save, "-t", ev.table], check=False)
                    saves[key] = r.stdout if r.returncode == 0 else ""
                text = iptables_rule_text(listings[key], saves[key], ev.chain, ev.handle)
                ev.rule = text or nft_rule_text(listings[key], ev.chain, ev.handle)
            else:
                ev.rule = nft_rule_text(listings[key], ev.chain, ev.handle)


def _parallel(jobs: list[tuple[str, list[str], str | None]], check: bool = True) -> None:
    """Run one tool per node at once (each `nft` start costs ~10 ms); every thread is joined."""
    errors: list[BaseException] = []

    def one(ns: str, argv: list[str], stdin: str | None) -> None:
        try:
            rules.run(ns, argv, stdin=stdin, check=check)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(exc)

    if len(jobs) == 1:
        one(*jobs[0])
    else:
        threads = [threading.Thread(target=one, args=job, name="netlab-nft") for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def installed_tables(ns: str) -> list[str]:
    """The probe trace tables in a namespace (for tests and cleanup checks)."""
    return [t for t in _tables(ns) if t.startswith(TABLE_PREFIX)]


@dataclass
class Counters:
    """iptables-legacy: the rules whose packet counters moved while the probe ran."""

    nodes: list[NodeView]
    before: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> dict[str, str]:
        out = {}
        for n in self.nodes:
            if n.tracer == "counters":
                tool = rules.IptablesTool("legacy")
                out[n.name] = rules.run(n.netns, [tool.save, "-c"], check=False).stdout
        return out

    def __enter__(self) -> Counters:
        self.before = self.snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def moved(self) -> dict[str, list[tuple[int, str]]]:
        """node -> [(packets, `-A` rule)] for every rule whose counter grew."""
        after = self.snapshot()
        return {node: counter_deltas(self.before.get(node, ""), text) for node, text in after.items()}


_COUNTED = re.compile(r"^\[(\d+):(\d+)\] (-A .*)$")


def counter_deltas(before: str, after: str) -> list[tuple[int, str]]:
    """Rules (table-qualified) whose packet counters grew between two `iptables-save -c`."""

    def parse(text: str) -> dict[str, int]:
        out: dict[str, int] = {}
        table = ""
        seen: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
                continue
            m = _COUNTED.match(line)
            if m:
                rule = f"{table} {m.group(3)}"
                n = seen.get(rule, 0)  # identical rules in one chain stay distinct
                seen[rule] = n + 1
                out[f"{rule}#{n}" if n else rule] = int(m.group(1))
        return out

    b, a = parse(before), parse(after)
    return [(a[k] - b.get(k, 0), k.split("#", 1)[0]) for k in a if a[k] > b.get(k, 0)]
