"""Read kube-proxy's rules back as the picture textbooks draw, from what the kernel holds.

    KUBE-SERVICES -> KUBE-SVC-<hash> -> KUBE-SEP-<hash> -> DNAT ip:port      (iptables)
    service-ips map -> service-<hash>-ns/name/proto/port -> endpoint-<hash>-... -> dnat  (nftables)

Input is the tools' own output (`iptables-save -c`, `nft list table ip kube-proxy`), so the
tree shows what the kernel has, with live packet counters where the mode keeps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ServiceTree", "iptables_tree", "nft_tree"]


@dataclass
class Hop:
    """One step down the tree: a rule that jumps somewhere, with what it matched."""

    chain: str
    target: str
    what: str = ""
    packets: int | None = None
    probability: float | None = None
    children: list[Hop] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"chain": self.chain, "target": self.target}
        if self.what:
            d["match"] = self.what
        if self.packets is not None:
            d["packets"] = self.packets
        if self.probability is not None:
            d["probability"] = self.probability
        if self.children:
            d["children"] = [c.as_dict() for c in self.children]
        return d


@dataclass
class ServiceTree:
    mode: str
    entries: list[Hop]  # one per service rule in the dispatch chain/map
    rejects: list[Hop]  # filter-side verdicts: no endpoints, no local endpoints

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "services": [e.as_dict() for e in self.entries],
            "rejects": [r.as_dict() for r in self.rejects],
        }


_COUNTERS = re.compile(r"^\[(\d+):(\d+)\] ")
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def _split(line: str) -> list[str]:
    """iptables-save's quoting is simple (only double-quoted comments): a regex is ~5x faster
    than shlex on a 50k-rule table (docs/benchmarks.md, python-iptables section)."""
    return [q if q or not bare else bare for q, bare in _TOKEN.findall(line)]


def _parse_save(text: str) -> dict[str, dict[str, list[tuple[int | None, list[str]]]]]:
    """table -> chain -> [(packets, args)] from `iptables-save [-c]` output."""
    tables: dict[str, dict[str, list[tuple[int | None, list[str]]]]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = {}
        elif line.startswith(":"):
            tables[table].setdefault(line[1:].split()[0], [])
        elif line.startswith(("[", "-A")):
            packets = None
            m = _COUNTERS.match(line)
            if m:
                packets = int(m.group(1))
                line = line[m.end() :]
            args = _split(line)
            tables[table].setdefault(args[1], []).append((packets, args[2:]))
    return tables


def _opt(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == name:
            return args[i + 1]
    return None


def _describe(args: list[str]) -> str:
    comment = _opt(args, "--comment")
    parts = [f'"{comment}"'] if comment else []
    neg = False
    for i, a in enumerate(args):
        if a == "!":
            neg = True
            continue
        if a in ("-s", "-d", "--dport") and i + 1 < len(args):
            parts.append(f"{'!' if neg else ''}{a.lstrip('-')} {args[i + 1].removesuffix('/32')}")
        if a == "-p" and i + 1 < len(args):
            parts.append(args[i + 1])
        if a == "--to-destination" and i + 1 < len(args):
            parts.append(f"to {args[i + 1]}")
        if a == "--rcheck":
            parts.append("affinity")
        neg = False
    return " ".join(parts)


def iptables_tree(save: str) -> ServiceTree:
    nat = _parse_save(save).get("nat", {})
    flt = _parse_save(save).get("filter", {})

    def walk(chain: str, depth: int) -> list[Hop]:
        hops = []
        for packets, args in nat.get(chain, []):
            target = _opt(args, "-j") or ""
            prob = _opt(args, "--probability")
            hop = Hop(chain, target, _describe(args), packets, float(prob) if prob else None)
            if target == "DNAT":
                hop.target = f"DNAT {_opt(args, '--to-destination')}"
            elif target.startswith("KUBE-") and target not in ("KUBE-MARK-MASQ", "KUBE-NODEPORTS") and depth < 4:
                hop.children = walk(target, depth + 1)
            hops.append(hop)
        return hops

    entries = walk("KUBE-SERVICES", 0) + walk("KUBE-NODEPORTS", 0)
    rejects = [
        Hop(chain, _opt(args, "-j") or "", (_opt(args, "--comment") or "") + " " + _describe(args), packets)
        for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES")
        for packets, args in flt.get(chain, [])
    ]
    return ServiceTree("iptables", entries, rejects)


def nft_tree(listing: str) -> ServiceTree:
    """From `nft list table ip kube-proxy`: map elements -> service chains -> endpoint chains."""
    chains: dict[str, list[str]] = {}
    maps: dict[str, list[str]] = {}
    current: tuple[str, str] | None = None
    for raw in listing.splitlines():
        line = raw.strip()
        m = re.match(r"(chain|map) (\S+) \{", line)
        if m:
            current = (m.group(1), m.group(2))
            (chains if m.group(1) == "chain" else maps)[m.group(2)] = []
            continue
        if line == "}" and raw.startswith("\t}"):
            current = None
            continue
        if current:
            (chains if current[0] == "chain" else maps)[current[1]].append(line)

    def endpoints(chain: str) -> list[Hop]:
        hops = []
        for line in chains.get(chain, []):
            for target in re.findall(r"goto (endpoint-\S+?)[ ,}]", line + " "):
                dnat = next((re.search(r"dnat to (\S+)", x) for x in chains.get(target, []) if "dnat to" in x), None)
                hops.append(Hop(chain, target, children=[Hop(target, f"DNAT {dnat.group(1)}")] if dnat else []))
        return hops

    def elements(name: str) -> str:
        text = " ".join(maps.get(name, []))
        start = text.find("elements = {")
        return text[start + len("elements = {") : text.rfind("}")] if start >= 0 else ""

    entries = []
    for name in ("service-ips", "service-nodeports"):
        text = elements(name)
        for key, _, target in re.findall(
            r"([\w.]+(?: \. [\w.]+)+)\s*(?:comment \"[^\"]*\"\s*)?:\s*(goto|jump) ([^\s,}]+)", text
        ):
            hop = Hop(name, target, key)
            hop.children = endpoints(target)
            if target.startswith("external-"):
                svc = target.replace("external-", "service-", 1)
                hop.children = [Hop(target, svc, children=endpoints(svc))]
            entries.append(hop)
    rejects = []
    for name in ("no-endpoint-services", "no-endpoint-nodeports"):
        text = elements(name)
        pattern = r"([\w.]+(?: \. [\w.]+)+)\s*(?:comment \"([^\"]*)\"\s*)?:\s*(?:goto )?([^\s,}]+)"
        for key, comment, target in re.findall(pattern, text):
            rejects.append(Hop(name, target, f'"{comment}" {key}' if comment else key))
    return ServiceTree("nftables", entries, rejects)
