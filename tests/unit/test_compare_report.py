"""netlab.compare.report and .plot on made-up measurements: slopes, the shape verdict, the
markdown, the terminal tables and the PNGs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from netlab.compare import report, run

SIZES = (100, 1000, 5000)
BACKENDS = ("web-0", "web-1", "web-2")


def _target(p50: float, rng: random.Random, n: int = 120) -> dict[str, Any]:
    xs = [p50 + rng.gauss(0, 1.5) for _ in range(n)]
    return {"p50_us": round(sorted(xs)[n // 2], 2), "p99_us": round(max(xs), 2), "n": n, "samples_us": xs}


def _run(mode: str, n: int, per_service_us: float, rng: random.Random, first: bool, where: str = "host") -> dict:
    last = 25 + per_service_us * n
    r: dict[str, Any] = {
        "mode": mode,
        "where": where,
        "requested": n,
        "services": n,
        "service_ports": n + 1,
        "up_s": 1.0,
        "problems": [],
        "objects": {"node1": {"iptables_rules": 11 * n, "iptables_chains": 4 * n, "kube_services_rules": n}}
        if mode == "iptables"
        else {"node1": {"nft_chains": 4 * n, "nft_rules": 8 * n, "nft_set_elements": n, "nft_map_elements": n}},
        "programming": {
            "node": "node1",
            "full_s": [0.0006 * n],
            "full_median_s": 0.0006 * n,
            "change_s": [0.01 + 0.00001 * n] * 4,
            "change_median_s": 0.01 + 0.00001 * n,
        },
        "latency": {
            "fails": 0,
            "fifo": True,
            "clusterip_rules": n,
            "targets": {
                "first": {**_target(25, rng), "position": 1},
                "last": {**_target(last, rng), "position": n},
                "direct": _target(last, rng),
            },
        },
    }
    if first:
        counts = {"web-0": 40, "web-1": 38, "web-2": 42}
        r["distribution"] = [
            {"mode": mode, "scheduler": None, "service": "default/web", "n": 120, "counts": counts, "other": {},
             "chi2": 0.2, "df": 2, "p": 0.9, "uniform": True}
        ]  # fmt: skip
        refused = {
            "id": "noep", "title": "service without endpoints: connect", "mode": mode, "target": "10.96.0.9:80",
            "outcome": "refused", "by": "", "ms": 0.2, "expected": ["refused"], "pass": True, "why": "REJECT",
        }  # fmt: skip
        r["behaviour"] = [refused]
    return r


def make_data(modes: tuple[str, ...] = ("iptables", "nftables"), vm_ipvs: bool = False) -> dict[str, Any]:
    rng = random.Random(7)
    per = {"iptables": 0.016, "nftables": 0.0, "ipvs": 0.0}
    runs = [_run(m, n, per[m], rng, i == 0) for i, n in enumerate(SIZES) for m in modes]
    columns = {m: {"status": "measured", "where": "host"} for m in modes}
    if vm_ipvs:
        runs += [_run("ipvs", n, 0.0, rng, i == 0, where="vm") for i, n in enumerate(SIZES)]
        columns["ipvs"] = {"status": "measured", "where": "vm", "reason": "measured in the VM tier"}
    data = {
        "kind": run.KIND,
        "version": 1,
        "command": "netlab compare topologies/services.yaml",
        "topology": "topologies/services.yaml",
        "machine": {"nproc": 2, "cpu": "test", "memory": "1 GiB", "kernel": "6.18", "python": "3.11", "date": "today"},
        "modes": [*modes] + (["ipvs"] if vm_ipvs else []),
        "sizes": list(SIZES),
        "connections": 120,
        "warmup": 20,
        "fifo": True,
        "setup": {"lab": "cmp-services", "client": "cmp-client on node1"},
        "columns": columns,
        "runs": runs,
        "total_s": 12.0,
    }
    return report.build(data)


def test_slopes_recover_the_made_up_per_service_cost() -> None:
    data = make_data()
    ipt = data["slopes"]["iptables"]
    assert ipt["latency_last_p50"]["us_per_1000"] == pytest.approx(16, abs=1.0)
    lo, hi = ipt["latency_last_minus_first_p50"]["ci95"]
    assert lo > 10 and hi < 22
    assert abs(data["slopes"]["nftables"]["latency_last_p50"]["us_per_1000"]) < 1.0
    assert ipt["full"]["s_per_1000"] == pytest.approx(0.6)
    assert ipt["change"]["ms_per_1000"] == pytest.approx(0.01 * 1000, rel=1e-3)


def test_shape_matches_the_published_one() -> None:
    data = make_data()
    assert data["shape"]["iptables"]["latency"] == "grows"
    assert data["shape"]["nftables"]["latency"] == "flat"
    assert data["shape_holds"] is True
    assert data["ok"] is True


def test_a_flat_iptables_does_not_hold() -> None:
    data = make_data()
    for r in data["runs"]:
        if r["mode"] == "iptables":
            r["latency"]["targets"]["last"] = dict(r["latency"]["targets"]["first"])
    report.build(data)
    assert data["shape"]["iptables"]["latency"] == "flat"
    assert data["shape_holds"] is False
    assert "does not hold" in report.markdown(data)


def test_problems_make_the_run_not_ok() -> None:
    data = make_data()
    data["runs"][0]["problems"] = ["3 connections failed"]
    report.build(data)
    assert data["ok"] is False
    assert "N=100 iptables: 3 connections failed" in data["problems"]
    assert "## Problems" in report.markdown(data)


def test_markdown_has_every_section_and_the_slopes() -> None:
    data = make_data()
    md = report.markdown(data)
    headings = (
        "## Headline", "## First-connection latency (µs)", "## Slopes", "## Programming (client's node)",
        "## Programmed objects per node", "## Load distribution", "## Behaviour (real traffic)",
    )  # fmt: skip
    for heading in headings:
        assert heading in md
    assert "**iptables**" in md and "**grows**" in md and "**flat**" in md
    assert "| service without endpoints: connect | refused (0 ms) ✅ | refused (0 ms) ✅ |" in md
    assert "holds" in md


def test_vm_column_is_said_in_the_markdown() -> None:
    data = make_data(vm_ipvs=True)
    md = report.markdown(data)
    assert "**ipvs**: measured on the real-kernel VM tier" in md
    assert data["shape"]["ipvs"]["latency"] == "flat"


def test_terminal_tables_render() -> None:
    from rich.console import Console

    console = Console(width=200, record=True)
    for t in report.tables(make_data()):
        console.print(t)
    text = console.export_text()
    assert "slopes per 1000 services" in text and "behaviour (real traffic)" in text
    assert "grows (published: grows)" in text


def test_progress_line() -> None:
    r = make_data()["runs"][0]
    assert report.progress_line(r).startswith("N=100 iptables: latency first")


PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_pngs_with_the_expected_lines(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = make_data(vm_ipvs=True)
    files = run.write_outputs(data, tmp_path)
    for name in ("latency", "programming", "distribution"):
        blob = Path(files[name]).read_bytes()
        assert blob.startswith(PNG) and len(blob) > 10_000, name
    meta = data["plot_meta"]
    # 2 panels (p50, p99) x (first + last) per mode: 3 modes -> 12 lines; host and VM rows of panels
    assert meta["latency"] == {"lines": 12, "axes": 4}
    assert meta["programming"] == {"lines": 6, "axes": 4}
    assert meta["distribution"]["panels"] == 3 and meta["distribution"]["bars"] == 9
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["plots"] == {"latency": "latency.png", "programming": "programming.png",
                              "distribution": "distribution.png"}  # fmt: skip
    assert "![latency](latency.png)" in (tmp_path / "report.md").read_text()


def test_a_failed_column_is_a_problem_and_a_skipped_one_is_not() -> None:
    data = make_data()
    data["columns"]["ipvs"] = {"status": "skipped", "reason": "skipped: this kernel has no IPVS (--no-vm)"}
    report.build(data)
    assert data["ok"] is True
    data["columns"]["ipvs"] = {"status": "failed", "reason": "failed in the VM (exit 3 after 103 s): boom"}
    report.build(data)
    assert data["ok"] is False and data["problems"] == ["ipvs: failed in the VM (exit 3 after 103 s): boom"]
