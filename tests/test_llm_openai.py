"""The OpenAI-compatible backend, limits, budget, cache, pool, retries, circuit breaker and preflight
against the loopback fake server, on both HTTP transports where they differ (aiohttp and httpx raise
different exception types underneath the client)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from pipeline.embedded import EmbeddedModelMissing
from pipeline.errors import BackendLoadError
from pipeline.llm import BackendSpec, BudgetExceeded, CacheMiss, LLMError, build_backend
from pipeline.llm.base import CircuitOpen, TransientError
from pipeline.llm.factory import build_model, check_endpoints
from pipeline.llm.layers import CircuitBreaker
from pipeline.llm.pool import EndpointsUnavailable
from pipeline.llm.testing import NONSENSE_REPLY, FakeOpenAIServer, FaultSchedule

T = TypeVar("T")
USER = [{"role": "user", "content": "Is honesty important?"}]
TRANSPORTS = ["aiohttp", "httpx"]


def run(awaitable: Awaitable[T]) -> T:
    """Run one scenario; a hang becomes a test failure instead of a stuck suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout=30)

    return asyncio.run(bounded())


def spec_for(*urls: str, **fields: object) -> BackendSpec:
    defaults: dict = {"timeout": 0.5, "max_retries": 1}
    return BackendSpec(kind="openai", model="fake", base_urls=list(urls), **(defaults | fields))


