"""Log lines of the long-running commands: `clipbank serve`'s with times and request ids, the hub's once."""

from __future__ import annotations

import logging


def hub_lines_once() -> None:
    """huggingface_hub (imported by open_clip) writes each line through a handler of its own and again through
    ours: a download retried 5 times showed 10 lines per file. Ours alone, with the level and the logger."""
    try:  # the hub adds its handler when it is imported: after `clipbank serve` set its logs up, it was kept
        import huggingface_hub.utils.logging  # noqa: F401
    except ImportError:
        return
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:
            hub.removeHandler(handler)


def serve_logs(log_level: str, log_format: str = "text") -> None:
    """`clipbank serve`'s lines: each with its time and the request it was written for (service/request_ids.py),
    clipbank's own at `log_level` (`--log-level`: not uvicorn's alone; its INFO lines showed at warning)."""
    from service.request_ids import log_with_request_ids

    log_with_request_ids(logging.getLogger().level, log_format)
    logging.captureWarnings(True)  # a library's warnings as log lines too (one JSON object each with json)
    hub_lines_once()
    level = logging.DEBUG if log_level == "trace" else getattr(logging, log_level.upper())
    for name in ("clipbank", "model_store"):
        logging.getLogger(name).setLevel(level)
