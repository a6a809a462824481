"""`netlab probe` and `netlab capture` on the real kernel.

Labs (module scope, built once):
  svc-<mode>  two nodes, VXLAN, proxyMode iptables or nftables
              node1: web-0, web-2, c1        node2: web-1
              web     ClusterIP  http 80->8080, dns 53->5353/UDP   endpoints web-0..2
              web-np  NodePort   80->8080, nodePort 30080
              empty   ClusterIP  80, no endpoints (REJECT)
  hgw         two nodes, host-gw, iptables on the legacy backend (no nftables trace: counters)
              node1: a1      node2: b1 (serves 8080)      web -> b1
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NETLAB, REPO, Lab

pytestmark = pytest.mark.root


def _entry() -> list[str]:
    """The real CLI once `probe` is registered there; the probe module's own group until then."""
    from netlab.cli import main

    if "probe" in main.commands:
        return NETLAB
    return [sys.executable, "-c", "from netlab.cli_probe import standalone; standalone()"]


def svc_spec(mode: str) -> dict[str, Any]:
    return {
        "cluster": {"proxyMode": mode},
        "nodes": [{"name": "node1"}, {"name": "node2"}],
        "deployments": [{"name": "web", "replicas": 3, "serve": [8080, "5353/udp"]}],
        "pods": [{"name": "c1", "node": "node1"}],
        "services": [
            {
                "name": "web",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
                ],
            },
            {
                "name": "web-np",
                "type": "NodePort",
                "selector": {"app": "web"},
                "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}],
            },
            {"name": "empty", "selector": {"app": "nothing"}, "ports": [{"port": 80}]},
        ],
    }


def hgw_spec() -> dict[str, Any]:
    return {
        "cluster": {"overlay": "host-gw", "iptablesBackend": "legacy"},
        "nodes": [{"name": "node1"}, {"name": "node2"}],
        "pods": [
            {"name": "a1", "node": "node1"},
            {"name": "b1", "node": "node2", "labels": {"app": "b"}, "serve": [8080]},
        ],
        "services": [{"name": "web", "selector": {"app": "b"}, "ports": [{"port": 80, "targetPort": 8080}]}],
    }


class ProbeLab(Lab):
    def probe(self, *args: str, check: bool = True) -> dict[str, Any]:
        r = self.run("probe", *args, "-o", "json")
        if check and r.returncode != 0:
            raise AssertionError(f"netlab probe {' '.join(args)} exited {r.returncode}: {r.stderr}{r.stdout}")
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_entry(), command, "--lab", self.name, *args], capture_output=True, text=True, cwd=REPO)

    def ns(self, what: str) -> str:
        return f"nl-{self.name}-{what}"


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ProbeLab]]:
    made: dict[str, ProbeLab] = {}

    def get(kind: str) -> ProbeLab:
        if kind not in made:
            spec = hgw_spec() if kind == "hgw" else svc_spec(kind)
            lab = ProbeLab(tmp_path_factory.mktemp(kind), spec)
            made[kind] = lab
            lab.up()
        return made[kind]

    try:
        yield get
    finally:
        for lab in made.values():
            subprocess.run([*NETLAB, "down", lab.name], capture_output=True, cwd=REPO)


@pytest.fixture
def ipt(labs: Callable[[str], ProbeLab]) -> ProbeLab:
    return labs("iptables")


@pytest.fixture(params=["iptables", "nftables"])
def mode_lab(request: pytest.FixtureRequest, labs: Callable[[str], ProbeLab]) -> ProbeLab:
    return labs(request.param)


def hops(seq: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(o["hop"], o["direction"]) for o in seq]


