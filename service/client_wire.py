"""What the client makes of the connection and the server's answers: the server's URL checked, the error it
raises, an answer's body read within a deadline, Retry-After and request ids, and a proxy the environment names."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import httpx


class ClipbankHTTPError(Exception):
    """The server answered with an error: `status`, and its `code`, `message` and `details` (for `interference`,
    the gate's report)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        said = f"HTTP {status} {code}: {message}" if status else f"{code}: {message}"  # 0: no answer
        # a 5xx's message points at the server's log: its lines name the request by this id
        super().__init__(f"{said} (request id {request_id})" if request_id and status >= 500 else said)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.retry_after = retry_after  # seconds, from a 503's Retry-After: when trying again may succeed
        self.request_id = request_id  # the answer's X-Request-ID: quote it to whoever reads the server's log

    def __reduce__(self):  # pickled whole: raised in a process pool's worker, it reaches the caller as itself
        return type(self), (self.status, self.code, self.message, self.details, self.retry_after, self.request_id)


ClipbankHTTPError.__module__ = "service.client"  # where callers import it from (and older releases pickle it)

MAX_ANSWER_BYTES = 256 * 1024 * 1024  # far above any answer a clipbank server gives


def _server_url(url: Any) -> str:
    """The server's base URL, checked: http(s), a host, a port that can be, no query or fragment."""
    example = "(e.g. http://127.0.0.1:8000)"
    if not isinstance(url, str) or not re.match(r"https?://[^/\s]", url, re.IGNORECASE):
        raise ValueError(f"the server URL starts with http:// or https://, got {url!r} {example}")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as e:
        raise ValueError(f"the server URL {url!r} is not a valid URL ({e}) {example}") from None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"the server URL {url!r} has port {port}, outside 1..65535 {example}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"the server URL {url!r} has a query or fragment: give only scheme, host, port and path")
    return url.rstrip("/")


def _proxy_note(url: str) -> str:
    """Where httpx connected instead, when the environment names a proxy for this URL (HTTP_PROXY for a server on
    127.0.0.1 made a running server unreachable); without the proxy's credentials."""
    parsed, found = httpx.URL(url), urllib.request.getproxies_environment()  # the variables, as httpx reads them
    proxy = found.get(parsed.scheme) or found.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(parsed.host, found):
        return ""
    try:
        where = httpx.URL(proxy if "://" in proxy else f"http://{proxy}").copy_with(username=None, password=None)
    except (httpx.InvalidURL, ValueError):
        where = "the environment's"
    return f" through the proxy {where} that the environment names (NO_PROXY={parsed.host} connects directly)"


def _read_within(response: httpx.Response, deadline: float, url: str) -> bytes:
    """The answer's body, read before `deadline` (time.monotonic) and within MAX_ANSWER_BYTES."""
    parts, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise ClipbankHTTPError(response.status_code, "not_clipbank", f"{url} answered more than {size} bytes")
        if time.monotonic() > deadline:
            raise ClipbankHTTPError(0, "timeout", f"{url} did not finish its answer within the client's timeout")
        parts.append(chunk)
    return b"".join(parts)


def _json(raw: bytes) -> Any:
    return json.loads(raw)  # RecursionError for nesting Python cannot parse


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not what a clipbank server sends
        return None


def _one_line(text: str) -> str:
    """An error page as one short line (an HTML page from a proxy, say)."""
    return " ".join(re.sub(r"<[^>]*>", " ", text).split())[:300]


def _request_id(headers: httpx.Headers) -> str | None:
    """The answer's X-Request-ID: the first, as Ray Serve's proxy adds the replica's own again (httpx joins them)."""
    ids = [i.strip() for i in headers.get_list("x-request-id", split_commas=True)]
    return ids[0] if ids else None


def smaller_batch(error: ClipbankHTTPError, sent: int) -> int | None:
    """Images per request from here on when `error` is the server's 413 for a request of `sent` images: its
    max_images, or half as many for a body over max_request_bytes, images over max_request_pixels (large photos)
    or an answer over max_response_bytes (many or long labels); else None (not a limit that fewer images meet)."""
    details = error.details or {}
    limit = details.get("limit")
    if error.status != 413 or not isinstance(limit, int):
        return None
    if details.get("setting") in ("max_response_bytes", "max_request_bytes", "max_request_pixels"):
        return sent // 2 if sent > 1 else None
    return limit if details.get("setting") == "max_images" and 1 <= limit < sent else None


def in_batches(send: Callable[[list], dict], files: list, size: int) -> tuple[dict[str, Any], int | None]:
    """`send(files)` for requests of at most `size` files, fewer after a 413 that says how many (`smaller_batch`):
    one answer, its `results` every request's in order, `timing` the last one's and `requests` their count (when
    more than one); and the server's max_images, when a 413 named it (the caller starts there next time). An
    image's error is numbered in the whole call, in its details and its message."""
    results: list = []
    at, requests, out, most = 0, 0, {}, None
    while at < len(files):
        part = files[at : at + size]
        try:
            out = send(part)
        except ClipbankHTTPError as e:
            smaller = smaller_batch(e, len(part))
            if smaller is None:
                raise _renumbered(e, at) from None
            size = smaller
            most = smaller if (e.details or {}).get("setting") == "max_images" else most
            continue
        results += out["results"]
        at, requests = at + len(part), requests + 1
    answer = out if requests == 1 else {**out, "results": results, "requests": requests}  # one: the server's own
    return answer, most


def _renumbered(e: ClipbankHTTPError, at: int) -> ClipbankHTTPError:
    """`e` with its image numbered from the call's first, not its request's (`image 3 ('x')` was file 67)."""
    image = (e.details or {}).get("image")
    if not at or not isinstance(image, int):
        return e
    message = re.sub(r"^image \d+", f"image {image + at}", e.message)
    return ClipbankHTTPError(e.status, e.code, message, {**e.details, "image": image + at}, e.retry_after, e.request_id)
