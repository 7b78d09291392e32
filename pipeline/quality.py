"""Data-quality flags: which texts of an interaction record are degenerate, and why.

A small agent model writes degenerate texts that teach a trained model nothing or worse: it echoes
the instructions it was given, copies the worked examples of the rating prompt, repeats itself, is
cut mid-sentence at ``max_tokens``, or leaves the draft unchanged. Each rule below gives a reason
code; a text's flags are the codes of the rules it breaks (an empty list: clean).

Reason codes (thresholds are fields of :class:`QualityConfig`):

- ``empty``: nothing but white space.
- ``too_short``: fewer words than ``min_words_answer`` (draft, revision) or ``min_words_reason``.
- ``truncated``: cut mid-sentence: the text does not end with terminal punctuation (closing quotes,
  brackets and emphasis marks after it are allowed).
- ``copied_prompt``: a copy of instruction, system or worked-example text from the prompts
  (:func:`prompt_texts`): a run of ``copy_run`` or more words shared with one, at least
  ``copy_share`` of the text's words inside word ``copy_ngram``-grams shared with them, or a
  sentence of ``copy_sentence_words`` or more words that is one of theirs with one word changed
  (the revision turn's acknowledgement echoed as "I will write a different answer.").
- ``format_leak``: a line opening with a label of the prompts' example form (``Question:``,
  ``Answer:``, ``Rating:``, ``Reason:``, from ``pipeline.llm.ratings``): the model writing the next
  worked example instead of its own answer.
- ``meta_commentary`` (drafts and revisions only): the text talks about the exchange instead of
  answering ("The answer is:", "Here is a revised answer: ...", "The other members' comments were
  ..."): a sentence whose first content word is a frame word, or a lead-in (a clause ending with
  ``:``) that holds one, where the frame words (:data:`FRAME_WORDS`, singular or plural) are the
  words the prompts use for the parts of the exchange, and a frame word the question itself uses
  does not count. A sentence's first content word is its first word outside the
  ``meta_function_words`` most frequent words of the dictionary (200: at 100, "other" would be the
  first content word of "The other members rated it"), so "This answer is" opens with a frame word
  but "Accept her answer" does not. Reasons are commentary on an answer by design, so the rule does
  not apply to them. Measured: none of the 264 shipped clean texts and 1 of 25 labelled clean run
  texts ("The answer is no. ...") flagged; 16 of the 18 meta texts of a sandbox-v3 demo run caught.
- ``copied_draft``: a neighbour's reason that copies the answer it rates instead of judging it: at
  least ``copy_share_draft`` of its words inside word ``copy_ngram``-grams of the draft.
- ``copied_feedback``: a revision that pastes a neighbour's comment into the answer: a sentence of
  ``copy_feedback_words`` or more words of one of the record's reasons that the draft does not hold
  ("This is a great example of how a community can bring together different perspectives ...",
  "Your response is too long and contains multiple sentences."). A reason sentence that quotes the
  draft and stays in the revision is the draft's own. Measured on the 1,620 revisions of make runs
  r1-r16: 69 hold such a sentence (6 words or more), 50 of them already flagged otherwise; of the
  other 19 (read by hand), 15 paste a comment on the answer and 4 take over a phrase of advice
  or a line the neighbour put in quotes.
- ``misquoted``: a neighbour's reason that quotes (between double quotes) words the answer it rates
  does not hold, in that order: a quote of a worked example ("\"If it is convenient\" makes ..."), or
  a sentence of the neighbour's own put in quotes, is not feedback on this answer. Measured on the
  216 reasons of make run r3 (sandbox-v4): 195 quote something, 156 of them words the draft does
  not hold.
- ``author_voice``: a neighbour's reason that speaks as the answer's author or promises to act
  instead of judging the answer: outside quotes, a first-person future ("I'll", "I will", "I'm going
  to"): "I'll do better.", "That's a great answer. I'll make sure to improve it.", "I'll just add a
  sentence to that." Measured on the 3,240 reasons of make runs r1-r16: 140 match, 115 of them not
  flagged otherwise; 40 of those 115 read by hand, none a judgement of the answer.
- ``stated_rating``: a neighbour's reason that states a score on the rating scale ("The answer is 4 out
  of 7.", "7/7") instead of giving a reason: the reason turn itself says "You rated their answer N out
  of 7", so the number is that turn echoed, and often another number than the neighbour's rating
  (a 7 under a rating of 3.5). Measured on the 648 reasons of make runs r24, r25fp32 and r26: 19
  match, 12 of them not flagged otherwise; 15 repeat the turn's 4, 4 state a 3 or a 7.
- ``ai_persona``: a text that speaks as or to an AI instead of as a member of the society ("As a
  community-focused AI, I'm happy to assist you.", "You're a friendly and helpful AI"): outside
  double quotes, "as", "I'm", "I am", "you're" or "you are", an article and up to three words, then
  "AI" (upper case), "A.I.", "chatbot", "language model" or "virtual assistant". The agents are
  people of a society; the persona is the small chat model's assistant identity leaking through,
  and the judge scores it high (an assistant-identity non-answer 7.00). Naming an AI is not enough
  ("Using AI to write your essay is dishonest." is clean). Measured on the 648 answers and 648
  reasons of make runs r24, r25fp32 and r26: 6 answers and 8 reasons match, 2 and 0 of them flagged
  otherwise; one, the revision "As a community-focused AI, I'm happy to assist you. I have a number
  of different ways that you can get into your neighbour's pool ...", scored 7.00, at the top of its
  imitation group in r24 and r26.
- ``repetition``: heavy repetition, measured as the Gopher rules (Rae et al. 2021, appendix A)
  measure it, adapted to answers of a few sentences: duplicate sentences (by count and by
  characters) stand for Gopher's duplicate lines and paragraphs; the share of the most frequent
  repeated 2/3/4-gram is measured as if the text had at least ``top_ngram_min_words`` words
  (Gopher's minimum document length, padded with non-repeating words of the text's mean length):
  in a 12-word reason such as "to be more lenient and to be more generous" a phrase seen twice
  would otherwise be a third of the letters. The duplicated 5..10-gram shares are Gopher's
  unchanged: exact repeats of five words or more are rare in short clean text too. Character
  shares are over the words' letters.
- ``off_topic``: off the question and not language: no content word shared with the question (for
  a reason: with the question or the draft) AND fewer than ``min_dictionary_share`` of its words in
  an English dictionary. The dictionary is pyspellchecker's English word-frequency list (160k
  words from subtitle frequencies checked against English word lists; pure Python, no
  dependencies); a word's stem is its first ``stem_chars`` letters, and the ``common_words`` most
  frequent words of that list are function words, never content words.
- ``same_as_draft``: a revision equal to its draft once case, punctuation and spacing are ignored.
- ``duplicate_reason``: a neighbour's reason equal (normalised) to an earlier neighbour's reason in
  the same record (greedy decoding with similar memories gives twins).

What a flag drops, per kind of training example (``sandbox transform``; flagged texts are dropped
by default, an option keeps them):

- imitation: a flagged draft drops the draft completion, a flagged revision drops the revision
  completion; the other one is still used.
- realignment: a flag on the draft or the revision drops the example (its prompt quotes the draft,
  its completion ends with the revision); flagged reasons are left out of its feedback, and a
  record whose reasons are all flagged gives no realignment example.
- self-critic: a flagged reason drops that completion; the draft only appears in the prompt.

Flags are computed once, by ``sandbox simulate``, and stored with the record (column
:data:`~pipeline.records.FLAGS_COLUMN`, layout :data:`~pipeline.records.QUALITY_FEATURES`: one list
of codes per text); records without stored flags (older runs, imported logs) get them from
:func:`stored_flags`, which computes them on the fly. The copy rules compare with the prompts of the
current ``PROMPT_VERSION`` and the instructions earlier versions used (``prompts.RETIRED_TEXTS``).

Texts a model stopped mid-sentence are cut back to their last complete sentence when the record is
made (:func:`trim_to_sentence`; the record's ``trimmed`` column says which), so ``truncated`` is
left for texts with no complete sentence at all.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, get_args

from spellchecker import SpellChecker

from pipeline import prompts
from pipeline.errors import UserError
from pipeline.llm.ratings import ANSWER_PREFIX, QUESTION_PREFIX, RATING_PREFIX, REASON_PREFIX, SCALE
from pipeline.records import ASPECTS, FLAGS_COLUMN

TextKind = Literal["draft", "revision", "reason"]
TEXT_KINDS: tuple[TextKind, ...] = ("draft", "revision", "reason")

Reason = Literal[
    "empty",
    "too_short",
    "truncated",
    "copied_prompt",
    "format_leak",
    "meta_commentary",
    "copied_draft",
    "copied_feedback",
    "misquoted",
    "author_voice",
    "stated_rating",
    "ai_persona",
    "repetition",
    "off_topic",
    "same_as_draft",
    "duplicate_reason",
]
REASONS: tuple[Reason, ...] = get_args(Reason)
"""Every reason code, in the order the rules run."""

RecordFlags = dict[str, Any]
"""``{"draft": [codes], "revision": [codes], "feedback": [[codes] per neighbour]}``."""


@dataclass
class QualityConfig:
    """Thresholds of the data-quality rules (see the module docstring for each reason code).

    Length and ending:
        min_words_answer, min_words_reason, terminal_punctuation
    Copies of prompt text:
        copy_ngram, copy_share, copy_run, copy_sentence_words, copy_share_draft, copy_feedback_words
    Meta-commentary:
        meta_function_words
    Repetition (Gopher-style; a text breaking any one is flagged):
        max_duplicate_sentence_share, max_duplicate_sentence_char_share, top_ngram_min_words,
        max_top_ngram_char_share, max_duplicate_ngram_char_share
    Off topic and not language:
        min_dictionary_share, dictionary_language, common_words, stem_chars
    """

    min_words_answer: int = field(
        default=4, metadata={"help": "a draft or revision with fewer words is flagged too_short"}
    )
    min_words_reason: int = field(
        default=3, metadata={"help": "a neighbour's reason with fewer words is flagged too_short"}
    )
    terminal_punctuation: str = field(
        default=".!?…", metadata={"help": "characters a complete text may end with (else: truncated)"}
    )
    copy_ngram: int = field(
        default=4, metadata={"help": "word n-gram length compared with the prompts' texts"}
    )
    copy_share: float = field(
        default=0.5,
        metadata={"help": "flag copied_prompt when at least this share of the words lie in shared n-grams"},
    )
    copy_run: int = field(
        default=8, metadata={"help": "flag copied_prompt when this many consecutive words are shared"}
    )
    copy_sentence_words: int = field(
        default=5,
        metadata={
            "help": "flag copied_prompt when a sentence of at least this many words is a prompt sentence "
            "with one word changed (0: off)"
        },
    )
    copy_share_draft: float = field(
        default=0.8,
        metadata={
            "help": "flag a reason copied_draft when at least this share of its words lie in n-grams of the draft"
        },
    )
    copy_feedback_words: int = field(
        default=6,
        metadata={
            "help": "flag a revision copied_feedback when it holds a sentence of at least this many words of "
            "a neighbour's reason that the draft does not hold (0: off)"
        },
    )
    meta_function_words: int = field(
        default=200,
        metadata={
            "help": "meta_commentary looks for a frame word as each sentence's first word outside this many "
            "most frequent dictionary words (0: its first word)"
        },
    )
    max_duplicate_sentence_share: float = field(
        default=0.30,
        metadata={"help": "largest share of sentences repeating an earlier one (Gopher: lines, 0.30)"},
    )
    max_duplicate_sentence_char_share: float = field(
        default=0.20,
        metadata={"help": "largest share of characters in repeated sentences (Gopher: lines, 0.20)"},
    )
    top_ngram_min_words: int = field(
        default=50,
        metadata={"help": "top 2/3/4-gram shares are measured as if the text had at least this many words"},
    )
    max_top_ngram_char_share: dict[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        metadata={
            "help": "n -> largest character share of the most frequent repeated n-gram (Gopher's values)"
        },
    )
    max_duplicate_ngram_char_share: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        metadata={"help": "n -> largest character share of duplicated n-grams (Gopher's values)"},
    )
    min_dictionary_share: float = field(
        default=0.5,
        metadata={
            "help": "off_topic needs fewer than this share of dictionary words (and no shared content word)"
        },
    )
    dictionary_language: str = field(
        default="en",
        metadata={"help": "pyspellchecker dictionary the share of dictionary words is measured on"},
    )
    common_words: int = field(
        default=100, metadata={"help": "the dictionary's most frequent words, not counted as content words"}
    )
    stem_chars: int = field(
        default=5, metadata={"help": "content words match when their first this many letters do"}
    )

    def __post_init__(self) -> None:
        counts = (
            self.min_words_answer,
            self.min_words_reason,
            self.common_words,
            self.top_ngram_min_words,
            self.meta_function_words,
            self.copy_sentence_words,
            self.copy_feedback_words,
        )
        if min(counts) < 0:
            raise UserError("quality: word counts must be >= 0")
        if self.copy_ngram < 1 or self.copy_run < 1 or self.stem_chars < 1:
            raise UserError("quality: copy_ngram, copy_run and stem_chars must be >= 1")
        shares = [
            self.copy_share,
            self.copy_share_draft,
            self.max_duplicate_sentence_share,
            self.max_duplicate_sentence_char_share,
            self.min_dictionary_share,
            *self.max_top_ngram_char_share.values(),
            *self.max_duplicate_ngram_char_share.values(),
        ]
        if not all(0.0 <= share <= 1.0 for share in shares):
            raise UserError("quality: shares must lie in [0, 1]")
        if self.dictionary_language not in SpellChecker.languages():
            raise UserError(
                f"quality: no dictionary for language {self.dictionary_language!r}; "
                f"choose one of {', '.join(sorted(SpellChecker.languages()))}"
            )


# ----------------------------------------------------------------------------------------- words

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")
_CLOSERS = "\"')]}*_”’»"
_FORMAT_LABEL = re.compile(
    r"^[\s*#>-]*(?:"
    + "|".join(re.escape(p) for p in (QUESTION_PREFIX, ANSWER_PREFIX, RATING_PREFIX, REASON_PREFIX))
    + ")",
    re.IGNORECASE | re.MULTILINE,
)


def words(text: str) -> list[str]:
    """Lower-cased words (letters, inner apostrophes kept) of ``text``."""
    return _WORD.findall(text.replace("’", "'").lower())


def normalised(text: str) -> str:
    """``text`` as its words joined by single spaces: case, punctuation and spacing ignored."""
    return " ".join(words(text))


_QUOTED = re.compile(r'["“]([^"“”]*)["”]')
_FIRST_PERSON_FUTURE = re.compile(r"\bI(?:'ll| will| am going to|'m going to)\b", re.IGNORECASE)
_STATED_RATING = re.compile(rf"\b\d+(?:\.\d+)?(?: out of |/){SCALE}\b")
_AI_PERSONA = re.compile(
    r"\b(?i:as|I'm|I am|you're|you are)\s+(?i:an?\s+)?(?:[\w-]+,?\s+){0,3}"
    r"(?:AI|A\.I\.|(?i:chat ?bot|language model|virtual assistant))(?!\w)"
)


def misquotes(reason: str, draft: str) -> bool:
    """Whether ``reason`` quotes words that ``draft`` does not hold as a run (case and punctuation
    ignored)."""
    held = f" {normalised(draft)} "
    return any(quote and f" {quote} " not in held for quote in map(normalised, _QUOTED.findall(reason)))


def sentences(text: str) -> list[str]:
    return [s for s in (normalised(part) for part in _SENTENCE_END.split(text)) if s]


@cache
def _dictionary(language: str) -> Counter:
    return SpellChecker(language=language, distance=1).word_frequency.dictionary


@cache
def _common(language: str, count: int) -> frozenset[str]:
    return frozenset(word for word, _ in _dictionary(language).most_common(count))


# ------------------------------------------------------------------------------- prompt references

FRAME_WORDS = (
    *("answer", "question", "member", "comment", "sentence", "reply"),
    *("rate", "rated", "rating", "revise", "revised"),
)
"""The words the prompts use for the parts of the exchange itself (the answer, the question, the
other members, their comments and ratings, the revision, its length): what a text talks about when it
comments on the exchange instead of answering (``meta_commentary``). A list, because nothing in the
prompts' wording tells these from the values they ask for ("honest", "helpful"), which answers use
as well; every one of them occurs in the prompts (``tests/test_quality.py`` checks it)."""

_SLOT = "\x00"


@cache
def prompt_texts() -> tuple[str, ...]:
    """Every fixed text the sandbox's prompts show a model: system turns, instructions, worked
    examples, and the instructions of earlier prompt versions (``prompts.RETIRED_TEXTS``). Built by
    filling the prompt builders with placeholders and keeping what lies between them, so a change
    of wording in ``pipeline.prompts`` is followed here."""
    q, a, r = (f"{_SLOT}{name}{_SLOT}" for name in "qar")
    draft = prompts.draft_messages(q, [])
    conversations = [
        draft,
        prompts.neighbour_rating_messages(q, a, []),
        *(prompts.observer_messages(aspect, q, a) for aspect in ASPECTS),
        prompts.revision_messages(q, a, [(4.0, r)]),
        prompts.neighbour_reason_messages(q, a, 4.0),
        *(prompts.persona_messages(label, q) for label in prompts.PERSONAS),
    ]
    segments = {
        segment.strip()
        for messages in conversations
        for message in messages
        for segment in re.split(f"{_SLOT}.{_SLOT}", message["content"])
    }
    return tuple(sorted(s for s in segments | set(prompts.RETIRED_TEXTS) if words(s)))


@cache
def _prompt_ngrams(n: int) -> frozenset[tuple[str, ...]]:
    return frozenset(gram for text in prompt_texts() for gram in _ngrams(words(text), n))


def _one_word_out(tokens: Sequence[str]) -> list[tuple[str | None, ...]]:
    """``tokens`` with each word in turn left open: two word sequences of one length share one of
    these exactly when they differ in at most one word."""
    return [(*tokens[:i], None, *tokens[i + 1 :]) for i in range(len(tokens))]


@cache
def _prompt_sentence_patterns(min_words: int) -> frozenset[tuple[str | None, ...]]:
    return frozenset(
        pattern
        for text in prompt_texts()
        for sentence in sentences(text)
        if len(tokens := sentence.split()) >= min_words
        for pattern in _one_word_out(tokens)
    )


def _edited_prompt_sentence(text: str, config: QualityConfig) -> bool:
    """Whether a sentence of ``text`` is a sentence of the prompts with at most one word changed."""
    if not config.copy_sentence_words:
        return False
    patterns = _prompt_sentence_patterns(config.copy_sentence_words)
    return any(
        len(tokens := sentence.split()) >= config.copy_sentence_words
        and not patterns.isdisjoint(_one_word_out(tokens))
        for sentence in sentences(text)
    )


def _pasted_feedback(revision: str, draft: str, feedback: Sequence[str], config: QualityConfig) -> bool:
    """Whether ``revision`` holds a long enough sentence of a reason in ``feedback`` that ``draft`` does not."""
    if not config.copy_feedback_words:
        return False
    held, own = f" {normalised(revision)} ", f" {normalised(draft)} "
    return any(
        len(sentence.split()) >= config.copy_feedback_words
        and f" {sentence} " in held
        and f" {sentence} " not in own
        for reason in feedback
        for sentence in sentences(reason)
    )


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# ----------------------------------------------------------------------------------------- rules


def copy_stats(tokens: Sequence[str], n: int, reference: Sequence[str] | None = None) -> tuple[float, int]:
    """``(share of words inside n-grams shared with the reference, longest run of such words)``;
    the reference is the prompts' texts unless the words of another text are given."""
    if not tokens:
        return 0.0, 0
    shared = _prompt_ngrams(n) if reference is None else frozenset(_ngrams(reference, n))
    covered = [False] * len(tokens)
    for i, gram in enumerate(_ngrams(tokens, n)):
        if gram in shared:
            covered[i : i + n] = [True] * n
    run = longest = 0
    for inside in covered:
        run = run + 1 if inside else 0
        longest = max(longest, run)
    return sum(covered) / len(tokens), longest


