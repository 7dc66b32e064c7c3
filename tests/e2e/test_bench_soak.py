"""`clipbank bench soak` end to end, at toy scale: a real server, swaps under load, hostile clients, a full report."""

from __future__ import annotations

import json

import pytest

from benchmarks.hostile import HostileConfig
from benchmarks.soak import SoakConfig, run_soak, soak_config
from benchmarks.timeline import ANY, Timeline
from clipbank.cli import build_parser
from tests.e2e.conftest import ONNX_CACHE

HOSTILE_STATUSES = {"200", "413 limit_exceeded", "503 overloaded", "unfinished"}


def test_timeline_allows_only_bundles_active_during_the_request():
    t = Timeline({"a": "v1"})
    t.record("a", 10.0, 11.0, "v2")  # v1 until 11 at the latest, v2 from 10 at the earliest
    t.record("a", 20.0, 21.0, None)
    assert t.possible("a", 0, 5) == {"v1"}
    assert t.possible("a", 10.5, 10.6) == {"v1", "v2"}
    assert t.possible("a", 12, 19) == {"v2"}
    assert t.possible("a", 12, 22) == {"v2", None}
    assert not t.allows("a", "v1", 12, 19) and t.allows("a", None, 25, 26)
    assert t.possible("unknown", 0, 1) == {None}
    t.record("a", 30.0, 31.0, ANY)
    assert t.allows("a", "anything", 32, 33)


def test_cli_arguments_reach_the_config():
    args = build_parser().parse_args(["bench", "soak", "--minutes", "2", "--clients", "5", "--hostile", "0"])
    cfg = soak_config(args.quick, args.hostile, minutes=args.minutes, clients=args.clients, swap_seconds=None)
    assert (cfg.minutes, cfg.clients, cfg.swap_seconds, cfg.hostile) == (2, 5, 2.0, None)
    assert soak_config(True, None, minutes=2.0).minutes == 2.0  # given wins over quick's (was a TypeError)
    quick = soak_config(True, 3)
    assert quick.minutes < 1 and quick.hostile is not None and quick.hostile.clients == 3


def test_a_failed_soak_leaves_no_earlier_report_behind(tmp_path):
    """A server that cannot start: the soak fails, and an earlier run's report is not left to be read as its own."""
    for name in ("report.json", "report.md"):
        (tmp_path / name).write_text("an earlier run's")
    cfg = SoakConfig(server_args=("--no-such-flag",), hostile=None, warmup_seconds=0)
    with pytest.raises(Exception, match="exited|start"):
        run_soak(cfg, tmp_path, "test")
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_bench_soak_writes_a_complete_report(tmp_path):
    hostile = HostileConfig(clients=2, normal_clients=2, seconds=4, images=4, width=2000, height=3000, labels=300)
    cfg = SoakConfig(
        minutes=10 / 60,
        clients=4,
        swap_seconds=0.4,
        tasks=2,
        warmup_seconds=3,
        hostile=hostile,
        env={"OMP_NUM_THREADS": "1", "CLIPBANK_ONNX_CACHE": ONNX_CACHE},
        progress_seconds=5,
    )
    report = run_soak(cfg, tmp_path, "test")
    assert json.loads((tmp_path / "report.json").read_text())["goals"] == report["goals"]
    soak = report["soak"]
    assert soak["requests"] > 50 and soak["status"].get("200", 0) > 0
    assert set(soak["status"]) <= {"200", "404 task_not_found"}, soak["status"]
    assert soak["5xx"] == 0 and soak["transport_errors"] == 0
    assert soak["routed_answers"] > 0
    assert soak["inactive_routes"] == 0, soak["inactive_examples"]
    assert soak["wrong_task"] == 0 and soak["not_found_while_active"] == 0
    assert soak["swaps"] > 5 and soak["swap_failures"] == 0, soak["swap_errors"]
    assert set(soak["swap_actions"]) == {"flip", "delete", "reactivate", "push"}
    rss = report["rss"]
    assert 0 < rss["start_bytes"] <= rss["peak_bytes"] and rss["warm_bytes"] <= rss["peak_bytes"]
    assert rss["peak_vs_warm"] >= 1 and len(rss["series"]) >= 10
    h = report["hostile"]
    assert h["alone"]["errors"] == 0 and h["beside_hostile"]["errors"] == 0
    assert h["p99_ratio_hostile"] > 0 and h["hostile_5xx_not_503"] == 0
    assert h["hostile_requests"] and set(h["hostile_requests"]) <= set(h["settings"]["kinds"])
    for kind, got in h["hostile_requests"].items():
        assert set(got["status"]) <= HOSTILE_STATUSES, (kind, got)
    assert report["server"]["tracebacks"] == 0 and report["rss"]["killed_by_guard"] is None
    assert set(report["goals"]) == {
        "soak_5xx",
        "inactive_routes",
        "wrong_task",
        "not_found_while_active",
        "swap_failures",
        "server_tracebacks",
        "peak_rss_vs_warm",
        "killed_by_rss_guard",
        "p99_ratio_hostile",
        "hostile_5xx_not_503",
    }
    assert "p99_ratio_hostile" in (tmp_path / "report.md").read_text()
    assert report["plots"] == ["soak.png", "soak-hostile.png"]
    assert all((tmp_path / p).stat().st_size > 10_000 for p in report["plots"])


def test_rss_guard_kills_a_process_over_its_limit():
    import subprocess

    from benchmarks.procstat import RssSampler

    proc = subprocess.Popen(["sleep", "60"])
    try:
        with RssSampler(proc.pid, every=0.05, limit=1) as sampler:
            assert proc.wait(10) == -9
        assert sampler.tripped is not None and sampler.tripped[1] > 1
    finally:
        proc.kill()
        proc.wait()


def test_bench_soak_exits_1_when_a_goal_is_not_met(monkeypatch, tmp_path, capsys):
    """It exited 0 with 6755 5xx answers in its own report (an outside check)."""
    import benchmarks.soak
    from clipbank.cli import main

    def fake(cfg, out, command):
        met = {"soak_5xx": {"value": 6755, "goal": "== 0", "met": False}, "wrong_task": {"met": True}}
        (out / "report.md").write_text("the report\n")
        return {"goals": met}

    monkeypatch.setattr(benchmarks.soak, "run_soak", fake)
    assert main(["bench", "soak", "--quick", "--out", str(tmp_path)]) == 1
    assert "goals not met: soak_5xx" in capsys.readouterr().err
    monkeypatch.setattr(benchmarks.soak, "run_soak", lambda cfg, out, command: {"goals": {"a": {"met": True}}})
    (tmp_path / "report.md").write_text("the report\n")
    assert main(["bench", "soak", "--quick", "--out", str(tmp_path)]) == 0
