"""Trained bundles plus test images of their domains, made on the spot, for service benchmarks."""

from __future__ import annotations

import io
import tempfile

from tqdm import tqdm

from model_store.backbone import load_backbone
from model_store.loader import BankLoader
from model_store.store import LocalStore

from .data import load_domain
from .trainer import TrainConfig, train_task

TASK_DOMAINS = ("textures", "glyphs", "digits")
OUTSIDE_DOMAIN = "shapes"  # the tiny backbone's own domain: no task should claim it


def domain_pngs(domain: str, n: int) -> list[bytes]:
    """PNG bytes of n test images of an offline domain, evenly spaced over its (shuffled) test split."""
    images = load_domain(domain, "test").images
    out = []
    for im in images[:: max(1, len(images) // n)][:n]:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def sample_tasks(
    n: int, steps: int = 100, backbone: str = "tiny", images: int = 8
) -> tuple[list[tuple[bytes, list[bytes]]], list[bytes]]:
    """`n` tasks trained one on top of the other (domains cycle; repeats get a new name and seed).

    Returns [(bundle bytes, PNGs of its domain)] and PNGs of the outside domain.
    """
    bb = load_backbone(backbone)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        for k in tqdm(range(n), desc="training sample tasks", unit="task"):
            domain = TASK_DOMAINS[k % len(TASK_DOMAINS)]
            name = domain if k < len(TASK_DOMAINS) else f"{domain}-{k // len(TASK_DOMAINS) + 1}"
            cfg = TrainConfig(task=name, steps=steps, seed=k)
            result = train_task(
                BankLoader(store, bb).load(),
                load_domain(domain, "train"),
                cfg,
                load_domain(domain, "val"),
                progress=False,
            )
            store.put(result.bundle)
            out.append((result.bundle, domain_pngs(domain, images)))
    return out, domain_pngs(OUTSIDE_DOMAIN, images * 2)
