"""kube-proxy's rules inside a node namespace: apply, read back, clean up.

Rules go in the way kube-proxy puts them in: the whole desired state in one atomic
transaction per node, `iptables-restore --noflush` (the iptables backend the system's
`iptables` uses, nft on Debian 12, or legacy when chosen; a whole-table restore without
--noflush where the tables hold nothing else, see netlab.kernel.proxy) or `nft -f`. The tools run inside
the node's network namespace (`nsenter --net`), so every table they touch is the node's own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from pyroute2.nftables.main import NFTables

from netlab.errors import FeatureError, KernelError
from netlab.kernel import netns

T = TypeVar("T")

__all__ = [
    "IptablesTool",
    "SavedTable",
    "apply_iptables",
    "apply_nft",
    "delete_nft_table",
    "has_kube_services",
    "has_nft_table",
    "iptables_chains",
    "iptables_save",
    "iptables_tables",
    "nft_list",
    "parse_iptables_save",
    "run",
    "while_tools_run",
]

NFT_TABLE = ("ip", "kube-proxy")


@dataclass(frozen=True)
class IptablesTool:
    """The iptables binaries of one backend ("auto" = whatever `iptables` is here)."""

    backend: str

    def _name(self, tool: str) -> str:
        return {
            "auto": tool,
            "nft": tool.replace("iptables", "iptables-nft"),
            "legacy": tool.replace("iptables", "iptables-legacy"),
        }[self.backend]

    @property
    def restore(self) -> str:
        return self._name("iptables-restore")

    @property
    def save(self) -> str:
        return self._name("iptables-save")

    @property
    def iptables(self) -> str:
        return self._name("iptables")

    @property
    def concrete(self) -> str:
        """The backend these binaries write: "nft" or "legacy" ("auto" asks the system's `iptables`)."""
        return _auto_backend() if self.backend == "auto" else self.backend


@functools.cache
def _auto_backend() -> str:
    """What `iptables` is on this system (Debian's alternatives): `iptables v1.8.9 (nf_tables)`."""
    try:
        r = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FeatureError("iptables is not installed; run `sudo scripts/setup`") from None
    return "legacy" if "(legacy)" in r.stdout else "nft"


class _IdleWork(threading.local):
    """Work a sync hands over to run while a tool is busy (per thread)."""

    task: concurrent.futures.Future[Any] | None = None
    fn: Callable[[], Any] | None = None


_idle = _IdleWork()


@contextlib.contextmanager
def while_tools_run(fn: Callable[[], T]) -> Iterator[concurrent.futures.Future[T]]:
    """Run `fn` in a thread once the first tool of this block has started (its process works in
    the kernel while our thread only waits, GIL released), or at the end of the block if no
    tool ran. Starting it earlier would only share the GIL with the render it waits behind."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    _idle.fn, _idle.task = fn, fut
    try:
        yield fut
    finally:
        pending, _idle.fn, _idle.task = _idle.fn, None, None
        if pending is not None:  # no tool ran: do it here
            _run_into(fut, pending)
        else:
            fut.exception()  # wait for the thread (result or error stays in the future)


def _run_into(fut: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    try:
        fut.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
        fut.set_exception(exc)


def _start_idle_work() -> None:
    fn, fut = _idle.fn, _idle.task
    if fn is None or fut is None:
        return
    _idle.fn = None
    threading.Thread(target=_run_into, args=(fut, fn), name="netlab-idle-work", daemon=True).start()


def run(
    ns: str, argv: list[str], *, stdin: str | Iterable[str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tool inside netns `ns` (only the network namespace changes). `stdin` may be pieces
    of text produced while the tool runs (a streamed render): each is written as soon as it
    exists, so the tool parses the first ones while the rest are computed."""
    cmd = ["nsenter", f"--net={netns.path(ns)}", *argv]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except FileNotFoundError as exc:
        raise FeatureError(f"{exc.filename} is not installed; run `sudo scripts/setup`") from None
    with proc:
        if stdin is None or isinstance(stdin, str):
            _start_idle_work()
            out, err = proc.communicate(stdin)
        else:  # the idle work would compete with the render for the GIL: start it afterwards
            out, err = _feed(proc, stdin, then=_start_idle_work)
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if r.returncode == 127 or "No such file or directory" in r.stderr and argv[0] in r.stderr:
        raise FeatureError(f"{argv[0]} is not installed; run `sudo scripts/setup`")
    if check and r.returncode != 0:
        raise KernelError(" ".join(argv[:2]), ns, None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
    return r


def _feed(proc: subprocess.Popen[str], pieces: Iterable[str], *, then: Callable[[], None]) -> tuple[str, str]:
    """Write `pieces` to the tool's stdin as they come, call `then`, wait for the tool: (stdout,
    stderr).
    stdout and stderr are drained by threads meanwhile (a tool that writes much while we write
    would otherwise block on a full pipe). If producing a piece fails, the tool is killed before
    it sees the end of its input: iptables-restore and nft commit nothing they did not finish."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    got: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f.read()), daemon=True)
        for k, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for t in readers:
        t.start()
    try:
        for piece in pieces:
            proc.stdin.write(piece)
        proc.stdin.close()
    except BrokenPipeError:  # the tool stopped reading (it failed): its stderr says why
        _close_quietly(proc.stdin)
        then()
    except BaseException:
        proc.kill()
        _close_quietly(proc.stdin)  # what is still buffered has nowhere to go
        proc.wait()
        for t in readers:
            t.join()
        raise
    else:
        then()  # the tool works on (the kernel commit) while this runs
    proc.wait()
    for t in readers:
        t.join()
    return got.get("out", ""), got.get("err", "")


def _context(payload: str, line: int, around: int = 3) -> str:
    lines = payload.splitlines()
    lo, hi = max(0, line - 1 - around), min(len(lines), line + around)
    return "\n".join(f"{'>' if i + 1 == line else ' '}{i + 1:6d}  {lines[i]}" for i in range(lo, hi))


def _close_quietly(f: IO[str]) -> None:
    """Close a pipe whose reader is gone: the final flush fails with EPIPE, the file is closed
    anyway (so the Popen's own close later does nothing)."""
    with contextlib.suppress(BrokenPipeError):
        f.close()


def apply_iptables(ns: str, tool: IptablesTool, payload: str | Iterable[str], *, noflush: bool = True) -> None:
    """One `iptables-restore --counters` of the whole payload: all or nothing (one transaction per
    table). With --noflush (kube-proxy's way) only the chains the payload names change; without
    it each table the payload names is flushed and replaced whole, builtin chains included.
    `payload` may be the pieces of a streamed render (`iter_render_iptables`)."""
    flags = ["--noflush"] if noflush else []
    sent: list[str] = []
    if not isinstance(payload, str):
        payload = _kept(payload, sent)
    r = run(ns, [tool.restore, "-w", "5", *flags, "--counters"], stdin=payload, check=False)
    if r.returncode != 0:
        # kube-proxy's way: show the lines around the one the kernel refused
        m = re.search(r"line:? (\d+)", r.stderr)
        text = payload if isinstance(payload, str) else "".join(sent)
        where = f"\n{_context(text, int(m.group(1)))}" if m else ""
        what = " ".join([tool.restore, *flags])
        raise KernelError(what, ns, None, (r.stderr.strip().splitlines() or [""])[0] + where)


def _kept(pieces: Iterable[str], into: list[str]) -> Iterator[str]:
    """`pieces`, each also appended to `into` (for the error context of a refused line)."""
    for piece in pieces:
        into.append(piece)
        yield piece


def iptables_save(ns: str, tool: IptablesTool, *, counters: bool = False, table: str | None = None) -> str:
    argv = [tool.save] + (["-c"] if counters else []) + (["-t", table] if table else [])
    return run(ns, argv).stdout


def iptables_chains(ns: str, tool: IptablesTool) -> dict[str, set[str]]:
    """table -> chain names, from `iptables-save` (the chain declaration lines)."""
    out: dict[str, set[str]] = {}
    table = ""
    for line in iptables_save(ns, tool).splitlines():
        if line.startswith("*"):
            table = line[1:]
            out.setdefault(table, set())
        elif line.startswith(":"):
            out[table].add(line[1:].split(" ", 1)[0])
    return out


@dataclass
class SavedTable:
    """One table as `iptables-save` prints it: chain -> policy ("-" for a user-defined chain,
    else the builtin chain's policy) and the `-A` rule lines, both in the order printed."""

    chains: dict[str, str] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)


def parse_iptables_save(text: str) -> dict[str, SavedTable]:
    """table -> SavedTable. Counters (`-c`) are not expected."""
    out: dict[str, SavedTable] = {}
    table = SavedTable()
    for line in text.splitlines():
        if line.startswith("*"):
            table = out.setdefault(line[1:], SavedTable())
        elif line.startswith(":"):
            name, policy = line[1:].split(" ", 2)[:2]
            table.chains[name] = policy
        elif line.startswith("-A "):
            table.rules.append(line)
    return out


def iptables_tables(ns: str, tool: IptablesTool) -> dict[str, SavedTable]:
    """Every table the backend has in the node (one `iptables-save`), parsed."""
    return parse_iptables_save(iptables_save(ns, tool))


def _legacy_tables(ns: str) -> set[str]:
    """The legacy (x_tables) tables that exist in netns `ns`. Read from the kernel's own list: any
    `iptables-legacy` command, a listing included, would create the table it names there."""
    with netns.inside(ns):
        try:
            with open("/proc/thread-self/net/ip_tables_names") as f:
                return set(f.read().split())
        except FileNotFoundError:  # ip_tables is not loaded: no legacy table anywhere
            return set()


def has_kube_services(ns: str, tool: IptablesTool) -> bool:
    """Whether kube-proxy's nat KUBE-SERVICES is in effect in this backend, without reading the
    table (an `iptables-save` of 10k services takes a second): nat PREROUTING is listed, and a
    jump to KUBE-SERVICES there proves the chain exists, since the kernel refuses to delete a
    chain that a rule still references (EBUSY). A missing jump reads as no rules, which gets
    the node a full sync: the one that puts the jump back."""
    if tool.concrete == "legacy" and "nat" not in _legacy_tables(ns):
        return False
    try:
        r = run(ns, [tool.iptables, "-w", "5", "-t", "nat", "-S", "PREROUTING"], check=False)
    except FeatureError:  # this backend's tools are not installed: netlab wrote nothing with them
        return False
    return r.returncode == 0 and any(line.endswith(" -j KUBE-SERVICES") for line in r.stdout.splitlines())


def apply_nft(ns: str, script: str) -> None:
    r = run(ns, ["nft", "-f", "-"], stdin=script, check=False)
    if r.returncode != 0:
        m = re.search(r":(\d+):\d+-\d+: Error", r.stderr)
        where = f"\n{_context(script, int(m.group(1)))}" if m else ""
        first = next((line for line in r.stderr.splitlines() if "Error" in line), r.stderr.strip())
        raise KernelError("nft -f", ns, None, first + where)


def has_nft_table(ns: str) -> bool:
    """Whether `table ip kube-proxy` exists: one netlink dump of the netns' ip tables. (`nft list
    tables` first fills its cache with every chain and rule: 3 s on a node holding 10k services
    in iptables-nft, whose tables are nf_tables tables too.)"""
    with netns.inside(ns):
        nft = NFTables(nfgen_family=socket.AF_INET)  # the socket stays in the netns it was made in
    with nft:
        return any(t.get("NFTA_TABLE_NAME") == NFT_TABLE[1] for t in nft.get_tables())


def nft_list(ns: str) -> str:
    r = run(ns, ["nft", "list", "table", *NFT_TABLE], check=False)
    if r.returncode != 0:
        raise KernelError("nft list table ip kube-proxy", ns, errno.ENOENT)
    return r.stdout


def delete_nft_table(ns: str) -> None:
    """kube-proxy's nftables CleanupLeftovers: delete the one table it owns."""
    if has_nft_table(ns):
        run(ns, ["nft", "delete", "table", *NFT_TABLE])
