"""Offline task domains whose concepts the tiny backbone already knows (the shape and colour words of its
pretraining captions) in renderings it never saw: zero-shot gets a fair share of them right, so Transfer and
"zero-shot skill is kept" can fail on them (docs/benchmarks/cl.md)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .domains import COLORS, IMAGE_SIZE, SHAPES, Domain, _balanced, _jitter, draw_shape, texture_array

PER_CLASS = {"train": 100, "val": 20, "test": 30}
HUES = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "gray")  # `colours`' classes


def _noisy(img: Image.Image, rng: np.random.Generator, amount: int = 10) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-amount, amount + 1, (IMAGE_SIZE, IMAGE_SIZE, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _patterned_ground(rng: np.random.Generator) -> Image.Image:
    """A two-tone procedural texture in muted random colours."""
    kinds = ("stripes", "checkerboard", "dots", "waves", "grid", "speckles")
    t = texture_array(kinds[int(rng.integers(len(kinds)))], rng)[..., None]
    c1, c2 = rng.integers(60, 200, 3), rng.integers(60, 200, 3)
    return Image.fromarray((t * c1 + (1 - t) * c2).astype(np.uint8))


def _make_colours(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """A few scattered small shapes, all of the class's colour, on a plain ground of another colour."""
    rng, labels = _balanced("colours", split, len(HUES), per_class)
    images = []
    for label in labels:
        ground = [c for c in COLORS if c != HUES[label]][int(rng.integers(len(COLORS) - 1))]
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _jitter(COLORS[ground], rng, 25))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.uniform(6, IMAGE_SIZE - 6, 2)
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            draw_shape(draw, shape, cx, cy, rng.uniform(3, 7), _jitter(COLORS[HUES[label]], rng), rng.uniform(0, 6.3))
        images.append(_noisy(img, rng))
    return images, labels


def _make_zoomed(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """One shape at a scale pretraining never used: tiny, or so large that the frame crops it, on a pattern."""
    rng, labels = _balanced("zoomed", split, len(SHAPES), per_class)
    images = []
    for label in labels:
        img = _patterned_ground(rng)
        draw = ImageDraw.Draw(img)
        big = rng.random() < 0.5
        r = IMAGE_SIZE * (rng.uniform(0.4, 0.5) if big else rng.uniform(0.09, 0.12))
        margin = IMAGE_SIZE * 0.2 if big else r * 1.3
        cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, 2) if not big else IMAGE_SIZE / 2 + rng.uniform(-8, 8, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        edge = (10, 10, 10) if sum(fill) > 300 else (245, 245, 245)
        draw_shape(draw, SHAPES[label], cx, cy, r + 1.5, edge, 0.0)  # a rim, so the shape reads on any ground
        draw_shape(draw, SHAPES[label], cx, cy, r, fill, 0.0)
        images.append(_noisy(img, rng))
    return images, labels


def _make_crowds(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """Two to four copies of one shape, each in its own colour and size, on a blurred two-tone ground."""
    rng, labels = _balanced("crowds", split, len(SHAPES), per_class)
    names = list(COLORS)
    images = []
    for label in labels:
        img = _patterned_ground(rng).filter(ImageFilter.GaussianBlur(1.5))
        draw = ImageDraw.Draw(img)
        n = int(rng.integers(2, 5))
        for i in range(n):
            a = 2 * math.pi * i / n + rng.uniform(-0.4, 0.4)
            cx, cy = IMAGE_SIZE / 2 + 17 * math.cos(a), IMAGE_SIZE / 2 + 17 * math.sin(a)
            colour = COLORS[names[int(rng.integers(len(names)))]]
            draw_shape(draw, SHAPES[label], cx, cy, rng.uniform(6, 10), _jitter(colour, rng), rng.uniform(-0.3, 0.3))
        images.append(_noisy(img, rng))
    return images, labels


KNOWN_DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("colours", HUES, "known concept: small shapes all of one colour", _make_colours, PER_CLASS),
        Domain("zoomed", SHAPES, "known concept: one shape, tiny or cropped large", _make_zoomed, PER_CLASS),
        Domain("crowds", SHAPES, "known concept: copies of one shape in mixed colours", _make_crowds, PER_CLASS),
    )
}
KNOWN_CONCEPT = (*KNOWN_DOMAINS, "clutter")  # the domains whose zero-shot accuracy is between 40% and 90%
