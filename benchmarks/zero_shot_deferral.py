"""Would deferring to zero-shot CLIP when it is confident fix routing? `python -m benchmarks.zero_shot_deferral`.

An idea for the pretraining domain's images that tasks naming the same classes claim: when the task that claims an
image is one whose own images zero-shot CLIP already answers right whenever it is confident, answer the image with
zero-shot CLIP instead. Each task's threshold is calibrated on its validation images: the lowest confidence (the
zero-shot softmax's top probability over the task's classes) above which zero-shot is right at least `precision`
of the time, on at least `min_count` images; none (never defer) when no threshold reaches it. Measured on the
selectors alone (frozen embeddings, as `clipbank bench routing`), the selectors alone and label-aware.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import torch

DEFAULT_SEQUENCE = "sketches,colours,textures,crowds,digits,zoomed"  # `clipbank bench cl`'s


def deferral_threshold(confidence: torch.Tensor, correct: torch.Tensor, precision: float, min_count: int) -> float:
    """The lowest confidence at or above which zero-shot is right on at least `precision` of at least `min_count`
    images; inf when there is none."""
    for t in sorted(set(confidence.tolist())):
        above = confidence >= t
        if int(above.sum()) < min_count:
            break
        if float(correct[above].float().mean()) >= precision:
            return float(t)
    return math.inf


def _zero_shot(backbone, feats: torch.Tensor, classes: Sequence[str], template: str) -> torch.Tensor:
    """Zero-shot probabilities of normalised frozen embeddings over `classes`."""
    with torch.inference_mode():
        text = backbone.frozen.text(backbone.tokenizer([template.format(c) for c in classes]).to(feats.device))
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    scale = float(backbone.model.logit_scale.exp())
    return (scale * torch.nn.functional.normalize(feats.float(), dim=-1) @ text.T).softmax(-1)


def measure(sequence: Sequence[str], precision: float, min_count: int = 10, kind: str = "hybrid") -> dict:
    """Per task its threshold; per domain (tasks, the plain and near outside ones) own routing or fallback
    before and after deferral, the share deferred and zero-shot's accuracy on those, both routing modes."""
    from model_store.backbone import load_backbone
    from model_store.reference import find_reference
    from training.domains import get_domain
    from training.routing import Embeddings, RoutingConfig, _known_by, fit_sequence, routes

    torch.manual_seed(0)
    backbone = load_backbone("tiny", "cpu")
    cfg = RoutingConfig(kinds=(kind,), sequence=tuple(sequence))
    emb = Embeddings(backbone)
    selectors, _ = fit_sequence(emb, kind, cfg, find_reference(backbone))

    def zero_shot(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        domain = get_domain(name)
        probs = _zero_shot(backbone, emb(name, split), domain.classes, "a photo of a {}.")
        return probs.max(-1).values, probs.argmax(-1) == torch.tensor(domain.split(split)[1])

    thresholds = {name: deferral_threshold(*zero_shot(name, "val"), precision, min_count) for name in sequence}
    shown = {name: t if math.isfinite(t) else None for name, t in thresholds.items()}  # JSON has no inf: null, none
    out: dict = {"precision": precision, "thresholds": shown}
    for mode, known in (("selectors", lambda n: None), ("labels", lambda n: _known_by(sequence, n))):
        rows = {}
        for name in [*sequence, cfg.outside, *cfg.near]:
            route = routes(selectors, emb(name, "test"), known(name))
            confidence, correct = zero_shot(name, "test")
            tau = torch.tensor([thresholds[sequence[r]] if r >= 0 else math.inf for r in route.tolist()])
            deferred = (route >= 0) & (confidence >= tau)
            after = torch.where(deferred, torch.full_like(route, -1), route)
            own = sequence.index(name) if name in sequence else -1
            rows[name] = {
                "before": float((route == own).float().mean()),
                "after": float((after == own).float().mean()),
                "deferred": float(deferred.float().mean()),
                "zero_shot_right_on_deferred": float(correct[deferred].float().mean()) if deferred.any() else None,
            }
        out[mode] = rows
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequence", default=DEFAULT_SEQUENCE, help="tasks learned in turn (domain names)")
    ap.add_argument("--precision", type=float, default=0.95, help="zero-shot's accuracy above the threshold")
    args = ap.parse_args(argv)
    result = measure(args.sequence.split(","), args.precision)
    json.dump(result, sys.stdout, indent=1)
    print()
    for mode in ("selectors", "labels"):
        print(f"\n{mode}: domain, own routing (tasks) or fallback (outside) before -> after, deferred", file=sys.stderr)
        for name, r in result[mode].items():
            print(f"  {name:14s} {r['before']:.3f} -> {r['after']:.3f}  {r['deferred']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
