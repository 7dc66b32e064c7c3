"""Reading requests: classify bodies (multipart or JSON) and bundle uploads, each limit checked once, early."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from model_store.errors import InvalidRequest
from model_store.labels import label_key, label_problem, twin_message
from model_store.manifest import shown
from model_store.safejson import JSONOverBound, JSONRefused
from model_store.safejson import loads as bounded_loads

from .config import MB, Limits
from .errors import ClientGone, LimitExceeded, UnsupportedMediaType, of_image
from .forms import FormLimits, named_part, read_multipart
from .images import decode_base64
from .schemas import ClassifyJSON, ClassifyOptions

if TYPE_CHECKING:
    from model_store.inference import ImageResult

OPTION_FIELDS = ("task", "route", "top_k", "match_labels")
UTF8_BYTES_PER_CHAR = 4


def content_kind(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def classify_form_limits(limits: Limits) -> FormLimits:
    return FormLimits(
        file_fields=("images",),
        max_files=limits.max_images,
        max_file_bytes=limits.max_image_bytes,
        max_fields=limits.max_labels + len(OPTION_FIELDS),
        max_field_bytes=max(UTF8_BYTES_PER_CHAR * limits.max_label_chars, 256),
        files_name="max_images",
        file_bytes_name="max_image_bytes",
        fields_name=f"max_labels={limits.max_labels} labels and {len(OPTION_FIELDS)} option fields",
        field_bytes_name=f"max_label_chars={limits.max_label_chars} characters of up to {UTF8_BYTES_PER_CHAR} bytes",
        file_word="image",
        files_setting="max_images",
        fields_setting=("max_labels", limits.max_labels),
        field_bytes_setting=("labels", "max_label_chars", limits.max_label_chars),
    )


async def read_classify(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], ClassifyOptions]:
    """(name, bytes) of each image and the validated options; nothing is decoded yet."""
    kind = content_kind(request)
    if kind == "multipart/form-data":
        form = await read_multipart(request, classify_form_limits(limits))
        files = [(f"image {i}{named_part(name)}", data) for i, (_, name, data) in enumerate(form.files)]
        fields: dict[str, Any] = {}
        for key, value in form.fields:
            if key == "labels":
                fields.setdefault("labels", []).append(value)
            elif key.endswith("[]"):  # axios and qs name repeated fields so; an unknown field, once seen twice
                raise InvalidRequest(f"no field is named {shown(key)}: repeat the field {shown(key[:-2])} instead")
            elif key not in ClassifyOptions.model_fields:  # a wrong name, sent once or more: validation names it
                fields.setdefault(key, value)
            elif key in fields:
                raise InvalidRequest(f"the field {shown(key)} is sent more than once")
            else:
                fields[key] = value
        options = validated(ClassifyOptions, fields)
    elif kind == "application/x-www-form-urlencoded":  # what a form without files is sent as
        raise UnsupportedMediaType(
            "Content-Type application/x-www-form-urlencoded carries no files: send multipart/form-data (files) or "
            "application/json (base64)"
        )
    elif kind == "application/json":
        body = await _body(request)
        options, files = await run_in_threadpool(_parse_json_classify, body, limits)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {shown(kind) if kind else 'none'}: send multipart/form-data (files) or application/json "
            "(base64)"
        )
    check_labels(options.labels, limits)
    return files, options


ENTRY_BYTES = 40  # {"label":"","score":0.12345678901234567}, and its comma
MAX_ESCAPED_CHAR = 12  # JSON bytes of one character at most: an escaped surrogate pair, "\ud83d\udc31"


def check_answer_size(
    images: int, options: ClassifyOptions, limits: Limits, task_classes: Mapping[str, tuple[str, ...]]
) -> bool:
    """Refuse, before any work, a request whose answer would pass max_response_bytes: every image's answer lists
    the labels again (or its best top_k); without labels, its task's classes (`task_classes`: each active task's;
    the pinned one's). An outside check's 64 images x 1000 labels of 200 emoji answered 153 MB and held 450 MB of
    the server's memory while a client that never read it stayed connected.

    Without labels or a pinned task, the answer depends on where the images go: True when even the widest task's
    answer for every image would pass the limit, so that `check_routed_answer_size` measures it once they are
    routed (a bank with one task of 10,000 classes would otherwise refuse every such request of 64 images, those
    of images no task claims too)."""
    if options.labels:  # a client's labels are not kept in a cache: bounded cheaply, measured only if need be
        labels = tuple(options.labels)
        count = min(len(labels), options.top_k or len(labels))
        at_most = count * (MAX_ESCAPED_CHAR * max(map(len, labels)) + 2 + ENTRY_BYTES)
        per_image = at_most if images * at_most <= limits.max_response_bytes else _measured(labels, options.top_k)
    else:  # the bank's own tuples: cached
        pinned = options.task in task_classes
        per_image, labels = max(
            (
                (_answer_bytes(task_classes[t], options.top_k), task_classes[t])
                for t in ([options.task] if pinned else task_classes)
            ),
            default=(0, ()),
        )
        if not pinned and images * per_image > limits.max_response_bytes:
            return True
    if images * per_image > limits.max_response_bytes:
        shown_labels = min(len(labels), options.top_k or len(labels))
        what = "labels" if options.labels else "classes of a task"
        _refuse(images * per_image, f"{images} images x {shown_labels} {what}", limits)
    return False


def check_routed_answer_size(
    results: Sequence[ImageResult], options: ClassifyOptions, limits: Limits, task_classes: Mapping[str, tuple]
) -> None:
    """The answer of an unlabelled request once its images are routed: each image's task's classes (an image no
    task claims has none). A task that was not active when the request came measures its answer's own labels."""
    sizes: dict[str | None, int] = {None: 0}
    per_task: dict[str | None, int] = {}  # bytes of the answer, per task the images went to
    for r in results:
        task = r.route.task
        if task not in sizes:
            classes = task_classes.get(task) or tuple(label for label, _ in r.labels)
            sizes[task] = _answer_bytes(tuple(classes), options.top_k)
        per_task[task] = per_task.get(task, 0) + sizes[task]
    if (total := sum(per_task.values())) > limits.max_response_bytes:
        most = max((n, t) for t, n in per_task.items() if t is not None)[1]  # over the limit: some task has bytes
        count = sum(r.route.task == most for r in results)
        _refuse(total, f"{len(results)} images, {count} of them routed to task {shown(most)}", limits)