def repetition_stats(text: str, top_ngram_min_words: int = 0) -> dict[str, float]:
    """The Gopher-style repetition measures of ``text`` (see the module docstring).

    Keys: ``dup_sentences``, ``dup_sentence_chars``, ``top_<n>gram`` and ``dup_<n>gram``
    (n = 2..4 and 5..10); every value a share in [0, 1]. ``top_<n>gram`` is 0 unless the most
    frequent n-gram occurs twice or more, and is measured on at least ``top_ngram_min_words`` words.
    """
    parts = sentences(text)
    seen: set[str] = set()
    dup_count = dup_chars = 0
    for sentence in parts:
        if sentence in seen:
            dup_count += 1
            dup_chars += len(sentence)
        seen.add(sentence)
    tokens = words(text)
    letters = sum(len(t) for t in tokens)
    padded = letters * max(1.0, top_ngram_min_words / len(tokens)) if tokens else 0
    stats = {
        "dup_sentences": dup_count / len(parts) if parts else 0.0,
        "dup_sentence_chars": dup_chars / sum(len(s) for s in parts) if parts else 0.0,
    }
    for n in range(2, 5):
        counts = Counter(_ngrams(tokens, n))
        gram, count = counts.most_common(1)[0] if counts else ((), 0)
        stats[f"top_{n}gram"] = count * sum(map(len, gram)) / padded if count >= 2 else 0.0
    for n in range(5, 11):
        # Gopher's count: scan left to right; a repeated n-gram's letters count once, then skip it.
        seen_grams: set[tuple[str, ...]] = set()
        repeated, i = 0, 0
        while i <= len(tokens) - n:
            gram = tuple(tokens[i : i + n])
            if gram in seen_grams:
                repeated += sum(map(len, gram))
                i += n
            else:
                seen_grams.add(gram)
                i += 1
        stats[f"dup_{n}gram"] = repeated / letters if letters else 0.0
    return stats


