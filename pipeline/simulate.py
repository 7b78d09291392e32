"""``sandbox simulate``: run the sandbox society and write Arrow shards of interaction records.

One round: every agent of a world answers its own question in one back-scatter interaction, all
interactions at once (the LLM layer bounds the calls in flight). Memories are read as they stood
at the start of the round and each agent's (question, revision) is committed when the round is
over, so no result depends on which call finished first.

One interaction (the paper's back-scatter)::

    draft = centre(question, retrieved memories)
    observers rate draft (alignment, engagement)  |  k partners rate draft, each with its memories
    revision = centre(draft, mean rating, reasons lowest-rated last)
    observers rate revision (alignment, engagement)

The middle step's ``2 + k`` calls run concurrently, so an interaction is 4 calls deep.

A process runs its worlds at once, under one cap on calls in flight per endpoint. Everything a world
needs (shards, completion marker, response cache) lives in its folder, so a world can run in any
process: :func:`run_simulation` runs one rank's share of the worlds, :func:`execute` places all the
ranks with an executor (``--executor local|ray|slurm --workers N``, :mod:`pipeline.executors`).

Outages never become data: the endpoints are checked once before a run (:func:`preflight`); a
failed interaction is tried again (``interaction_retries``) before its round is committed; a
circuit breaker stops the run cleanly when too many of the last calls failed; and
``--retry-failed`` rewinds each world to its first round holding a failed interaction and reruns
from there (later rounds depended on that round's memories).

The library entries are :func:`run_simulation` and :func:`execute`; ``sandbox simulate``
(:func:`main`) only parses a :class:`SimulationConfig` (generated from its fields, ``--config
FILE.yaml`` plus flags) and calls them.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from tqdm.auto import tqdm

from pipeline import argparsing, prompts
from pipeline.errors import BackendLoadError, UserError, run_command
from pipeline.executors import DONE, ExecutorConfig, run_ranks, sbatch, slurm_script, submit_slurm
from pipeline.judge import Judge, JudgeConfig
from pipeline.llm.base import (
    BackendKind,
    BackendSpec,
    BudgetExceeded,
    CacheMiss,
    CacheMode,
    ChatBackend,
    CircuitOpen,
    Completion,
    LLMError,
    Rating,
    Usage,
)
from pipeline.llm.cache import ResponseCache
from pipeline.llm.factory import build_model, check_endpoints, open_cache
from pipeline.llm.layers import CachedBackend, CircuitBreaker
from pipeline.llm.ratings import SCALE, trim_reason
from pipeline.memory import AgentMemory, MemoryEntry
from pipeline.plots import merge_run, round_summary, summary_table, write_summary
from pipeline.quality import QualityConfig, record_flags, trim_to_sentence
from pipeline.questions import DEFAULT_PRIOR, load_prior, load_questions, pool_fingerprint
from pipeline.records import (
    ASPECTS,
    FLAGS_COLUMN,
    LEGACY_SCHEMA_VERSION,
    SCHEMA_VERSION,
    new_record,
    record_features,
)
from pipeline.shards import WorldStore, run_records, world_complete, world_folder
from pipeline.textio import write_atomic
from pipeline.world import STANCES, Stance, World

PROG = "sandbox simulate"
CONFIG_FILE = "config.yaml"
CACHE_FILE = "llm-cache.sqlite"
SLURM_FOLDER = "slurm"
"""A Slurm job's script and logs, in the run folder."""

PriorSource = Literal["file", "generate"]
"""``file``: prior pairs from a JSONL file; ``generate``: the agent model writes them from personas."""

# Fields that change how a run is executed but not what it produces: a run may be resumed (or
# extended by more rounds) with other values. Every other field must match the saved config.
EXECUTION_FIELDS = frozenset(
    {
        "output",
        "rounds",
        "flush_every",
        "executor",
        "interaction_retries",
        "retry_wait",
        "breaker_window",
        "breaker_threshold",
        "retry_failed",
    }
)
# Of a backend, only these shape the answers (the URL, limits, cache and budget do not).
BACKEND_IDENTITY_FIELDS = (
    "kind",
    "model",
    "temperature",
    "top_p",
    "max_tokens",
    "use_logprobs",
    "dtype",
    "extra",
)

BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
PRIOR_SOURCES: tuple[str, ...] = get_args(PriorSource)


def _check_backend(role: str, spec: Any) -> None:
    if not isinstance(spec, BackendSpec):
        raise UserError(f"{role} must be a mapping of backend fields")
    if spec.kind not in BACKEND_KINDS:
        raise UserError(f"unknown {role} backend {spec.kind!r}; choose from {', '.join(BACKEND_KINDS)}")
    if spec.cache_mode not in CACHE_MODES:
        raise UserError(
            f"unknown {role} cache_mode {spec.cache_mode!r}; choose from {', '.join(CACHE_MODES)}"
        )
    if spec.kind == "openai" and not spec.model:
        raise UserError(f"the {role} backend 'openai' needs a model name (the URL defaults to OpenAI's API)")
    if spec.kind == "local" and not spec.model:
        raise UserError(f"the {role} backend 'local' needs a model folder or name")