def changes(seq: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [c for o in seq for c in o["changes"] if c["kind"] == kind]


def pod_ip(lab: Lab, name: str) -> str:
    return lab.pod_ip(name)


def test_same_node_pod_to_pod_through_cni0(ipt: ProbeLab) -> None:
    d = ipt.probe("c1", "web-0:8080")
    (w,) = d["walks"]
    assert w["verdict"] == "answered" and w["reply"] == "SYN-ACK" and w["answered_by"] == "default/web-0"
    req = hops(w["request"])
    assert req[0] == ("default/c1/eth0", "out") and req[-1] == ("default/web-0/eth0", "in")
    # the two host veths are cni0's ports: the frame is bridged from one to the other
    (bridged,) = changes(w["request"], "bridged")
    assert bridged["text"].startswith("bridged by cni0 from port veth") and bridged["where"] == "node1"
    ports = subprocess.run(
        ["ip", "-n", ipt.ns("node1"), "-o", "link", "show", "master", "cni0"], capture_output=True, text=True
    ).stdout
    for hop, _ in req[1:-1]:
        assert hop.split("/")[1] in ports
    assert not any("vxlan" in o for o in w["request"] + w["reply_walk"])
    assert all(o["ttl"] == 64 for o in w["request"])  # bridged, never routed
    assert hops(w["reply_walk"]) == [(h, "out" if dr == "in" else "in") for h, dr in reversed(req)]


def test_cross_node_pod_to_pod_is_vxlan_on_the_underlay(ipt: ProbeLab, tmp_path: Path) -> None:
    pcap = tmp_path / "walk.pcapng"
    d = ipt.probe("c1", "web-1:8080", "--pcap", str(pcap))
    (w,) = d["walks"]
    assert w["verdict"] == "answered" and w["answered_by"] == "default/web-1"
    req = hops(w["request"])
    for hop in [
        ("node1/flannel.1", "out"),
        ("node1/eth0", "out"),
        ("underlay/br0", "in"),
        ("node2/eth0", "in"),
        ("node2/flannel.1", "in"),
        ("node2/cni0", "out"),
    ]:
        assert hop in req, (hop, req)
    under = next(o for o in w["request"] if o["hop"] == "underlay/br0")
    node_ips = {n["name"]: n["ip"].split("/")[0] for n in ipt.status()["nodes"]}
    assert under["vxlan"]["vni"] == 1
    assert under["vxlan"]["outer_dst"] == f"{node_ips['node2']}:8472"
    assert under["vxlan"]["outer_src"].startswith(node_ips["node1"] + ":")
    assert under["dst"] == f"{pod_ip(ipt, 'web-1')}:8080"
    (encap,) = changes(w["request"], "encap")
    assert encap["where"] == "node1" and "VNI 1" in encap["text"]
    (decap,) = changes(w["request"], "decap")
    assert decap["where"] == "node2"
    assert [c["text"] for c in changes(w["request"], "ttl")] == ["TTL 64 -> 63", "TTL 63 -> 62"]

    # the encapsulated frame as captured on the underlay, decoded by scapy (VXLAN bound to 8472)
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import bind_layers

    from netlab.probe.pcapng import read

    bind_layers(UDP, VXLAN, dport=8472)
    names, frames = read(pcap.read_bytes())
    assert names == [h["hop"] for h in d["hops"]]
    (f,) = [f for f in frames if f.interface == "underlay/br0" and "request" in f.comment]
    pkt = Ether(f.data)
    assert pkt[UDP].dport == 8472 and pkt[VXLAN].vni == 1
    assert pkt[VXLAN].payload[IP].dst == pod_ip(ipt, "web-1")


def _sep_dnat(lab: ProbeLab, chain: str) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", lab.ns("node1"), "iptables-save", "-t", "nat"], capture_output=True, text=True
    )
    return next(line for line in r.stdout.splitlines() if line.startswith(f"-A {chain} ") and "DNAT" in line)


def test_cluster_ip_dnat_at_the_node_names_the_chains_and_the_endpoint(mode_lab: ProbeLab) -> None:
    mode = mode_lab.spec["cluster"]["proxyMode"]
    d = mode_lab.probe("c1", "web:80", "--count", "6")
    vip = d["destination"]["ip"]
    assert d["tracer"]["node1"] == "nftrace"
    seen = set()
    for w in d["walks"]:
        assert w["verdict"] == "answered", w["reason"]
        ep = w["endpoint"]
        assert ep is not None and ep["pod"] == w["answered_by"]  # the endpoint chosen is the pod that answered
        seen.add(ep["pod"])
        (dnat,) = changes(w["request"], "dnat")
        assert dnat["where"] == "node1"
        assert dnat["text"] == f"DNAT {vip}:80 -> {ep['ip']}:8080"
        chains = dnat["chains"]
        if mode == "iptables":
            assert chains[:2] == ["nat PREROUTING", "KUBE-SERVICES"]
            assert chains[2].startswith("KUBE-SVC-") and chains[-1].startswith("KUBE-SEP-")
            assert f"--to-destination {ep['ip']}:8080" in _sep_dnat(mode_lab, chains[-1])
        else:
            assert chains[:2] == ["kube-proxy nat-prerouting", "services"]
            assert chains[2].startswith("service-") and "default/web/tcp/http" in chains[2]
            assert chains[-1].startswith("endpoint-") and chains[-1].endswith(f"__{ep['ip']}/8080")
        (undo,) = changes(w["reply_walk"], "un-dnat")
        assert undo["text"].endswith(f"{ep['ip']}:8080 -> {vip}:80") and undo["where"] == "node1"
        assert w["reply_walk"][-1]["src"] == f"{vip}:80"
    assert seen <= {"default/web-0", "default/web-1", "default/web-2"}


