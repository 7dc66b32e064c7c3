"""The `clipbank bench ...` and `clipbank reference ...` commands: thin layers over the benchmark code."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.jobs import ScaleJob, ServeBenchJob, SoakJob
from model_store.settings import env_value
from training.config import CLJob, RoutingJob

from .flags import UsageError, add_flags, given
from .output import print_json

DEFAULT_BACKBONE = env_value("backbone") or "tiny"


def bench(args: argparse.Namespace) -> int:
    """`clipbank bench cl | serve | soak | routing | scale`."""
    job = BENCHES[args.bench_cmd][0]
    job(**given(job, args))  # every setting checked before any work starts
    if getattr(args, "out", None) == "" and args.bench_cmd not in ("cl", "routing"):  # wrote into the current folder
        raise ValueError(f"--out '' prints only for cl and routing; name a folder for {args.bench_cmd}'s report")
    out = Path(args.out).absolute() if getattr(args, "out", "") else None
    made = [] if out is None else [p for p in (out, *out.parents) if not p.exists()]  # the folders it will make
    if out is not None:  # the report's folder, before minutes of work whose figures it would lose
        from training.run import writable_folder

        writable_folder(out, "--out")
    try:
        return _run_bench(args)
    except BaseException:
        with contextlib.suppress(OSError):  # a check that failed after them (an unknown method, a dataset
            for folder in made:  # missing) left them empty behind; deepest first, and only while empty
                folder.rmdir()
        raise


def _run_bench(args: argparse.Namespace) -> int:
    if args.bench_cmd == "soak":
        return _bench_soak(args)
    if args.bench_cmd == "scale":
        return _bench_scale(args)
    if args.bench_cmd == "routing":
        return _bench_routing(args)
    return _bench_cl(args) if args.bench_cmd == "cl" else _bench_serve(args)


def _bench_soak(args: argparse.Namespace) -> int:
    from benchmarks.soak import run_soak, soak_config

    given = {"minutes": args.minutes, "clients": args.clients, "swap_seconds": args.swap_seconds}
    cfg = soak_config(args.quick, args.hostile, **given)
    command = "clipbank bench soak " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "clipbank bench soak"
    report = run_soak(cfg, Path(args.out), command)
    print((Path(args.out) / "report.md").read_text())
    unmet = [name for name, goal in report["goals"].items() if not goal["met"]]
    if unmet:  # exit 0 said every goal held (a run of 6755 5xx answers did)
        print(f"clipbank bench soak: goals not met: {', '.join(unmet)}", file=sys.stderr)
    return 1 if unmet else 0


def _bench_routing(args: argparse.Namespace) -> int:
    from model_store.backbone import load_backbone
    from model_store.reference import find_reference
    from training.cl_common import comma_names
    from training.routing import KINDS, RoutingConfig, run_routing
    from training.routing_report import format_markdown, routing_keys, write_routing_report

    backbone = load_backbone(args.backbone or DEFAULT_BACKBONE, "auto")
    reference = find_reference(backbone, args.reference)
    if reference is None:
        print("clipbank bench routing: no reference set for this backbone (clipbank reference build)", file=sys.stderr)
    kinds = comma_names(args.kinds) or KINDS
    routing = routing_keys(run_routing(backbone, reference, RoutingConfig(kinds=kinds), progress=True), kinds[0])
    command = "clipbank bench routing " + " ".join(sys.argv[3:])
    if args.out:
        print("wrote " + ", ".join(str(p) for p in write_routing_report(routing, Path(args.out), command)))
    print(format_markdown(routing, command))
    return 0


def reference(args: argparse.Namespace) -> int:
    """`clipbank reference build` and `clipbank reference list`."""
    if args.reference_cmd == "list":
        return _list_references(args.json)
    from model_store.backbone import load_backbone
    from model_store.reference import cache_path, embed_images, is_reference, save_reference
    from training.data import read_rgb

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if not 0 <= args.characters <= 1:  # also refuses NaN
        raise ValueError(f"--characters is a share in [0, 1], got {args.characters}")
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the reference set's file name")
    if args.out and Path(args.out).exists() and not is_reference(args.out):  # a rebuild replaces a reference set
        raise FileExistsError(f"--out {args.out} exists and is not a reference set; give a new file name")
    if args.images and not Path(args.images).is_dir():  # before the backbone loads
        raise FileNotFoundError(
            f"--images {args.images}: {'not a folder' if Path(args.images).exists() else 'no such folder'}"
        )
    if not args.images and not args.generated:
        raise UsageError("clipbank reference build: give --images DIR or --generated")
    images, source = _reference_images(args)  # a folder's files are all read once here, before the backbone loads
    backbone = load_backbone(args.backbone, args.device)
    if hasattr(images, "sources"):  # a folder's files: JPEGs decoded at the scale the server decodes them at
        images = type(images)(images.sources, functools.partial(read_rgb, target=backbone.image_size))
    out = Path(args.out) if args.out else cache_path(backbone)
    replaced = out.exists()
    save_reference(out, embed_images(backbone, images), backbone, source)
    print(f"wrote {len(images)} embeddings of {source} for {backbone.ref.text} to {out}{' (replaced)' * replaced}")
    if len(images) < REFERENCE_MIN_IMAGES:
        print(
            f"warning: {len(images)} images is a small reference set: 30% of it calibrates every selector's "
            "threshold and measures the gate's zero-shot capture, so one image moves those figures by "
            f"{1 / max(1, round(0.3 * len(images))):.1%}; a few thousand varied images are better (the tiny "
            "backbone's has 4000)",
            file=sys.stderr,
        )
    return 0


def _list_references(as_json: bool) -> int:
    from model_store.reference import list_references

    found = list_references()
    if as_json:
        print_json({"reference_sets": found})
        return 0
    for ref in found:
        if "error" in ref:
            print(f"{ref['path']}\t-\t-\t[{ref['error']}]")
        else:
            said = f"{ref['backbone']} {ref['fingerprint'][:12]}\t{ref['count']} images\t{ref['source']}"
            unseen = "" if ref["found_by_servers"] else "\t[not under its fingerprint's name: servers do not find it]"
            print(f"{ref['path']}\t{said}{unseen}")
    return 0


def _reference_images(args: argparse.Namespace) -> tuple[Sequence, str]:
    """The images `reference build` embeds (a folder's read lazily, once each has been checked) and their source."""
    from training.data import SUFFIXES, LazyImages, read_rgb, readable_files
    from training.image_files import image_files_under

    if args.generated:
        from training.reference_images import outside_images

        source = f"training.reference_images.outside_images(characters={args.characters})"
        return outside_images(args.limit or 4000, characters=args.characters), source
    root = Path(args.images)
    files = image_files_under(root)
    if not files:
        raise FileNotFoundError(f"no images under {args.images} ({SUFFIXES})")
    files = files[: args.limit] if args.limit else files
    files = readable_files(files, args.skip_bad, "clipbank reference build --skip-bad")
    if not files:
        raise ValueError(f"no image under {args.images} can be read")
    return LazyImages(files, read_rgb), f"the images under {root.resolve()}"


REFERENCE_MIN_IMAGES = 500  # fewer: `reference build` warns


def _bench_protocol(args: argparse.Namespace) -> int:
    from model_store.backbone import load_backbone
    from training.cl_common import comma_names
    from training.cl_report import format_markdown, write_cl_report
    from training.continual import CLConfig
    from training.prompts import PromptsUnavailable, check_available
    from training.protocols import (
        CIFAR_STEPS,
        format_cifar,
        load_dataset,
        mtil_sequence,
        run_cifar_incremental,
        run_mtil,
    )

    methods = comma_names(args.methods) or CLConfig().methods
    steps = args.steps or (500 if args.shots else 1000)  # few-shot MTIL: 500 iterations; full MTIL: 1000
    cfg = CLConfig(steps=steps, methods=methods, seed=args.seed)
    if args.prompts == "papers" and args.protocol not in CIFAR_STEPS:
        try:
            check_available()
        except PromptsUnavailable as e:
            raise UsageError(f"clipbank bench cl: {e}") from None
    # the data first: a dataset missing under --data-root is said before a minute of loading ViT-B-16
    if args.protocol in CIFAR_STEPS:
        data = load_dataset(args.data_root, "cifar100", args.limit)
    else:
        seq = mtil_sequence(args.data_root, args.protocol, args.limit, shots=args.shots, prompts=args.prompts)
    backbone = load_backbone(args.backbone or "ViT-B-16:openai", args.device)
    if args.protocol in CIFAR_STEPS:
        if args.methods:
            print("clipbank bench cl: CIFAR-100 protocols run the MoE only; --methods is ignored", file=sys.stderr)
        report = run_cifar_incremental(backbone, data, args.protocol, cfg, args.prompts)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
            (Path(args.out) / "report.md").write_text(format_cifar(report))
        print(format_cifar(report))
        return 0
    report = run_mtil(backbone, seq, args.protocol, cfg, args.shots, args.prompts)
    if args.out:
        write_cl_report(report, Path(args.out), "clipbank bench cl " + " ".join(sys.argv[3:]))
    print(format_markdown(report))
    return 0


def _bench_cl(args: argparse.Namespace) -> int:
    from model_store.backbone import load_backbone
    from training.cl_job import run_offline_cl
    from training.cl_report import format_markdown, write_cl_report

    if args.protocol:
        return _bench_protocol(args)
    backbone = load_backbone(args.backbone or DEFAULT_BACKBONE, args.device)
    job = CLJob(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CLJob)})
    report = run_offline_cl(job, backbone)
    command = "clipbank bench cl " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "clipbank bench cl"
    if args.out:
        paths = write_cl_report(report, Path(args.out), command)
        print("wrote " + ", ".join(str(p) for p in paths))
    print(format_markdown(report, command))
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from benchmarks.serve import ServeBenchConfig
    from benchmarks.serve_report import missing_ratios
    from benchmarks.serve_run import default_images, run_bench_serve

    quick = args.quick
    cfg = ServeBenchConfig(
        images=default_images(),
        concurrency=(1, 16) if quick else (1, 4, 16, 64),
        growth=(0, 1, 10) if quick else (0, 1, 10, 50, 100),
        requests=args.requests or (100 if quick else 400),
        max_seconds=args.max_seconds or (10.0 if quick else 30.0),
        onnx=args.onnx,
        litserve=args.litserve,
        prefix=args.prefix,
        # the goals are the full run's: not --quick, its levels about half a second long (two quick runs in a row
        # read yes then NO on three goals), nor shorter levels or fewer backbones (the review)
        judged=not (quick or args.requests or args.max_seconds or args.tiny_only),
    )
    backbones: list[tuple[str, str | None]] = [("tiny", "tiny")]
    if not quick and not args.tiny_only:
        backbones.append(("ViT-B-32, random weights", None))
    command = "clipbank bench serve " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "clipbank bench serve"
    report = run_bench_serve(Path(args.out), cfg, backbones, command)
    print((Path(args.out) / "report.md").read_text())
    print("plots: " + ", ".join(str(Path(args.out) / p) for p in report["plots"]))
    missing = missing_ratios(report, cfg)
    if missing:
        print(f"error: report.json ratios lack {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


def _bench_scale(args: argparse.Namespace) -> int:
    from benchmarks.scale import ScaleBenchConfig, run_bench_scale, write_report

    cfg = ScaleBenchConfig(replicas=(1, 2), seconds=8.0, swaps=10) if args.quick else ScaleBenchConfig()
    command = "clipbank bench scale " + " ".join(sys.argv[3:])
    print(write_report(Path(args.out), run_bench_scale(cfg), command))
    return 0


BENCHES = {
    "serve": (ServeBenchJob, "naive baseline vs clipbank zero-shot and auto, bank growth, ONNX Runtime, FLOP bound"),
    "cl": (CLJob, "continual-learning benchmark: accuracy matrix, Transfer/Avg/Last, baselines"),
    "soak": (SoakJob, "long run under swaps: statuses, p50/p99, RSS over time; then hostile clients"),
    "routing": (RoutingJob, "routing alone: 12 tasks in turn, look-alike pairs, near outside domains"),
    "scale": (ScaleJob, "Ray Serve replicas: throughput per replica count, propagation, recovery (the [scale] extra)"),
}


def add_bench_parsers(sub) -> None:
    """`clipbank bench serve | cl | soak | routing`."""
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    for name, (job, text) in BENCHES.items():
        add_flags(bsub.add_parser(name, help=text), job)
    b.set_defaults(fn=bench)


def add_reference_parser(sub) -> None:
    """`clipbank reference build`."""
    rf = sub.add_parser("reference", help="reference sets: embeddings of generic outside images, per backbone")
    rsub = rf.add_subparsers(dest="reference_cmd", required=True)
    rb = rsub.add_parser("build", help="embed generic images with a backbone (the negatives selectors learn from)")
    rb.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone reference (default {DEFAULT_BACKBONE})")
    what = rb.add_mutually_exclusive_group()
    what.add_argument("--images", help="a folder of generic images (any depth); none of your tasks' own")
    what.add_argument("--generated", action="store_true", help="the tiny backbone's generated outside images")
    rb.add_argument("--skip-bad", action="store_true", help="--images: leave out files that cannot be read")
    rb.add_argument("--limit", type=int, help="at most this many images (generated: how many, default 4000)")
    rb.add_argument("--characters", type=float, default=0.0, help="generated: share of scenes with a letter or digit")
    rb.add_argument(
        "--out",
        help="the file (default: the backbone's place under $CLIPBANK_REFERENCE_CACHE, else "
        "$XDG_CACHE_HOME/clipbank/reference, else ~/.cache/clipbank/reference); a reference set there is replaced, "
        "any other file is refused",
    )
    rb.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    rl = rsub.add_parser("list", help="the reference sets in the cache, then the embedded one, and which servers find")
    rl.add_argument("--json", action="store_true", help="print them as JSON")
    rf.set_defaults(fn=reference)
