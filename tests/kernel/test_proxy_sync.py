"""kube-proxy's sync behaviour on a running lab: partial sync, stale chains, mode switches."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
from conftest import Lab
from test_services import CLIENT

from netlab.kernel import netns as kns

pytestmark = pytest.mark.root


def spec(mode: str = "iptables", replicas: int = 3) -> dict[str, Any]:
    return {
        "cluster": {"proxyMode": mode},
        "nodes": [{"name": "node1"}, {"name": "node2"}],
        "deployments": [
            {"name": "web", "replicas": replicas, "serve": [8080]},
            {"name": "api", "replicas": 2, "serve": [8080]},
        ],
        "pods": [{"name": "c1", "node": "node1"}],
        "services": [
            {"name": "web", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
            {"name": "api", "selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": 8080}]},
        ],
    }


def _vip(lab: Lab, name: str) -> str:
    return next(s["clusterIP"] for s in lab.status()["services"] if s["name"] == name)  # type: ignore[no-any-return]


def _hit(lab: Lab, name: str, count: int = 10) -> dict[str, int]:
    r = lab.exec("c1", sys.executable, "-c", CLIENT, _vip(lab, name), "80", str(count), "tcp")
    return json.loads(r.stdout)["seen"]  # type: ignore[no-any-return]


def _save(lab: Lab, node: str = "node1") -> str:
    return subprocess.run(
        ["ip", "netns", "exec", f"nl-{lab.name}-{node}", "iptables-save", "-c", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _chain_counters(save: str, chain: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(rf"^\[(\d+):\d+\] -A {re.escape(chain)} ", save, re.M)]


def test_partial_sync_rewrites_only_the_changed_service(make_lab: Any) -> None:
    from netlab.render.iptables import service_chain

    lab = make_lab(spec())
    lab.up()
    assert set(_hit(lab, "api")) == {"api-0", "api-1"}
    api_chain = service_chain("default/api", "tcp")
    before = _chain_counters(_save(lab), api_chain)
    assert sum(before) >= 10, "traffic to api was counted"

    lab.write(spec(replicas=2))  # web-2 goes: only web's endpoints change
    plan = json.loads(lab.netlab("plan", str(lab.file), "-o", "json").stdout)
    syncs = [s for s in plan["steps"] if s["kind"] == "SyncRules"]
    assert len(syncs) == 2
    for s in syncs:
        assert "partial sync" in s["objects"][0]
        assert s["objects"][1] == "changed: default/web"
    lab.up()
    after = _save(lab)
    # api's chain was not rewritten: the kernel kept its counters (a rewrite would zero them)
    assert _chain_counters(after, api_chain) == before
    # web-2's endpoint chain is gone (stale chains are deleted), web answers from 2 pods
    assert after.count(":KUBE-SEP-") == 4
    assert set(_hit(lab, "web", 30)) == {"web-0", "web-1"}
    assert "no change" in lab.up().stdout


@pytest.mark.parametrize(("first", "second"), [("iptables", "nftables"), ("nftables", "iptables")])
def test_switching_proxy_mode_keeps_the_pods(make_lab: Any, first: str, second: str) -> None:
    lab = make_lab(spec(first))
    lab.up()
    pods = {ns: kns.inode(ns) for ns in lab.netns() if "-default-" in ns}
    assert set(_hit(lab, "web", 20)) == {"web-0", "web-1", "web-2"}
    lab.write(spec(second))
    lab.up()
    assert {ns: kns.inode(ns) for ns in lab.netns() if "-default-" in ns} == pods, "pods were rebuilt"
    for node in ("node1", "node2"):
        ns = f"nl-{lab.name}-{node}"
        ipt = subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True).stdout
        nft = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True
        ).stdout
        if second == "nftables":
            assert "KUBE-" not in ipt, "iptables leftovers after switching to nftables"
            assert "table ip kube-proxy" in nft
        else:
            assert "table ip kube-proxy" not in nft, "nftables leftovers after switching to iptables"
            assert ":KUBE-SERVICES" in ipt
            assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in ipt
    assert set(_hit(lab, "web", 20)) == {"web-0", "web-1", "web-2"}
    assert "no change" in lab.up().stdout


def test_batched_jump_insert_equals_kube_proxys_ensure_rule() -> None:
    """On a fresh node the jumps go in with one restore; the result must be what kube-proxy's
    one-by-one EnsureRule(Prepend) gives (same rules, same order in every built-in chain)."""
    import os
    from ipaddress import IPv4Address, IPv4Network

    from netlab.kernel import proxy, rules
    from netlab.render.iptables import jump_rules, render_iptables
    from netlab.render.model import NodeContext

    ctx = NodeContext("n", (IPv4Address("172.18.0.2"),), IPv4Network("10.244.0.0/16"))
    tool = rules.IptablesTool("auto")
    saves = []
    for way in ("batch", "ensure"):
        ns = f"nl-jumps-{way}-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            rules.apply_iptables(ns, tool, render_iptables(ctx, []))
            if way == "batch":
                rules.apply_iptables(ns, tool, proxy._insert_payload(jump_rules(ctx)))
            else:
                proxy.ensure_jumps(ns, tool, jump_rules(ctx))
            saves.append([line for line in rules.iptables_save(ns, tool).splitlines() if line.startswith("-A")])
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=True)
    assert saves[0] == saves[1]
    assert any(line.startswith("-A PREROUTING") and "KUBE-SERVICES" in line for line in saves[0])
