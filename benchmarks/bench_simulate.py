"""One sandbox round against a slow OpenAI-compatible server: ours vs the reference code's way.

    .venv/bin/python benchmarks/bench_simulate.py [--size 10] [--k 4] [--delay 0.2] [--threads 10]

A fake OpenAI-compatible server (``pipeline.llm.testing.FakeOpenAIServer``, in its own process on
127.0.0.1 so that it does not share the client's interpreter) answers every call after ``delay``
seconds. Both sides use the real ``openai`` client.

- **ours**: ``run_simulation`` runs one round of a ``size x size`` world (k partners) through
  ``build_backend`` with a concurrency limit above the round's widest step, and writes its shard
  (timed: the round itself, ``SimulationResult.seconds``; not the setup or the summary plot).
  An interaction is 4 calls deep (draft; observers + partners at once; revision; observers), so
  the round can take no less than ``4 x delay``: reported as wall / bound (goal <= 1.15).
- **ours, no HTTP** (``--no-http``): the same round against an in-process backend that only
  sleeps ``delay``: what the orchestration itself (memories, prompts, shards) adds to the bound.
- **bare client**: the round's calls in four waves straight through ``openai.AsyncOpenAI``, with
  no simulation at all: the floor the client library sets on this machine.
- **reference**: the same round's calls made as the reference code made them: ``threads`` worker
  threads, each running whole interactions with every call after the previous one (goal: ours at
  least 10x faster).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reply(body: dict) -> str:
    """Answers that depend only on the prompt; a rating when a rating is asked for."""
    digest = int(hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest(), 16)
    if "\nRating: " in body["messages"][-1]["content"]:
        return f"Rating: {digest % 7 + 1}\nReason: a short reason {digest % 997}."
    return f"Answer {digest % 100003}: be kind, honest and fair to everyone involved."


def serve(delay: float) -> None:
    """Run the fake server until stdin closes, printing its base URL first."""
    from pipeline.llm.testing import FakeOpenAIServer

    with FakeOpenAIServer(delay=delay, reply=reply) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()
        print(
            json.dumps({"requests": len(server.requests), "max_in_flight": server.max_in_flight}), flush=True
        )


def sleeping_backend(delay: float):
    """A backend with no transport at all: every call answers after ``delay``."""
    from pipeline.llm import ChatBackend, Completion, Rating

    class Sleeping(ChatBackend):
        model_name = "sleeping"

        async def complete(self, messages, *, sample_index=0, **params):
            await asyncio.sleep(delay)
            return Completion(reply({"messages": messages}), self.model_name)

        async def rate(self, messages, *, scale=7, sample_index=0, **params):
            await asyncio.sleep(delay)
            return Rating(4.0, "fine", "Rating: 4\nReason: fine", "parsed", self.model_name)

    return Sleeping()


def run_ours(
    url: str | None, size: int, k: int, concurrency: int | None = None, delay: float = 0.2
) -> tuple[float, float]:
    """Wall and CPU seconds of one round through ``run_simulation`` (``url=None``: no HTTP, see above)."""
    from pipeline.llm import BackendSpec, build_backend
    from pipeline.simulate import SimulationConfig, run_simulation

    with tempfile.TemporaryDirectory() as output:
        spec = BackendSpec(
            kind="openai",
            model="fake",
            base_urls=[url or "http://unused"],
            max_concurrency=concurrency or (k + 2) * size * size,
            cache_mode="off",
        )
        config = SimulationConfig(
            output=output, size=size, rounds=1, k=k, agent=spec, flush_every=size * size
        )
        backend = build_backend(spec) if url else sleeping_backend(delay)
        result = run_simulation(config, backends=(backend, backend), progress=False)
        return result.seconds, result.cpu_seconds


def run_client_floor(url: str, size: int, k: int) -> float:
    """The round's calls in four waves straight through ``openai.AsyncOpenAI``: the client's own floor."""
    import openai

    from pipeline import prompts

    messages = prompts.observer_messages("alignment", "Is it fair?", "Yes, it is fair to everyone.")
    agents = size * size

    async def waves() -> float:
        client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0)
        started = time.perf_counter()
        for wave in (agents, (k + 2) * agents, agents, 2 * agents):
            await asyncio.gather(
                *(client.chat.completions.create(model="fake", messages=messages) for _ in range(wave))
            )
        seconds = time.perf_counter() - started
        await client.close()
        return seconds

    return asyncio.run(waves())


def run_reference(url: str, size: int, k: int, threads: int) -> float:
    """The reference code's call pattern: worker threads, each interaction's calls in sequence."""
    import openai

    from pipeline import prompts
    from pipeline.questions import load_prior, load_questions
    from pipeline.records import ASPECTS
    from pipeline.simulate import SimulationConfig

    world = SimulationConfig(size=size, k=k).worlds[0]
    questions, prior = load_questions(), load_prior()
    client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0)

    def ask(messages: list) -> str:
        response = client.chat.completions.create(
            model="fake", messages=messages, max_tokens=256, temperature=0
        )
        return response.choices[0].message.content

    def interaction(agent: int) -> None:
        question = questions[world.question_index(0, agent, len(questions))]
        conversation = prompts.draft_messages(question, prior["good"][:3])
        draft = ask(conversation)
        for aspect in ASPECTS:
            ask(prompts.observer_messages(aspect, question, draft))
        feedback = []
        for partner in world.partners(agent, 0, k):
            text = ask(prompts.neighbour_rating_messages(question, draft, prior["good"][partner % 3 :][:3]))
            feedback.append((None, text))
        revision = ask(prompts.revision_messages(conversation, draft, feedback))
        for aspect in ASPECTS:
            ask(prompts.observer_messages(aspect, question, revision))

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(interaction, range(world.num_agents)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=10, help="reference worker threads")
    parser.add_argument(
        "--concurrency", type=int, help="calls in flight (default: the widest step, (k+2) x agents)"
    )
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--no-http", action="store_true", help="also time the round without HTTP")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.delay)
        return

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--delay", str(args.delay)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().strip()
        calls = (args.k + 6) * args.size**2
        bound = 4 * args.delay
        ours, cpu = run_ours(url, args.size, args.k, args.concurrency)
        print(
            f"{args.size}x{args.size} world, k={args.k}, {calls} calls, server delay {args.delay * 1000:.0f} ms"
        )
        print(
            f"ours:      {ours:7.2f} s   critical-path bound {bound:.2f} s   ratio {ours / bound:.2f} (goal <= 1.15)"
            f"   client CPU {cpu:.2f} s"
        )
        floor = run_client_floor(url, args.size, args.k)
        print(f"bare openai client, same calls in 4 waves: {floor:.2f} s   ratio {floor / bound:.2f}")
        if args.no_http:
            bare, _ = run_ours(None, args.size, args.k, delay=args.delay)
            print(f"ours, no HTTP: {bare:5.2f} s   ratio {bare / bound:.2f}")
        if not args.skip_reference:
            reference = run_reference(url, args.size, args.k, args.threads)
            print(
                f"reference: {reference:7.2f} s   ({args.threads} threads, calls in sequence)   "
                f"ours is {reference / ours:.1f}x faster (goal >= 10x)"
            )
    finally:
        server.stdin.close()
        print(f"server: {server.stdout.readline().strip()}")
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
