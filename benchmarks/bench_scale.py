"""Scale-out: one run of several 10x10 worlds in one process vs on Ray workers, same server.

    .venv/bin/python benchmarks/bench_scale.py [--worlds 8] [--size 10] [--rounds 2] [--workers 2]
        [--servers 2] [--delay 0.2]

Fake OpenAI-compatible servers (``bench_simulate.serve``, each in its own process on 127.0.0.1)
answer every call after ``delay`` seconds; the agents' backend is a pool of them. The run is
``worlds`` worlds (one stance, seeds 0..worlds-1) of ``size x size`` agents for ``rounds`` rounds,
about ``(6 + k) x size^2 x worlds x rounds`` calls, once through ``execute`` with ``--executor
local --workers 1`` (one process, every world at once) and once with ``--executor ray --workers
N`` on a local Ray cluster started beforehand (so its start is not timed; each Ray worker's first
import of the package is). Both runs have their response cache off and end with the same records.

Reported: wall time of each run (``SimulationResult.seconds``: placing and running the ranks, not
the setup or the summary plot) and their ratio. With every world running at once, one process is
bound by its client CPU (about 1.4-2.6 ms per call, see bench_simulate.py); workers on more cores
divide it, as long as the servers and the cores keep up (on a 2-core machine they do not: the
servers need CPU too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_servers(count: int, delay: float) -> tuple[list[subprocess.Popen], list[str]]:
    script = ROOT / "benchmarks" / "bench_simulate.py"
    servers = [
        subprocess.Popen(
            [sys.executable, str(script), "--serve", "--delay", str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    return servers, [server.stdout.readline().strip() for server in servers]


def timed_run(args: argparse.Namespace, urls: list[str], output: Path, kind: str, workers: int):
    from pipeline.executors import ExecutorConfig
    from pipeline.llm import BackendSpec
    from pipeline.simulate import SimulationConfig, execute

    spec = BackendSpec(
        kind="openai",
        model="fake",
        base_urls=urls,
        # Per endpoint: one world's widest step, as recipes/configs/simulate_paper.yaml; more only
        # queues requests on a machine whose cores are busy with the client and the servers.
        max_concurrency=(args.k + 2) * args.size**2,
        timeout=300,
        cache_mode="off",
    )
    config = SimulationConfig(
        output=str(output),
        size=args.size,
        rounds=args.rounds,
        k=args.k,
        seeds=list(range(args.worlds)),
        agent=spec,
        flush_every=args.size**2,
        executor=ExecutorConfig(kind=kind, workers=workers),
    )
    result = execute(config)
    assert not result.stopped and result.failed == 0, result
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, default=8)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--servers", type=int, default=2, help="fake server processes (a pool)")
    parser.add_argument("--delay", type=float, default=0.2)
    args = parser.parse_args()

    import ray

    from pipeline.shards import run_records

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    servers, urls = start_servers(args.servers, args.delay)
    calls = (6 + args.k) * args.size**2 * args.worlds * args.rounds
    try:
        with tempfile.TemporaryDirectory() as folder:
            one = timed_run(args, urls, Path(folder) / "one", "local", 1)
            ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="warning")
            try:
                spread = timed_run(args, urls, Path(folder) / "ray", "ray", args.workers)
            finally:
                ray.shutdown()
            same = run_records(Path(folder) / "one") == run_records(Path(folder) / "ray")
        print(
            f"{args.worlds} worlds of {args.size}x{args.size}, {args.rounds} rounds, {calls} calls, "
            f"{args.servers} servers answering after {args.delay * 1000:.0f} ms, {os.cpu_count()} CPUs"
        )
        print(
            f"one process:        {one.seconds:6.2f} s   ({1000 * one.cpu_seconds / calls:.2f} ms CPU/call)"
        )
        print(
            f"ray, {args.workers} workers:     {spread.seconds:6.2f} s   one process / ray = "
            f"{one.seconds / spread.seconds:.2f}   same records: {same}"
        )
    finally:
        for server in servers:
            server.stdin.close()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
