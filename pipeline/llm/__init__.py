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
]
