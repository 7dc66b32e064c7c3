"""The `clipbank` command: a thin layer over model_store, training and service."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import urllib.parse
from pathlib import Path

from model_store.errors import ClipbankError
from model_store.settings import env_value
from service.config import ServeConfig, unknown_variables
from service.threads import set_serving_env
from training.config import PretrainConfig, TrainJob

from .bench_commands import DEFAULT_BACKBONE, add_bench_parsers, add_reference_parser
from .classify_command import DEFAULT_URL, add_classify_parser
from .flags import UsageError, add_flags, given
from .logs import hub_lines_once, serve_logs
from .output import error_json, print_json
from .server_commands import add_server_parsers
from .store_commands import add_store_parser
from .watch_commands import add_watch_parsers


def _serve(args: argparse.Namespace) -> int:
    set_serving_env()  # before torch is imported: MKL and OpenMP read their variables once, when they load
    flags = given(ServeConfig, args)  # checked before torch loads: a bad setting is said at once (it took 6-10 s)
    config = ServeConfig.from_env(**flags)
    if config.store.startswith("s3://"):  # its endpoint, before anything loads (it was said after 25 s of start-up)
        from model_store.settings import check_s3_endpoint

        try:
            check_s3_endpoint(env_value("S3_ENDPOINT_URL"))
        except ClipbankError as e:
            raise UsageError(f"invalid server settings: {e}") from None
    serve_logs(config.log_level, config.log_format)
    if unknown := unknown_variables(os.environ):  # a log line, so that --log-format json has it as one
        logging.getLogger("clipbank.service").warning("no setting reads %s", ", ".join(unknown))
    ray_only = [
        f"--{'no-' if flags[n] is False else ''}{n.replace('_', '-')}"
        for n in ("replicas", "ray_address", "broadcast")
        if flags.get(n) is not None
    ]
    if ray_only and config.engine != "ray":  # ignored, they let a user believe the server was scaled out
        raise UsageError(
            f"{', '.join(ray_only)} {'apply' if len(ray_only) > 1 else 'applies'} only with --engine ray; this "
            "server would be one process"
        )
    from service.server import serve

    return serve(config)


def _train(args: argparse.Namespace) -> int:
    from training.run import run_train_job

    hub_lines_once()
    if not args.out and not args.store:
        raise UsageError("clipbank train: give --out FILE, --store DIR, or both")
    job = TrainJob(**given(TrainJob, args))
    summary = run_train_job(job)
    print_json(summary)
    return REFUSED if summary.get("gate_refused") else 0  # stored, but not serving: as push's 409 `interference`


def _data(args: argparse.Namespace) -> int:
    from training.domains import DOMAINS
    from training.export import export_domain

    if args.data_cmd == "list" and args.json:  # a script's (an outside check's parsed the table)
        print_json(
            [{"name": d.name, "classes": list(d.classes), "description": d.description} for d in DOMAINS.values()]
        )
        return 0
    if args.data_cmd == "list":
        for d in DOMAINS.values():
            print(f"{d.name:10s} {len(d.classes):2d} classes  {d.description}")
        return 0
    counts = export_domain(args.name, args.dir)
    print(f"wrote {args.name} to {args.dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from training.pretrain_tiny import pretrain_tiny

    if not args.out and not args.replace_embedded:
        raise ValueError(
            "give --out FILE for the new weights; --replace-embedded overwrites the shipped tiny backbone, which "
            "every bundle and the reference set trained on it depend on (they stop loading)"
        )
    cfg = PretrainConfig(**given(PretrainConfig, args))
    if args.out:  # before hours of training, not after
        from training.run import check_writable

        check_writable(Path(args.out), args.overwrite, "the weights file")
    metrics = pretrain_tiny(cfg, Path(args.out) if args.out else None)
    print_json(metrics)
    if args.out:  # was logged at INFO only, which a default run does not show
        print(f"serve these weights with --backbone file:{args.out}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    tasks = tuple(args.tasks.split(","))
    run_demo(Path(args.workdir), steps=args.steps, backbone=args.backbone, tasks=tasks, threads=args.threads)
    return 0


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a task bundle from an ImageFolder")
    add_flags(t, TrainJob)
    t.set_defaults(fn=_train, backbone=DEFAULT_BACKBONE)  # $CLIPBANK_BACKBONE, else tiny: the help says which
    for action in t._actions:
        if action.dest == "backbone":
            action.help = f"backbone reference (default {DEFAULT_BACKBONE})"


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="offline domains")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dl = dsub.add_parser("list", help="list the offline domains")
    dl.add_argument("--json", action="store_true", help="as JSON: each domain's name, classes and description")
    e = dsub.add_parser("export", help="write a domain as ImageFolder train/val/test folders")
    e.add_argument("name", help="an offline domain (clipbank data list)")
    e.add_argument("dir", help="a new or empty folder")
    d.set_defaults(fn=_data)


def _add_pretrain(sub) -> None:
    pt = sub.add_parser("pretrain-tiny", help="pretrain the embedded tiny CLIP on generated captions")
    add_flags(pt, PretrainConfig)
    pt.add_argument("--out", help="weights file to write (an existing file only with --overwrite)")
    pt.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    pt.add_argument(
        "--replace-embedded",
        action="store_true",
        help="write over the embedded tiny weights instead (its bundles and reference set then stop loading)",
    )
    pt.set_defaults(fn=_pretrain)


def _add_serve(sub) -> None:
    sv = sub.add_parser(
        "serve", help="serve /classify and the hot-swap /tasks API (every option also as CLIPBANK_<NAME>)"
    )
    add_flags(sv, ServeConfig, defaults_unset=True)
    sv.set_defaults(fn=_serve)


def _add_client(sub) -> None:
    url = env_value("url") or DEFAULT_URL
    add_server_parsers(sub, url)
    add_classify_parser(sub, url)


def _healthcheck(args: argparse.Namespace) -> int:
    from .healthcheck import check, readyz_url, server_argv, server_env

    serve = argparse.ArgumentParser(prog="clipbank serve", add_help=False)
    add_flags(serve, ServeConfig, defaults_unset=True)
    argv, source = server_argv(args.pid) if not args.url else [], ""
    if argv is None and os.environ.get("CLIPBANK_URL", "").strip():  # no server here (a host): the clients' URL
        args.url, argv = os.environ["CLIPBANK_URL"].strip(), []  # (an outside check's script polled :8000)
        source = f" (CLIPBANK_URL's: process {args.pid} is not a clipbank serve)"
    try:
        if args.url and urllib.parse.urlsplit(args.url).path in ("", "/"):  # the server's base URL, as elsewhere
            args.url = args.url.rstrip("/") + "/readyz"
        env = server_env(args.pid) if argv is not None and not args.url else None  # a host's server: its own
        url = args.url or readyz_url(argv or [], lambda a: serve.parse_known_args(a)[0], env)
    except ValueError as e:  # the environment (or CLIPBANK_URL) does not parse: no server answers there
        print(f"the server's address is unknown: {e}{source}", file=sys.stderr)
        return 1
    ready, seen = check(url, args.timeout)  # a failure on stderr (Docker's health log keeps both streams)
    said = seen + source if args.url else f"{seen} ({_address_source(args.pid, argv)})"
    print(said, file=sys.stdout if ready else sys.stderr)
    return 0 if ready else 1  # never 2: Docker reserves it


def _address_source(pid: int, argv: list[str] | None) -> str:
    """Where the asked address came from: on a host, PID 1 is not the server, and a wrong port must not look
    like a server that is down."""
    if argv is None:
        return f"process {pid} is not a clipbank serve: the address is CLIPBANK_HOST/CLIPBANK_PORT's or the default"
    return f"the address of process {pid}'s clipbank serve (its flags and environment)"


def _add_healthcheck(sub) -> None:
    hc = sub.add_parser(
        "healthcheck",
        help="exit 0 when the server answers /readyz with 200 (the image's HEALTHCHECK; the address is read from "
        "the server's command line, then CLIPBANK_HOST / CLIPBANK_PORT; with no server in process --pid, "
        "CLIPBANK_URL's)",
    )
    hc.add_argument("--pid", type=int, default=1, help="the server's process (default 1: a container's)")
    hc.add_argument("--url", help="ask this server (its base URL, or its /readyz URL) instead")
    hc.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    hc.set_defaults(fn=_healthcheck)


def _add_demo(sub) -> None:
    dm = sub.add_parser("demo", help="end to end offline: export two domains, train two tasks, route test images")
    dm.add_argument("--workdir", default="./clipbank-demo", help="data, store and report go here (default %(default)s)")
    dm.add_argument("--steps", type=int, default=500, help="training steps per task (default %(default)s)")
    dm.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone reference (default %(default)s)")
    dm.add_argument("--tasks", default="textures,glyphs", help="offline domains to train, in order")
    dm.add_argument(
        "--threads", type=int, default=0, help="CPU threads of training (0: one per core; 1 on a busy host)"
    )
    dm.set_defaults(fn=_demo)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipbank")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipbank", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument("--version", action="version", version=f"clipbank {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_train, _add_data, _add_pretrain, add_store_parser, _add_serve, _add_client):
        add(sub)
    add_bench_parsers(sub)
    add_reference_parser(sub)
    add_watch_parsers(sub, env_value("url") or DEFAULT_URL)
    _add_demo(sub)
    _add_healthcheck(sub)
    return p


AFTER_STOP = {  # what a stop leaves, where a command can say it for sure
    "train": "the bundle file and the store are each written whole or not at all: nothing half-written is left",
    "push": "the server may still apply the upload: look with `clipbank tasks` before sending it again",
    "tasks": "the server may still apply the change: look with `clipbank tasks`",
    # the servers it started are stopped on the way out; its report is written at the end
    "bench": "no report of this run was written (a report already in --out is an earlier run's; soak removes those)",
    "classify": "the answers printed before it stand (with --json, they are in its object)",
    "eval": "no accuracy was printed, nor any file written",
    "serve": "the requests it was answering were answered or refused, and the store is as its last change left it",
    "": "a file being written is left as it was",
}
# exit codes besides 0: the server refused the request (a 4xx: its code says why, e.g. `interference`; or a 503 with
# no Retry-After: an operator must act); a usage error or a local one (a file it cannot read); no answer, or the
# server failing (0, other 5xx): worth trying again later
REFUSED, USAGE, UNAVAILABLE = 1, 2, 3


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the work is, so that it stops as at Ctrl-C: temporary files removed, no half file."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a health check's usage error is exit 1 too (an unknown flag is the top parser's)
        command = next((w for w in words if not w.startswith("-")), None)  # the top-level flags take no value
        if e.code == 2 and command == "healthcheck":
            raise SystemExit(1) from None
        raise
    if sys.stdout is None:  # started with stdout closed (`>&-`): what a command prints would be lost
        if args.cmd not in ("serve", "healthcheck"):  # its log is on stderr; a health check answers by exit code
            print(f"clipbank {args.cmd}: standard output is closed; its answers would be lost", file=sys.stderr)
            return 2
        sys.stdout = open(os.devnull, "w")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("clipbank.client").setLevel(logging.INFO)  # its retries: a wait is said, not silent
    if args.cmd == "serve":  # our own progress, without open_clip's loading chatter
        for name in ("clipbank", "model_store"):
            logging.getLogger(name).setLevel(logging.INFO)
    catch = args.cmd != "serve" and threading.current_thread() is threading.main_thread()  # uvicorn has its own
    before = signal.signal(signal.SIGTERM, _terminate) if catch else None
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader that went away shows here, not as an error at the interpreter's exit
        return code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`docker stop`, a scheduler): files are cleaned up
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"clipbank {args.cmd}: {how}; {AFTER_STOP.get(args.cmd, AFTER_STOP[''])}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # the reader went away (`| head -1`): stop quietly, as a killed pipe writer would
        return _reader_gone()
    except Exception as e:
        code = None
        try:
            code = _failed(args, e)
            sys.stdout.flush()  # its error object (--json): a reader gone shows here, not at the exit
        except BrokenPipeError:  # its error object's reader went away (`tasks activate ... --json | head -5`)
            gone = _reader_gone()
            return code if code is not None else gone  # the refusal's 1 or 3, for `set -o pipefail` scripts
        if code is None:
            raise
        return code
    finally:
        if catch:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def _reader_gone() -> int:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
    return 141


def _failed(args: argparse.Namespace, e: Exception) -> int | None:
    """One line on stderr (the error's code, not Python's class name), an error object on stdout with --json, and
    the exit code (REFUSED, USAGE, UNAVAILABLE); None: not an error a command reports (a bug: its traceback)."""
    from service.client import ClipbankHTTPError

    if isinstance(e, ClipbankHTTPError):
        # a 4xx that is not clipbank's (a 404 page of another server) or a 2xx/3xx that is no clipbank answer
        # (`not_clipbank`, a redirect): the URL is wrong, a usage error
        refused = 400 <= e.status < 500 and e.code != "http_error"
        # clipbank's 503 without Retry-After: only an operator can fix it (a read-only or damaged store); it said 3,
        # "worth trying again later", beside a message that no retry would help (an SRE's)
        refused |= e.status == 503 and e.retry_after is None and e.code not in ("http_error", "not_clipbank")
        # a 501/505 that is not clipbank's: a server without POST (a static file server), the URL is wrong (it said
        # 3, and a retry loop kept trying it: an outside check)
        wrong = e.code == "http_error" and e.status in (501, 505)
        failing = (e.status == 0 or e.status >= 500) and not refused and not wrong
        said, code = str(e), REFUSED if refused else UNAVAILABLE if failing else USAGE
    elif isinstance(e, ClipbankError | ValueError | OSError):
        said, code = f"{e.code + ': ' if isinstance(e, ClipbankError) else ''}{e}", USAGE
    elif type(e).__module__.startswith("httpx"):
        said, code = str(e), UNAVAILABLE
    else:
        return None
    print(f"clipbank {args.cmd}: {said}", file=sys.stderr)
    if getattr(args, "json", False) and not getattr(e, "json_said", False):  # a script reads stdout
        print_json({"error": error_json(e)})
    return code


if __name__ == "__main__":
    sys.exit(main())
