"""Interaction records -> alignment examples -> scored comparison groups (``sandbox transform``).

Three kinds of examples come from each record of the sandbox (SPEC section 3; the instructions,
separator and prompt template are in :mod:`pipeline.groups`):

- ``imitation``: prompt = the question; completions = draft (scored by the observer's alignment
  before revision) and revision (scored by its alignment after);
- ``self_critic``: prompt = question + draft + ``SELF_CRITIC_INSTRUCTION``; one completion per
  neighbour = its reason, scored by its rating;
- ``realignment``: prompt = question + draft + ``REALIGNMENT_INSTRUCTION``; completion = the
  neighbours' feedback + ``REALIGNMENT_SEPARATOR`` + revision, scored by the alignment after,
  kept only when the alignment went up and the after-score is above ``REALIGNMENT_MIN_AFTER``.

Texts with data-quality flags (:mod:`pipeline.quality`: echoed instructions, copied examples,
repetition, cut mid-sentence, ...) are dropped by default (``keep_flagged`` keeps them), per kind as
:mod:`pipeline.quality` says: a flagged draft or revision drops that imitation completion and the
record's realignment example; a flagged reason drops that self-critic completion and is left out of
the realignment feedback. The flags stored with each record are used; records stored without them
(older runs, imported reference logs) get them computed here (``refresh_flags`` recomputes them all
with this stage's thresholds). The summary and the card count flagged texts per reason.

Examples sharing a (kind, prompt) become one **comparison group** (:mod:`pipeline.groups`): a row
with ``prompt``, ``completions``, ``scores`` (best first), ``kind`` and provenance (``run_ids``,
``num_sources``, ``sft_only``). Nothing is ever given a made-up score: failed records and
completions whose score is null, NaN or off the 1..7 scale are skipped and counted. Identical
completions are merged within a group (their score is the mean), never across groups. Groups left
with one completion are kept as SFT-only groups (``sft_only=True``); the Stable Alignment loss
reduces to SFT on them. The kinds are then sampled into the ``mixed`` config (``--mix``, see
:func:`mix_counts` for what the proportions mean when a kind is scarce).

:func:`run_transform` does the whole stage from a :class:`TransformConfig`; ``sandbox transform``
parses its command line into one and calls it. :func:`transform` and :func:`save` are its two
halves (in memory; to disk).

Every step is a ``datasets`` operation (batched ``map``/``filter`` with ``num_proc`` and declared
``Features``) whose fingerprint depends only on its inputs, so rerunning on the same shards
reuses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from datasets import Dataset, Features, concatenate_datasets, load_dataset, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher

import pipeline.groups
import pipeline.prompts
import pipeline.quality
from pipeline.argparsing import parse
from pipeline.card import dataset_card
from pipeline.convert import import_reference_logs
from pipeline.errors import UserError, run_command
from pipeline.groups import (
    CONVERSATIONAL_GROUP_FEATURES,
    EXAMPLE_FEATURES,
    KINDS,
    PROMPT_TEMPLATE,
    RATING_MAX,
    RATING_MIN,
    REALIGNMENT_INSTRUCTION,
    REALIGNMENT_MIN_AFTER,
    REALIGNMENT_SEPARATOR,
    SELF_CRITIC_INSTRUCTION,
    SKIP_REASONS,
    SUMMARY_FILE,
    OutputFormat,
    Style,
    add_completion,
    group_examples,
    new_example,
    score_problem,
    split_kinds,
)
from pipeline.quality import QualityConfig, flag_counts, kept, record_flags
from pipeline.records import FLAGS_COLUMN, QUALITY_FEATURES, RECORD_FEATURES
from pipeline.textio import format_table, fsync_dir, write_atomic

PROG = "sandbox transform"

DEFAULT_MIX = {"imitation": 5.0, "self_critic": 1.0, "realignment": 1.0}
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

InputFormat = Literal["records", "reference"]
"""``records``: interaction records of ``sandbox simulate``; ``reference``: the reference
implementation's per-agent logs (:func:`pipeline.convert.import_reference_logs`)."""


