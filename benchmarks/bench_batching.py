"""Throughput of the in-process backend with request batching vs one request at a time.

    .venv/bin/python benchmarks/bench_batching.py [--requests 16] [--max-new-tokens 64] [--threads N]

Sends the same concurrent greedy requests to the embedded SmolLM2 twice: once with
``max_batch_size`` = the number of requests (one left-padded ``generate``), once with
``max_batch_size=1``. Prints requests/s and generated tokens/s of both and their ratio (goal: 4x
or more on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import time

QUESTIONS = [
    "A friend asks you to lie to their boss for them. What should you do?",
    "How can I be a better listener?",
    "Is it okay to read my partner's messages without asking?",
    "What should I do if I see someone being bullied?",
    "How do I apologise to a coworker I was rude to?",
    "Should I tell a friend that their business idea is bad?",
    "How can I help a neighbour who lives alone?",
    "Is it wrong to keep money I found on the street?",
    "How should I respond to an angry customer?",
    "What is a fair way to split chores with roommates?",
    "How can I disagree with someone politely?",
    "Should I report a colleague who cheats on expense reports?",
    "How do I support a friend who is grieving?",
    "Is it acceptable to skip a family event to rest?",
    "How can I reduce waste at home?",
    "What should I do if I make a mistake at work?",
]


async def _timed(backend, prompts: list[str], max_new_tokens: int) -> tuple[float, list]:
    messages = [[{"role": "user", "content": q}] for q in prompts]
    await backend.complete(messages[0], max_tokens=4)  # warm-up, not timed
    started = time.perf_counter()
    results = await asyncio.gather(*(backend.complete(m, max_tokens=max_new_tokens) for m in messages))
    return time.perf_counter() - started, results


def _measure(batch_size: int, prompts: list[str], max_new_tokens: int) -> tuple[float, list, list[int]]:
    from pipeline.embedded import EMBEDDED_NAME, embedded_model_path
    from pipeline.llm import BackendSpec
    from pipeline.llm.local import LocalBackend

    spec = BackendSpec(kind="embedded", max_batch_size=batch_size, batch_wait_ms=20)
    backend = LocalBackend(embedded_model_path(), spec, model_name=EMBEDDED_NAME)

    async def run() -> tuple[float, list]:
        try:
            return await _timed(backend, prompts, max_new_tokens)
        finally:
            await backend.aclose()

    seconds, results = asyncio.run(run())
    return seconds, results, backend.batch_sizes[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    rows = {}
    for label, batch_size in (("batched", args.requests), ("one by one", 1)):
        seconds, results, batches = _measure(batch_size, prompts, args.max_new_tokens)
        tokens = sum(r.usage.completion_tokens for r in results)
        rows[label] = (seconds, tokens, [r.text for r in results])
        print(
            f"{label:>10}: {seconds:7.2f} s  {args.requests / seconds:6.2f} requests/s  "
            f"{tokens / seconds:7.1f} tokens/s  (model calls: {len(batches)}, largest batch {max(batches)})"
        )
    ratio = rows["one by one"][0] / rows["batched"][0]
    # Batch shape changes float32 rounding (~1e-5 in the logits), which can flip a near-tied token.
    same = sum(a == b for a, b in zip(rows["batched"][2], rows["one by one"][2], strict=True))
    print(
        f"speed-up: {ratio:.1f}x  (torch threads: {torch.get_num_threads()}, "
        f"max_new_tokens: {args.max_new_tokens}, identical greedy outputs: {same}/{args.requests})"
    )


if __name__ == "__main__":
    main()
