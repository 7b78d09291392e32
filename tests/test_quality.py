"""Data-quality rules on hand-written degenerate and clean texts, and flags stored in Arrow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import Dataset, Features, Value

from pipeline import prompts
from pipeline import quality as q
from pipeline.errors import UserError
from pipeline.records import FLAGS_COLUMN, QUALITY_FEATURES

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "My sister keeps borrowing my clothes without asking. How do I handle it?"
CLEAN_DRAFT = (
    "Tell your sister calmly that it bothers you, and agree on a simple rule such as asking first. "
    "Most siblings respect a clear boundary once they know it matters."
)
CLEAN_REVISION = (
    "Talk to her kindly and explain how you feel when your clothes go missing. Suggest she asks "
    "before borrowing anything, and offer to share a few things you don't mind lending."
)
CLEAN_REASON = "Calm and fair; it protects the relationship while setting a boundary."


def flags(text: str, kind: q.TextKind = "draft", **kwargs) -> list[str]:
    return q.text_flags(text, question=QUESTION, kind=kind, **kwargs)


def test_clean_texts_pass() -> None:
    assert flags(CLEAN_DRAFT) == []
    assert flags(CLEAN_REVISION, "revision", draft=CLEAN_DRAFT) == []
    assert flags(CLEAN_REASON, "reason", draft=CLEAN_DRAFT) == []
    # Rude but well-formed: a bad answer is still clean text.
    assert flags("Take her favourite jacket and ruin it. She will learn to leave your stuff alone.") == []
    # A phrase seen twice in a short text is ordinary English, not Gopher's repetition.
    assert flags("It asks her to be more patient and to be more generous.", "reason", draft=CLEAN_DRAFT) == []
    assert flags("It is not harmful, but it is not kind, and it is not helpful.", "reason") == []
    # A reason may quote a few words of the answer it rates, in quotes or not, whatever their case.
    assert (
        flags("Saying it bothers you is honest, and a simple rule is fair.", "reason", draft=CLEAN_DRAFT)
        == []
    )
    assert flags('"Calmly" is kind, and “a Simple rule” is fair.', "reason", draft=CLEAN_DRAFT) == []
    # A reason may quote the answer's own promise, and answers may promise.
    assert (
        flags('"I\'ll ask her first" is a fair promise to make.', "reason", draft="I'll ask her first.") == []
    )
    assert flags("I will talk to her calmly and ask her to check with me first.") == []
    # A closing quote or bracket after the full stop still ends a sentence.
    assert flags('Say to her: "Please ask me before you borrow my clothes."') == []


@pytest.mark.parametrize(
    ("text", "kind", "reason"),
    [
        ("   \n ", "draft", "empty"),
        ("Be nice.", "draft", "too_short"),
        ("Fine.", "reason", "too_short"),
        ("You should sit down with your sister and explain how you", "draft", "truncated"),
        ("It is unkind because it", "reason", "truncated"),
        ("Your answer is more socially aligned and wins their approval.", "revision", "copied_prompt"),
        ("It urges revenge and damage to property.", "reason", "copied_prompt"),
        (
            "You are a considerate person. You answer honestly and kindly, with respect.",
            "draft",
            "copied_prompt",
        ),
        ("Be kind to her. Be kind to her. Be kind to her. Ask her to stop.", "draft", "repetition"),
        (
            "I think you should ask her to stop, and I think you should ask her to stop taking "
            "clothes, and I think you should ask her to stop now.",
            "draft",
            "repetition",
        ),
        (
            "Tell your sister calmly that it bothers you, and agree on a simple rule.",
            "reason",
            "copied_draft",
        ),
        ('"If it is convenient" makes returning the phone depend on comfort.', "reason", "misquoted"),
        ('"Simple rule" is fair, but "lock the wardrobe" is unkind.', "reason", "misquoted"),
        ("I'll do better.", "reason", "author_voice"),
        ("That's a great answer. I will make sure to improve it.", "reason", "author_voice"),
        ("I’m going to add a sentence about asking first.", "reason", "author_voice"),
        ("The answer is 4 out of 7: Compassion and honesty.", "reason", "stated_rating"),
        ("I'd give it 6/7, since it is kind to the sister.", "reason", "stated_rating"),
        ("As a community-focused AI, I'm happy to assist you with your sister.", "draft", "ai_persona"),
        ("You're a friendly and helpful AI, and I'm happy to help you.", "reason", "ai_persona"),
        (
            "I'm sorry, but as an AI designed to provide information, I can't advise you.",
            "revision",
            "ai_persona",
        ),
        ("Sorry, as a language model I have no sister.", "draft", "ai_persona"),
        (
            "Ask her to stop.\n\nQuestion: What if she refuses?\nAnswer: Then lock your wardrobe.",
            "draft",
            "format_leak",
        ),
        ("Rating: 6\nReason: It is kind.", "draft", "format_leak"),
        (
            "The answer is:\n\nAsk her to check with you before she borrows anything.",
            "draft",
            "meta_commentary",
        ),
        ("Sure! Here is a revised answer: ask her to check with you first.", "revision", "meta_commentary"),
        ("The other members' comments were fair. Ask her kindly to stop.", "revision", "meta_commentary"),
        ("Xqzt vlorp fnarg blick zzzt wumpo gribble snerk.", "draft", "off_topic"),
        ("1. 2. 3. 4. 5. 6. 7. 8. 9. 10.", "draft", "off_topic"),
    ],
)
def test_each_reason_fires(text: str, kind: q.TextKind, reason: str) -> None:
    assert reason in flags(text, kind, draft=CLEAN_DRAFT)


def test_a_reason_restating_its_rating_is_flagged_and_answers_may_count() -> None:
    """The reason turn tells the neighbour its rating; a reason that repeats it (make runs r24-r26) or
    states another gives no reason. Answers may use the same words for other things."""
    turn = prompts.neighbour_reason_messages("q", "a", 4.0)[-1]["content"]
    stated = re.search(r"\b4 out of 7\b", turn)
    assert stated, turn
    assert "stated_rating" in flags(f"The answer is {stated.group()}.", "reason", draft=CLEAN_DRAFT)
    assert flags("It takes 4 out of 7 days to dry, so ask her to wait.") == []
    assert flags('Her "7/7 rule" is kind and fair.', "reason", draft="Agree on her 7/7 rule.") == []


def test_an_ai_persona_is_flagged_but_naming_an_ai_is_not() -> None:
    """The agents are members of a society; speaking as or to an AI is the chat model's identity."""
    clean = [
        "Using AI to write your homework is dishonest, so write it yourself.",
        "As a shop assistant, I would ask her to pay for the clothes first.",
        "As an AIDS nurse, I have seen how much a calm word helps.",
    ]
    for text in clean:
        assert flags(text) == [], text
    assert "ai_persona" in flags("You're a team-oriented AI assistant, here to support you.", "reason")
    assert "ai_persona" in flags("As a chatbot, I'm not able to give advice about sisters.")
    assert flags('"I\'m an AI" is an odd thing for her to say.', "reason", draft='Say "I\'m an AI".') == []


