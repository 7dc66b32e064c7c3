"""clipbank's zero-shot serving against the LitServe peer, side by side in alternating rounds.

    python -m benchmarks.peer_ab [--rounds 5] [--seconds 30] [--clients 16] [--backbone vit-b-32|tiny]

`clipbank bench serve` measures each server once, minutes apart, so a drift in the machine's speed between them
moves `zero_shot_vs_litserve`. Here both servers run at once, on the same backbone (a seeded random ViT-B-32
checkpoint, loaded by the real path, or the tiny one), and take the same zero-shot load in turn (after one
uncounted round each), so a drift touches both alike. While one side takes load, the other's process group is
stopped (SIGSTOP, then SIGCONT): an idle LitServe server polls its worker queues, about 13% of a core here,
which would otherwise be taken from clipbank's rounds only. clipbank runs as shipped (`--frozen-runtime auto`:
ONNX Runtime on CPU). Prints each side's median throughput and p99, and the ratio per round and of the medians.
Then, with both servers stopped, each side's frozen image pass alone in this process (`model_only`): how much of
its model's speed each server delivers, and the ratio no serving work could go beyond.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .process import command_process, free_port, peer_env, server_process
from .serve import PEERS, TOKEN, ServeBenchConfig, _level, _zero_shot_factory
from .serve_run import VIT_B, default_images, random_checkpoint


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_ab", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per round, at most")
    p.add_argument("--requests", type=int, default=400, help="requests per round, at most")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--backbone", choices=("vit-b-32", "tiny"), default="vit-b-32")
    p.add_argument("--model-batch", type=int, default=16, help="batch of the model-only measurement")
    p.add_argument("--model-seconds", type=float, default=10.0, help="seconds per side and round, model only")
    p.add_argument("--out", type=Path, help="write the rows and ratios here as JSON")
    args = p.parse_args(argv)
    cfg = ServeBenchConfig(images=default_images(), requests=args.requests, max_seconds=args.seconds)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        ref = "tiny" if args.backbone == "tiny" else random_checkpoint(VIT_B, Path(tmp) / "vit-b-32.safetensors")
        clipbank_args = ("--backbone", ref, "--log-level", "warning")
        env = {"CLIPBANK_ADMIN_TOKEN": TOKEN}
        servers = {"clipbank": stack.enter_context(server_process(Path(tmp) / "store", clipbank_args, env))}
        port = free_port()
        peer = [sys.executable, "-m", PEERS["litserve"], "--backbone", ref, "--port", str(port)]
        servers["litserve"] = stack.enter_context(command_process(peer, port, peer_env()))
        make = _zero_shot_factory(cfg)
        for side, (url, _) in servers.items():  # warm-up, not counted: first batches of each size, caches
            with _alone(servers, side):
                _level(url, make, args.clients, cfg, server=f"{side} (warm-up)", mode="zero-shot")
        for r in range(args.rounds):
            for side in list(servers) if r % 2 == 0 else list(servers)[::-1]:
                with _alone(servers, side):
                    row = _level(servers[side][0], make, args.clients, cfg, server=side, mode="zero-shot")
                rows.append({**row, "round": r})
        with _alone(servers, None):
            model = model_only(ref, args.model_batch, args.model_seconds)
    result = summary(rows, args, model)
    print(json.dumps(result["ratios"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


def model_only(ref: str, batch: int, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images/s of each side's frozen image pass alone, in this process with the servers' thread count: clipbank's
    ONNX Runtime session (the export the server made, from the same cache) and PyTorch eager, as the peer runs it.
    A batch of `batch` random images, run for `seconds` per side and round, the sides alternating; the median."""
    import torch

    from model_store.backbone import load_backbone
    from model_store.onnx_runtime import with_onnx_runtime
    from service.threads import compute_threads

    backbone = load_backbone(ref, "cpu")
    torch.set_num_threads(compute_threads(0, torch.get_num_threads(), backbone.narrow))
    onnx, _ = with_onnx_runtime(backbone)
    x = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    passes = {"onnx": onnx.frozen.image, "torch": backbone.model.encode_image}
    seen: dict[str, list[float]] = {name: [] for name in passes}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in passes.items():
                run(x)  # a first run of this shape is not counted
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    run(x)
                    n += batch
                seen[name].append(n / (time.perf_counter() - start))
    return {name: round(statistics.median(v), 2) for name, v in seen.items()}


@contextmanager
def _alone(servers: dict[str, tuple[str, int]], side: str | None) -> Iterator[None]:
    """The other servers' process groups (None: all of them) stopped while `side` takes load."""
    others = [pid for name, (_, pid) in servers.items() if name != side]
    for pid in others:
        os.killpg(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.killpg(pid, signal.SIGCONT)


def summary(rows: list[dict[str, Any]], args: argparse.Namespace, model: dict[str, float]) -> dict[str, Any]:
    """Per side the median throughput and p99; the ratio of the medians and of each round; each side's served
    throughput over its model's alone, and the ratio there would be if neither server cost anything around its
    model (clipbank's ONNX Runtime pass alone over LitServe's served throughput)."""
    side = {s: [r for r in rows if r["server"] == s] for s in ("clipbank", "litserve")}
    med = {s: statistics.median(r["images_per_s"] for r in rs) for s, rs in side.items()}
    p99 = {s: statistics.median(r["p99_ms"] for r in rs) for s, rs in side.items()}
    per_round = [
        round(a["images_per_s"] / b["images_per_s"], 3) for a, b in zip(side["clipbank"], side["litserve"], strict=True)
    ]
    return {
        "command": "python -m benchmarks.peer_ab " + " ".join(sys.argv[1:]),
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "rows": rows,
        "ratios": {
            "zero_shot_vs_litserve": round(med["clipbank"] / med["litserve"], 3),
            "p99_zero_shot_vs_litserve": round(p99["clipbank"] / p99["litserve"], 3),
            "per_round": per_round,
            "images_per_s": med,
            "p99_ms": p99,
            "model_only_images_per_s": model,
            "served_vs_model_only": {
                "clipbank": round(med["clipbank"] / model["onnx"], 3),
                "litserve": round(med["litserve"] / model["torch"], 3),
            },
            "ceiling_zero_shot_vs_litserve": round(model["onnx"] / med["litserve"], 3),
        },
    }


if __name__ == "__main__":
    main(sys.argv[1:])
