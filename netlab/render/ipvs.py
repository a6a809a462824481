"""kube-proxy's IPVS mode as a pure function: services -> everything it puts in one node.

Matched against kubernetes `pkg/proxy/ipvs/proxier.go` (`syncProxyRules`, `writeIptablesRules`,
`syncService`, `syncEndpoint`) and `ipset.go` as of the v1.30-v1.35 layout (KUBE-IPVS-FILTER and
KUBE-IPVS-OUT-FILTER present, the masquerade mark written `%#08x`), restricted to what netlab
models: IPv4, ClusterIP and NodePort services, TCP/UDP, ready endpoints, ClientIP affinity, both
traffic policies; no externalIPs, LoadBalancers, source ranges or health-check NodePorts (so
their ipsets exist but stay empty, as on a node that has none).

What a node in IPVS mode holds, and why:

- `kube-ipvs0`, a dummy interface left *down*, carrying every ClusterIP as a /32. The addresses
  make the kernel treat a ClusterIP as local, so the first packet of a connection reaches the
  INPUT hook, where IPVS (LOCAL_IN) picks a real server and rewrites the destination. This is
  also why any host socket bound to 0.0.0.0 answers on every ClusterIP (issue #72236), which the
  filter chain KUBE-IPVS-FILTER closes again with a REJECT for ports no service uses.
- One IPVS virtual server per ClusterIP:port and per *node address*:nodePort (every local IPv4
  address except kube-ipvs0's and loopback: eth0, cni0, flannel.1 on a flannel node), scheduler
  `--ipvs-scheduler` (rr by default). ClientIP affinity = the persistent flag + the timeout.
  Scheduler `mh` also gets the source-hash flag (IP_VS_SVC_F_SCHED2), as kube-proxy sets it.
- Real servers: the endpoints, masquerade (NAT) forwarding, weight 1. A Local traffic policy
  uses the node's own endpoints, but, unlike iptables mode's DROP, falls back to the cluster
  endpoints when there are none here (PR #97081); a Local *internal* policy on a service without
  NodePorts has no cluster endpoints to fall back to, so its virtual server stays empty.
- ipsets keyed on what the few fixed iptables rules must recognise (KUBE-CLUSTER-IP for
  "masquerade off-cluster traffic to a ClusterIP", KUBE-LOOP-BACK for hairpin, KUBE-NODE-PORT-*
  for "masquerade NodePort traffic unless Local", KUBE-IPVS-IPS for the filter). The iptables
  rule count does not grow with the number of services: that is the point of IPVS mode.
- The iptables part (one `iptables-restore --noflush`, nat then filter) plus nine jumps from the
  built-in chains, which kube-proxy `EnsureRule(Prepend)`s on every sync (kube-proxy's IPVS
  mode has no partial sync; netlab's does, see `render_ipvs_delta` and kernel/proxy_ipvs.py).
- sysctls: net.ipv4.vs.conntrack=1 (IPVS keeps conntrack entries, so MASQUERADE and the
  reply's un-NAT work), expire_nodest_conn=1 and expire_quiescent_template=1 (connections to a
  removed or weight-0 real server die instead of hanging), ip_forward=1, and with kube-proxy's
  strictARP (MetalLB setups; on here by default) arp_ignore=1 / arp_announce=2 so the node does
  not answer ARP for ClusterIPs on eth0. conn_reuse_mode=0 only on kernels 4.1-5.8 (decided by
  the applier, which knows the kernel).

Deliberate differences: ipset entries and virtual servers are emitted sorted (kube-proxy walks Go
maps); NodePort addresses are an input (`nodeport_addresses`, read from the kernel by the
applier, as kube-proxy does each sync); the scheduler may be set per service
(`ServicePort.ipvs_scheduler`, a netlab extension: kube-proxy has one scheduler per node).

`trace_ipvs` is an offline model of the datapath for tests: which real servers a first packet
to (dst, port) can reach and whether it is masqueraded, derived from the structured state (the
ipsets and the IPVS table), not by parsing the rules.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

from netlab.render.model import Endpoint, NodeContext, ServicePort

__all__ = [
    "DUMMY_DEVICE",
    "FLAG_HASHED",
    "FLAG_PERSISTENT",
    "FLAG_SOURCE_HASH",
    "FWD_MASQ",
    "IPSETS",
    "IPTABLES_CHAINS",
    "IpsetSpec",
    "IpvsDelta",
    "IpvsState",
    "IpvsTrace",
    "JUMP_CHAINS",
    "RealServer",
    "VirtualServer",
    "ipvsadm_header",
    "ipvsadm_lines",
    "ipvsadm_order",
    "render_ipvs",
    "changed_subset",
    "render_ipvs_delta",
    "trace_ipvs",
]

DUMMY_DEVICE = "kube-ipvs0"

# include/uapi/linux/ip_vs.h
FLAG_PERSISTENT = 0x0001  # IP_VS_SVC_F_PERSISTENT
FLAG_HASHED = 0x0002  # IP_VS_SVC_F_HASHED: set by the kernel on every service it holds
FLAG_SOURCE_HASH = 0x0010  # IP_VS_SVC_F_SCHED2: sh-port / mh-port (kube-proxy's FlagSourceHash)
FWD_MASQ = 0  # IP_VS_CONN_F_MASQ: NAT
_FWD_NAMES = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route", 4: "Bypass"}
IPPROTO = {"TCP": 6, "UDP": 17}

# --- ipsets (pkg/proxy/ipvs/ipset.go, ipsetInfo order) -------------------------------------------------

LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

# (name, type, comment): the comment is what the iptables rules matching the set carry
IPSETS: tuple[tuple[str, str, str], ...] = (
    (LOOP_BACK, "hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    (CLUSTER_IP, "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    (EXTERNAL_IP, "hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    (EXTERNAL_IP_LOCAL, "hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER, "hash:ip,port", "Kubernetes service lb portal"),
    (LOAD_BALANCER_FW, "hash:ip,port", "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    (
        LOAD_BALANCER_LOCAL,
        "hash:ip,port",
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    (
        LOAD_BALANCER_SOURCE_IP,
        "hash:ip,port,ip",
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    (
        LOAD_BALANCER_SOURCE_CIDR,
        "hash:ip,port,net",
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    (NODE_PORT_TCP, "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    (NODE_PORT_LOCAL_TCP, "bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    (NODE_PORT_UDP, "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    (NODE_PORT_LOCAL_UDP, "bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    (
        NODE_PORT_SCTP,
        "hash:ip,port",
        "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
    ),
    (
        NODE_PORT_LOCAL_SCTP,
        "hash:ip,port",
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    ),
    (HEALTH_CHECK_NODE_PORT, "bitmap:port", "Kubernetes health check node port"),
    (IPVS_IPS, "hash:ip", "Addresses on the ipvs interface"),
)
_SET_COMMENT = {name: comment for name, _, comment in IPSETS}

# ipsetWithIptablesChain: (set, table, from chain, target, match type, protocol); a rule is written
# only when the set is not empty. The Local NodePort sets come before their plain sets (RETURN first).
_IPSET_RULES: tuple[tuple[str, str, str, str, str, str], ...] = (
    (LOOP_BACK, "nat", "KUBE-POSTROUTING", "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", "KUBE-SERVICES", "KUBE-LOAD-BALANCER", "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", "KUBE-LOAD-BALANCER", "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", "KUBE-NODE-PORT", "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL", "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
)

# --- iptables (iptablesChains / iptablesJumpChain) ------------------------------------------------------

IPTABLES_CHAINS: tuple[tuple[str, str], ...] = (
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-POSTROUTING"),
    ("nat", "KUBE-NODE-PORT"),
    ("nat", "KUBE-LOAD-BALANCER"),
    ("nat", "KUBE-MARK-MASQ"),
    ("filter", "KUBE-FORWARD"),
    ("filter", "KUBE-NODE-PORT"),
    ("filter", "KUBE-PROXY-FIREWALL"),
    ("filter", "KUBE-SOURCE-RANGES-FIREWALL"),
    ("filter", "KUBE-IPVS-FILTER"),
    ("filter", "KUBE-IPVS-OUT-FILTER"),
)

# (table, built-in chain, target, comment), in the order kube-proxy ensures them; each is
# prepended, so a built-in chain ends up holding its jumps in reverse order.
JUMP_CHAINS: tuple[tuple[str, str, str, str], ...] = (
    ("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    ("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
)

# --- the IPVS table as data (desired, and as read back from the kernel) ----------------------------------


@dataclass(frozen=True)
class RealServer:
    """An IPVS destination. Desired ones have weight 1 and masquerade forwarding; read-back ones
    also carry the kernel's connection counters (ignored when comparing configuration)."""

    ip: IPv4Address
    port: int
    weight: int = 1
    forward: int = FWD_MASQ
    active: int = 0  # ActiveConn: connections in ESTABLISHED (TCP)
    inactive: int = 0  # InActConn: every other state (SYN_RECV, FIN_WAIT, TIME_WAIT, CLOSE, UDP)
    persistent: int = 0  # persistence templates pointing at this destination

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def forward_name(self) -> str:
        return _FWD_NAMES.get(self.forward, str(self.forward))


