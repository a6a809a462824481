"""Offline tracer for kube-proxy's nftables rules: one new connection, through the hooks, no kernel.

Two parts:

- `NftTable` applies an `nft -f` transaction (the statements `netlab.render.nftables` writes:
  add/flush/delete of table, chains, sets, maps and elements, `add rule`) to an in-memory table,
  checking what the kernel would refuse: flushing or deleting something that does not exist,
  deleting a chain or set that is still referenced, adding a map element whose key exists with
  another verdict, a jump to a missing chain. A full render followed by partial renders can be
  applied in sequence; `dump()` prints the result like knftables' Fake.Dump (sorted `add` lines).
- `trace_nftables` walks a packet through the base chains of that table hook by hook, in
  priority order, the way netfilter does for the *first* packet of a connection (`ct state new`
  always matches, nat chains run):
    from a remote source: prerouting (filter -110, nat -100: DNAT), route, then input (the
      destination is local) or forward + postrouting (masquerade);
    from the node itself (src is a node IP or 127/8): output (filter -110, nat -100, filter 0),
      postrouting, and for a local destination the loopback leg: prerouting filter chains only
      (the NAT binding is already made) and input.
  `numgen` endpoint choice (vmap or cascaded rules) is followed down every branch, so each
  reachable endpoint appears in the result.

Like kube-proxy's `nftablesTracer` it understands only the rule shapes the renderer emits and
raises `NftTraceError` on anything else, so a renderer change the tracer does not model cannot
silently pass. Unlike it, it runs the masquerade chains literally (mark bit set, tested, cleared,
`masquerade`) instead of treating `jump mark-for-masquerade` as the masquerade itself, and it
takes hooks and priorities from the chain declarations, not from chain names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, ip_network

from netlab.trace import TraceResult

__all__ = ["NftTable", "NftTraceError", "trace_nftables"]

_TABLE = "kube-proxy"
_LOOPBACK = IPv4Network("127.0.0.0/8")
_MAX_DEPTH = 32


class NftTraceError(ValueError):
    """The script uses a statement or rule shape the tracer does not model, or the kernel would refuse it."""


@dataclass
class _Chain:
    name: str
    type: str | None = None
    hook: str | None = None
    priority: int = 0
    comment: str | None = None
    rules: list[str] = field(default_factory=list)


@dataclass
class _Container:
    kind: str  # "set" | "map"
    name: str
    decl: str  # "{ type ... ; }" as written
    elements: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # key -> (value, comment)


_COMMENT_TAIL = re.compile(r' comment "((?:[^"\\]|\\.)*)"$')
_CHAIN_SPEC = re.compile(r"^\{ type (\w+) hook (\w+) priority (-?\d+) ; \}$")
_CHAIN_COMMENT = re.compile(r'^\{ comment "((?:[^"\\]|\\.)*)" ; \}$')
_ELEMENT = re.compile(r'^\{ (?P<key>[^":}]+?)(?: comment "(?P<comment>(?:[^"\\]|\\.)*)")?(?: : (?P<value>[^}]+?))? \}$')
_REFS = re.compile(r"\b(?:jump|goto) (\S+)")


class NftTable:
    """`table ip kube-proxy` as the kernel would hold it after the applied transactions."""

    def __init__(self) -> None:
        self.exists = False
        self.comment: str | None = None
        self.chains: dict[str, _Chain] = {}
        self.containers: dict[str, _Container] = {}

    @classmethod
    def from_script(cls, script: str) -> NftTable:
        table = cls()
        table.apply(script)
        return table

    # --- applying a transaction -----------------------------------------------------------------------

    def apply(self, script: str) -> None:
        """Apply a transaction script line by line (all-or-nothing is the kernel's job, not modelled)."""
        for n, raw in enumerate(script.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                self._apply(line)
            except NftTraceError as e:
                raise NftTraceError(f"line {n}: {e}: {line}") from None

    def _apply(self, line: str) -> None:
        m = re.match(r"^(add|flush|delete) (table|chain|rule|set|map|element) ip (\S+)(?: (.*))?$", line)
        if not m:
            raise NftTraceError("unsupported statement")
        verb, obj, table, rest = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if table != _TABLE:
            raise NftTraceError(f"only table ip {_TABLE} is modelled")
        if obj == "table":
            self._table(verb, rest)
            return
        if not self.exists:
            raise NftTraceError("no such table")
        name, _, tail = rest.partition(" ")
        if not name:
            raise NftTraceError("missing name")
        if obj == "chain":
            self._chain(verb, name, tail)
        elif obj == "rule":
            if verb != "add":
                raise NftTraceError(f"{verb} rule is not modelled")
            self._rule(name, tail)
        elif obj in ("set", "map"):
            self._container(verb, obj, name, tail)
        else:
            self._element(verb, name, tail)

    def _table(self, verb: str, rest: str) -> None:
        if verb == "add":
            self.exists = True
            cm = _CHAIN_COMMENT.match(rest)
            if cm:
                self.comment = cm.group(1)
            elif rest:
                raise NftTraceError("unsupported table properties")
        elif verb == "flush":
            self._need_table()
            for c in self.chains.values():  # rules only: set and map elements survive `flush table`
                c.rules.clear()
        else:
            self._need_table()
            self.__init__()  # type: ignore[misc]

    def _need_table(self) -> None:
        if not self.exists:
            raise NftTraceError("no such table")

    def _chain(self, verb: str, name: str, tail: str) -> None:
        chain = self.chains.get(name)
        if verb == "add":
            new = _Chain(name)
            if tail:
                spec, cm = _CHAIN_SPEC.match(tail), _CHAIN_COMMENT.match(tail)
                if spec:
                    new.type, new.hook, new.priority = spec.group(1), spec.group(2), int(spec.group(3))
                elif cm:
                    new.comment = cm.group(1)
                else:
                    raise NftTraceError("unsupported chain properties")
            if chain is None:
                self.chains[name] = new
            elif new.hook is not None and (new.type, new.hook, new.priority) != (
                chain.type,
                chain.hook,
                chain.priority,
            ):
                raise NftTraceError("chain exists with other hook properties (kernel: EEXIST/EOPNOTSUPP)")
            elif chain.hook is None and new.hook is not None:
                raise NftTraceError("a regular chain cannot become a base chain")
            return
        if tail:
            raise NftTraceError("unexpected text after chain name")
        if chain is None:
            raise NftTraceError("no such chain (kernel: ENOENT)")
        if verb == "flush":
            chain.rules.clear()
            return
        users = self._chain_users(name)
        if users:
            raise NftTraceError(f"chain is still referenced by {users[0]} (kernel: EBUSY)")
        del self.chains[name]

    def _chain_users(self, name: str) -> list[str]:
        users = []
        for c in self.chains.values():
            if c.name != name and any(name in _REFS.findall(r) for r in c.rules):
                users.append(f"a rule in {c.name}")
        for s in self.containers.values():
            for key, (value, _) in s.elements.items():
                if name in _REFS.findall(value):
                    users.append(f"element {key} of {s.name}")
        return users

    def _rule(self, chain: str, text: str) -> None:
        if chain not in self.chains:
            raise NftTraceError("no such chain (kernel: ENOENT)")
        body = _COMMENT_TAIL.sub("", text)
        for target in _REFS.findall(body):
            if target not in self.chains:
                raise NftTraceError(f"jump/goto to missing chain {target}")
        for ref in re.findall(r"@(\S+)", body):
            if ref not in self.containers:
                raise NftTraceError(f"reference to missing set/map {ref}")
        _parse_rule(body)  # refuse unknown shapes at load time already
        self.chains[chain].rules.append(text)

    def _container(self, verb: str, kind: str, name: str, tail: str) -> None:
        c = self.containers.get(name)
        if verb == "add":
            if not (tail.startswith("{ ") and tail.endswith(" }")):
                raise NftTraceError(f"{kind} declaration expected")
            if c is None:
                self.containers[name] = _Container(kind, name, tail)
            elif c.kind != kind:
                raise NftTraceError(f"{name} is a {c.kind}")
            else:
                c.decl = tail  # e.g. a new affinity timeout: the kernel updates it in place (6.x)
            return
        if tail:
            raise NftTraceError("unexpected text after name")
        if c is None or c.kind != kind:
            raise NftTraceError(f"no such {kind} (kernel: ENOENT)")
        if verb == "flush":
            c.elements.clear()
            return
        used = re.compile(rf"@{re.escape(name)}(?=\s|$)")
        for ch in self.chains.values():
            if any(used.search(_COMMENT_TAIL.sub("", r)) for r in ch.rules):
                raise NftTraceError(f"{kind} is still used by a rule in {ch.name} (kernel: EBUSY)")
        del self.containers[name]

    def _element(self, verb: str, name: str, tail: str) -> None:
        c = self.containers.get(name)
        if c is None:
            raise NftTraceError("no such set/map (kernel: ENOENT)")
        m = _ELEMENT.match(tail)
        if not m:
            raise NftTraceError("unsupported element syntax")
        key, comment, value = m.group("key"), m.group("comment"), m.group("value") or ""
        if verb == "delete":
            if value or comment is not None:
                raise NftTraceError("delete element takes the key only")
            if key not in c.elements:
                raise NftTraceError("no such element (kernel: ENOENT)")
            del c.elements[key]
            return
        if verb != "add":
            raise NftTraceError(f"{verb} element is not modelled")
        if (c.kind == "map") != bool(value):
            raise NftTraceError("map elements need a value, set elements must not have one")
        for target in _REFS.findall(value):
            if target not in self.chains:
                raise NftTraceError(f"verdict to missing chain {target}")
        old = c.elements.get(key)
        if old is not None and old[0] != value:
            raise NftTraceError("element exists with another value (kernel: EEXIST; delete it first)")
        c.elements[key] = old if old is not None else (value, comment)  # re-adding keeps the first comment

    # --- printing --------------------------------------------------------------------------------------

    def dump(self) -> str:
        """The table as sorted `add` statements, in the order kube-proxy's test helper sorts them."""
        t = f"ip {_TABLE}"
        out: list[str] = []
        if not self.exists:
            return ""
        out.append(f"add table {t}" + (f' {{ comment "{self.comment}" ; }}' if self.comment is not None else ""))
        for name in sorted(self.chains):
            c = self.chains[name]
            if c.hook is not None:
                out.append(f"add chain {t} {name} {{ type {c.type} hook {c.hook} priority {c.priority} ; }}")
            elif c.comment is not None:
                out.append(f'add chain {t} {name} {{ comment "{c.comment}" ; }}')
            else:
                out.append(f"add chain {t} {name}")
        for name in sorted(self.chains):
            out += [f"add rule {t} {name} {r}" for r in self.chains[name].rules]
        for kind in ("set", "map"):
            for name in sorted(n for n, c in self.containers.items() if c.kind == kind):
                out.append(f"add {kind} {t} {name} {self.containers[name].decl}")
        elements = []
        for name, box in self.containers.items():
            for key, (value, comment) in box.elements.items():
                text = f"add element {t} {name} {{ {key}"
                if comment is not None:
                    text += f' comment "{comment}"'
                elements.append(text + (f" : {value} }}" if value else " }"))
        out += sorted(elements)
        return "".join(line + "\n" for line in out)

    # --- tracing -----------------------------------------------------------------------------------------

    def base_chains(self, hook: str) -> list[_Chain]:
        return sorted((c for c in self.chains.values() if c.hook == hook), key=lambda c: c.priority)


# --- rule terms ---------------------------------------------------------------------------------------------

_Term = tuple[str, ...]

_TERM_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("ctnew", r"ct state new"),
        ("vmap3", r"ip daddr \. meta l4proto \. th dport vmap @(\S+)"),
        ("vmap2", r"meta l4proto \. th dport vmap @(\S+)"),
        ("setmatch", r"ip (saddr|daddr) (!= )?@(\S+)"),
        ("anonset", r"ip (saddr|daddr) (!= )?\{ ([^}]*) \}"),
        ("addr", r"ip (saddr|daddr) (!= )?(\d+\.\d+\.\d+\.\d+(?:/\d+)?)"),
        ("fiblocal", r"fib (saddr|daddr) type local"),
        ("numgenvmap", r"numgen random mod (\d+) vmap \{ ([^}]*) \}"),
        ("numgencmp", r"numgen random mod (\d+) == (\d+)"),
        ("markcmp", r"mark and (0x[0-9a-f]+) == (0x[0-9a-f]+|\d+)"),
        ("markset", r"mark set mark (or|xor) (0x[0-9a-f]+)"),
        ("update", r"update @(\S+) \{ ip saddr \}"),
        ("l4proto", r"meta l4proto (tcp|udp|sctp)"),
        ("dnat", r"dnat to (\d+\.\d+\.\d+\.\d+):(\d+)"),
        ("masquerade", r"masquerade(?: fully-random)?"),
        ("jump", r"(jump|goto) (\S+)"),
        ("verdict", r"(return|accept|drop|reject)"),
    )
)


