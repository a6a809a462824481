"""pcapng, written block by block: one Interface Description Block per hop, named like the hop
(`node1/cni0`, `underlay/br0`), then the frames as Enhanced Packet Blocks with their capture
timestamps (nanoseconds) and direction. Wireshark and tshark show the interface of every frame.

The writer streams: the section header and every interface block first, then each frame as it
comes, so a capture stopped by Ctrl-C is a valid file up to its last frame. Pure (a file
object in, bytes out); `read` is the inverse, for tests.

Format: https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["LINKTYPE_ETHERNET", "PcapngWriter", "ReadFrame", "read"]

SHB = 0x0A0D0D0A
IDB = 0x00000001
EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_ETHERNET = 1
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
EPB_FLAGS = 2
SNAPLEN = 262144


def _opt(code: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def _opts(opts: list[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    return b"".join(_opt(c, v) for c, v in opts) + struct.pack("<HH", OPT_ENDOFOPT, 0)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


class PcapngWriter:
    """Write one section: `interface()` for each hop, then `frame()`s, then `close()`."""

    def __init__(self, f: BinaryIO, application: str = "netlab") -> None:
        self.f = f
        self.interfaces: list[str] = []
        self.frames = 0
        body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _opts([(SHB_USERAPPL, application.encode())])
        self.f.write(_block(SHB, body))

    def interface(self, name: str, description: str = "", linktype: int = LINKTYPE_ETHERNET) -> int:
        """Add an interface; returns its id (the order of the blocks)."""
        if self.frames:
            raise ValueError("pcapng: interfaces must come before the first frame here")
        opts = [(IF_NAME, name.encode())]
        if description:
            opts.append((IF_DESCRIPTION, description.encode()))
        opts.append((IF_TSRESOL, bytes([9])))  # timestamps in nanoseconds
        body = struct.pack("<HHI", linktype, 0, SNAPLEN) + _opts(opts)
        self.f.write(_block(IDB, body))
        self.interfaces.append(name)
        return len(self.interfaces) - 1

    def frame(
        self, interface: int, ts_ns: int, data: bytes, *, outgoing: bool | None = None, comment: str = ""
    ) -> None:
        if not 0 <= interface < len(self.interfaces):
            raise ValueError(f"pcapng: no interface {interface}")
        opts: list[tuple[int, bytes]] = []
        if outgoing is not None:
            # epb_flags bits 0-1: direction, 01 inbound, 10 outbound
            opts.append((EPB_FLAGS, struct.pack("<I", 2 if outgoing else 1)))
        if comment:
            opts.append((OPT_COMMENT, comment.encode()))
        cap = data[:SNAPLEN]
        body = (
            struct.pack("<IIIII", interface, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF, len(cap), len(data))
            + cap
            + b"\0" * ((-len(cap)) % 4)
            + _opts(opts)
        )
        self.f.write(_block(EPB, body))
        self.frames += 1

    def flush(self) -> None:
        self.f.flush()


@dataclass(frozen=True)
class ReadFrame:
    interface: str
    ts_ns: int
    data: bytes
    outgoing: bool | None
    comment: str


def _parse_opts(buf: bytes) -> list[tuple[int, bytes]]:
    out = []
    off = 0
    while off + 4 <= len(buf):
        code, ln = struct.unpack_from("<HH", buf, off)
        if code == OPT_ENDOFOPT:
            break
        out.append((code, buf[off + 4 : off + 4 + ln]))
        off += 4 + ln + ((-ln) % 4)
    return out


def read(data: bytes) -> tuple[list[str], list[ReadFrame]]:
    """(interface names, frames) of a little-endian pcapng written by PcapngWriter."""
    names: list[str] = []
    resol: list[int] = []
    frames: list[ReadFrame] = []
    off = 0
    while off + 12 <= len(data):
        btype, total = struct.unpack_from("<II", data, off)
        body = data[off + 8 : off + total - 4]
        if btype == SHB:
            (magic,) = struct.unpack_from("<I", body, 0)
            if magic != BYTE_ORDER_MAGIC:
                raise ValueError("pcapng: not little-endian or not a section header")
        elif btype == IDB:
            opts = dict(_parse_opts(body[8:]))
            names.append(opts.get(IF_NAME, b"").decode())
            tsres = opts.get(IF_TSRESOL, bytes([6]))[0]
            resol.append(10**tsres)
        elif btype == EPB:
            iface, hi, lo, caplen, _orig = struct.unpack_from("<IIIII", body, 0)
            pkt = body[20 : 20 + caplen]
            opts = dict(_parse_opts(body[20 + caplen + ((-caplen) % 4) :]))
            ticks = (hi << 32) | lo
            ts_ns = ticks * 1_000_000_000 // resol[iface]
            flags = opts.get(EPB_FLAGS)
            outgoing = None
            if flags is not None:
                d = struct.unpack("<I", flags)[0] & 3
                outgoing = True if d == 2 else False if d == 1 else None
            frames.append(ReadFrame(names[iface], ts_ns, pkt, outgoing, opts.get(OPT_COMMENT, b"").decode()))
        if total < 12:
            raise ValueError("pcapng: bad block length")
        off += total
    return names, frames
