"""Distribution-discriminative selectors (DDAS, docs/method.md, Selector): does an image belong to a task, per image."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from .errors import BundleInvalid
from .modes import DEFAULT_SELECTOR
from .settings import field_type_problems

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectorConfig:
    """How a selector is fitted and calibrated."""

    kind: str = DEFAULT_SELECTOR
    bottleneck: int = 32
    epochs: int = 300
    lr: float = 3e-3
    percentile: float = 99.0
    margin: float = 1.0  # threshold = margin * percentile of held-out in-distribution errors
    shrinkage: float = 0.1  # gaussian kind: covariance shrinkage toward the mean eigenvalue
    hidden: int = 64  # discriminative kind: hidden units of its head
    weight_decay: float = 1e-4  # discriminative kind
    false_claim: float = 0.01  # the share of held-out negatives the threshold may claim...
    self_claim: float = 0.97  # ...but never below the share of the task's own held-out images it keeps
    seed: int = 0

    def __post_init__(self) -> None:
        if problems := field_type_problems(self):  # before the ranges, which compare
            raise ValueError("invalid SelectorConfig: " + "; ".join(problems))
        if self.kind not in SELECTOR_KINDS:
            problems.append(f"kind must be one of {sorted(SELECTOR_KINDS)}, got {self.kind!r}")
        if not 50.0 <= self.percentile <= 100.0:
            problems.append(f"percentile must be in [50, 100], got {self.percentile}")
        if not 0 < self.margin <= 4:  # a bundle's threshold is at most 4x its largest held-out error (manifest.py)
            problems.append(f"margin must be in (0, 4], got {self.margin}")
        if self.bottleneck < 1:
            problems.append(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 < self.shrinkage <= 1.0:
            problems.append(f"shrinkage must be in (0, 1], got {self.shrinkage}")
        if self.hidden < 1:
            problems.append(f"hidden must be >= 1, got {self.hidden}")
        if not 0.0 < self.false_claim < 1.0 or not 0.0 < self.self_claim <= 1.0:
            problems.append(f"false_claim and self_claim must be in (0, 1), got {self.false_claim}, {self.self_claim}")
        if problems:
            raise ValueError("invalid SelectorConfig: " + "; ".join(problems))


class Selector(Protocol):
    kind: ClassVar[str]
    threshold: float
    calibration: dict[str, float]

    def error(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw out-of-distribution error per row of normalised embeddings [B, D]; larger is further away."""

    def tensors(self) -> dict[str, torch.Tensor]: ...


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x), in plain elementwise ops. `F.gelu` on CPU runs a oneDNN kernel compiled for each
    input shape and cached for the life of the process: the gates' [images, tasks, hidden] shape changes with
    every bank size, so a growing bank kept compiling (measured with memray: about 1 MiB of native memory per
    task on the tiny backbone). Equal to `F.gelu` within float rounding."""
    return x * 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def score(selector: Selector, feats: torch.Tensor) -> torch.Tensor:
    """error / threshold: at most 1 means 'this image belongs to the task'."""
    return selector.error(feats) / selector.threshold


def _calibrate(errors: torch.Tensor, cfg: SelectorConfig) -> tuple[float, dict[str, float]]:
    e = errors.detach().float().cpu()
    q = torch.quantile(e, torch.tensor([0.5, 0.9, 0.95, 0.99, cfg.percentile / 100.0]))
    stats = {
        "n": float(len(e)),
        "mean": float(e.mean()),
        "std": float(e.std()) if len(e) > 1 else 0.0,
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p95": float(q[2]),
        "p99": float(q[3]),
        "max": float(e.max()),
        "percentile": cfg.percentile,
        "margin": cfg.margin,
    }
    threshold = max(float(q[4]) * cfg.margin, 1e-12)
    return threshold, stats


@dataclass
class AutoencoderSelector:
    """dim -> bottleneck -> dim autoencoder (tanh code); the error is the mean squared reconstruction error."""

    kind: ClassVar[str] = "autoencoder"
    enc_w: torch.Tensor
    enc_b: torch.Tensor
    dec_w: torch.Tensor
    dec_b: torch.Tensor
    threshold: float = 1.0
    calibration: dict[str, float] | None = None

    def error(self, feats: torch.Tensor) -> torch.Tensor:
        recon = F.linear(torch.tanh(F.linear(feats, self.enc_w, self.enc_b)), self.dec_w, self.dec_b)
        return ((recon - feats) ** 2).mean(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"enc_w": self.enc_w, "enc_b": self.enc_b, "dec_w": self.dec_w, "dec_b": self.dec_b}

    @classmethod
    def fit(cls, train: torch.Tensor, cfg: SelectorConfig) -> AutoencoderSelector:
        g = torch.Generator().manual_seed(cfg.seed)
        d = train.shape[1]
        enc, dec = torch.nn.Linear(d, cfg.bottleneck), torch.nn.Linear(cfg.bottleneck, d)
        for lin in (enc, dec):
            torch.nn.init.normal_(lin.weight, std=lin.in_features**-0.5, generator=g)
            torch.nn.init.zeros_(lin.bias)
        params = [*enc.parameters(), *dec.parameters()]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        x = train.detach().float()
        with torch.enable_grad():
            for _ in range(cfg.epochs):  # full batch: task feature sets are small
                loss = ((dec(torch.tanh(enc(x))) - x) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(*(p.detach().clone() for p in (enc.weight, enc.bias, dec.weight, dec.bias)))


@dataclass
class GaussianSelector:
    """One Gaussian per task (mean, shrunk covariance); the error is the squared Mahalanobis distance / dim."""

    kind: ClassVar[str] = "gaussian"
    mean: torch.Tensor
    precision: torch.Tensor
    threshold: float = 1.0
    calibration: dict[str, float] | None = None

    def error(self, feats: torch.Tensor) -> torch.Tensor:
        z = feats - self.mean
        return ((z @ self.precision) * z).sum(-1) / z.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "precision": self.precision}

    @classmethod
    def fit(cls, train: torch.Tensor, cfg: SelectorConfig) -> GaussianSelector:
        x = train.detach().double()
        mean = x.mean(0)
        cov = torch.cov((x - mean).T) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
        target = torch.eye(x.shape[1], dtype=x.dtype) * max(float(torch.diagonal(cov).mean()), 1e-6)
        shrunk = (1 - cfg.shrinkage) * cov + cfg.shrinkage * target
        return cls(mean.float(), torch.linalg.inv(shrunk).float())


@dataclass
class DiscriminativeSelector:
    """A small MLP on the frozen embedding, trained to tell the task's images from everything else it is shown:
    a reference set of outside images and the probes of the bank's other tasks. The error is softplus(-logit),
    i.e. -log p(the task's own), so it ranks like the other kinds (lower: more the task's)."""

    kind: ClassVar[str] = "discriminative"
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    threshold: float = 1.0
    calibration: dict[str, float] | None = None

    def logit(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear(gelu(F.linear(feats, self.w1, self.b1)), self.w2, self.b2).squeeze(-1)

    def error(self, feats: torch.Tensor) -> torch.Tensor:
        return F.softplus(-self.logit(feats))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    @classmethod
    def fit(cls, train: torch.Tensor, cfg: SelectorConfig, negatives: torch.Tensor | None = None) -> Any:
        if negatives is None or len(negatives) == 0:
            raise ValueError("a discriminative selector needs negatives: a reference set or other tasks' probes")
        g = torch.Generator().manual_seed(cfg.seed)
        d = train.shape[1]
        hidden, head = torch.nn.Linear(d, cfg.hidden), torch.nn.Linear(cfg.hidden, 1)
        for lin in (hidden, head):
            torch.nn.init.normal_(lin.weight, std=lin.in_features**-0.5, generator=g)
            torch.nn.init.zeros_(lin.bias)
        x = torch.cat([train, negatives]).detach().float()
        y = torch.cat([torch.ones(len(train)), torch.zeros(len(negatives))])
        w = torch.where(y > 0, 0.5 / len(train), 0.5 / len(negatives))  # each side weighs the same
        params = [*hidden.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        with torch.enable_grad():
            for _ in range(cfg.epochs):  # full batch: a few thousand embeddings
                logit = head(F.gelu(hidden(x))).squeeze(-1)
                loss = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * w).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(*(p.detach().clone() for p in (hidden.weight, hidden.bias, head.weight, head.bias)))


@dataclass
class HybridSelector:
    """An autoencoder that ranks and a discriminative gate that vetoes: an image is the task's only when both
    claim it (each under its own calibrated threshold), and among the tasks that do, the autoencoder's score
    decides, on the same scale as a plain autoencoder's. The gate, trained against a reference set and the bank's
    probes, keeps generic images out; the autoencoder, a density score, does not favour earlier tasks, which never
    saw the later ones (docs/benchmarks/routing.md: each alone loses one of the two). `threshold` is the
    autoencoder's; `gate_threshold` the gate's."""

    kind: ClassVar[str] = "hybrid"
    enc_w: torch.Tensor
    enc_b: torch.Tensor
    dec_w: torch.Tensor
    dec_b: torch.Tensor
    gate_w1: torch.Tensor
    gate_b1: torch.Tensor
    gate_w2: torch.Tensor
    gate_b2: torch.Tensor
    threshold: float = 1.0
    calibration: dict[str, float] | None = None
    gate_threshold: float = 1.0

    def parts(self) -> tuple[AutoencoderSelector, DiscriminativeSelector]:
        """Its two selectors (sharing its tensors), each with its own threshold."""
        ae = AutoencoderSelector(self.enc_w, self.enc_b, self.dec_w, self.dec_b, self.threshold)
        gate = DiscriminativeSelector(self.gate_w1, self.gate_b1, self.gate_w2, self.gate_b2, self.gate_threshold)
        return ae, gate

    def error(self, feats: torch.Tensor) -> torch.Tensor:
        ae, gate = self.parts()
        own, vetoed = ae.error(feats), score(gate, feats)
        # kept when the gate claims; else at least the gate's score on this scale, so above the threshold
        return torch.where(vetoed <= 1.0, own, torch.maximum(own, vetoed * self.threshold))

    def tensors(self) -> dict[str, torch.Tensor]:
        ae, gate = self.parts()
        return {**ae.tensors(), **{f"gate_{k}": v for k, v in gate.tensors().items()}}

    @classmethod
    def fit(cls, train: torch.Tensor, cfg: SelectorConfig, negatives: torch.Tensor | None = None) -> Any:
        ae = AutoencoderSelector.fit(train, cfg)
        gate = DiscriminativeSelector.fit(train, cfg, negatives)
        return cls(*ae.tensors().values(), *gate.tensors().values())

    def calibrate(self, calib: torch.Tensor, cfg: SelectorConfig, held_negatives: torch.Tensor | None) -> None:
        """Each part calibrated on its own (the same rules as a plain selector of its kind)."""
        ae, gate = self.parts()
        calibrate(ae, calib, cfg, held_negatives)
        calibrate(gate, calib, cfg, held_negatives)
        self.threshold, self.gate_threshold = ae.threshold, gate.threshold
        gate_stats = {f"gate_{k}": v for k, v in (gate.calibration or {}).items() if k not in ("percentile", "margin")}
        self.calibration = {**(ae.calibration or {}), **gate_stats, "gate_threshold": gate.threshold}


SELECTOR_KINDS: dict[str, Callable[..., Any]] = {
    "autoencoder": AutoencoderSelector,
    "gaussian": GaussianSelector,
    "discriminative": DiscriminativeSelector,
    "hybrid": HybridSelector,
}
NEEDS_NEGATIVES = ("discriminative", "hybrid")  # the kinds that fit on negatives (a reference set, other probes)


def fit_selector(
    train: torch.Tensor,
    calib: torch.Tensor,
    cfg: SelectorConfig,
    negatives: torch.Tensor | None = None,
    held_negatives: torch.Tensor | None = None,
) -> Selector:
    """Fit on the task's training embeddings; calibrate the threshold on held-out ones (never seen in fitting).

    `negatives` (outside images, other tasks) train the discriminative kind; `held_negatives`, never fitted,
    calibrate every kind: the threshold then also keeps the share of them it claims at most `false_claim`.
    """
    if len(train) < 2 or len(calib) < 1:
        raise ValueError(f"selector needs >= 2 training and >= 1 calibration images, got {len(train)} and {len(calib)}")
    if cfg.kind == "hybrid" and (negatives is None or len(negatives) == 0):
        log.warning("no negatives (no reference set, no other task): the hybrid selector's gate falls back to none")
        cfg = replace(cfg, kind="autoencoder")
    kind = SELECTOR_KINDS[cfg.kind]
    selector = kind.fit(train, cfg, negatives) if cfg.kind in NEEDS_NEGATIVES else kind.fit(train, cfg)
    calibrate(selector, calib, cfg, held_negatives)
    return selector


def calibrate(
    selector: Selector, calib: torch.Tensor, cfg: SelectorConfig, held_negatives: torch.Tensor | None = None
) -> None:
    """Set `selector.threshold` and `.calibration` from the task's held-out embeddings `calib` (a percentile of
    their errors) and, if given, held-out negatives (at most `false_claim` of them claimed, while keeping at
    least `self_claim` of `calib`)."""
    if isinstance(selector, HybridSelector):
        selector.calibrate(calib, cfg, held_negatives)
        return
    own = selector.error(calib.float()).detach().float().cpu()
    selector.threshold, selector.calibration = _calibrate(own, cfg)
    if held_negatives is not None and len(held_negatives):
        neg = selector.error(held_negatives.float()).detach().float().cpu()
        cap = float(torch.quantile(neg, cfg.false_claim))  # at most `false_claim` of them have a lower error
        selector.calibration["neg_n"] = float(len(neg))
        selector.calibration["neg_p01"] = float(torch.quantile(neg, 0.01))
        selector.calibration["neg_cap"] = cap
        floor = float(torch.quantile(own, cfg.self_claim))
        if cap < selector.threshold:  # the negatives would be claimed: tighten, but keep self_claim of its own
            selector.threshold = max(cap, floor, 1e-12)
        selector.calibration["neg_claimed"] = float((neg <= selector.threshold).float().mean())


def selector_manifest(selector: Selector, cfg: SelectorConfig) -> dict[str, Any]:
    return {
        "kind": selector.kind,
        "threshold": selector.threshold,
        "calibration": selector.calibration,
        "config": asdict(cfg),
    }


def _rows(tensors: dict[str, torch.Tensor], name: str) -> int:
    t = tensors.get(name)
    return t.shape[0] if t is not None and t.ndim == 2 else -1


def _wanted_shapes(kind: str, tensors: dict[str, torch.Tensor], dim: int) -> dict[str, tuple[int, ...]] | None:
    """The shape each tensor of a selector of `kind` must have for embeddings of width `dim`; None: unknown kind."""
    if kind == "autoencoder":
        h = _rows(tensors, "enc_w")
        return {"enc_w": (h, dim), "enc_b": (h,), "dec_w": (dim, h), "dec_b": (dim,)}
    if kind == "gaussian":
        return {"mean": (dim,), "precision": (dim, dim)}
    if kind == "discriminative":
        h = _rows(tensors, "w1")
        return {"w1": (h, dim), "b1": (h,), "w2": (1, h), "b2": (1,)}
    if kind == "hybrid":
        gate = {k[len("gate_") :]: v for k, v in tensors.items() if k.startswith("gate_")}
        ae, disc = _wanted_shapes("autoencoder", tensors, dim), _wanted_shapes("discriminative", gate, dim)
        return {**(ae or {}), **{f"gate_{k}": v for k, v in (disc or {}).items()}}
    return None


def selector_shape_problems(kind: str, tensors: dict[str, torch.Tensor], dim: int) -> list[str]:
    """Shape problems of a selector's tensors for embeddings of width `dim` (empty when they fit)."""
    want = _wanted_shapes(kind, tensors, dim)
    if want is None:
        return [f"selector kind {kind!r} is unknown; known: {sorted(SELECTOR_KINDS)}"]
    if extra := sorted(set(tensors) - set(want)):  # stored and held in memory for nothing (a 248 MB one passed)
        names = ", ".join("selector." + k for k in extra[:3])
        return [f"selector {kind} takes no tensor {names}; its tensors: {sorted(want)}"]
    got = {k: tuple(tensors[k].shape) if k in tensors else None for k in want}
    return (
        []
        if got == want and min(min(w) for w in want.values()) > 0
        else [f"selector {kind} tensors {got} do not fit embeddings of width {dim}"]
    )


def load_selector(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Selector:
    """Rebuild a selector from the bundle manifest's `selector` section and its `selector.*` tensors."""
    kind = meta.get("kind")
    if kind not in SELECTOR_KINDS:
        raise BundleInvalid(f"selector kind {kind!r} is unknown; known: {sorted(SELECTOR_KINDS)}")
    cls = SELECTOR_KINDS[kind]
    names = [f for f in cls.__dataclass_fields__ if f not in ("kind", "threshold", "calibration", "gate_threshold")]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise BundleInvalid(f"selector {kind} is missing tensors: {', '.join('selector.' + m for m in missing)}")
    calibration = meta.get("calibration")
    thresholds = {"threshold": meta.get("threshold")}
    if kind == "hybrid":
        thresholds["gate_threshold"] = calibration.get("gate_threshold") if isinstance(calibration, dict) else None
    for name, value in thresholds.items():
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise BundleInvalid(f"selector {name} must be a finite number > 0, got {value!r}")
    tensors_in_order = (tensors[n].float() for n in names)
    return cls(*tensors_in_order, calibration=calibration, **{k: float(v) for k, v in thresholds.items()})
