"""Load a frozen open_clip backbone from one reference string, and fingerprint it."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from .backbone_ref import DEFAULT_BACKBONE, BackboneRef, parse_backbone_ref
from .checkpoints import (
    download_failed,
    first_line,
    looks_like_checkpoint,
    misfit,
    misnamed,
    no_download,
    refuse_non_finite,
)
from .digest import tensor_digest
from .errors import BackboneError, UnsupportedBackbone
from .frozen import FrozenRuntime, TorchFrozen

log = logging.getLogger(__name__)

TOWERS = ("visual", "text")
NARROW_WIDTH = 256  # towers at most this wide make a narrow backbone (`Backbone.narrow`): the tiny one


def pick_device(device: str = "auto") -> torch.device:
    """`auto` means cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BackboneError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            have = f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})" if count else "no usable CUDA device"
            raise BackboneError(f"device {device!r} asked for, but this machine has {have}: use cpu or auto")
    return dev


AUTOCAST_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TowerSpec:
    """What the experts need to know about one tower: width and number of residual blocks."""

    width: int
    layers: int


@dataclass(frozen=True)
class Backbone:
    """A frozen open_clip CLIP with its transforms, tokenizer and fingerprint. The object is never changed
    (`with_frozen` makes another that shares the model)."""

    ref: BackboneRef
    model: Any
    preprocess: Any
    train_preprocess: Any
    tokenizer: Any
    device: torch.device
    fingerprint: str
    towers: dict[str, TowerSpec] = field(default_factory=dict)
    # Who runs the frozen passes; None: PyTorch. Chosen when the object is made: a server that wants another
    # runtime serves from its own `with_frozen` copy, so no object a bank snapshot or another server holds changes.
    frozen: FrozenRuntime | None = None
    # Mixed precision of the PyTorch passes (frozen and adapted, image and text): "off", "fp16" or "bf16"
    # (torch.autocast on this device; meant for CUDA). Embeddings, selector scores and logits stay float32.
    autocast: str = "off"
    # sha256 of how the weights compute beyond themselves (activation, norms, pooling, text mask: `_config_id`).
    # The same weights under QuickGELU and GELU share `fingerprint` and answer differently.
    config_id: str | None = None
    # The facts `config_id` hashes, one level flat ("preprocess.size"): bundles record them, and a server compares
    # the facts both sides know, so a release (or an open_clip) that describes more does not refuse older bundles.
    config_facts: dict[str, Any] | None = None
    # The hashes bundles of earlier releases carried for this config (2026-12-05): be26a71..8914476^ hashed the
    # config open_clip built from, with the forced QuickGELU; 8914476..daa1a72^ the facts without `preprocess`.
    older_config_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_DTYPES:
            raise BackboneError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if self.frozen is None:
            object.__setattr__(self, "frozen", TorchFrozen(self.model))  # the one assignment, at construction

    def compute(self) -> contextlib.AbstractContextManager:
        """The context every PyTorch pass runs in: torch.autocast with this backbone's dtype, or nothing."""
        dtype = AUTOCAST_DTYPES[self.autocast]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def with_autocast(self, autocast: str) -> Backbone:
        """This backbone (same model, same frozen runtime) as a new object whose PyTorch passes use `autocast`."""
        return dataclasses.replace(self, autocast=autocast)

    def with_frozen(self, frozen: FrozenRuntime | None = None) -> Backbone:
        """This backbone (the same model, tokenizer and fingerprint: no copy of the weights) as a new object whose
        frozen passes `frozen` runs (None: PyTorch)."""
        return dataclasses.replace(self, frozen=frozen)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)  # text_projection may be a Linear, or None (proj_type "none")

    @property
    def narrow(self) -> bool:
        """Every tower at most NARROW_WIDTH wide (the tiny backbone): training's default learning rate and the
        server's default threads differ for such a backbone."""
        return max(t.width for t in self.towers.values()) <= NARROW_WIDTH

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    def describe(self) -> dict[str, Any]:
        config = {"config": self.config_id} if self.config_id else {}
        if self.config_facts:
            config["config_facts"] = self.config_facts
        return {"arch": self.ref.arch, "pretrained": self.ref.pretrained, "fingerprint": self.fingerprint, **config}

    def blocks(self, tower: str) -> torch.nn.ModuleList:
        return self.model.visual.transformer.resblocks if tower == "visual" else self.model.transformer.resblocks


def _check_supported(model: Any, ref: BackboneRef) -> dict[str, TowerSpec]:
    problems = []
    if not isinstance(model, open_clip.CLIP):
        problems.append(f"model class {type(model).__name__} (need open_clip.CLIP with a built-in text tower)")
    visual = getattr(model, "visual", None)
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        problems.append(f"image tower {type(visual).__name__} (need a VisionTransformer)")
    towers = {}
    for tower, mod in (("visual", getattr(visual, "transformer", None)), ("text", getattr(model, "transformer", None))):
        blocks = getattr(mod, "resblocks", [])
        if not blocks or not all(type(b) is open_clip.transformer.ResidualAttentionBlock for b in blocks):
            problems.append(f"{tower} tower blocks (need open_clip ResidualAttentionBlock)")
        elif not mod.batch_first:
            problems.append(f"{tower} tower is not batch-first")
        else:
            towers[tower] = TowerSpec(width=mod.width, layers=len(blocks))
    if problems:
        raise UnsupportedBackbone(f"backbone {ref.text!r} is not supported: " + "; ".join(problems))
    return towers


