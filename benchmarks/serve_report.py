"""report.md and the two plots of `clipbank bench serve`, from its report dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.plots import pyplot

GOALS = {
    "auto_vs_baseline": (">=", 1.0),
    "zero_shot_vs_baseline": (">=", 1.5),
    "p99_auto_vs_baseline": ("<=", 1.5),
    "zero_shot_vs_litserve": (">=", 1.2),
    "p99_zero_shot_vs_litserve": ("<=", 1.0),
    "auto_vs_litserve": (">=", 1.0),
    "tasks100_vs_tasks1": (">=", 0.9),
    "tasks100_vs_tasks1_tiny": (">=", 0.9),
    "memory_per_task_vs_bundle": ("<=", 1.2),
    "memory_per_task_vs_bundle_tiny": ("<=", 1.2),
    "auto_vs_zero_shot": (">=", 0.8),
    "latency_1client_vs_single_thread": ("<=", 1.2),
    "gemm_fraction_16": (">=", 0.7),
}


def expected_ratios(cfg: Any) -> list[str]:
    """The keys every `bench serve` run must put in `ratios` (with a value), given what `cfg` turns on."""
    big = max(max(cfg.growth), cfg.auto_tasks)
    keys = ["auto_vs_baseline", "zero_shot_vs_baseline", "p99_auto_vs_baseline", f"tasks{big}_vs_tasks1"]
    keys.append("memory_per_task_vs_bundle")
    keys += ["latency_1client_vs_single_thread", f"tasks{big}_vs_tasks1_tiny", f"gemm_fraction_{cfg.key_concurrency}"]
    keys.append(f"tasks{big}_vs_tasks1_same_work_tiny")
    keys += ["auto_traffic_routed", "auto_traffic_outside_fallback"]
    if cfg.litserve:
        keys += ["zero_shot_vs_litserve", "p99_zero_shot_vs_litserve", "auto_vs_litserve"]
    if cfg.prefix:
        keys.append("auto_vs_zero_shot")
    if cfg.onnx:
        keys += ["onnx_vs_torch_zero_shot", "int8_vs_fp32"]
    return keys


def missing_ratios(report: dict[str, Any], cfg: Any) -> list[str]:
    return [k for k in expected_ratios(cfg) if report["ratios"].get(k) is None]


PUSH_ROWS = {0, 1, 9, 10, 49, 50, 99}  # bank sizes whose upload is shown in report.md


def _meets(value: float | None, goal: tuple[str, float]) -> str:
    if value is None:
        return "not measured"
    op, target = goal
    if value < 0:  # every ratio here is of two sizes: below 0, the difference it stands on was within the noise
        return "not measured (negative: within the noise)"
    return "yes" if (value >= target if op == ">=" else value <= target) else "NO"


def _header(report: dict[str, Any]) -> list[str]:
    cfg = report["config"]
    lines = [
        "# clipbank bench serve",
        "",
        f"Command: `{report['command']}`. {report['machine']}. Measured GEMM rate (float32 2048², torch, "
        f"{report['torch_threads']} threads): **{report['gemm_gflops']} GFLOP/s**. Wall time {report['seconds']} s.",
        "",
        f"Each request carries 1 image and, unless pinned, {len(cfg['labels'])} labels. Auto traffic is really "
        f"auto-routed: no pins; {cfg['routed_per_5']} of 5 requests carry an image of a task's own generated "
        "family (tasks in turn), the rest an outside image, and the selectors decide each one. Pinned rows pin "
        f"{cfg['routed_per_5']} of 5 requests to a task instead.",
        "",
        f"## Ratios (key backbone {report['key']}, concurrency {cfg['key_concurrency']})",
        "",
        "| ratio | value | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    # the goals are the full run's (`ServeBenchConfig.judged`): a quick run's levels last about half a second, and
    # two in a row read yes then NO on three goals (an outside check); it checks every key is there, not that it holds
    judged = cfg.get("judged", False)
    for k, v in report["ratios"].items():
        goal = GOALS.get(k)
        shown = " ".join(map(str, goal)) if goal else "-"
        met = (_meets(v, goal) if judged else "not judged (not the full run)") if goal else "-"
        lines.append(f"| {k} | {v} | {shown} | {met} |")
    return lines


def _load_table(b: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| server | runtime | mode | tasks | conc. | requests | errors | images/s | p50 ms | p95 ms | p99 ms "
        "| GFLOP/img | GFLOP/s | of GEMM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in b["load"]:
        lines.append(
            f"| {r['server']} | {r.get('runtime', '-')} | {r['mode']} | {r['tasks']} | {r['concurrency']} | "
            f"{r['requests']} | {r['errors']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
            f"{r['p99_ms']} | {r['gflop_per_image']} | {r['achieved_gflops']} | {r['fraction_of_gemm']} |"
        )
    return lines


def _paired_table(b: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    if not b.get("paired"):
        return []
    lines = [
        "",
        f"Paired: a server with 1 task and the one with {b['paired'][-1]['tasks']}, alternating "
        f"({cfg['key_concurrency']} clients, half-length levels):",
        "",
        "| round | tasks | images/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['round']} | {r['tasks']} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} |" for r in b["paired"]
    ]
    routing = b.get("routing_by_tasks") or {}
    if routing:
        shares = ", ".join(f"{r['routed']:.1%} with {n} task{'s' * (n != '1')}" for n, r in routing.items())
        lines += ["", f"Task-family images routed to a task (each distinct image once): {shares}."]
    return lines


def _prefix_table(b: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    if not b.get("prefix"):
        return []
    layers = b["prefix"][0]["of_layers"]
    lines = [
        "",
        f"Shared frozen prefix: one server per K (experts in the top K of {layers} blocks, "
        f"{cfg['auto_tasks']} tasks), auto mode in alternating rounds beside zero-shot ({cfg['key_concurrency']} "
        "clients, half-length levels, after a warm-up round):",
        "",
        "| round | mode | K | images/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['round']} | {r['mode']} | {r['expert_blocks'] or '-'} | {r['images_per_s']} | {r['p50_ms']} | "
        f"{r['p99_ms']} |"
        for r in b["prefix"]
    ]
    return lines + ["", ", ".join(f"{k} {v}" for k, v in b.get("prefix_ratios", {}).items())]


def _memory_and_swaps(b: dict[str, Any]) -> list[str]:
    lines = ["", "| tasks | RSS MiB |", "| --- | --- |"]
    lines += [f"| {k} | {v / 2**20:.1f} |" for k, v in b["rss_bytes"].items()]
    tb = b["tensor_bytes"]
    lines += ["", f"Bundle tensor bytes: first {tb[0]}, last {tb[-1]} (routers widen as the bank grows)."]
    lines += ["", "| bank size | bundle bytes | upload s | upload end to routable s |", "| --- | --- | --- | --- |"]
    pushes = b["pushes"]
    for p in pushes:
        if p["bank_size"] in PUSH_ROWS or p is pushes[-1]:
            lines.append(f"| {p['bank_size']} | {p['bytes']} | {p['upload_s']} | {p['upload_end_to_routable_s']} |")
    worst = max(pushes, key=lambda p: p["upload_s"] + p["upload_end_to_routable_s"])
    return lines + [
        "",
        f"Uploads the interference gate refused (then made with force=true): "
        f"{sum(bool(p.get('forced')) for p in pushes)} of {len(pushes)}.",
        "",
        f"Slowest upload plus time to routable: {worst['upload_s'] + worst['upload_end_to_routable_s']:.3f} s "
        f"(bank size {worst['bank_size']}).",
    ]


def format_report(report: dict[str, Any]) -> str:
    lines = _header(report)
    for b in report["backends"]:
        lines += ["", f"## {b['label']} (`{b['backbone']}`)", "", "FLOPs per pass (GFLOP): "]
        lines[-1] += ", ".join(f"{k} {v / 1e9:.3f}" for k, v in b["flops"].items())
        cfg = report["config"]
        if b.get("routing"):
            r = b["routing"]
            lines += [
                "",
                f"Auto traffic at {cfg['auto_tasks']} tasks, each distinct image classified once: "
                f"{r['routed']:.1%} of the {r['task_images']} task-family images routed to a task "
                f"({r['own_task']:.1%} to their own), {r['outside_fallback']:.1%} of outside images left "
                "to zero-shot.",
            ]
        lines += _load_table(b) + _paired_table(b, cfg) + _prefix_table(b, cfg) + _memory_and_swaps(b)
    return "\n".join(lines) + "\n"


def _save(plt: Any, fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _plot_load(plt: Any, report: dict[str, Any], out: Path) -> str:
    """Throughput and p99 latency against concurrency, one row per backbone."""
    n = len(report["backends"])
    fig, axes = plt.subplots(n, 2, figsize=(11, 4 * n), squeeze=False)
    for (ax_t, ax_p), b in zip(axes, report["backends"], strict=True):
        series: dict[str, list[tuple[int, float, float]]] = {}
        for r in b["load"]:
            if r["mode"] == "auto" and r["tasks"] != report["config"]["auto_tasks"]:
                continue
            key = f"{r['server']} {r.get('runtime', '')} {r['mode']}".replace("  ", " ")
            series.setdefault(key, []).append((r["concurrency"], r["images_per_s"], r["p99_ms"]))
        for key, pts in series.items():
            pts.sort()
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            ax_p.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=key)
        for ax, what in ((ax_t, "images/s"), (ax_p, "p99 latency ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(what)
            ax.set_title(f"{b['label']}: {what}")
            ax.grid(alpha=0.3)
        ax_p.set_yscale("log")
        ax_t.legend(fontsize=7)
    return _save(plt, fig, out, "serve-load.png")


def _growth_row(axes: Any, b: dict[str, Any], c: int) -> None:
    ax_t, ax_m, ax_s = axes
    pts = sorted(
        (r["tasks"], r["images_per_s"])
        for r in b["load"]
        if r["server"] == "clipbank" and r.get("runtime") == "torch" and r["mode"] == "auto" and r["concurrency"] == c
    )
    ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="one server, growing")
    paired = sorted((r["tasks"], r["images_per_s"]) for r in b.get("paired", []))
    if paired:
        ax_t.plot([p[0] for p in paired], [p[1] for p in paired], "x", label="paired rounds (1 vs most tasks)")
    ax_t.set_ylim(0, 1.1 * max([p[1] for p in pts + paired] or [1]))
    ax_t.legend(fontsize=7)
    ax_t.set_title(f"{b['label']}: auto images/s, {c} clients")
    rss = sorted((int(k), v / 2**20) for k, v in b["rss_bytes"].items())
    ax_m.plot([p[0] for p in rss], [p[1] for p in rss], marker="o")
    ax_m.set_title(f"{b['label']}: server RSS MiB")
    sizes = [p["bank_size"] for p in b["pushes"]]
    ax_s.plot(sizes, [p["upload_s"] for p in b["pushes"]], marker=".", label="upload round trip")
    ax_s.plot(sizes, [p["upload_end_to_routable_s"] for p in b["pushes"]], marker=".", label="upload end to routable")
    ax_s.set_ylim(bottom=0)
    ax_s.legend(fontsize=7)
    ax_s.set_title(f"{b['label']}: hot-swap seconds")
    for ax in axes:
        ax.set_xlabel("tasks in the bank")
        ax.grid(alpha=0.3)


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """serve-load.png and serve-growth.png in `out`; returns their names."""
    plt = pyplot()

    n = len(report["backends"])
    names = [_plot_load(plt, report, out)]
    fig, axes = plt.subplots(n, 3, figsize=(14, 3.6 * n), squeeze=False)
    for row, b in zip(axes, report["backends"], strict=True):
        _growth_row(row, b, report["config"]["key_concurrency"])
    names.append(_save(plt, fig, out, "serve-growth.png"))
    return names
