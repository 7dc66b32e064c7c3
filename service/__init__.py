"""The HTTP service: FastAPI app, batching runtime, hot-swap registry (built in the service issue)."""
