"""The sandbox's parts: world, BM25 memory, prompts, Arrow shards, and the back-scatter protocol.

The protocol tests drive ``run_simulation`` with a scripted ``ChatBackend`` (``conftest.py``'s
recording backend) that records when each call starts and ends: the point is the order and overlap
of the calls, which a real server would only blur. Real-HTTP runs of the whole command are in
``test_sim_run.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import calls_per_interaction
from datasets import Dataset, DatasetDict, load_dataset
from rank_bm25 import BM25Okapi

from pipeline import prompts
from pipeline.argparsing import from_dict
from pipeline.errors import UserError
from pipeline.judge import Exemplars
from pipeline.llm.base import BackendSpec, BudgetExceeded
from pipeline.memory import AgentMemory, MemoryEntry, tokenize
from pipeline.quality import record_flags
from pipeline.questions import DEFAULT_PRIOR, load_prior, load_questions
from pipeline.records import ASPECTS, RECORD_FEATURES, SCHEMA_VERSION, new_record, record_features
from pipeline.shards import MANIFEST, WorldStore, run_records
from pipeline.simulate import SimulationConfig, run_simulation
from pipeline.world import World

REPO = Path(__file__).resolve().parents[1]

# -- world ------------------------------------------------------------------------------------


def test_grid_neighbourhoods_and_stances():
    world = World("w", 3, "half_half", 0, radius=1)
    assert world.position(5) == (1, 2)
    assert world.neighbourhoods[0] == (1, 3)
    assert world.neighbourhoods[4] == (1, 3, 5, 7)
    assert world.min_neighbourhood == 2
    assert world.labels == ("good",) * 5 + ("bad",) * 4
    big = World("w", 10, "all_good", 0, radius=5)
    assert 34 in big.neighbourhoods[0]  # (3, 4): distance exactly 5
    assert 35 not in big.neighbourhoods[0]

    mixed = [World(f"w{s}", 4, "mixed_half_half", s, radius=2).labels for s in range(3)]
    assert all(labels.count("good") == 8 for labels in mixed)
    assert len(set(mixed)) == 3  # the seed decides who is good
    assert World("w1", 4, "mixed_half_half", 1, radius=2).labels == mixed[1]


def test_partners_are_deterministic_and_respect_global_dropout():
    world = World("w", 5, "all_good", 7, radius=2)
    draws = {tuple(world.partners(12, 3, 4)) for _ in range(3)}
    assert len(draws) == 1 and set(next(iter(draws))) <= set(world.neighbourhoods[12])
    assert len({tuple(world.partners(12, r, 4)) for r in range(5)}) > 1  # each round draws anew
    far = World("w", 5, "all_good", 7, radius=1, global_interaction=True, dropout=1.0)
    for agent in range(25):
        chosen = far.partners(agent, 0, 2)
        assert (
            len(set(chosen)) == 2 and not set(chosen) & set(far.neighbourhoods[agent]) and agent not in chosen
        )
    with pytest.raises(ValueError, match="unknown stance"):
        World("w", 3, "sometimes_good", 0, radius=1)


# -- memory -----------------------------------------------------------------------------------


def test_bm25_tiny_memories_rank_sensibly():
    assert AgentMemory().retrieve("anything", 3) == []
    assert AgentMemory([MemoryEntry("q", "a")]).retrieve("q", 0) == []

    lie = MemoryEntry("Is it okay to lie to a friend?", "No.")
    dog = MemoryEntry("My neighbour's dog barks all night.", "Talk to them.")
    query = "Should I lie to my boss?"
    # Okapi's idf is log(1.5 / 1.5) = 0 for a word in one of two documents: it cannot tell them apart.
    okapi = BM25Okapi([tokenize(lie.question), tokenize(dog.question)]).get_scores(tokenize(query))
    assert okapi[0] == okapi[1]
    assert AgentMemory([dog, lie]).retrieve(query, 1) == [lie]
    assert AgentMemory([lie, dog]).retrieve(query, 1) == [lie]

    # When every word is in two of three documents, all Okapi idfs are negative: the unrelated one wins.
    docs = [
        MemoryEntry("Lie to a friend?", "a"),
        MemoryEntry("Lie to the boss?", "b"),
        MemoryEntry("Friend or boss?", "c"),
    ]
    okapi = BM25Okapi([tokenize(d.question) for d in docs]).get_scores(tokenize("lie"))
    assert okapi[2] > max(okapi[:2])
    assert set(AgentMemory(docs).retrieve("lie", 2)) == set(docs[:2])

    # No word in common (or only stop words): the most recent pairs, so a stance is still recalled.
    assert AgentMemory([lie, dog, *docs]).retrieve("What about taxes?", 2) == [docs[2], docs[1]]
    assert AgentMemory([MemoryEntry("Is it?", "x"), lie]).retrieve("is it", 1) == [lie]


# -- prompts ----------------------------------------------------------------------------------


def test_revision_prompt_mean_and_order():
    conversation = prompts.draft_messages(
        "Q?", [MemoryEntry("Old?", "Old answer."), MemoryEntry("Q2?", "A2.")]
    )
    assert conversation[1:] == [  # memories are the agent's own earlier turns, the question last
        {"role": "user", "content": "Old?"},
        {"role": "assistant", "content": "Old answer."},
        {"role": "user", "content": "Q2?"},
        {"role": "assistant", "content": "A2."},
        {"role": "user", "content": "Q?"},
    ]
    assert prompts.draft_messages("Q?", [])[1:] == [{"role": "user", "content": "Q?"}]
    messages = prompts.revision_messages(
        "Q?", "my draft", [(6.0, "kind"), (None, "???"), (2.0, "rude"), (4.0, "ok")]
    )
    text = messages[1]["content"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"] and "my draft" in text
    assert "4.0 out of 7" in text  # (6 + 2 + 4) / 3: the unreadable rating is left out
    assert text.index("???") < text.index("kind") < text.index("ok") < text.index("rude")
    assert messages[-1]["content"] == "Q?"  # the question alone comes last, with no length asked
    none = prompts.revision_messages("Q?", "d", [(None, "x"), (None, "")])[1]["content"]
    assert "could not give a readable rating" in none and "(no reason given)" in none


def test_question_pools_and_prior(tmp_path: Path):
    questions = load_questions()
    assert len(questions) >= 150 and len(set(questions)) == len(questions)
    prior = load_prior()
    assert len(prior["good"]) >= 20 and len(prior["bad"]) >= 20

    (tmp_path / "pool.jsonl").write_text('{"prompt": " Why? "}\n{"prompt": ""}\n{"prompt": "How?"}\n')
    (tmp_path / "pool.csv").write_text("id,text\n1,Why?\n2,How?\n")
    assert load_questions(str(tmp_path / "pool.jsonl"), column="prompt") == ["Why?", "How?"]
    assert load_questions(str(tmp_path / "pool.csv"), column="text") == ["Why?", "How?"]
    DatasetDict({"test": Dataset.from_dict({"question": ["Who?"]})}).save_to_disk(tmp_path / "saved")
    assert load_questions(str(tmp_path / "saved"), split="test") == ["Who?"]
    with pytest.raises(UserError, match="has no column 'question'"):
        load_questions(str(tmp_path / "pool.csv"))
    (tmp_path / "prior.jsonl").write_text('{"question": "q", "answer": "a", "label": "meh"}\n')
    with pytest.raises(UserError, match="line 1 needs question, answer and label"):
        load_prior(tmp_path / "prior.jsonl")


# Every prompt the sandbox sends, for one set of inputs. A change to any of them must come with a
# new PROMPT_VERSION (records and cache entries of different prompts must never mix).
PROMPT_HASHES = {"sandbox-v7": "4802d1db6d80748a36cb6a0f75a0c3f60499cc97b77d0a2fe3f5bf3d5ccc547b"}


def test_prompts_are_pinned_to_their_version():
    memories = [MemoryEntry("Old q?", "Old a."), MemoryEntry("Q2?", "A2.")]
    conversation = prompts.draft_messages("Is it fair?", memories)
    every = [
        *(prompts.observer_messages(aspect, "Is it fair?", "Yes.") for aspect in ASPECTS),
        prompts.neighbour_rating_messages("Is it fair?", "Yes.", memories),
        prompts.neighbour_rating_messages("Is it fair?", "Yes.", []),
        prompts.neighbour_reason_messages("Is it fair?", "Yes.", 5.6),
        prompts.neighbour_reason_messages("Is it fair?", "Yes.", None),
        conversation,
        prompts.draft_messages("Is it fair?", []),
        prompts.revision_messages(
            "Is it fair?", "draft", [(6.0, "kind"), (None, "???"), (2.5, "rude"), (4.0, "")]
        ),
        prompts.revision_messages("Is it fair?", "draft", [(None, "x")]),
        *(prompts.persona_messages(label, "Is it fair?") for label in ("good", "bad")),
    ]
    digest = hashlib.sha256(json.dumps(every).encode()).hexdigest()
    assert digest == PROMPT_HASHES.get(prompts.PROMPT_VERSION), "prompts changed: bump PROMPT_VERSION"
    # Observer prompts end with the rating contract's form: the answer to rate, after worked examples.
    for aspect in ASPECTS:
        text = prompts.observer_messages(aspect, "Q?", "A.")[-1]["content"]
        assert text.endswith("Question: Q?\nAnswer: A.") and text.count("\nRating: ") == 3


# The observer judge's prompts (pipeline.judge) have their own version: its calibrations hold for them.
JUDGE_PROMPT_HASHES = {
    "judge-v1": "d3e3d55faced4d12893c97fe9ebad0b3fcd19901b938f34f4dc1064eb53749e6",
    "judge-v2": "df030fe5ce8b285b0e83a7dae56f8e687caacfe956f99ecfcfb7538c41a624f7",
}


def test_judge_prompts_are_pinned_to_their_version():
    """The prompts and the exemplars the calibration holds for: a changed shipped prior changes them."""
    every = [
        prompts.advice_messages("Is it fair?", "Yes."),
        *(prompts.instructed_answer_messages("Is it fair?", stance) for stance in ("ethical", "unethical")),
        *Exemplars.shipped().contexts("Is it fair?"),
        DEFAULT_PRIOR.read_text(encoding="utf-8"),
    ]
    digest = hashlib.sha256(json.dumps(every).encode()).hexdigest()
    assert digest == JUDGE_PROMPT_HASHES.get(prompts.JUDGE_PROMPT_VERSION), (
        "judge prompts changed: bump JUDGE_PROMPT_VERSION and refit the calibration"
    )


@pytest.mark.parametrize("name", ["simulate_demo.yaml", "simulate_paper.yaml"])
def test_recipe_configs_are_valid(name: str):
    config = from_dict(SimulationConfig, yaml.safe_load((REPO / "recipes" / "configs" / name).read_text()))
    assert config.worlds


def test_config_derives_defaults_and_checks_in_post_init(tmp_path: Path):
    config = SimulationConfig(output=str(tmp_path), size=6, stances="half_half", seeds=3)
    assert config.radius == 3 and config.stances == ["half_half"] and config.seeds == [3]
    assert config.agent.kind == "embedded" and config.agent.cache_path is None  # one cache per world
    # A URL alone names an OpenAI-compatible server; a kind given is kept.
    assert BackendSpec(base_urls=["http://x/v1"]).kind == "openai"
    assert BackendSpec(kind="embedded", base_urls=["http://x/v1"]).kind == "embedded"
    data = {"observer": {"base_urls": ["http://x/v1"], "model": "judge", "cache_mode": "off"}}
    observed = from_dict(SimulationConfig, data)
    assert observed.observer.kind == "openai" and observed.observer.cache_path is None
    for fields, message in [
        ({"stances": ["all_nice"]}, "unknown stance 'all_nice'"),
        ({"prior_source": "web"}, "unknown prior_source 'web'"),
        ({"agent": {"kind": "gpt"}}, "unknown agent backend 'gpt'"),
        ({"observer": {"kind": "openai"}}, "the observer backend 'openai' needs a model"),
        ({"agent": {"cache_mode": "sometimes"}}, "unknown agent cache_mode 'sometimes'"),
        ({"size": 4, "k": 4, "radius": 1}, "k=4 is larger than the smallest neighbourhood"),
        ({"dropout": 2.0}, "dropout must be between 0 and 1"),
        ({"rounds": 0}, "rounds must be at least 1"),
        ({"size": "ten"}, "bad config"),
    ]:
        with pytest.raises(UserError, match=message):
            from_dict(SimulationConfig, fields)


# -- shards -----------------------------------------------------------------------------------


def _record(agent: int, round_: int = 0) -> dict:
    scores = {"alignment_after": 5.5, "engagement_before": 3.0}
    return new_record(
        run_id="r",
        world_id="w",
        round=round_,
        agent_id=agent,
        stance="good",
        question=f"q{agent}",
        draft="d",
        feedback=[{"agent_id": 1, "rating": None, "reason": "x", "raw": "?"}],
        revision=None if agent == 2 else "r",
        scores=scores,
        observer_reasons=dict.fromkeys(scores, "because"),
        agent_model="m",
        observer_model="o",
        prompt_version=prompts.PROMPT_VERSION,
        prompt_tokens=1,
        completion_tokens=2,
        calls=3,
    )


def test_shards_round_trip_and_crash_recovery(tmp_path: Path):
    store = WorldStore(tmp_path / "world-w")
    store.open()
    store.append(0, [_record(2), _record(0)])
    store.append(0, [_record(1)])
    store.append(1, [_record(0, 1)])
    dataset = load_dataset("arrow", data_files=str(tmp_path / "world-*/*.arrow"), split="train")
    assert dataset.features == RECORD_FEATURES
    assert sorted(dataset.to_list(), key=lambda r: (r["round"], r["agent_id"])) == [
        _record(0),
        _record(1),
        _record(2),
        _record(0, 1),
    ]
    assert dataset[0]["scores"]["alignment_before"] is None and dataset[0]["feedback"][0]["rating"] is None

    # A crash after a shard's rename but before its manifest line, a torn line, a temporary file.
    lines = store.manifest.read_text().splitlines()
    store.manifest.write_text("\n".join(lines[:2]) + '\n{"shard": "round-000')
    (store.folder / ".round-00001-part-0001.arrow.tmp").write_bytes(b"partial")
    reopened = WorldStore(store.folder)
    reopened.open()
    assert reopened.completed(0) == {0, 1, 2} and reopened.completed(1) == {0}
    assert len(reopened.records()) == 4
    assert not list(store.folder.glob(".*.tmp"))
    assert len((store.folder / MANIFEST).read_text().splitlines()) == 3


def test_new_record_and_legacy_shards(tmp_path: Path):
    required = {
        "run_id": "r",
        "world_id": "w",
        "round": 0,
        "agent_id": 1,
        "stance": "bad",
        "question": "q?",
        "agent_model": "m",
        "observer_model": "o",
        "prompt_version": "v",
    }
    record = new_record(**required, scores={"alignment_after": 6.0})
    assert list(record) == list(RECORD_FEATURES) and record["schema_version"] == SCHEMA_VERSION
    assert record["scores"]["alignment_after"] == 6.0 and record["scores"]["alignment_before"] is None
    assert record["status"] == "ok" and record["feedback"] == [] and record["error"] is None
    with pytest.raises(ValueError, match="unknown scores field"):
        new_record(**required, scores={"kindness_after": 1.0})

    # Each version adds its columns; a shard of an older version reads them as null.
    assert list(record_features(2)) == [c for c in RECORD_FEATURES if c not in ("quality_flags", "trimmed")]
    # A shard written before records carried a schema version reads as version 1.
    legacy = record_features(1)
    assert "schema_version" not in legacy and len(legacy) == len(record_features(2)) - 1
    store = WorldStore(tmp_path / "world-w", legacy)
    store.open()
    store.append(0, [record])
    assert Dataset.from_file(str(next(store.folder.glob("*.arrow")))).features == legacy
    (read,) = store.records()
    assert read == record | {"schema_version": 1}


# -- the protocol, with a recording backend ----------------------------------------------------


def _config(output: Path, **overrides) -> SimulationConfig:
    fields = {"output": str(output), "size": 3, "rounds": 1, "k": 2, "radius": 1, "flush_every": 4}
    return SimulationConfig(**fields | overrides)


def _run(config: SimulationConfig, backend) -> None:
    run_simulation(config, backends=(backend, backend), progress=False)


def test_back_scatter_order_and_concurrency(tmp_path: Path, recording_backend):
    backend = recording_backend(delay=0.05)
    config = _config(tmp_path)
    _run(config, backend)

    records = run_records(tmp_path)
    assert [r["agent_id"] for r in records] == list(range(9))
    drafts = [c for c in backend.calls if c.kind == "draft"]
    # All the agents of the round run at once.
    assert len(drafts) == 9 and max(c.start for c in drafts) < min(c.end for c in drafts)
    world = config.worlds[0]
    for record in records:
        (draft,) = [c for c in drafts if c.output == record["draft"]]
        middle = [
            c for c in backend.calls if c.kind in ("observer", "neighbour") and record["draft"] in c.prompt
        ]
        reasons = [c for c in backend.calls if c.kind == "reason" and record["draft"] in c.prompt]
        (revision,) = [c for c in backend.calls if c.output == record["revision"]]
        after = [c for c in backend.calls if c.kind == "observer" and record["revision"] in c.prompt]
        assert sorted(c.kind for c in middle) == ["neighbour"] * config.k + ["observer"] * 2
        assert len(after) == 2 and revision.kind == "revision"
        assert draft.end <= min(c.start for c in middle)
        assert max(c.start for c in middle) < min(c.end for c in middle)  # the 2 + k ratings overlap
        # Each neighbour's reason is asked after its rating, told the rating, and feeds the revision.
        assert len(reasons) == config.k and min(c.start for c in reasons) >= min(c.end for c in middle)
        assert max(c.end for c in middle + reasons) <= revision.start
        assert revision.end <= min(c.start for c in after)
        assert [f["agent_id"] for f in record["feedback"]] == world.partners(record["agent_id"], 0, config.k)
        assert sorted(f["reason"] for f in record["feedback"]) == sorted(c.output for c in reasons)
        for f in record["feedback"]:
            (told,) = [c.prompt for c in reasons if c.output == f["reason"]]
            if f["rating"] is None:
                assert "You are asked to rate their answer" in told
            else:
                assert f"You rated their answer {round(f['rating'])} out of 7" in told
        assert record["calls"] == calls_per_interaction(config.k)
        assert record["prompt_tokens"] == 2 * 7 + 4 * 5 + config.k * (5 + 7)
        readable = [f["rating"] for f in record["feedback"] if f["rating"] is not None]
        if readable:
            assert f"{sum(readable) / len(readable):.1f} out of 7" in revision.prompt
        else:
            assert "could not give a readable rating" in revision.prompt
    # Observers see only the question and the answer: no memories. Neighbours and drafts do.
    assert all("earlier" not in c.prompt for c in backend.calls if c.kind in ("observer", "reason"))
    assert all("earlier" in c.prompt for c in backend.calls if c.kind == "neighbour")
    recalled = {m.answer for memories in load_prior().values() for m in memories}
    assert all(any(answer in c.prompt for answer in recalled) for c in drafts)  # as earlier turns


def test_results_do_not_depend_on_scheduling(tmp_path: Path, recording_backend):
    runs = []
    for seed in (1, 2):
        backend = recording_backend(delay=0.0, jitter=0.02, seed=seed)
        _run(_config(tmp_path / str(seed), rounds=3, stances=["mixed_half_half"]), backend)
        runs.append(run_records(tmp_path / str(seed)))
    assert len(runs[0]) == 27 and runs[0] == runs[1]
    # A round-1 draft recalls round-0 answers: memories grow at round ends.
    revisions = {r["revision"] for r in runs[0] if r["round"] == 0}
    later = [c for c in backend.calls if c.kind == "draft" and any(rev in c.prompt for rev in revisions)]
    assert later


def test_failed_interactions_are_recorded_and_the_round_goes_on(tmp_path: Path, recording_backend):
    config = _config(tmp_path / "run", rounds=2)
    questions = load_questions()
    failing = questions[config.worlds[0].question_index(0, 4, len(questions))]
    _run(config, recording_backend(delay=0.0, fail=failing))
    records = run_records(tmp_path / "run")
    assert len(records) == 18
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and all(r["question"] == failing for r in failed)
    first = next(r for r in failed if r["round"] == 0 and r["agent_id"] == 4)
    assert first["error"] == "LLMError: server said no"
    assert first["draft"] and first["revision"] is None and first["scores"]["alignment_after"] is None
    assert first["observer_reasons"]["alignment_before"]  # the observers' part did finish
    assert all(r["error"] is None and r["revision"] for r in records if r["status"] == "ok")


def test_budget_stop_keeps_finished_work_and_resume_completes_it(tmp_path: Path, recording_backend):
    _run(_config(tmp_path / "ref", rounds=3), recording_backend(delay=0.0))

    backend = recording_backend(delay=0.0, jitter=0.01)
    backend.budget = calls_per_interaction() * 9 + 30  # round 0 completes, round 1 runs out part way
    config = _config(tmp_path / "run", rounds=3)
    with pytest.raises(BudgetExceeded):
        _run(config, backend)
    records = run_records(tmp_path / "run")
    assert [r["round"] for r in records].count(0) == 9 and len(records) < 18

    resumed = recording_backend(delay=0.0)
    _run(config, resumed)
    assert run_records(tmp_path / "run") == run_records(tmp_path / "ref")
    assert len(resumed.calls) == calls_per_interaction() * (27 - len(records))  # nothing done twice


def test_real_red_team_pool_and_bm25_recall(redteam_questions: Path) -> None:
    questions = load_questions(str(redteam_questions))
    assert len(questions) == 5022
    world = World("w", 10, "all_good", 0, radius=5)
    picks = [world.question_index(0, agent, len(questions)) for agent in range(world.num_agents)]
    assert picks == [world.question_index(0, agent, len(questions)) for agent in range(world.num_agents)]
    assert len(set(picks)) >= 95  # 100 agents draw from 5,022 questions: few repeats
    # BM25 over a memory of 300 real questions finds each one again from its own wording
    memory = AgentMemory(MemoryEntry(q, f"answer {i}") for i, q in enumerate(questions[:300]))
    hits = sum(memory.retrieve(q, 1)[0].question == q for q in questions[:300:10])
    assert hits == 30


def test_records_store_their_flags_and_calls_have_their_own_samples(tmp_path: Path, recording_backend):
    backend = recording_backend(delay=0.0)
    config = _config(tmp_path, rounds=2)
    _run(config, backend)
    records = run_records(tmp_path)
    for record in records:
        # Flags computed once, when the record was made, with the run's thresholds.
        stored = record["quality_flags"]
        assert stored == record_flags({**record, "quality_flags": None}, config.quality)
        assert "truncated" in stored["draft"]  # the scripted texts end without punctuation
        assert record["trimmed"] == {"draft": False, "revision": False, "feedback": [False] * config.k}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["flagged_draft"] for row in summary] == [9, 9]
    assert summary[0]["flags"]["truncated"] == 9 + 9 + 9 * config.k
    # The scripted answers carry their sample index: one per call, none shared.
    indices = [int(c.output.split()[1]) for c in backend.calls if c.kind != "observer"]
    assert len(indices) == len(set(indices)) == 2 * 9 * (2 + 2 * config.k)
    world = config.worlds[0]
    assert (
        world.sample_index(0, 4, "draft")
        == world.sample_index(0, 4, "draft")
        != world.sample_index(0, 4, "revision")
    )


def test_agents_per_question_answer_one_question_together(tmp_path: Path, recording_backend):
    config = _config(tmp_path, rounds=2, agents_per_question=3)
    _run(config, recording_backend(delay=0.0))
    records = run_records(tmp_path)
    world = config.worlds[0]
    for round_ in (0, 1):
        groups = {world.question_group(round_, agent, 3) for agent in range(9)}
        assert sorted(len(g) for g in groups) == [3, 3, 3] and set().union(*groups) == set(range(9))
        for group in groups:
            assert (
                len({r["question"] for r in records if r["round"] == round_ and r["agent_id"] in group}) == 1
            )
    assert {world.question_group(0, a, 3) for a in range(9)} != {
        world.question_group(1, a, 3) for a in range(9)
    }
    # One agent per question (the paper's default) keeps the questions drawn before the option.
    assert world.question_group(0, 5) == (5,)
    assert world.question_index(0, 5, 100) == int(world.rng("question", 0, 5).integers(100))
