"""Progress where it is shown: a bar on a terminal, whole lines in logs (docker logs, CI, files)."""

from __future__ import annotations

import io

from training.progress import LOG_SECONDS, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_not_one_endless_redrawn_line(monkeypatch):
    log = io.StringIO()
    bar = progress_bar(range(300), desc="train t", unit="step", file=log, leave=False)
    assert bar.mininterval == LOG_SECONDS
    for step in bar:
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}", refresh=False)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 2 <= len(lines) <= 3 and lines[0].startswith("train t:   0%") and "300/300" in lines[-1], lines
    terminal = _Terminal()
    for _ in progress_bar(range(3), desc="t", file=terminal):
        pass
    assert "\r" in terminal.getvalue()  # a terminal keeps tqdm's own redrawn bar
    quiet = io.StringIO()
    for _ in progress_bar(range(3), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""


def test_phases_name_the_part_under_way_and_end_complete(capsys):
    """Work after training's steps (validation, the selector) had no bar: seconds to minutes of silence."""
    from training.progress import phases

    with phases(("validate t", "fit the selector of t", "write t")) as next_phase:
        next_phase()
        # each part has its line at once: a log showed "validate: 0/2", then nothing for 110 s (an outside check)
        assert capsys.readouterr().err.splitlines()[-1].startswith("fit the selector of t:  33%")
        next_phase()
    lines = capsys.readouterr().err.splitlines()  # not a terminal: plain lines, the last one where it ended
    assert lines and lines[0].startswith("write t:  67%") and "3/3" in lines[-1], lines
    with phases(("a", "b"), enabled=False) as next_phase:
        next_phase()
    assert capsys.readouterr().err == ""


def test_a_slow_bar_in_a_log_is_not_redrawn_between_its_lines(monkeypatch):
    """`clipbank train > log` printed every line twice, 15-20 s apart: tqdm's monitor thread redraws a bar whose
    last print is older than `maxinterval` (10 s), below the log's LOG_SECONDS."""
    import time

    import tqdm

    import training.progress as progress

    monkeypatch.setattr(progress, "LOG_SECONDS", 0.6)
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0.05)
    monkeypatch.setattr(tqdm.tqdm, "monitor", None)  # a monitor of its own, waking every 0.05 s
    log = io.StringIO()
    bar = progress.progress_bar(range(12), desc="slow", file=log, maxinterval=0.2)
    try:
        for _ in bar:
            time.sleep(0.1)  # 1.2 s: lines at 0 and about 0.6 s, and the end; the monitor would add 2-4 more
    finally:
        if tqdm.tqdm.monitor is not None:
            tqdm.tqdm.monitor.exit()
    lines = log.getvalue().splitlines()
    counts = [line.split("|")[2].split()[0] for line in lines]
    body = counts[:-1] if counts[-2:] == ["12/12", "12/12"] else counts  # the end may be printed by close() too
    assert len(body) == len(set(body)) and len(lines) <= 4, lines  # no count printed twice


def test_a_bar_that_slows_down_still_prints_a_line_every_interval(monkeypatch):
    """An outside check: no line for 4 minutes where one every 30 s is promised. tqdm's dynamic miniters, learnt
    in a fast stretch, skipped the clock for that many steps once the steps slowed down (a shared CPU)."""
    import time

    import training.progress as progress

    monkeypatch.setattr(progress, "LOG_SECONDS", 0.3)
    log = io.StringIO()
    bar = progress.progress_bar(range(2030), desc="train", file=log)
    for step in bar:
        if step >= 2000:
            time.sleep(0.05)  # 2000 fast steps, then 30 slow ones: 1.5 s, about 5 intervals
    lines = log.getvalue().splitlines()
    slow = [line for line in lines if int(line.split("|")[2].split("/")[0]) > 2000]
    assert len(slow) >= 3, lines  # before: the 30 slow steps were fewer than the miniters learnt, so none
