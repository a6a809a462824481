"""netlab's command line: parse, call the library, print. The only place that exits."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from netlab import __version__
from netlab.errors import NetlabError

if TYPE_CHECKING:
    from netlab import lab
else:

    class _LazyLab:
        """`netlab.lab` imports the kernel layer and the pydantic schema (~0.5 s): imported on
        first use, so commands that never touch it (probe, capture, vm, --help) start faster."""

        def __getattr__(self, name: str) -> Any:
            import netlab.lab

            return getattr(netlab.lab, name)

    lab = _LazyLab()

F = TypeVar("F", bound=Callable[..., Any])
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _output_option(f: F) -> F:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="table for people, json for scripts.",
    )(f)


def _lab_option(f: F) -> F:
    return click.option("--lab", "lab_name", metavar="LAB", help="Lab to act on (optional when one lab is up).")(f)


class NetlabGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NetlabError as exc:
            if os.environ.get("NETLAB_DEBUG"):
                raise
            err.print(f"[red]error:[/red] {exc}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]: what this run created was removed")
            sys.exit(130)


@click.group(cls=NetlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netlab")
def main() -> None:
    """netlab: a Kubernetes datapath lab built from real network namespaces.

    \b
    Examples:
      sudo netlab up topologies/two-node-vxlan.yaml
      sudo netlab status
      sudo netlab exec client -- ping -c1 10.244.1.2
      sudo netlab down demo
    """


def _print_plan(p: Any) -> None:
    if p.empty:
        out.print(f"lab [bold]{p.lab.name}[/bold]: no change (the kernel already matches the topology)")
        return
    for step in p.steps:
        sign = {"create": "[green]+[/green]", "start": "[green]+[/green]", "delete": "[red]-[/red]"}.get(
            step.verb, "[yellow]~[/yellow]"
        )
        out.print(f"{sign} {step.verb} {step.target}")
        for obj in step.objects():
            out.print(f"    {obj}")
    counts = ", ".join(f"{v} {k}" for k, v in p.counts().items())
    out.print(f"lab [bold]{p.lab.name}[/bold]: {len(p.steps)} steps ({counts})")


def _plan_json(p: Any) -> dict[str, Any]:
    return {
        "lab": p.lab.name,
        "changed": not p.empty,
        "steps": [
            {"verb": s.verb, "kind": type(s).__name__, "target": s.target, "objects": s.objects()} for s in p.steps
        ],
    }


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_output_option
def plan(file: str, output: str) -> None:
    """Show what `up FILE` would do, without changing anything.

    As root it plans against the running lab (only the difference); without root it plans
    a fresh build.

    \b
    Example:
      netlab plan topologies/two-node-vxlan.yaml
    """
    _, p = lab.plan_file(file, observe_kernel=os.geteuid() == 0)
    if output == "json":
        out.print_json(json.dumps(_plan_json(p)))
    else:
        _print_plan(p)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_output_option
def up(file: str, output: str) -> None:
    """Build the lab in FILE, or change a running one to match FILE.

    Running it again changes nothing. After editing FILE, only the difference is applied
    (added or removed pods and nodes); the rest is left alone. If anything fails, or you
    press Ctrl-C, what this run created is removed.

    \b
    Example:
      sudo netlab up topologies/two-node-vxlan.yaml
    """
    show = output == "table" and err.is_terminal
    if show:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("planning", total=None)

            def progress(i: int, total: int, step: Any) -> None:
                bar.update(task, completed=i, total=total, description=f"{step.verb} {step.target}")

            res = lab.up(file, progress)
    else:
        res = lab.up(file)
    if output == "json":
        out.print_json(json.dumps({**_plan_json(res.plan), "seconds": round(res.seconds, 3)}))
        return
    if not res.changed:
        out.print(f"lab [bold]{res.lab}[/bold]: no change (the kernel already matches the topology)")
        return
    counts = ", ".join(f"{v} {k}" for k, v in res.plan.counts().items())
    out.print(f"lab [bold]{res.lab}[/bold] is up: {len(res.plan.steps)} steps ({counts}) in {res.seconds:.2f} s")
    out.print(f"next: sudo netlab status {res.lab}")


@main.command()
@click.argument("lab_name", metavar="[LAB]", required=False)
@click.option("--all", "all_labs", is_flag=True, help="Remove every netlab lab on this machine.")
@_output_option
def down(lab_name: str | None, all_labs: bool, output: str) -> None:
    """Remove a lab: exactly the namespaces, links and processes that carry its mark.

    Works from what the kernel holds, so it also cleans up after a crash or a `kill -9`,
    and without the topology file.

    \b
    Examples:
      sudo netlab down demo
      sudo netlab down --all
    """
    if lab_name and all_labs:
        raise click.UsageError("give a LAB or --all, not both")
    if not lab_name and not all_labs:
        lab.require_root("down")
        from netlab.kernel import observe

        labs = observe.list_labs()
        if len(labs) != 1:
            raise click.UsageError(
                "name the lab to remove, or --all" + (f" (up: {', '.join(labs)})" if labs else " (no lab is up)")
            )
        lab_name = labs[0]
    res = lab.down(lab_name, all_labs=all_labs)
    if output == "json":
        out.print_json(
            json.dumps(
                {
                    "labs": res.labs,
                    "netns": res.netns,
                    "processes": res.processes,
                    "seconds": round(res.seconds, 3),
                }
            )
        )
        return
    if not res.netns:
        out.print(f"nothing to remove ({'no lab is up' if all_labs else f'lab {lab_name} is not up'})")
        return
    out.print(
        f"removed {', '.join(res.labs)}: {len(res.netns)} namespaces, {len(res.processes)} processes "
        f"in {res.seconds:.2f} s"
    )


@main.command()
@click.argument("lab_name", metavar="[LAB]", required=False)
@_output_option
def status(lab_name: str | None, output: str) -> None:
    """Show labs as the kernel holds them: nodes, pods, links.

    \b
    Examples:
      sudo netlab status
      sudo netlab status demo -o json
    """
    lab.require_root("status")
    from netlab.kernel import observe

    names = [lab.find_lab(lab_name)] if lab_name else observe.list_labs()
    data = [lab.status(n) for n in names]
    if output == "json":
        out.print_json(json.dumps({"labs": data}))
        return
    if not data:
        out.print("no lab is up; start one with `sudo netlab up FILE`")
        return
    for d in data:
        out.print(f"[bold]lab {d['name']}[/bold]" + (f"  ({d['source']})" if d["source"] else ""))
        t = Table("NODE", "NETNS", "ETH0", "POD CIDR", "OVERLAY", "STATE", box=None)
        for n in d["nodes"]:
            t.add_row(n["name"], n["netns"], n["ip"], n["podCIDR"], n["overlay"], n["state"])
        out.print(t)
        t = Table("POD", "NODE", "IP", "STATE", "PROCESSES", box=None)
        for p in d["pods"]:
            t.add_row(
                f"{p['namespace']}/{p['name']}",
                p["node"],
                p["ip"],
                p["state"],
                ",".join(map(str, p["processes"])) or "-",
            )
        out.print(t)
        if d["services"]:
            t = Table("SERVICE", "CLUSTER-IP", "PORT", "NODEPORT", "ENDPOINTS", box=None)
            for sv in d["services"]:
                name = f"{sv['namespace']}/{sv['name']}" + (f":{sv['portName']}" if sv["portName"] else "")
                eps = ", ".join(e.split()[0] for e in sv["endpoints"]) or "<none>"
                t.add_row(name, sv["clusterIP"], f"{sv['port']}/{sv['protocol']}", str(sv["nodePort"] or "-"), eps)
            out.print(t)
        out.print(f"{len(d['links'])} links; `-o json` lists them")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_lab_option
@click.argument("target")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec(lab_name: str | None, target: str, command: tuple[str, ...]) -> None:  # noqa: A001
    """Run COMMAND inside a pod's or node's network namespace.

    TARGET is a pod (`name` or `namespace/name`), a node, or `underlay`. Standard input,
    output and the exit code pass through.

    \b
    Examples:
      sudo netlab exec client -- ping -c1 10.244.1.2
      sudo netlab exec node1 -- ip route
      sudo netlab exec --lab demo web -- ss -ltn
    """
    lab.require_root("exec")
    name = lab.find_lab(lab_name)
    ns = lab.exec_target(name, target)
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    # `ip netns exec` also gives the command a /sys of the namespace (a private mount ns).
    os.execvp("ip", ["ip", "netns", "exec", ns, *argv])


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--kernel",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kernel image to boot [default: the newest /boot/vmlinuz-* whose /lib/modules has ip_vs].",
)
@click.option("--memory", default="2G", show_default=True, metavar="SIZE", help="Guest memory (qemu -m).")
@click.option("--cpus", default=2, show_default=True, type=click.IntRange(1, 64), help="Guest CPUs.")
@click.option("--kvm", is_flag=True, help="Use KVM instead of TCG emulation (KVM hangs on some hosts).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def vm(kernel: Path | None, memory: str, cpus: int, kvm: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND as root on a real distro kernel (IPVS, dummy, ipip, netem), in a throwaway VM.

    Boots the kernel with virtme-ng under qemu (about 15 s before the command starts;
    everything inside runs 6-30x slower under emulation), loads the modules labs need, and
    runs COMMAND in the current directory with this checkout's .venv first on PATH, so
    `netlab` and `pytest` inside are this one. The host's files are visible read-only
    (writes go to RAM); output streams back live and the exit code is COMMAND's. A lab
    made inside lives only as long as COMMAND: chain what you want to see.

    \b
    Examples:
      netlab vm -- netlab up topologies/services.yaml
      netlab vm -- sh -c 'netlab up topologies/services.yaml && netlab rules node1'
      netlab vm -- ipvsadm -Ln
      netlab vm -- pytest tests/vm
      netlab vm --kernel /boot/vmlinuz-6.1.0-56-amd64 --memory 4G -- uname -r
    """
    from netlab import vm as vmtier

    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("give the command to run in the VM after --, e.g. `netlab vm -- uname -r`")
    spec = vmtier.VmSpec(
        kernel=(kernel.absolute() if kernel else vmtier.find_kernel()),
        command=tuple(argv),
        cwd=Path.cwd(),
        venv_bin=Path(sys.prefix) / "bin",
        memory=memory,
        cpus=cpus,
        kvm=kvm,
        env=dict(os.environ),
        cached=vmtier.cached_paths(Path(sys.prefix) / "bin"),
    )
    sys.exit(vmtier.run(spec))


