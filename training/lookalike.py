"""More offline domains for routing: look-alike task pairs, and near outside domains that share a task's look
but not its concept (the traffic a selector fitted on its own task alone would capture)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .domains import (
    IMAGE_SIZE,
    Domain,
    _balanced,
    _font_paths,
    _jitter,
    draw_shape,
    glyph_images,
    ink_on_paper,
    outline_of,
)

PER_CLASS = {"train": 100, "val": 20, "test": 30}
GLYPHS2 = ("B", "D", "H", "N", "P", "S")  # beside `glyphs` (A E G K M R): a look-alike pair
OTHER_LETTERS = ("C", "F", "J", "L", "T", "U", "W", "X", "Y", "Z")  # in no task: the near outside domain
CLUTTER_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
TEXTURES2 = ("zigzag", "bricks", "plaid", "rings", "blobs", "crosshatch")
DICE = ("one", "two", "three", "four", "five", "six")
HOURS = (12, 2, 4, 6, 8, 10)
PIPS = {
    1: [(0.5, 0.5)],
    2: [(0.25, 0.25), (0.75, 0.75)],
    3: [(0.25, 0.25), (0.5, 0.5), (0.75, 0.75)],
    4: [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)],
    5: [(0.25, 0.25), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.75, 0.75)],
    6: [(0.25, 0.25), (0.75, 0.25), (0.25, 0.5), (0.75, 0.5), (0.25, 0.75), (0.75, 0.75)],
}


def clutter_background(rng: np.random.Generator) -> Image.Image:
    """A coloured ground strewn with confetti: short strokes and dots in random colours."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in rng.integers(40, 220, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(30, 60))):
        x, y = rng.uniform(0, IMAGE_SIZE, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            a, n = rng.uniform(0, math.pi), rng.uniform(2, 6)
            draw.line([(x, y), (x + n * math.cos(a), y + n * math.sin(a))], fill=colour, width=1)
        else:
            draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=colour)
    return img


