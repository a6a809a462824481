"""A host with a tunnel module loaded: every new network namespace then starts with the
module's fallback device (ipip: `tunl0`) at ifindex 2, where a pod's eth0 would go. netlab must
still build working pods. Needs a kernel that can load ipip (the VM tier); the module is removed
again afterwards, so the rest of the session sees namespaces holding only lo.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def ipip() -> Iterator[None]:
    if subprocess.run(["modprobe", "ipip"], capture_output=True).returncode != 0:
        pytest.skip("this kernel cannot load ipip")
    try:
        yield
    finally:
        subprocess.run(["modprobe", "-r", "ipip"], capture_output=True)


def test_pods_work_when_new_namespaces_start_with_a_tunnel_device(
    ipip: None, make_lab: Callable[[dict[str, Any]], Any]
) -> None:
    probe = "nl-tunl-probe"
    subprocess.run(["ip", "netns", "add", probe], check=True)
    try:
        links = subprocess.run(["ip", "-n", probe, "-o", "link"], capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["ip", "netns", "delete", probe], check=True)
    assert "2: tunl0" in links, links  # the situation under test: ifindex 2 is taken

    lab = make_lab(
        {
            "nodes": [{"name": "node1"}],
            "pods": [{"name": "a", "node": "node1"}, {"name": "b", "node": "node1", "serve": [8080]}],
        }
    )
    lab.up()
    for pod in ("a", "b"):
        out = lab.exec(pod, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert lab.pod_ip(pod) in out, out
    code = "import socket,sys; s=socket.create_connection((sys.argv[1], 8080), timeout=10); print('ok')"
    r = lab.exec("a", sys.executable, "-c", code, lab.pod_ip("b"))
    assert r.stdout.strip() == "ok"
