"""`clipbank bench scale`'s report (the run itself needs a Ray cluster: tests/scale runs the same machinery)."""

from __future__ import annotations

import json

from benchmarks.scale import percentiles, write_report


def test_the_report_has_the_issue_keys_and_a_table(tmp_path):
    report = {
        "throughput_by_replicas": {"1": 30.5, "2": 41.0},
        "propagation": percentiles([0.1, 0.2, 0.3]),
        "propagation_poll_only": percentiles([1.0, 2.0, 2.5]),
        "propagation_p99_s": 0.3,
        "propagation_poll_only_p99_s": 2.5,
        "errors_during_swaps": 0,
        "statuses_during_swaps": {"200": 900},
        "recovery_s": 12.5,
        "cores": 2,
        "clients": 16,
        "config": {"poll_seconds": 2.0},
    }
    text = write_report(tmp_path, report, "clipbank bench scale --quick")
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("propagation_p99_s", "propagation_poll_only_p99_s", "recovery_s", "errors_during_swaps"):
        assert saved[key] == report[key]
    assert saved["throughput_by_replicas"] == {"1": 30.5, "2": 41.0}
    assert "| 2 | 41.0 |" in text and "after 12.5 s" in text and (tmp_path / "report.md").read_text() == text
    assert percentiles([0.1, 0.2, 0.3]) == {"p50_s": 0.2, "p99_s": 0.298, "n": 3}
