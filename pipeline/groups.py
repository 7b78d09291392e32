"""The schema of comparison groups: what ``sandbox transform`` writes and the trainer reads.

The stage-2 counterpart of :mod:`pipeline.records`. A **comparison group** is one prompt, several
completions and one score per completion (best first), of one kind of :data:`KINDS` (SPEC section
3). Examples (one record's completions of one kind, with counts of what was skipped) become groups
by :func:`group_examples`: examples sharing a (kind, prompt) are merged, identical completions
within a group get their mean score, and each kind is a contiguous block (:func:`split_kinds`).

A transform output folder holds one subfolder per config of :data:`CONFIGS` (written as
``save_to_disk`` folders or Parquet/Arrow files, :data:`OutputFormat`), a dataset card
``README.md`` and :data:`SUMMARY_FILE`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable

KINDS = ("imitation", "self_critic", "realignment")
CONFIGS = (*KINDS, "mixed")

Style = Literal["text", "conversational"]
"""``text``: prompts and completions are strings; ``conversational``: TRL's message lists."""

OutputFormat = Literal["disk", "parquet", "arrow"]
"""How a transform output stores its configs: ``save_to_disk`` folders, or Parquet/Arrow files."""

SUMMARY_FILE = "summary.json"
"""The transform's summary, next to the config folders of its output."""

RATING_MIN, RATING_MAX = 1.0, 7.0
"""The rating scale of neighbours and observers. Scores outside it (or NaN) are skipped."""

REALIGNMENT_MIN_AFTER = (RATING_MIN + RATING_MAX) / 2
"""A realignment example needs an after-score strictly above the scale's midpoint (4 on 1-7)."""

SELF_CRITIC_INSTRUCTION = (
    "How well does this answer align with shared social values: is it harmless, unbiased, "
    "honest and helpful? Rate it from 1 (not aligned at all) to 7 (perfectly aligned) and explain why."
)
"""Appended to question + draft to form a self-critic prompt; the completion is a neighbour's reason."""

REALIGNMENT_INSTRUCTION = (
    "Comment on how well this answer aligns with shared social values, "
    "then revise it so that it aligns better."
)
"""Appended to question + draft to form a realignment prompt."""

REALIGNMENT_SEPARATOR = "\n\nRevised answer: "
"""Joins the feedback and the revision in a realignment completion (feedback first)."""

PROMPT_TEMPLATE = "Question: {question}\nAnswer: {draft}\n\n{instruction}"
"""How question, draft and instruction make the self-critic and realignment prompts."""

SKIP_REASONS = ("null_score", "out_of_scale", "empty", "below_threshold", "flagged")
"""Why an example was skipped: its score was null; NaN or off the scale; its text was empty; a
realignment example whose alignment did not rise above the threshold; its texts have data-quality
flags that drop it (``pipeline.quality``; ``sandbox transform --keep-flagged`` keeps them)."""

EXAMPLE_FEATURES = Features(
    {
        "kind": Value("string"),
        "prompt": Value("string"),
        "completions": List(Value("string")),
        "scores": List(Value("float32")),
        "run_id": Value("string"),
        **{reason: Value("int32") for reason in SKIP_REASONS},
    }
)
"""One record's examples of one kind, before grouping (with the counts of what was skipped)."""

GROUP_FEATURES = Features(
    {
        "prompt": Value("string"),
        "completions": List(Value("string")),
        "scores": List(Value("float32")),
        "kind": Value("string"),
        "sft_only": Value("bool"),
        "num_sources": Value("int32"),
        "run_ids": List(Value("string")),
    }
)
"""Comparison groups, text style. ``scores[i]`` scores ``completions[i]``; best first."""

_MESSAGE = {"role": Value("string"), "content": Value("string")}
CONVERSATIONAL_GROUP_FEATURES = Features(
    {
        **GROUP_FEATURES,
        "prompt": List(_MESSAGE),
        "completions": List(List(_MESSAGE)),
    }
)
"""Comparison groups, conversational style (TRL): a user turn and one assistant turn each."""


def score_problem(score: float | None) -> str | None:
    """The skip reason of a score (``null_score``, ``out_of_scale``), or ``None`` when usable."""
    if score is None:
        return "null_score"
    if math.isnan(score) or not RATING_MIN <= score <= RATING_MAX:
        return "out_of_scale"
    return None


def new_example(kind: str, prompt: str, run_id: str | None = None) -> dict[str, Any]:
    """An example row of ``EXAMPLE_FEATURES`` with no completion yet and nothing skipped."""
    return {
        "kind": kind,
        "prompt": prompt,
        "completions": [],
        "scores": [],
        "run_id": run_id,
    } | dict.fromkeys(SKIP_REASONS, 0)


def add_completion(
    example: dict[str, Any], completion: str | None, score: float | None, clean: bool = True
) -> None:
    """Add one scored completion to ``example``, or count why it cannot be used: a skip reason, or
    (``clean`` false: its text has quality flags that drop it) ``flagged``."""
    problem = score_problem(score)
    if problem is None and not (completion or "").strip():
        problem = "empty"
    if problem:
        example[problem] += 1
    elif not clean:
        example["flagged"] += 1
    else:
        example["completions"].append(completion)
        example["scores"].append(score)


# --------------------------------------------------------------------------------- group assembly


def _merge(completions: list[Any], scores: list[float], keys: list[str]) -> tuple[list[Any], list[float]]:
    """Merge identical completions (same key; score = their mean) and order best first (stable)."""
    merged: dict[str, list] = {}
    for completion, score, key in zip(completions, scores, keys, strict=True):
        if key in merged:
            merged[key][1] += score
            merged[key][2] += 1
        else:
            merged[key] = [completion, score, 1]
    ranked = sorted(merged.values(), key=lambda item: -item[1] / item[2])
    return [item[0] for item in ranked], [item[1] / item[2] for item in ranked]


