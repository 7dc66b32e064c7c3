"""What the Python client sends for a PIL image: what the server makes of the image's own file."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.client import _bytes as _pil_bytes
from service.config import Limits
from service.errors import BadImage
from service.images import decode_base64, open_image

ORIENTATION = 0x0112


def _file(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _served(data: bytes) -> np.ndarray:
    return np.asarray(open_image(data, "image 0", Limits()))


def _halves() -> Image.Image:
    """Red above, blue below: turned a quarter, it is another image."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :, 0] = 255
    pixels[16:, :, 2] = 255
    return Image.fromarray(pixels)


def test_an_exif_rotated_photo_is_sent_upright_as_its_file_is_served():
    """The client re-encoded the raw pixels and dropped the EXIF tag: a phone photo opened with Image.open was
    classified on its side (a trained task's accuracy fell from 1.0 to 0.04 in an outside check)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = _file(_halves(), "JPEG", exif=exif.tobytes(), quality=95)
    served = _served(data)
    assert served.shape == (48, 32, 3)  # turned upright by the server
    assert np.array_equal(_served(_pil_bytes(Image.open(io.BytesIO(data)))), served)


@pytest.mark.parametrize("mode", ["CMYK", "I"])
def test_modes_png_cannot_store_are_sent_as_the_server_reads_their_files(mode):
    """Image.open of a CMYK JPEG, then classify: a raw 'OSError: cannot write mode CMYK as PNG'."""
    if mode == "I":  # 32-bit grey, as a scanner's TIFF holds it
        data = _file(Image.fromarray(np.arange(32 * 48, dtype=np.int32).reshape(32, 48) * 40), "TIFF")
    else:
        data = _file(_halves().convert(mode), "JPEG", quality=100)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == mode
    assert np.array_equal(_served(_pil_bytes(opened)), _served(data))


def test_modes_without_a_file_format_the_server_takes_are_sent_as_rgb():
    for mode in ("YCbCr", "LAB", "HSV"):
        sent = _served(_pil_bytes(_halves().convert(mode))).astype(int)
        assert np.abs(sent - np.asarray(_halves()).astype(int)).max() <= 32, mode  # red stays red, blue blue
    with pytest.raises(ValueError, match="32-bit float pixels"):
        _pil_bytes(Image.new("F", (4, 4)))
    # an outside check's: an 8-bit image converted to 32-bit integers was read as 16-bit and sent all black
    with pytest.raises(ValueError, match="32-bit integer pixels all at most 255"):
        _pil_bytes(_halves().convert("L").convert("I"))


def test_a_photo_whose_png_passes_the_image_limit_is_sent_as_a_jpeg():
    noise = np.random.default_rng(0).integers(0, 256, (2600, 2600, 3), dtype=np.uint8)  # about 20 MB as PNG
    data = _pil_bytes(Image.fromarray(noise))
    assert data[:3] == b"\xff\xd8\xff" and len(data) <= 16 * 1024 * 1024  # the server's default max_image_bytes
    served = _served(data)  # the server may decode a large JPEG at a reduced scale
    assert served.shape[0] == served.shape[1] >= 224


def test_unpadded_url_safe_base64_is_read():
    data = _file(_halves(), "PNG")
    for text in (base64.urlsafe_b64encode(data).decode().rstrip("="), base64.b64encode(data).decode().rstrip("=")):
        assert decode_base64(text, "image 0", Limits()) == data
    with pytest.raises(BadImage, match="not valid base64"):
        decode_base64("abcde", "image 0", Limits())  # 5 characters: no padding makes that whole


def test_an_image_file_opened_in_text_mode_is_named_as_such(tmp_path):
    """`classify([open(path, "r")])` raised a raw UnicodeDecodeError from read()."""
    from service.client import _bytes

    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with open(path) as text, pytest.raises(TypeError, match="opened in text mode: open images with 'rb'"):
        _bytes(text)
    with open(path, "rb") as binary:
        assert _bytes(binary) == path.read_bytes()
