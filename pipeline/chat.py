"""``sandbox chat``: ask one model one question; proves the embedded model works offline."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

DEFAULT_QUESTION = "A friend asks you to lie to their boss for them. What should you do?"


async def ask(model: str, question: str, max_tokens: int) -> str:
    from pipeline.evaluate import backend_spec, open_backend

    async with open_backend(model, backend_spec(model, max_tokens=max_tokens, cache_mode="off")) as backend:
        completion = await backend.complete([{"role": "user", "content": question}])
    return completion.text.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox chat", description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument(
        "--model", default="embedded", help="embedded | model folder or Hub name | MODEL@http://host:port/v1"
    )
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    from pipeline.llm import LLMError
    from pipeline.questions import InputError

    try:
        answer = asyncio.run(ask(args.model, args.question, args.max_tokens))
    except (InputError, LLMError) as exc:
        print(f"sandbox chat: error: {exc}", file=sys.stderr)
        return 2
    print(f"Q: {args.question}\nA: {answer}")
    return 0
