"""Preference accuracy in float32 against bfloat16 autocast over float32 weights: time and agreement.

    .venv/bin/python benchmarks/bench_preference.py [--model embedded | MODEL_DIR ...] [--scores EVAL/scores]
        [--baseline NAME]

Scores the labelled test pairs (alignment) and, with ``--scores`` (an evaluation's ``scores/`` folder of
sampled answers), the ``--baseline`` model's best vs worst answer to each question, as ``sandbox evaluate``
does, once in float32 and once under bfloat16 autocast, and prints per model the seconds, both accuracies,
the largest and mean NLL difference and how many pairs changed side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.embedded import embedded_model_path
from trainers.preference import PreferencePair, Scorer, answer_pairs, labelled_pairs, preference_from_nlls


def timed_nlls(scorer: Scorer, pairs: list[PreferencePair]) -> tuple[list[tuple[float, float]], float]:
    start = time.perf_counter()
    nlls = scorer.pair_nlls(pairs)
    return nlls, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["embedded"], help="embedded or model folders")
    parser.add_argument("--scores", help="an evaluation's scores/ folder (sampled answers)")
    parser.add_argument("--baseline", default="SmolLM2 (base)", help="whose answers make the held-out pairs")
    args = parser.parse_args()

    pairs = labelled_pairs()
    if args.scores:
        from datasets import load_from_disk

        pairs += answer_pairs(load_from_disk(args.scores).to_list(), args.baseline)
    print(f"{len(pairs)} pairs")
    for reference in args.model:
        path = embedded_model_path() if reference == "embedded" else reference
        full, full_s = timed_nlls(Scorer.load(path), pairs)
        auto, auto_s = timed_nlls(Scorer.load(path, autocast="bfloat16"), pairs)
        differences = [abs(a - b) for x, y in zip(full, auto, strict=True) for a, b in zip(x, y, strict=True)]
        flipped = sum((x[0] < x[1]) != (y[0] < y[1]) for x, y in zip(full, auto, strict=True))
        accuracy = [preference_from_nlls([g for g, _ in n], [b for _, b in n]).value for n in (full, auto)]
        print(
            f"{reference}: float32 {full_s:.1f} s, accuracy {accuracy[0]:.3f}; bfloat16 autocast {auto_s:.1f} s, "
            f"accuracy {accuracy[1]:.3f}; NLL difference max {max(differences):.3f} mean "
            f"{statistics.fmean(differences):.4f}; {flipped} of {len(pairs)} pairs flipped"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
