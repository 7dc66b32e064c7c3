"""Offline image domains: generated or shipped by packages, with deterministic train/val/test splits."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 190),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "bar")
SIZES = ("small", "large")
# Background patterns of the pretraining scenes. Captions name them with these words, which differ from the
# class names of the `textures` domain, so that domain is only partly covered by the tiny backbone.
PATTERNS = ("plain", "lined", "checkered", "spotted", "wavy", "gridded", "speckled")


def _rng(*key: object) -> np.random.Generator:
    """A generator seeded by a stable hash of `key`, so every split is the same on every machine."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rot: float) -> None:
    """Draw one filled shape of radius about `r` centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        w = max(2.0, r * 0.35)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(w))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 4, math.pi / 4), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, [r * 1.25, r * 0.8] * 2, 0.0), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 3, -math.pi / 2 + rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.25, r * 0.5] * 5, -math.pi / 2 + rot), fill=fill)
    elif shape == "cross":
        a = r * 0.35
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    elif shape == "bar":
        draw.rectangle([cx - r * 1.3, cy - r * 0.3, cx + r * 1.3, cy + r * 0.3], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@dataclass(frozen=True)
class ShapeScene:
    """The attributes of one generated shape image; the caption vocabulary of the tiny backbone."""

    color: int
    shape: int
    size: int
    background: int
    pattern: int = 0  # index into PATTERNS; 0 is a plain background


def random_scene(rng: np.random.Generator, pattern_rate: float = 0.0) -> ShapeScene:
    color = int(rng.integers(len(COLORS)))
    bg = int(rng.integers(len(COLORS) - 1))
    bg = bg + 1 if bg >= color else bg
    pattern = int(rng.integers(1, len(PATTERNS))) if rng.random() < pattern_rate else 0
    return ShapeScene(color, int(rng.integers(len(SHAPES))), int(rng.integers(len(SIZES))), bg, pattern)


def _background(scene: ShapeScene, rng: np.random.Generator, size: int) -> Image.Image:
    base = np.array(_jitter(COLORS[list(COLORS)[scene.background]], rng, 25), dtype=np.float32)
    if scene.pattern == 0:
        return Image.new("RGB", (size, size), tuple(int(v) for v in base))
    other = base * 0.55 + (255.0 if base.mean() < 128 else 0.0) * 0.45  # a lighter or darker shade of the colour
    t = texture_array(TEXTURES[scene.pattern - 1], rng, size)[..., None]
    return Image.fromarray((t * other + (1 - t) * base).astype(np.uint8))


def render_scene(scene: ShapeScene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Render one coloured shape on a plain or patterned, slightly noisy background."""
    names = list(COLORS)
    img = _background(scene, rng, size)
    draw = ImageDraw.Draw(img)
    r = size * (rng.uniform(0.12, 0.2) if scene.size == 0 else rng.uniform(0.27, 0.36))
    margin = r * 1.3
    cx, cy = rng.uniform(margin, size - margin, 2) if size - 2 * margin > 1 else (size / 2, size / 2)
    fill = _jitter(COLORS[names[scene.color]], rng)
    draw_shape(draw, SHAPES[scene.shape], cx, cy, r, fill, float(rng.uniform(-0.3, 0.3)))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (size, size, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------- task domains


@dataclass(frozen=True)
class Domain:
    """A labelled offline domain. `make(split, rng)` returns (images, labels) for that split, deterministically."""

    name: str
    classes: tuple[str, ...]
    description: str
    make: Callable[[str, int], tuple[list[Image.Image], list[int]]]
    per_class: dict[str, int]

    def split(self, split: str) -> tuple[list[Image.Image], list[int]]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.make(split, self.per_class[split])


def _balanced(name: str, split: str, n_classes: int, per_class: int) -> tuple[np.random.Generator, list[int]]:
    rng = _rng(name, split)
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    rng.shuffle(labels)
    return rng, labels


def _make_shapes(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    rng, labels = _balanced("shapes", split, len(SHAPES), per_class)
    images = []
    for label in labels:
        scene = random_scene(rng)
        images.append(render_scene(ShapeScene(scene.color, label, scene.size, scene.background), rng))
    return images, labels


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _make_digits(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = _rng("digits", "order").permutation(len(data.target))
    n = len(order)
    bounds = {"train": (0, int(0.6 * n)), "val": (int(0.6 * n), int(0.8 * n)), "test": (int(0.8 * n), n)}
    lo, hi = bounds[split]
    idx = order[lo:hi]
    rng = _rng("digits", split)
    images, labels = [], []
    for i in idx:
        grey = (data.images[i] / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")
        tint = np.array(_jitter((200, 200, 255), rng, 50), dtype=np.float32) / 255.0
        images.append(Image.fromarray((np.asarray(img, dtype=np.float32) * tint).astype(np.uint8)))
        labels.append(int(data.target[i]))
    return images, labels


def _font_paths() -> list[str]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    wanted = (
        "DejaVuSans.ttf",
        "DejaVuSans-Bold.ttf",
        "DejaVuSerif.ttf",
        "DejaVuSerif-Italic.ttf",
        "DejaVuSansMono.ttf",
        "STIXGeneral.ttf",
        "STIXGeneralBol.ttf",
        "cmr10.ttf",
        "cmss10.ttf",
    )
    return [str(folder / f) for f in wanted if (folder / f).exists()]


GLYPHS = ("A", "E", "G", "K", "M", "R")


def glyph_images(name: str, letters: str | tuple[str, ...], split: str, per_class: int) -> tuple[list, list[int]]:
    """Light letters on a dark ground, one class per letter, in the fonts matplotlib ships; fonts are split
    too, so the test split holds fonts never seen in training."""
    fonts = _font_paths()
    by_split = {"train": fonts[:-3] or fonts, "val": fonts[-3:-1] or fonts, "test": fonts[-1:] or fonts}
    rng, labels = _balanced(name, split, len(letters), per_class)
    images = []
    for label in labels:
        font = ImageFont.truetype(str(rng.choice(by_split[split])), int(rng.integers(34, 50)))
        bg = int(rng.integers(0, 90))
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (bg, bg, bg))
        draw = ImageDraw.Draw(img)
        fg = tuple(int(v) for v in rng.integers(160, 256, 3))
        off = rng.integers(-5, 6, 2)
        draw.text((IMAGE_SIZE / 2 + off[0], IMAGE_SIZE / 2 + off[1]), letters[label], font=font, fill=fg, anchor="mm")
        images.append(img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=(bg, bg, bg)))
    return images, labels


def _make_glyphs(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    return glyph_images("glyphs", GLYPHS, split, per_class)


TEXTURES = ("stripes", "checkerboard", "dots", "waves", "grid", "speckles")


def texture_array(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A grey-level texture in [0, 1] of the given kind with random period, phase and angle."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, math.pi)
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    p = rng.uniform(6, 12)
    ph = rng.uniform(0, 2 * math.pi)
    if kind == "stripes":
        return (np.sin(2 * math.pi * u / p + ph) > 0).astype(np.float32)
    if kind == "checkerboard":
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if kind == "dots":
        return ((((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2) < (p / 2.8) ** 2).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * math.pi * (u + 3 * np.sin(2 * math.pi * v / (2.5 * p))) / p + ph)
    if kind == "grid":  # thin lines far apart, so a grid never reads as a field of tiles
        p = p * 1.4
        return (((u % p) < 2.0) | ((v % p) < 2.0)).astype(np.float32)
    if kind == "speckles":
        return (rng.random((size, size)) > 0.7).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}; known: {', '.join(TEXTURES)}")


def _make_textures(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    rng, labels = _balanced("textures", split, len(TEXTURES), per_class)
    images = []
    for label in labels:
        t = texture_array(TEXTURES[label], rng)[..., None]
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        arr = t * c1 + (1 - t) * c2 + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 1))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        images.append(img.filter(ImageFilter.GaussianBlur(0.6)))
    return images, labels


def ink_on_paper(strokes: Image.Image, rng: np.random.Generator) -> Image.Image:
    """An "L" mask of strokes (255 = ink) as ink of a random dark colour on noisy paper, slightly blurred."""
    paper = rng.uniform(200, 255) + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 1))
    ink = rng.uniform(0, 110, 3)
    t = (np.asarray(strokes, np.float32) / 255.0)[..., None]
    arr = t * ink + (1 - t) * paper
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))