@dataclass
class TransformResult:
    """The configs (``imitation``, ``self_critic``, ``realignment``, ``mixed``), the summary and,
    once saved, the output folder."""

    configs: dict[str, Dataset]
    summary: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None
    """Where :func:`save` wrote it (``None`` until saved)."""


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
    """Raise :class:`UserError` unless ``features`` holds the record columns with their types (the
    quality flags, stored since schema version 3, are optional)."""
    missing = [name for name in _RECORD_COLUMNS if name not in features]
    if missing:
        raise UserError(f"{where}: not interaction records, missing columns {', '.join(missing)}")
    for name in (*_RECORD_COLUMNS, FLAGS_COLUMN):
        if name in features and features[name] != RECORD_FEATURES[name]:
            raise UserError(
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
        raise UserError(f"{path}: not a readable Arrow shard ({err})") from None


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
            try:
                dataset = load_from_disk(str(path))
            except FileNotFoundError as err:  # a state.json without its data files
                raise UserError(f"{path}: {err}") from None
            if not isinstance(dataset, Dataset):
                raise UserError(f"{path}: a DatasetDict; pass one split's folder")
            check_record_features(dataset.features, str(path))
            parts.append(dataset)
            continue
        if path.is_file() and path.suffix == ".arrow":
            found = [path]
        elif path.is_dir():
            found = find_shards(path)
            if not found:
                raise UserError(f"{path}: no record shards (*.arrow) in this folder")
        else:
            raise UserError(f"{path}: no such folder or .arrow file")
        for shard in found:
            schema, rows = _shard_info(shard)
            check_record_features(Features.from_arrow_schema(schema), str(shard))
            if rows:  # the arrow builder refuses a split made only of empty files
                shards.append(shard)
    flush_shards()
    if not parts:
        raise UserError("the input holds no records")
    records = concatenate_datasets([_with_flags_column(p) for p in parts])
    if len(records) == 0:
        raise UserError("the input holds no records")
    return records


def _with_flags_column(records: Dataset) -> Dataset:
    """The columns the transform reads, with a null flags column where the records have none."""
    if FLAGS_COLUMN in records.column_names:
        return records.select_columns([*_RECORD_COLUMNS, FLAGS_COLUMN])
    records = records.select_columns(list(_RECORD_COLUMNS))
    return records.add_column(FLAGS_COLUMN, [None] * len(records), feature=QUALITY_FEATURES)


def _fill_flags(batch: dict[str, list], quality: QualityConfig, refresh: bool) -> dict[str, list]:
    columns = list(batch)
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    return {
        FLAGS_COLUMN: [
            record_flags(row, quality) if refresh or row[FLAGS_COLUMN] is None else row[FLAGS_COLUMN]
            for row in rows
        ]
    }


def _code_fingerprint() -> str:
    """A hash of the source of the modules that turn records into examples and flags. ``datasets``
    fingerprints a mapped function by its module and name, not its code: without this, a cached map
    of an earlier version of these rules would be reused."""
    modules = (pipeline.quality, pipeline.prompts, pipeline.groups)
    sources = [Path(module.__file__).read_bytes() for module in modules] + [Path(__file__).read_bytes()]
    return hashlib.sha256(b"\0".join(sources)).hexdigest()


def attach_flags(
    records: Dataset, quality: QualityConfig, refresh: bool = False, num_proc: int | None = None
) -> Dataset:
    """``records`` with their quality flags: those stored are kept (all recomputed with ``refresh``),
    the missing ones computed with ``quality``'s thresholds."""
    return records.map(
        _fill_flags,
        batched=True,
        fn_kwargs={"quality": quality, "refresh": refresh},
        features=records.features,
        num_proc=num_proc,
        new_fingerprint=Hasher.hash([records._fingerprint, quality, refresh, _code_fingerprint()]),
        desc="Quality flags",
    )


def find_run_configs(inputs: Sequence[str | os.PathLike | Dataset]) -> dict[str, Any]:
    """The run configurations saved next to the shards (secrets removed), keyed by their path
    relative to the input folder's parent (no absolute local paths end up in a published card)."""
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


def record_examples(record: dict[str, Any], keep_flagged: bool = False) -> list[dict[str, Any]]:
    """The imitation, self-critic and realignment examples of one ``ok`` record (one row per kind).

    The record's quality flags (column ``FLAGS_COLUMN``; none: computed now) drop texts as
    :func:`pipeline.quality.kept` says, unless ``keep_flagged``.
    """
    question, draft, revision = record["question"], record["draft"], record["revision"]
    scores, run_id = record["scores"] or {}, record["run_id"]
    before, after = scores.get("alignment_before"), scores.get("alignment_after")
    feedback_items = record["feedback"] or []
    clean = kept(record.get(FLAGS_COLUMN) or record_flags(record))
    if keep_flagged:
        clean = {kind: [True] * len(flags) for kind, flags in clean.items()}

    imitation = new_example("imitation", question, run_id)
    add_completion(imitation, draft, before, clean["imitation"][0])
    add_completion(imitation, revision, after, clean["imitation"][1])

    self_critic = new_example(
        "self_critic",
        PROMPT_TEMPLATE.format(question=question, draft=draft, instruction=SELF_CRITIC_INSTRUCTION),
        run_id,
    )
    for feedback, ok in zip(feedback_items, clean["self_critic"], strict=True):
        add_completion(self_critic, feedback["reason"], feedback["rating"], ok)

    realignment = new_example(
        "realignment",
        PROMPT_TEMPLATE.format(question=question, draft=draft, instruction=REALIGNMENT_INSTRUCTION),
        run_id,
    )
    problem = score_problem(before) or score_problem(after)
    if problem:
        realignment[problem] += 1
    elif not (after > before and after > REALIGNMENT_MIN_AFTER):
        realignment["below_threshold"] += 1
    elif not clean["realignment"][0]:
        realignment["flagged"] += 1
    else:
        reasons = [
            f["reason"].strip()
            for f, ok in zip(feedback_items, clean["self_critic"], strict=True)
            if ok and (f["reason"] or "").strip()
        ]
        completion = (
            "\n".join(reasons) + REALIGNMENT_SEPARATOR + revision
            if reasons and (revision or "").strip()
            else None
        )
        add_completion(realignment, completion, after)
    return [imitation, self_critic, realignment]


def _explode(batch: dict[str, list], keep_flagged: bool) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in EXAMPLE_FEATURES}
    columns = list(batch)
    for values in zip(*batch.values(), strict=True):
        record = dict(zip(columns, values, strict=True))
        if record["status"] != "ok":
            continue
        for row in record_examples(record, keep_flagged):
            for name, value in row.items():
                out[name].append(value)
    return out