def _repetitive(text: str, config: QualityConfig) -> bool:
    stats = repetition_stats(text, config.top_ngram_min_words)
    limits = {
        "dup_sentences": config.max_duplicate_sentence_share,
        "dup_sentence_chars": config.max_duplicate_sentence_char_share,
        **{f"top_{n}gram": share for n, share in config.max_top_ngram_char_share.items()},
        **{f"dup_{n}gram": share for n, share in config.max_duplicate_ngram_char_share.items()},
    }
    return any(stats.get(name, 0.0) > limit for name, limit in limits.items())


def dictionary_share(tokens: Sequence[str], language: str = "en") -> float:
    """Share of ``tokens`` found in the dictionary (0 when there are none)."""
    if not tokens:
        return 0.0
    known = _dictionary(language)
    return sum(token in known for token in tokens) / len(tokens)


def content_stems(tokens: Iterable[str], config: QualityConfig) -> set[str]:
    """Stems of the words that carry content: three letters or more, not among the commonest."""
    common = _common(config.dictionary_language, config.common_words)
    return {t[: config.stem_chars] for t in tokens if len(t) >= 3 and t not in common}


_LEAD_IN = re.compile(r"([^.!?…:\n]*):")


def meta_commentary(text: str, question: str, config: QualityConfig) -> bool:
    """Whether ``text`` talks about the exchange (``meta_commentary`` in the module docstring)."""
    frame = set(FRAME_WORDS) - {_singular(t) for t in words(question)}
    function_words = _common(config.dictionary_language, config.meta_function_words)
    openings = [
        next((t for t in words(part) if t not in function_words), "") for part in _SENTENCE_END.split(text)
    ]
    lead_ins = [t for match in _LEAD_IN.finditer(text) for t in words(match.group(1))]
    return any(_singular(t) in frame for t in openings + lead_ins)


