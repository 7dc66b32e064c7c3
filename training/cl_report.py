"""Write a continual-learning report: report.json, report.md, and the plots people would rather look at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from model_store.modes import ZERO_SHOT

from .plots import pyplot


def _int8_lines(int8: dict[str, Any] | None) -> list[str]:
    """The int8 frozen image pass against PyTorch's, on the final moe-ddas bank (`training/int8_eval.py`)."""
    if not int8:
        return []
    if "error" in int8:
        return ["", f"int8 frozen image pass: not measured ({int8['error']})."]
    keys = list(int8["fp32"])
    lines = [
        "",
        "Frozen image pass in int8 (`--frozen-runtime onnx-int8`) against PyTorch float, on the final "
        "moe-ddas bank (mean % over the domains; routing: task images to their own task; fallback: outside "
        "images to zero-shot):",
        "",
        "| pass | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name in ("fp32", "int8", "delta_points"):
        lines.append(f"| {name} | " + " | ".join(f"{int8[name][k]:.2f}" for k in keys) + " |")
    return lines


def _pm(values: dict[str, Any], key: str, digits: int, scale: float = 1.0) -> str:
    """`mean ± std` of a figure (std when the report has more than one seed), or a dash when missing."""
    v = values.get(key)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    std = values.get(f"{key}_std")
    return f"{v * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std else "")


SUMMARY_TEXT = {
    "transfer_known_vs_zero_shot": "Transfer on the known-concept domains, moe-ddas minus zero-shot (points)",
    "last_ddas_vs_oracle": "Last, moe-ddas minus moe-oracle (points)",
    "plasticity_gap_vs_finetune": "accuracy when learned, finetune minus moe-oracle, mean over tasks (points)",
    "last_ddas_vs_adapter_ddas": "Last, moe-ddas minus adapter-ddas (points)",
    "routing_long_task_accuracy": "routing over the 12-task sequence: task images to their own task",
    "fallback_pretraining": "the pretraining domain's images left to zero-shot by this run's bank (not the 12 tasks')",
    "fallback_near_min": "the lowest share of a near outside domain's images left to zero-shot",
    "cil_old_class_accuracy_last": "class-incremental: old classes' accuracy after the last version (%)",
    "outside_accuracy_vs_zero_shot": "the pretraining domain's accuracy, moe-ddas minus zero-shot (points)",
    "task_agnostic_ddas": "task-agnostic: moe-ddas over the union of all classes seen (%)",
    "last_labels_vs_oracle": "as served, labels matched: Last, moe-ddas-labels minus moe-oracle (points)",
    "routing_long_task_accuracy_labels": "as served, labels matched: routing over the 12-task sequence",
    "fallback_pretraining_labels": "as served, labels matched: the pretraining domain's images left to zero-shot",
    "fallback_near_min_labels": "as served, labels matched: the lowest near outside domain's fallback",
}


def _summary_lines(report: dict[str, Any]) -> list[str]:
    summary = report.get("summary")
    if not summary:
        return []
    seeds = report.get("seeds", [])
    lines = ["", f"Summary over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}):"]
    lines += ["", "| figure | mean ± std | goal | holds on the mean | key |", "| --- | --- | --- | --- | --- |"]
    goals = report.get("goals") or {}
    for key, text in SUMMARY_TEXT.items():
        shown = _pm(summary, key, 3 if "routing" in key or "fallback" in key else 2)
        lines.append(f"| {text} | {shown} | {_goal_cells(goals.get(key))} | `{key}` |")
    if "wall_minutes" in goals:
        wall = goals["wall_minutes"]
        lines.append(f"| wall time (minutes) | {wall['value']} | {_goal_cells(wall)} | `seconds.wall` |")
    return lines


def _goal_cells(goal: dict[str, Any] | None) -> str:
    if goal is None:
        return "- | -"
    if goal["met"] is None:  # not measured, or a run of other sizes than the goal's
        return f"{goal['goal']} | {'not measured' if goal['value'] is None else 'not judged (other run sizes)'}"
    return f"{goal['goal']} | {'yes' if goal['met'] else '**no**'}"


def _activation_lines(report: dict[str, Any]) -> list[str]:
    """Whose experts each task's router picks (top-k choices over every block, on a training sample)."""
    shares = (report.get("expert_activation") or {}).get("moe-ddas")
    if not shares:
        return []
    owners = list(report["domains"])
    lines = ["", "Expert activation, moe-ddas: share of each task's top-k picks that go to each task's experts (%):"]
    lines += ["", "| task \\ experts of | " + " | ".join(owners) + " |", "|---" * (len(owners) + 1) + "|"]
    for task, row in shares.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * row[o]:.0f}" if o in row else "" for o in owners) + " |")
    return lines


