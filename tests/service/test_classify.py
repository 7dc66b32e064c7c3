"""POST /classify in process: both request forms, response schema, every bad-input path, batching, metrics."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from PIL import Image

from service.config import Limits
from tests.helpers import png
from tests.service.conftest import running_app
from tests.service.images import bomb_png, colour

pytestmark = pytest.mark.anyio
LABELS = ["red", "green", "blue"]


async def test_zero_shot_multipart(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        files = [("images", ("r.png", colour("red"))), ("images", ("b.png", colour("blue")))]
        r = await c.post("/classify", files=files, data={"labels": LABELS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [res["labels"][0]["label"] for res in body["results"]] == ["red", "blue"]
        for res in body["results"]:
            scores = [x["score"] for x in res["labels"]]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
            assert res["route"]["task"] is None
        assert set(body["timing"]) >= {"decode_ms", "queue_ms", "compute_ms", "total_ms", "batch_images", "generation"}


async def test_json_base64_and_options(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        data_url = "data:image/png;base64," + base64.b64encode(colour("green")).decode()
        payload = {"images": [base64.b64encode(colour("red")).decode(), data_url], "labels": LABELS, "top_k": 2}
        r = await c.post("/classify", json={**payload, "route": "per-request", "task": "zero-shot"})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [res["labels"][0]["label"] for res in results] == ["red", "green"]
        assert all(len(res["labels"]) == 2 for res in results)
        # options sent as null, as Jackson writes unset fields: their defaults (`"labels": null` was a 422)
        nulls = {"labels": None, "task": None, "route": None, "match_labels": None, "top_k": None}
        r = await c.post("/classify", json={"images": payload["images"][:1], **nulls})
        assert r.status_code == 200 and r.json()["results"][0]["labels"] == [], r.text  # no labels, no task: none
        r = await c.post("/classify", json={"images": None, "labels": LABELS})
        assert r.status_code == 422 and "images" in r.json()["error"]["message"], r.text


def _classify_files(n=1, name="r.png", data=None):
    return [("images", (name, data if data is not None else colour("red")))] * n


BAD_INPUTS = [
    # (description, request kwargs, expected status, expected code, words the message must contain)
    (  # a form without files (httpx sends data alone urlencoded): it was a 422 bad_image, where the error table
        # says 415 for what is neither multipart nor JSON
        "no images, a urlencoded form",
        dict(data={"labels": LABELS}),
        415,
        "unsupported_media_type",
        "carries no files: send multipart/form-data",
    ),
    (
        "a label twice",
        dict(files=_classify_files(), data={"labels": ["cat", "dog", "cat"]}),
        422,
        "invalid_request",
        "'cat' is given more than once",
    ),
    ("too many images", dict(files=_classify_files(5), data={"labels": LABELS}), 413, "limit_exceeded", "max_images"),
    (
        "not an image",
        dict(files=_classify_files(name="x.txt", data=b"hello"), data={"labels": LABELS}),
        422,
        "bad_image",
        "x.txt",
    ),
    ("empty image", dict(files=_classify_files(data=b""), data={"labels": LABELS}), 422, "bad_image", "empty"),
    (
        "truncated png",
        dict(files=_classify_files(data=colour("red")[:60]), data={"labels": LABELS}),
        422,
        "bad_image",
        "image 0",
    ),
    (
        "decompression bomb",
        dict(files=_classify_files(data=bomb_png()), data={"labels": LABELS}),
        413,
        "limit_exceeded",
        "max_pixels",
    ),
    (
        "image bytes",
        dict(files=_classify_files(data=os.urandom(3000)), data={"labels": LABELS}),
        413,
        "limit_exceeded",
        "max_image_bytes",
    ),
    (
        "too many labels",
        dict(files=_classify_files(), data={"labels": [f"l{i}" for i in range(9)]}),
        413,
        "limit_exceeded",
        "max_labels",
    ),
    (
        "label too long",
        dict(files=_classify_files(), data={"labels": ["x" * 41]}),
        413,
        "limit_exceeded",
        "max_label_chars",
    ),
    (
        "label far too long",  # cut at the multipart layer, in bytes: the message says how they relate to characters
        dict(files=_classify_files(), data={"labels": ["red", "x" * 1000]}),
        413,
        "limit_exceeded",
        "field 'labels' 1 is longer than 256 bytes; the limit is 256 bytes (max_label_chars=40 characters of up to 4",
    ),
    ("empty label", dict(files=_classify_files(), data={"labels": ["red", " "]}), 422, "invalid_request", "label 1"),
    (
        "duplicate labels",
        dict(files=_classify_files(), data={"labels": ["red", "red"]}),
        422,
        "invalid_request",
        "distinct",
    ),
    (
        "unknown task",
        dict(files=_classify_files(), data={"labels": LABELS, "task": "nope"}),
        404,
        "task_not_found",
        "nope",
    ),
    (  # the review's: over the fields' count, the message named a limit its details did not
        "too many fields",
        dict(files=_classify_files(), data={"labels": [f"l{i}" for i in range(13)]}),
        413,
        "limit_exceeded",
        "more than 12 text fields in one request (max_labels=8 labels and 4 option fields)",
    ),
    ("empty task", dict(files=_classify_files(), data={"labels": LABELS, "task": ""}), 422, "invalid_request", "task"),
    ("empty json task", dict(json={"images": ["aGVsbG8="], "task": ""}), 422, "invalid_request", "task"),
    (
        "bad route",
        dict(files=_classify_files(), data={"labels": LABELS, "route": "sideways"}),
        422,
        "invalid_request",
        "route",
    ),
    (
        "top_k zero",
        dict(files=_classify_files(), data={"labels": LABELS, "top_k": "0"}),
        422,
        "invalid_request",
        "top_k",
    ),
    (
        "top_k text",
        dict(files=_classify_files(), data={"labels": LABELS, "top_k": "many"}),
        422,
        "invalid_request",
        "top_k",
    ),
    (
        "unknown field",
        dict(files=_classify_files(), data={"labels": LABELS, "colour": "x"}),
        422,
        "invalid_request",
        "colour",
    ),
    (
        "no labels for zero-shot",
        dict(files=_classify_files(), data={"task": "zero-shot"}),
        422,
        "invalid_request",
        "no labels",
    ),
    (  # a part of the file field without a filename is a file (RFC 7578): here, no image
        "text in images",
        dict(files=_classify_files(), data={"labels": LABELS, "images": "abc"}),
        422,
        "bad_image",
        "image 0 is not an image",
    ),
    ("bad base64", dict(json={"images": ["!!notbase64!!"], "labels": LABELS}), 422, "bad_image", "base64"),
    ("json not an object", dict(json=["a"]), 422, "invalid_request", "object"),
    ("json missing images", dict(json={"labels": LABELS}), 422, "invalid_request", "images"),
    ("broken json", dict(content=b"{", headers={"Content-Type": "application/json"}), 422, "invalid_request", "JSON"),
    (
        "deep json",
        dict(content=b"[" * 100_000, headers={"Content-Type": "application/json"}),
        422,
        "invalid_request",
        "JSON",
    ),
    (
        "huge int",
        dict(
            content=b'{"images": ["a"], "top_k": 1' + b"0" * 5000 + b"}", headers={"Content-Type": "application/json"}
        ),
        422,
        "invalid_request",
        "JSON body is refused: an integer of 5001 digits",  # valid JSON over a bound: not "not valid JSON"
    ),
    ("top_k of 20 digits", dict(files=_classify_files(), data={"top_k": "1" * 20}), 422, "invalid_request", "19 digit"),
    (  # an integrator's misspelling, repeated as the docs say labels are: it was "sent more than once"
        "misspelled field sent twice",
        dict(files=_classify_files(), data={"label": ["red", "blue"]}),
        422,
        "invalid_request",
        "no field is named 'label': send 'labels'",
    ),
    (
        "misspelled field",
        dict(files=_classify_files(), data={"labels": LABELS, "Top_K": "2"}),
        422,
        "invalid_request",
        "no field is named 'Top_K': send 'top_k'",
    ),
    (  # a header sent as a field in the body
        "header as a field",
        dict(json={"images": ["aGVsbG8="], "labels": LABELS, "min_generation": 3}),
        422,
        "invalid_request",
        "no field is named 'min_generation': send it as the header X-Min-Generation",
    ),
    (
        "lone surrogate",
        dict(
            content=b'{"images": ["aGVsbG8="], "labels": ["\\ud800", "b"]}',
            headers={"Content-Type": "application/json"},
        ),
        422,
        "invalid_request",
        "labels.0",
    ),
    (  # a NUL or an escape in a label is a client's bug, not a class name
        "label with a control character",
        dict(files=_classify_files(), data={"labels": ["red", "gr\x00een"]}),
        422,
        "invalid_request",
        "label 1 has a control character (U+0000)",
    ),
    (  # the tokenizer reads it as an empty label
        "invisible label",
        dict(json={"images": ["aGVsbG8="], "labels": ["red", "\u200b\u2060 "]}),
        422,
        "invalid_request",
        "label 1 has no visible character",
    ),
    (  # drawn as nothing too: Hangul fillers, a variation selector, the grapheme joiner (all were a 200)
        "blank letters and marks",
        dict(json={"images": ["aGVsbG8="], "labels": ["red", "\u3164\ufe0f\u115f \u034f"]}),
        422,
        "invalid_request",
        "label 1 has no visible character",
    ),
    (  # JSON has types: true was taken as top_k=1, "false" as a boolean
        "json top_k true",
        dict(json={"images": ["aGVsbG8="], "labels": LABELS, "top_k": True}),
        422,
        "invalid_request",
        "top_k",
    ),
    (
        "json match_labels string",
        dict(json={"images": ["aGVsbG8="], "labels": LABELS, "match_labels": "false"}),
        422,
        "invalid_request",
        "match_labels",
    ),
    (
        "too many json images",
        dict(json={"images": ["aGVsbG8="] * 5, "labels": LABELS}),
        413,
        "limit_exceeded",
        "max_images",
    ),
    (
        "wrong content type",
        dict(content=b"abc", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    (
        "body too large",
        dict(content=b"x" * 300_000, headers={"Content-Type": "application/json"}),
        413,
        "limit_exceeded",
        "max_request_bytes",
    ),
]

SMALL = Limits(max_images=4, max_labels=8, max_label_chars=40, max_image_bytes=2000, max_request_bytes=200_000)


async def test_bad_inputs_get_a_named_4xx(tmp_path, backbone):
    async with running_app(tmp_path, backbone, limits=SMALL) as c:
        for what, kwargs, status, code, words in BAD_INPUTS:
            r = await c.post("/classify", **kwargs)
            assert r.status_code == status, (what, r.text)
            err = r.json()["error"]
            assert err["code"] == code, (what, err)
            assert words.lower() in err["message"].lower(), (what, err)
            if status == 413 and "image" not in (err.get("details") or {}):  # a client can adapt without parsing
                details = err.get("details") or {}  # a Node integrator's: the labels' 413s had none
                assert {"setting", "limit"} <= details.keys() and isinstance(details["limit"], int), (what, err)
                assert details["setting"] in err["message"] and str(details["limit"]) in err["message"], (what, err)


async def test_a_top_k_of_int_max_means_every_label(tmp_path, backbone):
    """An integrator's `top_k=2147483647` ("all of them") was refused in a form as "not written in digits"."""
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/classify", files=_classify_files(), data={"labels": LABELS, "top_k": "2147483647"})
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["labels"]) == len(LABELS)