def _close(given: str, known: list[str]) -> str:
    """`; close: A, B` for the known names nearest `given`, case aside (`vit-b-32` showed ViT-B-32 third)."""
    by_lower = {k.lower(): k for k in known}
    near = difflib.get_close_matches(given.lower(), list(by_lower), n=5, cutoff=0.5)
    return f"; close: {', '.join(by_lower[n] for n in near)}" if near else ""


def _why_not_loaded(e: Exception, ref: BackboneRef, tag: str | None) -> str:
    """One line on why open_clip could not make or load the model, with what to do where it is known."""
    why = first_line(e)  # not torch's advice to unpickle it, nor 153 lines of size mismatches
    if "not found in built-ins" in str(e):  # open_clip lists all ~150 names: the near ones say more
        why = f"open_clip has no model {ref.model_name!r}" + _close(ref.model_name, open_clip.list_models())
        why += " (all: `python -c 'import open_clip; print(open_clip.list_models())'`)"
    elif tag and "is not a known tag" in str(e) and "/" in tag:  # a path: a file that is not there
        why = f"checkpoint file {tag} does not exist (or name it as '{ref.model_name}:file:/path/weights.safetensors')"
    elif tag and "is not a known tag" in str(e):  # its tags, nearest first (open_clip logged them on another line)
        tags = open_clip.list_pretrained_tags_by_model(ref.model_name)
        known = f"all: {', '.join(tags)}" if tags else "open_clip has no pretrained weights for it"
        why = f"open_clip has no weights {tag!r} for {ref.model_name}" + _close(tag, tags)
        why += f" ({known}; or a checkpoint file: '{ref.model_name}:file:/path/weights.safetensors')"
    elif tag and download_failed(e):  # after the cut, so the remedy is whole
        why += f". {no_download()}"
    elif why.startswith("Weights only load failed"):  # torch's first line, whose "two options" unpickle it
        why = (
            "the file holds pickled Python objects (a whole model?), which are not loaded: save the weights "
            "alone, `safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`"
        )
    return why


