"""How far training moves the labelled test pairs, on data of their own kind or on a society's groups.

    .venv/bin/python benchmarks/bench_ceiling.py [--data prior | dev | GROUPS_DIR] [--epochs 1]
        [--score test | dev] [--output DIR] [--model MODEL_DIR] [TRAINING FLAGS ...]

``make run`` measures preference accuracy on the labelled test pairs (`pipeline/data/judge_pairs.jsonl`)
before and after training on the society's comparison groups. This benchmark trains the same way
(`recipes/train.py --config recipes/configs/train_demo.yaml`, one process) on other data and reports the
same measure, so a society's gain can be read against what clean data of the labelled pairs' kind gives:

- ``prior``: the shipped prior's good/bad pairs (`pipeline/data/default_prior.jsonl`, the stances the
  society's memories are seeded with), one group of two per question, scored 7 and 1;
- ``dev``: the labelled pairs' dev half (alignment), the same way (the test half is never trained on);
- a folder of comparison groups, e.g. a make run's ``data/mixed``.

Flags it does not know go to ``recipes/train.py`` (``--ratio 0``, ``--margin 10``), so training settings
can be compared; compare them on ``--score dev`` (the dev half; not with ``--data dev``) and keep the
test half for the one reading of the chosen setting.

Accuracy is scored as ``sandbox evaluate`` scores it (bfloat16 autocast over float32 weights) and printed
with its 95% Wilson interval, for the base model and the trained one, next to each model's mean
preference margin (NLL of the bad answer minus the good one's) and the trained model's paired margin
difference from the base with its 95% t interval.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import Dataset

from pipeline import launch
from pipeline.convert import pairs_to_groups
from pipeline.embedded import embedded_model_path
from pipeline.separability import JudgePair, load_judge_pairs, prior_pairs
from pipeline.textio import format_table
from trainers.preference import Scorer, labelled_pairs, paired_difference, question_prompt

ROOT = Path(__file__).resolve().parents[1]


def labelled_kind_pairs(source: str) -> list[JudgePair]:
    """The shipped prior's good/bad pairs, or the labelled pairs' dev half (alignment)."""
    return load_judge_pairs("alignment", "dev") if source == "dev" else prior_pairs()


def write_groups(source: str, folder: Path) -> int:
    """Comparison groups of two (good over bad) from ``source``'s pairs, saved to ``folder``."""
    pairs = labelled_kind_pairs(source)
    rows = [
        {
            "prompt": question_prompt(pair.question),
            "chosen": [{"role": "assistant", "content": pair.good}],
            "rejected": [{"role": "assistant", "content": pair.bad}],
        }
        for pair in pairs
    ]
    pairs_to_groups(Dataset.from_list(rows)).save_to_disk(str(folder))
    return len(rows)


def train(model: str, data: Path, output: Path, epochs: float, flags: list[str]) -> None:
    command = launch.train_command(
        config=ROOT / "recipes" / "configs" / "train_demo.yaml",
        model=model,
        dataset=data,
        output_dir=output,
        extra=["--num_train_epochs", str(epochs), "--save_strategy", "no", "--disable_tqdm", "true", *flags],
    )
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="prior", help="prior, dev, or a folder of comparison groups")
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs (make run: 1)")
    parser.add_argument("--output", default="outputs/bench_ceiling", help="where the groups and the model go")
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    parser.add_argument(
        "--score", choices=("test", "dev"), default="test", help="the labelled half scored (make run: test)"
    )
    args, flags = parser.parse_known_args()
    if args.score == "dev" and args.data == "dev":
        parser.error("--score dev after --data dev would score the pairs trained on")

    output = Path(args.output)
    base = args.model or str(embedded_model_path())
    if args.data in ("prior", "dev"):
        data = output / f"groups-{args.data}"
        print(f"{write_groups(args.data, data)} groups of two from {args.data} -> {data}")
    else:
        data = Path(args.data)
        if not data.is_dir():
            parser.error(f"--data {args.data}: not prior, dev or a folder of comparison groups")
    trained = output / "model"
    train(base, data, trained, args.epochs, flags)

    pairs = labelled_pairs(split=args.score)
    rows, margins = [], {}
    for name, path in (("base", base), ("trained", str(trained))):
        estimate, margins[name] = Scorer.load(path, autocast="bfloat16").preference(pairs)
        mean = sum(margins[name]) / len(margins[name])
        rows.append(
            (
                name,
                f"{estimate.value:.2f} [{estimate.low:.2f}, {estimate.high:.2f}]",
                f"{mean:+.3f}",
                estimate.n,
            )
        )
    shift = paired_difference(margins["base"], margins["trained"])
    settings = " ".join([f"{args.epochs:g} epoch(s)", *flags])
    print(f"\nlabelled {args.score} pairs after training on {args.data} ({settings}):")
    print(format_table(("model", "preference accuracy", "mean margin", "n"), rows))
    print(f"margin, trained - base: {shift.value:+.3f} [{shift.low:+.3f}, {shift.high:+.3f}] (n={shift.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
