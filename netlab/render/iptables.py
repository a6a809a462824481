"""kube-proxy's iptables mode, rendered: services + endpoints -> one `iptables-restore --noflush` payload.

This is a line-by-line port of `syncProxyRules()` from kubernetes `pkg/proxy/iptables/proxier.go`
in the v1.28/v1.29 layout (filter chains KUBE-NODEPORTS, KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
KUBE-FIREWALL, KUBE-FORWARD, KUBE-PROXY-FIREWALL; the INVALID drop without nfacct; the NodePort
tail rule in its `-m addrtype --dst-type LOCAL` form), restricted to what netlab's model holds:
IPv4, ClusterIP and NodePort services, TCP/UDP, ready endpoints, ClientIP affinity and both
traffic policies. The output is checked against kube-proxy's own unit-test goldens
(tests/golden/iptables/upstream-*.txt), so a user who reads `iptables-save` in a netlab node
sees what a real node shows.

What kube-proxy hands the kernel, and why it looks like this:

    *filter                                  one restore, both tables, each ended by COMMIT
    :KUBE-SERVICES - [0:0]                   with --noflush a chain line creates-or-FLUSHES the
    ...                                      chain, so each chain is rewritten as a whole; chains
    -A KUBE-SERVICES ... -j REJECT           the payload does not name (PREROUTING, a user's own
    COMMIT                                   chains) are left alone. The restore is atomic per table.
    *nat
    :KUBE-SERVICES - [0:0]
    :KUBE-SVC-<h16> - [0:0]                  per service port (sha256+base32 of "ns/name:port"+proto,
    :KUBE-SEP-<h16> - [0:0]                  16 chars: chain names must fit 28 bytes)
    -A KUBE-SERVICES -m comment --comment "ns/svc:p cluster IP" -m tcp -p tcp -d <vip> --dport <p> -j KUBE-SVC-..
    -A KUBE-SVC-.. ... ! -s <clusterCIDR> -j KUBE-MARK-MASQ       off-cluster sources get SNAT
    -A KUBE-SVC-.. -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-..   1/(n-i)
    -A KUBE-SEP-.. -s <ep> -j KUBE-MARK-MASQ                       hairpin: pod -> own service
    -A KUBE-SEP-.. -m tcp -p tcp -j DNAT --to-destination <ep>:<port>
    -X KUBE-SEP-<stale>                      a stale chain is flushed by its chain line, then deleted
    -A KUBE-SERVICES ... -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS    must stay the last rule
    COMMIT

- All service NAT happens on the first packet of a flow (nat PREROUTING for pods and outside
  clients, nat OUTPUT for the node itself); conntrack replays it for the rest of the flow.
  The filter rules (REJECT "has no endpoints", DROP "has no local endpoints") match the
  *service* address, so they only ever see packets that nat did not DNAT.
- Masquerading is two-step: KUBE-MARK-MASQ only ORs bit 14 (0x4000) into the packet mark;
  nat POSTROUTING -> KUBE-POSTROUTING turns the mark into MASQUERADE and clears it, so a packet
  that re-traverses the stack is not SNATed twice.
- Probabilities: rule i of n is `1/(n-i)` as `%0.10f`, the last one unconditional, so each
  endpoint gets 1/n. Endpoints are ordered by their `ip:port` *string* (10.0.0.10 < 10.0.0.9).
- Large clusters (> 1000 endpoints in total): the per-endpoint `-m comment` arguments are
  dropped from KUBE-SVC/KUBE-SVL/KUBE-SEP rules, as kube-proxy does to shrink the payload.

The jump rules from the builtin chains (PREROUTING -> KUBE-SERVICES, ...) are NOT in the payload:
kube-proxy cannot write them with iptables-restore without taking over the whole builtin chain,
so it `EnsureRule(Prepend)`s them one `iptables` call at a time, on full syncs only. The same
split is kept here: `jump_rules()` lists them as (table, builtin chain, argv); the applier
(netlab.kernel.proxy) runs, for each in order, `iptables -w -t T -C CHAIN ARGS` and, when that
fails, `iptables -w -t T -I CHAIN 1 ARGS` (the target chains must exist: restore the payload
first, or create them). Each is prepended, so the builtin chain ends up holding them in reverse
order, exactly like a node (`builtin_rules()` lists that end state). When the node's filter and
nat hold nothing else, netlab does take over the builtin chains: `whole_tables=True` renders
the payload of a restore without --noflush, with the builtin chains declared and the jumps in
them, which leaves the same tables in one transaction (see netlab.kernel.proxy for why).

Partial syncs (kube-proxy's MinimizeIPTablesRestore, GA in v1.28): `only` names the service
ports whose Service or endpoints changed; the per-service chains (SVC/SVL/EXT/FW/SEP) of all
other services are left out of the payload (the kernel keeps their current contents), while
every top-level nat chain and the whole filter table are rewritten. `stale` lists service
chains to delete (what the kernel has minus `service_chains()` of the full desired state;
`stale_chains()` computes it). netlab's own partial sync goes further with
`render_iptables_delta()`: it renders the changed service ports alone, takes the stale chains
from the previous and new plans, and writes a top-level chain only when its lines change (for
an endpoint change, none), so the payload and the kernel's work are a few chains, not O(services).

Deliberate difference from a real node: the masquerade mark is written as the model's
`NodeContext.masquerade_mark` (`0x4000`, as in kube-proxy's unit tests), where the real
binary formats it with Go's `%#08x` (`0x00004000`); the kernel stores the same number and
`iptables-save` prints `0x4000` for both.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from netlab.render.model import Endpoint, NodeContext, ServicePort

__all__ = [
    "BUILTIN_CHAINS",
    "LARGE_CLUSTER_ENDPOINTS_THRESHOLD",
    "Table",
    "builtin_rules",
    "endpoint_chain",
    "external_chain",
    "firewall_chain",
    "is_large_cluster",
    "is_service_chain",
    "jump_rules",
    "local_chain",
    "port_proto_hash",
    "probability",
    "render_iptables",
    "render_iptables_delta",
    "service_chain",
    "service_chains",
    "stale_chains",
]

Table = Literal["filter", "nat"]

# Top-level chains (kube-proxy's constants).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"  # kubelet's anti-martian chain, duplicated by kube-proxy

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
EXT_PREFIX = "KUBE-EXT-"
FW_PREFIX = "KUBE-FW-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

_FILTER_TOP_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL)
_NAT_TOP_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
# Service ports per deferred segment of a streamed render (~1.1 KB of payload each with 3
# endpoints): large enough that the tool never waits on Python for long, small enough that
# the first piece reaches it early.
STREAM_BATCH = 256
_NODEPORTS_TAIL_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


# --- names ------------------------------------------------------------------------------------


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> 2 base32 characters


def _hash16(text: str) -> str:
    """The first 16 characters of base32(sha256(text)). base32 turns each 5 bytes into 8
    characters on its own, so 16 characters are exactly the encoding of the digest's first 10
    bytes (80 bits): eight 10-bit lookups in a table of character pairs. Same name as
    `base64.b32encode(digest[:10])` (a unit test checks), in 60 % of its time: that encoder is
    pure Python in 3.11, and chain names are hashed 4 times per service with 3 endpoints."""
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    t = _B32_PAIRS
    return (
        t[n >> 70] + t[(n >> 60) & 1023] + t[(n >> 50) & 1023] + t[(n >> 40) & 1023]
        + t[(n >> 30) & 1023] + t[(n >> 20) & 1023] + t[(n >> 10) & 1023] + t[n & 1023]
    )  # fmt: skip


def port_proto_hash(spn: str, proto: str) -> str:
    """kube-proxy's `portProtoHash`: the first 16 chars of base32(sha256(spn + proto))."""
    return _hash16(spn + proto)