@dataclass(frozen=True)
class VirtualServer:
    """An IPVS service (`ipvsadm -A -t|-u ip:port -s sched [-p timeout]`) and its real servers."""

    protocol: str  # "TCP" | "UDP"
    ip: IPv4Address
    port: int
    scheduler: str
    flags: int = 0  # FLAG_PERSISTENT | FLAG_SOURCE_HASH; never FLAG_HASHED (the kernel's own)
    timeout: int = 0  # persistence, seconds (sessionAffinityConfig.clientIP.timeoutSeconds)
    real_servers: tuple[RealServer, ...] = ()
    service: str = ""  # "ns/name:port" and the kind, for display ("" when read from the kernel)

    @property
    def key(self) -> tuple[str, IPv4Address, int]:
        return (self.protocol, self.ip, self.port)

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def persistent(self) -> bool:
        return bool(self.flags & FLAG_PERSISTENT)

    def same_config(self, other: VirtualServer) -> bool:
        """kube-proxy's VirtualServer.Equal minus the key: what an update (SET_SERVICE) changes."""
        return (self.scheduler, self.flags & ~FLAG_HASHED, self.timeout) == (
            other.scheduler,
            other.flags & ~FLAG_HASHED,
            other.timeout,
        )


@dataclass(frozen=True)
class IpsetSpec:
    """One of kube-proxy's ipsets with the entries it should hold."""

    name: str
    type: str
    comment: str
    entries: tuple[str, ...] = ()

    def create(self) -> str:
        """The `ipset create` line kube-proxy's ipset.CreateSet runs (defaults: hashsize 1024, maxelem 65536)."""
        if self.type == "bitmap:port":
            return f"create {self.name} {self.type} range 0-65535"
        return f"create {self.name} {self.type} family inet hashsize 1024 maxelem 65536"


