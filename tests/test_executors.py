"""Executors: a run's ranks as local processes, Ray tasks or a Slurm job array give the records of
one process, also when a worker process is killed mid-world (SIGKILL from the loopback server on
its N-th request: a deterministic trigger) and when a run is resumed with another --workers.

The Ray cluster is a real local one (2 CPUs, 127.0.0.1, no dashboard, usage stats off), started
once for this module by the fixture ``ray_cluster`` and shut down by it before other modules run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import calls_per_interaction
from conftest import run_records as records

from pipeline.executors import ExecutorConfig, ray_options, slurm_script
from pipeline.llm.base import BackendSpec
from pipeline.llm.layers import LimitedBackend
from pipeline.llm.testing import FakeOpenAIServer
from pipeline.shards import run_records
from pipeline.simulate import SimulationConfig, main, rank_share, run_simulation

SECRET = "sk-test-never-store-9876543210"
KEY_ENV = "SANDBOX_EXECUTOR_TEST_KEY"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Path]:
    """A local Ray cluster for this module's tests, stopped before other modules run; yields its temporary folder."""
    ray = pytest.importorskip("ray")
    saved = {name: os.environ.get(name) for name in (KEY_ENV, "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE")}
    # Workers inherit the driver's environment: the key reaches them without Ray carrying it.
    os.environ.update({KEY_ENV: SECRET, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp),
        logging_level="warning",
    )
    try:
        yield temp
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def keyed_server(sandbox_server, monkeypatch) -> FakeOpenAIServer:
    """The sandbox's loopback server, refusing any key but :data:`SECRET` (so a rank that did not get
    the key from its environment fails loudly)."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    sandbox_server.api_key = SECRET
    return sandbox_server


def write_config(path: Path, url: str, **fields) -> Path:
    config = {
        "size": 3,
        "rounds": 2,
        "stances": ["all_good", "half_half", "all_bad"],  # 3 worlds
        "k": 2,
        "flush_every": 3,
        "agent": {
            "kind": "openai",
            "model": "fake",
            "base_urls": [url],
            "api_key_env": KEY_ENV,
            "max_retries": 0,
            "max_concurrency": 64,
        },
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def reference(tmp_path: Path, config: Path) -> list[dict]:
    out = tmp_path / "one-process"
    assert main(["--config", str(config), "-o", str(out), "--no-progress"]) == 0
    rows = records(out)
    assert len(rows) == 3 * 2 * 9 and all(r["status"] == "ok" for r in rows)
    return rows


def files_holding(folder: Path, text: str) -> list[Path]:
    needle = text.encode()
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_ray_ranks_with_a_killed_worker_equal_one_process(tmp_path, keyed_server, ray_cluster, capfd):
    config = write_config(tmp_path / "sim.yaml", keyed_server.base_url)
    expected = reference(tmp_path, config)

    out = tmp_path / "ray"
    # Mid-world: the ranks make 432 calls between them; the sender of the 150th dies.
    keyed_server.kill_sender_at = len(keyed_server.requests) + 150
    argv = ["--config", str(config), "-o", str(out), "--executor", "ray", "--workers", "2"]
    assert main([*argv, "--no-progress"]) == 0, capfd.readouterr().err
    assert len(keyed_server.killed) == 1  # Ray retried the task whose worker died
    assert records(out) == expected
    assert json.loads((out / "summary.json").read_text()) == json.loads(
        (tmp_path / "one-process" / "summary.json").read_text()
    )
    # The key reached the workers through their environment only.
    assert SECRET not in json.dumps(ray_options(ExecutorConfig(kind="ray", workers=2)))
    assert not files_holding(ray_cluster, SECRET) and not files_holding(out, SECRET)
    assert SECRET not in "".join(capfd.readouterr())


@pytest.mark.slow
def test_local_ranks_restart_a_killed_worker_and_resume_with_other_workers(tmp_path, keyed_server, capfd):
    config = write_config(tmp_path / "sim.yaml", keyed_server.base_url)
    expected = reference(tmp_path, config)

    # A killed worker process is started again and resumes its worlds.
    out = tmp_path / "local"
    keyed_server.kill_sender_at = len(keyed_server.requests) + 150
    argv = ["--config", str(config), "-o", str(out), "--executor", "local", "--no-progress"]
    assert main([*argv, "--workers", "2"]) == 0
    assert len(keyed_server.killed) == 1 and records(out) == expected
    assert "rank" in capfd.readouterr().err  # the executor said which rank it restarted

    # A run stopped part way in one process, resumed by 3 workers: the same records.
    stopped = tmp_path / "stopped"
    argv = ["--config", str(config), "-o", str(stopped), "--no-progress"]
    assert main([*argv, "--agent.call-budget", "300"]) == 1  # round 0 (270 calls) and a bit
    partial = records(stopped)
    assert 0 < len(partial) < len(expected)
    calls = len(keyed_server.requests)
    assert main([*argv, "--executor", "local", "--workers", "3"]) == 0
    assert records(stopped) == expected
    # Each world's own cache answered what the stopped run had already asked.
    assert len(keyed_server.requests) - calls <= calls_per_interaction() * (len(expected) - len(partial))
    assert not files_holding(stopped, SECRET) and SECRET not in "".join(capfd.readouterr())


@pytest.mark.slow
def test_slurm_script_run_per_array_task_then_merge(tmp_path, keyed_server, capsys):
    config = write_config(tmp_path / "sim.yaml", keyed_server.base_url)
    expected = reference(tmp_path, config)
    capsys.readouterr()

    out = tmp_path / "slurm"
    flags = ["--executor", "slurm", "--workers", "2", "--executor.slurm-options=--partition=debug"]
    assert main(["--config", str(config), "-o", str(out), *flags, "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1" in script and "#SBATCH --partition=debug" in script
    assert SECRET not in script and KEY_ENV in script  # the variable's name, never its value
    assert not out.exists()  # a dry run writes nothing

    path = tmp_path / "job.sh"
    path.write_text(script)
    tasks = [
        subprocess.Popen(
            ["bash", str(path)],
            env={**os.environ, "SLURM_ARRAY_TASK_ID": str(rank)},
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err
    assert records(out) == expected

    # The last rank to finish wrote the summary; a merge recomputes the same, byte for byte.
    one = tmp_path / "one-process"
    assert (out / "summary.json").read_bytes() == (one / "summary.json").read_bytes()
    (out / "summary.json").unlink()
    (out / "rounds.png").unlink()
    assert main(["--merge", str(out)]) == 0
    assert "half_half-seed0" in capsys.readouterr().out
    assert (out / "summary.json").read_bytes() == (one / "summary.json").read_bytes()
    assert (out / "rounds.png").read_bytes() == (one / "rounds.png").read_bytes()


def test_slurm_script_shape_and_refusals(tmp_path, capsys):
    executor = ExecutorConfig(kind="slurm", workers=4, cpus_per_worker=2.5, gpus_per_worker=1)
    script = slurm_script(
        executor,
        ["python", "-m", "pipeline.cli", "simulate", "--config", "/dev/stdin"],
        stdin="size: 3\n",
        job_name="sandbox-x",
        log_dir=tmp_path / "logs",
        workdir=tmp_path,
    )
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=sandbox-x\n#SBATCH --array=0-3\n")
    assert "#SBATCH --cpus-per-task=3\n#SBATCH --gpus-per-task=1\n" in script
    assert '--rank "$SLURM_ARRAY_TASK_ID" --num-ranks 4' in script
    assert script.endswith("size: 3\nSANDBOX_RANK_CONFIG\n")

    for flags, message in [
        (["--dry-run"], "add --executor slurm"),
        (["--executor", "ray", "--workers", "2", "--rank", "1", "--num-ranks", "2"], "use one"),
        (["--workers", "0"], "workers must be at least 1"),
        (["--executor", "pbs"], "unknown executor 'pbs'"),
        (["--merge", str(tmp_path)], "holds no sandbox worlds"),
        (["--executor", "slurm", "--size", "3", "--k", "2"], "sbatch not found"),  # no Slurm here
    ]:
        assert main(["-o", str(tmp_path / "run"), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "run").exists()


def test_rank_share_divides_budgets_and_rate():
    spec = BackendSpec(kind="openai", model="m", call_budget=10, token_budget=None, requests_per_minute=600)
    shares = [rank_share(spec, rank, 3) for rank in range(3)]
    assert [s.call_budget for s in shares] == [4, 3, 3] and sum(s.call_budget for s in shares) == 10
    assert all(s.requests_per_minute == 200 and s.token_budget is None for s in shares)
    assert rank_share(spec, 0, 1) is spec


def test_the_worlds_of_a_rank_run_at_once_under_one_cap(tmp_path, recording_backend):
    backend = recording_backend(delay=0.02)
    capped = LimitedBackend(backend, max_concurrency=5)
    config = SimulationConfig(output=str(tmp_path), size=3, rounds=1, k=2, stances=["all_good", "all_bad"])
    run_simulation(config, backends=(capped, capped), progress=False)
    world_of = {r["draft"]: r["world_id"] for r in run_records(tmp_path)}
    drafts = [c for c in backend.calls if c.kind == "draft"]
    good = [c for c in drafts if world_of[c.output] == "all_good-seed0"]
    bad = [c for c in drafts if world_of[c.output] == "all_bad-seed0"]
    assert len(good) == len(bad) == 9
    assert min(c.start for c in bad) < max(c.end for c in good)  # neither world waits for the other
    calls = backend.calls
    peak = max(sum(c.start <= t < c.end for c in calls) for t in (c.start for c in calls))
    assert (
        peak == 5 and len(calls) == 2 * 9 * calls_per_interaction()
    )  # the one cap holds for both worlds together
