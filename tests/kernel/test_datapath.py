"""Pod-to-pod over the real kernel: ICMP and TCP/UDP to responders, same node and across
nodes, with VXLAN and host-gw, and what the underlay wire carries in each case."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Lab, two_nodes

pytestmark = pytest.mark.root


class UnderlayCapture:
    """tcpdump on the underlay bridge br0 (a port mirror of the 'physical' network)."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                f"nl-{lab.name}-underlay",
                "tcpdump",
                "-i",
                "br0",
                "-n",
                "-U",
                "-w",
                str(path),
                "udp or icmp or tcp",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on br0 ..." once the socket is open
        assert "listening on" in line, line

    def stop(self) -> list[Any]:
        time.sleep(0.2)
        self.proc.terminate()
        self.proc.wait(timeout=5)
        from scapy.all import UDP, VXLAN, bind_layers, rdpcap

        bind_layers(UDP, VXLAN, dport=8472)  # flannel's port, not IANA's 4789
        return list(rdpcap(str(self.path)))


def _ping(lab: Lab, src: str, dst_ip: str) -> None:
    r = lab.exec(src, "ping", "-c", "2", "-W", "1", "-i", "0.2", dst_ip, check=False)
    assert r.returncode == 0, f"{src} -> {dst_ip}: {r.stdout}{r.stderr}"


def _tcp(lab: Lab, src: str, dst_ip: str, port: int) -> str:
    return lab.exec(src, "nc", "-w", "2", dst_ip, str(port), input="").stdout.strip()


def _udp(lab: Lab, src: str, dst_ip: str, port: int) -> str:
    return lab.exec(src, "sh", "-c", f"echo hi | nc -u -w 1 {dst_ip} {port}").stdout.strip()


@pytest.mark.parametrize("overlay", ["vxlan", "host-gw"])
def test_pod_to_pod(make_lab: Any, tmp_path: Path, overlay: str) -> None:
    lab = make_lab(two_nodes(overlay))
    lab.up()
    a2, b1 = lab.pod_ip("a2"), lab.pod_ip("b1")

    cap = UnderlayCapture(lab, tmp_path / "underlay.pcap")
    # same node: through cni0 only
    _ping(lab, "a1", a2)
    assert _tcp(lab, "a1", a2, 8080) == "a2"
    # across nodes: through flannel.1 (or a host-gw route) and the underlay
    _ping(lab, "a1", b1)
    assert _tcp(lab, "a1", b1, 8080) == "b1"
    assert _udp(lab, "a1", b1, 5353) == "b1"
    frames = cap.stop()

    from scapy.all import ICMP, IP, TCP, UDP, VXLAN

    a1 = lab.pod_ip("a1")
    nodes = {n["name"]: n["ip"].split("/")[0] for n in lab.status()["nodes"]}
    vx = [f for f in frames if f.haslayer(VXLAN)]
    plain = [f for f in frames if f.haslayer(IP) and not f.haslayer(VXLAN)]
    same_node = [f for f in frames if f.haslayer(IP) and a2 in (f[IP].src, f[IP].dst) and not f.haslayer(VXLAN)]
    assert not same_node, "same-node traffic must never reach the underlay"
    if overlay == "vxlan":
        outer = {(f[IP].src, f[IP].dst, f[UDP].dport, f[VXLAN].vni) for f in vx}
        assert (nodes["node1"], nodes["node2"], 8472, 1) in outer
        assert (nodes["node2"], nodes["node1"], 8472, 1) in outer
        inner = [f[VXLAN].payload for f in vx]
        assert any(p.haslayer(ICMP) and p[IP].src == a1 and p[IP].dst == b1 for p in inner)
        assert any(p.haslayer(TCP) and p[IP].src == a1 and p[IP].dst == b1 and p[TCP].dport == 8080 for p in inner)
        assert not [f for f in plain if f[IP].src == a1], "VXLAN lab leaked an unencapsulated pod packet"
    else:
        assert not vx, "host-gw must not encapsulate"
        assert any(f.haslayer(ICMP) and f[IP].src == a1 and f[IP].dst == b1 for f in plain)
        assert any(f.haslayer(TCP) and f[IP].src == a1 and f[IP].dst == b1 for f in plain)


def test_readback_equals_plan(make_lab: Any) -> None:
    """Every link, address, route, neighbour and FDB entry the plan names is in the kernel,
    and nothing else that netlab programs."""
    from netlab.kernel import observe
    from netlab.plan import resolve
    from netlab.plan.expected import expected_state
    from netlab.plan.model import ObservedLab
    from netlab.topology import load

    lab = make_lab({**two_nodes(), "nodes": [{"name": "node1"}, {"name": "node2"}, {"name": "node3"}]})
    lab.up()
    topo = load(lab.file)
    desired = resolve(topo, str(lab.file), observe.observe_lab(lab.name))
    # the plan resolved against the running lab is the plan it was built from
    assert desired == resolve(topo, str(lab.file), ObservedLab(lab.name))
    expected = expected_state(desired)
    assert set(expected) == set(lab.netns())
    for ns, want in expected.items():
        got = observe.read_state(ns)
        assert set(got.links) == set(want.links), ns
        for name, attrs in want.links.items():
            link = got.links[name]
            assert link.up, f"{ns}/{name} is down"
            assert link.alias == f"netlab:{lab.name}", f"{ns}/{name} lacks the ownership alias"
            for key, value in attrs.items():
                assert getattr(link, key) == value, f"{ns}/{name}.{key}: {getattr(link, key)} != {value}"
        assert got.addrs == want.addrs, ns
        assert got.routes == want.routes, ns
        assert got.neigh == want.neigh, ns
        assert got.fdb == want.fdb, ns
        for key, value in want.sysctls.items():
            assert got.sysctls.get(key) == value, f"{ns}: {key}"
