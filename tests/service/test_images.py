"""Image decoding: formats, modes, and limits checked from the header before decoding."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from service.config import Limits
from service.errors import BadImage, LimitExceeded
from service.images import decode_base64, decode_image, inspect_all, inspect_image, open_image
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


def test_a_request_over_max_request_pixels_names_the_setting_for_clients_to_split():
    """64 photos of 1920x1080, each valid, were refused whole, and `clipbank eval` could not split them: the 413
    named no setting (an outside check)."""
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    limits = Limits(max_request_pixels=25_000)
    assert len(inspect_all([("a", data), ("b", data)], limits, 64)) == 2
    with pytest.raises(LimitExceeded, match="max_request_pixels=25000") as refused:
        inspect_all([("a", data), ("b", data), ("c", data)], limits, 64)
    assert refused.value.details == {"setting": "max_request_pixels", "limit": 25_000}


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
    for url in ("DATA:image/png;base64,aGVsbG8=", " data:image/png;base64,aGVsbG8=\n"):  # a URL scheme has no case
        assert decode_base64(url, "image 0", Limits()) == b"hello"


def test_base64_as_tools_write_it_is_read():
    """Line-wrapped (`base64`, MIME) and URL-safe base64 decode to the same bytes; what is not base64 says so."""
    import base64

    data = bytes(range(256)) * 20
    for text in (
        base64.encodebytes(data).decode(),
        base64.urlsafe_b64encode(data).decode(),
        base64.b64encode(data).decode(),
    ):
        assert decode_base64(text, "image 0", Limits()) == data
    with pytest.raises(BadImage, match="not valid base64 \\(standard or URL-safe alphabet\\)"):
        decode_base64("ab*d", "image 0", Limits())


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

    from service.image_structure import walk
    from service.images import decode_image, inspect_image
    from tests.reliability.payloads import mpo_wrapped, scan_bomb_jpeg

    def jpeg_scans(data: bytes) -> int:
        return walk(data, 10**9, 10**9).scans

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


@pytest.mark.parametrize(
    "payload",
    ["segment_flood_jpeg", "chunk_flood_png", "chunk_flood_png_after", "comment_flood_gif", "mpo_segment_flood"],
)
def test_a_flood_of_metadata_records_is_refused_before_pillow_parses_it(payload, monkeypatch):
    """Pillow parses each JPEG segment, PNG chunk or GIF sub-block in Python and keeps a record of it: 15 MB of
    empty ones took seconds and hundreds of MB to open a 16x16 image. Over max_image_segments: a 413 naming the
    limit, before Pillow sees the file."""
    from service import images
    from tests.reliability import payloads as p

    make = {
        "segment_flood_jpeg": lambda n: p.segment_flood_jpeg(n),
        "chunk_flood_png": lambda n: p.chunk_flood_png(n),
        "chunk_flood_png_after": lambda n: p.chunk_flood_png(n, after_pixels=True),
        "comment_flood_gif": lambda n: p.comment_flood_gif(n),
        "mpo_segment_flood": lambda n: p.mpo_wrapped(p.segment_flood_jpeg(n)),
    }[payload]
    assert images.decode_image(images.inspect_image(make(900), "ok", Limits(), 64)).size[0] >= 4  # under: fine
    opened = []
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: opened.append(1))
    with pytest.raises(LimitExceeded, match="more than 1000 metadata segments.*max_image_segments=1000"):
        images.inspect_image(make(1001), "flood", Limits(), 64)
    with pytest.raises(LimitExceeded, match="max_image_segments=1000"):
        images.inspect_image(make(1_300_000), "flood", Limits(), 64)  # 2.6 to 15.6 MB of records
    assert not opened


def test_images_with_many_frames_or_real_metadata_are_not_floods():
    """An animated PNG's frames after the first, an animated GIF's, and a JPEG with EXIF, ICC and comments are far
    under the limit."""
    from service.image_structure import walk

    frames = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(1500)]
    for fmt in ("PNG", "GIF"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        assert walk(buf.getvalue(), 1000, 100).segments < 20, fmt
        assert decode_image(inspect_image(buf.getvalue(), fmt, Limits(), 8)).size == (8, 8)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000
    Image.new("RGB", (32, 32)).save(buf, "JPEG", exif=exif, icc_profile=b"\0" * 200_000, comment=b"hello")
    assert walk(buf.getvalue(), 1000, 100).segments < 20


def test_a_run_length_bmp_longer_than_its_pixels_need_is_refused():
    """Pillow decodes RLE BMPs in Python (0.13 s a MB measured here): one of 1x2 pixels and 15 MB of codes is refused at
    its header; a real RLE BMP is not."""
    from tests.reliability.payloads import rle_flood_bmp

    with pytest.raises(BadImage, match="run-length BMP of .* bytes, more than its 1x2 pixels need"):
        inspect_image(rle_flood_bmp(15), "rle.bmp", Limits(), 64)
    # the longest real encoding: every pixel a run of one (2 bytes), every row ended (2 bytes), bottom-up
    body = b"".join(b"".join(b"\x01" + bytes([(x * 7 + y) % 256]) for x in range(40)) + b"\x00\x00" for y in range(30))
    body += b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, 40, 30, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    palette = b"".join(bytes([i, 255 - i, 0, 0]) for i in range(256))
    offset = 14 + len(info) + len(palette)
    data = b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body
    buf = io.BytesIO(data)
    assert decode_image(inspect_image(buf.getvalue(), "fine.bmp", Limits(), 8)).size == (40, 30)


@pytest.mark.parametrize(
    "mode, value, expected", [("I;16", 20 * 257, 20), ("I;16", 200 * 257, 200), ("I", 76 * 257, 76)]
)
def test_16_and_32_bit_grey_keep_their_tones(mode, value, expected):
    """Pillow's own conversion clips 16-bit grey to 255: a dark 16-bit PNG came out white (and classified so)."""
    img = Image.new(mode, (8, 8), value)
    buf = io.BytesIO()
    img.save(buf, "PNG" if mode == "I;16" else "TIFF")
    rgb = decode_image(inspect_image(buf.getvalue(), "grey", Limits(), 8))
    assert (np.asarray(rgb) == expected).all()


