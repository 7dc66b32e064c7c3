"""`AsyncClipbankClient`: the Python client for asyncio applications (FastAPI handlers, aiohttp, workers).

The same calls, arguments, answers, errors and retries as `ClipbankClient`, each awaited: no call blocks the event
loop, and a retry's wait is an `asyncio.sleep`. An outside check measured what the blocking client costs there:
called in an `async def` FastAPI handler it froze the whole app (64 s with the server down and `retries=3`), and
through `asyncio.to_thread` its retry waits held the loop's few default threads (7.7 s for unrelated work)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import httpx

from model_store.modes import AUTO, PER_IMAGE

from .client import _Calls
from .client_inputs import ImageInput
from .client_wire import ClipbankHTTPError, answer_body, read_within_async, tried


class AsyncClipbankClient(_Calls):
    """`async with AsyncClipbankClient("http://127.0.0.1:8000", token=...) as c: await c.classify([...])`.

    Settings as `ClipbankClient`'s (`timeout`, `retries`, `max_connections`); every call is a coroutine with the
    same arguments and answer. Images are read and encoded (a PIL image or an array as PNG), and a bundle read, in
    a worker thread, so the loop goes on meanwhile. One client may be shared by the tasks of one event loop; make
    one per loop (and per process: it does not follow a fork; once its loop is closed, it connects anew in the
    next). Cancelling a call (`asyncio.wait_for`, a task cancelled) closes its connection at once; a change it
    was sending may have landed, as for a `timeout` error."""

    def _new_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(**self._http_settings())

    async def __aenter__(self) -> AsyncClipbankClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._check_loop()  # connections of a closed loop are dropped, not closed from this one (an error)
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """`_once`, sent again up to `retries` times after a 503 that says when, if the request changes nothing."""
        began = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                return await self._once(method, path, **kwargs)
            except ClipbankHTTPError as e:
                wait = self._wait_before_retry(e, method, path, attempt)
                if wait is None:
                    raise tried(e, attempt + 1, time.monotonic() - began) from None
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _once(self, method: str, path: str, expect: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """The JSON answer, or ClipbankHTTPError (`answer_body`); its body within `timeout` once it starts."""
        if self._http.is_closed:
            raise self._closed_error()
        self._check_loop()
        deadline = math.inf if self.timeout is None else self.timeout
        began = time.monotonic()
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                raw = await read_within_async(response, time.monotonic() + deadline, self.url, began)
        except httpx.HTTPError as e:  # refused, timed out, broke, a body that does not decode
            raise self._transport_error(e, method, path, time.monotonic() - began, "files" in kwargs) from None
        return answer_body(response, raw, self.url, method, path, expect)

    def _check_loop(self) -> None:
        """The client's connections belong to the event loop of its first call. Used from a second `asyncio.run`
        (a client made at a script's top level), httpx failed with a bare "Event loop is closed": once that loop is
        closed, the client makes new connections in this one; while it runs (another thread's), it is an error."""
        loop, first = asyncio.get_running_loop(), getattr(self, "_loop", None)
        if first is not None and first is not loop:
            if not first.is_closed():
                state = "running" if first.is_running() else "not closed"
                raise RuntimeError(
                    f"this AsyncClipbankClient is used by another event loop ({state}), which holds its connections: "
                    "make one client per event loop"
                )
            self._http = self._new_http()  # the closed loop's connections cannot be used, nor closed, from here
        self._loop = loop

    async def classify(
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
        """`ClipbankClient.classify`, awaited: split into several requests as the server's 413 says."""
        batches, data, headers = await asyncio.to_thread(
            self._classify_request,
            *(images, labels, task, route, top_k, match_labels, min_generation, request_id, skip_bad),
        )

        async def send(part: list) -> dict[str, Any]:
            return await self._call("POST", "/classify", files=part, data=data, headers=headers, expect=("results",))

        answer = await batches.asend_all(send, self.url)
        self._max_images = batches.most or self._max_images  # the next call starts at the server's max_images
        return answer

    async def push(
        self, bundle: Any, activate: bool = True, force: bool = False, mode: str | None = None, wait_all: bool = False
    ) -> dict[str, Any]:
        """`ClipbankClient.push`, awaited. The bundle is read in a worker thread and sent from memory (a file is
        not streamed as the blocking client streams it: httpx would read it on the event loop's thread)."""
        request = await asyncio.to_thread(self._push_read, bundle, activate, force, mode, wait_all)
        return await self._call("POST", "/tasks", **request)

    def _push_read(self, bundle: Any, activate: bool, force: bool, mode: str | None, wait_all: bool) -> dict:
        with self._push_request(bundle, activate, force, mode, wait_all) as request:
            name, content, kind = request["files"]["bundle"]
            read = content.read() if hasattr(content, "read") else content
            return {**request, "files": {"bundle": (name, read, kind)}}
