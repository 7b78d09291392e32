"""``build_backend``: turn a :class:`BackendSpec` into a ready backend with cache, limits and budget."""

from __future__ import annotations

from pipeline.llm.base import BackendSpec, ChatBackend
from pipeline.llm.cache import ResponseCache
from pipeline.llm.layers import CachedBackend, LimitedBackend, MeteredBackend

OPENAI_BASE_URL = "https://api.openai.com/v1"


def _model(spec: BackendSpec) -> ChatBackend:
    """The bare backend for ``spec``, with the concurrency and rate limits of each endpoint."""
    if spec.kind == "embedded":
        from pipeline.embedded import EMBEDDED_NAME, embedded_model_path
        from pipeline.llm.local import LocalBackend

        backend = LocalBackend(
            embedded_model_path(), spec, model_name=EMBEDDED_NAME, identity=f"embedded:{EMBEDDED_NAME}"
        )
        return LimitedBackend(backend, spec.max_concurrency, spec.requests_per_minute)
    if spec.kind == "local":
        from pipeline.llm.local import LocalBackend

        if not spec.model:
            raise ValueError("a local backend needs spec.model: a model folder or Hub name")
        return LimitedBackend(LocalBackend(spec.model, spec), spec.max_concurrency, spec.requests_per_minute)
    if spec.kind == "openai":
        from pipeline.llm.openai_backend import OpenAIBackend
        from pipeline.llm.pool import EndpointPool

        endpoints = [
            LimitedBackend(OpenAIBackend(spec, url), spec.max_concurrency, spec.requests_per_minute)
            for url in spec.base_urls or [OPENAI_BASE_URL]
        ]
        if len(endpoints) == 1:
            return endpoints[0]
        return EndpointPool(endpoints, max_failures=spec.pool_max_failures, cooldown=spec.pool_cooldown)
    raise ValueError(f"unknown backend kind {spec.kind!r}; choose embedded, local or openai")


def build_backend(spec: BackendSpec) -> ChatBackend:
    """A backend for ``spec``: the model (or endpoint pool), then budget, then the response cache.

    Layers from the outside in: the cache answers repeated requests for free; the budget counts
    and caps what reaches a model; each endpoint limits its calls in flight and per minute.
    Limits apply per endpoint, so a pool of N endpoints runs up to N x ``max_concurrency`` calls.
    A backend belongs to the event loop that first uses it.
    """
    if spec.cache_mode not in ("read-write", "replay-only", "off"):
        raise ValueError(f"unknown cache_mode {spec.cache_mode!r}; choose read-write, replay-only or off")
    if spec.cache_mode == "replay-only" and not spec.cache_path:
        raise ValueError("cache_mode 'replay-only' needs spec.cache_path")
    backend: ChatBackend = MeteredBackend(_model(spec), spec.token_budget, spec.call_budget)
    if spec.cache_path and spec.cache_mode != "off":
        backend = CachedBackend(backend, ResponseCache(spec.cache_path, spec.cache_mode), spec)
    return backend
