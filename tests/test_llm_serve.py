"""The OpenAI-compatible backend against a real server: ``transformers serve`` on the tiny model."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from pipeline.launch import stop_process
from pipeline.llm import BackendSpec, CacheMiss, build_backend
from pipeline.llm.layers import LimitedBackend
from pipeline.llm.openai_backend import OpenAIBackend

USER = [{"role": "user", "content": "Is honesty important?"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of ``transformers serve`` pinned to the tiny model, stopped after the module."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        str(Path(sys.executable).with_name("transformers")),
        "serve",
        str(tiny_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with log.open("w") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"}
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(server)


def spec_for(url: str, model: Path, **fields: object) -> BackendSpec:
    return BackendSpec(kind="openai", model=str(model), base_urls=[url], max_tokens=8, timeout=60, **fields)


def test_chat_usage_and_rating_fallback(served_model: str, tiny_model_dir: Path) -> None:
    async def scenario() -> None:
        backend = build_backend(spec_for(served_model, tiny_model_dir))
        completion = await backend.complete(USER)
        assert isinstance(completion.text, str) and completion.text
        assert completion.usage.completion_tokens == 8 and completion.usage.prompt_tokens > 5
        # transformers serve ignores `logprobs`, so the rating is read from the (random) text.
        rating = await backend.rate(USER)
        assert rating.method in ("parsed", "failed") and rating.raw
        assert (rating.score is None) == (rating.method == "failed")
        usage = backend.usage()[str(tiny_model_dir)]
        assert usage.calls == 2 and usage.completion_tokens == 16
        await backend.aclose()

    asyncio.run(scenario())


def test_concurrency_limit_is_respected(served_model: str, tiny_model_dir: Path) -> None:
    in_flight = peak = 0

    async def sent(request: httpx2.Request) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)

    async def answered(response: httpx2.Response) -> None:
        nonlocal in_flight
        in_flight -= 1

    async def scenario() -> None:
        client = httpx2.AsyncClient(event_hooks={"request": [sent], "response": [answered]})
        spec = spec_for(served_model, tiny_model_dir, max_concurrency=2)
        backend = LimitedBackend(OpenAIBackend(spec, served_model, http_client=client), spec.max_concurrency)
        results = await asyncio.gather(*(backend.complete(USER, sample_index=i) for i in range(4)))
        assert len(results) == 4
        await backend.aclose()

    asyncio.run(scenario())
    assert peak == 2


def test_cache_hit_on_replay_and_replay_only_miss(
    served_model: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cache = str(tmp_path / "responses.sqlite")

    async def scenario() -> None:
        backend = build_backend(spec_for(served_model, tiny_model_dir, cache_path=cache))
        first = await backend.complete(USER)
        await backend.aclose()

        replay = build_backend(
            spec_for(served_model, tiny_model_dir, cache_path=cache, cache_mode="replay-only")
        )
        again = await replay.complete(USER)
        assert again.cached and again.text == first.text and again.usage == first.usage
        assert replay.usage() == {}  # nothing reached the server
        with pytest.raises(CacheMiss):
            await replay.complete([{"role": "user", "content": "A question never asked."}])
        await replay.aclose()

    asyncio.run(scenario())
