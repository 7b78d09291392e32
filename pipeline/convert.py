"""Converters between comparison groups, TRL's pairwise preference format and the reference formats.

- :func:`groups_to_pairs`: comparison groups -> TRL pairwise rows (``prompt``, ``chosen``,
  ``rejected``, plus ``score_chosen``/``score_rejected``), ``best_vs_each`` (the best completion
  against every strictly lower-scored one) or ``best_vs_worst`` (one pair per group). Works for text
  and conversational groups alike, so the data trains with ``trl.DPOTrainer`` as is.
- :func:`pairs_to_groups`: TRL pairwise rows -> comparison groups. With ``score_chosen`` and
  ``score_rejected`` columns their scores are used; without, chosen gets :data:`CHOSEN_SCORE` and
  rejected :data:`REJECTED_SCORE`. Pairs with the same prompt merge into one group.
- :func:`import_reference_logs`: the reference implementation's (agiresearch/Stable-Alignment)
  per-agent interaction logs -> our interaction records (``RECORD_FEATURES``).
- :func:`import_reference_groups`: its training files (``query``, ``responses``, ``scores``) ->
  comparison groups.

What the reference formats look like (read from its source, ``stable_alignment/sandbox``): each
agent's log ``world_<id>/external_memory/agent_<n>.jsonl`` is, despite its name, one JSON array
(``DataFrame.to_json(orient="records")``; JSON Lines are accepted too) of interactions with fields
``agent_id``, ``label``, ``iteration``, ``question``, ``draft_answer``, ``target_id`` (list),
``feedback`` (list of reasons), ``rating`` (list of ratings, as strings), ``revised_answer``,
``gen_moral_score_before/after``, ``gen_moral_reason_before/after``,
``gen_engagement_score_before/after``, ``gen_engagement_reason_before/after``,
``cls_moral_score_before/after``. Its parse-failure sentinels, ``8`` for a neighbour rating and
``-1`` for an observer score (:data:`REFERENCE_SENTINELS`), become null here. It sorted ratings and
feedback together but not ``target_id``, so a reason cannot be matched to its neighbour: the
imported feedback's ``agent_id`` is null. The training files (``sandbox_v1.json``,
``sandbox_v2.json``) are JSON arrays of ``{"query", "responses", "scores"}`` that mix the three kinds
without saying which: their groups get ``kind`` = ``"mixed"`` unless told otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from datasets import Dataset, Features, List, Value

from pipeline.errors import UserError
from pipeline.groups import (
    EXAMPLE_FEATURES,
    GROUP_FEATURES,
    RATING_MAX,
    RATING_MIN,
    SKIP_REASONS,
    add_completion,
    group_examples,
    new_example,
)
from pipeline.records import RECORD_FEATURES, new_record

PairMode = Literal["best_vs_each", "best_vs_worst"]
PAIR_MODES: tuple[str, ...] = get_args(PairMode)

CHOSEN_SCORE, REJECTED_SCORE = RATING_MAX, RATING_MIN
"""Scores given to chosen/rejected completions of pairs that carry no scores of their own."""

REFERENCE_SENTINELS = (8.0, -1.0)
"""Values the reference code stored when a rating could not be parsed; imported as null."""

_REFERENCE_SCORES = {
    "alignment_before": "gen_moral_score_before",
    "alignment_after": "gen_moral_score_after",
    "engagement_before": "gen_engagement_score_before",
    "engagement_after": "gen_engagement_score_after",
}
_REFERENCE_REASONS = {name: key.replace("_score_", "_reason_") for name, key in _REFERENCE_SCORES.items()}


# -------------------------------------------------------------------------------- groups <-> pairs


def _pair_rows(batch: dict[str, list], mode: PairMode) -> dict[str, list]:
    out: dict[str, list] = {
        "prompt": [],
        "chosen": [],
        "rejected": [],
        "score_chosen": [],
        "score_rejected": [],
    }
    for prompt, completions, scores in zip(
        batch["prompt"], batch["completions"], batch["scores"], strict=True
    ):
        if len(completions) != len(scores):
            raise UserError(f"a group has {len(completions)} completions but {len(scores)} scores")
        if len(completions) < 2:
            continue
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first
        others = [i for i in range(len(scores)) if scores[i] < scores[best]]
        if mode == "best_vs_worst" and others:
            others = [min(others, key=lambda i: (scores[i], i))]
        for i in others:
            out["prompt"].append(prompt)
            out["chosen"].append(completions[best])
            out["rejected"].append(completions[i])
            out["score_chosen"].append(scores[best])
            out["score_rejected"].append(scores[i])
    return out


def groups_to_pairs(groups: Dataset, mode: PairMode = "best_vs_each", num_proc: int | None = None) -> Dataset:
    """Comparison groups -> TRL pairwise preference rows (ties and SFT-only groups give no pair)."""
    if mode not in PAIR_MODES:
        raise UserError(f"unknown pairing mode {mode!r}: one of {', '.join(PAIR_MODES)}")
    completion = groups.features["completions"].feature
    features = Features(
        {
            "prompt": groups.features["prompt"],
            "chosen": completion,
            "rejected": completion,
            "score_chosen": Value("float32"),
            "score_rejected": Value("float32"),
        }
    )
    return groups.map(
        _pair_rows,
        batched=True,
        remove_columns=groups.column_names,
        features=features,
        fn_kwargs={"mode": mode},
        num_proc=num_proc,
        desc="Pairing",
    )


def _pair_examples(batch: dict[str, list], kind: str, encode: bool) -> dict[str, list]:
    size = len(batch["prompt"])
    chosen_scores = batch.get("score_chosen") or [CHOSEN_SCORE] * size
    rejected_scores = batch.get("score_rejected") or [REJECTED_SCORE] * size
    dump = json.dumps if encode else (lambda value: value)
    return {
        "kind": [kind] * size,
        "prompt": [dump(p) for p in batch["prompt"]],
        "completions": [[dump(c), dump(r)] for c, r in zip(batch["chosen"], batch["rejected"], strict=True)],
        "scores": [[c, r] for c, r in zip(chosen_scores, rejected_scores, strict=True)],
        "run_id": [None] * size,
        **{reason: [0] * size for reason in SKIP_REASONS},
    }


def pairs_to_groups(pairs: Dataset, kind: str = "imitation", num_proc: int | None = None) -> Dataset:
    """TRL pairwise rows -> comparison groups (one per distinct prompt, chosen scored above rejected)."""
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in pairs.column_names]
    if missing:
        raise UserError(f"not a pairwise preference dataset, missing columns {', '.join(missing)}")
    conversational = pairs.features["prompt"] != Value("string")
    examples = pairs.map(
        _pair_examples,
        batched=True,
        remove_columns=pairs.column_names,
        features=EXAMPLE_FEATURES,
        fn_kwargs={"kind": kind, "encode": conversational},
        num_proc=num_proc,
        desc="Pairs to examples",
    )
    features = GROUP_FEATURES
    if conversational:  # messages travel through the grouping as JSON strings and come back decoded
        features = Features(
            {
                **GROUP_FEATURES,
                "prompt": pairs.features["prompt"],
                "completions": List(pairs.features["chosen"]),
            }
        )
    return group_examples(examples, num_proc=num_proc, features=features)


# ------------------------------------------------------------------------------ reference formats


def _reference_score(value: Any) -> float | None:
    """A reference rating (number or string) as a float; its sentinels and junk become null."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(score) or score in REFERENCE_SENTINELS else score


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}: neither a JSON array nor JSON Lines ({err.msg}, line {err.lineno})"
            ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"{path}: expected a list of JSON objects")
    return data