def load_backbone(ref: str | BackboneRef = DEFAULT_BACKBONE, device: str = "auto") -> Backbone:
    """Create the open_clip model for `ref`, load its weights, freeze it and fingerprint it."""
    ref = parse_backbone_ref(ref) if isinstance(ref, str) else ref
    if ref.weights_is_file and not Path(ref.weights).is_file():
        what = "is a folder, not a file" if Path(ref.weights).is_dir() else "does not exist"
        raise BackboneError(f"checkpoint file {ref.weights} {what} ({ref.text!r})")
    config = Path(ref.model_name.removeprefix("local-dir:")) / "open_clip_config.json"
    if ref.text.startswith("file:") and not config.is_file():  # open_clip's own message names local-dir:
        raise BackboneError(
            f"{ref.text!r} needs an open_clip_config.json beside the weights ({config} is missing); or name the "
            "architecture: 'ARCH:file:/path/weights.safetensors'"
        )
    if ref.weights_is_file and not looks_like_checkpoint(Path(ref.weights)):
        raise BackboneError(f"{ref.weights} is not a checkpoint: neither safetensors nor a PyTorch file ({ref.text!r})")
    if ref.weights_is_file and (wrong := misnamed(Path(ref.weights))):
        raise BackboneError(f"could not load backbone {ref.text!r}: {wrong}")
    picked = ("Multiple checkpoints found",) if ref.weights_is_file else ()  # the file named here replaces it
    quiet = DropRecords(("No pretrained weights loaded", "Local config loaded, but no CLIP weights", *picked))
    logging.getLogger().addFilter(quiet)  # open_clip warns of "random init" before we load the file ourselves
    try:
        tag = None if ref.weights_is_file or ref.model_name.startswith("local-dir:") else ref.weights
        # OpenAI's weights were trained with QuickGELU; open_clip only warns when the config lacks it
        quick_gelu = bool(tag and (open_clip.get_pretrained_cfg(ref.model_name, tag) or {}).get("quick_gelu"))
        model, _, preprocess = open_clip.create_model_and_transforms(
            ref.model_name, pretrained=tag, load_weights=not ref.weights_is_file, force_quick_gelu=quick_gelu
        )
        if ref.weights_is_file:
            if problem := misfit(model, Path(ref.weights)):
                raise BackboneError(problem)
            open_clip.load_checkpoint(model, ref.weights)
    except Exception as e:  # open_clip, safetensors and torch raise many types for bad files
        raise BackboneError(f"could not load backbone {ref.text!r}: {_why_not_loaded(e, ref, tag)}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    towers = _check_supported(model, ref)  # before the tokenizer: SigLIP's is a download, then it was refused
    try:
        tokenizer = BoundedTokenizer(open_clip.get_tokenizer(ref.model_name))
    except Exception as e:
        raise BackboneError(f"could not load the tokenizer of backbone {ref.text!r}: {first_line(e)}") from e
    model.requires_grad_(False)
    model.eval()
    refuse_non_finite(model, ref.text)
    fingerprint = tensor_digest(model.state_dict())
    dev = pick_device(device)
    model.to(dev)
    train_preprocess = _train_transform(model)
    log.info("loaded backbone %s (%s) on %s, fingerprint %s", ref.text, ref.arch, dev, fingerprint[:12])
    facts = _config_facts(model)
    config: dict[str, Any] = {"config_id": hashlib.sha256(_canonical(facts)).hexdigest()}
    config["config_facts"] = flat_facts(facts)
    without_preprocess = {k: v for k, v in facts.items() if k != "preprocess"}
    older = (_first_config_id(ref, quick_gelu), hashlib.sha256(_canonical(without_preprocess)).hexdigest())
    config["older_config_ids"] = tuple(h for h in older if h is not None)
    return Backbone(ref, model, preprocess, train_preprocess, tokenizer, dev, fingerprint, towers, **config)


def _first_config_id(ref: BackboneRef, quick_gelu: bool) -> str | None:
    """The config hash of the first releases that recorded one: sha256 of the config dict open_clip built `ref`
    from (its registry's, or a local folder's JSON) with the QuickGELU a pretrained tag forces. Keep as it is."""
    try:
        if ref.model_name.startswith("local-dir:"):
            path = Path(ref.model_name.removeprefix("local-dir:")) / "open_clip_config.json"
            config = json.loads(path.read_text())["model_cfg"]
        else:
            config = open_clip.get_model_config(ref.model_name)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(config, dict):
        return None
    return hashlib.sha256(
        _canonical({**config, "quick_gelu": bool(config.get("quick_gelu")) or quick_gelu})
    ).hexdigest()


def _canonical(obj: dict[str, Any]) -> bytes:
    """The bytes every config hash is of: keep as it is, or bundles carrying a hash alone are refused."""
    return json.dumps(obj, sort_keys=True, default=str).encode()


def flat_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """`facts` one level flat (`preprocess.size`), each value as JSON reads it back (tuples as lists)."""
    flat: dict[str, Any] = {}
    for name, value in facts.items():
        flat.update({f"{name}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _config_facts(model: Any) -> dict[str, Any]:
    """How the model computes beyond its weights, read from the built model (so a config that spells out a
    default is the same config): each tower's activation and norm, the pooling, the text mask, and how images are
    preprocessed. The same weights under QuickGELU and GELU, or with and without a causal mask, answer
    differently. Their sha256 is `config_id`: keep what it hashes as it is, or bundles that carry only the hash
    (made on 2026-12-05, before the facts) are refused."""

    def block(blocks: torch.nn.ModuleList) -> list[Any]:
        first = blocks[0]
        act, norm = getattr(getattr(first, "mlp", None), "gelu", None), getattr(first, "ln_1", None)
        return [type(act).__name__, getattr(act, "approximate", None), type(norm).__name__, getattr(norm, "eps", None)]

    visual = model.visual
    return {
        "visual": block(visual.transformer.resblocks),
        "text": block(model.transformer.resblocks),
        "visual_pool": [getattr(visual, "pool_type", None), getattr(visual, "final_ln_after_pool", None)],
        "text_pool": getattr(model, "text_pool_type", None),
        "causal_mask": getattr(model, "attn_mask", None) is not None,
        "eos_id": getattr(model, "text_eos_id", None),
        "preprocess": open_clip.get_model_preprocess_cfg(model),  # size, mean, std, interpolation, resize mode
    }


TOKEN_CACHE_WORDS = 50_000


class BoundedTokenizer:
    """An open_clip tokenizer whose word cache is bounded.

    open_clip's SimpleTokenizer keeps the BPE of every word it has ever seen; a server that is sent new words
    (labels are free text) would grow without end. Past `max_words` the cache starts again from its initial
    entries. Everything else is the wrapped tokenizer's.
    """

    def __init__(self, inner: Any, max_words: int = TOKEN_CACHE_WORDS) -> None:
        self.inner = inner
        self.max_words = max_words
        cache = getattr(inner, "cache", None)
        self._initial = dict(cache) if isinstance(cache, dict) else None

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(texts, *args, **kwargs)
        cache = getattr(self.inner, "cache", None)
        if self._initial is not None and isinstance(cache, dict) and len(cache) > self.max_words:
            cache.clear()
            cache.update(self._initial)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class DropRecords(logging.Filter):
    """A logging filter that drops the records whose message starts with one of `prefixes`: a library's advice
    that does not apply here."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _train_transform(model: Any) -> Any:
    """Training augmentation (docs/method.md, Training): RandomResizedCrop(scale 0.9-1.0, bicubic), then CLIP
    normalisation."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    aug = open_clip.AugmentationCfg(scale=(0.9, 1.0))
    train = open_clip.image_transform(
        cfg["size"],
        is_train=True,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg.get("interpolation", "bicubic"),
        aug_cfg=aug,
    )
    return train