def _agnostic_lines(report: dict[str, Any]) -> list[str]:
    """Each method's accuracy over the union of all classes (training/cl_agnostic.py) beside its Last."""
    agnostic = report.get("task_agnostic")
    if not agnostic:
        return []
    doms = report["domains"]
    lines = [
        "",
        "Task-agnostic: every test image against the union of all classes seen (%), after the last task:",
        "",
        "| method | over the union | Last, own task's labels | " + " | ".join(doms) + " |",
        "|---" * (len(doms) + 3) + "|",
    ]
    for m, row in agnostic.items():
        cells = " | ".join(f"{row['per_domain'][d]:.1f}" for d in doms)
        last = _pm(report["methods"].get(m, {}), "last", 1)
        lines.append(f"| `{m}` | {_pm(row, 'mean', 1)} | {last} | {cells} |")
    return lines


def _cil_lines(cil: dict[str, Any] | None) -> list[str]:
    if not cil:
        return []
    lines = [
        "",
        f"Class-incremental: `{cil['domain']}` learned as {len(cil['versions'])} versions of one task "
        f"({' / '.join(', '.join(g) for g in cil['groups'])}); accuracy (%) over the classes seen so far:",
        "",
        "| version | classes | old classes, pinned | old classes, routed | all, pinned | all, routed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in cil["versions"]:
        cells = [_pm(r, f"{a}_class_accuracy_{m}", 1, 100) for a in ("old", "all") for m in ("pinned", "auto")]
        lines.append(f"| {r['version']} | {len(r['classes'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Old classes after the last version: {_pm(cil, 'old_class_accuracy_last', 1)}; "
        f"forgetting {_pm(cil, 'forgetting', 1)} points.",
    ]
    return lines


def format_markdown(report: dict[str, Any], command: str | None = None) -> str:
    doms = report["domains"]
    lines = ["# Continual-learning benchmark", ""]
    if command:
        lines += ["    " + command, ""]
    lines += [
        f"Domains in order: {', '.join(doms)}; outside domain: {report.get('outside') or 'none'}; "
        f"{report['config']['steps']} steps per task; backbone {report['backbone']['arch']}.",
        "",
        "| method | Transfer | Avg | Last | learned | forgetting (points) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in report["methods"].items():
        cells = " | ".join(_pm(r, k, 1) for k in ("transfer", "avg", "last", "learned", "forgetting"))
        lines.append(f"| `{m}` | {cells} |")
    lines += _summary_lines(report) + _agnostic_lines(report) + _activation_lines(report)
    lines += _cil_lines(report.get("class_incremental"))
    sweep = report.get("expert_blocks") or []
    if len(sweep) > 1:
        lines += [
            "",
            "Experts in the top K blocks of each tower (a routed image shares the frozen pass below them; the first "
            "row is the default bank):",
            "",
            "| K | moe-oracle Last | moe-ddas Last | moe-ddas Transfer | training seconds |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in sweep:
            lines.append(
                f"| {r['expert_blocks']} of {r['of_layers']} | {r['oracle_last']:.1f} | {r['ddas_last']:.1f} | "
                f"{r['ddas_transfer']:.1f} | {r['train_seconds']} |"
            )
    routing = report.get("routing") or {}
    if routing:
        lines += ["", f"Routing (moe-ddas, per image): task_accuracy {routing['task_accuracy']:.3f}"]
        if "zero_shot_fallback" in routing:
            lines[-1] += f", zero_shot_fallback {routing['zero_shot_fallback']:.3f}"
        lines += ["", "| method | task_accuracy | zero_shot_fallback |", "| --- | --- | --- |"]
        for m, r in report.get("routing_by_method", {}).items():
            fb = r.get("zero_shot_fallback")
            lines.append(f"| `{m}` | {r['task_accuracy']:.3f} | {'' if fb is None else f'{fb:.3f}'} |")
    lines += _int8_lines(report.get("int8"))
    if "long" in routing:  # the long-sequence routing measurement (`clipbank bench routing`), every kind
        from .routing_report import format_markdown as routing_markdown

        part = routing_markdown(routing, command or "clipbank bench cl")  # run as a part of it, not alone
        lines += ["", part.replace("# clipbank bench routing", "## Routing: the long sequence (as `bench routing`)", 1)]
    lines += ["", "Accuracy matrices (rows: after training task t; columns: test domain i; %):"]
    for m, r in report["methods"].items():
        lines += ["", f"`{m}`", "", "| after \\ on | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
        for t, row in enumerate(r["matrix"]):
            lines.append(f"| {doms[t]} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items())]
    if "machine" in report:  # reports before 2026-12-07 did not record it
        lines += ["", f"Machine: {report['machine']}."]
    return "\n".join(lines) + "\n"


def plot_matrices(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    methods = list(report["methods"])
    doms = report["domains"]
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, m in zip(axes.flat, methods, strict=False):
        a = np.asarray(report["methods"][m]["matrix"]) * 100
        ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        for (t, i), v in np.ndenumerate(a):
            ax.text(i, t, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(doms)), doms, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(doms)), doms, fontsize=7)
    fig.suptitle("accuracy A[t, i] (%): row = after task t, column = test domain i")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(report: dict[str, Any], path: Path, method: str = "moe-ddas") -> None:
    plt = pyplot()
    per = report["routing_by_method"][method]["per_domain"]
    rows = list(per)
    cols = [*report["domains"], ZERO_SHOT]
    a = np.array([[per[r].get(c, 0.0) for c in cols] for r in rows]) * 100
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2, 0.6 * len(rows) + 1.8))
    ax.imshow(a, vmin=0, vmax=100, cmap="Blues")
    for (r, c), v in np.ndenumerate(a):
        ax.text(c, r, f"{v:.0f}", ha="center", va="center", color="white" if v > 60 else "black", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("routed to")
    ax.set_ylabel("test images of")
    ax.set_title(f"routing (%), {method}, final bank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_over_time(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    methods = list(report["methods"])
    doms = report["domains"]
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, m in zip(axes.flat, methods, strict=False):
        a = np.asarray(report["methods"][m]["matrix"]) * 100
        for i, d in enumerate(doms):
            ax.plot(range(i, len(doms)), a[i:, i], marker="o", ms=3, label=d)
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(doms)), [f"t{t}" for t in range(len(doms))], fontsize=7)
        ax.set_ylim(-3, 103)  # a line at 0 or 100% stays in sight, off the frame
        ax.set_xlabel("after task", fontsize=7)
    for row in axes:
        row[0].set_ylabel("accuracy (%)", fontsize=7)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("each task's accuracy (%) from when it is learned to the end")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_cl_report(report: dict[str, Any], out: Path, command: str | None = None) -> list[Path]:
    """report.json, report.md, accuracy_matrices.png, routing.png, accuracy_over_time.png; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "accuracy_matrices.png", out / "accuracy_over_time.png"]
    paths[0].write_text(json.dumps(report, indent=2))
    plot_matrices(report, paths[2])
    plot_over_time(report, paths[3])
    if "moe-ddas" in report.get("routing_by_method", {}):
        paths.append(out / "routing.png")
        plot_routing(report, paths[-1])
    if "long" in report.get("routing", {}):
        from .routing_report import plot as plot_long_routing

        paths.append(plot_long_routing(report["routing"], out / "routing_long.png"))
    plots = ", ".join(f"[`{p.name}`]({p.name})" for p in paths[2:])  # the report names its plots beside it
    paths[1].write_text(format_markdown(report, command) + f"\nPlots: {plots}.\n")
    return paths