@dataclass(frozen=True)
class IpvsState:
    """Everything kube-proxy's IPVS mode puts in one node, as data."""

    addresses: tuple[IPv4Address, ...]  # on kube-ipvs0, each /32
    virtual_servers: tuple[VirtualServer, ...]  # in ipvsadm's listing order
    ipsets: tuple[IpsetSpec, ...]  # all 17, in kube-proxy's order
    iptables: str  # the `iptables-restore --noflush` payload
    jumps: tuple[tuple[str, str, tuple[str, ...]], ...]  # (table, built-in chain, argv), ensure order
    sysctls: tuple[tuple[str, int], ...]

    def ipset(self, name: str) -> IpsetSpec:
        return next(s for s in self.ipsets if s.name == name)

    def lookup(self, protocol: str, ip: IPv4Address, port: int) -> VirtualServer | None:
        return next((v for v in self.virtual_servers if v.key == (protocol, ip, port)), None)

    def ipset_restore(self) -> str:
        """`ipset restore` input that creates every set and fills it (an empty kernel's first sync)."""
        lines = [s.create() for s in self.ipsets]
        lines += [f"add {s.name} {e}" for s in self.ipsets for e in s.entries]
        return "".join(line + "\n" for line in lines)

    def text(self) -> str:
        """The whole state in the tools' own forms: the golden-file format."""
        out = [f"# {DUMMY_DEVICE}: dummy, down; ip -4 addr"]
        out += [f"{a}/32" for a in self.addresses]
        out += ["", "# ipvsadm -Ln", *ipvsadm_lines(self.virtual_servers).splitlines()]
        out += ["", "# ipset restore", *self.ipset_restore().splitlines()]
        out += ["", "# iptables-restore --noflush", *self.iptables.splitlines()]
        out += ["", "# jumps: iptables -t TABLE -I CHAIN 1 ... unless present, in this order"]
        out += [f"-t {t} {c} " + " ".join(_quote(a) for a in argv) for t, c, argv in self.jumps]
        out += ["", "# sysctls"]
        out += [f"{k} = {v}" for k, v in self.sysctls]
        return "\n".join(out) + "\n"


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg or not arg else arg


