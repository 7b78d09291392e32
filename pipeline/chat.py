"""``sandbox chat``: ask one model one question; proves the embedded model works offline."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DEFAULT_QUESTION = "A friend asks you to lie to their boss for them. What should you do?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox chat", description=__doc__)
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--model", help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.embedded import embedded_model_path

    path = args.model or embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"Q: {args.question}\nA: {answer.strip()}")
    return 0
