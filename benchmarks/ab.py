"""This tree's server against another tree's, side by side: did a change slow serving down?

    git worktree add /tmp/before <ref>
    python -m benchmarks.ab --against /tmp/before [--rounds 5] [--backbone tiny]

Both servers run at once, each on its own store holding the same synthetic bundles, and take load in alternating
rounds (after one uncounted round each), so drifts in the machine's speed touch both alike. For each mode
(zero-shot, auto with 1 task, auto with 10 tasks; 16 clients unless told) it prints the median throughput and
p50 latency of each side and their throughput ratio (this tree / the other). The other tree runs from its own
sources (PYTHONPATH) in this interpreter; `--hide uvloop` keeps a module out of its reach, for a like-for-like
event loop when this environment has packages the other tree's did not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from service.client import ClipbankClient

from .process import server_process
from .serve import TOKEN, ServeBenchConfig, _level, _pinned_factory, _push, _zero_shot_factory
from .serve_run import default_images, prepare_backend

MODES = (("zero-shot", 0), ("auto", 1), ("auto", 10))


def _hidden(names: list[str], where: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes `import <name>` fail for each name."""
    for name in names:
        (where / name).mkdir(parents=True, exist_ok=True)
        (where / name / "__init__.py").write_text(f"raise ImportError('{name} hidden by benchmarks.ab')\n")
    return where


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", type=Path, required=True, help="the other tree's root (a git worktree)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--requests", type=int, default=400, help="requests per round, at most")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per round, at most")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--hide", action="append", default=[], help="a module the other tree must not import")
    p.add_argument("--out", type=Path, help="write the rows and ratios here as JSON")
    args = p.parse_args(argv)
    if not (args.against / "service" / "app.py").is_file():
        p.error(f"--against {args.against}: not a clipbank tree (no service/app.py)")

    tasks = max(k for _, k in MODES)
    backend = prepare_backend(args.backbone, args.backbone, tasks)
    cfg = ServeBenchConfig(
        images=default_images(), requests=args.requests, max_seconds=args.seconds, key_concurrency=args.clients
    )
    server_args = ("--backbone", backend.backbone, "--log-level", "warning", "--frozen-runtime", "torch")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        path = [str(args.against.resolve())]
        if args.hide:
            path.insert(0, str(_hidden(args.hide, Path(tmp) / "hidden")))
        sides = {"this": {}, "other": {"PYTHONPATH": ":".join(path)}}
        urls = {}
        for side, env in sides.items():
            store = Path(tmp) / side
            url, _ = stack.enter_context(server_process(store, server_args, {"CLIPBANK_ADMIN_TOKEN": TOKEN, **env}))
            urls[side] = url
        for mode, k in MODES:
            for url in urls.values():  # grow both banks to k tasks
                with ClipbankClient(url, TOKEN) as client:
                    have = len(client.tasks()["tasks"])
                    for i in range(have, k):
                        _push(client, backend.bundles[i], i, cfg.images[0])
            make = _zero_shot_factory(cfg) if k == 0 else _pinned_factory(cfg, backend.task_names[:k])
            for side, url in urls.items():  # a round each, not counted: the uploads' after-work settles
                _level(url, make, cfg.key_concurrency, cfg, server=f"{side} (warm-up)", mode=mode, tasks=k)
            for r in range(args.rounds):
                order = list(urls.items()) if r % 2 == 0 else list(urls.items())[::-1]
                for side, url in order:
                    row = _level(url, make, cfg.key_concurrency, cfg, server=side, mode=mode, tasks=k)
                    rows.append({**row, "round": r})
    result = {"rows": rows, "ratios": {}}
    for mode, k in MODES:
        mine = {s: [r for r in rows if r["server"] == s and r["mode"] == mode and r["tasks"] == k] for s in sides}
        med = {side: statistics.median(r["images_per_s"] for r in mine[side]) for side in sides}
        p50 = {side: statistics.median(r["p50_ms"] for r in mine[side]) for side in sides}
        ratio = med["this"] / med["other"]
        result["ratios"][f"{mode}-{k}"] = {**med, "ratio": round(ratio, 3), "p50_ms": p50}
        print(
            f"{mode:9s} tasks={k:2d}: this {med['this']:.1f} img/s (p50 {p50['this']:.1f} ms), other "
            f"{med['other']:.1f} (p50 {p50['other']:.1f} ms), ratio {ratio:.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