def build_examples(records: Dataset, num_proc: int | None = None, keep_flagged: bool = False) -> Dataset:
    """Records -> per-record example rows (``EXAMPLE_FEATURES``); failed records give none, flagged
    texts are dropped unless ``keep_flagged``."""
    return records.map(
        _explode,
        batched=True,
        remove_columns=records.column_names,
        features=EXAMPLE_FEATURES,
        fn_kwargs={"keep_flagged": keep_flagged},
        num_proc=num_proc,
        new_fingerprint=Hasher.hash([records._fingerprint, keep_flagged, _code_fingerprint()]),
        desc="Building examples",
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


# ------------------------------------------------------------------------------------------- mixing


def parse_mix(text: str) -> dict[str, float]:
    """``"5:1:1"`` -> ``{"imitation": 5.0, "self_critic": 1.0, "realignment": 1.0}``."""
    if not isinstance(text, str):  # YAML reads an unquoted 5:1:1 as a base-60 integer
        raise UserError(f"--mix {text!r}: expected a string like 5:1:1 (quote it in YAML)")
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(KINDS) or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) == 0:
        raise UserError(f"--mix {text!r}: expected three non-negative numbers like 5:1:1")
    return dict(zip(KINDS, values, strict=True))


def mix_counts(available: dict[str, int], mix: dict[str, float]) -> dict[str, int]:
    """How many groups of each kind the ``mixed`` config takes: the mix caps the abundant kinds,
    and a scarce kind contributes all it has.

    The kinds with a positive weight and some groups take part; the one with the largest weight
    (the first of ``KINDS`` on a tie: imitation in the paper's 5:1:1) is the main kind. The scale
    is the main kind's groups per unit of weight, capped by that of the most plentiful other kind,
    and each kind takes ``scale x weight`` groups (rounded down, at least one) or all it has when it
    has fewer. So under 5:1:1:

    - 40 : 40 : 40 available gives 40 : 8 : 8 (the plain ratio);
    - 100 : 100 : 1 gives 100 : 20 : 1 (the scarce realignment kind gives its one group and does
      not shrink the others, where the plain ratio would give 5 : 1 : 1);
    - 1000 : 10 : 1 gives 50 : 10 : 1 (the main kind is capped by the most plentiful other one);
    - 3 : 30 : 30 gives 3 : 1 : 1 (a scarce main kind caps the others, each keeping one group).

    Every kind with groups and a positive weight keeps at least one; the others contribute none.
    """
    weighted = {k: r for k, r in mix.items() if r > 0 and available.get(k, 0) > 0}
    if not weighted:
        return dict.fromkeys(mix, 0)
    main = max(weighted, key=lambda k: (weighted[k], -list(mix).index(k)))
    scale = available[main] / weighted[main]
    others = [available[k] / weighted[k] for k in weighted if k != main]
    if others:
        scale = min(scale, max(others))
    return {
        k: min(available[k], max(1, math.floor(scale * weighted[k] + 1e-9))) if k in weighted else 0
        for k in mix
    }


