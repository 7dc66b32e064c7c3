"""The bundle manifest's schema: every field checked for type and bound, every problem collected into one list."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .backbone import TOWERS
from .errors import BundleInvalid
from .selector import SELECTOR_KINDS

FORMAT = 1
TASK_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ID_RE = re.compile(r"[0-9a-f]{64}")
RESERVED_TASKS = ("auto", "zero-shot")  # request values of `task`, so never task names

# Bounds on what a manifest may ask the server to hold or compute (docs/bundle-format.md lists them).
MAX_CLASSES = 10_000
MAX_TEMPLATES = 128
MAX_PROMPTS = 100_000  # classes x templates: text passes of an upload's trial run
MAX_CLASS_CHARS = 200
MAX_TEMPLATE_CHARS = 300
MAX_SHORT_CHARS = 256  # backbone names, created_at, selector kind
MAX_VERSION = 2**31 - 1
MAX_TOP_K = 64
# A threshold is an error level the task's own held-out images reach: far above the worst of them, it would
# claim everything (a threshold of 1e30 claims every image of every task).
THRESHOLD_OVER_MAX = 4.0
CALIBRATION_ORDER = ("p50", "p90", "p95", "p99", "max")


def shown(value: Any, limit: int = 80) -> str:
    """`repr` cut to `limit` characters, for echoing untrusted values in messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def task_name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not TASK_RE.fullmatch(name):
        return f"task {shown(name)} must match {TASK_RE.pattern}"
    if name in RESERVED_TASKS:
        return f"task {name!r} is reserved ({', '.join(RESERVED_TASKS)} are routing modes)"
    return None


def validate_task_name(name: str) -> str:
    problem = task_name_problem(name)
    if problem:
        raise BundleInvalid(problem)
    return name


def template_ok(template: Any) -> bool:
    """A prompt template with exactly one plain `{}`: no field name, conversion or format spec (so
    `.format(label)` always works and costs no more than the label), and at most MAX_TEMPLATE_CHARS long."""
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        return False
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return False
    return fields == [("", "", None)]


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_text(v: Any, limit: int) -> bool:
    return isinstance(v, str) and 0 < len(v) <= limit and v.strip() != ""


def _ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, str) and ID_RE.fullmatch(i) for i in v)


def _timestamp_ok(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, str) or len(v) > MAX_SHORT_CHARS:
        return False
    try:
        datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


def _text_list_problem(m: dict, key: str, ok: Callable[[Any], bool], cap: int, what: str) -> list[str]:
    v = m.get(key)
    rule = f"{key} must be a list of 1..{cap} distinct {what}"
    if not isinstance(v, list) or not v or len(v) > cap:
        return [f"{rule}; got {'a list of ' + str(len(v)) if isinstance(v, list) else shown(v)}"]
    bad = next((i for i, x in enumerate(v) if not ok(x)), None)
    if bad is not None:
        return [f"{rule}; {key}[{bad}] is {shown(v[bad])}"]
    if len(set(v)) != len(v):
        return [f"{rule}; some repeat"]
    return []


def _labels_problems(m: dict) -> list[str]:
    p = _text_list_problem(
        m, "classes", lambda c: _is_text(c, MAX_CLASS_CHARS), MAX_CLASSES, f"names of 1..{MAX_CLASS_CHARS} characters"
    )
    what = f"templates of <= {MAX_TEMPLATE_CHARS} characters with one plain '{{}}'"
    p += _text_list_problem(m, "templates", template_ok, MAX_TEMPLATES, what)
    if not p and len(m["classes"]) * len(m["templates"]) > MAX_PROMPTS:
        p.append(f"classes x templates = {len(m['classes']) * len(m['templates'])} prompts; at most {MAX_PROMPTS}")
    return p


