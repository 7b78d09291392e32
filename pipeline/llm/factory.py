"""``build_backend``: turn a :class:`BackendSpec` into a ready backend with cache, limits and budget.

``build_model`` is the same without the cache (a stage that keeps one cache per unit of work wraps
it itself); ``check_endpoints`` is the preflight of an OpenAI-compatible spec. ``backend_spec``
reads the model references the command lines take (``embedded``, a model folder or Hub name,
``MODEL@URL``). Every failure to start a backend is one :class:`BackendLoadError`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import typing
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from pipeline.embedded import EMBEDDED_NAME, embedded_model_path
from pipeline.errors import BackendLoadError, UserError
from pipeline.llm.base import BackendKind, BackendSpec, CacheMode, ChatBackend
from pipeline.llm.cache import ResponseCache
from pipeline.llm.layers import (
    BreakerBackend,
    CachedBackend,
    CircuitBreaker,
    LimitedBackend,
    MeteredBackend,
    RetryingBackend,
)
from pipeline.llm.local import LocalBackend
from pipeline.llm.openai_backend import OpenAIBackend
from pipeline.llm.pool import EndpointPool

OPENAI_BASE_URL = "https://api.openai.com/v1"
MODEL_REFERENCE = "embedded | model folder or Hub name | MODEL@http://host:port/v1"
"""The model references :func:`backend_spec` reads, as command-line help shows them."""

# What starting a backend raises for a folder that is not a model (transformers: OSError,
# ValueError, RuntimeError for mismatched weights; safetensors and huggingface_hub their own
# types), a package that is missing, a bad setting or an unwritable cache. Anything else is a bug.
_LOAD_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    RuntimeError,
    ImportError,
    sqlite3.Error,
    SafetensorError,
    StrictDataclassError,
)


def backend_spec(ref: str, **fields: Any) -> BackendSpec:
    """The spec of a model reference, with ``fields`` (sampling, cache, limits) set on it.

    ``embedded`` is the shipped SmolLM2; ``MODEL@http://host:port/v1`` is a model on an
    OpenAI-compatible server; anything else is a local model folder or a Hub name run in-process.
    A path (``./``, ``/``, ``~`` or an existing one) must be a Hugging Face model folder.
    """
    if ref == "embedded":
        return BackendSpec(kind="embedded", **fields)
    if "@http://" in ref or "@https://" in ref:
        model, url = ref.rsplit("@", 1)
        return BackendSpec(kind="openai", model=model, base_urls=[url], **fields)
    path = Path(ref).expanduser()
    looks_like_path = ref.startswith((".", "/", "~")) or path.exists()
    if looks_like_path and not (path / "config.json").is_file():
        raise UserError(f"model folder {ref} has no config.json (missing or not a Hugging Face model folder)")
    return BackendSpec(kind="local", model=str(path) if looks_like_path else ref, **fields)


def _limited(backend: ChatBackend, spec: BackendSpec) -> ChatBackend:
    return LimitedBackend(backend, spec.max_concurrency, spec.requests_per_minute)


def _model(spec: BackendSpec) -> ChatBackend:
    """The bare backend for ``spec``, with the concurrency and rate limits of each endpoint."""
    if spec.kind == "embedded":
        backend = LocalBackend(
            embedded_model_path(), spec, model_name=EMBEDDED_NAME, identity=f"embedded:{EMBEDDED_NAME}"
        )
        return _limited(backend, spec)
    if spec.kind == "local":
        if not spec.model:
            raise BackendLoadError("a local backend needs a model folder or Hub name (spec.model)")
        return _limited(LocalBackend(spec.model, spec), spec)
    if spec.kind == "openai":
        endpoints = [_limited(OpenAIBackend(spec, url), spec) for url in spec.base_urls or [OPENAI_BASE_URL]]
        if len(endpoints) == 1:
            return endpoints[0]
        return EndpointPool(endpoints, max_failures=spec.pool_max_failures, cooldown=spec.pool_cooldown)
    kinds = ", ".join(typing.get_args(BackendKind))
    raise BackendLoadError(f"unknown backend kind {spec.kind!r}; choose from {kinds}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_model(spec: BackendSpec, *, breaker: CircuitBreaker | None = None) -> ChatBackend:
    """The backend for ``spec`` without a response cache.

    Layers from the outside in: the budget counts and caps what reaches a model; the circuit
    breaker (when given; one may be shared by several backends) stops all calls once too many of
    the last ones failed; transient answers (a 200 with an unreadable body) are retried up to
    ``spec.max_retries`` times, on top of the openai client's own retries; a pool spreads calls
    over its endpoints and cools a failing one down; each endpoint limits its calls in flight and
    per minute. Limits apply per endpoint, so a pool of N endpoints runs up to N x
    ``max_concurrency`` calls. Raises :class:`BackendLoadError` as :func:`build_backend` does.
    """
    try:
        model = _model(spec)
    except _LOAD_ERRORS as exc:
        if isinstance(exc, BackendLoadError):
            raise
        name = EMBEDDED_NAME if spec.kind == "embedded" else spec.model or spec.kind
        raise BackendLoadError(f"cannot load model {name}: {_first_line(exc)}") from exc
    backend: ChatBackend = RetryingBackend(model, spec.max_retries)
    if breaker is not None:
        backend = BreakerBackend(backend, breaker)
    return MeteredBackend(backend, spec.token_budget, spec.call_budget)


def open_cache(path: str | Path, mode: CacheMode) -> ResponseCache:
    """A response cache file, or a :class:`BackendLoadError` saying why it cannot be used."""
    try:
        return ResponseCache(path, mode)
    except (OSError, sqlite3.Error) as exc:
        raise BackendLoadError(f"cannot open response cache {path}: {_first_line(exc)}") from exc


def build_backend(spec: BackendSpec) -> ChatBackend:
    """A backend for ``spec``: :func:`build_model`, then the response cache outside it, which
    answers repeated requests for free. A backend belongs to the event loop that first uses it.

    Raises :class:`BackendLoadError` (the original error as its ``__cause__``) when the backend
    cannot start: a folder that is not a model, a missing package, a bad setting, an unusable cache.
    """
    if spec.cache_mode not in typing.get_args(CacheMode):
        modes = ", ".join(typing.get_args(CacheMode))
        raise BackendLoadError(f"unknown cache_mode {spec.cache_mode!r}; choose from {modes}")
    if spec.cache_mode == "replay-only" and not spec.cache_path:
        raise BackendLoadError("cache_mode 'replay-only' needs a cache_path")
    # The model first: a folder that is not a model must fail before the cache file is created,
    # so a refused run leaves nothing behind.
    backend = build_model(spec)
    if not spec.cache_path or spec.cache_mode == "off":
        return backend
    return CachedBackend(backend, open_cache(spec.cache_path, spec.cache_mode), spec)


async def check_endpoints(spec: BackendSpec) -> None:
    """The preflight of a spec: one cheap request per endpoint of an OpenAI-compatible server (none
    for in-process models, nor in replay-only mode, which makes no calls). Raises
    :class:`BackendLoadError` for the first endpoint that is unreachable or misconfigured."""
    if spec.kind != "openai" or spec.cache_mode == "replay-only":
        return
    endpoints = []
    try:
        for url in spec.base_urls or [OPENAI_BASE_URL]:
            try:
                endpoints.append(OpenAIBackend(spec, url))
            except _LOAD_ERRORS as exc:
                raise BackendLoadError(f"cannot start a client for {url}: {_first_line(exc)}") from exc
        await asyncio.gather(*(endpoint.check() for endpoint in endpoints))
    finally:
        for endpoint in endpoints:
            await endpoint.aclose()