def _singular(word: str) -> str:
    return word.removesuffix("s") if word.removesuffix("s") in FRAME_WORDS else word


def _truncated(text: str, config: QualityConfig) -> bool:
    end = text.rstrip().rstrip(_CLOSERS).rstrip()
    return not end or end[-1] not in config.terminal_punctuation


def trim_to_sentence(text: str, config: QualityConfig | None = None) -> tuple[str, bool]:
    """``(text cut after its last complete sentence, whether it was cut)``.

    A text that already ends a sentence, or holds no complete sentence (it stays ``truncated``),
    is returned whole. A sentence ends at terminal punctuation (closing quotes, brackets and
    emphasis marks after it kept) followed by white space; a list number ("2.") is no ending.
    """
    config = config or QualityConfig()
    if not _truncated(text, config):
        return text, False
    ending = re.compile(rf"[{re.escape(config.terminal_punctuation)}][{re.escape(_CLOSERS)}]*(?=\s)")
    for match in reversed(list(ending.finditer(text))):
        before = text[: match.start()].rsplit(None, 1)
        if before and not (before[-1].isdigit() and match.group().startswith(".")):
            return text[: match.end()], True
    return text, False


def text_flags(
    text: str | None,
    *,
    question: str,
    kind: TextKind,
    config: QualityConfig | None = None,
    draft: str | None = None,
    feedback: Sequence[str] = (),
) -> list[Reason]:
    """The reason codes ``text`` breaks (empty: clean).

    ``kind`` selects the length threshold and the rules that need context: ``draft`` is the draft
    a revision is compared with (``same_as_draft``) or a reason rates (``copied_draft``; it is also
    part of what a reason may share content words with); ``feedback`` holds the neighbours' reasons
    a revision was written from (``copied_feedback``).
    """
    config = config or QualityConfig()
    text = text or ""
    if not text.strip():
        return ["empty"]
    tokens = words(text)
    flags: list[Reason] = []
    minimum = config.min_words_reason if kind == "reason" else config.min_words_answer
    if len(tokens) < minimum:
        flags.append("too_short")
    if _truncated(text, config):
        flags.append("truncated")
    share, run = copy_stats(tokens, config.copy_ngram)
    if tokens and (
        share >= config.copy_share or run >= config.copy_run or _edited_prompt_sentence(text, config)
    ):
        flags.append("copied_prompt")
    if _FORMAT_LABEL.search(text):
        flags.append("format_leak")
    if kind != "reason" and meta_commentary(text, question, config):
        flags.append("meta_commentary")
    if (
        kind == "reason"
        and draft
        and copy_stats(tokens, config.copy_ngram, words(draft))[0] >= config.copy_share_draft
    ):
        flags.append("copied_draft")
    if kind == "revision" and feedback and _pasted_feedback(text, draft or "", feedback, config):
        flags.append("copied_feedback")
    if kind == "reason" and draft is not None and misquotes(text, draft):
        flags.append("misquoted")
    if kind == "reason" and _FIRST_PERSON_FUTURE.search(_QUOTED.sub("", text.replace("’", "'"))):
        flags.append("author_voice")
    if kind == "reason" and _STATED_RATING.search(_QUOTED.sub("", text)):
        flags.append("stated_rating")
    if _AI_PERSONA.search(_QUOTED.sub("", text.replace("’", "'"))):
        flags.append("ai_persona")
    if _repetitive(text, config):
        flags.append("repetition")
    context = words(question) + (words(draft) if kind == "reason" and draft else [])
    if not content_stems(tokens, config) & content_stems(context, config) and (
        dictionary_share(tokens, config.dictionary_language) < config.min_dictionary_share
    ):
        flags.append("off_topic")
    if kind == "revision" and draft is not None and normalised(text) == normalised(draft):
        flags.append("same_as_draft")
    return flags


