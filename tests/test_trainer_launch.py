"""Real multi-process launches of recipes/train.py on CPU: DDP and DeepSpeed ZeRO-2 / ZeRO-3, 2 processes each, and
a launch on bad data that every process refuses before training."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")

# `--cpu` would silently run one process; without GPUs, `--multi_gpu` runs DDP over gloo and DeepSpeed falls back to
# its CPU accelerator.
LAUNCHES = {
    "ddp": ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"],
    "zero2": [
        "--config_file",
        "accelerate_configs/deepspeed_zero2.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ],
    "zero3": [
        "--config_file",
        "accelerate_configs/deepspeed_zero3.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ],
}
DISTRIBUTED_TYPE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


@pytest.fixture(scope="module")
def groups_dir(tmp_path_factory) -> Path:
    """A `save_to_disk` folder with one subfolder per config, as the transforms stage writes it."""
    rows = {
        "prompt": [
            [{"role": "user", "content": q}] for q in ("Is it ok to lie?", "Share credit?", "Skip the queue?")
        ],
        "completions": [
            [[{"role": "assistant", "content": a}] for a in answers]
            for answers in (
                ["Honesty matters.", "Sure.", "It depends."],
                ["Yes, share it."],
                ["No.", "Push ahead."],
            )
        ],
        "scores": [[6.0, 2.0, 4.0], [7.0], [6.0, 1.0]],
    }
    folder = tmp_path_factory.mktemp("groups")
    DatasetDict({"train": Dataset.from_dict({k: v * 4 for k, v in rows.items()})}).save_to_disk(
        folder / "mixed"
    )
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(launch_args: list[str], recipe_args: list[str]) -> subprocess.CompletedProcess:
    command = [
        str(ACCELERATE), "launch", *launch_args, "--main_process_port", str(free_port()),
        "recipes/train.py", "--config", "recipes/configs/train_tiny_cpu.yaml", *recipe_args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_two_process_launch_trains_and_saves_a_reloadable_model(launch, tiny_model_dir, groups_dir, tmp_path):
    output_dir = tmp_path / "out"
    result = accelerate_launch(
        LAUNCHES[launch],
        ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(groups_dir), "--dataset_config", "mixed",
         "--output_dir", str(output_dir)],
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # The world size is printed by the main process from the trainer's accelerator: 2 really ran.
    assert f"2 process(es), distributed type DistributedType.{DISTRIBUTED_TYPE[launch]}" in output, output[
        -3000:
    ]
    losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", output)]
    assert len(losses) == 3
    assert f"Model saved to {output_dir}" in output

    trained = AutoModelForCausalLM.from_pretrained(output_dir)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, a), b in zip(trained.named_parameters(), initial.parameters(), strict=True):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    assert "stable-alignment" in (output_dir / "README.md").read_text()


# Leaves gloo worker threads holding tensors while the interpreter would finalize. Exiting through `sys.exit`
# instead, 10 of 12 such launches aborted with "terminate called without an active exception".
PENDING_GLOO_WORK = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from pipeline.errors import exit_process

dist.init_process_group("gloo")
works = [dist.all_reduce(torch.ones(250_000), async_op=True) for _ in range(100)]
del works
print(f"rank {{dist.get_rank()}} queued its all-reduces")
exit_process(0)
"""


@pytest.mark.slow
def test_exit_process_leaves_cleanly_while_gloo_workers_hold_tensors(tmp_path):
    script = tmp_path / "pending.py"
    script.write_text(PENDING_GLOO_WORK.format(root=str(ROOT)))
    # Three launches: with a plain exit, each aborts about 4 times in 5
    for _ in range(3):
        command = [
            str(ACCELERATE),
            "launch",
            *LAUNCHES["ddp"],
            "--main_process_port",
            str(free_port()),
            str(script),
        ]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        # What each process printed before `os._exit` was flushed
        assert "rank 0 queued its all-reduces" in output and "rank 1 queued its all-reduces" in output, output


@pytest.mark.slow
def test_two_process_launch_refuses_a_nan_score_on_every_process_before_training(tiny_model_dir, tmp_path):
    data = tmp_path / "groups.parquet"
    scores = [[6.0, 2.0], [7.0, float("nan")]]
    Dataset.from_dict(
        {"prompt": ["q", "r"], "completions": [["a", "b"], ["c", "d"]], "scores": scores}
    ).to_parquet(data)
    output_dir = tmp_path / "out"
    result = accelerate_launch(
        LAUNCHES["ddp"],
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(output_dir),
        ],
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # The first line that reports an error is the recipe's own, naming the row (accelerate adds its lines after it)
    first_error = next(line for line in output.splitlines() if "error" in line.lower())
    assert first_error == (
        f"train.py: error: row 1 of split 'train' of {data}: the score nan must be a finite number"
    ), output[-3000:]
    assert "process(es)" not in output and not output_dir.exists()
