"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, built offline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Is it ever acceptable to lie to protect a friend's feelings?",
    "Honesty, kindness and fairness matter when we disagree with each other.",
    "Rating: 5. Reason: the answer is helpful, harmless and honest.",
    "I would refuse to help with anything that could hurt people.",
    "Answer: sharing credit with colleagues builds trust at work.",
    "0 1 2 3 4 5 6 7 8 9 / * : , . ? ! - ' \"",
] * 20


def build_tiny_model(folder: Path) -> Path:
    """Write a 2-layer, hidden-64 Llama and its tokenizer to ``folder`` (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the tiny model folder; load it with ``from_pretrained``. Do not modify it."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The converted SmolLM2 folder (tests using it carry ``@pytest.mark.embedded``)."""
    from pipeline.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def redteam_questions() -> Path:
    """Path of the 5,022 HH red-team questions in ../shared (a skip when absent; never copied in)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_redteam_questions.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path
