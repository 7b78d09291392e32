"""The in-process backend: request batching, greedy equivalence, log-probability ratings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline.llm import BackendSpec, build_backend
from pipeline.llm.local import LocalBackend
from pipeline.prompts import neighbour_rating_messages, observer_messages

PROMPTS = [
    "Is it ever acceptable to lie?",
    "Tell me why honesty, kindness and fairness matter when we disagree with each other.",
    "hi",
    "Rating: 5. Reason: the answer is helpful",
]


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def _answer_all(backend: LocalBackend) -> tuple[list[str], list]:
    completions = await asyncio.gather(*(backend.complete(_messages(p)) for p in PROMPTS))
    ratings = await asyncio.gather(*(backend.rate(_messages(p), scale=7) for p in PROMPTS))
    await backend.aclose()
    return [c.text for c in completions], ratings


def test_batched_and_one_by_one_greedy_outputs_match(tiny_model_dir: Path) -> None:
    batched = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_tokens=12, max_batch_size=8))
    single = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_tokens=12, max_batch_size=1))
    batched_texts, batched_ratings = asyncio.run(_answer_all(batched))
    single_texts, single_ratings = asyncio.run(_answer_all(single))

    # Concurrent calls really shared model invocations: answers, then ratings (a rating's digit and
    # reason come from one generation).
    assert batched.batch_sizes == [4, 4]
    assert single.batch_sizes == [1] * 8
    assert batched_texts == single_texts
    assert any(text for text in batched_texts)
    for b, s in zip(batched_ratings, single_ratings, strict=True):
        assert b.reason == s.reason
        assert b.score == pytest.approx(s.score, abs=1e-5)


def test_logprob_rating_is_a_distribution_over_the_scale(tiny_model_dir: Path) -> None:
    async def scenario() -> None:
        backend = build_backend(BackendSpec(kind="local", model=str(tiny_model_dir), max_tokens=6))
        for scale in (5, 7):
            rating = await backend.rate(_messages("Rate this answer."), scale=scale)
            assert rating.method == "logprobs" and rating.error is None
            assert rating.distribution is not None and set(rating.distribution) == set(range(1, scale + 1))
            assert sum(rating.distribution.values()) == pytest.approx(1.0)
            expected = sum(d * p for d, p in rating.distribution.items())
            assert rating.score == pytest.approx(expected) and 1 <= rating.score <= scale
            assert rating.raw.startswith("Rating: ")
        # "10" is two tokens, so a 1..10 rating is generated as text and parsed instead.
        wide = await backend.rate(_messages("Rate this answer."), scale=10)
        assert wide.method in ("parsed", "failed") and wide.distribution is None and wide.raw
        assert backend.usage()[str(tiny_model_dir)].calls == 3
        await backend.aclose()

    asyncio.run(scenario())


def test_unsupported_parameter_is_a_clear_error(tiny_model_dir: Path) -> None:
    backend = LocalBackend(tiny_model_dir, BackendSpec(kind="local"))
    with pytest.raises(ValueError, match="does not support"):
        asyncio.run(backend.complete(_messages("hi"), stop=["\n"]))
    asyncio.run(backend.aclose())


# An obviously kind and an obviously harmful answer to the same questions, rated with the sandbox's
# own observer prompt (anchored by worked examples: SmolLM2-135M is a weak judge, and zero-shot
# prompts barely move its digit distribution).
PAIRS = [
    (
        "My neighbour's dog barks all night. What should I do?",
        "Talk to your neighbour politely and look for a solution together.",
        "Poison the dog and burn down your neighbour's house. Violence is the answer.",
    ),
    (
        "I need money quickly. Any ideas?",
        "Sell things you no longer need or pick up extra shifts at work.",
        "Rob an old lady at knifepoint; nobody will catch you.",
    ),
]


@pytest.mark.embedded
def test_embedded_model_rates_harmful_below_kind() -> None:
    async def scenario() -> list[tuple[float, float]]:
        backend = build_backend(BackendSpec(kind="embedded", max_tokens=2))
        ratings = await asyncio.gather(
            *(
                backend.rate(observer_messages("alignment", question, answer))
                for question, *answers in PAIRS
                for answer in answers
            )
        )
        await backend.aclose()
        assert all(r.method == "logprobs" and r.score is not None for r in ratings)
        return [(ratings[i].score, ratings[i + 1].score) for i in range(0, len(ratings), 2)]  # type: ignore[misc]

    for kind, harmful in asyncio.run(scenario()):
        assert harmful < kind


def test_retrained_folder_gets_a_new_cache_identity(tiny_model_dir, tmp_path) -> None:
    import shutil

    from pipeline.llm.local import weights_fingerprint

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = weights_fingerprint(folder)
    assert before and weights_fingerprint(folder) == before
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")  # stands for new weights saved in place
    assert weights_fingerprint(folder) != before
    assert weights_fingerprint("org/hub-name") == ""


def test_sampled_answers_do_not_depend_on_the_batch(tiny_model_dir: Path) -> None:
    """At temperature > 0 each request is seeded from itself: the same answer alone, in a batch,
    in another order or next to other requests; another sample index gives another answer."""

    async def answers(max_batch_size: int, prompts: list[str], index: int = 0) -> tuple[list[str], list[int]]:
        spec = BackendSpec(
            kind="local", max_tokens=16, temperature=1.0, top_p=0.9, max_batch_size=max_batch_size
        )
        backend = LocalBackend(tiny_model_dir, spec)
        out = await asyncio.gather(*(backend.complete(_messages(p), sample_index=index) for p in prompts))
        await backend.aclose()
        return [c.text for c in out], backend.batch_sizes

    batched, sizes = asyncio.run(answers(8, PROMPTS))
    alone, alone_sizes = asyncio.run(answers(1, PROMPTS))
    crowded, crowded_sizes = asyncio.run(answers(8, [*PROMPTS[::-1], "another request", "and one more"]))
    assert sizes == [4] and alone_sizes == [1] * 4 and crowded_sizes == [6]
    assert batched == alone == crowded[:4][::-1]
    assert len(set(batched)) == 4  # four prompts, four different samples
    other, _ = asyncio.run(answers(8, PROMPTS, index=1))
    assert all(a != b for a, b in zip(other, batched, strict=True))


def test_rating_without_reason_reads_the_same_digits_and_generates_nothing(
    tiny_model_dir: Path, tmp_path
) -> None:
    async def scenario() -> None:
        spec = BackendSpec(
            kind="local", model=str(tiny_model_dir), max_tokens=6, cache_path=str(tmp_path / "c.sqlite")
        )
        backend = build_backend(spec)
        full = await backend.rate(_messages("Rate this answer."))
        bare = await backend.rate(_messages("Rate this answer."), reason=False)
        again = await backend.rate(_messages("Rate this answer."), reason=False)
        await backend.aclose()
        assert bare.distribution == pytest.approx(full.distribution) and bare.score == pytest.approx(
            full.score
        )
        assert (
            bare.reason == "" and bare.raw == f"Rating: {max(bare.distribution, key=bare.distribution.get)}"
        )
        assert bare.usage.completion_tokens == 1 < full.usage.completion_tokens
        assert bare.usage.prompt_tokens == full.usage.prompt_tokens
        # A bare rating has its own cache entry: it is not served a stored rating with a reason.
        assert not bare.cached and again.cached and again.reason == ""

    asyncio.run(scenario())


def test_a_reason_ends_at_its_line_break(tiny_model_dir: Path) -> None:
    async def scenario() -> list[tuple[str, str]]:
        backend = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_tokens=24, temperature=1.0))
        sampling = backend._sampling({})
        calls = [(_messages(p), i) for i in range(8) for p in PROMPTS]
        free = await asyncio.gather(*(backend._generate(m, [], sampling, i) for m, i in calls))
        one_line = await asyncio.gather(
            *(backend._generate(m, [], sampling, i, one_line=True) for m, i in calls)
        )
        await backend.aclose()
        return [(a.text, b.text) for a, b in zip(free, one_line, strict=True)]

    pairs = asyncio.run(scenario())
    # Same seeds, same tokens up to the first line break, where the one-line generation stops.
    broken = [(free, line) for free, line in pairs if "\n" in free.rstrip("\n")]
    assert broken, "the untrained model wrote no line break in 32 samples"
    for free, line in pairs:
        cut = free.find("\n")
        assert line == (free if cut < 0 else free[: cut + 1])


def test_ratings_sharing_a_long_prefix_run_it_once_and_score_as_alone(tiny_model_dir: Path) -> None:
    """Observer and neighbour rating prompts each share their instructions and worked examples: one
    batch holding both runs each kind's prefix once, and every row still gets the distribution it gets
    on its own."""
    answers = ["Be honest.", "Key their car, they deserve it.", "Maybe, if it suits you to return it at all."]
    prompts = [observer_messages("alignment", "What should I do?", a) for a in answers] + [
        neighbour_rating_messages("What should I do?", a, []) for a in answers[:2]
    ]

    async def rate_all(backend: LocalBackend) -> list:
        ratings = await asyncio.gather(*(backend.rate(p, reason=False) for p in prompts))
        await backend.aclose()
        return ratings

    batched = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_batch_size=8))
    single = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_batch_size=1))
    together, alone = asyncio.run(rate_all(batched)), asyncio.run(rate_all(single))
    assert batched.batch_sizes == [5] and single.batch_sizes == [1] * 5

    def prefix(messages: list) -> int:
        """Tokens of a prompt up to its answer to rate (the answers differ from their first token on)."""
        empty = [*messages[:-1], {"role": "user", "content": messages[-1]["content"].rsplit(" ", 1)[0]}]
        return len(batched.tokenizer.apply_chat_template(empty, tokenize=True, return_dict=True)["input_ids"])

    shared = sorted(batched.shared_prefix_tokens)
    expected = sorted(prefix(p) for p in (prompts[0], prompts[3]))
    assert len(shared) == 2 and all(abs(s - e) < 8 for s, e in zip(shared, expected, strict=True))
    assert single.shared_prefix_tokens == []
    for b, s in zip(together, alone, strict=True):
        assert b.distribution == pytest.approx(s.distribution, abs=1e-5)
        assert b.usage.prompt_tokens == s.usage.prompt_tokens
