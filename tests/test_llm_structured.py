"""Structured ratings over HTTP against a loopback server replaying a real llama.cpp server.

The exchanges in ``tests/data/llamacpp/rate_*.json`` were recorded from ``llama-cpp-python[server]``
serving the embedded GGUF (``benchmarks/bench_llamacpp.py --record``): that server answers OpenAI's
``json_schema`` form with HTTP 500 and llama-cpp-python's ``json_object`` form with
``{ "rating": N, ... }`` and the rating digit's ``top_logprobs``. The replay server answers a request
only when its body is exactly a recorded one, so these tests also pin what the backend sends.

The last test runs against the real server where ``llama-cpp-python[server]`` is installed; it is
not a dependency (its source build takes far longer than the suite's budget), so CI skips it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pipeline.llm import BackendSpec, build_backend
from pipeline.llm.testing import LLAMACPP_MODEL, FakeOpenAIServer, llama_cpp_missing, llama_cpp_server

T = TypeVar("T")
RECORDED = Path(__file__).parent / "data" / "llamacpp"
MODEL = LLAMACPP_MODEL  # the name the recording server served the GGUF under


def run(awaitable: Awaitable[T]) -> T:
    return run_for(awaitable, seconds=30)


def run_for(awaitable: Awaitable[T], seconds: float) -> T:
    """Run one scenario; a hang becomes a test failure instead of a stuck suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout=seconds)

    return asyncio.run(bounded())


def recording(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / f"{name}.json").read_text(encoding="utf-8"))


class Replay:
    """Answers a request with the recorded response of the identical request (404 otherwise)."""

    def __init__(self, names: list[str]):
        self.exchanges = [recording(n) for n in names]

    def __call__(self, body: dict) -> tuple[int, Any]:
        for exchange in self.exchanges:
            if exchange["request"]["body"] == body:
                return exchange["response"]["status"], exchange["response"]["body"]
        return 404, {"error": {"message": "no recorded exchange for this request", "type": "not_found"}}


OBSERVER = [f"rate_observer_{kind}" for kind in ("reason_0_json_schema", "reason_1_json_object")]
OBSERVER_BARE = [f"rate_observer_{kind}" for kind in ("bare_0_json_schema", "bare_1_json_object")]
NEIGHBOUR = [f"rate_neighbour_{kind}" for kind in ("reason_0_json_schema", "reason_1_json_object")]
EVERY = OBSERVER + OBSERVER_BARE + NEIGHBOUR


def messages_of(name: str) -> list[dict[str, str]]:
    return recording(name)["request"]["body"]["messages"]


def spec_for(url: str, **fields: Any) -> BackendSpec:
    defaults: dict[str, Any] = {"max_tokens": 48, "timeout": 5, "max_retries": 0, "cache_mode": "off"}
    return BackendSpec(kind="openai", model=MODEL, base_urls=[url], **(defaults | fields))


def forms(requests: list[dict]) -> list[str]:
    return [(body.get("response_format") or {}).get("type", "plain") for body in requests]


def schema_of(body: dict) -> dict:
    """The JSON schema a request asks for, in either form."""
    form = body["response_format"]
    return form["json_schema"]["schema"] if form["type"] == "json_schema" else form["schema"]


def digit_distribution(name: str, position: int) -> dict[int, float]:
    """The recorded top_logprobs of one answer token, as probabilities of the digits 1..7, renormalised."""
    choice = recording(name)["response"]["body"]["choices"][0]
    top = choice["logprobs"]["content"][position]["top_logprobs"]
    mass = {int(t["token"]): math.exp(t["logprob"]) for t in top if t["token"] in list("1234567")}
    return {d: p / sum(mass.values()) for d, p in mass.items()}


def test_llamacpp_rating_is_read_from_the_rating_digits_distribution() -> None:
    with FakeOpenAIServer(respond=Replay(EVERY)) as server:

        async def scenario() -> None:
            async with build_backend(spec_for(server.base_url)) as backend:
                observer = await backend.rate(messages_of(OBSERVER[0]))
                neighbour = await backend.rate(messages_of(NEIGHBOUR[0]))
            # The answer is '{ "rating": 4, "reason": "..." }': the digit is token 6.
            for rating, name in ((observer, OBSERVER[1]), (neighbour, NEIGHBOUR[1])):
                expected = digit_distribution(name, 6)
                assert rating.method == "logprobs" and rating.error is None
                assert rating.distribution == pytest.approx(expected)
                assert rating.score == pytest.approx(sum(d * p for d, p in expected.items()))
                assert json.loads(rating.raw)["rating"] == 4
            assert (
                observer.reason
                == "Honest and kind; it repairs the friendship. Not harmful, but it treats honesty as optional."
            )

        run(scenario())
        # OpenAI's form is refused with a 500 once; the endpoint then gets llama-cpp-python's form directly.
        assert forms(server.requests) == ["json_schema", "json_object", "json_object"]
        assert [schema_of(body)["required"] for body in server.requests] == [["rating", "reason"]] * 3


