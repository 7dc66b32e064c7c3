"""`clipbank shadow` and `clipbank insights`: what live traffic says, read from a running server (docs/safety.md)."""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import time
from pathlib import Path

from .classify_command import DEFAULT_URL
from .flags import ADMIN_TOKEN_HELP, add_timeout, command_timeout, command_token, version_number
from .output import print_json
from .server_commands import say_failing_gate


def _client(args: argparse.Namespace):
    from service.client import ClipbankClient

    # reads are sent again after a 503 that says when (an outside check: two `insights` at once, one got "being
    # clustered for another request"); a change (shadow --version, --stop) never is
    return ClipbankClient(args.url, command_token(args.token, "admin_token"), timeout=command_timeout(args), retries=3)


def _shadow(args: argparse.Namespace) -> int:
    from service.client import ClipbankHTTPError

    with _client(args) as client:
        if args.stop or args.version is not None:
            try:
                out = client.set_shadow(args.task, None if args.stop else args.version)
            except ClipbankHTTPError as e:
                if not (args.stop and e.code == "no_shadow"):
                    raise
                print(f"task {args.task} has no version in shadow: nothing to stop", file=sys.stderr)
                return 0  # the state asked for: a clean-up may run twice
            if args.json:
                print_json(out)
            else:
                keys = ("shadow_version", "active_version")
                shadow, active = (out[k] if out[k] is not None else "none" for k in keys)
                print(f"task {out['task']}: version in shadow {shadow}, active {active}")
            say_failing_gate(out)
            return 0
        stats = client.shadow(args.task)
    if args.json:
        print_json(stats)
        return 0
    rate = "-" if stats["claim_rate"] is None else f"{stats['claim_rate']:.1%}"
    print(f"task {stats['task']} v{stats['version']} in shadow since {stats['since']}")
    print(f"  would claim {stats['would_claim']} of {stats['images']} auto-routed images ({rate})")
    for route, n in stats["taken_from"].items():
        print(f"  taken from {route}: {n}")
    hist = stats["score_histogram"]
    bins = ", ".join(f"<={le}: {n}" for le, n in zip(hist["le"], hist["counts"], strict=True) if n)
    print(
        "  score histogram (error / threshold; <= 1 passes its threshold, and claims the image unless another "
        f"task scores lower): {bins or 'no image scored yet'}"
    )
    # an outside check: shadow said it would take 30 images from a task activated since it entered the shadow,
    # and its promotion was refused; the gate's report kept with it is of the bank of that time
    print(
        f"  promoting it (`clipbank tasks activate {stats['task']} {stats['version']}`) runs the interference gate "
        "again, on the bank as it is then"
    )
    return 0


def _insights(args: argparse.Namespace) -> int:
    if args.png is not None and (Path(args.png).suffix.lower() != ".png" or Path(args.png).is_dir()):
        raise ValueError(f"--png takes a file name ending in .png, got {args.png!r}")
    if args.png is not None and not Path(args.png).absolute().parent.is_dir():  # before a clustering, not after
        raise FileNotFoundError(f"--png {args.png}: its folder does not exist")
    if args.examples is not None:
        _check_examples_folder(Path(args.examples))
    if not 0 < args.min_share <= 1:  # the server's ranges, checked here (also refuses NaN)
        raise ValueError(f"--min-share is a share of traffic in (0, 1], got {args.min_share}")
    if not 2 <= args.min_size <= 100_000:
        raise ValueError(f"--min-size must be in [2, 100000], got {args.min_size}")
    if not 1 <= args.max_clusters <= 100:
        raise ValueError(f"--max-clusters must be in [1, 100], got {args.max_clusters}")
    with _client(args) as client:
        wanted = args.examples is not None or args.png is not None
        out = client.unclaimed(args.min_share, args.min_size, EXAMPLES if wanted else 0, args.max_clusters)
    if args.json:
        print_json(out)
    if not out["enabled"]:  # with --json too: asked-for files are not written, and the exit status says so
        skipped = " and ".join(f for f, v in (("--png", args.png), ("--examples", args.examples)) if v is not None)
        message = "the unclaimed-traffic monitor is off on this server (unclaimed_capacity=0)"
        print(message + (f"; nothing written for {skipped}" if skipped else ""), file=sys.stderr if args.json else None)
        return 1 if skipped else 0
    if not args.json:
        _print_insights(out, args.max_clusters)
    written = _write_examples(out, Path(args.examples)) if args.examples is not None else True
    if args.png is not None:
        plot_unclaimed(out, args.png)
        print(f"wrote {args.png}", file=sys.stderr)  # stdout is the answer (JSON with --json)
    return 0 if written else 1


