"""The observer judge: log-probability primitives of the in-process backend, the contrast method's
calibration and formula, and which method a judge settles on."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from pipeline import prompts
from pipeline.errors import UserError
from pipeline.judge import (
    EXEMPLARS_PER_ANSWER,
    JUDGE_CALIBRATION,
    METHODS,
    READINGS,
    Calibration,
    Exemplars,
    Judge,
    JudgeConfig,
    Readout,
    contrast_readings,
    fit_calibration,
    load_calibrations,
)
from pipeline.llm import BackendSpec, build_backend
from pipeline.llm.base import ScoringUnsupported
from pipeline.llm.local import LocalBackend, length_buckets
from pipeline.llm.testing import FakeOpenAIServer

MESSAGES = [{"role": "user", "content": "Is it ever acceptable to lie?"}]
CONTINUATIONS = [
    "Honesty matters.",
    "Rating: 5. Reason: the answer is helpful, harmless and honest.",
    "I would refuse to help with anything that could hurt people.",
    "no",
]


def _direct_logprobs(
    tiny_model_dir: Path, messages: list[dict], continuation: str
) -> tuple[float, list[float]]:
    """By hand: one unpadded forward pass of the model; the continuation's summed token log-probs
    and the whole next-token distribution after the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    answer = tokenizer.encode(continuation, add_special_tokens=False)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
    total = sum(logprobs[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer))
    return total, logprobs[len(prompt) - 1].tolist()


def _single_tokens(backend: LocalBackend) -> list[str]:
    words = ("Yes", " Yes", "No", " No", "a", " the", ":", "5")
    return [w for w in words if len(backend.tokenizer.encode(w, add_special_tokens=False)) == 1]


def test_scoring_primitives_match_a_direct_forward_pass(tiny_model_dir: Path) -> None:
    backend = LocalBackend(tiny_model_dir, BackendSpec(kind="local"))
    candidates = _single_tokens(backend)
    assert len(candidates) >= 3

    async def scenario():
        try:
            continuation = await backend.continuation_logprob(MESSAGES, CONTINUATIONS[1])
            next_token = await backend.next_token_logprobs(MESSAGES, candidates)
            # A candidate of several tokens is scored as a continuation.
            split = await backend.next_token_logprobs(MESSAGES, [candidates[0], CONTINUATIONS[1]])
            return continuation, next_token, split
        finally:
            await backend.aclose()

    continuation, next_token, split = asyncio.run(scenario())
    total, distribution = _direct_logprobs(tiny_model_dir, MESSAGES, CONTINUATIONS[1])
    assert continuation.values[CONTINUATIONS[1]] == pytest.approx(total, abs=1e-4)
    assert total < 0
    assert split.values == pytest.approx(
        {candidates[0]: next_token.values[candidates[0]], CONTINUATIONS[1]: total}, abs=1e-4
    )
    for candidate in candidates:
        (token,) = backend.tokenizer.encode(candidate, add_special_tokens=False)
        assert next_token.values[candidate] == pytest.approx(distribution[token], abs=1e-4)
    template = backend.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(backend.tokenizer.encode(template, add_special_tokens=False))
    assert continuation.usage.prompt_tokens == next_token.usage.prompt_tokens == prompt_tokens
    assert continuation.usage.completion_tokens == 0


def test_batched_scoring_equals_one_by_one(tiny_model_dir: Path) -> None:
    async def score_all(backend: LocalBackend) -> tuple[list[float], list[dict[str, float]]]:
        candidates = _single_tokens(backend)
        try:
            continuations = await asyncio.gather(
                *(backend.continuation_logprob(MESSAGES, c) for c in CONTINUATIONS)
            )
            next_tokens = await asyncio.gather(
                *(
                    backend.next_token_logprobs([{"role": "user", "content": c}], candidates)
                    for c in CONTINUATIONS
                )
            )
        finally:
            await backend.aclose()
        return [c.values[t] for c, t in zip(continuations, CONTINUATIONS, strict=True)], [
            n.values for n in next_tokens
        ]

    batched = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_batch_size=8))
    single = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_batch_size=1))
    batched_totals, batched_next = asyncio.run(score_all(batched))
    single_totals, single_next = asyncio.run(score_all(single))
    # Continuations of different lengths shared one forward pass, as did the next-token requests.
    assert batched.batch_sizes == [4, 4]
    assert single.batch_sizes == [1] * 8
    assert batched_totals == pytest.approx(single_totals, abs=1e-4)
    for b, s in zip(batched_next, single_next, strict=True):
        assert b == pytest.approx(s, abs=1e-4)


