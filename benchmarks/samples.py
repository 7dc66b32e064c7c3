"""Test images of the offline domains as encoded PNGs, for service tests and benchmarks."""

from __future__ import annotations

import io

from training.data import load_domain


def domain_pngs(domain: str, n: int) -> list[bytes]:
    """PNG bytes of n test images of an offline domain, evenly spaced over its (shuffled) test split."""
    images = load_domain(domain, "test").images
    return [png_bytes(im) for im in images[:: max(1, len(images) // n)][:n]]


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
