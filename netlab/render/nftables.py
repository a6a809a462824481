"""kube-proxy's nftables proxier as a pure function: services -> the `nft -f` transaction it sends.

Matched against kubernetes `pkg/proxy/nftables` as of the v1.34 layout (PR #132456: filter
chains `filter-prerouting-pre-dnat` / `filter-output-pre-dnat` at dstnat-10 = -110 and
`filter-input` / `-forward` / `-output` at 0), before v1.36's `hairpin-connections` set. The
golden is `TestOverallNFTablesRules` / `baseRules` in `proxier_test.go`; this module reproduces
its lines for the service shapes netlab models (ClusterIP, NodePort, traffic policies, ClientIP
affinity; no externalIPs, LoadBalancers or source ranges).

Layout (one private table, so kube-proxy never touches anyone else's rules, and one atomic
transaction per sync, as `knftables` runs `nft -f -`):

- `table ip kube-proxy` with 8 base chains. The filter chains that look at the *original*
  destination (`firewall-check`) must run before DNAT (-110 < dstnat -100); the no-endpoint and
  ClusterIP checks run at priority 0, after DNAT, so they only see packets no service claimed.
  REJECT is only valid in input/forward/output on kernels < 5.9, which is why the no-endpoint
  checks hang off those hooks and not off prerouting.
- Dispatch is O(1): `services` looks `ip daddr . meta l4proto . th dport` up in the verdict
  map `service-ips` and `meta l4proto . th dport` (for local destinations) in
  `service-nodeports`; the element's verdict is `goto` a per-service chain.
- Per service port, chain names are `<prefix>-<hashAndTruncate(ns/name/proto/port)>` (prefixes
  service-, local-, external-, endpoint-, affinity-): the 8-character base32 SHA-256 prefix keeps
  names unique and visually distinct after truncation to 240 characters.
- Endpoint choice: one rule `numgen random mod N vmap { 0 : goto endpoint-A , ... }`. It draws
  one random number per new connection, so the choice is exactly uniform (no cascade of
  probabilities as in iptables).
- No endpoints: the ClusterIP/NodePort gets an element in `no-endpoint-services` /
  `no-endpoint-nodeports` whose verdict is `goto reject-chain` (no endpoints at all) or `drop`
  (traffic policy Local and no local endpoint); the element carries the comment `ns/name:port`.
- `cluster-ips-check` rejects traffic to a known ClusterIP on a port no service uses and drops
  traffic to unallocated addresses of the service CIDRs (iptables mode does neither).
- Masquerading is by mark: `mark-for-masquerade` ORs the masquerade bit in, `masquerading`
  (postrouting) clears it again and does `masquerade fully-random` (always fully-random in
  nftables mode; `NodeContext.random_fully` only concerns iptables). The mark is written as
  kube-proxy formats it, `%#08x`: `0x004000` (its unit-test fake uses `0x4000`).
- `firewall-check` and the `firewall-ips` map are created unconditionally, as kube-proxy's
  setupNFTables does; netlab models no loadBalancerSourceRanges, so the map stays empty.

Sync mechanics. kube-proxy keeps what it last wrote in memory (`nftElementStorage`, the
chain list) and sends only changes: a *full* sync re-creates the fixed part and every service,
a *partial* sync rewrites the chains of changed services only and adds/deletes map elements
one by one. `NftState` (from `nft_state`) is that memory; `render_nftables(..., previous=)`
emits the partial sync against it.

Stale chains: kube-proxy flushes them and deletes them >= 1 s later in another transaction,
because before kernel 6.2 deleting a verdict-map element released its reference to the chain
asynchronously, so a `delete chain` in the same transaction failed with EBUSY. On the 6.x
kernels netlab runs on (checked on 6.18 with nft 1.0.6) the element's reference is dropped
within the transaction, so this renderer deletes stale chains at the end of the same
transaction, after the elements and rules that referenced them are gone.

`endpoint_dispatch="rules"` replaces the anonymous vmap, see `render_nftables`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Literal

from netlab.render.model import Endpoint, NodeContext, ServicePort

__all__ = [
    "EndpointDispatch",
    "NftState",
    "TABLE",
    "hash_and_truncate",
    "nft_state",
    "changed_subset",
    "render_nftables",
    "render_nftables_delta",
    "service_chain_base",
    "endpoint_chain_base",
]

TABLE = "kube-proxy"
_T = f"ip {TABLE}"

EndpointDispatch = Literal["vmap", "rules"]

# pkg/proxy/nftables/proxier.go nftablesBaseChains: (name, type, hook, priority)
_BASE_CHAINS: tuple[tuple[str, str, str, int], ...] = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)

# nftablesJumpChains: (destination chain, source chain, extra match). Order matters: it is the
# order of the jump rules inside each base chain.
_JUMP_CHAINS: tuple[tuple[str, str, str], ...] = (
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting-pre-dnat", "ct state new"),
    ("firewall-check", "filter-output-pre-dnat", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output", "ct state new"),
)

_MARK_MASQ = "mark-for-masquerade"
_REJECT_CHAIN = "reject-chain"

# The element containers kube-proxy tracks (nftElementStorage), in its cleanup order.
_CONTAINERS: tuple[tuple[str, str], ...] = (
    ("set", "cluster-ips"),
    ("map", "service-ips"),
    ("map", "firewall-ips"),
    ("map", "no-endpoint-services"),
    ("map", "no-endpoint-nodeports"),
    ("map", "service-nodeports"),
)

_NAME_BASE_MAX = 256 - 16  # knftables.NameLengthMax - chainNamePrefixLengthMax


def hash_and_truncate(name: str) -> str:
    """kube-proxy's hashAndTruncate: first 8 chars of base32(sha256(name)), `-`, name; <= 240 chars."""
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()
    out = f"{digest[:8]}-{name}"
    if len(out) > _NAME_BASE_MAX:
        out = out[: _NAME_BASE_MAX - 3] + "..."
    return out


