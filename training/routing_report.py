"""The routing benchmark's files: report.json, report.md, and a plot of routing against the number of tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_store.machine import machine_facts, machine_line

from .plots import pyplot


def routing_keys(result: dict[str, Any], default_kind: str) -> dict[str, Any]:
    """The report's `routing` block: the default kind's figures at the top, every kind's under `kinds`."""
    kinds = [k for k in result if isinstance(result[k], dict) and "long" in result[k]]
    chosen = result[default_kind] if default_kind in kinds else result[kinds[0]]
    return {
        "near_ood": chosen["near_ood"],
        "plain_ood": chosen["plain_ood"],
        "long": {
            "task_accuracy": chosen["long"]["task_accuracy"],
            "zero_shot_fallback": chosen["long"]["zero_shot_fallback"],
            "own": chosen["long"]["own"],
        },
        **{f"{key}_labels": chosen[f"{key}_labels"] for key in ("near_ood", "plain_ood", "long")},
        "default_kind": default_kind,
        "kinds": {k: result[k] for k in kinds},
        "sequence": result["sequence"],
        "outside": result["outside"],
        "near": result["near"],
        "reference": result["reference"],
    }


def format_markdown(routing: dict[str, Any], command: str) -> str:
    lines = [
        "# clipbank bench routing",
        "",
        f"Command: `{command}`. {len(routing['sequence'])} tasks in turn: {', '.join(routing['sequence'])}; "
        f"reference set: {routing['reference']} embeddings. Each image routed as the server does (argmin of "
        "error / threshold, zero-shot above 1). Cost: the selectors' time per image over a frozen pass's.",
        "",
        "Rows marked *labels* route as the server does by default for a client that sends each image with its own "
        "domain's labels: only tasks that know one of them may claim it (label-aware routing). The other rows are "
        "the selectors alone.",
        "",
        "| kind | own task, all tasks | worst own | plain outside fallback | near outside fallback | cost |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in routing["kinds"].items():
        for suffix, name in (("", kind), ("_labels", f"{kind}, labels")):
            own = r["long" + suffix]["own"]
            worst = min(own, key=own.get)
            near = ", ".join(f"{n} {v:.2f}" for n, v in r["near_ood" + suffix].items())
            lines.append(
                f"| {name} | {r['long' + suffix]['task_accuracy']:.3f} | {worst} {own[worst]:.2f} | "
                f"{r['plain_ood' + suffix]:.3f} | {near} | {r['cost']['selectors_vs_frozen']:.3f} |"
            )
    lines += ["", "Own routing per task (the default kind's bank of every task):", ""]
    default = routing["kinds"][routing["default_kind"]]
    own = default["long"]["own"]
    lines += ["| routing | " + " | ".join(own) + " |", "| --- |" + " --- |" * len(own)]
    for suffix, name in (("", "selectors alone"), ("_labels", "labels matched")):
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in default["long" + suffix]["own"].values()) + " |")
    return "\n".join(lines) + "\n"


def plot(routing: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    outside = routing["outside"]  # the headline fallback (an outside check: a mean with the near domains was drawn
    for kind, r in routing["kinds"].items():  # here, 0.33 at 12 tasks where the table said 0.946)
        n = [c["tasks"] for c in r["curve"]]
        (line,) = ax1.plot(n, [c["task_accuracy"] for c in r["curve"]], marker="o", label=kind)
        ax2.plot(n, [c["fallback"][outside] for c in r["curve"]], marker="o", label=kind, color=line.get_color())
        ax1.plot(n, [c["task_accuracy_labels"] for c in r["curve"]], ls="--", color=line.get_color())
        ax2.plot(n, [c["fallback_labels"][outside] for c in r["curve"]], ls="--", color=line.get_color())
    ax1.set(xlabel="tasks in the bank", ylabel="share of images", ylim=(0, 1.02))
    ax1.set_title("learned tasks' images routed to their own task", fontsize=10)
    ax2.set(xlabel="tasks in the bank", ylabel="share of images", ylim=(0, 1.02))  # long labels ran into the title
    ax2.set_title(f"images of {outside} (never learned) left to zero-shot", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count of tasks: no 1.2, 1.4
    fig.suptitle(
        f"routing over {len(routing['sequence'])} tasks learned in turn, per selector kind\n(solid: selectors alone; "
        "dashed: sent with their own labels; the near outside domains are in report.md)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_routing_report(routing: dict[str, Any], out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    saved = {"command": command, "machine": machine_line(facts), "machine_facts": facts, "routing": routing}
    (out / "report.json").write_text(json.dumps(saved, indent=2))
    (out / "report.md").write_text(format_markdown(routing, command) + f"\nMachine: {machine_line(facts)}.\n")
    return [out / "report.json", out / "report.md", plot(routing, out / "routing.png")]
