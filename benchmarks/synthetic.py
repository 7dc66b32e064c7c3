"""Untrained task bundles with exactly a trained bundle's shapes and compute, for serving benchmarks.

With random backbone weights (a ViT-B-32-sized benchmark) there is nothing to learn, yet the serving cost of a
bank depends only on shapes: experts per block, router widths, the selector. A synthetic bundle is built by the
trainer's own code (new experts, router initialised to prefer them, `pack_task`), with random non-zero expert
weights instead of trained ones. Its selector is an autoencoder of the usual size, either with a threshold so
small that it claims no image (traffic is then routed by pinning requests to tasks, while every image still pays for
every task's selector), or fitted by the trainer's own `fit_selector` to a generated image family of its own
(`family_images`), so that auto traffic is really routed: the selectors decide every image.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image

from model_store.bank import BankSnapshot
from model_store.selector import AutoencoderSelector, Selector, SelectorConfig, fit_selector
from training.data import LabelledImages
from training.scoring import frozen_features
from training.trainer import TrainConfig, _TaskParams, pack_task

CLAIMS_NOTHING = 1e-12  # selector threshold: error / threshold > 1 for every image


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def family_images(family: int, n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """n images of generated family `family`: stripes of a colour pair, period and orientation of its own, with a
    random phase and pixel noise per image. Families differ in hue, brightness, period and orientation, so that
    even a random backbone's embeddings tell many of them apart (not all: neighbours can be confused)."""
    rng = np.random.default_rng([seed, family])
    hue, value = (family * 0.6180339887) % 1.0, 0.45 + 0.5 * ((family * 3) % 7) / 6
    period, vertical = 4 + (family % 5) * 5, (family // 5) % 2 == 1
    fg = np.array(colorsys.hsv_to_rgb(hue, 0.85, value))
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.6, 1.0 - value / 2))
    yy, xx = np.mgrid[0:size, 0:size]
    coord = xx if vertical else yy
    out = []
    for _ in range(n):
        stripe = (np.sin(2 * math.pi * coord / period + rng.uniform(0, 2 * math.pi)) > 0)[..., None]
        pixels = np.where(stripe, fg, bg) + rng.normal(0, 0.06, (size, size, 3))
        out.append(Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)))
    return out


def family_selector(backbone, family: int, negatives: torch.Tensor, n: int = 24) -> Selector:
    """The trainer's default selector, fitted to `n` images of the family (2/3 fit, 1/3 calibrate) with the frozen
    embeddings `negatives` (outside images) held out to cap its false claims, as training does."""
    images = family_images(family, n, backbone.image_size, seed=1)
    feats = frozen_features(backbone, LabelledImages(images, [0] * n, ("x",)))
    fit = 2 * n // 3
    return fit_selector(feats[:fit], feats[fit:], SelectorConfig(seed=family), negatives, negatives)


def synthetic_bundle(
    bank: BankSnapshot,
    task: str,
    classes: int = 5,
    seed: int = 0,
    probe_images: int = 4,
    selector: Selector | None = None,
) -> bytes:
    """A bundle for `task` on top of `bank` (whose experts its router may also pick), never trained; its selector
    is `selector`, or by default one that claims nothing."""
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
    selector = selector or AutoencoderSelector(
        torch.randn(h, dim, generator=g) * dim**-0.5,
        torch.zeros(h),
        torch.randn(dim, h, generator=g) * h**-0.5,
        torch.zeros(dim),
        threshold=CLAIMS_NOTHING,
        calibration={"synthetic": 1.0, **{k: CLAIMS_NOTHING for k in ("p50", "p90", "p95", "p99", "max")}},
    )
    report = {"synthetic": True, "note": "untrained; for serving benchmarks only"}
    return pack_task(bank, cfg, names, params, selector, report, version=1)