# --- ipvsadm's listing form -------------------------------------------------------------------------------


def _s32(x: int) -> int:
    """C's `int r = a - b` on 32-bit unsigned values, as ipvsadm's comparators compute it."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def _cmp_services(a: VirtualServer, b: VirtualServer) -> int:
    # libipvs ipvs_cmp_services: fwmark, af, protocol, then ntohl(addr) difference *as an int*, port.
    # The int wrap-around is real: 172.18.0.2 sorts before 10.96.0.10 (0xAC.. - 0x0A.. < 0).
    r = IPPROTO.get(a.protocol, 0) - IPPROTO.get(b.protocol, 0)
    return r or _s32(int(a.ip) - int(b.ip)) or a.port - b.port


def _cmp_dests(a: RealServer, b: RealServer) -> int:
    return _s32(int(a.ip) - int(b.ip)) or a.port - b.port


def ipvsadm_order(vss: Iterable[VirtualServer]) -> list[VirtualServer]:
    """Virtual servers in `ipvsadm -Ln` order, each with its real servers in ipvsadm's order."""
    out = []
    for v in sorted(vss, key=functools.cmp_to_key(_cmp_services)):
        rs = tuple(sorted(v.real_servers, key=functools.cmp_to_key(_cmp_dests)))
        out.append(v if rs == v.real_servers else replace(v, real_servers=rs))
    return out


def ipvsadm_header(version: str = "1.2.1", size: int = 4096) -> str:
    return f"IP Virtual Server version {version} (size={size})\n"


def _sched_flags(v: VirtualServer) -> str:
    # ipvsadm print_sched_flags: only sh and mh name their flags
    if v.scheduler not in ("sh", "mh"):
        return ""
    names = [f"{v.scheduler}-fallback" if v.flags & 0x8 else "", f"{v.scheduler}-port" if v.flags & 0x10 else ""]
    names = [n for n in names if n]
    return f" ({','.join(names)})" if names else ""


def ipvsadm_lines(vss: Iterable[VirtualServer]) -> str:
    """`ipvsadm -Ln` without its first line (the version, see `ipvsadm_header`), byte for byte:
    `%s  %s %s` service lines and `  -> %-28s %-7s %-6d %-10u %-10u` real server lines."""
    lines = [
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn",
    ]
    for v in ipvsadm_order(vss):
        line = f"{v.protocol}  {v.addr}"[:33] + f" {v.scheduler}{_sched_flags(v)}"
        if v.persistent:
            line += f" persistent {v.timeout}"
        lines.append(line)
        for r in v.real_servers:
            lines.append(f"  -> {r.addr[:28]:<28} {r.forward_name:<7} {r.weight:<6} {r.active:<10} {r.inactive:<10}")
    return "".join(line + "\n" for line in lines)


# --- rendering --------------------------------------------------------------------------------------------


def _mark(node: NodeContext) -> str:
    # NewProxier: fmt.Sprintf("%#08x", 1<<masqueradeBit) -> "0x004000"; iptables-save prints 0x4000
    return f"{1 << node.masquerade_bit:#08x}"


def _ip_key(entry: str) -> tuple[int, ...]:
    """Sort ipset entries numerically: 10.0.0.9 before 10.0.0.10, ports as numbers."""
    out: list[int] = []
    for part in entry.replace(":", ",").split(","):
        if part.isdigit():
            out.append(int(part))
        elif part.count(".") == 3:
            out.append(int(IPv4Address(part.split("/")[0])))
        else:
            out.append(IPPROTO.get(part.upper(), 0))
    return tuple(out)


def _policy_endpoints(node: NodeContext, svc: ServicePort, only_local: bool) -> list[Endpoint]:
    """syncEndpoint: CategorizeEndpoints (all endpoints are ready in netlab's model), then Local with
    kube-proxy IPVS's fallback to the cluster endpoints when the node has none (PR #97081)."""
    externally_accessible = svc.node_port is not None
    uses_cluster = not svc.internal_local or externally_accessible  # UsesClusterEndpoints
    endpoints = svc.sorted_endpoints()
    cluster = endpoints if uses_cluster else []
    if not only_local:
        return cluster
    local = [e for e in endpoints if e.node == node.name]
    return local or cluster


