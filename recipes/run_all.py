"""The main job (`make run`): simulate -> transform -> train -> evaluate on the embedded SmolLM2.

Orchestration only: each stage is the library function its command calls (the equivalent command
is printed before it runs), and training runs `recipes/train.py` in its own process, exactly as a
user launches it. A stage whose output is complete is skipped, so an interrupted run resumes from
the finished stages; the simulation itself resumes mid-round from its shards, and training from
its last checkpoint.

Besides the training society, a small held-out society (one round, two worlds) answers questions the training never sees
(`pipeline/data/heldout_questions.txt`); its comparison groups, judged by the same observers, are
one of the two sets preference accuracy is measured on (the other: the labelled test pairs).

Environment: ``RUN_DIR`` (default ``outputs/demo``) holds everything the job writes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import launch
from pipeline.argparsing import from_dict, load_yaml_config
from pipeline.embedded import embedded_model_path
from pipeline.errors import UserError
from pipeline.evaluate import EvaluationConfig, run_evaluation
from pipeline.plots import summary_table as rounds_table
from pipeline.simulate import SimulationConfig, run_simulation
from pipeline.textio import format_table, write_atomic
from pipeline.transform import TransformConfig, run_transform
from pipeline.transform import summary_table as groups_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
DATA_FILES = ROOT / "pipeline" / "data"
RUN_DIR = Path(os.environ.get("RUN_DIR", ROOT / "outputs" / "demo"))
SIM, DATA, MODEL, EVAL = (RUN_DIR / name for name in ("sandbox", "data", "model", "eval"))
HELDOUT_SIM, HELDOUT_DATA = RUN_DIR / "heldout-sandbox", RUN_DIR / "heldout-data"
HELDOUT = DATA_FILES / "heldout_questions.txt"
NAMES = ("SmolLM2 (base)", "SmolLM2 (stable alignment)")


def simulation(output: Path, **overrides: object) -> SimulationConfig:
    data = load_yaml_config(CONFIGS / "simulate_demo.yaml") | {"output": str(output), **overrides}
    return from_dict(SimulationConfig, data)


def simulate() -> None:
    run_simulation(simulation(SIM))


HELDOUT_SETTINGS = {"questions": str(HELDOUT), "rounds": 1, "seeds": [0, 1]}
"""The held-out society: one round of two of the demo's worlds on the held-out questions."""


def simulate_heldout() -> None:
    run_simulation(simulation(HELDOUT_SIM, **HELDOUT_SETTINGS))


def transform() -> None:
    run_transform(TransformConfig(inputs=[str(SIM)], output=str(DATA), style="conversational"))


def transform_heldout() -> None:
    run_transform(
        TransformConfig(inputs=[str(HELDOUT_SIM)], output=str(HELDOUT_DATA), style="conversational")
    )


def train_command() -> list[str]:
    return launch.train_command(
        config=CONFIGS / "train_demo.yaml",
        model=embedded_model_path(),
        dataset=DATA / "mixed",
        output_dir=MODEL,
    )


def train() -> None:
    result = subprocess.run(train_command(), cwd=ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"training failed (exit {result.returncode})")


def evaluation() -> EvaluationConfig:
    return EvaluationConfig(
        compare=["embedded", str(MODEL)],
        names=list(NAMES),
        questions=str(HELDOUT),
        simulation_questions=str(DATA_FILES / "default_questions.txt"),
        heldout_groups=str(HELDOUT_DATA),
        # As the society's agents and judge run: bfloat16 answers about twice as fast on 2 cores, and
        # the observer then scores with the same calibration that scored the training data.
        dtype="bfloat16",
        concurrency=40,  # every held-out question in one batch
        output=str(EVAL),
    )


def evaluate() -> None:
    run_evaluation(evaluation())


def sandbox(*args: str) -> str:
    return shlex.join(["sandbox", *args])


