"""Bounded image decoding: size, shape and format checked from the header before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from model_store.errors import InvalidRequest
from model_store.pixels import aspect_problem, draft_for, reduced_for, viewed_rgb

from .config import Limits
from .errors import BadImage, ClientGone, LimitExceeded, of_image, out_of_memory
from .image_structure import Structure, data_chunk_limit, rle_bmp_too_long, walk

# Formats PIL reads without outside tools (EPS would call Ghostscript, so it is not here).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as PIL's ImageOps.exif_transpose does).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class OpenedImage:
    """An image whose header was read and checked; its pixels are not decoded yet."""

    name: str
    image: Image.Image
    pixels: int  # what decoding will produce (JPEGs are decoded at a reduced scale when much larger than needed)
    orientation: int = 1
    target: int | None = None  # the model's input side: a decoded image much larger is reduced (`reduced_for`)
    cost: int | None = None  # decoding's work in pixels, where it is not `pixels`: a progressive JPEG's

    @property
    def decode_cost(self) -> int:
        """What decoding costs, in pixels: a progressive JPEG keeps every coefficient of its full size and passes
        over them once per scan, whatever the scale it is decoded at, so it counts its full size (10 of 6000x4000
        in 10 scans each counted as 0.375 MP, decoded beside light requests and held them for seconds: an outside
        check; an ordinary web image of 1024x768 stays light)."""
        return self.pixels if self.cost is None else self.cost


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, read without decoding: a PNG's eXIf chunk may follow its pixels, and Pillow would
    decode the whole image to look for it, so a PNG counts only when the chunk came before them."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block leaves the image as stored
        return 1
    return value if value in UPRIGHT else 1


def inspect_image(data: bytes, name: str, limits: Limits, target: int) -> OpenedImage:
    """Read and check the header: bytes, format, pixels and aspect ratio, each a 4xx that names the image.

    `target` is the model's input side: a JPEG much larger than it is set to decode at 1/2, 1/4 or 1/8 scale
    (never below `target`), so its decoding costs what the model needs, not what the camera stored.
    """
    if len(data) > limits.max_image_bytes:
        raise LimitExceeded(f"{name} is {len(data)} bytes; the limit is max_image_bytes={limits.max_image_bytes}")
    if not data:
        raise BadImage(f"{name} is empty")
    shape = _check_structure(data, name, limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit applies below
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        except Image.DecompressionBombError as e:  # Pillow's own bound, far above ours: said in our words
            claimed = re.search(r"\((\d+) pixels\)", str(e))
            pixels = f"{int(claimed.group(1))} pixels" if claimed else "more pixels than Pillow opens"
            raise LimitExceeded(f"{name} is {pixels}; the limit is max_pixels={limits.max_pixels}") from None
        except UnidentifiedImageError:
            raise BadImage(f"{name} is not an image in an accepted format ({', '.join(FORMATS)})") from None
        except MemoryError:  # the server's shortage, not the image's fault (it was a 422 bad_image)
            raise out_of_memory(name) from None
        except Exception as e:  # PIL's plugins raise many types for broken headers
            raise BadImage(f"{name} has a broken header: {type(e).__name__}: {str(e)[:120]}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise BadImage(f"{name} has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise LimitExceeded(
            f"{name} is {width}x{height} = {width * height} pixels; the limit is max_pixels={limits.max_pixels}"
        )
    problem = aspect_problem(width, height, limits.max_aspect_ratio, "max_aspect_ratio")
    if problem is not None:
        raise LimitExceeded(f"{name} {problem}")
    if img.format == "BMP" and rle_bmp_too_long(data, width, height, img.info.get("compression")):
        raise BadImage(f"{name} is a run-length BMP of {len(data)} bytes, more than its {width}x{height} pixels need")
    orientation = _orientation(img)
    draft_for(img, target)
    cost = width * height if shape.scans > 1 else None  # its full size, whatever the scale
    return OpenedImage(name, img, img.size[0] * img.size[1], orientation, target, cost)


def _check_structure(data: bytes, name: str, limits: Limits) -> Structure:
    """Before Pillow reads the file: metadata it would parse one record at a time in Python (seconds and hundreds
    of MB for a flood of empty ones), and a JPEG's scans, each a decoding pass over every block at full size
    whatever the draft scale (a scan can be a dozen bytes: 16 MB of them would hold a core for minutes)."""
    shape = walk(data, limits.max_image_segments, limits.max_jpeg_scans)
    if shape.segments > limits.max_image_segments:
        raise LimitExceeded(
            f"{name} has more than {limits.max_image_segments} metadata segments, chunks, extension blocks or "
            f"EXIF/TIFF tags; the limit is max_image_segments={limits.max_image_segments}"
        )
    if shape.data_chunks > (most := data_chunk_limit(len(data))):
        raise LimitExceeded(
            f"{name} is a PNG of more than {most} image data chunks for its {len(data)} bytes (at most 1000 and one "
            "per KiB: each is read on its own)"
        )
    if shape.scans > limits.max_jpeg_scans:
        raise LimitExceeded(
            f"{name} is a JPEG of more than {limits.max_jpeg_scans} scans; the limit is max_jpeg_scans="
            f"{limits.max_jpeg_scans}"
        )
    return shape


def decode_image(opened: OpenedImage) -> Image.Image:
    """The upright RGB pixels of an inspected image, or a 422 naming it. The source's own decoded pixels are
    released at once (a request's inspected images stay referenced until it ends)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = opened.image
        try:
            img.load()
            rgb = viewed_rgb(img)  # 16-bit grey scaled, transparency laid on white (as training reads it)
        except ValueError as e:
            raise BadImage(f"{opened.name} has {e}") from None
        except MemoryError:
            raise out_of_memory(opened.name) from None
        except Exception as e:  # truncated or corrupt data, in any plugin
            raise BadImage(f"{opened.name} could not be decoded: {type(e).__name__}: {str(e)[:120]}") from None
        finally:
            img.close()
    orientation = opened.orientation
    if img.format == "TIFF" and ORIENTATION_TAG not in getattr(img, "tag_v2", {}):
        orientation = 1  # Pillow turns a TIFF upright as it loads it, and then drops the tag
    if orientation in UPRIGHT:
        rgb = rgb.transpose(UPRIGHT[orientation])
    return rgb if opened.target is None else reduced_for(rgb, opened.target)


def open_image(data: bytes, name: str, limits: Limits, target: int = 224) -> Image.Image:
    """An upright RGB image, or a 4xx that names the image and what is wrong with it."""
    return decode_image(inspect_image(data, name, limits, target))


def decode_base64(text: str, name: str, limits: Limits) -> bytes:
    """Standard or URL-safe base64, padded or not, line-wrapped or not (as `base64` and MIME tools write it), or a
    data URL."""
    # 4 characters carry 3 bytes (and a wrapped line ends every 76 of them): refuse before decoding too much.
    most = (limits.max_image_bytes + 2) // 3 * 4
    if len(text) > most + most // 38 + 4:
        raise LimitExceeded(f"{name} is over max_image_bytes={limits.max_image_bytes} once decoded")
    text = text.strip()
    if text[:5].lower() == "data:" and "," in text:  # a data URL, as browsers make them (its scheme in any case)
        text = text.split(",", 1)[1]
    if any(c in text for c in "\r\n \t"):
        text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")  # the URL-safe alphabet
    if len(text) % 4 in (2, 3) and not text.endswith("="):
        text += "=" * (-len(text) % 4)  # unpadded, as URL-safe base64 is often sent (RFC 4648, section 3.2)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImage(f"{name} is not valid base64 (standard or URL-safe alphabet): {e}") from None


def inspect_all(images: Sequence[tuple[str, bytes]], limits: Limits, target: int) -> list[OpenedImage]:
    """Check every image's header before any is decoded, and what decoding them all would cost."""
    if not images:
        raise InvalidRequest("images: send at least one image")  # no image is bad: not `bad_image`
    if len(images) > limits.max_images:
        raise LimitExceeded(
            f"{len(images)} images in one request; the limit is max_images={limits.max_images}",
            "max_images",
            limits.max_images,
        )
    opened = [of_image(i, inspect_image, data, name, limits, target) for i, (name, data) in enumerate(images)]
    pixels = sum(o.pixels for o in opened)
    if pixels > limits.max_request_pixels:
        raise LimitExceeded(
            f"the request's images decode to {pixels} pixels; the limit is max_request_pixels="
            f"{limits.max_request_pixels} (large JPEGs count at the reduced scale they are decoded at)",
            "max_request_pixels",
            limits.max_request_pixels,
        )
    return opened


class NumpyPreprocess:
    """A torchvision preprocessing pipeline ending in ToTensor and Normalize (open_clip's), with those two done
    in numpy: the same numbers, but no torch call, so the decode threads never run OpenMP work beside the
    compute thread (`service.batching.Batcher.run` says why that matters). The steps before them (resize,
    crop, RGB conversion) work on PIL images as before."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        steps = list(getattr(preprocess, "transforms", ()))
        if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
            raise ValueError("the preprocessing does not end in ToTensor and Normalize")
        self.head = T.Compose(steps[:-2])
        norm = steps[-1]
        self.mean = np.asarray(norm.mean, np.float32).reshape(1, 1, -1)
        self.std = np.asarray(norm.std, np.float32).reshape(1, 1, -1)

    @classmethod
    def of(cls, preprocess: Callable[[Image.Image], torch.Tensor]) -> Callable[[Image.Image], Any]:
        """This for a pipeline it understands, else the pipeline itself."""
        try:
            return cls(preprocess)
        except ValueError:
            return preprocess

    def __call__(self, image: Image.Image) -> np.ndarray:
        x = np.asarray(self.head(image), dtype=np.uint8)
        if x.ndim == 2:
            x = x[:, :, None]
        x = x.astype(np.float32) / np.float32(255)
        return np.ascontiguousarray(((x - self.mean) / self.std).transpose(2, 0, 1))


def preprocess_opened(
    opened: Sequence[OpenedImage],
    preprocess: Callable[[Image.Image], Any],
    cancelled: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Decode and preprocess inspected images, one at a time, into one [n, 3, H, W] tensor (`preprocess` gives
    tensors, or numpy arrays as `NumpyPreprocess` does).

    `cancelled` is asked before each image: True (the client went away) stops the work with `ClientGone`.
    """
    out = []
    for i, o in enumerate(opened):
        if cancelled is not None and cancelled():
            raise ClientGone("the client closed the connection while its images were decoded")
        out.append(preprocess(of_image(i, decode_image, o)))
    if all(isinstance(x, np.ndarray) for x in out):
        return torch.from_numpy(np.stack(out))
    return torch.stack(out)


def preprocess_all(
    images: Sequence[tuple[str, bytes]],
    preprocess: Callable[[Image.Image], torch.Tensor],
    limits: Limits,
    target: int = 224,
) -> torch.Tensor:
    """Check, decode and preprocess (name, bytes) pairs into one [n, 3, H, W] tensor."""
    return preprocess_opened(inspect_all(images, limits, target), preprocess)
