"""kube-proxy's IPVS-mode sync on one node: change only what differs from `render_ipvs`.

kube-proxy's IPVS mode has no partial sync: it reads the kernel back on every sync (the IPVS
table, the addresses on kube-ipvs0, the ipsets) and corrects whatever differs. netlab does the
same on a **full sync** (no record of the last sync, other node settings, real servers
draining, or a partial sync the kernel refused), in kube-proxy's order:

1. sysctls, the dummy link kube-ipvs0, the ipsets (created if missing; entries diffed and
   changed in one `ipset restore`);
2. the IPVS table in netlink batches: virtual servers added, updated (scheduler, persistence)
   or deleted; real servers added, reset to weight 1, or removed gracefully (below);
3. ClusterIPs bound to kube-ipvs0; the fixed iptables rules in one `iptables-restore
   --noflush`, with the jumps from the built-in chains that one `iptables-save` does not show
   inserted in the same transaction (kube-proxy's EnsureRule(Prepend) runs `iptables -C`, then
   `iptables -I CHAIN 1`, per jump and sync; the result is the same rules in the same order);
4. addresses no longer needed unbound.

A **partial sync** (`previous` is the record of the last sync, same node settings) trusts the
record, as kube-proxy's iptables and nftables modes trust their in-memory state between full
syncs: `render_ipvs_delta` names the changed services' virtual servers, ipset entries, addresses
and (only if a set became empty or non-empty) the fixed rules, and only those are sent; the one
thing read back is the real servers of a virtual server whose real servers change (one dump:
the connection counters decide between delete and drain). The cost follows the change, not the
table (a full sync's read-back of 1000 services took ~35 s under emulation: one `ipset save` of
every entry, a real-server dump per virtual server, an `iptables-save`). If the kernel refuses a
partial change (someone deleted a virtual server by hand), the sync becomes a full one.
What a partial sync does not see: hand edits to objects it does not touch, and a node address
added or removed by hand (NodePort virtual servers follow the node's addresses; a full sync
catches up).

Graceful removal (kube-proxy's GracefulTerminationManager): a real server that is no longer
wanted is deleted at once if it is UDP or has no connections (ActiveConn + InActConn == 0);
otherwise its weight is set to 0, so the scheduler sends it nothing new while its open
connections finish. kube-proxy keeps such servers in a list and retries the delete every minute;
netlab keeps no daemon, so the list *is* the kernel: a weight-0 real server that is no longer
wanted is checked again, and deleted once drained, on the next sync (the next `netlab up`,
whose planner makes that a full sync while anything drains).
Expect InActConn to stay above 0 for a while after the last connection closes: IPVS holds a
closed TCP connection in TIME_WAIT for 2 minutes (10 s after a RST). If a weight-0 server is
wanted again, it is deleted and re-added with weight 1, as kube-proxy does.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from netlab import inspect
from netlab.errors import FeatureError, KernelError
from netlab.kernel import ipset, rules
from netlab.kernel import ipvs as kipvs
from netlab.plan.model import RulesPlan
from netlab.render.ipvs import (
    DUMMY_DEVICE,
    IPSETS,
    IPTABLES_CHAINS,
    JUMP_CHAINS,
    IpvsDelta,
    IpvsState,
    RealServer,
    VirtualServer,
    changed_subset,
    render_ipvs,
    render_ipvs_delta,
)

__all__ = ["IpvsSyncResult", "cleanup_ipvs", "draining", "has_ipvs", "observe_ipvs", "sync_ipvs"]


@dataclass
class IpvsSyncResult:
    """What one sync changed (all zero on a second sync with nothing new)."""

    services_added: int = 0
    services_updated: int = 0
    services_deleted: int = 0
    dests_added: int = 0
    dests_updated: int = 0
    dests_deleted: int = 0
    draining: list[str] = field(default_factory=list)  # "TCP 10.96.0.10:80 -> 10.244.1.5:8080" at weight 0
    addresses_added: int = 0
    addresses_removed: int = 0
    ipset_changes: int = 0
    jumps_added: int = 0
    netlink_requests: int = 0
    seconds: float = 0.0
    partial: bool = False  # a partial sync (from the record), not a read-back of the whole kernel
    fell_back: str = ""  # why a partial sync became a full one (the kernel refused a change)

    @property
    def ipvs_changes(self) -> int:
        return (
            self.services_added
            + self.services_updated
            + self.services_deleted
            + self.dests_added
            + self.dests_updated
            + self.dests_deleted
        )


def _diff_ipvs(ipvs: kipvs.Ipvs, state: IpvsState, res: IpvsSyncResult) -> None:
    """Queue the IPVS changes from the kernel's table to the desired one (syncService,
    syncEndpoint, GracefulDeleteRS, cleanLegacyService)."""
    _diff_virtual_servers(ipvs, state.virtual_servers, ipvs.table(), res, lambda want, cur: cur.real_servers)


def _diff_virtual_servers(
    ipvs: kipvs.Ipvs,
    wanted: Iterable[VirtualServer],
    have: Iterable[VirtualServer],
    res: IpvsSyncResult,
    real_servers: Callable[[VirtualServer, VirtualServer], Iterable[RealServer] | None],
) -> None:
    """Queue the changes from `have` to `wanted`. `real_servers(want, cur)`: the real servers the
    kernel holds for a virtual server in both, with their counters (None: they need no change)."""
    current = {v.key: v for v in have}
    for want in wanted:
        cur = current.pop(want.key, None)
        if cur is None:
            _add_vs(ipvs, want, res)
            continue
        if not want.same_config(cur):
            ipvs.set_service(want)
            res.services_updated += 1
        held = real_servers(want, cur)
        if held is not None:
            _diff_dests(ipvs, want, held, res)
    for stale in current.values():
        ipvs.del_service(stale)  # its real servers go with it, without grace (as kube-proxy does)
        res.services_deleted += 1


def _add_vs(ipvs: kipvs.Ipvs, want: VirtualServer, res: IpvsSyncResult) -> None:
    ipvs.add_service(want)
    res.services_added += 1
    for rs in want.real_servers:
        ipvs.add_dest(want, rs)
        res.dests_added += 1


def _diff_dests(ipvs: kipvs.Ipvs, want: VirtualServer, have: Iterable[RealServer], res: IpvsSyncResult) -> None:
    """Queue the changes from the real servers the kernel has (`have`, with their counters) to
    `want`'s, removing the unwanted ones gracefully."""
    cur_rs = {(r.ip, r.port): r for r in have}
    for rs in want.real_servers:
        c = cur_rs.pop((rs.ip, rs.port), None)
        if c is None:
            ipvs.add_dest(want, rs)
            res.dests_added += 1
        elif c.weight == 0 and rs.weight != 0:
            # wanted again while draining: kube-proxy deletes it and adds it anew
            ipvs.del_dest(want, c)
            ipvs.add_dest(want, rs)
            res.dests_updated += 1
        elif (c.weight, c.forward) != (rs.weight, rs.forward):
            ipvs.set_dest(want, rs)  # kube-proxy's initial sync resets every weight to 1
            res.dests_updated += 1
    for c in cur_rs.values():
        if want.protocol == "UDP" or c.active + c.inactive == 0:
            ipvs.del_dest(want, c)
            res.dests_deleted += 1
            continue
        if c.weight != 0:
            ipvs.set_dest(want, RealServer(c.ip, c.port, weight=0, forward=c.forward))
            res.dests_updated += 1
        res.draining.append(f"{want.protocol} {want.addr} -> {c.addr}")


