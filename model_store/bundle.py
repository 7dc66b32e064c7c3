"""The bundle: one safetensors file holding a task version's new experts, routers, selector and manifest."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .backbone import TOWERS
from .blocks import one_block
from .bundle_format import MANIFEST_KEY, PROBES_KEY, read_metadata
from .digest import bytes_digest, tensor_digest
from .errors import (
    BundleFormatError,
    BundleInvalid,
    BundleTampered,
)
from .experts import EXPERT_PARTS, Expert, expert_id
from .manifest import FORMAT, Manifest
from .safejson import JSONRefused
from .safejson import loads as bounded_loads

MAX_PROBES = 256  # rows of `probes.embeddings`: a task's held-out frozen embeddings, the negatives of later tasks


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PlacedExpert:
    """An expert with where it sits: tower and block."""

    tower: str
    block: int
    expert: Expert


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: manifest plus tensors, addressed by the sha256 of its bytes."""

    id: str
    manifest: Manifest
    experts: dict[str, PlacedExpert]  # the experts this bundle adds
    routers: dict[str, list[torch.Tensor]]  # tower -> per block [E_visible, d]
    selector_tensors: dict[str, torch.Tensor]
    file_bytes: int  # the length of the bytes it was read from
    probes: torch.Tensor | None = None  # [n <= MAX_PROBES, embed_dim]; bundles before probes have none

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def uses(self) -> tuple[str, ...]:
        return self.manifest.experts_uses


def pack_bundle(
    manifest: dict[str, Any],
    experts: Mapping[str, PlacedExpert],
    routers: Mapping[str, list[torch.Tensor]],
    selector_tensors: Mapping[str, torch.Tensor],
    probes: torch.Tensor | None = None,
) -> bytes:
    """Serialise a bundle. Fills in `experts.new` and `content_sha256`; validates the result by reading it back.

    `probes`: a sample of at most MAX_PROBES of the task's held-out frozen image embeddings, kept so that later
    tasks' selectors learn not to claim this task's images, and tools can measure routing without the data."""
    tensors: dict[str, torch.Tensor] = {}
    for eid, placed in experts.items():
        for part, t in placed.expert.parts().items():
            tensors[f"expert.{placed.tower}.{placed.block}.{eid}.{part}"] = t
    for tower, blocks in routers.items():
        for i, w in enumerate(blocks):
            tensors[f"router.{tower}.{i}"] = w
    for name, t in selector_tensors.items():
        tensors[f"selector.{name}"] = t
    if probes is not None:
        tensors[PROBES_KEY] = probes
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    manifest = {**manifest, "format": FORMAT, "content_sha256": tensor_digest(tensors)}
    manifest["experts"] = {**manifest.get("experts", {}), "new": sorted(experts)}
    data = st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})
    read_bundle(data)
    return data


def _probe_problems(probes: torch.Tensor | None) -> list[str]:
    if probes is None:
        return []
    if probes.ndim != 2 or not 1 <= probes.shape[0] <= MAX_PROBES:
        return [f"{PROBES_KEY} must be [n, embed_dim] with 1 <= n <= {MAX_PROBES}, got {tuple(probes.shape)}"]
    norms = probes.norm(dim=1)  # normalised embeddings: others would overflow the selectors fitted on them
    if not bool(((norms - 1).abs() <= 1e-3).all()):
        return [
            f"{PROBES_KEY} must be normalised embeddings (rows of norm 1), got norms {float(norms.min()):.3g} "
            f"to {float(norms.max()):.3g}"
        ]
    return []


def _block(text: str) -> bool:
    """A block number as written: `router.visual.0000` overwrote (or was overwritten by) `router.visual.0`."""
    return text.isdigit() and text == str(int(text))


