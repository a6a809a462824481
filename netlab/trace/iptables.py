"""An offline packet tracer for kube-proxy's iptables payload (kube-proxy's `tracePacket`, kept strict).

Where a real node sends the first packet of a new connection:

    pod / outside client --> nat PREROUTING --> KUBE-SERVICES --> (KUBE-NODEPORTS) --> KUBE-EXT/SVC/SVL
                              [DNAT chosen here; KUBE-MARK-MASQ ORs 0x4000 into the packet mark]
                         --> routing on the *new* destination
                         --> filter FORWARD/INPUT --> KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
                                                      KUBE-NODEPORTS, KUBE-PROXY-FIREWALL
                              [REJECT/DROP rules match service addresses: only un-DNATed packets]
                         --> nat POSTROUTING --> KUBE-POSTROUTING: mark set? MASQUERADE

`trace_iptables` replays exactly that on the text of a restore payload. The jumps from the
builtin chains are not in the payload (see netlab.render.iptables), so nat starts at
KUBE-SERVICES and the filter chains are run in the order above, as kube-proxy's tracer does.

- `-m statistic --probability` is followed down both branches: the packet takes the jump *and*
  goes on to the next rule, so every endpoint a connection can reach is reported, in rule
  order. A branch that leaves nat without a DNAT (e.g. a missing unconditional last rule) is
  reported as "ACCEPT" next to the endpoints, so a broken fan-out cannot hide.
- The mark is evaluated, not guessed: MARK --or-mark/--xor-mark change it, `-m mark` reads it,
  and `masq` is true when KUBE-POSTROUTING reaches MASQUERADE on some branch that is not refused.
- `-m recent --rcheck` never matches (no earlier connection), `--set` always does; conntrack
  state is NEW (+DNAT in filter after a DNAT); addrtype LOCAL = the node IPs and 127.0.0.1.
- Only the rule shapes netlab's renderer emits are understood. Any other module, option,
  target or line raises IptablesParseError instead of being skipped: a tracer that silently
  ignored `--dport` would pass every test.

The same module holds kube-proxy's test helpers: `sort_iptables_rules` (its
`sortIPTablesRules`, to compare with upstream goldens) and `check_rule_jumps`
(`checkIPTablesRuleJumps`: every jump goes to a declared, non-empty chain, and every declared
service chain is used).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from netlab.trace import TraceResult

__all__ = [
    "IptablesConsistencyError",
    "IptablesParseError",
    "Rule",
    "TracePath",
    "check_rule_jumps",
    "parse_restore",
    "sort_iptables_rules",
    "trace_iptables",
    "trace_iptables_paths",
]

BUILTIN_TARGETS = frozenset({"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "DNAT", "SNAT", "MASQUERADE"})
_MATCH_MODULES = frozenset({"comment", "tcp", "udp", "sctp", "addrtype", "statistic", "recent", "mark", "conntrack"})
_L4 = frozenset({"tcp", "udp", "sctp"})
# option -> the -m module that must be loaded before it
_OPTION_MODULE = {
    "--comment": "comment",
    "--dport": "l4",
    "--dst-type": "addrtype",
    "--src-type": "addrtype",
    "--mode": "statistic",
    "--probability": "statistic",
    "--name": "recent",
    "--rcheck": "recent",
    "--set": "recent",
    "--seconds": "recent",
    "--reap": "recent",
    "--mark": "mark",
    "--ctstate": "conntrack",
}
_FLAGS = frozenset({"--rcheck", "--set", "--reap"})  # options without a value
_NEGATABLE = frozenset({"-s", "-d", "--dport", "--dst-type", "--src-type", "--mark", "--ctstate"})
_CTSTATES = frozenset({"NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "SNAT", "DNAT"})
_MAX_DEPTH = 32


class IptablesParseError(ValueError):
    """The payload holds a line or a rule shape the tracer does not understand."""


class IptablesConsistencyError(ValueError):
    """A jump to a chain that is not declared or empty, or a declared chain nothing uses."""


# --- parsing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    value: str
    negated: bool = False


@dataclass(frozen=True)
class Rule:
    """One `-A` line, decomposed. Only the shapes kube-proxy's iptables proxier writes."""

    raw: str
    chain: str
    comment: str | None = None
    protocol: str | None = None
    source: _Value | None = None
    destination: _Value | None = None
    src_type: _Value | None = None
    dst_type: _Value | None = None
    dport: _Value | None = None
    probability: float | None = None
    recent: str | None = None  # "rcheck" or "set"
    mark: _Value | None = None
    ctstate: _Value | None = None
    target: str | None = None
    target_args: tuple[tuple[str, str], ...] = ()

    def target_arg(self, name: str) -> str | None:
        return dict(self.target_args).get(name)


