"""Does a bundle fit what serves it: the backbone (its fingerprint first, the cheapest and most telling check),
then tensor shapes, then the bank's experts and MoE settings. Each check raises its typed error, naming every
instance of the problem it found."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from .backbone import TOWERS, Backbone
from .bundle import Bundle, read_manifest
from .bundle_format import PROBES_KEY
from .errors import BackboneMismatch, BundleError, BundleInvalid, MissingExpert, ShapeMismatch
from .experts import MoEConfig
from .labels import shown
from .manifest import BackboneInfo
from .selector import selector_shape_problems

CORE_FACTS = {"visual", "text"}  # each tower's activation and norm: without both in common, the hash decides

MAX_RANK_PER_WIDTH = 4  # an expert wider than the block's MLP (4 x its width in CLIP) is no adapter


def rank_problem(rank: int, backbone: Backbone) -> str | None:
    """Why experts of `rank` would not load on `backbone` (the rank rule of the shape check), or None: so a trainer
    can refuse it before any step."""
    width = min(spec.width for spec in backbone.towers.values())
    if rank > MAX_RANK_PER_WIDTH * width:
        return (
            f"rank {rank} is over {MAX_RANK_PER_WIDTH} x the narrowest tower's width ({width}), so no server would "
            f"load its experts: use a rank of at most {MAX_RANK_PER_WIDTH * width}"
        )
    return None


def _without_folders(name: str) -> str:
    """A backbone name with the folders of any path in it left out: `file:/m/x/w.safetensors` is
    `file:w.safetensors`, `/m/x` is `x`. Such reasons reach the open /healthz, which never shows the server's paths."""
    name = name.rstrip("/")
    return re.sub(r"(?:[^:/]*/)+", "", name) or "?"


def _hashes(backbone: Backbone) -> set[str | None]:
    """The config hashes a bundle without facts may carry for this backbone: today's, or earlier releases'."""
    return {backbone.config_id, *backbone.older_config_ids} - {None}


def check_backbone(info: BackboneInfo, backbone: Backbone) -> None:
    """BackboneMismatch unless `info` (a manifest's backbone) is the served backbone, by weights fingerprint."""
    if info.fingerprint != backbone.fingerprint:
        theirs = backbone.describe()
        # older bundles may carry their trainer's paths
        named = f"{_without_folders(info.arch)}/{_without_folders(info.pretrained)}"
        raise BackboneMismatch(
            f"bundle backbone fingerprint {info.fingerprint[:12]}… ({named}) does not "
            f"match the served backbone {theirs['fingerprint'][:12]}… ({theirs['arch']}/{theirs['pretrained']})"
        )
    # the same weights run under another config: QuickGELU or GELU, masks, pooling, preprocessing
    hint = (
        "e.g. QuickGELU, as `ARCH:openai` runs OpenAI's weights, against GELU, as `ARCH:file:` runs the same file "
        "(`ARCH-quickgelu:file:` runs it as OpenAI's)"
    )
    theirs, ours = info.facts, backbone.config_facts
    shared = theirs.keys() & ours.keys() if theirs is not None and ours is not None else set()
    if CORE_FACTS <= shared:  # the facts both sides know: a release that knows more still reads it
        differ = sorted(k for k in shared if theirs[k] != ours[k])
        if differ:
            said = "; ".join(
                f"{k}: {shown(theirs[k], 60)} in the bundle, {shown(ours[k], 60)} here" for k in differ[:4]
            )
            raise BackboneMismatch(
                f"the bundle's backbone has the served weights but computes otherwise ({said}): {hint}"
            )
    elif info.config is not None and backbone.config_id is not None and info.config not in _hashes(backbone):
        raise BackboneMismatch(
            f"the bundle's backbone has the served weights but computes otherwise (config {info.config[:12]}… "
            f"against {backbone.config_id[:12]}…): {hint}; or the bundle was made by a release that described "
            "configs otherwise (retrain it on this backbone)"
        )


def refuse_other_backbone(data: bytes, backbone: Backbone) -> None:
    """BackboneMismatch, from a bundle's header alone, when its manifest names another backbone.

    The cheapest check of an upload, so it runs before `read_bundle` copies and hashes the tensors. Anything else
    wrong with the header or the manifest is left to `read_bundle`, which reports it as it always has.
    """
    try:
        info = read_manifest(data).backbone
    except BundleError:
        return
    check_backbone(info, backbone)


def refuse_second_backbone(degraded: Mapping[str, str], served: Collection[str], task: str) -> None:
    """BackboneMismatch when the store's other active tasks are all another backbone's (`degraded`: a bank's tasks
    left out, and why; `served`: the tasks it serves): a version of this server's backbone beside them would make
    the store hold two, and every server of it degraded (an outside check's push landed, 201, and `store check`
    called the store consistent). A store that holds two already (a task of this backbone served) is not refused
    here: its tasks' new versions would be, and that helps nobody."""
    if served:  # this backbone's tasks are served there already (the task itself maybe): nothing new mixed in
        return
    prefix = f"{BackboneMismatch.code}:"
    other = sorted(t for t, why in degraded.items() if t != task and why.startswith(prefix))
    if other:
        raise BackboneMismatch(
            f"the store's active tasks {', '.join(shown(t) for t in other[:5])}{' …' if len(other) > 5 else ''} "
            "were trained on another backbone than this server's: this version beside them would leave the store "
            "with two, and no server would serve both. Give each backbone its own store, or deactivate those tasks "
            "first (to move the store to this backbone)"
        )


