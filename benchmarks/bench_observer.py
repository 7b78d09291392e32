"""How well an observer model separates good from bad answers, per judge method, and what a rating costs.

    .venv/bin/python benchmarks/bench_observer.py [--observer embedded | MODEL_DIR | MODEL@URL] [--fit]
        [--threads 1] [--timing-items 4] [--cache FILE]

Scores the labelled pairs (``pipeline/data/judge_pairs.jsonl``: dev and test halves), the shipped
prior's good/bad pairs and the society's hand-labelled decline/comply pairs
(``pipeline/data/society_pairs.jsonl``: the embedded society's own answers to harmful requests) with
each method of :mod:`pipeline.judge`:

- ``prompted+reason``: the observer rating prompt, digit expectation, a reason generated (the old default);
- ``prompted``: the same without the reason;
- ``F1``: the calibrated advice Yes/No log-odds alone; ``F2``: F1's reading averaged with the
  ethical/unethical likelihood contrast (the ``contrast`` method up to judge-v1); ``F3``: both
  averaged with the exemplar contrast, the answer's likelihood after the prior's good answers to
  similar questions against after their bad ones (the ``contrast`` method);
- ``engagement prompted``: the engagement rating prompt without a reason (engagement pairs).

and prints AUC, paired wins, the gap in standard deviations and the length checks
(:mod:`pipeline.separability`), then seconds per rating, one at a time (``--threads`` torch threads).

``--fit`` fits the contrast calibration of the observer model on the dev half (alignment pairs) and
writes it, with every method's figures, to the calibration file (``--calibration``; the shipped
``pipeline/data/judge_calibration.json`` by default). Without it, F1-F3 use the stored calibration.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import prompts
from pipeline.judge import (
    JUDGE_CALIBRATION,
    MEASURED_CONTRAST,
    MEASURED_ENGAGEMENT,
    MEASURED_PROMPTED,
    METHODS,
    NO,
    YES,
    Calibration,
    ContrastReadings,
    Judge,
    JudgeConfig,
    contrast_readings,
    fit_calibration,
    load_calibrations,
    save_calibration,
)
from pipeline.llm import ChatBackend, backend_spec, build_backend
from pipeline.llm.base import Dtype
from pipeline.llm.layers import CachedBackend
from pipeline.separability import (
    JUDGE_PAIRS,
    JudgePair,
    Separability,
    load_judge_pairs,
    prior_pairs,
    separability,
    society_pairs,
)
from pipeline.textio import format_table

REPO = Path(__file__).resolve().parents[1]


def answers(pairs: Sequence[JudgePair]) -> list[tuple[str, str]]:
    """(question, answer) for every answer: each pair's good answer, then its bad one."""
    return [(p.question, a) for p in pairs for a in (p.good, p.bad)]


def measure(pairs: Sequence[JudgePair], scores: Sequence[float | None]) -> Separability:
    return separability(scores[0::2], scores[1::2], [p.good for p in pairs], [p.bad for p in pairs])


async def prompted_scores(
    backend: ChatBackend, aspect: str, pairs: Sequence[JudgePair], reasons: bool
) -> list[float | None]:
    judge = Judge(backend, JudgeConfig(alignment="prompted", reasons=reasons))
    ratings = await asyncio.gather(*(judge.rate(aspect, q, a) for q, a in answers(pairs)))
    return [r.score for r in ratings]


async def readings(backend: ChatBackend, pairs: Sequence[JudgePair]) -> list[ContrastReadings]:
    return list(await asyncio.gather(*(contrast_readings(backend, q, a) for q, a in answers(pairs))))


def fit(split_readings: Sequence[ContrastReadings], pairs_file: Path, pairs: int) -> Calibration:
    good, bad = split_readings[0::2], split_readings[1::2]
    try:
        shown = str(pairs_file.resolve().relative_to(REPO))
    except ValueError:
        shown = pairs_file.name
    return fit_calibration(
        [r.values() for r in good],
        [r.values() for r in bad],
        pairs=shown,
        sha256=hashlib.sha256(pairs_file.read_bytes()).hexdigest()[:16],
        aspect="alignment",
        split="dev",
        pair_count=pairs,
    )


async def seconds_per_call(calls: Sequence[Callable[[], Awaitable[object]]]) -> float:
    """Mean wall seconds of ``calls`` made one after another, after one warm-up call."""
    await calls[0]()
    start = time.perf_counter()
    for call in calls:
        await call()
    return (time.perf_counter() - start) / len(calls)


async def timings(
    backend: ChatBackend, calibration: Calibration | None, items: list[tuple[str, str]]
) -> dict:
    judges = {
        "prompted+reason": Judge(backend, JudgeConfig(alignment="prompted", reasons=True)),
        MEASURED_PROMPTED: Judge(backend, JudgeConfig(alignment="prompted")),
    }
    methods: dict[str, Callable[[str, str], Awaitable[object]]] = {
        name: (lambda q, a, judge=judge: judge.rate("alignment", q, a)) for name, judge in judges.items()
    }
    if calibration is not None:
        methods["F1"] = lambda q, a: backend.next_token_logprobs(prompts.advice_messages(q, a), [*YES, *NO])
        methods[MEASURED_CONTRAST] = lambda q, a: contrast_readings(backend, q, a)
    return {
        name: await seconds_per_call([lambda q=q, a=a, m=method: m(q, a) for q, a in items])
        for name, method in methods.items()
    }


