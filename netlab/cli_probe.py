"""`netlab probe` and `netlab capture`: parse, call netlab.probe, print.

Registered in netlab/cli.py with `main.add_command(probe)` and `main.add_command(capture)`.
`standalone()` runs the two as their own group (with netlab's error handling), for a tree
where they are not registered yet.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from netlab.errors import NetlabError

__all__ = ["capture", "probe", "render_probe", "standalone"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

VERDICT_STYLE = {"answered": "green", "refused": "yellow", "rejected": "red", "dropped": "red", "lost": "red"}
CHANGE_STYLE = {"dnat": "magenta", "snat": "magenta", "un-dnat": "magenta", "un-snat": "magenta", "encap": "cyan",
                "decap": "cyan", "bridged": "blue", "ttl": "dim", "mac": "dim"}  # fmt: skip


def _wide(console: Console) -> Console:
    """Walk tables are wide: when the output is not a terminal, do not fold them at 80 columns."""
    if console.is_terminal:
        return console
    return Console(highlight=False, soft_wrap=True, width=220, file=console.file)


def _lab(lab_name: str | None, what: str) -> str:
    from netlab.labs import find_lab, require_root

    require_root(what)
    return find_lab(lab_name)


def _walk_table(rows: list[dict[str, Any]], start: int) -> Table:
    """One row per sighting; what changed since the previous one on indented rows below it."""
    t = Table("#", "NAMESPACE", "INTERFACE", "DIR", "+µs", "PACKET", box=None, pad_edge=False)
    t.columns[5].overflow = "fold"
    for i, o in enumerate(rows, start):
        t.add_row(str(i), o["owner"], o["interface"], o["direction"], f"{o['t_us']:.1f}", Text(o["summary"]))
        for c in o["changes"]:
            text = Text("↳ " + c["text"], style=CHANGE_STYLE.get(c["kind"], ""))
            if c.get("chains"):
                text.append("  (" + " -> ".join(c["chains"]) + ")", style="dim")
            where = c["where"] if "->" not in c["where"] else ""
            t.add_row("", "", "", "", "", text if not where else Text.assemble(text, (f"  at {where}", "dim")))
    return t


def render_probe(d: dict[str, Any], console: Console, *, full: int = 5) -> None:
    """The probe result (`ProbeResult.as_dict()`) as tables: each walk, then the rule paths."""
    s, dst = d["source"], d["destination"]
    port = f":{dst['port']}" if dst["port"] else ""
    kind = {"service": "Service ", "nodeport": "NodePort of ", "pod": "pod "}.get(dst["kind"], "")
    console.print(
        f"[bold]probe[/bold] {s['name']} ({s['ip']}) -> {kind}{dst['name']} {dst['ip']}{port}/{dst['proto'].upper()}"
        f"  [dim]lab {d['lab']}, {len(d['hops'])} hops captured, rules: "
        + ", ".join(f"{n} {t}" for n, t in d["tracer"].items())
        + "[/dim]"
    )
    if dst["kind"] in ("service", "nodeport"):
        eps = ", ".join(f"{c['pod']} {c['ip']}:{c['port']} ({c['node']})" for c in dst["candidates"]) or "none"
        console.print(f"  endpoints it may reach: {escape(eps)}")
    if d.get("error"):
        console.print(f"[red]{escape(d['error'])}[/red]")
    walks = d["walks"]
    for w in walks[:full]:
        style = VERDICT_STYLE.get(w["verdict"], "")
        console.print()
        console.print(f"[bold]probe {w['probe']}[/bold]  [{style}]{w['verdict']}[/{style}]: {escape(w['reason'])}")
        if w["endpoint"]:
            ep = w["endpoint"]
            console.print(f"  endpoint chosen: {ep['pod']} {ep['ip']}:{ep['port']} on {ep['node']}")
        console.print(
            f"  [dim]marks: IP id {w['ip_id']}" + (f", TCP seq {w['seq']}" if w["seq"] is not None else "") + "[/dim]"
        )
        if w["request"]:
            console.print("  [bold]request[/bold]")
            console.print(_walk_table(w["request"], 1))
        if w["reply_walk"]:
            console.print(f"  [bold]reply[/bold] ({w['reply']})")
            console.print(_walk_table(w["reply_walk"], len(w["request"]) + 1))
        if w["rules"]:
            console.print("  [bold]rule path[/bold] (nftables trace)" if d["tracer"] else "  [bold]rule path[/bold]")
            for r in w["rules"]:
                line = f"    {r['node']:<8} {r['packet']:<8} {r['path']}"
                console.print(line, markup=False)
                if r.get("rule") and r["verdict"] == "drop":
                    console.print(f"{'':<22}rule: {r['rule']}", markup=False, style="red")
        for a in w["arp_unanswered"]:
            console.print(f"  [yellow]ARP who-has {a['who_has']} on {a['hop']}: no answer[/yellow]")
    if len(walks) > full:
        console.print()
        t = Table("PROBE", "VERDICT", "ENDPOINT", "REASON", box=None)
        for w in walks:
            t.add_row(str(w["probe"]), w["verdict"], w["endpoint"]["pod"] if w["endpoint"] else "-", w["reason"])
        console.print(t)
    if len(walks) > 1:
        counts: dict[str, int] = {}
        for w in walks:
            key = w["endpoint"]["pod"] if w["endpoint"] else w["verdict"]
            counts[key] = counts.get(key, 0) + 1
        console.print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), markup=False)
    for node, rules in d.get("counters", {}).items():
        console.print(f"  [bold]{node}[/bold]: rules whose counters moved (iptables-legacy has no trace)")
        for r in rules:
            console.print(f"    {r['packets']:>4} {r['rule']}", markup=False)
    if d["capture"]["drops"]:
        console.print(f"[yellow]capture sockets dropped frames: {d['capture']['drops']}[/yellow]")
    if d.get("pcap"):
        console.print(f"wrote {d['pcap']['file']}: {d['pcap']['frames']} frames, one interface per hop")
    console.print(f"[dim]{d['timings_ms']['total']:.0f} ms (set-up {d['timings_ms']['setup']:.0f} ms)[/dim]")


@click.command()
@click.option("--lab", "lab_name", metavar="LAB", help="Lab to act on (optional when one lab is up).")
@click.argument("src")
@click.argument("dst")
@click.option("--port", type=click.IntRange(1, 65535), help="Destination port (or write DST:PORT).")
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]), help="Default: the Service port's, else tcp.")
@click.option(
    "--count", default=1, show_default=True, type=click.IntRange(1, 100000), help="Probes, one after the other."
)
@click.option(
    "--timeout", default=1.0, show_default=True, type=click.FloatRange(0.05, 30), help="Seconds to wait for each reply."
)
@click.option(
    "--pcap", type=click.Path(dir_okay=False), help="Also write the walk to FILE (pcapng, one interface per hop)."
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def probe(
    lab_name: str | None,
    src: str,
    dst: str,
    port: int | None,
    proto: str | None,
    count: int,
    timeout: float,
    pcap: str | None,
    output: str,
) -> None:
    """Send a probe from SRC to DST and show its walk, hop by hop, and the reply's.

    SRC is a pod (`name` or `namespace/name`), a node, or `external`. DST is a pod, a
    Service (`name` or `namespace/name`), a ClusterIP:port or a nodeIP:nodePort; add :PORT
    or --port. Every hop the probe can take is captured at once; each change on the way is
    shown (DNAT and the kube-proxy chains that chose the endpoint, masquerade, VXLAN
    encapsulation, TTL, MACs), and where it stops, why.

    \b
    Examples:
      sudo netlab probe client web:80                 # a Service: which endpoint, which chains
      sudo netlab probe client web-1 --port 8080      # pod to pod (across nodes: VXLAN)
      sudo netlab probe external 172.18.0.2:30080     # NodePort from outside the cluster
      sudo netlab probe client web:53 --proto udp --count 5 --pcap walk.pcapng
    """
    from netlab.probe import run

    name = _lab(lab_name, "probe")
    res = run.probe(name, src, dst, port=port, proto=proto, count=count, timeout=timeout, pcap=pcap)
    d = res.as_dict()
    if output == "json":
        out.print_json(json.dumps(d))
    else:
        render_probe(d, _wide(out))
    if res.error or not res.walks:
        sys.exit(1)


@click.command()
@click.option("--lab", "lab_name", metavar="LAB", help="Lab to act on (optional when one lab is up).")
@click.argument("targets", nargs=-1, required=True, metavar="TARGET[/IFACE]...")
@click.option("--pcap", "file", required=True, type=click.Path(dir_okay=False), help="pcapng file to write.")
@click.option("--duration", type=click.FloatRange(0, min_open=True), help="Stop after S seconds (default: Ctrl-C).")
@click.option("--count", type=click.IntRange(1), help="Stop after N frames.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def capture(
    lab_name: str | None, targets: tuple[str, ...], file: str, duration: float | None, count: int | None, output: str
) -> None:
    """Capture on any set of hops at once into one pcapng (one interface block per hop).

    TARGET is a pod, a node, `underlay` or `external`; /IFACE picks one interface,
    otherwise every interface but lo. Bridges are captured promiscuously, as tcpdump does.
    Ctrl-C stops it and leaves a valid file.

    \b
    Examples:
      sudo netlab capture node1/cni0 node1/flannel.1 underlay/br0 node2 --pcap walk.pcapng
      sudo netlab capture client web-1 --pcap pods.pcapng --duration 10
    """
    from netlab.probe import run

    name = _lab(lab_name, "capture")

    def ready(hops: list[Any]) -> None:
        if output == "table":
            err.print(f"capturing on {', '.join(h.label for h in hops)} -> {file}; Ctrl-C to stop", markup=False)

    res = run.capture(name, list(targets), file, duration=duration, count=count, on_ready=ready)
    d = res.as_dict()
    if output == "json":
        out.print_json(json.dumps(d))
        return
    t = Table("INTERFACE", "FRAMES", "DROPPED", box=None)
    for label, n in d["frames"].items():
        t.add_row(label, str(n), str(d["drops"].get(label, 0)))
    out.print(t)
    out.print(f"wrote {file}: {d['total_frames']} frames in {d['seconds']:.1f} s (stopped by {d['stopped_by']})")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def _group() -> None:
    """netlab probe and capture (standalone)."""


_group.add_command(probe)
_group.add_command(capture)


def standalone() -> None:
    """Run `probe`/`capture` with netlab's error handling, without the main CLI."""
    from netlab.cli import NetlabGroup

    group = NetlabGroup(name="netlab", commands={"probe": probe, "capture": capture})
    group.context_settings = {"help_option_names": ["-h", "--help"]}
    try:
        group.main(prog_name="netlab")
    except NetlabError as exc:  # pragma: no cover - NetlabGroup handles these
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(exc.exit_code)
