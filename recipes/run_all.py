"""The main job (`make run`): simulate -> transform -> train -> evaluate on the embedded SmolLM2.

Orchestration only: each stage is the library function its command calls (the equivalent command
is printed before it runs), and training runs `recipes/train.py` in its own process, exactly as a
user launches it. A stage whose output is complete is skipped, so an interrupted run resumes from
the finished stages; the simulation itself resumes mid-round from its shards, and training from
its last checkpoint.

The evaluation asks both models the 120 held-out questions (`pipeline/data/heldout_questions.txt`,
never trained on) twice each, sampled with the same seeds for both; the base model's best-
and worst-scored answer to each question make the held-out pairs preference accuracy is measured on
beside the labelled test pairs.

The base model's answers and their observer scores are the same in every run (the same shipped
weights, questions, seeds and observer), so they ship with the project, measured once per dtype the
job can run in: `pipeline/data/base_model_evaluation_{bfloat16,float32}.jsonl.gz`, exported response
caches; the job loads the one of the dtype this CPU runs (bfloat16 where it computes bfloat16, else
float32: `pipeline.precision`) with `--cache-from`. Every request is keyed by everything that shaped
its answer (model, dtype, sampler, messages, parameters), so after a change to any of these the base
model is measured again, and `python recipes/run_all.py --write-base-evaluation [DTYPE]` writes a file
anew. The evaluation time this saves pays for all 120 questions instead of 60.

Environment: ``RUN_DIR`` (default ``outputs/demo``) holds everything the job writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import launch
from pipeline.argparsing import from_dict, load_yaml_config
from pipeline.embedded import embedded_model_path
from pipeline.errors import UserError
from pipeline.evaluate import EvaluationConfig, run_evaluation
from pipeline.llm.cache import ResponseCache
from pipeline.plots import summary_table as rounds_table
from pipeline.precision import usable_dtype
from pipeline.simulate import SimulationConfig, run_simulation
from pipeline.textio import format_table, write_atomic
from pipeline.transform import TransformConfig, run_transform
from pipeline.transform import summary_table as groups_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
DATA_FILES = ROOT / "pipeline" / "data"
RUN_DIR = Path(os.environ.get("RUN_DIR", ROOT / "outputs" / "demo"))
SIM, DATA, MODEL, EVAL = (RUN_DIR / name for name in ("sandbox", "data", "model", "eval"))
HELDOUT = DATA_FILES / "heldout_questions.txt"
# As the society's agents and judge run: bfloat16 answers about twice as fast on 2 cores with AVX512-BF16, and
# the observer then scores with the same calibration that scored the training data.
EVALUATION_DTYPE = "bfloat16"
BASE_EVALUATIONS = {
    dtype: DATA_FILES / f"base_model_evaluation_{dtype}.jsonl.gz" for dtype in ("bfloat16", "float32")
}
"""The shipped evaluations of the base model, by the dtype its weights ran in."""
NAMES = ("SmolLM2 (base)", "SmolLM2 (stable alignment)")


def simulation(output: Path, **overrides: object) -> SimulationConfig:
    data = load_yaml_config(CONFIGS / "simulate_demo.yaml") | {"output": str(output), **overrides}
    return from_dict(SimulationConfig, data)


def simulate() -> None:
    run_simulation(simulation(SIM))


def transform() -> None:
    run_transform(TransformConfig(inputs=[str(SIM)], output=str(DATA), style="conversational"))


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


def base_evaluation_file(dtype: str = EVALUATION_DTYPE) -> Path:
    """The shipped base-model evaluation an evaluation in ``dtype`` replays: the file of the dtype this CPU runs
    it in (a CPU without bfloat16 instructions runs bfloat16 in float32)."""
    return BASE_EVALUATIONS[usable_dtype(dtype, "cpu")]


def evaluation(**overrides: Any) -> EvaluationConfig:
    """make run's evaluation (``overrides`` replace its settings)."""
    dtype = overrides.get("dtype", EVALUATION_DTYPE)
    settings: dict[str, Any] = dict(
        compare=["embedded", str(MODEL)],
        names=list(NAMES),
        # All 120: the paired difference's interval narrows with the number of answers (a question's
        # two answers differ about as much as two questions do); on 40 questions the same models gave
        # +0.13, +0.06 and +0.24. The shipped base-model evaluation pays for the other 60.
        questions=str(HELDOUT),
        simulation_questions=str(DATA_FILES / "default_questions.txt"),
        dtype=dtype,
        # Greedy answers of the 135M model loop (a third of them), and one loop decides a greedy paired
        # difference; sampled answers (as the society samples) measure the model rather than its loops.
        # Two a question, not three: the third would take the job past 15 minutes on 2 cores.
        samples=2,
        temperature=0.7,
        top_p=0.9,
        concurrency=120,  # a batch of 120 answers at a time
        cache_from=[str(base_evaluation_file(dtype))],
        output=str(EVAL),
    )
    return EvaluationConfig(**(settings | overrides))


