"""The language-model layer: one async interface, several backends, a cache, robust ratings."""

from pipeline.llm.base import (
    BackendSpec,
    BudgetExceeded,
    CacheMiss,
    ChatBackend,
    Completion,
    LLMError,
    Message,
    Rating,
    Usage,
)
from pipeline.llm.factory import backend_spec, build_backend

__all__ = [
    "BackendSpec",
    "BudgetExceeded",
    "CacheMiss",
    "ChatBackend",
    "Completion",
    "LLMError",
    "Message",
    "Rating",
    "Usage",
    "backend_spec",
    "build_backend",
]