def _object_on_clutter(rng: np.random.Generator, draw_object) -> Image.Image:
    img = clutter_background(rng)
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw_object(ImageDraw.Draw(mask), rng)
    fill = Image.new("RGB", img.size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    edge = Image.new("RGB", img.size, (10, 10, 10))
    img.paste(edge, mask=mask.filter(ImageFilter.MaxFilter(3)))  # a dark rim, so the object stands out
    img.paste(fill, mask=mask)
    return img


def _shape_object(shape: str):
    def draw(d: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
        r = IMAGE_SIZE * rng.uniform(0.16, 0.26)
        cx, cy = rng.uniform(r * 1.3, IMAGE_SIZE - r * 1.3, 2)
        draw_shape(d, shape, cx, cy, r, 255, float(rng.uniform(-0.4, 0.4)))

    return draw


def _arrow(d: ImageDraw.ImageDraw, rng: np.random.Generator, angle: float, fill=255, width: int = 4) -> None:
    length = rng.uniform(0.28, 0.4) * IMAGE_SIZE
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-5, 5, 2)
    dx, dy = math.cos(angle) * length, math.sin(angle) * length
    tip = (cx + dx, cy + dy)
    d.line([(cx - dx, cy - dy), tip], fill=fill, width=width)
    h = length * 0.45
    d.polygon(
        [tip, *[(tip[0] - h * math.cos(angle + s), tip[1] - h * math.sin(angle + s)) for s in (0.45, -0.45)]], fill=fill
    )


def _letter(letters: tuple[str, ...]):
    fonts = _font_paths()

    def draw(d: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
        font = ImageFont.truetype(str(rng.choice(fonts)), int(rng.integers(34, 48)))
        at = IMAGE_SIZE / 2 + rng.integers(-4, 5, 2)
        d.text((float(at[0]), float(at[1])), str(rng.choice(letters)), font=font, fill=255, anchor="mm")

    return draw


def _make_clutter(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    rng, labels = _balanced("clutter", split, len(CLUTTER_SHAPES), per_class)
    return [_object_on_clutter(rng, _shape_object(CLUTTER_SHAPES[c])) for c in labels], labels


def _make_clutter_other(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """The clutter domain's grounds with other objects on them: arrows and letters, not shapes."""
    rng, labels = _balanced("clutter-other", split, 2, per_class)

    def arrow(d: ImageDraw.ImageDraw, r: np.random.Generator) -> None:
        _arrow(d, r, float(r.uniform(0, 2 * math.pi)), width=5)

    kinds = (arrow, _letter(OTHER_LETTERS))
    return [_object_on_clutter(rng, kinds[c]) for c in labels], labels


def _make_glyphs2(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    return glyph_images("glyphs2", GLYPHS2, split, per_class)


def _make_glyphs_other(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """The glyph domains' rendering with letters neither of them has."""
    return glyph_images("glyphs-other", OTHER_LETTERS, split, per_class)


def _ink_strokes(rng: np.random.Generator, draw_strokes) -> Image.Image:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw_strokes(ImageDraw.Draw(mask), rng)
    return ink_on_paper(mask, rng)


def _make_inkarrows(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """Arrows drawn in ink on paper: the `arrows` concept in the `sketches` style."""
    rng, labels = _balanced("inkarrows", split, 8, per_class)

    def arrow(c: int):
        return lambda d, r: _arrow(d, r, c * math.pi / 4 + r.uniform(-0.15, 0.15), width=int(r.integers(2, 4)))

    return [_ink_strokes(rng, arrow(c)) for c in labels], labels


def _make_ink_other(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """The ink-on-paper style with other content: outlined letters and scribbles."""
    rng, labels = _balanced("ink-other", split, 2, per_class)
    letter = _letter(OTHER_LETTERS)

    def outlined_letter(r: np.random.Generator) -> Image.Image:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        letter(ImageDraw.Draw(mask), r)
        return ink_on_paper(outline_of(mask, r), r)

    def scribble(d: ImageDraw.ImageDraw, r: np.random.Generator) -> None:
        points = [tuple(r.uniform(10, IMAGE_SIZE - 10, 2)) for _ in range(int(r.integers(4, 8)))]
        d.line(points, fill=255, width=3, joint="curve")

    return [outlined_letter(rng) if c == 0 else _ink_strokes(rng, scribble) for c in labels], labels


def _make_tally(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """Tally marks in ink: one to five strokes (the fifth crossing the four)."""
    rng, labels = _balanced("tally", split, 5, per_class)

    def marks(count: int):
        def draw(d: ImageDraw.ImageDraw, r: np.random.Generator) -> None:
            x0, y0, gap, h = r.uniform(10, 20), r.uniform(14, 22), r.uniform(6, 8), r.uniform(22, 30)
            for k in range(min(count, 4)):
                x = x0 + k * gap + r.uniform(-1, 1)
                d.line([(x, y0 + r.uniform(-2, 2)), (x + r.uniform(-2, 2), y0 + h)], fill=255, width=3)
            if count == 5:
                d.line([(x0 - 4, y0 + h * 0.8), (x0 + 3 * gap + 4, y0 + h * 0.2)], fill=255, width=3)

        return draw

    return [_ink_strokes(rng, marks(c + 1)) for c in labels], labels


def texture2_array(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A grey-level pattern in [0, 1], other than `textures`' kinds."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    p = rng.uniform(7, 12)
    if kind == "zigzag":
        return ((y + p * np.abs(((x / p) % 2) - 1)) % p < p / 2).astype(np.float32)
    if kind == "bricks":
        row = np.floor(y / p)
        return (((y % p) < 2) | (((x + (row % 2) * p) % (2 * p)) < 2)).astype(np.float32)
    if kind == "plaid":
        return 0.5 * (np.sin(2 * math.pi * x / p) > 0.3) + 0.5 * (np.sin(2 * math.pi * y / (1.5 * p)) > 0.3)
    if kind == "rings":
        cx, cy = rng.uniform(0, size, 2)
        return (np.sin(2 * math.pi * np.hypot(x - cx, y - cy) / p) > 0).astype(np.float32)
    if kind == "blobs":
        noise = Image.fromarray((rng.random((size // 8, size // 8)) * 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC
        )
        return (np.asarray(noise, np.float32) / 255.0 > 0.5).astype(np.float32)
    if kind == "crosshatch":
        return ((((x + y) % p) < 1.5) | (((x - y) % p) < 1.5)).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}; known: {', '.join(TEXTURES2)}")


def _make_textures2(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    rng, labels = _balanced("textures2", split, len(TEXTURES2), per_class)
    images = []
    for label in labels:
        t = texture2_array(TEXTURES2[label], rng)[..., None]
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        arr = t * c1 + (1 - t) * c2 + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 1))
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6)))
    return images, labels


def _make_dice(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """A die's face, one to six pips, on a coloured table."""
    rng, labels = _balanced("dice", split, len(DICE), per_class)
    images = []
    for label in labels:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in rng.integers(0, 200, 3)))
        d = ImageDraw.Draw(img)
        side = rng.uniform(36, 50)
        x0, y0 = rng.uniform(2, IMAGE_SIZE - side - 2, 2)
        face = _jitter((240, 240, 235), rng, 12)
        d.rounded_rectangle([x0, y0, x0 + side, y0 + side], radius=side * 0.15, fill=face)
        pip = side * 0.09
        for px, py in PIPS[label + 1]:
            cx, cy = x0 + px * side, y0 + py * side
            d.ellipse([cx - pip, cy - pip, cx + pip, cy + pip], fill=(20, 20, 20))
        images.append(img.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR))
    return images, labels


def _make_clocks(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    """Clock faces showing a whole hour: the short hand tells which."""
    rng, labels = _balanced("clocks", split, len(HOURS), per_class)
    images = []
    for label in labels:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        r = rng.uniform(24, 30)
        c = IMAGE_SIZE / 2 + rng.uniform(-2, 2, 2)
        d.ellipse(
            [c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=_jitter((245, 245, 240), rng), outline=(20, 20, 20), width=2
        )
        for k in range(12):
            a = k * math.pi / 6
            d.point((c[0] + 0.85 * r * math.sin(a), c[1] - 0.85 * r * math.cos(a)), fill=(20, 20, 20))
        hour = HOURS[label] % 12 * math.pi / 6
        d.line([tuple(c), (c[0], c[1] - 0.8 * r)], fill=(20, 20, 20), width=2)  # minute hand at twelve
        d.line(
            [tuple(c), (c[0] + 0.5 * r * math.sin(hour), c[1] - 0.5 * r * math.cos(hour))], fill=(20, 20, 20), width=4
        )
        images.append(img)
    return images, labels


def _domain(name: str, classes, description: str, make, per_class=PER_CLASS) -> Domain:
    return Domain(name, tuple(classes), description, make, dict(per_class))


LOOKALIKE_DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        _domain(
            "clutter", CLUTTER_SHAPES, "small shapes on cluttered, confetti-strewn coloured grounds", _make_clutter
        ),
        _domain(
            "glyphs2", (f"letter {g.lower()}" for g in GLYPHS2), "glyphs' rendering, six other letters", _make_glyphs2
        ),
        _domain(
            "inkarrows",
            (
                f"arrow pointing {d}"
                for d in ("right", "down right", "down", "down left", "left", "up left", "up", "up right")
            ),
            "arrows in ink on paper: arrows' concept, sketches' style",
            _make_inkarrows,
        ),
        _domain("textures2", TEXTURES2, "six other procedural patterns in random colours", _make_textures2),
        _domain(
            "dice", (f"{n} pips" if n != "one" else "one pip" for n in DICE), "a die's face on a table", _make_dice
        ),
        _domain("clocks", (f"{h} o'clock" for h in HOURS), "clock faces showing whole hours", _make_clocks),
        _domain(
            "tally",
            (f"{n} tally marks" if n != "one" else "one tally mark" for n in DICE[:5]),
            "tally marks in ink on paper",
            _make_tally,
        ),
        # near outside domains: never learned; each shares a task's look, not its concept
        _domain(
            "clutter-other",
            ("arrow", "letter"),
            "near outside: clutter's grounds with arrows and letters",
            _make_clutter_other,
            {"train": 0, "val": 20, "test": 90},
        ),
        _domain(
            "glyphs-other",
            (f"letter {g.lower()}" for g in OTHER_LETTERS),
            "near outside: the glyph rendering with letters no task has",
            _make_glyphs_other,
            {"train": 0, "val": 4, "test": 18},
        ),
        _domain(
            "ink-other",
            ("outlined letter", "hatching"),
            "near outside: ink on paper, other content",
            _make_ink_other,
            {"train": 0, "val": 20, "test": 90},
        ),
    )
}
NEAR_OUTSIDE = ("clutter-other", "glyphs-other", "ink-other")
LONG_SEQUENCE = (
    "sketches",
    "textures",
    "arrows",
    "digits",
    "glyphs",
    "clutter",
    "glyphs2",
    "inkarrows",
    "textures2",
    "dice",
    "clocks",
    "tally",
)
