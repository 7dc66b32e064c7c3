"""`clipbank bench serve`: prepare each backbone (random checkpoint, synthetic bundles, FLOPs), run
`service.bench`, and write report.json, report.md and plots."""

from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model_store.backbone import load_backbone
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle, tensor_bytes
from model_store.profile import gemm_rate, pass_flops
from service.bench import Backend, ServeBenchConfig, bench_backend, find_row
from training.samples import domain_pngs
from training.synthetic import synthetic_bundle

log = logging.getLogger(__name__)

VIT_B = "ViT-B-32"


def random_checkpoint(arch: str, path: Path, seed: int = 0) -> str:
    """Save an open_clip model with seeded random weights as safetensors; returns its backbone reference."""
    import open_clip
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"{arch}:file:{path}"


def prepare_backend(label: str, ref: str, n_tasks: int) -> Backend:
    """Load the backbone here, build `n_tasks` synthetic bundles one on top of the other, count FLOPs."""
    bb = load_backbone(ref, "cpu")
    bank, bundles, sizes, names, parsed = empty_bank(bb), [], [], [], []
    for k in tqdm(range(n_tasks), desc=f"{label}: synthetic bundles", file=sys.stderr):
        name = f"task-{k:03d}"
        data = synthetic_bundle(bank, name, seed=k)
        b = read_bundle(data)
        parsed.append(b)
        bank = build_bank(bb, parsed, (), k + 1, bank)
        bundles.append(data)
        sizes.append(tensor_bytes(b))
        names.append(name)
    flops = pass_flops(bank)
    return Backend(label, ref, bundles, sizes, names, flops)


def _flops_per_image(report: dict[str, Any], row: dict[str, Any], cfg: ServeBenchConfig) -> float:
    f = report["flops"]
    if row["server"] == "baseline":  # every request encodes its image and all its prompts
        return f["image_frozen"] + len(cfg.labels) * f["text_frozen_per_prompt"]
    if row["mode"] == "zero-shot" or not row["tasks"]:
        return f["image_frozen"]
    routed = cfg.routed_per_5 / 5
    return f["image_frozen"] + routed * f["image_adapted"] + row["tasks"] * f["selector_per_task"]


def add_derived(report: dict[str, Any], cfg: ServeBenchConfig, gemm: float) -> None:
    """Achieved FLOP rate per load row, as a fraction of the measured GEMM rate."""
    for row in report["load"] + report.get("paired", []):
        flops = _flops_per_image(report, row, cfg)
        row["gflop_per_image"] = round(flops / 1e9, 3)
        row["achieved_gflops"] = round(row["images_per_s"] * flops / 1e9, 2)
        row["fraction_of_gemm"] = round(row["images_per_s"] * flops / gemm, 3)


def ratios(report: dict[str, Any], cfg: ServeBenchConfig) -> dict[str, float | None]:
    rows, c = report["load"], cfg.key_concurrency

    def get(**m: Any) -> dict[str, Any]:
        return find_row(rows, concurrency=c, **m) or {}

    base = get(server="baseline")
    zs = get(server="clipbank", runtime="torch", mode="zero-shot")
    auto = get(server="clipbank", runtime="torch", mode="auto", tasks=cfg.auto_tasks)
    big = max(max(cfg.growth), cfg.auto_tasks)  # as service.bench pushes and pairs
    t1, tn = get(runtime="torch", mode="auto", tasks=1), get(runtime="torch", mode="auto", tasks=big)
    rss = report["rss_bytes"]
    per_task = (rss[str(big)] - rss["1"]) / (big - 1) if big > 1 and "1" in rss else None
    bundle = sum(report["tensor_bytes"][1:big]) / max(big - 1, 1)
    onnx_zs = get(server="clipbank", runtime="onnx", mode="zero-shot")
    onnx_auto = get(server="clipbank", runtime="onnx", mode="auto")

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    paired = {n: [r["images_per_s"] for r in report.get("paired", []) if r["tasks"] == n] for n in (1, big)}
    paired_ratio = (
        div(statistics.median(paired[big]), statistics.median(paired[1])) if paired[1] and paired[big] else None
    )
    return {
        "auto_vs_baseline": div(auto.get("images_per_s"), base.get("images_per_s")),
        "zero_shot_vs_baseline": div(zs.get("images_per_s"), base.get("images_per_s")),
        "p99_auto_vs_baseline": div(auto.get("p99_ms"), base.get("p99_ms")),
        f"tasks{big}_vs_tasks1": paired_ratio,
        f"tasks{big}_vs_tasks1_sequential": div(tn.get("images_per_s"), t1.get("images_per_s")),
        "memory_per_task_vs_bundle": div(per_task, bundle),
        "onnx_vs_torch_zero_shot": div(onnx_zs.get("images_per_s"), zs.get("images_per_s")),
        "onnx_vs_torch_auto": div(onnx_auto.get("images_per_s"), auto.get("images_per_s")),
    }


GOALS = {
    "auto_vs_baseline": (">=", 1.0),
    "zero_shot_vs_baseline": (">=", 1.5),
    "p99_auto_vs_baseline": ("<=", 1.5),
    "tasks100_vs_tasks1": (">=", 0.9),
    "memory_per_task_vs_bundle": ("<=", 1.2),
}


