"""A failure met at every poll is logged as an error once in a while, not every few seconds."""

from __future__ import annotations

import logging

from model_store import said_once
from model_store.said_once import SaidOnce


def test_the_same_line_is_an_error_once_in_its_time_and_debug_in_between(monkeypatch, caplog):
    """An outside check: an S3 endpoint down logged an ERROR every 2-4 s (8 in 24 s)."""
    now = [100.0]
    monkeypatch.setattr(said_once.time, "monotonic", lambda: now[0])
    say = SaidOnce(logging.getLogger("test.said"), 600)
    with caplog.at_level(logging.DEBUG, logger="test.said"):
        for _ in range(5):
            say(logging.ERROR, "store s3://b/p: could not read the index: EndpointConnectionError")
            now[0] += 3
        say(logging.ERROR, "store s3://b/p: could not list blobs: EndpointConnectionError")  # another failure
        now[0] += 600
        say(logging.ERROR, "store s3://b/p: could not read the index: EndpointConnectionError")  # still: said again
    levels = [(r.levelname, "index" in r.getMessage()) for r in caplog.records]
    assert levels == [("ERROR", True)] * 2 + [("DEBUG", True)] * 3 + [("ERROR", False), ("ERROR", True)], levels
    assert caplog.records[0].getMessage().endswith("EndpointConnectionError")  # once: nothing of repeats
    assert "(again: more of the same within 600 s go to debug level)" in caplog.records[1].getMessage()