def _diff_ipvs_partial(ipvs: kipvs.Ipvs, delta: IpvsDelta, res: IpvsSyncResult) -> None:
    """Queue the IPVS changes of a partial sync: the changed services' virtual servers, from the
    record (`delta.before`) to `delta.after`. Only a virtual server whose real servers change is
    read back (one dump: the connection counters decide between delete and drain)."""

    def real_servers(want: VirtualServer, was: VirtualServer) -> Iterable[RealServer] | None:
        return ipvs.dests(want) if want.real_servers != was.real_servers else None

    _diff_virtual_servers(ipvs, delta.after, delta.before, res, real_servers)


def _args(argv: tuple[str, ...] | list[str]) -> str:
    """argv as iptables-save prints it (only arguments with spaces are quoted)."""
    return " ".join(f'"{a}"' if " " in a else a for a in argv)


def _missing_jumps(save: str, state: IpvsState) -> list[tuple[str, str, list[str]]]:
    """The jumps `iptables-save` does not show, in kube-proxy's ensure order."""
    present: set[tuple[str, str]] = set()
    table = ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            present.add((table, line))
    return [(t, c, list(argv)) for t, c, argv in state.jumps if (t, f"-A {c} {_args(argv)}") not in present]


def _with_jumps(payload: str, jumps: list[tuple[str, str, list[str]]]) -> str:
    """The restore payload with the missing jumps inserted at the end of their table's section:
    `-I CHAIN 1 ...` in ensure order leaves them as EnsureRule(Prepend) one by one would (reverse
    order), in the same atomic transaction, after the chains they jump to are declared."""
    out: list[str] = []
    table = ""
    for line in payload.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line == "COMMIT":
            out += [f"-I {c} 1 {_args(argv)}" for t, c, argv in jumps if t == table]
        out.append(line)
    return "\n".join(out) + "\n"


