"""IPVS mode end to end: a two-node VXLAN lab built by `netlab up` with proxyMode ipvs, proven
with real traffic (modelled on tests/kernel/test_services.py, which does the same for iptables
and nftables). VM tier (tests/vm/conftest.py): `sudo .venv/bin/netlab vm -- pytest tests/vm`.
They need IPVS mode wired into `netlab up` (netlab.kernel.proxy -> netlab.kernel.proxy_ipvs), the
per-service `ipvsScheduler` carried into ServicePort by the planner, and `netlab rules` reading
IPVS nodes (the last test).

One lab for the module:
  node1: web-0, web-2, c1, self        node2: web-1, c2, r1
  web      ClusterIP  http 80->8080/TCP, dns 53->5353/UDP          endpoints web-0..2 (both nodes)
  web-np   NodePort   80->8080, nodePort 30080                    endpoints web-0..2
  sticky   ClusterIP  80->8080, sessionAffinity ClientIP           endpoints web-0..2
  hashed   ClusterIP  80->8080, ipvsScheduler sh                   endpoints web-0..2
  least    ClusterIP  80->9090, ipvsScheduler lc                   web-0..2, port 9090 served by this
                      process's threads inside the pods, which keep a connection open until closed
  empty    ClusterIP  80, selector matches nothing                 no endpoints
  self     ClusterIP  80->8080                                     endpoint: the pod `self` (hairpin)
  remote   NodePort   80->8080, nodePort 30090, externalTrafficPolicy Local, endpoint r1 (node2 only)
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab.kernel import netns
from netlab.plan import naming

# tests/conftest.py's Lab: `import conftest` here would find tests/vm/conftest.py
_spec = importlib.util.spec_from_file_location("netlab_tests_conftest", Path(__file__).parents[1] / "conftest.py")
assert _spec is not None and _spec.loader is not None
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
Lab, NETLAB, REPO = _root.Lab, _root.NETLAB, _root.REPO

CLIENT = """
import json, socket, sys, time
host, port, count, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
seen = {}
for _ in range(count):
    t = time.monotonic()
    try:
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(b"hi", (host, port))
            name = s.recv(100).decode().strip()
        else:
            s = socket.create_connection((host, port), timeout=3)
            s.sendall(b"\\n")
            name = s.makefile().readline().strip()
        s.close()
    except ConnectionRefusedError:
        name = "REFUSED"
    except OSError as e:
        name = type(e).__name__
    seen[name] = seen.get(name, 0) + 1
    elapsed = time.monotonic() - t
print(json.dumps({"seen": seen, "last_seconds": elapsed}))
"""


def spec() -> dict[str, Any]:
    http = {"name": "http", "port": 80, "targetPort": 8080}
    web = {"app": "web"}
    return {
        "cluster": {"proxyMode": "ipvs"},
        "nodes": [{"name": "node1"}, {"name": "node2"}],
        "deployments": [{"name": "web", "replicas": 3, "serve": [8080, "5353/udp"]}],
        "pods": [
            {"name": "c1", "node": "node1"},
            {"name": "c2", "node": "node2"},
            {"name": "self", "node": "node1", "labels": {"app": "self"}, "serve": [8080]},
            {"name": "r1", "node": "node2", "labels": {"app": "remote"}, "serve": [8080]},
        ],
        "services": [
            {
                "name": "web",
                "selector": web,
                "ports": [http, {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}],
            },
            {
                "name": "web-np",
                "type": "NodePort",
                "selector": web,
                "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}],
            },
            {
                "name": "sticky",
                "selector": web,
                "sessionAffinity": "ClientIP",
                "ports": [{"port": 80, "targetPort": 8080}],
            },
            {"name": "hashed", "selector": web, "ipvsScheduler": "sh", "ports": [{"port": 80, "targetPort": 8080}]},
            {"name": "least", "selector": web, "ipvsScheduler": "lc", "ports": [{"port": 80, "targetPort": 9090}]},
            {"name": "empty", "selector": {"app": "nothing"}, "ports": [{"port": 80}]},
            {"name": "self", "selector": {"app": "self"}, "ports": [{"port": 80, "targetPort": 8080}]},
            {
                "name": "remote",
                "type": "NodePort",
                "externalTrafficPolicy": "Local",
                "selector": {"app": "remote"},
                "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30090}],
            },
        ],
    }


class Holder:
    """A TCP server on 9090 inside a pod (a thread of this process, socket opened in the pod's
    namespace) that answers with the pod's name and keeps the connection until the client closes."""

    def __init__(self, ns: str, name: str) -> None:
        self.name = name.encode() + b"\n"
        with netns.inside(ns):
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("0.0.0.0", 9090))
            self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.name)
                while conn.recv(100):
                    pass
            except OSError:
                pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    lab = Lab(tmp_path_factory.mktemp("ipvs"), spec())
    holders: list[Holder] = []
    try:
        lab.up()
        holders += [Holder(naming.netns_pod(lab.name, "default", f"web-{i}"), f"web-{i}") for i in range(3)]
        yield lab
    finally:
        for h in holders:
            h.sock.close()
        subprocess.run([*NETLAB, "down", lab.name], capture_output=True, cwd=REPO)


