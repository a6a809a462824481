"""The VM tier works before any IPVS code does: the guest kernel has IPVS (found the way
netlab finds it), every scheduler kube-proxy may name is loaded, ipvsadm programs a virtual
server in a network namespace, a dummy link (kube-ipvs0) can be made, and netlab's state
directory is writable."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from netlab import vm
from netlab.kernel import features


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"nl-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_the_probe_finds_ipvs_and_the_kernel_agrees() -> None:
    assert features.has_ipvs()
    assert Path("/proc/net/ip_vs").exists()  # ip_vs is loaded: its /proc file says so


def test_netlab_vm_loaded_every_module_a_lab_needs() -> None:
    builtin = Path(f"/lib/modules/{Path('/proc/sys/kernel/osrelease').read_text().strip()}/modules.builtin")
    built_in = builtin.read_text() if builtin.exists() else ""
    missing = [m for m in vm.GUEST_MODULES if not Path(f"/sys/module/{m}").exists() and f"/{m}.ko" not in built_in]
    assert not missing


def test_ipvsadm_programs_a_virtual_server_in_a_netns(netns: str) -> None:
    # a namespace's routing tables exist once lo is up: without them every real server
    # address is "not unicast" to IPVS (EINVAL)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)

    def ipvsadm(*args: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", netns, "ipvsadm", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    ipvsadm("-A", "-t", "10.96.0.10:80", "-s", "rr")
    ipvsadm("-a", "-t", "10.96.0.10:80", "-r", "10.244.0.2:8080", "-m")
    out = ipvsadm("-Ln")
    assert "TCP  10.96.0.10:80 rr" in out
    assert "-> 10.244.0.2:8080" in out and "Masq" in out


def test_a_dummy_link_takes_a_service_ip(netns: str) -> None:
    with IPRoute(netns=netns) as ipr:
        ipr.link("add", ifname="kube-ipvs0", kind="dummy")
        (idx,) = ipr.link_lookup(ifname="kube-ipvs0")
        ipr.addr("add", index=idx, address="10.96.0.10", prefixlen=32)
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)]
    assert addrs == ["10.96.0.10"]


def test_netlab_state_dir_is_writable() -> None:
    probe = Path("/run/netlab") / f".t-{uuid.uuid4().hex[:8]}"
    probe.write_text("x")
    probe.unlink()


def test_a_new_namespace_holds_only_lo(netns: str) -> None:
    # what netlab's pod build relies on (eth0 becomes ifindex 2); a preloaded ipip, sit or gre
    # module would add its fallback tunnel to every namespace
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
