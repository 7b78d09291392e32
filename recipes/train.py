"""Train a causal LM with Stable Alignment on comparison groups.

```bash
# one process (CPU or one GPU)
python recipes/train.py --config recipes/configs/train_tiny_cpu.yaml \
    --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset_name data/alignment/mixed

# several GPUs / DeepSpeed / FSDP
accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/train.py \
    --config recipes/configs/train_zero3.yaml
```

The dataset (`--dataset_name`) is a Hub dataset name (with `--dataset_config`), a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk` (with `--dataset_config`, its subfolder of that name, as written
by `sandbox transform`), or Parquet / Arrow / JSON(L) files (comma-separated, globs allowed). Its rows are comparison
groups with columns `prompt`, `completions` and `scores`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

# `python recipes/train.py` from a checkout, without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers import StableAlignmentConfig, StableAlignmentTrainer
from trainers.trainer import REQUIRED_COLUMNS

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


@dataclass
class ScriptArguments:
    """Where the comparison groups come from.

    Parameters:
        dataset_name (`str`):
            Hub dataset name, local `save_to_disk` folder, or data files (`.parquet`, `.arrow`, `.json`, `.jsonl`;
            comma-separated, globs allowed).
        dataset_config (`str`, *optional*):
            Hub configuration name, or the subfolder of a local folder (e.g. `mixed`).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on. A dataset without splits is used whole.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Split to evaluate on, used when `eval_strategy` is not `"no"`.
    """

    dataset_name: str = field(
        metadata={"help": "Hub dataset name, local save_to_disk folder, or Parquet/Arrow/JSON(L) files."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub configuration name, or the subfolder of a local folder."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})


def load_comparison_groups(name: str, config: str | None = None) -> DatasetDict:
    """Load comparison groups from the Hub, a `save_to_disk` folder or data files, as a `DatasetDict`."""
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path / config if config else path
        if not folder.is_dir():
            raise FileNotFoundError(f"no dataset folder {folder}")
        loaded = load_from_disk(str(folder))
    elif path.suffix in FILE_BUILDERS:
        files = [part.strip() for part in name.split(",") if part.strip()]
        loaded = load_dataset(FILE_BUILDERS[path.suffix], data_files=files, name=config)
    else:
        loaded = load_dataset(name, config)
    return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded


def select_splits(
    script_args: ScriptArguments, training_args: StableAlignmentConfig
) -> tuple[Dataset, Dataset | None]:
    """The training split and, when evaluation is on, the test split; a clear error for anything missing."""
    dataset = load_comparison_groups(script_args.dataset_name, script_args.dataset_config)
    names = [script_args.dataset_train_split]
    if training_args.eval_strategy != "no":
        names.append(script_args.dataset_test_split)
    splits = []
    for name in names:
        if name not in dataset:
            raise ValueError(f"no split {name!r} in {script_args.dataset_name} (it has {list(dataset)})")
        missing = [column for column in REQUIRED_COLUMNS if column not in dataset[name].column_names]
        if missing:
            raise ValueError(f"split {name!r} of {script_args.dataset_name} lacks the column(s) {missing}")
        splits.append(dataset[name])
    return splits[0], (splits[1] if len(splits) > 1 else None)


def main(
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    script_args: ScriptArguments,
    training_args: StableAlignmentConfig,
    model_args: ModelConfig,
) -> None:
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        # Each process loads its quantized copy on its own device
        model_init_kwargs["quantization_config"] = quantization_config
        model_init_kwargs["device_map"] = {"": PartialState().local_process_index}
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    trainer = StableAlignmentTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.accelerator.print(
        f"Stable Alignment: {trainer.accelerator.num_processes} process(es), "
        f"distributed type {trainer.accelerator.distributed_type}, "
        f"{len(trainer.train_dataset)} training groups ({trainer.dropped_groups['train']} dropped)"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()


def cli(argv: list[str] | None = None) -> int:
    parser = TrlParser((ScriptArguments, StableAlignmentConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    try:
        if model_args.model_name_or_path is None:
            raise ValueError("--model_name_or_path is required")
        train_dataset, eval_dataset = select_splits(script_args, training_args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    main(train_dataset, eval_dataset, script_args, training_args, model_args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
