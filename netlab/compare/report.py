"""From a compare's measurements to its verdicts, report.md and the terminal tables (pure).

build(data) adds, from data["runs"]:
  series    per mode, per service count: latency p50/p99 (first, last, direct), programming
  slopes    per mode: least-squares slopes against the number of services, with bootstrap
            95 % intervals for the latency ones (µs per 1000 services; s or ms per 1000)
  shape     per mode: does first-connection latency grow with the services ahead of the last
            one (judged on last - first, measured interleaved in one run, so drift between
            runs cancels), against the published shape: iptables grows, nftables and IPVS flat
  distribution, behaviour   the rows of every mode, gathered
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from netlab.compare import stats

__all__ = ["EXPECTED_SHAPE", "build", "markdown", "progress_line", "tables"]

EXPECTED_SHAPE = {"iptables": stats.GROWS, "nftables": stats.FLAT, "ipvs": stats.FLAT}
MODE_ORDER = ("iptables", "nftables", "ipvs")


def _modes(data: dict[str, Any]) -> list[str]:
    present = {r["mode"] for r in data["runs"]}
    return [m for m in MODE_ORDER if m in present]


def _runs(data: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return sorted((r for r in data["runs"] if r["mode"] == mode), key=lambda r: r["services"])


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def series(data: dict[str, Any], mode: str) -> dict[str, list[Any]]:
    runs = _runs(data, mode)
    t = [r["latency"]["targets"] for r in runs]
    return {
        "services": [r["services"] for r in runs],
        "first_p50_us": [x["first"]["p50_us"] for x in t],
        "first_p99_us": [x["first"]["p99_us"] for x in t],
        "last_p50_us": [x["last"]["p50_us"] for x in t],
        "last_p99_us": [x["last"]["p99_us"] for x in t],
        "direct_p50_us": [x["direct"]["p50_us"] for x in t],
        "last_position": [x["last"].get("position") for x in t],
        "full_s": [r["programming"]["full_median_s"] for r in runs],
        "change_s": [r["programming"]["change_median_s"] for r in runs],
    }


def _fit(xs: list[float], ys: list[float | None]) -> stats.Fit | None:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    return stats.fit_line([x for x, _ in pts], [y for _, y in pts])


def slopes(data: dict[str, Any], mode: str) -> dict[str, Any]:
    """Slopes against the number of services, per 1000 services."""
    runs = _runs(data, mode)
    s = series(data, mode)
    xs = [float(x) for x in s["services"]]
    out: dict[str, Any] = {"services": s["services"]}
    if len(set(xs)) < 2:
        return out
    k = 1000.0
    samples = {
        key: {float(r["services"]): r["latency"]["targets"][key]["samples_us"] for r in runs}
        for key in ("first", "last")
    }
    ok = all(samples[key][x] for key in samples for x in xs)
    for key, q in (("last_p50", 50.0), ("first_p50", 50.0), ("last_p99", 99.0)):
        f = _fit(xs, s[f"{key}_us"])
        if f is None:
            continue
        ci = stats.slope_ci(samples[key.split("_")[0]], q=q) if ok else None
        out[f"latency_{key}"] = {
            "us_per_1000": _r(f.slope * k),
            "ci95": [_r(ci[0] * k), _r(ci[1] * k)] if ci else None,
            "intercept_us": _r(f.intercept),
            "r2": _r(f.r2, 3),
        }
    diffs = [
        None if a is None or b is None else a - b for a, b in zip(s["last_p50_us"], s["first_p50_us"], strict=True)
    ]
    f = _fit(xs, diffs)
    if f is not None:
        ci = stats.diff_slope_ci(samples["last"], samples["first"]) if ok else None
        out["latency_last_minus_first_p50"] = {
            "us_per_1000": _r(f.slope * k),
            "ci95": [_r(ci[0] * k), _r(ci[1] * k)] if ci else None,
            "intercept_us": _r(f.intercept),
            "r2": _r(f.r2, 3),
        }
    for key, unit, scale in (("full_s", "s_per_1000", 1.0), ("change_s", "ms_per_1000", 1000.0)):
        f = _fit(xs, s[key])
        if f is not None:
            out[key.replace("_s", "")] = {
                unit: _r(f.slope * k * scale, 4),
                "intercept": _r(f.intercept * scale, 4),
                "r2": _r(f.r2, 3),
            }
    return out


def shape(data: dict[str, Any], mode: str, sl: dict[str, Any]) -> dict[str, Any]:
    """Does latency grow with the services ahead? Judged on last - first (p50), interleaved."""
    d = sl.get("latency_last_minus_first_p50")
    s = series(data, mode)
    if not d or d["ci95"] is None or not s["services"]:
        return {"latency": None, "expected": EXPECTED_SHAPE.get(mode), "holds": None}
    span = (max(s["services"]) - min(s["services"])) / 1000
    base = s["first_p50_us"][0] or 0.0
    growth = d["us_per_1000"] * span
    verdict = stats.shape_of(growth, d["ci95"][0] * span, base)
    expected = EXPECTED_SHAPE.get(mode)
    return {
        "latency": verdict,
        "growth_us": _r(growth, 1),
        "over_services": [min(s["services"]), max(s["services"])],
        "threshold_us": _r(max(5.0, 0.15 * base), 1),
        "expected": expected,
        "holds": verdict == expected,
    }


def build(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in series, slopes, shape, distribution and behaviour from data["runs"]."""
    data["series"] = {m: series(data, m) for m in _modes(data)}
    data["slopes"] = {m: slopes(data, m) for m in _modes(data)}
    data["shape"] = {m: shape(data, m, data["slopes"][m]) for m in _modes(data)}
    verdicts = [v["holds"] for v in data["shape"].values()]
    data["shape_holds"] = None if not verdicts or None in verdicts else all(verdicts)
    data["distribution"] = [d for r in data["runs"] for d in r.get("distribution", [])]
    data["behaviour"] = [b for r in data["runs"] for b in r.get("behaviour", [])]
    data["problems"] = [f"N={r['services']} {r['mode']}: {p}" for r in data["runs"] for p in r.get("problems", [])]
    data["behaviour_failures"] = [f"{b['mode']}: {b['title']}" for b in data["behaviour"] if b["pass"] is False]
    failed = [f"{m}: {c.get('reason')}" for m, c in data.get("columns", {}).items() if c.get("status") == "failed"]
    data["problems"] += failed
    # ok: every column asked for was measured or skipped with its reason, and every measurement's
    # own checks held (the verdicts are findings, not errors)
    data["ok"] = not data["problems"]
    return data


