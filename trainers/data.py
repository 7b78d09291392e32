"""Loading and checking comparison groups (prompt, completions, scores) before any training starts.

Every check here runs on every process before the first collective operation, so under `accelerate launch` a bad
dataset stops each process with the same one-line error instead of leaving the others waiting for it.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import trl
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from pipeline.errors import UserError

from .config import StableAlignmentConfig

REQUIRED_COLUMNS = ("prompt", "completions", "scores")
TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "scores")
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """Where the comparison groups come from: TRL's script arguments, with a required dataset.

    Parameters:
        dataset_name (`str`):
            Hub dataset name, local `save_to_disk` folder, or data files (`.parquet`, `.arrow`, `.json`, `.jsonl`;
            comma-separated, globs allowed).
        dataset_config (`str`, *optional*):
            Hub configuration name, or the subfolder of a local folder (e.g. `mixed`, as `sandbox transform` writes).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on. A dataset without splits is used whole.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Split to evaluate on, used when `eval_strategy` is not `"no"`.
        dataset_streaming (`bool`, *optional*, defaults to `False`):
            Must stay `False`: the trainer tokenizes and checks the whole dataset before training.
        ignore_bias_buffers (`bool`, *optional*, defaults to `False`):
            Have DDP skip the model's boolean buffers (TRL's fix for models whose mask buffers break DDP).
    """

    dataset_name: str = field(
        metadata={"help": "Hub dataset name, local save_to_disk folder, or Parquet/Arrow/JSON(L) files."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub configuration name, or the subfolder of a local folder."}
    )

    def __post_init__(self):
        if self.dataset_streaming:
            raise UserError(
                "dataset_streaming is not supported: the trainer tokenizes the whole dataset up front"
            )


def _data_files(name: str) -> list[str]:
    """The files a comma-separated list of paths or globs names, each checked to exist and hold something."""
    files = []
    for pattern in filter(None, (part.strip() for part in name.split(","))):
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise UserError(f"no dataset file {pattern}")
        empty = [match for match in matches if Path(match).stat().st_size == 0]
        if empty:
            raise UserError(f"the dataset file {empty[0]} is empty")
        files.extend(matches)
    return files


def load_comparison_groups(name: str, config: str | None = None) -> DatasetDict:
    """Load comparison groups from the Hub, a `save_to_disk` folder or data files, as a `DatasetDict`."""
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            folder = path / config if config else path
            if not folder.is_dir():
                raise UserError(f"no dataset folder {folder}")
            loaded = load_from_disk(str(folder))
        elif path.suffix in FILE_BUILDERS:
            loaded = load_dataset(FILE_BUILDERS[path.suffix], data_files=_data_files(name), name=config)
        elif path.is_absolute() or name.startswith((".", "~")):
            raise UserError(f"no dataset folder or file {name}")
        else:
            loaded = load_dataset(name, config)
    except (FileNotFoundError, DatasetGenerationError, pa.ArrowInvalid) as error:
        raise UserError(f"cannot read the dataset {name}: {error}") from error
    return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded


def validate_groups(dataset: Dataset, rating_scale: float, name: str = "the dataset") -> None:
    """Refuse, naming the first bad row, a dataset the trainer could not train on soundly.

    Each row needs at least one completion, one score per completion, and scores that are finite numbers within
    `[0, rating_scale]` (a NaN or an off-scale score would train silently on a meaningless loss). The columns are read
    as Arrow arrays, so checking a large dataset costs little next to tokenizing it.
    """
    required = TOKENIZED_COLUMNS if "completion_ids" in dataset.column_names else REQUIRED_COLUMNS
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise UserError(f"{name} lacks the column(s) {missing}; comparison groups need {list(required)}")
    completions_column = required[1]
    if len(dataset) == 0:
        raise UserError(f"{name} holds no comparison group")
    table = dataset.select_columns([completions_column, "scores"]).with_format("arrow")[:]
    scores = table.column("scores").combine_chunks()
    if not (pa.types.is_list(scores.type) or pa.types.is_large_list(scores.type)) or not (
        pa.types.is_integer(scores.type.value_type) or pa.types.is_floating(scores.type.value_type)
    ):
        raise UserError(f"the scores of {name} must be lists of numbers, got {scores.type}")

    num_completions = pc.list_value_length(table.column(completions_column)).fill_null(0).to_numpy()
    num_scores = pc.list_value_length(scores).fill_null(0).to_numpy()
    bad = (num_completions == 0) | (num_completions != num_scores)
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(
            f"row {row} of {name} has {num_completions[row]} completion(s) and {num_scores[row]} score(s); "
            "each group needs at least one completion and one score per completion"
        )

    values = pc.cast(pc.list_flatten(scores), pa.float64()).to_numpy(zero_copy_only=False)
    rows = pc.list_parent_indices(scores).to_numpy()
    for bad, problem in (
        (~np.isfinite(values), "must be a finite number"),
        ((values < 0) | (values > rating_scale), f"is outside the rating scale [0, {rating_scale:g}]"),
    ):
        if bad.any():
            index = int(np.argmax(bad))
            raise UserError(f"row {rows[index]} of {name}: the score {values[index]} {problem}")


def select_splits(
    script_args: ScriptArguments, training_args: StableAlignmentConfig
) -> tuple[Dataset, Dataset | None]:
    """The checked training split and, when evaluation is on, the checked test split."""
    dataset = load_comparison_groups(script_args.dataset_name, script_args.dataset_config)
    names = [script_args.dataset_train_split]
    if training_args.eval_strategy != "no":
        names.append(script_args.dataset_test_split)
    splits = []
    for name in names:
        if name not in dataset:
            raise UserError(f"no split {name!r} in {script_args.dataset_name} (it has {list(dataset)})")
        validate_groups(
            dataset[name], training_args.rating_scale, f"split {name!r} of {script_args.dataset_name}"
        )
        splits.append(dataset[name])
    return splits[0], (splits[1] if len(splits) > 1 else None)
