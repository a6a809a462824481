"""nftables trace parsing (netlink messages -> events -> chain paths), rule text lookup, and
the iptables-legacy counter fallback (pure)."""

from __future__ import annotations

import struct

from scapy.layers.inet import IP, TCP

from netlab.probe.nftrace import (
    TraceEvent,
    chain_path,
    handles_by_chain,
    iptables_rule_text,
    nft_rule_text,
    parse_messages,
    trace_table_script,
)
from netlab.probe.run import counter_path
from netlab.probe.tracer import counter_deltas, stale_tables


def nla(typ: int, payload: bytes, nested: bool = False) -> bytes:
    ln = 4 + len(payload)
    return struct.pack("=HH", ln, typ | (0x8000 if nested else 0)) + payload + b"\0" * ((-ln) % 4)


def trace_msg(table: str, chain: str, typ: int, verdict: int, target: str | None = None, *, hdr: bytes = b"",
              handle: int | None = None, trace_id: int = 0xABCD) -> bytes:  # fmt: skip
    v = nla(1, struct.pack("!i", verdict)) + (nla(2, target.encode() + b"\0") if target else b"")
    attrs = (
        nla(1, table.encode() + b"\0")
        + nla(2, chain.encode() + b"\0")
        + (nla(3, struct.pack("!Q", handle)) if handle is not None else b"")
        + nla(4, struct.pack("!I", typ))
        + nla(5, v, nested=True)
        + nla(6, struct.pack("!I", trace_id))
        + (nla(8, hdr[:20]) + nla(9, hdr[20:40]) if hdr else b"")
    )
    body = struct.pack("=BBH", 2, 0, 0) + attrs
    return struct.pack("=LHHLL", 16 + len(body), (10 << 8) | 17, 0, 0, 0) + body


def test_parse_netlink_trace_messages() -> None:
    hdr = bytes(IP(src="10.244.0.2", dst="10.96.0.10", id=777) / TCP(sport=40000, dport=80, seq=5, flags="S"))
    data = (
        trace_msg("nat", "PREROUTING", 3, -3, "KUBE-SERVICES", hdr=hdr, handle=9)
        + trace_msg("nat", "KUBE-SEP-X", 3, 1, handle=12)
        + trace_msg("filter", "FORWARD", 1, 1)
    )
    evs = parse_messages(data)
    assert [(e.table, e.chain, e.type, e.verdict, e.target, e.handle) for e in evs] == [
        ("nat", "PREROUTING", "rule", "jump", "KUBE-SERVICES", 9),
        ("nat", "KUBE-SEP-X", "rule", "accept", None, 12),
        ("filter", "FORWARD", "policy", "accept", None, None),
    ]
    p = evs[0].packet
    assert p is not None and (p.ident, str(p.dst), p.dport) == (777, "10.96.0.10", 80)
    assert evs[0].trace_id == 0xABCD


def ev(table: str, chain: str, typ: str, verdict: str, target: str | None = None) -> TraceEvent:
    return TraceEvent(1, 2, table, chain, typ, verdict, target)


def test_chain_path_follows_jumps_returns_and_base_chains() -> None:
    events = [
        ev("netlab-trace-1", "prerouting", "policy", "accept"),
        ev("nat", "PREROUTING", "rule", "jump", "KUBE-SERVICES"),
        ev("nat", "KUBE-SERVICES", "rule", "jump", "KUBE-SVC-A"),
        ev("nat", "KUBE-SVC-A", "rule", "jump", "KUBE-MARK-MASQ"),
        ev("nat", "KUBE-MARK-MASQ", "rule", "continue"),
        ev("nat", "KUBE-SVC-A", "rule", "jump", "KUBE-SEP-B"),  # back in KUBE-SVC-A: an implicit return
        ev("nat", "KUBE-SEP-B", "rule", "accept"),
        ev("filter", "FORWARD", "rule", "jump", "KUBE-FORWARD"),
        ev("filter", "KUBE-FORWARD", "rule", "continue"),
        ev("filter", "FORWARD", "policy", "accept"),
        ev("nat", "OUTPUT", "rule", "jump", "KUBE-SERVICES"),
        ev("nat", "OUTPUT", "policy", "accept"),
        ev("filter", "OUTPUT", "rule", "jump", "KUBE-FIREWALL"),  # same hook name, another table
        ev("filter", "OUTPUT", "policy", "accept"),
    ]
    paths = chain_path(events, skip_tables=("netlab-trace-1",))
    assert [p.text() for p in paths] == [
        "nat PREROUTING -> KUBE-SERVICES -> KUBE-SVC-A -> KUBE-MARK-MASQ -> KUBE-SEP-B (accept)",
        "filter FORWARD -> KUBE-FORWARD (accept)",
        "nat OUTPUT -> KUBE-SERVICES (accept)",
        "filter OUTPUT -> KUBE-FIREWALL (accept)",
    ]
    nft = chain_path(
        [
            ev("kube-proxy", "filter-forward", "rule", "jump", "service-endpoints-check"),
            ev("kube-proxy", "service-endpoints-check", "rule", "goto", "reject-chain"),
            ev("kube-proxy", "reject-chain", "rule", "drop"),
        ]
    )
    assert nft[0].text() == "kube-proxy filter-forward -> service-endpoints-check -> reject-chain (drop)"
    assert nft[0].last is not None and nft[0].last.chain == "reject-chain"


