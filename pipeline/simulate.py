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

The library entry is :func:`run_simulation`; ``sandbox simulate`` (:func:`main`) only parses a
:class:`SimulationConfig` (generated from its fields, ``--config FILE.yaml`` plus flags) and calls it.
"""

from __future__ import annotations

import argparse
import asyncio
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
from pipeline.llm import build_backend
from pipeline.llm.base import (
    BackendKind,
    BackendSpec,
    BudgetExceeded,
    CacheMode,
    ChatBackend,
    LLMError,
    Rating,
    Usage,
)
from pipeline.llm.ratings import SCALE
from pipeline.memory import AgentMemory, MemoryEntry
from pipeline.plots import summary_table, write_summary
from pipeline.questions import DEFAULT_PRIOR, load_prior, load_questions, pool_fingerprint
from pipeline.records import ASPECTS, LEGACY_SCHEMA_VERSION, SCHEMA_VERSION, new_record, record_features
from pipeline.shards import WorldStore, world_folder
from pipeline.textio import write_atomic
from pipeline.world import STANCES, Stance, World

PROG = "sandbox simulate"
CONFIG_FILE = "config.yaml"
CACHE_FILE = "llm-cache.sqlite"

PriorSource = Literal["file", "generate"]
"""``file``: prior pairs from a JSONL file; ``generate``: the agent model writes them from personas."""

# Fields that change how a run is executed but not what it produces: a run may be resumed (or
# extended by more rounds) with other values. Every other field must match the saved config.
EXECUTION_FIELDS = frozenset({"output", "rounds", "flush_every"})
# Of a backend, only these shape the answers (the URL, limits, cache and budget do not).
BACKEND_IDENTITY_FIELDS = ("kind", "model", "temperature", "top_p", "max_tokens", "use_logprobs", "extra")

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

    - run: ``output``, ``rounds``, ``flush_every``. These only say how the run is executed: a run
      may be resumed or extended with other values. Every other field must match the saved run.
    - world: ``size``, ``stances``, ``seeds`` (one world per stance and seed), ``k``, ``radius``,
      ``global_interaction``, ``dropout``.
    - memory: ``top_n``, ``memory_size``, ``prior``, ``prior_source``, ``prior_generate``.
    - questions: ``questions``, ``question_column``, ``question_split``.
    - models: ``agent``, ``observer`` (:class:`BackendSpec`; on the command line each of their
      fields is a dotted flag: ``--agent.model``, ``--observer.base-urls``).

    ``__post_init__`` checks every field (a :class:`UserError` names the problem) and fills the
    derived defaults: ``radius`` (``size // 2``) and each backend's ``cache_path``
    (``<output>/llm-cache.sqlite`` unless its cache is off).
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
        for name in ("rounds", "k", "flush_every", "prior_generate"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.top_n < 0 or self.memory_size < 0:
            raise UserError("top_n and memory_size must not be negative")
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
        for spec in (self.agent, self.observer):
            if spec is not None and spec.cache_mode != "off" and spec.cache_path is None:
                spec.cache_path = str(Path(self.output) / CACHE_FILE)

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
                data[role] = {k: data[role][k] for k in BACKEND_IDENTITY_FIELDS}
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
    if output.is_dir() and any(output.iterdir()):
        raise UserError(f"output folder {output} is not empty and holds no sandbox run")
    return None


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


class Simulation:
    """Runs the worlds of one config against an agent and an observer backend."""

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
    ) -> None:
        self.config = config
        self.questions = questions
        self.prior = prior
        self.run_id = run_id
        self.agent = agent
        self.observer = observer
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
        question = self.questions[world.question_index(round_, agent, len(self.questions))]
        # Each agent's calls in a round form their own cache entries, so two agents with the same
        # prompt at temperature > 0 still get independent (and individually replayable) samples.
        sample = round_ * world.num_agents + agent
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

        def observe(ratings: Sequence[Rating | BaseException], when: str) -> None:
            nonlocal usage
            for aspect, rating in zip(ASPECTS, ratings, strict=True):
                if isinstance(rating, Rating):
                    record["scores"][f"{aspect}_{when}"] = rating.score
                    record["observer_reasons"][f"{aspect}_{when}"] = rating.reason
                    usage += rating.usage

        def observers(answer: str) -> list[Any]:
            return [self.observer.rate(prompts.observer_messages(a, question, answer)) for a in ASPECTS]

        try:
            conversation = prompts.draft_messages(question, memories[agent].retrieve(question, config.top_n))
            draft = await self.agent.complete(conversation, sample_index=sample)
            usage += draft.usage
            record["draft"] = draft.text
            partners = world.partners(agent, round_, config.k)
            results = await asyncio.gather(
                *observers(draft.text),
                *(
                    self.agent.rate(
                        prompts.neighbour_rating_messages(
                            question, draft.text, memories[p].retrieve(question, config.top_n)
                        ),
                        scale=SCALE,
                        sample_index=round_ * world.num_agents + p,
                    )
                    for p in partners
                ),
                return_exceptions=True,
            )
            observe(results[:2], "before")
            for partner, rating in zip(partners, results[2:], strict=True):
                if isinstance(rating, Rating):
                    usage += rating.usage
                    record["feedback"].append(
                        {
                            "agent_id": partner,
                            "rating": rating.score,
                            "reason": rating.reason,
                            "raw": rating.raw,
                        }
                    )
            _raise_first(results)
            feedback = [(f["rating"], f["reason"]) for f in record["feedback"]]
            revision = await self.agent.complete(
                prompts.revision_messages(conversation, draft.text, feedback), sample_index=sample
            )
            usage += revision.usage
            record["revision"] = revision.text
            after = await asyncio.gather(*observers(revision.text), return_exceptions=True)
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
        return record

    # -- rounds and worlds ------------------------------------------------------------------

    async def run_round(
        self, world: World, store: WorldStore, round_: int, memories: Sequence[AgentMemory]
    ) -> None:
        """Run the interactions of ``round_`` not stored yet, storing them every ``flush_every``."""
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
        )
        buffer: list[dict[str, Any]] = []

        async def one(agent: int) -> None:
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

    async def run_world(self, world: World) -> None:
        store = WorldStore(world_folder(self.output, world.world_id), self.features)
        store.open()
        memories = self.seed_memories(world, await self.world_prior(world, store))
        for round_ in range(self.config.rounds):
            await self.run_round(world, store, round_, memories)
            # The round's revisions enter memory only now, in agent order, for every agent at once.
            for record in store.records([round_]):
                if record["status"] == "ok":
                    memories[record["agent_id"]].add(record["question"], record["revision"])

    async def run(self, worlds: Sequence[World]) -> None:
        try:
            for world in worlds:
                await self.run_world(world)
        except* BudgetExceeded as group:
            raise group.exceptions[0] from None


def _raise_first(results: Sequence[Any]) -> None:
    """Re-raise the first failure of a gather, a spent budget before anything else."""
    errors = [r for r in results if isinstance(r, BaseException)]
    for error in sorted(errors, key=lambda e: not isinstance(e, BudgetExceeded)):
        raise error


# -- the stage ------------------------------------------------------------------------------


def _start_backend(role: str, spec: BackendSpec) -> ChatBackend:
    try:
        return build_backend(spec)
    except BackendLoadError as exc:
        raise BackendLoadError(f"cannot start the {role} backend: {exc}") from exc


def build_backends(config: SimulationConfig) -> tuple[ChatBackend, ChatBackend]:
    """The agent backend and the observer backend (the same object when they are configured alike)."""
    agent = _start_backend("agent", config.agent)
    if config.observer is None or config.observer == config.agent:
        return agent, agent
    try:
        return agent, _start_backend("observer", config.observer)
    except BaseException:
        asyncio.run(agent.aclose())
        raise


async def _run(simulation: Simulation, worlds: Sequence[World]) -> None:
    try:
        await simulation.run(worlds)
    finally:
        await simulation.agent.aclose()
        if simulation.observer is not simulation.agent:
            await simulation.observer.aclose()


@dataclass(frozen=True)
class SimulationResult:
    """What one call of :func:`run_simulation` did."""

    run_id: str
    output: Path
    worlds: tuple[str, ...]
    """The worlds this rank ran."""
    interactions: int
    """Records stored in this rank's worlds, all rounds (earlier calls' included)."""
    failed: int
    """Of those, the failed interactions."""
    summary: list[dict[str, Any]]
    """The whole run's per-round summary, as written to ``summary.json``."""
    seconds: float
    """Wall time of running the worlds (no setup, no summary)."""
    cpu_seconds: float
    """This process's CPU time over the same span."""


