"""What callers send and get back: pydantic models, which also make the OpenAPI document."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from model_store.modes import AUTO, PER_IMAGE, PER_REQUEST
from model_store.safejson import MAX_INT_DIGITS

EXAMPLE_BUNDLE_ID = "3fa2c1d0" + "0" * 56

TaskMode = str  # AUTO | ZERO_SHOT | a task name
RouteMode = Literal[PER_IMAGE, PER_REQUEST]  # model_store.modes.ROUTE_MODES


class ClassifyOptions(BaseModel):
    """The fields of a classify request besides the images."""

    model_config = ConfigDict(extra="forbid")

    labels: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Distinct candidate labels. Empty: each image's task's own classes; an image no task claims "
        "then gets an empty list (and task=zero-shot without labels is a 422).",
        examples=[["cat", "dog", "bird"]],
        json_schema_extra={"uniqueItems": True},
    )
    task: TaskMode = Field(
        AUTO,
        min_length=1,
        max_length=64,
        description="`auto` (selector decides per image), `zero-shot`, or a task name.",
    )
    route: RouteMode = Field(PER_IMAGE, description="`per-request` averages selector scores over the images.")
    top_k: int | None = Field(None, ge=1, description="Return only the best k labels per image.")
    match_labels: bool = Field(
        True,
        description="With labels and task=auto: only tasks whose classes include at least one of the labels may "
        "claim an image (case, spacing and _ ignored); images no such task claims go to zero-shot CLIP. A task "
        "that knows only some of the labels gives the others only the share both it and zero-shot CLIP give them. "
        "false: the selector alone decides, whatever the labels, and a task scores every label alone.",
    )

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_digits(cls, value: Any) -> Any:
        """A form field's top_k is digits: "1_0" was read as 10, " +1 " as 1 (an outside check)."""
        if isinstance(value, str) and value.strip()[:1] == "-" and value.strip()[1:].isdigit():  # was "not digits"
            raise ValueError(f"top_k must be >= 1, got {value[:20]!r}")
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError(f"top_k is a whole number written in digits, got {value[:20]!r}")
        if isinstance(value, str) and len(value) > MAX_INT_DIGITS:  # 2147483647 ("all") was refused: not digits
            raise ValueError(f"top_k has at most {MAX_INT_DIGITS} digits (as in a JSON body), got {len(value)}")
        return value


