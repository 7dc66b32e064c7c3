"""JSON from untrusted bytes with bounded cost: nesting depth, integer size, and no NaN or Infinity; and no
repeated key in an object."""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # clipbank's own documents nest 5 deep at most
MAX_INT_DIGITS = 19  # anything longer does not fit an int64


class JSONRefused(ValueError):
    """The text is not JSON, or it breaks one of the bounds above; the message says which."""


class JSONOverBound(JSONRefused):
    """Valid JSON that breaks one of the bounds (an integer too long, nesting too deep, a key twice)."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONOverBound(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONOverBound(f"the number {text[:40]} overflows a float")
    return value


def _constant(text: str) -> Any:
    raise JSONRefused(f"{text} is not a JSON number (NaN and Infinity are not JSON)")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are distinct: with a repeated key, Python kept the last silently (`{"labels": [a],
    "labels": [b]}` was scored against b; `{"version": 9, "version": 1}` activated 1)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONOverBound(f"the key {key[:60]!r} appears twice in one object")
            seen.add(key)
    return value


def depth(value: Any) -> int:
    """Nesting depth of containers (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return deepest


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` that raises `JSONRefused` (a ValueError) for anything malformed or over the bounds."""
    try:
        value = json.loads(
            text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_object
        )
    except JSONRefused:
        raise
    except RecursionError:
        raise JSONOverBound(f"nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise JSONRefused(str(e)[:200]) from None
    if depth(value) > max_depth:
        raise JSONOverBound(f"nested deeper than {max_depth} levels")
    return value