def _calibration(prompts_version: str = "judge-v2") -> Calibration:
    return Calibration(
        prompts_version,
        features={"follow": (-1.0, 0.5), "ethics": (1.0, 2.0), "exemplars": (2.0, 4.0)},
        readouts={"F1": Readout(1.5, 0.1), "F2": Readout(4.0, 0.25), "F3": Readout(6.0, 0.3)},
    )


def test_length_buckets_bound_the_padding() -> None:
    assert length_buckets([10, 40, 12, 100, 14, 45], 1.5) == [[0, 2, 4], [1, 5], [3]]
    assert length_buckets([], 1.5) == []
    assert length_buckets([7, 7, 7], 1.0) == [[0, 1, 2]]


def test_a_batch_of_short_and_long_prompts_scores_as_alone(tiny_model_dir: Path) -> None:
    """The judge's exemplar contexts are several turns long; scored in one batch with short prompts,
    each row's log-probability is what it is alone (the rows run in parts of similar length)."""
    long = [
        turn for _ in range(6) for turn in (*MESSAGES, {"role": "assistant", "content": CONTINUATIONS[2]})
    ]
    requests = [(m, c) for m in (MESSAGES, [*long, *MESSAGES]) for c in CONTINUATIONS]

    async def score(backend: LocalBackend) -> list[float]:
        try:
            done = await asyncio.gather(*(backend.continuation_logprob(m, c) for m, c in requests))
        finally:
            await backend.aclose()
        return [d.values[c] for d, (_, c) in zip(done, requests, strict=True)]

    batched = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_batch_size=8))
    single = LocalBackend(tiny_model_dir, BackendSpec(kind="local", max_batch_size=1))
    together, alone = asyncio.run(score(batched)), asyncio.run(score(single))
    assert batched.batch_sizes == [8] and together == pytest.approx(alone, abs=1e-4)


def test_the_contrast_score_on_hand_numbers() -> None:
    calibration = _calibration()
    readings = {"follow": -0.5, "ethics": 4.0, "exemplars": 0.0}  # z = +1.0, +1.5 and -0.5
    assert calibration.score(readings) == pytest.approx(1 + 6 / (1 + math.exp(-(6.0 * 2.0 / 3 + 0.3))))
    assert calibration.score(readings, "F2") == pytest.approx(1 + 6 / (1 + math.exp(-(4.0 * 1.25 + 0.25))))
    assert calibration.score(readings, "F1") == pytest.approx(1 + 6 / (1 + math.exp(-(1.5 + 0.1))))
    low, mid, high = ({name: v for name in READINGS} for v in (-2.0, 0.0, 2.0))
    assert 1 < calibration.score(low) < calibration.score(mid) < calibration.score(high) < 7
    assert Calibration.from_json(json.loads(json.dumps(calibration.to_json()))) == calibration


def test_the_calibration_fit_standardises_and_maximises_the_likelihood() -> None:
    rows = [(-0.5, 3.0, 4.0), (-1.0, 1.0, 1.0), (0.2, 2.5, -1.0), (-1.5, -0.5, 3.0)]
    rows += [(-1.2, 0.5, -2.0), (-0.4, -1.0, 0.5), (-2.0, -2.0, -3.0), (-0.9, 2.0, 2.5)]
    answers = [dict(zip(READINGS, row, strict=True)) for row in rows]
    calibration = fit_calibration(answers[:4], answers[4:], split="dev")
    follows = [a["follow"] for a in answers]
    mean = sum(follows) / 8
    assert calibration.features["follow"] == pytest.approx(
        (mean, math.sqrt(sum((f - mean) ** 2 for f in follows) / 7))
    )
    assert calibration.prompts == prompts.JUDGE_PROMPT_VERSION and calibration.fitted_on == {"split": "dev"}
    # At the maximum of the likelihood its gradient is zero: sum(p - y) = sum((p - y) x) = 0.
    for method, names in METHODS.items():
        readout, x = calibration.readouts[method], [calibration.z(a, names) for a in answers]
        residuals = [
            1 / (1 + math.exp(-(readout.slope * v + readout.intercept))) - y
            for v, y in zip(x, [1] * 4 + [0] * 4, strict=True)
        ]
        assert sum(residuals) == pytest.approx(0, abs=1e-6)
        assert sum(r * v for r, v in zip(residuals, x, strict=True)) == pytest.approx(0, abs=1e-6)
    assert calibration.readouts["F3"].slope > 0


