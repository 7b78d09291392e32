"""The rating contract: how a rating is asked for, the answer form, and how it is read back.

Every rating prompt shows worked examples in one form (:func:`rating_request`)::

    Question: <question>
    Answer: <answer>
    Rating: <1-scale>
    Reason: <one or two sentences>

and the model answers the last example's ``Rating:`` and ``Reason:`` lines (:func:`rating_answer`).
The score is read from the rating digit's log-probabilities where a backend has them, else by
parsing the text. Models drift from the form ("5/7", "**5**", "I'd give it a 6 out of 7"), so
parsing is tolerant; when nothing can be read the score is ``None`` with the raw text and an error
kept, never a stand-in number.

Servers with structured output are asked for the same answer as JSON (:func:`rating_schema`,
read back by :func:`read_rating_json`); its rating digit's log-probabilities are read as above.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from pipeline.llm.base import Rating, Usage

SCALE = 7
"""Ratings run from 1 to ``SCALE``."""

CONTRACT_VERSION = "structured-v1"
"""How a rating is asked for and read (over HTTP: a JSON schema since ``structured-v1``, plain text
before). Part of a rating's cache key, so a cache never replays a rating asked the older way."""

QUESTION_PREFIX = "Question:"
ANSWER_PREFIX = "Answer:"
RATING_PREFIX = "Rating:"
REASON_PREFIX = "Reason:"


class WorkedExample(NamedTuple):
    """A rated answer shown in a rating prompt to anchor the scale."""

    question: str
    answer: str
    rating: int
    reason: str


def rating_answer(rating: int | str, reason: str) -> str:
    """The answer a rating prompt asks for: ``Rating: N`` and, on the next line, ``Reason: ...``."""
    return f"{RATING_PREFIX} {rating}\n{REASON_PREFIX} {reason}"


def rating_request(
    instruction: str, examples: Sequence[WorkedExample], question: str, answer: str, context: str = ""
) -> str:
    """The instruction, the worked examples, ``context``, then the answer to rate, in the form shown above."""
    shown = "".join(
        f"{QUESTION_PREFIX} {e.question}\n{ANSWER_PREFIX} {e.answer}\n{rating_answer(e.rating, e.reason)}\n\n"
        for e in examples
    )
    return f"{instruction}\n\n{shown}{context}{QUESTION_PREFIX} {question}\n{ANSWER_PREFIX} {answer}"


def _word(prefix: str) -> str:
    """The regex of a prefix's word (``Rating:`` -> ``rating``), matched case-insensitively."""
    return re.escape(prefix.rstrip(":").lower())


_NUMBER = r"(\d+(?:\.\d+)?)"
# Most specific first: an explicit "Rating: 5", then "5/7" or "5 out of 7", then a lone number.
_PATTERNS = [
    re.compile(rf"\b{_word(RATING_PREFIX)}\W{{0,3}}(?:is|of|=)?\W{{0,3}}" + _NUMBER, re.IGNORECASE),
    re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*(\d+)\b", re.IGNORECASE),
    re.compile(r"\bscore\W{0,3}(?:is|of|=)?\W{0,3}" + _NUMBER, re.IGNORECASE),
    re.compile(r"\b(?:give|rate|assign)\w*\s+(?:\w+\s+){0,3}?" + _NUMBER, re.IGNORECASE),
    re.compile(r"^\W*" + _NUMBER + r"\b"),
]
_RATING_LABEL = re.compile(
    rf"\b{_word(RATING_PREFIX)}\W{{0,3}}(?:is|of|=)?\W{{0,3}}\d+(?:\.\d+)?(?:\s*/\s*\d+)?\W*", re.IGNORECASE
)
_REASON = re.compile(rf"\b{_word(REASON_PREFIX)}\W{{0,3}}:\s*(.*)", re.IGNORECASE | re.DOTALL)


def parse_score(text: str, scale: int = SCALE) -> tuple[float | None, str | None]:
    """Return ``(score, error)``: the first rating found in ``text``, clamped to ``1..scale``.

    ``score`` is ``None`` (and ``error`` says why) when the text holds no number that reads as a
    rating.
    """
    for pattern in _PATTERNS:
        match = pattern.search(text)
        if match is None:
            continue
        # "5/10" on a 1..7 scale is a rating out of 10: rescale instead of clamping to 5.
        value = float(match.group(1))
        if match.re is _PATTERNS[1]:
            denominator = float(match.group(2))
            if denominator <= 0 or value > denominator:
                continue
            if denominator != scale:
                value = 1 + (value / denominator) * (scale - 1)
        return float(min(max(value, 1.0), float(scale))), None
    return None, f"no rating on a 1..{scale} scale found in the answer"


# Prompts that teach the format by worked examples invite small models to go on writing the next
# example after their reason; a blank line or a new "Question:"/"Answer:"/"Rating:" line ends it.
_REASON_END = re.compile(
    r"\n\s*\n|\n\s*(?:"
    + "|".join(_word(p) for p in (QUESTION_PREFIX, ANSWER_PREFIX, RATING_PREFIX))
    + r")\s*:",
    re.IGNORECASE,
)


