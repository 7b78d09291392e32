"""Converters: groups <-> TRL pairs (trained with DPOTrainer) and the reference implementation's formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_record, write_shard
from datasets import Dataset

from pipeline import convert
from pipeline import transform as tf
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("datasets_cache")


GROUPS = Dataset.from_dict(
    {
        "prompt": ["p1", "p2", "p3"],
        "completions": [["best", "mid", "worst"], ["only"], ["a", "b"]],
        "scores": [[6.0, 4.0, 2.0], [5.0], [3.0, 3.0]],
    }
)


def test_groups_to_pairs_modes() -> None:
    each = convert.groups_to_pairs(GROUPS, "best_vs_each")
    assert each.to_list() == [
        {"prompt": "p1", "chosen": "best", "rejected": "mid", "score_chosen": 6.0, "score_rejected": 4.0},
        {"prompt": "p1", "chosen": "best", "rejected": "worst", "score_chosen": 6.0, "score_rejected": 2.0},
    ]  # the SFT-only group and the tie give no pair
    worst = convert.groups_to_pairs(GROUPS, "best_vs_worst")
    assert [(r["chosen"], r["rejected"]) for r in worst] == [("best", "worst")]
    with pytest.raises(UserError, match="pairing mode"):
        convert.groups_to_pairs(GROUPS, "all")


def test_pairs_round_trip_text_and_conversational(tmp_path: Path) -> None:
    scores = make_record(0)["scores"] | {"alignment_before": 2.0, "alignment_after": 5.0}
    other = make_record(1, question="q0", draft="other draft", revision="other revision", scores=scores)
    records = [make_record(0), other]
    result = tf.transform([write_shard(tmp_path / "s.arrow", records)], style="conversational")
    groups = result.configs["imitation"].select_columns(["prompt", "completions", "scores"])
    back = convert.pairs_to_groups(convert.groups_to_pairs(groups))
    assert back.features["prompt"] == groups.features["prompt"]
    (original,), (rebuilt,) = groups.to_list(), back.to_list()
    assert rebuilt["prompt"] == original["prompt"]
    # every completion but the best appears once as rejected; the best once as chosen: same group
    assert sorted(map(json.dumps, rebuilt["completions"])) == sorted(map(json.dumps, original["completions"]))
    assert dict(zip(map(json.dumps, rebuilt["completions"]), rebuilt["scores"], strict=True)) == dict(
        zip(map(json.dumps, original["completions"]), original["scores"], strict=True)
    )
    # pairs without scores: chosen gets the top of the scale, rejected the bottom
    plain = convert.pairs_to_groups(
        Dataset.from_dict({"prompt": ["x"], "chosen": ["yes"], "rejected": ["no"]})
    )
    assert plain.to_list()[0] | {"run_ids": []} == {
        "prompt": "x",
        "completions": ["yes", "no"],
        "scores": [convert.CHOSEN_SCORE, convert.REJECTED_SCORE],
        "kind": "imitation",
        "sft_only": False,
        "num_sources": 1,
        "run_ids": [],
    }


def test_pairs_train_with_dpo_trainer(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = [make_record(i) for i in range(4)]
    result = tf.transform([write_shard(tmp_path / "s.arrow", records)], style="conversational")
    pairs = convert.groups_to_pairs(result.configs["imitation"])
    assert len(pairs) == 4
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=64,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-3,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not p.detach().equal(before[n]) for n, p in model.named_parameters())


REFERENCE_LOG = [
    {
        "agent_id": 3,
        "label": "bad",
        "iteration": 1,
        "question": "Should I read my partner's messages?",
        "draft_answer": "Yes, secretly.",
        "target_id": [1, 2, 4],
        "feedback": ["Respect privacy.", "Unreadable feedback", "Talk to them instead."],
        "rating": ["6", "8", "5"],
        "revised_answer": "No; talk to your partner openly.",
        "gen_moral_score_before": 2.0,
        "gen_moral_score_after": 6.0,
        "gen_moral_reason_before": "invades privacy",
        "gen_moral_reason_after": "respectful",
        "gen_engagement_score_before": -1.0,
        "gen_engagement_score_after": 5.0,
        "gen_engagement_reason_before": "",
        "gen_engagement_reason_after": "clear",
        "cls_moral_score_before": 0,
        "cls_moral_score_after": 0,
    }
]


def test_import_reference_logs_then_transform(tmp_path: Path) -> None:
    log = tmp_path / "data" / "cache" / "world_7" / "external_memory" / "agent_3.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps(REFERENCE_LOG, indent=2))  # the reference writes a JSON array
    records = convert.import_reference_logs([tmp_path / "data"], agent_model="text-davinci-002")
    (record,) = records.to_list()
    assert record["world_id"] == "7" and record["round"] == 1 and record["stance"] == "bad"
    assert [f["rating"] for f in record["feedback"]] == [6.0, None, 5.0]  # sentinel 8 -> null
    assert all(f["agent_id"] is None for f in record["feedback"])
    assert record["scores"] == {
        "alignment_before": 2.0,
        "alignment_after": 6.0,
        "engagement_before": None,  # sentinel -1 -> null
        "engagement_after": 5.0,
    }
    assert record["observer_reasons"]["alignment_after"] == "respectful"

    out = tmp_path / "out"
    # keep flagged texts: the hand-written log's two-word draft is too short for the quality filters
    argv = [str(tmp_path / "data"), "--input-format", "reference", "-o", str(out), "--keep-flagged"]
    assert tf.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kinds"]["self_critic"]["skipped"]["null_score"] == 1
    assert summary["kinds"]["realignment"]["available"] == 1
    assert summary["quality"]["flags_computed"] == 1  # imported logs get their flags at transform
    assert summary["quality"]["texts"]["draft"]["too_short"] == 1
    assert summary["agent_models"] == []  # the CLI does not know the model: nothing is invented


def test_import_reference_groups(tmp_path: Path) -> None:
    path = tmp_path / "sandbox_v1.json"
    rows = [
        {"query": "Q1", "responses": ["r1", "r2", "r3", "r1"], "scores": [6, 8, 3, 4]},
        {"query": "Q2", "responses": ["s1"], "scores": [-1]},
    ]
    path.write_text(json.dumps(rows))
    groups, dropped = convert.import_reference_groups([path])
    assert dropped == 2
    assert groups.to_list()[0] | {"run_ids": []} == {
        "prompt": "Q1",
        "completions": ["r1", "r3"],
        "scores": [5.0, 3.0],  # the duplicate r1 merged (mean of 6 and 4); the sentinel 8 dropped
        "kind": "mixed",
        "sft_only": False,
        "num_sources": 1,
        "run_ids": [],
    }
    assert len(groups) == 1  # Q2 had no usable response left
    path.write_text(json.dumps([{"query": "Q", "responses": ["a", "b"], "scores": [1]}]))
    with pytest.raises(UserError, match="2 responses but 1 scores"):
        convert.import_reference_groups([path])
