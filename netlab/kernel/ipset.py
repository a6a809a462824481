"""ipsets inside a node namespace: read them with `ipset save`, change them with one `ipset restore`.

kube-proxy's IPVS mode runs one `ipset add`/`ipset del` process per changed entry (slow at scale,
kubernetes#133773). netlab diffs the same way (what the kernel has against what is wanted) but
sends the whole difference to a single `ipset restore`, inside the node's namespace.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from netlab.errors import KernelError
from netlab.kernel import rules
from netlab.render.ipvs import IpsetSpec

__all__ = ["KernelSet", "destroy", "diff", "restore", "save"]


@dataclass
class KernelSet:
    """One set as `ipset save` shows it."""

    name: str
    type: str
    header: str  # the rest of the create line (family, hashsize, ... as the kernel reports them)
    entries: set[str] = field(default_factory=set)


def parse_save(text: str) -> dict[str, KernelSet]:
    """`ipset save` output -> name -> set, in the order the kernel lists them."""
    out: dict[str, KernelSet] = {}
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[0] == "create":
            out[parts[1]] = KernelSet(parts[1], parts[2], parts[3] if len(parts) > 3 else "")
        elif len(parts) >= 3 and parts[0] == "add" and parts[1] in out:
            out[parts[1]].entries.add(parts[2])
    return out


def save(ns: str) -> dict[str, KernelSet]:
    return parse_save(save_text(ns))


def save_text(ns: str) -> str:
    return rules.run(ns, ["ipset", "save"]).stdout


def diff(have: dict[str, KernelSet], want: Iterable[IpsetSpec]) -> list[str]:
    """`ipset restore` lines turning `have` into `want`: create missing sets (kube-proxy's
    CreateSet with -exist), delete stale entries, add missing ones (its syncIPSetEntries).
    Sets not named in `want` are left alone."""
    lines: list[str] = []
    for s in want:
        cur = have.get(s.name)
        if cur is None:
            lines.append(s.create())
            lines += [f"add {s.name} {e}" for e in s.entries]
            continue
        wanted = set(s.entries)
        lines += [f"del {s.name} {e}" for e in sorted(cur.entries - wanted)]
        lines += [f"add {s.name} {e}" for e in s.entries if e not in cur.entries]
    return lines


def restore(ns: str, lines: list[str]) -> None:
    """One `ipset restore -exist` of `lines` in `ns` (-exist: a create of an identical set, an add of
    a present entry or a del of a missing one is not an error, as kube-proxy ignores them)."""
    if not lines:
        return
    payload = "".join(line + "\n" for line in lines)
    r = rules.run(ns, ["ipset", "restore", "-exist"], stdin=payload, check=False)
    if r.returncode != 0:
        detail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        raise KernelError("ipset restore", ns, None, detail)


def destroy(ns: str, names: Iterable[str]) -> None:
    """Destroy the named sets that exist (iptables rules must no longer reference them)."""
    have = save(ns)
    restore(ns, [f"destroy {n}" for n in names if n in have])
