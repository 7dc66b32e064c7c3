"""`clipbank classify`: image files sent to a running server CLASSIFY_CHUNK at a time (the client splits them
further when the server's 413 names a smaller max_images), the answers printed per file (or as JSON); with
--skip-bad, files it cannot read or the server refuses are listed."""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model_store.modes import AUTO, PER_IMAGE, ROUTE_MODES, TASK_MODES

from .eval_command import add_eval_parser
from .flags import READ_TOKEN_HELP, READ_TOKENS, add_timeout, command_timeout, command_token
from .output import error_json, print_json

DEFAULT_URL = "http://127.0.0.1:8000"

CLASSIFY_CHUNK = 64  # images per call: the server's default max_images (the client sends fewer after a 413)


def _classify(args: argparse.Namespace) -> int:
    from service.client import ClipbankClient

    labels = _labels(args.labels, args.label)
    args.images = _expanded(args.images)
    if args.route == "per-request" and len(args.images) > CLASSIFY_CHUNK:
        raise ValueError(f"--route per-request decides once for at most {CLASSIFY_CHUNK} images (one request)")
    results: list[dict] = []
    skipped = 0
    token, timeout = command_token(args.token, *READ_TOKENS), command_timeout(args)
    with ClipbankClient(args.url, token, timeout=timeout, retries=args.retries) as client:
        try:
            for names, answered in answers_in_requests(client, labels, args):
                skipped += sum("error" in r for r in answered)
                results += answered
                if not args.json:  # each request's answers as they come: a later request's error keeps them
                    _print_results(names, answered, args.top_k)
        except BaseException as e:  # with --json, the answers so far are kept, as the text lines are (Ctrl-C too)
            if args.json:
                print_json({"results": results, "unanswered": args.images[len(results) :], "error": error_json(e)})
                e.json_said = True  # type: ignore[attr-defined]  (`clipbank.cli` prints no second object)
            raise
    if args.json:
        print_json({"results": results})
    if skipped:
        print(f"clipbank: {skipped} of {len(args.images)} files skipped (--skip-bad); see their lines", file=sys.stderr)
    return 1 if skipped == len(args.images) else 0  # none answered: not a success


def answers_in_requests(client: Any, labels: list[str], args: argparse.Namespace) -> Iterator[tuple[list, list]]:
    """`args.images` sent CLASSIFY_CHUNK at a time (a shell glob may name more than one request holds): each
    chunk's (files, answers), in order. The client splits a chunk itself after a 413 that names a smaller
    max_images, body or answer (`service.client_wire.Batches`), except for --route per-request (one decision)."""
    for a in range(0, len(args.images), CLASSIFY_CHUNK):
        names = args.images[a : a + CLASSIFY_CHUNK]
        yield names, _classify_chunk(client, names, labels, args, a)


def _classify_chunk(client: Any, names: list[str], labels: list[str], args: argparse.Namespace, a: int) -> list[dict]:
    """One request's files (`names`, files a + 1.. of the command), each answered as `{"file", ...result}`. With
    --skip-bad, a file that cannot be read, or that the server refuses as an image (its error names the image),
    is answered `{"file", "error": {code, message}}` and the rest are answered (the client's `skip_bad`)."""
    from service.client import ClipbankHTTPError

    errors: dict[int, dict] = {}
    if args.skip_bad:
        errors = {i: why for i, n in enumerate(names) if (why := _unreadable(n)) is not None}
    pending = [i for i in range(len(names)) if i not in errors]
    answered: dict[int, dict] = {}
    if pending:
        try:
            out = client.classify([_source(names[i]) for i in pending], labels, *_options(args), skip_bad=args.skip_bad)
        except ClipbankHTTPError as e:
            raise _said_where(e, names, args, a) from None
        if not isinstance(out.get("results"), list) or len(out["results"]) != len(pending):
            raise ValueError(f"{args.url} answered without a result per image: is it a clipbank server?")
        for i, result in zip(pending, out["results"], strict=True):
            if "error" in result:  # the file is named beside the message
                errors[i] = {"code": result["error"]["code"], "message": result["error"]["message"]}
            else:
                answered[i] = result
    return [{"file": n, **(answered[i] if i in answered else {"error": errors[i]})} for i, n in enumerate(names)]


def _said_where(e: Any, names: list[str], args: argparse.Namespace, a: int) -> Any:
    """The client's error, saying which files it was about and which were answered before it."""
    from service.client import ClipbankHTTPError

    bad = (e.details or {}).get("image") if e.status in (413, 422) else None
    hint, above = "", " above" if not args.json else ""
    if isinstance(bad, int) and len(names) < len(args.images):  # images numbered within their request: say which
        hint += f" (in the request of files {a + 1}..{a + len(names)}: its image i is file {a + 1} + i"
        hint += f"; the files before it were answered{above})" if a else ")"
    elif a:  # no image to number (the server overloaded, an unknown task): say what was answered
        hint += f" (files 1..{a} were answered{above})"
    hint += "; --skip-bad leaves such files out and answers the rest" if isinstance(bad, int) else ""
    return ClipbankHTTPError(e.status, e.code, e.message + hint, e.details, e.retry_after, e.request_id)


def _options(args: argparse.Namespace) -> tuple:
    return args.task, args.route, args.top_k, args.match_labels


