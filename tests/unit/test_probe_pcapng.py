"""The pcapng writer: one interface block per hop, nanosecond timestamps, direction; read
back by our reader and, when installed, by tshark."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netlab.probe.pcapng import PcapngWriter, read

FRAME = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.0.0.1", dst="10.0.0.2") / TCP())


def write(f: io.BufferedIOBase | io.BytesIO) -> None:
    w = PcapngWriter(f)  # type: ignore[arg-type]
    assert w.interface("node1/cni0", "cni0 in netns nl-t-node1") == 0
    assert w.interface("underlay/br0") == 1
    w.frame(0, 1_700_000_000_123_456_789, FRAME, outgoing=False, comment="probe 1 request")
    w.frame(1, 1_700_000_000_123_457_000, FRAME + b"x", outgoing=True)
    w.frame(1, 1_700_000_000_123_458_000, FRAME[:14])


def test_roundtrip() -> None:
    buf = io.BytesIO()
    write(buf)
    names, frames = read(buf.getvalue())
    assert names == ["node1/cni0", "underlay/br0"]
    assert [(f.interface, f.ts_ns, f.outgoing, f.comment) for f in frames] == [
        ("node1/cni0", 1_700_000_000_123_456_789, False, "probe 1 request"),
        ("underlay/br0", 1_700_000_000_123_457_000, True, ""),
        ("underlay/br0", 1_700_000_000_123_458_000, None, ""),
    ]
    assert frames[1].data == FRAME + b"x"
    assert len(buf.getvalue()) % 4 == 0


def test_interfaces_first() -> None:
    w = PcapngWriter(io.BytesIO())
    w.interface("a")
    w.frame(0, 1, FRAME)
    with pytest.raises(ValueError):
        w.interface("b")
    with pytest.raises(ValueError):
        w.frame(5, 1, FRAME)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (apt install tshark)")
def test_tshark_reads_it(tmp_path: Path) -> None:
    f = tmp_path / "x.pcapng"
    with open(f, "wb") as fh:
        write(fh)
    r = subprocess.run(
        ["tshark", "-r", str(f), "-T", "fields", "-e", "frame.interface_name", "-e", "frame.time_epoch"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [n for n, _ in rows] == ["node1/cni0", "underlay/br0", "underlay/br0"]
    assert rows[0][1].startswith("1700000000.123456789")
