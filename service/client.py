"""A small Python client for a clipbank server (used by `clipbank push` and `clipbank classify`); its asyncio
twin, with the same calls and answers, is `service.client_async.AsyncClipbankClient`."""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from model_store.modes import AUTO, PER_IMAGE, ZERO_SHOT, task_name_problem

from .client_inputs import ImageInput, _at_least, _bytes, _name, _traced, flag, label_list, whole
from .client_wire import (
    Batches,
    ClipbankHTTPError,
    _proxy_note,
    _read_within,
    _refused,
    _retry_wait,
    _server_url,
    _was_refused,
    answer_body,
    said_retry,
    tried,
)
from .token_files import SENDABLE_TOKEN

# what a change answers at least (an older server's answers have these too)
ACTIVATED, SHADOWED = ("task", "active_version"), ("task", "shadow_version")
PROBES = ("/readyz", "/healthz")  # asked for the state now: never retried, a refused connection neither
MAY_LAND = "; a change it was making may still land: look before retrying (GET /tasks, clipbank store list)"


_LIVE: weakref.WeakSet[ClipbankClient] = weakref.WeakSet()


def _renew_after_fork() -> None:
    """In a forked child, before any thread of it runs: every client's pooled sockets are its parent's, shared (the
    two processes read each other's answers: a "bar" image answered "star" in an outside check)."""
    for client in list(_LIVE):
        client._renew()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_after_fork)


