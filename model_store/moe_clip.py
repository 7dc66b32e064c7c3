"""The CLIP forward with MoE branches: open_clip's own modules, with routing passed per call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from .experts import Routing


def run_blocks(blocks, x: torch.Tensor, attn_mask: torch.Tensor | None, tower: str, routing: Routing | None):
    """open_clip's residual blocks, plus the MoE branch in parallel to each MLP when `routing` is given.

    x <- x + attn(ln_1(x));  x <- x + mlp(ln_2(x)) + sum_k g_k E_k(x)   (the branch reads the post-attention x)
    """
    for i, blk in enumerate(blocks):
        x = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x), attn_mask=attn_mask))
        mlp = blk.ls_2(blk.mlp(blk.ln_2(x)))
        x = x + mlp if routing is None else x + mlp + routing.branch(tower, i, x)
    return x


def encode_image(model, images: torch.Tensor, routing: Routing | None = None, normalize: bool = True):
    """Image embeddings; with `routing=None` this is exactly open_clip's `encode_image`."""
    v = model.visual
    x = v._embeds(images)
    x = run_blocks(v.transformer.resblocks, x, None, "visual", routing)
    pooled, _ = v._pool(x)
    if v.proj is not None:
        pooled = pooled @ v.proj
    return F.normalize(pooled, dim=-1) if normalize else pooled


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