@main.command()
@_lab_option
@click.argument("node")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["tree", "save"]),
    default="tree",
    show_default=True,
    help="tree: services -> chains -> endpoints with live counters; save: the kernel's own listing.",
)
@_output_option
def rules(lab_name: str | None, node: str, fmt: str, output: str) -> None:
    """Show kube-proxy's rules on NODE, as the kernel holds them.

    \b
    Examples:
      sudo netlab rules node1                  # KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP -> DNAT, with counters
      sudo netlab rules node1 --format save    # iptables-save / nft list table ip kube-proxy
      sudo netlab rules --lab demo node2 -o json
    """
    lab.require_root("rules")
    from netlab import inspect
    from netlab.kernel import rules as krules
    from netlab.kernel import rules_state

    name = lab.find_lab(lab_name)
    ns = lab.exec_target(name, node)
    last = rules_state.load(name, node)
    backend = last.iptables_backend if last else "auto"
    tool = krules.IptablesTool(backend)
    from netlab.kernel import proxy_ipvs

    if proxy_ipvs.has_ipvs(ns):
        view = proxy_ipvs.observe_ipvs(ns, iptables_backend=backend)
        if output == "json":
            out.print_json(
                json.dumps({"lab": name, "node": node, "mode": "ipvs", "save": view.save(), **view.as_dict()})
            )
        elif fmt == "save":
            out.print(view.save(), markup=False, highlight=False)
        else:
            out.print(f"[bold]{node}[/bold]: ipvs (virtual servers, like `ipvsadm -Ln`)")
            out.print(view.format(), markup=False, highlight=False)
        return
    mode = "nftables" if krules.has_nft_table(ns) else "iptables"
    if mode == "nftables":
        text = krules.nft_list(ns)
        tree = inspect.nft_tree(text)
    else:
        text = "".join(krules.iptables_save(ns, tool, counters=True, table=t) for t in ("filter", "nat"))
        tree = inspect.iptables_tree(text)
    if output == "json":
        out.print_json(json.dumps({"lab": name, "node": node, "mode": mode, "save": text, **tree.as_dict()}))
        return
    if fmt == "save":
        out.print(text, markup=False, highlight=False)
        return
    from rich.tree import Tree

    root = Tree(f"[bold]{node}[/bold]: {mode} ({'KUBE-SERVICES' if mode == 'iptables' else 'service-ips map'})")

    def add(branch: Tree, hop: inspect.Hop) -> None:
        label = hop.target
        if hop.what:
            label = f"{hop.what} -> {label}"
        if hop.probability is not None:
            label = f"p={hop.probability:.4f} {label}"
        if hop.packets is not None:
            label = f"[dim]{hop.packets:>6} pkts[/dim] {label}"
        sub = branch.add(label, highlight=False)
        for c in hop.children:
            add(sub, c)

    for hop in tree.entries:
        add(root, hop)
    if tree.rejects:
        rej = root.add("[bold]filter: no endpoints[/bold]")
        for hop in tree.rejects:
            add(rej, hop)
    out.print(root)


