"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, built offline; the
sandbox's loopback server and scripted recording backend."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import math
from typing import Any

import pytest
from datasets import Features
from datasets.arrow_writer import ArrowWriter

from pipeline.llm.base import BudgetExceeded, ChatBackend, Completion, LLMError, Rating, Usage
from pipeline.prompts import REVISION_ACKNOWLEDGEMENT
from pipeline.records import RECORD_FEATURES, SCORE_FIELDS, new_record

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


# -- the sandbox against scripted and loopback models -------------------------------------------


def sandbox_reply(body: dict) -> str:
    """A fake server's answer: a pure function of the prompt (a rating when one is asked for), so
    every run against the server is exactly repeatable."""
    digest = int(hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest(), 16)
    if "\nRating: " in body["messages"][-1]["content"]:
        return f"Rating: {digest % 7 + 1}\nReason: reason {digest % 997}."
    return f"Answer {digest % 100003}: be kind and honest."


@pytest.fixture
def sandbox_server():
    """A loopback OpenAI-compatible server answering with :func:`sandbox_reply`; stopped after the test."""
    from pipeline.llm.testing import FakeOpenAIServer

    with FakeOpenAIServer(delay=0.005, reply=sandbox_reply) as server:
        yield server


@dataclass
class Call:
    """One call a :class:`RecordingBackend` answered."""

    kind: str  # draft | revision | neighbour | reason | observer
    start: float
    end: float
    prompt: str  # the turns after the system message
    output: str


class RecordingBackend(ChatBackend):
    """A scripted backend answering after ``delay`` (plus up to ``jitter``) with text derived from the
    prompt; logs every call as a :class:`Call`. ``fail``: neighbour ratings of that question raise
    ``LLMError``; ``budget``: calls allowed before ``BudgetExceeded``."""

    model_name = "recording"

    def __init__(self, delay: float = 0.05, jitter: float = 0.0, fail: str | None = None, seed: int = 0):
        self.delay, self.jitter, self.fail = delay, jitter, fail
        self.random = random.Random(seed)
        self.calls: list[Call] = []
        self.budget: int | None = None

    @staticmethod
    def kind(messages: list) -> str:
        if messages[0]["content"].startswith("You are an impartial observer"):
            return "observer"
        if "Rate another member's answer." in messages[-1]["content"]:
            return "neighbour"
        if messages[-1]["content"].startswith("Another member was asked:"):
            return "reason"
        acknowledged = any(m == {"role": "assistant", "content": REVISION_ACKNOWLEDGEMENT} for m in messages)
        return "revision" if acknowledged else "draft"

    async def _call(self, messages: list, sample_index: int) -> Call:
        conversation = "\n\n".join(m["content"] for m in messages[1:])  # every turn after the system's
        call = Call(self.kind(messages), time.monotonic(), 0.0, conversation, "")
        if self.budget is not None:
            self.budget -= 1
            if self.budget < 0:
                raise BudgetExceeded("call budget spent")
        await asyncio.sleep(self.delay + self.random.random() * self.jitter)
        call.end = time.monotonic()
        digest = hashlib.sha256(repr(messages).encode()).hexdigest()
        call.output = f"{call.kind} {sample_index} {digest[:8]}"
        self.calls.append(call)
        if call.kind == "neighbour" and self.fail and f"Question: {self.fail}\nAnswer:" in call.prompt:
            raise LLMError("server said no")
        return call

    async def complete(self, messages, *, sample_index=0, **params):
        call = await self._call(messages, sample_index)
        return Completion(call.output, self.model_name, Usage(7, 3, 1))

    async def rate(self, messages, *, scale=7, sample_index=0, **params):
        call = await self._call(messages, sample_index)
        score = int(call.output.split()[-1], 16) % 8  # 0: an unreadable answer
        return Rating(
            float(score) if score else None,
            f"reason {call.output}",
            f"Rating: {score}",
            "parsed",
            self.model_name,
            usage=Usage(5, 2, 1),
        )


@pytest.fixture
def recording_backend():
    """Make :class:`RecordingBackend` instances (keyword arguments as its constructor's)."""
    return RecordingBackend