def mix_groups(
    configs: dict[str, Dataset], mix: dict[str, float], seed: int
) -> tuple[Dataset, dict[str, int]]:
    """Sample each kind down to the ``mix`` proportions with ``seed``, concatenate and shuffle."""
    counts = mix_counts({k: len(configs[k]) for k in KINDS}, mix)
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


def check_choice(flag: str, value: Any, choices: Any) -> None:
    """Raise :class:`UserError` unless ``value`` is one of ``choices`` (a ``Literal`` type)."""
    options = get_args(choices)
    if value not in options:
        raise UserError(f"--{flag} {value!r}: one of {', '.join(options)}")


def transform(
    inputs: Sequence[str | os.PathLike | Dataset],
    *,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    style: Style = "text",
    num_proc: int | None = None,
    cache_dir: str | None = None,
    quality: QualityConfig | None = None,
    keep_flagged: bool = False,
    refresh_flags: bool = False,
) -> TransformResult:
    """Records -> the four configs of comparison groups, with a summary of what was kept and skipped.

    ``inputs``: run folders (shards found recursively), ``save_to_disk`` folders, ``.arrow`` files
    or in-memory record datasets; ``mix``: the proportions of the kinds in ``mixed`` (default
    :data:`DEFAULT_MIX`), sampled with ``seed``; ``quality``: the thresholds of the flags computed
    for records stored without them (all records with ``refresh_flags``); ``keep_flagged``: use
    flagged texts too. Nothing is written but the datasets cache.
    """
    check_choice("style", style, Style)
    mix = mix or DEFAULT_MIX
    quality = quality or QualityConfig()
    records = load_records(inputs, cache_dir=cache_dir)
    stored = len(records) - records.data.table.column(FLAGS_COLUMN).null_count
    records = attach_flags(records, quality, refresh_flags, num_proc=num_proc)
    ok = pc.equal(records.data.table.column("status"), "ok")
    failed = len(records) - int(pc.sum(ok).as_py() or 0)
    texts = flag_counts(records.data.table.column(FLAGS_COLUMN).filter(ok).to_pylist())

    examples = build_examples(records, num_proc=num_proc, keep_flagged=keep_flagged)
    counts = _count_by_kind(examples)
    groups = group_examples(examples, num_proc=num_proc)
    if len(groups) == 0:
        skipped = sum(c[r] for c in counts.values() for r in SKIP_REASONS)
        raise UserError(
            f"no usable examples in {len(records)} records ({failed} failed, {skipped} completions skipped)"
        )
    if style == "conversational":
        groups = to_conversational(groups, num_proc=num_proc)
    configs = split_kinds(groups)
    configs["mixed"], kept = mix_groups(configs, mix, seed)

    stats = {name: config_stats(ds) for name, ds in configs.items()}
    summary = {
        "records": len(records),
        "failed_records": failed,
        "style": style,
        "ratio": mix,  # the key of outputs written before ``--ratio`` became ``--mix``
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
        "quality": {
            "keep_flagged": keep_flagged,
            "flags_stored": 0 if refresh_flags else stored,
            "flags_computed": len(records) if refresh_flags else len(records) - stored,
            "texts": texts,
            "thresholds": dataclasses.asdict(quality),
        },
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

_ROWS_PER_FILE = 200_000


def _write_config(dataset: Dataset, folder: Path, output_format: OutputFormat) -> None:
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


def check_output(output: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless ``overwrite``."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output} exists and is not empty (pass --overwrite to replace it)")


def save(
    result: TransformResult,
    output: str | os.PathLike,
    *,
    output_format: OutputFormat = "disk",
    overwrite: bool = False,
) -> Path:
    """Write every config, the dataset card and ``summary.json`` to ``output`` atomically.

    Everything goes to a hidden sibling folder first and is renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete.
    """
    check_choice("output-format", output_format, OutputFormat)
    output = Path(output).absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        for name, dataset in result.configs.items():
            _write_config(dataset, staging / name, output_format)
        summary = {**result.summary, "output_format": output_format}
        write_atomic(staging / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        write_atomic(staging / "README.md", str(dataset_card(summary)))
        if output.exists():
            trash = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(trash)
            staging.rename(output)
            shutil.rmtree(trash)
        else:
            staging.rename(output)
        fsync_dir(output.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


# ---------------------------------------------------------------------------------------------- CLI


@dataclass
class TransformConfig:
    """
    Parameters of ``sandbox transform`` and :func:`run_transform`.

    Parameters:
        > Parameters that control the input and output

        inputs (`list[str]`):
            Run folders of ``sandbox simulate`` (shards found recursively), ``save_to_disk`` folders
            or ``.arrow`` files; with ``input_format="reference"``, the reference implementation's
            logs (files or folders).
        output (`str`):
            The output folder, written atomically: one subfolder per config, ``README.md`` (the
            dataset card) and ``summary.json``.
        input_format (`str`, *optional*, defaults to `"records"`):
            ``records`` (interaction records) or ``reference`` (the reference implementation's
            per-agent logs, see :mod:`pipeline.convert`).
        output_format (`str`, *optional*, defaults to `"disk"`):
            ``disk`` (``save_to_disk`` folders), ``parquet`` or ``arrow`` files.
        overwrite (`bool`, *optional*, defaults to `False`):
            Whether to replace a non-empty output folder.

        > Parameters that control the comparison groups

        style (`str`, *optional*, defaults to `"text"`):
            ``text`` (strings) or ``conversational`` (TRL's message lists).
        mix (`str`, *optional*, defaults to `"5:1:1"`):
            Proportions imitation:self_critic:realignment of the ``mixed`` config, in groups (the
            paper's released mix is 5:1:1). Parsed into ``mix_weights`` (kind -> weight).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sample of the ``mixed`` config.

        > Parameters that control the data-quality filters (:mod:`pipeline.quality`)

        keep_flagged (`bool`, *optional*, defaults to `False`):
            Use texts with quality flags too (by default they are dropped, per kind as
            :mod:`pipeline.quality` says).
        refresh_flags (`bool`, *optional*, defaults to `False`):
            Recompute every record's flags with ``quality`` instead of using the stored ones.
        quality (`QualityConfig`):
            Thresholds of the rules, for records stored without flags (``--quality.min-words-answer``, ...).

        > Parameters that control the processing

        num_proc (`int`, *optional*):
            Processes for the ``datasets`` maps.
        cache_dir (`str`, *optional*):
            ``datasets`` cache for the loaded shards (default: ``HF_DATASETS_CACHE``).
    """

    inputs: list[str] = field(
        metadata={
            "help": "run folders (shards found recursively), save_to_disk folders or .arrow files",
            "positional": True,
        }
    )
    output: str = field(metadata={"help": "output folder (written atomically)", "aliases": ("-o",)})
    input_format: InputFormat = field(
        default="records",
        metadata={"help": "`reference`: inputs are the reference implementation's per-agent logs"},
    )
    output_format: OutputFormat = field(
        default="disk", metadata={"help": "save_to_disk folders, or Parquet/Arrow files"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})
    style: Style = field(
        default="text", metadata={"help": "text (strings) or conversational (TRL message lists)"}
    )
    mix: str = field(
        default="5:1:1", metadata={"help": "imitation:self_critic:realignment groups in `mixed`"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the mixing sample"})
    keep_flagged: bool = field(
        default=False, metadata={"help": "use texts with data-quality flags too (default: drop them)"}
    )
    refresh_flags: bool = field(
        default=False,
        metadata={
            "help": "recompute every record's quality flags with these thresholds (not the stored ones)"
        },
    )
    quality: QualityConfig = field(
        default_factory=QualityConfig,
        metadata={"help": "thresholds of the data-quality rules, for records stored without flags"},
    )
    num_proc: int | None = field(default=None, metadata={"help": "processes for the datasets maps"})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache for the loaded shards"})
    mix_weights: dict[str, float] = field(
        init=False, repr=False, metadata={"help": "``mix`` parsed: kind -> weight (derived)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str | os.PathLike):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise UserError("no inputs: give at least one run folder or shard")
        self.inputs = [os.fspath(item) for item in self.inputs]
        self.output = os.fspath(self.output)
        check_choice("input-format", self.input_format, InputFormat)
        check_choice("output-format", self.output_format, OutputFormat)
        check_choice("style", self.style, Style)
        self.mix_weights = parse_mix(self.mix)
        if self.num_proc is not None and self.num_proc < 1:
            raise UserError(f"--num-proc {self.num_proc}: must be at least 1")
        if not isinstance(self.quality, QualityConfig):
            raise UserError("quality must be a mapping of quality thresholds (min_words_answer, ...)")


def run_transform(config: TransformConfig) -> TransformResult:
    """Everything ``sandbox transform`` does after parsing: load the records (or import the
    reference logs), build the examples, group and mix them, and save the configs, the dataset card
    and ``summary.json`` to ``config.output``. The result carries the in-memory configs, the summary
    and the output folder."""
    check_output(config.output, config.overwrite)  # before the work, not after it
    inputs: list[Any] = list(config.inputs)
    if config.input_format == "reference":
        inputs = [import_reference_logs(inputs)]
    result = transform(
        inputs,
        mix=config.mix_weights,
        seed=config.seed,
        style=config.style,
        num_proc=config.num_proc,
        cache_dir=config.cache_dir,
        quality=config.quality,
        keep_flagged=config.keep_flagged,
        refresh_flags=config.refresh_flags,
    )
    result.output = save(
        result, config.output, output_format=config.output_format, overwrite=config.overwrite
    )
    return result


def summary_table(summary: dict[str, Any]) -> str:
    """A plain-text table of available/kept groups and skipped examples per kind."""
    header = (
        "kind",
        "groups",
        "in mixed",
        "sft-only",
        "null",
        "off-scale",
        "empty",
        "threshold",
        "flagged",
        "dups",
    )
    rows = [
        (
            kind,
            info["available"],
            info["kept_in_mixed"],
            info["sft_only"],
            *(info["skipped"][r] for r in SKIP_REASONS),
            info["duplicates_merged"],
        )
        for kind, info in summary["kinds"].items()
    ]
    texts = summary["quality"]["texts"]
    flagged = ", ".join(
        f"{kind}s {texts[kind].get('flagged', 0)}/{texts[kind].get('texts', 0)}" for kind in texts
    )
    policy = "kept" if summary["quality"]["keep_flagged"] else "dropped"
    return (
        f"{summary['records']} records ({summary['failed_records']} failed, skipped); "
        f"mixed: {summary['configs']['mixed']['rows']} groups\n{format_table(header, rows)}\n"
        f"texts with quality flags ({policy}): {flagged}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> None:
        config, _ = parse(
            TransformConfig,
            argv,
            PROG,
            "Turn interaction records into scored comparison groups "
            "(configs imitation, self_critic, realignment, mixed).",
        )
        result = run_transform(config)
        print(summary_table(result.summary))
        print(f"wrote {result.output}")

    return run_command(PROG, body)
