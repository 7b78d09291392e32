"""The schema of interaction records: what ``sandbox simulate`` writes and the transforms read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Features, List, Value

ASPECTS = ("alignment", "engagement")
"""What the memoryless observers rate, each on the rating scale, before and after revision."""

WHEN = ("before", "after")
"""The draft is rated before revision, the revision after."""

SCORE_FIELDS = tuple(f"{aspect}_{when}" for aspect in ASPECTS for when in WHEN)
"""``alignment_before``, ``alignment_after``, ``engagement_before``, ``engagement_after``."""

SCHEMA_VERSION = 3
"""Version of the record layout, stored in every record (column ``schema_version``).

1: the layout before the column existed; a shard without the column holds version-1 records.
2: version 1 plus ``schema_version``.
3: version 2 plus ``quality_flags`` and ``trimmed``.
"""

LEGACY_SCHEMA_VERSION = 1

FLAGS_COLUMN = "quality_flags"
"""The column of a record's data-quality flags (:data:`QUALITY_FEATURES`, ``pipeline.quality``);
null in records written without them, whose flags are computed when they are read."""

QUALITY_FEATURES = {
    "draft": List(Value("string")),
    "revision": List(Value("string")),
    "feedback": List(List(Value("string"))),
}
"""One record's flags: the reason codes of the draft, of the revision and of each neighbour's reason
(an empty list: a clean text)."""

TRIMMED_FEATURES = {
    "draft": Value("bool"),
    "revision": Value("bool"),
    "feedback": List(Value("bool")),
}
"""Which texts were cut back to their last complete sentence (the model stopped mid-sentence)."""

FEEDBACK_FEATURES = {
    "agent_id": Value("int32"),
    "rating": Value("float32"),  # null when the neighbour's answer held no readable rating
    "reason": Value("string"),
    "raw": Value("string"),
}

RECORD_FEATURES = Features(
    {
        "run_id": Value("string"),
        "world_id": Value("string"),
        "round": Value("int32"),
        "agent_id": Value("int32"),
        "stance": Value("string"),
        "question": Value("string"),
        "draft": Value("string"),
        "feedback": List(FEEDBACK_FEATURES),
        "revision": Value("string"),
        "scores": {name: Value("float32") for name in SCORE_FIELDS},
        "observer_reasons": {name: Value("string") for name in SCORE_FIELDS},
        "status": Value("string"),  # "ok" | "failed"
        "error": Value("string"),
        "agent_model": Value("string"),
        "observer_model": Value("string"),
        "prompt_version": Value("string"),
        "prompt_tokens": Value("int64"),
        "completion_tokens": Value("int64"),
        "calls": Value("int32"),
        "schema_version": Value("int32"),
        FLAGS_COLUMN: QUALITY_FEATURES,
        "trimmed": TRIMMED_FEATURES,
    }
)
"""One row per back-scatter interaction. Every score and rating is nullable: a rating that
could not be read is stored as null, never as a stand-in number."""


_ADDED_IN = {2: ("schema_version",), 3: (FLAGS_COLUMN, "trimmed")}
"""The columns each schema version added."""


def record_features(version: int = SCHEMA_VERSION) -> Features:
    """The Arrow layout of records of ``version`` (a run keeps the layout it was started with)."""
    if not LEGACY_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
        raise ValueError(f"unknown record schema version {version}")
    later = {name for added, names in _ADDED_IN.items() if added > version for name in names}
    return Features({k: v for k, v in RECORD_FEATURES.items() if k not in later})


def new_record(
    *,
    run_id: str,
    world_id: str,
    round: int | None,  # the column's name; shadows the builtin only here
    agent_id: int | None,
    stance: str | None,
    question: str,
    agent_model: str | None,
    observer_model: str | None,
    prompt_version: str,
    draft: str | None = None,
    feedback: Sequence[Mapping[str, Any]] = (),
    revision: str | None = None,
    scores: Mapping[str, float | None] | None = None,
    observer_reasons: Mapping[str, str | None] | None = None,
    status: str = "ok",
    error: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    calls: int | None = None,
    quality_flags: Mapping[str, Any] | None = None,
    trimmed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A record with every column of ``RECORD_FEATURES`` (keywords are the column names); scores
    and observer reasons not given are null. ``feedback`` items are ``FEEDBACK_FEATURES`` mappings;
    ``quality_flags`` and ``trimmed`` are :data:`QUALITY_FEATURES` and :data:`TRIMMED_FEATURES`
    mappings (null: not known).
    """
    for name, given in (("scores", scores), ("observer_reasons", observer_reasons)):
        unknown = sorted(set(given or ()) - set(SCORE_FIELDS))
        if unknown:
            raise ValueError(f"unknown {name} field(s) {unknown}; expected {', '.join(SCORE_FIELDS)}")
    return {
        "run_id": run_id,
        "world_id": world_id,
        "round": round,
        "agent_id": agent_id,
        "stance": stance,
        "question": question,
        "draft": draft,
        "feedback": [dict(item) for item in feedback],
        "revision": revision,
        "scores": dict.fromkeys(SCORE_FIELDS) | dict(scores or {}),
        "observer_reasons": dict.fromkeys(SCORE_FIELDS) | dict(observer_reasons or {}),
        "status": status,
        "error": error,
        "agent_model": agent_model,
        "observer_model": observer_model,
        "prompt_version": prompt_version,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "calls": calls,
        "schema_version": SCHEMA_VERSION,
        FLAGS_COLUMN: None if quality_flags is None else dict(quality_flags),
        "trimmed": None if trimmed is None else dict(trimmed),
    }