async def test_an_error_of_one_image_names_its_index_so_a_client_can_leave_it_out(tmp_path, backbone):
    """Header checks, decoding (a PNG cut after its header decodes no rows) and base64 each say which image."""
    cut = colour("red")[:70]  # the header parses; the pixel data is missing
    big = png(Image.effect_noise((60, 60), 100).convert("RGB"))  # noise: over SMALL's max_image_bytes
    async with running_app(tmp_path, backbone, limits=SMALL) as c:
        for i, bad in ((2, b"not an image"), (1, cut), (0, big)):
            files = [("images", (f"{j}.png", bad if j == i else colour("red"))) for j in range(3)]
            r = await c.post("/classify", files=files, data={"labels": LABELS})
            assert r.status_code in (413, 422) and r.json()["error"]["details"] == {"image": i}, r.text
        ok = base64.b64encode(colour("red")).decode()
        r = await c.post("/classify", json={"images": [ok, "***"], "labels": LABELS})
        assert r.status_code == 422 and r.json()["error"]["details"] == {"image": 1}, r.text
        fields_only = [("labels", (None, label)) for label in LABELS]  # multipart without a file
        r = await c.post("/classify", files=fields_only)  # not about one image: no index
        assert r.status_code == 422 and "details" not in r.json()["error"]
        assert "at least one image" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "invalid_request"  # as in JSON; `bad_image` names a bad image


