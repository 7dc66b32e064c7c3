"""What both clients make of the connection and the server's answers: the server's URL checked, the error they
raise, an answer's body read within a deadline and checked, Retry-After and request ids, when to retry, a call's
images split into requests, and a proxy the environment names."""

from __future__ import annotations

import json
import logging
import random
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable
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

IMAGE_PREFIX = re.compile(r"^image \d+ (\((['\"]).*?\2\) )?")  # "image 3 ('x.png') " of an image's error


def _unnumbered(prefix: re.Match) -> str:
    """ "image 3 ('x.png') " as "image 'x.png' " (an error of `skip_bad` read "is empty"), "image 3 " as nothing."""
    return f"image {prefix.group(1)[1:-2]} " if prefix.group(1) else ""


log = logging.getLogger("clipbank.client")
MAX_ANSWER_BYTES = 256 * 1024 * 1024  # far above any answer a clipbank server gives
RETRIED = frozenset({"overloaded", "stale_replica", "not_ready"})  # 503s that name when trying again may succeed
MAX_RETRY_WAIT = 30.0  # seconds: a longer Retry-After is not waited for
BROKEN_WAIT = 0.25  # seconds before the first retry of a request that a replica's death broke; doubled after each
REFUSED_WAIT = 1.0  # ... of a request whose connection was refused (a server restarting: 7-16 s here); doubled


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


def _took(size: int, chunk: bytes, deadline: float, response: httpx.Response, url: str, began: float) -> int:
    """The answer's bytes so far with `chunk`, or ClipbankHTTPError past `deadline` or MAX_ANSWER_BYTES (`began`:
    when the call did, for the time it took: a head sent a byte at a time held one 48 s, with a 2 s timeout)."""
    size += len(chunk)
    if size > MAX_ANSWER_BYTES:
        raise ClipbankHTTPError(response.status_code, "not_clipbank", f"{url} answered more than {size} bytes")
    if time.monotonic() > deadline:
        waited = time.monotonic() - began
        said = f"{url} did not finish its answer within the client's timeout (gave up after {waited:.1f} s)"
        raise ClipbankHTTPError(0, "timeout", said)
    return size


def _read_within(response: httpx.Response, deadline: float, url: str, began: float) -> bytes:
    """The answer's body, read before `deadline` (time.monotonic) and within MAX_ANSWER_BYTES."""
    parts, size = [], 0
    for chunk in response.iter_bytes():
        size = _took(size, chunk, deadline, response, url, began)
        parts.append(chunk)
    return b"".join(parts)


async def read_within_async(response: httpx.Response, deadline: float, url: str, began: float) -> bytes:
    """`_read_within` for an httpx.AsyncClient's answer."""
    parts, size = [], 0
    async for chunk in response.aiter_bytes():
        size = _took(size, chunk, deadline, response, url, began)
        parts.append(chunk)
    return b"".join(parts)


def answer_body(response: httpx.Response, raw: bytes, url: str, method: str, path: str, expect: tuple[str, ...]):
    """The JSON answer of `method path`, or ClipbankHTTPError: for an error answer, and for anything that is not a
    clipbank answer, or one without the keys in `expect` (a 200 from another server must not pass)."""
    if response.status_code >= 400:
        retry, rid = _seconds(response.headers.get("retry-after")), _request_id(response.headers)
        try:
            err = _json(raw)["error"]
            raise ClipbankHTTPError(response.status_code, err["code"], err["message"], err.get("details"), retry, rid)
        except (ValueError, KeyError, TypeError, RecursionError):
            text = raw[:4096].decode("utf-8", "replace")  # an error page from a proxy, say: cut before parsing
            status = response.status_code
            page = _one_line(text) or "an empty body"
            via = _proxy_note(url) if status in (502, 503, 504) else ""  # a proxy that cannot reach it
            message = f"{method} {url}{path}{via} answered {status} without a clipbank error ({page})"
            raise ClipbankHTTPError(status, "http_error", message, None, retry, rid) from None
    if response.is_redirect:
        where = response.headers.get("location", "?")
        raise ClipbankHTTPError(response.status_code, "redirect", f"{url} redirects to {where}: use that URL")
    try:
        body = _json(raw)
    except (ValueError, RecursionError):
        said = f"{url} answered something that is not JSON: is it a clipbank server?"
        raise ClipbankHTTPError(response.status_code, "not_clipbank", said) from None
    if not isinstance(body, dict):
        said = f"{url} answered an unexpected {type(body).__name__}"
        raise ClipbankHTTPError(response.status_code, "not_clipbank", said)
    if missing := [key for key in expect if key not in body]:
        said = f"{url} answered {method} {path} without {', '.join(missing)}: is it a clipbank server?"
        raise ClipbankHTTPError(response.status_code, "not_clipbank", said)
    return body