def service_chain_base(svc: ServicePort) -> str:
    """servicePortChainNameBase: `HASH-ns/name/proto/portname` (e.g. `ULMVA6XW-ns1/svc1/tcp/p80`)."""
    return hash_and_truncate(f"{svc.namespace}/{svc.name}/{svc.proto}/{svc.port_name}")


def endpoint_chain_base(svc: ServicePort, ep: Endpoint) -> str:
    """servicePortEndpointChainNameBase: `HASH-ns/name/proto/portname__ip/port` (IPv6 `:` -> `.`)."""
    ip = str(ep.ip).replace(":", ".")
    return hash_and_truncate(f"{svc.namespace}/{svc.name}/{svc.proto}/{svc.port_name}__{ip}/{ep.port}")


def _q(comment: str) -> str:
    """A comment as knftables writes it (Go %q; our comments are plain ASCII)."""
    return json.dumps(comment)


def _mark(node: NodeContext) -> str:
    # NewProxier: fmt.Sprintf("%#08x", 1<<masqueradeBit) -> "0x004000" (the unit-test fake uses "0x4000").
    return f"{1 << node.masquerade_bit:#08x}"


# --- the per-service objects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Element:
    container: str  # "cluster-ips", "service-ips", ...
    key: str  # "172.30.0.41 . tcp . 80"
    value: str  # "goto service-..." / "drop"; "" for set elements
    comment: str | None = None

    def add(self) -> str:
        text = f"add element {_T} {self.container} {{ {self.key}"
        if self.comment is not None:
            text += f" comment {_q(self.comment)}"
        if self.value:
            text += f" : {self.value}"
        return text + " }"

    def delete(self) -> str:
        return _delete_element(self.container, self.key)


def _delete_element(container: str, key: str) -> str:
    return f"delete element {_T} {container} {{ {key} }}"


