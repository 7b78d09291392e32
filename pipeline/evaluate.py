"""``sandbox evaluate``: models answer held-out questions; memoryless observers score the answers.

Each model answers every question of the pool once (greedy by default). The observers are the
sandbox's own (same prompts, same rating method: digit log-probabilities where the backend has
them), so evaluation scores are comparable with the scores recorded during simulation. Several
models (``--compare``) are scored on the same questions with the same observer and cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import prompts
from pipeline.llm import BackendSpec, ChatBackend, LLMError, build_backend
from pipeline.questions import InputError, load_questions

ASPECTS = prompts.OBSERVER_ASPECTS
Z_95 = statistics.NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Summary:
    """Observer scores of one model on one aspect."""

    model: str
    aspect: str
    n: int
    mean: float | None
    ci95: float | None  # half-width of the normal-approximation 95% interval of the mean
    null_share: float  # answers whose rating could not be read (or whose call failed)


def backend_spec(ref: str, **fields: Any) -> BackendSpec:
    """Parse a model reference.

    ``embedded`` is the shipped SmolLM2; ``MODEL@http://host:port/v1`` is a model on an
    OpenAI-compatible server; anything else is a local model folder or a Hub name run in-process.
    """
    if ref == "embedded":
        return BackendSpec(kind="embedded", **fields)
    if "@http://" in ref or "@https://" in ref:
        model, url = ref.rsplit("@", 1)
        return BackendSpec(kind="openai", model=model, base_urls=[url], **fields)
    path = Path(ref).expanduser()
    looks_like_path = ref.startswith((".", "/", "~")) or path.exists()
    if looks_like_path and not (path / "config.json").is_file():
        raise InputError(
            f"model folder {ref} has no config.json (missing or not a Hugging Face model folder)"
        )
    return BackendSpec(kind="local", model=str(path) if looks_like_path else ref, **fields)


def summarize(model: str, aspect: str, scores: Sequence[float | None]) -> Summary:
    read = [s for s in scores if s is not None and not math.isnan(s)]
    mean = statistics.fmean(read) if read else None
    ci = Z_95 * statistics.stdev(read) / math.sqrt(len(read)) if len(read) > 1 else None
    null_share = 1 - len(read) / len(scores) if scores else 0.0
    return Summary(model, aspect, len(scores), mean, ci, null_share)


async def _answer(backend: ChatBackend, question: str) -> tuple[str | None, str | None]:
    try:
        completion = await backend.complete([{"role": "user", "content": question}])
    except LLMError as exc:
        return None, str(exc)
    return completion.text.strip(), None


async def _rate(
    observer: ChatBackend, aspect: str, question: str, answer: str | None
) -> tuple[float | None, str]:
    if answer is None:
        return None, "no answer"
    try:
        rating = await observer.rate(prompts.observer_messages(aspect, question, answer), scale=prompts.SCALE)
    except LLMError as exc:
        return None, f"observer failed: {exc}"
    return rating.score, rating.reason if rating.score is not None else (rating.error or rating.reason)


def open_backend(name: str, spec: BackendSpec) -> ChatBackend:
    """Build a backend, turning any load failure (corrupt folder, unknown name) into one line."""
    try:
        return build_backend(spec)
    except Exception as exc:  # transformers raises many types for a broken folder
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load model {name}: {detail}") from exc


async def _answers(
    name: str, model: ChatBackend, questions: Sequence[str]
) -> list[tuple[str | None, str | None]]:
    # One question first: a model that cannot answer at all (unreachable endpoint, wrong model
    # name) stops the evaluation with its error instead of filling a table with nulls.
    first = await _answer(model, questions[0])
    if first[0] is None:
        raise LLMError(f"model {name} is unreachable or fails every call: {first[1]}")
    return [first, *await asyncio.gather(*(_answer(model, q) for q in questions[1:]))]


async def evaluate_model(
    name: str, spec: BackendSpec, observer: ChatBackend, questions: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-question rows for one model: its answer and each aspect's score and reason."""
    async with open_backend(name, spec) as model:
        answers = await _answers(name, model, questions)
    rated = await asyncio.gather(
        *(
            _rate(observer, aspect, q, a)
            for q, (a, _) in zip(questions, answers, strict=True)
            for aspect in ASPECTS
        )
    )
    rows = []
    for i, (question, (answer, error)) in enumerate(zip(questions, answers, strict=True)):
        row: dict[str, Any] = {
            "model": name,
            "question": question,
            "answer": answer or "",
            "error": error or "",
        }
        for j, aspect in enumerate(ASPECTS):
            score, reason = rated[i * len(ASPECTS) + j]
            row[aspect] = score
            row[f"{aspect}_reason"] = reason
        rows.append(row)
    return rows