@dataclass
class SimulationConfig:
    """Everything that defines a sandbox run; saved as ``config.yaml`` next to the shards.

    Fields by group (each field's help is in its metadata and on ``sandbox simulate --help``):

    - run: ``output``, ``rounds``, ``flush_every``, ``executor`` (where the ranks run: ``--executor``,
      ``--workers``, ...). These only say how the run is executed: a run may be resumed or extended
      with other values. Every other field, outside the outages group, must match the saved run.
    - outages: ``interaction_retries``, ``retry_wait``, ``breaker_window``, ``breaker_threshold``,
      ``retry_failed``.
    - world: ``size``, ``stances``, ``seeds`` (one world per stance and seed), ``k``, ``radius``,
      ``global_interaction``, ``dropout``.
    - memory: ``top_n``, ``memory_size``, ``prior``, ``prior_source``, ``prior_generate``.
    - questions: ``questions``, ``question_column``, ``question_split``, ``agents_per_question``.
    - data quality: ``quality`` (:class:`~pipeline.quality.QualityConfig`: the thresholds of the
      flags stored with each record, ``--quality.min-words-answer``, ...).
    - models: ``agent``, ``observer`` (:class:`BackendSpec`; on the command line each of their
      fields is a dotted flag: ``--agent.model``, ``--observer.base-urls``), ``judge`` (how the
      observers score, :class:`~pipeline.judge.JudgeConfig`: ``--judge.alignment``, ``--judge.reasons``).

    ``__post_init__`` checks every field (a :class:`UserError` names the problem) and fills the
    derived default ``radius`` (``size // 2``). A backend's ``cache_path`` left unset means one
    response cache per world, ``<output>/world-<id>/llm-cache.sqlite``; a folder means the
    per-world caches of the run in that folder (to replay it); a file, one cache for every world.
    """

    output: str = field(
        default="runs/sandbox",
        metadata={
            "help": "output folder: world shards, config.yaml, summary.json, rounds.png",
            "aliases": ["-o"],
        },
    )
    size: int = field(default=10, metadata={"help": "grid side: a world has size x size agents"})
    rounds: int = field(
        default=50, metadata={"help": "rounds per world (every agent interacts once a round)"}
    )
    stances: list[Stance] = field(
        default_factory=lambda: ["all_good"],
        metadata={"help": f"how memories are seeded, one world per stance and seed: {', '.join(STANCES)}"},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "world seeds (non-negative)"})
    k: int = field(default=4, metadata={"help": "partners rating each draft"})
    reason_tokens: int | None = field(
        default=None,
        metadata={
            "help": "longest neighbour reason, in tokens; none: the agent's max_tokens. "
            "A batch of reasons generates until its longest reason ends, so a cap bounds the batch"
        },
    )
    radius: float | None = field(
        default=None,
        metadata={"help": "neighbourhood radius on the grid; none: size // 2, as the reference code"},
    )
    global_interaction: bool = field(
        default=False,
        metadata={"help": "let partner slots go to distant agents (the 'social media' setting)"},
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "with global interaction: chance a partner slot goes to a distant agent"},
    )
    top_n: int = field(default=3, metadata={"help": "memories retrieved (BM25) into each prompt"})
    memory_size: int = field(default=50, metadata={"help": "prior pairs seeding each agent's memory"})
    prior: str | None = field(
        default=None,
        metadata={"help": "JSONL of question/answer/label (good|bad) rows; none: the shipped default prior"},
    )
    prior_source: PriorSource = field(
        default="file",
        metadata={"help": "file: the prior file; generate: the agent model writes the prior from personas"},
    )
    prior_generate: int = field(
        default=20, metadata={"help": "with prior_source generate: questions answered per label"}
    )
    questions: str | None = field(
        default=None,
        metadata={
            "help": "question pool: .txt (one per line), .jsonl/.json/.csv, a save_to_disk folder or a "
            "datasets name; none: the shipped default pool"
        },
    )
    question_column: str = field(default="question", metadata={"help": "the pool's question column"})
    question_split: str = field(default="train", metadata={"help": "the pool's split (datasets sources)"})
    agents_per_question: int = field(
        default=1,
        metadata={
            "help": "agents answering the same question in a round (a random group each round), so their "
            "drafts and revisions form one comparison group; 1: one question per agent, as the paper"
        },
    )
    quality: QualityConfig = field(
        default_factory=QualityConfig,
        metadata={"help": "thresholds of the data-quality flags stored with every record"},
    )
    flush_every: int = field(
        default=25,
        metadata={"help": "interactions per shard within a round (bounds the work a crash loses)"},
    )
    agent: BackendSpec = field(
        default_factory=BackendSpec, metadata={"help": "the agents' model (drafts, ratings, revisions)"}
    )
    observer: BackendSpec | None = field(
        default=None, metadata={"help": "the memoryless observers' model; none: the agents' model"}
    )
    judge: JudgeConfig = field(
        default_factory=JudgeConfig,
        metadata={
            "help": "how the observers score: --judge.alignment auto|contrast|prompted, --judge.reasons"
        },
    )
    executor: ExecutorConfig = field(
        default_factory=ExecutorConfig,
        metadata={"help": "where the ranks run: --executor local|ray|slurm, --workers N, ..."},
    )
    interaction_retries: int = field(
        default=2,
        metadata={"help": "times a failed interaction is tried again before its round is committed"},
    )
    retry_wait: float = field(
        default=1.0, metadata={"help": "seconds before an interaction's first retry (doubling after)"}
    )
    breaker_window: int = field(
        default=100, metadata={"help": "circuit breaker: the last N model calls it watches"}
    )
    breaker_threshold: float = field(
        default=0.5,
        metadata={"help": "circuit breaker: the share of those calls failed that stops the run (exit 1)"},
    )
    retry_failed: bool = field(
        default=False,
        metadata={
            "help": "on resume, rewind each world to its first round holding a failed interaction and "
            "rerun from there"
        },
    )

    def __post_init__(self) -> None:
        # A YAML file may give a single stance or seed without a list.
        if isinstance(self.stances, str):
            self.stances = [self.stances]
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        unknown = [s for s in self.stances if s not in STANCES]
        if unknown or not self.stances:
            raise UserError(
                f"unknown stance {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(STANCES)}"
            )
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise UserError("seeds must be a non-empty list of non-negative integers")
        if self.size < 2:
            raise UserError(f"world size must be at least 2, got {self.size}")
        for name in ("rounds", "k", "flush_every", "prior_generate", "breaker_window", "agents_per_question"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.reason_tokens is not None and self.reason_tokens < 1:
            raise UserError(f"reason_tokens must be at least 1, got {self.reason_tokens}")
        if self.top_n < 0 or self.memory_size < 0:
            raise UserError("top_n and memory_size must not be negative")
        if self.interaction_retries < 0 or self.retry_wait < 0:
            raise UserError("interaction_retries and retry_wait must not be negative")
        if not 0 < self.breaker_threshold <= 1:
            raise UserError(f"breaker_threshold must be in (0, 1], got {self.breaker_threshold}")
        if self.prior_source not in PRIOR_SOURCES:
            raise UserError(
                f"unknown prior_source {self.prior_source!r}; choose from {', '.join(PRIOR_SOURCES)}"
            )
        if self.radius is None:
            self.radius = self.size // 2
        try:
            worlds = self.worlds
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        smallest = worlds[0].min_neighbourhood
        if self.k > smallest:
            raise UserError(
                f"k={self.k} is larger than the smallest neighbourhood ({smallest} agents within radius "
                f"{worlds[0].radius} of a corner); lower k or raise the radius"
            )
        _check_backend("agent", self.agent)
        if self.observer is not None:
            _check_backend("observer", self.observer)
        if not isinstance(self.executor, ExecutorConfig):
            raise UserError("executor must be a mapping of executor fields (kind, workers, ...)")
        if not isinstance(self.quality, QualityConfig):
            raise UserError("quality must be a mapping of quality thresholds (min_words_answer, ...)")
        if not isinstance(self.judge, JudgeConfig):
            raise UserError("judge must be a mapping of judge fields (alignment, reasons, calibration)")

    @property
    def worlds(self) -> list[World]:
        """One world per (stance, seed), in that order."""
        return [
            World(
                f"{stance}-seed{seed}",
                self.size,
                stance,
                seed,
                self.radius,
                self.global_interaction,
                self.dropout,
            )
            for stance in self.stances
            for seed in self.seeds
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the records (see ``EXECUTION_FIELDS``)."""
        data = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}
        for role in ("agent", "observer"):
            if data[role] is not None:
                spec = data[role]
                # dtype joined the identity later: left at "auto" it is omitted, so older runs resume.
                data[role] = {
                    k: spec[k] for k in BACKEND_IDENTITY_FIELDS if k != "dtype" or spec[k] != "auto"
                }
        # reason_tokens joined the identity later: left unset it is omitted, so older runs resume.
        if data["reason_tokens"] is None:
            del data["reason_tokens"]
        # The judge joined the identity later: the older runs' judge (prompted, with reasons) is
        # omitted, so those runs resume with --judge.alignment prompted --judge.reasons.
        judge = self.judge.identity()
        if judge is None:
            del data["judge"]
        else:
            data["judge"] = judge
        return data


def check_output(output: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The run saved in ``output`` (``None`` for a new run), if the folder may be written: new or
    empty, or holding this very run."""
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {output} cannot be written ({existing} is not a writable folder)")
    saved_path = output / CONFIG_FILE
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read {saved_path}: {exc}") from exc
        theirs = saved.get("identity") if isinstance(saved, dict) else None
        if theirs != identity:
            diff = sorted(k for k in {*(theirs or {}), *identity} if (theirs or {}).get(k) != identity.get(k))
            raise UserError(
                f"output folder {output} holds a different run (differs in: {', '.join(diff)}); "
                "choose another output folder"
            )
        return saved
    # Neither counts: a file being written (another rank saving config.yaml this instant), nor
    # the Slurm job's log folder (its tasks create it before the first one starts the run).
    others = (
        [p for p in output.iterdir() if p.name != SLURM_FOLDER and not _being_written(p)]
        if output.is_dir()
        else []
    )
    if others:
        raise UserError(f"output folder {output} is not empty and holds no sandbox run")
    return None


def _being_written(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def run_identity(config: SimulationConfig, questions: list[str], prior_text: str | None) -> dict[str, Any]:
    """What makes two runs the same run: the config's identity, the prompts and the inputs' content."""
    identity = {
        **config.identity(),
        "prompt_version": prompts.PROMPT_VERSION,
        "questions_sha256": pool_fingerprint(questions),
    }
    if prior_text is not None:
        identity["prior_sha256"] = hashlib.sha256(prior_text.encode()).hexdigest()[:16]
    return identity


def run_id_of(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RoundStats:
    """Live counts for the progress bar."""

    done: int = 0
    failed: int = 0
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += record["status"] != "ok"
        for name, values in (("alignment_before", self.before), ("alignment_after", self.after)):
            if record["scores"][name] is not None:
                values.append(record["scores"][name])

    def postfix(self) -> dict[str, str]:
        def mean(values: list[float]) -> str:
            return f"{sum(values) / len(values):.2f}" if values else "-"

        return {"failed": str(self.failed), "align": f"{mean(self.before)}->{mean(self.after)}"}


def cache_file(spec: BackendSpec, output: Path, world_id: str) -> Path | None:
    """Where ``spec``'s answers for world ``world_id`` are cached (``None``: caching is off).

    Unset ``cache_path``: the world's folder (or, in a run started before caches were per world,
    the run's one ``llm-cache.sqlite``); a folder: that run's cache of the same world; a file: it.
    """
    if spec.cache_mode == "off":
        return None
    if spec.cache_path is None:
        legacy = output / CACHE_FILE
        return legacy if legacy.is_file() else world_folder(output, world_id) / CACHE_FILE
    path = Path(spec.cache_path).expanduser()
    return world_folder(path, world_id) / CACHE_FILE if path.is_dir() else path


class Simulation:
    """Runs the worlds of one config against an agent and an observer backend.

    With ``cached``, each world's calls go through the world's own response cache
    (:func:`cache_file`); injected backends (tests, benchmarks) are used as they are.
    """

    def __init__(
        self,
        config: SimulationConfig,
        questions: list[str],
        prior: dict[str, list[MemoryEntry]] | None,
        run_id: str,
        agent: ChatBackend,
        observer: ChatBackend,
        *,
        progress: bool = True,
        schema_version: int = SCHEMA_VERSION,
        cached: bool = False,
    ) -> None:
        self.config = config
        self.cached = cached
        self.questions = questions
        self.prior = prior
        self.run_id = run_id
        self.agent = agent
        self.observer = observer
        self.judge = Judge(observer, config.judge)
        self.progress = progress
        self.features = record_features(schema_version)
        self.output = Path(config.output).expanduser()

    # -- memories ---------------------------------------------------------------------------

    async def world_prior(self, world: World, store: WorldStore) -> dict[str, list[MemoryEntry]]:
        """The prior pairs of a world: the prior file's, or generated once and kept in the world folder."""
        if self.prior is not None:
            return self.prior
        path = store.folder / "prior.jsonl"
        if not path.is_file():
            picks = world.rng("prior").choice(
                len(self.questions), size=min(self.config.prior_generate, len(self.questions)), replace=False
            )
            jobs = [(label, self.questions[i]) for label in sorted(set(world.labels)) for i in picks.tolist()]
            answers = await asyncio.gather(
                *(self.agent.complete(prompts.persona_messages(label, q)) for label, q in jobs)
            )
            rows = [
                {"question": q, "answer": a.text.strip(), "label": label}
                for (label, q), a in zip(jobs, answers, strict=True)
            ]
            write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return load_prior(path)

    def seed_memories(self, world: World, prior: dict[str, list[MemoryEntry]]) -> list[AgentMemory]:
        memories = []
        for agent, label in enumerate(world.labels):
            pool = prior[label]
            picks = world.rng("memory", agent).permutation(len(pool))[: self.config.memory_size]
            memories.append(AgentMemory(pool[i] for i in picks.tolist()))
        return memories

    # -- one interaction --------------------------------------------------------------------

    async def interact(
        self, world: World, round_: int, agent: int, memories: Sequence[AgentMemory]
    ) -> dict[str, Any]:
        """One back-scatter interaction, as a record. LLM failures give a ``failed`` record."""
        config = self.config
        question = self.questions[
            world.question_index(round_, agent, len(self.questions), config.agents_per_question)
        ]
        # Every call has its own sample index (seed, world, round, agent, call): two agents with the
        # same prompt at temperature > 0 still get independent, individually replayable samples.
        record = new_record(
            run_id=self.run_id,
            world_id=world.world_id,
            round=round_,
            agent_id=agent,
            stance=world.labels[agent],
            question=question,
            agent_model=self.agent.model_name,
            observer_model=self.observer.model_name,
            prompt_version=prompts.PROMPT_VERSION,
        )
        usage = Usage(0, 0, 0)
        trimmed: dict[str, Any] = {"draft": False, "revision": False, "feedback": []}

        def complete_text(text: str, name: str) -> str:
            """The text cut back to its last complete sentence (recorded in ``trimmed``)."""
            text, cut = trim_to_sentence(text, config.quality)
            if name == "feedback":
                trimmed["feedback"].append(cut)
            else:
                trimmed[name] = cut
            return text

        def observe(ratings: Sequence[Rating | BaseException], when: str) -> None:
            nonlocal usage
            for aspect, rating in zip(ASPECTS, ratings, strict=True):
                if isinstance(rating, Rating):
                    record["scores"][f"{aspect}_{when}"] = rating.score
                    record["observer_reasons"][f"{aspect}_{when}"] = rating.reason
                    usage += rating.usage

        reason_length = {"max_tokens": config.reason_tokens} if config.reason_tokens else {}

        def observers(answer: str) -> list[Any]:
            return [self.judge.rate(aspect, question, answer) for aspect in ASPECTS]

        try:
            conversation = prompts.draft_messages(question, memories[agent].retrieve(question, config.top_n))
            draft = await self.agent.complete(
                conversation, sample_index=world.sample_index(round_, agent, "draft")
            )
            usage += draft.usage
            record["draft"] = draft_text = complete_text(draft.text, "draft")
            partners = world.partners(agent, round_, config.k)

            async def neighbour(partner: int) -> tuple[Rating, Completion]:
                """The partner's score (its memories in view), then its reason in a turn of its own
                (``prompts.neighbour_reason_messages``)."""
                rating = await self.agent.rate(
                    prompts.neighbour_rating_messages(
                        question, draft_text, memories[partner].retrieve(question, config.top_n)
                    ),
                    scale=SCALE,
                    sample_index=world.sample_index(round_, agent, f"rating-{partner}"),
                    reason=False,
                )
                reason = await self.agent.complete(
                    prompts.neighbour_reason_messages(question, draft_text, rating.score),
                    sample_index=world.sample_index(round_, agent, f"reason-{partner}"),
                    **reason_length,
                )
                return rating, reason

            results = await asyncio.gather(
                *observers(draft_text), *(neighbour(p) for p in partners), return_exceptions=True
            )
            observe(results[:2], "before")
            for partner, result in zip(partners, results[2:], strict=True):
                if isinstance(result, tuple):
                    rating, reason = result
                    usage += rating.usage + reason.usage
                    record["feedback"].append(
                        {
                            "agent_id": partner,
                            "rating": rating.score,
                            "reason": complete_text(trim_reason(reason.text), "feedback"),
                            "raw": rating.raw,
                        }
                    )
            _raise_first(results)
            feedback = [(f["rating"], f["reason"]) for f in record["feedback"]]
            revision = await self.agent.complete(
                prompts.revision_messages(question, draft_text, feedback),
                sample_index=world.sample_index(round_, agent, "revision"),
            )
            usage += revision.usage
            record["revision"] = revision_text = complete_text(revision.text, "revision")
            after = await asyncio.gather(*observers(revision_text), return_exceptions=True)
            observe(after, "after")
            _raise_first(after)
        except BudgetExceeded:
            raise
        except LLMError as exc:
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"
        record.update(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, calls=usage.calls
        )
        record["trimmed"] = trimmed
        record[FLAGS_COLUMN] = record_flags(record, config.quality)
        return record

    # -- rounds and worlds ------------------------------------------------------------------

    async def run_round(
        self,
        world: World,
        store: WorldStore,
        round_: int,
        memories: Sequence[AgentMemory],
        position: int = 0,
    ) -> None:
        """Run the interactions of ``round_`` not stored yet, storing them every ``flush_every``.

        A failed interaction is tried again, up to ``interaction_retries`` times after waits of
        ``retry_wait`` seconds doubling, before it is stored (its calls that did succeed are
        answered by the cache); a cache miss in replay-only mode is not retried.
        """
        done = store.completed(round_)
        pending = [a for a in range(world.num_agents) if a not in done]
        if not pending:
            return
        stats = RoundStats()
        bar = tqdm(
            total=world.num_agents,
            initial=len(done),
            desc=f"{world.world_id} round {round_}",
            disable=not self.progress,
            leave=True,
            position=position,
        )
        buffer: list[dict[str, Any]] = []

        async def one(agent: int) -> None:
            record = await self.interact(world, round_, agent, memories)
            for attempt in range(self.config.interaction_retries):
                if not _retriable(record):
                    break
                await asyncio.sleep(self.config.retry_wait * 2**attempt)
                record = await self.interact(world, round_, agent, memories)
            buffer.append(record)
            stats.add(record)
            bar.update()
            bar.set_postfix(stats.postfix(), refresh=False)
            if len(buffer) >= self.config.flush_every:
                store.append(round_, buffer)
                buffer.clear()

        try:
            async with asyncio.TaskGroup() as group:
                for agent in pending:
                    group.create_task(one(agent))
        finally:
            # Finished interactions are kept even when the round stops early (budget, Ctrl-C).
            store.append(round_, buffer)
            bar.close()

    def _world_view(self, world: World) -> tuple[Simulation, list[ResponseCache]]:
        """This simulation with backends answering from ``world``'s response caches, and the caches."""
        if not self.cached:
            return self, []
        caches: dict[tuple[Path, str], ResponseCache] = {}
        view = copy.copy(self)
        for role, spec in (
            ("agent", self.config.agent),
            ("observer", self.config.observer or self.config.agent),
        ):
            path = cache_file(spec, self.output, world.world_id)
            if path is not None:
                if (path, spec.cache_mode) not in caches:
                    caches[path, spec.cache_mode] = open_cache(path, spec.cache_mode)
                setattr(view, role, CachedBackend(getattr(self, role), caches[path, spec.cache_mode], spec))
        view.judge = self.judge.on(view.observer)
        return view, list(caches.values())

    async def run_world(self, world: World, position: int = 0) -> None:
        """Run (or resume, or with ``retry_failed`` repair) one world, then mark it complete."""
        folder = world_folder(self.output, world.world_id)
        if world_complete(folder, self.config.rounds) and not self.config.retry_failed:
            return
        store = WorldStore(folder, self.features)
        store.open()
        if self.config.retry_failed:
            first = store.first_failed_round()
            if first is not None:
                store.rewind(first)
        if world_complete(folder, self.config.rounds):
            return
        view, caches = self._world_view(world)
        try:
            memories = view.seed_memories(world, await view.world_prior(world, store))
            for round_ in range(self.config.rounds):
                await view.run_round(world, store, round_, memories, position)
                # The round's revisions enter memory only now, in agent order, for every agent at once.
                for record in store.records([round_]):
                    if record["status"] == "ok":
                        memories[record["agent_id"]].add(record["question"], record["revision"])
            store.mark_complete(self.config.rounds)
        finally:
            for cache in caches:
                cache.close()

    async def run(self, worlds: Sequence[World]) -> None:
        """Run ``worlds`` all at once (their calls share the backends' limits)."""
        try:
            async with asyncio.TaskGroup() as group:
                for position, world in enumerate(worlds):
                    group.create_task(self.run_world(world, position))
        except* BudgetExceeded as group:
            raise _leaves(group)[0] from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions of a (nested) exception group, depth first."""
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def _retriable(record: dict[str, Any]) -> bool:
    """A failed interaction that may succeed when tried again: anything but a replay-only cache miss."""
    return record["status"] != "ok" and not (record["error"] or "").startswith(f"{CacheMiss.__name__}:")


def _raise_first(results: Sequence[Any]) -> None:
    """Re-raise the first failure of a gather, a spent budget before anything else."""
    errors = [r for r in results if isinstance(r, BaseException)]
    for error in sorted(errors, key=lambda e: not isinstance(e, BudgetExceeded)):
        raise error


# -- the stage ------------------------------------------------------------------------------


def rank_share(spec: BackendSpec, rank: int, world_size: int) -> BackendSpec:
    """``spec`` with rank ``rank``'s share of the run's budgets and request rate.

    Budgets and ``requests_per_minute`` hold for one ``sandbox simulate`` command, whole run: each
    of its ``world_size`` ranks gets an equal share (the first ranks one more of a budget that
    does not divide evenly), so the ranks together never exceed them.
    """
    if world_size == 1:
        return spec

    def share(total: int | None) -> int | None:
        return None if total is None else total // world_size + (rank < total % world_size)

    rate = spec.requests_per_minute
    return dataclasses.replace(
        spec,
        token_budget=share(spec.token_budget),
        call_budget=share(spec.call_budget),
        requests_per_minute=None if rate is None else rate / world_size,
    )


def _start_backend(role: str, spec: BackendSpec, breaker: CircuitBreaker | None) -> ChatBackend:
    try:
        return build_model(spec, breaker=breaker)
    except BackendLoadError as exc:
        raise BackendLoadError(f"cannot start the {role} backend: {exc}") from exc


def build_backends(
    config: SimulationConfig, *, rank: int = 0, world_size: int = 1, breaker: CircuitBreaker | None = None
) -> tuple[ChatBackend, ChatBackend]:
    """The agent and observer backends of one rank (the same object when they are configured
    alike), without response caches: those are per world (:class:`Simulation`). Both report to
    ``breaker``; budgets and the request rate are the rank's share (:func:`rank_share`)."""
    agent = _start_backend("agent", rank_share(config.agent, rank, world_size), breaker)
    if config.observer is None or config.observer == config.agent:
        return agent, agent
    try:
        return agent, _start_backend("observer", rank_share(config.observer, rank, world_size), breaker)
    except BaseException:
        asyncio.run(agent.aclose())
        raise


def preflight(config: SimulationConfig) -> None:
    """One cheap request per endpoint of the run's servers (none for in-process models or in
    replay-only mode): an unreachable or misconfigured endpoint (closed port, refused key, unknown
    model) is a :class:`BackendLoadError` naming it, before anything is written."""
    roles = [("agent", config.agent)]
    if config.observer is not None and config.observer != config.agent:
        roles.append(("observer", config.observer))

    async def check() -> None:
        for role, spec in roles:
            try:
                await check_endpoints(spec)
            except BackendLoadError as exc:
                raise BackendLoadError(f"the {role} backend: {exc}") from exc

    asyncio.run(check())


async def _run(simulation: Simulation, worlds: Sequence[World]) -> None:
    try:
        await simulation.run(worlds)
    finally:
        await simulation.agent.aclose()
        if simulation.observer is not simulation.agent:
            await simulation.observer.aclose()


@dataclass(frozen=True)
class PreparedRun:
    """A run's inputs, read and checked, with nothing written yet."""

    questions: list[str]
    prior: dict[str, list[MemoryEntry]] | None
    identity: dict[str, Any]
    run_id: str
    schema_version: int
    output: Path


def prepare_run(config: SimulationConfig) -> PreparedRun:
    """Load the question pool and the prior and check the output folder; a :class:`UserError`,
    with nothing written, for any bad input."""
    questions = load_questions(config.questions, config.question_column, config.question_split)
    prior_text = None
    prior = None
    if config.prior_source == "file":
        prior = load_prior(config.prior)
        needed = {label for world in config.worlds for label in world.labels}
        missing = sorted(label for label in needed if not prior[label])
        if missing:
            raise UserError(f"the prior holds no {' or '.join(missing)} pairs, which the stances need")
        prior_text = Path(config.prior or DEFAULT_PRIOR).expanduser().read_text()
    identity = run_identity(config, questions, prior_text)
    output = Path(config.output).expanduser()
    saved = check_output(output, identity)
    # A run keeps the record layout it started with, so all its shards load as one dataset.
    schema_version = SCHEMA_VERSION if saved is None else saved.get("schema_version", LEGACY_SCHEMA_VERSION)
    return PreparedRun(questions, prior, identity, run_id_of(identity), schema_version, output)


def _save_run(config: SimulationConfig, run: PreparedRun, judge: Judge | None = None) -> None:
    """Write ``config.yaml``; with ``judge`` (known once the observer backend runs: each rank
    rewrites the file) also what the observers' judge settled on, for the dataset card.

    A judge that settles on another method or scoring model than the one saved (``auto`` on a
    machine where the observer's dtype has no calibration) is refused: the run's scores must not mix.
    """
    run.output.mkdir(parents=True, exist_ok=True)
    saved = {
        "run_id": run.run_id,
        "schema_version": run.schema_version,
        "identity": run.identity,
        "config": config.to_dict(),
    }
    if judge is not None:
        saved["judge"] = judge.description()
        path = run.output / CONFIG_FILE
        before = (yaml.safe_load(path.read_text()) or {}).get("judge") if path.is_file() else None
        settled = ("alignment", "scoring_model")
        if before and any(before.get(k) != saved["judge"][k] for k in settled):
            raise UserError(
                f"output folder {run.output} holds a run scored by a {before['alignment']} judge on "
                f"{before.get('scoring_model') or before['observer']}; here the judge settles on "
                f"{saved['judge']['alignment']} on {saved['judge']['scoring_model'] or saved['judge']['observer']}: "
                "resume it where the observer scores as it did (same device and dtype)"
            )
    write_atomic(run.output / CONFIG_FILE, yaml.safe_dump(saved, sort_keys=False))


@dataclass(frozen=True)
class SimulationResult:
    """What one call of :func:`run_simulation` (or :func:`execute`) did."""

    run_id: str
    output: Path
    worlds: tuple[str, ...]
    """The worlds this rank ran."""
    interactions: int
    """Records stored in this rank's worlds, all rounds (earlier calls' included)."""
    failed: int
    """Of those, the failed interactions."""
    summary: list[dict[str, Any]]
    """The whole run's per-round summary (written to ``summary.json`` once every world is complete)."""
    seconds: float
    """Wall time of running the worlds (no setup, no summary)."""
    cpu_seconds: float
    """This process's CPU time over the same span."""
    stopped: tuple[int, ...] = ()
    """:func:`execute`: the ranks that stopped early (a spent budget, an outage, a worker lost)."""


def _result(
    config: SimulationConfig,
    run: PreparedRun,
    worlds: Sequence[World],
    started: tuple[float, float],
    stopped: tuple[int, ...] = (),
    *,
    ranks_wrote: bool = False,
) -> SimulationResult:
    """The result of running ``worlds``. The run's summary files are rewritten when its last world
    is done, unless ``ranks_wrote`` (the rank that finished it did)."""
    seconds, cpu_seconds = time.perf_counter() - started[0], time.process_time() - started[1]
    done = all(world_complete(world_folder(run.output, w.world_id), config.rounds) for w in config.worlds)
    write = done and not ranks_wrote
    summary = write_summary(run.output) if write else round_summary(run_records(run.output))
    ids = tuple(world.world_id for world in worlds)
    mine = [row for row in summary if row["world_id"] in ids]
    return SimulationResult(
        run_id=run.run_id,
        output=run.output,
        worlds=ids,
        interactions=sum(row["interactions"] for row in mine),
        failed=sum(row["failed"] for row in mine),
        summary=summary,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        stopped=stopped,
    )


def run_simulation(
    config: SimulationConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    backends: tuple[ChatBackend, ChatBackend] | None = None,
    progress: bool = True,
) -> SimulationResult:
    """Run (or resume) this rank's share of the run's worlds: worlds ``rank``, ``rank + world_size``, ...

    Everything ``sandbox simulate`` does after parsing, for one process: checks the inputs and the
    output folder (:func:`prepare_run`) and the endpoints (:func:`preflight`), a
    :class:`UserError` with nothing written for any problem; starts the backends unless
    ``backends=(agent, observer)`` are given (tests and benchmarks; used as they are, without
    per-world caches or circuit breaker); runs the worlds, all at once, and closes the backends
    (a backend belongs to the event loop that first used it: this call's). The rank that
    completes the run's last world rewrites ``summary.json`` and ``rounds.png`` from all its shards.
    A spent budget or a tripped circuit breaker raises :class:`BudgetExceeded` (:class:`CircuitOpen`);
    finished interactions are kept and a rerun continues from them.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank must be in 0..{world_size - 1} with {world_size} rank(s), got {rank}")
    run = prepare_run(config)
    if backends is None:
        preflight(config)
        breaker = CircuitBreaker(config.breaker_window, config.breaker_threshold)
        agent, observer = build_backends(config, rank=rank, world_size=world_size, breaker=breaker)
    else:
        agent, observer = backends
    worlds = config.worlds[rank::world_size]
    simulation = Simulation(
        config,
        run.questions,
        run.prior,
        run.run_id,
        agent,
        observer,
        progress=progress,
        schema_version=run.schema_version,
        cached=backends is None,
    )
    _save_run(config, run, simulation.judge)
    started = time.perf_counter(), time.process_time()
    asyncio.run(_run(simulation, worlds))
    return _result(config, run, worlds, started)


def stop_message(exc: BudgetExceeded) -> str:
    """What a stopped run tells its user, and how to go on."""
    if isinstance(exc, CircuitOpen):
        return (
            f"stopped: {exc} (circuit breaker); finished interactions are kept; once the endpoints "
            "answer again, rerun the same command with --retry-failed"
        )
    return f"stopped: {exc}; finished interactions are kept, rerun to continue"


def rank_task(config: SimulationConfig, rank: int, world_size: int) -> int:
    """One rank of a run as an executor runs it: its exit status (0 done, 1 stopped, 2 refused)."""

    def body() -> int:
        try:
            run_simulation(config, rank=rank, world_size=world_size, progress=False)
        except BudgetExceeded as exc:
            sys.stderr.write(f"{PROG} rank {rank}: {stop_message(exc)}\n")
            return 1
        return 0

    return run_command(f"{PROG} rank {rank}", body)


def _portable(config: SimulationConfig) -> SimulationConfig:
    """``config`` with its local paths absolute, so a rank started in another folder finds them."""

    def absolute(path: str | None) -> str | None:
        if path is None or not Path(path).expanduser().exists():
            return path  # a datasets name, or a path created later
        return str(Path(path).expanduser().resolve())

    specs = {
        role: None if spec is None else dataclasses.replace(spec, cache_path=absolute(spec.cache_path))
        for role, spec in (("agent", config.agent), ("observer", config.observer))
    }
    output = str(Path(config.output).expanduser().resolve())
    return dataclasses.replace(
        config, output=output, prior=absolute(config.prior), questions=absolute(config.questions), **specs
    )


def execute(config: SimulationConfig) -> SimulationResult:
    """The whole run, its ranks (``config.executor.workers``) placed by ``config.executor``.

    The inputs and the endpoints are checked once, here, before any rank starts (a
    :class:`UserError`, nothing written); each rank then runs :func:`run_simulation` on its share
    of the worlds. ``stopped`` lists the ranks that stopped early; their finished work is kept.
    """
    run = prepare_run(config)
    preflight(config)
    _save_run(config, run)
    started = time.perf_counter(), time.process_time()
    statuses = run_ranks(config.executor, rank_task, _portable(config))
    stopped = tuple(rank for rank, status in enumerate(statuses) if status != DONE)
    return _result(config, run, config.worlds, started, stopped, ranks_wrote=True)


def slurm_job(config: SimulationConfig) -> str:
    """The run as a Slurm job array script (:func:`pipeline.executors.slurm_script`): array task
    ``i`` runs rank ``i`` with the run's config on its standard input. Checks the inputs (a
    :class:`UserError`); writes nothing."""
    run = prepare_run(config)
    rank_config = dataclasses.replace(_portable(config), executor=ExecutorConfig())
    command = [sys.executable, "-m", "pipeline.cli", "simulate", "--config", "/dev/stdin", "--no-progress"]
    return slurm_script(
        config.executor,
        command,
        stdin=yaml.safe_dump(rank_config.to_dict(), sort_keys=False),
        job_name=f"sandbox-{run.run_id}",
        log_dir=run.output.resolve() / SLURM_FOLDER,
        workdir=Path.cwd(),
    )


# -- command line ---------------------------------------------------------------------------

DESCRIPTION = (
    "Run the sandbox society and write Arrow shards of interaction records. Flags override the "
    "config file; each backend field is a dotted flag (--agent.model, --observer.base-urls)."
)


def _process_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("this process (not saved with the run)")
    group.add_argument(
        "--rank", type=int, default=0, help="this process's rank: it runs worlds RANK, RANK + NUM_RANKS, ..."
    )
    group.add_argument("--num-ranks", type=int, default=1, help="processes sharing the run's worlds")
    group.add_argument("--no-progress", action="store_true", default=False, help="no progress bars")
    group.add_argument(
        "--dry-run",
        action="store_true",
        default=False,
        help="with --executor slurm: print the job array script instead of submitting it",
    )
    group.add_argument(
        "--merge",
        metavar="RUN",
        default=None,
        help="only recompute RUN's summary.json and rounds.png from its shards and print the summary",
    )


def _submit(config: SimulationConfig, dry_run: bool) -> int:
    if config.executor.kind != "slurm":
        raise UserError("--dry-run prints a Slurm job script: add --executor slurm")
    script = slurm_job(config)
    if dry_run:
        print(script, end="")
        return 0
    command = sbatch()
    run = prepare_run(config)
    preflight(config)
    _save_run(config, run)
    path = run.output / SLURM_FOLDER / f"simulate-{run.run_id}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, script)
    job = submit_slurm(path, command)
    print(
        f"submitted Slurm job {job}: {config.executor.workers} ranks, logs in {path.parent}; the last "
        f"rank to finish writes the summary (or: {PROG} --merge {run.output})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        config, args = argparsing.parse(SimulationConfig, argv, PROG, DESCRIPTION, extend=_process_flags)
        if args.merge is not None:
            print(summary_table(merge_run(Path(args.merge).expanduser())))
            return 0
        executor = config.executor
        if executor.kind == "slurm" or args.dry_run:
            return _submit(config, args.dry_run)
        one_process = executor.kind == "local" and executor.workers == 1
        if not one_process and (args.rank, args.num_ranks) != (0, 1):
            raise UserError("--rank/--num-ranks start one rank by hand, --workers launches them all: use one")
        try:
            if one_process:
                result = run_simulation(
                    config, rank=args.rank, world_size=args.num_ranks, progress=not args.no_progress
                )
            else:
                result = execute(config)
        except BudgetExceeded as exc:
            print(f"{PROG}: {stop_message(exc)}", file=sys.stderr)
            return 1
        print(summary_table(result.summary))
        print(f"records: {result.output}/world-*/*.arrow  (run {result.run_id})")
        if result.stopped:
            print(
                f"{PROG}: rank(s) {', '.join(map(str, result.stopped))} stopped early (see above); finished "
                "interactions are kept; rerun the same command to continue",
                file=sys.stderr,
            )
            return 1
        if result.failed:
            print(
                f"{PROG}: {result.failed} interaction(s) failed; rerun with --retry-failed to redo them "
                "(and the rounds after them)",
                file=sys.stderr,
            )
        return 0

    return run_command(PROG, body)