class ClassifyJSON(ClassifyOptions):
    """The JSON form of `POST /classify`: images as base64 strings (data URLs are accepted)."""

    images: list[Annotated[str, Field(json_schema_extra={"contentEncoding": "base64"})]] = Field(
        ..., min_length=1, description="Base64-encoded image files (PNG, JPEG, ...), or data URLs."
    )
    # JSON has types: `true` is no count and "false" no boolean (form fields are text, so the form's are lax)
    top_k: StrictInt | None = Field(None, ge=1, description=ClassifyOptions.model_fields["top_k"].description)
    match_labels: StrictBool = Field(True, description=ClassifyOptions.model_fields["match_labels"].description)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": ["iVBORw0KGgo..."], "labels": ["cat", "dog"], "task": "auto"}]},
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """An option sent as null is its default: Jackson and other JSON writers send unset fields as null, and
        `"labels": null` was a 422 (an outside check's Java client)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in ClassifyOptions.model_fields)}
        return data


class LabelScore(BaseModel):
    label: str
    score: float | None = Field(
        ...,
        description="Softmax probability over the candidates; all candidates sum to 1. Null only if it was not a "
        "finite number (an upload's trial run refuses weights that overflow on its trial image).",
    )


class RouteInfo(BaseModel):
    task: str | None = Field(..., description="The task whose experts classified the image; null: zero-shot CLIP.")
    version: int | None = Field(..., description="The task's version that answered; null: zero-shot CLIP.")
    bundle_id: str | None = Field(..., description="That version's bundle; null: zero-shot CLIP.")
    score: float | None = Field(..., description="Selector score (error / threshold); at most 1 claims the image.")
    threshold: float | None = Field(..., description="The routed task's selector threshold; null: zero-shot CLIP.")


class ImageResultOut(BaseModel):
    labels: list[LabelScore]
    route: RouteInfo


class Timing(BaseModel):
    decode_ms: float = Field(..., description="Reading and preprocessing the images.")
    queue_ms: float = Field(..., description="Waiting for a batch to start.")
    compute_ms: float = Field(..., description="The batch's forward passes.")
    total_ms: float
    batch_images: int = Field(..., description="Images in the batch this request ran in.")
    batch_requests: int
    generation: int = Field(..., description="Store generation of the bank that answered.")


class ClassifyResponse(BaseModel):
    results: list[ImageResultOut] = Field(..., description="One per image, in the order sent.")
    timing: Timing

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "labels": [{"label": "dots", "score": 0.91}, {"label": "stripes", "score": 0.09}],
                            "route": {
                                "task": "textures",
                                "version": 2,
                                "bundle_id": EXAMPLE_BUNDLE_ID,
                                "score": 0.41,
                                "threshold": 0.0123,
                            },
                        },
                        {
                            "labels": [{"label": "cat", "score": 0.7}, {"label": "dog", "score": 0.3}],
                            "route": {
                                "task": None,
                                "version": None,
                                "bundle_id": None,
                                "score": None,
                                "threshold": None,
                            },
                        },
                    ],
                    "timing": {
                        "decode_ms": 1.2,
                        "queue_ms": 3.1,
                        "compute_ms": 8.4,
                        "total_ms": 13.0,
                        "batch_images": 6,
                        "batch_requests": 3,
                        "generation": 7,
                    },
                }
            ]
        }
    )


UploadMode = Literal["active", "inactive", "shadow"]


class TaskUploaded(BaseModel):
    task: str
    version: int
    bundle_id: str
    experts_added: int
    generation: int
    gate: dict[str, Any] | None = Field(
        None, description="The interference gate's report: self_claim, stolen per task, zero_shot_captured, limits."
    )
    replicas: dict[str, int | str] | None = Field(
        None, description="{replica: the generation it serves}: with wait=all every live replica, else this one."
    )
    state: Literal["active", "shadow", "inactive"] | None = Field(
        None,
        description="where the version is now: active (serving), shadow (scored beside the active one) or inactive "
        "(stored only); a restored version keeps its state",
    )
    restored: bool = Field(
        False,
        description="true (status 200): these are the bytes of a stored version whose blob was missing or damaged, "
        "written back; the version keeps its state, and the tasks using its experts serve again",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what this version costs the classes of the task's version it replaces (or would: inactive, "
        "shadow): classes it lacks, classes it saw no training image of, a validation accuracy well under the "
        "old one's. The interference gate measures other tasks and passes such a version.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "textures",
                    "version": 1,
                    "bundle_id": EXAMPLE_BUNDLE_ID,
                    "experts_added": 16,
                    "generation": 3,
                    "state": "active",
                }
            ]
        }
    )


class VersionInfo(BaseModel):
    version: int
    bundle_id: str
    created_at: str | None = None
    stored_at: str | None = None
    bytes: int
    experts_added: int
    classes: list[str] | None = Field(None, description="null for versions stored before classes were indexed")
    metrics: dict[str, Any] = Field(default_factory=dict)
    gate: dict[str, Any] | None = Field(None, description="The interference gate's report when it was uploaded.")


class TaskInfo(BaseModel):
    task: str
    active_version: int | None = Field(..., description="null: stored but not routed to.")
    serving: bool = Field(..., description="Whether this server's current bank routes to the active version.")
    serving_version: int | None = Field(
        None, description="The version this server routes to (differs from active_version until its next poll)."
    )
    degraded: str | None = Field(None, description="Why the active version cannot be served (a damaged blob...).")
    classes: list[str] = Field(default_factory=list, description="Classes of the active version.")
    versions: list[VersionInfo]
    bytes: int = Field(..., description="Tensor bytes of the active version in memory (0 if inactive).")
    shadow_version: int | None = Field(None, description="The version scoring live traffic in shadow, if any.")
    shadow_degraded: str | None = Field(
        None, description="Why this server does not score the version in shadow (a damaged blob...); null: it does."
    )
    replicas: dict[str, int | str] | None = Field(
        None, description="After a change: {replica: the generation it serves}; with wait=all every live replica."
    )
    generation: int | None = Field(
        None,
        description="The store generation this entry was read at (after a change: the one this server serves it "
        "with), for X-Min-Generation: read what you saw, or your own writes, on any replica.",
    )
    gate: dict[str, Any] | None = Field(
        None,
        description="After an activation, or a version put in shadow: the interference gate's report on it, against "
        "the bank it joined or would join (null when the version was active, or in shadow, already: nothing ran). "
        "Forced past the gate, or in shadow: its offences are listed here.",
    )
    warnings: list[str] | None = Field(
        None, description="After an activation: what it costs the classes of the version it replaced (as an upload's)."
    )


class ScoreHistogram(BaseModel):
    le: list[float | str] = Field(..., description="bucket upper bounds of the selector score (error / threshold)")
    counts: list[int]


class ShadowInfo(BaseModel):
    task: str
    version: int
    bundle_id: str
    since: str = Field(..., description="when this server began scoring it")
    images: int = Field(..., description="images with task=auto it scored")
    would_claim: int = Field(..., description="of those, how many it would take once promoted")
    claim_rate: float | None
    taken_from: dict[str, int] = Field(..., description="route each would-be claim takes now (a task or zero-shot)")
    score_histogram: ScoreHistogram
    replica: str | None = Field(
        None, description="the server (replica) that answered: the counts are its own traffic (docs/scale-out.md)"
    )


class UnclaimedCluster(BaseModel):
    id: int
    size: int = Field(..., description="its members among the kept embeddings")
    share: float = Field(..., description="the share of auto-routed traffic over the window it stands for")
    over_time: list[list[float]] = Field(..., description="[bin start (unix seconds), share of that bin's traffic]")
    nearest_task: str | None = Field(None, description="the active task whose selector scores it lowest")
    margin: float | None = Field(None, description="that task's median score minus 1: how far from claiming it")
    moved_by_labels: float = Field(
        0.0,
        description="the share of its members that a task's selector claimed but whose requests' labels named none of "
        "its classes (label-aware routing sent them to zero-shot): a task claiming them does not serve them, one "
        "trained on their classes would",
    )
    examples: list[str] = Field(
        [], description="data:image/png;base64 thumbnails of its members nearest its centre (`examples`, opt-in)"
    )


class ReservoirInfo(BaseModel):
    embeddings: int
    capacity: int
    bytes: int
    retention_seconds: float
    bin_seconds: float
    window_start: float | None
    auto_images: int = Field(..., description="images with task=auto in the window")
    unclaimed: int = Field(..., description="of those, how many went to zero-shot")
    unclaimed_share: float | None
    background: int | None = Field(None, description="reference-set rows compared against (null: none)")
    thumbnail: int = Field(0, description="pixels a side of the thumbnails kept (0: none, the default)")


class UnclaimedInsights(BaseModel):
    enabled: bool = Field(..., description="false: the monitor is off (unclaimed_capacity=0)")
    reservoir: ReservoirInfo | None
    clusters: list[UnclaimedCluster]
    replica: str | None = Field(
        None, description="the server (replica) that answered: the clusters are of its own traffic (docs/scale-out.md)"
    )


class TaskList(BaseModel):
    generation: int
    tasks: list[TaskInfo]


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": 1}]})

    version: int = Field(..., ge=1)

    @field_validator("version", mode="before")
    @classmethod
    def _whole_number(cls, v: Any) -> Any:
        """A JSON integer (1 or 1.0, as JSON Schema allows); not a string or a boolean."""
        if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
            # a Java body built by concatenation sends "2": "must be a whole number" read as if 2 were not one
            kind = {str: "the string", bool: "the boolean"}.get(type(v), "")
            raise ValueError(
                f"version must be a JSON integer such as 2, got {kind} {json.dumps(v)[:20]}".replace("  ", " ")
            )
        return int(v)


class Removed(BaseModel):
    task: str
    was_active: bool = Field(
        True, description="false: the task had no active version to stop (without purge, nothing changed)"
    )
    shadow_version: int | None = Field(
        None,
        description="a version left in shadow: it keeps scoring live traffic (DELETE /tasks/{task}/shadow stops "
        "it; a purge removes it)",
    )
    purged_blobs: int
    kept: dict[int, list[str]] = Field(
        default_factory=dict,
        description="after a purge: the task's versions kept because other tasks use their experts, with those tasks "
        "(they stay stored, inactive; purge those tasks first to delete them)",
    )
    generation: int
    replicas: dict[str, int | str] | None = Field(
        None, description="{replica: the generation it serves}; with wait=all every live replica."
    )


class ErrorDetail(BaseModel):
    code: str = Field(..., examples=["bundle_invalid"])
    message: str = Field(..., examples=["bundle backbone fingerprint 3fa2… does not match the served backbone 9c1e…"])
    details: dict[str, Any] | None = Field(
        None,
        description="For `interference` (409): the gate's whole report. For an error of one image of a classify "
        'request (`bad_image`, or a 413 about one image): `{"image": i}`, its index in the request. For a 413 of '
        'a limit the whole request broke: `{"setting": name, "limit": n}` (max_images, max_labels, max_label_chars, '
        "max_request_bytes, max_request_pixels, max_response_bytes, max_request_prompts, max_batch). For "
        '`stale_replica` (503): `{"generation": served, "wanted": asked}`. For `version_conflict` (409): '
        '`{"task", "version", "same_bytes", "state", "newest"}`: whether this very bundle is stored, and where.',
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str = Field(..., description="live | degraded | failed (healthz); ready | degraded (readyz)")
    degraded: dict[str, str] = Field(default_factory=dict, description="Active tasks left out of the bank, and why.")
    store_error: str | None = Field(None, description="Why the store's index cannot be read, if it cannot.")
    store_writable: bool | None = Field(
        None,
        description="False when this server cannot write its store folder (a read-only mount, permissions): it "
        "serves, but every change is refused (503 `store_not_writable`). Null for an object store; absent while "
        "loading.",
    )
    generation: int | None = None
    tasks: list[str] = Field(default_factory=list)
    backbone: dict[str, Any] = Field(default_factory=dict)
    frozen_runtime: str | None = None  # torch | onnx
    threads: int | None = Field(None, description="Threads of each forward pass (the `threads` setting).")
    autocast: str | None = Field(None, description="Mixed precision of the PyTorch passes (the `autocast` setting).")
