"""Turn plan steps into netlink requests, inside the right namespace, with undo records.

Each create_* function registers how to undo what it made *before* making the next object,
so a failure, Ctrl-C or SIGTERM mid-step leaves nothing half-built that the rollback cannot
find. The ownership mark's fingerprint is written last: a namespace whose mark still says
"-" was interrupted, and the next `up` replaces it.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netlab.errors import FeatureError, KernelError
from netlab.kernel import netns, rtnl
from netlab.kernel.observe import processes_by_netns
from netlab.kernel.rules_state import STATE_DIR
from netlab.plan import naming
from netlab.plan.model import ExternalPlan, NodePlan, Peer, PodPlan
from netlab.topology.schema import Overlay

__all__ = [
    "STATE_DIR",
    "Undo",
    "add_peer",
    "create_node",
    "create_pods",
    "create_underlay",
    "delete_netns",
    "delete_peer",
    "start_responders",
    "stop_processes",
]

Undo = list[Callable[[], None]]
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x4
# flannel's netlink library (vishvananda/netlink) adds routes with RTPROT_BOOT, as `ip route add`
# does: `ip route` then prints them without a "proto" field, as on a real node.
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
UNDO_ON_ERROR = (NetlinkError, OSError)


@contextmanager
def _netlink(ns: str, what: str) -> Iterator[IPRoute]:
    """IPRoute opened inside `ns`; NetlinkError/OSError become KernelError naming the op."""
    try:
        with netns.inside(ns), IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise KernelError(what, ns, exc.code) from exc
    except FileNotFoundError as exc:
        raise KernelError(what, ns, errno.ENOENT, "the namespace is gone") from exc


def journal(lab: str, *lines: str) -> None:
    """Append to the lab's journal before creating something (read by `down` after a crash)."""
    d = STATE_DIR / lab
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "journal", "a") as f:
        f.writelines(line + "\n" for line in lines)


def _lookup(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise NetlinkError(errno.ENODEV, f"no link {ifname}")
    return int(idx[0])


def _new_netns(lab: str, name: str, mark: str, sysctls: dict[str, int], undo: Undo) -> None:
    journal(lab, f"netns {name}")
    try:
        # the namespace gets its name when create() exits: no Ctrl-C between that and the undo
        with netns.signals_deferred():
            with netns.create(name):
                for key, value in sysctls.items():
                    if not netns.write_sysctl(key, value) and key.startswith("net.bridge"):
                        raise FeatureError(
                            f"the kernel has no {key} (br_netfilter is not loaded); run `modprobe "
                            "br_netfilter` on the host, or use a kernel that has it"
                        )
                with IPRoute() as ipr:
                    ipr.link("set", index=1, state="up", ifalias=mark)
            undo.append(functools.partial(delete_netns, [name]))
    except FileExistsError as exc:
        raise KernelError("create netns", name, errno.EEXIST, "left over? run `netlab down`") from exc
    except NetlinkError as exc:
        raise KernelError("configure netns", name, exc.code) from exc


def _finish_mark(ns: str, mark: str) -> None:
    with _netlink(ns, "write ownership mark") as ipr:
        ipr.link("set", index=1, ifalias=mark)


_NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}


def create_underlay(lab: str, ns: str, undo: Undo) -> None:
    # IPv6 off everywhere in the lab: DAD/MLD/RS multicast flooded to every bridge port makes
    # each new pod slower than the last (measured: 7.9 -> 36 ms per pod at 1000 pods).
    _new_netns(lab, ns, naming.netns_mark(lab, "underlay", "br0", "-"), _NO_IPV6, undo)
    with _netlink(ns, f"create bridge {naming.UNDERLAY_BRIDGE}") as ipr:
        ipr.link("add", ifname=naming.UNDERLAY_BRIDGE, kind="bridge", state="up")
        ipr.link("set", index=_lookup(ipr, naming.UNDERLAY_BRIDGE), ifalias=naming.link_alias(lab))
    _finish_mark(ns, naming.netns_mark(lab, "underlay", "br0", "ok"))


