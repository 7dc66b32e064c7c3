"""Backbone references (`tiny`, `ViT-B-16:openai`, `ARCH:file:/w.safetensors`, ...), parsed without torch, so
that settings can refuse a malformed one before the backbone's libraries load (seconds)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BackboneError

TINY_DIR = Path(__file__).parent / "tiny_clip"
TINY_WEIGHTS = TINY_DIR / "open_clip_model.safetensors"
DEFAULT_BACKBONE = "tiny"

REFERENCE_HELP = (
    "backbone references: 'tiny' (embedded), 'ARCH:TAG' (open_clip name and pretrained tag, e.g. ViT-B-16:openai), "
    "'ARCH:file:/path/weights.safetensors', 'local-dir:/dir' (open_clip_config.json plus weights), "
    "'file:/dir/weights.safetensors' (open_clip_config.json beside it), 'ARCH:none' (random weights, for benchmarks)"
)


@dataclass(frozen=True)
class BackboneRef:
    """A parsed backbone reference: an open_clip model name (or local-dir:) plus where its weights come from."""

    text: str
    model_name: str
    weights: str | None  # a pretrained tag, a checkpoint path, or None for random weights
    weights_is_file: bool = False

    # arch and pretrained name the backbone in bundles' manifests and on the open /readyz: a local folder or file
    # by its name only, never its path (the fingerprint, not the name, says which weights they are)
    @property
    def arch(self) -> str:
        if self.text == "tiny":
            return "clipbank-tiny"
        if self.model_name.startswith("local-dir:"):
            return Path(self.model_name.removeprefix("local-dir:")).name or "local-dir"
        return self.model_name

    @property
    def pretrained(self) -> str:
        if self.text == "tiny":
            return "embedded"
        if self.weights is None and self.model_name.startswith("local-dir:"):
            return "local-dir"  # the folder's own weights file (random weights only when it has none)
        if self.weights is None:
            return "none"
        if self.weights_is_file:
            return f"file:{Path(self.weights).name}"
        return Path(self.weights).name if "/" in self.weights else self.weights  # open_clip takes a path as a tag


def parse_backbone_ref(text: str) -> BackboneRef:
    """Parse a reference such as `tiny`, `ViT-B-16:openai` or `file:/m/model.safetensors`."""
    text = text.strip()
    if text.lower() == DEFAULT_BACKBONE:  # `Tiny` named the embedded backbone, and was refused as an open_clip name
        text = DEFAULT_BACKBONE
    if text == "tiny":
        return BackboneRef(text, f"local-dir:{TINY_DIR}", str(TINY_WEIGHTS), True)
    if text.startswith("local-dir:"):  # `~` expanded: no shell does it after `file:`, nor a .env file
        return BackboneRef(text, f"local-dir:{os.path.expanduser(text[10:])}", None)
    if text.startswith("file:"):
        path = Path(os.path.expanduser(text[5:]))
        return BackboneRef(text, f"local-dir:{path.parent}", str(path), True)
    name, sep, rest = text.partition(":")
    if not name and sep:
        raise BackboneError(f"backbone reference {text!r} needs an open_clip model name before ':'; {REFERENCE_HELP}")
    if not name or not sep or not rest:
        if "/" in text or text.endswith((".safetensors", ".pt", ".bin")):
            hint = f" (a file: 'file:{text}')"
        else:  # an open_clip name alone: its likely spellings
            hint = f" (e.g. '{name}:openai' or '{name}:file:/path/weights.safetensors')"
        raise BackboneError(f"backbone reference {text!r} needs a weights part{hint}; {REFERENCE_HELP}")
    if rest == "none":
        return BackboneRef(text, name, None)
    if rest.startswith("file:"):
        return BackboneRef(text, name, os.path.expanduser(rest[5:]), True)
    return BackboneRef(text, name, os.path.expanduser(rest) if rest.startswith("~") else rest)
