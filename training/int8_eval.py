"""The int8 frozen image pass (`--frozen-runtime onnx-int8`) against PyTorch's float one, on a continual run's
final bank: zero-shot and auto accuracy, task routing and outside fallback, and the change in points."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from model_store.bank import BankSnapshot
from model_store.inference import AUTO, ZERO_SHOT, TextCache

from .data import LabelledImages
from .evaluate import accuracy_and_routes

log = logging.getLogger(__name__)


def _figures(bank: BankSnapshot, seq: Sequence[Any], outside: LabelledImages | None) -> dict[str, float]:
    cache = TextCache()
    zero_shot = [accuracy_and_routes(bank, d.test, ZERO_SHOT, cache)[0] for d in seq]
    auto = [accuracy_and_routes(bank, d.test, AUTO, cache, match_labels=False) for d in seq]  # the selectors
    own = sum(routes[d.name] for d, (_, routes) in zip(seq, auto, strict=True))
    total = sum(len(d.test) for d in seq)
    out = {
        "zero_shot": round(100 * sum(zero_shot) / len(seq), 2),
        "auto": round(100 * sum(a for a, _ in auto) / len(seq), 2),
        "routing": round(100 * own / total, 2),
    }
    if outside is not None:
        routes = accuracy_and_routes(bank, outside, AUTO, cache, match_labels=False)[1]
        out["outside_fallback"] = round(100 * routes[ZERO_SHOT] / len(outside), 2)
    return out


def int8_comparison(bank: BankSnapshot, seq: Sequence[Any], outside: LabelledImages | None) -> dict[str, Any]:
    """Mean accuracy over the sequence's test sets (zero-shot: every image to plain CLIP with its domain's
    classes; auto: routed by the selectors), the share of task images routed to their own task, and of outside
    images left to zero-shot, in percent, with PyTorch's float frozen pass and with the int8 one; and the deltas
    (int8 minus float, points). {"error": why} if the int8 runtime cannot be built here."""
    from model_store.onnx_runtime import with_onnx_runtime

    try:
        int8_backbone, parity = with_onnx_runtime(bank.backbone, int8=True)
    except Exception as e:  # onnxruntime missing, export failed, or too far from PyTorch
        log.warning("no int8 comparison: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}
    fp32 = _figures(bank, seq, outside)
    int8 = _figures(dataclasses.replace(bank, backbone=int8_backbone), seq, outside)
    return {
        "fp32": fp32,
        "int8": int8,
        "delta_points": {k: round(int8[k] - fp32[k], 2) for k in fp32},
        "parity": parity,
    }
