"""``sandbox compare`` on hand-made sandbox runs and evaluations, against hand-computed tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from datasets import Dataset

from pipeline import compare
from pipeline.cli import main as sandbox
from pipeline.errors import UserError


def _row(world: str, round_: int, n: int, ab, aa, eb, ea) -> dict:
    return {
        "world_id": world, "round": round_, "interactions": n, "failed": 0,
        "alignment_before": ab, "alignment_after": aa, "engagement_before": eb, "engagement_after": ea,
    }  # fmt: skip


def _run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    base = _run(
        tmp_path / "base",
        [
            _row("w1", 0, 2, 3.0, 4.0, 3.0, 3.5),
            _row("w2", 0, 1, 4.5, 5.0, None, 4.0),
            _row("w1", 1, 2, 4.0, 5.5, 4.0, 4.0),
            _row("w2", 1, 2, 4.5, 6.0, 5.0, 5.0),
        ],
    )
    trained = _run(
        tmp_path / "trained", [_row("w1", 0, 3, 5.0, 6.0, 4.0, 5.0), _row("w1", 1, 3, 6.0, 6.5, 5.0, 5.5)]
    )
    return base, trained


def test_two_runs_give_the_hand_computed_table(runs, tmp_path: Path, capsys) -> None:
    base, trained = runs
    png = tmp_path / "out" / "curves.png"
    assert (
        sandbox(["compare", str(base), str(trained), "--names", "SmolLM2", "SmolLM2 aligned", "-o", str(png)])
        == 0
    )
    out = capsys.readouterr().out
    # Round 0 of the base run: alignment before (3.0*2 + 4.5*1) / 3 = 3.50, after (4.0*2 + 5.0) / 3 = 4.33;
    # engagement before: only w1 read, 3.00; after (3.5*2 + 4.0) / 3 = 3.67. Round 1: (4*2 + 4.5*2) / 4 = 4.25, ...
    # All rounds: (6 + 4.5 + 8 + 9) / 7 = 3.93, (8 + 5 + 11 + 12) / 7 = 5.14, (6 + 8 + 10) / 6 = 4.00,
    # (7 + 4 + 8 + 10) / 7 = 4.14. Draft alignment reaches 5: base never, trained in its first round.
    expected = """mean observer scores per round
run              round  n  alignment before  alignment after  engagement before  engagement after
---------------  -----  -  ----------------  ---------------  -----------------  ----------------
SmolLM2              0  3              3.50             4.33               3.00              3.67
SmolLM2              1  4              4.25             5.75               4.50              4.50
SmolLM2 aligned      0  3              5.00             6.00               4.00              5.00
SmolLM2 aligned      1  3              6.00             6.50               5.00              5.50

per run, all rounds
run              rounds  alignment before  alignment after  engagement before  engagement after  rounds to draft alignment >= 5
---------------  ------  ----------------  ---------------  -----------------  ----------------  ------------------------------
SmolLM2               2              3.93             5.14               4.00              4.14  not reached
SmolLM2 aligned       2              5.50             6.25               4.50              5.25                               1"""
    assert out.startswith(expected + "\n"), out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_threshold_counts_rounds(runs, tmp_path: Path) -> None:
    base, trained = runs
    config = compare.CompareConfig(
        inputs=[str(base), str(trained)], threshold=4.0, output=str(tmp_path / "c.png")
    )
    result = compare.run_compare(config)
    assert [compare.rounds_to_threshold(compare.round_means(rows), 4.0) for rows in result.runs.values()] == [
        2,
        1,
    ]
    assert compare.rounds_to_threshold(compare.round_means(result.runs["base"]), 6.5) is None


def _evaluation(folder: Path, model: str, scores: dict[str, tuple]) -> Path:
    rows = [{"model": model, "question": q, "alignment": a, "engagement": e} for q, (a, e) in scores.items()]
    Dataset.from_list(rows).save_to_disk(str(folder / "scores"))
    return folder


def test_evaluations_give_paired_differences_over_shared_questions(tmp_path: Path) -> None:
    first = _evaluation(tmp_path / "a", "M0", {"q1": (3.0, 4.0), "q2": (5.0, None), "q3": (4.0, 4.0)})
    second = _evaluation(tmp_path / "b", "M1", {"q2": (6.0, 5.0), "q3": (4.0, 6.0), "q4": (7.0, 7.0)})
    result = compare.run_compare(
        compare.CompareConfig(inputs=[str(first), str(second)], output=str(tmp_path / "e.png"))
    )
    paired = {d.aspect: d for d in result.evaluation.paired}
    # Shared questions q2, q3. Alignment: differences 1, 0 -> mean 0.5, sd 0.7071, t(0.975, 1) = 12.706.
    assert (paired["alignment"].model, paired["alignment"].baseline) == ("b: M1", "a: M0")
    assert paired["alignment"].n == 2 and paired["alignment"].mean == 0.5
    half = 12.7062047 * math.sqrt(0.5) / math.sqrt(2)
    assert paired["alignment"].low == pytest.approx(0.5 - half, abs=1e-5)
    assert paired["alignment"].high == pytest.approx(0.5 + half, abs=1e-5)
    # Engagement: q2's baseline is unread, so only q3: one difference of 2, no interval.
    assert (paired["engagement"].n, paired["engagement"].mean, paired["engagement"].low) == (1, 2.0, None)
    assert "b: M1 - a: M0" in result.table
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_a_folder_that_is_neither(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert sandbox(["compare", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "neither a sandbox run" in capsys.readouterr().err
    with pytest.raises(UserError, match="distinct"):
        compare.CompareConfig(inputs=["a", "b"], names=["x", "x"])