def create_node(lab: str, underlay_ns: str, n: NodePlan, undo: Undo) -> None:
    alias = naming.link_alias(lab)
    _new_netns(
        lab,
        n.netns,
        naming.netns_mark(lab, "node", n.name, "-"),
        {
            **_NO_IPV6,
            "net.ipv4.ip_forward": 1,
            # Bridged pod-to-pod frames must traverse iptables, or same-node Service replies
            # skip their reverse DNAT (kube-proxy.md 5.4). Per netns since Linux 5.3.
            "net.bridge.bridge-nf-call-iptables": 1,
        },
        undo,
    )
    _uplink(lab, underlay_ns, n.underlay_port, n.underlay_port_mac, n.netns, n.mac, n.ip, n.mtu)
    with _netlink(n.netns, f"configure node {n.name}") as ipr:
        eth0 = _lookup(ipr, naming.NODE_UPLINK)
        # A real node has a default route (to its LAN's router). Without one, a packet to a
        # ClusterIP that no rule DNATs (a Service without endpoints) fails the routing lookup
        # with "network unreachable" before kube-proxy's REJECT in FORWARD could answer it.
        ipr.route("add", dst="0.0.0.0/0", gateway=str(n.router), oif=eth0, proto=RTPROT_BOOT)
        # bridge CNI: cni0 holds the gateway (.1) of the node's pod subnet; its MAC is pinned
        # so it does not change as ports come and go.
        ipr.link("add", ifname=naming.CNI_BRIDGE, kind="bridge", address=n.cni_mac, mtu=n.pod_mtu, state="up")
        cni = _lookup(ipr, naming.CNI_BRIDGE)
        ipr.link("set", index=cni, ifalias=alias)
        ipr.addr("add", index=cni, address=str(n.gateway.ip), prefixlen=n.gateway.network.prefixlen)
        if n.overlay == Overlay.VXLAN:
            dev = naming.vxlan_device(n.vni)
            # flannel's device: VNI 1, UDP 8472 (the kernel's default, not IANA's 4789),
            # no learning (FDB and ARP are programmed per remote node), MTU = link MTU - 50.
            ipr.link(
                "add",
                ifname=dev,
                kind="vxlan",
                vxlan_id=n.vni,
                vxlan_port=n.vxlan_port,
                vxlan_local=str(n.ip.ip),
                vxlan_link=eth0,
                vxlan_learning=0,
                address=n.vtep_mac,
                mtu=n.pod_mtu,
                state="up",
            )
            vx = _lookup(ipr, dev)
            ipr.link("set", index=vx, ifalias=alias)
            ipr.addr("add", index=vx, address=str(n.vtep_ip), prefixlen=32)
    _finish_mark(n.netns, naming.netns_mark(lab, "node", n.name, n.fingerprint))


def _uplink(
    lab: str, underlay_ns: str, port: str, port_mac: str, ns: str, mac: str, ip: IPv4Interface, mtu: int
) -> None:
    """A host's link to the underlay: a veth created in the underlay (the port on br0, named
    after the host) with its peer placed straight into the host's netns as `eth0` under its
    final name (no temporary names in a shared namespace), then eth0 up with its address."""
    alias = naming.link_alias(lab)
    with _netlink(underlay_ns, f"create veth {port} <-> {ns}/eth0") as ipr:
        ipr.link(
            "add",
            ifname=port,
            kind="veth",
            address=port_mac,
            mtu=mtu,
            master=_lookup(ipr, naming.UNDERLAY_BRIDGE),
            state="up",
            peer={"ifname": naming.NODE_UPLINK, "net_ns_fd": ns, "address": mac, "mtu": mtu},
        )
        ipr.link("set", index=_lookup(ipr, port), ifalias=alias)
    with _netlink(ns, "configure eth0") as ipr:
        eth0 = _lookup(ipr, naming.NODE_UPLINK)
        ipr.link("set", index=eth0, state="up", ifalias=alias)
        ipr.addr("add", index=eth0, address=str(ip.ip), prefixlen=ip.network.prefixlen)


def create_external(lab: str, underlay_ns: str, e: ExternalPlan, undo: Undo) -> None:
    """A client outside every node: one veth on the underlay, like a laptop on the node LAN."""
    _new_netns(lab, e.netns, naming.netns_mark(lab, "external", "client", "-"), _NO_IPV6, undo)
    _uplink(lab, underlay_ns, e.underlay_port, e.underlay_port_mac, e.netns, e.mac, e.ip, e.mtu)
    _finish_mark(e.netns, naming.netns_mark(lab, "external", "client", e.fingerprint))


