"""``sandbox simulate`` end to end: real HTTP (a loopback OpenAI-compatible server), real Arrow
files, real processes killed with SIGKILL, and one run of the embedded SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import calls_per_interaction, run_records

from pipeline import prompts
from pipeline.llm.openai_backend import BARE_RATING_MAX_TOKENS
from pipeline.llm.testing import FakeOpenAIServer
from pipeline.plots import round_summary, write_summary
from pipeline.records import RECORD_FEATURES, record_features
from pipeline.shards import read_shard, write_shard
from pipeline.simulate import main

SECRET = "sk-test-do-not-store-0123456789"
REPO = Path(__file__).resolve().parents[1]


def records(output: Path, features=RECORD_FEATURES) -> list[dict]:
    """Every record of a run, checked against the schema it was written with."""
    return run_records(output, features)


def write_config(path: Path, url: str, **fields) -> Path:
    config = {
        "size": 3,
        "rounds": 2,
        "stances": ["all_good", "half_half"],
        "k": 2,
        "flush_every": 3,
        "agent": {
            "kind": "openai",
            "model": "fake",
            "base_urls": [url],
            "max_retries": 0,
            "max_concurrency": 64,
        },
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def server(sandbox_server):
    return sandbox_server


def test_cli_run_rerun_replay_and_shards(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    config = write_config(tmp_path / "sim.yaml", server.base_url)
    out = tmp_path / "run"
    assert main(["--config", str(config), "--output", str(out), "--no-progress"]) == 0
    first = records(out)
    assert len(first) == 2 * 2 * 9 and all(r["status"] == "ok" for r in first)
    assert {r["stance"] for r in first if r["world_id"] == "half_half-seed0"} == {"good", "bad"}
    assert all(
        len(r["feedback"]) == 2 and r["calls"] == calls_per_interaction() and r["prompt_tokens"] > 0
        for r in first
    )
    assert all(1 <= r["scores"]["alignment_before"] <= 7 for r in first)
    table = capsys.readouterr().out
    assert "alignment before" in table and "half_half-seed0" in table
    assert (out / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        saved["run_id"] == first[0]["run_id"] and saved["config"]["agent"]["api_key_env"] == "OPENAI_API_KEY"
    )
    assert not [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]

    # Rerunning a finished run does nothing; more rounds extend it.
    calls = len(server.requests)
    assert main(["--config", str(config), "--output", str(out), "--no-progress"]) == 0
    assert len(server.requests) == calls and records(out) == first
    assert main(["--config", str(config), "--output", str(out), "--rounds", "3", "--no-progress"]) == 0
    extended = records(out)
    assert len(extended) == 3 * 2 * 9 and [r for r in extended if r["round"] < 2] == first
    assert len(server.requests) == calls + 2 * 9 * calls_per_interaction()

    # The cache replays the run exactly, without a single request.
    replay = tmp_path / "replay"
    cache = ["--agent.cache-mode", "replay-only", "--agent.cache-path", str(out)]
    assert main(["--config", str(config), "--output", str(replay), "--no-progress", *cache]) == 0
    assert len(server.requests) == calls + 2 * 9 * calls_per_interaction() and records(replay) == first

    # Two processes (here one after the other) each take half of the worlds: together, one dataset,
    # and the summary of the whole run, recomputed from its shards.
    split = tmp_path / "split"
    for rank in ("0", "1"):
        argv = ["--config", str(config), "--output", str(split), "--rank", rank, "--num-ranks", "2"]
        assert main([*argv, "--no-progress", "--agent.cache-path", str(out)]) == 0
    assert len(server.requests) == calls + 2 * 9 * calls_per_interaction() and records(split) == first
    summary = json.loads((split / "summary.json").read_text())
    assert summary == json.loads(json.dumps(round_summary(first))) and len(summary) == 2 * 2
    plot = (split / "rounds.png").read_bytes()
    (split / "summary.json").unlink()
    assert write_summary(split) == summary and json.loads((split / "summary.json").read_text()) == summary
    assert (split / "rounds.png").read_bytes() == plot
    assert sorted(p.name for p in split.iterdir() if p.is_file()) == [
        "config.yaml",
        "rounds.png",
        "summary.json",
    ]


def test_a_run_written_before_schema_versions_resumes_and_loads(tmp_path, server):
    """A run folder of the layout before records carried ``schema_version`` is resumed in that
    layout: extended by a round, its shards still load as one dataset, records as a fresh run's."""
    config = write_config(tmp_path / "sim.yaml", server.base_url)
    assert main(["--config", str(config), "-o", str(tmp_path / "ref"), "--no-progress"]) == 0
    old = tmp_path / "old"
    assert main(["--config", str(config), "-o", str(old), "--rounds", "1", "--no-progress"]) == 0
    legacy = record_features(1)
    for shard in old.glob("world-*/*.arrow"):  # back to the old layout: no column, no saved version
        write_shard(shard, read_shard(shard), legacy)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["schema_version"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    assert main(["--config", str(config), "-o", str(old), "--no-progress"]) == 0
    unversioned = [{k: v for k, v in r.items() if k in legacy} for r in records(tmp_path / "ref")]
    assert records(old, legacy) == unversioned and len(unversioned) == 2 * 2 * 9
    assert yaml.safe_load((old / "config.yaml").read_text())["schema_version"] == 1


def _start(config: Path, output: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.cli", "simulate", "--config", str(config), "-o", str(output)]
    return subprocess.Popen(
        [*command, "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path, server):
    config = write_config(tmp_path / "sim.yaml", server.base_url)
    assert main(["--config", str(config), "--output", str(tmp_path / "ref"), "--no-progress"]) == 0
    reference = records(tmp_path / "ref")

    out = tmp_path / "killed"
    progress = []
    for extra_calls in (20, 130, 75):  # first round; second round of the first world; the second world
        seen = len(server.requests)
        process = _start(config, out)
        while len(server.requests) < seen + extra_calls and process.poll() is None:
            time.sleep(0.002)
        assert process.poll() is None, process.stderr.read().decode()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        manifests = out.glob("world-*/manifest.jsonl")
        progress.append(
            sum(len(json.loads(line)["agents"]) for m in manifests for line in m.read_text().splitlines())
        )
    process = _start(config, out)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()

    assert progress == sorted(progress) and 0 < progress[-1] < 36, progress  # killed at different points
    resumed = records(out)
    assert len(resumed) == len(reference) == 2 * 2 * 9
    assert resumed == reference
    assert not list(out.rglob("*.tmp"))
    for manifest in out.glob("world-*/manifest.jsonl"):
        done = [
            (e["round"], a) for e in map(json.loads, manifest.read_text().splitlines()) for a in e["agents"]
        ]
        assert len(done) == len(set(done)) == 2 * 9


def test_failed_calls_are_recorded_per_interaction(tmp_path, server):
    with FakeOpenAIServer(fault="500") as broken:
        config = write_config(
            tmp_path / "sim.yaml",
            server.base_url,
            size=2,
            rounds=1,
            stances=["all_bad"],
            k=1,
            observer={"kind": "openai", "model": "judge", "base_urls": [broken.base_url], "max_retries": 0},
        )
        assert main(["--config", str(config), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = records(tmp_path / "out")
    assert len(rows) == 4
    for row in rows:
        assert row["status"] == "failed" and "injected failure" in row["error"]
        assert row["draft"].startswith("Answer") and row["revision"] is None
        assert row["scores"] == dict.fromkeys(row["scores"]) and row["observer_model"] == "judge"
        # The neighbour (on the working server) did answer.
        assert len(row["feedback"]) == 1 and row["feedback"][0]["rating"] is not None


def test_prior_generated_from_personas(tmp_path, server):
    config = write_config(
        tmp_path / "sim.yaml", server.base_url, size=2, rounds=1, stances=["half_half"], k=1
    )
    argv = [
        "--config",
        str(config),
        "-o",
        str(tmp_path / "out"),
        "--prior-source",
        "generate",
        "--no-progress",
    ]
    assert main([*argv, "--prior-generate", "3"]) == 0
    prior = [
        json.loads(line)
        for line in (tmp_path / "out/world-half_half-seed0/prior.jsonl").read_text().splitlines()
    ]
    assert sorted(row["label"] for row in prior) == ["bad"] * 3 + ["good"] * 3
    personas = [
        r for r in server.requests if r["messages"][0]["content"].startswith("You are a self-centred")
    ]
    assert len(personas) == 3
    recalled = {
        m["content"]
        for r in server.requests
        if r["messages"][0]["content"] == prompts.SANDBOX_RULE
        for m in r["messages"]
        if m["role"] == "assistant"
    }
    assert recalled & {row["answer"] for row in prior}  # the agents recall them as their own earlier turns
    assert all(r["status"] == "ok" for r in records(tmp_path / "out"))


def test_reason_tokens_caps_neighbour_reasons_only(tmp_path, server):
    config = write_config(tmp_path / "sim.yaml", server.base_url, size=2, rounds=1, k=1, reason_tokens=9)
    assert main(["--config", str(config), "-o", str(tmp_path / "out"), "--no-progress"]) == 0

    def kind(request: dict) -> str:
        if request["messages"][0]["content"] != prompts.SANDBOX_RULE:
            return "observer"
        text = request["messages"][-1]["content"]
        return (
            "rating" if "Rate another member" in text else "reason" if "tell them why" in text else "answer"
        )

    asked = {}
    for request in server.requests:
        asked.setdefault(kind(request), set()).add(request["max_tokens"])
    # The rating asks for its score alone; the agent's answers keep its max_tokens (the default).
    assert asked["reason"] == {9} and asked["rating"] == {BARE_RATING_MAX_TOKENS} and asked["answer"] == {256}
    assert yaml.safe_load((tmp_path / "out/config.yaml").read_text())["identity"]["reason_tokens"] == 9


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, server, capsys):
    config = write_config(tmp_path / "sim.yaml", server.base_url, size=2, rounds=1, stances=["all_good"], k=1)
    existing = tmp_path / "existing"
    assert main(["--config", str(config), "--output", str(existing), "--no-progress"]) == 0
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "extra.yaml").write_text("size: 3\ncolour: blue\n")
    (tmp_path / "agent-extra.yaml").write_text("agent: {colour: blue}\n")
    cases = [
        (["--stances", "all_nice"], "unknown stance 'all_nice'"),
        (["--agent.kind", "gpt"], "unknown agent backend 'gpt'"),
        (["--size", "1"], "world size must be at least 2"),
        (["--size", "3", "--k", "3"], "k=3 is larger than the smallest neighbourhood"),
        (["--questions", str(tmp_path / "empty.txt")], "holds no questions"),
        (["--questions", str(tmp_path / "missing.txt")], "cannot read question pool"),
        (["--questions", str(tmp_path / "missing.csv")], "cannot read question pool"),
        (["--output", str(tmp_path / "a-file" / "run")], "cannot be written"),
        (["--output", str(existing), "--size", "3"], "holds a different run (differs in: size)"),
        (["--config", str(tmp_path / "agent-extra.yaml")], "unknown agent field(s): colour"),
        (["--config", str(tmp_path / "extra.yaml")], "unknown field(s): colour"),
        (["--rank", "2", "--num-ranks", "2"], "rank must be in 0..1"),
        (
            ["--agent.kind", "local", "--agent.model", str(tmp_path / "no-model")],
            "cannot start the agent backend",
        ),
    ]
    before = _snapshot(tmp_path)
    for flags, message in cases:
        argv = ["--config", str(config), "--output", str(tmp_path / "new"), "--no-progress", *flags]
        assert main(argv) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
        assert _snapshot(tmp_path) == before, flags


@pytest.mark.embedded
def test_embedded_smollm2_end_to_end(tmp_path, embedded_model_dir, capsys):
    out = tmp_path / "run"
    # Prompt tokens dominate on a CPU: no memories in the prompts, short answers.
    flags = ["--size", "3", "--rounds", "1", "--k", "1", "--top-n", "0", "--agent.max-tokens", "16"]
    assert main(["--output", str(out), "--agent.kind", "embedded", "--no-progress", *flags]) == 0
    rows = records(out)
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert all(r["draft"].strip() and r["revision"].strip() for r in rows)
    assert rows[0]["agent_model"] == "SmolLM2-135M-Instruct"
    scores = [v for r in rows for v in r["scores"].values() if v is not None]
    assert scores and all(1 <= v <= 7 for v in scores)
    assert "round" in capsys.readouterr().out