# --- text --------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ci(d: dict[str, Any] | None, digits: int = 1) -> str:
    if not d:
        return "–"
    ci = d.get("ci95")
    return f"{d['us_per_1000']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def progress_line(r: dict[str, Any]) -> str:
    t = r["latency"]["targets"]
    p = r["programming"]
    return (
        f"N={r['services']} {r['mode']}: latency first {_f(t['first']['p50_us'])} / last {_f(t['last']['p50_us'])} µs "
        f"(p50), full programming {p['full_median_s']:.3f} s, one-service change {p['change_median_s'] * 1000:.1f} ms"
        + (f"; problems: {'; '.join(r['problems'])}" if r["problems"] else "")
    )


def _objects_text(o: dict[str, int]) -> str:
    names = {
        "iptables_rules": "rules", "iptables_chains": "chains", "kube_services_rules": "KUBE-SERVICES rules",
        "nft_chains": "chains", "nft_rules": "rules", "nft_set_elements": "set elements",
        "nft_map_elements": "map elements", "ipvs_virtual_servers": "virtual servers",
        "ipvs_real_servers": "real servers", "kube_ipvs0_addresses": "kube-ipvs0 addresses",
        "ipset_entries": "ipset entries",
    }  # fmt: skip
    return ", ".join(f"{v} {names[k]}" for k, v in o.items() if k in names)