async def test_image_parts_without_a_filename_are_images(tmp_path, backbone):
    """An outside check with hand-built Java bodies: RFC 7578 makes a file part's filename optional, and such an
    image part was refused ("has no filename, so it reads as text")."""
    async with running_app(tmp_path, backbone) as c:
        files = [("images", (None, colour("red"), "image/png")), ("images", (None, colour("blue")))]
        r = await c.post("/classify", files=files, data={"labels": LABELS})
        assert r.status_code == 200, r.text
        assert [res["labels"][0]["label"] for res in r.json()["results"]] == ["red", "blue"]
        r = await c.post("/classify", files=[files[0], ("images", (None, b"not an image"))], data={"labels": LABELS})
        assert r.status_code == 422 and r.json()["error"]["details"] == {"image": 1}, r.text
        assert r.json()["error"]["message"].startswith("image 1 is "), r.text  # no "('')" for the missing name


async def test_a_malformed_multipart_body_is_told_what_is_wrong_in_words(tmp_path, backbone):
    """An outside check's hand-built bodies got the parser's "Expected boundary character 79, got 88 at index 4"."""
    part = b'Content-Disposition: form-data; name="images"; filename="r.png"'
    cases = [  # (body, what the message says), each sent with the boundary XX
        (b"--OTHER\r\n" + part + b"\r\n\r\n" + colour("red") + b"\r\n--OTHER--\r\n", "does not start with '--XX'"),
        (b'{"images": ["aGk="]}', "does not start with '--XX', the boundary its Content-Type names"),
        (b"--XX\n" + part + b"\n\n" + colour("red") + b"\n--XX--\n", "boundary line must end in CRLF"),
        (b"\r\n--XX\r\n" + part + b"\n\n" + colour("red") + b"\r\n--XX--\r\n", "not LF alone"),  # one header line
        (b"--XX\n" + part + b"\n\nabc\n--XX--\n", "malformed: the boundary line must end in CRLF"),  # no CR at all
        (b"--XX\r\n" + part + b"\nContent-Type: image/png\n\n" + colour("red") + b"\r\n--XX--\r\n", "not LF alone"),
    ]
    async with running_app(tmp_path, backbone) as c:
        for body, said in cases:
            r = await c.post("/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=XX"})
            assert r.status_code == 422 and said in r.json()["error"]["message"], r.text


