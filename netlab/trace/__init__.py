"""Offline packet tracers: walk one new connection through rendered kube-proxy rules, no kernel.

Each tracer interprets only the rule shapes its renderer emits (kube-proxy's own test style,
`nftablesTracer` / `iptablesTracer` in pkg/proxy) and raises on anything else, so a renderer
change that the tracer does not understand fails loudly instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TraceResult"]


@dataclass(frozen=True)
class TraceResult:
    """Where a new connection ends up.

    endpoints: None when no rule touched the packet (it passes as sent). Otherwise every
      reachable outcome without repeats, delivered packets first in rule order, then refusals:
      "ip:port" for a DNAT to an endpoint
      (random endpoint choice is traced down every branch, so all endpoints appear),
      "REJECT" or "DROP" for a packet the rules refuse, and "ACCEPT" for a branch that passed
      untouched while another branch did not (a broken endpoint choice shows up this way).
    masq: the packet is masqueraded (SNAT to the node) on at least one branch that is not refused.
    matched: the rules that matched, in order (for error messages and debugging).
    """

    endpoints: list[str] | None
    masq: bool
    matched: tuple[str, ...] = ()
