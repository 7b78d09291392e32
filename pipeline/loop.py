"""``sandbox loop``: the closed loop. Trained models re-enter the society they learned from.

Iteration ``t`` (folder ``iter-TT/`` of the output):

1. **simulate** (``sim/``): the sandbox with ``M_t`` as the agents (``M_0``: ``base_model``) and the
   loop's pinned observer, on the simulation's executor;
2. **transform** (``data/``): its records into comparison groups (with ``train_from: base``, the
   records of every iteration so far);
3. **train** (``model/``): ``M_{t+1}``, from ``M_t`` (``train_from: previous``) or from the base model,
   by the command a user types (``accelerate launch LAUNCHER recipes/train.py ...``), so it trains on
   several GPUs or with DeepSpeed as the launcher says;
4. **evaluate** (``eval/``): ``sandbox evaluate --compare M_t M_{t+1}`` on the held-out questions with
   the same observer, in its own process: observer scores, paired differences ``M_{t+1} - M_t``,
   and preference accuracy on the labelled pairs and on one fixed set of held-out comparison groups;
   with ``eval_samples`` above 1 also on ``M_t``'s best vs worst sampled answer to each question (a
   set of its own each iteration: the table shows ``M_t`` and ``M_{t+1}`` on it, the plot does not).

The held-out groups are built once, before iteration 0, by a society of the base model on the
held-out questions (``heldout/``), unless ``heldout_groups`` names a ``sandbox transform`` output;
every iteration measures on the same set. The observer is the loop's own (``observer``, the embedded
model unless set): it never follows the agents, or the judge would change with every iteration.

Each stage, once done, leaves ``<stage>.done`` (JSON, written atomically) in its iteration's folder;
a rerun skips every finished stage and resumes the first unfinished one (the simulation from its
shards, training from its last checkpoint, the evaluation from its response cache). With
``agent_server`` set the agents are served over HTTP: the loop starts a server for ``M_t`` on
127.0.0.1 (a free port), waits until ``/v1/models`` answers, and stops it after the simulation.

At the end the loop writes ``loop_summary.json`` (per-iteration figures), ``loop.png`` and
``table.txt``, and prints the table. The loop never imports the trainer: training and evaluation
(which scores likelihoods with the trainer's NLL) run as commands.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from pipeline.argparsing import parse
from pipeline.embedded import embedded_model_path
from pipeline.errors import UserError, run_command
from pipeline.launch import ROOT, stop_process, train_command
from pipeline.llm.base import BackendSpec, BudgetExceeded
from pipeline.llm.factory import OPENAI_BASE_URL
from pipeline.llm.ratings import SCALE
from pipeline.plots import SUMMARY_FILE
from pipeline.quality import TEXT_KINDS
from pipeline.records import ASPECTS, SCORE_FIELDS
from pipeline.shards import run_records
from pipeline.simulate import SimulationConfig, execute, run_simulation
from pipeline.textio import format_table, write_atomic
from pipeline.transform import TransformConfig, run_transform

PROG = "sandbox loop"
TrainFrom = Literal["previous", "base"]
TRAIN_FROM: tuple[str, ...] = get_args(TrainFrom)
STAGES = ("simulate", "transform", "train", "evaluate")
HELDOUT_QUESTIONS = ROOT / "pipeline" / "data" / "heldout_questions.txt"
TRANSFORMERS_SERVE = (
    f"{Path(sys.executable).with_name('transformers')} serve {{model}} --host {{host}} --port {{port}}"
)
"""``agent_server: transformers-serve``: the command template it stands for."""
HOST = "127.0.0.1"


@dataclass
class LoopConfig:
    """What ``sandbox loop`` runs, how many times, and where it writes.

    Fields by group (each field's help is in its metadata and on ``sandbox loop --help``):

    - loop: ``output``, ``iterations``, ``base_model``, ``train_from``.
    - society: ``simulation`` (a :class:`~pipeline.simulate.SimulationConfig`, config file only; the
      loop sets its output, agents' model and observer), ``observer``, ``agent_server``,
      ``server_timeout``.
    - training: ``keep_flagged`` (of the transform), ``train_config``, ``train_args``, ``launcher``.
    - evaluation: ``heldout_questions``, ``heldout_rounds``, ``heldout_groups``, ``eval_limit``,
      ``eval_max_tokens``, ``eval_samples``, ``eval_temperature``, ``eval_top_p``, ``eval_cache_from``.

    ``__post_init__`` checks every field (a :class:`UserError` names the problem).
    """

    output: str | None = field(
        default=None,
        metadata={"help": "the loop's folder (iter-00/, iter-01/, ...); required", "aliases": ["-o"]},
    )
    iterations: int = field(default=2, metadata={"help": "simulate -> transform -> train -> evaluate cycles"})
    base_model: str = field(
        default="embedded",
        metadata={"help": "M_0, the first agents: embedded (SmolLM2) or a model folder or Hub name"},
    )
    train_from: TrainFrom = field(
        default="previous",
        metadata={
            "help": "previous: M_{t+1} trains from M_t on iteration t's records; base: from the base model "
            "on the records of every iteration so far"
        },
    )
    simulation: SimulationConfig = field(
        default_factory=SimulationConfig,
        metadata={
            "help": "the society of every iteration (config file only); its agent's sampling settings are "
            "kept, its model is replaced by M_t",
            "cli": False,
        },
    )
    observer: BackendSpec = field(
        default_factory=lambda: BackendSpec(kind="embedded"),
        metadata={"help": "the pinned observer of every simulation and evaluation (default: embedded)"},
    )
    agent_server: str | None = field(
        default=None,
        metadata={
            "help": "serve M_t over HTTP for the simulation: transformers-serve, or a command template "
            "with {model}, {host} and {port} (e.g. 'vllm serve {model} --host {host} --port {port}'); "
            "none: the agents run in-process"
        },
    )
    server_timeout: float = field(
        default=600.0, metadata={"help": "seconds a started agent server has to answer /v1/models"}
    )
    keep_flagged: bool = field(
        default=False,
        metadata={"help": "train on texts with data-quality flags too (default: the transform drops them)"},
    )
    train_config: str = field(
        default=str(ROOT / "recipes" / "configs" / "train_demo.yaml"),
        metadata={"help": "the training recipe's YAML config (recipes/configs/...)"},
    )
    train_args: list[str] = field(
        default_factory=list,
        metadata={
            "help": "more flags for recipes/train.py, overriding its config (config file only)",
            "cli": False,
        },
    )
    launcher: list[str] = field(
        default_factory=lambda: ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"],
        metadata={
            "help": "flags of `accelerate launch` (e.g. --config_file accelerate_configs/deepspeed_zero3.yaml); "
            "default: one process (config file only: the values are flags themselves)",
            "cli": False,
        },
    )
    heldout_questions: str = field(
        default=str(HELDOUT_QUESTIONS),
        metadata={
            "help": "questions no iteration trains on: the evaluation's pool and the held-out society's"
        },
    )
    heldout_rounds: int = field(
        default=1, metadata={"help": "rounds of the held-out society that builds the fixed held-out groups"}
    )
    heldout_groups: str | None = field(
        default=None,
        metadata={"help": "a `sandbox transform` output of held-out groups; none: the loop builds it once"},
    )
    eval_limit: int | None = field(
        default=None, metadata={"help": "evaluate on the first N held-out questions; none: all"}
    )
    eval_max_tokens: int = field(default=96, metadata={"help": "longest answer in the evaluation, in tokens"})
    eval_samples: int = field(
        default=1,
        metadata={
            "help": "answers per held-out question and model (sandbox evaluate --samples); above 1, M_t's best "
            "vs worst answer to each question is a further set of preference pairs"
        },
    )
    eval_temperature: float = field(
        default=0.0, metadata={"help": "the evaluated models' sampling temperature; 0: greedy"}
    )
    eval_top_p: float = field(default=1.0, metadata={"help": "the evaluated models' nucleus sampling mass"})
    eval_cache_from: list[str] | None = field(
        default=None,
        metadata={
            "help": "exported response caches loaded into the evaluations' cache (sandbox evaluate "
            "--cache-from): the demo reads M0's answers and scores from make run's shipped base evaluation"
        },
    )

    def __post_init__(self) -> None:
        if not self.output:
            raise UserError("--output is required: the loop's folder")
        if self.iterations < 1:
            raise UserError(f"--iterations must be at least 1, got {self.iterations}")
        if self.train_from not in TRAIN_FROM:
            raise UserError(f"--train-from must be one of {', '.join(TRAIN_FROM)}")
        if not isinstance(self.simulation, SimulationConfig):
            raise UserError("simulation must be a mapping of simulation fields")
        if self.simulation.observer is not None:
            raise UserError(
                "set the observer once, as the loop's `observer`, not simulation.observer: every "
                "simulation and evaluation uses it"
            )
        if not isinstance(self.observer, BackendSpec) or self.observer.kind is None:
            raise UserError(
                "observer must be a mapping of backend fields with a kind (embedded, local, openai)"
            )
        observer_reference(self.observer)  # refuses an observer the evaluation cannot name
        if self.heldout_rounds < 1 or self.eval_max_tokens < 1 or self.server_timeout <= 0:
            raise UserError("heldout_rounds, eval_max_tokens and server_timeout must be positive")
        if self.eval_samples < 1 or (self.eval_samples > 1 and self.eval_temperature <= 0):
            raise UserError("eval_samples must be at least 1, and above 1 needs eval_temperature above 0")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise UserError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        if self.base_model != "embedded" and Path(self.base_model).expanduser().is_file():
            raise UserError(f"--base-model {self.base_model} is a file, not a model folder")
        for name in ("train_config", "heldout_questions"):
            if not Path(getattr(self, name)).expanduser().is_file():
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: no such file")
        for export in self.eval_cache_from or []:  # refused now, not after the first simulation and training
            if not Path(export).expanduser().is_file():
                raise UserError(f"--eval-cache-from {export}: no such file")
        if self.agent_server is not None:
            template = self.server_template
            if "{model}" not in template or "{port}" not in template:
                raise UserError(
                    "--agent-server must be transformers-serve or a template with {model} and {port}"
                )

    @property
    def output_dir(self) -> Path:
        return Path(self.output or "").expanduser()

    @property
    def server_template(self) -> str:
        return TRANSFORMERS_SERVE if self.agent_server == "transformers-serve" else self.agent_server or ""


def observer_reference(spec: BackendSpec) -> str:
    """The observer as ``sandbox evaluate --observer`` names it (embedded, a folder, MODEL@URL)."""
    if spec.kind == "embedded":
        return "embedded"
    if not spec.model:
        raise UserError(f"the {spec.kind} observer needs a model")
    if spec.kind == "local":
        return spec.model
    if len(spec.base_urls) > 1:
        raise UserError("the observer must have one base URL: the evaluation names it as MODEL@URL")
    if spec.api_key_env != BackendSpec.api_key_env:
        raise UserError(
            f"the evaluation reads an observer's key from {BackendSpec.api_key_env}; "
            f"set that variable instead of {spec.api_key_env}"
        )
    return f"{spec.model}@{(spec.base_urls or [OPENAI_BASE_URL])[0]}"


# -- the loop's folders -------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where everything of one loop lives."""

    root: Path

    def iteration(self, t: int) -> Path:
        return self.root / f"iter-{t:02d}"

    def sim(self, t: int) -> Path:
        return self.iteration(t) / "sim"

    def data(self, t: int) -> Path:
        return self.iteration(t) / "data"

    def model(self, t: int) -> Path:
        """The weights trained in iteration ``t``: ``M_{t+1}``."""
        return self.iteration(t) / "model"

    def eval(self, t: int) -> Path:
        return self.iteration(t) / "eval"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout"

    @property
    def eval_cache(self) -> Path:
        """One response cache for every evaluation: a model already scored is not asked again."""
        return self.root / "eval-cache.sqlite"


def model_reference(config: LoopConfig, layout: Layout, t: int) -> str:
    """``M_t`` as the command lines name it: the base model's reference, or the folder trained into."""
    return config.base_model if t == 0 else str(layout.model(t - 1))


def model_path(config: LoopConfig, layout: Layout, t: int) -> Path | str:
    """``M_t``'s weights (a folder, or a Hub name for a base model given by name)."""
    if t > 0:
        return layout.model(t - 1)
    return embedded_model_path() if config.base_model == "embedded" else config.base_model


def model_name(t: int) -> str:
    return "M0 (base)" if t == 0 else f"M{t}"


def in_process_agent(config: LoopConfig, layout: Layout, t: int) -> BackendSpec:
    """The agents' spec for ``M_t`` run in-process (the simulation's sampling settings kept)."""
    agent = config.simulation.agent
    if t == 0 and config.base_model == "embedded":
        return dataclasses.replace(agent, kind="embedded", model=None, base_urls=[])
    return dataclasses.replace(agent, kind="local", model=str(model_path(config, layout, t)), base_urls=[])


# -- the agent server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@contextmanager
def served(template: str, model: str, log: Path, timeout: float) -> Iterator[str]:
    """A server for ``model`` started from ``template`` on 127.0.0.1: its base URL, while it runs.

    Stopped (SIGTERM, then SIGKILL after 20 s) when the block ends, however it ends.
    """
    port = free_port()
    command = [part.format(model=model, host=HOST, port=port) for part in shlex.split(template)]
    print(f"   agent server: {shlex.join(command)} (log {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        try:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise UserError(f"cannot start the agent server {command[0]}: {exc.strerror or exc}") from exc
    url = f"http://{HOST}:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if server.poll() is not None:
                raise RuntimeError(
                    f"the agent server exited ({server.returncode}) before answering; see {log}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the agent server did not answer {url}/models within {timeout:.0f} s; see {log}"
                )
            time.sleep(0.5)
        yield url
    finally:
        stop_process(server)


@contextmanager
def agents(config: LoopConfig, layout: Layout, t: int, log: Path) -> Iterator[BackendSpec]:
    """The agents' spec for ``M_t``: in-process, or served over HTTP for as long as the block runs."""
    if config.agent_server is None:
        yield in_process_agent(config, layout, t)
        return
    model = str(model_path(config, layout, t))
    with served(config.server_template, model, log, config.server_timeout) as url:
        yield dataclasses.replace(config.simulation.agent, kind="openai", model=model, base_urls=[url])


# -- the stages ---------------------------------------------------------------------------------


def simulate(config: SimulationConfig) -> None:
    """One society, on the simulation's executor (as ``sandbox simulate`` runs it)."""
    executor = config.executor
    try:
        if executor.kind == "local" and executor.workers == 1:
            result = run_simulation(config)
        else:
            result = execute(config)
    except BudgetExceeded as exc:
        raise RuntimeError(f"the simulation stopped: {exc}") from exc
    if result.stopped:
        raise RuntimeError(f"simulation rank(s) {', '.join(map(str, result.stopped))} stopped early")


def simulation_config(
    config: LoopConfig, output: Path, agent: BackendSpec, **overrides: Any
) -> SimulationConfig:
    return dataclasses.replace(
        config.simulation, output=str(output), agent=agent, observer=config.observer, **overrides
    )


def run_subprocess(command: list[str], what: str) -> None:
    """Run one of the loop's commands in the repository; a failure stops the loop (resumable)."""
    print(f"   $ {shlex.join(command)}", flush=True)
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode})")


def evaluate_command(config: LoopConfig, layout: Layout, t: int, heldout_groups: Path) -> list[str]:
    """``sandbox evaluate``: ``M_t`` against ``M_{t+1}`` on the held-out questions, the pinned observer."""
    limit = ["--limit", str(config.eval_limit)] if config.eval_limit else []
    exports = ["--cache-from", *config.eval_cache_from] if config.eval_cache_from else []
    # The evaluation runs in the observer's dtype, so it scores with the judge (and calibration)
    # that scored the societies.
    dtype = ["--dtype", config.observer.dtype] if config.observer.dtype != "auto" else []
    return [
        sys.executable, "-m", "pipeline.cli", "evaluate",
        "--compare", model_reference(config, layout, t), model_reference(config, layout, t + 1),
        "--names", model_name(t), model_name(t + 1),
        "--observer", observer_reference(config.observer),
        "--questions", config.heldout_questions,
        "--heldout-groups", str(heldout_groups),
        "--max-tokens", str(config.eval_max_tokens),
        "--samples", str(config.eval_samples),
        "--temperature", str(config.eval_temperature),
        "--top-p", str(config.eval_top_p),
        "--cache", str(layout.eval_cache),
        "--output", str(layout.eval(t)),
        *limit,
        *exports,
        *dtype,
    ]  # fmt: skip


@dataclass(frozen=True)
class Stage:
    name: str
    folder: Path  # the folder holding the stage's ``<name>.done``
    run: Callable[[], None]

    @property
    def marker(self) -> Path:
        return self.folder / f"{self.name}.done"


def heldout_stages(config: LoopConfig, layout: Layout) -> list[Stage]:
    """The fixed held-out groups, built once by a society of the base model on the held-out questions."""
    sim, data = layout.heldout / "sim", layout.heldout / "data"

    def simulate_stage() -> None:
        with agents(config, layout, 0, layout.heldout / "agent-server.log") as agent:
            simulate(
                simulation_config(
                    config, sim, agent, questions=config.heldout_questions, rounds=config.heldout_rounds
                )
            )

    transform = TransformConfig(
        inputs=[str(sim)],
        output=str(data),
        style="conversational",
        overwrite=True,
        keep_flagged=config.keep_flagged,
    )
    return [
        Stage("simulate", layout.heldout, simulate_stage),
        Stage("transform", layout.heldout, lambda: run_transform(transform)),
    ]


def iteration_stages(config: LoopConfig, layout: Layout, t: int, heldout_groups: Path) -> list[Stage]:
    """The four stages of iteration ``t`` (see the module docstring)."""
    folder = layout.iteration(t)

    def simulate_stage() -> None:
        with agents(config, layout, t, folder / "agent-server.log") as agent:
            simulate(simulation_config(config, layout.sim(t), agent))

    sims = [layout.sim(i) for i in range(t + 1)] if config.train_from == "base" else [layout.sim(t)]
    transform = TransformConfig(
        inputs=[str(s) for s in sims],
        output=str(layout.data(t)),
        style="conversational",
        overwrite=True,
        keep_flagged=config.keep_flagged,
    )
    start = model_path(config, layout, 0 if config.train_from == "base" else t)

    def train_stage() -> None:
        command = train_command(
            config=config.train_config,
            model=start,
            dataset=layout.data(t) / "mixed",
            output_dir=layout.model(t),
            launcher=config.launcher,
            extra=config.train_args,
        )
        run_subprocess(command, "training")

    return [
        Stage("simulate", folder, simulate_stage),
        Stage("transform", folder, lambda: run_transform(transform)),
        Stage("train", folder, train_stage),
        Stage(
            "evaluate",
            folder,
            lambda: run_subprocess(evaluate_command(config, layout, t, heldout_groups), "evaluation"),
        ),
    ]


def run_stage(stage: Stage, label: str) -> float | None:
    """Run ``stage`` unless its marker says it is done; the seconds it took (``None``: skipped)."""
    if stage.marker.is_file():
        print(f"== {label} {stage.name}: already complete, skipped", flush=True)
        return None
    print(f"== {label} {stage.name}", flush=True)
    stage.folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stage.run()
    seconds = round(time.perf_counter() - started, 1)
    write_atomic(
        stage.marker, json.dumps({"stage": stage.name, "seconds": seconds, "pid": os.getpid()}) + "\n"
    )
    return seconds


# -- the figures --------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    read = [v for v in values if v is not None]
    return sum(read) / len(read) if read else None


def sandbox_figures(sim: Path) -> dict[str, Any]:
    """Mean observer scores of a society's drafts (before) and revisions (after), and its flag counts."""
    records = [r for r in run_records(sim) if r["status"] == "ok"]
    rounds = json.loads((sim / SUMMARY_FILE).read_text())
    return {
        "interactions": len(records),
        "failed": sum(row["failed"] for row in rounds),
        **{name: _mean([r["scores"][name] for r in records]) for name in SCORE_FIELDS},
        "flagged": {kind: sum(row.get(f"flagged_{kind}", 0) for row in rounds) for kind in TEXT_KINDS},
    }


def _model_figures(summary: dict[str, Any], name: str) -> dict[str, Any]:
    """One model's held-out observer scores and preference accuracies and margins from an evaluation's
    summary (no margin in one written before margins were measured)."""
    scores = {s["aspect"]: s for s in summary["observer_scores"] if s["model"] == name}
    preference = {p["pairs"]: p for p in summary["preference_accuracy"] if p["model"] == name}
    return {
        "heldout": {a: {k: scores[a][k] for k in ("mean", "ci95", "n")} for a in ASPECTS},
        "preference": {
            k: {f: p.get(f) for f in ("accuracy", "low", "high", "n", "margin")}
            for k, p in preference.items()
        },
    }


def iteration_figures(config: LoopConfig, layout: Layout, t: int) -> dict[str, Any]:
    """Everything ``loop_summary.json`` says about iteration ``t``."""
    summary = json.loads((layout.eval(t) / "summary.json").read_text())
    paired = {d["aspect"]: d for d in summary["paired_differences"] if d["model"] == model_name(t + 1)}
    margins = [d for d in summary.get("preference_margin_differences", []) if d["model"] == model_name(t + 1)]
    seconds = {}
    for stage in STAGES:
        marker = layout.iteration(t) / f"{stage}.done"
        seconds[stage] = json.loads(marker.read_text())["seconds"]
    return {
        "iteration": t,
        "agents": model_reference(config, layout, t),
        "trained": model_reference(config, layout, t + 1),
        "sandbox": sandbox_figures(layout.sim(t)),
        "agents_eval": _model_figures(summary, model_name(t)),
        "trained_eval": _model_figures(summary, model_name(t + 1)),
        "paired_trained_minus_agents": {
            a: {k: paired[a][k] for k in ("mean", "low", "high", "n")} for a in ASPECTS
        },
        "margin_trained_minus_agents": {
            d["pairs"]: {k: d[k] for k in ("mean", "low", "high", "n")} for d in margins
        },
        "seconds": seconds,
    }


def _num(value: float | None, fmt: str = ".2f") -> str | None:
    return None if value is None else f"{value:{fmt}}"


def _interval(d: dict[str, Any], key: str, fmt: str) -> str | None:
    if d.get(key) is None:
        return None
    bounds = f" [{d['low']:{fmt}}, {d['high']:{fmt}}]" if d.get("low") is not None else ""
    return f"{d[key]:{fmt}}{bounds}"


def loop_table(iterations: Sequence[dict[str, Any]]) -> str:
    """One row per iteration: the society of ``M_t``, then ``M_{t+1}`` on held-out data."""
    header = (
        "iter",
        "align before",
        "align after",
        "engage before",
        "engage after",
        "flagged " + "/".join(TEXT_KINDS),
        "trained: held-out align",
        "engage",
        "pref labelled",
        "pref held-out",
        "pref M_t's answers: M_t -> trained",
        "trained - agents labelled margin",
        "trained - agents align",
        "engage",
    )
    rows = []
    for it in iterations:
        sandbox, trained, paired = it["sandbox"], it["trained_eval"], it["paired_trained_minus_agents"]
        flagged = "/".join(str(sandbox["flagged"][kind]) for kind in TEXT_KINDS)
        preference = trained["preference"]
        own = (it["agents_eval"]["preference"].get("sampled", {}), preference.get("sampled", {}))
        rows.append(
            (
                it["iteration"],
                *(_num(sandbox[name]) for name in ("alignment_before", "alignment_after")),
                *(_num(sandbox[name]) for name in ("engagement_before", "engagement_after")),
                flagged,
                *(_num(trained["heldout"][a]["mean"]) for a in ASPECTS),
                *(
                    _interval(preference.get(k, {}), "accuracy", ".2f")
                    for k in ("labelled", "heldout_groups")
                ),
                None
                if any(p.get("accuracy") is None for p in own)
                else " -> ".join(_num(p["accuracy"]) for p in own),
                _interval(it.get("margin_trained_minus_agents", {}).get("labelled", {}), "mean", "+.3f"),
                *(_interval(paired[a], "mean", "+.2f") for a in ASPECTS),
            )
        )
    return format_table(header, rows)


def plot_loop(iterations: Sequence[dict[str, Any]]) -> bytes:
    """A PNG across models ``M_0 .. M_T``: observer scores (the society of ``M_t``, held-out answers of
    ``M_t``) and preference accuracy with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    models = [it["agents_eval"] for it in iterations] + [iterations[-1]["trained_eval"]]
    xs = list(range(len(models)))
    fig, (scores_ax, pref_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for index, aspect in enumerate(ASPECTS):
        color = f"C{index}"
        sandbox = [it["sandbox"] for it in iterations]
        scores_ax.plot(xs[:-1], [s[f"{aspect}_before"] for s in sandbox], ":", color=color, marker="o",
                       label=f"{aspect}: society drafts")  # fmt: skip
        scores_ax.plot(xs[:-1], [s[f"{aspect}_after"] for s in sandbox], "--", color=color, marker="s",
                       label=f"{aspect}: society revisions")  # fmt: skip
        scores_ax.plot(xs, [m["heldout"][aspect]["mean"] for m in models], "-", color=color, marker="D",
                       label=f"{aspect}: held-out answers")  # fmt: skip
    scores_ax.set_ylim(1, SCALE)
    scores_ax.set_ylabel(f"mean observer score (1-{SCALE})")
    scores_ax.set_title("observer scores of M_t")
    for index, key in enumerate(("labelled", "heldout_groups")):
        points = [m["preference"].get(key, {}) for m in models]
        if all(p.get("accuracy") is None for p in points):
            continue
        values = [p.get("accuracy") for p in points]
        errors = [
            [
                (v - p["low"]) if v is not None and p.get("low") is not None else 0
                for v, p in zip(values, points, strict=True)
            ],
            [
                (p["high"] - v) if v is not None and p.get("high") is not None else 0
                for v, p in zip(values, points, strict=True)
            ],
        ]
        pref_ax.errorbar(xs, [float("nan") if v is None else v for v in values], yerr=errors, marker="o",
                         capsize=4, color=f"C{index + 2}", label=key.replace("_", " "))  # fmt: skip
    pref_ax.axhline(0.5, color="grey", lw=0.8)
    pref_ax.set_ylim(0, 1)
    pref_ax.set_ylabel("preference accuracy")
    pref_ax.set_title("M_t prefers the better answer (95% interval)")
    for ax in (scores_ax, pref_ax):
        ax.set_xticks(xs, [f"M{x}" for x in xs])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


# -- the loop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopResult:
    """What :func:`run_loop` leaves: per-iteration figures, the table and where the files are."""

    output: Path
    iterations: list[dict[str, Any]]
    table: str
    plot: Path


def run_loop(config: LoopConfig) -> LoopResult:
    """Run (or resume) the loop of ``config`` and write its summary, table and plot.

    Raises :class:`UserError` for bad input and ``RuntimeError`` for a stage that failed (a
    training or evaluation command, an agent server, a simulation stopped early); every stage
    finished before it is kept and a rerun resumes at the first unfinished one.
    """
    layout = Layout(config.output_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.root / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    if config.heldout_groups is None:
        for stage in heldout_stages(config, layout):
            run_stage(stage, "held-out groups:")
        heldout_groups = layout.heldout / "data"
    else:
        heldout_groups = Path(config.heldout_groups).expanduser()
    for t in range(config.iterations):
        for stage in iteration_stages(config, layout, t, heldout_groups):
            run_stage(stage, f"iteration {t}:")
    iterations = [iteration_figures(config, layout, t) for t in range(config.iterations)]
    table = loop_table(iterations)
    write_atomic(layout.root / "table.txt", table + "\n")
    plot = layout.root / "loop.png"
    write_atomic(plot, plot_loop(iterations))
    write_atomic(layout.root / "loop_summary.json", json.dumps({"iterations": iterations}, indent=2) + "\n")
    return LoopResult(layout.root, iterations, table, plot)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        config, _ = parse(LoopConfig, argv, PROG, __doc__.splitlines()[0])
        try:
            result = run_loop(config)
        except RuntimeError as exc:
            print(f"{PROG}: stopped: {exc}; finished stages are kept, rerun the same command to resume",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(result.table)
        print(f"summary: {result.output / 'loop_summary.json'}; plot: {result.plot}")
        return 0

    return run_command(PROG, body)