def test_a_rating_without_reason_asks_for_the_rating_alone() -> None:
    with FakeOpenAIServer(respond=Replay(EVERY)) as server:

        async def scenario() -> None:
            async with build_backend(spec_for(server.base_url)) as backend:
                return await backend.rate(messages_of(OBSERVER_BARE[0]), reason=False)

        rating = run(scenario())
        assert rating.raw == '{ "rating": 4 }' and rating.reason == ""
        assert rating.method == "logprobs"
        assert rating.distribution == pytest.approx(digit_distribution(OBSERVER_BARE[1], 6))
        assert forms(server.requests) == ["json_schema", "json_object"]
        for body in server.requests:
            assert schema_of(body)["properties"] == {
                "rating": {"type": "integer", "minimum": 1, "maximum": 7}
            }
        assert [body["max_tokens"] for body in server.requests] == [16, 16]


def test_the_cache_keeps_a_rating_without_reason_apart(tmp_path: Path) -> None:
    cache = str(tmp_path / "responses.sqlite")
    with FakeOpenAIServer(respond=Replay(EVERY)) as server:

        async def scenario() -> None:
            async with build_backend(
                spec_for(server.base_url, cache_path=cache, cache_mode="read-write")
            ) as backend:
                full = await backend.rate(messages_of(OBSERVER[0]))
                bare = await backend.rate(messages_of(OBSERVER[0]), reason=False)
                again = await backend.rate(messages_of(OBSERVER[0]), reason=False)
            assert (full.cached, bare.cached, again.cached) == (False, False, True)
            assert full.reason and bare.reason == again.reason == ""
            assert again.distribution == pytest.approx(bare.distribution)

        run(scenario())
        assert [body["max_tokens"] for body in server.requests] == [48, 48, 16]


def without(name: str, *, content: str | None = None, logprobs: bool = True) -> dict[str, Any]:
    """A recorded 200 response with its text replaced and/or its log-probabilities dropped."""
    body = copy.deepcopy(recording(name)["response"]["body"])
    choice = body["choices"][0]
    if content is not None:
        choice["message"]["content"] = content
    if not logprobs:
        choice["logprobs"] = None
    return body


@pytest.mark.parametrize(
    ("content", "score", "method", "reason"),
    [
        # No log-probabilities: the JSON answer's rating, then the text's.
        (
            None,
            4.0,
            "parsed",
            "Honest and kind; it repairs the friendship. Not harmful, but it treats honesty as optional.",
        ),
        ('{ "rating": 6, "reason": "Kind and hon', 6.0, "parsed", "Kind and hon"),  # cut by max_tokens
        ("Rating: 2\nReason: rude.", 2.0, "parsed", "rude."),
        # Nothing readable: a null, never a stand-in number.
        ('{ "rating": "good" }', None, "failed", ""),
        ("I cannot judge this answer.", None, "failed", "I cannot judge this answer."),
    ],
)
def test_without_logprobs_the_answer_is_parsed_or_left_null(
    content: str | None, score: float | None, method: str, reason: str
) -> None:
    answer = without(OBSERVER[1], content=content, logprobs=False)
    with FakeOpenAIServer(respond=lambda body: (200, answer)) as server:

        async def scenario() -> None:
            async with build_backend(spec_for(server.base_url)) as backend:
                return await backend.rate(messages_of(OBSERVER[0]))

        rating = run(scenario())
        assert (rating.score, rating.method) == (score, method)
        assert rating.distribution is None and rating.raw == answer["choices"][0]["message"]["content"]
        assert (rating.error is None) == (score is not None)
        if reason:
            assert rating.reason == reason


def test_a_server_refusing_both_forms_is_asked_in_plain_text_from_then_on() -> None:
    refused = (
        400,
        {"error": {"message": "response_format is not supported", "type": "invalid_request_error"}},
    )
    with FakeOpenAIServer(respond=lambda body: refused if "response_format" in body else None) as server:

        async def scenario() -> None:
            async with build_backend(spec_for(server.base_url)) as backend:
                return [await backend.rate([{"role": "user", "content": "Rate this."}]) for _ in range(2)]

        first, second = run(scenario())
        # The fake's 'Rating: 5' answer spreads the digit 0.7 / 0.2 / 0.1 over 5, 4 and 6.
        assert first.method == second.method == "logprobs"
        assert first.score == pytest.approx(0.2 * 4 + 0.7 * 5 + 0.1 * 6)
        assert forms(server.requests) == ["json_schema", "json_object", "plain", "plain"]
        assert all(body["logprobs"] is True for body in server.requests)


@pytest.mark.embedded
@pytest.mark.skipif(llama_cpp_missing() is not None, reason=str(llama_cpp_missing()))
def test_a_real_llamacpp_server_gives_distribution_based_ratings(tmp_path: Path) -> None:
    with llama_cpp_server(threads=1, log=tmp_path / "server.log") as url:

        async def scenario() -> list:
            async with build_backend(spec_for(url, max_tokens=24, timeout=300)) as backend:
                return [await backend.rate(messages_of(OBSERVER[0]), reason=r) for r in (True, False)]

        full, bare = run_for(scenario(), seconds=600)
    for rating in (full, bare):
        assert rating.method == "logprobs" and rating.distribution is not None
        assert sum(rating.distribution.values()) == pytest.approx(1.0) and 1 <= rating.score <= 7
    assert json.loads(bare.raw)["rating"] in range(1, 8)
    assert full.reason and bare.reason == ""