def test_node_port_from_external(mode_lab: ProbeLab) -> None:
    node2 = next(n["ip"].split("/")[0] for n in mode_lab.status()["nodes"] if n["name"] == "node2")
    d = mode_lab.probe("external", f"{node2}:30080")
    (w,) = d["walks"]
    assert d["destination"]["kind"] == "nodeport"
    assert w["verdict"] == "answered" and w["endpoint"]["pod"] == w["answered_by"]
    assert hops(w["request"])[:3] == [("external/eth0", "out"), ("underlay/br0", "in"), ("node2/eth0", "in")]
    (dnat,) = changes(w["request"], "dnat")
    assert dnat["where"] == "node2" and dnat["text"].startswith(f"DNAT {node2}:30080 -> ")
    assert any("NODEPORTS" in c or c.startswith("external-") for c in dnat["chains"])
    (snat,) = changes(w["request"], "snat")
    assert snat["where"] == "node2" and snat["text"].startswith("SNAT (masquerade) 172.18.0.254:")
    assert w["reply_walk"][-1]["hop"] == "external/eth0" and w["reply_walk"][-1]["src"] == f"{node2}:30080"


def test_service_without_endpoints_ends_at_the_node_with_the_reject_rule_named(mode_lab: ProbeLab) -> None:
    mode = mode_lab.spec["cluster"]["proxyMode"]
    d = mode_lab.probe("c1", "empty")
    (w,) = d["walks"]
    assert d["destination"]["candidates"] == []
    assert w["verdict"] == "rejected" and w["reply"] == "port-unreachable"
    assert w["stopped_at"] == "node1/cni0"
    assert w["reason"].startswith("Service default/empty has no endpoints; rejected at node node1 by ")
    (drop,) = [r for r in w["rules"] if r["verdict"] == "drop"]
    assert drop["node"] == "node1"
    if mode == "iptables":
        assert drop["rule"].startswith("-A KUBE-SERVICES ") and '"default/empty has no endpoints"' in drop["rule"]
        assert "-j REJECT" in drop["rule"] and "-j REJECT" in w["reason"]
    else:
        assert drop["chains"][-1] == "reject-chain" and drop["rule"] == "reject"
        assert "reject-chain" in w["reason"]


def test_no_listener_rst_comes_back(ipt: ProbeLab) -> None:
    (w,) = ipt.probe("c1", "web-0:9999")["walks"]
    assert (w["verdict"], w["reply"], w["answered_by"]) == ("refused", "RST", "default/web-0")
    assert w["reason"] == f"no listener on default/web-0 {pod_ip(ipt, 'web-0')}:9999: its kernel answered RST"
    assert w["reply_walk"][-1]["hop"] == "default/c1/eth0"


def test_udp_and_icmp(ipt: ProbeLab) -> None:
    (w,) = ipt.probe("c1", "web:53")["walks"]
    assert w["verdict"] == "answered" and w["reply"] == "UDP reply" and w["endpoint"]["pod"] == w["answered_by"]
    (w,) = ipt.probe("c1", "web-1", "--proto", "icmp")["walks"]
    assert w["verdict"] == "answered" and w["reply"] == "echo-reply"


def test_arp_failure_is_named(ipt: ProbeLab) -> None:
    (w,) = ipt.probe("c1", "192.0.2.1:80", "--timeout", "0.5")["walks"]
    assert w["verdict"] == "lost"
    assert w["reason"] == "ARP failure: who-has 172.18.0.1 on node1/eth0 got no answer"


def test_host_gw_has_no_encapsulation_and_legacy_uses_counters(labs: Callable[[str], ProbeLab]) -> None:
    lab = labs("hgw")
    (w,) = lab.probe("a1", "b1:8080")["walks"]
    assert w["verdict"] == "answered"
    assert ("underlay/br0", "in") in hops(w["request"])
    assert not any("vxlan" in o for o in w["request"] + w["reply_walk"])
    assert not changes(w["request"], "encap")
    assert next(o for o in w["request"] if o["hop"] == "underlay/br0")["summary"].startswith("TCP ")
    d = lab.probe("a1", "web:80")
    assert d["tracer"]["node1"] == "counters"
    (w,) = d["walks"]
    (dnat,) = changes(w["request"], "dnat")
    assert dnat["chains"][:3] == ["counters", "nat PREROUTING", "KUBE-SERVICES"]
    assert any(c.startswith("KUBE-SEP-") for c in dnat["chains"])
    assert dnat["chains"][-1] == f"DNAT {pod_ip(lab, 'b1')}:8080"


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (apt install tshark)")
def test_pcapng_opens_in_tshark_one_interface_per_hop(ipt: ProbeLab, tmp_path: Path) -> None:
    pcap = tmp_path / "svc.pcapng"
    d = ipt.probe("c1", "web:80", "--count", "3", "--pcap", str(pcap))
    expected = sum(len(w["request"]) + len(w["reply_walk"]) for w in d["walks"]) + d["pcap"]["arp_frames"]
    assert d["pcap"]["frames"] == expected
    r = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.interface_name", "-e", "frame.comment"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert len(rows) == expected
    walked = {o["hop"] for w in d["walks"] for o in w["request"] + w["reply_walk"]}
    assert {n for n, _ in rows if _ != "ARP"} == walked
    from netlab.probe.pcapng import read

    names, _ = read(pcap.read_bytes())
    assert names == [h["hop"] for h in d["hops"]]  # one interface block per hop, in path order
    cap = subprocess.run(["capinfos", "-I", str(pcap)], capture_output=True, text=True)
    if cap.returncode == 0:
        assert f"Number of interfaces in file: {len(d['hops'])}" in cap.stdout


