"""Log lines that would repeat at every poll, said once in a while instead."""

from __future__ import annotations

import logging
import threading
import time


class SaidOnce:
    """Logs a line at its level once in `seconds`; the same line again within that time goes to DEBUG, which its
    first repeat says (a one-shot command's line said nothing of repeats it never makes: an outside check)."""

    def __init__(self, logger: logging.Logger, seconds: float) -> None:
        self.logger, self.seconds = logger, seconds
        self._said: dict[str, list] = {}  # line -> [when first said, repeats since]
        self._lock = threading.Lock()

    def __call__(self, level: int, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._said = {k: v for k, v in self._said.items() if now - v[0] < self.seconds}
            seen = self._said.setdefault(line, [now, -1])
            seen[1] += 1
            repeats = seen[1]
        if repeats == 0:
            self.logger.log(level, "%s", line)
        elif repeats == 1:
            self.logger.log(level, "%s (again: more of the same within %.0f s go to debug level)", line, self.seconds)
        else:
            self.logger.debug("%s", line)
