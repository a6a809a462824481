"""`netlab plan` needs no root: every shipped topology plans, in table and JSON form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from netlab.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "topologies").glob("*.yaml")), ids=lambda p: p.name)
def test_plan_prints_every_step(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)  # plan against nothing, as a user would
    r = CliRunner().invoke(main, ["plan", str(path)])
    assert r.exit_code == 0, r.output
    assert "create underlay" in r.output and "sync node" in r.output
    r = CliRunner().invoke(main, ["plan", str(path), "-o", "json"])
    assert r.exit_code == 0, r.output
    kinds = {s["kind"] for s in json.loads(r.output)["steps"]}
    assert {"CreateUnderlay", "CreateExternal", "CreateNode", "SyncRules"} <= kinds


def test_services_plan_names_the_rules_it_will_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    r = CliRunner().invoke(main, ["plan", str(REPO / "topologies" / "services.yaml")])
    assert "~ sync node node1 iptables rules" in r.output
    assert "iptables (full sync): 6 service ports, 15 endpoints" in r.output
