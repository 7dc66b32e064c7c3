"""Untrained task bundles with exactly a trained bundle's shapes and compute, for serving benchmarks.

With random backbone weights (a ViT-B-32-sized benchmark) there is nothing to learn, yet the serving cost of a
bank depends only on shapes: experts per block, router widths, the selector. A synthetic bundle is built by the
trainer's own code (new experts, router initialised to prefer them, `pack_task`), with random non-zero expert
weights instead of trained ones. Its selector is an autoencoder of the usual size with a threshold so small that
it claims no image: in a benchmark the routed share is then set by pinning requests to tasks, while every
image still pays for every task's selector.
"""

from __future__ import annotations

import torch
from PIL import Image

from model_store.bank import BankSnapshot
from model_store.selector import AutoencoderSelector
from training.data import LabelledImages
from training.trainer import TrainConfig, _TaskParams, pack_task

CLAIMS_NOTHING = 1e-12  # selector threshold: error / threshold > 1 for every image


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def synthetic_bundle(bank: BankSnapshot, task: str, classes: int = 5, seed: int = 0, probe_images: int = 4) -> bytes:
    """A bundle for `task` on top of `bank` (whose experts its router may also pick), never trained."""
    cfg = TrainConfig(task=task, seed=seed)
    g = torch.Generator().manual_seed(seed)
    names = tuple(f"{task}-class-{i}" for i in range(classes))
    params = _TaskParams(bank, cfg, g)
    probe = LabelledImages(random_images(probe_images, bank.backbone.image_size, seed), [0] * probe_images, names)
    params.prefer_new(bank, probe, cfg)
    with torch.no_grad():
        for blocks in params.new.values():
            for experts in blocks:
                for e in experts:
                    e.up_w.normal_(0, 0.02, generator=g)
                    e.up_b.normal_(0, 0.02, generator=g)
    dim, h = bank.backbone.embed_dim, cfg.selector.bottleneck
    selector = AutoencoderSelector(
        torch.randn(h, dim, generator=g) * dim**-0.5,
        torch.zeros(h),
        torch.randn(dim, h, generator=g) * h**-0.5,
        torch.zeros(dim),
        threshold=CLAIMS_NOTHING,
        calibration={"synthetic": 1.0, **{k: CLAIMS_NOTHING for k in ("p50", "p90", "p95", "p99", "max")}},
    )
    report = {"synthetic": True, "note": "untrained; for serving benchmarks only"}
    return pack_task(bank, cfg, names, params, selector, report, version=1)
