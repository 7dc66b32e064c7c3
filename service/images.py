"""Bounded image decoding: size and format checked from the header before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .config import Limits
from .errors import BadImage, LimitExceeded

# Formats PIL reads without outside tools (EPS would call Ghostscript, so it is not here).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(data: bytes, name: str, limits: Limits) -> Image.Image:
    """An RGB image, or a 4xx that names the image and what is wrong with it."""
    if len(data) > limits.max_image_bytes:
        raise LimitExceeded(f"{name} is {len(data)} bytes; the limit is max_image_bytes={limits.max_image_bytes}")
    if not data:
        raise BadImage(f"{name} is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit applies below
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        except Image.DecompressionBombError as e:
            raise LimitExceeded(f"{name} has too many pixels ({e}); max_pixels={limits.max_pixels}") from None
        except UnidentifiedImageError:
            raise BadImage(f"{name} is not an image in an accepted format ({', '.join(FORMATS)})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage(f"{name} has a broken header: {e}") from None
        width, height = img.size
        if width * height > limits.max_pixels:
            raise LimitExceeded(
                f"{name} is {width}x{height} = {width * height} pixels; the limit is max_pixels={limits.max_pixels}"
            )
        if width < 1 or height < 1:
            raise BadImage(f"{name} has no pixels ({width}x{height})")
        try:
            return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImage(f"{name} could not be decoded: {e}") from None


def decode_base64(text: str, name: str, limits: Limits) -> bytes:
    # 4 characters carry 3 bytes: refuse before decoding anything too big.
    if len(text) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise LimitExceeded(f"{name} is over max_image_bytes={limits.max_image_bytes} once decoded")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # accept data URLs, as browsers make them
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImage(f"{name} is not valid base64: {e}") from None


def preprocess_all(
    images: Sequence[tuple[str, bytes]], preprocess: Callable[[Image.Image], torch.Tensor], limits: Limits
) -> torch.Tensor:
    """Decode and preprocess (name, bytes) pairs into one [n, 3, H, W] tensor."""
    if not images:
        raise BadImage("send at least one image")
    if len(images) > limits.max_images:
        raise LimitExceeded(f"{len(images)} images in one request; the limit is max_images={limits.max_images}")
    return torch.stack([preprocess(open_image(data, name, limits)) for name, data in images])