def tried(e: ClipbankHTTPError, times: int, seconds: float) -> ClipbankHTTPError:
    """`e`, saying that it ended the last of `times` tries when it is an error retries are for: no answer, or a
    5xx (a bare "cannot reach" hid 3 s of retries); a 4xx after a 503 is the server's judgement, as it is."""
    if times < 2 or 0 < e.status < 500:
        return e
    said = f"{e.message} (the last of {times} tries, over {seconds:.1f} s)"
    out = ClipbankHTTPError(e.status, e.code, said, e.details, e.retry_after, e.request_id)
    out.__dict__.update({k: v for k, v in e.__dict__.items() if k not in out.__dict__})  # `refused`, say
    return out


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
    """The answer's X-Request-ID: the first, as servers before 2026-12-07 on Ray Serve sent it twice (the proxy's
    and the replica's; httpx joins them). An id with a comma in it, which Ray echoes, is cut at the comma."""
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
    return limit if details.get("setting") in ("max_images", "max_batch") and 1 <= limit < sent else None


class Batches:
    """A call's images as requests of at most `size` files, fewer after a 413 that says how many (`smaller_batch`;
    with `split` False, one request: a per-request route decides once), sent by `send_all` (or `asend_all`):
    `part()` to send next (None: done), `took(answer, url)` or `refused(error)` (which raises an error that fewer
    images cannot meet), then `answer()`. Its `results` are every request's in order, `timing`
    the last one's and `requests` their count (when more than one); `most` is the server's max_images, when a 413
    named it (the caller starts there next time). An image's error is numbered in the whole call.

    With `skip_bad`, an image the server refuses (a 413 or 422 naming it) is answered `{"error": {status, code,
    message}}` in its place, as are the `unread` ones (call position: error), and the rest of its request is sent
    again without it; the requests already answered are kept (an outside check lost them, and sent all again)."""

    def __init__(
        self, files: list, size: int, unread: dict[int, dict] | None = None, *, skip_bad: bool, split: bool
    ) -> None:
        self.errors = dict(unread or {})
        self.positions = [i for i in range(len(files) + len(self.errors)) if i not in self.errors]
        self.files, self.size, self.at, self.requests = list(files), max(size, 1), 0, 0
        self.skip_bad, self.split = skip_bad, split
        self.results: list = []
        self.out: dict[str, Any] = {"timing": {}}
        self.most: int | None = None

    def part(self) -> list | None:
        if self.at >= len(self.files):
            return None
        return self.files[self.at : self.at + self.size] if self.split else self.files

    def took(self, out: dict[str, Any], url: str) -> None:
        sent = len(self.part() or [])
        if not isinstance(out["results"], list):  # a server that is not clipbank's: nothing to merge
            raise ClipbankHTTPError(
                200, "not_clipbank", "an answer's `results` is not a list: is it a clipbank server?"
            )
        self.results += out["results"]
        self.out, self.at, self.requests = out, self.at + sent, self.requests + 1

    def refused(self, e: ClipbankHTTPError) -> None:
        image = (e.details or {}).get("image") if e.status in (413, 422) else None
        if self.skip_bad and isinstance(image, int) and 0 <= image < len(self.part() or []):
            message = IMAGE_PREFIX.sub(_unnumbered, e.message)  # its number changes as others go; its name stays
            self.errors[self.positions.pop(self.at + image)] = {"status": e.status, "code": e.code, "message": message}
            del self.files[self.at + image]
            return
        smaller = smaller_batch(e, len(self.part() or [])) if self.split else None
        if smaller is None:  # numbered in the whole call: the image's position in the caller's list
            image = (e.details or {}).get("image")
            valid = isinstance(image, int) and 0 <= self.at + image < len(self.positions)
            raise _renumbered(e, self.positions[self.at + image] - image if valid else self.at) from None
        self.size = smaller
        self.most = smaller if (e.details or {}).get("setting") == "max_images" else self.most

    def answer(self, url: str) -> dict[str, Any]:
        if self.requests == 1 and not self.errors:  # one request: the server's own answer
            return self.out
        if len(self.results) != len(self.positions):  # a bare zip() error, else
            said = f"{url} answered {len(self.positions)} image(s) with {len(self.results)} result(s)"
            raise ClipbankHTTPError(200, "not_clipbank", said + ": is it a clipbank server?")
        merged: list = [None] * (len(self.positions) + len(self.errors))
        for position, result in zip(self.positions, self.results, strict=True):
            merged[position] = result
        for position, error in self.errors.items():
            merged[position] = {"error": error}
        return {**self.out, "results": merged} | ({"requests": self.requests} if self.requests > 1 else {})

    def send_all(self, send: Callable[[list], dict], url: str) -> dict[str, Any]:
        """`send(part)` for each request: the call's answer."""
        while (part := self.part()) is not None:
            try:
                answer = send(part)
            except ClipbankHTTPError as e:
                self.refused(e)
                continue
            self.took(answer, url)
        return self.answer(url)

    async def asend_all(self, send: Callable[[list], Awaitable[dict]], url: str) -> dict[str, Any]:
        """`send_all` for the asyncio client: `await send(part)`."""
        while (part := self.part()) is not None:
            try:
                answer = await send(part)
            except ClipbankHTTPError as e:
                self.refused(e)
                continue
            self.took(answer, url)
        return self.answer(url)


