"""Every selector of a bank scored at once (the bank's `selector_stack`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .selector import AutoencoderSelector, HybridSelector, Selector, score


class SelectorStack:
    """Every selector of a bank scored at once: the autoencoders (plain, and the ranking part of the hybrid kind,
    the default) stacked into batched matrix products, the hybrids' gates likewise, the others one by one. Scores
    [n, T] equal `score` of each selector in turn, at a cost that grows with T in FLOPs only, not in Python calls
    (measured: 0.65 ms against 2.3 ms per batch of 16 at 100 tiny autoencoder tasks)."""

    def __init__(self, selectors: Sequence[Selector]) -> None:
        self.count = len(selectors)
        stacked = [i for i, s in enumerate(selectors) if isinstance(s, AutoencoderSelector | HybridSelector)]
        shapes = {tuple(selectors[i].enc_w.shape) for i in stacked}
        shapes |= {("gate", *selectors[i].gate_w1.shape) for i in stacked if isinstance(selectors[i], HybridSelector)}
        if len(shapes) > 2 or len({s for s in shapes if s[0] != "gate"}) > 1:  # bottlenecks or gate widths differ
            stacked = []
        self.stacked = torch.tensor(stacked, dtype=torch.long)
        self.others = [(i, s) for i, s in enumerate(selectors) if i not in set(stacked)]
        hybrid = [k for k, i in enumerate(stacked) if isinstance(selectors[i], HybridSelector)]
        self.hybrid = torch.tensor(hybrid, dtype=torch.long)  # positions within `stacked`
        if stacked:
            ae = [selectors[i] for i in stacked]
            self.enc_w = torch.stack([s.enc_w for s in ae])  # [T, h, D]
            self.enc_b = torch.stack([s.enc_b for s in ae])[None]  # [1, T, h]
            self.dec_w = torch.stack([s.dec_w for s in ae])  # [T, D, h]
            self.dec_b = torch.stack([s.dec_b for s in ae])[None]  # [1, T, D]
            self.thresholds = torch.tensor([s.threshold for s in ae], dtype=self.enc_w.dtype, device=self.enc_w.device)
        if hybrid:
            gates = [selectors[stacked[k]] for k in hybrid]
            self.gate_w1 = torch.stack([s.gate_w1 for s in gates])  # [H, g, D]
            self.gate_b1 = torch.stack([s.gate_b1 for s in gates])[None]  # [1, H, g]
            self.gate_w2 = torch.stack([s.gate_w2[0] for s in gates])  # [H, g]
            self.gate_b2 = torch.stack([s.gate_b2 for s in gates])[:, 0][None]  # [1, H]
            self.gate_thresholds = torch.tensor(
                [s.gate_threshold for s in gates], dtype=self.gate_w1.dtype, device=self.gate_w1.device
            )

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        out = torch.empty(feats.shape[0], self.count)
        if len(self.stacked):
            f = feats.to(self.enc_w.dtype)
            hidden = torch.tanh(torch.einsum("nd,thd->nth", f, self.enc_w) + self.enc_b)
            recon = torch.einsum("nth,tdh->ntd", hidden, self.dec_w) + self.dec_b
            own = (((recon - f[:, None, :]) ** 2).mean(-1) / self.thresholds).float().cpu()
            if len(self.hybrid):
                gate = F.gelu(torch.einsum("nd,hgd->nhg", f, self.gate_w1) + self.gate_b1)
                logit = torch.einsum("nhg,hg->nh", gate, self.gate_w2) + self.gate_b2
                vetoed = (F.softplus(-logit) / self.gate_thresholds).float().cpu()
                mine = own[:, self.hybrid]  # as HybridSelector.error / threshold
                own[:, self.hybrid] = torch.where(vetoed <= 1.0, mine, torch.maximum(mine, vetoed))
            out[:, self.stacked] = own
        for i, s in self.others:
            out[:, i] = score(s, feats).float().cpu()
        return out
