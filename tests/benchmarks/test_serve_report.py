"""report.md's ratio table: held against the goals on the full run only."""

from benchmarks.serve_report import _header


def _report(judged: bool) -> dict:
    config = {"labels": ["a", "b"], "routed_per_5": 4, "key_concurrency": 16, "judged": judged}
    ratios = {"zero_shot_vs_litserve": 1.26, "auto_vs_zero_shot": 0.5, "tasks10_vs_tasks1": 0.7}
    run = {"command": "c", "machine": "m", "torch_threads": 1, "gemm_gflops": 1.0, "seconds": 1, "key": "tiny"}
    return {**run, "config": config, "ratios": ratios}


def test_the_full_run_is_judged_and_a_shorter_one_is_not():
    full = "\n".join(_header(_report(True)))
    assert "| zero_shot_vs_litserve | 1.26 | >= 1.2 | yes |" in full
    assert "| auto_vs_zero_shot | 0.5 | >= 0.8 | NO |" in full
    assert "| tasks10_vs_tasks1 | 0.7 | - | - |" in full  # no goal of its own
    short = "\n".join(_header(_report(False)))
    assert "| zero_shot_vs_litserve | 1.26 | >= 1.2 | not judged (not the full run) |" in short
    assert "| yes |" not in short and "| NO |" not in short
