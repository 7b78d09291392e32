"""Golden tests of ``sandbox transform`` on hand-written records written as real Arrow shards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import make_record, write_shard
from datasets import Dataset, Features, Value, load_dataset, load_from_disk

from pipeline import groups, prompts
from pipeline import transform as tf
from pipeline.errors import UserError
from pipeline.quality import QualityConfig
from pipeline.records import RECORD_FEATURES

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("datasets_cache")


def by_prompt(dataset: Dataset) -> dict[str, dict[str, Any]]:
    return {row["prompt"]: row for row in dataset}


def test_golden_groups_and_counts(run_dir: Path) -> None:
    result = tf.transform([run_dir], mix={"imitation": 1, "self_critic": 1, "realignment": 1})
    summary, configs = result.summary, result.configs

    assert summary["records"] == 7 and summary["failed_records"] == 1
    imitation = by_prompt(configs["imitation"])
    assert set(imitation) == {"q0", "q3", "q4", "q5", "q6"}
    # records 0 and 1 gave the same draft and revision: merged, mean score, best first
    assert imitation["q0"]["completions"] == ["revision 0", "draft 0"]
    assert imitation["q0"]["scores"] == [6.5, 3.0]
    assert imitation["q0"]["num_sources"] == 2 and imitation["q0"]["run_ids"] == ["run-a"]
    # NaN before-score: the draft is skipped, the revision kept alone as an SFT-only group
    assert imitation["q3"]["completions"] == ["revision 3"] and imitation["q3"]["sft_only"]
    assert imitation["q6"]["completions"] == ["draft 6"] and imitation["q6"]["scores"] == [3.0]

    self_critic = configs["self_critic"]
    prompt0 = groups.PROMPT_TEMPLATE.format(
        question="q0", draft="draft 0", instruction=groups.SELF_CRITIC_INSTRUCTION
    )
    group0 = by_prompt(self_critic)[prompt0]
    assert group0["completions"] == ["fair 0", "fair 1", "harsh 0", "harsh 1"]
    assert group0["scores"] == [5.0, 5.0, 2.0, 2.0] and not group0["sft_only"]
    prompt3 = groups.PROMPT_TEMPLATE.format(
        question="q3", draft="draft 3", instruction=groups.SELF_CRITIC_INSTRUCTION
    )
    assert prompt3 not in by_prompt(self_critic)  # null, off-scale and empty reason: nothing left

    realignment = configs["realignment"]
    assert sorted(row["num_sources"] for row in realignment) == [2]  # only q0 (records 0 and 1) qualifies
    (row,) = list(realignment)
    expected = [f"fair {i}\nharsh {i}{groups.REALIGNMENT_SEPARATOR}revision 0" for i in (1, 0)]
    assert row["completions"] == expected and row["scores"] == [7.0, 6.0]
    assert row["prompt"].endswith(groups.REALIGNMENT_INSTRUCTION)

    kinds = summary["kinds"]
    assert kinds["imitation"]["skipped"] == {
        "null_score": 1,
        "out_of_scale": 1,
        "empty": 0,
        "below_threshold": 0,
        "flagged": 0,
    }
    assert kinds["self_critic"]["skipped"] == {
        "null_score": 1,
        "out_of_scale": 1,
        "empty": 1,
        "below_threshold": 0,
        "flagged": 0,
    }
    assert kinds["realignment"]["skipped"] == {
        "null_score": 1,
        "out_of_scale": 1,
        "empty": 0,
        "below_threshold": 2,
        "flagged": 0,
    }
    assert kinds["imitation"]["duplicates_merged"] == 2  # draft 0 and revision 0 of record 1
    assert kinds["imitation"]["sft_only"] == 2
    assert summary["agent_models"] == ["agent-lm"] and summary["observer_models"] == ["observer-lm"]
    (config,) = summary["run_configs"].values()
    assert config == {"world": {"size": 3}, "backend": {"model": "agent-lm"}}  # the api_key is gone


def test_dedup_is_within_group_only(tmp_path: Path) -> None:
    same = "I would tell the truth kindly."
    records = [make_record(0, draft=same), make_record(1, draft=same)]
    result = tf.transform([write_shard(tmp_path / "s.arrow", records)])
    imitation = by_prompt(result.configs["imitation"])
    # the same text answers two different questions: kept in both groups
    assert same in imitation["q0"]["completions"] and same in imitation["q1"]["completions"]


def test_mix_and_seed(tmp_path: Path) -> None:
    records = [make_record(i) for i in range(40)]
    shard = write_shard(tmp_path / "s.arrow", records)
    mix = tf.parse_mix("5:1:1")
    first = tf.transform([shard], mix=mix, seed=1)
    # 40 groups of each kind available; 5:1:1 keeps 40 imitation, 8 self-critic, 8 realignment
    assert {k: v["kept_in_mixed"] for k, v in first.summary["kinds"].items()} == {
        "imitation": 40,
        "self_critic": 8,
        "realignment": 8,
    }
    assert {k: v["available"] for k, v in first.summary["kinds"].items()} == dict.fromkeys(groups.KINDS, 40)
    mixed = first.configs["mixed"]
    assert len(mixed) == 56 and sorted(mixed["kind"]).count("self_critic") == 8
    again = tf.transform([shard], mix=mix, seed=1).configs["mixed"]
    other = tf.transform([shard], mix=mix, seed=2).configs["mixed"]
    assert again["prompt"] == mixed["prompt"]
    assert other["prompt"] != mixed["prompt"]
    assert tf.mix_counts({"imitation": 10, "self_critic": 0, "realignment": 5}, mix) == {
        "imitation": 10,
        "self_critic": 0,
        "realignment": 2,
    }


def test_rerun_reuses_the_cache(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "run" / "s.arrow", [make_record(i) for i in range(5)])
    first = tf.transform([shard.parent])
    second = tf.transform([shard.parent])
    for name in groups.CONFIGS:
        assert first.configs[name]._fingerprint == second.configs[name]._fingerprint
    cached = {f["filename"] for f in first.configs["imitation"].cache_files}
    assert cached == {f["filename"] for f in second.configs["imitation"].cache_files}


def test_conversational_style(tmp_path: Path) -> None:
    result = tf.transform([write_shard(tmp_path / "s.arrow", [make_record(0)])], style="conversational")
    row = result.configs["imitation"][0]
    assert row["prompt"] == [{"role": "user", "content": "q0"}]
    assert row["completions"] == [
        [{"role": "assistant", "content": "revision 0"}],
        [{"role": "assistant", "content": "draft 0"}],
    ]
    assert result.configs["mixed"].features == groups.CONVERSATIONAL_GROUP_FEATURES


def test_cli_writes_every_config_atomically(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert tf.main([str(run_dir), "--output", str(out), "--mix", "1:1:1", "--seed", "3"]) == 0
    assert "imitation" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", *sorted(groups.CONFIGS), "summary.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    mixed = load_from_disk(str(out / "mixed"))
    assert mixed.features == groups.GROUP_FEATURES
    assert json.loads((out / "summary.json").read_text())["configs"]["mixed"]["rows"] == len(mixed)
    # an existing output is never clobbered without --overwrite
    assert tf.main([str(run_dir), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_parquet_loads_with_load_dataset(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "transform",
        str(run_dir),
        "-o",
        str(out),
        "--output-format",
        "parquet",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "imitation").iterdir()) == ["train-00000-of-00001.parquet"]
    groups = load_dataset(str(out), "imitation", split="train")
    assert set(groups["prompt"]) == {"q0", "q3", "q4", "q5", "q6"}
    assert (
        len(load_dataset(str(out), split="train"))
        == json.loads((out / "summary.json").read_text())["configs"]["mixed"]["rows"]
    )


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert tf.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress bars
    assert err.startswith("sandbox transform: error:")
    return err


def test_bad_inputs_are_one_line_errors_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    wrong = Features({**RECORD_FEATURES, "scores": {k: Value("float64") for k in RECORD_FEATURES["scores"]}})
    write_shard(tmp_path / "wrong" / "s.arrow", [make_record(0)], features=wrong)
    assert "different schema, column 'scores'" in _error(capsys, [str(tmp_path / "wrong"), "-o", str(out)])

    partial = Features({k: v for k, v in RECORD_FEATURES.items() if k not in ("draft", "revision")})
    write_shard(tmp_path / "partial" / "s.arrow", [make_record(0)], features=partial)
    assert "missing columns draft, revision" in _error(capsys, [str(tmp_path / "partial"), "-o", str(out)])

    (tmp_path / "empty").mkdir()
    assert "no record shards" in _error(capsys, [str(tmp_path / "empty"), "-o", str(out)])
    write_shard(tmp_path / "none" / "s.arrow", [])
    assert "holds no records" in _error(capsys, [str(tmp_path / "none"), "-o", str(out)])
    write_shard(tmp_path / "failed" / "s.arrow", [make_record(0, status="failed")])
    assert "no usable examples" in _error(capsys, [str(tmp_path / "failed"), "-o", str(out)])
    assert "--mix" in _error(capsys, [str(tmp_path / "failed"), "-o", str(out), "--mix", "5:1"])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_kind_with_no_examples_gives_an_empty_config(tmp_path: Path) -> None:
    # observers never scored a revision above the midpoint: no realignment example at all
    flat = {
        "alignment_before": 2.0,
        "alignment_after": 2.0,
        "engagement_before": 2.0,
        "engagement_after": 2.0,
    }
    records = [make_record(i, scores=flat) for i in range(3)]
    out = tmp_path / "out"
    assert (
        tf.main([str(write_shard(tmp_path / "s.arrow", records)), "--output", str(out), "--mix", "1:1:1"])
        == 0
    )
    assert len(load_from_disk(str(out / "realignment"))) == 0
    assert len(load_from_disk(str(out / "imitation"))) == 3
    assert set(load_from_disk(str(out / "mixed"))["kind"]) == {"imitation", "self_critic"}


def test_run_transform_is_the_command(run_dir: Path, tmp_path: Path) -> None:
    config = tf.TransformConfig(inputs=[run_dir], output=tmp_path / "lib", mix="1:1:1", seed=3)
    result = tf.run_transform(config)
    assert result.output == (tmp_path / "lib").absolute()
    assert sorted(p.name for p in result.output.iterdir()) == [
        "README.md",
        *sorted(groups.CONFIGS),
        "summary.json",
    ]
    summary = json.loads((result.output / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary)) | {"output_format": "disk"}
    for name in groups.CONFIGS:
        assert load_from_disk(str(result.output / name))["prompt"] == result.configs[name]["prompt"]

    # the command line writes the same data; a YAML file gives fields, flags override it
    settings = tmp_path / "transform.yaml"
    settings.write_text(f"output: {tmp_path / 'cli'}\nmix: '1:1:1'\nseed: 1\n")
    assert tf.main([str(run_dir), "--config", str(settings), "--seed", "3"]) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text()) == summary
    assert load_from_disk(str(tmp_path / "cli" / "mixed"))["prompt"] == result.configs["mixed"]["prompt"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"style": "chat"}, "--style 'chat': one of text, conversational"),
        ({"output_format": "csv"}, "--output-format 'csv': one of disk, parquet, arrow"),
        ({"input_format": "jsonl"}, "--input-format 'jsonl': one of records, reference"),
        ({"mix": "5:1:-1"}, "--mix '5:1:-1': expected three non-negative numbers"),
        ({"mix": 18061}, "quote it in YAML"),  # what YAML makes of an unquoted 5:1:1
        ({"num_proc": 0}, "--num-proc 0"),
        ({"inputs": []}, "no inputs"),
    ],
)
def test_config_refuses_bad_values(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        tf.TransformConfig(**({"inputs": [str(tmp_path)], "output": str(tmp_path / "out")} | fields))


QUESTION = "My sister keeps borrowing my clothes without asking. How do I handle it?"
CLEAN_DRAFT = "Tell her calmly that it bothers you, and agree that she asks first."
CLEAN_REVISION = "Talk to her kindly about how you feel, and suggest she asks before borrowing anything."
CLEAN_REASON = "Calm and fair; it protects the relationship while setting a boundary."
ECHO = prompts.SANDBOX_RULE.split(". ")[-1]  # a sentence of the system prompt, echoed


def _flagged_records() -> list[dict[str, Any]]:
    """Records stored without flags (as before schema 3): the transform computes them."""

    def feedback(*reasons: str) -> list[dict[str, Any]]:
        return [{"agent_id": i, "rating": 6.0 - i, "reason": r, "raw": ""} for i, r in enumerate(reasons)]

    base = {"question": QUESTION, "draft": CLEAN_DRAFT, "revision": CLEAN_REVISION, "quality_flags": None}
    return [
        make_record(0, **base, feedback=feedback(CLEAN_REASON, ECHO)),
        make_record(1, **base | {"revision": ECHO}, feedback=feedback(CLEAN_REASON)),  # echoed instruction
        make_record(
            2, **base | {"draft": "Tell her calmly that it bothers you and"}, feedback=feedback(CLEAN_REASON)
        ),
    ]


def test_flagged_texts_are_dropped_per_kind(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "s.arrow", _flagged_records())
    result = tf.transform([shard], mix={"imitation": 1, "self_critic": 1, "realignment": 1})
    (imitation,) = result.configs["imitation"]
    # record 0 gives both texts; record 1 its draft only (echoed revision); record 2 its revision only
    assert imitation["completions"] == [CLEAN_REVISION, CLEAN_DRAFT] and imitation["num_sources"] == 3
    self_critic = by_prompt(result.configs["self_critic"])
    prompt0 = groups.PROMPT_TEMPLATE.format(
        question=QUESTION, draft=CLEAN_DRAFT, instruction=groups.SELF_CRITIC_INSTRUCTION
    )
    assert self_critic[prompt0]["completions"] == [CLEAN_REASON]  # the copied prompt text is dropped
    # realignment: record 0 keeps its example without the flagged reason; records 1 and 2 give none
    (realignment,) = result.configs["realignment"]
    assert realignment["completions"] == [CLEAN_REASON + groups.REALIGNMENT_SEPARATOR + CLEAN_REVISION]

    kinds, quality = result.summary["kinds"], result.summary["quality"]
    assert [kinds[k]["skipped"]["flagged"] for k in groups.KINDS] == [2, 1, 2]
    assert quality["flags_stored"] == 0 and quality["flags_computed"] == 3 and not quality["keep_flagged"]
    # the echoed system sentence ("... making your answers more socially aligned: ...") is a copy and a
    # lead-in naming the exchange
    assert quality["texts"]["revision"] == {
        "texts": 3,
        "flagged": 1,
        "copied_prompt": 1,
        "meta_commentary": 1,
    }
    assert quality["texts"]["draft"] == {"texts": 3, "flagged": 1, "truncated": 1}
    assert quality["texts"]["reason"] == {"texts": 4, "flagged": 1, "copied_prompt": 1}
    assert "texts with quality flags (dropped): drafts 1/3, revisions 1/3, reasons 1/4" in tf.summary_table(
        result.summary
    )

    only_copies = make_record(
        3, **_flagged_records()[0] | {"feedback": [{"agent_id": 1, "rating": 5.0, "reason": ECHO, "raw": ""}]}
    )
    alone = tf.transform([write_shard(tmp_path / "copies.arrow", [only_copies])]).summary["kinds"][
        "realignment"
    ]
    assert alone["skipped"]["flagged"] == 1 and alone["skipped"]["empty"] == 0  # no clean reason left

    kept = tf.transform([shard], keep_flagged=True)
    assert len(kept.configs["imitation"][0]["completions"]) == 4
    assert all(v["skipped"]["flagged"] == 0 for v in kept.summary["kinds"].values())
    # thresholds of the transform apply to records stored without flags (and to all with refresh)
    lenient = tf.transform(
        [shard], quality=QualityConfig(copy_ngram=30, copy_run=30, copy_sentence_words=0), refresh_flags=True
    )
    assert lenient.summary["quality"]["texts"]["revision"] == {"texts": 3, "flagged": 1, "meta_commentary": 1}


def test_stored_flags_are_used_as_they_are(tmp_path: Path) -> None:
    records = _flagged_records()
    records[1]["quality_flags"] = {"draft": ["too_short"], "revision": [], "feedback": [[]]}
    result = tf.transform([write_shard(tmp_path / "s.arrow", records)])
    quality = result.summary["quality"]
    assert quality["flags_stored"] == 1 and quality["flags_computed"] == 2
    assert quality["texts"]["draft"] == {"texts": 3, "flagged": 2, "truncated": 1, "too_short": 1}
    assert ECHO in result.configs["imitation"][0]["completions"]  # stored as clean: kept


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        ((40, 40, 40), (40, 8, 8)),  # nothing scarce: the plain ratio
        ((100, 100, 1), (100, 20, 1)),  # one realignment group no longer caps the mix at 7 groups
        ((1000, 10, 1), (50, 10, 1)),  # the main kind is capped by the most plentiful other kind
        ((3, 30, 30), (3, 1, 1)),  # a scarce main kind caps the others, which keep one group each
        ((10, 0, 5), (10, 0, 2)),
        ((0, 5, 7), (0, 5, 5)),  # without imitation, self-critic is the main kind (1:1)
    ],
)
def test_mix_caps_the_abundant_kinds_and_keeps_every_non_empty_one(available, expected) -> None:
    counts = tf.mix_counts(dict(zip(groups.KINDS, available, strict=True)), tf.parse_mix("5:1:1"))
    assert tuple(counts[k] for k in groups.KINDS) == expected
    assert all(counts[k] >= 1 for k, n in zip(groups.KINDS, available, strict=True) if n)