def _meets(value: float | None, goal: tuple[str, float]) -> str:
    if value is None:
        return "not measured"
    op, target = goal
    return "yes" if (value >= target if op == ">=" else value <= target) else "NO"


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# clipbank bench serve",
        "",
        f"Command: `{report['command']}`. {report['machine']}. Measured GEMM rate (float32 2048², torch, "
        f"{report['torch_threads']} threads): **{report['gemm_gflops']} GFLOP/s**. Wall time {report['seconds']} s.",
        "",
        f"Each request carries 1 image. Zero-shot requests carry {len(cfg['labels'])} labels; in auto mode "
        f"{cfg['routed_per_5']} of 5 requests are pinned to a task (its own classes; the task's selector still "
        "scores every image) and the rest are auto with labels, which every selector declines.",
        "",
        f"## Ratios (key backbone {report['key']}, concurrency {cfg['key_concurrency']})",
        "",
        "| ratio | value | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    for k, v in report["ratios"].items():
        goal = GOALS.get(k)
        shown = " ".join(map(str, goal)) if goal else "-"
        lines.append(f"| {k} | {v} | {shown} | {_meets(v, goal) if goal else '-'} |")
    for b in report["backends"]:
        lines += ["", f"## {b['label']} (`{b['backbone']}`)", "", "FLOPs per pass (GFLOP): "]
        lines[-1] += ", ".join(f"{k} {v / 1e9:.3f}" for k, v in b["flops"].items())
        lines += [
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
        if b.get("paired"):
            lines += [
                "",
                f"Paired: a server with 1 task and the one with {b['paired'][-1]['tasks']}, alternating "
                f"({cfg['key_concurrency']} clients, half-length levels):",
                "",
                "| round | tasks | images/s | p50 ms | p99 ms |",
                "| --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {r['round']} | {r['tasks']} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} |"
                for r in b["paired"]
            ]
        rss = b["rss_bytes"]
        lines += ["", "| tasks | RSS MiB |", "| --- | --- |"]
        lines += [f"| {k} | {v / 2**20:.1f} |" for k, v in rss.items()]
        tb = b["tensor_bytes"]
        lines += ["", f"Bundle tensor bytes: first {tb[0]}, last {tb[-1]} (routers widen as the bank grows)."]
        lines += ["", "| bank size | bundle bytes | upload s | upload end to routable s |", "| --- | --- | --- | --- |"]
        pushes = b["pushes"]
        shown = [p for p in pushes if p["bank_size"] in {0, 1, 9, 10, 49, 50, 99} or p is pushes[-1]]
        for p in shown:
            lines.append(f"| {p['bank_size']} | {p['bytes']} | {p['upload_s']} | {p['upload_end_to_routable_s']} |")
        worst = max(pushes, key=lambda p: p["upload_s"] + p["upload_end_to_routable_s"])
        lines += [
            "",
            f"Slowest upload plus time to routable: {worst['upload_s'] + worst['upload_end_to_routable_s']:.3f} s "
            f"(bank size {worst['bank_size']}).",
        ]
    return "\n".join(lines) + "\n"


def _save(plt: Any, fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    n = len(report["backends"])
    fig, axes = plt.subplots(n, 2, figsize=(11, 4 * n), squeeze=False)
    for (ax_t, ax_p), b in zip(axes, report["backends"]):
        series = {}
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
    names.append(_save(plt, fig, out, "serve-load.png"))

    fig, axes = plt.subplots(n, 3, figsize=(14, 3.6 * n), squeeze=False)
    for (ax_t, ax_m, ax_s), b in zip(axes, report["backends"]):
        c = report["config"]["key_concurrency"]
        pts = sorted(
            (r["tasks"], r["images_per_s"])
            for r in b["load"]
            if r["server"] == "clipbank"
            and r.get("runtime") == "torch"
            and r["mode"] == "auto"
            and r["concurrency"] == c
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
        ax_s.plot(
            sizes, [p["upload_end_to_routable_s"] for p in b["pushes"]], marker=".", label="upload end to routable"
        )
        ax_s.set_ylim(bottom=0)
        ax_s.legend(fontsize=7)
        ax_s.set_title(f"{b['label']}: hot-swap seconds")
        for ax in (ax_t, ax_m, ax_s):
            ax.set_xlabel("tasks in the bank")
            ax.grid(alpha=0.3)
    names.append(_save(plt, fig, out, "serve-growth.png"))
    return names


def run_bench_serve(
    out: Path, cfg: ServeBenchConfig, backbones: list[tuple[str, str | None]], command: str
) -> dict[str, Any]:
    """`backbones`: (label, reference); a reference of None means a seeded random ViT-B-32 checkpoint."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    gemm = gemm_rate()
    backends = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, ref in backbones:
            if ref is None:
                ref = random_checkpoint(VIT_B, Path(tmp) / "vit-b-32-random.safetensors")
            backend = prepare_backend(label, ref, max(max(cfg.growth), cfg.auto_tasks))
            result = bench_backend(backend, cfg)
            add_derived(result, cfg, gemm)
            result["backbone"] = label if "file:" in backend.backbone else backend.backbone
            backends.append(result)
    key = backends[-1]
    report = {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "gemm_gflops": round(gemm / 1e9, 1),
        "key": key["label"],
        "config": {k: v for k, v in vars(cfg).items() if k not in ("images", "env")},
        "ratios": ratios(key, cfg),
        "ratios_by_backbone": {b["label"]: ratios(b, cfg) for b in backends},
        "backends": backends,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report))
    report["plots"] = plot(report, out)
    return report


def default_images(n: int = 24) -> list[bytes]:
    """Request images: PNGs of the offline domains (decoding and resizing cost as in real traffic)."""
    return [png for domain in ("shapes", "digits", "textures", "glyphs") for png in domain_pngs(domain, n // 4)]
