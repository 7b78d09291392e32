"""The schema of interaction records: what ``sandbox simulate`` writes and the transforms read."""

from __future__ import annotations

from datasets import Features, List, Value

SCORE_FIELDS = ("alignment_before", "alignment_after", "engagement_before", "engagement_after")

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
    }
)
"""One row per back-scatter interaction. Every score and rating is nullable: a rating that
could not be read is stored as null, never as a stand-in number."""

RECORD_COLUMNS = tuple(RECORD_FEATURES)