@dataclass
class _Service:
    """Everything one service port puts in the table, in the order kube-proxy's sync loop emits it."""

    base: str
    chains: list[str] = field(default_factory=list)  # ensureChain order
    elements: list[_Element] = field(default_factory=list)
    ops: list[tuple[str, str, str]] = field(default_factory=list)  # ("rule", chain, text) | ("set", name, decl)

    def rules(self, chain: str) -> list[str]:
        return [text for kind, c, text in self.ops if kind == "rule" and c == chain]

    def sets(self) -> dict[str, str]:
        return {name: decl for kind, name, decl in self.ops if kind == "set"}

    def chain_digests(self) -> dict[str, str]:
        return {c: _digest("\n".join(self.rules(c))) for c in self.chains}

    def digest(self) -> str:
        parts = [f"chain {c}\n" + "\n".join(self.rules(c)) for c in self.chains]
        parts += [f"set {n} {d}" for n, d in sorted(self.sets().items())]
        return _digest("\n".join(parts))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dispatch_rules(chain_of: list[str], mode: EndpointDispatch) -> list[str]:
    n = len(chain_of)
    if mode == "vmap":
        entries = " , ".join(f"{i} : goto {c}" for i, c in enumerate(chain_of))
        return [f"numgen random mod {n} vmap {{ {entries} }}"]
    # Cascade like iptables' statistic 1/(n-i): every `numgen` expression draws a fresh random
    # number, so `mod n == i` for i = 0..n-1 would NOT be uniform (and could fall through).
    out = []
    for i, c in enumerate(chain_of):
        left = n - i
        out.append(f"numgen random mod {left} == 0 goto {c}" if left > 1 else f"goto {c}")
    return out


def _build_service(node: NodeContext, svc: ServicePort, mode: EndpointDispatch) -> _Service:
    """syncProxyRules' loop body for one service port (all endpoints ready, no topology hints)."""
    proto = svc.proto
    base = service_chain_base(svc)
    cluster_chain, local_chain = f"service-{base}", f"local-{base}"
    external_chain = f"external-{base}"
    cidr = str(node.cluster_cidr)
    cip = str(svc.cluster_ip)
    spn = svc.spn

    externally_accessible = svc.node_port is not None  # netlab models no externalIPs / LoadBalancers
    internal_local = svc.internal_local
    external_local = svc.external_local and externally_accessible
    uses_cluster = not internal_local or externally_accessible  # UsesClusterEndpoints
    uses_local = internal_local or external_local  # UsesLocalEndpoints

    endpoints = svc.sorted_endpoints()
    cluster_eps = endpoints if uses_cluster else []
    local_eps = svc.local_endpoints(node.name) if uses_local else []
    has_endpoints = bool(endpoints)
    reachable = [e for e in endpoints if e in cluster_eps or e in local_eps]

    ep_chain = {e: f"endpoint-{endpoint_chain_base(svc, e)}" for e in reachable}
    affinity = {e: f"affinity-{endpoint_chain_base(svc, e)}" for e in reachable}

    out = _Service(base=base)
    out.chains += [ep_chain[e] for e in reachable]
    uses_cluster_chain = bool(cluster_eps) and uses_cluster
    uses_local_chain = bool(local_eps) and uses_local
    if uses_cluster_chain:
        out.chains.append(cluster_chain)
    if uses_local_chain:
        out.chains.append(local_chain)

    internal_chain = local_chain if internal_local else cluster_chain
    has_internal = has_endpoints and (not internal_local or bool(local_eps))
    external_policy_chain = local_chain if external_local else cluster_chain
    has_external = has_endpoints and (not external_local or bool(local_eps))
    uses_external_chain = has_endpoints and externally_accessible
    if uses_external_chain:
        out.chains.append(external_chain)

    internal_verdict = f"goto {_REJECT_CHAIN}" if not has_endpoints else "drop"
    external_verdict = internal_verdict

    key = f"{cip} . {proto} . {svc.port}"
    out.elements.append(_Element("cluster-ips", cip, ""))
    if has_internal:
        out.elements.append(_Element("service-ips", key, f"goto {internal_chain}"))
    else:
        out.elements.append(_Element("no-endpoint-services", key, internal_verdict, spn))
    if svc.node_port is not None:
        np_key = f"{proto} . {svc.node_port}"
        if has_endpoints:
            out.elements.append(_Element("service-nodeports", np_key, f"goto {external_chain}"))
        if not has_external:
            out.elements.append(_Element("no-endpoint-nodeports", np_key, external_verdict, spn))

    def rule(chain: str, text: str, comment: str | None = None) -> None:
        out.ops.append(("rule", chain, text if comment is None else f"{text} comment {_q(comment)}"))

    if has_internal:
        # detect-local by ClusterCIDR: traffic from outside the pod network gets masqueraded
        rule(internal_chain, f"ip daddr {cip} ip saddr != {cidr} jump {_MARK_MASQ}")
    if uses_external_chain:
        if not external_local:
            rule(external_chain, f"jump {_MARK_MASQ}")
        else:
            rule(external_chain, f"ip saddr {cidr} goto {cluster_chain}", "short-circuit pod traffic")
            rule(external_chain, f"fib saddr type local jump {_MARK_MASQ}", "masquerade local traffic")
            rule(external_chain, f"fib saddr type local goto {cluster_chain}", "short-circuit local traffic")
        if has_external:
            rule(external_chain, f"goto {external_policy_chain}")
    if svc.affinity_timeout is not None:
        for e in reachable:
            decl = f"{{ type ipv4_addr ; flags dynamic,timeout ; timeout {svc.affinity_timeout}s ; }}"
            out.ops.append(("set", affinity[e], decl))
    policy_chains = ((cluster_chain, cluster_eps, uses_cluster_chain), (local_chain, local_eps, uses_local_chain))
    for chain, eps, used in policy_chains:
        if not used:
            continue
        if svc.affinity_timeout is not None:
            for e in eps:
                rule(chain, f"ip saddr @{affinity[e]} goto {ep_chain[e]}")
        for text in _dispatch_rules([ep_chain[e] for e in eps], mode):
            rule(chain, text)
    for e in reachable:
        rule(ep_chain[e], f"ip saddr {e.ip} jump {_MARK_MASQ}")  # hairpin: a pod reaching itself
        if svc.affinity_timeout is not None:
            rule(ep_chain[e], f"update @{affinity[e]} {{ ip saddr }}")
        rule(ep_chain[e], f"meta l4proto {proto} dnat to {e.ip}:{e.port}")
    return out


