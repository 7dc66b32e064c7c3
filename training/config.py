"""The settings of the training commands, as plain dataclasses: cheap to import, so the command line can make
its flags from them without loading torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from model_store.modes import DEFAULT_SELECTOR, SELECTOR_NAMES
from model_store.settings import check_settings, option


@dataclass(frozen=True)
class TrainJob:
    task: str = field(metadata={"help": "task name, [a-z0-9][a-z0-9._-]{0,63}"})
    data: str = field(metadata={"help": "ImageFolder: one sub-folder per class (_ reads as a space)"})
    val: str | None = option(None, "validation ImageFolder (default: 20% held out of --data)")
    skip_bad: bool = option(False, "leave out files that cannot be read as images (listed in a warning), not stop")
    backbone: str = option("tiny", "backbone reference")
    store: str | None = option(
        None, "a store (a folder, or s3://bucket/prefix): train on top of its bank and put the bundle there"
    )
    out: str | None = option(None, "also write the bundle file here (an existing file only with --overwrite)")
    overwrite: bool = option(False, "let --out replace an existing file")
    version: int | None = option(
        None, "the bundle's version without --store (default 1; a server already holding v1 takes 2 and up)"
    )
    steps: int = option(500, "training steps")
    batch_size: int = option(64, "images per step")
    lr: float | None = option(None, "peak learning rate (default: 1e-2 for narrow backbones such as tiny, else 1e-3)")
    new_experts: int = option(2, "new experts per block and tower")
    expert_blocks: int | None = option(
        None,
        "experts only in the top K blocks of each tower (0: all); a routed image then shares the frozen pass "
        "below them. Default: the bank's, or for its first task every block (0: measured best, docs/method.md)",
    )
    seed: int = option(0, "random seed")
    template: str = option("a photo of a {}.", "the training loss's prompt; one {} stands for the class name")
    templates: str | None = option(
        None,
        "the prompt ensemble the bundle is validated and served with, '|'-separated, e.g. "
        "'a photo of a {}.|a sketch of a {}.' (default: --template alone)",
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    threads: int = option(
        0, "CPU compute threads (0: PyTorch's default, one per core; 1 on a host other jobs keep busy)"
    )
    selector: str = option(
        DEFAULT_SELECTOR, "the task's selector kind (docs/benchmarks/routing.md compares them)", SELECTOR_NAMES
    )
    reference: str | None = option(None, "reference set file (default: the backbone's, if one was built or ships)")
    activate: bool = option(True, "make the stored version active, unless a server's interference gate would refuse it")
    force: bool = option(
        False, "with --store: activate the version even when a server's interference gate would refuse it"
    )
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

    def __post_init__(self) -> None:
        names = ("steps", "batch_size", "eval_per_class")
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in names if getattr(self, k) < 1]
        if self.warmup < 0 or not 0 < self.lr < float("inf") or not 0 <= self.characters <= 1:
            problems.append(
                f"need warmup >= 0, lr > 0 and characters in [0, 1]; got {self.warmup}, {self.lr}, {self.characters}"
            )
        if not 0 <= self.weight_decay < float("inf"):  # NaN too: it made every weight NaN, and exited 0
            problems.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if problems:
            raise ValueError("invalid pretraining settings: " + "; ".join(problems))


CL_PROTOCOLS = ("mtil-1", "mtil-2", "cifar100-10", "cifar100-20", "cifar100-50")
PROMPTS = ("papers", "plain")  # the papers' ensembles and names (prompts.py), or one template and raw names


@dataclass(frozen=True)
class CLJob:
    """`clipbank bench cl`: the offline sequence by default, or a real protocol on --data-root."""

    quick: bool = option(False, "60 steps of 32, fewer images, one seed: under 5 minutes on 2 cores")
    domains: str = option(
        "sketches,colours,textures,crowds,digits,zoomed",
        "offline domains, in order (colours, zoomed, crowds: concepts the tiny backbone knows)",
    )
    outside: str = option("shapes", "a domain no task learns (for zero-shot fallback); '' for none")
    steps: int | None = option(None, "training steps per task for every method (default 300)")
    methods: str | None = option(
        None,
        "comma-separated methods (default: all but adapter and moe-ddas-warm); known: zero-shot, finetune, wise-ft, "
        "adapter, adapter-ddas, moe-oracle, moe-ddas, moe-gauss, moe-ddas-warm",
    )
    test_limit: int | None = option(None, "at most this many val and test images per domain")
    backbone: str | None = option(None, "default: tiny offline, ViT-B-16:openai for --protocol")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    seed: int = option(0, "random seed of the first run")
    seeds: int | None = option(None, "runs, each with its own seed; figures are mean ± std (default 3, --quick 1)")
    class_incremental: bool = option(True, "also learn digits as 3 versions of one task, each adding classes")
    out: str = option("runs/bench-cl", "report.json, report.md and PNG plots go here ('' to print only)")
    expert_blocks: str | None = option(
        None,
        "more K values (experts in the top K blocks of each tower) for the MoE bank, each trained and reported "
        "beside the default's on the first seed, e.g. '2,1' (L/2 and L/4 of the tiny backbone); default: none",
    )
    workers: int | None = option(
        None,
        "processes the seeds' parts run in, side by side (default: one per core up to 4 on a CPU, 1 on a GPU); "
        "the figures do not depend on it (up to float rounding)",
    )
    routing: bool = option(
        True, "run the long routing sequence (12 tasks, near outside domains, every selector kind; ~1 min on tiny)"
    )
    protocol: str | None = option(
        None,
        "a real protocol on --data-root instead of the offline domains (use --backbone ViT-B-16:openai)",
        CL_PROTOCOLS,
    )
    data_root: str | None = option(None, "ROOT/<dataset>/{train,test}/<class>/ folders, or torchvision data")
    limit: int | None = option(None, "at most this many images per class (a dry run)")
    shots: int | None = option(
        None, "few-shot MTIL: this many training images per class (the papers' is 5; 500 steps unless --steps)"
    )
    prompts: str = option(
        "papers",
        "real protocols: the papers' per-dataset prompt ensembles and cleaned class names (from clip_benchmark), "
        "or 'plain': one template and torchvision's names",
        PROMPTS,
    )

    def __post_init__(self) -> None:  # 0 used to mean the default, and a negative limit scored empty test sets
        for name in ("steps", "test_limit", "seeds", "shots", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        check_settings(self, ())  # an --out that is a file: refused now, not after the run
        if not 0 <= self.seed < 2**31:  # NumPy's generators take 0 .. 2**32 - 1: -1 failed in the first part
            raise ValueError(f"--seed must be in 0 .. {2**31 - 1}, got {self.seed}")
        self._check_protocol()
        if self.protocol is None:  # the offline domains, checked before any worker starts
            from .domains import DOMAINS

            seq = [d for d in self.domains.split(",") if d]
            unknown = [d for d in [*seq, self.outside] if d and d not in DOMAINS]
            if unknown:
                raise ValueError(
                    f"unknown domain(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(DOMAINS))}"
                )
            if len(seq) < 2:
                raise ValueError(f"--domains: a continual run needs at least 2 domains, got {len(seq)}")
            if twice := sorted({d for d in seq if seq.count(d) > 1}):  # two tasks of one domain: the run started
                raise ValueError(f"--domains: {', '.join(twice)} named twice; each domain is one task")
            if self.outside in seq:
                raise ValueError(f"--outside {self.outside} is also learned (--domains): it must be one no task learns")
        if self.methods is not None and {m.strip() for m in self.methods.split(",") if m.strip()} <= {"zero-shot"}:
            raise ValueError("--methods: zero-shot is what the methods are compared with; name at least one more")

    def _check_protocol(self) -> None:
        """--protocol's data, before a backbone is loaded (ViT-B-16 takes a minute) and datasets are indexed."""
        if self.protocol is None:
            if self.shots is not None:
                raise ValueError("--shots is for few-shot MTIL: give --protocol mtil-1 or mtil-2 too")
            for name in ("data_root", "limit"):
                if getattr(self, name) is not None:
                    raise ValueError(f"--{name.replace('_', '-')} is for the real protocols: give --protocol too")
            return
        if self.shots is not None and not self.protocol.startswith("mtil"):
            raise ValueError("--shots is for the MTIL protocols (few-shot MTIL), not CIFAR-100")
        if self.limit is not None and self.limit < 2:
            raise ValueError(
                f"--limit must be >= 2 (one image per class to train on, one to validate), got {self.limit}"
            )
        if not self.data_root:
            raise ValueError(f"--protocol {self.protocol} needs --data-root DIR")
        if not os.path.isdir(self.data_root):
            what = "a file" if os.path.exists(self.data_root) else "not found"
            raise ValueError(f"--data-root {self.data_root}: {what}; it must be the folder holding the datasets")


@dataclass(frozen=True)
class RoutingJob:
    """`clipbank bench routing`: routing alone, 12 tasks in turn, look-alike pairs, near outside domains."""

    kinds: str | None = option(
        None, "comma-separated selector kinds (default: hybrid,autoencoder,gaussian,discriminative)"
    )
    backbone: str | None = option(None, "default: tiny")
    reference: str | None = option(None, "reference set file (default: the backbone's, if one was built)")
    out: str = option("runs/bench-routing", "report.json, report.md and routing.png go here ('' to print only)")

    def __post_init__(self) -> None:
        check_settings(self, ())
        unknown = [k for k in (self.kinds or "").split(",") if self.kinds and k not in SELECTOR_NAMES]
        if unknown:  # before any selector is fitted
            raise ValueError(
                f"--kinds: unknown selector kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(SELECTOR_NAMES)}"
            )


def jsonable(d: Any) -> Any:
    """A config's dict as JSON: containers kept, other values that JSON has no type for as their repr."""
    if isinstance(d, dict):
        return {k: jsonable(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [jsonable(v) for v in d]
    return d if isinstance(d, str | int | float | bool | type(None)) else repr(d)