def _words(line: str) -> list[str]:
    """Split like iptables-restore: whitespace, with "double quoted" words kept whole."""
    words = []
    for m in re.finditer(r'"([^"]*)"|(\S+)', line):
        word = m.group(2)
        if word is not None and '"' in word:
            raise IptablesParseError(f"unbalanced quote in rule: {line}")
        words.append(m.group(1) if word is None else word)
    return words


def _check_addr(value: str, line: str) -> None:
    try:
        ip_network(value, strict=True) if "/" in value else ip_address(value)
    except ValueError as e:
        raise IptablesParseError(f"bad address {value!r} in rule: {line}") from e


class _RuleParser:
    """Reads one rule word by word; every word must be one the renderer writes."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.words = _words(line)
        if len(self.words) < 2 or self.words[0] != "-A":
            raise IptablesParseError(f'rule does not start with "-A CHAIN": {line}')
        self.i = 2
        self.modules: list[str] = []
        self.seen: set[str] = set()
        self.values: dict[str, _Value] = {}
        self.protocol: str | None = None
        self.comment: str | None = None
        self.probability: float | None = None
        self.recent: str | None = None
        self.recent_name: str | None = None
        self.target: str | None = None
        self.target_args: list[tuple[str, str]] = []

    def fail(self, why: str) -> IptablesParseError:
        return IptablesParseError(f"{why}: {self.line}")

    def take(self) -> str:
        if self.i >= len(self.words):
            raise self.fail(f"{self.words[self.i - 1]} needs a value")
        self.i += 1
        return self.words[self.i - 1]

    def once(self, key: str) -> None:
        if key in self.seen:
            raise self.fail(f"{key} given twice")
        self.seen.add(key)

    def parse(self) -> Rule:
        negate = False
        while self.i < len(self.words):
            word = self.words[self.i]
            self.i += 1
            if word == "!":
                if negate or self.i >= len(self.words) or self.words[self.i] not in _NEGATABLE:
                    raise self.fail("'!' before something that cannot be negated")
                negate = True
                continue
            neg, negate = negate, False
            if word == "-m":
                module = self.take()
                if module not in _MATCH_MODULES:
                    raise self.fail(f"unknown match module -m {module}")
                self.once(f"-m {module}")
                self.modules.append(module)
            elif word == "-p":
                self.once(word)
                self.protocol = self.take()
                if self.protocol not in _L4:
                    raise self.fail(f"unknown protocol -p {self.protocol}")
            elif word in ("-s", "-d"):
                self.once(word)
                value = self.take()
                _check_addr(value, self.line)
                self.values[word] = _Value(value, neg)
            elif word in _OPTION_MODULE:
                need = _OPTION_MODULE[word]
                if not (any(m in _L4 for m in self.modules) if need == "l4" else need in self.modules):
                    raise self.fail(f"{word} without -m {'tcp/udp' if need == 'l4' else need}")
                self.once(word)
                self.option(word, neg)
            elif word == "-j":
                self.target = self.take()
                while self.i < len(self.words):  # target options run to the end of the line
                    opt = self.words[self.i]
                    self.i += 1
                    self.target_args.append((opt, "" if opt == "--random-fully" else self.take()))
                _check_target(self.target, self.target_args, self.line)
            else:
                raise self.fail(f"unknown word {word!r}")
        for m in self.modules:
            if m in _L4 and self.protocol != m:
                raise self.fail(f"-m {m} needs -p {m}")
        if "recent" in self.modules and (self.recent is None or self.recent_name is None):
            raise self.fail("-m recent needs --name and --rcheck or --set")
        if "statistic" in self.modules and self.probability is None:
            raise self.fail("-m statistic needs --mode random --probability")
        v = self.values
        return Rule(
            raw=self.line, chain=self.words[1], comment=self.comment, protocol=self.protocol,
            source=v.get("-s"), destination=v.get("-d"), src_type=v.get("--src-type"),
            dst_type=v.get("--dst-type"), dport=v.get("--dport"), probability=self.probability,
            recent=self.recent, mark=v.get("--mark"), ctstate=v.get("--ctstate"),
            target=self.target, target_args=tuple(self.target_args),
        )  # fmt: skip

    def option(self, word: str, neg: bool) -> None:
        value = "" if word in _FLAGS else self.take()
        if word == "--comment":
            self.comment = value
        elif word == "--dport":
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise self.fail(f"bad port {value!r}")
            self.values[word] = _Value(value, neg)
        elif word in ("--dst-type", "--src-type"):
            if value != "LOCAL":
                raise self.fail(f"only addrtype LOCAL is understood, not {value!r}")
            self.values[word] = _Value(value, neg)
        elif word == "--mode":
            if value != "random":
                raise self.fail("only statistic --mode random is understood")
        elif word == "--probability":
            try:
                self.probability = float(value)
            except ValueError as e:
                raise self.fail(f"bad probability {value!r}") from e
            if not 0.0 <= self.probability <= 1.0:
                raise self.fail(f"probability {value!r} out of [0, 1]")
        elif word == "--name":
            self.recent_name = value
        elif word in ("--rcheck", "--set"):
            if self.recent is not None:
                raise self.fail("--rcheck and --set together")
            self.recent = word[2:]
        elif word == "--seconds":
            if not value.isdigit():
                raise self.fail(f"bad --seconds {value!r}")
        elif word == "--mark":
            _parse_mark(value, self.line)
            self.values[word] = _Value(value, neg)
        elif word == "--ctstate":
            if not set(value.split(",")) <= _CTSTATES:
                raise self.fail(f"bad --ctstate {value!r}")
            self.values[word] = _Value(value, neg)
        # --reap: a flag with no effect on a first packet


def parse_rule(line: str) -> Rule:
    """Parse one `-A CHAIN ...` line; raise IptablesParseError on any shape the renderer does not emit."""
    return _RuleParser(line).parse()


def _parse_mark(value: str, line: str) -> tuple[int, int]:
    """`V` or `V/M` (hex or decimal) -> (value, mask)."""
    try:
        v, _, m = value.partition("/")
        return int(v, 0), int(m, 0) if m else 0xFFFFFFFF
    except ValueError as e:
        raise IptablesParseError(f"bad mark {value!r}: {line}") from e


def _check_target(target: str, args: list[tuple[str, str]], line: str) -> None:
    names = [a for a, _ in args]
    if target == "MARK":
        if len(args) != 1 or names[0] not in ("--or-mark", "--xor-mark"):
            raise IptablesParseError(f"MARK needs exactly one of --or-mark/--xor-mark: {line}")
        _parse_mark(args[0][1], line)
    elif target == "DNAT":
        if names != ["--to-destination"] or not re.fullmatch(r"[0-9.]+:\d+", args[0][1]):
            raise IptablesParseError(f"DNAT needs --to-destination IP:PORT: {line}")
        _check_addr(args[0][1].rsplit(":", 1)[0], line)
    elif target == "MASQUERADE":
        if names not in ([], ["--random-fully"]):
            raise IptablesParseError(f"MASQUERADE takes only --random-fully: {line}")
    elif target in ("ACCEPT", "DROP", "REJECT", "RETURN") or target.startswith("KUBE-"):
        if args:
            raise IptablesParseError(f"-j {target} takes no options: {line}")
    else:
        raise IptablesParseError(f"unknown target -j {target}: {line}")


@dataclass
class _Table:
    name: str
    chains: dict[str, list[Rule]] = field(default_factory=dict)  # declared order
    deleted: list[str] = field(default_factory=list)


def parse_restore(payload: str) -> dict[str, _Table]:
    """A restore payload -> table name -> chains (declared order) with their parsed rules.

    Strict: `*table`, then `:CHAIN - [0:0]` lines, then `-A` / `-X` lines, then `COMMIT`.
    """
    tables: dict[str, _Table] = {}
    current: _Table | None = None
    in_decls = False
    lines = payload.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        where = f"line {n}: {line!r}"
        if current is None:
            m = re.fullmatch(r"\*(filter|nat)", line)
            if not m:
                raise IptablesParseError(f"expected *filter or *nat, {where}")
            if m.group(1) in tables:
                raise IptablesParseError(f"table given twice, {where}")
            current = tables[m.group(1)] = _Table(m.group(1))
            in_decls = True
            continue
        if line == "COMMIT":
            current = None
            continue
        m = re.fullmatch(r":([A-Z0-9][A-Z0-9-]{0,27}) - \[0:0\]", line)
        if m:
            if not in_decls:
                raise IptablesParseError(f"chain declaration after the rules, {where}")
            if m.group(1) in current.chains:
                raise IptablesParseError(f"chain declared twice, {where}")
            current.chains[m.group(1)] = []
            continue
        in_decls = False
        m = re.fullmatch(r"-X (\S+)", line)
        if m:
            chain = m.group(1)
            if chain not in current.chains or current.chains[chain] or chain in current.deleted:
                raise IptablesParseError(f"-X of a chain not declared empty in this table, {where}")
            current.deleted.append(chain)
            continue
        if not line.startswith("-A "):
            raise IptablesParseError(f"unexpected line, {where}")
        rule = parse_rule(line)
        if rule.chain not in current.chains or rule.chain in current.deleted:
            raise IptablesParseError(f"rule for a chain not declared in *{current.name}, {where}")
        current.chains[rule.chain].append(rule)
    if current is not None:
        raise IptablesParseError(f"*{current.name} has no COMMIT")
    return tables


# --- tracing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Packet:
    src: IPv4Address
    dst: IPv4Address
    proto: str
    dport: int
    mark: int = 0
    dnat: str | None = None  # "ip:port" once DNATed
    verdict: str | None = None  # ACCEPT / DROP / REJECT in filter
    masq: bool = False
    returned: bool = False  # left its chain by RETURN or by falling off the end: the caller goes on


@dataclass(frozen=True)
class TracePath:
    """One way a new connection can go: `outcome` is "ip:port", "REJECT", "DROP" or "ACCEPT"
    (passed without being DNATed), `masq` whether this branch is masqueraded."""

    outcome: str
    masq: bool


class _Tracer:
    def __init__(self, tables: dict[str, _Table], local: frozenset[IPv4Address]) -> None:
        self.tables = tables
        self.local = local
        self.matched: list[str] = []

    def chain(self, table: str, name: str) -> list[Rule]:
        t = self.tables.get(table)
        if t is None:
            raise IptablesParseError(f"the payload has no *{table} table")
        if name not in t.chains or name in t.deleted:
            raise IptablesParseError(f"jump to {name}, which *{table} does not declare")
        return t.chains[name]

    def matches(self, r: Rule, p: _Packet, ctstates: frozenset[str]) -> bool:
        if r.protocol is not None and r.protocol != p.proto:
            return False
        if r.source is not None and _addr_match(r.source, p.src) is False:
            return False
        if r.destination is not None and _addr_match(r.destination, p.dst) is False:
            return False
        if r.src_type is not None and (p.src in self.local) == r.src_type.negated:
            return False
        if r.dst_type is not None and (p.dst in self.local) == r.dst_type.negated:
            return False
        if r.dport is not None and (int(r.dport.value) == p.dport) == r.dport.negated:
            return False
        if r.recent == "rcheck":  # no earlier connection: no affinity entry yet
            return False
        if r.mark is not None:
            value, mask = _parse_mark(r.mark.value, r.raw)
            if ((p.mark & mask) == value) == r.mark.negated:
                return False
        if r.ctstate is not None:
            hit = bool(set(r.ctstate.value.split(",")) & ctstates)
            if hit == r.ctstate.negated:
                return False
        return True

    def run(self, table: str, name: str, p: _Packet, ctstates: frozenset[str], depth: int = 0) -> list[_Packet]:
        """All the ways `p` leaves chain `name`, in rule order: terminated (DNAT, a verdict,
        MASQUERADE), or with `returned` set (RETURN, or fell off the end: the caller goes on)."""
        if depth > _MAX_DEPTH:
            raise IptablesParseError(f"jumps nest deeper than {_MAX_DEPTH} at {name} (a loop?)")
        live = [p]
        out: list[_Packet] = []
        for r in self.chain(table, name):
            next_live: list[_Packet] = []
            for q in live:
                if not self.matches(r, q, ctstates):
                    next_live.append(q)
                    continue
                self.matched.append(r.raw)
                taken = r.probability is None or r.probability >= 1.0
                if r.probability is not None and r.probability < 1.0:
                    next_live.append(q)  # the branch that does not take this rule goes on
                    taken = r.probability > 0.0
                if not taken:
                    continue
                for res, done in self.target(table, r, q, ctstates, depth):
                    (out if done else next_live).append(res)
            live = next_live
        return out + [replace(q, returned=True) for q in live]

    def target(
        self, table: str, r: Rule, p: _Packet, ctstates: frozenset[str], depth: int
    ) -> Iterator[tuple[_Packet, bool]]:
        """(packet, terminated) for each way the target sends `p` on."""
        t = r.target
        if t is None:  # a comment-only rule
            yield p, False
        elif t == "RETURN":
            yield replace(p, returned=True), True
        elif t == "MARK":
            opt, value = r.target_args[0]
            bits, _ = _parse_mark(value, r.raw)
            yield replace(p, mark=p.mark | bits if opt == "--or-mark" else p.mark ^ bits), False
        elif t == "DNAT":
            if table != "nat":
                raise IptablesParseError(f"DNAT outside the nat table: {r.raw}")
            yield replace(p, dnat=r.target_arg("--to-destination")), True
        elif t == "MASQUERADE":
            yield replace(p, masq=True), True
        elif t in ("ACCEPT", "DROP", "REJECT"):
            if table != "filter":
                raise IptablesParseError(f"-j {t} outside the filter table: {r.raw}")
            yield replace(p, verdict=t), True
        else:  # a KUBE-* chain
            for q in self.run(table, t, p, ctstates, depth + 1):
                if q.returned:
                    yield replace(q, returned=False), False
                else:
                    yield q, True


def _addr_match(v: _Value, ip: IPv4Address) -> bool:
    hit = ip in IPv4Network(v.value) if "/" in v.value else ip == IPv4Address(v.value)
    return hit != v.negated


def trace_iptables_paths(
    payload: str, *, src: str, dst: str, proto: str, dport: int, node_ips: Sequence[str]
) -> tuple[list[TracePath], list[str]]:
    """Every branch a new connection can take through `payload`, and the rules that matched.

    Branches that nat leaves untouched and filter does not refuse are merged into one "ACCEPT".
    """
    tables = parse_restore(payload)
    local = frozenset({IPv4Address("127.0.0.1"), *(IPv4Address(str(a)) for a in node_ips)})
    tracer = _Tracer(tables, local)
    pkt = _Packet(IPv4Address(src), IPv4Address(dst), proto.lower(), dport)

    # nat PREROUTING -> KUBE-SERVICES: where DNAT and KUBE-MARK-MASQ happen.
    branches = [replace(q, returned=False) for q in tracer.run("nat", "KUBE-SERVICES", pkt, frozenset({"NEW"}))]

    paths: list[TracePath] = []
    for b in branches:
        q = b
        if b.dnat is not None:  # routing and filter see the new destination
            ip, _, port = b.dnat.rpartition(":")
            q = replace(b, dst=IPv4Address(ip), dport=int(port))
        states = frozenset({"NEW", "DNAT"} if b.dnat else {"NEW"})
        for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
            done = [r for r in tracer.run("filter", chain, q, states) if not r.returned]
            if len(done) > 1:
                raise IptablesParseError(f"filter {chain} gives more than one verdict for one packet")
            if done:
                q = replace(q, verdict=done[0].verdict)
                break
        if q.verdict in ("DROP", "REJECT"):
            paths.append(TracePath(q.verdict, False))
            continue
        # nat POSTROUTING -> KUBE-POSTROUTING: the mark becomes MASQUERADE.
        post = tracer.run("nat", "KUBE-POSTROUTING", replace(q, masq=False), frozenset({"NEW"}))
        masq = any(r.masq for r in post)
        paths.append(TracePath(b.dnat or "ACCEPT", masq))

    merged: list[TracePath] = []
    for path in paths:
        if path not in merged:
            merged.append(path)
    return merged, tracer.matched


def trace_iptables(payload: str, *, src: str, dst: str, proto: str, dport: int, node_ips: Sequence[str]) -> TraceResult:
    """What happens to the first packet of a new `proto` connection src -> dst:dport on this node.

    endpoints: None if no rule touches the packet; otherwise every outcome without repeats,
    delivered ones first in rule order ("ip:port", or "ACCEPT" for a branch that got through
    without DNAT while others did not), then refusals ("REJECT", "DROP"). masq: masqueraded on
    at least one branch that is not refused. (The shared contract of netlab.trace.TraceResult.)
    """
    paths, matched = trace_iptables_paths(payload, src=src, dst=dst, proto=proto, dport=dport, node_ips=node_ips)
    outcomes: list[str] = []
    for refused in (False, True):  # delivered first (rule order), then refusals
        for p in paths:
            if (p.outcome in ("DROP", "REJECT")) == refused and p.outcome not in outcomes:
                outcomes.append(p.outcome)
    endpoints = None if outcomes == ["ACCEPT"] else outcomes
    return TraceResult(endpoints=endpoints, masq=any(p.masq for p in paths), matched=tuple(matched))


# --- kube-proxy's test helpers -------------------------------------------------------------------


@dataclass
class _DumpChain:
    name: str
    counters: str
    rules: list[tuple[str, str | None]] = field(default_factory=list)  # (raw line, comment)
    deleted: bool = False


def _comment_of(line: str) -> str | None:
    """The value after --comment, split like kube-proxy's ParseRule (`"quoted"` or one word)."""
    words = [m.group(1).strip('"') for m in re.finditer(r'(?:^|\s)("[^"]*"|[^"]\S*)', line)]
    for i, w in enumerate(words[:-1]):
        if w == "--comment":
            return words[i + 1]
    return None


