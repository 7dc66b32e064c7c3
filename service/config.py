"""Server settings: one validated dataclass, filled from defaults, `CLIPBANK_*` environment variables and flags."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model_store.backbone_ref import parse_backbone_ref
from model_store.errors import BackboneError
from model_store.pixels import MAX_ASPECT_RATIO, MAX_PIXELS
from model_store.settings import ENV_PREFIX, env_value, field_type_problems, option

from .insights import ReservoirConfig
from .token_files import SENDABLE_TOKEN, token_variable

MB = 1024 * 1024
# auto: onnx on CPU (measured faster there), torch on GPU; onnx-int8: the image tower with int8 weights, opt-in
FROZEN_RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
AUTOCAST_MODES = ("off", "fp16", "bf16")  # model_store.backbone.AUTOCAST_DTYPES
INVALID = "invalid server settings: "
ENGINES = ("uvicorn", "ray")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
LOG_FORMATS = ("text", "json")
MAX_UNCLAIMED = 20_000  # 40 MB of float32 embeddings at ViT-B's 512 dimensions; clustering stays in seconds


class SettingsError(ValueError):
    """Every problem of a server's settings, in one message."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(INVALID + "; ".join(problems))
        self.problems = problems


MAX_BATCH = 4096  # images in one pass: far past where batching pays on any device, and a bound on memory
MAX_QUEUE_IMAGES = 1_000_000


