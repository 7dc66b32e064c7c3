"""Pretrain the embedded tiny CLIP contrastively on generated images and captions: coloured shapes, letters and
digits on plain or patterned grounds."""

from __future__ import annotations

import dataclasses
import logging
import math
import string
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save

from model_store.backbone_ref import TINY_DIR, TINY_WEIGHTS
from model_store.store import atomic_write

from .config import PretrainConfig
from .domains import (
    COLORS,
    IMAGE_SIZE,
    PATTERNS,
    SHAPES,
    SIZES,
    ShapeScene,
    _background,
    _font_paths,
    _jitter,
    random_scene,
    render_scene,
)
from .progress import progress_bar

log = logging.getLogger(__name__)

COLOR_NAMES = tuple(COLORS)
# What a pretraining image shows: a shape, or a printed letter or digit (a real CLIP reads text; without it the
# tiny backbone saw every letter as one blur, and no selector could tell one glyph domain from another).
CHARACTERS = tuple(string.ascii_uppercase) + tuple(string.digits)
OBJECTS = SHAPES + tuple(f"letter {c}" for c in string.ascii_uppercase) + tuple(f"digit {d}" for d in string.digits)
READING_RATE = 0.4  # `--characters` of the reading variant measured in docs/benchmarks/routing.md
ATTRS = ("color", "shape", "size", "background", "pattern")

# Each template names the attributes it mentions; a caption matches every image that agrees on those.
TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a {color} {shape}.", ("color", "shape")),
    ("a photo of a {color} {shape}.", ("color", "shape")),
    ("a {size} {color} {shape}.", ("color", "shape", "size")),
    ("a {color} {shape} on a {background} background.", ("color", "shape", "background")),
    ("a {size} {color} {shape} on {background}.", ("color", "shape", "size", "background")),
    ("a photo of a {shape}.", ("shape",)),
    ("a {shape}.", ("shape",)),
    ("a {size} {shape}.", ("shape", "size")),
    ("a photo of a {color} shape.", ("color",)),
    ("something {color}.", ("color",)),
    ("a {color} object on a {background} background.", ("color", "background")),
    ("a {background} background.", ("background",)),
    ("a {color} {shape} on a {pattern} background.", ("color", "shape", "pattern")),
    ("a {shape} on a {pattern} {background} background.", ("shape", "pattern", "background")),
    ("a {pattern} background.", ("pattern",)),
    ("a {pattern} pattern.", ("pattern",)),
)
TEMPLATE_WEIGHTS = np.array([4, 4, 2, 2, 1, 3, 2, 1, 3, 2, 1, 1, 2, 1, 2, 1], dtype=np.float64)
PATTERN_RATE = 0.5


def caption(scene: ShapeScene, template: int) -> str:
    text, _ = TEMPLATES[template]
    return text.format(
        color=COLOR_NAMES[scene.color],
        shape=OBJECTS[scene.shape],
        size=SIZES[scene.size],
        background=COLOR_NAMES[scene.background],
        pattern=PATTERNS[scene.pattern],
    )


def random_object_scene(
    rng: np.random.Generator, pattern_rate: float = PATTERN_RATE, characters: float = 0.0
) -> ShapeScene:
    """A pretraining scene: a shape, or (`characters` of them) a letter or digit; `shape` indexes OBJECTS.
    With `characters=0` it draws exactly what `random_scene` draws (the committed weights' stream)."""
    scene = random_scene(rng, pattern_rate)
    if characters > 0 and rng.random() < characters:
        scene = dataclasses.replace(scene, shape=len(SHAPES) + int(rng.integers(len(CHARACTERS))))
    return scene


@lru_cache(maxsize=512)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def character_fonts() -> list[str]:
    """The fonts pretraining prints characters in: not the glyph domains' validation and test fonts."""
    fonts = _font_paths()
    return fonts[:-3] or fonts