def record_flags(record: Mapping[str, Any], config: QualityConfig | None = None) -> RecordFlags:
    """Flags of a record's draft, revision and each neighbour's reason (``records.QUALITY_FEATURES``)."""
    config = config or QualityConfig()
    question, draft = record.get("question") or "", record.get("draft")
    feedback = []
    seen: set[str] = set()
    reasons = [item.get("reason") or "" for item in record.get("feedback") or []]
    for reason in reasons:
        flags = text_flags(reason, question=question, kind="reason", config=config, draft=draft)
        key = normalised(reason)
        if key and key in seen:
            flags.append("duplicate_reason")
        seen.add(key)
        feedback.append(flags)
    return {
        "draft": text_flags(draft, question=question, kind="draft", config=config),
        "revision": text_flags(
            record.get("revision"),
            question=question,
            kind="revision",
            config=config,
            draft=draft,
            feedback=reasons,
        ),
        "feedback": feedback,
    }


def stored_flags(record: Mapping[str, Any], config: QualityConfig | None = None) -> RecordFlags:
    """The flags stored in the record (:data:`FLAGS_COLUMN`), or computed now for records written
    without them."""
    stored = record.get(FLAGS_COLUMN)
    return dict(stored) if stored is not None else record_flags(record, config)


def kept(flags: RecordFlags) -> dict[str, list[bool]]:
    """Which training examples of a record survive its flags (the policy of the module docstring).

    ``{"imitation": [draft kept, revision kept], "self_critic": [kept per reason],
    "realignment": [example kept]}``.
    """
    draft_ok, revision_ok = not flags["draft"], not flags["revision"]
    reasons_ok = [not f for f in flags["feedback"]]
    return {
        "imitation": [draft_ok, revision_ok],
        "self_critic": reasons_ok,
        "realignment": [draft_ok and revision_ok and (any(reasons_ok) or not reasons_ok)],
    }


def flag_counts(all_flags: Iterable[RecordFlags]) -> dict[str, dict[str, int]]:
    """Texts flagged per text kind and reason code, with ``texts`` and ``flagged`` totals per kind."""
    counts = {kind: Counter() for kind in TEXT_KINDS}
    for flags in all_flags:
        per_text = [("draft", flags["draft"]), ("revision", flags["revision"])]
        per_text += [("reason", f) for f in flags["feedback"]]
        for kind, codes in per_text:
            counts[kind]["texts"] += 1
            counts[kind]["flagged"] += bool(codes)
            counts[kind].update(codes)
    return {kind: dict(counter) for kind, counter in counts.items()}
