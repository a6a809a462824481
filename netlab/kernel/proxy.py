"""kube-proxy's sync on one node: render the desired rules, apply them in one transaction.

Like kube-proxy's syncProxyRules: a full sync writes everything (and, for iptables, makes sure
the jumps from the built-in chains exist); a partial sync rewrites only the service chains
whose Service or endpoints changed, and always the top-level chains; chains no longer needed
are deleted in the same transaction. Switching proxyMode first removes the other mode's
objects, as kube-proxy's CleanupLeftovers does.
"""

from __future__ import annotations

import functools

from netlab.kernel import rules, rules_state
from netlab.plan.model import RulesPlan
from netlab.topology.schema import ProxyMode

__all__ = ["cleanup", "sync"]

SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


def _full(rp: RulesPlan, previous: RulesPlan | None) -> bool:
    return previous is None or previous.context != rp.context


def sync(lab: str, node: str, ns: str, rp: RulesPlan, previous: RulesPlan | None, clean: tuple[str, ...]) -> None:
    for mode in clean:
        cleanup(ns, mode, previous_backend=previous.iptables_backend if previous else rp.iptables_backend)
    if rp.mode == ProxyMode.IPTABLES:
        _sync_iptables(ns, rp, previous)
    elif rp.mode == ProxyMode.NFTABLES:
        _sync_nftables(ns, rp, previous)
    else:
        from netlab.errors import FeatureError

        raise FeatureError(f"proxyMode {rp.mode} is not available in this version of netlab; use iptables or nftables")
    rules_state.save(lab, node, rp)


def _sync_iptables(ns: str, rp: RulesPlan, previous: RulesPlan | None) -> None:
    from netlab.render import iptables as render

    tool = rules.IptablesTool(rp.iptables_backend)
    full = _full(rp, previous)
    have = rules.iptables_chains(ns, tool)
    want = render.service_chains(rp.context, rp.services)
    stale = {
        c
        for table, chains in have.items()
        for c in chains - want.get(table, set())
        if c.startswith(SERVICE_CHAIN_PREFIXES)
    }
    only = None
    if not full:
        assert previous is not None
        old = {s.spn: s for s in previous.services}
        new = {s.spn: s for s in rp.services}
        only = {k for k in new if old.get(k) != new[k]}
    rules.apply_iptables(ns, tool, render.render_iptables(rp.context, rp.services, only=only, stale=stale))
    if full:
        # after the restore: a jump can only be inserted once its target chain exists
        jumps = render.jump_rules(rp.context)
        if "KUBE-SERVICES" not in have.get("nat", set()):
            # a node that had none of kube-proxy's chains has none of its jumps either: insert
            # them all in one restore (same `-I 1` order) instead of two iptables runs per jump
            rules.apply_iptables(ns, tool, _insert_payload(jumps))
        else:
            ensure_jumps(ns, tool, jumps)


def _insert_payload(jumps: list[tuple[str, str, list[str]]]) -> str:
    """`iptables-restore --noflush` input that inserts each jump at the top of its chain, in order."""
    lines: list[str] = []
    for table in dict.fromkeys(t for t, _, _ in jumps):
        lines.append(f"*{table}")
        lines += [f"-I {chain} 1 " + " ".join(_quote(a) for a in args) for t, chain, args in jumps if t == table]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg or not arg else arg


def ensure_jumps(ns: str, tool: rules.IptablesTool, jumps: list[tuple[str, str, list[str]]]) -> None:
    """kube-proxy's EnsureRule(Prepend): insert each jump at the top of its built-in chain if an
    identical rule is not there yet (`iptables -C`), so the final order is the list reversed."""
    for table, chain, args in jumps:
        if rules.run(ns, [tool.iptables, "-w", "5", "-t", table, "-C", chain, *args], check=False).returncode != 0:
            rules.run(ns, [tool.iptables, "-w", "5", "-t", table, "-I", chain, "1", *args])


def _sync_nftables(ns: str, rp: RulesPlan, previous: RulesPlan | None) -> None:
    from netlab.render import nftables as render

    if _full(rp, previous) or previous is None:
        # A full sync must not inherit chains or elements it does not know about (a previous
        # netlab version, a hand edit): drop the table and build it anew in the same atomic
        # transaction, so traffic never sees a half-built table.
        script = "add table ip kube-proxy\ndelete table ip kube-proxy\n" + render.render_nftables(
            rp.context, rp.services
        )
    else:
        # same node settings: only the changed services (and ports sharing their ClusterIP or
        # NodePort) are looked at, so a one-service change costs O(1), not O(all services)
        script = render.render_nftables_delta(rp.context, previous.services, rp.services)
    if script:
        rules.apply_nft(ns, script)


def cleanup(ns: str, mode: str, *, previous_backend: str = "auto") -> None:
    """Remove one mode's kube-proxy objects from a node (kube-proxy's CleanupLeftovers)."""
    if mode == "nftables":
        rules.delete_nft_table(ns)
        return
    from netlab.render import iptables as render

    tool = rules.IptablesTool(previous_backend)
    for table, chain, args in render.jump_rules(None):
        rules.run(ns, [tool.iptables, "-w", "5", "-t", table, "-D", chain, *args], check=False)
    have = rules.iptables_chains(ns, tool)
    payload = []
    for table, chains in sorted(have.items()):
        ours = sorted(c for c in chains if c.startswith("KUBE-"))
        if not ours:
            continue
        payload.append(f"*{table}")
        payload += [f":{c} - [0:0]" for c in ours]
        payload += [f"-X {c}" for c in ours]
        payload.append("COMMIT")
    if payload:
        rules.apply_iptables(ns, tool, "\n".join(payload) + "\n")


def undo_for(lab: str, node: str, ns: str, rp: RulesPlan, previous: RulesPlan | None) -> functools.partial[None]:
    """How to put back what was there: the previous rules, or none of this mode's."""
    if previous is not None:
        return functools.partial(sync, lab, node, ns, previous, rp, ())
    return functools.partial(_forget_and_clean, lab, node, ns, str(rp.mode), rp.iptables_backend)


def _forget_and_clean(lab: str, node: str, ns: str, mode: str, backend: str) -> None:
    rules_state.forget(lab, node)
    cleanup(ns, mode, previous_backend=backend)