async def test_too_many_images_names_the_limit_so_a_client_can_send_fewer(tmp_path, backbone):
    async with running_app(tmp_path, backbone, limits=SMALL) as c:
        for kwargs in (
            dict(files=_classify_files(5), data={"labels": LABELS}),
            dict(json={"images": [base64.b64encode(colour("red")).decode()] * 5, "labels": LABELS}),
        ):
            r = await c.post("/classify", **kwargs)
            assert r.status_code == 413 and r.json()["error"]["details"] == {"setting": "max_images", "limit": 4}


async def test_an_answer_over_max_response_bytes_is_refused_before_any_work_and_top_k_fits_it(tmp_path, backbone):
    """Each image's answer lists every label again: 64 images x 1000 labels of 200 emoji answered 153 MB."""
    limits = Limits(max_response_bytes=3000)
    labels = [f"{i} " + "\U0001f431" * 30 for i in range(8)]  # about 400 bytes each as JSON, with its score
    files = _classify_files(2)
    async with running_app(tmp_path, backbone, limits=limits) as c:
        r = await c.post("/classify", files=files, data={"labels": labels})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["details"] == {"setting": "max_response_bytes", "limit": 3000}
        assert "2 images x 8 labels" in err["message"] and "ask for top_k" in err["message"]
        assert c.app.state.service.batcher.batches == 0  # refused before any image was decoded or run
        r = await c.post("/classify", files=files, data={"labels": labels, "top_k": "2"})
        assert r.status_code == 200 and len(r.content) <= 3000
        assert [len(x["labels"]) for x in r.json()["results"]] == [2, 2]
        r = await c.post("/classify", files=files[:1], data={"labels": labels[:3]})
        assert r.status_code == 200 and len(r.content) <= 3000


