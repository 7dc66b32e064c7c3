"""The hostile-input table: requests a careless or hostile client may send, each with the 4xx it must get."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tests.helpers import edit_bundle
from tests.reliability.payloads import (
    chunk_flood_png,
    comment_flood_gif,
    full_png,
    lying_bmp,
    lying_gif,
    lying_jpeg,
    lying_png,
    lying_tiff,
    lying_webp,
    mpo_wrapped,
    multipart,
    png_of,
    raw_header_bundle,
    rle_flood_bmp,
    scan_bomb_jpeg,
    segment_flood_jpeg,
    ztxt_bomb_png,
)

MB = 1024 * 1024


@dataclass
class Target:
    """A running server and what the cases need to talk to it."""

    url: str
    port: int
    token: str
    bundle: bytes  # a valid bundle for this server's backbone (not yet uploaded)
    client: httpx.Client

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, **kw) -> tuple[int, bytes]:
        r = self.client.post(self.url + path, **kw)
        return r.status_code, r.content

    def raw(self, data: bytes, then_wait: float = 5.0) -> tuple[int, bytes]:
        """Send raw bytes, then read the response until the server closes (or `then_wait` passes)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=then_wait) as s:
            s.sendall(data)
            got = b""
            deadline = time.monotonic() + then_wait
            while time.monotonic() < deadline:
                try:
                    piece = s.recv(65536)
                except TimeoutError:
                    break
                if not piece:
                    break
                got += piece
                head, _, body = got.partition(b"\r\n\r\n")
                length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
        status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0
        return status, got.partition(b"\r\n\r\n")[2]

    def upload(self, data: bytes, **kw) -> tuple[int, bytes]:
        return self.post("/tasks", files={"bundle": ("b.safetensors", data)}, headers=self.admin, **kw)


Send = Callable[[], tuple[int, bytes]]


@dataclass(frozen=True)
class Case:
    """`build(target)` makes the payload (not timed) and returns `send()`, the request (timed)."""

    name: str
    build: Callable[[Target], Send]
    status: int
    code: str | None = None  # the error code the body must carry (None: any)


def call(fn: Callable[[Target], tuple[int, bytes]]) -> Callable[[Target], Send]:
    """A case whose payload is cheap: the whole call is timed."""
    return lambda t: lambda: fn(t)


def image(make: Callable[[], bytes], labels=("a", "b")) -> Callable[[Target], Send]:
    def build(t: Target) -> Send:
        data = make()
        return lambda: t.post("/classify", files=[("images", ("x.png", data))], data={"labels": list(labels)})

    return build


def form(make_parts: Callable[[], list]) -> Callable[[Target], Send]:
    def build(t: Target) -> Send:
        kind, body = multipart(make_parts())
        return lambda: t.post("/classify", content=body, headers={"Content-Type": kind})

    return build


def as_json(payload=None, raw: Callable[[], bytes] | None = None) -> Callable[[Target], Send]:
    def build(t: Target) -> Send:
        body = raw() if raw is not None else json.dumps(payload).encode()
        return lambda: t.post("/classify", content=body, headers={"Content-Type": "application/json"})

    return build


def bundle_edit(**kw) -> Callable[[Target], Send]:
    def build(t: Target) -> Send:
        data = edit_bundle(t.bundle, **kw)
        return lambda: t.upload(data)

    return build


def bundle_bytes(make: Callable[[], bytes]) -> Callable[[Target], Send]:
    def build(t: Target) -> Send:
        data = make()
        return lambda: t.upload(data)

    return build


def with_image(*extra: tuple) -> Callable[[], list]:
    """Multipart parts: one small image, then `extra` parts."""
    return lambda: [(b"images", b"i.png", png_of()), *extra]


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        m[last] = value

    return edit


def _raw_http(data: bytes) -> Callable[[Target], Send]:
    return call(lambda t: t.raw(data))


