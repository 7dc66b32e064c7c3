"""The bundle manifest's schema: every field checked for type and bound, every problem collected into one list."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from .backbone import TOWERS
from .errors import BundleInvalid
from .experts import MAX_SCALE, MoEConfig
from .labels import _is_text, _labels_problems, shown
from .modes import task_name_problem
from .selector import SELECTOR_KINDS

FORMAT = 1
ID_RE = re.compile(r"[0-9a-f]{64}")

# Bounds on what a manifest may ask the server to hold or compute (docs/bundle-format.md lists them).
MAX_SHORT_CHARS = 256  # backbone names, created_at, selector kind
MAX_FACTS, MAX_FACT_NAME, MAX_FACTS_BYTES = 64, 64, 4096  # backbone.config_facts (about 13 entries, 500 bytes)
MAX_VERSION = 2**31 - 1
MAX_TOP_K = 64
MAX_RANK = 4096
MAX_BLOCKS = 1024  # moe.expert_blocks
OPTIONAL_MOE = ("expert_blocks",)  # moe keys older bundles lack
# A threshold is an error level the task's own held-out images reach: far above the worst of them, it would
# claim everything (a threshold of 1e30 claims every image of every task).
THRESHOLD_OVER_MAX = 4.0
THRESHOLD_FLOOR = 1e-12  # calibration's least threshold (model_store/selector.py): a task of near-identical images
CALIBRATION_ORDER = ("p50", "p90", "p95", "p99", "max")


def validate_task_name(name: str) -> str:
    problem = task_name_problem(name)
    if problem:
        raise BundleInvalid(problem)
    return name


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, str) and ID_RE.fullmatch(i) for i in v)


def _timestamp_ok(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, str) or len(v) > MAX_SHORT_CHARS:
        return False
    try:
        datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


def _identity_problems(manifest: dict) -> list[str]:
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format must be {FORMAT}, got {shown(manifest.get('format'))}")
    if task_name_problem(manifest.get("task")):
        problems.append(task_name_problem(manifest.get("task")))
    if not _is_int(manifest.get("version"), 1, MAX_VERSION):
        problems.append(f"version must be an integer in 1..{MAX_VERSION}, got {shown(manifest.get('version'))}")
    if not _timestamp_ok(manifest.get("created_at")):
        problems.append(f"created_at must be an ISO-8601 timestamp or null, got {shown(manifest.get('created_at'))}")
    parent = manifest.get("parent")
    if parent is not None and not (isinstance(parent, str) and ID_RE.fullmatch(parent)):
        problems.append(f"parent must be a bundle id (64 hex digits) or null, got {shown(parent)}")
    if not (isinstance(manifest.get("content_sha256"), str) and ID_RE.fullmatch(manifest["content_sha256"])):
        problems.append("content_sha256 must be 64 hex digits")
    backbone = manifest.get("backbone")
    if not isinstance(backbone, dict) or not all(
        _is_text(backbone.get(k), MAX_SHORT_CHARS) for k in ("arch", "pretrained")
    ):
        problems.append(f"backbone must hold arch and pretrained (strings of <= {MAX_SHORT_CHARS} characters)")
    elif not (isinstance(backbone.get("fingerprint"), str) and ID_RE.fullmatch(backbone["fingerprint"])):
        problems.append("backbone.fingerprint must be 64 hex digits")
    elif backbone.get("config") is not None and not (
        isinstance(backbone["config"], str) and ID_RE.fullmatch(backbone["config"])
    ):
        problems.append("backbone.config must be 64 hex digits when given")
    elif backbone.get("config_facts") is not None and not _facts_ok(backbone["config_facts"]):
        problems.append(
            f"backbone.config_facts must be an object of at most {MAX_FACTS} entries, named in at most "
            f"{MAX_FACT_NAME} characters, and at most {MAX_FACTS_BYTES} bytes as UTF-8 JSON, when given"
        )
    training = manifest.get("training", {})
    if training is not None and not isinstance(training, dict):
        problems.append("training must be an object or null")
    return problems


def _facts_ok(facts: Any) -> bool:
    if not (isinstance(facts, dict) and len(facts) <= MAX_FACTS):
        return False
    if not all(isinstance(k, str) and 0 < len(k) <= MAX_FACT_NAME for k in facts):
        return False
    try:  # a lone surrogate would fail every answer that carries a message naming it
        return len(json.dumps(facts, ensure_ascii=False).encode("utf-8")) <= MAX_FACTS_BYTES
    except (UnicodeEncodeError, TypeError, ValueError):
        return False


def _routing_problems(manifest: dict) -> list[str]:
    experts = manifest.get("experts")
    problems = []
    if not isinstance(experts, dict) or not all(_ids(experts.get(k)) for k in ("new", "uses")):
        problems.append("experts must be {new: [sha256...], uses: [sha256...]}")
    routing = manifest.get("routing")
    if not isinstance(routing, dict) or not _is_int(routing.get("top_k"), 1, MAX_TOP_K):
        return problems + [f"routing must hold top_k (an integer in 1..{MAX_TOP_K})"]
    if "scale" in routing and not (_is_number(routing["scale"]) and 0 < routing["scale"] <= MAX_SCALE):
        problems.append(f"routing.scale must be a number in (0, {MAX_SCALE}], got {shown(routing['scale'])}")
    if not all(isinstance(routing.get(t), list) and all(_ids(block) for block in routing[t]) for t in TOWERS):
        problems.append(f"routing must hold, per tower ({', '.join(TOWERS)}), a list of expert-id lists per block")
    return problems


def _selector_problems(manifest: dict) -> list[str]:
    selector = manifest.get("selector")
    if not isinstance(selector, dict):
        return ["selector must be an object with kind, threshold and calibration"]
    if selector.get("kind") not in SELECTOR_KINDS:
        return [f"selector kind {shown(selector.get('kind'))} is unknown; known: {', '.join(sorted(SELECTOR_KINDS))}"]
    if not isinstance(selector.get("config", {}), dict):
        return [f"selector config must be an object (the settings it was fitted with), got {shown(selector['config'])}"]
    threshold = selector.get("threshold")
    if not (_is_number(threshold) and threshold > 0):
        return [f"selector threshold must be a finite number > 0, got {shown(threshold)}"]
    calibration = selector.get("calibration")
    if not isinstance(calibration, dict) or not all(
        _is_number(calibration.get(k)) and calibration[k] >= 0 for k in CALIBRATION_ORDER
    ):
        return [f"selector calibration must hold {', '.join(CALIBRATION_ORDER)} (finite numbers >= 0)"]
    values = [calibration[k] for k in CALIBRATION_ORDER]
    if values != sorted(values):
        return [f"selector calibration must be ordered {' <= '.join(CALIBRATION_ORDER)}, got {values}"]
    # Calibration only ever lowers a threshold below margin x max (negatives tighten it): `neg_p01`, the bundle's
    # own word, raised this ceiling, and a threshold of 1e30 with a neg_p01 of 1e30 passed (a security check).
    ceiling = calibration["max"]
    if threshold > max(THRESHOLD_OVER_MAX * ceiling, THRESHOLD_FLOOR):
        return [
            f"selector threshold {threshold:.4g} is more than {THRESHOLD_OVER_MAX:g}x the largest held-out error of "
            f"the task's own images ({ceiling:.4g}): it would claim images of every other domain"
        ]
    return _gate_problems(selector) if selector["kind"] == "hybrid" else []


def _gate_problems(selector: dict) -> list[str]:
    """A hybrid selector's gate: its threshold in `calibration`, under the same ceiling rule as any selector's."""
    calibration = selector["calibration"]
    gate = calibration.get("gate_threshold")
    if not (_is_number(gate) and gate > 0):
        return [f"selector calibration.gate_threshold must be a finite number > 0, got {shown(gate)}"]
    ceiling = calibration.get("gate_max")
    if not _is_number(ceiling) or ceiling < 0:
        return ["selector calibration must hold gate_max (a finite number >= 0) for a hybrid selector"]
    if gate > max(THRESHOLD_OVER_MAX * ceiling, THRESHOLD_FLOOR):
        return [
            f"selector gate threshold {gate:.4g} is more than {THRESHOLD_OVER_MAX:g}x the largest held-out gate error "
            f"({ceiling:.4g}): the gate would let images of every other domain through"
        ]
    return []


def _moe_problems(manifest: dict) -> list[str]:
    """`moe` (absent in older bundles) must make a valid MoEConfig that agrees with `routing`."""
    moe = manifest.get("moe")
    if moe is None:
        return []
    names = {f.name for f in fields(MoEConfig)}
    required = names - set(OPTIONAL_MOE)
    if not isinstance(moe, dict) or not required <= set(moe) <= names or not all(_is_number(v) for v in moe.values()):
        return [f"moe must hold {', '.join(sorted(required))} and may hold {', '.join(OPTIONAL_MOE)} (finite numbers)"]
    if not (_is_int(moe["rank"], 1, MAX_RANK) and _is_int(moe["top_k"], 1, MAX_TOP_K)):
        return [f"moe.rank must be an integer in 1..{MAX_RANK} and moe.top_k in 1..{MAX_TOP_K}"]
    if not _is_int(moe.get("expert_blocks", 0), 0, MAX_BLOCKS):
        return [f"moe.expert_blocks must be an integer in 0..{MAX_BLOCKS}"]
    try:
        config = MoEConfig(**moe)
    except (TypeError, ValueError) as e:
        return [f"moe: {e}"]
    routing = manifest.get("routing")
    if isinstance(routing, dict) and (routing.get("top_k"), routing.get("scale", config.scale)) != (
        config.top_k,
        config.scale,
    ):
        return ["moe.top_k and moe.scale must equal routing.top_k and routing.scale"]
    return _expert_block_problems(config, routing)


def _expert_block_problems(config: MoEConfig, routing: Any) -> list[str]:
    """Below the top `expert_blocks` blocks of a tower, the routing table lists no expert."""
    if not config.expert_blocks or not isinstance(routing, dict):
        return []
    problems = []
    for tower in TOWERS:
        blocks = routing.get(tower)
        if not isinstance(blocks, list):
            continue
        below = [i for i in range(config.first_block(len(blocks))) if blocks[i]]
        if below:
            problems.append(
                f"routing.{tower} lists experts in blocks {below}, below the top {config.expert_blocks} that "
                "moe.expert_blocks allows"
            )
    return problems


def _interned(ids: Any) -> tuple[str, ...]:
    """Expert ids, one string object per id in the process: a bank of n tasks lists each of its experts in up to
    n routing tables, and 64-character strings parsed anew for each would grow as n squared."""
    return tuple(sys.intern(i) for i in ids)


def manifest_problems(manifest: Any) -> list[str]:
    """Every problem of a parsed manifest (empty when it is valid); no tensor is needed."""
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    checks = (_identity_problems, _labels_problems, _routing_problems, _selector_problems, _moe_problems)
    return [problem for check in checks for problem in check(manifest)]


def finite_metrics(training: Any, keys: tuple[str, ...]) -> dict[str, float]:
    """The named finite numbers of a manifest's `training` section (anything else is left out)."""
    if not isinstance(training, dict):
        return {}
    return {k: float(training[k]) for k in keys if _is_number(training.get(k))}


