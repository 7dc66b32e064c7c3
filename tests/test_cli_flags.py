"""The command line is made from the config classes: every documented setting is a flag, defaults and help
come from the class, and names defined once agree wherever they are used."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import typing
from dataclasses import fields

import httpx
import pytest

from clipbank.bench_commands import BENCHES
from clipbank.cli import build_parser
from clipbank.flags import flag_fields, given
from model_store.modes import ROUTE_MODES, SELECTOR_NAMES
from service.config import ServeConfig
from service.schemas import RouteMode
from tests.helpers import client_on as _client_on
from training.config import CLJob, PretrainConfig, TrainJob


def _sub(cmd: str):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "cmd").choices[cmd]


def test_every_serve_setting_but_the_tokens_is_a_flag_that_defaults_to_unset():
    flags = {a.dest: a for a in _sub("serve")._actions if a.dest != "help"}
    expected = {f.name for f in fields(ServeConfig)} - {"admin_token", "classify_token", "limits"}
    assert set(flags) == expected
    assert all(a.default is None for a in flags.values())  # so CLIPBANK_* variables fill what was not given
    assert "(default 8000)" in flags["port"].help
    assert flags["frozen_runtime"].choices == ("auto", "torch", "onnx", "onnx-int8")
    assert flags["autocast"].choices == ("off", "fp16", "bf16")


def test_serve_flags_override_the_environment_and_the_rest_comes_from_it():
    args = build_parser().parse_args(["serve", "--port", "9001", "--max-wait-ms", "2.5"])
    config = ServeConfig.from_env({"CLIPBANK_PORT": "9000", "CLIPBANK_HOST": "0.0.0.0"}, **given(ServeConfig, args))
    assert (config.port, config.max_wait_ms, config.host) == (9001, 2.5, "0.0.0.0")


def test_train_flags_build_a_train_job_with_the_class_defaults():
    args = build_parser().parse_args(["train", "--task", "t", "--data", "d", "--steps", "7", "--no-activate"])
    job = TrainJob(**given(TrainJob, args))
    assert (job.task, job.data, job.steps, job.activate) == ("t", "d", 7, False)
    assert (job.batch_size, job.selector, job.lr) == (TrainJob.batch_size, "hybrid", None)
    assert set(given(TrainJob, args)) == {f.name for f in flag_fields(TrainJob)}


def test_a_library_training_job_with_nowhere_to_put_its_bundle_is_refused_before_training():
    """`run_train_job(TrainJob(...))` with neither out nor store trained for minutes, then dropped the bundle."""
    from training.run import run_train_job

    with pytest.raises(ValueError, match="needs out .* store"):
        run_train_job(TrainJob(task="t", data="no-such-folder"))


def test_train_requires_task_and_data(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d"])
    assert "--task" in capsys.readouterr().err


def test_pretrain_flags_cover_the_whole_config():
    args = build_parser().parse_args(["pretrain-tiny", "--steps", "3", "--characters", "0.4"])
    cfg = PretrainConfig(**given(PretrainConfig, args))
    assert (cfg.steps, cfg.characters, cfg.batch_size) == (3, 0.4, 128)


def test_names_defined_once_agree():
    assert typing.get_args(RouteMode) == ROUTE_MODES
    from model_store.selector import SELECTOR_KINDS

    assert tuple(SELECTOR_KINDS) == SELECTOR_NAMES


def test_building_the_command_line_does_not_load_torch():
    code = "import sys, clipbank.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_every_bench_setting_is_a_flag_of_its_command(bench):
    job = BENCHES[bench][0]
    args = build_parser().parse_args(["bench", bench])
    assert given(job, args) == {f.name: f.default for f in fields(job)}  # nothing given: the class's defaults


def test_bench_switches_and_values_reach_the_job(tmp_path):
    flags = ["--no-routing", "--steps", "5", "--protocol", "mtil-1", "--data-root", str(tmp_path)]
    args = build_parser().parse_args(["bench", "cl", *flags])
    job = CLJob(**given(CLJob, args))
    assert (job.routing, job.steps, job.protocol, job.domains) == (False, 5, "mtil-1", CLJob.domains)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "cl", "--protocol", "imagenet"])


@pytest.mark.parametrize("bench", ["serve", "cl", "soak", "routing", "scale"])
def test_every_bench_keeps_its_report_unless_told_otherwise(bench):
    """An 83-minute `bench cl` without --out used to print its tables and drop report.json and the plots."""
    assert build_parser().parse_args(["bench", bench]).out == f"runs/bench-{bench}"


def test_data_list_json_names_every_domain_with_its_classes(capsys):
    """For a script: an outside check's parsed the table."""
    from clipbank.cli import main
    from training.domains import DOMAINS

    assert main(["data", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == list(DOMAINS) and listed[0]["classes"] == list(
        DOMAINS[listed[0]["name"]].classes
    )


def test_classify_prints_a_null_score_as_a_dash(tmp_path, monkeypatch, capsys):
    """A score that was not a finite number comes back as null (docs/service.md); the table shows '-'."""
    from clipbank.cli import main
    from service.client import ClipbankClient

    route = {"task": "t", "version": 1, "bundle_id": "x", "score": None, "threshold": 1.0}
    body = {"results": [{"labels": [{"label": "red", "score": None}], "route": route}], "timing": {}}
    monkeypatch.setattr(ClipbankClient, "classify", lambda self, *a, **k: body)
    (tmp_path / "a.png").write_bytes(b"x")
    assert main(["classify", str(tmp_path / "a.png"), "--url", "http://127.0.0.1:9"]) == 0
    assert capsys.readouterr().out.split("\t")[1:3] == ["red", "-"]


def test_classify_top_k_prints_a_line_per_label_kept(tmp_path, monkeypatch, capsys):
    """`--top-k 3` printed the best label alone, as without it: the option showed only in --json."""
    from clipbank.cli import main
    from service.client import ClipbankClient

    route = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
    ranked = [{"label": x, "score": s} for x, s in (("red", 0.7), ("blue", 0.2), ("green", 0.1))]
    body = {"results": [{"labels": ranked, "route": route}], "timing": {}}
    monkeypatch.setattr(ClipbankClient, "classify", lambda self, *a, **k: body)
    (tmp_path / "a.png").write_bytes(b"x")
    url = ["--labels", "red,blue,green", "--url", "http://127.0.0.1:9"]
    assert main(["classify", str(tmp_path / "a.png"), *url, "--top-k", "2"]) == 0
    lines = [line.split("\t")[1:3] for line in capsys.readouterr().out.splitlines()]
    assert lines == [["red", "0.700"], ["blue", "0.200"]]
    assert main(["classify", str(tmp_path / "a.png"), *url]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_the_client_names_what_is_wrong_with_a_server_that_is_not_clipbank(monkeypatch, tmp_path, capsys):
    """Not JSON, a redirect, a JSON list, an HTML error page, no server at all: one line and exit 2 (3 for a 5xx but
    501, or no answer), never a
    traceback; and `classify` checks there is a result per image."""
    import httpx

    from clipbank.cli import main

    (tmp_path / "a.png").write_bytes(b"x")
    answers = {
        "html": httpx.Response(200, text="<html>hi</html>"),
        "redirect": httpx.Response(308, headers={"location": "https://x/classify"}),
        "list": httpx.Response(200, json=[1, 2]),
        "other": httpx.Response(200, json={"status": "ok"}),
        "error page": httpx.Response(501, text="<!DOCTYPE HTML>\n<html><body>\n<h1>Not implemented</h1></body></html>"),
    }
    for name, answer in answers.items():
        _client_on(monkeypatch, lambda request, a=answer: a)
        # a failing server, or a URL that is no clipbank server (a 501: it has no POST, a static file server)
        usage = 3 if answer.status_code >= 500 and answer.status_code != 501 else 2
        assert main(["classify", str(tmp_path / "a.png"), "--labels", "a,b", "--url", "http://srv:1"]) == usage, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert "Not implemented" in err and "<" not in err
    monkeypatch.undo()
    assert main(["classify", str(tmp_path / "a.png"), "--url", "http://127.0.0.1:9"]) == 3  # no answer: try later
    err = capsys.readouterr().err
    assert "unreachable: cannot reach http://127.0.0.1:9" in err and "HTTP 0" not in err  # no answer: no status


def test_the_client_takes_the_image_objects_a_python_user_has_and_names_odd_answers(monkeypatch, tmp_path):
    """PIL images and bytes-like objects once failed with a raw TypeError from pathlib; an error status with an
    empty body (not a clipbank server) gave `http_error` with an empty message; `task("")` blamed the URL."""
    import io

    import httpx
    from PIL import Image

    from service.client import ClipbankHTTPError

    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tasks":
            return httpx.Response(404)
        body = request.read()
        boundary = request.headers["content-type"].split("boundary=")[1].encode()
        parts = [p.split(b"\r\n\r\n", 1) for p in body.split(b"--" + boundary)[1:-1]]
        sent.extend(data for head, data in parts if b'name="images"' in head)
        return httpx.Response(200, json={"results": []})

    png = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(png, format="PNG")
    (tmp_path / "red.png").write_bytes(png.getvalue())
    with _client_on(monkeypatch, handler)("http://srv:1") as c:
        with open(tmp_path / "red.png", "rb") as f:
            image = Image.open(io.BytesIO(png.getvalue()))
            c.classify([image, bytearray(png.getvalue()), memoryview(png.getvalue()), f, tmp_path / "red.png"])
        assert len(sent) == 5 and all(Image.open(io.BytesIO(b.removesuffix(b"\r\n"))).size == (4, 4) for b in sent)
        with pytest.raises(TypeError, match="an image is a path, encoded bytes"):
            c.classify([3.5])
        with pytest.raises(ValueError, match="no images"):
            c.classify([])
        with pytest.raises(ValueError, match="no task can have that name"):
            c.task("")
        with pytest.raises(ClipbankHTTPError) as caught:
            c.tasks()
    assert caught.value.code == "http_error"
    assert caught.value.message == "GET http://srv:1/tasks answered 404 without a clipbank error (an empty body)"


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (httpx.Response(501, text="<h1>Unsupported method ('POST')</h1>"), 2),  # python -m http.server: a wrong URL
        (httpx.Response(404, text="File not found"), 2),
        (httpx.Response(502, text="Bad Gateway"), 3),  # a proxy whose server is down: worth trying again
        (httpx.Response(500, json={"error": {"code": "internal", "message": "boom", "details": None}}), 3),
    ],
)
def test_a_server_that_is_no_clipbank_one_is_a_usage_error_whatever_its_status(tmp_path, monkeypatch, answer, code):
    """An outside check: a static file server's 501 to `classify` and `push` was exit 3, "try again later", and a
    CI's retry loop kept trying a URL that could never work; its 404 to `tasks` was 2."""
    from PIL import Image

    from clipbank.cli import main

    Image.new("RGB", (4, 4), "red").save(tmp_path / "red.png")
    _client_on(monkeypatch, lambda request: answer)
    argv = ["classify", str(tmp_path / "red.png"), "--label", "a", "--label", "b", "--url", "http://srv"]
    assert main([*argv, "--retries", "0"]) == code


def test_the_client_keeps_task_names_in_their_path_segment_and_strips_its_token(monkeypatch):
    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.raw_path.decode(), request.headers.get("authorization")))
        answer = {"task": "t", "active_version": 1, "versions": [], "results": [{}, {}]}
        return httpx.Response(200, json=answer)

    client_class = _client_on(monkeypatch, handler)
    with client_class("http://srv", token="abcdefghijklmnop0123\n") as c:
        for call in (lambda: c.delete("../insights/unclaimed"), lambda: c.activate("x/../y", 1), lambda: c.task("a#b")):
            with pytest.raises(ValueError, match="no task can have that name"):  # the server would say "no route"
                call()
        assert seen == []
        c.activate("v1.2_x-y", 1)
        c.task("t")
    assert [p for _, p, _ in seen] == ["/tasks/v1.2_x-y/activate?force=false", "/tasks/t"]
    assert {a for _, _, a in seen} == {"Bearer abcdefghijklmnop0123"}
    with pytest.raises(ValueError, match="printable ASCII") as e:
        client_class("http://srv", token="abc def ghijklmnop")
    assert "abc" not in str(e.value)
    with pytest.raises(TypeError, match="lists"):
        client_class("http://srv").classify([b"x"], labels="cat,dog")
    from PIL import Image

    with pytest.raises(TypeError, match="lists"):  # one PIL image, not a list of them
        client_class("http://srv").classify(Image.new("RGB", (4, 4)), labels=["cat"])

    class Series(list):  # as pandas' Series of paths: a sequence with a mode() method
        def mode(self):
            return self

    seen.clear()
    client_class("http://srv").classify(Series([b"x", b"y"]), labels=["cat"])  # an outside check's: it was refused
    assert [p for _, p, _ in seen] == ["/classify"]