class _Calls:
    """What both clients share: their settings, each call's request, and what its answer must hold. A call returns
    `self._call(...)`: the answer for ClipbankClient, an awaitable of it for AsyncClipbankClient."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float | None = 60.0,
        retries: int = 0,
        max_connections: int = 100,
    ) -> None:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise ValueError(f"timeout is a number of seconds > 0, or None for none; got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries is a count >= 0, got {retries!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections is a count >= 1, got {max_connections!r}")
        token = (token or "").strip()  # a token read from a file ends in a newline
        if token and not SENDABLE_TOKEN.fullmatch(token):
            raise ValueError("the token must be printable ASCII without spaces (it is not shown here)")
        self.url = _server_url(url)
        self.timeout, self.retries, self.max_connections = timeout, retries, max_connections
        self._token = token
        self._max_images: int | None = None  # the server's, once a 413 named it
        self._http = self._new_http()

    def _new_http(self) -> Any:
        raise NotImplementedError

    def _http_settings(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        limits = httpx.Limits(
            max_connections=self.max_connections, max_keepalive_connections=min(20, self.max_connections)
        )
        return {"base_url": self.url, "headers": headers, "timeout": self.timeout, "limits": limits}

    def __reduce__(self):  # its settings: a process pool's worker makes its own connections
        return type(self), (self.url, self._token, self.timeout, self.retries, self.max_connections)

    def __repr__(self) -> str:  # the token is a secret: only whether there is one
        token = "set" if self._token else "none"
        return f"{type(self).__name__}({self.url!r}, token={token}, timeout={self.timeout}, retries={self.retries})"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _wait_before_retry(self, e: ClipbankHTTPError, method: str, path: str, attempt: int) -> float | None:
        """Seconds to wait before sending `method path` again after `e` (try `attempt`), None: raise it."""
        # refused before a byte was sent (a server restarting): safe for a change too
        safe = path not in PROBES and (method == "GET" or path == "/classify" or _was_refused(e))
        wait = _retry_wait(e, attempt) if safe and attempt < self.retries else None
        return said_retry(e, method, path, wait, attempt, self.retries)

    def _closed_error(self) -> RuntimeError:  # httpx's own message names no clipbank call
        return RuntimeError(f"this {type(self).__name__} is closed (close() was called, or its with-block ended)")

    def _transport_error(self, e: httpx.HTTPError, method: str, path: str, waited: float, sent: bool) -> Exception:
        """What an error of the connection is to the caller: `unreachable`, `timeout` or `connection_failed`."""
        if isinstance(e, httpx.PoolTimeout):  # nothing was sent: the client's own threads held every connection
            said = (
                f"no connection of this client's pool (max_connections={self.max_connections}) came free within "
                f"{self.timeout:g} s: {method} {path} was not sent"
            )
            return ClipbankHTTPError(0, "timeout", said)
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):  # refused, bad address: name where
            tls = " (is it a plain http:// server?)" if "WRONG_VERSION_NUMBER" in str(e) else ""
            said = f"cannot reach {self.url}{_proxy_note(self.url)}: {type(e).__name__}: {e}{tls}"
            error = ClipbankHTTPError(0, "unreachable", said)
            error.refused = _refused(e)  # type: ignore[attr-defined]  (nothing was sent: `_call` may send it again)
            return error
        if isinstance(e, httpx.WriteTimeout):  # the server stopped reading the request: it was not sent in full
            said = f"{self.url} stopped reading {method} {path} for {self.timeout:g} s: it was not sent in full"
            return ClipbankHTTPError(0, "timeout", said)
        changes = method != "GET" and path != "/classify"
        if isinstance(e, httpx.ReadTimeout):  # the request went out: a change may still land
            # each read had `timeout`: an answer's head sent a byte at a time took longer (an upload's time aside)
            slow = not sent and self.timeout is not None and waited > 2 * self.timeout
            more = f" (gave up after {waited:.1f} s: its answer came a little at a time)" if slow else ""
            said = f"{self.url} did not answer {method} {path} within {self.timeout:g} s{more}{MAY_LAND * changes}"
            return ClipbankHTTPError(0, "timeout", said)
        # broken after the request went out (a server killed mid-change, say): a change may have landed
        said = f"{self.url} broke off {method} {path}: {type(e).__name__}: {str(e).rstrip('.')}{MAY_LAND * changes}"
        return ClipbankHTTPError(0, "connection_failed", said)

    def _classify_request(self, images, labels, task, route, top_k, match_labels, min_generation, request_id, skip_bad):
        """`classify`'s requests (its arguments, in order): its images' Batches, form fields and headers; a TypeError
        or a ValueError for what no server would take, before anything is sent."""
        labels = () if labels is None else labels
        task, route = AUTO if task is None else task, PER_IMAGE if route is None else route
        one_pil = hasattr(images, "save") and isinstance(getattr(images, "mode", None), str)  # a Series's mode() is not
        # one file was sent line by line as images, one bytearray as ints; a dict would be its keys
        one = isinstance(images, str | bytes | bytearray | memoryview | os.PathLike | Mapping) or hasattr(
            images, "read"
        )
        shape = getattr(images, "shape", None) if hasattr(images, "__array_interface__") else None
        one_array = shape is not None and (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4)))
        if one or isinstance(labels, str | Mapping) or one_pil or one_array:  # a batch array (N, H, W, C) is a list
            raise TypeError("images and labels are lists: classify([path], labels=['cat', 'dog'])")
        labels = label_list(labels)
        if task not in (AUTO, ZERO_SHOT):
            _seg(task)  # a name no task can have: a ValueError here, as for task() and activate()
        match_labels, skip_bad = flag(match_labels, "match_labels"), flag(skip_bad, "skip_bad")
        top_k = None if top_k is None else whole(top_k, "top_k")
        headers = _at_least(min_generation) | _traced(request_id)
        files, unread = _read_images(images, skip_bad)
        data: dict[str, Any] = {"labels": labels, "task": task, "route": route}
        if top_k is not None:
            data["top_k"] = str(top_k)
        if not match_labels:
            data["match_labels"] = "false"
        # more images, bytes, pixels or answer than the server takes at once: sent as several requests, one answer;
        # but one decision for all the images (a per-request route) is not split behind the caller's back
        size = min(len(files), self._max_images or len(files)) if route == PER_IMAGE else len(files)
        return Batches(files, size, unread, skip_bad=skip_bad, split=route == PER_IMAGE), data, headers

    @contextlib.contextmanager
    def _push_request(
        self, bundle: Any, activate: bool, force: bool, mode: str | None, wait_all: bool
    ) -> Iterator[dict[str, Any]]:
        """`push`'s request: a regular file is streamed from the file, open while the request is sent (a 250 MB
        bundle is not held in memory); a pipe's size is unknown: read, as bytes and open files are."""
        activate = flag(activate, "activate")  # checked even beside a mode, which replaces it
        chosen = mode or ("active" if activate else "inactive")
        # `activate` too: a server older than `mode` ignores it, and must not activate an inactive or shadow upload
        params = {"mode": chosen, "activate": str(chosen == "active").lower(), "force": _yes(force, "force")}
        request = {"params": {**params, **_waiting(wait_all)}, "expect": ("task", "version", "bundle_id")}
        if isinstance(bundle, str | os.PathLike) and Path(bundle).is_file():
            with Path(bundle).open("rb") as f:
                yield {**request, "files": {"bundle": (_name(bundle, 0), f, "application/octet-stream")}}
                return
        if isinstance(bundle, str | os.PathLike) and Path(bundle).is_dir():
            raise IsADirectoryError(f"{bundle} is a folder, not a bundle file")
        # an image was sent as PNG, then a 422; None, a TrainResult or a Bundle were said to be no image
        if not isinstance(bundle, str | os.PathLike | bytes | bytearray | memoryview) and not hasattr(bundle, "read"):
            hint = ": push(result.bundle)" if hasattr(bundle, "bundle") and hasattr(bundle, "report") else ""
            raise TypeError(f"a bundle is a file's path, its bytes or an open file, not {type(bundle).__name__}{hint}")
        yield {**request, "files": {"bundle": (_name(bundle, 0), _bytes(bundle), "application/octet-stream")}}

    def tasks(self, min_generation: int | None = None) -> dict[str, Any]:
        return self._call("GET", "/tasks", headers=_at_least(min_generation), expect=("generation", "tasks"))

    def task(self, name: str, min_generation: int | None = None) -> dict[str, Any]:
        return self._call("GET", f"/tasks/{_seg(name)}", headers=_at_least(min_generation), expect=("task", "versions"))

    def activate(self, task: str, version: int, force: bool = False, wait_all: bool = False) -> dict[str, Any]:
        """Make a stored version active (rollback or roll forward). `wait_all`: as for `push`. The answer is the
        task's entry, with `gate` and `warnings` (what it costs the classes of the version it replaced)."""
        params = {"force": _yes(force, "force"), **_waiting(wait_all)}
        body = {"version": whole(version, "version")}
        return self._call("POST", f"/tasks/{_seg(task)}/activate", json=body, params=params, expect=ACTIVATED)

    def shadow(self, task: str) -> dict[str, Any]:
        """What the task's version in shadow would do to live traffic (claims, from where, score histogram)."""
        return self._call("GET", f"/tasks/{_seg(task)}/shadow", expect=("task", "version", "images"))

    def set_shadow(self, task: str, version: int | None, wait_all: bool = False) -> dict[str, Any]:
        """Put a stored version in shadow; None: stop shadowing. `wait_all`: as for `push`."""
        path, params = f"/tasks/{_seg(task)}/shadow", _waiting(wait_all)
        if version is None:
            return self._call("DELETE", path, params=params, expect=SHADOWED)
        return self._call("POST", path, json={"version": whole(version, "version")}, params=params, expect=SHADOWED)

    def unclaimed(
        self, min_share: float = 0.03, min_size: int = 20, examples: int = 0, max_clusters: int | None = None
    ) -> dict[str, Any]:
        """Clusters of the traffic no task claimed (`GET /insights/unclaimed`), each with up to `examples`
        thumbnails (PNG data URIs) when the server keeps them; at most `max_clusters` (None: the server's default)."""
        params = {"min_share": min_share, "min_size": min_size, "examples": examples}
        if max_clusters is not None:
            params["max_clusters"] = max_clusters
        return self._call("GET", "/insights/unclaimed", params=params, expect=("enabled",))

    def delete(self, task: str, purge: bool = False, wait_all: bool = False) -> dict[str, Any]:
        """Stop routing to a task (`purge`: also forget it). `wait_all`: as for `push`."""
        params = {"purge": _yes(purge, "purge"), **_waiting(wait_all)}
        expect = ("task", "purged_blobs", "generation")
        return self._call("DELETE", f"/tasks/{_seg(task)}", params=params, expect=expect)

    def ready(self) -> dict[str, Any]:
        """`GET /readyz`: the bank's tasks, backbone and generation; a 503 `not_ready` while it loads."""
        return self._call("GET", "/readyz")

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: live (200 while loading too), and the tasks that cannot be served, with why."""
        return self._call("GET", "/healthz")


class ClipbankClient(_Calls):
    """`ClipbankClient("http://127.0.0.1:8000", token=...)`.

    `token`: the admin token, for /tasks and /insights; for /classify too when the server sets a classify token
    (either token reads). `timeout`: seconds for each step of a call, None for none. `retries`: how many times a
    request that changes nothing (classify, the GET calls but the /readyz and /healthz probes) is sent again after
    a 503 whose `Retry-After` says when (`overloaded`, `stale_replica`, `not_ready`), after waiting that long,
    doubled after each try (at most 30 s, plus up to a quarter more at random), and after a connection broken
    mid-request or a 500, 502, 503 or 504 that is not clipbank's own (a replica or a proxy in front that died: 0.25
    s, doubled each time); 0 (the default) raises at once, with the wait in `ClipbankHTTPError.retry_after`. A
    change is never sent twice. A connection refused (a server restarting: nothing was sent) is tried again for
    every request, changes too: after 1 s, doubled each time (`retries=4` waits up to 15 s in all).
    `max_connections`: of the client's pool, which its threads share. A client used before a fork makes its own
    connections in the child (the parent's, shared, mixed up the two processes' answers), and pickles as its
    settings."""

    def _new_http(self) -> httpx.Client:
        _LIVE.add(self)  # a forked child gets connections of its own (`_renew_after_fork`)
        return httpx.Client(**self._http_settings())

    def _renew(self) -> None:
        """New connections (none yet) in place of the pool's, as it was: open, or closed."""
        closed, self._http = self._http.is_closed, self._new_http()
        if closed:
            self._http.close()

    def __enter__(self) -> ClipbankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """`_once`, sent again up to `retries` times after a 503 that says when, if the request changes nothing."""
        began = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                return self._once(method, path, **kwargs)
            except ClipbankHTTPError as e:
                wait = self._wait_before_retry(e, method, path, attempt)
                if wait is None:
                    raise tried(e, attempt + 1, time.monotonic() - began) from None
                time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _once(self, method: str, path: str, expect: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """The JSON answer, or ClipbankHTTPError (`answer_body`). Once the answer starts, its body must arrive within
        `timeout` seconds in all (a server trickling it cannot hold the caller longer); before, each step has
        `timeout` (a long upload is not cut short)."""
        if self._http.is_closed:
            raise self._closed_error()
        deadline = math.inf if self.timeout is None else self.timeout
        began = time.monotonic()
        try:
            with self._http.stream(method, path, **kwargs) as response:
                raw = _read_within(response, time.monotonic() + deadline, self.url, began)
        except httpx.HTTPError as e:  # refused, timed out, broke, a body that does not decode
            raise self._transport_error(e, method, path, time.monotonic() - began, "files" in kwargs) from None
        return answer_body(response, raw, self.url, method, path, expect)

    def classify(
        self,
        images: Sequence[ImageInput],
        labels: Iterable[str] | None = (),
        task: str | None = AUTO,
        route: str | None = PER_IMAGE,
        top_k: int | None = None,
        match_labels: bool = True,
        min_generation: int | None = None,
        request_id: str | None = None,
        skip_bad: bool = False,
    ) -> dict[str, Any]:
        """Images are paths, encoded bytes, open binary files, PIL images (sent upright, as `_pil_bytes` says) or
        numpy arrays of uint8 pixels (height x width, 1, 3 or 4 channels last; a batch array of N such is a list).
        Returns `{"results": [...], "timing": {...}}`. `match_labels=False`: the selector alone routes, whatever
        the labels (docs/service.md). `min_generation`: answered from that store generation or later (a change's
        `generation`: read your own writes across servers), else a 503 `stale_replica`. `request_id`: sent as
        `X-Request-ID`, which the server's log lines name (else it makes one). None for `labels`, `task` or `route`
        means its default (no labels, auto, per image). `skip_bad`: an image that cannot be read, or that the server
        refuses (a 413 or 422 naming it), is answered `{"error": {status, code, message}}` in its place and the
        others are answered (else the call raises, and the answers of its requests sent before are lost)."""
        batches, data, headers = self._classify_request(
            images, labels, task, route, top_k, match_labels, min_generation, request_id, skip_bad
        )

        def send(part: list) -> dict[str, Any]:
            return self._call("POST", "/classify", files=part, data=data, headers=headers, expect=("results",))

        answer = batches.send_all(send, self.url)
        self._max_images = batches.most or self._max_images  # the next call starts at the server's max_images
        return answer

    def push(
        self,
        bundle: str | os.PathLike | bytes | Any,
        activate: bool = True,
        force: bool = False,
        mode: str | None = None,
        wait_all: bool = False,
    ) -> dict[str, Any]:
        """Upload a bundle file (path or bytes); returns `{task, version, bundle_id, experts_added, generation,
        gate, replicas, restored, warnings}` (`restored`: the very bytes of a stored version whose blob was damaged,
        written back; nothing new stored; `warnings`: what it costs the classes of the version it replaces, such as
        those it lacks). `force` overrides the interference gate (a 409 `interference` otherwise names what it
        would take). `mode` (active, inactive, shadow) replaces `activate` when given. `wait_all`: return once
        every replica serves it (a 504 `replicas_lagging` names those that did not)."""
        with self._push_request(bundle, activate, force, mode, wait_all) as request:
            return self._call("POST", "/tasks", **request)


def _read_images(images: Iterable[ImageInput], skip_bad: bool) -> tuple[list, dict[int, dict]]:
    """The images as multipart files, and (with `skip_bad`) those that could not be read or encoded, as errors by
    their position; else the first such error is raised."""
    files, unread = [], {}
    for i, img in enumerate(images):
        try:
            files.append(("images", (_name(img, i), _bytes(img))))
        except (OSError, ValueError, TypeError) as e:  # a file that is gone, an array that is no image
            if not skip_bad:
                raise
            unread[i] = {"status": 0, "code": "unreadable", "message": f"{type(e).__name__}: {e}"[:300]}
    if not files and not unread:
        raise ValueError("no images to classify: classify([path, ...], labels=[...])")
    return files, unread


def _waiting(wait_all: bool) -> dict[str, str]:
    """The query of a change that returns once every replica serves it (else 504 `replicas_lagging`)."""
    return {"wait": "all"} if flag(wait_all, "wait_all") else {}


def _yes(value: bool, name: str) -> str:
    """A yes/no query value, from True or False only (`flag`)."""
    return "true" if flag(value, name) else "false"


def _seg(name: str) -> str:
    """A task name as one path segment, or a ValueError for a name no task can have (the server would answer it
    with a 404 for a path it has no route for, as `/` in it splits the path). Quoted all the same: '../x' must
    never reach another endpoint."""
    problem = task_name_problem(name)
    if problem is not None:
        raise ValueError(f"{problem}: no task can have that name")
    return quote(name, safe="")