_STATUS: dict[str, dict[str, Any]] = {}


def status(lab: Any) -> dict[str, Any]:
    """`netlab status` once per lab: addresses do not change during the module, and every CLI run
    costs seconds in the TCG guest."""
    if lab.name not in _STATUS:
        _STATUS[lab.name] = lab.status()
    return _STATUS[lab.name]


def vip(lab: Any, name: str, port: int = 80) -> str:
    return str(next(s["clusterIP"] for s in status(lab)["services"] if (s["name"], s["port"]) == (name, port)))


def node_ip(lab: Any, node: str) -> str:
    return str(next(n["ip"] for n in status(lab)["nodes"] if n["name"] == node)).split("/")[0]


def connect(lab: Any, src: str, host: str, port: int, count: int = 1, proto: str = "tcp") -> dict[str, Any]:
    r = lab.exec(src, sys.executable, "-c", CLIENT, host, str(port), str(count), proto)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def hold(lab: Any, pod: str, host: str, port: int) -> tuple[socket.socket, str]:
    with netns.inside(naming.netns_pod(lab.name, "default", pod)):
        s = socket.create_connection((host, port), timeout=10)
    return s, s.makefile().readline().strip()


@pytest.mark.parametrize("client", ["c1", "c2"])
def test_cluster_ip_from_pods_on_both_nodes_is_exactly_round_robin(lab: Any, client: str) -> None:
    """rr over 300 sequential connections from one node: each backend exactly 100 times (each
    node's IPVS keeps its own rotation, so the other node's traffic does not disturb it)."""
    seen = connect(lab, client, vip(lab, "web"), 80, count=300)["seen"]
    assert seen == {"web-0": 100, "web-1": 100, "web-2": 100}, seen


def test_udp_service(lab: Any) -> None:
    seen = connect(lab, "c2", vip(lab, "web", 53), 53, count=30, proto="udp")["seen"]
    assert seen == {"web-0": 10, "web-1": 10, "web-2": 10}, seen


def test_node_port_from_outside_on_every_node(lab: Any) -> None:
    for node in ("node1", "node2"):
        seen = connect(lab, "external", node_ip(lab, node), 30080, count=30)["seen"]
        assert seen == {"web-0": 10, "web-1": 10, "web-2": 10}, (node, seen)


def test_same_node_pod_to_service_to_pod(lab: Any) -> None:
    """c1 and `self` share node1's cni0: the reply is bridged and un-NATed thanks to br_netfilter."""
    assert connect(lab, "c1", vip(lab, "self"), 80, count=5)["seen"] == {"self": 5}


def test_hairpin_pod_reaches_itself_through_its_service(lab: Any) -> None:
    """KUBE-LOOP-BACK (ip,port,ip) masquerades the pod's own traffic that IPVS sent back to it."""
    assert connect(lab, "self", vip(lab, "self"), 80, count=5)["seen"] == {"self": 5}