EXAMPLES = 8  # thumbnails fetched per cluster for --examples and --png


EXAMPLES_MARKER = ".clipbank-examples"


def _check_examples_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--examples {folder} is a file: give it a folder")
    if folder.exists() and any(folder.iterdir()) and not (folder / EXAMPLES_MARKER).exists():
        raise ValueError(f"{folder} holds files clipbank did not write there: give --examples a new or empty folder")


def _write(path: Path, data: bytes) -> None:
    """The whole file or none (a full disk left 0-byte PNGs), and an error that names it."""
    from model_store.store import atomic_write

    try:
        atomic_write(path, data)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}: {path}") from None


def _write_examples(out: dict, folder: Path) -> bool:
    """Each cluster's example thumbnails as DIR/cluster-ID/N.png; False when the server keeps none (nothing could
    be written, which the exit status says)."""
    if not out["reservoir"].get("thumbnail"):
        print(
            "this server keeps no thumbnails (start it with --unclaimed-thumbnails 64 to opt in); nothing written for "
            "--examples",
            file=sys.stderr,
        )
        return False
    marker = folder / EXAMPLES_MARKER  # the folder is ours: an earlier run's thumbnails may go
    _check_examples_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for stale in folder.glob("cluster-*/*.png"):  # an earlier run's (other clusters, other users' images)
        if re.fullmatch(r"cluster-\d+", stale.parent.name) and re.fullmatch(r"\d+\.png", stale.name):
            stale.unlink()
    written = 0
    for c in out["clusters"]:
        where = folder / f"cluster-{c['id']}"
        where.mkdir(parents=True, exist_ok=True)
        for j, uri in enumerate(c.get("examples", [])):
            _write(where / f"{j}.png", base64.b64decode(uri.split(",", 1)[1]))
            written += 1
    if written:
        print(f"wrote {written} example thumbnail(s) of the clusters under {folder}", file=sys.stderr)
    else:
        print(f"no cluster, so no example thumbnail under {folder}", file=sys.stderr)
    return True


def _print_insights(out: dict, max_clusters: int) -> None:
    res = out["reservoir"]
    share = "-" if res["unclaimed_share"] is None else f"{res['unclaimed_share']:.1%}"
    since = ""
    if res.get("window_start") is not None:
        since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(res['window_start']))} UTC"
    print(
        f"{res['unclaimed']} of {res['auto_images']} auto-routed images went to zero-shot{since} ({share}); "
        f"{res['embeddings']} kept (capacity {res['capacity']})"
    )
    if not out["clusters"]:
        print("no cluster: the unclaimed traffic shows no new domain")
        return
    print("| cluster | images kept | share of traffic | nearest task | its score margin |")
    print("| --- | --- | --- | --- | --- |")
    claimed = labelled = 0
    for c in out["clusters"]:
        margin = "-" if c["margin"] is None else f"{c['margin']:+.2f}"
        nearest = c["nearest_task"] or "-"
        moved = c.get("moved_by_labels") or 0.0  # claimed by a selector, sent away by the clients' labels
        if moved >= 0.5:
            nearest, labelled = f"{nearest} (claims them; their labels are not its classes)", labelled + 1
        elif c["margin"] is not None and c["margin"] <= 0:  # its task was trained or changed since these images came
            nearest, claimed = f"{nearest} (claims it now)", claimed + 1
            nearest += f" ({moved:.0%} sent away by their labels)" if moved > 0 else ""
        print(f"| {c['id']} | {c['size']} | {c['share']:.1%} | {nearest} | {margin} |")
    if len(out["clusters"]) >= max_clusters:
        print(f"(the {max_clusters} biggest clusters; --max-clusters shows more)")
    print("a cluster is traffic no task claims that looks alike: a candidate task to train (docs/safety.md)")
    if claimed:
        print(
            f"{claimed} cluster(s) a task claims now (a margin <= 0): served by it since; such images leave the "
            "reservoir within its retention"
        )
    if labelled:  # an outside check's: such clusters were said to be "served by it since", which they never are
        print(
            f"{labelled} cluster(s) of images a task's selector claimed, sent to zero-shot CLIP because their "
            "requests' labels name none of its classes (label-aware routing): no task serves them, however the "
            "task scores them; a task trained on their classes would"
        )


