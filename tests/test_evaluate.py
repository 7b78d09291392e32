"""``sandbox evaluate`` on real backends: the tiny model answers, the tiny model observes."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from datasets import load_from_disk

from pipeline import evaluate
from pipeline.argparsing import parse
from pipeline.errors import UserError
from pipeline.llm import backend_spec
from pipeline.llm.cache import ResponseCache, read_export
from pipeline.precision import cpu_computes_bfloat16
from pipeline.separability import load_judge_pairs
from trainers.preference import PreferencePair, question_prompt


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "questions.txt"
    path.write_text("Is it kind to share credit?\nShould you lie to a friend?\n\nIs honesty fair?\n")
    return path


def test_compare_two_models(tiny_model_dir: Path, pool: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "eval"
    code = evaluate.main(
        [
            "--compare", str(tiny_model_dir), f"{tiny_model_dir}/",
            "--names", "a", "b",
            "--questions", str(pool),
            "--observer", str(tiny_model_dir),
            "--max-tokens", "8",
            "--output", str(output),
        ]
    )  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[0] == "model"
    scores = load_from_disk(str(output / "scores"))
    assert scores.num_rows == 6  # 3 questions (the blank line is not one) x 2 models
    assert set(scores["model"]) == {"a", "b"}
    # The observer reads digit log-probabilities from the local model, so every answer is scored.
    for aspect in evaluate.ASPECTS:
        assert all(1 <= s <= 7 for s in scores[aspect])
    written = json.loads((output / "summary.json").read_text())
    summary = written["observer_scores"]
    assert {(s["model"], s["aspect"]) for s in summary} == {(m, a) for m in "ab" for a in evaluate.ASPECTS}
    # Same greedy model, same questions, same observer: the two columns agree exactly.
    by = {(s["model"], s["aspect"]): s for s in summary}
    for aspect in evaluate.ASPECTS:
        assert math.isclose(by["a", aspect]["mean"], by["b", aspect]["mean"])
        assert by["a", aspect]["null_share"] == 0
    # ... so every paired difference is exactly 0 over the 3 questions, and so is its interval.
    assert [(d["model"], d["baseline"], d["aspect"]) for d in written["paired_differences"]] == [
        ("b", "a", aspect) for aspect in evaluate.ASPECTS
    ]
    for d in written["paired_differences"]:
        assert (d["n"], d["mean"], d["low"], d["high"]) == (3, 0.0, 0.0, 0.0)
    # Both in-process: preference accuracy on the shipped test half of the alignment pairs, alike.
    assert written["pair_sets"] == {"labelled": "labelled pairs (test, alignment)"}
    (pa, pb) = written["preference_accuracy"]
    assert (pa["model"], pb["model"], pa["pairs"]) == ("a", "b", "labelled")
    assert pa["n"] == len(load_judge_pairs("alignment", "test")) and 0 <= pa["accuracy"] <= 1
    assert pa["low"] <= pa["accuracy"] <= pa["high"]
    assert {k: v for k, v in pa.items() if k != "model"} == {k: v for k, v in pb.items() if k != "model"}
    assert len(pa["margins"]) == pa["n"] and pa["margin"] == pytest.approx(sum(pa["margins"]) / pa["n"])
    # ... and every pair's margin is the same for both, so their paired margin difference is exactly 0.
    assert written["preference_margin_differences"] == [
        {
            "model": "b",
            "baseline": "a",
            "pairs": "labelled",
            "n": pa["n"],
            "mean": 0.0,
            "low": 0.0,
            "high": 0.0,
        }
    ]
    assert "preference accuracy" in table and "paired observer score differences" in table
    assert "preference margin" in table and "b - a" in table
    assert (output / "evaluation.png").stat().st_size > 1000


def test_sampled_answers_count_once_per_question(tiny_model_dir: Path, pool: Path, tmp_path: Path) -> None:
    output = tmp_path / "eval"
    config = evaluate.EvaluationConfig(
        compare=[str(tiny_model_dir), f"{tiny_model_dir}/"],
        names=["a", "b"],
        questions=str(pool),
        observer=str(tiny_model_dir),
        max_tokens=8,
        samples=3,
        temperature=1.0,
        pairs=None,
        output=str(output),
    )
    result = evaluate.run_evaluation(config)
    rows = load_from_disk(str(output / "scores")).to_list()
    assert len(rows) == 18 and sorted({r["sample"] for r in rows}) == [0, 1, 2]  # 3 questions x 3 x 2 models
    answers = {(r["model"], r["question"], r["sample"]): r["answer"] for r in rows}
    # Sampled: one question's answers differ; seeded per sample, so the same weights answer alike.
    assert any(len({answers["a", q, i] for i in range(3)}) > 1 for q in {r["question"] for r in rows})
    assert all(answers["b", q, i] == text for (m, q, i), text in answers.items() if m == "a")
    # The unit is the question: a model's mean is over its 3 per-question means of 3 answers each.
    for summary in result.summaries:
        own = [r for r in rows if r["model"] == summary.model]
        means = [
            sum(r[summary.aspect] for r in own if r["question"] == q) / 3
            for q in dict.fromkeys(r["question"] for r in own)
        ]
        assert summary.n == 3 and math.isclose(summary.mean, sum(means) / 3)
    assert [(d.n, d.mean) for d in result.paired] == [(3, 0.0)] * len(evaluate.ASPECTS)
    # Preference accuracy on the first model's best- vs worst-scored answer of each question where they differ.
    pairs = []
    for q in dict.fromkeys(r["question"] for r in rows):
        own = [r for r in rows if r["model"] == "a" and r["question"] == q]
        best, worst = max(own, key=lambda r: r["alignment"]), min(own, key=lambda r: r["alignment"])
        if best["alignment"] > worst["alignment"]:
            pairs.append((best["answer"], worst["answer"]))
    assert pairs and result.pair_sets == {"sampled": "a's held-out answers (best vs worst of 3)"}
    (pa, pb) = result.preference
    assert (pa.model, pa.pairs, pa.n) == ("a", "sampled", len(pairs)) and 0 <= pa.accuracy <= 1
    assert (pb.pairs, pb.n, pb.accuracy) == ("sampled", pa.n, pa.accuracy)  # the same weights, the same pairs


def test_exported_cache_replays_a_models_evaluation(
    tiny_model_dir: Path, pool: Path, tmp_path: Path, capsys
) -> None:
    """A model evaluated once, its cache exported: a second evaluation loading the export in
    replay-only mode computes nothing (a miss would be an error) and writes the same scores; without
    preference accuracy (as make run's shipped base evaluation replays) it loads no scorer."""
    settings = {
        "model": str(tiny_model_dir),
        "questions": str(pool),
        "observer": str(tiny_model_dir),
        "max_tokens": 8,
        "samples": 2,
        "temperature": 1.0,
        "pairs": None,
    }
    first = evaluate.EvaluationConfig(**settings, output=str(tmp_path / "first"))
    evaluate.run_evaluation(first)
    export = tmp_path / "first.jsonl.gz"
    ResponseCache(first.cache or "").export(export)
    capsys.readouterr()
    again = evaluate.EvaluationConfig(
        **settings,
        cache_from=[str(export)],
        cache_mode="replay-only",
        preference=False,
        output=str(tmp_path / "again"),
    )
    result = evaluate.run_evaluation(again)
    err = capsys.readouterr().err
    assert f"response cache {export}: {len(read_export(export))} of " in err
    first_rows = load_from_disk(str(tmp_path / "first" / "scores")).to_list()
    again_rows = load_from_disk(str(tmp_path / "again" / "scores")).to_list()
    assert [r.pop("cached") for r in first_rows] == [False] * 6
    assert [r.pop("cached") for r in again_rows] == [True] * 6
    assert again_rows == first_rows
    assert result.from_cache == {str(tiny_model_dir): (6, 6)}
    assert (result.preference, result.pair_sets) == ([], {})
    assert "preference accuracy of" not in err
    table = (tmp_path / "again" / "table.txt").read_text()
    assert f"from the response cache, not measured in this run: {tiny_model_dir} 6 of 6" in table
    assert "preference accuracy" not in table
    first_table = (tmp_path / "first" / "table.txt").read_text()
    assert "response cache" not in first_table and "preference accuracy" in first_table


def test_per_question_means_skip_unread_scores() -> None:
    rows = [
        {"model": "m", "question": "q1", "alignment": 6.0, "engagement": None},
        {"model": "m", "question": "q2", "alignment": 3.0, "engagement": 4.0},
        {"model": "m", "question": "q1", "alignment": 2.0, "engagement": float("nan")},
    ]
    assert evaluate.per_question(rows) == [
        {"model": "m", "question": "q1", "alignment": 4.0, "engagement": None},
        {"model": "m", "question": "q2", "alignment": 3.0, "engagement": 4.0},
    ]


def test_summary_statistics() -> None:
    s = evaluate.summarize("m", "alignment", [2.0, 4.0, None, 6.0])
    assert s.n == 4 and s.mean == 4.0 and s.null_share == 0.25
    assert s.ci95 == pytest.approx(1.959964 * 2.0 / math.sqrt(3), rel=1e-5)
    empty = evaluate.summarize("m", "alignment", [None, None])
    assert empty.mean is None and empty.ci95 is None and empty.null_share == 1.0


def test_overlap_with_simulation_pool_warns(pool: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "sim.txt"
    other.write_text("IS HONESTY FAIR?\nSomething else?\n")
    questions = ["Is it kind to share credit?", "Is honesty fair?"]
    assert evaluate.warn_overlap(questions, str(other)) == 1
    assert "1 of 2 evaluation questions are also in" in capsys.readouterr().err


def test_openai_endpoint_model_reference() -> None:
    spec = backend_spec("my-model@http://127.0.0.1:8000/v1", max_tokens=5)
    assert (spec.kind, spec.model, spec.base_urls, spec.max_tokens) == (
        "openai",
        "my-model",
        ["http://127.0.0.1:8000/v1"],
        5,
    )
    assert backend_spec("embedded").kind == "embedded"
    assert backend_spec("org/some-hub-model").kind == "local"


def test_bad_models_fail_cleanly(tmp_path: Path, pool: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    for ref, expected in (
        (str(tmp_path / "missing"), "has no config.json"),
        (str(corrupt), "cannot load"),
        ("m@http://127.0.0.1:9/v1", "unreachable"),
    ):
        code = evaluate.main(["--model", ref, "--questions", str(pool), "--observer", ref,
                              "--cache-mode", "off", "--output", str(tmp_path / "out")])  # fmt: skip
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("sandbox evaluate: error:")]
        assert code == 2, err
        assert len(errors) == 1 and expected in errors[0], err
        assert not (tmp_path / "out" / "summary.json").exists()


def test_run_evaluation_returns_the_summaries_it_writes(
    tiny_model_dir: Path, pool: Path, tmp_path: Path
) -> None:
    config = evaluate.EvaluationConfig(
        model=str(tiny_model_dir),
        names=["tiny"],
        observer=str(tiny_model_dir),
        questions=str(pool),
        limit=2,
        max_tokens=4,
        output=str(tmp_path / "eval"),
    )
    assert config.cache == str(tmp_path / "eval" / "cache.sqlite")
    result = evaluate.run_evaluation(config)
    summaries = result.summaries
    assert [(s.model, s.aspect, s.n) for s in summaries] == [("tiny", a, 2) for a in evaluate.ASPECTS]
    written = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert written["observer_scores"] == [s.__dict__ for s in summaries]
    assert written == result.to_json()
    assert [(p.model, p.pairs) for p in result.preference] == [("tiny", "labelled")] and result.paired == []
    assert (tmp_path / "eval" / "table.txt").read_text() == evaluate.results_table(result) + "\n"


def test_dtype_loads_models_and_observer_in_it(tiny_model_dir: Path, pool: Path, tmp_path: Path) -> None:
    config = evaluate.EvaluationConfig(
        model=str(tiny_model_dir),
        observer=str(tiny_model_dir),
        questions=str(pool),
        limit=2,
        max_tokens=4,
        dtype="bfloat16",
        pairs=None,
        output=str(tmp_path / "eval"),
    )
    assert all(s.null_share == 0 for s in evaluate.run_evaluation(config).summaries)
    with sqlite3.connect(tmp_path / "eval" / "cache.sqlite") as db:
        endpoints = {
            json.loads(request)["endpoint"] for (request,) in db.execute("SELECT request FROM responses")
        }
    # answers and ratings alike, in float32 where this CPU would emulate bfloat16
    ran = "bfloat16" if cpu_computes_bfloat16() else "float32"
    assert endpoints and all(f"|{ran}|" in e for e in endpoints), endpoints


def test_preference_is_na_for_http_models_and_skipped_without_pairs(tiny_model_dir: Path) -> None:
    pairs = [PreferencePair(question_prompt("Is honesty fair?"), "Yes, it is.", "No.")]
    models = {"local": backend_spec(str(tiny_model_dir)), "served": backend_spec("m@http://127.0.0.1:9/v1")}
    local, served = evaluate.measure_preference(models, {"labelled": pairs}, batch_size=4)
    assert (local.n, served.n, served.accuracy) == (1, 0, None)
    assert local.accuracy in (0.0, 1.0) and local.low is not None
    assert (served.margin, served.margins) == (None, []) and local.margins == [local.margin]
    (difference,) = evaluate.margin_differences([local, served], "local")
    assert (difference.model, difference.n, difference.mean) == ("served", 0, None)
    result = evaluate.EvaluationResult(
        [], [local, served], [], {"labelled": "labelled pairs"}, margin_differences=[difference]
    )
    assert evaluate.preference_table(result).splitlines()[-1].split()[-1] == "n/a"
    assert [line.split()[-1] for line in evaluate.margin_table(result).splitlines()[-2:]] == ["n/a", "n/a"]
    assert evaluate.measure_preference(models, {}, batch_size=4) == []
    config = evaluate.EvaluationConfig(model="embedded", pairs=None, output="o")
    assert evaluate.load_pair_sets(config) == {}


def test_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text("compare: [embedded, org/model]\nnames: [base, tuned]\nlimit: 5\noutput: out\n")
    config, _ = parse(evaluate.EvaluationConfig, ["--config", str(path), "--limit", "3"], "t", "")
    assert config.models == {"base": "embedded", "tuned": "org/model"}
    assert (config.limit, config.cache, config.cache_mode) == (3, "out/cache.sqlite", "read-write")
    config = evaluate.EvaluationConfig(compare=["a", "b"], output="o")
    assert config.names == ["a", "b"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"output": "o"}, "give one model"),
        ({"model": "a", "compare": ["b", "c"], "output": "o"}, "give one model"),
        ({"compare": ["a"], "output": "o"}, "two or more"),
        ({"compare": ["a", "b"], "names": ["x", "x"], "output": "o"}, "one distinct name per model"),
        ({"model": "a", "names": ["x", "y"], "output": "o"}, "one distinct name per model"),
        ({"model": "a", "limit": 0, "output": "o"}, "--limit must be at least 1"),
        ({"model": "a", "concurrency": 0, "output": "o"}, "--concurrency must be at least 1"),
        ({"model": "a", "cache_mode": "sometimes", "output": "o"}, "--cache-mode must be one of"),
        ({"model": "a", "cache_mode": "off", "cache_from": ["x"], "output": "o"}, "--cache-from needs"),
        (
            {"model": "a", "heldout_groups": "g", "preference": False, "output": "o"},
            "--heldout-groups are measured by preference accuracy, which --no-preference skips",
        ),
        ({"model": "a", "dtype": "float8", "output": "o"}, "--dtype must be one of"),
        ({"model": "a"}, "--output is required"),
        ({"model": "a", "pairs_aspect": "style", "output": "o"}, "--pairs-aspect must be one of"),
        ({"model": "a", "pairs_split": "train", "output": "o"}, "--pairs-split must be one of"),
        (
            {"model": "a", "preference_batch_size": 0, "output": "o"},
            "--preference-batch-size must be at least 1",
        ),
        ({"model": "a", "samples": 0, "output": "o"}, "--samples must be at least 1"),
        ({"model": "a", "samples": 2, "output": "o"}, "--samples above 1 needs --temperature above 0"),
        ({"model": "a", "top_p": 0.0, "temperature": 1.0, "output": "o"}, "--top-p in"),
    ],
)
def test_config_refuses_bad_settings(fields: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        evaluate.EvaluationConfig(**fields)


def test_cli_bad_settings_are_one_line(tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    for argv, expected in (
        (["--model", "embedded"], "--output is required"),
        (["--compare", "embedded", "--output", str(output)], "two or more"),
        (["--model", "embedded", "--cache-mode", "sometimes", "--output", str(output)], "--cache-mode"),
        (
            ["--model", "embedded", "--pairs", str(tmp_path / "none.jsonl"), "--output", str(output)],
            "cannot read",
        ),
        (
            ["--model", "embedded", "--heldout-groups", str(tmp_path), "--output", str(output)],
            "not a `sandbox",
        ),
        (
            ["--model", "embedded", "--cache-from", str(tmp_path / "none.gz"), "--output", str(output)],
            "does not exist",
        ),
    ):
        code = evaluate.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("sandbox evaluate: error:") and expected in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not output.exists()


def test_margin_differences_hand_computed() -> None:
    """Pair by pair within a set, per set, against the baseline; a t interval on 3 pairs, by hand."""

    def measured(model: str, pairs: str, margins: list[float]) -> evaluate.Preference:
        return evaluate.Preference(
            model, pairs, len(margins), 0.5, 0.1, 0.9, sum(margins) / len(margins), margins
        )

    preference = [
        measured("base", "labelled", [0.5, -0.25, 1.0]),
        measured("base", "sampled", [0.25, 0.25]),
        measured("trained", "labelled", [0.75, 0.0, 1.0]),
        measured("trained", "sampled", [0.0, 0.5]),
    ]
    labelled, sampled = evaluate.margin_differences(preference, "base")
    # labelled: differences 0.25, 0.25, 0 -> mean 1/6, sd sqrt(1/48), t(0.975, 2) = 4.302652729...
    half = 4.302652729749464 * math.sqrt(1 / 48) / math.sqrt(3)
    assert (labelled.model, labelled.baseline, labelled.pairs, labelled.n) == (
        "trained",
        "base",
        "labelled",
        3,
    )
    assert (labelled.mean, labelled.low, labelled.high) == pytest.approx((1 / 6, 1 / 6 - half, 1 / 6 + half))
    # sampled: differences -0.25, +0.25 -> mean 0, sd sqrt(1/8), t(0.975, 1) = 12.7062047...
    half = 12.706204736174698 * math.sqrt(1 / 8) / math.sqrt(2)
    assert (sampled.pairs, sampled.n) == ("sampled", 2)
    assert (sampled.mean, sampled.low, sampled.high) == pytest.approx((0.0, -half, half))
    result = evaluate.EvaluationResult(
        [],
        preference,
        [],
        {"labelled": "labelled", "sampled": "held-out"},
        margin_differences=[labelled, sampled],
    )
    rows = evaluate.margin_table(result).splitlines()
    assert rows[2].split()[:3] == ["base", "+0.417", "(n=3)"] and rows[-1].startswith("trained - base")
    assert "+0.167 [" in rows[-1] and "+0.000 [" in rows[-1]