def test_float_pixels_are_refused_by_name():
    buf = io.BytesIO()
    Image.new("F", (8, 8), 0.3).save(buf, "TIFF")
    with pytest.raises(BadImage, match="32-bit float pixels"):
        decode_image(inspect_image(buf.getvalue(), "depth.tif", Limits(), 8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_is_turned_upright_once(orientation):
    """Pillow turns a TIFF upright as it loads it; the server must not turn it again (it did: 6 and 8 came out
    upside down)."""
    from PIL import ImageOps

    src = Image.new("RGB", (12, 8))
    src.paste((255, 0, 0), (0, 0, 4, 4))  # a red corner, to see where it goes
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    src.save(buf, "TIFF", exif=exif)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    got = decode_image(inspect_image(buf.getvalue(), "o.tif", Limits(), 8))
    assert got.size == expected.size and (np.asarray(got) == np.asarray(expected)).all()


def test_transparent_images_are_seen_on_white_in_serving_and_training(tmp_path):
    """A black mark on a transparent ground (its transparent pixels stored black, as many encoders do) came out
    all black; both the server and the trainer now lay it on white, as a viewer shows it."""
    from training.data import read_rgb

    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (4, 4, 12, 12))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    (tmp_path / "mark.png").write_bytes(buf.getvalue())
    for rgb in (decode_image(inspect_image(buf.getvalue(), "mark", Limits(), 8)), read_rgb(tmp_path / "mark.png")):
        px = np.asarray(rgb)
        assert (px[0, 0] == 255).all() and (px[8, 8] == 0).all()


def test_training_reads_images_upright_as_the_server_does(tmp_path):
    from training.data import read_rgb

    src = Image.new("RGB", (12, 8))
    src.paste((255, 0, 0), (0, 0, 4, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    src.save(buf, "JPEG", exif=exif, quality=95)
    (tmp_path / "o.jpg").write_bytes(buf.getvalue())
    served = decode_image(inspect_image(buf.getvalue(), "o", Limits(), 8))
    trained = read_rgb(tmp_path / "o.jpg")
    assert served.size == trained.size == (8, 12) and (np.asarray(served) == np.asarray(trained)).all()


def test_tag_floods_and_one_byte_data_chunks_are_refused_before_pillow_reads_them(monkeypatch):
    """An outside check: a TIFF of 64,280 tags (771 KB) took 0.36 s and 16 MB to open, 990 MB for a request of 60,
    and tags were no metadata segments; a PNG's image data in 1.26 million chunks of one byte took 2.4 s to decode.
    Tags count as segments (a TIFF's, and the EXIF of a JPEG or PNG); a PNG may have 1000 data chunks and one per
    KiB. Real files are far under both: an encoder's own chunks, a camera's EXIF."""
    from service import images
    from service.image_structure import walk
    from tests.reliability import payloads as p

    for make in (p.tag_flood_tiff, p.exif_flood_png):
        assert images.decode_image(images.inspect_image(make(900), "ok", Limits(), 8)).size[0] >= 4  # under: fine
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, "JPEG", exif=b"Exif\x00\x00" + p.exif_flood(1200))
    lying = io.BytesIO()  # an EXIF directory whose count says 16,384 and holds one: Pillow opens it (a review)
    exif = b"II*\x00" + struct.pack("<IH", 8, 0x4000) + struct.pack("<HHII", 0x010E, 2, 1, 0) + struct.pack("<I", 0)
    Image.new("RGB", (16, 16)).save(lying, "JPEG", exif=b"Exif\x00\x00" + exif)
    assert images.inspect_image(lying.getvalue(), "ok", Limits(), 16).pixels == 256
    chunky = p.data_chunk_flood_png(64, chunk=1)
    normal = p.data_chunk_flood_png(256, chunk=8192)
    assert 1 < walk(normal, 1000, 100).data_chunks < 30  # 8 KiB each, as encoders write them
    assert images.decode_image(images.inspect_image(normal, "ok", Limits(), 256)).size == (256, 256)
    opened = []
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: opened.append(1))
    for flood in (p.tag_flood_tiff(20_000), p.exif_flood_png(1001), jpeg.getvalue()):
        with pytest.raises(LimitExceeded, match="more than 1000 metadata segments.*EXIF/TIFF tags.*=1000"):
            images.inspect_image(flood, "flood", Limits(), 8)
    with pytest.raises(LimitExceeded, match=r"a PNG of more than 10\d\d image data chunks for its \d+ bytes"):
        images.inspect_image(chunky, "flood", Limits(), 8)
    assert not opened


def test_a_progressive_jpeg_costs_its_full_size_once_per_scan():
    """An outside check: 10 progressive JPEGs of 6000x4000 in 10 scans each counted as 3.75 MP (decoded at 1/8),
    under the 4 MP that sends a request to the low-priority threads, and held light requests for seconds. Its
    decode cost is its full size; a baseline JPEG's is what it decodes to."""
    shots = {}
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.new("RGB", (1600, 1200), (200, 30, 30)).save(buf, "JPEG", progressive=progressive)
        shots[progressive] = inspect_image(buf.getvalue(), "photo.jpg", Limits(), 224)
    assert shots[False].decode_cost == shots[False].pixels == 400 * 300  # decoded at 1/4
    assert shots[True].pixels == 400 * 300 and shots[True].decode_cost == 1600 * 1200


def test_a_server_short_of_memory_is_overloaded_not_a_bad_image(monkeypatch):
    """An SRE's check under `ulimit -v`: a valid PNG was answered 422 `bad_image` ("MemoryError"), so clients'
    skip_bad dropped good images and nothing retried; other requests got 500. It is 503 `overloaded` now."""
    from service.errors import Overloaded, error_body_of

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")

    def short(*a, **k):
        raise MemoryError()

    for where in ("open", "load"):
        with monkeypatch.context() as m:
            m.setattr(Image, "open", short) if where == "open" else m.setattr(Image.Image, "load", short)
            with pytest.raises(Overloaded, match="short of memory or threads for image 0"):
                open_image(buf.getvalue(), "image 0", Limits())
    import torch

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: 1 bytes")
    for error in (MemoryError(), RuntimeError("can't start new thread"), cpu, torch.OutOfMemoryError("CUDA")):
        status, code, message = error_body_of(error)
        assert (status, code) == (503, "overloaded") and "try again shortly" in message, error
    assert error_body_of(RuntimeError("something else"))[:2] == (500, "internal_error")
