"""How well a judge's scores separate good answers from bad ones, on labelled good/bad pairs.

Pure arithmetic on scores and texts; no model. The labelled pairs ship as
``pipeline/data/judge_pairs.jsonl``: one JSON object per line with ``question``, ``good``, ``bad``
(two fluent, on-topic answers of similar length), ``aspect`` (``alignment``: the bad answer is
harmful, dishonest, unkind or biased; ``engagement``: the bad answer is evasive or vague) and
``split`` (``dev`` for choosing methods, ``test`` reported once for the chosen one).

``pipeline/data/society_pairs.jsonl`` holds the other kind: answers the embedded society wrote
(make runs r24, r25fp32, r26) to harmful requests of its question pool, hand-labelled: an answer
that declines (good) against one to the same question that complies or does not decline (bad),
with the run each came from. Unlike the labelled pairs they are a 135M model's text, uneven in
length and often confused, which is what the observers score in a run.

Metrics (good answers are the positives):

- **AUC**: the probability that a random good answer scores above a random bad one, over all
  good x bad combinations (the Mann-Whitney U statistic divided by its maximum); a tie counts 1/2.
  0.5 is chance, 1.0 a perfect ranking.
- **Paired wins**: in how many pairs the good answer scored above the bad answer to the same
  question; a tie counts 1/2.
- **Gap in standard deviations**: the mean paired difference (good - bad) divided by the sample
  standard deviation of all scores (good and bad together). A linear rescale of the scores
  changes numerator and denominator alike, so it cannot inflate the gap.
- **Length confound**: the AUC of the answers' word counts alone on the same pairs (what a judge
  that only preferred longer answers would reach; near 0.5 means length cannot decide); the
  paired wins on the length-adverse pairs alone (the bad answer at least as long as the good
  one); and the Spearman rank correlation of score with word count over all answers.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.questions import DATA_DIR, DEFAULT_PRIOR

JUDGE_PAIRS = DATA_DIR / "judge_pairs.jsonl"
SOCIETY_PAIRS = DATA_DIR / "society_pairs.jsonl"

Split = Literal["dev", "test"]
"""The halves of the labelled pairs' file."""

PairSet = Literal["dev", "test", "prior", "society"]
"""Where a pair comes from: a half of the labelled pairs, the shipped prior or the society's pairs."""


@dataclass(frozen=True)
class JudgePair:
    """One labelled pair: a good and a bad answer to the same question, for one aspect."""

    question: str
    good: str
    bad: str
    aspect: str
    split: PairSet


def load_judge_pairs(
    aspect: str | None = None, split: Split | None = None, path: str | Path = JUDGE_PAIRS
) -> list[JudgePair]:
    """The labelled pairs of ``path`` in file order, optionally only one aspect and/or split."""
    rows = [
        JudgePair(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]
    return [r for r in rows if aspect in (None, r.aspect) and split in (None, r.split)]


def prior_pairs(path: str | Path = DEFAULT_PRIOR) -> list[JudgePair]:
    """The prior's questions (JSON Lines of question/answer/label rows) with both a good and a bad
    answer, as alignment pairs of the split ``prior``."""
    by_question: dict[str, dict[str, str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_question.setdefault(row["question"], {})[row["label"]] = row["answer"]
    return [
        JudgePair(q, a["good"], a["bad"], "alignment", "prior")
        for q, a in by_question.items()
        if {"good", "bad"} <= a.keys()
    ]


def society_pairs(path: str | Path = SOCIETY_PAIRS) -> list[JudgePair]:
    """The society's hand-labelled decline/comply pairs (module docstring), as alignment pairs of
    the split ``society``."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    return [JudgePair(r["question"], r["good"], r["bad"], "alignment", "society") for r in rows]


def _compare(a: float, b: float) -> float:
    """1 when ``a`` ranks above ``b``, 1/2 for a tie, else 0."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Mann-Whitney AUC: the share of (positive, negative) combinations ranked right, ties 1/2."""
    if not positives or not negatives:
        raise ValueError("AUC needs at least one positive and one negative score")
    return sum(_compare(p, n) for p in positives for n in negatives) / (len(positives) * len(negatives))


def paired_wins(good: Sequence[float], bad: Sequence[float]) -> float:
    """How many pairs rank the good score above the bad one; a tie counts 1/2."""
    return sum(_compare(g, b) for g, b in zip(good, bad, strict=True))


def gap_sd(good: Sequence[float], bad: Sequence[float]) -> float:
    """Mean paired difference (good - bad) over the sample SD of all scores; 0 when all are equal."""
    spread = statistics.stdev([*good, *bad])
    if spread == 0.0:
        return 0.0
    return statistics.fmean(g - b for g, b in zip(good, bad, strict=True)) / spread


def word_count(text: str) -> int:
    """Whitespace-separated words: the length measure of the confound check."""
    return len(text.split())


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); NaN when either side is constant."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    try:
        return statistics.correlation(_ranks(x), _ranks(y))
    except statistics.StatisticsError:
        return math.nan


@dataclass(frozen=True)
class Separability:
    """All the metrics for one judge on one set of pairs (pairs with an unread score left out)."""

    pairs: int
    """Pairs with both scores read."""
    unreadable: int
    """Pairs left out because a score was ``None``."""
    auc: float
    wins: float
    gap_sd: float
    mean_good: float
    mean_bad: float
    length_auc: float
    """AUC of word count alone on the same pairs."""
    length_adverse_pairs: int
    """Pairs whose bad answer has at least as many words as the good one."""
    length_adverse_wins: float
    """Paired wins of the scores on those pairs alone."""
    score_length_spearman: float
    """Rank correlation of score with word count over all answers."""

    @property
    def win_rate(self) -> float:
        return self.wins / self.pairs


def separability(
    good_scores: Sequence[float | None],
    bad_scores: Sequence[float | None],
    good_texts: Sequence[str],
    bad_texts: Sequence[str],
) -> Separability:
    """Every metric of the module docstring for pairs ``(good_scores[i], bad_scores[i])``.

    A pair where either score is ``None`` is left out of every metric and counted as unreadable.
    """
    rows = [
        (g, b, word_count(gt), word_count(bt))
        for g, b, gt, bt in zip(good_scores, bad_scores, good_texts, bad_texts, strict=True)
        if g is not None and b is not None
    ]
    if len(rows) < 2:
        raise ValueError(f"separability needs at least two readable pairs, got {len(rows)}")
    good, bad, good_len, bad_len = (list(column) for column in zip(*rows, strict=True))
    adverse = [(g, b) for g, b, gl, bl in rows if bl >= gl]
    return Separability(
        pairs=len(rows),
        unreadable=len(good_scores) - len(rows),
        auc=auc(good, bad),
        wins=paired_wins(good, bad),
        gap_sd=gap_sd(good, bad),
        mean_good=statistics.fmean(good),
        mean_bad=statistics.fmean(bad),
        length_auc=auc(good_len, bad_len),
        length_adverse_pairs=len(adverse),
        length_adverse_wins=paired_wins([g for g, _ in adverse], [b for _, b in adverse]),
        score_length_spearman=spearman([*good, *bad], [*good_len, *bad_len]),
    )
