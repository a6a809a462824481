"""Shared fixtures.

Conventions for tests (the address plan every test uses unless it says otherwise):
  pods      10.244.0.0/16, one /24 per node in node order (node1 10.244.0.0/24, node2 10.244.1.0/24)
  nodes     172.18.0.0/24 on the underlay, from .2 in node order
  services  10.96.0.0/12 (reserved for the services work)
Kernel tests (marked `root`) each build their own lab named `t<8 hex>` and remove it; the
session ends by checking that no test lab, link or process is left and that the host's root
namespace (links, addresses, routes, iptables, nftables) is exactly as it was.

Fault hooks used by the tests (read by netlab.lab.apply, never set in normal use):
  NETLAB_FAULT_KILL_AFTER=N   SIGKILL the `up` process right after step N
  NETLAB_FAULT_FAIL_AFTER=N   raise a KernelError right after step N (exercises rollback)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
NETLAB = [sys.executable, "-c", "from netlab.cli import main; main()"]
IS_ROOT = os.geteuid() == 0
TEST_LAB = re.compile(r"^t[0-9a-f]{6,8}(-|$)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (run the suite with sudo scripts/test)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def _sh(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return f"<{cmd[0]} not installed>"
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.stdout + r.stderr


def host_snapshot() -> dict[str, str]:
    """The host root namespace as the kernel shows it (no counters, no timestamps)."""
    return {
        "links": _sh(["ip", "-o", "link", "show"]),
        "addrs": _sh(["ip", "-o", "addr", "show"]),
        "routes": _sh(["ip", "route", "show", "table", "all"]),
        "iptables": "\n".join(x for x in _sh(["iptables-save"]).splitlines() if not x.startswith("#")),
        "nft": _sh(["nft", "list", "ruleset"]),
    }


def netlab_netns() -> dict[str, str]:
    from netlab.kernel import observe

    return {ns: m[0] for ns, m in observe.lab_netns().items()}


def responder_pids() -> set[int]:
    out = set()
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if b"netlab.responder" in Path(f"/proc/{e}/cmdline").read_bytes():
                    out.add(int(e))
            except OSError:
                pass
    return out


@pytest.fixture(scope="session", autouse=True)
def sealed_host(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the session if the tests changed the host or left netlab objects behind."""
    if not IS_ROOT:
        yield
        return
    before = host_snapshot()
    ns_before = set(netlab_netns())
    procs_before = responder_pids()
    yield
    # only the tests' own labs (t<hex>...): a lab someone else brings up meanwhile is not a leak
    leftovers = {ns: lab for ns, lab in netlab_netns().items() if ns not in ns_before and TEST_LAB.match(lab)}
    procs = responder_pids() - procs_before
    after = host_snapshot()
    changed = [k for k in before if before[k] != after[k]]
    problems = []
    if leftovers:
        problems.append(f"netlab namespaces left behind: {leftovers}")
    if procs:
        problems.append(f"responder processes left behind: {sorted(procs)}")
    if changed:
        problems.append(f"the host root namespace changed: {changed}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


class Lab:
    """A uniquely named lab built from a topology dict through the real CLI."""

    def __init__(self, tmp: Path, spec: dict[str, Any]) -> None:
        self.name = spec.setdefault("name", "t" + uuid.uuid4().hex[:8])
        self.file = tmp / f"{self.name}.yaml"
        self.write(spec)

    def write(self, spec: dict[str, Any]) -> None:
        import yaml

        spec["name"] = self.name
        self.spec = spec
        self.file.write_text(yaml.safe_dump(spec))

    def netlab(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*NETLAB, *args],
            capture_output=True,
            text=True,
            input=input,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"netlab {' '.join(args)} exited {r.returncode}: {r.stderr}{r.stdout}")
        return r

    def up(self, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.netlab("up", str(self.file), **kw)

    def down(self) -> None:
        self.netlab("down", self.name)

    def status(self) -> dict[str, Any]:
        return json.loads(self.netlab("status", self.name, "-o", "json").stdout)["labs"][0]  # type: ignore[no-any-return]

    def exec(
        self, target: str, *cmd: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.netlab("exec", "--lab", self.name, target, "--", *cmd, check=check, input=input)

    def pod_ip(self, name: str) -> str:
        return next(p["ip"] for p in self.status()["pods"] if p["name"] == name)  # type: ignore[no-any-return]

    def netns(self) -> dict[str, str]:
        return {ns: lab for ns, lab in netlab_netns().items() if lab == self.name}


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Lab]]:
    labs: list[Lab] = []

    def factory(spec: dict[str, Any]) -> Lab:
        lab = Lab(tmp_path, spec)
        labs.append(lab)
        return lab

    yield factory
    for lab in labs:
        subprocess.run([*NETLAB, "down", lab.name], capture_output=True, cwd=REPO)


def two_nodes(overlay: str = "vxlan") -> dict[str, Any]:
    return {
        "cluster": {"overlay": overlay},
        "nodes": [{"name": "node1"}, {"name": "node2"}],
        "pods": [
            {"name": "a1", "node": "node1"},
            {"name": "a2", "node": "node1", "serve": [8080]},
            {"name": "b1", "node": "node2", "serve": [8080, "5353/udp"]},
        ],
    }