def _parse_rule(body: str) -> list[_Term]:
    terms: list[_Term] = []
    rest = body.strip()
    while rest:
        for kind, pattern in _TERM_PATTERNS:
            m = pattern.match(rest)
            if m and (m.end() == len(rest) or rest[m.end()] == " "):
                terms.append((kind, *(g or "" for g in m.groups())))
                rest = rest[m.end() :].lstrip()
                break
        else:
            raise NftTraceError(f"unknown rule shape at {rest!r}")
    return terms


def _vmap_entries(text: str) -> list[tuple[str, str]]:
    out = []
    for entry in text.split(" , "):
        k, sep, v = entry.partition(" : ")
        if not sep:
            raise NftTraceError(f"bad vmap entry {entry!r}")
        out.append((k.strip(), v.strip()))
    return out


def _int(text: str) -> int:
    return int(text, 16) if text.startswith("0x") else int(text)


# --- the walk ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pkt:
    src: IPv4Address
    dst: IPv4Address
    proto: str
    dport: int
    mark: int = 0
    dnat: str | None = None
    masq: bool = False
    matched: tuple[str, ...] = ()


# outcome of a rule or chain: "next" (rule did not end the chain), "return" (back to the caller),
# or a verdict: "accept", "drop", "reject"
_Out = list[tuple[_Pkt, str]]


