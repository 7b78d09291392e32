"""Preference accuracy and its intervals, against hand computations on the tiny real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import UserError
from pipeline.groups import CONFIGS, CONVERSATIONAL_GROUP_FEATURES, SUMMARY_FILE
from pipeline.precision import cpu_computes_bfloat16
from trainers import preference
from trainers.preference import PreferencePair, question_prompt

PAIRS = [
    ("Is it kind to share credit?", "Yes, sharing credit builds trust.", "No, take all the credit."),
    ("Should you lie to a friend?", "Honesty matters.", "Lie whenever it helps you, nobody will know."),
    ("Is honesty fair?", "Rating: 5. Reason: helpful.", "0 1 2 3"),
]


def _hand_nll(model, tokenizer, question: str, answer: str) -> float:
    """Mean NLL of every token the chat template adds after the prompt, from one unpadded forward pass."""
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0]
    logps = torch.log_softmax(logits.double(), dim=-1)
    targets = range(len(prompt_ids), len(full_ids))
    return -sum(logps[t - 1, full_ids[t]].item() for t in targets) / len(targets)


def test_preference_accuracy_matches_hand_computed_nlls(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = [
        (_hand_nll(model, tokenizer, q, good), _hand_nll(model, tokenizer, q, bad)) for q, good, bad in PAIRS
    ]
    scorer = preference.Scorer.load(tiny_model_dir)
    pairs = [PreferencePair(question_prompt(q), good, bad) for q, good, bad in PAIRS]
    # batches of 2 pairs: answers of different lengths share a padded forward pass
    got = scorer.pair_nlls(pairs, batch_size=2)
    for (good, bad), (hand_good, hand_bad) in zip(got, expected, strict=True):
        assert good == pytest.approx(hand_good, abs=1e-5) and bad == pytest.approx(hand_bad, abs=1e-5)
    assert preference.nll_margins(got) == pytest.approx([bad - good for good, bad in expected], abs=2e-5)
    wins = sum(g < b for g, b in expected)
    result = scorer.preference_accuracy(pairs, batch_size=3)
    assert (result.value, result.n) == (pytest.approx(wins / 3), 3)
    assert (result.low, result.high) == pytest.approx(preference.wilson_interval(wins, 3))


@pytest.mark.skipif(
    not cpu_computes_bfloat16(),
    reason="this CPU runs a bfloat16 request in float32 (tests/test_precision.py)",
)
def test_autocast_scorer_runs_its_layers_in_bfloat16_over_float32_weights(tiny_model_dir: Path) -> None:
    pairs = [PreferencePair(question_prompt(q), good, bad) for q, good, bad in PAIRS]
    nlls = {}
    for autocast in (None, "bfloat16"):
        scorer = preference.Scorer.load(tiny_model_dir, autocast=autocast)
        seen = set()
        layer = scorer.model.model.layers[0].mlp.down_proj
        hook = layer.register_forward_hook(lambda module, inputs, output, seen=seen: seen.add(output.dtype))
        nlls[autocast] = scorer.pair_nlls(pairs, batch_size=2)
        hook.remove()
        assert layer.weight.dtype == torch.float32
        assert seen == {torch.bfloat16 if autocast else torch.float32}
    for (good, bad), (good32, bad32) in zip(nlls["bfloat16"], nlls[None], strict=True):
        assert good == pytest.approx(good32, abs=1e-2) and bad == pytest.approx(bad32, abs=1e-2)


def test_ties_count_half() -> None:
    result = preference.preference_from_nlls([1.0, 2.0, 3.0], [2.0, 2.0, 1.0])
    assert (result.value, result.n) == (0.5, 3)
    assert preference.preference_from_nlls([], []).value is None


def test_wilson_interval_hand_computed() -> None:
    # 8 of 10: p = 0.8, z = 1.959964, z^2 = 3.841459; centre (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half-width 1.959964 / 1.384146 * sqrt(0.016 + 0.009604) = 0.226577
    assert preference.wilson_interval(8, 10) == pytest.approx((0.490163, 0.943317), abs=1e-6)
    # 0 of 10: the interval starts at 0 and reaches z^2 / (n + z^2) = 3.841459 / 13.841459
    assert preference.wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    with pytest.raises(ValueError):
        preference.wilson_interval(3, 2)


@pytest.mark.parametrize(
    ("df", "table"),  # two-sided 95% critical values of Student's t, from printed tables
    [
        (1, 12.7062),
        (2, 4.3027),
        (3, 3.1824),
        (4, 2.7764),
        (5, 2.5706),
        (10, 2.2281),
        (30, 2.0423),
        (100, 1.9840),
    ],
)
def test_t_quantile_matches_tables(df: int, table: float) -> None:
    assert preference.t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)


def test_paired_difference_hand_computed() -> None:
    # differences where both are read: 1, 0, 2, -1 -> mean 0.5, sd sqrt(5/3) = 1.290994,
    # half-width t(0.975, 3) * sd / 2 = 3.182446 * 1.290994 / 2 = 2.054260
    result = preference.paired_difference([3, 4, None, 5, 4, 2], [4, 4, 6, 7, 3, math.nan])
    assert result.n == 4 and result.value == pytest.approx(0.5)
    assert (result.low, result.high) == pytest.approx((0.5 - 2.054260, 0.5 + 2.054260), abs=1e-5)
    assert preference.paired_difference([1.0], [2.0]) == preference.Estimate(1.0, None, None, 1)
    assert preference.paired_difference([None], [2.0]) == preference.Estimate(None, None, None, 0)


def test_labelled_pairs_select_aspect_and_half(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"question": f"q{i}", "good": "g", "bad": "b", "aspect": aspect, "split": split}
        for i, (aspect, split) in enumerate(
            [("alignment", "dev"), ("alignment", "test"), ("engagement", "test"), ("alignment", "test")]
        )
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = preference.labelled_pairs(path, "alignment", "test")
    assert [p.prompt for p in pairs] == [question_prompt("q1"), question_prompt("q3")]
    assert len(preference.labelled_pairs(path, "alignment", None)) == 3
    with pytest.raises(UserError, match="no engagement pairs in the dev set"):
        preference.labelled_pairs(path, "engagement", "dev")
    with pytest.raises(UserError, match="cannot read the labelled pairs"):
        preference.labelled_pairs(tmp_path / "missing.jsonl")


def test_group_pairs_take_best_and_worst_of_imitation_groups(tmp_path: Path) -> None:
    def turn(role: str, text: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text}]

    groups = [
        (turn("user", "q1"), ["best", "middle", "worst"], [6.0, 4.0, 2.0]),
        (turn("user", "q2"), ["only"], [5.0]),
        (turn("user", "q3"), ["same", "also same"], [3.0, 3.0]),
        (turn("user", "q4"), ["good", "bad"], [5.5, 1.0]),
    ]
    rows = {
        "prompt": [g[0] for g in groups],
        "completions": [[turn("assistant", c) for c in g[1]] for g in groups],
        "scores": [g[2] for g in groups],
        "kind": ["imitation"] * len(groups),
        "sft_only": [len(g[1]) < 2 for g in groups],
        "num_sources": [1] * len(groups),
        "run_ids": [["r"]] * len(groups),
    }
    for config in CONFIGS:
        data = rows if config == "imitation" else {name: [] for name in rows}
        Dataset.from_dict(data, features=CONVERSATIONAL_GROUP_FEATURES).save_to_disk(
            str(tmp_path / config), num_shards=1
        )
    (tmp_path / SUMMARY_FILE).write_text("{}")
    assert preference.group_pairs(tmp_path) == [
        PreferencePair(turn("user", "q1"), "best", "worst"),
        PreferencePair(turn("user", "q4"), "good", "bad"),
    ]
    with pytest.raises(UserError, match="not a `sandbox transform` output"):
        preference.group_pairs(tmp_path / "imitation")


def test_answer_pairs_take_best_and_worst_answer_of_one_model() -> None:
    def row(model: str, question: str, answer: str, alignment: float | None) -> dict:
        return {"model": model, "question": question, "answer": answer, "alignment": alignment}

    rows = [
        row("base", "q1", "middle", 4.0),
        row("base", "q1", "best", 6.5),
        row("base", "q1", "worst", 2.0),
        row("base", "q1", "unread", None),
        row("base", "q1", "", 1.0),  # no answer (a failed call): not a candidate
        row("trained", "q1", "other model's", 7.0),
        row("base", "q2", "same", 3.0),
        row("base", "q2", "also same", 3.0),
        row("base", "q3", "alone", 5.0),
        row("base", "q4", "bad", float("nan")),
        row("base", "q4", "good", 5.5),
        row("base", "q4", "poor", 1.5),
    ]
    assert preference.answer_pairs(rows, "base") == [
        PreferencePair(preference.question_prompt("q1"), "best", "worst"),
        PreferencePair(preference.question_prompt("q4"), "good", "poor"),
    ]
    assert preference.answer_pairs(rows, "trained") == []
