"""Checks of a checkpoint file and of the weights loaded from it, before a backbone is made of them."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import BackboneError


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(9)


def _is_safetensors(head: bytes) -> bool:
    return head[8:9] == b"{"  # an 8-byte header length, then JSON


def looks_like_checkpoint(path: Path) -> bool:
    """A safetensors file or a PyTorch one (a zip, or a legacy pickle)."""
    head = _head(path)
    return _is_safetensors(head) or head.startswith((b"PK\x03\x04", b"\x80"))


def misnamed(path: Path) -> str | None:
    """Why a checkpoint's name would make open_clip read it wrong: it picks the loader by the suffix (a safetensors
    file named .pt was said to hold "pickled Python objects"; a PyTorch one named .safetensors, "header too large")."""
    safetensors = _is_safetensors(_head(path))
    named = path.name.endswith(".safetensors")  # open_clip's own test: `.SAFETENSORS` is read as a pickle
    if safetensors == named:
        return None
    kind, right = ("safetensors", ".safetensors") if safetensors else ("PyTorch", ".pt")
    named_as = f"named {path.suffix}" if path.suffix else "without a suffix"
    return f"{path} is a {kind} file {named_as}: open_clip reads a file by its name, so rename it to end in {right}"


def misfit(model: Any, path: Path) -> str | None:
    """Why a safetensors checkpoint does not fit the built architecture, by its tensors' names and shapes, read
    from its header before open_clip loads it: open_clip's first failure on another architecture can be anything
    (resizing a position embedding in half precision, say). Position embeddings may differ: open_clip resizes them."""
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k.removeprefix("module."): list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # not safetensors, or unreadable: open_clip's loader says what it finds
        return None
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    numel = {k: math.prod(v) for k, v in shapes.items()}
    differ = [  # open_clip resizes position embeddings, and reshapes a scalar logit_scale of [1] or []
        k for k in want if k in shapes and numel[k] != math.prod(want[k]) and not k.endswith("positional_embedding")
    ]
    missing = [k for k in want if k not in shapes]
    if not differ and len(missing) <= len(want) // 2:
        return None
    first = f"; first: {differ[0]} is {shapes[differ[0]]}, needs {want[differ[0]]}" if differ else ""
    return (
        f"the checkpoint does not fit this architecture: {len(differ)} of its tensors have other shapes and "
        f"{len(missing)} of the model's {len(want)} are missing{first}"
    )


def refuse_non_finite(model: Any, name: str) -> None:
    """BackboneError for weights holding NaN or inf: such a backbone answers every image with null scores."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise BackboneError(
            f"backbone {name!r} has weights that are not finite (NaN or inf) in {len(bad)} tensors, first "
            f"{bad[0]}: it cannot answer; retrain or restore its checkpoint"
        )


# what open_clip and huggingface_hub raise when weights can be neither downloaded nor found in the cache
DOWNLOAD_ERRORS = frozenset({"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout"})


def download_failed(error: BaseException) -> bool:
    """Whether loading pretrained weights failed for want of the hub (not a damaged file or a wrong name)."""
    seen: BaseException | None = error
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            return False
        if type(seen).__name__ in DOWNLOAD_ERRORS or str(seen).startswith("Failed to download"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


NO_DOWNLOAD = (
    "Its weights are neither in the local cache ($HF_HOME) nor reachable on the model hub from here: copy the "
    "checkpoint onto this machine and name it as 'ARCH:file:/path/weights.safetensors' (README, Backbones), or "
    "fill the cache where the hub is reachable"
)
OFFLINE_HINT = "; HF_HUB_OFFLINE=1 skips the hub's retries"


def no_download(environ: Mapping[str, str] | None = None) -> str:
    """What to do when the hub is out of reach (the hint to set HF_HUB_OFFLINE only where it is not set)."""
    offline = (os.environ if environ is None else environ).get("HF_HUB_OFFLINE", "").strip().lower()
    return NO_DOWNLOAD + ("" if offline in ("1", "true", "yes", "on") else OFFLINE_HINT)


def first_line(error: Exception) -> str:
    """An exception's message in one line, without terminal colours: torch's weights-only refusal goes on with
    advice to unpickle the file, and a checkpoint of another size lists every mismatched tensor."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if "size mismatch" in text:
        count = text.count("size mismatch for ")
        first = next((line.strip() for line in lines if "size mismatch for " in line), "")
        return f"the checkpoint's tensors have other sizes than this architecture's ({count}; first: {first})"
    line = lines[0] if lines else type(error).__name__
    if len(line) <= 300:
        return line
    cut = line[:300].rsplit(" ", 1)[0]  # between words, unless that loses most of it (a long path or URL)
    return (cut if len(cut) >= 200 else line[:300]) + " [...]"
