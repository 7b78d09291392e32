"""The pure Stable Alignment loss against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from trainers import stable_alignment_diagnostics, stable_alignment_loss

KW = {"margin": 2.0, "ratio": 0.5, "rating_scale": 7.0}


def loss(nll, scores, mask=None, **overrides):
    nll, scores = torch.tensor(nll), torch.tensor(scores)
    mask = torch.ones_like(nll, dtype=torch.bool) if mask is None else torch.tensor(mask)
    return stable_alignment_loss(nll, scores, mask, **{**KW, **overrides})


# Best = slot 0 (nll 1.0, score 7). Slot 1: 1.0 - 2.0 + 2 * (7 - 5) / 7 = -3/7. Slot 2: 1.0 - 1.5 + 2 * 6 / 7 = 17/14.
MEAN_LOSS = 1.0 + 0.5 * ((-3 / 7 + 17 / 14) / 2)
MAX_LOSS = 1.0 + 0.5 * (17 / 14)


def test_mean_and_max_match_hand_computed_values():
    assert loss([[1.0, 2.0, 1.5]], [[7.0, 5.0, 1.0]]).item() == pytest.approx(MEAN_LOSS, abs=1e-6)
    assert loss([[1.0, 2.0, 1.5]], [[7.0, 5.0, 1.0]], reduction="max").item() == pytest.approx(
        MAX_LOSS, abs=1e-6
    )


def test_margin_uses_each_completions_own_score():
    # Same group with the best in the middle. The reference code indexed the *sorted* scores with the *unsorted*
    # slots, which here swaps the margins of slots 0 and 2 and gives 1 + 0.5 * max(0, mean(-0.5, 5/7)) = 1.0536.
    assert loss([[1.5, 1.0, 2.0]], [[1.0, 7.0, 5.0]]).item() == pytest.approx(MEAN_LOSS, abs=1e-6)
    assert loss([[1.5, 1.0, 2.0]], [[1.0, 7.0, 5.0]], reduction="max").item() == pytest.approx(
        MAX_LOSS, abs=1e-6
    )


def test_ties_go_to_the_first_completion():
    nll, scores = torch.tensor([[2.0, 1.0, 3.0]]), torch.tensor([[5.0, 5.0, 1.0]])
    diagnostics = stable_alignment_diagnostics(
        nll, scores, torch.ones(1, 3, dtype=torch.bool), margin=2.0, rating_scale=7
    )
    assert diagnostics.best_index.tolist() == [0]
    # Penalties: 2 - 1 + 0 = 1 and 2 - 3 + 2 * 4 / 7 = 1/7
    assert loss([[2.0, 1.0, 3.0]], [[5.0, 5.0, 1.0]]).item() == pytest.approx(
        2.0 + 0.5 * (1 + 1 / 7) / 2, abs=1e-6
    )


def test_single_completion_is_sft():
    nll = torch.tensor([[1.3]], requires_grad=True)
    value = stable_alignment_loss(nll, torch.tensor([[4.0]]), torch.tensor([[True]]), **KW)
    value.backward()
    assert value.item() == pytest.approx(1.3)
    assert nll.grad.tolist() == [[1.0]]


def test_all_negative_penalties_reduce_to_sft_on_the_best():
    nll = torch.tensor([[1.0, 5.0, 6.0]], requires_grad=True)
    for reduction in ("mean", "max"):
        nll.grad = None
        value = stable_alignment_loss(
            nll,
            torch.tensor([[7.0, 6.0, 5.0]]),
            torch.ones(1, 3, dtype=torch.bool),
            **KW,
            reduction=reduction,
        )
        value.backward()
        assert value.item() == pytest.approx(1.0)
        assert nll.grad.tolist() == [[1.0, 0.0, 0.0]]


def test_masked_slots_are_ignored():
    # Junk in the masked slot (a huge NLL and a score above every real one) must change nothing, gradient included.
    nll = torch.tensor([[1.0, 2.0, 1.5, 1e6]], requires_grad=True)
    scores = torch.tensor([[7.0, 5.0, 1.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    value = stable_alignment_loss(nll, scores, mask, **KW)
    value.backward()
    assert value.item() == pytest.approx(MEAN_LOSS, abs=1e-6)
    assert nll.grad[0, 3].item() == 0.0


def test_batch_is_the_mean_over_groups():
    # Group 0 is the hand-computed one; group 1 is a single completion (SFT, 0.7).
    nll = [[1.0, 2.0, 1.5], [0.7, 0.0, 0.0]]
    scores = [[7.0, 5.0, 1.0], [3.0, 0.0, 0.0]]
    mask = [[True, True, True], [True, False, False]]
    assert loss(nll, scores, mask).item() == pytest.approx((MEAN_LOSS + 0.7) / 2, abs=1e-6)


def test_diagnostics():
    nll = torch.tensor([[1.0, 2.0, 1.5], [0.7, 0.0, 0.0]])
    scores = torch.tensor([[7.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    d = stable_alignment_diagnostics(nll, scores, mask, margin=2.0, rating_scale=7.0)
    assert d.best_nll.tolist() == pytest.approx([1.0, 0.7])
    assert d.others_nll.tolist() == pytest.approx([1.75, 0.0])
    assert d.penalty.tolist() == pytest.approx([(-3 / 7 + 17 / 14) / 2, 0.0])
    assert d.active.tolist() == [True, False]
    assert d.num_others.tolist() == [2, 0]
    assert d.num_satisfied.tolist() == [1, 0]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="reduction"):
        loss([[1.0]], [[1.0]], reduction="sum")
    with pytest.raises(ValueError, match="at least one"):
        loss([[1.0]], [[1.0]], [[False]])


def test_non_finite_scores_or_nlls_raise_naming_the_slot():
    for nll, scores, message in [
        ([[1.0, float("nan")]], [[7.0, 1.0]], r"non-finite nll \(nan\) in group 0, slot 1"),
        ([[1.0, 2.0]], [[7.0, float("inf")]], r"non-finite scores \(inf\) in group 0, slot 1"),
        (
            [[1.0, 2.0], [float("-inf"), 1.0]],
            [[7.0, 1.0], [2.0, 3.0]],
            r"non-finite nll \(-inf\) in group 1, slot 0",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            loss(nll, scores)
    # A masked slot may hold anything, NaN included: it never reaches the loss
    assert loss(
        [[1.0, 2.0, 1.5, float("nan")]], [[7.0, 5.0, 1.0, float("nan")]], [[True, True, True, False]]
    ).item() == (pytest.approx(MEAN_LOSS, abs=1e-6))
