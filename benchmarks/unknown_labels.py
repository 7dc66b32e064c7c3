"""Labels a task never learned, beside some it did: how should a routed task answer them?
`python -m benchmarks.unknown_labels` (about 20 minutes on 2 idle cores; `--unknown 2` alone, half that).

Per domain, a task is trained on all its classes but the last U (`--unknown`, 2 and 3 by default), as a client
that added names to its label list after the task was trained. Its images are then asked over all the classes,
K (those it learned) and U, under each policy:

- `task`: the task's adapted towers score every label (the server before 2026-12-07);
- `zero-shot`: the image goes to zero-shot CLIP (as routing only to a task that knows every label would);
- `known-only`: the task answers over K alone, never a name of U;
- `zero-shot-share`: zero-shot CLIP's probability mass on U is the share U gets, divided as zero-shot divides it;
  the rest goes to K as the task divides it;
- `served` (`model_store.inference.split_probs`, the server's since 2026-12-07): U's share is the smaller of the
  task's and zero-shot CLIP's mass on it (both must agree), divided as zero-shot divides it; the rest to K.

Per split (`val`, on which the policy was chosen; `test`): accuracy on K's images (A) and on U's (B), pinned to
the task and as auto-routing answers (the images the task's selector does not claim go to zero-shot CLIP under
every policy), and `balanced`, the mean of A and B. `served_classify` is the `served` policy's accuracy through
`classify_batch` itself, pinned: it must equal `served`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

POLICIES = ("task", "zero-shot", "known-only", "zero-shot-share", "served")
DEFAULT_DOMAINS = "sketches,colours,textures,digits,glyphs,crowds"


def policy_probs(policy: str, task_logits: torch.Tensor, zs_logits: torch.Tensor, known: int) -> torch.Tensor:
    """Per image the probabilities over K + U (the first `known` columns are K) under `policy`, from the task's
    logits over K + U (adapted towers) and zero-shot CLIP's (frozen towers)."""
    from model_store.inference import split_probs

    split = (list(range(known)), list(range(known, task_logits.shape[-1])))
    if policy == "task":
        return task_logits.softmax(-1)
    if policy == "zero-shot":
        return zs_logits.softmax(-1)
    inside = task_logits[:, :known].softmax(-1)
    if policy == "known-only":
        return torch.cat([inside, torch.zeros_like(task_logits[:, known:])], dim=-1)
    if policy == "zero-shot-share":  # zero-shot CLIP alone says how likely the image is one of U
        unknown = zs_logits.softmax(-1)[:, known:]
        return torch.cat([(1 - unknown.sum(-1, keepdim=True)) * inside, unknown], dim=-1)
    if policy == "served":
        return split_probs(task_logits, zs_logits, split)
    raise ValueError(f"unknown policy {policy!r}")


def _logits(bank, data, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task and zero-shot logits over `labels` for `data`'s images pinned to the bank's one task, and whether the
    task's selector claims each image (auto, label-aware: the task knows some of `labels`)."""
    from model_store.inference import AUTO, ZERO_SHOT_TEMPLATES, ClassifyItem, ImagePasses
    from model_store.text import text_embeddings

    x = torch.stack([bank.backbone.preprocess(im) for im in data.images])
    task = bank.tasks[0]
    passes = ImagePasses(bank, [ClassifyItem(x, tuple(labels), task.name)])
    while not passes.step(1 << 30):
        pass
    claimed = ImagePasses(bank, [ClassifyItem(x, tuple(labels), AUTO)])
    while not claimed.step(1 << 30):
        pass
    scale = float(bank.backbone.model.logit_scale.exp())
    adapted = text_embeddings(bank, 0, labels, task.templates)
    frozen = text_embeddings(bank, -1, labels, ZERO_SHOT_TEMPLATES)
    unit = torch.nn.functional.normalize
    return scale * unit(passes.feats) @ adapted.T, scale * unit(passes.frozen) @ frozen.T, claimed.tasks >= 0


def measure(backbone, name: str, unknown: int, steps: int, seed: int = 0) -> dict:
    """One domain's task trained without its last `unknown` classes, asked over all of them."""
    from model_store.bank import build_bank, empty_bank
    from model_store.bundle import read_bundle
    from model_store.reference import find_reference
    from model_store.selector import SelectorConfig
    from training.cl_incremental import _only
    from training.data import load_domain
    from training.trainer import TrainConfig, train_task

    train, val, test = (load_domain(name, s) for s in ("train", "val", "test"))
    known, new = train.classes[: len(train.classes) - unknown], train.classes[len(train.classes) - unknown :]
    cfg = TrainConfig(name, steps, seed=seed, selector=SelectorConfig(seed=seed))
    reference = find_reference(backbone)
    result = train_task(
        empty_bank(backbone), _only(train, known), cfg, _only(val, known), progress=False, reference=reference
    )
    bank = build_bank(backbone, [read_bundle(result.bundle)])
    labels = (*known, *new)
    out: dict = {"known": list(known), "unknown": list(new)}
    for split, data in (("val", val), ("test", test)):
        out[split] = {}
        for part, group in (("A", known), ("B", new)):
            images = _only(data, group).with_classes(labels)
            task_logits, zs_logits, claimed = _logits(bank, images, labels)
            truth = torch.tensor(images.labels)
            zs_right = zs_logits.argmax(-1) == truth
            right = {p: policy_probs(p, task_logits, zs_logits, len(known)).argmax(-1) == truth for p in POLICIES}
            out[split][part] = {
                "pinned": {p: _pct(r) for p, r in right.items()},
                "auto": {p: _pct(torch.where(claimed, r, zs_right)) for p, r in right.items()},
                "claimed": _pct(claimed),
                "images": len(images),
                "served_classify": round(100 * _accuracy_over(bank, images), 1),
            }
    return out


def _pct(right: torch.Tensor) -> float:
    return round(100 * float(right.float().mean()), 1)


def _accuracy_over(bank, data) -> float:
    from model_store.inference import TextCache
    from training.evaluate import accuracy_and_routes

    return accuracy_and_routes(bank, data, bank.tasks[0].name, TextCache())[0]


def summary(rows: dict[str, dict]) -> dict:
    """Per split and mode (pinned, auto): each policy's mean over the domains on A, on B, and balanced."""
    out: dict = {}
    for split in ("val", "test"):
        for mode in ("pinned", "auto"):
            mean = {
                part: {p: round(sum(r[split][part][mode][p] for r in rows.values()) / len(rows), 1) for p in POLICIES}
                for part in ("A", "B")
            }
            mean["balanced"] = {p: round((mean["A"][p] + mean["B"][p]) / 2, 1) for p in POLICIES}
            out.setdefault(split, {})[mode] = mean
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default=DEFAULT_DOMAINS, help="comma-separated offline domains")
    parser.add_argument("--unknown", default="2,3", help="classes left out of training, asked at test (a list)")
    parser.add_argument("--steps", type=int, default=500, help="training steps per task (clipbank train's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from model_store.backbone import load_backbone

    backbone = load_backbone("tiny", "cpu")
    report: dict = {"seed": args.seed, "steps": args.steps}
    for unknown in (int(u) for u in args.unknown.split(",")):
        rows = {}
        for name in args.domains.split(","):
            torch.manual_seed(args.seed)
            rows[name] = measure(backbone, name, unknown, args.steps, args.seed)
            print(f"unknown {unknown}: {name} done", file=sys.stderr, flush=True)
        report[f"unknown_{unknown}"] = {"domains": rows, "mean": summary(rows)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