def _build(node: NodeContext, services: Sequence[ServicePort], mode: EndpointDispatch) -> list[_Service]:
    keyed: dict[str, ServicePort] = {}
    for svc in services:
        k = f"{svc.namespace}/{svc.name}/{svc.proto}/{svc.port_name}"
        if k in keyed:
            raise ValueError(f"duplicate service port {svc.spn} ({svc.proto})")
        keyed[k] = svc
    return [_build_service(node, keyed[k], mode) for k in sorted(keyed)]


# --- the fixed part --------------------------------------------------------------------------------------


def _base_digest(node: NodeContext, nodeport_addresses: Sequence[IPv4Address] | None) -> str:
    parts = [
        str(node.cluster_cidr),
        ",".join(str(c) for c in node.service_cidrs),
        _mark(node),
        "all" if nodeport_addresses is None else ",".join(str(a) for a in nodeport_addresses),
    ]
    return _digest("|".join(parts))


def _setup(node: NodeContext, nodeport_addresses: Sequence[IPv4Address] | None) -> list[str]:
    """setupNFTables on kube-proxy's first sync (`flushed == false`)."""
    mark = _mark(node)
    lines = [f'add table {_T} {{ comment "rules for kube-proxy" ; }}']
    # add+delete once so base chains are re-created (a priority cannot be changed in place)
    for name, _, _, _ in _BASE_CHAINS:
        lines += [f"add chain {_T} {name}", f"delete chain {_T} {name}"]
    for name, typ, hook, prio in _BASE_CHAINS:
        lines += [f"add chain {_T} {name} {{ type {typ} hook {hook} priority {prio} ; }}", f"flush chain {_T} {name}"]
    created: set[str] = set()

    def ensure(chain: str) -> None:
        if chain not in created:
            created.add(chain)
            lines.extend([f"add chain {_T} {chain}", f"flush chain {_T} {chain}"])

    for dst, src, extra in _JUMP_CHAINS:
        ensure(dst)
        lines.append(f"add rule {_T} {src} {extra + ' ' if extra else ''}jump {dst}")
    for chain in ("services", "cluster-ips-check", "masquerading", _MARK_MASQ):
        ensure(chain)
    lines += [
        f"add rule {_T} {_MARK_MASQ} mark set mark or {mark}",
        f"add rule {_T} masquerading mark and {mark} == 0 return",
        f"add rule {_T} masquerading mark set mark xor {mark}",
        f"add rule {_T} masquerading masquerade fully-random",
        f'add set {_T} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f"add rule {_T} cluster-ips-check ip daddr @cluster-ips reject"
        f' comment "Reject traffic to invalid ports of ClusterIPs"',
    ]
    if node.service_cidrs:
        cidrs = ",".join(str(c) for c in node.service_cidrs)
        drop = f"add rule {_T} cluster-ips-check ip daddr {{ {cidrs} }} drop"
        lines.append(f'{drop} comment "Drop traffic to unallocated ClusterIPs"')
    lines.append(f'add set {_T} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}')
    if nodeport_addresses is None:
        lines.append(f"delete set {_T} nodeport-ips")
    else:
        lines.append(f"flush set {_T} nodeport-ips")
        lines += [f"add element {_T} nodeport-ips {{ {ip} }}" for ip in nodeport_addresses if not ip.is_loopback]
    vmap3 = "ipv4_addr . inet_proto . inet_service : verdict"
    vmap2 = "inet_proto . inet_service : verdict"
    lines += [
        f'add map {_T} no-endpoint-services {{ type {vmap3} ; comment "vmap to drop or reject packets to services'
        f' with no endpoints" ; }}',
        f'add map {_T} no-endpoint-nodeports {{ type {vmap2} ; comment "vmap to drop or reject packets to service'
        f' nodeports with no endpoints" ; }}',
        f'add chain {_T} {_REJECT_CHAIN} {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}',
        f"flush chain {_T} {_REJECT_CHAIN}",
        f"add rule {_T} {_REJECT_CHAIN} reject",
        f"add rule {_T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    ]
    if nodeport_addresses is None:
        lines.append(
            f"add rule {_T} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport"
            f" vmap @no-endpoint-nodeports"
        )
    else:
        lines.append(
            f"add rule {_T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport"
            f" vmap @no-endpoint-nodeports"
        )
    lines += [
        f'add map {_T} firewall-ips {{ type {vmap3} ; comment "destinations that are subject to'
        f' LoadBalancerSourceRanges" ; }}',
        f"add rule {_T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f'add map {_T} service-ips {{ type {vmap3} ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}',
        f'add map {_T} service-nodeports {{ type {vmap2} ; comment "NodePort traffic" ; }}',
        f"add rule {_T} services ip daddr . meta l4proto . th dport vmap @service-ips",
    ]
    if nodeport_addresses is None:
        lines.append(
            f"add rule {_T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport"
            f" vmap @service-nodeports"
        )
    else:
        lines.append(f"add rule {_T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports")
    # nftElementStorage.reset: the maps start empty; `flush table` would NOT do this (it removes
    # rules only; set and map elements survive it)
    lines += [f"flush {kind} {_T} {name}" for kind, name in _CONTAINERS]
    return lines


# --- state ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NftState:
    """What a render put in the kernel: kube-proxy's in-memory record between syncs.

    base: digest of the fixed part (cluster CIDR, service CIDRs, mark, NodePort addresses); a
      change forces a full sync, as a kube-proxy restart with new flags would.
    services: service chain base (`ULMVA6XW-ns1/svc1/tcp/p80`) -> digest of all the chains and
      affinity sets of that service port (kube-proxy rewrites a changed service as a whole).
    chains: every per-service chain -> digest of its rules.
    sets: affinity set -> its declaration.
    elements: set/map -> {key: value} (value "" for set elements), like nftElementStorage.
    """

    base: str
    services: dict[str, str]
    chains: dict[str, str]
    sets: dict[str, str]
    elements: dict[str, dict[str, str]]

    def to_json(self) -> str:
        return json.dumps(
            {
                "base": self.base,
                "services": self.services,
                "chains": self.chains,
                "sets": self.sets,
                "elements": self.elements,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> NftState:
        d: dict[str, Any] = json.loads(text)
        return cls(base=d["base"], services=d["services"], chains=d["chains"], sets=d["sets"], elements=d["elements"])


def _state(base: str, built: Iterable[_Service]) -> NftState:
    services: dict[str, str] = {}
    chains: dict[str, str] = {}
    sets: dict[str, str] = {}
    elements: dict[str, dict[str, str]] = {name: {} for _, name in _CONTAINERS}
    for s in built:
        services[s.base] = s.digest()
        chains.update(s.chain_digests())
        sets.update(s.sets())
        for e in s.elements:
            elements[e.container][e.key] = e.value
    return NftState(base=base, services=services, chains=chains, sets=sets, elements=elements)


def nft_state(
    node: NodeContext,
    services: Sequence[ServicePort],
    *,
    endpoint_dispatch: EndpointDispatch = "vmap",
    nodeport_addresses: Sequence[IPv4Address] | None = None,
) -> NftState:
    """The state `render_nftables` with the same arguments leaves in the kernel (for the next `previous=`)."""
    return _state(_base_digest(node, nodeport_addresses), _build(node, services, endpoint_dispatch))


# --- rendering ------------------------------------------------------------------------------------------------


def _service_lines(s: _Service, previous: NftState | None) -> list[str]:
    """One service port: ensureChain (add+flush), elements, then rules and affinity sets.

    With `previous`, an unchanged service emits nothing but element changes (none, normally),
    and an element whose verdict changed is deleted and re-added, as nftElementStorage does.
    """
    changed = previous is None or previous.services.get(s.base) != s.digest()
    lines: list[str] = []
    if changed:
        for c in s.chains:
            lines += [f"add chain {_T} {c}", f"flush chain {_T} {c}"]
    for e in s.elements:
        if previous is None:
            lines.append(e.add())
            continue
        old = previous.elements.get(e.container, {}).get(e.key)
        if old is None:
            lines.append(e.add())
        elif old != e.value:
            lines += [e.delete(), e.add()]
    if changed:
        for kind, name, text in s.ops:
            lines.append(f"add rule {_T} {name} {text}" if kind == "rule" else f"add set {_T} {name} {text}")
    return lines


def render_nftables(
    node: NodeContext,
    services: Sequence[ServicePort],
    *,
    previous: NftState | None = None,
    endpoint_dispatch: EndpointDispatch = "vmap",
    nodeport_addresses: Sequence[IPv4Address] | None = None,
) -> str:
    """The transaction kube-proxy would send to `nft -f -` for these services, one operation per line.

    previous=None: kube-proxy's first sync on a node without a `kube-proxy` table. It re-creates
      every object it names (`add` then `flush` for chains, `flush` for the six element maps,
      which `flush table` would leave alone), so applying it twice gives the same ruleset.
      Objects it does not name (chains of services that no longer exist) are left as they are:
      kube-proxy lists the kernel to find those; a pure function cannot, so pass `previous`.
    previous=NftState: a partial sync against that state. Changed and new service ports get
      their chains flushed and rewritten, unchanged ones are not touched, map/set elements are
      added and deleted one by one, stale chains are flushed and (unlike kube-proxy, which waits
      >= 1 s for kernels < 6.2) deleted at the end of the same transaction; stale affinity sets
      are deleted. Returns "" when nothing changed. If the fixed part changed (node settings,
      NodePort addresses), a full sync is rendered instead, followed by the same stale cleanup.

    endpoint_dispatch:
      "vmap" (kube-proxy): `numgen random mod N vmap { 0 : goto endpoint-A , ... }` in each
        service chain. One random draw, exactly uniform, one rule. Each such map is an
        *anonymous set* in the kernel, and committing a transaction that creates many of them
        is superlinear. Measured (kernel 6.18, nft 1.0.6, one transaction, services x 3
        endpoints, fresh table / the same full render applied again): 1k 0.4 s / 0.55 s,
        5k 5-6 s / 10-23 s, 10k 33-39 s / 110-142 s.
      "rules": `numgen random mod N == 0 goto endpoint-A`, `numgen random mod N-1 == 0 goto
        endpoint-B`, ..., `goto endpoint-Z`. Each rule draws a fresh number, so the moduli
        cascade like iptables' 1/(n-i) probabilities and the choice stays uniform
        ((n-1)/n * 1/(n-1) = 1/n for every endpoint). No anonymous sets, so loads scale linearly:
        1k 0.25-0.34 s, 5k 1.3-1.4 s, 10k 2.9-3.0 s, fresh or re-applied. The price is up to N
        rule evaluations per new connection (only a connection's first packet goes through nat
        chains) and service chains that no longer read like kube-proxy's.
    nodeport_addresses: None = NodePorts on every local address except 127.0.0.0/8 (the
      `fib daddr type local` form, kube-proxy's `--nodeport-addresses` matching all); a list =
      the `nodeport-ips` set form with those addresses (kube-proxy's default is the node's
      primary IP, i.e. `[node.node_ips[0]]`).
    """
    if endpoint_dispatch not in ("vmap", "rules"):
        raise ValueError(f"endpoint_dispatch must be 'vmap' or 'rules', not {endpoint_dispatch!r}")
    built = _build(node, services, endpoint_dispatch)
    base = _base_digest(node, nodeport_addresses)
    full = previous is None or previous.base != base
    lines = _setup(node, nodeport_addresses) if full else []
    for s in built:
        lines += _service_lines(s, None if full else previous)
    if previous is not None:
        now = _state(base, built)
        stale_chains = sorted(set(previous.chains) - set(now.chains))
        lines += [f"flush chain {_T} {c}" for c in stale_chains]
        lines += [f"delete set {_T} {n}" for n in sorted(set(previous.sets) - set(now.sets))]
        if not full:  # a full sync flushed the maps already
            for _, name in _CONTAINERS:
                gone = set(previous.elements.get(name, {})) - set(now.elements[name])
                lines += [_delete_element(name, k) for k in sorted(gone)]
        lines += [f"delete chain {_T} {c}" for c in stale_chains]
    return "".join(line + "\n" for line in lines)


def changed_subset(
    old: Sequence[ServicePort], new: Sequence[ServicePort]
) -> tuple[list[ServicePort], list[ServicePort]]:
    """The service ports a partial sync has to look at: those that changed, were added or removed,
    plus every port sharing a ClusterIP or a NodePort with one of them.

    The sharing matters because some kernel objects are keyed by more than one service port:
    `cluster-ips` holds one element per ClusterIP for all ports of a Service, and a NodePort can
    move from one service to another. A delta rendered from these subsets alone is the same
    transaction as one rendered from all services (kube-proxy's serviceChanges tracker plays
    this part in kube-proxy).
    """

    def key(s: ServicePort) -> tuple[str, str, str]:
        return (s.namespace, s.name, s.port_name)

    before = {key(s): s for s in old}
    after = {key(s): s for s in new}
    touched = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    ips = {s.cluster_ip for k in touched for s in (before.get(k), after.get(k)) if s is not None}
    node_ports = {
        (s.protocol, s.node_port)
        for k in touched
        for s in (before.get(k), after.get(k))
        if s is not None and s.node_port
    }

    def wanted(s: ServicePort) -> bool:
        return key(s) in touched or s.cluster_ip in ips or (s.protocol, s.node_port) in node_ports

    return [s for s in old if wanted(s)], [s for s in new if wanted(s)]


def render_nftables_delta(
    node: NodeContext,
    old: Sequence[ServicePort],
    new: Sequence[ServicePort],
    *,
    endpoint_dispatch: EndpointDispatch = "vmap",
    nodeport_addresses: Sequence[IPv4Address] | None = None,
) -> str:
    """`render_nftables(node, new, previous=nft_state(node, old))` for one node whose settings did
    not change, computed from the changed services only: O(changed), not O(all services).

    At 10k services the full form spends ~1.7 s building both states to emit a dozen lines.
    """
    old_part, new_part = changed_subset(old, new)
    kw: dict[str, Any] = {"endpoint_dispatch": endpoint_dispatch, "nodeport_addresses": nodeport_addresses}
    return render_nftables(node, new_part, previous=nft_state(node, old_part, **kw), **kw)