def run_simulation(
    config: SimulationConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    backends: tuple[ChatBackend, ChatBackend] | None = None,
    progress: bool = True,
) -> SimulationResult:
    """Run (or resume) this rank's share of the run's worlds: worlds ``rank``, ``rank + world_size``, ...

    Everything ``sandbox simulate`` does after parsing: loads the question pool and the prior,
    checks the output folder (a :class:`UserError`, with nothing written, for any bad input),
    starts the backends unless ``backends=(agent, observer)`` are given (tests and benchmarks),
    runs the worlds and closes the backends (a backend belongs to the event loop that first used
    it: this call's), and rewrites the run's ``summary.json`` and ``rounds.png`` from all its shards. A spent budget raises :class:`BudgetExceeded`; finished
    interactions are kept and a rerun continues from them.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank must be in 0..{world_size - 1} with {world_size} rank(s), got {rank}")
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
    agent, observer = build_backends(config) if backends is None else backends

    run_id = run_id_of(identity)
    output.mkdir(parents=True, exist_ok=True)
    saved = {
        "run_id": run_id,
        "schema_version": schema_version,
        "identity": identity,
        "config": config.to_dict(),
    }
    write_atomic(output / CONFIG_FILE, yaml.safe_dump(saved, sort_keys=False))
    worlds = config.worlds[rank::world_size]
    simulation = Simulation(
        config, questions, prior, run_id, agent, observer, progress=progress, schema_version=schema_version
    )
    started, cpu = time.perf_counter(), time.process_time()
    asyncio.run(_run(simulation, worlds))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    summary = write_summary(output)
    ids = tuple(world.world_id for world in worlds)
    mine = [row for row in summary if row["world_id"] in ids]
    return SimulationResult(
        run_id=run_id,
        output=output,
        worlds=ids,
        interactions=sum(row["interactions"] for row in mine),
        failed=sum(row["failed"] for row in mine),
        summary=summary,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
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


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        config, args = argparsing.parse(SimulationConfig, argv, PROG, DESCRIPTION, extend=_process_flags)
        try:
            result = run_simulation(
                config, rank=args.rank, world_size=args.num_ranks, progress=not args.no_progress
            )
        except BudgetExceeded as exc:
            print(
                f"{PROG}: stopped: {exc}; finished interactions are kept, rerun to continue", file=sys.stderr
            )
            return 1
        print(summary_table(result.summary))
        print(f"records: {result.output}/world-*/*.arrow  (run {result.run_id})")
        return 0

    return run_command(PROG, body)
