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

RatingMethod = Literal["logprobs", "parsed", "failed", "contrast"]
"""How a score was read: the digit's log-probabilities, the answer's text, not at all, or (the
observer judge, :mod:`pipeline.judge`) a calibrated contrast of log-probabilities."""
CacheMode = Literal["read-write", "replay-only", "off"]
BackendKind = Literal["embedded", "local", "openai"]
Transport = Literal["aiohttp", "httpx"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


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


@dataclass(frozen=True)
class LogProbs:
    """Log-probabilities a model gives to text it is shown; nothing is generated.

    ``values`` maps each candidate next token (:meth:`ChatBackend.next_token_logprobs`), or the one
    continuation (:meth:`ChatBackend.continuation_logprob`, the sum over its tokens), to its
    natural-log probability.
    """

    values: dict[str, float]
    model: str
    usage: Usage = field(default_factory=Usage)
    cached: bool = False


class ScoringUnsupported(NotImplementedError):
    """The backend gives no log-probabilities of given text (OpenAI-compatible chat servers give none
    for the prompt). A configuration problem, not a failed call: never recorded as one."""


class LLMError(RuntimeError):
    """A call that failed for good (after the client's own retries). Recorded per interaction."""


class BudgetExceeded(LLMError):
    """The configured token or call budget is spent; the run should stop cleanly."""


class CircuitOpen(BudgetExceeded):
    """Too many of the last calls failed (an outage): the run's failure budget is spent, it stops cleanly."""


class CacheMiss(LLMError):
    """A replay-only cache had no stored response for this request."""


class TransientError(LLMError):
    """A call that may well succeed when made again: a 200 answer whose body is empty or unreadable.

    The openai client retries connection errors, timeouts, 429 and 5xx answers itself but takes any
    200 as final; :class:`~pipeline.llm.layers.RetryingBackend` gives these the same treatment.
    """


@dataclass
class BackendSpec:
    """How to reach a model. Saved with run configs, so it never holds a secret.

    Fields by group (each field's help is in its metadata and on the command lines):

    - model: ``kind``, ``model``, ``base_urls``, ``api_key_env``, ``transport``, ``extra``
    - sampling: ``temperature``, ``top_p``, ``max_tokens``, ``use_logprobs``
    - limits: ``timeout``, ``max_retries``, ``max_concurrency``, ``requests_per_minute``,
      ``pool_max_failures``, ``pool_cooldown``, ``token_budget``, ``call_budget``
    - in-process: ``max_batch_size``, ``batch_wait_ms``, ``dtype``
    - response cache: ``cache_path``, ``cache_mode``

    ``kind`` left unset means ``openai`` when ``base_urls`` are given (a URL alone names an
    OpenAI-compatible server), else ``embedded``.
    """

    kind: BackendKind | None = field(
        default=None,
        metadata={
            "help": "embedded: SmolLM2 shipped with the package; local: a Hugging Face model folder or Hub "
            "name run in-process; openai: any OpenAI-compatible server. Unset: openai when base_urls "
            "are given, else embedded"
        },
    )
    model: str | None = field(
        default=None,
        metadata={"help": "the served model's name (openai) or a model folder or Hub name (local)"},
    )
    base_urls: list[str] = field(
        default_factory=list,
        metadata={"help": "OpenAI-compatible base URLs, one per replica of the model; none: OpenAI's API"},
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "environment variable holding the API key (the key itself is never stored)"},
    )
    transport: Transport = field(
        default="aiohttp",
        metadata={
            "help": "openai: the client's HTTP transport; aiohttp (openai[aiohttp], the lean one) or httpx "
            "(the client's default). Both keep the client's retries and timeouts"
        },
    )
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0: greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_tokens: int = field(default=256, metadata={"help": "longest answer, in tokens"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per HTTP request"})
    max_retries: int = field(default=3, metadata={"help": "client retries of a failed HTTP request"})
    max_concurrency: int = field(default=16, metadata={"help": "calls in flight per endpoint"})
    requests_per_minute: float | None = field(
        default=None, metadata={"help": "request rate limit per endpoint; none: unlimited"}
    )
    use_logprobs: bool = field(
        default=True,
        metadata={"help": "read ratings from the rating digit's log-probabilities where possible"},
    )
    max_batch_size: int = field(
        default=16, metadata={"help": "in-process backends: most requests run as one batch"}
    )
    dtype: Dtype = field(
        default="auto",
        metadata={
            "help": "in-process backends: the weights' dtype; auto: float32 on CPU, the model's own on GPU. "
            "bfloat16 generates about twice as fast on CPUs with bf16 instructions (avx512_bf16) but moves "
            "rating digits' probabilities: keep judges in float32. On a CPU without them bfloat16 runs as float32 "
            "(torch would emulate it, some 70 times slower)"
        },
    )
    batch_wait_ms: float = field(
        default=5.0, metadata={"help": "in-process backends: how long a batch waits for more requests"}
    )
    cache_path: str | None = field(default=None, metadata={"help": "SQLite response cache file"})
    cache_mode: CacheMode = field(
        default="read-write",
        metadata={"help": "read-write; replay-only: a request not in the cache is an error; off: no cache"},
    )
    token_budget: int | None = field(
        default=None, metadata={"help": "stop cleanly after this many tokens (prompt + completion)"}
    )
    call_budget: int | None = field(
        default=None, metadata={"help": "stop cleanly after this many model calls"}
    )
    extra: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "extra request settings, part of a run's identity (no backend sends them yet)"},
    )
    pool_max_failures: int = field(
        default=3,
        metadata={
            "help": "an endpoint of a pool failing this many calls in a row is taken out for pool_cooldown"
        },
    )
    pool_cooldown: float = field(
        default=30.0, metadata={"help": "seconds a failing endpoint of a pool stays out"}
    )

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = "openai" if self.base_urls else "embedded"

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
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        """Ask for a 1..scale rating. Never raises for an unreadable answer.

        ``reason=False`` asks for the score alone: no reason is generated (``Rating.reason`` is
        empty), which is most of a rating's cost where the score comes from the digit's
        log-probabilities.
        """

    @property
    def scoring_model(self) -> str | None:
        """Which model and weights' dtype answer :meth:`next_token_logprobs` and
        :meth:`continuation_logprob` (judge calibrations are looked up by it); ``None`` when this
        backend cannot score text."""
        return None

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        """The log-probability of each candidate as the start of the assistant's answer to ``messages``:
        its token's there, read from one forward pass; a candidate of several tokens is scored as
        :meth:`continuation_logprob` scores it."""
        raise ScoringUnsupported(
            f"{self.model_name}: {type(self).__name__} gives no next-token log-probabilities"
        )

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        """The log-probability of ``continuation`` as the start of the assistant's answer to
        ``messages``: the sum over its tokens (tokenised on its own, after the chat template)."""
        raise ScoringUnsupported(
            f"{self.model_name}: {type(self).__name__} gives no log-probabilities of given text"
        )

    def usage(self) -> dict[str, Usage]:
        """Usage so far, per model name."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients, threads and models."""

    async def __aenter__(self) -> ChatBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