def service_chain(spn: str, proto: str) -> str:
    """KUBE-SVC-<h>: the endpoints used with the `Cluster` traffic policy."""
    return SVC_PREFIX + port_proto_hash(spn, proto)


def local_chain(spn: str, proto: str) -> str:
    """KUBE-SVL-<h>: the node-local endpoints used with a `Local` traffic policy."""
    return SVL_PREFIX + port_proto_hash(spn, proto)


def external_chain(spn: str, proto: str) -> str:
    """KUBE-EXT-<h>: the entry for NodePort (and externalIP / LB) traffic."""
    return EXT_PREFIX + port_proto_hash(spn, proto)


def firewall_chain(spn: str, proto: str) -> str:
    """KUBE-FW-<h>: loadBalancerSourceRanges (not produced: netlab has no LoadBalancer services)."""
    return FW_PREFIX + port_proto_hash(spn, proto)


def endpoint_chain(spn: str, proto: str, endpoint: str) -> str:
    """KUBE-SEP-<h>: one endpoint of one service port; `endpoint` is `ip:port`."""
    return SEP_PREFIX + _hash16(spn + proto + endpoint)


def is_service_chain(name: str) -> bool:
    """kube-proxy's `isServiceChainName`: the chains it may delete when no longer wanted."""
    return name.startswith(SERVICE_CHAIN_PREFIXES)


def probability(n: int) -> str:
    """kube-proxy's `computeProbability`: `1/n` formatted `%0.10f`."""
    return f"{1.0 / n:.10f}"


# --- jump rules from the builtin chains ---------------------------------------------------------


