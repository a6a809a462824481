"""IPVS mode against a real kernel: `sync_ipvs` / `cleanup_ipvs` in a hand-built node namespace,
checked with the tools a user would use (`ipvsadm -Ln`, `ipset save`, `iptables-save`, `ip`).

VM tier only (tests/vm/conftest.py skips it where the kernel has no IPVS): run it with
`sudo .venv/bin/netlab vm -- pytest tests/vm/test_ipvs_kernel.py`, or straight through vng:

    vng -r /boot/vmlinuz-6.1.0-56-amd64 --user root --memory 2G --cpus 2 --disable-kvm -- \\
        'modprobe ip_vs; modprobe dummy; modprobe br_netfilter; .venv/bin/pytest -v tests/vm/test_ipvs_kernel.py'

The node (`nl-ipvst-<pid>-node`) is what netlab builds, minus the overlay: eth0 172.18.0.2/24 on a
veth to an "outside" namespace, cni0 10.244.0.1/24 with three pods: c1 10.244.0.2 (a client),
b1 10.244.0.5 and b2 10.244.0.6 (backends; TCP 8080 and UDP 5353 answered by threads of this
process, opened inside the pods, that keep a TCP connection open until the client closes it).
Everything lives in namespaces this module creates and deletes; nothing touches the root one.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from netlab import inspect
from netlab.kernel import ipset, netns, proxy_ipvs
from netlab.kernel import ipvs as kipvs
from netlab.plan.model import RulesPlan
from netlab.render.ipvs import (
    IPSETS,
    IpvsState,
    VirtualServer,
    ipvsadm_header,
    ipvsadm_lines,
    render_ipvs,
    trace_ipvs,
)
from netlab.render.model import Endpoint, NodeContext, ServicePort
from netlab.topology.schema import IpvsScheduler, Protocol, ProxyMode

PID = os.getpid()
NODE = f"nl-ipvst-{PID}-node"
OUTSIDE = f"nl-ipvst-{PID}-out"
PODS = {"c1": "10.244.0.2", "b1": "10.244.0.5", "b2": "10.244.0.6"}
NODE_IP = IPv4Address("172.18.0.2")
GATEWAY = IPv4Address("10.244.0.1")
CTX = NodeContext("node1", (NODE_IP,), IPv4Network("10.244.0.0/16"), (IPv4Network("10.96.0.0/12"),))


def pod_ns(name: str) -> str:
    return f"nl-ipvst-{PID}-{name}"


def ep(pod: str, port: int = 8080, node: str = "node1") -> Endpoint:
    return Endpoint(IPv4Address(PODS[pod]), port, node, f"default/{pod}")


def svc(name: str, vip: str, port: int, *eps: Endpoint, proto: Protocol = Protocol.TCP, **kw: object) -> ServicePort:
    return ServicePort("default", name, "", proto, IPv4Address(vip), port, endpoints=eps, **kw)  # type: ignore[arg-type]


WEB = svc("web", "10.96.0.100", 80, ep("b1"), ep("b2"), node_port=30080)
DNS = svc("dns", "10.96.0.10", 53, ep("b1", 5353), ep("b2", 5353), proto=Protocol.UDP)
STICKY = svc("sticky", "10.96.0.30", 80, ep("b1"), ep("b2"), affinity_timeout=10800)
EMPTY = svc("empty", "10.96.0.40", 80)
SERVICES = (WEB, DNS, STICKY, EMPTY)


def plan(*services: ServicePort, ctx: NodeContext = CTX) -> RulesPlan:
    return RulesPlan(ProxyMode.IPVS, "auto", ctx, services)


def sh(ns: str, *argv: str, check: bool = True) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in {ns}: {r.stderr}")
    return r.stdout


def batch(commands: list[str], ns: str | None = None) -> None:
    """One `ip -batch` (iproute2 takes no per-line -n: one batch per namespace)."""
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    r = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr}"


# --- backends: threads of this process serving inside the pods --------------------------------------------


class Backend:
    def __init__(self, pod: str) -> None:
        self.name = pod.encode() + b"\n"
        with netns.inside(pod_ns(pod)):
            self.tcp = socket.socket()
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tcp.bind(("0.0.0.0", 8080))
            self.tcp.listen(64)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("0.0.0.0", 5353))
        for target in (self._accept, self._datagrams):
            threading.Thread(target=target, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.name)
                while conn.recv(100):  # keep the connection until the client closes it
                    pass
            except OSError:
                pass

    def _datagrams(self) -> None:
        while True:
            try:
                _, peer = self.udp.recvfrom(100)
                self.udp.sendto(self.name, peer)
            except OSError:
                return

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


def open_conn(src: str, dst: str, port: int) -> tuple[socket.socket, str]:
    """A TCP connection from pod `src`, left open; returns it and the backend that answered."""
    with netns.inside(pod_ns(src)):
        s = socket.create_connection((dst, port), timeout=10)
    return s, s.makefile().readline().strip()


def hit(src: str, dst: str, port: int) -> str:
    try:
        s, name = open_conn(src, dst, port)
    except ConnectionRefusedError:
        return "REFUSED"
    except OSError as exc:
        return type(exc).__name__
    reset(s)
    return name


def reset(s: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): IPVS then keeps the connection 10 s (CLOSE), not 2 min (TIME_WAIT)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def udp(src: str, dst: str, port: int) -> str:
    with netns.inside(pod_ns(src)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(3)
        s.sendto(b"hi", (dst, port))
        try:
            return s.recv(100).decode().strip()
        except OSError as exc:
            return type(exc).__name__


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    names = [NODE, OUTSIDE, *(pod_ns(p) for p in PODS)]
    backends: list[Backend] = []
    try:
        yield from _build(names, backends)
    finally:
        for b in backends:
            b.close()
        subprocess.run(
            ["ip", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names), capture_output=True, text=True
        )


def _build(names: list[str], backends: list[Backend]) -> Iterator[str]:
    root = [f"netns add {n}" for n in names]
    root.append(f"link add eth0 netns {NODE} type veth peer name up0 netns {OUTSIDE}")
    root += [f"link add veth-{p} netns {NODE} type veth peer name eth0 netns {pod_ns(p)}" for p in PODS]
    batch(root)
    batch(
        [
            "link set lo up",
            f"addr add {NODE_IP}/24 dev eth0",
            "link set eth0 up",
            "link add cni0 type bridge",
            f"addr add {GATEWAY}/24 dev cni0",
            "link set cni0 up",
            *(f"link set veth-{p} master cni0 up" for p in PODS),
            # bridge CNI's hairpinMode: a frame may leave by the port it came in (a pod reaching itself)
            *(f"link set veth-{p} type bridge_slave hairpin on" for p in PODS),
        ],
        NODE,
    )
    batch(["link set lo up", "addr add 172.18.0.9/24 dev up0", "link set up0 up"], OUTSIDE)
    for pod, ip in PODS.items():
        batch(
            ["link set lo up", f"addr add {ip}/24 dev eth0", "link set eth0 up", f"route add default via {GATEWAY}"],
            pod_ns(pod),
        )
    with netns.inside(NODE):
        for key in ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"):
            assert netns.write_sysctl(key, 1), f"{key} missing (modprobe br_netfilter)"
    backends += [Backend("b1"), Backend("b2")]
    yield NODE


def ipvsadm(ns: str = NODE) -> str:
    return sh(ns, "ipvsadm", "-Ln")


def want(state: IpvsState) -> str:
    return ipvsadm_header() + ipvsadm_lines(state.virtual_servers)


# --- the tests, in order: they share the node and build on each other's state ---------------------------


def test_first_sync_programs_what_render_describes(node: str) -> None:
    t0 = time.perf_counter()
    res = proxy_ipvs.sync_ipvs(node, plan(*SERVICES), None)
    print(f"first sync: {time.perf_counter() - t0:.2f} s, {res}")
    # NodePorts on every local address but kube-ipvs0's and lo's: eth0 and cni0 here
    state = render_ipvs(CTX, SERVICES, nodeport_addresses=[GATEWAY, NODE_IP])
    assert ipvsadm() == want(state)  # byte for byte, ipvsadm's own order and columns
    assert [v.key for v in inspect.parse_ipvsadm(ipvsadm())] == [v.key for v in state.virtual_servers]
    assert "TCP  10.96.0.30:80 rr persistent 10800" in ipvsadm()
    assert res.services_added == 6 and res.dests_added == 10 and res.addresses_added == 4
    assert res.jumps_added == 9

    # kube-ipvs0: a dummy, down, holding every ClusterIP as /32
    link = sh(node, "ip", "-o", "link", "show", "kube-ipvs0")
    assert "dummy" in sh(node, "ip", "-o", "-d", "link", "show", "kube-ipvs0") and ",UP" not in link
    addrs = sh(node, "ip", "-o", "-4", "addr", "show", "dev", "kube-ipvs0")
    assert sorted(a.split()[3] for a in addrs.splitlines()) == sorted(f"{a}/32" for a in state.addresses)

    # ipsets: exactly the rendered entries, every one of kube-proxy's 17 sets present
    have = ipset.save(node)
    assert {name for name, _, _ in IPSETS} <= set(have)
    for s in state.ipsets:
        assert have[s.name].type == s.type and have[s.name].entries == set(s.entries), s.name
    assert have["KUBE-LOOP-BACK"].entries == {
        "10.244.0.5,tcp:8080,10.244.0.5",
        "10.244.0.6,tcp:8080,10.244.0.6",
        "10.244.0.5,udp:5353,10.244.0.5",
        "10.244.0.6,udp:5353,10.244.0.6",
    }

    # iptables as iptables-save prints it: the jumps (reverse ensure order) and the fixed rules
    save = sh(node, "iptables-save")
    for line in (
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
        '-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment "Kubernetes service cluster ip + port for'
        ' masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ',
        '-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose"'
        " -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ",
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT"
        " --reject-with icmp-port-unreachable",
    ):
        assert line in save.splitlines(), f"{line}\nnot in\n{save}"
    inputs = [line for line in save.splitlines() if line.startswith("-A INPUT")]
    assert [line.rsplit(" ", 1)[1] for line in inputs] == ["KUBE-IPVS-FILTER", "KUBE-PROXY-FIREWALL", "KUBE-NODE-PORT"]

    # sysctls, in the node namespace only
    for key, value in state.sysctls:
        assert sh(node, "sysctl", "-n", key).strip() == str(value), key


def test_second_sync_changes_nothing(node: str) -> None:
    before = ipvsadm()
    t0 = time.perf_counter()
    res = proxy_ipvs.sync_ipvs(node, plan(*SERVICES), plan(*SERVICES))
    print(f"no-op sync: {time.perf_counter() - t0:.2f} s, {res}")
    assert res.ipvs_changes == 0 and res.ipset_changes == 0 and res.jumps_added == 0
    assert res.addresses_added == res.addresses_removed == 0
    assert ipvsadm() == before
    assert sh(node, "iptables-save").count("-j KUBE-SERVICES") == 2  # jumps not duplicated


def test_traffic_follows_the_table(node: str) -> None:
    state = render_ipvs(CTX, SERVICES, nodeport_addresses=[GATEWAY, NODE_IP])
    seen = {hit("c1", "10.96.0.100", 80) for _ in range(6)}
    assert seen == {"b1", "b2"}, seen  # rr alternates
    assert {udp("c1", "10.96.0.10", 53) for _ in range(6)} == {"b1", "b2"}
    assert hit("c1", str(NODE_IP), 30080) in {"b1", "b2"}  # NodePort on eth0's address
    sticky = {hit("c1", "10.96.0.30", 80) for _ in range(4)}
    assert len(sticky) == 1, sticky  # persistence: one client, one backend
    # a pod reaching itself through its service: KUBE-LOOP-BACK masquerades, so it works
    hairpin = {hit("b1", "10.96.0.100", 80) for _ in range(4)}
    assert hairpin == {"b1", "b2"}, hairpin
    trace = trace_ipvs(state, CTX, src=IPv4Address(PODS["b1"]), dst=IPv4Address("10.96.0.100"), port=80)
    assert trace.hairpin == ("10.244.0.5:8080",)
    # a ClusterIP on a port no service uses: KUBE-IPVS-FILTER rejects
    assert hit("c1", "10.96.0.100", 81) == "REFUSED"
    assert trace_ipvs(state, CTX, src=IPv4Address("10.244.0.2"), dst=IPv4Address("10.96.0.100"), port=81).verdict == (
        "REJECT"
    )
    # a ClusterIP answers ping, with KUBE-IPVS-FILTER's port unreachable (an echo is no service port)
    ping = sh(pod_ns("c1"), "ping", "-c", "1", "-W", "2", "10.96.0.100", check=False)
    print(f"ping a ClusterIP: {ping!r}")
    assert "From 10.96.0.100" in ping and "Destination Port Unreachable" in ping, ping
    # a virtual server without real servers: IPVS answers the SYN with ICMP port unreachable
    t0 = time.monotonic()
    empty = hit("c1", "10.96.0.40", 80)
    print(f"no-endpoint service: {empty} after {time.monotonic() - t0:.2f} s")
    assert empty == "REFUSED"


def table(ns: str = NODE) -> dict[tuple[str, str, int], VirtualServer]:
    with kipvs.opened(ns) as ipvs:
        return {(v.protocol, str(v.ip), v.port): v for v in ipvs.services()}


def wait_idle(ns: str, timeout: float = 60.0) -> float:
    """Until no TCP real server has a connection (a RST leaves one in CLOSE for 10 s); seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        busy = [r for v in table(ns).values() if v.protocol == "TCP" for r in v.real_servers if r.active + r.inactive]
        if not busy:
            break
        time.sleep(1)
    return time.monotonic() - t0


