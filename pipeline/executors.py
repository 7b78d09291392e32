"""Where a stage's ranks run: processes on this machine, a Ray cluster, or a Slurm job array.

The pattern of datatrove's executors: a stage splits its work into ``workers`` ranks, and a rank
task ``task(payload, rank, world_size) -> int`` does rank ``rank``'s share (the sandbox: worlds
``rank, rank + world_size, ...``). The task returns its exit status: 0 done, 1 stopped early with
its work kept (a spent budget, an outage), 2 refused (a :class:`UserError`). An executor only
places the tasks and restarts those whose process died; it knows nothing of the stage. Tasks
share nothing but the files they write, so a rank that is restarted resumes from them.

- ``local``: ``workers`` processes on this machine (one rank in this process when ``workers`` is
  1). Each gets ``cpus // workers`` torch threads; a process killed by a signal is started again,
  up to ``task_retries`` times. As with any multiprocessing program, a script that starts several
  local workers needs the ``if __name__ == "__main__":`` guard.
- ``ray``: one Ray task per rank on the cluster at ``ray_address`` (or a local one started for
  the run and shut down after it), with ``cpus_per_worker`` and ``gpus_per_worker`` reserved per
  task and Ray's own retries (``max_retries=task_retries``) for a task whose worker died.
- ``slurm``: a job array, one rank per array task; :func:`slurm_script` writes the ``sbatch``
  script, :func:`submit_slurm` submits it.

No secret travels with a task: keys stay in the environment variables the stage's config names.
Ray's runtime environment is left alone (Ray stores and logs it), so on a cluster the variables
must be set where the workers start (``ray start``'s environment); a local cluster and Slurm
(``--export=ALL``, its default) pass the submitting shell's environment on.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Literal, get_args

from pipeline.errors import UserError

ExecutorKind = Literal["local", "ray", "slurm"]
EXECUTOR_KINDS: tuple[str, ...] = get_args(ExecutorKind)

RankTask = Callable[[Any, int, int], int]
"""``task(payload, rank, world_size) -> exit status``; a module-level function (it is pickled)."""

DONE, STOPPED, REFUSED = 0, 1, 2


@dataclass
class ExecutorConfig:
    """How a stage's ranks are placed (none of it changes what they produce).

    Fields by group (each field's help is in its metadata and on the command line):

    - placement: ``kind`` (``--executor``), ``workers`` (``--workers``), ``task_retries``
    - ray: ``ray_address``, ``cpus_per_worker``, ``gpus_per_worker``
    - slurm: ``cpus_per_worker``, ``gpus_per_worker``, ``slurm_options``
    """

    kind: ExecutorKind = field(
        default="local",
        metadata={
            "help": "local: processes on this machine; ray: tasks on a Ray cluster; slurm: a job array "
            "(--dry-run prints its sbatch script)",
            "aliases": ["--executor"],
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "ranks to launch, 0 .. workers-1, each running its share",
            "aliases": ["--workers"],
        },
    )
    task_retries: int = field(
        default=3, metadata={"help": "times a rank whose process died is started again (local, ray)"}
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "ray: the cluster to join (auto, ray://host:10001); none: start a local one"},
    )
    cpus_per_worker: float = field(default=1.0, metadata={"help": "ray and slurm: CPUs reserved per rank"})
    gpus_per_worker: float = field(
        default=0.0, metadata={"help": "ray and slurm: GPUs reserved per rank (in-process models)"}
    )
    slurm_options: list[str] = field(
        default_factory=list,
        metadata={
            "help": "slurm: extra sbatch options, one per #SBATCH line (--partition=gpu --time=4:00:00)"
        },
    )

    def __post_init__(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise UserError(f"unknown executor {self.kind!r}; choose from {', '.join(EXECUTOR_KINDS)}")
        if self.workers < 1:
            raise UserError(f"workers must be at least 1, got {self.workers}")
        if self.task_retries < 0 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise UserError("task_retries and gpus_per_worker must not be negative, cpus_per_worker positive")
        if (
            self.gpus_per_worker
            and self.kind == "slurm"
            and self.gpus_per_worker != int(self.gpus_per_worker)
        ):
            raise UserError("slurm reserves whole GPUs: gpus_per_worker must be a whole number")


def run_ranks(config: ExecutorConfig, task: RankTask, payload: Any) -> list[int]:
    """Run ranks ``0 .. config.workers - 1`` of ``task`` with ``config.kind`` and return their exit
    statuses, in rank order. A rank whose process died more than ``task_retries`` times gets status 1
    (its finished work is on disk); a rank's :class:`UserError` is raised here."""
    if config.kind == "local":
        return _run_local(config, task, payload)
    if config.kind == "ray":
        return _run_ray(config, task, payload)
    raise UserError("slurm ranks run as a job array: write it with slurm_script and submit it with sbatch")


# -- local ------------------------------------------------------------------------------------


def _local_rank(task: RankTask, payload: Any, rank: int, world_size: int, threads: int) -> None:
    import torch

    # Ranks share this machine's cores: torch must not start one thread per core in each of them.
    torch.set_num_threads(threads)
    sys.exit(task(payload, rank, world_size))


def _run_local(config: ExecutorConfig, task: RankTask, payload: Any) -> list[int]:
    if config.workers == 1:
        return [task(payload, 0, 1)]
    # Not a plain fork: a child would inherit this process's threads and event-loop state. A fork
    # server imports the task's module once and forks each rank from that clean, single process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([task.__module__])
    threads = max(1, (os.cpu_count() or 1) // config.workers)

    def start(rank: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_local_rank,
            args=(task, payload, rank, config.workers, threads),
            name=f"rank-{rank}",
        )
        process.start()
        return process

    running = {rank: start(rank) for rank in range(config.workers)}
    restarts = dict.fromkeys(running, 0)
    statuses: dict[int, int] = {}
    while running:
        wait([process.sentinel for process in running.values()])
        for rank, process in list(running.items()):
            if process.exitcode is None:
                continue
            process.join()
            del running[rank]
            if process.exitcode >= 0:
                statuses[rank] = process.exitcode
            elif restarts[rank] < config.task_retries:  # killed by a signal: the process died, not the task
                restarts[rank] += 1
                _say(f"rank {rank}'s process died (signal {-process.exitcode}); restart {restarts[rank]}")
                running[rank] = start(rank)
            else:
                _say(f"rank {rank}'s process died {restarts[rank] + 1} times; its finished work is kept")
                statuses[rank] = STOPPED
    if REFUSED in statuses.values():
        refused = sorted(rank for rank, status in statuses.items() if status == REFUSED)
        raise UserError(f"rank(s) {', '.join(map(str, refused))} refused to run (see their error above)")
    return [statuses[rank] for rank in range(config.workers)]


def _say(message: str) -> None:
    sys.stderr.write(f"executor: {message}\n")


# -- ray ----------------------------------------------------------------------------------------


def ray_options(config: ExecutorConfig) -> dict[str, Any]:
    """The options of each rank's Ray task: resources and retries, and nothing else (no runtime
    environment: Ray stores and logs it, and the workers inherit the keys' variables)."""
    return {
        "num_cpus": config.cpus_per_worker,
        "num_gpus": config.gpus_per_worker,
        "max_retries": config.task_retries,
        "retry_exceptions": False,
    }


def _run_ray(config: ExecutorConfig, task: RankTask, payload: Any) -> list[int]:
    try:
        import ray
        from ray.exceptions import RayTaskError, WorkerCrashedError
    except ImportError as exc:
        raise UserError("the ray executor needs Ray: pip install 'stable-alignment[ray]'") from exc
    started = not ray.is_initialized()
    if started:  # joins ray_address, or RAY_ADDRESS, or starts a local cluster for this run
        ray.init(address=config.ray_address, include_dashboard=False, logging_level="warning")
    try:
        remote = ray.remote(task).options(**ray_options(config))
        refs = [remote.remote(payload, rank, config.workers) for rank in range(config.workers)]
        statuses = []
        for rank, ref in enumerate(refs):
            try:
                statuses.append(ray.get(ref))
            except RayTaskError as exc:
                if isinstance(exc.cause, UserError):
                    raise exc.cause from None
                raise
            except WorkerCrashedError:
                _say(f"rank {rank}'s worker died {config.task_retries + 1} times; its finished work is kept")
                statuses.append(STOPPED)
        return statuses
    finally:
        if started:
            ray.shutdown()


# -- slurm -------------------------------------------------------------------------------------

_HEREDOC = "SANDBOX_RANK_CONFIG"


def slurm_script(
    config: ExecutorConfig,
    command: Sequence[str],
    *,
    stdin: str,
    job_name: str,
    log_dir: Path,
    workdir: Path,
) -> str:
    """An ``sbatch`` job-array script: array task ``i`` runs ``command --rank i --num-ranks
    workers`` in ``workdir``, with ``stdin`` (the rank's config) as its standard input.

    The script is self-contained (``bash script`` with ``SLURM_ARRAY_TASK_ID`` set runs one rank),
    so ``--dry-run`` output can be submitted as it is.
    """
    if _HEREDOC in stdin:
        raise UserError(f"a rank's config may not contain the line {_HEREDOC}")
    options = [
        f"--job-name={job_name}",
        f"--array=0-{config.workers - 1}",
        f"--cpus-per-task={math.ceil(config.cpus_per_worker)}",
        *([f"--gpus-per-task={int(config.gpus_per_worker)}"] if config.gpus_per_worker else []),
        f"--output={log_dir}/%A_%a.log",
        "--requeue",
        *config.slurm_options,
    ]
    rank = ["--rank", '"$SLURM_ARRAY_TASK_ID"', "--num-ranks", str(config.workers)]
    return "\n".join(
        [
            "#!/bin/bash",
            *(f"#SBATCH {option}" for option in options),
            "# One rank per array task; ranks share nothing but the run folder. API keys are read at run",
            "# time from the variables the config names (sbatch passes the submitting environment on).",
            "set -euo pipefail",
            f"mkdir -p {shlex.quote(str(log_dir))}",
            f"cd {shlex.quote(str(workdir))}",
            f"exec {shlex.join(command)} {' '.join(rank)} <<'{_HEREDOC}'",
            stdin.rstrip("\n"),
            _HEREDOC,
            "",
        ]
    )


def sbatch() -> str:
    """The ``sbatch`` command's path, or a :class:`UserError` when this is no Slurm login node."""
    found = shutil.which("sbatch")
    if found is None:
        raise UserError(
            "sbatch not found: submit from a Slurm login node, or print the script with --dry-run"
        )
    return found


def submit_slurm(script: Path, command: str) -> str:
    """Submit a job script with ``command`` (:func:`sbatch`); returns the job id."""
    done = subprocess.run([command, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch refused {script}: {' '.join(done.stderr.split())}")
    return done.stdout.strip().split(";")[0]
