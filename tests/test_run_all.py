"""`make run`: its goals table (each goal's figure and verdict from an evaluation summary), the commands
it prints, its held-out pool and its shipped evaluation of the base model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.precision import cpu_computes_bfloat16

ROOT = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "recipes" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(
    base: float,
    trained: float,
    heldout: tuple[float, float],
    alignment: tuple,
    engagement: float,
    margins: tuple[float, float] = (0.01, 0.0),
):
    run_all = _run_all()
    b, t = run_all.NAMES
    return run_all, {
        "preference_margin_differences": [
            {"model": t, "baseline": b, "pairs": key, "mean": mean}
            for key, mean in zip(("labelled", "sampled"), margins, strict=True)
        ],
        "preference_accuracy": [
            {"model": b, "pairs": "labelled", "accuracy": base},
            {"model": t, "pairs": "labelled", "accuracy": trained},
            {"model": b, "pairs": "sampled", "accuracy": heldout[0]},
            {"model": t, "pairs": "sampled", "accuracy": heldout[1]},
        ],
        "paired_differences": [
            {
                "model": t,
                "aspect": "alignment",
                "mean": alignment[0],
                "low": alignment[1],
                "high": alignment[2],
            },
            {"model": t, "aspect": "engagement", "mean": engagement, "low": -1.0, "high": 1.0},
        ],
    }


def test_goals_met() -> None:
    run_all, summary = _summary(0.60, 0.75, (0.5, 0.6), (0.3, 0.1, 0.5), 0.1)
    table = run_all.goals(summary)
    assert "+15.0 points" in table and "+0.30 [+0.10, +0.50]" in table and "none fell" in table
    assert "not met" not in table


def test_goals_not_met_name_what_fell() -> None:
    run_all, summary = _summary(0.60, 0.65, (0.6, 0.5), (0.3, -0.1, 0.7), -0.2, margins=(-0.03, 0.02))
    lines = run_all.goals(summary).splitlines()
    gain, alignment, fell = lines[-3:]
    assert "+5.0 points" in gain and gain.rstrip().endswith("not met")
    assert alignment.rstrip().endswith("not met")
    assert "sampled accuracy, labelled margin, engagement score" in fell and fell.rstrip().endswith("not met")


def test_goal_c_counts_a_fallen_margin_alone() -> None:
    """Every accuracy and score held, but the labelled pairs' margins moved towards the bad answers."""
    run_all, summary = _summary(0.60, 0.75, (0.5, 0.6), (0.3, 0.1, 0.5), 0.1, margins=(-0.03, 0.0))
    fell = run_all.goals(summary).splitlines()[-1]
    assert "labelled margin" in fell and "sampled" not in fell and fell.rstrip().endswith("not met")


def test_printed_evaluate_command_is_the_evaluation_it_runs() -> None:
    import shlex

    from pipeline.argparsing import parse
    from pipeline.evaluate import EvaluationConfig

    run_all = _run_all()
    command = shlex.split(run_all.evaluate_command())
    assert command[:2] == ["sandbox", "evaluate"]
    printed, _ = parse(EvaluationConfig, command[2:], "sandbox evaluate", "")
    runs = run_all.evaluation()
    names = (
        "compare",
        "names",
        "questions",
        "limit",
        "dtype",
        "samples",
        "temperature",
        "top_p",
        "concurrency",
        "cache_from",
    )
    for name in names:
        assert getattr(printed, name) == getattr(runs, name), name
    assert printed.output_dir == runs.output_dir


def test_heldout_questions_are_held_out() -> None:
    """The held-out pool's 120 questions are distinct and share none (case and punctuation ignored) with
    the simulation pool, the prior or the labelled pairs."""
    import json

    from pipeline.quality import normalised
    from pipeline.questions import DEFAULT_PRIOR, DEFAULT_QUESTIONS, load_questions
    from pipeline.separability import JUDGE_PAIRS

    seen = {normalised(q) for q in load_questions(str(DEFAULT_QUESTIONS))}
    for jsonl in (DEFAULT_PRIOR, JUDGE_PAIRS):
        seen |= {normalised(json.loads(line)["question"]) for line in jsonl.read_text().splitlines() if line}
    held_out = [normalised(q) for q in load_questions(str(_run_all().HELDOUT))]
    assert len(held_out) == len(set(held_out)) == 120
    assert not seen & set(held_out)


@pytest.mark.embedded
@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(
            "bfloat16",
            marks=pytest.mark.skipif(
                not cpu_computes_bfloat16(),
                reason="this CPU runs bfloat16 in float32: the float32 file replays",
            ),
        ),
        "float32",
    ],
)
def test_shipped_base_evaluation_holds_every_base_model_response(dtype: str, tmp_path: Path) -> None:
    """make run reads the base model's answers and scores from the shipped evaluation of the dtype it runs in:
    replayed under the current prompts, sampler and judge, every one is there (regenerate it after a change to
    them: `python recipes/run_all.py --write-base-evaluation DTYPE`)."""
    from datasets import load_from_disk

    from pipeline.evaluate import run_evaluation

    run_all = _run_all()
    config = run_all.base_evaluation(dtype=dtype, cache_mode="replay-only", output=str(tmp_path))
    assert config.cache_from == [str(run_all.BASE_EVALUATIONS[dtype])]
    run_evaluation(config)
    rows = load_from_disk(str(tmp_path / "scores")).to_list()
    assert len(rows) == 120 * config.samples
    missing = [r for r in rows if r["error"] or None in (r["alignment"], r["engagement"])]
    assert not missing, (
        f"{len(missing)} of {len(rows)} base-model answers or scores are not in {run_all.BASE_EVALUATIONS[dtype].name} "
        f"(the first: {missing[0]['question']!r}); write it anew: "
        f"python recipes/run_all.py --write-base-evaluation {dtype}"
    )


def test_a_cpu_without_bfloat16_replays_the_float32_evaluation(monkeypatch) -> None:
    """Where bfloat16 runs in float32, the job's evaluation (bfloat16 asked for) loads the float32 file, whose
    answers are keyed by the float32 weights that then answer."""
    from pipeline import precision

    run_all = _run_all()
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: False)
    assert run_all.evaluation().dtype == "bfloat16"
    assert run_all.evaluation().cache_from == [str(run_all.BASE_EVALUATIONS["float32"])]
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: True)
    assert run_all.evaluation().cache_from == [str(run_all.BASE_EVALUATIONS["bfloat16"])]
