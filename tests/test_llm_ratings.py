"""The rating contract: prompt form, tolerant parsing and log-probability helpers (pure functions, no model)."""

from __future__ import annotations

import math

import pytest

from pipeline.llm.ratings import (
    SCALE,
    WorkedExample,
    distribution_from_logprobs,
    expected_score,
    find_rating_position,
    parse_reason,
    parse_score,
    rating_answer,
    rating_from_text,
    rating_request,
    rating_schema,
    read_rating_json,
)


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Rating: 5\nReason: helpful and kind.", 5.0),
        ("rating:6", 6.0),
        ("5/7", 5.0),
        ("**5**", 5.0),
        ("I'd give it a 6 out of 7 because it is polite.", 6.0),
        ("Rating: **3**\nReason: meh.", 3.0),
        ("The score is 4.", 4.0),
        ("I would rate this answer 2 since it is rude.", 2.0),
        ("Rating: 9", 7.0),  # clamped to the scale
        ("Rating: 0", 1.0),
        ("8/10", 1 + 0.8 * 6),  # a rating out of 10 is rescaled, not clamped
    ],
)
def test_parse_score_reads_common_formats(text: str, score: float) -> None:
    parsed, error = parse_score(text, scale=7)
    assert parsed == pytest.approx(score)
    assert error is None


@pytest.mark.parametrize("text", ["", "Bananas are yellow.", "Rating: N/A", "I cannot rate this."])
def test_unreadable_rating_is_none_with_raw_text_and_error(text: str) -> None:
    rating = rating_from_text(text, scale=7, model="m")
    assert rating.score is None
    assert rating.method == "failed"
    assert rating.raw == text
    assert rating.error


def test_reason_after_label_or_text_without_rating() -> None:
    assert parse_reason("Rating: 6\nReason: It is kind.\nAnd honest.") == "It is kind.\nAnd honest."
    assert parse_reason("Rating: 4 - a decent answer") == "a decent answer"
    assert parse_reason("**Rating: 6/7** It is kind.") == "It is kind."
    # a small model that goes on writing the next worked example: the reason ends before it
    assert parse_reason("Rating: 2\nReason: Rude.\n\nQuestion: Next?\nAnswer: x") == "Rude."
    assert parse_reason("Rating: 2\nReason: Rude and unkind.\nQuestion: Next?") == "Rude and unkind."
    rating = rating_from_text("Rating: 2\nReason: rude.", scale=7, model="m")
    assert (rating.score, rating.reason, rating.method) == (2.0, "rude.", "parsed")


def test_distribution_from_logprobs_sums_digit_variants_and_renormalises() -> None:
    top = {" 5": math.log(0.5), "5": math.log(0.1), "6": math.log(0.2), "9": math.log(0.1), "x": -0.1}
    distribution = distribution_from_logprobs(top, scale=7)
    assert distribution is not None
    assert set(distribution) == set(range(1, 8))
    assert sum(distribution.values()) == pytest.approx(1.0)
    assert distribution[5] == pytest.approx(0.6 / 0.8)
    assert expected_score(distribution) == pytest.approx(5 * 0.75 + 6 * 0.25)
    assert distribution_from_logprobs({"hello": -0.1, "9": -1.0}, scale=7) is None


def test_find_rating_position_prefers_the_labelled_digit() -> None:
    tokens = ["In", " 2", " words", ".", "\n", "Rating", ":", " 5", "\n", "Reason", ":", " ok"]
    assert find_rating_position(tokens, scale=7) == 7
    assert find_rating_position(["I", " say", " 3"], scale=7) == 2
    assert find_rating_position(["no", " digits"], scale=7) is None


def test_rating_request_form_and_its_answers_read_back() -> None:
    examples = [WorkedExample("Q1?", "A1.", 6, "Kind."), WorkedExample("Q2?", "A2.", 2, "Rude.")]
    text = rating_request("Rate it.", examples, "Q?", "A.")
    assert text == (
        "Rate it.\n\n"
        "Question: Q1?\nAnswer: A1.\nRating: 6\nReason: Kind.\n\n"
        "Question: Q2?\nAnswer: A2.\nRating: 2\nReason: Rude.\n\n"
        "Question: Q?\nAnswer: A."
    )
    rating = rating_from_text(rating_answer(5, "Fair and kind."), scale=SCALE, model="m")
    assert (rating.score, rating.reason, rating.method) == (5.0, "Fair and kind.", "parsed")
    # A model that goes on to write the next worked example: its reason ends where that begins.
    rambling = rating_answer(3, "Blunt.") + "\n" + text.split("\n\n")[1]
    assert parse_reason(rambling) == "Blunt."
    assert parse_score(rambling, SCALE) == (3.0, None)


def test_rating_schema_puts_the_rating_first_and_the_reason_only_when_asked() -> None:
    schema = rating_schema(5)
    assert list(schema["properties"]) == ["rating", "reason"]
    assert schema["properties"]["rating"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert schema["required"] == ["rating", "reason"] and schema["additionalProperties"] is False
    bare = rating_schema(7, reason=False)
    assert list(bare["properties"]) == ["rating"] and bare["required"] == ["rating"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{ "rating": 4, "reason": "Honest and kind." }', (4.0, "Honest and kind.")),
        ('{"rating": 5}', (5.0, None)),
        ('{ "rating": 6, "reason": "Kind, \\"fair\\" and hon', (6.0, 'Kind, "fair" and hon')),  # cut short
        ('{ "rating": 9, "reason": "x" }', (7.0, "x")),  # clamped to the scale
        ('{ "rating": 0 }', (1.0, None)),
        ('{ "rating": "high", "reason": "x" }', (None, "x")),
        ('{ "rating": true }', (None, None)),
        ("Rating: 5\nReason: kind.", (None, None)),  # not JSON: left to the text parser
        ('["rating", 5]', (None, None)),
    ],
)
def test_read_rating_json(text: str, expected: tuple[float | None, str | None]) -> None:
    assert read_rating_json(text, scale=7) == expected