def _reference_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.json*") if not p.name.startswith("."))
            if not found:
                raise UserError(f"{path}: no .json/.jsonl files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def reference_record(
    row: dict[str, Any], *, run_id: str, world_id: str, agent_model: str | None
) -> dict[str, Any]:
    """One reference interaction -> one record of ``RECORD_FEATURES``."""
    missing = [k for k in ("question", "draft_answer", "revised_answer") if k not in row]
    if missing:
        raise UserError(f"not a reference interaction log entry, missing {', '.join(missing)}")
    reasons = row.get("feedback") or []
    ratings = row.get("rating") or []
    if len(reasons) != len(ratings):
        raise UserError(f"an entry has {len(reasons)} feedback reasons but {len(ratings)} ratings")
    return new_record(
        run_id=run_id,
        world_id=world_id,
        round=row.get("iteration"),
        agent_id=row.get("agent_id"),
        stance=row.get("label"),
        question=row["question"],
        draft=row["draft_answer"],
        feedback=[
            {"agent_id": None, "rating": _reference_score(rating), "reason": reason, "raw": None}
            for reason, rating in zip(reasons, ratings, strict=True)
        ],
        revision=row["revised_answer"],
        scores={name: _reference_score(row.get(key)) for name, key in _REFERENCE_SCORES.items()},
        observer_reasons={name: row.get(key) for name, key in _REFERENCE_REASONS.items()},
        agent_model=agent_model,
        observer_model=None,
        prompt_version="reference",
    )


def import_reference_logs(
    inputs: Sequence[str | os.PathLike], *, run_id: str = "reference", agent_model: str | None = None
) -> Dataset:
    """The reference implementation's per-agent logs (files or folders, e.g. ``data/cache/``) ->
    interaction records. The world id comes from a ``world_<id>`` folder in the path when present."""
    records = []
    for path in _reference_files(inputs):
        world = next(
            (part[len("world_") :] for part in reversed(path.parts) if re.fullmatch(r"world_.+", part)), ""
        )
        try:
            records += [
                reference_record(row, run_id=run_id, world_id=world, agent_model=agent_model)
                for row in _read_json_rows(path)
            ]
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    if not records:
        raise UserError("the reference logs hold no interactions")
    return Dataset.from_list(records, features=RECORD_FEATURES)


def import_reference_groups(
    inputs: Sequence[str | os.PathLike], *, kind: str = "mixed", num_proc: int | None = None
) -> tuple[Dataset, int]:
    """The reference training files (``query``, ``responses``, ``scores``) -> comparison groups,
    and the number of responses dropped because their score was a sentinel or off the scale (or
    their text empty)."""
    examples: list[dict[str, Any]] = []
    dropped = 0
    for path in _reference_files(inputs):
        for index, row in enumerate(_read_json_rows(path)):
            if not {"query", "responses", "scores"} <= row.keys():
                raise UserError(f"{path}: entry {index} lacks query/responses/scores")
            responses, scores = row["responses"], row["scores"]
            if len(responses) != len(scores):
                raise UserError(
                    f"{path}: entry {index} has {len(responses)} responses but {len(scores)} scores"
                )
            example = new_example(kind, row["query"])
            for text, score in zip(responses, scores, strict=True):
                add_completion(example, text, _reference_score(score))
            dropped += sum(example[reason] for reason in SKIP_REASONS)
            examples.append(example)
    columns = {name: [example[name] for example in examples] for name in EXAMPLE_FEATURES}
    return group_examples(Dataset.from_dict(columns, features=EXAMPLE_FEATURES), num_proc=num_proc), dropped