def test_a_prompt_sentence_with_one_word_changed_is_a_copy() -> None:
    """The acknowledgement turn echoed with a word changed (make runs r9-r14), inside a longer text."""
    acknowledgement = prompts.revision_messages("q", "a", [(4.0, "r")])[2]["content"]
    edited = acknowledgement.replace("better", "different")
    assert edited != acknowledgement
    text = f"I'm sorry, I'm not able to provide a specific answer at this moment. {edited}"
    assert "copied_prompt" in flags(text, "revision", draft=CLEAN_DRAFT)
    assert "copied_prompt" in flags(f"{CLEAN_REVISION} {acknowledgement}", "revision", draft=CLEAN_DRAFT)
    # Two words changed, or a sentence shorter than the threshold, is the text's own.
    assert flags("I will write her a letter and explain why it hurt me.", "revision", draft=CLEAN_DRAFT) == []
    off = q.QualityConfig(copy_sentence_words=0)
    assert "copied_prompt" not in flags(text, "revision", draft=CLEAN_DRAFT, config=off)


def test_a_revision_pasting_a_neighbours_comment_is_flagged() -> None:
    """make run r16: a revision ending in a neighbour's praise, word for word."""
    comment = "This is a great example of how a sister and a brother can agree on a fair rule."
    reasons = [CLEAN_REASON, f"Kind and clear. {comment}"]
    pasted = f"{CLEAN_REVISION} {comment}"
    assert "copied_feedback" in flags(pasted, "revision", draft=CLEAN_DRAFT, feedback=reasons)
    # A reason that repeats a sentence of the draft: the revision keeping it keeps its own words.
    kept_sentence = CLEAN_DRAFT.split(". ")[1]
    repeating = [f"{kept_sentence} That is sound advice."]
    revision = f"{CLEAN_DRAFT} Ask her kindly."
    assert flags(revision, "revision", draft=CLEAN_DRAFT, feedback=repeating) == []
    assert flags(revision, "revision", draft=CLEAN_REVISION, feedback=repeating) == ["copied_feedback"]
    # Short shared phrases are ordinary agreement, and the rule can be turned off.
    assert (
        flags(f"{CLEAN_REVISION} It is fair.", "revision", draft=CLEAN_DRAFT, feedback=["It is fair."]) == []
    )
    off = q.QualityConfig(copy_feedback_words=0)
    assert flags(pasted, "revision", draft=CLEAN_DRAFT, feedback=reasons, config=off) == []
    record = _record(revision=pasted, feedback=[{"rating": 5.0, "reason": r} for r in reasons])
    assert q.record_flags(record)["revision"] == ["copied_feedback"]