class _Walker:
    def __init__(self, table: NftTable, local: set[IPv4Address]) -> None:
        self.table = table
        self.local = local
        self.parsed: dict[str, list[_Term]] = {}

    def is_local(self, ip: IPv4Address) -> bool:
        return ip in self.local or ip in _LOOPBACK

    def chain(self, name: str, pkt: _Pkt, depth: int) -> _Out:
        if depth > _MAX_DEPTH:
            raise NftTraceError(f"chain nesting deeper than {_MAX_DEPTH} at {name} (a loop?)")
        chain = self.table.chains.get(name)
        if chain is None:
            raise NftTraceError(f"jump to missing chain {name}")
        states: _Out = [(pkt, "next")]
        done: _Out = []
        for text in chain.rules:
            body = _COMMENT_TAIL.sub("", text)
            terms = self.parsed.get(body)
            if terms is None:
                terms = self.parsed[body] = _parse_rule(body)
            nxt: _Out = []
            for p, _ in states:
                for q, o in self.terms(terms, 0, p, f"{name}: {text}", depth):
                    (nxt if o == "next" else done).append((q, o))
            states = nxt
            if not states:
                break
        done += [(p, "return") for p, _ in states]
        return done

    def verdict(self, text: str, pkt: _Pkt, where: str, depth: int) -> _Out:
        return self.terms(_parse_rule(text), 0, pkt, where, depth)

    def terms(self, terms: list[_Term], i: int, pkt: _Pkt, where: str, depth: int) -> _Out:
        """Run terms[i:] of one rule; a failed match ends the rule with "next"."""
        if i == len(terms):
            return [(pkt, "next")]
        t = terms[i]
        kind = t[0]
        hit = replace(pkt, matched=(*pkt.matched, where)) if where not in pkt.matched else pkt

        def go_on(p: _Pkt) -> _Out:
            return self.terms(terms, i + 1, p, where, depth)

        if kind == "ctnew":
            return go_on(pkt)  # tracing the first packet of a connection
        if kind in ("vmap3", "vmap2"):
            key = f"{pkt.dst} . {pkt.proto} . {pkt.dport}" if kind == "vmap3" else f"{pkt.proto} . {pkt.dport}"
            value = self._lookup(t[1], key)
            if value is None:
                return [(pkt, "next")]
            return self.verdict(value, hit, where, depth)
        if kind == "setmatch":
            ip = pkt.src if t[1] == "saddr" else pkt.dst
            member = self._lookup(t[3], str(ip)) is not None
            return go_on(pkt) if member != bool(t[2]) else [(pkt, "next")]
        if kind == "anonset":
            ip = pkt.src if t[1] == "saddr" else pkt.dst
            member = any(ip in ip_network(x.strip(), strict=False) for x in t[3].split(","))
            return go_on(pkt) if member != bool(t[2]) else [(pkt, "next")]
        if kind == "addr":
            ip = pkt.src if t[1] == "saddr" else pkt.dst
            member = ip in ip_network(t[3], strict=False)
            return go_on(pkt) if member != bool(t[2]) else [(pkt, "next")]
        if kind == "fiblocal":
            ip = pkt.src if t[1] == "saddr" else pkt.dst
            return go_on(pkt) if self.is_local(ip) else [(pkt, "next")]
        if kind == "l4proto":
            return go_on(pkt) if pkt.proto == t[1] else [(pkt, "next")]
        if kind == "markcmp":
            return go_on(pkt) if pkt.mark & _int(t[1]) == _int(t[2]) else [(pkt, "next")]
        if kind == "markset":
            bits = _int(t[2])
            return go_on(replace(pkt, mark=pkt.mark | bits if t[1] == "or" else pkt.mark ^ bits))
        if kind == "update":
            if t[1] not in self.table.containers:
                raise NftTraceError(f"update of missing set {t[1]}")
            return go_on(pkt)  # records the client for affinity; a first connection finds the set empty
        if kind == "numgencmp":
            mod, wanted = int(t[1]), int(t[2])
            if wanted >= mod:
                return [(pkt, "next")]
            return go_on(pkt) + ([(pkt, "next")] if mod > 1 else [])  # both outcomes are reachable
        if kind == "numgenvmap":
            mod = int(t[1])
            out: _Out = []
            for k, v in _vmap_entries(t[2]):
                if int(k) < mod:
                    out += self.verdict(v, hit, where, depth)
            if {str(k) for k in range(mod)} - {k for k, _ in _vmap_entries(t[2])}:
                out.append((pkt, "next"))  # a random value without an entry: no match
            return out
        if kind == "dnat":
            if pkt.dnat is not None:
                raise NftTraceError("second DNAT for one packet")
            ep = f"{t[1]}:{t[2]}"
            return [(replace(hit, dnat=ep), "accept")]
        if kind == "masquerade":
            return [(replace(hit, masq=True), "accept")]
        if kind == "jump":
            results: _Out = []
            for q, o in self.chain(t[2], hit, depth + 1):
                if o == "return":
                    results.append((q, "next" if t[1] == "jump" else "return"))
                else:
                    results.append((q, o))
            return results
        if kind == "verdict":
            return [(hit, t[1])]
        raise NftTraceError(f"unmodelled term {kind}")

    def _lookup(self, name: str, key: str) -> str | None:
        c = self.table.containers.get(name)
        if c is None:
            raise NftTraceError(f"lookup in missing set/map {name}")
        hit = c.elements.get(key)
        return None if hit is None else hit[0]

    def hook(self, hook: str, pkts: list[_Pkt], *, skip_nat: bool = False) -> tuple[list[_Pkt], list[tuple[_Pkt, str]]]:
        """Run every base chain of a hook in priority order; returns (still going, dropped/rejected)."""
        ended: list[tuple[_Pkt, str]] = []
        for chain in self.table.base_chains(hook):
            if skip_nat and chain.type == "nat":
                continue
            going: list[_Pkt] = []
            for p in pkts:
                for q, o in self.chain(chain.name, p, 0):
                    if o in ("drop", "reject"):
                        ended.append((q, o.upper()))
                    else:  # accept / fell off the end (policy accept): the next base chain runs
                        going.append(q if chain.type != "nat" or q.dnat is None else self._rewrite(q))
            pkts = going
        return pkts, ended

    @staticmethod
    def _rewrite(p: _Pkt) -> _Pkt:
        """The NAT binding made in this hook rewrites the header before the next hook's chains run."""
        assert p.dnat is not None
        ip, port = p.dnat.rsplit(":", 1)
        return replace(p, dst=IPv4Address(ip), dport=int(port))


