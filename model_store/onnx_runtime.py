"""ONNX export of the frozen towers and the selectors, and an ONNX Runtime implementation of the frozen passes.

Exports are cached on disk by backbone fingerprint (they are large and take seconds to make), written atomically
under a file lock, and checked against PyTorch before first use.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from .backbone import Backbone, DropRecords
from .errors import BackboneError
from .moe_clip import encode_image, encode_text
from .selector import Selector, score
from .settings import cache_root, env_value

log = logging.getLogger(__name__)
# ONNX Runtime keeps a device id and a queue of usage events under the cache folder (the store's volume in the
# image) unless this is set before it is imported: a server has no business writing them. Set it to 0 to opt in.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

PARITY_ATOL = 1e-4  # max abs difference of normalised embeddings accepted between PyTorch and ONNX Runtime
INT8_MIN_COSINE = 0.98  # the int8 image tower: least cosine similarity to PyTorch's embedding accepted per image
INT8_IMAGE = "image.int8.onnx"
EXPORT_FORMAT = 1  # bump when what is exported changes (encode_image / encode_text), so caches are redone
EXPORT_LOCK_SECONDS = 900
_MAX_BATCH = 4096


def default_cache_dir() -> Path:
    """`$CLIPBANK_ONNX_CACHE`, else `$XDG_CACHE_HOME/clipbank/onnx`, else `~/.cache/clipbank/onnx`."""
    return Path(env_value("onnx_cache") or os.path.join(cache_root(), "onnx"))


def _require_ort():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 (torch's ONNX exporter needs it)
    except ImportError as e:
        raise BackboneError(
            f"the ONNX runtime needs onnxruntime and onnxscript: pip install onnxruntime onnxscript ({e})"
        ) from None
    return onnxruntime


class _Exported(torch.nn.Module):
    """`fn(owner, x)` as a module for the exporter; `owner` (the CLIP, or a selector) supplies the weights."""

    def __init__(self, fn: Any, owner: Any) -> None:
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.owner, x)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.onnx (dynamo exporter) with a dynamic batch axis; one self-contained .onnx file."""
    _require_ort()
    n = torch.export.Dim("n", min=1, max=_MAX_BATCH)
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(), (example,), dynamo=True, dynamic_shapes=({0: n},), external_data=False, verbose=False
        )
    program.save(str(path), external_data=False)


def _examples(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    size = backbone.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = backbone.tokenizer(["a photo of a cat.", "a sketch of a dog."])
    return images, tokens


def export_towers(backbone: Backbone, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `image.onnx` and `text.onnx` (the frozen towers, normalised outputs) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = backbone.model.cpu() if backbone.device.type != "cpu" else backbone.model
    images, tokens = _examples(backbone)
    try:
        paths = {"image": out / "image.onnx", "text": out / "text.onnx"}
        _export(_Exported(encode_image, model), images, paths["image"])
        _export(_Exported(encode_text, model), tokens, paths["text"])
    finally:
        backbone.model.to(backbone.device)
    return paths


def export_selector(selector: Selector, path: str | os.PathLike) -> Path:
    """Write a selector's score (error / threshold, [n, D] -> [n]) as an ONNX graph."""
    dim = next(iter(selector.tensors().values())).shape[-1]
    example = torch.nn.functional.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    _export(_Exported(score, selector), example, Path(path))
    return Path(path)


def session(path: str | os.PathLike, threads: int | None = None, device: torch.device | None = None) -> Any:
    """An ONNX Runtime session with as many intra-op threads as torch uses (they never run at once)."""
    ort = _require_ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Its threads must not spin after a run: the adapted pass (PyTorch) needs the same cores right after.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackboneError("frozen_runtime=onnx on cuda needs onnxruntime-gpu (CUDAExecutionProvider)")
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=providers)


def run_session(sess: Any, x: torch.Tensor) -> torch.Tensor:
    out = sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})[0]
    return torch.from_numpy(out)


class OrtFrozen:
    """The frozen passes in ONNX Runtime (`name` "onnx", or "onnx-int8" when the image tower is quantized)."""

    def __init__(self, image_path: Path, text_path: Path, device: torch.device, name: str = "onnx") -> None:
        self.device, self.name = device, name
        self._image = session(image_path, device=device)
        self._text = session(text_path, device=device)

    def image(self, images: torch.Tensor) -> torch.Tensor:
        return run_session(self._image, images).to(self.device)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        return run_session(self._text, tokens).to(self.device)


