"""Test images: coloured shapes the tiny backbone knows, and crafted hostile files."""

from __future__ import annotations

import functools
import struct
import zlib

from PIL import Image, ImageDraw

from tests.helpers import png
from training.domains import COLORS, draw_shape


@functools.cache
def colour(name: str, shape: str = "circle") -> bytes:
    """A large shape of a named colour on a white ground, as PNG bytes."""
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    draw_shape(ImageDraw.Draw(img), shape, 32, 32, 24, COLORS[name], 0.0)
    return png(img)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes whose header claims width x height pixels: decoding it would need ~30 GB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (3 * width)
    body = zlib.compress(row * 4, 9)  # only a few rows are really there
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