def _refuse(size: int, what: str, limits: Limits) -> None:
    raise LimitExceeded(
        f"the answer would be about {_bytes(size)} ({what}, each with its score): the limit is "
        f"max_response_bytes={limits.max_response_bytes}; ask for top_k, or send fewer images or labels",
        "max_response_bytes",
        limits.max_response_bytes,
    )


def _bytes(n: int) -> str:
    return f"{n / MB:.1f} MiB" if n >= MB else f"{n} bytes"


def _measured(labels: tuple[str, ...], top_k: int | None) -> int:
    """JSON bytes of one image's answer over `labels`: at most its top_k longest."""
    sizes = sorted((len(json.dumps(label)) + ENTRY_BYTES for label in labels), reverse=True)
    return sum(sizes[:top_k] if top_k else sizes)


_answer_bytes = functools.lru_cache(maxsize=1024)(_measured)  # for the bank's own class tuples, which it holds


HEADER_FIELDS = {"min_generation": "X-Min-Generation", "request_id": "X-Request-ID"}  # headers, not fields


def _meant(key: str, names: Iterable[str]) -> str:
    """ ": send 'labels'" for a name that is one of `names` but for case or a final s; which header a field is."""
    if key.lower() in HEADER_FIELDS:
        return f": send it as the header {HEADER_FIELDS[key.lower()]}"
    near = [f for f in names if f.rstrip("s") == key.lower().rstrip("s")]
    return f": send {shown(near[0])}" if near else ""


def json_problem(e: JSONRefused) -> str:
    """What is wrong with a body `bounded_loads` refused: valid JSON over a bound is not called invalid."""
    return f"the JSON body {'is refused' if isinstance(e, JSONOverBound) else 'is not valid JSON'}: {e}"


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """A small JSON body (bounded by the body limit), parsed with bounded JSON and validated by `model`."""
    kind = content_kind(request)
    if kind != "application/json":
        raise UnsupportedMediaType(f"Content-Type {shown(kind) if kind else 'none'}: send application/json")
    try:
        payload = bounded_loads(await _body(request))
    except JSONRefused as e:
        raise InvalidRequest(json_problem(e)) from None
    return validated(model, payload)


async def _body(request: Request) -> bytes:
    try:
        body = await request.body()
    except ClientDisconnect:
        raise ClientGone("the client closed the connection before its body arrived") from None
    if not body.strip():  # said so, not "not valid JSON: Expecting value: line 1 column 1"
        framed = "content-length" in request.headers or "transfer-encoding" in request.headers
        raise InvalidRequest("the body is empty" + ("" if framed else " (the request has no Content-Length)"))
    return body