def render_object(scene: ShapeScene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Render a pretraining scene: `render_scene` for shapes; a coloured printed character otherwise."""
    if scene.shape < len(SHAPES):
        return render_scene(scene, rng, size)
    img = _background(scene, rng, size)
    px = int(rng.integers(20, 30)) if scene.size == 0 else int(rng.integers(36, 52))
    font = _font(str(rng.choice(character_fonts())), px)
    margin = px * 0.6
    cx, cy = rng.uniform(margin, size - margin, 2) if size - 2 * margin > 1 else (size / 2, size / 2)
    fill = _jitter(COLORS[COLOR_NAMES[scene.color]], rng)
    ImageDraw.Draw(img).text((cx, cy), CHARACTERS[scene.shape - len(SHAPES)], font=font, fill=fill, anchor="mm")
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (size, size, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def match_matrix(scenes: list[ShapeScene], templates: list[int]) -> torch.Tensor:
    """M[i, j] = 1 when caption j (of scene j, with its template) truly describes image i."""
    attrs = torch.tensor([[getattr(s, a) for a in ATTRS] for s in scenes])
    mentioned = torch.tensor([[a in TEMPLATES[t][1] for a in ATTRS] for t in templates])
    equal = attrs[:, None, :] == attrs[None, :, :]  # [image, caption, attr]
    return (equal | ~mentioned[None, :, :]).all(-1).float()


def to_tensor(images, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return (torch.from_numpy(arr).permute(0, 3, 1, 2) - mean) / std


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.T
    t_img = match / match.sum(1, keepdim=True)
    t_txt = match.T / match.T.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, t_img) + F.cross_entropy(logits.T, t_txt))


@torch.no_grad()
def zero_shot_probe(model, tokenizer, mean, std, per_class: int = 40) -> dict[str, float]:
    """Held-out zero-shot accuracy on colour (prompt 'a photo of a {c} shape.') and shape ('a photo of a {s}.')."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(12345)
    scenes = [random_scene(rng, PATTERN_RATE) for _ in range(per_class * max(len(COLORS), len(SHAPES)))]
    images = to_tensor([render_scene(s, rng) for s in scenes], mean, std)
    feats = model.encode_image(images, normalize=True)
    out = {}
    for attr, names, tmpl in (("color", COLOR_NAMES, "a photo of a {} shape."), ("shape", SHAPES, "a photo of a {}.")):
        text = model.encode_text(tokenizer([tmpl.format(n) for n in names]), normalize=True)
        pred = (feats @ text.T).argmax(1)
        truth = torch.tensor([getattr(s, attr) for s in scenes])
        out[attr] = float((pred == truth).float().mean())
    chars = [dataclasses.replace(random_scene(rng, PATTERN_RATE), shape=len(SHAPES) + k % len(CHARACTERS))
             for k in range(per_class * len(CHARACTERS) // 4)]  # fmt: skip
    feats = model.encode_image(to_tensor([render_object(s, rng) for s in chars], mean, std), normalize=True)
    text = model.encode_text(tokenizer([f"a photo of a {n}." for n in OBJECTS[len(SHAPES) :]]), normalize=True)
    truth = torch.tensor([s.shape - len(SHAPES) for s in chars])
    out["character"] = float(((feats @ text.T).argmax(1) == truth).float().mean())
    model.train(was_training)
    return out


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_tiny(cfg: PretrainConfig, out: Path | None = None) -> dict[str, float]:
    """Train the tiny CLIP from scratch and write its weights (fp16 safetensors) to `out` (default: embedded)."""
    out = Path(out) if out else TINY_WEIGHTS
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_name = f"local-dir:{TINY_DIR}"
    model = open_clip.create_model(model_name, load_weights=False)
    tokenizer = open_clip.get_tokenizer(model_name)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    mean, std = (torch.tensor(pcfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    start = time.time()
    bar = progress_bar(range(cfg.steps), desc="pretrain tiny CLIP", unit="step")
    for step in bar:
        scenes = [random_object_scene(rng, PATTERN_RATE, cfg.characters) for _ in range(cfg.batch_size)]
        templates = list(rng.choice(len(TEMPLATES), cfg.batch_size, p=TEMPLATE_WEIGHTS / TEMPLATE_WEIGHTS.sum()))
        images = to_tensor([render_object(s, rng) for s in scenes], mean, std)
        texts = tokenizer([caption(s, t) for s, t in zip(scenes, templates, strict=True)])
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        img, txt, scale = model(images, texts)[:3]
        loss = multi_positive_loss(img, txt, scale, match_matrix(scenes, templates))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    metrics = zero_shot_probe(model, tokenizer, mean, std, cfg.eval_per_class)
    model.eval()
    metrics["seconds"] = time.time() - start
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"clipbank.pretrain": repr(cfg), "clipbank.zero_shot": repr(metrics)}
    atomic_write(out, save(state, metadata=meta))  # a kill while saving leaves the old weights whole
    log.info("tiny CLIP written to %s: %s", out, metrics)
    if out != TINY_WEIGHTS:
        _config_beside(out)
    return metrics


def _config_beside(out: Path) -> None:
    """Put the tiny architecture's open_clip_config.json beside new weights, so that `file:OUT` loads them; a
    config already there that says otherwise is left alone, with a warning."""
    config, shipped = out.parent / "open_clip_config.json", (TINY_DIR / "open_clip_config.json").read_bytes()
    if not config.exists():
        atomic_write(config, shipped)
    elif config.read_bytes() != shipped:
        log.warning("%s is another model's config: left as it is; %s needs the tiny one beside it", config, out)
        return
    log.info("serve these weights with --backbone file:%s", out)
