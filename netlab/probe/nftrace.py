"""nftables tracing, read straight from netlink: what `nft monitor trace` prints, as data.

A probe adds a small table of its own in each node (`meta nftrace set 1` for the probe's
packets only) and listens on the NFNLGRP_NFTRACE multicast group of that node's namespace.
The kernel then reports every rule, return and policy the packet meets, in every nf_tables
chain: kube-proxy's nftables mode, and iptables-nft (whose KUBE-* chains are nf_tables chains
too). Each event carries the packet's headers, so an event is tied to one probe by its IP id.

This module is pure: it parses the netlink messages, turns the events of one packet into a
chain path (KUBE-SERVICES -> KUBE-SVC-... -> KUBE-SEP-... -> DNAT), and maps rule handles to
rule text from `nft -a list table` and `iptables-save`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from netlab.probe.packet import IPv4, _ipv4

__all__ = [
    "TRACE_GROUP",
    "TraceEvent",
    "chain_path",
    "handles_by_chain",
    "iptables_rules_by_chain",
    "nft_rule_text",
    "parse_messages",
    "trace_table_script",
]

NETLINK_NETFILTER = 12
TRACE_GROUP = 9  # NFNLGRP_NFTRACE
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_TRACE = 17
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF

# enum nft_trace_attributes
A_TABLE, A_CHAIN, A_RULE_HANDLE, A_TYPE, A_VERDICT, A_ID = 1, 2, 3, 4, 5, 6
A_LL_HEADER, A_NETWORK_HEADER, A_TRANSPORT_HEADER, A_IIF, A_IIFTYPE, A_OIF, A_OIFTYPE = 7, 8, 9, 10, 11, 12, 13
A_MARK, A_NFPROTO, A_POLICY = 14, 15, 16
TRACE_TYPES = {1: "policy", 2: "return", 3: "rule"}
VERDICTS = {0: "drop", 1: "accept", 2: "stolen", 3: "queue", 4: "repeat", 5: "stop"}
NFT_VERDICTS = {-1: "continue", -2: "break", -3: "jump", -4: "goto", -5: "return"}

_NLMSG = struct.Struct("=LHHLL")
_NLA = struct.Struct("=HH")


@dataclass
class TraceEvent:
    """One line of `nft monitor trace`: a rule, return or policy met by one packet."""

    trace_id: int
    family: int
    table: str
    chain: str
    type: str  # "rule" | "return" | "policy"
    verdict: str  # "accept", "drop", "jump", "goto", "continue", "return", ...
    target: str | None = None  # the chain of a jump/goto
    handle: int | None = None
    iif: int | None = None
    oif: int | None = None
    mark: int | None = None
    packet: IPv4 | None = None  # the network header, when this event carries it
    node: str = ""  # filled in by the caller: which node's namespace it came from
    ts_ns: int = 0  # when the listener read it
    rule: str | None = None  # the rule's text, when looked up

    @property
    def where(self) -> str:
        return f"{self.table} {self.chain}"

    def as_dict(self) -> dict[str, object]:
        return {
            "node": self.node,
            "table": self.table,
            "chain": self.chain,
            "type": self.type,
            "verdict": self.verdict,
            "target": self.target,
            "handle": self.handle,
            "rule": self.rule,
        }


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        ln, typ = _NLA.unpack_from(data, off)
        if ln < 4:
            break
        out[typ & NLA_TYPE_MASK] = data[off + 4 : off + ln]
        off += (ln + 3) & ~3
    return out


def _str(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def _verdict(nested: bytes) -> tuple[str, str | None]:
    a = _attrs(nested, 0, len(nested))
    code = struct.unpack("!i", a[1])[0] if 1 in a else None
    target = _str(a[2]) if 2 in a else None
    if code is None:
        return "?", target
    return (VERDICTS.get(code) or NFT_VERDICTS.get(code) or f"verdict {code}"), target


def parse_messages(data: bytes) -> list[TraceEvent]:
    """Parse one recv() of a NETLINK_NETFILTER socket into trace events (others are skipped)."""
    out: list[TraceEvent] = []
    off = 0
    while off + 16 <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < 16:
            break
        if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE and length >= 20:
            family = data[off + 16]
            a = _attrs(data, off + 20, off + length)
            verdict, target = _verdict(a[A_VERDICT]) if A_VERDICT in a else ("", None)
            typ = TRACE_TYPES.get(struct.unpack("!I", a[A_TYPE])[0], "?") if A_TYPE in a else "?"
            if typ == "policy" and A_POLICY in a:
                verdict = VERDICTS.get(struct.unpack("!I", a[A_POLICY])[0], verdict)
            ev = TraceEvent(
                trace_id=struct.unpack("!I", a[A_ID])[0] if A_ID in a else 0,
                family=family,
                table=_str(a.get(A_TABLE, b"")),
                chain=_str(a.get(A_CHAIN, b"")),
                type=typ,
                verdict=verdict,
                target=target,
                handle=struct.unpack("!Q", a[A_RULE_HANDLE])[0] if A_RULE_HANDLE in a else None,
                iif=struct.unpack("!I", a[A_IIF])[0] if A_IIF in a else None,
                oif=struct.unpack("!I", a[A_OIF])[0] if A_OIF in a else None,
                mark=struct.unpack("!I", a[A_MARK])[0] if A_MARK in a else None,
            )
            if A_NETWORK_HEADER in a:
                hdr = a[A_NETWORK_HEADER] + a.get(A_TRANSPORT_HEADER, b"")
                ev.packet = _ipv4(_pad_total(hdr), 0)
            out.append(ev)
        if mtype == NLMSG_DONE:
            break
        off += (length + 3) & ~3
    return out


def _pad_total(hdr: bytes) -> bytes:
    """The trace carries the IP and transport headers only: make the IP total length agree."""
    if len(hdr) < 20:
        return hdr
    return hdr[:2] + struct.pack("!H", len(hdr)) + hdr[4:]


def trace_table_script(table: str, ip_ids: list[int], ct_mark: int, priority: int = -160) -> str:
    """`nft -f` text for the probe's own trace table.

    Priority -160: after conntrack (-200), so `ct mark` can tag the connection and its replies
    (whose IP ids the kernel picks) are traced too; before mangle (-150) and dstnat (-100), so
    every kube-proxy chain is seen. Only packets with the probes' IP ids start a trace."""
    ids = ", ".join(str(i) for i in sorted(set(ip_ids)))
    rules = (
        f"ip id {{ {ids} }} ct mark set {ct_mark:#x} meta nftrace set 1\n    ct mark {ct_mark:#x} meta nftrace set 1"
    )
    return (
        f"table ip {table} {{\n"
        + "".join(
            f"  chain {hook} {{\n    type filter hook {hook} priority {priority}; policy accept;\n    {rules}\n  }}\n"
            for hook in ("prerouting", "output")
        )
        + "}\n"
    )


