"""Interaction records -> alignment examples -> scored comparison groups (``sandbox transform``).

Three kinds of examples come from each record of the sandbox (SPEC section 3):

- ``imitation``: prompt = the question; completions = draft (scored by the observer's alignment
  before revision) and revision (scored by its alignment after);
- ``self_critic``: prompt = question + draft + :data:`SELF_CRITIC_INSTRUCTION`; one completion per
  neighbour = its reason, scored by its rating;
- ``realignment``: prompt = question + draft + :data:`REALIGNMENT_INSTRUCTION`; completion = the
  neighbours' feedback + :data:`REALIGNMENT_SEPARATOR` + revision, scored by the alignment after,
  kept only when the alignment went up and the after-score is above :data:`REALIGNMENT_MIN_AFTER`.

Examples sharing a (kind, prompt) become one **comparison group**: a row with ``prompt``,
``completions``, ``scores`` (best first), ``kind`` and provenance (``run_ids``, ``num_sources``,
``sft_only``). Nothing is ever given a made-up score: failed records and completions whose score is
null, NaN or off the 1..7 scale are skipped and counted. Identical completions are merged within
a group (their score is the mean), never across groups. Groups left with one completion are kept
as SFT-only groups (``sft_only=True``); the Stable Alignment loss reduces to SFT on them.

Every step is a ``datasets`` operation (batched ``map``/``filter`` with ``num_proc`` and declared
``Features``) whose fingerprint depends only on its inputs, so rerunning on the same shards
reuses the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import (
    Dataset,
    Features,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable

from pipeline.records import RECORD_FEATURES

KINDS = ("imitation", "self_critic", "realignment")
CONFIGS = (*KINDS, "mixed")

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

SKIP_REASONS = ("null_score", "out_of_scale", "empty", "below_threshold")
"""Why an example was skipped: its score was null; NaN or off the scale; its text was empty; a
realignment example whose alignment did not rise above the threshold."""

DEFAULT_RATIO = {"imitation": 5.0, "self_critic": 1.0, "realignment": 1.0}
"""The paper's released mix (imitation : self-critic : realignment), counted in groups."""

RUN_CONFIG_NAMES = ("config.yaml", "config.yml", "config.json", "run_config.yaml", "run_config.json")
"""File names under an input folder taken as the saved world/run configuration (for the card)."""

_SECRET_MARKERS = ("key", "token", "secret", "password")

_RECORD_COLUMNS = (
    "run_id",
    "world_id",
    "question",
    "draft",
    "feedback",
    "revision",
    "scores",
    "status",
    "agent_model",
    "observer_model",
)
"""The record columns the transform reads; each must have the type of ``RECORD_FEATURES``."""

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


class TransformError(ValueError):
    """Bad input for the transform; its message is one line meant for the user."""


@dataclass
class TransformResult:
    """The configs (``imitation``, ``self_critic``, ``realignment``, ``mixed``) and the summary."""

    configs: dict[str, Dataset]
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- input


