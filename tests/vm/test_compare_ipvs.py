"""`netlab compare`'s IPVS column, measured where it can be: on a kernel with IPVS (the VM tier).

On the host the ipvs column runs as `netlab vm -- python -m netlab.cli_compare ... --modes ipvs`
and is merged back; this runs that same command inside the VM, as the host's compare would,
and checks what it returns: the IPVS objects counted from the kernel, the programming and
latency runs, the distribution per scheduler, and the behaviour rows where IPVS differs from
iptables (a ping answered by the node, unknown port refused, internalTrafficPolicy Local without
a local endpoint refused rather than dropped, a service without endpoints refused by IPVS itself
rather than by a REJECT rule).
Small on purpose (10 and 30 services, 40 connections): everything here is emulated.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONNECTIONS = 40
SIZES = [10, 30]
BACKENDS = {"web-0", "web-1", "web-2"}
TOPOLOGY = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "deployments": [{"name": "web", "replicas": 3, "serve": [8080]}],
    "services": [{"name": "web", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}],
}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("compare-ipvs")
    lab = "t" + uuid.uuid4().hex[:8]
    topo = tmp / "small.yaml"
    topo.write_text(yaml.safe_dump({"name": "small", **TOPOLOGY}))
    # the arguments the host's compare passes into the VM (netlab/compare/run.py, _vm_argv)
    argv = [
        sys.executable, "-m", "netlab.cli_compare", str(topo), "--modes", "ipvs",
        "--services", ",".join(map(str, SIZES)), "--connections", str(CONNECTIONS),
        "--out", str(tmp / "out"), "--lab", lab, "--no-plots", "-o", "json",
    ]  # fmt: skip
    try:
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=2400)
        assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
        yield json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([sys.executable, "-c", "from netlab.cli import main; main()", "down", lab], capture_output=True)


def test_the_column_is_measured_here(result: dict[str, Any]) -> None:
    assert result["host_has_ipvs"] is True
    assert result["columns"] == {"ipvs": {"status": "measured", "where": "host"}}
    assert result["ok"] is True, result["problems"]


def test_objects_programming_and_latency(result: dict[str, Any]) -> None:
    runs = {r["requested"]: r for r in result["runs"]}
    assert set(runs) == set(SIZES)
    for n, r in runs.items():
        assert r["mode"] == "ipvs" and r["services"] == n and r["problems"] == []
        o = r["objects"]["node1"]
        # one virtual server per ClusterIP:port, plus one per node address for each NodePort
        assert o["ipvs_virtual_servers"] >= n and o["kube_ipvs0_addresses"] >= n
        assert o["ipvs_real_servers"] >= 3 * (n - 4)  # all but the few special services have 3 backends
        p = r["programming"]
        assert p["full_median_s"] > 0 and p["change_median_s"] > 0
        lat = r["latency"]
        assert lat["fails"] == 0
        for key in ("first", "last", "direct"):
            t = lat["targets"][key]
            assert t["n"] == CONNECTIONS and t["replies"] == ["cmp-echo"]
            assert 0 < t["p50_us"] <= t["p99_us"]


def test_distribution_per_scheduler(result: dict[str, Any]) -> None:
    dist = result["distribution"]
    schedulers = [d["scheduler"] for d in dist]
    assert schedulers[0] == "rr (cluster default)" and {"rr", "wrr", "lc", "sh"} <= set(schedulers)
    for d in dist:
        assert set(d["counts"]) <= BACKENDS and sum(d["counts"].values()) == CONNECTIONS and not d["other"]
        if d["scheduler"] in ("rr (cluster default)", "rr", "wrr"):
            # round robin over 3 equal real servers: as even as 40 connections allow
            assert sorted(d["counts"].values()) == [13, 13, 14]
        if d["scheduler"] == "sh":  # source hashing: one client, one backend
            assert len([v for v in d["counts"].values() if v]) == 1


EXPECTED = {
    "noep": "refused",  # by IPVS itself (ICMP port unreachable from ip_vs_leave), not by a REJECT rule
    "ping": "port-unreachable",  # kube-ipvs0 holds the ClusterIP: the node answers, KUBE-IPVS-FILTER rejects
    "unknown-port": "refused",  # KUBE-IPVS-FILTER
    "local": "refused",  # internalTrafficPolicy Local: no local endpoint, no real server (no fallback)
    "hairpin": "answered",
    "nodeport:node1": "answered",
    "nodeport:node2": "answered",
}


@pytest.mark.parametrize("row", sorted(EXPECTED))
def test_behaviour_rows(result: dict[str, Any], row: str) -> None:
    (b,) = [b for b in result["behaviour"] if b["id"] == row]
    assert b["mode"] == "ipvs" and b["outcome"] == EXPECTED[row] and b["pass"] is True, b
    if b["outcome"] == "refused":
        assert b["ms"] < 1000  # answered at once, not a timeout