def test_client_ip_affinity_keeps_one_backend(lab: Any) -> None:
    for client in ("c1", "c2"):
        seen = connect(lab, client, vip(lab, "sticky"), 80, count=20)["seen"]
        assert len(seen) == 1 and sum(seen.values()) == 20, (client, seen)


def test_source_hashing_sends_one_client_to_one_backend(lab: Any) -> None:
    for client in ("c1", "c2"):
        seen = connect(lab, client, vip(lab, "hashed"), 80, count=30)["seen"]
        assert len(seen) == 1 and sum(seen.values()) == 30, (client, seen)


def test_least_connection_prefers_the_backend_with_fewer_open_connections(lab: Any) -> None:
    host = vip(lab, "least")
    held = [hold(lab, "c1", host, 80) for _ in range(2)]  # lc: two different backends
    try:
        busy = {name for _, name in held}
        assert len(busy) == 2, busy
        idle = {"web-0", "web-1", "web-2"} - busy
        # each new connection (closed before the next) goes to the backend without an open one:
        # lc weighs an active connection 256 and a closed one (TIME_WAIT, inactive) 1
        seen = set()
        for _ in range(5):
            s, name = hold(lab, "c1", host, 80)
            s.close()
            seen.add(name)
        assert seen == idle, (busy, seen)
    finally:
        for s, _ in held:
            s.close()


def test_cluster_ip_answers_ping_with_port_unreachable(lab: Any) -> None:
    """The ClusterIP is a local address (kube-ipvs0), so the node answers; since kube-proxy 1.26
    KUBE-IPVS-FILTER REJECTs anything that is not a service port, so the answer is ICMP port
    unreachable from the ClusterIP itself, at once (before that filter it was an echo reply)."""
    address = vip(lab, "web")
    r = lab.exec("c1", "ping", "-c", "1", "-W", "2", address, check=False)
    assert f"From {address}" in r.stdout and "Destination Port Unreachable" in r.stdout, r.stdout


def test_local_policy_without_local_endpoints_falls_back_to_remote(lab: Any) -> None:
    """remote's only endpoint is on node2; node1's IPVS uses the cluster endpoints instead of
    dropping (kube-proxy PR #97081; iptables and nftables modes drop)."""
    seen = connect(lab, "c1", node_ip(lab, "node1"), 30090, count=5)["seen"]
    assert seen == {"r1": 5}, seen


def test_service_without_endpoints_is_not_rejected_by_a_rule(lab: Any) -> None:
    """IPVS mode writes no per-service REJECT: the empty virtual server itself answers, IPVS
    sending ICMP port unreachable when it finds no destination (ip_vs_leave)."""
    save = lab.exec("node1", "iptables-save").stdout
    assert "has no endpoints" not in save and "-j REJECT" in save  # only KUBE-IPVS-FILTER's REJECT
    out = lab.exec("node1", "ipvsadm", "-Ln").stdout
    assert f"TCP  {vip(lab, 'empty')}:80 rr\n" in out  # the virtual server exists, with no real server
    result = connect(lab, "c1", vip(lab, "empty"), 80)
    assert result["seen"] == {"REFUSED": 1} and result["last_seconds"] < 1.0, result


def test_rules_command_shows_the_ipvs_table(lab: Any) -> None:
    view = json.loads(lab.netlab("rules", "--lab", lab.name, "node1", "-o", "json").stdout)
    assert view["mode"] == "ipvs"
    web = next(v for v in view["virtualServers"] if v["address"] == vip(lab, "web") and v["port"] == 80)
    assert web["scheduler"] == "rr" and len(web["realServers"]) == 3
    assert all(r["forward"] == "Masq" and r["weight"] == 1 for r in web["realServers"])
    table = lab.netlab("rules", "--lab", lab.name, "node1").stdout
    assert f"TCP  {vip(lab, 'web')}:80 rr" in table and "KUBE-CLUSTER-IP" in table