def index_metrics(training: Any) -> dict[str, float]:
    """What a store's index keeps of a version's training figures; `val_classes`: how many of its classes its
    validation accuracy was measured on (a new version trained on new classes only answers over its parent's too)."""
    # accuracies are shares: one outside 0..1 (a hand-made 1e308 showed as "inf%": an outside check) is not kept
    out = {k: v for k, v in finite_metrics(training, ("val_accuracy", "zero_shot_val_accuracy")).items() if 0 <= v <= 1}
    per = training.get("val_accuracy_per_class") if isinstance(training, dict) else None
    if isinstance(per, dict) and "val_accuracy" in out:
        out["val_classes"] = float(sum(v is not None for v in per.values()))
    trained = finite_metrics(training, ("train_classes",)).get("train_classes")
    if trained is not None and 0 <= trained <= 1e6:  # classes it had training images of (listings warn below all)
        out["train_classes"] = float(trained)
    return out


@dataclass(frozen=True)
class BackboneInfo:
    """Which frozen backbone a bundle was trained on; `fingerprint` (of its weights) is what must match."""

    arch: str
    pretrained: str
    fingerprint: str
    config: str | None = None  # the model config's sha256 (`Backbone.config_id`); absent in bundles before it
    facts: Mapping[str, Any] | None = None  # what `config` hashes (`Backbone.config_facts`); absent before it

    def to_json(self) -> dict[str, Any]:
        """As the manifest holds it: `config` and `config_facts` only when the bundle records them."""
        out: dict[str, Any] = {"arch": self.arch, "pretrained": self.pretrained, "fingerprint": self.fingerprint}
        if self.config is not None:
            out["config"] = self.config
        if self.facts is not None:
            out["config_facts"] = dict(self.facts)
        return out


