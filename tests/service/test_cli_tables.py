"""`clipbank tasks` (a server's tasks) and `clipbank store list` (a store's) as tables, from the real API's answer.

`store list` printed the raw index (every expert id, the gate's report: 60 lines a version), and no command showed
a server's tasks: a user had to curl GET /tasks with the token."""

from __future__ import annotations

import json

import httpx
import pytest

from clipbank.cli import main
from model_store.bank import empty_bank
from tests.helpers import client_on as _client_on
from tests.helpers import random_bundle
from tests.service.conftest import AUTH, TOKEN, running_app

pytestmark = pytest.mark.anyio


def _rows(out: str) -> list[list[str]]:
    """The table's rows, cells split at runs of 2+ spaces (a state like "active (…)" has single spaces)."""
    import re

    lines = out.splitlines()
    assert lines[1].split() == ["TASK", "VERSION", "STATE", "CLASSES", "SIZE", "TRAINED", "VAL", "ACC", "ZERO-SHOT"]
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]


async def test_tasks_and_store_list_print_one_row_per_version(tmp_path, backbone, monkeypatch, capsys):
    bank = empty_bank(backbone)
    async with running_app(tmp_path, backbone) as c:
        for task, version, mode in (("cars", 1, "active"), ("cars", 2, "shadow"), ("boats", 1, "inactive")):
            data = random_bundle(bank, task, seed=version, version=version, classes=("red", "blue"))
            r = await c.post("/tasks", params={"mode": mode}, files={"bundle": ("b", data)}, headers=AUTH)
            assert r.status_code in (200, 201) and r.json()["state"] == mode, r.text  # where it landed, said
        listing = (await c.get("/tasks", headers=AUTH)).json()
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        return httpx.Response(200, json=listing)

    _client_on(monkeypatch, handler)
    assert main(["tasks", "--url", "http://srv", "--token", TOKEN]) == 0
    assert seen == [("/tasks", f"Bearer {TOKEN}")]
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"server http://srv: generation {listing['generation']}, 2 task(s), 3 version(s)"
    rows = _rows(out)
    assert [r[:4] for r in rows] == [
        ["boats", "1", "-", "2"],  # stored, not routed to
        ["cars", "1", "active", "2"],
        ["cars", "2", "shadow", "2"],
    ]
    assert all(r[4].endswith("KiB") or r[4].endswith("MiB") for r in rows)
    assert main(["tasks", "--url", "http://srv", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == listing

    store = str(tmp_path / "store")
    assert main(["store", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"store {store}: generation {listing['generation']}, 2 task(s), 3 version(s)"
    assert _rows(out) == rows  # the same table from the index as from the server that serves it
    assert main(["store", "list", "--store", store, "--json"]) == 0
    index = json.loads(capsys.readouterr().out)
    assert index["generation"] == listing["generation"] and set(index["tasks"]) == {"boats", "cars"}


def test_a_server_that_does_not_serve_the_active_version_says_what_it_serves(capsys):
    from clipbank.tables import print_tasks

    version = {"version": 2, "bytes": 3 * 2**20, "classes": ["a"], "metrics": {"val_accuracy": 0.9125}}
    behind = {"task": "cars", "active_version": 2, "serving": False, "serving_version": 1, "versions": [version]}
    why = "store_damaged: blob 4be62ecd4936 does not hash to its name: the store is damaged"
    damaged = {**behind, "task": "vans", "serving_version": None, "degraded": why}
    print_tasks(7, [behind, damaged], "server x")
    out = capsys.readouterr().out
    rows = _rows(out.rsplit("\n", 2)[0])
    assert rows[0][2] == "active (this server still serves v1)" and rows[1][2] == "active (not served: store_damaged)"
    assert out.splitlines()[-1] == f"vans is not served: {why}"  # the whole reason, below the table
    assert rows[0][4:] == ["3.0 MiB", "-", "91.2%", "-"]
    shadowed = {**behind, "task": "bikes", "serving": True, "shadow_version": 2, "shadow_degraded": why}
    print_tasks(8, [shadowed], "server x")
    out = capsys.readouterr().out
    assert _rows(out.rsplit("\n", 2)[0])[0][2] == "active, shadow (not scored: store_damaged)"
    assert out.splitlines()[-1] == f"the version of bikes in shadow is not scored: {why}"
    print_tasks(3, [], "store s")
    assert capsys.readouterr().out == "store s: no task stored (generation 3)\n"


def test_a_validation_accuracy_measured_on_some_classes_says_on_how_many(tmp_path, capsys, backbone):
    """An outside check: a new version trained on 2 new classes of 10 showed VAL ACC 100.0%, measured on those 2."""
    from clipbank.tables import print_tasks
    from model_store.bank import empty_bank
    from model_store.store import LocalStore
    from tests.helpers import edit_bundle, random_bundle

    def measured_on_two(m: dict) -> None:
        classes = m["classes"]
        m["training"] = {"val_accuracy": 1.0, "val_accuracy_per_class": {c: None for c in classes}}
        m["training"]["val_accuracy_per_class"].update({classes[0]: 1.0, classes[1]: 1.0})

    store = LocalStore(tmp_path / "s")
    store.put(edit_bundle(random_bundle(empty_bank(backbone), "cars", seed=1), manifest=measured_on_two))
    (v,) = store.task("cars").versions
    assert v.metrics["val_classes"] == 2 and len(v.classes) > 2
    version = {"version": 1, "bytes": 2**20, "classes": list(v.classes), "metrics": dict(v.metrics)}
    print_tasks(1, [{"task": "cars", "active_version": 1, "versions": [version]}], "store s")
    assert f"100.0% (2/{len(v.classes)} classes)" in capsys.readouterr().out
