"""kube-proxy's sync on one node: render the desired rules, apply them in one transaction.

Like kube-proxy's syncProxyRules: a full sync writes everything (and, for iptables, makes sure
the jumps from the built-in chains exist); a partial sync rewrites only the service chains
whose Service or endpoints changed; chains no longer needed are deleted in the same
transaction. Switching proxyMode or iptablesBackend first removes the other rule set's objects,
as kube-proxy's CleanupLeftovers does.

iptables, where netlab departs from kube-proxy's way of writing (never from what it writes):
- A full sync (and a cleanup) on a node whose filter and nat tables hold nothing but
  kube-proxy's objects (a netlab node) replaces both tables whole: one `iptables-restore`
  *without* --noflush, the builtin chains and their jumps in the payload. iptables-nft 1.8.9
  with --noflush keeps every chain a command names in a sorted linked list
  (`cache_chain_list_insert`), quadratic in chains: 59 s of user time for 10k services, 3 s
  without. A node with anything else in those tables (a user's own rules) keeps kube-proxy's
  path: --noflush, stale chains read from `iptables-save`, jumps ensured one at a time.
- A partial sync renders only the changed services, takes the chains to delete from the two
  plans (not from an `iptables-save`), and leaves out every top-level chain whose lines did
  not change: the kernel then checks a few chains instead of every service's rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from netlab.kernel import rules, rules_state
from netlab.plan.model import ObservedRules, RulesPlan
from netlab.render.model import ServicePort
from netlab.topology.schema import ProxyMode

__all__ = ["cleanup", "sync"]

SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


def _full(rp: RulesPlan, previous: RulesPlan | None) -> bool:
    return previous is None or previous.context != rp.context


def sync(lab: str, node: str, ns: str, rp: RulesPlan, previous: RulesPlan | None, clean: tuple[str, ...]) -> None:
    """Program `rp` on the node; `clean` names the rule sets to remove first (SyncRules.cleanup)."""
    for rule_set in clean:
        _cleanup_rule_set(ns, rule_set)
    # The state record is pickled in a thread while the sync waits for iptables-restore / nft
    # (the GIL is free then), and written only once the rules are in: at 10k services this
    # takes its ~70 ms off a one-service change.
    with rules.while_tools_run(functools.partial(rules_state.encode, rp)) as record:
        if rp.mode == ProxyMode.IPTABLES:
            _sync_iptables(ns, rp, previous)
        elif rp.mode == ProxyMode.NFTABLES:
            _sync_nftables(ns, rp, previous)
        elif rp.mode == ProxyMode.IPVS:
            from netlab.kernel import proxy_ipvs

            proxy_ipvs.sync_ipvs(ns, rp, previous)
        else:
            from netlab.errors import FeatureError

            raise FeatureError(
                f"proxyMode {rp.mode} is not available in this version of netlab; use iptables or nftables"
            )
    rules_state.write(lab, node, record.result())


def _sync_iptables(ns: str, rp: RulesPlan, previous: RulesPlan | None) -> None:
    from netlab.render import iptables as render

    tool = rules.IptablesTool(rp.iptables_backend)
    large = render.is_large_cluster(rp.services)
    # A flip of kube-proxy's large-cluster mode changes every service's rules (their comments).
    if _full(rp, previous) or previous is None or render.is_large_cluster(previous.services) != large:
        _full_iptables(ns, tool, rp)
        return
    before, after = _changed_services(previous.services, rp.services)
    payload = render.render_iptables_delta(rp.context, before, after, rp.services, large_cluster=large)
    if payload:
        rules.apply_iptables(ns, tool, payload)


def _changed_services(
    old: Sequence[ServicePort], new: Sequence[ServicePort]
) -> tuple[list[ServicePort], list[ServicePort]]:
    """The service ports that differ, as they were and as they are (removed ones only in the
    first list, added ones only in the second). The planner keeps the services' order, so when
    none was added or removed a pairwise comparison is enough (each ServicePort comparison runs
    Python code for its addresses and endpoints: 15 ms for 10k; keying by name costs more)."""
    if len(old) == len(new):
        pairs = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
        if all(a.spn == b.spn for a, b in pairs):
            return [a for a, _ in pairs], [b for _, b in pairs]
    before = {s.spn: s for s in old}
    after = {s.spn: s for s in new}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [before[k] for k in changed if k in before], [after[k] for k in changed if k in after]


def _full_iptables(ns: str, tool: rules.IptablesTool, rp: RulesPlan) -> None:
    from netlab.render import iptables as render

    tables = rules.iptables_tables(ns, tool)
    top = render.service_chains(rp.context, ())  # the top-level chains, per table

    def ours(table: str, chain: str) -> bool:
        return chain in top.get(table, ()) or (table == "nat" and render.is_service_chain(chain))

    if _only_kube_proxy(tables, ours):
        # streamed: iptables-restore parses the first services while the rest are rendered
        payload = render.iter_render_iptables(rp.context, rp.services, whole_tables=True)
        rules.apply_iptables(ns, tool, payload, noflush=False)
        return
    # Someone else's rules share the tables: kube-proxy's own way, which touches nothing else.
    have = {table: set(t.chains) for table, t in tables.items()}
    want = render.service_chains(rp.context, rp.services)
    stale = {
        c
        for table, chains in have.items()
        for c in chains - want.get(table, set())
        if c.startswith(SERVICE_CHAIN_PREFIXES)
    }
    rules.apply_iptables(ns, tool, render.iter_render_iptables(rp.context, rp.services, stale=stale))
    # after the restore: a jump can only be inserted once its target chain exists
    jumps = render.jump_rules(rp.context)
    if "KUBE-SERVICES" not in have.get("nat", set()):
        # a node that had none of kube-proxy's chains has none of its jumps either: insert
        # them all in one restore (same `-I 1` order) instead of two iptables runs per jump
        rules.apply_iptables(ns, tool, _insert_payload(jumps))
    else:
        ensure_jumps(ns, tool, jumps)


def _only_kube_proxy(tables: dict[str, rules.SavedTable], ours: Callable[[str, str], bool]) -> bool:
    """Whether filter and nat hold nothing a whole-table restore would lose: every user chain is
    one of `ours`, every builtin chain has policy ACCEPT and holds no rule or exactly kube-proxy's
    jumps as `ensure_jumps` leaves them (so that the restore's result equals that of the --noflush
    path). A table that does not exist holds nothing. Other tables (mangle, raw) are not touched."""
    from netlab.render import iptables as render

    jumps = render.builtin_rules()
    for name in render.BUILTIN_CHAINS:
        t = tables.get(name)
        if t is None:
            continue
        for chain, policy in t.chains.items():
            if (policy == "-" and not ours(name, chain)) or policy not in ("-", "ACCEPT"):
                return False
        held: dict[str, list[str]] = {}
        for line in t.rules:
            held.setdefault(line.split(" ", 2)[1], []).append(line)
        for chain, lines in held.items():
            if t.chains.get(chain, "-") != "-" and lines != jumps.get((name, chain)):
                return False
    return True


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


def _cleanup_rule_set(ns: str, rule_set: str) -> None:
    """`rule_set` as SyncRules.cleanup names it: "nftables", an iptables tool name, or "ipvs"
    ("ipvs-legacy", ...: IPVS mode with the iptables backend it used for its fixed rules)."""
    if rule_set == "nftables":
        cleanup(ns, "nftables")
    elif rule_set.startswith("ipvs"):
        cleanup(ns, "ipvs", previous_backend=ObservedRules.iptables_backend_of(rule_set))
    else:
        cleanup(ns, "iptables", previous_backend=ObservedRules.iptables_backend_of(rule_set))


def cleanup(ns: str, mode: str, *, previous_backend: str = "auto") -> None:
    """Remove one mode's kube-proxy objects from a node (kube-proxy's CleanupLeftovers)."""
    if mode == "nftables":
        rules.delete_nft_table(ns)
        return
    if mode == "ipvs":
        # its jumps and chains, then the ipsets they use, the IPVS table and kube-ipvs0
        from netlab.kernel import proxy_ipvs

        proxy_ipvs.cleanup_ipvs(ns, iptables_backend=previous_backend)
        return
    from netlab.render import iptables as render

    tool = rules.IptablesTool(previous_backend)
    tables = rules.iptables_tables(ns, tool)
    others = [t for name, t in tables.items() if name not in render.BUILTIN_CHAINS]
    if _only_kube_proxy(tables, lambda _table, chain: chain.startswith("KUBE-")) and not any(
        c.startswith("KUBE-") for t in others for c in t.chains
    ):
        # Nothing else in filter and nat: empty them in one whole-table restore. With --noflush
        # the same deletions cost 10 s at 10k services (see the module docstring).
        empty = "".join(
            f"*{name}\n" + "".join(f":{c} ACCEPT [0:0]\n" for c in builtins) + "COMMIT\n"
            for name, builtins in render.BUILTIN_CHAINS.items()
            if name in tables and (tables[name].rules or "-" in tables[name].chains.values())
        )
        if empty:
            rules.apply_iptables(ns, tool, empty, noflush=False)
        return
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