def check_config(bundle: Bundle, config: MoEConfig) -> None:
    """BundleInvalid unless the bundle's routers were trained for the bank's top-k and expert scale, and its
    experts sit in the same top blocks as the bank's (a bundle made before `expert_blocks` has them in all)."""
    routing = bundle.manifest.routing
    scale = config.scale if routing.scale is None else routing.scale
    if (routing.top_k, scale) != (config.top_k, config.scale):
        raise BundleInvalid(
            f"task {bundle.task!r} was trained with top_k={routing.top_k}, scale={routing.scale}; this "
            f"bank computes top_k={config.top_k}, scale={config.scale}"
        )
    blocks = bundle.manifest.moe.expert_blocks if bundle.manifest.moe is not None else 0
    if blocks != config.expert_blocks:
        raise BundleInvalid(
            f"task {bundle.task!r} has experts in {MoEConfig.blocks_text(blocks)}; this bank's tasks have them in "
            f"{MoEConfig.blocks_text(config.expert_blocks)}. A bank cannot mix the two: train it again with "
            f"--expert-blocks {config.expert_blocks}"
        )


def _shape_problems(bundle: Bundle, backbone: Backbone) -> list[str]:
    problems = []
    for tower in TOWERS:
        spec = backbone.towers[tower]
        if len(bundle.routers[tower]) != spec.layers:
            problems.append(f"{tower}: {len(bundle.routers[tower])} router blocks, backbone has {spec.layers}")
        for i, w in enumerate(bundle.routers[tower]):
            if w.shape[1] != spec.width:
                problems.append(f"router.{tower}.{i} width {w.shape[1]}, backbone width {spec.width}")
    moe = bundle.manifest.moe  # None in bundles made before it was saved
    for eid, placed in bundle.experts.items():
        width, expert = backbone.towers[placed.tower].width, placed.expert
        rank = expert.down_w.shape[0] if expert.down_w.ndim == 2 else -1  # -1: matches no shape, so reported
        want = {"down.weight": (rank, width), "down.bias": (rank,), "up.weight": (width, rank), "up.bias": (width,)}
        got = {k: tuple(v.shape) for k, v in expert.parts().items()}
        if got != want or placed.block >= backbone.towers[placed.tower].layers:
            problems.append(
                f"expert {eid[:12]} at {placed.tower}.{placed.block} has shapes {got}, backbone needs {want}"
            )
        elif rank > MAX_RANK_PER_WIDTH * width or (moe is not None and rank != moe.rank):
            # A batch that mixes tasks pads every expert to the largest rank: one huge expert slowed every request
            problems.append(
                f"expert {eid[:12]} at {placed.tower}.{placed.block} has rank {rank}: a bundle's experts have the rank "
                f"of its moe.rank ({moe.rank if moe is not None else 'not given'}), at most {MAX_RANK_PER_WIDTH} x "
                f"the tower's width {width} (the width of the MLP beside them)"
            )
    problems += selector_shape_problems(bundle.manifest.selector.kind, bundle.selector_tensors, backbone.embed_dim)
    if bundle.probes is not None and bundle.probes.shape[1] != backbone.embed_dim:
        problems.append(f"{PROBES_KEY} width {bundle.probes.shape[1]}, backbone embeddings {backbone.embed_dim}")
    return problems


def check_compatible(
    bundle: Bundle, backbone: Backbone, bank_experts: Mapping[str, tuple[str, int]], config: MoEConfig | None = None
) -> None:
    """Check a bundle against the served backbone, the experts in the bank ({id: (tower, block)}) and, if
    given, the bank's MoE settings. Raises the first kind of problem found, naming every instance of it."""
    check_backbone(bundle.manifest.backbone, backbone)
    problems = _shape_problems(bundle, backbone)
    if problems:
        raise ShapeMismatch("bundle does not fit the backbone: " + "; ".join(problems[:10]))
    missing = [eid[:12] for eid in bundle.uses if eid not in bank_experts]
    if missing:
        raise MissingExpert(f"bundle uses {len(missing)} expert(s) the bank does not hold: {', '.join(missing[:5])}")
    misplaced = [
        f"{eid[:12]} at {tower}.{block}"
        for tower in TOWERS
        for block, ids in enumerate(bundle.manifest.routing.blocks[tower])
        for eid in ids
        if eid not in bundle.experts and tuple(bank_experts[eid]) != (tower, block)
    ]
    if misplaced:
        raise MissingExpert(f"bundle routes to experts the bank holds elsewhere: {', '.join(misplaced[:5])}")
    if config is not None:
        check_config(bundle, config)
