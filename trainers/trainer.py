"""The Stable Alignment trainer: a TRL-style `Trainer` for comparison groups (prompt, completions, scores)."""

from __future__ import annotations

import os
import textwrap
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import (
    AutoTokenizer,
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import is_peft_available
from trl import is_conversational

from pipeline.errors import UserError

from ._trl import (
    _BaseTrainer,
    add_fused_lm_head,
    common_prefix_length,
    create_model_from_path,
    disable_dropout_in_model,
    get_config_model_id,
    global_then_local_main_first,
)
from .collator import DataCollatorForComparisonGroups
from .config import StableAlignmentConfig
from .data import TOKENIZED_COLUMNS, validate_groups
from .loss import best_completion_index, stable_alignment_diagnostics, stable_alignment_loss
from .model_card import model_card

if is_peft_available():
    from peft import PeftConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

logger = get_logger(__name__)
T = TypeVar("T")


def tokenize_group(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, completion_end: bool = True
) -> dict[str, Any]:
    """Tokenize one comparison group into `prompt_ids`, `completion_ids` (one list per completion) and `scores`.

    Conversational groups go through the chat template (the prompt with the generation prompt, each completion as the
    following assistant turn); text completions get the EOS token appended when they lack it. The completions start
    where the tokenized prompt and the tokenized prompt + completion diverge, as in TRL. Without `completion_end`
    (`StableAlignmentConfig.train_on_completion_end`), a completion stops at its own text: the template's closing
    tokens after an assistant turn (those of an empty turn) are left off, and text completions get no EOS. The group
    must have passed [`validate_groups`].
    """
    prompt, completions, scores = example["prompt"], example["completions"], example["scores"]
    if is_conversational({"prompt": prompt}):
        prompt_ids = tokenizer.apply_chat_template(
            prompt, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]

        def template(turns: list[dict[str, str]]) -> list[int]:
            return tokenizer.apply_chat_template(prompt + turns, tokenize=True, return_dict=True)["input_ids"]

        full_ids = [template(list(completion)) for completion in completions]
        if not completion_end:
            empty = template([{"role": "assistant", "content": ""}])
            closing = len(empty) - common_prefix_length(prompt_ids, empty)
            full_ids = [ids[: len(ids) - closing] for ids in full_ids]
    else:
        eos = tokenizer.eos_token
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = [
            tokenizer(prompt + completion + (eos if completion_end and not completion.endswith(eos) else ""))[
                "input_ids"
            ]
            for completion in completions
        ]
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    return {
        "prompt_ids": prompt_ids[:prompt_len],
        "completion_ids": [ids[prompt_len:] for ids in full_ids],
        "scores": [float(score) for score in scores],
    }


def keeps_completion_tokens(example: dict[str, Any], max_length: int | None, truncation_mode: str) -> bool:
    """Whether every completion of a tokenized group keeps at least one token after truncation to `max_length`."""
    if min(len(ids) for ids in example["completion_ids"]) == 0:
        return False
    # `keep_end` cuts the prompt first, so only `keep_start` can truncate a completion away (all of them at once,
    # since they share the prompt).
    return max_length is None or truncation_mode == "keep_end" or len(example["prompt_ids"]) < max_length


def padded_length(example: dict[str, Any], max_length: int | None, column: str = "length") -> dict[str, int]:
    """The row length a group pads its batch to: its prompt and longest completion, truncated to `max_length`."""
    length = len(example["prompt_ids"]) + max(len(ids) for ids in example["completion_ids"])
    return {column: length if max_length is None else min(length, max_length)}


LENGTH_STRATEGIES = ("group_by_length", "batch_rebalance")
"""`train_sampling_strategy` values whose sampler reads a length per example (`length_column_name`)."""


def map_fingerprint(dataset: Dataset, function: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    """A `Dataset.map` fingerprint keyed by the function's code, not its name.

    `datasets` hashes a module-level function by reference, so a dataset prepared by an older version of
    `tokenize_group` would otherwise be served from the cache after the function changed.
    """
    return Hasher.hash([dataset._fingerprint, function.__code__, kwargs])


def load_pretrained(loader: Callable[..., T], name: str, **kwargs: Any) -> T:
    """`loader(name, **kwargs)` for a model or tokenizer, a missing or unreadable one reported as a `UserError`."""
    path = Path(name).expanduser()
    if not path.is_dir() and (path.is_absolute() or name.startswith((".", "~"))):
        raise UserError(f"no model folder {name}")
    try:
        return loader(name, **kwargs)
    except OSError as error:
        raise UserError(f"cannot load {name}: {error}") from error


class StableAlignmentTrainer(_BaseTrainer):
    """
    Trainer for Stable Alignment, from [Training Socially Aligned Language Models on Simulated Social
    Interactions](https://huggingface.co/papers/2305.16960) (Liu et al., 2023).

    Each training example is a comparison group: a prompt, several completions and a score for each. The best-scored
    completion is imitated, and each lower-scored one is pushed below it by a margin proportional to the score gap
    (see [`stable_alignment_loss`]). All completions of all groups of a batch go through the model in one forward
    pass; the per-completion negative log-likelihoods are read off TRL's fused LM head, which scores only the
    completion tokens and never builds the full logits nor the model's own loss.

    Example:

    ```python
    from datasets import Dataset
    from trainers import StableAlignmentConfig, StableAlignmentTrainer

    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "Is it ok to lie to a friend?"}]],
        "completions": [[
            [{"role": "assistant", "content": "Honesty usually serves friendships better."}],
            [{"role": "assistant", "content": "Sure, lie whenever it helps you."}],
        ]],
        "scores": [[6.0, 2.0]],
    })
    trainer = StableAlignmentTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        args=StableAlignmentConfig(output_dir="smollm2-stable-alignment"),
        train_dataset=dataset,
    )
    trainer.train()
    ```

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train: a model instance, or a Hub id / local path loaded inside the trainer with
            `args.model_init_kwargs` (so that DeepSpeed ZeRO-3 can shard it while loading).
        args ([`StableAlignmentConfig`], *optional*):
            Training configuration. A plain [`~transformers.TrainingArguments`] is converted, keeping its values.
        data_collator ([`~transformers.DataCollator`], *optional*):
            Defaults to [`DataCollatorForComparisonGroups`].
        train_dataset ([`~datasets.Dataset`]):
            Comparison groups with columns `prompt`, `completions` (list) and `scores` (list of floats, one per
            completion), in text form (`prompt: str`, `completions: list[str]`) or conversational form (`prompt`: a
            list of messages, `completions`: a list of message lists). Other columns are ignored. Scores must be finite
            and within `[0, args.rating_scale]`; [`validate_groups`] refuses a bad row, on every process, before any
            tokenization.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Same format as `train_dataset`.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer. Loaded from the model when `None`. Its EOS token stands in for a missing pad token.
        callbacks (`list` of [`~transformers.TrainerCallback`], *optional*):
            Callbacks to customize the training loop.
        optimizers (`tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]`, *optional*):
            Optimizer and scheduler, as in [`~transformers.Trainer`].
        optimizer_cls_and_kwargs (`tuple[type[torch.optim.Optimizer], dict[str, Any]]`, *optional*):
            Optimizer class and keyword arguments, as in [`~transformers.Trainer`].
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration used to wrap the model (e.g. a `LoraConfig`).
    """

    # `compute_loss` divides by the number of groups of the whole accumulated batch (see `get_batch_samples`)
    loss_is_scaled_for_ga = True

    _tag_names: ClassVar[list[str]] = ["trl", "stable-alignment"]
    _name = "Stable Alignment"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Training Socially Aligned Language Models on Simulated Social Interactions",
        "id": "2305.16960",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{liu2023training,
                title        = {{Training Socially Aligned Language Models on Simulated Social Interactions}},
                author       = {Ruibo Liu and Ruixin Yang and Chenyan Jia and Ge Zhang and Denny Zhou and Andrew M. Dai and Diyi Yang and Soroush Vosoughi},
                year         = 2023,
                journal      = {arXiv preprint arXiv:2305.16960},
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: StableAlignmentConfig | TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (
            None,
            None,
        ),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        peft_config: PeftConfig | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = StableAlignmentConfig(f"{model_name.split('/')[-1]}-StableAlignment")
        elif not isinstance(args, StableAlignmentConfig):
            dict_args = args.to_dict()
            dict_args["hub_token"] = args.hub_token  # to_dict hides the hub_token
            args = StableAlignmentConfig(**dict_args)
        if not isinstance(train_dataset, Dataset):
            raise TypeError(
                f"`train_dataset` must be a `datasets.Dataset`, got {type(train_dataset).__name__}"
            )

        # Model
        if isinstance(model, str):
            model_init_kwargs = dict(args.model_init_kwargs or {})
            # Distributed training requires device_map=None ("auto" fails)
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                model_init_kwargs["device_map"] = None
            model = load_pretrained(create_model_from_path, model, **model_init_kwargs)
        elif args.model_init_kwargs is not None:
            logger.warning("`model_init_kwargs` is ignored: the model is already instantiated.")

        if processing_class is None:
            processing_class = load_pretrained(
                AutoTokenizer.from_pretrained, get_config_model_id(model.config)
            )
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError("`processing_class` must be a tokenizer (`PreTrainedTokenizerBase`)")
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token

        # PEFT
        if peft_config is not None:
            if not is_peft_available():
                raise ImportError("`peft_config` needs the `peft` library: pip install peft")
            if is_peft_model(model):
                raise ValueError("Pass either a PEFT model or a `peft_config`, not both.")
            zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
            # ZeRO-3 gathers parameters in the dtype of the first one, so adapters must stay in the base dtype
            model = get_peft_model(model, peft_config, autocast_adapter_dtype=not zero3)
        if is_peft_model(model):
            if isinstance(model.get_output_embeddings(), BaseTunerLayer):
                raise ValueError(
                    "An adapter on `lm_head` would never train: the log-probabilities use `lm_head.weight` "
                    "directly. Remove 'lm_head' from the adapter's target modules."
                )
            if args.gradient_checkpointing:
                # Checkpointed blocks need an input that requires grad when the embeddings are frozen
                model.enable_input_require_grads()
        if args.disable_dropout:
            disable_dropout_in_model(model)
        # Per-token log-probabilities of the completion tokens only, in chunks, without the full logits
        add_fused_lm_head(model.get_base_model() if is_peft_model(model) else model, outputs=("log_probs",))

        if data_collator is None:
            data_collator = DataCollatorForComparisonGroups(
                pad_token_id=processing_class.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )

        # Number of groups dropped from each dataset because truncation left them without completion tokens
        self.dropped_groups: dict[str, int] = {}
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._prepare_dataset(dataset, processing_class, args, name)
                for name, dataset in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )

        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._total_train_tokens = 0
        self._sampling_step, self._sampling_call = -1, 0
        self.model.add_model_tags(self._tag_names)

    def _send_telemetry(self):
        # TRL's usage pings describe TRL's own trainers; this one is not part of TRL.
        return

    def _prepare_dataset(
        self,
        dataset: Dataset,
        processing_class: PreTrainedTokenizerBase,
        args: StableAlignmentConfig,
        dataset_name: str,
    ) -> Dataset:
        """Tokenize a dataset of comparison groups once, dropping (and counting) groups truncation would empty."""
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"the {dataset_name} dataset must be a `datasets.Dataset`, got {type(dataset).__name__}"
            )
        # Before the first collective: a bad dataset stops every process alike, none is left waiting for another
        validate_groups(dataset, args.rating_scale, f"the {dataset_name} dataset")
        if "prompt_ids" in dataset.column_names:  # already prepared
            return self._add_lengths(dataset, args)
        with global_then_local_main_first():
            tokenize_kwargs = {"tokenizer": processing_class, "completion_end": args.train_on_completion_end}
            dataset = dataset.map(
                tokenize_group,
                fn_kwargs=tokenize_kwargs,
                num_proc=args.dataset_num_proc,
                desc=f"Tokenizing {dataset_name} dataset",
                new_fingerprint=map_fingerprint(dataset, tokenize_group, tokenize_kwargs),
            )
            num_groups = len(dataset)
            dataset = dataset.filter(
                keeps_completion_tokens,
                fn_kwargs={"max_length": args.max_length, "truncation_mode": args.truncation_mode},
                num_proc=args.dataset_num_proc,
                desc=f"Dropping fully truncated groups from {dataset_name} dataset",
            )
        self.dropped_groups[dataset_name] = num_groups - len(dataset)
        if self.dropped_groups[dataset_name]:
            logger.warning(
                f"Dropped {self.dropped_groups[dataset_name]} of {num_groups} {dataset_name} groups: their prompt "
                f"alone fills max_length={args.max_length}, leaving no completion token to train on.",
                main_process_only=True,
            )
        if len(dataset) == 0:
            raise ValueError(
                f"no {dataset_name} group is left after truncation to max_length={args.max_length}"
            )
        return self._add_lengths(dataset, args)

    @staticmethod
    def _add_lengths(dataset: Dataset, args: StableAlignmentConfig) -> Dataset:
        """The padded row length of each group (`length_column_name`), for the samplers that batch groups of
        similar length together: a group's completions share its prompt, so a batch pads every row to its
        longest prompt + completion."""
        if (
            args.train_sampling_strategy not in LENGTH_STRATEGIES
            or args.length_column_name in dataset.column_names
        ):
            return dataset
        kwargs = {"max_length": args.max_length, "column": args.length_column_name}
        return dataset.map(
            padded_length,
            fn_kwargs=kwargs,
            num_proc=args.dataset_num_proc,
            desc="Measuring group lengths",
            new_fingerprint=map_fingerprint(dataset, padded_length, kwargs),
        )

    def _set_signature_columns_if_needed(self):
        # With `remove_unused_columns=True`, only these columns reach the collator (which ignores the length); the raw
        # text and any extra columns (kind, provenance) are dropped.
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED_COLUMNS)
            if self.args.train_sampling_strategy in LENGTH_STRATEGIES:
                self._signature_columns.append(self.args.length_column_name)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The loss is a mean over groups, so gradient accumulation must divide by the groups of all micro-batches
        # (and of all processes), not by the number of micro-batches: a short last micro-batch weighs less.
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        num_groups = torch.tensor(sum(batch["group_mask"].size(0) for batch in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_groups = self.accelerator.gather(num_groups).sum()
        return batch_samples, num_groups

    def _subsample_completions(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep at most `max_completions` completions per group: the best one plus a random draw of the others.

        The generator is seeded from (seed, global step, micro-batch, process), so a resumed run draws the same
        subsets as an uninterrupted one.
        """
        group_mask = inputs["group_mask"]
        if self._sampling_step != self.state.global_step:
            self._sampling_step, self._sampling_call = self.state.global_step, 0
        rng = np.random.default_rng(
            [self.args.seed, self.state.global_step, self._sampling_call, self.accelerator.process_index]
        )
        self._sampling_call += 1

        keep = group_mask.clone()
        best = best_completion_index(inputs["scores"], group_mask).tolist()
        for b, slots in enumerate(group_mask.cpu().tolist()):
            others = [k for k, real in enumerate(slots) if real and k != best[b]]
            if len(others) + 1 <= self.args.max_completions:
                continue
            keep[b] = False
            keep[b, best[b]] = True
            keep[b, rng.choice(others, size=self.args.max_completions - 1, replace=False).tolist()] = True
        rows = keep[group_mask]  # rows are stored in the row-major order of the True slots of `group_mask`
        length = int(inputs["attention_mask"][rows].sum(dim=1).max())
        subsampled = {
            key: inputs[key][rows, :length] for key in ("input_ids", "attention_mask", "completion_mask")
        }
        return {**subsampled, "scores": inputs["scores"], "group_mask": keep}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        if mode == "train" and args.max_completions is not None:
            inputs = self._subsample_completions(inputs)
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        group_mask, scores = inputs["group_mask"], inputs["scores"]

        # The labels only tell the fused LM head which positions to score; the model's own loss is never computed.
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        outputs = model(
            input_ids=input_ids,
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        token_logps = outputs.log_probs[:, -(input_ids.size(1) - 1) :]
        num_completion_tokens = completion_mask[:, 1:].sum(dim=1)
        # clamp: a completion always keeps a token (see `keeps_completion_tokens`), but a custom collator may not
        sequence_nll = -token_logps.sum(dim=1) / num_completion_tokens.clamp(min=1)
        nll = sequence_nll.new_zeros(group_mask.shape).masked_scatter(group_mask, sequence_nll)

        loss_kwargs = {"margin": args.margin, "rating_scale": args.rating_scale, "reduction": args.reduction}
        loss = stable_alignment_loss(nll, scores, group_mask, ratio=args.ratio, **loss_kwargs)
        if num_items_in_batch is not None:
            # From the mean over this micro-batch's groups to its share of the mean over the accumulated batch
            loss = loss * group_mask.size(0) / num_items_in_batch
            if args.average_tokens_across_devices:
                # `num_items_in_batch` counts the groups of every process, and DDP averages the gradients
                loss = loss * self.accelerator.num_processes

        with torch.no_grad():
            self._record_metrics(
                mode, nll.detach(), scores, group_mask, loss_kwargs, inputs["attention_mask"]
            )

        if return_outputs:
            return loss, {"nll": nll.detach()}
        return loss

    def _record_metrics(self, mode, nll, scores, group_mask, loss_kwargs, attention_mask) -> None:
        diagnostics = stable_alignment_diagnostics(nll, scores, group_mask, **loss_kwargs)
        has_others = diagnostics.num_others > 0
        step_sums = {
            "groups": torch.tensor(group_mask.size(0), device=nll.device),
            "best_nll": diagnostics.best_nll.sum(),
            "with_others": has_others.sum(),
            "others_nll": diagnostics.others_nll[has_others].sum(),
            "penalty": diagnostics.penalty[has_others].sum(),
            "active": diagnostics.active.sum(),
            "others": diagnostics.num_others.sum(),
            "satisfied": diagnostics.num_satisfied.sum(),
            "tokens": attention_mask.sum(),
        }
        # Sums, not per-batch means: the logged ratios then average over groups however they fell into batches.
        # One collective for all of them.
        reduced = self.accelerator.reduce(torch.stack(list(step_sums.values())).double(), reduction="sum")
        sums = self._metric_sums[mode]
        for key, value in zip(step_sums, reduced.tolist(), strict=True):
            sums[key] += value

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        # The batches hold no `labels`, so `Trainer.prediction_step` would skip the loss; always compute it.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # A raw dataset passed here is tokenized (and filtered) like the ones given at construction
        if isinstance(eval_dataset, Dataset):
            eval_dataset = self._prepare_dataset(
                eval_dataset, self.processing_class, self.args, metric_key_prefix
            )
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _metrics(self, mode: str) -> dict[str, float]:
        """The diagnostics since the last log, each a mean over the groups (or completions) it describes."""
        sums = self._metric_sums[mode]
        if not sums["groups"]:
            return {}
        metrics = {
            "nll/best": sums["best_nll"] / sums["groups"],
            "penalty/active_frac": sums["active"] / sums["groups"],
        }
        if sums["with_others"]:
            metrics["nll/others"] = sums["others_nll"] / sums["with_others"]
            metrics["penalty"] = sums["penalty"] / sums["with_others"]
            metrics["margin_satisfied"] = sums["satisfied"] / sums["others"]
        if mode == "train":
            self._total_train_tokens += int(sums["tokens"])
            metrics["num_tokens"] = self._total_train_tokens
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # In evaluation the keys of `logs` start with "eval_"; match them.
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{key}": value for key, value in self._metrics(mode).items()})
        super().log(logs, start_time)
        self._metric_sums[mode].clear()

    def _save_checkpoint(self, model, trial):
        # Write the model card next to every checkpoint, as TRL's trainers do
        self.create_model_card(model_name=self._model_card_name())
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # The card lands in `args.output_dir`; write it when the model is saved there by the user
        if not _internal_call and (output_dir is None or Path(output_dir) == Path(self.args.output_dir)):
            self.create_model_card(model_name=self._model_card_name())

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """Write `README.md` in `args.output_dir`: the base model (Hub id or local folder) and how to load this one."""
        if not self.is_world_process_zero():
            return
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = model_card(
            base_model=get_config_model_id(self.model.config),
            model_name=model_name or self._model_card_name(),
            location=self.hub_model_id or self.args.output_dir,
            trainer_name=self._name,
            paper=self._paper,
            tags=sorted({*self._tag_names, *extra_tags}),
            dataset_name=dataset_name,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _model_card_name(self) -> str:
        if self.args.hub_model_id is None:
            return Path(self.args.output_dir).name
        return self.args.hub_model_id.split("/")[-1]
