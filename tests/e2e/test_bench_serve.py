"""`clipbank bench serve` end to end, at toy scale: real servers, real load, a complete report."""

from __future__ import annotations

import json

import pytest

from benchmarks.serve import ServeBenchConfig
from benchmarks.serve_report import missing_ratios
from benchmarks.serve_run import TRAFFIC_PER_TASK, default_images, run_bench_serve
from model_store.backbone import load_backbone
from tests.e2e.conftest import ONNX_CACHE
from training.expert_blocks import default_expert_blocks

pytestmark = pytest.mark.slow


def test_bench_serve_writes_a_complete_report(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = ServeBenchConfig(
        images=default_images(8),
        concurrency=(1, 4),
        growth=(0, 1, 3),
        auto_tasks=3,
        key_concurrency=4,
        requests=12,
        max_seconds=5,
        onnx_concurrency=(4,),
        latency_requests=20,
        env={"OMP_NUM_THREADS": "1", "CLIPBANK_ONNX_CACHE": ONNX_CACHE},
    )
    report = run_bench_serve(tmp_path, cfg, [("tiny", "tiny")], "test")
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["ratios"] == report["ratios"]
    for key in (
        "auto_vs_baseline",
        "zero_shot_vs_baseline",
        "p99_auto_vs_baseline",
        "tasks3_vs_tasks1",
        "tasks3_vs_tasks1_sequential",
    ):
        assert report["ratios"][key] > 0, key
    assert report["ratios"]["memory_per_task_vs_bundle"] is not None
    assert report["ratios"]["onnx_vs_torch_zero_shot"] > 0 and report["ratios"]["int8_vs_fp32"] > 0
    assert missing_ratios(report, cfg) == []  # every key the issue asks for, with a value
    routing = report["backends"][0]["routing"]  # really auto-routed: the selectors claim family images...
    assert routing["task_images"] == 3 * TRAFFIC_PER_TASK and routing["routed"] >= 0.5
    assert routing["outside_fallback"] >= 0.9  # ...and leave the outside ones to zero-shot
    assert report["ratios"]["tasks3_shadow_vs_none_auto"] > 0
    (tiny,) = report["backends"]
    seen = {(r["server"], r.get("runtime"), r["mode"], r["tasks"], r["concurrency"]) for r in tiny["load"]}
    assert seen == {
        ("baseline", None, "zero-shot", 0, 1),
        ("baseline", None, "zero-shot", 0, 4),
        ("litserve", None, "zero-shot", 0, 1),
        ("litserve", None, "zero-shot", 0, 4),
        ("clipbank", "torch", "zero-shot", 0, 1),
        ("clipbank", "torch", "zero-shot", 0, 4),
        ("clipbank", "torch", "auto", 1, 1),  # every level at 1 task too: its RSS reading is after warm-up
        ("clipbank", "torch", "auto", 1, 4),
        ("clipbank", "torch", "auto", 3, 1),
        ("clipbank", "torch", "auto", 3, 4),
        ("clipbank", "torch", "pinned", 3, 4),
        ("clipbank", "onnx", "zero-shot", 0, 4),
        ("clipbank", "onnx", "auto", 3, 4),
        ("clipbank", "onnx-int8", "zero-shot", 0, 4),
        ("clipbank", "onnx-int8", "auto", 3, 4),
    }
    for row in tiny["load"]:
        assert row["errors"] == 0 and row["images"] > 0 and row["status"] == {"200": row["requests"]}, row
        assert 0 < row["fraction_of_gemm"] < 1
    assert [p["bank_size"] for p in tiny["pushes"]] == [0, 1, 2]
    assert [(r["round"], r["tasks"]) for r in tiny["paired"]] == [(0, 1), (0, 3), (1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 for r in tiny["paired"])
    assert set(tiny["routing_by_tasks"]) == {"1", "3"}  # where each side of the growth ratio routes its traffic
    assert [tiny["routing_by_tasks"][n]["task_images"] for n in ("1", "3")] == [TRAFFIC_PER_TASK, 3 * TRAFFIC_PER_TASK]
    assert report["ratios"]["tasks3_vs_tasks1_same_work_tiny"] > 0
    assert [r["shadow"] for r in tiny["shadow"]] == [False, True, True, False] * 2  # ABBA rounds
    for r in tiny["shadow"]:  # all auto: every image scored (and one warm-up request per client)
        assert not r["shadow"] or r["shadow_images_scored"] == r["images"] + 4, r
    assert all(p["upload_end_to_routable_s"] < 30 for p in tiny["pushes"])
    assert set(tiny["rss_bytes"]) == {"0", "1", "3"}
    assert tiny["flops"]["image_adapted"] > tiny["flops"]["image_frozen"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "auto_vs_baseline" in md and "| baseline |" in md
    assert "| >= 1.0 | not judged (not the full run) |" in md and "| yes |" not in md  # the full run's goals only
    assert {p for p in report["plots"]} == {"serve-load.png", "serve-growth.png"}
    assert all((tmp_path / p).stat().st_size > 10_000 for p in report["plots"])
    # the shared frozen prefix: one server per K, rounds of auto beside zero-shot, the warm-up round left out
    auto = [r for r in tiny["prefix"] if r["mode"] == "auto"]
    assert sorted({r["expert_blocks"] for r in auto}) == [1, 2, 4] and len(auto) == 3 * 3
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 and r["round"] > 0 for r in tiny["prefix"])
    assert all(report["ratios"][f"auto_vs_zero_shot_k{k}"] > 0 for k in (1, 2, 4))
    default = default_expert_blocks(load_backbone("tiny", "cpu")) or 4
    assert report["ratios"]["auto_vs_zero_shot"] == report["ratios"][f"auto_vs_zero_shot_k{default}"]
    assert "Shared frozen prefix" in md
    lat = tiny["latency_1client"]  # one client, pinned: client, server and compute times over the model's own
    assert lat["client_p50_ms"] >= lat["server_p50_ms"] >= lat["compute_p50_ms"] > 0 and lat["model_p50_ms"] > 0
    assert report["ratios"]["latency_1client_vs_single_thread"] > 0
