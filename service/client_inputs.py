"""What the client sends: image files as bytes, and the values of a call checked before anything is sent
(numpy's integers taken as the integers they are; a label that is not a string named, not sent as "")."""

from __future__ import annotations

import io
import operator
import os
import re
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from model_store.settings import is_bool

ImageInput = Any  # a path, encoded bytes (or a bytes-like object), an open binary file, a PIL image, a uint8 array


class _PerObject:
    """A lock for each open file or PIL image the client reads, held while it reads that object: one object a
    caller's threads share is read by one at a time, and other objects are not held up. Keyed by identity (a PIL
    image is not hashable), each dropped with its object; an object that takes no weak reference shares one lock.
    Made anew in a forked child, where a lock held at the fork would stay held."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._guard, self._other = threading.Lock(), threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def __call__(self, item: object) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(id(item))
            if lock is None:
                try:
                    weakref.finalize(item, self._locks.pop, id(item), None)
                except TypeError:  # no weak reference
                    return self._other
                lock = self._locks[id(item)] = threading.Lock()
            return lock


_SHARED = _PerObject()


def whole(value: Any, name: str) -> int:
    """`value` as an int: an int or anything that is one exactly (numpy's int64, say), but not a bool or a float."""
    if isinstance(value, bool):
        raise TypeError(f"{name} is an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} is an integer, got {type(value).__name__} {value!r}"[:200]) from None


def flag(value: Any, name: str) -> bool:
    """`value` as a bool: True or False (numpy's bool too), never a string or a number, whose truth a caller may
    read otherwise ("false" is true; purge="no" must not forget a task, nor activate="false" serve a version)."""
    if is_bool(value):
        return bool(value)
    raise TypeError(f"{name} is True or False, got {type(value).__name__} {value!r}"[:200])


def label_list(labels: Iterable[Any]) -> list[str]:
    """The labels as a list of strings; a TypeError names the first that is not one (None, a list, a number)."""
    out = list(labels)
    for i, label in enumerate(out):
        if not isinstance(label, str):
            raise TypeError(f"label {i} is {type(label).__name__} {label!r}; each label is a string"[:200])
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: httpx's own error named no label
            raise ValueError(f"label {i} ({label!r}) is not valid Unicode: it cannot be sent as UTF-8"[:200]) from None
    return out


def _bytes(item: ImageInput) -> bytes:
    """Encoded bytes from bytes, a bytes-like object, an open binary file, a PIL image (`_pil_bytes`) or a path."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if hasattr(item, "read"):
        if isinstance(getattr(item, "mode", None), str) and "b" not in item.mode:  # read() would fail to decode
            raise TypeError(f"{getattr(item, 'name', item)!r} was opened in text mode: open images with 'rb'")
        with _SHARED(item):  # a file one caller's threads share: no thread's seek lands inside another's read
            start = item.tell() if _seekable(item) else None
            data = item.read()
            if start is not None:  # left where it was: sent again (a retry, the same file twice), it is not empty
                item.seek(start)
        if not isinstance(data, bytes):
            raise TypeError(f"{item!r} was opened in text mode: open images with 'rb'")
        return data
    if hasattr(item, "save") and hasattr(item, "mode"):  # a PIL image, without importing PIL here
        return _pil_bytes(item)
    if hasattr(item, "__array_interface__") and hasattr(item, "dtype"):  # numpy's, without importing numpy here
        return _pil_bytes(_array_image(item))
    if not isinstance(item, str | os.PathLike):
        raise TypeError(
            f"an image is a path, encoded bytes, an open binary file, a PIL image or a uint8 array, not {type(item)}"
        )
    if isinstance(item, str) and re.match(r"[a-z][a-z0-9+.-]*://", item, re.IGNORECASE):
        raise TypeError(f"{item[:80]!r} is a URL: the client sends image files and does not fetch URLs")
    return Path(item).read_bytes()


def _seekable(item: Any) -> bool:
    try:
        return bool(item.seekable())
    except (AttributeError, OSError, ValueError):  # no seekable(), or a closed file (read() then says so)
        return False


PNG_AS_IS = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}  # modes PNG keeps, which the server reads as it reads files


def _pil_bytes(image: Any) -> bytes:
    """A PIL image as the server would see its file: upright (its EXIF orientation applied, as the server does for
    a file's), in a mode PNG stores (CMYK, YCbCr, LAB, HSV and 32-bit grey as the RGB the server would make of
    them), as PNG; as a JPEG (quality 95) when the PNG would pass the server's default image limit."""
    from PIL import ImageOps

    from model_store.pixels import viewed_rgb

    from .config import Limits  # the server's default max_image_bytes: a larger PNG is sent as a JPEG

    if 0 in image.size:
        raise ValueError(f"a PIL image of {image.size[0]}x{image.size[1]} pixels: there is nothing to send")
    with _SHARED(image):  # a lazily loaded image reads its file once, here: two threads at once damaged it for good
        upright = ImageOps.exif_transpose(image)  # a copy: encoded below outside the lock
    if upright.mode not in PNG_AS_IS:
        upright = viewed_rgb(upright)  # ValueError for 32-bit float pixels, whose range is unknown
    buf = io.BytesIO()
    upright.save(buf, format="PNG")
    rgb = None
    while buf.tell() > Limits.max_image_bytes:  # a photo's pixels: a 12 MP PNG is about 20 MB, its JPEG a few;
        # a JPEG over the limit still (24 MP of noise: an outside check): half the size, as the model sees a few
        # hundred pixels of it
        rgb = viewed_rgb(upright) if rgb is None else rgb.resize((max(1, rgb.width // 2), max(1, rgb.height // 2)))
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _array_image(array: Any) -> Any:
    """A numpy array of 8-bit pixels (height x width, with 1, 3 or 4 channels last: grey, RGB, RGBA) as a PIL image;
    a TypeError for others, whose scale (0-1 floats? 0-255?) or channel order would be a guess."""
    from PIL import Image

    shape = tuple(array.shape)
    if str(array.dtype) != "uint8" or not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))):
        hint = {  # the scale follows the type: (x * 255) overflowed a uint16 image (an outside check)
            "uint16": "(x // 257).astype('uint8') for 16-bit pixels",
            "bool": "x.astype('uint8') * 255 for a mask",
        }.get(str(array.dtype), "(x * 255).round().astype('uint8') for 0-1 floats")
        raise TypeError(
            f"an image array is uint8 pixels, height x width (x 1, 3 or 4 channels: grey, RGB, RGBA), got "
            f"{array.dtype} of shape {shape}: convert it (e.g. {hint}, or .transpose(1, 2, 0) for channels first)"
        )
    if 0 in shape[:2]:  # named as the array it is (it was "a PIL image of 0x0 pixels": an outside check)
        raise ValueError(f"an image array of shape {shape}: there is nothing to send")
    return Image.fromarray(array[:, :, 0] if len(shape) == 3 and shape[2] == 1 else array)


def _name(item: ImageInput, i: int) -> str:
    """The file name sent with an upload: UTF-8 (a name that is not is sent with replacement characters); an open
    file's own name, else `item{i}`."""
    if hasattr(item, "read") and isinstance(getattr(item, "name", None), str | bytes):
        item = os.fsdecode(item.name)  # type: ignore[union-attr]
    if not isinstance(item, str | os.PathLike):
        return f"item{i}"
    return os.fsencode(Path(item).name).decode("utf-8", "replace")


def _at_least(generation: int | None) -> dict[str, str]:
    """The `X-Min-Generation` header for `generation` (None: none)."""
    if generation is None:
        return {}
    try:
        n = whole(generation, "min_generation")
    except TypeError:
        n = -1  # a ValueError, as before numpy's integers were taken
    if not 0 <= n < 10**18:
        raise ValueError(
            f"min_generation is a store generation (an integer >= 0 of at most 18 digits), got {generation!r}"
        )
    return {"X-Min-Generation": str(n)}


def _traced(request_id: str | None) -> dict[str, str]:
    """The `X-Request-ID` header for `request_id` (None: the server makes one), checked as the server checks it
    (it replaces any other with its own, and the caller could not find its request in the log)."""
    if request_id is None:
        return {}
    if not isinstance(request_id, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", request_id):
        raise ValueError(f"request_id is 1 to 128 characters of A-Z a-z 0-9 . _ : -, got {request_id!r}"[:200])
    return {"X-Request-ID": request_id}
