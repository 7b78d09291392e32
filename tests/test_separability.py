"""The judge's separability metrics against hand computations, and the shipped labelled pairs."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from pipeline.loop import HELDOUT_QUESTIONS
from pipeline.questions import DEFAULT_PRIOR, load_questions
from pipeline.separability import (
    SOCIETY_PAIRS,
    auc,
    gap_sd,
    load_judge_pairs,
    paired_wins,
    separability,
    society_pairs,
    spearman,
    word_count,
)


def test_auc_counts_every_combination_and_ties_as_half():
    # (3,1) (3,2) (2,1) right, (2,2) a tie: 3.5 of 4 combinations.
    assert auc([3, 2], [1, 2]) == pytest.approx(3.5 / 4)
    assert auc([1], [2]) == 0.0
    assert auc([2, 2], [2]) == 0.5
    with pytest.raises(ValueError):
        auc([], [1])


def test_paired_wins_compare_within_pairs_only():
    # 3 > 1 wins, 2 = 2 ties, 1 < 2 loses; pooled AUC would differ (good 3 beats every bad).
    assert paired_wins([3, 2, 1], [1, 2, 2]) == 1.5


def test_gap_sd_is_the_mean_paired_difference_over_the_sd_of_all_scores():
    good, bad = [3, 2, 1], [1, 2, 2]
    # Differences 2, 0, -1 (mean 1/3); the six scores have sample variance (17/6) / 5 = 17/30.
    assert gap_sd(good, bad) == pytest.approx((1 / 3) / math.sqrt(17 / 30))
    rescaled = gap_sd([10 * s + 5 for s in good], [10 * s + 5 for s in bad])
    assert rescaled == pytest.approx(gap_sd(good, bad))
    assert gap_sd([4, 4], [4, 4]) == 0.0


def test_spearman_averages_tied_ranks():
    # y's ranks are 1, 2.5, 2.5, 4: r = 4.5 / sqrt(5 * 4.5) = 3 / sqrt(10).
    assert spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


def test_separability_leaves_out_unread_pairs_and_checks_length():
    result = separability(
        good_scores=[5, 4, None, 2],
        bad_scores=[3, 4, 1, 6],
        good_texts=["a b c", "a b", "x", "a b c d"],
        bad_texts=["a b", "a b c", "y", "a"],
    )
    assert (result.pairs, result.unreadable) == (3, 1)
    # good 5, 4, 2 vs bad 3, 4, 6: 5 beats 3 and 4, 4 beats 3 and ties 4: 3.5 of 9.
    assert result.auc == pytest.approx(3.5 / 9)
    assert result.wins == 1.5 and result.win_rate == pytest.approx(0.5)
    assert (result.mean_good, result.mean_bad) == (pytest.approx(11 / 3), pytest.approx(13 / 3))
    # Word counts good 3, 2, 4 vs bad 2, 3, 1: 7 of 9 combinations favour the good answer.
    assert result.length_auc == pytest.approx(7 / 9)
    # Only the second pair (2 words vs 3) is length-adverse, and its scores tie.
    assert (result.length_adverse_pairs, result.length_adverse_wins) == (1, 0.5)
    # Score ranks 5, 3.5, 1, 2, 3.5, 6 against length ranks 4.5, 2.5, 6, 2.5, 4.5, 1.
    assert result.score_length_spearman == pytest.approx(-9.5 / math.sqrt(17 * 16.5))
    with pytest.raises(ValueError):
        separability([1, None], [2, 3], ["a", "b"], ["c", "d"])


def test_shipped_pairs_are_balanced_in_size_and_length():
    pairs = load_judge_pairs()
    counts = Counter((p.aspect, p.split) for p in pairs)
    assert counts["alignment", "dev"] + counts["alignment", "test"] >= 60
    for aspect in ("alignment", "engagement"):
        assert abs(counts[aspect, "dev"] - counts[aspect, "test"]) <= 1
        assert load_judge_pairs(aspect, "test") == [
            p for p in pairs if (p.aspect, p.split) == (aspect, "test")
        ]
    for p in pairs:
        shorter, longer = sorted((word_count(p.good), word_count(p.bad)))
        assert longer <= 1.2 * shorter, p.question
        assert p.good != p.bad
    # The labelled pairs measure what the society teaches: none of their questions is a society's.
    prior = {json.loads(line)["question"] for line in DEFAULT_PRIOR.read_text().splitlines()}
    assert not (prior | set(load_questions()) | set(load_questions(str(HELDOUT_QUESTIONS)))) & {
        p.question for p in pairs
    }


def test_society_pairs_are_the_societys_own_answers_to_its_harmful_requests():
    """Each pair's answers are texts a make run's society wrote to a question of the default pool,
    the decline first; none is a held-out question, so the evaluation never sees them."""
    pairs = society_pairs()
    assert len(pairs) == 12 and {(p.aspect, p.split) for p in pairs} == {("alignment", "society")}
    pool = set(load_questions())
    for p in pairs:
        assert p.question in pool and p.good != p.bad, p.question
    assert not {p.question for p in pairs} & set(load_questions(str(HELDOUT_QUESTIONS)))
    rows = [json.loads(line) for line in SOCIETY_PAIRS.read_text().splitlines()]
    assert all(
        r["good_from"].startswith("make run r") and r["bad_from"].startswith("make run r") for r in rows
    )
