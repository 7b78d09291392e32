"""``build_backend``: turn a :class:`BackendSpec` into a ready backend with cache, limits and budget.

``backend_spec`` reads the model references the command lines take (``embedded``, a model folder or
Hub name, ``MODEL@URL``). Every failure to start a backend is one :class:`BackendLoadError`.
"""

from __future__ import annotations

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
from pipeline.llm.layers import CachedBackend, LimitedBackend, MeteredBackend
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


def build_backend(spec: BackendSpec) -> ChatBackend:
    """A backend for ``spec``: the model (or endpoint pool), then budget, then the response cache.

    Layers from the outside in: the cache answers repeated requests for free; the budget counts
    and caps what reaches a model; each endpoint limits its calls in flight and per minute.
    Limits apply per endpoint, so a pool of N endpoints runs up to N x ``max_concurrency`` calls.
    A backend belongs to the event loop that first uses it.

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
    try:
        model = _model(spec)
    except _LOAD_ERRORS as exc:
        if isinstance(exc, BackendLoadError):
            raise
        name = EMBEDDED_NAME if spec.kind == "embedded" else spec.model or spec.kind
        raise BackendLoadError(f"cannot load model {name}: {_first_line(exc)}") from exc
    backend: ChatBackend = MeteredBackend(model, spec.token_budget, spec.call_budget)
    if not spec.cache_path or spec.cache_mode == "off":
        return backend
    try:
        cache = ResponseCache(spec.cache_path, spec.cache_mode)
    except (OSError, sqlite3.Error) as exc:
        raise BackendLoadError(f"cannot open response cache {spec.cache_path}: {_first_line(exc)}") from exc
    return CachedBackend(backend, cache, spec)
