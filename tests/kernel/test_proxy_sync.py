"""kube-proxy's sync behaviour on a running lab: partial sync, stale chains, mode switches."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from conftest import Lab
from test_services import CLIENT

import netlab.topology  # noqa: F401  (first: netlab.render.model imports back into netlab.topology)
from netlab.kernel import netns as kns
from netlab.plan.model import RulesPlan
from netlab.render.model import Endpoint, NodeContext, ServicePort
from netlab.topology.schema import Protocol, ProxyMode

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


def _rule_counters(save: str, needle: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\[(\d+):\d+\] (.*)$", save, re.M) if needle in m.group(2)]


def test_partial_sync_rewrites_only_the_changed_service(make_lab: Any) -> None:
    from netlab.render.iptables import service_chain

    lab = make_lab(spec())
    lab.up()
    assert set(_hit(lab, "api")) == {"api-0", "api-1"}
    api_chain = service_chain("default/api", "tcp")
    before = _chain_counters(_save(lab), api_chain)
    assert sum(before) >= 10, "traffic to api was counted"

    kube_services = _rule_counters(_save(lab), '--comment "default/api cluster IP"')
    assert kube_services and sum(kube_services) >= 10
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
    # nor was KUBE-SERVICES (an endpoint change leaves the top-level chains out of the payload)
    assert _rule_counters(after, '--comment "default/api cluster IP"') == kube_services
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


# --- iptables: whole-table full sync and cleanup, partial sync from the plans --------------------

CTX = NodeContext("node1", (IPv4Address("172.18.0.2"),), IPv4Network("10.244.0.0/16"), (IPv4Network("10.96.0.0/12"),))
BACKENDS = ["auto", "legacy"]


def _ep(ip: str, node: str = "node2", port: int = 8080) -> Endpoint:
    return Endpoint(IPv4Address(ip), port, node)


def _svc(name: str, vip: str, *eps: Endpoint, **kw: Any) -> ServicePort:
    return ServicePort("default", name, "", Protocol.TCP, IPv4Address(vip), 80, endpoints=eps, **kw)


# every kind of service the renderer writes: NodePort, affinity, Local policies, no endpoints
BASE = [
    _svc("web", "10.96.0.10", _ep("10.244.0.2", "node1"), _ep("10.244.1.2"), _ep("10.244.1.3"), node_port=30080),
    _svc("api", "10.96.0.11", _ep("10.244.1.4"), _ep("10.244.1.5")),
    _svc("db", "10.96.0.12", _ep("10.244.1.6"), affinity_timeout=10800),
    _svc("local", "10.96.0.13", _ep("10.244.0.3", "node1"), _ep("10.244.1.7"), internal_local=True),
    _svc("etp", "10.96.0.14", _ep("10.244.0.4", "node1"), _ep("10.244.1.8"), node_port=30090, external_local=True),
    _svc("empty", "10.96.0.15"),
]


def _plan(services: list[ServicePort], backend: str) -> RulesPlan:
    return RulesPlan(ProxyMode.IPTABLES, backend, CTX, tuple(services))


@contextlib.contextmanager
def _scratch_netns(tag: str) -> Iterator[str]:
    ns = f"nl-ipt{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def _state(ns: str, backend: str) -> str:
    """filter and nat as `iptables-save` prints them, counters aside."""
    from netlab.kernel import rules

    out, keep = [], False
    for line in rules.iptables_save(ns, rules.IptablesTool(backend)).splitlines():
        if line.startswith("*"):
            keep = line in ("*filter", "*nat")
        if keep and not line.startswith("#"):
            out.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return "\n".join(out)


@pytest.fixture
def restores(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, str]]:
    """(noflush, payload) of every iptables-restore the sync runs."""
    from netlab.kernel import rules

    seen: list[tuple[bool, str]] = []
    apply = rules.apply_iptables

    def spy(ns: str, tool: rules.IptablesTool, payload: str | Iterator[str], *, noflush: bool = True) -> None:
        if isinstance(payload, str):
            seen.append((noflush, payload))
            apply(ns, tool, payload, noflush=noflush)
            return
        pieces: list[str] = []  # a streamed render: still streamed, recorded as it goes

        def tee() -> Iterator[str]:
            for piece in payload:
                pieces.append(piece)
                yield piece

        apply(ns, tool, tee(), noflush=noflush)
        seen.append((noflush, "".join(pieces)))

    monkeypatch.setattr(rules, "apply_iptables", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_table_sync_and_cleanup_equal_kube_proxys_noflush_path(
    backend: str, restores: list[tuple[bool, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node with only kube-proxy's rules is synced and cleaned with whole-table restores; the
    tables end exactly as kube-proxy's --noflush restore + one-by-one jumps leave them."""
    from netlab.kernel import proxy

    rp = _plan(BASE, backend)
    with _scratch_netns("a") as a, _scratch_netns("b") as b:
        with monkeypatch.context() as m:  # a: kube-proxy's path, forced
            m.setattr(proxy, "_only_kube_proxy", lambda *_: False)
            proxy._sync_iptables(a, rp, None)  # fresh node: restore + jumps in one batch
            want = _state(a, backend)
            proxy._sync_iptables(a, rp, None)  # over the synced node: restore + ensure_jumps
            assert _state(a, backend) == want
        assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in want
        assert "-j REJECT" in want and "-m recent" in want and "KUBE-SVL-" in want
        assert all(noflush for noflush, _ in restores)

        restores.clear()
        proxy._sync_iptables(b, rp, None)  # fresh node
        assert [noflush for noflush, _ in restores] == [False] and _state(b, backend) == want
        proxy._sync_iptables(b, rp, None)  # over a node synced this way
        proxy._sync_iptables(a, rp, None)  # ... and over one synced kube-proxy's way
        assert [noflush for noflush, _ in restores] == [False] * 3
        assert _state(b, backend) == want and _state(a, backend) == want

        restores.clear()
        proxy.cleanup(b, "iptables", previous_backend=backend)
        assert [noflush for noflush, _ in restores] == [False]
        with monkeypatch.context() as m:
            m.setattr(proxy, "_only_kube_proxy", lambda *_: False)
            proxy.cleanup(a, "iptables", previous_backend=backend)
        assert _state(b, backend) == _state(a, backend) and "KUBE-" not in _state(b, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_users_own_rules_survive_sync_and_cleanup(backend: str, restores: list[tuple[bool, str]]) -> None:
    from netlab.kernel import proxy, rules

    tool = rules.IptablesTool(backend)
    mine = [
        ["-t", "filter", "-N", "MY-CHAIN"],
        ["-t", "filter", "-A", "INPUT", "-s", "192.0.2.1", "-j", "MY-CHAIN"],
        ["-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "RETURN"],
    ]
    with _scratch_netns("u") as ns:
        for argv in mine:
            rules.run(ns, [tool.iptables, "-w", "5", *argv])
        user = _state(ns, backend).splitlines()
        proxy._sync_iptables(ns, _plan(BASE, backend), None)
        assert all(noflush for noflush, _ in restores), "a whole-table restore would drop the user's rules"
        synced = _state(ns, backend)
        assert all(line in synced.splitlines() for line in user) and "-j KUBE-SERVICES" in synced
        proxy.cleanup(ns, "iptables", previous_backend=backend)
        assert _state(ns, backend).splitlines() == user


def _changed(services: list[ServicePort], name: str, **kw: Any) -> list[ServicePort]:
    return [replace(s, **kw) if s.name == name else s for s in services]


def _steps() -> list[tuple[str, list[ServicePort]]]:
    """(what changes, the services after it), each step from the one before."""
    web, api, _db, _local, etp, _empty = BASE
    cache = _svc("cache", "10.96.0.16", _ep("10.244.1.9"))
    big = _svc("big", "10.96.0.99", *[_ep(f"10.244.{2 + i // 250}.{i % 250 + 1}") for i in range(1001)])
    one_less = _changed(BASE, "web", endpoints=web.endpoints[:2])
    now = [s for s in one_less if s.name != "db"] + [cache]
    node_port = _changed(now, "web", node_port=30081)
    return [
        ("an endpoint goes", one_less),
        ("a service is added", [*one_less, cache]),
        ("a service is removed", now),
        ("a service loses all its endpoints (REJECT)", _changed(now, "api", endpoints=())),
        ("... and gets them back", now),
        ("a NodePort changes", node_port),
        ("Local policy, the local endpoint goes (DROP)", _changed(node_port, "etp", endpoints=etp.endpoints[1:])),
        ("the cluster becomes large (full sync)", [*node_port, big]),
        ("an endpoint changes in a large cluster", [*_changed(node_port, "api", endpoints=api.endpoints[:1]), big]),
        ("the cluster is small again (full sync)", node_port),
        ("no change", node_port),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_syncs_end_where_a_full_sync_does(backend: str, restores: list[tuple[bool, str]]) -> None:
    """Each partial sync (changed services only, stale chains from the plans, unchanged top-level
    chains left out) leaves filter and nat byte-identical to a full sync of the same plan."""
    from netlab.kernel import proxy

    prev = _plan(BASE, backend)
    with _scratch_netns("p") as ns, _scratch_netns("f") as ref:
        proxy._sync_iptables(ns, prev, None)
        for what, services in _steps():
            rp = _plan(services, backend)
            restores.clear()
            proxy._sync_iptables(ns, rp, pickle.loads(pickle.dumps(prev)))  # as the state file gives it
            partial = list(restores)
            proxy._sync_iptables(ref, rp, None)
            assert _state(ns, backend) == _state(ref, backend), what
            if what == "an endpoint goes":
                ((noflush, payload),) = partial
                assert noflush and "KUBE-SERVICES" not in payload and "*filter" not in payload, payload
                assert len(payload.splitlines()) < 20
            if what == "no change":
                assert partial == []
            if "full sync" in what:
                assert [noflush for noflush, _ in partial] == [False]
            prev = rp


def test_switching_iptables_backend_removes_the_other_backends_rules(make_lab: Any) -> None:
    def backend_spec(backend: str) -> dict[str, Any]:
        s = spec(replicas=2)
        s["cluster"]["iptablesBackend"] = backend
        s["services"] = [{**s["services"][0], "name": f"s{i}"} for i in range(10)]
        return s

    def save(ns: str, tool: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, tool], capture_output=True, text=True, check=True).stdout

    lab = make_lab(backend_spec("auto"))
    lab.up()
    for backend, tool, other in (("legacy", "iptables-legacy-save", "iptables-nft-save"),
                                 ("auto", "iptables-nft-save", "iptables-legacy-save")):  # fmt: skip
        lab.write(backend_spec(backend))
        lab.up()
        for node in ("node1", "node2"):
            ns = f"nl-{lab.name}-{node}"
            assert "KUBE-" not in save(ns, other), f"{other} still holds kube-proxy's rules on {node}"
            assert save(ns, tool).count("-A KUBE-SERVICES ") == 11  # 10 ClusterIPs + the NodePort tail
        assert set(_hit(lab, "s9", 10)) == {"web-0", "web-1"}
        assert "no change" in lab.up().stdout


def _nat(ns: str, backend: str) -> str:
    """The nat table alone out of `_state` (iptables-save's table order differs per backend)."""
    text = _state(ns, backend)
    return text[text.index("*nat") :].split("COMMIT", 1)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_streamed_restore_commits_all_or_nothing(backend: str) -> None:
    """The full sync writes its render to iptables-restore piece by piece. A line the kernel
    refuses in a late piece fails the restore with that line shown, and a render that raises
    halfway kills the tool: in both cases the nat table, whose COMMIT never came, is what it was
    before (each table is its own transaction: filter, committed first, may have changed)."""
    from netlab.errors import KernelError
    from netlab.kernel import rules
    from netlab.render.iptables import iter_render_iptables

    tool = rules.IptablesTool(backend)
    rp = _plan(BASE, backend)
    with _scratch_netns("s") as ns:
        rules.apply_iptables(ns, tool, iter_render_iptables(rp.context, rp.services, whole_tables=True), noflush=False)
        before = _nat(ns, backend)
        assert "-j KUBE-SERVICES" in before and "KUBE-SEP-" in before

        pieces = list(iter_render_iptables(rp.context, rp.services[:1], whole_tables=True))
        bad = [*pieces[:-1], "-A KUBE-SERVICES -j NO-SUCH-CHAIN\n", pieces[-1]]
        with pytest.raises(KernelError) as exc:
            rules.apply_iptables(ns, tool, iter(bad), noflush=False)
        assert "NO-SUCH-CHAIN" in str(exc.value)  # the refused line, with its neighbours
        assert _nat(ns, backend) == before

        def broken() -> Iterator[str]:
            yield from pieces[:-1]
            raise RuntimeError("render failed halfway")

        with pytest.raises(RuntimeError, match="halfway"):
            rules.apply_iptables(ns, tool, broken(), noflush=False)
        assert _nat(ns, backend) == before