NFT_LISTING = """table ip filter { # handle 1
\tchain FORWARD { # handle 2
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state new  counter packets 1 bytes 60 jump KUBE-SERVICES # handle 21
\t}

\tchain KUBE-SERVICES { # handle 4
\t\tmeta l4proto tcp ip daddr 10.96.0.12  tcp dport 80 counter packets 1 bytes 60 reject # handle 11
\t\tmeta l4proto udp ip daddr 10.96.0.13  udp dport 53 counter packets 0 bytes 0 reject # handle 15
\t}
}
"""
SAVE = """*filter
:KUBE-SERVICES - [0:0]
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.12/32 -p tcp -m comment --comment "default/empty has no endpoints" -j REJECT
-A KUBE-SERVICES -d 10.96.0.13/32 -p udp -m comment --comment "default/dns has no endpoints" -m udp --dport 53 -j REJECT
COMMIT
"""


def test_rule_text_by_handle() -> None:
    assert handles_by_chain(NFT_LISTING)["KUBE-SERVICES"][1][0] == 15
    assert nft_rule_text(NFT_LISTING, "KUBE-SERVICES", 11) == (
        "meta l4proto tcp ip daddr 10.96.0.12  tcp dport 80 counter packets 1 bytes 60 reject"
    )
    assert iptables_rule_text(NFT_LISTING, SAVE, "KUBE-SERVICES", 15) == (
        '-A KUBE-SERVICES -d 10.96.0.13/32 -p udp -m comment --comment "default/dns has no endpoints" '
        "-m udp --dport 53 -j REJECT"
    )
    assert iptables_rule_text(NFT_LISTING, SAVE, "KUBE-SERVICES", 99) is None


def test_trace_table_marks_only_the_probes() -> None:
    text = trace_table_script("netlab-trace-42", [5, 3, 5], 0x6E6C7472)
    assert "table ip netlab-trace-42 {" in text
    assert "type filter hook prerouting priority -160; policy accept;" in text
    assert "type filter hook output priority -160; policy accept;" in text
    assert "ip id { 3, 5 } ct mark set 0x6e6c7472 meta nftrace set 1" in text
    assert "ct mark 0x6e6c7472 meta nftrace set 1" in text


def test_stale_tables_are_those_of_dead_probes() -> None:
    import os

    assert stale_tables([f"netlab-trace-{os.getpid()}", "netlab-trace-999999999", "kube-proxy", "filter"]) == [
        "netlab-trace-999999999"
    ]


def test_legacy_counters() -> None:
    before = "*nat\n[0:0] -A PREROUTING -j KUBE-SERVICES\n[3:180] -A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-A\n"
    after = (
        "*nat\n[1:60] -A PREROUTING -j KUBE-SERVICES\n[4:240] -A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-A\n"
        "[1:60] -A KUBE-SVC-A -j KUBE-SEP-B\n[0:0] -A KUBE-SVC-A -j KUBE-SEP-C\n"
        "[1:60] -A KUBE-SEP-B -p tcp -j DNAT --to-destination 10.244.1.2:8080\n"
        "*filter\n[1:60] -A KUBE-SERVICES -d 10.96.0.12/32 -j REJECT\n"
    )
    moved = counter_deltas(before, after)
    assert (1, "nat -A KUBE-SVC-A -j KUBE-SEP-B") in moved
    assert (1, "filter -A KUBE-SERVICES -d 10.96.0.12/32 -j REJECT") in moved
    assert all("KUBE-SEP-C" not in r for _, r in moved)
    assert counter_path([r for _, r in moved]) == [
        "nat PREROUTING",
        "KUBE-SERVICES",
        "KUBE-SVC-A",
        "KUBE-SEP-B",
        "DNAT 10.244.1.2:8080",
    ]