@main.command()
def schema() -> None:
    """Print the topology file's JSON schema (for editor completion).

    \b
    Example (VS Code, YAML extension): netlab schema > netlab.schema.json, then put
      # yaml-language-server: $schema=netlab.schema.json
    at the top of a topology file.
    """
    from netlab.topology.schema import Topology

    out.print_json(json.dumps(Topology.model_json_schema(by_alias=True)))


@main.group()
def bench() -> None:
    """Benchmarks (as root): how fast netlab builds and removes labs."""


@bench.command("bringup")
@click.option("--pods", default="100,1000", show_default=True, metavar="N[,N...]", help="Pod counts to run.")
@click.option("--nodes", default=10, show_default=True, type=click.IntRange(2, 250), help="Nodes (VXLAN).")
@click.option("--no-baseline", is_flag=True, help="Skip the mininet baseline.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write results (JSON) to FILE.")
@_output_option
def bench_bringup(pods: str, nodes: int, no_baseline: bool, out_file: str | None, output: str) -> None:
    """Time `up` and `down` of N pods over NODES nodes, and mininet for the same N.

    Each netlab lab is checked (all pods Running, object count, a cross-node ping) before
    `down` is timed. mininet (`mn --topo single,N --switch lxbr --controller none --test none`)
    runs in a throwaway namespace with its host-wide sysctl tuning disabled. See
    docs/benchmarks.md.

    \b
    Example:
      sudo netlab bench bringup --pods 100,1000 --nodes 10 --out bench.json
    """
    from netlab import bench as b

    counts = b.parse_counts(pods)
    data = b.bringup(
        counts,
        nodes,
        baseline=not no_baseline,
        log=lambda m: err.print(m, markup=False),
        command=" ".join(["netlab bench bringup", *sys.argv[sys.argv.index("bringup") + 1 :]]),
    )
    _bench_report(data, out_file, output, b.print_table, b.check)


