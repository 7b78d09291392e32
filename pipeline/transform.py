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

Examples sharing a (kind, prompt) become one **comparison group** (:mod:`pipeline.groups`): a row
with ``prompt``, ``completions``, ``scores`` (best first), ``kind`` and provenance (``run_ids``,
``num_sources``, ``sft_only``). Nothing is ever given a made-up score: failed records and
completions whose score is null, NaN or off the 1..7 scale are skipped and counted. Identical
completions are merged within a group (their score is the mean), never across groups. Groups left
with one completion are kept as SFT-only groups (``sft_only=True``); the Stable Alignment loss
reduces to SFT on them. The kinds are then sampled into the ``mixed`` config (``--mix``).

:func:`run_transform` does the whole stage from a :class:`TransformConfig`; ``sandbox transform``
parses its command line into one and calls it. :func:`transform` and :func:`save` are its two
halves (in memory; to disk).

Every step is a ``datasets`` operation (batched ``map``/``filter`` with ``num_proc`` and declared
``Features``) whose fingerprint depends only on its inputs, so rerunning on the same shards
reuses the cache.
"""

from __future__ import annotations

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
from pipeline.records import RECORD_FEATURES
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
    """Raise :class:`UserError` unless ``features`` holds the record columns with their types."""
    missing = [name for name in _RECORD_COLUMNS if name not in features]
    if missing:
        raise UserError(f"{where}: not interaction records, missing columns {', '.join(missing)}")
    for name in _RECORD_COLUMNS:
        if features[name] != RECORD_FEATURES[name]:
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
    records = concatenate_datasets([p.select_columns(list(_RECORD_COLUMNS)) for p in parts])
    if len(records) == 0:
        raise UserError("the input holds no records")
    return records


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


def record_examples(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The imitation, self-critic and realignment examples of one ``ok`` record (one row per kind)."""
    question, draft, revision = record["question"], record["draft"], record["revision"]
    scores, run_id = record["scores"] or {}, record["run_id"]
    before, after = scores.get("alignment_before"), scores.get("alignment_after")

    imitation = new_example("imitation", question, run_id)
    add_completion(imitation, draft, before)
    add_completion(imitation, revision, after)

    self_critic = new_example(
        "self_critic",
        PROMPT_TEMPLATE.format(question=question, draft=draft, instruction=SELF_CRITIC_INSTRUCTION),
        run_id,
    )
    for feedback in record["feedback"] or []:
        add_completion(self_critic, feedback["reason"], feedback["rating"])

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
    else:
        reasons = [f["reason"].strip() for f in record["feedback"] or [] if (f["reason"] or "").strip()]
        completion = (
            "\n".join(reasons) + REALIGNMENT_SEPARATOR + revision
            if reasons and (revision or "").strip()
            else None
        )
        add_completion(realignment, completion, after)
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
    """The largest counts in proportion to ``mix`` that the available groups allow.

    A kind with nothing available is left out of the proportion rather than zeroing the mix.
    """
    weighted = {k: r for k, r in mix.items() if r > 0 and available.get(k, 0) > 0}
    if not weighted:
        return dict.fromkeys(mix, 0)
    scale = min(available[k] / r for k, r in weighted.items())
    return {k: math.floor(scale * weighted[k] + 1e-9) if k in weighted else 0 for k in mix}


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
) -> TransformResult:
    """Records -> the four configs of comparison groups, with a summary of what was kept and skipped.

    ``inputs``: run folders (shards found recursively), ``save_to_disk`` folders, ``.arrow`` files
    or in-memory record datasets; ``mix``: the proportions of the kinds in ``mixed`` (default
    :data:`DEFAULT_MIX`), sampled with ``seed``. Nothing is written but the datasets cache.
    """
    check_choice("style", style, Style)
    mix = mix or DEFAULT_MIX
    records = load_records(inputs, cache_dir=cache_dir)
    failed = len(records) - int(pc.sum(pc.equal(records.data.table.column("status"), "ok")).as_py() or 0)

    examples = build_examples(records, num_proc=num_proc)
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
    )
    result.output = save(
        result, config.output, output_format=config.output_format, overwrite=config.overwrite
    )
    return result


def summary_table(summary: dict[str, Any]) -> str:
    """A plain-text table of available/kept groups and skipped examples per kind."""
    header = ("kind", "groups", "in mixed", "sft-only", "null", "off-scale", "empty", "threshold", "dups")
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
    return (
        f"{summary['records']} records ({summary['failed_records']} failed, skipped); "
        f"mixed: {summary['configs']['mixed']['rows']} groups\n{format_table(header, rows)}"
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