def _expanded(names: list[str]) -> list[str]:
    """The files named, a folder standing for the image files under it (sorted; names starting with a dot left
    out, as `train` leaves them)."""
    from training.image_files import SUFFIXES, image_files_under

    out: list[str] = []
    if names.count(STDIN) > 1:
        raise ValueError("standard input (-) holds one image: name it once")
    for name in names:
        if re.match(r"[a-z][a-z0-9+.-]*://", name, re.IGNORECASE) and not Path(name).exists():  # it read "http:/..."
            raise ValueError(f"{name[:80]} is a URL: clipbank sends image files and does not fetch URLs; download it")
        if not Path(name).is_dir():
            out.append(name)
            continue
        found = [str(p) for p in image_files_under(name)]
        if not found:
            raise ValueError(f"folder {name} holds no image files ({SUFFIXES})")
        out += found
    return out


STDIN = "-"  # `clipbank classify - < photo.jpg`: one image read from standard input
STDIN_LIMIT = 64 * 2**20  # more than any server takes in one image


@functools.cache
def _stdin_image() -> bytes:
    data = sys.stdin.buffer.read(STDIN_LIMIT + 1)
    if not data:
        raise ValueError("standard input (-) is empty: pipe an image into it, e.g. `clipbank classify - < a.jpg`")
    if len(data) > STDIN_LIMIT:
        raise ValueError(f"standard input (-) holds more than {STDIN_LIMIT // 2**20} MiB: no server takes that")
    return data


def _source(name: str) -> Path | bytes:
    """What the client sends for a file name: the file, or the bytes of standard input for `-`."""
    return _stdin_image() if name == STDIN else Path(name)


def _unreadable(name: str) -> dict | None:
    """Why the file cannot be sent (missing, a folder, no permission), or None."""
    if name == STDIN:
        return None
    try:
        with open(name, "rb") as f:
            f.read(1)
    except OSError as e:
        return {"code": "unreadable", "message": f"{name}: {e.strerror or e}"}
    return None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a count >= 0, got {text!r}")
    return int(text)


def _labels(listed: str | None, single: list[str] | None) -> list[str]:
    """`--labels a,b` splits at commas; each `--label 'a, b'` is one label as written (it may hold commas)."""
    labels = [x.strip() for x in listed.split(",") if x.strip()] if listed is not None else []
    if listed is not None and not labels:
        raise ValueError(f"--labels {listed!r} names no label; leave it out to answer with the task's classes")
    for label in single or []:
        if not label.strip():
            raise ValueError("--label '' names no label; each --label is one non-empty label")
        labels.append(label.strip())
    if len(labels) == 1 and single and "," in labels[0]:  # the server cannot tell it from `-F labels=a,b`
        raise ValueError(
            f"--label {labels[0]!r} alone: one label always scores 1.0, and a server refuses a lone label with a "
            "comma as a list sent wrongly; give at least two (--label X --label Y, or with --labels a,b)"
        )
    return labels


def _print_results(names: list[str], results: list[dict], top_k: int | None = None) -> None:
    """A line per image: its best label; with `top_k`, a line per label kept, best first (the option printed the
    best alone, the same as without it)."""
    for name, r in zip(names, results, strict=True):
        path = name if name.isprintable() else repr(name)  # a tab or newline in a name would break the columns
        if "error" in r:  # --skip-bad: left out
            print(f"{path}\t-\t-\t[skipped: {r['error']['message']}]", flush=True)
            continue
        where = f"{r['route']['task']} v{r['route']['version']}" if r["route"]["task"] else "zero-shot"
        if not r["labels"]:  # no labels sent and no task claimed the image
            print(f"{path}\t-\t-\t[{where}: no task claims it; send --labels]")
            continue
        for best in r["labels"][: top_k or 1]:
            score = "-" if best["score"] is None else f"{best['score']:.3f}"  # null: not a finite number
            label = best["label"] if best["label"].isprintable() else repr(best["label"])  # a tab would shift columns
            print(f"{path}\t{label}\t{score}\t[{where}]", flush=True)


def add_classify_parser(sub, url: str) -> None:
    """`clipbank classify`, and `clipbank eval`, which sends a labelled folder the same way."""
    cl = sub.add_parser("classify", help="classify image files with a running server")
    cl.add_argument(
        "images", nargs="+", help="image files, or folders (the image files under them); - reads one from stdin"
    )
    cl.add_argument("--labels", help="comma-separated candidate labels (default: the routed task's classes)")
    cl.add_argument(
        "--label", action="append", help="one candidate label, commas and all; repeat it, or mix it with --labels"
    )
    cl.add_argument("--task", default=AUTO, help=f"{' | '.join(TASK_MODES)} | a task name (default {AUTO})")
    cl.add_argument(
        "--route",
        default=PER_IMAGE,
        choices=ROUTE_MODES,
        help=f"auto mode: route each image on its own, or the request's images together (default {PER_IMAGE})",
    )
    cl.add_argument(
        "--top-k",
        type=int,
        help="answer only the k best labels of each image, a line each, best first (default: all; printed: the best)",
    )
    cl.add_argument(
        "--ignore-labels-in-routing",
        dest="match_labels",
        action="store_false",
        help="let the selector alone route, even to tasks that know none of --labels; a task then scores every "
        "label alone",
    )
    cl.add_argument("--url", default=url, help=f"server URL ($CLIPBANK_URL, default {DEFAULT_URL})")
    cl.add_argument("--token", help=READ_TOKEN_HELP)
    add_timeout(cl)
    cl.add_argument("--json", action="store_true", help="print every result as JSON (its file, scores and route)")
    cl.add_argument(
        "--retries",
        type=_count,
        default=3,
        help="send a request again this many times after a 503 that says when (overloaded, a replica behind, "
        "starting), after its Retry-After (default %(default)s; 0: fail at once)",
    )
    cl.add_argument(
        "--skip-bad",
        action="store_true",
        help="answer the other files when one cannot be read or the server refuses it as an image (it is listed)",
    )
    cl.set_defaults(fn=_classify)
    add_eval_parser(sub, url, _count)