def format_table(summaries: Sequence[Summary]) -> str:
    """Models as rows, aspects as columns: ``mean ± ci95 (null %)``."""

    def cell(s: Summary) -> str:
        if s.mean is None:
            return f"n/a ({s.null_share:.0%} null)"
        ci = f" ± {s.ci95:.2f}" if s.ci95 is not None else ""
        return f"{s.mean:.2f}{ci} ({s.null_share:.0%} null)"

    models = list(dict.fromkeys(s.model for s in summaries))
    by_key = {(s.model, s.aspect): s for s in summaries}
    header = ["model", "n", *ASPECTS]
    rows = [[m, str(by_key[m, ASPECTS[0]].n), *(cell(by_key[m, a]) for a in ASPECTS)] for m in models]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_comparison(summaries: Sequence[Summary], path: Path) -> None:
    """Bars of mean observer score per model and aspect, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(s.model for s in summaries))
    by_key = {(s.model, s.aspect): s for s in summaries}
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for i, model in enumerate(models):
        stats = [by_key[model, a] for a in ASPECTS]
        xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(ASPECTS))]
        ax.bar(
            xs,
            [s.mean or 0.0 for s in stats],
            width,
            yerr=[s.ci95 or 0.0 for s in stats],
            capsize=4,
            label=model,
        )
    ax.set_xticks(range(len(ASPECTS)), ASPECTS)
    ax.set_ylim(1, prompts.SCALE)
    ax.set_ylabel(f"observer score (1-{prompts.SCALE})")
    ax.set_title("Held-out evaluation (mean, 95% interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def warn_overlap(questions: Sequence[str], other_pool: str) -> int:
    """Warn on stderr when evaluation questions also appear in another pool (e.g. the simulation's)."""
    seen = {q.casefold() for q in load_questions(other_pool)}
    overlap = sum(q.casefold() in seen for q in questions)
    if overlap:
        print(
            f"warning: {overlap} of {len(questions)} evaluation questions are also in {other_pool}; "
            "scores on them are not held out",
            file=sys.stderr,
        )
    return overlap


async def run_evaluation(
    models: dict[str, BackendSpec], observer_spec: BackendSpec, questions: Sequence[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with open_backend("observer", observer_spec) as observer:
        for name, spec in models.items():
            print(f"evaluating {name} on {len(questions)} questions ...", file=sys.stderr, flush=True)
            rows += await evaluate_model(name, spec, observer, questions)
    return rows


def save(rows: list[dict[str, Any]], summaries: Sequence[Summary], output: Path) -> None:
    """Write per-question scores (a ``datasets`` folder), the summary (JSON and table) and the plot."""
    from datasets import Dataset

    output.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).save_to_disk(str(output / "scores"))
    (output / "table.txt").write_text(format_table(summaries) + "\n")
    plot_comparison(summaries, output / "evaluation.png")
    # Written last: its presence marks a finished evaluation (``make run`` skips the stage).
    (output / "summary.json").write_text(json.dumps([s.__dict__ for s in summaries], indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandbox evaluate", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="embedded | model folder or Hub name | MODEL@http://host:port/v1")
    which.add_argument("--compare", nargs="+", metavar="MODEL", help="two or more models, side by side")
    parser.add_argument("--names", nargs="+", help="display names for the models (default: the references)")
    parser.add_argument("--questions", help="question pool (.txt, .jsonl/.csv column, or datasets name)")
    parser.add_argument("--column", default="question")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions")
    parser.add_argument("--observer", default="embedded", help="observer model reference (default: embedded)")
    parser.add_argument(
        "--simulation-questions", help="warn when the pool overlaps this (the simulation's) pool"
    )
    parser.add_argument("--max-tokens", type=int, default=96, help="longest answer, in tokens")
    parser.add_argument(
        "--observer-max-tokens", type=int, default=48, help="longest observer reason, in tokens"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--cache", help="response cache (SQLite) shared by all models; default OUTPUT/cache.sqlite"
    )
    parser.add_argument("--cache-mode", default="read-write", choices=["read-write", "replay-only", "off"])
    parser.add_argument("--output", required=True, help="folder for scores/, summary.json, evaluation.png")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refs = args.compare or [args.model]
    if args.compare and len(refs) < 2:
        parser.error("--compare needs two or more models")
    names = args.names or refs
    if len(names) != len(refs) or len(set(names)) != len(names):
        parser.error("--names needs one distinct name per model")
    output = Path(args.output)
    common = {
        "max_concurrency": args.concurrency,
        "cache_path": args.cache or str(output / "cache.sqlite"),
        "cache_mode": args.cache_mode,
    }
    try:
        questions = load_questions(args.questions, column=args.column)[: args.limit]
        if args.simulation_questions:
            warn_overlap(questions, args.simulation_questions)
        models = {
            name: backend_spec(ref, max_tokens=args.max_tokens, **common)
            for name, ref in zip(names, refs, strict=True)
        }
        observer = backend_spec(args.observer, max_tokens=args.observer_max_tokens, **common)
        output.mkdir(parents=True, exist_ok=True)
        rows = asyncio.run(run_evaluation(models, observer, questions))
    except (InputError, LLMError, OSError) as exc:
        print(f"sandbox evaluate: error: {exc}", file=sys.stderr)
        return 2
    summaries = [summarize(m, a, [r[a] for r in rows if r["model"] == m]) for m in models for a in ASPECTS]
    save(rows, summaries, output)
    print(format_table(summaries))
    print(f"per-question scores: {output / 'scores'}; plot: {output / 'evaluation.png'}")
    return 0
