"""``sandbox chat``: ask one model one question; proves the embedded model works offline."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from pipeline.errors import BackendLoadError, run_command
from pipeline.llm import LLMError, backend_spec, build_backend
from pipeline.llm.factory import MODEL_REFERENCE

DEFAULT_QUESTION = "A friend asks you to lie to their boss for them. What should you do?"


async def ask(model: str, question: str, max_tokens: int) -> str:
    """The model's answer to ``question``; a model that cannot be loaded or reached is a user error."""
    async with build_backend(backend_spec(model, max_tokens=max_tokens, cache_mode="off")) as backend:
        try:
            completion = await backend.complete([{"role": "user", "content": question}])
        except LLMError as exc:
            raise BackendLoadError(f"model {model} did not answer: {exc}") from exc
    return completion.text.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox chat", description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--model", default="embedded", help=MODEL_REFERENCE)
    parser.add_argument("--max-tokens", type=int, default=96, help="longest answer, in tokens")
    args = parser.parse_args(argv)

    def body() -> None:
        answer = asyncio.run(ask(args.model, args.question, args.max_tokens))
        print(f"Q: {args.question}\nA: {answer}")

    return run_command(parser.prog, body)
