"""kube-proxy's rules inside a node namespace: apply, read back, clean up.

Rules go in the way kube-proxy puts them in: the whole desired state in one atomic
transaction per node, `iptables-restore --noflush` (the iptables backend the system's
`iptables` uses, nft on Debian 12, or legacy when chosen) or `nft -f`. The tools run inside
the node's network namespace (`nsenter --net`), so every table they touch is the node's own.
"""

from __future__ import annotations

import errno
import re
import subprocess
from dataclasses import dataclass

from netlab.errors import FeatureError, KernelError
from netlab.kernel import netns

__all__ = [
    "IptablesTool",
    "apply_iptables",
    "apply_nft",
    "delete_nft_table",
    "has_nft_table",
    "iptables_chains",
    "iptables_save",
    "nft_list",
    "run",
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


def run(ns: str, argv: list[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool inside netns `ns` (only the network namespace changes)."""
    try:
        r = subprocess.run(
            ["nsenter", f"--net={netns.path(ns)}", *argv], input=stdin, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise FeatureError(f"{exc.filename} is not installed; run `sudo scripts/setup`") from None
    if r.returncode == 127 or "No such file or directory" in r.stderr and argv[0] in r.stderr:
        raise FeatureError(f"{argv[0]} is not installed; run `sudo scripts/setup`")
    if check and r.returncode != 0:
        raise KernelError(" ".join(argv[:2]), ns, None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
    return r


def _context(payload: str, line: int, around: int = 3) -> str:
    lines = payload.splitlines()
    lo, hi = max(0, line - 1 - around), min(len(lines), line + around)
    return "\n".join(f"{'>' if i + 1 == line else ' '}{i + 1:6d}  {lines[i]}" for i in range(lo, hi))


def apply_iptables(ns: str, tool: IptablesTool, payload: str) -> None:
    """One `iptables-restore --noflush --counters` of the whole payload: all or nothing."""
    r = run(ns, [tool.restore, "-w", "5", "--noflush", "--counters"], stdin=payload, check=False)
    if r.returncode != 0:
        # kube-proxy's way: show the lines around the one the kernel refused
        m = re.search(r"line:? (\d+)", r.stderr)
        where = f"\n{_context(payload, int(m.group(1)))}" if m else ""
        raise KernelError(f"{tool.restore} --noflush", ns, None, r.stderr.strip().splitlines()[0] + where)


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


def apply_nft(ns: str, script: str) -> None:
    r = run(ns, ["nft", "-f", "-"], stdin=script, check=False)
    if r.returncode != 0:
        m = re.search(r":(\d+):\d+-\d+: Error", r.stderr)
        where = f"\n{_context(script, int(m.group(1)))}" if m else ""
        first = next((line for line in r.stderr.splitlines() if "Error" in line), r.stderr.strip())
        raise KernelError("nft -f", ns, None, first + where)


def has_nft_table(ns: str) -> bool:
    r = run(ns, ["nft", "list", "tables", "ip"], check=False)
    return r.returncode == 0 and f"table {NFT_TABLE[0]} {NFT_TABLE[1]}" in r.stdout


def nft_list(ns: str) -> str:
    r = run(ns, ["nft", "list", "table", *NFT_TABLE], check=False)
    if r.returncode != 0:
        raise KernelError("nft list table ip kube-proxy", ns, errno.ENOENT)
    return r.stdout


def delete_nft_table(ns: str) -> None:
    """kube-proxy's nftables CleanupLeftovers: delete the one table it owns."""
    if has_nft_table(ns):
        run(ns, ["nft", "delete", "table", *NFT_TABLE])