@dataclass(frozen=True)
class RoutingTable:
    """Per tower and block, the ids of the experts the task's router chooses among (bank experts first)."""

    top_k: int
    blocks: Mapping[str, tuple[tuple[str, ...], ...]]  # tower -> per block expert ids
    scale: float | None = None  # None in bundles made before it was recorded: the bank's

    def expert_ids(self) -> set[str]:
        return {eid for tower in self.blocks.values() for ids in tower for eid in ids}

    def places(self) -> dict[str, tuple[str, int]]:
        """{expert id: (tower, block)} where this task routes to it."""
        return {eid: (tower, i) for tower, blocks in self.blocks.items() for i, ids in enumerate(blocks) for eid in ids}


@dataclass(frozen=True)
class SelectorInfo:
    kind: str
    threshold: float
    calibration: Mapping[str, float]  # CALIBRATION_ORDER of the task's own held-out errors, and neg_* if fitted
    config: Mapping[str, Any]  # the SelectorConfig it was fitted with


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest, typed. Read with `from_json` (every problem in one BundleInvalid), written with
    `to_json`; the JSON layout is the bundle format's (docs/bundle-format.md)."""

    task: str
    version: int
    backbone: BackboneInfo
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    experts_new: tuple[str, ...]
    experts_uses: tuple[str, ...]
    routing: RoutingTable
    selector: SelectorInfo
    content_sha256: str
    moe: MoEConfig | None = None  # None in bundles made before it was saved: the bank's
    created_at: str | None = None
    parent: str | None = None  # the bundle id of the version this one continues (class-incremental)
    training: Mapping[str, Any] = field(default_factory=dict)  # the trainer's report, kept as it was written
    format: int = FORMAT

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        problems = manifest_problems(obj)
        if problems:
            raise BundleInvalid("invalid bundle manifest: " + "; ".join(problems))
        routing, selector = obj["routing"], obj["selector"]
        return cls(
            task=obj["task"],
            version=obj["version"],
            backbone=BackboneInfo(
                **{k: obj["backbone"][k] for k in ("arch", "pretrained", "fingerprint")},
                config=obj["backbone"].get("config"),
                facts=obj["backbone"].get("config_facts"),
            ),
            classes=tuple(obj["classes"]),
            templates=tuple(obj["templates"]),
            experts_new=_interned(obj["experts"]["new"]),
            experts_uses=_interned(obj["experts"]["uses"]),
            routing=RoutingTable(
                routing["top_k"], {t: tuple(_interned(ids) for ids in routing[t]) for t in TOWERS}, routing.get("scale")
            ),
            selector=SelectorInfo(
                selector["kind"], selector["threshold"], dict(selector["calibration"]), dict(selector.get("config", {}))
            ),
            content_sha256=obj["content_sha256"],
            moe=MoEConfig(**obj["moe"]) if obj.get("moe") is not None else None,
            created_at=obj.get("created_at"),
            parent=obj.get("parent"),
            training=obj.get("training") or {},
            format=obj["format"],
        )

    def to_json(self) -> dict[str, Any]:
        routing: dict[str, Any] = {
            "top_k": self.routing.top_k,
            **{t: [list(ids) for ids in b] for t, b in self.routing.blocks.items()},
        }
        if self.routing.scale is not None:
            routing["scale"] = self.routing.scale
        out = {
            "format": self.format,
            "task": self.task,
            "version": self.version,
            "created_at": self.created_at,
            "parent": self.parent,
            "content_sha256": self.content_sha256,
            "backbone": self.backbone.to_json(),
            "classes": list(self.classes),
            "templates": list(self.templates),
            "experts": {"new": list(self.experts_new), "uses": list(self.experts_uses)},
            "routing": routing,
            "selector": {
                **asdict(self.selector),
                "calibration": dict(self.selector.calibration),
                "config": dict(self.selector.config),
            },
            "training": dict(self.training),
        }
        if self.moe is not None:
            out["moe"] = self.moe.to_json()
        return out