def _partial(previous: RulesPlan | None, rp: RulesPlan) -> bool:
    return (
        previous is not None
        and previous.mode == rp.mode
        and previous.iptables_backend == rp.iptables_backend
        and previous.context == rp.context
    )


def sync_ipvs(ns: str, rp: RulesPlan, previous: RulesPlan | None = None) -> IpvsSyncResult:
    """Bring node namespace `ns` to kube-proxy's IPVS state for `rp` (see the module docstring):
    a partial sync from `previous` when it is the record of what was last programmed here with
    the same node settings, else (or if the kernel refuses a partial sync's change) a full one.
    Raises FeatureError when the kernel has no IPVS (before changing anything).
    """
    t0 = time.perf_counter()
    if _partial(previous, rp):
        assert previous is not None
        try:
            res = _sync_partial(ns, rp, previous)
        except KernelError as exc:
            # The kernel is not what the record says (a hand edit, an interrupted sync): do what
            # kube-proxy's next sync would, compare everything with the kernel.
            res = _sync_full(ns, rp)
            res.fell_back = str(exc)
    else:
        res = _sync_full(ns, rp)
    res.seconds = time.perf_counter() - t0
    return res


def _sync_full(ns: str, rp: RulesPlan) -> IpvsSyncResult:
    """kube-proxy's sync: everything read back from the kernel and corrected."""
    res = IpvsSyncResult()
    tool = rules.IptablesTool(rp.iptables_backend)
    with kipvs.opened(ns) as ipvs:  # first: no IPVS in this kernel -> FeatureError, nothing touched
        bound, node_ips, index = kipvs.addresses(ns, create=True)
        assert index is not None
        state = render_ipvs(rp.context, rp.services, nodeport_addresses=node_ips)
        kipvs.write_sysctls(ns, state.sysctls)
        changes = ipset.diff(ipset.save(ns), state.ipsets)
        ipset.restore(ns, changes)
        res.ipset_changes = sum(1 for line in changes if not line.startswith("create"))
        _diff_ipvs(ipvs, state, res)
        ipvs.commit()
        res.netlink_requests = ipvs.requests
    wanted = set(state.addresses)
    res.addresses_added = len(wanted - bound)
    if wanted - bound:
        kipvs.set_addresses(ns, index, wanted - bound, ())
    missing = _missing_jumps(rules.iptables_save(ns, tool), state)
    rules.apply_iptables(ns, tool, _with_jumps(state.iptables, missing))
    res.jumps_added = len(missing)
    res.addresses_removed = len(bound - wanted)
    if bound - wanted:
        kipvs.set_addresses(ns, index, (), bound - wanted)
    return res


def _sync_partial(ns: str, rp: RulesPlan, previous: RulesPlan) -> IpvsSyncResult:
    """A partial sync: the record (`previous`) stands for the kernel; only what changed between
    the two plans is sent. KernelError if the kernel disagrees with the record."""
    res = IpvsSyncResult(partial=True)
    subset = changed_subset(previous.services, rp.services)
    with kipvs.opened(ns) as ipvs:
        if any(s.node_port is not None for part in subset for s in part):
            # NodePort virtual servers go on every address of the node: one address dump
            # (it also returns kube-ipvs0's /32s, one per service, skipped undecoded)
            _, node_ips, index = kipvs.addresses(ns, bound=False)
        else:  # nothing here depends on the node's addresses: one RTM_GETLINK, whatever the table
            node_ips, index = None, kipvs.dummy_index(ns)
        if index is None:
            raise KernelError(f"find {DUMMY_DEVICE}", ns, errno.ENODEV)
        delta = render_ipvs_delta(
            rp.context, previous.services, rp.services, nodeport_addresses=node_ips, subset=subset
        )
        lines = delta.ipset_lines()
        ipset.restore(ns, lines)
        res.ipset_changes = len(lines)
        _diff_ipvs_partial(ipvs, delta, res)
        ipvs.commit()
        res.netlink_requests = ipvs.requests
    res.addresses_added = len(delta.addresses_add)
    if delta.addresses_add:
        kipvs.set_addresses(ns, index, delta.addresses_add, ())
    if delta.iptables is not None:
        # the jumps are the record's too: kube-proxy's --noflush restore of the fixed chains
        rules.apply_iptables(ns, rules.IptablesTool(rp.iptables_backend), delta.iptables)
    res.addresses_removed = len(delta.addresses_del)
    if delta.addresses_del:
        kipvs.set_addresses(ns, index, (), delta.addresses_del)
    return res