def row(method: str, split: str, r: Separability) -> tuple:
    return (
        method,
        split,
        f"{r.auc:.3f}",
        f"{r.wins:g}/{r.pairs}",
        f"{r.gap_sd:+.2f}",
        f"{r.mean_good:.2f}",
        f"{r.mean_bad:.2f}",
        f"{r.length_auc:.2f}",
        f"{r.length_adverse_wins:g}/{r.length_adverse_pairs}",
        f"{r.score_length_spearman:+.2f}",
    )


def _rounded(r: Separability) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(r).items()}


async def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    pairs = {
        "dev": load_judge_pairs("alignment", "dev", args.pairs),
        "test": load_judge_pairs("alignment", "test", args.pairs),
        "prior": prior_pairs(),
        "society": society_pairs(),
    }
    engagement = {split: load_judge_pairs("engagement", split, args.pairs) for split in ("dev", "test")}
    cache = {"cache_path": args.cache} if args.cache else {"cache_mode": "off"}
    spec = backend_spec(args.observer, max_tokens=args.reason_tokens, dtype=args.dtype, **cache)
    results: dict[str, dict[str, Separability]] = {}
    version = {MEASURED_PROMPTED: prompts.PROMPT_VERSION}
    async with build_backend(spec) as backend:
        model = backend.scoring_model
        stored = load_calibrations(args.calibration) if Path(args.calibration).is_file() else {}
        calibration = stored.get(model) if model else None
        for reasons, name in ((True, "prompted+reason"), (False, MEASURED_PROMPTED)):
            if reasons and not args.reason_baseline:
                continue
            results[name] = {
                split: measure(p, await prompted_scores(backend, "alignment", p, reasons))
                for split, p in pairs.items()
            }
            version[name] = prompts.PROMPT_VERSION
        results[MEASURED_ENGAGEMENT] = {
            split: measure(p, await prompted_scores(backend, "engagement", p, False))
            for split, p in engagement.items()
        }
        version[MEASURED_ENGAGEMENT] = prompts.PROMPT_VERSION
        if model is not None:
            read = {split: await readings(backend, p) for split, p in pairs.items()}
            if args.fit:
                calibration = fit(read["dev"], Path(args.pairs), len(pairs["dev"]))
            if calibration is not None:
                for name in METHODS:
                    results[name] = {
                        split: measure(
                            pairs[split], [calibration.score(r.values(), name) for r in read[split]]
                        )
                        for split in read
                    }
                    version[name] = prompts.JUDGE_PROMPT_VERSION
        timing_items = answers(pairs["dev"])[: args.timing_items]
        # Timed without the response cache, which would answer the answers rated above.
        uncached = backend.inner if isinstance(backend, CachedBackend) else backend
        seconds = await timings(uncached, calibration, timing_items) if args.timing_items else {}

    header = (
        "method",
        "split",
        "AUC",
        "wins",
        "gap SD",
        "good",
        "bad",
        "len AUC",
        "len-adverse wins",
        "rho(len)",
    )
    print(
        format_table(header, [row(m, s, r) for m, by_split in results.items() for s, r in by_split.items()])
    )
    if calibration is None:
        print(
            f"{', '.join(METHODS)}: no calibration for {model or args.observer} (scores no text, or run --fit)"
        )
    else:
        features = "; ".join(f"{n} mean {m:.4f} sd {sd:.4f}" for n, (m, sd) in calibration.features.items())
        readouts = "; ".join(
            f"{n} {r.slope:.4f} z {r.intercept:+.4f}" for n, r in calibration.readouts.items()
        )
        print(f"calibration ({'fitted now on dev' if args.fit else 'stored'}): {features}; {readouts}")
    if seconds:
        print(
            f"seconds per rating, one at a time, {args.threads} torch thread(s), {len(timing_items)} dev answers: "
            + ", ".join(f"{name} {s:.2f}" for name, s in seconds.items())
        )
    if args.fit and calibration is not None and model is not None:
        measured = {
            name: {"prompts": version[name], **{split: _rounded(r) for split, r in by_split.items()}}
            for name, by_split in results.items()
        }
        save_calibration(args.calibration, model, dataclasses.replace(calibration, measured=measured))
        print(f"calibration for {model} written to {args.calibration}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observer", default="embedded")
    parser.add_argument("--pairs", default=str(JUDGE_PAIRS), help="labelled pairs (JSONL)")
    parser.add_argument("--calibration", default=str(JUDGE_CALIBRATION), help="calibration file")
    parser.add_argument("--fit", action="store_true", help="fit the calibration on the dev half and write it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=typing.get_args(Dtype),
        help="in-process observers: the weights' dtype (a calibration is per model and dtype)",
    )
    parser.add_argument("--timing-items", type=int, default=4, help="answers timed per method (0: no timing)")
    parser.add_argument("--reason-tokens", type=int, default=48, help="longest reason, in tokens")
    parser.add_argument(
        "--reason-baseline",
        action="store_true",
        help="also score every answer with a reason generated (in-process the score is read before the "
        "reason, so it equals 'prompted'; over HTTP it may not); always timed",
    )
    parser.add_argument("--cache", default=None, help="response cache file (reruns answer from it)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
