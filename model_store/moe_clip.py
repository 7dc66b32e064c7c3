"""The CLIP forward with MoE branches: open_clip's own modules, with routing passed per call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from .experts import Routing


def run_blocks(
    blocks,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    tower: str,
    routing: Routing | None,
    start: int = 0,
    stop: int | None = None,
):
    """open_clip's residual blocks `start` to `stop`, plus the MoE branch in parallel to each MLP of a block that
    has experts, when `routing` is given.

    x <- x + attn(ln_1(x));  x <- x + mlp(ln_2(x)) + sum_k g_k E_k(x)   (the branch reads the post-attention x)
    """
    for i in range(start, len(blocks) if stop is None else stop):
        blk = blocks[i]
        x = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x), attn_mask=attn_mask))
        mlp = blk.ls_2(blk.mlp(blk.ln_2(x)))
        x = x + mlp if routing is None or not routing.covers(tower, i) else x + mlp + routing.branch(tower, i, x)
    return x


def image_tokens(model, images: torch.Tensor, stop: int) -> torch.Tensor:
    """The image tower's token states [n, T, d] entering block `stop` (0: the patch and position embeddings),
    without experts: the frozen prefix that a shared-prefix adapted pass starts from."""
    v = model.visual
    return run_blocks(v.transformer.resblocks, v._embeds(images), None, "visual", None, 0, stop)


def encode_image_from(model, tokens: torch.Tensor, start: int, routing: Routing | None = None, normalize=True):
    """Image embeddings from the token states entering block `start` (`image_tokens(model, x, start)`)."""
    v = model.visual
    x = run_blocks(v.transformer.resblocks, tokens, None, "visual", routing, start)
    pooled, _ = v._pool(x)
    if v.proj is not None:
        pooled = pooled @ v.proj
    return F.normalize(pooled, dim=-1) if normalize else pooled


def encode_image(model, images: torch.Tensor, routing: Routing | None = None, normalize: bool = True):
    """Image embeddings; with `routing=None` this is exactly open_clip's `encode_image`."""
    return encode_image_from(model, model.visual._embeds(images), 0, routing, normalize)


def encode_text(model, tokens: torch.Tensor, routing: Routing | None = None, normalize: bool = True):
    """Text embeddings; with `routing=None` this is exactly open_clip's `encode_text`."""
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = run_blocks(model.transformer.resblocks, x, model.attn_mask, "text", routing)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x
