"""Several endpoints serving the same model, used as one backend.

Each call goes to the endpoint with the fewest calls in flight. An endpoint whose calls fail
``max_failures`` times in a row is taken out for ``cooldown`` seconds while the others carry on;
when every endpoint is cooling down, calls fail at once with :class:`EndpointsUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.llm.base import ChatBackend, Completion, LLMError, LogProbs, Message, Rating

T = TypeVar("T")


class EndpointsUnavailable(LLMError):
    """Every endpoint of a pool is cooling down after repeated failures."""


@dataclass
class _Endpoint:
    backend: ChatBackend
    in_flight: int = 0
    calls: int = 0
    failures_in_a_row: int = 0
    down_until: float = 0.0


class EndpointPool(ChatBackend):
    """Routes each call to the least busy healthy endpoint."""

    def __init__(self, endpoints: Sequence[ChatBackend], *, max_failures: int = 3, cooldown: float = 30.0):
        if not endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self._endpoints = [_Endpoint(backend) for backend in endpoints]
        self.model_name = endpoints[0].model_name
        self.max_failures = max_failures
        self.cooldown = cooldown

    @property
    def identity(self) -> str:
        return " | ".join(sorted(endpoint.backend.identity for endpoint in self._endpoints))  # type: ignore[attr-defined]

    def _pick(self) -> _Endpoint:
        now = time.monotonic()
        healthy = [endpoint for endpoint in self._endpoints if endpoint.down_until <= now]
        if not healthy:
            raise EndpointsUnavailable(
                f"all {len(self._endpoints)} endpoints are cooling down after {self.max_failures} failures in a row"
            )
        # Ties go to the endpoint used least, so an idle pool still spreads its calls.
        return min(healthy, key=lambda endpoint: (endpoint.in_flight, endpoint.calls))

    async def _route(self, call: Callable[[ChatBackend], Awaitable[T]]) -> T:
        endpoint = self._pick()
        endpoint.in_flight += 1
        endpoint.calls += 1
        try:
            result = await call(endpoint.backend)
        except LLMError:
            endpoint.failures_in_a_row += 1
            if endpoint.failures_in_a_row >= self.max_failures:
                endpoint.down_until = time.monotonic() + self.cooldown
                endpoint.failures_in_a_row = 0
            raise
        finally:
            endpoint.in_flight -= 1
        endpoint.failures_in_a_row = 0
        return result

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        return await self._route(
            lambda backend: backend.complete(messages, sample_index=sample_index, **params)
        )

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        return await self._route(
            lambda backend: backend.rate(
                messages, scale=scale, sample_index=sample_index, reason=reason, **params
            )
        )

    @property
    def scoring_model(self) -> str | None:
        """The endpoints' scoring model when they all share one, else ``None``."""
        models = {endpoint.backend.scoring_model for endpoint in self._endpoints}
        return models.pop() if len(models) == 1 else None

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        return await self._route(lambda backend: backend.next_token_logprobs(messages, candidates))

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        return await self._route(lambda backend: backend.continuation_logprob(messages, continuation))

    async def aclose(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.backend.aclose()