def _renumbered(e: ClipbankHTTPError, at: int) -> ClipbankHTTPError:
    """`e` with its image numbered from the call's first, not its request's (`image 3 ('x')` was file 67)."""
    image = (e.details or {}).get("image")
    if not at or not isinstance(image, int):
        return e
    message = re.sub(r"^image \d+", f"image {image + at}", e.message)
    return ClipbankHTTPError(e.status, e.code, message, {**e.details, "image": image + at}, e.retry_after, e.request_id)


def said_retry(e: ClipbankHTTPError, method: str, path: str, wait: float | None, attempt: int, retries: int):
    """`wait`, logged (INFO, `clipbank.client`) when it is one: an outside check's `classify` waited 41 s for a
    starting server, saying nothing."""
    if wait is not None:
        why = f"{e.status} {e.code}" if e.status else e.code
        log.info(
            "%s %s: %s; sending it again in %.1f s (try %d of %d)", method, path, why, wait, attempt + 2, retries + 1
        )
    return wait


def _retry_wait(e: ClipbankHTTPError, attempt: int) -> float | None:
    """Seconds to wait before sending a request that changes nothing again after `e`, None: raise `e`.

    A 503 that says when: that long (not over 30 s), and up to a quarter more at random, so that clients refused
    together do not all come back in the same instant. A connection broken mid-request, or a 5xx that is not
    clipbank's (a bare 500 from Ray Serve's proxy for the requests of a replica that died; a 502 or 504 from a
    load balancer): a short wait that doubles, as another replica may answer at once."""
    if e.code in RETRIED and e.retry_after is not None:  # doubled after each try: a full queue that stays full
        return (
            min(e.retry_after * 2**attempt, MAX_RETRY_WAIT) * random.uniform(1.0, 1.25)
            if e.retry_after <= MAX_RETRY_WAIT
            else None
        )
    if e.code == "connection_failed" or (e.code == "http_error" and e.status in (500, 502, 503, 504)):
        return min(BROKEN_WAIT * 2**attempt, MAX_RETRY_WAIT) * random.uniform(1.0, 1.25)
    if _was_refused(e):  # refused: a server restarting opens its port after loading
        return min(REFUSED_WAIT * 2**attempt, MAX_RETRY_WAIT) * random.uniform(1.0, 1.25)
    return None


def _was_refused(e: ClipbankHTTPError) -> bool:
    return e.code == "unreachable" and getattr(e, "refused", False)


def _refused(e: httpx.HTTPError) -> bool:
    """Whether the connection was refused: nothing was sent, and a server (re)starting there may take it soon; not
    a name that does not resolve, or an address nothing answers."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