def _virtual_server(
    node: NodeContext, svc: ServicePort, ip: IPv4Address, port: int, only_local: bool, kind: str
) -> VirtualServer:
    """syncService + syncEndpoint for one (address, port) of a service port."""
    scheduler = str(svc.ipvs_scheduler or node.ipvs_scheduler)
    flags = FLAG_PERSISTENT if svc.affinity_timeout is not None else 0
    if scheduler == "mh":
        flags |= FLAG_SOURCE_HASH  # the source-hash flag mh needs (kube-proxy's FlagSourceHash)
    rs = tuple(RealServer(e.ip, e.port) for e in _policy_endpoints(node, svc, only_local))
    timeout = svc.affinity_timeout or 0
    return VirtualServer(str(svc.protocol), ip, port, scheduler, flags, timeout, rs, f"{svc.spn} {kind}")


def render_ipvs(
    node: NodeContext,
    services: Sequence[ServicePort],
    *,
    nodeport_addresses: Sequence[IPv4Address] | None = None,
    strict_arp: bool = True,
) -> IpvsState:
    """The state kube-proxy's IPVS proxier keeps `node` in for `services`.

    nodeport_addresses: the addresses NodePort virtual servers are created on. kube-proxy (with
      --nodeport-addresses unset) takes every local address of the node except kube-ipvs0's and
      loopback, read from the kernel on each sync; None = `node.node_ips`.
    strict_arp: kube-proxy's --ipvs-strict-arp (sets arp_ignore=1, arp_announce=2).
    """
    candidates = node.node_ips if nodeport_addresses is None else nodeport_addresses
    nodeport_ips = sorted({ip for ip in candidates if not ip.is_loopback})
    sets: dict[str, set[str]] = {name: set() for name, _, _ in IPSETS}
    vss: dict[tuple[str, IPv4Address, int], VirtualServer] = {}
    bound: set[IPv4Address] = set()

    def add_vs(v: VirtualServer) -> None:
        if v.key in vss:
            raise ValueError(f"{v.protocol} {v.addr} is claimed by {vss[v.key].service} and {v.service}")
        vss[v.key] = v

    for svc in sorted(services, key=lambda s: (s.namespace, s.name, s.port_name, s.proto)):
        proto = svc.proto
        # hairpin: a local endpoint reaching its own service is masqueraded in POSTROUTING
        for e in svc.endpoints:
            if e.node == node.name:
                sets[LOOP_BACK].add(f"{e.ip},{proto}:{e.port},{e.ip}")
        sets[CLUSTER_IP].add(f"{svc.cluster_ip},{proto}:{svc.port}")
        add_vs(_virtual_server(node, svc, svc.cluster_ip, svc.port, svc.internal_local, "cluster IP"))
        bound.add(svc.cluster_ip)
        if svc.node_port is not None and nodeport_ips:
            sets[NODE_PORT_TCP if proto == "tcp" else NODE_PORT_UDP].add(str(svc.node_port))
            if svc.external_local:
                sets[NODE_PORT_LOCAL_TCP if proto == "tcp" else NODE_PORT_LOCAL_UDP].add(str(svc.node_port))
            for ip in nodeport_ips:
                add_vs(_virtual_server(node, svc, ip, svc.node_port, svc.external_local, "node port"))
    sets[IPVS_IPS] = {str(a) for a in bound}

    ipsets = tuple(
        IpsetSpec(name, typ, comment, tuple(sorted(sets[name], key=_ip_key))) for name, typ, comment in IPSETS
    )
    sysctls = [
        ("net.ipv4.vs.conntrack", 1),
        ("net.ipv4.vs.expire_nodest_conn", 1),
        ("net.ipv4.vs.expire_quiescent_template", 1),
        ("net.ipv4.ip_forward", 1),
    ]
    if strict_arp:
        sysctls += [("net.ipv4.conf.all.arp_ignore", 1), ("net.ipv4.conf.all.arp_announce", 2)]
    jumps = tuple(
        (t, c, ("-m", "comment", "--comment", comment, "-j", target)) for t, c, target, comment in JUMP_CHAINS
    )
    return IpvsState(
        addresses=tuple(sorted(bound)),
        virtual_servers=tuple(ipvsadm_order(vss.values())),
        ipsets=ipsets,
        iptables=_iptables(node, frozenset(s.name for s in ipsets if s.entries)),
        jumps=jumps,
        sysctls=tuple(sysctls),
    )


