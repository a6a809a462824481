"""Packet walks: `netlab probe` (one probe, hop by hop, with NAT and the rule path) and
`netlab capture` (any set of hops into one pcapng).

    path.py       SRC/DST -> the hops a probe can take (pure)
    packet.py     a small dissector (pure)
    correlate.py  captured frames -> walks, with what changed at each hop (pure)
    nftrace.py    nftables trace events from netlink -> chain paths (pure)
    pcapng.py     one interface block per hop (pure)
    view.py capture.py tracer.py inject.py run.py   the kernel side
"""

from __future__ import annotations

__all__ = ["capture", "probe"]


def __getattr__(name: str) -> object:
    # import the kernel side (pyroute2, scapy) only when it is used
    if name in __all__:
        from netlab.probe import run

        return getattr(run, name)
    raise AttributeError(name)
