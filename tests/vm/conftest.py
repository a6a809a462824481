"""The VM tier: tests that need a kernel with IPVS (and dummy, ipip, netem), which the
development machines lack. They run in a real distro kernel through `netlab vm`:

    sudo .venv/bin/netlab vm -- pytest tests/vm        # or scripts/test, which does it in its VM step

Every test here is marked `vm` (and `root`). Where the kernel has no IPVS (asked the way
netlab asks: the generic netlink family "IPVS"), they are skipped with that reason; a host
whose kernel has IPVS (a stock Debian/Ubuntu VM) runs them natively.

NETLAB_VM_STRICT=1 (set by scripts/test's VM step) turns every skip of the session, here or
in any other directory it runs, into a failure: in the VM a skip means the kernel or the
guest lacks something the suite exists to prove.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _why_not_here() -> str | None:
    if os.geteuid() != 0:
        return (
            "needs root and a kernel with IPVS: run `sudo .venv/bin/netlab vm -- pytest tests/vm` (scripts/test does)"
        )
    from netlab.kernel import features

    if not features.has_ipvs():
        return (
            'this kernel has no IPVS (the generic netlink family "IPVS" is not registered and ip_vs cannot be '
            "loaded): run `sudo .venv/bin/netlab vm -- pytest tests/vm` (scripts/test does)"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in item.path.resolve().parents]
    if not mine:
        return
    reason = _why_not_here()
    for item in mine:
        item.add_marker(pytest.mark.vm)
        item.add_marker(pytest.mark.root)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


class SkipsFail:
    """NETLAB_VM_STRICT=1: a skipped test fails the session (exit status 1)."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append(f"{report.nodeid}: {reason}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.skipped:
            terminalreporter.section("NETLAB_VM_STRICT: skipped tests fail this run", sep="=", red=True)
            for line in self.skipped:
                terminalreporter.line(line)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("NETLAB_VM_STRICT") == "1" and not config.pluginmanager.has_plugin("netlab-vm-strict"):
        config.pluginmanager.register(SkipsFail(), "netlab-vm-strict")
