"""Outages never become data, on both HTTP transports (aiohttp and httpx fail with different
exception types under the openai client): a bad endpoint stops a run before it writes anything;
faults of every kind are retried away; a burst trips the circuit breaker (exit 1, work kept) and
``--retry-failed`` repairs what an outage left, giving the records of a run that never had one.

All against the loopback fake server with its seeded fault schedule; one reference run (no
faults) serves every test of the module.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import calls_per_interaction, sandbox_reply
from conftest import run_records as records

from pipeline.llm.testing import FAULTS, FakeOpenAIServer, FaultSchedule
from pipeline.simulate import main

TRANSPORTS = ["aiohttp", "httpx"]
SECRET = "sk-test-outage-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(delay=0.005, reply=sandbox_reply, models=["fake"]) as server:
        yield server


@pytest.fixture
def healthy(server: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    """The module's server; whatever fault schedule a test gives it is removed after the test."""
    yield server
    server.schedule = None


def write_config(path: Path, url: str, transport: str, **fields) -> Path:
    config = {
        "size": 3,
        "rounds": 2,
        "stances": ["all_good", "half_half"],
        "k": 2,
        "flush_every": 3,
        "retry_wait": 0.05,
        "agent": {
            "kind": "openai",
            "model": "fake",
            "base_urls": [url],
            "transport": transport,
            "timeout": 1.0,  # a hung request costs a second, not the default minute
            "max_concurrency": 64,
        },
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def expected(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The records of the run without any outage."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder / "sim.yaml", server.base_url, "aiohttp")
    assert main(["--config", str(config), "-o", str(folder / "run"), "--no-progress"]) == 0
    rows = records(folder / "run")
    assert len(rows) == 2 * 2 * 9 and all(r["status"] == "ok" for r in rows)
    return rows


def _closed_port_url() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_bad_endpoint_is_one_line_exit_2_and_nothing_written(
    tmp_path, healthy, transport, capsys, monkeypatch
):
    monkeypatch.setenv("OUTAGE_TEST_KEY", SECRET)
    with FakeOpenAIServer(api_key=SECRET, models=["fake"]) as keyed:
        config = write_config(tmp_path / "sim.yaml", keyed.base_url, transport)
        closed = _closed_port_url()
        judge = ["--observer.model", "judge", "--observer.transport", transport]
        cases = [
            (["--agent.base-urls", closed], f"the agent backend: cannot reach {closed}: "),
            (["--agent.api-key-env", "NO_SUCH_KEY_VAR"], "refused the API key (HTTP 401"),
            (["--agent.model", "gpt-9"], "does not serve model 'gpt-9' (it serves: fake)"),
            ([*judge, "--observer.base-urls", keyed.base_url], "the observer backend: "),
        ]
        for flags, message in cases:
            argv = ["--config", str(config), "-o", str(tmp_path / "run"), "--no-progress"]
            assert main([*argv, "--agent.api-key-env", "OUTAGE_TEST_KEY", *flags]) == 2, flags
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1 and SECRET not in err, (flags, err)
            assert not (tmp_path / "run").exists(), flags
        assert not keyed.requests  # not one chat request: only the preflight's model lists


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_thirty_percent_faults_of_every_kind_leave_at_most_five_percent_failed(
    tmp_path, healthy, transport, capsys
):
    healthy.schedule = FaultSchedule(rate=0.3, seed=7)
    seen = len(healthy.faults)
    # Default retries (the client's 3, ours 3 for unreadable bodies, 2 per interaction).
    config = write_config(tmp_path / "sim.yaml", healthy.base_url, transport, size=4)
    assert main(["--config", str(config), "-o", str(tmp_path / "run"), "--no-progress"]) == 0
    rows = records(tmp_path / "run")
    faults = healthy.faults[seen:]
    assert len(rows) == 2 * 2 * 16
    assert {fault for fault in faults if fault} == set(FAULTS)  # every kind happened
    assert 0.2 < sum(f is not None for f in faults) / len(faults) < 0.4
    failed = sum(r["status"] != "ok" for r in rows)
    assert failed / len(rows) <= 0.05, [r["error"] for r in rows if r["error"]]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_burst_trips_the_breaker_and_the_run_resumes_cleanly(
    tmp_path, healthy, expected, transport, capsys
):
    config = write_config(tmp_path / "sim.yaml", healthy.base_url, transport, breaker_window=20)
    # From the run's 180th request on (round 0 takes 144), every request fails: an endpoint gone down.
    healthy.schedule = FaultSchedule(burst=(len(healthy.requests) + 180, 10**9))
    argv = ["--config", str(config), "-o", str(tmp_path / "run"), "--no-progress", "--agent.max-retries", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        "model calls failed (circuit breaker)" in err and "rerun the same command with --retry-failed" in err
    )
    kept = records(tmp_path / "run")
    assert 0 < len(kept) < len(expected)

    healthy.schedule = None  # the endpoint is back
    assert main([*argv, "--retry-failed"]) == 0
    assert records(tmp_path / "run") == expected


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retry_failed_rewinds_to_the_first_failed_round(tmp_path, healthy, expected, transport, capsys):
    # No retries and a breaker that never trips: an outage of 40 requests becomes failed rows.
    config = write_config(
        tmp_path / "sim.yaml",
        healthy.base_url,
        transport,
        interaction_retries=0,
        breaker_threshold=1.0,
    )
    healthy.schedule = FaultSchedule(burst=(len(healthy.requests) + 100, 40))
    argv = ["--config", str(config), "-o", str(tmp_path / "run"), "--no-progress", "--agent.max-retries", "0"]
    assert main(argv) == 0
    assert "rerun with --retry-failed" in capsys.readouterr().err
    damaged = records(tmp_path / "run")
    failed = [r for r in damaged if r["status"] != "ok"]
    assert failed and len(damaged) == len(expected)
    assert main(argv) == 0 and records(tmp_path / "run") == damaged  # a plain resume keeps them

    healthy.schedule = None
    calls = len(healthy.requests)
    assert main([*argv, "--retry-failed"]) == 0
    assert records(tmp_path / "run") == expected
    # Only the affected worlds, from their first failed round, were run again (their caches
    # answered the calls that had succeeded).
    rerun = {(r["world_id"], r["round"]) for r in failed}
    assert len(healthy.requests) - calls <= calls_per_interaction() * 9 * len(
        rerun | {(w, 1) for w, _ in rerun}
    )
