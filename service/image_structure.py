"""Walks of an image file's container, before Pillow opens or decodes it, that stop once past a limit.

Pillow reads every metadata segment (JPEG), chunk (PNG), extension block (GIF) or tag (TIFF, and EXIF in any of
them) before the first pixels in Python, keeping a record of each, and reads a PNG's chunks after its pixels the
same way. A file made of millions
of empty segments is therefore cheap to send and costs seconds of CPU and hundreds of MB of memory to open,
whatever its pixel count (15.6 MB of empty JPEG APP1 segments: 4.1 s and +519 MB of peak memory to open,
measured; this walk stops after 0.4 ms). A progressive JPEG is decoded once per scan, over every block. These
walks count what Pillow and the decoder will meet, in time bounded by the limit, not by the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in coded data 0xFF is followed by 00 (a data byte) or RSTn


@dataclass(frozen=True)
class Structure:
    """What a walk counted, each count stopping once past its limit."""

    segments: int = 0  # metadata segments, chunks, extension blocks or EXIF/TIFF tags Pillow reads in Python
    scans: int = 0  # a JPEG's scans (decoding passes)
    data_chunks: int = 0  # a PNG's image data chunks (IDAT, fdAT), each read in Python too


def data_chunk_limit(size: int) -> int:
    """The most image data chunks a PNG of `size` bytes may have: 1000, and one more per KiB (encoders write 8-64
    KiB chunks; 1.26 million chunks of one byte, 16 MB, took 2.4 s to decode: an outside check)."""
    return 1000 + size // 1024


def walk(data: bytes, max_segments: int, max_scans: int) -> Structure:
    """The structure of a JPEG (MPO included), PNG, GIF or TIFF; other formats count nothing."""
    if data[:2] == b"\xff\xd8":
        return _jpeg(data, max_segments, max_scans)
    if data[:8] == PNG_SIGNATURE:
        return _png(data, max_segments, data_chunk_limit(len(data)))
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return Structure(segments=_gif_blocks(data, max_segments))
    if data[:4] in (b"II*\x00", b"MM\x00*"):  # a 771 KB TIFF of 64,280 tags: 0.36 s and 16 MB to open
        return Structure(segments=tiff_tags(data, max_segments))
    return Structure()


def tiff_tags(tiff: bytes, limit: int) -> int:
    """The tags of a TIFF structure's first directory, with those of its EXIF and GPS directories (what Pillow
    parses to open a TIFF, or to read a JPEG's or PNG's EXIF), counting stopped once past `limit`."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 0

    def number(at: int, size: int) -> int:
        return int.from_bytes(tiff[at : at + size], order)  # type: ignore[arg-type]

    count, pending, seen = 0, [number(4, 4)], set()
    while pending and count <= limit:
        at = pending.pop()
        if at in seen or at + 2 > len(tiff):
            continue
        seen.add(at)
        entries = min(number(at, 2), (len(tiff) - at - 2) // 12)  # those there: a corrupt count is Pillow's to skip
        count += entries
        for i in range(min(entries, limit + 1)):
            entry = at + 2 + 12 * i
            if entry + 12 > len(tiff):
                break
            if number(entry, 2) in (0x8769, 0x8825):  # the EXIF and GPS directories
                pending.append(number(entry + 8, 4))
    return count


def _jpeg(data: bytes, max_segments: int, max_scans: int) -> Structure:
    """The markers and scans of a JPEG's first picture, as a decoder meets them: segments are skipped by their
    length, a scan's coded data up to the next marker, and the walk stops at the end-of-image marker (so neither
    an APPn segment's bytes nor what follows the picture, such as a motion photo's video, count)."""
    at, scans, segments, n = 2, 0, 0, len(data)
    while at + 4 <= n and segments <= max_segments and scans <= max_scans:
        if data[at] != 0xFF:
            break  # not at a marker: broken, and the decoder will say so
        marker = data[at + 1]
        segments += 1  # fill bytes too: a run of them is walked one at a time
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xE1 and data[at + 4 : at + 10] == b"Exif\x00\x00":  # its tags, up to 5,000 in 64 KiB
            segments += tiff_tags(data[at + 10 : at + 2 + length], max_segments)
        at += 2 + length
        if marker == 0xDA:  # start of scan: its header, then coded data up to the next marker
            scans += 1
            segments -= 1
            end = _ENTROPY_END.search(data, at)
            if end is None:
                break
            at = end.start()
    return Structure(segments, scans)


def _png(data: bytes, limit: int, data_limit: int) -> Structure:
    """Chunks Pillow reads in Python: those before the first IDAT, and after the image data up to IEND or the next
    animation frame (fcTL), where it stops; an eXIf chunk's tags (`tiff_tags`); and the image data chunks."""
    at, count, chunks, seen_idat, n = 8, 0, 0, False, len(data)
    while at + 8 <= n and count <= limit and chunks <= data_limit:
        length, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        if kind == b"IEND" or (seen_idat and kind == b"fcTL"):
            break
        if kind in (b"IDAT", b"fdAT"):
            seen_idat = True
            chunks += 1
        else:
            count += 1 + (tiff_tags(data[at + 8 : at + 8 + length], limit) if kind == b"eXIf" else 0)
        at += 12 + length
    return Structure(segments=count, data_chunks=chunks)


def _gif_blocks(data: bytes, limit: int) -> int:
    """Extension sub-blocks before the first image descriptor (what Pillow reads, one at a time, when it opens the
    file)."""
    n = len(data)
    if n < 13:
        return 0
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global colour table
    count = 0
    while at < n and count <= limit:
        if data[at] != 0x21:  # an image descriptor (0x2C), the trailer or junk: the walk is over
            break
        at += 2  # introducer and label, then sub-blocks up to an empty one
        while at < n and count <= limit:
            size = data[at]
            at += 1 + size
            count += 1
            if size == 0:
                break
    return count


def rle_bmp_too_long(data: bytes, width: int, height: int, compression: object) -> bool:
    """Whether an RLE-compressed BMP (Pillow decodes those in Python, 0.13 s a MB measured here) is longer than its
    pixels could need: at worst 2 bytes a pixel (runs of one) and 2 a row (ends of line), plus its headers."""
    return compression in (1, 2) and len(data) > 2 * width * height + 2 * height + 4096
