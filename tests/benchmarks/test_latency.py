"""The latency probe's hand-built multipart body is a request the server reads as its client's would be."""

from __future__ import annotations

import pytest

from benchmarks.latency import multipart_body
from tests.service.conftest import running_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio


async def test_hand_built_multipart_body_is_read_like_a_clients(tmp_path, backbone):
    labels = ["red", "green", "blue"]
    images = [("images", colour("blue")), ("images", colour("red"))]
    body, ctype = multipart_body([("labels", x) for x in labels], images)
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/classify", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        assert [res["labels"][0]["label"] for res in r.json()["results"]] == ["blue", "red"]
        assert {x["label"] for x in r.json()["results"][0]["labels"]} == set(labels)


def test_bad_arguments_are_refused_before_a_minute_of_work(tmp_path, capsys):
    """`--out` a folder ran the whole benchmark, then lost it to an IsADirectoryError."""
    import pytest

    from benchmarks.latency import main

    for argv in (["--out", str(tmp_path)], ["--out", str(tmp_path / "no" / "r.json")], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        said = capsys.readouterr().err
        assert ("--out names the JSON file" if "--out" in argv else "--requests and --rounds must be >= 1") in said


def test_a_ratio_below_zero_is_not_a_goal_met():
    """memory_per_task_vs_bundle -0.1 (RSS fell as tasks were added: noise) read 'yes' against <= 1.2."""
    from benchmarks.serve_report import _meets

    assert _meets(-0.1, ("<=", 1.2)).startswith("not measured") and _meets(1.1, ("<=", 1.2)) == "yes"
    assert _meets(None, ("<=", 1.2)) == "not measured" and _meets(0.7, (">=", 0.8)) == "NO"