def _peer_requests(ipr: IPRoute, vni: int, peer: Peer, command: str) -> None:
    if peer.vtep_mac is not None:
        vx = _lookup(ipr, naming.vxlan_device(vni))
        gw = str(peer.subnet.network_address)
        ops: list[Callable[[], object]] = [
            lambda: ipr.neigh(command, ifindex=vx, dst=gw, lladdr=peer.vtep_mac, state=NUD_PERMANENT),
            # AF_BRIDGE entry on the VXLAN device: frames for this MAC go to the remote node IP.
            lambda: ipr.fdb(command, ifindex=vx, lladdr=peer.vtep_mac, dst=str(peer.node_ip)),
            lambda: ipr.route(
                command, dst=str(peer.subnet), gateway=gw, oif=vx, flags=RTNH_F_ONLINK, proto=RTPROT_BOOT
            ),
        ]
    else:
        eth0 = _lookup(ipr, naming.NODE_UPLINK)
        ops = [lambda: ipr.route(command, dst=str(peer.subnet), gateway=str(peer.node_ip), oif=eth0, proto=RTPROT_BOOT)]
    if command == "del":
        ops.reverse()
    for op in ops:
        try:
            op()
        except NetlinkError as exc:
            # deleting something already gone is success (a partial peer, a crashed run)
            if command == "del" and exc.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                continue
            raise


def add_peer(node: NodePlan, peer: Peer, undo: Undo) -> None:
    undo.append(lambda: delete_peer(node.netns, node.vni, peer))
    with _netlink(node.netns, f"add route to {peer.subnet}") as ipr:
        _peer_requests(ipr, node.vni, peer, "add")


def delete_peer(ns: str, vni: int, peer: Peer) -> None:
    if not netns.exists(ns):
        return
    with _netlink(ns, f"delete route to {peer.subnet}") as ipr:
        _peer_requests(ipr, vni, peer, "del")


# A new netns holds only lo (1), so the pod's eth0 is created as ifindex 2 -- unless a tunnel
# module (ipip, sit, gre, ...) is loaded on the host: each new netns then also gets its fallback
# device (tunl0, sit0, ...), which takes 2. The first free index is asked of the first new
# netns of a batch (`_free_index`); the host's modules give every new netns the same devices.
POD_ETH0_INDEX = 2


def _free_index(nl: rtnl.Batch, start: int = POD_ETH0_INDEX) -> int:
    """The lowest ifindex from `start` that nothing in nl's namespace uses (one RTM_GETLINK each)."""
    index = start
    while nl.get_link(index=index) is not None:
        index += 1
    return index


def create_pods(lab: str, node: NodePlan, pods: list[PodPlan], undo: Undo) -> None:
    """Build the pods of one node together, in four batched phases.

    1. one unnamed netns per pod (IPv6 off), with a netlink socket opened inside it;
    2. in the node: every veth pair at once, the pod end created straight into its netns as
       `eth0` (ifindex 2, or the first free one), the host end `veth<8 hex>` up on cni0, then alias + hairpin;
    3. in each pod: lo up with the final ownership mark, eth0 up, address, default route;
    4. publish each netns under its name (journal first).
    Until step 4 the namespaces are held only by open fds: if anything fails, or the process
    dies, the kernel frees them, and deleting a pod's eth0 deletes its host veth too. A pod's
    namespace therefore only ever appears complete, already carrying its fingerprint.
    """
    alias = naming.link_alias(lab)
    staged: list[tuple[PodPlan, int, rtnl.Batch]] = []
    eth0 = POD_ETH0_INDEX  # every new netns gets the same fallback devices: asked of the first
    try:
        for p in pods:
            with netns.anonymous() as fd:
                for key, value in _NO_IPV6.items():
                    netns.write_sysctl(key, value)
                staged.append((p, fd, rtnl.Batch(p.netns)))
        if staged:
            eth0 = _free_index(staged[0][2])
        with netns.inside(node.netns):
            host = rtnl.Batch(node.netns)
        with host:
            cni = host.get_link(name=naming.CNI_BRIDGE)
            if cni is None:
                raise KernelError(
                    "find cni0", node.netns, errno.ENODEV, "the node is incomplete; run `netlab up` again"
                )
            for p, fd, _ in staged:
                # bridge CNI: host end `veth<8 hex>` on cni0, container end `eth0`
                host.veth_add(
                    p.host_veth,
                    mac=p.host_mac,
                    mtu=p.mtu,
                    master=cni["index"],
                    peer_name=naming.POD_IFNAME,
                    peer_index=eth0,
                    peer_mac=p.mac,
                    peer_netns_fd=fd,
                )
                # hairpin: a pod reaching itself through a Service gets its packet back out the
                # port it came in on, which a bridge only does with hairpin_mode=1.
                host.bridge_port_set(p.host_veth, alias=alias, hairpin=True)
            host.commit()
        for p, _, nl in staged:
            mark = naming.netns_mark(lab, "pod", f"{p.key}@{p.node}", p.fingerprint)
            nl.link_set(1, up=True, alias=mark)
            nl.link_set(eth0, up=True, alias=alias)
            nl.addr_add(eth0, p.ip.ip, p.ip.network.prefixlen)
            nl.route_add("0.0.0.0", 0, gateway=p.gateway, oif=eth0)
            nl.commit()
        journal(lab, *(f"netns {p.netns}" for p, _, _ in staged))
        for p, fd, _ in staged:
            with netns.signals_deferred():
                try:
                    netns.publish(fd, p.netns)
                except FileExistsError as exc:
                    raise KernelError("name netns", p.netns, errno.EEXIST, "left over? run `netlab down`") from exc
                undo.append(functools.partial(delete_netns, [p.netns]))
    finally:
        for _, fd, nl in staged:
            nl.close()
            os.close(fd)