def test_classify_sends_more_images_than_one_request_holds_in_chunks(monkeypatch, tmp_path, capsys):
    from clipbank.cli import main

    sizes = _counting_server(monkeypatch)
    paths = _files(tmp_path, 150)
    assert main(["classify", *paths, "--labels", "a,b", "--url", "http://srv"]) == 0
    assert sizes == [64, 64, 22] and capsys.readouterr().out.count("\n") == 150
    assert main(["classify", *paths, "--labels", "a,b", "--url", "http://srv", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]  # each result names its file, across requests
    assert [r["file"] for r in results] == paths and results[0]["labels"] == [{"label": "a", "score": 0.9}]


def test_classify_reads_one_image_from_standard_input(monkeypatch, tmp_path, capsys):
    """`curl ... | clipbank classify - --labels a,b`: `-` was taken as a file name ("No such file: '-'")."""
    import io

    import httpx

    import clipbank.classify_command as command
    from clipbank.cli import main

    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        result = {"labels": [{"label": "a", "score": 0.9}], "route": {"task": None}}
        return httpx.Response(200, json={"results": [result] * request.content.count(b'name="images"')})

    _client_on(monkeypatch, answer)
    command._stdin_image.cache_clear()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x89PNG the piped image")))
    assert main(["classify", "-", "--labels", "a,b", "--url", "http://srv", "--json"]) == 0
    assert b"\x89PNG the piped image" in bodies[0] and json.loads(capsys.readouterr().out)["results"][0]["file"] == "-"
    command._stdin_image.cache_clear()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["classify", "-", "--labels", "a,b", "--url", "http://srv"]) == 2
    assert "standard input (-) is empty" in capsys.readouterr().err
    assert main(["classify", "-", "-", "--labels", "a,b", "--url", "http://srv"]) == 2
    assert "standard input (-) holds one image" in capsys.readouterr().err
    command._stdin_image.cache_clear()


def test_classify_sends_requests_of_the_servers_own_max_images(monkeypatch, tmp_path, capsys):
    """A server run with CLIPBANK_MAX_IMAGES=8 refused every request of more than 8 files, and the command gave up."""
    from clipbank.cli import main

    sizes = _counting_server(monkeypatch, max_images=8)
    paths = _files(tmp_path, 20)
    assert main(["classify", *paths, "--labels", "a,b", "--url", "http://srv", "--json"]) == 0
    assert sizes == [20, 8, 8, 4]
    assert [r["file"] for r in json.loads(capsys.readouterr().out)["results"]] == paths
    sizes.clear()  # one decision for all images cannot be split: the server's answer stands
    assert main(["classify", *paths, "--labels", "a", "--url", "http://srv", "--route", "per-request"]) == 1
    assert sizes == [20] and "max_images=8" in capsys.readouterr().err


