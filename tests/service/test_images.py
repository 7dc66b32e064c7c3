"""Image decoding: formats, modes, and limits checked from the header before decoding."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from service.config import Limits
from service.errors import BadImage, LimitExceeded
from service.images import decode_base64, open_image
from tests.service.images import bomb_png


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img,fmt",
    [
        (Image.new("RGB", (20, 10), "red"), "JPEG"),
        (Image.new("CMYK", (20, 10)), "JPEG"),
        (Image.new("P", (20, 10)), "GIF"),
        (Image.new("LA", (20, 10)), "PNG"),
        (Image.new("I;16", (20, 10)), "PNG"),
        (Image.new("RGB", (20, 10)), "WEBP"),
        (Image.new("RGB", (20, 10)), "BMP"),
        (Image.new("RGB", (20, 10)), "TIFF"),
    ],
)
def test_accepted_formats_come_out_rgb(img, fmt):
    out = open_image(_encode(img, fmt), "x", Limits())
    assert out.mode == "RGB" and out.size == (20, 10)


def test_bomb_is_refused_from_its_header():
    data = bomb_png()
    assert len(data) < 2000
    with pytest.raises(LimitExceeded, match="10000000000 pixels"):
        open_image(data, "bomb.png", Limits())


def test_pixel_limit_is_exact():
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert open_image(data, "x", Limits(max_pixels=10_000)).size == (100, 100)
    with pytest.raises(LimitExceeded, match="max_pixels=9999"):
        open_image(data, "x", Limits(max_pixels=9_999))


def test_formats_outside_the_allow_list_are_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(BadImage, match="accepted format"):
        open_image(eps, "x.eps", Limits())
    ico = _encode(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(BadImage, match="accepted format"):
        open_image(ico, "x.ico", Limits())


def test_base64_size_is_checked_before_decoding():
    with pytest.raises(LimitExceeded, match="max_image_bytes=30"):
        decode_base64("A" * 100, "image 0", Limits(max_image_bytes=30))
    assert decode_base64("data:image/png;base64,aGVsbG8=", "image 0", Limits()) == b"hello"


def test_over_our_limit_but_under_pillows_is_refused_before_decoding():
    data = bomb_png(6000, 5000)  # 30 MP: Pillow would decode it; our 24 MP default does not
    with pytest.raises(LimitExceeded, match="6000x5000 = 30000000 pixels"):
        open_image(data, "big.png", Limits())


def test_numpy_preprocessing_gives_open_clips_numbers(backbone):
    """The decode threads preprocess in numpy (no torch call beside the compute thread): the same tensor."""
    import numpy as np
    import torch
    from PIL import Image

    from service.images import NumpyPreprocess

    rng = np.random.default_rng(0)
    fast = NumpyPreprocess.of(backbone.preprocess)
    assert isinstance(fast, NumpyPreprocess)
    for mode, shape in (("RGB", (90, 70, 3)), ("L", (40, 120)), ("RGBA", (64, 64, 4))):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        torch.testing.assert_close(torch.from_numpy(fast(image)), backbone.preprocess(image), rtol=0, atol=1e-6)
    unknown = lambda image: image  # noqa: E731
    assert NumpyPreprocess.of(unknown) is unknown  # a pipeline it does not know: used as it is


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    """Each scan of a progressive JPEG is a pass over every block: 100,000 scans of a 1024 x 1024 image are 1.2 MB
    and would take about 7 s of a core to decode. Over max_jpeg_scans it is a 413 that names the limit, also
    inside an MPO (a JPEG with a multi-picture segment, as phones write); an encoder's own progressive JPEG (10
    scans) passes, and so do scan markers' bytes inside a metadata segment or after the picture."""
    import os

    from service.images import decode_image, inspect_image, jpeg_scans
    from tests.reliability.payloads import mpo_wrapped, scan_bomb_jpeg

    for bomb in (scan_bomb_jpeg(1024, 100_000), mpo_wrapped(scan_bomb_jpeg(64, 500))):
        with pytest.raises(LimitExceeded, match="more than 100 scans; the limit is max_jpeg_scans=100"):
            inspect_image(bomb, "bomb.jpg", Limits(), 64)
    assert jpeg_scans(scan_bomb_jpeg(64, 500)) == 501  # the DC scan and 500 AC scans
    assert decode_image(inspect_image(scan_bomb_jpeg(64, 20), "small.jpg", Limits(), 64)).size == (64, 64)
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, "JPEG", progressive=True, quality=90)
    ok = buf.getvalue()
    app = b"\xff\xe1" + (2 + 2000).to_bytes(2, "big") + b"\xff\xda" * 1000  # an APP1 segment full of the marker
    for fine in (ok, ok + os.urandom(2_000_000), ok[:2] + app + ok[2:]):  # ... and a trailer, as motion photos
        assert jpeg_scans(fine) == 10
        assert decode_image(inspect_image(fine, "ok.jpg", Limits(), 64)).size[1] >= 64