async def complete_then_close(spec: BackendSpec, n: int = 1) -> list:
    backend = build_backend(spec)
    try:
        return await asyncio.gather(*(backend.complete(USER, sample_index=i) for i in range(n)))
    finally:
        await backend.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chat_usage_and_logprob_rating(transport: str) -> None:
    with FakeOpenAIServer() as server:

        async def scenario() -> None:
            backend = build_backend(spec_for(server.base_url, transport=transport))
            completion = await backend.complete(USER)
            rating = await backend.rate(USER, scale=7)
            assert completion.text.startswith("Rating: 5")
            assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
            assert completion.response is not None and completion.response["object"] == "chat.completion"
            # The fake spreads each digit's probability 0.7 / 0.2 / 0.1 over it and its neighbours.
            assert rating.method == "logprobs"
            assert rating.distribution is not None and sum(rating.distribution.values()) == pytest.approx(1.0)
            assert rating.score == pytest.approx(0.2 * 4 + 0.7 * 5 + 0.1 * 6)
            assert rating.reason == "This is a fixed reply from the fake server."
            assert backend.usage()["fake"].calls == 2
            await backend.aclose()

        run(scenario())
        assert "logprobs" not in server.requests[0] and server.requests[1]["logprobs"] is True


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", ["500", "429", "hang", "empty", "non-json"])
def test_faults_end_in_a_typed_error(fault: str, transport: str) -> None:
    with FakeOpenAIServer(fault=fault) as server:
        with pytest.raises(LLMError) as caught:
            run(complete_then_close(spec_for(server.base_url, transport=transport)))
        assert not isinstance(caught.value, BudgetExceeded | CacheMiss)
        # Retried once as configured: by the openai client, or (a 200 it cannot read) by our layer.
        assert len(server.requests) == 2
        assert isinstance(caught.value, TransientError) == (fault in ("empty", "non-json"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreadable_answers_are_retried_until_one_reads(transport: str) -> None:
    schedule = FaultSchedule(burst=(0, 3), burst_fault="empty")  # requests 0-2: 200 with no body
    with FakeOpenAIServer(schedule=schedule) as server:
        [completion] = run(complete_then_close(spec_for(server.base_url, transport=transport, max_retries=3)))
        assert completion.text.startswith("Rating: 5")
        assert server.faults == ["empty"] * 3 + [None]


def test_429_retry_after_is_honoured() -> None:
    with FakeOpenAIServer(fault="429") as server:
        started = time.monotonic()
        with pytest.raises(LLMError, match="429"):
            run(complete_then_close(spec_for(server.base_url, max_retries=2)))
        assert len(server.requests) == 3
        assert time.monotonic() - started >= 2 * 0.1  # Retry-After: 0.1 before each retry


def test_nonsense_rating_is_none_with_raw_text() -> None:
    with FakeOpenAIServer(fault="nonsense") as server:

        async def scenario() -> None:
            backend = build_backend(spec_for(server.base_url))
            rating = await backend.rate(USER)
            assert rating.score is None and rating.method == "failed"
            assert rating.raw == NONSENSE_REPLY and rating.error
            await backend.aclose()

        run(scenario())


def test_concurrency_limit_and_no_serialisation() -> None:
    with FakeOpenAIServer(delay=0.2) as server:
        run(complete_then_close(spec_for(server.base_url, max_concurrency=3, timeout=5), n=12))
        assert server.max_in_flight == 3
    with FakeOpenAIServer(delay=1.0) as server:
        run(complete_then_close(spec_for(server.base_url, max_concurrency=200, timeout=10), n=200))
        assert server.max_in_flight > 100  # the server and the client keep hundreds in flight


def test_requests_per_minute_spaces_call_starts() -> None:
    with FakeOpenAIServer() as server:
        started = time.monotonic()
        run(complete_then_close(spec_for(server.base_url, requests_per_minute=600), n=4))
        assert time.monotonic() - started >= 3 * 0.1


def test_budget_stops_new_calls_and_keeps_finished_work() -> None:
    with FakeOpenAIServer() as server:

        async def scenario() -> None:
            backend = build_backend(spec_for(server.base_url, call_budget=3))
            done = [await backend.complete(USER, sample_index=i) for i in range(3)]
            with pytest.raises(BudgetExceeded, match="call budget"):
                await backend.complete(USER, sample_index=3)
            assert len(done) == 3 and backend.usage()["fake"].calls == 3
            await backend.aclose()

            backend = build_backend(spec_for(server.base_url, token_budget=1))
            await backend.complete(USER)
            with pytest.raises(BudgetExceeded, match="token budget"):
                await backend.rate(USER)
            await backend.aclose()

        run(scenario())
        assert len(server.requests) == 4


def test_cache_hits_cost_nothing_and_replay_exactly(tmp_path: Path) -> None:
    cache = str(tmp_path / "responses.sqlite")
    with FakeOpenAIServer(
        reply=lambda body: f"answer {len(body['messages'])} t={body['temperature']}"
    ) as server:

        async def scenario() -> None:
            backend = build_backend(spec_for(server.base_url, cache_path=cache))
            first = await backend.complete(USER)
            again = await backend.complete(USER)
            other_sample = await backend.complete(USER, sample_index=1)
            hotter = await backend.complete(USER, temperature=0.7)
            rating = await backend.rate(USER)
            assert [r.cached for r in (first, again, other_sample, hotter)] == [False, True, False, False]
            assert again.text == first.text and again.usage == first.usage
            assert hotter.text.endswith("t=0.7")
            assert backend.usage()["fake"].calls == 4  # the hit was free
            await backend.aclose()

            replay = build_backend(spec_for(server.base_url, cache_path=cache, cache_mode="replay-only"))
            assert (await replay.complete(USER)).text == first.text
            replayed = await replay.rate(USER)
            assert replayed.cached and replayed.distribution == rating.distribution
            with pytest.raises(CacheMiss):
                await replay.complete(USER, sample_index=2)
            await replay.aclose()

        run(scenario())
        assert len(server.requests) == 4


def test_missing_api_key_uses_a_placeholder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with FakeOpenAIServer() as server:
        [completion] = run(complete_then_close(spec_for(server.base_url, api_key_env="NO_SUCH_KEY_VAR")))
        assert completion.text
        assert [headers["authorization"] for headers in server.headers] == ["Bearer EMPTY"]
    monkeypatch.setenv("SOME_KEY_VAR", "sk-test-123")
    with FakeOpenAIServer() as server:
        run(complete_then_close(spec_for(server.base_url, api_key_env="SOME_KEY_VAR")))
        assert [headers["authorization"] for headers in server.headers] == ["Bearer sk-test-123"]


def test_pool_routes_to_the_least_busy_endpoint() -> None:
    with FakeOpenAIServer(delay=0.2) as a, FakeOpenAIServer(delay=0.2) as b:
        run(complete_then_close(spec_for(a.base_url, b.base_url, timeout=5), n=10))
        assert len(a.requests) == len(b.requests) == 5
        assert a.max_in_flight > 1 and b.max_in_flight > 1


def test_pool_cools_down_a_failing_endpoint() -> None:
    with FakeOpenAIServer(fault="500") as bad, FakeOpenAIServer() as good:

        async def scenario() -> None:
            spec = spec_for(bad.base_url, good.base_url, max_retries=0, pool_max_failures=2, pool_cooldown=60)
            backend = build_backend(spec)
            outcomes = []
            for i in range(10):
                try:
                    outcomes.append((await backend.complete(USER, sample_index=i)).text)
                except LLMError:
                    outcomes.append(None)
            await backend.aclose()
            assert outcomes.count(None) == 2  # the bad endpoint failed twice, then was taken out
            assert len(bad.requests) == 2 and len(good.requests) == 8

        run(scenario())


def test_pool_with_every_endpoint_down_fails_fast() -> None:
    with FakeOpenAIServer(fault="500") as a, FakeOpenAIServer(fault="500") as b:

        async def scenario() -> None:
            spec = spec_for(a.base_url, b.base_url, max_retries=0, pool_max_failures=1, pool_cooldown=60)
            backend = build_backend(spec)
            for _ in range(2):
                with pytest.raises(LLMError):
                    await backend.complete(USER)
            with pytest.raises(EndpointsUnavailable):
                await backend.complete(USER)
            await backend.aclose()

        run(scenario())
        assert len(a.requests) + len(b.requests) == 2


def test_every_backend_start_failure_is_a_backend_load_error(tmp_path: Path) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{not json")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        (BackendSpec(kind="local", model=str(not_a_model)), "cannot load model", OSError),
        (BackendSpec(kind="local"), "needs a model folder", None),
        (BackendSpec(kind="nonsense"), "unknown backend kind", None),  # type: ignore[arg-type]
        (BackendSpec(kind="openai"), "needs spec.model", ValueError),
        (spec_for("http://127.0.0.1:9/v1", max_concurrency=0), "max_concurrency", ValueError),
        (spec_for("http://127.0.0.1:9/v1", cache_mode="replay-only"), "needs a cache_path", None),
        (spec_for("http://127.0.0.1:9/v1", cache_path=str(blocker / "c.sqlite")), "cannot open", OSError),
    ]
    for spec, message, cause in cases:
        with pytest.raises(BackendLoadError, match=message) as caught:
            build_backend(spec)
        if cause is None:
            assert caught.value.__cause__ is None
        else:
            assert isinstance(caught.value.__cause__, cause) and not isinstance(
                caught.value.__cause__, BackendLoadError
            )
    assert issubclass(EmbeddedModelMissing, BackendLoadError)


def _closed_port_url() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_preflight_names_an_unreachable_or_misconfigured_endpoint(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RIGHT_KEY_VAR", "sk-right-0123")
    monkeypatch.setenv("WRONG_KEY_VAR", "sk-wrong-4567")
    with FakeOpenAIServer(api_key="sk-right-0123", models=["fake", "judge"]) as server:
        good = spec_for(server.base_url, transport=transport, api_key_env="RIGHT_KEY_VAR")
        run(check_endpoints(good))
        closed = _closed_port_url()
        cases = [
            (dataclasses.replace(good, base_urls=[server.base_url, closed]), f"cannot reach {closed}: "),
            (dataclasses.replace(good, api_key_env="WRONG_KEY_VAR"), "refused the API key (HTTP 401"),
            (
                dataclasses.replace(good, model="gpt-9"),
                "does not serve model 'gpt-9' (it serves: fake, judge)",
            ),
        ]
        for spec, message in cases:
            with pytest.raises(BackendLoadError, match=re.escape(message)) as caught:
                run(check_endpoints(spec))
            assert "sk-" not in str(caught.value) and "\n" not in str(caught.value)
        # Replay-only makes no calls, so it checks nothing either.
        run(check_endpoints(dataclasses.replace(good, base_urls=[closed], cache_mode="replay-only")))
        assert server.model_lists == 4 and not server.requests
    # The same refusal on a chat request is an error of that call.
    with FakeOpenAIServer(models=["fake"]) as server, pytest.raises(LLMError, match="does not exist"):
        run(
            complete_then_close(
                dataclasses.replace(spec_for(server.base_url, transport=transport), model="gpt-9")
            )
        )


def test_circuit_breaker_trips_on_the_share_of_failed_calls_and_refuses_new_ones() -> None:
    with FakeOpenAIServer(schedule=FaultSchedule(burst=(2, 100))) as server:

        async def scenario() -> None:
            breaker = CircuitBreaker(window=4, threshold=0.5)
            backend = build_model(spec_for(server.base_url, max_retries=0), breaker=breaker)
            outcomes = []
            for i in range(6):
                try:
                    await backend.complete(USER, sample_index=i)
                    outcomes.append("ok")
                except CircuitOpen as exc:
                    outcomes.append(str(exc))
                except LLMError:
                    outcomes.append("failed")
            await backend.aclose()
            assert outcomes[:4] == ["ok", "ok", "failed", "failed"]
            assert outcomes[4:] == ["2 of the last 4 model calls failed"] * 2

        run(scenario())
        assert len(server.requests) == 4  # nothing reached the server once it tripped