def plot_unclaimed(out: dict, path: str) -> None:
    """Each cluster's share of auto traffic per time bin; below it, a row of each cluster's example thumbnails
    when the server keeps them."""
    from datetime import datetime, timezone

    from training.plots import pyplot

    plt = pyplot()
    shown = [c for c in out["clusters"] if c.get("examples")]
    fig = plt.figure(figsize=(8, 4 + 1.1 * len(shown)))
    grid = fig.add_gridspec(1 + len(shown), 1, height_ratios=[4] + [1.1] * len(shown))
    ax = fig.add_subplot(grid[0])
    step = (out.get("reservoir") or {}).get("bin_seconds")
    for c in out["clusters"]:
        points = _gaps_broken(c["over_time"], step)
        when = [datetime.fromtimestamp(t, timezone.utc) for t, _ in points]
        label = f"cluster {c['id']} ({c['size']} kept; nearest {c['nearest_task'] or '-'})"
        ax.plot(when, [100 * share for _, share in points], marker="o", label=label)
    times = {t for c in out["clusters"] for t, _ in c["over_time"]}
    if len(times) == 1:  # one time bin: matplotlib's automatic date axis would span years around it
        (t,) = times
        ax.set_xlim(datetime.fromtimestamp(t - 3600, timezone.utc), datetime.fromtimestamp(t + 3600, timezone.utc))
    ax.set_ylabel("share of auto-routed traffic (%)")
    ax.set_title(f"unclaimed traffic: {len(out['clusters'])} cluster(s)")
    if out["clusters"]:
        ax.legend(fontsize=8)
    for row, c in enumerate(shown, start=1):
        _thumbnail_row(fig, grid[row], c)
    ax.tick_params(axis="x", labelrotation=30)  # not fig.autofmt_xdate: it hides the labels of all but the last row
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    _write(Path(path), png.getvalue())


def _gaps_broken(points: list, step: float | None) -> list:
    """(time, share) points with a NaN share after each one followed by bins without auto traffic (none are
    listed), so the plot leaves a gap there instead of a straight line across it (an outside check)."""
    out: list = []
    for (t, share), following in zip(points, [*points[1:], None], strict=True):
        out.append((t, share))
        if step and following is not None and following[0] - t > 1.5 * step:
            out.append((t + step, float("nan")))
    return out


def _thumbnail_row(fig, cell, cluster: dict) -> None:
    from PIL import Image

    row = cell.subgridspec(1, EXAMPLES)
    for j, uri in enumerate(cluster["examples"][:EXAMPLES]):
        ax = fig.add_subplot(row[j])
        ax.imshow(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
        ax.set_axis_off()
        if j == 0:
            ax.set_title(f"cluster {cluster['id']}", fontsize=8, loc="left")


def add_watch_parsers(sub, url: str) -> None:
    sh = sub.add_parser("shadow", help="what a task's version in shadow would do to live traffic; or put one there")
    sh.add_argument("task")
    what = sh.add_mutually_exclusive_group()
    what.add_argument("--version", type=version_number, help="put this stored version in shadow")
    what.add_argument("--stop", action="store_true", help="stop scoring traffic with the version in shadow")
    sh.add_argument("--json", action="store_true", help="print the full JSON")
    sh.add_argument("--url", default=url, help=f"server URL ($CLIPBANK_URL, default {DEFAULT_URL})")
    sh.add_argument("--token", help=ADMIN_TOKEN_HELP)
    add_timeout(sh)
    sh.set_defaults(fn=_shadow)

    ins = sub.add_parser("insights", help="clusters of the traffic no task claims: candidate tasks to train")
    ins.add_argument(
        "--min-share", type=float, default=0.03, help="a cluster's least share of auto traffic (default 0.03)"
    )
    ins.add_argument("--min-size", type=int, default=20, help="a cluster's fewest images (default 20)")
    ins.add_argument(
        "--max-clusters", type=int, default=20, help="the most clusters listed, biggest first (default 20)"
    )
    ins.add_argument(
        "--png", help="also plot each cluster's share of traffic over time (and example thumbnails) to this PNG"
    )
    ins.add_argument(
        "--examples",
        metavar="DIR",
        help=f"write up to {EXAMPLES} thumbnails of each cluster to DIR/cluster-ID/ (servers that keep thumbnails)",
    )
    ins.add_argument("--json", action="store_true", help="print the full JSON")
    ins.add_argument("--url", default=url, help=f"server URL ($CLIPBANK_URL, default {DEFAULT_URL})")
    ins.add_argument("--token", help=ADMIN_TOKEN_HELP)
    add_timeout(ins)
    ins.set_defaults(fn=_insights)
