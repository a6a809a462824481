"""Kernel feature probing: what a user is told when the kernel lacks something."""

from __future__ import annotations

from pathlib import Path

import pytest

from netlab.errors import FeatureError
from netlab.kernel import features


def test_missing_features_are_named_with_how_detected_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(need_vxlan: bool, out: list[str]) -> None:
        out.append(
            "vxlan: creating a vxlan link in a scratch namespace failed (Operation not supported); "
            "run `modprobe vxlan` or set cluster.overlay: host-gw"
        )

    monkeypatch.setattr(features, "_probe", probe)
    with pytest.raises(FeatureError) as info:
        features.check(vxlan=True)
    msg = str(info.value)
    assert msg.startswith("this kernel lacks what the lab needs: vxlan:")
    assert "scratch namespace" in msg and "modprobe vxlan" in msg and "host-gw" in msg
    assert info.value.exit_code == 3


@pytest.mark.root
def test_this_kernel_has_what_a_lab_needs() -> None:
    features.check(vxlan=True)  # the development kernel: netns, veth, bridge, vxlan, br_netfilter


def test_ipvs_missing_names_the_probe_and_the_vm_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "_probe", lambda need_vxlan, out: None)
    monkeypatch.setattr(features, "has_ipvs", lambda: False)
    with pytest.raises(FeatureError) as info:
        features.check(vxlan=True, ipvs=True, file="topologies/services.yaml")
    assert str(info.value) == (
        "this kernel lacks what the lab needs: ipvs: cluster.proxyMode: ipvs in topologies/services.yaml needs "
        'IPVS, and this kernel has none (asked in a scratch namespace for the generic netlink family "IPVS": not '
        "registered, and the kernel could not load ip_vs); run the same on a real distro kernel in a VM with "
        "`netlab vm -- netlab up topologies/services.yaml` (a lab there lives only as long as the command, so "
        "chain what you want to see, e.g. `netlab vm -- sh -c 'netlab up topologies/services.yaml && netlab "
        "status'`), or use iptables or nftables here"
    )
    assert info.value.exit_code == 3


def test_the_vm_command_in_the_message_survives_odd_file_names() -> None:
    msg = features.ipvs_missing("my labs/it's.yaml")
    assert "`netlab vm -- netlab up 'my labs/it'\"'\"'s.yaml'`" in msg


def test_ipvs_is_only_probed_for_ipvs_labs(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> bool:
        raise AssertionError("probed IPVS for an iptables lab")

    monkeypatch.setattr(features, "_probe", lambda need_vxlan, out: None)
    monkeypatch.setattr(features, "has_ipvs", fail)
    features.check(vxlan=True, ipvs=False)


@pytest.mark.root
def test_the_ipvs_probe_agrees_with_the_kernel() -> None:
    # Asking for the family loads ip_vs where it can be loaded; once loaded, /proc/net/ip_vs
    # exists. The development kernel has neither (False); the VM's Debian kernel has both.
    assert features.has_ipvs() == Path("/proc/net/ip_vs").exists()


@pytest.mark.root
def test_up_in_ipvs_mode_without_ipvs_stops_before_building_with_the_vm_command(tmp_path: Path) -> None:
    if features.has_ipvs():
        pytest.skip("this kernel has IPVS: the refusal cannot happen here (tests/vm covers IPVS kernels)")
    from conftest import Lab, netlab_netns

    lab = Lab(tmp_path, {"cluster": {"proxyMode": "ipvs"}, "nodes": [{"name": "node1"}]})
    before = netlab_netns()
    r = lab.up(check=False)
    assert r.returncode == 3
    assert " ".join(r.stderr.split()) == (
        f"error: {features.ipvs_missing(str(lab.file)).join(['this kernel lacks what the lab needs: ', ''])}"
    )
    assert netlab_netns() == before
