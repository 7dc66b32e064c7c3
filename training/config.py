"""The settings of the training commands, as plain dataclasses: cheap to import, so the command line can make
its flags from them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_store.modes import DEFAULT_SELECTOR, SELECTOR_NAMES
from model_store.settings import option


@dataclass(frozen=True)
class TrainJob:
    task: str = field(metadata={"help": "task name, [a-z0-9][a-z0-9._-]{0,63}"})
    data: str = field(metadata={"help": "ImageFolder: one sub-folder per class (_ reads as a space)"})
    val: str | None = option(None, "validation ImageFolder (default: 20% held out of --data)")
    backbone: str = option("tiny", "backbone reference")
    store: str | None = option(None, "store folder: train on top of its bank and put the bundle there")
    out: str | None = option(None, "also write the bundle file here")
    steps: int = option(500, "training steps")
    batch_size: int = option(64, "images per step")
    lr: float | None = option(None, "peak learning rate (default: 1e-2 for narrow backbones such as tiny, else 1e-3)")
    new_experts: int = option(2, "new experts per block and tower")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    selector: str = option(
        DEFAULT_SELECTOR, "the task's selector kind (docs/benchmarks/routing.md compares them)", SELECTOR_NAMES
    )
    reference: str | None = option(None, "reference set file (default: the backbone's, if one was built or ships)")
    activate: bool = option(True, "make the stored version active")
    progress: bool = True


@dataclass
class PretrainConfig:
    steps: int = option(4000, "training steps")
    batch_size: int = option(128, "image-caption pairs per step")
    lr: float = option(1e-3, "peak learning rate")
    warmup: int = option(100, "warm-up steps")
    weight_decay: float = option(0.1, "AdamW weight decay")
    seed: int = option(0, "random seed (0 reproduces the committed weights)")
    eval_per_class: int = option(40, "zero-shot evaluation images per class")
    characters: float = option(
        0.0, "share of images showing a printed letter or digit (0: the committed weights; 0.4: the reading variant)"
    )
