"""MoE adapter experts and per-task routers (docs/method.md, Forward pass), kept as plain tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .digest import tensor_digest

EXPERT_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
# training: an expert chosen by at least 1/DENSE_SHARE of a batch's samples runs on all of them (gate 0 for the
# others) as part of one wide adapter (Routing._wide); rarer ones run on their own rows
DENSE_SHARE = 4
LOOP_MAX_EXPERTS = 4  # distinct experts in a block's batch up to which a Python loop over them is as fast


MAX_SCALE = 100.0  # an expert's output multiplier (the paper's 0.1): beyond this, no trained bundle goes
MAX_NOISE_EPS = 1.0  # the router noise's floor during training (0.01)


@dataclass(frozen=True)
class MoEConfig:
    """How experts and routers compute. Validated on construction."""

    rank: int = 64
    scale: float = 0.1
    top_k: int = 2
    dropout: float = 0.1
    noise_eps: float = 0.01
    # K: experts only in the top K residual blocks of each tower (0: every block). The blocks below are plain
    # frozen CLIP, so a routed image's adapted pass starts from the frozen pass's tokens at block L - K
    # (docs/method.md, Shared frozen prefix). Every task of a bank has the same K.
    expert_blocks: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.expert_blocks < 0:
            problems.append(f"expert_blocks must be >= 0 (0: every block), got {self.expert_blocks}")
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.scale <= MAX_SCALE:  # also false for NaN
            problems.append(f"scale must be in (0, {MAX_SCALE}], got {self.scale}")
        if not 0.0 <= self.noise_eps <= MAX_NOISE_EPS:
            problems.append(f"noise_eps must be in [0, {MAX_NOISE_EPS}], got {self.noise_eps}")
        if problems:
            raise ValueError("invalid MoEConfig: " + "; ".join(problems))

    def first_block(self, layers: int) -> int:
        """The lowest block of a `layers`-block tower that holds experts."""
        return 0 if self.expert_blocks == 0 else max(0, layers - self.expert_blocks)

    @staticmethod
    def blocks_text(k: int) -> str:
        """How a K reads in messages: "every block" or "the top K blocks"."""
        return "every block" if k == 0 else f"the top {k} blocks"

    def to_json(self) -> dict[str, float]:
        """The manifest's `moe`; `expert_blocks` only when set, so bundles with experts in every block read
        exactly as before in older releases."""
        out = asdict(self)
        if not self.expert_blocks:
            del out["expert_blocks"]
        return out


@dataclass(frozen=True)
class Expert:
    """One expert: E(x) = scale * up(dropout(relu(down(x)))). Published experts are never modified."""

    down_w: torch.Tensor  # [r, d]
    down_b: torch.Tensor  # [r]
    up_w: torch.Tensor  # [d, r]
    up_b: torch.Tensor  # [d]

    def parts(self) -> dict[str, torch.Tensor]:
        return dict(zip(EXPERT_PARTS, (self.down_w, self.down_b, self.up_w, self.up_b), strict=True))

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor]) -> Expert:
        return cls(*(parts[p] for p in EXPERT_PARTS))

    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())


def new_expert(width: int, rank: int, generator: torch.Generator | None = None) -> Expert:
    """A fresh trainable expert: kaiming-uniform(a=sqrt(5)) down, zero up and biases, so it outputs exactly 0."""
    down_w = torch.nn.init.kaiming_uniform_(torch.empty(rank, width), a=math.sqrt(5), generator=generator)
    parts = (down_w, torch.zeros(rank), torch.zeros(width, rank), torch.zeros(width))
    return Expert(*(torch.nn.Parameter(p) for p in parts))


def expert_id(parts: Mapping[str, torch.Tensor]) -> str:
    """Content address of an expert: the digest of its four tensors."""
    return tensor_digest({p: parts[p] for p in EXPERT_PARTS})


def _stacked(tensors: Sequence[torch.Tensor], dim: int, size: int) -> torch.Tensor:
    """The tensors stacked, each zero-padded along `dim` to `size`. A rank-r expert padded to rank R is the same
    function (up to the order of float sums): its extra hidden units get zero weights and bias (relu(0) = 0), and
    zero output weights."""
    if all(t.shape[dim] == size for t in tensors):
        return torch.stack(tensors)
    out = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]
        out.append(F.pad(t, pad))
    return torch.stack(out)


def expert_forward(x: torch.Tensor, e: Expert, scale: float, dropout: float, training: bool) -> torch.Tensor:
    h = F.relu(F.linear(x, e.down_w, e.down_b))
    if training and dropout > 0:
        h = F.dropout(h, dropout, training=True)
    return scale * F.linear(h, e.up_w, e.up_b)


@dataclass(frozen=True)
class TaskRouter:
    """One task's routers: per tower, per block, a [E_visible, d] weight and the bank slots its columns refer to."""

    weights: Mapping[str, Sequence[torch.Tensor]]
    slots: Mapping[str, Sequence[torch.Tensor]]
    noise: Mapping[str, Sequence[torch.Tensor]] | None = None  # training only
    allowed: Mapping[str, Sequence[torch.Tensor]] | None = None  # optional column mask (ATLAS stage 1)


@dataclass
class ActivationCounts:
    """Per tower and block, how often each bank slot was among a sample's top-k. Filled when passed in."""

    counts: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def add(self, tower: str, block: int, slots: torch.Tensor, n_slots: int) -> None:
        valid = slots[slots >= 0]
        c = torch.bincount(valid.cpu(), minlength=n_slots)
        key = (tower, block)
        self.counts[key] = c if key not in self.counts else self.counts[key] + c


