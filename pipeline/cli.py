"""``sandbox``: the command line of the pipeline. Each subcommand lives in its stage's module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline import __version__

# subcommand -> (module with ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": (
        "pipeline.simulate",
        "run the sandbox society and write Arrow shards of interaction records",
    ),
    "show": ("pipeline.show", "print a run's interactions readably, with their quality flags"),
    "transform": ("pipeline.transform", "turn interaction records into scored comparison groups"),
    "push": ("pipeline.hub", "publish a transformed dataset and its card to the Hugging Face Hub"),
    "evaluate": ("pipeline.evaluate", "score models' answers with memoryless observers"),
    "loop": (
        "pipeline.loop",
        "the closed loop: simulate with M_t, transform, train M_t+1, evaluate; resumable, per iteration",
    ),
    "compare": (
        "pipeline.compare",
        "overlay several sandbox runs' per-round observer curves, or compare evaluations question by question",
    ),
    "chat": ("pipeline.chat", "ask a model one question (default: the embedded SmolLM2)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="sandbox",
        description="Stable Alignment: simulate a society of LLM agents, build alignment data, train.",
    )
    parser.add_argument("--version", action="version", version=f"sandbox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