@dataclass(frozen=True)
class IpvsDelta:
    """What a partial sync changes: `render_ipvs(node, new)` against `render_ipvs(node, old)` on a
    node whose settings did not change, computed from the changed services only.

    before / after: the virtual servers of the changed services (and of every port sharing a
      ClusterIP or NodePort with one) as they were and as they are to be, in ipvsadm order;
      a key only in `before` is deleted, only in `after` added, in both compared.
    ipset_add / ipset_del: (set, entry); addresses_add / addresses_del: kube-ipvs0's /32s.
    iptables: the fixed rules' restore payload when a set became empty or non-empty (the
      rules are written only for non-empty sets), else None: the rules stay as they are.
    """

    before: tuple[VirtualServer, ...]
    after: tuple[VirtualServer, ...]
    ipset_add: tuple[tuple[str, str], ...]
    ipset_del: tuple[tuple[str, str], ...]
    addresses_add: tuple[IPv4Address, ...]
    addresses_del: tuple[IPv4Address, ...]
    iptables: str | None

    def __bool__(self) -> bool:
        return bool(
            self.before != self.after
            or self.ipset_add
            or self.ipset_del
            or self.addresses_add
            or self.addresses_del
            or self.iptables is not None
        )

    def ipset_lines(self) -> list[str]:
        """`ipset restore` lines: the deletions, then the additions."""
        return [f"del {n} {e}" for n, e in self.ipset_del] + [f"add {n} {e}" for n, e in self.ipset_add]


