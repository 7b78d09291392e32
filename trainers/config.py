"""Configuration of the Stable Alignment trainer, in the style of TRL's trainer configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, get_args

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from pipeline.errors import UserError
from pipeline.precision import usable_dtype

from .collator import TruncationMode
from .loss import Reduction


@dataclass
class StableAlignmentConfig(TrainingArguments):
    r"""
    Configuration class for the [`StableAlignmentTrainer`].

    This class includes only the parameters that are specific to Stable Alignment training. For a full list of training
    arguments, please refer to the [`~transformers.TrainingArguments`] documentation. Note that default values in this
    class may differ from those in [`~transformers.TrainingArguments`].

    Using [`~transformers.HfArgumentParser`] (or TRL's `TrlParser`) we can turn this class into
    [argparse](https://docs.python.org/3/library/argparse#module-argparse) arguments that can be specified on the
    command line.

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained`, used when the `model` argument of the
            [`StableAlignmentTrainer`] is provided as a string. `dtype` defaults to `"float32"` (the trainer casts to
            bf16 through autocast when `bf16=True`).
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Whether to disable dropout in the model, as TRL does for its preference trainers: the penalty compares
            likelihoods of completions of the same prompt, and dropout noise would blur that comparison.

        > Parameters that control the data preprocessing

        dataset_num_proc (`int`, *optional*):
            Number of processes to use for tokenizing the dataset.
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Maximum length of each tokenized prompt + completion sequence. Longer ones are truncated according to
            `truncation_mode`. If `None`, no truncation is applied.
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`):
            Which end of an over-long sequence to keep: `"keep_start"` cuts the end of the completion (and drops
            completions whose prompt alone fills `max_length`), `"keep_end"` cuts the start of the prompt.
        pad_to_multiple_of (`int`, *optional*):
            If set, sequences are padded to a multiple of this value.
        train_on_completion_end (`bool`, *optional*, defaults to `True`):
            Whether each completion ends with the tokens that close it (the chat template's end of turn; EOS for text
            completions), so the model learns where answers stop. Set it to `False` when the completions were cut by
            a length limit rather than ended by their writer (the sandbox trims answers cut by `max_tokens` to their
            last sentence): the model then does not learn to stop where the limit stopped them.

        > Parameters that control the training

        margin (`float`, *optional*, defaults to `1.0`):
            Margin, in nats per token, that a completion rated a full `rating_scale` below the best must keep below the
            best one's likelihood. A completion `d` points below the best must sit `margin * d / rating_scale` below.
        ratio (`float`, *optional*, defaults to `0.5`):
            Weight of the penalty term relative to the SFT term on the best completion.
        rating_scale (`float`, *optional*, defaults to `7.0`):
            Top of the rating scale used by the scores (the paper rates on 1 to 7).
        reduction (`str`, *optional*, defaults to `"mean"`):
            How the penalties of the lower-rated completions of a group are combined: `"mean"` or `"max"`.
        max_completions (`int`, *optional*):
            Number of completions per group used at each training step. Groups with more are subsampled with a
            generator seeded by `seed` and the global step (so a resumed run draws the same subsets), always keeping
            the best-scored completion. `None` uses all of them. Evaluation always uses all completions.

    > [!NOTE]
    > These parameters have default values different from [`~transformers.TrainingArguments`]:
    > - `learning_rate`: Defaults to `2e-5` (the paper's value, and TRL's `SFTConfig` default) instead of `5e-5`.
    > - `lr_scheduler_type`: Defaults to `"cosine"` with `warmup_steps=0.03` (3% of the steps), as in the paper. TRL
    >   keeps the linear schedule without warmup; the paper's schedule is used since the loss is the paper's.
    > - `logging_steps`: Defaults to `10` instead of `500`, as in TRL.
    > - `activation_checkpointing` (alias `gradient_checkpointing`): Defaults to `True` instead of `False`, as in TRL.
    > - `bf16`: Defaults to `True` when a CUDA device with bf16 support is used, `False` otherwise (fp32 on CPU). TRL
    >   defaults it to `True` everywhere, which makes CPU runs slow. `True` on a CPU without bfloat16 instructions
    >   becomes `False`, said on stderr: torch emulates bfloat16 there, some 70 times slower (`pipeline.precision`).
    >
    > Where the paper's reference code and TRL disagree:
    > - `max_length`: TRL's `1024` instead of the reference's `512`: chat templates and the long realignment prompts
    >   (question + draft + instruction) would otherwise lose the end of most completions.
    > - `max_completions`: all completions instead of the reference's 3 sampled per group, so that no rating is
    >   wasted by default; set it to `3` to reproduce the paper.
    > - `margin`, `ratio`, `rating_scale`, `reduction`: the reference code's defaults (`1.0`, `0.5`, `7`, mean).
    """

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    # Parameters whose default values are overridden from TrainingArguments
    learning_rate: float = field(
        default=2e-5,
        metadata={"help": "The initial learning rate for AdamW."},
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine",
        metadata={"help": "The learning rate scheduler type to use."},
    )
    warmup_steps: float = field(
        default=0.03,
        metadata={
            "help": "Number of steps for a linear warmup from 0 to `learning_rate`. Can be an integer (exact steps) "
            "or a float in [0, 1) (ratio of total steps)."
        },
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X updates steps. Should be an integer or a float in range `[0,1)`. If smaller than 1, "
            "will be interpreted as ratio of total training steps."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to use bf16 (mixed) precision instead of 32-bit. If not set, it defaults to `True` on a "
            "CUDA device that supports bf16 and `False` otherwise. On a CPU without bfloat16 instructions (x86: "
            "AVX512-BF16 or AMX) `True` becomes `False`: torch would emulate bf16 there, some 70 times slower."
        },
    )

    # Parameters that control the model
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained`, used when the `model` argument of "
            "the `StableAlignmentTrainer` is provided as a string."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Whether to disable dropout in the model."},
    )

    # Parameters that control the data preprocessing
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Number of processes to use for tokenizing the dataset."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum length of each tokenized prompt + completion sequence. Longer ones are truncated "
            "according to `truncation_mode`. If `None`, no truncation is applied."
        },
    )
    truncation_mode: TruncationMode = field(
        default="keep_start",
        metadata={
            "help": "Which end of an over-long sequence to keep: `'keep_start'` cuts the end of the completion, "
            "`'keep_end'` cuts the start of the prompt."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "If set, sequences are padded to a multiple of this value."},
    )
    train_on_completion_end: bool = field(
        default=True,
        metadata={
            "help": "Whether each completion ends with the tokens that close it (end of turn, EOS); `False` for "
            "completions cut by a length limit, so the model does not learn to stop where the limit stopped them."
        },
    )

    # Parameters that control the training
    margin: float = field(
        default=1.0,
        metadata={
            "help": "Margin (nats per token) a completion rated a full `rating_scale` below the best must keep below "
            "the best one's likelihood."
        },
    )
    ratio: float = field(
        default=0.5,
        metadata={"help": "Weight of the penalty term relative to the SFT term on the best completion."},
    )
    rating_scale: float = field(
        default=7.0,
        metadata={"help": "Top of the rating scale used by the scores."},
    )
    reduction: Reduction = field(
        default="mean",
        metadata={"help": "How the penalties of the lower-rated completions of a group are combined."},
    )
    max_completions: int | None = field(
        default=None,
        metadata={
            "help": "Number of completions per group used at each training step (the best is always kept). `None` "
            "uses all of them."
        },
    )

    def __post_init__(self):
        # TRL's default: checkpointing on. Recent transformers call it `activation_checkpointing` and keep
        # `gradient_checkpointing` as a deprecated alias; an explicit value under either name wins.
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.bf16 is None:
            self.bf16 = (
                not self.fp16
                and not self.use_cpu
                and torch.cuda.is_available()
                and torch.cuda.is_bf16_supported()
            )
        elif self.bf16 and (self.use_cpu or not torch.accelerator.is_available()):
            self.bf16 = usable_dtype("bfloat16", "cpu") == "bfloat16"
        for name, choices in (("reduction", Reduction), ("truncation_mode", TruncationMode)):
            if getattr(self, name) not in get_args(choices):
                raise UserError(f"{name} must be one of {get_args(choices)}, got {getattr(self, name)!r}")
        if self.max_completions is not None and self.max_completions < 1:
            raise UserError(f"max_completions must be at least 1, got {self.max_completions}")
        if self.rating_scale <= 0:
            raise UserError(f"rating_scale must be positive, got {self.rating_scale}")
        super().__post_init__()
