"""Label sets' text embeddings: the LRU cache the server keeps them in, the job that encodes a set a chunk of
prompts at a time (so a long list can be interleaved with image batches), and the check that a set's labels are
distinct to the tokenizer."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .bank import BankSnapshot
from .errors import InvalidRequest
from .labels import label_key, twin_labels, twin_message
from .modes import ZERO_SHOT
from .moe_clip import encode_text


class TextCache:
    """A thread-safe LRU of normalised text embeddings keyed by (bundle id or zero-shot, labels, templates).

    Bounded in entries and in bytes (tensor bytes plus the key's characters), whichever is reached first.
    """

    def __init__(self, maxsize: int = 1024, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.bytes_held = 0

    def get_or_compute(self, key: tuple, compute) -> torch.Tensor:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key][0]
            self.misses += 1
        value = compute()
        size = value.numel() * value.element_size() + sum(len(s) for part in key[1:] for s in part)
        if size > self.max_bytes or self.maxsize == 0:
            return value
        with self._lock:
            if key not in self._data:
                self._data[key] = (value, size)
                self.bytes_held += size
            while len(self._data) > self.maxsize or self.bytes_held > self.max_bytes:
                self.bytes_held -= self._data.popitem(last=False)[1][1]
        return value

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._data


TEXT_CHUNK = 256  # prompts per text forward pass, so a long label list never makes one huge batch


def text_key(bank: BankSnapshot, task: int, labels: Sequence[str], templates: Sequence[str]) -> tuple:
    """The text cache's key: (bundle id or zero-shot, labels, templates); a new version has a new bundle id."""
    return (bank.tasks[task].bundle_id if task >= 0 else ZERO_SHOT, tuple(labels), tuple(templates))


class TextJob:
    """One label set's text embeddings, encoded a chunk of prompts at a time (so a long list can be interleaved
    with other work). Per label: encode with each template, normalise, average, renormalise. `task=-1` is the
    frozen tower."""

    def __init__(self, bank: BankSnapshot, task: int, labels: Sequence[str], templates: Sequence[str]) -> None:
        self.bank, self.task = bank, task
        self.key = text_key(bank, task, labels, templates)
        self.labels = tuple(labels)
        self.shape = (len(templates), len(labels))
        self.templates = tuple(templates)
        self._parts: list[torch.Tensor] = []
        self._signatures: list[bytes] = []  # each prompt's token ids: labels the tokenizer merges are refused
        self._done = 0

    @functools.cached_property
    def prompts(self) -> list[str]:
        """Made when first needed: a job whose label set is cached is dropped before (`service/steps.py`)."""
        return [t.format(text) for t in self.templates for text in prompt_texts(self.bank, self.task, self.labels)]

    @property
    def remaining(self) -> int:
        return len(self.prompts) - self._done

    @property
    def remaining_chars(self) -> int:
        return sum(len(p) for p in self.prompts[self._done :])

    def fit(self, chars: int) -> int:
        """How many of the next prompts fit in `chars` characters (at least one): tokenizing is most of a long
        prompt's cost, and it grows with its length."""
        n, total = 0, 0
        for p in self.prompts[self._done :]:
            total += len(p)
            if n and total > chars:
                break
            n += 1
        return n

    def step(self, n: int = TEXT_CHUNK) -> bool:
        """Encode the next `n` prompts; True once every prompt is encoded."""
        bb = self.bank.backbone
        chunk = self.prompts[self._done : self._done + max(1, n)]
        if chunk:
            tokens = bb.tokenizer(chunk)
            self._signatures += token_signatures(tokens)
            tokens = tokens.to(bb.device)
            with torch.inference_mode(), bb.compute():
                if self.task >= 0:
                    routing = self.bank.routing(torch.full((len(chunk),), self.task))
                    self._parts.append(encode_text(bb.model, tokens, routing).float())
                else:
                    self._parts.append(bb.frozen.text(tokens).float())
            self._done += len(chunk)
        return self.remaining == 0

    def result(self) -> torch.Tensor:
        """The label set's embeddings [L, D]; InvalidRequest if two labels are one to the tokenizer."""
        while not self.step():
            pass
        twins = twin_labels(self.labels, self._signatures, self.shape[0])
        if twins is not None:
            raise InvalidRequest(f"labels {twin_message(twins)}")
        emb = torch.cat(self._parts).view(*self.shape, -1).mean(0)
        return torch.nn.functional.normalize(emb, dim=-1)


def prompt_texts(bank: BankSnapshot, task: int, labels: Sequence[str]) -> list[str]:
    """The text each label is encoded as: through a task, a label that names one of its classes as routing matches
    them (`label_key`: case, `_` and Unicode spelling aside) is that class, as it was trained; others, and labels
    for the frozen tower, as sent. An outside check's client sending folder names (`weißes_rauschen`) was routed
    to the task that knows the class, then scored the literal text the task never learned: 0 of 20 right."""
    classes = bank.tasks[task].classes if task >= 0 else ()
    if task < 0 or tuple(labels) == classes:  # zero-shot, or a request without labels: as they are
        return list(labels)
    exact, keyed = set(classes), {label_key(c): c for c in classes}
    return [label if label in exact else keyed.get(label_key(label), label) for label in labels]


def token_signatures(tokens: torch.Tensor) -> list[bytes]:
    """Each row of token ids [n, context] as bytes, without its trailing padding (the rows have one length, so
    equal signatures mean equal rows)."""
    rows = tokens.cpu().numpy()
    return [np.trim_zeros(r, "b").tobytes() for r in rows]


def tokenizer_twins(tokenizer: Any, labels: Sequence[str], templates: Sequence[str]) -> tuple[str, str] | None:
    """The first two of `labels` that `tokenizer` reads the same under every template, or None."""
    prompts = [t.format(label) for t in templates for label in labels]
    return twin_labels(labels, token_signatures(tokenizer(prompts)), len(templates))


def text_embeddings(
    bank: BankSnapshot,
    task: int,
    labels: Sequence[str],
    templates: Sequence[str],
    cache: TextCache | None = None,
    known: Mapping[tuple, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A label set's normalised text embeddings [L, D]: from `known`, the cache, or computed (and cached)."""
    key = text_key(bank, task, labels, templates)
    if known is not None and key in known:
        value = known[key]
        return value if cache is None else cache.get_or_compute(key, lambda: value)

    def compute() -> torch.Tensor:
        return TextJob(bank, task, labels, templates).result()

    return compute() if cache is None else cache.get_or_compute(key, compute)