def _parse_dump(data: str) -> list[tuple[str, list[_DumpChain]]]:
    """kube-proxy's iptablestest.ParseIPTablesDump (lenient about rule contents, like the original)."""
    tables: list[tuple[str, list[_DumpChain]]] = []
    chains: list[_DumpChain] | None = None
    declaring = False
    for raw in data.strip("\n").split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if chains is None:
            m = re.fullmatch(r"\*(.*)", line)
            if not m:
                raise IptablesParseError(f"table {len(tables) + 1} starts with {line!r}, not a table name")
            chains = []
            tables.append((m.group(1), chains))
            declaring = True
            continue
        if declaring:
            m = re.fullmatch(r":([^ ]*) - \[([0-9]*):([0-9]*)\]", line)
            if m:
                chains.append(_DumpChain(m.group(1), f"[{int(m.group(2) or 0)}:{int(m.group(3) or 0)}]"))
                continue
            declaring = False
        by_name = {c.name: c for c in chains}
        if m := re.fullmatch(r"-A ([^ ]*) (.*)", line):
            c = by_name.get(m.group(1))
            if c is None:
                raise IptablesParseError(f"error parsing rule {line!r}: no such chain {m.group(1)!r}")
            if c.deleted:
                raise IptablesParseError(f"cannot add rules to deleted chain {c.name!r}")
            c.rules.append((line, _comment_of(line)))
        elif m := re.fullmatch(r"-X (.*)", line):
            c = by_name.get(m.group(1))
            if c is None:
                raise IptablesParseError(f"error parsing rule {line!r}: no such chain {m.group(1)!r}")
            if c.rules:
                raise IptablesParseError(f"cannot delete chain {c.name!r} after adding rules")
            c.deleted = True
        elif line == "COMMIT":
            chains = None
        else:
            raise IptablesParseError(f"error parsing rule {line!r}")
    if chains is not None:
        raise IptablesParseError("could not parse iptables data (no COMMIT line?)")
    return tables


