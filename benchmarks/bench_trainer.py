"""Throughput and peak memory: StableAlignmentTrainer vs TRL's DPOTrainer vs a reference-code-style loop.

Same model, same data (groups of 2 completions = preference pairs), same batch and sequence lengths:

- `stable`: `StableAlignmentTrainer`, one forward per batch of groups.
- `dpo`: TRL's `DPOTrainer` with its reference model (a second forward per batch).
- `reference`: the reference code's training step: one group per step, `torch.autograd.set_detect_anomaly(True)`,
  the model's own loss computed with `labels` and discarded, per-sequence losses from the full logits.

Each method runs in its own process, so the peak RSS (CPU) or `torch.cuda.max_memory_allocated` (GPU) is its own.
The first step is a warm-up and is not timed. Tokens/s counts the prompt + completion tokens of the groups processed.

    python benchmarks/bench_trainer.py                  # all three, prints a table
    python benchmarks/bench_trainer.py --steps 6 --batch-size 4 --prompt-tokens 96 --completion-tokens 64 --cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("stable", "dpo", "reference")


def make_pairs(
    tokenizer, n: int, prompt_tokens: int, completion_tokens: int, seed: int = 0
) -> dict[str, list]:
    """`n` text groups of two completions, built from random ordinary tokens of the requested lengths."""
    import random

    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]

    def text(length: int) -> str:
        return tokenizer.decode([rng.choice(vocab) for _ in range(length)])

    return {
        "prompt": [text(prompt_tokens) for _ in range(n)],
        "chosen": [text(completion_tokens) for _ in range(n)],
        "rejected": [text(completion_tokens) for _ in range(n)],
    }


class StepTimer:
    """A `TrainerCallback` recording when each optimizer step ends."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.ends.append(time.perf_counter())

        self.ends: list[float] = []
        self.callback = _Callback()


def training_kwargs(args, out: str) -> dict:
    """The settings both trainers share, so they run the same steps, batch and precision."""
    return dict(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, max_length=1024,
        activation_checkpointing=False, report_to=[], save_strategy="no", logging_steps=args.steps,
        use_cpu=not args.cuda, bf16=args.cuda,
    )  # fmt: skip


def timed_train(trainer_class, model_path, config, dataset) -> float:
    """Seconds from the end of the first (warm-up) step to the end of the last."""
    timer = StepTimer()
    trainer_class(model=model_path, args=config, train_dataset=dataset, callbacks=[timer.callback]).train()
    return timer.ends[-1] - timer.ends[0]


def run_stable(model_path, pairs, args, out) -> float:
    from datasets import Dataset

    from trainers import StableAlignmentConfig, StableAlignmentTrainer

    dataset = Dataset.from_dict(
        {
            "prompt": pairs["prompt"],
            "completions": [list(c) for c in zip(pairs["chosen"], pairs["rejected"], strict=True)],
            "scores": [[7.0, 1.0]] * len(pairs["prompt"]),
        }
    )
    config = StableAlignmentConfig(**training_kwargs(args, out))
    return timed_train(StableAlignmentTrainer, model_path, config, dataset)


def run_dpo(model_path, pairs, args, out) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**training_kwargs(args, out))
    return timed_train(DPOTrainer, model_path, config, Dataset.from_dict(pairs))


def run_reference(model_path, pairs, args, out) -> float:
    """The reference code's step, defects included, on one group per step (its collator only works that way)."""
    import torch
    from torch.nn import CrossEntropyLoss
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if args.cuda else "cpu"
    torch.autograd.set_detect_anomaly(True)  # switched on globally by the reference module
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    loss_fct = CrossEntropyLoss(ignore_index=-100)
    scores = torch.tensor([7.0, 1.0], device=device)
    ends = []
    for step in range(args.steps * args.batch_size):
        query = pairs["prompt"][step]
        # The reference collator tokenizes every step, query alone and query + response, with no EOS.
        source_len = len(tokenizer(query)["input_ids"])
        examples = [query + pairs["chosen"][step], query + pairs["rejected"][step]]
        ids = [torch.tensor(tokenizer(text)["input_ids"]) for text in examples]
        labels = [t.clone() for t in ids]
        for label in labels:
            label[:source_len] = -100
        input_ids = torch.nn.utils.rnn.pad_sequence(
            ids, batch_first=True, padding_value=tokenizer.pad_token_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
        input_ids, labels = input_ids.to(device), labels.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.cuda):
            # The model's own loss is computed (labels passed) and discarded
            logits = model(
                input_ids=input_ids, attention_mask=input_ids.ne(tokenizer.pad_token_id), labels=labels
            )["logits"]
        shift_logits, shift_labels = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
        nll = torch.stack(
            [
                loss_fct(lg.view(-1, lg.size(-1)), lb.view(-1))
                for lg, lb in zip(shift_logits, shift_labels, strict=True)
            ]
        )
        margin = (scores[0] - scores[1]) / 7.0 * 1.0
        loss = nll[0] + 0.5 * torch.clamp(nll[0] - nll[1] + margin, min=0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % args.batch_size == 0:  # one "step" of the other methods = batch_size groups
            ends.append(time.perf_counter())
    return ends[-1] - ends[0]


def child(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from pipeline.embedded import embedded_model_path

    model_path = str(args.model or embedded_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    n = args.steps * args.batch_size
    pairs = make_pairs(tokenizer, n, args.prompt_tokens, args.completion_tokens)
    tokens_per_group = (
        sum(
            len(tokenizer(pairs["prompt"][i] + pairs[key][i] + tokenizer.eos_token)["input_ids"])
            for i in range(n)
            for key in ("chosen", "rejected")
        )
        / n
    )
    runner = {"stable": run_stable, "dpo": run_dpo, "reference": run_reference}[args.method]
    with tempfile.TemporaryDirectory() as out:
        seconds = runner(model_path, pairs, args, out)
    timed_groups = (args.steps - 1) * args.batch_size  # the first step is the warm-up
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "method": args.method,
                "tokens_per_s": timed_groups * tokens_per_group / seconds,
                "seconds": seconds,
                "peak_mib": peak,
                "tokens_per_group": tokens_per_group,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, help="run one method (used internally); default: all")
    parser.add_argument("--model", help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps, the first one untimed")
    parser.add_argument("--batch-size", type=int, default=2, help="groups (pairs) per step")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--cuda", action="store_true", help="run on the GPU in bf16")
    args = parser.parse_args(argv)
    if args.method:
        child(args)
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for method in METHODS:
        command = [
            sys.executable,
            __file__,
            "--method",
            method,
            *(argv if argv is not None else sys.argv[1:]),
        ]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            return 1
        results[method] = json.loads(line[len("RESULT ") :])
    stable = results["stable"]["tokens_per_s"]
    print(f"{'method':<10} {'tokens/s':>10} {'speed-up':>9} {'peak MiB':>9}")
    for method, r in results.items():
        print(
            f"{method:<10} {r['tokens_per_s']:>10.1f} {stable / r['tokens_per_s']:>8.2f}x {r['peak_mib']:>9.0f}"
        )
    print(
        f"(speed-up = StableAlignmentTrainer tokens/s over the method's; {results['stable']['tokens_per_group']:.0f} tokens per group)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