def _store_path_problems(store: str) -> list[str]:
    """A local store path that cannot be a folder, said before anything loads (it was said after the backbone
    loaded and an admin token was made "in" it)."""
    if store.startswith("s3://") and not store.removeprefix("s3://").partition("/")[0]:
        return [f"store {store!r}: an S3 store is s3://bucket or s3://bucket/prefix"]
    if store.startswith("s3://") or "://" in store:
        return []
    if not store.strip():
        return [f"store must name a folder, got {store!r}"]
    path = Path(store)
    try:
        if path.is_symlink() and not path.exists():
            return [f"store {store} is a symbolic link to {os.readlink(path)!r}, which does not exist"]
        if path.exists() and not path.is_dir():
            return [f"store {store} is a file, not a folder"]
        above = next((p for p in path.absolute().parents if p.exists()), None)
    except OSError:  # a folder this user may not look into: the store itself says what it cannot do
        return []
    if above is not None and not above.is_dir():
        return [f"store {store}: {above} is a file, not a folder"]
    return []


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may carry; each exceeded limit is a 4xx naming it."""

    max_upload_bytes: int = 256 * MB  # POST /tasks body
    max_request_bytes: int = 64 * MB  # POST /classify body
    max_buffered_bytes: int = 1024 * MB  # request bodies held at once over all connections; beyond: 503, retry
    max_client_buffered_bytes: int = 512 * MB  # of those, one client address's (IPv6: its /64); 0: no cap
    max_image_bytes: int = 16 * MB  # one encoded image
    max_images: int = 64  # images per request
    max_pixels: int = MAX_PIXELS  # width * height, read from the header before decoding
    max_aspect_ratio: int = MAX_ASPECT_RATIO  # long side / short side: a 1xN image is resized to SxSN before the crop
    max_request_pixels: int = 128_000_000  # pixels all of a request's images decode to (64 images of 2 MP)
    max_jpeg_scans: int = 100  # a progressive JPEG is decoded once per scan; encoders write about 10
    max_image_segments: int = 1000  # metadata records Pillow parses in Python (JPEG segments, PNG chunks, GIF blocks)
    max_labels: int = 1000
    max_label_chars: int = 200
    max_request_prompts: int = 16384  # new text prompts one request may need (labels x templates x routed tasks)
    max_response_bytes: int = 16 * MB  # the answer's labels, at most: images x (labels or top_k) x their JSON bytes

    def problems(self) -> list[str]:
        if typed := field_type_problems(self):  # before the ranges, which compare
            return typed
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        least = {"max_client_buffered_bytes": 0}  # 0: no cap per client (behind a proxy every client is one)
        problems = [f"{n} must be >= {least.get(n, 1)}, got {v}" for n, v in values.items() if v < least.get(n, 1)]
        if self.max_buffered_bytes < max(self.max_upload_bytes, self.max_request_bytes):
            problems.append(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must hold one largest body: at least "
                f"max_upload_bytes ({self.max_upload_bytes}) and max_request_bytes ({self.max_request_bytes})"
            )
        return problems

    @property
    def client_buffered_bytes(self) -> int:
        """max_client_buffered_bytes as enforced: 0 (no cap), else never below one largest body."""
        if not self.max_client_buffered_bytes:
            return 0
        return max(self.max_client_buffered_bytes, self.max_upload_bytes, self.max_request_bytes)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `clipbank serve` needs. Invalid settings fail at construction with one error listing them all."""

    store: str = option("./clipbank-store", "store folder, or s3://bucket/prefix (docs/store.md)")
    backbone: str = option("tiny", "backbone: tiny, an open_clip ARCH:PRETRAINED, or ARCH:file:/path/to/weights")
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "port")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    max_batch: int = option(64, "images per forward pass (a request is never split, so max_images <= max_batch)")
    max_wait_ms: float = option(5.0, "how long the first request of a batch waits for company")
    admin_token: str | None = None  # None: generate one at start and print it once (never a flag: ps shows flags)
    classify_token: str | None = None  # None: /classify is open
    poll_seconds: float = option(2.0, "how often to look for changes made to the store by other servers")
    text_cache_size: int = option(4096, "entries of the label-embedding cache")
    text_cache_mb: int = option(256, "megabytes of the label-embedding cache")
    max_queue_images: int = option(1024, "images accepted and not yet answered; more gets a 503 overloaded")
    threads: int = option(
        0,
        "threads of each forward pass (PyTorch and ONNX Runtime); 0: one for a narrow backbone (tiny), "
        "else PyTorch's default capped by the CPUs this process may use (affinity and cgroup quota)",
    )
    log_level: str = option("info", "log level of the server's lines and clipbank's own", LOG_LEVELS)
    log_format: str = option("text", "log lines: text, or json (one object per line, for log shippers)", LOG_FORMATS)
    head_timeout_seconds: float = option(10.0, "a connection must deliver a whole request head within this")
    read_timeout_seconds: float = option(
        30.0, "the longest gap while a request body streams in, or while a client reads none of its answer"
    )
    keep_alive_seconds: float = option(5.0, "an idle kept-alive connection is closed after this")
    max_connections: int = option(1024, "open connections; beyond it a new one gets 503 and is closed")
    max_connections_per_client: int = option(
        256, "open connections from one client address; beyond it a new one gets 503 and is closed (0: no cap)"
    )
    min_body_rate: int = option(
        1000,
        "the time a request body keeps the server waiting may pass read_timeout_seconds by a second per this many "
        "bytes received, at most twice read_timeout_seconds saved up; longer gets 408 (0: no floor)",
    )
    frozen_runtime: str = option(
        "auto",
        "who runs the frozen passes: auto is ONNX Runtime on CPU, PyTorch on GPU (the adapted pass is always torch); "
        "onnx-int8 quantizes the frozen image tower to int8 weights (CPU)",
        FROZEN_RUNTIMES,
    )
    onnx_cache: str = option("", "where ONNX exports are kept (default $XDG_CACHE_HOME/clipbank/onnx)")
    autocast: str = option(
        "off",
        "mixed precision of the PyTorch passes, frozen and adapted (torch.autocast; meant for CUDA, where it is "
        "unmeasured here): off, fp16 or bf16",
        AUTOCAST_MODES,
    )
    gate_max_stolen: float = option(
        0.02, "interference gate: the largest share of any task's probes a new version may take"
    )
    gate_max_zero_shot: float = option(
        0.05, "interference gate: the largest share of the backbone's reference set a new version may claim"
    )
    unclaimed_capacity: int = option(
        2048, "unclaimed-traffic monitor: frozen embeddings of unclaimed images kept (0 turns it off, at most 20000)"
    )
    unclaimed_retention_seconds: float = option(86400.0, "unclaimed-traffic monitor: how long an embedding is kept")
    unclaimed_bin_seconds: float = option(60.0, "unclaimed-traffic monitor: time resolution of traffic shares")
    unclaimed_thumbnails: int = option(
        0,
        "unclaimed-traffic monitor: also keep a thumbnail of each unclaimed image, this many pixels a side (16-128;"
        " 0: embeddings only). Opt-in: these are users' images, kept in memory for the retention, shown to admins",
    )
    engine: str = option(
        "uvicorn", "uvicorn: one process; ray: replicas on Ray Serve (the [scale] extra; docs/scale-out.md)", ENGINES
    )
    replicas: int = option(2, "replicas of the app with --engine ray")
    ray_address: str = option("", "Ray cluster to join with --engine ray, e.g. HEAD:6379 (default: start one here)")
    broadcast: bool = option(True, "tell the other Ray Serve replicas of a change at once (else they poll for it)")
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        # before the ranges, which compare (port="8000" failed in one)
        if problems := field_type_problems(self) + field_type_problems(self.limits):
            raise SettingsError(problems)
        object.__setattr__(self, "store", os.path.expanduser(self.store))  # CLIPBANK_STORE=~/x made a folder "~"
        for name in ("log_level", "log_format", "device", "autocast", "frozen_runtime", "engine"):  # INFO was refused
            object.__setattr__(self, name, getattr(self, name).strip().lower())
        problems = list(self.limits.problems()) + self._monitor_problems() + self._engine_problems()
        if not 0 < self.port < 65536:
            problems.append(f"port must be in 1..65535, got {self.port}")
        if "://" in self.store and not self.store.startswith("s3://"):  # before a token is saved "in" it
            problems.append(f"store must be a local folder or s3://bucket/prefix, got {self.store!r}")
        problems += _store_path_problems(self.store)
        try:  # a malformed reference, said before torch loads (it was said after, seconds later)
            parse_backbone_ref(self.backbone)
        except BackboneError as e:
            problems.append(str(e))
        if self.max_queue_images > MAX_QUEUE_IMAGES:
            problems.append(f"max_queue_images must be at most {MAX_QUEUE_IMAGES}, got {self.max_queue_images}")
        if not 1 <= self.max_batch <= MAX_BATCH:
            problems.append(f"max_batch must be in 1..{MAX_BATCH}, got {self.max_batch}")
        elif self.limits.max_images > self.max_batch:
            problems.append(
                f"max_images ({self.limits.max_images}) must be <= max_batch "
                f"({self.max_batch}), since a request is never split"
            )
        if not 0 <= self.threads <= 1024:
            problems.append(
                f"threads must be in 0..1024 (0: chosen from the backbone and the usable CPUs), got {self.threads}"
            )
        if self.max_queue_images < self.max_batch:
            problems.append(f"max_queue_images ({self.max_queue_images}) must be >= max_batch ({self.max_batch})")
        if not 0 <= self.max_wait_ms <= 10_000:
            problems.append(f"max_wait_ms must be in 0..10000, got {self.max_wait_ms}")
        if not 0.1 <= self.poll_seconds <= 3600:
            problems.append(f"poll_seconds must be in 0.1..3600, got {self.poll_seconds}")
        for name in ("head_timeout_seconds", "read_timeout_seconds", "keep_alive_seconds"):
            if not 0.1 <= getattr(self, name) <= 3600:
                problems.append(f"{name} must be in 0.1..3600, got {getattr(self, name)}")
        if self.keep_alive_seconds >= self.head_timeout_seconds:
            problems.append(
                f"keep_alive_seconds ({self.keep_alive_seconds}) must be below head_timeout_seconds "
                f"({self.head_timeout_seconds}): an idle kept-alive connection would otherwise get a 408"
            )
        if self.max_connections < 1:
            problems.append(f"max_connections must be >= 1, got {self.max_connections}")
        for name in ("max_connections_per_client", "min_body_rate"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")
        if self.text_cache_size < 0 or self.text_cache_mb < 0:
            problems.append(
                f"text_cache_size and text_cache_mb must be >= 0, got {self.text_cache_size}, {self.text_cache_mb}"
            )
        for name in ("gate_max_stolen", "gate_max_zero_shot"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in 0..1, got {getattr(self, name)}")
        problems += self._token_problems() + self._word_problems()
        if problems:
            raise SettingsError(problems)

    def _word_problems(self) -> list[str]:
        """Settings that are one of a few words (taken in any case: `CLIPBANK_LOG_LEVEL=INFO` was refused)."""
        problems = [
            f"{name} must be one of {', '.join(words)}, got {getattr(self, name)!r}"
            for name, words in (
                ("autocast", AUTOCAST_MODES),
                ("frozen_runtime", FROZEN_RUNTIMES),
                ("log_level", LOG_LEVELS),
                ("log_format", LOG_FORMATS),
            )
            if getattr(self, name) not in words
        ]
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return problems

    def _token_problems(self) -> list[str]:
        problems = []
        for name in ("admin_token", "classify_token"):
            token = getattr(self, name)
            if token is not None and len(token) < 16:
                problems.append(f"{name} must be at least 16 characters when set")
            elif token is not None and not SENDABLE_TOKEN.fullmatch(token):  # not shown: it is a secret
                problems.append(f"{name} must be printable ASCII without spaces (no HTTP client could send it)")
        if self.classify_token is not None and self.classify_token == self.admin_token:  # an outside check
            problems.append(
                "classify_token must differ from admin_token: every classify client would have admin rights"
            )
        return problems

    def _engine_problems(self) -> list[str]:
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 1 <= self.replicas <= 256:
            problems.append(f"replicas must be in 1..256, got {self.replicas}")
        shared = self.engine == "ray" or self.store.startswith("s3://")
        if shared and not self.admin_token:
            problems.append(
                "an s3:// store or --engine ray needs CLIPBANK_ADMIN_TOKEN: a generated token could not be shared"
            )
        return problems

    def _monitor_problems(self) -> list[str]:
        problems = []
        if not 0 <= self.unclaimed_capacity <= MAX_UNCLAIMED:
            problems.append(f"unclaimed_capacity must be in 0..{MAX_UNCLAIMED}, got {self.unclaimed_capacity}")
        if not 1 <= self.unclaimed_bin_seconds <= self.unclaimed_retention_seconds <= 90 * 86400:
            problems.append(
                "unclaimed_bin_seconds and unclaimed_retention_seconds must satisfy 1 <= bin <= retention <= 90 days,"
                f" got {self.unclaimed_bin_seconds}, {self.unclaimed_retention_seconds}"
            )
        if not problems:  # the monitor's own checks, before start-up rather than after the backbone loaded
            try:
                ReservoirConfig(
                    self.unclaimed_capacity,
                    self.unclaimed_retention_seconds,
                    self.unclaimed_bin_seconds,
                    self.unclaimed_thumbnails,
                )
            except ValueError as e:
                problems.append(f"unclaimed monitor: {e}")
        return problems

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServeConfig:
        """Defaults, then `CLIPBANK_<NAME>` variables, then `overrides` that are not None.

        Raises one ValueError naming every problem: variables that do not parse and settings out of range.
        """
        values: dict[str, Any] = {}
        limit_values: dict[str, Any] = {}
        problems: list[str] = []
        for target, klass in ((values, cls), (limit_values, Limits)):
            for f in fields(klass):
                if f.name == "limits" or overrides.get(f.name) is not None:  # a flag wins, even over a bad value
                    continue
                # a token set empty (`CLIPBANK_CLASSIFY_TOKEN=` in .env) is no unset one: it left /classify open
                token = f.name.endswith("_token")
                mapping = os.environ if env is None else env
                raw = token_variable(f.name, mapping, problems) if token else env_value(f.name, env)
                if raw is not None and token:  # a file's newline: the client strips it too
                    if not (raw := raw.strip()):  # blank is no token: refused, not taken as unset (an open API)
                        problems.append(f"{ENV_PREFIX}{f.name.upper()} is set but blank: unset it, or set a token")
                        continue
                if raw is None:
                    continue
                try:
                    target[f.name] = _parse(f.name, raw, klass.__dataclass_fields__[f.name].default)
                except ValueError as e:
                    problems.append(str(e))
        for name, value in overrides.items():
            if value is None:
                continue
            (limit_values if name in Limits.__dataclass_fields__ else values)[name] = value
        try:
            config = cls(**values, limits=Limits(**limit_values))
        except SettingsError as e:
            problems += e.problems
        if problems:
            from_env = {n for n in (*values, *limit_values) if overrides.get(n) is None}
            raise ValueError(INVALID + "; ".join(_with_source(p, overrides, from_env) for p in problems))
        return config


def _with_source(problem: str, overrides: Mapping[str, Any], from_env: set[str]) -> str:
    """`problem`, naming where the settings it names came from (the setting it starts with, and any other with an
    underscore in its name: `max_images ... max_batch`): the flag, or the variable, that gave each; a default
    is not named (the message named the fields alone)."""
    words = re.findall(r"[a-z][a-z0-9_]*", problem)
    named = [w for i, w in enumerate(words) if (i == 0 or "_" in w) and w in SETTING_NAMES]
    sources = [
        f"--{n.replace('_', '-')}" if overrides.get(n) is not None else f"{ENV_PREFIX}{n.upper()}"
        for n in dict.fromkeys(named)
        if overrides.get(n) is not None or n in from_env
    ]
    return f"{problem} (from {', '.join(sources)})" if sources else problem


SETTING_NAMES = frozenset(f.name for k in (ServeConfig, Limits) for f in fields(k)) - {"limits"}

# CLIPBANK_ variables other commands and tools read (the client's URL, caches, the S3 store, the container tests,
# the suite's OpenAPI fuzzing)
OTHER_VARIABLES = (
    "URL", "TIMEOUT", "ONNX_CACHE", "REFERENCE_CACHE", "S3_ENDPOINT_URL", "S3_CACHE_DIR",
    "CONTAINER_TESTS", "SMOKE_ARGS", "SMOKE_ENV_FILE", "SMOKE_IMAGE", "FUZZ_EXAMPLES",
)  # fmt: skip


TOKEN_FILES = ("ADMIN_TOKEN", "CLASSIFY_TOKEN")  # each may be read from a file: CLIPBANK_<NAME>_FILE


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """`CLIPBANK_` variables no setting reads, each with the nearest known name: a misspelt one was ignored
    without a word (`CLIPBANK_MAX_IMAGE` for `CLIPBANK_MAX_IMAGES`; an outside check's `CLIPBANK_UNUSED_THING`)."""
    import difflib

    known = {ENV_PREFIX + f.name.upper() for k in (ServeConfig, Limits) for f in fields(k) if f.name != "limits"}
    known |= {ENV_PREFIX + name for name in OTHER_VARIABLES} | {ENV_PREFIX + n + "_FILE" for n in TOKEN_FILES}
    found = []
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known):
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        found.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return found


def _parse(name: str, raw: str, default: Any) -> Any:
    kind = type(default) if default is not None else str
    if kind is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw[:40]!r} is not a valid bool (true or false)")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw[:40]!r} is not a valid {kind.__name__}") from None
