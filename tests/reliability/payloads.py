"""Crafted hostile payloads: image files with lying or extreme headers, multipart bodies, bundles edited by hand."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def full_png(width: int, height: int, extra: bytes = b"") -> bytes:
    """A complete, valid grey PNG of width x height (all rows present, so it decodes), plus `extra` chunks."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = (b"\x00" + b"\x80" * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + extra
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def ztxt_bomb_png(megabytes: int = 64) -> bytes:
    """A 4x4 PNG carrying a zTXt chunk that inflates to `megabytes` MB of text."""
    text = zlib.compress(b"a" * (megabytes * 1024 * 1024), 9)
    return full_png(4, 4, _chunk(b"zTXt", b"comment\x00\x00" + text))


def lying_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def lying_gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + b"\0" * 9 + b"\x02\x02D\x01\0;"


def lying_bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\0" * 16


def lying_jpeg(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 marker is rewritten to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def lying_tiff(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    entries += [(273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8 + 16) + b"\0" * 16 + ifd


def lying_webp(width: int, height: int) -> bytes:
    vp8l = b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14))
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8l)) + b"WEBPVP8L" + struct.pack("<I", len(vp8l)) + vp8l


def png_of(width: int = 32, height: int = 32, colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: bytes = b"xYzZy") -> tuple[str, bytes]:
    """(Content-Type, body) for raw parts (name, filename or None, data), names and values sent as given."""
    out = []
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
        out.append(b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n")
    body = b"".join(out) + b"--" + boundary + b"--\r\n"
    return "multipart/form-data; boundary=" + boundary.decode(), body


def raw_header_bundle(header: bytes, payload: bytes = b"") -> bytes:
    """A file with a safetensors length prefix and the given header bytes."""
    return struct.pack("<Q", len(header)) + header + payload


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def scan_bomb_jpeg(side: int, scans: int) -> bytes:
    """A valid grey progressive JPEG of side x side whose AC scan (one end-of-band run over every block, a dozen
    bytes) repeats `scans` times: each repeat costs the decoder a pass over every block."""
    blocks = (side // 8) ** 2
    assert 0 < blocks <= 32767 and blocks & (blocks - 1) == 0, "side: a power of two from 8 to 1448"
    eob = blocks.bit_length() - 1  # EOBn: a run of 2^n blocks, exactly all of them
    head = b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64)
    head += _segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
    head += _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC: one symbol (0), code '0'
    head += _segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + bytes([eob << 4]))  # AC: one EOBn symbol, code '0'
    head += _segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + b"\x00" * (blocks // 8)  # DC scan: a '0' per block
    bits = "0" + "0" * eob  # the EOBn symbol, then n extra bits of 0
    bits += "1" * (-len(bits) % 8)
    ac = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + int(bits, 2).to_bytes(len(bits) // 8, "big")
    return head + ac * scans + b"\xff\xd9"


def mpo_wrapped(jpeg: bytes) -> bytes:
    """The JPEG with a multi-picture (MPF) segment after its start marker, as Pillow writes one: Pillow then opens
    it as an MPO."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    data = buf.getvalue()
    at = data.index(b"MPF\x00") - 4
    segment = data[at : at + 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]]
    return jpeg[:2] + segment + jpeg[2:]


def _small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def segment_flood_jpeg(segments: int) -> bytes:
    """A valid 16x16 JPEG with `segments` empty APP1 segments after its start marker: Pillow parses each one in
    Python when it opens the file (4 bytes each; 15.6 MB of them took 4.1 s and +519 MB to open)."""
    data = _small_jpeg()
    return data[:2] + b"\xff\xe1\x00\x02" * segments + data[2:]


def chunk_flood_png(chunks: int, after_pixels: bool = False) -> bytes:
    """A valid 4x4 PNG with `chunks` empty private chunks before its image data (read when Pillow opens it) or
    after it (read when Pillow finishes decoding it)."""
    flood = _chunk(b"prVt", b"") * chunks
    if not after_pixels:
        return full_png(4, 4, flood)
    data = full_png(4, 4)
    return data[:-12] + flood + data[-12:]  # before IEND


def comment_flood_gif(blocks: int) -> bytes:
    """A valid 4x4 GIF whose comment extension is `blocks` one-byte sub-blocks, read one by one on open."""
    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, "GIF")
    data = buf.getvalue()
    at = data.index(b"\x2c")  # the first image descriptor (after the header and colour table)
    return data[:at] + b"\x21\xfe" + b"\x01a" * blocks + b"\x00" + data[at:]


def rle_flood_bmp(megabytes: int = 15) -> bytes:
    """A 1x2 RLE8 BMP whose data is megabytes of end-of-line codes: Pillow decodes RLE in Python (0.13 s a
    MB measured), and nothing of it is pixels."""
    body = b"\x00\x00" * (megabytes * 1024 * 512) + b"\x00\x01"
    palette = b"\x00\x00\x00\x00" * 256
    info = struct.pack("<IiiHHIIiiII", 40, 1, 2, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def tag_flood_tiff(tags: int) -> bytes:
    """A valid 8x8 TIFF whose first directory holds `tags` more private tags (an outside check's 64,280 took 0.36 s
    and 16 MB of memory to open; 60 of them in one request, 990 MB)."""
    import struct

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    (first,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, first)
    entries = [bytes(data[first + 2 + 12 * i : first + 14 + 12 * i]) for i in range(count)]
    entries += [struct.pack("<HHII", 40000 + i, 3, 1, 7) for i in range(tags)]  # SHORT values, inline
    entries.sort(key=lambda e: struct.unpack_from("<H", e)[0])
    at = len(data)
    data += struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    struct.pack_into("<I", data, 4, at)
    return bytes(data)


def exif_flood(tags: int) -> bytes:
    """An EXIF block (a TIFF structure) of `tags` tags in its first directory."""
    entries = b"".join(struct.pack("<HHII", 40000 + i, 3, 1, 7) for i in range(tags))
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", tags) + entries + struct.pack("<I", 0)


def exif_flood_png(tags: int) -> bytes:
    """A valid 4x4 PNG with an eXIf chunk of `tags` tags before its image data."""
    return full_png(4, 4, _chunk(b"eXIf", exif_flood(tags)))


def data_chunk_flood_png(side: int = 64, chunk: int = 1) -> bytes:
    """A valid PNG of noise whose compressed image data is split into chunks of `chunk` bytes (an outside check's 16
    MB, 1.26 million chunks of one byte, took 2.4 s to decode and held light requests for up to 43 s)."""
    import os

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"".join(b"\x00" + os.urandom(side) for _ in range(side)))
    split = b"".join(_chunk(b"IDAT", body[i : i + chunk]) for i in range(0, len(body), chunk))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + split + _chunk(b"IEND", b"")
