"""`netlab compare` end to end on the host kernel: a small compare (iptables and nftables,
10 and 50 services, 40 connections per target) through the standalone entry, as a user runs
it, then its JSON, report and plots. One run for the module (about 30 s).

The behaviour rows are asserted outcome by outcome: what kube-proxy's iptables and nftables
modes do, from real traffic (tests/kernel/test_services.py proves the same rules one by one).
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
from conftest import REPO, netlab_netns

pytestmark = pytest.mark.root

PNG = b"\x89PNG\r\n\x1a\n"
CONNECTIONS = 40
SIZES = [10, 50]
MODES = ["iptables", "nftables"]
BACKENDS = {"web-0", "web-1", "web-2"}

TOPOLOGY = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "deployments": [{"name": "web", "replicas": 3, "serve": [8080]}],
    "services": [{"name": "web", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}],
}


def compare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netlab.cli_compare", *args], capture_output=True, text=True, cwd=REPO, timeout=900
    )


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path, str]]:
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("compare")
    lab = "t" + uuid.uuid4().hex[:8]
    topo = tmp / "small.yaml"
    topo.write_text(yaml.safe_dump({"name": "small", **TOPOLOGY}))
    out = tmp / "out"
    try:
        r = compare(
            str(topo), "--modes", ",".join(MODES), "--services", ",".join(map(str, SIZES)),
            "--connections", str(CONNECTIONS), "--out", str(out), "--lab", lab, "-o", "json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
        yield json.loads(r.stdout.strip().splitlines()[-1]), out, lab
    finally:
        subprocess.run([sys.executable, "-c", "from netlab.cli import main; main()", "down", lab], capture_output=True)


def test_the_lab_is_gone_afterwards(result: tuple[dict[str, Any], Path, str]) -> None:
    _, _, lab = result
    assert lab not in netlab_netns().values()


def test_structure(result: tuple[dict[str, Any], Path, str]) -> None:
    data, _, _ = result
    assert data["kind"] == "netlab-compare" and data["ok"] is True, data["problems"]
    assert data["modes"] == MODES and data["sizes"] == SIZES
    assert data["columns"] == {m: {"status": "measured", "where": "host"} for m in MODES}
    assert data["setup"]["measured_service"] == "default/web" and set(data["setup"]["backends"]) == BACKENDS
    runs = {(r["mode"], r["requested"]): r for r in data["runs"]}
    assert set(runs) == {(m, n) for m in MODES for n in SIZES}
    for (mode, n), r in runs.items():
        assert r["services"] == n and r["where"] == "host" and r["problems"] == []
        assert set(r["objects"]) == {"node1", "node2"}
        p = r["programming"]
        assert p["node"] == "node1" and p["full_median_s"] > 0 and p["change_median_s"] > 0 and len(p["change_s"]) == 4
        lat = r["latency"]
        assert lat["fails"] == 0 and lat["fifo"] is True
        for key in ("first", "last", "direct"):
            t = lat["targets"][key]
            assert t["n"] == CONNECTIONS and len(t["samples_us"]) == CONNECTIONS
            assert 0 < t["p50_us"] <= t["p99_us"] < 500_000
            assert t["replies"] == ["cmp-echo"]  # one endpoint: the path differs only by position
            assert t["conntrack_entries"] >= CONNECTIONS  # every connection a new flow through the nat rules
        o = r["objects"]["node1"]
        if mode == "iptables":
            # a ClusterIP rule per service port with a usable endpoint on this node: all but the
            # no-endpoint service (filter REJECT) and the Local one without a local endpoint (filter DROP)
            assert o["kube_services_rules"] == n - 2 == lat["clusterip_rules"]
            assert (lat["targets"]["first"]["position"], lat["targets"]["last"]["position"]) == (1, n - 2)
            assert o["iptables_rules"] > o["kube_services_rules"] and o["iptables_chains"] > n
        else:
            assert o["nft_map_elements"] >= n - 2 and o["nft_set_elements"] >= n and o["nft_chains"] > n
    for mode in MODES:
        s = data["slopes"][mode]
        for key in ("latency_last_p50", "latency_first_p50", "latency_last_minus_first_p50", "latency_last_p99"):
            assert isinstance(s[key]["us_per_1000"], float) and len(s[key]["ci95"]) == 2
        assert "s_per_1000" in s["full"] and "ms_per_1000" in s["change"]
        assert data["shape"][mode]["latency"] in ("grows", "flat", "unclear")


def test_distribution_with_chi_square(result: tuple[dict[str, Any], Path, str]) -> None:
    data, _, _ = result
    assert [d["mode"] for d in data["distribution"]] == MODES
    for d in data["distribution"]:
        assert set(d["counts"]) == BACKENDS and sum(d["counts"].values()) == CONNECTIONS and not d["other"]
        assert d["df"] == 2 and 0 <= d["p"] <= 1 and d["chi2"] >= 0


EXPECTED = {
    # (row id) -> outcome in iptables mode, outcome in nftables mode
    "noep": ("refused", "refused"),  # REJECT: refused at once, in both
    "ping": ("no-reply", "port-unreachable"),  # no ClusterIP answers ping; nftables' cluster-ips-check rejects
    "unknown-port": ("timeout", "refused"),  # iptables: no rule, sent towards a gateway nobody answers
    "local": ("timeout", "timeout"),  # no local endpoint: dropped
    "hairpin": ("answered", "answered"),
    "nodeport:node1": ("answered", "answered"),
    "nodeport:node2": ("answered", "answered"),
}


@pytest.mark.parametrize("row", sorted(EXPECTED))
def test_behaviour_rows(result: tuple[dict[str, Any], Path, str], row: str) -> None:
    data, _, _ = result
    got = {b["mode"]: b for b in data["behaviour"] if b["id"] == row}
    assert set(got) == set(MODES)
    for mode, outcome in zip(MODES, EXPECTED[row], strict=True):
        b = got[mode]
        assert b["outcome"] == outcome, (mode, b)
        assert b["pass"] is True, (mode, b)
        if row == "hairpin":
            assert b["by"] == "cmp-echo"
        if row.startswith("nodeport"):
            assert b["by"] in BACKENDS
        if outcome == "refused":
            assert b["ms"] < 500  # a REJECT answers at once; a DROP would run into the 2 s timeout


def test_report_and_plots(result: tuple[dict[str, Any], Path, str]) -> None:
    data, out, _ = result
    saved = json.loads((out / "report.json").read_text())
    assert saved["runs"] == data["runs"]
    md = (out / "report.md").read_text()
    assert "## Headline" in md and "## Behaviour (real traffic)" in md
    assert "| service without endpoints: connect | refused" in md
    for name in ("latency", "programming", "distribution"):
        blob = (out / f"{name}.png").read_bytes()
        assert blob.startswith(PNG) and len(blob) > 10_000, name
        assert f"![{name}]({name}.png)" in md
    meta = data["plot_meta"]
    assert meta["latency"] == {"lines": 2 * 2 * len(MODES), "axes": 2}  # p50 and p99 panels, first and last per mode
    assert meta["programming"] == {"lines": 2 * len(MODES), "axes": 2}
    assert meta["distribution"] == {"bars": 3 * len(MODES), "panels": len(MODES)}


def test_ipvs_without_ipvs_and_without_the_vm_is_skipped_with_the_reason(tmp_path: Path) -> None:
    from netlab.kernel import features

    if features.has_ipvs():
        pytest.skip("this kernel has IPVS: the ipvs column would be measured here")
    topo = tmp_path / "small.yaml"
    topo.write_text(yaml.safe_dump({"name": "small", **TOPOLOGY}))
    r = compare(
        str(topo), "--modes", "ipvs", "--services", "10,20", "--no-vm", "--out", str(tmp_path / "o"), "-o", "json"
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert data["host_has_ipvs"] is False and data["runs"] == []
    assert data["columns"]["ipvs"] == {"status": "skipped", "reason": "skipped: this kernel has no IPVS (--no-vm)"}
    assert "**ipvs**: skipped" in (tmp_path / "o" / "report.md").read_text()
