"""The papers' prompts for the real protocols: per-dataset templates and cleaned class names.

ZSCL and MoE-Adapters4CL score each MTIL dataset with CLIP's per-dataset prompt ensembles (CLIP's
`data/prompts.md`) and hand-cleaned class names. We take both from the `clip_benchmark` package (MIT licence,
LAION's maintained CLIP benchmark, pinned in the `papers` extra) instead of typing lists: its
`en_zeroshot_classification_templates.json` and `en_classnames.json`. The files are read from the installed package
without importing it (its import pulls in heavy optional libraries).

Where `clip_benchmark` has no cleaned names for a dataset (aircraft, CIFAR-100, DTD, Food-101, Cars, SUN397), the
torchvision names are used with underscores as spaces, as before.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from model_store.labels import template_ok

# MoE-Adapters4CL's class-incremental CIFAR-100 prompt (`cil/configs/class/cifar100_*-MoE-Adapters.yaml`)
CIFAR_TEMPLATE = "a bad photo of a {}."
# our dataset names -> clip_benchmark's keys
KEYS = {
    "aircraft": "fgvc_aircraft",
    "caltech101": "caltech101",
    "cifar100": "cifar100",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "flowers": "flowers",
    "food": "food101",
    "mnist": "mnist",
    "pets": "pets",
    "cars": "cars",
    "sun397": "sun397",
}
INSTALL_HINT = "pip install 'clipbank[papers]' (or pip install --no-deps clip-benchmark==1.6.2)"


class PromptsUnavailable(RuntimeError):
    """The papers' prompts were asked for and clip_benchmark is not installed."""


@functools.cache
def _files() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(class names, templates) of clip_benchmark's English files, keyed by its dataset names."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise PromptsUnavailable(
            f"the papers' per-dataset templates and class names come from clip_benchmark, which is not installed: "
            f"{INSTALL_HINT}; or pass --prompts plain (one template, torchvision's names)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets"
    names = json.loads((folder / "en_classnames.json").read_text(encoding="utf-8"))
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text(encoding="utf-8"))
    return names, templates


def check_available() -> None:
    """Raise PromptsUnavailable (with how to install) before any long work, if clip_benchmark is missing."""
    _files()


def paper_templates(name: str) -> tuple[str, ...]:
    """The dataset's prompt ensemble, `{c}` written as our `{}`."""
    key = KEYS.get(name)
    if key is None:
        raise ValueError(f"no papers' prompts for {name!r}; known: {', '.join(KEYS)}")
    out = tuple(t.replace("{c}", "{}") for t in _files()[1][key])
    bad = [t for t in out if not template_ok(t)]
    if not out or bad:
        raise ValueError(f"clip_benchmark's templates for {key} are not usable here: {bad or 'none'}")
    return out


def paper_classes(name: str, raw: Sequence[str]) -> tuple[str, ...]:
    """The dataset's cleaned class names in the order of `raw` (torchvision's), or `raw` where clip_benchmark has
    none. Caltech-101's list starts with the background class, which torchvision drops."""
    cleaned = _files()[0].get(KEYS.get(name, ""))
    if cleaned is None:
        return tuple(raw)
    if name == "caltech101" and len(cleaned) == len(raw) + 1 and cleaned[0] == "background":
        cleaned = cleaned[1:]
    if len(cleaned) != len(raw):
        raise ValueError(f"{name}: clip_benchmark has {len(cleaned)} class names, the data has {len(raw)} classes")
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"{name}: clip_benchmark's class names are not distinct")
    return tuple(cleaned)


def source() -> str:
    """Where the papers' prompts come from, for the report."""
    from importlib.metadata import version

    return f"clip_benchmark {version('clip-benchmark')}"
