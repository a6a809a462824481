"""Read kube-proxy's rules back as the picture textbooks draw, from what the kernel holds.

    KUBE-SERVICES -> KUBE-SVC-<hash> -> KUBE-SEP-<hash> -> DNAT ip:port      (iptables)
    service-ips map -> service-<hash>-ns/name/proto/port -> endpoint-<hash>-... -> dnat  (nftables)
    virtual server ip:port -> real servers (Masq, weight, connections), as `ipvsadm -Ln`  (IPVS)

Input is the tools' own output (`iptables-save -c`, `nft list table ip kube-proxy`), so the
tree shows what the kernel has, with live packet counters where the mode keeps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from netlab.render.ipvs import RealServer, VirtualServer, ipvsadm_header, ipvsadm_lines, ipvsadm_order

__all__ = ["IpvsView", "ServiceTree", "iptables_tree", "nft_tree", "parse_ipvsadm"]


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


# --- IPVS mode -----------------------------------------------------------------------------------------


@dataclass
class IpvsView:
    """kube-proxy's IPVS mode on one node, as the kernel holds it: the IPVS table (with live
    connection counters), the ClusterIPs on kube-ipvs0, the ipsets and the fixed iptables rules."""

    version: str
    size: int
    virtual_servers: list[VirtualServer]
    addresses: list[IPv4Address]
    ipsets: str  # `ipset save`
    iptables: str  # `iptables-save -c`, nat and filter
    device: str = "kube-ipvs0"

    def table(self) -> str:
        """`ipvsadm -Ln`, byte for byte (same order, same columns)."""
        return ipvsadm_header(self.version, self.size) + ipvsadm_lines(self.virtual_servers)

    def sets(self) -> list[tuple[str, str, list[str]]]:
        """(name, type, entries) of every KUBE-* set, in the kernel's order."""
        out: dict[str, tuple[str, str, list[str]]] = {}
        for line in self.ipsets.splitlines():
            parts = line.split(" ")
            if len(parts) >= 3 and parts[1].startswith("KUBE-"):
                if parts[0] == "create":
                    out[parts[1]] = (parts[1], parts[2], [])
                elif parts[0] == "add" and parts[1] in out:
                    out[parts[1]][2].append(parts[2])
        return list(out.values())

    def rules(self) -> list[tuple[str, str, int | None, list[str]]]:
        """(table, chain, packets, args) of kube-proxy's rules: its KUBE-* chains and the jumps to them."""
        out = []
        for table, chains in _parse_save(self.iptables).items():
            for chain, entries in chains.items():
                for packets, args in entries:
                    target = _opt(args, "-j") or ""
                    if chain.startswith("KUBE-") or target.startswith("KUBE-"):
                        out.append((table, chain, packets, args))
        return out

    def save(self) -> str:
        """The tools' own listings, one after the other (`netlab rules --format save`)."""
        return (
            f"# ipvsadm -Ln\n{self.table()}\n# ip -4 addr show {self.device}\n"
            + "".join(f"{a}/32\n" for a in self.addresses)
            + f"\n# ipset save\n{self.ipsets}\n# iptables-save -c\n{self.iptables}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": "ipvs",
            "version": self.version,
            "virtualServers": [
                {
                    "protocol": v.protocol,
                    "address": str(v.ip),
                    "port": v.port,
                    "scheduler": v.scheduler,
                    "flags": v.flags,
                    "persistent": v.timeout if v.persistent else None,
                    "realServers": [
                        {
                            "address": str(r.ip),
                            "port": r.port,
                            "forward": r.forward_name,
                            "weight": r.weight,
                            "activeConn": r.active,
                            "inActConn": r.inactive,
                        }
                        for r in v.real_servers
                    ],
                }
                for v in ipvsadm_order(self.virtual_servers)
            ],
            self.device: [str(a) for a in self.addresses],
            "ipsets": [{"name": n, "type": t, "entries": e} for n, t, e in self.sets()],
            "iptables": [
                {"table": t, "chain": c, "packets": p, "rule": " ".join(_quote_arg(a) for a in args)}
                for t, c, p, args in self.rules()
            ],
        }

    def format(self, *, limit: int = 20) -> str:
        """The readable view: the IPVS table, kube-ipvs0's addresses, the ipsets that hold
        something (longer ones cut at `limit` entries), then the rules with their packet counters."""

        def some(items: list[str]) -> str:
            more = f" ... ({len(items)} in all)" if len(items) > limit else ""
            return " ".join(items[:limit]) + more

        lines = [self.table().rstrip("\n"), ""]
        lines.append(f"{self.device} (dummy, down): " + (some([str(a) for a in self.addresses]) or "no addresses"))
        sets = self.sets()
        lines += ["", "ipsets:"]
        lines += [f"  {name} ({typ}): {some(entries)}" for name, typ, entries in sets if entries]
        empty = [name for name, _, entries in sets if not entries]
        if empty:
            lines.append("  empty: " + ", ".join(empty))
        lines += ["", "iptables (kube-proxy's chains and the jumps to them; packets):"]
        for table, chain, packets, args in self.rules():
            count = f"{packets:>8} " if packets is not None else ""
            lines.append(f"  {count}{table:<6} {chain:<22} " + " ".join(_quote_arg(a) for a in args))
        return "\n".join(lines) + "\n"


def _quote_arg(arg: str) -> str:
    return f'"{arg}"' if " " in arg or not arg else arg


_SERVICE_LINE = re.compile(r"^(TCP|UDP|SCTP)  (\S+):(\d+) (\S+)(?: \((\S+)\))?(?: persistent (\d+))?")
_DEST_LINE = re.compile(r"^  -> (\S+):(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)")


def parse_ipvsadm(text: str) -> list[VirtualServer]:
    """`ipvsadm -Ln` output back into virtual servers (for an independent read-back in tests)."""
    from netlab.render.ipvs import FLAG_PERSISTENT, FLAG_SOURCE_HASH

    fwd = {"Masq": 0, "Local": 1, "Tunnel": 2, "Route": 3, "Bypass": 4}
    out: list[VirtualServer] = []
    cur: tuple[str, IPv4Address, int, str, int, int] | None = None
    dests: list[RealServer] = []

    def close() -> None:
        if cur is not None:
            out.append(VirtualServer(*cur, real_servers=tuple(dests)))

    for line in text.splitlines():
        m = _SERVICE_LINE.match(line)
        if m:
            close()
            flags = (FLAG_PERSISTENT if m.group(6) else 0) | (FLAG_SOURCE_HASH if "-port" in (m.group(5) or "") else 0)
            cur = (m.group(1), IPv4Address(m.group(2)), int(m.group(3)), m.group(4), flags, int(m.group(6) or 0))
            dests = []
            continue
        d = _DEST_LINE.match(line)
        if d and cur is not None:
            dests.append(
                RealServer(
                    IPv4Address(d.group(1)),
                    int(d.group(2)),
                    weight=int(d.group(4)),
                    forward=fwd.get(d.group(3), -1),
                    active=int(d.group(5)),
                    inactive=int(d.group(6)),
                )
            )
    close()
    return out
