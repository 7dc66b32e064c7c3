"""The frozen passes (image and text towers without experts) behind one small interface, so a runtime other than
PyTorch can serve them. The adapted pass always runs in PyTorch: its routing changes per image."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .moe_clip import encode_image, encode_text


class FrozenRuntime(Protocol):
    name: str

    def image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings [n, D] of preprocessed images [n, 3, H, W]."""

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings [n, D] of token ids [n, L]."""


class TorchFrozen:
    """open_clip's own towers in PyTorch."""

    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model

    def image(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encode_image(self.model, images)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encode_text(self.model, tokens)