def take_rows(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """``table.take(indices)`` for a table of many chunks, touching only the record batches needed.

    ``Table.take`` on a chunked table costs time in proportion to its number of chunks, which for
    millions of examples makes every call slow; this sorts the indices, takes from each record
    batch that holds some, and restores the requested order on the (small) result.
    """
    batches = table.to_batches()
    offsets = np.cumsum([0] + [len(b) for b in batches])
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    batch_ids = np.searchsorted(offsets, ordered, side="right") - 1
    bounds = np.flatnonzero(np.diff(batch_ids)) + 1
    pieces = [
        batches[batch_ids[start]].take(pa.array(chunk - offsets[batch_ids[start]]))
        for start, chunk in zip(np.r_[0, bounds], np.split(ordered, bounds), strict=True)
    ]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return pa.Table.from_batches(pieces, schema=table.schema).combine_chunks().take(inverse)


def _assemble(batch: dict[str, list], examples: Dataset, decode_json: bool) -> dict[str, list]:
    rows = batch["rows"]
    table = examples.data.table
    flat = np.fromiter((r for members in rows for r in members), dtype=np.int64)
    columns = take_rows(table.select(["completions", "scores", "run_id"]), flat).to_pydict()
    firsts = take_rows(
        table.select(["kind", "prompt"]), np.array([m[0] for m in rows], dtype=np.int64)
    ).to_pydict()
    decode = json.loads if decode_json else None
    out: dict[str, list] = {name: [] for name in GROUP_FEATURES}
    start = 0
    for members, kind, prompt in zip(rows, firsts["kind"], firsts["prompt"], strict=True):
        stop = start + len(members)
        keys = [c for cs in columns["completions"][start:stop] for c in cs]
        scores = [s for ss in columns["scores"][start:stop] for s in ss]
        completions, merged_scores = _merge([decode(k) for k in keys] if decode else keys, scores, keys)
        out["prompt"].append(decode(prompt) if decode else prompt)
        out["completions"].append(completions)
        out["scores"].append(merged_scores)
        out["kind"].append(kind)
        out["sft_only"].append(len(completions) < 2)
        out["num_sources"].append(len(members))
        out["run_ids"].append(sorted({r for r in columns["run_id"][start:stop] if r is not None}))
        start = stop
    return out


def group_examples(
    examples: Dataset, num_proc: int | None = None, features: Features = GROUP_FEATURES
) -> Dataset:
    """Example rows -> comparison groups: one row per (kind, prompt); the kinds of ``KINDS`` come
    first, each a contiguous block (see :func:`split_kinds`), and groups in order of first appearance.

    ``examples`` has string columns ``kind``, ``prompt``, ``run_id`` and list columns
    ``completions``/``scores``. Prompts and completions that are JSON strings (``features`` with
    messages) are decoded after grouping, which lets conversational pairs reuse this function.
    """
    if examples._indices is not None:
        examples = examples.flatten_indices()
    table = examples.data.table
    keys = pa.table(
        {
            "kind": table.column("kind"),
            "prompt": table.column("prompt"),
            "row": pa.array(np.arange(len(table), dtype=np.int64)),
        }
    ).filter(pc.greater(pc.list_value_length(table.column("completions")), 0))
    # use_threads=False: groups come out in order of first appearance, so the output is reproducible
    index = keys.group_by(["kind", "prompt"], use_threads=False).aggregate([("row", "list")])
    # one block per kind (``KINDS`` first) so that each kind is a contiguous slice; keep only the
    # member rows: prompts are read back from the examples, so the index sent to workers is small
    kinds = index.column("kind")
    order = [*KINDS, *sorted(set(pc.unique(kinds).to_pylist()) - set(KINDS))]
    index = pa.table(
        {
            "rows": pa.concat_arrays(
                [index.column("row_list").filter(pc.equal(kinds, k)).combine_chunks() for k in order]
            )
        }
    )
    fingerprint = Hasher.hash([examples._fingerprint, features, "group_examples/2"])
    decode_json = features["prompt"] != Value("string")
    cache_file_name = None
    if examples.cache_files:
        cache_dir = Path(examples.cache_files[0]["filename"]).parent
        cache_file_name = str(cache_dir / f"cache-{fingerprint}.arrow")
    groups = Dataset(InMemoryTable(index), fingerprint=Hasher.hash([fingerprint, "index"]))
    return groups.map(
        _assemble,
        batched=True,
        remove_columns=groups.column_names,
        features=features,
        fn_kwargs={"examples": examples, "decode_json": decode_json},
        num_proc=num_proc if len(groups) > 1 else None,
        cache_file_name=cache_file_name,
        new_fingerprint=fingerprint,
        desc="Grouping by prompt",
    )


def split_kinds(groups: Dataset) -> dict[str, Dataset]:
    """One dataset per kind of ``KINDS``: contiguous slices of the output of :func:`group_examples`."""
    sizes = {
        row["values"]: row["counts"] for row in pc.value_counts(groups.data.table.column("kind")).to_pylist()
    }
    configs, start = {}, 0
    for kind in KINDS:
        size = sizes.get(kind, 0)
        # datasets refuses a contiguous selection that starts at the end, even an empty one
        empty = Dataset.from_dict({name: [] for name in groups.features}, features=groups.features)
        configs[kind] = groups.select(range(start, start + size)) if size else empty
        start += size
    return configs
