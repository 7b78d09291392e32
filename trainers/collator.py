"""Collate comparison groups into one padded batch, so that a training step is a single forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from transformers.data.data_collator import DataCollatorMixin

from ._trl import pad

TruncationMode = Literal["keep_start", "keep_end"]


@dataclass
class DataCollatorForComparisonGroups(DataCollatorMixin):
    """
    Data collator for comparison groups: one prompt, several completions, one score each.

    Every completion of every group in the batch becomes one row `prompt_ids + completion_ids` of a single right-padded
    tensor, so the model runs once per batch however many groups and completions it holds. The rows are ordered group
    by group, in completion order; `group_mask` (`[B, K]`, `K` the largest group) marks the slots that hold a row, in
    the same row-major order. Over-long sequences are truncated here to `max_length` according to `truncation_mode`
    (the trainer has already dropped the groups this would leave without completion tokens).

    Each example must hold `"prompt_ids"` (`list[int]`), `"completion_ids"` (`list[list[int]]`) and `"scores"`
    (`list[float]`, one per completion). Other keys are ignored. The collator returns:
    - `"input_ids"`, `"attention_mask"`: `[N, T]`, `N` the total number of completions in the batch.
    - `"completion_mask"`: `[N, T]`, 1 on completion tokens (the ones scored by the loss).
    - `"scores"`: `[B, K]` float scores, 0 in empty slots.
    - `"group_mask"`: `[B, K]` bool, which slots hold a completion.

    Args:
        pad_token_id (`int`):
            Token ID used for padding.
        max_length (`int`, *optional*):
            Maximum length of a prompt + completion row. `None` disables truncation.
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`):
            `"keep_start"` cuts the end of the sequence, `"keep_end"` its start.
        pad_to_multiple_of (`int`, *optional*):
            If set, rows are padded to a multiple of this value.
        return_tensors (`str`, *optional*, defaults to `"pt"`):
            Type of tensors to return. Only `"pt"` is supported.

    Example:
    ```python
    >>> from trainers import DataCollatorForComparisonGroups

    >>> collator = DataCollatorForComparisonGroups(pad_token_id=0)
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6], "completion_ids": [[7, 8], [9]], "scores": [7.0, 2.0]},
    ...     {"prompt_ids": [5], "completion_ids": [[4]], "scores": [3.0]},
    ... ])
    >>> batch["input_ids"]
    tensor([[5, 6, 7, 8],
            [5, 6, 9, 0],
            [5, 4, 0, 0]])
    >>> batch["group_mask"]
    tensor([[ True,  True],
            [ True, False]])
    ```
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: TruncationMode = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def _truncate(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, mask
        if self.truncation_mode == "keep_start":
            return ids[: self.max_length], mask[: self.max_length]
        if self.truncation_mode == "keep_end":
            return ids[-self.max_length :], mask[-self.max_length :]
        raise ValueError(
            f"truncation_mode must be one of {get_args(TruncationMode)}, got {self.truncation_mode!r}"
        )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, completion_mask = [], []
        for example in examples:
            prompt = list(example["prompt_ids"])
            for completion in example["completion_ids"]:
                ids, mask = self._truncate(
                    prompt + list(completion), [0] * len(prompt) + [1] * len(completion)
                )
                input_ids.append(torch.tensor(ids))
                completion_mask.append(torch.tensor(mask))

        sizes = [len(example["completion_ids"]) for example in examples]
        group_mask = torch.arange(max(sizes))[None, :] < torch.tensor(sizes)[:, None]
        scores = torch.zeros(group_mask.shape, dtype=torch.float32)
        scores[group_mask] = torch.tensor([float(s) for example in examples for s in example["scores"]])

        return {
            "input_ids": pad(input_ids, self.pad_token_id, "right", self.pad_to_multiple_of),
            "attention_mask": pad(
                [torch.ones_like(ids) for ids in input_ids], 0, "right", self.pad_to_multiple_of
            ),
            "completion_mask": pad(completion_mask, 0, "right", self.pad_to_multiple_of),
            "scores": scores,
            "group_mask": group_mask,
        }