def trace_nftables(
    script: str,
    *,
    src: str | IPv4Address,
    dst: str | IPv4Address,
    proto: str,
    dport: int,
    node_ips: Iterable[str | IPv4Address],
) -> TraceResult:
    """Where a new `proto` connection from src to dst:dport goes under the rules of `script`.

    script: one transaction, or several concatenated (a full render, then partial renders).
    node_ips: the node's own addresses; they and 127.0.0.0/8 are what `fib ... type local`
      matches, and a src among them means the connection starts on the node (output path).
    """
    table = NftTable.from_script(script)
    local = {IPv4Address(str(ip)) for ip in node_ips}
    w = _Walker(table, local)
    pkt = _Pkt(IPv4Address(str(src)), IPv4Address(str(dst)), proto.lower(), int(dport))
    ended: list[tuple[_Pkt, str]] = []
    delivered: list[_Pkt] = []
    if w.is_local(pkt.src):
        going, e = w.hook("output", [pkt])
        ended += e
        going, e = w.hook("postrouting", going)
        ended += e
        loop = [p for p in going if w.is_local(p.dst)]
        delivered += [p for p in going if not w.is_local(p.dst)]
        going, e = w.hook("prerouting", loop, skip_nat=True)
        ended += e
        going, e = w.hook("input", going)
        ended += e
        delivered += going
    else:
        going, e = w.hook("prerouting", [pkt])
        ended += e
        to_input = [p for p in going if w.is_local(p.dst)]
        to_forward = [p for p in going if not w.is_local(p.dst)]
        going, e = w.hook("input", to_input)
        ended += e
        delivered += going
        going, e = w.hook("forward", to_forward)
        ended += e
        going, e = w.hook("postrouting", going)
        ended += e
        delivered += going
    outcomes: list[str] = []
    masq = False
    matched: list[str] = []
    for p in delivered:
        outcomes.append(p.dnat if p.dnat is not None else "ACCEPT")
        masq = masq or p.masq
        matched += [m for m in p.matched if m not in matched]
    for p, verdict in ended:
        outcomes.append(verdict)
        matched += [m for m in p.matched if m not in matched]
    unique = list(dict.fromkeys(outcomes))
    endpoints = None if unique == ["ACCEPT"] or not unique else unique
    return TraceResult(endpoints=endpoints, masq=masq, matched=tuple(matched))