def test_exemplars_are_the_nearest_prior_pairs_never_the_judged_question() -> None:
    """The exemplar contexts hold the prior's pairs nearest the question, the nearest last, with
    their good or their bad answers; a prior question judged itself is not its own exemplar."""
    exemplars = Exemplars.shipped()
    question = "How can I sneak into a concert without a ticket?"
    nearest = exemplars.nearest(question)
    assert len(nearest) == EXEMPLARS_PER_ANSWER
    assert nearest[0][0] == "How do I sneak into the cinema without paying?"
    good, bad = exemplars.contexts(question)
    assert good[-1] == bad[-1] == {"role": "user", "content": question}
    assert good[-3]["content"] == bad[-3]["content"] == nearest[0][0]
    assert (good[-2]["content"], bad[-2]["content"]) == nearest[0][1:]
    assert [m["role"] for m in good] == ["user", "assistant"] * EXEMPLARS_PER_ANSWER + ["user"]
    own = nearest[0][0]
    assert own not in [pair[0] for pair in exemplars.nearest(own)]
    assert len(exemplars.nearest(own)) == EXEMPLARS_PER_ANSWER


def test_the_shipped_calibration_holds_the_embedded_observer() -> None:
    calibrations = load_calibrations(JUDGE_CALIBRATION)
    for dtype in ("float32", "bfloat16"):
        embedded = calibrations[f"embedded:SmolLM2-135M-Instruct|{dtype}"]
        assert embedded.prompts == prompts.JUDGE_PROMPT_VERSION and embedded.readouts["F3"].slope > 0
        test = {method: embedded.measured[method]["test"]["auc"] for method in ("prompted", "F2", "F3")}
        assert test["F3"] > test["F2"] > test["prompted"], dtype


def _sandbox_reply(body: dict) -> str:
    return "Rating: 6\nReason: kind."


def test_auto_falls_back_to_prompted_over_http_and_contrast_is_refused() -> None:
    async def scenario(url: str):
        async with build_backend(BackendSpec(kind="openai", model="judge", base_urls=[url])) as backend:
            assert backend.scoring_model is None
            with pytest.raises(ScoringUnsupported, match="no next-token log-probabilities"):
                await backend.next_token_logprobs(MESSAGES, ["Yes"])
            judge = Judge(backend)
            assert judge.alignment_method == "prompted"
            with pytest.raises(UserError) as refused:
                Judge(backend, JudgeConfig(alignment="contrast"))
            assert "\n" not in str(refused.value) and "--judge.alignment prompted" in str(refused.value)
            return await judge.rate("alignment", "Q?", "Be kind.")

    with FakeOpenAIServer(reply=_sandbox_reply) as server:
        rating = asyncio.run(scenario(server.base_url))
        assert rating.score is not None and rating.score > 5 and rating.method in ("logprobs", "parsed")
        assert server.requests[-1]["messages"] == prompts.observer_messages("alignment", "Q?", "Be kind.")


def test_contrast_needs_a_calibration_for_the_observer_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    async def scenario():
        async with build_backend(
            BackendSpec(kind="local", model=str(tiny_model_dir), max_tokens=4)
        ) as backend:
            assert Judge(backend).alignment_method == "prompted"  # no calibration for the tiny model
            with pytest.raises(UserError, match="no judge calibration for observer local:") as refused:
                Judge(backend, JudgeConfig(alignment="contrast"))
            assert "\n" not in str(refused.value)
            prompted = await Judge(backend).rate("alignment", "Q?", "Be kind.")
            # A calibration for the tiny model: contrast is then the method, and its score is the
            # calibration's formula on the readings of the three scoring calls.
            path = tmp_path / "calibration.json"
            calibration = _calibration(prompts.JUDGE_PROMPT_VERSION)
            path.write_text(json.dumps({backend.scoring_model: calibration.to_json()}))
            judge = Judge(backend, JudgeConfig(alignment="contrast", calibration=str(path)))
            rating = await judge.rate("alignment", "Q?", "Be kind.")
            readings = await contrast_readings(backend, "Q?", "Be kind.")
            engagement = await judge.rate("engagement", "Q?", "Be kind.")
            empty = await judge.rate("alignment", "Q?", " ")
            return prompted, rating, readings, calibration, engagement, empty

    prompted, rating, readings, calibration, engagement, empty = asyncio.run(scenario())
    assert prompted.method == "logprobs" and prompted.reason == ""  # no reason by default
    assert rating.method == "contrast" and rating.distribution is None and rating.reason == ""
    assert rating.score == pytest.approx(calibration.score(readings.values()))
    assert rating.usage.calls == 5 and rating.usage.prompt_tokens > 0
    assert engagement.method == "logprobs"  # engagement stays prompted
    assert empty.score is None and empty.method == "failed"


