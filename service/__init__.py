"""The HTTP service: `create_app` (FastAPI), the batching compute thread, the hot-swap registry, and the
guards around them (limits, tokens, timeouts). It imports `model_store`, never `training`.

    from service import ServeConfig, create_app
    app = create_app(ServeConfig(store="./clipbank-store"))
"""

from model_store.lazy import lazy_exports

_EXPORTS = {
    "create_app": "app",
    "ServeConfig": "config",
    "Limits": "config",
    "serve": "server",
    "ClipbankClient": "client",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