def _trace_tables(lab: ProbeLab) -> list[str]:
    from netlab.probe.tracer import installed_tables

    return [t for node in ("node1", "node2") for t in installed_tables(lab.ns(node))]


def test_no_socket_thread_or_trace_table_left(ipt: ProbeLab) -> None:
    from netlab.probe import run

    run.probe(ipt.name, "c1", "web:80")  # warm up: imports open what they keep open
    fds = sorted(os.listdir("/proc/self/fd"))
    threads = set(threading.enumerate())
    res = run.probe(ipt.name, "c1", "web:80", count=2)
    assert all(w.verdict == "answered" for w in res.walks)
    res = run.probe(ipt.name, "c1", "192.0.2.1:80", timeout=0.2)
    assert res.walks[0].verdict == "lost"
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert set(threading.enumerate()) == threads
    assert _trace_tables(ipt) == []


def test_ctrl_c_during_a_probe_removes_the_trace_tables(ipt: ProbeLab) -> None:
    proc = subprocess.Popen(
        [*_entry(), "probe", "--lab", ipt.name, "c1", "192.0.2.1:80", "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 15
        while not _trace_tables(ipt):
            assert time.monotonic() < deadline, "the probe never installed its trace table"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert _trace_tables(ipt) == []


def test_probe_on_a_lab_being_torn_down_fails_clearly(ipt: ProbeLab) -> None:
    from netlab.kernel.rules_state import STATE_DIR

    # `netlab down` holds the lab's lock while it removes the namespaces
    with open(STATE_DIR / f".{ipt.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            r = ipt.run("probe", "c1", "web:80")
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"error: lab '{ipt.name}' is being changed or torn down by another netlab command right now; "
        "probe it when that command has finished"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["c1", "nope:80"], "has no pod or Service 'nope'"),
        (["nope", "web:80"], "has no pod or node 'nope'"),
        (["c1", "web:81"], "Service default/web has no port 81; it has 80/TCP (http), 53/UDP (dns)"),
        (["c1", "web"], "Service default/web has more than one port"),
    ],
)
def test_errors_are_one_sentence(ipt: ProbeLab, args: list[str], message: str) -> None:
    r = ipt.run("probe", *args)
    assert r.returncode == 1 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unknown_lab(ipt: ProbeLab) -> None:
    r = subprocess.run([*_entry(), "probe", "--lab", "tdeadbeef", "a", "b"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "no lab named 'tdeadbeef' is up" in r.stderr


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (apt install tshark)")
def test_capture_stops_on_ctrl_c_with_a_valid_file(ipt: ProbeLab, tmp_path: Path) -> None:
    pcap = tmp_path / "cap.pcapng"
    proc = subprocess.Popen(
        [*_entry(), "capture", "--lab", ipt.name, "node1/cni0", "node1/flannel.1", "underlay/br0", "c1",
         "--pcap", str(pcap)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("capturing on node1/cni0, node1/flannel.1, underlay/br0, c1/eth0"), line
        ipt.exec("c1", "ping", "-c", "3", "-i", "0.2", pod_ip(ipt, "web-1"))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped by interrupt" in out
    r = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan", "-T", "fields", "-e", "frame.interface_name",
         "-e", "icmp.type"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    pings = [n for n, t in rows if t in ("8", "0", "8,8", "0,0")]
    # 3 requests and 3 replies on each of the 4 interfaces (the underlay carries them in VXLAN)
    for name in ("node1/cni0", "node1/flannel.1", "underlay/br0", "c1/eth0"):
        assert pings.count(name) == 6, (name, rows)