# --- processes in the lab ------------------------------------------------------------------


def start_responders(lab: str, pods: list[PodPlan], undo: Undo, timeout: float = 60.0) -> None:
    """Start one responder process per pod (all at once), wait until each has bound its ports.

    Each is a Python process: under an emulated CPU (the VM tier, no KVM) seven of them starting
    together took over 10 s, hence the generous deadline (they are usually ready in ~0.2 s)."""
    logdir = STATE_DIR / lab / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    started: list[tuple[PodPlan, subprocess.Popen[bytes]]] = []
    for p in pods:
        cmd = [sys.executable, "-m", "netlab.responder", "--netns", p.netns, "--name", p.name]
        for s in p.serve:
            cmd += ["--listen", f"{s.port}/{s.protocol.lower()}"]
        with netns.signals_deferred(), open(logdir / f"{p.namespace}_{p.name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # not in our process group: Ctrl-C of `up` must not kill it
                close_fds=True,
            )
            undo.append(functools.partial(_kill, [proc.pid]))
        journal(lab, f"responder {p.netns} {proc.pid}")
        started.append((p, proc))
    deadline = time.monotonic() + timeout
    for p, proc in started:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            proc.poll()
            lines = (logdir / f"{p.namespace}_{p.name}.log").read_text(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else "no output"
            raise KernelError(f"start responder for pod {p.key}", p.netns, None, reason)


def _kill(pids: list[int], grace: float = 1.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        # reap our own children, or they stay zombies and look alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def stop_processes(names: list[str]) -> list[int]:
    """Stop every process whose network namespace is one of `names` (a pod's processes die
    with the pod, as on a real node). Returns the pids stopped."""
    inodes = {ino for ino in (netns.inode(n) for n in names) if ino}
    if not inodes:
        return []
    me = os.getpid()
    pids = [p for ino, ps in processes_by_netns().items() if ino in inodes for p in ps if p != me]
    _kill(pids)
    return pids


def delete_netns(names: list[str]) -> None:
    """Delete namespaces out of a lab that stays up (a replaced or removed pod or node).

    The kernel frees a namespace, and the veth peers it takes along, asynchronously (up to a
    second later). The peers live in namespaces that stay (a pod's host veth in its node, a
    node's port in the underlay) and a replacement reuses their names, so delete the veths
    here first: deleting one end of a veth deletes both, synchronously.
    """
    stop_processes(names)
    for name in names:
        if netns.inode(name) is not None:
            with _netlink(name, "delete veths") as ipr:
                for link in ipr.get_links():
                    if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth":
                        try:
                            ipr.link("del", index=link["index"])
                        except NetlinkError as exc:
                            if exc.code != errno.ENODEV:  # gone with its peer already
                                raise
        netns.delete(name)
