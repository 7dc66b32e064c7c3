"""Names defined once: what `task` and `route` of a classification may say, and the selector kinds."""

AUTO = "auto"  # the selectors decide, per image
ZERO_SHOT = "zero-shot"  # plain frozen CLIP
TASK_MODES = (AUTO, ZERO_SHOT)  # besides a task name; so no task may be named either
PER_IMAGE = "per-image"
PER_REQUEST = "per-request"  # the request's images are routed as one (averaged selector scores)
ROUTE_MODES = (PER_IMAGE, PER_REQUEST)

# Selector kinds a config may name (model_store.selector.SELECTOR_KINDS implements exactly these).
SELECTOR_NAMES = ("autoencoder", "gaussian", "discriminative", "hybrid")
DEFAULT_SELECTOR = "hybrid"  # docs/benchmarks/routing.md, "The hybrid kind"
