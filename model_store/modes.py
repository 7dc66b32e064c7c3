"""Names defined once: what `task` and `route` of a classification may say, what a task may be named, and the
selector kinds. Light to import (the HTTP client checks task names with it)."""

from __future__ import annotations

import re
from typing import Any

from .labels import shown

AUTO = "auto"  # the selectors decide, per image
ZERO_SHOT = "zero-shot"  # plain frozen CLIP
TASK_MODES = (AUTO, ZERO_SHOT)  # besides a task name; so no task may be named either
PER_IMAGE = "per-image"
PER_REQUEST = "per-request"  # the request's images are routed as one (averaged selector scores)
ROUTE_MODES = (PER_IMAGE, PER_REQUEST)

# Selector kinds a config may name (model_store.selector.SELECTOR_KINDS implements exactly these).
SELECTOR_NAMES = ("autoencoder", "gaussian", "discriminative", "hybrid")
DEFAULT_SELECTOR = "hybrid"  # docs/benchmarks/routing.md, "The hybrid kind"

TASK_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def task_name_problem(name: Any) -> str | None:
    """What is wrong with `name` as a task name, or None."""
    if not isinstance(name, str) or not TASK_RE.fullmatch(name):
        return f"task {shown(name)} must match {TASK_RE.pattern}"
    if name in TASK_MODES:  # request values of `task`, so never task names
        return f"task {name!r} is reserved ({', '.join(TASK_MODES)} are routing modes)"
    return None