async def test_without_labels_the_answer_bound_counts_the_tasks_classes(tmp_path, backbone):
    """A reviewer's: with no labels each image is answered over its task's classes (up to 10,000 of 200
    characters), and the bound let every such request through."""
    from model_store.bank import empty_bank
    from tests.helpers import edit_bundle, random_bundle
    from tests.service.conftest import AUTH

    names = [f"class {i} " + "x" * 150 for i in range(10)]  # about 2 KB of answer per image
    bundle = random_bundle(empty_bank(backbone), "long", seed=4)
    bundle = edit_bundle(bundle, manifest=lambda m: m.update(classes=names))
    async with running_app(tmp_path, backbone, limits=Limits(max_response_bytes=3000)) as c:
        files = {"bundle": ("b.safetensors", bundle, "application/octet-stream")}
        assert (await c.post("/tasks", files=files, headers=AUTH)).status_code == 201
        r = await c.post("/classify", files=_classify_files(2), data={"task": "long"})
        assert r.status_code == 413 and "2 images x 10 classes of a task" in r.json()["error"]["message"], r.text
        r = await c.post("/classify", files=_classify_files(2), data={"task": "long", "top_k": "1"})
        assert r.status_code == 200 and len(r.content) <= 3000, r.text


async def test_without_labels_or_a_task_the_answer_is_measured_where_the_images_go(tmp_path, backbone):
    """A bank with one task of 10,000 classes refused every unlabelled request of 64 images, those of images no
    task claims too: the widest task's answer is now only the first bound; over it, the routed answer is measured."""
    from model_store.bank import empty_bank
    from tests.helpers import edit_bundle, over_broad, random_bundle
    from tests.service.conftest import AUTH

    def narrow(m: dict) -> None:  # a selector that claims no image
        m["selector"]["threshold"] = 1e-9
        m["selector"]["calibration"].update({k: 1e-9 for k in ("p50", "p90", "p95", "p99", "max", "neg_p01")})
        if m["selector"]["kind"] == "hybrid":
            m["selector"]["calibration"].update({"gate_threshold": 1e-9, "gate_max": 1e-9, "gate_neg_p01": 1e-9})

    names = tuple(f"class {i} " + "x" * 150 for i in range(10))  # about 2 KB of answer per image
    quiet = edit_bundle(random_bundle(empty_bank(backbone), "long", seed=4, classes=names), manifest=narrow)
    wide = over_broad(random_bundle(empty_bank(backbone), "long", seed=5, classes=names, version=2))
    async with running_app(tmp_path, backbone, limits=Limits(max_response_bytes=3000)) as c:
        up = await c.post("/tasks", files={"bundle": ("q.safetensors", quiet)}, headers=AUTH)
        assert up.status_code == 201, up.text
        r = await c.post("/classify", files=_classify_files(2))  # 2 x 2 KB if they went to 'long'; they do not
        assert r.status_code == 200, r.text
        assert [(x["labels"], x["route"]["task"]) for x in r.json()["results"]] == [([], None), ([], None)]

        up = await c.post("/tasks", files={"bundle": ("w.safetensors", wide)}, headers=AUTH)
        assert up.status_code == 201, up.text
        r = await c.post("/classify", files=_classify_files(2))  # the wide version takes both
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert "2 images, 2 of them routed to task 'long'" in err["message"], err
        assert err["details"] == {"setting": "max_response_bytes", "limit": 3000}
        r = await c.post("/classify", files=_classify_files(2), data={"top_k": "1"})
        assert r.status_code == 200 and len(r.content) <= 3000, r.text
        assert [x["route"]["task"] for x in r.json()["results"]] == ["long", "long"]


async def test_two_labels_naming_one_class_are_refused_before_any_work_whatever_the_route(tmp_path, backbone):
    """Routing reads `three_quarters` and `three quarters` as one class: a request naming both was a 422 when an
    image went to the task that has it and a 200 when images went to zero-shot (a reviewer's)."""
    async with running_app(tmp_path, backbone) as c:
        for labels in (["three_quarters", "three quarters", "half"], ["Cat", "cat"]):
            r = await c.post("/classify", files=_classify_files(1), data={"labels": labels})
            assert r.status_code == 422, r.text
        assert "name the same class" in r.json()["error"]["message"] or "same text" in r.json()["error"]["message"]
        assert c.app.state.service.batcher.batches == 0  # refused before any image was decoded or run


