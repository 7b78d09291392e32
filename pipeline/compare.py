"""``sandbox compare``: several sandbox runs, or several evaluations, side by side.

**Sandbox runs** (folders of ``sandbox simulate``, read from their ``summary.json``): per round, each
run's mean observer alignment and engagement of the drafts (before feedback) and of the revisions
(after), over all its worlds (each world's round mean weighted by its interactions); the runs'
curves overlaid in one PNG; and the **rounds to threshold**: the number of rounds until a round's
mean draft alignment first reaches ``--threshold`` (default 5 on the 1-7 scale, "somewhat aligned",
above the midpoint 4 the realignment filter uses), or "not reached". The paper's claim, that aligned
agents reach socially aligned answers in fewer rounds, is this number for the base and the trained
model as the agents of identical worlds.

**Evaluations** (folders of ``sandbox evaluate``, read from their ``scores/``): every model's observer
scores, and each model's paired differences from the first model over the questions both were
asked: the same computation as ``sandbox evaluate --compare``
(:func:`pipeline.evaluate.paired_differences`). With evaluations only, the PNG is their bar chart.

:func:`run_compare` does the work; :func:`main` only parses the command line and calls it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import load_from_disk

from pipeline.argparsing import parse
from pipeline.errors import UserError, run_command
from pipeline.evaluate import (
    EvaluationResult,
    paired_differences,
    per_question,
    plot_comparison,
    results_table,
    summarize,
)
from pipeline.llm.ratings import SCALE
from pipeline.plots import SUMMARY_FILE, plot_round_curves
from pipeline.records import ASPECTS, SCORE_FIELDS
from pipeline.textio import format_table, write_atomic

PROG = "sandbox compare"
DEFAULT_THRESHOLD = 5.0
NOT_REACHED = "not reached"


@dataclass
class CompareConfig:
    """What ``sandbox compare`` reads and writes.

    - inputs, names: sandbox run folders and/or evaluation folders, with display names.
    - threshold: the draft alignment a run's round has to reach (rounds to threshold).
    - output: the PNG.
    """

    inputs: list[str] = field(
        metadata={
            "help": "sandbox run folders (their summary.json) and/or `sandbox evaluate` folders (their scores/)",
            "positional": True,
        }
    )
    names: list[str] | None = field(
        default=None, metadata={"help": "one display name per input, distinct; default: the folder names"}
    )
    threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={
            "help": f"rounds to threshold: the first round whose mean draft alignment reaches it (1-{SCALE})"
        },
    )
    output: str = field(default="compare.png", metadata={"help": "the PNG to write", "aliases": ["-o"]})

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise UserError("give one or more sandbox run or evaluation folders")
        if self.names is None:
            self.names = [Path(p).expanduser().resolve().name for p in self.inputs]
        if len(self.names) != len(self.inputs) or len(set(self.names)) != len(self.names):
            raise UserError(
                "--names needs one distinct name per input (folders with the same name need --names)"
            )
        if not 1 <= self.threshold <= SCALE:
            raise UserError(f"--threshold must be on the rating scale 1-{SCALE}, got {self.threshold}")


def _is_evaluation(folder: Path) -> bool:
    return (folder / "scores").is_dir()


def read_input(path: str) -> tuple[str, Any]:
    """``("run", per-round summary rows)`` or ``("evaluation", per-question score rows)``."""
    folder = Path(path).expanduser()
    if _is_evaluation(folder):
        return "evaluation", load_from_disk(str(folder / "scores")).to_list()
    summary = folder / SUMMARY_FILE
    if not summary.is_file():
        raise UserError(
            f"{path}: neither a sandbox run with a {SUMMARY_FILE} (an unfinished run: sandbox simulate --merge "
            f"{path}) nor an evaluation folder with scores/"
        )
    rows = json.loads(summary.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "round" in r for r in rows):
        raise UserError(f"{summary} is not a sandbox run's per-round summary")
    return "run", rows


def weighted_mean(rows: Sequence[dict[str, Any]], name: str) -> float | None:
    """The mean of a score over summary rows, each (world, round) mean weighted by its interactions."""
    read = [(row[name], row["interactions"]) for row in rows if row[name] is not None]
    weight = sum(n for _, n in read)
    return sum(v * n for v, n in read) / weight if weight else None


def round_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round, over all worlds: the interactions and each score's :func:`weighted_mean`."""
    means = []
    for round_ in sorted({row["round"] for row in rows}):
        mine = [row for row in rows if row["round"] == round_]
        means.append(
            {
                "round": round_,
                "interactions": sum(row["interactions"] for row in mine),
                **{name: weighted_mean(mine, name) for name in SCORE_FIELDS},
            }
        )
    return means


