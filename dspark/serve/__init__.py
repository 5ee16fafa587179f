"""A local OpenAI-compatible endpoint for a dspark bundle: `create_app` (FastAPI routes), the
`Scheduler` thread that batches concurrent requests into the speculative decoder, Prometheus
`ServerMetrics`, and `serve_bundle` / `start_in_thread` (uvicorn). Importing this package is cheap;
the submodules import FastAPI and torch when used."""

__all__ = ["create_app", "runtime_from_bundle", "serve_bundle", "start_in_thread", "ServeRuntime"]


def __getattr__(name: str):
    if name == "create_app":
        from dspark.serve.app import create_app
        return create_app
    if name in ("runtime_from_bundle", "ServeRuntime"):
        from dspark.serve import runtime
        return getattr(runtime, name)
    if name in ("serve_bundle", "start_in_thread"):
        from dspark.serve import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'dspark.serve' has no attribute {name!r}")
