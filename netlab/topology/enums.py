"""The topology's enumerations, apart from the pydantic schema.

The kernel-side code and the state record (a pickle of the last RulesPlan per node) need only
these, so commands such as `netlab probe` do not pay for importing pydantic (~0.45 s).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["IpvsScheduler", "Overlay", "Protocol", "ProxyMode", "SessionAffinity", "TrafficPolicy"]


class Overlay(StrEnum):
    VXLAN = "vxlan"
    HOST_GW = "host-gw"


class ProxyMode(StrEnum):
    IPTABLES = "iptables"
    NFTABLES = "nftables"
    IPVS = "ipvs"


class IpvsScheduler(StrEnum):
    """IPVS schedulers kube-proxy's IPVS mode can use (`--ipvs-scheduler`; kernel module ip_vs_<name>)."""

    RR = "rr"  # round robin (kube-proxy's default)
    WRR = "wrr"  # weighted round robin
    LC = "lc"  # least connections
    WLC = "wlc"  # weighted least connections
    SH = "sh"  # source hashing
    DH = "dh"  # destination hashing
    SED = "sed"  # shortest expected delay
    NQ = "nq"  # never queue
    MH = "mh"  # maglev hashing (kube-proxy also sets the source-hash flag for it)


class Protocol(StrEnum):
    """Service and responder protocols (kube-proxy writes them lower-case in rules)."""

    TCP = "TCP"
    UDP = "UDP"


class TrafficPolicy(StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class SessionAffinity(StrEnum):
    NONE = "None"
    CLIENT_IP = "ClientIP"
