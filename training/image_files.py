"""Image files as training reads them: the server's formats, decoded as the server decodes them (`read_rgb`), held
or read on demand (`LazyImages`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageOps

from model_store.pixels import MAX_PIXELS, aspect_problem, draft_for, reduced_for, viewed_rgb

# the formats the server reads (service/images.py FORMATS), under their usual suffixes
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff"}
SUFFIXES = ", ".join(sorted(IMAGE_SUFFIXES))  # as messages list them


def image_files_under(root: str | os.PathLike) -> list[Path]:
    """The image files under `root`, at any depth, sorted; hidden files and folders (.DS_Store, ._x.png,
    .thumbnails/) are not the user's images and are left out."""
    root = Path(root)
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


class LazyImages(Sequence):
    """Images read from disk (or any source) only when indexed, so large datasets need not fit in memory."""

    def __init__(self, sources: Sequence, read: Callable[[object], Image.Image]) -> None:
        self.sources = list(sources)
        self.read = read

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.read(s) for s in self.sources[i]]
        return self.read(self.sources[i])

    def take(self, idx) -> LazyImages:
        return LazyImages([self.sources[i] for i in idx], self.read)


def read_rgb(path: object, target: int | None = None) -> Image.Image:
    """An image file as the server sees it (upright by its EXIF orientation, 16-bit grey scaled, transparency on
    white: `model_store.pixels`; with `target`, the backbone's input size, a JPEG decoded at the reduced scale the
    server decodes it at), or a ValueError that names the file (Pillow's own errors often do not, and its
    decompression-bomb error is no OSError)."""
    if isinstance(path, str | os.PathLike) and _size(path) == 0:  # Pillow would say "cannot identify image file"
        raise ValueError(f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # unnamed; our own limit applies
            with Image.open(path) as im:
                problem = _size_problem(*im.size)  # from the header, before any pixel is decoded
                if problem is None:
                    if target is not None:
                        draft_for(im, target)
                    rgb = viewed_rgb(ImageOps.exif_transpose(im))
                    return rgb if target is None else reduced_for(rgb, target)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path} has too many pixels to read safely: {e}") from None
    except Exception as e:  # truncated or corrupt data, in any plugin
        raise ValueError(f"{path} could not be read as an image: {type(e).__name__}: {e}") from None
    raise ValueError(f"{path} {problem}")  # as the server refuses it: 1x60000 cost 1 GB and 3 s a read


def _size_problem(width: int, height: int) -> str | None:
    """Why a server with the default limits would refuse an image of this size, by its pixels or aspect ratio (its
    bytes are not checked: `clipbank classify` re-encodes a large file), or None."""
    if width * height > MAX_PIXELS:
        limit = f"a server refuses more than max_pixels={MAX_PIXELS} by default"
        return f"is {width}x{height} = {width * height} pixels; {limit}: resize it"
    return aspect_problem(width, height)


def _size(path: str | os.PathLike) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:  # missing, a broken link: Image.open names it
        return None