def rounds_to_threshold(means: Sequence[dict[str, Any]], threshold: float) -> int | None:
    """How many rounds until a round's mean draft alignment first reaches ``threshold`` (``None``: never)."""
    for count, entry in enumerate(means, start=1):
        if entry["alignment_before"] is not None and entry["alignment_before"] >= threshold:
            return count
    return None


def _cell(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def runs_tables(runs: dict[str, list[dict[str, Any]]], threshold: float) -> str:
    """Each run's means per round, then per run: its means over all rounds and its rounds to threshold.

    ``runs``: each run's summary rows (one per world and round).
    """
    scores = [name.replace("_", " ") for name in SCORE_FIELDS]
    per_round = format_table(
        ("run", "round", "n", *scores),
        [
            (name, m["round"], m["interactions"], *(_cell(m[s]) for s in SCORE_FIELDS))
            for name, rows in runs.items()
            for m in round_means(rows)
        ],
    )
    overall = format_table(
        ("run", "rounds", *scores, f"rounds to draft alignment >= {threshold:g}"),
        [
            (
                name,
                len(round_means(rows)),
                *(_cell(weighted_mean(rows, s)) for s in SCORE_FIELDS),
                rounds_to_threshold(round_means(rows), threshold) or NOT_REACHED,
            )
            for name, rows in runs.items()
        ],
    )
    return f"mean observer scores per round\n{per_round}\n\nper run, all rounds\n{overall}"


def plot_runs(runs: dict[str, list[dict[str, Any]]], threshold: float) -> bytes:
    """A PNG: per aspect, each run's mean draft (dashed) and revision (solid) score per round."""

    def draw(ax: Any, aspect: str) -> None:
        for index, (name, rows) in enumerate(runs.items()):
            means = round_means(rows)
            rounds = [m["round"] for m in means]
            for when, style in (("before", "--"), ("after", "-")):
                values = [
                    float("nan") if m[f"{aspect}_{when}"] is None else m[f"{aspect}_{when}"] for m in means
                ]
                label = f"{name} {'drafts' if when == 'before' else 'revisions'}"
                ax.plot(rounds, values, style, color=f"C{index}", marker="o", label=label)
        if aspect == "alignment":
            ax.axhline(threshold, color="grey", lw=0.8, ls=":", label=f"threshold {threshold:g}")

    return plot_round_curves(draw)


def evaluations_result(evaluations: dict[str, list[dict[str, Any]]]) -> EvaluationResult:
    """Observer scores of every model of the evaluations, and each one's paired differences from the first."""
    rows = []
    for name, scores in evaluations.items():
        for row in scores:
            rows.append(
                {**row, "model": row["model"] if len(evaluations) == 1 else f"{name}: {row['model']}"}
            )
    models = list(dict.fromkeys(row["model"] for row in rows))
    scored = per_question(rows)
    summaries = [summarize(m, a, [r[a] for r in scored if r["model"] == m]) for m in models for a in ASPECTS]
    paired = paired_differences(scored, models) if len(models) > 1 else []
    return EvaluationResult(summaries=summaries, preference=[], paired=paired, pair_sets={})


@dataclass(frozen=True)
class CompareResult:
    """What :func:`run_compare` found: the runs' summary rows, the evaluations' result, the text."""

    runs: dict[str, list[dict[str, Any]]]
    evaluation: EvaluationResult | None
    table: str
    plot: Path


def run_compare(config: CompareConfig) -> CompareResult:
    """Read every input, build the tables and write the PNG (runs' curves, or the evaluations' bars)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    evaluations: dict[str, list[dict[str, Any]]] = {}
    for name, path in zip(config.names or [], config.inputs, strict=True):
        kind, rows = read_input(path)
        if kind == "run":
            runs[name] = rows
        else:
            evaluations[name] = rows
    parts = [runs_tables(runs, config.threshold)] if runs else []
    evaluation = evaluations_result(evaluations) if evaluations else None
    if evaluation is not None:
        parts.append(results_table(evaluation))
    plot = Path(config.output).expanduser()
    plot.parent.mkdir(parents=True, exist_ok=True)
    if runs:
        write_atomic(plot, plot_runs(runs, config.threshold))
    elif evaluation is not None:
        plot_comparison(evaluation.summaries, plot)
    return CompareResult(runs, evaluation, "\n\n".join(parts), plot)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> None:
        config, _ = parse(CompareConfig, argv, PROG, __doc__.splitlines()[0])
        result = run_compare(config)
        print(result.table)
        print(f"plot: {result.plot}")

    return run_command(PROG, body)
