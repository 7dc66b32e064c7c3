"""Generic outside images for the embedded tiny backbone's reference set, from its own pretraining generator.

The tiny backbone's world is its pretraining scenes: coloured shapes, letters and digits on plain or patterned
grounds. Its reference set shows a selector that world and its clutter: single scenes (half on patterned
grounds), crowded scenes on patterned or confetti-strewn grounds, and smooth noise, so a task's selector learns
its concept rather than its look.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .domains import (
    IMAGE_SIZE,
    SHAPES,
    TEXTURES,
    _rng,
    draw_shape,
    texture_array,
)
from .lookalike import clutter_background
from .pretrain_tiny import random_object_scene, render_object

KINDS = ("scene", "crowd", "noise")
SHARES = (0.5, 0.3, 0.2)


def _crowd(rng: np.random.Generator) -> Image.Image:
    """Two to five shapes of any colour and size, on a patterned or confetti ground."""
    if rng.random() < 0.5:
        img = clutter_background(rng)
    else:
        t = texture_array(TEXTURES[int(rng.integers(len(TEXTURES)))], rng)[..., None]
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = Image.fromarray((t * c1 + (1 - t) * c2).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        r = IMAGE_SIZE * rng.uniform(0.08, 0.2)
        cx, cy = rng.uniform(r, IMAGE_SIZE - r, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], cx, cy, r, fill, float(rng.uniform(-0.5, 0.5)))
    return img


def _noise(rng: np.random.Generator) -> Image.Image:
    """Smooth colour noise, or a gradient, or both."""
    cells = int(rng.choice([2, 4, 8, 16]))
    coarse = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
    img = coarse.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
    return img


def outside_images(n: int, seed: int = 0, characters: float = 0.0) -> list[Image.Image]:
    """`n` generic images of the tiny backbone's world, deterministic for a seed; `characters`: the share of
    single scenes that show a letter or digit (for a backbone pretrained with them)."""
    rng = _rng("outside", seed)
    kinds = rng.choice(len(KINDS), size=n, p=SHARES)
    out = []
    for k in kinds:
        if KINDS[k] == "scene":
            out.append(render_object(random_object_scene(rng, 0.5, characters), rng))
        else:
            out.append({"crowd": _crowd, "noise": _noise}[KINDS[k]](rng))
    return out
