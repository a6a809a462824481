"""netlab.compare.run without root: arguments, the VM tier's command and the merge of its JSON."""

from __future__ import annotations

import json

import pytest

from netlab.compare import run
from netlab.compare.measure import CompareError


def test_parse_modes_and_sizes() -> None:
    assert run.parse_modes("iptables, nftables,iptables") == ("iptables", "nftables")
    assert run.parse_sizes("5000,100,1000") == (100, 1000, 5000)
    with pytest.raises(CompareError, match="use one or more of iptables, ipvs, nftables"):
        run.parse_modes("iptables,bpf")
    with pytest.raises(CompareError, match="two or more service counts"):
        run.parse_sizes("1000")
    with pytest.raises(CompareError, match="not a list of numbers"):
        run.parse_sizes("1k,2k")


def test_default_lab_fits_a_lab_name() -> None:
    assert run.default_lab("services") == "cmp-services"
    assert len(run.default_lab("x" * 40)) <= 32


def test_vm_argv_runs_the_standalone_entry_with_json_out() -> None:
    opts = run.Options(modes=("iptables", "ipvs"), sizes=(100, 1000), connections=50)
    argv = run.vm_argv("topologies/services.yaml", opts, "cmp-services")
    i = argv.index("vm")
    assert argv[i + 1 : i + 4] == ["--memory", "3G", "--"]
    inner = argv[argv.index("--") + 1 :]
    assert inner[:3] == ["python", "-m", "netlab.cli_compare"]
    assert inner[inner.index("--modes") + 1] == "ipvs"
    assert inner[inner.index("--services") + 1] == "100,1000"
    assert inner[-2:] == ["-o", "json"]
    assert inner[inner.index("--out") + 1].startswith("/tmp/")  # the guest writes to RAM only


def test_extract_json_finds_the_document_among_console_noise() -> None:
    doc = {"kind": run.KIND, "runs": []}
    stdout = "booting...\n{not json\n" + json.dumps(doc) + "\nnetlab vm: exit 0\n"
    assert run.extract_json(stdout) == doc
    assert run.extract_json("nothing here\n") is None


def test_merge_vm_adds_the_ipvs_column() -> None:
    data: dict = {"columns": {"iptables": {"status": "measured", "where": "host"}}, "runs": [{"mode": "iptables"}]}
    inner = {"columns": {"ipvs": {"status": "measured", "where": "host"}}, "runs": [{"mode": "ipvs", "where": "host"}]}
    run.merge_vm(data, inner, "measured in the VM tier (qemu TCG, 300 s)")
    assert data["runs"][-1] == {"mode": "ipvs", "where": "vm"}
    assert data["columns"]["ipvs"]["status"] == "measured" and data["columns"]["ipvs"]["where"] == "vm"


def test_merge_vm_reports_a_skip_or_a_failure() -> None:
    data: dict = {"columns": {}, "runs": []}
    run.merge_vm(data, None, "skipped: this kernel has no IPVS and the VM tier is not available: no vng")
    assert data["columns"]["ipvs"] == {
        "status": "skipped",
        "reason": "skipped: this kernel has no IPVS and the VM tier is not available: no vng",
    }
    run.merge_vm(data, None, "failed in the VM (exit 1 after 40 s): boom")
    assert data["columns"]["ipvs"]["status"] == "failed"
    run.merge_vm(data, {"columns": {"ipvs": {"status": "failed", "reason": "proxy.sync: no ipvs"}}, "runs": []}, "x")
    assert data["columns"]["ipvs"] == {"status": "failed", "reason": "proxy.sync: no ipvs"}
