"""How well an observer model ranks good above bad answers, with the sandbox's own rating prompts.

    .venv/bin/python benchmarks/bench_observer.py [--observer embedded | MODEL_DIR | MODEL@URL]

Rates every answer of the shipped prior (``pipeline/data/default_prior.jsonl``: one good and one bad
answer per question) with ``prompts.observer_messages`` (alignment and engagement) and
``prompts.neighbour_rating_messages`` (no memories), and prints per prompt the mean score of good
and bad answers and in how many pairs the good answer scored higher. Use it to judge whether an
observer model is strong enough to give the simulation a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import prompts
from pipeline.llm import backend_spec, build_backend
from pipeline.questions import DEFAULT_PRIOR
from pipeline.records import ASPECTS


def pairs() -> list[tuple[str, str, str]]:
    """(question, good answer, bad answer) for every question of the prior with both labels."""
    by_question: dict[str, dict[str, str]] = {}
    for line in DEFAULT_PRIOR.read_text().splitlines():
        row = json.loads(line)
        by_question.setdefault(row["question"], {})[row["label"]] = row["answer"]
    return [(q, a["good"], a["bad"]) for q, a in by_question.items() if {"good", "bad"} <= a.keys()]


async def measure(observer: str) -> None:
    rows = pairs()
    prompt_builders = {
        **{
            f"observer {aspect}": (lambda q, a, aspect=aspect: prompts.observer_messages(aspect, q, a))
            for aspect in ASPECTS
        },
        "neighbour": lambda q, a: prompts.neighbour_rating_messages(q, a, []),
    }
    async with build_backend(backend_spec(observer, max_tokens=1, cache_mode="off")) as backend:
        for name, build in prompt_builders.items():
            ratings = await asyncio.gather(
                *(backend.rate(build(q, answer)) for q, good, bad in rows for answer in (good, bad))
            )
            good, bad = ratings[0::2], ratings[1::2]
            scored = [
                (g.score, b.score) for g, b in zip(good, bad, strict=True) if None not in (g.score, b.score)
            ]
            wins = sum(g > b for g, b in scored)
            print(
                f"{name:22s} good {statistics.fmean(g for g, _ in scored):.2f}  "
                f"bad {statistics.fmean(b for _, b in scored):.2f}  "
                f"good ranked higher in {wins}/{len(rows)} pairs ({len(rows) - len(scored)} unreadable)",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observer", default="embedded")
    asyncio.run(measure(parser.parse_args().observer))


if __name__ == "__main__":
    main()