def _slow_head(t: Target) -> tuple[int, bytes]:
    return t.raw(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finishes its head


def _slow_body(t: Target) -> tuple[int, bytes]:
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    return t.raw(head + b"Content-Length: 100000\r\n\r\n--b\r\n")  # 100000 promised, a few sent


def _chunked_over_limit(t: Target) -> tuple[int, bytes]:
    piece = b"x" * MB

    def chunks():
        for _ in range(70):
            yield piece

    return t.post("/classify", content=chunks(), headers={"Content-Type": "application/json"})


def _long_task_path(t: Target) -> tuple[int, bytes]:
    r = t.client.get(t.url + "/tasks/" + "a" * 8000, headers=t.admin)
    assert len(r.content) < 1000, "the name is echoed in full"
    return r.status_code, r.content


def _admin_get(path: str, token: str | None = None) -> Callable[[Target], Send]:
    def send(t: Target) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else t.admin
        r = t.client.get(t.url + path, headers=headers)
        return r.status_code, r.content

    return call(send)


def _png_at(w, h):
    return lambda: full_png(w, h)


CLASSIFY_IMAGES = [
    Case("1xN PNG (extreme aspect)", image(_png_at(1, 100_000)), 413, "limit_exceeded"),
    Case("Nx1 PNG (extreme aspect)", image(_png_at(100_000, 1)), 413, "limit_exceeded"),
    Case("24,000,000x1 PNG header", image(lambda: lying_png(24_000_000, 1)), 413, "limit_exceeded"),
    Case("1x24,000,000 PNG header", image(lambda: lying_png(1, 24_000_000)), 413, "limit_exceeded"),
    Case("PNG claiming 100000x100000", image(lambda: lying_png(100_000, 100_000)), 413, "limit_exceeded"),
    Case("PNG claiming 5000x5000 (over max_pixels)", image(lambda: lying_png(5000, 5000)), 413, "limit_exceeded"),
    Case("JPEG claiming 65000x65000", image(lambda: lying_jpeg(65000, 65000)), 413, "limit_exceeded"),
    Case("GIF claiming 65535x65535", image(lambda: lying_gif(65535, 65535)), 413, "limit_exceeded"),
    Case("BMP claiming 60000x60000", image(lambda: lying_bmp(60000, 60000)), 413, "limit_exceeded"),
    Case("TIFF claiming 60000x60000", image(lambda: lying_tiff(60000, 60000)), 413, "limit_exceeded"),
    Case("WEBP claiming 16000x16000", image(lambda: lying_webp(16000, 16000)), 413, "limit_exceeded"),
    Case("PNG with a 64 MB zTXt bomb", image(lambda: ztxt_bomb_png(64)), 422, "bad_image"),
    Case("progressive JPEG of 100,000 scans", image(lambda: scan_bomb_jpeg(1024, 100_000)), 413, "limit_exceeded"),
    Case("MPO of 500 scans", image(lambda: mpo_wrapped(scan_bomb_jpeg(64, 500))), 413, "limit_exceeded"),
    Case("JPEG of 3.9M empty APP1 segments", image(lambda: segment_flood_jpeg(3_900_000)), 413, "limit_exceeded"),
    Case("PNG of 1.3M empty chunks before its pixels", image(lambda: chunk_flood_png(1_300_000)), 413),
    Case("PNG of 1.3M empty chunks after its pixels", image(lambda: chunk_flood_png(1_300_000, True)), 413),
    Case("GIF comment of 7M one-byte blocks", image(lambda: comment_flood_gif(7_000_000)), 413, "limit_exceeded"),
    Case("1x2 RLE BMP of 15 MB", image(lambda: rle_flood_bmp(15)), 422, "bad_image"),
    Case("PNG claiming 2000x2000 with no rows", image(lambda: lying_png(2000, 2000)), 422, "bad_image"),
    Case("truncated PNG", image(lambda: png_of()[:60]), 422, "bad_image"),
    Case("random bytes", image(lambda: bytes(range(256)) * 40), 422, "bad_image"),
    Case("empty file", image(lambda: b""), 422, "bad_image"),
    Case(
        "EPS (needs Ghostscript)", image(lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"), 422, "bad_image"
    ),
    Case("SVG", image(lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'), 422, "bad_image"),
    Case("image over max_image_bytes", image(lambda: b"\x89PNG" + b"\0" * (16 * MB + 10)), 413, "limit_exceeded"),
    Case("65 images", form(lambda: [(b"images", b"i.png", png_of())] * 65), 413, "limit_exceeded"),
    Case(
        "64 x 24 MP PNG (over max_request_pixels)",
        form(lambda: [(b"images", b"i.png", full_png(4000, 6000))] * 64),
        413,
        "limit_exceeded",
    ),
    Case("99,000 tiny image parts", form(lambda: [(b"images", b"i", b"x")] * 99_000), 413, "limit_exceeded"),
    Case("no images", form(lambda: [(b"labels", None, b"a")]), 422, "invalid_request"),
    # a part of `images` without a filename is an image (RFC 7578; tests/service/test_classify.py): this one is none
    Case("an image part without a filename, no image", form(lambda: [(b"images", None, b"x" * 99)]), 422, "bad_image"),
]

CLASSIFY_FIELDS = [
    Case("99,000 label fields", form(with_image(*[(b"labels", None, b"l")] * 99_000)), 413, "limit_exceeded"),
    Case("1001 labels", form(with_image(*[(b"labels", None, b"%d" % i) for i in range(1001)])), 413),
    Case("label of 201 characters", image(png_of, labels=("a" * 201, "b")), 413, "limit_exceeded"),
    Case("label field of 1 MB", form(with_image((b"labels", None, b"a" * MB))), 413, "limit_exceeded"),
    Case("empty label", image(png_of, labels=(" ", "b")), 422, "invalid_request"),
    Case("duplicate labels", image(png_of, labels=("a", "a")), 422, "invalid_request"),
    Case("labels the tokenizer reads as one", image(png_of, labels=("Cat", "cat")), 422, "invalid_request"),
    Case("one label that is a list: 'a,b'", image(png_of, labels=("a,b",)), 422, "invalid_request"),
    Case("one label that is a JSON list", image(png_of, labels=('["a", "b"]',)), 422, "invalid_request"),
    Case("non-UTF-8 label", form(with_image((b"labels", None, b"caf\xe9"))), 422, "invalid_request"),
    Case("non-UTF-8 field name", form(with_image((b"lab\xffels", None, b"a"))), 422, "invalid_request"),
    Case("unknown file field", form(lambda: [(b"picture", b"i.png", png_of())]), 422, "invalid_request"),
    Case("unknown text field", form(with_image((b"colour", None, b"red"))), 422, "invalid_request"),
    Case("task field twice", form(with_image((b"task", None, b"auto"), (b"task", None, b"auto"))), 422),
    Case("part headers of 20 KB", form(lambda: [(b"images" + b" " * 20_000, b"i.png", png_of())]), 422),
    Case("task of 10,000 characters", form(with_image((b"task", None, b"t" * 10_000))), 413, "limit_exceeded"),
    Case("pinned to an unknown task", form(with_image((b"task", None, b"nope"))), 404, "task_not_found"),
    Case("top_k = 0", form(with_image((b"labels", None, b"a"), (b"top_k", None, b"0"))), 422, "invalid_request"),
    Case("top_k not a number", form(with_image((b"top_k", None, b"many"))), 422, "invalid_request"),
    Case("route per-batch", form(with_image((b"route", None, b"per-batch"))), 422, "invalid_request"),
    Case("zero-shot without labels", form(with_image((b"task", None, b"zero-shot"))), 422, "invalid_request"),
    Case(
        "multipart without boundary",
        call(lambda t: t.post("/classify", content=b"x", headers={"Content-Type": "multipart/form-data"})),
        422,
    ),
    Case(
        "multipart without its closing boundary",
        call(
            lambda t: t.post(
                "/classify",
                content=b'--q\r\nContent-Disposition: form-data; name="labels"\r\n\r\ncat\r\n'
                b'--q\r\nContent-Disposition: form-data; name="labels"\r\n\r\ndog',
                headers={"Content-Type": "multipart/form-data; boundary=q"},
            )
        ),
        422,
        "invalid_request",
    ),
    Case(
        "multipart garbage",
        call(
            lambda t: t.post(
                "/classify", content=b"\0" * 5000, headers={"Content-Type": "multipart/form-data; boundary=q"}
            )
        ),
        422,
    ),
]

CLASSIFY_JSON = [
    Case("JSON nested 100,000 deep", as_json(raw=lambda: b"[" * 100_000), 422, "invalid_request"),
    Case("JSON 5,001-digit integer", as_json(raw=lambda: b'{"images": ["a"], "top_k": ' + b"9" * 5001 + b"}"), 422),
    Case("JSON NaN", as_json(raw=lambda: b'{"images": ["a"], "top_k": NaN}'), 422, "invalid_request"),
    Case("JSON 1e999", as_json(raw=lambda: b'{"images": ["a"], "top_k": 1e999}'), 422, "invalid_request"),
    Case("JSON 30 MB of commas", as_json(raw=lambda: b'{"labels": [' + b"1," * (15 * MB) + b'1], "images": []}'), 413),
    Case("JSON not an object", as_json([1, 2, 3]), 422, "invalid_request"),
    Case("JSON bad UTF-8", as_json(raw=lambda: b'{"images": ["\xff\xfe"]}'), 422, "invalid_request"),
    Case("JSON lone surrogate label", as_json(raw=lambda: b'{"images": ["aGk="], "labels": ["\\ud800"]}'), 422),
    Case("JSON image not base64", as_json({"images": ["***"], "labels": ["a", "b"]}), 422, "bad_image"),
    Case("JSON image over max_image_bytes", as_json(raw=lambda: b'{"images": ["' + b"A" * (22 * MB) + b'"]}'), 413),
    Case("JSON 65 images", as_json({"images": ["aGk="] * 65, "labels": ["a"]}), 413, "limit_exceeded"),
    Case("JSON task of 10,000 characters", as_json({"images": ["aGk="], "task": "t" * 10_000}), 422),
    Case("JSON unknown field", as_json({"images": ["aGk="], "colour": "red"}), 422, "invalid_request"),
]

HTTP_LEVEL = [
    Case(
        "body over max_request_bytes (Content-Length)",
        call(lambda t: t.post("/classify", content=b"x" * (65 * MB))),
        413,
        "limit_exceeded",
    ),
    Case("chunked body over max_request_bytes", call(_chunked_over_limit), 413, "limit_exceeded"),
    Case(
        "Content-Length not a number",
        _raw_http(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n"),
        400,
    ),
    Case(
        "unsupported Content-Type",
        call(lambda t: t.post("/classify", content=b"x", headers={"Content-Type": "a/b"})),
        415,
        "unsupported_media_type",
    ),
    Case("request head never completes (slowloris)", call(_slow_head), 408, "request_timeout"),
    Case("body stalls", call(_slow_body), 408, "request_timeout"),
    Case("malformed request line", _raw_http(b"\x16\x03\x01 garbage\r\n\r\n"), 400, "bad_request"),
    Case(  # h11 bounds only a head still arriving: one that came in a single read was let through
        "a 70 KB request head in one piece",
        _raw_http(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"),
        431,
        "head_too_large",
    ),
    Case("unknown method", _raw_http(b"BREW /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"), 405),
    Case("unknown path", _admin_get("/nowhere"), 404, "not_found"),
]

MANAGEMENT = [
    Case("no token", call(lambda t: t.post("/tasks", files={"bundle": ("b", t.bundle)})), 401, "unauthorized"),
    Case("wrong token", _admin_get("/tasks", token="x" * 32), 401, "unauthorized"),
    Case("bundle header nested 100,000 deep", bundle_bytes(lambda: raw_header_bundle(b"[" * 100_000)), 422),
    Case(
        "bundle header with a 5,001-digit integer",
        bundle_bytes(lambda: raw_header_bundle(b'{"a": ' + b"9" * 5001 + b"}")),
        422,
    ),
    Case("manifest nested 100,000 deep", bundle_edit(raw_manifest="[" * 100_000), 422, "bundle_invalid"),
    Case("manifest with a 5,001-digit version", bundle_edit(raw_manifest='{"version": ' + "9" * 5001 + "}"), 422),
    Case("manifest created_at an object", bundle_edit(manifest=_set("created_at", {"a": 1})), 422, "bundle_invalid"),
    Case("manifest parent not an id", bundle_edit(manifest=_set("parent", [1])), 422, "bundle_invalid"),
    Case("manifest training a list", bundle_edit(manifest=_set("training", [1, 2])), 422, "bundle_invalid"),
    Case("template {:>300000000}", bundle_edit(manifest=_set("templates", ["{:>300000000}"])), 422, "bundle_invalid"),
    Case("template {0!r}", bundle_edit(manifest=_set("templates", ["a {0!r}"])), 422, "bundle_invalid"),
    Case("template of 5,000 characters", bundle_edit(manifest=_set("templates", ["{}" + "x" * 5000])), 422),
    Case("classes one to the tokenizer", bundle_edit(manifest=_set("classes", ["Cat", "cat"])), 422, "bundle_invalid"),
    Case("20,000 classes", bundle_edit(manifest=_set("classes", [f"c{i}" for i in range(20_000)])), 422),
    Case("class of 10,000 characters", bundle_edit(manifest=_set("classes", ["c" * 10_000, "d"])), 422),
    Case("selector threshold 1e30", bundle_edit(manifest=_set("selector.threshold", 1e30)), 422, "bundle_invalid"),
    Case("selector kind unknown", bundle_edit(manifest=_set("selector.kind", "oracle")), 422, "bundle_invalid"),
    Case("version 0", bundle_edit(manifest=_set("version", 0)), 422, "bundle_invalid"),
    Case("task name reserved", bundle_edit(manifest=_set("task", "auto")), 422, "bundle_invalid"),
    Case("other backbone fingerprint", bundle_edit(manifest=_set("backbone.fingerprint", "0" * 64)), 422),
    Case("tampered tensors", bundle_edit(manifest=_set("content_sha256", "0" * 64), fix_digest=False), 422),
    Case("pickle", bundle_bytes(lambda: b"\x80\x04\x95" + b"\0" * 200), 422, "bundle_not_safetensors"),
    Case("torch zip", bundle_bytes(lambda: b"PK\x03\x04" + b"\0" * 200), 422, "bundle_not_safetensors"),
    Case("truncated bundle", call(lambda t: t.upload(t.bundle[: len(t.bundle) // 2])), 422),
    Case("bundle as JSON", call(lambda t: t.post("/tasks", json={"bundle": "x"}, headers=t.admin)), 415),
    Case(
        "two bundle files",
        call(
            lambda t: t.post(
                "/tasks", files=[("bundle", ("a", t.bundle)), ("bundle", ("b", t.bundle))], headers=t.admin
            )
        ),
        422,  # the request's shape, not a limit (it was a 413 "more than one bundle per upload=1 files")
        "invalid_request",
    ),
    Case(
        "activate an unknown task",
        call(lambda t: t.post("/tasks/nope/activate", json={"version": 1}, headers=t.admin)),
        404,
        "task_not_found",
    ),
    Case(
        "activate with a string version",
        call(lambda t: t.post("/tasks/nope/activate", json={"version": "1"}, headers=t.admin)),
        422,
    ),
    Case(
        "activate body of 2 MB",
        call(
            lambda t: t.post(
                "/tasks/x/activate", content=b" " * (2 * MB), headers={**t.admin, "Content-Type": "a/json"}
            )
        ),
        413,
    ),
    Case("task path of 8,000 characters", call(_long_task_path), 404, "task_not_found"),
    Case(
        "delete an unknown task",
        call(lambda t: (lambda r: (r.status_code, r.content))(t.client.delete(t.url + "/tasks/nope", headers=t.admin))),
        404,
    ),
]

CASES = CLASSIFY_IMAGES + CLASSIFY_FIELDS + CLASSIFY_JSON + HTTP_LEVEL + MANAGEMENT