@dataclass
class ChainPath:
    """The chains one packet went through in one hook, as `nft monitor trace` shows them."""

    base: str  # "nat PREROUTING"
    chains: list[str] = field(default_factory=list)
    verdict: str = ""  # the last verdict: "accept" (after a DNAT), "drop", ...
    last: TraceEvent | None = None  # the event that decided
    key: tuple[str, str] = ("", "")  # (table, base chain)

    def text(self) -> str:
        return " -> ".join([self.base, *self.chains]) + (f" ({self.verdict})" if self.verdict else "")


def chain_path(events: list[TraceEvent], skip_tables: tuple[str, ...] = ()) -> list[ChainPath]:
    """Group one packet's events (in order) by base chain and follow its jumps.

    A base chain ends with its policy or a rule's final verdict (accept, drop); the next
    event starts the next base chain (nat PREROUTING, then filter FORWARD, ...). A chain the
    packet falls off the end of returns silently: an event from a chain lower on the stack
    shows it. Events of `skip_tables` (the probe's own trace table) are left out."""
    out: list[ChainPath] = []
    cur: ChainPath | None = None
    stack: list[str] = []
    for ev in events:
        if ev.table in skip_tables:
            continue
        if cur is None or cur.verdict or (ev.table, ev.chain) != cur.key and ev.chain not in stack:
            cur = ChainPath(f"{ev.table} {ev.chain}")
            cur.key = (ev.table, ev.chain)
            stack = [ev.chain]
            out.append(cur)
        if ev.chain in stack:
            del stack[stack.index(ev.chain) + 1 :]
        if ev.type == "rule" and ev.verdict in ("jump", "goto") and ev.target:
            if ev.verdict == "goto" and len(stack) > 1:
                stack.pop()
            stack.append(ev.target)
            cur.chains.append(ev.target)
        elif ev.type == "return":
            if len(stack) > 1:
                stack.pop()
        elif ev.type == "policy" or ev.verdict in ("accept", "drop", "stolen", "queue"):
            cur.verdict = ev.verdict
            cur.last = ev
            stack = []
    return out


_HANDLE = re.compile(r"^\s*(.*?)\s*# handle (\d+)\s*$")
_CHAIN = re.compile(r"^\s*chain (\S+) \{")


def handles_by_chain(nft_listing: str) -> dict[str, list[tuple[int, str]]]:
    """`nft -a list table ...` -> chain -> [(handle, rule text)] in the chain's order."""
    out: dict[str, list[tuple[int, str]]] = {}
    chain = None
    for line in nft_listing.splitlines():
        m = _CHAIN.match(line)
        if m:
            chain = m.group(1)
            out.setdefault(chain, [])
            continue
        if chain is None or line.strip() in ("}", ""):
            if line.strip() == "}":
                chain = None
            continue
        m = _HANDLE.match(line)
        if m and not line.lstrip().startswith(("type ", "chain ")):
            out[chain].append((int(m.group(2)), m.group(1)))
    return out


def nft_rule_text(nft_listing: str, chain: str, handle: int) -> str | None:
    for h, text in handles_by_chain(nft_listing).get(chain, []):
        if h == handle:
            return text
    return None


def iptables_rules_by_chain(save: str) -> dict[str, list[str]]:
    """`iptables-save -t TABLE` -> chain -> its `-A` lines in order (counters stripped)."""
    out: dict[str, list[str]] = {}
    for line in save.splitlines():
        line = re.sub(r"^\[\d+:\d+\] ", "", line)
        if line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            out.setdefault(chain, []).append(line)
    return out


def iptables_rule_text(nft_listing: str, save: str, chain: str, handle: int) -> str | None:
    """An iptables-nft rule as `iptables-save` writes it (with its comment), found by its nf_tables
    handle: the n-th rule of a chain in `nft -a list table` is the n-th `-A` line of that chain."""
    handles = [h for h, _ in handles_by_chain(nft_listing).get(chain, [])]
    if handle not in handles:
        return None
    lines = iptables_rules_by_chain(save).get(chain, [])
    i = handles.index(handle)
    return lines[i] if i < len(lines) else None