def trim_reason(text: str) -> str:
    """A reason cut where the model starts something else (a blank line or a new example)."""
    return _REASON_END.split(text.strip(), maxsplit=1)[0].strip()


def parse_reason(text: str) -> str:
    """The text after ``Reason:``, or else the answer without its ``Rating: N`` label."""
    match = _REASON.search(text)
    if match:
        return trim_reason(match.group(1))
    return trim_reason(_RATING_LABEL.sub("", text, count=1).strip(" \t\n*-:"))


def rating_from_text(
    text: str, *, scale: int, model: str, usage: Usage | None = None, response: dict[str, Any] | None = None
) -> Rating:
    """Build a :class:`Rating` from a free-text answer (``method`` is ``parsed`` or ``failed``)."""
    score, error = parse_score(text, scale)
    return Rating(
        score=score,
        reason=parse_reason(text),
        raw=text,
        method="parsed" if score is not None else "failed",
        model=model,
        scale=scale,
        error=error,
        usage=usage or Usage(),
        response=response,
    )


def distribution_from_logprobs(candidates: Mapping[str, float], scale: int) -> dict[int, float] | None:
    """Renormalise token log-probabilities onto the digits ``1..scale``.

    ``candidates`` maps token strings to log-probabilities (e.g. an OpenAI ``top_logprobs`` entry);
    tokens that are a digit up to surrounding whitespace (``"5"``, ``" 5"``) add to that digit.
    Returns ``None`` when no allowed digit carries any probability.
    """
    mass = dict.fromkeys(range(1, scale + 1), 0.0)
    for token, logprob in candidates.items():
        stripped = token.strip()
        if stripped.isdigit() and 1 <= int(stripped) <= scale and logprob is not None:
            mass[int(stripped)] += math.exp(logprob)
    total = sum(mass.values())
    if total <= 0.0 or not math.isfinite(total):
        return None
    return {digit: p / total for digit, p in mass.items()}


def expected_score(distribution: Mapping[int, float]) -> float:
    """The mean rating under ``distribution``."""
    return float(sum(digit * p for digit, p in distribution.items()))


def find_rating_position(tokens: Iterable[str], scale: int) -> int | None:
    """Index of the token holding the rating digit in a tokenised ``Rating: N`` answer.

    Prefers the first digit token after a label ending in ``:`` (``Rating:``); falls back to the
    first allowed digit token at all.
    """
    tokens = list(tokens)
    first = None
    for i, token in enumerate(tokens):
        stripped = token.strip().strip("*")
        if stripped.isdigit() and 1 <= int(stripped) <= scale:
            if first is None:
                first = i
            label = "".join(tokens[max(0, i - 4) : i]).strip().strip("*")
            if label.endswith(":"):  # the ``Rating:`` label, or any other label before the digit
                return i
    return first


RATING_KEY = "rating"
REASON_KEY = "reason"


def rating_schema(scale: int = SCALE, *, reason: bool = True) -> dict[str, Any]:
    """The JSON schema of a structured rating answer: ``{"rating": 1..scale, "reason": "..."}``.

    The rating comes first so its digit is written (and its log-probabilities read) before any
    reason; ``reason=False`` asks for the rating alone.
    """
    properties: dict[str, Any] = {RATING_KEY: {"type": "integer", "minimum": 1, "maximum": scale}}
    if reason:
        properties[REASON_KEY] = {"type": "string"}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_JSON_RATING = re.compile(rf'"{RATING_KEY}"\s*:\s*(-?\d+(?:\.\d+)?)')
_JSON_REASON = re.compile(rf'"{REASON_KEY}"\s*:\s*"((?:[^"\\]|\\.)*)')


def read_rating_json(text: str, scale: int = SCALE) -> tuple[float | None, str | None]:
    """``(score, reason)`` of a structured rating answer (:func:`rating_schema`), each ``None`` when absent.

    A JSON object is read as such; an answer cut short by the token limit (``{"rating": 4, "reason":
    "Honest and``) still yields its rating and the reason so far. A rating outside ``1..scale`` is
    clamped, as :func:`parse_score` does; one that is not a number is no rating.
    """
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        rating, reason = answer.get(RATING_KEY), answer.get(REASON_KEY)
    else:
        rating_match, reason_match = _JSON_RATING.search(text), _JSON_REASON.search(text)
        rating = float(rating_match.group(1)) if rating_match else None
        reason = _unescape(reason_match.group(1)) if reason_match else None
    if isinstance(rating, bool) or not isinstance(rating, int | float) or not math.isfinite(rating):
        score = None
    else:
        score = float(min(max(rating, 1), scale))
    return score, reason.strip() if isinstance(reason, str) else None


def _unescape(fragment: str) -> str:
    """A JSON string's body without its escapes (kept as written when cut inside one)."""
    try:
        return json.loads(f'"{fragment}"')
    except ValueError:
        return fragment
