"""`clipbank eval`: a labelled ImageFolder sent to a running server, scored as served.

Each image is sent as `clipbank classify` sends it (with the folder's class names as labels, unless
--no-labels), and its best label compared with its folder's class (matched as routing matches labels: case,
`_` and Unicode spelling aside). Printed per class: images, accuracy, and where they were routed; `--json` writes
the whole report, and `--baseline FILE` (an earlier `--json`) prints each figure's change: run it before and after
a push to see what a new version cost the tasks that were there."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from model_store.labels import label_key
from model_store.modes import AUTO, PER_IMAGE, TASK_MODES

from .flags import READ_TOKEN_HELP, READ_TOKENS, add_timeout, command_timeout, command_token

ZERO_SHOT_ROUTE = "zero-shot"


def _eval(args: argparse.Namespace) -> int:
    from service.client import ClipbankClient
    from training.data import list_image_folder
    from training.progress import progress_bar

    from .classify_command import answers_in_requests

    listing = list_image_folder(args.folder)
    if not listing.paths:
        raise ValueError(f"image folder {args.folder} holds no image files")
    if len(listing.classes) < 2 and not args.no_labels:  # an outside check: 30 zeros in "seven/" scored 100%
        raise ValueError(
            f"image folder {args.folder} has one class, {listing.classes[0]!r}: sent as the only label, every answer "
            "is right whatever the image. Add the other classes' folders, or score over the routed tasks' own "
            "classes with --no-labels"
        )
    if args.max_drop is not None and (not args.baseline or not 0 <= args.max_drop < float("inf")):
        raise ValueError(
            f"--max-drop takes a number of points >= 0 and a --baseline to compare with, got {args.max_drop}"
        )
    baseline = _read_baseline(args.baseline) if args.baseline else None
    labels = [] if args.no_labels else list(listing.classes)
    send = argparse.Namespace(  # what `classify` would be given: a file the server refuses is counted, not fatal
        task=args.task, route=PER_IMAGE, top_k=1, match_labels=args.match_labels, skip_bad=True, json=True, url=args.url
    )
    send.images = names = [str(p) for p in listing.paths]
    results: list[dict] = []
    with (
        ClipbankClient(
            args.url, command_token(args.token, *READ_TOKENS), timeout=command_timeout(args), retries=args.retries
        ) as client,
        progress_bar(total=len(names), unit="image", desc=f"eval {listing.root.name}", disable=args.quiet) as bar,
    ):
        for _, answered in answers_in_requests(client, labels, send):
            results += answered
            bar.update(len(answered))
    report = score(results, [listing.classes[i] for i in listing.labels], listing.classes)
    report.update(folder=str(listing.root), task=args.task, labels="none" if args.no_labels else "the folder's classes")
    if baseline is not None:
        report["baseline"] = {"file": args.baseline, "accuracy": baseline.get("accuracy")}
        _say_other_classes(report, baseline, args.baseline)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report, baseline)
    return 1 if baseline is not None and args.max_drop is not None and _dropped(report, baseline, args.max_drop) else 0


def _dropped(report: dict, baseline: dict, points: float) -> bool:
    """Whether the overall accuracy, or a class's, fell more than `points` since `baseline` (each said on stderr):
    `--max-drop`, a CI's gate (an outside check's fell 7.2 points with exit 0)."""
    before = baseline.get("classes") or {}
    rows = [("overall", report.get("accuracy"), baseline.get("accuracy"))] + [
        (f"class {c}", row.get("accuracy"), (before.get(c) or {}).get("accuracy"))
        for c, row in report["classes"].items()
    ]
    fell = [
        (what, (was - now) * 100)
        for what, now, was in rows
        if isinstance(now, int | float) and isinstance(was, int | float) and (was - now) * 100 > points
    ]
    for what, by in fell:
        print(f"{what}: accuracy fell {by:.1f} points since the baseline (--max-drop {points:g})", file=sys.stderr)
    return bool(fell)


def score(results: list[dict], truth: list[str], classes: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy over the answered images (a refused file is counted apart), per class and overall, with where the
    images were routed (a task's name, or zero-shot)."""
    per: dict[str, dict[str, Any]] = {c: {"images": 0, "correct": 0, "routes": Counter()} for c in classes}
    refused: list[dict] = []
    versions: dict[str, set] = {}  # which version of each task answered: what a baseline is compared across
    for r, cls in zip(results, truth, strict=True):
        if "error" in r:
            refused.append({"file": r["file"], "message": r["error"]["message"]})
            continue
        row = per[cls]
        row["images"] += 1
        best = r["labels"][0]["label"] if r["labels"] else None  # none: unlabelled, and no task claimed it
        row["correct"] += best is not None and label_key(best) == label_key(cls)
        row["routes"][r["route"]["task"] or ZERO_SHOT_ROUTE] += 1
        if r["route"]["task"] is not None:
            versions.setdefault(r["route"]["task"], set()).add(r["route"]["version"])
    answered = sum(row["images"] for row in per.values())
    routes: Counter = sum((row["routes"] for row in per.values()), Counter())
    return {
        "images": answered,
        "accuracy": _share(sum(row["correct"] for row in per.values()), answered),
        "routes": {k: _share(n, answered) for k, n in routes.most_common()},
        "versions": {t: sorted(v) for t, v in sorted(versions.items())},
        "classes": {
            c: {
                "images": row["images"],
                "accuracy": _share(row["correct"], row["images"]),
                "routes": {k: _share(n, row["images"]) for k, n in row["routes"].most_common()},
            }
            for c, row in per.items()
        },
        "refused": refused,
    }


