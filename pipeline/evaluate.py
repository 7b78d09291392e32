"""``sandbox evaluate``: models answer held-out questions; memoryless observers score the answers.

Each model answers every question of the pool once, greedily, by default; with ``--samples N`` it
answers N times, sampled (``--temperature``, ``--top-p``) with the same seeds for every model, and a
question's score is the mean over its answers. The observers are the
sandbox's own (same prompts, same rating method: digit log-probabilities where the backend has
them), so evaluation scores are comparable with the scores recorded during simulation. Several
models (``--compare``) are scored on the same questions with the same observer and cache, and each
model after the first is compared with the first question by question (paired differences of the
observer scores, per aspect, with 95% t intervals).

Every model that runs in-process (``embedded``, a model folder or Hub name) also gets its
preference accuracy (:mod:`trainers.preference`): on the shipped labelled pairs (by default their
test half, alignment aspect); with ``--heldout-groups``, on the comparison groups of a
``sandbox transform`` output built from held-out questions; and with ``--samples`` above 1, on the
first model's own answers, the best- against the worst-scored of each question's (alignment), so
every model is measured on the same pairs. Each model's mean preference margin (the bad answer's
mean token NLL minus the good one's) is reported too, and each model after the first is compared
with the first pair by pair (paired margin differences, 95% t intervals): a shift of the margins
that moves no pair across 0 leaves the accuracy unchanged. A model served over HTTP exposes no
likelihoods of given answers here: its preference accuracy and margins are reported as n/a.

:func:`run_evaluation` does the work; :func:`main` only parses the command line into an
:class:`EvaluationConfig` and calls it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import statistics
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.argparsing import parse
from pipeline.embedded import embedded_model_path
from pipeline.errors import BackendLoadError, UserError, run_command
from pipeline.judge import Judge, JudgeConfig
from pipeline.llm import BackendSpec, ChatBackend, LLMError, backend_spec, build_backend
from pipeline.llm.base import CacheMode, Dtype
from pipeline.llm.cache import ResponseCache, read_export
from pipeline.llm.factory import MODEL_REFERENCE
from pipeline.llm.ratings import SCALE
from pipeline.questions import load_questions
from pipeline.records import ASPECTS
from pipeline.separability import JUDGE_PAIRS, Split
from pipeline.textio import format_table, write_atomic
from trainers.preference import (
    Estimate,
    PreferencePair,
    Scorer,
    answer_pairs,
    group_pairs,
    is_read,
    labelled_pairs,
    paired_difference,
)

Z_95 = statistics.NormalDist().inv_cdf(0.975)


@dataclass
class EvaluationConfig:
    """What ``sandbox evaluate`` scores, on which questions, and where it writes.

    Models:
        model, compare, names: one model, or two or more side by side, with display names.
        observer: the model that rates every answer (memoryless, the sandbox's own prompts).
        judge: how the observer scores (:class:`~pipeline.judge.JudgeConfig`, as in the simulation).

    Questions:
        questions, column, limit: the held-out pool and how much of it.
        simulation_questions: the simulation's pool, to warn about overlap.

    Generation:
        max_tokens, observer_max_tokens, concurrency, dtype.
        samples, temperature, top_p: answers per question and how they are drawn.

    Preference accuracy (in-process models only):
        preference: whether to measure it at all.
        pairs, pairs_aspect, pairs_split: the labelled good/bad pairs and which of them.
        heldout_groups: a ``sandbox transform`` output from held-out questions, for a second measure.
        preference_batch_size: pairs per forward pass.

    Cache and output:
        cache, cache_mode: one response cache shared by every model and the observer.
        cache_from: exported caches loaded into it first (``ResponseCache.export``).
        output: the folder for ``scores/``, ``table.txt``, ``summary.json`` and ``evaluation.png``.
    """

    model: str | None = field(default=None, metadata={"help": f"the model to evaluate: {MODEL_REFERENCE}"})
    compare: list[str] | None = field(
        default=None,
        metadata={"help": "two or more models (same references as --model), scored side by side"},
    )
    names: list[str] | None = field(
        default=None,
        metadata={"help": "display names for the models, one each, distinct; without it, the references"},
    )
    observer: str = field(default="embedded", metadata={"help": f"the observer model: {MODEL_REFERENCE}"})
    judge: JudgeConfig = field(
        default_factory=JudgeConfig,
        metadata={
            "help": "how the observer scores: --judge.alignment auto|contrast|prompted, --judge.reasons"
        },
    )
    questions: str | None = field(
        default=None,
        metadata={
            "help": "question pool: .txt (a question a line), .jsonl/.csv (see --column) or a datasets "
            "name; without it, the shipped simulation pool"
        },
    )
    column: str = field(default="question", metadata={"help": "the question column of a table pool"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N questions"})
    simulation_questions: str | None = field(
        default=None, metadata={"help": "warn when the pool overlaps this (the simulation's) pool"}
    )
    max_tokens: int = field(default=96, metadata={"help": "longest answer, in tokens"})
    samples: int = field(
        default=1,
        metadata={
            "help": "answers per question and model (sample i has the same seed for every model); a "
            "question's score is the mean over its answers' readable scores"
        },
    )
    temperature: float = field(
        default=0.0, metadata={"help": "the models' sampling temperature; 0: greedy (one answer a question)"}
    )
    top_p: float = field(default=1.0, metadata={"help": "the models' nucleus sampling mass"})
    observer_max_tokens: int = field(default=48, metadata={"help": "longest observer reason, in tokens"})
    concurrency: int = field(
        default=16, metadata={"help": "calls in flight per model (in-process models batch them all at once)"}
    )
    dtype: Dtype = field(
        default="auto",
        metadata={
            "help": "in-process models' and observer's weights: auto (float32 on CPU) or a dtype; a contrast "
            "judge needs a calibration for its observer in that dtype (preference accuracy keeps float32 "
            "weights, under autocast to a half-precision dtype)"
        },
    )
    pairs: str | None = field(
        default=str(JUDGE_PAIRS),
        metadata={
            "help": "labelled good/bad pairs (JSONL rows: question, good, bad, aspect, split) for preference "
            "accuracy; the default is the shipped set; none skips the measure"
        },
    )
    pairs_aspect: str = field(
        default="alignment", metadata={"help": f"which pairs: the aspect, one of {', '.join(ASPECTS)}"}
    )
    pairs_split: Split | None = field(
        default="test", metadata={"help": "which pairs: the dev or test half; none: both"}
    )
    heldout_groups: str | None = field(
        default=None,
        metadata={
            "help": "a `sandbox transform` output from held-out questions: preference accuracy on the "
            "best- vs worst-scored answer of its imitation groups"
        },
    )
    preference: bool = field(
        default=True,
        metadata={
            "help": "measure preference accuracy and margins (a forward pass over every pair per model); "
            "--no-preference: observer scores only"
        },
    )
    preference_batch_size: int = field(
        default=16, metadata={"help": "pairs per forward pass when measuring preference accuracy"}
    )
    cache: str | None = field(
        default=None,
        metadata={"help": "response cache (SQLite) shared by all models; without it, OUTPUT/cache.sqlite"},
    )
    cache_mode: CacheMode = field(
        default="read-write",
        metadata={"help": "replay-only turns a cache miss into an error; off bypasses the cache"},
    )
    cache_from: list[str] | None = field(
        default=None,
        metadata={
            "help": "exported response caches (.jsonl.gz) loaded into --cache first: an answer or score "
            "found there is read, not computed (make run reads the base model's evaluation from one)"
        },
    )
    output: str | None = field(
        default=None,
        metadata={"help": "folder for scores/, table.txt, summary.json and evaluation.png; required"},
    )

    def __post_init__(self) -> None:
        if (self.model is None) == (self.compare is None):
            raise UserError("give one model (--model) or two or more (--compare)")
        if self.compare is not None and len(self.compare) < 2:
            raise UserError("--compare needs two or more models")
        if self.names is None:
            self.names = list(self.references)
        if len(self.names) != len(self.references) or len(set(self.names)) != len(self.names):
            raise UserError("--names needs one distinct name per model")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        for name in ("max_tokens", "observer_max_tokens", "concurrency", "preference_batch_size", "samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.samples > 1 and self.temperature <= 0:
            raise UserError("--samples above 1 needs --temperature above 0: greedy answers are all the same")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be at least 0 and --top-p in (0, 1]")
        if self.dtype not in typing.get_args(Dtype):
            raise UserError(f"--dtype must be one of {', '.join(typing.get_args(Dtype))}")
        if self.cache_mode not in typing.get_args(CacheMode):
            raise UserError(f"--cache-mode must be one of {', '.join(typing.get_args(CacheMode))}")
        if self.cache_from and self.cache_mode == "off":
            raise UserError("--cache-from needs the response cache, which --cache-mode off bypasses")
        if self.heldout_groups and not self.preference:
            raise UserError(
                "--heldout-groups are measured by preference accuracy, which --no-preference skips"
            )
        if self.pairs_aspect not in ASPECTS:
            raise UserError(f"--pairs-aspect must be one of {', '.join(ASPECTS)}")
        if self.pairs_split not in (*typing.get_args(Split), None):
            raise UserError(f"--pairs-split must be one of {', '.join(typing.get_args(Split))} or none")
        if not self.output:
            raise UserError("--output is required: the folder for the scores, table and plot")
        if self.cache is None:
            self.cache = str(self.output_dir / "cache.sqlite")

    @property
    def references(self) -> list[str]:
        """The model references, in order."""
        return self.compare if self.compare is not None else [self.model or ""]

    @property
    def models(self) -> dict[str, str]:
        """Display name -> model reference, in order."""
        return dict(zip(self.names or self.references, self.references, strict=True))

    @property
    def output_dir(self) -> Path:
        return Path(self.output or "").expanduser()


@dataclass(frozen=True)
class Summary:
    """Observer scores of one model on one aspect."""

    model: str
    aspect: str
    n: int
    mean: float | None
    ci95: float | None  # half-width of the normal-approximation 95% interval of the mean
    null_share: float  # questions with no readable rating of any answer (unreadable or failed calls)


def summarize(model: str, aspect: str, scores: Sequence[float | None]) -> Summary:
    read = [s for s in scores if is_read(s)]
    mean = statistics.fmean(read) if read else None
    ci = Z_95 * statistics.stdev(read) / math.sqrt(len(read)) if len(read) > 1 else None
    null_share = 1 - len(read) / len(scores) if scores else 0.0
    return Summary(model, aspect, len(scores), mean, ci, null_share)


@dataclass(frozen=True)
class Preference:
    """Preference accuracy of one model on one set of pairs (``accuracy`` ``None``: not measurable)."""

    model: str
    pairs: str  # a key of EvaluationResult.pair_sets
    n: int
    accuracy: float | None  # share of pairs whose good answer has the lower mean token NLL
    low: float | None  # 95% Wilson score interval
    high: float | None
    margin: float | None = None  # mean over the pairs of NLL(bad) - NLL(good), nats a token
    margins: list[float] = field(default_factory=list)  # each pair's NLL(bad) - NLL(good), in the set's order


@dataclass(frozen=True)
class MarginDifference:
    """Mean preference-margin difference ``model - baseline`` over the pairs of one set both were measured on."""

    model: str
    baseline: str
    pairs: str  # a key of EvaluationResult.pair_sets
    n: int
    mean: float | None
    low: float | None  # 95% Student t interval of the mean difference
    high: float | None


@dataclass(frozen=True)
class PairedDifference:
    """Mean observer-score difference ``model - baseline`` over the questions both were scored on."""

    model: str
    baseline: str
    aspect: str
    n: int
    mean: float | None
    low: float | None  # 95% Student t interval of the mean difference
    high: float | None


@dataclass(frozen=True)
class EvaluationResult:
    """Everything ``summary.json`` holds: observer scores, preference accuracies and margins, paired
    differences."""

    summaries: list[Summary]
    preference: list[Preference]
    paired: list[PairedDifference]
    pair_sets: dict[str, str]  # key of a set of pairs -> what it is, in words
    margin_differences: list[MarginDifference] = field(default_factory=list)
    # model -> (answers read with their scores from the response cache, answers): not measured in this run
    from_cache: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "observer_scores": [dataclasses.asdict(s) for s in self.summaries],
            "preference_accuracy": [dataclasses.asdict(p) for p in self.preference],
            "pair_sets": self.pair_sets,
            "paired_differences": [dataclasses.asdict(d) for d in self.paired],
            "preference_margin_differences": [dataclasses.asdict(d) for d in self.margin_differences],
            "answers_from_cache": {m: {"cached": c, "answers": n} for m, (c, n) in self.from_cache.items()},
        }


def per_question(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model and question, in order, each aspect the mean of its answers' readable scores
    (``None`` where none was read): the unit every summary and paired difference counts.

    ``rows`` are answer rows (``model``, ``question``, a score per aspect): :func:`evaluate_models`'
    rows, or those of several evaluations' ``scores/`` (``sandbox compare``).
    """
    answers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        answers.setdefault((row["model"], row["question"]), []).append(row)
    means = []
    for (model, question), group in answers.items():
        row = {"model": model, "question": question}
        for aspect in ASPECTS:
            read = [r[aspect] for r in group if is_read(r[aspect])]
            row[aspect] = statistics.fmean(read) if read else None
        means.append(row)
    return means


def paired_differences(rows: Sequence[dict[str, Any]], models: Sequence[str]) -> list[PairedDifference]:
    """Each model after the first against the first, per aspect, over the questions both were asked.

    ``rows`` are per-question rows (:func:`per_question`).
    """
    baseline, *others = models
    scores = {m: {r["question"]: r for r in rows if r["model"] == m} for m in models}
    differences = []
    for model in others:
        shared = [q for q in scores[baseline] if q in scores[model]]
        for aspect in ASPECTS:
            e = paired_difference(
                [scores[baseline][q][aspect] for q in shared], [scores[model][q][aspect] for q in shared]
            )
            differences.append(PairedDifference(model, baseline, aspect, e.n, e.value, e.low, e.high))
    return differences


def _scoring_path(spec: BackendSpec) -> str | Path | None:
    """Where an in-process model's weights are; ``None`` for a model served over HTTP."""
    if spec.kind == "embedded":
        return embedded_model_path()
    return spec.model if spec.kind == "local" else None


def measure_preference(
    models: dict[str, BackendSpec],
    pair_sets: dict[str, list[PreferencePair]],
    batch_size: int,
    autocast: str | None = None,
) -> list[Preference]:
    """Preference accuracy and margins of every model on every set of pairs (n/a for models served over
    HTTP), the forward passes under ``autocast`` (a dtype name) if given."""
    results = []
    for name, spec in models.items():
        path = _scoring_path(spec)
        scorer = Scorer.load(path, autocast) if path is not None and pair_sets else None
        for key, pairs in pair_sets.items():
            if scorer is None:
                results.append(Preference(name, key, 0, None, None, None))
                continue
            print(
                f"preference accuracy of {name} on {len(pairs)} {key} pairs ...", file=sys.stderr, flush=True
            )
            e, margins = scorer.preference(pairs, batch_size)
            margin = statistics.fmean(margins) if margins else None
            results.append(Preference(name, key, e.n, e.value, e.low, e.high, margin, margins))
    return results


def margin_differences(preference: Sequence[Preference], baseline: str) -> list[MarginDifference]:
    """Each other model's preference margins against ``baseline``'s, pair by pair, per set of pairs
    (n = 0 where either model's margins were not measured)."""
    base = {p.pairs: p.margins for p in preference if p.model == baseline}
    differences = []
    for p in preference:
        if p.model == baseline:
            continue
        measured = bool(p.margins and base.get(p.pairs))
        e = paired_difference(base[p.pairs], p.margins) if measured else Estimate(None, None, None, 0)
        differences.append(MarginDifference(p.model, baseline, p.pairs, e.n, e.value, e.low, e.high))
    return differences


class _Answer(NamedTuple):
    text: str | None
    error: str | None
    cached: bool = False


async def _answer(backend: ChatBackend, question: str, sample: int) -> _Answer:
    try:
        completion = await backend.complete([{"role": "user", "content": question}], sample_index=sample)
    except LLMError as exc:
        return _Answer(None, str(exc))
    return _Answer(completion.text.strip(), None, completion.cached)


async def _rate(
    observer: Judge, aspect: str, question: str, answer: str | None
) -> tuple[float | None, str, bool]:
    """The score, its reason (or why there is none) and whether it was read from the response cache."""
    if answer is None:
        return None, "no answer", False
    try:
        rating = await observer.rate(aspect, question, answer)
    except LLMError as exc:
        return None, f"observer failed: {exc}", False
    reason = rating.reason if rating.score is not None else (rating.error or rating.reason)
    return rating.score, reason, rating.cached


async def _answers(name: str, model: ChatBackend, asked: Sequence[tuple[str, int]]) -> list[_Answer]:
    # One answer first: a model that cannot answer at all (unreachable endpoint, wrong model
    # name) stops the evaluation with its error instead of filling a table with nulls.
    first = await _answer(model, *asked[0])
    if first.text is None:
        raise BackendLoadError(f"model {name} is unreachable or fails every call: {first.error}")
    return [first, *await asyncio.gather(*(_answer(model, q, i) for q, i in asked[1:]))]


async def evaluate_model(
    name: str, spec: BackendSpec, observer: Judge, questions: Sequence[str], samples: int = 1
) -> list[dict[str, Any]]:
    """One row per answer of one model (``samples`` per question): the answer and each aspect's
    score and reason."""
    asked = [(question, sample) for question in questions for sample in range(samples)]
    async with build_backend(spec) as model:
        answers = await _answers(name, model, asked)
    rated = await asyncio.gather(
        *(
            _rate(observer, aspect, q, a.text)
            for (q, _), a in zip(asked, answers, strict=True)
            for aspect in ASPECTS
        )
    )
    rows = []
    for i, ((question, sample), (answer, error, cached)) in enumerate(zip(asked, answers, strict=True)):
        row: dict[str, Any] = {
            "model": name,
            "question": question,
            "sample": sample,
            "answer": answer or "",
            "error": error or "",
        }
        ratings = rated[i * len(ASPECTS) : (i + 1) * len(ASPECTS)]
        for aspect, (score, reason, _) in zip(ASPECTS, ratings, strict=True):
            row[aspect] = score
            row[f"{aspect}_reason"] = reason
        # An answer whose scores were all stored as well was not measured in this run.
        row["cached"] = cached and all(from_cache for _, _, from_cache in ratings)
        rows.append(row)
    return rows


async def evaluate_models(
    models: dict[str, BackendSpec],
    observer_spec: BackendSpec,
    questions: Sequence[str],
    judge: JudgeConfig | None = None,
    samples: int = 1,
) -> list[dict[str, Any]]:
    """Answer rows of every model, in order, all rated by one observer and ``judge``."""
    rows: list[dict[str, Any]] = []
    async with build_backend(observer_spec) as backend:
        observer = Judge(backend, judge)
        for name, spec in models.items():
            each = f" ({samples} answers each)" if samples > 1 else ""
            print(f"evaluating {name} on {len(questions)} questions{each} ...", file=sys.stderr, flush=True)
            rows += await evaluate_model(name, spec, observer, questions, samples)
    return rows


def summary_table(summaries: Sequence[Summary], *, markdown: bool = False) -> str:
    """Models as rows, aspects as columns: ``mean ± ci95 (null %)``."""

    def cell(s: Summary) -> str:
        if s.mean is None:
            return f"n/a ({s.null_share:.0%} null)"
        ci = f" ± {s.ci95:.2f}" if s.ci95 is not None else ""
        return f"{s.mean:.2f}{ci} ({s.null_share:.0%} null)"

    models = list(dict.fromkeys(s.model for s in summaries))
    by_key = {(s.model, s.aspect): s for s in summaries}
    rows = [[m, by_key[m, ASPECTS[0]].n, *(cell(by_key[m, a]) for a in ASPECTS)] for m in models]
    return format_table(["model", "n", *ASPECTS], rows, markdown=markdown)


def _interval(value: float | None, low: float | None, high: float | None, n: int, fmt: str) -> str:
    if value is None:
        return "n/a"
    interval = f" [{low:{fmt}}, {high:{fmt}}]" if low is not None and high is not None else ""
    return f"{value:{fmt}}{interval} (n={n})"


def preference_table(result: EvaluationResult, *, markdown: bool = False) -> str:
    """Models as rows, sets of pairs as columns: ``accuracy [95% interval] (n=...)``, n/a where not measurable."""
    by_key = {(p.model, p.pairs): p for p in result.preference}
    models = list(dict.fromkeys(p.model for p in result.preference))
    rows = []
    for m in models:
        cells = [by_key[m, k] for k in result.pair_sets]
        rows.append([m, *(_interval(p.accuracy, p.low, p.high, p.n, ".2f") for p in cells)])
    return format_table(["model", *result.pair_sets.values()], rows, markdown=markdown)


def paired_table(result: EvaluationResult, *, markdown: bool = False) -> str:
    """Each model against the baseline, aspects as columns: ``mean [95% interval] (n=...)``."""
    by_key = {(d.model, d.aspect): d for d in result.paired}
    models = list(dict.fromkeys(d.model for d in result.paired))
    rows = []
    for m in models:
        cells = [by_key[m, a] for a in ASPECTS]
        rows.append(
            [f"{m} - {cells[0].baseline}", *(_interval(d.mean, d.low, d.high, d.n, "+.2f") for d in cells)]
        )
    return format_table(["observer score difference", *ASPECTS], rows, markdown=markdown)


def margin_table(result: EvaluationResult, *, markdown: bool = False) -> str:
    """Sets of pairs as columns: each model's mean margin, then each other model's paired difference
    from the baseline ``mean [95% interval] (n=...)``; n/a where not measurable."""
    by_key = {(p.model, p.pairs): p for p in result.preference}
    rows = [
        [m, *(_interval(by_key[m, k].margin, None, None, by_key[m, k].n, "+.3f") for k in result.pair_sets)]
        for m in dict.fromkeys(p.model for p in result.preference)
    ]
    differences = {(d.model, d.pairs): d for d in result.margin_differences}
    for m in dict.fromkeys(d.model for d in result.margin_differences):
        cells = [differences[m, k] for k in result.pair_sets]
        rows.append(
            [f"{m} - {cells[0].baseline}", *(_interval(d.mean, d.low, d.high, d.n, "+.3f") for d in cells)]
        )
    return format_table(["model", *result.pair_sets.values()], rows, markdown=markdown)


def results_table(result: EvaluationResult, *, markdown: bool = False) -> str:
    """The printed results (and ``table.txt``): observer scores (saying which models' answers were read
    from the response cache), preference accuracy and margins, paired differences."""
    parts = [summary_table(result.summaries, markdown=markdown)]
    if cached := [f"{m} {c} of {n}" for m, (c, n) in result.from_cache.items() if c]:
        parts[0] += (
            "\nanswers read with their scores from the response cache, not measured in this run: "
            + ", ".join(cached)
        )
    if result.preference:
        parts.append(
            "preference accuracy: share of pairs whose good answer the model finds more likely "
            "(lower mean token NLL), 95% Wilson interval\n" + preference_table(result, markdown=markdown)
        )
        parts.append(
            "preference margin: mean token NLL of the bad answer minus the good answer's, nats (above 0: the "
            "good answer is the more likely); differences over the same pairs, 95% t interval\n"
            + margin_table(result, markdown=markdown)
        )
    if result.paired:
        parts.append(
            "paired observer score differences over the same questions, 95% t interval\n"
            + paired_table(result, markdown=markdown)
        )
    return "\n\n".join(parts)


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
    ax.set_ylim(1, SCALE)
    ax.set_ylabel(f"observer score (1-{SCALE})")
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


def save(rows: list[dict[str, Any]], result: EvaluationResult, output: Path) -> None:
    """Write the answers' scores (a ``datasets`` folder), the results (JSON and table) and the plot."""
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(output / "scores"))
    write_atomic(output / "table.txt", results_table(result) + "\n")
    plot_comparison(result.summaries, output / "evaluation.png")
    # Written last: its presence marks a finished evaluation (``make run`` skips the stage).
    write_atomic(output / "summary.json", json.dumps(result.to_json(), indent=2) + "\n")