async def test_json_with_a_repeated_key_or_no_body_is_named_as_such(tmp_path, backbone):
    """A repeated key kept the last silently (labels x, y scored, not cat, dog); an empty body said "Expecting
    value: line 1 column 1"."""
    ok = base64.b64encode(colour("red")).decode()
    async with running_app(tmp_path, backbone) as c:
        body = '{"images": ["' + ok + '"], "labels": ["cat", "dog"], "labels": ["x", "y"]}'
        r = await c.post("/classify", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "the key 'labels' appears twice in one object" in r.text
        r = await c.post("/classify", content=b"", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["message"] == "the body is empty"
        files = [("images", ("red.png", colour("red")))]  # `-F labels=cat,dog` sends one label: named so
        r = await c.post("/classify", files=files, data={"labels": ["a red, round thing"]})
        assert r.status_code == 422 and "if it is one label, send it with at least one other" in r.text, r.text
        r = await c.post("/classify", files=files, data={"labels": ["a red, round thing", "a blue one"]})
        assert r.status_code == 200 and r.json()["results"][0]["labels"][0]["label"] == "a red, round thing", r.text


async def test_an_image_past_pillows_own_bound_is_named_in_our_words(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        big = png(Image.new("1", (16000, 16000)))  # 256 MP: Pillow's DecompressionBombError, before our check
        r = await c.post("/classify", files=[("images", ("big.png", big))], data={"labels": ["a", "b"]})
        assert r.status_code == 413, r.text
        message = r.json()["error"]["message"]
        assert "is 256000000 pixels; the limit is max_pixels=24000000" in message and "DOS" not in message


async def test_streamed_body_over_the_limit_without_content_length(tmp_path, backbone):
    async def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    async with running_app(tmp_path, backbone, limits=SMALL) as c:
        r = await c.post("/classify", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]


async def test_random_bytes_never_give_a_5xx(tmp_path, backbone):
    rng = __import__("random").Random(0)
    async with running_app(tmp_path, backbone) as c:
        for i in range(30):
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
            if i % 3 == 0:  # a real PNG signature with garbage after it
                blob = colour("red")[:16] + blob
            r = await c.post("/classify", files=[("images", ("f.png", blob))], data={"labels": LABELS})
            assert 400 <= r.status_code < 500, r.text
            assert r.json()["error"]["code"]


async def test_unknown_path_and_method_are_json_errors(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        r = await c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await c.get("/classify")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


async def test_concurrent_requests_share_batches(tmp_path, backbone):
    async with running_app(tmp_path, backbone, max_wait_ms=50) as c:
        batcher = c.app.state.service.batcher
        before = batcher.batches
        names = ["red", "green", "blue", "yellow"]
        rs = await asyncio.gather(
            *[c.post("/classify", files=[("images", ("i.png", colour(n)))], data={"labels": names}) for n in names * 4]
        )
        assert all(r.status_code == 200 for r in rs)
        assert [r.json()["results"][0]["labels"][0]["label"] for r in rs] == names * 4
        assert batcher.batches - before < len(rs)
        assert max(r.json()["timing"]["batch_requests"] for r in rs) > 1


async def test_a_bad_request_in_a_batch_does_not_fail_the_others(tmp_path, backbone):
    async with running_app(tmp_path, backbone, max_wait_ms=50) as c:
        good = c.post("/classify", files=_classify_files(), data={"labels": LABELS})
        bad = c.post("/classify", files=_classify_files(), data={"task": "zero-shot"})  # no labels
        rg, rb = await asyncio.gather(good, bad)
        assert rg.status_code == 200 and rb.status_code == 422


async def test_metrics_count_requests_batches_and_routes(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        await c.post("/classify", files=_classify_files(2), data={"labels": LABELS})
        text = (await c.get("/metrics")).text
        for needle in (
            'clipbank_requests_total{endpoint="/classify",method="POST",status="200"} 1.0',
            'clipbank_routes_total{task="zero-shot"} 2.0',
            "clipbank_zero_shot_fallback_total 2.0",
            "clipbank_auto_images_total 2.0",
            "clipbank_batch_images_sum 2.0",  # the warm-up is not a served batch
            "clipbank_bank_generation 0.0",
            "clipbank_bank_bytes 0.0",
            "clipbank_swap_seconds_count 1.0",
            # which backbone (an outside check found it on /readyz alone); running_app keeps PyTorch's passes
            f'clipbank_backbone_info{{arch="clipbank-tiny",fingerprint="{backbone.fingerprint[:12]}",'
            'pretrained="embedded",runtime="torch"} 1.0',
        ):
            assert needle in text, needle


async def test_images_are_converted_to_rgb(tmp_path, backbone):
    gray = png(Image.new("L", (40, 30), 200))
    rgba = png(Image.new("RGBA", (30, 40), (255, 0, 0, 128)))
    async with running_app(tmp_path, backbone) as c:
        files = [("images", ("g.png", gray)), ("images", ("a.png", rgba))]
        r = await c.post("/classify", files=files, data={"labels": LABELS})
        assert r.status_code == 200 and len(r.json()["results"]) == 2


async def test_queue_full_gets_503_overloaded(tmp_path, backbone):
    limits = Limits(max_images=2)
    async with running_app(tmp_path, backbone, limits=limits, max_batch=2, max_queue_images=2, max_wait_ms=1000) as c:
        rs = await asyncio.gather(
            *[c.post("/classify", files=_classify_files(), data={"labels": LABELS}) for _ in range(5)]
        )
        codes = sorted(r.status_code for r in rs)
        assert codes == [200, 200, 503, 503, 503], [r.text for r in rs]
        err = next(r.json()["error"] for r in rs if r.status_code == 503)
        assert err["code"] == "overloaded" and "max_queue_images=2" in err["message"]


def test_a_non_finite_score_is_answered_as_null_not_a_500():
    """JSON has no NaN: a score that overflowed is shown as null, the rest of the answer as it is."""
    import json

    from model_store.inference import ImageResult, Route
    from service.routes.classify import _json_bytes, response
    from service.steps import BatchInfo

    result = ImageResult([("a", float("nan")), ("b", 0.5)], Route("t", 1, "x" * 64, float("inf"), 1.0))
    body = json.loads(_json_bytes(response([result], BatchInfo(0.1, 1.0, 1, 1, 3), 0.5, 2.0)))
    assert body["results"][0]["labels"] == [{"label": "a", "score": None}, {"label": "b", "score": 0.5}]
    assert body["results"][0]["route"]["score"] is None and body["results"][0]["route"]["task"] == "t"


async def test_label_aware_routing_and_match_labels_in_both_forms(tmp_path, backbone):
    """A task that claims every image takes it for a label it knows; for labels it does not know the image goes
    to zero-shot, unless the request asks the selector alone (`match_labels`, a form field or a JSON boolean)."""
    from model_store.bank import empty_bank
    from tests.helpers import over_broad, random_bundle

    from .conftest import AUTH

    bundle = over_broad(random_bundle(empty_bank(backbone), "pets", seed=3, classes=("cat", "dog")))
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks", params={"force": "true"}, files={"bundle": ("p", bundle)}, headers=AUTH)
        assert r.status_code == 201, r.text

        async def routes(data: dict) -> list:
            r = await c.post("/classify", files=_classify_files(2), data=data)
            assert r.status_code == 200, r.text
            return [res["route"]["task"] for res in r.json()["results"]]

        assert await routes({"labels": ["Dog", "bird"]}) == ["pets", "pets"]
        assert await routes({"labels": ["car", "bird"]}) == [None, None]
        assert await routes({"labels": ["car", "bird"], "match_labels": "false"}) == ["pets", "pets"]
        metrics = (await c.get("/metrics")).text  # only the two images sent with car and bird were moved
        assert "clipbank_label_routing_moved_total 2.0" in metrics, metrics
        image = base64.b64encode(colour("red")).decode()
        r = await c.post("/classify", json={"images": [image], "labels": ["car", "bird"], "match_labels": False})
        assert r.status_code == 200 and r.json()["results"][0]["route"]["task"] == "pets", r.text
        r = await c.post("/classify", files=_classify_files(), data={"labels": LABELS, "match_labels": "maybe"})
        assert r.status_code == 422 and "match_labels" in r.text, r.text
        schema = (await c.get("/openapi.json")).json()["paths"]["/classify"]["post"]["requestBody"]["content"]
        assert schema["multipart/form-data"]["schema"]["properties"]["match_labels"]["default"] is True


async def test_every_option_field_beside_the_most_labels_is_accepted(tmp_path, backbone):
    """The form's field limit counts each option field (task, route, top_k, match_labels) beside max_labels."""
    data = {"labels": [f"l{i}" for i in range(SMALL.max_labels)], "task": "auto", "route": "per-image"}
    async with running_app(tmp_path, backbone, limits=SMALL) as c:
        r = await c.post("/classify", files=_classify_files(), data={**data, "top_k": "1", "match_labels": "false"})
        assert r.status_code == 200, r.text
