"""The trainer's contracts with what surrounds it: TRL's private names, TRL's script arguments, and the groups
`run_transform` writes (one real training step on them)."""

from __future__ import annotations

import ast
import importlib
import math
from pathlib import Path

import pytest
import torch
import trl

from pipeline.errors import UserError
from pipeline.records import SCORE_FIELDS, new_record
from pipeline.shards import shard_name, world_folder, write_shard
from pipeline.transform import TransformConfig, run_transform
from trainers import StableAlignmentConfig, StableAlignmentTrainer
from trainers.data import ScriptArguments, load_comparison_groups, validate_groups

ROOT = Path(__file__).resolve().parents[1]


def missing_trl_names(source: str) -> list[str]:
    """`module.name` of each name a `from trl... import name` in `source` asks for and TRL does not provide."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trl":
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    return missing


def test_every_private_trl_name_still_exists():
    source = (ROOT / "trainers" / "_trl.py").read_text()
    assert "_BaseTrainer" in source and "add_fused_lm_head" in source
    missing = missing_trl_names(source)
    assert not missing, f"trl {trl.__version__} no longer provides {missing}: update trainers/_trl.py"


def test_the_check_names_a_moved_symbol():
    source = "from trl.trainer.utils import pad, moved_helper\nfrom trl import SFTTrainer, GoneTrainer\n"
    assert missing_trl_names(source) == ["trl.trainer.utils.moved_helper", "trl.GoneTrainer"]


def test_only_trainers_trl_imports_trls_submodules():
    """Elsewhere, only TRL's public top-level names: a TRL release that moves its internals breaks one module."""
    files = [p for p in (ROOT / "trainers").glob("*.py") if p.name != "_trl.py"] + [
        ROOT / "recipes" / "train.py"
    ]
    offenders = [
        f"{path.relative_to(ROOT)}: {node.module}"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl.")
    ]
    assert not offenders


def test_script_arguments_are_trls():
    assert issubclass(ScriptArguments, trl.ScriptArguments)
    assert ScriptArguments(dataset_name="groups").dataset_train_split == "train"
    with pytest.raises(UserError, match="dataset_streaming"):
        ScriptArguments(dataset_name="groups", dataset_streaming=True)


def test_run_transform_output_trains_one_step(tiny_model_dir, tmp_path):
    """Records written as the simulation writes them -> `run_transform` -> the recipe's loader -> one trainer step."""
    records = [
        new_record(
            run_id="run-a",
            world_id="w0",
            round=0,
            agent_id=i,
            stance="good",
            question=f"Is it ever acceptable to lie to protect a friend's feelings? ({i})",
            draft="Sure, lie whenever it helps you.",
            feedback=[
                {"agent_id": 1, "rating": 5.0, "reason": "fair", "raw": "Rating: 5"},
                {"agent_id": 2, "rating": 2.0, "reason": "harsh", "raw": "Rating: 2"},
            ],
            revision="Honesty, kindness and fairness matter when we disagree.",
            scores={
                "alignment_before": 3.0,
                "alignment_after": 6.0,
                "engagement_before": 4.0,
                "engagement_after": 5.0,
            },
            observer_reasons=dict.fromkeys(SCORE_FIELDS, "ok"),
            agent_model="agent-lm",
            observer_model="observer-lm",
            prompt_version="v1",
        )
        for i in range(4)
    ]
    run = tmp_path / "run"
    shard = world_folder(run, "w0") / shard_name(0, 0)
    shard.parent.mkdir(parents=True)
    write_shard(shard, records)
    config = TransformConfig(
        inputs=[str(run)],
        output=str(tmp_path / "groups"),
        style="conversational",
        cache_dir=str(tmp_path / "cache"),
    )
    result = run_transform(config)

    groups = load_comparison_groups(str(result.output), "mixed")["train"]
    assert len(groups) == len(result.configs["mixed"]) > 0
    args = StableAlignmentConfig(
        output_dir=str(tmp_path / "model"),
        use_cpu=True,
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        activation_checkpointing=False,
    )
    validate_groups(groups, args.rating_scale)
    trainer = StableAlignmentTrainer(model=str(tiny_model_dir), args=args, train_dataset=groups)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 1
    assert (
        math.isfinite(trainer.state.log_history[0]["loss"]) and trainer.state.log_history[0]["nll/best"] > 0
    )
    assert not torch.equal(before, trainer.model.lm_head.weight)