def _make_output(output: Path) -> Path:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {output}: {exc.strerror or exc}") from exc
    return output


def load_pair_sets(config: EvaluationConfig) -> dict[str, tuple[str, list[PreferencePair]]]:
    """The sets of pairs preference accuracy is measured on: key -> (what it is, pairs)."""
    sets = {}
    if config.pairs:
        half = config.pairs_split or "dev+test"
        pairs = labelled_pairs(config.pairs, config.pairs_aspect, config.pairs_split)
        sets["labelled"] = (f"labelled pairs ({half}, {config.pairs_aspect})", pairs)
    if config.heldout_groups:
        sets["heldout_groups"] = ("held-out groups (best vs worst)", group_pairs(config.heldout_groups))
    return sets


def load_exports(cache_path: str, exports: dict[str, list[dict[str, Any]]]) -> None:
    """Store exported caches' rows (``--cache-from``) in the evaluation's response cache, saying what each held."""
    if not exports:
        return
    cache = ResponseCache(cache_path)
    try:
        for path, rows in exports.items():
            new = cache.load(rows)
            print(
                f"response cache {path}: {new} of {len(rows)} responses loaded", file=sys.stderr, flush=True
            )
    finally:
        cache.close()


def run_evaluation(config: EvaluationConfig) -> EvaluationResult:
    """Evaluate ``config``'s models and write the results to ``config.output``.

    Returns what ``summary.json`` holds: one :class:`Summary` per model and aspect (models in
    order, then :data:`ASPECTS`), one :class:`Preference` per model and set of pairs, one
    :class:`PairedDifference` per model after the first and aspect, and one :class:`MarginDifference`
    per model after the first and set of pairs. Raises :class:`UserError` for
    a bad pool, set of pairs or output folder and :class:`BackendLoadError` for a model that
    cannot be loaded or reached; nothing is written to the output folder but the response cache
    until every model is scored.
    """
    questions = load_questions(config.questions, column=config.column)[: config.limit]
    if config.simulation_questions:
        warn_overlap(questions, config.simulation_questions)
    pair_sets = load_pair_sets(config) if config.preference else {}
    exports = {path: read_export(path) for path in config.cache_from or []}
    common = {
        "max_concurrency": config.concurrency,
        "max_batch_size": config.concurrency,
        "dtype": config.dtype,
        "cache_path": config.cache,
        "cache_mode": config.cache_mode,
    }
    sampling = {"max_tokens": config.max_tokens, "temperature": config.temperature, "top_p": config.top_p}
    models = {name: backend_spec(ref, **sampling, **common) for name, ref in config.models.items()}
    observer = backend_spec(config.observer, max_tokens=config.observer_max_tokens, **common)
    output = _make_output(config.output_dir)
    load_exports(config.cache or "", exports)
    rows = asyncio.run(evaluate_models(models, observer, questions, config.judge, config.samples))
    if config.samples > 1 and config.preference:
        baseline = next(iter(models))
        pair_sets["sampled"] = (
            f"{baseline}'s held-out answers (best vs worst of {config.samples})",
            answer_pairs(rows, baseline),
        )
    scored = per_question(rows)
    preference = measure_preference(
        models,
        {k: pairs for k, (_, pairs) in pair_sets.items()},
        config.preference_batch_size,
        # Half-precision weights change NLLs more than the gaps between answers; autocast over float32
        # weights is how bf16 training computes them (demo: 40% faster, 1 pair of 324 changed side).
        autocast=config.dtype if config.dtype in ("bfloat16", "float16") else None,
    )
    result = EvaluationResult(
        summaries=[
            summarize(m, a, [r[a] for r in scored if r["model"] == m]) for m in models for a in ASPECTS
        ],
        preference=preference,
        paired=paired_differences(scored, list(models)),
        pair_sets={k: description for k, (description, _) in pair_sets.items()},
        margin_differences=margin_differences(preference, next(iter(models))),
        from_cache={
            m: (sum(r["cached"] for r in rows if r["model"] == m), sum(r["model"] == m for r in rows))
            for m in models
        },
    )
    save(rows, result, output)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    prog = "sandbox evaluate"

    def body() -> None:
        config, _ = parse(EvaluationConfig, argv, prog, __doc__.splitlines()[0])
        result = run_evaluation(config)
        output = config.output_dir
        print(results_table(result))
        print(f"per-question scores: {output / 'scores'}; plot: {output / 'evaluation.png'}")

    return run_command(prog, body)
