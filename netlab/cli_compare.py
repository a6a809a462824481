"""`netlab compare`: parse, call netlab.compare, print.

Registered in netlab/cli.py with `main.add_command(compare)`. `standalone()` (also
`python -m netlab.cli_compare`) runs it with netlab's error handling where it is not
registered yet; the IPVS part inside the VM tier is started that way.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from netlab.errors import NetlabError

__all__ = ["compare", "standalone"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@click.command()
@click.argument("topology", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--modes", default="iptables,ipvs,nftables", show_default=True, help="Proxy modes to compare, comma-separated."
)
@click.option(
    "--services",
    "sizes",
    default="100,1000,5000,10000",
    show_default=True,
    help="Service counts to scale the table to (synthetic services are added), comma-separated.",
)
@click.option(
    "--connections",
    default=300,
    show_default=True,
    type=click.IntRange(10, 100000),
    help="New connections per latency target and run, and for the load distribution.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for report.md, report.json and the PNGs [default: compare-<lab>].",
)
@click.option("--lab", "lab_name", metavar="LAB", help="Name of the lab the compare builds [default: cmp-<name>].")
@click.option("--service", metavar="[NS/]NAME", help="The topology's service to measure [default: the first fit].")
@click.option("--no-fifo", is_flag=True, help="Run the latency client time-shared (the noisy way; for comparison).")
@click.option("--no-vm", is_flag=True, help="Skip ipvs instead of running it in the VM tier on a kernel without IPVS.")
@click.option("--no-plots", is_flag=True, help="Write report.json and report.md only.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def compare(
    topology: str,
    modes: str,
    sizes: str,
    connections: int,
    out_dir: Path | None,
    lab_name: str | None,
    service: str | None,
    no_fifo: bool,
    no_vm: bool,
    no_plots: bool,
    output: str,
) -> None:
    """Build TOPOLOGY in each proxy mode in turn, drive the same traffic, compare side by side.

    For each service count (synthetic services scale kube-proxy's table; the measured ones are
    real, with real endpoints): objects programmed per node, full programming and one-service
    change time, first-connection latency (p50/p99) to the first and the last service. Once
    per mode: the load split over the backends (chi-square; per IPVS scheduler too) and
    behaviour rows from real traffic. IPVS on a kernel without it runs in the VM tier
    (`netlab vm`), and says so. Writes report.md, report.json and PNG plots to --out.

    \b
    Examples:
      sudo netlab compare topologies/services.yaml --modes iptables,nftables --services 100,1000,5000
      sudo netlab compare topologies/services.yaml --services 10,50 --connections 60 -o json
    """
    from netlab.compare import report, run
    from netlab.topology import load

    opts = run.Options(
        modes=run.parse_modes(modes),
        sizes=run.parse_sizes(sizes),
        connections=connections,
        out=Path("."),
        lab=lab_name,
        service=service,
        fifo=not no_fifo,
        vm=not no_vm,
        command="netlab compare " + shlex.join(sys.argv[1:] if sys.argv[1:2] != ["compare"] else sys.argv[2:]),
    )
    lab = lab_name or run.default_lab(load(topology).name)
    target = out_dir or Path(f"compare-{lab}")
    t0 = time.monotonic()
    live = output == "table" and err.is_terminal

    def log(line: str) -> None:
        stamp = f"[{time.monotonic() - t0:6.0f} s] "
        if live:
            err.print(f"[dim]{stamp}[/dim]{line}", markup=True, highlight=False)
        else:
            print(stamp + line, file=sys.stderr, flush=True)

    if live:
        with err.status("compare", spinner="dots") as status:

            def log_live(line: str) -> None:
                status.update(line)
                if line.startswith(("N=", "netlab down", "ipvs:")) and ": netlab up" not in line:
                    log(line)

            data = run.compare(topology, opts, log_live)
    else:
        data = run.compare(topology, opts, log)
    files = run.write_outputs(data, target, plots=not no_plots)
    if output == "json":
        print(json.dumps(data), flush=True)
    else:
        console = out if out.is_terminal else Console(file=out.file, width=220, highlight=False, soft_wrap=True)
        for t in report.tables(data):
            console.print(t)
            console.print()
        for line in report.headline(data):
            console.print(line.replace("**", ""), markup=False)
        for p in data["problems"]:
            console.print(f"[red]problem: {p}[/red]")
        console.print(f"wrote {', '.join(files.values())} ({data['total_s']} s)")
    if not data["ok"]:
        sys.exit(1)


def standalone() -> None:
    """Run `compare` with netlab's error handling, without the main CLI."""
    from netlab.cli import NetlabGroup

    group = NetlabGroup(name="netlab", commands={"compare": compare})
    group.context_settings = {"help_option_names": ["-h", "--help"]}
    args = sys.argv[1:]
    if args[:1] != ["compare"]:
        args = ["compare", *args]
    try:
        group.main(args=args, prog_name="netlab")
    except NetlabError as exc:  # pragma: no cover - NetlabGroup handles these
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    standalone()
