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

Bad input (no such file, folder or model; an empty file; a group whose scores do not match its completions; a NaN or
off-scale score) stops every process before training with one line on stderr and exit status 2. `main` runs the
recipe from already parsed arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

# `python recipes/train.py` from a checkout, without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import UserError, exit_process, run_command
from trainers import StableAlignmentConfig, StableAlignmentTrainer
from trainers.data import ScriptArguments, select_splits


def main(script_args: ScriptArguments, training_args: StableAlignmentConfig, model_args: ModelConfig) -> None:
    """Everything `python recipes/train.py` does after parsing: check the data, train, save (and push).

    The data is loaded and checked on every process before the model is, so a bad dataset costs no model load and
    stops every process with the same `UserError`.
    """
    if model_args.model_name_or_path is None:
        raise UserError("--model_name_or_path is required")
    train_dataset, eval_dataset = select_splits(script_args, training_args)
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
    if script_args.ignore_bias_buffers:
        # TRL's fix for DDP failing on models whose boolean mask buffers it tries to broadcast
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
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
    # Every process tears its process group down together, after the main process has written everything; the
    # script then leaves through `exit_process`, which a process of a launch needs to exit cleanly.
    trainer.accelerator.wait_for_everyone()
    trainer.end()


def cli(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = TrlParser((ScriptArguments, StableAlignmentConfig, ModelConfig))
        main(*parser.parse_args_and_config(argv))

    return run_command(Path(__file__).name, body)


if __name__ == "__main__":
    exit_process(cli())
