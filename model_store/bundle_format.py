"""The bundle file format: a safetensors file whose header is checked before any tensor is read.

The header (a bounded JSON object at the start of the file) names every tensor with its dtype and shape; a
bundle holds float32 tensors only, under the names below, and its manifest as the metadata key MANIFEST_KEY.
Files of other formats (zip archives of torch.save, pickles) are named and refused: no pickle, ever.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

from .errors import BundleFormatError, BundleInvalid
from .safejson import JSONRefused
from .safejson import loads as bounded_loads

MANIFEST_KEY = "clipbank.manifest"
MAX_HEADER_BYTES = 64 * 1024 * 1024
PROBES_KEY = "probes.embeddings"
REFUSED_MAGIC = {
    b"PK\x03\x04": "a zip archive (torch.save .pt/.pth)",
    b"\x80": "a pickle (.bin/.pkl)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"\x1f\x8b": "a gzip file",
    b"\x08": "an ONNX model",  # protobuf field 1 (ir_version), as torch.onnx writes it
}
# expert.<tower>.<block>.<id>.<part> | router.<tower>.<block> | selector.<name> | probes.embeddings
TENSOR_NAME = re.compile(
    r"expert\.(visual|text)\.\d{1,4}\.[0-9a-f]{64}\.(down|up)\.(weight|bias)"
    r"|router\.(visual|text)\.\d{1,4}|selector\.[a-z][a-z0-9_]{0,31}|" + re.escape(PROBES_KEY)
)


def _refuse_other_formats(data: bytes) -> None:
    """Name the format of a file that is not safetensors, when its magic bytes say what it is."""
    for magic, what in REFUSED_MAGIC.items():
        if data.startswith(magic):
            raise BundleFormatError(
                f"bundle is {what}, not a clipbank bundle: a .safetensors file that `clipbank train` writes (no pickle)"
            )


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        _refuse_other_formats(data)
        raise BundleFormatError(f"bundle is {len(data)} bytes, too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    # The structure decides, not the first byte: a safetensors header of length 128 + 256k starts with 0x80 too.
    if n > min(len(data) - 8, MAX_HEADER_BYTES) or data[8:9] != b"{":
        _refuse_other_formats(data)
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise BundleFormatError(
            f"not a safetensors file (a clipbank bundle is one): its first 8 bytes give a header length of {n}, "
            f"beyond the file's {len(data)} bytes"
        )
    try:
        header = bounded_loads(data[8 : 8 + n])
    except JSONRefused as e:
        raise BundleFormatError(f"not a safetensors file: the header is not JSON within bounds ({e})") from None
    if not isinstance(header, dict):
        raise BundleFormatError("not a safetensors file: header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BundleFormatError("not a safetensors file: __metadata__ must map strings to strings")
    return header


def file_head(path: str | os.PathLike) -> bytes:
    """A bundle file's first bytes up to the end of its header (its length, then its JSON), without its tensors:
    what `read_metadata` reads. OSError if the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return head + f.read(min(n, MAX_HEADER_BYTES))


def header_problems(header: dict[str, Any]) -> list[str]:
    """Tensor names and dtypes the bundle format does not allow, read from the header alone."""
    names = [k for k in header if k != "__metadata__"]
    problems = [f"unexpected tensor {k[:80]!r}" for k in names if not TENSOR_NAME.fullmatch(k)]
    wrong = [k for k in names if not isinstance(header[k], dict) or header[k].get("dtype") != "F32"]
    if wrong:
        problems.append(f"tensors must be finite float32; these are not: {', '.join(sorted(wrong)[:5])}")
    return problems


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors metadata of a bundle's bytes (holding MANIFEST_KEY), once its header passed
    `header_problems`."""
    header = _header(data)
    if MANIFEST_KEY not in (header.get("__metadata__") or {}):
        raise BundleInvalid(f"safetensors metadata has no {MANIFEST_KEY!r} key; not a clipbank bundle")
    problems = header_problems(header)
    if problems:
        raise BundleInvalid("invalid bundle tensors: " + "; ".join(problems[:10]))
    meta = header.get("__metadata__") or {}
    other = sorted(k for k in meta if k != MANIFEST_KEY)  # a security check stored 60 MB of it per version
    if other:
        raise BundleInvalid(
            f"unexpected safetensors metadata {', '.join(repr(k[:60]) for k in other[:5])}: a bundle's metadata "
            f"holds its manifest ({MANIFEST_KEY!r}) alone"
        )
    return meta