def _identity_problems(m: dict) -> list[str]:
    p = []
    if m.get("format") != FORMAT:
        p.append(f"format must be {FORMAT}, got {shown(m.get('format'))}")
    if task_name_problem(m.get("task")):
        p.append(task_name_problem(m.get("task")))
    if not _is_int(m.get("version"), 1, MAX_VERSION):
        p.append(f"version must be an integer in 1..{MAX_VERSION}, got {shown(m.get('version'))}")
    if not _timestamp_ok(m.get("created_at")):
        p.append(f"created_at must be an ISO-8601 timestamp or null, got {shown(m.get('created_at'))}")
    parent = m.get("parent")
    if parent is not None and not (isinstance(parent, str) and ID_RE.fullmatch(parent)):
        p.append(f"parent must be a bundle id (64 hex digits) or null, got {shown(parent)}")
    if not (isinstance(m.get("content_sha256"), str) and ID_RE.fullmatch(m["content_sha256"])):
        p.append("content_sha256 must be 64 hex digits")
    b = m.get("backbone")
    if not isinstance(b, dict) or not all(_is_text(b.get(k), MAX_SHORT_CHARS) for k in ("arch", "pretrained")):
        p.append(f"backbone must hold arch and pretrained (strings of <= {MAX_SHORT_CHARS} characters)")
    elif not (isinstance(b.get("fingerprint"), str) and ID_RE.fullmatch(b["fingerprint"])):
        p.append("backbone.fingerprint must be 64 hex digits")
    training = m.get("training", {})
    if training is not None and not isinstance(training, dict):
        p.append("training must be an object or null")
    return p


def _routing_problems(m: dict) -> list[str]:
    e = m.get("experts")
    p = []
    if not isinstance(e, dict) or not all(_ids(e.get(k)) for k in ("new", "uses")):
        p.append("experts must be {new: [sha256...], uses: [sha256...]}")
    r = m.get("routing")
    if not isinstance(r, dict) or not _is_int(r.get("top_k"), 1, MAX_TOP_K):
        return p + [f"routing must hold top_k (an integer in 1..{MAX_TOP_K})"]
    if "scale" in r and not (_is_number(r["scale"]) and r["scale"] > 0):
        p.append(f"routing.scale must be a finite number > 0, got {shown(r['scale'])}")
    if not all(isinstance(r.get(t), list) and all(_ids(b) for b in r[t]) for t in TOWERS):
        p.append(f"routing must hold, per tower ({', '.join(TOWERS)}), a list of expert-id lists per block")
    return p


def _selector_problems(m: dict) -> list[str]:
    s = m.get("selector")
    if not isinstance(s, dict):
        return ["selector must be an object with kind, threshold and calibration"]
    if s.get("kind") not in SELECTOR_KINDS:
        return [f"selector kind {shown(s.get('kind'))} is unknown; known: {', '.join(sorted(SELECTOR_KINDS))}"]
    threshold = s.get("threshold")
    if not (_is_number(threshold) and threshold > 0):
        return [f"selector threshold must be a finite number > 0, got {shown(threshold)}"]
    cal = s.get("calibration")
    if not isinstance(cal, dict) or not all(_is_number(cal.get(k)) and cal[k] >= 0 for k in CALIBRATION_ORDER):
        return [f"selector calibration must hold {', '.join(CALIBRATION_ORDER)} (finite numbers >= 0)"]
    values = [cal[k] for k in CALIBRATION_ORDER]
    if values != sorted(values):
        return [f"selector calibration must be ordered {' <= '.join(CALIBRATION_ORDER)}, got {values}"]
    # A selector calibrated on negatives too may sit between its own images and the nearest outside ones.
    ceiling = max(cal["max"], cal["neg_p01"]) if _is_number(cal.get("neg_p01")) else cal["max"]
    if threshold > THRESHOLD_OVER_MAX * ceiling:
        return [
            f"selector threshold {threshold:.4g} is more than {THRESHOLD_OVER_MAX:g}x the largest held-out error of "
            f"the task's own images ({ceiling:.4g}): it would claim images of every other domain"
        ]
    return []


def manifest_problems(m: Any) -> list[str]:
    """Every problem of a parsed manifest (empty when it is valid); no tensor is needed."""
    if not isinstance(m, dict):
        return ["manifest is not a JSON object"]
    return _identity_problems(m) + _labels_problems(m) + _routing_problems(m) + _selector_problems(m)


def finite_metrics(training: Any, keys: tuple[str, ...]) -> dict[str, float]:
    """The named finite numbers of a manifest's `training` section (anything else is left out)."""
    if not isinstance(training, dict):
        return {}
    return {k: float(training[k]) for k in keys if _is_number(training.get(k))}
