"""The main job (`make run`): simulate -> transform -> train -> evaluate on the embedded SmolLM2.

Each stage is a command a user can run alone (it is printed before it runs). A stage whose output
is complete is skipped, so an interrupted run resumes from the finished stages; the simulation
itself resumes mid-round from its shards, and training from its last checkpoint.

Environment: ``RUN_DIR`` (default ``outputs/demo``) holds everything the job writes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline.embedded import embedded_model_path
from pipeline.plots import summary_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
RUN_DIR = Path(os.environ.get("RUN_DIR", ROOT / "outputs" / "demo"))
SIM, DATA, MODEL, EVAL = (RUN_DIR / name for name in ("sandbox", "data", "model", "eval"))
HELDOUT = ROOT / "pipeline" / "data" / "heldout_questions.txt"


def sandbox(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def stages() -> list[tuple[str, Path, list[str]]]:
    """(name, file that exists once the stage is complete, command)."""
    checkpoints = sorted(MODEL.glob("checkpoint-*"))
    resume = ["--resume_from_checkpoint", str(checkpoints[-1])] if checkpoints else []
    return [
        (
            "simulate",
            SIM / "summary.json",
            sandbox("simulate", "--config", str(CONFIGS / "simulate_demo.yaml"), "--output", str(SIM)),
        ),
        (
            "transform",
            DATA / "summary.json",
            sandbox(
                "transform", str(SIM), "--output", str(DATA), "--style", "conversational", "--seed", "0"
            ),
        ),
        (
            "train",
            MODEL / "model.safetensors",
            [
                sys.executable,
                str(ROOT / "recipes" / "train.py"),
                "--config",
                str(CONFIGS / "train_demo.yaml"),
                "--model_name_or_path",
                str(embedded_model_path()),
                "--dataset_name",
                str(DATA / "mixed"),
                "--output_dir",
                str(MODEL),
                *resume,
            ],
        ),
        (
            "evaluate",
            EVAL / "summary.json",
            sandbox(
                "evaluate",
                "--compare",
                "embedded",
                str(MODEL),
                "--names",
                "SmolLM2 (base)",
                "SmolLM2 (stable alignment)",
                "--questions",
                str(HELDOUT),
                "--simulation-questions",
                str(ROOT / "pipeline" / "data" / "default_questions.txt"),
                "--output",
                str(EVAL),
            ),
        ),
    ]


def main() -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    timings_path = RUN_DIR / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for name, done, command in stages():
        if done.is_file():
            print(f"== {name}: already complete ({done}), skipped", flush=True)
            continue
        print(f"== {name}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, check=False)
        if result.returncode != 0:
            print(f"== {name} failed (exit {result.returncode}); rerun `make run` to resume", file=sys.stderr)
            return result.returncode
        timings[name] = round(time.perf_counter() - start, 1)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")

    print("\n== stage wall times (s):", ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(summary_table(json.loads((SIM / "summary.json").read_text())))
    print((EVAL / "table.txt").read_text())
    print(f"plots: {SIM / 'rounds.png'}, {EVAL / 'evaluation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