def _columns_lines(data: dict[str, Any]) -> list[str]:
    out = []
    for m in data["modes"]:
        c = data["columns"].get(m, {})
        where = {"host": "this host", "vm": "the real-kernel VM tier"}.get(c.get("where", ""), "")
        line = f"- **{m}**: {c.get('status', '?')}" + (f" on {where}" if where else "")
        if c.get("reason") and c.get("status") != "measured" or c.get("where") == "vm":
            line += f" — {c.get('reason')}"
        if c.get("note"):
            line += f" ({c['note']})"
        out.append(line)
    return out


def headline(data: dict[str, Any]) -> list[str]:
    lines = []
    for m in _modes(data):
        sl, sh = data["slopes"][m], data["shape"][m]
        d, last = sl.get("latency_last_minus_first_p50"), sl.get("latency_last_p50")
        if not d or not last:
            continue
        verdict = sh.get("latency") or "–"
        mark = "as published" if sh.get("holds") else f"published: {sh.get('expected')}"
        lines.append(
            f"- **{m}**: first-connection latency to the last service {_ci(last)} µs per 1000 services "
            f"(p50; last − first {_ci(d)}); **{verdict}** ({mark}). "
            f"Full programming {sl['full']['s_per_1000']:+.3f} s per 1000 services, "
            f"one-service change {sl['change']['ms_per_1000']:+.1f} ms per 1000."
        )
    holds = data.get("shape_holds")
    if holds is not None:
        lines.append(
            "- Published shape (iptables latency grows with the services ahead; nftables and IPVS flat): **"
            + ("holds" if holds else "does not hold")
            + "** in this run."
        )
    return lines