def _service_name(comment: str) -> str:
    i = min((j for j in (comment.find(" "), comment.find(":")) if j != -1), default=-1)
    return comment if i == -1 else comment[:i]


def _by_service(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    """orderByCommentServiceName: the comment up to the first space or colon (no comment: unordered)."""
    if a[1] is None or b[1] is None:
        return False
    return _service_name(a[1]) < _service_name(b[1])


def _stable_sort(items: list[tuple[str, str | None]], less: object) -> None:
    assert callable(less)

    def cmp(a: tuple[str, str | None], b: tuple[str, str | None]) -> int:
        return -1 if less(a, b) else 1 if less(b, a) else 0

    items.sort(key=functools.cmp_to_key(cmp))  # list.sort is stable, like Go's sort.SliceStable


def _chain_less(a: str, b: str) -> bool:
    if a == "KUBE-NODEPORTS":
        return True
    if b == "KUBE-NODEPORTS":
        return False
    if a == "KUBE-SERVICES":
        return True
    if b == "KUBE-SERVICES":
        return False
    ka, kb = a.startswith("KUBE-"), b.startswith("KUBE-")
    if ka != kb:
        return ka
    return a < b


def sort_iptables_rules(text: str) -> str:
    """kube-proxy's `sortIPTablesRules`: a restore payload in a canonical order, to compare with
    upstream goldens (kube-proxy's own output order follows Go map iteration, i.e. is random).

    Tables by name; chains KUBE-NODEPORTS, KUBE-SERVICES, other KUBE-* by name, then the rest;
    rules grouped by chain; KUBE-NODEPORTS and KUBE-SERVICES rules stably sorted by the service
    name in their comment, with nat KUBE-SERVICES' "must be the last rule" rule kept last.
    """
    tables = _parse_dump(text.lstrip(" \t\n"))
    tables.sort(key=lambda t: t[0])
    out: list[str] = []
    for name, chains in tables:
        chains.sort(key=functools.cmp_to_key(lambda a, b: -1 if _chain_less(a.name, b.name) else 1))
        for c in chains:
            if c.name == "KUBE-NODEPORTS" or (c.name == "KUBE-SERVICES" and name == "filter"):
                _stable_sort(c.rules, _by_service)
            elif c.name == "KUBE-SERVICES" and name == "nat":

                def last_rule(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
                    if a[1] is not None and "must be the last rule" in a[1]:
                        return False
                    if b[1] is not None and "must be the last rule" in b[1]:
                        return True
                    return _by_service(a, b)

                _stable_sort(c.rules, last_rule)
        out.append(f"*{name}")
        out += [f":{c.name} - {c.counters}" for c in chains]
        out += [raw for c in chains for raw, _ in c.rules]
        out += [f"-X {c.name}" for c in chains if c.deleted]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def _all_matches(lines: list[str], pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {m.group(1) for line in lines if (m := rx.search(line))}


def check_rule_jumps(payload: str) -> None:
    """kube-proxy's `checkIPTablesRuleJumps`; raises IptablesConsistencyError.

    Per table: every `-j X` to a non-builtin target and every `-A X` names a declared (not
    deleted) chain; every jumped-to chain has rules (KUBE-NODEPORTS excepted: KUBE-SERVICES always
    jumps there); every declared chain is jumped to (the top-level chains excepted). Meant for
    full payloads: a partial sync jumps to chains it does not rewrite.
    """
    blocks = re.split(r"^COMMIT\n", payload.lstrip("\n"), flags=re.M)
    if len(blocks) < 3 or blocks[-1] != "":
        raise IptablesConsistencyError(f"bad ruleData ({len(blocks) - 1} tables)")
    top = {
        "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
        "KUBE-FORWARD", "KUBE-MARK-MASQ", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL",
    }  # fmt: skip
    for block in blocks[:-1]:
        lines = block.strip("\n").split("\n")
        if not lines[0].startswith("*"):
            raise IptablesConsistencyError(f"bad ruleData (table starts with {lines[0]!r})")
        table = lines[0][1:]
        created = _all_matches(lines, r"^:([^ ]*)") - _all_matches(lines, r"-X ([^ ]*)")
        filled = _all_matches(lines, r"-A ([^ ]*)")
        jumped = _all_matches(lines, r"-j ([^ ]*)") - BUILTIN_TARGETS
        missing = (jumped - created) | (filled - created)
        if missing:
            raise IptablesConsistencyError(f"some chains in {table} are used but were not created: {sorted(missing)}")
        empty = jumped - filled - {"KUBE-NODEPORTS"}
        if empty:
            raise IptablesConsistencyError(f"some chains in {table} are jumped to but have no rules: {sorted(empty)}")
        extra = created - jumped - top
        if extra:
            raise IptablesConsistencyError(f"some chains in {table} are created but not used: {sorted(extra)}")
