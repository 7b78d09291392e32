"""The one async interface every language-model backend implements.

The simulation, the observers and ``sandbox evaluate`` only ever see :class:`ChatBackend`;
which server or model answers is a matter of configuration (:class:`BackendSpec`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

RatingMethod = Literal["logprobs", "parsed", "failed"]
CacheMode = Literal["read-write", "replay-only", "off"]
BackendKind = Literal["embedded", "local", "openai"]


@dataclass(frozen=True)
class Usage:
    """Tokens and calls spent by one request (or summed over many)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 1

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.calls + other.calls,
        )


@dataclass(frozen=True)
class Completion:
    """The text a model produced for one chat request."""

    text: str
    model: str
    usage: Usage = field(default_factory=Usage)
    cached: bool = False
    response: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """The backend's raw response (the server's JSON for OpenAI-compatible servers), kept in the cache."""


@dataclass(frozen=True)
class Rating:
    """A score on a 1..scale rating scale, with the model's reason.

    ``score`` is ``None`` when no rating could be read from the answer; it is never replaced by
    a stand-in number. ``distribution`` maps each allowed digit to its probability when the
    score came from token log-probabilities (``method == "logprobs"``); ``score`` is then the
    expected value.
    """

    score: float | None
    reason: str
    raw: str
    method: RatingMethod
    model: str
    scale: int = 7
    distribution: dict[int, float] | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False
    response: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """The backend's raw response, as for :attr:`Completion.response`."""


class LLMError(RuntimeError):
    """A call that failed for good (after the client's own retries). Recorded per interaction."""


class BudgetExceeded(LLMError):
    """The configured token or call budget is spent; the run should stop cleanly."""


class CacheMiss(LLMError):
    """A replay-only cache had no stored response for this request."""


@dataclass
class BackendSpec:
    """How to reach a model. Saved with run configs, so it never holds a secret.

    ``kind``: ``embedded`` (SmolLM2 shipped with the package), ``local`` (a Hugging Face model
    folder or Hub name run in-process) or ``openai`` (any OpenAI-compatible server).
    """

    kind: BackendKind = "embedded"
    model: str | None = None
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    timeout: float = 60.0
    max_retries: int = 3
    max_concurrency: int = 16
    requests_per_minute: float | None = None
    use_logprobs: bool = True
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    cache_path: str | None = None
    cache_mode: CacheMode = "read-write"
    token_budget: int | None = None
    call_budget: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    pool_max_failures: int = 3
    """An endpoint of a pool that fails this many calls in a row is taken out for ``pool_cooldown``."""
    pool_cooldown: float = 30.0

    def sampling(self, **overrides: Any) -> dict[str, Any]:
        """The sampling parameters of one call: these defaults, updated with the call's own."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        } | overrides


class ChatBackend(abc.ABC):
    """Async chat completions and ratings against one model."""

    model_name: str

    @abc.abstractmethod
    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        """Answer a chat. ``sample_index`` keeps several samples of one prompt distinct in the cache."""

    @abc.abstractmethod
    async def rate(
        self, messages: list[Message], *, scale: int = 7, sample_index: int = 0, **params: Any
    ) -> Rating:
        """Ask for a 1..scale rating with a reason. Never raises for an unreadable answer."""

    def usage(self) -> dict[str, Usage]:
        """Usage so far, per model name."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients, threads and models."""

    async def __aenter__(self) -> ChatBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
