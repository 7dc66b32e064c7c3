"""Every answer carries X-Request-ID, and every line logged while a request is handled names it (with a time)."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from fastapi.concurrency import run_in_threadpool

from service.request_ids import LOG_FORMAT, RequestIdFilter, log_with_request_ids, uvicorn_log_config
from tests.service.conftest import AUTH, running_app

pytestmark = pytest.mark.anyio
HEX_ID = re.compile(r"[0-9a-f]{32}")


async def test_every_answer_carries_the_clients_id_or_one_the_server_made(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        mine = await c.get("/healthz", headers={"X-Request-ID": "job-7:step.2_a"})
        assert mine.status_code == 200 and mine.headers["X-Request-ID"] == "job-7:step.2_a"
        answers = [
            await c.get("/nope"),  # 404 from the router
            await c.post("/tasks"),  # 401 before any body is read
            await c.post("/tasks", headers={**AUTH, "Content-Length": str(10**12)}, content=b""),  # 413, middleware
            await c.get("/healthz", headers={"X-Request-ID": "has spaces"}),  # not echoed: replaced
            await c.get("/healthz", headers={"X-Request-ID": "x" * 129}),
            await c.get("/healthz", headers={"X-Request-ID": "d\xe9".encode("latin-1")}),
        ]
        assert [a.status_code for a in answers] == [404, 401, 413, 200, 200, 200]
        ids = [a.headers["X-Request-ID"] for a in answers]
        assert all(HEX_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids), ids
        assert mine.headers.get_list("X-Request-ID") == ["job-7:step.2_a"]  # one header, not two
        document = (await c.get("/openapi.json")).json()
        classify = document["paths"]["/classify"]["post"]
        assert "X-Request-ID" in {p["name"] for p in classify["parameters"]}
        assert "X-Request-ID" in classify["responses"]["200"]["headers"]


async def test_an_unexpected_error_answers_and_logs_with_the_id(tmp_path, backbone, caplog):
    """The review's: a 500 (Starlette's error middleware, outside every added one) had no id, nor its log line."""
    async with running_app(tmp_path, backbone) as c:

        async def broken() -> dict:
            raise RuntimeError("a bug")

        c.app.add_api_route("/broken", broken)
        caplog.handler.addFilter(RequestIdFilter())
        transport = httpx.ASGITransport(app=c.app, raise_app_exceptions=False)  # as a server answers: a 500
        with caplog.at_level(logging.ERROR):
            async with httpx.AsyncClient(transport=transport, base_url="http://clipbank") as client:
                answer = await client.get("/broken", headers={"X-Request-ID": "r-500"})
    assert answer.status_code == 500 and answer.headers["X-Request-ID"] == "r-500"
    assert answer.json()["error"]["code"] == "internal_error"
    assert [r.request_id for r in caplog.records if r.levelno >= logging.ERROR] == ["r-500"]


async def test_lines_logged_for_a_request_name_it_even_from_a_worker_thread(tmp_path, backbone, caplog):
    log = logging.getLogger("clipbank.test")

    def in_thread() -> None:
        log.warning("from a worker thread")

    async with running_app(tmp_path, backbone) as c:

        async def noisy() -> dict:
            log.warning("on the event loop")
            await run_in_threadpool(in_thread)
            return {}

        c.app.add_api_route("/noisy", noisy)
        caplog.handler.addFilter(RequestIdFilter())
        with caplog.at_level(logging.WARNING, logger="clipbank.test"):
            answer = await c.get("/noisy", headers={"X-Request-ID": "r-42"})
            log.warning("outside any request")
    assert answer.status_code == 200
    seen = {r.getMessage(): r.request_id for r in caplog.records if r.name == "clipbank.test"}
    assert seen == {"on the event loop": "r-42", "from a worker thread": "r-42", "outside any request": "-"}


def test_log_lines_have_a_time_and_the_request_id():
    record = logging.LogRecord("clipbank.service", logging.WARNING, __file__, 1, "the store is slow", None, None)
    RequestIdFilter().filter(record)
    line = logging.Formatter(LOG_FORMAT).format(record)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING clipbank.service \[-\] the store is slow", line)
    config = uvicorn_log_config()
    assert config["formatters"]["access"]["fmt"].startswith("%(asctime)s %(levelprefix)s [%(request_id)s] ")
    assert config["formatters"]["default"]["fmt"].startswith("%(asctime)s ")
    assert all("request_id" in h["filters"] for h in config["handlers"].values())
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    try:
        log_with_request_ids(logging.WARNING)
        assert root.level == logging.WARNING
        assert any(isinstance(f, RequestIdFilter) for h in root.handlers for f in h.filters)
    finally:
        root.handlers[:] = before[1]
        root.setLevel(before[0])


def test_json_log_lines_are_one_object_each_with_the_request_id_and_an_access_lines_fields(capsys):
    """`--log-format json`, for log shippers: an operator's pipeline parsed every line but the text ones."""
    import json

    from service.config import ServeConfig
    from service.request_ids import JsonLines, printed_line

    access = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/x", "1.1", 404),
        None,
    )
    RequestIdFilter().filter(access)
    line = json.loads(JsonLines().format(access))
    assert line["message"] == '1.2.3.4:5 - "GET /x HTTP/1.1" 404' and line["request_id"] == "-"
    assert (line["client"], line["method"], line["path"], line["http"], line["status"]) == (
        "1.2.3.4:5",
        "GET",
        "/x",
        "1.1",
        404,
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"]) and line["level"] == "INFO"
    try:
        raise OSError("disk full")
    except OSError:
        import sys

        failed = logging.LogRecord("clipbank.service", logging.ERROR, __file__, 1, "save %s", ("x",), sys.exc_info())
    failed.request_id = "r-1"
    line = json.loads(JsonLines().format(failed))
    assert (line["message"], line["request_id"]) == ("save x", "r-1") and "OSError: disk full" in line["exception"]
    assert json.loads(printed_line("admin token generated: t", "json"))["message"] == "admin token generated: t"
    assert printed_line("admin token generated: t", "text") == "clipbank: admin token generated: t"
    config = uvicorn_log_config("json")
    assert {f["()"] for f in config["formatters"].values()} == {JsonLines}
    from service.server import failed

    service_log = logging.getLogger("clipbank.service")
    level = service_log.level
    service_log.setLevel(logging.CRITICAL)  # `--log-level critical`: the reason is printed, as a JSON line too
    try:
        assert failed("start-up failed: no backbone", "json") == 3
    finally:
        service_log.setLevel(level)
    said = json.loads(capsys.readouterr().err)
    assert (said["level"], said["message"]) == ("ERROR", "start-up failed: no backbone")
    assert ServeConfig.from_env({"CLIPBANK_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ValueError, match="log_format must be one of text, json, got 'xml'"):
        ServeConfig(log_format="xml")
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    try:
        log_with_request_ids(logging.INFO, "json")
        assert all(isinstance(h.formatter, JsonLines) for h in root.handlers)
    finally:
        root.handlers[:] = before[1]
        root.setLevel(before[0])


async def test_behind_ray_serves_proxy_the_app_adds_no_second_id(tmp_path, backbone):
    """Ray Serve's proxy puts the client's id (or one it made) in the request's headers and adds it to the answer;
    the app added it too, so a client read `X-Request-ID: a, a` (the real proxy: tests/scale/test_ray.py)."""
    async with running_app(tmp_path, backbone, proxy_request_ids=True) as c:
        for answer in (await c.get("/healthz", headers={"X-Request-ID": "job-7"}), await c.get("/nope")):
            assert answer.headers.get_list("X-Request-ID") == [], answer.headers
    async with running_app(tmp_path, backbone) as c:  # on its own, the app answers with it
        assert (await c.get("/healthz", headers={"X-Request-ID": "job-7"})).headers.get_list("X-Request-ID") == [
            "job-7"
        ]


def test_a_log_stream_whose_reader_went_away_is_said_once_not_per_line(capsys, monkeypatch):
    """An outside check: `clipbank serve | head -c 10` answered on, but each access line then wrote a 125-line
    traceback to stderr. Said once; other errors of a handler are reported as logging reports them."""
    import os
    import subprocess
    import sys

    from service.request_ids import LinesToAClosedReader

    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w", buffering=1)
    handler = LinesToAClosedReader(stream)
    for n in range(3):
        handler.handle(logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, f"GET /x {n}", None, None))
    err = capsys.readouterr().err
    assert err.count("was closed (its reader went away): its log lines are dropped") == 1 and "Traceback" not in err
    with pytest.raises(BrokenPipeError):
        stream.close()

    class Broken:
        def write(self, text):
            raise RuntimeError("not a closed stream")

        def flush(self):
            pass

    monkeypatch.setattr(logging, "raiseExceptions", True)
    LinesToAClosedReader(Broken()).handle(logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None))
    assert "--- Logging error ---" in capsys.readouterr().err  # said as ever: no cause to go quiet
    monkeypatch.delenv("NO_COLOR", raising=False)  # the review's: a CI runner may set either
    monkeypatch.setenv("TERM", "xterm")
    config = uvicorn_log_config()
    assert {h["class"] for h in config["handlers"].values()} == {"service.request_ids.LinesToAClosedReader"}
    assert all(f.get("use_colors") is not False for f in config["formatters"].values())
    monkeypatch.setenv("NO_COLOR", "1")  # no-color.org, and TERM=dumb: an outside check saw colour codes
    assert all(f["use_colors"] is False for f in uvicorn_log_config()["formatters"].values())
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert all(f["use_colors"] is False for f in uvicorn_log_config()["formatters"].values())
    # the hub's own handler, added when open_clip first imports it (after the serve's logs were set up): gone
    probe = (
        "import logging; from clipbank.logs import serve_logs; serve_logs('info', 'json'); import open_clip; "
        "print(len(logging.getLogger('huggingface_hub').handlers))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "0", out