def test_removed_endpoint_drains_then_goes(node: str) -> None:
    print(f"idle after {wait_idle(node):.0f} s")
    held, name = open_conn("c1", "10.96.0.100", 80)
    gone, keep = (name, "b2" if name == "b1" else "b1")
    web = replace(WEB, endpoints=(ep(keep),))
    dns = replace(DNS, endpoints=(ep(keep, 5353),))
    before = table(node)
    try:
        res = proxy_ipvs.sync_ipvs(node, plan(web, dns, STICKY, EMPTY), None)
        print(f"endpoint removed: {res}")
        after = table(node)
        # only web's and dns's real servers changed; nothing else in the table
        assert {k: v for k, v in after.items() if k[2] not in (80, 30080, 53) or k[1] == "10.96.0.30"} == {
            k: v for k, v in before.items() if k[2] not in (80, 30080, 53) or k[1] == "10.96.0.30"
        }
        cluster = {r.addr: r for r in after[("TCP", "10.96.0.100", 80)].real_servers}
        # the open connection's server drains at weight 0 where the connection is ...
        assert (cluster[f"{PODS[gone]}:8080"].weight, cluster[f"{PODS[gone]}:8080"].active) == (0, 1)
        assert cluster[f"{PODS[keep]}:8080"].weight == 1
        # ... is deleted at once from the idle NodePort servers, and from UDP (no grace for UDP)
        for key in (("TCP", str(NODE_IP), 30080), ("TCP", str(GATEWAY), 30080), ("UDP", "10.96.0.10", 53)):
            assert [r.ip for r in after[key].real_servers] == [IPv4Address(PODS[keep])], key
        assert (res.dests_updated, res.dests_deleted) == (1, 3), res
        assert res.draining == [f"TCP 10.96.0.100:80 -> {PODS[gone]}:8080"]
        assert res.services_added == res.services_deleted == res.services_updated == 0
        # new connections avoid the weight-0 server; the open one still works
        assert {hit("c1", "10.96.0.100", 80) for _ in range(4)} == {keep}
        held.sendall(b"still here\n")
        # another sync while the connection is open: still draining, nothing changed
        res = proxy_ipvs.sync_ipvs(node, plan(web, dns, STICKY, EMPTY), None)
        assert res.ipvs_changes == 0 and len(res.draining) == 1, res
        assert proxy_ipvs.draining(node) == res.draining
    finally:
        reset(held)
    waited = wait_idle(node)
    res = proxy_ipvs.sync_ipvs(node, plan(web, dns, STICKY, EMPTY), None)
    print(f"after the connection closed ({waited:.0f} s): {res}")
    assert res.dests_deleted == 1 and not res.draining and not proxy_ipvs.draining(node), res
    assert [r.ip for r in table(node)[("TCP", "10.96.0.100", 80)].real_servers] == [IPv4Address(PODS[keep])]