def _table(head: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _behaviour_cell(b: dict[str, Any] | None) -> str:
    if b is None:
        return "–"
    mark = {True: " ✅", False: " ❌ FAIL", None: ""}[b["pass"]]
    who = f" by {b['by']}" if b["by"] and b["outcome"] in ("answered", "echo-reply") else ""
    ms = f" ({b['ms']:.0f} ms)" if b.get("ms") is not None and b["outcome"] != "n/a" else ""
    return f"{b['outcome']}{who}{ms}{mark}"


def behaviour_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    modes = [m for m in MODE_ORDER if any(b["mode"] == m for b in data["behaviour"])]
    order: dict[str, str] = {}
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for b in data["behaviour"]:
        order.setdefault(b["id"], b["title"])
        cells[(b["id"], b["mode"])] = b
    rows = [[title, *(_behaviour_cell(cells.get((rid, m))) for m in modes)] for rid, title in order.items()]
    return ["behaviour", *modes], rows


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    s = data["setup"]
    out = [
        f"# netlab compare: {data['topology']}",
        "",
        f"`{data.get('command') or 'netlab compare'}`  ",
        f"{m['date']}; {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}; "
        f"total {data.get('total_s')} s. Lab `{s['lab']}`: the topology plus the compare's own pods and "
        f"services; {data['connections']} new connections per target and run, after {data['warmup']} warm-ups"
        + ("; latency client SCHED_FIFO" if data.get("fifo") else "")
        + ".",
        "",
        "Columns:",
        *_columns_lines(data),
        "",
        "## Headline",
        "",
        *headline(data),
        "",
    ]
    if data.get("plots"):
        out += [f"![{k}]({v})" for k, v in data["plots"].items()] + [""]
    out += ["## First-connection latency (µs)", ""]
    rows = []
    for mode in _modes(data):
        for r in _runs(data, mode):
            t = r["latency"]["targets"]
            rows.append([
                str(r["services"]), mode,
                _f(t["first"]["p50_us"]), _f(t["first"]["p99_us"]),
                _f(t["last"]["p50_us"]), _f(t["last"]["p99_us"]),
                _f(t["last"]["p50_us"] - t["first"]["p50_us"]),
                _f(t["direct"]["p50_us"]),
                f"{t['first'].get('position')} / {t['last'].get('position')} of {r['latency'].get('clusterip_rules')}",
            ])  # fmt: skip
    out += _table(
        ["services", "mode", "first p50", "first p99", "last p50", "last p99", "last − first p50",
         "direct to the pod p50", "positions (first / last)"],
        rows,
    )  # fmt: skip
    out += [
        "",
        "*first*: `a-cmp-first`, the first service kube-proxy's iptables mode looks at; *last*: "
        "`zzz-cmp-last`, the last; both have one endpoint, `cmp-echo`, on the client's node, so the path "
        "differs only by the position. *direct*: the same pod by its IP (every service rule missed). "
        "Positions are read from `iptables-save` in iptables mode; other modes have no list to walk.",
        "",
        "## Slopes (per 1000 services; [95 % bootstrap interval])",
        "",
    ]
    rows = []
    for mode in _modes(data):
        sl, sh = data["slopes"][mode], data["shape"][mode]
        rows.append([
            mode, _ci(sl.get("latency_last_p50")), _ci(sl.get("latency_first_p50")),
            _ci(sl.get("latency_last_minus_first_p50")), _ci(sl.get("latency_last_p99")),
            _f(sl.get("full", {}).get("s_per_1000"), 3), _f(sl.get("change", {}).get("ms_per_1000"), 1),
            f"{sh.get('latency')} (published: {sh.get('expected')})",
        ])  # fmt: skip
    out += _table(
        ["mode", "last p50 µs", "first p50 µs", "last − first µs", "last p99 µs", "full programming s",
         "one-service change ms", "latency shape"],
        rows,
    )  # fmt: skip
    out += [
        "",
        "Shape: *grows* when last − first rises by more than max(5 µs, 15 % of the first service's p50) over "
        "the measured range and its interval stays above zero; *flat* when it rises by less. Judged on last − "
        "first because both are measured interleaved in one run: whatever else the machine does shifts both.",
        "",
        "## Programming (client's node)",
        "",
    ]
    rows = []
    for mode in _modes(data):
        for r in _runs(data, mode):
            p = r["programming"]
            rows.append([
                str(r["services"]), mode, f"{p['full_median_s']:.3f}", str(len(p["full_s"])),
                f"{p['change_median_s'] * 1000:.1f}", str(len(p["change_s"])), f"{r['up_s']:.2f}",
            ])  # fmt: skip
    out += _table(
        ["services", "mode", "full programming s (median)", "n", "one-service change ms (median)", "n",
         "netlab up s"],
        rows,
    )  # fmt: skip
    out += [
        "",
        "*Full programming*: kube-proxy's first sync on the node (its rules removed first), in-process. "
        "*One-service change*: the middle service loses an endpoint, then gets it back (kube-proxy's partial "
        "sync). *netlab up*: the whole `up` that brought the lab to this size and mode (includes the other "
        "nodes).",
        "",
        "## Programmed objects per node",
        "",
    ]
    rows = []
    for mode in _modes(data):
        for r in _runs(data, mode):
            for node, o in r["objects"].items():
                rows.append([str(r["services"]), mode, node, _objects_text(o)])
    out += _table(["services", "mode", "node", "objects"], rows)
    out += ["", "## Load distribution", ""]
    rows = []
    for d in data["distribution"]:
        counts = ", ".join(f"{k} {v}" for k, v in d["counts"].items())
        if d["other"]:
            counts += "; other: " + ", ".join(f"{k} {v}" for k, v in d["other"].items())
        rows.append([
            d["mode"], d["scheduler"] or "–", d["service"], counts, f"{d['chi2']:.2f}", str(d["df"]),
            f"{d['p']:.3g}", "yes" if d["uniform"] else "no",
        ])  # fmt: skip
    out += _table(
        ["mode", "scheduler", "service", "connections per backend", "χ²", "df", "p", "even (p ≥ 0.001)"], rows
    )
    out += [
        "",
        "χ² against an even split over every backend (a backend never chosen counts 0); p ≥ 0.001 is read as "
        "even, the test tests/kernel/test_services.py uses. Source hashing (`sh`) sends one client to one "
        "backend by design.",
        "",
        "## Behaviour (real traffic)",
        "",
    ]
    head, rows = behaviour_rows(data)
    out += _table(head, rows)
    out += [
        "",
        "✅ = what kube-proxy's mode does (see *why* in report.json); ❌ = it differs; no mark = kube-proxy "
        "states nothing for that mode. Outcomes: `refused` (RST or ICMP port unreachable: a REJECT), "
        "`timeout` (dropped, or nothing answered in 2 s), `no-reply` (ping, 1 s), `answered by POD`.",
        "",
    ]
    if data["problems"]:
        out += ["## Problems", "", *[f"- {p}" for p in data["problems"]], ""]
    return "\n".join(out)


def tables(data: dict[str, Any]) -> list[Any]:
    """The terminal view: rich tables of latency, programming, distribution, behaviour."""
    from rich.table import Table

    def table(title: str, *cols: str) -> Table:
        return Table(*cols, title=title, title_justify="left", box=None, padding=(0, 1, 0, 0), pad_edge=False)

    out: list[Any] = []
    t = table(
        "first-connection latency (µs) and programming", "SERVICES", "MODE", "FIRST p50", "p99", "LAST p50", "p99",
        "LAST-FIRST", "FULL s", "1-SVC ms", "OBJECTS (client's node)",
    )  # fmt: skip
    for mode in _modes(data):
        for r in _runs(data, mode):
            lt, p = r["latency"]["targets"], r["programming"]
            node = data["setup"]["client"].split(" on ")[-1]
            t.add_row(
                str(r["services"]), mode + (" (vm)" if r.get("where") == "vm" else ""),
                _f(lt["first"]["p50_us"]), _f(lt["first"]["p99_us"]), _f(lt["last"]["p50_us"]),
                _f(lt["last"]["p99_us"]), _f(lt["last"]["p50_us"] - lt["first"]["p50_us"]),
                f"{p['full_median_s']:.3f}", f"{p['change_median_s'] * 1000:.1f}",
                _objects_text(r["objects"].get(node, {})),
            )  # fmt: skip
    out.append(t)
    t = table(
        "slopes per 1000 services [95 % CI]", "MODE", "LAST p50 µs", "LAST-FIRST µs", "FULL s", "1-SVC ms", "SHAPE"
    )
    for mode in _modes(data):
        sl, sh = data["slopes"][mode], data["shape"][mode]
        t.add_row(
            mode, _ci(sl.get("latency_last_p50")), _ci(sl.get("latency_last_minus_first_p50")),
            _f(sl.get("full", {}).get("s_per_1000"), 3), _f(sl.get("change", {}).get("ms_per_1000"), 1),
            f"{sh.get('latency')} (published: {sh.get('expected')})",
        )  # fmt: skip
    out.append(t)
    t = table("load distribution", "MODE", "SCHEDULER", "PER BACKEND", "χ²", "p", "EVEN")
    for d in data["distribution"]:
        t.add_row(
            d["mode"], d["scheduler"] or "-", " ".join(f"{k}:{v}" for k, v in d["counts"].items()),
            f"{d['chi2']:.2f}", f"{d['p']:.3g}", "yes" if d["uniform"] else "no",
        )  # fmt: skip
    out.append(t)
    head, rows = behaviour_rows(data)
    t = table("behaviour (real traffic)", *[h.upper() for h in head])
    for row in rows:
        t.add_row(*row)
    out.append(t)
    return out