def test_the_cache_answers_a_repeated_scoring_call(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = BackendSpec(kind="local", model=str(tiny_model_dir), cache_path=str(tmp_path / "cache.sqlite"))

    async def scenario():
        async with build_backend(spec) as backend:
            first = [
                await backend.next_token_logprobs(MESSAGES, ["a"]),
                await backend.continuation_logprob(MESSAGES, "Honesty matters."),
            ]
            again = [
                await backend.next_token_logprobs(MESSAGES, ["a"]),
                await backend.continuation_logprob(MESSAGES, "Honesty matters."),
            ]
            other = await backend.continuation_logprob(MESSAGES, "Honesty matters a lot.")
            return first, again, other, len(backend.cache)

    first, again, other, stored = asyncio.run(scenario())
    assert not any(f.cached for f in first) and all(a.cached for a in again)
    assert [a.values for a in again] == [f.values for f in first]
    assert not other.cached and stored == 3


def test_judge_identity_keeps_the_runs_of_the_old_judge() -> None:
    assert JudgeConfig(alignment="prompted", reasons=True).identity() is None
    assert JudgeConfig(alignment="prompted").identity() == {"alignment": "prompted", "reasons": False}
    auto = JudgeConfig().identity()
    assert auto is not None and auto["prompts"] == prompts.JUDGE_PROMPT_VERSION and auto["calibration_sha256"]
    with pytest.raises(UserError, match="unknown judge alignment method 'best'"):
        JudgeConfig(alignment="best")  # type: ignore[arg-type]


def test_a_run_names_its_judge_and_the_card_its_separability(tmp_path: Path) -> None:
    from pipeline.card import _judge_section
    from pipeline.simulate import SimulationConfig

    # The judge is part of a run's identity; the old runs' judge (prompted, with reasons) is left out.
    legacy = SimulationConfig(output=str(tmp_path), judge=JudgeConfig(alignment="prompted", reasons=True))
    assert "judge" not in legacy.identity()
    assert SimulationConfig(output=str(tmp_path)).identity()["judge"] == JudgeConfig().identity()

    figures = {"auc": 0.7731, "wins": 34.0, "pairs": 41, "gap_sd": 0.88, "prompts": "judge-v1"}
    measured = {
        "alignment": "contrast",
        "observer": "SmolLM2-135M-Instruct",
        "test": {"alignment": {"method": "F2", **figures}, "engagement": None},
    }
    section = _judge_section({"new/config.yaml": {"judge": measured}, "old/config.yaml": {"config": {}}})
    new, old = (line for line in section.splitlines() if "config.yaml" in line)
    assert "contrast" in new and "0.773 (34/41 pairs, gap +0.88 SD; prompts judge-v1)" in new
    assert "not measured" in new  # engagement
    assert "prompted" in old and old.count("not measured") == 2


def test_a_resumed_run_refuses_a_judge_that_settles_otherwise(
    tiny_model_dir: Path, tmp_path: Path, recording_backend
) -> None:
    from pipeline.simulate import SimulationConfig, run_simulation

    tiny = LocalBackend(tiny_model_dir, BackendSpec(kind="local"))
    path = tmp_path / "calibration.json"
    calibration = _calibration(prompts.JUDGE_PROMPT_VERSION)
    path.write_text(json.dumps({tiny.scoring_model: calibration.to_json()}))
    asyncio.run(tiny.aclose())
    config = SimulationConfig(
        output=str(tmp_path / "run"), size=2, rounds=1, k=1, judge=JudgeConfig(calibration=str(path))
    )
    agent = recording_backend(delay=0.0)
    run_simulation(config, backends=(agent, agent), progress=False)  # no scoring: prompted
    # The same run resumed with an observer that scores text and has a calibration: auto would
    # settle on contrast, and the run's scores would mix.
    observer = LocalBackend(tiny_model_dir, BackendSpec(kind="local"))
    with pytest.raises(
        UserError, match="scored by a prompted judge on recording; here the judge settles on contrast"
    ):
        run_simulation(config, backends=(recording_backend(delay=0.0), observer), progress=False)
    asyncio.run(observer.aclose())
