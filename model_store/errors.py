"""Typed errors of the model store; the service maps each type to one HTTP status in one place."""

from __future__ import annotations


class ClipbankError(Exception):
    """Base of every error clipbank raises on purpose. `code` is a stable machine-readable name."""

    code = "clipbank_error"


class BackboneError(ClipbankError):
    """A backbone reference could not be parsed or loaded."""

    code = "backbone_error"


class UnsupportedBackbone(BackboneError):
    """The architecture is not a ViT CLIP with standard residual blocks, which the experts need."""

    code = "unsupported_backbone"


class BundleError(ClipbankError):
    """Base of all problems with a bundle file."""

    code = "bundle_invalid"


class BundleFormatError(BundleError):
    """The bytes are not a safetensors file (pickles and archives are refused)."""

    code = "bundle_not_safetensors"


class BundleInvalid(BundleError):
    """The manifest or the tensor set breaks the bundle schema."""

    code = "bundle_invalid"


class BundleTampered(BundleError):
    """A tensor does not hash to the expert id the manifest gives it."""

    code = "bundle_tampered"


class ShapeMismatch(BundleError):
    """A tensor's shape does not fit the served backbone."""

    code = "shape_mismatch"


class BackboneMismatch(BundleError):
    """The bundle was trained on another backbone (fingerprint differs)."""

    code = "backbone_mismatch"


class MissingExpert(BundleError):
    """The bundle routes to an expert id that the bank does not hold."""

    code = "missing_expert"


class ReferenceInvalid(ClipbankError):
    """A reference set file (`model_store.reference`) cannot be read or does not hold a reference set."""

    code = "reference_invalid"


class StoreError(ClipbankError):
    """Base of store problems."""

    code = "store_error"


class TaskNotFound(StoreError):
    code = "task_not_found"


class TaskDegraded(StoreError):
    """A request pinned to an active task the bank could not load (a damaged blob, say; `/healthz` names it)."""

    code = "task_degraded"


class VersionNotFound(StoreError):
    code = "version_not_found"


class VersionConflict(StoreError):
    """A bundle's version is not greater than the task's newest stored version. `details` (the API's): what is
    stored (`store_index.conflict_details`), when known."""

    code = "version_conflict"

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details


class StoreUnavailable(StoreError):
    """The store could not be reached or did not answer (an object store's endpoint down, say)."""

    code = "store_unavailable"


class StoreMoved(StoreError):
    """A change checked against one generation of the store would land on another (a lock-free store, S3, where
    another server changed it meanwhile): nothing was written. A server checks again and retries."""

    code = "store_busy"


class StoreDamaged(StoreError):
    """The store holds something it cannot use as it is: a blob that does not hash to its name, blobs with no
    index. Retrying does not help; an operator must look (`clipbank store check`)."""

    code = "store_damaged"


class StoreTooNew(StoreError):
    """The store's index is of a newer format than this release writes: it serves from it, but only an upgrade can
    change it (retrying cannot)."""

    code = "store_too_new"


class StoreWriteFailed(StoreError):
    """The store could not write a change (disk full, read-only, permissions): nothing was changed."""

    code = "store_write_failed"


class StoreNotWritable(StoreWriteFailed):
    """The store is not writable for this server (a read-only mount, permissions): nothing was changed, and
    sending the change again cannot help until an operator makes it writable."""

    code = "store_not_writable"


class NoShadow(StoreError):
    """The task has no version in shadow."""

    code = "no_shadow"


class ShadowConflict(StoreError):
    """The version asked to shadow is the task's active one."""

    code = "shadow_conflict"


class BundleNotFound(StoreError):
    code = "bundle_not_found"


# what repairs a stored version whose blob is missing or damaged (the upload is answered 200 `restored`)
REWRITE = "; upload its bundle file again (POST /tasks, `clipbank push`) to write it back"


class InvalidRequest(ClipbankError):
    """A classify request that cannot be answered as asked (for example no labels and no task to take them from)."""

    code = "invalid_request"
