"""How well could any selector tell the domains apart? `python -m benchmarks.routing_ceiling` (6 minutes here).

A supervised ceiling for routing: classifiers trained *with* domain labels (which no per-task selector has) on
features of the frozen image tower, scored on the domains' test images. Features: the normalised embedding the
selectors use today, and each block's token states summarised per image (mean and standard deviation over the
tokens: where a rendering's low-level statistics live, which the final embedding is trained to abstract away).
If no feature set reaches the issue's 0.97, no selector built on it will.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_DOMAINS = "sketches,colours,textures,crowds,digits,zoomed,shapes"  # `bench cl`'s sequence and its outside


def block_features(backbone, images: Sequence, batch: int = 128) -> dict[str, np.ndarray]:
    """{"emb": the normalised embedding, "mean{b}"/"std{b}": the token states entering block b (b = L: after the
    last), averaged and spread over the tokens}, one row per image."""
    from model_store.moe_clip import encode_image, run_blocks

    model, parts = backbone.model.eval(), {}
    blocks = model.visual.transformer.resblocks
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.stack([backbone.preprocess(im) for im in images[i : i + batch]])
            tokens = model.visual._embeds(x)
            for b in range(len(blocks) + 1):
                if b:
                    tokens = run_blocks(blocks, tokens, None, "visual", None, b - 1, b)
                parts.setdefault(f"mean{b}", []).append(tokens.mean(1).numpy())
                parts.setdefault(f"std{b}", []).append(tokens.std(1).numpy())
            parts.setdefault("emb", []).append(encode_image(model, x).numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def domain_features(backbone, names: Sequence[str], split: str, limit: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from training.data import load_domain

    feats: dict[str, list[np.ndarray]] = {}
    labels: list[int] = []
    for d, name in enumerate(names):
        images = list(load_domain(name, split).images)[:limit]
        for k, v in block_features(backbone, images).items():
            feats.setdefault(k, []).append(v)
        labels += [d] * len(images)
    return {k: np.concatenate(v) for k, v in feats.items()}, np.array(labels)


def ceiling(train, test, keys: Sequence[str], names: Sequence[str], kind: str) -> dict:
    """Accuracy of a classifier (`linear`: logistic regression; `mlp`: one hidden layer of 256) on `keys`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    x_train = np.concatenate([train[0][k] for k in keys], 1)
    x_test = np.concatenate([test[0][k] for k in keys], 1)
    scaler = StandardScaler().fit(x_train)
    if kind == "linear":
        clf = LogisticRegression(max_iter=2000)
    else:
        clf = MLPClassifier((256,), max_iter=500, alpha=1e-3, random_state=0)
    predicted = clf.fit(scaler.transform(x_train), train[1]).predict(scaler.transform(x_test))
    truth = test[1]
    per = {names[d]: round(float((predicted[truth == d] == d).mean()), 3) for d in np.unique(truth)}
    return {
        "features": "+".join(keys),
        "classifier": kind,
        "accuracy": round(float((predicted == truth).mean()), 4),
        "per_domain": per,
    }


def feature_sets(blocks: int) -> list[list[str]]:
    every = [f"mean{b}" for b in range(blocks + 1)] + [f"std{b}" for b in range(blocks + 1)]
    return [
        ["emb"],
        *([f"mean{b}", f"std{b}"] for b in range(blocks + 1)),
        [f"mean{blocks // 2}", f"std{blocks // 2}", "emb"],
        [*every, "emb"],
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing_ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--domains", default=DEFAULT_DOMAINS, help="comma-separated offline domains")
    parser.add_argument("--backbone", default="tiny", help="backbone reference (default: the tiny one)")
    parser.add_argument("--limit", type=int, default=600, help="images per domain and split, at most")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    from model_store.backbone import load_backbone

    torch.set_num_threads(1)
    names = [n.strip() for n in args.domains.split(",") if n.strip()]
    backbone = load_backbone(args.backbone, "cpu")
    train = domain_features(backbone, names, "train", args.limit)
    test = domain_features(backbone, names, "test", args.limit)
    blocks = len(backbone.model.visual.transformer.resblocks)
    rows = [ceiling(train, test, keys, names, "linear") for keys in feature_sets(blocks)]
    rows += [ceiling(train, test, keys, names, "mlp") for keys in (["emb"], feature_sets(blocks)[-1])]
    for row in rows:
        print(f"{row['classifier']:6} {row['accuracy']:.4f}  {row['features'][:70]}", flush=True)
    if args.out:
        args.out.write_text(
            json.dumps({"domains": names, "train": len(train[1]), "test": len(test[1]), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