def find_shards(folder: Path) -> list[Path]:
    """``*.arrow`` files anywhere under ``folder``, sorted. Shards still being written (``*.tmp``)
    do not match; hidden files and folders and datasets' own ``cache-*`` files are left out."""
    return [
        path
        for path in sorted(folder.rglob("*.arrow"))
        if not path.name.startswith("cache-")
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


def check_record_features(features: Features, where: str) -> None:
    """Raise :class:`TransformError` unless ``features`` holds the record columns with their types."""
    missing = [name for name in _RECORD_COLUMNS if name not in features]
    if missing:
        raise TransformError(f"{where}: not interaction records, missing columns {', '.join(missing)}")
    for name in _RECORD_COLUMNS:
        if features[name] != RECORD_FEATURES[name]:
            raise TransformError(
                f"{where}: different schema, column {name!r} is {features[name]} "
                f"instead of {RECORD_FEATURES[name]}"
            )


def _shard_info(path: Path) -> tuple[pa.Schema, int]:
    """Schema and row count of an Arrow stream file, read from the memory map without copying."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            return reader.schema, sum(batch.num_rows for batch in reader)
    except (OSError, pa.ArrowInvalid) as err:
        raise TransformError(f"{path}: not a readable Arrow shard ({err})") from None


def load_records(inputs: Sequence[str | os.PathLike | Dataset], cache_dir: str | None = None) -> Dataset:
    """Read records from run folders (shards found recursively), ``save_to_disk`` folders, single
    ``.arrow`` files or in-memory datasets, check their schema and concatenate them in order."""
    parts: list[Dataset] = []
    shards: list[Path] = []

    def flush_shards() -> None:
        if shards:
            parts.append(
                load_dataset("arrow", data_files=[str(p) for p in shards], split="train", cache_dir=cache_dir)
            )
            shards.clear()

    for item in inputs:
        if isinstance(item, Dataset):
            flush_shards()
            check_record_features(item.features, "dataset")
            parts.append(item.flatten_indices() if item._indices is not None else item)
            continue
        path = Path(item)
        if (path / "state.json").is_file():
            flush_shards()
            dataset = load_from_disk(str(path))
            if not isinstance(dataset, Dataset):
                raise TransformError(f"{path}: a DatasetDict; pass one split's folder")
            check_record_features(dataset.features, str(path))
            parts.append(dataset)
            continue
        if path.is_file() and path.suffix == ".arrow":
            found = [path]
        elif path.is_dir():
            found = find_shards(path)
            if not found:
                raise TransformError(f"{path}: no record shards (*.arrow) in this folder")
        else:
            raise TransformError(f"{path}: no such folder or .arrow file")
        for shard in found:
            schema, rows = _shard_info(shard)
            check_record_features(Features.from_arrow_schema(schema), str(shard))
            if rows:  # the arrow builder refuses a split made only of empty files
                shards.append(shard)
    flush_shards()
    if not parts:
        raise TransformError("the input holds no records")
    records = concatenate_datasets([p.select_columns(list(_RECORD_COLUMNS)) for p in parts])
    if len(records) == 0:
        raise TransformError("the input holds no records")
    return records


def find_run_configs(inputs: Sequence[str | os.PathLike | Dataset]) -> dict[str, Any]:
    """The run configurations saved next to the shards (secrets removed), keyed by their path
    relative to the input folder's parent (no absolute local paths end up in a published card)."""
    import yaml

    configs: dict[str, Any] = {}
    for item in inputs:
        if isinstance(item, Dataset) or not Path(item).is_dir():
            continue
        folder = Path(item).absolute()
        for name in RUN_CONFIG_NAMES:
            for path in sorted(folder.rglob(name)):
                try:
                    configs[str(path.relative_to(folder.parent))] = _without_secrets(
                        yaml.safe_load(path.read_text())
                    )
                except (OSError, yaml.YAMLError):
                    continue  # an unreadable config only costs the card a section
    return configs


def _without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_secrets(v)
            for k, v in value.items()
            if not any(marker in str(k).lower() for marker in _SECRET_MARKERS)
        }
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- examples


def _score_problem(score: float | None) -> str | None:
    if score is None:
        return "null_score"
    if math.isnan(score) or not RATING_MIN <= score <= RATING_MAX:
        return "out_of_scale"
    return None


def _row(kind: str, prompt: str, run_id: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "prompt": prompt,
        "completions": [],
        "scores": [],
        "run_id": run_id,
    } | dict.fromkeys(SKIP_REASONS, 0)


def _add(row: dict[str, Any], completion: str | None, score: float | None) -> None:
    """Add one scored completion to ``row``, or count why it cannot be used."""
    problem = _score_problem(score)
    if problem is None and not (completion or "").strip():
        problem = "empty"
    if problem:
        row[problem] += 1
    else:
        row["completions"].append(completion)
        row["scores"].append(score)


