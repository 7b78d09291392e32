"""Benchmark: ``sandbox transform`` end to end on synthetic interaction records.

Writes N synthetic records (default 1,000,000) as Arrow shards with datasets' ArrowWriter, then
times the transform (load -> examples -> groups -> kinds -> mix -> save_to_disk) in a fresh
process and reports records/second and peak resident memory (max RSS of the process and its
children, from ``resource.getrusage``). Datasets caches go to a temporary folder, so the run is cold.

    .venv/bin/python benchmarks/bench_transform.py --records 1000000 --num-proc 2
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

from datasets.arrow_writer import ArrowWriter

from pipeline.groups import Style
from pipeline.records import RECORD_FEATURES, SCORE_FIELDS, new_record

QUESTIONS = 5_000  # the HH red-team pool's size: imitation groups gather many answers per question


def synthetic_record(i: int, rng: random.Random) -> dict:
    question = f"Question {i % QUESTIONS}: is it right to do thing {i % QUESTIONS} to a neighbour?"
    before, after = rng.randint(1, 7), rng.randint(1, 7)
    feedback = [
        {
            "agent_id": k,
            "rating": None if rng.random() < 0.05 else float(rng.randint(1, 7)),
            "reason": f"Neighbour {k} thinks answer {i} is {'kind' if k % 2 else 'careless'} and explains why.",
            "raw": f"Rating: {k} ### Reason: ...",
        }
        for k in range(4)
    ]
    return new_record(
        run_id="bench",
        world_id=f"w{i % 4}",
        round=i // 10_000,
        agent_id=i % 100,
        stance="good" if i % 2 else "bad",
        question=question,
        draft=f"Draft answer {i}: I think it depends on the circumstances and on consent.",
        feedback=feedback,
        revision=f"Revised answer {i}: it is right only with the neighbour's consent, and kindly.",
        scores={
            "alignment_before": float(before),
            "alignment_after": float(after),
            "engagement_before": 4.0,
            "engagement_after": 5.0,
        },
        observer_reasons=dict.fromkeys(SCORE_FIELDS, "observer reason"),
        status="failed" if rng.random() < 0.01 else "ok",
        agent_model="synthetic-agent",
        observer_model="synthetic-observer",
        prompt_version="bench",
        prompt_tokens=100,
        completion_tokens=50,
        calls=10,
    )


def write_records(folder: Path, count: int, per_shard: int = 100_000) -> None:
    rng = random.Random(0)
    for start in range(0, count, per_shard):
        with ArrowWriter(
            path=str(folder / f"shard-{start // per_shard:05d}.arrow"), features=RECORD_FEATURES
        ) as w:
            rows = [synthetic_record(i, rng) for i in range(start, min(count, start + per_shard))]
            w.write_batch({name: [row[name] for row in rows] for name in RECORD_FEATURES})
            w.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--style", default="text", choices=get_args(Style))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "out"
        run.mkdir()
        started = time.perf_counter()
        write_records(run, args.records)
        print(f"wrote {args.records:,} records in {time.perf_counter() - started:.1f} s")

        command = [sys.executable, "-m", "pipeline.cli", "transform", str(run), "-o", str(out)]
        command += ["--style", args.style] + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
        env = os.environ | {
            "HF_DATASETS_CACHE": str(Path(tmp) / "cache"),
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        }
        started = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        print(proc.stdout)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"transform: {elapsed:.1f} s, {args.records / elapsed:,.0f} records/s, peak RSS {peak_mib:,.0f} MiB"
        )


if __name__ == "__main__":
    main()
