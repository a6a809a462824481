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
order, exactly like a node.

Partial syncs (kube-proxy's MinimizeIPTablesRestore, GA in v1.28): `only` names the service
ports whose Service or endpoints changed; the per-service chains (SVC/SVL/EXT/FW/SEP) of all
other services are left out of the payload (the kernel keeps their current contents), while
every top-level nat chain and the whole filter table are rewritten. `stale` lists service
chains to delete (what the kernel has minus `service_chains()` of the full desired state;
`stale_chains()` computes it).

Deliberate difference from a real node: the masquerade mark is written as the model's
`NodeContext.masquerade_mark` (`0x4000`, as in kube-proxy's unit tests), where the real
binary formats it with Go's `%#08x` (`0x00004000`); the kernel stores the same number and
`iptables-save` prints `0x4000` for both.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from netlab.render.model import Endpoint, NodeContext, ServicePort

__all__ = [
    "LARGE_CLUSTER_ENDPOINTS_THRESHOLD",
    "Table",
    "endpoint_chain",
    "external_chain",
    "firewall_chain",
    "is_service_chain",
    "jump_rules",
    "local_chain",
    "port_proto_hash",
    "probability",
    "render_iptables",
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
_NODEPORTS_TAIL_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


# --- names ------------------------------------------------------------------------------------


def port_proto_hash(spn: str, proto: str) -> str:
    """kube-proxy's `portProtoHash`: the first 16 chars of base32(sha256(spn + proto))."""
    digest = hashlib.sha256((spn + proto).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


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
    digest = hashlib.sha256((spn + proto + endpoint).encode()).digest()
    return SEP_PREFIX + base64.b32encode(digest).decode()[:16]


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

    @property
    def spn(self) -> str:
        return self.svc.spn

    @property
    def proto(self) -> str:
        return self.svc.proto

    @property
    def externally_accessible(self) -> bool:
        return self.svc.node_port is not None

    @property
    def external_policy_local(self) -> bool:
        # The API only keeps externalTrafficPolicy for externally reachable services.
        return self.svc.external_local and self.externally_accessible

    @property
    def svc_chain(self) -> str:
        return service_chain(self.spn, self.proto)

    @property
    def svl_chain(self) -> str:
        return local_chain(self.spn, self.proto)

    @property
    def ext_chain(self) -> str:
        return external_chain(self.spn, self.proto)

    @property
    def internal_chain(self) -> str:
        return self.svl_chain if self.svc.internal_local else self.svc_chain

    @property
    def external_policy_chain(self) -> str:
        return self.svl_chain if self.external_policy_local else self.svc_chain

    def sep_chain(self, ep: Endpoint) -> str:
        return endpoint_chain(self.spn, self.proto, ep.addr)

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
    endpoints = svc.sorted_endpoints()  # all ready: the model has no terminating endpoints or topology hints
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
        seen = {e.addr: e for e in (*cluster, *local)}
        reachable = tuple(seen[a] for a in sorted(seen))

    has_internal = has_endpoints and not (svc.internal_local and not local)
    has_external = has_endpoints and not (external_local and not local)
    return _Plan(
        svc=svc,
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


def _plans(node: NodeContext, services: Sequence[ServicePort]) -> list[_Plan]:
    """One plan per service port, in a fixed order (kube-proxy walks a Go map: any order is faithful)."""
    seen: set[tuple[str, str]] = set()
    for svc in services:
        key = (svc.spn, svc.proto)
        if key in seen:
            raise ValueError(f"service port {svc.spn} ({svc.proto}) is listed twice; its chains would collide")
        seen.add(key)
    ordered = sorted(services, key=lambda s: (s.namespace, s.name, s.port_name, s.proto))
    return [_plan(node, s) for s in ordered]


# --- the payload ---------------------------------------------------------------------------------


class _Lines:
    """kube-proxy's LineBuffer: words joined by single spaces, one rule per line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, *words: str) -> None:
        self.lines.append(" ".join(words))


def _chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


def render_iptables(
    node: NodeContext,
    services: Sequence[ServicePort],
    *,
    only: Collection[str] | None = None,
    stale: Collection[str] = (),
) -> str:
    """The `iptables-restore --noflush` input kube-proxy would write for `services` on `node`.

    only:  partial sync; the `spn` strings (`ns/name:port`) whose per-service chains are written.
           None = full sync (every chain). Top-level chains and the filter table are always full.
    stale: service chains (KUBE-SVC/SVL/EXT/FW/SEP) to flush and delete (`:C - [0:0]` + `-X C`).
    Raises ValueError for a stale name that is not a service chain or that this render still uses.
    """
    plans = _plans(node, services)
    mark = node.masquerade_mark
    cidr = str(node.cluster_cidr)

    wanted = {c for p in plans for c in p.chains()}
    for chain in stale:
        if not is_service_chain(chain):
            raise ValueError(f"{chain} is not a kube-proxy service chain; only KUBE-SVC/SVL/EXT/FW/SEP-* are deleted")
        if chain in wanted:
            raise ValueError(f"{chain} is stale but still used by a service; it must not be deleted")

    filter_chains, filter_rules, nat_chains, nat_rules = _Lines(), _Lines(), _Lines(), _Lines()
    skipped_chains, skipped_rules = _Lines(), _Lines()  # kube-proxy's discard buffers

    for chain in _FILTER_TOP_CHAINS:
        filter_chains.write(_chain_line(chain))
    for chain in _NAT_TOP_CHAINS:
        nat_chains.write(_chain_line(chain))

    nat_rules.write("-A", KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN")
    # Clear the mark so a packet that re-traverses the stack is not masqueraded again.
    nat_rules.write("-A", KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark)
    masq = ["-A", KUBE_POSTROUTING, "-m", "comment", "--comment", '"kubernetes service traffic requiring SNAT"']
    masq += ["-j", "MASQUERADE"]
    if node.random_fully:
        masq.append("--random-fully")
    nat_rules.write(*masq)
    nat_rules.write("-A", KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark)

    # localhostNodePorts (the default) sets route_localnet=1, which lets 127.0.0.0/8 be routed;
    # this copy of kubelet's rule drops martian packets to 127/8 that did not come from it.
    filter_chains.write(_chain_line(KUBE_FIREWALL))
    filter_rules.write(
        "-A", KUBE_FIREWALL, "-m", "comment", "--comment", '"block incoming localnet connections"',
        "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8",
        "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP",
    )  # fmt: skip

    large_cluster = sum(len(p.svc.endpoints) for p in plans) > LARGE_CLUSTER_ENDPOINTS_THRESHOLD

    for p in plans:
        partial_skip = only is not None and p.spn not in only
        _write_service(
            p, cidr, large_cluster, filter_rules, nat_rules,
            skipped_chains if partial_skip else nat_chains,
            skipped_rules if partial_skip else nat_rules,
        )  # fmt: skip

    for chain in sorted(stale):  # flushed by its chain line, then deleted
        nat_chains.write(_chain_line(chain))
        nat_rules.write("-X", chain)

    # The NodePort dispatch must stay the last rule of KUBE-SERVICES (every ClusterIP first).
    nat_rules.write(
        "-A", KUBE_SERVICES, "-m", "comment", "--comment", _NODEPORTS_TAIL_COMMENT,
        "-m", "addrtype", "--dst-type", "LOCAL", "-j", KUBE_NODEPORTS,
    )  # fmt: skip

    # Drop INVALID packets (they would otherwise reach a pod un-NATed and cause RSTs, #74839).
    filter_rules.write("-A", KUBE_FORWARD, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    # Forward marked traffic even when the FORWARD policy is DROP, and the rest of its flow.
    filter_rules.write(
        "-A", KUBE_FORWARD, "-m", "comment", "--comment", '"kubernetes forwarding rules"',
        "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT",
    )  # fmt: skip
    filter_rules.write(
        "-A", KUBE_FORWARD, "-m", "comment", "--comment", '"kubernetes forwarding conntrack rule"',
        "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT",
    )  # fmt: skip

    out = ["*filter", *filter_chains.lines, *filter_rules.lines, "COMMIT"]
    out += ["*nat", *nat_chains.lines, *nat_rules.lines, "COMMIT"]
    return "\n".join(out) + "\n"


def _write_service(
    p: _Plan,
    cidr: str,
    large_cluster: bool,
    filter_rules: _Lines,
    top_nat_rules: _Lines,
    nat_chains: _Lines,
    nat_rules: _Lines,
) -> None:
    """One service port, in `syncProxyRules`' order. `top_nat_rules` always reaches the kernel;
    `nat_chains`/`nat_rules` are discard buffers when a partial sync skips this service."""
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
        top_nat_rules.write(
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
            top_nat_rules.write(
                "-A", KUBE_NODEPORTS, "-m", "comment", "--comment", spn,
                "-m", proto, "-p", proto, "--dport", str(svc.node_port), "-j", p.ext_chain,
            )  # fmt: skip
        if not p.has_external_endpoints:
            filter_rules.write(
                "-A", KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment", external_comment,
                "-m", "addrtype", "--dst-type", "LOCAL",
                "-m", proto, "-p", proto, "--dport", str(svc.node_port), "-j", external_target,
            )  # fmt: skip

    # Internal traffic: masquerade what does not come from a pod (detect-local by cluster CIDR).
    if p.has_internal_endpoints:
        nat_rules.write(
            "-A", p.internal_chain, "-m", "comment", "--comment", f'"{spn} cluster IP"',
            "-m", proto, "-p", proto, "-d", vip, "--dport", port,
            "!", "-s", cidr, "-j", KUBE_MARK_MASQ,
        )  # fmt: skip

    # External traffic (NodePort): KUBE-EXT handles the special cases, then the policy chain.
    if p.uses_external_chain:
        nat_chains.write(_chain_line(p.ext_chain))
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
        nat_chains.write(_chain_line(p.svc_chain))
        _write_endpoint_rules(p, p.svc_chain, p.cluster_endpoints, large_cluster, nat_rules)
    if p.uses_local_chain:
        nat_chains.write(_chain_line(p.svl_chain))
        _write_endpoint_rules(p, p.svl_chain, p.local_endpoints, large_cluster, nat_rules)

    for ep in p.reachable_endpoints:
        sep = p.sep_chain(ep)
        nat_chains.write(_chain_line(sep))
        head = ["-A", sep] if large_cluster else ["-A", sep, "-m", "comment", "--comment", spn]
        nat_rules.write(*head, "-s", str(ep.ip), "-j", KUBE_MARK_MASQ)  # hairpin: a pod reaching itself
        affinity = ["-m", "recent", "--name", sep, "--set"] if svc.affinity_timeout is not None else []
        nat_rules.write(*head, *affinity, "-m", proto, "-p", proto, "-j", "DNAT", "--to-destination", ep.addr)


def _write_endpoint_rules(
    p: _Plan, chain: str, endpoints: Sequence[Endpoint], large_cluster: bool, nat_rules: _Lines
) -> None:
    """kube-proxy's writeServiceToEndpointRules: affinity checks first, then the random fan-out."""

    def head(ep: Endpoint) -> list[str]:
        if large_cluster:
            return ["-A", chain]
        return ["-A", chain, "-m", "comment", "--comment", f'"{p.spn} -> {ep.addr}"']

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