def parity(backbone: Backbone, runtime: Any, sizes: tuple[int, ...] = (1, 3)) -> dict[str, float]:
    """Max abs difference of image and text embeddings between PyTorch and `runtime`, on fresh random inputs
    (so that an export cannot be made to pass by knowing them) at each batch size in `sizes`."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    size, worst = backbone.image_size, {"image": 0.0, "text": 0.0}
    for n in sizes:
        images = torch.rand(n, 3, size, size, generator=g).to(backbone.device)
        words = torch.randint(0, 10_000, (n,), generator=g).tolist()
        tokens = backbone.tokenizer([f"a photo of a thing number {w}." for w in words]).to(backbone.device)
        with torch.inference_mode():
            ref_i, ref_t = encode_image(backbone.model, images), encode_text(backbone.model, tokens)
        worst["image"] = max(worst["image"], _largest(runtime.image(images) - ref_i))
        worst["text"] = max(worst["text"], _largest(runtime.text(tokens) - ref_t))
    return worst


def _largest(diff: torch.Tensor) -> float:
    """The largest absolute difference; inf for a NaN (max() would skip it, and a NaN export would pass)."""
    return float(diff.abs().nan_to_num(nan=math.inf).max())


def quantize_image_tower(target: Path) -> Path:
    """`target/image.int8.onnx`: the exported image tower with int8 weights (ONNX Runtime dynamic quantization:
    activations are quantized per batch at run time), written atomically beside the float one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = target / INT8_IMAGE
    if not out.is_file():
        tmp = target / f".{INT8_IMAGE}.{os.getpid()}.tmp"
        quiet = DropRecords(("Please consider to run pre-processing",))  # its advice on the root logger, each time
        logging.getLogger().addFilter(quiet)
        try:
            quantize_dynamic(str(target / "image.onnx"), str(tmp), weight_type=QuantType.QInt8)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        finally:
            logging.getLogger().removeFilter(quiet)
            tmp.unlink(missing_ok=True)
    return out


