"""Tensors that live in one anonymous memory map each, rather than on the heap.

A bank's long-lived tensors (a bundle's, the stacked selectors') are built next to transient buffers of the same
sizes: an upload's parsed copies, the previous stack being replaced. On the heap the survivors pin pages between
freed holes, so resident memory stays above what the bank holds (measured: about half a bundle per task on the
tiny backbone). In a map of their own they occupy whole pages, and go back to the system whole when dropped.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Mapping

import torch


def empty_block(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of `shapes`, views of one anonymous memory map (none for zero elements)."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(sizes.values())
    if total == 0:
        return {k: torch.empty(s, dtype=dtype) for k, s in shapes.items()}
    item = torch.empty((), dtype=dtype).element_size()
    flat = torch.frombuffer(mmap.mmap(-1, total * item, flags=mmap.MAP_PRIVATE), dtype=dtype, count=total)
    out, offset = {}, 0
    for key, shape in shapes.items():
        out[key] = flat[offset : offset + sizes[key]].view(shape)
        offset += sizes[key]
    return out


def one_block(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of (same-dtype, CPU) `tensors` in one anonymous memory map: views of it, by the same keys."""
    dtypes = {t.dtype for t in tensors.values()}
    if not tensors or len(dtypes) > 1 or any(t.device.type != "cpu" for t in tensors.values()):
        return dict(tensors)
    out = empty_block({k: tuple(t.shape) for k, t in tensors.items()}, dtypes.pop())
    for key, t in tensors.items():
        out[key].copy_(t)
    return out