def _nonempty_sets(
    node: NodeContext, services: Sequence[ServicePort], nodeport_ips: Sequence[IPv4Address]
) -> frozenset[str]:
    """The sets `render_ipvs` fills for `services` (each test stops at the first service that
    puts an entry in the set, so this is cheap whenever the set is in use)."""
    out = set()
    if services:
        out |= {CLUSTER_IP, IPVS_IPS}
    if any(e.node == node.name for s in services for e in s.endpoints):
        out.add(LOOP_BACK)
    if nodeport_ips:
        for proto, plain, local in (
            ("tcp", NODE_PORT_TCP, NODE_PORT_LOCAL_TCP),
            ("udp", NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
        ):
            if any(s.node_port is not None and s.proto == proto for s in services):
                out.add(plain)
            if any(s.node_port is not None and s.proto == proto and s.external_local for s in services):
                out.add(local)
    return frozenset(out)


def _loop_back_entry_users(node: NodeContext, services: Iterable[ServicePort], entries: set[str]) -> set[str]:
    """The KUBE-LOOP-BACK entries among `entries` that one of `services` puts in the set."""
    out: set[str] = set()
    for s in services:
        for e in s.endpoints:
            if e.node == node.name:
                entry = f"{e.ip},{s.proto}:{e.port},{e.ip}"
                if entry in entries:
                    out.add(entry)
                    if len(out) == len(entries):
                        return out
    return out


def changed_subset(
    old: Sequence[ServicePort], new: Sequence[ServicePort]
) -> tuple[list[ServicePort], list[ServicePort]]:
    """nftables' `changed_subset` (the changed service ports plus every port sharing a ClusterIP
    or NodePort with one), with kernel/proxy.py's shortcut: when no port was added or removed
    the planner keeps their order, so a pairwise comparison finds the changed ones."""
    if len(old) != len(new):
        from netlab.render.nftables import changed_subset

        return changed_subset(old, new)
    pairs = [(a, b) for a, b in zip(old, new, strict=True) if a is not b and a != b]
    if not all((a.namespace, a.name, a.port_name) == (b.namespace, b.name, b.port_name) for a, b in pairs):
        from netlab.render.nftables import changed_subset

        return changed_subset(old, new)
    ips = {s.cluster_ip for p in pairs for s in p}
    node_ports = {(s.protocol, s.node_port) for p in pairs for s in p if s.node_port}
    if not ips:
        return [], []
    return (
        [s for s in old if s.cluster_ip in ips or (s.node_port and (s.protocol, s.node_port) in node_ports)],
        [s for s in new if s.cluster_ip in ips or (s.node_port and (s.protocol, s.node_port) in node_ports)],
    )


def render_ipvs_delta(
    node: NodeContext,
    old: Sequence[ServicePort],
    new: Sequence[ServicePort],
    *,
    nodeport_addresses: Sequence[IPv4Address] | None = None,
    subset: tuple[Sequence[ServicePort], Sequence[ServicePort]] | None = None,
) -> IpvsDelta:
    """The change from `render_ipvs(node, old)` to `render_ipvs(node, new)` (same node settings,
    same `nodeport_addresses`), looking at the changed services only: O(changed), not
    O(all services), except for a few scans that stop early (see `IpvsDelta`).

    Rendering the changed services alone gives their virtual servers, and for the sets and
    addresses keyed by ClusterIP or NodePort the exact entries, since `changed_subset` brings in
    every port sharing one. KUBE-LOOP-BACK's entries are keyed by endpoint and shared by every
    service of that endpoint: an entry the subset drops or adds is left alone while a service
    outside the subset still uses it. `subset`: `changed_subset(old, new)` when the caller has
    it already (it compares every service pair: the one O(all services) step).
    """
    old_part, new_part = changed_subset(old, new) if subset is None else subset
    a = render_ipvs(node, old_part, nodeport_addresses=nodeport_addresses, strict_arp=False)
    b = render_ipvs(node, new_part, nodeport_addresses=nodeport_addresses, strict_arp=False)
    add: list[tuple[str, str]] = []
    dele: list[tuple[str, str]] = []
    for sa, sb in zip(a.ipsets, b.ipsets, strict=True):
        have, want = set(sa.entries), set(sb.entries)
        gone = have - want
        came = want - have
        if sa.name == LOOP_BACK and (gone or came):
            touched = {id(s) for s in new_part}
            kept = _loop_back_entry_users(node, (s for s in new if id(s) not in touched), gone | came)
            gone -= kept
            came -= kept
        dele += [(sa.name, e) for e in sa.entries if e in gone]
        add += [(sb.name, e) for e in sb.entries if e in came]
    candidates = node.node_ips if nodeport_addresses is None else nodeport_addresses
    nodeport_ips = [ip for ip in candidates if not ip.is_loopback]
    was, now = _nonempty_sets(node, old, nodeport_ips), _nonempty_sets(node, new, nodeport_ips)
    return IpvsDelta(
        before=a.virtual_servers,
        after=b.virtual_servers,
        ipset_add=tuple(add),
        ipset_del=tuple(dele),
        addresses_add=tuple(ip for ip in b.addresses if ip not in set(a.addresses)),
        addresses_del=tuple(ip for ip in a.addresses if ip not in set(b.addresses)),
        iptables=None if was == now else _iptables(node, now),
    )


def _iptables(node: NodeContext, nonempty: frozenset[str]) -> str:
    """writeIptablesRules + createAndLinkKubeChain: the fixed rules, in kube-proxy's write order.
    They depend on the services only through which sets hold entries (`nonempty`)."""
    mark = _mark(node)
    nat: list[str] = []
    flt: list[str] = []

    def comment(name: str) -> str:
        return f'"{_SET_COMMENT[name]}"'

    # Dismiss connections to localhost early in the service chain.
    nat.append("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN")
    for name, table, src, target, match, proto in _IPSET_RULES:
        if name not in nonempty:
            continue
        p = f" -p {proto}" if proto else ""
        rule = f"-A {src}{p} -m comment --comment {comment(name)} -m set --match-set {name} {match} -j {target}"
        (flt if table == "filter" else nat).append(rule)
    if CLUSTER_IP in nonempty:
        # Masquerade off-cluster traffic to a ClusterIP (detect-local by the cluster CIDR): the
        # endpoint may be on another node, and its reply must come back through this one.
        nat.append(
            f"-A KUBE-SERVICES -m comment --comment {comment(CLUSTER_IP)} -m set --match-set {CLUSTER_IP} dst,dst"
            f" ! -s {node.cluster_cidr} -j KUBE-MARK-MASQ"
        )
    nat.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    nat.append("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
    flt.append("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    # Accept traffic to a virtual service in case later rules would drop it (must stay last).
    if CLUSTER_IP in nonempty:
        nat.append(f"-A KUBE-SERVICES -m set --match-set {CLUSTER_IP} dst,dst -j ACCEPT")
    if LOAD_BALANCER in nonempty:
        nat.append(f"-A KUBE-SERVICES -m set --match-set {LOAD_BALANCER} dst,dst -j ACCEPT")
    # Forward marked traffic (NodePorts) even under a DROP policy, and the rest of its flow.
    # IPVS mode has no INVALID drop here (iptables mode has).
    flt.append(
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT'
    )
    flt.append(
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack'
        " --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    flt.append(
        f"-A KUBE-NODE-PORT -m comment --comment {comment(HEALTH_CHECK_NODE_PORT)} -m set --match-set"
        f" {HEALTH_CHECK_NODE_PORT} dst -j ACCEPT"
    )
    # Only service ports may be reached on kube-ipvs0's addresses (issue #72236): a new
    # connection to any other port of a ClusterIP is rejected.
    for name, match in (
        (LOAD_BALANCER, "dst,dst"),
        (CLUSTER_IP, "dst,dst"),
        (EXTERNAL_IP, "dst,dst"),
        (EXTERNAL_IP_LOCAL, "dst,dst"),
        (HEALTH_CHECK_NODE_PORT, "dst"),
    ):
        flt.append(f"-A KUBE-IPVS-FILTER -m set --match-set {name} {match} -j RETURN")
    flt.append(f"-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set {IPVS_IPS} dst -j REJECT")
    nat.append(f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN")
    # Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
    nat.append(f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}")
    masq = '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
    nat.append(masq + (" --random-fully" if node.random_fully else ""))
    nat.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")

    out = ["*nat", *(f":{c} - [0:0]" for t, c in IPTABLES_CHAINS if t == "nat"), *nat, "COMMIT"]
    out += ["*filter", *(f":{c} - [0:0]" for t, c in IPTABLES_CHAINS if t == "filter"), *flt, "COMMIT"]
    return "\n".join(out) + "\n"


# --- an offline model of the datapath ------------------------------------------------------------------


@dataclass(frozen=True)
class IpvsTrace:
    """What the first packet of a connection meets.

    verdict: "IPVS" (a virtual server chose among `endpoints`), "NO-DESTINATION" (a virtual
      server without real servers), "REJECT" (KUBE-IPVS-FILTER: a kube-ipvs0 address on a port
      no service uses), "NOT-A-SERVICE" (routed on as ordinary traffic).
    masquerade: KUBE-MARK-MASQ set the mark (off-cluster source to a ClusterIP, NodePort traffic
      unless Local); hairpin: the endpoints for which KUBE-LOOP-BACK masquerades (the client
      reaching itself).
    """

    verdict: str
    endpoints: tuple[str, ...] = ()
    masquerade: bool = False
    hairpin: tuple[str, ...] = ()
    persistent: bool = False


def trace_ipvs(
    state: IpvsState,
    node: NodeContext,
    *,
    src: IPv4Address,
    dst: IPv4Address,
    port: int,
    protocol: str = "TCP",
    local_addresses: Iterable[IPv4Address] = (),
) -> IpvsTrace:
    """Follow a new connection's first packet through nat KUBE-SERVICES, IPVS and POSTROUTING.

    `local_addresses` are the node's other local addresses (cni0, flannel.1), for addrtype LOCAL;
    node.node_ips, kube-ipvs0's addresses and 127.0.0.0/8 are always local.
    """
    proto = protocol.lower()
    sets = {s.name: set(s.entries) for s in state.ipsets}
    local = {*node.node_ips, *state.addresses, *local_addresses}
    is_local = dst in local or dst in IPv4Network("127.0.0.0/8")
    masq = False
    if src not in IPv4Network("127.0.0.0/8"):  # -s 127.0.0.0/8 -j RETURN
        if f"{dst},{proto}:{port}" in sets[CLUSTER_IP] and src not in node.cluster_cidr:
            masq = True
        if is_local:  # KUBE-NODE-PORT
            local_set = NODE_PORT_LOCAL_TCP if proto == "tcp" else NODE_PORT_LOCAL_UDP
            plain_set = NODE_PORT_TCP if proto == "tcp" else NODE_PORT_UDP
            if str(port) not in sets[local_set] and str(port) in sets[plain_set]:
                masq = True
    vs = state.lookup(protocol.upper(), dst, port) if is_local else None
    if vs is None:
        if dst in state.addresses and f"{dst},{proto}:{port}" not in sets[CLUSTER_IP]:
            return IpvsTrace("REJECT", masquerade=masq)
        return IpvsTrace("NOT-A-SERVICE", masquerade=masq)
    eps = tuple(r.addr for r in vs.real_servers if r.weight > 0)
    if not eps:
        return IpvsTrace("NO-DESTINATION", masquerade=masq, persistent=vs.persistent)
    hairpin = tuple(
        r.addr for r in vs.real_servers if r.weight > 0 and f"{r.ip},{proto}:{r.port},{src}" in sets[LOOP_BACK]
    )
    return IpvsTrace("IPVS", eps, masq, hairpin, vs.persistent)