def test_classify_halves_its_requests_when_their_answers_are_over_the_servers_limit(monkeypatch, tmp_path, capsys):
    """Many long labels: the server's 413 names max_response_bytes, and smaller requests fit it."""
    from clipbank.cli import main

    sizes = _counting_server(monkeypatch, max_images=10, setting="max_response_bytes")
    paths = _files(tmp_path, 40)
    assert main(["classify", *paths, "--labels", "a,b", "--url", "http://srv", "--json"]) == 0
    assert sizes == [40, 20, 10, 10, 10, 10]
    assert [r["file"] for r in json.loads(capsys.readouterr().out)["results"]] == paths


@pytest.mark.parametrize("setting", ["max_response_bytes", "max_request_bytes", "max_request_pixels"])
def test_classify_halves_requests_whose_answer_or_body_is_over_the_servers_limit(
    monkeypatch, tmp_path, capsys, setting
):
    """An outside check's: 70 photos of 1.3 MB made a body over max_request_bytes (64 MiB), and the command gave
    up with nothing answered; the server's 413 now names the setting, and smaller requests fit it."""
    from clipbank.cli import main

    sizes = _counting_server(monkeypatch, max_images=10, setting=setting)
    paths = _files(tmp_path, 40)
    assert main(["classify", *paths, "--labels", "a,b", "--url", "http://srv", "--json"]) == 0
    assert sizes == [40, 20, 10, 10, 10, 10]
    assert [r["file"] for r in json.loads(capsys.readouterr().out)["results"]] == paths


def test_classify_json_keeps_the_answers_before_a_failed_request_and_says_what_was_left(monkeypatch, tmp_path, capsys):
    """An outside check's: with --json, a failure in the second request printed nothing, though the first had been
    answered (the text lines were printed). Also: a run where every file was skipped exits 1, not 0."""
    import httpx

    from clipbank.cli import main

    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) > 1:
            error = {"code": "bad_image", "message": "image 0 is not an image", "details": {"image": 0}}
            return httpx.Response(422, json={"error": error})
        route = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
        answer = {"labels": [{"label": "a", "score": 0.9}], "route": route}
        return httpx.Response(200, json={"results": [answer] * 64})

    _client_on(monkeypatch, handler)
    paths = _files(tmp_path, 70)
    assert main(["classify", *paths, "--labels", "a", "--url", "http://srv", "--json"]) == 1  # refused: a 422
    out = capsys.readouterr()
    got = json.loads(out.out)
    assert [r["file"] for r in got["results"]] == paths[:64] and got["unanswered"] == paths[64:]
    assert got["error"]["code"] == "bad_image" and "files 65..70" in got["error"]["message"]
    assert "bad_image" in out.err
    calls.clear()  # the review's: a file the client cannot read lost the answers before it too
    paths[66] = str(tmp_path / "gone.png")
    assert main(["classify", *paths, "--labels", "a", "--url", "http://srv", "--json"]) == 2
    got = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in got["results"]] == paths[:64] and got["error"]["code"] == "unreadable"
    assert len(calls) == 1 and got["unanswered"][2] == paths[66]  # the second request was never sent
    missing = [str(tmp_path / "gone1.png"), str(tmp_path / "gone2.png")]
    assert main(["classify", *missing, "--labels", "a", "--url", "http://srv", "--skip-bad"]) == 1
    assert "2 of 2 files skipped" in capsys.readouterr().err


def test_commands_refuse_a_closed_stdout_and_an_answer_that_is_not_clipbanks(monkeypatch, tmp_path, capsys):
    """An outside check's: `clipbank classify f.png >&-` ended in a traceback after the work (its answers lost),
    and `clipbank tasks` against another JSON server in a KeyError."""
    import httpx

    from clipbank.cli import main

    _client_on(monkeypatch, lambda request: httpx.Response(200, json={"status": "ok"}))
    assert main(["tasks", "--url", "http://srv"]) == 2
    assert "answered GET /tasks without generation, tasks: is it a clipbank server?" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdout", None)
    assert main(["classify", *_files(tmp_path, 1), "--labels", "a", "--url", "http://srv"]) == 2
    assert "standard output is closed" in capsys.readouterr().err


