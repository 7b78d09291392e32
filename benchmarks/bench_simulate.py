"""One sandbox round against a slow OpenAI-compatible server: ours vs the bare client vs the reference code's way.

    .venv/bin/python benchmarks/bench_simulate.py [--size 10] [--k 4] [--delay 0.2] [--threads 10]
        [--transports aiohttp httpx] [--repeat 3]

A fake OpenAI-compatible server (``pipeline.llm.testing.FakeOpenAIServer``, in its own process on
127.0.0.1 so that it does not share the client's interpreter) answers every call after ``delay``
seconds. Every side uses the real ``openai`` client; ours and the bare client run once per HTTP
transport (aiohttp, httpx), each on the same transport.

- **ours**: ``run_simulation`` runs one round of a ``size x size`` world (k partners) the way
  ``sandbox simulate`` does (preflight, circuit breaker, retries; no cache), with a concurrency
  limit above the round's widest step, and writes its shard (timed: the round itself,
  ``SimulationResult.seconds``; not the setup or the summary plot). An interaction is 4 calls deep
  (draft; observers + partners at once; revision; observers), so the round can take no less than
  ``4 x delay``: the critical-path bound.
- **bare client**: the round's calls in four waves straight through ``openai.AsyncOpenAI`` on the
  same transport (ratings asking for log-probabilities, as ours do), with no simulation at all:
  the floor the client library sets on this machine.
  Goal: ours <= 1.15 x the bare client.
  Ours sends them with ``client.post`` (the client's documented low-level call, skipping
  ``create``'s transform of the params), so the bare client is also timed that way.
- **client CPU per call**: this process's CPU time over the run divided by the calls, for both.
- **ours, no HTTP** (``--no-http``): the same round against an in-process backend that only
  sleeps ``delay``: what the orchestration itself (memories, prompts, shards) adds to the bound.
- **reference**: the same round's calls made as the reference code made them: ``threads`` worker
  threads, each running whole interactions with every call after the previous one (goal: ours at
  least 10x faster).

``--faults 0.1 0.3``: one round per rate and transport with every default setting (the client's
retries and 60 s timeout, ours, the interaction retries, the breaker) against a server that gives
that share of requests a fault of any kind: the share of interactions failed (goals: <= 1% at 10%,
<= 5% at 30%).

Each timing is the best of ``--repeat`` runs (the machine may be shared: the minimum is the least
disturbed one).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
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


def serve(delay: float, fault_rate: float = 0.0) -> None:
    """Run the fake server until stdin closes, printing its base URL first; ``fault_rate`` of the
    requests get a fault of any kind (seeded)."""
    from pipeline.llm.testing import FakeOpenAIServer, FaultSchedule

    schedule = FaultSchedule(rate=fault_rate) if fault_rate else None
    with FakeOpenAIServer(delay=delay, reply=reply, schedule=schedule) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()
        print(
            json.dumps({"requests": len(server.requests), "max_in_flight": server.max_in_flight}), flush=True
        )


def sleeping_backend(delay: float, log: list | None = None):
    """A backend with no transport at all: every call answers after ``delay`` with what the fake
    server would say; ``log`` collects ``(messages, is_rating)`` of every call."""
    from pipeline.llm import ChatBackend, Completion
    from pipeline.llm.ratings import rating_from_text

    class Sleeping(ChatBackend):
        model_name = "sleeping"

        async def complete(self, messages, *, sample_index=0, **params):
            if log is not None:
                log.append((messages, False))
            await asyncio.sleep(delay)
            return Completion(reply({"messages": messages}), self.model_name)

        async def rate(self, messages, *, scale=7, sample_index=0, **params):
            if log is not None:
                log.append((messages, True))
            await asyncio.sleep(delay)
            return rating_from_text(reply({"messages": messages}), scale=scale, model=self.model_name)

    return Sleeping()


def round_waves(size: int, k: int) -> list[list[tuple[list, bool]]]:
    """The requests of one round, as four waves (drafts; ratings; revisions; ratings): recorded
    from the round itself, so the bare client sends the very messages ours does."""
    from pipeline.simulate import SimulationConfig, run_simulation

    log: list[tuple[list, bool]] = []
    with tempfile.TemporaryDirectory() as output:
        config = SimulationConfig(output=output, size=size, rounds=1, k=k, flush_every=size * size)
        run_simulation(config, backends=(sleeping_backend(0.05, log),) * 2, progress=False)
    agents = size * size
    bounds = [0, agents, agents + (k + 2) * agents, 2 * agents + (k + 2) * agents, len(log)]
    return [log[a:b] for a, b in itertools.pairwise(bounds)]


def run_ours(
    url: str | None,
    size: int,
    k: int,
    concurrency: int | None = None,
    delay: float = 0.2,
    transport: str = "aiohttp",
) -> tuple[float, float]:
    """Wall and CPU seconds of one round through ``run_simulation`` (``url=None``: no HTTP, see above)."""
    from pipeline.llm import BackendSpec
    from pipeline.simulate import SimulationConfig, run_simulation

    with tempfile.TemporaryDirectory() as output:
        spec = BackendSpec(
            kind="openai",
            model="fake",
            base_urls=[url or "http://unused"],
            max_concurrency=concurrency or (k + 2) * size * size,
            cache_mode="off",
            transport=transport,
        )
        config = SimulationConfig(
            output=output, size=size, rounds=1, k=k, agent=spec, flush_every=size * size
        )
        backends = None if url else (sleeping_backend(delay),) * 2
        result = run_simulation(config, backends=backends, progress=False)
        return result.seconds, result.cpu_seconds


def start_server(delay: float, fault_rate: float = 0.0) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--delay", str(delay), "--fault-rate", str(fault_rate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return server, server.stdout.readline().strip()


def stop_server(server: subprocess.Popen) -> str:
    server.stdin.close()
    stats = server.stdout.readline().strip()
    server.wait(timeout=120)
    return stats


def run_faulty(url: str, size: int, k: int, transport: str) -> tuple[float, int, int]:
    """One round with every default setting (retries, timeouts, breaker) against a faulty server:
    wall seconds, interactions, failed interactions."""
    from pipeline.llm import BackendSpec
    from pipeline.simulate import SimulationConfig, run_simulation

    with tempfile.TemporaryDirectory() as output:
        spec = BackendSpec(
            model="fake", base_urls=[url], max_concurrency=(k + 2) * size * size, transport=transport
        )
        config = SimulationConfig(output=output, size=size, rounds=1, k=k, agent=spec)
        result = run_simulation(config, progress=False)
        return result.seconds, result.interactions, result.failed


def run_client_floor(
    url: str, waves_: list, transport: str = "aiohttp", low_level: bool = False
) -> tuple[float, float]:
    """Wall and CPU seconds of the round's requests (:func:`round_waves`) in their four waves
    straight through ``openai.AsyncOpenAI`` on ``transport``: the client's own floor, with
    ``chat.completions.create`` or (``low_level``) ``client.post``, the call ours makes."""
    import openai
    from openai.types.chat import ChatCompletion

    from pipeline.llm.openai_backend import TOP_LOGPROBS

    sampling = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0}
    rating = {"logprobs": True, "top_logprobs": TOP_LOGPROBS}

    async def waves() -> tuple[float, float]:
        http_client = openai.DefaultAioHttpClient() if transport == "aiohttp" else None
        client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", http_client=http_client)
        started, cpu = time.perf_counter(), time.process_time()
        for wave in waves_:
            bodies = [
                {"model": "fake", "messages": messages, **sampling, **(rating if is_rating else {})}
                for messages, is_rating in wave
            ]
            if low_level:
                calls = [client.post("/chat/completions", cast_to=ChatCompletion, body=b) for b in bodies]
            else:
                calls = [client.chat.completions.create(**body) for body in bodies]
            await asyncio.gather(*calls)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        await client.close()
        return seconds, cpu

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
        revision = ask(prompts.revision_messages(question, draft, feedback))
        for aspect in ASPECTS:
            ask(prompts.observer_messages(aspect, question, revision))

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(interaction, range(world.num_agents)))
    return time.perf_counter() - started


def best(repeat: int, measure) -> tuple[float, float]:
    """The (wall, cpu) of the fastest of ``repeat`` runs of ``measure()``."""
    return min((measure() for _ in range(repeat)), key=lambda timing: timing[0])


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
    parser.add_argument("--transports", nargs="+", default=["aiohttp", "httpx"], choices=["aiohttp", "httpx"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing; the fastest is reported")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--no-http", action="store_true", help="also time the round without HTTP")
    parser.add_argument(
        "--faults",
        type=float,
        nargs="*",
        default=[],
        help="also run one round with default settings against a server giving this share of requests "
        "a fault of any kind (500, 429, hang, empty, non-JSON, nonsense), per rate and transport",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fault-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.delay, args.fault_rate)
        return

    for rate in args.faults:
        for transport in args.transports:
            faulty, faulty_url = start_server(args.delay, rate)
            try:
                seconds, interactions, failed = run_faulty(faulty_url, args.size, args.k, transport)
            finally:
                stop_server(faulty)
            print(
                f"{rate:.0%} faults, {transport}: {failed} of {interactions} interactions failed "
                f"({failed / interactions:.1%}), round {seconds:.1f} s"
            )
    server, url = start_server(args.delay)
    try:
        calls = (args.k + 6) * args.size**2
        bound = 4 * args.delay
        print(
            f"{args.size}x{args.size} world, k={args.k}, {calls} calls, server delay {args.delay * 1000:.0f} ms, "
            f"critical-path bound {bound:.2f} s, best of {args.repeat}"
        )
        ours_best = None
        recorded = round_waves(args.size, args.k)
        for transport in args.transports:
            ours, cpu = best(
                args.repeat,
                lambda t=transport: run_ours(url, args.size, args.k, args.concurrency, transport=t),
            )
            floor, floor_cpu = best(args.repeat, lambda t=transport: run_client_floor(url, recorded, t))
            post, post_cpu = best(args.repeat, lambda t=transport: run_client_floor(url, recorded, t, True))
            ours_best = ours if ours_best is None else min(ours_best, ours)
            print(
                f"{transport:8s} ours {ours:5.2f} s ({ours / bound:.2f}x bound, {1000 * cpu / calls:.2f} ms CPU/call)"
                f"   bare client {floor:5.2f} s ({floor / bound:.2f}x bound, {1000 * floor_cpu / calls:.2f} ms CPU/call)"
                f"   ours/bare {ours / floor:.2f} (goal <= 1.15)"
                f"   [bare client.post {post:5.2f} s, {1000 * post_cpu / calls:.2f} ms CPU/call, ours/that {ours / post:.2f}]"
            )
        if args.no_http:
            bare, _ = best(args.repeat, lambda: run_ours(None, args.size, args.k, delay=args.delay))
            print(f"ours, no HTTP: {bare:5.2f} s   ratio {bare / bound:.2f}")
        if not args.skip_reference:
            reference = run_reference(url, args.size, args.k, args.threads)
            print(
                f"reference: {reference:7.2f} s   ({args.threads} threads, calls in sequence)   "
                f"ours (fastest transport) is {reference / ours_best:.1f}x faster (goal >= 10x)"
            )
    finally:
        print(f"server: {stop_server(server)}")


if __name__ == "__main__":
    main()
