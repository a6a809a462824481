"""rules.while_tools_run: the sync's side work runs while a tool runs, or at the end."""

from __future__ import annotations

import threading
import time

import pytest

from netlab.kernel import rules


def test_work_runs_at_the_end_when_no_tool_ran() -> None:
    seen: list[str] = []
    with rules.while_tools_run(lambda: seen.append(threading.current_thread().name) or 42) as fut:
        assert not fut.done()
    assert fut.result() == 42 and seen == [threading.current_thread().name]


@pytest.mark.root
def test_work_starts_once_when_a_tool_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def work() -> int:
        calls.append(threading.current_thread().name)
        time.sleep(0.05)
        return 7

    monkeypatch.setattr(rules.netns, "path", lambda ns: "/proc/self/ns/net")
    with rules.while_tools_run(work) as fut:
        rules.run("any", ["true"])
        rules.run("any", ["true"])
    assert fut.result() == 7 and calls == ["netlab-idle-work"]


def test_an_error_in_the_work_reaches_the_reader() -> None:
    with rules.while_tools_run(lambda: 1 / 0) as fut:
        pass
    with pytest.raises(ZeroDivisionError):
        fut.result()