def json_value_budget(limits: Limits) -> int:
    """How many commas a classify body may hold: one per image and label, those a label may contain itself,
    and a few for the options. A container of n values needs n - 1 commas, so this bounds the values a body
    makes the parser build; far more means a body built to cost parsing time (deep nesting is bounded apart)."""
    return 4 * limits.max_images + limits.max_labels * (limits.max_label_chars + 2) + 64


def _parse_json_classify(body: bytes, limits: Limits) -> tuple[ClassifyJSON, list[tuple[str, bytes]]]:
    commas = body.count(b",")
    if commas > json_value_budget(limits):
        raise LimitExceeded(
            f"the JSON body holds {commas} commas, so about as many values; a classify request with max_images="
            f"{limits.max_images} and max_labels={limits.max_labels} needs at most {json_value_budget(limits)}"
        )
    try:
        payload = bounded_loads(body)
    except JSONRefused as e:
        raise InvalidRequest(json_problem(e)) from None
    parsed = validated(ClassifyJSON, payload)
    if len(parsed.images) > limits.max_images:
        raise LimitExceeded(
            f"{len(parsed.images)} images in one request; the limit is max_images={limits.max_images}",
            "max_images",
            limits.max_images,
        )
    named = [(f"image {i}", s) for i, s in enumerate(parsed.images)]
    return parsed, [(name, of_image(i, decode_base64, s, name, limits)) for i, (name, s) in enumerate(named)]


def validated(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest("; ".join(_problem(model, err) for err in e.errors()[:10])) from None


def _problem(model: type[BaseModel], err: Any) -> str:
    where = ".".join(map(str, err["loc"]))[:60] or "body"
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:  # "label": which field was meant
        return f"no field is named {shown(str(err['loc'][0]))}{_meant(str(err['loc'][0]), model.model_fields)}"
    return f"{where}: {err['msg'][:120]}"


def check_labels(labels: list[str], limits: Limits) -> None:
    if len(labels) > limits.max_labels:
        raise LimitExceeded(
            f"{len(labels)} labels; the limit is max_labels={limits.max_labels}", "max_labels", limits.max_labels
        )
    if len(labels) == 1 and ("," in labels[0] or labels[0].lstrip().startswith("[")):
        raise InvalidRequest(
            f"one label, {shown(labels[0], 80)}, that looks like a list (and one label always scores 1.0): send"
            " each label as a field of its own (repeat `labels`), or a list in a JSON body; if it is one label,"
            " send it with at least one other"
        )
    for i, label in enumerate(labels):
        if len(label) > limits.max_label_chars:
            raise LimitExceeded(
                f"label {i} is {len(label)} characters; the limit is max_label_chars={limits.max_label_chars}",
                "max_label_chars",
                limits.max_label_chars,
            )
        problem = label_problem(label)
        if problem is not None:
            raise InvalidRequest(f"label {i} {problem}")
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"label {i} is not valid Unicode text (lone surrogate)") from None
    keys: dict[str, int] = {}
    for i, label in enumerate(labels):  # one class to routing (and to a task that has it) whatever the route
        first = keys.setdefault(label_key(label), i)
        if labels[first] != label:  # the very same label twice is named so later (`ClassifyItem`)
            raise InvalidRequest(f"labels {twin_message((labels[first], label))}")


async def read_bundle_upload(request: Request, limits: Limits) -> bytes:
    """The bytes of the multipart field `bundle`, bounded by max_upload_bytes while they stream in."""
    kind = content_kind(request)
    if kind != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type {shown(kind) if kind else 'none'}: upload the bundle as multipart field 'bundle'"
        )
    form_limits = FormLimits(
        file_fields=("bundle",),
        max_files=1,
        max_file_bytes=limits.max_upload_bytes,
        max_fields=4,
        max_field_bytes=1024,
        files_name="one bundle per upload",
        file_bytes_name="max_upload_bytes",
    )
    form = await read_multipart(request, form_limits)
    if form.fields:  # `-F mode=shadow` used to be dropped, and the version went live instead of into shadow
        names = ", ".join(dict.fromkeys(shown(n) for n, _ in form.fields))
        raise InvalidRequest(
            f"the upload takes one multipart field, 'bundle', and no text fields (got {names}): its options are "
            "query parameters, e.g. POST /tasks?mode=shadow&force=true&wait=all"
        )
    if not form.files:  # no file at all: not a bundle in the wrong format
        raise InvalidRequest("send the bundle file in the multipart field 'bundle'")
    return form.files[0][2]
