"""Every selector of a bank scored at once (the bank's `selector_stack`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .blocks import empty_block
from .selector import AutoencoderSelector, HybridSelector, Selector, gelu, score

CHUNK_VALUES = 1 << 21  # floats of [n, T, D] per chunk of scoring (8 MiB)


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
            gates = [selectors[stacked[k]] for k in hybrid]
            self._stack(ae, gates)

    def _stack(self, ae: list, gates: list) -> None:
        """The stacked tensors, in one memory map on CPU (`blocks`): each change of the bank builds a new stack."""
        parts = {
            "enc_w": [s.enc_w for s in ae],  # [T, h, D]
            "enc_b": [s.enc_b for s in ae],  # [T, h]
            "dec_w": [s.dec_w for s in ae],  # [T, D, h]
            "dec_b": [s.dec_b for s in ae],  # [T, D]
            "thresholds": [torch.tensor(s.threshold, dtype=ae[0].enc_w.dtype) for s in ae],  # [T]
        }
        if gates:
            parts |= {
                "gate_w1": [s.gate_w1 for s in gates],  # [H, g, D]
                "gate_b1": [s.gate_b1 for s in gates],  # [H, g]
                "gate_w2": [s.gate_w2[0] for s in gates],  # [H, g]
                "gate_b2": [s.gate_b2[0] for s in gates],  # [H]
                "gate_thresholds": [torch.tensor(s.gate_threshold, dtype=gates[0].gate_w1.dtype) for s in gates],
            }
        device = ae[0].enc_w.device
        if device.type == "cpu":
            out = empty_block({k: (len(v), *v[0].shape) for k, v in parts.items()}, ae[0].enc_w.dtype)
            for k, v in parts.items():
                torch.stack(v, out=out[k])
        else:
            out = {k: torch.stack([t.to(device) for t in v]) for k, v in parts.items()}
        for k in ("enc_b", "dec_b", "gate_b1", "gate_b2"):
            if k in out:
                out[k] = out[k][None]  # [1, T, ...]: broadcast over the images
        for k, t in out.items():
            setattr(self, k, t)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """[n, T]. Many images (the gate's reference set) go in chunks, so that the [n, T, D] reconstructions stay
        within about `CHUNK_VALUES` floats: a transient of hundreds of MiB would be a peak of resident memory."""
        rows = max(1, CHUNK_VALUES // max(1, len(self.stacked) * feats.shape[-1]))
        if feats.shape[0] <= rows:
            return self._scores(feats)
        return torch.cat([self._scores(f) for f in feats.split(rows)])

    def _scores(self, feats: torch.Tensor) -> torch.Tensor:
        out = torch.empty(feats.shape[0], self.count)
        if len(self.stacked):
            f = feats.to(self.enc_w.dtype)
            hidden = torch.tanh(torch.einsum("nd,thd->nth", f, self.enc_w) + self.enc_b)
            recon = torch.einsum("nth,tdh->ntd", hidden, self.dec_w) + self.dec_b
            own = (((recon - f[:, None, :]) ** 2).mean(-1) / self.thresholds).float().cpu()
            if len(self.hybrid):
                gate = gelu(torch.einsum("nd,hgd->nhg", f, self.gate_w1) + self.gate_b1)
                logit = torch.einsum("nhg,hg->nh", gate, self.gate_w2) + self.gate_b2
                vetoed = (F.softplus(-logit) / self.gate_thresholds).float().cpu()
                mine = own[:, self.hybrid]  # as HybridSelector.error / threshold
                own[:, self.hybrid] = torch.where(vetoed <= 1.0, mine, torch.maximum(mine, vetoed))
            out[:, self.stacked] = own
        for i, s in self.others:
            out[:, i] = score(s, feats).float().cpu()
        return out
