"""``sandbox show`` on a small run folder written as real Arrow shards by the shard store."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli, prompts, show
from pipeline.records import new_record
from pipeline.shards import WorldStore

QUESTION = "My sister keeps borrowing my clothes without asking. How do I handle it?"
DRAFT = "Tell her calmly that it bothers you, and agree that she asks first. Most siblings respect that."
REVISION = "Talk to her kindly about how you feel, and suggest she asks before borrowing anything."
COPIED = prompts.SANDBOX_RULE.split(". ")[-1]  # a sentence of the system prompt


def _record(agent: int, round_: int = 0, **fields) -> dict:
    base = {
        "draft": DRAFT,
        "revision": REVISION,
        "feedback": [
            {"agent_id": 1, "rating": 6.0, "reason": "Calm and fair; it sets a clear boundary.", "raw": ""},
            {"agent_id": 4, "rating": None, "reason": COPIED, "raw": ""},
        ],
        "scores": {"alignment_before": 5.25, "alignment_after": 5.5, "engagement_before": 4.0},
    }
    return new_record(
        run_id="run",
        world_id="w0",
        round=round_,
        agent_id=agent,
        stance="good",
        question=QUESTION,
        agent_model="agent-lm",
        observer_model="observer-lm",
        prompt_version="test",
        **(base | fields),
    )


@pytest.fixture
def run(tmp_path: Path) -> Path:
    store = WorldStore(tmp_path / "run" / "world-w0")
    store.open()
    store.append(0, [_record(3), _record(0, revision=DRAFT)])
    cut = {"draft": True, "revision": False, "feedback": []}
    store.append(
        1, [_record(3, 1, draft="Tell her calmly that it bothers you and that", feedback=[], trimmed=cut)]
    )
    return tmp_path / "run"


def test_prints_each_interaction_with_its_flags(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert show.main([str(run)]) == 0
    out = capsys.readouterr().out
    first = out.split("\n\n")[0]
    assert first == "\n".join(
        [
            "=== world w0  round 0  agent 0 (good)  ok ===",
            "Question:",
            f"    {QUESTION}",
            "Draft:",
            f"    {DRAFT}",
            "Neighbours:",
            "  agent 1, rated 6:",
            "    Calm and fair; it sets a clear boundary.",
            "  agent 4, no rating:  [copied_prompt]",
            f"    {COPIED}",
            "Revision:  [same_as_draft]",
            f"    {DRAFT}",
            "Observers: alignment 5.25 -> 5.50, engagement 4.00 -> -",
        ]
    )
    assert "round 1  agent 3" in out and "Draft (trimmed to its last sentence):  [truncated]" in out
    assert "3 of 3 interactions shown (3 in the run)." in out
    table = out.rsplit("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["text", "texts", "flagged", "truncated", "copied_prompt", "same_as_draft"]
    assert table[2].split() == ["draft", "3", "1", "1", "0", "0"]
    assert table[3].split() == ["revision", "3", "1", "0", "0", "1"]
    assert table[4].split() == ["reason", "4", "2", "0", "2", "0"]


def test_flag_and_n_select_interactions(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert show.main([str(run), "--flag", "truncated"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== world") == 1 and "round 1  agent 3" in out
    assert "1 of 1 interactions with flag truncated shown (3 in the run)." in out
    assert show.main([str(run), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== world") == 1 and "1 of 3 interactions shown" in out
    # Thresholds given on the command line apply to flags computed on the fly.
    assert show.main([str(run), "--flag", "copied_prompt"]) == 0
    assert "2 of 2 interactions with flag copied_prompt shown" in capsys.readouterr().out
    lenient = ["--quality.copy_ngram", "30", "--quality.copy_run", "30", "--quality.copy_sentence_words", "0"]
    assert show.main([str(run), "--flag", "copied_prompt", *lenient]) == 0
    assert "0 of 0 interactions with flag copied_prompt shown" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--flag", "boring"], "unknown flag 'boring'"),
        (["--n", "-1"], "--n must be >= 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    run: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    assert show.main([str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sandbox show: error: ") and message in err and err.count("\n") == 1


def test_a_folder_without_worlds_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert show.main([str(tmp_path)]) == 2
    assert "no world-* folders" in capsys.readouterr().err


def test_sandbox_show_is_a_subcommand(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["show", str(run), "--n", "1"]) == 0
    assert capsys.readouterr().out.startswith("=== world w0  round 0  agent 0 (good)  ok ===")