def _versions(versions: dict) -> str:
    return ", ".join(f"{t} v{'/'.join(map(str, v))}" for t, v in versions.items()) or "zero-shot only"


def _share(n: int, of: int) -> float | None:
    return round(n / of, 4) if of else None


def _say_other_classes(report: dict, baseline: dict, path: str) -> None:
    """On stderr: a baseline of other classes (another folder, say), whose overall change compares unlike sets."""
    now, before = set(report["classes"]), set(baseline["classes"])
    if now != before:
        only = sorted(now - before)
        shown = ", ".join(only[:5]) + (f", ... ({len(only)} in all)" if len(only) > 5 else "")
        print(
            f"--baseline {path} has other classes than {report['folder']} ({len(now & before)} of {len(now)} in "
            f"common{'; not in it: ' + shown if only else ''}): its overall change compares unlike sets",
            file=sys.stderr,
        )


def _read_baseline(path: str) -> dict:
    try:
        baseline = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--baseline {path}: cannot be read: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"--baseline {path}: not a report of `clipbank eval --json` ({e})") from None
    classes = baseline.get("classes") if isinstance(baseline, dict) else None
    if not isinstance(classes, dict) or not all(isinstance(row, dict) for row in classes.values()):
        raise ValueError(f"--baseline {path}: not a report of `clipbank eval --json` (no 'classes' of rows)")
    return baseline


def _change(now: float | None, before: Any) -> str:
    if now is None or not isinstance(before, (int, float)):
        return ""
    return f" ({(now - before) * 100:+.1f} pts)"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_report(report: dict, baseline: dict | None = None) -> None:
    """A line per class: images, accuracy (with its change since `baseline`, in points), and its main routes."""
    before = (baseline or {}).get("classes", {})
    width = max(len("class"), *(len(c) for c in report["classes"]))
    accuracies = {  # in percent, as the change beside it is in points (an outside check read "0.600 (-3.3)")
        c: _percent(row["accuracy"]) + _change(row["accuracy"], (before.get(c) or {}).get("accuracy"))
        for c, row in report["classes"].items()
    }
    column = max(len("accuracy"), *(len(a) for a in accuracies.values()))  # a change widens it: still aligned
    print(f"{'class':<{width}}  images  {'accuracy':<{column}}  routed to")
    for c, row in report["classes"].items():
        routes = ", ".join(f"{k} {v:.0%}" for k, v in list(row["routes"].items())[:3])
        print(f"{c:<{width}}  {row['images']:>6}  {accuracies[c]:<{column}}  {routes}")
    overall = _percent(report["accuracy"]) + _change(report["accuracy"], (baseline or {}).get("accuracy"))
    routes = ", ".join(f"{k} {v:.0%}" for k, v in report["routes"].items())
    print(f"\naccuracy {overall} over {report['images']} images (labels: {report['labels']}); routed: {routes}")
    if report["versions"] or (baseline or {}).get("versions"):
        print(f"answered by {_versions(report['versions'])}", end="")
        print(f" (baseline: {_versions(baseline['versions'])})" if (baseline or {}).get("versions") else "")
    if report["refused"]:
        n = len(report["refused"])
        print(f"{n} file{'s' * (n != 1)} refused by the server, not scored:", file=sys.stderr)
        for r in report["refused"][:5]:
            print(f"  {r['file']}: {r['message']}", file=sys.stderr)


def add_eval_parser(sub, url: str, retries: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a running server on a labelled ImageFolder: accuracy per class and where images were routed",
    )
    ev.add_argument("folder", help="an ImageFolder: one sub-folder per class, named as the class")
    ev.add_argument("--task", default=AUTO, help=f"{' | '.join(TASK_MODES)} | a task name (default {AUTO})")
    ev.add_argument(
        "--no-labels",
        action="store_true",
        help="send no labels: each image is answered with its routed task's classes, as for a client that sends none",
    )
    ev.add_argument(
        "--ignore-labels-in-routing",
        dest="match_labels",
        action="store_false",
        help="let the selector alone route, even to tasks that know none of the folder's classes; a task then "
        "scores every label alone",
    )
    ev.add_argument("--baseline", help="an earlier `clipbank eval --json` report: print each accuracy's change")
    ev.add_argument(
        "--max-drop",
        type=float,
        metavar="POINTS",
        help="with --baseline: exit 1 when the overall accuracy, or a class's, fell more than POINTS points (CI)",
    )
    ev.add_argument("--json", action="store_true", help="print the report as JSON (for --baseline later)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--url", default=url, help="server URL ($CLIPBANK_URL)")
    ev.add_argument("--token", help=READ_TOKEN_HELP)
    add_timeout(ev)
    ev.add_argument("--retries", type=retries, default=3, help="as for `classify` (default %(default)s)")
    ev.set_defaults(fn=_eval)
