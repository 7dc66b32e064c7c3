"""Log lines that would repeat at every poll, said once in a while instead."""

from __future__ import annotations

import logging
import threading
import time


class SaidOnce:
    """Logs a line at its level once in `seconds`; the same line again within that time goes to DEBUG."""

    def __init__(self, logger: logging.Logger, seconds: float) -> None:
        self.logger, self.seconds = logger, seconds
        self._said: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, level: int, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._said = {k: t for k, t in self._said.items() if now - t < self.seconds}
            again = line in self._said
            if not again:
                self._said[line] = now
        if again:
            self.logger.debug("%s", line)
        else:
            self.logger.log(level, "%s (the same again within %.0f s: at debug level)", line, self.seconds)