def _bench_report(
    data: dict[str, Any],
    out_file: str | None,
    output: str,
    table: Callable[[dict[str, Any], Console], None],
    check: Callable[[dict[str, Any]], None],
) -> None:
    """Write a benchmark's results (file, JSON or tables), then fail if any of its checks failed."""
    if out_file:
        with open(out_file, "w") as f:
            json.dump(data, f, indent=2)
    if output == "json":
        out.print_json(json.dumps(data))
    else:
        table(data, out)
    check(data)


@bench.command("services")
@click.option(
    "--services", "sizes", default="1000,5000,10000", show_default=True, metavar="N[,N...]",
    help="Service counts to run (3 endpoints each).",
)  # fmt: skip
@click.option(
    "--connections", default=300, show_default=True, type=click.IntRange(200, 100000),
    help="New TCP connections to each of the first and the last service (latency).",
)  # fmt: skip
@click.option(
    "--repeat", default=3, show_default=True, type=click.IntRange(1, 20), help="Runs per full-programming timing."
)
@click.option(
    "--cap", default=10.0, show_default=True, type=click.FloatRange(0),
    help="Stop repeating a timing once its runs add up to this many seconds.",
)  # fmt: skip
@click.option(
    "--changes", default=5, show_default=True, type=click.IntRange(1, 50), help="One-service changes (each undone)."
)
@click.option("--no-legacy", is_flag=True, help="Skip iptables with the legacy backend.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write results (JSON) to FILE.")
@_output_option
def bench_services(
    sizes: str,
    connections: int,
    repeat: int,
    cap: float,
    changes: int,
    no_legacy: bool,
    out_file: str | None,
    output: str,
) -> None:
    """Time kube-proxy's rules on one node with N services x 3 endpoints, per proxy mode.

    Full programming (against the bare iptables-restore / nft -f of the same payload), a
    one-service change, and the first-connection latency to the first and the last service
    in KUBE-SERVICES. Builds the lab `bsvc` and removes it. See docs/benchmarks.md.

    \b
    Example:
      sudo netlab bench services --services 1000,5000,10000 --out services.json
    """
    from netlab import bench_services as bs

    data = bs.services(
        bs.parse_sizes(sizes),
        connections=connections,
        repeat=repeat,
        cap=cap,
        changes=changes,
        legacy=not no_legacy,
        log=lambda m: err.print(m, markup=False),
        command=" ".join(["netlab bench services", *sys.argv[sys.argv.index("services") + 1 :]]),
    )
    _bench_report(data, out_file, output, bs.print_tables, bs.check)


@bench.command(
    "ipvs", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False
)
@click.pass_context
def bench_ipvs(ctx: click.Context) -> None:
    """IPVS mode vs ipvsadm --restore, iptables and nftables in one kernel (run it inside `netlab vm`)."""
    from netlab import bench_ipvs as bi

    sys.exit(bi.main(list(ctx.args)))


def _register() -> None:
    # the packet walk and the proxy-mode comparison live in their own modules (each one job)
    from netlab.cli_compare import compare
    from netlab.cli_probe import capture, probe

    for command in (probe, capture, compare):
        main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
