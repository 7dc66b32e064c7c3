"""K, the number of top blocks per tower that hold experts (`MoEConfig.expert_blocks`): the default a bank's
first task takes, and the bank a new task trains on (docs/method.md, Shared frozen prefix)."""

from __future__ import annotations

import math
from dataclasses import replace

from model_store.backbone import Backbone
from model_store.bank import BankSnapshot
from model_store.experts import MoEConfig

# The share of each tower's top blocks that a bank's first task puts experts in, unless told (TrainConfig
# .expert_blocks). 1.0: every block. Chosen by measurement (docs/method.md, Shared frozen prefix).
DEFAULT_EXPERT_SHARE = 1.0


def default_expert_blocks(backbone: Backbone) -> int:
    """K for a bank's first task when none is asked for: the top DEFAULT_EXPERT_SHARE of the deepest tower's
    blocks, or 0 (every block) when that is all of them."""
    layers = max(t.layers for t in backbone.towers.values())
    k = math.ceil(DEFAULT_EXPERT_SHARE * layers)
    return 0 if k >= layers else k


def compared_values(layers: int) -> list[int]:
    """The Ks the benchmarks compare: L, L/2 and L/4 (at least 1), without repeats."""
    return list(dict.fromkeys((layers, max(1, layers // 2), max(1, layers // 4))))


def with_expert_blocks(bank: BankSnapshot, blocks: int | None) -> BankSnapshot:
    """The bank a new task trains on: a bank with tasks keeps its K (asking for another is an error: the server
    would refuse the bundle); an empty bank takes `blocks`, or the default. K covering every block is 0."""
    if bank.tasks:
        if blocks is not None and _normal_blocks(bank.backbone, blocks) != bank.config.expert_blocks:
            have = MoEConfig.blocks_text(bank.config.expert_blocks)
            raise ValueError(
                f"expert_blocks={blocks}, but this bank's tasks have experts in {have}: a bank cannot mix them"
            )
        return bank
    k = default_expert_blocks(bank.backbone) if blocks is None else _normal_blocks(bank.backbone, blocks)
    return replace(bank, config=replace(bank.config, expert_blocks=k))


def _normal_blocks(backbone: Backbone, blocks: int) -> int:
    layers = max(t.layers for t in backbone.towers.values())
    if blocks > layers:
        raise ValueError(f"expert_blocks={blocks}, but this backbone's towers have {layers} blocks: give 0 to {layers}")
    return 0 if blocks == layers else blocks
