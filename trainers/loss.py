"""The Stable Alignment loss (Liu et al., 2023, arXiv 2305.16960), as pure tensor functions.

Nothing here knows about models or trainers: any trainer that can produce a per-completion
negative log-likelihood can call :func:`stable_alignment_loss` in its ``compute_loss``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch

Reduction = Literal["mean", "max"]


class StableAlignmentDiagnostics(NamedTuple):
    """Per-group quantities behind the loss; every field is a tensor with one entry per group (``[B]``).

    Attributes:
        best_index: Slot of the best-scored completion. Ties go to the first slot in order.
        best_nll: NLL of the best completion (the SFT term).
        others_nll: Mean NLL of the other real completions, 0 where the group has none.
        penalty: Reduced penalty before clamping at 0, 0 where the group has no other completion.
        active: Whether the clamped penalty is positive, i.e. whether it contributes to the loss.
        num_others: Number of other real completions.
        num_satisfied: How many of them already sit at least their margin below the best (penalty <= 0).
    """

    best_index: torch.Tensor
    best_nll: torch.Tensor
    others_nll: torch.Tensor
    penalty: torch.Tensor
    active: torch.Tensor
    num_others: torch.Tensor
    num_satisfied: torch.Tensor


def best_completion_index(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Slot of the best-scored real completion of each group (`[B]`); ties go to the first slot in order."""
    # torch.argmax returns the first maximal index, which is the documented tie rule.
    return scores.masked_fill(~mask.bool(), float("-inf")).argmax(dim=1)


def stable_alignment_diagnostics(
    nll: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    margin: float,
    rating_scale: float,
    reduction: Reduction = "mean",
) -> StableAlignmentDiagnostics:
    """Compute the per-group terms of the Stable Alignment loss.

    For a group with completions ``y_1..y_K`` and scores ``r_1..r_K``, let ``b`` be the best-scored one. Each other
    real completion gets ``penalty_i = nll_b - nll_i + margin * (r_b - r_i) / rating_scale``: positive while ``y_i``
    is not yet at least a rating-proportional margin less likely than ``y_b``. The group's penalty is the mean (or max)
    of these.

    Args:
        nll (`torch.Tensor` of shape `[B, K]`):
            Per-completion mean token negative log-likelihood. Values in masked slots are ignored; a non-finite value
            in a real slot (as in `scores`) raises a `ValueError`.
        scores (`torch.Tensor` of shape `[B, K]`):
            Rating of each completion, on `1..rating_scale`.
        mask (`torch.BoolTensor` of shape `[B, K]`):
            Which slots hold a real completion. Every group needs at least one.
        margin (`float`):
            Margin per full rating-scale difference.
        rating_scale (`float`):
            Top of the rating scale; score differences are divided by it.
        reduction (`str`, *optional*, defaults to `"mean"`):
            How the penalties of a group are combined: `"mean"` or `"max"`.

    Returns:
        [`StableAlignmentDiagnostics`]: the per-group terms.
    """
    if reduction not in get_args(Reduction):
        raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every group needs at least one real completion (a row of `mask` is all False)")
    # A NaN would otherwise flow silently into the loss and the weights; refuse it where it first shows.
    for name, values in (("scores", scores), ("nll", nll)):
        finite = torch.isfinite(values) | ~mask
        if not bool(finite.all()):
            group, slot = (~finite).nonzero()[0].tolist()
            raise ValueError(
                f"non-finite {name} ({values[group, slot].item()}) in group {group}, slot {slot}"
            )
    scores = scores.to(nll.dtype)
    best_index = best_completion_index(scores, mask)
    best_nll = nll.gather(1, best_index[:, None]).squeeze(1)
    best_score = scores.gather(1, best_index[:, None])

    others = mask.clone()
    others.scatter_(1, best_index[:, None], False)
    num_others = others.sum(dim=1)
    has_others = num_others > 0

    # Each completion's margin uses its own score (the reference code indexed the sorted scores with unsorted slots).
    penalties = best_nll[:, None] - nll + margin * (best_score - scores) / rating_scale
    if reduction == "mean":
        penalty = penalties.masked_fill(~others, 0.0).sum(dim=1) / num_others.clamp(min=1)
    else:
        penalty = penalties.masked_fill(~others, float("-inf")).amax(dim=1)
    # `where` (not a product) so the -inf of empty groups never reaches the loss or its gradient.
    penalty = torch.where(has_others, penalty, torch.zeros_like(penalty))
    others_nll = nll.masked_fill(~others, 0.0).sum(dim=1) / num_others.clamp(min=1)
    num_satisfied = ((penalties <= 0) & others).sum(dim=1)
    return StableAlignmentDiagnostics(
        best_index=best_index,
        best_nll=best_nll,
        others_nll=others_nll,
        penalty=penalty,
        active=penalty > 0,
        num_others=num_others,
        num_satisfied=num_satisfied,
    )


def stable_alignment_loss(
    nll: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    margin: float,
    ratio: float,
    rating_scale: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Stable Alignment loss, averaged over groups.

    Per group: ``loss = nll_best + ratio * max(0, reduce_i penalty_i)`` (see [`stable_alignment_diagnostics`] for the
    penalty). The best completion is imitated (SFT) and each lower-rated one is pushed down until it is at least
    ``margin * (r_best - r_i) / rating_scale`` nats per token less likely than the best. A group with a single
    completion, or whose penalties are all negative, reduces to plain SFT on its best completion. Ties for the best
    score go to the first completion in order.

    Args:
        nll (`torch.Tensor` of shape `[B, K]`):
            Per-completion mean token negative log-likelihood; masked slots are ignored.
        scores (`torch.Tensor` of shape `[B, K]`):
            Rating of each completion.
        mask (`torch.BoolTensor` of shape `[B, K]`):
            Which slots hold a real completion.
        margin (`float`):
            Margin per full rating-scale difference.
        ratio (`float`):
            Weight of the penalty relative to the SFT term.
        rating_scale (`float`):
            Top of the rating scale.
        reduction (`str`, *optional*, defaults to `"mean"`):
            How the penalties within a group are combined: `"mean"` or `"max"`.

    Returns:
        `torch.Tensor`: scalar loss, the mean over the `B` groups.

    Example:
    ```python
    >>> import torch
    >>> from trainers import stable_alignment_loss

    >>> nll = torch.tensor([[1.0, 1.2, 0.0]])
    >>> scores = torch.tensor([[7.0, 3.5, 0.0]])
    >>> mask = torch.tensor([[True, True, False]])
    >>> stable_alignment_loss(nll, scores, mask, margin=1.0, ratio=0.5, rating_scale=7)
    tensor(1.1500)
    ```
    """
    diagnostics = stable_alignment_diagnostics(
        nll, scores, mask, margin=margin, rating_scale=rating_scale, reduction=reduction
    )
    return (diagnostics.best_nll + ratio * diagnostics.penalty.clamp(min=0)).mean()