def int8_cosine(backbone: Backbone, runtime: Any, n: int = 4) -> float:
    """The least cosine similarity between `runtime`'s image embeddings and PyTorch's, on fresh random images."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    images = torch.rand(n, 3, backbone.image_size, backbone.image_size, generator=g).to(backbone.device)
    with torch.inference_mode():
        ref = encode_image(backbone.model, images)
    return float(torch.nn.functional.cosine_similarity(runtime.image(images), ref).min())


def _int8_runtime(backbone: Backbone, target: Path, remake: bool = False) -> tuple[OrtFrozen, dict[str, float]]:
    """The int8 image tower (the text tower stays float: its embeddings are cached), checked against PyTorch.
    `remake` (the caller holds the lock): one that cannot be used (a truncated file, say) is quantized again, once."""
    try:
        path = quantize_image_tower(target)
        try:
            runtime = OrtFrozen(path, target / "text.onnx", backbone.device, "onnx-int8")
        except Exception as e:  # ONNX Runtime's own types: a truncated or damaged file, made again once
            if not remake:
                raise
            log.warning(
                "the int8 image tower in %s cannot be loaded (%s: %s); quantizing again", target, type(e).__name__, e
            )
            path.unlink(missing_ok=True)
            runtime = OrtFrozen(quantize_image_tower(target), target / "text.onnx", backbone.device, "onnx-int8")
        cosine = int8_cosine(backbone, runtime)
    except Exception as e:  # ONNX Runtime raises its own types
        raise BackboneError(f"the int8 image tower in {target} cannot be used: {type(e).__name__}: {e}") from e
    if not math.isfinite(cosine) or cosine < INT8_MIN_COSINE:
        raise BackboneError(
            f"the int8 image tower of {backbone.ref.text!r} is too far from PyTorch (cosine {cosine:.4f} < "
            f"{INT8_MIN_COSINE}); use frozen_runtime=onnx"
        )
    return runtime, {"image_min_cosine": round(cosine, 6)}


def _cache_folder(root: Path) -> Path:
    """The cache root, private to this user: exports there are loaded and run."""
    if root.exists() and not root.is_dir():
        raise BackboneError(f"the ONNX cache {root} is a file, not a folder (onnx_cache, CLIPBANK_ONNX_CACHE)")
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:  # a parent that is a file, or no permission
        raise BackboneError(f"the ONNX cache {root} cannot be made: {e.strerror or e}") from None
    if root.stat().st_uid != os.getuid():
        raise BackboneError(f"the ONNX cache {root} belongs to another user; set CLIPBANK_ONNX_CACHE to your own")
    return root


def _export_into(backbone: Backbone, root: Path, target: Path) -> None:
    """Export into a temporary folder of `root` and rename it to `target` (the caller holds the lock)."""
    for stale in root.glob(".tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        export_towers(backbone, tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except Exception as e:  # torch.export raises many types for unsupported models
        raise BackboneError(f"could not export {backbone.ref.text!r} to ONNX: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked_runtime(backbone: Backbone, target: Path) -> tuple[OrtFrozen, dict[str, float]]:
    try:
        runtime = OrtFrozen(target / "image.onnx", target / "text.onnx", backbone.device)
        diffs = parity(backbone, runtime)
    except Exception as e:  # ONNX Runtime raises its own types for unreadable files
        raise BackboneError(f"the ONNX export in {target} cannot be used: {type(e).__name__}: {e}") from e
    if not max(diffs.values()) <= PARITY_ATOL:  # NaN included
        raise BackboneError(f"the ONNX export of {backbone.ref.text!r} differs from PyTorch by {diffs} > {PARITY_ATOL}")
    return runtime, diffs


def _versions() -> str:
    import onnxruntime
    import onnxscript

    parts = (EXPORT_FORMAT, torch.__version__.split("+")[0], onnxscript.__version__, onnxruntime.__version__)
    return "-".join(str(p) for p in parts)


def _locked_runtime(backbone: Backbone, root: Path, target: Path, int8: bool) -> tuple[OrtFrozen, dict[str, float]]:
    """The runtime of the export in `target`, exported first if there is none (the caller holds the lock)."""
    if not (target / "text.onnx").is_file():  # folders are renamed into place whole: this means none
        log.info("exporting the frozen towers of %s to ONNX in %s (once)", backbone.ref.text, target)
        _export_into(backbone, root, target)
    try:
        runtime, diffs = _checked_runtime(backbone, target)
    except BackboneError as e:
        log.warning("%s; exporting again", e)
        _export_into(backbone, root, target)
        runtime, diffs = _checked_runtime(backbone, target)
    if int8:
        runtime, diffs = _int8_runtime(backbone, target, remake=True)
    return runtime, diffs


def with_onnx_runtime(
    backbone: Backbone, cache_dir: str | os.PathLike | None = None, int8: bool = False
) -> tuple[Backbone, dict[str, float]]:
    """`backbone` as a new object whose frozen passes ONNX Runtime runs (the towers exported once per fingerprint
    and versions), and the parity measured. `backbone` itself is not changed. `int8`: the image tower quantized
    to int8 weights (made once beside the export), accepted if within INT8_MIN_COSINE of PyTorch.

    A cached export that cannot be loaded or does not match PyTorch within PARITY_ATOL is exported again, once;
    if that does not match either, BackboneError.
    """
    _require_ort()
    root = _cache_folder(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    config = f"-{backbone.config_id[:8]}" if backbone.config_id else ""  # the same weights under another config
    target = root / f"{backbone.fingerprint[:32]}{config}-{_versions()}"
    lock = FileLock(str(root / ".export.lock"), timeout=EXPORT_LOCK_SECONDS)
    try:
        lock.acquire()
    except Timeout:
        raise BackboneError(f"the ONNX cache {root} stayed locked for {EXPORT_LOCK_SECONDS} s") from None
    except OSError as e:  # a read-only cache (a volume mounted so): the lock is only needed to write an export
        if not (target / "text.onnx").is_file():
            raise BackboneError(
                f"the ONNX cache {root} cannot be written ({type(e).__name__}: {e.strerror or e}) and holds no "
                f"export of {backbone.ref.text!r}"
            ) from None
        log.warning("the ONNX cache %s cannot be locked (%s): its export is used as it is", root, e.strerror or e)
        if int8 and not (target / INT8_IMAGE).is_file():
            raise BackboneError(
                f"the ONNX cache {root} cannot be written and holds no int8 image tower of {backbone.ref.text!r}: "
                "make one with a writable cache, or use frozen_runtime=onnx"
            ) from None
        runtime, diffs = _checked_runtime(backbone, target)
        if int8:
            runtime, diffs = _int8_runtime(backbone, target)
    else:
        try:
            runtime, diffs = _locked_runtime(backbone, root, target, int8)
        finally:
            lock.release()
    log.info("frozen passes served by ONNX Runtime, %s (parity %s)", runtime.name, diffs)
    return backbone.with_frozen(runtime), diffs
