"""What a pass costs: FLOPs per image or prompt (counted by torch's FlopCounterMode), and the machine's GEMM rate."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from model_store.bank import BankSnapshot
from model_store.moe_clip import encode_image, encode_text
from model_store.selector import score


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


def pass_flops(bank: BankSnapshot, task: int = 0) -> dict[str, int]:
    """FLOPs of one image or one prompt through each pass; adapted passes use task `task` of `bank` if it has one.

    Counted are matrix products and attention (what FlopCounterMode knows); norms and activations are not.
    The model is switched to train mode while counting (CLIP has no dropout, so it computes the same): in eval
    mode PyTorch's fused attention kernel runs, whose projections FlopCounterMode does not see. Do not call
    this on a model that is serving.
    """
    bb = bank.backbone
    was_training = bb.model.training
    bb.model.train()
    try:
        return _pass_flops(bank, task)
    finally:
        bb.model.train(was_training)


def _pass_flops(bank: BankSnapshot, task: int) -> dict[str, int]:
    bb = bank.backbone
    image = torch.rand(1, 3, bb.image_size, bb.image_size, device=bb.device)
    prompt = bb.tokenizer(["a photo of a thing."]).to(bb.device)
    out = {
        "image_frozen": _flops(lambda: encode_image(bb.model, image)),
        "text_frozen_per_prompt": _flops(lambda: encode_text(bb.model, prompt)),
    }
    if bank.tasks:
        routing = bank.routing(torch.tensor([task]))
        out["image_adapted"] = _flops(lambda: encode_image(bb.model, image, routing))
        out["text_adapted_per_prompt"] = _flops(lambda: encode_text(bb.model, prompt, routing))
        feats = torch.nn.functional.normalize(torch.rand(1, bb.embed_dim, device=bb.device), dim=-1)
        out["selector_per_task"] = _flops(lambda: score(bank.tasks[task].selector, feats))
    return out


def gemm_rate(n: int = 2048, seconds: float = 3.0, device: str = "cpu") -> float:
    """Measured FLOP/s of a square float32 matrix product with torch's default threads: the compute bound."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(n, n, generator=g).to(device) for _ in range(2))
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start)
