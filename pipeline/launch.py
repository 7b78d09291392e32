"""The training command a user types, built for the jobs that launch it (``make run``, ``sandbox loop``).

Training always runs ``recipes/train.py`` in its own process(es), never inside the pipeline: with
``launcher=None`` as ``python recipes/train.py ...`` (one process), otherwise as
``accelerate launch LAUNCHER recipes/train.py ...`` (``--config_file accelerate_configs/...`` for
several GPUs or DeepSpeed). An output folder holding checkpoints resumes from the newest one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-STEP`` folder of a training output folder (by step, not by name)."""
    steps = [
        (int(path.name.rpartition("-")[2]), path)
        for path in Path(output_dir).glob("checkpoint-*")
        if path.name.rpartition("-")[2].isdigit()
    ]
    return max(steps)[1] if steps else None


def train_command(
    *,
    config: str | os.PathLike,
    model: str | os.PathLike,
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    launcher: Sequence[str] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command training ``model`` on the comparison groups ``dataset`` with the recipe ``config``."""
    checkpoint = last_checkpoint(output_dir)
    resume = ["--resume_from_checkpoint", str(checkpoint)] if checkpoint else []
    prefix = [sys.executable] if launcher is None else [str(ACCELERATE), "launch", *launcher]
    return [
        *prefix,
        str(RECIPE),
        "--config",
        str(config),
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(dataset),
        "--output_dir",
        str(output_dir),
        *resume,
        *extra,
    ]


def stop_process(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a server this job started: SIGTERM, then SIGKILL if it has not exited within ``grace`` s."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