def cleanup_ipvs(ns: str, *, iptables_backend: str = "auto") -> None:
    """Remove everything IPVS mode put in `ns` (kube-proxy's ipvs CleanupLeftovers): the jumps and
    chains, then the ipsets (iptables rules reference them), the IPVS table, kube-ipvs0.
    The sysctls are left as they are, as kube-proxy leaves them. Safe to run twice."""
    tool = rules.IptablesTool(iptables_backend)
    save = rules.iptables_save(ns, tool)
    payload = _cleanup_payload(save)
    if payload:
        rules.apply_iptables(ns, tool, payload)
    ipset.destroy(ns, [name for name, _, _ in IPSETS])
    try:
        with kipvs.opened(ns) as ipvs:
            ipvs.flush()
            ipvs.commit()
    except FeatureError:
        pass  # no IPVS in this kernel: nothing can have been added
    kipvs.delete_dummy(ns)


def _cleanup_payload(save: str) -> str:
    """One restore: delete IPVS mode's jumps, flush its chains, delete the chains nothing else
    references any more (iptables mode shares some names, e.g. KUBE-SERVICES)."""
    ours = {(t, c) for t, c in IPTABLES_CHAINS}
    jumps = {(t, f'-A {c} -m comment --comment "{comment}" -j {target}') for t, c, target, comment in JUMP_CHAINS}
    chains: dict[str, set[str]] = {}
    delete: dict[str, list[str]] = {}
    refs: dict[str, set[str]] = {}
    table = ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
            chains.setdefault(table, set())
        elif line.startswith(":"):
            chains[table].add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            if (table, line) in jumps:
                delete.setdefault(table, []).append("-D" + line[2:])
            elif (table, chain) not in ours and " -j " in line:
                refs.setdefault(table, set()).add(line.rsplit(" -j ", 1)[1].split(" ", 1)[0])
    out: list[str] = []
    for table in ("nat", "filter"):
        present = [c for t, c in IPTABLES_CHAINS if t == table and c in chains.get(table, set())]
        if not present and not delete.get(table):
            continue
        out.append(f"*{table}")
        out += delete.get(table, [])
        out += [f":{c} - [0:0]" for c in present]
        out += [f"-X {c}" for c in present if c not in refs.get(table, set())]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def has_ipvs(ns: str) -> bool:
    """Whether the node holds IPVS mode's objects (kube-ipvs0 is the mark: only IPVS mode makes it)."""
    return kipvs.addresses(ns)[2] is not None


def draining(ns: str) -> list[str]:
    """Real servers at weight 0 (being removed gracefully): a node with any needs another sync
    to finish the removal once their connections are gone (kube-proxy retries every minute)."""
    with kipvs.opened(ns) as ipvs:
        return [f"{v.protocol} {v.addr} -> {r.addr}" for v in ipvs.table() for r in v.real_servers if r.weight == 0]


def observe_ipvs(ns: str, *, iptables_backend: str = "auto") -> inspect.IpvsView:
    """Everything `netlab rules NODE` shows in IPVS mode, read from the kernel."""
    tool = rules.IptablesTool(iptables_backend)
    with kipvs.opened(ns) as ipvs:
        version, size = ipvs.info()
        table = ipvs.services()
    bound, _, _ = kipvs.addresses(ns)
    save = "".join(rules.iptables_save(ns, tool, counters=True, table=t) for t in ("nat", "filter"))
    return inspect.IpvsView(
        version=version,
        size=size,
        virtual_servers=table,
        addresses=sorted(bound),
        ipsets=ipset.save_text(ns),
        iptables=save,
        device=DUMMY_DEVICE,
    )
