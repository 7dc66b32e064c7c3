"""Reference sets: frozen embeddings of generic outside images, one per backbone, the negatives selectors use.

A selector fitted on its own task alone never sees an image that is not its task, so it learns the look of its
pictures rather than their concept. A reference set shows it the rest of the world the backbone knows. It is a
safetensors file: `embeddings` [N, D] (normalised frozen image embeddings) and the backbone's fingerprint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as st_save

from .backbone import Backbone
from .backbone_ref import TINY_DIR
from .errors import BackboneMismatch, ReferenceInvalid
from .moe_clip import encode_image
from .pixels import viewed_rgb
from .safejson import loads as bounded_loads
from .settings import cache_root, env_value
from .store import atomic_write

REFERENCE_KEY = "clipbank.reference"
TINY_REFERENCE = TINY_DIR / "reference.safetensors"
MAX_REFERENCE = 50_000


@dataclass(frozen=True)
class ReferenceSet:
    """Normalised frozen embeddings [N, D] of generic images, for one backbone."""

    embeddings: torch.Tensor
    fingerprint: str
    source: str

    def __len__(self) -> int:
        return len(self.embeddings)

    def split(self, held_out: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit, held out): a deterministic split, so a false-claim rate is measured on images not fitted."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_held = int(round(len(self) * held_out))
        return self.embeddings[order[n_held:]], self.embeddings[order[:n_held]]


def embed_images(backbone: Backbone, images: Iterable[Image.Image], batch: int = 128) -> torch.Tensor:
    """Normalised frozen embeddings of PIL images, in batches."""
    out, chunk = [], []
    for img in images:
        chunk.append(backbone.preprocess(viewed_rgb(img)))  # as the server sees it (16-bit grey, transparency)
        if len(chunk) == batch:
            out.append(encode_image(backbone.model, torch.stack(chunk).to(backbone.device)).float().cpu())
            chunk = []
    if chunk:
        out.append(encode_image(backbone.model, torch.stack(chunk).to(backbone.device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)


def save_reference(path: str | os.PathLike, embeddings: torch.Tensor, backbone: Backbone, source: str) -> Path:
    """Write a reference set (float16 on disk: half the size, far below the selectors' resolution)."""
    if not 1 <= len(embeddings) <= MAX_REFERENCE:
        raise ValueError(f"a reference set holds 1..{MAX_REFERENCE} embeddings, got {len(embeddings)}")
    meta = {"format": 1, "backbone": backbone.describe(), "count": len(embeddings), "source": source}
    data = st_save({"embeddings": embeddings.to(torch.float16).contiguous()}, {REFERENCE_KEY: json.dumps(meta)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)  # a full disk leaves neither a part nor a temp file
    return path


def is_reference(path: str | os.PathLike) -> bool:
    """Whether `path` is a reference set file (safetensors with our metadata), whatever backbone made it."""
    try:
        with safe_open(str(path), "pt") as f:
            return REFERENCE_KEY in (f.metadata() or {})
    except Exception:  # safetensors raises its own error type for a file that is not one
        return False


def load_reference(path: str | os.PathLike, backbone: Backbone) -> ReferenceSet:
    """Read a reference set and check it belongs to `backbone` (its fingerprint) and fits its embeddings."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = bounded_loads((f.metadata() or {}).get(REFERENCE_KEY, "null"))
            emb = f.get_tensor("embeddings").float()
    except Exception as e:  # safetensors raises its own error type for a broken file
        raise ReferenceInvalid(f"reference set {Path(path).name} cannot be read: {str(e)[:160]}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("backbone"), dict):
        raise ReferenceInvalid(f"reference set {Path(path).name} has no {REFERENCE_KEY} metadata")
    fingerprint = meta["backbone"].get("fingerprint")
    if fingerprint != backbone.fingerprint:
        raise BackboneMismatch(
            f"reference set {Path(path).name} was made with backbone {str(fingerprint)[:12]}…, not the loaded "
            f"{backbone.fingerprint[:12]}…"
        )
    if emb.ndim != 2 or emb.shape[1] != backbone.embed_dim:
        shape = tuple(emb.shape)
        raise ReferenceInvalid(f"reference set {Path(path).name} holds {shape}, not [N, {backbone.embed_dim}]")
    if not bool(torch.isfinite(emb).all()):
        raise ReferenceInvalid(f"reference set {Path(path).name} holds values that are not finite (NaN or inf)")
    emb = torch.nn.functional.normalize(emb, dim=-1)
    return ReferenceSet(emb, fingerprint, str(meta.get("source", "")))


def cache_path(backbone: Backbone) -> Path:
    """Where `clipbank reference build` puts a backbone's reference set by default."""
    return reference_root() / f"{backbone.fingerprint}.safetensors"


def reference_root() -> Path:
    """The folder `clipbank reference build` writes into by default, one file per backbone fingerprint."""
    return Path(env_value("reference_cache") or os.path.join(cache_root(), "reference"))


def list_references() -> list[dict]:
    """Every reference set in the cache, then the embedded tiny one, each `{path, backbone, fingerprint, count,
    source, found_by_servers}` from its metadata alone (a server finds a cached set only under its backbone's
    fingerprint; others need `--reference`), or `{path, error}` for a file that cannot be read."""
    root = reference_root()
    paths = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    out = []
    for path in [*paths, TINY_REFERENCE]:
        try:
            with safe_open(str(path), "pt") as f:
                meta = bounded_loads((f.metadata() or {}).get(REFERENCE_KEY, "null"))
            backbone = meta["backbone"]
            named = f"{backbone.get('arch')}/{backbone.get('pretrained')}"
            fingerprint = str(backbone.get("fingerprint"))
            found = path == TINY_REFERENCE or path.stem == fingerprint  # a server looks for <fingerprint>.safetensors
            entry = {"path": str(path), "backbone": named, "fingerprint": fingerprint, "count": meta.get("count")}
            out.append({**entry, "source": meta.get("source"), "found_by_servers": found})
        except Exception as e:  # not a reference set, or unreadable: listed as such
            out.append({"path": str(path), "error": f"not a readable reference set ({type(e).__name__})"})
    return out


def find_reference(backbone: Backbone, explicit: str | os.PathLike | None = None) -> ReferenceSet | None:
    """The reference set for `backbone`: `explicit`, else the one in the cache, else the embedded tiny one when
    this is the tiny backbone; None if there is none (selectors then see no outside images)."""
    if explicit and not Path(explicit).is_file():
        raise FileNotFoundError(f"reference set {explicit} does not exist (build one: clipbank reference build)")
    candidates: Sequence[Path] = [Path(explicit)] if explicit else [cache_path(backbone), TINY_REFERENCE]
    for path in candidates:
        if path.is_file():
            try:
                return load_reference(path, backbone)
            except BackboneMismatch:
                if explicit:
                    raise
    return None
