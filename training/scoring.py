"""Score a model (the backbone's or a trained copy) on labelled images: accuracy over the data's classes with a
prompt ensemble, and the frozen image embeddings the selectors learn from."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from model_store.backbone import Backbone
from model_store.experts import Routing
from model_store.moe_clip import encode_image, encode_text

from .data import LabelledImages

RoutingFor = Callable[[int], Routing | None]  # batch size -> the routing of one forward pass


def batches(data: LabelledImages, transform, batch: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, len(data), batch):
        x = torch.stack([transform(im) for im in data.images[s : s + batch]]).to(device)
        yield x, torch.tensor(data.labels[s : s + batch], device=device)


# Prompts per text pass, every template's together rather than one pass per template. Tiny, 34 templates, two
# threads: 2 classes 31 ms against 100 one per template, 10 classes 134 against 200, 100 classes 1.44 s
# against 1.32-1.40 (256 gave 1.7-1.9 s there).
PROMPT_CHUNK = 128


def class_embeddings(
    model: Any, backbone: Backbone, classes: Sequence[str], templates: str | Sequence[str], routing_for: RoutingFor
) -> torch.Tensor:
    """Per class: encode with each template, normalise, average, renormalise (as the server does)."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    prompts = [template.format(c) for template in templates for c in classes]
    parts = []
    for s in range(0, len(prompts), PROMPT_CHUNK):
        tokens = backbone.tokenizer(prompts[s : s + PROMPT_CHUNK]).to(backbone.device)
        parts.append(encode_text(model, tokens, routing_for(len(tokens))))
    per_template = torch.cat(parts).view(len(templates), len(classes), -1)
    return F.normalize(per_template.mean(0), dim=-1)


@torch.no_grad()
def accuracy(
    model: Any, backbone: Backbone, data: LabelledImages, templates: str | Sequence[str], routing_for: RoutingFor
) -> float:
    """Accuracy over `data.classes` of `model` with the given routing per pass; `templates` one or an ensemble."""
    right, seen = correct_per_class(model, backbone, data, templates, routing_for)
    return sum(right) / max(1, sum(seen))


@torch.no_grad()
def correct_per_class(
    model: Any, backbone: Backbone, data: LabelledImages, templates: str | Sequence[str], routing_for: RoutingFor
) -> tuple[list[int], list[int]]:
    """Per class of `data.classes`: (images answered right, images)."""
    text = class_embeddings(model, backbone, data.classes, templates, routing_for)
    right = torch.zeros(len(data.classes), dtype=torch.long)
    seen = torch.zeros(len(data.classes), dtype=torch.long)
    for x, y in batches(data, backbone.preprocess, 128, backbone.device):
        hit = (encode_image(model, x, routing_for(len(x))) @ text.T).argmax(1) == y
        right += torch.bincount(y[hit].cpu(), minlength=len(data.classes))
        seen += torch.bincount(y.cpu(), minlength=len(data.classes))
    return right.tolist(), seen.tolist()


@torch.no_grad()
def frozen_features(backbone: Backbone, data: LabelledImages) -> torch.Tensor:
    return torch.cat(
        [encode_image(backbone.model, x) for x, _ in batches(data, backbone.preprocess, 128, backbone.device)]
    ).cpu()
