"""Layers wrapped around any backend: response cache, usage and budget, a circuit breaker, retries
of transient answers, concurrency and rate limits.

Each layer is itself a :class:`ChatBackend` holding the next one, so every backend gets the same
behaviour without repeating it (see :func:`pipeline.llm.build_backend` for the order).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pipeline.llm.base import (
    BackendSpec,
    BudgetExceeded,
    CacheMiss,
    ChatBackend,
    CircuitOpen,
    Completion,
    LLMError,
    LogProbs,
    Message,
    Rating,
    TransientError,
    Usage,
)
from pipeline.llm.cache import ResponseCache, cache_key
from pipeline.llm.ratings import CONTRACT_VERSION

T = TypeVar("T")


class Layer(ChatBackend):
    """A backend that passes calls on to ``inner``."""

    def __init__(self, inner: ChatBackend):
        self.inner = inner
        self.model_name = inner.model_name

    @property
    def identity(self) -> str:
        """Which endpoint or model folder answers (part of the cache key)."""
        return self.inner.identity  # type: ignore[attr-defined]

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        return await self.inner.complete(messages, sample_index=sample_index, **params)

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        return await self.inner.rate(
            messages, scale=scale, sample_index=sample_index, reason=reason, **params
        )

    @property
    def scoring_model(self) -> str | None:
        return self.inner.scoring_model

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        return await self.inner.next_token_logprobs(messages, candidates)

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        return await self.inner.continuation_logprob(messages, continuation)

    def usage(self) -> dict[str, Usage]:
        return self.inner.usage()

    async def aclose(self) -> None:
        await self.inner.aclose()


class LimitedBackend(Layer):
    """At most ``max_concurrency`` calls in flight, and at most ``requests_per_minute`` call starts."""

    def __init__(self, inner: ChatBackend, max_concurrency: int, requests_per_minute: float | None = None):
        super().__init__(inner)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._slots = asyncio.Semaphore(max_concurrency)
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_start = 0.0

    async def _pace(self) -> None:
        # Spaces call starts evenly; no await between reading and advancing the schedule, so no lock.
        if not self._interval:
            return
        now = asyncio.get_running_loop().time()
        start = max(now, self._next_start)
        self._next_start = start + self._interval
        await asyncio.sleep(start - now)

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        async with self._slots:
            await self._pace()
            return await self.inner.complete(messages, sample_index=sample_index, **params)

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        async with self._slots:
            await self._pace()
            return await self.inner.rate(
                messages, scale=scale, sample_index=sample_index, reason=reason, **params
            )

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        async with self._slots:
            await self._pace()
            return await self.inner.next_token_logprobs(messages, candidates)

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        async with self._slots:
            await self._pace()
            return await self.inner.continuation_logprob(messages, continuation)


class MeteredBackend(Layer):
    """Counts tokens and calls per model and refuses to start a call once a budget is spent.

    The call budget counts calls started (failed ones too, a server may have billed them); the token
    budget counts tokens of finished calls, so calls already in flight when it is reached still
    finish and are kept.
    """

    def __init__(self, inner: ChatBackend, token_budget: int | None = None, call_budget: int | None = None):
        super().__init__(inner)
        self.token_budget = token_budget
        self.call_budget = call_budget
        self._started = 0
        self._usage: dict[str, Usage] = defaultdict(lambda: Usage(calls=0))

    def _admit(self) -> None:
        if self.call_budget is not None and self._started >= self.call_budget:
            raise BudgetExceeded(f"call budget spent: {self._started} of {self.call_budget} calls started")
        spent = sum(u.prompt_tokens + u.completion_tokens for u in self._usage.values())
        if self.token_budget is not None and spent >= self.token_budget:
            raise BudgetExceeded(f"token budget spent: {spent} of {self.token_budget} tokens used")
        self._started += 1

    def _record(self, model: str, usage: Usage) -> None:
        self._usage[model] = self._usage[model] + usage

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        self._admit()
        result = await self.inner.complete(messages, sample_index=sample_index, **params)
        self._record(result.model, result.usage)
        return result

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        self._admit()
        result = await self.inner.rate(
            messages, scale=scale, sample_index=sample_index, reason=reason, **params
        )
        self._record(result.model, result.usage)
        return result

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        self._admit()
        result = await self.inner.next_token_logprobs(messages, candidates)
        self._record(result.model, result.usage)
        return result

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        self._admit()
        result = await self.inner.continuation_logprob(messages, continuation)
        self._record(result.model, result.usage)
        return result

    def usage(self) -> dict[str, Usage]:
        """Tokens and calls actually spent per model (answers served from the cache cost nothing)."""
        return dict(self._usage)


class CallLayer(Layer):
    """A layer that treats both kinds of call alike: subclasses define :meth:`_call` only."""

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        return await self._call(lambda: self.inner.complete(messages, sample_index=sample_index, **params))

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        return await self._call(
            lambda: self.inner.rate(messages, scale=scale, sample_index=sample_index, reason=reason, **params)
        )

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        return await self._call(lambda: self.inner.next_token_logprobs(messages, candidates))

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        return await self._call(lambda: self.inner.continuation_logprob(messages, continuation))


class RetryingBackend(CallLayer):
    """Makes a call again, up to ``retries`` times with jittered exponential backoff, when it fails
    with :class:`TransientError` (a 200 answer with an empty or unreadable body).

    Every other failure was already retried below (the openai client retries connection errors,
    timeouts, 429 and 5xx answers) or is final, and passes through.
    """

    def __init__(self, inner: ChatBackend, retries: int, backoff: float = 0.5, max_backoff: float = 8.0):
        super().__init__(inner)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.retries):
            try:
                return await call()
            except TransientError:
                pause = min(self.backoff * 2**attempt, self.max_backoff)
                await asyncio.sleep(pause * random.uniform(0.75, 1.0))
        return await call()


class CircuitBreaker:
    """Counts the outcomes of the last ``window`` calls; open (tripped) once ``threshold`` of them failed.

    A count of calls, not a time window: a slow outage and a fast one trip it alike, and a run
    that makes few calls is not stopped by one bad minute.
    """

    def __init__(self, window: int, threshold: float):
        if window < 1 or not 0 < threshold <= 1:
            raise ValueError(
                f"a circuit breaker needs window >= 1 and 0 < threshold <= 1, got {window}, {threshold}"
            )
        self.window = window
        self.threshold = threshold
        self._outcomes: deque[bool] = deque(maxlen=window)
        self.reason: str | None = None
        """Why the breaker tripped; ``None`` while it is closed."""

    def record(self, failed: bool) -> None:
        self._outcomes.append(failed)
        failures = sum(self._outcomes)
        if (
            self.reason is None
            and len(self._outcomes) == self.window
            and failures >= self.threshold * self.window
        ):
            self.reason = f"{failures} of the last {self.window} model calls failed"

    def check(self) -> None:
        """Raise :class:`CircuitOpen` once the breaker has tripped."""
        if self.reason is not None:
            raise CircuitOpen(self.reason)


class BreakerBackend(CallLayer):
    """Reports each call's outcome to a :class:`CircuitBreaker` (shared by several backends) and
    refuses new calls with :class:`CircuitOpen` once it has tripped."""

    def __init__(self, inner: ChatBackend, breaker: CircuitBreaker):
        super().__init__(inner)
        self.breaker = breaker

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        self.breaker.check()
        try:
            result = await call()
        except BudgetExceeded:
            raise
        except LLMError:
            self.breaker.record(failed=True)
            raise
        self.breaker.record(failed=False)
        return result


def _to_record(result: Completion | Rating | LogProbs) -> dict[str, Any]:
    record = dataclasses.asdict(result)
    record.pop("cached")
    return record


def _completion_from(record: dict[str, Any]) -> Completion:
    return Completion(**{**record, "usage": Usage(**record["usage"]), "cached": True})


def _logprobs_from(record: dict[str, Any]) -> LogProbs:
    return LogProbs(**{**record, "usage": Usage(**record["usage"]), "cached": True})


def _rating_from(record: dict[str, Any]) -> Rating:
    distribution = record["distribution"]
    if distribution is not None:  # JSON object keys are strings
        distribution = {int(digit): p for digit, p in distribution.items()}
    return Rating(
        **{**record, "usage": Usage(**record["usage"]), "distribution": distribution, "cached": True}
    )


class CachedBackend(Layer):
    """Answers from a :class:`ResponseCache` when it can, and stores every new answer there.

    The key covers the endpoint identity, model, messages, the effective sampling parameters, the
    sample index and the kind of call (a rating also depends on its scale, on whether
    log-probabilities are asked for and on whether a reason is; a scoring call has no sampling
    parameters or sample index, only its candidates or its continuation). Errors are never stored.
    """

    def __init__(self, inner: ChatBackend, cache: ResponseCache, spec: BackendSpec):
        super().__init__(inner)
        self.cache = cache
        self.spec = spec

    def _request(self, kind: str, messages: list[Message], sample_index: int, params: dict[str, Any]) -> dict:
        return {
            "kind": kind,
            "endpoint": self.identity,
            "model": self.model_name,
            "messages": messages,
            "params": self.spec.sampling(**params),
            "sample_index": sample_index,
        }

    async def _lookup(self, request: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        key = cache_key(request)
        record = await self.cache.get(key)
        if record is None and self.cache.mode == "replay-only":
            raise CacheMiss(
                f"replay-only cache {self.cache.path} has no {request['kind']} response {key[:12]}"
            )
        return key, record

    async def _store(self, key: str, request: dict[str, Any], result: Completion | Rating | LogProbs) -> None:
        await self.cache.put(
            key,
            kind=request["kind"],
            model=result.model,
            request=request,
            response=_to_record(result),
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
        )

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        request = self._request("complete", messages, sample_index, params)
        key, record = await self._lookup(request)
        if record is not None:
            return _completion_from(record)
        result = await self.inner.complete(messages, sample_index=sample_index, **params)
        await self._store(key, request, result)
        return result

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        request = self._request("rate", messages, sample_index, params)
        request |= {
            "scale": scale,
            "logprobs": self.spec.use_logprobs,
            "reason": reason,
            "contract": CONTRACT_VERSION,
        }
        key, record = await self._lookup(request)
        if record is not None:
            return _rating_from(record)
        result = await self.inner.rate(
            messages, scale=scale, sample_index=sample_index, reason=reason, **params
        )
        await self._store(key, request, result)
        return result

    async def _scored(
        self,
        kind: str,
        messages: list[Message],
        text: list[str] | str,
        call: Callable[[], Awaitable[LogProbs]],
    ) -> LogProbs:
        request = {
            "kind": kind,
            "endpoint": self.identity,
            "model": self.model_name,
            "messages": messages,
            "text": text,
        }
        key, record = await self._lookup(request)
        if record is not None:
            return _logprobs_from(record)
        result = await call()
        await self._store(key, request, result)
        return result

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        return await self._scored(
            "next_token", messages, candidates, lambda: self.inner.next_token_logprobs(messages, candidates)
        )

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        return await self._scored(
            "continuation",
            messages,
            continuation,
            lambda: self.inner.continuation_logprob(messages, continuation),
        )

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.cache.close()