def test_classify_skip_bad_answers_the_other_files_and_lists_the_bad_ones(monkeypatch, tmp_path, capsys):
    import httpx

    from clipbank.cli import main

    requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        boundary = request.headers["content-type"].split("boundary=")[1].encode()
        parts = [p.split(b"\r\n\r\n", 1) for p in request.content.split(b"--" + boundary)[1:-1]]
        images = [data.removesuffix(b"\r\n") for head, data in parts if b'name="images"' in head]
        requests.append(len(images))
        if b"bad" in images:  # as the server says it: the first bad image's index in this request
            i = images.index(b"bad")
            error = {"code": "bad_image", "message": f"image {i} is not an image", "details": {"image": i}}
            return httpx.Response(422, json={"error": error})
        route = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
        answer = {"labels": [{"label": "a", "score": 0.9}], "route": route}
        return httpx.Response(200, json={"results": [answer] * len(images)})

    _client_on(monkeypatch, handler)
    paths = []
    for i in range(70):  # two requests; bad files in both, and one that does not exist
        (tmp_path / f"{i}.png").write_bytes(b"bad" if i in (3, 5, 66) else b"ok")
        paths.append(str(tmp_path / f"{i}.png"))
    args = ["classify", *paths, "--labels", "a", "--url", "http://srv"]
    assert main(args) == 1  # without the flag: the first bad file stops the command, and says how to go on
    err = capsys.readouterr().err
    assert "image 3 is not an image (in the request of files 1..64" in err and "; --skip-bad leaves such" in err
    paths.insert(10, str(tmp_path / "missing.png"))
    args = ["classify", *paths, "--labels", "a", "--url", "http://srv"]
    requests.clear()
    assert main([*args, "--skip-bad", "--json"]) == 0
    out = capsys.readouterr()
    results = json.loads(out.out)["results"]
    assert [r["file"] for r in results] == paths
    skipped = {r["file"]: r["error"]["code"] for r in results if "error" in r}
    assert skipped == {paths[3]: "bad_image", paths[5]: "bad_image", paths[10]: "unreadable", paths[67]: "bad_image"}
    # the server's index is of its request, which shrinks as files are left out: each file says its own message
    said = {r["error"]["message"] for r in results if r.get("error", {}).get("code") == "bad_image"}
    assert said == {"is not an image"}
    assert all(r["labels"][0]["label"] == "a" for r in results if "error" not in r)
    assert requests == [63, 62, 61, 7, 6] and "4 of 71 files skipped" in out.err  # one request more per bad file
    assert main([*args, "--skip-bad"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 71 and lines[10].startswith(f"{paths[10]}\t-\t-\t[skipped: ") and "a\t0.900" in lines[0]


def test_shadow_with_no_image_scored_says_so_instead_of_an_empty_histogram(monkeypatch, capsys):
    import httpx

    from clipbank.cli import main

    stats = {"task": "t", "version": 2, "since": "2026-12-05T00:00:00Z", "would_claim": 0, "images": 0}
    stats |= {"claim_rate": None, "taken_from": {}, "score_histogram": {"le": [0.5, 1.0], "counts": [0, 0]}}
    _client_on(monkeypatch, lambda request: httpx.Response(200, json=stats))
    assert main(["shadow", "t", "--url", "http://srv"]) == 0
    out = capsys.readouterr().out
    assert "would claim 0 of 0 auto-routed images (-)" in out and "): no image scored yet\n" in out
    assert out.rstrip().endswith("runs the interference gate again, on the bank as it is then")  # not its old report


def test_pretrain_tiny_does_not_overwrite_the_embedded_backbone_unless_asked(capsys):
    import hashlib

    from clipbank.cli import main
    from model_store.backbone_ref import TINY_WEIGHTS

    before = hashlib.sha256(TINY_WEIGHTS.read_bytes()).hexdigest()
    assert main(["pretrain-tiny", "--steps", "1"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["pretrain-tiny", "--steps", "-1", "--out", "/tmp/never.safetensors"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["pretrain-tiny", "--weight-decay", "nan", "--out", "/tmp/never.safetensors"]) == 2
    assert "weight_decay must be a finite number >= 0, got nan" in capsys.readouterr().err  # made all weights NaN
    assert hashlib.sha256(TINY_WEIGHTS.read_bytes()).hexdigest() == before


def test_pretrain_tiny_checks_its_out_file_before_training(tmp_path, capsys, monkeypatch):
    """An outside check's: an existing file was replaced without asking, and a folder that cannot be written was
    found only once the training (hours, by default) was over."""
    import training.pretrain_tiny
    from clipbank.cli import main

    monkeypatch.setattr(training.pretrain_tiny, "pretrain_tiny", lambda *a: pytest.fail("no training"))
    (tmp_path / "mine.safetensors").write_text("precious")
    assert main(["pretrain-tiny", "--out", str(tmp_path / "mine.safetensors")]) == 2
    assert "exists; give a new file name, or --overwrite to replace it" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["pretrain-tiny", "--out", str(tmp_path / "afile" / "sub" / "w.safetensors")]) == 2
    assert "afile" in capsys.readouterr().err
    assert main(["pretrain-tiny", "--out", str(tmp_path)]) == 2
    assert "is a directory; give the weights file's path" in capsys.readouterr().err
    assert (tmp_path / "mine.safetensors").read_text() == "precious"


def test_server_settings_that_could_never_work_are_refused_up_front():
    from service.config import ServeConfig

    for kw, message in (
        ({"admin_token": "abcdefghijklmnop0123 "}, "printable ASCII"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"device": "garbage"}, "device must be"),
    ):
        with pytest.raises(ValueError, match=message):
            ServeConfig.from_env({}, **kw)


def test_training_and_benchmark_settings_that_could_only_fail_late_are_refused_up_front(capsys):
    """Each of these once ran (training every step) before failing, or silently meant something else."""
    from clipbank.cli import main
    from training.trainer import TrainConfig

    for kw, message in (
        ({"lr": float("inf")}, "lr must be a finite number > 0"),  # failed after training: inf is not JSON
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"new_first": float("inf")}, "new_first must be a finite number"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(task="t", **kw)
    with pytest.raises(ValueError, match="lr"):
        PretrainConfig(lr=float("inf"))
    for kw, message in (({"steps": 0}, "--steps must be >= 1"), ({"test_limit": -5}, "--test-limit must be >= 1")):
        with pytest.raises(ValueError, match=message):
            CLJob(**kw)
    assert main(["bench", "cl", "--device", "bogus"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N, got 'bogus'" in capsys.readouterr().err


def test_the_client_bounds_what_a_hostile_answer_can_cost(monkeypatch):
    """An error page of 100,000 '<' took 3.7 s in the tag-stripping regex (quadratic; 1 MB, minutes), nested JSON
    escaped as a RecursionError, a bad gzip body as a raw httpx error, and a trickled answer held the caller past
    its timeout. Each is now a ClipbankHTTPError, quickly; a 503's Retry-After is kept for the caller."""
    import time

    import httpx

    from service.client import ClipbankHTTPError

    def trickle():
        for _ in range(60):  # 3 s in all, against the client's 0.3 s
            time.sleep(0.05)
            yield b" "

    answers = {
        "lt": (httpx.Response(500, text="<" * 100_000), "http_error"),
        "deep error": (httpx.Response(500, text="[" * 100_000), "http_error"),
        "deep ok": (httpx.Response(200, text="[" * 100_000), "not_clipbank"),
        "gzip": (
            httpx.Response(200, content=iter([b"not gzip"]), headers={"content-encoding": "gzip"}),
            "connection_failed",
        ),
        "trickle": (httpx.Response(200, content=trickle()), "timeout"),
    }
    for name, (answer, code) in answers.items():
        client = _client_on(monkeypatch, lambda request, a=answer: a)("http://srv:1", timeout=0.3)
        start = time.monotonic()
        with pytest.raises(ClipbankHTTPError) as caught:
            client.tasks()
        assert caught.value.code == code and time.monotonic() - start < 2.0, (name, caught.value)

    def slow(request):  # the request went out and no answer came: the change may still land
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(ClipbankHTTPError) as caught:
        _client_on(monkeypatch, slow)("http://srv:1", timeout=0.3).activate("cars", 2)
    assert caught.value.code == "timeout" and "POST /tasks/cars/activate" in caught.value.message
    assert "may still land" in caught.value.message
    with pytest.raises(ClipbankHTTPError) as caught:  # a read changes nothing: no such warning
        _client_on(monkeypatch, slow)("http://srv:1", timeout=0.3).tasks()
    assert caught.value.code == "timeout" and "may still land" not in caught.value.message
    busy = httpx.Response(503, json={"error": {"code": "overloaded", "message": "m"}}, headers={"retry-after": "2"})
    with pytest.raises(ClipbankHTTPError) as caught:
        _client_on(monkeypatch, lambda request: busy)("http://srv:1").tasks()
    assert (caught.value.code, caught.value.retry_after) == ("overloaded", 2.0)


def test_insights_writes_only_where_it_may_and_names_what_it_wrote(monkeypatch, tmp_path, capsys):
    """`--examples DIR` once deleted any `cluster-*/[0-9]*.png` under DIR (a user's photos too); `--png noext`
    wrote noext.png and said it wrote noext."""
    import base64

    import httpx
    from PIL import Image

    from clipbank.cli import main
    from tests.helpers import png

    uri = "data:image/png;base64," + base64.b64encode(png(Image.new("RGB", (4, 4)))).decode()
    answer = {"enabled": True, "reservoir": {"thumbnail": 16}, "clusters": [{"id": 3, "examples": [uri, uri]}]}
    _client_on(monkeypatch, lambda request: httpx.Response(200, json=answer))
    args = ["insights", "--json", "--url", "http://srv:1", "--token", "t" * 20]
    photos = tmp_path / "photos" / "cluster-headshots"
    photos.mkdir(parents=True)
    (photos / "2019-family.png").write_bytes(b"mine")
    assert main([*args, "--examples", str(tmp_path / "photos")]) == 2
    assert "holds files clipbank did not write" in capsys.readouterr().err
    assert (photos / "2019-family.png").read_bytes() == b"mine"
    out = tmp_path / "examples"
    assert main([*args, "--examples", str(out)]) == 0
    assert sorted(p.name for p in (out / "cluster-3").iterdir()) == ["0.png", "1.png"]
    assert "wrote 2 example thumbnail(s)" in capsys.readouterr().err
    (out / "cluster-9").mkdir()
    (out / "cluster-9" / "0.png").write_bytes(b"stale")  # an earlier run's cluster: goes
    (out / "cluster-3" / "notes.png").write_bytes(b"kept")  # not a name clipbank writes: stays
    assert main([*args, "--examples", str(out)]) == 0
    assert not (out / "cluster-9" / "0.png").exists() and (out / "cluster-3" / "notes.png").exists()
    _client_on(monkeypatch, lambda request: httpx.Response(200, json={**answer, "clusters": []}))
    assert main([*args, "--examples", str(tmp_path / "none")]) == 0  # said it wrote thumbnails, and wrote none
    assert "no cluster, so no example thumbnail" in capsys.readouterr().err
    _client_on(monkeypatch, lambda request: httpx.Response(200, json=answer))
    for bad in ("noext", str(tmp_path), "plot.jpg", ""):
        assert main([*args, "--png", bad]) == 2
        assert "--png takes a file name ending in .png" in capsys.readouterr().err
    asked = []  # paths that cannot be written are refused before the server is asked (a clustering takes seconds)
    _client_on(monkeypatch, lambda request: asked.append(request) or httpx.Response(200, json=answer))
    assert main([*args, "--png", str(tmp_path / "no-such-folder" / "x.png")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
    (tmp_path / "afile").write_bytes(b"x")
    assert main([*args, "--examples", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err and asked == []
    whole = {"clusters": [{"id": 3, "size": 30, "nearest_task": None, "over_time": [[0.0, 0.1]], "examples": []}]}
    _client_on(monkeypatch, lambda request: httpx.Response(200, json={**answer, **whole}))
    assert main([*args, "--png", str(tmp_path / "plot.png")]) == 0 and (tmp_path / "plot.png").stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_classify_output_survives_a_closed_pipe_and_odd_names_and_says_which_files_failed(
    monkeypatch, tmp_path, capsys
):
    import os
    import sys

    import httpx

    from clipbank.cli import main

    names = [tmp_path / f"{i}.png" for i in range(70)] + [tmp_path / "tab\tname.png"]
    for p in names:
        p.write_bytes(b"x")

    def answer(request):
        n = request.content.count(b'name="images"')
        if n == 6:  # the second request of 70 files
            error = {"code": "bad_image", "message": "image 3 is not an image", "details": {"image": 3}}
            return httpx.Response(422, json={"error": error})
        result = {"labels": [{"label": "a", "score": 0.9}], "route": {"task": None}}
        return httpx.Response(200, json={"results": [result] * n})

    _client_on(monkeypatch, answer)
    args = ["classify", *map(str, names[:70]), "--labels", "a,b", "--url", "http://srv:1"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert (  # the server counts a request's images from 0 (image 3 is file 68)
        "image 3 is not an image (in the request of files 65..70: its image i is file 65 + i; the files before "
        "it were answered above)" in err
    )
    assert len(out.splitlines()) == 64  # the first request's answers are not lost
    assert main(["classify", str(names[0]), str(names[-1]), "--labels", "a,b", "--url", "http://srv:1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("'") and lines[1].count("\t") == 3  # the tab shown escaped
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:  # `clipbank classify ... | head -1` once the reader has gone
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["classify", str(names[0]), "--labels", "a,b", "--url", "http://srv:1"]) == 141
        monkeypatch.undo()
    assert "BrokenPipe" not in capsys.readouterr().err
    _client_on(
        monkeypatch, lambda request: httpx.Response(404, json={"error": {"code": "task_not_found", "message": "t"}})
    )
    assert main([*args, "--task", "nosuch"]) == 1  # an error about no image numbers none (it did)
    assert capsys.readouterr().err.strip().endswith("task_not_found: t")


def test_an_error_object_for_a_reader_that_went_away_ends_quietly(monkeypatch, capsys):
    """`clipbank tasks activate t 1 --json | head -5` after a 409: the error object met the closed pipe, and the
    command ended in a BrokenPipeError traceback. Its exit code stays the refusal's."""
    import os

    import httpx

    from clipbank.cli import main

    _client_on(monkeypatch, lambda r: httpx.Response(409, json={"error": {"code": "interference", "message": "no"}}))
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["tasks", "activate", "t", "1", "--json", "--url", "http://srv:1"]) == 1  # refused: kept
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    assert "Traceback" not in capsys.readouterr().err


def test_bench_settings_are_checked_before_any_work(tmp_path, capsys):
    """`--clients 0` started a soak, `--requests 0` meant the default, `--kinds hybrid,foo` fitted the hybrid for
    25 s first, and `--out FILE` failed after a whole run."""
    from clipbank.cli import main

    (tmp_path / "afile").write_text("x")
    for args, message in (
        (["soak", "--quick", "--clients", "0"], "--clients must be a finite number > 0"),
        (["soak", "--hostile", "-3"], "--hostile must be a finite number >= 0"),
        (["serve", "--requests", "0"], "--requests must be a finite number > 0"),
        (["serve", "--max-seconds", "nan"], "--max-seconds must be a finite number > 0"),
        (["routing", "--kinds", "hybrid,foo"], "unknown selector kind(s) 'foo'"),
        (["routing", "--out", str(tmp_path / "afile")], "is a file; the report goes into a folder"),
        (["scale", "--out", str(tmp_path / "afile")], "is a file; the report goes into a folder"),
        (["soak", "--quick", "--out", ""], "--out '' prints only for cl and routing"),  # wrote into the cwd
        (["serve", "--quick", "--out", ""], "--out '' prints only for cl and routing"),
        # an outside check's: it failed only once the main bank had trained (minutes at the default budget)
        (["cl", "--quick", "--expert-blocks", "99", "--out", ""], "--expert-blocks 99: the backbone's towers have"),
    ):
        assert main(["bench", *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_reference_build_settings_are_checked_before_embedding(tmp_path, capsys):
    from clipbank.cli import main

    for args, message in (
        (["--generated", "--limit", "-1"], "--limit must be >= 1"),  # -1 dropped the last image silently
        (["--generated", "--characters", "5"], "--characters is a share in [0, 1]"),
        (["--generated", "--out", str(tmp_path)], "is a folder; give the reference set's file name"),
        (["--images", str(tmp_path / "none")], "none: no such folder"),  # exit 1 before, 2 like every other error
    ):
        assert main(["reference", "build", *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_a_store_url_that_is_not_a_folder_gets_no_token_file_written_in_its_name(tmp_path, monkeypatch, capsys):
    """`--store ftp://x` saved a token under ./ftp:/x before it was refused (an s3:// store needs a set token)."""
    from clipbank.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:  # ignored, they let a user believe the server was scaled out
        main(["serve", "--replicas", "3", "--no-broadcast"])
    assert stopped.value.code == 2 and "--replicas, --no-broadcast apply only with --engine ray" in str(stopped.value)
    assert main(["serve", "--store", "ftp://x"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_classify_label_may_hold_commas_and_mixes_with_labels(tmp_path, monkeypatch, capsys):
    """`--labels` splits at commas, so a label like 'a photo of red, green and blue' could not be sent."""
    import httpx

    from clipbank.cli import main

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        route = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
        return httpx.Response(200, json={"results": [{"labels": [{"label": "x", "score": 0.9}], "route": route}]})

    _client_on(monkeypatch, handler)
    (tmp_path / "a.png").write_bytes(b"x")
    args = ["classify", str(tmp_path / "a.png"), "--url", "http://srv"]
    assert main([*args, "--labels", "cat,dog", "--label", "red, green and blue", "--label", " owl "]) == 0
    body = sent[-1].decode("latin-1")
    for label in ("cat", "dog", "red, green and blue", "owl"):
        assert f'name="labels"\r\n\r\n{label}\r\n' in body, label
    assert body.count('name="labels"') == 4
    capsys.readouterr()
    assert main([*args, "--label", "  "]) == 2
    assert "--label '' names no label" in capsys.readouterr().err
    assert len(sent) == 1


def test_json_output_shows_names_as_written_and_escapes_only_where_stdout_cannot_encode(monkeypatch, capsys):
    """`clipbank train` and `store list` printed the class 'café crème' as "caf\\u00e9 cr\\u00e8me"."""
    import io

    from clipbank.output import print_json

    print_json({"classes": ["café crème", "🐱 cat"]})
    assert '"café crème"' in capsys.readouterr().out
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)  # a C locale without UTF-8
    print_json({"classes": ["café"]})
    ascii_out.seek(0)
    assert '"caf\\u00e9"' in ascii_out.read()


def test_a_label_with_a_tab_keeps_the_output_columns(tmp_path, monkeypatch, capsys):
    import httpx

    from clipbank.cli import main

    def handler(request: httpx.Request) -> httpx.Response:
        route = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
        return httpx.Response(200, json={"results": [{"labels": [{"label": "a\tb", "score": 0.9}], "route": route}]})

    _client_on(monkeypatch, handler)
    (tmp_path / "a.png").write_bytes(b"x")
    assert main(["classify", str(tmp_path / "a.png"), "--label", "a\tb", "--url", "http://srv"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.count("\t") == 3 and "'a\\tb'" in line


def test_the_client_names_a_server_url_without_its_scheme():
    """`ClipbankClient("127.0.0.1:8710")` failed at the first call with an undocumented `connection_failed`."""
    from service.client import ClipbankClient

    for url in ("127.0.0.1:8710", "localhost", "ftp://srv", ""):
        with pytest.raises(ValueError, match="starts with http:// or https://"):
            ClipbankClient(url)
    ClipbankClient("HTTPS://srv.example:443/").close()


@pytest.mark.parametrize(
    ("env", "token"),
    [
        ({"CLIPBANK_ADMIN_TOKEN": "admin-token"}, "admin-token"),  # the server takes the admin token on /classify
        ({"CLIPBANK_ADMIN_TOKEN": "admin-token", "CLIPBANK_CLASSIFY_TOKEN": "reader"}, "reader"),
        ({"CLIPBANK_ADMIN_TOKEN_FILE": "admin-token-in-a-file\n"}, "admin-token-in-a-file"),  # a mounted secret
        (
            {"CLIPBANK_ADMIN_TOKEN": "admin-token", "CLIPBANK_CLASSIFY_TOKEN_FILE": "reader-in-a-file"},
            "reader-in-a-file",
        ),
        ({"CLIPBANK_ADMIN_TOKEN": ""}, None),  # empty is unset
        ({}, None),
    ],
)
def test_classify_sends_the_classify_token_else_the_admin_token(monkeypatch, tmp_path, capsys, env, token):
    """Read as the server reads them: the `_FILE` forms (a Docker or Kubernetes secret) were the server's alone, so
    `clipbank classify` beside a server configured that way sent no token."""
    import httpx

    from clipbank.cli import main

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(
            200, json={"results": [{"labels": [{"label": "a", "score": 1.0}], "route": {"task": None}}]}
        )

    for name in ("ADMIN_TOKEN", "CLASSIFY_TOKEN"):
        monkeypatch.delenv(f"CLIPBANK_{name}", raising=False)
        monkeypatch.delenv(f"CLIPBANK_{name}_FILE", raising=False)
    for name, value in env.items():
        if name.endswith("_FILE"):
            (tmp_path / name).write_text(value)
            value = str(tmp_path / name)
        monkeypatch.setenv(name, value)
    (tmp_path / "a.png").write_bytes(b"not read by the mock server")
    _client_on(monkeypatch, handler)
    assert main(["classify", str(tmp_path / "a.png"), "--url", "http://srv"]) == 0, capsys.readouterr().err
    assert sent == [None if token is None else f"Bearer {token}"]
    assert main(["classify", str(tmp_path / "a.png"), "--url", "http://srv", "--token", "flag"]) == 0
    assert sent[-1] == "Bearer flag"  # the flag wins


COMMANDS = [["tasks"], ["classify", "a.png"], ["eval", "d"], ["insights"], ["push", "b"], ["shadow", "t"]]


@pytest.mark.parametrize("content", [None, "two words\n", "tok\nen"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_token_file_the_commands_cannot_read_is_a_usage_error_that_names_it(
    monkeypatch, tmp_path, capsys, command, content
):
    """As the server refuses to start with it: no request is sent without the token its operator meant; a file
    that holds more than a token (`.env` named by mistake) is named too. `--token` wins: the files are not read."""
    import httpx

    from clipbank.cli import main

    _client_on(monkeypatch, lambda request: pytest.fail(f"sent {request.url}"))
    monkeypatch.chdir(tmp_path)
    for name in ("cat", "dog"):
        (tmp_path / "d" / name).mkdir(parents=True)
    for name in ("a.png", "b", "d/cat/a.png", "d/dog/a.png"):
        (tmp_path / name).write_bytes(b"x")
    for name in ("ADMIN_TOKEN", "CLASSIFY_TOKEN"):
        monkeypatch.delenv(f"CLIPBANK_{name}", raising=False)
        monkeypatch.delenv(f"CLIPBANK_{name}_FILE", raising=False)
    if content is not None:
        (tmp_path / "secret").write_text(content)
    monkeypatch.setenv("CLIPBANK_ADMIN_TOKEN_FILE", str(tmp_path / ("missing" if content is None else "secret")))
    assert main([*command, "--url", "http://srv"]) == 2
    err = capsys.readouterr().err
    assert f"clipbank {command[0]}: CLIPBANK_ADMIN_TOKEN_FILE=" in err and "two" not in err, err  # its line
    sent = []
    _client_on(monkeypatch, lambda request: sent.append(request.headers["authorization"]) or httpx.Response(503))
    main([*command, "--url", "http://srv", "--token", "flag-token"])  # the flag's token is sent, the file not read
    assert sent and set(sent) == {"Bearer flag-token"} and "_FILE" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--task", "x", "--data", "d"], "give --out FILE, --store DIR"),
        (["reference", "build"], "give --images DIR or --generated"),
    ],
)
def test_flags_that_do_not_go_together_exit_2_like_any_usage_error(argv, words, capsys):
    """They exited 1, the status every command gives for a failure, where argparse's own usage errors exit 2."""
    from clipbank.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and words in capsys.readouterr().err


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.strip() == f"clipbank {version('clipbank')}"


def test_shadow_json_when_setting_a_version_and_insights_saying_what_it_did_not_write(monkeypatch, tmp_path, capsys):
    """`shadow t --version 2 --json` printed the text line; `insights --png` on a server with the monitor off
    wrote nothing and exited 0; `--min-share 2` was refused in the server's words (`min_share`)."""
    import httpx

    from clipbank.cli import main

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/shadow"):
            return httpx.Response(200, json={"task": "t", "shadow_version": 2, "active_version": 1})
        return httpx.Response(200, json={"enabled": False, "reservoir": {}, "clusters": []})

    _client_on(monkeypatch, handler)
    assert main(["shadow", "t", "--version", "2", "--json", "--url", "http://srv"]) == 0
    assert json.loads(capsys.readouterr().out) == {"task": "t", "shadow_version": 2, "active_version": 1}
    for code, exit_code in (("no_shadow", 0), ("task_not_found", 1)):  # stopping twice is fine, a wrong name is not
        error = {"error": {"code": code, "message": "task 't' has no version in shadow"}}
        _client_on(monkeypatch, lambda request, error=error: httpx.Response(404, json=error))
        assert main(["shadow", "t", "--stop", "--url", "http://srv"]) == exit_code
        assert ("nothing to stop" in capsys.readouterr().err) == (exit_code == 0)
    _client_on(monkeypatch, handler)
    png = tmp_path / "u.png"
    assert main(["insights", "--png", str(png), "--url", "http://srv"]) == 1
    assert "nothing written for --png" in capsys.readouterr().out and not png.exists()
    assert main(["insights", "--url", "http://srv"]) == 0  # nothing asked, nothing missed
    capsys.readouterr()
    assert main(["insights", "--png", str(png), "--json", "--url", "http://srv"]) == 1  # --json says it too
    out = capsys.readouterr()
    assert json.loads(out.out)["enabled"] is False and "nothing written for --png" in out.err
    for flag, value, message in (  # the server's ranges, named locally (0 and 1 passed, then got the server's 422)
        ("--min-share", "2", "--min-share is a share"),
        ("--min-share", "0", "in (0, 1]"),
        ("--min-size", "1", "--min-size must be in [2, "),
        ("--max-clusters", "0", "--max-clusters must be in [1, 100]"),
    ):
        assert main(["insights", flag, value, "--url", "http://srv"]) == 2
        assert message in capsys.readouterr().err


def test_insights_json_with_files_stays_json_and_examples_from_a_server_without_thumbnails_exit_1(
    monkeypatch, tmp_path, capsys
):
    """`--json --png` printed "wrote FILE" after the JSON on stdout; `--examples` from a server that keeps no
    thumbnails wrote nothing and exited 0; a list cut at --max-clusters did not say so."""
    import httpx

    from clipbank.cli import main

    cluster = {"id": 0, "size": 30, "share": 0.1, "nearest_task": None, "margin": None, "over_time": [[1.8e9, 0.1]]}
    reservoir = {"thumbnail": 0, "unclaimed": 30, "auto_images": 300, "unclaimed_share": 0.1, "embeddings": 30}
    answer = {"enabled": True, "reservoir": {**reservoir, "capacity": 2048}, "clusters": [cluster]}
    seen = []
    _client_on(monkeypatch, lambda request: seen.append(request.url.params) or httpx.Response(200, json=answer))
    png = tmp_path / "u.png"
    assert main(["insights", "--json", "--png", str(png), "--url", "http://srv"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == answer and f"wrote {png}" in out.err and png.exists()
    assert main(["insights", "--examples", str(tmp_path / "ex"), "--url", "http://srv"]) == 1
    assert "keeps no thumbnails" in capsys.readouterr().err
    assert main(["insights", "--max-clusters", "1", "--url", "http://srv"]) == 0
    assert "(the 1 biggest clusters; --max-clusters shows more)" in capsys.readouterr().out
    assert seen[-1]["max_clusters"] == "1"


def _counting_server(monkeypatch, max_images: int | None = None, setting: str = "max_images") -> list[int]:
    """A stand-in server answering each classify request with one result per image (the number of images of each
    request goes into the returned list), or a 413 naming `setting` for more than `max_images`."""
    import httpx

    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        n = request.content.count(b'name="images"')
        sizes.append(n)
        if max_images is not None and n > max_images:
            error = {"code": "limit_exceeded", "message": f"more than max_images={max_images} files in one request"}
            details = {"setting": setting, "limit": max_images if setting == "max_images" else 16 * 2**20}
            return httpx.Response(413, json={"error": {**error, "details": details}})
        route = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
        return httpx.Response(200, json={"results": [{"labels": [{"label": "a", "score": 0.9}], "route": route}] * n})

    _client_on(monkeypatch, handler)
    return sizes


def _files(folder, n: int) -> list[str]:
    paths = []
    for i in range(n):
        (folder / f"{i}.png").write_bytes(b"x")
        paths.append(str(folder / f"{i}.png"))
    return paths


def test_the_client_reads_its_own_writes_with_min_generation(monkeypatch):
    """The docs promote X-Min-Generation for reading your own writes, and the client had no way to send it."""
    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("x-min-generation")))
        return httpx.Response(200, json={"results": [], "tasks": {}, "generation": 1, "task": "t", "versions": []})

    client_class = _client_on(monkeypatch, handler)
    with client_class("http://srv") as c:
        c.classify([b"x"], ["a", "b"], min_generation=7)
        c.tasks(min_generation=0)
        c.task("t", min_generation=3)
        c.classify([b"x"], ["a", "b"])  # not asked: not sent
        for bad in (-1, True, "7"):
            with pytest.raises(ValueError, match="min_generation is a store generation"):
                c.tasks(min_generation=bad)
    assert seen == [("/classify", "7"), ("/tasks", "0"), ("/tasks/t", "3"), ("/classify", None)]


def test_python_dash_m_clipbank_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "clipbank", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("clipbank "), (out.stdout, out.stderr)


def test_sigterm_stops_a_command_as_ctrl_c_does_with_its_own_exit_code(capsys, monkeypatch):
    """`docker stop` sends SIGTERM: a training run died without a word (exit -15), its temporary files left."""
    import os
    import signal

    import clipbank.cli as cli

    def work(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the work")

    monkeypatch.setattr(cli, "_data", work)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["data", "list"]) == 143
    assert "clipbank data: terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # put back


def test_train_help_names_the_backbone_it_will_use():
    """An outside check's: with CLIPBANK_BACKBONE set, `train --help` said "(default tiny)" and trained on the
    variable's backbone."""
    import os

    env = {**os.environ, "CLIPBANK_BACKBONE": "ViT-B-32:none"}
    run = [sys.executable, "-m", "clipbank", "train", "--help"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env, check=True).stdout
    assert "backbone reference (default ViT-B-32:none)" in " ".join(out.split())


def test_tasks_sub_command_help_says_what_its_flags_are(capsys):
    """`tasks activate --help` said "as before the sub-command" for --url, --token and --json."""
    from clipbank.cli import main

    with pytest.raises(SystemExit):
        main(["tasks", "activate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "as before" not in out and "admin token (default $CLIPBANK_ADMIN_TOKEN" in out and "server URL" in out


def test_reference_list_names_the_sets_a_server_may_find(tmp_path, monkeypatch, capsys):
    """An outside check's: nothing listed which reference sets exist, or for which backbone."""
    import shutil

    from clipbank.cli import main
    from model_store.reference import TINY_REFERENCE

    monkeypatch.setenv("CLIPBANK_REFERENCE_CACHE", str(tmp_path))
    shutil.copy(TINY_REFERENCE, tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_text("not one")
    assert main(["reference", "list", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["reference_sets"]
    assert [r["path"] for r in found] == [
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
        str(TINY_REFERENCE),
    ]
    assert found[0]["backbone"] == "clipbank-tiny/embedded" and found[0]["count"] == 4000
    assert not found[0]["found_by_servers"] and found[2]["found_by_servers"]  # the review's: a.safetensors is not
    assert "not a readable reference set" in found[1]["error"]
    assert main(["reference", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[2] == "4000 images" and "servers do not find it" in lines[0]


@pytest.mark.parametrize(("given", "level"), [("warning", logging.WARNING), ("trace", logging.DEBUG)])
def test_serve_log_level_reaches_clipbanks_own_loggers(monkeypatch, given, level):
    """`--log-level warning` quieted uvicorn alone: clipbank's INFO lines still came (an outside check)."""
    import service.server
    from clipbank.cli import main

    monkeypatch.setattr(service.server, "serve", lambda config: 0)
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))  # serve sets its own
    for name in ("clipbank", "model_store"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    assert main(["serve", "--log-level", given, "--store", "/tmp/unused-store"]) == 0
    assert logging.getLogger("clipbank").level == logging.getLogger("model_store").level == level


def test_the_hubs_lines_are_written_once(tmp_path):
    """huggingface_hub's own handler printed each retry line, and ours again: 10 lines per file for 5 retries."""
    import logging

    from clipbank.logs import hub_lines_once

    hub = logging.getLogger("huggingface_hub")
    before = list(hub.handlers)
    own, kept = logging.StreamHandler(), logging.FileHandler(tmp_path / "hub.log")
    hub.handlers[:] = [own, kept]
    try:
        hub_lines_once()
        assert hub.handlers == [kept]  # a handler the user added (a file) stays; the hub's stderr one goes
    finally:
        kept.close()
        hub.handlers[:] = before


def test_eval_scores_each_class_and_the_change_since_a_baseline(tmp_path, monkeypatch, capsys):
    """`clipbank eval` against a stand-in server answering "a" to every image (and 413 over 4 images a request):
    class a all right, b all wrong, every image sent once, in requests the server takes; --baseline prints the
    change, and a file that is not a report is named."""
    from clipbank.cli import main

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "data" / cls / f"{i}.png").write_bytes(b"x")
    sizes = _counting_server(monkeypatch, max_images=4)
    args = ["eval", str(tmp_path / "data"), "--url", "http://srv", "--quiet"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sizes == [10, 4, 4, 2] and report["images"] == 10 and report["accuracy"] == 0.5
    assert {c: r["accuracy"] for c, r in report["classes"].items()} == {"a": 1.0, "b": 0.0}
    assert report["routes"] == {"zero-shot": 1.0}
    report["classes"]["b"]["accuracy"], report["accuracy"] = 0.5, 0.75  # as if b had lost half since
    (tmp_path / "before.json").write_text(json.dumps(report))
    assert main([*args, "--baseline", str(tmp_path / "before.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["a", "5", "100.0%", "(+0.0"] and lines[2].split()[:4] == [
        "b",
        "5",
        "0.0%",
        "(-50.0",
    ]
    assert lines[-1].startswith("accuracy 50.0% (-25.0 pts) over 10 images"), lines
    # a CI's gate: exit 1 past --max-drop, naming what fell (an outside check's fell 7.2 points with exit 0)
    assert main([*args, "--baseline", str(tmp_path / "before.json"), "--max-drop", "30"]) == 1
    err = capsys.readouterr().err
    assert "class b: accuracy fell 50.0 points since the baseline (--max-drop 30)" in err and "overall" not in err
    assert main([*args, "--baseline", str(tmp_path / "before.json"), "--max-drop", "50"]) == 0
    assert main([*args, "--max-drop", "5"]) == 2 and "a --baseline to compare with" in capsys.readouterr().err
    assert len({line.index("routed to" if n == 0 else "zero-shot") for n, line in enumerate(lines[:3])}) == 1
    for bad in ("[1, 2]", '{"classes": {"a": 0.5}}'):
        (tmp_path / "bad.json").write_text(bad)
        assert main([*args, "--baseline", str(tmp_path / "bad.json")]) == 2
        assert "not a report of `clipbank eval --json`" in capsys.readouterr().err
    # An outside check: a missing file was "not a report"; a baseline of another folder was compared in silence;
    # a folder of one class scored 100% (its only label is every answer), whatever its images
    assert main([*args, "--baseline", str(tmp_path / "nowhere.json")]) == 2
    assert "nowhere.json: cannot be read: No such file or directory" in capsys.readouterr().err
    report["classes"] = {"zero": report["classes"]["a"], "a": report["classes"]["a"]}
    (tmp_path / "other.json").write_text(json.dumps(report))
    assert main([*args, "--baseline", str(tmp_path / "other.json")]) == 0
    assert "has other classes than" in capsys.readouterr().err
    (tmp_path / "one" / "seven").mkdir(parents=True)
    (tmp_path / "one" / "seven" / "0.png").write_bytes(b"x")
    one = ["eval", str(tmp_path / "one"), "--url", "http://srv", "--quiet"]
    assert main(one) == 2 and "every answer is right whatever the image" in capsys.readouterr().err
    assert main([*one, "--no-labels", "--json"]) == 0  # scored over the routed tasks' own classes: meaningful


def test_insights_marks_a_cluster_a_task_claims_now(capsys):
    """An outside check: a cluster that a task trained since claims (margin -0.64) was still listed, for the
    retention, as a candidate task to train, unmarked."""
    from clipbank.watch_commands import _print_insights

    reservoir = {"unclaimed": 90, "auto_images": 100, "unclaimed_share": 0.9, "embeddings": 90, "capacity": 2048}
    clusters = [
        {"id": 0, "size": 50, "share": 0.5, "nearest_task": "sketches", "margin": -0.64},
        {"id": 1, "size": 40, "share": 0.4, "nearest_task": "digits", "margin": 0.8},
    ]
    _print_insights({"reservoir": reservoir, "clusters": clusters}, 20)
    lines = capsys.readouterr().out.splitlines()
    assert "| 0 | 50 | 50.0% | sketches (claims it now) | -0.64 |" in lines
    assert "| 1 | 40 | 40.0% | digits | +0.80 |" in lines and lines[-1].startswith("1 cluster(s) a task claims now")
    # a later one: its selector claimed them, their labels sent them to zero-shot; never "served by it since"
    clusters[0]["moved_by_labels"] = 0.9
    _print_insights({"reservoir": reservoir, "clusters": clusters}, 20)
    lines = capsys.readouterr().out.splitlines()
    assert "| 0 | 50 | 50.0% | sketches (claims them; their labels are not its classes) | -0.64 |" in lines
    assert not any("claims now" in line for line in lines) and "no task serves them" in lines[-1]
    clusters[0]["moved_by_labels"] = 0.25  # a part of it: said beside "claims it now" (the review's)
    _print_insights({"reservoir": reservoir, "clusters": clusters}, 20)
    assert "| 0 | 50 | 50.0% | sketches (claims it now) (25% sent away by their labels) | -0.64 |" in (
        capsys.readouterr().out.splitlines()
    )


def test_insights_waits_for_a_clustering_that_another_request_runs(monkeypatch, capsys):
    """An outside check: two `clipbank insights` at once, and one failed with 503 "being clustered for another
    request: retry shortly". The watch commands' reads are now sent again after a 503 that says when."""
    import httpx

    from clipbank.cli import main

    calls: list[str] = []
    busy = {"error": {"code": "overloaded", "message": "being clustered for another request", "details": None}}
    answer = {"enabled": True, "reservoir": {"unclaimed": 0, "auto_images": 0, "unclaimed_share": 0}, "clusters": []}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(503, json=busy, headers={"Retry-After": "0"})
        return httpx.Response(200, json=answer)

    _client_on(monkeypatch, handler)
    assert main(["insights", "--json", "--url", "http://srv:1", "--token", "t" * 20]) == 0
    assert calls == ["/insights/unclaimed"] * 2 and json.loads(capsys.readouterr().out)["clusters"] == []


def test_a_baseline_of_other_classes_lists_them_and_says_how_many_when_cut(capsys):
    """An outside check: 'not in it: fifths, halves, quarters, sevenths, sixths' left out `thirds` with no sign."""
    from clipbank.eval_command import _say_other_classes

    now = {
        "folder": "pies",
        "classes": {c: {} for c in ("fifths", "halves", "quarters", "sevenths", "sixths", "thirds")},
    }
    _say_other_classes(now, {"classes": {"rising": {}}}, "bars.json")
    err = capsys.readouterr().err
    assert "(0 of 6 in common; not in it: fifths, halves, quarters, sevenths, sixths, ... (6 in all))" in err, err
    _say_other_classes(now, {"classes": {c: {} for c in list(now["classes"])[:5]}}, "most.json")
    assert "(5 of 6 in common; not in it: thirds)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["shadow", "t", "--version", "99999999999999999999"],
        ["tasks", "activate", "t", "0"],
        ["store", "--store", "s", "activate", "t", "2147483648"],
    ],
)
def test_a_version_out_of_range_is_a_usage_error_naming_the_range(argv, capsys):
    """An outside check: `clipbank shadow T --version 99999999999999999999` answered 'the body is not valid JSON'."""
    from clipbank.cli import main
    from clipbank.flags import LARGEST_VERSION
    from model_store.manifest import MAX_VERSION

    assert LARGEST_VERSION == MAX_VERSION
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert "a version is a whole number from 1 to 2147483647, got" in capsys.readouterr().err
