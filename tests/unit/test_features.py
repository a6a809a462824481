"""Kernel feature probing: what a user is told when the kernel lacks something."""

from __future__ import annotations

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