def _split_tensors(tensors: dict[str, torch.Tensor], manifest: Manifest) -> tuple[dict, dict, dict, list[str]]:
    problems: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    where: dict[str, tuple[str, int]] = {}
    routers: dict[str, dict[int, torch.Tensor]] = {t: {} for t in TOWERS}
    selector: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "expert":
            tower, block, tail = (rest.split(".", 2) + ["", ""])[:3]
            eid, part = tail[:64], tail[65:]
            if tower not in TOWERS or not _block(block) or part not in EXPERT_PARTS:
                problems.append(f"unexpected tensor {key!r}")
                continue
            parts.setdefault(eid, {})[part] = t
            where[eid] = (tower, int(block))
        elif kind == "router" and rest.partition(".")[0] in TOWERS and _block(rest.partition(".")[2]):
            routers[rest.partition(".")[0]][int(rest.partition(".")[2])] = t
        elif kind == "selector":
            selector[rest] = t
        elif key == PROBES_KEY:
            pass  # read by read_bundle
        else:
            problems.append(f"unexpected tensor {key!r}")
    new = set(manifest.experts_new)
    if set(parts) != new:
        problems.append(
            f"expert tensors {sorted(set(parts) - new)[:3]} / manifest ids {sorted(new - set(parts))[:3]} do not agree"
        )
    for eid, p in parts.items():
        if set(p) != set(EXPERT_PARTS):
            problems.append(f"expert {eid[:12]} has parts {sorted(p)}, needs {list(EXPERT_PARTS)}")
    for tower in TOWERS:
        blocks = manifest.routing.blocks[tower]
        if sorted(routers[tower]) != list(range(len(blocks))):
            have = sorted(routers[tower])
            problems.append(f"{tower} routers cover blocks {have}, routing lists {len(blocks)} blocks")
            continue
        for i, ids in enumerate(blocks):
            if routers[tower][i].ndim != 2 or routers[tower][i].shape[0] != len(ids):
                problems.append(
                    f"router.{tower}.{i} has shape {tuple(routers[tower][i].shape)}, routing lists {len(ids)} experts"
                )
            for eid in ids:
                if eid in where and where[eid] != (tower, i):
                    problems.append(f"expert {eid[:12]} is stored at {where[eid]} but routed at ({tower}, {i})")
                elif eid not in new and eid not in manifest.experts_uses:
                    problems.append(f"routing names expert {eid[:12]} that is neither new nor in uses")
    experts = {
        eid: PlacedExpert(*where[eid], Expert.from_parts(p)) for eid, p in parts.items() if set(p) == set(EXPERT_PARTS)
    }
    return experts, {t: [routers[t][i] for i in sorted(routers[t])] for t in TOWERS}, selector, problems


def read_manifest(data: bytes) -> Manifest:
    """A bundle's manifest, from its header alone (no tensor is read). Raises a typed BundleError."""
    meta = read_metadata(data)  # tensor names and dtypes checked here, before any tensor is read
    try:
        return Manifest.from_json(bounded_loads(meta[MANIFEST_KEY]))  # every problem named at once
    except JSONRefused as e:
        raise BundleInvalid(f"the manifest is not JSON within bounds: {e}") from None


def read_bundle(data: bytes) -> Bundle:
    """Parse and validate a bundle's bytes on their own (no backbone needed). Raises a typed BundleError."""
    if isinstance(data, str | os.PathLike):
        raise TypeError(
            f"read_bundle takes a bundle's bytes, not a path: read_bundle(Path({str(data)!r}).read_bytes())"[:200]
        )
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    manifest = read_manifest(data)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt payloads
        raise BundleFormatError(f"safetensors payload is corrupt: {e}") from None
    bad = [k for k, t in tensors.items() if t.dtype != torch.float32 or not bool(torch.isfinite(t).all())]
    if bad:
        raise BundleInvalid(f"tensors must be finite float32; these are not: {', '.join(sorted(bad)[:5])}")
    tensors = one_block(tensors)  # float32, checked above: one page-aligned block per bundle
    experts, routers, selector, problems = _split_tensors(tensors, manifest)
    probes = tensors.get(PROBES_KEY)
    problems += _probe_problems(probes)
    if problems:
        raise BundleInvalid("invalid bundle tensors: " + "; ".join(problems[:10]))
    if tensor_digest(tensors) != manifest.content_sha256:
        bad = [eid[:12] for eid, p in experts.items() if expert_id(p.expert.parts()) != eid]
        raise BundleTampered(
            "bundle tensors do not match their recorded digest"
            + (f"; experts whose content changed: {', '.join(bad)}" if bad else "")
        )
    bad = [eid[:12] for eid, p in experts.items() if expert_id(p.expert.parts()) != eid]
    if bad:
        raise BundleTampered(f"experts whose tensors do not hash to their ids: {', '.join(bad)}")
    return Bundle(bytes_digest(data), manifest, experts, routers, selector, len(data), probes)


def tensor_bytes(bundle: Bundle) -> int:
    """Bytes of all tensors in a bundle (the file adds a small JSON header)."""
    parts = [t for p in bundle.experts.values() for t in p.expert.parts().values()]
    parts += [w for ws in bundle.routers.values() for w in ws] + list(bundle.selector_tensors.values())
    parts += [bundle.probes] if bundle.probes is not None else []
    return sum(t.numel() * t.element_size() for t in parts)


def expected_tensor_bytes(
    towers: Mapping[str, tuple[int, int]],
    embed_dim: int,
    rank: int = 64,
    n_new: int = 2,
    existing_per_block: int = 0,
    bottleneck: int = 32,
    probes: int = 0,
    gate_hidden: int = 0,
) -> int:
    """Float32 bytes of a task bundle with an autoencoder selector (and, with `gate_hidden` > 0, a hybrid's gate of
    that width) and `probes` probe rows, for towers {name: (width, layers)}."""
    floats = 0
    for width, layers in towers.values():
        expert = 2 * rank * width + rank + width
        floats += layers * (n_new * expert + (existing_per_block + n_new) * width)
    floats += 2 * embed_dim * bottleneck + bottleneck + embed_dim + probes * embed_dim
    floats += (gate_hidden * embed_dim + 2 * gate_hidden + 1) if gate_hidden else 0
    return 4 * floats
