"""The management API in process: auth, uploads and their failures, hot-swap, rollback, shared stores, readiness."""

from __future__ import annotations

import asyncio
import json
import re

import anyio
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks.samples import domain_pngs
from model_store.bank import empty_bank
from model_store.bundle import MANIFEST_KEY
from service.config import Limits
from tests.helpers import random_bundle, with_version
from tests.service.conftest import AUTH, TOKEN, failed_app, running_app
from tests.service.images import colour
from training.data import load_domain

pytestmark = pytest.mark.anyio


def _upload(data: bytes, name: str = "b.safetensors") -> dict:
    return {"files": {"bundle": (name, data, "application/octet-stream")}, "headers": AUTH}


def _test_images(domain: str, n: int) -> list[tuple[str, tuple[str, bytes]]]:
    return [("images", (f"{domain}{i}.png", data)) for i, data in enumerate(domain_pngs(domain, n))]


MANAGEMENT = [
    ("POST", "/tasks", {"files": {"bundle": ("b", b"x")}}),
    ("GET", "/tasks", {}),
    ("GET", "/tasks/textures", {}),
    ("POST", "/tasks/textures/activate", {"json": {"version": 1}}),
    ("DELETE", "/tasks/textures", {}),
]


async def test_management_needs_the_admin_token(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        for method, path, kwargs in MANAGEMENT:
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
                r = await c.request(method, path, headers=headers, **kwargs)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
        message = (await c.get("/tasks")).json()["error"]["message"]  # and where a user finds the token
        assert (
            "(CLIPBANK_ADMIN_TOKEN (or CLIPBANK_ADMIN_TOKEN_FILE) or --token for the clipbank commands; a server"
            in message
        )
        r = await c.get("/tasks", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"generation": 0, "tasks": []}


async def test_classify_token_when_configured(tmp_path, backbone):
    async with running_app(tmp_path, backbone, classify_token="reader-token-0123456789") as c:
        files = [("images", ("r.png", colour("red")))]
        assert (await c.post("/classify", files=files, data={"labels": ["red"]})).status_code == 401
        for token in ("reader-token-0123456789", TOKEN):  # the admin token also reads
            r = await c.post(
                "/classify", files=files, data={"labels": ["red"]}, headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 200


async def test_generated_token_is_required_printed_once_and_kept_across_restarts(
    tmp_path, backbone, capsys, monkeypatch
):
    import stat
    import sys

    import httpx

    from service import admin_token
    from service.app import create_app
    from service.config import ServeConfig

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # printed on a terminal only
    monkeypatch.setattr(admin_token, "CONTAINER_MARKS", ())  # ... outside a container, which this suite may be in
    monkeypatch.delenv("container", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    tokens = []
    for _ in range(2):  # a restart on the same store keeps the token its clients have
        app = create_app(ServeConfig(store=str(tmp_path / "s"), frozen_runtime="torch"), backbone=backbone)
        async with app.router.lifespan_context(app):
            with anyio.fail_after(60):
                await app.state.service.ready.wait()
            token = app.state.service.admin_token
            tokens.append(token)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                assert (await c.get("/tasks")).status_code == 401
                assert (await c.get("/tasks", headers={"Authorization": f"Bearer {token}"})).status_code == 200
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 16
    err = capsys.readouterr().err
    assert err.count(tokens[0]) == 1 and "read from" in err
    saved = tmp_path / "s" / ".admin-token"
    assert saved.read_text().strip() == tokens[0] and stat.S_IMODE(saved.stat().st_mode) == 0o600


async def test_upload_routes_pins_rolls_back_and_deletes(tmp_path, backbone, bundles):
    textures = bundles["textures"]
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks", **_upload(textures))
        assert r.status_code == 201, r.text
        up = r.json()
        assert up["task"] == "textures" and up["version"] == 1 and up["experts_added"] > 0 and up["generation"] == 1

        r = await c.post("/classify", files=_test_images("textures", 12))
        routes = [res["route"] for res in r.json()["results"]]
        assert sum(rt["task"] == "textures" for rt in routes) >= 8, routes  # routing quality: tests/training
        assert all(rt["bundle_id"] == up["bundle_id"] for rt in routes if rt["task"])
        selectors_alone = {"labels": ["red", "blue"], "match_labels": "false"}  # textures knows neither label
        r = await c.post("/classify", files=_test_images("shapes", 12), data=selectors_alone)
        assert sum(res["route"]["task"] is None for res in r.json()["results"]) >= 10

        r = await c.post("/classify", files=_test_images("shapes", 2), data={"task": "textures"})
        assert all(res["route"]["task"] == "textures" for res in r.json()["results"])
        assert all(res["labels"][0]["label"] in load_domain("textures", "test").classes for res in r.json()["results"])

        r = await c.post("/tasks", **_upload(with_version(textures, 2)))
        assert r.status_code == 201 and r.json()["version"] == 2
        got = await c.get("/tasks/textures", headers=AUTH)
        info = got.json()
        assert info["active_version"] == 2 and [v["version"] for v in info["versions"]] == [1, 2]
        assert info["generation"] == int(got.headers["X-Clipbank-Generation"]) == 2  # was null: min_generation=None
        assert info["serving"] and info["classes"] and info["bytes"] > 0

        r = await c.post("/tasks/textures/activate", json={"version": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json()["active_version"] == 1
        r = await c.post("/classify", files=_test_images("textures", 4))
        assert {res["route"]["version"] for res in r.json()["results"] if res["route"]["task"]} == {1}

        r = await c.delete("/tasks/textures", headers=AUTH)
        assert r.status_code == 200 and r.json()["purged_blobs"] == 0
        r = await c.post("/classify", files=_test_images("textures", 4), data={"labels": ["a", "b"]})
        assert all(res["route"]["task"] is None for res in r.json()["results"])
        info = (await c.get("/tasks/textures", headers=AUTH)).json()
        assert info["active_version"] is None and not info["serving"]

        r = await c.delete("/tasks/textures", params={"purge": "true"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["purged_blobs"] == 2
        assert (await c.get("/tasks/textures", headers=AUTH)).status_code == 404


async def test_a_purge_names_the_versions_it_keeps_for_the_tasks_that_use_their_experts(tmp_path, backbone, bundles):
    """A purge of a task whose experts another task uses deleted nothing and said only `purged_blobs: 0`."""
    async with running_app(tmp_path, backbone) as c:
        for task in ("textures", "glyphs"):  # glyphs' routers choose among textures' experts too
            r = await c.post("/tasks", **_upload(bundles[task]), params={"force": "true"})
            assert r.status_code == 201, r.text
        before = (await c.get("/tasks", headers=AUTH)).json()["generation"]
        r = await c.delete("/tasks/textures", params={"purge": "true"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["purged_blobs"] == 0 and r.json()["kept"] == {"1": ["glyphs"]}
        assert r.json()["was_active"] and r.json()["generation"] == before + 1  # deactivated and purged at once
        assert [v["version"] for v in (await c.get("/tasks/textures", headers=AUTH)).json()["versions"]] == [1]
        r = await c.delete("/tasks/glyphs", params={"purge": "true"}, headers=AUTH)
        assert r.json()["purged_blobs"] == 1 and r.json()["kept"] == {} and r.json()["generation"] == before + 2
        r = await c.delete("/tasks/textures", params={"purge": "true"}, headers=AUTH)
        assert r.json()["purged_blobs"] == 1 and r.json()["kept"] == {}
        assert (await c.get("/tasks/textures", headers=AUTH)).status_code == 404


def _forged(data: bytes, edit) -> bytes:
    tensors = st_load(data)
    from tests.model_store.test_bundle import _metadata

    meta = json.loads(_metadata(data)[MANIFEST_KEY])
    edit(tensors, meta)
    return st_save(tensors, metadata={MANIFEST_KEY: json.dumps(meta)})


def _bad_bundles(backbone) -> list[tuple[str, bytes, int, str]]:
    good = random_bundle(empty_bank(backbone), "colours", seed=3)
    first = next(k for k in st_load(good) if k.startswith("expert."))
    return [
        ("garbage", b"not a bundle at all", 422, "bundle_not_safetensors"),
        ("pickle", b"\x80\x04\x95" + b"\x00" * 40, 422, "bundle_not_safetensors"),
        ("torch zip", b"PK\x03\x04" + b"\x00" * 40, 422, "bundle_not_safetensors"),
        ("tampered", _forged(good, lambda t, m: t[first].add_(1)), 422, "bundle_tampered"),
        (
            "other backbone",
            _forged(good, lambda t, m: m["backbone"].update(fingerprint="0" * 64)),
            422,
            "backbone_mismatch",
        ),
        ("bad schema", _forged(good, lambda t, m: m.pop("classes")), 422, "bundle_invalid"),
    ]


async def test_bad_uploads_leave_store_and_serving_untouched(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone, limits=Limits(max_upload_bytes=2_000_000)) as c:
        assert (await c.post("/tasks", **_upload(bundles["textures"]))).status_code == 201
        before = (await c.get("/tasks", headers=AUTH)).json()
        cases = _bad_bundles(backbone) + [
            ("version conflict", bundles["textures"], 409, "version_conflict"),
            ("too large", b"\x00" * 2_000_001, 413, "limit_exceeded"),
        ]
        for what, data, status, code in cases:
            r = await c.post("/tasks", **_upload(data))
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (what, r.text)
        r = await c.post("/tasks", content=b"abc", headers={**AUTH, "Content-Type": "application/octet-stream"})
        assert r.status_code == 415
        r = await c.post("/tasks", files={"x": (None, "1")}, headers=AUTH)  # no file at all: not a format problem
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request") and "'bundle'" in r.text
        r = await c.post("/tasks", files={"other": ("b", b"x")}, headers=AUTH)
        assert r.status_code == 422 and "'bundle'" in r.json()["error"]["message"]
        # no filename (RFC 7578 makes it optional): read as the bundle it is, and this one is cut short
        r = await c.post("/tasks", files={"bundle": (None, bundles["textures"][:2000])}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["code"].startswith("bundle_"), r.text
        assert (await c.get("/tasks", headers=AUTH)).json() == before
        assert c.app.state.service.registry.bank.generation == before["generation"]


async def test_incompatible_bundle_is_refused_before_the_store_is_written(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks", **_upload(bundles["glyphs"]))  # uses textures' experts, not stored here
        assert r.status_code == 422 and r.json()["error"]["code"] == "missing_expert"
        message = r.json()["error"]["message"]  # it named "an active task", and there was none: the upload it is
        assert message.startswith("task 'glyphs' v1 uses expert ") and "store their bundles first" in message
        assert (await c.get("/tasks", headers=AUTH)).json()["tasks"] == []
        assert (await c.post("/tasks", **_upload(bundles["textures"]))).status_code == 201
        assert (await c.post("/tasks", **_upload(bundles["glyphs"]))).status_code == 201
        ready = (await c.get("/readyz")).json()
        assert ready["tasks"] == ["glyphs", "textures"] and ready["generation"] == 2


async def test_a_bundle_the_store_refuses_is_refused_before_the_gate_and_no_override_is_counted(
    tmp_path, backbone, bundles
):
    """An outside check: a copy of a task's bundle under another name, one class named with an escape, got the
    gate's 409 `interference`, and with force=true the 422 `bundle_invalid` after a logged and counted override."""
    bad = _forged(bundles["textures"], lambda t, m: m.update(task="copy", classes=["a\x1b", *m["classes"][1:]]))
    async with running_app(tmp_path, backbone) as c:
        assert (await c.post("/tasks", **_upload(bundles["textures"]))).status_code == 201
        for force in ("false", "true"):
            r = await c.post(f"/tasks?force={force}", **_upload(bad))
            assert (r.status_code, r.json()["error"]["code"]) == (422, "bundle_invalid"), r.text
            assert "has a control character (U+001B)" in r.json()["error"]["message"]
        metrics = (await c.get("/metrics")).text
        assert "clipbank_gate_overrides_total 0.0" in metrics and "clipbank_gate_refusals_total 0.0" in metrics
        assert (await c.get("/readyz")).json()["tasks"] == ["textures"]  # nothing else was stored


async def test_a_new_version_whose_parent_was_purged_names_it(tmp_path, backbone, bundles):
    """An outside check: v3 of a task, trained with --store on v2, uploaded after the task was purged, was told it
    was "trained on top of tasks this store does not hold"; it continues its own task's v2."""
    parent = "ab" * 32
    orphan = _forged(bundles["glyphs"], lambda t, m: m.update(parent=parent))
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks", **_upload(orphan))
        assert (r.status_code, r.json()["error"]["code"]) == (422, "missing_expert"), r.text
        said = r.json()["error"]["message"]
        assert f"it continues bundle {parent[:12]} (an earlier version of 'glyphs'" in said
        assert "store that version and the tasks it was trained on first" in said  # the expert may be theirs


async def test_management_errors(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as c:
        await c.post("/tasks", **_upload(bundles["textures"]))
        cases = [
            ("POST", "/tasks/textures/activate", {"json": {"version": 7}}, 404, "version_not_found"),
            ("POST", "/tasks/nope/activate", {"json": {"version": 1}}, 404, "task_not_found"),
            ("POST", "/tasks/textures/activate", {"json": {"version": "x"}}, 422, "invalid_request"),
            ("POST", "/tasks/textures/activate", {"json": {}}, 422, "invalid_request"),
            ("GET", "/tasks/nope", {}, 404, "task_not_found"),
            ("DELETE", "/tasks/nope", {}, 404, "task_not_found"),
        ]
        for method, path, kwargs, status, code in cases:
            r = await c.request(method, path, headers=AUTH, **kwargs)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (method, path, r.text)


async def test_a_query_parameter_a_route_does_not_take_is_refused_before_anything_changes(tmp_path, backbone, bundles):
    """Ignored, these typos changed serving with a success status: the upload went live, the task went out."""
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks?mod=inactive", **_upload(bundles["textures"]))
        assert r.status_code == 422 and "takes no query parameter 'mod'; it takes activate, force, mode, wait" in r.text
        assert (await c.get("/tasks", headers=AUTH)).json()["tasks"] == []  # nothing was stored
        assert (await c.post("/tasks?mode=inactive", **_upload(bundles["textures"]))).status_code == 201
        r = await c.post("/tasks/textures/activate?force=false", json={"version": 1}, headers=AUTH)
        generation = r.json()["replicas"]
        again = await c.post("/tasks/textures/activate", json={"version": 1}, headers=AUTH)
        assert again.is_success and again.json()["replicas"] == generation  # the active one: nothing written
        r = await c.delete("/tasks/textures?version=1", headers=AUTH)
        assert r.status_code == 422 and "it takes purge, wait" in r.text
        assert (await c.get("/tasks/textures", headers=AUTH)).json()["active_version"] == 1  # still routed to
        r = await c.post("/classify?task=textures", files=[("images", ("r.png", colour("red")))])
        assert r.status_code == 422 and "POST /classify takes no query parameter 'task'" in r.text
        assert (await c.post("/tasks?mod=x", files={"bundle": ("b", b"")})).status_code == 401  # the token first


async def test_options_sent_in_the_body_instead_of_the_query_are_refused_before_anything_changes(
    tmp_path, backbone, bundles
):
    """An outside check's curl `-F mode=shadow` got a 201 and a live version; `-d '{"purge": true}'` on DELETE
    only deactivated. Both bodies were ignored."""
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks", data={"mode": "shadow"}, **_upload(bundles["textures"]))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        assert "no text fields (got 'mode')" in r.text and "POST /tasks?mode=shadow" in r.text
        assert (await c.get("/tasks", headers=AUTH)).json()["tasks"] == []  # nothing was stored
        assert (await c.post("/tasks", **_upload(bundles["textures"]))).status_code == 201
        r = await c.request("DELETE", "/tasks/textures", json={"purge": True}, headers=AUTH)
        assert r.status_code == 422 and "DELETE /tasks/textures takes no body" in r.text and "purge, wait" in r.text
        assert (await c.get("/tasks/textures", headers=AUTH)).json()["active_version"] == 1  # still routed to
        r = await c.request("DELETE", "/tasks/textures", json={"purge": True})
        assert r.status_code == 401  # the token first
        assert (await c.delete("/tasks/textures?purge=true", headers=AUTH)).status_code == 200


async def test_concurrent_uploads_of_one_version_are_serialised(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as c:
        v1 = bundles["textures"]
        rs = await asyncio.gather(*[c.post("/tasks", **_upload(v1)) for _ in range(4)])
        assert sorted(r.status_code for r in rs) == [201, 409, 409, 409]
        info = (await c.get("/tasks/textures", headers=AUTH)).json()
        assert [v["version"] for v in info["versions"]] == [1]


async def test_in_flight_batch_finishes_on_its_snapshot(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as c:
        registry = c.app.state.service.registry
        old = registry.bank
        await c.post("/tasks", **_upload(bundles["textures"]))
        assert registry.bank is not old and old.tasks == ()  # the old snapshot is untouched and still usable
        from model_store.inference import ClassifyItem, classify_batch

        x = __import__("torch").zeros(1, 3, backbone.image_size, backbone.image_size)
        (res,) = classify_batch(old, [ClassifyItem(x, ("a", "b"))])
        assert res[0].route.task is None


async def test_servers_sharing_a_store_pick_up_changes_within_5_seconds(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as a, running_app(tmp_path, backbone) as b:  # default poll: 2 s
        assert (await a.post("/tasks", **_upload(bundles["textures"]))).status_code == 201
        with anyio.fail_after(5):
            while (await b.get("/readyz")).json()["tasks"] != ["textures"]:
                await anyio.sleep(0.05)
        assert (await a.delete("/tasks/textures", headers=AUTH)).status_code == 200
        with anyio.fail_after(5):
            while (await b.get("/readyz")).json()["tasks"] != []:
                await anyio.sleep(0.05)


async def test_not_ready_until_loaded_and_failed_start_is_reported(tmp_path, caplog):
    from service.config import ServeConfig

    config = ServeConfig(store=str(tmp_path / "s"), backbone="no-such-arch:none", admin_token=TOKEN)
    async with failed_app(config) as (c, failures):
        r = await c.get("/readyz")
        assert r.status_code == 503 and "no-such-arch" in r.json()["error"]["message"]
        assert "start-up failed: backbone_error: " in r.json()["error"]["message"]
        assert not [r for r in caplog.records if r.exc_info]  # a known error is one line, not a traceback
        assert (await c.get("/healthz")).json()["status"] == "failed"
        r = await c.post("/classify", files=[("images", ("r.png", colour("red")))], data={"labels": ["red"]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert failures and "no-such-arch" in failures[0]


async def test_openapi_documents_every_endpoint_with_examples(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        spec = (await c.get("/openapi.json")).json()
        assert set(spec["paths"]) >= {
            "/classify",
            "/tasks",
            "/tasks/{task}",
            "/tasks/{task}/activate",
            "/healthz",
            "/readyz",
            "/metrics",
        }
        body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
        assert set(body) == {"multipart/form-data", "application/json"}
        # an integrator's generated client: labels as one part each, and the JSON form's limits as the form's
        assert body["multipart/form-data"]["encoding"]["labels"] == {
            "style": "form",
            "explode": True,
            "contentType": "text/plain",
        }
        form, json_form = (body[k]["schema"]["properties"] for k in ("multipart/form-data", "application/json"))
        for field, key in (("labels", "maxItems"), ("images", "maxItems")):
            assert json_form[field][key] == form[field][key], field
        assert json_form["labels"]["items"]["maxLength"] == form["labels"]["items"]["maxLength"] > 0
        assert "examples" in json.dumps(spec["components"]["schemas"]["ClassifyResponse"])
        assert "413" in spec["paths"]["/classify"]["post"]["responses"]
        assert spec["paths"]["/tasks"]["post"]["security"]
        assert {"200", "201", "504"} <= set(spec["paths"]["/tasks"]["post"]["responses"])  # restored; ?wait=all
        for path, method in (("/tasks/{task}/activate", "post"), ("/tasks/{task}", "delete")):
            assert "504" in spec["paths"][path][method]["responses"], path
        for page in ("/docs", "/redoc"):  # from this server: a host without internet saw blank pages (a CDN)
            r = await c.get(page)
            assert r.status_code == 200 and "https://" not in r.text and "http://" not in r.text, r.text
            for asset in re.findall(r'(?:src|href)="(/[^"]+)"', r.text):
                assert (await c.get(asset)).status_code == 200, asset
        _examples_fit_their_schemas(spec)
        # what any path may answer (malformed HTTP, overload) was undeclared on /healthz, /readyz and /metrics
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                assert {"400", "503"} <= set(op["responses"]), (method, path)
                # the headers a client branches on, declared (a Node integrator's)
                assert {"Retry-After", "X-Clipbank-Error"} <= op["responses"]["503"]["headers"].keys(), path
                if "401" in op["responses"]:
                    assert "WWW-Authenticate" in op["responses"]["401"]["headers"], path
                # a GET reads no body and changes nothing: it declared 409 and 415 (an integrator's)
                assert method != "get" or not {"409", "415"} & set(op["responses"]), (method, path)
                assert ("415" in op["responses"]) == ("requestBody" in op), (method, path)
        assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def _examples_fit_their_schemas(spec: dict) -> None:
    """A zero-shot route's example was `{}` (FastAPI drops nulls from the document), which its own schema refuses:
    a client generated from the document would have rejected the server's answers."""
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:spec", resource)
    checked = 0
    for name, schema in spec["components"]["schemas"].items():
        for example in schema.get("examples", []):
            ref = {"$ref": f"urn:spec#/components/schemas/{name}"}
            jsonschema.Draft202012Validator(ref, registry=registry).validate(example)
            checked += 1
    assert checked >= 2  # ClassifyResponse and TaskInfo


async def test_upload_without_activation_is_still_checked(tmp_path, backbone):
    good = random_bundle(empty_bank(backbone), "colours", seed=3)
    other = _forged(good, lambda t, m: m["backbone"].update(fingerprint="0" * 64))
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks", params={"activate": "false"}, **_upload(other))
        assert r.status_code == 422 and r.json()["error"]["code"] == "backbone_mismatch"
        r = await c.post("/tasks", params={"activate": "false"}, **_upload(good))
        assert r.status_code == 201
        info = (await c.get("/tasks/colours", headers=AUTH)).json()
        assert info["active_version"] is None and not info["serving"] and info["classes"] == []
        assert info["versions"][0]["classes"] == ["red", "blue", "green"]
        r = await c.post("/tasks/colours/activate", json={"version": True}, headers=AUTH)
        assert r.status_code == 422 and "got the boolean true" in r.text  # a boolean is not a version
        r = await c.post("/tasks/colours/activate", json={"version": "2"}, headers=AUTH)  # "a whole number" before
        assert r.status_code == 422 and 'version must be a JSON integer such as 2, got the string \\"2\\"' in r.text

        async def big():
            for _ in range(20):
                yield b" " * 100_000

        r = await c.post("/tasks/colours/activate", content=big(), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "limit_exceeded"


def test_trial_run_refuses_a_task_that_cannot_answer(backbone):
    import dataclasses

    from model_store.bank import build_bank
    from model_store.bundle import read_bundle
    from model_store.errors import BundleInvalid
    from service.registry import trial_run

    bank = build_bank(backbone, [read_bundle(random_bundle(empty_bank(backbone), "colours", seed=3))])
    trial_run(bank, ["colours"])
    broken = dataclasses.replace(bank.tasks[0], templates=("a {} of {}",))
    with pytest.raises(BundleInvalid, match="trial classification"):
        trial_run(dataclasses.replace(bank, tasks=(broken,)), ["colours"])
    # finite weights that overflow: scores of NaN, which the answer's JSON cannot carry (a 500 on every request)
    huge = build_bank(backbone, [read_bundle(random_bundle(empty_bank(backbone), "colours", seed=3, up_scale=1e30))])
    with pytest.raises(BundleInvalid, match="non-finite scores"):
        trial_run(huge, ["colours"])


class _Peers:
    """Other replicas as a Ray deployment's would answer `sync`: one keeps up, `slow` stays a generation behind."""

    def __init__(self) -> None:
        self.lagging = True

    async def announce(self, generation: int, timeout_s: float) -> dict:
        return {"fast": generation, "slow": generation - 1 if self.lagging else generation}


async def test_every_change_can_wait_for_every_replica(tmp_path, backbone):
    """wait=all on an upload, an activation (rollback), a shadow change and a deactivation: 504 replicas_lagging
    naming the replica behind (the change stored either way); the same once it keeps up, 200/201 listing both."""
    bank = empty_bank(backbone)
    async with running_app(tmp_path, backbone) as c:
        peers = c.app.state.service.peers = _Peers()
        v1, v2 = random_bundle(bank, "cars", seed=1), with_version(random_bundle(bank, "cars", seed=2), 2)
        changes = [
            ("POST", "/tasks", _upload(v1)),
            ("POST", "/tasks", {**_upload(v2), "params": {"mode": "inactive"}}),
            ("POST", "/tasks/cars/shadow", {"json": {"version": 2}, "headers": AUTH}),
            ("DELETE", "/tasks/cars/shadow", {"headers": AUTH}),
            ("POST", "/tasks/cars/activate", {"json": {"version": 2}, "headers": AUTH}),
            ("DELETE", "/tasks/cars", {"headers": AUTH}),
        ]
        generations = []
        for method, path, kwargs in changes:
            r = await c.request(method, path, **{**kwargs, "params": {**kwargs.get("params", {}), "wait": "all"}})
            assert r.status_code == 504, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "replicas_lagging" and error["message"].endswith("in time: slow"), error
            generations.append(error["details"]["generation"])
        assert generations == list(range(1, len(changes) + 1))  # each one was stored all the same
        peers.lagging = False
        again = await c.post("/tasks/cars/activate", params={"wait": "all"}, json={"version": 1}, headers=AUTH)
        assert again.status_code == 200 and again.json()["replicas"] == {"fast": 7, "slow": 7}, again.text
        quick = await c.delete("/tasks/cars", headers=AUTH)  # wait=none: the others are told, not waited for
        assert quick.status_code == 200 and list(quick.json()["replicas"]) == [c.app.state.service.replica]


async def test_a_replica_on_a_replaced_store_is_not_counted_as_serving_a_change(tmp_path, backbone):
    """An outside check's: replicas that had read a store wiped and made again kept their generation (21, above
    the new store's 1), so `sync` answered 21 without reading the store and wait=all counted them as serving the
    new store's change. Now `sync` always reads the store (the review's: the new store may be at the very
    generation the replica serves) and reports the error; the announcement names that replica as behind."""
    import shutil

    from model_store.store import LocalStore
    from service import ray_engine

    bank = empty_bank(backbone)
    async with running_app(tmp_path, backbone) as c:
        for seed, task in enumerate(("cars", "birds", "ships")):
            assert (await c.post("/tasks", **_upload(random_bundle(bank, task, seed=seed)))).status_code == 201
        service = c.app.state.service
        assert service.registry.bank.generation == 3
        shutil.rmtree(tmp_path / "store")
        other = LocalStore(tmp_path / "store")  # another server's new store, by chance at the same generation
        for seed, task in enumerate(("trees", "cats", "dogs")):
            other.put(random_bundle(bank, task, seed=7 + seed))
        ray_engine.LOCAL["service"] = service
        try:
            answer = await ray_engine.ClipbankReplica().sync(3)
        finally:
            ray_engine.LOCAL.clear()
        assert answer["generation"] == 3 and "replaced under this process" in answer["store_error"], answer
        replicas = ray_engine.reported([answer, {"replica": "fresh", "generation": 3, "pid": 1}, TimeoutError("x")])
        assert replicas["fresh"] == 3 and replicas["replica-2"] == "TimeoutError: x"
        assert replicas[service.replica].startswith("store error at generation 3: the store was replaced"), replicas


async def test_an_upload_says_which_classes_of_the_version_it_replaces_it_lacks(tmp_path, backbone):
    """An outside check from Python: a v3 trained on the 2 new classes only replaced a v2 of 6 classes, the 4 old
    ones fell to 0%, and `ClipbankClient.push` (any HTTP client) was told nothing: only the CLI compared."""
    bank = empty_bank(backbone)
    v1 = random_bundle(bank, "greek", seed=1, classes=("alpha", "beta", "gamma"))
    v2 = random_bundle(bank, "greek", seed=2, version=2, classes=("alpha", "delta"))
    async with running_app(tmp_path, backbone) as c:
        first = (await c.post("/tasks", **_upload(v1))).json()
        assert first["warnings"] == []  # nothing replaced
        r = await c.post("/tasks?mode=shadow", **_upload(v2))
        assert r.status_code == 201 and len(r.json()["warnings"]) == 1, r.text
        assert r.json()["warnings"][0].startswith("task greek v2 would replace v1 and lacks 2 of its 3 classes (beta")
        r = await c.post("/tasks/greek/activate", json={"version": 2}, headers=AUTH)
        assert r.status_code == 200  # an activation says it too (it said nothing to an HTTP client before)
        said = [w[:62] for w in r.json()["warnings"]]
        assert said == ["task greek v2 replaces v1 and lacks 2 of its 3 classes (beta, "]
        back = await c.post("/tasks/greek/activate", json={"version": 1}, headers=AUTH)  # a rollback to before delta
        assert back.status_code == 200 and len(back.json()["warnings"]) == 1, back.text
        assert back.json()["warnings"][0].endswith("v1 is older than v2: it was trained before those classes")
        same = await c.post("/tasks/greek/activate", json={"version": 1}, headers=AUTH)  # active already
        assert same.status_code == 200 and same.json()["warnings"] == [], same.text
        assert (await c.post("/tasks/greek/activate", json={"version": 2}, headers=AUTH)).status_code == 200
        again = await c.post("/tasks", **_upload(with_version(v1, 3)))  # v1's classes again, as v3: not v2's delta
        assert again.status_code == 201, again.text
        assert [w[:62] for w in again.json()["warnings"]] == [
            "task greek v3 replaces v2 and lacks 1 of its 2 classes (delta)"
        ]
        # another writer of the store (another server, `clipbank store`) made v4 active, and this server has not
        # polled yet: the upload is compared with the store's active version, not with what this server serves
        from model_store.store import LocalStore

        LocalStore(tmp_path / "store").put(with_version(v2, 4))  # alpha and delta again
        r = await c.post("/tasks", **_upload(with_version(v1, 5)))
        assert [w[:62] for w in r.json()["warnings"]] == [
            "task greek v5 replaces v4 and lacks 1 of its 2 classes (delta)"
        ]
