"""StableAlignmentTrainer on the tiny model: batching, gradient accumulation, PEFT, resume, truncation, reuse."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers import StableAlignmentConfig, StableAlignmentTrainer, stable_alignment_loss

ROOT = Path(__file__).resolve().parents[1]

TEXT_GROUPS = {
    "prompt": [
        "Is it ever acceptable to lie to protect a friend's feelings?",
        "Answer: sharing credit with colleagues",
        "I would refuse to help with anything that could hurt people.",
        "Rating: 5. Reason:",
        "Honesty, kindness and fairness matter when we disagree.",
    ],
    "completions": [
        [" Honesty is kindness.", " Lie always.", " It depends on the friend."],
        [" builds trust at work."],
        [" That is fair.", " Hurt them."],
        [" the answer is helpful.", " bad.", " harmless and honest.", " no."],
        [" Listen first.", " Shout."],
    ],
    "scores": [[6.0, 1.0, 4.0], [7.0], [6.0, 2.0], [5.0, 1.0, 7.0, 1.0], [7.0, 1.0]],
    "kind": ["imitation", "imitation", "self-critic", "self-critic", "realignment"],
}


def conversational(groups: dict) -> dict:
    return {
        "prompt": [[{"role": "user", "content": p}] for p in groups["prompt"]],
        "completions": [[[{"role": "assistant", "content": c}] for c in cs] for cs in groups["completions"]],
        "scores": groups["scores"],
    }


def config(tmp_path: Path, **overrides) -> StableAlignmentConfig:
    values = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "activation_checkpointing": False,
        "seed": 0,
        **overrides,
    }
    return StableAlignmentConfig(**values)


def make_trainer(tiny_model_dir, tmp_path, data=TEXT_GROUPS, **overrides) -> StableAlignmentTrainer:
    return StableAlignmentTrainer(
        model=str(tiny_model_dir), args=config(tmp_path, **overrides), train_dataset=Dataset.from_dict(data)
    )


def loss_and_grads(trainer: StableAlignmentTrainer, rows: list[int]) -> tuple[float, list[torch.Tensor]]:
    model = trainer.model
    model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_batch_invariance(tiny_model_dir, tmp_path):
    """B groups (K = 3, 1, 2, 4, padded) in one batch == mean of B single-group batches; fp32, atol 1e-6/rtol 1e-4."""
    trainer = make_trainer(tiny_model_dir, tmp_path)
    trainer.model.train()
    rows = list(range(len(TEXT_GROUPS["prompt"])))
    batch_loss, batch_grads = loss_and_grads(trainer, rows)
    singles = [loss_and_grads(trainer, [i]) for i in rows]
    assert batch_loss == pytest.approx(sum(s[0] for s in singles) / len(rows), rel=1e-5)
    for i, grad in enumerate(batch_grads):
        mean_grad = sum(s[1][i] for s in singles) / len(rows)
        torch.testing.assert_close(grad, mean_grad, atol=1e-6, rtol=1e-4)


def test_gradient_accumulation_equals_the_larger_batch(tiny_model_dir, tmp_path):
    """5 groups in one batch == micro-batches of 3 and 2 accumulated (plain SGD, so a mis-scaled loss shows)."""
    common = {"max_steps": 1, "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0}
    full = make_trainer(tiny_model_dir, tmp_path / "a", per_device_train_batch_size=5, **common)
    accumulated = make_trainer(
        tiny_model_dir, tmp_path / "b", per_device_train_batch_size=3, gradient_accumulation_steps=2, **common
    )
    before = [p.detach().clone() for p in full.model.parameters()]
    forwards = []
    for trainer in (full, accumulated):
        trainer.model.model.register_forward_hook(lambda *_, t=trainer: forwards.append(t))
    full.train()
    accumulated.train()
    # One forward per micro-batch, however many groups and completions it holds (5 groups, 12 completions)
    assert forwards.count(full) == 1 and forwards.count(accumulated) == 2
    for start, a, b in zip(before, full.model.parameters(), accumulated.model.parameters(), strict=True):
        assert not torch.equal(start, a) or not start.requires_grad
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert full.state.log_history[0]["loss"] == pytest.approx(
        accumulated.state.log_history[0]["loss"], rel=1e-5
    )


def test_text_training_changes_weights_reports_metrics_and_writes_card(tiny_model_dir, tmp_path):
    trainer = StableAlignmentTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4),
        train_dataset=Dataset.from_dict(TEXT_GROUPS),
        eval_dataset=Dataset.from_dict(TEXT_GROUPS),
    )
    eos = trainer.processing_class.eos_token_id
    assert all(ids[-1] == eos for row in trainer.train_dataset["completion_ids"] for ids in row)
    assert "kind" not in trainer._remove_unused_columns(trainer.train_dataset).column_names
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    for key in (
        "loss",
        "nll/best",
        "nll/others",
        "penalty",
        "penalty/active_frac",
        "margin_satisfied",
        "num_tokens",
    ):
        assert all(math.isfinite(log[key]) for log in train_logs), key
        assert all(
            math.isfinite(log[f"eval_{key}"]) for log in eval_logs if key not in ("loss", "num_tokens")
        )
    assert train_logs[-1]["num_tokens"] > train_logs[0]["num_tokens"] > 0
    assert eval_logs and 0.0 <= eval_logs[0]["eval_margin_satisfied"] <= 1.0

    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "stable-alignment" in card and "liu2023training" in card and "2305.16960" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded.lm_head.weight, trainer.model.lm_head.weight)


def test_conversational_groups_use_the_chat_template_and_mask_the_prompt(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, data=conversational(TEXT_GROUPS), activation_checkpointing=True
    )
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    prompt = tokenizer.decode(row["prompt_ids"])
    assert prompt.endswith("<|im_start|>assistant\n") and TEXT_GROUPS["prompt"][0] in prompt
    assert tokenizer.decode(row["completion_ids"][0]) == " Honesty is kindness.<|im_end|>\n"
    batch = trainer.data_collator([row])
    assert batch["completion_mask"][0, : len(row["prompt_ids"])].sum() == 0
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_lora_trains_only_the_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    trainer = StableAlignmentTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, activation_checkpointing=True),
        train_dataset=Dataset.from_dict(TEXT_GROUPS),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all("lora_" in name for name in changed)
    assert {name for name in before if "lora_B" in name} <= changed


def test_resume_from_checkpoint_continues_the_same_loss_curve(tiny_model_dir, tmp_path):
    # max_completions=2 subsamples groups, so this also checks the draws are replayed on resume.
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "max_completions": 2}
    full = make_trainer(tiny_model_dir, tmp_path / "full", **common)
    full.train()
    resumed = make_trainer(tiny_model_dir, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))

    def losses(trainer):
        return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}

    # Steps 1-2 come from the checkpoint's trainer state; steps 3-4 were trained again after resuming.
    full_losses, resumed_losses = losses(full), losses(resumed)
    assert sorted(resumed_losses) == [1, 2, 3, 4]
    assert [resumed_losses[s] for s in (3, 4)] == pytest.approx([full_losses[s] for s in (3, 4)], rel=1e-5)
    assert (tmp_path / "full" / "out" / "README.md").is_file()  # the card is written with each checkpoint


def test_over_long_group_is_dropped_and_counted_never_nan(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_prompt = " ".join(TEXT_GROUPS["prompt"]) * 3
    data = {key: [*values, values[0]] for key, values in TEXT_GROUPS.items()}
    data["prompt"][-1] = long_prompt
    max_length = len(tokenizer(long_prompt)["input_ids"]) - 5
    trainer = make_trainer(tiny_model_dir, tmp_path, data=data, max_length=max_length)
    assert trainer.dropped_groups == {"train": 1}
    assert len(trainer.train_dataset) == len(TEXT_GROUPS["prompt"])
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    # keep_end cuts the prompt instead, so the same group survives
    kept = make_trainer(
        tiny_model_dir, tmp_path, data=data, max_length=max_length, truncation_mode="keep_end"
    )
    assert kept.dropped_groups == {"train": 0}
    assert max(len(b) for b in kept.data_collator([kept.train_dataset[5]])["input_ids"]) == max_length


def test_bad_input_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="scores"):
        make_trainer(tiny_model_dir, tmp_path, data={"prompt": ["q"], "completions": [["a"]]})
    with pytest.raises(ValueError, match="one score per completion"):
        make_trainer(
            tiny_model_dir, tmp_path, data={"prompt": ["q"], "completions": [["a", "b"]], "scores": [[1.0]]}
        )

    spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "recipes" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(recipe)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "never")]
    assert recipe.cli([*argv, "--dataset_name", str(tmp_path / "missing")]) == 2
    Dataset.from_dict({"prompt": ["q"]}).save_to_disk(str(tmp_path / "bad"))
    assert recipe.cli([*argv, "--dataset_name", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "never").exists()


def test_loss_is_reusable_inside_trls_sft_trainer(tiny_model_dir, tmp_path):
    """Another TRL trainer (SFTTrainer) trains on comparison groups by calling `stable_alignment_loss`."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.utils import selective_log_softmax

    class GroupSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            labels = inputs["input_ids"][:, 1:]
            token_mask = inputs["completion_mask"][:, 1:].float()
            token_logps = selective_log_softmax(logits[:, :-1], labels) * token_mask
            sequence_nll = -token_logps.sum(1) / token_mask.sum(1)
            group_mask = inputs["group_mask"]
            nll = sequence_nll.new_zeros(group_mask.shape).masked_scatter(group_mask, sequence_nll)
            return stable_alignment_loss(
                nll, inputs["scores"], group_mask, margin=1.0, ratio=0.5, rating_scale=7.0
            )

    # The groups are tokenized and collated by this project's trainer pieces; SFTTrainer only runs the loop.
    reference = make_trainer(tiny_model_dir, tmp_path / "prep")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = model.lm_head.weight.detach().clone()
    trainer = GroupSFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            use_cpu=True,
            bf16=False,
            max_steps=1,
            learning_rate=1e-3,
            per_device_train_batch_size=2,
            report_to=[],
            remove_unused_columns=False,
            gradient_checkpointing=False,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
        train_dataset=reference.train_dataset,
        data_collator=reference.data_collator,
        processing_class=reference.processing_class,
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert not torch.equal(before, model.lm_head.weight)


def test_recipe_loads_groups_from_folders_and_files(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "recipes" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)
    spec.loader.exec_module(recipe)
    groups = Dataset.from_dict(conversational(TEXT_GROUPS))
    groups.save_to_disk(str(tmp_path / "plain"))
    groups.to_parquet(str(tmp_path / "groups.parquet"))
    groups.to_json(str(tmp_path / "groups.jsonl"))
    from datasets import DatasetDict

    DatasetDict({"train": groups, "test": groups.select([0])}).save_to_disk(str(tmp_path / "out" / "mixed"))
    for name, config in [
        (tmp_path / "plain", None),
        (tmp_path / "out", "mixed"),
        (tmp_path / "groups.parquet", None),
        (tmp_path / "groups.jsonl", None),
    ]:
        loaded = recipe.load_comparison_groups(str(name), config)
        assert loaded["train"]["scores"] == TEXT_GROUPS["scores"], name
        assert loaded["train"][0]["completions"][0] == [
            {"role": "assistant", "content": " Honesty is kindness."}
        ]
    assert len(recipe.load_comparison_groups(str(tmp_path / "out"), "mixed")["test"]) == 1
