"""An image's pixels as the RGB a viewer shows, for training and serving alike.

Pillow's own `convert("RGB")` clips 16- and 32-bit grey to 255 (a dark 16-bit PNG comes out white) and drops
transparency (a black logo on a transparent ground comes out all black, since transparent pixels are often stored
black). Here grey is scaled to 8 bits and transparent images are laid on white, as a page shows them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MAX_ASPECT_RATIO = 20  # long side / short side: the CLIP resize of a 1xN image is SxSN pixels before its crop


def aspect_problem(width: int, height: int, limit: int = MAX_ASPECT_RATIO, setting: str = "") -> str | None:
    """Why an image of this size is refused (its aspect ratio), or None; `setting` names the limit's setting."""
    if max(width, height) > limit * max(1, min(width, height)):
        ratio = max(width, height) / max(1, min(width, height))
        where = f" ({setting}={limit})" if setting else ""
        return f"is {width}x{height}, an aspect ratio of {ratio:.0f}:1; the limit is {limit}:1{where}: crop or pad it"
    return None


def viewed_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB, 16-bit and 32-bit integer grey read as 16-bit. Raises ValueError for 32-bit float pixels,
    whose range is the sender's convention, and 32-bit integer pixels whose range is ambiguous."""
    if img.mode == "F":
        raise ValueError("32-bit float pixels, whose range is unknown; send 8- or 16-bit pixels")
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img)
        # `convert("I")` of an 8-bit image, read as 16-bit, was sent black
        if img.mode == "I" and values.size and 0 < values.max() <= 255:
            raise ValueError(
                "32-bit integer pixels all at most 255: 8-bit values or a nearly black 16-bit image, which cannot be "
                "told apart; send 8-bit ('L') or 16-bit ('I;16') pixels"
            )
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


MAX_PIXELS = 24_000_000  # the server's default max_pixels (width x height), which training refuses above too
REDUCE_GAP = 4  # a decoded image is box-reduced while both sides stay >= REDUCE_GAP x the model's input side


def reduced_for(img: Image.Image, target: int) -> Image.Image:
    """After decoding: an image much larger than the model needs (a PNG, WebP or TIFF; a JPEG is drafted before),
    box-reduced by the largest integer factor that keeps both sides >= REDUCE_GAP x `target`. What the server does
    to every image, and training too, so both see the same pixels: the resize to `target` that follows then differs
    from one of the full image by about 1 level in 255 on average (embeddings' cosine 0.9999, tiny backbone, 12 MP), and
    a 12 MP PNG held for training takes 4 MB for a 224-pixel input (1333 x 1000), not 36 MB."""
    factor = min(img.size) // (REDUCE_GAP * target)
    return img.reduce(factor) if factor >= 2 else img


def draft_for(img: Image.Image, target: int) -> None:
    """Before decoding: a JPEG decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that keeps both sides
    >= `target` (the backbone's input size). What the server does to every image, and what training does too, so
    both see the same pixels; a 12 MP photo then takes about 0.6 MB decoded, not 36 MB."""
    if img.format in ("JPEG", "MPO"):  # MPO: a JPEG with a multi-picture segment, its first picture decoded
        img.draft("RGB", (target, target))
