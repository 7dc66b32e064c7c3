"""Progress bars that suit where they are shown: tqdm's bar on a terminal, plain lines elsewhere.

Redrawn with carriage returns, a bar becomes one ever-growing line in `docker logs`, CI logs and files. There,
`progress_bar` prints a full line instead, at most every LOG_SECONDS, and one at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

LOG_SECONDS = 30.0


class _Lines:
    """A stream for tqdm that turns each redraw into one line and drops the blank ones it clears with."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:  # close() redraws the last state: once is enough
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **kw: Any) -> tqdm:
    """`tqdm(iterable, **kw)`; on a stream that is not a terminal, lines at most every LOG_SECONDS (postfix updates
    wait for the next line: pass `refresh=False` to `set_postfix`)."""
    stream = kw.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()) and not kw.get("disable"):
        kw["file"] = _Lines(stream)
        kw["mininterval"] = max(kw.get("mininterval", 0.1), LOG_SECONDS)
        kw["maxinterval"] = float("inf")  # else tqdm's monitor thread redraws a slow bar between lines: a second line
        # tqdm's dynamic miniters, learnt in a fast stretch, skipped the clock for that many steps once the rate
        # fell (a shared CPU): an outside check saw no line for 4 minutes where one every 30 s is promised
        kw["miniters"] = 1
        kw["leave"] = True  # a line once written stays; the last one says where it ended
    return tqdm(iterable, **kw)


@contextmanager
def phases(names: Sequence[str], enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A bar over the named parts of some work (`next_phase()` moves on), so a long step without a loop of its
    own still shows what it is doing."""
    bar = progress_bar(total=len(names), desc=names[0], unit="part", disable=not enabled, leave=False)
    done = 0

    def next_phase() -> None:
        nonlocal done
        done += 1
        if done < len(names):
            bar.set_description(names[done], refresh=False)
        bar.update()
        bar.refresh()  # a line per part where lines are held back for LOG_SECONDS: a part may take minutes

    try:
        yield next_phase
        bar.update(len(names) - bar.n)
    finally:
        bar.close()
