"""A new bank's task class embeddings, encoded before its trial run a chunk at a time, and the trial run itself
(`service/registry.py`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from model_store.bank import BankSnapshot
from model_store.errors import BundleInvalid, InvalidRequest
from model_store.inference import ClassifyItem, classify_batch
from model_store.text import TEXT_CHUNK, TextCache, TextJob


def encode_classes_in_steps(
    run: Callable[..., Any], bank: BankSnapshot, overrides: Mapping[str, object], cache: TextCache | None
) -> list[str]:
    """The tasks a change brings in (`overrides` not None), each one's class embeddings put into `cache` first, one
    chunk of prompts per job on the compute thread (`run`), so that the batches waiting run between them. A bundle
    of 10,000 classes x 10 templates (the bound) was one job of its trial run: 78 s on tiny, and every /classify
    waited that long (a security check). Twin labels are refused here, as the trial run would (before it encoded
    them all again in one job); anything else that fails is left to the trial run to name. A cache too small to
    keep a task's table (`text_cache_mb`) makes the trial run encode it again."""
    tasks = [t for t, bundle in overrides.items() if bundle is not None]
    if cache is None:
        return tasks
    for task in tasks:
        try:
            i = bank.task_index(task)
            job = TextJob(bank, i, bank.tasks[i].classes, bank.tasks[i].templates)
            if job.key in cache:
                continue
            while not run(job.step, TEXT_CHUNK):
                pass
            run(cache.get_or_compute, job.key, job.result)
        except InvalidRequest as e:  # two classes that are one to the tokenizer: the trial run's words, at once
            raise BundleInvalid(f"task {task!r} fails a trial classification: InvalidRequest: {e}") from None
        except Exception:  # the trial run meets it again, and says it as the upload's error
            continue
    return tasks


def trial_run(bank: BankSnapshot, tasks: list[str], cache: TextCache | None = None) -> None:
    """Classify one blank image pinned to each task, with its own classes, before the bank may serve. With the
    serving `cache`, the tasks' class embeddings (keyed by bundle id) are then ready for the first request."""
    if not tasks:
        return
    size = bank.backbone.image_size
    blank = torch.zeros(1, 3, size, size)
    outs = classify_batch(bank, [ClassifyItem(blank, None, task=t) for t in tasks], cache)
    for task, out in zip(tasks, outs, strict=True):
        if isinstance(out, Exception):
            raise BundleInvalid(f"task {task!r} fails a trial classification: {type(out).__name__}: {out}")
        if not all(math.isfinite(score) for result in out for _, score in result.labels):
            raise BundleInvalid(
                f"task {task!r} gives non-finite scores on a trial image: its expert or router weights overflow"
            )