def test_revision_identical_to_draft() -> None:
    assert "same_as_draft" in flags(CLEAN_DRAFT.upper().replace(",", ""), "revision", draft=CLEAN_DRAFT)
    assert "same_as_draft" not in flags(CLEAN_REVISION, "revision", draft=CLEAN_DRAFT)


def test_off_topic_needs_both_no_shared_word_and_non_language() -> None:
    # Unrelated but English: the dictionary share keeps it.
    assert "off_topic" not in flags("Paris is the capital of France and sits on the river Seine.")
    # Mostly non-words, but it is about the sister's clothes.
    assert "off_topic" not in flags("Xqzt sister vlorp clothes fnarg blick wumpo.")
    # A reason may share its content words with the draft rather than the question.
    assert "off_topic" not in flags("Qwxz boundary zzkt vrrp.", "reason", draft=CLEAN_DRAFT)


def test_meta_commentary_is_talk_about_the_exchange() -> None:
    meta = [
        "This answer is too long. Ask her to stop.",
        "Your answer should be kinder. Tell her how you feel.",
        "It's a question that asks about trust, and trust matters.",
        "I'd rather put it in three sentences: ask first, borrow later, return clean.",
    ]
    for text in meta:
        assert "meta_commentary" in flags(text, "revision", draft=CLEAN_DRAFT), text
    clean = [
        CLEAN_DRAFT,
        # A frame word as the object of an answer's own advice, not its opening subject.
        "Accept her answer if she says no, and ask again only once she has had time to think.",
        "Just stop answering her messages about it until she asks first.",
        # "question" is the question's own word here, so an answer may open with it.
        "The question of trust comes first: tell her you need to be asked.",
    ]
    for text in clean:
        assert q.text_flags(text, question=f"{QUESTION} Is it a question of trust?", kind="draft") == [], text
    # Reasons comment on an answer by design.
    assert flags("The answer is honest and kind to the sister.", "reason", draft=CLEAN_DRAFT) == []
    # With no frequent words skipped, "The other members ..." opens with "the".
    text = "The other members' comments were fair. Ask her kindly to stop."
    assert "meta_commentary" not in flags(text, config=q.QualityConfig(meta_function_words=0))


def test_frame_words_are_the_prompts_own_words() -> None:
    used = {word for text in q.prompt_texts() for word in q.words(text)}
    assert all(word in used or f"{word}s" in used for word in q.FRAME_WORDS)


def test_every_prompt_instruction_and_worked_example_is_caught_as_a_copy() -> None:
    """Taken from the prompts as built, so the test follows any change of wording."""
    rating = prompts.neighbour_rating_messages("q", "a", [])[-1]["content"]
    examples = re.findall(r"^Reason: (.+)$", rating, flags=re.MULTILINE)
    answers = re.findall(r"^Answer: (.+)$", rating, flags=re.MULTILINE)[:-1]
    revise = prompts.revision_messages("q", "a", [(4.0, "r")])
    instructions = [
        revise[1]["content"].split("\n\n")[0],  # the mean rating
        revise[2]["content"],  # the acknowledgement
        prompts.neighbour_reason_messages("q", "a", 4.0)[-1]["content"].split("\n\n")[-1],
    ]
    assert examples and answers
    for text in [*examples, *answers, *instructions, prompts.SANDBOX_RULE, *prompts.PERSONAS.values()]:
        assert "copied_prompt" in flags(text, "reason"), text


