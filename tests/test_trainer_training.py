"""StableAlignmentTrainer on the tiny model: batching, gradient accumulation, PEFT, resume, truncation, reuse."""

from __future__ import annotations

import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import UserError
from trainers import StableAlignmentConfig, StableAlignmentTrainer, stable_alignment_loss
from trainers.data import load_comparison_groups, validate_groups
from trainers.model_card import hub_id, model_card

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
    # Trained from a local folder and saved without a Hub repository: the card names both, never "None"
    assert f"fine-tuned version of the local model `{tiny_model_dir.name}`" in card
    assert f'model="{tmp_path / "out"}"' in card and "None" not in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded.lm_head.weight, trainer.model.lm_head.weight)


def test_model_card_links_hub_models_and_names_local_ones(tmp_path):
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert hub_id(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id(str(tmp_path)) is None and hub_id("a.jsonl,b.jsonl") is None

    common = {"model_name": "m", "trainer_name": "Stable Alignment", "paper": StableAlignmentTrainer._paper}
    card = str(
        model_card(base_model=str(snapshot), location="me/m", tags=["t"], dataset_name="me/groups", **common)
    )
    assert (
        "fine-tuned version of [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/"
        in card
    )
    assert "on [me/groups](https://huggingface.co/datasets/me/groups)" in card and 'model="me/m"' in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    (tmp_path / "g.jsonl").touch()
    local = str(
        model_card(
            base_model=str(tmp_path),
            location="out",
            tags=[],
            dataset_name=str(tmp_path / "g.jsonl"),
            **common,
        )
    )
    assert f"the local model `{tmp_path.name}` on the local dataset `g.jsonl`" in local
    assert "base_model" not in local


def test_eval_diagnostics_are_means_over_groups_not_batches(tiny_model_dir, tmp_path):
    """6 groups in eval batches of 5 and 1: each diagnostic is the mean over the 6 groups, computed here by hand."""
    data = {key: [*values, values[0]] for key, values in TEXT_GROUPS.items()}
    data["prompt"][-1] = "Rating: 2. Reason:"
    trainer = StableAlignmentTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, per_device_eval_batch_size=5),
        train_dataset=Dataset.from_dict(data),
        eval_dataset=Dataset.from_dict(data),
    )
    metrics = trainer.evaluate()

    model = trainer.model.eval()
    best, others = [], []
    for row in trainer.eval_dataset:
        nlls = []
        for completion in row["completion_ids"]:
            ids = torch.tensor([row["prompt_ids"] + completion])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token_logps = logps.gather(1, ids[0, 1:, None])[len(row["prompt_ids"]) - 1 :]
            nlls.append(-token_logps.mean().item())
        top = row["scores"].index(max(row["scores"]))
        best.append(nlls[top])
        if len(nlls) > 1:
            others.append(sum(nll for k, nll in enumerate(nlls) if k != top) / (len(nlls) - 1))
    assert len(best) == 6 and len(others) == 5
    assert metrics["eval_nll/best"] == pytest.approx(sum(best) / 6, abs=1e-4)
    assert metrics["eval_nll/others"] == pytest.approx(sum(others) / 5, abs=1e-4)
    # The mean of the two batch means (what was logged before) is measurably different here
    assert abs((sum(best[:5]) / 5 + best[5]) / 2 - sum(best) / 6) > 1e-3


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


@pytest.mark.parametrize("style", ["conversational", "text"])
def test_completions_cut_by_a_length_limit_learn_no_ending(style, tiny_model_dir, tmp_path):
    data = conversational(TEXT_GROUPS) if style == "conversational" else TEXT_GROUPS
    ended = make_trainer(tiny_model_dir, tmp_path / "a", data=data, max_steps=1)
    open_ended = make_trainer(
        tiny_model_dir, tmp_path / "b", data=data, max_steps=1, train_on_completion_end=False
    )
    tokenizer = ended.processing_class
    for i, group in enumerate(TEXT_GROUPS["completions"]):
        with_end, without = ended.train_dataset[i], open_ended.train_dataset[i]
        assert with_end["prompt_ids"] == without["prompt_ids"]
        for text, ids, cut in zip(group, with_end["completion_ids"], without["completion_ids"], strict=True):
            assert tokenizer.decode(cut) == text  # the answer's own tokens and nothing after them
            assert ids[: len(cut)] == cut and tokenizer.decode(ids[len(cut) :]) in (
                "<|im_end|>\n",
                tokenizer.eos_token,
            )
    losses = [t.train().training_loss for t in (ended, open_ended)]
    assert all(math.isfinite(loss) for loss in losses) and losses[0] != losses[1]


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


