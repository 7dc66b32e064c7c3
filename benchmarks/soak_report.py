"""The soak's report: markdown tables and a plot of memory, latency and swaps over time, and the hostile windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.plots import pyplot

MIB = 2**20


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MIB:.1f}"


def _status(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def _soak_lines(report: dict[str, Any]) -> list[str]:
    s, w, rss = report["soak"], report["warmup"], report["rss"]
    return [
        f"## Soak: {s['seconds']:g} s after a {w['seconds']:g} s warm-up",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| requests | {s['requests']} ({s['requests_per_s']}/s) |",
        f"| statuses | {_status(s['status'])} |",
        f"| 5xx | {s['5xx']} |",
        f"| transport errors | {s['transport_errors']} |",
        f"| p50 / p90 / p99 / max ms (200s) | {s['p50_ms']} / {s['p90_ms']} / {s['p99_ms']} / {s['max_ms']} |",
        f"| routed answers checked | {s['routed_answers']} |",
        f"| routed to a bundle not active during the request | {s['inactive_routes']} |",
        f"| pinned answers from another task | {s['wrong_task']} |",
        f"| 404 task_not_found while the task was active throughout | {s['not_found_while_active']} |",
        f"| swaps (failed) | {s['swaps']} ({s['swap_failures']}) |",
        f"| swap actions | {_status(s['swap_actions'])} |",
        f"| swap p50 / max s | {s['swap_p50_s']} / {s['swap_max_s']} |",
        "",
        "| RSS MiB | start (ready, empty bank) | after warm-up | end | peak | peak / warm-up | end / warm-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| server | {_mib(rss['start_bytes'])} | {_mib(rss['warm_bytes'])} | {_mib(rss['end_bytes'])} | "
        f"{_mib(rss['peak_bytes'])} | {rss['peak_vs_warm']} | {rss['end_vs_warm']} |",
        "",
        f"Peak: the larger of the 1 Hz VmRSS samples ({_mib(rss['peak_sampled_bytes'])} MiB) and VmHWM reset "
        f"after the warm-up ({_mib(rss['hwm_bytes'])} MiB). Warm-up: {w['requests']} requests, "
        f"{w['5xx']} 5xx, {w['inactive_routes']} inactive routes.",
    ]


def _guard_line(rss: dict[str, Any]) -> str:
    killed = rss["killed_by_guard"]
    if killed is None:
        return f"RSS guard ({_mib(rss['guard_bytes'])} MiB, above which the server is killed): never reached."
    return (
        f"**The RSS guard killed the server** at {killed['t']} s: its RSS was {_mib(killed['bytes'])} MiB, over "
        f"the guard of {_mib(rss['guard_bytes'])} MiB (which keeps the machine out of the OOM killer's reach)."
    )


def _hostile_lines(h: dict[str, Any]) -> list[str]:
    cfg = h["settings"]
    a, b = h["alone"], h["beside_hostile"]
    lines = [
        "",
        f"## Hostile: {cfg['normal_clients']} normal clients alone, then beside {cfg['clients']} hostile ones "
        f"({cfg['seconds']:g} s each)",
        "",
        "Normal request: 1 image, zero-shot, 2 fixed labels.",
        "",
        "| window | requests | errors | p50 ms | p95 ms | p99 ms | statuses |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in (("alone", a), ("beside hostile", b)):
        row = f"| {name} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} |"
        lines.append(row + f" {_status(r['status'])} |")
    lines += [
        "",
        f"**p99_ratio_hostile = {h['p99_ratio_hostile']}** (p50 ratio {h['p50_ratio_hostile']}).",
        "",
        "| hostile request | statuses | p50 s |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {_status(v['status'])} | {v['p50_s']} |" for k, v in h["hostile_requests"].items()]
    lines += [
        "",
        f"Hostile 5xx other than 503: {h['hostile_5xx_not_503']}; transport errors: "
        f"{h['hostile_transport_errors']}. `unfinished`: still running when the window closed (cancelled).",
        "",
        f"After the hostile clients left, the server stayed busy for {h['drain_s']} s (until it used under 5% of "
        f"a core over 1 s; None: not within {h['settings']['drain_seconds']:g} s, or gone). Peak RSS from the "
        f"baseline window to the end of that drain: {_mib(h.get('peak_sampled_bytes'))} MiB.",
    ]
    if h.get("killed_at_s") is not None:
        lines += [
            "",
            f"**The RSS guard killed the server {h['killed_at_s'] - h['spans'][1]:.0f} s into the hostile window.** "
            "The figures beside hostile clients are of the answers before that; its transport errors came after.",
        ]
    return lines


def format_report(report: dict[str, Any]) -> str:
    cfg = report["settings"]
    lines = [
        "# clipbank bench soak",
        "",
        f"Command: `{report['command']}`. {report['machine']}. Backbone {report['server']['backbone']}, frozen "
        f"runtime {report['server']['frozen_runtime']}; {cfg['clients']} clients, {cfg['tasks']} tasks, a store "
        f"change every {cfg['swap_seconds']:g} s. Tracebacks in the server log: {report['server']['tracebacks']} "
        f"during the run, {report['server']['tracebacks_at_shutdown']} at shutdown.",
        "",
        "| goal | value | wanted | met |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {k} | {g['value']} | {g['goal']} | {g['met']} |" for k, g in report["goals"].items()]
    lines += ["", _guard_line(report["rss"]), ""] + _soak_lines(report)
    if report.get("hostile"):
        lines += _hostile_lines(report["hostile"])
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", []))]
    return "\n".join(lines) + "\n"


def _timeline_axes(plt: Any, report: dict[str, Any]) -> Any:
    fig, (ax_m, ax_l) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    soak_end = report["settings"]["warmup_seconds"] + report["soak"]["seconds"]
    rss = [(t, v) for t, v in report["rss"]["series"] if t <= soak_end + 1]
    ax_m.plot([t for t, _ in rss], [v / MIB for _, v in rss], lw=1, label="VmRSS (1 Hz)")
    if report["rss"]["warm_bytes"]:
        warm = report["rss"]["warm_bytes"] / MIB
        ax_m.axhline(warm, color="grey", ls="--", lw=0.8, label="after warm-up")
        ax_m.axhline(1.1 * warm, color="red", ls=":", lw=0.8, label="warm-up + 10%")
    ax_m.set_ylabel("server RSS MiB")
    win = [w for w in report["windows"] if w["p50_ms"] is not None]
    ax_l.plot([w["t"] for w in win], [w["p50_ms"] for w in win], marker=".", label="p50")
    ax_l.plot([w["t"] for w in win], [w["p99_ms"] for w in win], marker=".", label="p99")
    ax_l.set_ylabel(f"latency ms per {report['settings']['window_seconds']:g} s window")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("seconds since the warm-up began")
    for ax in (ax_m, ax_l):
        for s in report["swaps"]:
            ax.axvline(s["t"], color="green" if s["ok"] else "red", alpha=0.3, lw=0.5)  # 0.15 looked grey
        ax.axvspan(0, report["settings"]["warmup_seconds"], color="grey", alpha=0.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    ax_m.set_title("soak: grey = warm-up; green lines = swaps (red: failed)")
    return fig


def _hostile_axes(plt: Any, report: dict[str, Any]) -> Any:
    h = report["hostile"]
    fig, (ax_l, ax_s, ax_m) = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1.6, 1.4]})
    names, a, b = ["p50", "p95", "p99"], h["alone"], h["beside_hostile"]
    x = range(len(names))
    ax_l.bar([i - 0.2 for i in x], [a[f"{n}_ms"] or 0 for n in names], 0.4, label="alone")
    ax_l.bar([i + 0.2 for i in x], [b[f"{n}_ms"] or 0 for n in names], 0.4, label="beside hostile")
    ax_l.set_xticks(list(x), names)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("normal 1-image request, ms")
    ax_l.set_title(f"normal requests beside hostile ones: p99 ratio {h['p99_ratio_hostile']}", fontsize=9)
    ax_l.legend(fontsize=7)
    kinds = list(h["hostile_requests"])
    statuses = sorted({s for v in h["hostile_requests"].values() for s in v["status"]})
    left = [0] * len(kinds)
    for status in statuses:
        counts = [h["hostile_requests"][k]["status"].get(status, 0) for k in kinds]
        ax_s.barh(range(len(kinds)), counts, left=left, label=status)
        left = [lo + c for lo, c in zip(left, counts, strict=True)]
    ax_s.set_yticks(range(len(kinds)), [k.replace(", ", ",\n", 1) for k in kinds], fontsize=6)
    ax_s.set_xlabel("hostile requests")
    ax_s.set_title("what each kind of hostile request was answered (status)")
    ax_s.legend(fontsize=7)
    spans = h["spans"]
    rss = [(t, v / MIB) for t, v in report["rss"]["series"] if spans[0] <= t <= spans[3] + 1]
    ax_m.plot([t for t, _ in rss], [v for _, v in rss], lw=1)
    ax_m.axvspan(spans[1], spans[2], color="orange", alpha=0.2, label="hostile clients")
    ax_m.axvspan(spans[2], spans[3], color="yellow", alpha=0.2, label="server draining what they left")
    ax_m.axhline(report["rss"]["guard_bytes"] / MIB, color="red", ls=":", lw=0.8, label="RSS guard")
    ax_m.set_xlabel("seconds since the warm-up began")
    ax_m.set_ylabel("server RSS MiB")
    ax_m.set_title("the server's memory through the hostile phase")
    ax_m.legend(fontsize=7)
    for ax in (ax_l, ax_s, ax_m):
        ax.grid(alpha=0.3)
    return fig


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """soak.png (RSS, latency windows, swaps) and, with a hostile phase, soak-hostile.png."""
    plt = pyplot()

    figures = {"soak.png": _timeline_axes(plt, report)}
    if report.get("hostile"):
        figures["soak-hostile.png"] = _hostile_axes(plt, report)
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return list(figures)
