"""Learning you can see: preference accuracy of a causal LM, and paired differences of observer scores.

**Preference accuracy** is the share of good/bad answer pairs where the model gives the good answer
the lower mean token negative log-likelihood (NLL) given the question; a tie counts 1/2. The NLL is
exactly the one the trainer optimises (:func:`trainers.trainer.tokenize_group`, the trainer's
collator and its fused LM head): the question is one user turn put through the model's chat
template with the generation prompt (what a model answering a question sees: ``sandbox evaluate``
and the imitation groups ask it the same way), the answer is the assistant turn that follows, and
its tokens are everything the chat template adds after the prompt (the answer, the end-of-turn
token and whatever else the template writes after it). The NLL is averaged over those tokens.

Three sets of pairs: the labelled pairs shipped for the judge (:mod:`pipeline.separability`, one
aspect and one half); comparison groups of a ``sandbox transform`` output built from held-out
questions, where a group's best-scored and worst-scored answers make the pair; and one model's
sampled answers to held-out questions (``sandbox evaluate --samples``), the best- and worst-scored
answer to a question making the pair. The last two are judge-labelled, so a style the judge likes
can win there; groups whose answers all score the same are left out.

**Intervals.** The accuracy's 95% interval is the Wilson score interval: with ``p`` the share of
``n`` pairs and ``z`` the normal quantile, the centre is ``(p + z²/2n) / (1 + z²/n)`` and the
half-width ``z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)``; unlike ``p ± z*sqrt(p(1-p)/n)`` it stays
within [0, 1] and does not collapse to a point at 0 or 1. The **paired difference** of two models'
observer scores over the same questions is the mean of the per-question differences with a 95%
Student t interval (``mean ± t(0.975, n-1) * sd / sqrt(n)``). The t quantile is exact for integer
degrees of freedom: the two-sided mass P(|T| <= t) has a closed form (Abramowitz & Stegun
26.7.3 and 26.7.4), inverted by bisection; no SciPy needed.

**Preference margin.** A pair's margin is the bad answer's mean token NLL minus the good answer's
(nats a token; above 0: the good answer is the more likely). Accuracy counts only its sign, so a
model can move every pair's margin and no pair across 0; the mean margin, and two models'
paired margin difference over the same pairs (a Student t interval, as above), show such a shift.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.hub import load_output
from pipeline.llm.base import Message
from pipeline.precision import usable_dtype
from pipeline.separability import JUDGE_PAIRS, Split, load_judge_pairs
from trainers._trl import add_fused_lm_head
from trainers.collator import DataCollatorForComparisonGroups
from trainers.trainer import tokenize_group

CONFIDENCE = 0.95
HELDOUT_KIND = "imitation"
"""The kind of comparison group whose prompt is the question itself (SPEC section 3)."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate over ``n`` items with its 95% interval (``None`` where there is too little data)."""

    value: float | None
    low: float | None
    high: float | None
    n: int


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (chat messages ending with the user's question) and a good and a bad answer to it."""

    prompt: list[Message]
    good: str
    bad: str


# --------------------------------------------------------------------------------------- intervals


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (see the module docstring)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a proportion needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    cos2, series, term = math.cos(theta) ** 2, 0.0, 1.0
    if df % 2:  # odd: 2/pi * (theta + sin cos * sum of (2*4...2k)/(3*5...(2k+1)) cos^2k, k < (df-1)/2)
        for k in range((df - 1) // 2):
            series += term
            term *= cos2 * (2 * k + 2) / (2 * k + 3)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    for k in range(df // 2):  # even: sin * sum of (1*3...(2k-1))/(2*4...2k) cos^2k, k < df/2
        series += term
        term *= cos2 * (2 * k + 1) / (2 * k + 2)
    return math.sin(theta) * series


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``1/2 < p < 1``) of Student's t with ``df >= 1`` degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 1/2 < p < 1 and df >= 1, got p={p}, df={df}")
    mass = 2 * p - 1
    low, high = 0.0, 1.0
    while _t_central_mass(high, df) < mass:
        high *= 2
    for _ in range(200):  # the mass is increasing in t; bisect to float precision
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if _t_central_mass(middle, df) < mass else (low, middle)
    return (low + high) / 2


def is_read(score: float | None) -> bool:
    """Whether a score was read: neither missing (``None``) nor NaN."""
    return score is not None and not math.isnan(score)


def paired_difference(baseline: Sequence[float | None], other: Sequence[float | None]) -> Estimate:
    """Mean of ``other[i] - baseline[i]`` over the items where both are read, with a 95% t interval."""
    diffs = [o - b for b, o in zip(baseline, other, strict=True) if is_read(b) and is_read(o)]
    if not diffs:
        return Estimate(None, None, None, 0)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Estimate(mean, None, None, 1)
    half = t_quantile((1 + CONFIDENCE) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Estimate(mean, mean - half, mean + half, len(diffs))


def nll_margins(nlls: Sequence[tuple[float, float]]) -> list[float]:
    """Each pair's preference margin: the bad answer's mean token NLL minus the good answer's."""
    return [bad - good for good, bad in nlls]


def preference_from_nlls(good: Sequence[float], bad: Sequence[float]) -> Estimate:
    """The share of pairs whose good answer has the lower NLL (ties 1/2), with its Wilson interval."""
    if not good:
        return Estimate(None, None, None, 0)
    wins = sum(1.0 if g < b else 0.5 if g == b else 0.0 for g, b in zip(good, bad, strict=True))
    low, high = wilson_interval(wins, len(good))
    return Estimate(wins / len(good), low, high, len(good))


# ------------------------------------------------------------------------------------------- pairs


def question_prompt(question: str) -> list[Message]:
    """The chat prompt of a bare question: one user turn."""
    return [{"role": "user", "content": question}]


def labelled_pairs(
    path: str | Path = JUDGE_PAIRS, aspect: str = "alignment", split: Split | None = "test"
) -> list[PreferencePair]:
    """The labelled pairs of ``path`` (the judge's JSONL schema) of one aspect and half (``None``: both)."""
    try:
        rows = load_judge_pairs(aspect, split, path)
    except OSError as exc:
        raise UserError(f"cannot read the labelled pairs {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: not labelled pairs (question, good, bad, aspect, split): {exc}") from exc
    if not rows:
        raise UserError(f"{path} has no {aspect} pairs in the {split or 'whole'} set")
    return [PreferencePair(question_prompt(r.question), r.good, r.bad) for r in rows]


def _text(completion: Any) -> str:
    """A completion's text: a string, or the content of its (single) assistant message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def group_pairs(folder: str | Path) -> list[PreferencePair]:
    """Best- vs worst-scored answer of each imitation group of a ``sandbox transform`` output folder.

    Text-style prompts (the question as a string) become one user turn, so both styles are
    conditioned alike. Groups with one answer, or whose answers all score the same, are left out.
    """
    _, configs = load_output(folder)
    pairs = []
    for group in configs[HELDOUT_KIND]:
        scores = group["scores"]  # best first
        if len(scores) < 2 or scores[0] == scores[-1]:
            continue
        prompt = group["prompt"]
        messages = question_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        pairs.append(
            PreferencePair(messages, _text(group["completions"][0]), _text(group["completions"][-1]))
        )
    return pairs


def answer_pairs(
    rows: Sequence[dict[str, Any]], model: str, aspect: str = "alignment"
) -> list[PreferencePair]:
    """Best- vs worst-scored of one model's answers to each question (``sandbox evaluate``'s answer rows:
    ``model``, ``question``, ``answer``, a score per aspect).

    Unanswered questions, answers without a readable score and questions whose answers all score the
    same are left out; of equal scores, the first answer counts.
    """
    answers: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["model"] == model and row["answer"] and is_read(row[aspect]):
            answers.setdefault(row["question"], []).append(row)
    pairs = []
    for question, group in answers.items():
        best = max(group, key=lambda r: r[aspect])
        worst = min(group, key=lambda r: r[aspect])
        if best[aspect] > worst[aspect]:
            pairs.append(PreferencePair(question_prompt(question), best["answer"], worst["answer"]))
    return pairs


# ------------------------------------------------------------------------------------------ scorer


class Scorer:
    """A causal LM that scores answers with the trainer's mean token NLL (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, autocast: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        # A dtype name: forward passes under torch.autocast in it, as bf16 training computes the same NLL
        # (none where this CPU would emulate it: autocast to bfloat16 there is slower than float32)
        self.autocast = (
            autocast if autocast and usable_dtype(autocast, model.device.type) == autocast else None
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.collator = DataCollatorForComparisonGroups(pad_token_id=tokenizer.pad_token_id)
        add_fused_lm_head(model)

    @classmethod
    def load(cls, path: str | Path, autocast: str | None = None) -> Scorer:
        """Load a model folder (or Hub name) in float32 on CPU, or the GPU's own dtype there; with ``autocast``
        (a dtype name such as ``"bfloat16"``) its forward passes run under autocast in that dtype."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if device == "cpu" else "auto"
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            raise UserError(f"{path}: the tokenizer has no chat template; use an instruction-tuned model")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, autocast)

    def _tokenize(self, pair: PreferencePair) -> dict[str, Any]:
        answers = [[{"role": "assistant", "content": text}] for text in (pair.good, pair.bad)]
        return tokenize_group(
            {"prompt": pair.prompt, "completions": answers, "scores": [1.0, 0.0]}, self.tokenizer
        )

    def pair_nlls(self, pairs: Sequence[PreferencePair], batch_size: int = 16) -> list[tuple[float, float]]:
        """``(good NLL, bad NLL)`` per pair, in order; ``batch_size`` pairs per forward pass."""
        import torch

        examples = [self._tokenize(p) for p in pairs]
        # Pairs of similar length share a batch, so little of each forward pass is padding.
        order = sorted(
            range(len(examples)),
            key=lambda i: len(examples[i]["prompt_ids"]) + max(map(len, examples[i]["completion_ids"])),
        )
        nlls: list[tuple[float, float]] = [(math.nan, math.nan)] * len(examples)
        autocast = torch.autocast(
            self.model.device.type,
            dtype=getattr(torch, self.autocast or "float32"),
            enabled=self.autocast is not None,
        )
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = self.collator([examples[i] for i in chunk])
            input_ids = batch["input_ids"].to(self.model.device)
            completion_mask = batch["completion_mask"].to(self.model.device)
            with torch.inference_mode(), autocast:
                outputs = self.model(
                    input_ids=input_ids,
                    attention_mask=batch["attention_mask"].to(self.model.device),
                    labels=input_ids.masked_fill(completion_mask == 0, -100),
                    fused_lm_head=True,
                    use_cache=False,
                )
            nll = (-outputs.log_probs.sum(dim=1) / completion_mask[:, 1:].sum(dim=1)).view(-1, 2).tolist()
            for i, (good, bad) in zip(chunk, nll, strict=True):
                nlls[i] = (good, bad)
        return nlls

    def preference(
        self, pairs: Sequence[PreferencePair], batch_size: int = 16
    ) -> tuple[Estimate, list[float]]:
        """Preference accuracy on ``pairs`` with its interval, and each pair's margin, from one pass."""
        nlls = self.pair_nlls(pairs, batch_size)
        return preference_from_nlls([g for g, _ in nlls], [b for _, b in nlls]), nll_margins(nlls)

    def preference_accuracy(self, pairs: Sequence[PreferencePair], batch_size: int = 16) -> Estimate:
        """The share of ``pairs`` whose good answer this model finds more likely, with its interval."""
        return self.preference(pairs, batch_size)[0]