# -- interaction records written as real Arrow shards (transform, convert, hub tests) ----------


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the loaded shards and map caches of a test in its own folder, not in ~/.cache."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def make_record(i: int, **overrides: Any) -> dict[str, Any]:
    """A complete ``ok`` record: question ``q<i>``, draft scored 3 before, revision 6 after, stored
    quality flags all clean (``quality_flags=None``: none stored)."""
    record = new_record(
        run_id="run-a",
        world_id="w0",
        round=0,
        agent_id=i,
        stance="good",
        question=f"q{i}",
        draft=f"draft {i}",
        feedback=[
            {"agent_id": 1, "rating": 5.0, "reason": f"fair {i}", "raw": "Rating: 5 ### Reason: fair"},
            {"agent_id": 2, "rating": 2.0, "reason": f"harsh {i}", "raw": "Rating: 2 ### Reason: harsh"},
        ],
        revision=f"revision {i}",
        scores={
            "alignment_before": 3.0,
            "alignment_after": 6.0,
            "engagement_before": 4.0,
            "engagement_after": 5.0,
        },
        observer_reasons=dict.fromkeys(SCORE_FIELDS, "ok"),
        agent_model="agent-lm",
        observer_model="observer-lm",
        prompt_version="v1",
        prompt_tokens=10,
        completion_tokens=20,
        calls=10,
    )
    record |= overrides
    # Stored as the simulation stores them; the transform uses stored flags as they are, so these
    # short made-up texts count as clean (tests of the filters store or compute real flags).
    if "quality_flags" not in overrides:
        record["quality_flags"] = {"draft": [], "revision": [], "feedback": [[] for _ in record["feedback"]]}
    return record


def write_shard(path: Path, records: list[dict[str, Any]], features: Features = RECORD_FEATURES) -> Path:
    """Write ``records`` with datasets' ArrowWriter, as ``sandbox simulate`` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(path=str(path), features=features) as writer:
        for record in records:
            writer.write(features.encode_example(record))
        writer.finalize()
    return path


def golden_records() -> list[dict[str, Any]]:
    scores = make_record(0)["scores"]
    return [
        make_record(0),
        # same question and same draft as record 0: merged into its imitation/self-critic groups
        make_record(
            1, question="q0", draft="draft 0", revision="revision 0", scores=scores | {"alignment_after": 7.0}
        ),
        make_record(2, status="failed", error="timeout"),
        # a null neighbour rating, an off-scale one (the reference's sentinel 8) and a NaN observer score
        make_record(
            3,
            feedback=[
                {"agent_id": 1, "rating": None, "reason": "unreadable", "raw": "??"},
                {"agent_id": 2, "rating": 8.0, "reason": "sentinel", "raw": "8"},
                {"agent_id": 4, "rating": 6.0, "reason": "", "raw": "Rating: 6"},
            ],
            scores=scores | {"alignment_before": math.nan},
        ),
        # realignment thresholds: no rise, and a rise that ends at the midpoint (4 is not above 4)
        make_record(4, scores=scores | {"alignment_before": 6.0, "alignment_after": 6.0}),
        make_record(5, scores=scores | {"alignment_before": 2.0, "alignment_after": 4.0}),
        make_record(6, scores=scores | {"alignment_after": None}),
    ]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    write_shard(folder / "world-0" / "shard-00000.arrow", golden_records()[:4])
    write_shard(folder / "world-1" / "shard-00000.arrow", golden_records()[4:])
    # what the simulator may leave around: a shard being written and a hidden file, both ignored
    write_shard(folder / "world-1" / ".shard-00001.arrow", [make_record(99)])
    (folder / "world-1" / "shard-00001.arrow.tmp").write_bytes(b"partial")
    (folder / "config.yaml").write_text(
        "world:\n  size: 3\nbackend:\n  model: agent-lm\n  api_key: sk-secret\n"
    )
    return folder


def calls_per_interaction(k: int = 2) -> int:
    """Model calls of one interaction: draft and revision, two observer aspects before and after, and
    each of ``k`` neighbours' rating and reason."""
    return 2 + 2 * 2 + 2 * k


def run_records(output: Path, features: Features | None = None) -> list[dict[str, Any]]:
    """A run's records as the README loads them: every shard of every world, one dataset."""
    from datasets import load_dataset

    files = sorted(str(p) for p in output.glob("world-*/*.arrow"))
    dataset = load_dataset("arrow", data_files=files, split="train")
    if features is not None:
        assert dataset.features == features
    return sorted(dataset.to_list(), key=lambda r: (r["world_id"], r["round"], r["agent_id"]))