def run_recipe(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`python recipes/train.py ARGV`, in this process: its exit status and its stderr."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout on sys.path
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "recipes" / "train.py"), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def test_bad_input_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="scores"):
        make_trainer(tiny_model_dir, tmp_path, data={"prompt": ["q"], "completions": [["a"]]})
    with pytest.raises(ValueError, match="one score per completion"):
        make_trainer(
            tiny_model_dir, tmp_path, data={"prompt": ["q"], "completions": [["a", "b"]], "scores": [[1.0]]}
        )

    argv = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "never")]
    assert run_recipe([*argv, "--dataset_name", str(tmp_path / "missing")], monkeypatch, capsys)[0] == 2
    Dataset.from_dict({"prompt": ["q"]}).save_to_disk(str(tmp_path / "bad"))
    assert run_recipe([*argv, "--dataset_name", str(tmp_path / "bad")], monkeypatch, capsys)[0] == 2
    assert not (tmp_path / "never").exists()


BAD_INPUTS = {
    "scores_shorter": "row 1 of split 'train' of {data} has 2 completion(s) and 1 score(s)",
    "empty_file": "the dataset file {data} is empty",
    "no_model": "no model folder {model}",
    "nan_score": "row 1 of split 'train' of {data}: the score nan must be a finite number",
    "off_scale_score": "row 0 of split 'train' of {data}: the score 70.0 is outside the rating scale [0, 7]",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_recipe_reports_bad_input_in_one_line(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Each bad input a new user may try: one line on stderr, exit 2, no traceback, nothing written."""
    data, model = tmp_path / "groups.parquet", str(tiny_model_dir)
    completions, scores = [["a", "b"], ["c", "d"]], [[6.0, 1.0], [5.0, 2.0]]
    if case == "scores_shorter":
        scores[1] = [5.0]
    elif case == "empty_file":
        data = tmp_path / "groups.jsonl"
        data.touch()
    elif case == "no_model":
        model = str(tmp_path / "no-such-model")
    elif case == "nan_score":
        scores[1][1] = float("nan")
    elif case == "off_scale_score":
        scores[0][0] = 70.0
    if case != "empty_file":
        Dataset.from_dict({"prompt": ["q", "r"], "completions": completions, "scores": scores}).to_parquet(
            data
        )
    argv = [
        "--config", str(ROOT / "recipes" / "configs" / "train_tiny_cpu.yaml"), "--model_name_or_path", model,
        "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    status, stderr = run_recipe(argv, monkeypatch, capsys)
    assert status == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        f"train.py: error: {BAD_INPUTS[case].format(data=data, model=model)}"
    ), stderr
    assert not (tmp_path / "out").exists()


def test_validate_groups_names_the_first_bad_row():
    def check(completions, scores, rating_scale=7.0):
        dataset = Dataset.from_dict(
            {"prompt": ["q"] * len(scores), "completions": completions, "scores": scores}
        )
        validate_groups(dataset, rating_scale, "the groups")

    check([["a", "b"], ["c"]], [[7.0, 0.0], [3]])  # the whole closed scale is allowed
    check([["a"]], [[9.5]], rating_scale=10)
    for completions, scores, message in [
        ([["a"], []], [[1.0], []], "row 1 of the groups has 0 completion(s)"),
        (
            [["a"], ["b", "c"]],
            [[1.0], [1.0, 2.0, 3.0]],
            "row 1 of the groups has 2 completion(s) and 3 score",
        ),
        ([["a", "b"]], [[1.0, None]], "row 0 of the groups: the score nan must be a finite number"),
        ([["a"], ["b"]], [[1.0], [float("inf")]], "row 1 of the groups: the score inf must be"),
        ([["a"], ["b"]], [[1.0], [-1.0]], "row 1 of the groups: the score -1.0 is outside the rating scale"),
        ([["a"]], [["high"]], "the scores of the groups must be lists of numbers"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            check(completions, scores)
    with pytest.raises(UserError, match="holds no comparison group"):
        validate_groups(Dataset.from_dict({"prompt": [], "completions": [], "scores": []}), 7.0, "the groups")
    # Row numbers are those of the dataset as given, after a selection or shuffle
    shuffled = Dataset.from_dict(
        {"prompt": ["q"] * 3, "completions": [["a"]] * 3, "scores": [[1.0], [float("nan")], [2.0]]}
    ).select([1, 0, 2])
    with pytest.raises(UserError, match="row 0 of"):
        validate_groups(shuffled, 7.0)


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


def test_recipe_loads_groups_from_folders_and_files(tmp_path):
    groups = Dataset.from_dict(conversational(TEXT_GROUPS))
    groups.save_to_disk(str(tmp_path / "plain"))
    groups.to_parquet(str(tmp_path / "groups.parquet"))
    groups.to_json(str(tmp_path / "groups.jsonl"))
    DatasetDict({"train": groups, "test": groups.select([0])}).save_to_disk(str(tmp_path / "out" / "mixed"))
    for name, config in [
        (tmp_path / "plain", None),
        (tmp_path / "out", "mixed"),
        (tmp_path / "groups.parquet", None),
        (tmp_path / "groups.jsonl", None),
    ]:
        loaded = load_comparison_groups(str(name), config)
        assert loaded["train"]["scores"] == TEXT_GROUPS["scores"], name
        assert loaded["train"][0]["completions"][0] == [
            {"role": "assistant", "content": " Honesty is kindness."}
        ]
    assert len(load_comparison_groups(str(tmp_path / "out"), "mixed")["test"]) == 1


def test_group_by_length_batches_groups_of_similar_padded_length(tiny_model_dir, tmp_path):
    # Groups whose padded rows (prompt + longest completion) are 4 short and 4 long, shuffled together.
    short, long = " a", " a" + " word" * 60
    data = {
        "prompt": [("Q" + long if i % 2 else "Q") for i in range(8)],
        "completions": [[short, short + " b"] for _ in range(8)],
        "scores": [[5.0, 2.0] for _ in range(8)],
    }
    batches = {}
    for strategy in ("random", "group_by_length"):
        trainer = make_trainer(
            tiny_model_dir,
            tmp_path,
            data=data,
            per_device_train_batch_size=4,
            train_sampling_strategy=strategy,
        )
        batches[strategy] = [batch["input_ids"].shape for batch in trainer.get_train_dataloader()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = sorted(
        len(tokenizer(p + c)["input_ids"]) + 1 for p in data["prompt"] for c in data["completions"][0]
    )
    # Sorted by length, one batch holds the 4 long groups and the other the 4 short: each pads to its own longest.
    assert sorted(batches["group_by_length"]) == [(8, lengths[7]), (8, lengths[-1])]
    trainer = make_trainer(
        tiny_model_dir,
        tmp_path,
        data=data,
        per_device_train_batch_size=4,
        train_sampling_strategy="group_by_length",
    )
    assert trainer.train_dataset["length"] == [lengths[-1] if i % 2 else lengths[7] for i in range(8)]
    trainer.train()  # the length column reaches the collator, which ignores it
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_tokenization_cache_follows_the_functions_code_not_its_name():
    from trainers.trainer import map_fingerprint

    dataset = Dataset.from_dict({"x": [1, 2]})
    first, second, same = {}, {}, {}
    exec("def tokenize(example):\n    return {'y': example['x']}", first)
    exec("def tokenize(example):\n    return {'y': example['x'] + 1}", second)
    exec("def tokenize(example):\n    return {'y': example['x']}", same)
    fingerprints = [map_fingerprint(dataset, ns["tokenize"], {"k": 1}) for ns in (first, second, same)]
    assert fingerprints[0] != fingerprints[1] and fingerprints[0] == fingerprints[2]
    assert map_fingerprint(dataset, first["tokenize"], {"k": 2}) != fingerprints[0]