def record_examples(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The imitation, self-critic and realignment examples of one ``ok`` record (one row per kind)."""
    question, draft, revision = record["question"], record["draft"], record["revision"]
    scores, run_id = record["scores"] or {}, record["run_id"]
    before, after = scores.get("alignment_before"), scores.get("alignment_after")

    imitation = _row("imitation", question, run_id)
    _add(imitation, draft, before)
    _add(imitation, revision, after)

    self_critic = _row(
        "self_critic",
        PROMPT_TEMPLATE.format(question=question, draft=draft, instruction=SELF_CRITIC_INSTRUCTION),
        run_id,
    )
    for feedback in record["feedback"] or []:
        _add(self_critic, feedback["reason"], feedback["rating"])

    realignment = _row(
        "realignment",
        PROMPT_TEMPLATE.format(question=question, draft=draft, instruction=REALIGNMENT_INSTRUCTION),
        run_id,
    )
    problem = _score_problem(before) or _score_problem(after)
    if problem:
        realignment[problem] += 1
    elif not (after > before and after > REALIGNMENT_MIN_AFTER):
        realignment["below_threshold"] += 1
    else:
        reasons = [f["reason"].strip() for f in record["feedback"] or [] if (f["reason"] or "").strip()]
        completion = (
            "\n".join(reasons) + REALIGNMENT_SEPARATOR + revision
            if reasons and (revision or "").strip()
            else None
        )
        _add(realignment, completion, after)
    return [imitation, self_critic, realignment]


def _explode(batch: dict[str, list]) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in EXAMPLE_FEATURES}
    columns = list(batch)
    for values in zip(*batch.values(), strict=True):
        record = dict(zip(columns, values, strict=True))
        if record["status"] != "ok":
            continue
        for row in record_examples(record):
            for name, value in row.items():
                out[name].append(value)
    return out


def build_examples(records: Dataset, num_proc: int | None = None) -> Dataset:
    """Records -> per-record example rows (``EXAMPLE_FEATURES``); failed records give none."""
    return records.map(
        _explode,
        batched=True,
        remove_columns=records.column_names,
        features=EXAMPLE_FEATURES,
        num_proc=num_proc,
        desc="Building examples",
    )


# ------------------------------------------------------------------------------------------- groups


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


def _to_messages(batch: dict[str, list]) -> dict[str, list]:
    return {
        "prompt": [[{"role": "user", "content": p}] for p in batch["prompt"]],
        "completions": [[[{"role": "assistant", "content": c}] for c in cs] for cs in batch["completions"]],
    }


def to_conversational(groups: Dataset, num_proc: int | None = None) -> Dataset:
    """Text-style groups -> conversational style (user prompt, one assistant turn per completion)."""
    return groups.map(
        _to_messages,
        batched=True,
        features=CONVERSATIONAL_GROUP_FEATURES,
        num_proc=num_proc,
        desc="Chat format",
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


# ------------------------------------------------------------------------------------------- mixing


def parse_ratio(text: str) -> dict[str, float]:
    """``"5:1:1"`` -> ``{"imitation": 5.0, "self_critic": 1.0, "realignment": 1.0}``."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(KINDS) or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) == 0:
        raise TransformError(f"--ratio {text!r}: expected three non-negative numbers like 5:1:1")
    return dict(zip(KINDS, values, strict=True))


def mix_counts(available: dict[str, int], ratio: dict[str, float]) -> dict[str, int]:
    """The largest counts in proportion to ``ratio`` that the available groups allow.

    A kind with nothing available is left out of the proportion rather than zeroing the mix.
    """
    weighted = {k: r for k, r in ratio.items() if r > 0 and available.get(k, 0) > 0}
    if not weighted:
        return dict.fromkeys(ratio, 0)
    scale = min(available[k] / r for k, r in weighted.items())
    return {k: math.floor(scale * weighted[k] + 1e-9) if k in weighted else 0 for k in ratio}


def mix(configs: dict[str, Dataset], ratio: dict[str, float], seed: int) -> tuple[Dataset, dict[str, int]]:
    """Sample each kind down to the ratio with ``seed``, concatenate and shuffle."""
    counts = mix_counts({k: len(configs[k]) for k in KINDS}, ratio)
    parts = [configs[k].shuffle(seed=seed).select(range(counts[k])) for k in KINDS if counts[k]]
    mixed = (
        concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
        if parts
        else configs[KINDS[0]].select([])
    )
    return mixed, counts


# ------------------------------------------------------------------------------------------ summary


def config_stats(dataset: Dataset) -> dict[str, Any]:
    """Rows, SFT-only rows, mean completions per group, mean score and the score histogram (1..7)."""
    table = dataset.select_columns(["scores"]).with_format("arrow")[:] if len(dataset) else dataset.data.table
    lengths = pc.list_value_length(table.column("scores")).to_numpy(zero_copy_only=False)
    scores = pc.list_flatten(table.column("scores")).to_numpy(zero_copy_only=False).astype(np.float64)
    bins = np.clip(np.rint(scores), RATING_MIN, RATING_MAX).astype(int) if len(scores) else np.array([], int)
    histogram = np.bincount(bins, minlength=int(RATING_MAX) + 1)[int(RATING_MIN) :]
    return {
        "rows": len(dataset),
        "sft_only": int((lengths < 2).sum()),
        "completions": len(scores),
        "mean_completions": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
        "mean_score": round(float(scores.mean()), 3) if len(scores) else None,
        "score_histogram": {str(int(RATING_MIN) + i): int(n) for i, n in enumerate(histogram)},
    }


def _count_by_kind(examples: Dataset) -> dict[str, dict[str, int]]:
    """Per kind: the skip counts and ``n``, the number of completions before merging duplicates."""
    table = examples.data.table
    counts = table.select(["kind", *SKIP_REASONS]).append_column(
        "n", pc.list_value_length(table.column("completions"))
    )
    columns = [*SKIP_REASONS, "n"]
    sums = counts.group_by("kind", use_threads=False).aggregate([(c, "sum") for c in columns]).to_pylist()
    out = {kind: dict.fromkeys(columns, 0) for kind in KINDS}
    for row in sums:
        out[row["kind"]] = {c: int(row[f"{c}_sum"] or 0) for c in columns}
    return out


def _distinct(records: Dataset, column: str) -> list[str]:
    return sorted(v for v in pc.unique(records.data.table.column(column)).to_pylist() if v)


def transform(
    inputs: Sequence[str | os.PathLike | Dataset],
    *,
    ratio: dict[str, float] | None = None,
    seed: int = 0,
    style: str = "text",
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> TransformResult:
    """Records -> the four configs of comparison groups, with a summary of what was kept and skipped."""
    if style not in ("text", "conversational"):
        raise TransformError(f"unknown format {style!r}: text or conversational")
    ratio = ratio or DEFAULT_RATIO
    records = load_records(inputs, cache_dir=cache_dir)
    failed = len(records) - int(pc.sum(pc.equal(records.data.table.column("status"), "ok")).as_py() or 0)

    examples = build_examples(records, num_proc=num_proc)
    counts = _count_by_kind(examples)
    groups = group_examples(examples, num_proc=num_proc)
    if len(groups) == 0:
        skipped = sum(c[r] for c in counts.values() for r in SKIP_REASONS)
        raise TransformError(
            f"no usable examples in {len(records)} records ({failed} failed, {skipped} completions skipped)"
        )
    if style == "conversational":
        groups = to_conversational(groups, num_proc=num_proc)
    configs = split_kinds(groups)
    configs["mixed"], kept = mix(configs, ratio, seed)

    stats = {name: config_stats(ds) for name, ds in configs.items()}
    summary = {
        "records": len(records),
        "failed_records": failed,
        "style": style,
        "ratio": ratio,
        "seed": seed,
        "kinds": {
            kind: {
                "available": len(configs[kind]),
                "kept_in_mixed": kept[kind],
                "sft_only": stats[kind]["sft_only"],
                "skipped": {r: counts[kind][r] for r in SKIP_REASONS},
                "duplicates_merged": counts[kind]["n"] - stats[kind]["completions"],
            }
            for kind in KINDS
        },
        "configs": stats,
        "run_ids": _distinct(records, "run_id"),
        "world_ids": _distinct(records, "world_id"),
        "agent_models": _distinct(records, "agent_model"),
        "observer_models": _distinct(records, "observer_model"),
        "run_configs": find_run_configs(inputs),
        "constants": {
            "self_critic_instruction": SELF_CRITIC_INSTRUCTION,
            "realignment_instruction": REALIGNMENT_INSTRUCTION,
            "realignment_separator": REALIGNMENT_SEPARATOR,
            "prompt_template": PROMPT_TEMPLATE,
            "realignment_min_after": REALIGNMENT_MIN_AFTER,
            "rating_scale": [RATING_MIN, RATING_MAX],
        },
    }
    return TransformResult(configs=configs, summary=summary)


# ------------------------------------------------------------------------------------------- output

OUTPUT_FORMATS = ("disk", "parquet", "arrow")
SUMMARY_FILE = "summary.json"
_ROWS_PER_FILE = 200_000


def _write_config(dataset: Dataset, folder: Path, output_format: str) -> None:
    if output_format == "disk":
        # datasets writes no data file for an empty dataset (which then fails to load) unless
        # it is asked for exactly one shard
        dataset.save_to_disk(str(folder), num_shards=None if len(dataset) else 1)
        return
    folder.mkdir(parents=True)
    num_files = max(1, math.ceil(len(dataset) / _ROWS_PER_FILE))
    for index in range(num_files):
        shard = dataset.shard(num_files, index, contiguous=True)
        path = folder / f"train-{index:05d}-of-{num_files:05d}.{output_format}"
        if output_format == "parquet":
            shard.to_parquet(str(path))
        else:
            with ArrowWriter(path=str(path), features=dataset.features) as writer:
                for batch in shard.with_format("arrow").iter(batch_size=10_000):
                    writer.write_table(batch)
                writer.finalize()


def save(
    result: TransformResult,
    output: str | os.PathLike,
    *,
    output_format: str = "disk",
    overwrite: bool = False,
) -> Path:
    """Write every config, the dataset card and ``summary.json`` to ``output`` atomically.

    Everything goes to a hidden sibling folder first and is renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete.
    """
    from pipeline.hub import dataset_card

    if output_format not in OUTPUT_FORMATS:
        raise TransformError(f"unknown output format {output_format!r}: one of {', '.join(OUTPUT_FORMATS)}")
    output = Path(output).absolute()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise TransformError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        for name, dataset in result.configs.items():
            _write_config(dataset, staging / name, output_format)
        summary = {**result.summary, "output_format": output_format}
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        dataset_card(summary).save(str(staging / "README.md"))
        if output.exists():
            trash = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(trash)
            staging.rename(output)
            shutil.rmtree(trash)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


# ---------------------------------------------------------------------------------------------- CLI


def summary_table(summary: dict[str, Any]) -> str:
    """A plain-text table of available/kept groups and skipped examples per kind."""
    header = ("kind", "groups", "in mixed", "sft-only", "null", "off-scale", "empty", "threshold", "dups")
    lines = [header]
    for kind, info in summary["kinds"].items():
        skipped = info["skipped"]
        lines.append(
            (
                kind,
                info["available"],
                info["kept_in_mixed"],
                info["sft_only"],
                *(skipped[r] for r in SKIP_REASONS),
                info["duplicates_merged"],
            )
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True)) for row in lines)
    return (
        f"{summary['records']} records ({summary['failed_records']} failed, skipped); "
        f"mixed: {summary['configs']['mixed']['rows']} groups\n{text}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbox transform",
        description="Turn interaction records into scored comparison groups "
        "(configs imitation, self_critic, realignment, mixed).",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        help="run folders (shards found recursively), save_to_disk folders or .arrow files",
    )
    parser.add_argument("--output", "-o", required=True, help="output folder (written atomically)")
    parser.add_argument(
        "--ratio", default="5:1:1", help="imitation:self_critic:realignment groups in `mixed` (default 5:1:1)"
    )
    parser.add_argument("--format", dest="style", choices=("text", "conversational"), default="text")
    parser.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default="disk",
        help="save_to_disk folders, or Parquet/Arrow files",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixing sample (default 0)")
    parser.add_argument("--num-proc", type=int, default=None, help="processes for the datasets maps")
    parser.add_argument("--cache-dir", default=None, help="datasets cache for the loaded shards")
    parser.add_argument(
        "--input-format",
        choices=("records", "reference"),
        default="records",
        help="`reference`: inputs are the reference implementation's per-agent logs (see pipeline.convert)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ratio = parse_ratio(args.ratio)
        output = Path(args.output)
        if output.exists() and any(output.iterdir()) and not args.overwrite:
            raise TransformError(f"{output} exists and is not empty (pass --overwrite to replace it)")
        inputs: list[Any] = list(args.inputs)
        if args.input_format == "reference":
            from pipeline.convert import import_reference_logs

            inputs = [import_reference_logs(inputs)]
        result = transform(
            inputs,
            ratio=ratio,
            seed=args.seed,
            style=args.style,
            num_proc=args.num_proc,
            cache_dir=args.cache_dir,
        )
        save(result, output, output_format=args.output_format, overwrite=args.overwrite)
    except (TransformError, FileNotFoundError) as err:
        print(f"sandbox transform: error: {err}", file=sys.stderr)
        return 2
    print(summary_table(result.summary))
    print(f"wrote {output}")
    return 0