def stages() -> list[tuple[str, Path, str, Callable[[], None]]]:
    """(name, file that exists once the stage is complete, the equivalent command, the stage)."""
    demo = str(CONFIGS / "simulate_demo.yaml")
    return [
        ("simulate", SIM / "summary.json", sandbox("simulate", "--config", demo, "-o", str(SIM)), simulate),
        (
            "simulate held-out",
            HELDOUT_SIM / "summary.json",
            sandbox(
                "simulate",
                "--config",
                demo,
                "-o",
                str(HELDOUT_SIM),
                "--questions",
                str(HELDOUT),
                "--rounds",
                "1",
                "--seeds",
                "0",
                "1",
            ),
            simulate_heldout,
        ),
        (
            "transform",
            DATA / "summary.json",
            sandbox("transform", str(SIM), "-o", str(DATA), "--style", "conversational"),
            transform,
        ),
        (
            "transform held-out",
            HELDOUT_DATA / "summary.json",
            sandbox("transform", str(HELDOUT_SIM), "-o", str(HELDOUT_DATA), "--style", "conversational"),
            transform_heldout,
        ),
        ("train", MODEL / "model.safetensors", shlex.join(train_command()), train),
        (
            "evaluate",
            EVAL / "summary.json",
            sandbox(
                "evaluate",
                "--compare",
                "embedded",
                str(MODEL),
                "--names",
                *NAMES,
                "--questions",
                str(HELDOUT),
                "--heldout-groups",
                str(HELDOUT_DATA),
                "--dtype",
                evaluation().dtype,
                "--concurrency",
                str(evaluation().concurrency),
                "-o",
                str(EVAL),
            ),
            evaluate,
        ),
    ]


GOAL_PREFERENCE_GAIN = 0.10
"""The demo's goal: trained minus base preference accuracy on the labelled test pairs."""


def goals(evaluation: dict) -> str:
    """The demo's goals for what training changes, each with its measured figure and whether it was met."""
    base, trained = NAMES
    accuracy = {(p["model"], p["pairs"]): p for p in evaluation["preference_accuracy"]}
    differences = {d["aspect"]: d for d in evaluation["paired_differences"] if d["model"] == trained}
    rows = []
    labelled_base, labelled_trained = accuracy.get((base, "labelled")), accuracy.get((trained, "labelled"))
    if (
        labelled_base
        and labelled_trained
        and None not in (labelled_base["accuracy"], labelled_trained["accuracy"])
    ):
        gain = labelled_trained["accuracy"] - labelled_base["accuracy"]
        rows.append(
            (
                f"labelled-pair preference accuracy gain >= {GOAL_PREFERENCE_GAIN * 100:+.0f} points",
                f"{gain * 100:+.1f} points",
                "met" if gain >= GOAL_PREFERENCE_GAIN else "not met",
            )
        )
    alignment = differences.get("alignment")
    if alignment and alignment["low"] is not None:
        rows.append(
            (
                "held-out alignment difference > 0 with its 95% interval",
                f"{alignment['mean']:+.2f} [{alignment['low']:+.2f}, {alignment['high']:+.2f}]",
                "met" if alignment["low"] > 0 else "not met",
            )
        )
    fell = [
        f"{key} accuracy"
        for (model, key), p in accuracy.items()
        if model == trained and p["accuracy"] is not None and p["accuracy"] < accuracy[base, key]["accuracy"]
    ] + [f"{aspect} score" for aspect, d in differences.items() if d["mean"] is not None and d["mean"] < 0]
    rows.append(
        (
            "no point estimate below the base model's",
            ", ".join(fell) or "none fell",
            "not met" if fell else "met",
        )
    )
    return "goals:\n" + format_table(("goal", "measured", ""), rows)


def results() -> str:
    """The one results table of the job: what was trained on, and what training changed."""
    rounds = json.loads((SIM / "summary.json").read_text())
    data = json.loads((DATA / "summary.json").read_text())
    interactions = sum(row["interactions"] for row in rounds)
    failed = sum(row["failed"] for row in rounds)
    kinds = [(kind, info["available"], info["kept_in_mixed"]) for kind, info in data["kinds"].items()]
    trained_on = format_table(("kind", "groups after filters", "in the training mix"), kinds)
    return "\n\n".join(
        [
            f"society: {interactions} interactions ({failed} failed), per round:\n{rounds_table(rounds)}",
            f"comparison groups:\n{groups_table(data)}\n{trained_on}",
            (EVAL / "table.txt").read_text().rstrip(),
            goals(json.loads((EVAL / "summary.json").read_text())),
        ]
    )


def main() -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    timings_path = RUN_DIR / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for name, done, command, stage in stages():
        if done.is_file():
            print(f"== {name}: already complete ({done}), skipped", flush=True)
            continue
        print(f"== {name}: {command}", flush=True)
        start = time.perf_counter()
        try:
            stage()
        except (UserError, RuntimeError) as exc:
            print(f"== {name} failed: {exc}; rerun `make run` to resume", file=sys.stderr)
            return 1
        timings[name] = round(time.perf_counter() - start, 1)
        write_atomic(timings_path, json.dumps(timings, indent=2) + "\n")

    print("\n== stage wall times (s):", ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(results())
    print(f"\nplots: {SIM / 'rounds.png'}, {EVAL / 'evaluation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