def base_evaluation(**overrides: Any) -> EvaluationConfig:
    """make run's evaluation of the base model alone, its answers and scores only (``overrides`` as above):
    preference accuracy is not a response-cache call, so the job measures it in every run."""
    return evaluation(
        **{"compare": None, "model": "embedded", "names": [NAMES[0]], "preference": False, **overrides}
    )


def write_base_evaluation(dtype: str = EVALUATION_DTYPE) -> None:
    """Evaluate the base model alone in ``dtype``, as make run does, and write its responses to the shipped file
    an evaluation in that dtype replays on this CPU."""
    path = base_evaluation_file(dtype)
    with tempfile.TemporaryDirectory() as folder:
        config = base_evaluation(dtype=dtype, cache_from=None, output=folder)
        run_evaluation(config)
        count = ResponseCache(config.cache or "").export(path)
    print(f"{count} responses written to {path}")


def evaluate() -> None:
    run_evaluation(evaluation())


def evaluate_command() -> str:
    config = evaluation()
    return sandbox(
        "evaluate", "--compare", *config.references, "--names", *NAMES, "--questions", str(config.questions),
        "--dtype", config.dtype, "--samples", str(config.samples),
        "--temperature", str(config.temperature), "--top-p", str(config.top_p),
        "--concurrency", str(config.concurrency), "--cache-from", *(config.cache_from or []),
        "--output", str(EVAL),
    )  # fmt: skip


def sandbox(*args: str) -> str:
    return shlex.join(["sandbox", *args])


def stages() -> list[tuple[str, Path, str, Callable[[], None]]]:
    """(name, file that exists once the stage is complete, the equivalent command, the stage)."""
    demo = str(CONFIGS / "simulate_demo.yaml")
    return [
        ("simulate", SIM / "summary.json", sandbox("simulate", "--config", demo, "-o", str(SIM)), simulate),
        (
            "transform",
            DATA / "summary.json",
            sandbox("transform", str(SIM), "-o", str(DATA), "--style", "conversational"),
            transform,
        ),
        ("train", MODEL / "model.safetensors", shlex.join(train_command()), train),
        ("evaluate", EVAL / "summary.json", evaluate_command(), evaluate),
    ]


GOAL_PREFERENCE_GAIN = 0.10
"""The demo's goal: trained minus base preference accuracy on the labelled test pairs."""


def goals(evaluation: dict) -> str:
    """The demo's goals for what training changes, each with its measured figure and whether it was met.

    No point estimate may fall: the preference accuracies, the paired preference margins (the continuous
    reading of the same pairs, which can fall while no pair changes side) and the observer scores."""
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
    ]
    fell += [
        f"{d['pairs']} margin"
        for d in evaluation.get("preference_margin_differences", [])
        if d["model"] == trained and d["mean"] is not None and d["mean"] < 0
    ]
    fell += [
        f"{aspect} score" for aspect, d in differences.items() if d["mean"] is not None and d["mean"] < 0
    ]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-base-evaluation",
        nargs="?",
        const=EVALUATION_DTYPE,
        choices=sorted(BASE_EVALUATIONS),
        metavar="DTYPE",
        help="only evaluate the base model, as the job does, in DTYPE (default: the job's, bfloat16, which a CPU "
        "without bfloat16 instructions runs in float32) and write its shipped file anew: "
        + ", ".join(path.name for path in BASE_EVALUATIONS.values()),
    )
    dtype = parser.parse_args(argv).write_base_evaluation
    if dtype:
        write_base_evaluation(dtype)
        return 0
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