def test_scheduler_persistence_and_stale_services(node: str) -> None:
    ctx = replace(CTX, ipvs_scheduler=IpvsScheduler.WLC)
    web = replace(WEB, ipvs_scheduler=IpvsScheduler.MH)
    res = proxy_ipvs.sync_ipvs(node, plan(web, STICKY, ctx=ctx), None)  # dns and empty deleted
    print(f"schedulers changed, two services gone: {res}")
    out = ipvsadm()
    assert "TCP  10.96.0.100:80 mh (mh-port)" in out
    assert "TCP  10.96.0.30:80 wlc persistent 10800" in out
    assert "10.96.0.10:53" not in out and "10.96.0.40:80" not in out
    assert res.services_updated == 4 and res.services_deleted == 2 and res.addresses_removed == 2
    assert "10.96.0.10/32" not in sh(node, "ip", "-4", "addr", "show", "dev", "kube-ipvs0")
    assert ipset.save(node)["KUBE-CLUSTER-IP"].entries == {"10.96.0.100,tcp:80", "10.96.0.30,tcp:80"}
    view = proxy_ipvs.observe_ipvs(node)
    assert view.table() == ipvsadm()  # the rules view reads back what ipvsadm shows, byte for byte
    assert view.as_dict()["virtualServers"][0]["realServers"]


def test_cleanup_leaves_nothing(node: str) -> None:
    proxy_ipvs.cleanup_ipvs(node)
    proxy_ipvs.cleanup_ipvs(node)  # twice is fine
    assert inspect.parse_ipvsadm(ipvsadm()) == []
    assert "KUBE-" not in sh(node, "ipset", "list", "-n")
    save = sh(node, "iptables-save")
    assert "KUBE-" not in save, save
    assert sh(node, "ip", "link", "show", "kube-ipvs0", check=False) == ""
    assert not proxy_ipvs.has_ipvs(node)