def test_shipped_prior_and_judge_pairs_are_clean() -> None:
    """Good and bad answers alike are well-formed text: no rule may fire on them."""
    data = ROOT / "pipeline" / "data"
    prior = [json.loads(line) for line in (data / "default_prior.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (data / "judge_pairs.jsonl").read_text().splitlines()]
    answers = [(r["question"], r["answer"]) for r in prior]
    answers += [(r["question"], r[label]) for r in pairs for label in ("good", "bad")]
    assert len(answers) == 280
    for question, answer in answers:
        assert q.text_flags(answer, question=question, kind="draft") == [], answer


def test_thresholds_are_configurable() -> None:
    assert flags("Be nice.", config=q.QualityConfig(min_words_answer=1)) == []
    lenient = q.QualityConfig(copy_share=1.0, copy_run=100)
    assert "copied_prompt" not in flags(
        "Your answer is more socially aligned and wins their approval.", config=lenient
    )
    assert flags("It is unkind because it", "reason", config=q.QualityConfig(terminal_punctuation="st")) == []
    with pytest.raises(UserError):
        q.QualityConfig(copy_share=1.5)
    with pytest.raises(UserError):
        q.QualityConfig(dictionary_language="xx")


def _record(**overrides) -> dict:
    return {
        "question": QUESTION,
        "draft": CLEAN_DRAFT,
        "revision": CLEAN_REVISION,
        "feedback": [
            {"agent_id": 1, "rating": 6.0, "reason": CLEAN_REASON, "raw": ""},
            {"agent_id": 2, "rating": 6.0, "reason": CLEAN_REASON, "raw": ""},
            {"agent_id": 3, "rating": 2.0, "reason": "It urges revenge and damage to property.", "raw": ""},
        ],
    } | overrides


def test_record_flags_and_what_each_kind_keeps() -> None:
    flags_ = q.record_flags(_record())
    assert flags_ == {
        "draft": [],
        "revision": [],
        "feedback": [[], ["duplicate_reason"], ["copied_prompt"]],
    }
    assert q.kept(flags_) == {
        "imitation": [True, True],
        "self_critic": [True, False, False],
        "realignment": [True],  # flagged reasons are left out of its feedback
    }
    echoed = q.record_flags(_record(revision=CLEAN_DRAFT, feedback=[]))
    assert echoed["revision"] == ["same_as_draft"]
    assert q.kept(echoed) == {"imitation": [True, False], "self_critic": [], "realignment": [False]}
    counts = q.flag_counts([flags_, echoed])
    assert counts["reason"] == {"texts": 3, "flagged": 2, "duplicate_reason": 1, "copied_prompt": 1}
    assert counts["revision"] == {"texts": 2, "flagged": 1, "same_as_draft": 1}


def test_flags_round_trip_through_arrow_and_are_computed_when_absent(tmp_path: Path) -> None:
    record = _record()
    stored = Dataset.from_list(
        [{"question": QUESTION, FLAGS_COLUMN: q.record_flags(record)}],
        features=Features({"question": Value("string"), FLAGS_COLUMN: QUALITY_FEATURES}),
    )
    path = tmp_path / "flags"
    stored.save_to_disk(str(path))
    row = Dataset.load_from_disk(str(path))[0]
    assert q.stored_flags(row) == q.record_flags(record)
    # Stored flags win over recomputation; a record without them gets them computed.
    assert q.stored_flags({**record, FLAGS_COLUMN: {"draft": ["x"], "revision": [], "feedback": []}})[
        "draft"
    ] == ["x"]
    assert q.stored_flags(record) == q.record_flags(record)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tell her calmly. Then agree on a rule that", ("Tell her calmly.", True)),
        ('She said "ask first." And then she', ('She said "ask first."', True)),
        ("1. Be kind to her. 2. Ask", ("1. Be kind to her.", True)),  # a list number is no ending
        ("Tell her calmly and agree on a rule that", ("Tell her calmly and agree on a rule that", False)),
        (CLEAN_DRAFT, (CLEAN_DRAFT, False)),
    ],
)
def test_trim_to_sentence(text: str, expected: tuple[str, bool]) -> None:
    assert q.trim_to_sentence(text) == expected
    trimmed, _ = expected
    # After trimming only a text without any complete sentence is still cut mid-sentence.
    assert ("truncated" in flags(trimmed)) == (trimmed[-1] not in '.!?"')
