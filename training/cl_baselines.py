"""The continual-learning benchmark's sequential baselines: `finetune` (with `wise-ft` read off the same run) and
`adapter`, each trained task after task on one set of weights."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch

from model_store.backbone import TOWERS, Backbone
from model_store.experts import MoEConfig, Routing, TaskRouter, new_expert

from .cl_agnostic import agnostic_of_model
from .cl_common import TEMPLATE, CLConfig, RunLog, SequenceStep, train_cfg
from .progress import progress_bar
from .trainer import accuracy, default_lr, fit_steps


def _shared_adapter(bb: Backbone, cfg: CLConfig) -> tuple[Callable[[int, bool], Routing], torch.nn.ParameterList]:
    """One expert per block and tower that every sample goes through (gate 1): a plain sequential adapter."""
    g = torch.Generator().manual_seed(cfg.seed)
    experts, weights, slots = {}, {}, {}
    for tower in TOWERS:
        spec = bb.towers[tower]
        experts[tower] = [[new_expert(spec.width, 64, g)] for _ in range(spec.layers)]
        weights[tower] = [torch.zeros(1, spec.width, device=bb.device) for _ in range(spec.layers)]
        slots[tower] = [torch.zeros(1, dtype=torch.long, device=bb.device) for _ in range(spec.layers)]
    params = torch.nn.ParameterList([p for blocks in experts.values() for (e,) in blocks for p in e.parts().values()])
    params.to(bb.device)  # moves each parameter's data in place, so the experts see it
    router = TaskRouter(weights, slots)

    def routing(n: int, training: bool) -> Routing:
        idx = torch.zeros(n, dtype=torch.long, device=bb.device)
        return Routing(experts, [router], idx, MoEConfig(), training)

    return routing, params


class _WiseFT:
    """WiSE-FT (Wortsman et al., 2022) read off the fine-tuning run: after each task, the fine-tuned weights
    interpolated with the zero-shot ones, (1 - alpha) * zero-shot + alpha * fine-tuned. Training goes on from the
    fine-tuned weights, so the row costs evaluations only."""

    def __init__(self, zero_shot: torch.nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self.start = {k: v.detach().clone() for k, v in zero_shot.state_dict().items()}
        self.model = copy.deepcopy(zero_shot)

    @torch.no_grad()
    def mixed(self, tuned: torch.nn.Module) -> torch.nn.Module:
        state = self.model.state_dict()
        for k, v in tuned.state_dict().items():
            state[k].copy_(torch.lerp(self.start[k], v, self.alpha) if v.is_floating_point() else v)
        return self.model


def _scorer(model: torch.nn.Module, bb: Backbone, routing) -> Callable[..., float]:
    """`model`'s accuracy on a labelled set, over that set's classes, with the given prompts."""
    return lambda data, templates=(TEMPLATE,): accuracy(model, bb, data, templates, lambda n: routing(n, False))


def _row(model: torch.nn.Module, bb: Backbone, seq: Sequence[SequenceStep], routing) -> list[float]:
    score = _scorer(model, bb, routing)
    return [score(e.test, e.templates) for e in seq]


def run_sequential(
    bb: Backbone, seq: Sequence[SequenceStep], cfg: CLConfig, run: RunLog, method: str, progress: bool
) -> None:
    """`finetune` (every weight but logit_scale; and `wise-ft` if asked) or `adapter` (one shared adapter),
    trained task after task."""
    start = time.perf_counter()
    wise = None
    if method == "finetune":
        model = copy.deepcopy(bb.model)
        params = [p for n, p in model.named_parameters() if n != "logit_scale"]
        for p in params:
            p.requires_grad_(True)
        lr = cfg.finetune_lr or default_lr(bb) / 10
        wise = _WiseFT(bb.model, cfg.wise_alpha) if "wise-ft" in cfg.methods else None

        def routing(n: int, training: bool) -> None:
            return None
    else:
        model, lr = bb.model, None
        routing, params = _shared_adapter(bb, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    for t, d in enumerate(progress_bar(seq, desc=method, unit="task", disable=not progress)):
        torch.manual_seed(cfg.seed + t)
        tcfg = train_cfg(cfg, d, t)
        fit_steps(model, bb, d.train, tcfg, params, lambda n, step: routing(n, True), g, progress, peak_lr=lr)
        run.val.setdefault(method, {})[d.name] = accuracy(model, bb, d.val, d.templates, lambda n: routing(n, False))
        run.row(method, _row(model, bb, seq, routing))
        if wise is not None:
            mixed = wise.mixed(model)
            run.val.setdefault("wise-ft", {})[d.name] = accuracy(mixed, bb, d.val, d.templates, lambda n: None)
            run.row("wise-ft", _row(mixed, bb, seq, routing))
    run.agnostic[method] = agnostic_of_model(_scorer(model, bb, routing), seq)
    if wise is not None:
        run.agnostic["wise-ft"] = agnostic_of_model(_scorer(wise.model, bb, routing), seq)
    run.seconds[method] = round(time.perf_counter() - start, 1)
