"""`clipbank bench serve`: prepare each backbone (random checkpoint, synthetic bundles, FLOPs), run
`benchmarks.serve`, and write report.json, report.md and plots."""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model_store.backbone import Backbone, load_backbone
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle, tensor_bytes
from model_store.machine import machine_facts, machine_line
from model_store.reference import find_reference
from training.data import LabelledImages, load_domain
from training.expert_blocks import default_expert_blocks, with_expert_blocks
from training.progress import progress_bar
from training.scoring import frozen_features

from .profile import gemm_rate, pass_flops
from .samples import domain_pngs, png_bytes
from .serve import Backend, ServeBenchConfig, bench_backend, find_row
from .serve_prefix import prefix_ratios, prefix_rows
from .serve_report import format_report, plot
from .shadow_cost import shadow_ratio
from .synthetic import family_images, family_selector, synthetic_bundle

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


TRAFFIC_PER_TASK = 6  # distinct request images of each task's family


def outside_features(bb: Backbone, per_domain: int = 8) -> torch.Tensor:
    """Frozen embeddings of outside images (the offline domains' training splits; requests use their test
    splits), which the synthetic selectors are calibrated not to claim."""
    domains = ("shapes", "digits", "textures", "glyphs")
    images = [im for d in domains for im in load_domain(d, "train").images[:per_domain]]
    return frozen_features(bb, LabelledImages(images, [0] * len(images), ("x",)))


def prepare_backend(
    label: str, ref: str, n_tasks: int, expert_blocks: int | None = None, bb: Backbone | None = None
) -> Backend:
    """Load the backbone here (unless given), build `n_tasks` synthetic bundles one on top of the other (experts
    in the top `expert_blocks` blocks; None: the training default), each with a selector fitted to a generated
    image family of its own and request images of that family; count FLOPs."""
    bb = bb or load_backbone(ref, "cpu")
    reference = find_reference(bb)  # as training does: the selectors are calibrated not to claim these either
    negatives = outside_features(bb)
    if reference is not None:
        negatives = torch.cat([negatives, reference.embeddings.to(negatives.dtype)])
    bank, bundles, sizes, names, parsed = with_expert_blocks(empty_bank(bb), expert_blocks), [], [], [], []
    traffic = []
    for k in progress_bar(range(n_tasks), desc=f"{label}: synthetic bundles", file=sys.stderr):
        name = f"task-{k:03d}"
        data = synthetic_bundle(bank, name, seed=k, selector=family_selector(bb, k, negatives))
        b = read_bundle(data)
        parsed.append(b)
        bank = build_bank(bb, parsed, (), k + 1, bank)
        bundles.append(data)
        sizes.append(tensor_bytes(b))
        names.append(name)
        traffic.append([png_bytes(im) for im in family_images(k, TRAFFIC_PER_TASK, bb.image_size, seed=2)])
    flops = pass_flops(bank)
    return Backend(label, ref, bundles, sizes, names, flops, bb, traffic)


def _flops_per_image(report: dict[str, Any], row: dict[str, Any], cfg: ServeBenchConfig) -> float:
    f = report["flops"]
    if row["server"] == "baseline":  # every request encodes its image and all its prompts
        return f["image_frozen"] + len(cfg.labels) * f["text_frozen_per_prompt"]
    if row["mode"] == "zero-shot" or not row["tasks"]:
        return f["image_frozen"]  # the LitServe peer's text embeddings are cached, as are clipbank's
    adapted = routed_share(report, row, cfg) * f["image_adapted"]
    return f["image_frozen"] + adapted + row["tasks"] * f["selector_per_task"]


def routed_share(report: dict[str, Any], row: dict[str, Any], cfg: ServeBenchConfig) -> float:
    """The share of a load row's images that take the adapted pass: the pinned share, or for auto traffic what the
    selectors were seen to route (measured at the auto-mode bank size, `traffic_routing`)."""
    routing = report.get("routing") or {}
    if row["mode"] == "pinned" or not routing:
        return cfg.routed_per_5 / 5
    return auto_share(routing, cfg)


def auto_share(routing: dict[str, Any], cfg: ServeBenchConfig) -> float:
    """The share of auto traffic that takes the adapted pass, given where the selectors sent it
    (`traffic_routing`): task-family images routed, plus outside images not left to zero-shot."""
    task_share = cfg.routed_per_5 / 5
    return task_share * routing["routed"] + (1 - task_share) * (1 - routing["outside_fallback"])


