"""The `clipbank` command: a thin layer over model_store, training and service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from model_store.errors import ClipbankError

from .bench_commands import DEFAULT_BACKBONE, bench, reference

DEFAULT_STORE = os.environ.get("CLIPBANK_STORE", "./clipbank-store")
DEFAULT_URL = os.environ.get("CLIPBANK_URL", "http://127.0.0.1:8000")
SERVE_OPTIONS = (
    "store",
    "backbone",
    "host",
    "port",
    "device",
    "max_batch",
    "max_wait_ms",
    "poll_seconds",
    "log_level",
    "frozen_runtime",
)


def _serve(args: argparse.Namespace) -> int:
    from service.config import ServeConfig
    from service.server import serve

    config = ServeConfig.from_env(**{k: getattr(args, k) for k in SERVE_OPTIONS})
    return serve(config)


def _push(args: argparse.Namespace) -> int:
    from service.client import ClipbankClient

    with ClipbankClient(args.url, args.token) as client:
        print(json.dumps(client.push(Path(args.file), activate=not args.no_activate), indent=2))
    return 0


def _classify(args: argparse.Namespace) -> int:
    from service.client import ClipbankClient

    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else []
    with ClipbankClient(args.url, args.token) as client:
        out = client.classify([Path(p) for p in args.images], labels, args.task, args.route, args.top_k)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for path, r in zip(args.images, out["results"]):
        where = f"{r['route']['task']} v{r['route']['version']}" if r["route"]["task"] else "zero-shot"
        if not r["labels"]:  # no labels sent and no task claimed the image
            print(f"{path}\t-\t-\t[{where}: no task claims it; send --labels]")
            continue
        best = r["labels"][0]
        print(f"{path}\t{best['label']}\t{best['score']:.3f}\t[{where}]")
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.run import TrainJob, run_train_job

    if not args.out and not args.store:
        raise SystemExit("clipbank train: give --out FILE, --store DIR, or both")
    given = {f.name: getattr(args, f.name) for f in fields(TrainJob) if hasattr(args, f.name)}
    job = TrainJob(**given, activate=not args.no_activate)
    summary = run_train_job(job)
    print(json.dumps(summary, indent=2))
    return 0


def _data(args: argparse.Namespace) -> int:
    from training.domains import DOMAINS, export_domain

    if args.data_cmd == "list":
        for d in DOMAINS.values():
            print(f"{d.name:10s} {len(d.classes):2d} classes  {d.description}")
        return 0
    counts = export_domain(args.name, args.dir)
    print(f"wrote {args.name} to {args.dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from training.pretrain_tiny import PretrainConfig, pretrain_tiny

    metrics = pretrain_tiny(
        PretrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, characters=args.characters),
        Path(args.out) if args.out else None,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def _store(args: argparse.Namespace) -> int:
    from model_store.store import LocalStore

    store = LocalStore(args.store)
    if args.store_cmd == "list":
        print(json.dumps(store.index(), indent=2))
    elif args.store_cmd == "activate":
        print(store.activate(args.task, args.version))
    elif args.store_cmd == "deactivate":
        store.deactivate(args.task)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    run_demo(Path(args.workdir), steps=args.steps, backbone=args.backbone, tasks=tuple(args.tasks.split(",")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipbank", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a task bundle from an ImageFolder")
    t.add_argument("--task", required=True, help="task name, [a-z0-9][a-z0-9._-]{0,63}")
    t.add_argument("--data", required=True, help="ImageFolder: one sub-folder per class (_ reads as a space)")
    t.add_argument("--val", help="validation ImageFolder (default: 20%% held out of --data)")
    t.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone reference (default: tiny)")
    t.add_argument("--store", help="store folder: train on top of its bank and put the bundle there")
    t.add_argument("--out", help="also write the bundle file here")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 1e-2 for narrow backbones such as tiny, else 1e-3)",
    )
    t.add_argument("--new-experts", type=int, default=2, help="new experts per block and tower")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument(
        "--selector",
        default="autoencoder",
        choices=("autoencoder", "gaussian", "discriminative"),
        help="the task's selector kind (default: autoencoder; docs/benchmarks/routing.md compares them)",
    )
    t.add_argument("--reference", help="reference set file (default: the backbone's, if one was built or ships)")
    t.add_argument("--no-activate", action="store_true", help="store the bundle without making it active")
    t.set_defaults(fn=_train)

    d = sub.add_parser("data", help="offline domains")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dsub.add_parser("list", help="list the offline domains")
    e = dsub.add_parser("export", help="write a domain as ImageFolder train/val/test folders")
    e.add_argument("name")
    e.add_argument("dir")
    d.set_defaults(fn=_data)

    pt = sub.add_parser("pretrain-tiny", help="pretrain the embedded tiny CLIP on generated captions")
    pt.add_argument("--steps", type=int, default=4000)
    pt.add_argument("--batch-size", type=int, default=128)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out", help="weights file (default: the embedded one)")
    pt.add_argument(
        "--characters",
        type=float,
        default=0.0,
        help="share of images showing a printed letter or digit (0: the committed weights; 0.4: the reading variant)",
    )
    pt.set_defaults(fn=_pretrain)

    s = sub.add_parser("store", help="inspect or change a local store")
    s.add_argument("--store", default=DEFAULT_STORE)
    ssub = s.add_subparsers(dest="store_cmd", required=True)
    ssub.add_parser("list")
    a = ssub.add_parser("activate")
    a.add_argument("task")
    a.add_argument("version", type=int)
    dd = ssub.add_parser("deactivate")
    dd.add_argument("task")
    s.set_defaults(fn=_store)

    sv = sub.add_parser("serve", help="serve /classify and the hot-swap /tasks API (options also as CLIPBANK_* env)")
    sv.add_argument("--store", help="store folder (default ./clipbank-store)")
    sv.add_argument("--backbone", help="backbone reference (default: tiny)")
    sv.add_argument("--host", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default 8000)")
    sv.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    sv.add_argument("--max-batch", type=int, help="images per forward pass (default 64)")
    sv.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more requests (default 5)")
    sv.add_argument("--poll-seconds", type=float, help="how often to look for other servers' store changes (default 2)")
    sv.add_argument("--log-level", help="uvicorn log level (default info)")
    sv.add_argument(
        "--frozen-runtime",
        choices=["auto", "torch", "onnx"],
        help="who runs the frozen passes: auto (default) is ONNX Runtime on CPU, PyTorch on GPU",
    )
    sv.set_defaults(fn=_serve)

    pu = sub.add_parser("push", help="upload a bundle to a running server (hot-swap)")
    pu.add_argument("file")
    pu.add_argument("--url", default=DEFAULT_URL, help="server URL (default $CLIPBANK_URL or http://127.0.0.1:8000)")
    pu.add_argument(
        "--token", default=os.environ.get("CLIPBANK_ADMIN_TOKEN"), help="admin token ($CLIPBANK_ADMIN_TOKEN)"
    )
    pu.add_argument("--no-activate", action="store_true", help="store the version without routing to it")
    pu.set_defaults(fn=_push)

    cl = sub.add_parser("classify", help="classify image files with a running server")
    cl.add_argument("images", nargs="+")
    cl.add_argument("--labels", help="comma-separated candidate labels (default: the routed task's classes)")
    cl.add_argument("--task", default="auto", help="auto | zero-shot | a task name")
    cl.add_argument("--route", default="per-image", choices=["per-image", "per-request"])
    cl.add_argument("--top-k", type=int)
    cl.add_argument("--url", default=DEFAULT_URL)
    cl.add_argument("--token", default=os.environ.get("CLIPBANK_CLASSIFY_TOKEN"), help="$CLIPBANK_CLASSIFY_TOKEN")
    cl.add_argument("--json", action="store_true", help="print the full JSON response")
    cl.set_defaults(fn=_classify)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bs = bsub.add_parser(
        "serve", help="naive baseline vs clipbank zero-shot and auto, bank growth, ONNX Runtime, FLOP bound"
    )
    bs.add_argument("--out", default="runs/bench-serve", help="report.json, report.md and plots go here")
    bs.add_argument("--quick", action="store_true", help="tiny backbone only, fewer levels and tasks (about a minute)")
    bs.add_argument("--tiny-only", action="store_true", help="skip the ViT-B-32-sized backbone")
    bs.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime server")
    bs.add_argument("--requests", type=int, help="requests per load level, at most (default 400, quick 100)")
    bs.add_argument("--max-seconds", type=float, help="seconds per load level, at most (default 30, quick 10)")
    bs.set_defaults(fn=bench)
    bc = bsub.add_parser("cl", help="continual-learning benchmark: accuracy matrix, Transfer/Avg/Last, baselines")
    bc.add_argument("--quick", action="store_true", help="80 steps of 32, fewer images: about 5 minutes on 2 cores")
    bc.add_argument("--domains", default="sketches,textures,arrows,digits,glyphs", help="offline domains, in order")
    bc.add_argument("--outside", default="shapes", help="a domain no task learns (for zero-shot fallback); '' for none")
    bc.add_argument("--steps", type=int, help="training steps per task for every method (default 300)")
    bc.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    bc.add_argument("--test-limit", type=int, help="at most this many val and test images per domain")
    bc.add_argument("--backbone", help="default: tiny offline, ViT-B-16:openai for --protocol")
    bc.add_argument("--device", default="auto")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--out", help="write report.json, report.md and PNG plots here")
    bc.add_argument(
        "--no-routing",
        action="store_true",
        help="skip the long routing sequence (12 tasks, near outside domains, every selector kind; ~1 min on tiny)",
    )
    bc.add_argument(
        "--protocol",
        choices=["mtil-1", "mtil-2", "cifar100-10", "cifar100-20", "cifar100-50"],
        help="a real protocol on --data-root instead of the offline domains (use --backbone ViT-B-16:openai)",
    )
    bc.add_argument("--data-root", help="ROOT/<dataset>/{train,test}/<class>/ folders, or torchvision data")
    bc.add_argument("--limit", type=int, help="at most this many images per class (a dry run)")
    bc.set_defaults(fn=bench)
    bk = bsub.add_parser("soak", help="long run under swaps: statuses, p50/p99, RSS over time; then hostile clients")
    bk.add_argument("--minutes", type=float, help="measured soak after a 30 s warm-up (default 10, quick 0.5)")
    bk.add_argument("--clients", type=int, help="concurrent clients, one connection each (default 16)")
    bk.add_argument("--swap-seconds", type=float, help="a store change every this many seconds (default 2)")
    bk.add_argument("--hostile", type=int, help="hostile clients beside 4 normal ones; 0 skips that phase (default 4)")
    bk.add_argument("--out", default="runs/bench-soak", help="report.json, report.md, plots and the server log")
    bk.add_argument("--quick", action="store_true", help="about a minute: a 30 s soak, 10 s hostile windows")
    bk.set_defaults(fn=bench)

    br = bsub.add_parser("routing", help="routing alone: 12 tasks in turn, look-alike pairs, near outside domains")
    br.add_argument("--kinds", help="comma-separated selector kinds (default: autoencoder,gaussian,discriminative)")
    br.add_argument("--backbone", help="default: tiny")
    br.add_argument("--reference", help="reference set file (default: the backbone's, if one was built)")
    br.add_argument("--out", help="write report.json, report.md and routing.png here")
    br.set_defaults(fn=bench)

    rf = sub.add_parser("reference", help="reference sets: embeddings of generic outside images, per backbone")
    rsub = rf.add_subparsers(dest="reference_cmd", required=True)
    rb = rsub.add_parser("build", help="embed generic images with a backbone (the negatives selectors learn from)")
    rb.add_argument("--backbone", default=DEFAULT_BACKBONE)
    rb.add_argument("--images", help="a folder of generic images (any depth); none of your tasks' own")
    rb.add_argument("--generated", action="store_true", help="the tiny backbone's generated outside images")
    rb.add_argument("--limit", type=int, help="at most this many images (generated: how many, default 4000)")
    rb.add_argument("--characters", type=float, default=0.0, help="generated: share of scenes with a letter or digit")
    rb.add_argument("--out", help="the file (default: the backbone's place in ~/.cache/clipbank/reference)")
    rb.add_argument("--device", default="auto")
    rf.set_defaults(fn=reference)

    dm = sub.add_parser("demo", help="end to end offline: export two domains, train two tasks, route test images")
    dm.add_argument("--workdir", default="./clipbank-demo")
    dm.add_argument("--steps", type=int, default=500)
    dm.add_argument("--backbone", default=DEFAULT_BACKBONE)
    dm.add_argument("--tasks", default="textures,glyphs", help="offline domains to train, in order")
    dm.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.cmd == "serve":  # our own progress, without open_clip's loading chatter
        for name in ("clipbank", "model_store"):
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        return args.fn(args)
    except (ClipbankError, ValueError, OSError) as e:
        print(f"clipbank {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from service.client import ClipbankHTTPError

        if isinstance(e, ClipbankHTTPError) or type(e).__module__.startswith("httpx"):
            print(f"clipbank {args.cmd}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
