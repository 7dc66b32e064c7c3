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


def error_json(e: BaseException) -> dict[str, Any]:
    """An error as --json prints it: the server's (status, code, message, details), or the client's own."""
    from service.client import ClipbankHTTPError

    if isinstance(e, ClipbankHTTPError):
        return {"status": e.status, "code": e.code, "message": e.message, "details": e.details}
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM: what was answered before is kept
        return {"status": 0, "code": "interrupted", "message": "stopped by a signal", "details": None}
    code = "unreadable" if isinstance(e, OSError) else "client_error"
    return {"status": 0, "code": code, "message": f"{type(e).__name__}: {e}", "details": None}