def _work_per_image(report: dict[str, Any], cfg: ServeBenchConfig, tasks: int) -> float | None:
    """FLOPs of the passes an auto image takes on average with `tasks` tasks (selectors left out: their cost is
    the bank's, which the growth ratio is there to show), from where the selectors routed its traffic."""
    routing = (report.get("routing_by_tasks") or {}).get(str(tasks))
    if routing is None:
        return None
    f = report["flops"]
    return f["image_frozen"] + auto_share(routing, cfg) * f["image_adapted"]


def add_derived(report: dict[str, Any], cfg: ServeBenchConfig, gemm: float) -> None:
    """Achieved FLOP rate per load row, as a fraction of the measured GEMM rate."""
    for row in report["load"] + report.get("paired", []):
        flops = _flops_per_image(report, row, cfg)
        row["gflop_per_image"] = round(flops / 1e9, 3)
        row["achieved_gflops"] = round(row["images_per_s"] * flops / 1e9, 2)
        row["fraction_of_gemm"] = round(row["images_per_s"] * flops / gemm, 3)


def _growth(report: dict[str, Any], cfg: ServeBenchConfig, big: int) -> tuple[float | None, float | None]:
    """The paired rounds' ratio of medians, `big` tasks over 1, as measured and at equal work."""
    paired = {n: [r["images_per_s"] for r in report.get("paired", []) if r["tasks"] == n] for n in (1, big)}
    if not paired[1] or not paired[big]:
        return None, None
    ratio = statistics.median(paired[big]) / statistics.median(paired[1])
    work = {n: _work_per_image(report, cfg, n) for n in (1, big)}  # None unless routing was measured at both
    same = ratio * work[big] / work[1] if work[1] and work[big] else None
    return round(ratio, 3), None if same is None else round(same, 3)


def ratios(report: dict[str, Any], cfg: ServeBenchConfig) -> dict[str, float | None]:
    rows, c = report["load"], cfg.key_concurrency

    def get(**m: Any) -> dict[str, Any]:
        return find_row(rows, concurrency=c, **m) or {}

    base, lit = get(server="baseline"), get(server="litserve")
    zs = get(server="clipbank", runtime="torch", mode="zero-shot")
    auto = get(server="clipbank", runtime="torch", mode="auto", tasks=cfg.auto_tasks)
    big = max(max(cfg.growth), cfg.auto_tasks)  # as benchmarks.serve pushes and pairs
    t1, tn = get(runtime="torch", mode="auto", tasks=1), get(runtime="torch", mode="auto", tasks=big)
    rss = report["rss_bytes"]
    per_task = (rss[str(big)] - rss["1"]) / (big - 1) if big > 1 and "1" in rss else None
    bundle = sum(report["tensor_bytes"][1:big]) / max(big - 1, 1)
    onnx_zs = get(server="clipbank", runtime="onnx", mode="zero-shot")
    onnx_auto = get(server="clipbank", runtime="onnx", mode="auto")
    int8_zs = get(server="clipbank", runtime="onnx-int8", mode="zero-shot")
    int8_auto = get(server="clipbank", runtime="onnx-int8", mode="auto")
    dzs, dauto = (onnx_zs, onnx_auto) if onnx_zs else (zs, auto)  # the default CPU runtime's rows

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    lat = report.get("latency_1client", {})
    paired_ratio, same_work = _growth(report, cfg, big)
    return {
        "auto_vs_baseline": div(auto.get("images_per_s"), base.get("images_per_s")),
        "zero_shot_vs_baseline": div(zs.get("images_per_s"), base.get("images_per_s")),
        "p99_auto_vs_baseline": div(auto.get("p99_ms"), base.get("p99_ms")),
        # against LitServe: clipbank as shipped on CPU (frozen_runtime=auto: ONNX Runtime, when measured), and
        # with both on PyTorch (the _torch keys)
        "zero_shot_vs_litserve": div(dzs.get("images_per_s"), lit.get("images_per_s")),
        "p99_zero_shot_vs_litserve": div(dzs.get("p99_ms"), lit.get("p99_ms")),
        "auto_vs_litserve": div(dauto.get("images_per_s"), lit.get("images_per_s")),
        "zero_shot_vs_litserve_torch": div(zs.get("images_per_s"), lit.get("images_per_s")),
        "p99_zero_shot_vs_litserve_torch": div(zs.get("p99_ms"), lit.get("p99_ms")),
        "auto_vs_litserve_torch": div(auto.get("images_per_s"), lit.get("images_per_s")),
        # clipbank zero-shot on PyTorch: its FLOP rate over PyTorch's own GEMM rate (ONNX Runtime's kernels can beat
        # that rate, so it is no bound for the ONNX rows: their fraction is in the load table, not here)
        f"gemm_fraction_{c}": zs.get("fraction_of_gemm"),
        f"tasks{big}_vs_tasks1": paired_ratio,
        f"tasks{big}_vs_tasks1_sequential": div(tn.get("images_per_s"), t1.get("images_per_s")),
        # the paired ratio at equal work: each side's images/s times its frozen + routed-share x adapted FLOPs per
        # image, so that a side whose selectors route more of its traffic is not counted as slower for it
        f"tasks{big}_vs_tasks1_same_work": same_work,
        "memory_per_task_vs_bundle": div(per_task, bundle),
        "onnx_vs_torch_zero_shot": div(onnx_zs.get("images_per_s"), zs.get("images_per_s")),
        "onnx_vs_torch_auto": div(onnx_auto.get("images_per_s"), auto.get("images_per_s")),
        "int8_vs_fp32": div(int8_zs.get("images_per_s"), onnx_zs.get("images_per_s")),  # ONNX Runtime, both
        "int8_vs_fp32_auto": div(int8_auto.get("images_per_s"), onnx_auto.get("images_per_s")),
        f"tasks{big}_shadow_vs_none_auto": shadow_ratio(report.get("shadow", [])),
        # one client, one image pinned to a task: through the server (as the client sees it, and the server's
        # own total) over the same classification on one thread in this process
        "latency_1client_vs_single_thread": div(lat.get("client_p50_ms"), lat.get("model_p50_ms")),
        "server_time_1client_vs_single_thread": div(lat.get("server_p50_ms"), lat.get("model_p50_ms")),
    }


