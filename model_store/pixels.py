"""An image's pixels as the RGB a viewer shows, for training and serving alike.

Pillow's own `convert("RGB")` clips 16- and 32-bit grey to 255 (a dark 16-bit PNG comes out white) and drops
transparency (a black logo on a transparent ground comes out all black, since transparent pixels are often stored
black). Here grey is scaled to 8 bits and transparent images are laid on white, as a page shows them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def viewed_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB. Raises ValueError for 32-bit float pixels, whose range is the sender's convention."""
    if img.mode == "F":
        raise ValueError("32-bit float pixels, whose range is unknown; send 8- or 16-bit pixels")
    if img.mode == "I" or img.mode.startswith("I;16"):
        return Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