def outline_of(mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The outline of a filled "L" mask, 3 or 5 pixels wide."""
    width = int(rng.integers(1, 3)) * 2 + 1
    return Image.fromarray(
        (np.asarray(mask, np.float32) - np.asarray(mask.filter(ImageFilter.MinFilter(width)), np.float32)).astype(
            np.uint8
        )
    )


def _make_sketches(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """Shape outlines in ink on paper: the names the tiny backbone knows, drawn in a way it never saw."""
    rng, labels = _balanced("sketches", split, len(SHAPES), per_class)
    images = []
    for label in labels:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        r = IMAGE_SIZE * rng.uniform(0.2, 0.34)
        cx, cy = rng.uniform(r * 1.3, IMAGE_SIZE - r * 1.3, 2)
        draw_shape(ImageDraw.Draw(mask), SHAPES[label], cx, cy, r, 255, float(rng.uniform(-0.5, 0.5)))
        images.append(ink_on_paper(outline_of(mask, rng), rng))
    return images, labels


ARROWS = ("right", "down right", "down", "down left", "left", "up left", "up", "up right")


def _make_arrows(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """Arrows pointing in one of 8 directions, in random colours."""
    rng, labels = _balanced("arrows", split, len(ARROWS), per_class)
    images = []
    for label in labels:
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
        bg = tuple(int(255 - v) for v in fg)
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
        draw = ImageDraw.Draw(img)
        a = label * math.pi / 4 + rng.uniform(-0.15, 0.15)
        length = rng.uniform(0.32, 0.42) * IMAGE_SIZE
        cx, cy = IMAGE_SIZE / 2 + rng.uniform(-5, 5, 2)
        dx, dy = math.cos(a) * length, math.sin(a) * length
        tail, tip = (cx - dx, cy - dy), (cx + dx, cy + dy)
        draw.line([tail, tip], fill=fg, width=int(rng.integers(3, 6)))
        h = length * 0.45
        wings = [(tip[0] - h * math.cos(a + s), tip[1] - h * math.sin(a + s)) for s in (0.45, -0.45)]
        draw.polygon([tip, wings[0], wings[1]], fill=fg)
        images.append(img)
    return images, labels


DOMAINS: dict[str, Domain] = {
    "shapes": Domain(
        "shapes",
        SHAPES,
        "coloured shapes: the tiny backbone's own pretraining domain",
        _make_shapes,
        {"train": 50, "val": 20, "test": 30},
    ),
    "digits": Domain(
        "digits",
        DIGIT_NAMES,
        "scikit-learn's 8x8 handwritten digits, upsampled and tinted",
        _make_digits,
        {"train": 0, "val": 0, "test": 0},
    ),
    "glyphs": Domain(
        "glyphs",
        tuple(f"letter {g.lower()}" for g in GLYPHS),
        "letters rendered with the fonts matplotlib ships; test fonts are unseen",
        _make_glyphs,
        {"train": 150, "val": 20, "test": 30},
    ),
    "textures": Domain(
        "textures",
        TEXTURES,
        "procedural textures in random colours",
        _make_textures,
        {"train": 150, "val": 20, "test": 30},
    ),
    "sketches": Domain(
        "sketches",
        SHAPES,
        "shape outlines in ink on paper: names the tiny backbone knows, a style it never saw",
        _make_sketches,
        {"train": 100, "val": 20, "test": 30},
    ),
    "arrows": Domain(
        "arrows",
        tuple(f"arrow pointing {d}" for d in ARROWS),
        "arrows pointing in 8 directions, in random colours",
        _make_arrows,
        {"train": 100, "val": 20, "test": 30},
    ),
}


def get_domain(name: str) -> Domain:
    """Look a domain up by name, with an error that lists the known ones."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(sorted(DOMAINS))}") from None


def class_folder(name: str) -> str:
    """The ImageFolder folder name of a class: spaces become underscores."""
    return name.replace(" ", "_")


def _register_more() -> None:
    """The look-alike, near outside and known-concept domains build on the helpers above, in modules of their own."""
    from .known_domains import KNOWN_DOMAINS
    from .lookalike import LOOKALIKE_DOMAINS

    DOMAINS.update({**LOOKALIKE_DOMAINS, **KNOWN_DOMAINS})


_register_more()