TINY_KEYS = ("latency_1client_vs_single_thread", "server_time_1client_vs_single_thread")  # "for a pinned tiny image"


def headline(backends: list[dict[str, Any]], cfg: ServeBenchConfig) -> dict[str, float | None]:
    """The key (last) backbone's ratios, with the tiny backbone's where the goal is tiny's: its 1-client latency
    ratios and its growth ratio (as `tasks{N}_vs_tasks1_tiny`)."""
    key = backends[-1]
    out = {**ratios(key, cfg), **key.get("prefix_ratios", {})}
    tiny = next((b for b in backends if b["label"] == "tiny"), None)
    if tiny is not None:
        mine = ratios(tiny, cfg)
        big = max(max(cfg.growth), cfg.auto_tasks)
        out.update({k: mine[k] for k in TINY_KEYS})
        out[f"tasks{big}_vs_tasks1_tiny"] = mine[f"tasks{big}_vs_tasks1"]
        out[f"tasks{big}_vs_tasks1_same_work_tiny"] = mine[f"tasks{big}_vs_tasks1_same_work"]
        out["memory_per_task_vs_bundle_tiny"] = mine["memory_per_task_vs_bundle"]
    routing = key.get("routing") or {}
    out["auto_traffic_routed"] = routing.get("routed")  # of task-family images, at the auto-mode bank size
    out["auto_traffic_outside_fallback"] = routing.get("outside_fallback")
    return out


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
            bb = load_backbone(ref, "cpu")
            backend = prepare_backend(label, ref, max(max(cfg.growth), cfg.auto_tasks) + 1, bb=bb)  # +1: shadow
            result = bench_backend(backend, cfg)
            if cfg.prefix:
                result["prefix"] = prefix_rows(label, ref, bb, cfg)
                found = prefix_ratios(result["prefix"])
                main = default_expert_blocks(bb) or bb.towers["visual"].layers
                result["prefix_ratios"] = {**found, "auto_vs_zero_shot": found.get(f"auto_vs_zero_shot_k{main}")}
            add_derived(result, cfg, gemm)
            result["backbone"] = label if "file:" in backend.backbone else backend.backbone
            backends.append(result)
    key = backends[-1]
    report = {
        "command": command,
        "machine": f"{machine_line(facts := machine_facts())}; {torch.get_num_threads()} torch threads",
        "machine_facts": facts,
        "torch_threads": torch.get_num_threads(),
        "gemm_gflops": round(gemm / 1e9, 1),
        "key": key["label"],
        "config": {k: v for k, v in vars(cfg).items() if k not in ("images", "env")},
        "ratios": headline(backends, cfg),
        "ratios_by_backbone": {b["label"]: {**ratios(b, cfg), **b.get("prefix_ratios", {})} for b in backends},
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