@dataclass(frozen=True)
class Routing:
    """The per-call routing of one forward pass: which task router (or none, -1) serves each sample."""

    experts: Mapping[str, Sequence[Sequence[Expert]]]  # tower -> block -> slot -> expert
    routers: Sequence[TaskRouter]
    task_index: torch.Tensor  # [B] long, index into routers, -1 for no adapter
    config: MoEConfig = MoEConfig()
    training: bool = False
    counts: ActivationCounts | None = None

    def covers(self, tower: str, block: int) -> bool:
        """Whether the block has any expert (none below the top `expert_blocks`): else it runs plain."""
        return bool(self.experts[tower][block])

    def branch(self, tower: str, block: int, h: torch.Tensor) -> torch.Tensor:
        """The MoE branch output for the post-attention stream `h` [B, L, d] of one block."""
        slots, gates = self._route(tower, block, h[:, 0])
        experts = self.experts[tower][block]
        if self.counts is not None:
            self.counts.add(tower, block, slots, len(experts))
        used = torch.unique(slots[slots >= 0]).tolist()
        if not self.training and len(used) > LOOP_MAX_EXPERTS:
            return self._gathered(experts, slots, gates, h)
        out = torch.zeros_like(h)
        if self.training:  # the experts most samples chose run as one wide adapter; the rest, row by row below
            chosen = torch.bincount(slots[slots >= 0], minlength=len(experts)).tolist()
            wide = [s for s in used if chosen[s] * DENSE_SHARE >= len(h)]
            out, used = self._wide(experts, wide, slots, gates, h), [s for s in used if s not in wide]
        for s in used:
            b, j = (slots == s).nonzero(as_tuple=True)
            y = expert_forward(h[b], experts[s], self.config.scale, self.config.dropout, self.training)
            out = out.index_add(0, b, (y * gates[b, j].to(y.dtype)[:, None, None]).to(out.dtype))
        return out

    def _wide(
        self, experts: Sequence[Expert], wide: Sequence[int], slots: torch.Tensor, gates: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        """Training: the experts `wide` side by side as one adapter of their ranks together, every sample through
        all of them, each expert's hidden units weighted by the sample's gate for it (0 where not chosen). The same
        function as the loop's sum_k g_k E_k(x), in two matrix products for all of them and without the loop's
        row gathers and scatters, which cost more than the experts' own arithmetic at training batch sizes."""
        if not wide:
            return torch.zeros_like(h)
        picked = [experts[s] for s in wide]
        scale = self.config.scale
        down_w, down_b = torch.cat([e.down_w for e in picked]), torch.cat([e.down_b for e in picked])
        up_w, up_b = torch.cat([e.up_w for e in picked], 1) * scale, torch.stack([e.up_b for e in picked]) * scale
        g = torch.stack([(gates * (slots == s)).sum(1) for s in wide], 1)  # [B, E]: each sample's gate per expert
        z = F.relu(F.linear(h, down_w, down_b))
        if self.config.dropout > 0:
            z = F.dropout(z, self.config.dropout, training=True)
        ranks = torch.tensor([e.down_w.shape[0] for e in picked], device=h.device)
        z = z * torch.repeat_interleave(g, ranks, dim=1).to(z.dtype)[:, None, :]
        return (F.linear(z, up_w) + (g.to(up_b.dtype) @ up_b)[:, None, :]).to(h.dtype)

    def _gathered(
        self, experts: Sequence[Expert], slots: torch.Tensor, gates: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        """Inference with many distinct experts in one batch (a mix of tasks): each (sample, choice) pair gets
        its expert's weights gathered, and all pairs run as two batched matrix products instead of a Python
        loop over experts. Same result as the loop; the cost no longer grows with the number of tasks."""
        b, k = slots.shape
        picked = [experts[s] for s in slots.clamp_min(0).reshape(-1).tolist()]
        rank = max(e.down_w.shape[0] for e in picked)  # tasks trained with other ranks: zero-padded
        down_w, down_b = _stacked([e.down_w for e in picked], 0, rank), _stacked([e.down_b for e in picked], 0, rank)
        up_w, up_b = _stacked([e.up_w for e in picked], 1, rank), torch.stack([e.up_b for e in picked])
        x = h.unsqueeze(1).expand(b, k, *h.shape[1:]).reshape(b * k, *h.shape[1:])
        z = torch.relu(torch.baddbmm(down_b.unsqueeze(1), x, down_w.transpose(1, 2)))
        y = torch.baddbmm(up_b.unsqueeze(1), z, up_w.transpose(1, 2)).view(b, k, *h.shape[1:])
        weight = (gates * (slots >= 0)).to(y.dtype) * self.config.scale
        return torch.einsum("bk,bkld->bld", weight, y).to(h.dtype)  # autocast: y may be half

    def _route(self, tower: str, block: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.config.top_k
        slots = torch.full((x0.shape[0], k), -1, dtype=torch.long, device=x0.device)
        gates = torch.zeros((x0.shape[0], k), dtype=x0.dtype, device=x0.device)
        for t in torch.unique(self.task_index[self.task_index >= 0]).tolist():
            rows = (self.task_index == t).nonzero(as_tuple=True)[0]
            r = self.routers[t]
            logits = x0[rows] @ r.weights[tower][block].T
            if self.training and r.noise is not None:
                std = F.softplus(x0[rows] @ r.noise[tower][block].T) + self.config.noise_eps
                logits = logits + torch.randn_like(logits) * std
            if r.allowed is not None:
                logits = logits.masked_fill(~r.allowed[tower][block], float("-inf"))
            kk = min(k, logits.shape[1])
            top, cols = logits.topk(kk, dim=1)
            slots[rows, :kk] = r.slots[tower][block][cols]
            gates[rows, :kk] = torch.softmax(top, dim=1).to(gates.dtype)  # autocast may compute it in half
        return slots, gates
