"""The rules tree read from `iptables-save -c` output (the kernel's own listing)."""
# ruff: noqa: E501  (the listing is verbatim iptables-save output)

from __future__ import annotations

from netlab.inspect import iptables_tree

SAVE = """*filter
:KUBE-SERVICES - [0:0]
[3:180] -A KUBE-SERVICES -d 10.96.0.5/32 -p tcp -m comment --comment "default/empty has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAA - [0:0]
:KUBE-SEP-B - [0:0]
:KUBE-SEP-C - [0:0]
[7:420] -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-SVC-AAAA
[0:0] -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
[0:0] -A KUBE-SVC-AAAA ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
[4:240] -A KUBE-SVC-AAAA -m comment --comment "default/web -> 10.244.0.2:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-B
[3:180] -A KUBE-SVC-AAAA -m comment --comment "default/web -> 10.244.0.3:8080" -j KUBE-SEP-C
[4:240] -A KUBE-SEP-B -p tcp -m comment --comment "default/web" -m tcp -j DNAT --to-destination 10.244.0.2:8080
[3:180] -A KUBE-SEP-C -p tcp -m comment --comment "default/web" -m tcp -j DNAT --to-destination 10.244.0.3:8080
COMMIT
"""


def test_tree_follows_services_to_dnat_with_counters_and_probabilities() -> None:
    tree = iptables_tree(SAVE)
    web = tree.entries[0]
    assert (web.target, web.packets) == ("KUBE-SVC-AAAA", 7)
    assert '"default/web cluster IP"' in web.what and "d 10.96.0.10" in web.what
    masq, b, c = web.children
    assert masq.target == "KUBE-MARK-MASQ" and "!s 10.244.0.0/16" in masq.what
    assert (b.target, b.probability, b.packets) == ("KUBE-SEP-B", 0.5, 4)
    assert [h.target for h in b.children] == ["DNAT 10.244.0.2:8080"]
    assert (c.probability, c.children[0].target, c.children[0].packets) == (None, "DNAT 10.244.0.3:8080", 3)
    assert tree.entries[1].target == "KUBE-NODEPORTS"
    (reject,) = tree.rejects
    assert reject.target == "REJECT" and reject.packets == 3 and "has no endpoints" in reject.what
    assert tree.as_dict()["services"][0]["children"][1]["probability"] == 0.5