# (table, target chain, builtin chain, comment, extra args), in kube-proxy's `iptablesJumpChains`
# order followed by `iptablesKubeletJumpChains` (comment "" = no comment match).
_NEW = ("-m", "conntrack", "--ctstate", "NEW")
_JUMP_CHAINS: tuple[tuple[Table, str, str, str, tuple[str, ...]], ...] = (
    ("filter", KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", _NEW),
    ("filter", KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", _NEW),
    ("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports", ()),
    ("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", _NEW),
    ("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _NEW),
    ("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules", ()),
    ("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _NEW),
    ("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _NEW),
    ("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _NEW),
    ("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", ()),
    ("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals", ()),
    ("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules", ()),
    ("filter", KUBE_FIREWALL, "INPUT", "", ()),
    ("filter", KUBE_FIREWALL, "OUTPUT", "", ()),
)


def jump_rules(node: NodeContext | None = None) -> list[tuple[str, str, list[str]]]:
    """(table, builtin chain, iptables argv) of every rule linking a builtin chain to kube-proxy's
    chains, in the order kube-proxy ensures them (`iptablesJumpChains` + `iptablesKubeletJumpChains`).

    Apply them after the restore payload (which declares every target chain), one at a time and
    in this order, each only if `iptables -t T -C CHAIN ARGS` fails, with `iptables -t T -I CHAIN
    ARGS`: each is prepended, so the builtin chain ends up holding them in reverse order, as on a
    real node. The argv carries no shell quoting. `node` is accepted for symmetry with the
    renderer (an IPv6 node would differ); every IPv4 node gets the same list.
    """
    del node
    rules: list[tuple[str, str, list[str]]] = []
    for table, target, builtin, comment, extra in _JUMP_CHAINS:
        args = list(extra)
        if comment:
            args += ["-m", "comment", "--comment", comment]
        args += ["-j", target]
        rules.append((table, builtin, args))
    return rules


# The builtin chains `iptables-save` lists for each table, in its order.
BUILTIN_CHAINS: dict[Table, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg or not arg else arg


def builtin_rules(node: NodeContext | None = None) -> dict[tuple[str, str], list[str]]:
    """(table, builtin chain) -> its rules, as `iptables-save` prints them, once every jump is in:
    each one is prepended (`-I CHAIN 1`), so a chain holds its jumps in reverse `jump_rules`
    order. Every builtin chain of filter and nat is a key (an empty list: kube-proxy adds none)."""
    out: dict[tuple[str, str], list[str]] = {(t, c): [] for t, chains in BUILTIN_CHAINS.items() for c in chains}
    for table, chain, args in jump_rules(node):
        out[(table, chain)].insert(0, f"-A {chain} " + " ".join(_quote(a) for a in args))
    return out


# --- per service-port categorisation (kube-proxy's CategorizeEndpoints + policy chains) ----------


@dataclass(frozen=True)
class _Plan:
    """What `syncProxyRules` computes for one service port before writing any rule."""

    svc: ServicePort
    cluster_endpoints: tuple[Endpoint, ...]
    local_endpoints: tuple[Endpoint, ...]
    reachable_endpoints: tuple[Endpoint, ...]  # every endpoint that gets a KUBE-SEP chain
    has_endpoints: bool  # any usable endpoint anywhere in the cluster
    has_internal_endpoints: bool
    has_external_endpoints: bool
    uses_cluster_chain: bool
    uses_local_chain: bool
    uses_external_chain: bool
    # id(endpoint) -> its `ip:port`, for the endpoints of `svc` (they live as long as svc)
    addrs: dict[int, str] = field(compare=False, repr=False)

    # _Plan objects live for one render in one thread: caching on them is safe (unlike on the
    # model's ServicePort and Endpoint, which the state record pickles meanwhile).
    @functools.cached_property
    def spn(self) -> str:
        return self.svc.spn

    @functools.cached_property
    def proto(self) -> str:
        return self.svc.proto

    @property
    def externally_accessible(self) -> bool:
        return self.svc.node_port is not None

    @property
    def external_policy_local(self) -> bool:
        # The API only keeps externalTrafficPolicy for externally reachable services.
        return self.svc.external_local and self.externally_accessible

    # Chain names are hashed once per render (a cached_property writes the instance __dict__,
    # which a frozen dataclass allows): each SEP name is used three times per endpoint.
    @functools.cached_property
    def _hash(self) -> str:
        return port_proto_hash(self.spn, self.proto)

    @functools.cached_property
    def _sep_chains(self) -> dict[int, str]:
        """id(endpoint) -> KUBE-SEP name, for every reachable endpoint (cluster and local ones are
        subsets: the same objects)."""
        spn, proto, addrs = self.spn, self.proto, self.addrs
        return {id(ep): endpoint_chain(spn, proto, addrs[id(ep)]) for ep in self.reachable_endpoints}

    @property
    def svc_chain(self) -> str:
        return SVC_PREFIX + self._hash

    @property
    def svl_chain(self) -> str:
        return SVL_PREFIX + self._hash

    @property
    def ext_chain(self) -> str:
        return EXT_PREFIX + self._hash

    @property
    def internal_chain(self) -> str:
        return self.svl_chain if self.svc.internal_local else self.svc_chain

    @property
    def external_policy_chain(self) -> str:
        return self.svl_chain if self.external_policy_local else self.svc_chain

    def sep_chain(self, ep: Endpoint) -> str:
        return self._sep_chains[id(ep)]

    def addr(self, ep: Endpoint) -> str:
        """`ep.addr`, formatted once per render."""
        return self.addrs[id(ep)]

    def chains(self) -> list[str]:
        """The nat chains this service port declares, in kube-proxy's write order."""
        out = []
        if self.uses_external_chain:
            out.append(self.ext_chain)
        if self.uses_cluster_chain:
            out.append(self.svc_chain)
        if self.uses_local_chain:
            out.append(self.svl_chain)
        out += [self.sep_chain(ep) for ep in self.reachable_endpoints]
        return out


def _plan(node: NodeContext, svc: ServicePort) -> _Plan:
    # all ready: the model has no terminating endpoints or topology hints. Sorted as
    # svc.sorted_endpoints() sorts them, each address formatted once (keyed by the object).
    addrs = {id(e): e.addr for e in svc.endpoints}
    endpoints = sorted(svc.endpoints, key=lambda e: addrs[id(e)])
    externally_accessible = svc.node_port is not None
    external_local = svc.external_local and externally_accessible
    uses_cluster = not svc.internal_local or externally_accessible  # UsesClusterEndpoints()
    uses_local = svc.internal_local or external_local  # UsesLocalEndpoints()

    cluster = tuple(endpoints) if uses_cluster else ()
    local = tuple(e for e in endpoints if e.node == node.name) if uses_local else ()
    has_endpoints = bool(endpoints)
    if not uses_local:
        reachable = cluster
    elif not uses_cluster:
        reachable = local
    else:  # both policies in use: the union (kube-proxy builds it from a map; we keep the sort order)
        seen = {addrs[id(e)]: e for e in (*cluster, *local)}
        reachable = tuple(seen[a] for a in sorted(seen))

    has_internal = has_endpoints and not (svc.internal_local and not local)
    has_external = has_endpoints and not (external_local and not local)
    return _Plan(
        svc=svc,
        addrs=addrs,
        cluster_endpoints=cluster,
        local_endpoints=local,
        reachable_endpoints=reachable,
        has_endpoints=has_endpoints,
        has_internal_endpoints=has_internal,
        has_external_endpoints=has_external,
        uses_cluster_chain=bool(cluster) and uses_cluster,
        uses_local_chain=bool(local) and uses_local,
        uses_external_chain=has_endpoints and externally_accessible,
    )


def _check_unique(services: Sequence[ServicePort]) -> None:
    seen: set[tuple[str, str]] = set()
    for svc in services:
        key = (svc.spn, svc.proto)
        if key in seen:
            raise ValueError(f"service port {svc.spn} ({svc.proto}) is listed twice; its chains would collide")
        seen.add(key)


def _plans(node: NodeContext, services: Sequence[ServicePort]) -> list[_Plan]:
    """One plan per service port, in a fixed order (kube-proxy walks a Go map: any order is faithful)."""
    _check_unique(services)
    return _ordered_plans(node, services)


def _ordered_plans(node: NodeContext, services: Sequence[ServicePort]) -> list[_Plan]:
    """`_plans` without the duplicate check (for a caller that made it)."""
    ordered = sorted(services, key=lambda s: (s.namespace, s.name, s.port_name, s.proto))
    return [_plan(node, s) for s in ordered]


# --- the payload ---------------------------------------------------------------------------------


class _Lines:
    """kube-proxy's LineBuffer: words joined by single spaces, one rule per line.

    A streamed render also leaves *deferred* segments: `defer(fn)` marks the current end of
    `lines`, and `fn()` (the lines that belong there) runs only when the payload is written out,
    so a tool can already parse what comes before. Only append to `lines` after deferring."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.deferred: list[tuple[int, Callable[[], list[str]]]] = []

    def write(self, *words: str) -> None:
        self.lines.append(" ".join(words))

    def defer(self, fn: Callable[[], list[str]]) -> None:
        self.deferred.append((len(self.lines), fn))

    def empty(self) -> bool:
        return not self.lines and not self.deferred

    def blocks(self) -> Iterator[list[str]]:
        """The lines in order, deferred segments rendered as they are reached."""
        at = 0
        for pos, fn in self.deferred:
            if pos > at:
                yield self.lines[at:pos]
            at = pos
            yield fn()
        if at < len(self.lines):
            yield self.lines[at:]


@dataclass
class _Tables:
    """A payload being written: kube-proxy's four buffers (filterChains, filterRules, natChains,
    natRules); chain lines go before rule lines in each table."""

    filter_chains: _Lines = field(default_factory=_Lines)
    filter_rules: _Lines = field(default_factory=_Lines)
    nat_chains: _Lines = field(default_factory=_Lines)
    nat_rules: _Lines = field(default_factory=_Lines)

    def table(self, name: str) -> tuple[_Lines, _Lines]:
        return (self.filter_chains, self.filter_rules) if name == "filter" else (self.nat_chains, self.nat_rules)

    def chunks(self, *, skip_empty: bool = False) -> Iterator[str]:
        """The payload text in pieces (each ends with a newline), deferred segments rendered as
        they are reached; "".join of them is the whole payload."""
        for name in ("filter", "nat"):
            chains, rules = self.table(name)
            if skip_empty and chains.empty() and rules.empty():
                continue
            yield f"*{name}\n"
            for buf in (chains, rules):
                for block in buf.blocks():
                    if block:
                        yield "\n".join(block) + "\n"
            yield "COMMIT\n"

    def text(self, *, skip_empty: bool = False) -> str:
        return "".join(self.chunks(skip_empty=skip_empty))


def _discard(line: str) -> None:
    pass


def _chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


def _rule_chain(line: str) -> str:
    """The chain an `-A CHAIN ...` / `-X CHAIN` line acts on."""
    return line.split(" ", 2)[1]


def is_large_cluster(services: Iterable[ServicePort]) -> bool:
    """kube-proxy's largeClusterMode: more than 1000 endpoints over all service ports. It decides
    whether per-endpoint rules carry comments, so a partial sync must use the flag of the whole
    cluster, not count the few services it renders."""
    return sum(len(s.endpoints) for s in services) > LARGE_CLUSTER_ENDPOINTS_THRESHOLD


def render_iptables(
    node: NodeContext,
    services: Sequence[ServicePort],
    *,
    only: Collection[str] | None = None,
    stale: Collection[str] = (),
    large_cluster: bool | None = None,
    whole_tables: bool = False,
) -> str:
    """The `iptables-restore --noflush` input kube-proxy would write for `services` on `node`.

    only:  partial sync; the `spn` strings (`ns/name:port`) whose per-service chains are written.
           None = full sync (every chain). Top-level chains and the filter table are always full.
    stale: service chains (KUBE-SVC/SVL/EXT/FW/SEP) to flush and delete (`:C - [0:0]` + `-X C`).
    large_cluster: kube-proxy's large-cluster mode (`is_large_cluster`); None = decide it from
           `services`, which must then be all of them.
    whole_tables: the input of a restore *without* --noflush, which replaces both tables: the
           builtin chains are declared too (policy ACCEPT) and hold the jump rules, as
           `builtin_rules` lists them (what `-C`/`-I 1` one jump at a time would leave).
    Raises ValueError for a stale name that is not a service chain or that this render still uses.
    """
    return "".join(
        iter_render_iptables(
            node, services, only=only, stale=stale, large_cluster=large_cluster, whole_tables=whole_tables
        )
    )


def iter_render_iptables(
    node: NodeContext,
    services: Sequence[ServicePort],
    *,
    only: Collection[str] | None = None,
    stale: Collection[str] = (),
    large_cluster: bool | None = None,
    whole_tables: bool = False,
) -> Iterator[str]:
    """`render_iptables` in pieces, computed as they are consumed: a sync writes each piece to
    `iptables-restore` while the tool parses the ones before (the render of 10k services takes
    ~0.3 s, the tool ~2.5 s). Arguments are checked now (ValueError, as render_iptables), before
    anything reaches a tool; "".join of the pieces equals render_iptables' text."""
    _check_unique(services)
    # with stale chains, the plans are needed now (to check them) and reused by the render
    plans = _ordered_plans(node, services) if stale else None
    if plans is not None:
        wanted = {c for p in plans for c in p.chains()}
        for chain in stale:
            if not is_service_chain(chain):
                raise ValueError(
                    f"{chain} is not a kube-proxy service chain; only KUBE-SVC/SVL/EXT/FW/SEP-* are deleted"
                )
            if chain in wanted:
                raise ValueError(f"{chain} is stale but still used by a service; it must not be deleted")

    def pieces() -> Iterator[str]:
        large = is_large_cluster(services) if large_cluster is None else large_cluster
        ordered = plans if plans is not None else _ordered_plans(node, services)
        out = _render(node, ordered, large_cluster=large, only=only, stale=stale, stream=True)
        if whole_tables:
            _add_builtin_chains(out, node)
        yield from out.chunks()

    return pieces()


def _render(
    node: NodeContext,
    plans: Sequence[_Plan],
    *,
    large_cluster: bool,
    only: Collection[str] | None,
    stale: Collection[str],
    stream: bool = False,
) -> _Tables:
    """The payload's four buffers. stream: the service ports' nat rules (their lines in the
    top-level chains and their own chains' rules) are deferred segments of STREAM_BATCH service
    ports each, rendered when the payload is written out; the filter table and every chain
    declaration are complete on return (a restore needs a chain declared before a jump to it)."""
    mark = node.masquerade_mark
    cidr = str(node.cluster_cidr)
    t = _Tables()

    for chain in _FILTER_TOP_CHAINS:
        t.filter_chains.write(_chain_line(chain))
    for chain in _NAT_TOP_CHAINS:
        t.nat_chains.write(_chain_line(chain))

    t.nat_rules.write("-A", KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN")
    # Clear the mark so a packet that re-traverses the stack is not masqueraded again.
    t.nat_rules.write("-A", KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark)
    masq = ["-A", KUBE_POSTROUTING, "-m", "comment", "--comment", '"kubernetes service traffic requiring SNAT"']
    masq += ["-j", "MASQUERADE"]
    if node.random_fully:
        masq.append("--random-fully")
    t.nat_rules.write(*masq)
    t.nat_rules.write("-A", KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark)

    # localhostNodePorts (the default) sets route_localnet=1, which lets 127.0.0.0/8 be routed;
    # this copy of kubelet's rule drops martian packets to 127/8 that did not come from it.
    t.filter_chains.write(_chain_line(KUBE_FIREWALL))
    t.filter_rules.write(
        "-A", KUBE_FIREWALL, "-m", "comment", "--comment", '"block incoming localnet connections"',
        "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8",
        "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP",
    )  # fmt: skip

    batch: list[tuple[_Plan, list[str], bool]] = []
    for p in plans:
        # kube-proxy writes a skipped service into discard buffers; not writing it is the same text
        own = only is None or p.spn in only
        if not stream:
            _write_top(p, t.filter_rules, t.nat_rules)
            if own:
                _write_chains(p, cidr, large_cluster, t.nat_chains, t.nat_rules)
            continue
        top = _Lines()
        _write_top(p, t.filter_rules, top)
        if own:  # the same declarations, in the same order, as _write_chains writes them
            t.nat_chains.lines += [_chain_line(c) for c in p.chains()]
        batch.append((p, top.lines, own))
        if len(batch) == STREAM_BATCH:
            t.nat_rules.defer(functools.partial(_nat_rules_of, batch, cidr, large_cluster))
            batch = []
    if batch:
        t.nat_rules.defer(functools.partial(_nat_rules_of, batch, cidr, large_cluster))

    for chain in sorted(stale):  # flushed by its chain line, then deleted
        t.nat_chains.write(_chain_line(chain))
        t.nat_rules.write("-X", chain)

    # The NodePort dispatch must stay the last rule of KUBE-SERVICES (every ClusterIP first).
    t.nat_rules.write(
        "-A", KUBE_SERVICES, "-m", "comment", "--comment", _NODEPORTS_TAIL_COMMENT,
        "-m", "addrtype", "--dst-type", "LOCAL", "-j", KUBE_NODEPORTS,
    )  # fmt: skip

    # Drop INVALID packets (they would otherwise reach a pod un-NATed and cause RSTs, #74839).
    t.filter_rules.write("-A", KUBE_FORWARD, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    # Forward marked traffic even when the FORWARD policy is DROP, and the rest of its flow.
    t.filter_rules.write(
        "-A", KUBE_FORWARD, "-m", "comment", "--comment", '"kubernetes forwarding rules"',
        "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT",
    )  # fmt: skip
    t.filter_rules.write(
        "-A", KUBE_FORWARD, "-m", "comment", "--comment", '"kubernetes forwarding conntrack rule"',
        "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT",
    )  # fmt: skip
    return t


def _nat_rules_of(batch: list[tuple[_Plan, list[str], bool]], cidr: str, large_cluster: bool) -> list[str]:
    """A deferred segment of a streamed render: per service port, its lines in the top-level nat
    chains, then its own chains' rules (declared already)."""
    out = _Lines()
    for p, top, own in batch:
        out.lines += top
        if own:
            _write_chains(p, cidr, large_cluster, None, out)
    return out.lines


def _add_builtin_chains(t: _Tables, node: NodeContext) -> None:
    """Turn a payload into a whole-table one: without --noflush a restore flushes each table it
    names and deletes its chains, builtin ones included, so they are declared again (ACCEPT) and
    the jumps into kube-proxy's chains written after every rule (their targets exist by then)."""
    jumps = builtin_rules(node)
    for table, builtins in BUILTIN_CHAINS.items():
        chains, rules = t.table(table)
        chains.lines[:0] = [f":{c} ACCEPT [0:0]" for c in builtins]
        rules.lines += [line for c in builtins for line in jumps[(table, c)]]


def render_iptables_delta(
    node: NodeContext,
    previous: Sequence[ServicePort],
    current: Sequence[ServicePort],
    services: Sequence[ServicePort],
    *,
    large_cluster: bool,
) -> str:
    """A partial sync's `iptables-restore --noflush` input, computed from the changed service ports.

    previous: the changed service ports as the kernel holds them (removed ones included);
    current:  the same service ports as they are now (added ones included);
    services: every service port now, read only when a top-level chain must be rewritten;
    large_cluster: `is_large_cluster` of the whole cluster, the same before and after (the
              unchanged services' chains were written with it).

    The kernel must hold the full render of the previous state on the same node; this takes it to
    the full render of `services`. The changed services' chains are rewritten and the ones they no
    longer use deleted: chain names hash the service port (and endpoint), so they belong to one
    service, and old minus new is exactly what a diff of `iptables-save` would find. A top-level
    chain (KUBE-SERVICES, KUBE-NODEPORTS, filter KUBE-EXTERNAL-SERVICES, ...) is written, in
    full, only when the changed services' lines in it differ: a service added or removed, one
    that loses or regains all its endpoints, a new NodePort. An endpoint change rewrites none,
    where kube-proxy rewrites them all on every sync; that matters because the kernel's cost of
    a restore grows with what it names. Returns "" when nothing differs.
    """
    old, new = _plans(node, previous), _plans(node, current)
    before, after = _top_lines(old), _top_lines(new)
    rewrite = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    stale = {c for p in old for c in p.chains()} - {c for p in new for c in p.chains()}

    t = _Tables()
    if rewrite:
        full = _render(node, _plans(node, services), large_cluster=large_cluster, only=(), stale=())
        for table in ("filter", "nat"):
            (src_chains, src_rules), (chains, rules) = full.table(table), t.table(table)
            chains.lines += [x for x in src_chains.lines if (table, x[1:].split(" ", 1)[0]) in rewrite]
            rules.lines += [x for x in src_rules.lines if (table, _rule_chain(x)) in rewrite]
    cidr = str(node.cluster_cidr)
    for p in new:
        _write_chains(p, cidr, large_cluster, t.nat_chains, t.nat_rules)
    for chain in sorted(stale):  # flushed by its chain line, then deleted
        t.nat_chains.write(_chain_line(chain))
        t.nat_rules.write("-X", chain)
    return t.text(skip_empty=True)


def _top_lines(plans: Sequence[_Plan]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(table, top-level chain) -> the (service port, rule) lines these service ports put there."""
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for p in plans:
        filter_rules, nat_rules = _Lines(), _Lines()
        _write_top(p, filter_rules, nat_rules)
        for table, buf in (("filter", filter_rules), ("nat", nat_rules)):
            for line in buf.lines:
                out.setdefault((table, _rule_chain(line)), []).append((p.spn, line))
    return out


def _write_top(p: _Plan, filter_rules: _Lines, nat_rules: _Lines) -> None:
    """A service port's rules in the top-level chains (nat KUBE-SERVICES/KUBE-NODEPORTS, filter
    KUBE-SERVICES/KUBE-EXTERNAL-SERVICES), in `syncProxyRules`' order; `_write_chains` follows."""
    spn, proto, svc = p.spn, p.proto, p.svc
    vip, port = str(svc.cluster_ip), str(svc.port)

    if not p.has_endpoints:
        internal_target = external_target = "REJECT"
        internal_comment = external_comment = f'"{spn} has no endpoints"'
    else:
        internal_target = external_target = "DROP"
        internal_comment = external_comment = f'"{spn} has no local endpoints"'

    # Capture the clusterIP.
    if p.has_internal_endpoints:
        nat_rules.write(
            "-A", KUBE_SERVICES, "-m", "comment", "--comment", f'"{spn} cluster IP"',
            "-m", proto, "-p", proto, "-d", vip, "--dport", port, "-j", p.internal_chain,
        )  # fmt: skip
    else:
        filter_rules.write(
            "-A", KUBE_SERVICES, "-m", "comment", "--comment", internal_comment,
            "-m", proto, "-p", proto, "-d", vip, "--dport", port, "-j", internal_target,
        )  # fmt: skip

    # Capture the NodePort (on every local address: the KUBE-SERVICES tail rule).
    if svc.node_port is not None:
        if p.has_endpoints:
            nat_rules.write(
                "-A", KUBE_NODEPORTS, "-m", "comment", "--comment", spn,
                "-m", proto, "-p", proto, "--dport", str(svc.node_port), "-j", p.ext_chain,
            )  # fmt: skip
        if not p.has_external_endpoints:
            filter_rules.write(
                "-A", KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment", external_comment,
                "-m", "addrtype", "--dst-type", "LOCAL",
                "-m", proto, "-p", proto, "--dport", str(svc.node_port), "-j", external_target,
            )  # fmt: skip


def _write_chains(p: _Plan, cidr: str, large_cluster: bool, nat_chains: _Lines | None, nat_rules: _Lines) -> None:
    """A service port's own nat chains (KUBE-EXT/SVC/SVL/SEP), in `syncProxyRules`' order; their
    declarations go to `nat_chains` (None: written already, `_Plan.chains()` order)."""
    declare = nat_chains.lines.append if nat_chains is not None else _discard
    spn, proto, svc = p.spn, p.proto, p.svc
    vip, port = str(svc.cluster_ip), str(svc.port)

    # Internal traffic: masquerade what does not come from a pod (detect-local by cluster CIDR).
    if p.has_internal_endpoints:
        nat_rules.write(
            "-A", p.internal_chain, "-m", "comment", "--comment", f'"{spn} cluster IP"',
            "-m", proto, "-p", proto, "-d", vip, "--dport", port,
            "!", "-s", cidr, "-j", KUBE_MARK_MASQ,
        )  # fmt: skip

    # External traffic (NodePort): KUBE-EXT handles the special cases, then the policy chain.
    if p.uses_external_chain:
        declare(_chain_line(p.ext_chain))
        if not p.external_policy_local:
            # Endpoints may be on another node: SNAT so the reply comes back through this node.
            nat_rules.write(
                "-A", p.ext_chain,
                "-m", "comment", "--comment", f'"masquerade traffic for {spn} external destinations"',
                "-j", KUBE_MARK_MASQ,
            )  # fmt: skip
        else:
            # Pods reaching a NodePort are internal traffic: no policy, no SNAT.
            nat_rules.write(
                "-A", p.ext_chain, "-m", "comment", "--comment", f'"pod traffic for {spn} external destinations"',
                "-s", cidr, "-j", p.svc_chain,
            )  # fmt: skip
            # The node itself: its source address is the NodePort's own, so it must be SNATed.
            nat_rules.write(
                "-A", p.ext_chain, "-m", "comment", "--comment",
                f'"masquerade LOCAL traffic for {spn} external destinations"',
                "-m", "addrtype", "--src-type", "LOCAL", "-j", KUBE_MARK_MASQ,
            )  # fmt: skip
            nat_rules.write(
                "-A", p.ext_chain,
                "-m", "comment", "--comment", f'"route LOCAL traffic for {spn} external destinations"',
                "-m", "addrtype", "--src-type", "LOCAL", "-j", p.svc_chain,
            )  # fmt: skip
        if p.has_external_endpoints:
            nat_rules.write("-A", p.ext_chain, "-j", p.external_policy_chain)

    if p.uses_cluster_chain:
        declare(_chain_line(p.svc_chain))
        _write_endpoint_rules(p, p.svc_chain, p.cluster_endpoints, large_cluster, nat_rules)
    if p.uses_local_chain:
        declare(_chain_line(p.svl_chain))
        _write_endpoint_rules(p, p.svl_chain, p.local_endpoints, large_cluster, nat_rules)

    for ep in p.reachable_endpoints:
        sep = p.sep_chain(ep)
        declare(_chain_line(sep))
        head = ["-A", sep] if large_cluster else ["-A", sep, "-m", "comment", "--comment", spn]
        nat_rules.write(*head, "-s", str(ep.ip), "-j", KUBE_MARK_MASQ)  # hairpin: a pod reaching itself
        affinity = ["-m", "recent", "--name", sep, "--set"] if svc.affinity_timeout is not None else []
        nat_rules.write(*head, *affinity, "-m", proto, "-p", proto, "-j", "DNAT", "--to-destination", p.addr(ep))


def _write_endpoint_rules(
    p: _Plan, chain: str, endpoints: Sequence[Endpoint], large_cluster: bool, nat_rules: _Lines
) -> None:
    """kube-proxy's writeServiceToEndpointRules: affinity checks first, then the random fan-out."""

    def head(ep: Endpoint) -> list[str]:
        if large_cluster:
            return ["-A", chain]
        return ["-A", chain, "-m", "comment", "--comment", f'"{p.spn} -> {p.addr(ep)}"']

    timeout = p.svc.affinity_timeout
    if timeout is not None:
        for ep in endpoints:
            sep = p.sep_chain(ep)
            nat_rules.write(*head(ep), "-m", "recent", "--name", sep, "--rcheck", "--seconds", str(timeout), "--reap",
                            "-j", sep)  # fmt: skip
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        stat = ["-m", "statistic", "--mode", "random", "--probability", probability(n - i)] if i < n - 1 else []
        nat_rules.write(*head(ep), *stat, "-j", p.sep_chain(ep))


# --- what the kernel should hold -----------------------------------------------------------------


def service_chains(node: NodeContext, services: Sequence[ServicePort]) -> dict[str, set[str]]:
    """Every chain a full render declares, per table (top-level and per-service)."""
    nat = set(_NAT_TOP_CHAINS) | {c for p in _plans(node, services) for c in p.chains()}
    return {"filter": {*_FILTER_TOP_CHAINS, KUBE_FIREWALL}, "nat": nat}


def stale_chains(node: NodeContext, services: Sequence[ServicePort], existing_nat: Iterable[str]) -> list[str]:
    """The service chains the kernel's nat table has (`existing_nat`) that the desired state no longer
    uses: pass them as `stale=` (kube-proxy diffs `iptables-save -t nat` the same way)."""
    wanted = service_chains(node, services)["nat"]
    return sorted(c for c in set(existing_nat) if is_service_chain(c) and c not in wanted)
