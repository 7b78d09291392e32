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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import prompts
from pipeline.embedded import EmbeddedModelMissing
from pipeline.llm.base import BackendSpec, BudgetExceeded, ChatBackend, LLMError, Rating, Usage
from pipeline.memory import AgentMemory, MemoryEntry
from pipeline.questions import DEFAULT_PRIOR, InputError, load_prior, load_questions, pool_fingerprint
from pipeline.records import SCORE_FIELDS
from pipeline.shards import WorldStore, world_folder
from pipeline.world import STANCES, World

CONFIG_FILE = "config.yaml"
BACKEND_KINDS = ("embedded", "local", "openai")
PRIOR_SOURCES = ("file", "generate")

# Fields that change how a run is executed but not what it produces: a run may be resumed (or
# extended by more rounds) with other values. Every other field must match the saved config.
EXECUTION_FIELDS = frozenset({"output", "rounds", "flush_every"})
# Of a backend, only these shape the answers (the URL, limits, cache and budget do not).
BACKEND_IDENTITY_FIELDS = ("kind", "model", "temperature", "top_p", "max_tokens", "use_logprobs", "extra")


@dataclass
class SimulationConfig:
    """Everything that defines a sandbox run. Saved as ``config.yaml`` next to the shards."""

    output: str = "runs/sandbox"
    size: int = 10
    rounds: int = 50
    stances: list[str] = field(default_factory=lambda: ["all_good"])
    seeds: list[int] = field(default_factory=lambda: [0])
    k: int = 4
    radius: float | None = None  # None: size // 2, as the reference code
    global_interaction: bool = False
    dropout: float = 0.0
    top_n: int = 3  # memories retrieved into each prompt
    memory_size: int = 50  # prior pairs seeding each agent's memory
    prior: str | None = None  # JSONL of question/answer/label rows; None: the shipped default
    prior_source: str = "file"  # "file", or "generate": the agent model writes it from personas
    prior_generate: int = 20  # questions per label when generating the prior
    questions: str | None = None  # pool: .txt, .jsonl/.json/.csv, or a datasets name/folder
    question_column: str = "question"
    question_split: str = "train"
    flush_every: int = 25  # interactions per shard within a round (bounds the work a crash loses)
    agent: BackendSpec = field(default_factory=BackendSpec)
    observer: BackendSpec | None = None  # None: the agent backend

    @property
    def worlds(self) -> list[World]:
        """One world per (stance, seed), in that order."""
        radius = self.radius if self.radius is not None else self.size // 2
        return [
            World(
                f"{stance}-seed{seed}", self.size, stance, seed, radius, self.global_interaction, self.dropout
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


def config_from_dict(data: dict[str, Any]) -> SimulationConfig:
    """Build a config from plain data (YAML), refusing unknown fields."""
    data = dict(data)
    known = {f.name for f in dataclasses.fields(SimulationConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown config field(s): {', '.join(unknown)}")
    for role in ("agent", "observer"):
        spec = data.get(role)
        if isinstance(spec, dict):
            fields = {f.name for f in dataclasses.fields(BackendSpec)}
            bad = sorted(set(spec) - fields)
            if bad:
                raise InputError(f"unknown {role} backend field(s): {', '.join(bad)}")
            data[role] = BackendSpec(**spec)
        elif spec is not None and not isinstance(spec, BackendSpec):
            raise InputError(f"{role} must be a mapping of backend fields")
    for name in ("stances", "seeds"):
        if isinstance(data.get(name), str | int):
            data[name] = [data[name]]
    return SimulationConfig(**data)


def _check_backend(role: str, spec: BackendSpec) -> None:
    if spec.kind not in BACKEND_KINDS:
        raise InputError(f"unknown {role} backend {spec.kind!r}; choose from {', '.join(BACKEND_KINDS)}")
    if spec.kind == "openai" and not spec.model:
        raise InputError(f"the {role} backend 'openai' needs a model name (the URL defaults to OpenAI's API)")
    if spec.kind == "local" and not spec.model:
        raise InputError(f"the {role} backend 'local' needs a model folder or name")


def validate(config: SimulationConfig) -> None:
    """Raise :class:`InputError` for any setting the simulation cannot run with."""
    unknown = [s for s in config.stances if s not in STANCES]
    if unknown or not config.stances:
        raise InputError(
            f"unknown stance {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(STANCES)}"
        )
    if not config.seeds or any(not isinstance(s, int) or s < 0 for s in config.seeds):
        raise InputError("seeds must be a non-empty list of non-negative integers")
    if config.size < 2:
        raise InputError(f"world size must be at least 2, got {config.size}")
    for name in ("rounds", "k", "flush_every"):
        if getattr(config, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.top_n < 0 or config.memory_size < 0:
        raise InputError("top_n and memory_size must not be negative")
    if config.prior_source not in PRIOR_SOURCES:
        raise InputError(
            f"unknown prior_source {config.prior_source!r}; choose from {', '.join(PRIOR_SOURCES)}"
        )
    try:
        worlds = config.worlds
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    smallest = worlds[0].min_neighbourhood
    if config.k > smallest:
        raise InputError(
            f"k={config.k} is larger than the smallest neighbourhood ({smallest} agents within radius "
            f"{worlds[0].radius} of a corner); lower k or raise the radius"
        )
    _check_backend("agent", config.agent)
    if config.observer is not None:
        _check_backend("observer", config.observer)


def check_output(config: SimulationConfig, saved_identity: dict[str, Any]) -> Path:
    """The output folder, if it may be written: new or empty, or holding this very run."""
    output = Path(config.output).expanduser()
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is not a folder")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output folder {output} cannot be written ({existing} is not a writable folder)")
    saved_path = output / CONFIG_FILE
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read {saved_path}: {exc}") from exc
        theirs = saved.get("identity") if isinstance(saved, dict) else None
        if theirs != saved_identity:
            diff = sorted(
                k
                for k in {*(theirs or {}), *saved_identity}
                if (theirs or {}).get(k) != saved_identity.get(k)
            )
            raise InputError(
                f"output folder {output} holds a different run (differs in: {', '.join(diff)}); "
                "choose another output folder"
            )
    elif output.is_dir() and any(output.iterdir()):
        raise InputError(f"output folder {output} is not empty and holds no sandbox run")
    return output


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    ) -> None:
        self.config = config
        self.questions = questions
        self.prior = prior
        self.run_id = run_id
        self.agent = agent
        self.observer = observer
        self.progress = progress
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
            _write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
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
        record: dict[str, Any] = {
            "run_id": self.run_id,
            "world_id": world.world_id,
            "round": round_,
            "agent_id": agent,
            "stance": world.labels[agent],
            "question": question,
            "draft": None,
            "feedback": [],
            "revision": None,
            "scores": dict.fromkeys(SCORE_FIELDS),
            "observer_reasons": dict.fromkeys(SCORE_FIELDS),
            "status": "ok",
            "error": None,
            "agent_model": self.agent.model_name,
            "observer_model": self.observer.model_name,
            "prompt_version": prompts.PROMPT_VERSION,
        }
        usage = Usage(0, 0, 0)

        def observe(ratings: Sequence[Rating | BaseException], when: str) -> None:
            nonlocal usage
            for aspect, rating in zip(prompts.OBSERVER_ASPECTS, ratings, strict=True):
                if isinstance(rating, Rating):
                    record["scores"][f"{aspect}_{when}"] = rating.score
                    record["observer_reasons"][f"{aspect}_{when}"] = rating.reason
                    usage += rating.usage

        def observers(answer: str) -> list[Any]:
            return [
                self.observer.rate(prompts.observer_messages(a, question, answer))
                for a in prompts.OBSERVER_ASPECTS
            ]

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
                        scale=prompts.SCALE,
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
        from tqdm.auto import tqdm

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
        store = WorldStore(world_folder(self.output, world.world_id))
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


# -- command line ---------------------------------------------------------------------------


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n, e.g. 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard index must be in 0..n-1, got {text!r}")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sandbox simulate",
        description="Run the sandbox society and write Arrow shards of interaction records. "
        "Flags override the config file; --set KEY=VALUE overrides any field (e.g. agent.top_p=0.9).",
    )
    S = argparse.SUPPRESS
    p.add_argument("--config", help="YAML file of SimulationConfig fields")
    p.add_argument("--output", "-o", default=S, help="output folder (shards, config.yaml, summary)")
    p.add_argument("--size", type=int, default=S, help="grid side: size x size agents")
    p.add_argument("--rounds", type=int, default=S)
    p.add_argument(
        "--stances", type=lambda s: s.split(","), default=S, help=f"comma-separated: {', '.join(STANCES)}"
    )
    p.add_argument(
        "--seeds", type=lambda s: [int(x) for x in s.split(",")], default=S, help="comma-separated"
    )
    p.add_argument("--k", type=int, default=S, help="partners rating each draft")
    p.add_argument("--radius", type=float, default=S, help="neighbourhood radius (default size // 2)")
    p.add_argument("--global-interaction", action=argparse.BooleanOptionalAction, default=S)
    p.add_argument("--dropout", type=float, default=S, help="chance a partner slot goes to a distant agent")
    p.add_argument("--top-n", type=int, default=S, help="memories retrieved into each prompt")
    p.add_argument("--memory-size", type=int, default=S, help="prior pairs seeding each memory")
    p.add_argument("--prior", default=S, help="JSONL of question/answer/label rows")
    p.add_argument("--prior-source", choices=PRIOR_SOURCES, default=S)
    p.add_argument("--questions", default=S, help="question pool: .txt, .jsonl/.csv, or a datasets name")
    p.add_argument("--question-column", default=S)
    p.add_argument("--flush-every", type=int, default=S)
    for role in ("agent", "observer"):
        p.add_argument(f"--{role}-backend", default=S, help="embedded | local | openai")
        p.add_argument(f"--{role}-model", default=S, help="model name (openai) or folder (local)")
        p.add_argument(
            f"--{role}-url", action="append", default=S, help="OpenAI-compatible base URL (repeat)"
        )
    p.add_argument("--max-tokens", type=int, default=S, help="for agents and observers")
    p.add_argument("--temperature", type=float, default=S, help="for agents and observers")
    p.add_argument("--concurrency", type=int, default=S, help="calls in flight per backend")
    p.add_argument("--cache-mode", choices=("read-write", "replay-only", "off"), default=S)
    p.add_argument("--cache-path", default=S, help="SQLite response cache (default: OUTPUT/llm-cache.sqlite)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field")
    p.add_argument(
        "--shard", type=_parse_shard, default=(0, 1), metavar="I/N", help="run only worlds I, I+N, ..."
    )
    p.add_argument("--no-progress", action="store_true")
    return p


_BACKEND_FLAGS = {"backend": "kind", "model": "model", "url": "base_urls"}
_SHARED_BACKEND_FLAGS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "concurrency": "max_concurrency",
    "cache_mode": "cache_mode",
    "cache_path": "cache_path",
}
_PROCESS_FLAGS = {"config", "set", "shard", "no_progress"}


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if data.get(key) is None:
            data[key] = {}
        if not isinstance(data[key], dict):
            raise InputError(f"--set {dotted}: {key} is not a mapping")
        data = data[key]
    data[leaf] = value


def resolve_config(args: argparse.Namespace) -> SimulationConfig:
    """Defaults, then the YAML file, then flags, then ``--set``; validated."""
    data: dict[str, Any] = {}
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read config {args.config}: {str(exc).splitlines()[0]}") from exc
        if not isinstance(loaded, dict):
            raise InputError(f"config {args.config} is not a mapping of fields")
        data = loaded
    data = copy.deepcopy(data)
    flags = {k: v for k, v in vars(args).items() if k not in _PROCESS_FLAGS}
    for name, value in flags.items():
        role, _, rest = name.partition("_")
        if role in ("agent", "observer") and rest in _BACKEND_FLAGS:
            _set_path(data, f"{role}.{_BACKEND_FLAGS[rest]}", value)
        elif name in _SHARED_BACKEND_FLAGS:
            _set_path(data, f"agent.{_SHARED_BACKEND_FLAGS[name]}", value)
            if data.get("observer") is not None:
                _set_path(data, f"observer.{_SHARED_BACKEND_FLAGS[name]}", value)
        else:
            data[name] = value
    for role in ("agent", "observer"):
        spec = data.get(role)
        if isinstance(spec, dict) and spec.get("base_urls") and "kind" not in spec:
            spec["kind"] = "openai"  # a URL alone means an OpenAI-compatible server
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        _set_path(data, key.strip(), yaml.safe_load(value))
    try:
        config = config_from_dict(data)
    except TypeError as exc:
        raise InputError(f"bad config: {exc}") from exc
    if config.radius is None:
        config.radius = config.size // 2
    for spec in (config.agent, config.observer):
        if spec is not None and spec.cache_mode != "off" and spec.cache_path is None:
            spec.cache_path = str(Path(config.output) / "llm-cache.sqlite")
    try:
        validate(config)
    except TypeError as exc:  # e.g. size: "ten" in the YAML
        raise InputError(f"bad config value: {exc}") from exc
    return config


def build_backends(config: SimulationConfig) -> tuple[ChatBackend, ChatBackend]:
    """The agent backend and the observer backend (the same object when they are configured alike)."""
    from pipeline.llm import build_backend

    agent = build_backend(config.agent)
    if config.observer is None or config.observer == config.agent:
        return agent, agent
    return agent, build_backend(config.observer)


async def _run(simulation: Simulation, worlds: Sequence[World]) -> None:
    try:
        await simulation.run(worlds)
    finally:
        await simulation.agent.aclose()
        if simulation.observer is not simulation.agent:
            await simulation.observer.aclose()


def report(output: Path, world_ids: Sequence[str], shard: tuple[int, int]) -> str:
    """Print the per-round table of this process's worlds and save the plot next to the shards."""
    from pipeline.plots import format_table, plot_rounds, round_summary

    records = []
    for world_id in world_ids:
        records += WorldStore(world_folder(output, world_id)).load().records()
    rows = round_summary(records)
    suffix = "" if shard[1] == 1 else f"-shard{shard[0]}of{shard[1]}"
    plot_rounds(rows, output / f"rounds{suffix}.png")
    _write_atomic(output / f"summary{suffix}.json", json.dumps(rows, indent=1))
    return format_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        questions = load_questions(config.questions, config.question_column, config.question_split)
        prior_text = None
        prior = None
        if config.prior_source == "file":
            prior = load_prior(config.prior)
            needed = {label for world in config.worlds for label in world.labels}
            missing = sorted(label for label in needed if not prior[label])
            if missing:
                raise InputError(f"the prior holds no {' or '.join(missing)} pairs, which the stances need")
            prior_text = Path(config.prior or DEFAULT_PRIOR).expanduser().read_text()
        identity = run_identity(config, questions, prior_text)
        output = check_output(config, identity)
    except InputError as exc:
        print(f"sandbox simulate: error: {exc}", file=sys.stderr)
        return 2

    try:
        agent, observer = build_backends(config)
    except (ValueError, OSError, EmbeddedModelMissing) as exc:  # e.g. a local model folder that is not one
        print(f"sandbox simulate: error: cannot start the model backend: {exc}", file=sys.stderr)
        return 2

    run_id = run_id_of(identity)
    output.mkdir(parents=True, exist_ok=True)
    saved = {"run_id": run_id, "identity": identity, "config": config.to_dict()}
    _write_atomic(output / CONFIG_FILE, yaml.safe_dump(saved, sort_keys=False))
    worlds = config.worlds[args.shard[0] :: args.shard[1]]
    simulation = Simulation(config, questions, prior, run_id, agent, observer, progress=not args.no_progress)
    try:
        asyncio.run(_run(simulation, worlds))
    except BudgetExceeded as exc:
        print(
            f"sandbox simulate: stopped: {exc}; finished interactions are kept, rerun to continue",
            file=sys.stderr,
        )
        return 1
    print(report(output, [w.world_id for w in worlds], args.shard))
    print(f"records: {output}/world-*/*.arrow  (run {run_id})")
    return 0
