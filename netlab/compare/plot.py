"""PNG plots of a compare (matplotlib, Agg; no pyplot global state).

latency.png       first-connection latency against the number of services, per mode: p50 and
                  p99 panels, the last service solid, the first dashed (log x axis)
programming.png   full programming and one-service change against the number of services
distribution.png  connections per backend, one panel per mode (and per IPVS scheduler)

Runs measured in the VM tier (IPVS on a host kernel without it) are 25-30x slower than the
host's: they get their own row of panels instead of squashing the host's curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netlab.compare.report import MODE_ORDER

__all__ = ["COLORS", "distribution_png", "latency_png", "programming_png", "write_all"]

COLORS = {"iptables": "#d62728", "nftables": "#1f77b4", "ipvs": "#2ca02c"}
DPI = 110


def _figure(rows: int, cols: int, w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w * cols, h * rows), dpi=DPI, layout="constrained")


def _groups(data: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(title suffix, modes) per row of panels: the host's modes, then the VM's."""
    where: dict[str, str] = {}
    for r in data["runs"]:
        where[r["mode"]] = r.get("where", "host")
    host = [m for m in MODE_ORDER if where.get(m) == "host"]
    vm = [m for m in MODE_ORDER if where.get(m) == "vm"]
    out = []
    if host:
        out.append(("", host))
    if vm:
        out.append((" — VM tier (qemu TCG: 25-30x slower, shape only)", vm))
    return out


def _runs(data: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return sorted((r for r in data["runs"] if r["mode"] == mode), key=lambda r: r["services"])


def _log_x(ax: Any, xs: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted(set(xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.grid(True, which="major", alpha=0.3)


def _slope_label(data: dict[str, Any], mode: str) -> str:
    sl = data.get("slopes", {}).get(mode, {})
    last, diff = sl.get("latency_last_p50"), sl.get("latency_last_minus_first_p50")
    if not last or not diff:
        return ""
    return f" (p50 {last['us_per_1000']:+.1f} µs per 1000 services; last − first {diff['us_per_1000']:+.1f})"


def latency_png(data: dict[str, Any], path: Path) -> dict[str, Any]:
    groups = _groups(data)
    fig = _figure(len(groups), 2, 6.4, 4.6)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    lines = 0
    legend: list[Any] = []
    for row, (suffix, modes) in enumerate(groups):
        for col, (q, label) in enumerate((("p50_us", "p50 (median)"), ("p99_us", "p99"))):
            ax = axes[row][col]
            xs: list[int] = []
            for mode in modes:
                runs = _runs(data, mode)
                x = [r["services"] for r in runs]
                xs += x
                for key, style, marker in (("last", "-", "o"), ("first", "--", "s")):
                    y = [r["latency"]["targets"][key][q] for r in runs]
                    (h,) = ax.plot(
                        x, y, linestyle=style, marker=marker, color=COLORS[mode], linewidth=2 if key == "last" else 1.3,
                        label=f"{mode}: {key} service" + (_slope_label(data, mode) if key == "last" else ""),
                    )  # fmt: skip
                    if col == 0:
                        legend.append(h)
                    lines += 1
            _log_x(ax, xs)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("services in the table (log scale)")
            ax.set_ylabel("first-connection latency (µs)")
            ax.set_title(f"{label}{suffix}", fontsize=10)
    # one legend under the panels: it never hides a curve
    fig.legend(handles=legend, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        f"First TCP connection from a pod to the first and the last service ({data['connections']} per point)",
        fontsize=11,
    )
    fig.savefig(path)
    return {"file": str(path), "lines": lines, "axes": len(fig.axes)}


def programming_png(data: dict[str, Any], path: Path) -> dict[str, Any]:
    from matplotlib.ticker import FuncFormatter, LogLocator

    groups = _groups(data)
    fig = _figure(len(groups), 2, 6.4, 4.6)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    lines = 0
    for row, (suffix, modes) in enumerate(groups):
        for col, (key, label, scale, unit) in enumerate(
            (("full_median_s", "full programming", 1.0, "s"), ("change_median_s", "one-service change", 1000.0, "ms"))
        ):
            ax = axes[row][col]
            xs: list[int] = []
            for mode in modes:
                runs = _runs(data, mode)
                x = [r["services"] for r in runs]
                xs += x
                ax.plot(x, [r["programming"][key] * scale for r in runs], marker="o", color=COLORS[mode], label=mode)
                lines += 1
            _log_x(ax, xs)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xlabel("services in the table (log scale)")
            ax.set_ylabel(f"{label} ({unit}, log scale)")
            ax.set_title(f"{label} on the client's node (median){suffix}", fontsize=10)
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Programming kube-proxy's rules: everything, and one service's change", fontsize=11)
    fig.savefig(path)
    return {"file": str(path), "lines": lines, "axes": len(fig.axes)}


def distribution_png(data: dict[str, Any], path: Path) -> dict[str, Any]:
    dists = data.get("distribution") or []
    n = max(1, len(dists))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure(rows, cols, 3.6, 3.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    bars = 0
    for i, d in enumerate(dists):
        ax = axes[i // cols][i % cols]
        names = list(d["counts"])
        counts = [d["counts"][k] for k in names]
        ax.bar(names, counts, color=COLORS.get(d["mode"], "grey"))
        bars += len(names)
        expected = d["n"] / max(1, len(names))
        ax.axhline(expected, color="black", linestyle="--", linewidth=1, label=f"even split ({expected:.0f})")
        sched = f", {d['scheduler']}" if d.get("scheduler") else ""
        ax.set_title(f"{d['mode']}{sched}\nχ² = {d['chi2']:.2f}, p = {d['p']:.3g}", fontsize=10)
        ax.set_xlabel("backend pod")
        ax.set_ylabel(f"connections (of {d['n']})")
        ax.legend(fontsize=8, loc="lower right")
    for j in range(len(dists), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    service = dists[0]["service"] if dists else ""
    fig.suptitle(f"Where {service}'s new connections went, per proxy mode", fontsize=11)
    fig.savefig(path)
    return {"file": str(path), "bars": bars, "panels": len(dists)}


def write_all(data: dict[str, Any], out: Path) -> dict[str, str]:
    """All plots into `out`; data["plot_meta"] records what each holds (tests check it)."""
    meta: dict[str, dict[str, Any]] = {}
    if data["runs"]:
        meta["latency"] = latency_png(data, out / "latency.png")
        meta["programming"] = programming_png(data, out / "programming.png")
    if data.get("distribution"):
        meta["distribution"] = distribution_png(data, out / "distribution.png")
    data["plot_meta"] = {k: {kk: vv for kk, vv in v.items() if kk != "file"} for k, v in meta.items()}
    return {k: v["file"] for k, v in meta.items()}
