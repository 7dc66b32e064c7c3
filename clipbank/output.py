"""What the command line prints as JSON: readable names ("café", not "caf\\u00e9"), on any terminal."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(value: Any) -> None:
    """`value` as indented JSON, non-ASCII text as itself; escaped where stdout cannot encode it (a C locale)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        text = json.dumps(value, indent=2)
    print(text)
